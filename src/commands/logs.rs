//! `drover logs`: output read straight from the log files in state_dir, so
//! it works with the supervisor stopped (which is when one needs it most).
//! Names are looked up in the config file (leniently: a broken file still
//! names its workers), the log directory and the run ledger.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::client::Ctx;
use super::exit;
use super::logread::{Filter, Source, follow, tail, write_line};
use crate::config::load::read_text;
use crate::config::types::is_valid_name;
use crate::ledger::{Kind, Ledger, Run, path_in};
use crate::supervisor::jobs::run_log_path;
use crate::supervisor::logs::log_path;

pub struct Options {
    pub follow: bool,
    pub lines: Option<usize>,
    pub since: Option<String>,
    pub instance: Option<u32>,
}

const DEFAULT_LINES: usize = 50;
/// With --since and no -n: every line since, up to this many.
const SINCE_LINES: usize = 10_000;

pub fn logs(ctx: &Ctx, name: Option<&str>, opts: Options) -> u8 {
    let since = match opts.since.as_deref().map(parse_since).transpose() {
        Ok(s) => s,
        Err(msg) => {
            eprintln!("drover: --since: {msg}");
            return exit::USAGE;
        }
    };
    let n = opts.lines.unwrap_or(if since.is_some() { SINCE_LINES } else { DEFAULT_LINES });
    let filter = Filter { since, instance: opts.instance };
    let state_dir = ctx.state_dir();
    let names = Names::read(ctx.config, &state_dir);
    let sources = match name {
        None => {
            if names.workers.is_empty() {
                eprintln!("drover: no worker has a log in {}", state_dir.join("logs").display());
                return exit::FAILED;
            }
            names
                .workers
                .iter()
                .map(|w| Source { label: Some(w.clone()), path: log_path(&state_dir, w) })
                .collect()
        }
        Some(name) => match resolve(name, &names, &state_dir) {
            Ok(path) => vec![Source { label: None, path }],
            Err(msg) => {
                eprintln!("drover: {msg}");
                return exit::FAILED;
            }
        },
    };
    let (found, tracked) = match tail(&sources, n, filter) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("drover: cannot read the log: {e}");
            return exit::FAILED;
        }
    };
    if found.is_empty() && name.is_some() && !sources[0].path.exists() {
        // Runs make their log on their first line: say why nothing shows.
        eprintln!("drover: no output yet ({} does not exist)", sources[0].path.display());
    }
    {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        for f in &found {
            if write_line(&mut out, sources[f.source].label.as_deref(), &f.line).is_err() {
                return exit::OK; // stdout closed
            }
        }
        let _ = std::io::Write::flush(&mut out);
    }
    if !opts.follow {
        return exit::OK;
    }
    follow(tracked, filter, None, || None).unwrap_or_else(|msg| {
        eprintln!("drover: {msg}");
        exit::FAILED
    })
}

/// `10m` (that long ago) or an RFC 3339 time.
fn parse_since(s: &str) -> Result<SystemTime, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(SystemTime::now().checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH));
    }
    humantime::parse_rfc3339_weak(s).map_err(|_| {
        format!("expected a duration such as \"10m\" or \"2h\", or a time such as \"2026-12-03T08:00:00Z\", found {s:?}")
    })
}

/// What can be named: workers (the config's, else those with a log file),
/// jobs, and the ledger (sessions and runs).
struct Names {
    workers: Vec<String>,
    jobs: Vec<String>,
    ledger: Option<Ledger>,
}

impl Names {
    fn read(config: &Path, state_dir: &Path) -> Self {
        let table = read_text(config).ok().and_then(|t| toml::from_str::<toml::Table>(&t).ok());
        let keys = |section: &str| -> Vec<String> {
            table
                .as_ref()
                .and_then(|t| t.get(section)?.as_table().map(|s| s.keys().cloned().collect()))
                .unwrap_or_default()
        };
        let mut workers = keys("workers");
        // A worker removed from the config still has its log.
        if let Ok(dir) = std::fs::read_dir(state_dir.join("logs")) {
            for e in dir.flatten() {
                if let Some(w) = e.file_name().to_str().and_then(|n| n.strip_suffix(".log"))
                    && is_valid_name(w)
                    && !workers.iter().any(|x| x == w)
                {
                    workers.push(w.to_string());
                }
            }
        }
        workers.sort();
        let path = path_in(state_dir);
        let ledger = path.exists().then(|| Ledger::open_read_only(&path).ok()).flatten();
        Names { workers, jobs: keys("jobs"), ledger }
    }

    fn sessions(&self) -> Vec<Run> {
        let Some(l) = &self.ledger else { return Vec::new() };
        l.list(None, None, 1000).unwrap_or_default().into_iter().filter(|r| r.kind == Kind::Session).collect()
    }
}

/// The log file `name` stands for, or what to say instead.
fn resolve(name: &str, names: &Names, state_dir: &Path) -> Result<PathBuf, String> {
    let run_log = |r: &Run| r.log.clone().unwrap_or_else(|| run_log_path(state_dir, r.id));
    if let Ok(id) = name.parse::<i64>() {
        return match names.ledger.as_ref().and_then(|l| l.get(id).ok().flatten()) {
            Some(r) => Ok(run_log(&r)),
            None => Err(format!("no run {id} (drover runs lists them)")),
        };
    }
    if !is_valid_name(name) {
        return Err(format!(
            "no worker, job or session named {name:?}: a name is 1 to 63 lowercase letters, digits, '-' or '_'"
        ));
    }
    if names.workers.iter().any(|w| w == name) {
        return Ok(log_path(state_dir, name));
    }
    let sessions = names.sessions();
    if let Some(s) = sessions.iter().find(|s| s.name.as_deref() == Some(name)) {
        return Ok(run_log(s));
    }
    let runs: Vec<Run> =
        names.ledger.as_ref().and_then(|l| l.list(Some(name), None, 5).ok()).unwrap_or_default();
    if names.jobs.iter().any(|j| j == name) || !runs.is_empty() {
        // A job has no log of its own, each run has one: the latest is
        // what "the job's output" most likely means.
        let Some(latest) = runs.first() else {
            return Err(format!("{name} is a job and has not run yet (drover trigger {name} runs it now)"));
        };
        let list: Vec<String> = runs.iter().map(|r| format!("{} {}", r.id, r.state.as_str())).collect();
        eprintln!(
            "drover: {name} is a job; showing its latest run, {}. Its runs: {} (drover logs ID shows another)",
            latest.id,
            list.join(", ")
        );
        return Ok(run_log(latest));
    }
    let mut msg = format!("no worker, job or session named {name:?}");
    let mut candidates: Vec<&str> = names.workers.iter().chain(&names.jobs).map(String::as_str).collect();
    let session_names: Vec<&str> = sessions.iter().filter_map(|s| s.name.as_deref()).collect();
    candidates.extend(&session_names);
    if let Some(near) = crate::config::load::nearest(name, &candidates) {
        msg.push_str(&format!("; did you mean {near:?}?"));
    }
    let mut known = Vec::new();
    for (what, list) in [
        ("workers", names.workers.iter().map(String::as_str).collect::<Vec<_>>()),
        ("jobs", names.jobs.iter().map(String::as_str).collect()),
        ("sessions", dedup(session_names)),
    ] {
        if !list.is_empty() {
            known.push(format!("{what}: {}", list.join(", ")));
        }
    }
    if !known.is_empty() {
        msg.push_str(&format!(" ({})", known.join("; ")));
    }
    Err(msg)
}

fn dedup(mut v: Vec<&str>) -> Vec<&str> {
    v.sort();
    v.dedup();
    v
}
