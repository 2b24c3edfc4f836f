//! Config errors that say where they are: file:line:col, the environment
//! variable, or the `--set` argument that supplied the bad value.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Serialize;
use toml_edit::{Document, Item, Value};

/// Where a config value came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum Origin {
    /// The config file; line and column are 1-based, absent when the error
    /// concerns the file as a whole.
    File { file: PathBuf, line: Option<usize>, column: Option<usize> },
    /// A `DROVER_…__…` environment variable.
    Env { variable: String },
    /// A `--set KEY=VALUE` argument.
    Set { argument: String },
}

/// One config error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    #[serde(flatten)]
    pub origin: Origin,
    /// The key path, as `workers.web.backoff.initial` or `jobs.x.steps[1].name`.
    pub key: String,
    pub message: String,
}

impl Diagnostic {
    /// An error about a whole file (missing, unreadable, …).
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        Diagnostic {
            origin: Origin::File { file: path.to_path_buf(), line: None, column: None },
            key: String::new(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File { file, line: Some(l), column: Some(c) } => write!(f, "{}:{l}:{c}", file.display())?,
            Origin::File { file, .. } => write!(f, "{}", file.display())?,
            Origin::Env { variable } => write!(f, "environment variable {variable}")?,
            Origin::Set { argument } => write!(f, "--set {argument}")?,
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Formats a key path for people: dotted, array indices in brackets, odd
/// keys quoted.
pub fn display_key(path: &[String]) -> String {
    let mut out = String::new();
    for (i, seg) in path.iter().enumerate() {
        let parent_is_array = i > 0 && is_index(&path[i - 1..i], seg);
        if parent_is_array {
            out.push_str(&format!("[{seg}]"));
            continue;
        }
        if i > 0 {
            out.push('.');
        }
        let bare =
            !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if bare {
            out.push_str(seg);
        } else {
            out.push_str(&format!("{seg:?}"));
        }
    }
    out
}

/// Array positions in our config are only under `steps`, `command`,
/// `permanent_exit_codes`, `env_file`; a numeric segment after them is an index.
fn is_index(parent: &[String], seg: &str) -> bool {
    matches!(parent[0].as_str(), "steps" | "command" | "permanent_exit_codes" | "env_file" | "sockets")
        && seg.parse::<usize>().is_ok()
}

/// Maps byte offsets to (line, column) with one scan of the text, so a
/// file with thousands of errors costs no more than one with one.
pub struct Lines<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> Lines<'a> {
    pub fn new(text: &'a str) -> Self {
        let starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Lines { text, starts }
    }

    /// 1-based (line, column in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = floor_char_boundary(self.text, offset.min(self.text.len()));
        let line = self.starts.partition_point(|&s| s <= offset);
        let start = self.starts[line - 1];
        (line, self.text[start..offset].chars().count() + 1)
    }
}

/// 1-based (line, column in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A node of a parsed TOML document, whatever toml_edit stores it as.
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a toml_edit::Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(Item::Value(v)) | Node::Value(v) => v.span(),
            Node::Item(Item::Table(t)) | Node::Table(t) => t.span(),
            Node::Item(_) => None,
        }
    }

    /// The child at `seg` and the span of its key (or of the child itself
    /// when it has no key, as in an array).
    fn child(self, seg: &str) -> Option<(Node<'a>, Option<Range<usize>>)> {
        let index = || seg.parse::<usize>().ok();
        match self {
            Node::Item(Item::Table(t)) | Node::Table(t) => {
                let key = t.key(seg).and_then(|k| k.span());
                t.get(seg).map(|i| (Node::Item(i), key))
            }
            Node::Item(Item::ArrayOfTables(a)) => {
                let t = a.get(index()?)?;
                Some((Node::Table(t), t.span()))
            }
            Node::Item(Item::Value(v)) | Node::Value(v) => match v {
                Value::InlineTable(t) => {
                    let key = t.key(seg).and_then(|k| k.span());
                    t.get(seg).map(|v| (Node::Value(v), key))
                }
                Value::Array(a) => {
                    let v = a.get(index()?)?;
                    Some((Node::Value(v), v.span()))
                }
                _ => None,
            },
            Node::Item(_) => None,
        }
    }
}

/// Whether the document itself has a value at `path`.
pub fn has_path(doc: &Document<String>, path: &[String]) -> bool {
    let mut node = Node::Item(doc.as_item());
    for seg in path {
        match node.child(seg) {
            Some((child, _)) => node = child,
            None => return false,
        }
    }
    true
}

/// Finds the span in a parsed document for a key path: the key itself
/// when `prefer_key` (an unknown key), else the value; falls back to the
/// nearest enclosing key or table that has a span.
pub fn span_of(doc: &Document<String>, path: &[String], prefer_key: bool) -> Option<Range<usize>> {
    let mut node = Node::Item(doc.as_item());
    let mut best = None;
    for seg in path {
        let Some((child, key_span)) = node.child(seg) else {
            return best;
        };
        best = key_span.or(best);
        node = child;
    }
    if prefer_key { best.or_else(|| node.span()) } else { node.span().or(best) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_agree_with_line_col() {
        let text = "a = 1\nbé = 2\n\nc = 3";
        let lines = Lines::new(text);
        for off in 0..=text.len() {
            assert_eq!(lines.line_col(off), line_col(text, off), "offset {off}");
        }
        assert_eq!(lines.line_col(text.find('c').unwrap()), (4, 1));
    }

    #[test]
    fn keys_display_with_indices() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(display_key(&p(&["jobs", "x", "steps", "1", "name"])), "jobs.x.steps[1].name");
        assert_eq!(display_key(&p(&["workers", "a.b"])), "workers.\"a.b\"");
    }
}
