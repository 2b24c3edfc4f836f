//! The control socket: a Unix socket in state_dir, mode 0600, one JSON
//! request line and one JSON response line per connection (a `pretty`
//! status request gets the indented report instead, then the end of the
//! connection; events subscriptions a line per event). The server
//! side feeds the actor; the client side is what the CLI uses.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, SemaphorePermit, broadcast, mpsc, oneshot};

use super::clock::rfc3339;
use super::events::{Event, Reply, StatusCache};
use super::live::{LiveEvent, Subscription, What};
use super::protocol::{MAX_REQUEST, Request, Response, StatusReport};

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("drover.sock")
}

/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A response as it goes on the wire: one JSON line.
pub fn encode(resp: &Response) -> Vec<u8> {
    // Our own types always serialize; should one ever fail, the client
    // still gets a line it can read, and the supervisor goes on.
    let mut line = serde_json::to_vec(resp).unwrap_or_else(|e| {
        let message = format!("cannot encode the reply: {e}");
        serde_json::json!({ "reply": "error", "message": message }).to_string().into_bytes()
    });
    line.push(b'\n');
    line
}

/// A status report as the request asked for it: a reply line, or as
/// `status --json` prints it, indented with a newline at its end (a reply
/// to `pretty`, which is not a reply line). Written into room for what the
/// last one took: a report of a thousand instances is half a megabyte, and
/// growing a buffer to it copies it over and again.
fn encode_status(report: StatusReport, pretty: bool) -> Vec<u8> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static LAST: AtomicUsize = AtomicUsize::new(0);
    let mut out = Vec::with_capacity(LAST.load(Ordering::Relaxed).saturating_add(4096));
    let written = if pretty {
        serde::Serialize::serialize(
            &report,
            &mut serde_json::Serializer::with_formatter(&mut out, Indented::default()),
        )
    } else {
        serde_json::to_writer(&mut out, &Response::Status(Box::new(report)))
    };
    match written {
        Ok(()) => {
            out.push(b'\n');
            LAST.store(out.len(), Ordering::Relaxed);
            out
        }
        Err(e) => encode(&Response::Error { message: format!("cannot encode the reply: {e}") }),
    }
}

/// serde_json's pretty form (two spaces a level), each line break and its
/// indent written at once: its own formatter writes the indent a level at
/// a time, five writes for each field of an instance.
#[derive(Default)]
struct Indented {
    depth: usize,
    has_value: bool,
}

/// A comma, a newline, and the indent of [`Indented::MAX_DEPTH`] levels.
const BREAKS: [u8; 2 + 2 * Indented::MAX_DEPTH] = {
    let mut b = [b' '; 2 + 2 * Indented::MAX_DEPTH];
    b[0] = b',';
    b[1] = b'\n';
    b
};

impl Indented {
    const MAX_DEPTH: usize = 32;

    /// A newline (after a comma unless `first`) and the current indent.
    fn line<W: ?Sized + Write>(&self, w: &mut W, first: bool) -> std::io::Result<()> {
        let start = usize::from(first);
        let depth = self.depth.min(Self::MAX_DEPTH);
        w.write_all(&BREAKS[start..2 + 2 * depth])?;
        (depth..self.depth).try_for_each(|_| w.write_all(b"  "))
    }

    fn open<W: ?Sized + Write>(&mut self, w: &mut W, bracket: &[u8]) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(bracket)
    }

    fn close<W: ?Sized + Write>(&mut self, w: &mut W, bracket: &[u8]) -> std::io::Result<()> {
        self.depth = self.depth.saturating_sub(1);
        if self.has_value {
            self.line(w, true)?;
        }
        w.write_all(bracket)
    }
}

impl serde_json::ser::Formatter for Indented {
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"[")
    }
    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"]")
    }
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.line(w, first)
    }
    fn end_array_value<W: ?Sized + Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"{")
    }
    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"}")
    }
    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.line(w, first)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
    fn end_object_value<W: ?Sized + Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

/// A client that does not take its reply within this long is dropped:
/// a reply it never reads must not hold a descriptor for ever.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Control connections served at once. Beyond it a new connection gets
/// one error line and is closed at once, so clients that never read (or
/// never send) cannot take drover to its descriptor limit. Real clients
/// hold a connection for one round trip; the load benchmark runs 100.
pub const MAX_CLIENTS: usize = 256;

/// Plans carry a config file: their request line may be this long (a
/// 4 MiB file, escaped), read one at a time.
pub const MAX_PLAN_REQUEST: usize = 9 * 1024 * 1024;

/// What a connection beyond [`MAX_CLIENTS`] is told.
fn busy_line() -> Vec<u8> {
    encode(&Response::Error {
        message: format!(
            "the supervisor is serving {MAX_CLIENTS} control connections already (its limit); try again"
        ),
    })
}

/// Serves the control socket on a thread of its own until the process
/// ends: accept, request, usage read, encoding and reply all on that one
/// thread. A status request is the one most asked, by people and by
/// monitoring: handed to a blocking thread and back, it cost two more
/// wake-ups than its reading did work (a tenth of a millisecond of each
/// `status` at a hundred instances). Blocking this thread while a report
/// is read delays only other control clients, never the actor, the pumps
/// or the probes; and reports are read one at a time, so a crowd of
/// clients opens no more /proc files than one does.
pub fn spawn(
    listener: std::os::unix::net::UnixListener,
    tx: mpsc::UnboundedSender<Event>,
    cache: StatusCache,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let listener = {
        let _in_rt = rt.enter();
        listener.set_nonblocking(true)?;
        UnixListener::from_std(listener)?
    };
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || rt.block_on(serve(listener, tx, cache)))?;
    Ok(())
}

/// A status request waiting for the usage of its report's instances.
struct Waiting {
    report: Arc<StatusReport>,
    pretty: bool,
    reply: oneshot::Sender<Arc<Vec<u8>>>,
}

/// Rounds of the reactor a usage read waits while more requests join it.
const JOIN_ROUNDS: usize = 32;

/// Answers status requests with usage read after each of them arrived,
/// one read for all those waiting when it starts: a hundred clients asking
/// in a loop at a thousand instances wait for a read of some milliseconds
/// each time, not for a hundred of them one after another.
async fn read_usage(mut rx: mpsc::UnboundedReceiver<Waiting>) {
    while let Some(first) = rx.recv().await {
        // Connections whose requests are readable now read them first
        // (a yielded task runs after the reactor was polled) and join.
        let mut batch = vec![first];
        for _ in 0..JOIN_ROUNDS {
            tokio::task::yield_now().await;
            let before = batch.len();
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            if batch.len() == before {
                break;
            }
        }
        answer_batch(batch, |report| {
            let mut r = report.clone();
            r.add_usage();
            r
        });
    }
}

/// Answers `batch`: one `with_usage` for the requests of the same report,
/// one encoding for those of them that asked for the same form.
fn answer_batch(mut batch: Vec<Waiting>, mut with_usage: impl FnMut(&StatusReport) -> StatusReport) {
    while let Some(first) = batch.first() {
        let report = first.report.clone();
        let (same, rest): (Vec<_>, Vec<_>) = batch.into_iter().partition(|w| Arc::ptr_eq(&w.report, &report));
        batch = rest;
        let forms: Vec<bool> =
            [false, true].into_iter().filter(|f| same.iter().any(|w| w.pretty == *f)).collect();
        let mut read = Some(with_usage(&report));
        let mut lines: [Option<Arc<Vec<u8>>>; 2] = [None, None];
        for (k, &pretty) in forms.iter().enumerate() {
            let r = if k + 1 == forms.len() { read.take() } else { read.clone() };
            lines[usize::from(pretty)] = r.map(|r| Arc::new(encode_status(r, pretty)));
        }
        for w in same {
            if let Some(line) = &lines[usize::from(w.pretty)] {
                let _ = w.reply.send(line.clone());
            }
        }
    }
}

/// Accepts connections until the actor goes away.
async fn serve(listener: UnixListener, tx: mpsc::UnboundedSender<Event>, cache: StatusCache) {
    let mut failing = false;
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let big = Arc::new(Semaphore::new(1));
    let (usage_tx, usage_rx) = mpsc::unbounded_channel();
    tokio::spawn(read_usage(usage_rx));
    loop {
        let Some((stream, _)) = accepted(listener.accept().await, &mut failing, "control").await else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Never wait on this client: one write of a short line to an
            // empty socket buffer (the std stream is non-blocking, and
            // written at once, not when the reactor says so), then close.
            if let Ok(mut s) = stream.into_std() {
                let _ = std::io::Write::write(&mut s, &busy_line());
            }
            continue;
        };

        let (tx, big, cache, usage_tx) = (tx.clone(), big.clone(), cache.clone(), usage_tx.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let (mut r, mut w) = stream.into_split();
            let gone =
                || Reply::Response(Response::Error { message: "the supervisor is shutting down".into() });
            let mut pretty = false;
            let reply = match read_request(&mut r, &big).await {
                // A long plan keeps its permit until it is answered: its
                // text is in memory until then.
                Ok((req, _permit)) => {
                    pretty = matches!(req, Request::Status { pretty: true, .. });
                    let cached = match req {
                        Request::Status { name: None, .. } => cache.get(),
                        _ => None,
                    };
                    if let Some(report) = cached {
                        Reply::Status(report)
                    } else {
                        let (otx, orx) = oneshot::channel();
                        if tx.send(Event::Control(req, otx)).is_err() {
                            gone()
                        } else {
                            orx.await.unwrap_or_else(|_| gone())
                        }
                    }
                }
                Err(message) => Reply::Response(Response::Error { message }),
            };
            let line = match reply {
                Reply::Events(sub) => return stream_events(sub, r, w).await,
                Reply::Response(resp) => Arc::new(encode(&resp)),
                Reply::Status(report) => {
                    let (otx, orx) = oneshot::channel();
                    let _ = usage_tx.send(Waiting { report, pretty, reply: otx });
                    match orx.await {
                        Ok(line) => line,
                        Err(_) => {
                            Arc::new(encode(&Response::Error { message: "cannot read the status".into() }))
                        }
                    }
                }
            };
            // Timed out or failed: the connection is dropped either way.
            let _ = tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&line)).await;
        });
    }
}

/// What an `accept` gave, or `None` after a pause when it failed: out of
/// descriptors (EMFILE) the connection stays queued and accept fails again
/// at once, so pause instead of spinning, and say so once (`failing`), not
/// ten times a second.
pub async fn accepted<T>(result: std::io::Result<T>, failing: &mut bool, what: &str) -> Option<T> {
    match result {
        Ok(conn) => {
            *failing = false;
            Some(conn)
        }
        Err(e) => {
            if !*failing {
                tracing::warn!(error = %e, "cannot accept a {what} connection; retrying every 100 ms");
            }
            *failing = true;
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

/// Events written to a follower in one go, at most.
const EVENTS_BATCH: usize = 64;

/// Serves a subscription: the recent events, then (following) each one
/// as it comes, until the client closes its end, falls too far behind
/// (a last `lagged` line) or does not read for [`WRITE_TIMEOUT`], or the
/// supervisor stops.
async fn stream_events(sub: Subscription, mut r: OwnedReadHalf, mut w: OwnedWriteHalf) {
    let Subscription { recent, rx, names, serving: _serving } = sub;
    let mut buf = Vec::new();
    for ev in &recent {
        push_event(&mut buf, ev);
    }
    if !write_within(&mut w, &buf).await {
        return;
    }
    let Some(mut rx) = rx else { return };
    let mut scratch = [0u8; 64];
    loop {
        let first = tokio::select! {
            ev = rx.recv() => ev,
            // A follower sends nothing after its request: anything read,
            // or the end, means it is gone.
            _ = r.read(&mut scratch) => return,
        };
        buf.clear();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(got) = next.take() {
            match got {
                Ok(ev) => {
                    if ev.what.concerns(&names) {
                        push_event(&mut buf, &ev);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let lagged =
                        LiveEvent { time: rfc3339(SystemTime::now()), what: What::Lagged { missed } };
                    push_event(&mut buf, &lagged);
                    let _ = write_within(&mut w, &buf).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = write_within(&mut w, &buf).await;
                    return;
                }
            }
            taken += 1;
            // A full batch is written before the next event is taken:
            // one taken and not written would be lost.
            if taken == EVENTS_BATCH {
                break;
            }
            next = match rx.try_recv() {
                Ok(ev) => Some(Ok(ev)),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    Some(Err(broadcast::error::RecvError::Lagged(n)))
                }
                Err(broadcast::error::TryRecvError::Closed) => Some(Err(broadcast::error::RecvError::Closed)),
                Err(broadcast::error::TryRecvError::Empty) => None,
            };
        }
        if !buf.is_empty() && !write_within(&mut w, &buf).await {
            return;
        }
    }
}

/// One event as a JSON line.
fn push_event(buf: &mut Vec<u8>, ev: &LiveEvent) {
    if serde_json::to_writer(&mut *buf, ev).is_ok() {
        buf.push(b'\n');
    }
}

/// Writes `data` unless the client takes longer than [`WRITE_TIMEOUT`].
async fn write_within(w: &mut OwnedWriteHalf, data: &[u8]) -> bool {
    matches!(tokio::time::timeout(WRITE_TIMEOUT, w.write_all(data)).await, Ok(Ok(())))
}

/// Reads one request line from a client: at most [`MAX_REQUEST`] bytes
/// (a plan, at most [`MAX_PLAN_REQUEST`], with the one permit of `big`,
/// returned to be held until the plan is answered), within
/// [`READ_TIMEOUT`]. Any input gives a request or an error to send back,
/// never a panic (fuzzed by `fuzz/fuzz_targets/control.rs`).
pub async fn read_request<R: tokio::io::AsyncRead + Unpin>(
    r: R,
    big: &Semaphore,
) -> Result<(Request, Option<SemaphorePermit<'_>>), String> {
    let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
    let timed_out = || "timed out waiting for a request".to_string();
    let mut reader = tokio::io::BufReader::new(r.take(MAX_REQUEST as u64 + 1));
    let mut line = Vec::new();
    match tokio::time::timeout_at(deadline, reader.read_until(b'\n', &mut line)).await {
        Err(_) => return Err(timed_out()),
        Ok(Err(e)) => return Err(format!("cannot read the request: {e}")),
        Ok(Ok(_)) => {}
    }
    let mut permit = None;
    if line.len() > MAX_REQUEST {
        if !line.starts_with(PLAN_PREFIX) {
            return Err(format!("request longer than {MAX_REQUEST} bytes"));
        }
        // One long request at a time keeps memory bounded.
        permit = Some(
            tokio::time::timeout_at(deadline, big.acquire())
                .await
                .map_err(|_| timed_out())?
                .map_err(|_| timed_out())?,
        );
        reader.get_mut().set_limit((MAX_PLAN_REQUEST - line.len()) as u64 + 1);
        match tokio::time::timeout_at(deadline, reader.read_until(b'\n', &mut line)).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) => return Err(format!("cannot read the request: {e}")),
            Ok(Ok(_)) => {}
        }
        if line.len() > MAX_PLAN_REQUEST {
            return Err(format!("plan request longer than {MAX_PLAN_REQUEST} bytes"));
        }
    }
    let req = serde_json::from_slice(&line).map_err(|e| format!("malformed request: {e}"))?;
    Ok((req, permit))
}

/// How a plan request starts on the wire (the tag comes first), which is
/// what lets it be longer than other requests.
const PLAN_PREFIX: &[u8] = br#"{"cmd":"plan","#;

/// Why a request could not be answered.
#[derive(Debug)]
pub enum ClientError {
    /// Nothing listens on the socket: no supervisor runs.
    NoSupervisor,
    /// The state_dir, its socket or the process answering is someone
    /// else's: talking to it would let that user answer for drover.
    Untrusted(String),
    Io(std::io::Error),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NoSupervisor => f.write_str("no supervisor is running"),
            ClientError::Untrusted(why) => f.write_str(why),
            ClientError::Io(e) => write!(f, "cannot talk to the supervisor: {e}"),
        }
    }
}

/// Whether `path` (a state_dir or its socket) may be trusted by this user:
/// it is this user's own and not a symlink. Ok(false): it does not exist.
fn owned_by_me(path: &Path, what: &str) -> Result<bool, ClientError> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(ClientError::Io(e)),
    };
    let me = nix::unistd::geteuid().as_raw();
    let refuse = |why: String| {
        ClientError::Untrusted(format!(
            "refusing to trust the {what} {}: {why}; someone else could answer for the supervisor. \
             Remove it, or choose another state_dir",
            path.display()
        ))
    };
    if meta.file_type().is_symlink() {
        return Err(refuse("it is a symbolic link".into()));
    }
    if meta.uid() != me {
        return Err(refuse(format!("it belongs to uid {}, not to this user (uid {me})", meta.uid())));
    }
    Ok(true)
}

/// Checks that `state_dir`, if it exists, is this user's own: the files
/// in it (state file, lock) are only read once it is. Ok(false): there
/// is no state_dir.
pub fn trusted_state_dir(state_dir: &Path) -> Result<bool, ClientError> {
    owned_by_me(state_dir, "state_dir")
}

/// Sends one request and waits for its response. `None` means the
/// supervisor closed the connection without answering (as it does when it
/// exits after `stop`). The state_dir, the socket and the process that
/// accepted the connection must all be this user's (see [`ClientError::Untrusted`]).
pub fn request(
    state_dir: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<Option<Response>, ClientError> {
    match request_line(state_dir, req, timeout)? {
        None => Ok(None),
        Some(line) => decode_response(&line).map(Some),
    }
}

/// As [`request`], the response as the supervisor wrote it: one line of
/// JSON, for a client that prints it as it came.
pub fn request_line(
    state_dir: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<Option<String>, ClientError> {
    let mut reader = send(state_dir, req, timeout)?;
    let mut buf = String::new();
    match reader.read_line(&mut buf) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(buf)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
        Err(e) => Err(ClientError::Io(e)),
    }
}

/// A response line read into its type.
pub fn decode_response(line: &str) -> Result<Response, ClientError> {
    Response::decode(line).map_err(|e| ClientError::Io(std::io::Error::other(format!("bad response: {e}"))))
}

/// Connects (see [`request`] for the checks), sends `req` and hands back
/// the connection to read the answer from: one line, or a stream of them
/// for a subscription.
pub fn send(
    state_dir: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<BufReader<UnixStream>, ClientError> {
    let path = socket_path(state_dir);
    if !trusted_state_dir(state_dir)? || !owned_by_me(&path, "control socket")? {
        return Err(ClientError::NoSupervisor);
    }
    let mut stream = UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => ClientError::NoSupervisor,
        _ => ClientError::Io(e),
    })?;
    // The socket could have been swapped since the look above: who
    // accepted is what counts.
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| ClientError::Io(e.into()))?;
    let me = nix::unistd::geteuid().as_raw();
    if peer.uid() != me {
        return Err(ClientError::Untrusted(format!(
            "refusing to talk to {}: the process answering (pid {}) runs as uid {}, not as this user (uid {me})",
            path.display(),
            peer.pid(),
            peer.uid()
        )));
    }
    stream.set_read_timeout(timeout).map_err(ClientError::Io)?;
    let mut line = serde_json::to_vec(req)
        .map_err(|e| ClientError::Io(std::io::Error::other(format!("cannot encode the request: {e}"))))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(ClientError::Io)?;
    // A status reply is hundreds of KB on one line.
    Ok(BufReader::with_capacity(64 * 1024, stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::live::Live;

    /// The same bytes as serde_json's own pretty form, past the depth its
    /// breaks hold too.
    #[test]
    fn indented_is_serde_jsons_pretty_form() {
        let mut deep = serde_json::json!({"leaf": [1, {}], "empty": []});
        for i in 0..2 * Indented::MAX_DEPTH {
            deep = if i % 2 == 0 { serde_json::json!([deep, null]) } else { serde_json::json!({"k": deep}) };
        }
        let docs = [
            serde_json::json!({}),
            serde_json::json!([]),
            serde_json::json!({"a": [], "b": {}, "c": [[], [{}]], "s": "q\"\n\u{1}", "n": -1.5, "t": true}),
            serde_json::json!([1, "two", null, {"x": {"y": [3]}}]),
            deep,
        ];
        for doc in docs {
            let mut ours = Vec::new();
            serde::Serialize::serialize(
                &doc,
                &mut serde_json::Serializer::with_formatter(&mut ours, Indented::default()),
            )
            .unwrap();
            assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string_pretty(&doc).unwrap());
        }
    }

    /// Requests of one report share one usage read and, in the same
    /// form, one encoding; another report gets a read of its own.
    #[test]
    fn a_batch_reads_usage_once_per_report_and_encodes_once_per_form() {
        let report = |name: &str| {
            let mut r = StatusReport::default();
            r.supervisor.state = name.into();
            Arc::new(r)
        };
        let (a, b) = (report("a"), report("b"));
        let mut replies = Vec::new();
        let mut batch = Vec::new();
        for (r, pretty) in [(&a, true), (&b, false), (&a, false), (&a, true)] {
            let (tx, rx) = oneshot::channel();
            batch.push(Waiting { report: r.clone(), pretty, reply: tx });
            replies.push(rx);
        }
        let mut read = Vec::new();
        answer_batch(batch, |r| {
            read.push(r.supervisor.state.clone());
            let mut r = r.clone();
            r.supervisor.pid = Some(7);
            r
        });
        assert_eq!(read, ["a", "b"]);
        let lines: Vec<Arc<Vec<u8>>> = replies.into_iter().map(|mut rx| rx.try_recv().unwrap()).collect();
        assert!(Arc::ptr_eq(&lines[0], &lines[3]), "one encoding for the same report and form");
        assert!(!Arc::ptr_eq(&lines[0], &lines[2]));
        let pretty: serde_json::Value = serde_json::from_slice(&lines[0]).unwrap();
        assert_eq!(
            (pretty["supervisor"]["state"].as_str(), pretty["supervisor"]["pid"].as_i64()),
            (Some("a"), Some(7))
        );
        for (line, state) in [(&lines[1], "b"), (&lines[2], "a")] {
            let text = std::str::from_utf8(line).unwrap();
            match decode_response(text.trim_end()).unwrap() {
                Response::Status(r) => {
                    assert_eq!((r.supervisor.state.as_str(), r.supervisor.pid), (state, Some(7)))
                }
                other => panic!("not a status: {other:?}"),
            }
        }
    }

    /// More events queued than a batch holds: every one reaches the
    /// follower, in order, and the stream ends when the channel closes.
    #[tokio::test]
    async fn a_follower_behind_by_many_batches_gets_every_event() {
        let mut live = Live::new();
        let sub = live.subscribe(vec![], true).unwrap();
        let n = 10 * EVENTS_BATCH as u32 + 7;
        for i in 0..n {
            live.emit(What::Stopped { worker: "w".into(), instance: i });
        }
        drop(live);
        let (server, client) = tokio::net::UnixStream::pair().unwrap();
        let (r, w) = server.into_split();
        let serving = tokio::spawn(stream_events(sub, r, w));
        let mut lines = tokio::io::BufReader::new(client).lines();
        let mut seen = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            match serde_json::from_str::<LiveEvent>(&line).unwrap().what {
                What::Stopped { instance, .. } => seen.push(instance),
                other => panic!("unexpected {other:?}"),
            }
        }
        serving.await.unwrap();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
    }
}
