//! The identity keys, limits, env files and sockets of a worker or job as
//! Kubernetes says them: a container's securityContext and resources, its
//! ports and a Service. What a pod has no field for is listed.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    ContainerPort, ResourceRequirements, SecurityContext, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::Exported;
use crate::config::model::{Address, EnvFile, Identity, Socket};

/// The container's securityContext: a numeric `user`/`group` as
/// runAsUser/runAsGroup, `no_new_privs` as allowPrivilegeEscalation=false.
/// A name is lost: the uid it has here need not be the image's.
pub(super) fn security_context(key: &str, id: &Identity, out: &mut Exported) -> Option<SecurityContext> {
    let mut sc = SecurityContext::default();
    let switched = id.switch.as_ref();
    for (field, name, here, slot) in [
        ("user", &id.user, switched.map(|s| s.uid), &mut sc.run_as_user),
        ("group", &id.group, switched.map(|s| s.gid), &mut sc.run_as_group),
    ] {
        let Some(name) = name else { continue };
        match name.parse::<i64>() {
            Ok(n) if n >= 0 => *slot = Some(n),
            _ => {
                let here = here.map(|n| format!(" (id {n} on this machine)")).unwrap_or_default();
                out.lose(
                    format!("{key}.{field}"),
                    format!(
                        "{name:?}{here} is a name; a pod's runAs{} takes the numeric id the image gives it",
                        if field == "user" { "User" } else { "Group" }
                    ),
                );
            }
        }
    }
    if id.no_new_privs {
        sc.allow_privilege_escalation = Some(false);
    }
    if let Some(m) = id.umask {
        out.lose(
            format!("{key}.umask"),
            format!("a container has no umask setting ({m:03o}); the image's entrypoint would set it"),
        );
    }
    if let Some(n) = id.nice {
        out.lose(
            format!("{key}.nice"),
            format!("a container has no nice value ({n}); Kubernetes shares CPU by requests"),
        );
    }
    if let Some(n) = id.oom_score_adj {
        out.lose(
            format!("{key}.oom_score_adj"),
            format!("the kubelet sets oom_score_adj from the pod's QoS class, not {n}"),
        );
    }
    for name in id.limits.keys() {
        out.lose(
            format!("{key}.limits.{name}"),
            "a container's rlimits are the container runtime's; a pod spec has no field for them",
        );
    }
    (sc != SecurityContext::default()).then_some(sc)
}

/// The values of `env_file` are read when the config is loaded and stand
/// in the container's env like the rest: the export says so, once.
pub(super) fn env_file_note(key: &str, files: &[EnvFile], secret: &BTreeSet<String>, out: &mut Exported) {
    if files.is_empty() {
        return;
    }
    let names: Vec<String> = files.iter().map(|f| f.path.display().to_string()).collect();
    let keep =
        if secret.is_empty() { "; list secret keys in secret_env to move them to a Secret" } else { "" };
    out.notes.push(format!(
        "{key}.env_file: the values of {} were read at export and written into env; export again after changing them{keep}",
        names.join(", ")
    ));
}

/// max_memory: the container's memory limit (the kubelet's OOM kill and
/// restart stand for drover's restart above it). Takes the bytes so it
/// can be wired where the model has the key.
pub(super) fn memory_limit(max_memory: Option<u64>) -> Option<ResourceRequirements> {
    let bytes = max_memory?;
    Some(ResourceRequirements {
        limits: Some([("memory".to_string(), Quantity(bytes.to_string()))].into()),
        ..Default::default()
    })
}

/// The ports of a worker's tcp sockets, once each, named where the
/// socket's name is a valid port name; unix sockets are lost.
pub(super) fn ports(key: &str, sockets: &[Socket], out: &mut Exported) -> Vec<(i32, Option<String>)> {
    let mut ports: Vec<(i32, Option<String>)> = Vec::new();
    for (i, s) in sockets.iter().enumerate() {
        match &s.address {
            Address::Tcp(a) => {
                let port = i32::from(a.port());
                if ports.iter().any(|(p, _)| *p == port) {
                    continue;
                }
                let taken = ports.iter().any(|(_, n)| n.as_deref() == Some(s.name.as_str()));
                let name = (port_name_ok(&s.name) && !taken).then(|| s.name.clone());
                ports.push((port, name));
            }
            Address::Unix(p) => out.lose(
                format!("{key}.sockets[{i}]"),
                format!("a unix socket ({}) is not reachable through a Service", p.display()),
            ),
        }
    }
    if !ports.is_empty() {
        out.lose(
            format!("{key}.sockets"),
            "a pod is handed no listening socket (no LISTEN_FDS): the program binds 0.0.0.0:PORT itself, \
             and a restart has a window with nothing listening (the Service sends to the other replicas)",
        );
    }
    // A Service with more than one port needs every port named.
    if ports.len() > 1 {
        for (p, n) in &mut ports {
            if n.is_none() {
                *n = Some(format!("tcp-{p}"));
            }
        }
    }
    ports
}

/// An IANA service name, as a named port must be: at most 15 lowercase
/// letters, digits and inner single dashes, one letter at least.
fn port_name_ok(n: &str) -> bool {
    (1..=15).contains(&n.len())
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && n.bytes().any(|b| b.is_ascii_lowercase())
        && !n.starts_with('-')
        && !n.ends_with('-')
        && !n.contains("--")
}

pub(super) fn container_ports(ports: &[(i32, Option<String>)]) -> Option<Vec<ContainerPort>> {
    (!ports.is_empty()).then(|| {
        ports
            .iter()
            .map(|(p, n)| ContainerPort {
                container_port: *p,
                name: n.clone(),
                protocol: Some("TCP".into()),
                ..Default::default()
            })
            .collect()
    })
}

/// The Service in front of a worker's pods, on its sockets' ports.
pub(super) fn service(
    metadata: ObjectMeta,
    selector: BTreeMap<String, String>,
    ports: &[(i32, Option<String>)],
) -> Option<Service> {
    if ports.is_empty() {
        return None;
    }
    Some(Service {
        metadata,
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(
                ports
                    .iter()
                    .map(|(p, n)| ServicePort {
                        port: *p,
                        name: n.clone(),
                        protocol: Some("TCP".into()),
                        target_port: Some(IntOrString::Int(*p)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    })
}
