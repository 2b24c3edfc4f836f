//! The config file as the user writes it: serde reads these types, and
//! schemars turns the same types into `schema/daemon.schema.json`. Doc
//! comments here are the schema's descriptions, written for users.
//!
//! Everything a worker may inherit is optional here; `resolve` fills the gaps
//! from `[defaults]`, then from the built-in defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use super::types::{ByteSize, HumanDuration, NAME_PATTERN, Signal};

/// A drover config file (`daemon.toml`): the workers and jobs to supervise.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "drover daemon.toml")]
pub struct RawConfig {
    /// Settings of drover itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor: Option<RawSupervisor>,
    /// Settings every worker inherits unless it sets them itself (tables
    /// such as `backoff`, `env` and `limits` are merged key by key). Jobs
    /// inherit `env`, `env_file`, `stop_signal`, `stop_grace` and the
    /// identity keys (`user`, `group`, `umask`, `nice`, `oom_score_adj`,
    /// `no_new_privs`, `limits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defaults: Option<RawSettings>,
    /// Long-running processes, by name. Each is kept running `capacity` times.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("propertyNames" = { "pattern": NAME_PATTERN }))]
    pub workers: BTreeMap<String, RawWorker>,
    /// One-shot commands or multi-step flows, run on a schedule or on `drover trigger`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("propertyNames" = { "pattern": NAME_PATTERN }))]
    pub jobs: BTreeMap<String, RawJob>,
}

/// Settings of drover itself.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSupervisor {
    /// Where drover keeps its lock, socket, state file, logs and run ledger.
    /// Relative to the config file's directory.
    #[schemars(extend("default" = ".drover"))]
    pub state_dir: Option<PathBuf>,
    /// Watch the config file and apply changes while running.
    #[schemars(extend("default" = true))]
    pub reload: Option<bool>,
    /// Quiet time after a change to the config file before it is applied.
    #[schemars(extend("default" = "50ms"))]
    pub debounce: Option<HumanDuration>,
    /// Size at which a log file is rotated.
    #[schemars(extend("default" = "10MiB"))]
    pub log_max_size: Option<ByteSize>,
    /// Rotated log files kept per log, besides the current one.
    #[schemars(extend("default" = 5), range(max = 100))]
    pub log_keep: Option<u32>,
    /// How drover keeps hold of everything an instance or run step starts:
    /// "cgroup", a cgroup v2 of its own (nothing escapes it; drover must be
    /// able to create cgroups below its own: root, or a delegated subtree);
    /// "process-group", its process group, the subreaper and an
    /// environment marker; "auto", cgroups where drover can create them.
    #[schemars(extend("default" = "auto"))]
    pub containment: Option<Containment>,
    /// Serve Prometheus metrics at `/metrics` on this address: a loopback
    /// "HOST:PORT" ("127.0.0.1:9464", "[::1]:9464", "localhost:9464") or
    /// "unix:PATH" (relative to the config file's directory). Off when
    /// absent. A reload that changes it moves the metrics there.
    #[schemars(regex(
        pattern = r"^(unix:.+|localhost:[0-9]{1,5}|127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}:[0-9]{1,5}|\[::1\]:[0-9]{1,5})$"
    ))]
    pub metrics: Option<String>,
}

/// How drover contains the processes of an instance or a run step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Containment {
    // Cgroups where drover can create them, else process groups.
    #[default]
    Auto,
    // A cgroup v2 per instance and run step; drover fails to start without it.
    Cgroup,
    // Process groups, the subreaper and an environment marker.
    ProcessGroup,
}

/// How a worker is restarted after its process exits: "always" after every
/// exit; "on-failure" after a non-zero exit or a death by signal (an exit 0
/// stops it); "never" (the instance is stopped after it exits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    // Restart after every exit.
    Always,
    // Restart after a non-zero exit or a death by signal; an exit 0 stops it.
    OnFailure,
    // Never restart: the instance is stopped after it exits.
    Never,
}

/// Where each instance of a worker runs: "same-dir", in `dir`; "worktree",
/// in its own `git worktree` of `dir`, made under state_dir before it starts
/// and removed once it is gone for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SpawnMode {
    // Every instance runs in `dir`.
    SameDir,
    // Every instance runs in its own `git worktree` of `dir`, made under
    // state_dir before it starts and removed once it is gone for good.
    Worktree,
}

/// What a tick or trigger does when the job already runs `capacity` runs:
/// "skip" records the skip and starts nothing; "queue" keeps the new run
/// queued until a slot frees; "replace" cancels the oldest active run, then
/// starts the new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OnOverlap {
    // Record the skip and start nothing.
    Skip,
    // Keep the new run queued until a slot frees.
    Queue,
    // Cancel the oldest active run, then start the new one.
    Replace,
}

/// Exponential backoff between restarts.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawBackoff {
    /// Delay before the first restart.
    #[schemars(extend("default" = "2s"))]
    pub initial: Option<HumanDuration>,
    /// Longest delay between restarts.
    #[schemars(extend("default" = "2m"))]
    pub max: Option<HumanDuration>,
    /// Factor applied to the delay after each failure (1 to 1000).
    #[schemars(extend("default" = 2.0), range(min = 1.0, max = 1000.0))]
    pub multiplier: Option<f64>,
}

/// When a worker that keeps failing is parked (no more restarts).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCrashLoop {
    /// An exit this soon after the start counts as a rapid failure; staying
    /// up this long resets the failure count and the backoff.
    #[schemars(extend("default" = "10s"))]
    pub min_uptime: Option<HumanDuration>,
    /// Consecutive rapid failures that park the instance.
    #[schemars(extend("default" = 5), range(min = 1))]
    pub max_failures: Option<u32>,
}

/// The settings `[defaults]` gives every worker.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    /// Restart policy.
    #[schemars(extend("default" = "always"))]
    pub restart: Option<RestartPolicy>,
    /// Delay between restarts.
    pub backoff: Option<RawBackoff>,
    /// Parking of crash-looping instances.
    pub crash_loop: Option<RawCrashLoop>,
    /// Exit codes that mean "do not retry": the instance is parked at once.
    #[schemars(extend("default" = [78]))]
    pub permanent_exit_codes: Option<Vec<i32>>,
    /// Signal sent to the process group to stop it.
    #[schemars(extend("default" = "SIGTERM"))]
    pub stop_signal: Option<Signal>,
    /// Time between the stop signal and SIGKILL to the whole process group.
    #[schemars(extend("default" = "30s"))]
    pub stop_grace: Option<HumanDuration>,
    /// Environment variables, over drover's own environment.
    pub env: Option<BTreeMap<String, String>>,
    /// Keys of `env` whose values are secret: `drover config` shows them as
    /// "(secret)". A worker's or job's list adds to this one.
    pub secret_env: Option<Vec<String>>,
    /// Run as this user (its primary group and supplementary groups too,
    /// unless `group` is set). Needs drover to run as root, or as that user.
    pub user: Option<String>,
    /// Run with this primary group (default: the user's).
    pub group: Option<String>,
    /// File mode creation mask, in octal ("027"). Default: drover's.
    #[schemars(regex(pattern = r"^[0-7]{3,4}$"))]
    pub umask: Option<String>,
    /// Scheduling priority, -20 (highest) to 19. Lowering it below
    /// drover's needs root.
    #[schemars(range(min = -20, max = 19))]
    pub nice: Option<i32>,
    /// The kernel OOM killer's bias for this process, -1000 (never) to
    /// 1000 (first). Lowering it below drover's needs root.
    #[schemars(range(min = -1000, max = 1000))]
    pub oom_score_adj: Option<i32>,
    /// Set PR_SET_NO_NEW_PRIVS: setuid programs and file capabilities gain
    /// nothing.
    #[schemars(extend("default" = false))]
    pub no_new_privs: Option<bool>,
    /// Resource limits (setrlimit): `{ nofile = 65536, core = 0 }`; a
    /// number sets soft and hard alike, `{ soft, hard }` each.
    pub limits: Option<RawLimits>,
    /// KEY=VALUE files (systemd EnvironmentFile syntax), relative to the
    /// config file's directory, read in order; `env` is over them. A
    /// leading `-` ("-local.env") makes a missing file no error.
    pub env_file: Option<Vec<String>>,
    /// Memory the instance may use ("512MiB"): with the cgroup memory
    /// controller, the cgroup's memory.max (the kernel's OOM kill is the
    /// reason shown); without it, the resident memory of its processes,
    /// sampled every few seconds: above it, a graceful restart counted as a
    /// failure.
    pub max_memory: Option<ByteSize>,
    /// How drover knows an instance is ready (default: ready once spawned).
    pub ready: Option<RawProbe>,
    /// How drover knows a running instance is healthy (default: not probed).
    pub health: Option<RawProbe>,
}

/// A long-running process kept running `capacity` times.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawWorker {
    /// The program and its arguments (argv; no shell is involved).
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
    /// Working directory, relative to the config file's directory.
    #[schemars(extend("default" = "."))]
    pub dir: Option<PathBuf>,
    /// Number of instances kept running.
    #[schemars(extend("default" = 1), range(min = 1, max = 10000))]
    pub capacity: Option<u32>,
    /// Where each instance runs.
    #[schemars(extend("default" = "same-dir"))]
    pub spawn_mode: Option<SpawnMode>,
    /// Restart policy (overrides `defaults.restart`).
    pub restart: Option<RestartPolicy>,
    /// Delay between restarts (merged over `defaults.backoff`).
    pub backoff: Option<RawBackoff>,
    /// Parking of crash-looping instances (merged over `defaults.crash_loop`).
    pub crash_loop: Option<RawCrashLoop>,
    /// Exit codes that park the instance at once (overrides the default list).
    pub permanent_exit_codes: Option<Vec<i32>>,
    /// Signal sent to stop it (overrides `defaults.stop_signal`).
    pub stop_signal: Option<Signal>,
    /// Grace before SIGKILL (overrides `defaults.stop_grace`).
    pub stop_grace: Option<HumanDuration>,
    /// Environment variables (merged over `defaults.env`).
    pub env: Option<BTreeMap<String, String>>,
    /// Keys of `env` whose values are secret (added to `defaults.secret_env`).
    pub secret_env: Option<Vec<String>>,
    /// Run as this user (its primary group and supplementary groups too,
    /// unless `group` is set). Needs drover to run as root, or as that user.
    pub user: Option<String>,
    /// Run with this primary group (default: the user's).
    pub group: Option<String>,
    /// File mode creation mask, in octal ("027"). Default: drover's.
    #[schemars(regex(pattern = r"^[0-7]{3,4}$"))]
    pub umask: Option<String>,
    /// Scheduling priority, -20 (highest) to 19. Lowering it below
    /// drover's needs root.
    #[schemars(range(min = -20, max = 19))]
    pub nice: Option<i32>,
    /// The kernel OOM killer's bias for this process, -1000 (never) to
    /// 1000 (first). Lowering it below drover's needs root.
    #[schemars(range(min = -1000, max = 1000))]
    pub oom_score_adj: Option<i32>,
    /// Set PR_SET_NO_NEW_PRIVS: setuid programs and file capabilities gain
    /// nothing.
    #[schemars(extend("default" = false))]
    pub no_new_privs: Option<bool>,
    /// Resource limits (setrlimit): `{ nofile = 65536, core = 0 }`; a
    /// number sets soft and hard alike, `{ soft, hard }` each.
    pub limits: Option<RawLimits>,
    /// KEY=VALUE files (systemd EnvironmentFile syntax), relative to the
    /// config file's directory, read in order; `env` is over them. A
    /// leading `-` ("-local.env") makes a missing file no error.
    pub env_file: Option<Vec<String>>,
    /// Listening sockets drover binds and holds across restarts and
    /// reloads, passed to every instance from fd 3 on (LISTEN_FDS,
    /// LISTEN_PID, LISTEN_FDNAMES): "tcp://127.0.0.1:8000",
    /// "tcp://[::1]:8000", "unix://PATH", or `{ address, name, mode }`.
    pub sockets: Option<Vec<super::sockets::RawSocket>>,
    /// Memory the instance may use ("512MiB"): with the cgroup memory
    /// controller, the cgroup's memory.max (the kernel's OOM kill is the
    /// reason shown); without it, the resident memory of its processes,
    /// sampled every few seconds: above it, a graceful restart counted as a
    /// failure.
    pub max_memory: Option<ByteSize>,
    /// How drover knows an instance is ready (replaces `defaults.ready` whole).
    pub ready: Option<RawProbe>,
    /// How drover knows a running instance is healthy (replaces `defaults.health` whole).
    pub health: Option<RawProbe>,
    /// Workers and jobs to wait for before starting: `{ db = "ready" }` or
    /// `["db"]` (a worker's default condition is "ready", a job's "succeeded").
    pub depends_on: Option<RawDependsOn>,
}

/// A job: one command, or a flow of steps, run on a schedule or on trigger.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawJob {
    /// The program and its arguments, for a single-step job. Exactly one of
    /// `command` and `steps` is set.
    pub command: Option<Vec<String>>,
    /// The steps of a flow, run in order. Exactly one of `command` and
    /// `steps` is set.
    pub steps: Option<Vec<RawStep>>,
    /// A five-field cron expression ("*/15 * * * *"), in local time.
    pub schedule: Option<String>,
    /// The IANA time zone `schedule` is read in ("Europe/Paris", "UTC"),
    /// from the system's time zone database. Default: local time.
    pub timezone: Option<String>,
    /// Run at this fixed interval instead of a cron schedule.
    pub every: Option<HumanDuration>,
    /// Concurrent runs of this job.
    #[schemars(extend("default" = 1), range(min = 1, max = 1000))]
    pub capacity: Option<u32>,
    /// What a tick or trigger does when `capacity` runs are active.
    #[schemars(extend("default" = "skip"))]
    pub on_overlap: Option<OnOverlap>,
    /// A run still going after this long is stopped and fails.
    pub timeout: Option<HumanDuration>,
    /// Spread scheduled starts: each tick is delayed by a fixed part of
    /// this, the same for the job every time (derived from its name).
    #[schemars(extend("default" = "0s"))]
    pub jitter: Option<HumanDuration>,
    /// With `on_overlap = "queue"`, how many runs may wait; beyond it a
    /// tick or trigger is skipped.
    #[schemars(extend("default" = 16), range(min = 1, max = 10000))]
    pub queue_limit: Option<u32>,
    /// Run once at start if a tick was missed while drover was down (never
    /// more than once, however many were missed).
    #[schemars(extend("default" = false))]
    pub catch_up: Option<bool>,

    /// Terminal runs of this job kept in the ledger.
    #[schemars(extend("default" = 50), range(min = 1))]
    pub retain: Option<u32>,
    /// Working directory, relative to the config file's directory.
    #[schemars(extend("default" = "."))]
    pub dir: Option<PathBuf>,
    /// Environment variables (merged over `defaults.env`).
    pub env: Option<BTreeMap<String, String>>,
    /// Keys of `env` whose values are secret (added to `defaults.secret_env`).
    pub secret_env: Option<Vec<String>>,
    /// Run as this user (its primary group and supplementary groups too,
    /// unless `group` is set). Needs drover to run as root, or as that user.
    pub user: Option<String>,
    /// Run with this primary group (default: the user's).
    pub group: Option<String>,
    /// File mode creation mask, in octal ("027"). Default: drover's.
    #[schemars(regex(pattern = r"^[0-7]{3,4}$"))]
    pub umask: Option<String>,
    /// Scheduling priority, -20 (highest) to 19. Lowering it below
    /// drover's needs root.
    #[schemars(range(min = -20, max = 19))]
    pub nice: Option<i32>,
    /// The kernel OOM killer's bias for this process, -1000 (never) to
    /// 1000 (first). Lowering it below drover's needs root.
    #[schemars(range(min = -1000, max = 1000))]
    pub oom_score_adj: Option<i32>,
    /// Set PR_SET_NO_NEW_PRIVS: setuid programs and file capabilities gain
    /// nothing.
    #[schemars(extend("default" = false))]
    pub no_new_privs: Option<bool>,
    /// Resource limits (setrlimit): `{ nofile = 65536, core = 0 }`; a
    /// number sets soft and hard alike, `{ soft, hard }` each.
    pub limits: Option<RawLimits>,
    /// KEY=VALUE files (systemd EnvironmentFile syntax), relative to the
    /// config file's directory, read in order; `env` is over them. A
    /// leading `-` ("-local.env") makes a missing file no error.
    pub env_file: Option<Vec<String>>,
    /// Signal sent to stop a run (overrides `defaults.stop_signal`).
    pub stop_signal: Option<Signal>,
    /// Grace before SIGKILL (overrides `defaults.stop_grace`).
    pub stop_grace: Option<HumanDuration>,
    /// Workers and jobs a run waits for: `{ db = "ready" }` or `["db"]`.
    pub depends_on: Option<RawDependsOn>,
}

/// One step of a flow.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    /// The step's name, unique within the flow.
    #[schemars(regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// The program and its arguments.
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
    /// Hold the flow (`waiting`) before this step until `drover runs resume ID`.
    #[serde(default)]
    #[schemars(extend("default" = false))]
    pub approve: bool,
}

/// A readiness (`ready`) or health (`health`) probe: exactly one of `exec`,
/// `http`, `tcp`, `log` (ready only) and `notify`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawProbe {
    /// Run this program (argv, in the worker's dir and env); exit 0 passes.
    pub exec: Option<Vec<String>>,
    /// GET this http:// URL; a status 200-399 passes. `${NAME}` is expanded
    /// from the instance's environment.
    pub http: Option<String>,
    /// Connect to this HOST:PORT; a connect passes. `${NAME}` is expanded.
    pub tcp: Option<String>,
    /// Ready probes only: a line of the instance's output matches this regex.
    pub log: Option<String>,
    /// The instance sends READY=1 (ready) or WATCHDOG=1 at least every
    /// `interval` (health) to `$NOTIFY_SOCKET`.
    pub notify: Option<bool>,
    /// Time between two checks (ready: 1s, health: 10s).
    pub interval: Option<HumanDuration>,
    /// A check still going after this long fails (ready: 1s, health: 2s).
    pub timeout: Option<HumanDuration>,
    /// Ready probes only: not ready this long after the spawn is a failed start.
    #[schemars(extend("default" = "60s"))]
    pub start_timeout: Option<HumanDuration>,
    /// Health probes only: consecutive failed checks that restart the instance.
    #[schemars(extend("default" = 3))]
    pub failures: Option<u32>,
}

/// `depends_on`: a table of name = condition, or a list of names.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawDependsOn {
    Table(BTreeMap<String, String>),
    List(Vec<String>),
}

impl JsonSchema for RawDependsOn {
    fn schema_name() -> Cow<'static, str> {
        "DependsOn".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // Conditions are plain strings here: drover check says what is
        // wrong with one (the published schema adds the enum).
        json_schema!({
            "title": "DependsOn",
            "description": "Workers and jobs to wait for: { name = \"condition\" } or [\"name\", ...].",
            "anyOf": [
                { "type": "object", "additionalProperties": { "type": "string" } },
                { "type": "array", "items": { "type": "string" } }
            ]
        })
    }
}

/// Resource limits by name (those of `ulimit` and systemd's `Limit…=`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Address space (bytes).
    #[serde(rename = "as")]
    pub as_: Option<RawLimit>,
    /// Core file size (bytes); 0: no core dumps.
    pub core: Option<RawLimit>,
    /// CPU time (seconds).
    pub cpu: Option<RawLimit>,
    /// Data segment (bytes).
    pub data: Option<RawLimit>,
    /// Size of a file written (bytes).
    pub fsize: Option<RawLimit>,
    /// File locks.
    pub locks: Option<RawLimit>,
    /// Locked memory (bytes).
    pub memlock: Option<RawLimit>,
    /// POSIX message queues (bytes).
    pub msgqueue: Option<RawLimit>,
    /// Ceiling of the nice value (20 - limit).
    pub nice: Option<RawLimit>,
    /// Open files.
    pub nofile: Option<RawLimit>,
    /// Processes (threads) of the user.
    pub nproc: Option<RawLimit>,
    /// Resident set (bytes; not enforced by Linux).
    pub rss: Option<RawLimit>,
    /// Real-time priority.
    pub rtprio: Option<RawLimit>,
    /// Real-time CPU time (microseconds).
    pub rttime: Option<RawLimit>,
    /// Queued signals.
    pub sigpending: Option<RawLimit>,
    /// Stack size (bytes).
    pub stack: Option<RawLimit>,
}

impl RawLimits {
    /// The limits set, by name.
    pub fn set(&self) -> Vec<(&'static str, &RawLimit)> {
        [
            ("as", &self.as_),
            ("core", &self.core),
            ("cpu", &self.cpu),
            ("data", &self.data),
            ("fsize", &self.fsize),
            ("locks", &self.locks),
            ("memlock", &self.memlock),
            ("msgqueue", &self.msgqueue),
            ("nice", &self.nice),
            ("nofile", &self.nofile),
            ("nproc", &self.nproc),
            ("rss", &self.rss),
            ("rtprio", &self.rtprio),
            ("rttime", &self.rttime),
            ("sigpending", &self.sigpending),
            ("stack", &self.stack),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
        .collect()
    }
}

/// One limit: a value for soft and hard alike, or `{ soft, hard }`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum RawLimit {
    Both(LimitValue),
    Pair { soft: LimitValue, hard: LimitValue },
}

impl<'de> Deserialize<'de> for RawLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Pair {
            soft: LimitValue,
            hard: LimitValue,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Both(LimitValue),
            Pair(Pair),
        }
        // `untagged` only for this leaf, which the schema checks first.
        Ok(match Either::deserialize(d)? {
            Either::Both(v) => RawLimit::Both(v),
            Either::Pair(p) => RawLimit::Pair { soft: p.soft, hard: p.hard },
        })
    }
}

impl JsonSchema for RawLimit {
    fn schema_name() -> Cow<'static, str> {
        "Limit".into()
    }
    fn json_schema(g: &mut SchemaGenerator) -> Schema {
        let v = g.subschema_for::<LimitValue>();
        json_schema!({
            "title": "Limit",
            "description": "A limit for soft and hard alike, or { soft = …, hard = … }.",
            "anyOf": [
                v,
                {
                    "type": "object",
                    "properties": { "soft": v, "hard": v },
                    "required": ["soft", "hard"],
                    "additionalProperties": false
                }
            ]
        })
    }
}

/// A limit's value: a number, a size ("64MiB", for limits in bytes), or
/// "infinity".
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum LimitValue {
    Number(u64),
    Text(String),
}

impl JsonSchema for LimitValue {
    fn schema_name() -> Cow<'static, str> {
        "LimitValue".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "title": "LimitValue",
            "description": "A number, a size with a unit (\"64MiB\", for limits in bytes), or \"infinity\".",
            "anyOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "pattern": "^\\s*([0-9]+\\s*([kKmMgG]i?[bB]?|[bB])?|infinity|unlimited)\\s*$" }
            ]
        })
    }
}
