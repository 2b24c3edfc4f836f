//! The sd_notify protocol for instances: one datagram socket per
//! supervisor, `state_dir/notify.sock`, given to instances as
//! `NOTIFY_SOCKET`. The kernel stamps each datagram with its sender's pid
//! (SO_PASSCRED, SCM_CREDENTIALS), so a message is attributed by who sent
//! it, never by what it says: the sender's pid, or its process group (a
//! child of an instance sends too, from the instance's group).
//!
//! A datagram is lines of `KEY=VALUE`; the keys read are `READY=1`,
//! `STATUS=…`, `WATCHDOG=1`, `STOPPING=1` and `MAINPID=N`, others are
//! ignored. A datagram longer than [`MAX_DATAGRAM`] is dropped whole, and
//! descriptors sent along (`FDSTORE=1`) are closed at once. The receiving
//! task sleeps in the socket until a datagram arrives.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt, sockopt};
use tokio::io::Interest;
use tokio::net::UnixDatagram;
use tokio::sync::mpsc;

use crate::os::proc;

/// Longest datagram read (systemd reads at most this much too).
pub const MAX_DATAGRAM: usize = 4096;

/// Longest `STATUS=` text kept.
pub const MAX_STATUS: usize = 256;

/// One thing an instance said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    Ready,
    /// A free-form line for status, cut at [`MAX_STATUS`] bytes.
    Status(String),
    Watchdog,
    Stopping,
    /// The instance's main process is another pid (a double fork).
    MainPid(i32),
}

/// A notice and who sent it: the sender's pid and, if it could be read
/// from /proc before the sender exited, its process group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotifyEvent {
    pub pid: i32,
    pub pgid: Option<i32>,
    pub notice: Notice,
}

impl NotifyEvent {
    /// The instance the sender belongs to, given the map from an
    /// instance's pid (which is also its process group's id) to its id:
    /// the sender itself, else the group it is in.
    pub fn attribute<K>(&self, instance_by_pid: impl Fn(i32) -> Option<K>) -> Option<K> {
        instance_by_pid(self.pid).or_else(|| self.pgid.and_then(instance_by_pid))
    }
}

/// What one datagram says, in order; unknown or malformed lines are
/// skipped.
pub fn parse(datagram: &[u8]) -> Vec<Notice> {
    let mut out = Vec::new();
    for line in datagram.split(|&b| b == b'\n') {
        let Some(eq) = line.iter().position(|&b| b == b'=') else { continue };
        let (key, value) = (&line[..eq], &line[eq + 1..]);
        let notice = match key {
            b"READY" if value == b"1" => Notice::Ready,
            b"WATCHDOG" if value == b"1" => Notice::Watchdog,
            b"STOPPING" if value == b"1" => Notice::Stopping,
            b"STATUS" => {
                let cut = &value[..value.len().min(MAX_STATUS)];
                Notice::Status(String::from_utf8_lossy(cut).into_owned())
            }
            b"MAINPID" => match std::str::from_utf8(value).ok().and_then(|v| v.parse::<i32>().ok()) {
                Some(pid) if pid > 0 => Notice::MainPid(pid),
                _ => continue,
            },
            _ => continue,
        };
        out.push(notice);
    }
    out
}

/// Where a supervisor's notify socket lives.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("notify.sock")
}

/// The bound socket; the receiving task ends when this is dropped.
pub struct NotifySocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl NotifySocket {
    /// The path to give instances as `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `state_dir/notify.sock` (mode 0600; state_dir is owner-only, so
/// there is no moment when another user can reach it) and starts the task
/// that sends each notice on `tx`. A full `tx` holds the task, and the
/// socket's buffer then holds senders: memory stays bounded. Must be
/// called within a tokio runtime.
pub fn bind(state_dir: &Path, tx: mpsc::Sender<NotifyEvent>) -> io::Result<NotifySocket> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(state_dir);
    if std::fs::symlink_metadata(&path).is_ok() {
        std::fs::remove_file(&path)?;
    }
    let std_sock = std::os::unix::net::UnixDatagram::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    setsockopt(&std_sock, sockopt::PassCred, &true).map_err(io::Error::from)?;
    std_sock.set_nonblocking(true)?;
    let sock = UnixDatagram::from_std(std_sock)?;
    let task = tokio::spawn(receive(sock, tx));
    Ok(NotifySocket { path, task })
}

async fn receive(sock: UnixDatagram, tx: mpsc::Sender<NotifyEvent>) {
    // One byte more than the limit: a datagram that fills it is too long.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    // Room for the credentials and the most descriptors one message can
    // carry (SCM_MAX_FD), so every descriptor sent is seen and closed.
    let mut cmsg = nix::cmsg_space!(UnixCredentials, [RawFd; 253]);
    loop {
        let got = sock.async_io(Interest::READABLE, || recv_one(sock.as_raw_fd(), &mut buf, &mut cmsg)).await;
        let (pid, len) = match got {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "the notify socket failed; instances' notifications are no longer read");
                return;
            }
        };
        let notices = parse(&buf[..len]);
        if notices.is_empty() {
            continue;
        }
        let pgid = proc::pgid_of(pid);
        for notice in notices {
            if tx.send(NotifyEvent { pid, pgid, notice }).await.is_err() {
                return;
            }
        }
    }
}

/// One datagram: `Some((sender pid, length))`, or `None` for one to drop
/// (too long, no credentials).
fn recv_one(fd: RawFd, buf: &mut [u8], cmsg: &mut [u8]) -> io::Result<Option<(i32, usize)>> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_TRUNC,
    )
    .map_err(io::Error::from)?;
    let mut pid = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            match c {
                ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
                ControlMessageOwned::ScmRights(fds) => {
                    for fd in fds {
                        // SAFETY: the kernel just installed this descriptor
                        // for us; nothing else holds it.
                        drop(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
                _ => {}
            }
        }
    }
    // With MSG_TRUNC, `bytes` is the datagram's real length.
    let len = msg.bytes;
    Ok(pid.filter(|p| *p > 0 && len <= MAX_DATAGRAM).map(|p| (p, len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::net::UnixDatagram as StdDatagram;
    use std::process::Command;
    use std::time::Duration;

    #[test]
    fn known_keys_are_read_and_the_rest_ignored() {
        let d = b"READY=1\nSTATUS=warming up: 3/4\nFOO=bar\nWATCHDOG=1\nMAINPID=42\nSTOPPING=1\n\nREADY=0\nnoequals\nMAINPID=-3\nMAINPID=x";
        assert_eq!(
            parse(d),
            [
                Notice::Ready,
                Notice::Status("warming up: 3/4".into()),
                Notice::Watchdog,
                Notice::MainPid(42),
                Notice::Stopping,
            ]
        );
        let long = format!("STATUS={}", "é".repeat(300));
        let [Notice::Status(s)] = &parse(long.as_bytes())[..] else { panic!("one status") };
        assert!(s.len() <= MAX_STATUS + 3, "cut: {}", s.len());
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panic(d in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&d);
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    async fn next(rx: &mut mpsc::Receiver<NotifyEvent>) -> NotifyEvent {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a notice in time")
            .expect("open")
    }

    #[test]
    fn datagrams_carry_their_senders_pid_and_oversized_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let (tx, mut rx) = mpsc::channel(16);
            let sock = bind(dir.path(), tx).unwrap();
            assert_eq!(sock.path(), dir.path().join("notify.sock"));
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(sock.path()).unwrap().permissions().mode() & 0o777, 0o600);
            let me = std::process::id() as i32;
            let c = StdDatagram::unbound().unwrap();
            c.send_to(&vec![b'x'; MAX_DATAGRAM + 1], sock.path()).unwrap();
            c.send_to(b"NONSENSE\xff\n", sock.path()).unwrap();
            c.send_to(b"STATUS=hi\nREADY=1", sock.path()).unwrap();
            let pgid = proc::pgid_of(me);
            assert_eq!(
                next(&mut rx).await,
                NotifyEvent { pid: me, pgid, notice: Notice::Status("hi".into()) }
            );
            assert_eq!(next(&mut rx).await, NotifyEvent { pid: me, pgid, notice: Notice::Ready });
            // A datagram with descriptors: they are closed, the text read.
            let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            let fds = [a.as_raw_fd()];
            let iov = [std::io::IoSlice::new(b"WATCHDOG=1")];
            nix::sys::socket::sendmsg(
                c.as_raw_fd(),
                &iov,
                &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                Some(&nix::sys::socket::UnixAddr::new(sock.path()).unwrap()),
            )
            .unwrap();
            assert_eq!(next(&mut rx).await.notice, Notice::Watchdog);
            let path = sock.path().to_path_buf();
            drop(sock);
            assert!(!path.exists(), "the socket file is removed with it");
        });
    }

    /// Not a test: the sending side, run in a child by
    /// [`a_child_of_an_instance_is_attributed_by_its_process_group`]. It
    /// stays until its stdin closes, so that its group can be read.
    #[test]
    #[ignore = "run by a_child_of_an_instance_is_attributed_by_its_process_group"]
    fn notify_sender_child() {
        let path = std::env::var_os("DROVER_TEST_NOTIFY_TO").expect("DROVER_TEST_NOTIFY_TO");
        StdDatagram::unbound().unwrap().send_to(b"READY=1", path).unwrap();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    }

    #[test]
    fn a_child_of_an_instance_is_attributed_by_its_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        rt().block_on(async {
            let (tx, mut rx) = mpsc::channel(16);
            let sock = bind(dir.path(), tx).unwrap();
            // The "instance" is a shell leading its own group; the sender
            // is a child of it (the `; true` keeps sh from exec'ing it).
            let script = format!(
                "'{}' supervisor::probes::notify::tests::notify_sender_child --exact --ignored >/dev/null 2>&1; true",
                exe.display()
            );
            let mut child = Command::new("sh");
            child.args(["-c", &script]).env("DROVER_TEST_NOTIFY_TO", sock.path()).stdin(std::process::Stdio::piped());
            std::os::unix::process::CommandExt::process_group(&mut child, 0);
            let mut child = child.spawn().unwrap();
            let instance = child.id() as i32;
            let ev = next(&mut rx).await;
            drop(child.stdin.take());
            let status = child.wait().unwrap();
            assert!(status.success());
            assert_eq!(ev.notice, Notice::Ready);
            assert_ne!(ev.pid, instance, "sent by the instance's child");
            assert_eq!(ev.pgid, Some(instance), "from the instance's group");
            assert_eq!(ev.attribute(|p| (p == instance).then_some("web.0")), Some("web.0"));
            assert_eq!(ev.attribute(|p| (p == 1).then_some("other")), None);
        });
    }
}
