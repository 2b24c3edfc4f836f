//! Soak: a worker that exits every 10 ms (restarted with no backoff), a job
//! every 100 ms, 50 instances whose tcp health probe runs every 100 ms
//! against a socket worker's port, and a `drover events -f` follower, while
//! drover's RSS, open file descriptors, CPU and ledger size are sampled.
//! After a warm-up they must stay flat: RSS and ledger growth under 1 MiB,
//! not one more file descriptor (CPU is printed, not asserted).
//!
//! `cargo test` runs one minute. The hour (samples each minute, 5 minutes
//! of warm-up) is run by hand:
//!
//!     DROVER_SOAK_SECS=3600 cargo test --release --test integration soak -- --nocapture

use std::time::{Duration, Instant};

use std::io::BufRead;
use std::process::Stdio;

use crate::harness::{SUPERVISOR, Sandbox, Supervisor, repo, rss_kib, sh};
use crate::sockets::free_port;

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    /// The part of RSS that is drover's own heap and stacks (RssAnon): the
    /// rest is the binary's pages, which grow as rarer code first runs.
    anon_kib: u64,
    fds: usize,
    ledger_bytes: u64,
    restarts: u64,
    runs: i64,
    cpu_ticks: u64,
    events: usize,
}

fn anon_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap_or_default();
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

/// The fewest descriptors seen over a few quick looks: the worker's pipes
/// come and go with each restart, a run holds its own for a moment and each
/// tcp probe its socket, which is not a leak; a leak raises the floor.
fn settled_fds(pid: i32) -> usize {
    (0..9)
        .map(|_| {
            let n = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(usize::MAX);
            std::thread::sleep(Duration::from_millis(10));
            n
        })
        .min()
        .unwrap_or(usize::MAX)
}

fn ledger_count(sb: &Sandbox, query: &str) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(
        sb.state_dir().join("ledger.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the ledger");
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row(query, [], |r| r.get::<_, Option<i64>>(0)).unwrap().unwrap_or(0)
}

fn ledger_bytes(sb: &Sandbox) -> u64 {
    ["ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"]
        .iter()
        .filter_map(|f| std::fs::metadata(sb.state_dir().join(f)).ok())
        .map(|m| m.len())
        .sum()
}

#[test]
fn soak_keeps_memory_descriptors_and_ledger_flat() {
    let secs: u64 = std::env::var("DROVER_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let (interval, warm_up) = if secs >= 600 {
        (Duration::from_secs(60), Duration::from_secs(300))
    } else {
        (Duration::from_secs(secs.div_ceil(12)), Duration::from_secs(secs / 4))
    };
    let sb = Sandbox::new();
    let port = free_port();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}log_max_size = \"64KiB\"\nlog_keep = 1\n\
             [workers.flash]\ncommand = {}\n\
             backoff = {{ initial = \"0s\", max = \"0s\" }}\ncrash_loop = {{ min_uptime = \"0s\" }}\n\
             [jobs.tick]\ncommand = {}\nevery = \"100ms\"\nretain = 50\n\
             [workers.web]\ncommand = [\"python3\", {:?}]\nsockets = [\"tcp://127.0.0.1:{port}\"]\n\
             [workers.probed]\ncommand = [\"sleep\", \"100000\"]\ncapacity = 50\n\
             health = {{ tcp = \"127.0.0.1:{port}\", interval = \"100ms\", timeout = \"1s\", failures = 30 }}\n",
            sh("echo up; sleep 0.01"),
            sh("echo tick"),
            repo().join("config/socket_server.py").display().to_string(),
        ),
    );
    let sup = Supervisor::start(&sb);
    // A follower of every event, counting the lines it reads.
    let mut follower = sb
        .drover()
        .args(["-c", "daemon.toml", "events", "-f", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("drover events -f");
    let events = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = {
        let (out, events) = (follower.stdout.take().expect("its stdout"), events.clone());
        std::thread::spawn(move || {
            for _ in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                events.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    struct Reaped(std::process::Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let follower = Reaped(follower);
    let start = Instant::now();
    let mut samples = Vec::new();
    eprintln!("soak: {secs} s, a sample every {interval:?}, warm-up {warm_up:?}");
    eprintln!(
        "{:>8} {:>10} {:>9} {:>5} {:>12} {:>9} {:>7} {:>9} {:>8}",
        "at", "rss KiB", "anon KiB", "fds", "ledger B", "restarts", "last run", "cpu ticks", "events"
    );
    while start.elapsed() < Duration::from_secs(secs) {
        let next = start + interval * (samples.len() as u32 + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let v = sup.status();
        let s = Sample {
            at: start.elapsed(),
            rss_kib: rss_kib(sup.pid).expect("drover's RSS"),
            anon_kib: anon_kib(sup.pid),
            fds: settled_fds(sup.pid),
            ledger_bytes: ledger_bytes(&sb),
            restarts: crate::harness::instance(&v, "flash", 0)["restarts"].as_u64().unwrap_or(0),
            runs: ledger_count(&sb, "SELECT max(id) FROM runs"),
            cpu_ticks: cpu_ticks(sup.pid),
            events: events.load(std::sync::atomic::Ordering::Relaxed),
        };
        eprintln!(
            "{:>7}s {:>10} {:>9} {:>5} {:>12} {:>9} {:>7} {:>9} {:>8}",
            s.at.as_secs(),
            s.rss_kib,
            s.anon_kib,
            s.fds,
            s.ledger_bytes,
            s.restarts,
            s.runs,
            s.cpu_ticks,
            s.events
        );
        samples.push(s);
    }

    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= warm_up).collect();
    let (base, last) = (after.first().expect("a sample after warm-up"), samples.last().unwrap());
    // Descriptors: never more than the warm-up reached.
    let base_fds = samples.iter().filter(|s| s.at <= base.at).map(|s| s.fds).max().unwrap();
    // The load really ran: ~100 restarts a second, a run every 100 ms.
    let per_sec = |n: u64| n as f64 / last.at.as_secs_f64();
    assert!(per_sec(last.restarts) > 20.0, "only {} restarts in {:?}", last.restarts, last.at);
    assert!(per_sec(last.runs as u64) > 3.0, "only {} runs in {:?}", last.runs, last.at);
    // The probes held: no probed instance was restarted for a failed check.
    let v = sup.status();
    let probed = crate::harness::worker(&v, "probed")["instances"].as_array().cloned().unwrap_or_default();
    assert_eq!(probed.len(), 50);
    assert!(probed.iter().all(|i| i["state"] == "running" && i["restarts"] == 0), "{probed:?}");
    // The follower kept up the whole time.
    assert!(last.events as u64 > last.restarts, "{} events for {} restarts", last.events, last.restarts);
    drop(follower);
    let _ = reader.join();
    let kept = ledger_count(&sb, "SELECT count(*) FROM runs");
    assert!((40..=51).contains(&kept), "{kept} runs kept; retain = 50");
    // A leak raises the floor: the fewest descriptors of the last third
    // are no more than warm-up reached.
    let tail = &samples[samples.len() - samples.len().div_ceil(3)..];
    let floor = tail.iter().map(|s| s.fds).min().unwrap_or(0);
    assert!(floor <= base_fds, "descriptors never fell back to {base_fds}: {samples:#?}");
    for s in &after {
        assert!(
            s.rss_kib < base.rss_kib + 1024,
            "RSS grew {} KiB after warm-up: {samples:#?}",
            s.rss_kib - base.rss_kib
        );
        // A spike of a few (probes and spawns in flight on a loaded
        // machine) is no leak; a runaway is.
        assert!(s.fds <= base_fds + 16, "descriptors grew from {base_fds} to {}: {samples:#?}", s.fds);

        assert!(
            s.ledger_bytes < base.ledger_bytes + (1 << 20),
            "the ledger grew {} bytes after warm-up: {samples:#?}",
            s.ledger_bytes - base.ledger_bytes
        );
    }
}
