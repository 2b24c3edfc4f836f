//! The supervisor actor: the one owner of all supervisor state. It sleeps
//! until an event arrives (a child exited, a timer fired, a control
//! request, a signal), decides with the pure functions of `policy` and
//! `reconcile`, and carries out the decision through the thin OS layer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal as NixSignal;
use tokio::sync::{mpsc, oneshot, watch};

mod controls;
mod instances;
mod memory;

use instances::node_name;
pub use memory::Sample;

use super::child::InFlight;
use super::clock::rfc3339;
use super::events::Reply;
pub use super::events::{Event, Proc, TimerKey};
use super::graph::{Graph, Node};
use super::jobs::{JobRt, RunProc, SessionDirs};
use super::logs::{Echo, LogFile, Sink, log_path};
use super::probes::{NotifyEvent, ProbeHandle};
use super::protocol::{
    InstanceAction, InstanceStatus, ReloadStatus, Request, Response, SocketStatus, StatusReport,
    SupervisorStatus, Target, WorkerStatus,
};
use super::reconcile::{Change, plan, plan_jobs};
use super::run_ledger::RunLedger;
use super::timers::Timers;
use super::watch::WatchSettings;
use super::workers::instance::{Input, Instance, State, Then, TimerKind, Why};
use super::workers::rollout::Progress;
use super::workers::sockets::Sockets;
use super::worktree;
use crate::config::load::load_text;
use crate::config::model::{Config, Worker, secret_values};
use crate::config::{Overrides, load};
use crate::ledger::{Kind, Owner};
use crate::os::proc;
use crate::os::reaper::{Exit, Reaped, Reaper};

/// The most events other than control requests handled between two looks
/// at the control channel.
const BATCH: usize = 8;

/// The most descendants of one escaped process looked for and killed.
const MAX_ESCAPEE_TREE: usize = 4096;

/// The least time between two writes of the state file: a worker that
/// restarts in a loop costs one write (an fsync) a second, not one per
/// restart. A killed drover's successor finds what the file has not
/// caught up with by the marks in the environment.
const STATE_GAP: Duration = Duration::from_secs(1);

struct WorkerRt {
    spec: Worker,
    instances: BTreeMap<u32, Box<Instance>>,
    sink: Arc<Sink>,
    /// Removed from the config: retire every instance, then drop the worker.
    removed: bool,
    /// The running probe of each instance that has one.
    probes: HashMap<u32, ProbeHandle>,
    /// Where its rolling restart stands.
    rollout: Progress,
    /// Whether its rollout may have work: set by a step that leaves an
    /// instance unsettled (`rollout::settled`) and where instances are
    /// marked stale; cleared once a look finds nothing to do. A restart
    /// then costs no look at every instance (a tenth of a restart at
    /// 1000 instances).
    rolling: bool,
    /// Whether an instance may be waiting for its dependencies: set by a
    /// step that leaves one waiting, cleared once a look finds none. As
    /// `rolling`, so that a restart looks at no other instance.
    may_wait: bool,
    /// The listening sockets held for it.
    sockets: Sockets,
}

impl WorkerRt {
    fn new(spec: Worker, sink: Arc<Sink>) -> Self {
        let mut sockets = Sockets::default();
        if !sockets.sync(&spec.sockets)
            && let Some(e) = sockets.error()
        {
            tracing::warn!(worker = %sink.name, error = %e, "socket not bound; the worker cannot start");
        }
        WorkerRt {
            spec,
            instances: BTreeMap::new(),
            sink,
            removed: false,
            probes: HashMap::new(),
            rollout: Progress::Done,
            rolling: true,
            may_wait: false,
            sockets,
        }
    }
}

pub struct Options {
    pub config_path: PathBuf,
    pub overrides: Overrides,
    pub echo: bool,
}

/// How long drover's exit waits for event followers to take their last line.
const END_OF_STREAMS: Duration = Duration::from_secs(1);

pub struct Supervisor {
    opts: Options,
    pub(super) config: Config,
    generation: u64,
    last_reload: Option<ReloadStatus>,
    started_at: SystemTime,
    /// drover's own start time in clock ticks, read once: every report
    /// (and state write) names it.
    start_ticks: Option<u64>,
    workers: BTreeMap<String, WorkerRt>,
    pub(super) by_pid: HashMap<i32, Proc>,
    pub(super) reaper: Arc<Reaper>,
    pub(super) tx: mpsc::UnboundedSender<Event>,
    pub(super) echo: Option<Echo>,
    state_file: super::state_file::StateFile,
    pub(super) dirty: bool,
    pub(super) ledger: RunLedger,
    /// Runs without a job (sessions) whose claim waits for the ledger.
    pub(super) unclaimed: Vec<i64>,
    /// This supervisor incarnation, stamped on the runs it claims.
    pub(super) owner: Owner,
    pub(super) jobs: BTreeMap<String, JobRt>,
    pub(super) runs: HashMap<i64, RunProc>,
    pub(super) session_dirs: SessionDirs,
    /// Spawns (of instances and run steps) handed to blocking threads and
    /// not yet reported, and the exits that came before their report.
    pub(super) in_flight: InFlight,
    /// Instances (process-group mode) whose ended incarnation's escapees
    /// are still to be looked for: once the replacement's spawn has
    /// landed, so that the restart does not wait for the look, and the
    /// new leader, then known, is not taken for an escapee.
    pub(super) escapee_scans: std::collections::BTreeSet<(String, u32)>,
    /// Cgroups an instance's last step left to remove: the restart's
    /// spawn removes them after its clone, else the end of the step.
    pub(super) cgroups_to_remove: Vec<PathBuf>,
    applied_at: SystemTime,
    watch: Option<watch::Sender<WatchSettings>>,
    pub(super) shutting_down: bool,
    stop_waiters: Vec<oneshot::Sender<Reply>>,
    pub(super) timers: Timers<TimerKey>,
    /// The dependencies of the config in force.
    pub(super) graph: Graph,
    /// Workers whose instances changed state since the last `propagate`.
    pub(super) touched: BTreeSet<String>,
    /// Jobs to run (source `dependency`) once their own dependencies are met.
    pub(super) dependency_runs_due: BTreeSet<String>,
    /// Removed workers still being retired, in dependency order.
    removing: BTreeSet<String>,
    /// Levels of workers still to stop on shutdown, dependents first.
    stop_levels: Vec<Vec<String>>,
    /// The socket instances send sd_notify datagrams to.
    notify: Option<super::probes::notify::NotifySocket>,
    /// Told once every instance is up (or has failed to come up).
    ready: Option<super::runtime::Ready>,
    /// The full status report, until the next event that is not a status
    /// request: concurrent `status` calls share one, and the control
    /// connections answer from it while it lasts.
    pub(super) status_cache: super::events::StatusCache,
    /// State changes as they happen, for `drover events` and `top`.
    pub(super) live: super::live::Live,
    /// Runs ended and reloads, counted for the metrics.
    pub(super) counters: super::metrics::Counters,
    /// The `/metrics` server, when `supervisor.metrics` is set.
    metrics: Option<super::metrics::Server>,
    /// Scrapes go to the control channel, served before other events.
    control_tx: Option<mpsc::UnboundedSender<Event>>,
    /// A memory sample of the instances with `max_memory` is being read.
    memory_sample_pending: bool,
    /// The containment chosen at start (a reload does not change it).
    pub(super) containment: super::containment::Mode,
    /// In cgroup mode, what tells when an instance's or run step's cgroup
    /// is empty (`None` also if inotify could not be had: then the stop's
    /// timers look instead).
    pub(super) cgroup_watch: Option<super::containment::Watch>,
}

impl Supervisor {
    pub fn new(
        opts: Options,
        config: Config,
        containment: super::containment::Mode,
        reaper: Arc<Reaper>,
        tx: mpsc::UnboundedSender<Event>,
    ) -> Self {
        let state_path = config.supervisor.state_dir.join("state.json");
        let echo = opts.echo.then(Echo::start);
        let cgroup_watch = containment.cgroups.as_ref().and_then(|_| {
            super::containment::Watch::start(tx.clone())
                .map_err(|e| tracing::warn!(error = %e, "cannot watch cgroups; a stop looks again after its grace"))
                .ok()
        });
        let start_ticks = proc::start_ticks(std::process::id() as i32);
        Supervisor {
            opts,
            config,
            generation: 0,
            last_reload: None,
            started_at: SystemTime::now(),
            start_ticks,
            workers: BTreeMap::new(),
            by_pid: HashMap::new(),
            reaper,
            tx,
            echo,
            state_file: super::state_file::StateFile::new(state_path),
            dirty: true,
            ledger: RunLedger::none(),
            unclaimed: Vec::new(),
            owner: Owner { pid: std::process::id() as i32, start_ticks: start_ticks.unwrap_or(0) },
            jobs: BTreeMap::new(),
            runs: HashMap::new(),
            session_dirs: SessionDirs::new(),
            in_flight: InFlight::default(),
            escapee_scans: Default::default(),
            cgroups_to_remove: Vec::new(),
            applied_at: SystemTime::now(),
            watch: None,
            shutting_down: false,
            stop_waiters: Vec::new(),
            status_cache: super::events::StatusCache::default(),
            timers: Timers::default(),
            memory_sample_pending: false,
            graph: Graph::default(),
            touched: BTreeSet::new(),
            removing: BTreeSet::new(),
            dependency_runs_due: BTreeSet::new(),
            stop_levels: Vec::new(),
            notify: None,
            ready: None,
            live: super::live::Live::new(),
            counters: super::metrics::Counters::default(),
            metrics: None,
            control_tx: None,
            containment,
            cgroup_watch,
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
        self.bind_notify();
        self.graph = Graph::of(&self.config);
        self.boot_jobs();
        self.run_dependency_jobs(None);
        let changes = plan(&self.config.workers, &BTreeMap::new());
        self.apply(changes);
        self.propagate();
        self.flush_state();
        crate::os::memory::release_free();
    }

    /// The status report cache, for the control connections to answer
    /// from.
    pub fn status_cache(&self) -> super::events::StatusCache {
        self.status_cache.clone()
    }

    /// The metrics server bound at start (a failure there refuses the
    /// start), and the channel scrapes go to.
    pub fn set_metrics(
        &mut self,
        server: Option<super::metrics::Server>,
        control: mpsc::UnboundedSender<Event>,
    ) {
        self.metrics = server;
        self.control_tx = Some(control);
    }

    /// After a reload: serves the metrics where the config now says. The
    /// new address is bound before the old one is let go, so a failure
    /// (a port in use) keeps the old one serving, and says so.
    fn rebind_metrics(&mut self) {
        let want = self.config.supervisor.metrics.clone();
        if self.metrics.as_ref().map(|m| &m.addr) == want.as_ref() {
            return;
        }
        let Some(addr) = want else {
            if let Some(old) = self.metrics.take() {
                tracing::info!(address = %old.addr, "metrics no longer served");
                old.close();
            }
            return;
        };
        let tx = self.control_tx.clone().unwrap_or_else(|| self.tx.clone());
        match super::metrics::bind(&addr) {
            Ok(l) => {
                if let Some(old) = self.metrics.take() {
                    old.close();
                }
                tracing::info!(address = %addr, "metrics served");
                self.metrics = Some(super::metrics::Server::spawn(addr, l, tx));
            }
            Err(error) => match &self.metrics {
                Some(old) => tracing::error!(%error, "the metrics stay on {}", old.addr),
                None => tracing::error!(%error, "metrics are not served"),
            },
        }
    }

    /// Where to say "ready" (the `start --detach` parent) once every
    /// instance is up; systemd hears it too.
    pub fn set_ready(&mut self, ready: super::runtime::Ready) {
        self.ready = Some(ready);
    }

    /// Binds the socket instances send `READY=1` and `STATUS=` to. Without
    /// it (a state_dir path too long for a socket), `notify` probes fail
    /// with the reason and everything else runs.
    fn bind_notify(&mut self) {
        let (tx, mut rx) = mpsc::channel::<NotifyEvent>(256);
        match super::probes::notify::bind(&self.config.supervisor.state_dir, tx) {
            Ok(sock) => {
                self.notify = Some(sock);
                let events = self.tx.clone();
                tokio::spawn(async move {
                    while let Some(ev) = rx.recv().await {
                        if events.send(Event::Notify(ev)).is_err() {
                            break;
                        }
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot bind the notify socket; notify probes cannot pass"),
        }
    }

    /// Once no instance is starting (every one is ready, or failed and
    /// backs off, or waits on a dependency that failed): READY=1 to
    /// drover's own manager and "ready" to a waiting `start --detach`.
    fn maybe_announce_ready(&mut self) {
        if self.ready.is_none() {
            return;
        }
        // A waiting instance is settled unless something it may wait for
        // is still on its way: an instance starting, a dependency run.
        let starting =
            self.workers.values().any(|w| w.instances.values().any(|i| i.state == State::Starting));
        let deps_running = self.dependency_runs_active();
        if starting || deps_running {
            return;
        }
        if let Some(mut r) = self.ready.take() {
            tracing::info!(pid = std::process::id(), "ready");
            super::runtime::sd_notify("READY=1");
            r.send("ready\n");
            // Start-up is over: what it allocated and ran is not needed.
            crate::os::memory::release_free();
            crate::os::memory::release_code();
        }
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
        let mut last_flush = Instant::now().checked_sub(STATE_GAP).unwrap_or_else(Instant::now);
        loop {
            let deadline = self.timers.next();
            let due = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            // A timer already due (a restart with no backoff) fires now:
            // tokio's timer would round it up to its next millisecond tick.
            let ev = if deadline.is_some_and(|at| at <= Instant::now()) {
                None
            } else {
                tokio::select! {
                    biased;
                    Some(ev) = control.recv() => Some(ev),
                    Some(ev) = events.recv() => Some(ev),
                    _ = due => None,
                    else => break,
                }
            };
            match ev {
                Some(ev) => self.handle(ev),
                None => self.fire_timers(),
            }
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
            // What became due while the batch was handled (a restart with
            // no backoff) goes before the state write.
            if self.timers.next().is_some_and(|at| at <= Instant::now()) {
                self.fire_timers();
            }
            self.propagate();
            // The state file (every instance, and an fsync, on a blocking
            // thread), after what the batch set off has moved on: written
            // STATE_GAP after the last write at the soonest, once quiet (no
            // event queued, no spawn under way, which it would slow down on
            // a machine of few cores). A storm that never goes quiet waits
            // twice as long.
            if self.dirty {
                let since = last_flush.elapsed();
                let quiet = events.is_empty() && self.in_flight.is_empty();
                if since >= STATE_GAP && (quiet || since >= STATE_GAP.saturating_mul(2)) {
                    self.flush_state();
                    last_flush = Instant::now();
                } else {
                    // Nothing else may come to wake the loop in time.
                    let wait = if since < STATE_GAP { STATE_GAP } else { STATE_GAP.saturating_mul(2) };
                    let at = last_flush.checked_add(wait).unwrap_or_else(instances::far_future);
                    self.timers.set(TimerKey::StateFile, at);
                }
            }
            self.ledger.check_wal();
            if self.shutting_down && self.all_stopped() {
                break;
            }
        }
        self.finish_shutdown();
        // Followers get their last line before the process ends, unless
        // one takes longer than a moment to take it.
        let _ = tokio::time::timeout(END_OF_STREAMS, self.end_live()).await;
    }

    fn handle(&mut self, ev: Event) {
        // Any other event may change what status reports.
        if !matches!(&ev, Event::Control(Request::Status { name: None, .. }, _) | Event::Metrics(_)) {
            self.status_cache.clear();
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
            Event::Probe { worker, index, incarnation, role, verdict } => {
                self.on_probe(&worker, index, incarnation, role, verdict)
            }
            Event::Notify(ev) => self.on_notify(ev),
            Event::RunOutputClosed { run, inc, step } => self.on_run_output_closed(run, inc, step),
            Event::InstanceSpawned { worker, index, incarnation, worktree, result } => {
                self.on_instance_spawned(&worker, index, incarnation, worktree, result)
            }
            Event::RunSpawned { run, inc, step, result } => self.on_run_spawned(run, inc, step, result),
            Event::Control(req, reply) => self.on_request(req, reply),
            Event::Metrics(reply) => {
                let snapshot =
                    super::metrics::Snapshot { report: self.full_report(), counters: self.counters.clone() };
                let _ = reply.send(snapshot);
            }
            Event::CgroupEmpty(dir) => self.on_cgroup_empty(&dir),
            Event::MemorySampled(samples) => self.on_memory_sampled(samples),
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

    /// Ends every event stream (see `Live::end`); the future resolves
    /// once each follower has its last line.
    fn end_live(&mut self) -> impl std::future::Future<Output = ()> + use<> {
        std::mem::take(&mut self.live).end("the supervisor stopped")
    }

    /// Arms (or re-arms) `key` to fire `after` from now.
    pub(super) fn set_timer(&mut self, key: TimerKey, after: Duration) {
        let now = Instant::now();
        self.timers.set(key, now.checked_add(after).unwrap_or(now));
    }

    /// Every timer that is due.
    fn fire_timers(&mut self) {
        self.status_cache.clear();
        let now = Instant::now();
        while let Some(key) = self.timers.pop_due(now) {
            match key {
                TimerKey::Instance(name, index, kind) => self.on_instance_timer(&name, index, kind),
                TimerKey::JobTick(job) => self.on_job_tick(&job),
                TimerKey::Run(run, kind) => self.on_run_timer(run, kind),
                TimerKey::LedgerRetry => self.on_ledger_retry(),
                TimerKey::MemorySample => self.on_memory_timer(),
                // The loop writes it, after the timers.
                TimerKey::StateFile => {}
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

    fn on_exit(&mut self, pid: i32, exit: Exit) {
        match self.by_pid.remove(&pid) {
            Some(Proc::Instance(name, index)) => self.on_exit_of_instance(&name, index, pid, exit),
            Some(Proc::Run(id)) => self.on_run_exit(id, exit),
            // A child whose spawn the actor has not heard of yet.
            None => self.in_flight.unowned_exit(pid, exit),
        }
    }

    // ----- config changes -----

    /// On a reload: binds again the sockets that could not be bound, and
    /// gives a worker whose sockets are all bound now a fresh start.
    fn retry_sockets(&mut self) {
        let failed: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.sockets.error().is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for name in failed {
            let Some(w) = self.workers.get_mut(&name) else { continue };
            if !w.sockets.sync(&w.spec.sockets) {
                continue;
            }
            tracing::info!(worker = %name, "its sockets are bound now");
            let idle: Vec<u32> = w
                .instances
                .iter()
                .filter(|(_, i)| matches!(i.state, State::Backoff { .. } | State::Parked { .. }))
                .map(|(k, _)| *k)
                .collect();
            for i in idle {
                self.drive(&name, i, Input::Start(Why::Wanted));
            }
        }
    }

    fn apply(&mut self, changes: Vec<Change>) {
        for change in changes {
            let name = change.worker().to_string();
            let spec = self.config.workers.get(&name).cloned();
            match (change, spec) {
                (Change::Stop { .. }, _) | (_, None) => {
                    let Some(w) = self.workers.get_mut(&name) else { continue };
                    w.removed = true;
                    if w.instances.is_empty() {
                        self.workers.remove(&name);
                    }
                    self.removing.insert(name.clone());
                }
                (change, Some(spec)) => {
                    self.removing.remove(&name);
                    let Some(w) = self.workers.get_mut(&name) else {
                        let sink = self.sink_for(&name);
                        self.workers.insert(name.clone(), WorkerRt::new(spec, sink));
                        self.scale(&name);
                        continue;
                    };
                    // Changed, or added back while its instances were
                    // still being retired: those finish retiring and their
                    // slots start afresh (see `Effect::Retire`).
                    w.sink.set_secrets(secret_values(&spec.env, &spec.secret_env));
                    if w.spec.sockets != spec.sockets && !w.sockets.sync(&spec.sockets) {
                        tracing::warn!(worker = %name, error = w.sockets.error().unwrap_or_default(), "socket not bound");
                    }
                    w.spec = spec;
                    w.removed = false;
                    let restart = !matches!(change, Change::Update { .. });
                    for inst in w.instances.values_mut() {
                        // A parked instance gets a fresh start from any change.
                        inst.stale |= restart || matches!(inst.state, State::Parked { .. });
                        w.rolling |= inst.stale;
                    }
                    self.scale(&name);
                    self.continue_rollout(&name);
                }
            }
        }
        self.retire_removed();
    }

    /// Retires removed workers in dependency order: one that another
    /// removed worker depends on goes after it.
    pub(super) fn retire_removed(&mut self) {
        if self.removing.is_empty() {
            return;
        }
        let old = Graph::from_edges(
            self.workers
                .iter()
                .map(|(n, w)| {
                    let deps = w.spec.depends_on.iter().map(|(d, c)| (Node::Worker(d.clone()), *c)).collect();
                    (Node::Worker(n.clone()), deps)
                })
                .collect(),
        );
        let removed: std::collections::BTreeSet<Node> =
            self.removing.iter().map(|n| Node::Worker(n.clone())).collect();
        // The first level whose workers still have processes is the one
        // being stopped; the levels after it wait.
        for level in old.removal_levels(&removed) {
            let names: Vec<String> = level.iter().map(|n| node_name(n).to_string()).collect();
            for n in &names {
                self.drive_all(n, |_| Some(Input::Stop(Then::Retire)));
            }
            if names.iter().any(|n| self.workers.contains_key(n)) {
                return;
            }
        }
        self.removing.retain(|n| self.workers.contains_key(n));
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
                // A reload looks for every program in PATH again.
                super::child::lookups().forget();
                self.counters.reloads_applied = self.counters.reloads_applied.saturating_add(1);
                self.last_reload = Some(ReloadStatus { at, ok: true, error: None });
                self.dirty = true;
                if loaded.config == self.config {
                    return Response::Ok { message: format!("no change (generation {})", self.generation) };
                }
                if loaded.config.supervisor.containment != self.config.supervisor.containment {
                    tracing::warn!(
                        in_use = self.containment.name(),
                        "supervisor.containment changed: it takes effect at the next start"
                    );
                }
                let changes = plan(&loaded.config.workers, &self.actual());
                let old_jobs = std::mem::take(&mut self.config.jobs);
                let old_dependencies = self.graph.jobs_to_run_at_start();
                self.config = loaded.config;
                let jobs = &self.config.jobs;
                self.counters.retain_jobs(|j| jobs.contains_key(j));
                self.graph = Graph::of(&self.config);
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
                let summary = changes.iter().map(change_line).collect();
                self.apply_jobs();
                self.run_dependency_jobs(Some((&old_jobs, &old_dependencies)));
                self.apply(changes);
                self.retry_sockets();
                self.rebind_metrics();
                self.release_waiting();
                self.arm_memory_sampling();
                if let Some(w) = &self.watch {
                    let new = WatchSettings::of(&self.config);
                    w.send_if_modified(|cur| std::mem::replace(cur, new.clone()) != new);
                }
                crate::os::memory::release_free();
                crate::os::memory::release_code();
                self.live
                    .emit(super::live::What::ReloadApplied { generation: self.generation, changes: summary });
                Response::Ok { message: format!("applied generation {}", self.generation) }
            }
            Err(diags) => {
                let error = diags.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n");
                tracing::error!(%error, "reload failed; the last good config stays in force");
                self.counters.reloads_failed = self.counters.reloads_failed.saturating_add(1);
                self.last_reload = Some(ReloadStatus { at, ok: false, error: Some(error.clone()) });
                self.live.emit(super::live::What::ReloadFailed { error: error.clone() });
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
            Request::Status { name: None, .. } => {
                let _ = reply.send(Reply::Status(self.full_report()));
                return;
            }
            // The full status (no name) is answered from the cache above.
            Request::Status { name: Some(n), .. } => {
                if self.workers.contains_key(&n) {
                    let mut r = self.report(if self.shutting_down { "stopping" } else { "running" }, true);
                    r.workers.retain(|w| w.name == n);
                    let _ = reply.send(Reply::Status(Arc::new(r)));
                    return;
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
            Request::Events { names, follow } => {
                let unknown: Vec<&str> = names
                    .iter()
                    .filter(|n| !self.workers.contains_key(*n) && !self.jobs.contains_key(*n))
                    .map(String::as_str)
                    .collect();
                if !unknown.is_empty() {
                    Response::Error { message: format!("no worker or job named {}", unknown.join(", ")) }
                } else {
                    match self.live.subscribe(names, follow) {
                        Ok(sub) => {
                            let _ = reply.send(Reply::Events(sub));
                            return;
                        }
                        Err(message) => Response::Error { message },
                    }
                }
            }
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
        let Some(w) = self.workers.get(name) else {
            return Response::Error { message: format!("no worker named {name:?}") };
        };
        let parked: Vec<u32> = w
            .instances
            .iter()
            .filter(|(_, i)| matches!(i.state, State::Parked { .. }))
            .map(|(k, _)| *k)
            .collect();
        let n = parked.len();
        for i in parked {
            self.drive(name, i, Input::Start(Why::Release));
        }
        Response::Ok { message: format!("unparked {n} instance{} of {name}", if n == 1 { "" } else { "s" }) }
    }

    // ----- shutdown -----

    fn shutdown(&mut self) {
        if self.shutting_down {
            // Asked twice: do not wait out the grace.
            tracing::warn!("second stop request: killing every process group now");
            if let Some(h) = &self.containment.cgroups {
                let _ = h.kill_all();
            }
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
        self.timers.cancel_where(|k| matches!(k, TimerKey::Instance(_, _, TimerKind::Restart)));
        // Dependents first, each level in parallel; workers being removed
        // (outside the graph) with the first.
        let mut levels: Vec<Vec<String>> = self
            .graph
            .stop_levels()
            .into_iter()
            .map(|l| {
                l.iter()
                    .filter_map(|n| match n {
                        Node::Worker(w) if self.workers.contains_key(w) => Some(w.clone()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            })
            .filter(|l| !l.is_empty())
            .collect();
        let outside: Vec<String> =
            self.workers.keys().filter(|n| !levels.iter().any(|l| l.contains(n))).cloned().collect();
        match levels.first_mut() {
            Some(first) => first.extend(outside),
            None => levels.push(outside),
        }
        levels.reverse();
        self.stop_levels = levels;
        self.stop_all_runs();
        self.advance_shutdown();
    }

    /// Stops the next level of workers once the one before is down.
    fn advance_shutdown(&mut self) {
        if !self.shutting_down {
            return;
        }
        while let Some(level) = self.stop_levels.last().cloned() {
            for n in &level {
                self.drive_all(n, |_| Some(Input::Stop(Then::Stop)));
            }
            let down = level.iter().all(|n| {
                self.workers.get(n).is_none_or(|w| w.instances.values().all(|i| !i.has_processes()))
            });
            if !down {
                return;
            }
            self.stop_levels.pop();
        }
    }

    fn all_stopped(&self) -> bool {
        self.runs.is_empty()
            && self.in_flight.is_empty()
            && self.stop_levels.is_empty()
            && self.workers.values().all(|w| w.instances.values().all(|i| !i.has_processes()))
    }

    fn finish_shutdown(&mut self) {
        // What a control connection answers from now on is that drover is
        // going, not the last report of its stop.
        self.status_cache.clear();
        self.kill_escapees(None);
        // Every instance and run is over: nothing is left in a cgroup
        // but what a bug missed (the caller removes them).
        if let Some(h) = &self.containment.cgroups {
            let _ = h.kill_all();
        }
        self.ledger.flush_before_exit();
        for w in self.workers.values() {
            for inst in w.instances.values() {
                if let Some(wt) = &inst.worktree {
                    worktree::remove(&self.reaper, &w.spec.dir, wt);
                }
            }
        }
        let report = self.report("stopped", false);
        self.state_file.write_last(&report);
        let _ = std::fs::remove_file(self.config.supervisor.state_dir.join("drover.sock"));
        if let Some(m) = self.metrics.take() {
            m.close();
        }
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
                pid_start_ticks: self.start_ticks,
                config: Some(self.opts.config_path.clone()),
                started_at: Some(rfc3339(self.started_at)),
                generation: self.generation,
                applied_at: Some(rfc3339(self.applied_at)),
                last_reload: self.last_reload.clone(),
                containment: Some(self.containment.name().into()),
                cgroup: self.containment.cgroups.as_ref().map(|h| h.base.clone()),
            },
            workers: self
                .workers
                .iter()
                .map(|(name, w)| WorkerStatus {
                    name: name.clone(),
                    capacity: w.spec.capacity,
                    state: worker_state(w),
                    rollout: rollout_status(w),
                    sockets: socket_status(w),
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

    /// The full status report, shared by every `status` and scrape until
    /// the state changes.
    fn full_report(&mut self) -> Arc<StatusReport> {
        if let Some(r) = self.status_cache.get() {
            return r;
        }
        let state = if self.shutting_down { "stopping" } else { "running" };
        let r = Arc::new(self.report(state, true));
        self.status_cache.set(r.clone());
        r
    }

    fn flush_state(&mut self) {
        if self.dirty {
            self.dirty = false;
            let report = self.report(if self.shutting_down { "stopping" } else { "running" }, false);
            self.state_file.write_soon(report);
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
/// A duration in whole milliseconds, for the log.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A change of a reload as an event shows it: "restart web".
fn change_line(c: &Change) -> String {
    let verb = match c {
        Change::Start { .. } => "start",
        Change::Stop { .. } => "stop",
        Change::Restart { .. } => "restart",
        Change::Update { .. } => "update",
    };
    format!("{verb} {}", c.worker())
}

fn socket_status(w: &WorkerRt) -> Vec<SocketStatus> {
    let error = w.sockets.error();
    w.sockets
        .report(&w.spec.sockets)
        .into_iter()
        .map(|(address, name, bound)| SocketStatus {
            error: error.filter(|e| !bound && e.contains(&address)).map(str::to_string),
            address,
            name,
            bound,
        })
        .collect()
}

fn instance_status(index: u32, inst: &Instance) -> InstanceStatus {
    let error = match &inst.state {
        State::Parked { reason } => Some(match &inst.error {
            Some(e) => format!("{reason}; last error: {e}"),
            None => reason.clone(),
        }),
        _ => inst.error.clone(),
    };
    InstanceStatus {
        // A surge instance shows as the slot it replaces.
        index: inst.surge_for.unwrap_or(index),
        surge: inst.surge_for.is_some(),
        pid: inst.pid,
        pgid: inst.pgid,
        start_ticks: inst.start_ticks,
        state: inst.state.name().into(),
        restarts: inst.counters.restarts,
        deploys: inst.deploys,
        held: inst.held,
        started_at: inst.started_at.as_ref().map(|s| s.text.clone()),
        last_exit: inst.last_exit.clone(),
        error,
        next_start_at: match inst.state {
            State::Backoff { until } => Some(rfc3339(until)),
            _ => None,
        },
        kill_at: match inst.state {
            State::Stopping { .. } if !inst.kill_sent => inst.kill_at.map(rfc3339),
            _ => None,
        },
        waiting_for: match &inst.state {
            State::Waiting { on } => on.clone(),
            _ => Vec::new(),
        },
        notify_status: inst.notify_status.clone(),
        cgroup: inst.cgroup.clone(),
        cpu_seconds: None,
        rss_bytes: None,
    }
}

/// One word for a worker: the state all its instances share, else the
/// one that most needs attention.
fn worker_state(w: &WorkerRt) -> String {
    let names: Vec<&str> = w.instances.values().map(|i| i.state.name()).collect();
    if w.removed {
        return "stopping".into();
    }
    for s in ["parked", "backoff", "stopping", "starting", "waiting"] {
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

/// What status says of a worker's rollout, when one is under way.
fn rollout_status(w: &WorkerRt) -> Option<String> {
    match &w.rollout {
        Progress::Done => None,
        Progress::Waiting(i) => Some(format!("replacing instance {i}")),
        Progress::Stalled(i, why) => Some(format!(
            "stalled: the replacement of instance {i} is not ready ({why}); the others keep running"
        )),
    }
}
