//! `drain --until-idle` (issue 14, item 3) against a real server and real
//! clients: `tests/programs/idle.py` holds a busy connection (the client
//! sends every 100 ms), an idle keep-alive and one whose response is stuck
//! in the server's send queue (the client does not read), and starts or
//! stops each on command. The acceptance: `drain --until-idle 2s` signals
//! only after the busy client stopped and the stuck response was read, and
//! within 2 s + [`LATE`] of the last activity; with only an idle
//! connection left it signals 2 s after its last activity, not before.
//!
//! Truth: the programs print the CLOCK_MONOTONIC time of every data move
//! that matters (each busy send, the end of the stuck read, each idle
//! reply) and the server prints when SIGTERM reached it (a thread blocked
//! in `sigwaitinfo`), so "signal − last activity" is measured on one clock,
//! independent of gracewatch's own account. Each test first runs a plain
//! `drain --timeout` on the same connections: it must time out (nothing
//! there ends a drain without the flag), and its `held[]` must say what
//! each connection is doing (`idle_ms`, `in_flight`).

use std::{thread, time::Duration};

use gracewatch_testkit::{
    Agent, Child, Drain, Gracewatch, Netns, PROGRAM_TIMEOUT, Schema, TempDir, setup,
};
use serde_json::Value;

/// The idle period the tests ask for.
const PERIOD: Duration = Duration::from_secs(2);
/// How late after the period the signal may come (the acceptance bound).
const LATE: Duration = Duration::from_millis(100);

/// The CLOCK_MONOTONIC times (ns) of `prefix T` lines so far.
fn times(server: &Child, prefix: &str) -> Vec<u64> {
    server
        .lines()
        .iter()
        .filter_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
        .collect()
}

fn last(server: &Child, prefix: &str) -> Option<u64> {
    times(server, prefix).into_iter().max()
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Starts the server with `roles`; returns it and its pid.
fn serve(ns: &Netns, addr: &str, roles: &str) -> (Child, u32) {
    let server = Child::python(ns, "idle.py", "idle.py", &[addr, roles]);
    let (pid, _) = server.wait_ready();
    (server, pid)
}

/// A plain drain with a short deadline: it must time out without a
/// signal, naming what each connection is doing. Returns its `held`.
fn plain_drain_times_out(gw: &Gracewatch, server: &Child, pid: u32, live: usize) -> Vec<Value> {
    let done = gw.drain_to_end(&[
        "drain",
        "--pid",
        &pid.to_string(),
        "--timeout",
        "2500ms",
        "--json",
    ]);
    done.assert_code(124);
    let result = done.result();
    Schema::Drain
        .check(&result)
        .unwrap_or_else(|e| panic!("{e}\n{result}"));
    assert_eq!(result["signal_sent"], Value::Null, "{result}");
    assert!(
        times(server, "sigterm ").is_empty(),
        "a plain drain signalled"
    );
    let held = result["held"].as_array().cloned().unwrap_or_default();
    assert_eq!(held.len(), live, "{result}");
    for h in &held {
        eprintln!(
            "plain drain, held: {} idle_ms {} in_flight {}",
            h["peer"], h["idle_ms"], h["in_flight"]
        );
        assert!(h["in_flight"].is_boolean(), "unread held entry: {result}");
        assert!(h["idle_ms"].is_u64(), "unread held entry: {result}");
    }
    held
}

/// Starts `drain --until-idle 2s` (with `via`, e.g. `--agent URL`) and
/// waits for its first progress line.
fn until_idle(gw: &Gracewatch, pid: u32, via: &[&str]) -> Drain {
    let pid = pid.to_string();
    let mut args = vec![
        "drain",
        "--pid",
        &pid,
        "--until-idle",
        "2s",
        "--timeout",
        "60s",
        "--json",
    ];
    args.extend_from_slice(via);
    let drain = gw.spawn_drain(&args);
    drain.wait_ready();
    drain
}

/// Sleeps `d`, then checks that nothing ended or was signalled.
fn still_waiting(d: Duration, server: &Child, drain: &Drain, why: &str) {
    thread::sleep(d);
    assert!(
        times(server, "sigterm ").is_empty() && !drain.has_exited(),
        "ended while {why}\n{}",
        server.context()
    );
}

/// Waits for the server's SIGTERM; checks it came between the period and
/// the period + [`LATE`] after `last_activity`, then the result.
fn signalled_in_time(server: &Child, drain: Drain, last_activity: u64, what: &str, live: usize) {
    let sigterm = server.wait_line("`sigterm T`", Duration::from_secs(10), |lines| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix("sigterm ")?.trim().parse::<u64>().ok())
    });
    let gap = sigterm.saturating_sub(last_activity);
    eprintln!(
        "{what}: SIGTERM {:.1} ms after the last activity (period {PERIOD:?}, bound +{LATE:?})",
        ms(gap)
    );
    assert!(
        sigterm >= last_activity + nanos(PERIOD),
        "{what}: signalled {:.1} ms after the last activity, before the period",
        ms(gap)
    );
    assert!(
        gap <= nanos(PERIOD + LATE),
        "{what}: signalled {:.1} ms after the last activity, later than {PERIOD:?} + {LATE:?}",
        ms(gap)
    );
    let done = drain.wait(PROGRAM_TIMEOUT);
    // With RUST_LOG=gracewatch_core::drain=debug: each read and its verdict.
    for l in done
        .stderr
        .iter()
        .filter(|l| l.contains("until idle: read"))
    {
        eprintln!("  {l}");
    }
    done.assert_code(0);
    let result = done.assert_result(&[
        ("outcome", "drained".into()),
        ("ended_by", "idle".into()),
        ("signal_sent", "SIGTERM".into()),
        ("still_held", 0.into()),
    ]);
    let idle = result["idle"].as_array().cloned().unwrap_or_default();
    assert_eq!(idle.len(), live, "{result}");
    for c in &idle {
        assert!(
            c["idle_ms"].as_u64().is_some_and(|ms| ms >= 2000),
            "{result}"
        );
    }
    assert!(
        result["message"]
            .as_str()
            .is_some_and(|m| m.contains("--until-idle")),
        "{result}"
    );
    let messages: Vec<String> = done
        .progress()
        .iter()
        .filter_map(|p| p["message"].as_str().map(str::to_owned))
        .collect();
    assert!(
        messages.iter().any(|m| m.contains("until idle: ")),
        "{messages:#?}"
    );
}

/// Busy and stuck first, then the busy client stops (the stuck response
/// still holds the drain), then the stuck one is read: the last activity.
#[test]
fn until_idle_waits_for_busy_and_stuck_and_signals_two_seconds_after_the_stuck_read() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("idle-stuck");
    let (server, pid) = serve(&ns, "127.0.0.1:9951", "busy,idle,stuck");

    let held = plain_drain_times_out(&gw, &server, pid, 3);
    assert_eq!(
        held.iter().filter(|h| h["in_flight"] == true).count(),
        1,
        "exactly the stuck one is in flight: {held:?}"
    );

    let drain = until_idle(&gw, pid, &[]);
    still_waiting(Duration::from_millis(2500), &server, &drain, "busy sent");
    server.request("stop_busy", "ok");
    still_waiting(
        Duration::from_millis(2500),
        &server,
        &drain,
        "the stuck response was not read",
    );
    server.request("read_stuck", "ok");
    let read = server.wait_line("`stuck_read T`", Duration::from_secs(10), |lines| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix("stuck_read ")?.trim().parse::<u64>().ok())
    });
    let busy = last(&server, "busy_sent ").unwrap_or(0);
    assert!(read > busy, "the stuck read is the last activity");
    signalled_in_time(&server, drain, read, "stuck read last", 3);
}

/// The stuck response is read first; the busy client keeps the drain
/// waiting until it stops: its last send is the last activity.
#[test]
fn until_idle_waits_for_the_busy_client_and_signals_two_seconds_after_its_last_send() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("idle-busy");
    let (server, pid) = serve(&ns, "127.0.0.1:9952", "busy,idle,stuck");

    let drain = until_idle(&gw, pid, &[]);
    server.request("read_stuck", "ok");
    still_waiting(Duration::from_millis(3000), &server, &drain, "busy sent");
    assert!(
        last(&server, "stuck_read ").is_some(),
        "{}",
        server.context()
    );
    server.request("stop_busy", "ok");
    let busy = server.wait_line("`busy_stopped T`", Duration::from_secs(10), |lines| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix("busy_stopped ")?.trim().parse::<u64>().ok())
    });
    assert_eq!(Some(busy), last(&server, "busy_sent "));
    signalled_in_time(&server, drain, busy, "busy send last", 3);
}

/// Only an idle keep-alive: a plain drain times out; `--until-idle 2s`
/// signals 2 s after its last exchange (made after the drain started,
/// so the drain has to wait for it), not before.
#[test]
fn with_only_an_idle_keep_alive_until_idle_signals_after_the_period_not_before() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("idle-only");
    let (server, pid) = serve(&ns, "127.0.0.1:9953", "idle");

    let held = plain_drain_times_out(&gw, &server, pid, 1);
    assert_eq!(held[0]["in_flight"], false, "{held:?}");
    assert!(
        held[0]["idle_ms"].as_u64().is_some_and(|ms| ms >= 2000),
        "idle since before the plain drain's 2.5 s: {held:?}"
    );
    idle_keep_alive_ends_by_idle(&gw, &server, pid, &[]);
}

/// The same through an agent (`drain --agent`: `POST /v1/drains` with
/// `until_idle`): the agent's gate decides, on the same bounds.
#[test]
fn through_the_agent_until_idle_signals_after_the_period_not_before() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("idle-agent");
    let dir = TempDir::new("idle-agent");
    let agent = Agent::builder().start(&gw, &dir);
    let (server, pid) = serve(&ns, "127.0.0.1:9954", "idle");
    let unix = format!("unix:{}", agent.socket.display());
    idle_keep_alive_ends_by_idle(&gw, &server, pid, &["--agent", &unix]);
}

/// Keeps the idle keep-alive active until `drain --until-idle 2s` (with
/// `via`) runs, then makes one last exchange: the signal must come 2 s
/// after it, not before and not later than [`LATE`] past that.
fn idle_keep_alive_ends_by_idle(gw: &Gracewatch, server: &Child, pid: u32, via: &[&str]) {
    // Idle for 2.5 s by now: keep it active (a request every 300 ms)
    // until the drain runs, so that it has something to wait for whatever
    // its start-up takes, then one last exchange.
    let poke = || {
        let replies = times(server, "idle_reply ").len();
        server.request("poke_idle", "ok");
        server.wait_line("a new `idle_reply T`", Duration::from_secs(10), |lines| {
            let all: Vec<u64> = lines
                .iter()
                .filter_map(|l| l.strip_prefix("idle_reply ")?.trim().parse().ok())
                .collect();
            all.get(replies).copied()
        })
    };
    let running = std::sync::atomic::AtomicBool::new(false);
    let drain = thread::scope(|s| {
        s.spawn(|| {
            while !running.load(std::sync::atomic::Ordering::SeqCst) {
                poke();
                thread::sleep(Duration::from_millis(300));
            }
        });
        let drain = until_idle(gw, pid, via);
        running.store(true, std::sync::atomic::Ordering::SeqCst);
        drain
    });
    let reply = poke();
    let what = if via.is_empty() {
        "idle keep-alive"
    } else {
        "idle keep-alive, through the agent"
    };
    signalled_in_time(server, drain, reply, what, 1);
}
