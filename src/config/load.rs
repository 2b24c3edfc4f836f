//! Reading and layering the config: built-in defaults < the file <
//! `DROVER_…__…` environment variables < `--set KEY=VALUE`. The layers are
//! merged with figment; the merged document is validated against the
//! generated JSON schema, then read into the raw types and resolved. Every
//! error is traced back to the layer that supplied the value.

use std::io::Read;
use std::path::{Path, PathBuf};

use figment::value::{Dict, Map, Value as FValue};
use figment::{Figment, Metadata, Profile, Provider};

use super::diagnostic::{Diagnostic, Lines, Origin, display_key, has_path, line_col, span_of};
use super::model::Config;
use super::raw::RawConfig;
use super::resolve::resolve;
use super::schema;
use super::types::is_valid_name;

/// A config larger than this is refused: real ones are a few KiB, and the
/// supervisor must not be made to parse a runaway file.
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// The environment variable that names the config file. It is not a config
/// key (it has no `__`).
pub const CONFIG_ENV: &str = "DROVER_CONFIG";
const ENV_PREFIX: &str = "DROVER_";

/// One override: an environment variable or a `--set` argument.
#[derive(Clone, Debug, PartialEq)]
pub struct Override {
    pub origin: Origin,
    pub path: Vec<String>,
    pub value: toml::Value,
}

/// The env and `--set` layers, captured once at start-up so that a reload
/// applies exactly the same overrides.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    layers: Vec<Override>,
    /// Malformed `DROVER_…__…` variables: reported when a config is
    /// loaded, so they never stop commands that read no config.
    env_errors: Vec<Diagnostic>,
}

impl Overrides {
    /// Env layers (in name order, for determinism) then `--set` layers (in
    /// command-line order; a later one wins).
    pub fn new<I>(env: I, sets: &[String]) -> Result<Self, Diagnostic>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut env: Vec<_> =
            env.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__")).collect();
        env.sort();
        let mut layers = Vec::new();
        let mut env_errors = Vec::new();
        for (name, value) in env {
            let origin = Origin::Env { variable: name.clone() };
            // Config keys are lowercase, but the names of the variables
            // under an `env` table keep their case.
            let mut in_env = false;
            let path: Vec<String> = name[ENV_PREFIX.len()..]
                .split("__")
                .map(|s| {
                    if in_env {
                        return s.to_string();
                    }
                    let lower = s.to_ascii_lowercase();
                    in_env = lower == "env";
                    lower
                })
                .collect();
            match Override::new(origin, path, &value) {
                Ok(o) => layers.push(o),
                Err(d) => env_errors.push(d),
            }
        }
        for arg in sets {
            let origin = Origin::Set { argument: arg.clone() };
            let Some((key, value)) = arg.split_once('=') else {
                return Err(Diagnostic {
                    origin,
                    key: String::new(),
                    message: "expected KEY=VALUE, e.g. workers.web.capacity=4".into(),
                });
            };
            let path = key.trim().split('.').map(|s| s.trim().to_string()).collect();
            layers.push(Override::new(origin, path, value)?);
        }
        Ok(Overrides { layers, env_errors })
    }

    /// Overrides from this process's environment and the given `--set`s.
    pub fn from_process(sets: &[String]) -> Result<Self, Diagnostic> {
        Self::new(
            std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
            sets,
        )
    }
}

/// An override as `status` shows it: which key, set how, and its value
/// unless it may be secret (anything under an `env` table).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShownOverride {
    /// The key path, dotted (`workers.api.capacity`).
    pub key: String,
    /// "set" or "env".
    pub source: String,
    /// `--set workers.api.capacity=3`, or the variable's name (an
    /// argument whose value is hidden is shown as `--set KEY=…`).
    pub by: String,
    /// The value as TOML; absent when it is not shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl Overrides {
    /// The overrides, as `status` and `plan` show them.
    pub fn shown(&self) -> Vec<ShownOverride> {
        self.layers
            .iter()
            .map(|o| {
                let key = display_key(&o.path);
                let hidden = o.path.iter().any(|s| s == "env") || has_env_table(&o.value);
                let (source, by) = match &o.origin {
                    Origin::Env { variable } => ("env", variable.clone()),
                    Origin::Set { .. } if hidden => ("set", format!("--set {key}=…")),
                    Origin::Set { argument } => ("set", format!("--set {argument}")),
                    Origin::File { .. } => ("file", String::new()),
                };
                ShownOverride {
                    key,
                    source: source.into(),
                    by,
                    value: (!hidden).then(|| o.value.to_string()),
                }
            })
            .collect()
    }
}

fn has_env_table(v: &toml::Value) -> bool {
    match v {
        toml::Value::Table(t) => t.iter().any(|(k, v)| k == "env" || has_env_table(v)),
        toml::Value::Array(a) => a.iter().any(has_env_table),
        _ => false,
    }
}

impl Override {
    fn new(origin: Origin, path: Vec<String>, raw: &str) -> Result<Self, Diagnostic> {
        if path.iter().any(|s| s.is_empty()) {
            return Err(Diagnostic {
                origin,
                key: String::new(),
                message: "the key has an empty part; write a dotted path such as workers.web.capacity".into(),
            });
        }
        let mut value = parse_value(raw);
        // `…__ENV__PORT=9000` means the string "9000": where the schema
        // wants a string, a bare scalar is taken as written.
        let wants_string = schema::node_at(schema::cached(), &path)
            .and_then(|n| n.get("type"))
            .is_some_and(|t| t == "string");
        if wants_string
            && !matches!(value, toml::Value::String(_) | toml::Value::Array(_) | toml::Value::Table(_))
        {
            value = toml::Value::String(raw.to_string());
        }
        Ok(Override { origin, path, value })
    }
}

/// VALUE is read as a TOML value (`4`, `true`, `["a", "b"]`, `{ a = "1" }`,
/// `"quoted"`), else taken as a plain string (`5s`, `/bin/sh`).
fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// A successfully loaded config and what it was made from.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub config: Config,
    pub path: PathBuf,
    /// The file's text, kept so a reload can tell whether anything changed.
    pub text: String,
}

/// Reads a config file, refusing what is not a small UTF-8 text file.
/// Only a regular file: a FIFO, a terminal or a device could block the
/// reader for ever (and the supervisor re-reads its config on its event
/// loop), so it is opened without blocking and refused after a look.
pub fn read_text(path: &Path) -> Result<String, Diagnostic> {
    let fail = |msg: String| Diagnostic::file(path, msg);
    let (file, size) = open_regular(path).map_err(|e| {
        fail(match e.kind() {
            std::io::ErrorKind::NotFound => {
                "no such file (name another with -c FILE or DROVER_CONFIG)".to_string()
            }
            std::io::ErrorKind::IsADirectory => "is a directory, not a config file".into(),
            std::io::ErrorKind::InvalidInput => format!("{e}; write the config to a file and name that"),
            _ => format!("cannot open: {e}"),
        })
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes).map_err(|e| fail(format!("cannot read: {e}")))?;
    text_from_bytes(path, bytes, size)
}

/// Opens `path` for reading, and its size, if it is a regular file: it is
/// opened without blocking and refused after a look, as a FIFO, a
/// terminal or a device could block the reader for ever.
fn open_regular(path: &Path) -> std::io::Result<(std::fs::File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(std::io::ErrorKind::IsADirectory.into());
    }
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is not a regular file (a FIFO, a terminal or a device)",
        ));
    }
    Ok((file, meta.len()))
}

/// The UTF-8 text of the regular file at `path`, of at most `max` bytes
/// (env files; the config itself has [`read_text`], with its own messages).
pub fn read_regular(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    let (file, size) = open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("is {} KiB; at most {} KiB is read", size.max(bytes.len() as u64) >> 10, max >> 10),
        ));
    }
    String::from_utf8(bytes).map_err(|_| Error::new(ErrorKind::InvalidData, "is not UTF-8 text"))
}

/// The config text in `bytes` read from `path` (whose size on disk is
/// `size`): at most 4 MiB of UTF-8.
pub fn text_from_bytes(path: &Path, bytes: Vec<u8>, size: u64) -> Result<String, Diagnostic> {
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        let size = size.max(bytes.len() as u64);
        return Err(Diagnostic::file(
            path,
            format!(
                "file is {:.1} MiB; a config may be at most {} MiB",
                size as f64 / (1 << 20) as f64,
                MAX_CONFIG_BYTES >> 20
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let prefix = String::from_utf8_lossy(&bytes[..at]);
        let (line, column) = line_col(&prefix, prefix.len());
        Diagnostic {
            origin: Origin::File { file: path.to_path_buf(), line: Some(line), column: Some(column) },
            key: String::new(),
            message: format!("not valid UTF-8 (byte 0x{:02x}); a config must be UTF-8 text", bytes[at]),
        }
    })
}

/// Loads, layers, validates and resolves the config at `path`.
pub fn load(path: &Path, overrides: &Overrides) -> Result<Loaded, Vec<Diagnostic>> {
    let text = read_text(path).map_err(|d| vec![d])?;
    load_text(path, text, overrides)
}

/// Like [`load`], for text already read from `path`.
pub fn load_text(path: &Path, text: String, overrides: &Overrides) -> Result<Loaded, Vec<Diagnostic>> {
    if !overrides.env_errors.is_empty() {
        return Err(overrides.env_errors.clone());
    }
    let doc = toml_edit::Document::parse(text.clone()).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(&text, s.start)).unzip();
        let mut message = format!("invalid TOML: {}", e.message().trim());
        if let Some(span) = e.span()
            && message.ends_with("duplicate key")
        {
            message.push_str(&duplicate_key_detail(&text, span.start));
        }
        vec![Diagnostic {
            origin: Origin::File { file: path.to_path_buf(), line, column },
            key: String::new(),
            message,
        }]
    })?;
    let locate = Locator { path, lines: Lines::new(&text), doc: &doc, overrides };
    // One parse serves both the spans and the values.
    let table = edit_table(doc.as_table());

    // No config key takes a date or time: say so, rather than let one
    // pass as a string.
    let mut dates = Vec::new();
    for (k, v) in &table {
        find_datetimes(v, &mut vec![k.clone()], &mut dates);
    }

    for o in &overrides.layers {
        find_datetimes(&o.value, &mut o.path.clone(), &mut dates);
    }
    if !dates.is_empty() {
        return Err(dates
            .into_iter()
            .map(|p| locate.diag(&p, false, "expected a string, found a TOML date or time; quote it".into()))
            .collect());
    }

    let created = created_by_overrides(&table, overrides);
    if !created.is_empty() {
        return Err(created);
    }

    let mut figment =
        Figment::new().merge(Layer { name: format!("file {}", path.display()), dict: to_dict(&table) });
    for o in &overrides.layers {
        figment = figment.merge(Layer {
            name: match &o.origin {
                Origin::Env { variable } => format!("environment variable {variable}"),
                Origin::Set { argument } => format!("--set {argument}"),
                Origin::File { .. } => unreachable!("overrides are env or --set"),
            },
            dict: nest(&o.path, to_figment(&o.value)),
        });
    }

    let merged: serde_json::Value = figment.extract().map_err(|e| locate.figment(e))?;
    let (schema_value, validator) = schema::validator();
    let mut diags = Vec::new();
    let mut wrong = Vec::new();
    let mut missing = Vec::new();
    for e in validator.iter_errors(&merged) {
        for (path, prefer_key, msg) in schema_diagnostics(&schema_value, &e) {
            match e.kind() {
                jsonschema::error::ValidationErrorKind::Required { property } => {
                    missing.push((path.clone(), property.as_str().unwrap_or_default().to_string()));
                }
                _ => wrong.push(path.clone()),
            }
            diags.push(locate.diag(&path, prefer_key, msg));
        }
    }
    let base_dir = base_dir(path);
    if !diags.is_empty() {
        // Report the semantic mistakes too: the keys the schema refused
        // are left out, and what remains is checked, so a user fixes
        // everything in one round.
        let mut rest = merged.clone();
        for p in &wrong {
            remove_path(&mut rest, p);
        }
        // A missing required key gets a stand-in, so the rest of its table
        // is still checked (a worker with no command and a missing dir).
        for (i, (p, property)) in missing.iter().enumerate() {
            let mut at = p.clone();
            at.push(property.clone());
            let stand_in = match schema::node_at(&schema_value, &at).and_then(|n| n.get("type")) {
                Some(t) if t == "array" => serde_json::json!(["true"]),
                Some(t) if t == "string" => serde_json::json!(format!("missing-{i}")),
                _ => {
                    remove_path(&mut rest, p);
                    continue;
                }
            };
            if let Some(obj) = pointer_mut(&mut rest, p).and_then(|v| v.as_object_mut()) {
                obj.insert(property.clone(), stand_in);
            }
        }
        if let Ok(raw) = serde_json::from_value::<RawConfig>(rest)
            && let Err(problems) = resolve(&raw, &base_dir)
        {
            for p in problems {
                let d = locate.diag(&p.path, false, p.message);
                if !diags.iter().any(|e| e.key == d.key) {
                    diags.push(d);
                }
            }
        }
        sort_dedup(&mut diags);
        return Err(diags);
    }

    let raw: RawConfig = figment.extract().map_err(|e| locate.figment(e))?;
    let config = resolve(&raw, &base_dir).map_err(|problems| {
        let mut diags: Vec<_> =
            problems.into_iter().map(|p| locate.diag(&p.path, false, p.message)).collect();
        sort_dedup(&mut diags);
        diags
    })?;
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(Loaded { config, path, text })
}

/// Overrides that name a worker or job the file does not define, without
/// also giving what defines one (`command`, or `steps` for a job): most
/// likely a typo (`--set workers.apii.capacity=2`), which would otherwise
/// add a worker with no command.
fn created_by_overrides(file: &toml::Table, overrides: &Overrides) -> Vec<Diagnostic> {
    // What the overrides, merged in order, say about each section.
    let mut merged = toml::Table::new();
    for o in &overrides.layers {
        let mut v = o.value.clone();
        for key in o.path.iter().rev() {
            let mut t = toml::Table::new();
            t.insert(key.clone(), v);
            v = toml::Value::Table(t);
        }
        if let toml::Value::Table(t) = v {
            merge_into(&mut merged, t);
        }
    }
    let mut out = Vec::new();
    for (section, what, defining) in
        [("workers", "worker", &["command"][..]), ("jobs", "job", &["command", "steps"][..])]
    {
        let in_file: Vec<String> = file
            .get(section)
            .and_then(|s| s.as_table())
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        let Some(given) = merged.get(section).and_then(|s| s.as_table()) else { continue };
        for (name, body) in given {
            let defines = body.as_table().is_some_and(|t| defining.iter().any(|k| t.contains_key(*k)));
            if in_file.contains(name) || defines {
                continue;
            }
            let Some(o) = overrides.layers.iter().rev().find(|o| {
                o.path.first().is_some_and(|s| s == section)
                    && (o.path.get(1) == Some(name) || (o.path.len() == 1 && o.value.get(name).is_some()))
            }) else {
                continue;
            };
            let mut message = format!("no {what} {name:?} in the file");
            if let Some(near) = nearest(name, &in_file) {
                message.push_str(&format!("; did you mean {near:?}?"));
            }
            message.push_str(&format!(
                " (an override may add a {what} only together with its {})",
                defining.join(" or ")
            ));
            out.push(Diagnostic {
                origin: o.origin.clone(),
                key: display_key(&[section.to_string(), name.clone()]),
                message,
            });
        }
    }
    out
}

fn merge_into(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge_into(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// The state_dir a config names, read leniently: commands that only talk
/// to a running supervisor must find it even when the file on disk has
/// since become invalid (that is when `status` matters most). Resolved as
/// `load` resolves it: relative to the config file's directory.
pub fn state_dir_of(path: &Path, overrides: &Overrides) -> PathBuf {
    state_dir_in(path, read_text(path).ok().as_deref(), overrides)
}

/// [`state_dir_of`] for text already read from `path` (None: unreadable).
pub fn state_dir_in(path: &Path, text: Option<&str>, overrides: &Overrides) -> PathBuf {
    // Only this one key is needed: no schema, no validation, so a client
    // command costs little more than its round trip to the supervisor.
    let from_file = text.and_then(|t| match toml::from_str::<toml::Table>(t) {
        Ok(t) => t.get("supervisor")?.get("state_dir")?.as_str().map(PathBuf::from),
        Err(_) => scan_state_dir(t),
    });
    let overridden = overrides.layers.iter().rev().find_map(|o| match o.path.as_slice() {
        [s, d] if s == "supervisor" && d == "state_dir" => o.value.as_str().map(PathBuf::from),
        [s] if s == "supervisor" => o.value.get("state_dir")?.as_str().map(PathBuf::from),
        _ => None,
    });
    base_dir(path).join(overridden.or(from_file).unwrap_or_else(|| ".drover".into()))
}

/// The `[supervisor] state_dir` of a file that does not parse as a whole
/// (a syntax error elsewhere in it): each line is read on its own, as
/// TOML, in the table its last header opened. Also finds the dotted
/// (`supervisor.state_dir = …`) and inline (`supervisor = { … }`) forms.
fn scan_state_dir(text: &str) -> Option<PathBuf> {
    let as_str = |v: Option<&toml::Value>| v?.get("state_dir")?.as_str().map(PathBuf::from);
    // Before any header, keys belong to the root table.
    let mut table = Some(Vec::new());
    for line in text.lines().map(str::trim) {
        let Ok(t) = toml::from_str::<toml::Table>(line) else {
            if line.starts_with('[') {
                table = None; // a broken header: what follows is in no known table
            }
            continue;
        };
        if line.starts_with('[') {
            table = Some(header_path(&t));
            continue;
        }
        let found = match table.as_deref() {
            Some([]) => as_str(t.get("supervisor")),
            Some([s]) if s == "supervisor" => as_str(Some(&toml::Value::Table(t))),
            _ => None,
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// The path a lone table header (`[a.b]`, parsed) names: its single chain
/// of one-key tables. An array-of-tables header names no plain table.
fn header_path(t: &toml::Table) -> Vec<String> {
    let mut path = Vec::new();
    let mut cur = t;
    while let Some((k, v)) = cur.iter().next().filter(|_| cur.len() == 1) {
        path.push(k.clone());
        match v.as_table() {
            Some(next) => cur = next,
            None => return vec!["[[…]]".into()],
        }
    }
    path
}

/// The directory relative paths in the config are resolved against: the
/// real path of the file's directory, so that `-c ../app/daemon.toml` and
/// `-c app/daemon.toml` (from elsewhere) name the same directories, and a
/// `plan` from another cwd sees no change that is not there.
pub fn base_dir(config_path: &Path) -> PathBuf {
    let parent = config_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::canonicalize(parent)
        .or_else(|_| std::path::absolute(parent))
        .unwrap_or_else(|_| parent.to_path_buf())
}

/// For a duplicate key at byte `at` of `text`: the key (or table), and
/// the line that gave it first (toml_edit names neither).
fn duplicate_key_detail(text: &str, at: usize) -> String {
    let at = at.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or_default();
    let earlier: Vec<&str> = text[..line_start].lines().collect();
    if line.trim_start().starts_with('[') {
        // A table given twice: `[workers.web]` … `[workers.web]`.
        let header = line.trim();
        let first = earlier.iter().position(|l| l.trim() == header);
        return match first {
            Some(i) => format!(": table {header} is also on line {}; merge the two", i + 1),
            None => format!(": table {header} is defined twice; merge the two"),
        };
    }
    let key: String = text[at..].chars().take_while(|c| !"=,}]\n".contains(*c)).collect();
    let key = key.trim();
    if key.is_empty() {
        return String::new();
    }
    let mut detail = format!(" {key:?}");
    // A key of the table: look back to its header for the first time.
    if text[line_start..at].trim().is_empty() {
        for (i, l) in earlier.iter().enumerate().rev() {
            let l = l.trim_start();
            if l.starts_with('[') {
                break;
            }
            if l.contains('=') && l.split('=').next().is_some_and(|k| k.trim() == key) {
                detail.push_str(&format!(", first set on line {}", i + 1));
                break;
            }
        }
    }
    detail.push_str("; keep one of them");
    detail
}

/// The value at `path` (object keys and array indices) in `v`.
fn pointer_mut<'v>(v: &'v mut serde_json::Value, path: &[String]) -> Option<&'v mut serde_json::Value> {
    let pointer: String =
        path.iter().map(|s| format!("/{}", s.replace('~', "~0").replace('/', "~1"))).collect();
    v.pointer_mut(&pointer)
}

/// Removes the value at `path` (object keys and array indices) from `v`;
/// an array element is replaced by null rather than shifting the others.
fn remove_path(v: &mut serde_json::Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut node = v;
    for key in parents {
        node = match node {
            serde_json::Value::Object(m) => match m.get_mut(key) {
                Some(n) => n,
                None => return,
            },
            serde_json::Value::Array(a) => match key.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                Some(n) => n,
                None => return,
            },
            _ => return,
        };
    }
    match node {
        serde_json::Value::Object(m) => {
            m.remove(last);
        }
        serde_json::Value::Array(a) => {
            if let Some(item) = last.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                *item = serde_json::Value::Null;
            }
        }
        _ => {}
    }
}

fn sort_dedup(diags: &mut Vec<Diagnostic>) {
    let pos = |d: &Diagnostic| match &d.origin {
        Origin::File { line, column, .. } => (0, line.unwrap_or(0), column.unwrap_or(0)),
        _ => (1, 0, 0),
    };
    diags.sort_by(|a, b| pos(a).cmp(&pos(b)).then_with(|| a.key.cmp(&b.key)));
    diags.dedup();
}

/// Traces a key path back to the layer that supplied it.
struct Locator<'a> {
    path: &'a Path,
    lines: Lines<'a>,
    doc: &'a toml_edit::Document<String>,
    overrides: &'a Overrides,
}

impl Locator<'_> {
    fn diag(&self, key: &[String], prefer_key: bool, message: String) -> Diagnostic {
        // Blame, in order: the highest override that set this key or a
        // table above it; the file, if it has the key; else an override
        // that created the key by setting something below it (as
        // `--set workers.new.capacity=2` creates a worker with no command).
        let layers = || self.overrides.layers.iter().rev();
        let origin =
            layers()
                .find(|o| key.starts_with(&o.path))
                .or_else(|| {
                    if has_path(self.doc, key) { None } else { layers().find(|o| o.path.starts_with(key)) }
                })
                .map(|o| o.origin.clone())
                .unwrap_or_else(|| {
                    let pos = span_of(self.doc, key, prefer_key).map(|s| self.lines.line_col(s.start));
                    let (line, column) = pos.unzip();
                    Origin::File { file: self.path.to_path_buf(), line, column }
                });
        Diagnostic { origin, key: display_key(key), message }
    }

    fn figment(&self, err: figment::Error) -> Vec<Diagnostic> {
        err.into_iter()
            .map(|e| {
                let msg = e.kind.to_string();
                self.diag(&e.path, false, msg)
            })
            .collect()
    }
}

/// A figment layer: one file, variable or argument, named for error messages.
struct Layer {
    name: String,
    dict: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

fn nest(path: &[String], value: FValue) -> Dict {
    let (last, parents) = path.split_last().expect("override paths are non-empty");
    let mut dict = Dict::new();
    dict.insert(last.clone(), value);
    for key in parents.iter().rev() {
        let mut outer = Dict::new();
        outer.insert(key.clone(), FValue::from(dict));
        dict = outer;
    }
    dict
}

fn find_datetimes(v: &toml::Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        toml::Value::Datetime(_) => out.push(path.clone()),
        toml::Value::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                path.push(i.to_string());
                find_datetimes(item, path, out);
                path.pop();
            }
        }
        toml::Value::Table(t) => {
            for (k, item) in t {
                path.push(k.clone());
                find_datetimes(item, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn edit_table<'t>(t: impl IntoIterator<Item = (&'t str, &'t toml_edit::Item)>) -> toml::Table {
    t.into_iter().filter_map(|(k, item)| Some((k.to_string(), edit_item(item)?))).collect()
}

fn edit_item(item: &toml_edit::Item) -> Option<toml::Value> {
    match item {
        toml_edit::Item::None => None,
        toml_edit::Item::Value(v) => Some(edit_value(v)),
        toml_edit::Item::Table(t) => Some(toml::Value::Table(edit_table(t.iter()))),
        toml_edit::Item::ArrayOfTables(a) => {
            Some(toml::Value::Array(a.iter().map(|t| toml::Value::Table(edit_table(t.iter()))).collect()))
        }
    }
}

fn edit_value(v: &toml_edit::Value) -> toml::Value {
    use toml_edit::Value as V;
    match v {
        V::String(s) => toml::Value::String(s.value().clone()),
        V::Integer(i) => toml::Value::Integer(*i.value()),
        V::Float(f) => toml::Value::Float(*f.value()),
        V::Boolean(b) => toml::Value::Boolean(*b.value()),
        V::Datetime(d) => toml::Value::Datetime(*d.value()),
        V::Array(a) => toml::Value::Array(a.iter().map(edit_value).collect()),
        V::InlineTable(t) => {
            toml::Value::Table(t.iter().map(|(k, v)| (k.to_string(), edit_value(v))).collect())
        }
    }
}

fn to_dict(table: &toml::Table) -> Dict {
    table.iter().map(|(k, v)| (k.clone(), to_figment(v))).collect()
}

fn to_figment(v: &toml::Value) -> FValue {
    match v {
        toml::Value::String(s) => FValue::from(s.clone()),
        toml::Value::Integer(i) => FValue::from(*i),
        toml::Value::Float(f) => FValue::from(*f),
        toml::Value::Boolean(b) => FValue::from(*b),
        toml::Value::Datetime(d) => FValue::from(d.to_string()),
        toml::Value::Array(a) => FValue::from(a.iter().map(to_figment).collect::<Vec<_>>()),
        toml::Value::Table(t) => FValue::from(to_dict(t)),
    }
}

/// Turns one schema error into (key path, point at the key?, message),
/// worded for people rather than for schema authors.
fn schema_diagnostics(
    schema: &serde_json::Value,
    e: &jsonschema::ValidationError,
) -> Vec<(Vec<String>, bool, String)> {
    use jsonschema::error::ValidationErrorKind as K;
    let path = pointer_segments(e.instance_path().as_str());
    let node = schema::node_at(schema, &path);
    let title = node.and_then(|n| n.get("title")).and_then(|t| t.as_str()).unwrap_or("");
    let found = describe(e.instance());
    let one = |msg: String| vec![(path.clone(), false, msg)];
    match e.kind() {
        K::AdditionalProperties { unexpected } => unexpected
            .iter()
            .map(|key| {
                let mut p = path.clone();
                p.push(key.clone());
                (p, true, unknown_key_message(key, &schema::keys_at(&path)))
            })
            .collect(),
        K::PropertyNames { error } => {
            let name = error.instance().as_str().unwrap_or_default().to_string();
            let mut p = path.clone();
            p.push(name.clone());
            let msg = if is_valid_name(&name) {
                format!("invalid name {name:?}")
            } else {
                format!(
                    "invalid name {name:?}: use 1 to 63 lowercase letters, digits, '-' or '_', starting with a letter or digit"
                )
            };
            vec![(p, true, msg)]
        }
        K::Required { property } => one(format!(
            "missing required key {}",
            property.as_str().map_or(property.to_string(), |s| format!("{s:?}"))
        )),
        K::Enum { options } => {
            let opts: Vec<String> = options.as_array().into_iter().flatten().map(|o| o.to_string()).collect();
            one(format!("expected one of {}, found {found}", opts.join(", ")))
        }
        K::Type { .. } if title == "Duration" => {
            let example = match &**e.instance() {
                serde_json::Value::Number(n) => format!("\"{n}s\""),
                _ => "\"30s\"".into(),
            };
            one(format!(
                "expected a duration such as {example} (a number and a unit: ms, s, m, h), found {found}"
            ))
        }
        K::Type { .. } => {
            let expected = node.map(expected_type).unwrap_or_else(|| "another type".into());
            one(format!("expected {expected}, found {found}"))
        }
        K::Pattern { .. } if title == "Duration" => {
            one(format!("expected a duration such as \"250ms\", \"2s\" or \"2m\", found {found}"))
        }
        K::Pattern { pattern } if path.last().map(String::as_str) == Some("name") => {
            let _ = pattern;
            one(format!(
                "invalid name {found}: use 1 to 63 lowercase letters, digits, '-' or '_', starting with a letter or digit"
            ))
        }
        K::Pattern { .. } if path.last().map(String::as_str) == Some("umask") => {
            one(format!("expected an octal mask of 3 or 4 digits such as \"027\", found {found}"))
        }
        // The parser says what is wrong (not loopback, no port, …) better
        // than the pattern; the pattern only lets editors flag it too.
        K::Pattern { .. } if path == ["supervisor", "metrics"] => {
            let text = e.instance().as_str().unwrap_or_default();
            one(super::sockets::parse_metrics(text, Path::new("."))
                .err()
                .unwrap_or_else(|| format!("{found} is not a loopback HOST:PORT or unix:PATH")))
        }
        K::AnyOf { .. } if title == "Limit" || title == "LimitValue" => one(format!(
            "expected a number, \"infinity\", a size such as \"64MiB\" (for limits in bytes), \
             or {{ soft = …, hard = … }} with both, found {found}"
        )),
        K::AnyOf { .. } if title == "ByteSize" => {
            one(format!("expected a size such as 1048576 or \"10MiB\", found {found}"))
        }
        K::MinItems { limit: 1 } => one("must not be empty".into()),
        K::Minimum { limit } => one(format!("must be at least {limit}, found {found}")),
        K::Maximum { limit } => one(format!("must be at most {limit}, found {found}")),
        _ => one(e.to_string()),
    }
}

/// The one of `candidates` closest to `word`, if it is close enough to be
/// a likely typo.
pub fn nearest<'c, S: AsRef<str>>(word: &str, candidates: &'c [S]) -> Option<&'c str> {
    candidates
        .iter()
        .map(AsRef::as_ref)
        .min_by_key(|a| edit_distance(word, a))
        .filter(|a| edit_distance(word, a) <= 2.max(word.len() / 3))
}

fn unknown_key_message(key: &str, allowed: &[String]) -> String {
    let mut msg = format!("unknown key {key:?}");
    if let Some(near) = nearest(key, allowed) {
        msg.push_str(&format!("; did you mean {near:?}?"));
    } else if !allowed.is_empty() {
        msg.push_str(&format!("; expected one of: {}", allowed.join(", ")));
    }
    msg
}

pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn expected_type(node: &serde_json::Value) -> String {
    let word = |t: &str| match t {
        "string" => "a string",
        "integer" => "an integer",
        "number" => "a number",
        "boolean" => "true or false",
        "array" => "an array",
        "object" => "a table",
        _ => "another type",
    };
    match node.get("type") {
        Some(serde_json::Value::String(t)) => word(t).to_string(),
        Some(serde_json::Value::Array(ts)) => {
            ts.iter().filter_map(|t| t.as_str()).map(word).collect::<Vec<_>>().join(" or ")
        }
        _ => "another type".into(),
    }
}

fn describe(v: &serde_json::Value) -> String {
    match v {
        // TOML has no null: only inf and nan turn into one.
        serde_json::Value::Null => "inf or nan".into(),
        serde_json::Value::Object(_) => "a table".into(),
        serde_json::Value::Array(_) => "an array".into(),
        serde_json::Value::String(s) if s.chars().count() > 60 => {
            format!("{:?}…", s.chars().take(60).collect::<String>())
        }
        other => other.to_string(),
    }
}

fn pointer_segments(pointer: &str) -> Vec<String> {
    pointer.split('/').skip(1).map(|s| s.replace("~1", "/").replace("~0", "~")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, env: &[(&str, &str)], sets: &[&str]) -> Result<Config, Vec<Diagnostic>> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let overrides = Overrides::new(env, &sets).map_err(|d| vec![d])?;
        let path = std::env::temp_dir().join("daemon.toml");
        load_text(&path, text.to_string(), &overrides).map(|l| l.config)
    }

    const BASE: &str = "[workers.web]\ncommand = [\"sleep\", \"1\"]\n";

    #[test]
    fn layering_order_is_file_env_set() {
        let c = load_str(BASE, &[("DROVER_WORKERS__WEB__CAPACITY", "3")], &[]).unwrap();
        assert_eq!(c.workers["web"].capacity, 3);
        let c =
            load_str(BASE, &[("DROVER_WORKERS__WEB__CAPACITY", "3")], &["workers.web.capacity=4"]).unwrap();
        assert_eq!(c.workers["web"].capacity, 4);
        let c = load_str(BASE, &[("DROVER_DEFAULTS__STOP_GRACE", "5s")], &[]).unwrap();
        assert_eq!(c.workers["web"].stop_grace.to_string(), "5s");
    }

    #[test]
    fn non_key_env_vars_are_ignored() {
        let c = load_str(BASE, &[("DROVER_CONFIG", "x"), ("DROVER_WORKER", "w"), ("OTHER__X", "1")], &[]);
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn set_values_are_toml_else_strings() {
        let c = load_str(
            BASE,
            &[],
            &[
                "workers.web.command=[\"echo\", \"hi\"]",
                "workers.web.env.MODE=fast",
                "supervisor.reload=false",
            ],
        )
        .unwrap();
        assert_eq!(c.workers["web"].command, ["echo", "hi"]);
        assert_eq!(c.workers["web"].env["MODE"], "fast");
        assert!(!c.supervisor.reload);
    }

    #[test]
    fn errors_name_their_layer() {
        let errs = load_str(BASE, &[("DROVER_WORKERS__WEB__CAPACITY", "lots")], &[]).unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            "environment variable DROVER_WORKERS__WEB__CAPACITY: workers.web.capacity: expected an integer, found \"lots\""
        );
        let errs = load_str(BASE, &[], &["defaults.stop_grace=soon"]).unwrap_err();
        assert!(
            errs[0]
                .to_string()
                .starts_with("--set defaults.stop_grace=soon: defaults.stop_grace: expected a duration"),
            "{}",
            errs[0]
        );
        let errs = load_str(BASE, &[], &["workers.wbe.capacity=2"]).unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            "--set workers.wbe.capacity=2: workers.wbe: no worker \"wbe\" in the file; did you mean \"web\"? \
             (an override may add a worker only together with its command)"
        );
        let errs = load_str(BASE, &[("DROVER_JOBS__REPORT__EVERY", "1h")], &[]).unwrap_err();
        assert!(
            errs[0]
                .to_string()
                .starts_with("environment variable DROVER_JOBS__REPORT__EVERY: jobs.report: no job")
        );
        // With its command, an override may add one.
        let c = load_str(BASE, &[], &["workers.api.capacity=2", "workers.api.command=[\"true\"]"]).unwrap();
        assert_eq!(c.workers["api"].capacity, 2);
        let c = load_str(BASE, &[("DROVER_JOBS__J__COMMAND", "[\"true\"]")], &[]).unwrap();
        assert!(c.jobs.contains_key("j"));
        let err = Overrides::new(Vec::new(), &["novalue".into()]).unwrap_err();
        assert!(err.to_string().contains("expected KEY=VALUE"));
    }

    #[test]
    fn file_errors_have_line_and_column() {
        let text = "[workers.web]\ncommand = [\"true\"]\ncapacity = \"two\"\nstop_grase = \"1s\"\n";
        let errs = load_str(text, &[], &[]).unwrap_err();
        let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        let file = std::env::temp_dir().join("daemon.toml");
        let f = file.display();
        assert_eq!(
            shown,
            [
                format!("{f}:3:12: workers.web.capacity: expected an integer, found \"two\""),
                format!(
                    "{f}:4:1: workers.web.stop_grase: unknown key \"stop_grase\"; did you mean \"stop_grace\"?"
                ),
            ]
        );
    }

    #[test]
    fn syntax_error_position() {
        let errs = load_str("[workers.web]\ncommand = [\"true\"\n", &[], &[]).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(matches!(errs[0].origin, Origin::File { line: Some(2), .. }), "{:?}", errs[0]);
        assert!(errs[0].message.starts_with("invalid TOML"));
    }

    #[test]
    fn state_dir_is_found_leniently_with_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("daemon.toml");
        std::fs::write(&p, "[supervisor]\nstate_dir = \"st\"\n[workers.x]\ncapacity = \"broken\"\n").unwrap();
        let none = Overrides::default();
        assert_eq!(state_dir_of(&p, &none), dir.path().join("st"));
        let env = Overrides::new([("DROVER_SUPERVISOR__STATE_DIR".into(), "/abs".into())], &[]).unwrap();
        assert_eq!(state_dir_of(&p, &env), Path::new("/abs"));
        let set = Overrides::new(Vec::new(), &["supervisor={ state_dir = \"s2\" }".into()]).unwrap();
        assert_eq!(state_dir_of(&p, &set), dir.path().join("s2"));
        std::fs::write(&p, "").unwrap();
        assert_eq!(state_dir_of(&p, &none), dir.path().join(".drover"));
    }

    #[test]
    fn state_dir_is_found_in_a_file_with_a_syntax_error() {
        let base = Path::new("/cfg/daemon.toml");
        let none = Overrides::default();
        let dir = |text: &str| state_dir_in(base, Some(text), &none);
        let broken = "\ncapacity = = 2\n";
        for (text, want) in [
            ("[supervisor]\nstate_dir = \"run/state\"\n[workers.a]\ncommand = [\"x\"]", "/cfg/run/state"),
            ("supervisor.state_dir = \"/abs\"\n[workers.a]", "/abs"),
            ("supervisor = { state_dir = \"in\" } # c\n", "/cfg/in"),
            ("[ \"supervisor\" ]\n  state_dir = 'q'\n", "/cfg/q"),
            // The key in another table, or under a broken header, is not it.
            ("[workers.a]\nstate_dir = \"no\"\nsupervisor.state_dir = \"no\"\n", "/cfg/.drover"),
            ("[supervisor\nstate_dir = \"no\"\n", "/cfg/.drover"),
            ("[[jobs.a.steps]]\nstate_dir = \"no\"\n", "/cfg/.drover"),
        ] {
            assert_eq!(dir(&format!("{text}{broken}")), Path::new(want), "{text}");
        }
        let set = Overrides::new(Vec::new(), &["supervisor.state_dir=/over".into()]).unwrap();
        assert_eq!(state_dir_in(base, Some(broken), &set), Path::new("/over"));
    }

    #[test]
    fn env_keeps_the_case_of_variable_names() {
        let c = load_str(BASE, &[("DROVER_WORKERS__WEB__ENV__PORT", "9000")], &[]).unwrap();
        assert_eq!(c.workers["web"].env["PORT"], "9000");
    }

    #[test]
    fn the_file_is_blamed_for_what_it_says() {
        let text = "[workers.web]\ncommand = [\"x\"]\nbackoff = { initial = \"5m\" }\n";
        let errs = load_str(text, &[("DROVER_WORKERS__WEB__BACKOFF__MULTIPLIER", "3")], &[]).unwrap_err();
        assert!(matches!(errs[0].origin, Origin::File { line: Some(3), .. }), "{errs:?}");
        let errs = load_str("[workers.web]\ncapacity = 2\n", &[("DROVER_WORKERS__WEB__CAPACITY", "3")], &[])
            .unwrap_err();
        assert!(matches!(errs[0].origin, Origin::File { line: Some(1), .. }), "{errs:?}");
    }

    #[test]
    fn schema_and_semantic_errors_are_reported_together() {
        let text = "[workers.web]\ncommand = [\"x\"]\ncapacity = 0\n[jobs.a]\ncommand = [\"true\"]\nschedule = \"bad\"\n";
        let keys: Vec<String> = load_str(text, &[], &[]).unwrap_err().into_iter().map(|d| d.key).collect();
        assert_eq!(keys, ["workers.web.capacity", "jobs.a.schedule"]);
    }

    #[test]
    fn a_state_dir_with_a_nul_byte_is_refused_by_key() {
        let errs = load_str("[supervisor]\nstate_dir = \"a\\u0000b\"\n", &[], &[]).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].key, "supervisor.state_dir");
        assert!(errs[0].message.contains("NUL"), "{}", errs[0].message);
        assert!(errs[0].to_string().contains(":2:"), "names the line: {}", errs[0]);
    }

    #[test]
    fn overrides_are_shown_without_secret_values() {
        let o = Overrides::new(
            [
                ("DROVER_WORKERS__API__CAPACITY".to_string(), "3".to_string()),
                ("DROVER_WORKERS__API__ENV__TOKEN".to_string(), "hunter2".to_string()),
            ],
            &["defaults.stop_grace=5s".into(), "workers.api={ env = { K = \"hunter3\" } }".into()],
        )
        .unwrap();
        let shown = o.shown();
        let text = format!("{shown:?}");
        assert!(!text.contains("hunter2") && !text.contains("hunter3"), "{text}");
        assert_eq!(
            shown[0],
            ShownOverride {
                key: "workers.api.capacity".into(),
                source: "env".into(),
                by: "DROVER_WORKERS__API__CAPACITY".into(),
                value: Some("3".into())
            }
        );
        assert_eq!((shown[1].key.as_str(), shown[1].value.as_deref()), ("workers.api.env.TOKEN", None));
        assert_eq!(shown[2].by, "--set defaults.stop_grace=5s");
        assert_eq!(shown[2].value.as_deref(), Some("\"5s\""));
        assert_eq!((shown[3].by.as_str(), shown[3].value.as_deref()), ("--set workers.api=…", None));
    }

    #[test]
    fn dates_are_not_strings() {
        let errs = load_str("[supervisor]\nstate_dir = 1979-05-27\n", &[], &[]).unwrap_err();
        assert_eq!(errs[0].key, "supervisor.state_dir");
        assert!(errs[0].message.contains("date"));
    }

    #[test]
    fn a_malformed_env_key_fails_only_loading() {
        let o = Overrides::new([("DROVER___X".to_string(), "1".to_string())], &[]).unwrap();
        let path = std::env::temp_dir().join("daemon.toml");
        let errs = load_text(&path, BASE.into(), &o).unwrap_err();
        assert!(errs[0].to_string().starts_with("environment variable DROVER___X"), "{}", errs[0]);
    }
}
