//! The operator's controls with real processes: `stop` and `start` of one
//! worker or instance without editing the file, `restart NAME:INDEX` and
//! `restart --wait`, the progress of a slow stop, `status --check`, the
//! deploy count beside the crash count, and the scale line of `plan`.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{ProcId, SUPERVISOR, Sandbox, Supervisor, instance, sh};

const LIMIT: Duration = Duration::from_secs(10);

/// The pid of a running instance (None if it is not running).
fn pid(v: &Value, name: &str, index: u64) -> Option<i32> {
    let i = instance(v, name, index);
    (i["state"] == "running").then(|| i["pid"].as_i64()).flatten().map(|p| p as i32)
}

/// A worker `web` of `capacity` whose instances log "INDEX MODE" to
/// starts.log when they start.
fn web(sb: &Sandbox, capacity: u32, mode: &str) -> String {
    let cmd =
        sh(&format!("echo $DROVER_INSTANCE $MODE >> {}; exec sleep 1000", sb.path("starts.log").display()));
    format!(
        "{SUPERVISOR}[defaults]\nstop_grace = \"2s\"\nbackoff = {{ initial = \"100ms\", max = \"1s\" }}\n\n\
         [workers.web]\ncommand = {cmd}\ncapacity = {capacity}\nenv = {{ MODE = \"{mode}\" }}\n"
    )
}

fn both_running(v: &Value) -> bool {
    pid(v, "web", 0).is_some() && pid(v, "web", 1).is_some()
}

/// A supervisor running `web` with two instances, and their pids.
fn two_instances(sb: &Sandbox) -> (Supervisor<'_>, i32, i32) {
    sb.write("daemon.toml", web(sb, 2, "one"));
    let sup = Supervisor::start(sb);
    let v = sup.wait_for("two instances", LIMIT, both_running);
    let (p0, p1) = (pid(&v, "web", 0).unwrap(), pid(&v, "web", 1).unwrap());
    (sup, p0, p1)
}

#[test]
fn a_stopped_instance_stays_stopped_through_a_reload_until_started() {
    let sb = Sandbox::new();
    let (sup, p0, p1) = two_instances(&sb);
    let old1 = ProcId::of(p1).unwrap();

    let r = sb.cli(&["stop", "web:1"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("stopped web:1"), "{}", r.stdout);
    // `stop` returned once the instance was stopped: its process is gone.
    assert!(!old1.running(), "web:1's process outlived its stop");
    let v = sup.status();
    let i1 = instance(&v, "web", 1);
    assert_eq!(i1["state"], "stopped", "{i1}");
    assert_eq!(i1["held"], true, "{i1}");
    assert_eq!(i1["restarts"], 0, "a stop by hand is no crash: {i1}");
    assert_eq!(pid(&v, "web", 0), Some(p0), "the other instance keeps its pid");
    let text = sb.cli(&["status"]);
    assert!(text.stdout.contains("stopped by hand"), "{}", text.stdout);

    // A reload that restarts the worker leaves the held instance stopped.
    sb.write("daemon.toml", web(&sb, 2, "two"));
    let r = sb.cli(&["reload"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v = sup.wait_for("web:0 restarted with the new env", LIMIT, |v| {
        pid(v, "web", 0).is_some_and(|p| p != p0) && instance(v, "web", 0)["deploys"] == 1
    });
    assert_eq!(instance(&v, "web", 1)["state"], "stopped", "{v}");
    assert_eq!(instance(&v, "web", 1)["held"], true);
    assert!(!sb.lines("starts.log").contains(&"1 two".to_string()), "{:?}", sb.lines("starts.log"));

    // `start` brings it back, with the new config.
    let r = sb.cli(&["start", "web:1"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v = sup.status();
    let new1 = pid(&v, "web", 1).unwrap_or_else(|| panic!("web:1 not running after start: {v}"));
    assert_ne!(new1, p1);
    assert!(ProcId::of(new1).is_some_and(|p| p.running()));
    assert_eq!(instance(&v, "web", 1)["held"], false);
    assert!(r.stdout.contains(&format!("web:1 running (pid {new1})")), "{}", r.stdout);
    sb.wait_lines("starts.log", 4, LIMIT);
    assert!(sb.lines("starts.log").contains(&"1 two".to_string()), "{:?}", sb.lines("starts.log"));
}

#[test]
fn a_stopped_worker_is_not_restarted_and_capacity_changes_keep_it_stopped() {
    let sb = Sandbox::new();
    let (sup, ..) = two_instances(&sb);
    let r = sb.cli(&["stop", "web"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("stopped web:0") && r.stdout.contains("stopped web:1"), "{}", r.stdout);
    // Capacity up: the new index starts; the held ones stay stopped.
    sb.write("daemon.toml", web(&sb, 3, "one"));
    assert_eq!(sb.cli(&["reload"]).code, Some(0));
    let v = sup.wait_for("web:2", LIMIT, |v| pid(v, "web", 2).is_some());
    for i in 0..2 {
        assert_eq!(instance(&v, "web", i)["state"], "stopped", "{v}");
        assert_eq!(instance(&v, "web", i)["held"], true, "{v}");
    }
    // `restart` of a held instance starts it.
    let r = sb.cli(&["restart", "--wait", "web:0"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v = sup.status();
    assert!(pid(&v, "web", 0).is_some(), "{v}");
    assert_eq!(instance(&v, "web", 0)["held"], false);
    assert_eq!(instance(&v, "web", 1)["state"], "stopped", "{v}");
}

#[test]
fn unknown_names_and_indices_out_of_range_are_errors_naming_the_valid_ones() {
    let sb = Sandbox::new();
    let (sup, p0, p1) = two_instances(&sb);
    for cmd in ["stop", "start", "restart"] {
        let r = sb.cli(&[cmd, "web:7"]);
        assert_eq!(r.code, Some(1), "{cmd} web:7: {}", r.stdout);
        assert!(r.stderr.contains("web:7") && r.stderr.contains("web:0 and web:1"), "{cmd}: {}", r.stderr);
        let r = sb.cli(&[cmd, "web:0", "nope"]);
        assert_eq!(r.code, Some(1), "{cmd} nope: {}", r.stdout);
        assert!(r.stderr.contains("\"nope\"") && r.stderr.contains("web"), "{cmd}: {}", r.stderr);
        let r = sb.cli(&[cmd, "web:x"]);
        assert_eq!(r.code, Some(2), "{cmd} web:x: {}", r.stderr);
        assert!(r.stderr.contains("web:0"), "{cmd}: {}", r.stderr);
    }
    let r = sb.cli(&["start", "--detach", "web"]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    // None of it touched a process (an error acts on no target, not even web:0).
    let after = sup.status();
    assert_eq!((pid(&after, "web", 0), pid(&after, "web", 1)), (Some(p0), Some(p1)));
}

#[test]
fn restart_of_one_instance_waits_for_its_new_pid_and_counts_a_deploy_not_a_crash() {
    let sb = Sandbox::new();
    let (sup, p0, p1) = two_instances(&sb);

    let r = sb.cli(&["restart", "--wait", "web:1"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    // When --wait returns, the new process runs already.
    let v = sup.status();
    let new1 = pid(&v, "web", 1).unwrap_or_else(|| panic!("web:1 not running when --wait returned: {v}"));
    assert_ne!(new1, p1);
    assert!(ProcId::of(new1).is_some_and(|p| p.running()));
    assert!(r.stdout.contains(&format!("restarted web:1 (pid {new1})")), "{}", r.stdout);
    assert_eq!(pid(&v, "web", 0), Some(p0), "web:0 is not restarted");
    assert_eq!(instance(&v, "web", 1)["deploys"], 1);
    assert_eq!(instance(&v, "web", 1)["restarts"], 0);
    assert_eq!(instance(&v, "web", 0)["deploys"], 0);

    // The whole worker, one at a time; --wait returns once both are new.
    let r = sb.cli(&["restart", "web", "--wait"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v = sup.status();
    let (q0, q1) = (pid(&v, "web", 0).expect("web:0 runs"), pid(&v, "web", 1).expect("web:1 runs"));
    assert!(q0 != p0 && q1 != new1, "old {p0} {new1}, new {q0} {q1}");
    assert!([q0, q1].iter().all(|&p| ProcId::of(p).is_some_and(|p| p.running())));
    assert_eq!(instance(&v, "web", 1)["deploys"], 2);
    assert_eq!(instance(&v, "web", 0)["restarts"], 0);
    let text = sb.cli(&["status"]);
    assert!(text.stdout.contains("DEPLOYS"), "{}", text.stdout);

    // A crash is a restart, not a deploy.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(q0), nix::sys::signal::Signal::SIGKILL).unwrap();
    let v = sup.wait_for("web:0 restarted after its crash", LIMIT, |v| {
        pid(v, "web", 0).is_some_and(|p| p != q0) && instance(v, "web", 0)["restarts"] == 1
    });
    assert_eq!(instance(&v, "web", 0)["deploys"], 1);
}

#[test]
fn restart_wait_fails_with_the_reason_when_the_new_instance_cannot_start() {
    let sb = Sandbox::new();
    let script = sb.write("run.sh", "#!/bin/sh\nexec sleep 1000\n");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}[workers.app]\ncommand = [\"./run.sh\"]\nstop_grace = \"2s\"\n\
             backoff = {{ initial = \"5s\" }}\n"
        ),
    );
    let sup = Supervisor::start(&sb);
    sup.wait_for("app", LIMIT, |v| pid(v, "app", 0).is_some());
    std::fs::remove_file(&script).unwrap();
    let r = sb.cli(&["restart", "--wait", "app"]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stderr.contains("app:0") && r.stderr.contains("run.sh"), "{}", r.stderr);
    let v = sup.status();
    assert_eq!(instance(&v, "app", 0)["state"], "backoff", "{v}");
}

#[test]
fn a_slow_stop_shows_which_instance_it_waits_for_and_the_grace_left() {
    let sb = Sandbox::new();
    // It ignores SIGTERM: only the SIGKILL after the grace ends it.
    let cmd = sh("trap '' TERM; exec sleep 1000");
    sb.write("daemon.toml", format!("{SUPERVISOR}[workers.slow]\ncommand = {cmd}\nstop_grace = \"3s\"\n"));
    let mut sup = Supervisor::start(&sb);
    let v = sup.wait_for("slow", LIMIT, |v| pid(v, "slow", 0).is_some());
    let p = pid(&v, "slow", 0).unwrap();

    let r = sb.cli(&["stop", "slow:0"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains(&format!("waiting for slow:0 (pid {p}) to stop, SIGKILL in ")), "{}", r.stderr);
    assert!(r.stdout.contains("stopped slow:0"), "{}", r.stdout);
    assert_eq!(instance(&sup.status(), "slow", 0)["last_exit"]["signal"], "SIGKILL");

    // So does restart --wait, and drover's own stop.
    assert_eq!(sb.cli(&["start", "slow"]).code, Some(0));
    let v = sup.wait_for("slow again", LIMIT, |v| pid(v, "slow", 0).is_some());
    let p = pid(&v, "slow", 0).unwrap();
    let r = sb.cli(&["restart", "--wait", "slow"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains(&format!("waiting for slow:0 (pid {p}) to stop, SIGKILL in ")), "{}", r.stderr);
    let p = pid(&sup.status(), "slow", 0).expect("slow runs after restart --wait");
    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains(&format!("waiting for slow:0 (pid {p}) to stop, SIGKILL in ")), "{}", r.stderr);
    assert!(sup.wait_exit(LIMIT).is_some());
}

#[test]
fn status_check_fails_on_a_parked_instance_and_passes_once_it_is_stopped_by_hand() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}[workers.good]\ncommand = [\"sleep\", \"1000\"]\n\n\
             [workers.bad]\ncommand = [\"false\"]\ncrash_loop = {{ max_failures = 1 }}\n"
        ),
    );
    // No supervisor: exit 3, as for status.
    assert_eq!(sb.cli(&["status", "--check"]).code, Some(3));
    let sup = Supervisor::start(&sb);
    sup.wait_for("bad parked", LIMIT, |v| instance(v, "bad", 0)["state"] == "parked");
    let r = sb.cli(&["status", "--check"]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stdout.contains("bad:0 parked"), "{}", r.stdout);
    assert!(!r.stdout.contains("good"), "{}", r.stdout);
    let r = sb.cli(&["status", "--check", "good"]);
    assert_eq!(r.code, Some(0), "only good is checked: {}", r.stdout);

    assert_eq!(sb.cli(&["stop", "bad"]).code, Some(0));
    let r = sb.cli(&["status", "--check"]);
    assert_eq!(r.code, Some(0), "{}", r.stdout);
    assert!(r.stdout.starts_with("ok: 1 running, 1 stopped (1 by hand)"), "{}", r.stdout);
    let r = sb.cli(&["status", "--check", "--json"]);
    assert_eq!(r.code, Some(0));
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(instance(&v, "bad", 0)["held"], true);
    drop(sup);
}

#[test]
fn plan_shows_the_scale_of_a_capacity_change_beside_a_restart() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", web(&sb, 1, "one"));
    let sup = Supervisor::start(&sb);
    sup.wait_for("web", LIMIT, |v| pid(v, "web", 0).is_some());
    sb.write("daemon.toml", web(&sb, 2, "two"));
    let r = sb.cli(&["plan"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stdout.contains("~ restart  web (changed: env, capacity; scale 1 -> 2; one instance at a time)"),
        "{}",
        r.stdout
    );
    let r = sb.cli(&["plan", "--json"]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v[0]["action"], "restart");
    assert_eq!((v[0]["from_capacity"].as_u64(), v[0]["to_capacity"].as_u64()), (Some(1), Some(2)));
}
