//! Worker output: the log file format, `drover logs`, rotation, and
//! drover's memory while a worker floods output.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{SUPERVISOR, Sandbox, Supervisor, instance, rss_kib, sh, wait_until};

const SECS_10: Duration = Duration::from_secs(10);
const RSS_LIMIT_KIB: u64 = 60 * 1024;
const MIB: u64 = 1024 * 1024;

/// Samples the RSS of `pid` every 5 ms until dropped; `max_kib()` is the peak.
struct RssWatch {
    peak: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn new(pid: i32) -> Self {
        let (peak, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, d) = (peak.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssWatch { peak, done, thread: Some(thread) }
    }

    fn max_kib(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The sizes of `name.log`, `name.log.1`, … that exist.
fn log_files(sb: &Sandbox, name: &str) -> Vec<(String, u64)> {
    let logs = sb.state_dir().join("logs");
    let mut out: Vec<(String, u64)> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{name}.log")))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
        .collect();
    out.sort();
    out
}

fn assert_rotated(sb: &Sandbox, name: &str) {
    let files = log_files(sb, name);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    let want = [format!("{name}.log"), format!("{name}.log.1"), format!("{name}.log.2")];
    assert_eq!(names, want, "log_keep = 2 keeps the current file and two old ones");
    for (n, size) in &files {
        assert!(*size <= MIB, "{n} is {size} bytes, over log_max_size");
    }
}

#[test]
fn logs_prints_the_last_lines_of_a_workers_output() {
    let sb = Sandbox::new();
    let script = format!(
        "echo one; echo two >&2; echo three; echo up >> {}; exec sleep 1000",
        sb.path("up").display()
    );
    sb.write("daemon.toml", format!("{SUPERVISOR}\n[workers.talker]\ncommand = {}\n", sh(&script)));
    let _sup = Supervisor::start(&sb);
    sb.wait_lines("up", 1, SECS_10);
    let log = sb.state_dir().join("logs/talker.log");
    wait_until("three lines in the log", SECS_10, || {
        (std::fs::read_to_string(&log).unwrap_or_default().lines().count() == 3).then_some(())
    });

    let r = sb.cli(&["logs", "talker", "-n", "2"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.stdout);
    // stdout and stderr are read apart, so only each stream keeps its order.
    let mut rest: Vec<String> = lines
        .iter()
        .map(|l| {
            let (time, rest) = l.split_once(' ').unwrap();
            humantime::parse_rfc3339(time).unwrap_or_else(|e| panic!("{time}: {e}"));
            rest.to_string()
        })
        .collect();
    rest.sort();
    let all = std::fs::read_to_string(&log).unwrap();
    assert!(
        all.contains(" 0 out one\n") && all.contains(" 0 err two\n") && all.contains(" 0 out three\n"),
        "{all}"
    );
    let last_two: Vec<String> = {
        let mut v: Vec<String> =
            all.lines().skip(1).map(|l| l.split_once(' ').unwrap().1.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(rest, last_two);
    assert!(rest.contains(&"0 out three".to_string()), "{rest:?}");

    let r = sb.cli(&["logs", "talker"]);
    assert_eq!(r.stdout.lines().count(), 3, "{}", r.stdout);

    // In the foreground, drover echoes each line as NAME.INSTANCE | TEXT.
    wait_until("the echo", SECS_10, || {
        let out = std::fs::read_to_string(sb.path("drover.out")).unwrap_or_default();
        ["talker.0 | one", "talker.0 | two", "talker.0 | three"]
            .iter()
            .all(|l| out.lines().any(|o| o == *l))
            .then_some(())
    });

    let r = sb.cli(&["logs", "unknownworker"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("unknownworker"), "{}", r.stderr);
}

#[test]
fn a_worker_flooding_lines_leaves_drover_small_and_responsive() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}log_max_size = \"1MiB\"\nlog_keep = 2\n\n\
             [workers.yes]\nstop_grace = \"300ms\"\ncommand = [\"yes\", \"a flood of output\"]\n"
        ),
    );
    let sup = Supervisor::start(&sb);
    let rss = RssWatch::new(sup.pid);
    // Until several MiB went through (rotated twice at least), status
    // keeps answering promptly.
    let t = Instant::now();
    while log_files(&sb, "yes").len() < 3 || t.elapsed() < Duration::from_millis(500) {
        let asked = Instant::now();
        sup.status();
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "status took {:?} during the flood",
            asked.elapsed()
        );
        assert!(t.elapsed() < Duration::from_secs(20), "the log did not rotate: {:?}", log_files(&sb, "yes"));
    }
    assert!(rss.max_kib() < RSS_LIMIT_KIB, "drover's RSS reached {} KiB", rss.max_kib());
    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_rotated(&sb, "yes");
    // Every line in the log is whole.
    let log = std::fs::read_to_string(sb.state_dir().join("logs/yes.log.1")).unwrap();
    for l in log.lines() {
        assert!(l.ends_with(" 0 out a flood of output"), "{l:?}");
    }
}

/// A worker writes 50 MB with no newline at all, then a marker line.
fn no_newline_flood(sb: &Sandbox) {
    let script = format!(
        "head -c 50000000 /dev/zero | tr '\\0' x; echo; echo flood-done; echo done >> {}",
        sb.path("done").display()
    );
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}log_max_size = \"1MiB\"\nlog_keep = 2\n\n\
             [workers.flood]\nrestart = \"never\"\ncommand = {}\n",
            sh(&script)
        ),
    );
}

#[test]
fn a_line_without_end_is_split_and_memory_stays_bounded() {
    let sb = Sandbox::new();
    no_newline_flood(&sb);
    let sup = Supervisor::start(&sb);
    let rss = RssWatch::new(sup.pid);
    sup.wait_for("the flood to end", Duration::from_secs(30), |v| {
        instance(v, "flood", 0)["state"] == "stopped"
    });
    let log = sb.state_dir().join("logs/flood.log");
    wait_until("the marker in the log", SECS_10, || {
        std::fs::read_to_string(&log).unwrap_or_default().contains(" 0 out flood-done\n").then_some(())
    });
    assert!(rss.max_kib() < RSS_LIMIT_KIB, "drover's RSS reached {} KiB", rss.max_kib());
    assert_rotated(&sb, "flood");
    // Pieces of at most 16 KiB, each a log line of its own.
    let old = std::fs::read_to_string(sb.state_dir().join("logs/flood.log.1")).unwrap();
    for l in old.lines() {
        let text = l.splitn(4, ' ').nth(3).unwrap();
        assert!(text.len() <= 16 * 1024 && text.bytes().all(|b| b == b'x'), "a line of {} bytes", text.len());
    }
}

#[test]
fn a_stalled_terminal_does_not_make_drover_buffer_without_bound() {
    // drover in the foreground echoes worker output to its stdout; here
    // that is a pipe nobody reads (a stuck terminal). The README: echoed
    // lines are dropped rather than stall, and memory stays bounded.
    let sb = Sandbox::new();
    no_newline_flood(&sb);
    let mut sup = Supervisor::start_with(&sb, |c| {
        c.stdout(Stdio::piped());
    });
    let rss = RssWatch::new(sup.pid);
    sup.wait_for("the flood to end", Duration::from_secs(30), |v| {
        instance(v, "flood", 0)["state"] == "stopped"
    });
    sb.wait_lines("done", 1, SECS_10);
    let peak = rss.max_kib();
    // Unblock drover's stdout so that it can shut down.
    drop(sup.take_stdout());
    // Echoed lines may be dropped; log lines never are.
    let log = std::fs::read_to_string(sb.state_dir().join("logs/flood.log")).unwrap();
    assert!(log.contains(" 0 out flood-done\n"), "the log lost lines");
    assert!(peak < RSS_LIMIT_KIB, "drover's RSS reached {peak} KiB with its stdout stalled");
}

#[test]
fn logs_follow_prints_new_lines_across_rotations() {
    let sb = Sandbox::new();
    // ~120-byte lines, 150 of them, paced: the 4 KiB log rotates often.
    let script = "i=0; while [ $i -lt 150 ]; do i=$((i+1)); echo \"seq $i $(printf '%0100d' 0)\"; sleep 0.005; done; \
                  echo final; exec sleep 1000";
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}log_max_size = \"4KiB\"\nlog_keep = 3\n\n[workers.ticker]\nstop_grace = \"300ms\"\ncommand = {}\n",
            sh(script)
        ),
    );
    let _sup = Supervisor::start(&sb);
    let mut follower = sb
        .drover()
        .args(["-c", "daemon.toml", "logs", "ticker", "-f", "-n", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = follower.stdout.take().unwrap();
    let _guard = Kill(follower);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout).lines() {
            if tx.send(l.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.ends_with(" 0 out final")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => {
                panic!("logs -f did not print the last line; it printed {} lines: {seen:#?}", seen.len())
            }
        }
    }
    // Whole lines only, in order; some may be missed across a rotation.
    let mut last = 0;
    for l in &seen {
        let parts: Vec<&str> = l.splitn(4, ' ').collect();
        assert!(parts.len() == 4 && parts[1] == "0" && parts[2] == "out", "malformed line {l:?}");
        humantime::parse_rfc3339(parts[0]).unwrap_or_else(|e| panic!("{l:?}: {e}"));
        if let Some(rest) = parts[3].strip_prefix("seq ") {
            let (n, pad) = rest.split_once(' ').unwrap_or_else(|| panic!("malformed line {l:?}"));
            let n: u32 = n.parse().unwrap();
            assert!(n > last, "out of order: {n} after {last}");
            assert_eq!(pad.len(), 100, "a partial line: {l:?}");
            last = n;
        }
    }
    assert!(seen.len() > 50, "logs -f saw only {} lines", seen.len());
}

#[test]
fn drovers_own_log_can_be_json() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", format!("{SUPERVISOR}\n[workers.w]\ncommand = [\"sleep\", \"1000\"]\n"));
    let mut sup = Supervisor::start_with(&sb, |c| {
        c.args(["--log-format", "json"]);
    });
    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0));
    assert!(sup.wait_exit(SECS_10).is_some());
    let err = sup.stderr();
    let records: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(records.iter().any(|r| r["fields"]["message"] == "ready"), "{err}");
    assert!(
        records.iter().any(|r| r["fields"]["message"] == "started" && r["fields"]["worker"] == "w"),
        "{err}"
    );
}

/// A worker that answers SIGTERM with megabytes of output: all of it is
/// written, rotations included, before drover reports the stop done, and
/// its last words end the current log.
#[test]
fn a_workers_last_words_reach_its_log_before_drover_exits() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}log_max_size = \"1MiB\"\nlog_keep = 2\n[workers.talker]\nstop_grace = \"10s\"\ncommand = {}\n",
            sh(&format!(
                "trap 'seq 1 300000; echo last-words; exit 0' TERM; echo up >> {}; while :; do sleep 0.05; done",
                sb.path("up").display()
            ))
        ),
    );
    let mut sup = Supervisor::start(&sb);
    sb.wait_lines("up", 1, SECS_10);
    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(sup.wait_exit(Duration::from_secs(10)).is_some());
    assert_rotated(&sb, "talker");
    let log = std::fs::read_to_string(sb.state_dir().join("logs/talker.log")).unwrap();
    let last = log.lines().last().unwrap_or_default();
    assert!(last.ends_with(" 0 out last-words"), "the log ends with {last:?}");
}

/// CPU clock ticks (user + system) `pid` has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = text.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// A spawned drover client, killed and reaped when dropped; its stdout
/// lines arrive on `lines`.
struct Client {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Client {
    fn spawn(sb: &Sandbox, args: &[&str]) -> Client {
        let mut child = sb
            .drover()
            .args(["-c", "daemon.toml"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(stdout).lines() {
                if tx.send(l.unwrap_or_default()).is_err() {
                    break;
                }
            }
        });
        Client { child, lines }
    }

    /// Lines until one ends with `last` (included).
    fn until(&self, last: &str) -> Vec<String> {
        let deadline = Instant::now() + SECS_10;
        let mut seen = Vec::new();
        while !seen.iter().any(|l: &String| l.ends_with(last)) {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => seen.push(l),
                Err(_) => panic!("no line ending with {last:?}; got {seen:#?}"),
            }
        }
        seen
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn followers_sleep_while_output_is_quiet_and_miss_no_line_across_rotations() {
    let sb = Sandbox::new();
    let go = sb.path("go");
    // Quiet until `go` exists, then 200 lines of ~130 bytes: the 4 KiB
    // log rotates several times while the follower reads.
    let script = format!(
        "echo start; while [ ! -e {go} ]; do sleep 0.05; done; \
         i=0; while [ $i -lt 200 ]; do i=$((i+1)); echo \"seq $i $(printf '%0100d' 0)\"; done; \
         echo final; exec sleep 1000",
        go = go.display()
    );
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}log_max_size = \"4KiB\"\nlog_keep = 20\n\n[workers.ticker]\nstop_grace = \"300ms\"\ncommand = {}\n",
            sh(&script)
        ),
    );
    let _sup = Supervisor::start(&sb);
    let session = sb.cli(&[
        "bg",
        "--name",
        "quiet",
        "--",
        "sh",
        "-c",
        &format!("echo hello; while [ ! -e {go} ]; do sleep 0.05; done; echo bye; exit 3", go = go.display()),
    ]);
    assert_eq!(session.code, Some(0), "{}", session.stderr);
    let logs = Client::spawn(&sb, &["logs", "ticker", "-f"]);
    logs.until(" 0 out start");
    let mut attach = Client::spawn(&sb, &["attach", "quiet"]);
    attach.until(" main out hello"); // both are following now

    // A measuring window, not a synchronization: nothing is written now.
    let before = (cpu_ticks(logs.child.id()), cpu_ticks(attach.child.id()));
    std::thread::sleep(Duration::from_secs(2));
    let used = (cpu_ticks(logs.child.id()) - before.0, cpu_ticks(attach.child.id()) - before.1);
    assert!(used.0 <= 5 && used.1 <= 5, "quiet followers used {used:?} clock ticks in 2 s (logs -f, attach)");

    std::fs::write(&go, "").unwrap();
    let seen = logs.until(" 0 out final");
    let seqs: Vec<u32> = seen
        .iter()
        .filter_map(|l| l.split_once(" 0 out seq ").and_then(|(_, r)| r.split_once(' ')))
        .map(|(n, pad)| {
            assert_eq!(pad.len(), 100, "a partial line");
            n.parse().unwrap()
        })
        .collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<u32>>(), "logs -f lost or reordered lines");
    assert!(sb.state_dir().join("logs/ticker.log.3").exists(), "the log did not rotate");

    // attach learns of the session's end and exits with its code.
    attach.until(" main out bye");
    let deadline = Instant::now() + SECS_10;
    let status = loop {
        if let Some(s) = attach.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "attach did not exit after the session ended");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(3));
}

#[test]
fn logs_read_the_files_with_no_supervisor_and_hint_at_names() {
    let sb = Sandbox::new();
    let marker = |n: &str| sb.path(n).display().to_string();
    sb.write(
        "daemon.toml",
        format!(
            "{SUPERVISOR}\n[workers.api]\ncapacity = 2\ncommand = {}\n[workers.web]\ncommand = {}\n\
             [jobs.report]\ncommand = [\"echo\", \"reported\"]\n",
            sh(&format!("echo api-$DROVER_INSTANCE; echo x >> {}; exec sleep 1000", marker("api-up"))),
            sh(&format!("echo web-up; echo x >> {}; exec sleep 1000", marker("web-up"))),
        ),
    );
    let sup = Supervisor::start(&sb);
    sb.wait_lines("api-up", 2, SECS_10);
    sb.wait_lines("web-up", 1, SECS_10);
    let id = sb.cli(&["trigger", "report"]).stdout.trim().to_string();
    wait_until("the report run", SECS_10, || {
        let r = sb.cli(&["runs", "show", &id, "--json"]);
        serde_json::from_str::<serde_json::Value>(&r.stdout).ok().filter(|v| v["state"] == "succeeded")
    });
    wait_until("three worker lines", SECS_10, || {
        let l = sb.lines(".drover/logs/api.log").len() + sb.lines(".drover/logs/web.log").len();
        (l == 3).then_some(())
    });
    assert_eq!(sb.cli(&["stop"]).code, Some(0));
    drop(sup);

    // Every worker, name-prefixed, in time order.
    let r = sb.cli(&["logs"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    let mut bodies: Vec<&str> = lines.iter().map(|l| l.rsplit(' ').next().unwrap()).collect();
    bodies.sort();
    assert_eq!(bodies, ["api-0", "api-1", "web-up"]);
    assert!(lines.iter().all(|l| l.starts_with("api | ") || l.starts_with("web | ")), "{}", r.stdout);
    let times: Vec<_> =
        lines.iter().map(|l| humantime::parse_rfc3339(l.split(' ').nth(2).unwrap()).unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "not in time order: {}", r.stdout);

    let r = sb.cli(&["logs", "api", "--instance", "1"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.lines().count() == 1 && r.stdout.contains(" 1 out api-1"), "{}", r.stdout);
    assert_eq!(sb.cli(&["logs", "api", "--since", "1h"]).stdout.lines().count(), 2);
    assert_eq!(sb.cli(&["logs", "api", "--since", "2999-01-01T00:00:00Z"]).stdout, "");
    let r = sb.cli(&["logs", "api", "--since", "yesterdayish"]);
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("--since") && r.stderr.contains("10m"), "{}", r.stderr);

    // A job: its latest run's output, with its runs named.
    let r = sb.cli(&["logs", "report"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("reported"), "{}", r.stdout);
    assert!(r.stderr.contains("report is a job") && r.stderr.contains(&id), "{}", r.stderr);

    // A typo: the name, a suggestion, and what there is.
    let r = sb.cli(&["logs", "apii"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("\"apii\"") && r.stderr.contains("did you mean \"api\""), "{}", r.stderr);
    assert!(r.stderr.contains("workers: api, web") && r.stderr.contains("jobs: report"), "{}", r.stderr);
}
