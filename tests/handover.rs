//! A graceful restart by fd inheritance: the old server fork/execs a new one
//! that inherits the listening socket, both accept for a while, the old one
//! stops accepting and drains. gracewatch must attribute every connection to
//! the process that accepted it and list both processes as the listener's
//! holders while both hold it. A `watch` that saw the restart tells the
//! processes' roles: the old generation draining, then drained and gone.

use std::os::unix::process::ExitStatusExt as _;

use gracewatch_testkit::{
    Child, Client, Expect, Netns, PROGRAM_TIMEOUT, STATE_TIMEOUT, Schema, Server, Soft,
    generations, listener, process, role_of, setup, wait_accepted_sum,
};
use rustix::process::Signal;
use serde_json::json;

#[test]
fn fd_inheritance_handover() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("handover");
    let addr = "127.0.0.1:7201";
    let inode = ns.netns_inode();
    let soft = Soft::new();

    let old = Server::listen(&ns, addr);
    let _c1 = Client::connect(&ns, addr, 4);
    old.wait_accepted(4);

    // Filtered by port: the new process does not exist yet.
    let watch = gw.watch(&["--port", "7201"]);
    watch.step(
        &Expect::new()
            .live(old.pid(), 4)
            .only_listed()
            .listener(inode, addr, "ipv4", &[(old.pid(), 4)])
            .only_listeners(),
        &soft,
    );

    let new = old.handover();
    assert_ne!(new.pid(), old.pid());
    let both = |o: u64, n: u64| {
        Expect::new()
            .live(old.pid(), o)
            .live(new.pid(), n)
            .only_listed()
            .listener(inode, addr, "ipv4", &[(old.pid(), o), (new.pid(), n)])
            .only_listeners()
    };
    // The one-shot snapshot first, then the event path (watch).
    gw.status_matching(&["--port", "7201"], &both(4, 0), &soft);
    watch.step(&both(4, 0), &soft);

    // Both accept: the kernel picks who gets each connection. What each
    // process says it accepted and holds is the truth to compare with.
    let _c2 = Client::connect(&ns, addr, 3);
    let each = wait_accepted_sum(&[&old, &new], 7);
    let (o, n) = (old.count(), new.count());
    assert_eq!(
        (o.open, n.open),
        (each[0], each[1]),
        "open connections differ from accepts: old {o:?}, new {n:?}"
    );
    let s = watch.step(&both(o.open, n.open), &soft);
    soft.eq(
        "old accepted_total since watch start",
        process(&s, old.pid()).and_then(|p| p["accepted_total"].as_u64()),
        Some(o.open - 4),
    );
    soft.eq(
        "new accepted_total",
        process(&s, new.pid()).and_then(|p| p["accepted_total"].as_u64()),
        Some(n.open),
    );
    gw.status_matching(&["--port", "7201"], &both(o.open, n.open), &soft);

    // The old process stops accepting (keeping the listener open): the next
    // connections can only go to the new one.
    old.stopaccept();
    let _c3 = Client::connect(&ns, addr, 2);
    new.wait_accepted(n.open + 2);
    assert_eq!(
        old.accepted(),
        o.open,
        "old server accepted after stopaccept"
    );
    let n_live = n.open + 2;
    watch.step(&both(o.open, n_live), &soft);

    // The old process drains: 0 live, still a holder of the listener.
    assert_eq!(old.closeall(), o.open);
    let s = watch.step(&both(0, n_live), &soft);
    soft.eq(
        "old closed_total after drain",
        process(&s, old.pid()).and_then(|p| p["closed_total"].as_u64()),
        Some(o.open),
    );
    soft.eq(
        "listener accepted_total since watch start",
        listener(&s, inode, addr).and_then(|l| l["accepted_total"].as_u64()),
        Some(5),
    );
    gw.status_matching(&["--port", "7201"], &both(0, n_live), &soft);

    // The old process closes its listener fd: it holds nothing any more and
    // is no longer listed; the new process is the only holder.
    old.closelistener();
    let only_new = Expect::new()
        .absent(old.pid())
        .live(new.pid(), n_live)
        .only_listed()
        .listener(inode, addr, "ipv4", &[(new.pid(), n_live)])
        .only_listeners();
    watch.step(&only_new, &soft);
    gw.status_matching(&["--port", "7201"], &only_new, &soft);

    // New connections keep going to the new process.
    let _c4 = Client::connect(&ns, addr, 1);
    new.wait_accepted(n.open + 3);
    watch.step(
        &Expect::new()
            .live(new.pid(), n_live + 1)
            .only_listed()
            .listener(inode, addr, "ipv4", &[(new.pid(), n_live + 1)])
            .only_listeners(),
        &soft,
    );

    watch.stop();
    soft.finish();
}

/// The same restart with the Rust fd-handover server of the test kit (the
/// one the demo and the churn benchmark run; `server.py` above is the
/// second implementation): SIGHUP starts the next generation, which
/// inherits the listener; the old one lets go of it and keeps its three
/// connections; `drain` signals it once their clients left, and the new one
/// serves on.
#[test]
fn rust_handover_server_hands_over_and_drains() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("rust-handover");
    let addr = "127.0.0.1:7206";
    let inode = ns.netns_inode();
    let soft = Soft::new();

    let mut server = ns.command(env!("CARGO_BIN_EXE_gw-handover-server"));
    server.arg(addr);
    let mut old = Child::spawn_command("gw-handover-server", server);
    let (old_pid, _) = old.wait_ready();
    // `h`: the server holds the connection until its client leaves.
    let clients = Client::connect_sending(&ns, addr, 3, "h");
    let (o, p) = (old_pid.to_string(), "--pid");
    gw.status_matching(
        &[p, &o],
        &Expect::new()
            .live(old_pid, 3)
            .only_listed()
            .listener(inode, addr, "ipv4", &[(old_pid, 3)])
            .only_listeners(),
        &soft,
    );

    // A monitor that sees the restart happen (a one-shot `status` meets
    // every process for the first time: all serving). Unfiltered: `--pid`
    // and `--port` hide the old generation once it let go of the listener.
    let watch = gw.watch(&[]);
    let gens_of = |s: &serde_json::Value| {
        listener(s, inode, addr)
            .map(generations)
            .unwrap_or_default()
    };
    let role_of_old = |s: &serde_json::Value| {
        gens_of(s)
            .into_iter()
            .find(|(pid, _)| *pid == old_pid)
            .map(|(_, role)| role)
    };
    watch.wait_check(STATE_TIMEOUT, "the old process serving", |s| {
        match (role_of(s, old_pid), gens_of(s)) {
            (Some("serving"), g) if g == [(old_pid, "serving".to_owned())] => Ok(()),
            (role, g) => Err(format!("role {role:?}, generations {g:?}")),
        }
    });

    old.signal(Signal::HUP);
    let new_pid: u32 = old.wait_line("`child PID`", PROGRAM_TIMEOUT, |lines| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix("child ")?.trim().parse().ok())
    });
    let n = new_pid.to_string();
    gw.status_matching(
        &[p, &o, p, &n],
        &Expect::new()
            .live(old_pid, 3)
            .live(new_pid, 0)
            .only_listed()
            .listener(inode, addr, "ipv4", &[(new_pid, 0)])
            .only_listeners(),
        &soft,
    );

    // It closed its copy of the listener while holding 3: draining, the
    // child serving; generations oldest first. (Holder changes are learned
    // at a rescan: allow for its pace.)
    let handed_over = watch.wait_check(
        STATE_TIMEOUT * 3,
        "the old process draining, the new serving",
        |s| {
            let roles = (role_of(s, old_pid), role_of(s, new_pid));
            let want = vec![
                (old_pid, "draining".to_owned()),
                (new_pid, "serving".to_owned()),
            ];
            if roles == (Some("draining"), Some("serving")) && gens_of(s) == want {
                Ok(())
            } else {
                Err(format!("roles {roles:?}, generations {:?}", gens_of(s)))
            }
        },
    );
    soft.invariants("watch after the handover", &handed_over);

    let drain = gw.spawn_drain(&["drain", "--pid", &o, "--json"]);
    assert_eq!(drain.wait_ready()["live"], 3, "the old generation holds 3");
    clients.closeall();
    let done = drain.wait(STATE_TIMEOUT);
    done.assert_code(0);
    done.assert_result(&[
        ("targets", json!([old_pid])),
        ("outcome", json!("drained")),
        ("exit_code", json!(0)),
        ("signal_sent", json!("SIGTERM")),
        ("initial_live", json!(3)),
        ("still_held", json!(0)),
    ]);
    let status = old.wait_exit(STATE_TIMEOUT);
    assert_eq!(
        status.signal(),
        Some(Signal::TERM.as_raw()),
        "the old generation dies of SIGTERM"
    );
    // Its clients left and it exited: no longer listed, and among the
    // listener's generations drained and then exited (a status published
    // between the two shows it drained; the new one serves on).
    let roles_seen = std::cell::RefCell::new(Vec::new());
    watch.wait_check(STATE_TIMEOUT * 3, "the old process exited", |s| {
        let role = role_of_old(s);
        if roles_seen.borrow().last() != Some(&role) {
            roles_seen.borrow_mut().push(role.clone());
        }
        match (role_of(s, old_pid), role.as_deref(), role_of(s, new_pid)) {
            (None, Some("exited"), Some("serving")) => Ok(()),
            other => Err(format!("(listed role, generation role, new) {other:?}")),
        }
    });
    let seen = roles_seen.into_inner();
    assert!(
        seen.iter()
            .all(|r| matches!(r.as_deref(), Some("draining" | "drained" | "exited"))),
        "the old generation never served again: {seen:?}"
    );
    watch.stop();

    let _later = Client::connect_sending(&ns, addr, 2, "h");
    gw.status_matching(
        &[p, &n],
        &Expect::new()
            .live(new_pid, 2)
            .only_listed()
            .listener(inode, addr, "ipv4", &[(new_pid, 2)])
            .only_listeners(),
        &soft,
    );
    soft.finish();
}

/// `watch --json --events` prints the restart events `/v1/events` carries,
/// from the model's one serializer: for an fd-inheritance restart whose
/// old process stops accepting, a `handover` (the new process's first
/// accept), a `draining` dated at that same moment (when the old process
/// stopped getting connections, not when the quiet period confirmed it)
/// and a `drained` once its clients leave, each line valid against the
/// event schema.
#[test]
fn watch_json_events_tell_the_handover_and_the_drain_from_when_it_stopped_accepting() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("events");
    let addr = "127.0.0.1:7207";
    let old = Server::listen(&ns, addr);
    let _c1 = Client::connect(&ns, addr, 2);
    old.wait_accepted(2);

    let mut cmd = std::process::Command::new(gw.bin());
    cmd.args(["watch", "--json", "--events"]);
    let watch = Child::spawn_command("gracewatch watch --json --events", cmd);
    let lines = || -> Vec<serde_json::Value> {
        watch
            .lines()
            .iter()
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
                if let Err(why) = Schema::Event.check(&v) {
                    panic!("not a valid event line: {why}\n{l}");
                }
                v
            })
            .collect()
    };
    // It prints nothing until something happens: wait until it is ready
    // by probing with processes that close their listener while holding a
    // connection (a `draining` line), a new one until one is reported.
    let mut ready = false;
    for i in 0..20 {
        let probe_addr = format!("127.0.0.1:{}", 7210 + i);
        let probe = Server::listen(&ns, &probe_addr);
        let _c = Client::connect(&ns, &probe_addr, 1);
        probe.wait_accepted(1);
        // Let a status show it holding the listener first.
        std::thread::sleep(std::time::Duration::from_millis(300));
        probe.closelistener();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::time::Instant::now() < until {
            if lines()
                .iter()
                .any(|v| v["kind"] == "draining" && v["pid"] == probe.pid())
            {
                ready = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if ready {
            break;
        }
    }
    assert!(
        ready,
        "no probe reported: {:?}\n{}",
        watch.lines(),
        watch.context()
    );

    // The old process accepts once more just before the restart, so the
    // model has to wait out the quiet period before it declares it draining.
    let _c1b = Client::connect(&ns, addr, 1);
    old.wait_accepted(3);
    let new = old.handover();
    old.stopaccept();
    let _c2 = Client::connect(&ns, addr, 3);
    new.wait_accepted(3);
    let wait_for = |kind: &str, pid: u32| {
        watch.wait_line(
            &format!("a `{kind}` line for {pid}"),
            STATE_TIMEOUT * 3,
            |seen| {
                seen.iter()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|v| v["kind"] == kind && v["pid"] == pid)
            },
        )
    };
    let handover = wait_for("handover", new.pid());
    assert_eq!(handover["alongside"], json!([old.pid()]), "{handover}");
    assert_eq!(handover["listener"]["local"], addr, "{handover}");
    let draining = wait_for("draining", old.pid());
    let seen_ms = gracewatch_testkit::monotonic_ns() / 1_000_000;
    let ms = |v: &serde_json::Value| {
        v["at"]["secs"].as_u64().unwrap_or(0) * 1000
            + v["at"]["nanos"].as_u64().unwrap_or(0) / 1_000_000
    };
    assert_eq!(draining["why"], "another_accepts", "{draining}");
    assert_eq!(draining["live"], 3, "{draining}");
    // Declared once the old process was quiet for 2 s, but dated at the
    // new process's first accept (when the old one stopped getting
    // connections).
    assert_eq!(draining["at"], handover["at"], "{draining}\n{handover}");
    let late = seen_ms.saturating_sub(ms(&draining));
    println!("the draining line came {late} ms after its `at`");
    assert!(late >= 300, "declared {late} ms after it started");

    let closed_ms = gracewatch_testkit::monotonic_ns() / 1_000_000;
    assert_eq!(old.closeall(), 3);
    let drained = wait_for("drained", old.pid());
    assert_eq!(drained["why"], "reached_zero", "{drained}");
    assert_eq!(drained["from_live"], 3, "{drained}");
    let took = drained["took_ms"].as_u64().expect("took_ms");
    let span = ms(&drained) - ms(&draining);
    println!("drained: took {took} ms");
    assert!(
        took.abs_diff(span) <= 1,
        "took {took} ms, lines {span} ms apart"
    );
    // From its start to after its clients left.
    assert!(
        ms(&drained) + 5 >= closed_ms,
        "drained before its clients left"
    );
    assert!(took >= late, "took {took} ms");
    // Restart lines only: never a status object.
    assert!(
        lines().iter().all(
            |v| ["handover", "draining", "drained"].contains(&v["kind"].as_str().unwrap_or(""))
        ),
        "{:?}",
        watch.lines()
    );
    watch.signal(Signal::INT);
    let mut watch = watch;
    let status = watch.wait_exit(STATE_TIMEOUT);
    assert!(
        matches!(status.code(), Some(0 | 130)),
        "watch ended with {status:?}"
    );
}
