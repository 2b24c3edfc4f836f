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

/// The fields of a cron expression, each as the values it allows (None:
/// every value), for a target that spells calendars its own way.
#[derive(Clone)]
struct Fields {
    minute: Option<Vec<u32>>,
    hour: Option<Vec<u32>>,
    dom: Option<Vec<u32>>,
    month: Option<Vec<u32>>,
    /// 0 = Sunday … 6 = Saturday.
    dow: Option<Vec<u32>>,
}

const MONTHS: [&str; 12] =
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// One field's allowed values in `lo..=hi`; None when it allows them all.
fn expand(field: &str, lo: u32, hi: u32, names: &[&str], name_base: u32) -> Result<Option<Vec<u32>>, String> {
    let value = |s: &str| -> Result<u32, String> {
        if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
            return Ok(i as u32 + name_base);
        }
        s.parse::<u32>().map_err(|_| format!("{s:?} has no calendar equivalent"))
    };
    let mut all = std::collections::BTreeSet::new();
    let mut every = false;
    for item in field.split(',') {
        let (range, step) = item.split_once('/').map_or((item, None), |(r, s)| (r, Some(s)));
        let step = step.map_or(Ok(1), |s| s.parse::<u32>().map_err(|_| format!("step {s:?}")))?.max(1);
        let (a, b) = match range {
            "*" | "?" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                None if step > 1 => (value(r)?, hi),
                None => (value(r)?, value(r)?),
            },
        };
        if matches!(range, "*" | "?") && step == 1 {
            every = true;
        }
        all.extend((a..=b.min(hi)).step_by(step as usize));
    }
    Ok((!every).then(|| all.into_iter().collect()))
}

fn fields(cron: &str) -> Result<Fields, String> {
    let f: Vec<&str> = cron.split_whitespace().collect();
    let [minute, hour, dom, month, dow] = f[..] else {
        return Err("expected five fields".into());
    };
    let mut dow = expand(dow, 0, 7, &DAYS, 0)?;
    // 7 is Sunday too.
    if let Some(d) = &mut dow {
        for v in d.iter_mut() {
            *v %= 7;
        }
        d.sort_unstable();
        d.dedup();
        if d.len() == 7 {
            dow = None;
        }
    }
    Ok(Fields {
        minute: expand(minute, 0, 59, &[], 0)?,
        hour: expand(hour, 0, 23, &[], 0)?,
        dom: expand(dom, 1, 31, &[], 1)?,
        month: expand(month, 1, 12, &MONTHS, 1)?,
        dow,
    })
}

/// A cron expression as systemd `OnCalendar=` values, with its zone; a
/// timer fires at each. One value, or two when the cron restricts both
/// the day of the month and the day of the week: cron fires on either,
/// one calendar would need both.
pub fn cron_to_calendars(cron: &str, timezone: Option<&str>) -> Result<Vec<String>, String> {
    let f = fields(cron)?;
    if f.dom.is_some() && f.dow.is_some() {
        let by_dom = Fields { dow: None, ..f.clone() };
        let by_dow = Fields { dom: None, ..f };
        return Ok(vec![calendar(&by_dom, timezone), calendar(&by_dow, timezone)]);
    }
    Ok(vec![calendar(&f, timezone)])
}

fn calendar(f: &Fields, timezone: Option<&str>) -> String {
    let list = |v: &Option<Vec<u32>>| match v {
        None => "*".to_string(),
        Some(v) => v.iter().map(|n| format!("{n:02}")).collect::<Vec<_>>().join(","),
    };
    let dow = match &f.dow {
        None => String::new(),
        Some(d) => {
            let names = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
            format!("{} ", d.iter().map(|&i| names[i as usize]).collect::<Vec<_>>().join(","))
        }
    };
    let mut cal =
        format!("{dow}*-{}-{} {}:{}:00", list(&f.month), list(&f.dom), list(&f.hour), list(&f.minute));
    if let Some(tz) = timezone {
        cal.push(' ');
        cal.push_str(tz);
    }
    cal
}

#[cfg(test)]
mod calendar_tests {
    use super::*;

    fn one(cron: &str, tz: Option<&str>) -> String {
        let mut v = cron_to_calendars(cron, tz).unwrap();
        assert_eq!(v.len(), 1, "{cron}: {v:?}");
        v.remove(0)
    }

    #[test]
    fn cron_becomes_on_calendar() {
        assert_eq!(one("0 3 * * *", None), "*-*-* 03:00:00");
        assert_eq!(one("*/15 * * * *", None), "*-*-* *:00,15,30,45:00");
        assert_eq!(
            one("30 9 * * 1-5", Some("Europe/Paris")),
            "Mon,Tue,Wed,Thu,Fri *-*-* 09:30:00 Europe/Paris"
        );
        assert_eq!(one("0 0 1 jan,jul *", None), "*-01,07-01 00:00:00");
        assert_eq!(one("0 4 * * 0,7", None), "Sun *-*-* 04:00:00");
        assert_eq!(one("* * * * *", None), "*-*-* *:*:00");
        // Both day fields: cron fires on either, so two calendars.
        assert_eq!(cron_to_calendars("0 0 1 * 1", None).unwrap(), ["*-*-01 00:00:00", "Mon *-*-* 00:00:00"]);
        assert!(cron_to_calendars("0 0 L * *", None).is_err());
    }

    /// The next `n` elapses systemd computes for `cal`, in UTC.
    fn systemd_elapses(cal: &str, n: usize) -> Vec<String> {
        let out = std::process::Command::new("systemd-analyze")
            .args(["calendar", &format!("--iterations={n}"), cal])
            .env("TZ", "UTC")
            .output()
            .unwrap();
        assert!(out.status.success(), "{cal}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("Next elapse:") || l.contains("Iter. #"))
            .filter_map(|l| {
                let w: Vec<&str> = l.split_once(": ")?.1.split_whitespace().collect();
                Some(format!("{} {}", w.get(1)?, w.get(2)?))
            })
            .collect()
    }

    #[test]
    fn every_calendar_written_is_one_systemd_reads_as_the_same_times() {
        // systemd's own parser, where it is installed: the next elapses of
        // the calendars together must be drover's cron's next ticks.
        let Ok(out) = std::process::Command::new("systemd-analyze").arg("--version").output() else { return };
        assert!(out.status.success());
        let n = 6;
        for cron in [
            "0 3 * * *",
            "*/15 * * * *",
            "30 9 * * 1-5",
            "0 0 1 jan,jul *",
            "5 4 * * sun",
            "0 */6 * * *",
            "0 9-17/2 1,15 JAN-JUN MON-FRI",
            "0 0 */2 * 1",
        ] {
            let cals = cron_to_calendars(cron, Some("UTC")).unwrap();
            let mut got: Vec<String> = cals.iter().flat_map(|c| systemd_elapses(c, n)).collect();
            got.sort();
            got.dedup();
            got.truncate(n);
            let c = crate::config::resolve::parse_cron(cron).unwrap();
            let mut t = chrono::Utc::now();
            let want: Vec<String> = (0..n)
                .map(|_| {
                    t = c.find_next_occurrence(&t, false).unwrap();
                    t.format("%Y-%m-%d %H:%M:%S").to_string()
                })
                .collect();
            assert_eq!(got, want, "{cron} as {cals:?}");
        }
    }
}
