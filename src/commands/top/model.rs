//! What `drover top` shows, kept apart from the terminal: the last status
//! report, the recent events, the selection, the filter and the log tail.
//! Every change comes in through a method here, so the view is a function
//! of this state and the state is tested without a terminal.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::supervisor::live::{LiveEvent, What};
use crate::supervisor::protocol::{InstanceStatus, JobStatus, StatusReport, WorkerStatus};

/// Recent events kept for the events pane.
pub const EVENTS: usize = 200;
/// Lines of a worker's log kept for the log pane.
pub const LOG_LINES: usize = 500;
/// How long a message about a key's action stays in the footer.
const MESSAGE_FOR: Duration = Duration::from_secs(6);

/// What a row of the view stands for: the selection follows it across
/// refreshes, whatever moves around it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Instance {
        worker: String,
        index: u32,
    },
    /// A worker with no instances (capacity 0).
    Worker(String),
    Job(String),
}

impl Key {
    /// The worker the row belongs to, if it is a worker's.
    pub fn worker(&self) -> Option<&str> {
        match self {
            Key::Instance { worker, .. } | Key::Worker(worker) => Some(worker),
            Key::Job(_) => None,
        }
    }

    pub fn job(&self) -> Option<&str> {
        match self {
            Key::Job(j) => Some(j),
            _ => None,
        }
    }
}

/// Whether the supervisor answers, as the header says it.
#[derive(Clone, Debug, PartialEq)]
pub enum Link {
    /// Not asked yet.
    Connecting,
    Up,
    /// Why not, as a sentence.
    Down(String),
}

/// The footer: the keys, a filter being typed, or the outcome of a key.
#[derive(Clone, Debug, PartialEq)]
pub enum Footer {
    Keys,
    Filter,
    Message { text: String, error: bool, until: Instant },
}

/// A worker's log pane.
#[derive(Debug)]
pub struct LogPane {
    pub worker: String,
    pub lines: VecDeque<String>,
}

impl LogPane {
    pub fn push(&mut self, line: String) {
        if self.lines.len() >= LOG_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }
}

#[derive(Debug)]
pub struct Model {
    pub report: Option<StatusReport>,
    /// When `report` was taken, as an event time (RFC 3339, ms, UTC):
    /// events stamped later are newer than it and patch it.
    pub report_time: String,
    pub status_link: Link,
    pub events_link: Link,
    pub events: VecDeque<LiveEvent>,
    pub filter: String,
    pub footer: Footer,
    pub selected: Option<Key>,
    pub log: Option<LogPane>,
    /// CPU seconds of each instance (by pid) at the previous report, to
    /// show the current load rather than the lifetime average.
    cpu_prev: HashMap<i32, (f64, Instant)>,
    /// CPU% per pid between the last two reports.
    pub cpu_now: HashMap<i32, f64>,
    /// The last probe failure of an instance since it last started.
    pub unhealthy: HashMap<(String, u32), String>,
    pub quit: bool,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            report: None,
            report_time: String::new(),
            status_link: Link::Connecting,
            events_link: Link::Connecting,
            events: VecDeque::with_capacity(EVENTS),
            filter: String::new(),
            footer: Footer::Keys,
            selected: None,
            log: None,
            cpu_prev: HashMap::new(),
            cpu_now: HashMap::new(),
            unhealthy: HashMap::new(),
            quit: false,
        }
    }
}

impl Model {
    /// A fresh report, taken at `now` (`time` is the same moment as an
    /// event time).
    pub fn set_report(&mut self, report: StatusReport, now: Instant, time: String) {
        let mut cpu_prev = HashMap::new();
        self.cpu_now.clear();
        for i in report.workers.iter().flat_map(|w| &w.instances) {
            let (Some(pid), Some(cpu)) = (i.pid, i.cpu_seconds) else { continue };
            if let Some((before, at)) = self.cpu_prev.get(&pid) {
                let dt = now.saturating_duration_since(*at).as_secs_f64();
                if dt > 0.0 {
                    self.cpu_now.insert(pid, (100.0 * (cpu - before) / dt).max(0.0));
                }
            }
            cpu_prev.insert(pid, (cpu, now));
        }
        self.cpu_prev = cpu_prev;
        self.report = Some(report);
        self.report_time = time;
        self.status_link = Link::Up;
        self.keep_selection();
    }

    /// An event from the stream: into the ring and, when newer than the
    /// report, onto it, so a state change shows before the next report.
    pub fn add_event(&mut self, ev: LiveEvent) {
        match &ev.what {
            What::Unhealthy { worker, instance, reason } => {
                self.unhealthy.insert((worker.clone(), *instance), reason.clone());
            }
            What::Started { worker, instance, .. } | What::Ready { worker, instance } => {
                self.unhealthy.remove(&(worker.clone(), *instance));
            }
            _ => {}
        }
        if ev.time > self.report_time {
            self.patch(&ev.what, &ev.time);
        }
        if self.events.len() >= EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(ev);
    }

    /// What an event says about an instance's state, until the next report.
    fn patch(&mut self, what: &What, time: &str) {
        let (worker, index, state, pid) = match what {
            What::Started { worker, instance, pid } => (worker, *instance, "starting", Some(Some(*pid))),
            What::Ready { worker, instance } => (worker, *instance, "running", None),
            What::Exited { worker, instance, .. } => (worker, *instance, "exited", Some(None)),
            What::Backoff { worker, instance, .. } => (worker, *instance, "backoff", Some(None)),
            What::Parked { worker, instance, .. } => (worker, *instance, "parked", Some(None)),
            What::Stopped { worker, instance } => (worker, *instance, "stopped", Some(None)),
            _ => return,
        };
        let Some(i) = self.instance_mut(worker, index) else { return };
        i.state = state.into();
        if let Some(pid) = pid {
            i.pid = pid;
            // What the report said of the process before no longer holds.
            i.cpu_seconds = None;
            i.rss_bytes = None;
            if pid.is_some() {
                i.next_start_at = None;
                i.error = None;
                i.started_at = Some(time.into());
            }
        }
    }

    fn instance_mut(&mut self, worker: &str, index: u32) -> Option<&mut InstanceStatus> {
        let w = self.report.as_mut()?.workers.iter_mut().find(|w| w.name == worker)?;
        w.instances.iter_mut().find(|i| i.index == index && !i.surge)
    }

    /// A new subscription replays the recent events: start the ring afresh.
    pub fn events_connected(&mut self) {
        self.events.clear();
        self.events_link = Link::Up;
    }

    pub fn workers(&self) -> impl Iterator<Item = &WorkerStatus> {
        let f = self.filter.as_str();
        self.report.iter().flat_map(|r| &r.workers).filter(move |w| w.name.contains(f))
    }

    pub fn jobs(&self) -> impl Iterator<Item = &JobStatus> {
        let f = self.filter.as_str();
        self.report.iter().flat_map(|r| &r.jobs).filter(move |j| j.name.contains(f))
    }

    /// Every selectable row shown, in order: instances, then jobs.
    pub fn rows(&self) -> Vec<Key> {
        let mut rows = Vec::new();
        for w in self.workers() {
            if w.instances.is_empty() {
                rows.push(Key::Worker(w.name.clone()));
            }
            for i in &w.instances {
                rows.push(Key::Instance { worker: w.name.clone(), index: i.index });
            }
        }
        rows.extend(self.jobs().map(|j| Key::Job(j.name.clone())));
        rows.dedup();
        rows
    }

    /// Moves the selection by `by` rows, staying within the rows shown.
    pub fn select_by(&mut self, by: isize) {
        let rows = self.rows();
        if rows.is_empty() {
            self.selected = None;
            return;
        }
        let at = self.selected.as_ref().and_then(|k| rows.iter().position(|r| r == k));
        let next = match at {
            None => 0,
            Some(at) => at.saturating_add_signed(by).min(rows.len() - 1),
        };
        self.selected = rows.into_iter().nth(next);
    }

    pub fn select_end(&mut self, last: bool) {
        let rows = self.rows();
        self.selected = if last { rows.last().cloned() } else { rows.first().cloned() };
    }

    /// After a report or a filter change: the same row if it is still
    /// shown, else the same worker's first row, else the first row.
    pub fn keep_selection(&mut self) {
        let rows = self.rows();
        let keep = match &self.selected {
            Some(k) if rows.contains(k) => return,
            Some(k) => k.worker().and_then(|w| rows.iter().find(|r| r.worker() == Some(w)).cloned()),
            None => None,
        };
        self.selected = keep.or_else(|| rows.first().cloned());
    }

    pub fn say(&mut self, text: String, error: bool, now: Instant) {
        self.footer = Footer::Message { text, error, until: now.checked_add(MESSAGE_FOR).unwrap_or(now) };
    }

    /// Lets a message go once it has been read.
    pub fn expire(&mut self, now: Instant) {
        if let Footer::Message { until, .. } = &self.footer
            && now >= *until
        {
            self.footer = Footer::Keys;
        }
    }

    /// Why the view may be out of date, if it is.
    pub fn trouble(&self) -> Option<&str> {
        match (&self.status_link, &self.events_link) {
            (Link::Down(why), _) => Some(why),
            (_, Link::Down(why)) => Some(why),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::protocol::WorkerStatus;

    fn instance(index: u32, pid: i32, cpu: f64) -> InstanceStatus {
        InstanceStatus {
            index,
            pid: Some(pid),
            pgid: Some(pid),
            state: "running".into(),
            cpu_seconds: Some(cpu),
            rss_bytes: Some(1),
            ..InstanceStatus::default()
        }
    }

    fn report(workers: &[(&str, Vec<InstanceStatus>)]) -> StatusReport {
        StatusReport {
            workers: workers
                .iter()
                .map(|(n, i)| WorkerStatus {
                    name: (*n).into(),
                    capacity: i.len() as u32,
                    state: "running".into(),
                    rollout: None,
                    sockets: vec![],
                    instances: i.clone(),
                })
                .collect(),
            ..StatusReport::default()
        }
    }

    fn ev(time: &str, what: What) -> LiveEvent {
        LiveEvent { time: time.into(), what }
    }

    #[test]
    fn cpu_is_the_load_between_two_reports() {
        let mut m = Model::default();
        let t0 = Instant::now();
        m.set_report(report(&[("web", vec![instance(0, 10, 1.0)])]), t0, "a".into());
        assert!(m.cpu_now.is_empty(), "no figure from one report");
        let t1 = t0 + Duration::from_secs(2);
        m.set_report(report(&[("web", vec![instance(0, 10, 2.0)])]), t1, "b".into());
        assert_eq!(m.cpu_now.get(&10).copied(), Some(50.0));
    }

    #[test]
    fn newer_events_patch_the_report_older_ones_do_not() {
        let mut m = Model::default();
        m.set_report(
            report(&[("web", vec![instance(0, 10, 0.0)])]),
            Instant::now(),
            "2026-01-01T00:00:01.000Z".into(),
        );
        let exited =
            What::Exited { worker: "web".into(), instance: 0, code: Some(1), signal: None, uptime_ms: 5 };
        m.add_event(ev("2026-01-01T00:00:00.500Z", exited.clone()));
        assert_eq!(m.report.as_ref().unwrap().workers[0].instances[0].state, "running");
        m.add_event(ev("2026-01-01T00:00:02.000Z", exited));
        let i = &m.report.as_ref().unwrap().workers[0].instances[0];
        assert_eq!((i.state.as_ref(), i.pid), ("exited", None));
        m.add_event(ev(
            "2026-01-01T00:00:03.000Z",
            What::Started { worker: "web".into(), instance: 0, pid: 11 },
        ));
        let i = &m.report.as_ref().unwrap().workers[0].instances[0];
        assert_eq!((i.pid, i.started_at.as_deref()), (Some(11), Some("2026-01-01T00:00:03.000Z")));
        assert_eq!(m.events.len(), 3);
    }

    #[test]
    fn the_event_ring_is_bounded_and_restarts_on_reconnect() {
        let mut m = Model::default();
        for i in 0..(EVENTS + 50) {
            m.add_event(ev("t", What::ReloadFailed { error: i.to_string() }));
        }
        assert_eq!(m.events.len(), EVENTS);
        assert_eq!(m.events[0].what, What::ReloadFailed { error: "50".into() });
        m.events_connected();
        assert!(m.events.is_empty());
    }

    #[test]
    fn the_selection_follows_its_row_and_the_filter() {
        let mut m = Model::default();
        let r = report(&[
            ("api", vec![instance(0, 1, 0.0), instance(1, 2, 0.0)]),
            ("web", vec![instance(0, 3, 0.0)]),
        ]);
        m.set_report(r, Instant::now(), "a".into());
        assert_eq!(m.selected, Some(Key::Instance { worker: "api".into(), index: 0 }));
        m.select_by(5);
        assert_eq!(m.selected, Some(Key::Instance { worker: "web".into(), index: 0 }));
        m.select_by(-1);
        assert_eq!(m.selected, Some(Key::Instance { worker: "api".into(), index: 1 }));
        m.filter = "we".into();
        m.keep_selection();
        assert_eq!(m.selected, Some(Key::Instance { worker: "web".into(), index: 0 }));
        // Scaled down: the selection moves to the worker's first row.
        m.filter.clear();
        m.select_by(-1);
        assert_eq!(m.selected, Some(Key::Instance { worker: "api".into(), index: 1 }));
        let r = report(&[("api", vec![instance(0, 1, 0.0)]), ("web", vec![instance(0, 3, 0.0)])]);
        m.set_report(r, Instant::now(), "b".into());
        assert_eq!(m.selected, Some(Key::Instance { worker: "api".into(), index: 0 }));
        m.filter = "nothing".into();
        m.keep_selection();
        assert_eq!(m.selected, None);
    }

    #[test]
    fn the_log_pane_keeps_the_last_lines() {
        let mut p = LogPane { worker: "w".into(), lines: VecDeque::new() };
        for i in 0..(LOG_LINES + 3) {
            p.push(i.to_string());
        }
        assert_eq!(p.lines.len(), LOG_LINES);
        assert_eq!(p.lines[0], "3");
    }
}
