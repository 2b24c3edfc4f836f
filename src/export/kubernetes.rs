//! daemon.toml as Kubernetes objects: a worker is a Deployment, a job a
//! CronJob (suspended when only `drover trigger` starts it), a flow's steps
//! init containers run in order. Built from k8s-openapi's typed structs;
//! the YAML is theirs, serialized in a stable order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, Job as KJob, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, PodSpec, PodTemplateSpec, Secret, SecretKeySelector, Service,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use super::cron::every_to_cron;
use super::kubernetes_identity as id;
use super::{Exported, built_in, object_name, whole_seconds};
use crate::config::model::{
    Condition, Config, Job, OnOverlap, RestartPolicy, SpawnMode, Step, Trigger, Worker,
};
use crate::config::types::Signal;

pub struct Options {
    /// The image every container runs (the one the commands are in).
    pub image: String,
    pub namespace: Option<String>,
    /// Prepended to every object name.
    pub name_prefix: String,
    /// Where the config's directory is in the image; `dir`s under it map
    /// there. None: the image's working directory.
    pub workdir: Option<PathBuf>,
    /// Write the secret values into Secret objects (else only referenced).
    pub emit_secrets: bool,
    /// The config file's directory, which `dir`s are relative to.
    pub base_dir: PathBuf,
}

/// One YAML document per object, in a stable order: Secrets, then
/// Deployments (each followed by its Service), then CronJobs and Jobs,
/// each by name.
pub fn export(config: &Config, o: &Options) -> Exported {
    let mut out = Exported::default();
    let mut docs: Vec<(u8, String, String)> = Vec::new();
    let mut push =
        |rank: u8, name: &str, comment: Option<String>, yaml: Result<String, String>, out: &mut Exported| {
            match yaml {
                Ok(y) => docs.push((rank, name.to_string(), format!("{}{y}", comment.unwrap_or_default()))),
                Err(e) => out.fail(name, format!("cannot be written as YAML: {e}")),
            }
        };
    for (name, w) in &config.workers {
        let key = format!("workers.{name}");
        let (env, secret) = env_and_secret(o, name, &w.env, &w.secret_env, &mut out);
        if let Some((secret_name, s)) = secret {
            push(0, &secret_name, None, to_yaml(&s), &mut out);
        }
        let (d, service) = deployment(o, name, &key, w, env, &mut out);
        push(1, name, None, to_yaml(&d), &mut out);
        if let Some(s) = service {
            // Stable sort: the Service stays right after its Deployment.
            push(1, name, None, to_yaml(&s), &mut out);
        }
    }
    for (name, j) in &config.jobs {
        let key = format!("jobs.{name}");
        let (env, secret) = env_and_secret(o, name, &j.env, &j.secret_env, &mut out);
        if let Some((secret_name, s)) = secret {
            push(0, &secret_name, None, to_yaml(&s), &mut out);
        }
        let pod = job_pod(o, name, &key, j, env, &mut out);
        let object = object_name(&o.name_prefix, name);
        if j.flow && matches!(j.trigger, Trigger::Manual) {
            let comment = format!(
                "# {key}: suspended; run it with kubectl patch job {object} -p '{{\"spec\":{{\"suspend\":false}}}}'\n"
            );
            let k = flow_job(o, name, j, pod);
            push(2, name, Some(comment), to_yaml(&k), &mut out);
        } else {
            let (c, comment) = cron_job(o, name, &key, j, pod, &mut out);
            push(2, name, comment, to_yaml(&c), &mut out);
        }
    }
    docs.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let text: Vec<String> = docs.into_iter().map(|(_, _, y)| y).collect();
    out.files.push(("drover.yaml".into(), text.join("---\n")));
    out
}

/// The env list of a worker or job, and its Secret when it is to be
/// written (else the note saying how to create it).
fn env_and_secret(
    o: &Options,
    name: &str,
    env: &BTreeMap<String, String>,
    secret: &std::collections::BTreeSet<String>,
    out: &mut Exported,
) -> (Vec<EnvVar>, Option<(String, Secret)>) {
    let (secret_name, vars) = env_of(&o.name_prefix, name, env, secret);
    let object = secret_object(o, &secret_name, env, secret);
    if object.is_none() && !secret.is_empty() {
        out.notes.push(secret_note(o, &secret_name, secret));
    }
    (vars, object.map(|s| (secret_name, s)))
}

fn to_yaml<T: serde::Serialize>(v: &T) -> Result<String, String> {
    serde_norway::to_string(v).map_err(|e| e.to_string())
}

fn labels(o: &Options, name: &str, component: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name".to_string(), object_name(&o.name_prefix, name)),
        ("app.kubernetes.io/component".to_string(), component.to_string()),
        ("app.kubernetes.io/managed-by".to_string(), "drover".to_string()),
    ]
    .into()
}

fn meta(o: &Options, name: &str, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(object_name(&o.name_prefix, name)),
        namespace: o.namespace.clone(),
        labels: Some(labels(o, name, component)),
        ..Default::default()
    }
}

/// The Secret a worker's or job's `secret_env` keys come from, and its env
/// list: plain values inline, secret ones by reference.
fn env_of(
    prefix: &str,
    name: &str,
    env: &BTreeMap<String, String>,
    secret: &std::collections::BTreeSet<String>,
) -> (String, Vec<EnvVar>) {
    let secret_name = format!("{}-env", object_name(prefix, name));
    let vars = env
        .iter()
        .map(|(k, v)| {
            if secret.contains(k) {
                EnvVar {
                    name: k.clone(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: secret_name.clone(),
                            key: k.clone(),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            } else {
                EnvVar { name: k.clone(), value: Some(v.clone()), ..Default::default() }
            }
        })
        .collect();
    (secret_name, vars)
}

fn plain(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..Default::default() }
}

fn secret_object(
    o: &Options,
    secret_name: &str,
    env: &BTreeMap<String, String>,
    secret: &std::collections::BTreeSet<String>,
) -> Option<Secret> {
    if !o.emit_secrets || secret.is_empty() {
        return None;
    }
    let data: BTreeMap<String, String> =
        secret.iter().filter_map(|k| Some((k.clone(), env.get(k)?.clone()))).collect();
    Some(Secret {
        metadata: ObjectMeta {
            name: Some(secret_name.to_string()),
            namespace: o.namespace.clone(),
            labels: Some([("app.kubernetes.io/managed-by".to_string(), "drover".to_string())].into()),
            ..Default::default()
        },
        string_data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    })
}

fn secret_note(o: &Options, secret_name: &str, keys: &std::collections::BTreeSet<String>) -> String {
    let ns = o.namespace.as_deref().map(|n| format!(" -n {n}")).unwrap_or_default();
    let from: Vec<String> = keys.iter().map(|k| format!("--from-literal={k}=…")).collect();
    format!(
        "create the Secret {secret_name} first: kubectl{ns} create secret generic {secret_name} {}",
        from.join(" ")
    )
}

/// A `dir` as a path in the image: under the config's directory, the same
/// place under `workdir`; elsewhere (or with no workdir) it has none.
fn working_dir(o: &Options, key: &str, dir: &Path, out: &mut Exported) -> Option<String> {
    let rel = dir.strip_prefix(&o.base_dir).ok();
    match (&o.workdir, rel) {
        (Some(root), Some(rel)) => Some(root.join(rel).to_string_lossy().trim_end_matches('/').to_string()),
        (None, Some(rel)) if rel.as_os_str().is_empty() => None,
        _ => {
            out.lose(
                format!("{key}.dir"),
                format!(
                    "{} has no path in the image; pass --workdir (where the config's directory is in the image)",
                    dir.display()
                ),
            );
            None
        }
    }
}

fn container(
    o: &Options,
    name: &str,
    command: &[String],
    env: &[EnvVar],
    workdir: Option<String>,
) -> Container {
    Container {
        name: object_name("", name),
        image: Some(o.image.clone()),
        command: command.first().map(|p| vec![p.clone()]),
        args: (command.len() > 1).then(|| command[1..].to_vec()),
        env: (!env.is_empty()).then(|| env.to_vec()),
        working_dir: workdir,
        ..Default::default()
    }
}

fn stop_signal(key: &str, sig: Signal, out: &mut Exported) {
    if sig != Signal::SIGTERM {
        out.lose(
            format!("{key}.stop_signal"),
            format!("Kubernetes stops a container with SIGTERM, not {sig}"),
        );
    }
}

fn deployment(
    o: &Options,
    name: &str,
    key: &str,
    w: &Worker,
    env: Vec<EnvVar>,
    out: &mut Exported,
) -> (Deployment, Option<Service>) {
    let defaults = built_in();
    match w.restart {
        RestartPolicy::Always => {}
        other => out.lose(
            format!("{key}.restart"),
            format!("a Deployment restarts every exit; {} has no equivalent", restart_name(other)),
        ),
    }
    if w.backoff != defaults.backoff {
        out.lose(format!("{key}.backoff"), "Kubernetes has its own restart backoff (10s doubling to 5m)");
    }
    if w.crash_loop != defaults.crash_loop {
        out.lose(format!("{key}.crash_loop"), "a Deployment never parks a crash-looping pod");
    }
    if w.permanent_exit_codes != defaults.permanent_exit_codes {
        out.lose(format!("{key}.permanent_exit_codes"), "a Deployment restarts whatever the exit code");
    }
    if w.spawn_mode == SpawnMode::Worktree {
        out.lose(format!("{key}.spawn_mode"), "git worktrees per instance have no Kubernetes equivalent");
    }
    stop_signal(key, w.stop_signal, out);
    if w.command.iter().chain(w.env.values()).any(|a| a.contains("DROVER_INSTANCE")) {
        out.lose(
            format!("{key}.command"),
            "uses DROVER_INSTANCE: a Deployment's pods have no instance index (a StatefulSet's ordinal would)",
        );
    }
    let mut env = env;
    env.push(plain("DROVER_WORKER", name));
    env.push(plain("DROVER_CAPACITY", &w.capacity.to_string()));
    let workdir = working_dir(o, key, &w.dir, out);
    let probes = super::kubernetes_probes::probes(name, key, w, out);
    depends_on(key, &w.depends_on, out);
    let security = id::security_context(key, &w.identity, out);
    id::env_file_note(key, &w.env_file, &w.secret_env, out);
    let ports = id::ports(key, &w.sockets, out);
    let pod_labels = labels(o, name, "worker");
    let selector: BTreeMap<String, String> = pod_labels
        .iter()
        .filter(|(k, _)| k.as_str() != "app.kubernetes.io/component")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let service = id::service(meta(o, name, "worker"), selector.clone(), &ports);
    let d = Deployment {
        metadata: meta(o, name, "worker"),
        spec: Some(DeploymentSpec {
            replicas: Some(i32::try_from(w.capacity).unwrap_or(i32::MAX)),
            selector: LabelSelector { match_labels: Some(selector), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(pod_labels), ..Default::default() }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        readiness_probe: probes.readiness,
                        liveness_probe: probes.liveness,
                        startup_probe: probes.startup,
                        security_context: security,
                        ports: id::container_ports(&ports),
                        resources: id::memory_limit(w.max_memory.map(|b| b.0)),
                        ..container(o, name, &w.command, &env, workdir)
                    }],
                    termination_grace_period_seconds: Some(whole_seconds(w.stop_grace.0)),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    (d, service)
}

/// Kubernetes starts every object at once: nothing waits for another.
fn depends_on(key: &str, deps: &BTreeMap<String, Condition>, out: &mut Exported) {
    for (dep, cond) in deps {
        out.lose(
            format!("{key}.depends_on.{dep}"),
            format!("Kubernetes starts objects independently: nothing waits for {dep} ({cond}); an init container that polls it would"),
        );
    }
}

fn restart_name(r: RestartPolicy) -> &'static str {
    match r {
        RestartPolicy::Always => "always",
        RestartPolicy::OnFailure => "on-failure",
        RestartPolicy::Never => "never",
    }
}

/// A job's pod: one container, or a flow's steps as init containers run in
/// order with the last as the container.
fn job_pod(
    o: &Options,
    name: &str,
    key: &str,
    j: &Job,
    env: Vec<EnvVar>,
    out: &mut Exported,
) -> PodTemplateSpec {
    stop_signal(key, j.stop_signal, out);
    depends_on(key, &j.depends_on, out);
    let security = id::security_context(key, &j.identity, out);
    id::env_file_note(key, &j.env_file, &j.secret_env, out);
    let workdir = working_dir(o, key, &j.dir, out);
    for (i, s) in j.steps.iter().enumerate() {
        if s.approve {
            out.lose(
                format!("{key}.steps[{i}].approve"),
                "Kubernetes runs every step without waiting for approval",
            );
        }
    }
    let mut env = env;
    env.push(plain("DROVER_JOB", name));
    let step_env = |s: &Step| [env.clone(), vec![plain("DROVER_STEP", &s.name)]].concat();
    let secured = |c: Container| Container { security_context: security.clone(), ..c };
    let as_container = |s: &Step| secured(container(o, &s.name, &s.command, &step_env(s), workdir.clone()));
    let (last, before) = j.steps.split_last().map_or((None, &[][..]), |(l, b)| (Some(l), b));
    let main = match (j.flow, last) {
        (true, Some(s)) => as_container(s),
        (_, Some(s)) => secured(container(o, name, &s.command, &step_env(s), workdir.clone())),
        (_, None) => secured(container(o, name, &[], &env, workdir.clone())),
    };
    PodTemplateSpec {
        metadata: Some(ObjectMeta { labels: Some(labels(o, name, "job")), ..Default::default() }),
        spec: Some(PodSpec {
            init_containers: (j.flow && !before.is_empty())
                .then(|| before.iter().map(as_container).collect()),
            containers: vec![main],
            restart_policy: Some("Never".into()),
            termination_grace_period_seconds: Some(whole_seconds(j.stop_grace.0)),
            ..Default::default()
        }),
    }
}

fn job_spec(j: &Job, pod: PodTemplateSpec) -> JobSpec {
    JobSpec {
        // drover runs a failed run once; a new run is a new trigger.
        backoff_limit: Some(0),
        active_deadline_seconds: j.timeout.map(|t| whole_seconds(t.0)),
        template: pod,
        ..Default::default()
    }
}

fn cron_job(
    o: &Options,
    name: &str,
    key: &str,
    j: &Job,
    pod: PodTemplateSpec,
    out: &mut Exported,
) -> (CronJob, Option<String>) {
    let object = object_name(&o.name_prefix, name);
    let (schedule, time_zone, suspend, comment) = match &j.trigger {
        Trigger::Schedule { cron, timezone } => (cron.clone(), timezone.clone(), None, None),
        Trigger::Every(d) => match every_to_cron(d.0) {
            Ok(c) => (c, Some("Etc/UTC".into()), None, None),
            Err(Some(rounded)) => {
                out.lose(
                    format!("{key}.every"),
                    format!("cron ticks once a minute at most; {d} becomes every minute"),
                );
                (rounded, Some("Etc/UTC".into()), None, None)
            }
            Err(None) => {
                out.fail(
                    format!("{key}.every"),
                    format!("{d} does not divide the clock evenly; write a `schedule` (cron) instead"),
                );
                ("* * * * *".into(), None, None, None)
            }
        },
        Trigger::Manual => (
            // Never reached while suspended; Kubernetes requires one.
            "0 0 1 1 *".into(),
            None,
            Some(true),
            Some(format!(
                "# {key}: only run by hand: kubectl create job --from=cronjob/{object} {object}-manual\n"
            )),
        ),
    };
    let concurrency = match j.on_overlap {
        OnOverlap::Skip => "Forbid",
        OnOverlap::Replace => "Replace",
        OnOverlap::Queue => {
            out.lose(
                format!("{key}.on_overlap"),
                "queue becomes Allow: Kubernetes runs overlapping runs side by side",
            );
            "Allow"
        }
    };
    if j.capacity > 1 && j.on_overlap != OnOverlap::Queue {
        out.lose(format!("{key}.capacity"), "with Forbid or Replace Kubernetes runs one at a time");
    }
    if !j.jitter.0.is_zero() {
        out.lose(format!("{key}.jitter"), "a CronJob starts on the minute, with no random delay");
    }
    let retain = i32::try_from(j.retain).unwrap_or(i32::MAX);
    let c = CronJob {
        metadata: meta(o, name, "job"),
        spec: Some(CronJobSpec {
            schedule,
            time_zone,
            suspend,
            concurrency_policy: Some(concurrency.into()),
            // catch_up = false: a tick missed by more than a minute is dropped.
            starting_deadline_seconds: (!j.catch_up).then_some(60),
            successful_jobs_history_limit: Some(retain),
            failed_jobs_history_limit: Some(retain),
            job_template: JobTemplateSpec { metadata: None, spec: Some(job_spec(j, pod)) },
        }),
        ..Default::default()
    };
    (c, comment)
}

fn flow_job(o: &Options, name: &str, j: &Job, pod: PodTemplateSpec) -> KJob {
    KJob {
        metadata: meta(o, name, "job"),
        spec: Some(JobSpec { suspend: Some(true), ..job_spec(j, pod) }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, load};

    /// The objects exported from `toml`, read back from the YAML.
    fn export_text(toml: &str, emit_secrets: bool) -> (Vec<serde_norway::Value>, Exported) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.toml");
        std::fs::write(&path, toml).unwrap();
        let loaded = load(&path, &Overrides::new(Vec::<(String, String)>::new(), &[]).unwrap()).unwrap();
        let o = Options {
            image: "img:1".into(),
            namespace: Some("prod".into()),
            name_prefix: "acme-".into(),
            workdir: Some("/app".into()),
            emit_secrets,
            base_dir: crate::config::load::base_dir(&path),
        };
        let e = export(&loaded.config, &o);
        let docs = e.files[0]
            .1
            .split("---\n")
            .map(|d| serde_norway::from_str::<serde_norway::Value>(d).unwrap())
            .collect();
        (docs, e)
    }

    fn of_kind<T: serde::de::DeserializeOwned>(docs: &[serde_norway::Value], kind: &str) -> Vec<T> {
        docs.iter()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .map(|d| serde_norway::from_value(d.clone()).unwrap())
            .collect()
    }

    #[test]
    fn a_worker_round_trips_as_a_deployment() {
        let (docs, e) = export_text(
            "[workers.api_v2]\ncommand = [\"./api\", \"--port\", \"8000\"]\ncapacity = 3\nstop_grace = \"2500ms\"\n\
             env = { PORT = \"8000\", TOKEN = \"t0k3n\" }\nsecret_env = [\"TOKEN\"]\n",
            false,
        );
        assert!(e.lossy.is_empty() && e.errors.is_empty(), "{:?} {:?}", e.lossy, e.errors);
        let d: Vec<Deployment> = of_kind(&docs, "Deployment");
        let spec = d[0].spec.as_ref().unwrap();
        assert_eq!(d[0].metadata.name.as_deref(), Some("acme-api-v2"));
        assert_eq!(d[0].metadata.namespace.as_deref(), Some("prod"));
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.termination_grace_period_seconds, Some(3), "the grace is rounded up");
        let c = &pod.containers[0];
        assert_eq!(c.command.as_deref(), Some(&["./api".to_string()][..]));
        assert_eq!(c.args.as_deref(), Some(&["--port".to_string(), "8000".to_string()][..]));
        assert_eq!(c.working_dir.as_deref(), Some("/app"));
        let env = c.env.as_ref().unwrap();
        let token = env.iter().find(|v| v.name == "TOKEN").unwrap();
        assert_eq!(token.value, None, "a secret is never inline");
        let r = token.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((r.name.as_str(), r.key.as_str()), ("acme-api-v2-env", "TOKEN"));
        assert!(env.iter().any(|v| v.name == "DROVER_WORKER" && v.value.as_deref() == Some("api_v2")));
        assert!(of_kind::<Secret>(&docs, "Secret").is_empty(), "no Secret without --emit-secrets");
        assert!(
            e.notes.iter().any(|n| n.contains("acme-api-v2-env") && n.contains("TOKEN")),
            "{:?}",
            e.notes
        );
        let selector = spec.selector.match_labels.as_ref().unwrap();
        let labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)), "the selector matches the pods");

        let (docs, _) = export_text(
            "[workers.api]\ncommand = [\"x\"]\nenv = { TOKEN = \"t0k3n\" }\nsecret_env = [\"TOKEN\"]\n",
            true,
        );
        let s: Vec<Secret> = of_kind(&docs, "Secret");
        assert_eq!(s[0].string_data.as_ref().unwrap()["TOKEN"], "t0k3n");
    }

    #[test]
    fn jobs_round_trip_as_cron_jobs_with_their_schedule_zone_and_overlap() {
        let (docs, e) = export_text(
            "[jobs.nightly]\ncommand = [\"x\"]\nschedule = \"0 3 * * *\"\ntimezone = \"Europe/Paris\"\ntimeout = \"10m\"\nretain = 7\n\
             [jobs.often]\ncommand = [\"x\"]\nevery = \"15m\"\non_overlap = \"replace\"\ncatch_up = true\n\
             [jobs.manual]\ncommand = [\"x\"]\n",
            false,
        );
        assert!(e.lossy.is_empty() && e.errors.is_empty(), "{:?} {:?}", e.lossy, e.errors);
        let jobs: Vec<CronJob> = of_kind(&docs, "CronJob");
        let by = |n: &str| {
            jobs.iter().find(|j| j.metadata.name.as_deref() == Some(n)).unwrap().spec.clone().unwrap()
        };
        let nightly = by("acme-nightly");
        assert_eq!(
            (nightly.schedule.as_str(), nightly.time_zone.as_deref()),
            ("0 3 * * *", Some("Europe/Paris"))
        );
        assert_eq!(nightly.concurrency_policy.as_deref(), Some("Forbid"));
        assert_eq!(nightly.job_template.spec.as_ref().unwrap().active_deadline_seconds, Some(600));
        assert_eq!(
            (nightly.successful_jobs_history_limit, nightly.failed_jobs_history_limit),
            (Some(7), Some(7))
        );
        assert_eq!(nightly.starting_deadline_seconds, Some(60));
        let often = by("acme-often");
        assert_eq!((often.schedule.as_str(), often.time_zone.as_deref()), ("*/15 * * * *", Some("Etc/UTC")));
        assert_eq!(often.concurrency_policy.as_deref(), Some("Replace"));
        assert_eq!(often.starting_deadline_seconds, None, "catch_up keeps missed ticks");
        assert_eq!(by("acme-manual").suspend, Some(true));
        assert!(e.files[0].1.contains("kubectl create job --from=cronjob/acme-manual"));
    }

    #[test]
    fn a_flow_runs_its_steps_in_order_and_losses_are_named() {
        let (docs, e) = export_text(
            "[jobs.release]\non_overlap = \"queue\"\nevery = \"10s\"\n\
             [[jobs.release.steps]]\nname = \"build\"\ncommand = [\"b\"]\n\
             [[jobs.release.steps]]\nname = \"test\"\ncommand = [\"t\"]\n\
             [[jobs.release.steps]]\nname = \"ship\"\ncommand = [\"s\"]\napprove = true\n\
             [workers.w]\ncommand = [\"sh\", \"-c\", \"echo $DROVER_INSTANCE\"]\nrestart = \"never\"\nstop_signal = \"SIGINT\"\n",
            false,
        );
        let c: Vec<CronJob> = of_kind(&docs, "CronJob");
        let pod =
            c[0].spec.as_ref().unwrap().job_template.spec.as_ref().unwrap().template.spec.clone().unwrap();
        let init: Vec<&str> = pod.init_containers.as_ref().unwrap().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(init, ["build", "test"]);
        assert_eq!(pod.containers[0].name, "ship");
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let keys: Vec<&str> = e.lossy.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "workers.w.restart",
                "workers.w.stop_signal",
                "workers.w.command",
                "jobs.release.steps[2].approve",
                "jobs.release.every",
                "jobs.release.on_overlap",
            ]
        );
        let (_, e) = export_text("[jobs.odd]\ncommand = [\"x\"]\nevery = \"7m\"\n", false);
        assert_eq!(e.errors.iter().map(|l| l.key.as_str()).collect::<Vec<_>>(), ["jobs.odd.every"]);
    }
}
