//! The control socket: its permissions, bad clients of every kind, many
//! clients at once; and sd_notify readiness.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{SUPERVISOR, Sandbox, Supervisor, sh};

fn sleeper() -> String {
    format!("{SUPERVISOR}\n[workers.sleeper]\nstop_grace = \"300ms\"\ncommand = {}\n", sh("exec sleep 1000"))
}

/// What a client got back: a parsed reply line, or the connection closed
/// (or reset) without one.
#[derive(Debug)]
enum Answer {
    Reply(Value),
    Closed,
}

/// Sends `bytes` (then, if `half_close`, shuts down writing) and reads the
/// answer, for at most 20 s (the server's own read timeout is 10 s).
fn exchange(sock: &Path, bytes: &[u8], half_close: bool) -> Answer {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // Write from another thread: the server may stop reading (and close)
    // before a long request is all written.
    let mut w = s.try_clone().unwrap();
    let bytes = bytes.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&bytes);
        if half_close {
            let _ = w.shutdown(std::net::Shutdown::Write);
        }
    });
    let mut line = Vec::new();
    let t = Instant::now();
    let answer = match BufReader::new(&mut s).read_until(b'\n', &mut line) {
        Ok(0) => Answer::Closed,
        Ok(_) => Answer::Reply(
            serde_json::from_slice(&line)
                .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {}", String::from_utf8_lossy(&line))),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Answer::Closed,
        Err(e) => panic!("no answer after {:?}: {e}", t.elapsed()),
    };
    writer.join().unwrap();
    answer
}

fn assert_error_or_closed(what: &str, a: Answer) {
    match a {
        Answer::Closed => {}
        Answer::Reply(v) => {
            assert_eq!(v["reply"], "error", "{what}: {v}");
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {v}");
        }
    }
}

#[test]
fn the_socket_and_state_dir_are_private() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper());
    let _sup = Supervisor::start(&sb);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sb.state_dir().join("drover.sock")), 0o600);
    assert_eq!(mode(&sb.state_dir()), 0o700);
    assert_eq!(mode(&sb.state_dir().join("logs")), 0o700);
    assert_eq!(mode(&sb.state_dir().join("state.json")), 0o600);
}

#[test]
fn malformed_requests_get_an_error_and_the_supervisor_carries_on() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper());
    let sup = Supervisor::start(&sb);
    let sock = sb.state_dir().join("drover.sock");

    let big = vec![b'x'; 1 << 20];
    let cases: [(&str, &[u8], bool); 7] = [
        ("garbage", b"\x00\xff\xfe garbage \x01\n", false),
        ("garbage without newline", b"\x00\xff\xfe garbage", true),
        ("a 1 MB line without newline", &big, false),
        ("invalid JSON", b"{\"cmd\": \n", false),
        ("an unknown cmd", b"{\"cmd\":\"frobnicate\"}\n", false),
        ("an unknown field", b"{\"cmd\":\"status\",\"name\":null,\"extra\":1}\n", false),
        ("a request cut short", b"{\"cmd\":\"sta", true),
    ];
    for (what, bytes, half_close) in cases {
        assert_error_or_closed(what, exchange(&sock, bytes, half_close));
        assert_eq!(sup.status()["supervisor"]["state"], "running", "after {what}");
    }
    // A request for a worker that does not exist is an error, not a crash.
    assert_error_or_closed(
        "unknown worker",
        exchange(&sock, b"{\"cmd\":\"restart\",\"name\":\"nope\"}\n", false),
    );

    // A client that connects and hangs up at once.
    for _ in 0..20 {
        drop(UnixStream::connect(&sock).unwrap());
    }
    // One that connects and says nothing does not hold up the others.
    let _silent = UnixStream::connect(&sock).unwrap();
    let t = Instant::now();
    assert_eq!(sup.status()["supervisor"]["state"], "running");
    assert!(t.elapsed() < Duration::from_secs(3), "status took {:?} beside a silent client", t.elapsed());

    // The protocol itself, spoken by hand.
    match exchange(&sock, b"{\"cmd\":\"status\",\"name\":null}\n", false) {
        Answer::Reply(v) => {
            assert_eq!(v["reply"], "status", "{v}");
            assert_eq!(v["supervisor"]["pid"], sup.pid, "{v}");
        }
        Answer::Closed => panic!("no reply to a valid status request"),
    }
}

#[test]
fn many_concurrent_clients_all_get_answers() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper());
    let sup = Supervisor::start(&sb);
    let sock = sb.state_dir().join("drover.sock");
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                s.write_all(b"{\"cmd\":\"status\",\"name\":null}\n").unwrap();
                let mut text = String::new();
                s.read_to_string(&mut text).expect("read the reply");
                serde_json::from_str::<Value>(text.trim_end())
                    .unwrap_or_else(|e| panic!("not one JSON reply ({e}): {text}"))
            })
        })
        .collect();
    for t in threads {
        let v = t.join().expect("client thread");
        assert_eq!(v["reply"], "status", "{v}");
        assert_eq!(v["supervisor"]["pid"], sup.pid, "{v}");
        assert_eq!(v["workers"][0]["name"], "sleeper", "{v}");
    }
}

#[test]
fn notify_socket_gets_ready_then_stopping() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper());
    let path = sb.path("notify.sock");
    let notify = UnixDatagram::bind(&path).expect("bind the notify socket");
    notify.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sup = Supervisor::start_with(&sb, |c| {
        c.env("NOTIFY_SOCKET", &path);
    });
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).expect("no READY=1 datagram");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert!(msg.lines().any(|l| l == format!("MAINPID={}", sup.pid)), "{msg:?}");

    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let n = notify.recv(&mut buf).expect("no STOPPING=1 datagram");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg:?}");
    assert!(sup.wait_exit(Duration::from_secs(5)).is_some());
}

#[test]
fn status_prints_a_table_and_filters_by_name() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        format!("{}[workers.other]\ncommand = [\"sleep\", \"1000\"]\ncapacity = 2\n", sleeper()),
    );
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("all running", Duration::from_secs(10), |v| {
        v["workers"].as_array().unwrap().iter().all(|w| w["state"] == "running")
    });
    let pid = crate::harness::instance(&v, "sleeper", 0)["pid"].as_i64().unwrap();
    let r = sb.cli(&["status"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let row = r.stdout.lines().find(|l| l.starts_with("sleeper ")).unwrap_or_else(|| panic!("{}", r.stdout));
    assert!(row.contains("running") && row.contains(&pid.to_string()), "{row}");
    assert_eq!(r.stdout.lines().filter(|l| l.starts_with("other ")).count(), 2, "{}", r.stdout);

    let r = sb.cli(&["status", "--json", "other"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let names: Vec<&str> =
        v["workers"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["other"]);
    assert_eq!(v["workers"][0]["instances"].as_array().unwrap().len(), 2);

    let r = sb.cli(&["status", "nosuch"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("nosuch"), "{}", r.stderr);
}

#[test]
fn status_json_has_every_field_of_the_contract() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper());
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("running", Duration::from_secs(10), |v| v["workers"][0]["state"] == "running");
    let has = |obj: &Value, keys: &[&str]| {
        for k in keys {
            assert!(obj.get(k).is_some(), "no {k:?} in {obj}");
        }
    };
    has(&v, &["supervisor", "workers", "sessions", "runs"]);
    let s = &v["supervisor"];
    has(s, &["state", "pid", "config", "started_at", "generation", "last_reload"]);
    assert_eq!(s["state"], "running");
    assert_eq!(s["pid"], sup.pid);
    assert_eq!(s["generation"], 1);
    humantime::parse_rfc3339(s["started_at"].as_str().unwrap()).unwrap();
    let w = &v["workers"][0];
    has(w, &["name", "capacity", "state", "instances"]);
    let i = &w["instances"][0];
    has(
        i,
        &["index", "pid", "pgid", "state", "restarts", "started_at", "last_exit", "error", "next_start_at"],
    );
    assert_eq!(i["pgid"], i["pid"], "the instance leads its own process group");
    humantime::parse_rfc3339(i["started_at"].as_str().unwrap()).unwrap();
}

/// drover's CPU time so far (utime + stime), in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Regression (found in review): out of descriptors, `accept` failed at
/// once, forever, and the accept loop spun a core. Now it pauses, and
/// answers again as soon as descriptors are free.
#[test]
fn out_of_descriptors_the_control_socket_waits_instead_of_spinning() {
    use std::os::unix::process::CommandExt;
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper());
    let sup = Supervisor::start_with(&sb, |cmd| unsafe {
        cmd.pre_exec(|| {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 48, 48)?;
            Ok(())
        });
    });
    let sock = sb.state_dir().join("drover.sock");
    // Silent clients hold a descriptor each in drover until it runs out.
    let hogs: Vec<UnixStream> = (0..80).filter_map(|_| UnixStream::connect(&sock).ok()).collect();
    crate::harness::wait_until("drover to run out of descriptors", Duration::from_secs(10), || {
        let open = std::fs::read_dir(format!("/proc/{}/fd", sup.pid)).map(|d| d.count()).unwrap_or(0);
        (open >= 47).then_some(())
    });
    let before = cpu_ticks(sup.pid);

    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(sup.pid) - before;
    // A spinning loop burns ~100 ticks a second; waiting, next to none.
    assert!(used < 30, "drover used {used} ticks of CPU in 1 s while out of descriptors");
    let err = std::fs::read_to_string(sb.path("drover.err")).unwrap();
    assert!(
        err.contains("cannot accept a control connection") && err.contains("Too many open files"),
        "{err}"
    );

    drop(hogs);
    let v = sup
        .wait_for("status to answer again", Duration::from_secs(10), |v| v["supervisor"]["pid"] == sup.pid);
    assert_eq!(v["workers"][0]["state"], "running");
}
