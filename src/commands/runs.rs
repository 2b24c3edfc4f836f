//! `trigger`, `runs`, `bg`, `attach`: the run ledger from the command
//! line. Listing and showing read the ledger directly (they work with no
//! supervisor running); acting goes through the supervisor.

use std::path::Path;
use std::time::{Duration, SystemTime};

use super::client::{Ctx, ask, table, unexpected};
use super::exit;
use super::logread::{AlsoWatch, Filter, Source, Tracked, follow};
use crate::ledger::{Ledger, Run, RunState, path_in};
use crate::supervisor::control::trusted_state_dir;
use crate::supervisor::jobs::run_log_path;
use crate::supervisor::protocol::{Request, Response};

/// Sends a request whose answer is a run id, printed alone for scripts.
fn print_id(ctx: &Ctx, req: Request) -> u8 {
    let dir = ctx.state_dir();
    match ask(&dir, &req) {
        Ok(Some(Response::Run { id })) => {
            println!("{id}");
            exit::OK
        }
        Ok(Some(other)) => unexpected(&other),
        Ok(None) => ctx.no_supervisor(&dir),
        Err(code) => code,
    }
}

pub fn trigger(ctx: &Ctx, job: &str) -> u8 {
    print_id(ctx, Request::Trigger { job: job.into() })
}

pub fn resume(ctx: &Ctx, id: i64) -> u8 {
    print_id(ctx, Request::Resume { id })
}

pub fn bg(ctx: &Ctx, name: Option<String>, command: Vec<String>) -> u8 {
    let dir = match std::env::current_dir() {
        Ok(d) => d,
        Err(e) => {
            // The shell still knows which directory it was.
            let which = std::env::var("PWD").map(|p| format!(" {p}")).unwrap_or_default();
            eprintln!(
                "drover: cannot start the session: the current directory{which} is unavailable ({e}); cd to an \
                 existing directory and try again"
            );
            return exit::FAILED;
        }
    };
    // The session runs with the caller's environment (non-UTF-8 entries
    // cannot travel in the JSON request and are left out).
    let env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    print_id(ctx, Request::Bg { name, command, dir, env: Some(env) })
}

fn open_ledger(state_dir: &Path) -> Result<Option<Ledger>, u8> {
    if let Err(e) = trusted_state_dir(state_dir) {
        eprintln!("drover: {e}");
        return Err(exit::FAILED);
    }
    let path = path_in(state_dir);
    if !path.exists() {
        return Ok(None);
    }
    Ledger::open_read_only(&path).map(Some).map_err(|e| {
        eprintln!("drover: cannot read the ledger {}: {e}", path.display());
        exit::FAILED
    })
}

pub fn list(ctx: &Ctx, json: bool, job: Option<&str>, state: Option<&str>, limit: usize) -> u8 {
    let state = match state.map(|s| (s, RunState::parse(s))) {
        Some((s, None)) => {
            eprintln!(
                "drover: unknown state {s:?}: expected queued, running, waiting, succeeded, failed or cancelled"
            );
            return exit::USAGE;
        }
        Some((_, st)) => st,
        None => None,
    };
    let runs = match open_ledger(&ctx.state_dir()) {
        Ok(Some(l)) => match l.list(job, state, limit) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("drover: cannot read the ledger: {e}");
                return exit::FAILED;
            }
        },
        Ok(None) => Vec::new(),
        Err(code) => return code,
    };
    if json {
        super::print_json(&runs);
        return exit::OK;
    }
    if runs.is_empty() {
        println!("no runs");
        return exit::OK;
    }
    let mut rows = vec![
        ["ID", "JOB", "KIND", "STATE", "SOURCE", "CREATED", "TOOK", "EXIT", "NOTE"]
            .map(String::from)
            .to_vec(),
    ];
    for r in &runs {
        rows.push(vec![
            r.id.to_string(),
            r.job.clone().or_else(|| r.name.clone()).unwrap_or_else(|| "-".into()),
            word(r.kind),
            r.state.as_str().into(),
            word(r.source),
            r.created_at.clone(),
            took(r),
            exit_text(r),
            match (&r.error, r.parent, Ledger::approval_hint(r)) {
                (_, _, Some(hint)) => hint,
                (Some(e), _, _) => e.clone(),
                (None, Some(p), _) => format!("resumes run {p}"),
                _ => String::new(),
            },
        ]);
    }
    print!("{}", table(rows));
    exit::OK
}

/// An enum's name as its JSON form has it.
fn word(v: impl serde::Serialize) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

fn took(r: &Run) -> String {
    let parse = |s: &Option<String>| s.as_deref().and_then(|t| humantime::parse_rfc3339_weak(t).ok());
    match (parse(&r.started_at), parse(&r.ended_at).or_else(|| r.ended_at.is_none().then(SystemTime::now))) {
        (Some(a), Some(b)) => {
            let d = b.duration_since(a).unwrap_or_default();
            humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
        }
        _ => "-".into(),
    }
}

fn exit_text(r: &Run) -> String {
    match (r.exit_code, &r.signal) {
        (Some(c), _) => c.to_string(),
        (None, Some(s)) => s.clone(),
        _ => "-".into(),
    }
}

pub fn show(ctx: &Ctx, id: i64, json: bool) -> u8 {
    let dir = ctx.state_dir();
    let run = match open_ledger(&dir) {
        Ok(Some(l)) => l.get(id).ok().flatten(),
        Ok(None) => None,
        Err(code) => return code,
    };
    let Some(r) = run else {
        eprintln!("drover: no run {id}");
        return exit::FAILED;
    };
    if json {
        super::print_json(&r);
        return exit::OK;
    }
    let who = r.job.clone().map(|j| format!("job {j}")).or(r.name.clone().map(|n| format!("session {n}")));
    println!("run {}: {} ({})", r.id, r.state.as_str(), who.unwrap_or_else(|| "session".into()));
    if let Some(hint) = Ledger::approval_hint(&r) {
        println!("  {hint}");
    }
    println!("  kind:     {}, from {}", word(r.kind), word(r.source));
    if let Some(p) = r.parent {
        println!("  resumes:  run {p}");
    }
    println!("  created:  {}", r.created_at);
    println!("  started:  {}", r.started_at.as_deref().unwrap_or("-"));
    println!("  ended:    {}", r.ended_at.as_deref().unwrap_or("-"));
    println!("  took:     {}", took(&r));
    println!("  exit:     {}", exit_text(&r));
    if let Some(e) = &r.error {
        println!("  error:    {e}");
    }
    if !r.command.is_empty() && r.job.is_none() {
        println!("  command:  {}", r.command.join(" "));
    }
    println!("  log:      {}", r.log.clone().unwrap_or_else(|| run_log_path(&dir, r.id)).display());
    if !r.steps.is_empty() {
        println!("  steps:");
        for s in &r.steps {
            let exit = match (s.exit_code, &s.signal) {
                (Some(c), _) => format!(", exit {c}"),
                (None, Some(sig)) => format!(", {sig}"),
                _ => String::new(),
            };
            let err = s.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
            println!("    {}. {:<16} {}{exit}{err}", s.index, s.name, s.state.as_str());
        }
    }
    exit::OK
}

/// Prints a session's output from its start, follows it until the session
/// ends, and exits with its exit code (128 + signal number for a signal).
pub fn attach(ctx: &Ctx, key: &str) -> u8 {
    let dir = ctx.state_dir();
    let run = match ask(&dir, &Request::RunInfo { key: key.into() }) {
        Ok(Some(Response::RunInfo(r))) => *r,
        Ok(Some(other)) => return unexpected(&other),
        Ok(None) => return ctx.no_supervisor(&dir),
        Err(code) => return code,
    };
    let log = run.log.clone().unwrap_or_else(|| run_log_path(&dir, run.id));
    // Printed from the start by the follower's first look, a chunk at a
    // time: a long session's log is never held whole.
    let tracked = vec![Tracked::new(Source { label: None, path: log })];
    let ledger = match open_ledger(&dir) {
        Ok(Some(l)) => l,
        Ok(None) => return exit::FAILED,
        Err(code) => return code,
    };
    let id = run.id;
    // The session's end is learnt from the ledger: woken when the ledger
    // files change (the supervisor writes the end there), never by a timer.
    let prefix = path_in(&dir).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let also = AlsoWatch { dir: dir.clone(), prefix };
    let result = follow(tracked, Filter::default(), Some(also), || {
        let r = ledger.get(id).ok().flatten()?;
        if !r.state.is_terminal() {
            return None;
        }
        Some(match (r.exit_code, r.signal.as_deref()) {
            (Some(c), _) => c.clamp(0, 255) as u8,
            (None, Some(sig)) => 128u8
                .saturating_add(sig.parse::<crate::config::types::Signal>().map_or(0, |s| s.to_nix() as u8)),
            _ if r.state == RunState::Succeeded => exit::OK,
            _ => exit::FAILED,
        })
    });
    result.unwrap_or_else(|msg| {
        eprintln!("drover: {msg}");
        exit::FAILED
    })
}
