//! Arbitrary bytes as daemon.toml; a config that loads exports to
//! Kubernetes and systemd without a panic, the same twice, as YAML that
//! parses and unit files made of sections, keys and comments.
#![no_main]

use std::path::{Path, PathBuf};

use drover::config::{Overrides, load::load_text, load::text_from_bytes};
use drover::export::{Exported, kubernetes, systemd};
use libfuzzer_sys::fuzz_target;

fn k8s(config: &drover::config::model::Config) -> Exported {
    let o = kubernetes::Options {
        image: "acme/app:1".into(),
        namespace: Some("fuzz".into()),
        name_prefix: String::new(),
        workdir: Some(PathBuf::from("/app")),
        emit_secrets: true,
        base_dir: PathBuf::from("/nonexistent/fuzz"),
    };
    kubernetes::export(config, &o)
}

fn units(config: &drover::config::model::Config) -> Exported {
    let o = systemd::Options {
        prefix: "fuzz".into(),
        systemd_version: 252,
        workdir: None,
        base_dir: PathBuf::from("/nonexistent/fuzz"),
        unit_dir: PathBuf::from("/etc/systemd/system"),
        with_secrets: true,
    };
    systemd::export(config, &o)
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/nonexistent/fuzz/daemon.toml");
    let Ok(text) = text_from_bytes(path, data.to_vec(), data.len() as u64) else { return };
    let overrides = Overrides::new(std::iter::empty(), &[]).expect("no overrides");
    let Ok(loaded) = load_text(path, text, &overrides) else { return };

    let out = k8s(&loaded.config);
    assert_eq!(out.files, k8s(&loaded.config).files, "the Kubernetes export is deterministic");
    for (name, yaml) in &out.files {
        for doc in serde_norway::Deserializer::from_str(yaml) {
            let value = <serde_norway::Value as serde::Deserialize>::deserialize(doc);
            assert!(value.is_ok(), "{name}: {value:?}\n{yaml}");
        }
    }

    let out = units(&loaded.config);
    assert_eq!(out.files, units(&loaded.config).files, "the systemd export is deterministic");
    for (name, unit) in &out.files {
        for line in unit.lines() {
            let t = line.trim();
            let ok = t.is_empty()
                || t.starts_with('#')
                || t.starts_with(';')
                || (t.starts_with('[') && t.ends_with(']'))
                || t.split_once('=').is_some_and(|(k, _)| !k.is_empty() && !k.contains(char::is_whitespace));
            assert!(ok, "{name}: {line:?}");
        }
    }
});
