//! The supervisor actor: the one owner of all supervisor state. It sleeps
//! until an event arrives (a child exited, a timer fired, a control
//! request, a signal), decides with the pure functions of `policy` and
//! `reconcile`, and carries out the decision through the thin OS layer.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal as NixSignal;
use tokio::sync::{mpsc, oneshot, watch};

mod controls;

use super::clock::{later, rfc3339};
use super::control::Reply;
use super::jobs::{JobRt, RunProc, RunTimer, SessionDirs, SpawnedProc};
use super::logs::{Echo, LogFile, Sink, log_path, pump};
use super::policy::{AfterExit, Counters, after_exit, after_resource_shortage};
use super::protocol::{
    InstanceAction, InstanceStatus, ReloadStatus, Request, Response, StatusReport, SupervisorStatus, Target,
    WorkerStatus,
};
use super::reconcile::{Change, plan, plan_jobs};
use super::run_ledger::RunLedger;
use super::watch::WatchSettings;
use super::worktree;
use crate::config::load::load_text;
use crate::config::model::{Config, SpawnMode, Worker, secret_values};
use crate::config::{Overrides, load};
use crate::ledger::{Kind, Owner};
use crate::os::fsutil::write_atomic;
use crate::os::proc;
use crate::os::reaper::{Exit, Reaped, Reaper};

/// Everything that can wake the supervisor.
#[derive(Debug)]
pub enum Event {
    Reaped(Vec<Reaped>),
    Timer {
        worker: String,
        index: u32,
        epoch: u64,
        kind: TimerKind,
    },
    /// A job's scheduled tick is due.
    JobTick {
        job: String,
        epoch: u64,
    },
    /// A run's timeout or stop grace is over.
    RunTimer {
        run: i64,
        inc: u64,
        epoch: u64,
        kind: RunTimer,
    },
    /// A run step's process was spawned (off the event loop).
    RunSpawned {
        run: i64,
        inc: u64,
        step: u32,
        result: Result<SpawnedProc, String>,
    },
    /// One output stream of a run's step reached its end.
    RunOutputClosed {
        run: i64,
        inc: u64,
        step: u32,
    },
    /// Time to try a locked ledger again.
    LedgerRetry,
    Control(Request, oneshot::Sender<Reply>),
    /// SIGTERM / SIGINT; a second one while stopping kills at once.
    Shutdown,
    /// SIGHUP, `drover reload`, or the file watcher.
    Reload(Option<oneshot::Sender<Response>>),
}

/// The most events other than control requests handled between two looks
/// at the control channel (an `Event::Reaped` holds up to
/// [`REAPED_CHUNK`] exits).
const BATCH: usize = 8;

/// The most descendants of one escaped process looked for and killed.
const MAX_ESCAPEE_TREE: usize = 4096;

/// How stale the state file may get while events keep coming.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// The most exits one `Event::Reaped` carries.
pub const REAPED_CHUNK: usize = 32;

/// Whose process a pid is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proc {
    Instance(String, u32),
    Run(i64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerKind {
    /// A restart after backoff is due.
    Restart,
    /// The stop grace is over: SIGKILL the group.
    Kill,
    /// Look again whether a killed group is empty (for the rare group
    /// whose last process is not reaped by drover).
    Recheck,
}

#[derive(Clone, Debug, PartialEq)]
enum Phase {
    Running,
    Backoff {
        until: SystemTime,
    },
    Parked {
        reason: String,
    },
    /// Asked to stop; waiting for the group to empty.
    Stopping,
    /// The leader exited on its own but its group still has processes:
    /// they are being stopped before the exit is acted on.
    Draining,
    Stopped,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Backoff { .. } => "backoff",
            Phase::Parked { .. } => "parked",
            Phase::Stopping | Phase::Draining => "stopping",
            Phase::Stopped => "stopped",
        }
    }
}

/// What to do once an instance's group is empty.
#[derive(Clone, Debug, PartialEq)]
enum Then {
    /// Apply the restart policy to this exit.
    Policy { exit: Option<Exit>, uptime: Duration },
    /// Leave it stopped.
    Stop,
    /// Start it again at once, with fresh counters (a config change or
    /// `drover restart`).
    Start,
    /// Remove the instance (capacity down, worker removed).
    Retire,
}

struct Instance {
    phase: Phase,
    pid: Option<i32>,
    pgid: Option<i32>,
    start_ticks: Option<u64>,
    started_at: Option<SystemTime>,
    started: Option<Instant>,
    counters: Counters,
    last_exit: Option<Exit>,
    error: Option<String>,
    /// Bumped on every phase change, so a timer set for an older phase
    /// is recognised and ignored.
    epoch: u64,
    then: Then,
    kill_sent: bool,
    /// Instances replaced one at a time after a launch-settings change.
    needs_restart: bool,
    worktree: Option<PathBuf>,
    /// Stopped by hand: neither the policy, a rollout nor a reload starts
    /// it; `drover start` or `drover restart` does.
    held: bool,
    /// Starts caused by a config change or `drover restart` (crash
    /// restarts are `counters.restarts`).
    deploys: u32,
    /// When the stop grace of the current stop ends.
    kill_at: Option<SystemTime>,
}

impl Instance {
    fn new() -> Self {
        Instance {
            phase: Phase::Stopped,
            pid: None,
            pgid: None,
            start_ticks: None,
            started_at: None,
            started: None,
            counters: Counters::default(),
            last_exit: None,
            error: None,
            epoch: 0,
            then: Then::Stop,
            kill_sent: false,
            needs_restart: false,
            worktree: None,
            held: false,
            deploys: 0,
            kill_at: None,
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
        self.epoch += 1;
    }

    /// Whether a process of this instance may still exist.
    fn has_processes(&self) -> bool {
        self.pid.is_some() || matches!(self.phase, Phase::Stopping | Phase::Draining)
    }
}

struct WorkerRt {
    spec: Worker,
    instances: BTreeMap<u32, Instance>,
    sink: Arc<Sink>,
    /// Removed from the config: retire every instance, then drop the worker.
    removed: bool,
}

pub struct Options {
    pub config_path: PathBuf,
    pub overrides: Overrides,
    pub echo: bool,
}

pub struct Supervisor {
    opts: Options,
    pub(super) config: Config,
    generation: u64,
    last_reload: Option<ReloadStatus>,
    started_at: SystemTime,
    workers: BTreeMap<String, WorkerRt>,
    pub(super) by_pid: HashMap<i32, Proc>,
    pub(super) reaper: Arc<Reaper>,
    pub(super) tx: mpsc::UnboundedSender<Event>,
    pub(super) echo: Option<Echo>,
    state_path: PathBuf,
    pub(super) dirty: bool,
    pub(super) ledger: RunLedger,
    /// A retry of the locked ledger is due (one timer at a time).
    pub(super) ledger_retry_armed: bool,
    /// Runs without a job (sessions) whose claim waits for the ledger.
    pub(super) unclaimed: Vec<i64>,
    /// This supervisor incarnation, stamped on the runs it claims.
    pub(super) owner: Owner,
    pub(super) jobs: BTreeMap<String, JobRt>,
    pub(super) runs: HashMap<i64, RunProc>,
    pub(super) session_dirs: SessionDirs,
    /// Run spawns handed to a blocking thread and not yet reported.
    pub(super) spawns_in_flight: usize,
    /// Exits of run processes reaped before their spawn was reported.
    pub(super) early_exits: HashMap<i32, Exit>,
    /// Processes of runs cancelled while they were being spawned: their
    /// exit is of no interest.
    pub(super) discarded: std::collections::HashSet<i32>,
    applied_at: SystemTime,
    watch: Option<watch::Sender<WatchSettings>>,
    pub(super) shutting_down: bool,
    stop_waiters: Vec<oneshot::Sender<Reply>>,
    /// The full status reply, encoded, until the next event that is not a
    /// status request: concurrent `status` calls share one encoding.
    status_cache: Option<Arc<Vec<u8>>>,
}

impl Supervisor {
    pub fn new(opts: Options, config: Config, reaper: Arc<Reaper>, tx: mpsc::UnboundedSender<Event>) -> Self {
        let state_path = config.supervisor.state_dir.join("state.json");
        let echo = opts.echo.then(Echo::start);
        Supervisor {
            opts,
            config,
            generation: 0,
            last_reload: None,
            started_at: SystemTime::now(),
            workers: BTreeMap::new(),
            by_pid: HashMap::new(),
            reaper,
            tx,
            echo,
            state_path,
            dirty: true,
            ledger: RunLedger::none(),
            ledger_retry_armed: false,
            unclaimed: Vec::new(),
            owner: Owner {
                pid: std::process::id() as i32,
                start_ticks: proc::start_ticks(std::process::id() as i32).unwrap_or(0),
            },
            jobs: BTreeMap::new(),
            runs: HashMap::new(),
            session_dirs: SessionDirs::new(),
            spawns_in_flight: 0,
            early_exits: HashMap::new(),
            discarded: std::collections::HashSet::new(),
            applied_at: SystemTime::now(),
            watch: None,
            shutting_down: false,
            stop_waiters: Vec::new(),
            status_cache: None,
        }
    }

    /// The config watcher's settings, kept in step with the config.
    pub fn watch_settings(&self) -> WatchSettings {
        WatchSettings::of(&self.config)
    }

    pub fn set_watch(&mut self, tx: watch::Sender<WatchSettings>) {
        self.watch = Some(tx);
    }

    /// Starts every worker of the initial config (generation 1).
    pub fn boot(&mut self) {
        self.generation = 1;
        let state_dir = self.config.supervisor.state_dir.clone();
        let _ = crate::os::fsutil::ensure_private_dir(&state_dir.join("runs"));
        self.ledger = RunLedger::open(&state_dir);
        self.boot_jobs();
        let changes = plan(&self.config.workers, &BTreeMap::new());
        self.apply(changes);
        self.flush_state();
    }

    /// Runs until shutdown completes. `control` carries control requests
    /// and shutdown, `events` everything else: control is served first and
    /// between bounded batches of other events, so a storm of exits (10 000
    /// instances restarting at once) never leaves `status` or `stop`
    /// waiting behind it.
    pub async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut control: mpsc::UnboundedReceiver<Event>,
    ) {
        let mut last_flush = Instant::now();
        loop {
            let ev = tokio::select! {
                biased;
                Some(ev) = control.recv() => ev,
                Some(ev) = events.recv() => ev,
                else => break,
            };
            self.handle(ev);
            // Take whatever else is already queued, up to a bound, before
            // writing state once: a burst of exits costs one state write,
            // not one each; a control request waits for one batch at most.
            let mut taken = 0;
            loop {
                if let Ok(ev) = control.try_recv() {
                    self.handle(ev);
                } else if taken < BATCH
                    && let Ok(ev) = events.try_recv()
                {
                    self.handle(ev);
                    taken += 1;
                } else {
                    break;
                }
            }
            // While a storm goes on, the state file (every instance, and
            // an fsync) is written every FLUSH_EVERY, not after each batch.
            if events.is_empty() || last_flush.elapsed() >= FLUSH_EVERY {
                self.flush_state();
                last_flush = Instant::now();
            }
            self.ledger.check_wal();
            if self.shutting_down && self.all_stopped() {
                break;
            }
        }
        self.finish_shutdown();
    }

    fn handle(&mut self, ev: Event) {
        // Any other event may change what status reports.
        if !matches!(&ev, Event::Control(Request::Status { name: None }, _)) {
            self.status_cache = None;
        }
        match ev {
            Event::Reaped(list) => {
                let mut stray = false;
                for r in list {
                    match r {
                        Reaped::Child { pid, exit } => self.on_exit(pid, exit),
                        Reaped::Stray { .. } => stray = true,
                    }
                }
                if stray {
                    self.recheck_groups();
                }
            }
            Event::Timer { worker, index, epoch, kind } => self.on_timer(&worker, index, epoch, kind),
            Event::JobTick { job, epoch } => self.on_job_tick(&job, epoch),
            Event::LedgerRetry => self.on_ledger_retry(),
            Event::RunTimer { run, inc, epoch, kind } => self.on_run_timer(run, inc, epoch, kind),
            Event::RunOutputClosed { run, inc, step } => self.on_run_output_closed(run, inc, step),
            Event::RunSpawned { run, inc, step, result } => self.on_run_spawned(run, inc, step, result),
            Event::Control(req, reply) => self.on_request(req, reply),
            Event::Shutdown => self.shutdown(),
            Event::Reload(reply) => {
                #[cfg(debug_assertions)]
                super::runtime::test_panic_on_reload();
                let resp = self.reload();
                if let Some(r) = reply {
                    let _ = r.send(resp);
                }
            }
        }
    }

    // ----- processes -----

    fn sink_for(&self, name: &str) -> Arc<Sink> {
        let sup = &self.config.supervisor;
        let path = log_path(&sup.state_dir, name);
        let file = LogFile::open(path.clone(), sup.log_max_size.0, sup.log_keep).unwrap_or_else(|e| {
            tracing::warn!(worker = name, error = %e, "cannot open the log file; output is dropped until it can be");
            LogFile::lazy(path, sup.log_max_size.0, sup.log_keep)
        });
        let secrets =
            self.config.workers.get(name).map(|w| secret_values(&w.env, &w.secret_env)).unwrap_or_default();
        Arc::new(Sink::new(name.to_string(), file, self.echo.clone(), secrets))
    }

    fn spawn(&mut self, name: &str, index: u32) {
        let state_dir = self.config.supervisor.state_dir.clone();
        let Some(w) = self.workers.get_mut(name) else { return };
        let spec = &w.spec;
        let inst = w.instances.entry(index).or_insert_with(Instance::new);
        inst.error = None;
        inst.kill_sent = false;
        inst.needs_restart = false;

        let dir = match spec.spawn_mode {
            SpawnMode::SameDir => Ok(spec.dir.clone()),
            SpawnMode::Worktree => match &inst.worktree {
                Some(p) if p.is_dir() => Ok(p.clone()),
                _ => worktree::create(&self.reaper, &spec.dir, &state_dir, name, index),
            },
        }
        .map_err(|e| (e, false));
        let result = dir.and_then(|dir| {
            if spec.spawn_mode == SpawnMode::Worktree {
                inst.worktree = Some(dir.clone());
            }
            let mut cmd = std::process::Command::new(&spec.command[0]);
            cmd.args(&spec.command[1..])
                .current_dir(&dir)
                .envs(&spec.env)
                .env("DROVER_WORKER", name)
                .env("DROVER_INSTANCE", index.to_string())
                .env("DROVER_CAPACITY", spec.capacity.to_string())
                .env("DROVER_STATE_DIR", &state_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            proc::give_back_fd_limit(&mut cmd);
            crate::os::identity::apply(&mut cmd, &spec.identity);
            let spawned = if proc::descriptors_short() {
                Err(std::io::Error::from_raw_os_error(nix::libc::EMFILE))
            } else {
                self.reaper.spawn(&mut cmd)
            };
            spawned.map_err(|e| {
                let short = out_of_resources(&e);
                let mut msg = format!("cannot start {:?} in {}: {e}", spec.command[0], dir.display());
                if short {
                    msg.push_str(&format!(
                        "; drover is short of resources (it keeps {} descriptors in reserve): \
                         retrying, not counted as a crash",
                        proc::FD_RESERVE
                    ));
                }
                (msg, short)
            })
        });
        let now = SystemTime::now();
        match result {
            Ok(mut child) => {
                let pid = child.id() as i32;
                inst.pid = Some(pid);
                inst.pgid = Some(pid);
                inst.start_ticks = proc::start_ticks(pid);
                inst.started_at = Some(now);
                inst.started = Some(Instant::now());
                inst.set_phase(Phase::Running);
                for (stream, pipe) in [
                    ("out", child.stdout.take().map(std::os::fd::OwnedFd::from)),
                    ("err", child.stderr.take().map(std::os::fd::OwnedFd::from)),
                ] {
                    if let Some(fd) = pipe
                        && let Ok(rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
                    {
                        tokio::spawn(pump(w.sink.clone(), index, stream, rx, None));
                    }
                }
                self.by_pid.insert(pid, Proc::Instance(name.to_string(), index));
                tracing::info!(worker = name, instance = index, pid, "started");
            }
            Err((msg, true)) => {
                // Not the worker's failure: never a step toward parking.
                let delay = after_resource_shortage(spec, &mut inst.counters);
                tracing::warn!(worker = name, instance = index, error = %msg, delay_ms = millis(delay), "start failed");
                inst.error = Some(msg);
                inst.set_phase(Phase::Backoff { until: later(now, delay) });
                let epoch = inst.epoch;
                self.timer(name, index, epoch, TimerKind::Restart, delay);
            }
            Err((msg, false)) => {
                tracing::warn!(worker = name, instance = index, error = %msg, "start failed");
                inst.error = Some(msg);
                inst.started_at = Some(now);
                inst.then = Then::Policy { exit: None, uptime: Duration::ZERO };
                self.settle(name, index);
            }
        }
        self.dirty = true;
    }

    fn on_exit(&mut self, pid: i32, exit: Exit) {
        let (name, index) = match self.by_pid.remove(&pid) {
            Some(Proc::Instance(name, index)) => (name, index),
            Some(Proc::Run(id)) => return self.on_run_exit(id, exit),
            // A run step whose spawn the actor has not heard of yet.
            None => {
                if !self.discarded.remove(&pid) {
                    self.early_exits.insert(pid, exit);
                }
                return;
            }
        };
        let Some(inst) = self.workers.get_mut(&name).and_then(|w| w.instances.get_mut(&index)) else {
            return;
        };
        let uptime = inst.started.map(|s| s.elapsed()).unwrap_or_default();
        tracing::info!(worker = %name, instance = index, pid, exit = %exit, uptime_ms = millis(uptime), "exited");
        inst.pid = None;
        inst.last_exit = Some(exit.clone());
        if inst.phase == Phase::Running {
            inst.then = Then::Policy { exit: Some(exit), uptime };
        }
        self.dirty = true;
        let group_left = inst.pgid.is_some_and(proc::group_alive);
        if group_left && inst.phase == Phase::Running {
            // Its children live on in the group: stop them before the
            // exit is acted on, so a restart never doubles them.
            inst.set_phase(Phase::Draining);
            self.signal_stop(&name, index);
        } else if !group_left {
            self.settle(&name, index);
        }
    }

    /// Sends the stop signal to an instance's group and arms the kill timer.
    fn signal_stop(&mut self, name: &str, index: u32) {
        let Some(w) = self.workers.get_mut(name) else { return };
        let (sig, grace) = (w.spec.stop_signal.to_nix(), w.spec.stop_grace.0);
        let Some(inst) = w.instances.get_mut(&index) else { return };
        if let Some(pgid) = inst.pgid {
            let _ = proc::signal_group(pgid, sig);
            // A stopped (SIGSTOP) process would not see the signal.
            let _ = proc::signal_group(pgid, NixSignal::SIGCONT);
        }
        inst.kill_at = SystemTime::now().checked_add(grace);
        let epoch = inst.epoch;
        self.timer(name, index, epoch, TimerKind::Kill, grace);
    }

    /// Asks an instance to stop; `then` says what follows.
    fn stop_instance(&mut self, name: &str, index: u32, then: Then) {
        let Some(inst) = self.workers.get_mut(name).and_then(|w| w.instances.get_mut(&index)) else { return };
        inst.then = then;
        match inst.phase {
            Phase::Running => {
                inst.set_phase(Phase::Stopping);
                self.signal_stop(name, index);
            }
            Phase::Draining => inst.phase = Phase::Stopping,
            Phase::Stopping => {}
            Phase::Backoff { .. } | Phase::Parked { .. } | Phase::Stopped => self.settle(name, index),
        }
        self.dirty = true;
    }

    /// Kills what drover adopted from an instance: processes that left its
    /// group (`setsid`) and were re-parented to drover when their parent
    /// died, with everything they started (whatever its environment or
    /// session). They are found by the worker and instance in their
    /// environment; with `None`, every child drover does not track goes.
    fn kill_escapees(&self, of: Option<(&str, u32)>) {
        for pid in proc::own_children() {
            if self.by_pid.contains_key(&pid) || proc::is_zombie(pid) {
                continue;
            }
            if let Some((name, index)) = of {
                let ours = proc::environ_var(pid, "DROVER_WORKER").as_deref() == Some(name)
                    && proc::environ_var(pid, "DROVER_INSTANCE") == Some(index.to_string());
                if !ours {
                    continue;
                }
            }
            // What it started lives on in sessions of their own, with
            // their parent (it) alive: not yet drover's children. Taken
            // before the kill, which would scatter them.
            let below = proc::descendants(pid, MAX_ESCAPEE_TREE);
            tracing::warn!(
                pid,
                worker = of.map(|o| o.0),
                descendants = below.len(),
                "killing a process that left its worker's process group"
            );
            for p in std::iter::once(pid).chain(below) {
                // It may lead a group of its own by now.
                if proc::pgid_of(p) == Some(p) {
                    let _ = proc::signal_group(p, NixSignal::SIGKILL);
                } else {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), NixSignal::SIGKILL);
                }
            }
        }
    }

    /// The instance has no process left: act on its `then`.
    fn settle(&mut self, name: &str, index: u32) {
        if self.workers.get(name).and_then(|w| w.instances.get(&index)).is_some_and(|i| i.pgid.is_some()) {
            self.kill_escapees(Some((name, index)));
        }
        let Some(w) = self.workers.get_mut(name) else { return };
        let Some(inst) = w.instances.get_mut(&index) else { return };
        inst.pid = None;
        if let Some(pgid) = inst.pgid.take() {
            crate::os::groups::remove(pgid);
        }
        inst.start_ticks = None;
        let then = std::mem::replace(&mut inst.then, Then::Stop);
        if self.shutting_down {
            inst.set_phase(Phase::Stopped);
            return;
        }
        match then {
            Then::Stop => {
                inst.set_phase(Phase::Stopped);
                // A hand stop may have cut into a rollout: carry on with the rest.
                self.continue_rollout(name);
            }
            Then::Retire => {
                if let Some(wt) = w.instances.remove(&index).and_then(|i| i.worktree) {
                    worktree::remove(&self.reaper, &w.spec.dir, &wt);
                }
                if w.removed && w.instances.is_empty() {
                    self.workers.remove(name);
                }
            }
            Then::Start => {
                inst.counters = Counters { restarts: inst.counters.restarts, ..Counters::default() };
                self.deploy(name, index);
                self.continue_rollout(name);
            }
            Then::Policy { exit, uptime } => {
                match after_exit(&w.spec, &mut inst.counters, exit.as_ref(), uptime) {
                    AfterExit::Restart { delay } if delay.is_zero() => {
                        self.spawn(name, index);
                    }
                    AfterExit::Restart { delay } => {
                        inst.set_phase(Phase::Backoff { until: later(SystemTime::now(), delay) });
                        let epoch = inst.epoch;
                        tracing::info!(
                            worker = name,
                            instance = index,
                            delay_ms = millis(delay),
                            "restart after backoff"
                        );
                        self.timer(name, index, epoch, TimerKind::Restart, delay);
                    }
                    AfterExit::Park { reason } => {
                        tracing::warn!(worker = name, instance = index, %reason, "parked");
                        inst.set_phase(Phase::Parked { reason });
                    }
                    AfterExit::Stop => inst.set_phase(Phase::Stopped),
                }
            }
        }
        self.dirty = true;
    }

    fn on_timer(&mut self, name: &str, index: u32, epoch: u64, kind: TimerKind) {
        let Some(inst) = self.workers.get_mut(name).and_then(|w| w.instances.get_mut(&index)) else { return };
        if inst.epoch != epoch {
            return;
        }
        match kind {
            TimerKind::Restart => {
                if matches!(inst.phase, Phase::Backoff { .. }) && !self.shutting_down {
                    self.spawn(name, index);
                }
            }
            TimerKind::Kill | TimerKind::Recheck => {
                if !matches!(inst.phase, Phase::Stopping | Phase::Draining) {
                    return;
                }
                match inst.pgid {
                    Some(pgid) if proc::group_alive(pgid) => {
                        if kind == TimerKind::Kill {
                            tracing::warn!(worker = name, instance = index, pgid, "stop grace over; SIGKILL");
                            inst.kill_sent = true;
                            let _ = proc::signal_group(pgid, NixSignal::SIGKILL);
                        }
                        self.timer(name, index, epoch, TimerKind::Recheck, Duration::from_millis(100));
                    }
                    _ if inst.pid.is_none() => self.settle(name, index),
                    _ => {}
                }
            }
        }
    }

    /// After a stray was reaped: instances whose leader is gone and whose
    /// group may now be empty.
    fn recheck_groups(&mut self) {
        let done: Vec<(String, u32)> = self
            .workers
            .iter()
            .flat_map(|(n, w)| w.instances.iter().map(move |(i, inst)| (n, *i, inst)))
            .filter(|(_, _, inst)| {
                inst.pid.is_none()
                    && matches!(inst.phase, Phase::Stopping | Phase::Draining)
                    && !inst.pgid.is_some_and(proc::group_alive)
            })
            .map(|(n, i, _)| (n.clone(), i))
            .collect();
        for (n, i) in done {
            self.settle(&n, i);
        }
        self.recheck_run_groups();
    }

    fn timer(&self, name: &str, index: u32, epoch: u64, kind: TimerKind, after: Duration) {
        let tx = self.tx.clone();
        let worker = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(Event::Timer { worker, index, epoch, kind });
        });
    }

    // ----- config changes -----

    fn apply(&mut self, changes: Vec<Change>) {
        for change in changes {
            let name = change.worker().to_string();
            let spec = self.config.workers.get(&name).cloned();
            match (change, spec) {
                (Change::Stop { .. }, _) | (_, None) => {
                    let Some(w) = self.workers.get_mut(&name) else { continue };
                    w.removed = true;
                    let idx: Vec<u32> = w.instances.keys().copied().collect();
                    if idx.is_empty() {
                        self.workers.remove(&name);
                    }
                    for i in idx {
                        self.stop_instance(&name, i, Then::Retire);
                    }
                }
                (Change::Start { .. }, Some(spec)) => {
                    let sink = self.sink_for(&name);
                    let cap = spec.capacity;
                    self.workers.insert(
                        name.clone(),
                        WorkerRt { spec, instances: BTreeMap::new(), sink, removed: false },
                    );
                    for i in 0..cap {
                        self.spawn(&name, i);
                    }
                }
                (change @ (Change::Restart { .. } | Change::Update { .. }), Some(spec)) => {
                    let Some(w) = self.workers.get_mut(&name) else { continue };
                    w.sink.set_secrets(secret_values(&spec.env, &spec.secret_env));
                    w.spec = spec;
                    w.removed = false;

                    let restart = matches!(change, Change::Restart { .. });
                    for inst in w.instances.values_mut() {
                        inst.needs_restart |= restart;
                        // A parked instance gets a fresh start from any change.
                        if matches!(inst.phase, Phase::Parked { .. }) {
                            inst.needs_restart = true;
                        }
                    }
                    self.scale(&name);
                    self.continue_rollout(&name);
                }
            }
        }
    }

    /// Starts missing indices below capacity; stops those above it, from the top.
    fn scale(&mut self, name: &str) {
        let Some(w) = self.workers.get(name) else { return };
        let cap = w.spec.capacity;
        let above: Vec<u32> = w.instances.keys().copied().filter(|&i| i >= cap).collect();
        let missing: Vec<u32> = (0..cap).filter(|i| !w.instances.contains_key(i)).collect();
        for i in above.into_iter().rev() {
            self.stop_instance(name, i, Then::Retire);
        }
        for i in missing {
            self.spawn(name, i);
        }
    }

    /// Replaces, one at a time, the instances whose settings are stale:
    /// a worker with capacity > 1 is never fully down during a change.
    fn continue_rollout(&mut self, name: &str) {
        let Some(w) = self.workers.get_mut(name) else { return };
        if w.instances.values().any(|i| matches!(i.phase, Phase::Stopping) && i.then == Then::Start) {
            return; // one is being replaced already
        }
        // Instances without a process take the new settings at once.
        let idle: Vec<u32> = w
            .instances
            .iter()
            .filter(|(_, i)| {
                i.needs_restart && matches!(i.phase, Phase::Backoff { .. } | Phase::Parked { .. })
            })
            .map(|(k, _)| *k)
            .collect();
        for &i in &idle {
            if let Some(inst) = w.instances.get_mut(&i) {
                inst.counters = Counters::default();
            }
        }
        for i in idle {
            self.deploy(name, i);
        }
        // A stopped instance (it finished under on-failure or never)
        // runs again with the new settings.
        let Some(w) = self.workers.get(name) else { return };
        let stopped: Vec<u32> = w
            .instances
            .iter()
            .filter(|(_, i)| i.needs_restart && i.phase == Phase::Stopped && !i.held)
            .map(|(k, _)| *k)
            .collect();
        for i in stopped {
            self.deploy(name, i);
        }
        let Some(w) = self.workers.get_mut(name) else { return };
        let next =
            w.instances.iter().find(|(_, i)| i.needs_restart && i.phase == Phase::Running).map(|(k, _)| *k);
        if let Some(i) = next {
            self.stop_instance(name, i, Then::Start);
        }
    }

    fn actual(&self) -> BTreeMap<&str, &Worker> {
        self.workers.iter().filter(|(_, w)| !w.removed).map(|(k, w)| (k.as_str(), &w.spec)).collect()
    }

    fn reload(&mut self) -> Response {
        if self.shutting_down {
            return Response::Error { message: "the supervisor is stopping".into() };
        }
        let at = rfc3339(SystemTime::now());
        match load(&self.opts.config_path, &self.opts.overrides) {
            Ok(loaded) => {
                self.last_reload = Some(ReloadStatus { at, ok: true, error: None });
                self.dirty = true;
                if loaded.config == self.config {
                    return Response::Ok { message: format!("no change (generation {})", self.generation) };
                }
                let changes = plan(&loaded.config.workers, &self.actual());
                self.config = loaded.config;
                self.generation += 1;
                self.applied_at = SystemTime::now();
                // Comma-separated names; a list with none is left out.
                let names = |f: fn(&Change) -> bool| -> Option<String> {
                    let v: Vec<&str> = changes.iter().filter(|c| f(c)).map(Change::worker).collect();
                    (!v.is_empty()).then(|| v.join(","))
                };
                tracing::info!(
                    generation = self.generation,
                    started = names(|c| matches!(c, Change::Start { .. })),
                    stopped = names(|c| matches!(c, Change::Stop { .. })),
                    restarted = names(|c| matches!(c, Change::Restart { .. })),
                    updated = names(|c| matches!(c, Change::Update { .. })),
                    "config applied"
                );
                self.apply(changes);
                self.apply_jobs();
                if let Some(w) = &self.watch {
                    let new = WatchSettings::of(&self.config);
                    w.send_if_modified(|cur| std::mem::replace(cur, new.clone()) != new);
                }
                Response::Ok { message: format!("applied generation {}", self.generation) }
            }
            Err(diags) => {
                let error = diags.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n");
                tracing::error!(%error, "reload failed; the last good config stays in force");
                self.last_reload = Some(ReloadStatus { at, ok: false, error: Some(error.clone()) });
                self.dirty = true;
                Response::Error { message: error }
            }
        }
    }

    /// What `text` (the file at `path`, read by the client) would change.
    /// Nothing here opens a file the client named.
    fn plan_for(&self, path: PathBuf, text: String) -> Response {
        match load_text(&path, text, &self.opts.overrides) {
            Ok(loaded) => Response::Plan {
                generation: self.generation,
                changes: plan(&loaded.config.workers, &self.actual()),
                jobs: plan_jobs(&loaded.config.jobs, &self.config.jobs),
            },
            Err(diags) => Response::Error {
                message: diags.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"),
            },
        }
    }

    // ----- control -----

    fn on_request(&mut self, req: Request, reply: oneshot::Sender<Reply>) {
        let resp = match req {
            Request::Status { name: None } => {
                let line = match &self.status_cache {
                    Some(line) => line.clone(),
                    None => {
                        let state = if self.shutting_down { "stopping" } else { "running" };
                        let resp = Response::Status(Box::new(self.report(state, true)));
                        let line = Arc::new(super::control::encode(&resp));
                        self.status_cache = Some(line.clone());
                        line
                    }
                };
                let _ = reply.send(Reply::Encoded(line));
                return;
            }
            // The full status (no name) is answered from the cache above.
            Request::Status { name: Some(n) } => {
                if self.workers.contains_key(&n) {
                    let mut r = self.report(if self.shutting_down { "stopping" } else { "running" }, true);
                    r.workers.retain(|w| w.name == n);
                    Response::Status(Box::new(r))
                } else {
                    Response::Error { message: format!("no worker named {n:?}") }
                }
            }

            Request::Stop {} => {
                self.stop_waiters.push(reply);
                if !self.shutting_down {
                    self.shutdown();
                }
                return;
            }
            Request::Reload {} => self.reload(),
            Request::Plan { path, text } => self.plan_for(path, text),
            Request::Trigger { job } => match self.trigger(&job) {
                Ok(id) => Response::Run { id },
                Err(message) => Response::Error { message },
            },
            Request::Cancel { id } => match self.cancel(id, "cancelled by drover runs cancel") {
                Ok(message) => Response::Ok { message },
                Err(message) => Response::Error { message },
            },
            Request::Resume { id } => match self.resume(id) {
                Ok(id) => Response::Run { id },
                Err(message) => Response::Error { message },
            },
            Request::Bg { name, command, dir, env } => match self.start_session(name, command, dir, env) {
                Ok(id) => Response::Run { id },
                Err(message) => Response::Error { message },
            },
            Request::Kill { key } => match self.find_run(&key).and_then(|r| {
                if r.kind != Kind::Session {
                    return Err(format!("run {} is not a session; use drover runs cancel", r.id));
                }
                self.cancel(r.id, "killed by drover kill")
            }) {
                Ok(message) => Response::Ok { message },
                Err(message) => Response::Error { message },
            },
            Request::RunInfo { key } => match self.find_run(&key) {
                Ok(run) => Response::RunInfo(Box::new(run)),
                Err(message) => Response::Error { message },
            },
            Request::Instances { action, targets } => self.on_instances(action, &targets),
            // The older form of `restart NAME`, still understood.
            Request::Restart { name } => {
                match self.on_instances(InstanceAction::Restart, &[Target { worker: name, index: None }]) {
                    Response::Instances { message, .. } => Response::Ok { message },
                    other => other,
                }
            }
            Request::Unpark { name } => self.unpark(&name),
            Request::LogPath { name } => {
                let state_dir = &self.config.supervisor.state_dir;
                if self.workers.contains_key(&name) {
                    Response::LogPath { path: log_path(state_dir, &name) }
                } else if let Ok(run) = self.find_run(&name) {
                    Response::LogPath { path: super::jobs::run_log_path(state_dir, run.id) }
                } else {
                    Response::Error { message: format!("no worker, run or session named {name:?}") }
                }
            }
        };
        let _ = reply.send(Reply::Response(resp));
    }

    fn unpark(&mut self, name: &str) -> Response {
        let Some(w) = self.workers.get_mut(name) else {
            return Response::Error { message: format!("no worker named {name:?}") };
        };
        let parked: Vec<u32> = w
            .instances
            .iter_mut()
            .filter(|(_, i)| matches!(i.phase, Phase::Parked { .. }))
            .map(|(k, i)| {
                i.counters = Counters { restarts: i.counters.restarts, ..Counters::default() };
                *k
            })
            .collect();
        let n = parked.len();
        for i in parked {
            self.spawn(name, i);
        }
        Response::Ok { message: format!("unparked {n} instance{} of {name}", if n == 1 { "" } else { "s" }) }
    }

    // ----- shutdown -----

    fn shutdown(&mut self) {
        if self.shutting_down {
            // Asked twice: do not wait out the grace.
            tracing::warn!("second stop request: killing every process group now");
            for w in self.workers.values_mut() {
                for inst in w.instances.values_mut() {
                    if let Some(pgid) = inst.pgid {
                        let _ = proc::signal_group(pgid, NixSignal::SIGKILL);
                    }
                }
            }
            for r in self.runs.values() {
                if let Some(pgid) = r.pgid {
                    let _ = proc::signal_group(pgid, NixSignal::SIGKILL);
                }
            }
            return;
        }
        tracing::info!("stopping every worker");
        self.shutting_down = true;
        let all: Vec<(String, u32)> =
            self.workers.iter().flat_map(|(n, w)| w.instances.keys().map(move |i| (n.clone(), *i))).collect();
        for (n, i) in all {
            self.stop_instance(&n, i, Then::Stop);
        }
        self.stop_all_runs();
    }

    fn all_stopped(&self) -> bool {
        self.runs.is_empty()
            && self.spawns_in_flight == 0
            && self.workers.values().all(|w| w.instances.values().all(|i| !i.has_processes()))
    }

    fn finish_shutdown(&mut self) {
        self.kill_escapees(None);
        self.ledger.flush_before_exit();
        for w in self.workers.values() {
            for inst in w.instances.values() {
                if let Some(wt) = &inst.worktree {
                    worktree::remove(&self.reaper, &w.spec.dir, wt);
                }
            }
        }
        let report = self.report("stopped", false);
        self.write_state(&report);
        let _ = std::fs::remove_file(self.config.supervisor.state_dir.join("drover.sock"));
        for w in self.stop_waiters.drain(..) {
            let _ = w.send(Reply::Response(Response::Ok { message: "stopped".into() }));
        }
        tracing::info!("stopped");
    }

    // ----- state -----

    /// The status report; `with_runs` adds jobs, runs and sessions from
    /// the ledger (the state file leaves them out: they are the ledger's,
    /// and recovery needs only the workers' processes).
    fn report(&self, state: &str, with_runs: bool) -> StatusReport {
        let me = std::process::id() as i32;
        let active = if with_runs { self.active_runs() } else { Vec::new() };
        StatusReport {
            supervisor: SupervisorStatus {
                state: state.into(),
                pid: Some(me),
                pid_start_ticks: proc::start_ticks(me),
                config: Some(self.opts.config_path.clone()),
                started_at: Some(rfc3339(self.started_at)),
                generation: self.generation,
                applied_at: Some(rfc3339(self.applied_at)),
                last_reload: self.last_reload.clone(),
            },
            workers: self
                .workers
                .iter()
                .map(|(name, w)| WorkerStatus {
                    name: name.clone(),
                    capacity: w.spec.capacity,
                    state: worker_state(w),
                    instances: w.instances.iter().map(|(i, inst)| instance_status(*i, inst)).collect(),
                })
                .collect(),
            jobs: if with_runs { self.jobs_status() } else { Vec::new() },
            ledger_error: self.ledger.problem(),
            sessions: active.iter().filter(|r| r.kind == Kind::Session).cloned().collect(),
            runs: active.into_iter().filter(|r| r.kind != Kind::Session).collect(),
            overrides: self.opts.overrides.shown(),
        }
    }

    fn flush_state(&mut self) {
        if self.dirty {
            self.dirty = false;
            let report = self.report(if self.shutting_down { "stopping" } else { "running" }, false);
            self.write_state(&report);
        }
    }

    fn write_state(&self, report: &StatusReport) {
        let data = serde_json::to_vec_pretty(report).unwrap_or_default();
        if let Err(e) = write_atomic(&self.state_path, &data) {
            tracing::error!(error = %e, path = %self.state_path.display(), "cannot write the state file");
        }
    }

    pub(super) fn is_worker(&self, name: &str) -> bool {
        self.workers.contains_key(name)
    }

    pub fn state_dir(&self) -> &Path {
        &self.config.supervisor.state_dir
    }
}

/// Whether a spawn failed for want of drover's own resources
/// (descriptors, processes, memory) rather than anything the worker did.
fn out_of_resources(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|n| {
        [Errno::EMFILE, Errno::ENFILE, Errno::EAGAIN, Errno::ENOMEM].contains(&Errno::from_raw(n))
    })
}

/// A duration in whole milliseconds, for the log.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn instance_status(index: u32, inst: &Instance) -> InstanceStatus {
    let error = match &inst.phase {
        Phase::Parked { reason } => Some(match &inst.error {
            Some(e) => format!("{reason}; last error: {e}"),
            None => reason.clone(),
        }),
        _ => inst.error.clone(),
    };
    InstanceStatus {
        index,
        pid: inst.pid,
        pgid: inst.pgid,
        start_ticks: inst.start_ticks,
        state: inst.phase.name().into(),
        restarts: inst.counters.restarts,
        deploys: inst.deploys,
        held: inst.held,
        started_at: inst.started_at.map(rfc3339),
        last_exit: inst.last_exit.clone(),
        error,
        next_start_at: match inst.phase {
            Phase::Backoff { until } => Some(rfc3339(until)),
            _ => None,
        },
        kill_at: match inst.phase {
            Phase::Stopping | Phase::Draining if !inst.kill_sent => inst.kill_at.map(rfc3339),
            _ => None,
        },
    }
}

/// One word for a worker: the state all its instances share, else the
/// one that most needs attention.
fn worker_state(w: &WorkerRt) -> String {
    let names: Vec<&str> = w.instances.values().map(|i| i.phase.name()).collect();
    if w.removed {
        return "stopping".into();
    }
    for s in ["parked", "backoff", "stopping", "starting"] {
        if names.contains(&s) {
            return s.into();
        }
    }
    if names.is_empty() || names.iter().all(|s| *s == "stopped") {
        "stopped".into()
    } else {
        "running".into()
    }
}
