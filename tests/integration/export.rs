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
        ("config/identity.toml", &[][..]),
        ("config/sockets.toml", &[][..]),
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

fn export_systemd(sb: &Sandbox, config: &std::path::Path, args: &[&str]) -> Run {
    run(sb.drover().arg("-c").arg(config).args(["export", "systemd"]).args(args))
}

#[test]
fn the_example_configs_export_to_systemd_as_the_golden_files_say() {
    let sb = Sandbox::new();
    for file in [
        "config/daemon.toml",
        "config/jobs.toml",
        "tests/corpus/valid/flows.toml",
        "tests/corpus/valid/secret-env.toml",
        "tests/corpus/valid/readiness.toml",
        "config/identity.toml",
        "config/sockets.toml",
    ] {
        let r = export_systemd(
            &sb,
            &repo().join(file),
            &["--allow-lossy", "--workdir", "/srv/app", "--prefix", "acme"],
        );
        assert_eq!(r.code, Some(0), "{file}: {}", r.stderr);
        let name = format!("systemd_{}", file.replace(['/', '.'], "_"));
        insta::assert_snapshot!(name, r.stdout);
    }
}

#[test]
fn systemd_units_are_written_with_secrets_beside_them_in_0600() {
    use std::os::unix::fs::PermissionsExt;
    let sb = Sandbox::new();
    let config = repo().join("tests/corpus/valid/secret-env.toml");
    // To stdout: the units, never a secret value; the note names the file.
    let r = export_systemd(&sb, &config, &[]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    for secret in ["hunter2", "tok-123", "AKIA"] {
        assert!(!r.stdout.contains(secret), "{secret}: {}", r.stdout);
    }
    assert!(r.stdout.contains("### drover-web@.service\n"), "{}", r.stdout);
    assert!(
        r.stderr.contains("drover-web.env (the secret values of API_TOKEN, DATABASE_URL)"),
        "{}",
        r.stderr
    );

    let r = export_systemd(&sb, &config, &["--unit-dir", "/etc/systemd/user", "-o", "units"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let mut names: Vec<String> = std::fs::read_dir(sb.path("units"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "drover-backup.env",
            "drover-backup.service",
            "drover-web.env",
            "drover-web.target",
            "drover-web@.service",
            "drover.target"
        ]
    );
    let env = std::fs::read_to_string(sb.path("units/drover-web.env")).unwrap();
    assert!(
        env.contains("API_TOKEN=\"tok-123\"\n")
            && env.contains("DATABASE_URL=\"postgres://app:hunter2@db/app\"\n"),
        "{env}"
    );
    let mode = std::fs::metadata(sb.path("units/drover-web.env")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let unit = std::fs::read_to_string(sb.path("units/drover-web@.service")).unwrap();
    assert!(unit.contains("\nEnvironmentFile=/etc/systemd/user/drover-web.env\n"), "{unit}");
    assert!(
        unit.contains("\nEnvironment=PORT=8000\n") && !unit.contains("hunter2") && !unit.contains("tok-123"),
        "{unit}"
    );
}

#[test]
fn systemd_losses_fail_unless_allowed_and_the_version_is_checked() {
    let sb = Sandbox::new();
    let config = sb.write(
        "daemon.toml",
        "[workers.w]\ncommand = [\"true\"]\nbackoff = { initial = \"1s\", max = \"8s\", multiplier = 2.0 }\n\
         [jobs.j]\ncommand = [\"true\"]\nevery = \"30s\"\non_overlap = \"queue\"\n",
    );
    let r = export_systemd(&sb, &config, &["-o", "out"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    for key in ["workers.w.backoff", "jobs.j.on_overlap"] {
        assert!(r.stderr.contains(&format!("error: not expressible: {key}: ")), "{key}: {}", r.stderr);
    }
    assert!(!sb.path("out").exists(), "nothing written");

    // With 254, the backoff's growth is expressible.
    let r = export_systemd(&sb, &config, &["--systemd-version", "254", "--allow-lossy", "-o", "out"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    // Only the reset after min_uptime is still missing.
    assert!(
        r.stderr.contains("workers.w.backoff: systemd grows the delay 2.000× per restart"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("never resets it after min_uptime"), "{}", r.stderr);
    assert!(r.stderr.contains("warning: not expressible: jobs.j.on_overlap"), "{}", r.stderr);
    let unit = std::fs::read_to_string(sb.path("out/drover-w@.service")).unwrap();
    assert!(unit.contains("\nRestartSteps=3\nRestartMaxDelaySec=8s\n"), "{unit}");

    // Older than the oldest verified systemd is a usage error naming the flag.
    let r = export_systemd(&sb, &config, &["--systemd-version", "250"]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("--systemd-version") && r.stderr.contains("252"), "{}", r.stderr);

    // -o is a directory even when the config makes only P.target.
    let empty = sb.write("empty.toml", "");
    let r = export_systemd(&sb, &empty, &["-o", "only"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let top = std::fs::read_to_string(sb.path("only/drover.target")).unwrap();
    assert!(top.contains("WantedBy=multi-user.target"), "{top}");
}

#[test]
fn identity_limits_and_sockets_map_to_the_pod_or_are_listed() {
    let sb = Sandbox::new();
    // Names are all a config takes, and a pod needs the image's numeric
    // ids: lost, with the id they have here. The user running the tests is
    // the one a non-root drover may name.
    use std::os::unix::fs::MetadataExt;
    let env = sb.write("vars.env", "FROM_FILE=yes\n");
    let uid = std::fs::metadata(&env).expect("the env file just written").uid();
    let me = run(std::process::Command::new("id").arg("-un")).stdout.trim().to_string();
    let config = sb.write(
        "daemon.toml",
        format!(
            "[workers.w]\ncommand = [\"true\"]\nuser = \"{me}\"\nno_new_privs = true\n\
             umask = \"027\"\nnice = 5\noom_score_adj = 100\nlimits = {{ nofile = 1024 }}\n\
             env_file = [\"vars.env\"]\nsockets = [\"tcp://127.0.0.1:8080\", \"unix://w.sock\"]\n"
        ),
    );
    // Lossy: exit 1, each key named, nothing written.
    let r = export(&sb, &config, &[]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    for key in ["user", "umask", "nice", "oom_score_adj", "limits.nofile", "sockets[1]", "sockets"] {
        assert!(r.stderr.contains(&format!("workers.w.{key}")), "{key}: {}", r.stderr);
    }
    assert!(r.stdout.is_empty());
    let r = export(&sb, &config, &["--allow-lossy"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    // Round trip: the escalation flag, the file's value in
    // env, and one port on the container and the Service.
    for want in [
        "allowPrivilegeEscalation: false".to_string(),
        "name: FROM_FILE\n          value: yes".to_string(),
        "containerPort: 8080".to_string(),
        "kind: Service".to_string(),
        "targetPort: 8080".to_string(),
    ] {
        assert!(r.stdout.contains(want.as_str()), "{want}: {}", r.stdout);
    }
    assert_eq!(r.stdout.matches("containerPort:").count(), 1, "{}", r.stdout);
    assert!(r.stderr.contains("workers.w.env_file"), "{}", r.stderr);
    assert!(r.stderr.contains(&format!("(id {uid} on this machine)")), "{}", r.stderr);
    assert!(!r.stdout.contains("runAsUser"), "{}", r.stdout);
}
