//! Resets racing accepts. Clients that connect and reset at once (SO_LINGER
//! {1, 0}, then close) make the peer's RST reach the server's socket on one
//! CPU while the server accepts it on another. The state-change program runs
//! just before the kernel stores the new state, so a reset can slip between
//! the accept program's insert and its look at the state: such a connection
//! must still end in gracewatch's count (the rescans retire what a fresh
//! snapshot no longer shows; the kernel's `tcp_destroy_sock` ends it when
//! the server lets go of it), and a drain or wait after the storm must end
//! at once.
//!
//! Bounded: a few rounds of at most `PER_ROUND` connections, stopped after
//! `STORM` in all, so the whole test stays well under a minute.
//!
//! Also here: the kernel's tables filling up (`--max-connections`), the
//! other way connections go untracked. Startup and later accepts must
//! degrade the same way: counted once per episode, logged once, repaired by
//! rescans, counts exact.

use std::time::{Duration, Instant};

use gracewatch_testkit::{
    Client, Expect, Netns, STARTUP_TIMEOUT, STATE_TIMEOUT, Server, live_of, program, setup,
};

/// Connections per round: below the listener's backlog, so that no
/// handshake is dropped and the server accepts exactly what the clients
/// completed.
const PER_ROUND: u64 = 3000;
const ROUNDS: usize = 12;
/// Time for all rounds together (each also stops after 8 s).
const STORM: Duration = Duration::from_secs(30);
/// How long gracewatch may take to agree with the server after a round:
/// a rescan (one a second on an idle host) must have retired anything the
/// events missed.
const HEAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Entries in the kernel's `LIVE` map (connections the programs track by
/// socket) of the gracewatch process `pid`: the map is found through the
/// process's fds (`map_id:` in fdinfo) and read with bpftool.
fn live_map_entries(pid: u32) -> usize {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids: Vec<u64> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("map_id:")?.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let bpftool = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .expect("failed to run bpftool");
        assert!(out.status.success(), "bpftool {args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).expect("bpftool printed JSON")
    };
    let live: Vec<u64> = ids
        .into_iter()
        .filter(|id| bpftool(&["map", "show", "id", &id.to_string()])["name"] == "LIVE")
        .collect();
    assert_eq!(live.len(), 1, "gracewatch (pid {pid}) holds one LIVE map");
    bpftool(&["map", "dump", "id", &live[0].to_string()])
        .as_array()
        .map_or(0, Vec::len)
}

/// Runs `resetter.py` inside `ns` to completion; returns the connections it
/// established (and reset).
fn reset_storm(ns: &Netns, addr: &str, count: u64) -> u64 {
    let out = ns
        .command("python3")
        .args([
            &program("resetter.py"),
            "--connect",
            addr,
            "--count",
            &count.to_string(),
            "--workers",
            "4",
            "--seconds",
            "8",
        ])
        .output()
        .expect("failed to run resetter.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "resetter.py failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("done ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("resetter.py printed no `done N`: {stdout}"))
}

#[test]
fn resets_racing_accepts_leave_exact_counts() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("races");
    let addr = "127.0.0.1:7401";
    let server = Server::listen_with_backlog(&ns, addr, 4096);
    let pid = server.pid();
    let pid_arg = pid.to_string();

    // Two connections that stay open through the storm: the counts must
    // come back to exactly these, and the wait below pends on them.
    let kept = Client::connect(&ns, addr, 2);
    server.wait_accepted(2);
    let watch = gw.watch(&["--pid", &pid_arg]);
    watch.wait_for(&Expect::new().live(pid, 2));
    let waiter = gw.spawn_drain(&["wait", "--pid", &pid_arg, "--timeout", "120s", "--json"]);
    assert_eq!(waiter.wait_ready()["live"], 2, "the wait's first progress");

    let start = Instant::now();
    let mut accepted = 2;
    let mut held = 2;
    let mut storms = 0;
    for round in 1..=ROUNDS {
        if start.elapsed() > STORM {
            break;
        }
        let n = reset_storm(&ns, addr, PER_ROUND);
        storms += n;
        accepted += n;
        held += n;
        server.wait_accepted(accepted);
        // The server's own view: the kept two are established, every reset
        // one is held in CLOSE (not live).
        let count = server.count();
        let truth = count.established + count.close_wait;
        assert_eq!(
            count.open, held,
            "round {round}: the server holds every connection it accepted since the last round"
        );
        // The kept two predate gracewatch (tracked by tuple), so no
        // connection the programs track by socket is live: a missed end is
        // retired by a rescan, which drops the kernel entry too. Waiting for
        // that first also means the status read next is not one printed
        // before the storm's last events.
        let t0 = Instant::now();
        let pid_gw = watch.pid().expect("watch runs");
        while live_map_entries(pid_gw) != 0 {
            assert!(
                t0.elapsed() < HEAL_TIMEOUT,
                "round {round}: {} LIVE entries left for ended connections after {HEAL_TIMEOUT:?}",
                live_map_entries(pid_gw)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        watch.wait_until(
            HEAL_TIMEOUT,
            &format!("round {round}: live {truth} as the server counts it ({count:?})"),
            |s| live_of(s, pid) == Some(truth),
        );
        eprintln!(
            "round {round}: {n} connections reset, {} held in CLOSE, gracewatch agreed after {:?}",
            count.reset,
            t0.elapsed()
        );
        // Letting go of the reset ones destroys them (the server's fd limit
        // is also finite).
        held -= server.close_reset();
        watch.wait_until(
            HEAL_TIMEOUT,
            &format!("round {round}: live {truth} after the reset connections were closed"),
            |s| live_of(s, pid) == Some(truth),
        );
    }
    assert!(
        storms >= 1000,
        "only {storms} connections were reset: the storm did not run"
    );

    // The server lets go of everything: the kept two end with events, the
    // reset ones are destroyed. Every count must reach 0 and the wait end
    // drained, promptly.
    let closed_ns = gracewatch_testkit::monotonic_ns();
    server.closeall();
    drop(kept);
    let done = waiter.wait(HEAL_TIMEOUT);
    done.assert_code(0);
    eprintln!(
        "wait ended {} after the server closed everything",
        gracewatch_testkit::gap_ms(done.exited_ns, closed_ns)
    );
    watch.wait_until(STATE_TIMEOUT, "live 0 after closeall", |s| {
        live_of(s, pid).unwrap_or(0) == 0
    });
    assert_eq!(
        live_map_entries(watch.pid().expect("watch runs")),
        0,
        "LIVE entries left at the end"
    );
    // A fresh drain agrees and signals the server at once.
    let drain = gw.drain_to_end(&["drain", "--pid", &pid_arg, "--timeout", "10s", "--json"]);
    drain.assert_code(0);
    assert!(
        drain.elapsed < Duration::from_secs(10),
        "the drain took {:?}",
        drain.elapsed
    );
}

/// The smallest table `--max-connections` allows.
const TABLE: u64 = 1024;

fn map_full(status: &serde_json::Value) -> u64 {
    status["map_full_total"].as_u64().unwrap_or(0)
}

#[test]
fn full_tables_degrade_and_heal() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("full");
    let addr = "127.0.0.1:7402";
    let server = Server::listen_with_backlog(&ns, addr, 4096);
    let pid = server.pid();
    let pid_arg = pid.to_string();
    let n = TABLE + 100;

    // More pre-existing connections than the table holds: startup cannot
    // register them all. It must still start, count every one, and say so.
    let before = Client::connect(&ns, addr, n);
    server.wait_accepted(n);
    let max = TABLE.to_string();
    let watch = gw.watch(&["--pid", &pid_arg, "--max-connections", &max]);
    let s = watch.wait_until(
        STARTUP_TIMEOUT,
        "all pre-existing connections counted",
        |s| live_of(s, pid) == Some(n),
    );
    assert_eq!(map_full(&s), 1, "one episode at startup: {s}");

    // As many again while it runs: the live table fills after TABLE
    // accepts. The rest are found by rescans; one episode, one warning.
    let after = Client::connect(&ns, addr, n);
    server.wait_accepted(2 * n);
    let s = watch.wait_until(STATE_TIMEOUT * 2, "every connection counted", |s| {
        live_of(s, pid) == Some(2 * n)
    });
    let episodes = map_full(&s);
    assert!(
        (2..=3).contains(&episodes),
        "the full live table is one episode (not one per accept): map_full_total {episodes}"
    );
    let warnings = watch
        .stderr_lines()
        .iter()
        .filter(|l| l.contains("table is full") || l.contains("could not be registered"))
        .count();
    assert_eq!(
        warnings as u64,
        episodes,
        "one warning per episode: {:?}",
        watch.stderr_lines()
    );

    // Everything ends: tracked ones by events, the others by rescans.
    assert_eq!(server.closeall(), 2 * n);
    drop((before, after));
    watch.wait_until(
        STATE_TIMEOUT * 2,
        "live 0 once the server closed all",
        |s| live_of(s, pid).unwrap_or(0) == 0,
    );
    watch.wait_for(&Expect::new().live(pid, 0));
}
