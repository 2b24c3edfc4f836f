//! The running supervisor: the actor that owns all state, the pure
//! decisions it takes (`policy`, `reconcile`), and its outside world
//! (control socket, logs, worktrees, start-up and recovery).

pub mod actor;
pub mod admission;
pub mod child;
pub mod clock;
pub mod containment;
pub mod control;
pub mod events;
pub mod graph;
pub mod jobs;
pub mod live;
pub mod logs;
pub mod metrics;
pub mod own_log;
pub mod policy;
pub mod probes;
pub mod protocol;
pub mod reconcile;
pub mod run_ledger;
pub mod runtime;
pub mod spawner;
pub mod state_file;
pub mod timers;
pub mod watch;
pub mod workers;
pub mod worktree;
