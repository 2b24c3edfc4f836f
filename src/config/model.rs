//! The validated, immutable config the runtime uses: every default filled
//! in, every path absolute, every rule checked. Serializing it gives
//! `drover config --json`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde::ser::SerializeMap;

pub use super::env_file::EnvFile;
pub use super::raw::{Containment, OnOverlap, RestartPolicy, SpawnMode};
pub use super::sockets::{Address, Socket};
use super::types::{ByteSize, HumanDuration, Signal};
pub use crate::os::identity::Identity;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    pub supervisor: Supervisor,
    pub defaults: Settings,
    pub workers: BTreeMap<String, Worker>,
    pub jobs: BTreeMap<String, Job>,
}

/// What `drover config` prints in place of a secret value.
pub const REDACTED: &str = "(secret)";

/// The values of `env` under the keys in `secret`, as bytes to mask in
/// output. Values shorter than 3 bytes are left out: masking every "1" in a
/// log would hide far more than the secret.
pub fn secret_values(env: &BTreeMap<String, String>, secret: &BTreeSet<String>) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = secret
        .iter()
        .filter_map(|k| env.get(k))
        .filter(|v| v.len() >= 3)
        .map(|v| v.as_bytes().to_vec())
        .collect();
    // Longest first, so a secret that contains another is masked whole.
    v.sort_by_key(|s| std::cmp::Reverse(s.len()));
    v.dedup();
    v
}

impl Config {
    /// This config with the value of every key marked secret anywhere
    /// replaced by [`REDACTED`], in every env table: safe to print.
    pub fn redacted(&self) -> Config {
        let secret: BTreeSet<&String> = self
            .defaults
            .secret_env
            .iter()
            .chain(self.workers.values().flat_map(|w| &w.secret_env))
            .chain(self.jobs.values().flat_map(|j| &j.secret_env))
            .collect();
        let hide = |env: &mut BTreeMap<String, String>| {
            for (k, v) in env.iter_mut() {
                if secret.contains(k) {
                    *v = REDACTED.to_string();
                }
            }
        };
        let mut c = self.clone();
        hide(&mut c.defaults.env);
        c.workers.values_mut().for_each(|w| hide(&mut w.env));
        c.jobs.values_mut().for_each(|j| hide(&mut j.env));
        c
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Supervisor {
    pub state_dir: PathBuf,
    pub reload: bool,
    pub debounce: HumanDuration,
    pub log_max_size: ByteSize,
    pub log_keep: u32,
    pub containment: Containment,
    /// Where Prometheus metrics are served, if anywhere.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "display")]
    pub metrics: Option<MetricsAddress>,
}

/// Where `/metrics` is served: loopback TCP ("tcp://127.0.0.1:9464") or a
/// unix socket ("unix:///srv/app/metrics.sock").
pub type MetricsAddress = super::sockets::Address;

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Backoff {
    pub initial: HumanDuration,
    pub max: HumanDuration,
    pub multiplier: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CrashLoop {
    pub min_uptime: HumanDuration,
    pub max_failures: u32,
}

/// The inheritable settings, fully resolved.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    pub restart: RestartPolicy,
    pub backoff: Backoff,
    pub crash_loop: CrashLoop,
    pub permanent_exit_codes: Vec<i32>,
    pub stop_signal: Signal,
    pub stop_grace: HumanDuration,
    pub env: BTreeMap<String, String>,
    /// Keys of `env` never printed: this table's and every table's above it.
    pub secret_env: BTreeSet<String>,
    /// The env files read into `env`: this table's and every table's above it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env_file: Vec<EnvFile>,
    /// User, groups, umask, nice, oom_score_adj, no_new_privs, limits.
    #[serde(flatten)]
    pub identity: Identity,
    /// The memory an instance may use: memory.max, or sampled RSS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<ByteSize>,
    /// How an instance is known to be ready; `None`: ready once spawned.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ready_view")]
    pub ready: Option<Probe>,
    /// How a running instance is known to be healthy; `None`: not probed.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "health_view")]
    pub health: Option<Probe>,
}

/// A readiness or health probe, every default filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct Probe {
    pub kind: ProbeKind,
    /// Time between two checks.
    pub interval: Duration,
    /// A check still going after this long fails.
    pub timeout: Duration,
    /// Ready probes: an instance not ready this long after its spawn is a
    /// failed start. Zero in a health probe (unused).
    pub start_timeout: Duration,
    /// Health probes: consecutive failed checks that restart the instance.
    /// 1 in a ready probe (unused).
    pub failures: u32,
}

/// What a probe checks. Strings are as written: `${NAME}` placeholders
/// are expanded from the instance's environment at each check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// Run this argv in the worker's dir and env; exit 0 passes.
    Exec(Vec<String>),
    /// GET this http:// URL; a status 200-399 passes.
    Http(String),
    /// Connect to this HOST:PORT.
    Tcp(String),
    /// A line of the instance's output matches this regex (ready only).
    Log(String),
    /// The instance sends READY=1 (ready) or WATCHDOG=1 (health) to
    /// `$NOTIFY_SOCKET`.
    Notify,
}

/// What a dependency must reach before its dependent starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Condition {
    /// A worker: every instance spawned; a job: its latest run started.
    Started,
    /// A worker: every instance ready.
    Ready,
    /// A job: its latest run in this supervisor's life succeeded.
    Succeeded,
}

impl Condition {
    /// The name as the config file writes it.
    pub fn name(self) -> &'static str {
        match self {
            Condition::Started => "started",
            Condition::Ready => "ready",
            Condition::Succeeded => "succeeded",
        }
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A probe as the file writes it: its kind as a key, then the settings
/// that apply to its role (`start_timeout` for ready, `failures` for health).
fn probe_view<S: serde::Serializer>(p: &Probe, ready: bool, s: S) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(None)?;
    match &p.kind {
        ProbeKind::Exec(argv) => m.serialize_entry("exec", argv)?,
        ProbeKind::Http(url) => m.serialize_entry("http", url)?,
        ProbeKind::Tcp(addr) => m.serialize_entry("tcp", addr)?,
        ProbeKind::Log(re) => m.serialize_entry("log", re)?,
        ProbeKind::Notify => m.serialize_entry("notify", &true)?,
    }
    m.serialize_entry("interval", &HumanDuration(p.interval))?;
    m.serialize_entry("timeout", &HumanDuration(p.timeout))?;
    if ready {
        m.serialize_entry("start_timeout", &HumanDuration(p.start_timeout))?;
    } else {
        m.serialize_entry("failures", &p.failures)?;
    }
    m.end()
}

fn ready_view<S: serde::Serializer>(p: &Option<Probe>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => probe_view(p, true, s),
        None => s.serialize_none(),
    }
}

fn health_view<S: serde::Serializer>(p: &Option<Probe>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => probe_view(p, false, s),
        None => s.serialize_none(),
    }
}

impl Default for Settings {
    /// The built-in defaults, those of the system drover generalizes.
    fn default() -> Self {
        Settings {
            restart: RestartPolicy::Always,
            backoff: Backoff {
                initial: HumanDuration::from_secs(2),
                max: HumanDuration::from_secs(120),
                multiplier: 2.0,
            },
            crash_loop: CrashLoop { min_uptime: HumanDuration::from_secs(10), max_failures: 5 },
            permanent_exit_codes: vec![78],
            stop_signal: Signal::SIGTERM,
            stop_grace: HumanDuration::from_secs(30),
            env: BTreeMap::new(),
            secret_env: BTreeSet::new(),
            env_file: Vec::new(),
            identity: Identity::default(),
            max_memory: None,
            ready: None,
            health: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Worker {
    pub command: Vec<String>,
    pub dir: PathBuf,
    pub capacity: u32,
    pub spawn_mode: SpawnMode,
    pub restart: RestartPolicy,
    pub backoff: Backoff,
    pub crash_loop: CrashLoop,
    pub permanent_exit_codes: Vec<i32>,
    pub stop_signal: Signal,
    pub stop_grace: HumanDuration,
    pub env: BTreeMap<String, String>,
    pub secret_env: BTreeSet<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env_file: Vec<EnvFile>,
    #[serde(flatten)]
    pub identity: Identity,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<ByteSize>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ready_view")]
    pub ready: Option<Probe>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "health_view")]
    pub health: Option<Probe>,
    /// Workers and jobs (by name) this one waits for, and for what.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub depends_on: BTreeMap<String, Condition>,
    /// The listening sockets drover holds for it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sockets: Vec<Socket>,
}

impl Worker {
    /// A worker with the given launch settings and inherited `settings`.
    pub fn new(
        command: Vec<String>,
        dir: PathBuf,
        capacity: u32,
        spawn_mode: SpawnMode,
        s: Settings,
    ) -> Self {
        Worker {
            command,
            dir,
            capacity,
            spawn_mode,
            restart: s.restart,
            backoff: s.backoff,
            crash_loop: s.crash_loop,
            permanent_exit_codes: s.permanent_exit_codes,
            stop_signal: s.stop_signal,
            stop_grace: s.stop_grace,
            env: s.env,
            secret_env: s.secret_env,
            env_file: s.env_file,
            identity: s.identity,
            max_memory: s.max_memory,
            ready: s.ready,
            health: s.health,
            depends_on: BTreeMap::new(),
            sockets: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub steps: Vec<Step>,
    /// True when the job was written with `steps` (a flow), false for a
    /// single `command`, which is held here as one step named "main".
    pub flow: bool,
    pub trigger: Trigger,
    pub capacity: u32,
    pub on_overlap: OnOverlap,
    pub timeout: Option<HumanDuration>,
    pub jitter: HumanDuration,
    pub queue_limit: u32,
    pub catch_up: bool,
    pub retain: u32,
    pub dir: PathBuf,
    pub env: BTreeMap<String, String>,
    pub secret_env: BTreeSet<String>,
    pub env_file: Vec<EnvFile>,
    pub identity: Identity,
    pub stop_signal: Signal,
    pub stop_grace: HumanDuration,
    /// Workers and jobs (by name) a run waits for, and for what.
    pub depends_on: BTreeMap<String, Condition>,
}

/// `config --json` shows a job as the file has it: `command` or `steps`,
/// `schedule` or `every`.
impl Serialize for Job {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            command: Option<&'a [String]>,
            #[serde(skip_serializing_if = "Option::is_none")]
            steps: Option<&'a [Step]>,
            #[serde(skip_serializing_if = "Option::is_none")]
            schedule: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            timezone: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            every: Option<HumanDuration>,
            capacity: u32,
            on_overlap: OnOverlap,
            #[serde(skip_serializing_if = "Option::is_none")]
            timeout: Option<HumanDuration>,
            jitter: HumanDuration,
            queue_limit: u32,
            catch_up: bool,
            retain: u32,
            dir: &'a std::path::Path,
            stop_signal: Signal,
            stop_grace: HumanDuration,
            env: &'a BTreeMap<String, String>,
            secret_env: &'a BTreeSet<String>,
            #[serde(skip_serializing_if = "<[EnvFile]>::is_empty")]
            env_file: &'a [EnvFile],
            #[serde(flatten)]
            identity: &'a Identity,
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            depends_on: &'a BTreeMap<String, Condition>,
        }
        View {
            command: (!self.flow).then(|| self.steps[0].command.as_slice()),
            steps: self.flow.then_some(self.steps.as_slice()),
            schedule: match &self.trigger {
                Trigger::Schedule { cron, .. } => Some(cron),
                _ => None,
            },
            timezone: match &self.trigger {
                Trigger::Schedule { timezone, .. } => timezone.as_deref(),
                _ => None,
            },
            every: match self.trigger {
                Trigger::Every(d) => Some(d),
                _ => None,
            },
            capacity: self.capacity,
            on_overlap: self.on_overlap,
            timeout: self.timeout,
            jitter: self.jitter,
            queue_limit: self.queue_limit,
            catch_up: self.catch_up,
            retain: self.retain,

            dir: &self.dir,
            stop_signal: self.stop_signal,
            stop_grace: self.stop_grace,
            env: &self.env,
            secret_env: &self.secret_env,
            env_file: &self.env_file,
            identity: &self.identity,
            depends_on: &self.depends_on,
        }
        .serialize(s)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Step {
    pub name: String,
    pub command: Vec<String>,
    pub approve: bool,
}

/// What starts a job's runs besides `drover trigger`.
#[derive(Clone, Debug, PartialEq)]
pub enum Trigger {
    /// A five-field cron expression, checked when the config was loaded,
    /// in `timezone` (an IANA name) or else in local time.
    Schedule {
        cron: String,
        timezone: Option<String>,
    },
    Every(HumanDuration),
    /// Only `drover trigger`.
    Manual,
}
