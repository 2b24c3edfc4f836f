//! From desired config and actual state to a plan: which workers start,
//! stop, restart or scale. Pure: no processes, no clocks. The supervisor
//! applies a plan; `drover plan` prints one.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::model::Worker;

/// What the supervisor runs now, as far as planning is concerned: each
/// worker's applied settings.
pub type Actual<'a> = BTreeMap<&'a str, &'a Worker>;

/// The settings whose change needs new processes; everything else
/// (backoff, crash_loop, stop_grace, restart, permanent_exit_codes,
/// capacity) applies to the running processes as they are.
pub const RESTART_FIELDS: &[&str] = &["command", "dir", "env", "spawn_mode", "stop_signal"];

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Change {
    /// A new worker: start `capacity` instances.
    Start { worker: String, capacity: u32 },
    /// A removed worker: stop every instance.
    Stop { worker: String },
    /// Launch settings changed: replace instances one at a time.
    Restart { worker: String, fields: Vec<&'static str> },
    /// Only live settings (maybe capacity) changed: running processes stay.
    Update { worker: String, fields: Vec<&'static str>, from_capacity: u32, to_capacity: u32 },
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
pub fn changed_fields(a: &Worker, b: &Worker) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |name: &'static str, differs: bool| {
        if differs {
            out.push(name);
        }
    };
    check("command", a.command != b.command);
    check("dir", a.dir != b.dir);
    check("env", a.env != b.env);
    check("spawn_mode", a.spawn_mode != b.spawn_mode);
    check("stop_signal", a.stop_signal != b.stop_signal);
    check("capacity", a.capacity != b.capacity);
    check("restart", a.restart != b.restart);
    check("backoff", a.backoff != b.backoff);
    check("crash_loop", a.crash_loop != b.crash_loop);
    check("permanent_exit_codes", a.permanent_exit_codes != b.permanent_exit_codes);
    check("stop_grace", a.stop_grace != b.stop_grace);
    out
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
                if fields.iter().any(|f| RESTART_FIELDS.contains(f)) {
                    changes.push(Change::Restart { worker: name.clone(), fields });
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
                Change::Restart { worker: "cmd".into(), fields: vec!["command"] },
                Change::Start { worker: "fresh".into(), capacity: 3 },
                Change::Update {
                    worker: "scale".into(),
                    fields: vec!["capacity"],
                    from_capacity: 1,
                    to_capacity: 4
                },
                Change::Stop { worker: "gone".into() },
            ]
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
            matches!(&plan(&new, &actual(&old))[0], Change::Restart { fields, .. } if fields.contains(&"env"))
        );
    }
}
