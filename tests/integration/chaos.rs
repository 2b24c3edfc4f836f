//! Chaos: a supervisor under random faults, with its promises checked after
//! every step.
//!
//! Workers crash at random, exit 78, ignore SIGTERM, fork grandchildren and
//! flood output; jobs tick fast. Meanwhile the test rewrites the config
//! (valid and invalid, atomically and in place), sends SIGHUP, calls
//! `reload`, `restart`, `stop` and `start` (of workers and of single
//! instances), `unpark`, `trigger`, `bg`, `runs cancel`, SIGKILLs worker
//! processes, and SIGKILLs drover itself and starts a new one. After each
//! step it checks: the workers and instances are what the last valid config
//! asks for (an instance stopped by hand may be stopped); no instance runs twice; no process of the test is outside a
//! group drover knows; drover leaves no zombie; the ledger passes SQLite's
//! integrity check, no terminal run changes state and no run step ran
//! twice. After the final stop not one process of the test remains.
//!
//! `DROVER_CHAOS_SECS` (default 15) sets the length, `DROVER_CHAOS_SEED` the
//! seed; a failure prints the seed (the test's output is shown on failure):
//!
//!     DROVER_CHAOS_SECS=600 DROVER_CHAOS_SEED=42 \
//!         cargo test --release --test integration chaos -- --nocapture

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::harness::{Sandbox, Supervisor, all_pids, sh, stat, wait_until};

/// splitmix64: tiny, seedable, good enough to pick actions.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub(super) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub(super) fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len() as u64) as usize])
    }
}

/// The worker kinds, each a fault drover must survive.
const KINDS: &[(&str, &str)] = &[
    ("steady", "exec sleep 1000"),
    ("crasher", "sleep 0.3; exit 3"),
    ("quitter", "sleep 0.1; exit 78"),
    ("stubborn", "trap '' TERM; while :; do sleep 0.2; done"),
    ("forker", "sleep 1000 & sleep 1000 & wait"),
    ("flooder", "while :; do seq 1 300; sleep 0.02; done"),
];

/// One valid config: which workers, their capacity and an env token
/// (changing it restarts the worker), and the job settings.
#[derive(Clone, Debug)]
struct Desired {
    workers: BTreeMap<&'static str, (u32, u64)>,
    tick_every_ms: u64,
    tick_overlap: &'static str,
    tick_capacity: u32,
    /// Makes every config differ, so each one applied is a new generation.
    serial: u64,
}

impl Desired {
    fn random(rng: &mut Rng, serial: u64) -> Self {
        let mut workers = BTreeMap::new();
        for (name, _) in KINDS {
            if rng.chance(75) {
                workers.insert(*name, (1 + rng.below(3) as u32, rng.below(2)));
            }
        }
        Desired {
            workers,
            tick_every_ms: 200 + 100 * rng.below(4),
            tick_overlap: rng.pick(&["skip", "queue", "replace"]).unwrap(),
            tick_capacity: 1 + rng.below(2) as u32,
            serial,
        }
    }

    fn toml(&self, sb: &Sandbox) -> String {
        let markers = sb.path("markers");
        let mark = format!("echo \"$DROVER_RUN $DROVER_STEP\" >> {}", markers.display());
        let mut t = String::from(
            "[supervisor]\nreload = true\ndebounce = \"20ms\"\nlog_max_size = \"64KiB\"\nlog_keep = 1\n\
             [defaults]\nstop_grace = \"300ms\"\n\
             backoff = { initial = \"50ms\", max = \"500ms\" }\n\
             crash_loop = { min_uptime = \"1s\", max_failures = 4 }\n",
        );
        for (name, (capacity, token)) in &self.workers {
            let script = KINDS.iter().find(|(k, _)| k == name).unwrap().1;
            let _ = write!(
                t,
                "[workers.{name}]\ncommand = {}\ncapacity = {capacity}\nenv = {{ TOKEN = \"{token}\" }}\n",
                sh(script)
            );
        }
        let _ = write!(
            t,
            "[jobs.tick]\ncommand = {}\nevery = \"{}ms\"\non_overlap = \"{}\"\ncapacity = {}\n\
             timeout = \"2s\"\nretain = 20\nenv = {{ SERIAL = \"{}\" }}\n",
            sh(&format!("{mark}; sleep 0.25")),
            self.tick_every_ms,
            self.tick_overlap,
            self.tick_capacity,
            self.serial
        );
        let _ = write!(
            t,
            "[jobs.slow]\ncommand = {}\ncapacity = 2\non_overlap = \"queue\"\nretain = 20\n",
            sh(&format!("{mark}; sleep 5"))
        );
        let _ = write!(
            t,
            "[jobs.flow]\nretain = 20\n[[jobs.flow.steps]]\nname = \"one\"\ncommand = {}\n\
             [[jobs.flow.steps]]\nname = \"two\"\ncommand = {}\n",
            sh(&format!("{mark}; sleep 0.1")),
            sh(&format!("{mark}; sleep 0.2"))
        );
        t
    }
}

const INVALID: &[&str] = &[
    "[workers.steady\ncommand = [\"sleep\"]\n",
    "[workers.steady]\ncommand = [\"sleep\", \"1000\"]\ncapacity = 0\n",
    "[workers.steady]\ncomand = [\"sleep\", \"1000\"]\n",
    "[jobs.tick]\ncommand = [\"true\"]\nschedule = \"61 * * * *\"\n",
];

/// Writes the config atomically (temp file, rename) or in place.
fn write_config(sb: &Sandbox, rng: &mut Rng, text: &str, log: &mut Log) {
    if rng.chance(50) {
        let tmp = sb.path("daemon.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, sb.path("daemon.toml")).unwrap();
        log.say("  written atomically");
    } else {
        std::fs::write(sb.path("daemon.toml"), text).unwrap();
        log.say("  written in place");
    }
}

/// The actions so far, printed as they happen (shown when the test fails).
pub(super) struct Log {
    pub(super) seed: u64,
    pub(super) step: usize,
}

impl Log {
    pub(super) fn say(&self, what: &str) {
        eprintln!("[chaos seed {} step {}] {what}", self.seed, self.step);
    }
    pub(super) fn fail(&self, what: &str) -> ! {
        panic!(
            "chaos invariant broken at step {} (reproduce with DROVER_CHAOS_SEED={}): {what}",
            self.step, self.seed
        );
    }
}

pub(super) fn seed() -> u64 {
    std::env::var("DROVER_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    })
}

#[test]
fn chaos_keeps_every_promise() {
    let seed = seed();
    let secs: u64 = std::env::var("DROVER_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    eprintln!("chaos: seed {seed}, {secs} s (DROVER_CHAOS_SEED={seed} reproduces this run)");
    let mut rng = Rng(seed);
    let mut log = Log { seed, step: 0 };
    let sb = Sandbox::new();
    let mut desired = Desired::random(&mut rng, 0);
    sb.write("daemon.toml", desired.toml(&sb));
    let mut sup = Supervisor::start(&sb);
    let mut terminal: BTreeMap<i64, String> = BTreeMap::new();
    let mut serial = 0;
    let end = Instant::now() + Duration::from_secs(secs);
    check(&sb, &sup, &desired, &mut terminal, &log);

    while Instant::now() < end {
        log.step += 1;
        let status = sup.status();
        let names: Vec<String> = desired.workers.keys().map(|s| s.to_string()).collect();
        match rng.below(100) {
            0..25 => {
                serial += 1;
                desired = Desired::random(&mut rng, serial);
                log.say(&format!("new config {desired:?}"));
                write_config(&sb, &mut rng, &desired.toml(&sb), &mut log);
                match rng.below(3) {
                    0 => log.say("  left to the watcher"),
                    1 => {
                        log.say("  SIGHUP");
                        sup.signal(Signal::SIGHUP);
                    }
                    _ => {
                        log.say("  drover reload");
                        let r = sb.cli(&["reload"]);
                        if r.code != Some(0) {
                            log.fail(&format!("reload of a valid config failed: {}", r.stderr));
                        }
                    }
                }
                // Applied once `plan` sees no difference from the file.
                wait_until("the new config to be applied", Duration::from_secs(10), || {
                    (sb.cli(&["plan"]).code == Some(0)).then_some(())
                });
            }
            25..35 => {
                let bad = rng.pick(INVALID).unwrap();
                log.say(&format!("invalid config {bad:?}"));
                write_config(&sb, &mut rng, bad, &mut log);
                let r = sb.cli(&["reload"]);
                if r.code != Some(1) {
                    log.fail(&format!("reload of an invalid config exited {:?}", r.code));
                }
                let v = sup.status();
                if v["supervisor"]["last_reload"]["ok"] != false {
                    log.fail(&format!("status does not show the failed reload: {}", v["supervisor"]));
                }
                check(&sb, &sup, &desired, &mut terminal, &log);
                log.say("  good config back");
                write_config(&sb, &mut rng, &desired.toml(&sb), &mut log);
                wait_until("the good config to be read again", Duration::from_secs(10), || {
                    (sb.cli(&["plan"]).code == Some(0)).then_some(())
                });
            }
            35..45 => {
                if let Some(n) = rng.pick(&names) {
                    // An instance by hand half the time: stop (held), start, or restart it.
                    let cap = desired.workers[n.as_str()].0;
                    let target = if rng.below(2) == 0 || cap == 0 {
                        n.clone()
                    } else {
                        format!("{n}:{}", rng.below(cap as u64))
                    };
                    let cmd = *rng.pick(&["restart", "restart", "stop", "start"]).unwrap();
                    log.say(&format!("{cmd} {target}"));
                    let r = sb.cli(&[cmd, &target]);
                    // A start may meet a crashing worker: then it exits 1 naming it.
                    let started_into_a_crash =
                        cmd == "start" && r.code == Some(1) && r.stderr.contains(n.as_str());
                    if r.code != Some(0) && !started_into_a_crash {
                        log.fail(&format!("{cmd} {target}: exit {:?}: {}", r.code, r.stderr));
                    }
                }
            }
            45..52 => {
                if let Some(n) = rng.pick(&names) {
                    log.say(&format!("unpark {n}"));
                    sb.cli(&["unpark", n]);
                }
            }
            52..64 => {
                let job = *rng.pick(&["tick", "slow", "flow"]).unwrap();
                log.say(&format!("trigger {job}"));
                let r = sb.cli(&["trigger", job]);
                // At capacity, "skip" refuses the run: that is the config speaking.
                if r.code != Some(0) && !r.stderr.contains("skipped") {
                    log.fail(&format!("trigger {job}: {}", r.stderr));
                }
            }
            64..74 => {
                let active = active_runs(&sb);
                if let Some(id) = rng.pick(&active) {
                    log.say(&format!("runs cancel {id}"));
                    sb.cli(&["runs", "cancel", &id.to_string()]);
                }
            }
            74..86 => {
                let pids = instance_pids(&status);
                if let Some(pid) = rng.pick(&pids) {
                    log.say(&format!("kill -9 worker process {pid}"));
                    let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
                }
            }
            86..89 => {
                log.say("SIGHUP, nothing changed");
                sup.signal(Signal::SIGHUP);
            }
            89..92 => {
                let script =
                    format!("echo \"$DROVER_RUN session\" >> {}; sleep 1", sb.path("markers").display());
                log.say("bg session");
                let r = sb.cli(&["bg", "--", "sh", "-c", &script]);
                if r.code != Some(0) {
                    log.fail(&format!("bg: {}", r.stderr));
                }
            }

            _ => {
                log.say(&format!("SIGKILL drover (pid {}) and start a new one", sup.pid));
                sup.sigkill();
                let old = std::mem::replace(&mut sup, Supervisor::start(&sb));
                // The new supervisor must have stopped what the old one
                // left; check before the old guard's clean-up could hide it.
                check(&sb, &sup, &desired, &mut terminal, &log);
                drop(old);
                for r in all_runs(&sb) {
                    if r["state"] == "running"
                        && r["owner"]["pid"].as_i64().is_some_and(|p| p != sup.pid as i64)
                    {
                        log.fail(&format!("run {} still running under the dead supervisor: {r}", r["id"]));
                    }
                }
            }
        }
        check(&sb, &sup, &desired, &mut terminal, &log);
    }

    log.say("final stop");
    sup.signal(Signal::SIGTERM);
    let st =
        sup.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| log.fail("drover did not stop within 30 s"));
    if st.code() != Some(0) {
        log.fail(&format!("drover exited {st} on SIGTERM"));
    }
    let left = sb.processes();
    if !left.is_empty() {
        log.fail(&format!("processes left after the final stop: {left:?}"));
    }
    eprintln!("chaos: {} steps, seed {seed}: every invariant held", log.step);
}

pub(super) fn instance_pids(status: &Value) -> Vec<i32> {
    status["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|w| w["instances"].as_array().into_iter().flatten())
        .filter_map(|i| i["pid"].as_i64().map(|p| p as i32))
        .collect()
}

fn all_runs(sb: &Sandbox) -> Vec<Value> {
    let r = sb.cli(&["runs", "--json"]);
    serde_json::from_str::<Value>(&r.stdout)
        .unwrap_or_else(|e| panic!("runs --json: {e}: {}{}", r.stdout, r.stderr))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn active_runs(sb: &Sandbox) -> Vec<i64> {
    all_runs(sb)
        .iter()
        .filter(|r| matches!(r["state"].as_str(), Some("queued" | "running" | "waiting")))
        .filter_map(|r| r["id"].as_i64())
        .collect()
}

/// The process groups drover knows: its instances' and its active runs'.
pub(super) fn known_groups(sb: &Sandbox, sup: &Supervisor) -> BTreeSet<i32> {
    let mut groups: BTreeSet<i32> = instance_pids(&sup.status()).into_iter().collect();
    for r in all_runs(sb) {
        if let Some(g) = r["pgid"].as_i64().or(r["pid"].as_i64()) {
            groups.insert(g as i32);
        }
    }
    groups
}

/// `DROVER_WORKER` and `DROVER_INSTANCE` of a process, from its environment.
fn instance_of(pid: i32) -> Option<(String, String)> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let var = |name: &str| {
        env.split(|b| *b == 0).find_map(|kv| {
            kv.strip_prefix(format!("{name}=").as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned())
        })
    };
    Some((var("DROVER_WORKER")?, var("DROVER_INSTANCE")?))
}

fn check(sb: &Sandbox, sup: &Supervisor, desired: &Desired, terminal: &mut BTreeMap<i64, String>, log: &Log) {
    // 1. The workers and instances the last valid config asks for, each in
    //    a settled state (backoff and parked are allowed: faults happen).
    let settled = |v: &Value| -> Result<(), String> {
        let ws = v["workers"].as_array().ok_or("no workers array")?;
        let have: BTreeMap<&str, &Value> = ws.iter().filter_map(|w| Some((w["name"].as_str()?, w))).collect();
        let want: BTreeSet<&str> = desired.workers.keys().copied().collect();
        if have.keys().copied().collect::<BTreeSet<_>>() != want {
            return Err(format!("workers {:?}, want {want:?}", have.keys()));
        }
        for (name, (capacity, _)) in &desired.workers {
            let insts = have[name]["instances"].as_array().ok_or("no instances")?;
            let idx: Vec<u64> = insts.iter().filter_map(|i| i["index"].as_u64()).collect();
            if idx != (0..*capacity as u64).collect::<Vec<_>>() {
                return Err(format!("{name}: instances {idx:?}, capacity {capacity}"));
            }
            for i in insts {
                let s = i["state"].as_str().unwrap_or("?");
                let held = s == "stopped" && i["held"] == true;
                if !held && !matches!(s, "starting" | "running" | "backoff" | "parked") {
                    return Err(format!("{name}[{}] is {s}", i["index"]));
                }
            }
        }
        Ok(())
    };
    wait_settled(sup, log, settled);

    // 2. No instance twice: one process group per (worker, index).
    let mut groups: BTreeMap<(String, String), BTreeSet<i32>> = BTreeMap::new();
    for (pid, _) in sb.processes() {
        if let (Some(key), Some(st)) = (instance_of(pid), stat(pid)) {
            groups.entry(key).or_default().insert(st.pgid);
        }
    }
    if let Some((k, g)) = groups.iter().find(|(_, g)| g.len() > 1) {
        log.fail(&format!("instance {k:?} runs in {} process groups at once: {g:?}", g.len()));
    }

    check_no_strays(sb, sup, log);
    check_no_zombies(sup, log);

    // 5. The ledger: intact, terminal states final, no step run twice.
    check_ledger(&sb.state_dir().join("ledger.sqlite"), terminal, log);
    let markers = std::fs::read_to_string(sb.path("markers")).unwrap_or_default();
    let mut seen = BTreeSet::new();
    for line in markers.lines() {
        if !seen.insert(line) {
            log.fail(&format!("run step {line:?} started twice"));
        }
    }
}

/// Polls status until `settled` accepts it (15 s at most).
pub(super) fn wait_settled(sup: &Supervisor, log: &Log, settled: impl Fn(&Value) -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = sup.status();
        match settled(&v) {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => log.fail(&format!("running set: {e}\nstatus: {v:#}")),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// 3. No process of the test outside a group drover knows. A process
///    caught between two reports (just started, or just stopped) is
///    polled until it is gone or its group is known (2 s at most).
pub(super) fn check_no_strays(sb: &Sandbox, sup: &Supervisor, log: &Log) {
    let before = known_groups(sb, sup);
    let procs = sb.processes();
    let after = known_groups(sb, sup);
    let suspects: Vec<(i32, u64, i32)> = procs
        .iter()
        .filter(|(p, _)| *p != sup.pid)
        .filter_map(|(p, _)| stat(*p).map(|s| (*p, s)))
        // The test's own clients (drover supervisors and followers) are not drover's.
        .filter(|(_, s)| s.ppid != std::process::id() as i32)
        .map(|(p, s)| (p, s.start, s.pgid))
        .filter(|(_, _, g)| !before.contains(g) && !after.contains(g))
        .collect();
    // Each suspect must be gone or in a known group within 2 s.
    let deadline = Instant::now() + Duration::from_secs(2);
    for (pid, start, pgid) in suspects {
        loop {
            let alive = stat(pid).is_some_and(|s| s.start == start && s.state != 'Z');
            let known = known_groups(sb, sup);
            if !alive || known.contains(&pgid) {
                break;
            }
            if Instant::now() > deadline {
                log.fail(&format!(
                    "process {pid} ({}) in group {pgid}, which drover does not know; known: {known:?}",
                    crate::harness::cmdline(pid)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// 4. No zombie child of drover outlives a moment.
pub(super) fn check_no_zombies(sup: &Supervisor, log: &Log) {
    let zombies = || -> Vec<i32> {
        all_pids()
            .into_iter()
            .filter(|p| stat(*p).is_some_and(|s| s.ppid == sup.pid && s.state == 'Z'))
            .collect()
    };
    if !zombies().is_empty() {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !zombies().is_empty() {
            if Instant::now() > deadline {
                log.fail(&format!("drover leaves zombies: {:?}", zombies()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn check_ledger(path: &Path, terminal: &mut BTreeMap<i64, String>, log: &Log) {
    let conn = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| log.fail(&format!("cannot open the ledger: {e}")));
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    if ok != "ok" {
        log.fail(&format!("ledger integrity check: {ok}"));
    }
    let mut q = conn.prepare("SELECT id, state FROM runs").unwrap();
    let rows: Vec<(i64, String)> =
        q.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<Result<_, _>>().unwrap();
    let live: BTreeSet<i64> = rows.iter().map(|(id, _)| *id).collect();
    for (id, state) in rows {
        let is_terminal = matches!(state.as_str(), "succeeded" | "failed" | "cancelled");
        match terminal.get(&id) {
            Some(was) if *was != state => {
                log.fail(&format!("run {id} left its terminal state {was} for {state}"))
            }
            None if is_terminal => {
                terminal.insert(id, state);
            }
            _ => {}
        }
    }
    // Pruned runs are gone for good; forget them.
    terminal.retain(|id, _| live.contains(id));
}
