//! What happens after an instance's process exits: restart after a
//! backoff, park, or stop. A pure function of the worker's settings, the
//! instance's counters and the exit, so the rules are tested without
//! processes or clocks.

use std::time::Duration;

use crate::config::model::{RestartPolicy, Worker};
use crate::os::reaper::Exit;

/// The counters an instance carries from one start to the next.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    /// Restarts so far (shown in status).
    pub restarts: u32,
    /// Consecutive exits each within `min_uptime` of their start.
    pub rapid_failures: u32,
    /// The delay before the next restart; `None` means `backoff.initial`.
    pub next_delay: Option<Duration>,
}

/// The decision after an exit.
#[derive(Clone, Debug, PartialEq)]
pub enum AfterExit {
    /// Start again after `delay`.
    Restart { delay: Duration },
    /// No more restarts until `unpark` or a config change.
    Park { reason: String },
    /// Done: the policy does not restart this exit.
    Stop,
}

/// Decides what follows `exit` (`None`: the process could not be started
/// at all, which counts as a rapid failure) after `uptime`.
pub fn after_exit(w: &Worker, c: &mut Counters, exit: Option<&Exit>, uptime: Duration) -> AfterExit {
    if let Some(code) = exit.and_then(|e| e.code)
        && w.permanent_exit_codes.contains(&code)
    {
        return AfterExit::Park { reason: format!("exit code {code} means a permanent failure") };
    }
    let success = exit.is_some_and(Exit::success);
    match w.restart {
        RestartPolicy::Never => return AfterExit::Stop,
        RestartPolicy::OnFailure if success => return AfterExit::Stop,
        _ => {}
    }
    let initial = w.backoff.initial.0;
    if exit.is_some() && uptime >= w.crash_loop.min_uptime.0 {
        // It stayed up long enough: the slate is clean.
        c.rapid_failures = 0;
        c.next_delay = None;
    } else {
        c.rapid_failures += 1;
        if c.rapid_failures >= w.crash_loop.max_failures {
            return AfterExit::Park {
                reason: format!(
                    "crash loop: {} exits in a row, each within {} of its start",
                    c.rapid_failures, w.crash_loop.min_uptime
                ),
            };
        }
    }
    let delay = c.next_delay.unwrap_or(initial);
    let next = grow(delay, w.backoff.multiplier, w.backoff.max.0).max(initial);
    c.next_delay = Some(next);
    c.restarts += 1;
    AfterExit::Restart { delay }
}

/// The shortest wait before a start that failed for want of drover's own
/// resources is tried again: they come back when something else ends.
pub const SHORTAGE_RETRY: Duration = Duration::from_secs(1);

/// A start failed for want of drover's own resources (EMFILE, EAGAIN):
/// not the worker's failure, so it never counts toward parking. The retry
/// follows the worker's backoff, but waits at least [`SHORTAGE_RETRY`].
pub fn after_resource_shortage(w: &Worker, c: &mut Counters) -> Duration {
    let delay = c.next_delay.unwrap_or(w.backoff.initial.0).max(SHORTAGE_RETRY);
    c.next_delay = Some(grow(delay, w.backoff.multiplier, w.backoff.max.0.max(SHORTAGE_RETRY)));
    delay
}

/// `delay * multiplier`, capped at `max`, computed so that no value (a
/// huge multiplier, NaN) can overflow or panic.
fn grow(delay: Duration, multiplier: f64, max: Duration) -> Duration {
    let secs = delay.as_secs_f64() * multiplier;
    if secs.is_nan() {
        return max;
    }
    Duration::try_from_secs_f64(secs.min(max.as_secs_f64())).unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::{Backoff, CrashLoop, Settings, SpawnMode};
    use crate::config::types::HumanDuration;

    fn worker(restart: RestartPolicy) -> Worker {
        let mut w = Worker::new(vec!["x".into()], "/".into(), 1, SpawnMode::SameDir, Settings::default());
        w.restart = restart;
        w
    }

    const RAPID: Duration = Duration::from_secs(1);
    const LONG: Duration = Duration::from_secs(60);

    fn secs(d: &AfterExit) -> f64 {
        match d {
            AfterExit::Restart { delay } => delay.as_secs_f64(),
            other => panic!("expected a restart, got {other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_parks_after_max_failures() {
        let mut w = worker(RestartPolicy::Always);
        w.crash_loop.max_failures = 10;
        let mut c = Counters::default();
        let delays: Vec<f64> =
            (0..9).map(|_| secs(&after_exit(&w, &mut c, Some(&Exit::code(1)), RAPID))).collect();
        assert_eq!(delays, [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 120.0, 120.0, 120.0]);
        assert_eq!(c.restarts, 9);
        assert!(matches!(after_exit(&w, &mut c, Some(&Exit::code(1)), RAPID), AfterExit::Park { .. }));
    }

    #[test]
    fn parks_after_exactly_max_failures_rapid_exits() {
        let w = worker(RestartPolicy::Always); // max_failures = 5
        let mut c = Counters::default();
        for _ in 0..4 {
            assert!(matches!(after_exit(&w, &mut c, Some(&Exit::code(1)), RAPID), AfterExit::Restart { .. }));
        }
        let d = after_exit(&w, &mut c, Some(&Exit::code(1)), RAPID);
        assert!(matches!(&d, AfterExit::Park { reason } if reason.contains("5 exits")), "{d:?}");
    }

    #[test]
    fn a_long_run_resets_failures_and_backoff() {
        let w = worker(RestartPolicy::Always);
        let mut c = Counters::default();
        for _ in 0..4 {
            after_exit(&w, &mut c, Some(&Exit::code(1)), RAPID);
        }
        assert_eq!(secs(&after_exit(&w, &mut c, Some(&Exit::code(1)), LONG)), 2.0);
        assert_eq!(c.rapid_failures, 0);
        assert_eq!(secs(&after_exit(&w, &mut c, Some(&Exit::code(1)), RAPID)), 4.0);
    }

    #[test]
    fn permanent_exit_code_parks_at_once_whatever_the_policy() {
        for p in [RestartPolicy::Always, RestartPolicy::OnFailure, RestartPolicy::Never] {
            let d = after_exit(&worker(p), &mut Counters::default(), Some(&Exit::code(78)), LONG);
            assert!(matches!(d, AfterExit::Park { .. }), "{p:?}: {d:?}");
        }
    }

    #[test]
    fn policies() {
        let ok = Exit::code(0);
        let killed = Exit { code: None, signal: Some("SIGKILL".into()) };
        let mut c = Counters::default();
        assert_eq!(after_exit(&worker(RestartPolicy::OnFailure), &mut c, Some(&ok), LONG), AfterExit::Stop);
        assert!(matches!(
            after_exit(&worker(RestartPolicy::OnFailure), &mut c, Some(&killed), LONG),
            AfterExit::Restart { .. }
        ));
        assert_eq!(
            after_exit(&worker(RestartPolicy::Never), &mut c, Some(&Exit::code(1)), LONG),
            AfterExit::Stop
        );
        assert!(matches!(
            after_exit(&worker(RestartPolicy::Always), &mut c, Some(&ok), LONG),
            AfterExit::Restart { .. }
        ));
    }

    #[test]
    fn a_failed_spawn_is_a_rapid_failure_even_with_zero_min_uptime() {
        let mut w = worker(RestartPolicy::Always);
        w.crash_loop = CrashLoop { min_uptime: HumanDuration::from_secs(0), max_failures: 2 };
        let mut c = Counters::default();
        assert!(matches!(after_exit(&w, &mut c, None, Duration::ZERO), AfterExit::Restart { .. }));
        assert!(matches!(after_exit(&w, &mut c, None, Duration::ZERO), AfterExit::Park { .. }));
    }

    #[test]
    fn huge_multipliers_and_caps_do_not_overflow() {
        let year = Duration::from_secs(365 * 86_400);
        assert_eq!(grow(year, 1e20, Duration::MAX), Duration::MAX);
        assert_eq!(grow(year, 1e20, year), year);
        assert_eq!(grow(Duration::from_secs(2), f64::INFINITY, year), year);
        assert_eq!(grow(Duration::from_secs(2), f64::NAN, year), year);
        assert_eq!(grow(Duration::from_secs(2), 2.0, year), Duration::from_secs(4));
        let mut w = worker(RestartPolicy::Always);
        w.backoff.multiplier = 1e20;
        w.backoff.max = HumanDuration(Duration::MAX);
        w.crash_loop.max_failures = 10;
        let mut c = Counters::default();
        for _ in 0..5 {
            assert!(matches!(after_exit(&w, &mut c, Some(&Exit::code(1)), RAPID), AfterExit::Restart { .. }));
        }
    }

    #[test]
    fn a_resource_shortage_backs_off_but_never_parks() {
        let mut w = worker(RestartPolicy::Always);
        w.crash_loop.max_failures = 1;
        w.backoff.initial = HumanDuration::from_secs(0);
        w.backoff.max = HumanDuration::from_secs(0);
        let mut c = Counters::default();
        for _ in 0..20 {
            assert_eq!(after_resource_shortage(&w, &mut c), SHORTAGE_RETRY);
        }
        assert_eq!(c.rapid_failures, 0);
        let mut w = worker(RestartPolicy::Always); // 2s doubling to 2m
        let mut c = Counters::default();
        let delays: Vec<u64> = (0..8).map(|_| after_resource_shortage(&w, &mut c).as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 64, 120, 120]);
        w.crash_loop.max_failures = 1;
        assert!(matches!(after_exit(&w, &mut c, Some(&Exit::code(1)), LONG), AfterExit::Restart { .. }));
    }

    #[test]
    fn zero_backoff_restarts_at_once() {
        let mut w = worker(RestartPolicy::Always);
        w.backoff = Backoff {
            initial: HumanDuration::from_secs(0),
            max: HumanDuration::from_secs(0),
            multiplier: 1.0,
        };
        w.crash_loop.min_uptime = HumanDuration::from_millis(0);
        let mut c = Counters::default();
        for _ in 0..100 {
            assert_eq!(secs(&after_exit(&w, &mut c, Some(&Exit::code(1)), Duration::ZERO)), 0.0);
        }
    }
}
