//! What a tick, trigger or resume of a job does, given what is active:
//! start a run, queue it, replace the oldest active one, or skip. Pure.

use crate::config::model::OnOverlap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// A slot is free: claim and start the new run now.
    Start,
    /// At capacity: the new run waits for a slot.
    Queue,
    /// At capacity: the new run waits while the oldest active run is
    /// stopped (and earlier waiting replacements are cancelled).
    Replace,
    /// Nothing is recorded but the skip; the reason.
    Skip(String),
}

/// `active`: the job's runs holding a slot (a process, or one being
/// spawned or stopped); `queued`: its runs waiting for one.
pub fn admit(
    job: &str,
    active: usize,
    queued: usize,
    capacity: u32,
    on_overlap: OnOverlap,
    queue_limit: u32,
) -> Admission {
    if active < capacity as usize {
        return Admission::Start;
    }
    match on_overlap {
        OnOverlap::Skip => Admission::Skip(format!("skipped: {job} is at capacity ({active} active)")),
        OnOverlap::Queue if queued >= queue_limit as usize => {
            Admission::Skip(format!("skipped: the queue of {job} is full ({queued} waiting)"))
        }
        OnOverlap::Queue => Admission::Queue,
        OnOverlap::Replace => Admission::Replace,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_slot_starts_whatever_the_overlap_rule() {
        for rule in [OnOverlap::Skip, OnOverlap::Queue, OnOverlap::Replace] {
            assert_eq!(admit("j", 1, 5, 2, rule, 0), Admission::Start);
        }
    }

    #[test]
    fn at_capacity_each_rule_decides() {
        assert_eq!(
            admit("j", 1, 0, 1, OnOverlap::Skip, 10),
            Admission::Skip("skipped: j is at capacity (1 active)".into())
        );
        assert_eq!(admit("j", 1, 3, 1, OnOverlap::Queue, 10), Admission::Queue);
        assert_eq!(
            admit("j", 1, 10, 1, OnOverlap::Queue, 10),
            Admission::Skip("skipped: the queue of j is full (10 waiting)".into())
        );
        // Replace never skips: the newest trigger always wins.
        assert_eq!(admit("j", 3, 100, 1, OnOverlap::Replace, 0), Admission::Replace);
    }
}
