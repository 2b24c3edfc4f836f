//! One worker instance as a state machine. [`step`] is the whole of its
//! lifecycle: it takes what happened ([`Input`]) and says what to do
//! ([`Effect`]); the actor carries the effects out and feeds their results
//! back as inputs. Nothing here touches a process, a clock or a timer, so
//! every transition is tested without them.
//!
//! What happens when an instance exits: the `Exited` arm of [`step`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::model::Worker;
use crate::os::reaper::Exit;
use crate::supervisor::clock::{Stamp, later};
use crate::supervisor::policy::{AfterExit, Counters, after_exit, after_resource_shortage};
use crate::supervisor::probes::{Role, Verdict};

/// Where an instance is in its life.
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    /// Not running, and not meant to until asked.
    Stopped,
    /// Meant to run, but a dependency is not met: `on` names each one as
    /// "db (ready)".
    Waiting { on: Vec<String> },
    /// Spawned (or being spawned), not yet ready.
    Starting,
    /// Up, and ready (at once without a ready probe).
    Ready,
    /// Asked to stop, or its leader exited with others left in its group:
    /// waiting for the group to be empty, then `then`.
    Stopping { then: Then },
    /// A restart is due at `until`.
    Backoff { until: SystemTime },
    /// No more restarts until unparked or changed.
    Parked { reason: String },
}

impl State {
    /// The word status shows.
    pub fn name(&self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Waiting { .. } => "waiting",
            State::Starting => "starting",
            State::Ready => "running",
            State::Stopping { .. } => "stopping",
            State::Backoff { .. } => "backoff",
            State::Parked { .. } => "parked",
        }
    }
}

/// What follows once a stopping instance's group is empty.
#[derive(Clone, Debug, PartialEq)]
pub enum Then {
    /// Apply the restart policy to this end: the leader's exit, or `None`
    /// for a start that failed (`error` says how).
    Policy { exit: Option<Exit>, uptime: Duration },
    /// Leave it stopped.
    Stop,
    /// Start it again at once with fresh counters (a rollout).
    Start,
    /// Remove the instance (capacity down, worker removed).
    Retire,
}

/// Why an instance is asked to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// The config wants it (boot, capacity up) or a dependency came up.
    Wanted,
    /// A config change or `drover restart`: a deploy, counted apart from
    /// crash restarts, with a fresh crash-loop count.
    Deploy,
    /// `drover start` or `unpark`: releases a hold, fresh crash-loop count.
    Release,
}

/// The timers an instance sets; at most one of each kind is armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerKind {
    /// A restart after backoff is due.
    Restart,
    /// The stop grace is over: SIGKILL the group.
    Kill,
    /// Look again whether a killed group is empty (for the rare group
    /// whose last process drover does not reap).
    Recheck,
}

/// How long after a SIGKILL the group is looked at again.
pub const RECHECK: Duration = Duration::from_millis(100);

/// What happened to an instance.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    Start(Why),
    /// `drover stop NAME:I`: stop and stay stopped until released.
    Hold,
    Stop(Then),
    /// The process was spawned; `pid` leads its own process group.
    Spawned {
        pid: i32,
        start_ticks: Option<u64>,
        /// Its cgroup, in cgroup mode.
        cgroup: Option<PathBuf>,
    },
    /// It could not be spawned; `short` when for want of drover's own
    /// resources (never a step toward parking).
    SpawnFailed {
        error: String,
        short: bool,
    },
    /// The leader exited; `group_alive` when others remain in its group.
    Exited {
        exit: Exit,
        group_alive: bool,
    },
    /// The group of a stopping instance whose leader is gone is empty.
    GroupEmpty,
    /// A timer of this instance fired; `group_alive` is the group's state then.
    Timer {
        kind: TimerKind,
        group_alive: bool,
    },
    /// A probe of the current incarnation came to a verdict.
    Probe(Role, Verdict),
    /// The resident memory of the current incarnation's group, sampled
    /// (only for a worker with `max_memory`).
    Memory {
        rss_bytes: u64,
    },
    /// The kernel killed a process of it for its cgroup's memory.max
    /// (`max_memory` with the memory controller); told before its exit.
    OutOfMemory,
    /// A probe could not run at all (a `${NAME}` it lacks, a bad pattern).
    ProbeFailed(String),
    /// The dependencies changed while waiting: `on` is what is still unmet.
    Blocked {
        on: Vec<String>,
    },
}

/// What the actor is to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Spawn the process (report `Spawned` or `SpawnFailed`).
    Spawn,
    /// Send the stop signal (and SIGCONT) to the group.
    SignalStop,
    /// SIGKILL the group.
    KillGroup,
    SetTimer(TimerKind, Duration),
    CancelTimer(TimerKind),
    StartProbe(Role),
    /// Drop the running probe, if any.
    StopProbe,
    /// The group (and cgroup) is empty: kill what escaped the group,
    /// forget it, remove the cgroup.
    Cleanup {
        pgid: i32,
        cgroup: Option<Arc<Path>>,
    },
    /// It was parked (for the log).
    Parked(String),
    /// Remove the instance.
    Retire,
}

/// What a step may look at besides the instance.
pub struct Ctx<'a> {
    pub spec: &'a Worker,
    pub now: Instant,
    pub wall: SystemTime,
    pub shutting_down: bool,
    /// The dependencies not met now ("db (ready)"); empty when free to start.
    pub blocked: &'a [String],
}

/// One instance: its state machine and what status shows of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    pub state: State,
    pub pid: Option<i32>,
    pub pgid: Option<i32>,
    /// In cgroup mode, the cgroup its processes run in: with it, "alive"
    /// and "empty" are the cgroup's, not the process group's.
    /// Shared with the status reports that show it (a clone is no copy).
    pub cgroup: Option<Arc<Path>>,
    pub start_ticks: Option<u64>,
    pub started_at: Option<Stamp>,
    pub started: Option<Instant>,
    /// A spawn was asked for and has not been reported.
    pub spawning: bool,
    pub counters: Counters,
    pub last_exit: Option<Exit>,
    pub error: Option<String>,
    /// Stopped by hand: only `Start(Release)` starts it.
    pub held: bool,
    /// Starts caused by a config change or `drover restart`.
    pub deploys: u32,
    /// Runs with settings older than the worker's: a rollout replaces it.
    pub stale: bool,
    /// Started by a rollout and not yet ready: the rollout waits for it.
    pub replacing: bool,
    /// Bumped on every spawn: probe verdicts of an older process are stale.
    pub incarnation: u64,
    /// When the stop grace of the current stop ends.
    pub kill_at: Option<SystemTime>,
    pub kill_sent: bool,
    /// The last `STATUS=` the instance sent.
    pub notify_status: Option<String>,
    /// Its git worktree, in worktree mode.
    pub worktree: Option<PathBuf>,
    /// A surge instance: the slot it replaces (or, swapped out, the slot
    /// it held). Its DROVER_INSTANCE and log label are that slot's.
    pub surge_for: Option<u32>,
}

impl Default for Instance {
    fn default() -> Self {
        Instance::new()
    }
}

impl Instance {
    pub fn new() -> Self {
        Instance {
            state: State::Stopped,
            pid: None,
            pgid: None,
            cgroup: None,
            start_ticks: None,
            started_at: None,
            started: None,
            spawning: false,
            counters: Counters::default(),
            last_exit: None,
            error: None,
            held: false,
            deploys: 0,
            stale: false,
            replacing: false,
            incarnation: 0,
            kill_at: None,
            kill_sent: false,
            notify_status: None,
            worktree: None,
            surge_for: None,
        }
    }

    /// Whether a process of this instance may still exist.
    pub fn has_processes(&self) -> bool {
        self.pid.is_some() || self.spawning || matches!(self.state, State::Stopping { .. })
    }

    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    /// Spawned, whether or not ready yet.
    pub fn is_started(&self) -> bool {
        matches!(self.state, State::Starting | State::Ready) && self.pid.is_some()
    }
}

/// The one transition function.
pub fn step(inst: &mut Instance, input: Input, ctx: &Ctx) -> Vec<Effect> {
    let mut fx = Vec::new();
    match input {
        Input::Start(why) => start(inst, why, ctx, &mut fx),
        Input::Hold => {
            inst.held = true;
            inst.replacing = false;
            stop(inst, Then::Stop, ctx, &mut fx);
        }
        Input::Stop(then) => {
            // Stopped on purpose, it is no replacement a rollout waits for.
            if then != Then::Start {
                inst.replacing = false;
            }
            stop(inst, then, ctx, &mut fx)
        }
        Input::Spawned { pid, start_ticks, cgroup } => {
            inst.spawning = false;
            inst.pid = Some(pid);
            inst.pgid = Some(pid);
            inst.cgroup = cgroup.map(Arc::from);
            inst.start_ticks = start_ticks;
            inst.started_at = Some(Stamp::of(ctx.wall));
            inst.started = Some(ctx.now);
            inst.error = None;
            inst.notify_status = None;
            match inst.state {
                // Asked to stop while it was being spawned.
                State::Stopping { .. } => signal(inst, ctx, &mut fx),
                _ if ctx.spec.ready.is_some() => {
                    inst.state = State::Starting;
                    fx.push(Effect::StartProbe(Role::Ready));
                }
                _ => became_ready(inst, ctx, &mut fx),
            }
        }
        Input::SpawnFailed { error, short } => {
            inst.spawning = false;
            inst.error = Some(error);
            inst.started_at = Some(Stamp::of(ctx.wall));
            inst.started = None;
            match &inst.state {
                State::Stopping { then } => {
                    let then = then.clone();
                    settle(inst, then, ctx, &mut fx);
                }
                _ if short => {
                    let delay = after_resource_shortage(ctx.spec, &mut inst.counters);
                    backoff(inst, delay, ctx, &mut fx);
                }
                _ => settle(inst, Then::Policy { exit: None, uptime: Duration::ZERO }, ctx, &mut fx),
            }
        }
        Input::Exited { exit, group_alive } => {
            let uptime = inst.started.map(|s| ctx.now.saturating_duration_since(s)).unwrap_or_default();
            inst.pid = None;
            inst.last_exit = Some(exit.clone());
            fx.push(Effect::StopProbe);
            let then = match &inst.state {
                State::Stopping { then } => then.clone(),
                _ => Then::Policy { exit: Some(exit), uptime },
            };
            if group_alive {
                // Its children live on in the group: stop them before the
                // exit is acted on, so a restart never doubles them.
                if !matches!(inst.state, State::Stopping { .. }) {
                    inst.state = State::Stopping { then };
                    signal(inst, ctx, &mut fx);
                }
            } else {
                settle(inst, then, ctx, &mut fx);
            }
        }
        Input::GroupEmpty => {
            if let State::Stopping { then } = &inst.state
                && inst.pid.is_none()
                && !inst.spawning
            {
                let then = then.clone();
                settle(inst, then, ctx, &mut fx);
            }
        }
        Input::Timer { kind: TimerKind::Restart, .. } => {
            if matches!(inst.state, State::Backoff { .. }) {
                spawn_or_wait(inst, ctx, &mut fx);
            }
        }
        Input::Memory { rss_bytes } => {
            let Some(max) = ctx.spec.max_memory else { return fx };
            if !matches!(inst.state, State::Starting | State::Ready) || inst.pid.is_none() {
                return fx;
            }
            if rss_bytes > max.0 {
                let why = format!("memory {} over max_memory {}", mib(rss_bytes), mib(max.0));
                failed(inst, why, ctx, &mut fx);
            }
        }
        Input::OutOfMemory => {
            if let (Some(max), State::Starting | State::Ready) = (ctx.spec.max_memory, &inst.state) {
                let why =
                    format!("killed by the kernel for memory over max_memory {} (memory.max)", mib(max.0));
                failed(inst, why, ctx, &mut fx);
            }
        }
        Input::Timer { kind, group_alive } => {
            let State::Stopping { then } = &inst.state else { return fx };
            if group_alive {
                if kind == TimerKind::Kill {
                    inst.kill_sent = true;
                    fx.push(Effect::KillGroup);
                }
                fx.push(Effect::SetTimer(TimerKind::Recheck, RECHECK));
            } else if inst.pid.is_none() && !inst.spawning {
                let then = then.clone();
                settle(inst, then, ctx, &mut fx);
            }
        }
        Input::Probe(Role::Ready, Verdict::Ready) | Input::Probe(Role::Health, Verdict::Ready) => {
            if inst.state == State::Starting {
                became_ready(inst, ctx, &mut fx);
            }
        }
        Input::Probe(_, Verdict::StartTimeout { after, last_failure }) => {
            if inst.state == State::Starting {
                let mut why = format!("not ready within {}", humantime::format_duration(after));
                if let Some(f) = last_failure {
                    why.push_str(&format!(": {f}"));
                }
                failed(inst, why, ctx, &mut fx);
            }
        }
        Input::Probe(_, Verdict::Unhealthy { reason }) => {
            if inst.state == State::Ready {
                failed(inst, format!("health check failed: {reason}"), ctx, &mut fx);
            }
        }
        Input::ProbeFailed(why) => {
            if matches!(inst.state, State::Starting | State::Ready) {
                failed(inst, why, ctx, &mut fx);
            }
        }
        Input::Blocked { on } => {
            if let State::Waiting { on: old } = &mut inst.state {
                if on.is_empty() {
                    spawn_or_wait(inst, ctx, &mut fx);
                } else {
                    *old = on;
                }
            }
        }
    }
    fx
}

fn start(inst: &mut Instance, why: Why, ctx: &Ctx, fx: &mut Vec<Effect>) {
    if why == Why::Release {
        inst.held = false;
    } else if inst.held {
        return;
    }
    let idle = matches!(
        inst.state,
        State::Stopped | State::Waiting { .. } | State::Backoff { .. } | State::Parked { .. }
    );
    match &mut inst.state {
        State::Stopping { then } if why != Why::Wanted && *then == Then::Stop => {
            // A hand stop still under way: start again once it is done.
            *then = Then::Start;
        }
        _ if idle => {
            if why != Why::Wanted || matches!(inst.state, State::Parked { .. }) {
                fresh_counters(inst);
            }
            if why == Why::Deploy {
                inst.deploys = inst.deploys.saturating_add(1);
                inst.replacing = true;
            }
            spawn_or_wait(inst, ctx, fx);
        }
        _ => {}
    }
}

/// A fresh crash-loop count; the restarts shown are kept.
fn fresh_counters(inst: &mut Instance) {
    inst.counters = Counters { restarts: inst.counters.restarts, ..Counters::default() };
}

fn spawn_or_wait(inst: &mut Instance, ctx: &Ctx, fx: &mut Vec<Effect>) {
    fx.push(Effect::CancelTimer(TimerKind::Restart));
    if ctx.shutting_down {
        inst.state = State::Stopped;
        return;
    }
    if !ctx.blocked.is_empty() {
        inst.state = State::Waiting { on: ctx.blocked.to_vec() };
        return;
    }
    inst.state = State::Starting;
    inst.spawning = true;
    inst.stale = false;
    inst.kill_sent = false;
    inst.kill_at = None;
    inst.incarnation = inst.incarnation.wrapping_add(1);
    fx.push(Effect::Spawn);
}

fn became_ready(inst: &mut Instance, ctx: &Ctx, fx: &mut Vec<Effect>) {
    inst.state = State::Ready;
    inst.replacing = false;
    if ctx.spec.health.is_some() {
        fx.push(Effect::StartProbe(Role::Health));
    }
}

/// A probe says the instance failed: stop it, then apply the policy as to
/// a failed start (it counts toward backoff and parking).
/// A size as people read it in a reason: "512 MiB", "612.4 MiB".
fn mib(bytes: u64) -> String {
    let mib = crate::config::types::ByteSize::MIB;
    if bytes % mib == 0 {
        format!("{} MiB", bytes / mib)
    } else {
        format!("{:.1} MiB", bytes as f64 / mib as f64)
    }
}

fn failed(inst: &mut Instance, why: String, ctx: &Ctx, fx: &mut Vec<Effect>) {
    inst.error = Some(why);
    // Not an exit: the policy sees a start that did not work out, whatever
    // the stop signal makes the process exit with.
    stop(inst, Then::Policy { exit: None, uptime: Duration::ZERO }, ctx, fx);
}

/// A replacement that failed stays `replacing`: the rollout holds on it.
fn stop(inst: &mut Instance, then: Then, ctx: &Ctx, fx: &mut Vec<Effect>) {
    match &mut inst.state {
        State::Starting | State::Ready => {
            fx.push(Effect::StopProbe);
            inst.state = State::Stopping { then };
            if inst.pid.is_some() {
                signal(inst, ctx, fx);
            }
        }
        // A removal is never turned back into a stop or a start.
        State::Stopping { then: old } => {
            if *old != Then::Retire {
                *old = then;
            }
        }
        State::Stopped | State::Waiting { .. } | State::Backoff { .. } | State::Parked { .. } => {
            settle(inst, then, ctx, fx)
        }
    }
}

fn signal(inst: &mut Instance, ctx: &Ctx, fx: &mut Vec<Effect>) {
    let grace = ctx.spec.stop_grace.0;
    inst.kill_at = ctx.wall.checked_add(grace);
    fx.push(Effect::SignalStop);
    fx.push(Effect::SetTimer(TimerKind::Kill, grace));
}

fn backoff(inst: &mut Instance, delay: Duration, ctx: &Ctx, fx: &mut Vec<Effect>) {
    inst.state = State::Backoff { until: later(ctx.wall, delay) };
    fx.push(Effect::SetTimer(TimerKind::Restart, delay));
}

/// No process is left: act on `then`.
fn settle(inst: &mut Instance, then: Then, ctx: &Ctx, fx: &mut Vec<Effect>) {
    fx.push(Effect::CancelTimer(TimerKind::Kill));
    fx.push(Effect::CancelTimer(TimerKind::Recheck));
    fx.push(Effect::CancelTimer(TimerKind::Restart));
    if let Some(pgid) = inst.pgid {
        fx.push(Effect::Cleanup { pgid, cgroup: inst.cgroup.take() });
    }
    inst.cgroup = None;
    inst.pid = None;
    inst.pgid = None;
    inst.start_ticks = None;
    inst.kill_at = None;
    if then == Then::Retire {
        inst.state = State::Stopped;
        fx.push(Effect::Retire);
        return;
    }
    if ctx.shutting_down {
        inst.state = State::Stopped;
        return;
    }
    match then {
        Then::Stop | Then::Retire => inst.state = State::Stopped,
        Then::Start => {
            fresh_counters(inst);
            inst.deploys = inst.deploys.saturating_add(1);
            inst.replacing = true;
            spawn_or_wait(inst, ctx, fx);
        }
        Then::Policy { exit, uptime } => {
            match after_exit(ctx.spec, &mut inst.counters, exit.as_ref(), uptime) {
                AfterExit::Restart { delay } if delay.is_zero() => spawn_or_wait(inst, ctx, fx),
                AfterExit::Restart { delay } => backoff(inst, delay, ctx, fx),
                AfterExit::Park { reason } => {
                    fx.push(Effect::Parked(reason.clone()));
                    inst.state = State::Parked { reason };
                }
                AfterExit::Stop => inst.state = State::Stopped,
            }
        }
    }
}

#[cfg(test)]
mod tests;
