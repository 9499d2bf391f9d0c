//! What attributing connections at their first send or receive must not
//! lose (issue 15). The programs hook no syscall: a connection is claimed
//! by the first process that reads or writes it, so one a server accepted
//! and never touched is invisible to them until a rescan finds its fd. A
//! drain must still never call such a target drained, and an exit must
//! still count such connections as lost. `server.py` accepts and holds,
//! never reading or writing: exactly that case.

use std::time::Duration;

use gracewatch_testkit::{Client, Netns, STARTUP_TIMEOUT, STATE_TIMEOUT, Server, setup};
use serde_json::json;

/// Drains a target that holds one connection from before the drain and
/// then accepts `n` more it never touches; closes the first one so the
/// count the events give drops to zero; then, once `before_exit` returns,
/// the target exits. The drain must signal nothing and exit 3, naming the
/// untouched connections as lost.
fn untouched_connections_are_held_until_the_exit(name: &str, port: u16, wait_found: bool) {
    let Some(gw) = setup() else { return };
    let ns = Netns::new(name);
    let addr = format!("127.0.0.1:{port}");
    let mut server = Server::listen(&ns, &addr);
    let _first = Client::connect(&ns, &addr, 1);
    server.wait_accepted(1);
    let pid = server.pid().to_string();
    let drain = gw.spawn_drain(&["drain", "--pid", &pid, "--json"]);
    assert_eq!(drain.wait_ready()["live"], 1);

    // Accepted while the drain watches, never read or written.
    let _untouched = Client::connect(&ns, &addr, 2);
    server.wait_accepted(3);
    // The pre-existing one goes: what the kernel reported drops to 0.
    server.close(1);
    if wait_found {
        // A rescan finds the two held and counts them.
        drain.wait_progress(
            "a progress line with the 2 untouched connections",
            STATE_TIMEOUT,
            |v| v["live"] == 2,
        );
    } else {
        // Long enough for the gate to have looked at the fds at zero.
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(
        !drain.has_exited(),
        "the drain ended while the target held 2 accepted connections"
    );
    server.assert_no_signal("while it holds 2 untouched connections");

    server.exit();
    let done = drain.wait(STATE_TIMEOUT);
    done.assert_code(3);
    let result = done.assert_result(&[
        ("outcome", json!("target_exited")),
        ("signal_sent", serde_json::Value::Null),
        ("still_held", json!(2)),
    ]);
    let message = result["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("still held 2 live connection"),
        "the result should count the 2 untouched connections: {result}"
    );
    assert_eq!(server.wait_exit(STATE_TIMEOUT).code(), Some(0));
}

/// The target exits before any rescan found its untouched connections:
/// only the gate's own look at its fds and the kernel's report of what its
/// exit released know of them.
#[test]
fn untouched_connections_hold_a_drain_and_count_at_an_exit_before_any_rescan() {
    untouched_connections_are_held_until_the_exit("firstio-early", 7801, false);
}

/// The target exits after a rescan found and counted them.
#[test]
fn untouched_connections_found_by_a_rescan_count_at_an_exit() {
    untouched_connections_are_held_until_the_exit("firstio-found", 7802, true);
}

/// The kernel side is four raw tracepoints and nothing else: no
/// `syscalls:*` tracepoint (it would put every syscall on the host on the
/// slow path, and take 60–80 ms to detach at exit).
#[test]
fn only_raw_tracepoints_are_attached() {
    let Some(gw) = setup() else { return };
    let watch = gw.watch(&[]);
    watch.wait_until(STARTUP_TIMEOUT, "its first status", |_| true);
    let pid = watch.pid().expect("the watch runs");
    let mut links = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("read fdinfo") {
        let Ok(text) = std::fs::read_to_string(entry.expect("fdinfo entry").path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        if let Some(kind) = field("link_type:") {
            links.push((kind, field("tp_name:").unwrap_or_default()));
        }
    }
    links.sort();
    let want: Vec<(String, String)> = [
        "inet_sock_set_state",
        "sock_recv_length",
        "sock_send_length",
        "tcp_destroy_sock",
    ]
    .iter()
    .map(|tp| ("raw_tracepoint".to_owned(), (*tp).to_owned()))
    .collect();
    assert_eq!(links, want, "the links gracewatch holds");
    watch.stop();
}
