//! Time arithmetic that cannot panic: a wall-clock time far in the future
//! (a huge backoff or interval) saturates, and formatting clamps to what
//! RFC 3339 can show (years 1970 to 9999).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The last second RFC 3339 can show: 9999-12-31T23:59:59Z.
const LAST: Duration = Duration::from_secs(253_402_300_799);

/// `t + d`, or the last time RFC 3339 can show when that overflows or
/// lies beyond it.
pub fn later(t: SystemTime, d: Duration) -> SystemTime {
    let last = SystemTime::UNIX_EPOCH + LAST;
    t.checked_add(d).map_or(last, |x| x.min(last))
}

/// `t` as RFC 3339 with milliseconds, clamped to 1970..=9999.
pub fn rfc3339(t: SystemTime) -> String {
    let t = t.clamp(SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH + LAST);
    humantime::format_rfc3339_millis(t).to_string()
}

/// A wall-clock time with its RFC 3339 text, formatted once: a status
/// report shows it for every instance, each time one is taken.
#[derive(Clone, Debug, PartialEq)]
pub struct Stamp {
    pub at: SystemTime,
    pub text: Arc<str>,
}

impl Stamp {
    pub fn of(at: SystemTime) -> Stamp {
        Stamp { at, text: rfc3339(at).into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn far_times_saturate_and_format() {
        let now = SystemTime::now();
        let far = later(now, Duration::MAX);
        assert_eq!(rfc3339(far), "9999-12-31T23:59:59.000Z");
        assert_eq!(rfc3339(later(now, Duration::from_secs(1_000_000 * 31_557_600))), rfc3339(far));
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH - Duration::from_secs(5)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            later(SystemTime::UNIX_EPOCH, Duration::from_secs(1)),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1)
        );
        let s = Stamp::of(SystemTime::UNIX_EPOCH + Duration::from_millis(1500));
        assert_eq!(&*s.text, "1970-01-01T00:00:01.500Z");
    }
}
