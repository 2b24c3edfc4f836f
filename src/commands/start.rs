//! `drover start [--detach]`.

use std::io::BufRead;
use std::os::fd::OwnedFd;
use std::path::Path;

use super::exit;
use crate::cli::LogFormat;
use crate::config::{Overrides, load};
use crate::os::fsutil::{ensure_state_dir, open_append};
use crate::supervisor::runtime::{Ready, serve};

pub fn start(config: &Path, overrides: Overrides, detach: bool, log_format: LogFormat) -> u8 {
    let loaded = match load(config, &overrides) {
        Ok(l) => l,
        Err(diags) => {
            for d in diags {
                eprintln!("{d}");
            }
            return exit::FAILED;
        }
    };
    if !detach {
        crate::supervisor::own_log::init(log_format);
        return run(loaded, overrides, true, Ready(None));
    }

    let state_dir = loaded.config.supervisor.state_dir.clone();
    match ensure_state_dir(&state_dir) {
        Ok(None) => {}
        // The detached supervisor finds it private already: say it here.
        Ok(Some(mode)) => eprintln!(
            "drover: state_dir {} was mode {mode:o}: made it 0700 (owner only)",
            state_dir.display()
        ),
        Err(e) => {
            eprintln!("drover: cannot use state_dir {}: {e}", state_dir.display());
            return exit::FAILED;
        }
    }
    let (read_end, write_end) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("drover: cannot create a pipe: {e}");
            return exit::FAILED;
        }
    };
    // Fork before any thread exists (no runtime yet): the child is a
    // faithful copy, and it is the one that builds the runtime.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            eprintln!("drover: cannot fork: {e}");
            exit::FAILED
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(write_end);
            // One line: "ready", or "error: why". EOF alone means it died.
            let mut msg = String::new();
            let _ = std::io::BufReader::new(std::fs::File::from(read_end)).read_line(&mut msg);
            if msg.starts_with("ready") {
                println!("drover started (pid {child}), state_dir {}", state_dir.display());
                exit::OK
            } else if let Some(err) = msg.strip_prefix("error: ") {
                eprintln!("drover: {}", err.trim());
                exit::FAILED
            } else {
                eprintln!(
                    "drover: the supervisor exited during start-up; see {}/drover.log",
                    state_dir.display()
                );
                exit::FAILED
            }
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(read_end);
            let _ = nix::unistd::setsid();
            detach_stdio(&state_dir.join("drover.log"));
            crate::supervisor::own_log::init(log_format);
            let code = run(loaded, overrides, false, Ready(Some(std::fs::File::from(write_end))));
            std::process::exit(code.into());
        }
    }
}

/// The background supervisor's stdin is /dev/null; its stdout and stderr
/// go to state_dir/drover.log.
fn detach_stdio(log: &Path) {
    use std::os::fd::AsFd;
    let null = std::fs::File::open("/dev/null").map(OwnedFd::from);
    let out = open_append(log).map(OwnedFd::from);
    if let Ok(null) = &null {
        let _ = nix::unistd::dup2_stdin(null.as_fd());
    }
    if let Ok(out) = &out {
        let _ = nix::unistd::dup2_stdout(out.as_fd());
        let _ = nix::unistd::dup2_stderr(out.as_fd());
    }
}

/// The supervisor's blocking threads, at most.
const BLOCKING_THREADS: usize = 16;

/// How long an idle blocking thread waits for work before it ends. A
/// start or reload spawns on all of them at once, then on one or two: the
/// rest should not keep their stacks (and tokio's default of 10 s) long
/// after the burst. A quick series of restarts keeps one warm.
const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(1);

fn run(loaded: crate::config::Loaded, overrides: Overrides, echo: bool, mut ready: Ready) -> u8 {
    crate::os::memory::limit_arenas();
    // The actor runs on this thread (block_on); one worker thread runs the
    // pumps, probes and control connections beside it. A second worker
    // bought nothing but cross-thread wake-ups: 100 probed workers cost a
    // fifth more CPU with two (benches/readiness.py).
    // Spawns, cgroup and /proc reads run on blocking threads. Tokio's
    // default of 512 let a start of 100 workers make 100 threads whose
    // stacks stayed resident (11 MB RSS at N = 100, and a slower start at
    // N = 1000: the threads fought over two cores); 16 keep both cores busy.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(BLOCKING_THREADS)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let msg = format!("cannot start the runtime: {e}");
            eprintln!("drover: {msg}");
            ready.send(&format!("error: {msg}\n"));
            return exit::FAILED;
        }
    };
    match rt.block_on(serve(loaded, overrides, echo, &mut ready)) {
        Ok(()) => exit::OK,
        Err(e) => {
            // One line where the user looks: the terminal in the
            // foreground (where the log is the terminal too), the log and
            // the waiting parent when detached.
            if echo {
                eprintln!("drover: {e}");
            } else {
                tracing::error!(error = %e, "cannot start");
                ready.send(&format!("error: {e}\n"));
            }
            exit::FAILED
        }
    }
}
