//! Stopping: the grace period and SIGKILL, process groups with
//! grandchildren, reaping orphans (drover is a child subreaper), and
//! drover's own shutdown on SIGTERM / SIGINT, in parallel.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::harness::{
    ProcId, SUPERVISOR, Sandbox, Supervisor, all_pids, cmdline, instance, sh, stat, wait_until,
};

const SECS_10: Duration = Duration::from_secs(10);

/// The processes recorded one per line (first field a pid) in `rel`.
fn recorded(sb: &Sandbox, rel: &str, n: usize) -> Vec<ProcId> {
    sb.wait_lines(rel, n, SECS_10)
        .iter()
        .map(|l| {
            let pid = l.split_whitespace().next().unwrap().parse().unwrap();
            ProcId::of(pid).unwrap_or_else(|| panic!("pid {pid} from {rel} is already gone"))
        })
        .collect()
}

/// Every process (zombies included) in one of `pgids` that belongs to
/// this test: a zombie, or a process running in the sandbox. (A pgid
/// number reused by a stranger once the group emptied is neither.)
fn left_in_groups(sb: &Sandbox, pgids: &BTreeSet<i32>) -> Vec<String> {
    all_pids()
        .into_iter()
        .filter_map(|p| Some((p, stat(p)?)))
        .filter(|(p, s)| pgids.contains(&s.pgid) && (s.state == 'Z' || sb.owns(*p)))
        .map(|(p, s)| format!("{p} ({}) {}", s.state, cmdline(p)))
        .collect()
}

fn pgids(status: &Value) -> BTreeSet<i32> {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["instances"].as_array().unwrap())
        .map(|i| i["pgid"].as_i64().unwrap_or_else(|| panic!("no pgid: {i}")) as i32)
        .collect()
}

fn read_state(sb: &Sandbox) -> Value {
    serde_json::from_slice(&std::fs::read(sb.state_dir().join("state.json")).unwrap()).unwrap()
}

#[test]
fn a_worker_that_ignores_sigterm_is_killed_after_the_grace() {
    let sb = Sandbox::new();
    let script = format!("trap '' TERM; echo $$ >> {}; exec sleep 1000", sb.path("pid.log").display());
    sb.write(
        "daemon.toml",
        format!("{SUPERVISOR}\n[workers.stubborn]\nstop_grace = \"300ms\"\ncommand = {}\n", sh(&script)),
    );
    let mut sup = Supervisor::start(&sb);
    let worker = recorded(&sb, "pid.log", 1)[0];

    let t = Instant::now();
    let r = sb.cli(&["stop"]);
    let took = t.elapsed();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(took >= Duration::from_millis(270), "stop took only {took:?}: the grace was not waited out");
    assert!(took < Duration::from_millis(2500), "stop took {took:?}, the grace is 300ms");
    assert!(!worker.running(), "the worker survived the stop");
    assert_eq!(sup.wait_exit(Duration::from_secs(5)).map(|s| s.code()), Some(Some(0)));

    let state = read_state(&sb);
    assert_eq!(state["supervisor"]["state"], "stopped", "{state}");
    let i = instance(&state, "stubborn", 0);
    assert_eq!(i["state"], "stopped", "{i}");
    assert_eq!(i["last_exit"]["signal"], "SIGKILL", "{i}");
}

#[test]
fn no_grandchild_survives_a_stop() {
    let sb = Sandbox::new();
    // `tree` dies of SIGTERM with its children; in `stubborn` the leader
    // dies but its children ignore SIGTERM, so only the SIGKILL to the
    // group after the grace gets them.
    let tree = format!("sleep 1000 & sleep 1000 & echo $$ >> {}; wait", sb.path("tree.log").display());
    let stubborn = format!(
        "(trap '' TERM; exec sleep 1000) & (trap '' TERM; exec sleep 1000) & echo $$ >> {}; wait",
        sb.path("stubborn.log").display()
    );
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}\n[defaults]\nstop_grace = \"300ms\"\n\
             [workers.tree]\ncommand = {}\n[workers.stubborn]\ncommand = {}\n",
            sh(&tree),
            sh(&stubborn)
        ),
    );
    let mut sup = Supervisor::start(&sb);
    recorded(&sb, "tree.log", 1);
    recorded(&sb, "stubborn.log", 1);
    let groups = pgids(&sup.status());
    assert_eq!(groups.len(), 2, "one process group per instance");
    // Three processes in each group: the shell and its two sleeps.
    wait_until("both groups to hold three processes", SECS_10, || {
        (left_in_groups(&sb, &groups).len() == 6).then_some(())
    });

    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(left_in_groups(&sb, &groups), Vec::<String>::new(), "processes left after the stop");
    assert!(sup.wait_exit(Duration::from_secs(5)).is_some());
    assert_eq!(sb.processes(), Vec::new(), "processes of the sandbox left after the stop");
}

#[test]
fn the_group_of_an_exited_leader_is_emptied_before_the_restart() {
    let sb = Sandbox::new();
    let (kids, alive) = (sb.path("kids.log"), sb.path("alive.log"));
    // Each start first counts the children of earlier starts still alive,
    // then leaves one behind in its group and exits.
    let script = format!(
        "n=0; for k in $(cat {kids} 2>/dev/null); do \
           if [ -r /proc/$k/stat ] && [ \"$(cut -d' ' -f3 /proc/$k/stat)\" != Z ]; then n=$((n+1)); fi; \
         done; echo $n >> {alive}; \
         sleep 1000 & echo $! >> {kids}; exit 1",
        kids = kids.display(),
        alive = alive.display()
    );
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}\n[workers.leaky]\ncommand = {}\nstop_grace = \"300ms\"\n\
             backoff = {{ initial = \"50ms\", multiplier = 1.0, max = \"50ms\" }}\n\
             crash_loop = {{ min_uptime = \"10s\", max_failures = 3 }}\n",
            sh(&script)
        ),
    );
    let sup = Supervisor::start(&sb);
    sup.wait_for("the worker to be parked", SECS_10, |v| instance(v, "leaky", 0)["state"] == "parked");
    assert_eq!(
        sb.lines("alive.log"),
        ["0", "0", "0"],
        "a restart ran beside the children of an earlier start"
    );
    let kids: Vec<i32> = sb.lines("kids.log").iter().map(|l| l.parse().unwrap()).collect();
    assert_eq!(kids.len(), 3);
    for k in kids {
        assert!(stat(k).is_none_or(|s| s.state == 'Z' && s.ppid != sup.pid), "child {k} is still there");
    }
    assert_eq!(sb.processes().len(), 1, "only drover is left: {:?}", sb.processes());
}

#[test]
fn orphaned_grandchildren_are_reaped_by_drover() {
    let sb = Sandbox::new();
    // `burst` orphans five sleeps that outlive their parent a while;
    // `steady` keeps orphaning short-lived ones.
    let burst = format!(
        "i=0; while [ $i -lt 5 ]; do (sleep 0.5 &); i=$((i+1)); done; echo forked >> {}; exec sleep 1000",
        sb.path("burst.log").display()
    );
    let steady = format!(
        "while :; do (sleep 0.02 &); echo x >> {}; sleep 0.05; done",
        sb.path("steady.log").display()
    );
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}\n[workers.burst]\ncommand = {}\n[workers.steady]\ncommand = {}\n",
            sh(&burst),
            sh(&steady)
        ),
    );
    let sup = Supervisor::start(&sb);
    let drover = sup.pid;
    let orphans = |arg: &str| -> Vec<i32> {
        sb.processes().into_iter().filter(|(_, c)| c == arg).map(|(p, _)| p).collect()
    };
    // The orphans of `burst` are re-parented to drover, not to init.
    let seen = wait_until("the orphans of burst", SECS_10, || {
        let o = orphans("sleep 0.5");
        (o.len() == 5).then_some(o)
    });
    for p in &seen {
        assert_eq!(stat(*p).unwrap().ppid, drover, "orphan {p} was not re-parented to drover");
    }
    wait_until("the orphans of burst to end", SECS_10, || orphans("sleep 0.5").is_empty().then_some(()));
    sb.wait_lines("steady.log", 15, SECS_10);

    // No zombie child of drover stays: one may exist for an instant between
    // its exit and drover's reaping, so look until a moment with none.
    let zombies = || -> Vec<i32> {
        all_pids()
            .into_iter()
            .filter(|&p| stat(p).is_some_and(|s| s.state == 'Z' && s.ppid == drover))
            .collect()
    };
    wait_until("no zombie child of drover", Duration::from_secs(3), || zombies().is_empty().then_some(()));
    for p in seen {
        assert!(stat(p).is_none(), "orphan {p} is still in /proc");
    }
    assert_eq!(sup.status()["supervisor"]["state"], "running");
}

#[test]
fn sigterm_stops_every_worker_in_parallel_and_exits_0() {
    let sb = Sandbox::new();
    let mut cfg = format!("{SUPERVISOR}\n[defaults]\nstop_grace = \"500ms\"\n");
    for n in 0..5 {
        let script = format!("trap '' TERM; echo $$ >> {}; exec sleep 1000", sb.path("pids.log").display());
        cfg.push_str(&format!("[workers.w{n}]\ncommand = {}\n", sh(&script)));
    }
    sb.write("daemon.toml", cfg);
    let mut sup = Supervisor::start(&sb);
    let workers = recorded(&sb, "pids.log", 5);

    let t = Instant::now();
    sup.signal(Signal::SIGTERM);
    let exit = sup.wait_exit(SECS_10).expect("drover did not exit after SIGTERM");
    let took = t.elapsed();
    assert_eq!(exit.code(), Some(0), "{}", sup.stderr());
    assert!(took >= Duration::from_millis(450), "took {took:?}: the grace was not waited out");
    assert!(took < Duration::from_secs(2), "took {took:?}: 5 stops of 500ms grace were not run in parallel");
    for w in workers {
        assert!(!w.running(), "worker {w:?} survived");
    }
    let state = read_state(&sb);
    assert_eq!(state["supervisor"]["state"], "stopped", "{state}");
    for w in state["workers"].as_array().unwrap() {
        assert_eq!(w["instances"][0]["state"], "stopped", "{w}");
        assert_eq!(w["instances"][0]["pid"], Value::Null, "{w}");
    }
    assert!(!sb.state_dir().join("drover.sock").exists(), "the socket is left");
    let (code, v) = sb.status_json();
    assert_eq!(code, Some(3));
    assert_eq!(v["supervisor"]["state"], "stopped");
}

#[test]
fn a_second_signal_kills_at_once() {
    let sb = Sandbox::new();
    let script = format!("trap '' TERM INT; echo $$ >> {}; exec sleep 1000", sb.path("pid.log").display());
    sb.write(
        "daemon.toml",
        format!("{SUPERVISOR}\n[workers.stubborn]\nstop_grace = \"60s\"\ncommand = {}\n", sh(&script)),
    );
    let mut sup = Supervisor::start(&sb);
    let worker = recorded(&sb, "pid.log", 1)[0];
    sup.signal(Signal::SIGINT);
    sup.wait_for("the instance to be stopping", SECS_10, |v| {
        instance(v, "stubborn", 0)["state"] == "stopping"
    });
    let t = Instant::now();
    sup.signal(Signal::SIGTERM);
    let exit = sup.wait_exit(SECS_10).expect("drover did not exit after a second signal");
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    assert_eq!(exit.code(), Some(0));
    assert!(!worker.running());
}

#[test]
fn stop_uses_the_stop_signal_and_wakes_a_stopped_process() {
    let sb = Sandbox::new();
    // `polite` ignores SIGTERM but ends on its stop_signal, SIGUSR1; `frozen`
    // will be SIGSTOPped, and needs the SIGCONT drover sends with the signal.
    let polite = format!(
        "trap 'echo got-usr1 >> {got}; exit 0' USR1; trap '' TERM; echo $$ >> {pid}; while :; do sleep 0.05; done",
        got = sb.path("got.log").display(),
        pid = sb.path("polite.log").display()
    );
    let frozen = format!("echo $$ >> {}; exec sleep 1000", sb.path("frozen.log").display());
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}\n[defaults]\nstop_grace = \"20s\"\n\
             [workers.polite]\nstop_signal = \"SIGUSR1\"\ncommand = {}\n[workers.frozen]\ncommand = {}\n",
            sh(&polite),
            sh(&frozen)
        ),
    );
    let mut sup = Supervisor::start(&sb);
    recorded(&sb, "polite.log", 1);
    let frozen = recorded(&sb, "frozen.log", 1)[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(frozen.pid), Signal::SIGSTOP).unwrap();
    wait_until("the worker to be stopped", SECS_10, || (stat(frozen.pid)?.state == 'T').then_some(()));

    let t = Instant::now();
    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(t.elapsed() < Duration::from_secs(5), "stop took {:?}: it waited for the grace", t.elapsed());
    assert_eq!(sb.lines("got.log"), ["got-usr1"]);
    assert!(!frozen.running());
    assert!(sup.wait_exit(Duration::from_secs(5)).is_some());
    let state = read_state(&sb);
    assert_eq!(instance(&state, "polite", 0)["last_exit"]["code"], 0, "{state}");
    assert_eq!(instance(&state, "frozen", 0)["last_exit"]["signal"], "SIGTERM", "{state}");
}

#[test]
fn a_hundred_instances_start_and_stop_together() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!("{SUPERVISOR}\n[workers.many]\ncapacity = 100\nstop_grace = \"5s\"\ncommand = [\"sleep\", \"1000\"]\n"),
    );
    let mut sup = Supervisor::start(&sb);
    let v = sup.wait_for("100 running", SECS_10, |v| {
        v["workers"][0]["instances"].as_array().unwrap().iter().filter(|i| i["state"] == "running").count()
            == 100
    });
    assert_eq!(pgids(&v).len(), 100);
    assert_eq!(sb.processes().iter().filter(|(_, c)| c == "sleep 1000").count(), 100);
    let t = Instant::now();
    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(t.elapsed() < Duration::from_secs(3), "stopping 100 sleeps took {:?}", t.elapsed());
    assert!(sup.wait_exit(Duration::from_secs(5)).is_some());
    assert_eq!(sb.processes(), Vec::new());
}

#[test]
fn a_grandchild_that_leaves_its_group_does_not_survive_the_stop() {
    // DESIGN: "No zombie and no orphaned grandchild survives a stop, a
    // restart or drover's own shutdown." A daemonizing grandchild leaves
    // the group with setsid; its parent exits, so it is orphaned and (drover
    // being a subreaper) becomes drover's child.
    let sb = Sandbox::new();
    let script = format!("setsid sleep 1002 & echo $$ >> {}; exec sleep 1000", sb.path("pid.log").display());
    sb.write(
        "daemon.toml",
        format!("{SUPERVISOR}\n[workers.daemonizer]\nstop_grace = \"300ms\"\ncommand = {}\n", sh(&script)),
    );
    let mut sup = Supervisor::start(&sb);
    recorded(&sb, "pid.log", 1);
    let escaped = wait_until("the setsid grandchild", SECS_10, || {
        sb.processes().into_iter().find(|(_, c)| c == "sleep 1002").and_then(|(p, _)| ProcId::of(p))
    });
    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(sup.wait_exit(Duration::from_secs(5)).is_some());
    assert!(!escaped.running(), "the grandchild that left its group outlived drover: {:?}", sb.processes());
}
