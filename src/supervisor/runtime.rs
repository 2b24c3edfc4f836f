//! Bringing a supervisor up and down: the state_dir lock, recovery from a
//! supervisor that was killed, the socket, signals, and readiness.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::actor::{Event, Options, Supervisor};
use super::control;
use super::protocol::StatusReport;
use crate::config::Loaded;
use crate::os::fsutil::{ensure_private_dir, ensure_state_dir, libc_o_nofollow, refuse_link};
use crate::os::proc;
use crate::os::reaper::Reaper;

pub fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("drover.lock")
}

pub fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join("state.json")
}

/// The exclusive lock on a state_dir, held for the supervisor's life.
pub struct StateLock {
    _lock: Flock<File>,
}

/// Takes the state_dir lock, or says which pid holds it.
pub fn acquire_lock(state_dir: &Path) -> Result<StateLock, String> {
    let path = lock_path(state_dir);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc_o_nofollow())
        .open(&path)
        .map_err(|e| format!("cannot open the lock {}: {}", path.display(), refuse_link(&path, e)))?;
    // A supervisor SIGKILLed while a child of it was between fork and exec
    // leaves that child holding the lock until it execs (the descriptor is
    // close-on-exec): when the pid in the lock is gone, wait a moment.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                let _ = lock.set_len(0);
                let _ = lock.rewind();
                let _ = writeln!(lock, "{}", std::process::id());
                let _ = lock.sync_data();
                return Ok(StateLock { _lock: lock });
            }
            Err((mut held, _)) => {
                let mut pid = String::new();
                let _ = held.rewind();
                let _ = held.read_to_string(&mut pid);
                let pid = pid.trim().to_string();
                let holder_alive =
                    pid.parse::<i32>().is_ok_and(|p| proc::pid_alive(p) && !proc::is_zombie(p));
                if holder_alive || std::time::Instant::now() > deadline {
                    let also = if holder_alive {
                        ""
                    } else {
                        " (it has exited; a process it started holds the lock)"
                    };
                    return Err(format!(
                        "another supervisor (pid {pid}) already runs with state_dir {}{also}",
                        state_dir.display()
                    ));
                }
                file = held;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// The reaper thread's stack: it waits, reaps and sends, no more.
const REAPER_STACK: usize = 64 << 10;

/// How long a lock held by a dead supervisor's half-spawned child is waited for.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Blocks until no supervisor holds the lock of `state_dir` (it exited).
pub fn wait_unlocked(state_dir: &Path) {
    if let Ok(file) =
        std::fs::OpenOptions::new().read(true).custom_flags(libc_o_nofollow()).open(lock_path(state_dir))
    {
        let _ = Flock::lock(file, FlockArg::LockShared);
    }
}

/// Whether some process holds the lock of `state_dir` (a supervisor, or
/// for a moment a half-spawned child of a dead one).
pub fn lock_held(state_dir: &Path) -> bool {
    let Ok(file) =
        std::fs::OpenOptions::new().read(true).custom_flags(libc_o_nofollow()).open(lock_path(state_dir))
    else {
        return false;
    };
    Flock::lock(file, FlockArg::LockSharedNonblock).is_err()
}

/// Reads the state file, if there is a readable one.
pub fn read_state(state_dir: &Path) -> Option<StatusReport> {
    let text = std::fs::read(state_path(state_dir)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Whether the supervisor a state file names is still alive (same pid and
/// same start time: a reused pid is not it).
pub fn recorded_supervisor_alive(report: &StatusReport) -> bool {
    match (report.supervisor.pid, report.supervisor.pid_start_ticks) {
        (Some(pid), Some(ticks)) => proc::start_ticks(pid) == Some(ticks),
        (Some(pid), None) => proc::pid_alive(pid),
        _ => false,
    }
}

/// Stops what a supervisor that died without stopping (SIGKILL, crash)
/// left running. Called with the lock held, so that supervisor is gone.
/// Logs one line per process group and returns how many were killed.
pub fn clean_up_after_dead_supervisor(state_dir: &Path) -> usize {
    let mut killed = BTreeSet::new();
    if let Some(report) = read_state(state_dir).filter(|r| r.supervisor.state != "stopped") {
        for w in &report.workers {
            for inst in &w.instances {
                let Some(pgid) = inst.pgid else { continue };
                if proc::kill_recorded_group(pgid, inst.start_ticks) {
                    tracing::warn!(
                        worker = %w.name,
                        instance = inst.index,
                        pgid,
                        "killed a process group the previous supervisor left running"
                    );
                    killed.insert(pgid);
                }
            }
        }
    }
    // The state file lags a spawn by one write, and runs are the ledger's:
    // what a killed supervisor left that only the environment names. With
    // the lock held, every process marked with this state_dir is a leftover.
    for m in kill_marked(state_dir, &killed) {
        tracing::warn!(
            pgid = m.group,
            pid = if m.group.is_none() { Some(m.pids[0]) } else { None },
            processes = m.pids.len(),
            worker = m.worker.as_deref(),
            instance = m.instance.as_deref(),
            run = m.run.as_deref(),
            "killed a process group the previous supervisor left running"
        );
        killed.insert(m.group.unwrap_or(m.pids[0]));
    }
    killed.len()
}

/// A group (or a process alone) of marked processes that was SIGKILLed,
/// and whose it was, by the marks of its first process.
pub struct Marked {
    /// `None`: a process in a spared group, killed alone.
    pub group: Option<i32>,
    pub pids: Vec<i32>,
    pub worker: Option<String>,
    pub instance: Option<String>,
    pub run: Option<String>,
}

/// SIGKILLs the processes marked with `state_dir` (see
/// [`proc::marked_processes`]), a whole group at a time, leaving out the
/// groups in `done` and those of this process and its ancestors (drover
/// started from a shell that is itself a leftover, say).
pub fn kill_marked(state_dir: &Path, done: &BTreeSet<i32>) -> Vec<Marked> {
    let spared: Vec<i32> = proc::self_and_ancestors().into_iter().filter_map(proc::pgid_of).collect();
    let mut groups: BTreeMap<Option<i32>, Vec<i32>> = BTreeMap::new();
    for pid in proc::marked_processes(state_dir) {
        let group = proc::pgid_of(pid).filter(|g| !spared.contains(g) && *g > 1);
        if group.is_some_and(|g| done.contains(&g)) {
            continue;
        }
        groups.entry(group).or_default().push(pid);
    }
    let mut out = Vec::new();
    let units = groups.into_iter().flat_map(|(group, pids)| match group {
        Some(_) => vec![(group, pids)],
        None => pids.into_iter().map(|p| (None, vec![p])).collect(),
    });
    for (group, pids) in units {
        // Read before the kill: a dead process has no environment.
        let var = |name| proc::environ_var(pids[0], name);
        let (worker, instance, run) = (var("DROVER_WORKER"), var("DROVER_INSTANCE"), var("DROVER_RUN"));
        let sent = match group {
            Some(g) => proc::signal_group(g, Signal::SIGKILL).is_ok(),
            None => nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), Signal::SIGKILL).is_ok(),
        };
        if sent {
            out.push(Marked { group, pids, worker, instance, run });
        }
    }
    out
}

/// From here on, a panic anywhere in drover (a bug) SIGKILLs every process
/// group it runs and exits with status 70, rather than leave them orphaned
/// (the hook runs before any unwinding, so it holds with `panic = "abort"`
/// too). The registry names the groups; the environment marker finds what
/// it cannot (the registry held by the panicking thread, a process that
/// left its group).
pub fn install_panic_hook(state_dir: PathBuf) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        // Everything in drover's cgroups, whatever its group or session.
        let cgroups = crate::os::cgroup::kill_set_up();
        let registered = crate::os::groups::kill_all().unwrap_or(0);
        let marked = kill_marked(&state_dir, &BTreeSet::new()).len();
        let _ = writeln!(
            super::own_log::LossyStderr,
            "drover: the supervisor panicked (a bug); killed {registered} process groups it ran \
             and {marked} other marked ones{}; exiting",
            if cgroups { " and everything in its cgroups" } else { "" }
        );
        // SAFETY: _exit ends the process at once, running nothing else:
        // other threads may hold locks that exit handlers would need.
        unsafe { nix::libc::_exit(70) }
    }));
}

/// A test-only fault: with `DROVER_TEST_PANIC_ON_RELOAD=1` a debug build
/// panics on the actor when asked to reload. Compiled out of release
/// builds.
#[cfg(debug_assertions)]
pub fn test_panic_on_reload() {
    if std::env::var_os("DROVER_TEST_PANIC_ON_RELOAD").is_some_and(|v| v == "1") {
        panic!("DROVER_TEST_PANIC_ON_RELOAD is set");
    }
}

/// Where `start --detach` reports readiness: the write end of a pipe to
/// the waiting parent.
pub struct Ready(pub Option<File>);

impl Ready {
    pub fn send(&mut self, msg: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(msg.as_bytes());
        }
    }
}

/// Tells systemd (Type=notify) that drover is ready or stopping.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let msg = format!("{state}\nMAINPID={}", std::process::id());
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(msg.as_bytes(), &addr))
    } else {
        sock.send_to(msg.as_bytes(), Path::new(&path))
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Runs the supervisor until it has stopped. Errors are start-up failures.
pub async fn serve(
    loaded: Loaded,
    overrides: crate::config::Overrides,
    echo: bool,
    ready: &mut Ready,
) -> Result<(), String> {
    let state_dir = loaded.config.supervisor.state_dir.clone();
    let tightened = ensure_state_dir(&state_dir)
        .map_err(|e| format!("cannot use state_dir {}: {e}", state_dir.display()))?;
    if let Some(mode) = tightened {
        tracing::warn!(state_dir = %state_dir.display(), "state_dir was mode {mode:o}: made it 0700 (owner only)");
    }
    if let Some(mode) = ensure_private_dir(&state_dir.join("logs"))
        .map_err(|e| format!("cannot use {}/logs: {e}", state_dir.display()))?
    {
        tracing::warn!(dir = %state_dir.join("logs").display(), "was mode {mode:o}: made it 0700 (owner only)");
    }
    let _lock = acquire_lock(&state_dir)?;
    install_panic_hook(state_dir.clone());

    let killed = clean_up_after_dead_supervisor(&state_dir);
    if killed > 0 {
        tracing::warn!(groups = killed, "stopped what the previous supervisor left running");
    }
    // With the lock held: the state_dir's cgroups are this drover's alone.
    let containment = super::containment::choose(loaded.config.supervisor.containment, &state_dir)?;

    proc::raise_fd_limit();
    proc::close_inherited_on_exec();
    // Low numbers, before the descriptors of instances take them.
    crate::os::spawn::reserve_slots();
    if let Err(e) = Reaper::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper; orphaned grandchildren go to init");
    }
    // Signals first: from here on SIGTERM means a clean stop, not death.
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut sighup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    // Its handlers are all in place: a child puts these back alone.
    crate::os::spawn::note_signal_handlers();

    let (tx, rx) = mpsc::unbounded_channel();
    // Control requests and shutdown: served before other events.
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    let reaper = Arc::new(Reaper::default());
    {
        // A thread of its own, asleep in waitid until a child ends.
        let (reaper, tx) = (reaper.clone(), tx.clone());
        std::thread::Builder::new()
            .name("reaper".into())
            .stack_size(REAPER_STACK)
            .spawn(move || reaper.run(|r| tx.send(Event::Reaped(vec![r])).is_ok()))
            .map_err(|e| format!("cannot start the reaper thread: {e}"))?;
    }
    {
        let (tx, ctl_tx) = (tx.clone(), ctl_tx.clone());
        tokio::spawn(async move {
            loop {
                let sent = tokio::select! {
                    _ = sigterm.recv() => ctl_tx.send(Event::Shutdown),
                    _ = sigint.recv() => ctl_tx.send(Event::Shutdown),
                    _ = sighup.recv() => tx.send(Event::Reload(None)),
                };
                if sent.is_err() {
                    break;
                }
            }
        });
    }

    let sock = control::socket_path(&state_dir);
    if std::fs::symlink_metadata(&sock).is_ok() {
        std::fs::remove_file(&sock)
            .map_err(|e| format!("cannot remove the old socket {}: {e}", sock.display()))?;
    }
    // The socket is born 0600 (no window in which a permissive umask leaves
    // it open); no worker has been spawned yet to inherit this umask.
    let umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(&sock);
    nix::sys::stat::umask(umask);
    let listener = bound.map_err(|e| format!("cannot listen on {}: {e}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;

    // Refused like a bad config: a supervisor that silently serves no
    // metrics would show up as a scrape target that is down, with no why.
    let metrics = match &loaded.config.supervisor.metrics {
        Some(addr) => Some(super::metrics::bind(addr).map(|l| (addr.clone(), l)).map_err(|e| {
            let _ = std::fs::remove_file(&sock);
            format!("{e} (in {})", loaded.path.display())
        })?),
        None => None,
    };

    let opts = Options { config_path: loaded.path.clone(), overrides, echo };
    let mut sup = Supervisor::new(opts, loaded.config, containment.clone(), reaper, tx.clone());
    // Before any worker starts: a supervisor nobody can ask or stop over
    // its socket does not start at all.
    if let Err(e) = control::spawn(listener, ctl_tx.clone(), sup.status_cache()) {
        let _ = std::fs::remove_file(&sock);
        return Err(format!("cannot serve the control socket: {e}"));
    }
    let (watch_tx, watch_rx) = tokio::sync::watch::channel(sup.watch_settings());
    sup.set_watch(watch_tx);
    super::watch::start(loaded.path.clone(), &loaded.text, watch_rx, tx.clone());
    // "ready" (READY=1 to systemd, the line to `start --detach`) comes
    // from the actor once every instance is up, not merely spawned.
    sup.set_ready(Ready(ready.0.take()));
    tracing::info!(pid = std::process::id(), state_dir = %state_dir.display(), "started");
    sup.boot();
    let metrics = metrics.map(|(addr, l)| super::metrics::Server::spawn(addr, l, ctl_tx.clone()));
    sup.set_metrics(metrics, ctl_tx.clone());
    sup.run(rx, ctl_rx).await;
    sd_notify("STOPPING=1");
    if let Some(h) = &containment.cgroups
        && let Err(e) = h.tear_down()
    {
        tracing::warn!(cgroup = %h.base.display(), error = %e, "cannot remove drover's cgroup");
    }
    Ok(())
}
