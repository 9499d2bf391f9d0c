//! Per-connection activity (issue 14, item 1) against a real server and
//! real clients: `tests/programs/activity.py` holds one busy connection
//! (the client sends every 100 ms and the server reads at once), one idle
//! keep-alive and one whose response is stuck in the server's send queue
//! (the client never reads and its window is full). The agent's
//! `/v1/connections` must report each one's idle time within [`TOLERANCE`]
//! of the truth the programs printed, and in flight exactly for the stuck
//! one; `gracewatch connections --json` must agree on what is in flight.
//!
//! Truth and timing: each program prints CLOCK_MONOTONIC times of the
//! last data it moved on each connection; the read happens somewhere
//! between the moments the test sent the request (`t0`) and got the
//! answer (`t1`), so a connection whose last data moved at `last` was idle
//! between `t0 - last` and `t1 - last` when read (for the busy one, whose
//! data keeps moving, `last` is the client's latest send before `t0` for
//! the upper bound and before `t1` for the lower). The stuck one's last
//! data left the server when the client's window filled, which follows the
//! moment the server started writing by a few ms: its truth is that moment.
//!
//! In flight is "any byte the server received and did not read, or wrote
//! and the client did not acknowledge": the busy one has none because its
//! server reads at once, the idle one because the client acknowledged the
//! answer long before, the stuck one has its unsent response.

use std::{collections::HashMap, thread, time::Duration};

use gracewatch_testkit::{
    Agent, Child, Netns, STARTUP_TIMEOUT, Schema, TempDir, Tmux, http, monotonic_ns, setup,
};
use serde_json::Value;

/// How far a reported idle time may be from the truth.
const TOLERANCE: Duration = Duration::from_millis(100);

const ADDR: &str = "127.0.0.1:9941";

/// The CLOCK_MONOTONIC times (ns) of `prefix T` lines so far.
fn times(server: &Child, prefix: &str) -> Vec<u64> {
    server
        .lines()
        .iter()
        .filter_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
        .collect()
}

/// Client port → role, from the `conn ROLE PORT` lines.
fn roles(server: &Child) -> HashMap<String, &'static str> {
    let mut out = HashMap::new();
    for line in server.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if let ["conn", role, port] = w[..] {
            let role = match role {
                "busy" => "busy",
                "idle" => "idle",
                "stuck" => "stuck",
                _ => continue,
            };
            out.insert(format!("127.0.0.1:{port}"), role);
        }
    }
    out
}

/// The connections of `doc` by role, each checked against the schema.
fn by_role(doc: &Value, roles: &HashMap<String, &'static str>) -> HashMap<&'static str, Value> {
    if let Err(e) = Schema::Connections.check(doc) {
        panic!("the answer does not follow connections.schema.json: {e}\n{doc}");
    }
    let mut out = HashMap::new();
    for c in doc["connections"].as_array().into_iter().flatten() {
        let peer = c["peer"].as_str().unwrap_or_default();
        let role = roles
            .get(peer)
            .unwrap_or_else(|| panic!("unknown peer {peer} in {doc}"));
        out.insert(*role, c.clone());
    }
    assert_eq!(out.len(), 3, "three connections: {doc}");
    out
}

/// Waits until the read can land half-way between two busy sends: 10
/// bytes that arrived 40 ms earlier were read by the server long ago, so
/// "nothing unread" is the truth then, not a race with its recv.
fn between_busy_sends(server: &Child) {
    let deadline = monotonic_ns() + 5_000_000_000;
    loop {
        let now = monotonic_ns();
        assert!(now < deadline, "no busy sends: {}", server.context());
        let last = times(server, "busy_sent ").into_iter().max().unwrap_or(0);
        let since = now.saturating_sub(last);
        if (40_000_000..60_000_000).contains(&since) {
            return;
        }
        let wait = if since < 40_000_000 {
            50_000_000 - since
        } else {
            5_000_000
        };
        thread::sleep(Duration::from_nanos(wait));
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

#[test]
fn busy_idle_and_stuck_connections_report_idle_times_and_what_is_in_flight() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("activity");
    let dir = TempDir::new("activity");
    let agent = Agent::builder().token().start(&gw, &dir);
    let server = Child::python(&ns, "activity.py", "activity.py", &[ADDR]);
    let (pid, _) = server.wait_ready();
    let roles = roles(&server);
    assert_eq!(roles.len(), 3, "{}", server.context());
    let path = format!("/v1/connections?pid={pid}");

    // Let the idle and stuck ones age; the busy one keeps sending.
    thread::sleep(Duration::from_millis(800));
    let mut reads = 0;
    for round in 0..5 {
        between_busy_sends(&server);
        let t0 = monotonic_ns();
        let answer = http::get(&agent.unix(), &path).expect("GET /v1/connections");
        let t1 = monotonic_ns();
        assert_eq!(answer.code, 200, "{}\n{}", answer.body, agent.context());
        let doc: Value = serde_json::from_str(&answer.body).expect("JSON");
        if doc["total"] != 3 {
            // The monitor has not applied all three accepts yet.
            assert!(round < 4, "{doc}\n{}", agent.context());
            thread::sleep(Duration::from_millis(100));
            continue;
        }
        let conns = by_role(&doc, &roles);
        let busy_sent = times(&server, "busy_sent ");
        let idle_reply = times(&server, "idle_reply ")[0];
        let stuck_write = times(&server, "stuck_write ")[0];
        let last_before = |t: u64| busy_sent.iter().copied().filter(|&s| s <= t).max();
        let truth = |role: &str| -> (u64, u64) {
            match role {
                "busy" => {
                    let lo = last_before(t1).expect("a busy send before the read");
                    let hi = last_before(t0).unwrap_or(lo);
                    (t0.saturating_sub(lo), t1.saturating_sub(hi))
                }
                "idle" => (t0 - idle_reply, t1 - idle_reply),
                _ => (t0 - stuck_write, t1 - stuck_write),
            }
        };
        let tol = u64::try_from(TOLERANCE.as_nanos()).unwrap_or(u64::MAX);
        for role in ["busy", "idle", "stuck"] {
            let a = &conns[role]["activity"];
            let idle_ms = a["idle_ms"]
                .as_u64()
                .unwrap_or_else(|| panic!("{role}: no idle_ms in {doc}"));
            let (lo, hi) = truth(role);
            eprintln!(
                "{role}: idle_ms {idle_ms}, truth {:.1}..{:.1} ms (read took {:.1} ms), in_flight {}, unread {}, unacked {}, unsent {}",
                ms(lo),
                ms(hi),
                ms(t1 - t0),
                a["in_flight"],
                a["unread_bytes"],
                a["unacked_bytes"],
                a["unsent_bytes"]
            );
            let got = idle_ms * 1_000_000;
            assert!(
                got + tol >= lo && got <= hi + tol,
                "{role}: idle {idle_ms} ms is not within {TOLERANCE:?} of {:.1}..{:.1} ms\n{doc}",
                ms(lo),
                ms(hi)
            );
            assert_eq!(
                a["in_flight"],
                role == "stuck",
                "{role}: in_flight wrong in {doc}"
            );
        }
        let stuck = &conns["stuck"]["activity"];
        assert_eq!(stuck["unread_bytes"], 0, "{doc}");
        assert!(stuck["unsent_bytes"].as_u64().unwrap_or(0) > 0, "{doc}");
        for role in ["busy", "idle"] {
            let a = &conns[role]["activity"];
            assert_eq!(
                (&a["unread_bytes"], &a["unacked_bytes"], &a["unsent_bytes"]),
                (&Value::from(0), &Value::from(0), &Value::from(0)),
                "{role}: {doc}"
            );
        }
        reads += 1;
        thread::sleep(Duration::from_millis(150));
    }
    assert!(reads >= 3, "at least three full reads, got {reads}");

    // An untrusted reader (TCP, no token) sees the activity, not the peers.
    between_busy_sends(&server);
    let answer = http::get(&agent.tcp(), &path).expect("GET /v1/connections over TCP");
    assert_eq!(answer.code, 200, "{}", answer.body);
    let doc: Value = serde_json::from_str(&answer.body).expect("JSON");
    Schema::Connections
        .check(&doc)
        .unwrap_or_else(|e| panic!("{e}\n{doc}"));
    let conns = doc["connections"].as_array().cloned().unwrap_or_default();
    assert_eq!(conns.len(), 3, "{doc}");
    assert!(conns.iter().all(|c| c["peer"] == "hidden"), "{doc}");
    let flying = conns
        .iter()
        .filter(|c| c["activity"]["in_flight"] == true)
        .count();
    assert_eq!(flying, 1, "{doc}");
    let bad = http::get(&agent.tcp(), "/v1/connections").expect("GET without pid");
    assert_eq!(bad.code, 400, "{}", bad.body);

    // The CLI: same verdicts (its read time is only known to the second:
    // the monitor starts first, so idle times are checked loosely).
    let t0 = monotonic_ns();
    let (out, _) = gw.run_ok(&["connections", "--pid", &pid.to_string(), "--json"]);
    let t1 = monotonic_ns();
    let doc: Value = serde_json::from_str(out.trim()).expect("connections --json is JSON");
    let conns = by_role(&doc, &roles);
    for role in ["idle", "stuck"] {
        assert_eq!(
            conns[role]["activity"]["in_flight"],
            role == "stuck",
            "{role}: {doc}"
        );
    }
    // Its read cannot be placed between two busy sends: the busy one may
    // show the 10 bytes that just arrived, and nothing else.
    let busy = &conns["busy"]["activity"];
    assert!(
        busy["in_flight"] == false
            || (busy["unread_bytes"].as_u64().unwrap_or(99) <= 10
                && busy["unacked_bytes"] == 0
                && busy["unsent_bytes"] == 0),
        "busy: {doc}"
    );
    let idle_ms = conns["idle"]["activity"]["idle_ms"].as_u64().unwrap_or(0) * 1_000_000;
    let idle_reply = times(&server, "idle_reply ")[0];
    assert!(
        idle_ms + 100_000_000 >= t0 - idle_reply && idle_ms <= t1 - idle_reply + 100_000_000,
        "{doc}"
    );
    let (table, _) = gw.run_ok(&["connections", "--pid", &pid.to_string()]);
    assert!(
        table.contains("IDLE") && table.contains("B unsent"),
        "{table}"
    );

    // The TUI's connection view (Enter on the process): an IDLE column and
    // the stuck response IN FLIGHT; `i` puts the most idle first.
    let Some(tmux) = Tmux::start("activity") else {
        return;
    };
    tmux.wait("a shell prompt", STARTUP_TIMEOUT, |s| {
        s.contains("gw$")
            .then_some(())
            .ok_or_else(|| "no prompt".to_owned())
    });
    tmux.type_line(&format!("{} tui --pid {pid}", gw.bin().display()));
    tmux.wait("the process row", STARTUP_TIMEOUT, |s| {
        s.lines()
            .any(|l| l.contains(&format!("▶ {pid} ")) && l.contains("serving"))
            .then_some(())
            .ok_or_else(|| "no selected row".to_owned())
    });
    tmux.keys(&["Enter"]);
    let row_of = |s: &str, port: &str| -> Option<String> {
        s.lines()
            .find(|l| l.contains(&format!("127.0.0.1:{port}")))
            .map(str::to_owned)
    };
    let ports: HashMap<&str, String> = roles
        .iter()
        .map(|(peer, role)| {
            (
                *role,
                peer.rsplit(':').next().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let screen = tmux.wait("IDLE and IN FLIGHT", Duration::from_secs(10), |s| {
        if !s.contains("IDLE") || !s.contains("IN FLIGHT") {
            return Err("no IDLE / IN FLIGHT header".to_owned());
        }
        let stuck = row_of(s, &ports["stuck"]).ok_or("no stuck row")?;
        let idle = row_of(s, &ports["idle"]).ok_or("no idle row")?;
        let busy = row_of(s, &ports["busy"]).ok_or("no busy row")?;
        if !stuck.contains("unsent") {
            return Err(format!("stuck row without unsent bytes: {stuck}"));
        }
        if idle.contains("unsent") || idle.contains("unread") || idle.contains("unacked") {
            return Err(format!("idle row shows bytes in flight: {idle}"));
        }
        if !busy.contains("ms ") {
            return Err(format!("busy row not idle for mere ms: {busy}"));
        }
        Ok(())
    });
    tmux.keys(&["i"]);
    tmux.wait("most idle first", Duration::from_secs(10), |s| {
        let at = |port: &str| s.find(&format!("127.0.0.1:{port}"));
        match (at(&ports["idle"]), at(&ports["stuck"]), at(&ports["busy"])) {
            (Some(i), Some(st), Some(b)) if s.contains("most idle first") && i < st && st < b => {
                Ok(())
            }
            _ => Err("not idle, stuck, busy in that order".to_owned()),
        }
    });
    eprintln!("{screen}");
    tmux.keys(&["Escape", "q"]);
    drop(ns);
}
