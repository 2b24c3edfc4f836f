//! `sockets`: the listening sockets drover holds for a worker and hands to
//! each of its instances (systemd's socket-activation protocol). Here they
//! are parsed and checked; `os::listen` binds them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::resolve::Problems;

/// One entry of `sockets`, as the file writes it.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum RawSocket {
    /// "tcp://127.0.0.1:8000", "tcp://[::1]:8000" or "unix://run/app.sock"
    /// (relative to the config file's directory).
    Address(String),
    Table(RawSocketTable),
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawSocketTable {
    /// "tcp://HOST:PORT" or "unix://PATH".
    pub address: String,
    /// Its name in LISTEN_FDNAMES (default: the worker's name).
    pub name: Option<String>,
    /// The mode of a unix socket's file, in octal.
    #[schemars(extend("default" = "0600"))]
    pub mode: Option<String>,
}

/// Where a socket listens.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "tcp://{a}"),
            Address::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// A socket of a worker, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Socket {
    pub address: Address,
    pub name: String,
    /// The file mode of a unix socket (none for tcp).
    pub mode: Option<u32>,
}

impl Serialize for Socket {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("address", &self.address.to_string())?;
        m.serialize_entry("name", &self.name)?;
        if let Some(mode) = self.mode {
            m.serialize_entry("mode", &format!("{mode:04o}"))?;
        }
        m.end()
    }
}

/// The default mode of a unix socket: the worker's user only.
pub const UNIX_MODE: u32 = 0o600;

/// Parses "tcp://HOST:PORT" (HOST an IP address, IPv6 in brackets) or
/// "unix://PATH" (relative to `base_dir`).
pub fn parse_address(text: &str, base_dir: &Path) -> Result<Address, String> {
    if let Some(rest) = text.strip_prefix("tcp://") {
        return rest.parse::<SocketAddr>().map(Address::Tcp).map_err(|_| {
            format!(
                "{text:?} is not tcp://IP:PORT; write an IP address and a port, as tcp://127.0.0.1:8000 \
                 or tcp://[::1]:8000 (host names are not resolved)"
            )
        });
    }
    if let Some(rest) = text.strip_prefix("unix://") {
        if rest.is_empty() || rest.contains('\0') {
            return Err(format!("{text:?} has no path; write unix://PATH, as unix://run/app.sock"));
        }
        let path = base_dir.join(rest);
        // sockaddr_un holds 108 bytes, the NUL included.
        if path.as_os_str().len() > 107 {
            return Err(format!(
                "{} is {} bytes long, more than a unix socket's 107; use a shorter path",
                path.display(),
                path.as_os_str().len()
            ));
        }
        return Ok(Address::Unix(path));
    }
    Err(format!("{text:?} is neither tcp://HOST:PORT nor unix://PATH"))
}

/// Parses `[supervisor] metrics`: a loopback "IP:PORT" (127.0.0.0/8,
/// "[::1]:PORT"), "localhost:PORT" (127.0.0.1, never resolved), or
/// "unix:PATH" (relative to `base_dir`). Anything that would reach past
/// the machine is refused: the metrics carry no authentication.
pub fn parse_metrics(text: &str, base_dir: &Path) -> Result<Address, String> {
    if let Some(rest) = text.strip_prefix("unix:") {
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        if rest.is_empty() || rest.contains('\0') {
            return Err(format!("{text:?} has no path; write unix:PATH, as unix:run/metrics.sock"));
        }
        // The same checks as a worker's unix socket (the path's length).
        return parse_address(&format!("unix://{rest}"), base_dir);
    }
    let addr = match text.strip_prefix("localhost:") {
        Some(port) => port.parse::<u16>().map(|p| SocketAddr::from(([127, 0, 0, 1], p))).ok(),
        None => text.parse::<SocketAddr>().ok(),
    };
    let Some(addr) = addr else {
        return Err(format!(
            "{text:?} is neither HOST:PORT nor unix:PATH; write a loopback address and a port, as \
             \"127.0.0.1:9464\", \"[::1]:9464\" or \"localhost:9464\", or a unix socket, as \"unix:metrics.sock\""
        ));
    };
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{text:?} is not a loopback address: metrics have no authentication, so drover serves them \
             only on 127.0.0.0/8, [::1] or a unix socket; put a proxy in front to expose them further"
        ));
    }
    if addr.port() == 0 {
        return Err(format!("{text:?} has port 0; choose a fixed port for Prometheus to scrape, as 9464"));
    }
    Ok(Address::Tcp(addr))
}

/// A name LISTEN_FDNAMES can carry (colon-separated, so no colon).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Resolves a worker's `sockets`, adding each problem at its entry.
pub(super) fn resolve(
    p: &mut Problems,
    worker: &str,
    base_dir: &Path,
    raw: Option<&Vec<RawSocket>>,
) -> Vec<Socket> {
    let mut out = Vec::new();
    for (i, entry) in raw.into_iter().flatten().enumerate() {
        let index = i.to_string();
        let at = ["workers", worker, "sockets", index.as_str()];
        let (text, name, mode, key_at): (&str, Option<&String>, Option<&String>, Vec<&str>) = match entry {
            RawSocket::Address(a) => (a, None, None, at.to_vec()),
            RawSocket::Table(t) => {
                let mut key = at.to_vec();
                key.push("address");
                (&t.address, t.name.as_ref(), t.mode.as_ref(), key)
            }
        };
        let address = match parse_address(text, base_dir) {
            Ok(a) => a,
            Err(e) => {
                p.add(&key_at, e);
                continue;
            }
        };
        let name = name.cloned().unwrap_or_else(|| worker.to_string());
        if !valid_name(&name) {
            let mut key = at.to_vec();
            key.push("name");
            p.add(&key, format!("{name:?} is not a socket name: use letters, digits, '_', '-' and '.'"));
        }
        let mode = match (&address, mode) {
            (Address::Unix(_), None) => Some(UNIX_MODE),
            (Address::Unix(_), Some(m)) => match u32::from_str_radix(m, 8) {
                Ok(v) if m.len() >= 3 && m.len() <= 4 && v <= 0o7777 => Some(v),
                _ => {
                    let mut key = at.to_vec();
                    key.push("mode");
                    p.add(&key, format!("{m:?} is not an octal mode; write one as \"0660\""));
                    None
                }
            },
            (Address::Tcp(_), Some(_)) => {
                let mut key = at.to_vec();
                key.push("mode");
                p.add(&key, "only a unix socket has a mode; remove it");
                None
            }
            (Address::Tcp(_), None) => None,
        };
        if out.iter().any(|s: &Socket| s.address == address) {
            p.add(&key_at, format!("{address} is listed twice"));
            continue;
        }
        out.push(Socket { address, name, mode });
    }
    out
}

/// Two workers cannot both hold one address.
pub(super) fn check_shared(p: &mut Problems, workers: &BTreeMap<String, Vec<Socket>>) {
    let mut owner: BTreeMap<&Address, &str> = BTreeMap::new();
    for (name, sockets) in workers {
        for (i, s) in sockets.iter().enumerate() {
            match owner.get(&s.address) {
                Some(other) => {
                    let index = i.to_string();
                    p.add(
                        &["workers", name, "sockets", &index],
                        format!(
                            "{} is the socket of worker {other:?} already; a socket has one worker",
                            s.address
                        ),
                    );
                }
                None => {
                    owner.insert(&s.address, name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_bad_ones_say_what_to_write() {
        let base = Path::new("/etc/app");
        assert_eq!(
            parse_address("tcp://127.0.0.1:8000", base),
            Ok(Address::Tcp("127.0.0.1:8000".parse().unwrap()))
        );
        assert_eq!(parse_address("tcp://[::1]:80", base), Ok(Address::Tcp("[::1]:80".parse().unwrap())));
        assert_eq!(parse_address("unix://run/a.sock", base), Ok(Address::Unix("/etc/app/run/a.sock".into())));
        assert_eq!(parse_address("unix:///tmp/a.sock", base), Ok(Address::Unix("/tmp/a.sock".into())));
        assert!(
            parse_address("tcp://localhost:80", base).unwrap_err().contains("host names are not resolved")
        );
        assert!(parse_address("tcp://1.2.3.4", base).unwrap_err().contains("tcp://IP:PORT"));
        assert!(parse_address("udp://1.2.3.4:5", base).unwrap_err().contains("neither"));
        assert!(parse_address("unix://", base).unwrap_err().contains("no path"));
        let long = format!("unix:///{}", "x".repeat(120));
        assert!(parse_address(&long, base).unwrap_err().contains("more than a unix socket's 107"));
    }

    #[test]
    fn metrics_addresses_are_loopback_or_unix_only() {
        let base = Path::new("/etc/app");
        let tcp = |a: &str| Ok(Address::Tcp(a.parse().unwrap()));
        assert_eq!(parse_metrics("127.0.0.1:9464", base), tcp("127.0.0.1:9464"));
        assert_eq!(parse_metrics("127.1.2.3:80", base), tcp("127.1.2.3:80"));
        assert_eq!(parse_metrics("[::1]:9464", base), tcp("[::1]:9464"));
        assert_eq!(parse_metrics("localhost:9464", base), tcp("127.0.0.1:9464"));
        assert_eq!(parse_metrics("unix:run/m.sock", base), Ok(Address::Unix("/etc/app/run/m.sock".into())));
        assert_eq!(parse_metrics("unix:/tmp/m.sock", base), Ok(Address::Unix("/tmp/m.sock".into())));
        for bad in ["0.0.0.0:9464", "[::]:9464", "10.0.0.1:9464", "192.168.1.1:80"] {
            assert!(parse_metrics(bad, base).unwrap_err().contains("not a loopback address"), "{bad}");
        }
        for bad in ["example.com:9464", "9464", "localhost", "localhost:99999", "tcp://127.0.0.1:9464", ""] {
            assert!(
                parse_metrics(bad, base).unwrap_err().contains("neither HOST:PORT nor unix:PATH"),
                "{bad}"
            );
        }
        assert!(parse_metrics("127.0.0.1:0", base).unwrap_err().contains("port 0"));
        assert!(parse_metrics("unix:", base).unwrap_err().contains("no path"));
        let long = format!("unix:/{}", "x".repeat(120));
        assert!(parse_metrics(&long, base).unwrap_err().contains("more than a unix socket's 107"));
    }

    #[test]
    fn entries_resolve_with_names_and_modes_and_problems_are_placed() {
        let mut p = Problems::default();
        let raw = vec![
            RawSocket::Address("tcp://127.0.0.1:1".into()),
            RawSocket::Table(RawSocketTable {
                address: "unix://a.sock".into(),
                name: Some("admin".into()),
                mode: Some("0660".into()),
            }),
            RawSocket::Address("tcp://127.0.0.1:1".into()),
            RawSocket::Table(RawSocketTable {
                address: "tcp://127.0.0.1:2".into(),
                name: Some("a:b".into()),
                mode: Some("0600".into()),
            }),
        ];
        let s = resolve(&mut p, "web", Path::new("/srv"), Some(&raw));
        assert_eq!(
            s[0],
            Socket { address: Address::Tcp("127.0.0.1:1".parse().unwrap()), name: "web".into(), mode: None }
        );
        assert_eq!(s[1].mode, Some(0o660));
        assert_eq!(s[1].name, "admin");
        let problems: Vec<String> =
            p.0.iter().map(|x| format!("{}: {}", x.path.join("."), x.message)).collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with("workers.web.sockets.2: tcp://127.0.0.1:1 is listed twice"),
            "{problems:?}"
        );
        assert!(problems[1].starts_with("workers.web.sockets.3.name:"), "{problems:?}");
        assert!(problems[2].starts_with("workers.web.sockets.3.mode: only a unix socket"), "{problems:?}");
    }
}
