//! Commands that talk to a running supervisor over its socket. None of
//! them ever starts a supervisor; `status` alone falls back to the state
//! file when none runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::exit;
use crate::config::Overrides;
use crate::config::load::{read_text, state_dir_in, state_dir_of};
use crate::supervisor::control::{ClientError, decode_response, request, request_line, send};
use crate::supervisor::protocol::{Request, Response, StatusReport};
use crate::supervisor::runtime::{lock_held, read_state, recorded_supervisor_alive, wait_unlocked};

pub struct Ctx<'a> {
    pub config: &'a Path,
    pub overrides: &'a Overrides,
}

impl Ctx<'_> {
    pub(super) fn state_dir(&self) -> PathBuf {
        state_dir_of(self.config, self.overrides)
    }

    /// Whether the config file is not there at all.
    fn config_missing(&self) -> bool {
        std::fs::symlink_metadata(self.config).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    }

    /// Says that no supervisor answers at `state_dir` and, when the config
    /// file is missing too, that the wrong file may have been named.
    pub(super) fn no_supervisor(&self, state_dir: &Path) -> u8 {
        eprintln!("drover: no supervisor is running (state_dir {})", state_dir.display());
        if self.config_missing() {
            eprintln!(
                "drover: and {} does not exist: name the config with -c FILE or DROVER_CONFIG",
                self.config.display()
            );
        }
        exit::NO_SUPERVISOR
    }
}

const TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));

fn failed(e: ClientError) -> u8 {
    eprintln!("drover: {e}");
    exit::FAILED
}

/// Sends `req`; an error answer or a failure to talk is printed here and
/// turned into the exit code. `Ok(None)`: no supervisor answers.
pub(super) fn ask(dir: &Path, req: &Request) -> Result<Option<Response>, u8> {
    match ask_line(dir, req)? {
        Some(line) => answer(&line).map(Some),
        None => Ok(None),
    }
}

/// An answer's line read: an error answer is printed and turned into the
/// exit code.
fn answer(line: &str) -> Result<Response, u8> {
    match decode_response(line) {
        Ok(Response::Error { message }) => {
            eprintln!("drover: {message}");
            Err(exit::FAILED)
        }
        Ok(resp) => Ok(resp),
        Err(e) => Err(failed(e)),
    }
}

/// As [`ask`], the answer's line as it came: the caller reads it.
fn ask_line(dir: &Path, req: &Request) -> Result<Option<String>, u8> {
    match request_line(dir, req, TIMEOUT) {
        Ok(Some(line)) => Ok(Some(line)),
        Ok(None) => {
            eprintln!("drover: the supervisor closed the connection without answering");
            Err(exit::FAILED)
        }
        Err(ClientError::NoSupervisor) => Ok(None),
        Err(e) => Err(failed(e)),
    }
}

/// What a `pretty` status request came to.
enum Pretty {
    /// The report, copied to stdout: the exit code.
    Printed(u8),
    NoSupervisor,
    /// A reply line instead (an error, or a supervisor older than
    /// `pretty` refusing it): the plain request says which, and prints it.
    AskPlainly,
}

/// Asks for the report already indented and copies it to stdout as it
/// comes, never holding it whole: the client neither parses nor indents.
fn pretty_status(dir: &Path, name: Option<String>) -> Pretty {
    use std::io::BufRead as _;
    // A few pages at a time, reused: a report of a hundred instances is
    // 46 KB, and every new page a short-lived client touches is a fault.
    let mut reader = match send(dir, &Request::Status { name, pretty: true }, TIMEOUT) {
        Ok(r) => std::io::BufReader::with_capacity(16 * 1024, r.into_inner()),
        Err(ClientError::NoSupervisor) => return Pretty::NoSupervisor,
        Err(e) => return Pretty::Printed(failed(e)),
    };
    match reader.fill_buf() {
        Ok(head) if head.starts_with(Response::TAG) => Pretty::AskPlainly,
        Ok([]) => {
            eprintln!("drover: the supervisor closed the connection without answering");
            Pretty::Printed(exit::FAILED)
        }
        Ok(_) => Pretty::Printed(copy_report(&mut reader)),
        Err(e) => Pretty::Printed(failed(ClientError::Io(e))),
    }
}

/// Copies an indented report from `reader` to stdout up to the end of the
/// connection; one that does not end as a report does (`}` and a newline)
/// was cut short, and that is an error after what was printed.
fn copy_report(reader: &mut impl std::io::BufRead) -> u8 {
    use std::io::Write as _;
    use std::os::fd::AsFd as _;
    // Not through std's stdout, which is line-buffered: each piece would
    // go out as two writes, up to its last newline and then the rest.
    let mut out = match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => {
            eprintln!("drover: cannot write the output: {e}");
            return exit::FAILED;
        }
    };
    let mut tail = [0u8; 2];
    loop {
        let chunk = match reader.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return failed(ClientError::Io(e)),
        };
        let Some(&last) = chunk.last() else { break };
        tail = [if chunk.len() > 1 { chunk[chunk.len() - 2] } else { tail[1] }, last];
        if let Err(e) = out.write_all(chunk) {
            eprintln!("drover: cannot write the output: {e}");
            return exit::FAILED;
        }
        let n = chunk.len();
        reader.consume(n);
    }
    if tail != *b"}\n" {
        eprintln!("drover: the supervisor's answer was cut short");
        return exit::FAILED;
    }
    exit::OK
}

pub(super) fn unexpected(resp: &Response) -> u8 {
    eprintln!("drover: unexpected answer: {resp:?}");
    exit::FAILED
}

/// reload, unpark NAME, runs cancel, kill: one request, one message.
pub fn simple(ctx: &Ctx, req: Request) -> u8 {
    let dir = ctx.state_dir();
    match ask(&dir, &req) {
        Ok(Some(Response::Ok { message })) => {
            println!("{message}");
            exit::OK
        }
        Ok(Some(other)) => unexpected(&other),
        Ok(None) => ctx.no_supervisor(&dir),
        Err(code) => code,
    }
}

pub fn stop(ctx: &Ctx) -> u8 {
    let dir = ctx.state_dir();
    let d = dir.clone();
    let answer = super::controls::with_stop_progress(&dir, move || request(&d, &Request::Stop {}, None));
    match answer
        .unwrap_or_else(|| Err(ClientError::Io(std::io::Error::other("the stop request ended unanswered"))))
    {
        Ok(Some(Response::Error { message })) => {
            eprintln!("drover: {message}");
            exit::FAILED
        }
        Ok(_) => {
            // The answer comes as the supervisor finishes; its lock goes
            // with its last breath.
            wait_unlocked(&dir);
            println!("stopped");
            exit::OK
        }
        Err(ClientError::NoSupervisor) => ctx.no_supervisor(&dir),
        Err(e) => failed(e),
    }
}

pub fn status(ctx: &Ctx, json: bool, name: Option<String>) -> u8 {
    let dir = ctx.state_dir();
    let pretty = if json { pretty_status(&dir, name.clone()) } else { Pretty::AskPlainly };
    let answer = match pretty {
        Pretty::Printed(code) => return code,
        Pretty::NoSupervisor => Ok(None),
        Pretty::AskPlainly => ask(&dir, &Request::Status { name: name.clone(), pretty: false }),
    };
    let (report, code) = match answer {
        Ok(Some(Response::Status(r))) => (*r, exit::OK),
        Ok(Some(other)) => return unexpected(&other),
        Ok(None) if ctx.config_missing() => {
            // Not "stopped": nothing says a supervisor ever ran for this
            // file, and the likelier mistake is where drover looked.
            eprintln!(
                "drover: {}: no such file, and no supervisor answers at state_dir {}; \
                 name the config with -c FILE or DROVER_CONFIG",
                ctx.config.display(),
                dir.display()
            );
            return exit::FAILED;
        }
        Ok(None) => (offline_report(&dir, name.as_deref()), exit::NO_SUPERVISOR),
        Err(code) => return code,
    };
    if json {
        super::print_json(&report);
    } else {
        print!("{}", render_status(&report, &dir));
    }
    code
}

/// The report when no supervisor answers: from the state file, marked
/// stopped (it stopped cleanly, or never ran) or stale (it died). A stale
/// report's workers and instances are `unknown`: what the dead supervisor
/// last recorded is kept, but nobody watches those processes any more.
fn offline_report(state_dir: &Path, name: Option<&str>) -> StatusReport {
    let Some(mut r) = read_state(state_dir) else {
        let mut r = StatusReport::default();
        r.supervisor.state = "stopped".into();
        return r;
    };
    let was_up = r.supervisor.state != "stopped";
    // A zombie keeps its pid and start time but no longer holds the lock.
    let dead = !recorded_supervisor_alive(&r) || !lock_held(state_dir);
    if was_up && dead {
        mark_stale(&mut r);
    } else {
        r.supervisor.state = "stopped".into();
    }
    if let Some(n) = name {
        r.workers.retain(|w| w.name == n);
    }
    r
}

/// What a state file left by a dead supervisor can honestly say.
fn mark_stale(r: &mut StatusReport) {
    r.supervisor.state = "stale".into();
    for w in &mut r.workers {
        w.state = "unknown".into();
        for i in &mut w.instances {
            if i.state != "stopped" {
                i.error = Some(format!("last recorded {}; the supervisor died", i.state));
                i.state = "unknown".into();
            }
        }
    }
}

fn since(rfc: &str) -> String {
    humantime::parse_rfc3339_weak(rfc)
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
        .unwrap_or_else(|| "-".into())
}

/// CPU time over time since start, as a percentage of one core: the
/// average over the instance's life, not the current load.
fn cpu_percent(cpu_seconds: f64, started_at: &str) -> String {
    let up = humantime::parse_rfc3339_weak(started_at)
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    if up <= 0.0 { "-".into() } else { format!("{:.1}", 100.0 * cpu_seconds / up) }
}

/// A byte count in binary units, one decimal: "12.3M".
pub(super) fn mem_text(bytes: u64) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "K", "M", "G"] {
        if v < 1024.0 {
            return if unit == "B" { format!("{bytes}B") } else { format!("{v:.1}{unit}") };
        }
        v /= 1024.0;
    }
    format!("{v:.1}T")
}

pub fn render_status(r: &StatusReport, state_dir: &Path) -> String {
    let mut out = String::new();
    let s = &r.supervisor;
    let mut head = format!("drover: {}", s.state);
    if s.state == "stale" {
        head.push_str(&format!(
            " (pid {} died without stopping; generation {})\n\
             what it started may still be running, unwatched, until the next `drover start` stops it",
            s.pid.map_or("?".into(), |p| p.to_string()),
            s.generation
        ));
    } else if let Some(pid) = s.pid {
        head.push_str(&format!(" (pid {pid}"));
        if s.state == "running"
            && let Some(t) = &s.started_at
        {
            head.push_str(&format!(", up {}", since(t)));
        }
        head.push_str(&format!(", generation {})", s.generation));
    }
    out.push_str(&head);
    out.push('\n');
    if let Some(c) = &s.config {
        out.push_str(&format!("config: {}\n", c.display()));
    }
    out.push_str(&format!("state_dir: {}\n", state_dir.display()));
    if let Some(c) = &s.containment {
        out.push_str(&format!("containment: {c}\n"));
    }
    out.push_str(&overrides_text(&r.overrides));
    if let Some(lr) = &s.last_reload {
        match &lr.error {
            None => out.push_str(&format!("last reload: {} ok\n", lr.at)),
            Some(e) => out.push_str(&format!(
                "last reload: {} FAILED (the previous config stays in force):\n  {}\n",
                lr.at,
                e.replace('\n', "\n  ")
            )),
        }
    }
    if let Some(e) = &r.ledger_error {
        out.push_str(&format!("ledger: {e}\n"));
    }
    if !r.workers.is_empty() {
        let mut rows = vec![
            [
                "WORKER",
                "INST",
                "STATE",
                "PID",
                "UPTIME",
                "CPU%",
                "MEM",
                "RESTARTS",
                "DEPLOYS",
                "LAST EXIT",
                "NOTE",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for w in &r.workers {
            for i in &w.instances {
                let running = i.state == "running";
                rows.push(vec![
                    w.name.clone(),
                    // A replacement started beside it (or the old one leaving).
                    if i.surge { format!("{} surge", i.index) } else { i.index.to_string() },
                    i.state.to_string(),
                    i.pid.map_or("-".into(), |p| p.to_string()),
                    if running { i.started_at.as_deref().map_or("-".into(), since) } else { "-".into() },
                    i.cpu_seconds.zip(i.started_at.as_deref()).map_or("-".into(), |(c, t)| cpu_percent(c, t)),
                    i.rss_bytes.map_or("-".into(), mem_text),
                    i.restarts.to_string(),
                    i.deploys.to_string(),
                    i.last_exit.as_ref().map_or("-".into(), |e| e.to_string()),
                    match (&i.error, &i.next_start_at) {
                        _ if i.held => format!("stopped by hand (drover start {}:{})", w.name, i.index),
                        _ if !i.waiting_for.is_empty() => format!("waiting for {}", i.waiting_for.join(", ")),
                        (Some(e), _) => e.clone(),
                        (None, Some(t)) => format!("next start at {t}"),
                        _ => i.notify_status.clone().unwrap_or_default(),
                    },
                ]);
            }
            if w.instances.is_empty() {
                rows.push(vec![w.name.clone(), "-".into(), w.state.clone()]);
            }
            if let Some(r) = &w.rollout {
                rows.push(vec![
                    w.name.clone(),
                    "-".into(),
                    "rollout".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    r.clone(),
                ]);
            }
        }
        out.push_str(&table(rows));
    }
    if !r.jobs.is_empty() {
        let mut rows = vec![
            ["JOB", "TRIGGER", "NEXT TICK", "ACTIVE", "QUEUED", "SKIPS", "LAST RUN"]
                .map(String::from)
                .to_vec(),
        ];
        for j in &r.jobs {
            let active: Vec<String> = j.active.iter().map(|id| id.to_string()).collect();
            rows.push(vec![
                j.name.clone(),
                j.trigger.clone(),
                j.next_tick.clone().unwrap_or_else(|| "-".into()),
                if active.is_empty() { "-".into() } else { active.join(",") },
                j.queued.to_string(),
                j.skips.to_string(),
                j.last_run.as_ref().map_or("-".into(), |l| format!("{} {}", l.id, l.state.as_str())),
            ]);
        }
        out.push('\n');
        out.push_str(&table(rows));
    }
    let active: Vec<&crate::ledger::Run> = r.runs.iter().chain(&r.sessions).collect();
    if !active.is_empty() {
        let mut rows = vec![
            ["RUN", "JOB/SESSION", "STATE", "STEP", "PID", "STARTED", "NOTE"].map(String::from).to_vec(),
        ];
        for run in active {
            rows.push(vec![
                run.id.to_string(),
                run.job.clone().or_else(|| run.name.clone()).unwrap_or_else(|| "session".into()),
                run.state.as_str().into(),
                run.step.map_or("-".into(), |i| {
                    run.steps.get(i as usize).map_or(i.to_string(), |s| s.name.clone())
                }),
                run.pid.map_or("-".into(), |p| p.to_string()),
                run.started_at.clone().unwrap_or_else(|| "-".into()),
                crate::ledger::Ledger::approval_hint(run).unwrap_or_default(),
            ]);
        }
        out.push('\n');
        out.push_str(&table(rows));
    }
    out
}

/// The overrides in force, one a line: `KEY = VALUE (overridden by …)`.
fn overrides_text(overrides: &[crate::config::load::ShownOverride]) -> String {
    let mut out = String::new();
    if overrides.is_empty() {
        return out;
    }
    out.push_str("overrides:\n");
    for o in overrides {
        let value = o.value.as_deref().map_or(String::new(), |v| format!(" = {v}"));
        out.push_str(&format!("  {}{value} (overridden by {})\n", o.key, o.by));
    }
    out
}

/// Left-aligned columns, two spaces apart.
pub(super) fn table(rows: Vec<Vec<String>>) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|v| v.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> =
            row.iter().enumerate().map(|(c, v)| format!("{v:<w$}", w = widths[c])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn plan(ctx: &Ctx, json: bool) -> u8 {
    use crate::supervisor::reconcile::{Change, JobChange};
    // Read here, with the loader's limits, and sent whole: the supervisor
    // never opens a path a client names. One read serves the state_dir too.
    let text = match read_text(ctx.config) {
        Ok(t) => t,
        Err(d) => {
            eprintln!("{d}");
            return exit::FAILED;
        }
    };
    let dir = state_dir_in(ctx.config, Some(&text), ctx.overrides);
    let path = std::path::absolute(ctx.config).unwrap_or_else(|_| ctx.config.to_path_buf());
    let (generation, changes, jobs) = match ask(&dir, &Request::Plan { path, text }) {
        Ok(Some(Response::Plan { generation, changes, jobs })) => (generation, changes, jobs),
        Ok(Some(other)) => return unexpected(&other),
        Ok(None) => return ctx.no_supervisor(&dir),
        Err(code) => return code,
    };
    let nothing = changes.is_empty() && jobs.is_empty();
    if json {
        // One array: workers' changes, then jobs' (told apart by `action`).
        let all: Vec<serde_json::Value> = changes
            .iter()
            .map(serde_json::to_value)
            .chain(jobs.iter().map(serde_json::to_value))
            .collect::<Result<_, _>>()
            .expect("plan serializes");
        super::print_json(&all);
    } else if nothing {
        println!("no changes: the running generation {generation} matches the file");
    } else {
        println!("changes against the running generation {generation}:");
        for c in &changes {
            let line = match c {
                Change::Start { worker, capacity } => format!("+ start    {worker} (capacity {capacity})"),
                Change::Stop { worker } => format!("- stop     {worker}"),
                Change::Restart { worker, fields, from_capacity, to_capacity } => {
                    let scale = if from_capacity == to_capacity {
                        String::new()
                    } else {
                        format!("; scale {from_capacity} -> {to_capacity}")
                    };
                    format!(
                        "~ restart  {worker} (changed: {}{scale}; one instance at a time)",
                        fields.join(", ")
                    )
                }
                Change::Update { worker, fields, from_capacity, to_capacity } => {
                    let mut s = format!("~ update   {worker} (changed: {}", fields.join(", "));
                    if from_capacity != to_capacity {
                        s.push_str(&format!("; scale {from_capacity} -> {to_capacity}"));
                    }
                    s.push_str("; running processes kept)");
                    s
                }
            };
            println!("{line}");
        }
        for j in &jobs {
            let line = match j {
                JobChange::AddJob { job, trigger } => format!("+ add      job {job} ({trigger})"),
                JobChange::RemoveJob { job } => {
                    format!("- remove   job {job} (no more ticks; active runs finish)")
                }
                JobChange::ChangeJob { job, fields } => {
                    format!(
                        "~ change   job {job} (changed: {}; from its next tick or run)",
                        fields.join(", ")
                    )
                }
            };
            println!("{line}");
        }
    }
    if !json
        && let Ok(Some(Response::Status(r))) = ask(&dir, &Request::Status { name: None, pretty: false })
        && !r.overrides.is_empty()
    {
        // The supervisor applies its own overrides to the file, not this
        // command's: say which.
        print!(
            "{}",
            overrides_text(&r.overrides).replacen("overrides:", "with the supervisor's overrides:", 1)
        );
    }
    if nothing { exit::OK } else { exit::FAILED }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_and_cpu_columns() {
        assert_eq!(mem_text(512), "512B");
        assert_eq!(mem_text(1536), "1.5K");
        assert_eq!(mem_text(300 * 1024 * 1024), "300.0M");
        assert_eq!(mem_text(3 * 1024 * 1024 * 1024), "3.0G");
        let ten_s_ago = rfc3339_of(SystemTime::now() - Duration::from_secs(10));
        let pct: f64 = cpu_percent(5.0, &ten_s_ago).parse().unwrap();
        assert!((45.0..=50.1).contains(&pct), "{pct}");
        assert_eq!(cpu_percent(1.0, "not a time"), "-");
    }

    fn rfc3339_of(t: SystemTime) -> String {
        humantime::format_rfc3339(t).to_string()
    }
}
