//! Jobs, flows and background sessions: the supervisor's side of the run
//! ledger. A run is created queued, claimed (queued -> running, committed)
//! before any process starts, and finalized on every path: exit, spawn
//! failure, timeout, cancel, and drover's own stop. Schedules persist their
//! last tick in the ledger, so a restart neither fires every job at once
//! nor forgets.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal as NixSignal;

use super::actor::Supervisor;
use super::admission::{self, Admission};
use super::child::{self, Launch, LaunchError, Output, Started};
use super::clock::{later, rfc3339};
use super::containment;
use super::events::{Event, Proc, RunTimer, TimerKey};
use super::graph::Node;
use super::live::What;
use super::logs::{LogFile, Sink, pump};
use super::protocol::{JobStatus, RunSummary};
use super::run_ledger::{LedgerError, Write};
use crate::config::model::{Condition, Job, Step, Trigger, secret_values};
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
    /// Runs waiting for a slot (on_overlap = "queue" or "replace").
    pub queue: VecDeque<i64>,
    /// How its latest run in this supervisor's life ended, for those that
    /// depend on it.
    pub last_outcome: Option<RunState>,
    /// A run of it started in this supervisor's life.
    pub started: bool,
}

impl JobRt {
    pub fn new(spec: Job) -> Self {
        JobRt { spec, next: None, queue: VecDeque::new(), last_outcome: None, started: false }
    }
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
    pub sink: Arc<Sink>,
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
    /// Start from an empty environment, not drover's: `env` is all of it
    /// (a session started with its caller's environment).
    pub clear_env: bool,
    /// The job's user, groups and limits, as at the run's start.
    pub identity: Arc<crate::os::identity::Identity>,
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
    /// The drain grace after the step's end ran out: its output is no
    /// longer waited for (a process outside the group may hold the pipe
    /// forever), its group still is.
    pub drain_over: bool,
    /// The approval step that `runs resume` approved.
    pub approved: Option<u32>,
    /// The current step's spawn is in flight: a stop waits for it to land,
    /// then signals it like any other process.
    pub spawning: bool,
    /// The step's process ended but its group, SIGKILLed, still had
    /// processes: the step ends once the group is empty.
    pub group_left: Option<i32>,
    /// In cgroup mode, the current step's cgroup: with it, the group is
    /// "empty" when the cgroup is.
    pub cgroup: Option<PathBuf>,
}

/// Why a tick, trigger or resume started no run.
#[derive(Debug)]
pub(super) enum Refused {
    /// At capacity, by `on_overlap`.
    Skip(String),
    /// The ledger could not record it (locked, or unavailable).
    Ledger(LedgerError),
    Other(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Skip(m) | Refused::Other(m) => f.write_str(m),
            Refused::Ledger(e) => e.fmt(f),
        }
    }
}

/// Numbers the starts of runs, for [`RunProc::inc`].
static NEXT_INC: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How long a step's output may stay open after its process ended (a
/// process that left the group can hold the pipe) before the run ends anyway.
const DRAIN: Duration = Duration::from_secs(1);

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
        let active = match self.ledger.read().map(|l| l.active()) {
            Ok(Ok(runs)) => runs,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the ledger's active runs");
                Vec::new()
            }
            // No ledger: the jobs are still listed, with the reason.
            Err(_) => Vec::new(),
        };
        for r in active {
            // Finalized here, they count among the runs that ended.
            let mut ended = |state| {
                if let Some(job) = &r.job {
                    self.counters.run_ended(job, state);
                }
            };
            match r.state {
                RunState::Running => {
                    if let Some(pgid) = r.pgid {
                        proc::kill_recorded_group(pgid, r.pid_start);
                    }
                    ended(RunState::Failed);
                    let why = "supervisor exited while the run was active";
                    self.ledger_write(Write::FailRunningSteps { id: r.id, error: why.into() });
                    self.ledger_write(Write::Finish {
                        id: r.id,
                        state: RunState::Failed,
                        exit: None,
                        error: Some(why.into()),
                    });
                }
                RunState::Queued => {
                    ended(RunState::Cancelled);
                    self.ledger_write(Write::Finish {
                        id: r.id,
                        state: RunState::Cancelled,
                        exit: None,
                        error: Some("supervisor exited before the run started".into()),
                    })
                }
                // A flow held for approval waits across restarts.
                _ => {}
            }
        }
        let names: Vec<String> = self.config.jobs.keys().cloned().collect();
        for name in names {
            let spec = self.config.jobs[&name].clone();
            self.jobs.insert(name.clone(), JobRt::new(spec));
            self.arm_schedule(&name, true);
        }
    }

    /// Sets the job's next tick; at start-up, runs a missed tick once if
    /// `catch_up` is set.
    fn arm_schedule(&mut self, name: &str, at_start: bool) {
        let now = SystemTime::now();
        let Some(job) = self.jobs.get(name) else { return };
        let last = self
            .ledger
            .read()
            .ok()
            .and_then(|l| l.last_tick(name).ok().flatten())
            .and_then(|t| parse_time(&t));
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
                if let Err(e) = self.admit(name, Source::CatchUp, None, 0) {
                    tracing::warn!(job = name, reason = %e, "the missed tick was not caught up");
                }
                self.ledger_write(Write::SetLastTick { job: name.into(), tick: rfc3339(now) });
            }
            next = next_tick(&trigger, now);
        }
        self.set_next(name, next);
    }

    fn set_next(&mut self, name: &str, next: Option<SystemTime>) {
        let Some(job) = self.jobs.get_mut(name) else { return };
        job.next = next;
        let key = TimerKey::JobTick(name.to_string());
        let Some(at) = next else {
            self.timers.cancel(&key);
            return;
        };
        let fire = later(at, jitter_of(name, job.spec.jitter.0));
        let delay = fire.duration_since(SystemTime::now()).unwrap_or_default();
        self.set_timer(key, delay);
    }

    pub(super) fn on_job_tick(&mut self, name: &str) {
        if !self.jobs.contains_key(name) || self.shutting_down {
            return;
        }
        let Some(job) = self.jobs.get(name) else { return };
        let tick = job.next.unwrap_or_else(SystemTime::now);
        let trigger = job.spec.trigger.clone();
        let waiting = self.job_blocked_by(name);
        let admitted = if !waiting.is_empty() {
            self.ledger_write(Write::CountSkip { job: name.into() });
            let reason = format!("waiting for {}", waiting.join(", "));
            self.live.emit(What::RunSkipped { job: name.into(), reason: reason.clone() });
            Err(Refused::Skip(reason))
        } else if self.ledger.is_busy() {
            Err(Refused::Ledger(LedgerError::Busy("waiting writes".into())))
        } else {
            self.admit(name, Source::Schedule, None, 0)
        };
        if let Err(msg) = admitted {
            if matches!(msg, Refused::Ledger(LedgerError::Busy(_))) {
                // The tick is not lost: it fires again once the ledger
                // can record its run (the schedule does not move on).
                tracing::info!(job = name, reason = %msg, "tick delayed");
                self.set_timer(TimerKey::JobTick(name.to_string()), super::run_ledger::RETRY);
                return;
            }
            tracing::info!(job = name, reason = %msg, "tick skipped");
        }
        self.ledger_write(Write::SetLastTick { job: name.into(), tick: rfc3339(tick) });
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
    ) -> Result<i64, Refused> {
        let Some(job) = self.jobs.get(name) else { return Err(Refused::Other(self.no_such_job(name))) };
        let spec = job.spec.clone();
        let active = self.running_of(name);
        let decision = admission::admit(
            name,
            active.len(),
            job.queue.len(),
            spec.capacity,
            spec.on_overlap,
            spec.queue_limit,
        );
        if let Admission::Skip(why) = decision {
            self.ledger_write(Write::CountSkip { job: name.into() });
            let reason = why.strip_prefix("skipped: ").unwrap_or(&why).to_string();
            self.live.emit(What::RunSkipped { job: name.into(), reason });
            return Err(Refused::Skip(why));
        }
        let id = self.create_run(name, &spec, source, parent, first_step)?;
        if !matches!(decision, Admission::Start) {
            self.live.emit(What::RunQueued { job: name.into(), run: id });
        }
        let Some(job) = self.jobs.get_mut(name) else { return Ok(id) };
        match decision {
            Admission::Start => self.start_run(id),
            Admission::Queue => job.queue.push_back(id),
            Admission::Replace => {
                // Only the newest replacement waits: earlier ones never
                // start. It starts once the replaced run's process is
                // gone (start_queued), so the job never exceeds capacity.
                let superseded: Vec<i64> = job.queue.drain(..).collect();
                job.queue.push_back(id);
                for old in superseded {
                    self.finalize(old, RunState::Cancelled, None, Some(format!("replaced by run {id}")));
                }
                if let Some(&oldest) = active.first() {
                    self.stop_run(oldest, RunState::Cancelled, format!("replaced by run {id}"));
                }
            }
            // Counted and returned above.
            Admission::Skip(_) => {}
        }
        Ok(id)
    }

    /// Why `name` cannot be triggered: a worker, or nothing; names the jobs.
    fn no_such_job(&self, name: &str) -> String {
        let jobs: Vec<&str> = self.jobs.keys().map(String::as_str).collect();
        let list = if jobs.is_empty() { "none are configured".to_string() } else { jobs.join(", ") };
        if self.is_worker(name) {
            format!("{name} is a worker, not a job; jobs: {list}")
        } else {
            format!("no job named {name:?}; jobs: {list}")
        }
    }

    fn create_run(
        &mut self,
        name: &str,
        spec: &Job,
        source: Source,
        parent: Option<i64>,
        first_step: u32,
    ) -> Result<i64, Refused> {
        let step_names: Vec<String> =
            if spec.flow { spec.steps.iter().map(|s| s.name.clone()).collect() } else { Vec::new() };
        let new = NewRun {
            job: Some(name),
            kind: if spec.flow { Kind::Flow } else { Kind::Job },
            source,
            parent,
            name: None,
            command: &spec.steps[0].command,
            steps: &step_names,
            first_step,
        };
        let r = self.ledger.now(|l| l.create(&new));
        self.arm_ledger_retry();
        r.map_err(|e| match e {
            LedgerError::Failed(e) => Refused::Other(format!("cannot record the run: {e}")),
            e => Refused::Ledger(e),
        })
    }

    /// Claims a queued run (committed before anything starts) and starts
    /// its current step.
    fn start_run(&mut self, id: i64) {
        let run = match self.ledger.read().map(|l| l.get(id)) {
            Ok(Ok(Some(r))) => r,
            _ => return,
        };
        let owner = self.owner;
        let claimed = self.ledger.now(|l| l.claim(id, owner));
        self.arm_ledger_retry();
        match claimed {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(run = id, "run is no longer claimable; dropped");
                return;
            }
            Err(LedgerError::Busy(_)) => {
                // Not claimed, so not started: it waits first in line
                // until the ledger can record the claim.
                match run.job.as_deref().and_then(|j| self.jobs.get_mut(j)) {
                    Some(j) => j.queue.push_front(id),
                    None => self.unclaimed.push(id),
                }
                return;
            }
            Err(e) => {
                tracing::error!(run = id, error = %e, "cannot claim the run");
                return;
            }
        }
        self.start_claimed(run, None);
    }

    /// Writes to the ledger, now or (it is locked) once it is free.
    pub(super) fn ledger_write(&mut self, w: Write) {
        self.ledger.write(w);
        self.arm_ledger_retry();
    }

    /// While the ledger is locked, one timer tries it again.
    pub(super) fn arm_ledger_retry(&mut self) {
        if self.timers.is_armed(&TimerKey::LedgerRetry) || !self.ledger.is_busy() {
            return;
        }
        self.set_timer(TimerKey::LedgerRetry, super::run_ledger::RETRY);
    }

    /// The retry timer: waiting writes first, then the runs that waited
    /// for their claim.
    pub(super) fn on_ledger_retry(&mut self) {
        if !self.ledger.retry() {
            self.arm_ledger_retry();
            return;
        }
        for id in std::mem::take(&mut self.unclaimed) {
            self.start_run(id);
        }
        let names: Vec<String> = self.jobs.keys().cloned().collect();
        for name in names {
            self.start_queued(&name);
        }
    }

    /// Starts the current step of a run that is ours (claimed or released).
    fn start_claimed(&mut self, run: Run, approved: Option<u32>) {
        self.live.emit(What::RunStarted { job: run.job.clone(), run: run.id });
        if let Some(job) = run.job.as_deref().and_then(|j| self.jobs.get_mut(j)) {
            job.started = true;
            self.touched.insert(run.job.clone().unwrap_or_default());
        }
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
        let step_names = steps.iter().map(|s| s.name.clone()).collect();
        let sink = Arc::new(
            Sink::new(format!("{label}#{}", run.id), file, self.echo.clone(), secrets)
                .with_labels(step_names),
        );
        let (dir, env, clear_env) = match self.session_dirs.remove(&run.id) {
            Some(SessionStart { dir, env: caller }) => {
                let clear = caller.is_some();
                (dir, self.session_env(caller), clear)
            }
            None if run.kind == Kind::Session => (dir, self.session_env(None), false),
            None => (dir, env, false),
        };
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
            sink,
            dir,
            env,
            clear_env,
            identity: Arc::new(
                run.job
                    .as_deref()
                    .and_then(|j| self.jobs.get(j))
                    .map(|j| j.spec.identity.clone())
                    .unwrap_or_default(),
            ),
            stop_signal,
            stop_grace,
            timeout,
            inc: NEXT_INC.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            open_streams: 0,
            pending_end: None,
            drain_over: false,
            approved,
            spawning: false,
            group_left: None,
            cgroup: None,
        };
        self.runs.insert(run.id, rp);
        if let Some(t) = timeout {
            self.run_timer(run.id, RunTimer::Timeout, t);
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
            let at = rp.step;
            tracing::info!(run = id, step = %step.name, "flow waiting for approval; approve with drover runs resume {id}");
            let job = rp.job.clone();
            self.forget_run(id);
            self.ledger_write(Write::Hold { id, step: at });
            if let Some(j) = job {
                self.start_queued(&j);
            }
            return;
        }
        rp.pending_end = None;
        rp.drain_over = false;
        rp.open_streams = 0;
        rp.group_left = None;
        let mut env = rp.env.clone();
        env.push(("DROVER_RUN".into(), id.to_string()));
        env.push(("DROVER_STATE_DIR".into(), state_dir.display().to_string()));
        if let Some(j) = &rp.job {
            env.push(("DROVER_JOB".into(), j.clone()));
            env.push(("DROVER_STEP".into(), step.name.clone()));
        }
        let launch = Launch {
            argv: step.command.clone(),
            dir: rp.dir.clone(),
            env,
            clear_env: rp.clear_env,
            remove_env: vec![],
            identity: (*rp.identity).clone(),
            output: Output::Piped,
            sockets: vec![],
            cgroup: self.containment.cgroup(&format!("r.{id}.{}", rp.step), None),
        };
        rp.spawning = true;
        // Off the event loop: each spawn blocks its thread until the child
        // has exec'd, and runs come by the hundred.
        let (tx, inc, step_index) = (self.tx.clone(), rp.inc, rp.step);
        let flow = rp.kind == Kind::Flow;
        self.in_flight.begin();
        if flow {
            self.ledger_write(Write::Step {
                id,
                index: step_index,
                state: RunState::Running,
                exit: None,
                error: None,
            });
        }
        child::start_off_loop(self.reaper.clone(), launch, move |result| {
            let _ = tx.send(Event::RunSpawned { run: id, inc, step: step_index, result });
        });
    }

    /// A step's process was spawned (or could not be).
    pub(super) fn on_run_spawned(
        &mut self,
        id: i64,
        inc: u64,
        step: u32,
        result: Result<Started, LaunchError>,
    ) {
        self.in_flight.landed();
        // A run asked to stop while this spawn was in flight is still
        // current: its process gets the stop signal and grace below.
        let current = self.runs.get(&id).is_some_and(|rp| rp.inc == inc && rp.step == step);
        if current && let Some(rp) = self.runs.get_mut(&id) {
            rp.spawning = false;
        }
        let sp = match result {
            Err(e) => {
                if current {
                    self.step_ended(id, None, Some(e.message));
                }
                return;
            }
            Ok(sp) => sp,
        };
        let pid = sp.pid;
        if !current {
            // Its run is gone (it cannot be: a run with a spawn in flight
            // is kept until the spawn lands); it must not run on.
            self.in_flight.discard(pid);
            if let Some(cg) = sp.cgroup {
                self.remove_cgroup(cg);
            }
            return;
        }
        let state_dir = self.config.supervisor.state_dir.clone();
        let Some(rp) = self.runs.get_mut(&id) else { return };
        rp.pid = Some(pid);
        rp.pgid = Some(pid);
        if let (Some(watch), Some(cg)) = (&self.cgroup_watch, &sp.cgroup) {
            watch.add(cg);
        }
        rp.cgroup = sp.cgroup;
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
        let started =
            What::RunStep { job: rp.job.clone(), run: id, step: rp.steps[step as usize].name.clone(), pid };
        let stop_now = rp.stopping.is_some();
        self.live.emit(started);
        self.by_pid.insert(pid, Proc::Run(id));
        let log = run_log_path(&state_dir, id);
        self.ledger_write(Write::SetProcess { id, pid, pgid: pid, pid_start: proc::start_ticks(pid), log });
        // It may have ended before this event was handled.
        if let Some(exit) = self.in_flight.take_early_exit(pid) {
            self.by_pid.remove(&pid);
            self.on_run_exit(id, exit);
            return;
        }
        if stop_now {
            self.signal_run_stop(id);
        }
    }

    // ----- ends -----

    pub(super) fn on_run_exit(&mut self, id: i64, exit: Exit) {
        let Some(rp) = self.runs.get_mut(&id) else { return };
        rp.pid = None;
        // A step is done when its main process is; what it left behind in
        // its group goes with it, and the step ends (its slot frees) only
        // once the group is empty.
        if let Some(pgid) = rp.pgid.take() {
            if containment::alive(rp.cgroup.as_deref(), Some(pgid)) {
                let _ = proc::signal_group(pgid, NixSignal::SIGKILL);
                if let Some(cg) = &rp.cgroup {
                    containment::kill_off_loop(cg);
                }
                rp.group_left = Some(pgid);
            }
            crate::os::groups::remove(pgid);
        }
        rp.pending_end = Some((Some(exit), None));
        if !self.try_end_step(id) && self.runs.contains_key(&id) {
            self.run_timer(id, RunTimer::Drain, DRAIN);
        }
    }

    /// Ends the current step if its process has ended, its output is all
    /// written and its group is empty; returns whether it is over.
    pub(super) fn try_end_step(&mut self, id: i64) -> bool {
        let Some(rp) = self.runs.get_mut(&id) else { return true };
        let left = rp.group_left.is_some_and(|g| containment::alive(rp.cgroup.as_deref(), Some(g)));
        if (rp.open_streams > 0 && !rp.drain_over) || left {
            return false;
        }
        rp.group_left = None;
        if let Some((exit, error)) = rp.pending_end.take() {
            self.step_ended(id, exit, error);
        }
        true
    }

    /// A stray process was reaped: steps waiting for their group to empty
    /// may be over.
    pub(super) fn recheck_run_groups(&mut self) {
        let waiting: Vec<i64> = self.runs.values().filter(|r| r.group_left.is_some()).map(|r| r.id).collect();
        for id in waiting {
            self.try_end_step(id);
        }
    }

    pub(super) fn on_run_output_closed(&mut self, id: i64, inc: u64, step: u32) {
        let Some(rp) = self.runs.get_mut(&id) else { return };
        if rp.inc != inc || rp.step != step {
            return;
        }
        rp.open_streams = rp.open_streams.saturating_sub(1);
        if rp.open_streams == 0 {
            self.try_end_step(id);
        }
    }

    /// The current step's process ended (or never started: `error`).
    fn step_ended(&mut self, id: i64, exit: Option<Exit>, error: Option<String>) {
        // The step's stop and drain timers are over with it.
        self.timers.cancel(&TimerKey::Run(id, RunTimer::Kill));
        self.timers.cancel(&TimerKey::Run(id, RunTimer::Drain));
        // Empty, or (its drain given up on) killed and removed once empty.
        if let Some(cg) = self.runs.get_mut(&id).and_then(|rp| rp.cgroup.take()) {
            self.remove_cgroup(cg);
        }
        let Some(rp) = self.runs.get_mut(&id) else { return };
        let ok = exit.as_ref().is_some_and(Exit::success);
        let step = rp.step;
        let step_name = rp.steps[step as usize].name.clone();
        let flow = rp.kind == Kind::Flow;
        let stopping = rp.stopping.clone();
        if flow {
            let state = match (&stopping, ok) {
                (Some((s, _)), _) => *s,
                (None, true) => RunState::Succeeded,
                (None, false) => RunState::Failed,
            };
            self.ledger_write(Write::Step {
                id,
                index: step,
                state,
                exit: exit.clone(),
                error: error.clone(),
            });
        }
        let Some(rp) = self.runs.get_mut(&id) else { return };
        if let Some((state, why)) = stopping {
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
        let rp = self.forget_run(id);
        if let Some(j) = rp.as_ref().and_then(|r| r.job.as_deref())
            && let Some(job) = self.jobs.get_mut(j)
        {
            job.last_outcome = Some(state);
            self.counters.run_ended(j, state);
            // Those that depend on it look again.
            self.touched.insert(j.to_string());
        }
        self.ledger_write(Write::Finish { id, state, exit: exit.cloned(), error: error.clone() });
        tracing::info!(run = id, state = state.as_str(), error = error.as_deref(), "run ended");
        let job = rp.as_ref().and_then(|r| r.job.clone());
        self.live.emit(What::RunEnded { job: job.clone(), run: id, state: state.as_str().into() });

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
        let kind = if job.is_none() { Kind::Session } else { kind };
        self.ledger_write(Write::Prune { job: job.map(String::from), kind, retain });
    }

    /// Slots of `job` are free: start its queued runs into them (more
    /// than one when claims waited for a locked ledger).
    fn start_queued(&mut self, job: &str) {
        // A locked ledger cannot take the claim: the run would only go
        // back to the head of the queue.
        while !self.shutting_down && !self.ledger.is_busy() {
            let Some(j) = self.jobs.get(job) else { return };
            if self.running_of(job).len() as u32 >= j.spec.capacity {
                return;
            }
            let Some(id) = self.jobs.get_mut(job).and_then(|j| j.queue.pop_front()) else { return };
            self.start_run(id);
        }
    }

    /// Asks a running run to stop; `state` and `why` are its outcome.
    pub(super) fn stop_run(&mut self, id: i64, state: RunState, why: String) {
        let Some(rp) = self.runs.get_mut(&id) else { return };
        if rp.stopping.is_some() {
            return;
        }
        rp.stopping = Some((state, why.clone()));
        if rp.spawning || rp.pending_end.is_some() {
            // Its process is about to exist (it gets the stop signal and
            // grace when the spawn lands), or has ended and the step is
            // finishing: it keeps its slot until then.
            return;
        }
        if rp.pgid.is_some() {
            self.signal_run_stop(id);
        } else {
            self.finalize(id, state, None, Some(why));
        }
    }

    /// Sends a stopping run's process group its stop signal and arms the
    /// SIGKILL after its grace.
    fn signal_run_stop(&mut self, id: i64) {
        let Some(rp) = self.runs.get_mut(&id) else { return };
        let Some(pgid) = rp.pgid else { return };
        let (sig, grace) = (rp.stop_signal.to_nix(), rp.stop_grace);
        let _ = proc::signal_group(pgid, sig);
        let _ = proc::signal_group(pgid, NixSignal::SIGCONT);
        if let Some(cg) = &rp.cgroup {
            crate::os::cgroup::signal(cg, sig);
        }
        self.run_timer(id, RunTimer::Kill, grace);
    }

    pub(super) fn on_run_timer(&mut self, id: i64, kind: RunTimer) {
        let Some(rp) = self.runs.get_mut(&id) else { return };
        match kind {
            RunTimer::Drain => {
                if rp.pending_end.is_none() {
                    return;
                }
                rp.drain_over = true;
                if !self.try_end_step(id) {
                    // Only the group is left, SIGKILLed: the step ends
                    // when it is reaped (or its cgroup empties), never
                    // beside it, so a replacement cannot overlap it.
                    tracing::warn!(
                        run = id,
                        "the step's group is still not empty after SIGKILL; waiting for it"
                    );
                } else {
                    tracing::warn!(
                        run = id,
                        "output still open after the step ended; ending the step anyway"
                    );
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
                if let Some(pgid) = rp.pgid {
                    tracing::warn!(run = id, pgid, "stop grace over; SIGKILL");
                    let _ = proc::signal_group(pgid, NixSignal::SIGKILL);
                }
                if let Some(cg) = &rp.cgroup {
                    containment::kill_off_loop(cg);
                }
            }
        }
    }

    fn run_timer(&mut self, id: i64, kind: RunTimer, after: Duration) {
        self.set_timer(TimerKey::Run(id, kind), after);
    }

    /// The run's process is gone from the actor's hands: its timers go too.
    fn forget_run(&mut self, id: i64) -> Option<RunProc> {
        self.timers.cancel_where(|k| matches!(k, TimerKey::Run(r, _) if *r == id));
        let mut rp = self.runs.remove(&id)?;
        if let Some(cg) = rp.cgroup.take() {
            self.remove_cgroup(cg);
        }
        Some(rp)
    }

    // ----- requests -----

    pub(super) fn trigger(&mut self, job: &str) -> Result<i64, String> {
        if self.shutting_down {
            return Err("the supervisor is stopping".into());
        }
        if self.jobs.contains_key(job)
            && let Err(e) = self.ledger.read()
        {
            return Err(e.to_string());
        }
        self.admit(job, Source::Trigger, None, 0).map_err(|e| e.to_string())
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
                let owner = self.owner;
                let released = self.ledger.now(|l| l.release(id, owner));
                self.arm_ledger_retry();
                if !released.map_err(|e| e.to_string())? {
                    return Err(format!("run {id} is no longer waiting"));
                }
                let run = self.get_run(id)?;
                let approved = run.step;
                self.start_claimed(run, approved);
                Ok(id)
            }
            RunState::Failed | RunState::Cancelled => {
                let from = resume_point(&run);
                self.admit(&job, Source::Resume, Some(id), from).map_err(|e| e.to_string())
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
        env: Option<Vec<(String, String)>>,
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

        if let Some(n) = name.as_deref()
            && let Some(holder) = self.active_session_named(n)
        {
            return Err(format!(
                "a session named {n} is already running: id {holder}; choose another name, or stop it with \
                 drover kill {holder}"
            ));
        }
        let new = NewRun {
            job: None,
            kind: Kind::Session,
            source: Source::Bg,
            parent: None,
            name: name.as_deref(),
            command: &command,
            steps: &[],
            first_step: 0,
        };
        let created = self.ledger.now(|l| l.create(&new));
        self.arm_ledger_retry();
        let id = created.map_err(|e| match e {
            LedgerError::Failed(e) => format!("cannot record the session: {e}"),
            e => e.to_string(),
        })?;
        self.session_dirs.insert(id, SessionStart { dir, env });
        self.start_run(id);
        Ok(id)
    }

    /// A session's environment: `defaults.env`, with the caller's
    /// environment over it (what a shell user expects of `bg`).
    fn session_env(&self, caller: Option<Vec<(String, String)>>) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> =
            self.config.defaults.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.extend(caller.into_iter().flatten());
        env
    }

    /// The id of the live session named `name`, if one is (a session that
    /// drover is running, or one the ledger still has active).
    fn active_session_named(&self, name: &str) -> Option<i64> {
        let live = self.runs.values().filter(|r| r.kind == Kind::Session).map(|r| r.id);
        let waiting = self.unclaimed.iter().copied();
        let named = |id: &i64| {
            self.ledger
                .read()
                .ok()
                .and_then(|l| l.get(*id).ok().flatten())
                .is_some_and(|r| r.name.as_deref() == Some(name) && !r.state.is_terminal())
        };
        live.chain(waiting).filter(named).min()
    }

    /// A run by id, or a session by name: the active one with that name,
    /// else the newest.
    pub(super) fn find_run(&self, key: &str) -> Result<Run, String> {
        if let Ok(id) = key.parse::<i64>() {
            return self.get_run(id);
        }
        if let Some(id) = self.active_session_named(key) {
            return self.get_run(id);
        }
        let ledger = self.ledger.read().map_err(|e| e.to_string())?;
        let runs = ledger.list(None, None, 10_000).map_err(|e| e.to_string())?;
        let named: Vec<Run> =
            runs.into_iter().filter(|r| r.kind == Kind::Session && r.name.as_deref() == Some(key)).collect();
        let active = named.iter().position(|r| !r.state.is_terminal()).unwrap_or(0);
        named.into_iter().nth(active).ok_or_else(|| format!("no run or session {key:?}"))
    }

    fn get_run(&self, id: i64) -> Result<Run, String> {
        let ledger = self.ledger.read().map_err(|e| e.to_string())?;
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
                    self.jobs.insert(name.clone(), JobRt::new(spec));
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

    // ----- dependencies -----

    /// `succeeded`: the latest run in this supervisor's life succeeded;
    /// `started`: a run of it started.
    pub(super) fn job_meets(&self, name: &str, cond: Condition) -> bool {
        let Some(j) = self.jobs.get(name) else { return false };
        match cond {
            Condition::Started => j.started,
            _ => j.last_outcome == Some(RunState::Succeeded),
        }
    }

    /// What job `name` waits for before its ticks may run, as "db (ready)".
    pub(super) fn job_blocked_by(&self, name: &str) -> Vec<String> {
        if self.jobs.get(name).is_none_or(|j| j.spec.depends_on.is_empty()) {
            return Vec::new();
        }
        self.graph
            .blocked_by(&Node::Job(name.to_string()), |node, cond| self.met(node, cond))
            .into_iter()
            .map(|(node, cond)| match node {
                Node::Worker(n) | Node::Job(n) => format!("{n} ({})", cond.name()),
            })
            .collect()
    }

    /// Runs, source `dependency`, the jobs a worker or job depends on: all
    /// of them at start (`old` is `None`); on a reload, those whose config
    /// changed, and those that became a dependency with no success in this
    /// supervisor's life (else what depends on them would wait for a run
    /// nothing starts).
    pub(super) fn run_dependency_jobs(&mut self, old: Option<(&BTreeMap<String, Job>, &BTreeSet<String>)>) {
        for name in self.graph.jobs_to_run_at_start() {
            let Some(j) = self.jobs.get(&name) else { continue };
            let due = match old {
                None => true,
                Some((jobs, deps)) => {
                    let changed = jobs.get(&name) != self.config.jobs.get(&name);
                    let unmet = || {
                        !deps.contains(&name)
                            && j.last_outcome != Some(RunState::Succeeded)
                            && j.queue.is_empty()
                            && self.running_of(&name).is_empty()
                    };
                    changed || unmet()
                }
            };
            if !due {
                continue;
            }
            if let Some(j) = self.jobs.get_mut(&name) {
                // A changed job is a new dependency: the old outcome is void.
                j.last_outcome = None;
                self.touched.insert(name.clone());
            }
            self.dependency_runs_due.insert(name);
        }
        self.start_due_dependency_runs();
    }

    /// Starts the dependency runs whose own dependencies are met.
    pub(super) fn start_due_dependency_runs(&mut self) {
        let due: Vec<String> = self.dependency_runs_due.iter().cloned().collect();
        for name in due {
            if !self.jobs.contains_key(&name) {
                self.dependency_runs_due.remove(&name);
                continue;
            }
            if !self.job_blocked_by(&name).is_empty() {
                continue;
            }
            self.dependency_runs_due.remove(&name);
            match self.admit(&name, Source::Dependency, None, 0) {
                Ok(id) => tracing::info!(job = %name, run = id, "dependency run started"),
                Err(e) => tracing::warn!(job = %name, reason = %e, "cannot run a dependency"),
            }
        }
    }

    /// Whether a run of a job something depends on is queued or running.
    pub(super) fn dependency_runs_active(&self) -> bool {
        !self.dependency_runs_due.is_empty()
            || self.graph.jobs_to_run_at_start().iter().any(|j| {
                self.jobs.get(j).is_some_and(|rt| !rt.queue.is_empty()) || !self.running_of(j).is_empty()
            })
    }

    pub(super) fn jobs_status(&self) -> Vec<JobStatus> {
        self.jobs
            .iter()
            .map(|(name, j)| {
                let ledger = self.ledger.read().ok();
                let last = ledger
                    .and_then(|l| l.list(Some(name), None, 20).ok())
                    .and_then(|runs| runs.into_iter().find(|r| r.state.is_terminal()))
                    .map(|r| RunSummary { id: r.id, state: r.state, ended_at: r.ended_at });
                JobStatus {
                    name: name.clone(),
                    kind: if j.spec.flow { Kind::Flow } else { Kind::Job },
                    trigger: super::reconcile::trigger_text(&j.spec.trigger),
                    next_tick: j.next.map(|t| rfc3339(later(t, jitter_of(name, j.spec.jitter.0)))),
                    active: self.running_of(name),
                    queued: j.queue.len(),
                    skips: ledger.and_then(|l| l.skips(name).ok()).unwrap_or(0),
                    last_run: last,
                    waiting_for: if self.dependency_runs_due.contains(name) {
                        self.job_blocked_by(name)
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect()
    }

    /// Active runs and sessions, for `status`.
    pub(super) fn active_runs(&self) -> Vec<Run> {
        self.ledger.read().ok().and_then(|l| l.active().ok()).unwrap_or_default()
    }
}

/// What a `bg` request hands to its session's start.
pub struct SessionStart {
    pub dir: PathBuf,
    /// The caller's environment (None: an older client sent none).
    pub env: Option<Vec<(String, String)>>,
}

pub type SessionDirs = HashMap<i64, SessionStart>;

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
