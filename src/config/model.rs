//! The validated, immutable config the runtime uses: every default filled
//! in, every path absolute, every rule checked. Serializing it gives
//! `drover config --json`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Serialize;

pub use super::raw::{OnOverlap, RestartPolicy, SpawnMode};
use super::types::{ByteSize, HumanDuration, Signal};

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
    pub stop_signal: Signal,
    pub stop_grace: HumanDuration,
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
