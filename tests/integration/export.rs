//! `drover export`: the real binary on the example configs; output checked
//! against committed golden files (insta) and the exit codes scripts see.
//! tests/export_check.sh runs the output through kubernetes-validate.

use crate::harness::*;

fn export(sb: &Sandbox, config: &std::path::Path, args: &[&str]) -> Run {
    run(sb.drover().arg("-c").arg(config).args(["export", "kubernetes"]).args(args))
}

#[test]
fn the_example_configs_export_as_the_golden_files_say() {
    let sb = Sandbox::new();
    for (file, extra) in [
        ("config/daemon.toml", &[][..]),
        ("config/jobs.toml", &[][..]),
        ("tests/corpus/valid/flows.toml", &[][..]),
        ("tests/corpus/valid/secret-env.toml", &["--emit-secrets"][..]),
    ] {
        let args = [
            &["--allow-lossy", "--workdir", "/app", "--namespace", "prod", "--image", "acme/app:1.4"][..],
            extra,
        ]
        .concat();
        let r = export(&sb, &repo().join(file), &args);
        assert_eq!(r.code, Some(0), "{file}: {}", r.stderr);
        let name = file.replace(['/', '.'], "_");
        insta::assert_snapshot!(name, r.stdout);
    }
}

#[test]
fn what_cannot_be_expressed_is_listed_by_key_and_fails_unless_allowed() {
    let sb = Sandbox::new();
    let config = sb.write(
        "daemon.toml",
        "[workers.w]\ncommand = [\"true\"]\nrestart = \"never\"\n[jobs.j]\ncommand = [\"true\"]\nevery = \"30s\"\n",
    );
    let r = export(&sb, &config, &[]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stdout.is_empty(), "nothing written: {}", r.stdout);
    for key in ["workers.w.restart", "jobs.j.every"] {
        assert!(r.stderr.contains(&format!("error: not expressible: {key}: ")), "{key}: {}", r.stderr);
    }
    assert!(r.stderr.contains("--allow-lossy"), "{}", r.stderr);

    let r = export(&sb, &config, &["--allow-lossy", "-o", "out/"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("warning: not expressible: workers.w.restart"), "{}", r.stderr);
    let yaml = std::fs::read_to_string(sb.path("out/drover.yaml")).unwrap();
    assert!(yaml.contains("kind: Deployment") && yaml.contains("kind: CronJob"), "{yaml}");

    // An interval cron cannot say is an error, whatever the flags.
    let config = sb.write("odd.toml", "[jobs.j]\ncommand = [\"true\"]\nevery = \"90m\"\n");
    let r = export(&sb, &config, &["--allow-lossy"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot export jobs.j.every: 1h 30m does not divide the clock evenly"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());

    // An invalid config is named as `check` names it; an unknown target is usage.
    let config = sb.write("bad.toml", "[workers.w]\ncapacity = 0\ncommand = [\"true\"]\n");
    let r = export(&sb, &config, &[]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("bad.toml:2:") && r.stderr.contains("workers.w.capacity"), "{}", r.stderr);
    let r = run(sb.drover().args(["export", "nomad"]));
    assert_eq!(r.code, Some(2), "{}", r.stderr);
}

#[test]
fn secrets_are_referenced_and_named_unless_emitted() {
    let sb = Sandbox::new();
    let r = export(&sb, &repo().join("tests/corpus/valid/secret-env.toml"), &["--workdir", "/app"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        !r.stdout.contains("hunter2") && !r.stdout.contains("tok-123") && !r.stdout.contains("AKIA"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("kind: Secret"));
    assert!(r.stderr.contains("kubectl create secret generic web-env"), "{}", r.stderr);
    assert!(r.stderr.contains("--from-literal=API_TOKEN="), "{}", r.stderr);
}
