//! Probe results over time -> a verdict, and when to probe next. Pure:
//! time comes in as an argument, so every rule is tested without a clock.
//!
//! A ready probe is checked at once when the instance is spawned, then
//! every `interval`, until the first pass (Ready) or until `start_timeout`
//! has passed since the spawn with no pass (StartTimeout). A check that
//! fails at or after the deadline ends it, so a last check may overrun the
//! deadline by at most its own `timeout`.
//!
//! A health probe is first checked between a half and one and a half
//! `interval`s after the instance became ready (where in that span is the
//! caller's `phase`, random: instances started together are not all
//! checked at the same instant ever after), then one `interval` after each
//! check ended; `failures`
//! consecutive failures make the instance Unhealthy, a pass resets the
//! count. A `failures` of 0 is read as 1.

use std::time::{Duration, Instant};

/// Which question a probe answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Is the instance ready (once, after a spawn)?
    Ready,
    /// Is it still healthy (for as long as it is up)?
    Health,
}

/// What a probe concluded; after it the probe ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ready,
    /// Not ready within `start_timeout`; `last_failure` is what the last
    /// check said, if there was one.
    StartTimeout {
        after: Duration,
        last_failure: Option<String>,
    },
    /// `failures` checks in a row failed; `reason` is the last one's text.
    Unhealthy {
        reason: String,
    },
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Ready => write!(f, "ready"),
            Verdict::StartTimeout { after, last_failure: None } => {
                write!(f, "not ready within {}", humantime::format_duration(*after))
            }
            Verdict::StartTimeout { after, last_failure: Some(why) } => {
                write!(f, "not ready within {} (last check: {why})", humantime::format_duration(*after))
            }
            Verdict::Unhealthy { reason } => write!(f, "health check failed: {reason}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Tracker {
    role: Role,
    interval: Duration,
    /// Ready: the spawn time plus `start_timeout`.
    deadline: Option<Instant>,
    start_timeout: Duration,
    failures: u32,
    in_row: u32,
    last_failure: Option<String>,
    next: Option<Instant>,
}

impl Tracker {
    /// A ready probe for an instance spawned at `spawned`.
    pub fn ready(interval: Duration, start_timeout: Duration, spawned: Instant) -> Self {
        Tracker {
            role: Role::Ready,
            interval,
            deadline: Some(later(spawned, start_timeout)),
            start_timeout,
            failures: 1,
            in_row: 0,
            last_failure: None,
            next: Some(spawned),
        }
    }

    /// A health probe for an instance that became ready at `ready_at`;
    /// `phase` in [0, 1) places the first check in its span.
    pub fn health(interval: Duration, failures: u32, ready_at: Instant, phase: f64) -> Self {
        let phase = if phase.is_finite() { phase.clamp(0.0, 0.999_999) } else { 0.0 };
        let spread = Duration::try_from_secs_f64(interval.as_secs_f64() * phase).unwrap_or(interval);
        let first = (interval / 2).saturating_add(spread);
        Tracker {
            role: Role::Health,
            interval,
            deadline: None,
            start_timeout: Duration::ZERO,
            failures: failures.max(1),
            in_row: 0,
            last_failure: None,
            next: Some(later(ready_at, first)),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// When to check next; `None` once a verdict was given.
    pub fn next_at(&self) -> Option<Instant> {
        let next = self.next?;
        Some(match self.deadline {
            Some(d) => next.min(d),
            None => next,
        })
    }

    /// A ready probe's deadline (`None` for health, or after a verdict).
    pub fn deadline(&self) -> Option<Instant> {
        self.next.and(self.deadline)
    }

    /// How many checks in a row have failed.
    pub fn failures_in_row(&self) -> u32 {
        self.in_row
    }

    /// The outcome of a check that ended at `now`.
    pub fn record(&mut self, now: Instant, result: Result<(), String>) -> Option<Verdict> {
        self.next?;
        let verdict = match result {
            Ok(()) => {
                self.in_row = 0;
                self.last_failure = None;
                (self.role == Role::Ready).then_some(Verdict::Ready)
            }
            Err(why) => {
                self.in_row = self.in_row.saturating_add(1);
                self.last_failure = Some(why);
                match self.role {
                    Role::Ready => self.expired(now),
                    Role::Health if self.in_row >= self.failures => {
                        Some(Verdict::Unhealthy { reason: self.last_failure.clone().unwrap_or_default() })
                    }
                    Role::Health => None,
                }
            }
        };
        self.next = if verdict.is_some() { None } else { Some(later(now, self.interval)) };
        verdict
    }

    /// Time passed with no result (a probe that waits for the instance to
    /// say it is ready): StartTimeout once the deadline is reached.
    pub fn tick(&mut self, now: Instant) -> Option<Verdict> {
        self.next?;
        let v = self.expired(now);
        if v.is_some() {
            self.next = None;
        }
        v
    }

    fn expired(&self, now: Instant) -> Option<Verdict> {
        let deadline = self.deadline?;
        (now >= deadline).then(|| Verdict::StartTimeout {
            after: self.start_timeout,
            last_failure: self.last_failure.clone(),
        })
    }
}

/// `t + d`; a sum past what an Instant holds is read as "in 30 years"
/// (never, for a supervisor), not as "now".
fn later(t: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    t.checked_add(d).or_else(|| t.checked_add(FAR)).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    fn fail(why: &str) -> Result<(), String> {
        Err(why.to_string())
    }

    #[test]
    fn ready_passes_on_the_first_pass_and_probes_at_once_then_every_interval() {
        let t0 = Instant::now();
        let mut t = Tracker::ready(S, 10 * S, t0);
        assert_eq!(t.next_at(), Some(t0), "the first check is at once");
        assert_eq!(t.record(t0, fail("connection refused")), None);
        assert_eq!(t.next_at(), Some(t0 + S));
        assert_eq!(t.record(t0 + S, Ok(())), Some(Verdict::Ready));
        assert_eq!(t.next_at(), None, "nothing more after a verdict");
        assert_eq!(t.record(t0 + 2 * S, fail("late")), None);
    }

    #[test]
    fn ready_times_out_with_the_last_failure_and_never_sleeps_past_the_deadline() {
        let t0 = Instant::now();
        let mut t = Tracker::ready(4 * S, 10 * S, t0);
        assert_eq!(t.record(t0 + 8 * S, fail("exit 1")), None);
        assert_eq!(t.next_at(), Some(t0 + 10 * S), "capped by the deadline");
        assert_eq!(
            t.record(t0 + 10 * S, fail("exit 2")),
            Some(Verdict::StartTimeout { after: 10 * S, last_failure: Some("exit 2".into()) })
        );
        assert_eq!(
            Verdict::StartTimeout { after: 10 * S, last_failure: Some("exit 2".into()) }.to_string(),
            "not ready within 10s (last check: exit 2)"
        );
    }

    #[test]
    fn a_waiting_ready_probe_times_out_by_tick() {
        let t0 = Instant::now();
        let mut t = Tracker::ready(S, 5 * S, t0);
        assert_eq!(t.deadline(), Some(t0 + 5 * S));
        assert_eq!(t.tick(t0 + 4 * S), None);
        assert_eq!(t.tick(t0 + 5 * S), Some(Verdict::StartTimeout { after: 5 * S, last_failure: None }));
        assert_eq!(t.deadline(), None);
        assert_eq!(t.tick(t0 + 6 * S), None, "a verdict is given once");
    }

    #[test]
    fn health_needs_consecutive_failures_and_a_pass_resets_the_count() {
        let t0 = Instant::now();
        let mut t = Tracker::health(10 * S, 3, t0, 0.5);
        assert_eq!(t.next_at(), Some(t0 + 10 * S), "the first check waits one interval at phase 0.5");
        assert_eq!(Tracker::health(10 * S, 3, t0, 0.0).next_at(), Some(t0 + 5 * S));
        assert!(Tracker::health(10 * S, 3, t0, 7.0).next_at().unwrap() < t0 + 15 * S);
        assert_eq!(Tracker::health(10 * S, 3, t0, f64::NAN).next_at(), Some(t0 + 5 * S));
        assert_eq!(t.record(t0, fail("a")), None);
        assert_eq!(t.record(t0, fail("b")), None);
        assert_eq!(t.record(t0, Ok(())), None);
        assert_eq!(t.failures_in_row(), 0);
        assert_eq!(t.record(t0, fail("c")), None);
        assert_eq!(t.record(t0, fail("d")), None);
        assert_eq!(
            t.record(t0 + S, fail("http 503")),
            Some(Verdict::Unhealthy { reason: "http 503".into() })
        );
        assert_eq!(t.next_at(), None);
        assert_eq!(
            Verdict::Unhealthy { reason: "http 503".into() }.to_string(),
            "health check failed: http 503"
        );
    }

    #[test]
    fn health_with_zero_failures_reads_as_one_and_never_times_out() {
        let t0 = Instant::now();
        let mut t = Tracker::health(S, 0, t0, 0.0);
        assert_eq!(t.tick(t0 + 1000 * S), None);
        assert_eq!(t.record(t0, fail("x")), Some(Verdict::Unhealthy { reason: "x".into() }));
    }

    #[test]
    fn huge_durations_saturate_instead_of_panicking() {
        let t0 = Instant::now();
        let mut t = Tracker::ready(Duration::MAX, Duration::MAX, t0);
        assert_eq!(t.record(t0, fail("x")), None);
        let mut h = Tracker::health(Duration::MAX, u32::MAX, t0, 0.9);
        assert_eq!(h.record(t0, fail("x")), None);
    }

    proptest! {
        /// Health: Unhealthy exactly at the first run of `failures`
        /// consecutive failures, naming its last failure; nothing after.
        #[test]
        fn health_verdict_is_the_first_run_of_failures(
            failures in 0u32..5,
            results in proptest::collection::vec(any::<bool>(), 0..40),
        ) {
            let t0 = Instant::now();
            let mut t = Tracker::health(S, failures, t0, 0.0);
            let need = failures.max(1);
            let mut run = 0;
            let mut expected_at = None;
            for (i, ok) in results.iter().enumerate() {
                run = if *ok { 0 } else { run + 1 };
                if run == need && expected_at.is_none() {
                    expected_at = Some(i);
                }
            }
            let mut got_at = None;
            for (i, ok) in results.iter().enumerate() {
                let r = if *ok { Ok(()) } else { Err(format!("f{i}")) };
                if let Some(v) = t.record(t0 + S * i as u32, r) {
                    prop_assert!(got_at.is_none(), "a second verdict");
                    prop_assert_eq!(v, Verdict::Unhealthy { reason: format!("f{i}") });
                    got_at = Some(i);
                }
            }
            prop_assert_eq!(got_at, expected_at);
        }

        /// Ready: Ready at the first pass before the deadline, else
        /// StartTimeout at the first failure at or after it; the next check
        /// is never after the deadline.
        #[test]
        fn ready_verdict_is_the_first_pass_or_the_deadline(
            timeout_s in 0u64..20,
            steps in proptest::collection::vec((0u64..4, any::<bool>()), 0..30),
        ) {
            let t0 = Instant::now();
            let deadline = t0 + Duration::from_secs(timeout_s);
            let mut t = Tracker::ready(S, Duration::from_secs(timeout_s), t0);
            let mut now = t0;
            let mut verdict = None;
            for (dt, ok) in steps {
                if let Some(next) = t.next_at() {
                    prop_assert!(next <= deadline);
                }
                now += Duration::from_secs(dt);
                let v = t.record(now, if ok { Ok(()) } else { Err("no".into()) });
                if verdict.is_some() {
                    prop_assert_eq!(v, None);
                    continue;
                }
                match &v {
                    Some(Verdict::Ready) => prop_assert!(ok),
                    Some(Verdict::StartTimeout { .. }) => prop_assert!(!ok && now >= deadline),
                    Some(other) => prop_assert!(false, "unexpected {other:?}"),
                    None => prop_assert!(!ok && now < deadline),
                }
                verdict = v;
            }
        }
    }
}
