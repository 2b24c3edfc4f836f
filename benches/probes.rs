//! Probe loops at rest: `--tcp` tcp and `--http` http health probes
//! (default 100 each, interval 1s) against a local listener for `--secs`
//! seconds (default 10), on a runtime like the supervisor's (two worker
//! threads). Prints the CPU this process used meanwhile (user + system,
//! from /proc/self/stat) as a percentage of one core. The listener runs in
//! a child process (this binary again, with `--serve`), so its CPU is not
//! counted.
//!
//!     cargo bench --bench probes
//!     cargo bench --bench probes -- --tcp 1000 --http 0 --secs 20
//!
//! Goal: under 1% of one core for 100 + 100 probes at 1s.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drover::os::reaper::Reaper;
use drover::supervisor::probes::{Probe, ProbeContext, ProbeKind, Role, spawn_probe};

struct Args {
    tcp: usize,
    http: usize,
    secs: u64,
    serve: bool,
}

fn args() -> Args {
    let mut a = Args { tcp: 100, http: 100, secs: 10, serve: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--tcp" => a.tcp = val().parse().expect("--tcp N"),
            "--http" => a.http = val().parse().expect("--http N"),
            "--secs" => a.secs = val().parse().expect("--secs N"),
            "--serve" => a.serve = true,
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// The listener: answers every request with 200 and closes. Prints its
/// address, then serves until its stdin closes.
fn serve() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("{}", l.local_addr().expect("addr"));
        let accept = async {
            loop {
                let Ok((mut s, _)) = l.accept().await else { continue };
                tokio::spawn(async move {
                    let mut b = [0u8; 2048];
                    if let Ok(n) = s.read(&mut b).await
                        && n > 0
                    {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    }
                });
            }
        };
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
        });
        tokio::select! {
            _ = accept => {}
            _ = stdin_closed => {}
        }
    });
}

/// User + system CPU of this process so far, in clock ticks.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let rest = &stat[stat.rfind(')').expect("stat format") + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime); `rest` starts at field 3.
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

fn main() {
    let a = args();
    if a.serve {
        return serve();
    }
    let mut server = Command::new(std::env::current_exe().expect("own path"))
        .arg("--serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the listener");
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("stdout")).read_line(&mut line).expect("listener address");
    let addr = line.trim().to_string();

    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let failures = Arc::new(AtomicU64::new(0));
    let (ticks, wall) = rt.block_on(async {
        let ctx = ProbeContext {
            env: Default::default(),
            dir: ".".into(),
            reaper: Arc::new(Reaper::default()),
            identity: Default::default(),
        };
        let kinds = std::iter::repeat_n(ProbeKind::Tcp(addr.clone()), a.tcp)
            .chain(std::iter::repeat_n(ProbeKind::Http(format!("http://{addr}/health")), a.http));
        let mut handles = Vec::new();
        let start = Instant::now();
        for kind in kinds {
            // A health probe never ends while it passes; one that fails
            // once (failures = 1) reports, and is counted.
            let p = Probe {
                kind,
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                start_timeout: Duration::ZERO,
                failures: 1,
            };
            let f = failures.clone();
            let h = spawn_probe(Role::Health, &p, ctx.clone(), move |v| {
                eprintln!("probe failed after {:?}: {v}", start.elapsed());
                f.fetch_add(1, Ordering::Relaxed);
            })
            .expect("spawn a probe");
            handles.push(h);
        }
        // Past the first round of checks (all start together), then measure.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (t0, w0) = (cpu_ticks(), Instant::now());
        tokio::time::sleep(Duration::from_secs(a.secs)).await;
        let r = (cpu_ticks() - t0, w0.elapsed());
        drop(handles);
        r
    });
    drop(server.stdin.take());
    let _ = server.wait();

    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = ticks as f64 / hz;
    let pct = 100.0 * cpu / wall.as_secs_f64();
    println!(
        "{} tcp + {} http health probes at 1s for {:.1} s: CPU {:.3} s = {:.2}% of one core \
         (resolution {:.2}%); failed probes: {}",
        a.tcp,
        a.http,
        wall.as_secs_f64(),
        cpu,
        pct,
        100.0 / hz / wall.as_secs_f64(),
        failures.load(Ordering::Relaxed)
    );
}
