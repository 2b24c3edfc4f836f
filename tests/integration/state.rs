//! One supervisor per state_dir, the state file, recovery after a
//! supervisor was SIGKILLed, `start --detach` / `stop`, and the commands
//! when no supervisor runs.

use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use serde_json::Value;

use crate::harness::{ProcId, SUPERVISOR, Sandbox, Supervisor, instance, run_within, sh, stat, wait_until};

const SECS_10: Duration = Duration::from_secs(10);

fn sleeper(sb: &Sandbox) -> String {
    format!(
        "{SUPERVISOR}\n[workers.sleeper]\nstop_grace = \"300ms\"\ncommand = {}\n",
        sh(&format!("echo $$ >> {}; exec sleep 1000", sb.path("pids.log").display()))
    )
}

/// The running `sleep 1000` processes of the sandbox.
fn sleepers(sb: &Sandbox) -> Vec<i32> {
    sb.processes().into_iter().filter(|(_, c)| c == "sleep 1000").map(|(p, _)| p).collect()
}

#[test]
fn a_second_start_on_the_same_state_dir_fails_naming_the_first() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper(&sb));
    let sup = Supervisor::start(&sb);
    let pid = sup.pid.to_string();

    for args in [&["start"][..], &["start", "--detach"]] {
        let r = sb.cli(args);
        assert_eq!(r.code, Some(1), "{args:?}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.split(|c: char| !c.is_ascii_digit()).any(|w| w == pid),
            "{args:?}: stderr does not name pid {pid}: {}",
            r.stderr
        );
    }
    // The first one is untouched: still one worker, still answering.
    let v = sup.status();
    assert_eq!(v["supervisor"]["pid"], sup.pid);
    assert_eq!(sleepers(&sb).len(), 1);
}

#[test]
fn a_new_supervisor_cleans_up_after_one_that_was_killed() {
    let sb = Sandbox::new();
    // The worker has a child of its own: the whole group must go.
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}\n[workers.sleeper]\nstop_grace = \"300ms\"\ncommand = {}\n",
            sh(&format!("sleep 1001 & echo $$ >> {}; exec sleep 1000", sb.path("pids.log").display()))
        ),
    );
    let mut first = Supervisor::start(&sb);
    let v = first.wait_for("the worker", SECS_10, |v| instance(v, "sleeper", 0)["pid"].is_i64());
    let old_pid = instance(&v, "sleeper", 0)["pid"].as_i64().unwrap() as i32;
    // Restarted once, so the state file must have followed the new pid.
    let r = sb.cli(&["restart", "sleeper"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v = first.wait_for("the restarted worker", SECS_10, |v| {
        let i = instance(v, "sleeper", 0);
        i["state"] == "running" && i["pid"].as_i64().is_some_and(|p| p != old_pid as i64)
    });
    let old_pid = instance(&v, "sleeper", 0)["pid"].as_i64().unwrap() as i32;
    let old = ProcId::of(old_pid).unwrap();
    let old_child = wait_until("the worker's child", SECS_10, || {
        let kids: Vec<i32> =
            sb.processes().into_iter().filter(|(_, c)| c == "sleep 1001").map(|(p, _)| p).collect();
        // The first start's child went with its group on the restart.
        (kids.len() == 1).then(|| ProcId::of(kids[0])).flatten()
    });
    first.sigkill();
    assert!(old.running(), "killing drover alone killed its worker");

    // Nobody answers; the state file names a pid that is gone: stale.
    let (code, v) = sb.status_json();
    assert_eq!(code, Some(3), "{v}");
    assert_eq!(v["supervisor"]["state"], "stale", "{v}");
    let r = sb.cli(&["status"]);
    assert_eq!(r.code, Some(3));
    assert!(r.stdout.contains("stale"), "{}", r.stdout);

    let second = Supervisor::start(&sb);
    wait_until("the old worker and its child to be gone", Duration::from_secs(2), || {
        (!old.running() && !old_child.running()).then_some(())
    });
    let v = second.wait_for("a fresh worker", SECS_10, |v| instance(v, "sleeper", 0)["state"] == "running");
    let new_pid = instance(&v, "sleeper", 0)["pid"].as_i64().unwrap() as i32;
    assert_ne!(new_pid, old_pid);
    assert_eq!(sleepers(&sb), [new_pid], "exactly one instance process runs");
    assert_eq!(v["supervisor"]["state"], "running");
}

#[test]
fn with_no_supervisor_status_reads_the_state_file_and_the_rest_exit_3() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper(&sb));
    // Never started.
    let (code, v) = sb.status_json();
    assert_eq!(code, Some(3), "{v}");
    assert_eq!(v["supervisor"]["state"], "stopped", "{v}");
    let r = sb.cli(&["status"]);
    assert_eq!(r.code, Some(3));
    assert!(r.stdout.contains("stopped"), "{}", r.stdout);
    let no_supervisor = |sb: &Sandbox| {
        for args in [&["reload"][..], &["restart", "x"], &["unpark", "x"], &["stop"]] {
            let r = sb.cli(args);
            assert_eq!(r.code, Some(3), "{args:?}: {}{}", r.stdout, r.stderr);
            assert!(r.stderr.contains("no supervisor"), "{args:?}: {}", r.stderr);
        }
    };
    no_supervisor(&sb);
    assert!(!sb.state_dir().exists(), "a client command made the state_dir");

    // After a clean stop.
    let mut sup = Supervisor::start(&sb);
    sb.wait_lines("pids.log", 1, SECS_10);
    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(sup.wait_exit(Duration::from_secs(5)).is_some());
    let (code, v) = sb.status_json();
    assert_eq!(code, Some(3), "{v}");
    assert_eq!(v["supervisor"]["state"], "stopped", "{v}");
    assert_eq!(instance(&v, "sleeper", 0)["state"], "stopped", "{v}");
    // The logs are read from their files: no supervisor needed.
    let r = sb.cli(&["logs", "sleeper"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    no_supervisor(&sb);
}

#[test]
fn start_detach_returns_once_ready_and_stop_returns_once_it_is_gone() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper(&sb));
    let r = sb.cli(&["start", "--detach"]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    // Ready means answering, at once.
    let (code, v) = sb.status_json();
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["supervisor"]["state"], "running");
    let pid = v["supervisor"]["pid"].as_i64().unwrap() as i32;
    let drover = ProcId::of(pid).unwrap();
    assert!(r.stdout.contains(&pid.to_string()), "{}", r.stdout);
    assert_ne!(stat(pid).unwrap().ppid, std::process::id() as i32);
    assert!(sb.state_dir().join("drover.log").exists());
    sb.wait_lines("pids.log", 1, SECS_10);

    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    // At once: the lock is free and the socket is gone...
    let lock = std::fs::File::open(sb.state_dir().join("drover.lock")).unwrap();
    let held = Flock::lock(lock, FlockArg::LockExclusiveNonblock).map_err(|(f, e)| (f.as_raw_fd(), e));
    assert!(held.is_ok(), "the lock is still held after stop returned: {held:?}");
    assert!(!sb.state_dir().join("drover.sock").exists());
    // ...and the process has exited (allowing the kernel a moment to
    // finish tearing down a process whose files are already closed).
    wait_until("drover to be gone", Duration::from_millis(500), || (!drover.running()).then_some(()));
    assert_eq!(sb.processes(), Vec::new());
    let (code, v) = sb.status_json();
    assert_eq!((code, &v["supervisor"]["state"]), (Some(3), &Value::from("stopped")));
}

#[test]
fn start_detach_with_an_invalid_config_fails_with_the_error() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", "[workers.w]\ncomand = [\"sleep\", \"1\"]\n");
    let r = run_within(sb.drover().args(["-c", "daemon.toml", "start", "--detach"]), SECS_10);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("comand"), "{}", r.stderr);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert_eq!(sb.processes(), Vec::new());
}

/// A `sleep 1000` of the test's own, in a process group of its own,
/// killed when dropped.
struct Bystander(std::process::Child);

impl Bystander {
    fn new(sb: &Sandbox) -> Self {
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new("sleep")
            .arg("1000")
            .current_dir(sb.dir.path())
            .process_group(0)
            .spawn()
            .expect("spawn sleep");
        Bystander(child)
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn recorded_pids_are_checked_against_their_start_times() {
    // A state file left by a supervisor that died long ago: its pid and
    // its worker's group now belong to other processes (reused numbers,
    // told apart by their start times). Status must say stale, and a new
    // supervisor must kill only the group that is still the recorded one.
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper(&sb));
    let (mut reused, mut recorded) = (Bystander::new(&sb), Bystander::new(&sb));
    let ticks = |p: i32| stat(p).unwrap().start;
    let inst = |name: &str, p: i32, start_ticks: u64| {
        serde_json::json!({
            "name": name, "capacity": 1, "state": "running",
            "instances": [{ "index": 0, "pid": p, "pgid": p, "start_ticks": start_ticks, "state": "running",
                            "restarts": 0, "started_at": null, "last_exit": null, "error": null,
                            "next_start_at": null }]
        })
    };
    let state = serde_json::json!({
        "supervisor": { "state": "running", "pid": reused.pid(), "pid_start_ticks": ticks(reused.pid()) + 1,
                        "config": null, "started_at": null, "generation": 1, "last_reload": null },
        "workers": [inst("reused", reused.pid(), ticks(reused.pid()) + 1),
                    inst("recorded", recorded.pid(), ticks(recorded.pid()))],
        "sessions": [], "runs": []
    });
    std::fs::create_dir_all(sb.state_dir()).unwrap();
    sb.write(".drover/state.json", serde_json::to_vec(&state).unwrap());

    let (code, v) = sb.status_json();
    assert_eq!(code, Some(3), "{v}");
    assert_eq!(
        v["supervisor"]["state"], "stale",
        "a live process with a reused pid is not the supervisor: {v}"
    );
    assert_eq!(v["workers"].as_array().unwrap().len(), 2, "{v}");

    let sup = Supervisor::start(&sb);
    wait_until("the recorded group to be killed", Duration::from_secs(2), || {
        (!recorded.alive()).then_some(())
    });
    assert!(reused.alive(), "drover killed a group whose leader is not the recorded process");
    sup.wait_for("its own worker", SECS_10, |v| instance(v, "sleeper", 0)["state"] == "running");
}

/// Regression (found by the chaos test): a supervisor SIGKILLed between a
/// spawn and the next state write leaves a process no file records. Its
/// environment still names the state_dir, and the next supervisor stops it.
#[test]
fn processes_a_killed_supervisor_never_recorded_are_stopped_too() {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper(&sb));
    let sd = sb.state_dir();
    let leftover = |mark: &str| {
        std::process::Command::new("sleep")
            .arg("1000")
            .env("DROVER_STATE_DIR", &sd)
            .env(mark, "w")
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let mut worker = leftover("DROVER_WORKER");
    let mut run = leftover("DROVER_RUN");
    // Another state_dir's process is not ours to stop.
    let mut other = std::process::Command::new("sleep")
        .arg("1000")
        .env("DROVER_STATE_DIR", sb.path("elsewhere"))
        .env("DROVER_WORKER", "w")
        .process_group(0)
        .spawn()
        .unwrap();

    let _sup = Supervisor::start(&sb);
    for (what, child) in [("worker", &mut worker), ("run", &mut run)] {
        let st =
            wait_until(&format!("the unrecorded {what} to be killed"), SECS_10, || child.try_wait().unwrap());
        assert_eq!(st.signal(), Some(9), "{what}");
    }
    assert!(other.try_wait().unwrap().is_none(), "a process of another state_dir was killed");
    other.kill().unwrap();
    other.wait().unwrap();
}

#[test]
fn a_corrupt_state_file_is_no_obstacle() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper(&sb));
    std::fs::create_dir_all(sb.state_dir()).unwrap();
    sb.write(".drover/state.json", "{\"supervisor\": {\"state\": \"run");
    let (code, v) = sb.status_json();
    assert_eq!(code, Some(3), "{v}");
    assert_eq!(v["supervisor"]["state"], "stopped", "{v}");
    let sup = Supervisor::start(&sb);
    sup.wait_for("the worker", SECS_10, |v| instance(v, "sleeper", 0)["state"] == "running");
}

/// Regression (found by the chaos test): a supervisor SIGKILLed while a
/// child was between fork and exec left that child holding the lock for a
/// moment, and the next supervisor refused to start ("another supervisor
/// (pid N) already runs") although N was dead. Now it waits for the lock
/// while the pid in it is gone, and refuses at once while it lives.
#[test]
fn a_lock_held_briefly_after_its_supervisor_died_is_waited_for() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper(&sb));
    std::fs::create_dir_all(sb.state_dir()).unwrap();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let lock_file = sb.state_dir().join("drover.lock");
    std::fs::write(&lock_file, format!("{dead_pid}\n")).unwrap();
    let held =
        Flock::lock(std::fs::File::open(&lock_file).unwrap(), FlockArg::LockExclusiveNonblock).unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
    });
    let sup = Supervisor::start(&sb);
    release.join().unwrap();
    assert_eq!(sup.status()["supervisor"]["state"], "running");
}

/// drover started from a shell that is itself a leftover (it carries the
/// marks of an instance of this state_dir): the leftover beside it is
/// killed, but not by its process group, which drover's own parent shares.
#[test]
fn the_leftover_scan_spares_drovers_own_ancestors_and_their_group() {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper(&sb));
    let script = format!(
        // drover in a session and group of its own, its parents in the
        // leftover's group.
        "sleep 1000 & echo $! > {}; setsid -w {} -c daemon.toml start; wait",
        sb.path("sibling").display(),
        crate::harness::DROVER
    );
    let mut shell = std::process::Command::new("sh")
        .args(["-c", &script])
        .current_dir(sb.dir.path())
        .env("DROVER_STATE_DIR", sb.state_dir())
        .env("DROVER_WORKER", "w")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let sibling: i32 = wait_until("the sibling's pid", SECS_10, || {
        std::fs::read_to_string(sb.path("sibling")).ok()?.trim().parse().ok()
    });
    wait_until("drover to answer", SECS_10, || (sb.cli(&["status", "--json"]).code == Some(0)).then_some(()));
    let sibling_gone = stat(sibling).is_none_or(|s| s.state == 'Z');
    let shell_alive = shell.try_wait().unwrap().is_none();
    let stop = sb.cli(&["stop"]);
    let ended = wait_until("the shell to end", SECS_10, || shell.try_wait().unwrap());
    assert!(sibling_gone, "the leftover beside drover's parent still runs");
    assert!(shell_alive, "drover's own parent shell was killed");
    assert_eq!(stop.code, Some(0), "{}", stop.stderr);
    assert_eq!(ended.signal(), None, "the shell ended by a signal: {ended:?}");
}
