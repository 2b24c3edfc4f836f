//! The operator's controls: `stop|start|restart NAME[:INDEX]…`, which wait
//! (with progress on stderr) until what they asked for is done, and
//! `status --check`, the one-word health answer for scripts and probes.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use super::client::{Ctx, ask, unexpected};
use super::exit;
use crate::supervisor::control::request;
use crate::supervisor::protocol::{
    Affected, InstanceAction, InstanceStatus, Request, Response, StatusReport, Target,
};

/// How often a waiting client asks the supervisor how far it got.
const POLL: Duration = Duration::from_millis(300);

/// `stop|start|restart NAME[:INDEX]…`; with `wait`, returns once each
/// instance reached what was asked (0) or cannot (1, naming it).
pub fn act(ctx: &Ctx, action: InstanceAction, targets: Vec<Target>, wait: bool) -> u8 {
    let dir = ctx.state_dir();
    let (message, affected) = match ask(&dir, &Request::Instances { action, targets }) {
        Ok(Some(Response::Instances { message, instances })) => (message, instances),
        Ok(Some(other)) => return unexpected(&other),
        Ok(None) => return ctx.no_supervisor(&dir),
        Err(code) => return code,
    };
    if !wait {
        println!("{message}");
        return exit::OK;
    }
    let mut progress = Progress::new(std::io::stderr().is_terminal(), Instant::now());
    loop {
        let Some(report) = fetch_status(&dir) else {
            progress.finish();
            eprintln!("drover: the supervisor went away before {message} was done");
            return exit::FAILED;
        };
        let outcomes: Vec<Outcome> =
            affected.iter().map(|a| outcome(action, a, find(&report, &a.worker, a.index))).collect();
        if outcomes.iter().all(|o| !matches!(o, Outcome::Pending(_))) {
            progress.finish();
            let mut code = exit::OK;
            for o in outcomes {
                match o {
                    Outcome::Done(line) => println!("{line}"),
                    Outcome::Failed(line) => {
                        eprintln!("drover: {line}");
                        code = exit::FAILED;
                    }
                    Outcome::Pending(_) => {}
                }
            }
            return code;
        }
        let waiting: Vec<String> = affected
            .iter()
            .zip(&outcomes)
            .filter_map(|(a, o)| match o {
                Outcome::Pending(what) => Some(waiting_for(a, find(&report, &a.worker, a.index), what)),
                _ => None,
            })
            .collect();
        progress.show(Instant::now(), &waiting);
        std::thread::sleep(POLL);
    }
}

/// Runs `f` (a request that blocks until the supervisor has stopped) and,
/// meanwhile, shows which instances it is still waiting for. `None`: `f`
/// ended without a result.
pub(super) fn with_stop_progress<T: Send + 'static>(
    dir: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    let mut progress = Progress::new(std::io::stderr().is_terminal(), Instant::now());
    loop {
        match rx.recv_timeout(POLL) {
            Ok(result) => {
                progress.finish();
                return Some(result);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                progress.finish();
                return None;
            }
        }
        if let Some(report) = fetch_status(dir) {
            let waiting: Vec<String> = report
                .workers
                .iter()
                .flat_map(|w| w.instances.iter().map(move |i| (w, i)))
                .filter(|(_, i)| i.state == "stopping")
                .map(|(w, i)| stopping(&format!("{}:{}", w.name, i.index), i))
                .collect();
            progress.show(Instant::now(), &waiting);
        }
    }
}

fn fetch_status(dir: &Path) -> Option<StatusReport> {
    match request(dir, &Request::Status { name: None, pretty: false }, Some(Duration::from_secs(10))) {
        Ok(Some(Response::Status(r))) => Some(*r),
        _ => None,
    }
}

fn find<'r>(r: &'r StatusReport, worker: &str, index: u32) -> Option<&'r InstanceStatus> {
    r.workers.iter().find(|w| w.name == worker)?.instances.iter().find(|i| i.index == index)
}

/// Where one instance stands against what was asked of it.
#[derive(Debug, PartialEq)]
enum Outcome {
    Done(String),
    Failed(String),
    /// Still under way: what it waits for ("stop", "restart", "start").
    Pending(&'static str),
}

/// Decides, from one status look, whether `action` on `a` is done.
fn outcome(action: InstanceAction, a: &Affected, now: Option<&InstanceStatus>) -> Outcome {
    let name = format!("{}:{}", a.worker, a.index);
    let Some(i) = now else {
        return Outcome::Failed(format!("{name} is gone (its worker was removed or scaled down)"));
    };
    let why = || i.error.clone().or_else(|| i.last_exit.as_ref().map(|e| format!("last exit {e}")));
    let trouble = |what: &str| {
        let mut s = format!("{name} {what}: {}", i.state);
        if let Some(w) = why() {
            s.push_str(&format!(" ({w})"));
        }
        Outcome::Failed(s)
    };
    let pid = i.pid.map_or(String::new(), |p| format!(" (pid {p})"));
    match action {
        InstanceAction::Stop => match i.state.as_ref() {
            "stopped" => Outcome::Done(format!("stopped {name}")),
            "stopping" => Outcome::Pending("stop"),
            _ if !i.held => Outcome::Failed(format!("{name} was started again before it stopped")),
            _ => Outcome::Pending("stop"),
        },
        InstanceAction::Start => match i.state.as_ref() {
            "running" => Outcome::Done(format!("{name} running{pid}")),
            // Being spawned, or spawned and not yet ready.
            "stopping" | "starting" => Outcome::Pending("start"),
            "stopped" if i.held => Outcome::Failed(format!("{name} was stopped by hand again")),
            "stopped" => {
                Outcome::Done(format!("{name} started and has exited ({})", why().unwrap_or_default()))
            }
            _ => trouble("did not start"),
        },
        // Not yet replaced: neither deployed nor started since (a restart
        // the policy made meanwhile, after a crash, counts as done).
        InstanceAction::Restart if i.deploys <= a.deploys && i.started_at == a.started_at => {
            Outcome::Pending("restart")
        }
        InstanceAction::Restart => match i.state.as_ref() {
            "running" => Outcome::Done(format!("restarted {name}{pid}")),
            "stopping" | "starting" => Outcome::Pending("restart"),
            "stopped" if i.held => Outcome::Failed(format!("{name} was stopped by hand")),
            "stopped" => {
                Outcome::Done(format!("restarted {name}; it has exited ({})", why().unwrap_or_default()))
            }
            _ => trouble("failed after its restart"),
        },
    }
}

/// "web:0 (pid 123) to stop, SIGKILL in 28 s" or "web:1 to restart".
fn waiting_for(a: &Affected, now: Option<&InstanceStatus>, what: &str) -> String {
    let name = format!("{}:{}", a.worker, a.index);
    match now {
        Some(i) if i.state == "stopping" => stopping(&name, i),
        _ => format!("{name} to {what}"),
    }
}

/// A stopping instance, with the time its stop grace has left.
fn stopping(name: &str, i: &InstanceStatus) -> String {
    let who = match (i.pid, i.pgid) {
        (Some(p), _) => format!(" (pid {p})"),
        (None, Some(g)) => format!(" (process group {g})"),
        _ => String::new(),
    };
    let kill = match i.kill_at.as_deref().and_then(|t| humantime::parse_rfc3339_weak(t).ok()) {
        None => "SIGKILL sent".to_string(),
        Some(t) => match t.duration_since(SystemTime::now()) {
            Ok(left) => {
                format!("SIGKILL in {} s", left.as_secs().saturating_add(u64::from(left.subsec_nanos() > 0)))
            }
            Err(_) => "SIGKILL due".to_string(),
        },
    };
    format!("{name}{who} to stop, {kill}")
}

/// Progress lines on stderr while a command waits: redrawn in place on a
/// terminal; elsewhere only once the wait has lasted a second, then when
/// what is waited for changes, or every few seconds.
struct Progress {
    tty: bool,
    since: Instant,
    /// The last line shown and when.
    last: Option<(Instant, String)>,
}

/// Quiet time before the first line when stderr is not a terminal.
const QUIET: Duration = Duration::from_secs(1);
/// At most one unchanged line this often when stderr is not a terminal.
const REPEAT: Duration = Duration::from_secs(5);

impl Progress {
    fn new(tty: bool, since: Instant) -> Self {
        Progress { tty, since, last: None }
    }

    /// What to write for `waiting` at `now`, if anything.
    fn next(&mut self, now: Instant, waiting: &[String]) -> Option<String> {
        if waiting.is_empty() || (!self.tty && now.saturating_duration_since(self.since) < QUIET) {
            return None;
        }
        let line = format!("waiting for {}", waiting.join("; "));
        let due = match &self.last {
            None => true,
            Some((_, prev)) if self.tty => *prev != line,
            // The same instances, with only the countdown moved on: not yet.
            Some((at, prev)) => {
                subjects(prev) != subjects(&line) || now.saturating_duration_since(*at) >= REPEAT
            }
        };
        if !due {
            return None;
        }
        self.last = Some((now, line.clone()));
        Some(if self.tty { format!("\r\x1b[2K{line}") } else { format!("drover: {line}\n") })
    }

    fn show(&mut self, now: Instant, waiting: &[String]) {
        if let Some(text) = self.next(now, waiting) {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(text.as_bytes());
            let _ = err.flush();
        }
    }

    /// Clears a line drawn in place.
    fn finish(&mut self) {
        if self.tty && self.last.take().is_some() {
            let _ = std::io::stderr().write_all(b"\r\x1b[2K");
        }
    }
}

/// A progress line without its countdowns: what it is waiting for.
fn subjects(line: &str) -> String {
    line.split("; ").map(|part| part.split(", SIGKILL").next().unwrap_or(part)).collect::<Vec<_>>().join("; ")
}

/// `status --check`: exit 0 when every instance runs or was stopped on
/// purpose (by its restart policy or by hand), 1 naming those parked, in
/// backoff or failing to start; 3 when no supervisor runs.
pub fn status_check(ctx: &Ctx, json: bool, name: Option<String>) -> u8 {
    let dir = ctx.state_dir();
    let report = match ask(&dir, &Request::Status { name, pretty: false }) {
        Ok(Some(Response::Status(r))) => *r,
        Ok(Some(other)) => return unexpected(&other),
        Ok(None) => return ctx.no_supervisor(&dir),
        Err(code) => return code,
    };
    let problems = problems(&report);
    if json {
        super::print_json(&report);
    } else if problems.is_empty() {
        let all: Vec<&InstanceStatus> = report.workers.iter().flat_map(|w| &w.instances).collect();
        let count = |f: fn(&InstanceStatus) -> bool| all.iter().filter(|i| f(i)).count();
        println!(
            "ok: {} running, {} stopped ({} by hand), {} stopping",
            count(|i| i.state == "running"),
            count(|i| i.state == "stopped"),
            count(|i| i.state == "stopped" && i.held),
            count(|i| i.state == "stopping"),
        );
    } else {
        for p in &problems {
            println!("{p}");
        }
    }
    if problems.is_empty() { exit::OK } else { exit::FAILED }
}

/// The instances that need attention, one line each.
fn problems(r: &StatusReport) -> Vec<String> {
    let mut out = Vec::new();
    for w in &r.workers {
        for i in &w.instances {
            let failing_start = i.state == "stopped" && !i.held && i.error.is_some();
            if !(i.state == "parked" || i.state == "backoff" || failing_start) {
                continue;
            }
            let mut line =
                format!("{}:{} {}", w.name, i.index, if failing_start { "failed" } else { &i.state });
            match (&i.error, &i.last_exit) {
                (Some(e), _) => line.push_str(&format!(": {e}")),
                (None, Some(e)) => line.push_str(&format!(": last exit {e}")),
                _ => {}
            }
            if let Some(t) = &i.next_start_at {
                line.push_str(&format!("; next start at {t}"));
            }
            out.push(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::protocol::WorkerStatus;

    fn inst(index: u32, state: &str) -> InstanceStatus {
        InstanceStatus {
            index,
            surge: false,
            pid: (state == "running" || state == "stopping").then_some(100 + index as i32),
            pgid: None,
            start_ticks: None,
            state: state.to_string().into(),
            restarts: 0,
            deploys: 0,
            held: false,
            started_at: None,
            last_exit: None,
            error: None,
            next_start_at: None,
            kill_at: None,
            waiting_for: vec![],
            notify_status: None,
            cgroup: None,
            cpu_seconds: None,
            rss_bytes: None,
        }
    }

    fn affected(deploys: u32) -> Affected {
        Affected { worker: "web".into(), index: 1, pid: Some(7), deploys, started_at: Some("t0".into()) }
    }

    #[test]
    fn a_restart_is_done_once_the_deploy_count_grew_and_it_runs() {
        let mut i = inst(1, "running");
        let a = affected(2);
        i.deploys = 2;
        i.started_at = Some("t0".into());
        assert_eq!(outcome(InstanceAction::Restart, &a, Some(&i)), Outcome::Pending("restart"));
        i.started_at = Some("t1".into());
        assert!(matches!(outcome(InstanceAction::Restart, &a, Some(&i)), Outcome::Done(_)), "started since");
        i.started_at = Some("t0".into());
        i.deploys = 3;
        assert_eq!(
            outcome(InstanceAction::Restart, &a, Some(&i)),
            Outcome::Done("restarted web:1 (pid 101)".into())
        );
        // Being spawned, or not ready yet: still under way.
        i.state = "starting".into();
        assert_eq!(outcome(InstanceAction::Restart, &a, Some(&i)), Outcome::Pending("restart"));
        assert_eq!(outcome(InstanceAction::Start, &a, Some(&i)), Outcome::Pending("start"));
        i.state = "backoff".into();
        i.error = Some("cannot start \"nope\"".into());
        assert!(
            matches!(outcome(InstanceAction::Restart, &a, Some(&i)), Outcome::Failed(e) if e.contains("nope"))
        );
        assert!(matches!(outcome(InstanceAction::Restart, &a, None), Outcome::Failed(_)));
    }

    #[test]
    fn a_stop_is_done_when_stopped_and_a_start_when_running() {
        let a = affected(0);
        let mut i = inst(1, "stopping");
        i.held = true;
        assert_eq!(outcome(InstanceAction::Stop, &a, Some(&i)), Outcome::Pending("stop"));
        i.state = "stopped".into();
        assert_eq!(outcome(InstanceAction::Stop, &a, Some(&i)), Outcome::Done("stopped web:1".into()));
        assert!(matches!(outcome(InstanceAction::Start, &a, Some(&i)), Outcome::Failed(_)));
        let i = inst(1, "parked");
        assert!(
            matches!(outcome(InstanceAction::Start, &a, Some(&i)), Outcome::Failed(e) if e.contains("parked"))
        );
        let i = inst(1, "running");
        assert_eq!(
            outcome(InstanceAction::Start, &a, Some(&i)),
            Outcome::Done("web:1 running (pid 101)".into())
        );
    }

    #[test]
    fn progress_waits_a_second_off_a_terminal_then_speaks_on_change_or_every_few_seconds() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut p = Progress::new(false, t0);
        let a = |s: u64| vec![format!("web:0 (pid 5) to stop, SIGKILL in {s} s")];
        assert_eq!(p.next(at(300), &a(30)), None, "quiet for the first second");
        assert_eq!(
            p.next(at(1200), &a(29)).as_deref(),
            Some("drover: waiting for web:0 (pid 5) to stop, SIGKILL in 29 s\n")
        );
        assert_eq!(p.next(at(2200), &a(28)), None, "only the countdown moved");
        let both = vec![a(27).remove(0), "web:1 to restart".to_string()];
        assert!(p.next(at(2500), &both).is_some(), "a new instance to wait for");
        assert_eq!(p.next(at(3000), &both), None);
        assert!(p.next(at(7600), &both).is_some(), "again after a few seconds");
        assert_eq!(p.next(at(9000), &[]), None, "nothing to wait for");
    }

    #[test]
    fn progress_on_a_terminal_redraws_at_once() {
        let t0 = Instant::now();
        let mut p = Progress::new(true, t0);
        let line = vec!["web:0 (pid 5) to stop, SIGKILL in 3 s".to_string()];
        assert_eq!(
            p.next(t0, &line).as_deref(),
            Some("\r\x1b[2Kwaiting for web:0 (pid 5) to stop, SIGKILL in 3 s")
        );
        assert_eq!(p.next(t0 + POLL, &line), None, "unchanged");
    }

    #[test]
    fn check_names_parked_backoff_and_failed_starts_and_passes_what_was_stopped_on_purpose() {
        let mut held = inst(1, "stopped");
        held.held = true;
        held.error = Some("cannot start".into());
        let mut ok = StatusReport::default();
        ok.workers.push(WorkerStatus {
            name: "web".into(),
            capacity: 3,
            state: "running".into(),
            rollout: None,
            sockets: vec![],
            instances: vec![inst(0, "running"), held, inst(2, "stopped")],
        });
        assert!(problems(&ok).is_empty());
        let mut bad = ok.clone();
        let mut parked = inst(3, "parked");
        parked.error = Some("crash loop".into());
        let mut failed = inst(4, "stopped");
        failed.error = Some("cannot start \"x\"".into());
        bad.workers[0].instances.extend([parked, inst(5, "backoff"), failed]);
        let p = problems(&bad);
        assert_eq!(p.len(), 3, "{p:?}");
        assert_eq!(p[0], "web:3 parked: crash loop");
        assert!(p[1].starts_with("web:5 backoff"), "{p:?}");
        assert!(p[2].starts_with("web:4 failed: cannot start"), "{p:?}");
    }
}
