//! One kernel side per host: `status --agent` and `watch --agent` read a
//! running agent instead of loading their own copy of the eBPF programs.
//! They must print what the local commands print (same counts, same
//! schema), hold no BPF program while they run, and fail (exit 1, nothing
//! on stdout) when the agent cannot be read, at start or later.

use std::time::Duration;

use gracewatch_testkit::{
    Agent, Client, Expect, Netns, STATE_TIMEOUT, Server, Soft, TempDir, live_of, process, setup,
};
use serde_json::Value;

/// BPF programs `pid` holds an fd of (each loaded program is one such fd;
/// `None` if its fd table cannot be read).
fn bpf_programs(pid: u32) -> Option<usize> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        fds.filter_map(Result::ok)
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter(|target| target.to_string_lossy() == "anon_inode:bpf-prog")
            .count(),
    )
}

fn field(status: &Value, pid: u32, name: &str) -> Option<u64> {
    process(status, pid).and_then(|p| p[name].as_u64())
}

#[test]
fn status_and_watch_through_the_agent_match_the_local_view_and_load_no_programs() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("agentview");
    let addr = "127.0.0.1:7211";
    let server = Server::listen(&ns, addr);
    let pid = server.pid();
    let pid_arg = pid.to_string();
    let soft = Soft::new();
    let dir = TempDir::new("agentview");
    let agent = Agent::builder().start(&gw, &dir);
    let unix = format!("unix:{}", agent.socket.display());
    let tcp = format!("http://{}", agent.addr);
    let expect = |live| {
        Expect::new().live(pid, live).only_listed().listener(
            ns.netns_inode(),
            addr,
            "ipv4",
            &[(pid, live)],
        )
    };

    // Both watches run before any connection, so both see every accept.
    let local = gw.watch(&["--pid", &pid_arg]);
    let remote = gw.watch(&["--pid", &pid_arg, "--agent", &unix]);
    local.step(&expect(0), &soft);
    remote.step(&expect(0), &soft);

    let _clients = Client::connect(&ns, addr, 5);
    server.wait_accepted(5);
    let l = local.step(&expect(5), &soft);
    let r = remote.step(&expect(5), &soft);
    soft.eq(
        "accepted_total: watch --agent as the local watch",
        field(&r, pid, "accepted_total"),
        field(&l, pid, "accepted_total"),
    );

    // Measured while both run: the local watch holds the programs it
    // loaded (so the measure sees them), the agent's reader holds none.
    let local_pid = local.pid().expect("the local watch runs");
    let remote_pid = remote.pid().expect("watch --agent runs");
    let agent_programs = bpf_programs(agent.pid()).expect("the agent's fd table");
    assert!(
        agent_programs > 0,
        "the agent holds its programs ({agent_programs})"
    );
    let local_programs = bpf_programs(local_pid).expect("the local watch's fd table");
    assert!(
        local_programs > 0,
        "the local watch loads its own copy of the programs ({local_programs})"
    );
    assert_eq!(
        bpf_programs(remote_pid),
        Some(0),
        "watch --agent loads no BPF program"
    );

    // One-shot status, local and through the agent (unix socket and TCP):
    // the same counts, each a schema-valid status (checked by the kit).
    let local_status = gw.status_matching(&["--pid", &pid_arg], &expect(5), &soft);
    for url in [&unix, &tcp] {
        let s = gw.status_matching(&["--pid", &pid_arg, "--agent", url], &expect(5), &soft);
        soft.eq(
            &format!("status --agent {url}: live as the local status"),
            live_of(&s, pid),
            live_of(&local_status, pid),
        );
        soft.eq(
            &format!("status --agent {url}: accepted_total as the agent's watch"),
            field(&s, pid, "accepted_total"),
            field(&r, pid, "accepted_total"),
        );
    }
    // The text table too, from the agent.
    let (table, _) = gw.run_ok(&["status", "--pid", &pid_arg, "--agent", &unix]);
    assert!(
        table.contains(&pid_arg),
        "status --agent prints the table with the process: {table}"
    );

    // Changes reach both watches alike.
    server.close(3);
    let l = local.step(&expect(2), &soft);
    let r = remote.step(&expect(2), &soft);
    for name in ["accepted_total", "closed_total"] {
        soft.eq(
            &format!("{name} after 3 closes: watch --agent as the local watch"),
            field(&r, pid, name),
            field(&l, pid, name),
        );
    }
    local.stop();

    // The agent goes away: watch --agent ends with an error, not a stream
    // that silently stops changing; status --agent prints nothing and fails.
    agent.stop_within(Duration::from_secs(10));
    let status = remote.wait_exit(STATE_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(1),
        "watch --agent exits 1 once the agent is gone: {:?}",
        remote.stderr_lines()
    );
    let stderr = remote.stderr_lines().join("\n");
    assert!(
        stderr.contains("failed to read the status of the agent"),
        "watch --agent says why it stopped: {stderr}"
    );
    for url in [&unix, &tcp] {
        let out = gw.run(&["status", "--json", "--agent", url]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "status --agent {url}: {stderr}");
        assert!(stdout.is_empty(), "status --agent {url} printed: {stdout}");
        assert!(
            stderr.contains(&format!("failed to read the status of the agent at {url}")),
            "status --agent {url} says why: {stderr}"
        );
    }
    soft.finish();
}
