//! Jobs, flows and background sessions: the supervisor's side of the run
//! ledger. A run is created queued, claimed (queued -> running, committed)
//! before any process starts, and finalized on every path: exit, spawn
//! failure, timeout, cancel, and drover's own stop. Schedules persist their
//! last tick in the ledger, so a restart neither fires every job at once
//! nor forgets.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal as NixSignal;
use serde::{Deserialize, Serialize};

use super::actor::{Event, Proc, Supervisor};
use super::clock::{later, rfc3339};
use super::logs::{LogFile, Sink, pump};
use crate::config::model::{Job, OnOverlap, Step, Trigger, secret_values};
use crate::config::resolve::parse_cron;
use crate::config::types::Signal;
use crate::ledger::{Kind, NewRun, Run, RunState, Source};
use crate::os::proc;
use crate::os::reaper::Exit;

/// Terminal sessions kept in the ledger.
pub const SESSION_RETAIN: u32 = 50;

/// A job as the supervisor runs it.
pub struct JobRt {
    pub spec: Job,
    /// When the next scheduled tick fires.
    pub next: Option<SystemTime>,
    /// Bumped whenever `next` is re-armed, so an older timer is ignored.
    pub epoch: u64,
    /// Runs waiting for a slot (on_overlap = "queue" or "replace").
    pub queue: VecDeque<i64>,
}

/// A run with a process (or about to have one).
pub struct RunProc {
    pub id: i64,
    pub job: Option<String>,
    pub kind: Kind,
    pub steps: Vec<Step>,
    pub step: u32,
    pub pid: Option<i32>,
    pub pgid: Option<i32>,
    pub started: Instant,
    /// The outcome decided when drover asked the run to stop (cancel,
    /// timeout, replace, shutdown), applied once its process is gone.
    pub stopping: Option<(RunState, String)>,
    pub epoch: u64,
    pub sink: Arc<Sink>,
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
    pub stop_signal: Signal,
    pub stop_grace: Duration,
    pub timeout: Option<Duration>,
    /// Which start of this run this is (a held flow is started again on
    /// resume): timers of an earlier start are ignored.
    pub inc: u64,
    /// Output streams of the current step still open.
    pub open_streams: u8,
    /// The step's end, kept until its output is all written.
    pub pending_end: Option<(Option<Exit>, Option<String>)>,
    /// The approval step that `runs resume` approved.
    pub approved: Option<u32>,
}

/// Numbers the starts of runs, for [`RunProc::inc`].
static NEXT_INC: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How long a step's output may stay open after its process ended (a
/// process that left the group can hold the pipe) before the run ends anyway.
const DRAIN: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunTimer {
    Timeout,
    Kill,
    /// The step's output did not close within [`DRAIN`].
    Drain,
}

/// A step's process, handed from the spawning thread to the actor.
#[derive(Debug)]
pub struct SpawnedProc {
    pub pid: i32,
    pub stdout: Option<std::os::fd::OwnedFd>,
    pub stderr: Option<std::os::fd::OwnedFd>,
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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub id: i64,
    pub state: RunState,
    pub ended_at: Option<String>,
}

/// The tick after `after`, for a schedule or an interval.
pub fn next_tick(trigger: &Trigger, after: SystemTime) -> Option<SystemTime> {
    match trigger {
        Trigger::Manual => None,
        Trigger::Every(d) => Some(later(after, d.0)),
        Trigger::Schedule { cron, timezone: None } => {
            let cron = parse_cron(cron).ok()?;
            let start: chrono::DateTime<chrono::Local> = after.into();
            cron.find_next_occurrence(&start, false).ok().map(SystemTime::from)
        }
        Trigger::Schedule { cron, timezone: Some(tz) } => {
            let cron = parse_cron(cron).ok()?;
            let tz = tzfile::Tz::named(tz).ok()?;
            let start = chrono::DateTime::<chrono::Utc>::from(after).with_timezone(&&tz);
            let next = cron.find_next_occurrence(&start, false).ok()?;
            Some(SystemTime::from(next.with_timezone(&chrono::Utc)))
        }
    }
}

/// A fixed offset in `0..jitter` for a job, the same every time (FNV-1a of
/// its name), so its runs are spread but predictable.
pub fn jitter_of(name: &str, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return Duration::ZERO;
    }
    let h = name.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3));
    // The modulus is at least 1 and, past u64 milliseconds, saturates.
    Duration::from_millis(h % u64::try_from(jitter.as_millis()).unwrap_or(u64::MAX).max(1))
}

/// Where to resume a failed or cancelled flow: its first step that did not
/// succeed.
pub fn resume_point(run: &Run) -> u32 {
    run.steps.iter().find(|s| s.state != RunState::Succeeded).map_or(0, |s| s.index)
}

pub fn run_log_path(state_dir: &Path, id: i64) -> PathBuf {
    state_dir.join("runs").join(format!("{id}.log"))
}

fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

impl Supervisor {
    // ----- start-up -----

    /// Finalizes what a previous supervisor left active, then arms every
    /// schedule from its persisted last tick.
    pub(super) fn boot_jobs(&mut self) {
        let Some(ledger) = &self.ledger else { return };
        match ledger.active() {
            Ok(runs) => {
                for r in runs {
                    match r.state {
                        RunState::Running => {
                            if let Some(pgid) = r.pgid {
                                proc::kill_recorded_group(pgid, r.pid_start);
                            }
                            let why = "supervisor exited while the run was active";
                            let _ = ledger.fail_running_steps(r.id, why);
                            let _ = ledger.finish(r.id, RunState::Failed, None, Some(why));
                        }
                        RunState::Queued => {
                            let _ = ledger.finish(
                                r.id,
                                RunState::Cancelled,
                                None,
                                Some("supervisor exited before the run started"),
                            );
                        }
                        // A flow held for approval waits across restarts.
                        _ => {}
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the ledger's active runs"),
        }
        let names: Vec<String> = self.config.jobs.keys().cloned().collect();
        for name in names {
            let spec = self.config.jobs[&name].clone();
            self.jobs.insert(name.clone(), JobRt { spec, next: None, epoch: 0, queue: VecDeque::new() });
            self.arm_schedule(&name, true);
        }
    }

    /// Sets the job's next tick; at start-up, runs a missed tick once if
    /// `catch_up` is set.
    fn arm_schedule(&mut self, name: &str, at_start: bool) {
        let now = SystemTime::now();
        let Some(job) = self.jobs.get(name) else { return };
        let last =
            self.ledger.as_ref().and_then(|l| l.last_tick(name).ok().flatten()).and_then(|t| parse_time(&t));
        let trigger = job.spec.trigger.clone();
        let catch_up = job.spec.catch_up;
        let mut next = match last {
            Some(last) => next_tick(&trigger, last),
            None => next_tick(&trigger, now),
        };
        if let Some(n) = next
            && n <= now
        {
            // Ticks were missed while drover was down: at most one run,
            // never a burst; the schedule moves on from now.
            if at_start && catch_up {
                tracing::info!(job = name, "catching up a tick missed while drover was down");
                if let Some(l) = &self.ledger {
                    let _ = l.set_last_tick(name, &rfc3339(now));
                }
                let _ = self.admit(name, Source::CatchUp, None, 0);
            }
            next = next_tick(&trigger, now);
        }
        self.set_next(name, next);
    }

    fn set_next(&mut self, name: &str, next: Option<SystemTime>) {
        let Some(job) = self.jobs.get_mut(name) else { return };
        job.epoch += 1;
        job.next = next;
        let Some(at) = next else { return };
        let fire = later(at, jitter_of(name, job.spec.jitter.0));
        let delay = fire.duration_since(SystemTime::now()).unwrap_or_default();
        let (tx, job_name, epoch) = (self.tx.clone(), name.to_string(), job.epoch);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Event::JobTick { job: job_name, epoch });
        });
    }

    pub(super) fn on_job_tick(&mut self, name: &str, epoch: u64) {
        let Some(job) = self.jobs.get(name) else { return };
        if job.epoch != epoch || self.shutting_down {
            return;
        }
        let tick = job.next.unwrap_or_else(SystemTime::now);
        let trigger = job.spec.trigger.clone();
        if let Some(l) = &self.ledger {
            let _ = l.set_last_tick(name, &rfc3339(tick));
        }
        if let Err(msg) = self.admit(name, Source::Schedule, None, 0) {
            tracing::info!(job = name, reason = %msg, "tick skipped");
        }
        let now = SystemTime::now();
        let next = next_tick(&trigger, tick).filter(|n| *n > now).or_else(|| next_tick(&trigger, now));
        self.set_next(name, next);
    }

    // ----- admission -----

    fn running_of(&self, job: &str) -> Vec<i64> {
        let mut ids: Vec<i64> =
            self.runs.values().filter(|r| r.job.as_deref() == Some(job)).map(|r| r.id).collect();
        ids.sort_unstable();
        ids
    }

    /// A tick, trigger or resume of `job`: starts a run, queues it, or
    /// skips, as capacity and `on_overlap` say. Returns the run id, or why
    /// nothing was started.
    pub(super) fn admit(
        &mut self,
        name: &str,
        source: Source,
        parent: Option<i64>,
        first_step: u32,
    ) -> Result<i64, String> {
        let Some(job) = self.jobs.get(name) else { return Err(format!("no job named {name:?}")) };
        let spec = job.spec.clone();
        let active = self.running_of(name);
        let at_capacity = active.len() as u32 >= spec.capacity;
        let queued = job.queue.len() as u32;
        let skip = |this: &mut Self, why: String| {
            if let Some(l) = &this.ledger {
                let _ = l.count_skip(name);
            }
            Err(why)
        };
        if at_capacity {
            match spec.on_overlap {
                OnOverlap::Skip => {
                    return skip(self, format!("skipped: {name} is at capacity ({} active)", active.len()));
                }
                OnOverlap::Queue if queued >= spec.queue_limit => {
                    return skip(self, format!("skipped: the queue of {name} is full ({queued} waiting)"));
                }
                _ => {}
            }
        }
        let id = self.create_run(name, &spec, source, parent, first_step)?;
        if !at_capacity {
            self.start_run(id);
            return Ok(id);
        }
        let job = self.jobs.get_mut(name).expect("checked above");
        if spec.on_overlap == OnOverlap::Replace {
            // Only the newest replacement waits: earlier ones never start.
            let superseded: Vec<i64> = job.queue.drain(..).collect();
            job.queue.push_back(id);
            for old in superseded {
                self.finalize(old, RunState::Cancelled, None, Some(format!("replaced by run {id}")));
            }
            // The new run starts once the oldest active one is gone.
            if let Some(&oldest) = active.first() {
                self.stop_run(oldest, RunState::Cancelled, format!("replaced by run {id}"));
            }
        } else {
            job.queue.push_back(id);
        }
        Ok(id)
    }

    fn create_run(
        &mut self,
        name: &str,
        spec: &Job,
        source: Source,
        parent: Option<i64>,
        first_step: u32,
    ) -> Result<i64, String> {
        let Some(ledger) = self.ledger.as_mut() else { return Err("the run ledger is not available".into()) };
        let step_names: Vec<String> =
            if spec.flow { spec.steps.iter().map(|s| s.name.clone()).collect() } else { Vec::new() };
        ledger
            .create(&NewRun {
                job: Some(name),
                kind: if spec.flow { Kind::Flow } else { Kind::Job },
                source,
                parent,
                name: None,
                command: &spec.steps[0].command,
                steps: &step_names,
                first_step,
            })
            .map_err(|e| format!("cannot record the run: {e}"))
    }

    /// Claims a queued run (committed before anything starts) and starts
    /// its current step.
    fn start_run(&mut self, id: i64) {
        let Some(ledger) = &self.ledger else { return };
        let run = match ledger.get(id) {
            Ok(Some(r)) => r,
            _ => return,
        };
        match ledger.claim(id, self.owner) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(run = id, "run is no longer claimable; dropped");
                return;
            }
            Err(e) => {
                tracing::error!(run = id, error = %e, "cannot claim the run");
                return;
            }
        }
        self.start_claimed(run, None);
    }

    /// Starts the current step of a run that is ours (claimed or released).
    fn start_claimed(&mut self, run: Run, approved: Option<u32>) {
        let state_dir = self.config.supervisor.state_dir.clone();
        let log = run_log_path(&state_dir, run.id);
        let sup = &self.config.supervisor;
        let file = LogFile::lazy(log.clone(), sup.log_max_size.0, 1);
        let label = run.job.clone().or(run.name.clone()).unwrap_or_else(|| format!("run-{}", run.id));
        let secrets = run
            .job
            .as_deref()
            .and_then(|j| self.jobs.get(j))
            .map(|j| secret_values(&j.spec.env, &j.spec.secret_env))
            .unwrap_or_default();
        let sink = Arc::new(Sink::new(format!("{label}#{}", run.id), file, self.echo.clone(), secrets));

        let (steps, dir, env, stop_signal, stop_grace, timeout) =
            match run.job.as_deref().and_then(|j| self.jobs.get(j)) {
                Some(job) => {
                    let s = &job.spec;
                    (
                        s.steps.clone(),
                        s.dir.clone(),
                        s.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                        s.stop_signal,
                        s.stop_grace.0,
                        s.timeout.map(|t| t.0),
                    )
                }
                None => (
                    vec![Step { name: "main".into(), command: run.command.clone(), approve: false }],
                    run.name.as_ref().map(|_| PathBuf::from("/")).unwrap_or_else(|| "/".into()),
                    Vec::new(),
                    self.config.defaults.stop_signal,
                    self.config.defaults.stop_grace.0,
                    None,
                ),
            };
        let dir = self.session_dirs.remove(&run.id).unwrap_or(dir);
        let rp = RunProc {
            id: run.id,
            job: run.job.clone(),
            kind: run.kind,
            steps,
            step: run.step.unwrap_or(0),
            pid: None,
            pgid: None,
            started: Instant::now(),
            stopping: None,
            epoch: 0,
            sink,
            dir,
            env,
            stop_signal,
            stop_grace,
            timeout,
            inc: NEXT_INC.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            open_streams: 0,
            pending_end: None,
            approved,
        };
        let inc = rp.inc;
        self.runs.insert(run.id, rp);
        if let Some(t) = timeout {
            self.run_timer(run.id, inc, 0, RunTimer::Timeout, t);
        }
        self.spawn_step(run.id);
    }

    fn spawn_step(&mut self, id: i64) {
        let state_dir = self.config.supervisor.state_dir.clone();
        let Some(rp) = self.runs.get_mut(&id) else { return };
        let step = rp.steps[rp.step as usize].clone();
        if step.approve && rp.approved != Some(rp.step) {
            // Held before an approval step: the run keeps no process and
            // no slot until `runs resume`.
            if let Some(l) = &self.ledger {
                let _ = l.hold(id, rp.step);
            }
            tracing::info!(run = id, step = %step.name, "flow waiting for approval");
            let job = rp.job.clone();
            self.runs.remove(&id);
            if let Some(j) = job {
                self.start_queued(&j);
            }
            return;
        }
        rp.pending_end = None;
        rp.open_streams = 0;
        let mut cmd = std::process::Command::new(&step.command[0]);
        cmd.args(&step.command[1..])
            .current_dir(&rp.dir)
            .envs(rp.env.iter().cloned())
            .env("DROVER_RUN", id.to_string())
            .env("DROVER_STATE_DIR", &state_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(j) = &rp.job {
            cmd.env("DROVER_JOB", j).env("DROVER_STEP", &step.name);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        proc::give_back_fd_limit(&mut cmd);
        if rp.kind == Kind::Flow
            && let Some(l) = &self.ledger
        {
            let _ = l.step(id, rp.step, RunState::Running, None, None);
        }
        // The spawn happens off the event loop: each one blocks its thread
        // until the child has exec'd, and runs come by the hundred.
        let (reaper, tx, inc, step_index) = (self.reaper.clone(), self.tx.clone(), rp.inc, rp.step);
        let program = step.command[0].clone();
        self.spawns_in_flight += 1;
        tokio::task::spawn_blocking(move || {
            let result = reaper
                .spawn(&mut cmd)
                .map(|mut child| SpawnedProc {
                    pid: child.id() as i32,
                    stdout: child.stdout.take().map(std::os::fd::OwnedFd::from),
                    stderr: child.stderr.take().map(std::os::fd::OwnedFd::from),
                })
                .map_err(|e| format!("cannot start {program:?}: {e}"));
            let _ = tx.send(Event::RunSpawned { run: id, inc, step: step_index, result });
        });
    }

    /// A step's process was spawned (or could not be).
    pub(super) fn on_run_spawned(
        &mut self,
        id: i64,
        inc: u64,
        step: u32,
        result: Result<SpawnedProc, String>,
    ) {
        self.spawns_in_flight -= 1;
        let current =
            self.runs.get(&id).is_some_and(|rp| rp.inc == inc && rp.step == step && rp.stopping.is_none());
        let sp = match result {
            Err(msg) => {
                if current {
                    self.step_ended(id, None, Some(msg));
                }
                return;
            }
            Ok(sp) => sp,
        };
        let pid = sp.pid;
        if !current {
            // Cancelled while it was being spawned: it must not run on.
            let _ = proc::signal_group(pid, NixSignal::SIGKILL);
            crate::os::groups::remove(pid);
            if self.early_exits.remove(&pid).is_none() {
                self.discarded.insert(pid);
            }
            return;
        }
        let state_dir = self.config.supervisor.state_dir.clone();
        let rp = self.runs.get_mut(&id).expect("checked above");
        rp.pid = Some(pid);
        rp.pgid = Some(pid);
        for (stream, pipe) in [("out", sp.stdout), ("err", sp.stderr)] {
            if let Some(fd) = pipe
                && let Ok(rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
            {
                // The run ends only once its output is all written.
                let (tx, inc, step) = (self.tx.clone(), rp.inc, rp.step);
                let on_close: Box<dyn FnOnce() + Send> = Box::new(move || {
                    let _ = tx.send(Event::RunOutputClosed { run: id, inc, step });
                });
                rp.open_streams += 1;
                tokio::spawn(pump(rp.sink.clone(), rp.step, stream, rx, Some(on_close)));
            }
        }
        tracing::info!(run = id, job = rp.job.as_deref(), step = %rp.steps[step as usize].name, pid, "run step started");
        self.by_pid.insert(pid, Proc::Run(id));
        if let Some(l) = &self.ledger {
            let _ = l.set_process(id, pid, pid, proc::start_ticks(pid), &run_log_path(&state_dir, id));
        }
        // It may have ended before this event was handled.
        if let Some(exit) = self.early_exits.remove(&pid) {
            self.by_pid.remove(&pid);
            self.on_run_exit(id, exit);
        }
    }

    // ----- ends -----

    pub(super) fn on_run_exit(&mut self, id: i64, exit: Exit) {
        let Some(rp) = self.runs.get_mut(&id) else { return };
        rp.pid = None;
        // A step is done when its main process is; what it left behind in
        // its group goes with it.
        if let Some(pgid) = rp.pgid.take() {
            if proc::group_alive(pgid) {
                let _ = proc::signal_group(pgid, NixSignal::SIGKILL);
            }
            crate::os::groups::remove(pgid);
        }
        if rp.open_streams == 0 {
            self.step_ended(id, Some(exit), None);
        } else {
            rp.pending_end = Some((Some(exit), None));
            rp.epoch += 1;
            let (inc, epoch) = (rp.inc, rp.epoch);
            self.run_timer(id, inc, epoch, RunTimer::Drain, DRAIN);
        }
    }

    pub(super) fn on_run_output_closed(&mut self, id: i64, inc: u64, step: u32) {
        let Some(rp) = self.runs.get_mut(&id) else { return };
        if rp.inc != inc || rp.step != step {
            return;
        }
        rp.open_streams = rp.open_streams.saturating_sub(1);
        if rp.open_streams == 0
            && let Some((exit, error)) = rp.pending_end.take()
        {
            self.step_ended(id, exit, error);
        }
    }

    /// The current step's process ended (or never started: `error`).
    fn step_ended(&mut self, id: i64, exit: Option<Exit>, error: Option<String>) {
        let Some(rp) = self.runs.get_mut(&id) else { return };
        rp.epoch += 1;
        let ok = exit.as_ref().is_some_and(Exit::success);
        let step = rp.step;
        let step_name = rp.steps[step as usize].name.clone();
        let flow = rp.kind == Kind::Flow;
        if flow && let Some(l) = &self.ledger {
            let state = match (&rp.stopping, ok) {
                (Some((s, _)), _) => *s,
                (None, true) => RunState::Succeeded,
                (None, false) => RunState::Failed,
            };
            let _ = l.step(id, step, state, exit.as_ref(), error.as_deref());
        }
        if let Some((state, why)) = rp.stopping.clone() {
            self.finalize(id, state, exit.as_ref(), Some(why));
            return;
        }
        if !ok {
            let what = if flow { format!("step {step_name} ") } else { String::new() };
            let why = error.unwrap_or_else(|| match &exit {
                Some(e) => format!("{what}ended with {e}"),
                None => format!("{what}failed"),
            });
            self.finalize(id, RunState::Failed, exit.as_ref(), Some(why));
            return;
        }
        let next = step + 1;
        if (next as usize) >= rp.steps.len() {
            self.finalize(id, RunState::Succeeded, exit.as_ref(), None);
            return;
        }
        rp.step = next;
        self.spawn_step(id);
    }

    fn finalize(&mut self, id: i64, state: RunState, exit: Option<&Exit>, error: Option<String>) {
        let rp = self.runs.remove(&id);
        if let Some(l) = &self.ledger {
            match l.finish(id, state, exit, error.as_deref()) {
                Ok(true) => {}
                Ok(false) => tracing::warn!(run = id, "run was already final; left as it was"),
                Err(e) => tracing::error!(run = id, error = %e, "cannot finalize the run"),
            }
        }
        tracing::info!(run = id, state = state.as_str(), error = error.as_deref(), "run ended");

        let job = rp.as_ref().and_then(|r| r.job.clone());
        let kind = rp.as_ref().map_or(Kind::Job, |r| r.kind);
        self.prune(job.as_deref(), kind);
        if let Some(j) = job {
            self.start_queued(&j);
        }
    }

    /// Deletes terminal runs beyond retention, with their logs.
    fn prune(&mut self, job: Option<&str>, kind: Kind) {
        let retain = match job.and_then(|j| self.jobs.get(j)) {
            Some(j) => j.spec.retain,
            None if job.is_none() => SESSION_RETAIN,
            None => return,
        };
        let Some(l) = self.ledger.as_mut() else { return };
        let kinds: &[Kind] = if job.is_none() { &[Kind::Session] } else { &[kind] };
        for k in kinds {
            if let Ok(logs) = l.prune(job, *k, retain) {
                for log in logs {
                    let _ = std::fs::remove_file(&log);
                    let _ = std::fs::remove_file(format!("{}.1", log.display()));
                }
            }
        }
    }

    /// A slot of `job` freed: start its next queued run.
    fn start_queued(&mut self, job: &str) {
        if self.shutting_down {
            return;
        }
        let Some(j) = self.jobs.get(job) else { return };
        if self.running_of(job).len() as u32 >= j.spec.capacity {
            return;
        }
        if let Some(id) = self.jobs.get_mut(job).and_then(|j| j.queue.pop_front()) {
            self.start_run(id);
        }
    }

    /// Asks a running run to stop; `state` and `why` are its outcome.
    pub(super) fn stop_run(&mut self, id: i64, state: RunState, why: String) {
        let Some(rp) = self.runs.get_mut(&id) else { return };
        if rp.stopping.is_some() {
            return;
        }
        rp.stopping = Some((state, why));
        rp.epoch += 1;
        let (sig, grace, epoch) = (rp.stop_signal.to_nix(), rp.stop_grace, rp.epoch);
        match rp.pgid {
            Some(pgid) => {
                let _ = proc::signal_group(pgid, sig);
                let _ = proc::signal_group(pgid, NixSignal::SIGCONT);
                let inc = rp.inc;
                self.run_timer(id, inc, epoch, RunTimer::Kill, grace);
            }
            None => {
                let (state, why) = rp.stopping.clone().expect("just set");
                self.finalize(id, state, None, Some(why));
            }
        }
    }

    pub(super) fn on_run_timer(&mut self, id: i64, inc: u64, epoch: u64, kind: RunTimer) {
        let Some(rp) = self.runs.get_mut(&id) else { return };
        if rp.inc != inc {
            return; // set for an earlier start of this run
        }
        match kind {
            RunTimer::Drain => {
                if rp.epoch == epoch
                    && let Some((exit, error)) = rp.pending_end.take()
                {
                    tracing::warn!(run = id, "output still open after the step ended; ending the run anyway");
                    self.step_ended(id, exit, error);
                }
            }
            RunTimer::Timeout => {
                let t = rp.timeout.unwrap_or_else(|| rp.started.elapsed());
                self.stop_run(
                    id,
                    RunState::Failed,
                    format!("timeout after {}", humantime::format_duration(t)),
                );
            }
            RunTimer::Kill => {
                if rp.epoch == epoch
                    && let Some(pgid) = rp.pgid
                {
                    tracing::warn!(run = id, pgid, "stop grace over; SIGKILL");
                    let _ = proc::signal_group(pgid, NixSignal::SIGKILL);
                }
            }
        }
    }

    fn run_timer(&self, id: i64, inc: u64, epoch: u64, kind: RunTimer, after: Duration) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(Event::RunTimer { run: id, inc, epoch, kind });
        });
    }

    // ----- requests -----

    pub(super) fn trigger(&mut self, job: &str) -> Result<i64, String> {
        if self.shutting_down {
            return Err("the supervisor is stopping".into());
        }
        self.admit(job, Source::Trigger, None, 0)
    }

    /// Cancels a queued, waiting or running run, flow or session.
    pub(super) fn cancel(&mut self, id: i64, why: &str) -> Result<String, String> {
        let run = self.get_run(id)?;
        if run.state.is_terminal() {
            return Err(format!("run {id} is already {}", run.state.as_str()));
        }
        if self.runs.contains_key(&id) {
            self.stop_run(id, RunState::Cancelled, why.to_string());
            return Ok(format!("cancelling run {id}"));
        }
        for j in self.jobs.values_mut() {
            j.queue.retain(|q| *q != id);
        }
        self.finalize(id, RunState::Cancelled, None, Some(why.to_string()));
        Ok(format!("cancelled run {id}"))
    }

    /// Continues a waiting flow, or starts a failed or cancelled one again
    /// from its first step that did not succeed, as a new linked run.
    pub(super) fn resume(&mut self, id: i64) -> Result<i64, String> {
        let run = self.get_run(id)?;
        let Some(job) = run.job.clone() else {
            return Err(format!("run {id} is a session; only flows resume"));
        };
        if run.kind != Kind::Flow {
            return Err(format!("run {id} is not a flow; trigger the job again instead"));
        }
        match run.state {
            RunState::Waiting => {
                let Some(capacity) = self.jobs.get(&job).map(|j| j.spec.capacity) else {
                    return Err(format!("job {job} is no longer in the config"));
                };
                let running = self.running_of(&job).len() as u32;
                if running >= capacity {
                    return Err(format!(
                        "job {job} is at capacity ({running} running); resume run {id} when one ends"
                    ));
                }
                let ledger = self.ledger.as_ref().ok_or("the run ledger is not available")?;
                if !ledger.release(id, self.owner).map_err(|e| e.to_string())? {
                    return Err(format!("run {id} is no longer waiting"));
                }
                let run = ledger.get(id).map_err(|e| e.to_string())?.ok_or("run vanished")?;
                let approved = run.step;
                self.start_claimed(run, approved);
                Ok(id)
            }
            RunState::Failed | RunState::Cancelled => {
                let from = resume_point(&run);
                self.admit(&job, Source::Resume, Some(id), from)
            }
            s => Err(format!("run {id} is {}; only waiting, failed or cancelled flows resume", s.as_str())),
        }
    }

    /// Starts a background session.
    pub(super) fn start_session(
        &mut self,
        name: Option<String>,
        command: Vec<String>,
        dir: PathBuf,
    ) -> Result<i64, String> {
        if self.shutting_down {
            return Err("the supervisor is stopping".into());
        }
        if command.is_empty() || command[0].is_empty() {
            return Err("a session needs a command".into());
        }
        // Names show up in status and as keys; keep them to what worker
        // names allow, so none carries a path, a newline or an escape.
        if let Some(n) = name.as_deref().filter(|n| !crate::config::types::is_valid_name(n)) {
            return Err(format!(
                "session name {n:?} is not allowed: use lowercase letters, digits, '-' and '_' ({})",
                crate::config::types::NAME_PATTERN
            ));
        }

        let ledger = self.ledger.as_mut().ok_or("the run ledger is not available")?;
        let id = ledger
            .create(&NewRun {
                job: None,
                kind: Kind::Session,
                source: Source::Bg,
                parent: None,
                name: name.as_deref(),
                command: &command,
                steps: &[],
                first_step: 0,
            })
            .map_err(|e| format!("cannot record the session: {e}"))?;
        self.session_dirs.insert(id, dir);
        self.start_run(id);
        Ok(id)
    }

    /// A run by id, or an active session by name.
    pub(super) fn find_run(&self, key: &str) -> Result<Run, String> {
        if let Ok(id) = key.parse::<i64>() {
            return self.get_run(id);
        }
        let ledger = self.ledger.as_ref().ok_or("the run ledger is not available")?;
        let runs = ledger.list(None, None, 10_000).map_err(|e| e.to_string())?;
        runs.into_iter()
            .find(|r| r.kind == Kind::Session && r.name.as_deref() == Some(key))
            .ok_or_else(|| format!("no run or session {key:?}"))
    }

    fn get_run(&self, id: i64) -> Result<Run, String> {
        let ledger = self.ledger.as_ref().ok_or("the run ledger is not available")?;
        ledger.get(id).map_err(|e| e.to_string())?.ok_or_else(|| format!("no run {id}"))
    }

    // ----- reload, stop, status -----

    /// Applies a new config's jobs: new ones are scheduled, removed ones
    /// stop ticking (their active runs finish), changed ones take the new
    /// settings from their next tick or run.
    pub(super) fn apply_jobs(&mut self) {
        let desired = self.config.jobs.clone();
        let gone: Vec<String> = self.jobs.keys().filter(|k| !desired.contains_key(*k)).cloned().collect();
        for name in gone {
            if let Some(j) = self.jobs.remove(&name) {
                for id in j.queue {
                    self.finalize(
                        id,
                        RunState::Cancelled,
                        None,
                        Some(format!("job {name} was removed from the config")),
                    );
                }
            }
        }
        for (name, spec) in desired {
            let rearm = match self.jobs.get_mut(&name) {
                Some(j) if j.spec == spec => false,
                Some(j) => {
                    let trigger_changed = j.spec.trigger != spec.trigger || j.spec.jitter != spec.jitter;
                    j.spec = spec;
                    trigger_changed
                }
                None => {
                    self.jobs
                        .insert(name.clone(), JobRt { spec, next: None, epoch: 0, queue: VecDeque::new() });
                    true
                }
            };
            if rearm {
                self.arm_schedule(&name, false);
            }
        }
    }

    /// On drover's stop: running runs are stopped and end cancelled;
    /// queued ones are cancelled; waiting flows keep waiting.
    pub(super) fn stop_all_runs(&mut self) {
        let ids: Vec<i64> = self.runs.keys().copied().collect();
        for id in ids {
            self.stop_run(id, RunState::Cancelled, "supervisor stopped".into());
        }
        let queued: Vec<(String, i64)> =
            self.jobs.iter().flat_map(|(n, j)| j.queue.iter().map(move |id| (n.clone(), *id))).collect();
        for (name, id) in queued {
            if let Some(j) = self.jobs.get_mut(&name) {
                j.queue.clear();
            }
            self.finalize(
                id,
                RunState::Cancelled,
                None,
                Some("supervisor stopped before the run started".into()),
            );
        }
    }

    pub(super) fn jobs_status(&self) -> Vec<JobStatus> {
        self.jobs
            .iter()
            .map(|(name, j)| {
                let ledger = self.ledger.as_ref();
                let last = ledger
                    .and_then(|l| l.list(Some(name), None, 20).ok())
                    .and_then(|runs| runs.into_iter().find(|r| r.state.is_terminal()))
                    .map(|r| RunSummary { id: r.id, state: r.state, ended_at: r.ended_at });
                JobStatus {
                    name: name.clone(),
                    kind: if j.spec.flow { Kind::Flow } else { Kind::Job },
                    trigger: match &j.spec.trigger {
                        Trigger::Schedule { cron, timezone: None } => format!("schedule {cron}"),
                        Trigger::Schedule { cron, timezone: Some(tz) } => format!("schedule {cron} ({tz})"),
                        Trigger::Every(d) => format!("every {d}"),
                        Trigger::Manual => "manual".into(),
                    },
                    next_tick: j.next.map(|t| rfc3339(later(t, jitter_of(name, j.spec.jitter.0)))),
                    active: self.running_of(name),
                    queued: j.queue.len(),
                    skips: ledger.and_then(|l| l.skips(name).ok()).unwrap_or(0),
                    last_run: last,
                }
            })
            .collect()
    }

    /// Active runs and sessions, for `status`.
    pub(super) fn active_runs(&self) -> Vec<Run> {
        self.ledger.as_ref().and_then(|l| l.active().ok()).unwrap_or_default()
    }
}

/// Session directories handed from a `bg` request to the run's start.
pub type SessionDirs = HashMap<i64, PathBuf>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::types::HumanDuration;
    use crate::ledger::StepRecord;

    #[test]
    fn intervals_and_cron_ticks() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            next_tick(&Trigger::Every(HumanDuration::from_secs(10)), t0),
            Some(t0 + Duration::from_secs(10))
        );
        assert_eq!(next_tick(&Trigger::Manual, t0), None);
        let next = next_tick(&Trigger::Schedule { cron: "*/15 * * * *".into(), timezone: None }, t0).unwrap();
        let gap = next.duration_since(t0).unwrap();
        assert!(gap > Duration::ZERO && gap <= Duration::from_secs(15 * 60), "{gap:?}");
        let secs = next.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs % 60, 0, "cron ticks fall on whole minutes");
    }

    #[test]
    fn a_schedule_runs_in_its_time_zone() {
        // 09:00 in Tokyo (UTC+9, no daylight saving) is 00:00 UTC.
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let tokyo = Trigger::Schedule { cron: "0 9 * * *".into(), timezone: Some("Asia/Tokyo".into()) };
        let next = next_tick(&tokyo, t0).unwrap();
        let secs = next.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs % 86_400, 0, "midnight UTC");
        assert!(next > t0 && next.duration_since(t0).unwrap() <= Duration::from_secs(86_400));
        let bad = Trigger::Schedule { cron: "0 9 * * *".into(), timezone: Some("Mars/Olympus".into()) };
        assert_eq!(next_tick(&bad, t0), None);
    }

    #[test]
    fn jitter_is_stable_and_bounded() {
        let j = Duration::from_secs(30);
        assert_eq!(jitter_of("backup", j), jitter_of("backup", j));
        assert!(jitter_of("backup", j) < j);
        assert_ne!(jitter_of("backup", j), jitter_of("report", j));
        assert_eq!(jitter_of("backup", Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn resume_starts_at_the_first_step_that_did_not_succeed() {
        let step = |i: u32, state| StepRecord {
            index: i,
            name: format!("s{i}"),
            state,
            started_at: None,
            ended_at: None,
            exit_code: None,
            signal: None,
            error: None,
        };
        let run = Run {
            id: 1,
            job: Some("j".into()),
            kind: Kind::Flow,
            source: Source::Trigger,
            state: RunState::Failed,
            created_at: String::new(),
            started_at: None,
            ended_at: None,
            exit_code: None,
            signal: None,
            error: None,
            owner: None,
            parent: None,
            name: None,
            command: vec![],
            step: Some(1),
            pid: None,
            pgid: None,
            pid_start: None,
            log: None,
            steps: vec![step(0, RunState::Succeeded), step(1, RunState::Failed), step(2, RunState::Queued)],
        };
        assert_eq!(resume_point(&run), 1);
    }
}
