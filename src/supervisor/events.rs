//! What wakes the supervisor: the events its inbox carries, the timers it
//! owns, and whose process a pid is. Everything that feeds the actor
//! (control, watch, pumps, probes, spawning threads) depends on this
//! module, not on the actor.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::child::{LaunchError, Started};
use super::probes::{NotifyEvent, Role, Verdict};
use super::protocol::{Request, Response};
use super::workers::instance::TimerKind;
use crate::os::reaper::Reaped;

/// Everything that can wake the supervisor.
#[derive(Debug)]
pub enum Event {
    Reaped(Vec<Reaped>),
    /// A probe of an instance came to a verdict.
    Probe {
        worker: String,
        index: u32,
        incarnation: u64,
        role: Role,
        verdict: Verdict,
    },
    /// An instance sent a notice to the notify socket.
    Notify(NotifyEvent),
    /// An instance's process was spawned (off the event loop), or not.
    InstanceSpawned {
        worker: String,
        index: u32,
        incarnation: u64,
        /// Its git worktree, in worktree mode, when one was made.
        worktree: Option<PathBuf>,
        result: Result<Started, LaunchError>,
    },
    /// A run step's process was spawned (off the event loop), or not.
    RunSpawned {
        run: i64,
        inc: u64,
        step: u32,
        result: Result<Started, LaunchError>,
    },
    /// One output stream of a run's step reached its end.
    RunOutputClosed {
        run: i64,
        inc: u64,
        step: u32,
    },
    Control(Request, oneshot::Sender<Reply>),
    /// SIGTERM / SIGINT; a second one while stopping kills at once.
    Shutdown,
    /// A cgroup drover watches has no process left (`cgroup.events`).
    CgroupEmpty(PathBuf),
    /// The memory of the instances with `max_memory`, read off the loop.
    MemorySampled(Vec<super::actor::Sample>),
    /// SIGHUP, `drover reload`, or the file watcher.
    Reload(Option<oneshot::Sender<Response>>),
    /// A scrape of `/metrics` asks for the state to encode.
    Metrics(oneshot::Sender<super::metrics::Snapshot>),
}

/// What the actor answers a request with: a response, or one it encoded
/// already (a cached status report, shared by every client that asks).
#[derive(Debug)]
pub enum Reply {
    Response(Response),
    /// A status report (shared by every client that asks until the state
    /// changes): the server adds the instances' usage, read from /proc
    /// off the actor's loop, and encodes it.
    Status(Arc<super::protocol::StatusReport>),
    /// A subscription to state changes: the server streams it.
    Events(super::live::Subscription),
}

/// The actor's full status report while it is current, shared with the
/// control connections: they answer `status` from it without waking the
/// actor's thread (two cross-thread wake-ups a request). The actor empties
/// it as it takes any event that may change the report, before anything
/// the event sets off can be seen, so a report served from here is one the
/// actor would have given at that moment.
#[derive(Clone, Debug, Default)]
pub struct StatusCache(Arc<std::sync::Mutex<Option<Arc<super::protocol::StatusReport>>>>);

impl StatusCache {
    pub fn get(&self) -> Option<Arc<super::protocol::StatusReport>> {
        self.0.lock().ok().and_then(|r| r.clone())
    }

    pub fn set(&self, report: Arc<super::protocol::StatusReport>) {
        if let Ok(mut r) = self.0.lock() {
            *r = Some(report);
        }
    }

    pub fn clear(&self) {
        if let Ok(mut r) = self.0.lock() {
            *r = None;
        }
    }
}

/// A timer the actor owns (see `timers`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerKey {
    Instance(String, u32, TimerKind),
    /// A job's scheduled tick (or a tick delayed by a locked ledger).
    JobTick(String),
    /// A run's timeout, its stop grace, or the drain of its step's output.
    Run(i64, RunTimer),
    /// Time to try a locked ledger again.
    LedgerRetry,
    /// Time to sample the memory of the instances with `max_memory`.
    MemorySample,
    /// Time to write the state file that waited (see `STATE_GAP`).
    StateFile,
}

/// Whose process a pid is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proc {
    Instance(String, u32),
    Run(i64),
}

/// A run's timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RunTimer {
    Timeout,
    Kill,
    /// The step's output did not close within [`DRAIN`].
    Drain,
}
