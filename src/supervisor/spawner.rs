//! The threads that start instances and run steps: two, made at the first
//! spawn and kept for drover's life. A child's parent is the thread that
//! spawned it, and a thread that ends hands its children to drover's main
//! thread, where the orphans drover adopts as a subreaper are looked for
//! after each exit (process-group mode). Spawned from tokio's blocking
//! threads, which end when idle, every instance ended up there, and each
//! exit read them all: at 1000 instances, most of a restart. Two, because
//! a spawn holds one of the two sets of descriptor slots (`os::spawn`)
//! from its clone to its exec.
//!
//! Idle, they sleep on a condition variable; a job wakes one.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

/// Threads, at most (see the module).
const THREADS: usize = 2;

/// Each thread's stack, reserved rather than resident: a spawn's own work
/// needs little (the child runs on a stack of its own), but a user's
/// lookup through NSS modules may need more.
const STACK_BYTES: usize = 1 << 20;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Pool {
    queue: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(Pool::default)
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn work(&'static self) {
        let mut q = self.lock();
        loop {
            match q.jobs.pop_front() {
                Some(job) => {
                    drop(q);
                    job();
                    q = self.lock();
                }
                None => {
                    q.idle += 1;
                    q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                    q.idle -= 1;
                }
            }
        }
    }
}

/// Runs `job` on a spawner thread, or (when none can be made) on one of
/// tokio's blocking threads: a spawn is never lost.
pub fn run(job: impl FnOnce() + Send + 'static) {
    let pool = pool();
    let mut q = pool.lock();
    q.jobs.push_back(Box::new(job));
    if q.idle > 0 {
        pool.wake.notify_one();
        return;
    }
    if q.threads >= THREADS {
        // A busy thread takes it next.
        return;
    }
    q.threads += 1;
    drop(q);
    let made =
        std::thread::Builder::new().name("spawner".into()).stack_size(STACK_BYTES).spawn(|| pool.work());
    if let Err(e) = made {
        let mut q = pool.lock();
        q.threads -= 1;
        if q.threads == 0 {
            // No thread to take the queue: tokio's take it, job by job.
            tracing::warn!(error = %e, "cannot make a spawner thread; spawns go to the blocking threads");
            let jobs: Vec<Job> = q.jobs.drain(..).collect();
            drop(q);
            for job in jobs {
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => drop(rt.spawn_blocking(job)),
                    Err(_) => job(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_at_most_two_threads_of_their_own_that_stay() {
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..20 {
            let tx = tx.clone();
            run(move || {
                let me = std::thread::current();
                tx.send((i, me.name().map(str::to_owned), me.id())).expect("the test listens");
            });
        }
        let wait = std::time::Duration::from_secs(10);
        let got: Vec<_> = (0..20).map(|_| rx.recv_timeout(wait).expect("every job runs")).collect();
        let mut seen: Vec<_> = got.iter().map(|(i, _, _)| *i).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..20).collect::<Vec<_>>());
        assert!(got.iter().all(|(_, name, _)| name.as_deref() == Some("spawner")), "{got:?}");
        // Idle now: a later job runs on a thread made before, not a third.
        run(move || {
            let me = std::thread::current();
            tx.send((99, me.name().map(str::to_owned), me.id())).expect("the test listens")
        });
        let last = rx.recv_timeout(wait).expect("the last job runs");
        let threads: std::collections::HashSet<_> = got.iter().chain([&last]).map(|(_, _, id)| *id).collect();
        assert!(threads.len() <= THREADS, "{threads:?}");
        assert_eq!(last.1.as_deref(), Some("spawner"));
    }
}
