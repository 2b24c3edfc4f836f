//! Files that must survive a crash of drover: written whole or not at all;
//! and the kernel's small files, read with as few system calls as can be.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Writes `data` to `path` atomically: a temp file beside it, fsync,
/// rename over the old one, so a reader sees the old or the new content,
/// never a torn mix. Mode 0600.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc_o_nofollow())
            .open(&tmp)
            .map_err(|e| refuse_link(&tmp, e))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// O_NOFOLLOW: a symlink planted at one of drover's paths is not followed.
pub fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// Words the ELOOP of an O_NOFOLLOW open for people.
pub fn refuse_link(path: &Path, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) {
        io::Error::other(format!(
            "{} is a symbolic link; drover does not follow links it did not make",
            path.display()
        ))
    } else {
        e
    }
}

/// Creates `dir` (and parents) owner-only, whatever the umask, and refuses
/// a directory that other users could write to or that is someone else's:
/// whoever can write there can plant files drover would trust. An existing
/// directory of ours that others may read or enter (0755, say) is made
/// 0700, since file names in it (runs, sessions, workers) are no one
/// else's business: its old mode is returned, for the log.
pub fn ensure_private_dir(dir: &Path) -> io::Result<Option<u32>> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Err(io::Error::other(format!(
            "{} is a symbolic link; name the directory it points to instead",
            dir.display()
        )));
    }
    if !meta.is_dir() {
        return Err(io::Error::other(format!("{} is not a directory", dir.display())));
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(io::Error::other(format!(
            "{} belongs to uid {}, not to this user (uid {me}); refusing to use it",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        let who = if meta.mode() & 0o002 != 0 { "every user" } else { "its group" };
        return Err(io::Error::other(format!(
            "{} is writable by {who} (mode {:o}); run `chmod go-w {}` or choose another state_dir",
            dir.display(),
            meta.mode() & 0o7777,
            dir.display()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o700))?;
    Ok(Some(mode))
}

/// [`ensure_private_dir`] for a state_dir, which must also sit where no
/// other user can swap it: every directory above it, up to `/`, belongs
/// to this user or root and is not writable by others, except a sticky
/// one such as /tmp (there, others cannot rename what is ours; what is
/// below it is checked on its own). As ssh's StrictModes does: root
/// running drover in `/home/u/proj` would otherwise trust whatever `u`
/// put at `proj/.drover`. Checked before anything is created, and again
/// after (a parent made meanwhile by someone else is caught).
pub fn ensure_state_dir(dir: &Path) -> io::Result<Option<u32>> {
    check_ancestors(dir)?;
    let tightened = ensure_private_dir(dir)?;
    check_ancestors(dir)?;
    Ok(tightened)
}

/// Refuses `dir` when a directory above it is not trustworthy (see
/// [`ensure_state_dir`]); directories not made yet are skipped.
pub fn check_ancestors(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let abs = std::path::absolute(dir)?;
    let Some(mut cur) = abs.parent() else { return Ok(()) };
    while fs::symlink_metadata(cur).is_err() {
        match cur.parent() {
            Some(p) => cur = p,
            None => return Ok(()),
        }
    }
    // A link on the way is judged by where it leads: that is the
    // directory whose owner could swap what is below.
    let real = fs::canonicalize(cur)?;
    let me = nix::unistd::geteuid().as_raw();
    for d in real.ancestors() {
        let meta = fs::metadata(d)?;
        let refuse = |why: String| {
            io::Error::other(format!(
                "{} lies under {}, which {why}: whoever controls it could put their own state_dir in \
                 its place. Choose a state_dir whose every parent only you or root can write",
                dir.display(),
                d.display()
            ))
        };
        if meta.uid() != me && meta.uid() != 0 {
            return Err(refuse(format!(
                "belongs to uid {}, not to this user (uid {me}) or root",
                meta.uid()
            )));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            let who = if mode & 0o002 != 0 { "every user" } else { "its group" };
            return Err(refuse(format!(
                "is writable by {who} (mode {mode:o}, run `chmod go-w {}` if it should not be)",
                d.display()
            )));
        }
    }
    Ok(())
}

/// Opens `path` for appending, creating it 0600, never through a symlink.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc_o_nofollow())
        .open(path)
        .map_err(|e| refuse_link(path, e))
}

/// Creates `path` empty and 0600 unless it exists, never through a symlink:
/// for files another library opens by name (SQLite copies the database's
/// mode to its -wal and -shm files).
pub fn create_private(path: &Path) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc_o_nofollow())
        .open(path)
        .map(drop)
        .map_err(|e| refuse_link(path, e))
}

/// How the kernel makes a file of procfs or cgroupfs, which says when a
/// read of it has reached its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Made {
    /// In one piece (/proc/PID/stat, a cgroup's cpu.stat, cgroup.events,
    /// memory.current): handed over whole up to the space a read offers,
    /// so a read that leaves space was the last.
    InOnePiece,
    /// Record by record (cgroup.procs, smaps): a read may stop short at a
    /// record's end with more to come, so only a read of nothing ends it.
    ByRecords,
}

/// Reads a file the kernel makes when it is read (procfs, cgroupfs) into
/// `buf`, replacing what it held: one open and, for a file made in one
/// piece that fits the space given, one read (`read_to_string` would also
/// stat it and read again to see the end). The text, or an error for a
/// file that is not there or not UTF-8.
pub fn read_kernel_file<'a>(path: &Path, made: Made, buf: &'a mut Vec<u8>) -> io::Result<&'a str> {
    let mut file = File::open(path)?;
    buf.clear();
    let mut len = 0;
    loop {
        if buf.len() - len < 512 {
            buf.resize(len.saturating_add(buf.len().max(1024)), 0);
        }
        let n = file.read(&mut buf[len..])?;
        len += n;
        if n == 0 || (made == Made::InOnePiece && len < buf.len()) {
            break;
        }
    }
    buf.truncate(len);
    std::str::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn kernel_files_small_and_large_read_whole() {
        let mut buf = Vec::new();
        // One read for a file made in one piece.
        let stat = read_kernel_file(Path::new("/proc/self/stat"), Made::InOnePiece, &mut buf).expect("stat");
        assert!(stat.starts_with(&format!("{} (", std::process::id())), "{stat}");
        assert!(stat.ends_with('\n'), "whole: {stat}");
        // Megabytes made record by record, whose reads stop short at a
        // record's end long before the file's: read to the end all the
        // same, in the same buffer (the symbol table does not change
        // between two reads, as this process's own files would).
        let symbols =
            read_kernel_file(Path::new("/proc/kallsyms"), Made::ByRecords, &mut buf).expect("kallsyms");
        assert!(symbols.len() > 1 << 20, "{} bytes", symbols.len());
        assert_eq!(symbols, std::fs::read_to_string("/proc/kallsyms").expect("read_to_string"));
        let missing = read_kernel_file(Path::new("/proc/self/no-such-file"), Made::InOnePiece, &mut buf);
        assert_eq!(missing.map(str::len).map_err(|e| e.kind()), Err(io::ErrorKind::NotFound));
    }

    #[test]
    fn atomic_write_replaces_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left");
    }

    #[test]
    fn private_dir_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        ensure_private_dir(&d).unwrap();
        assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        for (mode, who) in [(0o777, "every user"), (0o770, "its group")] {
            fs::set_permissions(&d, fs::Permissions::from_mode(mode)).unwrap();
            let e = ensure_private_dir(&d).unwrap_err().to_string();
            assert!(e.contains(who) && e.contains("chmod go-w"), "{e}");
        }
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(ensure_private_dir(&d).unwrap(), Some(0o755), "tightened");
        assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(ensure_private_dir(&d).unwrap(), None, "already private");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(ensure_private_dir(&link).unwrap_err().to_string().contains("symbolic link"));
    }

    #[test]
    fn a_state_dir_under_a_directory_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        let sd = shared.join("proj/.drover");
        fs::create_dir_all(shared.join("proj")).unwrap();
        for (mode, ok) in [(0o777, false), (0o775, false), (0o1777, true), (0o755, true)] {
            fs::set_permissions(&shared, fs::Permissions::from_mode(mode)).unwrap();
            match ensure_state_dir(&sd) {
                Ok(_) => assert!(ok, "mode {mode:o} accepted"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(!ok, "mode {mode:o} refused: {e}");
                    assert!(e.contains(&shared.display().to_string()) && e.contains("writable by"), "{e}");
                    assert!(!sd.exists(), "nothing made under it");
                }
            }
        }
    }

    #[test]
    fn planted_links_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let link = dir.path().join("out.log");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(open_append(&link).unwrap_err().to_string().contains("symbolic link"));
        assert!(create_private(&link).unwrap_err().to_string().contains("symbolic link"));
        write_atomic(&link, b"new").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert!(
            !fs::symlink_metadata(&link).unwrap().file_type().is_symlink(),
            "the link itself was replaced"
        );
    }
}
