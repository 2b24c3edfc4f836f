//! Watching the config file so that edits apply while drover runs.
//!
//! A watch on the file itself goes quiet after an editor's atomic save
//! (the watched inode is replaced), so the watch is on the directory that
//! holds the config path, plus the directory of whatever a symlinked path
//! resolves to (a Kubernetes ConfigMap re-points `..data`). Events are
//! filtered by name and coalesced for `debounce`; the actor then re-reads
//! the file and does nothing if the result did not change. The env files
//! the config names are watched the same way: a change to one reloads the
//! config, and the workers whose env changed are restarted by the reload.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InotifyEvent, WatchDescriptor};
use tokio::sync::{mpsc, watch};

use super::events::Event;
use crate::os::inotify::AsyncInotify;

/// What the watcher needs from the config, updated on every reload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchSettings {
    pub enabled: bool,
    pub debounce: Duration,
    /// The env files the config reads, watched beside it (a missing
    /// optional one too: creating it is a change).
    pub files: BTreeSet<PathBuf>,
}

impl WatchSettings {
    /// The settings `config` asks for.
    pub fn of(config: &crate::config::Config) -> Self {
        let files = config
            .defaults
            .env_file
            .iter()
            .chain(config.workers.values().flat_map(|w| &w.env_file))
            .chain(config.jobs.values().flat_map(|j| &j.env_file))
            .map(|f| f.path.clone())
            .collect();
        WatchSettings { enabled: config.supervisor.reload, debounce: config.supervisor.debounce.0, files }
    }
}

/// The directories to watch and the file names in them that matter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Targets {
    dirs: BTreeSet<PathBuf>,
    names: BTreeSet<String>,
}

fn targets(config: &Path, env_files: &BTreeSet<PathBuf>) -> Targets {
    let mut t = Targets::default();
    for f in env_files {
        t.extend(file_targets(f));
    }
    t.extend(file_targets(config));
    t
}

impl Targets {
    fn extend(&mut self, other: Targets) {
        self.dirs.extend(other.dirs);
        self.names.extend(other.names);
    }
}

/// The directories and names that matter for one file.
fn file_targets(config: &Path) -> Targets {
    let mut t = Targets::default();
    let mut add = |p: &Path| {
        if let (Some(dir), Some(name)) = (p.parent(), p.file_name()) {
            let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
            t.dirs.insert(dir.to_path_buf());
            t.names.insert(name.to_string_lossy().into_owned());
        }
    };
    add(config);
    // Follow the chain of links one by one: each hop's directory can be
    // where the swap happens.
    let mut cur = config.to_path_buf();
    for _ in 0..8 {
        match std::fs::read_link(&cur) {
            Ok(target) => {
                let next = cur.parent().unwrap_or(Path::new("/")).join(target);
                add(&next);
                cur = next;
            }
            Err(_) => break,
        }
    }
    if let Ok(real) = std::fs::canonicalize(config) {
        add(&real);
    }
    t
}

/// What the directories are watched for: a file made, removed, renamed,
/// closed after a write, or its attributes changed (`touch`), and the
/// directory itself going away. Not opens, reads or writes: every `drover
/// status` opens the config, and a log file appended to beside it (drover's
/// own, often) would wake the watcher at every line.
fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

/// Whether an event concerns the config: its name, a link on its way, or
/// a `..`-prefixed name (Kubernetes writes `..data`, `..data_tmp` and
/// `..2026_…` directories beside the file); events lost to an overflowing
/// queue and a watched directory gone may have, too.
fn relevant(ev: &InotifyEvent, t: &Targets) -> bool {
    let lost = AddWatchFlags::IN_Q_OVERFLOW | AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF;
    if ev.mask.intersects(lost) {
        return true;
    }
    ev.name
        .as_ref()
        .map(|n| n.to_string_lossy())
        .is_some_and(|n| t.names.contains(n.as_ref()) || n.starts_with(".."))
}

/// Sets up the watches now (so that no change made after drover reports
/// ready can be missed), then runs the watcher in the background until
/// the actor goes away. `loaded_text` is what the running config was read
/// from: if the file already differs once the watch is armed, a reload is
/// asked for at once.
pub fn start(
    config: PathBuf,
    loaded_text: &str,
    settings: watch::Receiver<WatchSettings>,
    tx: mpsc::UnboundedSender<Event>,
) {
    let (raw_tx, raw_rx) = mpsc::unbounded_channel::<io::Result<InotifyEvent>>();
    let files = settings.borrow().files.clone();
    let mut w =
        Watch { config, files, reader: None, wds: BTreeMap::new(), watched: Targets::default(), raw_tx };
    let enabled = settings.borrow().enabled;
    w.set(enabled);
    if enabled && crate::config::load::read_text(&w.config).ok().as_deref() != Some(loaded_text) {
        let _ = tx.send(Event::Reload(None));
    }
    tokio::spawn(run(w, raw_rx, settings, tx));
}

/// The inotify instance and the task that reads it, made only while
/// watching is on (an inotify instance is a limited resource: 128 per user
/// by default).
struct Reader {
    ino: Arc<AsyncInotify>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    fn start(tx: mpsc::UnboundedSender<io::Result<InotifyEvent>>) -> io::Result<Reader> {
        let ino = Arc::new(AsyncInotify::new()?);
        let task_ino = ino.clone();
        let task = tokio::spawn(async move {
            loop {
                let batch = task_ino.events().await;
                let failed = batch.is_err();
                let sent = match batch {
                    Ok(events) => events.into_iter().all(|ev| tx.send(Ok(ev)).is_ok()),
                    Err(e) => tx.send(Err(e)).is_ok(),
                };
                if failed || !sent {
                    return;
                }
            }
        });
        Ok(Reader { ino, task })
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Watch {
    config: PathBuf,
    /// The env files watched with it.
    files: BTreeSet<PathBuf>,
    reader: Option<Reader>,
    /// The watched directories' watches.
    wds: BTreeMap<PathBuf, WatchDescriptor>,
    watched: Targets,
    raw_tx: mpsc::UnboundedSender<io::Result<InotifyEvent>>,
}

impl Watch {
    fn set(&mut self, on: bool) {
        if !on {
            self.reader = None;
            self.wds.clear();
            self.watched = Targets::default();
            return;
        }
        if self.reader.is_none() {
            match Reader::start(self.raw_tx.clone()) {
                Ok(r) => self.reader = Some(r),
                Err(e) => {
                    tracing::error!(error = %explain(&e), "cannot watch the config file; use `drover reload` or SIGHUP");
                    return;
                }
            }
        }
        let Some(reader) = self.reader.as_ref() else { return };
        let want = targets(&self.config, &self.files);
        for d in self.watched.dirs.difference(&want.dirs) {
            if let Some(wd) = self.wds.remove(d) {
                reader.ino.remove(wd);
            }
        }
        for d in want.dirs.difference(&self.watched.dirs) {
            match reader.ino.add(d, mask()) {
                Ok(wd) => {
                    self.wds.insert(d.clone(), wd);
                }
                Err(e) => {
                    let e = io::Error::from(e);
                    tracing::warn!(dir = %d.display(), error = %explain(&e), "cannot watch directory");
                }
            }
        }
        self.watched = want;
    }

    /// Watch `wd` is gone: whether the kernel dropped it (its directory
    /// was removed; the next `set` watches it again, if it is back) rather
    /// than `set`, which has forgotten it already.
    fn dropped(&mut self, wd: WatchDescriptor) -> bool {
        let Some(dir) = self.wds.iter().find(|(_, w)| **w == wd).map(|(d, _)| d.clone()) else {
            return false;
        };
        self.wds.remove(&dir);
        self.watched.dirs.remove(&dir);
        true
    }

    /// Takes in one event: whether it may concern the config.
    fn take(&mut self, ev: &InotifyEvent) -> bool {
        if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
            return self.dropped(ev.wd);
        }
        relevant(ev, &self.watched)
    }
}

/// Turns inotify's resource errors into what to do about them.
fn explain(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(nix::libc::ENOSPC) => {
            "the inotify watch limit is reached; raise fs.inotify.max_user_watches".into()
        }
        Some(nix::libc::EMFILE) => "too many inotify instances; raise fs.inotify.max_user_instances".into(),
        _ => e.to_string(),
    }
}

/// The watcher's loop. It sleeps on its channel: no timer runs unless a
/// change is waiting out its debounce.
async fn run(
    mut w: Watch,
    mut raw_rx: mpsc::UnboundedReceiver<io::Result<InotifyEvent>>,
    mut settings: watch::Receiver<WatchSettings>,
    tx: mpsc::UnboundedSender<Event>,
) {
    loop {
        // Wait for the first relevant event (or a settings change).
        tokio::select! {
            ev = raw_rx.recv() => match ev {
                None => return,
                Some(Ok(ev)) if !w.take(&ev) => continue,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watch error; reloading to be safe");
                    // The reader is gone: a new one is made below.
                    w.set(false);
                }
                Some(Ok(_)) => {}
            },
            changed = settings.changed() => {
                if changed.is_err() {
                    return;
                }
                let (on, files) = {
                    let s = settings.borrow();
                    (s.enabled, s.files.clone())
                };
                w.files = files;
                w.set(on);
                continue;
            }
        }
        if !settings.borrow().enabled {
            continue;
        }
        // Coalesce: wait until the config has been quiet for `debounce`.
        let debounce = settings.borrow().debounce;
        let mut deadline = tokio::time::Instant::now() + debounce;
        loop {
            match tokio::time::timeout_at(deadline, raw_rx.recv()).await {
                Err(_) => break,
                Ok(None) => return,
                Ok(Some(Ok(ev))) if !w.take(&ev) => {}
                Ok(Some(_)) => deadline = tokio::time::Instant::now() + debounce,
            }
        }

        if tx.send(Event::Reload(None)).is_err() {
            return;
        }
        // A symlink swap may have moved the file to another directory.
        w.set(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opening the config (as `drover status` does) and appending to a
    /// log beside it raise no event; writing the config does.
    #[tokio::test]
    async fn only_changes_to_files_raise_events_not_opens_or_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (config, log) = (dir.path().join("daemon.toml"), dir.path().join("drover.log"));
        std::fs::write(&config, "a").unwrap();
        let mut log_file = std::fs::File::create(&log).unwrap();
        let ino = AsyncInotify::new().unwrap();
        ino.add(dir.path(), mask()).unwrap();
        for _ in 0..3 {
            std::io::Write::write_all(&mut log_file, b"a line\n").unwrap();
            let _ = std::fs::read(&config).unwrap();
        }
        std::fs::write(&config, "b").unwrap();
        let events = tokio::time::timeout(Duration::from_secs(5), ino.events()).await.unwrap().unwrap();
        let names: Vec<_> = events.iter().map(|e| (e.name.clone(), e.mask)).collect();
        assert!(
            events.iter().all(|e| e.name.as_deref() == Some(std::ffi::OsStr::new("daemon.toml"))),
            "{names:?}"
        );
        assert!(events.iter().any(|e| e.mask.contains(AddWatchFlags::IN_CLOSE_WRITE)), "{names:?}");
        let t =
            Targets { dirs: [dir.path().to_path_buf()].into(), names: ["daemon.toml".to_string()].into() };
        assert!(events.iter().all(|e| relevant(e, &t)));
    }

    #[test]
    fn targets_follow_symlink_chains() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("..2026_01")).unwrap();
        std::fs::write(d.join("..2026_01/daemon.toml"), "").unwrap();
        std::os::unix::fs::symlink("..2026_01", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/daemon.toml", d.join("daemon.toml")).unwrap();
        let t = targets(&d.join("daemon.toml"), &BTreeSet::new());
        assert!(t.dirs.contains(d));
        assert!(t.names.contains("daemon.toml"));
        let real = std::fs::canonicalize(d.join("..2026_01")).unwrap();
        assert!(t.dirs.contains(&real), "{t:?}");
        // Env files elsewhere add their directory and name.
        let t = targets(&d.join("daemon.toml"), &[d.join("env/app.env")].into());
        assert!(t.dirs.contains(&d.join("env")) && t.names.contains("app.env"), "{t:?}");
        assert!(t.names.contains("daemon.toml"));
    }
}
