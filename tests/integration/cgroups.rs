//! cgroup containment at work: a grandchild that leaves its process group
//! (`setsid`) and drops drover's environment marker (`env -i`) is still
//! in its instance's or run step's cgroup, so a stop, a restart, the end
//! of a step and a new drover after a SIGKILLed one all end it, and no
//! cgroup of drover's is left behind. Skipped (with a line on stderr)
//! where drover cannot make cgroups.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{ProcId, Sandbox, Supervisor, instance, sh, stat, wait_until};
use crate::jobs::{trigger, wait_run};

const LIMIT: Duration = Duration::from_secs(20);

/// Starts a grandchild in a session of its own with an empty environment,
/// appends its pid to `escapees`, and sleeps.
const ESCAPE: &str = "setsid env -i /bin/sh -c 'exec sleep 1000' & echo $! >> escapees";

/// drover running worker `esc` in cgroup mode, with its first escapee.
struct Running<'a> {
    sup: Supervisor<'a>,
    status: Value,
    /// drover's cgroup, and the instance's below it.
    base: PathBuf,
    cg: PathBuf,
    escapee: ProcId,
}

/// Starts drover in `sb` with worker `esc`; `None` where it runs without
/// cgroups (the test is skipped).
fn start_esc(sb: &Sandbox) -> Option<Running<'_>> {
    start_esc_with(sb, |_| {})
}

fn start_esc_with(sb: &Sandbox, setup: impl FnOnce(&mut std::process::Command)) -> Option<Running<'_>> {
    let command = sh(&format!("{ESCAPE}; exec sleep 1000"));
    sb.write(
        "daemon.toml",
        format!("[supervisor]\nreload = false\n\n[workers.esc]\ncommand = {command}\nstop_grace = \"5s\"\n"),
    );
    let sup = Supervisor::start_with(sb, setup);
    let status = sup.wait_for("esc to run", LIMIT, |v| instance(v, "esc", 0)["state"] == "running");
    let base = cgroup_mode(&status)?;
    let cg = instance_cgroup(&status);
    assert!(cg.starts_with(&base), "{} is below {}", cg.display(), base.display());
    let escapee = escapee(sb, 1);
    assert!(in_cgroup(&cg, escapee.pid), "the escapee is still in the instance's cgroup");
    Some(Running { sup, status, base, cg, escapee })
}

/// drover's cgroup, or `None` (and a line saying why the test is skipped)
/// when it runs without cgroups.
fn cgroup_mode(v: &Value) -> Option<PathBuf> {
    if v["supervisor"]["containment"] != "cgroup" {
        eprintln!(
            "skipped: drover cannot make cgroups here (containment: {}); see its log",
            v["supervisor"]["containment"]
        );
        return None;
    }
    v["supervisor"]["cgroup"].as_str().map(PathBuf::from)
}

/// The `n`th escapee (1-based), once it is `sleep` in a session of its
/// own and without drover's marker: out of reach of process groups.
fn escapee(sb: &Sandbox, n: usize) -> ProcId {
    let pid = wait_until(&format!("escapee {n}"), LIMIT, || {
        let pid: i32 = sb.lines("escapees").get(n - 1)?.trim().parse().ok()?;
        let exec_d = std::fs::read(format!("/proc/{pid}/cmdline")).ok()? == b"sleep\x001000\x00";
        exec_d.then_some(pid)
    });
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&env).contains("DROVER_"), "the escapee dropped the marker");
    let sid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next()?.split_whitespace().nth(3)?.parse::<i32>().ok());
    assert_eq!(sid, Some(pid), "the escapee leads a session of its own");
    assert_eq!(stat(pid).map(|s| s.pgid), Some(pid), "and a process group of its own");
    ProcId::of(pid).expect("the escapee runs")
}

fn in_cgroup(dir: &Path, pid: i32) -> bool {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .is_ok_and(|t| t.lines().any(|l| l.trim() == pid.to_string()))
}

/// The cgroups drover made below its own (instances' and steps').
fn children(base: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(base)
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default()
}

fn gone(what: &str, p: &ProcId, cg: &Path) {
    wait_until(what, LIMIT, || (!p.running() && !cg.exists()).then_some(()));
}

fn instance_cgroup(v: &Value) -> PathBuf {
    let cg = PathBuf::from(instance(v, "esc", 0)["cgroup"].as_str().unwrap_or_default());
    assert!(cg.join("cgroup.procs").is_file(), "the instance has a cgroup: {v}");
    cg
}

#[test]
fn a_setsid_grandchild_is_gone_after_a_restart_and_a_stop() {
    let sb = Sandbox::new();
    let Some(Running { mut sup, status, base, cg: cg1, escapee: e1 }) = start_esc(&sb) else { return };
    let pid1 = instance(&status, "esc", 0)["pid"].clone();

    let r = sb.cli(&["restart", "esc"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    gone("the first escapee and its cgroup after the restart", &e1, &cg1);
    let v = sup.wait_for("esc to run again", LIMIT, |v| {
        let i = instance(v, "esc", 0);
        i["state"] == "running" && i["pid"] != pid1
    });
    let cg2 = instance_cgroup(&v);
    assert_ne!(cg1, cg2, "each process of an instance gets a cgroup of its own");
    let e2 = escapee(&sb, 2);
    assert!(in_cgroup(&cg2, e2.pid));

    let r = sb.cli(&["stop", "esc"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    gone("the second escapee and its cgroup after the stop", &e2, &cg2);
    let v = sup.wait_for("esc to be stopped", LIMIT, |v| instance(v, "esc", 0)["state"] == "stopped");
    assert!(instance(&v, "esc", 0).get("cgroup").is_none(), "{v}");
    assert_eq!(children(&base), Vec::<PathBuf>::new(), "no cgroup is left");

    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(sup.wait_exit(LIMIT).is_some_and(|s| s.success()), "{}", sup.stderr());
    assert!(!base.exists(), "{} is removed at drover's exit", base.display());
}

/// drover's own stop (SIGTERM) ends the escapee too.
#[test]
fn a_setsid_grandchild_is_gone_after_drover_stops() {
    let sb = Sandbox::new();
    let Some(Running { mut sup, base, cg, escapee: e, .. }) = start_esc(&sb) else { return };
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sup.wait_exit(LIMIT).is_some_and(|s| s.success()), "{}", sup.stderr());
    assert!(!e.running(), "the escapee is gone when drover has exited");
    assert!(!cg.exists() && !base.exists(), "no cgroup is left");
}

/// A drover that panics (a bug) kills everything in its cgroups on its
/// way out: the escapee too.
#[test]
fn a_panicking_drover_kills_the_escapee() {
    let sb = Sandbox::new();
    let Some(Running { mut sup, escapee: e, .. }) = start_esc_with(&sb, |cmd| {
        cmd.env("DROVER_TEST_PANIC_ON_RELOAD", "1");
    }) else {
        return;
    };
    sup.signal(nix::sys::signal::Signal::SIGHUP);
    let status = sup.wait_exit(LIMIT).expect("drover did not die of its panic");
    assert_eq!(status.code(), Some(70), "{status}: {}", sup.stderr());
    assert!(sup.stderr().contains("and everything in its cgroups"), "{}", sup.stderr());
    wait_until("the escapee to be gone", LIMIT, || (!e.running()).then_some(()));
}

/// A drover that was SIGKILLed leaves its instances running, the escapee
/// with them; the next drover on the state_dir kills and removes all of it.
#[test]
fn the_next_drover_ends_what_a_sigkilled_one_left_in_its_cgroups() {
    let sb = Sandbox::new();
    let Some(Running { sup: mut first, base, cg, escapee: e, .. }) = start_esc(&sb) else { return };
    first.sigkill();
    assert!(e.running() && in_cgroup(&cg, e.pid), "a SIGKILLed drover leaves the escapee in its cgroup");

    let second = Supervisor::start(&sb);
    // Its names start again with the new drover's life: the leftover
    // cgroup was removed, and one of the same name may be the new one's.
    wait_until("the escapee the first drover left", LIMIT, || (!e.running()).then_some(()));
    let v = second.wait_for("esc to run again", LIMIT, |v| instance(v, "esc", 0)["state"] == "running");
    let cg2 = instance_cgroup(&v);
    assert_eq!(children(&base), vec![cg2.clone()], "only the new instance's cgroup is there");
    let e2 = escapee(&sb, 2);
    let procs = std::fs::read_to_string(cg2.join("cgroup.procs")).unwrap_or_default();
    assert_eq!(procs.lines().count(), 2, "the new instance and its escapee, nothing older: {procs}");
    assert!(in_cgroup(&cg2, e2.pid) && !in_cgroup(&cg2, e.pid));
    assert!(second.stderr().contains("killed what the previous supervisor left in its cgroups"));
    drop(second);
    drop(first);
}

/// A run step's escapee ends with the step (its main process exited),
/// and with a cancelled run; no step's cgroup is left.
#[test]
fn a_job_steps_setsid_grandchild_is_gone_when_the_step_ends() {
    let sb = Sandbox::new();
    let quick = sh(&format!("{ESCAPE}; exit 0"));
    let long = sh(&format!("{ESCAPE}; exec sleep 1000"));
    sb.write(
        "daemon.toml",
        format!(
            "[supervisor]\nreload = false\n\n[jobs.quick]\ncommand = {quick}\n\n\
             [jobs.long]\ncommand = {long}\nstop_grace = \"5s\"\n"
        ),
    );
    let sup = Supervisor::start(&sb);
    let Some(base) = cgroup_mode(&sup.status()) else { return };

    let id = trigger(&sb, "long");
    let e1 = escapee(&sb, 1);
    let step =
        wait_until("the step's cgroup", LIMIT, || children(&base).into_iter().find(|c| in_cgroup(c, e1.pid)));
    let name = step.file_name().unwrap_or_default().to_string_lossy().into_owned();
    assert!(name.starts_with(&format!("r.{id}.0.")), "{name}");
    let r = sb.cli(&["runs", "cancel", &id.to_string()]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    gone("the cancelled step's escapee", &e1, &step);
    wait_run(&sb, id, "cancelled", |r| r["state"] == "cancelled");

    let id = trigger(&sb, "quick");
    let run = wait_run(&sb, id, "ended", |r| r["state"] != "running" && r["state"] != "queued");
    assert_eq!(run["state"], "succeeded", "{run:#}");
    let pid: i32 = sb.lines("escapees")[1].trim().parse().expect("a pid");
    // Ended once its cgroup was empty: the escapee went with the step.
    assert!(ProcId::of(pid).is_none_or(|p| !p.running()), "the step's escapee {pid} is gone");
    wait_until("no step's cgroup left", LIMIT, || children(&base).is_empty().then_some(()));
    drop(sup);
}

/// In cgroup mode an instance's CPU time is its cgroup's: it includes a
/// child that has exited, which a sum over the live processes would miss.
#[test]
fn cpu_time_includes_children_that_have_exited() {
    let sb = Sandbox::new();
    let busy = "sh -c 'i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done'; touch busy.done; exec sleep 1000";
    sb.write(
        "daemon.toml",
        format!("[supervisor]\nreload = false\n\n[workers.cpu]\ncommand = {}\n", sh(busy)),
    );
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("cpu to run", LIMIT, |v| instance(v, "cpu", 0)["state"] == "running");
    if cgroup_mode(&v).is_none() {
        return;
    }
    wait_until("the busy child to end", LIMIT, || sb.path("busy.done").exists().then_some(()));
    let v = sup.status();
    let cpu = instance(&v, "cpu", 0)["cpu_seconds"].as_f64().unwrap_or_default();
    // The loop takes about 0.2 s of CPU here; the live shell and sleep
    // have used next to nothing themselves.
    assert!(cpu >= 0.05, "the exited child's CPU time is counted: {cpu} s\n{v}");
    assert!(instance(&v, "cpu", 0)["rss_bytes"].as_u64().is_some_and(|r| r > 0), "{v}");
    drop(sup);
}

/// The inotify watches drover holds (each listed in its fdinfo).
fn inotify_watches(pid: i32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    fds.flatten()
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:inotify"))
        .filter_map(|fd| {
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy())).ok()
        })
        .map(|info| info.lines().filter(|l| l.starts_with("inotify ")).count())
        .sum()
}

#[test]
fn a_worker_restarting_fast_leaves_no_cgroup_watch_behind() {
    let sb = Sandbox::new();
    // Exits at once: its cgroup is often empty before drover watches it.
    sb.write(
        "daemon.toml",
        "[supervisor]\nreload = false\n\n[workers.flash]\ncommand = [\"true\"]\n\
         backoff = { initial = \"0s\", max = \"0s\" }\ncrash_loop = { min_uptime = \"0s\" }\n",
    );
    let sup = Supervisor::start(&sb);
    let v =
        sup.wait_for("100 restarts", LIMIT, |v| instance(v, "flash", 0)["restarts"].as_u64() >= Some(100));
    if cgroup_mode(&v).is_none() {
        return;
    }
    // The config file's watch and a few cgroups in flight, not one per start.
    let watches = inotify_watches(sup.pid);
    assert!(watches < 20, "{watches} inotify watches after 100 restarts");
    drop(sup);
}

/// A main process that exits leaving an escapee behind: the instance is
/// restarted once the escapee, stopped, has left the cgroup, well before
/// `stop_grace` could run out.
#[test]
fn an_exit_that_leaves_an_escapee_restarts_once_the_cgroup_is_empty() {
    let sb = Sandbox::new();
    // The first run leaves an escapee and exits; later ones stay up.
    let command =
        sh(&format!("if [ ! -e ran ]; then touch ran; {ESCAPE}; sleep 0.2; exit 1; fi; exec sleep 1000"));
    sb.write(
        "daemon.toml",
        format!(
            "[supervisor]\nreload = false\n\n[workers.esc]\ncommand = {command}\nstop_grace = \"1h\"\n\
             backoff = {{ initial = \"0s\", max = \"0s\" }}\n"
        ),
    );
    let sup = Supervisor::start(&sb);
    let first = escapee(&sb, 1);
    let v = sup.wait_for("esc restarted", LIMIT, |v| {
        let i = instance(v, "esc", 0);
        i["state"] == "running" && i["restarts"] == 1
    });
    if cgroup_mode(&v).is_none() {
        return;
    }
    assert!(!first.running(), "the escapee of the first run is stopped before the restart");
}
