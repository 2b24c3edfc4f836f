//! The state file (`state.json`): what `status` shows when no supervisor
//! answers. It is written whole (a temp file, fsync, rename) on a blocking
//! thread, never on the event loop: an fsync takes milliseconds, tens on a
//! busy disk, and every restart waiting behind it would take as long.
//! Writes coalesce: while one is under way, only the newest report waits.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::protocol::StatusReport;

pub struct StateFile {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    queue: Mutex<Queue>,
    /// Held while a write is on disk: one at a time (they share a temp name).
    disk: Mutex<()>,
    /// The last report was written: nothing queued earlier may follow it.
    sealed: AtomicBool,
}

#[derive(Default)]
struct Queue {
    newest: Option<StatusReport>,
    /// A blocking thread is draining the queue.
    draining: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StateFile {
    pub fn new(path: PathBuf) -> Self {
        StateFile {
            inner: Arc::new(Inner {
                path,
                queue: Mutex::new(Queue::default()),
                disk: Mutex::new(()),
                sealed: AtomicBool::new(false),
            }),
        }
    }

    /// Queues `report`; a blocking thread writes it, or the newer one that
    /// replaces it meanwhile. Without a runtime (unit tests), written here.
    pub fn write_soon(&self, report: StatusReport) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return self.inner.write(&report);
        };
        let mut q = lock(&self.inner.queue);
        q.newest = Some(report);
        if q.draining {
            return;
        }
        q.draining = true;
        drop(q);
        let inner = self.inner.clone();
        rt.spawn_blocking(move || inner.drain());
    }

    /// Writes `report` now, on this thread, as the last: a queued write
    /// still under way is finished first, and any other is dropped.
    pub fn write_last(&self, report: &StatusReport) {
        self.inner.sealed.store(true, Ordering::SeqCst);
        lock(&self.inner.queue).newest = None;
        self.inner.write(report);
    }
}

impl Inner {
    fn drain(&self) {
        loop {
            let report = {
                let mut q = lock(&self.queue);
                match q.newest.take() {
                    Some(r) if !self.sealed.load(Ordering::SeqCst) => r,
                    _ => {
                        q.draining = false;
                        return;
                    }
                }
            };
            let _disk = lock(&self.disk);
            if self.sealed.load(Ordering::SeqCst) {
                continue;
            }
            self.write_unlocked(&report);
        }
    }

    fn write(&self, report: &StatusReport) {
        let _disk = lock(&self.disk);
        self.write_unlocked(report);
    }

    fn write_unlocked(&self, report: &StatusReport) {
        let data = serde_json::to_vec(report).unwrap_or_default();
        if let Err(e) = crate::os::fsutil::write_atomic(&self.path, &data) {
            tracing::error!(error = %e, path = %self.path.display(), "cannot write the state file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: &str) -> StatusReport {
        let mut r: StatusReport =
            serde_json::from_str(r#"{"supervisor":{"state":"x","generation":0},"workers":[]}"#)
                .expect("report");
        r.supervisor.state = state.into();
        r
    }

    fn state_of(path: &std::path::Path) -> String {
        let text = std::fs::read_to_string(path).expect("state file");
        let r: StatusReport = serde_json::from_str(&text).expect("whole");
        r.supervisor.state
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_writes_land_newest_last_and_the_last_write_stays_last() {
        let dir = std::env::temp_dir().join(format!("drover-state-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.json");
        let f = StateFile::new(path.clone());
        for i in 0..200 {
            f.write_soon(report(&format!("running {i}")));
        }
        // The queue drains to the newest report.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !(path.exists() && state_of(&path) == "running 199") {
            assert!(std::time::Instant::now() < deadline, "the newest report never landed");
            tokio::task::yield_now().await;
        }
        // After the last write, nothing queued lands.
        f.write_soon(report("running late"));
        f.write_last(&report("stopped"));
        f.write_soon(report("after the end"));
        tokio::task::spawn_blocking(|| ()).await.expect("a blocking thread ran");
        let drained = || !lock(&f.inner.queue).draining;
        while !drained() {
            assert!(std::time::Instant::now() < deadline, "the queue never drained");
            tokio::task::yield_now().await;
        }
        assert_eq!(state_of(&path), "stopped");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
