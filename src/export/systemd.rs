//! daemon.toml as systemd units: a worker is a template service
//! `P-NAME@.service` whose instances `P-NAME.target` wants, a job a
//! `Type=oneshot` service with a `.timer` (none when only `drover trigger`
//! starts it), a flow one oneshot with an `ExecStart=` per step; `P.target`
//! wants every worker target and every timer. Values are written with
//! systemd's quoting and escaping rules (see [`exec_word`], [`env_word`],
//! [`env_file_value`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use super::cron::cron_to_calendars;
use super::{Exported, built_in};
use crate::config::model::{
    Condition, Config, Identity, Job, OnOverlap, Probe, ProbeKind, RestartPolicy, SpawnMode, Trigger, Worker,
};
use crate::config::sockets::Address;

/// The oldest systemd the output is checked on (`systemd-analyze verify`,
/// Debian 12) and the default of `--systemd-version`.
pub const OLDEST_VERIFIED: u32 = 252;
/// `RestartSteps=` and `RestartMaxDelaySec=` appeared in systemd 254.
pub const RESTART_STEPS_SINCE: u32 = 254;
/// Where the units go unless told otherwise; `EnvironmentFile=` points here.
pub const DEFAULT_UNIT_DIR: &str = "/etc/systemd/system";
/// drover's built-in `retain`, which a systemd journal has no use for.
const DEFAULT_RETAIN: u32 = 50;

pub struct Options {
    /// Every unit is named `PREFIX-NAME…`, and the whole config `PREFIX.target`.
    pub prefix: String,
    /// The oldest systemd the units must load on.
    pub systemd_version: u32,
    /// Where the config's directory is on the target machine; paths under
    /// it map there. None: the same place as here.
    pub workdir: Option<PathBuf>,
    /// The config file's directory, which `dir`s are relative to.
    pub base_dir: PathBuf,
    /// Where the units will be installed: the env files of secrets sit
    /// beside them and `EnvironmentFile=` names them there.
    pub unit_dir: PathBuf,
    /// Write the env files with the secret values (only into a directory,
    /// never to stdout).
    pub with_secrets: bool,
}

/// Every unit, sorted by file name.
pub fn export(config: &Config, o: &Options) -> Exported {
    let mut out = Exported::default();
    if let Err(e) = check_options(o) {
        out.fail(e.0, e.1);
        return out;
    }
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    let mut wants: Vec<String> = Vec::new();
    let deps = Dependencies::of(config, o);
    for (name, w) in &config.workers {
        let key = format!("workers.{name}");
        let unit = unit_name(o, name);
        let env_file = secret_file(o, name, &w.env, &w.secret_env, &mut files, &mut out);
        let text = worker_service(o, name, &key, w, env_file.as_deref(), &deps, &mut out);
        files.insert(format!("{unit}@.service"), text);
        files.extend(socket_units(o, name, w, &mut out));
        files.insert(format!("{unit}.target"), worker_target(o, name, w));
        wants.push(format!("{unit}.target"));
    }
    for (name, j) in &config.jobs {
        let key = format!("jobs.{name}");
        let unit = unit_name(o, name);
        let env_file = secret_file(o, name, &j.env, &j.secret_env, &mut files, &mut out);
        let text = job_service(o, name, &key, j, env_file.as_deref(), &deps, &mut out);
        files.insert(format!("{unit}.service"), text);
        if let Some(timer) = job_timer(o, name, &key, j, &mut out) {
            files.insert(format!("{unit}.timer"), timer);
            wants.push(format!("{unit}.timer"));
        }
    }
    files.insert(format!("{}.target", o.prefix), top_target(o, &wants));
    out.files = files.into_iter().collect();
    out
}

/// The longest `--prefix`: `P-NAME@N.service` with a 63-character name
/// and a 10-digit instance stays within systemd's 255 characters.
const MAX_PREFIX: usize = 100;

/// The flags systemd would reject, by flag.
fn check_options(o: &Options) -> Result<(), (&'static str, String)> {
    let p = &o.prefix;
    if p.is_empty()
        || p.len() > MAX_PREFIX
        || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b":_.-".contains(&b))
    {
        return Err((
            "--prefix",
            format!(
                "{p:?} is not a unit name prefix: write 1 to {MAX_PREFIX} letters, digits, `:`, `_`, `.` or `-`"
            ),
        ));
    }
    for (flag, path) in [("--unit-dir", Some(&o.unit_dir)), ("--workdir", o.workdir.as_ref())] {
        if let Some(path) = path
            && !path.is_absolute()
        {
            return Err((flag, format!("{} is relative: systemd takes only absolute paths", path.display())));
        }
    }
    Ok(())
}

fn unit_name(o: &Options, name: &str) -> String {
    format!("{}-{name}", o.prefix)
}

/// A unit file under construction: comments, then `[Section]`s of
/// `Key=value` lines, in the order written.
#[derive(Default)]
struct UnitFile(String);

impl UnitFile {
    fn comment(&mut self, line: &str) {
        for l in line.lines() {
            let _ = writeln!(self.0, "# {l}");
        }
    }

    fn section(&mut self, name: &str) {
        if !self.0.is_empty() {
            self.0.push('\n');
        }
        let _ = writeln!(self.0, "[{name}]");
    }

    fn set(&mut self, key: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{key}={value}");
    }
}

/// `%` starts a specifier in almost every unit-file value.
fn no_specifiers(s: &str) -> String {
    s.replace('%', "%%")
}

/// A time span as systemd reads it: whole seconds, else milliseconds,
/// else microseconds (rounded up: a grace or timeout never gets shorter).
fn span(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.subsec_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}us", d.as_micros() + u128::from(d.subsec_nanos() % 1000 > 0))
    }
}

/// Characters a word may hold without quotes: nothing systemd unquotes,
/// unescapes, splits at or expands.
fn is_plain(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_./:,+=@-".contains(&b))
}

/// One word in double quotes with C escapes, as systemd's
/// `extract_first_word(EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE)` reads it back;
/// `%` doubled for specifiers, and `$` doubled where variables expand.
fn quoted(s: &str, dollar: bool) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\t' => q.push_str("\\t"),
            '\r' => q.push_str("\\r"),
            '%' => q.push_str("%%"),
            '$' if dollar => q.push_str("$$"),
            c if c.is_control() && (c as u32) < 0x80 => {
                let _ = write!(q, "\\x{:02x}", c as u32);
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// A word of an `ExecStart=` line: exactly this argument reaches the
/// program (no splitting, no `$VAR` expansion, no `;` separator).
fn exec_word(s: &str) -> String {
    if is_plain(s) { s.to_string() } else { quoted(s, true) }
}

/// An `Environment=` assignment: `$` has no meaning there.
fn env_word(k: &str, v: &str) -> String {
    let a = format!("{k}={v}");
    if is_plain(&a) { a } else { quoted(&a, false) }
}

/// A value in an `EnvironmentFile=`: double quotes, inside which systemd's
/// env-file parser unescapes `\"`, `\\`, `` \` `` and `\$` and keeps a newline.
fn env_file_value(v: &str) -> String {
    let mut q = String::from("\"");
    for c in v.chars() {
        if matches!(c, '"' | '\\' | '`' | '$') {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// systemd ignores an assignment whose name is not a shell name.
fn env_name_ok(k: &str) -> bool {
    !k.is_empty()
        && !k.as_bytes()[0].is_ascii_digit()
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A key of an env table as it would be written in the file.
fn env_key(key: &str, k: &str) -> String {
    if k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        format!("{key}.env.{k}")
    } else {
        format!("{key}.env.{k:?}")
    }
}

/// A path on the target machine: under the config's directory, the same
/// place under `--workdir`; anywhere else, unchanged.
fn on_target(o: &Options, path: &Path) -> PathBuf {
    let mapped = match (&o.workdir, path.strip_prefix(&o.base_dir)) {
        (Some(root), Ok(rel)) => root.join(rel),
        _ => path.to_path_buf(),
    };
    // systemd takes only normalized paths: no `.` or `..` components.
    // `..` is taken lexically, as the mapping under --workdir is.
    let mut p = PathBuf::new();
    for c in mapped.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                p.pop();
            }
            c => p.push(c),
        }
    }
    p
}

/// A path as it can stand in a unit file (escape it for its directive),
/// or why it cannot (a line break would end the value, a trailing `\`
/// join the next line).
fn path_text(p: &Path) -> Result<String, String> {
    let s = p.to_str().ok_or_else(|| format!("{} is not UTF-8", p.display()))?;
    if s.chars().any(char::is_control) || s.ends_with('\\') {
        return Err(format!("{s:?} cannot be written in a unit file (a control character or a trailing \\)"));
    }
    Ok(s.to_string())
}

/// A path as the whole value of a directive (`WorkingDirectory=`).
fn path_value(p: &Path) -> Result<String, String> {
    path_text(p).map(|s| no_specifiers(&s))
}

/// The program as `ExecStart=` runs it: an absolute path, or a bare name
/// that systemd finds in its fixed search path (/usr/local/sbin,
/// /usr/local/bin, /usr/sbin, /usr/bin). A relative path is taken from
/// `dir`, as drover's spawn there does.
fn program(o: &Options, dir: &Path, p: &str) -> Result<String, String> {
    if p.contains('/') {
        return path_text(&on_target(o, &dir.join(p))).map(|s| exec_word(&s));
    }
    // After unquoting, systemd reads these as the prefixes `-@:+!`.
    if p.is_empty() || p.starts_with(['-', '@', ':', '+', '!']) {
        return Err(format!("program {p:?} would be read as an ExecStart= prefix; give its path"));
    }
    Ok(exec_word(p))
}

fn exec_line(o: &Options, dir: &Path, argv: &[String], before: &[String]) -> Result<String, String> {
    let (first, rest) = argv.split_first().ok_or("the command is empty")?;
    let mut words = Vec::new();
    let program = program(o, dir, first)?;
    if before.is_empty() {
        words.push(program);
    } else {
        words.extend(before.iter().map(|w| exec_word(w)));
        if first.contains('=') {
            return Err(format!("program {first:?} has a `=`, which env(1) would take for a variable"));
        }
        words.push(program);
    }
    words.extend(rest.iter().map(|a| exec_word(a)));
    Ok(words.join(" "))
}

/// The `Environment=` lines of a worker or job: drover's own variables,
/// then `env` without its secret keys (those go to the env file).
fn environment(
    f: &mut UnitFile,
    key: &str,
    own: &[(&str, String)],
    env: &BTreeMap<String, String>,
    secret: &std::collections::BTreeSet<String>,
    out: &mut Exported,
) {
    for (k, v) in own {
        // drover's values: `%i` there is meant as the specifier.
        let a = format!("{k}={v}");
        f.set("Environment", if is_plain(&a.replace("%i", "")) { a } else { format!("\"{a}\"") });
    }
    for (k, v) in env {
        if !env_name_ok(k) {
            out.lose(
                env_key(key, k),
                "systemd accepts only letters, digits and _ (not first) in a variable name",
            );
        } else if v.contains('\0') {
            out.lose(env_key(key, k), "a NUL byte cannot be in an environment value");
        } else if !secret.contains(k) {
            f.set("Environment", env_word(k, v));
        }
    }
}

/// The 0600 env file of a worker's or job's secret keys, added to `files`
/// when it is to be written; its path as `EnvironmentFile=` names it.
fn secret_file(
    o: &Options,
    name: &str,
    env: &BTreeMap<String, String>,
    secret: &std::collections::BTreeSet<String>,
    files: &mut BTreeMap<String, String>,
    out: &mut Exported,
) -> Option<String> {
    let keys: Vec<(&String, &String)> =
        secret.iter().filter(|k| env_name_ok(k)).filter_map(|k| Some((k, env.get(k)?))).collect();
    if keys.is_empty() {
        return None;
    }
    let file = format!("{}.env", unit_name(o, name));
    if o.with_secrets {
        let mut text = format!("# secret_env of {name}: keep this file mode 0600, owned by root\n");
        for (k, v) in &keys {
            let _ = writeln!(text, "{k}={}", env_file_value(v));
        }
        files.insert(file.clone(), text);
    } else {
        let names: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
        out.notes.push(format!(
            "{file} (the secret values of {}) is written only with -o DIR, mode 0600",
            names.join(", ")
        ));
    }
    match path_value(&o.unit_dir.join(&file)) {
        Ok(p) => Some(p),
        Err(e) => {
            out.fail("--unit-dir", e);
            None
        }
    }
}

/// What each worker and job a dependent names becomes: the unit to order
/// after, and whether the dependency's readiness is visible to systemd.
struct Dependencies<'a> {
    config: &'a Config,
    prefix: &'a str,
    /// Jobs some worker depends on: they run once, then stay active.
    needed_jobs: std::collections::BTreeSet<&'a str>,
}

impl<'a> Dependencies<'a> {
    fn of(config: &'a Config, o: &'a Options) -> Self {
        let needed_jobs = config
            .workers
            .values()
            .flat_map(|w| w.depends_on.keys())
            .filter(|d| config.jobs.contains_key(*d))
            .map(String::as_str)
            .collect();
        Dependencies { config, prefix: &o.prefix, needed_jobs }
    }

    /// A job that a worker needs and that nothing else starts: once it has
    /// succeeded it stays active, so an instance's restart does not run it
    /// again (drover runs it once, at start).
    fn stays_active(&self, job: &str, j: &Job) -> bool {
        self.needed_jobs.contains(job) && matches!(j.trigger, Trigger::Manual)
    }

    /// `After=` and `Requires=`/`Wants=`/`Requisite=` lines for `deps`.
    fn write(
        &self,
        f: &mut UnitFile,
        key: &str,
        dependent_is_job: bool,
        deps: &BTreeMap<String, Condition>,
        out: &mut Exported,
    ) {
        let mut lines: Vec<(&str, String)> = Vec::new();
        for (dep, cond) in deps {
            let dkey = format!("{key}.depends_on.{dep}");
            if let Some(w) = self.config.workers.get(dep) {
                let unit = format!("{}-{dep}.target", self.prefix);
                let notify = matches!(w.ready.as_ref().map(|p| &p.kind), Some(ProbeKind::Notify));
                match cond {
                    Condition::Ready if w.ready.is_some() && !notify => out.lose(
                        dkey,
                        format!(
                            "{dep}'s ready probe has no systemd equivalent: this waits only until it started"
                        ),
                    ),
                    Condition::Started if notify => out.lose(
                        dkey,
                        format!(
                            "{dep} is Type=notify: this waits until it is ready (READY=1), not only started"
                        ),
                    ),
                    _ => {}
                }
                // A job skips its run while the worker is down (Requisite=
                // fails the start); a worker starts its dependency.
                let how = if dependent_is_job {
                    "Requisite"
                } else if *cond == Condition::Started {
                    "Wants"
                } else {
                    "Requires"
                };
                lines.push((how, unit.clone()));
                lines.push(("After", unit));
            } else if let Some(j) = self.config.jobs.get(dep) {
                let unit = format!("{}-{dep}.service", self.prefix);
                if dependent_is_job {
                    out.lose(
                        dkey,
                        format!(
                            "systemd keeps no record of {dep}'s last run for another oneshot to check; only the order (After=) is kept"
                        ),
                    );
                } else {
                    if *cond == Condition::Started {
                        out.lose(
                            dkey.clone(),
                            format!("a oneshot is done only once it ended: this waits until {dep} finished"),
                        );
                    }
                    if !self.stays_active(dep, j) {
                        out.lose(
                            dkey,
                            format!(
                                "{dep} also runs on its schedule, so it cannot stay active: it runs again each time an instance (re)starts"
                            ),
                        );
                    }
                    lines
                        .push((if *cond == Condition::Started { "Wants" } else { "Requires" }, unit.clone()));
                }
                lines.push(("After", unit));
            }
        }
        lines.sort();
        lines.dedup();
        for (k, v) in lines {
            f.set(k, v);
        }
    }
}

/// The identity keys and rlimits, each a directive of the same meaning:
/// systemd applies them as drover does, between fork and exec. Nothing is
/// lost: `User=` sets HOME, USER and LOGNAME as drover's `user` does.
fn identity_and_limits(f: &mut UnitFile, id: &Identity) {
    if let Some(u) = &id.user {
        f.set("User", u);
    }
    if let Some(g) = &id.group {
        f.set("Group", g);
    }
    if let Some(m) = id.umask {
        f.set("UMask", format!("{m:04o}"));
    }
    if let Some(n) = id.nice {
        f.set("Nice", n);
    }
    if let Some(n) = id.oom_score_adj {
        f.set("OOMScoreAdjust", n);
    }
    if id.no_new_privs {
        f.set("NoNewPrivileges", "yes");
    }
    // drover's resource names are the RLIMIT_ suffixes, as systemd's
    // Limit*= are; values are in the rlimit's own units (bytes, seconds,
    // microseconds for rttime), which is how systemd reads a bare number.
    let value =
        |v: u64| if v == crate::os::identity::INFINITY { "infinity".to_string() } else { v.to_string() };
    for (name, l) in &id.limits {
        // LimitNICE= takes 0..40 and no "infinity": the ceiling is
        // 20 - value, and above 40 (nice -20) a larger value allows nothing more.
        let (soft, hard) = if name == "nice" {
            (l.soft.min(40).to_string(), l.hard.min(40).to_string())
        } else {
            (value(l.soft), value(l.hard))
        };
        f.set(&format!("Limit{}", name.to_uppercase()), format!("{soft}:{hard}"));
    }
}

/// max_memory: `MemoryMax=` (the cgroup's hard limit: the kernel's OOM
/// kill inside the unit, and Restart= brings it back).
fn memory_max(f: &mut UnitFile, max_memory: Option<u64>) {
    if let Some(b) = max_memory {
        f.set("MemoryMax", b);
    }
}

fn stop_settings(f: &mut UnitFile, signal: crate::config::types::Signal, grace: Duration) {
    // drover signals the whole process group, then SIGKILLs it.
    f.set("KillMode", "control-group");
    f.set("KillSignal", signal);
    f.set("TimeoutStopSec", span(grace));
}

/// The restart delays systemd applies, for the first `n` restarts.
fn systemd_delays(w: &Worker, steps: Option<u32>, n: u32) -> Vec<Duration> {
    let (initial, max) = (w.backoff.initial.0, w.backoff.max.0);
    (1..=n)
        .map(|k| match steps {
            Some(s) if k > s => max,
            Some(s) if k > 1 => {
                let ratio = max.as_secs_f64() / initial.as_secs_f64();
                Duration::try_from_secs_f64(
                    initial.as_secs_f64() * ratio.powf(f64::from(k - 1) / f64::from(s)),
                )
                .unwrap_or(max)
            }
            _ => initial,
        })
        .collect()
}

/// `RestartSteps=` for a backoff, when it grows: the number of restarts
/// drover's delay takes to reach `max`, so systemd reaches it at the same
/// restart (growing by `(max/initial)^(1/steps)` each time).
fn restart_steps(w: &Worker) -> Option<u32> {
    let (initial, max, m) = (w.backoff.initial.0, w.backoff.max.0, w.backoff.multiplier);
    if initial.is_zero() || max <= initial || m <= 1.0 {
        return None;
    }
    let exact = (max.as_secs_f64() / initial.as_secs_f64()).ln() / m.ln();
    // A hair over an integer is float noise, not another step.
    let steps = (exact - 1e-9).ceil().max(1.0);
    Some(if steps >= f64::from(u32::MAX) { u32::MAX } else { steps as u32 })
}

fn restart_settings(f: &mut UnitFile, o: &Options, key: &str, w: &Worker, out: &mut Exported) {
    f.set(
        "Restart",
        match w.restart {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "no",
        },
    );
    if w.restart == RestartPolicy::OnFailure {
        // drover counts only exit 0 as success; systemd also counts these
        // signals as clean and would not restart after them.
        f.set("RestartForceExitStatus", "SIGHUP SIGINT SIGTERM SIGPIPE");
    }
    let defaults = built_in();
    f.set("RestartSec", span(w.backoff.initial.0));
    let steps = restart_steps(w);
    let growing = steps.is_some();
    if growing && o.systemd_version >= RESTART_STEPS_SINCE {
        if let Some(s) = steps {
            f.set("RestartSteps", s);
            f.set("RestartMaxDelaySec", span(w.backoff.max.0));
        }
        if w.backoff != defaults.backoff {
            let factor = (w.backoff.max.0.as_secs_f64() / w.backoff.initial.0.as_secs_f64())
                .powf(1.0 / f64::from(steps.unwrap_or(1)));
            out.lose(
                format!("{key}.backoff"),
                format!(
                    "systemd grows the delay {factor:.3}× per restart (RestartSteps={}), drover {}×, and never resets it after min_uptime (only a manual start does)",
                    steps.unwrap_or(0),
                    w.backoff.multiplier
                ),
            );
        }
    } else if growing && w.backoff != defaults.backoff {
        out.lose(
            format!("{key}.backoff"),
            format!(
                "systemd {} restarts after a constant RestartSec= ({}); growing it to max needs --systemd-version {RESTART_STEPS_SINCE}",
                o.systemd_version, w.backoff.initial
            ),
        );
    }
    if !w.permanent_exit_codes.is_empty() {
        let codes: Vec<String> = w.permanent_exit_codes.iter().map(i32::to_string).collect();
        f.set("RestartPreventExitStatus", codes.join(" "));
    }
}

/// crash_loop: `max_failures` rapid exits park the instance. systemd
/// refuses the start after `StartLimitBurst=` starts within
/// `StartLimitIntervalSec=`: the window those rapid runs and their restart
/// delays fit in. (`[Unit]` holds these since systemd 230.)
fn start_limit(f: &mut UnitFile, o: &Options, w: &Worker) {
    let steps = restart_steps(w).filter(|_| o.systemd_version >= RESTART_STEPS_SINCE);
    let n = w.crash_loop.max_failures.max(1);
    let window = systemd_delays(w, steps, n)
        .into_iter()
        .fold(Duration::ZERO, |acc, d| acc.saturating_add(d).saturating_add(w.crash_loop.min_uptime.0));
    f.set("StartLimitBurst", n);
    f.set("StartLimitIntervalSec", span(window));
}

/// Where and with what a worker's or job's processes run.
#[expect(clippy::too_many_arguments, reason = "each is one of the unit's inputs")]
fn run_context(
    f: &mut UnitFile,
    o: &Options,
    key: &str,
    dir: &Path,
    own: &[(&str, String)],
    (env, secret): (&BTreeMap<String, String>, &std::collections::BTreeSet<String>),
    env_file: Option<&str>,
    out: &mut Exported,
) {
    match path_value(&on_target(o, dir)) {
        Ok(p) => f.set("WorkingDirectory", p),
        Err(e) => out.fail(format!("{key}.dir"), e),
    }
    environment(f, key, own, env, secret, out);
    if let Some(p) = env_file {
        f.set("EnvironmentFile", p);
    }
}

fn probe_settings(f: &mut UnitFile, key: &str, w: &Worker, out: &mut Exported) {
    let notify_ready = matches!(w.ready.as_ref().map(|p| &p.kind), Some(ProbeKind::Notify));
    let notify_health = matches!(w.health.as_ref().map(|p| &p.kind), Some(ProbeKind::Notify));
    match &w.ready {
        Some(Probe { kind: ProbeKind::Notify, start_timeout, .. }) => {
            f.set("TimeoutStartSec", span(*start_timeout));
        }
        Some(p) => out.lose(
            format!("{key}.ready"),
            format!(
                "systemd has no {} readiness probe: the instance counts as ready once started (only notify maps, to Type=notify)",
                kind_name(&p.kind)
            ),
        ),
        None => {}
    }
    match &w.health {
        Some(Probe { kind: ProbeKind::Notify, interval, failures, .. }) => {
            // drover counts each interval without WATCHDOG=1 as a failure.
            f.set("WatchdogSec", span(interval.saturating_mul((*failures).max(1))));
            f.set("WatchdogSignal", w.stop_signal);
        }
        Some(p) => out.lose(
            format!("{key}.health"),
            format!("systemd has no {} health probe (only notify maps, to WatchdogSec=)", kind_name(&p.kind)),
        ),
        None => {}
    }
    if notify_ready || notify_health {
        // drover takes the messages of the instance's whole process group.
        f.set("NotifyAccess", "all");
    }
}

fn kind_name(k: &ProbeKind) -> &'static str {
    match k {
        ProbeKind::Exec(_) => "exec",
        ProbeKind::Http(_) => "http",
        ProbeKind::Tcp(_) => "tcp",
        ProbeKind::Log(_) => "log",
        ProbeKind::Notify => "notify",
    }
}

fn worker_service(
    o: &Options,
    name: &str,
    key: &str,
    w: &Worker,
    env_file: Option<&str>,
    deps: &Dependencies<'_>,
    out: &mut Exported,
) -> String {
    let unit = unit_name(o, name);
    if w.spawn_mode == SpawnMode::Worktree {
        out.lose(format!("{key}.spawn_mode"), "git worktrees per instance have no systemd equivalent");
    }
    let mut f = UnitFile::default();
    f.comment(&format!(
        "{key}: instance N is {unit}@N.service, N = 0 to {} (its DROVER_INSTANCE); {unit}.target starts them all",
        w.capacity.saturating_sub(1)
    ));
    f.section("Unit");
    f.set("Description", format!("drover worker {name}, instance %i"));
    f.set("PartOf", format!("{unit}.target"));
    deps.write(&mut f, key, false, &w.depends_on, out);
    start_limit(&mut f, o, w);
    f.section("Service");
    let notify = matches!(w.ready.as_ref().map(|p| &p.kind), Some(ProbeKind::Notify));
    f.set("Type", if notify { "notify" } else { "exec" });
    match exec_line(o, &w.dir, &w.command, &[]) {
        Ok(line) => f.set("ExecStart", line),
        Err(e) => out.fail(format!("{key}.command"), e),
    }
    let own = [
        ("DROVER_WORKER", name.to_string()),
        ("DROVER_INSTANCE", "%i".to_string()),
        ("DROVER_CAPACITY", w.capacity.to_string()),
    ];
    run_context(&mut f, o, key, &w.dir, &own, (&w.env, &w.secret_env), env_file, out);
    restart_settings(&mut f, o, key, w, out);
    probe_settings(&mut f, key, w, out);
    stop_settings(&mut f, w.stop_signal, w.stop_grace.0);
    identity_and_limits(&mut f, &w.identity);
    if !w.sockets.is_empty() {
        // Every instance inherits the socket unit's descriptors (and, through
        // Sockets=, wants it and starts after it): systemd holds them across
        // restarts, as drover does, with the same LISTEN_* protocol.
        if let [_] = w.sockets[..] {
            f.set("Sockets", format!("{unit}.socket"));
        } else {
            let all: Vec<String> = (0..w.sockets.len()).map(|i| format!("{unit}-{i}.socket")).collect();
            f.set("Sockets", all.join(" "));
            out.lose(
                format!("{key}.sockets"),
                "systemd passes the descriptors of several socket units in its own order: \
                 find them by LISTEN_FDNAMES, not by position",
            );
        }
    }
    memory_max(&mut f, w.max_memory.map(|b| b.0));
    f.0
}

/// The socket units of a worker: `P-NAME.socket` for one socket,
/// `P-NAME-I.socket` for socket I of several (FileDescriptorName= names
/// every descriptor of a unit alike, so one unit a socket).
fn socket_units(o: &Options, name: &str, w: &Worker, out: &mut Exported) -> Vec<(String, String)> {
    let unit = unit_name(o, name);
    let one = w.sockets.len() == 1;
    w.sockets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let file = if one { format!("{unit}.socket") } else { format!("{unit}-{i}.socket") };
            let mut f = UnitFile::default();
            f.comment(&format!(
                "workers.{name}.sockets[{i}]: held by systemd across restarts, passed to every instance"
            ));
            f.section("Unit");
            f.set("Description", format!("drover worker {name}, socket {}", s.name));
            f.set("PartOf", format!("{unit}.target"));
            f.section("Socket");
            // A unix path under the config's directory moves under --workdir.
            match &s.address {
                Address::Tcp(a) => f.set("ListenStream", a),
                Address::Unix(p) => match path_value(&on_target(o, p)) {
                    Ok(p) => f.set("ListenStream", p),
                    Err(e) => out.fail(format!("workers.{name}.sockets[{i}]"), e),
                },
            }
            f.set("FileDescriptorName", &s.name);
            // systemd binds with SO_REUSEADDR, as drover does; drover makes unix
            // sockets 0600 unless `mode` says otherwise (systemd's default is 0666).
            if matches!(s.address, Address::Unix(_)) {
                f.set("SocketMode", format!("{:04o}", s.mode.unwrap_or(0o600)));
            }
            // Traffic before the target starts the instances starts the first.
            f.set("Service", format!("{unit}@0.service"));
            (file, f.0)
        })
        .collect()
}

fn worker_target(o: &Options, name: &str, w: &Worker) -> String {
    let unit = unit_name(o, name);
    let instances: Vec<String> = (0..w.capacity).map(|i| format!("{unit}@{i}.service")).collect();
    let mut f = UnitFile::default();
    f.comment(&format!("workers.{name}: wants its {} instance(s), active once they all are", w.capacity));
    f.section("Unit");
    f.set("Description", format!("drover worker {name}"));
    f.set("PartOf", format!("{}.target", o.prefix));
    for i in &instances {
        f.set("Wants", i);
    }
    // Ordered after its instances, a dependent's After= on this target
    // waits until every instance is up (ready, for Type=notify).
    for i in &instances {
        f.set("After", i);
    }
    f.0
}

fn job_service(
    o: &Options,
    name: &str,
    key: &str,
    j: &Job,
    env_file: Option<&str>,
    deps: &Dependencies<'_>,
    out: &mut Exported,
) -> String {
    let unit = unit_name(o, name);
    for (i, s) in j.steps.iter().enumerate() {
        if s.approve {
            out.lose(
                format!("{key}.steps[{i}].approve"),
                "systemd runs every step without waiting for approval",
            );
        }
    }
    match j.on_overlap {
        OnOverlap::Skip => {}
        OnOverlap::Queue => out.lose(
            format!("{key}.on_overlap"),
            "a tick while the oneshot runs is dropped (skip); systemd queues no second run",
        ),
        OnOverlap::Replace => out.lose(
            format!("{key}.on_overlap"),
            "a tick while the oneshot runs is dropped (skip); systemd does not cancel the running one",
        ),
    }
    if j.capacity > 1 {
        out.lose(format!("{key}.capacity"), "a oneshot service runs one run at a time");
    }
    if j.retain != DEFAULT_RETAIN {
        out.lose(
            format!("{key}.retain"),
            format!("systemd keeps no run ledger; the runs' output is in the journal (journalctl -u {unit}.service)"),
        );
    }
    let stays = deps.stays_active(name, j);
    let mut f = UnitFile::default();
    match &j.trigger {
        Trigger::Manual => f.comment(&format!("{key}: run only by hand: systemctl start {unit}.service")),
        _ => f.comment(&format!("{key}: run by {unit}.timer, or by hand: systemctl start {unit}.service")),
    }
    if stays {
        f.comment(&format!(
            "workers need it: once it succeeded it stays active; run it again with systemctl restart {unit}.service"
        ));
    }
    f.section("Unit");
    f.set("Description", format!("drover job {name}"));
    // Stopping P.target stops a run (a stop of an inactive unit is nothing).
    f.set("PartOf", format!("{}.target", o.prefix));
    deps.write(&mut f, key, true, &j.depends_on, out);
    f.section("Service");
    f.set("Type", "oneshot");
    if stays {
        f.set("RemainAfterExit", "yes");
    }
    for (i, s) in j.steps.iter().enumerate() {
        // A flow's steps share the unit's environment: env(1) sets each
        // one's DROVER_STEP, as drover does.
        let before: Vec<String> =
            if j.flow { vec!["/usr/bin/env".into(), format!("DROVER_STEP={}", s.name)] } else { Vec::new() };
        match exec_line(o, &j.dir, &s.command, &before) {
            Ok(line) => f.set("ExecStart", line),
            Err(e) => out.fail(step_key(key, j, i), e),
        }
    }
    let mut own = vec![("DROVER_JOB", name.to_string())];
    if !j.flow {
        own.extend(j.steps.first().map(|s| ("DROVER_STEP", s.name.clone())));
    }
    run_context(&mut f, o, key, &j.dir, &own, (&j.env, &j.secret_env), env_file, out);
    if let Some(t) = j.timeout {
        // The whole run, every step: a oneshot's start.
        f.set("TimeoutStartSec", span(t.0));
    }
    stop_settings(&mut f, j.stop_signal, j.stop_grace.0);
    identity_and_limits(&mut f, &j.identity);
    f.0
}

fn step_key(key: &str, j: &Job, i: usize) -> String {
    if j.flow { format!("{key}.steps[{i}].command") } else { format!("{key}.command") }
}

fn job_timer(o: &Options, name: &str, key: &str, j: &Job, out: &mut Exported) -> Option<String> {
    let unit = unit_name(o, name);
    let mut f = UnitFile::default();
    let mut timer = UnitFile::default();
    match &j.trigger {
        Trigger::Manual => return None,
        Trigger::Schedule { cron, timezone } => {
            f.comment(&format!(
                "{key}: schedule {cron:?}{}",
                timezone.as_deref().map(|z| format!(" in {z}")).unwrap_or_else(|| " in local time".into())
            ));
            match cron_to_calendars(cron, timezone.as_deref()) {
                Ok(cals) => cals.iter().for_each(|c| timer.set("OnCalendar", no_specifiers(c))),
                Err(e) => {
                    out.fail(format!("{key}.schedule"), format!("{cron:?} has no OnCalendar= form: {e}"))
                }
            }
            timer.set("Persistent", if j.catch_up { "true" } else { "false" });
        }
        Trigger::Every(d) => {
            f.comment(&format!("{key}: every {d}"));
            // The first run one interval after the timer starts, then one
            // interval after each run's start, as drover ticks.
            timer.set("OnActiveSec", span(d.0));
            timer.set("OnUnitActiveSec", span(d.0));
            if j.catch_up {
                out.lose(
                    format!("{key}.catch_up"),
                    "systemd remembers no missed ticks of an interval timer (Persistent= is for OnCalendar=)",
                );
            }
        }
    }
    if !j.jitter.0.is_zero() {
        // drover's jitter is a fixed offset per job; so is FixedRandomDelay=.
        timer.set("RandomizedDelaySec", span(j.jitter.0));
        timer.set("FixedRandomDelay", "true");
    }
    // systemd's default accuracy is a minute; drover fires on time.
    timer.set("AccuracySec", "100ms");
    f.section("Unit");
    f.set("Description", format!("drover job {name}: its schedule"));
    f.set("PartOf", format!("{}.target", o.prefix));
    f.section("Timer");
    f.0.push_str(&timer.0);
    f.set("Unit", format!("{unit}.service"));
    Some(f.0)
}

fn top_target(o: &Options, wants: &[String]) -> String {
    let mut f = UnitFile::default();
    f.comment(&format!(
        "every worker and schedule of this config: systemctl enable --now {}.target",
        o.prefix
    ));
    f.section("Unit");
    f.set("Description", format!("drover workers and schedules ({})", o.prefix));
    for w in wants {
        f.set("Wants", w);
    }
    f.section("Install");
    f.set("WantedBy", "multi-user.target");
    f.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, load};

    fn load_config(toml: &str) -> (Config, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.toml");
        std::fs::write(&path, toml).unwrap();
        let loaded = load(&path, &Overrides::new(Vec::<(String, String)>::new(), &[]).unwrap()).unwrap();
        (loaded.config, path)
    }

    fn export_with(toml: &str, version: u32, with_secrets: bool) -> (BTreeMap<String, String>, Exported) {
        let (config, path) = load_config(toml);
        let o = Options {
            prefix: "acme".into(),
            systemd_version: version,
            workdir: Some("/srv/app".into()),
            base_dir: crate::config::load::base_dir(&path),
            unit_dir: DEFAULT_UNIT_DIR.into(),
            with_secrets,
        };
        let e = export(&config, &o);
        (e.files.iter().cloned().collect(), e)
    }

    fn export_text(toml: &str) -> (BTreeMap<String, String>, Exported) {
        export_with(toml, OLDEST_VERIFIED, true)
    }

    /// The values of `key` in `section` of a unit file.
    fn values(unit: &str, section: &str, key: &str) -> Vec<String> {
        let mut current = "";
        let mut v = Vec::new();
        for l in unit.lines() {
            if let Some(s) = l.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                current = s;
            } else if current == section
                && let Some(val) = l.strip_prefix(key).and_then(|r| r.strip_prefix('='))
            {
                v.push(val.to_string());
            }
        }
        v
    }

    fn value(unit: &str, section: &str, key: &str) -> String {
        let v = values(unit, section, key);
        assert_eq!(v.len(), 1, "{key} in [{section}]: {v:?}\n{unit}");
        v[0].clone()
    }

    /// systemd's reading of a value holding quoted words with C escapes
    /// (`extract_first_word` with UNQUOTE|CUNESCAPE), then `$$` → `$`
    /// where variables expand; `%%` → `%` first.
    fn systemd_words(line: &str, dollar: bool) -> Vec<String> {
        let line = line.replace("%%", "%");
        let mut words = Vec::new();
        let mut chars = line.chars().peekable();
        loop {
            while chars.peek() == Some(&' ') {
                chars.next();
            }
            if chars.peek().is_none() {
                return words;
            }
            let mut w = String::new();
            let mut in_quotes = false;
            while let Some(c) = chars.next() {
                match c {
                    '"' => in_quotes = !in_quotes,
                    ' ' if !in_quotes => break,
                    '\\' => match chars.next().unwrap() {
                        'n' => w.push('\n'),
                        't' => w.push('\t'),
                        'r' => w.push('\r'),
                        'x' => {
                            let h: String = [chars.next().unwrap(), chars.next().unwrap()].iter().collect();
                            w.push(char::from(u8::from_str_radix(&h, 16).unwrap()));
                        }
                        c => w.push(c),
                    },
                    c => w.push(c),
                }
            }
            words.push(if dollar { w.replace("$$", "$") } else { w });
        }
    }

    #[test]
    fn commands_and_env_survive_systemd_quoting() {
        let argv = [
            "/bin/sh",
            "-c",
            "echo \"$GREETING\" 100% ${X}; exit 3",
            "",
            ";",
            "tab\there\nnewline \\ back'slash",
            "bell\u{7}",
            "ünï",
        ];
        let line: Vec<String> = argv.iter().map(|a| exec_word(a)).collect();
        let line = line.join(" ");
        assert!(!line.contains('\n') && !line.contains('\u{7}'), "{line}");
        assert_eq!(systemd_words(&line, true), argv);
        assert!(line.contains("$$GREETING") && line.contains("100%%"), "no expansion: {line}");
        assert!(line.contains(" \";\" "), "a lone ; is quoted, else it separates commands: {line}");
        assert_eq!(exec_word("--port=8000"), "--port=8000", "plain words stay plain");

        let a = env_word("GREETING", "hello \"world\" $HOME 50%");
        assert_eq!(systemd_words(&a, false), ["GREETING=hello \"world\" $HOME 50%"]);
        assert_eq!(env_word("PORT", "8000"), "PORT=8000");
        assert_eq!(env_file_value("a\"b\\c$d`e\nf"), "\"a\\\"b\\\\c\\$d\\`e\nf\"");
    }

    #[test]
    fn a_worker_round_trips_as_a_template_service_and_its_target() {
        let (files, e) = export_text(
            "[workers.api_v2]\ncommand = [\"./bin/api\", \"--port\", \"8000\"]\ncapacity = 3\nstop_grace = \"2500ms\"\n\
             stop_signal = \"SIGINT\"\nrestart = \"on-failure\"\npermanent_exit_codes = [78, 3]\n\
             backoff = { initial = \"2s\", max = \"2m\", multiplier = 2.0 }\ncrash_loop = { min_uptime = \"10s\", max_failures = 5 }\n\
             env = { PORT = \"8000\", TOKEN = \"t0k3n\", MSG = \"a b\" }\nsecret_env = [\"TOKEN\"]\n",
        );
        assert!(e.lossy.is_empty() && e.errors.is_empty(), "{:?} {:?}", e.lossy, e.errors);
        let s = &files["acme-api_v2@.service"];
        assert_eq!(value(s, "Service", "Type"), "exec");
        assert_eq!(value(s, "Service", "ExecStart"), "/srv/app/bin/api --port 8000");
        assert_eq!(value(s, "Service", "WorkingDirectory"), "/srv/app");
        assert_eq!(value(s, "Service", "Restart"), "on-failure");
        assert_eq!(value(s, "Service", "RestartForceExitStatus"), "SIGHUP SIGINT SIGTERM SIGPIPE");
        assert_eq!(value(s, "Service", "RestartSec"), "2s");
        assert!(values(s, "Service", "RestartSteps").is_empty(), "only with systemd 254");
        assert_eq!(value(s, "Service", "RestartPreventExitStatus"), "78 3");
        assert_eq!(value(s, "Service", "KillSignal"), "SIGINT");
        assert_eq!(value(s, "Service", "KillMode"), "control-group");
        assert_eq!(value(s, "Service", "TimeoutStopSec"), "2500ms");
        assert_eq!(value(s, "Unit", "StartLimitBurst"), "5");
        // Five rapid runs (each under 10s) and their 2s delays fit in 60s.
        assert_eq!(value(s, "Unit", "StartLimitIntervalSec"), "60s");
        let env = values(s, "Service", "Environment");
        assert_eq!(
            env,
            ["DROVER_WORKER=api_v2", "DROVER_INSTANCE=%i", "DROVER_CAPACITY=3", "\"MSG=a b\"", "PORT=8000"]
        );
        assert!(!s.contains("t0k3n"), "a secret is never in the unit");
        assert_eq!(value(s, "Service", "EnvironmentFile"), "/etc/systemd/system/acme-api_v2.env");
        assert_eq!(files["acme-api_v2.env"].lines().nth(1), Some("TOKEN=\"t0k3n\""));
        let t = &files["acme-api_v2.target"];
        let want = ["acme-api_v2@0.service", "acme-api_v2@1.service", "acme-api_v2@2.service"];
        assert_eq!(values(t, "Unit", "Wants"), want);
        assert_eq!(values(t, "Unit", "After"), want);
        assert_eq!(values(&files["acme.target"], "Unit", "Wants"), ["acme-api_v2.target"]);
        assert_eq!(value(&files["acme.target"], "Install", "WantedBy"), "multi-user.target");

        // Without a directory to write to, the values stay out of the output.
        let (files, e) = export_with(
            "[workers.w]\ncommand = [\"x\"]\nenv = { TOKEN = \"t0k3n\" }\nsecret_env = [\"TOKEN\"]\n",
            OLDEST_VERIFIED,
            false,
        );
        assert!(!files.contains_key("acme-w.env") && files.values().all(|f| !f.contains("t0k3n")));
        assert!(e.notes.iter().any(|n| n.contains("acme-w.env") && n.contains("TOKEN")), "{:?}", e.notes);
    }

    #[test]
    fn the_backoff_grows_as_drovers_from_systemd_254_on() {
        let toml = "[workers.w]\ncommand = [\"x\"]\nbackoff = { initial = \"1s\", max = \"32s\", multiplier = 2.0 }\n\
                    crash_loop = { min_uptime = \"5s\", max_failures = 3 }\n";
        let (files, e) = export_with(toml, 254, true);
        let s = &files["acme-w@.service"];
        assert_eq!(
            (
                value(s, "Service", "RestartSec"),
                value(s, "Service", "RestartSteps"),
                value(s, "Service", "RestartMaxDelaySec")
            ),
            ("1s".into(), "5".into(), "32s".into())
        );
        // 1s, 2s, 4s, … 32s: exactly drover's sequence; only the reset differs.
        let w = &load_config(toml).0.workers["w"];
        let got: Vec<u64> = systemd_delays(w, Some(5), 7).iter().map(|d| d.as_millis() as u64).collect();
        assert_eq!(got, [1000, 2000, 4000, 8000, 16000, 32000, 32000]);
        assert_eq!(value(s, "Unit", "StartLimitIntervalSec"), "22s", "3 × 5s + 1s + 2s + 4s");
        assert_eq!(e.lossy.iter().map(|l| l.key.as_str()).collect::<Vec<_>>(), ["workers.w.backoff"]);
        assert!(e.lossy[0].why.contains("2.000×") && e.lossy[0].why.contains("min_uptime"), "{}", e.lossy[0]);

        let (files, e) = export_with(toml, OLDEST_VERIFIED, true);
        assert!(values(&files["acme-w@.service"], "Service", "RestartSteps").is_empty());
        assert!(e.lossy[0].why.contains("--systemd-version 254"), "{}", e.lossy[0]);
        // The built-in backoff was not asked for: no loss at either version.
        for v in [OLDEST_VERIFIED, 254] {
            let (files, e) = export_with("[workers.w]\ncommand = [\"x\"]\n", v, true);
            assert!(e.lossy.is_empty(), "{v}: {:?}", e.lossy);
            assert_eq!(
                values(&files["acme-w@.service"], "Service", "RestartSteps").len(),
                usize::from(v >= 254)
            );
        }
    }

    #[test]
    fn jobs_become_oneshots_with_timers_from_schedule_zone_and_interval() {
        let (files, e) = export_text(
            "[jobs.nightly]\ncommand = [\"x\"]\nschedule = \"0 3 * * *\"\ntimezone = \"Europe/Paris\"\ntimeout = \"10m\"\n\
             catch_up = true\njitter = \"30s\"\nstop_signal = \"SIGUSR1\"\nstop_grace = \"3s\"\n\
             [jobs.often]\ncommand = [\"x\"]\nevery = \"90s\"\n\
             [jobs.either]\ncommand = [\"x\"]\nschedule = \"0 9 1 * MON\"\n\
             [jobs.manual]\ncommand = [\"x\"]\n",
        );
        assert!(e.lossy.is_empty() && e.errors.is_empty(), "{:?} {:?}", e.lossy, e.errors);
        let s = &files["acme-nightly.service"];
        assert_eq!(value(s, "Service", "Type"), "oneshot");
        assert_eq!(value(s, "Unit", "PartOf"), "acme.target");
        assert_eq!(value(s, "Service", "TimeoutStartSec"), "600s");
        assert_eq!(value(s, "Service", "KillSignal"), "SIGUSR1");
        assert_eq!(value(s, "Service", "TimeoutStopSec"), "3s");
        assert_eq!(values(s, "Service", "Environment"), ["DROVER_JOB=nightly", "DROVER_STEP=main"]);
        let t = &files["acme-nightly.timer"];
        assert_eq!(value(t, "Timer", "OnCalendar"), "*-*-* 03:00:00 Europe/Paris");
        assert_eq!(value(t, "Timer", "Persistent"), "true");
        assert_eq!(value(t, "Timer", "RandomizedDelaySec"), "30s");
        assert_eq!(value(t, "Timer", "Unit"), "acme-nightly.service");
        let t = &files["acme-often.timer"];
        assert_eq!(
            (value(t, "Timer", "OnActiveSec"), value(t, "Timer", "OnUnitActiveSec")),
            ("90s".into(), "90s".into())
        );
        assert!(values(t, "Timer", "OnCalendar").is_empty());
        // cron fires when either day field matches: two calendars.
        assert_eq!(
            values(&files["acme-either.timer"], "Timer", "OnCalendar"),
            ["*-*-01 09:00:00", "Mon *-*-* 09:00:00"]
        );
        assert!(!files.contains_key("acme-manual.timer"), "run only by hand");
        assert!(files["acme-manual.service"].contains("systemctl start acme-manual.service"));
        let top = values(&files["acme.target"], "Unit", "Wants");
        assert_eq!(top, ["acme-either.timer", "acme-nightly.timer", "acme-often.timer"]);
    }

    #[test]
    fn a_flow_runs_its_steps_in_order_and_losses_are_named() {
        let (files, e) = export_text(
            "[jobs.release]\non_overlap = \"queue\"\nevery = \"10s\"\ncatch_up = true\nretain = 7\n\
             [[jobs.release.steps]]\nname = \"build\"\ncommand = [\"make\", \"all\"]\n\
             [[jobs.release.steps]]\nname = \"test\"\ncommand = [\"/bin/sh\", \"-c\", \"echo $DROVER_STEP\"]\n\
             [[jobs.release.steps]]\nname = \"ship\"\ncommand = [\"s\"]\napprove = true\n\
             [workers.w]\ncommand = [\"true\"]\nspawn_mode = \"worktree\"\nenv = { \"A.B\" = \"x\" }\n\
             ready = { http = \"http://127.0.0.1:8000/\" }\nhealth = { tcp = \"127.0.0.1:8000\" }\n",
        );
        let s = &files["acme-release.service"];
        assert_eq!(
            values(s, "Service", "ExecStart"),
            [
                "/usr/bin/env DROVER_STEP=build make all",
                "/usr/bin/env DROVER_STEP=test /bin/sh -c \"echo $$DROVER_STEP\"",
                "/usr/bin/env DROVER_STEP=ship s",
            ]
        );
        assert_eq!(values(s, "Service", "Environment"), ["DROVER_JOB=release"]);
        let keys: Vec<&str> = e.lossy.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "workers.w.spawn_mode",
                "workers.w.env.\"A.B\"",
                "workers.w.ready",
                "workers.w.health",
                "jobs.release.steps[2].approve",
                "jobs.release.on_overlap",
                "jobs.release.retain",
                "jobs.release.catch_up",
            ]
        );
        assert!(!files["acme-w@.service"].contains("A.B"));
    }

    #[test]
    fn notify_probes_and_dependencies_map_to_their_directives() {
        let (files, e) = export_text(
            "[workers.db]\ncommand = [\"db\"]\nready = { notify = true, start_timeout = \"45s\" }\n\
             health = { notify = true, interval = \"10s\", failures = 3 }\n\
             [workers.api]\ncommand = [\"api\"]\ndepends_on = { db = \"ready\", migrate = \"succeeded\" }\n\
             [workers.side]\ncommand = [\"side\"]\ndepends_on = { api = \"started\" }\n\
             [jobs.migrate]\ncommand = [\"m\"]\n\
             [jobs.report]\ncommand = [\"r\"]\nevery = \"1h\"\ndepends_on = { db = \"ready\" }\n",
        );
        assert!(e.lossy.is_empty() && e.errors.is_empty(), "{:?} {:?}", e.lossy, e.errors);
        let db = &files["acme-db@.service"];
        assert_eq!(value(db, "Service", "Type"), "notify");
        assert_eq!(value(db, "Service", "TimeoutStartSec"), "45s");
        assert_eq!(value(db, "Service", "WatchdogSec"), "30s");
        assert_eq!(value(db, "Service", "NotifyAccess"), "all");
        let api = &files["acme-api@.service"];
        assert_eq!(values(api, "Unit", "Requires"), ["acme-db.target", "acme-migrate.service"]);
        assert_eq!(values(api, "Unit", "After"), ["acme-db.target", "acme-migrate.service"]);
        assert_eq!(values(&files["acme-side@.service"], "Unit", "Wants"), ["acme-api.target"]);
        // A job's run is skipped while its worker is down: it never starts it.
        let report = &files["acme-report.service"];
        assert_eq!(values(report, "Unit", "Requisite"), ["acme-db.target"]);
        // migrate runs once for the workers, and stays done.
        assert_eq!(value(&files["acme-migrate.service"], "Service", "RemainAfterExit"), "yes");

        let (_, e) = export_text(
            "[workers.db]\ncommand = [\"db\"]\nready = { tcp = \"127.0.0.1:5432\" }\n\
             [workers.api]\ncommand = [\"api\"]\ndepends_on = { db = \"ready\", tick = \"started\" }\n\
             [jobs.tick]\ncommand = [\"t\"]\nevery = \"1m\"\n[jobs.r]\ncommand = [\"r\"]\ndepends_on = [\"tick\"]\n",
        );
        let keys: Vec<&str> = e.lossy.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "workers.api.depends_on.db",
                "workers.api.depends_on.tick",
                "workers.api.depends_on.tick",
                "workers.db.ready",
                "jobs.r.depends_on.tick",
            ]
        );
    }

    #[test]
    fn paths_are_normalized_and_mapped_under_the_workdir() {
        // systemd refuses a WorkingDirectory= with `..` in it.
        let (files, e) = export_text(
            "[workers.w]\ncommand = [\"../bin/w x\"]\ndir = \"./.\"\n[jobs.j]\ncommand = [\"/opt/j\"]\ndir = \"..\"\n",
        );
        assert!(e.errors.is_empty(), "{:?}", e.errors);
        let w = &files["acme-w@.service"];
        assert_eq!(value(w, "Service", "WorkingDirectory"), "/srv/app");
        assert_eq!(value(w, "Service", "ExecStart"), "\"/srv/bin/w x\"");
        let j = &files["acme-j.service"];
        assert_eq!(value(j, "Service", "WorkingDirectory"), "/srv");
        assert_eq!(value(j, "Service", "ExecStart"), "/opt/j");
        // A program systemd would read as a prefix is refused, by key.
        let (_, e) = export_text("[workers.w]\ncommand = [\"-x\"]\n");
        assert_eq!(e.errors.iter().map(|l| l.key.as_str()).collect::<Vec<_>>(), ["workers.w.command"]);
    }

    #[test]
    fn flags_systemd_would_reject_are_named() {
        let (config, path) = load_config("[workers.w]\ncommand = [\"x\"]\n");
        let o = |prefix: &str, unit_dir: &str, workdir: Option<&str>| Options {
            prefix: prefix.into(),
            systemd_version: OLDEST_VERIFIED,
            workdir: workdir.map(PathBuf::from),
            base_dir: crate::config::load::base_dir(&path),
            unit_dir: unit_dir.into(),
            with_secrets: false,
        };
        for (opts, flag) in [
            (o("my app", "/etc/systemd/system", None), "--prefix"),
            (o("", "/etc/systemd/system", None), "--prefix"),
            (o("a/b", "/etc/systemd/system", None), "--prefix"),
            (o(&"p".repeat(MAX_PREFIX + 1), "/etc/systemd/system", None), "--prefix"),
            (o("ok", "units", None), "--unit-dir"),
            (o("ok", "/etc/systemd/system", Some("srv/app")), "--workdir"),
        ] {
            let e = export(&config, &opts);
            assert_eq!(e.errors.iter().map(|l| l.key.as_str()).collect::<Vec<_>>(), [flag]);
            assert!(e.files.is_empty());
        }
        assert!(export(&config, &o("team.app-1:x", "/etc/systemd/system", Some("/srv"))).errors.is_empty());
    }

    #[test]
    fn the_same_config_gives_the_same_bytes() {
        let toml = "[workers.b]\ncommand = [\"b\"]\n[workers.a]\ncommand = [\"a\"]\ncapacity = 2\n[jobs.j]\ncommand = [\"j\"]\nevery = \"1m\"\n";
        let (a, _) = export_text(toml);
        let (b, _) = export_text(toml);
        assert_eq!(a, b);
        let names: Vec<&String> = a.keys().collect();
        assert_eq!(
            names,
            [
                "acme-a.target",
                "acme-a@.service",
                "acme-b.target",
                "acme-b@.service",
                "acme-j.service",
                "acme-j.timer",
                "acme.target"
            ]
        );
    }
}
