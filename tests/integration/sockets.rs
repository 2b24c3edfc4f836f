//! Sockets drover holds: each instance gets them from fd 3 on with
//! LISTEN_PID its own pid and nothing else open; a client asking in a loop
//! sees no failed connection across reloads and restarts at capacity 1;
//! a port held by another process is an error in status, drover stays up,
//! and a later reload binds it.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{SUPERVISOR, Sandbox, Supervisor, instance, repo, wait_until, worker};

const LIMIT: Duration = Duration::from_secs(20);

pub(super) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap()
}

/// A worker running config/socket_server.py on `port`.
fn server(port: u16, reply: &str, extra: &str) -> String {
    let script = repo().join("config/socket_server.py");
    format!(
        "{SUPERVISOR}[defaults]\nstop_grace = \"5s\"\n\n[workers.web]\n\
         command = [\"python3\", {script:?}, \"--init\", \"0.3\", \"--reply\", \"{reply}\"{extra}]\n\
         sockets = [\"tcp://127.0.0.1:{port}\"]\nready = {{ log = \"serving\" }}\n"
    )
}

/// One request: the server's answer ("REPLY PID").
pub(super) fn ask(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"hi\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::other("closed without an answer"));
    }
    Ok(line.trim().to_string())
}

fn state(v: &Value) -> &str {
    instance(v, "web", 0)["state"].as_str().unwrap_or("?")
}

#[test]
fn fd_3_is_the_listening_socket_and_listen_pid_the_instance_s_own_pid() {
    let sb = Sandbox::new();
    let port = free_port();
    let info = sb.path("info");
    sb.write("daemon.toml", server(port, "one", &format!(", \"--info\", {:?}", info.display().to_string())));
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("web running", LIMIT, |v| state(v) == "running");
    let pid = instance(&v, "web", 0)["pid"].as_i64().unwrap();
    let text = std::fs::read_to_string(&info).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        vec![
            format!("pid={pid}").as_str(),
            format!("LISTEN_PID={pid}").as_str(),
            "LISTEN_FDS=1",
            "LISTEN_FDNAMES=web",
            // Nothing of drover's is left open in the instance.
            "fds=0,1,2,3",
        ],
        "{text}"
    );
    assert_eq!(ask(port).unwrap(), format!("one {pid}"));
    assert_eq!(worker(&v, "web")["sockets"][0]["address"], format!("tcp://127.0.0.1:{port}"));
    assert_eq!(worker(&v, "web")["sockets"][0]["bound"], true);
}

#[test]
fn a_client_asking_in_a_loop_sees_no_failure_across_reloads_and_a_restart_at_capacity_1() {
    let sb = Sandbox::new();
    let port = free_port();
    sb.write("daemon.toml", server(port, "gen0", ""));
    let sup = Supervisor::start(&sb);
    sup.wait_for("web running", LIMIT, |v| state(v) == "running");
    let (stop, asked, failed) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let client = {
        let (stop, asked, failed, seen) = (stop.clone(), asked.clone(), failed.clone(), seen.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                asked.fetch_add(1, Ordering::Relaxed);
                match ask(port) {
                    Ok(line) => seen.lock().unwrap().push(line),
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("request failed: {e}");
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let answered = |what: &str| {
        let what = what.to_string();
        wait_until(&format!("an answer from {what}"), LIMIT, || {
            seen.lock().unwrap().iter().any(|l| l.starts_with(&format!("{what} "))).then_some(())
        })
    };
    answered("gen0");
    for generation in 1..=3 {
        sb.write("daemon.toml", server(port, &format!("gen{generation}"), ""));
        let r = sb.cli(&["reload"]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        answered(&format!("gen{generation}"));
        // The old instance is gone: one instance again.
        sup.wait_for("the rollout done", LIMIT, |v| {
            worker(v, "web")["instances"].as_array().is_some_and(|a| a.len() == 1) && state(v) == "running"
        });
    }
    let before = sup.status();
    let old_pid = instance(&before, "web", 0)["pid"].as_i64().unwrap();
    let r = sb.cli(&["restart", "--wait", "web"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v = sup.wait_for("restarted", LIMIT, |v| {
        instance(v, "web", 0)["pid"].as_i64().is_some_and(|p| p != old_pid)
            && worker(v, "web")["instances"].as_array().is_some_and(|a| a.len() == 1)
    });
    let new_pid = instance(&v, "web", 0)["pid"].as_i64().unwrap();
    wait_until("an answer from the restarted instance", LIMIT, || {
        seen.lock().unwrap().iter().any(|l| l.ends_with(&format!(" {new_pid}"))).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    assert!(asked.load(Ordering::Relaxed) > 20, "the client kept asking");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed requests out of {}", asked.load(Ordering::Relaxed));
}

#[test]
fn a_port_held_by_another_process_is_an_error_in_status_and_a_reload_binds_it_once_free() {
    let sb = Sandbox::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let other = "\n[workers.other]\ncommand = [\"sleep\", \"1000\"]\n";
    sb.write("daemon.toml", format!("{}{other}", server(port, "one", "")));
    let sup = Supervisor::start(&sb);
    let v = sup.wait_for("the bind error", LIMIT, |v| {
        instance(v, "web", 0)["error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("cannot bind tcp://127.0.0.1:{port}")))
    });
    let e = instance(&v, "web", 0)["error"].as_str().unwrap_or_default().to_string();
    assert!(e.contains("in use"), "{e}");
    assert_eq!(worker(&v, "web")["sockets"][0]["bound"], false, "{v:#}");
    assert!(instance(&v, "web", 0)["pid"].is_null(), "it did not start: {v:#}");
    sup.wait_for("the other worker running", LIMIT, |v| instance(v, "other", 0)["state"] == "running");
    drop(taken);
    let r = sb.cli(&["reload"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v = sup.wait_for("web running", LIMIT, |v| state(v) == "running");
    assert_eq!(worker(&v, "web")["sockets"][0]["bound"], true);
    let pid = instance(&v, "web", 0)["pid"].as_i64().unwrap();
    assert_eq!(ask(port).unwrap(), format!("one {pid}"));
}

#[test]
fn a_unix_socket_gets_its_mode_and_its_file_goes_with_the_worker() {
    let sb = Sandbox::new();
    let script = repo().join("config/socket_server.py");
    let cfg = |with: bool| {
        let mut s = format!("{SUPERVISOR}[workers.keep]\ncommand = [\"sleep\", \"1000\"]\n");
        if with {
            s.push_str(&format!(
                "\n[workers.web]\ncommand = [\"python3\", {script:?}]\n\
                 sockets = [{{ address = \"unix://web.sock\", name = \"api\", mode = \"0660\" }}]\n\
                 ready = {{ log = \"serving\" }}\n"
            ));
        }
        s
    };
    sb.write("daemon.toml", cfg(true));
    let sup = Supervisor::start(&sb);
    sup.wait_for("web running", LIMIT, |v| state(v) == "running");
    let path = sb.path("web.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o660);
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    s.write_all(b"hi\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.starts_with("hello "), "{line}");
    sb.write("daemon.toml", cfg(false));
    assert_eq!(sb.cli(&["reload"]).code, Some(0));
    sup.wait_for("web removed", LIMIT, |v| {
        v["workers"].as_array().is_some_and(|w| w.iter().all(|w| w["name"] != "web"))
    });
    wait_until("the socket file removed", LIMIT, || (!path.exists()).then_some(()));
}
