//! Load: drover supervising 1000 workers while 100 clients ask for the
//! status over the control socket in a loop, as `drover status --json`
//! does. Every reply is checked (1000 workers, each instance running with a
//! pid); the latency of each request, connect to last byte, is recorded.
//!
//!     cargo bench --bench load                      # 1000 workers, 100 clients, 20 s
//!     cargo bench --bench load -- --workers 1000 --clients 100 --secs 20 --out benches/results/load.md
//!     cargo bench --bench load -- --drover /path/to/another/drover   # measure another build
//!
//! Goal (issue 6): p99 under 50 ms.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use drover::supervisor::protocol::{Request, Response};

struct Args {
    workers: usize,
    clients: usize,
    secs: u64,
    out: Option<PathBuf>,
    /// Another drover binary to measure (an older build, say).
    drover: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        workers: 1000,
        clients: 100,
        secs: 20,
        out: None,
        drover: env!("CARGO_BIN_EXE_drover").into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--workers" => a.workers = val().parse().expect("--workers N"),
            "--clients" => a.clients = val().parse().expect("--clients N"),
            "--secs" => a.secs = val().parse().expect("--secs N"),
            "--out" => a.out = Some(val().into()),
            "--drover" => a.drover = val().into(),
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// One status request: its reply, and how long it took.
fn ask(sock: &Path) -> std::io::Result<(Vec<u8>, Duration)> {
    let t = Instant::now();
    let mut s = UnixStream::connect(sock)?;
    let mut req =
        serde_json::to_vec(&Request::Status { name: None, pretty: false }).expect("request serializes");
    req.push(b'\n');
    s.write_all(&req)?;

    let mut line = Vec::with_capacity(256 * 1024);
    BufReader::new(s).read_until(b'\n', &mut line)?;
    Ok((line, t.elapsed()))
}

/// Whether a reply is a status of `n` workers, every instance running.
fn check(reply: &[u8], n: usize) -> Result<(), String> {
    let resp: Response = serde_json::from_slice(reply).map_err(|e| format!("not a response: {e}"))?;
    let Response::Status(report) = resp else { return Err(format!("not a status: {resp:?}")) };
    if report.workers.len() != n {
        return Err(format!("{} workers, want {n}", report.workers.len()));
    }
    for w in &report.workers {
        let ok =
            w.instances.len() == 1 && w.instances.iter().all(|i| i.state == "running" && i.pid.is_some());
        if !ok {
            return Err(format!("worker {} is not running: {:?}", w.name, w.instances));
        }
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

struct Drover {
    child: Child,
}

impl Drop for Drover {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn main() {
    let a = args();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut toml = String::from("[supervisor]\nreload = false\n[defaults]\nstop_grace = \"5s\"\n");
    for i in 0..a.workers {
        toml.push_str(&format!("[workers.w{i:04}]\ncommand = [\"sleep\", \"3600\"]\n"));
    }
    std::fs::write(dir.path().join("daemon.toml"), toml).unwrap();
    let child = Command::new(&a.drover)
        .args(["-c", "daemon.toml", "start"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start drover");
    let drover = Drover { child };
    let sock = dir.path().join(".drover/drover.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    while ask(&sock).ok().is_none_or(|(r, _)| check(&r, a.workers).is_err()) {
        assert!(Instant::now() < deadline, "drover did not start {} workers within 60 s", a.workers);
        std::thread::sleep(Duration::from_millis(50));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..a.clients)
        .map(|_| {
            let (sock, stop, n) = (sock.clone(), stop.clone(), a.workers);
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut bad = Vec::new();
                // A reply equal byte for byte to one already checked is as
                // correct as it; any other is parsed and checked whole.
                let mut checked = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match ask(&sock) {
                        Ok((reply, took)) => {
                            lat.push(took);
                            if reply != checked {
                                match check(&reply, n) {
                                    Ok(()) => checked = reply,
                                    Err(e) => bad.push(e),
                                }
                            }
                        }

                        Err(e) => bad.push(format!("request failed: {e}")),
                    }
                }
                (lat, bad)
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(a.secs));
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut bad = Vec::new();
    for t in threads {
        let (l, b) = t.join().expect("client thread");
        lat.extend(l);
        bad.extend(b);
    }
    let wall = started.elapsed();
    drop(drover);
    lat.sort();
    let table = format!(
        "| workers | clients | requests | bad replies | requests/s | p50 | p90 | p99 | max |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
         | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} |\n",
        a.workers,
        a.clients,
        lat.len(),
        bad.len(),
        lat.len() as f64 / wall.as_secs_f64(),
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.90)),
        ms(percentile(&lat, 0.99)),
        ms(*lat.last().unwrap()),
    );
    println!("{table}");
    if let Some(e) = bad.first() {
        println!("first bad reply: {e}");
    }
    if let Some(out) = &a.out {
        let text = format!(
            "# Load: status under {} concurrent clients\n\n\
             `cargo bench --bench load -- --workers {} --clients {} --secs {}` ({} s of load; latency from connect to the last byte of the reply; every reply checked: parsed whole, or equal byte for byte to one that was), drover binary {}\n\n{table}",
            a.clients,
            a.workers,
            a.clients,
            a.secs,
            a.secs,
            a.drover.display()
        );
        std::fs::write(out, text).expect("write --out");
    }
    assert!(bad.is_empty(), "{} bad replies", bad.len());
}
