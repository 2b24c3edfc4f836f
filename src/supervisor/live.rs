//! What `drover events` and `drover top` see: the actor records each state
//! change here as it makes it; subscribers take them from a bounded
//! broadcast channel. Sending never waits: a subscriber that falls
//! [`BACKLOG`] events behind loses its place and is dropped (told so in a
//! last `lagged` line), so no reader can slow the supervisor.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use super::clock::rfc3339;

/// Events a subscriber may fall behind by before it is dropped.
pub const BACKLOG: usize = 1024;

/// Recent events kept for `drover events` without `-f`, and as the start
/// of a followed stream.
pub const RECENT: usize = 256;

/// Followers at once; one more is refused with an error.
pub const MAX_SUBSCRIBERS: usize = 32;

/// One state change, as `drover events --json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LiveEvent {
    /// RFC 3339, milliseconds, UTC.
    pub time: String,
    #[serde(flatten)]
    pub what: What,
}

/// What happened, by `kind`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum What {
    Started {
        worker: String,
        instance: u32,
        pid: i32,
    },
    Ready {
        worker: String,
        instance: u32,
    },
    /// A probe gave up on it: a health probe failed, or it was not ready in time.
    Unhealthy {
        worker: String,
        instance: u32,
        reason: String,
    },
    Exited {
        worker: String,
        instance: u32,
        code: Option<i32>,
        signal: Option<std::borrow::Cow<'static, str>>,
        uptime_ms: u64,
    },
    Backoff {
        worker: String,
        instance: u32,
        delay_ms: u64,
    },
    Parked {
        worker: String,
        instance: u32,
        reason: String,
    },
    Stopped {
        worker: String,
        instance: u32,
    },
    ReloadApplied {
        generation: u64,
        /// "start web", "restart api", "update db", "stop old".
        changes: Vec<String>,
    },
    ReloadFailed {
        error: String,
    },
    RunQueued {
        job: String,
        run: i64,
    },
    RunStarted {
        job: Option<String>,
        run: i64,
    },
    RunStep {
        job: Option<String>,
        run: i64,
        step: String,
        pid: i32,
    },
    RunEnded {
        job: Option<String>,
        run: i64,
        state: String,
    },
    RunSkipped {
        job: String,
        reason: String,
    },
    /// The last line to a subscriber that fell behind: `missed` events
    /// were lost and the stream ends.
    Lagged {
        missed: u64,
    },
    /// The last line to every follower when the supervisor stops: a stream
    /// that ends without it was cut (drover killed, or the reader dropped
    /// for not reading).
    End {
        reason: String,
    },
}

impl What {
    /// The worker or job it is about, if any.
    pub fn name(&self) -> Option<&str> {
        match self {
            What::Started { worker, .. }
            | What::Ready { worker, .. }
            | What::Unhealthy { worker, .. }
            | What::Exited { worker, .. }
            | What::Backoff { worker, .. }
            | What::Parked { worker, .. }
            | What::Stopped { worker, .. } => Some(worker),
            What::RunQueued { job, .. } | What::RunSkipped { job, .. } => Some(job),
            What::RunStarted { job, .. } | What::RunStep { job, .. } | What::RunEnded { job, .. } => {
                job.as_deref()
            }
            What::ReloadApplied { .. }
            | What::ReloadFailed { .. }
            | What::Lagged { .. }
            | What::End { .. } => None,
        }
    }

    /// Whether a subscriber naming `names` (none: all) gets it. Reloads
    /// concern every name; `lagged` always goes out.
    pub fn concerns(&self, names: &[String]) -> bool {
        names.is_empty() || self.name().is_none_or(|n| names.iter().any(|x| x == n))
    }
}

impl std::fmt::Display for LiveEvent {
    /// The line `drover events` prints for people.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let job_run = |job: &Option<String>, run: &i64| match job {
            Some(j) => format!("{j} run {run}"),
            None => format!("run {run}"),
        };
        let (who, what) = match &self.what {
            What::Started { worker, instance, pid } => {
                (format!("{worker}:{instance}"), format!("started (pid {pid})"))
            }
            What::Ready { worker, instance } => (format!("{worker}:{instance}"), "ready".into()),
            What::Unhealthy { worker, instance, reason } => {
                (format!("{worker}:{instance}"), format!("unhealthy: {reason}"))
            }
            What::Exited { worker, instance, code, signal, uptime_ms } => {
                let how = match (code, signal) {
                    (_, Some(s)) => format!("by {s}"),
                    (Some(c), None) => format!("with code {c}"),
                    (None, None) => String::new(),
                };
                let up = humantime::format_duration(Duration::from_millis(*uptime_ms));
                (format!("{worker}:{instance}"), format!("exited {how} after {up}"))
            }
            What::Backoff { worker, instance, delay_ms } => (
                format!("{worker}:{instance}"),
                format!(
                    "backoff: restart in {}",
                    humantime::format_duration(Duration::from_millis(*delay_ms))
                ),
            ),
            What::Parked { worker, instance, reason } => {
                (format!("{worker}:{instance}"), format!("parked: {reason}"))
            }
            What::Stopped { worker, instance } => (format!("{worker}:{instance}"), "stopped".into()),
            What::ReloadApplied { generation, changes } => (
                "reload".into(),
                match changes.is_empty() {
                    true => format!("applied generation {generation}"),
                    false => format!("applied generation {generation}: {}", changes.join(", ")),
                },
            ),
            What::ReloadFailed { error } => ("reload".into(), format!("failed: {error}")),
            What::RunQueued { job, run } => (format!("{job} run {run}"), "queued".into()),
            What::RunStarted { job, run } => (job_run(job, run), "started".into()),
            What::RunStep { job, run, step, pid } => (job_run(job, run), format!("step {step} (pid {pid})")),
            What::RunEnded { job, run, state } => (job_run(job, run), format!("ended: {state}")),
            What::RunSkipped { job, reason } => (job.clone(), format!("skipped: {reason}")),
            What::Lagged { missed } => {
                ("events".into(), format!("lagged: {missed} events missed; the stream ends here"))
            }
            What::End { reason } => ("events".into(), format!("end: {reason}")),
        };
        write!(f, "{}  {who}  {what}", self.time)
    }
}

/// What a subscriber is handed: the recent events, and for a follower
/// the receiver of those to come (taken at the same moment, so nothing
/// is missed or seen twice).
#[derive(Debug)]
pub struct Subscription {
    pub recent: Vec<Arc<LiveEvent>>,
    pub rx: Option<broadcast::Receiver<Arc<LiveEvent>>>,
    /// Only events about these workers or jobs (none: all).
    pub names: Vec<String>,
    /// Held while the subscription is served: the supervisor's exit waits
    /// (briefly) until every follower has its last line.
    pub serving: mpsc::Sender<()>,
}

/// The actor's side: the channel and the ring of recent events.
pub struct Live {
    tx: broadcast::Sender<Arc<LiveEvent>>,
    recent: VecDeque<Arc<LiveEvent>>,
    serving: mpsc::Sender<()>,
    served: Option<mpsc::Receiver<()>>,
}

impl Default for Live {
    fn default() -> Self {
        Live::new()
    }
}

impl Live {
    pub fn new() -> Self {
        let (serving, served) = mpsc::channel(1);
        Live {
            tx: broadcast::Sender::new(BACKLOG),
            recent: VecDeque::with_capacity(RECENT),
            serving,
            served: Some(served),
        }
    }

    /// Records an event now and hands it to every follower, without waiting.
    pub fn emit(&mut self, what: What) {
        let ev = Arc::new(LiveEvent { time: rfc3339(SystemTime::now()), what });
        if self.recent.len() >= RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(ev.clone());
        // No follower: nothing to do.
        let _ = self.tx.send(ev);
    }

    /// The recent events about `names`, and a receiver when `follow`.
    pub fn subscribe(&self, names: Vec<String>, follow: bool) -> Result<Subscription, String> {
        if follow && self.tx.receiver_count() >= MAX_SUBSCRIBERS {
            return Err(format!(
                "{MAX_SUBSCRIBERS} event subscribers are connected already (the limit); close one and try again"
            ));
        }
        let recent = self.recent.iter().filter(|e| e.what.concerns(&names)).cloned().collect();
        Ok(Subscription {
            recent,
            rx: follow.then(|| self.tx.subscribe()),
            names,
            serving: self.serving.clone(),
        })
    }

    /// The end of the stream: every follower gets a last `end` line, and
    /// the future returned resolves once each has been written (or its
    /// reader has gone): the supervisor awaits it, within a bound, before
    /// it exits.
    pub fn end(mut self, reason: &str) -> impl std::future::Future<Output = ()> {
        self.emit(What::End { reason: reason.to_string() });
        let served = self.served.take();
        drop(self);
        async move {
            if let Some(mut rx) = served {
                // None once every `serving` sender is gone.
                let _ = rx.recv().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stopped(i: u32) -> What {
        What::Stopped { worker: "web".into(), instance: i }
    }

    #[test]
    fn the_ring_keeps_the_latest_and_followers_start_after_it() {
        let mut live = Live::new();
        for i in 0..(RECENT as u32 + 10) {
            live.emit(stopped(i));
        }
        let mut sub = live.subscribe(vec![], true).unwrap();
        assert_eq!(sub.recent.len(), RECENT);
        assert_eq!(sub.recent[0].what, stopped(10));
        live.emit(stopped(999));
        let next = sub.rx.as_mut().unwrap().try_recv().unwrap();
        assert_eq!(next.what, stopped(999));
    }

    #[test]
    fn followers_are_capped_and_a_lagging_one_is_told() {
        let live = Live::new();
        let subs: Vec<_> = (0..MAX_SUBSCRIBERS).map(|_| live.subscribe(vec![], true).unwrap()).collect();
        let err = live.subscribe(vec![], true).unwrap_err();
        assert!(err.contains("limit"), "{err}");
        // Without -f there is no receiver, so no cap.
        assert!(live.subscribe(vec![], false).is_ok());
        drop(subs);
        let mut live = live;
        let mut sub = live.subscribe(vec![], true).unwrap();
        for i in 0..(BACKLOG as u32 + 5) {
            live.emit(stopped(i));
        }
        match sub.rx.as_mut().unwrap().try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => assert_eq!(n, 5),
            other => panic!("expected a lag, got {other:?}"),
        }
    }

    #[test]
    fn names_filter_and_json_is_one_flat_object() {
        let ev = LiveEvent {
            time: "2026-12-04T00:00:00.000Z".into(),
            what: What::Exited {
                worker: "web".into(),
                instance: 1,
                code: Some(3),
                signal: None,
                uptime_ms: 1500,
            },
        };
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["kind"], "exited");
        assert_eq!(json["worker"], "web");
        assert_eq!(serde_json::from_value::<LiveEvent>(json).unwrap(), ev);
        assert_eq!(ev.to_string(), "2026-12-04T00:00:00.000Z  web:1  exited with code 3 after 1s 500ms");
        assert!(ev.what.concerns(&["web".into()]));
        assert!(!ev.what.concerns(&["api".into()]));
        assert!(What::ReloadFailed { error: "x".into() }.concerns(&["api".into()]));
    }
}
