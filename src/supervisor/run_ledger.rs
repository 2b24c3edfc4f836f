//! The supervisor's handle on the run ledger. SQLite waits at most
//! [`ledger::SUPERVISOR_BUSY_TIMEOUT`] here, because the actor waits with it: a
//! ledger locked by another process delays job work, never supervision.
//! Writes that find it locked wait in order in memory and are retried on
//! a timer; work that needs an answer (a new run's id, a claim) is refused
//! with the reason, so a run's process still starts only after its claim
//! committed. A missing ledger (damaged beyond use, or from a newer
//! drover) disables jobs with a reason that status and trigger show.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ledger::{self, Kind, Ledger, RunState};
use crate::os::reaper::Exit;

/// How often a locked ledger is tried again.
pub const RETRY: Duration = Duration::from_millis(250);

/// Deferred writes kept at most; beyond, the oldest are dropped (logged).
const MAX_PENDING: usize = 10_000;

/// Why the ledger could not do what was asked.
#[derive(Clone, Debug, PartialEq)]
pub enum LedgerError {
    /// No ledger: jobs are disabled.
    Unavailable(String),
    /// Another process holds the lock; a retry later will do.
    Busy(String),
    /// Any other SQLite error.
    Failed(String),
}

impl fmt::Display for LedgerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LedgerError::Unavailable(e) => write!(f, "the run ledger is unavailable: {e}"),
            LedgerError::Busy(e) => {
                write!(
                    f,
                    "the run ledger is locked by another process ({e}); nothing was recorded, try again"
                )
            }
            LedgerError::Failed(e) => write!(f, "the run ledger failed: {e}"),
        }
    }
}

/// A write whose outcome the actor does not wait for.
#[derive(Clone, Debug)]
pub enum Write {
    Finish { id: i64, state: RunState, exit: Option<Exit>, error: Option<String> },
    Step { id: i64, index: u32, state: RunState, exit: Option<Exit>, error: Option<String> },
    SetProcess { id: i64, pid: i32, pgid: i32, pid_start: Option<u64>, log: PathBuf },
    Hold { id: i64, step: u32 },
    FailRunningSteps { id: i64, error: String },
    SetLastTick { job: String, tick: String },
    CountSkip { job: String },
    Prune { job: Option<String>, kind: Kind, retain: u32 },
}

/// What a write was, for the log: the run (or job) and the change.
impl std::fmt::Display for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Write::Finish { id, state, .. } => write!(f, "run {id} finished {}", state.as_str()),
            Write::Step { id, index, state, .. } => write!(f, "run {id} step {index} {}", state.as_str()),
            Write::SetProcess { id, pid, .. } => write!(f, "run {id} process {pid}"),
            Write::Hold { id, step } => write!(f, "run {id} waiting at step {step}"),
            Write::FailRunningSteps { id, .. } => write!(f, "run {id} running steps failed"),
            Write::SetLastTick { job, tick } => write!(f, "job {job} last tick {tick}"),
            Write::CountSkip { job } => write!(f, "job {job} skip"),
            Write::Prune { job: Some(job), .. } => write!(f, "prune job {job}"),
            Write::Prune { job: None, kind, .. } => write!(f, "prune {}", kind.as_str()),
        }
    }
}

pub struct RunLedger {
    ledger: Option<Ledger>,
    /// Why there is no ledger.
    unavailable: Option<String>,
    /// Why writes are waiting (the ledger is locked), while they are.
    busy: Option<String>,
    pending: VecDeque<Write>,
    /// Something was written since the WAL was last looked at.
    wrote: bool,
}

fn classify(e: rusqlite::Error) -> LedgerError {
    if ledger::is_busy(&e) { LedgerError::Busy(e.to_string()) } else { LedgerError::Failed(e.to_string()) }
}

impl RunLedger {
    pub fn none() -> Self {
        RunLedger { ledger: None, unavailable: None, busy: None, pending: VecDeque::new(), wrote: false }
    }

    /// Opens `state_dir/ledger.sqlite`, saying in the log what it found.
    pub fn open(state_dir: &Path) -> Self {
        let path = ledger::path_in(state_dir);
        let mut me = Self::none();
        match Ledger::open_for_supervisor(&path) {
            Ok((l, notes)) => {
                if let Some((moved, why)) = notes.moved_aside {
                    tracing::error!(
                        path = %path.display(),
                        moved_to = %moved.display(),
                        reason = %why,
                        "the run ledger was damaged: moved aside to {}, a new ledger was started (run history \
                         is in the moved file)",
                        moved.display()
                    );
                } else if notes.was_empty {
                    tracing::warn!(path = %path.display(), "the run ledger file was empty (0 bytes); started a new ledger");
                }
                me.ledger = Some(l);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot open the run ledger; jobs are disabled");
                me.unavailable = Some(e.to_string());
            }
        }
        me
    }

    /// The ledger, for reads (in WAL mode another process's write lock
    /// does not block them).
    pub fn read(&self) -> Result<&Ledger, LedgerError> {
        self.ledger.as_ref().ok_or_else(|| self.unavailable_error())
    }

    fn unavailable_error(&self) -> LedgerError {
        LedgerError::Unavailable(self.unavailable.clone().unwrap_or_else(|| "it was not opened".into()))
    }

    /// What status says about the ledger, when something is wrong.
    pub fn problem(&self) -> Option<String> {
        if self.ledger.is_none() {
            return Some(self.unavailable_error().to_string());
        }
        self.busy.as_ref().map(|b| {
            format!(
                "ledger busy: {b}, retrying ({} write{} waiting)",
                self.pending.len(),
                plural(self.pending.len())
            )
        })
    }

    pub fn is_busy(&self) -> bool {
        self.busy.is_some()
    }

    /// Work that needs its answer now. While writes are waiting for a
    /// locked ledger it is refused without touching SQLite (the retry
    /// timer probes): order is kept and the actor does not wait.
    pub fn now<T>(&mut self, f: impl FnOnce(&mut Ledger) -> rusqlite::Result<T>) -> Result<T, LedgerError> {
        if let Some(b) = &self.busy {
            return Err(LedgerError::Busy(b.clone()));
        }
        let Some(l) = self.ledger.as_mut() else { return Err(self.unavailable_error()) };
        match f(l) {
            Ok(v) => {
                self.wrote = true;
                Ok(v)
            }
            Err(e) => {
                let e = classify(e);
                if let LedgerError::Busy(b) = &e {
                    self.set_busy(b.clone());
                }
                Err(e)
            }
        }
    }

    fn set_busy(&mut self, why: String) {
        if self.busy.is_none() {
            tracing::warn!(reason = %why, "the run ledger is locked by another process; job work waits and is retried");
        }
        self.busy = Some(why);
    }

    /// Applies `w` now, or (the ledger is locked) after the writes already
    /// waiting; the caller arms the retry timer when [`Self::is_busy`].
    pub fn write(&mut self, w: Write) {
        if self.ledger.is_none() {
            return;
        }
        if self.busy.is_some() {
            self.push(w);
            return;
        }
        if let Err(why) = self.apply(&w) {
            self.push(w);
            self.set_busy(why);
        }
    }

    fn push(&mut self, w: Write) {
        if self.pending.len() >= MAX_PENDING
            && let Some(lost) = self.pending.pop_front()
        {
            tracing::error!(write = %lost, "too many ledger writes waiting for the lock; the oldest is dropped");
        }
        self.pending.push_back(w);
    }

    /// One write; `Err` only when the ledger is locked (any other error is
    /// logged: retrying would not help).
    fn apply(&mut self, w: &Write) -> Result<(), String> {
        let Some(l) = self.ledger.as_mut() else { return Ok(()) };
        let r = match w {
            Write::Finish { id, state, exit, error } => {
                match l.finish(*id, *state, exit.as_ref(), error.as_deref()) {
                    Ok(false) => {
                        tracing::warn!(run = id, "run was already final; left as it was");
                        Ok(())
                    }
                    r => r.map(drop),
                }
            }
            Write::Step { id, index, state, exit, error } => {
                l.step(*id, *index, *state, exit.as_ref(), error.as_deref())
            }
            Write::SetProcess { id, pid, pgid, pid_start, log } => {
                l.set_process(*id, *pid, *pgid, *pid_start, log)
            }
            Write::Hold { id, step } => l.hold(*id, *step).map(drop),
            Write::FailRunningSteps { id, error } => l.fail_running_steps(*id, error),
            Write::SetLastTick { job, tick } => l.set_last_tick(job, tick),
            Write::CountSkip { job } => l.count_skip(job),
            Write::Prune { job, kind, retain } => l.prune(job.as_deref(), *kind, *retain).map(|logs| {
                for log in logs {
                    let _ = std::fs::remove_file(&log);
                    let _ = std::fs::remove_file(format!("{}.1", log.display()));
                }
            }),
        };
        match r {
            Ok(()) => {
                self.wrote = true;
                Ok(())
            }
            Err(e) if ledger::is_busy(&e) => Err(e.to_string()),
            Err(e) => {
                tracing::error!(write = %w, error = %e, "cannot write the run ledger");
                Ok(())
            }
        }
    }

    /// The retry timer fired: applies the waiting writes in order. Returns
    /// true when the ledger is free again (the caller restarts job work),
    /// false when it is still locked (the caller arms the timer again).
    pub fn retry(&mut self) -> bool {
        while let Some(w) = self.pending.front().cloned() {
            if let Err(why) = self.apply(&w) {
                self.busy = Some(why);
                return false;
            }
            self.pending.pop_front();
        }
        if self.busy.take().is_some() {
            tracing::info!("the run ledger is free again; waiting job work continues");
        }
        true
    }

    /// drover is exiting: the writes still waiting for the lock get one
    /// longer wait (nothing is supervised any more), then are given up,
    /// logged; the next start finalizes what they would have.
    pub fn flush_before_exit(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if let Some(l) = &self.ledger {
            let _ = l.set_busy_timeout(std::time::Duration::from_secs(2));
        }
        if !self.retry() {
            tracing::error!(
                waiting = self.pending.len(),
                reason = self.busy.as_deref().unwrap_or("locked"),
                "the run ledger is still locked by another process; the runs' last changes are not recorded \
                 (the next start finalizes runs left active)"
            );
        }
    }

    /// After a batch of events: if something was written, checks that the
    /// WAL file is still the one SQLite writes (someone may have deleted
    /// it) and recovers what can be recovered. Costs one stat, and only
    /// when there was ledger activity.
    pub fn check_wal(&mut self) {
        if !std::mem::take(&mut self.wrote) {
            return;
        }
        let Some(l) = self.ledger.as_mut() else { return };
        let Some(what) = l.wal_replaced() else { return };
        match l.recover_wal() {
            Ok(()) => tracing::error!(
                problem = %what,
                "the run ledger's WAL file went away while drover ran: what this connection had written was \
                 checkpointed into the database and the ledger reopened on a new WAL; readers may have failed \
                 meanwhile"
            ),
            Err(e) => tracing::error!(
                problem = %what,
                error = %e,
                "the run ledger's WAL file went away while drover ran; recovery was partial: runs recorded since \
                 may be lost; the ledger was reopened"
            ),
        }
    }

    #[cfg(test)]
    fn pending(&self) -> usize {
        self.pending.len()
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, TransactionBehavior};

    use super::*;

    fn new_run(l: &mut Ledger) -> rusqlite::Result<i64> {
        crate::ledger::tests::new_job(l, "j")
    }

    #[test]
    fn a_locked_ledger_defers_writes_in_order_and_refuses_work_that_needs_an_answer() {
        let dir = tempfile::tempdir().unwrap();
        let mut rl = RunLedger::open(dir.path());
        let id = rl.now(new_run).unwrap();
        let owner = crate::ledger::Owner { pid: 1, start_ticks: 1 };
        assert!(rl.now(|l| l.claim(id, owner)).unwrap());

        let mut other = Connection::open(ledger::path_in(dir.path())).unwrap();
        let tx = other.transaction_with_behavior(TransactionBehavior::Exclusive).unwrap();
        rl.write(Write::Finish { id, state: RunState::Succeeded, exit: Some(Exit::code(0)), error: None });
        assert!(rl.is_busy(), "the first write that finds the lock makes it busy");
        rl.write(Write::CountSkip { job: "j".into() });
        assert_eq!(rl.pending(), 2, "later writes queue behind it");
        assert!(matches!(rl.now(new_run), Err(LedgerError::Busy(_))));
        assert!(rl.problem().unwrap().starts_with("ledger busy: database is locked"), "{:?}", rl.problem());
        assert!(!rl.retry(), "still locked");

        tx.rollback().unwrap();
        assert!(rl.retry());
        assert_eq!(rl.pending(), 0);
        assert_eq!(rl.problem(), None);
        let l = rl.read().unwrap();
        assert_eq!(l.get(id).unwrap().unwrap().state, RunState::Succeeded);
        assert_eq!(l.skips("j").unwrap(), 1);
    }

    #[test]
    fn no_ledger_means_every_request_names_why() {
        let mut rl = RunLedger::none();
        rl.unavailable = Some("x has schema version 9".into());
        let err = rl.now(new_run).unwrap_err();
        assert_eq!(err.to_string(), "the run ledger is unavailable: x has schema version 9");
        rl.write(Write::CountSkip { job: "j".into() });
        assert!(!rl.is_busy());
        assert_eq!(rl.problem().as_deref(), Some("the run ledger is unavailable: x has schema version 9"));
    }
}
