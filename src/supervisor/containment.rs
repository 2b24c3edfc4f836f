//! Which containment drover uses (`[supervisor] containment`), chosen once
//! at start, and the watch that tells the actor when a cgroup is empty:
//! inotify on `cgroup.events` (of a job step's cgroup from its start, of
//! an instance's once its leader is gone and others remain), read by a
//! task of its own, so nothing polls and the actor reads no file for it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, WatchDescriptor};
use tokio::sync::mpsc;

use super::child::CgroupSpec;
use super::events::Event;
use crate::config::model::Containment;
use crate::os::cgroup::{self, Hierarchy};
use crate::os::inotify::AsyncInotify;

/// The containment in force: cgroups (with their hierarchy), or process
/// groups, the subreaper and the environment marker.
#[derive(Clone, Debug, Default)]
pub struct Mode {
    pub cgroups: Option<Arc<Hierarchy>>,
}

impl Mode {
    /// What status says: "cgroup" or "process-group".
    pub fn name(&self) -> &'static str {
        if self.cgroups.is_some() { "cgroup" } else { "process-group" }
    }

    /// Whether `max_memory` is the cgroup's memory.max (else it is sampled).
    pub fn memory_controller(&self) -> bool {
        self.cgroups.as_ref().is_some_and(|h| h.memory)
    }

    /// In cgroup mode, the cgroup for a child: `what` ("w.web.0", "r.12.1")
    /// with a sequence number, so that no two children of one drover's life
    /// share a name (a surge instance and the one it replaced swap keys;
    /// a resumed run runs a step again).
    pub fn cgroup(&self, what: &str, max_memory: Option<u64>) -> Option<CgroupSpec> {
        static SEQ: AtomicU64 = AtomicU64::new(1);
        let hierarchy = self.cgroups.clone()?;
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        Some(CgroupSpec { hierarchy, name: format!("{what}.{n}"), max_memory })
    }
}

/// Sets up what the config asks for. With "auto", cgroups where drover
/// can make them; with "cgroup", their absence is a start-up error.
/// Called with the state_dir's lock held: leftovers of a dead drover in
/// its cgroups are killed and removed here.
pub fn choose(wanted: Containment, state_dir: &Path) -> Result<Mode, String> {
    if wanted == Containment::ProcessGroup {
        return Ok(Mode::default());
    }
    match Hierarchy::set_up(state_dir) {
        Ok((h, leftovers)) => {
            if leftovers > 0 {
                tracing::warn!(
                    cgroups = leftovers,
                    "killed what the previous supervisor left in its cgroups"
                );
            }
            tracing::info!(cgroup = %h.base.display(), memory = h.memory, "containment: cgroup");
            Ok(Mode { cgroups: Some(Arc::new(h)) })
        }
        Err(e) if wanted == Containment::Cgroup => {
            Err(format!("cannot use cgroups (supervisor.containment = \"cgroup\"): {e}"))
        }
        Err(e) => {
            tracing::info!(reason = %e, "containment: process-group (cgroups cannot be used)");
            Ok(Mode::default())
        }
    }
}

/// Whether a process of a child is left: its cgroup's word in cgroup
/// mode (one small read of cgroup.events, which takes no lock the kernel
/// holds for long: fine on the event loop), else its process group's.
pub fn alive(cgroup: Option<&Path>, pgid: Option<i32>) -> bool {
    match cgroup {
        Some(dir) => cgroup::populated(dir),
        None => pgid.is_some_and(crate::os::proc::group_alive),
    }
}

/// SIGKILLs everything in the cgroup, off the event loop (a write to
/// cgroup.kill takes the kernel's cgroup mutex).
pub fn kill_off_loop(dir: &Path) {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = cgroup::kill(&dir) {
            tracing::warn!(cgroup = %dir.display(), error = %e, "cannot kill a cgroup");
        }
    });
}

/// Removes a cgroup drover is done with, off the event loop: at once when
/// it is empty (as it is after a stop), else once its processes, killed,
/// are gone (a step ended with its output still open, a spawn nobody
/// wanted).
pub fn remove_off_loop(dir: PathBuf) {
    tokio::task::spawn_blocking(move || remove_now(&dir));
}

/// Removes the cgroup here, on a blocking thread (see `remove_off_loop`).
pub fn remove_now(dir: &Path) {
    if let Err(e) = cgroup::remove_when_empty(dir) {
        tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove a cgroup");
    }
}

/// Watches cgroups until they are empty; each empty one is reported once
/// as [`Event::CgroupEmpty`].
pub struct Watch {
    fd: Arc<AsyncInotify>,
    dirs: Arc<Mutex<Watched>>,
    tx: mpsc::UnboundedSender<Event>,
}

/// The cgroups watched, by watch descriptor (for the kernel's events) and
/// by directory (for `forget`): both a hash away, at any number of them.
#[derive(Default)]
struct Watched {
    by_wd: HashMap<WatchDescriptor, PathBuf>,
    // Keyed by the bytes: hashing a Path parses its components.
    by_dir: HashMap<OsString, WatchDescriptor>,
}

impl Watched {
    fn insert(&mut self, wd: WatchDescriptor, dir: &Path) {
        if let Some(old) = self.by_wd.insert(wd, dir.to_path_buf()) {
            self.by_dir.remove(old.as_os_str());
        }
        self.by_dir.insert(dir.as_os_str().to_owned(), wd);
    }

    fn get(&self, wd: &WatchDescriptor) -> Option<&PathBuf> {
        self.by_wd.get(wd)
    }

    fn remove_wd(&mut self, wd: &WatchDescriptor) -> Option<PathBuf> {
        let dir = self.by_wd.remove(wd)?;
        if self.by_dir.get(dir.as_os_str()) == Some(wd) {
            self.by_dir.remove(dir.as_os_str());
        }
        Some(dir)
    }

    fn remove_dir(&mut self, dir: &Path) -> Option<WatchDescriptor> {
        let wd = self.by_dir.remove(dir.as_os_str())?;
        self.by_wd.remove(&wd);
        Some(wd)
    }
}

impl Watch {
    /// Starts the task that reads the watch (on the runtime).
    pub fn start(tx: mpsc::UnboundedSender<Event>) -> std::io::Result<Watch> {
        let fd = Arc::new(AsyncInotify::new()?);
        let dirs: Arc<Mutex<Watched>> = Arc::default();
        let (task_fd, task_dirs, task_tx) = (fd.clone(), dirs.clone(), tx.clone());
        tokio::spawn(async move {
            loop {
                let events = match task_fd.events().await {
                    Ok(events) => events,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the cgroup watch");
                        break;
                    }
                };
                for ev in events {
                    let mut dirs = lock(&task_dirs);
                    if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                        dirs.remove_wd(&ev.wd);
                        continue;
                    }
                    let Some(dir) = dirs.get(&ev.wd) else { continue };
                    if !cgroup::populated(dir) {
                        task_fd.remove(ev.wd);
                        let Some(dir) = dirs.remove_wd(&ev.wd) else { continue };
                        if task_tx.send(Event::CgroupEmpty(dir)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Watch { fd, dirs, tx })
    }

    /// Reports `dir` once it is empty (at once if it is already).
    pub fn add(&self, dir: &Path) {
        let wd = match self.fd.add(&dir.join("cgroup.events"), AddWatchFlags::IN_MODIFY) {
            Ok(wd) => {
                lock(&self.dirs).insert(wd, dir);
                Some(wd)
            }
            Err(e) => {
                // The exit of the leader and the kill's recheck still end it.
                tracing::warn!(cgroup = %dir.display(), error = %e, "cannot watch a cgroup{}", hint(e));
                None
            }
        };
        // Set before this look: an emptying in between is seen either way.
        if cgroup::populated(dir) {
            return;
        }
        // Whoever takes the watch out of the map (this look or the task)
        // reports the cgroup, and removes the watch: the kernel never drops
        // it by itself, not even when the cgroup is removed, so one left
        // behind would be kept (here and in the kernel) for drover's life.
        let report = match wd {
            Some(wd) => {
                let mine = lock(&self.dirs).remove_wd(&wd).is_some();
                if mine {
                    self.fd.remove(wd);
                }
                mine
            }
            None => true,
        };
        if report {
            let _ = self.tx.send(Event::CgroupEmpty(dir.to_path_buf()));
        }
    }
}

impl Watch {
    /// Stops watching `dir` (drover is done with it): the kernel may send
    /// no last event for a cgroup removed soon after it empties, and never
    /// drops a watch by itself.
    pub fn forget(&self, dir: &Path) {
        if let Some(wd) = lock(&self.dirs).remove_dir(dir) {
            self.fd.remove(wd);
        }
    }
}

fn hint(e: nix::errno::Errno) -> &'static str {
    if e == nix::errno::Errno::ENOSPC { " (raise fs.inotify.max_user_watches)" } else { "" }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_child_gets_a_cgroup_name_of_its_own_and_none_without_cgroups() {
        assert!(Mode::default().cgroup("w.web.0", None).is_none());
        let h = Arc::new(Hierarchy { base: PathBuf::from("/sys/fs/cgroup/drover.x"), memory: false });
        let mode = Mode { cgroups: Some(h) };
        let (a, b) = (mode.cgroup("w.web.0", Some(512)), mode.cgroup("w.web.0", None));
        let (a, b) = (a.expect("a cgroup"), b.expect("a cgroup"));
        assert!(a.name.starts_with("w.web.0.") && b.name.starts_with("w.web.0."), "{} {}", a.name, b.name);
        assert_ne!(a.name, b.name);
        assert_eq!((a.max_memory, b.max_memory), (Some(512), None));
        assert_eq!(mode.name(), "cgroup");
        assert_eq!(Mode::default().name(), "process-group");
    }

    #[test]
    fn a_child_without_a_cgroup_is_alive_by_its_process_group() {
        // Our own group is alive; a cgroup that does not exist is empty.
        let own = nix::unistd::getpgrp().as_raw();
        assert!(alive(None, Some(own)));
        assert!(!alive(None, None));
        assert!(!alive(Some(Path::new("/no/such/cgroup")), Some(own)));
    }
}
