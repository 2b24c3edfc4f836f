#![no_main]

use clap::{CommandFactory, FromArgMatches};
use drover::cli::{Cli, Command};
use nix::sys::signal::{self, SigHandler};

// The two functions of the C maths library that drover's code calls
// (tokio's scheduler statistics use pow; the systemd export, log). Defined
// here, from the pure-Rust port of musl's, libm.so is not loaded at all:
// the dynamic loader's work on it would otherwise keep about 380 KiB of
// its pages resident in the supervisor and cost every command's start.
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[unsafe(no_mangle)]
pub extern "C" fn log(x: f64) -> f64 {
    libm::log(x)
}

// drover starts in its own `main`, not in Rust's runtime start: that one
// reads /proc/self/maps and sets up an alternate signal stack at every
// start (to name a stack overflow), a twentieth of a millisecond of each
// command. What else it does is done here: descriptors 0-2 are made to
// exist and SIGPIPE is set; stdout is flushed at the end.
#[unsafe(no_mangle)]
pub extern "C" fn main(_argc: std::ffi::c_int, _argv: *const *const std::ffi::c_char) -> std::ffi::c_int {
    open_missing_stdio();
    let code = run();
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::ffi::c_int::from(code)
}

fn run() -> u8 {
    // Between a worker's fork and its program: pass on its sockets.
    if let Some(code) = drover::os::listen::shim_main() {
        return u8::try_from(code).unwrap_or(1);
    }
    // A shell asking for completions: answered, then exit.
    drover::commands::completions::answer_if_asked();
    let cli = parse();
    // The supervisor ignores SIGPIPE (a write to a vanished client is an
    // EPIPE error); a client piped into `head` ends quietly, as other
    // tools do.
    let pipe = match cli.command {
        Command::Start { .. } => SigHandler::SigIgn,
        _ => SigHandler::SigDfl,
    };
    // SAFETY: single-threaded here, before anything else runs.
    unsafe {
        let _ = signal::signal(signal::Signal::SIGPIPE, pipe);
    }
    drover::commands::run(cli)
}

/// Opens /dev/null on whichever of descriptors 0, 1 and 2 is closed, so
/// that no file drover opens later becomes its stdin, stdout or stderr.
fn open_missing_stdio() {
    use std::os::fd::BorrowedFd;
    for fd in 0..=2 {
        // SAFETY: only asked about; fcntl(F_GETFD) on any number is sound.
        if nix::fcntl::fcntl(unsafe { BorrowedFd::borrow_raw(fd) }, nix::fcntl::FcntlArg::F_GETFD)
            == Err(nix::errno::Errno::EBADF)
        {
            // The lowest free number: this one. Kept open for good.
            if let Ok(null) =
                nix::fcntl::open("/dev/null", nix::fcntl::OFlag::O_RDWR, nix::sys::stat::Mode::empty())
            {
                std::mem::forget(null);
            }
        }
    }
}

/// `Cli::parse`, but a client keeps clap's command tree instead of freeing
/// it: freeing it node by node costs a command's start about as much as
/// building it did, and the process ends soon anyway. The supervisor frees
/// it (its heap is reused for as long as it runs).
fn parse() -> Cli {
    let mut cmd = Cli::command();
    let parsed =
        cmd.try_get_matches_from_mut(std::env::args_os()).and_then(|mut m| Cli::from_arg_matches_mut(&mut m));
    let cli = parsed.unwrap_or_else(|e| e.format(&mut cmd).exit());
    if !matches!(cli.command, Command::Start { .. }) {
        std::mem::forget(cmd);
    }
    cli
}
