//! Live counts of one server through its connections' whole life: opened
//! before and after gracewatch starts, closed by the server, half-closed by
//! the peer (CLOSE_WAIT, still live) and reset by the peer (CLOSE, no longer
//! live although the server still holds the fd). Counted both by `watch`
//! (kernel event path) and by one-shot `status` (snapshot path).

use gracewatch_testkit::{Client, Expect, Netns, Server, Soft, listener, live_of, process, setup};
use serde_json::Value;

fn total(status: &Value, pid: u32, field: &str) -> Option<u64> {
    process(status, pid).and_then(|p| p[field].as_u64())
}

fn listener_total(status: &Value, netns: u64, address: &str, field: &str) -> Option<u64> {
    listener(status, netns, address).and_then(|l| l[field].as_u64())
}

#[test]
fn counts_before_and_after_start() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("counts");
    let addr = "127.0.0.1:7101";
    let server = Server::listen(&ns, addr);
    let pid = server.pid();
    let pid_arg = pid.to_string();
    let soft = Soft::new();

    let expect = |live| {
        Expect::new().live(pid, live).only_listed().listener(
            ns.netns_inode(),
            addr,
            "ipv4",
            &[(pid, live)],
        )
    };

    // N = 5 connections that exist before gracewatch starts: only the startup
    // snapshot can know about them.
    let before = Client::connect(&ns, addr, 5);
    server.wait_accepted(5);

    let watch = gw.watch(&["--pid", &pid_arg]);
    let s = watch.step(&expect(5), &soft);
    soft.eq(
        "accepted_total after start (pre-existing connections are not accepts seen)",
        total(&s, pid, "accepted_total"),
        Some(0),
    );
    soft.eq(
        "closed_total after start",
        total(&s, pid, "closed_total"),
        Some(0),
    );

    // M = 3 more, accepted while gracewatch runs: kernel events.
    let after = Client::connect(&ns, addr, 3);
    server.wait_accepted(8);
    let s = watch.step(&expect(8), &soft);
    soft.eq(
        "accepted_total after 3 accepts",
        total(&s, pid, "accepted_total"),
        Some(3),
    );
    soft.eq(
        "listener accepted_total after 3 accepts",
        listener_total(&s, ns.netns_inode(), addr, "accepted_total"),
        Some(3),
    );
    soft.eq(
        "closed_total after 3 accepts",
        total(&s, pid, "closed_total"),
        Some(0),
    );

    // The one-shot path agrees, filtered by port this time.
    gw.status_matching(&["--port", "7101"], &expect(8), &soft);
    // The handshake of a loopback connection completes in the client's
    // context: the clients must not be credited with the server's connections.
    let clients = gw.status(&[
        "--pid",
        &before.pid().to_string(),
        "--pid",
        &after.pid().to_string(),
    ]);
    for client in [before.pid(), after.pid()] {
        assert_eq!(
            live_of(&clients, client).unwrap_or(0),
            0,
            "client {client} holds only outbound connections, yet has live inbound ones: {clients:#}"
        );
    }

    // The server closes its 2 oldest: they leave ESTABLISHED for FIN_WAIT.
    server.close(2);
    let s = watch.step(&expect(6), &soft);
    soft.eq(
        "closed_total after the server closed 2",
        total(&s, pid, "closed_total"),
        Some(2),
    );

    // The peer closes 3 (those of `after`, which the server has not closed):
    // the server side is in CLOSE_WAIT and the server still holds them, so
    // they are still live (ARCHITECTURE.md §4).
    after.close(3);
    server.wait_count("3 connections in CLOSE_WAIT", |c| {
        c.open == 6 && c.close_wait == 3
    });
    gw.status_matching(&["--pid", &pid_arg], &expect(6), &soft);
    // "Still 6" cannot be waited for on `watch` (it already says 6). Barrier:
    // one more connection, whose events come after the CLOSE_WAIT transitions
    // in the kernel's event stream; once watch shows it, it has processed
    // those transitions too, and must say 7 (not 4).
    after.open(1);
    server.wait_accepted(9);
    let s = watch.step(&expect(7), &soft);
    soft.eq(
        "accepted_total after the barrier connection",
        total(&s, pid, "accepted_total"),
        Some(4),
    );
    soft.eq(
        "closed_total with 3 in CLOSE_WAIT (not ended)",
        total(&s, pid, "closed_total"),
        Some(2),
    );

    // The server closes everything (including the CLOSE_WAIT ones): 0, but
    // it still holds the listener, so it is still listed.
    assert_eq!(server.closeall(), 7);
    let s = watch.step(&expect(0), &soft);
    soft.eq(
        "closed_total after closeall (5 pre-existing + 4 accepted)",
        total(&s, pid, "closed_total"),
        Some(9),
    );
    gw.status_matching(&["--pid", &pid_arg], &expect(0), &soft);

    watch.stop();
    soft.finish();
}

#[test]
fn reset_by_peer_still_held() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("reset");
    let addr = "127.0.0.1:7501";
    let server = Server::listen(&ns, addr);
    let pid = server.pid();
    let pid_arg = pid.to_string();
    let soft = Soft::new();
    let expect = |live| {
        Expect::new().live(pid, live).only_listed().listener(
            ns.netns_inode(),
            addr,
            "ipv4",
            &[(pid, live)],
        )
    };

    let client = Client::connect(&ns, addr, 5);
    server.wait_accepted(5);
    let watch = gw.watch(&["--pid", &pid_arg]);
    watch.step(&expect(5), &soft);

    // The client aborts its 2 oldest connections (RST). The kernel ends them
    // at once: the server's sockets go to CLOSE, although the server has not
    // noticed and still holds both fds. "Live" is ESTABLISHED or CLOSE_WAIT
    // (ARCHITECTURE.md §4): a reset connection is over, nothing more can be read from
    // or written to it, and a drain must not wait for the server to get
    // around to closing its fd. So live drops by 2 now, not when the fds close.
    client.reset(2);
    let held = server.wait_count("2 reset connections still held", |c| {
        c.open == 5 && c.reset == 2
    });
    assert_eq!(
        held.established, 3,
        "server's view after 2 resets: {held:?}"
    );
    let s = watch.step(&expect(3), &soft);
    soft.eq(
        "closed_total after 2 resets",
        total(&s, pid, "closed_total"),
        Some(2),
    );
    gw.status_matching(&["--pid", &pid_arg], &expect(3), &soft);

    // The server now closes the 2 reset fds (its oldest): no change, they
    // were already not live and must not be subtracted twice.
    server.close(2);
    let held = server.count();
    assert_eq!(
        (held.open, held.reset, held.established),
        (3, 0, 3),
        "server closed the wrong connections: {held:?}"
    );
    // Barrier (see counts_before_and_after_start): one more connection,
    // after which watch must say 4, not 2.
    client.open(1);
    server.wait_accepted(6);
    let s = watch.step(&expect(4), &soft);
    soft.eq(
        "closed_total after closing the reset fds (no double count)",
        total(&s, pid, "closed_total"),
        Some(2),
    );
    soft.eq(
        "accepted_total after the barrier connection",
        total(&s, pid, "accepted_total"),
        Some(1),
    );

    assert_eq!(server.closeall(), 4);
    let s = watch.step(&expect(0), &soft);
    soft.eq(
        "closed_total after closeall (5 pre-existing + 1 accepted)",
        total(&s, pid, "closed_total"),
        Some(6),
    );
    gw.status_matching(&["--pid", &pid_arg], &expect(0), &soft);

    watch.stop();
    soft.finish();
}
