//! Worker output: one log file per worker under state_dir/logs, each line
//! prefixed with its time, instance and stream, rotated by size with a
//! bounded number of kept files; and, in the foreground, an echo to
//! drover's stdout. Memory stays bounded: a line longer than
//! [`MAX_LINE`] is split, and the echo drops lines rather than block.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use super::probes::LineWatch;
use crate::os::fsutil::open_append;

/// Longest line kept whole; longer ones are split into pieces this long.
pub const MAX_LINE: usize = 16 * 1024;

/// Where a worker's log lives.
pub fn log_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("logs").join(format!("{name}.log"))
}

/// An append-only log file that rotates itself.
pub struct LogFile {
    path: PathBuf,
    /// `None` until the first line, or while it cannot be opened (out of
    /// descriptors, a full disk): lines are dropped then, and opening is
    /// tried again at most every [`REOPEN_AFTER`].
    file: Option<File>,
    size: u64,
    max_size: u64,
    keep: u32,
    retry_at: Option<Instant>,
}

/// How long a log file that could not be opened is left alone.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

impl LogFile {
    pub fn open(path: PathBuf, max_size: u64, keep: u32) -> io::Result<Self> {
        let file = open_unless_short(&path)?;
        let size = file.metadata()?.len();
        Ok(LogFile { path, file: Some(file), size, max_size, keep, retry_at: None })
    }

    /// A log made on its first line: a run that prints nothing costs no
    /// file (runs come and go by the thousand).
    /// It is also what a log that cannot be opened now starts as.
    pub fn lazy(path: PathBuf, max_size: u64, keep: u32) -> Self {
        LogFile { path, file: None, size: 0, max_size, keep, retry_at: None }
    }

    pub fn write(&mut self, data: &[u8]) {
        if self.file.is_none() && self.retry_at.is_none_or(|t| Instant::now() >= t) {
            self.reopen();
        }
        if self.size + data.len() as u64 > self.max_size && self.size > 0 {
            self.rotate();
        }
        if let Some(f) = &mut self.file
            && f.write_all(data).is_ok()
        {
            self.size += data.len() as u64;
        }
    }

    /// name.log -> name.log.1 -> … -> name.log.KEEP (dropped).
    fn rotate(&mut self) {
        self.file = None;
        let nth = |n: u32| PathBuf::from(format!("{}.{n}", self.path.display()));
        if self.keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            let _ = std::fs::remove_file(nth(self.keep));
            for n in (1..self.keep).rev() {
                let _ = std::fs::rename(nth(n), nth(n + 1));
            }
            let _ = std::fs::rename(&self.path, nth(1));
        }
        self.reopen();
    }

    fn reopen(&mut self) {
        match open_unless_short(&self.path) {
            Ok(f) => {
                self.size = f.metadata().map_or(0, |m| m.len());
                self.file = Some(f);
                self.retry_at = None;
            }
            Err(_) => {
                self.file = None;
                self.retry_at = Instant::now().checked_add(REOPEN_AFTER);
            }
        }
    }
}

/// A log file is not worth drover's last descriptors.
fn open_unless_short(path: &Path) -> io::Result<File> {
    if crate::os::proc::descriptors_short() {
        return Err(io::Error::from_raw_os_error(nix::libc::EMFILE));
    }
    open_append(path)
}

/// Lines to echo on drover's stdout, handed to one thread so that a slow
/// or stuck stdout never stalls the supervisor.
#[derive(Clone)]
pub struct Echo {
    tx: Sender<Vec<u8>>,
    /// What the lines waiting for the echo thread cost: the queue is
    /// bounded by bytes (a line can be 16 KiB), each line charged its
    /// overhead too. The channel grows and shrinks with what waits (no
    /// array of slots held from the start, as a bounded channel's).
    queued: Arc<AtomicUsize>,
}

/// Most bytes of echo output held while stdout is slow.
const ECHO_MAX_QUEUED: usize = 1024 * 1024;

/// What one queued line costs besides its bytes: its Vec and its slot.
const ECHO_LINE_COST: usize = 64;

impl Echo {
    pub fn start() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        let spawned = std::thread::Builder::new().name("drover-echo".into()).spawn(move || {
            let stdout = io::stdout();
            while let Ok(line) = rx.recv() {
                let mut out = stdout.lock();
                let _ = out.write_all(&line);
                q.fetch_sub(line.len() + ECHO_LINE_COST, Ordering::Relaxed);
                drop(line);
                // Flush when nothing else is waiting, so output is live.
                while let Ok(next) = rx.try_recv() {
                    let _ = out.write_all(&next);
                    q.fetch_sub(next.len() + ECHO_LINE_COST, Ordering::Relaxed);
                }
                let _ = out.flush();
            }
        });
        // No thread (out of memory or threads): the closure, and with it
        // the receiver, is gone, so every send fails and each line is
        // dropped from the echo only; the log files still get them.
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the echo thread; worker output goes to the log files only");
        }
        Echo { tx, queued }
    }

    fn send(&self, line: Vec<u8>) {
        let cost = line.len() + ECHO_LINE_COST;
        // Over the cap, or the echo thread gone: the line is dropped (the
        // log file has it).
        if self.queued.fetch_add(cost, Ordering::Relaxed) + cost > ECHO_MAX_QUEUED
            || self.tx.send(line).is_err()
        {
            self.queued.fetch_sub(cost, Ordering::Relaxed);
        }
    }
}

/// Where one worker's output goes.
pub struct Sink {
    pub name: String,
    pub file: Mutex<LogFile>,
    pub echo: Option<Echo>,
    /// Values of the env keys marked secret: masked in every line written.
    pub secrets: RwLock<Vec<Vec<u8>>>,
    /// What a line names its source by, for index i (a run's step names);
    /// empty: the index itself (a worker's instance).
    pub labels: Vec<String>,
}

/// What a secret value is replaced with in the output.
const MASK: &[u8] = b"(secret)";

/// `text` with every occurrence of any of `secrets` replaced by [`MASK`].
fn mask<'t>(text: &'t [u8], secrets: &[Vec<u8>]) -> Cow<'t, [u8]> {
    let mut out: Cow<[u8]> = Cow::Borrowed(text);
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        let Some(first) = find(&out, s) else { continue };
        let mut masked = Vec::with_capacity(out.len());
        let mut rest: &[u8] = &out;
        let mut at = Some(first);
        while let Some(i) = at {
            masked.extend_from_slice(&rest[..i]);
            masked.extend_from_slice(MASK);
            rest = &rest[i + s.len()..];
            at = find(rest, s);
        }
        masked.extend_from_slice(rest);
        out = Cow::Owned(masked);
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Sink {
    pub fn new(name: String, file: LogFile, echo: Option<Echo>, secrets: Vec<Vec<u8>>) -> Self {
        Sink { name, file: Mutex::new(file), echo, secrets: RwLock::new(secrets), labels: Vec::new() }
    }

    /// Lines name their source by `labels[index]` instead of the index.
    pub fn with_labels(mut self, labels: Vec<String>) -> Self {
        self.labels = labels;
        self
    }

    /// After a reload: the secret values to mask from now on.
    pub fn set_secrets(&self, secrets: Vec<Vec<u8>>) {
        *self.secrets.write().unwrap_or_else(|e| e.into_inner()) = secrets;
    }

    fn line(&self, index: u32, stream: &str, text: &[u8]) {
        let secrets = self.secrets.read().unwrap_or_else(|e| e.into_inner());
        let text = &*mask(text, &secrets);
        drop(secrets);
        let ts = super::clock::rfc3339(SystemTime::now());
        let index: &dyn std::fmt::Display = match self.labels.get(index as usize) {
            Some(label) => label,
            None => &index,
        };
        let mut rec = Vec::with_capacity(text.len() + 40);
        let _ = write!(rec, "{ts} {index} {stream} ");
        rec.extend_from_slice(text);
        rec.push(b'\n');
        self.file.lock().unwrap_or_else(|e| e.into_inner()).write(&rec);
        if let Some(echo) = &self.echo {
            let mut e = Vec::with_capacity(text.len() + self.name.len() + 8);
            let _ = write!(e, "{}.{index} | ", self.name);
            e.extend_from_slice(text);
            e.push(b'\n');
            echo.send(e);
        }
    }
}

/// Reads one stream of one instance until it closes, writing whole lines.
/// The read buffer lives on the stack and only between awaits, so an idle
/// instance costs no buffer at all; only a partial line is kept, capped at
/// [`MAX_LINE`].
pub async fn pump(
    sink: Arc<Sink>,
    index: u32,
    stream: &'static str,
    pipe: tokio::net::unix::pipe::Receiver,
    on_close: Option<Box<dyn FnOnce() + Send>>,
) {
    pump_watched(sink, index, stream, pipe, on_close, None).await
}

/// [`pump`], also showing each line (as the instance wrote it, before
/// secrets are masked) to `watch`, a `log` ready probe.
pub async fn pump_watched(
    sink: Arc<Sink>,
    index: u32,
    stream: &'static str,
    pipe: tokio::net::unix::pipe::Receiver,
    on_close: Option<Box<dyn FnOnce() + Send>>,
    watch: Option<LineWatch>,
) {
    let watch = watch.as_ref();
    let mut pending: Vec<u8> = Vec::new();
    'outer: loop {
        if pipe.readable().await.is_err() {
            break;
        }
        // Drain what is there now; yield after a bounded amount so one
        // flooding worker cannot hold a runtime thread.
        for _ in 0..16 {
            let mut buf = [0u8; 16 * 1024];
            let n = match pipe.try_read(&mut buf) {
                Ok(0) => break 'outer,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue 'outer,
                Err(_) => break 'outer,
            };
            split_lines(&sink, index, stream, watch, &mut pending, &buf[..n]);
        }
        tokio::task::yield_now().await;
    }
    if !pending.is_empty() {
        emit(&sink, index, stream, watch, &pending);
    }
    if let Some(f) = on_close {
        f();
    }
}

fn split_lines(
    sink: &Sink,
    index: u32,
    stream: &str,
    watch: Option<&LineWatch>,
    pending: &mut Vec<u8>,
    mut chunk: &[u8],
) {
    while let Some(pos) = chunk.iter().position(|&b| b == b'\n') {
        let (line, rest) = chunk.split_at(pos);
        if pending.is_empty() {
            emit_capped(sink, index, stream, watch, line);
        } else {
            pending.extend_from_slice(line);
            emit_capped(sink, index, stream, watch, pending);
            pending.clear();
        }
        chunk = &rest[1..];
    }
    pending.extend_from_slice(chunk);
    // A line without end: write it in pieces rather than hold it all.
    while pending.len() >= MAX_LINE {
        emit(sink, index, stream, watch, &pending[..MAX_LINE]);
        pending.drain(..MAX_LINE);
    }
    if pending.is_empty() && pending.capacity() > MAX_LINE {
        *pending = Vec::new();
    }
}

fn emit_capped(sink: &Sink, index: u32, stream: &str, watch: Option<&LineWatch>, line: &[u8]) {
    for piece in line.chunks(MAX_LINE) {
        emit(sink, index, stream, watch, piece);
    }
}

fn emit(sink: &Sink, index: u32, stream: &str, watch: Option<&LineWatch>, line: &[u8]) {
    if let Some(w) = watch {
        w.check(line);
    }
    sink.line(index, stream, line);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_wherever_they_occur() {
        let s = |v: &str| v.as_bytes().to_vec();
        let secrets = vec![s("hunter2-long"), s("hunter2")];
        let m = |t: &str| String::from_utf8(mask(t.as_bytes(), &secrets).into_owned()).unwrap();
        assert_eq!(m("no secret here"), "no secret here");
        assert!(matches!(mask(b"plain", &secrets), Cow::Borrowed(_)), "no copy without a secret");
        assert_eq!(m("pw=hunter2;again hunter2"), "pw=(secret);again (secret)");
        assert_eq!(m("hunter2-long"), "(secret)");
        assert_eq!(m("hunter2hunter2"), "(secret)(secret)");
    }

    #[test]
    fn long_lines_are_split_and_partial_lines_joined() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.log");
        let sink = Sink::new("w".into(), LogFile::open(p.clone(), u64::MAX, 0).unwrap(), None, Vec::new());

        let mut pending = Vec::new();
        split_lines(&sink, 0, "out", None, &mut pending, b"hel");
        split_lines(&sink, 0, "out", None, &mut pending, b"lo\nwor");
        split_lines(&sink, 0, "out", None, &mut pending, &[b'x'; 40_000]);
        split_lines(&sink, 0, "out", None, &mut pending, b"\n");
        assert!(pending.is_empty());
        let text = std::fs::read_to_string(&p).unwrap();
        let bodies: Vec<usize> = text.lines().map(|l| l.splitn(4, ' ').nth(3).unwrap().len()).collect();
        assert_eq!(bodies, [5, MAX_LINE, MAX_LINE, 40_003 - 2 * MAX_LINE]);
        assert!(text.lines().next().unwrap().ends_with(" 0 out hello"));
    }

    #[test]
    fn rotation_keeps_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.log");
        let mut f = LogFile::open(p.clone(), 100, 2).unwrap();
        for _ in 0..50 {
            f.write(&[b'x'; 30]);
        }
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["w.log", "w.log.1", "w.log.2"]);
        for n in &names {
            assert!(std::fs::metadata(dir.path().join(n)).unwrap().len() <= 100);
        }
    }
}
