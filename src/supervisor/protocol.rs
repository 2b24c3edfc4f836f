//! The control protocol: one JSON request per line from the client, one
//! JSON response per line from the supervisor. The same types serve the
//! CLI and the daemon, and the status report doubles as the state file.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::reconcile::{Change, JobChange};
use crate::ledger::{Kind, Run, RunState};

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
        /// Answer with the report itself, indented as `status --json`
        /// prints it, and close: no reply line for the client to parse
        /// and indent again. An error is still a reply line.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pretty: bool,
    },
    Stop {},
    Reload {},
    Restart {
        name: String,
    },
    /// Stop, start or restart some instances (`drover stop web:1`, …).
    Instances {
        action: InstanceAction,
        targets: Vec<Target>,
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
    /// The recent state changes about `names` (none: all), one JSON line
    /// each; with `follow`, those to come too, until the client goes.
    Events {
        #[serde(default)]
        names: Vec<String>,
        #[serde(default)]
        follow: bool,
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
    /// What an `Instances` request acted on, each as it was before.
    Instances {
        message: String,
        instances: Vec<Affected>,
    },
}

impl Response {
    /// How every reply line begins (serde_json writes the tag first).
    pub const TAG: &[u8] = br#"{"reply":"#;

    /// How a status report's line begins: serde_json writes the tag first,
    /// then the report's own fields.
    pub const STATUS_TAG: &str = r#"{"reply":"status","#;

    /// Reads a response line. A status report (hundreds of KB at a
    /// thousand instances) is read straight into its struct: serde reads
    /// an internally tagged enum by first copying the whole object into a
    /// tree of its own, which would cost more than the reading itself.
    /// serde_json writes the tag first, so the line says what it holds.
    pub fn decode(line: &str) -> serde_json::Result<Response> {
        if line.starts_with(Self::STATUS_TAG) {
            // The report's fields follow the tag; `reply` is not one of
            // them and a report ignores what it does not know.
            return serde_json::from_str::<StatusReport>(line).map(|r| Response::Status(Box::new(r)));
        }
        serde_json::from_str(line)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceAction {
    /// Stop by hand: stopped until started again (or drover restarts).
    Stop,
    /// Start what is stopped (by hand or by the policy) or parked.
    Start,
    /// Replace, one at a time; a held instance is started.
    Restart,
}

/// A worker, or one instance of it: `web` or `web:1` on the command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub worker: String,
    #[serde(default)]
    pub index: Option<u32>,
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (worker, index) = match s.split_once(':') {
            None => (s, None),
            Some((w, i)) => match i.parse::<u32>() {
                Ok(i) => (w, Some(i)),
                Err(_) => {
                    return Err(format!(
                        "{s:?}: the instance after ':' must be a number, as in {w}:0 (or name the whole worker: {w})"
                    ));
                }
            },
        };
        if worker.is_empty() {
            return Err(format!("{s:?}: no worker name; write NAME or NAME:INDEX, as in web:0"));
        }
        Ok(Target { worker: worker.to_string(), index })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.index {
            Some(i) => write!(f, "{}:{i}", self.worker),
            None => f.write_str(&self.worker),
        }
    }
}

/// One instance an `Instances` request acted on, as it was before: a
/// client waiting for a restart waits until `deploys` has grown or the
/// instance was started since (`started_at` moved on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Affected {
    pub worker: String,
    pub index: u32,
    pub pid: Option<i32>,
    pub deploys: u32,
    pub started_at: Option<Arc<str>>,
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
    /// "cgroup" or "process-group": how instances are contained, chosen
    /// at start (absent in state files of older drovers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containment: Option<String>,
    /// In cgroup mode, the cgroup the instances' cgroups are made in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
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
    /// A rolling restart under way: which instance it waits for, or why
    /// it stalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// The listening sockets drover holds for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sockets: Vec<SocketStatus>,
    pub instances: Vec<InstanceStatus>,
}

/// One of a worker's sockets in status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SocketStatus {
    /// "tcp://127.0.0.1:8000", "unix:///run/app.sock".
    pub address: String,
    /// Its name in LISTEN_FDNAMES.
    pub name: String,
    pub bound: bool,
    /// Why it is not bound: the address and the OS error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub index: u32,
    /// Started beside instance `index` to replace it (a worker with
    /// sockets), or the old one it replaced, on its way out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub surge: bool,
    pub pid: Option<i32>,
    /// The process group drover signals to stop this instance.
    pub pgid: Option<i32>,
    /// In cgroup mode, the cgroup its processes run in (none escapes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<Arc<Path>>,
    #[serde(default)]
    pub start_ticks: Option<u64>,
    /// waiting, starting, running, backoff, parked, stopping, stopped.
    pub state: Cow<'static, str>,
    /// Restarts after a crash (an exit the policy restarted).
    pub restarts: u32,
    /// Restarts caused by a config change or `drover restart`.
    #[serde(default)]
    pub deploys: u32,
    /// Stopped by hand (`drover stop`): not restarted until `drover start`.
    #[serde(default)]
    pub held: bool,
    pub started_at: Option<Arc<str>>,
    pub last_exit: Option<Exit>,
    /// Why it is parked, or why it could not be started.
    pub error: Option<String>,
    /// When a restart in backoff is due.
    pub next_start_at: Option<String>,
    /// For a stopping instance: when its group gets SIGKILL if it is
    /// still there (none once SIGKILL is sent).
    #[serde(default)]
    pub kill_at: Option<String>,
    /// For a waiting instance: the dependencies not met, as "db (ready)".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
    /// The last `STATUS=` line the instance sent (sd_notify).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_status: Option<String>,
    /// CPU time its processes used, in seconds (read when status is
    /// asked, never stored in the state file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// Resident memory of its processes, in bytes (as `cpu_seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
}

impl StatusReport {
    /// Fills in what each running instance uses: its cgroup's counters
    /// (cgroup mode), and what they lack (memory, without the memory
    /// controller) or what has no cgroup, its process group's, from one
    /// pass over /proc. Blocking file reads, so never on the actor's event
    /// loop.
    pub fn add_usage(&mut self) {
        use crate::os::usage::{Counters, Usage};
        let instances = || self.workers.iter().flat_map(|w| &w.instances).filter(|i| i.pid.is_some());
        let dirs: Vec<&std::path::Path> = instances().filter_map(|i| i.cgroup.as_deref()).collect();
        // In the order of `dirs`: one for each running instance with a cgroup.
        let mut by_cgroup = crate::os::usage::counters_of_cgroups(&dirs).into_iter();
        let counted: Vec<Counters> = instances()
            .map(|i| if i.cgroup.is_some() { by_cgroup.next() } else { None }.unwrap_or_default())
            .collect();
        let pgids: Vec<i32> = instances()
            .zip(&counted)
            .filter(|(_, c)| c.cpu_seconds.is_none() || c.rss_bytes.is_none())
            .filter_map(|(i, _)| i.pgid)
            .collect();
        let by_group = crate::os::usage::of_groups(&pgids);
        let mut counted = counted.into_iter();
        let found: Vec<Option<Usage>> = self
            .workers
            .iter()
            .flat_map(|w| &w.instances)
            .map(|i| {
                i.pid?;
                let c = counted.next().unwrap_or_default();
                let g = i.pgid.and_then(|g| by_group.get(&g).copied());
                Some(Usage {
                    cpu_seconds: c.cpu_seconds.or(g.map(|g| g.cpu_seconds))?,
                    rss_bytes: c.rss_bytes.or(g.map(|g| g.rss_bytes))?,
                })
            })
            .collect();
        for (i, u) in self.workers.iter_mut().flat_map(|w| &mut w.instances).zip(found) {
            if let Some(u) = u {
                i.cpu_seconds = Some(u.cpu_seconds);
                i.rss_bytes = Some(u.rss_bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_line_reads_as_the_generic_reader_reads_it() {
        let mut report = StatusReport::default();
        report.supervisor.state = "running".into();
        report.workers.push(WorkerStatus {
            name: "web".into(),
            capacity: 2,
            state: "running".into(),
            rollout: None,
            sockets: Vec::new(),
            instances: vec![InstanceStatus {
                index: 1,
                pid: Some(42),
                state: "running".into(),
                ..Default::default()
            }],
        });
        let resp = Response::Status(Box::new(report));
        let line = serde_json::to_string(&resp).unwrap();
        assert!(line.starts_with(r#"{"reply":"status","#), "{line}");
        assert_eq!(Response::decode(&line).unwrap(), resp);
        assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), resp);
        // Every other reply goes the generic way.
        let ok = Response::Ok { message: "done".into() };
        assert_eq!(Response::decode(&serde_json::to_string(&ok).unwrap()).unwrap(), ok);
        assert!(Response::decode(r#"{"reply":"status","workers":7}"#).is_err());
    }

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

/// A job's line in `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub name: String,
    pub kind: Kind,
    pub trigger: String,
    pub next_tick: Option<String>,
    pub active: Vec<i64>,
    pub queued: usize,
    pub skips: u64,
    pub last_run: Option<RunSummary>,
    /// A dependency run held until these are met, as "db (ready)".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub id: i64,
    pub state: RunState,
    pub ended_at: Option<String>,
}
