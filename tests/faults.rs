//! Fault suite: gracewatch must never lose a connection or signal the wrong
//! process, whatever happens around it — killed mid-drain, its ring buffer
//! overflowing, connections shared by fork or passed over a unix socket, a
//! CLOSE_WAIT the server never closes.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use gracewatch_testkit::{
    Child, Client, Drain, Gracewatch, Netns, Server, live_of, monotonic_ns, report_signals_of,
    setup, without_caps,
};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

/// `sharer.py` in `ns`, listening on `addr`, once `n` clients are accepted.
fn sharer(ns: &Netns, addr: &str, n: u64) -> (Child, u32, Client) {
    let n_arg = n.to_string();
    let child = Child::python(
        ns,
        "sharer",
        "sharer.py",
        &["--listen", addr, "--accept", &n_arg],
    );
    let pid: u32 = child.wait_line("`ready PID`", T, |l| {
        l.iter()
            .find_map(|l| l.strip_prefix("ready ")?.parse().ok())
    });
    let client = Client::connect(ns, addr, n);
    child.wait_line("`accepted N`", T, |l| {
        l.iter().any(|l| l.starts_with("accepted ")).then_some(())
    });
    // Its `signal TERM T open=N` lines check every drain that signals it.
    report_signals_of(pid, &child);
    (child, pid, client)
}

/// Runs `gracewatch ARGS --json` in the background (the harness checks its
/// lines and, if it ends 0 with a signal, the target's own report).
fn drain(gw: &Gracewatch, args: &[&str]) -> Drain {
    let mut args = args.to_vec();
    args.push("--json");
    gw.spawn_drain(&args)
}

/// Waits for the first `progress` line (the drain is running and attached).
fn wait_progress(d: &Drain) {
    d.wait_ready();
}

/// Waits for the end and returns the `result` object.
fn result(d: Drain) -> Value {
    d.wait(T).result()
}

fn has_result(d: &Drain) -> bool {
    d.has_exited()
}

/// Ids of the BPF programs a process holds, from its fds' `fdinfo`
/// (`prog_id:` lines), as the kernel itself reports them.
fn bpf_progs_of(pid: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let Ok(entry) = entry else { continue };
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in info.lines() {
            if let Some(id) = line
                .strip_prefix("prog_id:")
                .and_then(|id| id.trim().parse::<u64>().ok())
                .filter(|id| !ids.contains(id))
            {
                ids.push(id);
            }
        }
    }
    ids
}

fn prog_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Which of `progs` still exist after up to 5 s. The kernel frees a
/// program once its last fd and link are gone, but after an RCU grace
/// period, so one may outlive its process's exit by a few milliseconds.
fn progs_left(progs: Vec<u64>) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while progs.iter().any(|&id| prog_exists(id)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    progs.into_iter().filter(|&id| prog_exists(id)).collect()
}

#[test]
fn sigkill_mid_drain_signals_nothing_and_leaves_no_bpf_behind() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("fault-kill");
    let (srv, pid, _client) = sharer(&ns, "127.0.0.1:7601", 2);
    let d = drain(&gw, &["drain", "--pid", &pid.to_string()]);
    wait_progress(&d);
    let progs = bpf_progs_of(d.pid());
    assert_eq!(
        progs.len(),
        4,
        "four tracepoint programs attached: {progs:?}"
    );
    // Dropping it SIGKILLs it and waits for its exit.
    drop(d);
    let left = progs_left(progs);
    assert!(left.is_empty(), "BPF programs left behind: {left:?}");
    assert_eq!(srv.request("ping", "pong"), "pong");
    assert!(
        !srv.lines().iter().any(|l| l.starts_with("signal")),
        "the target must not be signalled: {:?}",
        srv.lines()
    );
}

#[test]
fn ring_buffer_overflow_is_reported_and_repaired() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("fault-ring");
    // 4 KiB holds ~45 events; 900 connections make ~2700 in a burst.
    // (900: the default fd limit of 1024 bounds one python process.)
    let watch = gw.watch(&["--ring-buffer-size", "4096", "--port", "7602"]);
    // A reader on its own thread can keep up with a burst this size; frozen,
    // it cannot, and the programs must drop what does not fit.
    let gw_pid = watch.pid().expect("watch runs").to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &gw_pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {gw_pid} failed");
    };
    signal("-STOP");
    let burst = std::panic::catch_unwind(|| sharer(&ns, "127.0.0.1:7602", 900));
    signal("-CONT");
    let (srv, pid, client) = burst.unwrap_or_else(|e| std::panic::resume_unwind(e));
    let st = watch.wait_until(T, "900 live with lost events reported", |s| {
        live_of(s, pid) == Some(900) && s["lost_events"].as_u64().is_some_and(|n| n > 0)
    });
    let lost = st["lost_events"].as_u64().unwrap_or(0);
    eprintln!("lost {lost} events; counts repaired to 900");
    // The drain still waits for the true zero.
    let d = drain(
        &gw,
        &[
            "drain",
            "--pid",
            &pid.to_string(),
            "--ring-buffer-size",
            "4096",
        ],
    );
    wait_progress(&d);
    client.closeall();
    srv.send("closeall");
    let r = result(d);
    assert_eq!(r["outcome"], "drained", "{r}");
    assert_eq!(r["initial_live"], 900, "{r}");
    let seen = srv.wait_line("signal TERM", T, |l| {
        l.iter()
            .find(|l| l.starts_with("signal TERM "))
            .map(|l| (*l).to_owned())
    });
    assert!(seen.contains(" open=0 "), "signalled while holding: {seen}");
}

/// The accepting process forks; the child inherits the live fds. The parent
/// is not drained while it holds them; once it closes its copies it is,
/// and the child is shown holding them.
#[test]
fn fork_inherited_connections_pin_the_holder_not_the_accepter() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("fault-fork");
    let (srv, pid, _client) = sharer(&ns, "127.0.0.1:7603", 2);
    let child: u32 = srv
        .request("fork", "child")
        .trim_start_matches("child ")
        .parse()
        .expect("child pid");
    let d = drain(
        &gw,
        &["drain", "--pid", &pid.to_string(), "--signal", "none"],
    );
    wait_progress(&d);
    let watch = gw.watch(&["--port", "7603"]);
    watch.wait_until(T, "both processes hold both connections", |s| {
        live_of(s, pid) == Some(2) && live_of(s, child) == Some(2)
    });
    assert!(
        !has_result(&d),
        "must not be drained while it holds the fds"
    );
    srv.request("closeall", "closed");
    let r = result(d);
    assert_eq!(r["outcome"], "drained", "{r}");
    watch.wait_until(T, "the child alone holds them", |s| {
        live_of(s, child) == Some(2) && live_of(s, pid).unwrap_or(0) == 0
    });
}

/// The accepting process passes its connections over a unix socket
/// (SCM_RIGHTS) and closes its copies: the receiver is shown holding them.
#[test]
fn scm_rights_passed_connections_move_to_the_receiver() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("fault-pass");
    let (srv, pid, _client) = sharer(&ns, "127.0.0.1:7604", 3);
    let d = drain(
        &gw,
        &["drain", "--pid", &pid.to_string(), "--signal", "none"],
    );
    wait_progress(&d);
    let reply = srv.request("pass", "passed");
    let receiver: u32 = reply
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("receiver pid");
    // No --port filter: the receiver holds connections but no listener.
    let watch = gw.watch(&[]);
    watch.wait_until(T, "both hold the passed connections", |s| {
        live_of(s, receiver) == Some(3) && live_of(s, pid) == Some(3)
    });
    assert!(
        !has_result(&d),
        "must not be drained while it holds the fds"
    );
    srv.request("closeall", "closed");
    let r = result(d);
    assert_eq!(r["outcome"], "drained", "{r}");
    watch.wait_until(T, "the receiver alone holds them", |s| {
        live_of(s, receiver) == Some(3) && live_of(s, pid).unwrap_or(0) == 0
    });
}

/// The peer closed, the server never does: CLOSE_WAIT is live, the drain
/// waits until the deadline and names the connection pinning it.
#[test]
fn close_wait_never_closed_times_out_naming_the_connection() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("fault-cw");
    let (srv, pid, client) = sharer(&ns, "127.0.0.1:7605", 1);
    client.closeall();
    let started = Instant::now();
    let d = drain(
        &gw,
        &["drain", "--pid", &pid.to_string(), "--timeout", "2s"],
    );
    let r = result(d);
    let took = started.elapsed();
    assert_eq!(r["outcome"], "timeout", "{r}");
    assert_eq!(r["exit_code"], 124, "{r}");
    assert_eq!(r["still_held"], 1, "{r}");
    let held = &r["held"][0];
    assert_eq!(held["pid"], pid, "{r}");
    assert_eq!(held["local"], "127.0.0.1:7605", "{r}");
    assert!(
        held["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{r}"
    );
    assert!(
        took >= Duration::from_secs(2),
        "waited the deadline: {took:?}"
    );
    assert_eq!(srv.request("ping", "pong"), "pong");
    assert!(!srv.lines().iter().any(|l| l.starts_with("signal")));
}

/// Ctrl-C (SIGINT) or SIGTERM to gracewatch mid-drain: it stops waiting,
/// reports `interrupted`, exits 130, sends nothing, and detaches everything.
#[test]
fn interrupted_drain_exits_130_and_signals_nothing() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("fault-int");
    let (srv, pid, _client) = sharer(&ns, "127.0.0.1:7606", 1);
    for (sig, name) in [
        (rustix::process::Signal::INT, "SIGINT"),
        (rustix::process::Signal::TERM, "SIGTERM"),
    ] {
        let d = drain(&gw, &["drain", "--pid", &pid.to_string()]);
        wait_progress(&d);
        let gw_pid = d.pid();
        let progs = bpf_progs_of(gw_pid);
        assert_eq!(progs.len(), 4, "{name}: programs attached: {progs:?}");
        let raw = rustix::process::Pid::from_raw(gw_pid as i32).expect("pid");
        rustix::process::kill_process(raw, sig).expect("signal gracewatch");
        let done = d.wait(T);
        let r = done.result();
        assert_eq!(r["outcome"], "interrupted", "{name}: {r}");
        assert_eq!(r["exit_code"], 130, "{name}: {r}");
        assert!(r["signal_sent"].is_null(), "{name}: {r}");
        assert_eq!(done.code(), Some(130), "{name}");
        let left = progs_left(progs);
        assert!(
            left.is_empty(),
            "{name}: BPF programs left behind: {left:?}"
        );
        assert_eq!(srv.request("ping", "pong"), "pong");
        assert!(
            !srv.lines().iter().any(|l| l.starts_with("signal")),
            "{name}: the target must not be signalled"
        );
    }
}

/// The gate's last look at the target's own fds cannot be made: gracewatch
/// runs without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (it can still load
/// its programs) and the target belongs to another user, so its
/// `/proc/PID/fd` and network namespace are closed to it. That decides
/// nothing: the gate keeps looking, and at the deadline exits 124 naming
/// the reason, having signalled nothing. (Before: the unreadable table
/// counted as "holds nothing": exit 0 and SIGTERM.)
#[test]
fn unreadable_fd_table_is_a_doubt_not_a_drain() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("fault-fdread");
    let addr = "127.0.0.1:7607";
    let server = Server::listen_with(&ns, addr, Some(65534), &[]);
    let pid = server.pid().to_string();
    let wrapper = without_caps("cap_sys_ptrace,cap_dac_read_search");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let drain = gw.spawn_drain_under(
        &wrapper,
        &["drain", "--pid", &pid, "--timeout", "2s", "--json"],
    );
    let doubt = drain.wait_progress("the fd check's doubt", T, |p| {
        p["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot confirm"))
    });
    eprintln!("progress: {}", doubt["message"]);
    let done = drain.wait(T);
    done.assert_code(124);
    let result = done.assert_result(&[
        ("outcome", json!("timeout")),
        ("signal_sent", Value::Null),
        ("still_held", json!(0)),
    ]);
    let message = result["message"].as_str().unwrap_or_default();
    eprintln!("result: {message}");
    assert!(
        message.contains(&format!("the fds of pid {pid}")) && message.contains("cannot be read"),
        "the result must name the unreadable fd table: {message:?}"
    );
    server.ping();
    server.assert_no_signal("the drain could not be confirmed");
}

/// Any user can name its process with bytes that are not UTF-8
/// (`prctl(PR_SET_NAME)`). Such a server holding connections stays in
/// `status --json` and `watch --json` with its count (no false exit), and a
/// drain on it ends 0 as soon as it empties. (Before: its /proc/PID/stat
/// failed to read as text, which counted as "exited": it vanished from the
/// status within half a second, and the drain ran into its timeout.)
#[test]
fn a_process_named_with_non_utf8_bytes_stays_counted_and_drains() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("fault-comm");
    let addr = "127.0.0.1:7608";
    let server = Server::listen_with(&ns, addr, None, &["--name-hex", "fffe6777"]);
    let pid = server.pid();
    let comm = std::fs::read(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm, b"\xff\xfegw\n", "the server renamed itself");
    let _clients = Client::connect(&ns, addr, 2);
    server.wait_accepted(2);

    let watch = gw.watch(&["--port", "7608"]);
    let seen = watch.wait_until(T, "the server with 2 live", |s| live_of(s, pid) == Some(2));
    eprintln!(
        "listed as {}",
        gracewatch_testkit::process(&seen, pid)
            .map(|p| p["comm"].clone())
            .unwrap_or_default()
    );
    // Several housekeeping passes (every 500 ms) look at its liveness:
    // nothing may change. This waits for something that must not happen.
    std::thread::sleep(Duration::from_millis(1500));
    let latest = watch.latest().expect("a status line");
    assert_eq!(live_of(&latest, pid), Some(2), "watch lost it: {latest}");
    let status = gw.status(&["--port", "7608"]);
    assert_eq!(live_of(&status, pid), Some(2), "status lost it: {status}");

    let pid_s = pid.to_string();
    let drain = gw.spawn_drain(&["drain", "--pid", &pid_s, "--timeout", "10s", "--json"]);
    assert_eq!(drain.wait_ready()["live"], 2);
    let closed_ns = monotonic_ns();
    assert_eq!(server.closeall(), 2);
    let done = drain.wait(T);
    done.assert_code(0);
    done.assert_result(&[
        ("outcome", json!("drained")),
        ("signal_sent", json!("SIGTERM")),
    ]);
    let took = done.exited_ns.saturating_sub(closed_ns);
    eprintln!(
        "drained {:.1} ms after the server emptied",
        took as f64 / 1e6
    );
    assert!(
        took < 2_000_000_000,
        "the drain took {} ms after the server emptied",
        took / 1_000_000
    );
}

/// gracewatch runs out of file descriptors (EMFILE: its limit is lowered
/// below what it holds, with `prlimit`). A liveness look that cannot be
/// made is no exit: the server and its connections stay in the status, and
/// the failure is said once, not on every pass. (Before: a failed read of
/// /proc/PID/stat meant "exited": the server vanished with its count.)
#[test]
fn running_out_of_fds_is_not_an_exit() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("fault-emfile");
    let addr = "127.0.0.1:7609";
    let server = Server::listen(&ns, addr);
    let pid = server.pid();
    let _clients = Client::connect(&ns, addr, 2);
    server.wait_accepted(2);
    let watch = gw.watch(&["--port", "7609"]);
    watch.wait_until(T, "the server with 2 live", |s| live_of(s, pid) == Some(2));
    let gw_pid = watch.pid().expect("watch runs").to_string();
    let out = Command::new("prlimit")
        .args(["--pid", &gw_pid, "--nofile=3:3"])
        .output()
        .expect("prlimit runs (util-linux)");
    assert!(out.status.success(), "prlimit: {out:?}");
    // Several housekeeping passes (every 500 ms) try to look and fail with
    // EMFILE. This waits for something that must not happen.
    std::thread::sleep(Duration::from_millis(2000));
    let latest = watch.latest().expect("a status line");
    assert_eq!(
        live_of(&latest, pid),
        Some(2),
        "the server must stay with its 2 connections: {latest}\n{:?}",
        watch.stderr_lines()
    );
    let stderr = watch.stderr_lines();
    let said: Vec<&String> = stderr
        .iter()
        .filter(|l| l.contains("cannot tell whether pid"))
        .collect();
    eprintln!("stderr: {stderr:?}");
    assert_eq!(said.len(), 1, "said once: {stderr:?}");
    assert!(said[0].contains("EMFILE"), "{said:?}");
}
