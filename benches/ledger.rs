//! Runs per second through the run ledger, against a floor that spawns the
//! same processes with no ledger at all, and the ledger's size after many
//! runs with retention. Needs a release build of drover:
//!
//!     cargo build --release && cargo bench --bench ledger [-- RUNS [BIG]]
//!
//! Each run is `true`, triggered over the control socket (queued, claimed,
//! spawned, finalized, pruned), with capacity 8. The floor spawns `true`
//! the same number of times, 8 at a time, and waits for each.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover::ledger::{Ledger, RunState};

const CAPACITY: usize = 8;

struct Drover {
    child: Child,
    dir: PathBuf,
}

impl Drop for Drover {
    fn drop(&mut self) {
        let _ = Command::new(drover_bin()).arg("-c").arg(self.dir.join("daemon.toml")).arg("stop").output();
        let _ = self.child.wait();
    }
}

fn drover_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/drover")
}

fn start(dir: &Path, retain: u32) -> Drover {
    std::fs::write(
        dir.join("daemon.toml"),
        format!(
            "[supervisor]\nreload = false\n[jobs.t]\ncommand = [\"true\"]\ncapacity = {CAPACITY}\n\
             on_overlap = \"queue\"\nqueue_limit = 10000\nretain = {retain}\n"
        ),
    )
    .unwrap();
    let child = Command::new(drover_bin())
        .arg("-c")
        .arg(dir.join("daemon.toml"))
        .arg("start")
        .env("DROVER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run target/release/drover (cargo build --release first)");
    let sock = dir.join(".drover/drover.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "drover did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    Drover { child, dir: dir.to_path_buf() }
}

fn trigger(sock: &Path) -> bool {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(b"{\"cmd\":\"trigger\",\"job\":\"t\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line.contains("\"run\"")
}

/// Triggers `n` runs (queueing at most ~1000 at once) and waits until all
/// have ended; returns the elapsed time.
fn through_ledger(dir: &Path, n: usize) -> Duration {
    let sock = dir.join(".drover/drover.sock");
    let ledger = Ledger::open_read_only(&dir.join(".drover/ledger.sqlite")).unwrap();
    let active = |l: &Ledger| l.active().map(|a| a.len()).unwrap_or(0);
    let t = Instant::now();
    let mut sent = 0;
    while sent < n {
        if active(&ledger) < 1000 {
            let batch = (n - sent).min(500);
            for _ in 0..batch {
                assert!(trigger(&sock), "trigger refused");
            }
            sent += batch;
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    while active(&ledger) > 0 {
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = t.elapsed();
    let failed = ledger.list(Some("t"), Some(RunState::Failed), 10).unwrap();
    assert!(failed.is_empty(), "runs failed: {failed:?}");
    elapsed
}

/// The floor: the same processes, 8 at a time, no bookkeeping.
fn floor(n: usize) -> Duration {
    let t = Instant::now();
    let per = n / CAPACITY;
    let threads: Vec<_> = (0..CAPACITY)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..per {
                    Command::new("true").stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap();
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    t.elapsed()
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let n = args.first().copied().unwrap_or(5000);
    let big = args.get(1).copied().unwrap_or(100_000);

    let tmp = tempfile::tempdir().unwrap();
    let d = start(tmp.path(), 50);
    let ledger_time = through_ledger(tmp.path(), n);
    drop(d);
    let floor_time = floor(n);
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!("{n} runs of `true`, capacity {CAPACITY}:");
    println!("  through the ledger: {:>8.0} runs/s ({:.2} s)", rate(ledger_time), ledger_time.as_secs_f64());
    println!("  floor (no ledger):  {:>8.0} runs/s ({:.2} s)", rate(floor_time), floor_time.as_secs_f64());
    println!("  ratio floor/ledger: {:.2}x", ledger_time.as_secs_f64() / floor_time.as_secs_f64());

    if big > 0 {
        let tmp = tempfile::tempdir().unwrap();
        let d = start(tmp.path(), 50);
        let t = through_ledger(tmp.path(), big);
        drop(d);
        let size: u64 = std::fs::read_dir(tmp.path().join(".drover"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("ledger.sqlite"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        let logs = std::fs::read_dir(tmp.path().join(".drover/runs")).unwrap().count();
        println!(
            "{big} runs with retain = 50: ledger {:.1} KiB (with its WAL), {logs} run logs kept, {:.0} runs/s",
            size as f64 / 1024.0,
            big as f64 / t.as_secs_f64()
        );
    }
}
