//! Restart storm: `--instances` instances of `/bin/true` with no backoff
//! (each restarts the moment it exits, thousands of times a second) while
//! `--clients` threads ask for the status over the control socket in a
//! loop, as `drover status --json` does. Records the latency of each
//! request (connect to last byte) and the restarts per second drover kept
//! up meanwhile.
//!
//!     cargo bench --bench storm                                   # 2000 instances, 2 clients, 10 s
//!     cargo bench --bench storm -- --instances 10000 --secs 10 --out benches/results/storm.md
//!     cargo bench --bench storm -- --drover /path/to/another/drover   # measure another build
//!
//! Goal: p99 under 100 ms during the storm.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use drover::supervisor::protocol::{Request, Response};

struct Args {
    instances: usize,
    clients: usize,
    secs: u64,
    out: Option<PathBuf>,
    drover: PathBuf,
    /// A pause between one client's requests (0: ask again at once).
    every: Duration,
}

fn args() -> Args {
    let mut a = Args {
        instances: 2000,
        clients: 2,
        secs: 10,
        out: None,
        drover: env!("CARGO_BIN_EXE_drover").into(),
        every: Duration::ZERO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--instances" => a.instances = val().parse().expect("--instances N"),
            "--clients" => a.clients = val().parse().expect("--clients N"),
            "--secs" => a.secs = val().parse().expect("--secs N"),
            "--out" => a.out = Some(val().into()),
            "--drover" => a.drover = val().into(),
            "--every-ms" => a.every = Duration::from_millis(val().parse().expect("--every-ms N")),
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// One status request: the total restarts it reports, and how long it took.
fn ask(sock: &Path) -> std::io::Result<(u64, Duration)> {
    let t = Instant::now();
    let mut s = UnixStream::connect(sock)?;
    let mut req =
        serde_json::to_vec(&Request::Status { name: None, pretty: false }).expect("request serializes");
    req.push(b'\n');
    s.write_all(&req)?;
    let mut line = Vec::with_capacity(1 << 20);
    BufReader::new(s).read_until(b'\n', &mut line)?;
    let took = t.elapsed();
    match serde_json::from_slice::<Response>(&line) {
        Ok(Response::Status(r)) => {
            Ok((r.workers.iter().flat_map(|w| &w.instances).map(|i| u64::from(i.restarts)).sum(), took))
        }
        other => Err(std::io::Error::other(format!("not a status: {other:?}"))),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

struct Drover(Child);

impl Drop for Drover {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

fn main() {
    let a = args();
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        "[supervisor]\nreload = false\n[workers.storm]\ncapacity = {}\ncommand = [\"/bin/true\"]\n\
         backoff = {{ initial = \"0s\", max = \"0s\", multiplier = 1.0 }}\n\
         crash_loop = {{ min_uptime = \"0s\", max_failures = 1000000 }}\n",
        a.instances
    );
    std::fs::write(dir.path().join("daemon.toml"), toml).unwrap();
    let child = Command::new(&a.drover)
        .args(["-c", "daemon.toml", "start"])
        .current_dir(dir.path())
        .env("DROVER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start drover");
    let drover = Drover(child);
    let sock = dir.path().join(".drover/drover.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        if let Ok((restarts, _)) = ask(&sock)
            && restarts > 0
        {
            break restarts;
        }
        assert!(Instant::now() < deadline, "no storm within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    };

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let threads: Vec<_> = (0..a.clients)
        .map(|_| {
            let (sock, stop, every) = (sock.clone(), stop.clone(), a.every);
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut last = 0;
                let mut failed = 0;
                while !stop.load(Ordering::Relaxed) {
                    match ask(&sock) {
                        Ok((restarts, took)) => {
                            lat.push(took);
                            last = last.max(restarts);
                        }
                        Err(_) => failed += 1,
                    }
                    std::thread::sleep(every);
                }
                (lat, last, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(a.secs));
    stop.store(true, Ordering::Relaxed);
    let (mut lat, mut last, mut failed) = (Vec::new(), first, 0);
    for t in threads {
        let (l, r, f) = t.join().expect("client thread");
        lat.extend(l);
        last = last.max(r);
        failed += f;
    }
    let wall = started.elapsed();
    let stopping = Instant::now();
    drop(drover);
    let stop_took = stopping.elapsed();
    lat.sort();
    assert!(!lat.is_empty(), "no status answered during the storm");
    let table = format!(
        "| instances | clients | restarts/s | status requests | failed | p50 | p90 | p99 | max | SIGTERM to exit |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
         | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |\n",
        a.instances,
        a.clients,
        last.saturating_sub(first) as f64 / wall.as_secs_f64(),
        lat.len(),
        failed,
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.90)),
        ms(percentile(&lat, 0.99)),
        ms(*lat.last().unwrap()),
        ms(stop_took),
    );
    println!("{table}");
    if let Some(out) = &a.out {
        let text = format!(
            "`cargo bench --bench storm -- --instances {} --clients {} --secs {} --every-ms {}`, drover binary {}\n\n{table}\n",
            a.instances,
            a.clients,
            a.secs,
            a.every.as_millis(),
            a.drover.display()
        );
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(out).expect("open --out");
        f.write_all(text.as_bytes()).expect("write --out");
    }
}
