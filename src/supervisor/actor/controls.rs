//! The operator's controls of single instances: `drover stop`, `start`
//! and `restart` with `NAME[:INDEX]`. A hand stop holds an instance: the
//! restart policy, a rollout and a reload leave it stopped until `start`
//! or `restart` releases it. The hold lives only in this supervisor: the
//! file stays the desired state across a restart of drover.

use std::collections::{BTreeMap, BTreeSet};

use super::Supervisor;
use crate::supervisor::protocol::{Affected, InstanceAction, Response, Target};
use crate::supervisor::workers::instance::{Input, Why};

/// The instances `targets` name, in order and without repeats, checked
/// against the workers there are (name → capacity). An unknown name or an
/// index past the capacity is an error that names what would be valid.
pub fn resolve(targets: &[Target], workers: &BTreeMap<&str, u32>) -> Result<Vec<(String, u32)>, String> {
    if targets.is_empty() {
        return Err("name at least one worker, as in web or web:0".into());
    }
    let mut out: Vec<(String, u32)> = Vec::new();
    // A request may name thousands of targets: no quadratic look-ups, and
    // a worker named whole twice is expanded once.
    let mut seen: BTreeSet<(&str, u32)> = BTreeSet::new();
    let mut whole: BTreeSet<&str> = BTreeSet::new();
    for t in targets {
        let Some(&cap) = workers.get(t.worker.as_str()) else {
            let known: Vec<&str> = workers.keys().copied().collect();
            return Err(if known.is_empty() {
                format!("no worker named {:?}: the config has no workers", t.worker)
            } else {
                format!("no worker named {:?}; the workers are {}", t.worker, known.join(", "))
            });
        };
        let indices: Vec<u32> = match t.index {
            None if !whole.insert(t.worker.as_str()) => continue,
            None => (0..cap).collect(),
            Some(i) if i < cap => vec![i],
            Some(_) => return Err(format!("no instance {t}: {}", valid_instances(&t.worker, cap))),
        };
        for i in indices {
            if seen.insert((t.worker.as_str(), i)) {
                out.push((t.worker.clone(), i));
            }
        }
    }
    Ok(out)
}

/// "web has capacity 2: its instances are web:0 and web:1", for errors.
fn valid_instances(worker: &str, cap: u32) -> String {
    match cap {
        0 => format!("{worker} has capacity 0: it has no instances"),
        1 => format!("{worker} has capacity 1: its one instance is {worker}:0"),
        2 => format!("{worker} has capacity 2: its instances are {worker}:0 and {worker}:1"),
        n => format!("{worker} has capacity {n}: its instances are {worker}:0 to {worker}:{}", n - 1),
    }
}

impl Supervisor {
    /// `drover stop|start|restart NAME[:INDEX]…`.
    pub(super) fn on_instances(&mut self, action: InstanceAction, targets: &[Target]) -> Response {
        if self.shutting_down {
            return Response::Error { message: "the supervisor is stopping".into() };
        }
        let workers: BTreeMap<&str, u32> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.removed)
            .map(|(n, w)| (n.as_str(), w.spec.capacity))
            .collect();
        let list = match resolve(targets, &workers) {
            Ok(list) => list,
            Err(message) => return Response::Error { message },
        };
        let instances: Vec<Affected> = list
            .iter()
            .filter_map(|(n, i)| {
                let inst = self.workers.get(n)?.instances.get(i)?;
                Some(Affected {
                    worker: n.clone(),
                    index: *i,
                    pid: inst.pid,
                    deploys: inst.deploys,
                    started_at: inst.started_at.as_ref().map(|s| s.text.clone()),
                })
            })
            .collect();
        let verb = match action {
            InstanceAction::Stop => {
                list.iter().for_each(|(n, i)| self.hold(n, *i));
                "stopping"
            }
            InstanceAction::Start => {
                list.iter().for_each(|(n, i)| self.release(n, *i));
                "starting"
            }
            InstanceAction::Restart => {
                // A restart asked for runs what PATH finds now.
                crate::supervisor::child::lookups().forget();
                self.restart_instances(&list);
                "restarting"
            }
        };
        self.dirty = true;
        let names: Vec<String> = list.iter().map(|(n, i)| format!("{n}:{i}")).collect();
        let message = if names.is_empty() {
            format!("{verb} nothing: capacity 0 has no instances")
        } else {
            format!("{verb} {}", names.join(", "))
        };
        Response::Instances { message, instances }
    }

    /// Stops an instance by hand, by the normal stop path, and keeps it stopped.
    fn hold(&mut self, name: &str, index: u32) {
        self.drive(name, index, Input::Hold);
    }

    /// Lets a held (or policy-stopped, or parked) instance run again; one
    /// in backoff starts now, as `systemctl start` would.
    fn release(&mut self, name: &str, index: u32) {
        self.drive(name, index, Input::Start(Why::Release));
    }

    /// Replaces these instances one at a time per worker, as a rollout
    /// does (the next only once the last is ready); held or stopped ones
    /// are released and start at once.
    fn restart_instances(&mut self, list: &[(String, u32)]) {
        let mut names: Vec<&str> = Vec::new();
        for (n, i) in list {
            if let Some(w) = self.workers.get_mut(n)
                && let Some(inst) = w.instances.get_mut(i)
            {
                inst.held = false;
                inst.stale = true;
                w.rolling = true;
            }
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
        for name in names {
            self.continue_rollout(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Target {
        s.parse().unwrap()
    }

    fn workers() -> BTreeMap<&'static str, u32> {
        [("api", 1), ("web", 2)].into()
    }

    #[test]
    fn a_name_is_every_instance_and_an_index_one() {
        let got = resolve(&[t("web"), t("api:0"), t("web:1")], &workers()).unwrap();
        assert_eq!(got, [("web".into(), 0), ("web".into(), 1), ("api".into(), 0)]);
        let many = vec![t("web"); 5000];
        assert_eq!(resolve(&many, &workers()).unwrap().len(), 2, "repeats count once");
    }

    #[test]
    fn an_index_past_the_capacity_names_the_valid_ones() {
        let e = resolve(&[t("web:7")], &workers()).unwrap_err();
        assert_eq!(e, "no instance web:7: web has capacity 2: its instances are web:0 and web:1");
        let e = resolve(&[t("api:1")], &workers()).unwrap_err();
        assert!(e.contains("its one instance is api:0"), "{e}");
        let e = resolve(&[t("big:3")], &[("big", 3)].into()).unwrap_err();
        assert!(e.contains("big:0 to big:2"), "{e}");
    }

    #[test]
    fn an_unknown_name_lists_the_workers() {
        let e = resolve(&[t("web"), t("nope")], &workers()).unwrap_err();
        assert_eq!(e, "no worker named \"nope\"; the workers are api, web");
        assert!(resolve(&[t("x")], &BTreeMap::new()).unwrap_err().contains("has no workers"));
        assert!(resolve(&[], &workers()).is_err());
    }

    #[test]
    fn targets_parse_as_name_or_name_colon_index() {
        assert_eq!(t("web"), Target { worker: "web".into(), index: None });
        assert_eq!(t("web:3"), Target { worker: "web".into(), index: Some(3) });
        assert_eq!(t("web:3").to_string(), "web:3");
        for bad in ["web:", "web:x", "web:-1", ":1", ""] {
            assert!(bad.parse::<Target>().is_err(), "{bad:?}");
        }
    }
}
