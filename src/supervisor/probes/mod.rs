//! Readiness and health probes: how drover learns that an instance is
//! ready and stays healthy. Start reading at [`spawn_probe`], the one call
//! the instance state machine makes per probe of an instance it spawned.
//!
//! - `tracker`: results over time -> a verdict, and when to check next (pure).
//! - `check`: one exec, http or tcp check.
//! - `expand`: `${NAME}` in probe strings (pure).
//! - `notify`: the sd_notify socket instances send `READY=1`, `WATCHDOG=1` to.
//! - `log_match`: the watch a `log` probe puts on an instance's output.

pub mod check;
pub mod expand;
pub mod log_match;
pub mod notify;
pub mod tracker;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

pub use check::{Check, ExecContext};
pub use log_match::LineWatch;
pub use notify::{Notice, NotifyEvent};
pub use tracker::{Role, Tracker, Verdict};

use crate::os::identity::Identity;
use crate::os::reaper::Reaper;

pub use crate::config::model::{Probe, ProbeKind};

/// Where a probe of one instance runs and what it expands from.
#[derive(Clone)]
pub struct ProbeContext {
    /// The instance's own variables as given to its process (the worker's
    /// `env` and `DROVER_WORKER`, `DROVER_INSTANCE`, …, `DROVER_STATE_DIR`:
    /// the mark by which a later supervisor finds an exec check a killed
    /// one left); drover's own environment, which the instance inherits,
    /// is looked in after it.
    pub env: BTreeMap<String, String>,
    /// The instance's directory (its worktree, in worktree mode).
    pub dir: PathBuf,
    pub reaper: Arc<Reaper>,
    /// The instance's user, group and limits, which exec checks run with.
    pub identity: Identity,
}

/// What a probe does once its strings are expanded.
enum Plan {
    Poll(Check),
    /// Passes when told: a matching line, or a notice.
    Told,
}

/// A running probe of one instance. Dropping it stops the probe (an exec
/// check in flight has its process group killed).
pub struct ProbeHandle {
    task: tokio::task::AbortHandle,
    role: Role,
    kind: Kind,
    told: Arc<Notify>,
    watch: Option<LineWatch>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Polled,
    Log,
    Notify,
}

impl ProbeHandle {
    /// For a `log` probe: the watch to give both of the instance's output
    /// pumps (`logs::pump_watched`).
    pub fn line_watch(&self) -> Option<LineWatch> {
        self.watch.clone()
    }

    /// A notice from the instance (see [`NotifyEvent::attribute`]):
    /// `READY=1` passes a `notify` ready probe, `WATCHDOG=1` a `notify`
    /// health probe; anything else is not this probe's.
    pub fn notice(&self, notice: &Notice) {
        let mine = matches!(
            (self.kind, self.role, notice),
            (Kind::Notify, Role::Ready, Notice::Ready) | (Kind::Notify, Role::Health, Notice::Watchdog)
        );
        if mine {
            // One stored permit at most: a flood of notices costs nothing.
            self.told.notify_one();
        }
    }
}

impl Drop for ProbeHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts probing an instance: a ready probe from now (call it when the
/// instance is spawned), a health probe from now (call it when it became
/// ready). `report` receives the verdict, once, from the probe's task;
/// then the task ends. Only an instance with a probe has a task: an idle
/// drover without probes runs none. Call it within the runtime. A verdict
/// may race a drop of the handle: the caller keys verdicts by the
/// instance's incarnation and ignores stale ones.
///
/// Errors (before anything starts): a `${NAME}` the environment lacks, a
/// `log` pattern that is not a regex after expansion, a `log` health probe.
pub fn spawn_probe(
    role: Role,
    probe: &Probe,
    ctx: ProbeContext,
    report: impl FnOnce(Verdict) + Send + 'static,
) -> Result<ProbeHandle, String> {
    let lookup = |name: &str| ctx.env.get(name).cloned().or_else(|| std::env::var(name).ok());
    let plain = |text: &str| expand::expand(text, lookup, str::to_string);
    let told = Arc::new(Notify::new());
    let (plan, kind, watch) = match &probe.kind {
        ProbeKind::Exec(argv) => {
            let argv = argv.iter().map(|a| plain(a)).collect::<Result<_, _>>()?;
            (Plan::Poll(Check::Exec(argv)), Kind::Polled, None)
        }
        ProbeKind::Http(url) => (Plan::Poll(Check::Http(plain(url)?)), Kind::Polled, None),
        ProbeKind::Tcp(target) => (Plan::Poll(Check::Tcp(plain(target)?)), Kind::Polled, None),
        ProbeKind::Log(pattern) => {
            if role == Role::Health {
                return Err("a log probe can only be a ready probe".into());
            }
            // A value is matched as it is, not as a pattern.
            let pattern = expand::expand(pattern, lookup, regex::escape)?;
            let t = told.clone();
            let watch = LineWatch::new(log_match::compile(&pattern)?, move || t.notify_one());
            (Plan::Told, Kind::Log, Some(watch))
        }
        ProbeKind::Notify => (Plan::Told, Kind::Notify, None),
    };
    let now = Instant::now().into_std();
    let tracker = match role {
        Role::Ready => Tracker::ready(probe.interval, probe.start_timeout, now),
        Role::Health => Tracker::health(probe.interval, probe.failures, now, random_phase()),
    };
    let exec = ExecContext { dir: ctx.dir, env: ctx.env, reaper: ctx.reaper, identity: ctx.identity };
    let missing = match (kind, role) {
        (Kind::Notify, Role::Health) => {
            format!("no WATCHDOG=1 within {}", humantime::format_duration(probe.interval))
        }
        _ => String::new(),
    };
    let timing = (probe.interval, probe.timeout);
    let task = tokio::spawn(run(tracker, plan, exec, timing, told.clone(), missing, report));
    Ok(ProbeHandle { task: task.abort_handle(), role, kind, told, watch })
}

/// Health checks wake on a grid of this step (a tenth of the interval, at
/// most 100ms), so that the checks of many instances share wake-ups: a
/// wake-up of the runtime costs more than a tcp check. Ready probes are
/// not delayed by it.
fn grid(interval: Duration) -> Duration {
    (interval / 10).clamp(Duration::from_millis(1), Duration::from_millis(100))
}

/// The grid's origin, the same for every probe of this process.
fn origin() -> &'static std::time::Instant {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(std::time::Instant::now)
}

/// `at` rounded up to the next multiple of `step` after `origin` (`at`
/// itself when it is on the grid or before the origin).
fn coalesce(at: std::time::Instant, origin: std::time::Instant, step: Duration) -> std::time::Instant {
    let Some(since) = at.checked_duration_since(origin) else { return at };
    let step_ns = step.as_nanos().max(1);
    let rem = since.as_nanos() % step_ns;
    if rem == 0 {
        return at;
    }
    let up = u64::try_from(step_ns - rem).map_or(step, Duration::from_nanos);
    at.checked_add(up).unwrap_or(at)
}

/// A number in [0, 1), different for each call: where in its span a
/// health probe's first check falls. std's hasher keys are random per
/// process and per call, which is all the randomness this needs.
fn random_phase() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new().build_hasher().finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// The probe's loop: wait, check (or wait to be told), record, until a
/// verdict.
async fn run(
    mut tracker: Tracker,
    plan: Plan,
    exec: ExecContext,
    (interval, timeout): (Duration, Duration),
    told: Arc<Notify>,
    missing: String,
    report: impl FnOnce(Verdict),
) {
    let verdict = loop {
        let step = match &plan {
            Plan::Poll(c) => {
                let Some(at) = tracker.next_at() else { return };
                let at = match tracker.role() {
                    Role::Health => coalesce(at, *origin(), grid(interval)),
                    Role::Ready => at,
                };
                tokio::time::sleep_until(at.into()).await;
                let result = check::check(c, &exec, timeout).await;
                tracker.record(Instant::now().into_std(), result)
            }
            // Ready: told, or the deadline. Health (WATCHDOG=1): told
            // within each interval, or that interval counts as a failure.
            Plan::Told => {
                let wake = match tracker.role() {
                    Role::Ready => tracker.deadline(),
                    Role::Health => tracker.next_at(),
                };
                let Some(at) = wake else { return };
                tokio::select! {
                    _ = told.notified() => tracker.record(Instant::now().into_std(), Ok(())),
                    _ = tokio::time::sleep_until(at.into()) => match tracker.role() {
                        Role::Ready => tracker.tick(Instant::now().into_std()),
                        Role::Health => tracker.record(Instant::now().into_std(), Err(missing.clone())),
                    },
                }
            }
        };
        if let Some(v) = step {
            break v;
        }
    };
    report(verdict);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::reaper::isolated;
    use std::net::TcpListener;
    use tokio::sync::mpsc;

    const MS: Duration = Duration::from_millis(1);

    fn probe(kind: ProbeKind, interval: Duration, start_timeout: Duration, failures: u32) -> Probe {
        Probe { kind, interval, timeout: Duration::from_secs(2), start_timeout, failures }
    }

    fn ctx(env: &[(&str, &str)]) -> ProbeContext {
        ProbeContext {
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            dir: ".".into(),
            reaper: Arc::new(Reaper::default()),
            identity: Identity::default(),
        }
    }

    /// Starts a probe whose verdict arrives on the returned receiver.
    fn start(role: Role, p: &Probe, c: ProbeContext) -> (ProbeHandle, mpsc::UnboundedReceiver<Verdict>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let h = spawn_probe(role, p, c, move |v| {
            let _ = tx.send(v);
        })
        .unwrap();
        (h, rx)
    }

    async fn verdict(rx: &mut mpsc::UnboundedReceiver<Verdict>) -> Verdict {
        tokio::time::timeout(Duration::from_secs(600), rx.recv())
            .await
            .expect("a verdict in time")
            .expect("a verdict")
    }

    /// Waits until the runtime runs `n` tasks (a probe's task ends after
    /// its verdict, or when its handle is dropped).
    async fn tasks_settle_at(n: usize) {
        let m = tokio::runtime::Handle::current().metrics();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while m.num_alive_tasks() != n {
            assert!(std::time::Instant::now() < deadline, "{} tasks alive, not {n}", m.num_alive_tasks());
            tokio::task::yield_now().await;
            tokio::time::sleep(MS).await;
        }
    }

    #[test]
    fn health_checks_are_rounded_up_to_a_shared_grid() {
        let o = std::time::Instant::now();
        let step = grid(Duration::from_secs(1));
        assert_eq!(step, 100 * MS);
        assert_eq!(grid(Duration::from_millis(200)), 20 * MS);
        assert_eq!(grid(Duration::ZERO), MS);
        assert_eq!(coalesce(o + 250 * MS, o, step), o + 300 * MS);
        assert_eq!(coalesce(o + 300 * MS, o, step), o + 300 * MS);
        assert_eq!(coalesce(o + 301 * MS, o, step), o + 400 * MS);
        let before = o.checked_sub(5 * MS).unwrap_or(o);
        assert_eq!(coalesce(before, o, step), before);
    }

    #[tokio::test]
    async fn a_tcp_ready_probe_expands_its_target_and_passes_once_something_listens() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port().to_string();
        let p = probe(ProbeKind::Tcp("127.0.0.1:${PORT}".into()), 20 * MS, Duration::from_secs(30), 1);
        let (_h, mut rx) = start(Role::Ready, &p, ctx(&[("PORT", &port)]));
        assert_eq!(verdict(&mut rx).await, Verdict::Ready);
        tasks_settle_at(0).await;
    }

    #[tokio::test]
    async fn a_ready_probe_that_never_passes_times_out_with_its_last_failure() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let p = probe(ProbeKind::Http(format!("http://127.0.0.1:{port}/")), 20 * MS, 200 * MS, 1);
        let (_h, mut rx) = start(Role::Ready, &p, ctx(&[]));
        assert_eq!(
            verdict(&mut rx).await,
            Verdict::StartTimeout {
                after: 200 * MS,
                last_failure: Some(format!("connection refused (127.0.0.1:{port})"))
            }
        );
    }

    #[tokio::test]
    async fn a_health_probe_reports_unhealthy_after_its_failures_in_a_row() {
        // Accepts and answers 503 to every request.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/health", l.local_addr().unwrap());
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let Ok((mut s, _)) = l.accept().await else { return };
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
            }
        });
        let p = probe(ProbeKind::Http(url.clone()), 10 * MS, Duration::ZERO, 3);
        let (_h, mut rx) = start(Role::Health, &p, ctx(&[]));
        assert_eq!(verdict(&mut rx).await, Verdict::Unhealthy { reason: format!("http 503 from {url}") });
        server.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_notify_ready_probe_passes_on_ready_1_only() {
        let p = probe(ProbeKind::Notify, Duration::from_secs(1), Duration::from_secs(60), 1);
        let (h, mut rx) = start(Role::Ready, &p, ctx(&[]));
        h.notice(&Notice::Watchdog);
        h.notice(&Notice::Status("starting".into()));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(rx.try_recv().is_err(), "not ready on other notices");
        h.notice(&Notice::Ready);
        assert_eq!(verdict(&mut rx).await, Verdict::Ready);

        let (h, mut rx) = start(Role::Ready, &p, ctx(&[]));
        assert_eq!(
            verdict(&mut rx).await,
            Verdict::StartTimeout { after: Duration::from_secs(60), last_failure: None }
        );
        drop(h);
    }

    #[tokio::test(start_paused = true)]
    async fn a_notify_health_probe_fails_each_interval_without_a_watchdog() {
        let p = probe(ProbeKind::Notify, Duration::from_secs(10), Duration::ZERO, 2);
        let (h, mut rx) = start(Role::Health, &p, ctx(&[]));
        // Watchdogs every 6s (within the 10s interval): healthy, even
        // though one interval was missed in between.
        for i in 0..10 {
            tokio::time::sleep(Duration::from_secs(if i == 5 { 12 } else { 6 })).await;
            h.notice(&Notice::Watchdog);
            h.notice(&Notice::Ready);
        }
        assert!(rx.try_recv().is_err(), "healthy while watchdogs come");
        assert_eq!(verdict(&mut rx).await, Verdict::Unhealthy { reason: "no WATCHDOG=1 within 10s".into() });
    }

    #[tokio::test]
    async fn a_log_probe_passes_on_its_first_matching_line_with_values_matched_literally() {
        let p = probe(
            ProbeKind::Log("^listening on ${ADDR}$".into()),
            Duration::ZERO,
            Duration::from_secs(30),
            1,
        );
        let (h, mut rx) = start(Role::Ready, &p, ctx(&[("ADDR", "1.2.3.4:80")]));
        let w = h.line_watch().expect("a log probe has a line watch");
        w.check(b"listening on 1x2x3x4:80");
        w.check(b"listening on 1.2.3.4:80");
        assert_eq!(verdict(&mut rx).await, Verdict::Ready);
    }

    #[tokio::test]
    async fn probes_that_cannot_start_say_why_and_start_nothing() {
        let report = |_: Verdict| {};
        let c = ctx(&[]);
        let e = spawn_probe(
            Role::Ready,
            &probe(ProbeKind::Tcp("h:${NOPE}".into()), MS, MS, 1),
            c.clone(),
            report,
        )
        .err()
        .unwrap();
        assert!(e.contains("${NOPE}"), "{e}");
        let e = spawn_probe(Role::Health, &probe(ProbeKind::Log("x".into()), MS, MS, 1), c.clone(), report)
            .err()
            .unwrap();
        assert!(e.contains("only be a ready probe"), "{e}");
        let e = spawn_probe(
            Role::Ready,
            &probe(ProbeKind::Log("(${X}".into()), MS, MS, 1),
            ctx(&[("X", "a")]),
            report,
        )
        .err()
        .unwrap();
        assert!(e.contains("not a valid regex"), "{e}");
        assert!(
            spawn_probe(Role::Ready, &probe(ProbeKind::Notify, MS, MS, 1), c, report)
                .unwrap()
                .line_watch()
                .is_none()
        );
        tasks_settle_at(0).await;
    }

    #[test]
    fn dropping_the_handle_stops_the_probe_and_kills_its_exec_check() {
        isolated(module_path!(), "dropping_the_handle_stops_the_probe_and_kills_its_exec_check", || {
            let dir = tempfile::tempdir().unwrap();
            let pid_file = dir.path().join("pid");
            let rt = check::tests::reaping_runtime();
            rt.block_on(async {
                Reaper::become_subreaper().unwrap();
                let reaper = Arc::new(Reaper::default());
                let reaping = check::tests::reap_on_sigchld(reaper.clone());
                let base = tokio::runtime::Handle::current().metrics().num_alive_tasks();
                // `$$$$`: probe strings read `$$` as one `$`.
                let script = format!("echo $$$$ > '{}'; exec sleep 60", pid_file.display());
                let mut p = probe(
                    ProbeKind::Exec(vec!["sh".into(), "-c".into(), script]),
                    MS,
                    Duration::from_secs(60),
                    1,
                );
                p.timeout = Duration::from_secs(60);
                let c = ProbeContext {
                    env: BTreeMap::new(),
                    dir: dir.path().into(),
                    reaper,
                    identity: Identity::default(),
                };
                let (h, mut rx) = start(Role::Ready, &p, c);
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                let pid: i32 = loop {
                    if let Some(pid) =
                        std::fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse().ok())
                    {
                        break pid;
                    }
                    assert!(std::time::Instant::now() < deadline, "the exec check never started");
                    tokio::time::sleep(10 * MS).await;
                };
                drop(h);
                while crate::os::proc::group_alive(pid) {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the check's group {pid} outlived its probe"
                    );
                    tokio::time::sleep(10 * MS).await;
                }
                tasks_settle_at(base).await;
                assert!(rx.try_recv().is_err(), "no verdict from a dropped probe");
                reaping.abort();
            });
        });
    }
}
