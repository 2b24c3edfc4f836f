//! `drover events`: the supervisor's state changes, as they happen.

use std::io::{BufRead, Write};

use super::client::Ctx;
use super::exit;
use crate::supervisor::control::{ClientError, send};
use crate::supervisor::live::{LiveEvent, What};
use crate::supervisor::protocol::{Request, Response};

/// Prints the recent events (and with `follow`, those to come) about
/// `names`, as JSON lines or text. Exit 0 when the stream ends as it
/// should (the recent events told, or the supervisor's last `end` line),
/// 1 on an error or when the stream was cut: this reader dropped for
/// falling behind or for not reading, or the supervisor killed.
pub fn events(ctx: &Ctx, json: bool, follow: bool, names: Vec<String>) -> u8 {
    let dir = ctx.state_dir();
    let mut reader = match send(&dir, &Request::Events { names, follow }, None) {
        Ok(r) => r,
        Err(ClientError::NoSupervisor) => return ctx.no_supervisor(&dir),
        Err(e) => {
            eprintln!("drover: {e}");
            return exit::FAILED;
        }
    };
    let mut out = std::io::stdout().lock();
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) if !follow => return exit::OK,
            Ok(0) => {
                eprintln!(
                    "drover: the event stream was cut without its end: the supervisor was killed, \
                     or it dropped this reader for not reading for {} s",
                    crate::supervisor::control::WRITE_TIMEOUT.as_secs()
                );
                return exit::FAILED;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("drover: cannot read events: {e}");
                return exit::FAILED;
            }
        }
        // An error comes as a response line, events as event lines.
        if let Ok(Response::Error { message }) = serde_json::from_str::<Response>(&line) {
            eprintln!("drover: {message}");
            return exit::FAILED;
        }
        let ev = serde_json::from_str::<LiveEvent>(&line).ok();
        let lagged = ev.as_ref().is_some_and(|e| matches!(e.what, What::Lagged { .. }));
        let end = ev.as_ref().is_some_and(|e| matches!(e.what, What::End { .. }));
        let written = match ev {
            Some(ev) if !json => writeln!(out, "{ev}"),
            // JSON as it came; a kind this client does not know, too.
            _ => out.write_all(line.as_bytes()),
        };
        // Lines go out as they come, even into a pipe.
        if written.and_then(|()| out.flush()).is_err() {
            // The reader of our output went away (`| head`).
            return exit::OK;
        }
        if lagged {
            eprintln!("drover: this reader fell behind and was dropped by the supervisor");
            return exit::FAILED;
        }
        if end {
            return exit::OK;
        }
    }
}
