//! One check of a polled probe: `exec`, `http` or `tcp`. Each returns
//! `Err(why)` with a short reason for status ("http 503 from URL",
//! "connection refused (127.0.0.1:8000)", "timed out after 1s", "exit 1").
//! Nothing here blocks the event loop: names are resolved by tokio's
//! resolver (a blocking-pool thread), exec probes spawn there too.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use tokio::net::TcpStream;

use crate::os::identity::Identity;
use crate::os::proc;
use crate::os::reaper::Reaper;
use crate::supervisor::child::{self, Launch, Output};

/// A polled check with its strings already expanded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// argv, run in the instance's dir and environment.
    Exec(Vec<String>),
    /// An http:// URL.
    Http(String),
    /// HOST:PORT.
    Tcp(String),
}

/// Where an exec check runs: the instance's directory and environment
/// (over drover's own, as the instance has it), and the reaper that
/// reports its exit.
#[derive(Clone)]
pub struct ExecContext {
    pub dir: PathBuf,
    pub env: BTreeMap<String, String>,
    pub reaper: Arc<Reaper>,
    /// The instance's user, group and limits: a check runs as its
    /// instance does.
    pub identity: Identity,
}

/// Runs `check` once; it fails if it has not passed within `timeout`.
pub async fn check(check: &Check, exec: &ExecContext, timeout: Duration) -> Result<(), String> {
    match check {
        Check::Exec(argv) => exec_check(argv, exec, timeout).await,
        Check::Http(url) => within(timeout, http_check(url)).await,
        Check::Tcp(target) => within(timeout, async { connect(target).await.map(drop) }).await,
    }
}

async fn within(timeout: Duration, f: impl Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::time::timeout(timeout, f).await.unwrap_or_else(|_| Err(timed_out(timeout)))
}

fn timed_out(timeout: Duration) -> String {
    format!("timed out after {}", humantime::format_duration(timeout))
}

/// An OS error as a short lowercase phrase, without "(os error N)".
fn short(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::NotFound => "not found".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => {
            let s = e.to_string();
            let s = s.split(" (os error").next().unwrap_or(&s).to_string();
            let mut c = s.chars();
            c.next().map_or(s.clone(), |f| f.to_lowercase().chain(c).collect())
        }
    }
}

/// Connects to HOST:PORT, trying each address it resolves to in turn.
async fn connect(target: &str) -> Result<TcpStream, String> {
    // An address needs no lookup (nor its list).
    if let Ok(addr) = target.parse::<SocketAddr>() {
        return TcpStream::connect(addr).await.map_err(|e| format!("{} ({addr})", short(&e)));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(target)
        .await
        .map_err(|e| format!("cannot resolve {target}: {}", short(&e)))?
        .collect();
    // The failure is written only when there is one: a passing check
    // allocates nothing of its own.
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(format!("{} ({addr})", short(&e))),
        }
    }
    Err(last.unwrap_or_else(|| format!("{target} resolves to no address")))
}

/// GET `url`: a status 200–399 passes. Redirects are not followed and the
/// body is not read; the connection is closed after the response head.
async fn http_check(url: &str) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{url}: https is not supported by http probes; probe an http:// URL or use tcp"
            ));
        }
        _ => return Err(format!("{url:?} is not an http:// URL")),
    }
    let Some(host) = uri.host() else { return Err(format!("{url:?} has no host")) };
    let port = uri.port_u16().unwrap_or(80);
    // An IPv6 literal keeps its brackets in the authority but not in host().
    let target = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let stream = connect(&target).await?;
    let (mut sender, mut conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http from {url}: {e}"))?;
    let authority = uri.authority().map_or(target.clone(), |a| a.to_string());
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, "drover-probe")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    // The connection is driven here, beside the request, rather than in a
    // task of its own: both end with this function.
    // The connection may end (the server closed it) in the same poll in
    // which it hands over the response: then the request has it.
    let mut send = std::pin::pin!(sender.send_request(req));
    let sent = tokio::select! {
        r = &mut send => r,
        c = &mut conn => match c {
            Ok(()) => send.await,
            Err(e) => return Err(format!("http from {url}: {e}")),
        },
    };
    let resp = sent.map_err(|e| format!("http from {url}: {e}"))?;
    let status = resp.status();
    if (StatusCode::OK.as_u16()..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(format!("http {} from {url}", status.as_u16()))
    }
}

/// Kills an exec check's process group when the check ends, however it
/// ends (passed, failed, timed out, or the probe dropped mid-check), so
/// nothing it started outlives it.
struct GroupGuard(i32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let _ = proc::signal_group(self.0, Signal::SIGKILL);
        crate::os::groups::remove(self.0);
    }
}

/// Runs argv in its own process group; exit 0 passes; at `timeout` the
/// group is SIGKILLed.
async fn exec_check(argv: &[String], ctx: &ExecContext, timeout: Duration) -> Result<(), String> {
    let Some(program) = argv.first() else { return Err("exec probe has an empty command".into()) };
    let launch = Launch {
        argv: argv.to_vec(),
        dir: ctx.dir.clone(),
        env: ctx.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        clear_env: false,
        remove_env: vec![],
        identity: ctx.identity.clone(),
        output: Output::Null,
        sockets: vec![],
        // A probe is short and killed by its process group at its timeout.
        cgroup: None,
    };
    let reaper = ctx.reaper.clone();
    // Off the event loop: a spawn blocks its thread until the child execs.
    // The guard is made there: if the probe is dropped meanwhile, the
    // result is dropped on its own and the group killed.
    let spawned = tokio::task::spawn_blocking(move || {
        child::start_waited(&reaper, &launch).map(|(started, rx)| (GroupGuard(started.pid), rx))
    })
    .await
    .map_err(|e| format!("cannot start {program:?}: {e}"))?;
    let (_guard, exited) = spawned.map_err(|e| e.message)?;
    match tokio::time::timeout(timeout, exited).await {
        Err(_) => Err(timed_out(timeout)),
        Ok(Err(_)) => Err(format!("{program:?} ended unseen (the reaper stopped)")),
        Ok(Ok(exit)) if exit.success() => Ok(()),
        Ok(Ok(exit)) => Err(exit.to_string()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::os::reaper::isolated;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    fn no_exec() -> ExecContext {
        ExecContext {
            dir: ".".into(),
            env: BTreeMap::new(),
            reaper: Arc::new(Reaper::default()),
            identity: Identity::default(),
        }
    }

    /// A one-thread HTTP server answering each connection with `status`,
    /// recording the request heads it saw.
    fn serve(status: &'static str, n: usize) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut heads = Vec::new();
            for _ in 0..n {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = Vec::new();
                let mut b = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let k = s.read(&mut b).unwrap();
                    if k == 0 {
                        break;
                    }
                    buf.extend_from_slice(&b[..k]);
                }
                heads.push(String::from_utf8_lossy(&buf).into_owned());
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nlocation: /elsewhere\r\ncontent-length: 1000000\r\n\r\npartial"
                );
            }
            heads
        });
        (format!("http://{addr}"), t)
    }

    #[test]
    fn http_passes_on_2xx_and_3xx_without_following_and_fails_on_others() {
        let rt = rt();
        let (base, server) = serve("200 OK", 1);
        let url = format!("{base}/health?x=1");
        rt.block_on(check(&Check::Http(url.clone()), &no_exec(), Duration::from_secs(5))).unwrap();
        let heads = server.join().unwrap();
        assert!(heads[0].starts_with("GET /health?x=1 HTTP/1.1\r\n"), "{heads:?}");
        assert!(heads[0].to_ascii_lowercase().contains(&format!("host: {}", &base[7..])), "{heads:?}");

        let (base, server) = serve("302 Found", 1);
        rt.block_on(check(&Check::Http(base), &no_exec(), Duration::from_secs(5))).unwrap();
        assert_eq!(server.join().unwrap().len(), 1, "the redirect was not followed");

        let (base, server) = serve("503 Service Unavailable", 1);
        let url = format!("{base}/health");
        let e =
            rt.block_on(check(&Check::Http(url.clone()), &no_exec(), Duration::from_secs(5))).unwrap_err();
        assert_eq!(e, format!("http 503 from {url}"));
        server.join().unwrap();
    }

    #[test]
    fn http_and_tcp_say_connection_refused_and_time_out() {
        let rt = rt();
        // A port nothing listens on: bind one, then free it.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = rt
            .block_on(check(&Check::Tcp(format!("127.0.0.1:{port}")), &no_exec(), Duration::from_secs(5)))
            .unwrap_err();
        assert_eq!(e, format!("connection refused (127.0.0.1:{port})"));
        let e = rt
            .block_on(check(
                &Check::Http(format!("http://127.0.0.1:{port}/")),
                &no_exec(),
                Duration::from_secs(5),
            ))
            .unwrap_err();
        assert!(e.starts_with("connection refused"), "{e}");

        // Accepted by the kernel but never answered: the head times out.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        let e = rt.block_on(check(&Check::Http(url), &no_exec(), Duration::from_millis(200))).unwrap_err();
        assert_eq!(e, "timed out after 200ms");
        rt.block_on(check(
            &Check::Tcp(l.local_addr().unwrap().to_string()),
            &no_exec(),
            Duration::from_secs(5),
        ))
        .unwrap();
    }

    #[test]
    fn bad_targets_are_errors_not_panics() {
        let rt = rt();
        let t = Duration::from_secs(5);
        for (c, want) in [
            (Check::Http("https://127.0.0.1/".into()), "https is not supported"),
            (Check::Http("ftp://x/".into()), "is not an http:// URL"),
            (Check::Http("not a url".into()), "is not a URL"),
            (Check::Tcp("no-port".into()), "cannot resolve no-port"),
            (Check::Exec(vec![]), "empty command"),
        ] {
            let e = rt.block_on(check(&c, &no_exec(), t)).unwrap_err();
            assert!(e.contains(want), "{c:?}: {e}");
        }
    }

    #[test]
    fn exec_passes_on_exit_0_in_the_instance_dir_and_env_and_says_the_exit_otherwise() {
        isolated(
            module_path!(),
            "exec_passes_on_exit_0_in_the_instance_dir_and_env_and_says_the_exit_otherwise",
            || {
                let dir = tempfile::tempdir().unwrap();
                let rt = reaping_runtime();
                rt.block_on(async {
                    let ctx = ExecContext {
                        dir: dir.path().to_path_buf(),
                        env: BTreeMap::from([("PROBE_X".to_string(), "yes".to_string())]),
                        reaper: Arc::new(Reaper::default()),
                        identity: Identity::default(),
                    };
                    let _reaping = reap_on_sigchld(ctx.reaper.clone());
                    let sh = |s: &str| Check::Exec(vec!["sh".into(), "-c".into(), s.into()]);
                    let want_dir = dir.path().canonicalize().unwrap();
                    let script =
                        format!("test \"$(pwd -P)\" = '{}' && test \"$PROBE_X\" = yes", want_dir.display());
                    check(&sh(&script), &ctx, Duration::from_secs(10)).await.unwrap();
                    assert_eq!(
                        check(&sh("exit 3"), &ctx, Duration::from_secs(10)).await.unwrap_err(),
                        "exit 3"
                    );
                    assert_eq!(
                        check(&sh("kill -9 $$"), &ctx, Duration::from_secs(10)).await.unwrap_err(),
                        "killed by SIGKILL"
                    );
                    let e = check(&Check::Exec(vec!["/no/such/probe".into()]), &ctx, Duration::from_secs(10))
                        .await
                        .unwrap_err();
                    assert!(e.starts_with("cannot start \"/no/such/probe\""), "{e}");
                });
            },
        );
    }

    #[test]
    fn exec_past_its_timeout_has_its_whole_group_killed() {
        isolated(module_path!(), "exec_past_its_timeout_has_its_whole_group_killed", || {
            let dir = tempfile::tempdir().unwrap();
            let pids = dir.path().join("pids");
            let rt = reaping_runtime();
            rt.block_on(async {
                let ctx = ExecContext {
                    dir: dir.path().to_path_buf(),
                    env: BTreeMap::new(),
                    reaper: Arc::new(Reaper::default()),
                    identity: Identity::default(),
                };
                // As drover is: the orphaned grandchild is reaped here, not
                // left to an init that may not reap.
                Reaper::become_subreaper().unwrap();
                let _reaping = reap_on_sigchld(ctx.reaper.clone());
                // A leader and a background grandchild, both in its group.
                let script = format!("sleep 30 & echo $$ $! > {}; wait", pids.display());
                let c = Check::Exec(vec!["sh".into(), "-c".into(), script]);
                let e = check(&c, &ctx, Duration::from_millis(300)).await.unwrap_err();
                assert_eq!(e, "timed out after 300ms");
                let text = std::fs::read_to_string(&pids).unwrap();
                let leader: i32 = text.split_whitespace().next().unwrap().parse().unwrap();
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while proc::group_alive(leader) {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the probe's group {leader} survived its timeout"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        });
    }

    /// A runtime for tests that reap: spawns block a thread of their own.
    pub(crate) fn reaping_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
    }

    /// The runtime's reaper loop, as `runtime::serve` runs it.
    pub(crate) fn reap_on_sigchld(reaper: Arc<Reaper>) -> tokio::task::JoinHandle<()> {
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).unwrap();
        tokio::spawn(async move {
            loop {
                reaper.reap();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        })
    }
}
