//! The control protocol: one JSON request per line from the client, one
//! JSON response per line from the supervisor. The same types serve the
//! CLI and the daemon, and the status report doubles as the state file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::jobs::JobStatus;
use super::reconcile::{Change, JobChange};
use crate::ledger::Run;

use crate::os::reaper::Exit;

/// Longest request line the supervisor reads; longer ones are refused.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Every variant is a struct, even with no fields: serde ignores unknown
/// fields on a unit variant, and `{"cmd":"stop","x":1}` must be refused
/// like any other malformed request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status {
        name: Option<String>,
    },
    Stop {},
    Reload {},
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
    /// What applying `text`, the config file at `path`, would change,
    /// without applying it. The client reads the file: the supervisor
    /// never opens a path a client names (it could be a FIFO, a device,
    /// or its own stdin). `path` names the file in errors and is what
    /// relative paths in it are resolved against.
    Plan {
        path: PathBuf,
        text: String,
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
        /// The caller's environment, which the session gets (over
        /// `defaults.env`); absent from older clients.
        #[serde(default)]
        env: Option<Vec<(String, String)>>,
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
        /// Jobs added, removed or changed.
        #[serde(default)]
        jobs: Vec<JobChange>,
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
    /// Why jobs are delayed (the ledger is locked by another process) or
    /// disabled (it could not be opened); absent when all is well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_error: Option<String>,
    /// Active background sessions.
    #[serde(default)]
    pub sessions: Vec<Run>,
    /// Active job runs and flows (queued, running, waiting).
    #[serde(default)]
    pub runs: Vec<Run>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_refuses_unknown_fields() {
        for req in [
            r#"{"cmd":"stop"}"#,
            r#"{"cmd":"reload"}"#,
            r#"{"cmd":"status","name":null}"#,
            r#"{"cmd":"restart","name":"a"}"#,
            r#"{"cmd":"plan","path":"/d.toml","text":""}"#,
            r#"{"cmd":"cancel","id":1}"#,
        ] {
            let parsed: Request = serde_json::from_str(req).unwrap_or_else(|e| panic!("{req}: {e}"));
            let back = serde_json::to_string(&parsed).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&back).unwrap(), parsed);
            let extra = format!("{},\"x\":1}}", &req[..req.len() - 1]);
            let err = serde_json::from_str::<Request>(&extra).unwrap_err().to_string();
            assert!(err.contains("unknown field `x`"), "{extra}: {err}");
        }
    }
}
