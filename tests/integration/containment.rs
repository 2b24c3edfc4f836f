//! What instances use (status `cpu_seconds`, `rss_bytes`, the CPU% and MEM
//! columns), and how drover contains their processes.

use std::time::Duration;

use crate::harness::{Sandbox, Supervisor, instance};

const LIMIT: Duration = Duration::from_secs(20);

/// A worker that burns some CPU, keeps 60 MiB resident, then idles.
const HOG: &str = r#"["python3", "-c", "b = b'x' * (60 << 20)\nfor _ in range(2_000_000): pass\nimport time; time.sleep(1000)"]"#;

#[test]
fn status_shows_what_a_busy_worker_uses() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", format!("[supervisor]\nreload = false\n\n[workers.hog]\ncommand = {HOG}\n"));
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("the hog to use CPU and 60 MiB", LIMIT, |v| {
        let i = instance(v, "hog", 0);
        i["cpu_seconds"].as_f64().is_some_and(|c| c > 0.0)
            && i["rss_bytes"].as_u64().is_some_and(|r| r >= 60 << 20)
    });
    assert_eq!(instance(&v, "hog", 0)["state"], "running", "{v}");
    // Read when asked: the state file never holds them.
    let state = std::fs::read_to_string(sb.state_dir().join("state.json")).unwrap();
    assert!(!state.contains("rss_bytes"), "{state}");
    let table = sb.cli(&["status"]);
    let head = table.stdout.lines().find(|l| l.starts_with("WORKER")).unwrap_or_default().to_string();
    assert!(head.contains("CPU%") && head.contains("MEM"), "{}", table.stdout);
    let row = table.stdout.lines().find(|l| l.starts_with("hog")).unwrap_or_default().to_string();
    assert!(row.contains('M'), "the MEM column of {row:?} in\n{}", table.stdout);
    drop(sup);
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

const SLEEPER: &str =
    "[supervisor]\nreload = false\n{extra}\n[workers.idle]\ncommand = [\"sleep\", \"1000\"]\n";

fn config(extra: &str) -> String {
    SLEEPER.replace("{extra}", extra)
}

/// With "auto", drover as root uses cgroups (this host has cgroup2) and
/// says so in status; its cgroup is removed at a clean stop. Instances
/// still lead process groups of their own.
#[test]
fn status_says_which_containment_is_in_use() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", config(""));
    let mut sup = Supervisor::start(&sb);
    let v = sup.wait_for("idle to run", LIMIT, |v| instance(v, "idle", 0)["state"] == "running");
    let mode = v["supervisor"]["containment"].as_str().unwrap_or_default().to_string();
    let i = instance(&v, "idle", 0);
    assert_eq!(i["pgid"], i["pid"], "the instance leads its own process group: {v}");
    let table = sb.cli(&["status"]);
    assert!(table.stdout.contains(&format!("containment: {mode}\n")), "{}", table.stdout);
    if !is_root() {
        assert!(mode == "cgroup" || mode == "process-group", "{v}");
        return;
    }
    assert_eq!(mode, "cgroup", "as root on a cgroup2 host: {v}\n{}", sup.stderr());
    let cg = std::path::PathBuf::from(v["supervisor"]["cgroup"].as_str().unwrap_or_default());
    assert!(cg.join("cgroup.kill").is_file(), "drover's cgroup {} exists: {v}", cg.display());
    let own = std::path::PathBuf::from(instance(&v, "idle", 0)["cgroup"].as_str().unwrap_or_default());
    let procs = std::fs::read_to_string(own.join("cgroup.procs")).unwrap_or_default();
    assert!(own.starts_with(&cg), "the instance's cgroup {} is below drover's: {v}", own.display());
    assert_eq!(procs.trim(), instance(&v, "idle", 0)["pid"].to_string(), "it holds the instance: {v}");
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sup.wait_exit(LIMIT).is_some_and(|s| s.success()), "{}", sup.stderr());
    assert!(!cg.exists(), "{} is removed at a clean stop", cg.display());
    // The state file keeps what was in use.
    let stopped = sb.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stopped.stdout).unwrap_or_default();
    assert_eq!(v["supervisor"]["state"], "stopped", "{}", stopped.stdout);
    assert_eq!(v["supervisor"]["containment"], "cgroup", "{}", stopped.stdout);
}

/// `containment = "process-group"` is obeyed even where cgroups would do.
#[test]
fn process_groups_are_used_when_the_config_says_so() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", config("containment = \"process-group\"\n"));
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("idle to run", LIMIT, |v| instance(v, "idle", 0)["state"] == "running");
    assert_eq!(v["supervisor"]["containment"], "process-group", "{v}");
    assert!(v["supervisor"].get("cgroup").is_none(), "{v}");
    assert!(instance(&v, "idle", 0).get("cgroup").is_none(), "no instance runs in a cgroup: {v}");
    drop(sup);
}

/// `containment = "cgroup"`: cgroups as root, else a start-up error that
/// names the key.
#[test]
fn cgroup_containment_is_required_when_the_config_says_so() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", config("containment = \"cgroup\"\n"));
    if is_root() {
        let sup = Supervisor::start(&sb);
        assert_eq!(sup.status()["supervisor"]["containment"], "cgroup");
        drop(sup);
        return;
    }
    let r = crate::harness::run_within(sb.drover().args(["-c", "daemon.toml", "start"]), LIMIT);
    assert_ne!(r.code, Some(0), "{}", r.stdout);
    assert!(r.stderr.contains("supervisor.containment"), "{}", r.stderr);
}
