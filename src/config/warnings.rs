//! What `check` warns about without failing: things that are valid config
//! but will most likely not work on this machine, such as a command whose
//! program is not on PATH.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::diagnostic::{Diagnostic, Lines, Origin, display_key, span_of};
use super::load::Loaded;

/// The warnings about a loaded config.
pub fn warnings(loaded: &Loaded) -> Vec<Diagnostic> {
    let doc = toml_edit::Document::parse(loaded.text.clone()).ok();
    let lines = Lines::new(&loaded.text);
    let mut out = Vec::new();
    let mut warn = |key: Vec<String>, message: String| {
        let pos = doc.as_ref().and_then(|d| span_of(d, &key, false)).map(|s| lines.line_col(s.start));
        let (line, column) = pos.unzip();
        out.push(Diagnostic {
            origin: Origin::File { file: loaded.path.clone(), line, column },
            key: display_key(&key),
            message,
        });
    };
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let c = &loaded.config;
    for (name, w) in &c.workers {
        let key = ["workers", name, "command", "0"].map(String::from).to_vec();
        if let Some(msg) = program_problem(
            &w.command,
            &w.dir,
            w.env.get("PATH").map(Into::into).as_ref().unwrap_or(&path_var),
        ) {
            warn(key, msg);
        }
    }
    for (name, j) in &c.jobs {
        let path = j.env.get("PATH").map(Into::into).unwrap_or_else(|| path_var.clone());
        for (i, step) in j.steps.iter().enumerate() {
            let key: Vec<String> = if j.flow {
                ["jobs", name, "steps", &i.to_string(), "command", "0"].map(String::from).to_vec()
            } else {
                ["jobs", name, "command", "0"].map(String::from).to_vec()
            };
            if let Some(msg) = program_problem(&step.command, &j.dir, &path) {
                warn(key, msg);
            }
        }
    }
    out
}

/// Why the program of `command` cannot be run from `dir` with `path` as
/// PATH, if it cannot.
fn program_problem(command: &[String], dir: &Path, path: &std::ffi::OsString) -> Option<String> {
    let program = command.first()?;
    if program.is_empty() {
        return None; // an error of its own
    }
    if program.contains('/') {
        let full = dir.join(program);
        return match std::fs::metadata(&full) {
            Err(_) if Path::new(program).is_absolute() => Some(format!("program {program:?} does not exist")),
            Err(_) => Some(format!("program {program:?} does not exist in {}", dir.display())),
            Ok(m) if m.is_dir() => Some(format!("program {program:?} is a directory")),
            Ok(m) if m.permissions().mode() & 0o111 == 0 => {
                Some(format!("program {program:?} is not executable (chmod +x {})", full.display()))
            }
            Ok(_) => None,
        };
    }
    let found: Vec<PathBuf> = std::env::split_paths(path)
        .map(|d| if d.as_os_str().is_empty() { dir.to_path_buf() } else { dir.join(d) })
        .map(|d| d.join(program))
        .filter(|p| p.is_file())
        .collect();
    if found.is_empty() {
        return Some(format!("program {program:?} is not on PATH"));
    }
    if !found.iter().any(|p| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)) {
        return Some(format!("program {program:?} is on PATH ({}) but not executable", found[0].display()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_on_path_or_against_the_dir() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("run.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let cmd = |p: &str| vec![p.to_string()];
        let path: std::ffi::OsString = "/usr/bin:/bin".into();
        assert_eq!(program_problem(&cmd("sh"), dir.path(), &path), None);
        assert_eq!(
            program_problem(&cmd("pyhton3"), dir.path(), &path).as_deref(),
            Some("program \"pyhton3\" is not on PATH")
        );
        assert!(program_problem(&cmd("./run.sh"), dir.path(), &path).unwrap().contains("not executable"));
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(program_problem(&cmd("./run.sh"), dir.path(), &path), None);
        assert!(program_problem(&cmd("./nope"), dir.path(), &path).unwrap().contains("does not exist in"));
        assert_eq!(program_problem(&cmd("/bin/sh"), dir.path(), &path), None);
    }
}
