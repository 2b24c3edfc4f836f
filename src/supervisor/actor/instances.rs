//! The workers' instances at work: [`Supervisor::drive`] feeds an input to
//! an instance's state machine (`workers::instance::step`) and carries out
//! the effects it returns, the only place that spawns, signals, probes or
//! sets a timer for an instance. After each event, `propagate` moves on
//! what depends on instance states: rollouts and waiting dependents.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal as NixSignal;

use super::{Event, MAX_ESCAPEE_TREE, Proc, Supervisor, TimerKey, millis};
use crate::config::model::{Condition, SpawnMode};
use crate::os::cgroup;
use crate::os::proc;
use crate::os::reaper::Exit;
use crate::supervisor::child::{self, Launch, LaunchError, Output, Started};
use crate::supervisor::containment;
use crate::supervisor::graph::Node;
use crate::supervisor::live::What;
use crate::supervisor::logs::pump_watched;
use crate::supervisor::probes::{self, Notice, NotifyEvent, ProbeContext, Role, Verdict};
use crate::supervisor::workers::instance::{self, Ctx, Effect, Input, Instance, State, Then, TimerKind, Why};
use crate::supervisor::workers::rollout::{self, Action, Progress, SURGE};
use crate::supervisor::worktree;

/// A spawned process's output pipes, handed to the pumps once the
/// instance's probes (a `log` probe watches the lines) are set up.
type Pipes = [Option<OwnedFd>; 2];

impl Supervisor {
    /// Feeds `input` to instance `name:index` and carries out what it says.
    pub(super) fn drive(&mut self, name: &str, index: u32, input: Input) {
        self.drive_saying(name, index, input, || {});
    }

    /// [`Supervisor::drive`], logging `say` once the step is taken: before
    /// its effects (which may log what follows from it), or after them
    /// when one is a spawn, whose dispatch a log line would delay (a
    /// restart with no backoff).
    fn drive_saying(&mut self, name: &str, index: u32, input: Input, say: impl FnOnce()) {
        let blocked = self.blocked_by(name);
        let shutting_down = self.shutting_down;
        let Some(w) = self.workers.get_mut(name) else { return };
        let Some(inst) = w.instances.get_mut(&index) else { return };
        let before = (inst.state.name(), inst.is_ready());
        let ctx = Ctx {
            spec: &w.spec,
            now: Instant::now(),
            wall: SystemTime::now(),
            shutting_down,
            blocked: &blocked,
        };
        let effects = instance::step(inst, input, &ctx);
        if index == SURGE || !rollout::settled(inst) {
            w.rolling = true;
        }
        if matches!(inst.state, State::Waiting { .. }) {
            w.may_wait = true;
        }
        if before != (inst.state.name(), inst.is_ready()) {
            self.touched.insert(name.to_string());
            let label = inst.surge_for.unwrap_or(index);
            if let Some(what) = changed_to(name, label, &inst.state, ctx.wall) {
                self.live.emit(what);
            }
        }
        self.dirty = true;
        let spawns = effects.iter().any(|fx| matches!(fx, Effect::Spawn));
        let mut say = Some(say);
        if !spawns && let Some(say) = say.take() {
            say();
        }
        for fx in effects {
            self.execute(name, index, fx);
        }
        if let Some(say) = say.take() {
            say();
        }
        for dir in std::mem::take(&mut self.cgroups_to_remove) {
            containment::remove_off_loop(dir);
        }
        self.scan_escapees_unless_spawning(name, index);
    }

    /// The look for an ended incarnation's escapees, unless a spawn of the
    /// instance is in flight: its child, not yet known by pid, carries the
    /// same marks. Then it waits until the spawn lands.
    fn scan_escapees_unless_spawning(&mut self, name: &str, index: u32) {
        let key = (name.to_string(), index);
        if !self.escapee_scans.contains(&key) {
            return;
        }
        let spawning = self.instance(name, index).is_some_and(|i| i.spawning);
        if !spawning {
            self.escapee_scans.remove(&key);
            self.kill_escapees(Some((name, index)));
        }
    }

    fn execute(&mut self, name: &str, index: u32, fx: Effect) {
        match fx {
            Effect::Spawn => self.spawn(name, index),
            Effect::SignalStop => {
                let Some(w) = self.workers.get(name) else { return };
                let Some(inst) = w.instances.get(&index) else { return };
                let sig = w.spec.stop_signal.to_nix();
                if let Some(pgid) = inst.pgid {
                    child::signal_stop(pgid, sig);
                }
                // The group first, then whatever left it (setsid) for a
                // session of its own: all of it is in the cgroup.
                if let Some(cg) = &inst.cgroup {
                    cgroup::signal(cg, sig);
                }
            }
            Effect::KillGroup => {
                let Some(inst) = self.instance(name, index) else { return };
                if let Some(pgid) = inst.pgid {
                    tracing::warn!(worker = name, instance = index, pgid, "stop grace over; SIGKILL");
                    child::kill(pgid);
                }
                if let Some(cg) = &inst.cgroup {
                    containment::kill_off_loop(cg);
                }
            }
            Effect::SetTimer(kind, after) => {
                let at = Instant::now().checked_add(after).unwrap_or_else(far_future);
                self.timers.set(TimerKey::Instance(name.to_string(), index, kind), at);
                if kind == TimerKind::Restart {
                    tracing::info!(
                        worker = name,
                        instance = index,
                        delay_ms = millis(after),
                        "restart after backoff"
                    );
                }
            }
            Effect::CancelTimer(kind) => {
                self.timers.cancel(&TimerKey::Instance(name.to_string(), index, kind))
            }
            Effect::StartProbe(role) => self.start_probe(name, index, role),
            Effect::StopProbe => {
                if let Some(w) = self.workers.get_mut(name) {
                    w.probes.remove(&index);
                }
            }
            Effect::Cleanup { pgid, cgroup } => {
                match cgroup {
                    // Nothing escapes a cgroup: it is empty, so is all
                    // the instance ran. Removed after a restart's spawn,
                    // which it would only delay.
                    Some(cg) => {
                        if let Some(w) = &self.cgroup_watch {
                            w.forget(&cg);
                        }
                        self.cgroups_to_remove.push(cg.to_path_buf());
                    }
                    None => {
                        self.escapee_scans.insert((name.to_string(), index));
                    }
                }
                crate::os::groups::remove(pgid);
            }
            Effect::Retire => {
                let Some(w) = self.workers.get_mut(name) else { return };
                w.probes.remove(&index);
                if let Some(wt) = w.instances.remove(&index).and_then(|i| i.worktree) {
                    worktree::remove(&self.reaper, &w.spec.dir, &wt);
                }
                if w.removed && w.instances.is_empty() {
                    self.workers.remove(name);
                } else if !w.removed && index < w.spec.capacity {
                    // Its worker came back (or grew) while it retired.
                    self.scale(name);
                }
                self.touched.insert(name.to_string());
            }
            Effect::Parked(reason) => tracing::warn!(worker = name, instance = index, %reason, "parked"),
        }
    }

    /// Removes a cgroup drover is done with (off the loop), and its watch.
    pub(in crate::supervisor) fn remove_cgroup(&self, dir: PathBuf) {
        if let Some(w) = &self.cgroup_watch {
            w.forget(&dir);
        }
        containment::remove_off_loop(dir);
    }

    pub(super) fn instance(&self, name: &str, index: u32) -> Option<&Instance> {
        self.workers.get(name).and_then(|w| w.instances.get(&index)).map(|i| &**i)
    }

    /// Starts spawning the instance's process on a spawner thread (with
    /// its git worktree, in worktree mode, made there too); the outcome
    /// comes back as [`Event::InstanceSpawned`].
    fn spawn(&mut self, name: &str, index: u32) {
        let state_dir = self.config.supervisor.state_dir.clone();
        let notify = self.notify.as_ref().map(|n| n.path().display().to_string());
        let Some(w) = self.workers.get_mut(name) else { return };
        if w.sockets.error().is_some() {
            // A socket that could not be bound is tried again at each start.
            w.sockets.sync(&w.spec.sockets);
        }
        let sockets = match w.sockets.for_launch() {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(worker = name, instance = index, %error, "start failed");
                self.drive(name, index, Input::SpawnFailed { error, short: false });
                return;
            }
        };
        let spec = &w.spec;
        let Some(inst) = w.instances.get(&index) else { return };
        let slot = inst.surge_for.unwrap_or(index);
        let mut env: Vec<(String, String)> =
            instance_env(name, slot, spec.capacity, &spec.env, &state_dir).into_iter().collect();
        let mut remove_env = vec![];
        match notify {
            Some(path) => env.push(("NOTIFY_SOCKET".into(), path)),
            // drover's own manager's socket is not the instance's.
            None => remove_env.push("NOTIFY_SOCKET"),
        }
        let mut launch = Launch {
            argv: spec.command.clone(),
            dir: spec.dir.clone(),
            env,
            clear_env: false,
            remove_env,
            identity: spec.identity.clone(),
            output: Output::Piped,
            sockets,
            cgroup: self.containment.cgroup(&format!("w.{name}.{slot}"), spec.max_memory.map(|m| m.0)),
        };
        let worktree = (spec.spawn_mode == SpawnMode::Worktree).then(|| inst.worktree.clone());
        let (reaper, tx, worker, incarnation) =
            (self.reaper.clone(), self.tx.clone(), name.to_string(), inst.incarnation);
        let done_with = std::mem::take(&mut self.cgroups_to_remove);
        self.in_flight.begin();
        // A git worktree's commands may take seconds: on a blocking thread,
        // not on one of the two spawner threads every other spawn waits for.
        let in_worktree = worktree.is_some();
        let job = move || {
            let made = match worktree {
                None => Ok(None),
                Some(Some(p)) if p.is_dir() => Ok(Some(p)),
                Some(_) => worktree::create(&reaper, &launch.dir, &state_dir, &worker, index).map(Some),
            };
            let (worktree, result) = match made {
                Err(message) => (None, Err(LaunchError { message, short: false })),
                Ok(worktree) => {
                    if let Some(p) = &worktree {
                        launch.dir = p.clone();
                    }
                    (worktree, child::start(&reaper, &launch))
                }
            };
            let _ = tx.send(Event::InstanceSpawned { worker, index, incarnation, worktree, result });
            for dir in done_with {
                containment::remove_now(&dir);
            }
        };
        if in_worktree {
            tokio::task::spawn_blocking(job);
        } else {
            super::super::spawner::run(job);
        }
    }

    /// A spawn handed to a blocking thread came back. One that no longer
    /// belongs to its instance (it cannot: an instance with a spawn in
    /// flight is kept until it lands) is killed.
    pub(super) fn on_instance_spawned(
        &mut self,
        name: &str,
        index: u32,
        incarnation: u64,
        worktree: Option<PathBuf>,
        result: Result<Started, LaunchError>,
    ) {
        self.in_flight.landed();
        let current = self
            .workers
            .get_mut(name)
            .and_then(|w| w.instances.get_mut(&index))
            .filter(|i| i.spawning && i.incarnation == incarnation);
        let Some(inst) = current else {
            if let Ok(started) = result {
                self.in_flight.discard(started.pid);
                if let Some(cg) = started.cgroup {
                    self.remove_cgroup(cg);
                }
            }
            self.scan_escapees_unless_spawning(name, index);
            return;
        };
        if worktree.is_some() {
            inst.worktree = worktree;
        }
        match result {
            Ok(started) => {
                let pid = started.pid;
                self.by_pid.insert(pid, Proc::Instance(name.to_string(), index));
                tracing::info!(worker = name, instance = index, pid, "started");
                let instance = inst.surge_for.unwrap_or(index);
                self.live.emit(What::Started { worker: name.to_string(), instance, pid });
                let (start_ticks, cgroup) = (started.start_ticks, started.cgroup);
                self.drive(name, index, Input::Spawned { pid, start_ticks, cgroup });
                self.arm_memory_sampling();
                // After the probes are set: a `log` probe watches the lines.
                self.start_pumps(name, index, [started.stdout, started.stderr]);
                if let Some(exit) = self.in_flight.take_early_exit(pid) {
                    self.by_pid.remove(&pid);
                    self.on_exit_of_instance(name, index, pid, exit);
                }
            }
            Err(e) => {
                tracing::warn!(worker = name, instance = index, error = %e.message, "start failed");
                self.drive(name, index, Input::SpawnFailed { error: e.message, short: e.short });
            }
        }
        self.scan_escapees_unless_spawning(name, index);
    }

    fn start_pumps(&self, name: &str, index: u32, pipes: Pipes) {
        let Some(w) = self.workers.get(name) else { return };
        let watch = w.probes.get(&index).and_then(|p| p.line_watch());
        // A surge instance's lines carry the slot it replaces.
        let label = w.instances.get(&index).and_then(|i| i.surge_for).unwrap_or(index);
        for (stream, pipe) in ["out", "err"].into_iter().zip(pipes) {
            if let Some(fd) = pipe
                && let Ok(rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
            {
                tokio::spawn(pump_watched(w.sink.clone(), label, stream, rx, None, watch.clone()));
            }
        }
    }

    fn start_probe(&mut self, name: &str, index: u32, role: Role) {
        let state_dir = self.config.supervisor.state_dir.clone();
        let Some(w) = self.workers.get_mut(name) else { return };
        let probe = match role {
            Role::Ready => w.spec.ready.clone(),
            Role::Health => w.spec.health.clone(),
        };
        let (Some(probe), Some(inst)) = (probe, w.instances.get(&index)) else { return };
        let ctx = ProbeContext {
            env: instance_env(
                name,
                inst.surge_for.unwrap_or(index),
                w.spec.capacity,
                &w.spec.env,
                &state_dir,
            ),
            dir: inst.worktree.clone().unwrap_or_else(|| w.spec.dir.clone()),
            reaper: self.reaper.clone(),
            identity: w.spec.identity.clone(),
        };
        let (tx, worker, incarnation) = (self.tx.clone(), name.to_string(), inst.incarnation);
        let report = move |verdict| {
            let _ = tx.send(Event::Probe { worker, index, incarnation, role, verdict });
        };
        match probes::spawn_probe(role, &probe, ctx, report) {
            Ok(handle) => {
                w.probes.insert(index, handle);
            }
            Err(e) => {
                let reason = format!("its {} probe cannot run: {e}", role_name(role));
                tracing::warn!(worker = name, instance = index, %reason);
                self.drive(name, index, Input::ProbeFailed(reason));
            }
        }
    }

    /// A verdict of a probe; one of an earlier process is ignored.
    pub(super) fn on_probe(
        &mut self,
        name: &str,
        index: u32,
        incarnation: u64,
        role: Role,
        verdict: Verdict,
    ) {
        let Some(inst) = self.instance(name, index) else { return };
        if inst.incarnation != incarnation {
            return;
        }
        match &verdict {
            Verdict::Ready => tracing::info!(worker = name, instance = index, "ready"),
            other => {
                tracing::warn!(worker = name, instance = index, verdict = ?other, "probe failed");
                let instance = inst.surge_for.unwrap_or(index);
                self.live.emit(What::Unhealthy {
                    worker: name.to_string(),
                    instance,
                    reason: other.to_string(),
                });
            }
        }
        if let Some(w) = self.workers.get_mut(name) {
            // Its task has ended with the verdict.
            w.probes.remove(&index);
        }
        self.drive(name, index, Input::Probe(role, verdict));
    }

    /// A datagram on the notify socket, from an instance's process.
    pub(super) fn on_notify(&mut self, ev: NotifyEvent) {
        let by_pid = &self.by_pid;
        let Some((name, index)) = ev.attribute(|pid| match by_pid.get(&pid) {
            Some(Proc::Instance(n, i)) => Some((n.clone(), *i)),
            _ => None,
        }) else {
            return;
        };
        let Some(w) = self.workers.get_mut(&name) else { return };
        if let Notice::Status(text) = &ev.notice
            && let Some(inst) = w.instances.get_mut(&index)
        {
            inst.notify_status = Some(text.clone());
            self.dirty = true;
        }
        if let Some(p) = w.probes.get(&index) {
            p.notice(&ev.notice);
        }
    }

    pub(super) fn on_exit_of_instance(&mut self, name: &str, index: u32, pid: i32, exit: Exit) {
        let Some(inst) = self.instance(name, index) else { return };
        let uptime = inst.started.map(|s| s.elapsed()).unwrap_or_default();
        let said = exit.clone();
        let say = move || tracing::info!(worker = %name, instance = index, pid, exit = %said, uptime_ms = millis(uptime), "exited");
        let (instance, group_alive) =
            (inst.surge_for.unwrap_or(index), containment::alive(inst.cgroup.as_deref(), inst.pgid));
        // An instance's cgroup is watched only once its leader is gone and
        // other processes remain: while the leader lives the cgroup cannot
        // be empty, and most exits leave nothing behind, so a restart
        // reads no inotify event.
        if group_alive && let (Some(watch), Some(cg)) = (&self.cgroup_watch, &inst.cgroup) {
            watch.add(cg);
        }
        // Under memory.max the kernel's OOM kill is the reason, not the
        // SIGKILL it shows as (its cgroup is this incarnation's alone).
        let oom = self.containment.memory_controller()
            && self.workers.get(name).is_some_and(|w| w.spec.max_memory.is_some())
            && inst.cgroup.as_deref().is_some_and(|d| crate::os::cgroup::oom_kills(d) > 0);
        self.live.emit(What::Exited {
            worker: name.to_string(),
            instance,
            code: exit.code,
            signal: exit.signal.clone(),
            uptime_ms: millis(uptime),
        });
        if oom {
            say();
            self.drive(name, index, Input::OutOfMemory);
            self.drive(name, index, Input::Exited { exit, group_alive });
        } else {
            self.drive_saying(name, index, Input::Exited { exit, group_alive }, say);
        }
    }

    pub(super) fn on_instance_timer(&mut self, name: &str, index: u32, kind: TimerKind) {
        let Some(inst) = self.instance(name, index) else { return };
        let group_alive = containment::alive(inst.cgroup.as_deref(), inst.pgid);
        self.drive(name, index, Input::Timer { kind, group_alive });
    }

    /// The watch says cgroup `dir` is empty: the instance or run step it
    /// held may be over.
    pub(super) fn on_cgroup_empty(&mut self, dir: &std::path::Path) {
        // Compared as bytes (each made by the same join): Path's `==`
        // parses both into components, a millisecond over 1000 instances.
        let is = |c: Option<&std::path::Path>| c.is_some_and(|c| c.as_os_str() == dir.as_os_str());
        let owner = self.workers.iter().find_map(|(n, w)| {
            w.instances.iter().find(|(_, i)| is(i.cgroup.as_deref())).map(|(i, _)| (n.clone(), *i))
        });
        if let Some((name, index)) = owner {
            // While its leader is not reaped, the exit is still to come
            // and settles it then: the inotify event usually beats the
            // reaper, and a drive now would only make the state dirty
            // (a state write in the restart's way).
            if self.instance(&name, index).is_some_and(|i| i.pid.is_none()) {
                self.drive(&name, index, Input::GroupEmpty);
            }
            return;
        }
        let run = self.runs.values().find(|r| is(r.cgroup.as_deref())).map(|r| r.id);
        if let Some(id) = run {
            self.try_end_step(id);
        }
    }

    /// After a stray was reaped: instances whose leader is gone and whose
    /// group may now be empty.
    pub(super) fn recheck_groups(&mut self) {
        let done: Vec<(String, u32)> = self
            .workers
            .iter()
            .flat_map(|(n, w)| w.instances.iter().map(move |(i, inst)| (n, *i, inst)))
            .filter(|(_, _, inst)| {
                inst.pid.is_none()
                    && matches!(inst.state, State::Stopping { .. })
                    && !containment::alive(inst.cgroup.as_deref(), inst.pgid)
            })
            .map(|(n, i, _)| (n.clone(), i))
            .collect();
        for (n, i) in done {
            self.drive(&n, i, Input::GroupEmpty);
        }
        self.recheck_run_groups();
    }

    /// Asks every instance of `name` something, in index order.
    pub(super) fn drive_all(&mut self, name: &str, input: impl Fn(u32) -> Option<Input>) {
        let Some(w) = self.workers.get(name) else { return };
        let idx: Vec<u32> = w.instances.keys().copied().collect();
        for i in idx {
            if let Some(inp) = input(i) {
                self.drive(name, i, inp);
            }
        }
    }

    /// Starts missing indices below capacity; retires those above it, from the top.
    pub(super) fn scale(&mut self, name: &str) {
        let Some(w) = self.workers.get_mut(name) else { return };
        let cap = w.spec.capacity;
        let above: Vec<u32> = w.instances.keys().copied().filter(|&i| i >= cap && i != SURGE).rev().collect();
        let missing: Vec<u32> = (0..cap).filter(|i| !w.instances.contains_key(i)).collect();
        for &i in &missing {
            w.instances.insert(i, Box::new(Instance::new()));
        }
        for i in above {
            self.drive(name, i, Input::Stop(Then::Retire));
        }
        for i in missing {
            self.drive(name, i, Input::Start(Why::Wanted));
        }
    }

    /// Moves a rolling restart on: see `workers::rollout`.
    pub(super) fn continue_rollout(&mut self, name: &str) {
        let Some(w) = self.workers.get_mut(name) else { return };
        if w.removed || self.shutting_down || !w.rolling {
            return;
        }
        let (actions, progress) = rollout::next(&w.instances, !w.spec.sockets.is_empty());
        w.rolling = !(actions.is_empty() && progress == Progress::Done);
        if let Progress::Stalled(i, why) = &progress
            && w.rollout != progress
        {
            tracing::warn!(worker = name, instance = i, reason = %why, "rollout stalled: the replacement is not ready");
        }
        w.rollout = progress;
        for a in actions {
            match a {
                Action::Deploy(i) => self.drive(name, i, Input::Start(Why::Deploy)),
                Action::Replace(i) => self.drive(name, i, Input::Stop(Then::Start)),
                Action::Surge(k) => self.start_surge(name, k),
                Action::Promote(k) => self.promote_surge(name, k),
                Action::DropSurge => self.drive(name, SURGE, Input::Stop(Then::Retire)),
            }
        }
    }

    /// Starts the replacement of slot `k` beside it, under [`SURGE`].
    fn start_surge(&mut self, name: &str, k: u32) {
        let Some(w) = self.workers.get_mut(name) else { return };
        let Some(old) = w.instances.get(&k) else { return };
        // What status counts carries over to the slot's next instance.
        let mut surge = Instance { surge_for: Some(k), deploys: old.deploys, ..Instance::new() };
        surge.counters.restarts = old.counters.restarts;
        w.instances.insert(SURGE, Box::new(surge));
        tracing::info!(worker = name, instance = k, "starting its replacement beside it");
        self.drive(name, SURGE, Input::Start(Why::Deploy));
    }

    /// The surge instance is ready: it becomes slot `k`, and the old one,
    /// now under [`SURGE`], is retired.
    fn promote_surge(&mut self, name: &str, k: u32) {
        let Some(w) = self.workers.get_mut(name) else { return };
        let (Some(mut new), Some(mut old)) = (w.instances.remove(&SURGE), w.instances.remove(&k)) else {
            return;
        };
        new.surge_for = None;
        old.surge_for = Some(k);
        for (inst, key) in [(&new, k), (&old, SURGE)] {
            if let Some(pid) = inst.pid {
                self.by_pid.insert(pid, Proc::Instance(name.to_string(), key));
            }
        }
        // Probes report under the key they started with: the new one's
        // health probe starts again under its new key.
        w.probes.remove(&SURGE);
        w.probes.remove(&k);
        w.instances.insert(k, new);
        w.instances.insert(SURGE, old);
        let health = w.spec.health.is_some();
        tracing::info!(worker = name, instance = k, "replacement ready; stopping the old instance");
        if health {
            self.start_probe(name, k, Role::Health);
        }
        self.touched.insert(name.to_string());
        self.drive(name, SURGE, Input::Stop(Then::Retire));
    }

    /// Carries on after the instances of `touched` workers changed state:
    /// their rollouts, and whatever waits on them.
    pub(super) fn propagate(&mut self) {
        if !self.touched.is_empty() {
            // A status report taken in this batch, before the rollouts and
            // dependents moved on, is out of date: with nothing else to
            // come (an idle supervisor) it would be served on and on.
            self.status_cache.clear();
        }
        while !self.touched.is_empty() {
            let touched = std::mem::take(&mut self.touched);
            for name in &touched {
                self.continue_rollout(name);
            }
            self.release_waiting();
            self.start_due_dependency_runs();
            self.retire_removed();
            self.advance_shutdown();
        }
        self.maybe_announce_ready();
    }

    /// Tells each waiting instance what it still waits for; those with
    /// nothing left start.
    pub(super) fn release_waiting(&mut self) {
        let mut waiting = Vec::new();
        for (name, w) in self.workers.iter_mut().filter(|(_, w)| w.may_wait) {
            w.may_wait = w.instances.values().any(|i| matches!(i.state, State::Waiting { .. }));
            if w.may_wait {
                waiting.push(name.clone());
            }
        }
        for name in waiting {
            let on = self.blocked_by(&name);
            self.drive_all(&name, |_| Some(Input::Blocked { on: on.clone() }));
        }
    }

    /// The dependencies of worker `name` not met now, as "db (ready)".
    pub(super) fn blocked_by(&self, name: &str) -> Vec<String> {
        let Some(w) = self.workers.get(name) else { return Vec::new() };
        if w.removed {
            // Gone from the graph, so nothing would block it: an instance
            // not yet retired (its dependents go first) must not start.
            return vec!["its removal".into()];
        }
        if w.spec.depends_on.is_empty() {
            return Vec::new();
        }
        self.graph
            .blocked_by(&Node::Worker(name.to_string()), |node, cond| self.met(node, cond))
            .into_iter()
            .map(|(node, cond)| format!("{} ({})", node_name(&node), cond.name()))
            .collect()
    }

    /// Whether `node` meets `cond` now.
    pub(in crate::supervisor) fn met(&self, node: &Node, cond: Condition) -> bool {
        match node {
            Node::Worker(n) => self.worker_meets(n, cond),
            Node::Job(j) => self.job_meets(j, cond),
        }
    }

    /// `started`: every instance spawned; `ready`: every instance ready. A
    /// worker being removed meets nothing.
    pub(super) fn worker_meets(&self, name: &str, cond: Condition) -> bool {
        let Some(w) = self.workers.get(name).filter(|w| !w.removed) else { return false };
        let insts = w
            .instances
            .values()
            .filter(|i| i.surge_for.is_none() && !matches!(i.state, State::Stopping { then: Then::Retire }));
        let mut insts = insts.peekable();
        if insts.peek().is_none() {
            return w.spec.capacity == 0;
        }
        match cond {
            Condition::Ready => insts.all(|i| i.is_ready()),
            _ => insts.all(|i| i.is_started() || i.is_ready()),
        }
    }

    /// Kills what drover adopted from an instance: processes that left its
    /// group (`setsid`) and were re-parented to drover when their parent
    /// died, with everything they started (whatever its environment or
    /// session). They are found by the worker and instance in their
    /// environment; with `None`, every child drover does not track goes.
    pub(super) fn kill_escapees(&self, of: Option<(&str, u32)>) {
        // An instance's escapees were adopted; at the end, every child goes.
        let children = if of.is_some() { proc::adopted_children() } else { proc::own_children() };
        for pid in children {
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
}

/// The variables drover gives an instance, over the worker's `env`; its
/// probes expand `${NAME}` from the same.
fn instance_env(
    name: &str,
    index: u32,
    capacity: u32,
    env: &BTreeMap<String, String>,
    state_dir: &std::path::Path,
) -> BTreeMap<String, String> {
    let mut all = env.clone();
    all.insert("DROVER_WORKER".into(), name.into());
    all.insert("DROVER_INSTANCE".into(), index.to_string());
    all.insert("DROVER_CAPACITY".into(), capacity.to_string());
    all.insert("DROVER_STATE_DIR".into(), state_dir.display().to_string());
    all
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Ready => "ready",
        Role::Health => "health",
    }
}

pub(super) fn node_name(node: &Node) -> &str {
    match node {
        Node::Worker(n) | Node::Job(n) => n,
    }
}

/// A deadline past any real one, for an arithmetic overflow.
pub(super) fn far_future() -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(86_400 * 365)).unwrap_or(now)
}

/// The event for an instance that has just moved to `state`, if it is one
/// `drover events` shows (starting is told by `started`, with its pid).
fn changed_to(worker: &str, instance: u32, state: &State, now: SystemTime) -> Option<What> {
    let worker = worker.to_string();
    Some(match state {
        State::Ready => What::Ready { worker, instance },
        State::Backoff { until } => What::Backoff {
            worker,
            instance,
            delay_ms: millis(until.duration_since(now).unwrap_or_default()),
        },
        State::Parked { reason } => What::Parked { worker, instance, reason: reason.clone() },
        State::Stopped => What::Stopped { worker, instance },
        State::Waiting { .. } | State::Starting | State::Stopping { .. } => return None,
    })
}
