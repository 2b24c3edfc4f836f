//! From desired config and actual state to a plan: which workers start,
//! stop, restart or scale. Pure: no processes, no clocks. The supervisor
//! applies a plan; `drover plan` prints one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::model::{Identity, Job, Trigger, Worker};

/// What the supervisor runs now, as far as planning is concerned: each
/// worker's applied settings.
pub type Actual<'a> = BTreeMap<&'a str, &'a Worker>;

/// The settings whose change needs new processes; everything else
/// (backoff, crash_loop, stop_grace, restart, permanent_exit_codes,
/// capacity, ready, health, depends_on) applies to the running processes
/// as they are: a probe change takes effect at the next check, a
/// dependency change at the next start.
pub const RESTART_FIELDS: &[&str] = &[
    "command",
    "dir",
    "env",
    "spawn_mode",
    "stop_signal",
    "user",
    "group",
    "umask",
    "nice",
    "oom_score_adj",
    "no_new_privs",
    "limits",
    "sockets",
];

/// The identity keys of `a` and `b` that differ. A user or group whose
/// number, groups or home changed in the system's database counts as
/// changed too: the processes must be started again to get them.
fn identity_changes(a: &Identity, b: &Identity) -> [(&'static str, bool); 7] {
    let uid = |i: &Identity| i.switch.as_ref().map(|s| s.uid);
    let gids = |i: &Identity| i.switch.as_ref().map(|s| (s.gid, s.groups.clone()));
    [
        ("user", a.user != b.user || uid(a) != uid(b) || a.login_env != b.login_env),
        ("group", a.group != b.group || gids(a) != gids(b)),
        ("umask", a.umask != b.umask),
        ("nice", a.nice != b.nice),
        ("oom_score_adj", a.oom_score_adj != b.oom_score_adj),
        ("no_new_privs", a.no_new_privs != b.no_new_privs),
        ("limits", a.limits != b.limits),
    ]
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Change {
    /// A new worker: start `capacity` instances.
    Start { worker: String, capacity: u32 },
    /// A removed worker: stop every instance.
    Stop { worker: String },
    /// Launch settings changed: replace instances one at a time (and
    /// scale, when capacity changed too).
    Restart { worker: String, fields: Vec<String>, from_capacity: u32, to_capacity: u32 },
    /// Only live settings (maybe capacity) changed: running processes stay.
    Update { worker: String, fields: Vec<String>, from_capacity: u32, to_capacity: u32 },
}

impl Change {
    pub fn worker(&self) -> &str {
        match self {
            Change::Start { worker, .. }
            | Change::Stop { worker }
            | Change::Restart { worker, .. }
            | Change::Update { worker, .. } => worker,
        }
    }
}

/// The fields of `a` and `b` that differ, by name.
pub fn changed_fields(a: &Worker, b: &Worker) -> Vec<String> {
    let mut checks = vec![
        ("command", a.command != b.command),
        ("dir", a.dir != b.dir),
        ("env", a.env != b.env),
        ("spawn_mode", a.spawn_mode != b.spawn_mode),
        ("stop_signal", a.stop_signal != b.stop_signal),
        ("capacity", a.capacity != b.capacity),
        ("restart", a.restart != b.restart),
        ("backoff", a.backoff != b.backoff),
        ("crash_loop", a.crash_loop != b.crash_loop),
        ("permanent_exit_codes", a.permanent_exit_codes != b.permanent_exit_codes),
        ("stop_grace", a.stop_grace != b.stop_grace),
        ("ready", a.ready != b.ready),
        ("health", a.health != b.health),
        ("depends_on", a.depends_on != b.depends_on),
        // The files' variables are in `env`: a new list alone changes no process.
        ("env_file", a.env_file != b.env_file),
        ("sockets", a.sockets != b.sockets),
        // Sampled or set on the next cgroup: applied without a restart.
        ("max_memory", a.max_memory != b.max_memory),
    ];
    checks.extend(identity_changes(&a.identity, &b.identity));
    differing(&checks)
}

/// The names whose flag is set.
fn differing(checks: &[(&str, bool)]) -> Vec<String> {
    checks.iter().filter(|(_, d)| *d).map(|(n, _)| n.to_string()).collect()
}

/// The changes that take `actual` to `desired`, by worker name.
pub fn plan(desired: &BTreeMap<String, Worker>, actual: &Actual<'_>) -> Vec<Change> {
    let mut changes = Vec::new();
    for (name, w) in desired {
        match actual.get(name.as_str()) {
            None => changes.push(Change::Start { worker: name.clone(), capacity: w.capacity }),
            Some(old) => {
                let fields = changed_fields(old, w);
                if fields.is_empty() {
                    continue;
                }
                if fields.iter().any(|f| RESTART_FIELDS.contains(&f.as_str())) {
                    changes.push(Change::Restart {
                        worker: name.clone(),
                        fields,
                        from_capacity: old.capacity,
                        to_capacity: w.capacity,
                    });
                } else {
                    changes.push(Change::Update {
                        worker: name.clone(),
                        fields,
                        from_capacity: old.capacity,
                        to_capacity: w.capacity,
                    });
                }
            }
        }
    }
    for name in actual.keys() {
        if !desired.contains_key(*name) {
            changes.push(Change::Stop { worker: name.to_string() });
        }
    }
    changes
}

/// How `drover plan` sees a job change. Jobs have no processes to
/// replace: a changed job takes its new settings from its next tick or
/// run, a removed one stops ticking while its active runs finish.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum JobChange {
    AddJob { job: String, trigger: String },
    RemoveJob { job: String },
    ChangeJob { job: String, fields: Vec<String> },
}

/// A trigger as the file writes it: `schedule "…"`, `every 10m`, `manual`.
pub fn trigger_text(t: &Trigger) -> String {
    match t {
        Trigger::Schedule { cron, timezone: None } => format!("schedule {cron}"),
        Trigger::Schedule { cron, timezone: Some(tz) } => format!("schedule {cron} ({tz})"),
        Trigger::Every(d) => format!("every {d}"),
        Trigger::Manual => "manual".into(),
    }
}

/// The keys of a job that differ between `a` and `b`, named as the file
/// names them.
pub fn changed_job_fields(a: &Job, b: &Job) -> Vec<String> {
    let steps_key = if a.flow || b.flow { "steps" } else { "command" };
    let (every, schedule, timezone) = match (&a.trigger, &b.trigger) {
        (Trigger::Every(x), Trigger::Every(y)) => (x != y, false, false),
        (Trigger::Schedule { cron: c1, timezone: t1 }, Trigger::Schedule { cron: c2, timezone: t2 }) => {
            (false, c1 != c2, t1 != t2)
        }
        (Trigger::Manual, Trigger::Manual) => (false, false, false),
        (x, y) => {
            let is_every = |t: &Trigger| matches!(t, Trigger::Every(_));
            let is_schedule = |t: &Trigger| matches!(t, Trigger::Schedule { .. });
            (is_every(x) || is_every(y), is_schedule(x) || is_schedule(y), false)
        }
    };
    let mut checks = vec![
        (steps_key, a.steps != b.steps || a.flow != b.flow),
        ("every", every),
        ("schedule", schedule),
        ("timezone", timezone),
        ("capacity", a.capacity != b.capacity),
        ("on_overlap", a.on_overlap != b.on_overlap),
        ("queue_limit", a.queue_limit != b.queue_limit),
        ("timeout", a.timeout != b.timeout),
        ("jitter", a.jitter != b.jitter),
        ("catch_up", a.catch_up != b.catch_up),
        ("retain", a.retain != b.retain),
        ("dir", a.dir != b.dir),
        ("env", a.env != b.env),
        ("secret_env", a.secret_env != b.secret_env),
        ("stop_signal", a.stop_signal != b.stop_signal),
        ("stop_grace", a.stop_grace != b.stop_grace),
        ("depends_on", a.depends_on != b.depends_on),
        ("env_file", a.env_file != b.env_file),
    ];
    checks.extend(identity_changes(&a.identity, &b.identity));
    differing(&checks)
}

/// The job changes that take `actual` to `desired`, by job name.
pub fn plan_jobs(desired: &BTreeMap<String, Job>, actual: &BTreeMap<String, Job>) -> Vec<JobChange> {
    let mut changes = Vec::new();
    for (name, j) in desired {
        match actual.get(name) {
            None => changes.push(JobChange::AddJob { job: name.clone(), trigger: trigger_text(&j.trigger) }),
            Some(old) => {
                let fields = changed_job_fields(old, j);
                if !fields.is_empty() {
                    changes.push(JobChange::ChangeJob { job: name.clone(), fields });
                }
            }
        }
    }
    for name in actual.keys().filter(|n| !desired.contains_key(*n)) {
        changes.push(JobChange::RemoveJob { job: name.clone() });
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::{Settings, SpawnMode};

    fn w(cmd: &str, capacity: u32) -> Worker {
        Worker::new(vec![cmd.into()], "/".into(), capacity, SpawnMode::SameDir, Settings::default())
    }

    fn actual(m: &BTreeMap<String, Worker>) -> Actual<'_> {
        m.iter().map(|(k, v)| (k.as_str(), v)).collect()
    }

    #[test]
    fn probe_and_dependency_changes_are_updates_without_restart() {
        use crate::config::model::{Condition, Probe, ProbeKind};
        use std::time::Duration;
        let old: BTreeMap<_, _> = [("web".to_string(), w("x", 1)), ("db".into(), w("y", 1))].into();
        let mut new = old.clone();
        let probe = Probe {
            kind: ProbeKind::Http("http://127.0.0.1:8000/".into()),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            start_timeout: Duration::from_secs(60),
            failures: 1,
        };
        if let Some(web) = new.get_mut("web") {
            web.ready = Some(probe.clone());
            web.depends_on.insert("db".into(), Condition::Ready);
        }
        if let Some(db) = new.get_mut("db") {
            db.health = Some(Probe { failures: 3, ..probe });
        }
        let changes = plan(&new, &actual(&old));
        assert_eq!(
            changes,
            vec![
                Change::Update {
                    worker: "db".into(),
                    fields: vec!["health".into()],
                    from_capacity: 1,
                    to_capacity: 1
                },
                Change::Update {
                    worker: "web".into(),
                    fields: vec!["ready".into(), "depends_on".into()],
                    from_capacity: 1,
                    to_capacity: 1
                },
            ]
        );
        let json = serde_json::to_value(&changes).unwrap_or_default();
        assert_eq!(json[1]["action"], "update");
        assert_eq!(json[1]["fields"], serde_json::json!(["ready", "depends_on"]));
    }

    #[test]
    fn identity_changes_restart_and_an_env_file_list_alone_does_not() {
        use crate::config::model::EnvFile;
        use crate::os::identity::{Rlimit, Switch};
        let old: BTreeMap<_, _> = ["user", "group", "umask", "nice", "oom", "nnp", "limits", "ids", "files"]
            .into_iter()
            .map(|n| (n.to_string(), w("x", 1)))
            .collect();
        let mut new = old.clone();
        fn id<'a>(n: &str, new: &'a mut BTreeMap<String, Worker>) -> &'a mut Identity {
            &mut new.get_mut(n).unwrap().identity
        }
        id("user", &mut new).user = Some("app".into());
        id("group", &mut new).group = Some("app".into());
        id("umask", &mut new).umask = Some(0o027);
        id("nice", &mut new).nice = Some(5);
        id("oom", &mut new).oom_score_adj = Some(500);
        id("nnp", &mut new).no_new_privs = true;
        id("limits", &mut new).limits.insert("nofile".into(), Rlimit { soft: 10, hard: 10 });
        // Same names, but the database now gives the user another uid.
        id("ids", &mut new).switch = Some(Switch { uid: 1001, gid: 1001, groups: vec![1001] });
        new.get_mut("files").unwrap().env_file.push(EnvFile { path: "/x/.env".into(), optional: false });
        let p = plan(&new, &actual(&old));
        let fields = |n: &str| -> (bool, Vec<String>) {
            match p.iter().find(|c| c.worker() == n) {
                Some(Change::Restart { fields, .. }) => (true, fields.clone()),
                Some(Change::Update { fields, .. }) => (false, fields.clone()),
                other => panic!("{n}: {other:?}"),
            }
        };
        for (n, key) in [
            ("user", "user"),
            ("group", "group"),
            ("umask", "umask"),
            ("nice", "nice"),
            ("oom", "oom_score_adj"),
            ("nnp", "no_new_privs"),
            ("limits", "limits"),
        ] {
            assert_eq!(fields(n), (true, vec![key.to_string()]), "{n}");
        }
        assert_eq!(fields("ids"), (true, vec!["user".to_string(), "group".to_string()]));
        assert_eq!(fields("files"), (false, vec!["env_file".to_string()]));
    }

    #[test]
    fn a_changed_socket_list_restarts_the_worker() {
        use crate::config::model::{Address, Socket};
        let old: BTreeMap<_, _> = [("web".to_string(), w("x", 1))].into();
        let mut new = old.clone();
        let web = new.get_mut("web").unwrap();
        web.sockets.push(Socket {
            address: Address::Tcp("127.0.0.1:80".parse().unwrap()),
            name: "web".into(),
            mode: None,
        });
        let p = plan(&new, &actual(&old));
        assert!(matches!(&p[..], [Change::Restart { fields, .. }] if fields == &["sockets"]), "{p:?}");
    }

    #[test]
    fn same_config_plans_nothing() {
        let d: BTreeMap<_, _> = [("a".to_string(), w("x", 2)), ("b".into(), w("y", 1))].into();
        assert!(plan(&d, &actual(&d)).is_empty());
    }

    #[test]
    fn add_remove_restart_scale() {
        let old: BTreeMap<_, _> = [
            ("keep".to_string(), w("x", 1)),
            ("gone".into(), w("x", 1)),
            ("cmd".into(), w("x", 1)),
            ("scale".into(), w("x", 1)),
        ]
        .into();
        let mut new = old.clone();
        new.remove("gone");
        new.insert("fresh".into(), w("z", 3));
        new.get_mut("cmd").unwrap().command = vec!["other".into()];
        new.get_mut("scale").unwrap().capacity = 4;
        let p = plan(&new, &actual(&old));
        assert_eq!(
            p,
            [
                Change::Restart {
                    worker: "cmd".into(),
                    fields: vec!["command".into()],
                    from_capacity: 1,
                    to_capacity: 1
                },
                Change::Start { worker: "fresh".into(), capacity: 3 },
                Change::Update {
                    worker: "scale".into(),
                    fields: vec!["capacity".into()],
                    from_capacity: 1,
                    to_capacity: 4
                },
                Change::Stop { worker: "gone".into() },
            ]
        );
    }

    #[test]
    fn jobs_added_removed_and_changed_name_their_fields() {
        use crate::config::types::HumanDuration;
        let job = |trigger: Trigger| Job {
            steps: vec![crate::config::model::Step {
                name: "main".into(),
                command: vec!["true".into()],
                approve: false,
            }],
            flow: false,
            trigger,
            capacity: 1,
            on_overlap: crate::config::model::OnOverlap::Skip,
            timeout: None,
            jitter: HumanDuration::from_secs(0),
            queue_limit: 16,
            catch_up: false,
            retain: 50,
            dir: "/".into(),
            env: Default::default(),
            secret_env: Default::default(),
            env_file: Vec::new(),
            identity: Default::default(),
            stop_signal: crate::config::types::Signal::SIGTERM,
            stop_grace: HumanDuration::from_secs(10),
            depends_on: Default::default(),
        };
        let every = |s| Trigger::Every(HumanDuration::from_secs(s));
        let cron = |c: &str| Trigger::Schedule { cron: c.into(), timezone: None };
        let old: BTreeMap<String, Job> = [
            ("tick".to_string(), job(every(10))),
            ("cron".into(), job(cron("0 * * * *"))),
            ("same".into(), job(Trigger::Manual)),
            ("gone".into(), job(Trigger::Manual)),
            ("kind".into(), job(Trigger::Manual)),
            ("who".into(), job(Trigger::Manual)),
        ]
        .into();
        let mut new = old.clone();
        new.get_mut("who").unwrap().identity.user = Some("app".into());
        new.get_mut("who").unwrap().identity.nice = Some(3);
        new.remove("gone");
        new.insert("nightly".into(), job(cron("0 3 * * *")));
        new.get_mut("tick").unwrap().trigger = every(20);
        new.get_mut("cron").unwrap().trigger = cron("5 * * * *");
        new.get_mut("kind").unwrap().trigger = every(5);
        new.get_mut("kind").unwrap().capacity = 3;
        assert_eq!(
            plan_jobs(&new, &old),
            [
                JobChange::ChangeJob { job: "cron".into(), fields: vec!["schedule".into()] },
                JobChange::ChangeJob { job: "kind".into(), fields: vec!["every".into(), "capacity".into()] },
                JobChange::AddJob { job: "nightly".into(), trigger: "schedule 0 3 * * *".into() },
                JobChange::ChangeJob { job: "tick".into(), fields: vec!["every".into()] },
                JobChange::ChangeJob { job: "who".into(), fields: vec!["user".into(), "nice".into()] },
                JobChange::RemoveJob { job: "gone".into() },
            ]
        );
        assert!(plan_jobs(&old, &old).is_empty());
    }

    #[test]
    fn a_restart_keeps_the_scale_of_a_capacity_change() {
        let old: BTreeMap<_, _> = [("a".to_string(), w("x", 1))].into();
        let mut new = old.clone();
        let a = new.get_mut("a").unwrap();
        a.env.insert("K".into(), "v".into());
        a.capacity = 2;
        assert_eq!(
            plan(&new, &actual(&old)),
            [Change::Restart {
                worker: "a".into(),
                fields: vec!["env".into(), "capacity".into()],
                from_capacity: 1,
                to_capacity: 2
            }]
        );
    }

    #[test]
    fn live_settings_do_not_restart() {
        let old: BTreeMap<_, _> = [("a".to_string(), w("x", 1))].into();
        let mut new = old.clone();
        new.get_mut("a").unwrap().stop_grace = crate::config::types::HumanDuration::from_secs(1);
        assert!(
            matches!(&plan(&new, &actual(&old))[0], Change::Update { fields, .. } if fields == &["stop_grace"])
        );
        new.get_mut("a").unwrap().env.insert("K".into(), "v".into());
        assert!(
            matches!(&plan(&new, &actual(&old))[0], Change::Restart { fields, .. } if fields.contains(&"env".to_string()))
        );
    }
}

#[cfg(test)]
mod properties {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::config::model::{Settings, SpawnMode};
    use crate::config::types::HumanDuration;

    /// A small space of workers, so that equal and different settings both
    /// come up often.
    fn worker() -> impl Strategy<Value = Worker> {
        (0..2u8, 1..4u32, 0..2u8, 0..2u8, 0..2u8).prop_map(|(cmd, capacity, grace, env, restart)| {
            let mut w = Worker::new(
                vec![format!("cmd{cmd}")],
                "/".into(),
                capacity,
                SpawnMode::SameDir,
                Settings::default(),
            );
            w.stop_grace = HumanDuration::from_secs(grace.into());
            if env == 1 {
                w.env.insert("K".into(), "v".into());
            }
            if restart == 1 {
                w.restart = crate::config::model::RestartPolicy::Never;
            }
            w
        })
    }

    fn workers() -> impl Strategy<Value = BTreeMap<String, Worker>> {
        proptest::collection::btree_map(
            prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(String::from),
            worker(),
            0..4,
        )
    }

    /// What the supervisor ends up running after a plan: each worker's
    /// settings and its instance indices.
    fn apply(
        changes: &[Change],
        actual: &BTreeMap<String, Worker>,
        desired: &BTreeMap<String, Worker>,
    ) -> BTreeMap<String, (Worker, BTreeSet<u32>)> {
        let mut state: BTreeMap<String, (Worker, BTreeSet<u32>)> =
            actual.iter().map(|(k, w)| (k.clone(), (w.clone(), (0..w.capacity).collect()))).collect();
        for c in changes {
            let name = c.worker().to_string();
            match c {
                Change::Stop { .. } => {
                    state.remove(&name);
                }
                Change::Start { capacity, .. } => {
                    state.insert(name.clone(), (desired[&name].clone(), (0..*capacity).collect()));
                }
                Change::Restart { .. } | Change::Update { .. } => {
                    let w = desired[&name].clone();
                    let entry = state.get_mut(&name).expect("restart or update of a running worker");
                    // Scale from the top: keep low indices, add or drop high ones.
                    entry.1.retain(|&i| i < w.capacity);
                    entry.1.extend(0..w.capacity);
                    entry.0 = w;
                }
            }
        }
        state
    }

    fn as_actual(m: &BTreeMap<String, Worker>) -> Actual<'_> {
        m.iter().map(|(k, v)| (k.as_str(), v)).collect()
    }

    proptest! {
        #[test]
        fn applying_a_plan_reaches_the_desired_state(actual in workers(), desired in workers()) {
            let changes = plan(&desired, &as_actual(&actual));
            let reached = apply(&changes, &actual, &desired);
            let want: BTreeMap<_, _> =
                desired.iter().map(|(k, w)| (k.clone(), (w.clone(), (0..w.capacity).collect()))).collect();
            prop_assert_eq!(reached, want);
            for c in &changes {
                match c {
                    Change::Restart { fields, .. } => {
                        prop_assert!(fields.iter().any(|f| RESTART_FIELDS.contains(&f.as_str())))
                    }
                    Change::Update { fields, .. } => {
                        prop_assert!(!fields.is_empty());
                        prop_assert!(fields.iter().all(|f| !RESTART_FIELDS.contains(&f.as_str())))
                    }
                    _ => {}
                }
            }
        }

        #[test]
        fn a_config_reconciled_with_itself_plans_nothing(desired in workers()) {
            prop_assert!(plan(&desired, &as_actual(&desired)).is_empty());
        }

        #[test]
        fn unchanged_workers_are_not_touched(actual in workers(), desired in workers()) {
            for c in plan(&desired, &as_actual(&actual)) {
                let name = c.worker();
                prop_assert!(actual.get(name) != desired.get(name));
            }
        }
    }
}
