//! The control socket: a Unix socket in state_dir, mode 0600, one JSON
//! request line and one JSON response line per connection. The server
//! side feeds the actor; the client side is what the CLI uses.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use super::actor::Event;
use super::protocol::{MAX_REQUEST, Request, Response};

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("drover.sock")
}

/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the actor answers a request with: a response, or one it encoded
/// already (a cached status report, shared by every client that asks).
#[derive(Debug)]
pub enum Reply {
    Response(Response),
    Encoded(Arc<Vec<u8>>),
}

/// A response as it goes on the wire: one JSON line.
pub fn encode(resp: &Response) -> Vec<u8> {
    let mut line = serde_json::to_vec(resp).expect("response serializes");
    line.push(b'\n');
    line
}

/// Accepts connections until the actor goes away.
pub async fn serve(listener: UnixListener, tx: mpsc::UnboundedSender<Event>) {
    let mut failing = false;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failing = false;
                stream
            }
            Err(e) => {
                // Out of descriptors (EMFILE) the connection stays queued
                // and accept fails again at once: pause instead of spinning,
                // and say so once, not ten times a second.
                if !failing {
                    tracing::warn!(error = %e, "cannot accept a control connection; retrying every 100 ms");
                }
                failing = true;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };

        let tx = tx.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let gone =
                || Reply::Response(Response::Error { message: "the supervisor is shutting down".into() });
            let reply = match read_request(r).await {
                Ok(req) => {
                    let (otx, orx) = oneshot::channel();
                    if tx.send(Event::Control(req, otx)).is_err() {
                        gone()
                    } else {
                        orx.await.unwrap_or_else(|_| gone())
                    }
                }
                Err(message) => Reply::Response(Response::Error { message }),
            };
            let _ = match reply {
                Reply::Response(resp) => w.write_all(&encode(&resp)).await,
                Reply::Encoded(line) => w.write_all(&line).await,
            };
        });
    }
}

/// Reads one request line from a client: at most [`MAX_REQUEST`] bytes,
/// within [`READ_TIMEOUT`]. Any input gives a request or an error to send
/// back, never a panic (fuzzed by `fuzz/fuzz_targets/control.rs`).
pub async fn read_request<R: tokio::io::AsyncRead + Unpin>(r: R) -> Result<Request, String> {
    let mut reader = tokio::io::BufReader::new(r.take(MAX_REQUEST as u64 + 1));
    let mut line = Vec::new();
    match tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => return Err("timed out waiting for a request".into()),
        Ok(Err(e)) => return Err(format!("cannot read the request: {e}")),
        Ok(Ok(_)) => {}
    }
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    serde_json::from_slice(&line).map_err(|e| format!("malformed request: {e}"))
}

/// Why a request could not be answered.
#[derive(Debug)]
pub enum ClientError {
    /// Nothing listens on the socket: no supervisor runs.
    NoSupervisor,
    Io(std::io::Error),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NoSupervisor => f.write_str("no supervisor is running"),
            ClientError::Io(e) => write!(f, "cannot talk to the supervisor: {e}"),
        }
    }
}

/// Sends one request and waits for its response. `None` means the
/// supervisor closed the connection without answering (as it does when it
/// exits after `stop`).
pub fn request(
    state_dir: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<Option<Response>, ClientError> {
    let path = socket_path(state_dir);
    let mut stream = UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => ClientError::NoSupervisor,
        _ => ClientError::Io(e),
    })?;
    stream.set_read_timeout(timeout).map_err(ClientError::Io)?;
    let mut line = serde_json::to_vec(req).expect("request serializes");
    line.push(b'\n');
    stream.write_all(&line).map_err(ClientError::Io)?;
    let mut reader = BufReader::new(stream);
    let mut buf = String::new();
    match reader.read_line(&mut buf) {
        Ok(0) => Ok(None),
        Ok(_) => serde_json::from_str(&buf)
            .map(Some)
            .map_err(|e| ClientError::Io(std::io::Error::other(format!("bad response: {e}")))),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
        Err(e) => Err(ClientError::Io(e)),
    }
}
