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
    // Both forms at once: the indented report (as `status --json` asks
    // for it) and the reply line. Those waiting together share a usage
    // read; each still gets its own form, with the usage in it.
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let pretty = i % 2 == 1;
                let mut s = UnixStream::connect(&sock).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let req = format!("{{\"cmd\":\"status\",\"name\":null,\"pretty\":{pretty}}}\n");
                s.write_all(req.as_bytes()).unwrap();
                let mut text = String::new();
                s.read_to_string(&mut text).expect("read the reply");
                let v = serde_json::from_str::<Value>(text.trim_end())
                    .unwrap_or_else(|e| panic!("not one JSON reply ({e}): {text}"));
                (pretty, text.contains("\n  "), v)
            })
        })
        .collect();
    for t in threads {
        let (pretty, indented, v) = t.join().expect("client thread");
        assert_eq!(indented, pretty, "{v}");
        assert_eq!(v["reply"], if pretty { Value::Null } else { "status".into() }, "{v}");
        assert_eq!(v["supervisor"]["pid"], sup.pid, "{v}");
        assert_eq!(v["workers"][0]["name"], "sleeper", "{v}");
        let rss = v["workers"][0]["instances"][0]["rss_bytes"].as_u64();
        assert!(rss.is_some_and(|b| b > 0), "no usage read: {v}");
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

#[test]
fn status_json_is_the_reply_lines_report_indented() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper());
    let sup = Supervisor::start(&sb);
    sup.wait_for("running", Duration::from_secs(10), |v| v["workers"][0]["state"] == "running");
    let r = sb.cli(&["status", "--json"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.starts_with("{\n  \"supervisor\": {\n"), "indented: {}", r.stdout);
    assert!(r.stdout.ends_with("}\n"), "{}", r.stdout);
    let printed: Value = serde_json::from_str(&r.stdout).unwrap();
    let Answer::Reply(mut line) =
        exchange(&sb.state_dir().join("drover.sock"), b"{\"cmd\":\"status\"}\n", false)
    else {
        panic!("no reply line to a plain status request");
    };
    assert_eq!(line["reply"], "status");
    line.as_object_mut().unwrap().remove("reply");
    // What is read anew at each request differs; the rest is one report.
    let without_usage = |mut v: Value| {
        for w in v["workers"].as_array_mut().unwrap() {
            for i in w["instances"].as_array_mut().unwrap() {
                let i = i.as_object_mut().unwrap();
                assert!(i.remove("cpu_seconds").is_some() && i.remove("rss_bytes").is_some(), "usage: {i:?}");
            }
        }
        v
    };
    assert_eq!(without_usage(printed), without_usage(line));
}

/// A stand-in for a supervisor at the sandbox's state_dir that gives
/// `answer(request line)` to each of `n` connections, then ends; the
/// requests it got.
fn fake_supervisor(
    sb: &Sandbox,
    n: usize,
    answer: fn(&str) -> Vec<u8>,
) -> std::thread::JoinHandle<Vec<String>> {
    let dir = sb.state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(dir.join("drover.sock")).unwrap();
    std::thread::spawn(move || {
        let mut asked = Vec::new();
        for _ in 0..n {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&mut s).read_line(&mut line).unwrap();
            let _ = s.write_all(&answer(&line));
            asked.push(line);
        }
        asked
    })
}

#[test]
fn status_json_from_a_supervisor_that_refuses_pretty_asks_again_plainly() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper());
    // As one built before `pretty` answers it: every request refuses
    // unknown fields.
    let fake = fake_supervisor(&sb, 2, |req| {
        if req.contains("pretty") {
            b"{\"reply\":\"error\",\"message\":\"unknown field `pretty`, expected `name`\"}\n".to_vec()
        } else {
            concat!(
                r#"{"reply":"status","supervisor":{"state":"running","pid":4242,"config":null,"#,
                r#""started_at":"2026-01-01T00:00:00Z","generation":7,"last_reload":null},"#,
                r#""workers":[{"name":"sleeper","capacity":1,"state":"running","instances":[]}],"#,
                r#""sessions":[],"runs":[]}"#,
                "\n"
            )
            .as_bytes()
            .to_vec()
        }
    });
    let r = sb.cli(&["status", "--json"]);
    let asked = fake.join().unwrap();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(asked[0].contains("\"pretty\":true") && !asked[1].contains("pretty"), "{asked:?}");
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    assert_eq!(v["supervisor"]["generation"], 7);
    assert_eq!(v["workers"][0]["name"], "sleeper");
    assert!(r.stdout.starts_with("{\n  \""), "indented as ever: {}", r.stdout);
}

#[test]
fn a_status_answer_cut_short_is_an_error_after_what_came() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper());
    let fake = fake_supervisor(&sb, 1, |_| b"{\n  \"supervisor\": {\n    \"state\": \"running\",\n".to_vec());
    let r = sb.cli(&["status", "--json"]);
    fake.join().unwrap();
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stdout.starts_with("{\n  \"supervisor\""), "{}", r.stdout);
    assert!(r.stderr.contains("cut short"), "{}", r.stderr);
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

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Regression: clients that sent `status` and never read their reply
/// (larger than a socket buffer) each held a descriptor in drover for
/// ever; enough of them took it to its descriptor limit and the socket
/// stopped accepting. Now a reply not taken within 10 s is dropped, and
/// connections beyond the cap are refused at once.
#[test]
fn clients_that_never_read_cannot_exhaust_descriptors() {
    use std::os::unix::process::CommandExt;
    let sb = Sandbox::new();
    // 2000 trigger-only jobs make a status reply of about 500 KB, more
    // than a Unix socket buffer holds, without 2000 processes.
    let mut config = sleeper();
    for j in 0..2000 {
        config.push_str(&format!("[jobs.job-{j:04}-{}]\ncommand = [\"true\"]\n", "x".repeat(40)));
    }
    sb.write("daemon.toml", config);
    // drover's limit is low so that the hogs outnumber it while this test
    // process (whose limit CI machines often keep at 1024, shared with the
    // tests running beside it) stays well inside its own.
    let limit = 512;
    let sup = Supervisor::start_with(&sb, |cmd| unsafe {
        cmd.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, limit, limit)?;
            Ok(())
        });
    });
    let sock = sb.state_dir().join("drover.sock");
    let baseline = open_fds(sup.pid);

    // More than the limit: every one sends `status` and never reads.
    let mut hogs = Vec::new();
    let mut most = 0;
    for _ in 0..640 {
        if let Ok(mut s) = UnixStream::connect(&sock) {
            let _ = s.write_all(b"{\"cmd\":\"status\",\"name\":null}\n");
            hogs.push(s);
        }
        most = most.max(open_fds(sup.pid));
    }
    assert!(hogs.len() > 600, "only {} connections", hogs.len());

    // A well-behaved client gets its answer (told to come back while the
    // cap is full, until the hogs' replies time out).
    let mut busy = 0;
    let v = crate::harness::wait_until("a status reply beside the hogs", Duration::from_secs(40), || {
        most = most.max(open_fds(sup.pid));
        match exchange(&sock, b"{\"cmd\":\"status\",\"name\":null}\n", false) {
            Answer::Reply(v) if v["reply"] == "status" => Some(v),
            Answer::Reply(v) => {
                assert!(v["message"].as_str().is_some_and(|m| m.contains("control connections")), "{v}");
                busy += 1;
                None
            }
            Answer::Closed => None,
        }
    });
    assert_eq!(v["supervisor"]["pid"], sup.pid);
    assert_eq!(v["jobs"].as_array().map(Vec::len), Some(2000));
    // The cap (256) plus what drover holds anyway, far below the limit.
    assert!(most <= baseline + 256 + 16, "drover held {most} descriptors (baseline {baseline})");
    drop(hogs);
    let v =
        sup.wait_for("status after the hogs", Duration::from_secs(10), |v| v["supervisor"]["pid"] == sup.pid);
    assert_eq!(v["workers"][0]["name"], "sleeper");
    println!("busy answers before the reply: {busy}; most descriptors: {most} (baseline {baseline})");
}

/// Regression: extra fields on a request without arguments were ignored:
/// `{"cmd":"stop","x":1}` stopped drover.
#[test]
fn unknown_fields_are_refused_on_every_request() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper());
    let mut sup = Supervisor::start(&sb);
    let sock = sb.state_dir().join("drover.sock");
    for req in [&b"{\"cmd\":\"stop\",\"x\":1}\n"[..], b"{\"cmd\":\"reload\",\"force\":true}\n"] {
        match exchange(&sock, req, false) {
            Answer::Reply(v) => {
                assert_eq!(v["reply"], "error", "{v}");
                assert!(v["message"].as_str().is_some_and(|m| m.contains("unknown field")), "{v}");
            }
            Answer::Closed => panic!("no answer to {}", String::from_utf8_lossy(req)),
        }
        assert!(sup.try_wait().is_none(), "drover exited after {}", String::from_utf8_lossy(req));
        assert_eq!(sup.status()["supervisor"]["state"], "running");
    }
    // The plain forms still work.
    match exchange(&sock, b"{\"cmd\":\"reload\"}\n", false) {
        Answer::Reply(v) => assert_eq!(v["reply"], "ok", "{v}"),
        Answer::Closed => panic!("no answer to reload"),
    }
    let r = sb.cli(&["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(sup.wait_exit(Duration::from_secs(10)).is_some());
}

/// Regression: `plan` sent a path and the supervisor opened it on its
/// event loop: `drover -c /dev/stdin plan` made a foreground drover read
/// its own stdin (wedged: status timed out, SIGTERM unanswered), a FIFO
/// did the same. Now the client reads the file and sends its text.
#[test]
fn plan_never_makes_the_supervisor_open_a_clients_path() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", sleeper());
    let mut sup = Supervisor::start_with(&sb, |cmd| {
        // A terminal nobody types into: reading it blocks for ever.
        cmd.stdin(std::process::Stdio::piped());
    });
    let sd = format!("supervisor.state_dir={}", sb.state_dir().display());
    let fifo = sb.path("fifo.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for config in ["/dev/stdin", fifo.to_str().unwrap()] {
        let r = crate::harness::run_within(
            sb.drover().args(["-c", config, "--set", &sd, "plan"]),
            Duration::from_secs(15),
        );
        assert_eq!(r.code, Some(1), "{config}: {}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(config) && r.stderr.contains("not a regular file"), "{}", r.stderr);
        assert_eq!(sup.status()["supervisor"]["state"], "running", "after plan -c {config}");
    }

    // Spoken by hand, naming the FIFO: the text is planned, the path is
    // only a name (were it opened, this would block).
    let req = serde_json::json!({
        "cmd": "plan",
        "path": fifo,
        "text": format!("{}[workers.extra]\ncommand = [\"sleep\", \"1\"]\n", sleeper()),
    });
    match exchange(&sb.state_dir().join("drover.sock"), format!("{req}\n").as_bytes(), false) {
        Answer::Reply(v) => {
            assert_eq!(v["reply"], "plan", "{v}");
            assert_eq!(v["changes"].as_array().map(Vec::len), Some(1), "{v}");
            assert_eq!(v["changes"][0]["worker"], "extra", "{v}");
        }
        Answer::Closed => panic!("no answer to a plan"),
    }
    assert_eq!(sup.status()["supervisor"]["state"], "running");
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    let st = sup.wait_exit(Duration::from_secs(10)).expect("drover answers SIGTERM");
    assert!(st.success(), "{st}");
}

/// `plan` resolves the file's relative paths against its own directory,
/// whatever the cwd of the client or of the (detached) supervisor.
#[test]
fn plan_from_another_directory_plans_the_same() {
    let sb = Sandbox::new();
    std::fs::create_dir_all(sb.path("app/work")).unwrap();
    std::fs::create_dir_all(sb.path("elsewhere")).unwrap();
    let config = |cap: u32| {
        format!(
            "{SUPERVISOR}[workers.w]\ndir = \"work\"\ncapacity = {cap}\ncommand = [\"sleep\", \"1000\"]\n"
        )
    };
    sb.write("app/daemon.toml", config(1));
    let from = |cwd: &str, file: &str, args: &[&str]| {
        crate::harness::run_within(
            sb.drover().current_dir(sb.path(cwd)).args(["-c", file]).args(args),
            Duration::from_secs(30),
        )
    };
    let r = from("elsewhere", "../app/daemon.toml", &["start", "--detach"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let places = [(".", "app/daemon.toml"), ("app", "daemon.toml"), ("elsewhere", "../app/daemon.toml")];
    for (cwd, file) in places {
        let r = from(cwd, file, &["plan"]);
        assert_eq!(r.code, Some(0), "from {cwd}: {}{}", r.stdout, r.stderr);
        assert!(r.stdout.contains("no changes"), "from {cwd}: {}", r.stdout);
    }
    sb.write("app/daemon.toml", config(2));
    for (cwd, file) in places {
        let r = from(cwd, file, &["plan"]);
        assert_eq!(r.code, Some(1), "from {cwd}: {}{}", r.stdout, r.stderr);
        assert!(r.stdout.contains("~ update   w") && r.stdout.contains("scale 1 -> 2"), "{}", r.stdout);
        assert!(!r.stdout.contains("- stop"), "{}", r.stdout);
    }
    let r = from("app", "daemon.toml", &["stop"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

/// A plan carries the whole file: one longer than the 64 KiB other
/// requests are held to is still planned.
#[test]
fn a_plan_of_a_large_config_is_answered() {
    let sb = Sandbox::new();
    let padding = format!("# {}\n", "x".repeat(1000)).repeat(300);
    sb.write("daemon.toml", format!("{}{padding}", sleeper()));
    let _sup = Supervisor::start(&sb);
    let r = sb.cli(&["plan"]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("no changes"), "{}", r.stdout);
    sb.write("daemon.toml", format!("{}{padding}[workers.more]\ncommand = [\"sleep\", \"1\"]\n", sleeper()));
    let r = sb.cli(&["plan"]);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("+ start    more"), "{}", r.stdout);
}
