use crate::harness::{Sandbox, repo, run};

#[test]
fn committed_schema_matches_the_generated_one() {
    let out = run(Sandbox::new().drover().arg("schema"));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let committed = std::fs::read_to_string(repo().join("schema/daemon.schema.json"))
        .expect("schema/daemon.schema.json is committed");
    assert!(
        committed == out.stdout,
        "schema/daemon.schema.json is out of date; regenerate it with:\n    cargo run -- schema > schema/daemon.schema.json"
    );
}

#[test]
fn every_example_config_declares_the_schema_and_is_valid() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        seen += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("#:schema ../schema/daemon.schema.json"),
            "{} does not start with the #:schema line",
            path.display()
        );
        let out = run(Sandbox::new().drover().arg("check").arg(&path));
        assert_eq!(out.code, Some(0), "{}: {}", path.display(), out.stderr);
    }
    assert!(seen >= 1, "no example configs found");
}
