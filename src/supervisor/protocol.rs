//! The control protocol: one JSON request per line from the client, one
//! JSON response per line from the supervisor. The same types serve the
//! CLI and the daemon, and the status report doubles as the state file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::jobs::JobStatus;
use super::reconcile::Change;
use crate::ledger::Run;

use crate::os::reaper::Exit;

/// Longest request line the supervisor reads; longer ones are refused.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status {
        name: Option<String>,
    },
    Stop,
    Reload,
    Restart {
        name: String,
    },
    Unpark {
        name: String,
    },
    /// Where a worker's log is (the client reads the file itself).
    LogPath {
        name: String,
    },
    /// What applying the config at `path` (default: the running one's
    /// path) would change, without applying it.
    Plan {
        path: Option<PathBuf>,
    },
    /// Queue a run of a job now.
    Trigger {
        job: String,
    },
    Cancel {
        id: i64,
    },
    Resume {
        id: i64,
    },
    /// Start a background session.
    Bg {
        name: Option<String>,
        command: Vec<String>,
        dir: PathBuf,
    },
    /// Stop a session, by id or name.
    Kill {
        key: String,
    },
    /// A run or session, by id (or a session by name).
    RunInfo {
        key: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    Status(Box<StatusReport>),
    Ok {
        message: String,
    },
    Error {
        message: String,
    },
    LogPath {
        path: PathBuf,
    },
    Plan {
        generation: u64,
        changes: Vec<Change>,
    },
    /// The id of a run that was started or queued.
    Run {
        id: i64,
    },
    RunInfo(Box<Run>),
}

/// `status --json`, and the state file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub supervisor: SupervisorStatus,
    pub workers: Vec<WorkerStatus>,
    #[serde(default)]
    pub jobs: Vec<JobStatus>,
    /// Active background sessions.
    #[serde(default)]
    pub sessions: Vec<Run>,
    /// Active job runs and flows (queued, running, waiting).
    #[serde(default)]
    pub runs: Vec<Run>,
    /// The `--set` and `DROVER_…` overrides the supervisor applies to its
    /// config file (secret values left out).
    #[serde(default)]
    pub overrides: Vec<crate::config::load::ShownOverride>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SupervisorStatus {
    /// "running", "stopped" or "stale".
    pub state: String,
    pub pid: Option<i32>,
    /// The supervisor process's start time in clock ticks since boot, so
    /// a reused pid is not taken for it.
    #[serde(default)]
    pub pid_start_ticks: Option<u64>,
    pub config: Option<PathBuf>,
    pub started_at: Option<String>,
    pub generation: u64,
    /// When the current generation was applied.
    #[serde(default)]
    pub applied_at: Option<String>,
    pub last_reload: Option<ReloadStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReloadStatus {
    pub at: String,
    pub ok: bool,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub name: String,
    pub capacity: u32,
    pub state: String,
    pub instances: Vec<InstanceStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub index: u32,
    pub pid: Option<i32>,
    /// The process group drover signals to stop this instance.
    pub pgid: Option<i32>,
    #[serde(default)]
    pub start_ticks: Option<u64>,
    /// starting, running, backoff, parked, stopping, stopped.
    pub state: String,
    pub restarts: u32,
    pub started_at: Option<String>,
    pub last_exit: Option<Exit>,
    /// Why it is parked, or why it could not be started.
    pub error: Option<String>,
    /// When a restart in backoff is due.
    pub next_start_at: Option<String>,
}
