//! Raw config -> validated [`Config`]: inheritance from `[defaults]`, paths
//! made absolute, and the rules a JSON schema cannot express.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::identity::{self, RawIdentity};
use super::model::{
    Backoff, Condition, Config, CrashLoop, EnvFile, Job, Probe, ProbeKind, Settings, Step, Supervisor,
    Trigger, Worker,
};
use super::raw::{
    OnOverlap, RawBackoff, RawConfig, RawCrashLoop, RawDependsOn, RawJob, RawProbe, RawSettings, SpawnMode,
};
use super::sockets;
use super::types::{ByteSize, HumanDuration, is_valid_name};

/// A rule broken at a key path (`["workers", "web", "backoff"]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub path: Vec<String>,
    pub message: String,
}

/// The problems found so far.
#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(super) fn add(&mut self, path: &[&str], message: impl Into<String>) {
        self.0.push(Problem { path: path.iter().map(|s| s.to_string()).collect(), message: message.into() });
    }

    pub(super) fn add_owned(&mut self, path: Vec<String>, message: impl Into<String>) {
        self.0.push(Problem { path, message: message.into() });
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
        containment: sup.containment.unwrap_or_default(),
        metrics: sup.metrics.as_deref().and_then(|text| match sockets::parse_metrics(text, base_dir) {
            Ok(a) => Some(a),
            Err(why) => {
                p.add(&["supervisor", "metrics"], why);
                None
            }
        }),
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
    let me = crate::os::identity::drover_ids();
    let files = identity::env_files(&mut p, &["defaults"], base_dir, raw_defaults.env_file.as_ref());
    let mut defaults = overlay(&Settings::default(), raw_defaults, files);
    defaults.identity =
        identity::resolve(&mut p, &["defaults"], &defaults.identity, raw_identity(raw_defaults), me);
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
            ready: w.ready.clone(),
            health: w.health.clone(),
            user: w.user.clone(),
            group: w.group.clone(),
            umask: w.umask.clone(),
            nice: w.nice,
            oom_score_adj: w.oom_score_adj,
            no_new_privs: w.no_new_privs,
            limits: w.limits.clone(),
            env_file: w.env_file.clone(),
            max_memory: w.max_memory,
        };
        let files = identity::env_files(&mut p, &at, base_dir, own.env_file.as_ref());
        let mut s = overlay(&defaults, &own, files);
        s.identity = identity::resolve(&mut p, &at, &s.identity, raw_identity(&own), me);
        check_settings(&mut p, &at, &s, &own);
        let dir = resolve_dir(&mut p, &["workers", name, "dir"], base_dir, w.dir.as_deref());
        let capacity = w.capacity.unwrap_or(1);
        if capacity == 0 {
            p.add(&["workers", name, "capacity"], "must be at least 1");
        }
        let mut worker =
            Worker::new(w.command.clone(), dir, capacity, w.spawn_mode.unwrap_or(SpawnMode::SameDir), s);
        worker.sockets = sockets::resolve(&mut p, name, base_dir, w.sockets.as_ref());
        workers.insert(name.clone(), worker);
    }
    let held: BTreeMap<String, Vec<_>> =
        workers.iter().map(|(n, w)| (n.clone(), w.sockets.clone())).collect();
    sockets::check_shared(&mut p, &held);

    let mut jobs = BTreeMap::new();
    for (name, j) in &raw.jobs {
        if let Some(job) = resolve_job(&mut p, name, j, &defaults, base_dir, me) {
            jobs.insert(name.clone(), job);
        }
    }

    resolve_dependencies(&mut p, raw, &mut workers, &mut jobs);

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
    me: (u32, u32),
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
    let (own_files, file_env) = identity::env_files(p, &at, base_dir, j.env_file.as_ref());
    let mut env = defaults.env.clone();
    env.extend(file_env);
    env.extend(j.env.clone().unwrap_or_default());
    check_env(p, &["jobs", name, "env"], j.env.as_ref());
    let mut env_file = defaults.env_file.clone();
    env_file.extend(own_files);
    let own_identity = RawIdentity {
        user: j.user.as_ref(),
        group: j.group.as_ref(),
        umask: j.umask.as_ref(),
        nice: j.nice,
        oom_score_adj: j.oom_score_adj,
        no_new_privs: j.no_new_privs,
        limits: j.limits.as_ref(),
    };
    let identity = identity::resolve(p, &at, &defaults.identity, own_identity, me);
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
        env_file,
        identity,
        stop_signal: j.stop_signal.unwrap_or(defaults.stop_signal),
        stop_grace: j.stop_grace.unwrap_or(defaults.stop_grace),
        depends_on: BTreeMap::new(),
    })
}

/// The identity keys `own` sets.
fn raw_identity(own: &RawSettings) -> RawIdentity<'_> {
    RawIdentity {
        user: own.user.as_ref(),
        group: own.group.as_ref(),
        umask: own.umask.as_ref(),
        nice: own.nice,
        oom_score_adj: own.oom_score_adj,
        no_new_privs: own.no_new_privs,
        limits: own.limits.as_ref(),
    }
}

/// `base` overlaid by the keys `own` sets and by the variables of its env
/// files (`files`: its own files and what they set; `env` is over them);
/// tables merge key by key. The identity is `base`'s, to be resolved.
fn overlay(base: &Settings, own: &RawSettings, files: (Vec<EnvFile>, BTreeMap<String, String>)) -> Settings {
    let b = own.backoff.clone().unwrap_or_default();
    let c = own.crash_loop.clone().unwrap_or_default();
    let mut env = base.env.clone();
    env.extend(files.1);
    env.extend(own.env.clone().unwrap_or_default());
    let mut env_file = base.env_file.clone();
    env_file.extend(files.0);
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
        env_file,
        identity: base.identity.clone(),
        max_memory: own.max_memory.or(base.max_memory),
        // A probe of the worker's own replaces the default whole.
        ready: match &own.ready {
            Some(r) => Some(probe(r, true)),
            None => base.ready.clone(),
        },
        health: match &own.health {
            Some(h) => Some(probe(h, false)),
            None => base.health.clone(),
        },
    }
}

/// Checks the merged settings, blaming the table that set the keys: a
/// worker is only blamed for what it sets itself (else the report would
/// repeat a `[defaults]` mistake once per worker).
fn check_settings(p: &mut Problems, at: &[&str], s: &Settings, own: &RawSettings) {
    let path = |key: &'static str| [at, &[key]].concat();
    if own.max_memory.is_some_and(|m| m.0 < ByteSize::MIB) {
        p.add(&path("max_memory"), "must be at least 1MiB");
    }
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
    if let Some(r) = &own.ready {
        check_probe(p, &path("ready"), r, true);
    }
    if let Some(h) = &own.health {
        check_probe(p, &path("health"), h, false);
    }
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

/// The probe `raw` says, defaults filled in for its role. A probe with no
/// kind (a problem `check_probe` reports) stands in as `notify`.
fn probe(raw: &RawProbe, ready: bool) -> Probe {
    let kind = if let Some(argv) = &raw.exec {
        ProbeKind::Exec(argv.clone())
    } else if let Some(url) = &raw.http {
        ProbeKind::Http(url.clone())
    } else if let Some(addr) = &raw.tcp {
        ProbeKind::Tcp(addr.clone())
    } else if let Some(re) = &raw.log {
        ProbeKind::Log(re.clone())
    } else {
        ProbeKind::Notify
    };
    let d = |v: Option<HumanDuration>, default: u64| v.map_or(Duration::from_millis(default), |h| h.0);
    if ready {
        Probe {
            kind,
            interval: d(raw.interval, 1000),
            timeout: d(raw.timeout, 1000),
            start_timeout: d(raw.start_timeout, 60_000),
            failures: 1,
        }
    } else {
        Probe {
            kind,
            interval: d(raw.interval, 10_000),
            timeout: d(raw.timeout, 2000),
            start_timeout: Duration::ZERO,
            failures: raw.failures.unwrap_or(3),
        }
    }
}

/// The rules of a `ready` (`ready` true) or `health` probe at `at`.
fn check_probe(p: &mut Problems, at: &[&str], raw: &RawProbe, ready: bool) {
    let key = |k: &'static str| [at, &[k]].concat();
    let kinds: Vec<&str> = [
        ("exec", raw.exec.is_some()),
        ("http", raw.http.is_some()),
        ("tcp", raw.tcp.is_some()),
        ("log", raw.log.is_some()),
        ("notify", raw.notify == Some(true)),
    ]
    .into_iter()
    .filter_map(|(k, set)| set.then_some(k))
    .collect();
    let allowed = if ready {
        "`exec`, `http`, `tcp`, `log` or `notify = true`"
    } else {
        "`exec`, `http`, `tcp` or `notify = true`"
    };
    if raw.notify == Some(false) {
        p.add(&key("notify"), format!("write `notify = true`, or leave it out and set one of {allowed}"));
    }
    match kinds.as_slice() {
        [] if raw.notify != Some(false) => p.add(at, format!("a probe needs one of {allowed}")),
        [] | [_] => {}
        [a, b, ..] => p.add(at, format!("set exactly one kind of probe ({allowed}), found `{a}` and `{b}`")),
    }
    if let Some(argv) = &raw.exec {
        check_command(p, &key("exec"), argv);
        for a in argv {
            if let Err(e) = check_placeholders(a) {
                p.add(&key("exec"), e);
            }
        }
    }
    if let Some(url) = &raw.http
        && let Err(e) = check_http(url)
    {
        p.add(&key("http"), e);
    }
    if let Some(addr) = &raw.tcp
        && let Err(e) = check_tcp(addr)
    {
        p.add(&key("tcp"), e);
    }
    if let Some(re) = &raw.log {
        if !ready {
            p.add(
                &key("log"),
                "`log` is for ready probes only; a health probe uses exec, http, tcp or notify",
            );
        } else if let Err(e) = regex::Regex::new(re) {
            // The regex crate's error is several lines with a caret: keep
            // the last line, which says what is wrong.
            let why = e.to_string();
            let why = why.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("invalid").trim().to_string();
            p.add(&key("log"), format!("invalid regex {re:?}: {}", why.trim_start_matches("error: ")));
        }
    }
    if ready && raw.failures.is_some() {
        p.add(&key("failures"), "`failures` is for health probes; a ready probe fails at `start_timeout`");
    }
    if !ready && raw.start_timeout.is_some() {
        p.add(
            &key("start_timeout"),
            "`start_timeout` is for ready probes; a health probe fails after `failures` checks",
        );
    }
    if raw.failures == Some(0) {
        p.add(&key("failures"), "must be at least 1");
    }
    for (k, v) in [("interval", raw.interval), ("timeout", raw.timeout)] {
        if v.is_some_and(|d| d.0.is_zero()) {
            p.add(&key(k), "must be longer than 0s");
        }
        check_at_most(p, &key(k), v, HOUR);
    }
    if raw.start_timeout.is_some_and(|d| d.0.is_zero()) {
        p.add(&key("start_timeout"), "must be longer than 0s");
    }
    check_at_most(p, &key("start_timeout"), raw.start_timeout, DAY);
}

/// `${NAME}` placeholders in a probe string are well-formed.
fn check_placeholders(s: &str) -> Result<(), String> {
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        let after = &rest[i + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("unclosed \"${{\" in {s:?}; write ${{NAME}}"));
        };
        let name = &after[..end];
        let ok = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(format!(
                "\"${{{name}}}\" in {s:?} is not a variable name; write ${{NAME}} (letters, digits, '_')"
            ));
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

fn check_http(url: &str) -> Result<(), String> {
    let example = "such as \"http://127.0.0.1:8000/health\"";
    if url.get(..8).is_some_and(|p| p.eq_ignore_ascii_case("https://")) {
        return Err(format!("https is not supported; probe the plain HTTP port ({example})"));
    }
    let Some(rest) = url.get(..7).filter(|p| p.eq_ignore_ascii_case("http://")).map(|_| &url[7..]) else {
        return Err(format!("expected an http:// URL {example}, found {url:?}"));
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || url.chars().any(char::is_whitespace) {
        return Err(format!("expected an http:// URL with a host {example}, found {url:?}"));
    }
    check_placeholders(url)
}

fn check_tcp(addr: &str) -> Result<(), String> {
    let bad = || format!("expected HOST:PORT such as \"127.0.0.1:5432\", found {addr:?}");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.is_empty() || addr.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    check_placeholders(addr)?;
    if !port.contains("${") && !port.parse::<u16>().is_ok_and(|n| n > 0) {
        return Err(format!("port {port:?} in {addr:?} is not a number from 1 to 65535"));
    }
    Ok(())
}

/// A node of the dependency graph as the config names it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Worker,
    Job,
}

impl Kind {
    fn table(self) -> &'static str {
        match self {
            Kind::Worker => "workers",
            Kind::Job => "jobs",
        }
    }
}

/// Fills in every `depends_on`, checking names, conditions and cycles.
fn resolve_dependencies(
    p: &mut Problems,
    raw: &RawConfig,
    workers: &mut BTreeMap<String, Worker>,
    jobs: &mut BTreeMap<String, Job>,
) {
    // The names the file defines (the raw tables: resolving keeps every one).
    let names: Vec<String> = raw.workers.keys().chain(raw.jobs.keys()).cloned().collect();
    let kind_of = |n: &str| match (raw.workers.contains_key(n), raw.jobs.contains_key(n)) {
        (true, true) => Err(format!("{n:?} names both a worker and a job; rename one of them")),
        (true, false) => Ok(Kind::Worker),
        (false, true) => Ok(Kind::Job),
        (false, false) => {
            let mut msg = format!("no worker or job {n:?}");
            if let Some(near) = super::load::nearest(n, &names) {
                msg.push_str(&format!("; did you mean {near:?}?"));
            }
            Err(msg)
        }
    };
    let declared = raw
        .workers
        .iter()
        .map(|(n, w)| (Kind::Worker, n, &w.depends_on))
        .chain(raw.jobs.iter().map(|(n, j)| (Kind::Job, n, &j.depends_on)));
    let mut edges: BTreeMap<(Kind, String), Vec<(Kind, String)>> = BTreeMap::new();
    for (kind, name, deps) in declared {
        let entries: Vec<(String, &String, Option<&String>)> = match deps {
            None => continue,
            Some(RawDependsOn::Table(t)) => t.iter().map(|(n, c)| (n.clone(), n, Some(c))).collect(),
            Some(RawDependsOn::List(l)) => {
                l.iter().enumerate().map(|(i, n)| (i.to_string(), n, None)).collect()
            }
        };
        let mut resolved = BTreeMap::new();
        for (entry, dep, cond) in entries {
            let at = [kind.table(), name.as_str(), "depends_on", entry.as_str()];
            let target = match kind_of(dep) {
                Ok(k) => k,
                Err(msg) => {
                    p.add(&at, msg);
                    continue;
                }
            };
            if target == kind && dep == name {
                p.add(&at, format!("{name:?} cannot depend on itself"));
                continue;
            }
            let Some(condition) = condition_of(p, &at, target, cond) else { continue };
            if resolved.insert(dep.clone(), condition).is_some() {
                p.add(&at, format!("{dep:?} is listed twice"));
            }
            edges.entry((kind, name.clone())).or_default().push((target, dep.clone()));
        }
        match kind {
            Kind::Worker => workers.get_mut(name).map(|w| w.depends_on = resolved),
            Kind::Job => jobs.get_mut(name).map(|j| j.depends_on = resolved),
        };
    }
    for cycle in cycles(&edges) {
        let (kind, first) = &cycle[0];
        let path: Vec<&str> = cycle.iter().map(|(_, n)| n.as_str()).chain([first.as_str()]).collect();
        p.add(&[kind.table(), first, "depends_on"], format!("a cycle: {}", path.join(" -> ")));
    }
}

/// The condition an entry asks for (`None`: the default for its kind),
/// if it fits the kind of what it names.
fn condition_of(p: &mut Problems, at: &[&str], target: Kind, cond: Option<&String>) -> Option<Condition> {
    let fits = match target {
        Kind::Worker => "a worker dependency is \"started\" or \"ready\"",
        Kind::Job => "a job dependency is \"succeeded\" or \"started\"",
    };
    let c = match cond.map(String::as_str) {
        None if target == Kind::Worker => Condition::Ready,
        None => Condition::Succeeded,
        Some("started") => Condition::Started,
        Some("ready") => Condition::Ready,
        Some("succeeded") => Condition::Succeeded,
        Some(other) => {
            let mut msg = format!("unknown condition {other:?}; {fits}");
            if let Some(near) = super::load::nearest(other, &["started", "ready", "succeeded"]) {
                msg.push_str(&format!("; did you mean {near:?}?"));
            }
            p.add(at, msg);
            return None;
        }
    };
    let ok = match target {
        Kind::Worker => c != Condition::Succeeded,
        Kind::Job => c != Condition::Ready,
    };
    if !ok {
        let what = if target == Kind::Worker { "a worker" } else { "a job" };
        p.add(at, format!("\"{c}\" does not fit {what}: {fits}"));
        return None;
    }
    Some(c)
}

/// Every cycle found by a depth-first walk, each as the nodes in order
/// from where it was entered (one per back edge, so each is named once).
fn cycles<N: Ord + Clone>(edges: &BTreeMap<N, Vec<N>>) -> Vec<Vec<N>> {
    #[derive(PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    let mut marks: BTreeMap<&N, Mark> = BTreeMap::new();
    let mut found = Vec::new();
    for start in edges.keys() {
        if marks.contains_key(start) {
            continue;
        }
        // An explicit stack of (node, next edge index): no recursion depth
        // limit on a long chain.
        let mut stack: Vec<(&N, usize)> = vec![(start, 0)];
        marks.insert(start, Mark::Open);
        while let Some((node, i)) = stack.last_mut() {
            let next = edges.get(*node).and_then(|d| d.get(*i));
            *i += 1;
            match next {
                None => {
                    marks.insert(*node, Mark::Done);
                    stack.pop();
                }
                Some(dep) => match marks.get(dep) {
                    Some(Mark::Open) => {
                        let from = stack.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                        found.push(stack[from..].iter().map(|(n, _)| (*n).clone()).collect());
                    }
                    Some(Mark::Done) => {}
                    None => {
                        marks.insert(dep, Mark::Open);
                        stack.push((dep, 0));
                    }
                },
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::{Condition, ProbeKind};
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

    fn probe_http(url: &str) -> RawProbe {
        RawProbe { http: Some(url.into()), ..Default::default() }
    }

    #[test]
    fn env_files_layer_under_each_tables_env_and_identity_is_inherited() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("common.env"), "A=common\nB=common\nC=common\n").unwrap();
        std::fs::write(dir.path().join("web.env"), "B=web-file\nC=web-file\nSECRET=s3cret\n").unwrap();
        let mut raw = RawConfig {
            defaults: Some(RawSettings {
                env_file: Some(vec!["common.env".into()]),
                env: Some([("A".to_string(), "defaults-env".to_string())].into()),
                umask: Some("027".into()),
                nice: Some(5),
                limits: Some(super::super::raw::RawLimits {
                    nofile: Some(super::super::raw::RawLimit::Both(super::super::raw::LimitValue::Number(
                        100,
                    ))),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut web = worker(&["true"]);
        web.env_file = Some(vec!["web.env".into(), "-absent.env".into()]);
        web.env = Some([("C".to_string(), "web-env".to_string())].into());
        web.secret_env = Some(vec!["SECRET".into()]);
        web.nice = Some(10);
        raw.workers.insert("web".into(), web);
        raw.jobs.insert("j".into(), job("true"));
        let c = resolve(&raw, dir.path()).unwrap();
        let env = &c.workers["web"].env;
        // defaults' file < defaults.env < the worker's file < the worker's env.
        assert_eq!(env["A"], "defaults-env");
        assert_eq!(env["B"], "web-file");
        assert_eq!(env["C"], "web-env");
        assert_eq!(c.workers["web"].env_file.len(), 3);
        assert!(c.workers["web"].env_file[2].optional);
        let id = &c.workers["web"].identity;
        assert_eq!((id.umask, id.nice, id.limits["nofile"].soft), (Some(0o027), Some(10), 100));
        // Jobs inherit the identity keys and env files of [defaults] too.
        let j = &c.jobs["j"];
        assert_eq!((j.identity.nice, j.env["B"].as_str()), (Some(5), "common"));
        assert_eq!(j.env_file.len(), 1);
    }

    #[test]
    fn identity_problems_are_blamed_where_written() {
        let mut raw = RawConfig {
            defaults: Some(RawSettings { user: Some("no-such-user-drover".into()), ..Default::default() }),
            ..Default::default()
        };
        raw.workers.insert("a".into(), worker(&["true"]));
        let mut b = worker(&["true"]);
        b.umask = Some("99".into());
        b.env_file = Some(vec!["-".into()]);
        raw.workers.insert("b".into(), b);
        let errs = errors_of(&raw);
        assert!(errs["defaults.user"].starts_with("unknown user \"no-such-user-drover\""), "{errs:#?}");
        assert!(errs["workers.b.umask"].contains("octal"), "{errs:#?}");
        assert!(errs["workers.b.env_file.0"].contains("a file name"), "{errs:#?}");
        // The inherited unknown user is not reported again per worker.
        assert_eq!(errs.len(), 3, "{errs:#?}");
    }

    fn errors_of(raw: &RawConfig) -> BTreeMap<String, String> {
        resolve(raw, &base()).unwrap_err().into_iter().map(|e| (e.path.join("."), e.message)).collect()
    }

    #[test]
    fn probes_get_their_defaults_and_a_worker_replaces_the_default_whole() {
        let mut raw = RawConfig {
            defaults: Some(RawSettings {
                ready: Some(RawProbe { tcp: Some("127.0.0.1:${PORT}".into()), ..Default::default() }),
                health: Some(probe_http("http://127.0.0.1:8000/health")),
                ..Default::default()
            }),
            ..Default::default()
        };
        raw.workers.insert("a".into(), worker(&["true"]));
        let mut b = worker(&["true"]);
        b.ready = Some(RawProbe { log: Some("^listening".into()), ..Default::default() });
        raw.workers.insert("b".into(), b);
        let c = resolve(&raw, &base()).unwrap();
        let a = &c.workers["a"];
        let ready = a.ready.as_ref().unwrap();
        assert_eq!(ready.kind, ProbeKind::Tcp("127.0.0.1:${PORT}".into()));
        assert_eq!(
            (ready.interval, ready.timeout, ready.start_timeout),
            (Duration::from_secs(1), Duration::from_secs(1), Duration::from_secs(60))
        );
        let health = a.health.as_ref().unwrap();
        assert_eq!(
            (health.interval, health.timeout, health.failures),
            (Duration::from_secs(10), Duration::from_secs(2), 3)
        );
        let b = &c.workers["b"];
        assert_eq!(b.ready.as_ref().unwrap().kind, ProbeKind::Log("^listening".into()));
        assert_eq!(b.ready.as_ref().unwrap().start_timeout, Duration::from_secs(60));
        assert!(b.health.is_some(), "health still comes from defaults");
    }

    #[test]
    fn probe_rules_are_checked() {
        let mut raw = RawConfig::default();
        let cases: Vec<(&str, RawProbe, RawProbe)> = vec![
            (
                "two",
                RawProbe { exec: Some(vec!["true".into()]), tcp: Some("h:1".into()), ..Default::default() },
                RawProbe::default(),
            ),
            (
                "https",
                probe_http("https://x/health"),
                RawProbe { log: Some("x".into()), ..Default::default() },
            ),
            (
                "tcp",
                RawProbe { tcp: Some("localhost".into()), ..Default::default() },
                RawProbe { failures: Some(0), notify: Some(true), ..Default::default() },
            ),
            ("regex", RawProbe { log: Some("(".into()), ..Default::default() }, probe_http("http://h/${1X}")),
            (
                "zero",
                RawProbe {
                    notify: Some(true),
                    timeout: Some(HumanDuration::from_secs(0)),
                    ..Default::default()
                },
                RawProbe {
                    notify: Some(true),
                    interval: Some(HumanDuration::from_secs(7200)),
                    ..Default::default()
                },
            ),
        ];
        for (name, ready, health) in cases {
            let mut w = worker(&["true"]);
            w.ready = Some(ready);
            w.health = Some(health);
            raw.workers.insert(name.into(), w);
        }
        let errs = errors_of(&raw);
        let at = |k: &str| errs.get(k).unwrap_or_else(|| panic!("no problem at {k}: {errs:#?}")).clone();
        assert!(at("workers.two.ready").contains("exactly one kind"), "{}", at("workers.two.ready"));
        assert!(at("workers.two.health").contains("needs one of"));
        assert!(at("workers.https.ready.http").contains("https is not supported; probe the plain HTTP port"));
        assert!(at("workers.https.health.log").contains("ready probes only"));
        assert!(at("workers.tcp.ready.tcp").contains("HOST:PORT"));
        assert!(at("workers.tcp.health.failures").contains("at least 1"));
        assert!(at("workers.regex.ready.log").contains("invalid regex"));
        assert!(at("workers.regex.health.http").contains("not a variable name"));
        assert!(at("workers.zero.ready.timeout").contains("longer than 0s"));
        assert!(at("workers.zero.health.interval").contains("at most 1h"));
    }

    fn deps(names: &[&str]) -> Option<RawDependsOn> {
        Some(RawDependsOn::List(names.iter().map(|s| s.to_string()).collect()))
    }

    #[test]
    fn depends_on_takes_default_conditions_and_explicit_ones() {
        let mut raw = RawConfig::default();
        raw.workers.insert("db".into(), worker(&["true"]));
        let mut api = worker(&["true"]);
        api.depends_on = deps(&["db", "migrate"]);
        raw.workers.insert("api".into(), api);
        let mut web = worker(&["true"]);
        web.depends_on = Some(RawDependsOn::Table([("api".to_string(), "started".to_string())].into()));
        raw.workers.insert("web".into(), web);
        raw.jobs.insert(
            "migrate".into(),
            RawJob { command: Some(vec!["true".into()]), depends_on: deps(&["db"]), ..Default::default() },
        );
        let c = resolve(&raw, &base()).unwrap();
        assert_eq!(
            c.workers["api"].depends_on,
            BTreeMap::from([
                ("db".to_string(), Condition::Ready),
                ("migrate".to_string(), Condition::Succeeded)
            ])
        );
        assert_eq!(c.workers["web"].depends_on["api"], Condition::Started);
        assert_eq!(c.jobs["migrate"].depends_on["db"], Condition::Ready);
    }

    #[test]
    fn depends_on_errors_name_the_entry() {
        let mut raw = RawConfig::default();
        let mut api = worker(&["true"]);
        api.depends_on = deps(&["dbb", "api"]);
        raw.workers.insert("api".into(), api);
        let mut db = worker(&["true"]);
        db.depends_on = Some(RawDependsOn::Table([("api".to_string(), "succeeded".to_string())].into()));
        raw.workers.insert("db".into(), db);
        raw.jobs.insert(
            "migrate".into(),
            RawJob {
                command: Some(vec!["true".into()]),
                depends_on: Some(RawDependsOn::Table([("db".to_string(), "redy".to_string())].into())),
                ..Default::default()
            },
        );
        let errs = errors_of(&raw);
        let at = |k: &str| errs.get(k).unwrap_or_else(|| panic!("no problem at {k}: {errs:#?}")).clone();
        assert!(
            at("workers.api.depends_on.0").contains("did you mean \"db\"?"),
            "{}",
            at("workers.api.depends_on.0")
        );
        assert!(at("workers.api.depends_on.1").contains("itself"));
        assert!(at("workers.db.depends_on.api").contains("\"started\" or \"ready\""));
        assert!(at("jobs.migrate.depends_on.db").contains("did you mean \"ready\"?"));
    }

    #[test]
    fn a_cycle_is_named_with_its_path() {
        let mut raw = RawConfig::default();
        let mut api = worker(&["true"]);
        api.depends_on = deps(&["db"]);
        raw.workers.insert("api".into(), api);
        let mut db = worker(&["true"]);
        db.depends_on = deps(&["api"]);
        raw.workers.insert("db".into(), db);
        let errs = errors_of(&raw);
        assert_eq!(
            errs.get("workers.api.depends_on").map(String::as_str),
            Some("a cycle: api -> db -> api"),
            "{errs:#?}"
        );
        assert_eq!(errs.len(), 1, "{errs:#?}");
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

    fn job(cmd: &str) -> RawJob {
        RawJob { command: Some(vec![cmd.into()]), ..Default::default() }
    }

    fn problems(raw: &RawConfig) -> Vec<(String, String)> {
        resolve(raw, &base()).unwrap_err().into_iter().map(|p| (p.path.join("."), p.message)).collect()
    }

    fn message_at(errs: &[(String, String)], path: &str) -> String {
        errs.iter()
            .find(|(p, _)| p == path)
            .unwrap_or_else(|| panic!("no problem at {path}: {errs:#?}"))
            .1
            .clone()
    }

    #[test]
    fn probes_get_role_defaults_and_a_workers_own_replaces_the_default_whole() {
        let mut raw = RawConfig {
            defaults: Some(RawSettings {
                ready: Some(RawProbe {
                    tcp: Some("127.0.0.1:5432".into()),
                    interval: Some(HumanDuration::from_millis(500)),
                    ..Default::default()
                }),
                health: Some(RawProbe { notify: Some(true), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        };
        raw.workers.insert("db".into(), worker(&["true"]));
        let mut web = worker(&["true"]);
        web.ready =
            Some(RawProbe { http: Some("http://127.0.0.1:${PORT}/health".into()), ..Default::default() });
        raw.workers.insert("web".into(), web);
        let c = resolve(&raw, &base()).unwrap();
        let db = c.workers["db"].ready.clone().unwrap();
        assert_eq!(db.kind, ProbeKind::Tcp("127.0.0.1:5432".into()));
        assert_eq!(db.interval, Duration::from_millis(500));
        assert_eq!((db.timeout, db.start_timeout), (Duration::from_secs(1), Duration::from_secs(60)));
        // The worker's own probe keeps none of the default's settings.
        let web = c.workers["web"].ready.clone().unwrap();
        assert_eq!(web.kind, ProbeKind::Http("http://127.0.0.1:${PORT}/health".into()));
        assert_eq!(web.interval, Duration::from_secs(1));
        let h = c.workers["web"].health.clone().unwrap();
        assert_eq!(h.kind, ProbeKind::Notify);
        assert_eq!((h.interval, h.timeout, h.failures), (Duration::from_secs(10), Duration::from_secs(2), 3));
        assert_eq!(c.defaults.health, Some(h));
    }

    #[test]
    fn probe_rules_are_reported_by_key() {
        let mut raw = RawConfig::default();
        let mut add = |name: &str, ready: Option<RawProbe>, health: Option<RawProbe>| {
            let mut w = worker(&["true"]);
            w.ready = ready;
            w.health = health;
            raw.workers.insert(name.into(), w);
        };
        let rp = RawProbe::default;
        add("none", Some(rp()), None);
        add("two", Some(RawProbe { http: Some("http://a/".into()), tcp: Some("a:1".into()), ..rp() }), None);
        add("https", Some(RawProbe { http: Some("https://a/".into()), ..rp() }), None);
        add("nohttp", Some(RawProbe { http: Some("localhost:80".into()), ..rp() }), None);
        add("brace", Some(RawProbe { http: Some("http://a:${PORT/".into()), ..rp() }), None);
        add("tcp", Some(RawProbe { tcp: Some("localhost".into()), ..rp() }), None);
        add("port", Some(RawProbe { tcp: Some("localhost:70000".into()), ..rp() }), None);
        add("regex", Some(RawProbe { log: Some("ready (".into()), ..rp() }), None);
        add("exec", Some(RawProbe { exec: Some(vec![]), ..rp() }), None);
        add(
            "hlog",
            None,
            Some(RawProbe {
                log: Some("x".into()),
                start_timeout: Some(HumanDuration::from_secs(1)),
                ..rp()
            }),
        );
        add(
            "zero",
            None,
            Some(RawProbe {
                notify: Some(true),
                failures: Some(0),
                timeout: Some(HumanDuration::from_secs(0)),
                interval: Some(HumanDuration::from_secs(7200)),
                ..rp()
            }),
        );
        add(
            "rfail",
            Some(RawProbe {
                notify: Some(true),
                failures: Some(2),
                start_timeout: Some(HumanDuration::from_secs(200_000)),
                ..rp()
            }),
            None,
        );
        let errs = problems(&raw);
        assert!(
            message_at(&errs, "workers.none.ready").contains("needs one of `exec`, `http`, `tcp`, `log`")
        );
        assert!(message_at(&errs, "workers.two.ready").contains("found `http` and `tcp`"));
        assert!(
            message_at(&errs, "workers.https.ready.http")
                .contains("https is not supported; probe the plain HTTP port")
        );
        assert!(message_at(&errs, "workers.nohttp.ready.http").contains("expected an http:// URL"));
        assert!(message_at(&errs, "workers.brace.ready.http").contains("unclosed \"${\""));
        assert!(message_at(&errs, "workers.tcp.ready.tcp").contains("expected HOST:PORT"));
        assert!(message_at(&errs, "workers.port.ready.tcp").contains("not a number from 1 to 65535"));
        assert!(message_at(&errs, "workers.regex.ready.log").contains("invalid regex \"ready (\""));
        assert!(message_at(&errs, "workers.exec.ready.exec").contains("must not be empty"));
        assert!(message_at(&errs, "workers.hlog.health.log").contains("for ready probes only"));
        assert!(message_at(&errs, "workers.hlog.health.start_timeout").contains("is for ready probes"));
        assert!(message_at(&errs, "workers.zero.health.failures").contains("at least 1"));
        assert!(message_at(&errs, "workers.zero.health.timeout").contains("longer than 0s"));
        assert!(message_at(&errs, "workers.zero.health.interval").contains("at most 1h"));
        assert!(message_at(&errs, "workers.rfail.ready.failures").contains("is for health probes"));
        assert!(message_at(&errs, "workers.rfail.ready.start_timeout").contains("at most 1day"));
    }

    #[test]
    fn depends_on_takes_a_table_or_a_list_with_default_conditions() {
        let mut raw = RawConfig::default();
        raw.workers.insert("db".into(), worker(&["true"]));
        raw.jobs.insert("migrate".into(), job("true"));
        let mut api = worker(&["true"]);
        api.depends_on = Some(RawDependsOn::List(vec!["db".into(), "migrate".into()]));
        raw.workers.insert("api".into(), api);
        let mut report = job("true");
        report.depends_on = Some(RawDependsOn::Table(
            [("api".into(), "started".into()), ("migrate".into(), "started".into())].into(),
        ));
        raw.jobs.insert("report".into(), report);
        let c = resolve(&raw, &base()).unwrap();
        assert_eq!(
            c.workers["api"].depends_on,
            [("db".to_string(), Condition::Ready), ("migrate".to_string(), Condition::Succeeded)].into()
        );
        assert_eq!(
            c.jobs["report"].depends_on,
            [("api".to_string(), Condition::Started), ("migrate".to_string(), Condition::Started)].into()
        );
        assert!(c.workers["db"].depends_on.is_empty());
    }

    #[test]
    fn depends_on_names_conditions_and_self_are_checked() {
        let mut raw = RawConfig::default();
        raw.workers.insert("db".into(), worker(&["true"]));
        raw.jobs.insert("migrate".into(), job("true"));
        let mut api = worker(&["true"]);
        api.depends_on = Some(RawDependsOn::Table(
            [
                ("dbb".into(), "ready".into()),
                ("migrate".into(), "ready".into()),
                ("db".into(), "redy".into()),
                ("api".into(), "started".into()),
            ]
            .into(),
        ));
        raw.workers.insert("api".into(), api);
        let mut j = job("true");
        j.depends_on = Some(RawDependsOn::Table([("db".into(), "succeeded".into())].into()));
        raw.jobs.insert("j".into(), j);
        let mut k = job("true");
        k.depends_on = Some(RawDependsOn::List(vec!["db".into(), "db".into()]));
        raw.jobs.insert("k".into(), k);
        let errs = problems(&raw);
        assert_eq!(
            message_at(&errs, "workers.api.depends_on.dbb"),
            "no worker or job \"dbb\"; did you mean \"db\"?"
        );
        assert_eq!(
            message_at(&errs, "workers.api.depends_on.migrate"),
            "\"ready\" does not fit a job: a job dependency is \"succeeded\" or \"started\""
        );
        assert!(message_at(&errs, "workers.api.depends_on.db").contains("did you mean \"ready\"?"));
        assert!(message_at(&errs, "workers.api.depends_on.api").contains("cannot depend on itself"));
        assert_eq!(
            message_at(&errs, "jobs.j.depends_on.db"),
            "\"succeeded\" does not fit a worker: a worker dependency is \"started\" or \"ready\""
        );
        assert!(message_at(&errs, "jobs.k.depends_on.1").contains("listed twice"));
    }

    #[test]
    fn cycles_are_named_with_their_path() {
        let mut raw = RawConfig::default();
        let mut dep = |name: &str, on: &[&str]| {
            let mut w = worker(&["true"]);
            w.depends_on = Some(RawDependsOn::List(on.iter().map(|s| s.to_string()).collect()));
            raw.workers.insert(name.into(), w);
        };
        dep("api", &["db"]);
        dep("db", &["api"]);
        dep("a", &["b"]);
        dep("b", &["c"]);
        dep("c", &["a"]);
        dep("ok", &["api"]);
        let errs = problems(&raw);
        assert_eq!(message_at(&errs, "workers.api.depends_on"), "a cycle: api -> db -> api");
        assert_eq!(message_at(&errs, "workers.a.depends_on"), "a cycle: a -> b -> c -> a");
        assert_eq!(errs.len(), 2, "{errs:#?}");
    }

    #[test]
    fn a_long_chain_is_no_cycle_and_does_not_overflow() {
        let mut raw = RawConfig::default();
        for i in 0..5000 {
            let mut w = worker(&["true"]);
            if i > 0 {
                w.depends_on = Some(RawDependsOn::List(vec![format!("w{}", i - 1)]));
            }
            raw.workers.insert(format!("w{i}"), w);
        }
        assert!(resolve(&raw, &base()).is_ok());
    }
}
