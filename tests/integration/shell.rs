//! Completions and man pages, checked by the programs that use them: bash
//! sources the completion script and completes, man renders the pages.

use std::process::Command;

use crate::harness::*;

/// PATH with the drover under test first, as an installed one would be.
fn path_with_drover() -> String {
    let bin_dir = std::path::Path::new(DROVER).parent().unwrap();
    format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default())
}

/// What bash offers for the last of `words` (the word being typed), in the
/// sandbox, with drover's script sourced as a user's .bashrc would.
fn bash_complete(sb: &Sandbox, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let script = format!(
        "source <(drover completions bash) || exit 9\n\
         complete -p drover >/dev/null || exit 8\n\
         COMP_WORDS=({}); COMP_CWORD={}\n\
         _clap_complete_drover drover \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        quoted.join(" "),
        words.len() - 1
    );
    let out = run(Command::new("bash")
        .current_dir(sb.path("."))
        .env("PATH", path_with_drover())
        .args(["-c", &script]));
    assert_eq!(out.code, Some(0), "bash: {}", out.stderr);
    out.stdout.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
}

#[test]
fn bash_completes_commands_flags_and_the_names_in_the_config() {
    let sb = Sandbox::new();
    sb.write(
        "daemon.toml",
        "[workers.api]\ncommand = [\"true\"]\n[workers.web]\ncommand = [\"true\"]\n[jobs.report]\ncommand = [\"true\"]\n",
    );
    let commands = bash_complete(&sb, &["drover", "re"]);
    assert!(["reload", "restart"].iter().all(|c| commands.iter().any(|o| o == c)), "{commands:?}");
    assert!(!commands.iter().any(|o| o == "status"), "{commands:?}");

    let restart = bash_complete(&sb, &["drover", "restart", ""]);
    assert!(restart.contains(&"--wait".into()), "{restart:?}");
    assert!(restart.contains(&"api".into()) && restart.contains(&"web".into()), "{restart:?}");
    assert!(!restart.contains(&"report".into()), "a job offered to restart: {restart:?}");

    assert_eq!(bash_complete(&sb, &["drover", "trigger", "r"]), ["report"]);
    let logs = bash_complete(&sb, &["drover", "logs", ""]);
    assert!(["api", "web", "report"].iter().all(|n| logs.contains(&n.to_string())), "{logs:?}");
    assert_eq!(bash_complete(&sb, &["drover", "logs", "--fol"]), ["--follow"]);

    // Another file, named by DROVER_CONFIG: its names.
    sb.write("other.toml", "[workers.queue]\ncommand = [\"true\"]\n");
    let script = "source <(drover completions bash); COMP_WORDS=(drover stop ''); COMP_CWORD=2; \
                  _clap_complete_drover drover '' stop; printf '%s\\n' \"${COMPREPLY[@]}\"";
    let out = run(Command::new("bash")
        .current_dir(sb.path("."))
        .env("PATH", path_with_drover())
        .env("DROVER_CONFIG", "other.toml")
        .args(["-c", script]));
    let offered: Vec<&str> = out.stdout.split_whitespace().filter(|w| !w.starts_with('-')).collect();
    assert_eq!(offered, ["queue"], "{}", out.stderr);
}

#[test]
fn every_shell_gets_a_script_and_an_unknown_one_is_a_usage_error() {
    let sb = Sandbox::new();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let r = run(sb.drover().args(["completions", shell]));
        assert_eq!(r.code, Some(0), "{shell}: {}", r.stderr);
        assert!(r.stdout.contains("_DROVER_COMPLETE"), "{shell}: {}", r.stdout);
    }
    let r = run(sb.drover().args(["completions", "tcsh"]));
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("bash, zsh, fish, elvish, powershell"), "{}", r.stderr);
    // A broken environment does not keep the script from being printed.
    let r = run(sb.drover().env("DROVER_WORKERS", "x").args(["completions", "bash"]));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

#[test]
fn man_renders_the_page_and_one_per_command() {
    let sb = Sandbox::new();
    let page = run(sb.drover().arg("man"));
    assert_eq!(page.code, Some(0), "{}", page.stderr);
    let file = sb.write("drover.1", &page.stdout);
    // man itself renders it, with groff's warnings on.
    let shown = run(Command::new("man").env("MANWIDTH", "100").args(["--warnings", "-l"]).arg(&file));
    assert_eq!(shown.code, Some(0), "{}", shown.stderr);
    assert!(shown.stderr.trim().is_empty(), "man warned: {}", shown.stderr);
    assert!(shown.stdout.contains("declarative, config-driven"), "{}", shown.stdout);
    for sub in ["start", "status", "logs", "completions"] {
        assert!(shown.stdout.contains(sub), "drover(1) does not list {sub}");
    }

    let r = run(sb.drover().args(["man", "--out", "pages"]));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    for name in ["drover.1", "drover-start.1", "drover-logs.1", "drover-runs-show.1"] {
        let text = std::fs::read_to_string(sb.path("pages").join(name)).unwrap_or_default();
        assert!(text.contains(".TH"), "{name} is not a man page: {text:?}");
    }
}
