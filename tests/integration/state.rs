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

/// Regression: after a SIGKILL of a detached drover (its zombie, never
/// reaped, kept its pid and start time), `status` said "stopped" and
/// listed the dead supervisor's workers as running, uptimes counting.
#[test]
fn after_a_sigkill_status_says_stale_and_vouches_for_nothing() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper(&sb));
    let r = sb.cli(&["start", "--detach"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let (_, v) = sb.status_json();
    let pid = v["supervisor"]["pid"].as_i64().expect("a pid") as i32;
    sb.wait_lines("pids.log", 1, SECS_10);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    // Gone, or a zombie: either way it no longer holds its lock.
    wait_until("the lock to be free", SECS_10, || {
        let f = std::fs::File::open(sb.state_dir().join("drover.lock")).ok()?;
        Flock::lock(f, FlockArg::LockSharedNonblock).ok().map(drop)
    });

    let (code, v) = sb.status_json();
    assert_eq!(code, Some(3), "{v}");
    assert_eq!(v["supervisor"]["state"], "stale", "{v}");
    let i = instance(&v, "sleeper", 0);
    assert_eq!(i["state"], "unknown", "{v}");
    assert!(i["error"].as_str().is_some_and(|e| e.contains("last recorded running")), "{v}");

    let r = sb.cli(&["status"]);
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(r.stdout.starts_with("drover: stale"), "{}", r.stdout);
    assert!(r.stdout.contains("may still be running"), "{}", r.stdout);
    assert!(r.stdout.contains("next `drover start`"), "{}", r.stdout);
    let row = r.stdout.lines().find(|l| l.starts_with("sleeper ")).unwrap_or_else(|| panic!("{}", r.stdout));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[2], "unknown", "{row}");
    assert_eq!(cols[4], "-", "no uptime for a process nobody watches: {row}");

    // The next supervisor cleans up, as ever.
    let old = sleepers(&sb);
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("a fresh worker", SECS_10, |v| instance(v, "sleeper", 0)["state"] == "running");
    let new = instance(&v, "sleeper", 0)["pid"].as_i64().unwrap() as i32;
    assert_eq!(sleepers(&sb), [new], "the dead supervisor's worker {old:?} was stopped");
}

/// Regression: with no config file, `status` said "stopped", as if the
/// file were there and its supervisor down.
#[test]
fn status_without_a_config_file_names_the_file_it_looked_for() {
    let sb = Sandbox::new();
    let cases: [(&[&str], Option<&str>, &str); 3] = [
        (&[], None, "daemon.toml"),
        (&["-c", "other.toml"], None, "other.toml"),
        (&[], Some("env.toml"), "env.toml"),
    ];
    for (args, env, file) in cases {
        for json in [false, true] {
            let mut cmd = sb.drover();
            cmd.args(args).arg("status");
            if json {
                cmd.arg("--json");
            }
            if let Some(e) = env {
                cmd.env("DROVER_CONFIG", e);
            }
            let r = run_within(&mut cmd, SECS_10);
            assert_eq!(r.code, Some(1), "{args:?} {env:?}: {}{}", r.stdout, r.stderr);
            assert!(r.stderr.contains(file) && r.stderr.contains("no such file"), "{}", r.stderr);
            assert!(r.stderr.contains("-c FILE") && r.stderr.contains("DROVER_CONFIG"), "{}", r.stderr);
            assert!(!r.stdout.contains("stopped"), "{}", r.stdout);
        }
    }
    // The other commands keep exit 3, and say which file was missing.
    for args in [&["stop"][..], &["reload"]] {
        let r = sb.cli(args);
        assert_eq!(r.code, Some(3), "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("no supervisor") && r.stderr.contains("daemon.toml does not exist"),
            "{}",
            r.stderr
        );
    }
}

/// Regression: a foreground `start` beside a running supervisor printed
/// the error twice (the log line and the message).
#[test]
fn a_foreground_start_beside_a_running_supervisor_prints_one_line() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper(&sb));
    let sup = Supervisor::start(&sb);
    let r = sb.cli(&["start"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{}", r.stderr);
    assert!(lines[0].starts_with("drover: another supervisor (pid "), "{}", r.stderr);
    assert!(lines[0].contains(&sup.pid.to_string()), "{}", r.stderr);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
}

/// Regression: a syntax error appended to a daemon.toml that sets
/// state_dir made the CLI look in `.drover`: `status` said "stopped" and
/// `stop` and `reload` found no supervisor.
#[test]
fn a_syntax_error_in_the_config_does_not_hide_the_running_supervisor() {
    let sb = Sandbox::new();
    let good = format!(
        "[supervisor]\nstate_dir = \"run/state\"\nreload = false\n[workers.sleeper]\nstop_grace = \"300ms\"\ncommand = {}\n",
        sh("exec sleep 1000")
    );
    sb.write("daemon.toml", &good);
    let r = sb.cli(&["start", "--detach"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let sd = sb.root.join("run/state");
    let (_, v) = sb.status_json();
    let pid = v["supervisor"]["pid"].as_i64().expect("running");
    sb.write("daemon.toml", format!("{good}capacity = = 2\n"));

    let (code, v) = sb.status_json();
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["supervisor"]["state"], "running", "{v}");
    assert_eq!(v["supervisor"]["pid"], pid, "{v}");

    let r = sb.cli(&["reload"]);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("daemon.toml:7:"), "names the line: {}", r.stderr);
    assert!(r.stderr.contains("invalid TOML"), "{}", r.stderr);

    let r = sb.cli(&["status"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.starts_with(&format!("drover: running (pid {pid}")), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("state_dir: {}", sd.display())), "{}", r.stdout);
    assert!(r.stdout.contains("FAILED") && r.stdout.contains("invalid TOML"), "{}", r.stdout);

    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    wait_until("drover to exit", SECS_10, || stat(pid as i32).is_none_or(|s| s.state == 'Z').then_some(()));
    assert!(sleepers(&sb).is_empty(), "stop stopped the workers");
}
