//! Where `drover top` gets its news: one thread follows the event stream,
//! one asks for the status once a second, one reads the keyboard, and
//! each key's action runs on a thread of its own. All of them send to one
//! bounded channel that the view drains; a full channel makes the event
//! reader wait, and the supervisor drops a reader that waits too long (it
//! reconnects), so nothing here can hold more than the channel.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyEvent, KeyEventKind};

use crate::supervisor::control::{ClientError, request, send};
use crate::supervisor::live::{LiveEvent, What};
use crate::supervisor::protocol::{Request, Response, StatusReport};

/// Messages the channel holds before senders wait.
const CHANNEL: usize = 4096;

/// Least time between two status requests, and between two attempts to
/// reconnect: the view never asks more often.
pub const EVERY: Duration = Duration::from_secs(1);

/// How long a status request or an action may take before it is an error.
const TIMEOUT: Duration = Duration::from_secs(10);

pub enum Msg {
    Key(KeyEvent),
    Resize,
    /// The keyboard cannot be read any more.
    InputGone(String),
    /// A subscription began: the recent events follow.
    EventsUp,
    Event(Box<LiveEvent>),
    /// The stream ended or could not be had; the reader tries again.
    EventsDown(String),
    Status(Box<StatusReport>),
    StatusDown(String),
    /// What a key's action came to: the supervisor's answer or the error.
    Done(Result<String, String>),
    /// SIGTERM or SIGHUP: leave as after q.
    Quit,
}

/// The channel every reader sends to and the view drains.
pub fn channel() -> (SyncSender<Msg>, Receiver<Msg>) {
    sync_channel(CHANNEL)
}

/// Starts the readers. Their threads end with the process.
pub fn start(state_dir: PathBuf, tx: &SyncSender<Msg>) {
    let (t, dir) = (tx.clone(), state_dir.clone());
    std::thread::spawn(move || follow_events(&dir, &t));
    let (t, dir) = (tx.clone(), state_dir);
    std::thread::spawn(move || poll_status(&dir, &t));
    let t = tx.clone();
    std::thread::spawn(move || read_keys(&t));
}

/// Why no supervisor answers, as the header says it.
fn down(e: &ClientError, dir: &std::path::Path) -> String {
    match e {
        ClientError::NoSupervisor => format!("no supervisor is running (state_dir {})", dir.display()),
        e => e.to_string(),
    }
}

/// Waits out the rest of [`EVERY`] since `since`: the pace of retries.
fn pace(since: Instant) {
    std::thread::sleep(EVERY.saturating_sub(since.elapsed()));
}

fn follow_events(dir: &std::path::Path, tx: &SyncSender<Msg>) {
    loop {
        let began = Instant::now();
        let why = match send(dir, &Request::Events { names: vec![], follow: true }, None) {
            Ok(reader) => {
                if tx.send(Msg::EventsUp).is_err() {
                    return;
                }
                match read_stream(reader, tx) {
                    Some(why) => why,
                    None => return,
                }
            }
            Err(e) => down(&e, dir),
        };
        if tx.send(Msg::EventsDown(why)).is_err() {
            return;
        }
        pace(began);
    }
}

/// Forwards the events of one subscription until it ends; says why it
/// ended, or `None` when the view is gone.
fn read_stream(reader: impl BufRead, tx: &SyncSender<Msg>) -> Option<String> {
    for line in reader.lines() {
        let line = match line {
            Ok(l) => l,
            Err(e) => return Some(format!("the event stream broke: {e}")),
        };
        if let Ok(Response::Error { message }) = serde_json::from_str::<Response>(&line) {
            return Some(message);
        }
        // A kind this build does not know is skipped.
        let Ok(ev) = serde_json::from_str::<LiveEvent>(&line) else { continue };
        match &ev.what {
            What::Lagged { .. } => return Some("this view fell behind the events and is catching up".into()),
            What::End { reason } => return Some(reason.clone()),
            _ => {}
        }
        tx.send(Msg::Event(Box::new(ev))).ok()?;
    }
    Some("the supervisor closed the event stream".into())
}

fn poll_status(dir: &std::path::Path, tx: &SyncSender<Msg>) {
    loop {
        let began = Instant::now();
        let msg = match request(dir, &Request::Status { name: None, pretty: false }, Some(TIMEOUT)) {
            Ok(Some(Response::Status(r))) => Msg::Status(r),
            Ok(Some(Response::Error { message })) => Msg::StatusDown(message),
            Ok(Some(_)) => Msg::StatusDown("the supervisor gave an unexpected answer to status".into()),
            Ok(None) => Msg::StatusDown("the supervisor closed the connection".into()),
            Err(e) => Msg::StatusDown(down(&e, dir)),
        };
        if tx.send(msg).is_err() {
            return;
        }
        pace(began);
    }
}

fn read_keys(tx: &SyncSender<Msg>) {
    loop {
        let msg = match event::read() {
            // Releases and repeats (reported by some terminals) are not presses.
            Ok(Event::Key(k)) if k.kind == KeyEventKind::Press => Msg::Key(k),
            Ok(Event::Resize(..)) => Msg::Resize,
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.send(Msg::InputGone(format!("cannot read the keyboard: {e}")));
                return;
            }
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

/// Sends `req` on a thread of its own and reports the answer as a
/// [`Msg::Done`], so a slow answer never freezes the view.
pub fn act(dir: PathBuf, req: Request, tx: SyncSender<Msg>) {
    std::thread::spawn(move || {
        let done = match request(&dir, &req, Some(TIMEOUT)) {
            Ok(Some(Response::Ok { message })) | Ok(Some(Response::Instances { message, .. })) => Ok(message),
            Ok(Some(Response::Run { id })) => Ok(format!("queued run {id}")),
            Ok(Some(Response::Error { message })) => Err(message),
            Ok(Some(other)) => Err(format!("unexpected answer: {other:?}")),
            Ok(None) => Err("the supervisor closed the connection without answering".into()),
            Err(e) => Err(down(&e, &dir)),
        };
        let _ = tx.send(Msg::Done(done));
    });
}

/// Turns SIGTERM and SIGHUP into [`Msg::Quit`], so the terminal is given
/// back as after q. Must run before any other thread starts: the signals
/// are blocked in this thread and every thread started after it, and
/// taken by `sigwait` alone.
pub fn quit_on_signals(tx: SyncSender<Msg>) -> Result<(), String> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.thread_block().map_err(|e| format!("cannot block SIGTERM and SIGHUP: {e}"))?;
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            let _ = tx.send(Msg::Quit);
        }
    });
    Ok(())
}
