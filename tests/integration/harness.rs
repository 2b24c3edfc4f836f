//! A small builder for "write these files, run drover with these args,
//! expect this"; a guard for a running supervisor; and a look at /proc so
//! tests can tell which processes exist and make sure none outlives them.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;

pub const DROVER: &str = env!("CARGO_BIN_EXE_drover");

/// A temporary directory that holds a test's config files and state.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    /// `dir`, canonicalized: what /proc/PID/cwd of a process in it reads.
    pub root: PathBuf,
    /// The cgroups of the drovers run here (cgroup mode), removed last.
    cgroups: std::sync::Mutex<BTreeSet<PathBuf>>,
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonicalize tempdir");
        Sandbox { dir, root, cgroups: Default::default() }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes `text` to `rel` (creating parent directories) and returns its path.
    pub fn write(&self, rel: &str, text: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, text).expect("write");
        p
    }

    /// A drover command run in this sandbox, with no DROVER_ variables
    /// inherited from the test's own environment.
    pub fn drover(&self) -> Command {
        let mut cmd = Command::new(DROVER);
        cmd.current_dir(self.dir.path());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("DROVER_") {
                cmd.env_remove(k);
            }
        }
        cmd
    }
}

/// What a finished command printed and how it exited.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(cmd: &mut Command) -> Run {
    let Output { status, stdout, stderr } = cmd.output().expect("run drover");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// The repository root (where Cargo.toml is).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------ supervisors

/// The `[supervisor]` table every supervision test starts its config with:
/// no file watcher, so what a test's workers write next to the config
/// never counts as a config change.
pub const SUPERVISOR: &str = "[supervisor]\nreload = false\n";

/// Every instance of every worker in a status report.
pub fn all_instances(v: &Value) -> impl Iterator<Item = &Value> {
    v["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|w| w["instances"].as_array().into_iter().flatten())
}

/// A TOML array running `script` with /bin/sh: `["/bin/sh", "-c", "…"]`.
/// A JSON string is a valid TOML basic string.
pub fn sh(script: &str) -> String {
    format!("[\"/bin/sh\", \"-c\", {}]", serde_json::to_string(script).unwrap())
}

/// How long a drover client command may take before the test gives up.
const CLI_LIMIT: Duration = Duration::from_secs(30);

/// Runs `cmd` to its end, but at most `limit` (then kills it and panics),
/// so a hung drover fails a test instead of hanging the suite.
pub fn run_within(cmd: &mut Command, limit: Duration) -> Run {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn drover");
    let out = read_all(child.stdout.take().expect("stdout"));
    let err = read_all(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // A process it left behind may hold the pipes open: do not wait for
    // their end forever.
    let take = |rx: mpsc::Receiver<String>| rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    Run { code: status.code(), stdout: take(out), stderr: take(err) }
}

fn read_all(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

/// Polls `f` every 10 ms until it returns `Some`, for at most `limit`.
pub fn wait_until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = f() {
            return t;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

static NULL: Value = Value::Null;

/// The worker `name` of a status report (Null when there is none).
pub fn worker<'v>(status: &'v Value, name: &str) -> &'v Value {
    status["workers"].as_array().and_then(|ws| ws.iter().find(|w| w["name"] == name)).unwrap_or(&NULL)
}

/// Instance `index` of worker `name` of a status report (Null when there is none).
pub fn instance<'v>(status: &'v Value, name: &str, index: u64) -> &'v Value {
    worker(status, name)["instances"]
        .as_array()
        .and_then(|is| is.iter().find(|i| i["index"] == index))
        .unwrap_or(&NULL)
}

impl Sandbox {
    /// The state_dir of a config that does not set one.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join(".drover")
    }

    /// `drover -c daemon.toml ARGS…`, run to its end (at most 30 s).
    pub fn cli(&self, args: &[&str]) -> Run {
        run_within(self.drover().args(["-c", "daemon.toml"]).args(args), CLI_LIMIT)
    }

    /// `drover status --json`: its exit code and the report.
    pub fn status_json(&self) -> (Option<i32>, Value) {
        let out = self.cli(&["status", "--json"]);
        let v = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            panic!("status --json is not JSON ({e}); exit {:?}\n{}\n{}", out.code, out.stdout, out.stderr)
        });
        (out.code, v)
    }

    /// The lines of a file in the sandbox (none if it does not exist).
    pub fn lines(&self, rel: &str) -> Vec<String> {
        std::fs::read_to_string(self.path(rel)).unwrap_or_default().lines().map(str::to_string).collect()
    }

    /// Waits until `rel` has at least `n` lines, and returns them all.
    pub fn wait_lines(&self, rel: &str, n: usize, limit: Duration) -> Vec<String> {
        wait_until(&format!("{n} lines in {rel}"), limit, || {
            let l = self.lines(rel);
            (l.len() >= n).then_some(l)
        })
    }

    /// Whether process `pid` belongs to this sandbox: it runs in it (its
    /// cwd is inside) or it names it in its environment (DROVER_STATE_DIR).
    pub fn owns(&self, pid: i32) -> bool {
        if cwd(pid).is_some_and(|c| c.starts_with(&self.root)) {
            return true;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { return false };
        let needles =
            [self.root.as_os_str().as_encoded_bytes(), self.dir.path().as_os_str().as_encoded_bytes()];
        needles.iter().any(|n| env.windows(n.len()).any(|w| w == *n))
    }

    /// The live (not zombie) processes of this sandbox, with their command lines.
    pub fn processes(&self) -> Vec<(i32, String)> {
        let me = std::process::id() as i32;
        all_pids()
            .into_iter()
            .filter(|&p| p != me && stat(p).is_some_and(|s| s.state != 'Z') && self.owns(p))
            .map(|p| (p, cmdline(p)))
            .collect()
    }

    /// SIGKILLs every process of this sandbox: the last line of defence,
    /// so that no process outlives its test, whatever happened.
    fn kill_leftovers(&self) {
        for _ in 0..20 {
            let left = self.processes();
            if left.is_empty() {
                return;
            }
            for (pid, _) in left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill_leftovers();
        // Every drover of the test is gone: what a SIGKILLed one left in
        // its cgroups goes now, and the cgroups with it.
        for c in self.cgroups.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            remove_cgroups(c);
        }
    }
}

/// A `drover -c daemon.toml start` running in the foreground of a sandbox,
/// its stdout and stderr in `drover.out` and `drover.err` there. Dropping
/// it stops it (SIGTERM, then SIGKILL) and kills every process group it
/// recorded, so no process outlives a test, even a failing one.
pub struct Supervisor<'a> {
    sb: &'a Sandbox,
    child: Child,
    exited: Option<ExitStatus>,
    pub pid: i32,
    /// Every process group seen in a status report.
    pgids: RefCell<BTreeSet<i32>>,
}

impl<'a> Supervisor<'a> {
    /// Starts drover and waits until `status` answers.
    pub fn start(sb: &'a Sandbox) -> Self {
        Self::start_with(sb, |_| {})
    }

    /// As [`Supervisor::start`], with `setup` adjusting the command first.
    pub fn start_with(sb: &'a Sandbox, setup: impl FnOnce(&mut Command)) -> Self {
        let file = |name: &str| std::fs::File::create(sb.path(name)).expect("create output file");
        let mut cmd = sb.drover();
        cmd.args(["-c", "daemon.toml", "start"])
            .stdin(Stdio::null())
            .stdout(file("drover.out"))
            .stderr(file("drover.err"));
        setup(&mut cmd);
        let child = cmd.spawn().expect("spawn drover start");
        let pid = child.id() as i32;
        let mut s = Supervisor { sb, child, exited: None, pid, pgids: RefCell::default() };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = s.try_wait() {
                panic!("drover exited during start-up ({st}); stderr:\n{}", s.stderr());
            }
            // Not `status_json`: until drover answers, a failed status is
            // no reason to stop waiting (an exit is caught above, with its
            // stderr).
            let out = sb.cli(&["status", "--json"]);
            let v: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
            if out.code == Some(0) && v["supervisor"]["pid"] == pid {
                s.record(&v);
                s.wait_spawns_landed(v);
                return s;
            }

            if Instant::now() > deadline {
                panic!("drover not ready after 10 s; stderr:\n{}", s.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most 5 s, then returns anyway) until no instance of the
    /// boot is still being spawned (`starting` without a pid): spawns run
    /// off drover's loop, and tests read the first pids right after start.
    fn wait_spawns_landed(&self, mut v: Value) {
        let spawning = |v: &Value| all_instances(v).any(|i| i["state"] == "starting" && i["pid"].is_null());
        let deadline = Instant::now() + Duration::from_secs(5);
        while spawning(&v) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            let (code, next) = self.sb.status_json();
            if code != Some(0) {
                return;
            }
            self.record(&next);
            v = next;
        }
    }

    /// drover's stdout, when `start_with` made it a pipe.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// What drover wrote on stderr so far (its own log).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.sb.path("drover.err")).unwrap_or_default()
    }

    fn record(&self, v: &Value) {
        if let Some(c) = v["supervisor"]["cgroup"].as_str() {
            self.sb.cgroups.lock().unwrap_or_else(|e| e.into_inner()).insert(PathBuf::from(c));
        }
        let mut pgids = self.pgids.borrow_mut();
        for w in v["workers"].as_array().into_iter().flatten() {
            for i in w["instances"].as_array().into_iter().flatten() {
                if let Some(g) = i["pgid"].as_i64() {
                    pgids.insert(g as i32);
                }
            }
        }
    }

    /// `drover status --json`, which must succeed.
    pub fn status(&self) -> Value {
        let (code, v) = self.sb.status_json();
        assert_eq!(code, Some(0), "status --json failed: {v}\ndrover stderr:\n{}", self.stderr());
        self.record(&v);
        v
    }

    /// Polls the status (every 20 ms, for at most `limit`) until `cond`
    /// holds, and returns that status.
    pub fn wait_for(&self, what: &str, limit: Duration, cond: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.status();
            if cond(&v) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {limit:?} waiting for {what}; last status:\n{}\ndrover stderr:\n{}",
                    serde_json::to_string_pretty(&v).unwrap(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether drover has exited (and reaps it if so).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    /// Waits at most `limit` for drover to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid), sig).expect("signal drover");
    }

    /// SIGKILLs drover (not its workers) and reaps it.
    pub fn sigkill(&mut self) {
        if self.try_wait().is_none() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
            self.exited = Some(self.child.wait().expect("wait"));
        }
    }

    /// SIGKILLs the recorded process groups that still hold processes of
    /// this sandbox (a recorded pgid whose number was reused elsewhere is
    /// left alone).
    fn kill_groups(&self) {
        if let Some(v) = std::fs::read(self.sb.state_dir().join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        {
            self.record(&v);
        }
        let pgids = self.pgids.borrow();
        let live: BTreeSet<i32> = self
            .sb
            .processes()
            .into_iter()
            .filter_map(|(p, _)| stat(p).map(|s| s.pgid))
            .filter(|g| pgids.contains(g))
            .collect();
        for g in live {
            let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
        }
    }
}

impl Drop for Supervisor<'_> {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                // Workers first, while drover is there to reap them.
                self.kill_groups();
                self.sigkill();
            }
        }
        self.kill_groups();
    }
}

/// Kills what a drover that did not clean up left in its cgroup `base`
/// and removes it with the cgroups below it (a clean drover left none).
fn remove_cgroups(base: &Path) {
    if !base.exists() {
        return;
    }
    let _ = std::fs::write(base.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let below: Vec<PathBuf> = std::fs::read_dir(base)
            .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
            .unwrap_or_default();
        // Busy until the killed processes are gone.
        let left = below.iter().filter(|c| std::fs::remove_dir(c).is_err()).count();
        if (left == 0 && std::fs::remove_dir(base).is_ok()) || !base.exists() || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ------------------------------------------------------------ /proc

/// What /proc/PID/stat says about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub ppid: i32,
    pub pgid: i32,
    /// Start time in clock ticks since boot.
    pub start: u64,
}

pub fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: split after the last ')'.
    let f: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgid: f.get(2)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

pub fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

pub fn cwd(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// The command line of `pid`, arguments joined by spaces.
pub fn cmdline(pid: i32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).trim_end_matches('\0').replace('\0', " ")
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// One process: a pid and its start time, so a later process that
/// reuses the pid is not taken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcId {
    pub pid: i32,
    pub start: u64,
}

impl ProcId {
    /// The process `pid` as it is now (None if there is none).
    pub fn of(pid: i32) -> Option<ProcId> {
        stat(pid).map(|s| ProcId { pid, start: s.start })
    }

    /// Still there and not a zombie (a zombie has ended; here, where init
    /// may never reap orphans, it is as good as gone).
    pub fn running(&self) -> bool {
        stat(self.pid).is_some_and(|s| s.start == self.start && s.state != 'Z')
    }
}
