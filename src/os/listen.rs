//! Listening sockets held by drover and handed to workers by the systemd
//! socket-activation protocol: fds 3, 4, … with LISTEN_FDS, LISTEN_PID and
//! LISTEN_FDNAMES. LISTEN_PID must be the child's own pid, which is not
//! known before the fork, and std builds the environment before it: so the
//! child first execs drover itself as a shim ([`shim_main`]), which moves
//! the sockets to fd 3 on, sets LISTEN_PID to its pid (the same pid after
//! the next exec) and execs the program.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::model::Address;

/// The argument that makes drover the shim.
pub const SHIM_ARG: &str = "__drover-listen-fds";

/// The backlog of each socket: connections that arrive while no instance
/// accepts (one exiting, the next starting) wait here.
const BACKLOG: i32 = 1024;

/// Binds and listens on `address`. A unix socket's stale file is replaced
/// (never a symlink or another kind of file), and it gets `mode` before
/// it listens, so no client connects to it with a wider mode.
pub fn bind(address: &Address, mode: Option<u32>) -> io::Result<OwnedFd> {
    let socket = match address {
        Address::Tcp(addr) => {
            let s = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            if addr.is_ipv6() {
                // [::] means IPv6 only, as it reads; 0.0.0.0 is separate.
                s.set_only_v6(true)?;
            }
            s.bind(&SockAddr::from(*addr))?;
            s
        }
        Address::Unix(path) => {
            remove_stale(path)?;
            let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            s.bind(&SockAddr::unix(path)?)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode.unwrap_or(0o600)))?;
            s
        }
    };
    socket.listen(BACKLOG)?;
    Ok(OwnedFd::from(socket))
}

/// Removes a socket file left by an earlier bind; anything else at `path`
/// is an error.
fn remove_stale(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way (drover replaces only a stale socket)",
        )),
    }
}

/// Removes a unix socket's file once drover closes it.
pub fn unlink(address: &Address) {
    if let Address::Unix(path) = address
        && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
    {
        let _ = std::fs::remove_file(path);
    }
}

/// drover's own executable, opened once: the shim runs from it by
/// /proc/self/fd/N, which works for a worker's user that could not reach
/// the file by its path.
static EXE: OnceLock<Result<OwnedFd, String>> = OnceLock::new();

/// The descriptor the shim is exec'd through, once [`shim_command`] has
/// named it: a child that leaves drover's descriptors behind carries it.
pub fn shim_fd() -> Option<RawFd> {
    EXE.get().and_then(|r| r.as_ref().ok()).map(AsRawFd::as_raw_fd)
}

fn own_exe() -> io::Result<PathBuf> {
    // /proc/self/exe is the running file itself, even once it is
    // replaced or deleted on disk.
    let fd = EXE.get_or_init(|| {
        std::fs::File::open("/proc/self/exe").map(OwnedFd::from).map_err(|e| format!("/proc/self/exe: {e}"))
    });
    match fd {
        Ok(fd) => Ok(PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))),
        Err(e) => Err(io::Error::other(format!("cannot open drover's own executable to pass sockets: {e}"))),
    }
}

/// Copies of the sockets at descriptors above 2 + n (so that moving them
/// to 3.. in the child clobbers none of them), close-on-exec in drover.
pub fn high_copies(fds: &[RawFd]) -> io::Result<Vec<OwnedFd>> {
    let floor = 3 + fds.len() as RawFd;
    fds.iter()
        .map(|&fd| {
            // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor we own.
            let new = unsafe { nix::libc::fcntl(fd, nix::libc::F_DUPFD_CLOEXEC, floor) };
            if new < 0 { Err(io::Error::last_os_error()) } else { Ok(unsafe { OwnedFd::from_raw_fd(new) }) }
        })
        .collect()
}

/// The shim's command line: run `argv` with `fds` as 3, 4, ….
pub fn shim_command(fds: &[RawFd], argv: &[String]) -> io::Result<(PathBuf, Vec<OsString>)> {
    let list = fds.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(",");
    let mut args = vec![OsString::from(SHIM_ARG), OsString::from(list)];
    args.extend(argv.iter().map(OsString::from));
    Ok((own_exe()?, args))
}

/// In the child, between fork and exec: keeps `fds` open across the exec
/// of the shim. Async-signal-safe (fcntl only).
pub fn keep_across_exec(fds: &[RawFd]) -> io::Result<()> {
    for &fd in fds {
        // SAFETY: fcntl on a descriptor this process holds.
        if unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether `p` is a regular file with an execute bit: one exec may run.
pub fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where `program` would be found in the child: as it is when it holds a
/// '/', else in PATH. None when it is not there.
pub fn find_program(program: &str, dir: &Path, path_var: Option<&OsStr>) -> Option<PathBuf> {
    if program.contains('/') {
        let p = dir.join(program);
        return is_executable(&p).then_some(p);
    }
    let path_var = path_var.map(OsStr::to_os_string).unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path_var).map(|d| dir.join(d).join(program)).find(|p| is_executable(p))
}

/// Runs as the shim when drover was started as `drover SHIM_ARG FDS PROGRAM
/// ARGS…`: returns only if it was not (or the exec failed: then with the
/// exit code to end with).
pub fn shim_main() -> Option<i32> {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(SHIM_ARG)) {
        return None;
    }
    let fds: Vec<RawFd> = match args.next().map(|l| {
        l.as_bytes().split(|b| *b == b',').map(|f| std::str::from_utf8(f).ok()?.parse().ok()).collect()
    }) {
        Some(Some(fds)) => fds,
        _ => return Some(fail("bad descriptor list")),
    };
    let Some(program) = args.next() else { return Some(fail("no program")) };
    for (i, &fd) in fds.iter().enumerate() {
        let target = 3 + i as RawFd;
        // SAFETY: plain descriptor calls in a single-threaded process.
        if unsafe { nix::libc::dup2(fd, target) } < 0 {
            return Some(fail(&format!("cannot move fd {fd} to {target}: {}", io::Error::last_os_error())));
        }
        unsafe { nix::libc::close(fd) };
    }
    // SAFETY: the shim is single-threaded: nothing reads the environment
    // meanwhile.
    unsafe {
        std::env::set_var("LISTEN_FDS", fds.len().to_string());
        std::env::set_var("LISTEN_PID", std::process::id().to_string());
    }
    let err = std::os::unix::process::CommandExt::exec(std::process::Command::new(&program).args(args));
    Some(fail(&format!("cannot start {:?}: {err}", program)))
}

fn fail(what: &str) -> i32 {
    eprintln!("drover: {what}");
    127
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_socket_replaces_a_stale_one_and_refuses_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let addr = Address::Unix(path.clone());
        let first = bind(&addr, Some(0o660)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o660);
        drop(first);
        // Its file is left behind, as after a crash: replaced.
        let _second = bind(&addr, None).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "x").unwrap();
        let e = bind(&Address::Unix(plain.clone()), None).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(bind(&Address::Unix(link), None).is_err(), "a symlink is never followed");
        assert_eq!(std::fs::read(&plain).unwrap(), b"x");
    }

    #[test]
    fn a_tcp_port_in_use_is_an_error_and_a_held_one_can_be_rebound_after_close() {
        let first = bind(&Address::Tcp("127.0.0.1:0".parse().unwrap()), None).unwrap();
        let port = Socket::from(first.try_clone().unwrap()).local_addr().unwrap().as_socket().unwrap().port();
        let addr = Address::Tcp(format!("127.0.0.1:{port}").parse().unwrap());
        let e = bind(&addr, None).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::EADDRINUSE));
        drop(first);
        bind(&addr, None).unwrap();
    }

    #[test]
    fn high_copies_sit_above_the_targets() {
        let a = bind(&Address::Tcp("127.0.0.1:0".parse().unwrap()), None).unwrap();
        let b = bind(&Address::Tcp("127.0.0.1:0".parse().unwrap()), None).unwrap();
        let copies = high_copies(&[a.as_raw_fd(), b.as_raw_fd()]).unwrap();
        assert!(copies.iter().all(|c| c.as_raw_fd() >= 5));
    }

    #[test]
    fn programs_are_found_as_exec_would() {
        let dir = tempfile::tempdir().unwrap();
        assert!(find_program("sh", dir.path(), Some(OsStr::new("/bin:/usr/bin"))).is_some());
        assert!(find_program("no-such-program-here", dir.path(), None).is_none());
        let script = dir.path().join("run.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(find_program("./run.sh", dir.path(), None).is_none(), "not executable");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_program("./run.sh", dir.path(), None), Some(dir.path().join("./run.sh")));
    }
}
