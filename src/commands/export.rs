//! `drover export TARGET`: writes what the target can hold, lists what it
//! cannot (each with its key), and exits 1 for those unless
//! `--allow-lossy`.

use std::io::Write;
use std::path::Path;

use super::exit;
use crate::config::{Overrides, load::base_dir};
use crate::export::{Exported, kubernetes, systemd};

pub struct KubernetesArgs {
    pub image: String,
    pub namespace: Option<String>,
    pub name_prefix: String,
    pub workdir: Option<std::path::PathBuf>,
    pub emit_secrets: bool,
    pub allow_lossy: bool,
    pub out: Option<std::path::PathBuf>,
}

pub fn kubernetes(path: &Path, overrides: &Overrides, a: KubernetesArgs) -> u8 {
    let Some(loaded) = super::config_cmds::load_or_report(path, overrides) else { return exit::FAILED };
    let o = kubernetes::Options {
        image: a.image,
        namespace: a.namespace,
        name_prefix: a.name_prefix,
        workdir: a.workdir,
        emit_secrets: a.emit_secrets,
        base_dir: base_dir(&loaded.path),
    };
    let exported = kubernetes::export(&loaded.config, &o);
    finish(exported, a.allow_lossy, a.out.as_deref())
}

pub struct SystemdArgs {
    pub prefix: String,
    pub systemd_version: u32,
    pub workdir: Option<std::path::PathBuf>,
    pub unit_dir: std::path::PathBuf,
    pub allow_lossy: bool,
    pub out: Option<std::path::PathBuf>,
}

pub fn systemd(path: &Path, overrides: &Overrides, a: SystemdArgs) -> u8 {
    let Some(loaded) = super::config_cmds::load_or_report(path, overrides) else { return exit::FAILED };
    let o = systemd::Options {
        prefix: a.prefix,
        systemd_version: a.systemd_version,
        workdir: a.workdir,
        base_dir: base_dir(&loaded.path),
        unit_dir: a.unit_dir,
        // Secret values go only into files (mode 0600), never to stdout.
        with_secrets: a.out.is_some(),
    };
    let exported = systemd::export(&loaded.config, &o);
    // -o is always a directory here, even when one unit is all there is.
    let dir = a.out.map(|p| {
        let mut s = p.into_os_string();
        s.push("/");
        std::path::PathBuf::from(s)
    });
    finish(exported, a.allow_lossy, dir.as_deref())
}

/// Reports what was lost, then writes the files: to stdout (one after the
/// other), into a directory (`-o DIR`, or a path ending in `/`), or into
/// one file (`-o FILE`, when the target made one).
fn finish(e: Exported, allow_lossy: bool, out: Option<&Path>) -> u8 {
    for err in &e.errors {
        eprintln!("drover: cannot export {err}");
    }
    let what = if allow_lossy || !e.errors.is_empty() { "warning" } else { "error" };
    for l in &e.lossy {
        eprintln!("drover: {what}: not expressible: {l}");
    }
    if !e.errors.is_empty() {
        return exit::FAILED;
    }
    if !e.lossy.is_empty() && !allow_lossy {
        eprintln!(
            "drover: {} key(s) cannot be expressed; nothing written (--allow-lossy writes the output anyway)",
            e.lossy.len()
        );
        return exit::FAILED;
    }
    for n in &e.notes {
        eprintln!("drover: note: {n}");
    }
    let written = match out {
        None => {
            let mut stdout = std::io::stdout().lock();
            // Several files: each after a line naming it.
            let named = e.files.len() > 1;
            e.files
                .iter()
                .try_for_each(|(name, text)| {
                    if named {
                        writeln!(stdout, "### {name}")?;
                    }
                    stdout.write_all(text.as_bytes())
                })
                .and_then(|()| stdout.flush())
        }
        Some(dir)
            if dir.is_dir() || dir.as_os_str().to_string_lossy().ends_with('/') || e.files.len() > 1 =>
        {
            std::fs::create_dir_all(dir).and_then(|()| {
                e.files.iter().try_for_each(|(name, text)| {
                    crate::os::fsutil::write_atomic(&dir.join(name), text.as_bytes())
                })
            })
        }
        Some(file) => {
            crate::os::fsutil::write_atomic(file, e.files.first().map_or(&[][..], |f| f.1.as_bytes()))
        }
    };
    match written {
        Ok(()) => exit::OK,
        Err(err) => {
            eprintln!(
                "drover: cannot write the export{}: {err}",
                out.map(|p| format!(" to {}", p.display())).unwrap_or_default()
            );
            exit::FAILED
        }
    }
}
