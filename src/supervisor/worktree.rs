//! `spawn_mode = "worktree"`: each instance runs in its own `git worktree`
//! of the worker's `dir`, under state_dir/worktrees.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::os::reaper::Reaper;

fn git(reaper: &Reaper, dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = reaper
        .run_to_end(Command::new("git").arg("-C").arg(dir).args(args))
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Makes (or re-makes) the worktree of instance `index` of `worker`.
pub fn create(
    reaper: &Reaper,
    dir: &Path,
    state_dir: &Path,
    worker: &str,
    index: u32,
) -> Result<PathBuf, String> {
    git(reaper, dir, &["rev-parse", "--git-dir"]).map_err(|_| {
        format!("spawn_mode = \"worktree\" needs a git repository, and {} is not in one", dir.display())
    })?;
    let path = state_dir.join("worktrees").join(format!("{worker}-{index}"));
    if path.exists() {
        // Left over from an earlier run: start from a clean tree.
        remove(reaper, dir, &path);
    }
    let _ = git(reaper, dir, &["worktree", "prune"]);
    let p = path.to_string_lossy();
    git(reaper, dir, &["worktree", "add", "--detach", "--force", &p, "HEAD"])
        .map_err(|e| format!("cannot create the worktree {p}: {e}"))?;
    Ok(path)
}

/// Removes a worktree made by [`create`].
pub fn remove(reaper: &Reaper, dir: &Path, path: &Path) {
    let p = path.to_string_lossy();
    if let Err(e) = git(reaper, dir, &["worktree", "remove", "--force", &p]) {
        tracing::warn!(worktree = %p, error = %e, "cannot remove worktree");
        let _ = std::fs::remove_dir_all(path);
        let _ = git(reaper, dir, &["worktree", "prune"]);
    }
}
