//! The listening sockets drover holds for one worker, bound when the
//! worker is added and kept across restarts, rolling restarts and reloads;
//! a reload binds only what it adds and closes what it removes.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::config::model::Socket;
use crate::os::listen;

/// A bound socket.
#[derive(Debug)]
struct Held {
    spec: Socket,
    fd: Arc<OwnedFd>,
}

impl Drop for Sockets {
    fn drop(&mut self) {
        for h in &self.held {
            listen::unlink(&h.spec.address);
        }
    }
}

/// A worker's sockets, and why some are not bound.
#[derive(Debug, Default)]
pub struct Sockets {
    /// In the order of the config's list, the bound ones.
    held: Vec<Held>,
    /// The first failure to bind, naming the address and the error.
    error: Option<String>,
}

impl Sockets {
    /// Makes the held sockets those of `wanted`: an address already bound
    /// (with the same mode) is kept as it is, the others are bound, and
    /// the ones no longer wanted are closed. Returns whether all are bound.
    pub fn sync(&mut self, wanted: &[Socket]) -> bool {
        let old = std::mem::take(&mut self.held);
        // Closed first, so that a unix socket whose mode changed is free.
        let (kept, closed): (Vec<Held>, Vec<Held>) = old
            .into_iter()
            .partition(|h| wanted.iter().any(|w| w.address == h.spec.address && w.mode == h.spec.mode));
        for h in closed {
            listen::unlink(&h.spec.address);
        }
        let mut old = kept;
        self.error = None;
        for w in wanted {
            let kept = old.iter().position(|h| h.spec.address == w.address);
            let fd = match kept {
                Some(i) => old.swap_remove(i).fd,
                None => match listen::bind(&w.address, w.mode) {
                    Ok(fd) => Arc::new(fd),
                    Err(e) => {
                        if self.error.is_none() {
                            self.error = Some(format!("cannot bind {}: {e}", w.address));
                        }
                        continue;
                    }
                },
            };
            self.held.push(Held { spec: w.clone(), fd });
        }
        self.error.is_none()
    }

    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// What an instance is started with: each socket and its name, or the
    /// error that keeps it from starting.
    pub fn for_launch(&self) -> Result<Vec<(Arc<OwnedFd>, String)>, String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        Ok(self.held.iter().map(|h| (h.fd.clone(), h.spec.name.clone())).collect())
    }

    /// For status: each address, and whether it is bound.
    pub fn report(&self, wanted: &[Socket]) -> Vec<(String, String, bool)> {
        wanted
            .iter()
            .map(|w| {
                let bound = self.held.iter().any(|h| h.spec.address == w.address);
                (w.address.to_string(), w.name.clone(), bound)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::Address;
    use std::os::fd::AsRawFd;

    fn tcp(port: u16) -> Socket {
        Socket {
            address: Address::Tcp(format!("127.0.0.1:{port}").parse().unwrap()),
            name: "web".into(),
            mode: None,
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn a_reload_keeps_what_it_keeps_and_binds_only_what_it_adds() {
        let (a, b) = (free_port(), free_port());
        let mut s = Sockets::default();
        assert!(s.sync(&[tcp(a)]));
        let first = s.for_launch().unwrap()[0].0.as_raw_fd();
        let mut renamed = tcp(a);
        renamed.name = "http".into();
        assert!(s.sync(&[tcp(b), renamed]));
        let now = s.for_launch().unwrap();
        assert_eq!(now.len(), 2);
        assert_eq!(now[1].0.as_raw_fd(), first, "the same socket, kept open");
        assert_eq!(now[1].1, "http");
        drop(now);
        // Removed: closed, its port free again.
        assert!(s.sync(&[tcp(b)]));
        std::net::TcpListener::bind(("127.0.0.1", a)).unwrap();
    }

    #[test]
    fn a_port_in_use_is_an_error_naming_it_and_a_later_sync_retries() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut s = Sockets::default();
        assert!(!s.sync(&[tcp(port)]));
        let e = s.for_launch().unwrap_err();
        assert!(
            e.starts_with(&format!("cannot bind tcp://127.0.0.1:{port}: ")) && e.contains("in use"),
            "{e}"
        );
        assert_eq!(s.report(&[tcp(port)]), vec![(format!("tcp://127.0.0.1:{port}"), "web".into(), false)]);
        drop(taken);
        assert!(s.sync(&[tcp(port)]));
        assert!(s.error().is_none());
    }

    #[test]
    fn a_unix_socket_file_goes_when_its_socket_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.sock");
        let spec = Socket { address: Address::Unix(path.clone()), name: "w".into(), mode: Some(0o600) };
        let mut s = Sockets::default();
        assert!(s.sync(std::slice::from_ref(&spec)));
        assert!(path.exists());
        let mut renamed = spec.clone();
        renamed.name = "admin".into();
        assert!(s.sync(std::slice::from_ref(&renamed)));
        assert!(path.exists(), "kept under its new name");
        assert!(s.sync(&[]));
        assert!(!path.exists());
    }
}
