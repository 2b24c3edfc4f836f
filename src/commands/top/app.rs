//! `drover top`: the loop that takes the feed's messages, turns keys into
//! requests, and redraws, at most [`FRAME`] apart however fast events come.
//! The terminal is given back by a guard, on q, on an error and on a panic.

use std::io::{IsTerminal, Stdout, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant, SystemTime};

use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::crossterm::{cursor, execute, terminal};

use super::feed::{self, Msg};
use super::model::{Footer, Key, Link, LogPane, Model};
use super::view::{self, Theme};
use crate::commands::client::Ctx;
use crate::commands::exit;
use crate::commands::logread::{Filter, Source, Tracked, tail};
use crate::supervisor::clock::rfc3339;
use crate::supervisor::logs::log_path;
use crate::supervisor::protocol::{InstanceAction, Request, Target};

/// The least time between two redraws: a burst of events is one redraw.
const FRAME: Duration = Duration::from_millis(50);

/// Messages handled before a redraw at most, so keys stay responsive in
/// a storm of events.
const BATCH: usize = 512;

pub fn top(ctx: &Ctx) -> u8 {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        eprintln!(
            "drover: top needs a terminal on stdin and stdout; for scripts, \
             use `drover status --json` or `drover events -f --json`"
        );
        return exit::FAILED;
    }
    let dir = ctx.state_dir();
    let (tx, rx) = feed::channel();
    // Before any other thread: they inherit the blocked signals.
    if let Err(e) = feed::quit_on_signals(tx.clone()) {
        eprintln!("drover: {e}");
        return exit::FAILED;
    }
    let colour = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let mut term = match Screen::enter() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("drover: cannot set up the terminal: {e}");
            return exit::FAILED;
        }
    };
    feed::start(dir.clone(), &tx);
    let mut app = App { model: Model::default(), dir, tx, log: None };
    let outcome = app.run(&mut term, &rx, Theme { colour });
    drop(term);
    match outcome {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("drover: {e}");
            exit::FAILED
        }
    }
}

/// The terminal in raw mode on the alternate screen, for as long as it
/// lives; restored when dropped, and by the panic hook it installs.
struct Screen {
    term: Terminal<CrosstermBackend<Stdout>>,
}

fn restore() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(std::io::stdout(), terminal::LeaveAlternateScreen, cursor::Show);
}

impl Screen {
    fn enter() -> std::io::Result<Screen> {
        terminal::enable_raw_mode()?;
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // The message must land on the normal screen, in cooked mode.
            restore();
            hook(info);
        }));
        let mut out = std::io::stdout();
        if let Err(e) = execute!(out, terminal::EnterAlternateScreen, cursor::Hide) {
            restore();
            return Err(e);
        }
        match Terminal::new(CrosstermBackend::new(out)) {
            Ok(term) => Ok(Screen { term }),
            Err(e) => {
                restore();
                Err(e)
            }
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = self.term.flush();
        restore();
    }
}

struct App {
    model: Model,
    dir: PathBuf,
    tx: SyncSender<Msg>,
    /// The open log pane's file, followed on each status tick.
    log: Option<Tracked>,
}

impl App {
    fn run(&mut self, screen: &mut Screen, rx: &Receiver<Msg>, theme: Theme) -> Result<(), String> {
        let mut last_draw: Option<Instant> = None;
        let mut dirty = true;
        loop {
            if dirty {
                let wait = last_draw.map_or(Duration::ZERO, |t| FRAME.saturating_sub(t.elapsed()));
                if wait.is_zero() {
                    let now = SystemTime::now();
                    screen
                        .term
                        .draw(|f| view::draw(f, &self.model, theme, now))
                        .map_err(|e| format!("cannot draw: {e}"))?;
                    last_draw = Some(Instant::now());
                    dirty = false;
                    continue;
                }
                // Gather what comes until the frame is due.
                match rx.recv_timeout(wait) {
                    Ok(msg) => self.take(msg)?,
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                }
            } else {
                // Idle: asleep until something happens.
                match rx.recv() {
                    Ok(msg) => self.take(msg)?,
                    Err(_) => return Ok(()),
                }
            }
            for msg in rx.try_iter().take(BATCH) {
                self.take(msg)?;
            }
            if self.model.quit {
                return Ok(());
            }
            dirty = true;
        }
    }

    fn take(&mut self, msg: Msg) -> Result<(), String> {
        let now = Instant::now();
        match msg {
            Msg::Key(k) => self.key(k, now),
            Msg::Resize => {}
            Msg::InputGone(e) => return Err(e),
            Msg::Quit => self.model.quit = true,
            Msg::EventsUp => self.model.events_connected(),
            Msg::Event(ev) => self.model.add_event(*ev),
            Msg::EventsDown(why) => self.model.events_link = Link::Down(why),
            Msg::Status(r) => {
                self.model.set_report(*r, now, rfc3339(SystemTime::now()));
                self.model.expire(now);
                self.follow_log();
            }
            Msg::StatusDown(why) => {
                self.model.status_link = Link::Down(why);
                self.model.expire(now);
            }
            Msg::Done(Ok(text)) => self.model.say(text, false, now),
            Msg::Done(Err(text)) => self.model.say(text, true, now),
        }
        Ok(())
    }

    fn key(&mut self, k: KeyEvent, now: Instant) {
        let m = &mut self.model;
        let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl_c {
            m.quit = true;
            return;
        }
        if m.footer == Footer::Filter {
            match k.code {
                KeyCode::Char(c) => m.filter.push(c),
                KeyCode::Backspace => {
                    m.filter.pop();
                }
                KeyCode::Enter => m.footer = Footer::Keys,
                KeyCode::Esc => {
                    m.filter.clear();
                    m.footer = Footer::Keys;
                }
                _ => {}
            }
            m.keep_selection();
            return;
        }
        match k.code {
            KeyCode::Char('q') => m.quit = true,
            KeyCode::Esc if self.log.is_some() || m.log.is_some() => self.close_log(),
            KeyCode::Esc => {
                m.filter.clear();
                m.keep_selection();
            }
            KeyCode::Up | KeyCode::Char('k') => m.select_by(-1),
            KeyCode::Down | KeyCode::Char('j') => m.select_by(1),
            KeyCode::PageUp => m.select_by(-10),
            KeyCode::PageDown => m.select_by(10),
            KeyCode::Home | KeyCode::Char('g') => m.select_end(false),
            KeyCode::End | KeyCode::Char('G') => m.select_end(true),
            KeyCode::Char('/') => m.footer = Footer::Filter,
            KeyCode::Char('r') => {
                self.on_worker(now, "restarting", |w| instances(InstanceAction::Restart, w))
            }
            KeyCode::Char('s') => self.on_worker(now, "stopping", |w| instances(InstanceAction::Stop, w)),
            KeyCode::Char('S') => self.on_worker(now, "starting", |w| instances(InstanceAction::Start, w)),
            KeyCode::Char('u') => self.on_worker(now, "unparking", |w| Request::Unpark { name: w.into() }),
            KeyCode::Char('t') => self.trigger(now),
            KeyCode::Char('l') => self.toggle_log(now),
            _ => {}
        }
    }

    /// Sends what `req` makes of the selected worker.
    fn on_worker(&mut self, now: Instant, doing: &str, req: impl FnOnce(&str) -> Request) {
        let Some(worker) = self.model.selected.as_ref().and_then(Key::worker).map(str::to_string) else {
            self.model.say("select a worker first (↑↓)".into(), true, now);
            return;
        };
        self.model.say(format!("{doing} {worker}…"), false, now);
        feed::act(self.dir.clone(), req(&worker), self.tx.clone());
    }

    fn trigger(&mut self, now: Instant) {
        let Some(job) = self.model.selected.as_ref().and_then(Key::job).map(str::to_string) else {
            self.model.say("t triggers a job: select one first (↓ past the workers)".into(), true, now);
            return;
        };
        self.model.say(format!("triggering {job}…"), false, now);
        feed::act(self.dir.clone(), Request::Trigger { job }, self.tx.clone());
    }

    fn toggle_log(&mut self, now: Instant) {
        if self.model.log.is_some() {
            self.close_log();
            return;
        }
        let Some(worker) = self.model.selected.as_ref().and_then(Key::worker).map(str::to_string) else {
            self.model.say("l shows a worker's log: select one first".into(), true, now);
            return;
        };
        match open_log(&self.dir, &worker) {
            Ok((pane, tracked)) => {
                self.model.log = Some(pane);
                self.log = Some(tracked);
            }
            Err(e) => self.model.say(e, true, now),
        }
    }

    fn close_log(&mut self) {
        self.model.log = None;
        self.log = None;
    }

    /// What the worker wrote since the last look, into the pane.
    fn follow_log(&mut self) {
        let (Some(t), Some(pane)) = (&mut self.log, &mut self.model.log) else { return };
        let mut sink = Lines { pane, partial: Vec::new() };
        if let Err(e) = t.catch_up(Filter::default(), &mut sink) {
            pane_note(sink.pane, &format!("cannot read the log: {e}"));
        }
    }
}

fn instances(action: InstanceAction, worker: &str) -> Request {
    Request::Instances { action, targets: vec![Target { worker: worker.into(), index: None }] }
}

/// The last lines of a worker's log, as `drover logs NAME` prints them,
/// and the file to follow on from.
fn open_log(dir: &Path, worker: &str) -> Result<(LogPane, Tracked), String> {
    let src = Source { label: None, path: log_path(dir, worker) };
    let (found, mut tracked) = tail(std::slice::from_ref(&src), super::model::LOG_LINES, Filter::default())
        .map_err(|e| e.to_string())?;
    let mut pane = LogPane { worker: worker.into(), lines: Default::default() };
    for f in found {
        pane.push(shown(&f.line));
    }
    if pane.lines.is_empty() {
        pane_note(&mut pane, "(no output yet)");
    }
    let t = tracked.pop().unwrap_or_else(|| Tracked::new(src));
    Ok((pane, t))
}

fn pane_note(pane: &mut LogPane, text: &str) {
    pane.push(text.to_string());
}

/// A log line (`TIME INSTANCE STREAM TEXT`) with the time of day alone.
fn shown(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    match text.split_once(' ') {
        Some((time, rest)) if time.len() >= 19 && time.is_char_boundary(19) && time.is_char_boundary(11) => {
            format!("{} {rest}", &time[11..19])
        }
        _ => text.into_owned(),
    }
}

/// Takes the lines a log follower writes, into the pane (which keeps the
/// last ones only, so a burst of output costs no more than the pane).
struct Lines<'a> {
    pane: &'a mut LogPane,
    partial: Vec<u8>,
}

impl Write for Lines<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut rest = buf;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&rest[..i]);
            let line = std::mem::take(&mut self.partial);
            self.pane.push(shown(&line));
            rest = &rest[i + 1..];
        }
        self.partial.extend_from_slice(rest);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_show_the_time_of_day() {
        assert_eq!(shown(b"2026-12-04T10:11:12.345Z 0 out hello"), "10:11:12 0 out hello");
        assert_eq!(shown(b"short 0 out x"), "short 0 out x");
        assert_eq!(shown("ééééééééééééééé x".as_bytes()), "ééééééééééééééé x");
        let mut pane = LogPane { worker: "w".into(), lines: Default::default() };
        let mut sink = Lines { pane: &mut pane, partial: Vec::new() };
        sink.write_all(b"2026-12-04T10:11:12.345Z 0 out a\n2026-12-04T10:11:13.000Z 0 out").unwrap();
        sink.write_all(b" b\n").unwrap();
        assert_eq!(pane.lines, ["10:11:12 0 out a", "10:11:13 0 out b"]);
    }
}
