//! Small value types shared by the config model: names, durations, signals,
//! sizes. Each carries its own serde and JSON-schema rules so that the
//! schema and the parser agree by construction.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern every worker, job and step name must match. Names end up in
/// file names under state_dir, so they can never contain `/` or `..`.
pub const NAME_PATTERN: &str = "^[a-z0-9][a-z0-9_-]{0,62}$";

/// Returns whether `s` matches [`NAME_PATTERN`] (checked by hand: the
/// pattern is simple and this keeps a regex engine out of the hot path).
pub fn is_valid_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    if bytes.is_empty() || bytes.len() > 63 {
        return false;
    }
    let head = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    head(bytes[0]) && bytes[1..].iter().all(|&b| head(b) || b == b'_' || b == b'-')
}

/// The units humantime reads, longest first so the regex prefers them.
const DURATION_PATTERN: &str = "^\\s*([0-9]+\\s*(nanos|nsec|ns|usec|us|µs|millis|msec|ms|seconds|second|secs|sec|s|minutes|minute|mins|min|m|hours|hour|hrs|hr|h|days|day|d|weeks|week|wks|wk|w|months|month|M|years|year|yrs|yr|y)\\s*)+$";

/// A duration written as a humantime string: "250ms", "2s", "1m 30s".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }
    pub const fn from_secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        humantime_serde::deserialize(d).map(HumanDuration)
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "title": "Duration",
            "type": "string",
            "description": "A duration: a number and a unit, e.g. \"250ms\", \"2s\", \"2m\", \"1h 30m\".",
            // One or more "<number><unit>" groups, with humantime's units.
            "pattern": DURATION_PATTERN,
            "examples": ["250ms", "2s", "2m"]
        })
    }
}

/// A byte size: an integer number of bytes, or a string such as "10MiB".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const MIB: u64 = 1024 * 1024;
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 =
            num.parse().map_err(|_| format!("invalid size {s:?}: expected e.g. \"512KiB\" or \"10MiB\""))?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "invalid size unit {other:?} in {s:?}: use B, KB, KiB, MB, MiB, GB or GiB"
                ));
            }
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n % size == 0 {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}B")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        // `untagged` is used only for this leaf value, where it cannot
        // blur the location of an error.
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "title": "ByteSize",
            "description": "A size in bytes: an integer, or a string with a unit (B, KB, KiB, MB, MiB, GB, GiB), e.g. \"10MiB\".",
            "anyOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "pattern": "^\\s*[0-9]+\\s*([kKmMgG]i?[bB]?|[bB])?\\s*$" }
            ]
        })
    }
}

macro_rules! signals {
    ($($name:ident),* $(,)?) => {
        /// A signal, by its name ("SIGTERM").
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Signal { $($name),* }

        impl Signal {
            pub const ALL: &'static [Signal] = &[$(Signal::$name),*];
            pub fn name(self) -> &'static str {
                match self { $(Signal::$name => stringify!($name)),* }
            }
            pub fn to_nix(self) -> nix::sys::signal::Signal {
                match self { $(Signal::$name => nix::sys::signal::Signal::$name),* }
            }
        }
    };
}

signals!(
    SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGKILL, SIGUSR1, SIGUSR2, SIGWINCH, SIGCONT, SIGSTOP, SIGTSTP,
    SIGALRM, SIGPWR,
);

impl FromStr for Signal {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let upper = s.trim().to_ascii_uppercase();
        let full = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
        Signal::ALL.iter().copied().find(|sig| sig.name() == full).ok_or_else(|| {
            let names: Vec<_> = Signal::ALL.iter().map(|s| s.name()).collect();
            format!("unknown signal {s:?}: expected one of {}", names.join(", "))
        })
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Signal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // Only the canonical names are accepted, as the schema says.
        match s.parse::<Signal>() {
            Ok(sig) if sig.name() == s => Ok(sig),
            _ => Err(serde::de::Error::custom(format!(
                "unknown signal {s:?}: expected one of {}",
                Signal::ALL.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

impl JsonSchema for Signal {
    fn schema_name() -> Cow<'static, str> {
        "Signal".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let names: Vec<_> = Signal::ALL.iter().map(|s| s.name()).collect();
        json_schema!({
            "type": "string",
            "description": "A signal name, e.g. \"SIGTERM\".",
            "enum": names,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["web", "a", "0", "web-2", "a_b", &"x".repeat(63)] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", "Web", "-a", "_a", "a.b", "a/b", "..", "é", &"x".repeat(64)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!("10MiB".parse::<ByteSize>().unwrap().0, 10 << 20);
        assert_eq!("512 kb".parse::<ByteSize>().unwrap().0, 512_000);
        assert_eq!("7".parse::<ByteSize>().unwrap().0, 7);
        assert!("10 parsecs".parse::<ByteSize>().is_err());
        assert!("99999999999999999999GiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(10 << 20).to_string(), "10MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[test]
    fn signals() {
        assert_eq!("SIGTERM".parse::<Signal>().unwrap(), Signal::SIGTERM);
        assert_eq!("hup".parse::<Signal>().unwrap(), Signal::SIGHUP);
        assert!("SIGNOPE".parse::<Signal>().is_err());
        for s in Signal::ALL {
            assert_eq!(s.to_nix().as_str(), s.name());
        }
    }
}
