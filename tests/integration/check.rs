//! `drover check`: the CI gate. The corpus under tests/corpus (see its
//! README), bad input of every kind, several files at once, `--format json`,
//! and errors that come from env vars and `--set`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::harness::{Run, Sandbox, repo, run};

// ---------------------------------------------------------------- helpers

/// The `.toml` files of tests/corpus/<which>, sorted.
fn corpus(which: &str) -> Vec<PathBuf> {
    let dir = repo().join("tests/corpus").join(which);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("toml"))
        .collect();
    files.sort();
    files
}

/// One `# expect: LINE:COL KEY :: SUBSTRING` line of an invalid corpus file.
#[derive(Debug)]
struct Expect {
    line: usize,
    column: usize,
    /// None for `-`: an error with no key (a TOML syntax error).
    key: Option<String>,
    substring: String,
}

fn expects(path: &Path) -> Vec<Expect> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("# expect: ") else {
            if l.starts_with('#') {
                continue;
            }
            break;
        };
        let bad = || -> ! { panic!("{}: malformed expect line: {l}", path.display()) };
        let (head, substring) = rest.split_once(" :: ").unwrap_or_else(|| bad());
        let (pos, key) = head.split_once(' ').unwrap_or_else(|| bad());
        let (line, column) = pos.split_once(':').unwrap_or_else(|| bad());
        out.push(Expect {
            line: line.parse().unwrap_or_else(|_| bad()),
            column: column.parse().unwrap_or_else(|_| bad()),
            key: (key != "-").then(|| key.to_string()),
            substring: substring.to_string(),
        });
    }
    out
}

/// The diagnostic lines `check` printed for `file`: every stderr line about
/// it except the closing `FILE: invalid (N errors)` summary.
fn diag_lines<'a>(stderr: &'a str, file: &Path) -> Vec<&'a str> {
    let prefix = format!("{}:", file.display());
    let summary = format!("{}: invalid (", file.display());
    stderr.lines().filter(|l| l.starts_with(&prefix) && !l.starts_with(&summary)).collect()
}

fn summary(file: &Path, errors: usize) -> String {
    let s = if errors == 1 { "" } else { "s" };
    format!("{}: invalid ({errors} error{s})", file.display())
}

fn no_panic(out: &Run) {
    assert!(
        !out.stderr.contains("panicked") && !out.stderr.contains("RUST_BACKTRACE"),
        "drover panicked:\n{}",
        out.stderr
    );
}

fn check(sandbox: &Sandbox, args: &[&str]) -> Run {
    let out = run(sandbox.drover().arg("check").args(args));
    no_panic(&out);
    out
}

fn check_path(file: &Path) -> Run {
    let out = run(Sandbox::new().drover().arg("check").arg(file));
    no_panic(&out);
    out
}

fn json(out: &Run) -> Vec<Value> {
    match serde_json::from_str(&out.stdout) {
        Ok(Value::Array(a)) => a,
        other => panic!("stdout is not a JSON array ({other:?}):\n{}", out.stdout),
    }
}

/// Asserts `file` was rejected with exactly one diagnostic, and returns it.
fn one_error(out: &Run, file: &Path) -> String {
    assert_eq!(out.code, Some(1), "stderr: {}", out.stderr);
    let lines = diag_lines(&out.stderr, file);
    assert_eq!(lines.len(), 1, "expected one error line:\n{}", out.stderr);
    assert!(out.stderr.lines().any(|l| l == summary(file, 1)), "{}", out.stderr);
    lines[0].to_string()
}

const WEB: &str = "[workers.web]\ncommand = [\"sleep\", \"1\"]\n";

// ----------------------------------------------------------------- corpus

#[test]
fn every_invalid_corpus_file_is_rejected_with_the_expected_errors() {
    let files = corpus("invalid");
    assert!(files.len() >= 20, "only {} invalid files", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let exp = expects(file);
        assert!(!exp.is_empty(), "{} has no expect lines", file.display());
        let out = check_path(file);
        let mut problems = Vec::new();
        if out.code != Some(1) {
            problems.push(format!("exit {:?}, want 1", out.code));
        }
        let lines = diag_lines(&out.stderr, file);
        for e in &exp {
            let prefix = match &e.key {
                Some(k) => format!("{}:{}:{}: {k}: ", file.display(), e.line, e.column),
                None => format!("{}:{}:{}: ", file.display(), e.line, e.column),
            };
            let hit = lines.iter().any(|l| l.starts_with(&prefix) && l.contains(&e.substring));
            if !hit {
                problems.push(format!("no line `{prefix}…{}…`", e.substring));
            }
        }
        if lines.len() != exp.len() {
            problems.push(format!("{} error lines, want {}", lines.len(), exp.len()));
        }
        if !out.stderr.lines().any(|l| l == summary(file, exp.len())) {
            problems.push(format!("no summary line `{}`", summary(file, exp.len())));
        }
        if !out.stdout.is_empty() {
            problems.push(format!("stdout not empty: {}", out.stdout));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}:\n  {}\n  stderr was:\n{}",
                file.display(),
                problems.join("\n  "),
                out.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn invalid_corpus_json_diagnostics_agree_with_the_text_ones() {
    let mut failures = Vec::new();
    for file in corpus("invalid") {
        let exp = expects(&file);
        let out = run(Sandbox::new().drover().args(["check", "--format", "json"]).arg(&file));
        no_panic(&out);
        assert_eq!(out.code, Some(1), "{}", file.display());
        let diags = json(&out);
        if diags.len() != exp.len() {
            failures.push(format!(
                "{}: {} JSON diagnostics, want {}:\n{}",
                file.display(),
                diags.len(),
                exp.len(),
                out.stdout
            ));
        }
        for e in &exp {
            let hit = diags.iter().any(|d| {
                d["file"] == file.display().to_string()
                    && d["line"] == e.line
                    && d["column"] == e.column
                    && d["key"] == e.key.as_deref().unwrap_or("")
                    && d["source"] == "file"
                    && d["message"].as_str().is_some_and(|m| m.contains(&e.substring))
            });
            if !hit {
                failures.push(format!("{}: no JSON diagnostic for {e:?}", file.display()));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The valid files `check` can pass here: a `*-root.toml` file names
/// other users, which only a root drover may run as.
fn checkable_valid() -> Vec<PathBuf> {
    let root = nix::unistd::Uid::effective().is_root();
    corpus("valid")
        .into_iter()
        .filter(|f| {
            let needs_root = f.to_string_lossy().ends_with("-root.toml");
            if needs_root && !root {
                eprintln!("skipping {}: it switches users, which needs root", f.display());
            }
            root || !needs_root
        })
        .collect()
}

#[test]
fn every_valid_corpus_file_passes() {
    let files = checkable_valid();
    assert!(files.len() >= 8, "only {} valid files", files.len());
    for file in &files {
        let out = check_path(file);
        assert_eq!(out.code, Some(0), "{}:\n{}", file.display(), out.stderr);
        let want = format!("{}: ok (", file.display());
        assert!(
            out.stdout.starts_with(&want) && out.stdout.trim_end().ends_with(')'),
            "{}: stdout {:?}",
            file.display(),
            out.stdout
        );
        assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
        assert_eq!(out.stderr, "", "{}", file.display());
    }
}

#[test]
fn all_valid_files_at_once_pass_and_json_is_an_empty_array() {
    let files = checkable_valid();
    let out = run(Sandbox::new().drover().arg("check").args(&files));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), files.len(), "{}", out.stdout);
    let out = run(Sandbox::new().drover().args(["check", "--format", "json"]).args(&files));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(json(&out).is_empty(), "{}", out.stdout);
}

/// Schema key paths (`workers.*.backoff.initial`, `jobs.*.steps[].name`)
/// and the enum values a walk over a document meets.
#[derive(Default)]
struct Coverage {
    keys: BTreeSet<String>,
    enums: BTreeMap<String, BTreeSet<String>>,
}

fn deref<'a>(root: &'a Value, mut node: &'a Value) -> &'a Value {
    while let Some(r) = node.get("$ref").and_then(Value::as_str) {
        let name = r.strip_prefix("#/$defs/").expect("local $ref");
        node = &root["$defs"][name];
    }
    node
}

fn def_name(node: &Value) -> Option<&str> {
    node.get("$ref")?.as_str()?.strip_prefix("#/$defs/")
}

/// The keys a node's `not` forbids: `{ "required": [k] }`, or an `anyOf` of them.
fn forbidden(node: &Value) -> Vec<String> {
    let Some(not) = node.get("not") else { return Vec::new() };
    let alts: Vec<&Value> = match not.get("anyOf").and_then(Value::as_array) {
        Some(a) => a.iter().collect(),
        None => vec![not],
    };
    alts.iter()
        .filter_map(|a| a.get("required").and_then(Value::as_array))
        .flatten()
        .filter_map(|k| k.as_str().map(String::from))
        .collect()
}

/// Every key path the schema allows.
fn schema_keys(root: &Value, node: &Value, path: &str, out: &mut BTreeSet<String>) {
    let node = deref(root, node);
    for alt in ["anyOf", "oneOf", "allOf"] {
        for n in node.get(alt).and_then(Value::as_array).into_iter().flatten() {
            schema_keys(root, n, path, out);
        }
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
            out.insert(p.clone());
            schema_keys(root, v, &p, out);
            // A key its role forbids (`health.log`) is no key to cover.
            for f in forbidden(v) {
                out.remove(&format!("{p}.{f}"));
            }
        }
    }
    if let Some(ap) = node.get("additionalProperties").filter(|v| v.is_object()) {
        schema_keys(root, ap, &format!("{path}.*"), out);
    }
    if let Some(items) = node.get("items") {
        schema_keys(root, items, &format!("{path}[]"), out);
    }
}

/// The key paths and enum values a TOML document uses, named as in
/// [`schema_keys`].
fn doc_keys(root: &Value, node: &Value, v: &toml::Value, path: &str, cov: &mut Coverage) {
    if let Some(def) = def_name(node) {
        let target = deref(root, node);
        if target.get("enum").is_some()
            && let Some(s) = v.as_str()
        {
            cov.enums.entry(def.to_string()).or_default().insert(s.to_string());
        }
    }
    let mut node = deref(root, node);
    if v.is_table()
        && node.get("properties").is_none()
        && let Some(alt) = node
            .get("anyOf")
            .and_then(Value::as_array)
            .and_then(|alts| alts.iter().find(|a| deref(root, a).get("properties").is_some()))
    {
        // A value that may be a table or not (`limits.nofile`): the table form.
        node = deref(root, alt);
    }
    match v {
        toml::Value::Table(t) => {
            for (k, child) in t {
                if let Some(prop) = node.get("properties").and_then(|p| p.get(k)) {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    cov.keys.insert(p.clone());
                    doc_keys(root, prop, child, &p, cov);
                } else if let Some(ap) = node.get("additionalProperties").filter(|v| v.is_object()) {
                    doc_keys(root, ap, child, &format!("{path}.*"), cov);
                }
            }
        }
        toml::Value::Array(a) => {
            if let Some(items) = node.get("items") {
                for child in a {
                    doc_keys(root, items, child, &format!("{path}[]"), cov);
                }
            }
        }
        _ => {}
    }
}

#[test]
fn valid_corpus_uses_every_schema_key_and_every_policy_value() {
    let text = std::fs::read_to_string(repo().join("schema/daemon.schema.json")).unwrap();
    let schema: Value = serde_json::from_str(&text).unwrap();
    let mut all = BTreeSet::new();
    schema_keys(&schema, &schema, "", &mut all);
    assert!(all.contains("jobs.*.steps[].approve"), "{all:?}");

    let mut cov = Coverage::default();
    for file in corpus("valid") {
        let doc: toml::Value = toml::from_str(&std::fs::read_to_string(&file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        doc_keys(&schema, &schema, &doc, "", &mut cov);
    }
    let missing: Vec<_> = all.difference(&cov.keys).collect();
    assert!(missing.is_empty(), "no valid corpus file uses {missing:?}");

    for def in ["RestartPolicy", "SpawnMode", "OnOverlap"] {
        let values: BTreeSet<String> = schema["$defs"][def]["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("{def} is not an enum"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let seen = cov.enums.get(def).cloned().unwrap_or_default();
        let missing: Vec<_> = values.difference(&seen).collect();
        assert!(missing.is_empty(), "no valid corpus file uses {def} {missing:?}");
    }
}

// -------------------------------------------------------------- bad input

#[test]
fn missing_file_is_one_clear_error() {
    let sb = Sandbox::new();
    let file = sb.path("nope.toml");
    let out = check(&sb, &[file.to_str().unwrap()]);
    let line = one_error(&out, &file);
    assert!(line.contains("no such file"), "{line}");
}

#[test]
fn default_file_is_daemon_toml_in_the_current_directory() {
    let sb = Sandbox::new();
    let out = check(&sb, &[]);
    let line = one_error(&out, Path::new("daemon.toml"));
    assert!(line.contains("no such file"), "{line}");
    sb.write("daemon.toml", WEB);
    let out = check(&sb, &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "daemon.toml: ok (1 worker, 0 jobs)\n");
}

#[test]
fn directory_is_one_clear_error() {
    let sb = Sandbox::new();
    let dir = sb.path("conf.d");
    std::fs::create_dir(&dir).unwrap();
    let out = check(&sb, &[dir.to_str().unwrap()]);
    let line = one_error(&out, &dir);
    assert!(line.contains("is a directory"), "{line}");
}

#[test]
fn empty_file_is_valid_and_runs_nothing() {
    let sb = Sandbox::new();
    let file = sb.write("empty.toml", "");
    let out = check(&sb, &[file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, format!("{}: ok (0 workers, 0 jobs)\n", file.display()));
    assert_eq!(out.stderr, "");
}

#[test]
fn ten_megabyte_file_is_refused_with_one_error() {
    let sb = Sandbox::new();
    // Valid TOML (comments) so that only the size can be the problem.
    let line = "# padding padding padding padding padding padding padding padding\n";
    let text = line.repeat(10 * 1024 * 1024 / line.len() + 1);
    assert!(text.len() >= 10 * 1024 * 1024);
    let file = sb.write("big.toml", &text);
    let out = check(&sb, &[file.to_str().unwrap()]);
    let err = one_error(&out, &file);
    assert!(err.contains("MiB"), "{err}");
    assert!(err.len() < 200, "not one clear line: {err}");
}

#[test]
fn non_utf8_bytes_are_named_by_line_and_column() {
    let sb = Sandbox::new();
    let file = sb.write("latin1.toml", b"[workers.web]\ncommand = [\"caf\xe9\"]\n".as_slice());
    let out = check(&sb, &[file.to_str().unwrap()]);
    let err = one_error(&out, &file);
    let want = format!("{}:2:16: ", file.display());
    assert!(err.starts_with(&want), "want {want}…, got {err}");
    assert!(err.contains("UTF-8"), "{err}");
    assert!(err.contains("0xe9"), "{err}");
}

#[test]
fn non_utf8_column_counts_characters_not_bytes() {
    let sb = Sandbox::new();
    // "é" is two bytes and one column.
    let file = sb.write("mixed.toml", b"# \xc3\xa9\n# \xc3\xa9\xc3\xa9\xc3\xa9\xff\n".as_slice());
    let out = check(&sb, &[file.to_str().unwrap()]);
    let err = one_error(&out, &file);
    assert!(err.starts_with(&format!("{}:2:6: ", file.display())), "{err}");
}

#[test]
fn unreadable_file_is_one_clear_error() {
    use std::os::unix::fs::PermissionsExt;
    let sb = Sandbox::new();
    let file = sb.write("secret.toml", WEB);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::File::open(&file).is_ok() {
        // Root (or CAP_DAC_OVERRIDE) reads it anyway: nothing to test.
        eprintln!("skipped: mode 000 does not stop this user from reading");
        return;
    }
    let out = check(&sb, &[file.to_str().unwrap()]);
    let err = one_error(&out, &file);
    assert!(err.contains("ermission denied"), "{err}");
}

// ------------------------------------------------------- several files

#[test]
fn several_files_are_each_reported_and_one_bad_one_fails_the_run() {
    let sb = Sandbox::new();
    sb.write("a.toml", WEB);
    sb.write("b.toml", "[workers.web]\ncommand = []\ncapacity = \"x\"\n");
    sb.write("c.toml", "[jobs.x]\ncommand = [\"true\"]\nevery = \"1m\"\n");
    let out = check(&sb, &["a.toml", "b.toml", "missing.toml", "c.toml"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(out.stdout, "a.toml: ok (1 worker, 0 jobs)\nc.toml: ok (0 workers, 1 job)\n");
    assert_eq!(
        diag_lines(&out.stderr, Path::new("b.toml")),
        [
            "b.toml:2:11: workers.web.command: must not be empty",
            "b.toml:3:12: workers.web.capacity: expected an integer, found \"x\"",
        ]
    );
    assert!(out.stderr.contains("b.toml: invalid (2 errors)"), "{}", out.stderr);
    assert!(out.stderr.contains("missing.toml: no such file"), "{}", out.stderr);
    assert!(!out.stderr.contains("a.toml"), "{}", out.stderr);
    assert!(!out.stderr.contains("c.toml"), "{}", out.stderr);
}

#[test]
fn several_valid_files_exit_zero() {
    let sb = Sandbox::new();
    sb.write("a.toml", WEB);
    sb.write("b.toml", "");
    let out = check(&sb, &["a.toml", "b.toml"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "a.toml: ok (1 worker, 0 jobs)\nb.toml: ok (0 workers, 0 jobs)\n");
}

#[test]
fn json_format_gives_file_line_column_key_message_source() {
    let sb = Sandbox::new();
    sb.write("good.toml", WEB);
    sb.write("bad.toml", "[workers.web]\ncommand = [\"x\"]\ncapacity = 0\nstop_grase = \"1s\"\n");
    let out = check(&sb, &["--format", "json", "good.toml", "bad.toml", "gone.toml"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(out.stderr, "", "json mode prints diagnostics on stdout only");
    let diags = json(&out);
    assert_eq!(diags.len(), 3, "{}", out.stdout);
    for d in &diags {
        let keys: BTreeSet<&str> = d.as_object().unwrap().keys().map(String::as_str).collect();
        for k in ["file", "line", "column", "key", "message", "source"] {
            assert!(keys.contains(k), "{k} missing in {d}");
        }
        assert_eq!(d["source"], "file");
        assert_ne!(d["file"], "good.toml");
    }
    assert_eq!(
        diags[0],
        serde_json::json!({
            "file": "bad.toml", "line": 3, "column": 12,
            "key": "workers.web.capacity",
            "message": "must be at least 1, found 0", "source": "file"
        })
    );
    assert_eq!(diags[1]["line"], 4);
    assert_eq!(diags[1]["column"], 1);
    assert_eq!(diags[1]["key"], "workers.web.stop_grase");
    assert!(diags[1]["message"].as_str().unwrap().contains("did you mean \"stop_grace\""), "{}", diags[1]);
    // A file that cannot be read has no position and no key.
    assert_eq!(diags[2]["file"], "gone.toml");
    assert_eq!(diags[2]["line"], Value::Null);
    assert_eq!(diags[2]["column"], Value::Null);
    assert_eq!(diags[2]["key"], "");
    assert!(diags[2]["message"].as_str().unwrap().contains("no such file"));
}

// ------------------------------------------------------ env and --set

#[test]
fn env_var_errors_name_the_variable() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", WEB);
    let var = "DROVER_WORKERS__WEB__CAPACITY";
    let out = run(sb.drover().env(var, "lots").arg("check"));
    no_panic(&out);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(
        out.stderr.lines().next().unwrap(),
        format!("environment variable {var}: workers.web.capacity: expected an integer, found \"lots\"")
    );
    assert!(out.stderr.contains("daemon.toml: invalid (1 error)"), "{}", out.stderr);

    let out = run(sb.drover().env(var, "lots").args(["check", "--format", "json"]));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(
        json(&out),
        [serde_json::json!({
            "file": "daemon.toml", "line": null, "column": null,
            "key": "workers.web.capacity",
            "message": "expected an integer, found \"lots\"",
            "source": "env", "variable": var
        })]
    );
}

#[test]
fn env_var_adding_an_unknown_key_names_the_variable() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", WEB);
    let out = run(sb.drover().env("DROVER_WORKERS__WEB__INSTANCES", "2").arg("check"));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let first = out.stderr.lines().next().unwrap();
    assert!(
        first.starts_with(
            "environment variable DROVER_WORKERS__WEB__INSTANCES: workers.web.instances: unknown key \"instances\""
        ),
        "{first}"
    );
}

#[test]
fn set_errors_name_the_argument() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", WEB);
    let arg = "defaults.stop_grace=soon";
    let out = run(sb.drover().args(["--set", arg, "check"]));
    no_panic(&out);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let first = out.stderr.lines().next().unwrap();
    assert!(first.starts_with(&format!("--set {arg}: defaults.stop_grace: expected a duration")), "{first}");

    let out = run(sb.drover().args(["check", "--format", "json", "--set", arg]));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let diags = json(&out);
    assert_eq!(diags.len(), 1, "{}", out.stdout);
    assert_eq!(diags[0]["source"], "set");
    assert_eq!(diags[0]["argument"], arg);
    assert_eq!(diags[0]["key"], "defaults.stop_grace");
    assert_eq!(diags[0]["file"], "daemon.toml");
    assert_eq!(diags[0]["line"], Value::Null);
}

#[test]
fn set_that_breaks_a_semantic_rule_names_the_argument() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", WEB);
    let out = run(sb.drover().args(["--set", "workers.web.dir=no/such/dir", "check"]));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let first = out.stderr.lines().next().unwrap();
    assert!(first.starts_with("--set workers.web.dir=no/such/dir: workers.web.dir: "), "{first}");
}

#[test]
fn an_override_naming_an_unknown_worker_or_job_is_a_typo_not_a_new_one() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", format!("{WEB}[jobs.report]\ncommand = [\"true\"]\n"));
    let out = run(sb.drover().args(["--set", "workers.wbe.capacity=2", "check"]));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let first = out.stderr.lines().next().unwrap();
    assert!(
        first.starts_with(
            "--set workers.wbe.capacity=2: workers.wbe: no worker \"wbe\" in the file; did you mean \"web\"?"
        ),
        "{first}"
    );
    let out = run(sb.drover().env("DROVER_JOBS__REPROT__EVERY", "1h").arg("check"));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let first = out.stderr.lines().next().unwrap();
    assert!(
        first.starts_with("environment variable DROVER_JOBS__REPROT__EVERY: jobs.reprot: no job \"reprot\" in the file; did you mean \"report\"?"),
        "{first}"
    );
    // Given with its command, a new one is what was meant.
    let out = run(sb.drover().args([
        "--set",
        "workers.wbe.capacity=2",
        "--set",
        "workers.wbe.command=[\"true\"]",
        "check",
    ]));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

#[test]
fn programs_not_found_are_warnings_and_strict_makes_them_errors() {
    let sb = Sandbox::new();
    sb.write("bin/ok.sh", "#!/bin/sh\n");
    std::fs::set_permissions(sb.path("bin/ok.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    sb.write("bin/plain.sh", "#!/bin/sh\n");
    sb.write(
        "daemon.toml",
        "[workers.api]\ncommand = [\"pyhton3\", \"app.py\"]\n\
         [workers.ok]\ndir = \"bin\"\ncommand = [\"./ok.sh\"]\n\
         [workers.plain]\ncommand = [\"bin/plain.sh\"]\n\
         [jobs.j]\ncommand = [\"sh\", \"-c\", \"true\"]\n",
    );
    let out = check(&sb, &[]);
    assert_eq!(out.code, Some(0), "warnings do not fail: {}", out.stderr);
    assert_eq!(out.stdout, "daemon.toml: ok (3 workers, 1 job, 2 warnings)\n");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines,
        [
            "daemon.toml:2:12: workers.api.command[0]: warning: program \"pyhton3\" is not on PATH",
            &format!(
                "daemon.toml:7:12: workers.plain.command[0]: warning: program \"bin/plain.sh\" is not executable (chmod +x {})",
                sb.root.join("bin/plain.sh").display()
            ),
        ]
    );
    let out = check(&sb, &["--strict"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .starts_with("daemon.toml:2:12: workers.api.command[0]: program \"pyhton3\" is not on PATH\n"),
        "{}",
        out.stderr
    );
    let out = check(&sb, &["--format", "json"]);
    let diags = json(&out);
    assert_eq!(diags.len(), 2, "{}", out.stdout);
    assert_eq!(diags[0]["severity"], "warning");
    assert_eq!(diags[0]["key"], "workers.api.command[0]");
}

#[test]
fn valid_overrides_keep_a_valid_file_valid() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", WEB);
    let out = run(sb
        .drover()
        .env("DROVER_DEFAULTS__STOP_GRACE", "5s")
        .env("DROVER_WORKERS__API__COMMAND", "[\"sleep\", \"2\"]")
        .args(["--set", "workers.web.capacity=4", "check"]));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "daemon.toml: ok (2 workers, 0 jobs)\n");
}

#[test]
fn drover_variables_without_a_double_underscore_are_not_config_keys() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", WEB);
    let out = run(sb
        .drover()
        .env("DROVER_WORKER", "web")
        .env("DROVER_INSTANCE", "0")
        .env("DROVER_CAPACITY", "1")
        .env("DROVER_STATE_DIR", "/nonexistent")
        .env("DROVER_NONSENSE", "{")
        .arg("check"));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

#[test]
fn set_without_equals_is_a_usage_error() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", WEB);
    let out = run(sb.drover().args(["--set", "workers.web.capacity", "check"]));
    no_panic(&out);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("--set workers.web.capacity"), "{}", out.stderr);
    assert!(out.stderr.contains("KEY=VALUE"), "{}", out.stderr);
    assert_eq!(out.stdout, "");
}

#[test]
fn unknown_flag_and_format_are_usage_errors() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", WEB);
    for args in [&["check", "--bogus"][..], &["check", "--format", "yaml"], &["check", "--format"]] {
        let out = check(&sb, &args[1..]);
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.stderr);
        assert_eq!(out.stdout, "", "{args:?}");
    }
}
