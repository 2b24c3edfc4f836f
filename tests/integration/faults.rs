//! Faults injected into a running drover: its stderr closed or full, its
//! state_dir on a tiny filesystem that fills, its descriptors exhausted,
//! durations past every sane bound, a panic, a SIGKILL. drover must keep
//! supervising (or, when it dies, take its processes with it), keep
//! answering status, and leave no process behind after stop.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{
    ProcId, SUPERVISOR, Sandbox, Supervisor, all_instances, instance, sh, wait_until, worker,
};

const SECS_10: Duration = Duration::from_secs(10);
const SECS_20: Duration = Duration::from_secs(20);

/// A worker that fails at once, again and again: every restart is a few
/// lines of drover's own log.
const FLAPPING: &str = "[workers.flap]\ncommand = [\"false\"]\nbackoff = { initial = \"20ms\", max = \"20ms\" }\n\
                        crash_loop = { max_failures = 1000000 }\n";

fn restarts(v: &Value, name: &str) -> u64 {
    instance(v, name, 0)["restarts"].as_u64().unwrap_or(0)
}

/// `drover stop`, then: drover has exited and no process of the sandbox is left.
fn stop_and_expect_nothing_left(sb: &Sandbox, sup: &mut Supervisor) {
    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "stop: {}{}", r.stdout, r.stderr);
    assert!(sup.wait_exit(SECS_10).is_some(), "drover did not exit after stop");
    wait_until("every process of the sandbox to be gone", SECS_10, || {
        sb.processes().is_empty().then_some(())
    });
}

/// Sets drover's limit on open files (soft, hard) before it execs.
fn nofile(cmd: &mut Command, soft: u64, hard: u64) {
    // SAFETY: setrlimit is a plain system call, safe between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)
                .map_err(std::io::Error::from)
        });
    }
}

// ------------------------------------------------------------ drover's own log

#[test]
fn a_closed_or_full_stderr_loses_log_lines_not_the_supervisor() {
    for kind in ["closed pipe", "/dev/full"] {
        let sb = Sandbox::new();
        sb.write(
            "daemon.toml",
            format!("{SUPERVISOR}{FLAPPING}[workers.steady]\ncommand = [\"sleep\", \"1000\"]\n"),
        );
        let stderr: Stdio = match kind {
            // The read end is dropped at once: every write is EPIPE.
            "closed pipe" => {
                let (read, write) = nix::unistd::pipe().unwrap();
                drop(read);
                write.into()
            }
            _ => std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap().into(),
        };
        let mut stderr = Some(stderr);
        let mut sup = Supervisor::start_with(&sb, |cmd| {
            cmd.stderr(stderr.take().unwrap());
        });
        let v = sup.status();
        let steady = instance(&v, "steady", 0)["pid"].clone();
        // Each restart logs an exit and a start that cannot be written.
        let v = sup.wait_for("20 logged restarts", SECS_20, |v| restarts(v, "flap") >= 20);
        assert!(sup.try_wait().is_none(), "{kind}: drover exited");
        assert_eq!(instance(&v, "steady", 0)["pid"], steady, "{kind}: the steady worker was disturbed");
        stop_and_expect_nothing_left(&sb, &mut sup);
    }
}

/// A tmpfs mounted over a directory of the sandbox; unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// None (with a note) where mounting is impossible (not root, no
    /// mount namespace rights).
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("note: cannot mount a tmpfs at {} (needs root); skipping this part", at.display());
            return None;
        }
        Some(Tmpfs(at.to_path_buf()))
    }

    /// Fills it: writes a file until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = [0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        // Smaller pieces, to the last byte.
        while f.write_all(&chunk[..1]).is_ok() {}
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).stderr(Stdio::null()).status();
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

#[test]
fn a_full_state_dir_loses_log_lines_and_everything_resumes_when_space_returns() {
    let sb = Sandbox::new();
    let Some(fs) = Tmpfs::mount(&sb.root.join("state"), "512k") else { return };
    sb.write(
        "daemon.toml",
        format!(
            "[supervisor]\nreload = false\nstate_dir = \"state\"\n{FLAPPING}\n[workers.talker]\ncommand = {}\n\
             [jobs.tick]\ncommand = [\"true\"]\nevery = \"200ms\"\n",
            sh("while :; do echo talking; sleep 0.02; done")
        ),
    );
    // Detached: drover's own log is state/drover.log, on the tmpfs.
    let r = sb.cli(&["start", "--detach"]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    let status = || {
        let (code, v) = sb.status_json();
        assert_eq!(code, Some(0), "status failed: {v}");
        v
    };
    let pid = status()["supervisor"]["pid"].as_i64().unwrap() as i32;
    let drover = ProcId::of(pid).unwrap();
    let talker = instance(&status(), "talker", 0)["pid"].clone();

    let filler = fs.fill();
    let before = restarts(&status(), "flap");
    wait_until("30 restarts on a full disk", SECS_20, || {
        (restarts(&status(), "flap") >= before + 30).then_some(())
    });
    assert!(drover.running(), "drover died on a full disk");
    assert_eq!(instance(&status(), "talker", 0)["pid"], talker, "the talker was disturbed");

    // Space returns: drover's log, the worker's log and the jobs go on.
    let (own, talk) = (sb.path("state/drover.log"), sb.path("state/logs/talker.log"));
    std::fs::remove_file(&filler).unwrap();
    let (own_len, talk_len) = (file_len(&own), file_len(&talk));
    let runs_before = crate::jobs::runs_of(&sb, "tick").len();
    wait_until("drover's log to grow again", SECS_10, || (file_len(&own) > own_len).then_some(()));
    wait_until("the worker's log to grow again", SECS_10, || (file_len(&talk) > talk_len).then_some(()));
    wait_until("more runs of the job", SECS_10, || {
        (crate::jobs::runs_of(&sb, "tick").iter().filter(|r| r["state"] == "succeeded").count() > runs_before)
            .then_some(())
    });

    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    wait_until("every process of the sandbox to be gone", SECS_10, || {
        sb.processes().is_empty().then_some(())
    });
    drop(fs);
}

#[test]
fn drovers_own_log_is_plain_text_without_rust_debug() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}[workers.w]\ncommand = [\"sleep\", \"1000\"]\n[jobs.report]\ncommand = [\"true\"]\n"
        ),
    );
    let sup = Supervisor::start(&sb);
    let id = crate::jobs::trigger(&sb, "report");
    crate::jobs::wait_state(&sb, id, "succeeded");
    let log = wait_until("the run's end in the log", SECS_10, || {
        let l = sup.stderr();
        l.contains("run ended").then_some(l)
    });
    assert!(!log.contains('\x1b'), "colour codes in a log that is not a terminal:\n{log}");
    for debug in ["Some(", "None", "worker=\"w\""] {
        assert!(!log.contains(debug), "Rust Debug ({debug}) in the log:\n{log}");
    }
    let pid = instance(&sup.status(), "w", 0)["pid"].clone();
    assert!(log.lines().any(|l| l.ends_with(&format!("started worker=w instance=0 pid={pid}"))), "{log}");
    assert!(log.lines().any(|l| l.contains("run step started") && l.contains(" job=report ")), "{log}");
    assert!(log.lines().any(|l| l.ends_with(&format!("run ended run={id} state=succeeded"))), "{log}");
}

#[test]
fn after_a_sigkill_the_next_start_logs_one_cleanup_line_per_group() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}[workers.w]\ncommand = {}\n[jobs.long]\ncommand = {}\n",
            sh("sleep 1001 & exec sleep 1000"),
            sh(&format!("sleep 1002 & sleep 1003 & touch {}; wait", sb.path("run.up").display()))
        ),
    );
    let mut first = Supervisor::start(&sb);
    first.wait_for("the worker and its child", SECS_10, |v| instance(v, "w", 0)["state"] == "running");
    crate::jobs::trigger(&sb, "long");
    wait_until("the run's processes", SECS_10, || sb.path("run.up").exists().then_some(()));
    wait_until("the worker's child", SECS_10, || {
        sb.processes().iter().any(|(_, c)| c == "sleep 1001").then_some(())
    });
    first.sigkill();
    drop(first);

    let second = Supervisor::start(&sb);
    let log = second.stderr();
    let cleanup: Vec<&str> = log.lines().filter(|l| l.contains("previous supervisor left running")).collect();
    assert_eq!(cleanup.len(), 3, "one line per group and one in all:\n{log}");
    assert!(cleanup.iter().any(|l| l.contains("worker=w instance=0")), "{log}");
    assert!(cleanup.iter().any(|l| l.contains(" run=") && l.contains("processes=3")), "{log}");
    assert!(cleanup.iter().any(|l| l.contains("groups=2")), "{log}");
}

// ------------------------------------------------------------ descriptors

#[test]
fn out_of_descriptors_instances_retry_without_parking_and_drover_answers() {
    let sb = Sandbox::new();
    // 14 `hog` instances and six small workers cannot all start within
    // 64 descriptors; which of them is short depends on the order the
    // spawns (in parallel) get them.
    let config = |hogs: u32| {
        let mut cfg = format!(
            "{SUPERVISOR}[defaults]\nbackoff = {{ initial = \"100ms\", max = \"1s\" }}\n\
             crash_loop = {{ max_failures = 2 }}\n[workers.hog]\ncapacity = {hogs}\ncommand = [\"sleep\", \"1000\"]\n"
        );
        for i in 0..6 {
            cfg.push_str(&format!("[workers.w{i}]\ncommand = [\"sleep\", \"1000\"]\n"));
        }
        cfg
    };
    sb.write("daemon.toml", config(14));
    // Soft and hard: drover cannot raise it.
    let mut sup = Supervisor::start_with(&sb, |cmd| nofile(cmd, 64, 64));
    let short = |v: &Value| {
        all_instances(v)
            .filter(|i| i["error"].as_str().is_some_and(|e| e.contains("Too many open files")))
            .count()
    };
    let v = sup.wait_for("instances that could not start", SECS_20, |v| short(v) > 0);
    // Time for each of them to fail many more times than max_failures.
    let failures = || sup.stderr().matches("start failed").count();
    let want = 4 * short(&v);
    // (Up to 20 instances share the shortage, each retrying at most once a
    // second: a minute leaves room on a busy machine.)
    let later = sup.wait_for("many failed starts", Duration::from_secs(60), |_| failures() >= want);
    for w in (0..6).map(|i| format!("w{i}")).chain(["hog".to_string()]) {
        assert_ne!(
            worker(&later, &w)["state"],
            "parked",
            "{w} was parked for drover's own shortage: {later:#}"
        );
    }

    // Descriptors return: every instance starts.
    sb.write("daemon.toml", config(1));
    let r = sb.cli(&["reload"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    sup.wait_for("every instance running", SECS_20, |v| {
        (0..6).all(|i| instance(v, &format!("w{i}"), 0)["state"] == "running")
    });
    stop_and_expect_nothing_left(&sb, &mut sup);
}

#[test]
fn workers_get_the_open_files_limit_drover_started_with() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}[workers.w]\ncommand = {}\n",
            sh(&format!("ulimit -Sn > {}; exec sleep 1000", sb.path("limit").display()))
        ),
    );
    let sup = Supervisor::start_with(&sb, |cmd| nofile(cmd, 256, 4096));
    let seen = wait_until("the worker's limit", SECS_10, || {
        std::fs::read_to_string(sb.path("limit")).ok().filter(|s| s.ends_with('\n'))
    });
    assert_eq!(seen.trim(), "256", "the worker inherited drover's raised limit");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", sup.pid)).unwrap();
    let open = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    assert!(open.split_whitespace().nth(3) == Some("4096"), "drover did not raise its own limit: {open}");
}

// ------------------------------------------------------------ grandchildren

/// The running processes of the sandbox whose command line is `cmd`.
fn running(sb: &Sandbox, cmd: &str) -> Vec<ProcId> {
    sb.processes().into_iter().filter(|(_, c)| c == cmd).filter_map(|(p, _)| ProcId::of(p)).collect()
}

#[test]
fn a_restart_kills_daemons_that_daemons_started_in_sessions_of_their_own() {
    restart_kills_daemons_of_daemons("");
}

/// The same in process-group mode (the default when drover may not make
/// cgroups), where the escapees are found by their marks among drover's
/// children once the new instance has started.
#[test]
fn a_restart_kills_daemons_that_daemons_started_without_cgroups_too() {
    restart_kills_daemons_of_daemons("containment = \"process-group\"\n");
}

fn restart_kills_daemons_of_daemons(containment: &str) {
    let sb = Sandbox::new();
    // A daemon (its own session, marked by its environment) that starts
    // two more daemons of its own, one of them with an empty environment.
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}{containment}[workers.w]\nstop_grace = \"300ms\"\ncommand = {}\n",
            sh("setsid sh -c 'setsid env -i sleep 1006 & setsid sleep 1004 & exec sleep 1003' & exec sleep 1000")
        ),
    );
    let mut sup = Supervisor::start(&sb);
    let daemons = ["sleep 1003", "sleep 1004", "sleep 1006"];
    let first: Vec<ProcId> = wait_until("the daemons", SECS_10, || {
        let all: Vec<Vec<ProcId>> = daemons.iter().map(|d| running(&sb, d)).collect();
        all.iter().all(|v| v.len() == 1).then(|| all.into_iter().flatten().collect())
    });
    let r = sb.cli(&["restart", "w"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    wait_until("the first daemons to be gone", SECS_10, || first.iter().all(|p| !p.running()).then_some(()));
    wait_until("one of each daemon, from the new instance", SECS_10, || {
        daemons.iter().all(|d| running(&sb, d).len() == 1).then_some(())
    });
    stop_and_expect_nothing_left(&sb, &mut sup);
}

// ------------------------------------------------------------ durations

#[test]
fn a_reload_with_a_duration_past_its_bound_is_refused_and_drover_runs_on() {
    let sb = Sandbox::new();
    let good = format!(
        "{SUPERVISOR}[workers.w]\ncommand = [\"sleep\", \"1000\"]\n[jobs.j]\ncommand = [\"true\"]\nevery = \"1h\"\n"
    );
    sb.write("daemon.toml", &good);
    let mut sup = Supervisor::start(&sb);
    let pid = instance(&sup.status(), "w", 0)["pid"].clone();
    for (key, bad) in [
        ("jobs.j.every", "every = \"18446744073709551615s\""),
        ("jobs.j.jitter", "every = \"1h\"\njitter = \"1000000y\""),
        ("workers.w.backoff.multiplier", "every = \"1h\"\n[workers.w.backoff]\nmultiplier = 1e20"),
        (
            "workers.w.backoff.initial",
            "every = \"1h\"\n[workers.w.backoff]\ninitial = \"1000000y\"\nmax = \"1000000y\"",
        ),
    ] {
        sb.write("daemon.toml", good.replace("every = \"1h\"", bad));
        let r = sb.cli(&["reload"]);
        assert_eq!(r.code, Some(1), "{key}: a reload past a bound was applied: {}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(key) && r.stderr.contains("must be at most"), "{key}: {}", r.stderr);
        assert!(sup.try_wait().is_none(), "{key}: drover exited");
        assert_eq!(instance(&sup.status(), "w", 0)["pid"], pid, "{key}: the worker was disturbed");
    }
    stop_and_expect_nothing_left(&sb, &mut sup);
}

// ------------------------------------------------------------ death

#[test]
fn a_panicking_drover_takes_its_processes_with_it() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}[workers.w]\ncapacity = 2\ncommand = {}\n[jobs.long]\ncommand = {}\n",
            sh("sleep 1001 & exec sleep 1000"),
            sh(&format!("sleep 1002 & touch {}; wait", sb.path("run.up").display()))
        ),
    );
    let mut sup = Supervisor::start_with(&sb, |cmd| {
        cmd.env("DROVER_TEST_PANIC_ON_RELOAD", "1");
    });
    sup.wait_for("both instances", SECS_10, |v| (0..2).all(|i| instance(v, "w", i)["state"] == "running"));
    crate::jobs::trigger(&sb, "long");
    wait_until("the run", SECS_10, || sb.path("run.up").exists().then_some(()));
    wait_until("the worker's children", SECS_10, || {
        (sb.processes().iter().filter(|(_, c)| c == "sleep 1001").count() == 2).then_some(())
    });
    assert!(sb.processes().len() >= 6, "{:?}", sb.processes());

    sup.signal(nix::sys::signal::Signal::SIGHUP);
    let status = sup.wait_exit(SECS_10).expect("drover did not die of its panic");
    assert_eq!(status.code(), Some(70), "{status}: {}", sup.stderr());
    wait_until("every process drover ran to be gone", Duration::from_secs(5), || {
        sb.processes().is_empty().then_some(())
    });
    assert!(sup.stderr().contains("the supervisor panicked"), "{}", sup.stderr());
}

// ------------------------------------------------------------ all at once

/// drover's open descriptors.
fn open_fds(pid: i32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

#[test]
fn every_fault_at_once_drover_stays_up_answers_and_leaves_nothing_after_stop() {
    use std::io::Write;
    let sb = Sandbox::new();
    let fs = Tmpfs::mount(&sb.root.join("state"), "1m");
    let state_dir = if fs.is_some() { "state" } else { ".drover" };
    sb.write(
        "daemon.toml",
        format!(
            "[supervisor]\nreload = false\nstate_dir = \"{state_dir}\"\n{FLAPPING}\n[workers.talker]\ncapacity = 3\ncommand = {}\n\
             [workers.steady]\ncommand = [\"sleep\", \"1000\"]\n",
            sh("while :; do echo talking; sleep 0.05; done")
        ),
    );
    // A closed stderr.
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let mut stderr = Some(Stdio::from(write));
    let mut sup = Supervisor::start_with(&sb, |cmd| {
        cmd.stderr(stderr.take().unwrap());
    });
    let steady = instance(&sup.status(), "steady", 0)["pid"].clone();
    let sock = sb.root.join(state_dir).join("drover.sock");

    // Slow readers: clients that ask and never read the answer.
    let slow: Vec<std::os::unix::net::UnixStream> = (0..20)
        .filter_map(|_| {
            let mut s = std::os::unix::net::UnixStream::connect(&sock).ok()?;
            s.write_all(b"{\"cmd\":\"status\"}\n").ok()?;
            Some(s)
        })
        .collect();
    // A full disk.
    let filler = fs.as_ref().map(Tmpfs::fill);
    // A locked ledger: another process's exclusive transaction.
    let ledger = rusqlite::Connection::open(sb.root.join(state_dir).join("ledger.sqlite")).unwrap();
    ledger.execute_batch("BEGIN EXCLUSIVE").unwrap();
    // Out of descriptors: the limit lowered to a few above what is open.
    let pid = sup.pid.to_string();
    let limit = open_fds(sup.pid) + 4;
    let lowered =
        Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={limit}:")]).status().unwrap();
    assert!(lowered.success());

    // Status answers under every fault (slowly while the ledger is locked).
    for _ in 0..3 {
        let v = sup.status();
        assert!(sup.try_wait().is_none(), "drover exited");
        assert_eq!(instance(&v, "steady", 0)["pid"], steady, "the steady worker was disturbed");
        assert_ne!(worker(&v, "flap")["state"], "parked", "{v:#}");
    }

    // Every fault lifted: drover goes on as before.
    ledger.execute_batch("COMMIT").unwrap();
    drop(ledger);
    if let Some(f) = filler {
        std::fs::remove_file(f).unwrap();
    }
    let raised = Command::new("prlimit").args(["--pid", &pid, "--nofile=4096:"]).status().unwrap();
    assert!(raised.success());
    drop(slow);
    let before = restarts(&sup.status(), "flap");
    sup.wait_for("restarts after the faults", SECS_10, |v| {
        restarts(v, "flap") >= before + 10 && (0..3).all(|i| instance(v, "talker", i)["state"] == "running")
    });
    stop_and_expect_nothing_left(&sb, &mut sup);
    drop(fs);
}

/// drover started with descriptors 0, 1 and 2 closed (as a careless init
/// or a `>&-` in a script leaves it) has /dev/null on each: no file it
/// opens later, its lock, ledger or a socket, is taken for its stderr and
/// written over by its log.
#[test]
fn started_with_its_stdio_closed_drover_puts_dev_null_there_and_runs() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", format!("{SUPERVISOR}\n[workers.w]\ncommand = [\"sleep\", \"1000\"]\n"));
    let sup = Supervisor::start_with(&sb, |cmd| {
        // SAFETY: only close(2), async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                for fd in 0..=2 {
                    nix::libc::close(fd);
                }
                Ok(())
            });
        }
    });
    for fd in 0..=2 {
        let target = std::fs::read_link(format!("/proc/{}/fd/{fd}", sup.pid)).unwrap();
        assert_eq!(target, std::path::Path::new("/dev/null"), "descriptor {fd}");
    }
    let v = sup.status();
    assert_eq!(instance(&v, "w", 0)["state"], "running", "{v:#}");
}
