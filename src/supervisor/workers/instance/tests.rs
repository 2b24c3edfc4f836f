use super::*;
use crate::config::model::{Probe, ProbeKind, RestartPolicy, Settings, SpawnMode};
use proptest::prelude::*;

const SEC: Duration = Duration::from_secs(1);
/// The default stop grace.
const GRACE: Duration = Duration::from_secs(30);

fn spec() -> Worker {
    Worker::new(vec!["x".into()], "/".into(), 1, SpawnMode::SameDir, Settings::default())
}

fn probe() -> Probe {
    Probe {
        kind: ProbeKind::Tcp("127.0.0.1:1".into()),
        interval: SEC,
        timeout: SEC,
        start_timeout: 60 * SEC,
        failures: 3,
    }
}

fn probed() -> Worker {
    let mut w = spec();
    w.ready = Some(probe());
    w.health = Some(probe());
    w
}

struct World {
    spec: Worker,
    now: Instant,
    wall: SystemTime,
    shutting_down: bool,
    blocked: Vec<String>,
}

impl World {
    fn new(spec: Worker) -> Self {
        World { spec, now: Instant::now(), wall: SystemTime::now(), shutting_down: false, blocked: vec![] }
    }

    fn step(&self, inst: &mut Instance, input: Input) -> Vec<Effect> {
        let ctx = Ctx {
            spec: &self.spec,
            now: self.now,
            wall: self.wall,
            shutting_down: self.shutting_down,
            blocked: &self.blocked,
        };
        step(inst, input, &ctx)
    }

    fn pass(&mut self, d: Duration) {
        self.now += d;
        self.wall += d;
    }
}

fn spawned(pid: i32) -> Input {
    Input::Spawned { pid, start_ticks: Some(1), cgroup: None }
}

fn exited(code: i32) -> Input {
    Input::Exited { exit: Exit::code(code), group_alive: false }
}

/// An instance spawned and up as `pid`.
fn running(w: &World, pid: i32) -> Instance {
    let mut i = Instance::new();
    assert_eq!(
        w.step(&mut i, Input::Start(Why::Wanted)),
        [Effect::CancelTimer(TimerKind::Restart), Effect::Spawn]
    );
    w.step(&mut i, spawned(pid));
    i
}

#[test]
fn without_a_ready_probe_an_instance_is_ready_once_spawned() {
    let w = World::new(spec());
    let i = running(&w, 10);
    assert_eq!(i.state, State::Ready);
    assert_eq!((i.pid, i.pgid), (Some(10), Some(10)));
    assert!(!i.spawning);
}

#[test]
fn a_ready_probe_keeps_it_starting_until_it_passes_then_health_begins() {
    let w = World::new(probed());
    let mut i = Instance::new();
    w.step(&mut i, Input::Start(Why::Wanted));
    assert_eq!(w.step(&mut i, spawned(10)), [Effect::StartProbe(Role::Ready)]);
    assert_eq!(i.state, State::Starting);
    assert_eq!(w.step(&mut i, Input::Probe(Role::Ready, Verdict::Ready)), [Effect::StartProbe(Role::Health)]);
    assert_eq!(i.state, State::Ready);
    assert!(i.is_ready());
}

#[test]
fn not_ready_in_time_is_a_failed_start_that_stops_then_backs_off() {
    let mut w = World::new(probed());
    let mut i = Instance::new();
    w.step(&mut i, Input::Start(Why::Wanted));
    w.step(&mut i, spawned(10));
    let v = Verdict::StartTimeout { after: 60 * SEC, last_failure: Some("connection refused".into()) };
    let fx = w.step(&mut i, Input::Probe(Role::Ready, v));
    assert_eq!(fx, [Effect::StopProbe, Effect::SignalStop, Effect::SetTimer(TimerKind::Kill, GRACE)]);
    assert_eq!(i.error.as_deref(), Some("not ready within 1m: connection refused"));
    w.pass(SEC);
    let fx = w.step(
        &mut i,
        Input::Exited { exit: Exit { code: None, signal: Some("SIGTERM".into()) }, group_alive: false },
    );
    assert!(fx.contains(&Effect::SetTimer(TimerKind::Restart, 2 * SEC)), "the default first backoff: {fx:?}");
    assert!(matches!(i.state, State::Backoff { .. }), "{:?}", i.state);
    assert_eq!(i.counters.rapid_failures, 1);
    assert_eq!(i.error.as_deref(), Some("not ready within 1m: connection refused"), "the reason stays shown");
}

#[test]
fn failed_health_checks_restart_and_count_toward_parking() {
    let mut s = probed();
    s.crash_loop.max_failures = 2;
    let w = World::new(s);
    let mut i = Instance::new();
    for round in 0..2 {
        w.step(&mut i, Input::Start(Why::Wanted));
        w.step(&mut i, spawned(10 + round));
        w.step(&mut i, Input::Probe(Role::Ready, Verdict::Ready));
        let fx = w.step(&mut i, Input::Probe(Role::Health, Verdict::Unhealthy { reason: "HTTP 500".into() }));
        assert!(fx.contains(&Effect::SignalStop));
        assert_eq!(i.error.as_deref(), Some("health check failed: HTTP 500"));
        w.step(&mut i, exited(0));
        if round == 0 {
            assert!(matches!(i.state, State::Backoff { .. }), "{:?}", i.state);
            w.step(&mut i, Input::Timer { kind: TimerKind::Restart, group_alive: false });
            assert_eq!(i.state, State::Starting);
            i.state = State::Stopped; // the next round starts it afresh
        }
    }
    assert!(matches!(i.state, State::Parked { .. }), "{:?}", i.state);
}

#[test]
fn stale_verdicts_and_verdicts_in_the_wrong_state_change_nothing() {
    let w = World::new(probed());
    let mut i = running(&w, 10);
    w.step(&mut i, Input::Probe(Role::Ready, Verdict::Ready));
    let before = i.clone();
    // A ready verdict after ready, a start timeout after ready.
    assert!(w.step(&mut i, Input::Probe(Role::Ready, Verdict::Ready)).is_empty());
    let v = Verdict::StartTimeout { after: SEC, last_failure: None };
    assert!(w.step(&mut i, Input::Probe(Role::Ready, v)).is_empty());
    assert_eq!(i, before);
    // Unhealthy while stopping.
    w.step(&mut i, Input::Stop(Then::Stop));
    let fx = w.step(&mut i, Input::Probe(Role::Health, Verdict::Unhealthy { reason: "x".into() }));
    assert!(fx.is_empty());
}

#[test]
fn an_exit_with_the_group_alive_drains_it_before_the_policy_acts() {
    let w = World::new(spec());
    let mut i = running(&w, 10);
    let fx = w.step(&mut i, Input::Exited { exit: Exit::code(3), group_alive: true });
    assert_eq!(fx, [Effect::StopProbe, Effect::SignalStop, Effect::SetTimer(TimerKind::Kill, GRACE)]);
    assert!(
        matches!(&i.state, State::Stopping { then: Then::Policy { exit: Some(e), .. } } if e.code == Some(3))
    );
    // The grace ends with the group still there: SIGKILL, look again.
    let fx = w.step(&mut i, Input::Timer { kind: TimerKind::Kill, group_alive: true });
    assert_eq!(fx, [Effect::KillGroup, Effect::SetTimer(TimerKind::Recheck, RECHECK)]);
    assert!(i.kill_sent);
    let fx = w.step(&mut i, Input::Timer { kind: TimerKind::Recheck, group_alive: false });
    assert!(fx.contains(&Effect::Cleanup { pgid: 10, cgroup: None }));
    assert!(fx.contains(&Effect::SetTimer(TimerKind::Restart, 2 * SEC)), "restarted by the policy: {fx:?}");
}

/// In cgroup mode the cleanup names the cgroup, once: it is removed and
/// the next process gets a cgroup of its own.
#[test]
fn the_cleanup_of_an_instance_in_a_cgroup_removes_that_cgroup() {
    let w = World::new(spec());
    let mut i = Instance::new();
    w.step(&mut i, Input::Start(Why::Wanted));
    let cg = std::path::PathBuf::from("/sys/fs/cgroup/drover.x/w.web.0.7");
    w.step(&mut i, Input::Spawned { pid: 10, start_ticks: Some(1), cgroup: Some(cg.clone()) });
    assert_eq!(i.cgroup.as_deref(), Some(cg.as_path()));
    w.step(&mut i, Input::Stop(Then::Stop));
    // The leader is gone, a setsid()ed grandchild lives on in the cgroup.
    assert_eq!(w.step(&mut i, Input::Exited { exit: Exit::code(0), group_alive: true }), [Effect::StopProbe]);
    assert_eq!(i.state, State::Stopping { then: Then::Stop });
    let fx = w.step(&mut i, Input::GroupEmpty);
    assert!(fx.contains(&Effect::Cleanup { pgid: 10, cgroup: Some(cg.into()) }), "{fx:?}");
    assert_eq!((i.cgroup.clone(), i.state.clone()), (None, State::Stopped));
    assert!(w.step(&mut i, Input::GroupEmpty).is_empty(), "a second report does nothing");
}

#[test]
fn a_stop_signals_once_and_settles_when_the_group_is_empty() {
    let w = World::new(spec());
    let mut i = running(&w, 10);
    let fx = w.step(&mut i, Input::Stop(Then::Stop));
    assert_eq!(fx, [Effect::StopProbe, Effect::SignalStop, Effect::SetTimer(TimerKind::Kill, GRACE)]);
    assert!(i.kill_at.is_some());
    // Asked again: nothing more is sent.
    assert!(w.step(&mut i, Input::Stop(Then::Stop)).is_empty());
    // The leader exits but a child lingers; the group empties later.
    assert_eq!(w.step(&mut i, Input::Exited { exit: Exit::code(0), group_alive: true }), [Effect::StopProbe]);
    let fx = w.step(&mut i, Input::GroupEmpty);
    assert!(
        fx.contains(&Effect::Cleanup { pgid: 10, cgroup: None })
            && fx.contains(&Effect::CancelTimer(TimerKind::Kill))
    );
    assert_eq!(i.state, State::Stopped);
    assert_eq!((i.pid, i.pgid, i.kill_at), (None, None, None));
}

#[test]
fn a_stop_while_spawning_signals_as_soon_as_the_spawn_is_reported() {
    let w = World::new(spec());
    let mut i = Instance::new();
    w.step(&mut i, Input::Start(Why::Wanted));
    assert!(i.spawning && i.has_processes());
    assert!(w.step(&mut i, Input::Stop(Then::Stop)).contains(&Effect::StopProbe));
    let fx = w.step(&mut i, spawned(10));
    assert_eq!(fx, [Effect::SignalStop, Effect::SetTimer(TimerKind::Kill, GRACE)]);
    w.step(&mut i, exited(143));
    assert_eq!(i.state, State::Stopped);
    // Or the spawn failed: nothing to stop.
    let mut j = Instance::new();
    w.step(&mut j, Input::Start(Why::Wanted));
    w.step(&mut j, Input::Stop(Then::Retire));
    let fx = w.step(&mut j, Input::SpawnFailed { error: "no such file".into(), short: false });
    assert_eq!(fx.last(), Some(&Effect::Retire));
}

#[test]
fn a_retire_is_never_turned_back() {
    let w = World::new(spec());
    let mut i = running(&w, 10);
    w.step(&mut i, Input::Stop(Then::Retire));
    w.step(&mut i, Input::Stop(Then::Start));
    w.step(&mut i, Input::Start(Why::Release));
    assert_eq!(w.step(&mut i, exited(0)).last(), Some(&Effect::Retire));
}

#[test]
fn a_hold_stays_stopped_until_released() {
    let w = World::new(spec());
    let mut i = running(&w, 10);
    w.step(&mut i, Input::Hold);
    w.step(&mut i, exited(143));
    assert_eq!(i.state, State::Stopped);
    assert!(w.step(&mut i, Input::Start(Why::Wanted)).is_empty(), "a wanted start leaves a held instance");
    assert!(w.step(&mut i, Input::Start(Why::Deploy)).is_empty(), "so does a rollout");
    assert!(w.step(&mut i, Input::Start(Why::Release)).contains(&Effect::Spawn));
    assert!(!i.held);
}

#[test]
fn a_release_during_a_hand_stop_starts_it_again_once_stopped() {
    let w = World::new(spec());
    let mut i = running(&w, 10);
    w.step(&mut i, Input::Hold);
    assert!(w.step(&mut i, Input::Start(Why::Release)).is_empty());
    assert_eq!(i.state, State::Stopping { then: Then::Start });
    assert!(w.step(&mut i, exited(143)).contains(&Effect::Spawn));
    assert_eq!(i.deploys, 1);
}

#[test]
fn a_blocked_start_waits_and_says_on_what_then_starts_when_free() {
    let mut w = World::new(spec());
    w.blocked = vec!["db (ready)".into()];
    let mut i = Instance::new();
    assert_eq!(w.step(&mut i, Input::Start(Why::Wanted)), [Effect::CancelTimer(TimerKind::Restart)]);
    assert_eq!(i.state, State::Waiting { on: vec!["db (ready)".into()] });
    assert!(!i.has_processes());
    w.step(&mut i, Input::Blocked { on: vec!["db (ready)".into(), "migrate (succeeded)".into()] });
    assert!(matches!(&i.state, State::Waiting { on } if on.len() == 2));
    w.blocked.clear();
    assert!(w.step(&mut i, Input::Blocked { on: vec![] }).contains(&Effect::Spawn));
    // A crash restart waits for its dependencies too.
    w.blocked = vec!["db (ready)".into()];
    w.step(&mut i, spawned(10));
    w.step(&mut i, exited(1));
    assert!(matches!(i.state, State::Backoff { .. }));
    w.step(&mut i, Input::Timer { kind: TimerKind::Restart, group_alive: false });
    assert!(matches!(i.state, State::Waiting { .. }));
    // Stopping a waiting instance needs no signal.
    let fx = w.step(&mut i, Input::Stop(Then::Stop));
    assert!(!fx.contains(&Effect::SignalStop));
    assert_eq!(i.state, State::Stopped);
}

#[test]
fn a_rollout_replacement_is_replacing_until_ready() {
    let w = World::new(probed());
    let mut i = running(&w, 10);
    w.step(&mut i, Input::Probe(Role::Ready, Verdict::Ready));
    i.stale = true;
    w.step(&mut i, Input::Stop(Then::Start));
    assert!(w.step(&mut i, exited(143)).contains(&Effect::Spawn));
    assert!(i.replacing && !i.stale);
    assert_eq!(i.deploys, 1);
    w.step(&mut i, spawned(11));
    assert!(i.replacing, "not ready yet");
    w.step(&mut i, Input::Probe(Role::Ready, Verdict::Ready));
    assert!(!i.replacing);
    // A replacement that fails to get ready stays one: the rollout holds.
    i.stale = true;
    w.step(&mut i, Input::Stop(Then::Start));
    w.step(&mut i, exited(143));
    w.step(&mut i, spawned(12));
    w.step(&mut i, Input::Probe(Role::Ready, Verdict::StartTimeout { after: SEC, last_failure: None }));
    w.step(&mut i, exited(143));
    assert!(matches!(i.state, State::Backoff { .. }) && i.replacing, "{:?}", i.state);
    // A stop on purpose ends it.
    w.step(&mut i, Input::Stop(Then::Stop));
    assert!(!i.replacing);
}

#[test]
fn a_resource_shortage_backs_off_without_counting_toward_parking() {
    let mut s = spec();
    s.crash_loop.max_failures = 1;
    let w = World::new(s);
    let mut i = Instance::new();
    for _ in 0..5 {
        w.step(&mut i, Input::Start(Why::Wanted));
        w.step(&mut i, Input::SpawnFailed { error: "EMFILE".into(), short: true });
        assert!(matches!(i.state, State::Backoff { .. }), "{:?}", i.state);
        w.step(&mut i, Input::Timer { kind: TimerKind::Restart, group_alive: false });
        i.state = State::Stopped;
        i.spawning = false;
    }
    assert_eq!(i.counters.rapid_failures, 0);
}

#[test]
fn shutting_down_leaves_everything_stopped() {
    let mut w = World::new(spec());
    let mut i = running(&w, 10);
    w.shutting_down = true;
    w.step(&mut i, Input::Stop(Then::Stop));
    let fx = w.step(&mut i, exited(1));
    assert!(!fx.contains(&Effect::Spawn));
    assert_eq!(i.state, State::Stopped);
    assert!(w.step(&mut i, Input::Start(Why::Release)).iter().all(|e| *e != Effect::Spawn));
}

#[test]
fn never_and_on_failure_stop_and_a_permanent_code_parks() {
    let mut s = spec();
    s.restart = RestartPolicy::OnFailure;
    s.permanent_exit_codes = vec![78];
    let w = World::new(s);
    let mut i = running(&w, 10);
    w.step(&mut i, exited(0));
    assert_eq!(i.state, State::Stopped);
    let mut i = running(&w, 11);
    w.step(&mut i, exited(78));
    assert!(matches!(i.state, State::Parked { .. }));
    assert!(
        w.step(&mut i, Input::Start(Why::Wanted)).contains(&Effect::Spawn),
        "a change starts a parked one"
    );
    assert_eq!(i.counters.rapid_failures, 0);
}

// ----- the slot invariant, under any sequence of inputs -----

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        prop_oneof![Just(Why::Wanted), Just(Why::Deploy), Just(Why::Release)].prop_map(Input::Start),
        Just(Input::Hold),
        prop_oneof![Just(Then::Stop), Just(Then::Start), Just(Then::Retire)].prop_map(Input::Stop),
        any::<bool>().prop_map(|short| Input::SpawnFailed { error: "x".into(), short }),
        (0..3i32, any::<bool>()).prop_map(|(c, g)| Input::Exited { exit: Exit::code(c), group_alive: g }),
        Just(Input::GroupEmpty),
        (
            prop_oneof![Just(TimerKind::Restart), Just(TimerKind::Kill), Just(TimerKind::Recheck)],
            any::<bool>()
        )
            .prop_map(|(kind, group_alive)| Input::Timer { kind, group_alive }),
        Just(Input::Probe(Role::Ready, Verdict::Ready)),
        Just(Input::Probe(Role::Ready, Verdict::StartTimeout { after: SEC, last_failure: None })),
        Just(Input::Probe(Role::Health, Verdict::Unhealthy { reason: "x".into() })),
        proptest::collection::vec(Just("db (ready)".to_string()), 0..2).prop_map(|on| Input::Blocked { on }),
    ]
}

/// A fake world that runs the effects: how many processes the slot has.
#[derive(Default)]
struct Slot {
    /// Processes spawned and not yet gone (leader or group).
    live: u32,
    leader: bool,
    spawn_pending: bool,
    retired: bool,
}

proptest! {
    #[test]
    fn no_input_sequence_puts_two_processes_in_one_slot(
        inputs in proptest::collection::vec(input(), 1..60),
        probes in any::<bool>(),
        blocked in any::<bool>(),
    ) {
        let mut w = World::new(if probes { probed() } else { spec() });
        if blocked {
            w.blocked = vec!["db (ready)".into()];
        }
        let mut i = Instance::new();
        let mut slot = Slot::default();
        let mut next_pid = 100;
        for input in inputs {
            if slot.retired {
                break;
            }
            // Only inputs the world could send: a spawn report only for a
            // spawn asked for, an exit only for a live leader.
            let input = match input {
                Input::SpawnFailed { .. } | Input::Exited { .. } if !slot.spawn_pending && !slot.leader => continue,
                Input::SpawnFailed { .. } if !slot.spawn_pending => continue,
                Input::Exited { .. } if !slot.leader => continue,
                Input::Exited { exit, group_alive } => {
                    slot.leader = false;
                    if !group_alive { slot.live = 0; }
                    Input::Exited { exit, group_alive: group_alive && slot.live > 0 }
                }
                Input::SpawnFailed { error, short } => {
                    slot.spawn_pending = false;
                    slot.live = 0;
                    Input::SpawnFailed { error, short }
                }
                Input::GroupEmpty if slot.leader || slot.live > 0 => continue,
                Input::Timer { kind, .. } => Input::Timer { kind, group_alive: slot.live > 0 },
                other => other,
            };
            w.pass(Duration::from_millis(300));
            let mut pending = vec![input];
            while let Some(input) = pending.pop() {
                for fx in w.step(&mut i, input) {
                    match fx {
                        Effect::Spawn => {
                            prop_assert_eq!(slot.live, 0, "spawn with a process in the slot: {:?}", i.state);
                            prop_assert!(!slot.spawn_pending);
                            slot.live = 1;
                            slot.spawn_pending = true;
                        }
                        Effect::KillGroup => {
                            // SIGKILL: the leader's exit will be reported.
                        }
                        Effect::Retire => {
                            prop_assert_eq!(slot.live, 0, "retired with a process left");
                            slot.retired = true;
                        }
                        Effect::Cleanup { .. } => prop_assert!(!slot.leader, "cleanup with the leader alive"),
                        _ => {}
                    }
                }
                // The fake world reports a spawn at once, half the time.
                if slot.spawn_pending && next_pid % 2 == 0 {
                    slot.spawn_pending = false;
                    slot.leader = true;
                    pending.push(spawned(next_pid));
                }
                next_pid += 1;
            }
            // What status shows agrees with the slot.
            prop_assert_eq!(i.has_processes(), slot.live > 0 || slot.spawn_pending || matches!(i.state, State::Stopping { .. }),
                "state {:?}, slot live {}", i.state, slot.live);
            if matches!(i.state, State::Stopped | State::Parked { .. } | State::Backoff { .. } | State::Waiting { .. }) {
                prop_assert_eq!(slot.live, 0, "{:?} with a process in the slot", i.state);
            }
        }
    }
}

#[test]
fn memory_over_max_memory_is_a_graceful_failed_start_with_the_reason() {
    let mut s = spec();
    s.max_memory = Some(crate::config::types::ByteSize(512 * 1024 * 1024));
    let mut w = World::new(s);
    let mut i = running(&w, 10);
    assert_eq!(
        w.step(&mut i, Input::Memory { rss_bytes: 512 * 1024 * 1024 }),
        [],
        "at the limit is within it"
    );
    assert_eq!(i.state, State::Ready);
    let fx = w.step(&mut i, Input::Memory { rss_bytes: 612 * 1024 * 1024 + 400 * 1024 });
    assert_eq!(fx, [Effect::StopProbe, Effect::SignalStop, Effect::SetTimer(TimerKind::Kill, GRACE)]);
    assert_eq!(i.error.as_deref(), Some("memory 612.4 MiB over max_memory 512 MiB"));
    assert_eq!(
        w.step(&mut i, Input::Memory { rss_bytes: u64::MAX }),
        [],
        "a stopping one is not stopped twice"
    );
    w.pass(SEC);
    let fx = w.step(&mut i, exited(0));
    assert!(fx.contains(&Effect::SetTimer(TimerKind::Restart, 2 * SEC)), "a failure backs off: {fx:?}");
    assert_eq!(i.counters.rapid_failures, 1);
    assert_eq!(i.error.as_deref(), Some("memory 612.4 MiB over max_memory 512 MiB"), "the reason stays");
}

#[test]
fn without_max_memory_a_sample_means_nothing() {
    let w = World::new(spec());
    let mut i = running(&w, 10);
    assert_eq!(w.step(&mut i, Input::Memory { rss_bytes: u64::MAX }), []);
    assert_eq!(i.state, State::Ready);
}

#[test]
fn an_oom_kill_under_memory_max_is_the_reason_of_a_failure() {
    let mut s = spec();
    s.max_memory = Some(crate::config::types::ByteSize(512 * 1024 * 1024));
    let mut w = World::new(s);
    let mut i = running(&w, 10);
    let fx = w.step(&mut i, Input::OutOfMemory);
    assert!(fx.contains(&Effect::SignalStop), "the rest of its cgroup is stopped: {fx:?}");
    w.pass(SEC);
    let killed =
        Input::Exited { exit: Exit { code: None, signal: Some("SIGKILL".into()) }, group_alive: false };
    let fx = w.step(&mut i, killed);
    assert!(fx.contains(&Effect::SetTimer(TimerKind::Restart, 2 * SEC)), "a failure backs off: {fx:?}");
    assert_eq!(i.counters.rapid_failures, 1);
    assert_eq!(
        i.error.as_deref(),
        Some("killed by the kernel for memory over max_memory 512 MiB (memory.max)"),
        "not the SIGKILL it shows as"
    );
}
