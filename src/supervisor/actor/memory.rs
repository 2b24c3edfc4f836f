//! `max_memory` without a memory controller (with one, it is the cgroup's
//! memory.max and the kernel enforces it): the resident memory of every
//! instance of a worker that sets it, its cgroup's or its process group's,
//! sampled every [`SAMPLE_EVERY`] in one pass over /proc on a blocking
//! thread. One timer serves all of them and
//! it is armed only while such an instance runs: a supervisor without
//! `max_memory` never reads a process's memory. The state machine decides
//! what a sample means (`Input::Memory`).

use std::time::Duration;

use super::{Event, Supervisor, TimerKey};
use crate::supervisor::workers::instance::{Input, Instance, State};

/// How often the memory of instances with `max_memory` is read.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// The memory of one instance's group at a sample.
#[derive(Debug)]
pub struct Sample {
    pub worker: String,
    pub index: u32,
    /// The incarnation sampled: a sample of an earlier one is dropped.
    pub incarnation: u64,
    pub rss_bytes: u64,
}

/// Whether an instance of a worker with `max_memory` is sampled: it runs.
fn sampled(i: &Instance) -> bool {
    matches!(i.state, State::Starting | State::Ready) && i.pid.is_some() && i.pgid.is_some()
}

/// An instance to sample: who it is and where its processes are.
struct Sampled {
    worker: String,
    index: u32,
    incarnation: u64,
    pgid: i32,
    cgroup: Option<std::sync::Arc<std::path::Path>>,
}

impl Supervisor {
    /// Arms the sampling timer if an instance needs it and neither it nor
    /// a sample is pending.
    pub(super) fn arm_memory_sampling(&mut self) {
        if self.memory_sample_pending || self.timers.is_armed(&TimerKey::MemorySample) {
            return;
        }
        // Called after every spawn: a look, not a list.
        let due = !self.containment.memory_controller()
            && self
                .workers
                .values()
                .any(|w| w.spec.max_memory.is_some() && w.instances.values().any(|i| sampled(i)));
        if due {
            self.set_timer(TimerKey::MemorySample, SAMPLE_EVERY);
        }
    }

    /// The instances whose memory is sampled: running, of a worker with
    /// `max_memory` that no memory.max enforces.
    fn sampled_instances(&self) -> Vec<Sampled> {
        if self.containment.memory_controller() {
            return vec![];
        }
        let mut out = vec![];
        for (name, w) in self.workers.iter().filter(|(_, w)| w.spec.max_memory.is_some()) {
            for (index, inst) in &w.instances {
                if sampled(inst)
                    && let Some(pgid) = inst.pgid
                {
                    out.push(Sampled {
                        worker: name.clone(),
                        index: *index,
                        incarnation: inst.incarnation,
                        pgid,
                        cgroup: inst.cgroup.clone(),
                    });
                }
            }
        }
        out
    }

    /// The timer fired: read them all off the loop.
    pub(super) fn on_memory_timer(&mut self) {
        let wanted = self.sampled_instances();
        if wanted.is_empty() {
            return;
        }
        self.memory_sample_pending = true;
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            // A cgroup holds what left the process group too; the groups
            // are read in one pass over /proc.
            let pgids: Vec<i32> = wanted.iter().filter(|w| w.cgroup.is_none()).map(|w| w.pgid).collect();
            let by_group = crate::os::usage::of_groups(&pgids);
            let samples = wanted
                .into_iter()
                .map(|w| {
                    let usage = match &w.cgroup {
                        Some(dir) => crate::os::usage::of_cgroup(dir),
                        None => by_group.get(&w.pgid).copied(),
                    };
                    Sample {
                        worker: w.worker,
                        index: w.index,
                        incarnation: w.incarnation,
                        rss_bytes: usage.map_or(0, |u| u.rss_bytes),
                    }
                })
                .collect();
            let _ = tx.send(Event::MemorySampled(samples));
        });
    }

    pub(super) fn on_memory_sampled(&mut self, samples: Vec<Sample>) {
        self.memory_sample_pending = false;
        for s in samples {
            let current = self.instance(&s.worker, s.index).is_some_and(|i| i.incarnation == s.incarnation);
            if current {
                self.drive(&s.worker, s.index, Input::Memory { rss_bytes: s.rss_bytes });
            }
        }
        self.arm_memory_sampling();
    }
}
