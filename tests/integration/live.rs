//! `drover events` with real workers: a follower sees instances start,
//! crash, back off and park, reloads and job runs as they happen; without
//! -f the recent events are printed; names filter; the subscriber cap and
//! bad subscription requests leave the supervisor serving; a follower that
//! stops reading during a restart storm is dropped with a `lagged` line
//! while status and a reading follower are served on.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{SUPERVISOR, Sandbox, Supervisor, sh};

const LIMIT: Duration = Duration::from_secs(15);

/// A `drover events -f --json` running in the background; its lines
/// arrive on a channel. Killed and reaped when dropped.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Follower {
    fn start(sb: &Sandbox, names: &[&str]) -> Self {
        let mut child = sb
            .drover()
            .args(["-c", "daemon.toml", "events", "-f", "--json"])
            .args(names)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn drover events");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let v: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Follower { child, lines, seen: Vec::new() }
    }

    /// Waits for an event that `f` accepts and returns it.
    fn wait(&mut self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| f(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if f(&v) {
                        return v;
                    }
                }
                Err(_) => panic!("no {what} event within {LIMIT:?}; saw {:#?}", self.seen),
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kind<'a>(k: &'a str, worker: &'a str) -> impl Fn(&Value) -> bool + 'a {
    move |v| v["kind"] == k && (v["worker"] == worker || v["job"] == worker)
}

/// `flaky` exits 3 at once (parked after two rapid failures); `steady` runs.
fn config(steady_mode: &str) -> String {
    format!(
        "{SUPERVISOR}[defaults]\nstop_grace = \"2s\"\nbackoff = {{ initial = \"200ms\", max = \"1s\" }}\n\
         crash_loop = {{ max_failures = 2 }}\n\n\
         [workers.flaky]\ncommand = {}\n\n\
         [workers.steady]\ncommand = {}\nenv = {{ MODE = \"{steady_mode}\" }}\n\n\
         [jobs.hello]\ncommand = {}\n",
        sh("exit 3"),
        sh("exec sleep 1000"),
        sh("echo hello"),
    )
}

#[test]
fn a_follower_sees_crashes_backoff_parking_reloads_and_runs() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", config("one"));
    let sup = Supervisor::start(&sb);
    let mut all = Follower::start(&sb, &[]);
    let mut flaky = Follower::start(&sb, &["flaky"]);

    // What happened before it connected comes first.
    let started = all.wait("started", kind("started", "steady"));
    assert!(started["pid"].as_i64().is_some_and(|p| p > 0), "{started}");
    assert!(started["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{started}");
    let exited = flaky.wait("exited", kind("exited", "flaky"));
    assert_eq!(exited["code"], 3, "{exited}");
    assert!(exited["uptime_ms"].is_u64(), "{exited}");
    let backoff = flaky.wait("backoff", kind("backoff", "flaky"));
    assert!(backoff["delay_ms"].as_u64().is_some_and(|d| d <= 1000), "{backoff}");
    let parked = flaky.wait("parked", kind("parked", "flaky"));
    assert!(parked["reason"].as_str().is_some_and(|r| !r.is_empty()), "{parked}");

    // A reload that restarts steady.
    sb.write("daemon.toml", config("two"));
    let r = sb.cli(&["reload"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let applied = all.wait("reload_applied", |v| v["kind"] == "reload_applied");
    assert_eq!(applied["generation"], 2, "{applied}");
    assert!(
        applied["changes"].as_array().is_some_and(|c| c.iter().any(|c| c == "restart steady")),
        "{applied}"
    );
    // A restart is told by the exit it asked for and the new start.
    let term = all.wait("exited by SIGTERM", |v| kind("exited", "steady")(v) && v["signal"] == "SIGTERM");
    let again = all.wait("restarted", |v| kind("started", "steady")(v) && v["pid"] != started["pid"]);
    assert!(again["time"].as_str() >= term["time"].as_str(), "{term} {again}");
    // A failed reload.
    sb.write("daemon.toml", "[workers.x]\ncommand = 5\n");
    let r = sb.cli(&["reload"]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    let failed = all.wait("reload_failed", |v| v["kind"] == "reload_failed");
    assert!(failed["error"].as_str().is_some_and(|e| e.contains("daemon.toml")), "{failed}");
    sb.write("daemon.toml", config("two"));

    // A job run, from queued to ended.
    let r = sb.cli(&["trigger", "hello"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    all.wait("run_started", kind("run_started", "hello"));
    let step = all.wait("run_step", kind("run_step", "hello"));
    assert_eq!(step["step"], "main", "{step}");
    let ended = all.wait("run_ended", kind("run_ended", "hello"));
    assert_eq!(ended["state"], "succeeded", "{ended}");

    // The filtered follower saw flaky and reloads, nothing of steady or hello.
    flaky.wait("reload_failed", |v| v["kind"] == "reload_failed");
    assert!(flaky.seen.iter().all(|v| v["worker"] != "steady" && v["job"].is_null()), "{:#?}", flaky.seen);
    drop((all, flaky));
    drop(sup);
}

#[test]
fn without_follow_the_recent_events_are_printed_as_text_and_names_are_checked() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", config("one"));
    let sup = Supervisor::start(&sb);
    sup.wait_for("flaky parked", LIMIT, |v| crate::harness::instance(v, "flaky", 0)["state"] == "parked");

    let r = sb.cli(&["events", "flaky"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("flaky:0  exited with code 3 after"), "{}", r.stdout);
    assert!(r.stdout.contains("flaky:0  parked: "), "{}", r.stdout);
    assert!(!r.stdout.contains("steady"), "{}", r.stdout);

    let r = sb.cli(&["events", "--json", "steady"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let kinds: Vec<Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("JSON line")["kind"].clone())
        .collect();
    assert!(kinds.contains(&Value::from("started")) && kinds.contains(&Value::from("ready")), "{kinds:?}");

    let r = sb.cli(&["events", "nosuch"]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stderr.contains("no worker or job named nosuch"), "{}", r.stderr);
    drop(sup);
}

/// Sends one raw request line and reads the first line back.
fn raw(sock: &std::path::Path, line: &str) -> (UnixStream, String) {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(LIMIT)).expect("timeout");
    s.write_all(line.as_bytes()).expect("write");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut first = String::new();
    r.read_line(&mut first).expect("read");
    (s, first)
}

#[test]
fn followers_are_capped_and_bad_subscriptions_are_refused() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", config("one"));
    let sup = Supervisor::start(&sb);
    let sock = sb.state_dir().join("drover.sock");

    for bad in [
        "{\"cmd\":\"events\",\"names\":5}\n",
        "{\"cmd\":\"events\",\"follow\":\"yes\"}\n",
        "{\"cmd\":\"events\",\"x\":1}\n",
        "{\"cmd\":\"events\",\"names\":[\"\\ud800\"]}\n",
    ] {
        let (_, first) = raw(&sock, bad);
        assert!(
            first.contains("\"reply\":\"error\"") && first.contains("malformed request"),
            "{bad}: {first}"
        );
    }

    // Each follower gets the recent events at once; the 33rd is refused.
    let followers: Vec<UnixStream> = (0..32)
        .map(|_| raw(&sock, "{\"cmd\":\"events\",\"follow\":true}\n"))
        .map(|(s, first)| {
            assert!(first.contains("\"kind\""), "{first}");
            s
        })
        .collect();
    let (_, first) = raw(&sock, "{\"cmd\":\"events\",\"follow\":true}\n");
    assert!(first.contains("32 event subscribers are connected already"), "{first}");
    let r = sb.cli(&["events", "-f"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("the limit"), "{}", r.stderr);
    // Plain status still answers, and a closed follower frees its place.
    let (code, _) = sb.status_json();
    assert_eq!(code, Some(0));
    drop(followers);
    crate::harness::wait_until("a follower's place freed", LIMIT, || {
        let (mut s, first) = raw(&sock, "{\"cmd\":\"events\",\"follow\":true}\n");
        let ok = first.contains("\"kind\"");
        let _ = s.shutdown(std::net::Shutdown::Both);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        ok.then_some(())
    });
    drop(sup);
}

/// Whether `pid` sleeps in a write to its stdout: a pipe nobody reads is
/// full. Both the syscall (write, fd 1) and a sleeping wait channel, so a
/// write caught while it copies into a pipe with room does not count.
fn blocked_on_stdout(pid: u32) -> bool {
    let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    syscall.starts_with("1 0x1 ") && wchan.contains("pipe")
}

/// The payload the supervisor's end of a follower's socket can hold at
/// most before its writes block (the default send buffer counts more
/// than the payload).
fn socket_buffer() -> usize {
    std::fs::read_to_string("/proc/sys/net/core/wmem_default")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(212_992)
}

/// A child killed and reaped when dropped, however the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_follower_that_never_reads_is_dropped_with_a_lagged_line_and_nothing_else_slows() {
    let sb = Sandbox::new();
    let quiet = format!("{SUPERVISOR}[workers.steady]\ncommand = {}\n", sh("exec sleep 1000"));
    sb.write("daemon.toml", &quiet);
    let sup = Supervisor::start(&sb);
    let mut reader = Follower::start(&sb, &[]);
    reader.wait("started", kind("started", "steady"));

    // The follower that stops reading: its first line proves it is
    // subscribed; then its stdout pipe is left to fill.
    let mut idle = Reaped(
        sb.drover()
            .args(["-c", "daemon.toml", "events", "-f", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn drover events"),
    );
    let mut idle_out = idle.0.stdout.take().expect("stdout");
    let mut first = Vec::new();
    let mut byte = [0u8; 1];
    while first.last() != Some(&b'\n') {
        assert_eq!(idle_out.read(&mut byte).expect("read the idle follower"), 1, "{first:?}");
        first.push(byte[0]);
    }

    // A storm: 40 instances of a command that fails at once, restarted
    // after 10 ms, never parked. Each cycle is several events.
    let storm = format!(
        "{quiet}\n[workers.storm]\ncommand = [\"/bin/false\"]\ncapacity = 40\n\
         backoff = {{ initial = \"10ms\", max = \"10ms\" }}\n\
         crash_loop = {{ max_failures = 4000000000 }}\n"
    );
    sb.write("daemon.toml", &storm);
    let r = sb.cli(&["reload"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);

    // Phases, seen through the reading follower: the idle one blocks on
    // its full pipe; then more than a socket's worth of events (its
    // supervisor side blocks too); then more than the backlog of 1024
    // (its place in the broadcast is overrun). Status answers throughout.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = 0usize;
    let mut blocked_at: Option<usize> = None;
    let mut bytes_after = 0usize;
    let mut overrun_from: Option<usize> = None;
    let mut slowest = Duration::ZERO;
    loop {
        assert!(
            Instant::now() < deadline,
            "storm phases not reached: {seen} events, blocked at {blocked_at:?}, {bytes_after} bytes after"
        );
        let asked = Instant::now();
        let (code, _) = sb.status_json();
        slowest = slowest.max(asked.elapsed());
        assert_eq!(code, Some(0), "status failed during the storm");
        assert!(slowest < Duration::from_secs(5), "status took {slowest:?} during the storm");
        while let Ok(v) = reader.lines.recv_timeout(Duration::from_millis(50)) {
            assert_ne!(v["kind"], "lagged", "the reading follower was dropped: {v}");
            seen += 1;
            if blocked_at.is_some() {
                bytes_after += v.to_string().len() + 1;
            }
            if seen % 256 == 0 {
                break;
            }
        }
        if blocked_at.is_none() && blocked_on_stdout(idle.0.id()) {
            blocked_at = Some(seen);
        }
        if overrun_from.is_none() && bytes_after > socket_buffer() + 64 * 1024 {
            overrun_from = Some(seen);
        }
        if overrun_from.is_some_and(|from| seen > from + 1024 + 2 * 64) {
            break;
        }
    }
    assert!(seen > 1024 + 256, "{seen}");

    // Drained now, the idle follower gets what was buffered, then the
    // lagged line, and exits 1.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = idle_out.read_to_string(&mut rest);
        let _ = tx.send(rest);
    });
    let rest = rx.recv_timeout(LIMIT).expect("the idle follower's stream did not end");
    let last = rest.lines().last().unwrap_or_default();
    let last: Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("last line not JSON ({e}): {last}"));
    assert_eq!(last["kind"], "lagged", "{last}");
    assert!(last["missed"].as_u64().is_some_and(|m| m > 0), "{last}");
    let status =
        crate::harness::wait_until("the idle follower exits", LIMIT, || idle.0.try_wait().ok().flatten());
    assert_eq!(status.code(), Some(1), "{status:?}");

    // The reading follower is still served, and status still answers.
    let next = reader.lines.recv_timeout(LIMIT).expect("no event after the idle follower was dropped");
    assert_ne!(next["kind"], "lagged", "{next}");
    let (code, _) = sb.status_json();
    assert_eq!(code, Some(0));
    eprintln!("{seen} events; slowest status {slowest:?}");
    drop((reader, idle));
    drop(sup);
}

/// A `drover events -f --json` whose stderr and exit status the test
/// reads, returned once its first line (a recent event) has come: its
/// subscription is in place.
fn follow_plain(sb: &Sandbox) -> (Child, BufReader<std::process::ChildStdout>, Value) {
    let mut child = sb
        .drover()
        .args(["-c", "daemon.toml", "events", "-f", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn drover events");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    let _ = out.read_line(&mut first);
    let v = serde_json::from_str(&first).unwrap_or_else(|e| panic!("not JSON ({e}): {first:?}"));
    (child, out, v)
}

/// Reads a follower to its end: its lines, its stderr and its exit code.
fn finish(
    (mut child, mut out, _): (Child, BufReader<std::process::ChildStdout>, Value),
) -> (Vec<Value>, String, Option<i32>) {
    let mut rest = String::new();
    let mut err = String::new();
    let _ = out.read_to_string(&mut rest);
    let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
    let code = child.wait().ok().and_then(|s| s.code());
    let lines = rest.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    (lines, err, code)
}

#[test]
fn a_clean_stop_ends_each_stream_with_an_end_line_and_a_killed_supervisor_is_an_error() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", config("steady"));
    let sup = Supervisor::start(&sb);
    sup.wait_for("steady running", LIMIT, |v| crate::harness::instance(v, "steady", 0)["state"] == "running");
    let follower = follow_plain(&sb);
    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let (lines, err, code) = finish(follower);
    assert_eq!(code, Some(0), "{err}");
    assert!(lines.iter().any(|l| l["kind"] == "stopped"), "the stop is told: {lines:#?}");
    let last = lines.last().cloned().unwrap_or_default();
    assert_eq!(last["kind"], "end", "the last line is the end: {lines:#?}");
    assert_eq!(last["reason"], "the supervisor stopped", "{last}");
    drop(sup);

    // A supervisor that dies leaves its followers a cut stream: exit 1, said.
    let mut sup = Supervisor::start(&sb);
    sup.wait_for("steady running", LIMIT, |v| crate::harness::instance(v, "steady", 0)["state"] == "running");
    let follower = follow_plain(&sb);
    sup.sigkill();
    let (lines, err, code) = finish(follower);
    assert_eq!(code, Some(1), "{lines:#?}");
    assert!(err.contains("the event stream was cut without its end"), "{err}");
    assert!(lines.iter().all(|l| l["kind"] != "end"), "{lines:#?}");
    drop(sup);
}
