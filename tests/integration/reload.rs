//! Hot reload with a real file system and real processes: every way a
//! file can change, invalid configs, and the reconcile rules. Each test
//! waits for the generation in `status --json`, never for a fixed time.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Sandbox, Supervisor, instance, sh, worker};

const LIMIT: Duration = Duration::from_secs(10);

/// Watching on, a short grace so restarts are quick.
const HEAD: &str = "[supervisor]\nreload = true\n\n[defaults]\nstop_grace = \"2s\"\n";

fn sleeper(name: &str, secs: u32) -> String {
    format!("[workers.{name}]\ncommand = [\"sleep\", \"{secs}\"]\n")
}

fn generation(v: &Value) -> u64 {
    v["supervisor"]["generation"].as_u64().unwrap_or(0)
}

/// Pids of a worker's running instances, by index.
fn pids(v: &Value, name: &str) -> Vec<i64> {
    worker(v, name)["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "running")
        .map(|i| i["pid"].as_i64().unwrap())
        .collect()
}

fn has_worker(v: &Value, name: &str) -> bool {
    v["workers"].as_array().unwrap().iter().any(|w| w["name"] == name)
}

fn running(v: &Value, name: &str, n: usize) -> bool {
    has_worker(v, name) && pids(v, name).len() == n
}

/// Waits until generation `g` is applied and `cond` holds.
fn wait_gen(sup: &Supervisor, g: u64, cond: impl Fn(&Value) -> bool) -> Value {
    sup.wait_for(&format!("generation {g}"), LIMIT, |v| generation(v) == g && cond(v))
}

/// Saves like an editor that writes a temp file and renames it over.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-save");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn start<'a>(sb: &'a Sandbox, text: &str) -> Supervisor<'a> {
    sb.write("daemon.toml", text);
    Supervisor::start(sb)
}

#[test]
fn a_write_in_place_adds_a_worker_and_leaves_the_other_alone() {
    let sb = Sandbox::new();
    let sup = start(&sb, &format!("{HEAD}{}", sleeper("a", 1000)));
    let before = pids(&sup.status(), "a");
    sb.write("daemon.toml", format!("{HEAD}{}{}", sleeper("a", 1000), sleeper("b", 1001)));
    let v = wait_gen(&sup, 2, |v| running(v, "b", 1));
    assert_eq!(pids(&v, "a"), before, "an unchanged worker keeps its process");
    assert_eq!(v["supervisor"]["last_reload"]["ok"], true);
}

#[test]
fn an_atomic_save_by_rename_reloads() {
    let sb = Sandbox::new();
    let sup = start(&sb, &format!("{HEAD}{}", sleeper("a", 1000)));
    write_atomic(&sb.path("daemon.toml"), &format!("{HEAD}{}", sleeper("c", 1002)));
    let v = wait_gen(&sup, 2, |v| running(v, "c", 1) && !has_worker(v, "a"));
    assert!(!has_worker(&v, "a"));
}

#[test]
fn a_symlink_swap_as_kubernetes_does_reloads() {
    let sb = Sandbox::new();
    // The config path is a link into `..data`, itself a link to a
    // versioned directory, all beside the config path (as a mounted
    // ConfigMap is).
    let dir = sb.dir.path().to_path_buf();
    std::fs::create_dir_all(dir.join("..v1")).unwrap();
    std::fs::write(dir.join("..v1/daemon.toml"), format!("{HEAD}{}", sleeper("a", 1000))).unwrap();
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/daemon.toml", dir.join("daemon.toml")).unwrap();
    let sup = Supervisor::start(&sb);
    sup.wait_for("worker a", LIMIT, |v| running(v, "a", 1));
    // The new version in its own directory, then `..data` re-pointed by rename.
    std::fs::create_dir_all(dir.join("..v2")).unwrap();
    std::fs::write(dir.join("..v2/daemon.toml"), format!("{HEAD}{}", sleeper("b", 1001))).unwrap();
    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    wait_gen(&sup, 2, |v| running(v, "b", 1) && !has_worker(v, "a"));
    // And again, to show the watch followed the swap.
    std::fs::create_dir_all(dir.join("..v3")).unwrap();
    std::fs::write(dir.join("..v3/daemon.toml"), format!("{HEAD}{}", sleeper("c", 1002))).unwrap();
    std::os::unix::fs::symlink("..v3", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    wait_gen(&sup, 3, |v| running(v, "c", 1) && !has_worker(v, "b"));
}

#[test]
fn a_change_to_the_file_a_symlink_points_at_reloads() {
    let sb = Sandbox::new();
    sb.write("real/daemon.toml", format!("{HEAD}{}", sleeper("a", 1000)));
    std::os::unix::fs::symlink(sb.path("real/daemon.toml"), sb.path("daemon.toml")).unwrap();
    let sup = Supervisor::start(&sb);
    sb.write("real/daemon.toml", format!("{HEAD}{}{}", sleeper("a", 1000), sleeper("b", 1001)));
    wait_gen(&sup, 2, |v| running(v, "b", 1));
}

#[test]
fn a_delete_keeps_the_config_and_a_recreate_applies() {
    let sb = Sandbox::new();
    let sup = start(&sb, &format!("{HEAD}{}", sleeper("a", 1000)));
    let before = pids(&sup.status(), "a");
    std::fs::remove_file(sb.path("daemon.toml")).unwrap();
    let v = sup.wait_for("the failed reload", LIMIT, |v| v["supervisor"]["last_reload"]["ok"] == false);
    assert!(v["supervisor"]["last_reload"]["error"].as_str().unwrap().contains("no such file"), "{v}");
    assert_eq!(generation(&v), 1);
    assert_eq!(pids(&v, "a"), before);
    sb.write("daemon.toml", format!("{HEAD}{}{}", sleeper("a", 1000), sleeper("b", 1001)));
    let v = wait_gen(&sup, 2, |v| running(v, "b", 1));
    assert_eq!(pids(&v, "a"), before);
    assert_eq!(v["supervisor"]["last_reload"]["ok"], true);
}

#[test]
fn an_invalid_config_changes_nothing_until_it_is_fixed() {
    let sb = Sandbox::new();
    let sup = start(&sb, &format!("{HEAD}{}", sleeper("a", 1000)));
    let before = pids(&sup.status(), "a");
    sb.write(
        "daemon.toml",
        format!("{HEAD}[workers.a]\ncommand = [\"sleep\", \"1000\"]\ncapacity = \"two\"\n"),
    );
    let v = sup.wait_for("the failed reload", LIMIT, |v| v["supervisor"]["last_reload"]["ok"] == false);
    let err = v["supervisor"]["last_reload"]["error"].as_str().unwrap();
    assert!(err.contains("daemon.toml:8:12: workers.a.capacity"), "{err}");
    assert_eq!(generation(&v), 1);
    assert_eq!(pids(&v, "a"), before);
    // A worker whose dir does not exist is invalid too.
    sb.write("daemon.toml", format!("{HEAD}{}dir = \"nowhere\"\n", sleeper("a", 1000)));
    let v = sup.wait_for("the second failed reload", LIMIT, |v| {
        v["supervisor"]["last_reload"]["error"].as_str().is_some_and(|e| e.contains("nowhere"))
    });
    assert_eq!(pids(&v, "a"), before);
    sb.write("daemon.toml", format!("{HEAD}[workers.a]\ncommand = [\"sleep\", \"1000\"]\ncapacity = 2\n"));
    let v = wait_gen(&sup, 2, |v| running(v, "a", 2));
    assert!(pids(&v, "a").contains(&before[0]), "capacity up keeps instance 0");
    assert_eq!(v["supervisor"]["last_reload"]["ok"], true);
}

#[test]
fn an_event_storm_ends_in_the_state_of_the_last_write() {
    let sb = Sandbox::new();
    let sup = start(&sb, &format!("{HEAD}{}", sleeper("a", 1000)));
    let path = sb.path("daemon.toml");
    for i in 1..=50u32 {
        let text = format!("{HEAD}[workers.a]\ncommand = [\"sleep\", \"1000\"]\ncapacity = {}\n", i % 4 + 1);
        if i % 2 == 0 {
            write_atomic(&path, &text)
        } else {
            std::fs::write(&path, text).unwrap()
        }
        std::thread::sleep(Duration::from_millis(20)); // a storm: 50 writes in about a second
    }
    // The last write asks for 50 % 4 + 1 = 3 instances.
    let v = sup.wait_for("capacity 3", LIMIT, |v| worker(v, "a")["capacity"] == 3 && running(v, "a", 3));
    assert!(generation(&v) < 50, "writes within the debounce coalesce (generation {})", generation(&v));
    let again = sup.status();
    assert_eq!(generation(&again), generation(&v), "no reload is left pending");
}

#[test]
fn an_env_change_restarts_only_that_worker_one_instance_at_a_time() {
    let sb = Sandbox::new();
    let log = sb.path("starts.log");
    // Ready once its line is written: the next instance's line cannot
    // overtake it.
    let cmd = sh(&format!("echo $DROVER_INSTANCE $MODE >> {}; echo up; exec sleep 1000", log.display()));
    let text = |mode: &str| {
        format!(
            "{HEAD}[workers.a]\ncommand = {cmd}\ncapacity = 2\nready = {{ log = \"^up$\" }}\n\
             env = {{ MODE = \"{mode}\" }}\n{}",
            sleeper("b", 1001)
        )
    };
    let sup = start(&sb, &text("one"));
    let v = sup.wait_for("a and b", LIMIT, |v| running(v, "a", 2) && running(v, "b", 1));
    let (a, b) = (pids(&v, "a"), pids(&v, "b"));
    sb.write("daemon.toml", text("two"));
    let v = wait_gen(&sup, 2, |v| {
        let p = pids(v, "a");
        p.len() == 2 && !p.contains(&a[0]) && !p.contains(&a[1])
    });
    assert_eq!(pids(&v, "b"), b, "the other worker keeps its process");
    let lines = sb.wait_lines("starts.log", 4, LIMIT);
    assert_eq!(lines[2..], ["0 two", "1 two"], "replaced in index order: {lines:?}");
    // A restart for a config change is a deploy, not a crash.
    assert_eq!(instance(&v, "a", 0)["deploys"], 1);
    assert_eq!(instance(&v, "a", 0)["restarts"], 0);
}

#[test]
fn capacity_down_stops_the_top_index_and_keeps_the_rest() {
    let sb = Sandbox::new();
    let text = |n: u32| format!("{HEAD}[workers.a]\ncommand = [\"sleep\", \"1000\"]\ncapacity = {n}\n");
    let sup = start(&sb, &text(3));
    let v = sup.wait_for("3 instances", LIMIT, |v| running(v, "a", 3));
    let before = pids(&v, "a");
    sb.write("daemon.toml", text(1));
    let v = wait_gen(&sup, 2, |v| worker(v, "a")["instances"].as_array().unwrap().len() == 1);
    assert_eq!(pids(&v, "a"), [before[0]]);
    assert_eq!(instance(&v, "a", 0)["index"], 0);
    for gone in &before[1..] {
        crate::harness::wait_until("the stopped instances to exit", LIMIT, || {
            (!Path::new(&format!("/proc/{gone}")).exists() || crate::harness::stat(*gone as i32).is_none())
                .then_some(())
        });
    }
}

#[test]
fn a_defaults_change_restarts_every_worker_that_inherits_it() {
    let sb = Sandbox::new();
    let text = |v: &str| {
        format!(
            "[supervisor]\nreload = true\n[defaults]\nstop_grace = \"2s\"\nenv = {{ V = \"{v}\" }}\n{}{}\
             [workers.own]\ncommand = [\"sleep\", \"1002\"]\nenv = {{ V = \"mine\" }}\n",
            sleeper("a", 1000),
            sleeper("b", 1001)
        )
    };
    let sup = start(&sb, &text("1"));
    let v = sup
        .wait_for("3 workers", LIMIT, |v| running(v, "a", 1) && running(v, "b", 1) && running(v, "own", 1));
    let (a, b, own) = (pids(&v, "a"), pids(&v, "b"), pids(&v, "own"));
    sb.write("daemon.toml", text("2"));
    let v = wait_gen(&sup, 2, |v| {
        running(v, "a", 1) && running(v, "b", 1) && pids(v, "a") != a && pids(v, "b") != b
    });
    assert_eq!(pids(&v, "own"), own, "a worker that overrides the key is not touched");
}

#[test]
fn a_live_setting_change_keeps_the_processes() {
    let sb = Sandbox::new();
    let text = |grace: &str| {
        format!(
            "[supervisor]\nreload = true\n[workers.a]\ncommand = [\"sleep\", \"1000\"]\nstop_grace = \"{grace}\"\nbackoff = {{ initial = \"{grace}\" }}\n"
        )
    };
    let sup = start(&sb, &text("1s"));
    let before = pids(&sup.status(), "a");
    sb.write("daemon.toml", text("3s"));
    let v = wait_gen(&sup, 2, |_| true);
    assert_eq!(pids(&v, "a"), before);
}

#[test]
fn a_parked_worker_is_unparked_by_a_change() {
    let sb = Sandbox::new();
    let text = |code: u32| {
        format!("[supervisor]\nreload = true\n[workers.a]\ncommand = [\"sh\", \"-c\", \"exit {code}\"]\n")
    };
    let sup = start(&sb, &text(78));
    sup.wait_for("parked", LIMIT, |v| instance(v, "a", 0)["state"] == "parked");
    sb.write("daemon.toml", format!("[supervisor]\nreload = true\n{}", sleeper("a", 1000)));
    let v = wait_gen(&sup, 2, |v| running(v, "a", 1));
    assert_eq!(instance(&v, "a", 0)["state"], "running");
}

#[test]
fn set_overrides_survive_a_reload() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", format!("{HEAD}{}", sleeper("a", 1000)));
    let sup = Supervisor::start_with(&sb, |c| {
        c.args(["--set", "workers.a.capacity=2"]).env("DROVER_WORKERS__A__ENV__FROM", "env");
    });
    sup.wait_for("2 instances", LIMIT, |v| running(v, "a", 2));
    sb.write("daemon.toml", format!("{HEAD}{}{}", sleeper("a", 1000), sleeper("b", 1001)));
    let v = wait_gen(&sup, 2, |v| running(v, "b", 1));
    assert_eq!(worker(&v, "a")["capacity"], 2, "the --set override still applies");
    assert_eq!(pids(&v, "a").len(), 2);
}

#[test]
fn with_watching_off_sighup_and_reload_apply_changes() {
    let sb = Sandbox::new();
    let head = "[supervisor]\nreload = false\n";
    let sup = start(&sb, &format!("{head}{}", sleeper("a", 1000)));
    sb.write("daemon.toml", format!("{head}{}{}", sleeper("a", 1000), sleeper("b", 1001)));
    // Not watched: `plan` sees the difference, nothing applies it yet.
    let plan = sb.cli(&["plan"]);
    assert_eq!(plan.code, Some(1), "{}{}", plan.stdout, plan.stderr);
    assert!(plan.stdout.contains("+ start    b"), "{}", plan.stdout);
    assert_eq!(generation(&sup.status()), 1);
    sup.signal(nix::sys::signal::Signal::SIGHUP);
    wait_gen(&sup, 2, |v| running(v, "b", 1));
    sb.write("daemon.toml", format!("{head}{}", sleeper("b", 1001)));
    let out = sb.cli(&["reload"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("applied generation 3"), "{}", out.stdout);
    wait_gen(&sup, 3, |v| !has_worker(v, "a"));
    let plan = sb.cli(&["plan"]);
    assert_eq!(plan.code, Some(0), "{}", plan.stdout);
    let out = sb.cli(&["plan", "--json"]);
    assert_eq!(out.stdout.trim(), "[]");
}
