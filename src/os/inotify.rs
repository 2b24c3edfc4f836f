//! An inotify instance on the tokio runtime: watches with the exact event
//! mask asked for (so that nothing wakes drover for events it ignores),
//! and a wait for the next batch of events that sleeps until one comes.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::unix::AsyncFd;

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

pub struct AsyncInotify(AsyncFd<Fd>);

impl AsyncInotify {
    /// A new instance, registered with the runtime (call it on one).
    pub fn new() -> io::Result<AsyncInotify> {
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: `Fd` owns the inotify descriptor and always returns it:
        // it stays open and the same for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register_with_interest(Fd(ino), tokio::io::Interest::READABLE) };
        Ok(AsyncInotify(fd.map_err(io::Error::from)?))
    }

    pub fn add(&self, path: &Path, mask: AddWatchFlags) -> nix::Result<WatchDescriptor> {
        self.0.get_ref().0.add_watch(path, mask)
    }

    pub fn remove(&self, wd: WatchDescriptor) {
        let _ = self.0.get_ref().0.rm_watch(wd);
    }

    /// The next events, once there are some.
    pub async fn events(&self) -> io::Result<Vec<InotifyEvent>> {
        loop {
            let mut ready = self.0.readable().await?;
            match ready.try_io(|f| f.get_ref().0.read_events().map_err(io::Error::from)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}
