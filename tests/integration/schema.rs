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

/// The TOML file at `path` as the JSON value a schema validator sees.
fn as_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::to_value(toml::from_str::<toml::Table>(&text).unwrap()).unwrap()
}

#[test]
fn the_published_schema_says_the_rules_json_schema_can() {
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("schema/daemon.schema.json")).unwrap())
            .unwrap();
    let v = jsonschema::options().should_validate_formats(false).build(&schema).expect("the schema compiles");
    for entry in std::fs::read_dir(repo().join("tests/corpus/valid")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue; // an env file the configs read
        }
        let errors: Vec<String> = v.iter_errors(&as_json(&path)).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
    }
    // One file per rule drover checks in code and the schema also says.
    for (file, at) in [
        ("permanent-exit-code-300", "/defaults/permanent_exit_codes/1"),
        ("empty-program", "/jobs/backup/command/0"),
        ("job-command-and-steps", "/jobs/release"),
        ("job-neither-command-nor-steps", "/jobs/backup"),
        ("job-schedule-and-every", "/jobs/backup"),
        ("cron-six-fields", "/jobs/backup/schedule"),
        ("duration-backoff-multiplier-huge", "/workers/a/backoff/multiplier"),
        ("probe-two-kinds", "/workers/api/ready"),
        ("probe-no-kind", "/defaults/health"),
        ("probe-failures-zero", "/workers/api/health"),
        ("probe-log-in-health", "/workers/api/health"),
        ("depends-on-bad-condition", "/workers/api/depends_on"),
    ] {
        let path = repo().join("tests/corpus/invalid").join(format!("{file}.toml"));
        let paths: Vec<String> =
            v.iter_errors(&as_json(&path)).map(|e| e.instance_path().to_string()).collect();
        assert!(paths.iter().any(|p| p.starts_with(at)), "{file}: errors at {paths:?}, none at {at}");
    }
}
