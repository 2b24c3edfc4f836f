//! `drover config [--json]`: the effective config after layering (built-in
//! defaults < the file < `DROVER_…__…` env vars < `--set`), defaults filled in.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::harness::{Sandbox, run};

const WEB: &str = "[workers.web]\ncommand = [\"sleep\", \"1\"]\n";

/// Runs `cmd` (a `drover … config --json`), expects success, parses stdout.
fn config_json(cmd: &mut Command) -> Value {
    let out = run(cmd);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("config --json is not JSON ({e}):\n{}", out.stdout))
}

fn canon(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn path_of(v: &Value) -> PathBuf {
    PathBuf::from(v.as_str().unwrap_or_else(|| panic!("not a path: {v}")))
}

#[test]
fn defaults_are_filled_in() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", format!("{WEB}[jobs.report]\ncommand = [\"date\"]\n"));
    let c = config_json(sb.drover().args(["config", "--json"]));

    let root = canon(sb.dir.path());
    // state_dir is made absolute against the config file's directory (it
    // does not exist yet, so only its parent can be canonicalized).
    let state_dir = path_of(&c["supervisor"]["state_dir"]);
    assert!(state_dir.is_absolute(), "{}", state_dir.display());
    assert_eq!(state_dir.file_name().unwrap(), ".drover");
    assert_eq!(canon(state_dir.parent().unwrap()), root);
    assert_eq!(c["supervisor"]["reload"], true);
    assert_eq!(c["supervisor"]["debounce"], "50ms");
    assert_eq!(c["supervisor"]["log_max_size"], "10MiB");
    assert_eq!(c["supervisor"]["log_keep"], 5);

    let settings = json!({
        "restart": "always",
        "backoff": { "initial": "2s", "max": "2m", "multiplier": 2.0 },
        "crash_loop": { "min_uptime": "10s", "max_failures": 5 },
        "permanent_exit_codes": [78],
        "stop_signal": "SIGTERM",
        "stop_grace": "30s",
        "env": {},
        "secret_env": []
    });
    assert_eq!(c["defaults"], settings);
    assert_eq!(c["defaults"]["stop_grace"], "30s");

    let web = &c["workers"]["web"];
    assert_eq!(web["capacity"], 1);
    assert_eq!(web["spawn_mode"], "same-dir");
    assert_eq!(web["command"], json!(["sleep", "1"]));
    assert_eq!(canon(&path_of(&web["dir"])), root);
    for (k, v) in settings.as_object().unwrap() {
        assert_eq!(&web[k], v, "workers.web.{k}");
    }

    let job = &c["jobs"]["report"];
    assert_eq!(job["command"], json!(["date"]));
    assert_eq!(job["capacity"], 1);
    assert_eq!(job["on_overlap"], "skip");
    assert_eq!(job["retain"], 50);
    assert_eq!(job["stop_signal"], "SIGTERM");
    assert_eq!(job["stop_grace"], "30s");
    assert_eq!(job["env"], json!({}));
    assert_eq!(canon(&path_of(&job["dir"])), root);
    for absent in ["steps", "schedule", "every", "timeout"] {
        assert!(job.get(absent).is_none(), "jobs.report.{absent}: {job}");
    }
}

#[test]
fn empty_file_gives_the_builtin_defaults() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", "");
    let c = config_json(sb.drover().args(["config", "--json"]));
    assert_eq!(c["defaults"]["stop_grace"], "30s");
    assert_eq!(c["defaults"]["restart"], "always");
    assert_eq!(c["workers"], json!({}));
    assert_eq!(c["jobs"], json!({}));
}

#[test]
fn workers_inherit_defaults_deeply_and_override_them() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        r#"
[defaults]
restart = "on-failure"
stop_grace = "7s"
backoff = { initial = "1s", multiplier = 3.0 }
env = { A = "defaults", B = "defaults" }

[workers.web]
command = ["sleep", "1"]
backoff = { max = "5s" }
env = { B = "web", C = "web" }

[workers.own]
command = ["sleep", "1"]
restart = "never"
stop_grace = "1s"
permanent_exit_codes = []

[jobs.j]
command = ["true"]
env = { C = "job" }
"#,
    );
    let c = config_json(sb.drover().args(["config", "--json"]));
    let web = &c["workers"]["web"];
    assert_eq!(web["restart"], "on-failure");
    assert_eq!(web["stop_grace"], "7s");
    assert_eq!(web["backoff"], json!({ "initial": "1s", "max": "5s", "multiplier": 3.0 }));
    assert_eq!(web["env"], json!({ "A": "defaults", "B": "web", "C": "web" }));
    let own = &c["workers"]["own"];
    assert_eq!(own["restart"], "never");
    assert_eq!(own["stop_grace"], "1s");
    assert_eq!(own["permanent_exit_codes"], json!([]));
    assert_eq!(own["env"], json!({ "A": "defaults", "B": "defaults" }));
    let job = &c["jobs"]["j"];
    assert_eq!(job["stop_grace"], "7s");
    assert_eq!(job["env"], json!({ "A": "defaults", "B": "defaults", "C": "job" }));
}

#[test]
fn precedence_is_file_then_env_then_set() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        "[defaults]\nstop_grace = \"10s\"\n[workers.web]\ncommand = [\"sleep\", \"1\"]\ncapacity = 2\n",
    );
    const VAR: &str = "DROVER_WORKERS__WEB__CAPACITY";
    let capacity =
        |cmd: &mut Command| config_json(cmd.args(["config", "--json"]))["workers"]["web"]["capacity"].clone();

    assert_eq!(capacity(&mut sb.drover()), 2, "the file");
    assert_eq!(capacity(sb.drover().env(VAR, "3")), 3, "env over file");
    assert_eq!(capacity(sb.drover().args(["--set", "workers.web.capacity=4"])), 4, "--set over file");
    assert_eq!(
        capacity(sb.drover().env(VAR, "3").args(["--set", "workers.web.capacity=4"])),
        4,
        "--set over env"
    );
    assert_eq!(
        capacity(sb.drover().args(["--set", "workers.web.capacity=4", "--set", "workers.web.capacity=5"])),
        5,
        "the last --set wins"
    );

    // A default set by env reaches the workers that do not set it.
    let c = config_json(sb.drover().env("DROVER_DEFAULTS__STOP_GRACE", "5s").args(["config", "--json"]));
    assert_eq!(c["defaults"]["stop_grace"], "5s");
    assert_eq!(c["workers"]["web"]["stop_grace"], "5s");
    let c = config_json(sb.drover().env("DROVER_DEFAULTS__STOP_GRACE", "5s").args([
        "--set",
        "defaults.stop_grace=1s",
        "config",
        "--json",
    ]));
    assert_eq!(c["workers"]["web"]["stop_grace"], "1s");
}

#[test]
fn overrides_merge_into_tables_key_by_key() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        "[defaults]\nbackoff = { initial = \"1s\", max = \"1m\" }\n[workers.web]\ncommand = [\"sleep\", \"1\"]\n",
    );
    let c = config_json(sb.drover().env("DROVER_DEFAULTS__BACKOFF__MAX", "10m").args([
        "--set",
        "defaults.backoff.multiplier=4",
        "config",
        "--json",
    ]));
    assert_eq!(c["defaults"]["backoff"], json!({ "initial": "1s", "max": "10m", "multiplier": 4.0 }));
    assert_eq!(c["workers"]["web"]["backoff"], c["defaults"]["backoff"]);
}

#[test]
fn set_values_are_toml_else_strings() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", WEB);
    let c = config_json(sb.drover().args([
        "--set",
        r#"workers.web.command=["echo", "hi there"]"#,
        "--set",
        "workers.web.env.MODE=fast",
        "--set",
        r#"workers.web.env.PORT="8080""#,
        "--set",
        "supervisor.reload=false",
        "--set",
        "workers.web.stop_signal=SIGINT",
        "config",
        "--json",
    ]));
    let web = &c["workers"]["web"];
    assert_eq!(web["command"], json!(["echo", "hi there"]));
    assert_eq!(web["env"], json!({ "MODE": "fast", "PORT": "8080" }));
    assert_eq!(web["stop_signal"], "SIGINT");
    assert_eq!(c["supervisor"]["reload"], false);
}

#[test]
fn env_and_set_can_add_a_worker() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", WEB);
    let c = config_json(sb.drover().env("DROVER_WORKERS__API__COMMAND", r#"["sleep", "2"]"#).args([
        "--set",
        "workers.api.capacity=2",
        "config",
        "--json",
    ]));
    let api = &c["workers"]["api"];
    assert_eq!(api["command"], json!(["sleep", "2"]));
    assert_eq!(api["capacity"], 2);
    assert_eq!(api["stop_grace"], "30s");
    assert_eq!(c["workers"]["web"]["capacity"], 1);
}

#[test]
fn drover_config_names_the_file_and_is_not_a_config_key() {
    let sb = Sandbox::new();
    sb.write("custom.toml", WEB);
    let c = config_json(sb.drover().env("DROVER_CONFIG", "custom.toml").args(["config", "--json"]));
    assert_eq!(c["workers"]["web"]["capacity"], 1);

    let out = run(sb.drover().env("DROVER_CONFIG", "custom.toml").arg("check"));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "custom.toml: ok (1 worker, 0 jobs)\n");

    // An explicit -c wins over DROVER_CONFIG.
    sb.write("other.toml", "");
    let c = config_json(sb.drover().env("DROVER_CONFIG", "custom.toml").args([
        "-c",
        "other.toml",
        "config",
        "--json",
    ]));
    assert_eq!(c["workers"], json!({}));

    // DROVER_CONFIG naming a file that is not there: that file is reported.
    let out = run(sb.drover().env("DROVER_CONFIG", "gone.toml").args(["config", "--json"]));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("gone.toml: no such file"), "{}", out.stderr);
    assert_eq!(out.stdout, "");
}

#[test]
fn toml_output_is_itself_a_config_with_the_same_meaning() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        r#"
[defaults]
env = { A = "1" }
backoff = { multiplier = 1.5 }

[workers.web]
command = ["sleep", "1"]
capacity = 2

[jobs.tick]
command = ["true"]
every = "1h 30m"
timeout = "1m"

[jobs.release]
schedule = "0 4 * * 1"
[[jobs.release.steps]]
name = "build"
command = ["true"]
[[jobs.release.steps]]
name = "publish"
command = ["true"]
approve = true
"#,
    );
    let out = run(sb.drover().arg("config"));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let printed: toml::Table = toml::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("config output is not TOML ({e}):\n{}", out.stdout));
    assert!(printed.contains_key("workers"), "{}", out.stdout);
    sb.write("printed.toml", &out.stdout);

    let original = config_json(sb.drover().args(["config", "--json"]));
    let again = config_json(sb.drover().args(["-c", "printed.toml", "config", "--json"]));
    assert_eq!(original, again);
    assert_eq!(again["jobs"]["tick"]["every"], "1h 30m");
    assert_eq!(again["jobs"]["release"]["steps"][1]["approve"], true);
    assert_eq!(again["jobs"]["release"]["schedule"], "0 4 * * 1");
}

#[test]
fn invalid_config_prints_the_errors_and_nothing_on_stdout() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", "[workers.web]\ncommand = [\"sleep\", \"1\"]\ncapacity = 0\n");
    for args in [&["config"][..], &["config", "--json"]] {
        let out = run(sb.drover().args(args));
        assert_eq!(out.code, Some(1), "{args:?}: {}", out.stderr);
        assert_eq!(out.stdout, "", "{args:?}");
        assert_eq!(
            out.stderr.lines().next(),
            Some("daemon.toml:3:12: workers.web.capacity: must be at least 1, found 0"),
            "{args:?}"
        );
    }
    let out = run(sb.drover().env("DROVER_WORKERS__WEB__CAPACITY", "2").args(["config", "--json"]));
    assert_eq!(out.code, Some(0), "env fixes what the file got wrong: {}", out.stderr);
}

#[test]
fn status_and_plan_show_the_overrides_in_force_without_secret_values() {
    use crate::harness::{SUPERVISOR, Supervisor};
    let sb = Sandbox::new();
    sb.write("daemon.toml", format!("{SUPERVISOR}[workers.web]\ncommand = [\"sleep\", \"1000\"]\n"));
    let sup = Supervisor::start_with(&sb, |c| {
        c.env("DROVER_WORKERS__WEB__CAPACITY", "2").args([
            "--set",
            "workers.web.env.TOKEN=tok-s3cr3t",
            "--set",
            "workers.web.stop_grace=2s",
        ]);
    });
    let v = sup.status();
    let shown = v["overrides"].as_array().unwrap_or_else(|| panic!("no overrides in {v}"));
    assert_eq!(shown.len(), 3, "{v}");
    assert_eq!(
        shown[0],
        json!({"key": "workers.web.capacity", "source": "env", "by": "DROVER_WORKERS__WEB__CAPACITY", "value": "2"})
    );
    assert_eq!(
        shown[1],
        json!({"key": "workers.web.env.TOKEN", "source": "set", "by": "--set workers.web.env.TOKEN=…"})
    );
    let out = sb.cli(&["status"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("  workers.web.capacity = 2 (overridden by DROVER_WORKERS__WEB__CAPACITY)\n")
            && out.stdout.contains("  workers.web.env.TOKEN (overridden by --set workers.web.env.TOKEN=…)\n")
            && out.stdout.contains(
                "  workers.web.stop_grace = \"2s\" (overridden by --set workers.web.stop_grace=2s)\n"
            ),
        "{}",
        out.stdout
    );
    let out = sb.cli(&["plan"]);
    assert!(
        out.stdout.contains("with the supervisor's overrides:\n  workers.web.capacity = 2"),
        "{}",
        out.stdout
    );
    for text in [&out.stdout, &sb.cli(&["status"]).stdout, &sb.cli(&["status", "--json"]).stdout] {
        assert!(!text.contains("tok-s3cr3t"), "a secret value printed: {text}");
    }
    let state = std::fs::read_to_string(sb.state_dir().join("state.json")).unwrap();
    assert!(!state.contains("tok-s3cr3t"), "{state}");
}
