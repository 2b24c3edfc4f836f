//! Thin layers over the OS: processes and their groups, the reaper,
//! files written atomically, the lock.

pub mod cgroup;
pub mod fsutil;
pub mod groups;
pub mod identity;
pub mod inotify;
pub mod listen;
pub mod memory;
pub mod proc;
pub mod reaper;
pub mod spawn;
pub mod usage;
