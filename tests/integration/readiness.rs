//! Readiness, health and dependencies with real processes: an instance is
//! `starting` until its ready probe passes, one not ready in time backs
//! off, failed health checks restart it, sd_notify from the instance,
//! dependents wait (and say on what) and stop first, a dependency job runs
//! at start, a rolling restart waits for each replacement to be ready and
//! holds when one never is, and READY=1 reaches drover's own manager only
//! once the instances are ready.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{SUPERVISOR, Sandbox, Supervisor, instance, sh, wait_until, worker};

const LIMIT: Duration = Duration::from_secs(15);

const FAST: &str = "[defaults]\nstop_grace = \"2s\"\nbackoff = { initial = \"100ms\", max = \"500ms\" }\n\n";

/// A script that waits for the file `gate` in its directory, then prints
/// `line` and sleeps: ready (by a log probe) only once the test says so.
fn gated(gate: &str, line: &str) -> String {
    sh(&format!("while [ ! -e {gate} ]; do sleep 0.02; done; echo {line}; exec sleep 1000"))
}

fn state<'v>(v: &'v Value, name: &str, index: u64) -> &'v str {
    instance(v, name, index)["state"].as_str().unwrap_or("?")
}

#[test]
fn an_instance_is_starting_until_its_ready_probe_passes() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}{FAST}[workers.db]\ncommand = {}\nready = {{ log = \"accepting connections\" }}\n",
            gated("go", "accepting connections")
        ),
    );
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("db spawned", LIMIT, |v| instance(v, "db", 0)["pid"].is_i64());
    assert_eq!(state(&v, "db", 0), "starting", "spawned is not ready: {v:#}");
    assert_eq!(worker(&v, "db")["state"], "starting");
    sb.write("go", "");
    sup.wait_for("db ready", LIMIT, |v| state(v, "db", 0) == "running");
}

#[test]
fn not_ready_within_start_timeout_is_a_failed_start_with_the_reason() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}{FAST}[workers.api]\ncommand = [\"sleep\", \"1000\"]\n\
             ready = {{ tcp = \"127.0.0.1:1\", interval = \"50ms\", start_timeout = \"300ms\" }}\n"
        ),
    );
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("a failed start", LIMIT, |v| {
        instance(v, "api", 0)["error"].as_str().is_some_and(|e| e.starts_with("not ready within 300ms"))
    });
    let err = instance(&v, "api", 0)["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("127.0.0.1:1"), "the last check's failure is named: {err}");
    // It is stopped and retried: more than one process over time.
    let first = sup.wait_for("one pid", LIMIT, |v| instance(v, "api", 0)["pid"].is_i64());
    let p0 = instance(&first, "api", 0)["pid"].clone();
    sup.wait_for("a retry with a new process", LIMIT, |v| {
        instance(v, "api", 0)["pid"].is_i64() && instance(v, "api", 0)["pid"] != p0
    });
}

#[test]
fn failed_health_checks_restart_the_instance_and_say_why() {
    let sb = Sandbox::new();
    sb.write("healthy", "");
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}{FAST}[workers.api]\ncommand = [\"sleep\", \"1000\"]\n\
             health = {{ exec = [\"test\", \"-e\", \"healthy\"], interval = \"100ms\", failures = 2 }}\n"
        ),
    );
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("running", LIMIT, |v| state(v, "api", 0) == "running");
    let pid = instance(&v, "api", 0)["pid"].clone();
    std::fs::remove_file(sb.path("healthy")).unwrap();
    let v = sup.wait_for("failed for its health", LIMIT, |v| {
        instance(v, "api", 0)["error"].as_str().is_some_and(|e| e.starts_with("health check failed"))
    });
    // The failure stops the process and hands it to the restart policy; a
    // status may land at any step of that, but never on a ready instance.
    let step = state(&v, "api", 0);
    assert!(
        ["stopping", "backoff", "starting"].contains(&step)
            || instance(&v, "api", 0)["restarts"].as_u64() >= Some(1),
        "an unhealthy instance is on its way to a restart, not {step}: {v}"
    );
    sb.write("healthy", "");
    sup.wait_for("running again as a new process", LIMIT, |v| {
        state(v, "api", 0) == "running" && instance(v, "api", 0)["pid"] != pid
    });
}

#[test]
fn notify_ready_and_status_come_from_the_instance_over_notify_socket() {
    if std::process::Command::new("python3").arg("-c").arg("").status().map(|s| !s.success()).unwrap_or(true)
    {
        eprintln!("skipped: python3 is not installed");
        return;
    }
    let sb = Sandbox::new();
    // A child of the instance sends (attributed by its process group). It
    // stays alive until the test has seen each datagram taken: drover looks
    // the sender up when it reads the datagram.
    let sender = "import os, socket, time\n\
                  s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
                  def send(b): s.sendto(b, os.environ['NOTIFY_SOCKET'])\n\
                  def wait(f):\n    while not os.path.exists(f): time.sleep(0.02)\n\
                  send(b'STATUS=warming up')\nwait('go')\n\
                  send(b'READY=1\\nSTATUS=serving')\nwait('done')\n";
    sb.write("sender.py", sender);
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}{FAST}[workers.svc]\ncommand = {}\nready = {{ notify = true }}\n",
            sh("python3 sender.py; exec sleep 1000")
        ),
    );
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("STATUS= shown", LIMIT, |v| instance(v, "svc", 0)["notify_status"] == "warming up");
    assert_eq!(state(&v, "svc", 0), "starting");
    sb.write("go", "");
    let v = sup.wait_for("READY=1", LIMIT, |v| state(v, "svc", 0) == "running");
    sb.write("done", "");
    assert_eq!(instance(&v, "svc", 0)["notify_status"], "serving");
}

#[test]
fn a_dependent_waits_says_on_what_and_starts_once_it_is_met() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}{FAST}[workers.db]\ncommand = {}\nready = {{ log = \"up\" }}\n\n\
             [workers.api]\ncommand = [\"sleep\", \"1000\"]\ncapacity = 2\ndepends_on = [\"db\"]\n",
            gated("go", "up")
        ),
    );
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("db spawned", LIMIT, |v| instance(v, "db", 0)["pid"].is_i64());
    for i in 0..2 {
        assert_eq!(state(&v, "api", i), "waiting", "{v:#}");
        assert_eq!(instance(&v, "api", i)["waiting_for"], serde_json::json!(["db (ready)"]));
        assert!(instance(&v, "api", i)["pid"].is_null());
    }
    assert_eq!(worker(&v, "api")["state"], "waiting");
    let table = sb.cli(&["status"]);
    assert!(table.stdout.contains("db (ready)"), "the table says what api waits for:\n{}", table.stdout);
    sb.write("go", "");
    let v =
        sup.wait_for("api up", LIMIT, |v| state(v, "api", 0) == "running" && state(v, "api", 1) == "running");
    assert!(instance(&v, "api", 0)["waiting_for"].is_null());
}

#[test]
fn a_job_dependency_runs_at_start_and_its_success_releases_the_worker() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}{FAST}[jobs.migrate]\ncommand = {}\n\n\
             [workers.api]\ncommand = [\"sleep\", \"1000\"]\ndepends_on = {{ migrate = \"succeeded\" }}\n",
            sh("while [ ! -e go ]; do sleep 0.02; done; echo migrated > migrated")
        ),
    );
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("api waiting", LIMIT, |v| state(v, "api", 0) == "waiting");
    assert_eq!(instance(&v, "api", 0)["waiting_for"], serde_json::json!(["migrate (succeeded)"]));
    sb.write("go", "");
    sup.wait_for("api running", LIMIT, |v| state(v, "api", 0) == "running");
    assert!(sb.path("migrated").exists());
    let runs = sb.cli(&["runs", "--json"]);
    let runs: Value = serde_json::from_str(&runs.stdout).unwrap();
    let run =
        runs.as_array().and_then(|r| r.iter().find(|r| r["job"] == "migrate")).cloned().unwrap_or_default();
    assert_eq!(run["source"], "dependency", "{runs:#}");
    assert_eq!(run["state"], "succeeded");
}

#[test]
fn dependents_stop_before_what_they_depend_on() {
    let sb = Sandbox::new();
    let log = sb.path("stops.log");
    // Each logs its stop from its TERM handler, after a short linger.
    let worker_cmd = |name: &str| {
        sh(&format!(
            "trap 'sleep 0.3; echo {name} >> {}; exit 0' TERM; while true; do sleep 0.05; done",
            log.display()
        ))
    };
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}{FAST}[workers.db]\ncommand = {}\n\n\
             [workers.api]\ncommand = {}\ndepends_on = {{ db = \"started\" }}\n\n\
             [workers.edge]\ncommand = {}\ndepends_on = {{ api = \"started\" }}\n",
            worker_cmd("db"),
            worker_cmd("api"),
            worker_cmd("edge")
        ),
    );
    let mut sup = Supervisor::start(&sb);
    sup.wait_for("all running", LIMIT, |v| ["db", "api", "edge"].iter().all(|n| state(v, n, 0) == "running"));
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sup.wait_exit(LIMIT).is_some_and(|s| s.success()));
    assert_eq!(sb.lines("stops.log"), ["edge", "api", "db"]);
}

#[test]
fn a_rolling_restart_waits_for_readiness_and_holds_on_a_replacement_never_ready() {
    let sb = Sandbox::new();
    // Ready only while the file `broken` is absent.
    let cmd = sh("if [ -e broken ]; then exec sleep 1000; fi; echo ready; exec sleep 1000");
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}{FAST}[workers.web]\ncommand = {cmd}\ncapacity = 2\n\
             ready = {{ log = \"ready\", start_timeout = \"500ms\" }}\n"
        ),
    );
    let sup = Supervisor::start(&sb);
    let pids = |v: &Value| (instance(v, "web", 0)["pid"].clone(), instance(v, "web", 1)["pid"].clone());
    let v = sup.wait_for("both ready", LIMIT, |v| {
        state(v, "web", 0) == "running" && state(v, "web", 1) == "running"
    });
    let (a0, a1) = pids(&v);
    // A good rollout: both replaced.
    assert_eq!(sb.cli(&["restart", "web"]).code, Some(0));
    let v = sup.wait_for("both replaced", LIMIT, |v| {
        let (b0, b1) = pids(v);
        state(v, "web", 0) == "running"
            && state(v, "web", 1) == "running"
            && b0 != a0
            && b1 != a1
            && b1.is_i64()
    });
    assert!(worker(&v, "web")["rollout"].is_null(), "{v:#}");
    let (b0, b1) = pids(&v);
    // A bad one: the first replacement never gets ready; the second old
    // instance keeps serving and status says the rollout is stalled.
    sb.write("broken", "");
    assert_eq!(sb.cli(&["restart", "web"]).code, Some(0));
    let v = sup.wait_for("stalled", LIMIT, |v| {
        worker(v, "web")["rollout"].as_str().is_some_and(|r| r.starts_with("stalled"))
    });
    let rollout = worker(&v, "web")["rollout"].as_str().unwrap_or_default().to_string();
    assert!(rollout.contains("not ready within 500ms"), "{rollout}");
    assert_eq!(instance(&v, "web", 1)["pid"], b1, "the old instance 1 still serves: {v:#}");
    assert_eq!(state(&v, "web", 1), "running");
    assert_ne!(instance(&v, "web", 0)["pid"], b0);
    // Fixed: the replacement gets ready on its next try and the rollout ends.
    std::fs::remove_file(sb.path("broken")).unwrap();
    sup.wait_for("rollout done", LIMIT, |v| {
        worker(v, "web")["rollout"].is_null()
            && state(v, "web", 0) == "running"
            && state(v, "web", 1) == "running"
            && instance(v, "web", 1)["pid"] != b1
    });
}

#[test]
fn ready_reaches_drovers_own_manager_only_once_instances_are_ready() {
    let sb = Sandbox::new();
    let sock_path = sb.path("manager.sock");
    let manager = UnixDatagram::bind(&sock_path).unwrap();
    manager.set_nonblocking(true).unwrap();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}{FAST}[workers.db]\ncommand = {}\nready = {{ log = \"up\" }}\n",
            gated("go", "up")
        ),
    );
    let sup = Supervisor::start_with(&sb, |c| {
        c.env("NOTIFY_SOCKET", &sock_path);
    });
    sup.wait_for("db starting", LIMIT, |v| state(v, "db", 0) == "starting");
    let mut buf = [0u8; 512];
    let early = manager.recv(&mut buf).map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    assert!(early.is_err(), "READY=1 before the instance is ready: {early:?}");
    sb.write("go", "");
    let msg = wait_until("READY=1", LIMIT, || {
        manager.recv(&mut buf).ok().map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    });
    assert!(msg.starts_with("READY=1"), "{msg}");
    let v = sup.status();
    assert_eq!(state(&v, "db", 0), "running");
}

#[test]
fn a_dependency_job_waits_for_its_own_dependencies_before_it_runs() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}{FAST}[workers.db]\ncommand = {}\nready = {{ log = \"up\" }}\n\n\
             [jobs.migrate]\ncommand = [\"touch\", \"migrated\"]\ndepends_on = {{ db = \"ready\" }}\n\n\
             [workers.api]\ncommand = [\"sleep\", \"1000\"]\ndepends_on = [\"migrate\"]\n",
            gated("go", "up")
        ),
    );
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("db starting", LIMIT, |v| state(v, "db", 0) == "starting");
    let job = v["jobs"]
        .as_array()
        .and_then(|j| j.iter().find(|j| j["name"] == "migrate"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(job["waiting_for"], serde_json::json!(["db (ready)"]), "{v:#}");
    assert!(!sb.path("migrated").exists(), "the migration ran before the database was ready");
    assert_eq!(state(&v, "api", 0), "waiting");
    sb.write("go", "");
    sup.wait_for("api running", LIMIT, |v| state(v, "api", 0) == "running");
    assert!(sb.path("migrated").exists());
}

#[test]
fn a_reload_that_adds_a_dependency_on_a_job_runs_the_job() {
    let sb = Sandbox::new();
    let job = format!("[jobs.migrate]\ncommand = {}\n\n", sh("echo run >> migrations"));
    sb.write(
        "daemon.toml",
        format!("{SUPERVISOR}{FAST}{job}[workers.db]\ncommand = [\"sleep\", \"1000\"]\n"),
    );
    let sup = Supervisor::start(&sb);
    sup.wait_for("db running", LIMIT, |v| state(v, "db", 0) == "running");
    assert!(!sb.path("migrations").exists(), "a job nothing depends on ran at start");
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}{FAST}{job}[workers.db]\ncommand = [\"sleep\", \"1000\"]\n\n\
             [workers.api]\ncommand = [\"sleep\", \"1000\"]\ndepends_on = {{ migrate = \"succeeded\" }}\n"
        ),
    );
    assert_eq!(sb.cli(&["reload"]).code, Some(0));
    sup.wait_for("api running", LIMIT, |v| state(v, "api", 0) == "running");
    assert_eq!(sb.lines("migrations"), ["run"]);
}

#[test]
fn a_removed_worker_still_waiting_never_starts() {
    let sb = Sandbox::new();
    // `late` waits for a job that fails, beside `mid` in the start order;
    // removing them with `leaf` (which depends on `mid` and lingers on
    // SIGTERM) retires `leaf` first, and `late` only after it.
    let spawned = sb.path("spawned");
    let late = sh(&format!("echo late >> {}; exec sleep 1000", spawned.display()));
    let kept = "[jobs.migrate]\ncommand = [\"false\"]\n\n[workers.db]\ncommand = [\"sleep\", \"1000\"]\n";
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}{FAST}{kept}\n[workers.late]\ncommand = {late}\ncapacity = 2\n\
             depends_on = {{ migrate = \"succeeded\" }}\n\n\
             [workers.mid]\ncommand = [\"sleep\", \"1000\"]\ndepends_on = {{ db = \"started\" }}\n\n\
             [workers.leaf]\ncommand = {}\ndepends_on = {{ mid = \"started\" }}\n",
            sh("trap 'sleep 0.3; exit 0' TERM; while true; do sleep 0.05; done")
        ),
    );
    let sup = Supervisor::start(&sb);
    sup.wait_for("late waiting, leaf running", LIMIT, |v| {
        state(v, "late", 0) == "waiting" && state(v, "leaf", 0) == "running"
    });
    sb.write("daemon.toml", format!("{SUPERVISOR}{FAST}{kept}"));
    assert_eq!(sb.cli(&["reload"]).code, Some(0));
    sup.wait_for("the removed workers gone", LIMIT, |v| {
        v["workers"].as_array().is_some_and(|w| w.iter().all(|w| w["name"] == "db"))
    });
    assert!(
        !spawned.exists(),
        "a removed worker waiting for its dependency was started: {:?}",
        sb.lines("spawned")
    );
}
