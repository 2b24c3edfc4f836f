//! `drover export`: the same daemon.toml as the objects of another engine.
//! Each target is a pure function from the resolved config to files plus
//! what it could not say ([`Lossy`]); the command decides what to write.

pub mod cron;
pub mod kubernetes;
mod kubernetes_identity;
mod kubernetes_probes;
pub mod systemd;

use crate::config::model::Settings;

/// A key whose meaning the target cannot hold, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lossy {
    pub key: String,
    pub why: String,
}

impl std::fmt::Display for Lossy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.why)
    }
}

/// What an export produced.
#[derive(Debug, Default)]
pub struct Exported {
    /// File name and text, in a stable order.
    pub files: Vec<(String, String)>,
    /// Kept out of the output (`--allow-lossy` writes the output anyway).
    pub lossy: Vec<Lossy>,
    /// Cannot be exported at all, whatever the flags.
    pub errors: Vec<Lossy>,
    /// Said to the user, not a loss (the secrets to create, how to run).
    pub notes: Vec<String>,
}

impl Exported {
    fn lose(&mut self, key: impl Into<String>, why: impl Into<String>) {
        self.lossy.push(Lossy { key: key.into(), why: why.into() });
    }

    fn fail(&mut self, key: impl Into<String>, why: impl Into<String>) {
        self.errors.push(Lossy { key: key.into(), why: why.into() });
    }
}

/// The settings drover uses when a file says nothing: a value equal to
/// these was not asked for, so a target without it loses nothing.
fn built_in() -> Settings {
    Settings::default()
}

/// A drover name as an object name: DNS-1123 has no `_`.
pub fn object_name(prefix: &str, name: &str) -> String {
    format!("{prefix}{}", name.replace('_', "-"))
}

/// Seconds, rounded up: a grace or deadline never gets shorter.
fn whole_seconds(d: std::time::Duration) -> i64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i64::try_from(s).unwrap_or(i64::MAX)
}
