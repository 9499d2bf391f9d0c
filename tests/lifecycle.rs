//! Things that appear after gracewatch started (a namespace, a listener,
//! a process) and the empty answer when nothing matches.

use gracewatch_testkit::{
    Client, Expect, Netns, Server, Soft, listener, process, setup, status::listeners_on_port,
};

#[test]
fn server_started_after_gracewatch() {
    let Some(gw) = setup() else { return };
    let addr = "127.0.0.1:7301";
    let soft = Soft::new();

    let watch = gw.watch(&["--port", "7301"]);
    watch.step(&Expect::new().only_listed().only_listeners(), &soft);

    // Namespace, process and listener are all newer than gracewatch.
    let ns = Netns::new("late");
    let inode = ns.netns_inode();
    let server = Server::listen(&ns, addr);
    let pid = server.pid();
    let expect = |live| {
        Expect::new()
            .live(pid, live)
            .only_listed()
            .listener(inode, addr, "ipv4", &[(pid, live)])
            .only_listeners()
    };
    watch.step(&expect(0), &soft);

    let client = Client::connect(&ns, addr, 1);
    server.wait_accepted(1);
    let s = watch.step(&expect(1), &soft);
    soft.eq(
        "accepted_total",
        process(&s, pid).and_then(|p| p["accepted_total"].as_u64()),
        Some(1),
    );
    soft.eq(
        "listener accepted_total",
        listener(&s, inode, addr).and_then(|l| l["accepted_total"].as_u64()),
        Some(1),
    );
    gw.status_matching(&["--port", "7301"], &expect(1), &soft);

    client.closeall();
    server.wait_count("1 connection in CLOSE_WAIT", |c| c.close_wait == 1);
    assert_eq!(server.closeall(), 1);
    watch.step(&expect(0), &soft);

    watch.stop();
    soft.finish();
}

#[test]
fn empty_state() {
    let Some(gw) = setup() else { return };
    // Nobody listens on this port, in this namespace or any other.
    let _ns = Netns::new("empty");

    let (stdout, stderr) = gw.run_ok(&["status", "--port", "7601"]);
    assert!(
        !stdout.trim().is_empty() && stdout.to_lowercase().contains("no "),
        "gracewatch status --port 7601 (nothing listens there) should say so plainly (e.g. \"no listener on port 7601\"), printed: {stdout:?}\n  stderr: {stderr}"
    );

    let s = gw.status(&["--port", "7601"]);
    assert!(
        listeners_on_port(&s, 7601).is_empty()
            && s["processes"].as_array().is_some_and(Vec::is_empty),
        "status --port 7601 --json should list no listener and no process: {s:#}"
    );
}
