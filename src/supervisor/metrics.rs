//! `[supervisor] metrics`: Prometheus text at `GET /metrics`, on a
//! loopback TCP port or a unix socket. Nothing is polled: each scrape asks
//! the actor for one snapshot (the status report it shares with `status`,
//! plus the counters it keeps), reads the instances' CPU and memory from
//! /proc on a blocking thread, and encodes the lot with prometheus-client.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode, header};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::encoding::{prometheus_text, text as openmetrics_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::events::Event;
use super::protocol::StatusReport;
use crate::config::sockets::Address;
use crate::ledger::RunState;

/// Scrape connections served at once; one more is closed unanswered.
/// Prometheus scrapes one target with one connection at a time.
pub const MAX_CONNECTIONS: usize = 4;

/// A connection must send its request headers within this long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection is closed this long after it was accepted, answered or not.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);

/// The read buffer of a connection, which bounds its request headers
/// (hyper's smallest).
const MAX_HEADERS: usize = 8192;

/// The `Content-Type` of OpenMetrics text, sent to a scraper that accepts it.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The terminal states a run is counted in.
const ENDS: [RunState; 3] = [RunState::Succeeded, RunState::Failed, RunState::Cancelled];

/// What the actor counts for the metrics, from its own start: runs that
/// ended, by job and state (the ledger prunes runs, so its rows cannot be
/// counted), and reloads by outcome.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub runs: BTreeMap<String, [u64; 3]>,
    pub reloads_applied: u64,
    pub reloads_failed: u64,
}

impl Counters {
    pub fn run_ended(&mut self, job: &str, state: RunState) {
        if let Some(i) = ENDS.iter().position(|s| *s == state) {
            let counts = match self.runs.get_mut(job) {
                Some(c) => c,
                None => self.runs.entry(job.to_string()).or_default(),
            };
            counts[i] = counts[i].saturating_add(1);
        }
    }

    /// Forgets the jobs no longer configured, so that renaming jobs again
    /// and again cannot grow the map.
    pub fn retain_jobs(&mut self, configured: impl Fn(&str) -> bool) {
        self.runs.retain(|job, _| configured(job));
    }
}

/// One scrape's worth of state, from the actor.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub report: Arc<StatusReport>,
    pub counters: Counters,
}

/// Where the metrics are served.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Binds `addr`; the error names the key and the address. A unix socket
/// file left by a supervisor that is gone is replaced (made 0600 before it
/// listens); one that still answers, or a file that is not a socket, is an
/// error. A few syscalls, none that waits: a reload binds on the actor's
/// loop.
pub fn bind(addr: &Address) -> Result<Listener, String> {
    let fail = |e: &dyn std::fmt::Display| format!("cannot serve [supervisor] metrics on {addr}: {e}");
    if let Address::Unix(path) = addr
        && listens(path)
    {
        return Err(fail(&"another process listens on it"));
    }
    let fd = crate::os::listen::bind(addr, Some(0o600)).map_err(|e| fail(&e))?;
    let listener = match addr {
        Address::Tcp(_) => {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(l)).map(Listener::Tcp)
        }
        Address::Unix(_) => {
            let l = std::os::unix::net::UnixListener::from(fd);
            l.set_nonblocking(true).and_then(|()| tokio::net::UnixListener::from_std(l)).map(Listener::Unix)
        }
    };
    listener.map_err(|e| fail(&e))
}

/// Whether a process accepts connections on the unix socket at `path`:
/// a non-blocking connect, so a listener with a full backlog (EAGAIN)
/// counts without being waited for.
fn listens(path: &std::path::Path) -> bool {
    use socket2::{Domain, SockAddr, Socket, Type};
    let Ok(s) = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None) else { return false };
    let Ok(to) = SockAddr::unix(path) else { return false };
    match s.connect(&to) {
        Ok(()) => true,
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    }
}

/// The metrics server running: its address and its accept loop.
pub struct Server {
    pub addr: Address,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves `listener` (bound to `addr`) until [`Server::close`].
    pub fn spawn(addr: Address, listener: Listener, tx: mpsc::UnboundedSender<Event>) -> Server {
        Server { addr, task: tokio::spawn(serve(listener, tx)) }
    }

    /// Stops accepting (scrapes under way are answered) and removes the
    /// unix socket's file.
    pub fn close(self) {
        self.task.abort();
        crate::os::listen::unlink(&self.addr);
    }
}

/// Accepts scrapes until the actor goes away.
async fn serve(listener: Listener, tx: mpsc::UnboundedSender<Event>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut failing = false;
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
        };
        let Some(conn) = super::control::accepted(accepted, &mut failing, "metrics").await else { continue };
        if tx.is_closed() {
            return;
        }
        // Over the cap the connection is dropped: a scraper retries at its
        // next interval, and nothing waits on a client.
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let tx = tx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match conn {
                Conn::Tcp(s) => serve_connection(s, tx).await,
                Conn::Unix(s) => serve_connection(s, tx).await,
            }
        });
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// One request per connection (no keep-alive: a scrape every few seconds
/// gains nothing from it, and an idle connection would hold a slot).
async fn serve_connection<S>(stream: S, tx: mpsc::UnboundedSender<Event>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let tx = tx.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(req, &tx).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(false)
        .max_buf_size(MAX_HEADERS)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    // A malformed request is hyper's error on this connection alone.
    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
}

/// The response to one request: the metrics, 404 or 405.
async fn answer<B>(req: Request<B>, tx: &mpsc::UnboundedSender<Event>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found: the metrics are at /metrics\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: use GET\n");
        r.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let openmetrics = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("application/openmetrics-text")));
    let (otx, orx) = oneshot::channel();
    let snapshot = match tx.send(Event::Metrics(otx)) {
        Ok(()) => orx.await.ok(),
        Err(_) => None,
    };
    let Some(snapshot) = snapshot else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "the supervisor is shutting down\n");
    };
    // /proc reads are blocking file reads: never on the event loop.
    let encoded = tokio::task::spawn_blocking(move || {
        let mut report = (*snapshot.report).clone();
        report.add_usage();
        encode(&report, &snapshot.counters, openmetrics)
    })
    .await;
    match encoded {
        Ok(Ok(text)) => {
            let kind = if openmetrics { OPENMETRICS } else { prometheus_text::CONTENT_TYPE };
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
            r
        }
        _ => plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics\n"),
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

type Labels = Vec<(&'static str, String)>;

/// A sample's value, as its family's type encodes it.
#[derive(Clone, Copy, Debug)]
enum Value {
    Count(u64),
    Seconds(f64),
    Level(i64),
}

/// One metric family, its samples in the order they are written.
#[derive(Debug)]
struct Rows {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    rows: Vec<(Labels, Value)>,
}

/// The families of one scrape, encoded in a fixed order (workers, then
/// instances, by name) so that two scrapes of the same state read alike.
#[derive(Debug)]
struct Scrape(Vec<Rows>);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let mut family = encoder.encode_descriptor(f.name, f.help, None, f.kind)?;
            for (labels, value) in &f.rows {
                let sample = family.encode_family(labels)?;
                match *value {
                    Value::Count(v) => ConstCounter::new(v).encode(sample)?,
                    Value::Seconds(v) => ConstCounter::new(v).encode(sample)?,
                    Value::Level(v) => ConstGauge::new(v).encode(sample)?,
                }
            }
        }
        Ok(())
    }
}

/// What one (worker, instance) slot shows: a surge instance and the one it
/// replaces share their index, and a series must be unique.
#[derive(Default)]
struct Slot {
    up: bool,
    ready: bool,
    restarts: u64,
    cpu_seconds: Option<f64>,
    memory_bytes: Option<u64>,
}

/// The families, in the order they are written (counters without their
/// `_total`, which the encoder adds).
const FAMILIES: [(&str, MetricType, &str); 9] = [
    ("drover_instance_up", MetricType::Gauge, "Whether a process of the instance runs (1) or not (0)"),
    (
        "drover_instance_ready",
        MetricType::Gauge,
        "Whether the instance is ready: running, its ready probe passed (1) or not (0)",
    ),
    ("drover_instance_restarts", MetricType::Counter, "Restarts of the instance after its process exited"),
    (
        "drover_instance_cpu_seconds",
        MetricType::Counter,
        "CPU time used by the instance's processes, in seconds (from 0 again after a restart)",
    ),
    (
        "drover_instance_memory_bytes",
        MetricType::Gauge,
        "Memory of the instance's processes, in bytes: their cgroup's memory.current, else their resident memory",
    ),
    (
        "drover_job_runs",
        MetricType::Counter,
        "Runs of the job that ended, by their end state, since the supervisor started",
    ),
    ("drover_job_skips", MetricType::Counter, "Ticks and triggers skipped because the job was at capacity"),
    ("drover_reloads", MetricType::Counter, "Config reloads since the supervisor started, by result"),
    ("drover_config_generation", MetricType::Gauge, "The generation of the config in force"),
];

/// The metrics of `report` (usage filled in) and `counters`, as
/// Prometheus text 0.0.4 or, with `openmetrics`, OpenMetrics text.
pub fn encode(
    report: &StatusReport,
    counters: &Counters,
    openmetrics: bool,
) -> Result<String, std::fmt::Error> {
    let mut slots: BTreeMap<(&str, u32), Slot> = BTreeMap::new();
    for w in &report.workers {
        for i in &w.instances {
            let s = slots.entry((w.name.as_str(), i.index)).or_default();
            s.up |= i.pid.is_some();
            s.ready |= i.state == "running";
            s.restarts = s.restarts.max(u64::from(i.restarts));
            if let Some(c) = i.cpu_seconds {
                s.cpu_seconds = Some(s.cpu_seconds.unwrap_or(0.0) + c);
            }
            if let Some(m) = i.rss_bytes {
                s.memory_bytes = Some(s.memory_bytes.unwrap_or(0).saturating_add(m));
            }
        }
    }

    let mut rows: [Vec<(Labels, Value)>; FAMILIES.len()] = Default::default();
    let [up, ready, restarts, cpu, memory, runs, skips, reloads, generation] = &mut rows;
    for ((worker, index), s) in &slots {
        let labels = vec![("worker", worker.to_string()), ("instance", index.to_string())];
        up.push((labels.clone(), Value::Level(i64::from(s.up))));
        ready.push((labels.clone(), Value::Level(i64::from(s.ready))));
        restarts.push((labels.clone(), Value::Count(s.restarts)));
        if let Some(c) = s.cpu_seconds {
            cpu.push((labels.clone(), Value::Seconds(c)));
        }
        if let Some(m) = s.memory_bytes {
            memory.push((labels, Value::Level(i64::try_from(m).unwrap_or(i64::MAX))));
        }
    }
    let none = [0; 3];
    for job in &report.jobs {
        let counts = counters.runs.get(&job.name).unwrap_or(&none);
        for (state, n) in ENDS.iter().zip(counts) {
            let labels = vec![("job", job.name.clone()), ("state", state.as_str().to_string())];
            runs.push((labels, Value::Count(*n)));
        }
        skips.push((vec![("job", job.name.clone())], Value::Count(job.skips)));
    }
    reloads.push((vec![("result", "applied".into())], Value::Count(counters.reloads_applied)));
    reloads.push((vec![("result", "failed".into())], Value::Count(counters.reloads_failed)));
    let g = i64::try_from(report.supervisor.generation).unwrap_or(i64::MAX);
    generation.push((Vec::new(), Value::Level(g)));

    let families =
        FAMILIES.iter().zip(rows).map(|(&(name, kind, help), rows)| Rows { name, help, kind, rows });
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(families.collect())));
    let mut out = String::new();
    if openmetrics {
        openmetrics_text::encode(&mut out, &registry)?;
    } else {
        prometheus_text::encode(&mut out, &registry)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> StatusReport {
        serde_json::from_value(serde_json::json!({
            "supervisor": { "state": "running", "generation": 3, "pid": null, "config": null,
                            "started_at": null, "last_reload": null },
            "workers": [
                { "name": "web", "capacity": 2, "state": "running", "instances": [
                    { "index": 0, "pid": 10, "pgid": 10, "state": "running", "restarts": 2,
                      "cpu_seconds": 1.5, "rss_bytes": 1000 },
                    // A surge replacement of instance 0: one series for both.
                    { "index": 0, "surge": true, "pid": 11, "pgid": 11, "state": "starting", "restarts": 0,
                      "cpu_seconds": 0.25, "rss_bytes": 500 },
                    { "index": 1, "pid": null, "pgid": null, "state": "backoff", "restarts": 7 }
                ]}
            ],
            "jobs": [
                { "name": "backup", "kind": "job", "trigger": "every 1m", "next_tick": null, "active": [],
                  "queued": 0, "skips": 4, "last_run": null }
            ]
        }))
        .unwrap()
    }

    /// The samples of `text`, as "name{labels} value" lines.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn every_family_is_written_once_with_unique_series() {
        let mut counters = Counters::default();
        counters.run_ended("backup", RunState::Succeeded);
        counters.run_ended("backup", RunState::Succeeded);
        counters.run_ended("backup", RunState::Failed);
        counters.run_ended("backup", RunState::Running);
        counters.reloads_applied = 2;
        counters.reloads_failed = 1;
        let text = encode(&report(), &counters, false).unwrap();
        let got = samples(&text);
        let want = [
            r#"drover_instance_up{worker="web",instance="0"} 1"#,
            r#"drover_instance_up{worker="web",instance="1"} 0"#,
            r#"drover_instance_ready{worker="web",instance="0"} 1"#,
            r#"drover_instance_ready{worker="web",instance="1"} 0"#,
            r#"drover_instance_restarts_total{worker="web",instance="0"} 2"#,
            r#"drover_instance_restarts_total{worker="web",instance="1"} 7"#,
            r#"drover_instance_cpu_seconds_total{worker="web",instance="0"} 1.75"#,
            r#"drover_instance_memory_bytes{worker="web",instance="0"} 1500"#,
            r#"drover_job_runs_total{job="backup",state="succeeded"} 2"#,
            r#"drover_job_runs_total{job="backup",state="failed"} 1"#,
            r#"drover_job_runs_total{job="backup",state="cancelled"} 0"#,
            r#"drover_job_skips_total{job="backup"} 4"#,
            r#"drover_reloads_total{result="applied"} 2"#,
            r#"drover_reloads_total{result="failed"} 1"#,
            "drover_config_generation 3",
        ];
        assert_eq!(got, want, "{text}");
        for (name, kind, _) in FAMILIES {
            let shown = if kind == MetricType::Counter { format!("{name}_total") } else { name.to_string() };
            let kind = if kind == MetricType::Counter { "counter" } else { "gauge" };
            assert_eq!(text.matches(&format!("# TYPE {shown} {kind}\n")).count(), 1, "{name}: {text}");
        }
    }

    #[test]
    fn openmetrics_names_counters_without_total_and_ends_with_eof() {
        let text = encode(&report(), &Counters::default(), true).unwrap();
        assert!(text.contains("# TYPE drover_job_runs counter\n"), "{text}");
        assert!(text.contains("drover_job_runs_total{job=\"backup\",state=\"failed\"} 0\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[tokio::test]
    async fn a_unix_socket_that_answers_or_a_file_in_the_way_is_refused_and_a_stale_one_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let addr = Address::Unix(path.clone());
        let held = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(bind(&addr).err().unwrap().contains("another process listens on it"));
        drop(held);
        let bound = bind(&addr).map_err(|e| panic!("a stale socket is replaced: {e}")).ok();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        drop(bound);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "not a socket").unwrap();
        let err = bind(&addr).err().unwrap();
        assert!(
            err.starts_with(&format!("cannot serve [supervisor] metrics on unix://{}: ", path.display()))
        );
        assert!(err.contains("not a socket"), "{err}");
    }

    #[test]
    fn counters_forget_removed_jobs() {
        let mut c = Counters::default();
        c.run_ended("a", RunState::Cancelled);
        c.run_ended("b", RunState::Failed);
        c.retain_jobs(|j| j == "b");
        assert_eq!(c.runs.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(c.runs["b"], [0, 1, 0]);
    }
}
