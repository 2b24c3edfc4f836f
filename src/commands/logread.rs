//! Reading log files as drover writes them (`TIME INSTANCE STREAM TEXT`,
//! rotated to NAME.log.1 … NAME.log.KEEP): the last lines, read from the
//! end so a huge file costs only what is printed; and a follower woken by
//! inotify on the log's directory, which keeps its file open so that a
//! rotation loses no line.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

/// Bytes read per step when reading backwards.
const CHUNK: u64 = 64 * 1024;
/// A "line" longer than this (not one drover wrote) is cut, so that a
/// file without newlines cannot make a reader hold all of it.
const MAX_LINE: usize = 1024 * 1024;

/// Which lines to print.
#[derive(Clone, Copy, Debug, Default)]
pub struct Filter {
    /// Only lines written at or after this time.
    pub since: Option<SystemTime>,
    /// Only lines of this instance.
    pub instance: Option<u32>,
}

impl Filter {
    fn instance_ok(&self, line: &[u8]) -> bool {
        self.instance.is_none_or(|want| field(line, 1).is_some_and(|f| f == want.to_string().as_bytes()))
    }
}

/// The `n`th space-separated field of a log line.
fn field(line: &[u8], n: usize) -> Option<&[u8]> {
    line.splitn(4, |&b| b == b' ').nth(n)
}

/// When a log line was written (its first field).
pub fn line_time(line: &[u8]) -> Option<SystemTime> {
    let f = std::str::from_utf8(field(line, 0)?).ok()?;
    humantime::parse_rfc3339_weak(f).ok()
}

/// One log: where it is, and the label its lines get when several logs
/// are printed together.
#[derive(Clone, Debug)]
pub struct Source {
    pub label: Option<String>,
    pub path: PathBuf,
}

/// `path.N`: a rotated generation of `path`.
fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The lines of a file from its end to its start, each without its
/// newline. Holds one chunk and at most one partial line.
struct RevLines {
    file: File,
    /// Where the not yet read part of the file ends.
    pos: u64,
    /// Bytes from `pos` on not yet given out; every line in it ends with
    /// a newline, except possibly the first (begun before `pos`).
    buf: Vec<u8>,
}

impl RevLines {
    /// Lines up to `end` of `file` (which should be just after a newline).
    fn new(file: File, end: u64) -> Self {
        RevLines { file, pos: end, buf: Vec::new() }
    }

    fn next_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            // buf is "…\n" or empty.
            if self.buf.is_empty() && self.pos == 0 {
                return Ok(None);
            }
            if !self.buf.is_empty() {
                let body = &self.buf[..self.buf.len() - 1];
                if let Some(i) = body.iter().rposition(|&b| b == b'\n') {
                    let line = body[i + 1..].to_vec();
                    self.buf.truncate(i + 1);
                    return Ok(Some(line));
                }
                if self.pos == 0 || body.len() >= MAX_LINE {
                    let line = body.to_vec();
                    self.buf.clear();
                    if self.pos > 0 {
                        self.buf.push(b'\n'); // the rest of the cut line comes next
                    }
                    return Ok(Some(line));
                }
            }
            let step = CHUNK.min(self.pos);
            self.pos -= step;
            self.file.seek(SeekFrom::Start(self.pos))?;
            let mut chunk = vec![0; step as usize];
            self.file.read_exact(&mut chunk)?;
            if self.buf.is_empty() {
                // The first chunk read: it ends with a newline (see `new`).
                if chunk.last() != Some(&b'\n') {
                    chunk.push(b'\n');
                }
            }
            chunk.extend_from_slice(&self.buf);
            self.buf = chunk;
        }
    }
}

/// Where the last complete line of `file` ends (a line being written is
/// left to the follower).
fn complete_end(file: &mut File, len: u64) -> io::Result<u64> {
    let mut end = len;
    let mut buf = vec![0u8; 4096];
    while end > 0 {
        let step = (buf.len() as u64).min(end);
        file.seek(SeekFrom::Start(end - step))?;
        file.read_exact(&mut buf[..step as usize])?;
        if let Some(i) = buf[..step as usize].iter().rposition(|&b| b == b'\n') {
            return Ok(end - step + i as u64 + 1);
        }
        end -= step;
    }
    Ok(0)
}

/// One line found by [`tail`].
pub struct Found {
    pub time: Option<SystemTime>,
    pub source: usize,
    pub line: Vec<u8>,
}

/// The last `n` lines of each source that pass `filter` (reading the
/// rotated files too when the current one has too few), oldest first and,
/// across sources, in time order; at most `n` in all. Also the open
/// current file of each source and the offset its complete lines end at,
/// for a follower to go on from.
pub fn tail(sources: &[Source], n: usize, filter: Filter) -> io::Result<(Vec<Found>, Vec<Tracked>)> {
    let mut all = Vec::new();
    let mut tracked = Vec::new();
    for (index, src) in sources.iter().enumerate() {
        let mut t = Tracked::new(src.clone());
        let mut found = Vec::new();
        let open = |path: &Path| match File::open(path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        let mut next = match open(&src.path)? {
            Some(mut file) => {
                let meta = file.metadata()?;
                let end = complete_end(&mut file, meta.len())?;
                t.ino = meta.ino();
                t.pos = end;
                t.file = Some(file.try_clone()?);
                Some((file, end))
            }
            None => None,
        };
        let mut generation = 0;
        'files: while let Some((file, end)) = next.take() {
            let mut lines = RevLines::new(file, end);
            while found.len() < n {
                let Some(line) = lines.next_line()? else { break };
                let time = line_time(&line);
                if let (Some(since), Some(t)) = (filter.since, time)
                    && t < since
                {
                    break 'files; // older files are older still
                }
                if filter.instance_ok(&line) {
                    found.push(Found { time, source: index, line });
                }
            }
            generation += 1;
            if found.len() >= n || generation > 10_000 {
                break;
            }
            next = match open(&rotated(&src.path, generation))? {
                Some(f) => {
                    let len = f.metadata()?.len();
                    Some((f, len))
                }
                None => None,
            };
        }
        found.reverse();
        all.extend(found);
        tracked.push(t);
    }
    if sources.len() > 1 {
        // Lines without a readable time keep the time of the one before.
        let mut last = SystemTime::UNIX_EPOCH;
        let mut keyed: Vec<(SystemTime, usize, Found)> = Vec::with_capacity(all.len());
        let mut prev_source = usize::MAX;
        for (i, f) in all.into_iter().enumerate() {
            if f.source != prev_source {
                last = SystemTime::UNIX_EPOCH;
                prev_source = f.source;
            }
            last = f.time.unwrap_or(last);
            keyed.push((last, i, f));
        }
        keyed.sort_by_key(|(t, i, _)| (*t, *i));
        all = keyed.into_iter().map(|(_, _, f)| f).collect();
        let skip = all.len().saturating_sub(n);
        all.drain(..skip);
    }
    Ok((all, tracked))
}

/// Writes a line, with its source's label in front when it has one.
pub fn write_line(out: &mut impl Write, label: Option<&str>, line: &[u8]) -> io::Result<()> {
    if let Some(l) = label {
        out.write_all(l.as_bytes())?;
        out.write_all(b" | ")?;
    }
    out.write_all(line)?;
    out.write_all(b"\n")
}

/// A log being followed: its file held open, so that what is written to
/// it before a rotation is read from the renamed file.
pub struct Tracked {
    src: Source,
    file: Option<File>,
    ino: u64,
    pos: u64,
    partial: Vec<u8>,
}

impl Tracked {
    /// A log to be printed from its start: the follower's first look
    /// prints what is there, a chunk at a time.
    pub fn new(src: Source) -> Self {
        Tracked { src, file: None, ino: 0, pos: 0, partial: Vec::new() }
    }

    /// Prints what was appended since the last look; moves to the new file
    /// after a rotation, once the old one is read to its end.
    pub fn catch_up(&mut self, filter: Filter, out: &mut impl Write) -> io::Result<()> {
        let current = std::fs::metadata(&self.src.path).ok().map(|m| m.ino());
        let replaced = current.is_some_and(|ino| self.file.is_none() || ino != self.ino);
        self.drain(filter, out)?;
        if replaced {
            // Rotated once or more since the last look: the files between
            // the old one (now NAME.log.K) and the new are read too.
            for (ino, f) in files_after(&self.src.path, self.file.as_ref().map(|_| self.ino)) {
                self.ino = ino;
                self.file = Some(f);
                self.pos = 0;
                self.partial.clear();
                self.drain(filter, out)?;
            }
        }
        Ok(())
    }

    fn drain(&mut self, filter: Filter, out: &mut impl Write) -> io::Result<()> {
        let Some(f) = &mut self.file else { return Ok(()) };
        if f.metadata().map(|m| m.len()).unwrap_or(0) < self.pos {
            self.pos = 0; // truncated in place
        }
        f.seek(SeekFrom::Start(self.pos))?;
        let mut buf = vec![0u8; CHUNK as usize];
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.pos += n as u64;
            let mut chunk = &buf[..n];
            while let Some(i) = chunk.iter().position(|&b| b == b'\n') {
                self.partial.extend_from_slice(&chunk[..i]);
                let line = std::mem::take(&mut self.partial);
                if filter.instance_ok(&line) {
                    write_line(out, self.src.label.as_deref(), &line)?;
                }
                chunk = &chunk[i + 1..];
            }
            self.partial.extend_from_slice(chunk);
            if self.partial.len() > MAX_LINE {
                let line = std::mem::take(&mut self.partial);
                write_line(out, self.src.label.as_deref(), &line)?;
            }
        }
        out.flush()
    }

    fn file_name(&self) -> Option<&std::ffi::OsStr> {
        self.src.path.file_name()
    }
}

/// The files a follower reads after `old` (the inode of the one it read
/// to its end; none on its first look), oldest first and each held open
/// with its inode: the rotated since, then the current one. Empty when
/// there is no current file (between a rotation's rename and its new
/// file): the follower keeps the old one and looks again at its next
/// wake-up.
///
/// A rotation renames the kept files one at a time, so a look while one
/// runs may find a gap where the old file was about to be, or the current
/// file gone on to `.1`: such a look is taken again (a rotation is some
/// twenty renames; its files are not read twice, and none is skipped).
fn files_after(path: &Path, old: Option<u64>) -> Vec<(u64, File)> {
    let mut last = Vec::new();
    for attempt in 0..ROTATION_LOOKS {
        let (files, whole) = look_after(path, old);
        if whole {
            return files;
        }
        last = files;
        if attempt < 4 {
            std::thread::yield_now();
        } else {
            // A writer descheduled mid-rotation: bounded, and only ever
            // after a rotation.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // Still no consistent look: the old file is gone for good (rotated
    // past the kept count while the follower lagged), so every kept file
    // is newer than it.
    last
}

/// Looks taken by [`files_after`] at most.
const ROTATION_LOOKS: usize = 50;

/// One look for [`files_after`], and whether it is whole: a current file,
/// the old one found among the rotated (when there is one), and no
/// rotation finished while looking.
fn look_after(path: &Path, old: Option<u64>) -> (Vec<(u64, File)>, bool) {
    let ino_of = |f: &File| f.metadata().map_or(0, |m| m.ino());
    // The current file first, held: a rotation that ends while the rest
    // is looked at moves it, which the last check sees.
    let Ok(current) = File::open(path) else { return (Vec::new(), false) };
    let current_ino = ino_of(&current);
    let mut files = vec![(current_ino, current)];
    let mut found = old.is_none();
    if let Some(old) = old {
        for k in 1..=10_000 {
            let Ok(f) = File::open(rotated(path, k)) else { break };
            let ino = ino_of(&f);
            if ino == old {
                found = true;
                break;
            }
            if files.iter().all(|(seen, _)| *seen != ino) {
                files.push((ino, f));
            }
        }
    }
    let settled = std::fs::metadata(path).is_ok_and(|m| m.ino() == current_ino);
    files.reverse();
    (files, found && settled)
}

/// Something else a follower watches: files in `dir` whose names start
/// with `prefix` (the ledger, for `attach`).
pub struct AlsoWatch {
    pub dir: PathBuf,
    pub prefix: String,
}

/// After a wake-up on `also`, how long until `done` is asked once more: a
/// reader may look a moment before the writer's commit is visible.
const SETTLE: Duration = Duration::from_millis(200);

/// Prints what is appended to the tracked logs until `done` gives an exit
/// code (asked after each wake-up) or stdout closes. Sleeps in the kernel
/// between changes: woken by inotify on the logs' directories, only for
/// writes, creations, renames and removals of the files it follows (its
/// own opens and reads wake it not).
pub fn follow(
    mut tracked: Vec<Tracked>,
    filter: Filter,
    also: Option<AlsoWatch>,
    mut done: impl FnMut() -> Option<u8>,
) -> Result<u8, String> {
    use notify::event::{EventKind, ModifyKind};
    use notify::{RecursiveMode, Watcher};

    let mut names: Vec<(Option<PathBuf>, std::ffi::OsString)> = tracked
        .iter()
        .filter_map(|t| Some((t.src.path.parent().map(Path::to_path_buf), t.file_name()?.to_owned())))
        .collect();
    if let Some(a) = &also {
        names.push((Some(a.dir.clone()), a.prefix.clone().into()));
    }
    let prefixes: Vec<Vec<u8>> = names.iter().map(|(_, n)| n.as_encoded_bytes().to_vec()).collect();
    let (tx, rx) = mpsc::sync_channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else { return };
        let relevant = match ev.kind {
            EventKind::Create(_) | EventKind::Remove(_) => true,
            EventKind::Modify(ModifyKind::Metadata(_)) => false,
            EventKind::Modify(_) => true,
            _ => false,
        };
        let ours = ev.paths.iter().any(|p| {
            p.file_name().is_some_and(|n| prefixes.iter().any(|pre| n.as_encoded_bytes().starts_with(pre)))
        });
        if relevant && ours {
            // A wake-up already pending covers this change too.
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| watch_error(&e))?;
    let mut dirs: Vec<PathBuf> = names.into_iter().filter_map(|(d, _)| d).collect();
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        if !d.is_dir() {
            return Err(format!(
                "cannot follow: {} does not exist (has the supervisor run yet?)",
                d.display()
            ));
        }
        watcher.watch(d, RecursiveMode::NonRecursive).map_err(|e| watch_error(&e))?;
    }
    let stdout = io::stdout();
    let mut settle = false;
    loop {
        // Ask first, print after: what was written before the end is shown.
        let finished = done();
        {
            let mut out = stdout.lock();
            for t in &mut tracked {
                if t.catch_up(filter, &mut out).is_err() {
                    return Ok(super::exit::OK); // stdout closed
                }
            }
        }
        if let Some(code) = finished {
            return Ok(code);
        }
        if also.is_some() && settle {
            match rx.recv_timeout(SETTLE) {
                Ok(()) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => settle = false,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(super::exit::OK),
            }
            continue;
        }
        if rx.recv().is_err() {
            return Ok(super::exit::OK);
        }
        settle = true;
    }
}

fn watch_error(e: &notify::Error) -> String {
    let msg = e.to_string();
    if msg.contains("No space left") || msg.contains("limit") {
        format!("cannot watch the log files: {msg} (raise fs.inotify.max_user_watches or max_user_instances)")
    } else {
        format!("cannot watch the log files: {msg}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(p: &Path) -> Source {
        Source { label: None, path: p.to_path_buf() }
    }

    fn texts(found: &[Found]) -> Vec<String> {
        found.iter().map(|f| String::from_utf8_lossy(&f.line).into_owned()).collect()
    }

    #[test]
    fn reverse_lines_cross_chunks_and_skip_a_partial_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.log");
        let mut text = String::new();
        for i in 0..20_000 {
            text.push_str(&format!("2026-01-01T00:00:00.000Z 0 out line {i}\n"));
        }
        text.push_str("2026-01-01T00:00:00.000Z 0 out partial");
        std::fs::write(&p, &text).unwrap();
        let (found, tracked) = tail(&[src(&p)], 3, Filter::default()).unwrap();
        assert_eq!(
            texts(&found),
            (19_997..20_000).map(|i| format!("2026-01-01T00:00:00.000Z 0 out line {i}")).collect::<Vec<_>>()
        );
        assert_eq!(tracked[0].pos as usize, text.rfind('\n').unwrap() + 1);
        let (all, _) = tail(&[src(&p)], usize::MAX, Filter::default()).unwrap();
        assert_eq!(all.len(), 20_000);
    }

    #[test]
    fn tail_reads_rotated_files_and_filters() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.log");
        std::fs::write(rotated(&p, 2), "2026-01-01T00:00:01Z 0 out a\n").unwrap();
        std::fs::write(rotated(&p, 1), "2026-01-01T00:00:02Z 1 out b\n2026-01-01T00:00:03Z 0 err c\n")
            .unwrap();
        std::fs::write(&p, "2026-01-01T00:00:04Z 1 out d\n").unwrap();
        let (found, _) = tail(&[src(&p)], 10, Filter::default()).unwrap();
        assert_eq!(texts(&found).iter().map(|l| &l[l.len() - 1..]).collect::<String>(), "abcd");
        let f = Filter { instance: Some(0), ..Filter::default() };
        let (found, _) = tail(&[src(&p)], 10, f).unwrap();
        assert_eq!(texts(&found).iter().map(|l| &l[l.len() - 1..]).collect::<String>(), "ac");
        let since = humantime::parse_rfc3339("2026-01-01T00:00:02Z").unwrap();
        let (found, _) = tail(&[src(&p)], 10, Filter { since: Some(since), ..Filter::default() }).unwrap();
        assert_eq!(texts(&found).iter().map(|l| &l[l.len() - 1..]).collect::<String>(), "bcd");
    }

    #[test]
    fn several_sources_interleave_by_time_and_keep_the_last_n() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.log");
        let b = dir.path().join("b.log");
        std::fs::write(&a, "2026-01-01T00:00:01Z 0 out 1\n2026-01-01T00:00:03Z 0 out 3\n").unwrap();
        std::fs::write(&b, "2026-01-01T00:00:02Z 0 out 2\n2026-01-01T00:00:04Z 0 out 4\n").unwrap();
        let (found, _) = tail(&[src(&a), src(&b)], 3, Filter::default()).unwrap();
        assert_eq!(texts(&found).iter().map(|l| &l[l.len() - 1..]).collect::<String>(), "234");
        assert_eq!(found.iter().map(|f| f.source).collect::<Vec<_>>(), [1, 0, 1]);
    }

    /// The supervisor's own log writer rotating as fast as it can while a
    /// follower catches up as fast as it can: every look in the middle of
    /// a rotation (the kept files renamed one at a time) is one where a
    /// file could be skipped. Not one line is lost or read twice.
    #[test]
    fn a_follower_misses_no_line_while_rotations_run_under_it() {
        const LINES: u32 = 3000;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.log");
        let mut log = crate::supervisor::logs::LogFile::open(p.clone(), 400, 400).unwrap();
        let (_, mut tracked) = tail(&[src(&p)], 0, Filter::default()).unwrap();
        let writer = std::thread::spawn(move || {
            for i in 1..=LINES {
                log.write(format!("t 0 out seq {i}\n").as_bytes());
            }
        });
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !String::from_utf8_lossy(&out).ends_with(&format!(" seq {LINES}\n")) {
            assert!(std::time::Instant::now() < deadline, "the follower never saw the last line");
            tracked[0].catch_up(Filter::default(), &mut out).unwrap();
        }
        writer.join().unwrap();
        let seqs: Vec<u32> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert!(rotated(&p, 100).exists(), "the log did not rotate often enough to test anything");
        assert_eq!(seqs, (1..=LINES).collect::<Vec<_>>());
    }

    #[test]
    fn a_follower_reads_the_old_file_to_its_end_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.log");
        std::fs::write(&p, "t 0 out one\n").unwrap();
        let (_, mut tracked) = tail(&[src(&p)], 0, Filter::default()).unwrap();
        let t = &mut tracked[0];
        // Written to the old file, then rotated, then a new file begun.
        std::fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b"t 0 out two\n").unwrap();
        std::fs::rename(&p, rotated(&p, 1)).unwrap();
        std::fs::write(&p, "t 0 out three\n").unwrap();
        let mut out = Vec::new();
        t.catch_up(Filter::default(), &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "t 0 out two\nt 0 out three\n");
        // Two rotations between looks: the file in between is read too.
        for text in ["t 0 out four\n", "t 0 out five\n"] {
            std::fs::rename(rotated(&p, 1), rotated(&p, 2)).ok();
            std::fs::rename(&p, rotated(&p, 1)).unwrap();
            std::fs::write(&p, text).unwrap();
        }
        let mut out = Vec::new();
        t.catch_up(Filter::default(), &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "t 0 out four\nt 0 out five\n");
    }
}
