//! A worker's `ready` and `health` probes as a container's probes. `ready`
//! is a gate drover checks until it passes once, within `start_timeout`:
//! that is a startupProbe (`failureThreshold × periodSeconds` is the
//! deadline; past it the container is restarted, as drover counts a failed
//! start). The same check is also the readinessProbe, since Kubernetes
//! routes Service traffic by readiness for the pod's whole life. `health`
//! is the livenessProbe, which Kubernetes starts once the startupProbe
//! passed, as drover starts health checks once an instance is ready.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ExecAction, HTTPGetAction, Probe as KProbe, TCPSocketAction};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Exported, whole_seconds};
use crate::config::model::{Probe, ProbeKind, Worker};

/// The container's readinessProbe, livenessProbe and startupProbe.
#[derive(Debug, Default, PartialEq)]
pub struct Probes {
    pub readiness: Option<KProbe>,
    pub liveness: Option<KProbe>,
    pub startup: Option<KProbe>,
}

pub fn probes(name: &str, key: &str, w: &Worker, out: &mut Exported) -> Probes {
    let mut p = Probes::default();
    if let Some(ready) = &w.ready {
        match action(name, w, ready) {
            Ok(check) => {
                let period = seconds(ready.interval);
                p.readiness = Some(KProbe { period_seconds: Some(period), ..check.clone() });
                if !ready.start_timeout.is_zero() {
                    let deadline = whole_seconds(ready.start_timeout);
                    let failures = deadline.saturating_add(i64::from(period) - 1) / i64::from(period);
                    p.startup = Some(KProbe {
                        period_seconds: Some(period),
                        failure_threshold: Some(i32::try_from(failures.max(1)).unwrap_or(i32::MAX)),
                        ..check
                    });
                }
            }
            Err(why) => out.lose(format!("{key}.ready"), why),
        }
    }
    if let Some(health) = &w.health {
        match action(name, w, health) {
            Ok(check) => {
                p.liveness = Some(KProbe {
                    period_seconds: Some(seconds(health.interval)),
                    failure_threshold: Some(i32::try_from(health.failures.max(1)).unwrap_or(i32::MAX)),
                    ..check
                })
            }
            Err(why) => out.lose(format!("{key}.health"), why),
        }
    }
    p
}

/// Whole seconds, rounded up, at least 1 (the least a probe takes).
fn seconds(d: std::time::Duration) -> i32 {
    i32::try_from(whole_seconds(d).max(1)).unwrap_or(i32::MAX)
}

/// The check itself and its timeout, or why Kubernetes cannot make it.
fn action(name: &str, w: &Worker, p: &Probe) -> Result<KProbe, String> {
    let expand = |s: &str| expand(s, name, w);
    let check = match &p.kind {
        ProbeKind::Exec(argv) => KProbe {
            exec: Some(ExecAction {
                command: Some(argv.iter().map(|a| expand(a)).collect::<Result<_, _>>()?),
            }),
            ..Default::default()
        },
        ProbeKind::Http(url) => KProbe { http_get: Some(http_get(&expand(url)?)?), ..Default::default() },
        ProbeKind::Tcp(addr) => {
            let addr = expand(addr)?;
            let (host, port) = host_port(&addr).ok_or_else(|| format!("{addr:?} is not HOST:PORT"))?;
            KProbe { tcp_socket: Some(TCPSocketAction { host: pod_host(host), port }), ..Default::default() }
        }
        ProbeKind::Log(_) => {
            return Err(
                "Kubernetes has no probe on a container's output; the pod counts as ready once started"
                    .into(),
            );
        }
        ProbeKind::Notify => {
            return Err("Kubernetes has no sd_notify socket (READY=1, WATCHDOG=1) for a container".into());
        }
    };
    Ok(KProbe { timeout_seconds: Some(seconds(p.timeout)), ..check })
}

/// `${NAME}` as drover expands it at each check, here once: the worker's
/// env is the same for every pod; the instance index, drover's own
/// environment and secrets (they would be written into the manifest) are
/// not.
fn expand(s: &str, name: &str, w: &Worker) -> Result<String, String> {
    let secret: &BTreeSet<String> = &w.secret_env;
    let env: &BTreeMap<String, String> = &w.env;
    let refused = std::cell::RefCell::new(None);
    let lookup = |var: &str| -> Option<String> {
        let why = match var {
            "DROVER_WORKER" => return Some(name.to_string()),
            "DROVER_CAPACITY" => return Some(w.capacity.to_string()),
            "DROVER_INSTANCE" => "a Deployment's pods have no instance index".to_string(),
            v if secret.contains(v) => format!("{v} is secret: it would be written into the manifest"),
            v => match env.get(v) {
                Some(value) => return Some(value.clone()),
                None => {
                    format!("{v} is not in the worker's env (drover's own environment is not in the pod)")
                }
            },
        };
        refused.replace(Some(format!("{s:?} uses ${{{var}}}: {why}")));
        None
    };
    let result = crate::supervisor::probes::expand::expand(s, lookup, str::to_string);
    result.map_err(|e| refused.into_inner().unwrap_or(e))
}

/// The HOST and PORT of `HOST:PORT` (`[v6]:PORT` too).
fn host_port(addr: &str) -> Option<(&str, IntOrString)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    Some((host, IntOrString::Int(i32::from(port))))
}

/// drover probes from the instance's own machine; the kubelet probes the
/// pod's IP when no host is given, which is what a local address means.
fn pod_host(host: &str) -> Option<String> {
    let local = ["localhost", "127.0.0.1", "::1", "0.0.0.0", "::"];
    (!local.contains(&host.to_ascii_lowercase().as_str())).then(|| host.to_string())
}

fn http_get(url: &str) -> Result<HTTPGetAction, String> {
    let rest = url
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case("http://"))
        .map(|_| &url[7..])
        .ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.contains('@') {
        return Err(format!("{url:?}: an httpGet probe has no user or password"));
    }
    let (host, port) = if authority.ends_with(']') || !authority.contains(':') {
        (authority.trim_start_matches('[').trim_end_matches(']'), IntOrString::Int(80))
    } else {
        host_port(authority).ok_or_else(|| format!("{url:?}: its port is not a number from 1 to 65535"))?
    };
    // The fragment never reaches the server.
    let tail = tail.split('#').next().unwrap_or("");
    let path = if tail.starts_with('/') { tail.to_string() } else { format!("/{tail}") };
    Ok(HTTPGetAction {
        host: pod_host(host),
        path: Some(path),
        port,
        scheme: Some("HTTP".into()),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, load};

    fn worker(toml: &str) -> Worker {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.toml");
        std::fs::write(&path, format!("[workers.w]\ncommand = [\"x\"]\ncapacity = 2\n{toml}")).unwrap();
        let loaded = load(&path, &Overrides::new(Vec::<(String, String)>::new(), &[]).unwrap()).unwrap();
        loaded.config.workers["w"].clone()
    }

    fn map(toml: &str) -> (Probes, Exported) {
        let mut out = Exported::default();
        (probes("w", "workers.w", &worker(toml), &mut out), out)
    }

    #[test]
    fn probe_parameters_round_trip() {
        let (p, out) = map("env = { PORT = \"8000\" }\n\
             ready = { http = \"http://127.0.0.1:${PORT}/health?full=1\", interval = \"2s\", timeout = \"1500ms\", start_timeout = \"45s\" }\n\
             health = { tcp = \"db.internal:5432\", interval = \"10s\", timeout = \"3s\", failures = 4 }\n");
        assert!(out.lossy.is_empty(), "{:?}", out.lossy);
        let r = p.readiness.unwrap();
        let get = r.http_get.as_ref().unwrap();
        assert_eq!(get.host, None, "a local address is the pod's IP");
        assert_eq!(get.port, IntOrString::Int(8000), "${{PORT}} from the worker's env");
        assert_eq!(get.path.as_deref(), Some("/health?full=1"));
        assert_eq!((r.period_seconds, r.timeout_seconds, r.failure_threshold), (Some(2), Some(2), None));
        let s = p.startup.unwrap();
        assert_eq!(s.http_get, r.http_get);
        // Not ready within 45s, checked every 2s: 23 failed checks.
        assert_eq!((s.period_seconds, s.timeout_seconds, s.failure_threshold), (Some(2), Some(2), Some(23)));
        let l = p.liveness.unwrap();
        let tcp = l.tcp_socket.as_ref().unwrap();
        assert_eq!((tcp.host.as_deref(), &tcp.port), (Some("db.internal"), &IntOrString::Int(5432)));
        assert_eq!((l.period_seconds, l.timeout_seconds, l.failure_threshold), (Some(10), Some(3), Some(4)));

        let (p, _) = map(
            "ready = { exec = [\"./check\", \"${DROVER_WORKER}\", \"$$1\"], interval = \"250ms\" }\nhealth = { http = \"http://[::1]/\" }\n",
        );
        let r = p.readiness.unwrap();
        assert_eq!(r.exec.unwrap().command.unwrap(), ["./check", "w", "$1"]);
        assert_eq!(r.period_seconds, Some(1), "a second at least");
        let get = p.liveness.unwrap().http_get.unwrap();
        assert_eq!((get.host, get.port, get.path.as_deref()), (None, IntOrString::Int(80), Some("/")));
    }

    #[test]
    fn what_a_pod_cannot_check_is_named() {
        for (toml, key, why) in [
            ("ready = { log = \"^up$\" }\n", "workers.w.ready", "output"),
            ("ready = { notify = true }\n", "workers.w.ready", "sd_notify"),
            ("health = { notify = true }\n", "workers.w.health", "sd_notify"),
            (
                "ready = { tcp = \"127.0.0.1:${P}\" }\n",
                "workers.w.ready",
                "${P}: P is not in the worker's env",
            ),
            ("health = { tcp = \"h:${DROVER_INSTANCE}\" }\n", "workers.w.health", "no instance index"),
            (
                "env = { T = \"s3cr3t\" }\nsecret_env = [\"T\"]\nhealth = { exec = [\"c\", \"${T}\"] }\n",
                "workers.w.health",
                "T is secret",
            ),
        ] {
            let (p, out) = map(toml);
            assert_eq!(p, Probes::default(), "{toml}");
            assert_eq!(out.lossy.len(), 1, "{toml}: {:?}", out.lossy);
            assert_eq!(out.lossy[0].key, key, "{toml}");
            assert!(out.lossy[0].why.contains(why), "{toml}: {}", out.lossy[0].why);
        }
    }
}
