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
    /// such as `backoff` and `env` are merged key by key). Jobs inherit
    /// `env`, `stop_signal` and `stop_grace`.
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
