//! Without the capabilities it needs, gracewatch refuses with exit code 4
//! and one line naming the missing capability — before touching the kernel
//! or any process. Without CAP_KILL it can watch, but the kernel refuses
//! its signal for another user's process: exit code 5, never success. Capabilities are dropped with `capsh`, as an operator
//! running it unprivileged would have them dropped.

use std::process::{Command, Stdio};

use gracewatch_testkit::{
    Agent, Client, Netns, STARTUP_TIMEOUT, Server, TempDir, setup, without_caps,
};
use serde_json::{Value, json};

/// Runs `gracewatch ARGS` with `drop` removed from the bounding and
/// effective sets; returns (exit code, stderr).
fn run_without(gw: &gracewatch_testkit::Gracewatch, drop: &str, args: &str) -> (i32, String) {
    let cmd = format!("exec {} {args}", gw.bin().display());
    let out = Command::new("capsh")
        .args([&format!("--drop={drop}"), "--", "-c", &cmd])
        .stdin(Stdio::null())
        .output()
        .expect("capsh runs (package libcap2-bin)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_capabilities_exit_4_naming_the_capability() {
    let Some(gw) = setup() else { return };
    let cases = [
        ("cap_bpf,cap_sys_admin", "status", "CAP_BPF"),
        ("cap_perfmon,cap_sys_admin", "status --json", "CAP_PERFMON"),
        ("cap_bpf,cap_sys_admin", "watch --json", "CAP_BPF"),
    ];
    for (drop, args, named) in cases {
        let (code, stderr) = run_without(&gw, drop, args);
        assert_eq!(
            code, 4,
            "`gracewatch {args}` without {drop}: stderr {stderr:?}"
        );
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line, got {stderr:?}");
        assert!(
            lines[0].contains(named),
            "{named} must be named: {stderr:?}"
        );
        assert!(!stderr.contains("panicked"), "{stderr:?}");
    }
}

#[test]
fn drain_without_capabilities_exits_4_and_signals_nothing() {
    let Some(gw) = setup() else { return };
    // A target that would die of SIGTERM: it must still be alive afterwards.
    let mut target = Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    let (code, stderr) = run_without(
        &gw,
        "cap_bpf,cap_sys_admin",
        &format!("drain --pid {} --timeout 5s", target.id()),
    );
    let alive = target.try_wait().expect("try_wait").is_none();
    let _ = target.kill();
    let _ = target.wait();
    assert_eq!(code, 4, "stderr {stderr:?}");
    assert!(stderr.contains("CAP_BPF"), "{stderr:?}");
    assert!(alive, "the target must not have been signalled");
}

/// A target owned by another user, drained by a gracewatch without
/// CAP_KILL: the kernel refuses the signal (EPERM). That is exit 5,
/// `signal_refused`, naming the errno and the target — and the target
/// lives on. (Before: "drained … but exited before SIGTERM could be sent",
/// exit 0, the target untouched and alive.)
#[test]
fn refused_signal_exits_5_and_the_target_lives() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("caps-refused");
    let server = Server::listen_with(&ns, "127.0.0.1:7611", Some(65534), &[]);
    let pid = server.pid().to_string();
    let wrapper = without_caps("cap_kill");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let done = gw
        .spawn_drain_under(
            &wrapper,
            &["drain", "--pid", &pid, "--timeout", "10s", "--json"],
        )
        .wait(STARTUP_TIMEOUT);
    done.assert_code(5);
    let result = done.assert_result(&[
        ("outcome", json!("signal_refused")),
        ("exit_code", json!(5)),
        ("signal_sent", Value::Null),
    ]);
    let message = result["message"].as_str().unwrap_or_default();
    eprintln!("refused: {message}");
    assert!(
        message.contains("EPERM")
            && message.contains(&format!("pid {pid} (python3)"))
            && message.contains("SIGTERM"),
        "the message must name the errno, the target and the signal: {message:?}"
    );
    server.ping();
    server.assert_no_signal("the kernel refused it");

    // --on-timeout kill at a deadline: refused too, and said so (not 124).
    let _client = Client::connect(&ns, "127.0.0.1:7611", 1);
    server.wait_accepted(1);
    let done = gw
        .spawn_drain_under(
            &wrapper,
            &[
                "drain",
                "--pid",
                &pid,
                "--timeout",
                "1s",
                "--on-timeout",
                "kill",
                "--json",
            ],
        )
        .wait(STARTUP_TIMEOUT);
    done.assert_code(5);
    let result = done.assert_result(&[
        ("outcome", json!("signal_refused")),
        ("signal_sent", Value::Null),
        ("still_held", json!(1)),
    ]);
    let message = result["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("deadline passed")
            && message.contains("EPERM")
            && message.contains("SIGKILL"),
        "{message:?}"
    );
    server.ping();
}

/// One HTTP/1.1 request over the agent's unix socket: status and body.
fn unix_http(agent: &Agent, method: &str, path: &str, body: &str) -> (u16, String) {
    let headers = [("Content-Type", "application/json")];
    let answer = agent
        .request(&agent.unix(), method, path, &headers, body.as_bytes())
        .expect("an answer on the agent's unix socket");
    (answer.code, answer.body)
}

/// The metrics-only agent of the README (no CAP_KILL) asked to drain
/// another user's process: the refusal is reported as `signal_refused`
/// (exit code 5) over its unix socket and by `drain --agent unix:PATH`,
/// and counted in the outcome metric. The target lives on.
#[test]
fn agent_without_cap_kill_reports_the_refused_signal() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("caps-agent");
    let server = Server::listen_with(&ns, "127.0.0.1:7612", Some(65534), &[]);
    let pid = server.pid();
    let dir = TempDir::new("caps-agent");
    let wrapper = without_caps("cap_kill");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let agent = Agent::builder().wrapper(&wrapper).start(&gw, &dir);

    let (code, body) = unix_http(
        &agent,
        "POST",
        "/v1/drains",
        &format!(r#"{{"pids": [{pid}], "timeout": "10s"}}"#),
    );
    assert!((200..300).contains(&code), "POST /v1/drains: {code} {body}");
    let id = serde_json::from_str::<Value>(&body).expect("JSON")["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let (code, body) = unix_http(&agent, "GET", &format!("/v1/drains/{id}?wait=20s"), "");
    assert_eq!(code, 200, "{body}");
    let status: Value = serde_json::from_str(&body).expect("JSON");
    let report = &status["report"];
    eprintln!("agent: {}", report["message"]);
    assert_eq!(report["outcome"], "signal_refused", "{status}");
    assert_eq!(report["exit_code"], 5, "{status}");
    assert!(
        report["message"]
            .as_str()
            .is_some_and(|m| m.contains("EPERM")),
        "{status}"
    );

    let unix = format!("unix:{}", agent.socket.display());
    let pid_s = pid.to_string();
    let done = gw.drain_to_end(&["drain", "--agent", &unix, "--pid", &pid_s, "--json"]);
    done.assert_code(5);
    done.assert_result(&[
        ("outcome", json!("signal_refused")),
        ("signal_sent", Value::Null),
    ]);

    let (_, metrics) = unix_http(&agent, "GET", "/metrics", "");
    assert!(
        metrics
            .lines()
            .any(|l| l == "gracewatch_drains_total{outcome=\"signal_refused\"} 2"),
        "two refused drains counted:\n{metrics}"
    );
    server.ping();
    server.assert_no_signal("the agent has no CAP_KILL");
}
