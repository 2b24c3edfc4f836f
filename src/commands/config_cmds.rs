//! The commands that only read the config: `check`, `config`, `schema`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::exit;
use crate::cli::OutputFormat;
use crate::config::{self, Diagnostic, Origin, Overrides};

/// A diagnostic as `check --format json` prints it: always the checked
/// file, position only when the file is where the value came from.
#[derive(Serialize)]
struct JsonDiagnostic<'a> {
    file: &'a Path,
    line: Option<usize>,
    column: Option<usize>,
    key: &'a str,
    message: &'a str,
    /// "file", "env" or "set".
    source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variable: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    argument: Option<&'a str>,
    /// "warning" for a warning (which does not fail the check); errors
    /// have no severity.
    #[serde(skip_serializing_if = "Option::is_none")]
    severity: Option<&'static str>,
}

impl<'a> JsonDiagnostic<'a> {
    fn new(file: &'a Path, d: &'a Diagnostic, severity: Option<&'static str>) -> Self {
        let mut j = JsonDiagnostic {
            file,
            line: None,
            column: None,
            key: &d.key,
            message: &d.message,
            source: "file",
            variable: None,
            argument: None,
            severity,
        };
        match &d.origin {
            Origin::File { line, column, .. } => (j.line, j.column) = (*line, *column),
            Origin::Env { variable } => (j.source, j.variable) = ("env", Some(variable.as_str())),
            Origin::Set { argument } => (j.source, j.argument) = ("set", Some(argument.as_str())),
        }
        j
    }
}

pub fn check(files: &[PathBuf], overrides: &Overrides, format: OutputFormat, strict: bool) -> u8 {
    let mut all_ok = true;
    let mut json = Vec::new();
    let results: Vec<(PathBuf, Result<config::Loaded, Vec<Diagnostic>>)> =
        files.iter().map(|f| (f.clone(), config::load(f, overrides))).collect();
    let warnings: Vec<Vec<Diagnostic>> =
        results.iter().map(|(_, r)| r.as_ref().map(config::warnings::warnings).unwrap_or_default()).collect();
    for ((file, result), warns) in results.iter().zip(&warnings) {
        let severity = (!strict).then_some("warning");
        for w in warns {
            match format {
                OutputFormat::Text => eprintln!("{}", at_file(w, file, !strict)),
                OutputFormat::Json => json.push(JsonDiagnostic::new(file, w, severity)),
            }
        }
        match result {
            Ok(_) if strict && !warns.is_empty() => {
                all_ok = false;
                if format == OutputFormat::Text {
                    let n = warns.len();
                    eprintln!("{}: invalid with --strict ({n} warning{})", file.display(), plural(n));
                }
            }
            Ok(loaded) => {
                if format == OutputFormat::Text {
                    let c = &loaded.config;
                    let w = match warns.len() {
                        0 => String::new(),
                        n => format!(", {n} warning{}", plural(n)),
                    };
                    println!(
                        "{}: ok ({} worker{}, {} job{}{w})",
                        file.display(),
                        c.workers.len(),
                        plural(c.workers.len()),
                        c.jobs.len(),
                        plural(c.jobs.len())
                    );
                }
            }
            Err(diags) => {
                all_ok = false;
                for d in diags {
                    match format {
                        OutputFormat::Text => eprintln!("{d}"),
                        OutputFormat::Json => json.push(JsonDiagnostic::new(file, d, None)),
                    }
                }
                if format == OutputFormat::Text {
                    eprintln!("{}: invalid ({} error{})", file.display(), diags.len(), plural(diags.len()));
                }
            }
        }
    }
    if format == OutputFormat::Json {
        let text = serde_json::to_string_pretty(&json).expect("diagnostics serialize");
        println!("{text}");
    }
    if all_ok { exit::OK } else { exit::FAILED }
}

/// A warning as the checked file was named on the command line (the
/// loaded path is absolute), marked as one unless --strict made it an error.
fn at_file(d: &Diagnostic, file: &Path, mark: bool) -> String {
    let mut d = d.clone();
    if mark {
        d.message = format!("warning: {}", d.message);
    }
    if let Origin::File { file: f, .. } = &mut d.origin {
        *f = file.to_path_buf();
    }
    d.to_string()
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The config at `path`, or its diagnostics printed and `None`.
pub(super) fn load_or_report(path: &Path, overrides: &Overrides) -> Option<config::Loaded> {
    match config::load(path, overrides) {
        Ok(l) => Some(l),
        Err(diags) => {
            for d in diags {
                eprintln!("{d}");
            }
            None
        }
    }
}

pub fn show_config(path: &Path, overrides: &Overrides, json: bool) -> u8 {
    let Some(loaded) = load_or_report(path, overrides) else { return exit::FAILED };
    let config = loaded.config.redacted();
    let text = if json {
        serde_json::to_string_pretty(&config).expect("config serializes") + "\n"
    } else {
        match toml::to_string_pretty(&config) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("drover: cannot print the config as TOML: {e}");
                return exit::FAILED;
            }
        }
    };
    let _ = std::io::stdout().write_all(text.as_bytes());
    exit::OK
}
