//! `[supervisor] metrics` with real workers and a job, scraped over TCP
//! and over a unix socket: restarts, job runs and reloads show in the
//! values; wrong paths and methods get 404 and 405; malformed and
//! oversized requests leave the supervisor serving; a reload moves the
//! metrics, or keeps the old address when the new one is taken; a
//! non-loopback address is a `check` error at the key; a port in use
//! refuses the start; exports leave the key out.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::{Run, SUPERVISOR, Sandbox, Supervisor, instance, run_within, sh, wait_until};

const LIMIT: Duration = Duration::from_secs(15);

/// A port nothing listens on now (the OS's pick, released again).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// Sends `request` raw and reads the whole answer (the server closes
/// the connection after one response).
fn exchange(mut s: impl Read + Write, request: &[u8]) -> String {
    s.write_all(request).expect("send the request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn tcp(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    s.set_read_timeout(Some(LIMIT)).expect("timeout");
    s
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes()
}

/// The status code and body of a response.
fn split(resp: &str) -> (u16, &str) {
    let code = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, body)
}

/// The samples of an exposition: `name{labels}` to value.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l}"));
            (series.to_string(), value.parse().unwrap_or_else(|_| panic!("not a number: {l}")))
        })
        .collect()
}

fn scrape(port: u16) -> BTreeMap<String, f64> {
    let resp = exchange(tcp(port), &get("/metrics"));
    let (code, body) = split(&resp);
    assert_eq!(code, 200, "{resp}");
    assert!(resp.contains("content-type: text/plain; version=0.0.4"), "{resp}");
    samples(body)
}

/// Scrapes until `series` has `value`, and returns that scrape.
fn wait_value(port: u16, series: &str, value: f64) -> BTreeMap<String, f64> {
    let mut last = BTreeMap::new();
    wait_until(&format!("{series} = {value}"), LIMIT, || {
        last = scrape(port);
        (last.get(series) == Some(&value)).then(|| last.clone())
    })
}

fn config(metrics: &str, extra: &str) -> String {
    format!(
        "{SUPERVISOR}metrics = \"{metrics}\"\n\n\
         [workers.web]\ncommand = {}\ncapacity = 2\nbackoff = {{ initial = \"50ms\" }}\n\n\
         [jobs.hello]\ncommand = [\"true\"]\n{extra}",
        sh("exec sleep 600")
    )
}

#[test]
fn scrapes_over_tcp_follow_restarts_runs_and_reloads() {
    let sb = Sandbox::new();
    let port = free_port();
    sb.write("daemon.toml", config(&format!("127.0.0.1:{port}"), ""));
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("two running instances", LIMIT, |v| {
        (0..2).all(|i| instance(v, "web", i)["state"] == "running")
    });

    let m = scrape(port);
    for i in 0..2 {
        let l = format!("{{worker=\"web\",instance=\"{i}\"}}");
        assert_eq!(m[&format!("drover_instance_up{l}")], 1.0, "{m:?}");
        assert_eq!(m[&format!("drover_instance_ready{l}")], 1.0, "{m:?}");
        assert_eq!(m[&format!("drover_instance_restarts_total{l}")], 0.0, "{m:?}");
        assert!(m[&format!("drover_instance_memory_bytes{l}")] > 0.0, "{m:?}");
        assert!(m[&format!("drover_instance_cpu_seconds_total{l}")] >= 0.0, "{m:?}");
    }
    assert_eq!(m["drover_job_runs_total{job=\"hello\",state=\"succeeded\"}"], 0.0, "{m:?}");
    assert_eq!(m["drover_job_skips_total{job=\"hello\"}"], 0.0, "{m:?}");
    assert_eq!(m["drover_reloads_total{result=\"applied\"}"], 0.0, "{m:?}");
    assert_eq!(m["drover_config_generation"], 1.0, "{m:?}");

    // A crash of instance 1 is a restart.
    let pid = instance(&v, "web", 1)["pid"].as_i64().expect("pid") as i32;
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill the instance");
    let m = wait_value(port, "drover_instance_restarts_total{worker=\"web\",instance=\"1\"}", 1.0);
    assert_eq!(m["drover_instance_restarts_total{worker=\"web\",instance=\"0\"}"], 0.0, "{m:?}");

    // A run that ends is counted by its end state.
    let out = sb.cli(&["trigger", "hello"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let m = wait_value(port, "drover_job_runs_total{job=\"hello\",state=\"succeeded\"}", 1.0);
    assert_eq!(m["drover_job_runs_total{job=\"hello\",state=\"failed\"}"], 0.0, "{m:?}");

    // Elsewhere 404, another method 405, HEAD the headers alone;
    // OpenMetrics when asked for.
    let (code, _) = split(&exchange(tcp(port), &get("/")));
    assert_eq!(code, 404);
    let resp = exchange(tcp(port), b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(split(&resp), (200, ""), "{resp}");
    let resp = exchange(tcp(port), b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(split(&resp).0, 405, "{resp}");
    assert!(resp.to_ascii_lowercase().contains("allow: get, head"), "{resp}");
    let om =
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n";
    let resp = exchange(tcp(port), om);
    assert!(resp.contains("content-type: application/openmetrics-text"), "{resp}");
    assert!(resp.ends_with("# EOF\n"), "{resp}");

    // Garbage, headers past the limit and a client that sends nothing
    // cost the supervisor nothing: it answers the next scrape.
    let silent = tcp(port);
    let (code, _) = split(&exchange(tcp(port), b"\x00\x01garbage\r\n\r\n"));
    assert_ne!(code, 200);
    let big = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    let (code, _) = split(&exchange(tcp(port), big.as_bytes()));
    assert_ne!(code, 200);
    assert_eq!(scrape(port)["drover_config_generation"], 1.0);
    drop(silent);

    // An applied reload raises the count and the generation, and moves the
    // metrics to the address the file now names.
    let port2 = free_port();
    sb.write("daemon.toml", config(&format!("127.0.0.1:{port2}"), "[jobs.other]\ncommand = [\"true\"]\n"));
    assert_eq!(sb.cli(&["reload"]).code, Some(0));
    let m = scrape(port2);
    assert_eq!(m["drover_reloads_total{result=\"applied\"}"], 1.0, "{m:?}");
    assert_eq!(m["drover_config_generation"], 2.0, "{m:?}");
    assert_eq!(m["drover_job_runs_total{job=\"other\",state=\"succeeded\"}"], 0.0, "{m:?}");
    assert_eq!(m["drover_job_runs_total{job=\"hello\",state=\"succeeded\"}"], 1.0, "kept over a reload");
    wait_until("the old port closed", LIMIT, || {
        TcpStream::connect(("127.0.0.1", port)).is_err().then_some(())
    });

    // A new address that cannot be bound keeps the old one serving, and
    // the rest of the file is applied.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port3 = taken.local_addr().expect("addr").port();
    sb.write("daemon.toml", config(&format!("127.0.0.1:{port3}"), ""));
    assert_eq!(sb.cli(&["reload"]).code, Some(0));
    let said = format!("the metrics stay on tcp://127.0.0.1:{port2}");
    wait_until("the error of the rebind", LIMIT, || sup.stderr().contains(&said).then_some(()));
    let m = scrape(port2);
    assert_eq!(m["drover_config_generation"], 3.0, "{m:?}");
    assert!(!m.contains_key("drover_job_skips_total{job=\"other\"}"), "job other is gone: {m:?}");

    // A failed reload raises only its count.
    sb.write("daemon.toml", "[workers.web]\ncapacity = 0\n");
    assert_eq!(sb.cli(&["reload"]).code, Some(1));
    let m = scrape(port2);
    assert_eq!(m["drover_reloads_total{result=\"failed\"}"], 1.0, "{m:?}");
    assert_eq!(m["drover_reloads_total{result=\"applied\"}"], 2.0, "{m:?}");
    assert_eq!(m["drover_config_generation"], 3.0, "{m:?}");
    assert!(sb.cli(&["status"]).code == Some(0), "the supervisor still answers");
}

#[test]
fn scrapes_over_a_unix_socket_that_moves_on_reload_and_goes_at_stop() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", config("unix:run/metrics.sock", ""));
    std::fs::create_dir_all(sb.path("run")).expect("mkdir");
    // A socket file left behind by a supervisor that is gone is replaced.
    drop(std::os::unix::net::UnixListener::bind(sb.path("run/metrics.sock")).expect("bind a stale socket"));
    let mut sup = Supervisor::start(&sb);
    sup.wait_for("two running instances", LIMIT, |v| {
        (0..2).all(|i| instance(v, "web", i)["state"] == "running")
    });
    let sock = sb.path("run/metrics.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&sock).expect("the socket").permissions().mode() & 0o777, 0o600);
    let m = wait_until("both instances up", LIMIT, || {
        let s = UnixStream::connect(&sock).expect("connect to the metrics socket");
        s.set_read_timeout(Some(LIMIT)).expect("timeout");
        let resp = exchange(s, &get("/metrics"));
        let m = samples(split(&resp).1);
        (m.get("drover_instance_up{worker=\"web\",instance=\"1\"}") == Some(&1.0)).then_some(m)
    });
    assert_eq!(m["drover_instance_up{worker=\"web\",instance=\"0\"}"], 1.0, "{m:?}");
    assert_eq!(m["drover_config_generation"], 1.0, "{m:?}");

    // Moved by a reload: the old file goes, the new socket answers.
    sb.write("daemon.toml", config("unix:other.sock", ""));
    assert_eq!(sb.cli(&["reload"]).code, Some(0));
    assert!(!sock.exists(), "the old socket is removed");
    let other = sb.path("other.sock");
    let s = UnixStream::connect(&other).expect("connect to the new metrics socket");
    s.set_read_timeout(Some(LIMIT)).expect("timeout");
    assert_eq!(samples(split(&exchange(s, &get("/metrics"))).1)["drover_config_generation"], 2.0);

    assert_eq!(sb.cli(&["stop"]).code, Some(0));
    assert!(sup.wait_exit(LIMIT).is_some_and(|s| s.success()));
    assert!(!other.exists(), "the metrics socket is removed at stop");
}

/// That `out` exited 1 with every one of `needles` on stderr.
fn refused(out: &Run, needles: &[&str]) {
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    for n in needles {
        assert!(out.stderr.contains(n), "no {n:?} in:\n{}", out.stderr);
    }
}

#[test]
fn a_non_loopback_address_is_a_check_error_at_the_key() {
    let sb = Sandbox::new();
    sb.write("daemon.toml", "[supervisor]\nmetrics = \"0.0.0.0:9464\"\n[workers.a]\ncommand = [\"true\"]\n");
    let at_key = "daemon.toml:2:11: supervisor.metrics: \"0.0.0.0:9464\" is not a loopback address";
    refused(&sb.cli(&["check"]), &[at_key]);

    // From the environment, the variable is named.
    sb.write("daemon.toml", "[workers.a]\ncommand = [\"true\"]\n");
    let mut check = sb.drover();
    check.args(["-c", "daemon.toml", "check"]).env("DROVER_SUPERVISOR__METRICS", "10.1.2.3:80");
    refused(&run_within(&mut check, LIMIT), &["DROVER_SUPERVISOR__METRICS", "not a loopback address"]);
}

#[test]
fn a_port_in_use_refuses_the_start_naming_the_key_and_the_address() {
    let sb = Sandbox::new();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    sb.write("daemon.toml", config(&format!("127.0.0.1:{port}"), ""));
    let out = run_within(sb.drover().args(["-c", "daemon.toml", "start"]), LIMIT);
    let what = format!("cannot serve [supervisor] metrics on tcp://127.0.0.1:{port}");
    refused(&out, &[&what, "in use"]);
    assert!(sb.processes().is_empty(), "nothing was started: {:?}", sb.processes());
    assert!(!sb.state_dir().join("drover.sock").exists(), "the control socket is gone");
}

#[test]
fn exports_leave_the_metrics_out() {
    let sb = Sandbox::new();
    let body = "[workers.web]\ncommand = [\"sleep\", \"600\"]\n";
    sb.write("with.toml", format!("[supervisor]\nmetrics = \"127.0.0.1:9464\"\n{body}"));
    sb.write("without.toml", body);
    for target in [&["kubernetes", "--workdir", "/app"][..], &["systemd"][..]] {
        let export = |file: &str| {
            let out = run_within(sb.drover().args(["-c", file, "export"]).args(target), LIMIT);
            assert_eq!(out.code, Some(0), "{target:?} {file}: {}", out.stderr);
            assert!(out.stdout.contains("web"), "{target:?} {file}: {}", out.stdout);
            out.stdout
        };
        assert_eq!(export("with.toml"), export("without.toml"), "{target:?}");
    }
}
