//! `env_file`: KEY=VALUE files, read the way systemd reads an
//! `EnvironmentFile=`. Lines starting with `#` or `;` are comments; blanks
//! around the key and before the value are dropped, as are trailing blanks
//! of an unquoted value; 'single quotes' keep everything literally;
//! "double quotes" take backslash escapes of `"`, `\`, `` ` `` and `$`; a
//! backslash at the end of a line continues the value (or comment) on the
//! next one. A `#` after a value is part of it. Unlike systemd, which skips
//! them with a warning, a line without `=`, an invalid name or an unclosed
//! quote is an error naming the file and line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// An env file is refused beyond this size: real ones are a few lines.
pub const MAX_ENV_FILE_BYTES: u64 = 1024 * 1024;

/// One `env_file` entry, its path made absolute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvFile {
    pub path: PathBuf,
    /// Written with a leading `-`: a missing file is no error.
    pub optional: bool,
}

impl EnvFile {
    /// An entry as written (`".env"`, `"-local.env"`), relative to `base_dir`.
    pub fn new(written: &str, base_dir: &Path) -> EnvFile {
        let (optional, rel) = match written.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, written),
        };
        EnvFile { path: base_dir.join(rel), optional }
    }
}

impl serde::Serialize for EnvFile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let p = self.path.display();
        s.collect_str(&if self.optional { format!("-{p}") } else { p.to_string() })
    }
}

/// The variables of `file`, or what is wrong with it (naming the file, and
/// the line where it can).
pub fn read(file: &EnvFile) -> Result<BTreeMap<String, String>, String> {
    let shown = file.path.display();
    let text = match super::load::read_regular(&file.path, MAX_ENV_FILE_BYTES) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && file.optional => return Ok(BTreeMap::new()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "env file {shown} does not exist; create it, or write \"-{}\" to make it optional",
                file.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
            ));
        }
        Err(e) => return Err(format!("env file {shown}: {e}")),
    };
    parse(&text).map_err(|(line, why)| format!("{shown}:{line}: {why}"))
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    PreKey,
    Key,
    PreValue,
    Value,
    ValueEscape,
    Single,
    Double,
    DoubleEscape,
    Comment,
    CommentEscape,
}

/// The variables of an env file's text, or the (1-based) line and what is
/// wrong there.
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, (usize, String)> {
    use State::*;
    let mut out = BTreeMap::new();
    let (mut key, mut value) = (String::new(), String::new());
    // Length of `key`/`value` up to their last non-blank character.
    let (mut key_end, mut value_end) = (0, 0);
    let (mut line, mut key_line, mut quote_line) = (1, 1, 1);
    let mut state = PreKey;
    let mut finish = |key: &mut String, value: &mut String, at: usize| -> Result<(), (usize, String)> {
        let ok = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err((at, format!("{key:?} is not a variable name (letters, digits and '_')")));
        }
        if value.contains('\0') {
            return Err((at, format!("the value of {key} contains a NUL byte")));
        }
        out.insert(std::mem::take(key), std::mem::take(value));
        Ok(())
    };
    for c in text.chars() {
        let nl = c == '\n';
        match state {
            PreKey if c == '#' || c == ';' => state = Comment,
            PreKey if c.is_whitespace() => {}
            PreKey => {
                key.push(c);
                key_end = key.len();
                key_line = line;
                state = Key;
            }
            Key if nl => {
                return Err((key_line, format!("expected KEY=VALUE, found {:?}", key.trim_end())));
            }
            Key if c == '=' => {
                key.truncate(key_end);
                value.clear();
                value_end = 0;
                state = PreValue;
            }
            Key => {
                key.push(c);
                if !c.is_whitespace() {
                    key_end = key.len();
                }
            }
            PreValue | Value if nl => {
                value.truncate(value_end);
                finish(&mut key, &mut value, key_line)?;
                state = PreKey;
            }
            PreValue if c == '\'' => (state, quote_line) = (Single, line),
            PreValue if c == '"' => (state, quote_line) = (Double, line),
            PreValue | Value if c == '\\' => state = ValueEscape,
            PreValue if c.is_whitespace() => {}
            PreValue | Value => {
                value.push(c);
                if !c.is_whitespace() {
                    value_end = value.len();
                }
                state = Value;
            }
            ValueEscape => {
                // A backslash before the line break continues the value.
                if !nl {
                    value.push(c);
                    value_end = value.len();
                }
                state = Value;
            }
            Single if c == '\'' => state = PreValue,
            Double if c == '"' => state = PreValue,
            Double if c == '\\' => state = DoubleEscape,
            Single | Double => {
                value.push(c);
                value_end = value.len();
            }
            DoubleEscape => {
                if matches!(c, '"' | '\\' | '`' | '$') {
                    value.push(c);
                } else if !nl {
                    value.push('\\');
                    value.push(c);
                }
                value_end = value.len();
                state = Double;
            }
            Comment if c == '\\' => state = CommentEscape,
            Comment if nl => state = PreKey,
            Comment => {}
            CommentEscape => state = Comment,
        }
        if nl {
            line += 1;
        }
    }
    match state {
        Key => return Err((key_line, format!("expected KEY=VALUE, found {:?}", key.trim_end()))),
        Single | Double | DoubleEscape => {
            let q = if state == Single { '\'' } else { '"' };
            return Err((quote_line, format!("the value of {key} opens a {q} quote that is never closed")));
        }
        PreValue | Value | ValueEscape => {
            value.truncate(value_end);
            finish(&mut key, &mut value, key_line)?;
        }
        PreKey | Comment | CommentEscape => {}
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(text: &str) -> Vec<(String, String)> {
        parse(text).unwrap().into_iter().collect()
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn comments_blanks_and_quotes() {
        let text = "# a comment\n; another\n\n  A = plain value  \nB='single # $x \\n'\nC=\"dq \\\"x\\\" \\$HOME \\n\"\nD=x # not a comment\nE=\nF=a\\\nb\nG=\"multi\nline\"\n";
        assert_eq!(
            vars(text),
            kv(&[
                ("A", "plain value"),
                ("B", "single # $x \\n"),
                ("C", "dq \"x\" $HOME \\n"),
                ("D", "x # not a comment"),
                ("E", ""),
                ("F", "ab"),
                ("G", "multi\nline"),
            ])
        );
    }

    #[test]
    fn the_last_line_needs_no_newline_and_later_keys_win() {
        assert_eq!(vars("K=1\nK=2"), kv(&[("K", "2")]));
        assert_eq!(vars("# only a comment"), kv(&[]));
        // As in systemd, a quote opens only where a value (or a quoted
        // part) may start; inside an unquoted value it is literal.
        assert_eq!(vars("Q='a'b\"c\"\nR='a' \"b\""), kv(&[("Q", "ab\"c\""), ("R", "ab")]));
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(
            parse("A=1\nnot a pair\n").unwrap_err(),
            (2, "expected KEY=VALUE, found \"not a pair\"".into())
        );
        assert_eq!(parse("A=1\nB\n").unwrap_err().0, 2);
        let (line, why) = parse("A=1\n\nB=\"open\nstill\n").unwrap_err();
        assert_eq!(line, 3);
        assert!(why.contains("never closed"), "{why}");
        let (line, why) = parse("\n1X=2\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(why.contains("not a variable name"), "{why}");
        assert!(parse("export A=1\n").is_err());
    }

    #[test]
    fn a_missing_file_is_named_unless_optional() {
        let dir = tempfile::tempdir().unwrap();
        let e = read(&EnvFile::new("nope.env", dir.path())).unwrap_err();
        assert!(e.contains("nope.env does not exist") && e.contains("\"-nope.env\""), "{e}");
        assert_eq!(read(&EnvFile::new("-nope.env", dir.path())), Ok(BTreeMap::new()));
        std::fs::write(dir.path().join("x.env"), "A=1\nbad\n").unwrap();
        let e = read(&EnvFile::new("-x.env", dir.path())).unwrap_err();
        assert!(e.ends_with("x.env:2: expected KEY=VALUE, found \"bad\""), "{e}");
    }
}
