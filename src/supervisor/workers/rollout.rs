//! A rolling restart, decided: which instance to replace next, given the
//! instances as they are. One instance at a time is replaced, and the next
//! old one is stopped only once its replacement is ready, so a worker of
//! capacity 2 or more keeps serving throughout; a replacement that never
//! becomes ready holds the rollout where it is (the old instances keep
//! serving) until it does or the config changes again.
//!
//! A worker with sockets surges instead, at any capacity: the replacement
//! of slot k starts beside the old instance (under the key [`SURGE`]),
//! both accepting on the same sockets; once it is ready the two swap keys
//! and the old one, now under [`SURGE`], is retired.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use super::instance::{Instance, State, Then};

/// The key of the one surge instance a worker may have at a time.
pub const SURGE: u32 = u32::MAX;

/// What to do with an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// It has no process: start it with the new settings now.
    Deploy(u32),
    /// Stop it, then start it with the new settings.
    Replace(u32),
    /// Start a replacement of slot k beside it, under [`SURGE`].
    Surge(u32),
    /// The surge instance is ready: it takes slot k, whose old instance
    /// moves to [`SURGE`] and is retired.
    Promote(u32),
    /// Retire the surge instance: its slot needs it no more (the slot was
    /// stopped, scaled away or restarted on its own), or it is stale.
    DropSurge,
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

/// A replacement (at `k`) that failed to become ready, and why.
fn stalled(k: u32, i: &Instance) -> Progress {
    Progress::Stalled(
        k,
        i.error.clone().unwrap_or_else(|| match &i.state {
            State::Parked { reason } => reason.clone(),
            _ => "it exited before it was ready".into(),
        }),
    )
}

/// Whether the instance runs (or is being spawned) and is not on its way
/// out.
fn live(i: &Instance) -> bool {
    matches!(i.state, State::Starting | State::Ready)
}

/// Whether an instance gives a rollout nothing to do or wait for: not
/// stale, no replacement on its way to ready. A worker whose instances
/// all are, and that has no surge instance, has nothing to roll out.
pub fn settled(i: &Instance) -> bool {
    let replacing =
        (i.replacing && !i.is_ready()) || matches!(i.state, State::Stopping { then: Then::Start });
    !i.stale && !replacing
}

/// The next actions of the rollout over `instances`; `surge` for a worker
/// with sockets.
pub fn next<I: Borrow<Instance>>(instances: &BTreeMap<u32, I>, surge: bool) -> (Vec<Action>, Progress) {
    // The common case, after every restart: nothing to roll out. Told
    // without the view below, which costs an allocation per instance.
    if !instances.contains_key(&SURGE) && instances.values().all(|i| settled(i.borrow())) {
        return (Vec::new(), Progress::Done);
    }
    let view: BTreeMap<u32, &Instance> = instances.iter().map(|(k, i)| (*k, i.borrow())).collect();
    next_in(&view, surge)
}

fn next_in(instances: &BTreeMap<u32, &Instance>, surge: bool) -> (Vec<Action>, Progress) {
    let mut actions: Vec<Action> = instances
        .iter()
        .filter(|(k, i)| {
            **k != SURGE
                && i.stale
                && !i.held
                && matches!(i.state, State::Stopped | State::Backoff { .. } | State::Parked { .. })
        })
        .map(|(k, _)| Action::Deploy(*k))
        .collect();
    if surge {
        return next_surge(instances, actions);
    }
    let replacing = instances.iter().find(|(_, i)| {
        matches!(i.state, State::Stopping { then: Then::Start }) || (i.replacing && !i.is_ready())
    });
    if let Some((&k, i)) = replacing {
        let progress = match &i.state {
            State::Backoff { .. } | State::Parked { .. } => stalled(k, i),
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

fn next_surge(instances: &BTreeMap<u32, &Instance>, mut actions: Vec<Action>) -> (Vec<Action>, Progress) {
    if let Some(s) = instances.get(&SURGE) {
        let Some(k) = s.surge_for else { return (actions, Progress::Done) };
        // The old instance, swapped out: the next waits until it is gone.
        if matches!(s.state, State::Stopping { then: Then::Retire }) {
            return (actions, Progress::Waiting(k));
        }
        let slot_wants_it = instances
            .get(&k)
            .is_some_and(|o| o.stale && !o.held && live(o) && !matches!(o.state, State::Stopping { .. }));
        if s.stale || !slot_wants_it {
            actions.push(Action::DropSurge);
            return (actions, Progress::Waiting(k));
        }
        let progress = match &s.state {
            State::Ready => {
                actions.push(Action::Promote(k));
                Progress::Waiting(k)
            }
            State::Backoff { .. } | State::Parked { .. } => stalled(k, s),
            _ => Progress::Waiting(k),
        };
        return (actions, progress);
    }
    let next = instances.iter().find(|(k, i)| **k != SURGE && i.stale && !i.held && live(i));
    match next {
        Some((&k, _)) => {
            actions.push(Action::Surge(k));
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
    fn the_shortcut_for_nothing_to_roll_out_answers_as_the_full_look_does() {
        let states = [
            State::Stopped,
            State::Starting,
            State::Ready,
            State::Stopping { then: Then::Start },
            State::Stopping { then: Then::Retire },
            State::Backoff { until: std::time::SystemTime::now() },
            State::Parked { reason: "crash loop".into() },
        ];
        let kinds: Vec<Instance> = states
            .iter()
            .flat_map(|st| {
                (0..8).map(move |bits| Instance {
                    stale: bits & 1 != 0,
                    replacing: bits & 2 != 0,
                    held: bits & 4 != 0,
                    ..inst(st.clone(), false)
                })
            })
            .collect();
        for a in &kinds {
            for b in &kinds {
                for surge in [false, true] {
                    let m: BTreeMap<u32, &Instance> = [(0, a), (1, b)].into_iter().collect();
                    assert_eq!(next(&m, surge), next_in(&m, surge), "{a:?} {b:?} surge {surge}");
                }
            }
        }
    }

    #[test]
    fn replaces_one_at_a_time_and_waits_for_readiness() {
        let mut m: BTreeMap<u32, Instance> = (0..3).map(|k| (k, inst(State::Ready, true))).collect();
        assert_eq!(next(&m, false), (vec![Action::Replace(0)], Progress::Waiting(0)));
        m.get_mut(&0).unwrap().state = State::Stopping { then: Then::Start };
        assert_eq!(next(&m, false), (vec![], Progress::Waiting(0)));
        let r = m.get_mut(&0).unwrap();
        r.state = State::Starting;
        r.stale = false;
        r.replacing = true;
        assert_eq!(next(&m, false), (vec![], Progress::Waiting(0)), "spawned is not ready");
        m.get_mut(&0).unwrap().state = State::Ready;
        m.get_mut(&0).unwrap().replacing = false;
        assert_eq!(next(&m, false), (vec![Action::Replace(1)], Progress::Waiting(1)));
    }

    #[test]
    fn a_replacement_that_never_gets_ready_stalls_the_rollout() {
        let mut m: BTreeMap<u32, Instance> = (0..2).map(|k| (k, inst(State::Ready, true))).collect();
        let r = m.get_mut(&0).unwrap();
        r.state = State::Backoff { until: std::time::SystemTime::now() };
        r.stale = false;
        r.replacing = true;
        r.error = Some("not ready within 5s".into());
        assert_eq!(next(&m, false), (vec![], Progress::Stalled(0, "not ready within 5s".into())));
    }

    #[test]
    fn idle_stale_instances_deploy_at_once_but_held_ones_stay() {
        let mut m = BTreeMap::new();
        m.insert(0, inst(State::Stopped, true));
        m.insert(1, inst(State::Parked { reason: "crash loop".into() }, true));
        m.insert(2, Instance { held: true, ..inst(State::Stopped, true) });
        m.insert(3, inst(State::Ready, true));
        assert_eq!(
            next(&m, false),
            (vec![Action::Deploy(0), Action::Deploy(1), Action::Replace(3)], Progress::Waiting(3))
        );
        m.values_mut().for_each(|i| i.stale = false);
        assert_eq!(next(&m, false), (vec![], Progress::Done));
    }

    #[test]
    fn with_sockets_a_replacement_starts_beside_the_old_one_and_takes_its_slot_once_ready() {
        let mut m: BTreeMap<u32, Instance> = (0..1).map(|k| (k, inst(State::Ready, true))).collect();
        assert_eq!(next(&m, true), (vec![Action::Surge(0)], Progress::Waiting(0)));
        let surge =
            Instance { state: State::Starting, surge_for: Some(0), replacing: true, ..Instance::new() };
        m.insert(SURGE, surge);
        assert_eq!(next(&m, true), (vec![], Progress::Waiting(0)), "not ready: the old one serves on");
        m.get_mut(&SURGE).unwrap().state = State::Backoff { until: std::time::SystemTime::now() };
        m.get_mut(&SURGE).unwrap().error = Some("exit 1".into());
        assert_eq!(next(&m, true), (vec![], Progress::Stalled(0, "exit 1".into())));
        m.get_mut(&SURGE).unwrap().state = State::Ready;
        assert_eq!(next(&m, true), (vec![Action::Promote(0)], Progress::Waiting(0)));
        // Swapped: the old one retires under SURGE, and the rollout waits.
        let old = m.remove(&0).unwrap();
        let new = m.remove(&SURGE).unwrap();
        m.insert(0, Instance { surge_for: None, ..new });
        m.insert(
            SURGE,
            Instance { state: State::Stopping { then: Then::Retire }, surge_for: Some(0), ..old },
        );
        assert_eq!(next(&m, true), (vec![], Progress::Waiting(0)));
        m.remove(&SURGE);
        assert_eq!(next(&m, true), (vec![], Progress::Done));
    }

    #[test]
    fn a_surge_its_slot_no_longer_wants_or_that_went_stale_is_dropped() {
        let mut m: BTreeMap<u32, Instance> = BTreeMap::new();
        m.insert(0, Instance { held: true, ..inst(State::Stopping { then: Then::Stop }, true) });
        m.insert(SURGE, Instance { state: State::Ready, surge_for: Some(0), ..Instance::new() });
        assert_eq!(next(&m, true), (vec![Action::DropSurge], Progress::Waiting(0)), "its slot was stopped");
        m.insert(0, inst(State::Ready, true));
        m.get_mut(&SURGE).unwrap().stale = true;
        assert_eq!(
            next(&m, true),
            (vec![Action::DropSurge], Progress::Waiting(0)),
            "the config changed again"
        );
        m.get_mut(&SURGE).unwrap().stale = false;
        m.get_mut(&0).unwrap().stale = false;
        assert_eq!(next(&m, true), (vec![Action::DropSurge], Progress::Waiting(0)), "restarted on its own");
    }
}
