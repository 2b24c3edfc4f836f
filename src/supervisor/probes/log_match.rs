//! A `log = "REGEX"` ready probe: the output pump of an instance shows it
//! each line (see `logs::pump_watched`); the first line that matches is
//! reported once, and later lines cost one atomic load.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Cheap to clone: one watch serves both of an instance's streams.
#[derive(Clone)]
pub struct LineWatch(Arc<Inner>);

struct Inner {
    regex: regex::bytes::Regex,
    fired: AtomicBool,
    on_match: Box<dyn Fn() + Send + Sync>,
}

impl LineWatch {
    /// `on_match` runs once, on the pump's task, at the first matching
    /// line: keep it short (a send, a notify).
    pub fn new(regex: regex::bytes::Regex, on_match: impl Fn() + Send + Sync + 'static) -> Self {
        LineWatch(Arc::new(Inner { regex, fired: AtomicBool::new(false), on_match: Box::new(on_match) }))
    }

    /// Shows the watch one line (without its newline).
    pub fn check(&self, line: &[u8]) {
        let w = &self.0;
        if !w.fired.load(Ordering::Relaxed) && w.regex.is_match(line) && !w.fired.swap(true, Ordering::AcqRel)
        {
            (w.on_match)();
        }
    }

    /// Whether a line has matched.
    pub fn fired(&self) -> bool {
        self.0.fired.load(Ordering::Acquire)
    }
}

/// Compiles a log probe's (expanded) pattern; the error says what is wrong.
pub fn compile(pattern: &str) -> Result<regex::bytes::Regex, String> {
    regex::bytes::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("log probe {pattern:?} is not a valid regex: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::logs::{LogFile, Sink, pump_watched};
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn the_first_matching_line_of_a_real_pump_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.log");
        let sink = Arc::new(Sink::new(
            "w".into(),
            LogFile::open(path.clone(), u64::MAX, 0).unwrap(),
            None,
            vec![b"s3cret".to_vec()],
        ));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let h = hits.clone();
        let watch = LineWatch::new(compile(r"^listening on :(\d+) key=s3cret$").unwrap(), move || {
            h.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(());
        });
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut w = std::fs::File::from(w);
        rt.block_on(async {
            let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(r).unwrap();
            let pump = tokio::spawn(pump_watched(sink, 0, "out", pipe, None, Some(watch.clone())));
            // Split across writes, and a near miss first.
            std::io::Write::write_all(&mut w, b"starting\nlistening on :80 key=s3cret!\nlisten").unwrap();
            assert!(!watch.fired());
            std::io::Write::write_all(&mut w, b"ing on :8000 key=s3cret\nlistening on :9 key=s3cret\n")
                .unwrap();
            rx.recv().await.unwrap();
            drop(w);
            pump.await.unwrap();
        });
        assert!(watch.fired());
        assert_eq!(hits.load(Ordering::SeqCst), 1, "reported once");
        // The file still has every line, secrets masked.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(text.contains("listening on :8000 key=(secret)") && !text.contains("s3cret"), "{text}");
    }

    #[test]
    fn an_invalid_pattern_is_an_error_that_quotes_it() {
        let e = compile("(unclosed").unwrap_err();
        assert!(e.starts_with("log probe \"(unclosed\" is not a valid regex"), "{e}");
    }
}
