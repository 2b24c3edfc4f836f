//! Raw config -> validated [`Config`]: inheritance from `[defaults]`, paths
//! made absolute, and the rules a JSON schema cannot express.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::model::{Backoff, Config, CrashLoop, Job, Settings, Step, Supervisor, Trigger, Worker};
use super::raw::{OnOverlap, RawBackoff, RawConfig, RawCrashLoop, RawJob, RawSettings, SpawnMode};
use super::types::{ByteSize, HumanDuration, is_valid_name};

/// A rule broken at a key path (`["workers", "web", "backoff"]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub path: Vec<String>,
    pub message: String,
}

struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: &[&str], message: impl Into<String>) {
        self.0.push(Problem { path: path.iter().map(|s| s.to_string()).collect(), message: message.into() });
    }
}

/// The fields of a cron expression: name, range, and names allowed.
const CRON_FIELDS: [(&str, u32, u32, &[&str]); 5] = [
    ("minute", 0, 59, &[]),
    ("hour", 0, 23, &[]),
    ("day-of-month", 1, 31, &[]),
    ("month", 1, 12, &["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]),
    ("day-of-week", 0, 7, &["sun", "mon", "tue", "wed", "thu", "fri", "sat"]),
];

/// What is wrong with a cron expression, said in terms of its fields
/// (croner's own errors name neither the field nor its range).
fn cron_field_error(expr: &str) -> Option<String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    if fields.len() != 5 {
        let mut msg =
            format!("expected 5 fields (minute hour day-of-month month day-of-week), found {}", fields.len());
        if fields.len() == 6 {
            msg.push_str("; there is no seconds field");
        }
        return Some(msg);
    }
    for (field, (name, lo, hi, names)) in fields.iter().zip(CRON_FIELDS) {
        for item in field.split(',') {
            let (range, step) = item.split_once('/').map_or((item, None), |(r, s)| (r, Some(s)));
            if let Some(step) = step
                && step.parse::<u32>().map_or(true, |s| s == 0)
            {
                return Some(format!("{name} field: step {step:?} must be a whole number of at least 1"));
            }
            if range == "*" || range == "?" || range.is_empty() && step.is_some() {
                continue;
            }
            let bounds: Vec<&str> = range.split('-').collect();
            for b in &bounds {
                if names.iter().any(|n| n.eq_ignore_ascii_case(b)) || b.ends_with('L') || b.contains('#') {
                    continue;
                }
                match b.parse::<u32>() {
                    Ok(v) if v < lo || v > hi => {
                        return Some(format!("{name} field: {v} is out of range {lo}-{hi}"));
                    }
                    Ok(_) => {}
                    Err(_) if b.eq_ignore_ascii_case("L") || b.eq_ignore_ascii_case("W") => {}
                    Err(_) => {
                        let hint = if names.is_empty() {
                            format!("a number {lo}-{hi}")
                        } else {
                            format!("a number {lo}-{hi} or a name such as {}", names[1].to_ascii_uppercase())
                        };
                        return Some(format!("{name} field: {b:?} is not {hint}"));
                    }
                }
            }
        }
    }
    None
}

/// Parses a five-field cron expression the way the scheduler will.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    if let Some(why) = cron_field_error(expr) {
        return Err(format!("invalid cron expression {expr:?}: {why}"));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Disallowed)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| format!("invalid cron expression {expr:?}: {e}"))
}

/// Resolves `raw`, whose relative paths are relative to `base_dir`.
pub fn resolve(raw: &RawConfig, base_dir: &Path) -> Result<Config, Vec<Problem>> {
    let mut p = Problems(Vec::new());

    let sup = raw.supervisor.clone().unwrap_or_default();
    let supervisor = Supervisor {
        state_dir: base_dir.join(sup.state_dir.unwrap_or_else(|| ".drover".into())),
        reload: sup.reload.unwrap_or(true),
        debounce: sup.debounce.unwrap_or(HumanDuration::from_millis(50)),
        log_max_size: sup.log_max_size.unwrap_or(ByteSize(10 * ByteSize::MIB)),
        log_keep: sup.log_keep.unwrap_or(5),
    };
    if supervisor.state_dir.as_os_str().as_encoded_bytes().contains(&0) {
        p.add(&["supervisor", "state_dir"], "must not contain a NUL byte; write a plain directory path");
    }
    check_at_most(&mut p, &["supervisor", "debounce"], sup.debounce, HOUR);
    if supervisor.log_max_size.0 < 4096 {
        p.add(&["supervisor", "log_max_size"], "must be at least 4KiB");
    }

    let empty = RawSettings::default();
    let raw_defaults = raw.defaults.as_ref().unwrap_or(&empty);
    let defaults = overlay(&Settings::default(), raw_defaults);
    check_settings(&mut p, &["defaults"], &defaults, raw_defaults);

    let mut workers = BTreeMap::new();
    for (name, w) in &raw.workers {
        let at = ["workers", name.as_str()];
        check_name(&mut p, &at, name);
        check_command(&mut p, &["workers", name, "command"], &w.command);
        let own = RawSettings {
            restart: w.restart,
            backoff: w.backoff.clone(),
            crash_loop: w.crash_loop.clone(),
            permanent_exit_codes: w.permanent_exit_codes.clone(),
            stop_signal: w.stop_signal,
            stop_grace: w.stop_grace,
            env: w.env.clone(),
            secret_env: w.secret_env.clone(),
        };
        let s = overlay(&defaults, &own);
        check_settings(&mut p, &at, &s, &own);
        let dir = resolve_dir(&mut p, &["workers", name, "dir"], base_dir, w.dir.as_deref());
        let capacity = w.capacity.unwrap_or(1);
        if capacity == 0 {
            p.add(&["workers", name, "capacity"], "must be at least 1");
        }
        workers.insert(
            name.clone(),
            Worker::new(w.command.clone(), dir, capacity, w.spawn_mode.unwrap_or(SpawnMode::SameDir), s),
        );
    }

    let mut jobs = BTreeMap::new();
    for (name, j) in &raw.jobs {
        if let Some(job) = resolve_job(&mut p, name, j, &defaults, base_dir) {
            jobs.insert(name.clone(), job);
        }
    }

    // A `[defaults]` secret may be set only by the workers and jobs.
    for (i, key) in raw_defaults.secret_env.iter().flatten().enumerate() {
        let set_somewhere = defaults.env.contains_key(key)
            || workers.values().any(|w| w.env.contains_key(key))
            || jobs.values().any(|j| j.env.contains_key(key));
        if !set_somewhere {
            let known =
                workers.values().flat_map(|w| w.env.keys()).chain(jobs.values().flat_map(|j| j.env.keys()));
            p.add(&["defaults", "secret_env", &i.to_string()], unset_secret_message(key, known));
        }
    }

    if p.0.is_empty() { Ok(Config { supervisor, defaults, workers, jobs }) } else { Err(p.0) }
}

/// Where the time zone database is.
const ZONEINFO: &str = "/usr/share/zoneinfo";

/// An unknown zone, with the closest names in the zone database.
fn unknown_zone_message(tz: &str) -> String {
    let mut msg = format!("unknown time zone {tz:?}");
    let mut zones = Vec::new();
    zone_names(Path::new(ZONEINFO), "", &mut zones);
    let lower = tz.to_ascii_lowercase();
    let mut scored: Vec<(usize, &String)> = zones
        .iter()
        .map(|z| {
            let zl = z.to_ascii_lowercase();
            // The city alone counts too: "Pris" is close to "Europe/Paris".
            let city = zl.rsplit('/').next().unwrap_or(&zl).to_string();
            let mine = lower.rsplit('/').next().unwrap_or(&lower).to_string();
            let d = super::load::edit_distance(&lower, &zl).min(super::load::edit_distance(&mine, &city) + 1);
            (d, z)
        })
        .filter(|(d, _)| *d <= 2.max(tz.len() / 4))
        .collect();
    scored.sort();
    let near: Vec<String> = scored.iter().take(3).map(|(_, z)| format!("{z:?}")).collect();
    if !near.is_empty() {
        msg.push_str(&format!("; did you mean {}?", near.join(" or ")));
    } else {
        msg.push_str(&format!("; use an IANA name such as \"Europe/Paris\" or \"UTC\" (see {ZONEINFO})"));
    }
    msg
}

/// The zone names under `dir` (files whose names start with a capital,
/// as zone names do; "posix" and "right" copies are skipped).
fn zone_names(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Some(name) = e.file_name().to_str().map(String::from) else { continue };
        if !name.starts_with(|c: char| c.is_ascii_uppercase()) || out.len() > 5000 {
            continue;
        }
        let full = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        match e.file_type() {
            Ok(t) if t.is_dir() => zone_names(&e.path(), &full, out),
            Ok(_) => out.push(full),
            Err(_) => {}
        }
    }
}

/// A `secret_env` key no env sets is most likely a typo, which would leave
/// the real secret printable.
fn unset_secret_message<'a>(key: &str, known: impl Iterator<Item = &'a String>) -> String {
    let mut msg = format!("{key:?} is not set in any env this applies to; secret_env names keys of env");
    if let Some(near) = known
        .min_by_key(|k| super::load::edit_distance(key, k))
        .filter(|k| super::load::edit_distance(key, k) <= 2)
    {
        msg.push_str(&format!("; did you mean {near:?}?"));
    }
    msg
}

fn resolve_job(
    p: &mut Problems,
    name: &str,
    j: &RawJob,
    defaults: &Settings,
    base_dir: &Path,
) -> Option<Job> {
    let at = ["jobs", name];
    check_name(p, &at, name);
    let (steps, flow) = match (&j.command, &j.steps) {
        (Some(cmd), None) => {
            check_command(p, &["jobs", name, "command"], cmd);
            (vec![Step { name: "main".into(), command: cmd.clone(), approve: false }], false)
        }
        (None, Some(steps)) => {
            if steps.is_empty() {
                p.add(&["jobs", name, "steps"], "a flow needs at least one step");
            }
            let mut seen = BTreeSet::new();
            for (i, s) in steps.iter().enumerate() {
                let idx = i.to_string();
                let step_at = ["jobs", name, "steps", idx.as_str()];
                if !is_valid_name(&s.name) {
                    p.add(&[&step_at[..], &["name"]].concat(), name_message(&s.name));
                } else if !seen.insert(s.name.as_str()) {
                    p.add(&[&step_at[..], &["name"]].concat(), format!("duplicate step name {:?}", s.name));
                }
                check_command(p, &[&step_at[..], &["command"]].concat(), &s.command);
            }
            let steps = steps
                .iter()
                .map(|s| Step { name: s.name.clone(), command: s.command.clone(), approve: s.approve })
                .collect();
            (steps, true)
        }
        (Some(_), Some(_)) => {
            p.add(&at, "set either `command` or `steps`, not both");
            return None;
        }
        (None, None) => {
            p.add(&at, "a job needs `command` (one step) or `steps` (a flow)");
            return None;
        }
    };
    let trigger = match (&j.schedule, j.every) {
        (Some(_), Some(_)) => {
            p.add(&at, "set at most one of `schedule` and `every`");
            Trigger::Manual
        }
        (Some(expr), None) => {
            if let Err(e) = parse_cron(expr) {
                p.add(&["jobs", name, "schedule"], e);
            }
            if let Some(tz) = &j.timezone {
                // A zone name, never a path out of the zone database.
                let plain =
                    !tz.starts_with('/') && !tz.split('/').any(|part| part.is_empty() || part == "..");
                match tzfile::Tz::named(tz) {
                    Ok(_) if plain => {}
                    Ok(_) => p.add(&["jobs", name, "timezone"], format!("invalid time zone name {tz:?}")),
                    Err(_) => p.add(&["jobs", name, "timezone"], unknown_zone_message(tz)),
                }
            }
            Trigger::Schedule { cron: expr.clone(), timezone: j.timezone.clone() }
        }
        (None, Some(every)) => {
            if j.timezone.is_some() {
                p.add(
                    &["jobs", name, "timezone"],
                    "a time zone applies to a cron `schedule`, not to `every`",
                );
            }
            if every.0.is_zero() {
                p.add(&["jobs", name, "every"], "must be longer than 0s");
            }
            check_at_most(p, &["jobs", name, "every"], Some(every), YEAR);
            Trigger::Every(every)
        }
        (None, None) => {
            if j.timezone.is_some() {
                p.add(
                    &["jobs", name, "timezone"],
                    "a time zone applies to a cron `schedule`; this job has none",
                );
            }
            Trigger::Manual
        }
    };
    if j.timeout.is_some_and(|t| t.0.is_zero()) {
        p.add(&["jobs", name, "timeout"], "must be longer than 0s");
    }
    check_at_most(p, &["jobs", name, "timeout"], j.timeout, YEAR);
    check_at_most(p, &["jobs", name, "jitter"], j.jitter, DAY);
    check_at_most(p, &["jobs", name, "stop_grace"], j.stop_grace, DAY);
    let capacity = j.capacity.unwrap_or(1);
    if capacity == 0 {
        p.add(&["jobs", name, "capacity"], "must be at least 1");
    }
    let retain = j.retain.unwrap_or(50);
    if retain == 0 {
        p.add(&["jobs", name, "retain"], "must be at least 1");
    }
    let mut env = defaults.env.clone();
    env.extend(j.env.clone().unwrap_or_default());
    check_env(p, &["jobs", name, "env"], j.env.as_ref());
    let mut secret_env = defaults.secret_env.clone();
    secret_env.extend(j.secret_env.iter().flatten().cloned());
    check_secrets(p, &["jobs", name], &env, j.secret_env.as_ref());
    Some(Job {
        steps,
        flow,
        trigger,
        capacity,
        on_overlap: j.on_overlap.unwrap_or(OnOverlap::Skip),
        timeout: j.timeout,
        jitter: j.jitter.unwrap_or_default(),
        queue_limit: j.queue_limit.unwrap_or(16).max(1),
        catch_up: j.catch_up.unwrap_or(false),

        retain,
        dir: resolve_dir(p, &["jobs", name, "dir"], base_dir, j.dir.as_deref()),
        env,
        secret_env,
        stop_signal: j.stop_signal.unwrap_or(defaults.stop_signal),
        stop_grace: j.stop_grace.unwrap_or(defaults.stop_grace),
    })
}

/// `base` overlaid by the keys `own` sets; tables merge key by key.
fn overlay(base: &Settings, own: &RawSettings) -> Settings {
    let b = own.backoff.clone().unwrap_or_default();
    let c = own.crash_loop.clone().unwrap_or_default();
    let mut env = base.env.clone();
    env.extend(own.env.clone().unwrap_or_default());
    let mut secret_env = base.secret_env.clone();
    secret_env.extend(own.secret_env.iter().flatten().cloned());
    Settings {
        restart: own.restart.unwrap_or(base.restart),
        backoff: Backoff {
            initial: b.initial.unwrap_or(base.backoff.initial),
            max: b.max.unwrap_or(base.backoff.max),
            multiplier: b.multiplier.unwrap_or(base.backoff.multiplier),
        },
        crash_loop: CrashLoop {
            min_uptime: c.min_uptime.unwrap_or(base.crash_loop.min_uptime),
            max_failures: c.max_failures.unwrap_or(base.crash_loop.max_failures),
        },
        permanent_exit_codes: own
            .permanent_exit_codes
            .clone()
            .unwrap_or_else(|| base.permanent_exit_codes.clone()),
        stop_signal: own.stop_signal.unwrap_or(base.stop_signal),
        stop_grace: own.stop_grace.unwrap_or(base.stop_grace),
        env,
        secret_env,
    }
}

/// Checks the merged settings, blaming the table that set the keys: a
/// worker is only blamed for what it sets itself (else the report would
/// repeat a `[defaults]` mistake once per worker).
fn check_settings(p: &mut Problems, at: &[&str], s: &Settings, own: &RawSettings) {
    let path = |key: &'static str| [at, &[key]].concat();
    if let Some(RawBackoff { initial, max, multiplier }) = &own.backoff {
        check_at_most(p, &[at, &["backoff", "initial"]].concat(), *initial, DAY);
        check_at_most(p, &[at, &["backoff", "max"]].concat(), *max, DAY);
        if multiplier.is_some_and(|m| m > MAX_MULTIPLIER) {
            p.add(
                &[at, &["backoff", "multiplier"]].concat(),
                format!("must be at most {MAX_MULTIPLIER}, found {}", s.backoff.multiplier),
            );
        }
        if (initial.is_some() || max.is_some()) && s.backoff.initial > s.backoff.max {
            p.add(
                &path("backoff"),
                format!(
                    "backoff.initial ({}) must not exceed backoff.max ({})",
                    s.backoff.initial, s.backoff.max
                ),
            );
        }
        if multiplier.is_some() && !(s.backoff.multiplier >= 1.0 && s.backoff.multiplier.is_finite()) {
            p.add(
                &[at, &["backoff", "multiplier"]].concat(),
                format!("must be a finite number of at least 1, found {}", s.backoff.multiplier),
            );
        }
    }
    if let Some(c) = &own.crash_loop {
        check_at_most(p, &[at, &["crash_loop", "min_uptime"]].concat(), c.min_uptime, DAY);
    }
    check_at_most(p, &path("stop_grace"), own.stop_grace, DAY);
    if let Some(RawCrashLoop { max_failures: Some(0), .. }) = &own.crash_loop {
        p.add(&[at, &["crash_loop", "max_failures"]].concat(), "must be at least 1");
    }
    if let Some(codes) = &own.permanent_exit_codes
        && let Some(bad) = codes.iter().find(|c| !(0..=255).contains(*c))
    {
        p.add(&path("permanent_exit_codes"), format!("exit codes are 0 to 255, found {bad}"));
    }
    check_env(p, &path("env"), own.env.as_ref());
    if at.first() != Some(&"defaults") {
        check_secrets(p, at, &s.env, own.secret_env.as_ref());
    }
}

/// Each key a worker or job marks secret must be one its env sets.
fn check_secrets(p: &mut Problems, at: &[&str], env: &BTreeMap<String, String>, own: Option<&Vec<String>>) {
    for (i, key) in own.into_iter().flatten().enumerate() {
        if !env.contains_key(key) {
            p.add(&[at, &["secret_env", &i.to_string()]].concat(), unset_secret_message(key, env.keys()));
        }
    }
}

fn check_env(p: &mut Problems, at: &[&str], env: Option<&BTreeMap<String, String>>) {
    for (k, v) in env.into_iter().flatten() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            p.add(at, format!("invalid variable name {k:?}: it must be non-empty, without '=' or NUL"));
        } else if v.contains('\0') {
            p.add(&[at, &[k.as_str()]].concat(), "a value must not contain a NUL byte");
        }
    }
}

const HOUR: Bounded = Bounded(Duration::from_secs(3600), "1h");
const DAY: Bounded = Bounded(Duration::from_secs(86_400), "1day");
const YEAR: Bounded = Bounded(Duration::from_secs(365 * 86_400), "365days");
/// Past this, backoff grows to its cap in one step anyway.
const MAX_MULTIPLIER: f64 = 1000.0;

/// The most a duration key accepts, and how it is written: past such
/// bounds a value is a typo, and the runtime's arithmetic has headroom.
struct Bounded(Duration, &'static str);

fn check_at_most(p: &mut Problems, at: &[&str], d: Option<HumanDuration>, max: Bounded) {
    if let Some(d) = d
        && d.0 > max.0
    {
        p.add(at, format!("must be at most {}, found {d}", max.1));
    }
}

fn check_name(p: &mut Problems, at: &[&str], name: &str) {
    if !is_valid_name(name) {
        p.add(at, name_message(name));
    }
}

fn name_message(name: &str) -> String {
    format!(
        "invalid name {name:?}: use 1 to 63 lowercase letters, digits, '-' or '_', starting with a letter or digit"
    )
}

fn check_command(p: &mut Problems, at: &[&str], command: &[String]) {
    match command.first() {
        None => p.add(at, "must not be empty: give the program and its arguments"),
        Some(prog) if prog.trim().is_empty() => p.add(at, "the program (first element) must not be empty"),
        _ => {}
    }
    if command.iter().any(|a| a.contains('\0')) {
        p.add(at, "arguments must not contain a NUL byte");
    }
}

fn resolve_dir(p: &mut Problems, at: &[&str], base_dir: &Path, dir: Option<&Path>) -> PathBuf {
    let path = match dir {
        Some(d) => base_dir.join(d),
        None => base_dir.to_path_buf(),
    };
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => p.add(at, format!("{} is not a directory", path.display())),
        Err(e) => p.add(at, format!("directory {} cannot be used: {e}", path.display())),
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::{RawStep, RawWorker};

    fn worker(cmd: &[&str]) -> RawWorker {
        RawWorker { command: cmd.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    fn base() -> PathBuf {
        std::env::temp_dir()
    }

    #[test]
    fn empty_config_is_valid_with_builtin_defaults() {
        let c = resolve(&RawConfig::default(), &base()).unwrap();
        assert!(c.workers.is_empty() && c.jobs.is_empty());
        assert_eq!(c.defaults, Settings::default());
        assert_eq!(c.supervisor.state_dir, base().join(".drover"));
        assert_eq!(c.supervisor.debounce, HumanDuration::from_millis(50));
    }

    #[test]
    fn workers_inherit_defaults_deeply() {
        let mut raw = RawConfig {
            defaults: Some(RawSettings {
                backoff: Some(RawBackoff {
                    initial: Some(HumanDuration::from_secs(1)),
                    ..Default::default()
                }),
                env: Some([("A".into(), "1".into()), ("B".into(), "1".into())].into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut w = worker(&["true"]);
        w.backoff = Some(RawBackoff { max: Some(HumanDuration::from_secs(5)), ..Default::default() });
        w.env = Some([("B".into(), "2".into())].into());
        raw.workers.insert("web".into(), w);
        let c = resolve(&raw, &base()).unwrap();
        let web = &c.workers["web"];
        assert_eq!(web.backoff.initial, HumanDuration::from_secs(1));
        assert_eq!(web.backoff.max, HumanDuration::from_secs(5));
        assert_eq!(web.backoff.multiplier, 2.0);
        assert_eq!(web.env["A"], "1");
        assert_eq!(web.env["B"], "2");
        assert_eq!(web.capacity, 1);
        assert_eq!(web.permanent_exit_codes, vec![78]);
    }

    #[test]
    fn semantic_rules_are_reported_together() {
        let mut raw = RawConfig::default();
        let mut w = worker(&[]);
        w.backoff = Some(RawBackoff {
            initial: Some(HumanDuration::from_secs(10)),
            max: Some(HumanDuration::from_secs(1)),
            multiplier: Some(0.5),
        });
        raw.workers.insert("web".into(), w);
        raw.jobs.insert(
            "both".into(),
            RawJob { command: Some(vec!["true".into()]), steps: Some(vec![]), ..Default::default() },
        );
        raw.jobs.insert(
            "cron".into(),
            RawJob {
                command: Some(vec!["true".into()]),
                schedule: Some("61 * * * *".into()),
                ..Default::default()
            },
        );
        raw.jobs.insert(
            "flow".into(),
            RawJob {
                steps: Some(vec![
                    RawStep { name: "a".into(), command: vec!["true".into()], approve: false },
                    RawStep { name: "a".into(), command: vec!["true".into()], approve: false },
                ]),
                every: Some(HumanDuration::from_secs(1)),
                schedule: Some("* * * * *".into()),
                ..Default::default()
            },
        );
        let errs = resolve(&raw, &base()).unwrap_err();
        let at = |path: &str| {
            errs.iter()
                .find(|e| e.path.join(".") == path)
                .unwrap_or_else(|| panic!("no problem at {path}: {errs:#?}"))
                .message
                .clone()
        };
        assert!(at("workers.web.command").contains("must not be empty"));
        assert!(at("workers.web.backoff").contains("must not exceed"));
        assert!(at("workers.web.backoff.multiplier").contains("at least 1"));
        assert!(at("jobs.both").contains("not both"));
        assert!(at("jobs.cron.schedule").contains("invalid cron"));
        assert!(at("jobs.flow.steps.1.name").contains("duplicate"));
        assert!(at("jobs.flow").contains("at most one"));
    }

    #[test]
    fn cron_is_five_fields() {
        assert!(parse_cron("*/15 * * * *").is_ok());
        assert!(parse_cron("0 0 * * FRI").is_ok());
        assert!(parse_cron("0 */15 * * * *").is_err());
        assert!(parse_cron("* * *").is_err());
        let err = |e: &str| parse_cron(e).err().unwrap_or_default();
        assert!(
            err("61 * * * *").ends_with("minute field: 61 is out of range 0-59"),
            "{}",
            err("61 * * * *")
        );
        assert!(err("0 24 * * *").ends_with("hour field: 24 is out of range 0-23"));
        assert!(err("0 0 0 * *").ends_with("day-of-month field: 0 is out of range 1-31"));
        assert!(err("0 0 * 1-13 *").ends_with("month field: 13 is out of range 1-12"));
        assert!(err("0 0 * * 8").ends_with("day-of-week field: 8 is out of range 0-7"));
        assert!(err("0 0 * * FUN").contains("day-of-week field: \"FUN\" is not"));
        assert!(err("*/0 * * * *").contains("minute field: step \"0\""));
        assert!(err("0 */15 * * * *").contains("found 6; there is no seconds field"));
        for ok in ["*/5 1-5,7 * JAN-MAR MON-FRI", "0 0 L * *", "0 0 * * 5#2", "0 0 1 */2 0"] {
            assert!(parse_cron(ok).is_ok(), "{ok}: {:?}", parse_cron(ok).err());
        }
    }

    #[test]
    fn missing_dir_is_a_problem() {
        let mut raw = RawConfig::default();
        let mut w = worker(&["true"]);
        w.dir = Some("no/such/dir".into());
        raw.workers.insert("web".into(), w);
        let errs = resolve(&raw, &base()).unwrap_err();
        assert_eq!(errs[0].path, ["workers", "web", "dir"]);
        assert!(errs[0].message.contains("no/such/dir"), "{}", errs[0].message);
    }
}
