//! IPv6: a server on `[::1]` with IPv6 clients, and a dual-stack server on
//! `[::]` (IPV6_V6ONLY=0) with IPv4 clients (seen by the server as
//! `::ffff:127.0.0.1`) and IPv6 clients. Both listeners are IPv6 sockets.

use gracewatch_testkit::{Client, Expect, Netns, Server, Soft, setup};

#[test]
fn ipv6_and_dual_stack() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("ipv6");
    let inode = ns.netns_inode();
    let soft = Soft::new();
    let (a6, ads) = ("[::1]:7401", "[::]:7402");

    let v6 = Server::listen(&ns, a6);
    let ds = Server::listen(&ns, ads);
    assert_eq!((v6.address(), ds.address()), (a6, ads));
    let expect = |l6: u64, lds: u64| {
        Expect::new()
            .live(v6.pid(), l6)
            .live(ds.pid(), lds)
            .only_listed()
            .listener(inode, a6, "ipv6", &[(v6.pid(), l6)])
            .listener(inode, ads, "ipv6", &[(ds.pid(), lds)])
            // In particular no phantom `0.0.0.0:7402` for the IPv4 clients.
            .only_listeners()
    };

    let watch = gw.watch(&["--port", "7401", "--port", "7402"]);
    watch.step(&expect(0, 0), &soft);

    let _c6 = Client::connect(&ns, a6, 3);
    v6.wait_accepted(3);
    watch.step(&expect(3, 0), &soft);

    // IPv4 first, so that the dual-stack server's 2 oldest are the IPv4 ones.
    let c4 = Client::connect(&ns, "127.0.0.1:7402", 2);
    ds.wait_accepted(2);
    watch.step(&expect(3, 2), &soft);
    let c6b = Client::connect(&ns, "[::1]:7402", 2);
    ds.wait_accepted(4);
    watch.step(&expect(3, 4), &soft);
    gw.status_matching(&["--port", "7401", "--port", "7402"], &expect(3, 4), &soft);

    // IPv4 peers half-close: CLOSE_WAIT on IPv4-mapped sockets, still live.
    // Barrier (see counts.rs): one more IPv6 connection, then 5, not 3.
    c4.close(2);
    ds.wait_count("2 connections in CLOSE_WAIT", |c| {
        c.open == 4 && c.close_wait == 2
    });
    c6b.open(1);
    ds.wait_accepted(5);
    watch.step(&expect(3, 5), &soft);

    // The dual-stack server closes its 2 oldest (the IPv4 ones in CLOSE_WAIT).
    ds.close(2);
    watch.step(&expect(3, 3), &soft);
    gw.status_matching(&["--port", "7401", "--port", "7402"], &expect(3, 3), &soft);

    assert_eq!(v6.closeall(), 3);
    assert_eq!(ds.closeall(), 3);
    watch.step(&expect(0, 0), &soft);

    watch.stop();
    soft.finish();
}
