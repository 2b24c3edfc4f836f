use std::process::ExitCode;

use clap::Parser;
use drover::cli::{Cli, Command};

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

fn main() -> ExitCode {
    // Between a worker's fork and its program: pass on its sockets.
    if let Some(code) = drover::os::listen::shim_main() {
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    // A shell asking for completions: answered, then exit.
    drover::commands::completions::answer_if_asked();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Start { .. }) {
        // A client piped into `head` should end quietly, as other tools
        // do; the supervisor keeps Rust's default (EPIPE as an error).
        // SAFETY: single-threaded here, before anything else runs.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            );
        }
    }
    ExitCode::from(drover::commands::run(cli))
}
