//! A rolling restart, decided: which instance to replace next, given the
//! instances as they are. One instance at a time is replaced, and the next
//! old one is stopped only once its replacement is ready, so a worker of
//! capacity 2 or more keeps serving throughout; a replacement that never
//! becomes ready holds the rollout where it is (the old instances keep
//! serving) until it does or the config changes again.

use std::collections::BTreeMap;

use super::instance::{Instance, State, Then};

/// What to do with an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// It has no process: start it with the new settings now.
    Deploy(u32),
    /// Stop it, then start it with the new settings.
    Replace(u32),
}

/// Where the rollout stands, for status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Nothing stale.
    Done,
    /// Waiting for the replacement at this index to be ready.
    Waiting(u32),
    /// The replacement at this index failed to become ready: the rollout
    /// holds until it does.
    Stalled(u32, String),
}

/// The next actions of the rollout over `instances`.
pub fn next(instances: &BTreeMap<u32, Instance>) -> (Vec<Action>, Progress) {
    let mut actions: Vec<Action> = instances
        .iter()
        .filter(|(_, i)| {
            i.stale
                && !i.held
                && matches!(i.state, State::Stopped | State::Backoff { .. } | State::Parked { .. })
        })
        .map(|(k, _)| Action::Deploy(*k))
        .collect();
    let replacing = instances.iter().find(|(_, i)| {
        matches!(i.state, State::Stopping { then: Then::Start }) || (i.replacing && !i.is_ready())
    });
    if let Some((&k, i)) = replacing {
        let progress = match &i.state {
            State::Backoff { .. } | State::Parked { .. } => Progress::Stalled(
                k,
                i.error.clone().unwrap_or_else(|| match &i.state {
                    State::Parked { reason } => reason.clone(),
                    _ => "it exited before it was ready".into(),
                }),
            ),
            _ => Progress::Waiting(k),
        };
        // A replacement that stalled holds the old ones where they are.
        return (actions, progress);
    }
    let next = instances.iter().find(|(k, i)| {
        i.stale
            && matches!(i.state, State::Starting | State::Ready)
            && !actions.contains(&Action::Deploy(**k))
    });
    match next {
        Some((&k, _)) => {
            actions.push(Action::Replace(k));
            (actions, Progress::Waiting(k))
        }
        None => (actions, Progress::Done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(state: State, stale: bool) -> Instance {
        Instance { state, stale, pid: Some(1), ..Instance::new() }
    }

    #[test]
    fn replaces_one_at_a_time_and_waits_for_readiness() {
        let mut m: BTreeMap<u32, Instance> = (0..3).map(|k| (k, inst(State::Ready, true))).collect();
        assert_eq!(next(&m), (vec![Action::Replace(0)], Progress::Waiting(0)));
        m.get_mut(&0).unwrap().state = State::Stopping { then: Then::Start };
        assert_eq!(next(&m), (vec![], Progress::Waiting(0)));
        let r = m.get_mut(&0).unwrap();
        r.state = State::Starting;
        r.stale = false;
        r.replacing = true;
        assert_eq!(next(&m), (vec![], Progress::Waiting(0)), "spawned is not ready");
        m.get_mut(&0).unwrap().state = State::Ready;
        m.get_mut(&0).unwrap().replacing = false;
        assert_eq!(next(&m), (vec![Action::Replace(1)], Progress::Waiting(1)));
    }

    #[test]
    fn a_replacement_that_never_gets_ready_stalls_the_rollout() {
        let mut m: BTreeMap<u32, Instance> = (0..2).map(|k| (k, inst(State::Ready, true))).collect();
        let r = m.get_mut(&0).unwrap();
        r.state = State::Backoff { until: std::time::SystemTime::now() };
        r.stale = false;
        r.replacing = true;
        r.error = Some("not ready within 5s".into());
        assert_eq!(next(&m), (vec![], Progress::Stalled(0, "not ready within 5s".into())));
    }

    #[test]
    fn idle_stale_instances_deploy_at_once_but_held_ones_stay() {
        let mut m = BTreeMap::new();
        m.insert(0, inst(State::Stopped, true));
        m.insert(1, inst(State::Parked { reason: "crash loop".into() }, true));
        m.insert(2, Instance { held: true, ..inst(State::Stopped, true) });
        m.insert(3, inst(State::Ready, true));
        assert_eq!(
            next(&m),
            (vec![Action::Deploy(0), Action::Deploy(1), Action::Replace(3)], Progress::Waiting(3))
        );
        m.values_mut().for_each(|i| i.stale = false);
        assert_eq!(next(&m), (vec![], Progress::Done));
    }
}
