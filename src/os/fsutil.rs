//! Files that must survive a crash of drover: written whole or not at all.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
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
/// whoever can write there can plant files drover would trust.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
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
    use std::os::unix::fs::MetadataExt;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
        ensure_private_dir(&d).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(ensure_private_dir(&link).unwrap_err().to_string().contains("symbolic link"));
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
