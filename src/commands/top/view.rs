//! Drawing `drover top`: a header, the workers' instances, the jobs, the
//! recent events (or a worker's log) and a footer, fitted to the terminal.
//! Columns have fixed widths except the names and notes, which take what
//! is left and are cut, so a narrow terminal shrinks them, never wraps.

use std::time::{Duration, SystemTime};

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Row, Table, TableState};

use super::model::{Footer, Key, Model};
use crate::commands::client::mem_text;
use crate::supervisor::live::{LiveEvent, What};
use crate::supervisor::protocol::InstanceStatus;

/// Colours, or none at all (`NO_COLOR`): then only bold and reverse video
/// mark things, which are not colours.
#[derive(Clone, Copy)]
pub struct Theme {
    pub colour: bool,
}

impl Theme {
    fn fg(self, c: Color) -> Style {
        if self.colour { Style::new().fg(c) } else { Style::new() }
    }

    /// The colour of an instance's (or a run's) state.
    fn state(self, state: &str) -> Style {
        let c = match state {
            "running" | "succeeded" | "ready" => Color::Green,
            "starting" | "waiting" | "backoff" | "stopping" | "queued" => Color::Yellow,
            "parked" | "failed" | "unknown" | "exited" | "unhealthy" => Color::Red,
            "stopped" | "cancelled" | "skipped" => Color::DarkGray,
            _ => Color::Reset,
        };
        let s = self.fg(c);
        if state == "parked" { s.add_modifier(Modifier::BOLD) } else { s }
    }

    fn title(self) -> Style {
        self.fg(Color::Cyan).add_modifier(Modifier::BOLD)
    }

    fn selected(self) -> Style {
        Style::new().add_modifier(Modifier::REVERSED)
    }

    fn dim(self) -> Style {
        if self.colour { Style::new().fg(Color::DarkGray) } else { Style::new() }
    }

    fn alert(self) -> Style {
        self.fg(Color::Red).add_modifier(Modifier::BOLD)
    }
}

pub fn draw(f: &mut Frame, m: &Model, theme: Theme, now: SystemTime) {
    let area = f.area();
    let jobs = m.jobs().count();
    // The lower pane: a worker's log, else the events, at least 3 lines.
    let lower = if m.log.is_some() { area.height.saturating_sub(4) / 2 } else { 6 };
    let jobs_h = if jobs == 0 { 0 } else { (jobs as u16 + 2).min(6) };
    let [header, workers, jobs_area, lower_area, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(if m.log.is_some() { 0 } else { jobs_h }),
        Constraint::Length(lower),
        Constraint::Length(1),
    ])
    .areas(area);
    f.render_widget(Paragraph::new(header_line(m, theme, now)), header);
    draw_workers(f, workers, m, theme, now);
    if jobs_area.height > 0 {
        draw_jobs(f, jobs_area, m, theme, now);
    }
    match &m.log {
        Some(log) => {
            let title = format!(" log of {} (l or Esc closes) ", log.worker);
            let lines = lower_area.height.saturating_sub(1) as usize;
            let body =
                log.lines.iter().skip(log.lines.len().saturating_sub(lines)).map(|l| Line::raw(l.as_str()));
            let text: Vec<Line> =
                std::iter::once(section(&title, lower_area.width, theme)).chain(body).collect();
            f.render_widget(Paragraph::new(text), lower_area);
        }
        None => {
            let lines = lower_area.height.saturating_sub(1) as usize;
            let body =
                m.events.iter().skip(m.events.len().saturating_sub(lines)).map(|e| event_line(e, theme));
            let text: Vec<Line> =
                std::iter::once(section(" events ", lower_area.width, theme)).chain(body).collect();
            f.render_widget(Paragraph::new(text), lower_area);
        }
    }
    f.render_widget(Paragraph::new(footer_line(m, theme)), footer);
}

/// A rule with a title in it, as the top of a section.
fn section(title: &str, width: u16, theme: Theme) -> Line<'static> {
    let rest = (width as usize).saturating_sub(title.chars().count() + 2);
    Line::from(vec![
        Span::styled("──", theme.dim()),
        Span::styled(title.to_string(), theme.title()),
        Span::styled("─".repeat(rest), theme.dim()),
    ])
}

fn header_line(m: &Model, theme: Theme, now: SystemTime) -> Line<'static> {
    let mut spans = vec![Span::styled("drover top", theme.title())];
    if let Some(why) = m.trouble() {
        spans.push(Span::raw("  "));
        spans.push(Span::styled(format!("{why}; retrying every second"), theme.alert()));
        return Line::from(spans);
    }
    let Some(r) = &m.report else {
        spans.push(Span::raw("  connecting…"));
        return Line::from(spans);
    };
    let s = &r.supervisor;
    let up = s.started_at.as_deref().map(|t| age(t, now)).unwrap_or_default();
    let instances: usize = r.workers.iter().map(|w| w.instances.len()).sum();
    spans.push(Span::raw(format!(
        "  pid {} up {up}  gen {}  {} workers {instances} inst {} jobs",
        s.pid.map_or("-".into(), |p| p.to_string()),
        s.generation,
        r.workers.len(),
        r.jobs.len()
    )));
    if let Some(lr) = &s.last_reload
        && !lr.ok
    {
        spans.push(Span::styled("  last reload FAILED", theme.alert()));
    }
    Line::from(spans)
}

/// "5m 3s" since an RFC 3339 time, to the second.
fn age(rfc: &str, now: SystemTime) -> String {
    humantime::parse_rfc3339_weak(rfc)
        .ok()
        .and_then(|t| now.duration_since(t).ok())
        .map(|d| short(Duration::from_secs(d.as_secs())))
        .unwrap_or_else(|| "-".into())
}

/// A duration in at most two units: "3d 4h", "5m 3s", "42s".
fn short(d: Duration) -> String {
    let s = d.as_secs();
    let (d_, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d_, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d_}d{h:02}h"),
    }
}

fn note(m: &Model, worker: &str, i: &InstanceStatus) -> String {
    if i.held {
        return "stopped by hand (S starts)".into();
    }
    if !i.waiting_for.is_empty() {
        return format!("waiting for {}", i.waiting_for.join(", "));
    }
    if let Some(e) = &i.error {
        return e.clone();
    }
    if let Some(why) = m.unhealthy.get(&(worker.to_string(), i.index)) {
        return format!("unhealthy: {why}");
    }
    if let Some(t) = &i.next_start_at {
        return format!("next start {}", t.get(11..19).unwrap_or(t));
    }
    if let Some(e) = &i.last_exit {
        return format!("last exit {e}");
    }
    i.notify_status.clone().unwrap_or_default()
}

fn draw_workers(f: &mut Frame, area: Rect, m: &Model, theme: Theme, now: SystemTime) {
    let header = Row::new(["WORKER", "#", "STATE", "PID", "UPTIME", "CPU%", "MEM", "RST", "RDY", "NOTE"])
        .style(theme.title());
    let mut rows = Vec::new();
    let mut selected = None;
    let mut name_w = 6;
    for w in m.workers() {
        name_w = name_w.max(w.name.chars().count());
        if w.instances.is_empty() {
            if m.selected == Some(Key::Worker(w.name.clone())) {
                selected = Some(rows.len());
            }
            rows.push(Row::new(vec![
                Span::raw(w.name.clone()),
                Span::raw("-"),
                Span::styled(w.state.clone(), theme.state(&w.state)),
            ]));
            continue;
        }
        for i in &w.instances {
            if m.selected == (Some(Key::Instance { worker: w.name.clone(), index: i.index })) {
                selected = Some(rows.len());
            }
            let running = matches!(i.state.as_ref(), "running" | "starting");
            let cpu = i.pid.and_then(|p| m.cpu_now.get(&p));
            rows.push(Row::new(vec![
                Span::raw(w.name.clone()),
                Span::raw(if i.surge { format!("{}+", i.index) } else { i.index.to_string() }),
                Span::styled(i.state.clone(), theme.state(&i.state)),
                Span::raw(i.pid.map_or("-".into(), |p| p.to_string())),
                Span::raw(match (&i.started_at, running) {
                    (Some(t), true) => age(t, now),
                    _ => "-".into(),
                }),
                Span::raw(cpu.map_or("-".into(), |c| format!("{c:.1}"))),
                Span::raw(i.rss_bytes.map_or("-".into(), mem_text)),
                Span::raw(i.restarts.to_string()),
                match i.state.as_ref() {
                    "running" => Span::styled("yes", theme.state("ready")),
                    "starting" => Span::styled("no", theme.state("starting")),
                    _ => Span::raw("-"),
                },
                Span::raw(note(m, &w.name, i)),
            ]));
        }
    }
    let empty = rows.is_empty();
    let widths = [
        Constraint::Max(name_w.min(24) as u16),
        Constraint::Length(3),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(5),
        Constraint::Length(6),
        Constraint::Length(3),
        Constraint::Length(3),
        Constraint::Fill(1),
    ];
    let title = match (m.filter.is_empty(), m.report.is_some()) {
        (false, _) => format!(" workers matching /{} ", m.filter),
        _ => " workers ".to_string(),
    };
    let [top, body] = Layout::vertical([Constraint::Length(1), Constraint::Fill(1)]).areas(area);
    f.render_widget(Paragraph::new(section(&title, top.width, theme)), top);
    if empty {
        let what = if m.report.is_none() { "" } else { "no workers" };
        f.render_widget(Paragraph::new(what).style(theme.dim()), body);
        return;
    }
    let table = Table::new(rows, widths).header(header).row_highlight_style(theme.selected());
    let mut state = TableState::default().with_selected(selected);
    f.render_stateful_widget(table, body, &mut state);
}

fn draw_jobs(f: &mut Frame, area: Rect, m: &Model, theme: Theme, now: SystemTime) {
    let header = Row::new(["JOB", "TRIGGER", "NEXT", "ACTIVE", "LAST RUN"]).style(theme.title());
    let mut rows = Vec::new();
    let mut selected = None;
    for j in m.jobs() {
        if m.selected == Some(Key::Job(j.name.clone())) {
            selected = Some(rows.len());
        }
        let next = j.next_tick.as_deref().map_or("-".into(), |t| until(t, now));
        let active = if j.active.is_empty() {
            "-".into()
        } else {
            j.active.iter().map(|id| id.to_string()).collect::<Vec<_>>().join(",")
        };
        let last = match &j.last_run {
            Some(l) => Line::from(vec![
                Span::raw(format!("{} ", l.id)),
                Span::styled(l.state.as_str().to_string(), theme.state(l.state.as_str())),
                Span::raw(l.ended_at.as_deref().map_or(String::new(), |t| format!(" {} ago", age(t, now)))),
            ]),
            None => Line::raw("-"),
        };
        rows.push(Row::new(vec![
            Line::raw(j.name.clone()),
            Line::raw(j.trigger.clone()),
            Line::raw(next),
            Line::raw(active),
            last,
        ]));
    }
    let widths = [
        Constraint::Fill(2),
        Constraint::Fill(3),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Fill(3),
    ];
    let [top, body] = Layout::vertical([Constraint::Length(1), Constraint::Fill(1)]).areas(area);
    f.render_widget(Paragraph::new(section(" jobs ", top.width, theme)), top);
    let table = Table::new(rows, widths).header(header).row_highlight_style(theme.selected());
    let mut state = TableState::default().with_selected(selected);
    f.render_stateful_widget(table, body, &mut state);
}

/// "in 4s" until an RFC 3339 time ("now" once it has passed).
fn until(rfc: &str, now: SystemTime) -> String {
    match humantime::parse_rfc3339_weak(rfc).ok().map(|t| t.duration_since(now)) {
        Some(Ok(d)) => format!("in {}", short(Duration::from_secs(d.as_secs()))),
        Some(Err(_)) => "now".into(),
        None => "-".into(),
    }
}

fn event_line(e: &LiveEvent, theme: Theme) -> Line<'static> {
    let text = e.to_string();
    // The line's own time is RFC 3339; the time of day is enough here.
    let rest = text.get(e.time.len()..).unwrap_or(&text).trim_start().to_string();
    let clock = e.time.get(11..19).unwrap_or("").to_string();
    let style = match &e.what {
        What::Started { .. } | What::Ready { .. } => theme.state("running"),
        What::Exited { .. } | What::Unhealthy { .. } | What::ReloadFailed { .. } | What::Lagged { .. } => {
            theme.state("exited")
        }
        What::Parked { .. } => theme.state("parked"),
        What::Backoff { .. } => theme.state("backoff"),
        What::RunEnded { state, .. } => theme.state(state),
        _ => Style::new(),
    };
    Line::from(vec![Span::styled(clock, theme.dim()), Span::raw(" "), Span::styled(rest, style)])
}

fn footer_line(m: &Model, theme: Theme) -> Line<'static> {
    match &m.footer {
        Footer::Filter => Line::from(vec![
            Span::styled("filter: /", theme.title()),
            Span::raw(m.filter.clone()),
            Span::styled("▏ Enter keeps, Esc clears", theme.dim()),
        ]),
        Footer::Message { text, error, .. } => {
            let style = if *error { theme.alert() } else { theme.state("running") };
            Line::styled(text.clone(), style)
        }
        Footer::Keys => {
            let keys = [
                ("↑↓", "move"),
                ("r", "restart"),
                ("s", "stop"),
                ("S", "start"),
                ("u", "unpark"),
                ("t", "trigger"),
                ("l", "log"),
                ("/", "find"),
                ("q", "quit"),
            ];
            let mut spans = Vec::new();
            for (k, what) in keys {
                spans.push(Span::styled(k, theme.title()));
                spans.push(Span::raw(format!(" {what}  ")));
            }
            Line::from(spans)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fit_a_column() {
        assert_eq!(short(Duration::from_secs(42)), "42s");
        assert_eq!(short(Duration::from_secs(303)), "5m03s");
        assert_eq!(short(Duration::from_secs(3 * 3600 + 60)), "3h01m");
        assert_eq!(short(Duration::from_secs(50 * 86_400)), "50d00h");
        for s in [0, 59, 3599, 86_399, 99 * 86_400] {
            assert!(short(Duration::from_secs(s)).chars().count() <= 7, "{s}");
        }
    }
}
