//! Chaos for readiness, dependencies, sockets and launch settings: a
//! supervisor under random faults, its promises checked after every step.
//!
//! Workers have every kind of ready probe (a log line, an exec probe, one
//! that never passes) and a health probe that flaps; a worker with a socket
//! serves a client that asks in a loop; dependency graphs are rewritten at
//! random (reordered, added, dropped) and cycles are written too, which must
//! be refused and change nothing; an env file and a limit change under a
//! running worker. Meanwhile the test kills instances, restarts the socket
//! worker, connects `drover events` followers that read, lag (never read)
//! and vanish, and top-like viewers (events, `status --json` and a scrape
//! of `/metrics` in a loop) that come and go, and SIGKILLs drover
//! mid-rollout with a surge instance alive.
//!
//! After each step: `/metrics` answers with a whole exposition; every
//! worker is in a settled state; no worker has more
//! process groups alive than its capacity, plus one (the surge) when it has
//! sockets; the socket's port accepts a connection; no dependent started
//! before its dependency met the condition (each dependent checks, as it
//! starts, the marks its dependencies leave once ready or succeeded); the
//! worker reading the env file runs with its current value and the
//! configured open-files limit; nothing runs outside a group drover knows;
//! no zombie lingers. At the end: no viewer got a wrong answer (one cut
//! by drover's SIGKILL is not wrong), the client saw no failed request (it is
//! paused only while drover itself is SIGKILLed), the final stop stopped
//! each dependent before its dependencies, and nothing is left.
//!
//! `DROVER_CHAOS_SECS` (default 15) and `DROVER_CHAOS_SEED` as for `chaos`:
//!
//!     DROVER_CHAOS_SECS=600 DROVER_CHAOS_SEED=42 \
//!         cargo test --release --test integration chaos_ready -- --nocapture

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use super::chaos::{Log, Rng, check_no_strays, check_no_zombies, instance_pids, seed, wait_settled};
use super::sockets::{ask, free_port};
use crate::harness::{Sandbox, Supervisor, cmdline, repo, sh, stat, wait_until, worker};

/// The plain workers: each may depend on the others; `web` (the socket
/// worker) depends on nothing, so that its client is always answered.
const PLAIN: &[&str] = &["db", "api", "flappy", "never"];

/// What a dependent may wait for, and whether the test can check it (a
/// mark left before drover can see the condition met). `started` cannot
/// be: drover sees a spawn before the script runs.
fn conditions(dep: &str) -> &'static [&'static str] {
    match dep {
        "migrate" => &["succeeded"],
        "web" => &["started"],
        _ => &["started", "ready"],
    }
}

#[derive(Clone, Debug)]
struct Desired {
    /// Worker name to (capacity, env token). `web` is always present.
    workers: BTreeMap<&'static str, (u32, u64)>,
    /// Dependent to its dependencies with their conditions.
    deps: BTreeMap<&'static str, Vec<(&'static str, &'static str)>>,
    /// The open-files limit of `api`.
    nofile: u64,
    /// A cycle, when the config is meant to be refused.
    cycle: bool,
}

impl Desired {
    fn random(rng: &mut Rng) -> Self {
        let mut workers = BTreeMap::new();
        workers.insert("web", (1 + rng.below(2) as u32, rng.below(3)));
        for name in PLAIN {
            if rng.chance(75) {
                workers.insert(*name, (1 + rng.below(2) as u32, rng.below(3)));
            }
        }
        // A random order; each worker may depend on those before it (and
        // the migrate job): acyclic by construction.
        let mut order: Vec<&'static str> = workers.keys().copied().filter(|n| *n != "web").collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut deps: BTreeMap<&'static str, Vec<(&'static str, &'static str)>> = BTreeMap::new();
        for (i, name) in order.iter().enumerate() {
            let mut before: Vec<&'static str> = order[..i].to_vec();
            before.extend(["web", "migrate"]);
            for dep in before {
                if rng.chance(30) {
                    let cond = *rng.pick(conditions(dep)).unwrap();
                    deps.entry(name).or_default().push((dep, cond));
                }
            }
        }
        Desired { workers, deps, nofile: *rng.pick(&[256, 512, 1024]).unwrap(), cycle: false }
    }

    /// The same config with a cycle through two plain workers: refused.
    fn with_cycle(&self, rng: &mut Rng) -> Self {
        let mut d = self.clone();
        let (a, b) = if rng.chance(50) { ("db", "api") } else { ("api", "flappy") };
        d.workers.entry(a).or_insert((1, 0));
        d.workers.entry(b).or_insert((1, 0));
        for (x, y) in [(a, b), (b, a)] {
            let deps = d.deps.entry(x).or_default();
            deps.retain(|(dep, _)| *dep != y);
            deps.push((y, "started"));
        }
        d.cycle = true;
        d
    }

    fn depends_on(&self, name: &str) -> String {
        let Some(deps) = self.deps.get(name) else { return String::new() };
        let pairs: Vec<String> = deps.iter().map(|(d, c)| format!("{d} = \"{c}\"")).collect();
        format!("depends_on = {{ {} }}\n", pairs.join(", "))
    }

    /// The script of a plain worker: it checks the marks of what it
    /// depends on, leaves its own, and records the SIGTERM that stops it.
    fn script(&self, sb: &Sandbox, name: &str) -> String {
        let marks = sb.path("marks");
        let mut s = format!(
            "trap 'echo \"{name} $(date +%s%N)\" >> {stops}; exit 0' TERM\n",
            stops = sb.path("stops").display()
        );
        for (dep, cond) in self.deps.get(name).into_iter().flatten() {
            if *cond != "started" {
                let _ = writeln!(
                    s,
                    "test -e {m}/{dep}.$PPID.{cond} || echo \"{name} started before {dep} was {cond} \
                     (drover $PPID)\" >> {v}",
                    m = marks.display(),
                    v = sb.path("violations").display()
                );
            }
        }
        // The mark first, then the line the log probe waits for.
        let _ = write!(
            s,
            "sleep 0.1\ntouch {m}/{name}.$PPID.ready\necho up\nsleep 1000 & wait\n",
            m = marks.display()
        );
        s
    }

    fn toml(&self, sb: &Sandbox, port: u16) -> String {
        let mut t = String::from(
            "[supervisor]\nreload = true\ndebounce = \"20ms\"\nmetrics = \"127.0.0.1:METRICS_PORT\"\n\
             [defaults]\nstop_grace = \"2s\"\n\
             backoff = { initial = \"50ms\", max = \"500ms\" }\n\
             crash_loop = { min_uptime = \"1s\", max_failures = 4 }\n",
        );
        for (name, (capacity, token)) in &self.workers {
            let _ = write!(t, "\n[workers.{name}]\ncapacity = {capacity}\nenv = {{ TOKEN = \"{token}\" }}\n");
            t.push_str(&self.depends_on(name));
            let marks = sb.path("marks");
            match *name {
                "web" => {
                    let server = repo().join("config/socket_server.py");
                    let script = format!("exec python3 {} --init 0.1", server.display());
                    let _ = write!(
                        t,
                        "command = {}\nsockets = [\"tcp://127.0.0.1:{port}\"]\nready = {{ log = \"serving\" }}\n\
                         backoff = {{ initial = \"10ms\", max = \"100ms\" }}\n\
                         crash_loop = {{ min_uptime = \"1s\", max_failures = 1000000 }}\n",
                        sh(&script)
                    );
                }
                "flappy" => {
                    // Ready once its mark is there; healthy two seconds in three.
                    let _ = write!(
                        t,
                        "command = {}\nready = {{ exec = {}, interval = \"50ms\" }}\n\
                         health = {{ exec = {}, interval = \"200ms\", failures = 2 }}\n",
                        sh(&self.script(sb, name)),
                        sh(&format!("test -e {}/flappy.$PPID.ready", marks.display())),
                        sh("test $(( $(date +%s) % 3 )) != 0")
                    );
                }
                "never" => {
                    let _ = write!(
                        t,
                        "command = {}\nready = {{ exec = [\"false\"], interval = \"50ms\", start_timeout = \"300ms\" }}\n",
                        sh(&self.script(sb, name))
                    );
                }
                "api" => {
                    let _ = write!(
                        t,
                        "command = {}\nready = {{ log = \"^up$\" }}\nenv_file = [\"api.env\"]\n\
                         limits = {{ nofile = {} }}\n",
                        sh(&self.script(sb, name)),
                        self.nofile
                    );
                }
                _ => {
                    let _ =
                        write!(t, "command = {}\nready = {{ log = \"^up$\" }}\n", sh(&self.script(sb, name)));
                }
            }
        }
        t = t.replace("METRICS_PORT", &metrics_port().to_string());
        let _ = write!(
            t,
            "\n[jobs.migrate]\ncommand = {}\nretain = 20\n",
            sh(&format!("sleep 0.05; touch {}/migrate.$PPID.succeeded", sb.path("marks").display()))
        );
        t
    }
}

/// Writes the config atomically or in place, and has it applied: by the
/// watcher, SIGHUP or `drover reload`.
fn apply(sb: &Sandbox, sup: &Supervisor, rng: &mut Rng, text: &str, log: &Log) -> Option<i32> {
    if rng.chance(50) {
        let tmp = sb.path("daemon.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, sb.path("daemon.toml")).unwrap();
    } else {
        std::fs::write(sb.path("daemon.toml"), text).unwrap();
    }
    match rng.below(3) {
        0 => {
            log.say("  left to the watcher");
            None
        }
        1 => {
            log.say("  SIGHUP");
            sup.signal(Signal::SIGHUP);
            None
        }
        _ => {
            log.say("  drover reload");
            sb.cli(&["reload"]).code
        }
    }
}

fn wait_applied(sb: &Sandbox) {
    wait_until("the config to be applied", Duration::from_secs(10), || {
        (sb.cli(&["plan"]).code == Some(0)).then_some(())
    });
}

/// The client: asks every 10 ms; `pause` held keeps it from asking.
struct Client {
    stop: Arc<AtomicBool>,
    asked: Arc<AtomicU64>,
    failed: Arc<Mutex<Vec<String>>>,
    pause: Arc<Mutex<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let pause = Arc::new(Mutex::new(()));
        let thread = {
            let (stop, asked, failed, pause) = (stop.clone(), asked.clone(), failed.clone(), pause.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    {
                        let _turn = pause.lock().unwrap_or_else(|e| e.into_inner());
                        asked.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = ask(port) {
                            failed.lock().unwrap().push(format!("{e}"));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Client { stop, asked, failed, pause, thread: Some(thread) }
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (self.asked.load(Ordering::Relaxed), self.failed.lock().unwrap().clone())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `drover events -f --json`, read by a thread or never read at all.
struct Subscriber {
    child: std::process::Child,
    reader: Option<std::thread::JoinHandle<usize>>,
    _unread: Option<std::process::ChildStdout>,
}

impl Subscriber {
    fn start(sb: &Sandbox, reads: bool) -> Self {
        let mut child = sb
            .drover()
            .args(["-c", "daemon.toml", "events", "-f", "--json"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (reader, unread) = if reads {
            let reader = std::thread::spawn(move || {
                use std::io::BufRead;
                std::io::BufReader::new(out).lines().map_while(Result::ok).count()
            });
            (Some(reader), None)
        } else {
            // Never read: the pipe stays open and fills.
            (None, Some(out))
        };
        Subscriber { child, reader, _unread: unread }
    }

    /// Kills it; the lines a reading one got.
    fn end(&mut self) -> usize {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reader.take().and_then(|r| r.join().ok()).unwrap_or(0)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.end();
    }
}

/// The port of drover's `/metrics` in this test, the same across configs.
fn metrics_port() -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(free_port)
}

/// One scrape of `/metrics`: `Ok(None)` when nothing answers (drover is
/// down), `Ok(Some(body))` for a whole exposition, `Err` for any other answer.
fn scrape() -> Result<Option<String>, String> {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", metrics_port())) else { return Ok(None) };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").is_err() {
        return Ok(None);
    }
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        // Reset mid-answer: drover was SIGKILLed under it.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
        Err(e) => return Err(format!("reading the answer: {e}")),
        Ok(_) => {}
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    if out.is_empty() {
        return Ok(None);
    }
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Ok(None); // cut inside the headers: drover died under it
    };
    // Cut inside the body (drover died under it) is not a wrong answer.
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.eq_ignore_ascii_case("content-length") { v.trim().parse::<usize>().ok() } else { None }
    });
    let whole = match length {
        Some(n) => body.len() >= n,
        None => body.ends_with("0\r\n\r\n"),
    };
    if !whole {
        return Ok(None);
    }
    if head.starts_with("HTTP/1.1 200") && body.contains("drover_config_generation ") {
        Ok(Some(body.to_string()))
    } else {
        Err(format!("not a whole exposition: {:?}", &text[..text.len().min(200)]))
    }
}

/// What `drover top` does, without a terminal: it follows `events` and asks
/// for `status --json` in a loop, and this one scrapes `/metrics` as well,
/// until it is told to vanish. Answers that come but are wrong are kept.
struct TopLike {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
    _events: Subscriber,
}

impl TopLike {
    fn start(sb: &Sandbox) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, dir) = (stop.clone(), sb.path("."));
        let thread = std::thread::spawn(move || {
            let mut wrong = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
                    .current_dir(&dir)
                    .env_remove("DROVER_CONFIG")
                    .args(["-c", "daemon.toml", "status", "--json"])
                    .stdin(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .output();
                if let Ok(o) = out
                    && o.status.code() == Some(0)
                    && serde_json::from_slice::<Value>(&o.stdout).is_err()
                {
                    wrong.push(format!(
                        "status --json exited 0 with no JSON: {:?}",
                        String::from_utf8_lossy(&o.stdout)
                    ));
                }
                if let Err(e) = scrape() {
                    wrong.push(e);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            wrong
        });
        TopLike { stop, thread: Some(thread), _events: Subscriber::start(sb, true) }
    }

    /// Stops it; the wrong answers it saw.
    fn end(&mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for TopLike {
    fn drop(&mut self) {
        self.end();
    }
}

/// The live process groups of each worker's instances, from the processes'
/// environment.
fn groups_by_worker(sb: &Sandbox) -> BTreeMap<String, BTreeSet<i32>> {
    let mut out: BTreeMap<String, BTreeSet<i32>> = BTreeMap::new();
    // Exec probes run in the instance's environment, in groups of their
    // own, and so do their children (the health probe's `date`).
    let probe = |cmd: &str| cmd == "false" || cmd.starts_with("/bin/sh -c test ");
    for (pid, _) in sb.processes() {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let name = env.split(|b| *b == 0).find_map(|kv| kv.strip_prefix(b"DROVER_WORKER"));
        let (Some(name), Some(st)) = (name.and_then(|n| n.strip_prefix(b"=")), stat(pid)) else { continue };
        // Read after the environment, which is the worker's only once the
        // program is exec'd: a command line read before may be drover's.
        // A group is a probe's by its leader (gone: by this process).
        let leader = cmdline(st.pgid);
        if probe(&leader) || (leader.is_empty() && probe(&cmdline(pid))) {
            continue;
        }
        out.entry(String::from_utf8_lossy(name).into_owned()).or_default().insert(st.pgid);
    }
    out
}

fn env_of(pid: i32, name: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|kv| {
        kv.strip_prefix(format!("{name}=").as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

fn nofile_of(pid: i32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn check(sb: &Sandbox, sup: &Supervisor, desired: &Desired, port: u16, api_env: &str, log: &Log) {
    // 0. The metrics endpoint answers with a whole exposition.
    match scrape() {
        Ok(Some(_)) => {}
        Ok(None) => log.fail("nothing answers at the metrics address while drover runs"),
        Err(e) => log.fail(&format!("metrics: {e}")),
    }
    // 1. Every worker of the last valid config, each instance settled.
    let settled = |v: &Value| -> Result<(), String> {
        let ws = v["workers"].as_array().ok_or("no workers array")?;
        let have: BTreeSet<&str> = ws.iter().filter_map(|w| w["name"].as_str()).collect();
        let want: BTreeSet<&str> = desired.workers.keys().copied().collect();
        if have != want {
            return Err(format!("workers {have:?}, want {want:?}"));
        }
        for name in want {
            for i in worker(v, name)["instances"].as_array().ok_or("no instances")? {
                let s = i["state"].as_str().unwrap_or("?");
                if !matches!(s, "waiting" | "starting" | "running" | "backoff" | "parked") {
                    return Err(format!("{name}[{}] is {s}", i["index"]));
                }
            }
        }
        Ok(())
    };
    wait_settled(sup, log, settled);

    // 2. Never more groups alive than the capacity, plus the one surge
    //    instance of a worker with sockets.
    for (name, groups) in groups_by_worker(sb) {
        let capacity = desired.workers.get(name.as_str()).map_or(0, |(c, _)| *c);
        let most = capacity + u32::from(name == "web");
        // A worker just removed or shrunk may still be stopping: counted
        // against the largest capacity it had is the job of the settle
        // above; here only what the config allows now.
        if groups.len() as u32 > most.max(capacity) && desired.workers.contains_key(name.as_str()) {
            let v = sup.status();
            let detail: Vec<String> = sb
                .processes()
                .into_iter()
                .filter_map(|(p, cmd)| {
                    let st = stat(p)?;
                    groups.contains(&st.pgid).then(|| {
                        format!(
                            "{p} pgid {} ppid {} {} instance {:?}: {cmd}",
                            st.pgid,
                            st.ppid,
                            st.state,
                            env_of(p, "DROVER_INSTANCE")
                        )
                    })
                })
                .collect();
            log.say(&format!("processes: {detail:#?}"));
            log.fail(&format!(
                "{name}: {} groups alive {groups:?}, at most {most}\n{}",
                groups.len(),
                worker(&v, &name)
            ));
        }
    }

    // 3. The port is bound: a connection is accepted into its backlog.
    if let Err(e) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5)) {
        log.fail(&format!("port {port} refuses a connection: {e}"));
    }

    // 4. No dependent started before its dependency met the condition.
    let violations = sb.lines("violations");
    if !violations.is_empty() {
        log.fail(&format!("dependency order broken: {violations:?}"));
    }

    // 5. The env file's value and the limit reach every running api instance.
    if desired.workers.contains_key("api") {
        let wanted = (api_env.to_string(), desired.nofile);
        wait_until("api running with its env file and limit", Duration::from_secs(15), || {
            let v = sup.status();
            let insts = worker(&v, "api")["instances"].as_array().cloned().unwrap_or_default();
            // A replacement that cannot start (its dependency unmet, or
            // crashing) stalls the rollout: the old instances run on.
            let stalled =
                insts.iter().any(|i| matches!(i["state"].as_str(), Some("waiting" | "backoff" | "parked")));
            let ok = stalled
                || insts.iter().all(|i| {
                    i["state"] != "running"
                        || i["pid"].as_i64().is_some_and(|p| {
                            let p = p as i32;
                            env_of(p, "API_VALUE").as_deref() == Some(wanted.0.as_str())
                                && nofile_of(p) == Some(wanted.1)
                        })
                });
            ok.then_some(())
        });
    }

    check_no_strays(sb, sup, log);
    check_no_zombies(sup, log);
}

/// Each stop line is "NAME NANOS". Every dependent of the final config
/// that was stopped must have been stopped before each of its dependencies.
fn check_stop_order(sb: &Sandbox, desired: &Desired, log: &Log) -> usize {
    let mut checked = 0;
    let mut stopped: BTreeMap<String, (u128, u128)> = BTreeMap::new();
    for line in sb.lines("stops") {
        let Some((name, t)) = line.split_once(' ') else { continue };
        let Ok(t) = t.parse::<u128>() else { continue };
        let e = stopped.entry(name.to_string()).or_insert((t, t));
        e.0 = e.0.min(t);
        e.1 = e.1.max(t);
    }
    for (dependent, deps) in &desired.deps {
        for (dep, _) in deps {
            if let (Some(a), Some(b)) = (stopped.get(*dependent), stopped.get(*dep)) {
                checked += 1;
                if a.1 > b.0 {
                    log.fail(&format!(
                        "{dependent} was stopped after {dep}, which it depends on: {:?}",
                        sb.lines("stops")
                    ));
                }
            }
        }
    }
    checked
}

#[test]
fn chaos_with_readiness_dependencies_and_sockets_keeps_every_promise() {
    let seed = seed();
    let secs: u64 = std::env::var("DROVER_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    eprintln!("chaos_ready: seed {seed}, {secs} s (DROVER_CHAOS_SEED={seed} reproduces this run)");
    let mut rng = Rng(seed);
    let mut log = Log { seed, step: 0 };
    let sb = Sandbox::new();
    std::fs::create_dir_all(sb.path("marks")).unwrap();
    let port = free_port();
    let mut api_env = "v0".to_string();
    sb.write("api.env", format!("API_VALUE={api_env}\n"));
    let mut desired = Desired::random(&mut rng);
    sb.write("daemon.toml", desired.toml(&sb, port));
    let mut sup = Supervisor::start(&sb);
    sup.wait_for("web running", Duration::from_secs(20), |v| {
        worker(v, "web")["instances"][0]["state"] == "running"
    });
    let client = Client::start(port);
    let mut subscribers: Vec<Subscriber> = Vec::new();
    let mut tops: Vec<TopLike> = Vec::new();
    let mut wrong_answers: Vec<String> = Vec::new();
    let end = Instant::now() + Duration::from_secs(secs);
    check(&sb, &sup, &desired, port, &api_env, &log);

    while Instant::now() < end {
        log.step += 1;
        let status = sup.status();
        match rng.below(100) {
            0..25 => {
                desired = Desired::random(&mut rng);
                log.say(&format!("new config {desired:?}"));
                let code = apply(&sb, &sup, &mut rng, &desired.toml(&sb, port), &log);
                if code.is_some_and(|c| c != 0) {
                    log.fail(&format!("reload of a valid config exited {code:?}"));
                }
                wait_applied(&sb);
            }
            25..33 => {
                let bad = desired.with_cycle(&mut rng);
                log.say(&format!("a cycle: {:?}", bad.deps));
                let pids_before = steady_pids(&status);
                std::fs::write(sb.path("daemon.toml"), bad.toml(&sb, port)).unwrap();
                let r = sb.cli(&["reload"]);
                if r.code != Some(1) || !r.stderr.contains("cycle") {
                    log.fail(&format!("a cycle was not refused: exit {:?}: {}", r.code, r.stderr));
                }
                let refused = sup.status();
                if refused["supervisor"]["last_reload"]["ok"] != false {
                    log.fail(&format!("status does not show the refused reload: {}", refused["supervisor"]));
                }
                check(&sb, &sup, &desired, port, &api_env, &log);
                let after = sup.status();
                if after["supervisor"]["generation"] != status["supervisor"]["generation"] {
                    log.fail(&format!("a refused config changed the generation: {}", after["supervisor"]));
                }
                let pids_after = steady_pids(&after);
                // A refused config touches nothing: what ran still runs.
                for (key, pid) in &pids_before {
                    if pids_after.get(key).is_some_and(|p| p != pid) {
                        log.fail(&format!(
                            "{key:?} changed from {pid} to {:?} on a refused config",
                            pids_after[key]
                        ));
                    }
                }
                log.say("  good config back");
                let _ = apply(&sb, &sup, &mut rng, &desired.toml(&sb, port), &log);
                wait_applied(&sb);
            }
            33..42 => {
                api_env = format!("v{}", rng.below(1000));
                log.say(&format!("api.env: API_VALUE={api_env}"));
                let text = format!("# changed\nAPI_VALUE={api_env}\n");
                if rng.chance(50) {
                    std::fs::write(sb.path("api.env.tmp"), &text).unwrap();
                    std::fs::rename(sb.path("api.env.tmp"), sb.path("api.env")).unwrap();
                } else {
                    std::fs::write(sb.path("api.env"), &text).unwrap();
                }
                if rng.chance(50) {
                    log.say("  drover reload");
                    let r = sb.cli(&["reload"]);
                    if r.code != Some(0) {
                        log.fail(&format!("reload after an env file change: {}", r.stderr));
                    }
                }
                wait_applied(&sb);
            }
            42..52 => {
                log.say("restart web (a rolling restart with a surge instance)");
                let r = sb.cli(&["restart", "web"]);
                if r.code != Some(0) {
                    log.fail(&format!("restart web: {}", r.stderr));
                }
            }
            52..60 => {
                let web: Vec<i32> = worker(&status, "web")["instances"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i["pid"].as_i64().map(|p| p as i32))
                    .collect();
                if let Some(pid) = rng.pick(&web) {
                    // Between two requests: a request in hand would die with it.
                    let _turn = client.pause.lock().unwrap();
                    log.say(&format!("kill -9 web instance {pid}"));
                    let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
                }
            }
            60..72 => {
                let pids = instance_pids(&status);
                if let Some(pid) = rng.pick(&pids) {
                    let is_web = worker(&status, "web")["instances"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|i| i["pid"] == *pid));
                    if !is_web {
                        log.say(&format!("kill -9 instance {pid}"));
                        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
                    }
                }
            }
            72..80 => {
                let names: Vec<&str> = desired.workers.keys().copied().filter(|n| *n != "web").collect();
                if let Some(n) = rng.pick(&names) {
                    log.say(&format!("restart {n}"));
                    let r = sb.cli(&["restart", n]);
                    if r.code != Some(0) {
                        log.fail(&format!("restart {n}: {}", r.stderr));
                    }
                }
            }
            80..86 => {
                log.say("trigger migrate");
                let r = sb.cli(&["trigger", "migrate"]);
                // A run from the step before (or one a dependent asked
                // for) may still be going: one at a time is the job's rule.
                let busy = r.stderr.contains("migrate is at capacity");
                if r.code != Some(0) && !busy {
                    log.fail(&format!("trigger migrate: {}", r.stderr));
                }
            }
            86..93 => {
                // A follower of `drover events`: one that reads, one that
                // never does (it lags once its pipe is full), or one vanishing.
                if rng.chance(30) {
                    // A top-like viewer comes, or goes.
                    if let Some(mut t) =
                        (!tops.is_empty() && (tops.len() >= 2 || rng.chance(50))).then(|| tops.remove(0))
                    {
                        log.say("top-like viewer vanishes");
                        wrong_answers.extend(t.end());
                    } else {
                        log.say("top-like viewer: events, status --json and /metrics in a loop");
                        tops.push(TopLike::start(&sb));
                    }
                } else if subscribers.len() >= 4 || (!subscribers.is_empty() && rng.chance(40)) {
                    let mut s = subscribers.remove(rng.below(subscribers.len() as u64) as usize);
                    log.say(&format!("events follower {} vanishes", s.child.id()));
                    s.end();
                } else {
                    let reads = rng.chance(50);
                    log.say(&format!("events follower that {}", if reads { "reads" } else { "never reads" }));
                    subscribers.push(Subscriber::start(&sb, reads));
                }
            }
            _ => {
                // drover itself dies: the client waits (its socket dies with
                // drover and the instances it passed it to).
                let turn = client.pause.lock().unwrap();
                log.say("restart web, then SIGKILL drover with the surge instance alive");
                let r = sb.cli(&["restart", "web"]);
                if r.code != Some(0) {
                    log.fail(&format!("restart web: {}", r.stderr));
                }
                // The surge instance appears at once unless web is in
                // backoff (just killed): then drover dies mid-restart anyway.
                let deadline = Instant::now() + Duration::from_secs(5);
                let surge = loop {
                    let v = sup.status();
                    let insts = worker(&v, "web")["instances"].as_array().cloned().unwrap_or_default();
                    if insts.iter().any(|i| i["surge"] == true) {
                        break true;
                    }
                    if Instant::now() > deadline {
                        break false;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                };
                log.say(&format!("  SIGKILL drover (pid {}), surge instance alive: {surge}", sup.pid));
                sup.sigkill();
                let old = std::mem::replace(&mut sup, Supervisor::start(&sb));
                sup.wait_for("web running again", Duration::from_secs(20), |v| {
                    worker(v, "web")["instances"][0]["state"] == "running"
                });
                check(&sb, &sup, &desired, port, &api_env, &log);
                drop(old);
                drop(turn);
            }
        }
        check(&sb, &sup, &desired, port, &api_env, &log);
    }

    let mut followed = 0;
    for mut s in subscribers.drain(..) {
        followed += s.end();
    }
    for mut t in tops.drain(..) {
        wrong_answers.extend(t.end());
    }
    if !wrong_answers.is_empty() {
        log.fail(&format!(
            "{} wrong answers to a viewer: {:?}",
            wrong_answers.len(),
            &wrong_answers[..wrong_answers.len().min(3)]
        ));
    }
    let (asked, failed) = client.finish();
    if !failed.is_empty() {
        log.fail(&format!(
            "{} of {asked} requests failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        ));
    }
    if asked < 10 {
        log.fail(&format!("the client asked only {asked} times"));
    }
    // A chain to stop: flappy needs api started, api needs db ready.
    desired.workers = BTreeMap::from([("web", (1, 0)), ("db", (2, 0)), ("api", (1, 0)), ("flappy", (2, 0))]);
    desired.deps = BTreeMap::from([("api", vec![("db", "ready")]), ("flappy", vec![("api", "started")])]);
    log.say(&format!("last config {desired:?}"));
    let _ = apply(&sb, &sup, &mut rng, &desired.toml(&sb, port), &log);
    wait_applied(&sb);
    sup.wait_for("the chain running", Duration::from_secs(20), |v| {
        ["db", "api", "flappy"].iter().all(|n| {
            worker(v, n)["instances"].as_array().is_some_and(|a| a.iter().all(|i| i["state"] == "running"))
        })
    });
    log.say("final stop");
    let _ = std::fs::remove_file(sb.path("stops"));
    sup.signal(Signal::SIGTERM);
    let st =
        sup.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| log.fail("drover did not stop within 30 s"));
    if st.code() != Some(0) {
        log.fail(&format!("drover exited {st} on SIGTERM"));
    }
    let ordered = check_stop_order(&sb, &desired, &log);
    let left = sb.processes();
    if !left.is_empty() {
        log.fail(&format!("processes left after the final stop: {left:?}"));
    }
    eprintln!(
        "chaos_ready: {} steps, {asked} requests, {followed} events followed, {ordered} dependencies \
         stopped in order, seed {seed}: \
         every invariant held",
        log.step
    );
}

/// The pids of the running instances of workers with no health probe and
/// no rollout under way, by (worker, index): what a refused config must
/// leave running as it was.
fn steady_pids(status: &Value) -> BTreeMap<(String, u64), i64> {
    let mut out = BTreeMap::new();
    for name in ["db", "api", "web"] {
        if !worker(status, name)["rollout"].is_null() {
            continue;
        }
        for i in worker(status, name)["instances"].as_array().into_iter().flatten() {
            if let (Some(idx), Some(pid), Some("running")) =
                (i["index"].as_u64(), i["pid"].as_i64(), i["state"].as_str())
            {
                out.insert((name.to_string(), idx), pid);
            }
        }
    }
    out
}
