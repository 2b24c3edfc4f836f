//! Interval and cron conversions for targets that only know calendars.

use std::time::Duration;

/// `every` as a cron expression, when the interval divides the clock
/// evenly (every 5 minutes, 2 hours, 1 day). Under a minute, cron cannot
/// say it: `Err(Some(rounded))` gives every minute as the nearest.
pub fn every_to_cron(every: Duration) -> Result<String, Option<String>> {
    let secs = every.as_secs();
    if secs < 60 {
        return Err(Some("* * * * *".into()));
    }
    if every.subsec_nanos() != 0 || secs % 60 != 0 {
        return Err(None);
    }
    let minutes = secs / 60;
    match minutes {
        m if m < 60 && 60 % m == 0 => Ok(if m == 1 { "* * * * *".into() } else { format!("*/{m} * * * *") }),
        m if m % 60 == 0 && m < 24 * 60 && 24 % (m / 60) == 0 => {
            let h = m / 60;
            Ok(if h == 1 { "0 * * * *".into() } else { format!("0 */{h} * * *") })
        }
        m if m == 24 * 60 => Ok("0 0 * * *".into()),
        m if m == 7 * 24 * 60 => Ok("0 0 * * 0".into()),
        _ => Err(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_that_divide_the_clock_become_cron() {
        let m = |n: u64| Duration::from_secs(n * 60);
        assert_eq!(every_to_cron(m(1)).unwrap(), "* * * * *");
        assert_eq!(every_to_cron(m(5)).unwrap(), "*/5 * * * *");
        assert_eq!(every_to_cron(m(30)).unwrap(), "*/30 * * * *");
        assert_eq!(every_to_cron(m(60)).unwrap(), "0 * * * *");
        assert_eq!(every_to_cron(m(120)).unwrap(), "0 */2 * * *");
        assert_eq!(every_to_cron(m(12 * 60)).unwrap(), "0 */12 * * *");
        assert_eq!(every_to_cron(m(24 * 60)).unwrap(), "0 0 * * *");
        assert_eq!(every_to_cron(m(7 * 24 * 60)).unwrap(), "0 0 * * 0");
    }

    #[test]
    fn the_rest_is_refused_or_rounded_to_a_minute() {
        assert_eq!(every_to_cron(Duration::from_secs(10)), Err(Some("* * * * *".into())));
        assert_eq!(every_to_cron(Duration::from_millis(61_500)), Err(None));
        for bad in [7 * 60, 90 * 60, 5 * 3600, 2 * 86400] {
            assert_eq!(every_to_cron(Duration::from_secs(bad)), Err(None), "{bad}");
        }
    }

    #[test]
    fn a_converted_interval_ticks_at_that_interval() {
        // Round trip: the cron drover's own parser reads fires `every` apart.
        for minutes in [1u64, 2, 5, 15, 60, 180, 1440] {
            let cron = every_to_cron(Duration::from_secs(minutes * 60)).unwrap();
            let c = crate::config::resolve::parse_cron(&cron).unwrap();
            let start = chrono::DateTime::from_timestamp(1_800_000_000 - 1_800_000_000 % 86400, 0).unwrap();
            let a = c.find_next_occurrence(&start, false).unwrap();
            let b = c.find_next_occurrence(&a, false).unwrap();
            assert_eq!((b - a).num_minutes() as u64, minutes, "{cron}");
        }
    }
}
