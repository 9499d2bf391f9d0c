//! The drain gate end to end (`gracewatch drain` / `wait`, issue 3): real
//! servers, real signals, exit codes as ARCHITECTURE.md §5 defines them.
//!
//! `server.py` takes its signals in a dedicated `sigwaitinfo()` thread and
//! reports each one as `signal NAME T open=N from=PID`, with T its
//! CLOCK_MONOTONIC time, N the connections it still held and PID the
//! sender: that is what "signalled only after the last close" and "received
//! nothing" are checked against. Tests wait for gracewatch's first `--json`
//! progress line (it prints one as soon as it watches the target) before
//! changing anything, instead of sleeping.

use std::{
    os::unix::process::ExitStatusExt as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use gracewatch_testkit::{
    Child, Client, Netns, PROGRAM_TIMEOUT, STARTUP_TIMEOUT, STATE_TIMEOUT, Server, Soft, TempDir,
    gap_ms, monotonic_ns, procfs, setup,
};
use serde_json::{Value, json};

/// The `live` counts of a run's progress lines, consecutive repeats merged.
fn live_steps(progress: &[Value]) -> Vec<u64> {
    let mut steps: Vec<u64> = progress.iter().filter_map(|p| p["live"].as_u64()).collect();
    steps.dedup();
    steps
}

/// The handover of the seed articles: an old server passes its listening fd
/// to a new process, stops accepting, and finishes its in-flight requests,
/// which take different times. `drain` must deliver SIGTERM only after the
/// last of them closed — and then at once.
#[test]
fn handover_drain_signals_after_last_close() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("drain-handover");
    let addr = "127.0.0.1:7401";
    let soft = Soft::new();

    let mut old = Server::listen(&ns, addr);
    let _in_flight = Client::connect(&ns, addr, 4);
    old.wait_accepted(4);
    let new = old.handover();
    old.stopaccept();
    // From here on only the new process takes connections.
    let _later = Client::connect(&ns, addr, 2);
    new.wait_accepted(2);
    assert_eq!(old.accepted(), 4, "old server accepted after stopaccept");

    let old_pid = old.pid().to_string();
    let drain = gw.spawn_drain(&["drain", "--pid", &old_pid, "--json"]);
    let first = drain.wait_ready();
    assert_eq!(
        first["live"], 4,
        "first progress line should count the old server's 4 connections: {first}"
    );

    // The 4 requests finish 150, 300, 600 and 1000 ms from now.
    old.close_after(&[150, 300, 600, 1000]);
    let closed = old.wait_closed_at(4, PROGRAM_TIMEOUT);
    let signal = old.wait_signal(STATE_TIMEOUT);
    let done = drain.wait(STATE_TIMEOUT);

    done.assert_code(0);
    done.assert_result(&[
        ("targets", json!([old.pid()])),
        ("outcome", json!("drained")),
        ("exit_code", json!(0)),
        ("signal_sent", json!("SIGTERM")),
        ("initial_live", json!(4)),
        ("peak_live", json!(4)),
        ("still_held", json!(0)),
        ("held", json!([])),
    ]);
    assert_eq!(
        (signal.name.as_str(), signal.from, signal.open),
        ("TERM", done.pid, 0),
        "the old server must get SIGTERM from gracewatch (pid {}), holding nothing: {signal:?}",
        done.pid
    );
    let last_close = *closed.last().expect("4 closes");
    assert!(
        signal.at_ns > last_close,
        "SIGTERM arrived {} BEFORE the last close\n{}",
        gap_ms(last_close, signal.at_ns),
        done.context()
    );
    eprintln!(
        "handover drain: closes at +{} +{} +{} +{} after the first; SIGTERM {} after the last close",
        gap_ms(closed[0], closed[0]),
        gap_ms(closed[1], closed[0]),
        gap_ms(closed[2], closed[0]),
        gap_ms(closed[3], closed[0]),
        gap_ms(signal.at_ns, last_close),
    );
    // One progress event per change of the count.
    soft.eq(
        "live counts in the progress lines",
        live_steps(&done.progress()),
        vec![4, 3, 2, 1],
    );
    // The new process was not a target.
    new.assert_no_signal("it was not a drain target");
    // The old server's TERM handler exits it.
    assert_eq!(old.wait_exit(STATE_TIMEOUT).code(), Some(0));
    soft.finish();
}

/// A client that never closes: `--timeout 2s` gives up after 2 s with exit
/// 124 and sends nothing; `--on-timeout kill` gives up the same way and
/// SIGKILLs the target.
#[test]
fn timeout_leaves_target_alone() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("drain-timeout");
    let addr = "127.0.0.1:7402";
    let mut server = Server::listen(&ns, addr);
    let _stuck = Client::connect(&ns, addr, 2);
    server.wait_accepted(2);
    let pid = server.pid().to_string();

    let drain = gw.spawn_drain(&["drain", "--pid", &pid, "--timeout", "2s", "--json"]);
    let first = drain.wait_ready();
    let ready_ns = monotonic_ns();
    assert_eq!(first["live"], 2, "first progress line: {first}");
    let done = drain.wait(Duration::from_secs(10));
    done.assert_code(124);
    let result = done.assert_result(&[
        ("targets", json!([server.pid()])),
        ("outcome", json!("timeout")),
        ("signal_sent", Value::Null),
        ("initial_live", json!(2)),
        ("peak_live", json!(2)),
        ("still_held", json!(2)),
    ]);
    let held = result["held"].as_array().cloned().unwrap_or_default();
    assert!(
        held.len() == 2
            && held
                .iter()
                .all(|h| h["pid"] == json!(server.pid()) && h["local"] == json!(addr)),
        "result should name the 2 connections still held: {result}"
    );
    // The deadline counts from when gracewatch watches the target: never
    // before 2 s after the spawn, and promptly after 2 s of watching.
    let total = done.exited_ns - done.spawned_ns;
    let watching = done.exited_ns - ready_ns;
    eprintln!(
        "--timeout 2s: exit 124 after {} from spawn, {} after the first progress line; duration_ms {}",
        gap_ms(done.exited_ns, done.spawned_ns),
        gap_ms(done.exited_ns, ready_ns),
        result["duration_ms"]
    );
    assert!(
        total >= 2_000_000_000 && done.elapsed < Duration::from_secs(4),
        "--timeout 2s exited {} after the spawn, expected between 2 and 4 s",
        gap_ms(done.exited_ns, done.spawned_ns)
    );
    assert!(
        watching < 2_500_000_000,
        "--timeout 2s exited {} after it printed that it watches the target",
        gap_ms(done.exited_ns, ready_ns)
    );
    let duration = result["duration_ms"].as_u64().unwrap_or(0);
    assert!(
        (2000..2500).contains(&duration),
        "duration_ms {duration}, expected 2000..2500"
    );
    // Alive, still serving its commands, and it received nothing.
    server.ping();
    server.assert_no_signal("--on-timeout leave (the default) must send nothing");

    // Same, but kill it when the deadline passes.
    let drain = gw.spawn_drain(&[
        "drain",
        "--pid",
        &pid,
        "--timeout",
        "2s",
        "--on-timeout",
        "kill",
        "--json",
    ]);
    drain.wait_ready();
    let done = drain.wait(Duration::from_secs(10));
    done.assert_code(124);
    let result = done.assert_result(&[
        ("targets", json!([server.pid()])),
        ("outcome", json!("timeout")),
        ("signal_sent", json!("SIGKILL")),
        ("initial_live", json!(2)),
        ("peak_live", json!(2)),
        // Held at the deadline (the kill then closes them).
        ("still_held", json!(2)),
    ]);
    assert!(
        result["message"]
            .as_str()
            .is_some_and(|m| m.contains("still held 2 live connection")),
        "the message should say how many connections were left: {result}"
    );
    let status = server.wait_exit(STATE_TIMEOUT);
    assert_eq!(
        status.signal(),
        Some(9),
        "the server should have died of SIGKILL, got {status}"
    );
    server.assert_no_signal("only SIGKILL, which it cannot report, was expected");
}

/// A target that exits by itself while it still holds connections ends the
/// drain with exit 3 and the count, and nothing is signalled.
#[test]
fn target_exits_with_connections() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("drain-exit");
    let addr = "127.0.0.1:7403";

    // --json: the result object.
    let mut server = Server::listen(&ns, addr);
    let _clients = Client::connect(&ns, addr, 3);
    server.wait_accepted(3);
    let pid = server.pid().to_string();
    let drain = gw.spawn_drain(&["drain", "--pid", &pid, "--json"]);
    assert_eq!(drain.wait_ready()["live"], 3);
    server.exit();
    let done = drain.wait(STATE_TIMEOUT);
    done.assert_code(3);
    let result = done.assert_result(&[
        ("targets", json!([server.pid()])),
        ("outcome", json!("target_exited")),
        ("exit_code", json!(3)),
        ("signal_sent", Value::Null),
        ("initial_live", json!(3)),
        ("peak_live", json!(3)),
        ("still_held", json!(3)),
    ]);
    let message = result["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&pid) && message.contains("still held 3 live connection"),
        "the message should name the pid and the 3 connections: {message:?}"
    );
    assert_eq!(server.wait_exit(STATE_TIMEOUT).code(), Some(0));

    // Without --json: the last line on stderr says the same to a human.
    let server = Server::listen(&ns, addr);
    let _clients = Client::connect(&ns, addr, 3);
    server.wait_accepted(3);
    let pid = server.pid().to_string();
    // Human progress goes to stderr: the exit happens once it said "3 live".
    let drain = gw.spawn_drain(&["drain", "--pid", &pid]);
    drain.wait_stderr("its first progress line", STARTUP_TIMEOUT, |l| {
        l.contains("3 live")
    });
    server.exit();
    let done = drain.wait(STATE_TIMEOUT);
    done.assert_code(3);
    let last = done.stderr.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("gracewatch: ")
            && last.contains(&format!("pid {pid}"))
            && last.contains("exited before it drained")
            && last.contains("still held 3 live connection"),
        "last stderr line should say the target exited holding 3 connections: {last:?}\n{}",
        done.context()
    );
    assert!(
        done.stdout.is_empty(),
        "stdout without --json: {:?}",
        done.stdout
    );
}

/// The signal path cannot reach a recycled pid.
///
/// Deterministic construction: gracewatch watches target T (pid P, 2 live
/// connections) and is then frozen with SIGSTOP (confirmed by waitid
/// WSTOPPED). While it is frozen, T is killed and reaped, and an impostor is
/// started with exactly pid P (clone3 with `set_tid`, `with_pid.py`: no
/// cycling through the pid space, no race with other forks; it fails
/// rather than hand out another pid). The impostor holds no connection, so
/// a gate that looks processes up by pid would find "pid P, 0 live" and
/// signal it. Then gracewatch is thawed: it must see T's exit through its
/// pidfd — exit 3 with T's 2 connections (or 0 had it seen them close
/// first) — and the impostor must receive nothing.
#[test]
fn recycled_pid_never_signalled() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("drain-recycle");
    let addr = "127.0.0.1:7404";
    let mut target = Server::listen(&ns, addr);
    let _clients = Client::connect(&ns, addr, 2);
    target.wait_accepted(2);
    let pid = target.pid();
    let pid_arg = pid.to_string();

    let drain = gw.spawn_drain(&["drain", "--pid", &pid_arg, "--json"]);
    assert_eq!(drain.wait_ready()["live"], 2);
    drain.freeze();
    let killed = target.child_mut().kill();
    assert!(
        killed.is_some_and(|s| s.signal() == Some(9)),
        "target was not killed: {killed:?}"
    );
    let impostor = Server::listen_with_pid(&ns, "127.0.0.1:7405", pid);
    impostor.ping();
    drain.thaw();

    let done = drain.wait(STATE_TIMEOUT);
    let result = done.result();
    eprintln!(
        "recycled pid {pid}: gracewatch exited {:?}: {}",
        done.code(),
        result["message"]
    );
    match done.code() {
        Some(3) => {
            done.assert_result(&[
                ("outcome", json!("target_exited")),
                ("signal_sent", Value::Null),
                ("still_held", json!(2)),
            ]);
        }
        Some(0) => {
            done.assert_result(&[("outcome", json!("drained")), ("signal_sent", Value::Null)]);
        }
        _ => panic!(
            "expected exit 3 (target exited holding 2) or 0 (exited drained)\n{}",
            done.context()
        ),
    }
    // The impostor, alive and reading its commands after gracewatch is
    // gone, received nothing (its signal thread would have said so before
    // answering: signals are reported as they arrive).
    impostor.ping();
    impostor.assert_no_signal("it only reuses the pid of the drain's target");
}

/// `--min-wait 1s` with nothing to wait for: the signal still waits 1 s.
#[test]
fn min_wait_waits() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("drain-minwait");
    let addr = "127.0.0.1:7406";
    let mut server = Server::listen(&ns, addr);
    let pid = server.pid().to_string();

    let drain = gw.spawn_drain(&["drain", "--pid", &pid, "--min-wait", "1s", "--json"]);
    let first = drain.wait_ready();
    let ready_ns = monotonic_ns();
    assert_eq!(first["live"], 0, "first progress line: {first}");
    let signal = server.wait_signal(Duration::from_secs(10));
    let done = drain.wait(STATE_TIMEOUT);
    done.assert_code(0);
    let result = done.assert_result(&[
        ("targets", json!([server.pid()])),
        ("outcome", json!("drained")),
        ("signal_sent", json!("SIGTERM")),
        ("initial_live", json!(0)),
        ("peak_live", json!(0)),
        ("still_held", json!(0)),
    ]);
    assert_eq!(
        (signal.name.as_str(), signal.from),
        ("TERM", done.pid),
        "expected SIGTERM from gracewatch (pid {}): {signal:?}",
        done.pid
    );
    eprintln!(
        "--min-wait 1s: SIGTERM {} after the spawn, {} after the first progress line; duration_ms {}",
        gap_ms(signal.at_ns, done.spawned_ns),
        gap_ms(signal.at_ns, ready_ns),
        result["duration_ms"]
    );
    assert!(
        signal.at_ns >= done.spawned_ns + 1_000_000_000,
        "SIGTERM arrived {} after gracewatch was started, before --min-wait 1s",
        gap_ms(signal.at_ns, done.spawned_ns)
    );
    // The first progress line comes right after gracewatch started
    // watching (the start of --min-wait): the signal must not come much
    // less than 1 s after we saw it.
    assert!(
        signal.at_ns >= ready_ns + 950_000_000,
        "SIGTERM arrived {} after gracewatch said it was watching",
        gap_ms(signal.at_ns, ready_ns)
    );
    let duration = result["duration_ms"].as_u64().unwrap_or(0);
    assert!(
        (1000..1500).contains(&duration),
        "duration_ms {duration}, expected 1000..1500"
    );
    assert_eq!(server.wait_exit(STATE_TIMEOUT).code(), Some(0));
}

/// Short requests, one every 300 ms on a thread of their own: `client.py`
/// opens a connection and closes it, and the server (`--hangup`) closes its
/// side as soon as it accepted, so the server's live count touches zero
/// between them.
struct Pulses {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl Pulses {
    const EVERY: Duration = Duration::from_millis(300);

    fn start(client: Client) -> Pulses {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut made = 0;
            let mut next = Instant::now();
            while !stopped.load(Ordering::SeqCst) {
                client.open(1);
                client.close(1);
                made += 1;
                next += Self::EVERY;
                while !stopped.load(Ordering::SeqCst) && Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            made
        });
        Pulses { stop, thread }
    }

    /// Stops them; returns how many connections were made.
    fn stop(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the client thread")
    }
}

/// `wait --quiet-for 1s` on a server of short requests: while they come it
/// does not end on the zeros between them (exit 124 at its deadline, saying
/// why); once they stop it ends 0 one quiet period after the last accept.
#[test]
fn quiet_for_waits_until_short_connections_stop() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("drain-quiet");
    let addr = "127.0.0.1:7421";
    let server = Server::listen_with(&ns, addr, None, &["--hangup"]);
    let pid = server.pid().to_string();
    let pulses = Pulses::start(Client::connect(&ns, addr, 0));
    server.wait_accepted(1);

    let busy = gw.spawn_drain(&[
        "wait",
        "--pid",
        &pid,
        "--quiet-for",
        "1s",
        "--timeout",
        "4s",
        "--json",
    ]);
    busy.wait_ready();
    let done = busy.wait(Duration::from_secs(10));
    done.assert_code(124);
    let result = done.assert_result(&[
        ("outcome", json!("timeout")),
        ("signal_sent", Value::Null),
        ("still_held", json!(0)),
    ]);
    let message = result["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("--quiet-for 1s"),
        "the deadline should name the quiet period it waited for: {message}"
    );
    let waiting = done
        .progress()
        .iter()
        .filter_map(|p| p["message"].as_str().map(str::to_owned))
        .filter(|m| {
            m.contains("0 live; ")
                && m.contains("waiting for 1s without new connections (last new connection ")
        })
        .count();
    assert!(
        waiting > 0,
        "no progress line said what it waits for\n{}",
        done.context()
    );

    // The same load, then none: the end follows the last accept by the
    // quiet period.
    let calm = gw.spawn_drain(&[
        "wait",
        "--pid",
        &pid,
        "--quiet-for",
        "1s",
        "--timeout",
        "10s",
        "--json",
    ]);
    calm.wait_ready();
    let ready_ns = monotonic_ns();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!calm.has_exited(), "ended while the connections came");
    let made = pulses.stop();
    let accepts = server.wait_hungup(made);
    let last = *accepts.last().expect("accepts");
    let result_ns = calm.wait_result_seen(STATE_TIMEOUT);
    let done = calm.wait(STATE_TIMEOUT);
    done.assert_code(0);
    let result = done.assert_result(&[
        ("outcome", json!("drained")),
        ("signal_sent", Value::Null),
        ("still_held", json!(0)),
    ]);
    let after_ms = result_ns.saturating_sub(last) as f64 / 1e6;
    // The gate's start is at most the first progress line seen here.
    let decided_ns = ready_ns + result["duration_ms"].as_u64().unwrap_or(0) * 1_000_000;
    eprintln!(
        "--quiet-for 1s: {made} connections, one every {:?}; after the last accept: the gate decided within {:.1} ms, its result line was seen at {after_ms:.1} ms, its exit at {:.1} ms (quiet period 1000 ms)",
        Pulses::EVERY,
        decided_ns.saturating_sub(last) as f64 / 1e6,
        done.exited_ns.saturating_sub(last) as f64 / 1e6,
    );
    assert!(
        result_ns >= last + 1_000_000_000,
        "ended {} after the last accept, before --quiet-for 1s",
        gap_ms(result_ns, last)
    );
    assert!(
        after_ms <= 1000.0 + QUIET_SLACK_MS,
        "its result came {after_ms:.1} ms after the last accept: more than --quiet-for 1s + {QUIET_SLACK_MS} ms\n{}",
        done.context()
    );
}

/// How late after its quiet period `wait --quiet-for` may print its
/// result, as this test sees it (the line is seen after the fact): the
/// issue's 50 ms. Run alone it came 7–32 ms late here, also with other
/// builds loading both cores (8–29 ms); the accept is timed when a status
/// shows it, and statuses are paced 20 ms apart. Only with the other drain
/// tests in parallel on 2 loaded cores was it once later (76 ms): CI runs
/// these tests one at a time. The process exits after the programs are
/// detached: 140–300 ms more here, as for every drain today.
const QUIET_SLACK_MS: f64 = 50.0;

/// The same load without `--quiet-for`: `wait` ends 0 at once, on a zero
/// between two requests, though they go on — what `--quiet-for` is for.
#[test]
fn without_quiet_for_a_zero_between_requests_ends_the_wait() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("drain-noquiet");
    let addr = "127.0.0.1:7422";
    let server = Server::listen_with(&ns, addr, None, &["--hangup"]);
    let pid = server.pid().to_string();
    let pulses = Pulses::start(Client::connect(&ns, addr, 0));
    server.wait_accepted(3);
    let drain = gw.spawn_drain(&["wait", "--pid", &pid, "--timeout", "4s", "--json"]);
    let done = drain.wait(Duration::from_secs(10));
    let still_coming = server.accepted();
    // They go on after the wait said the server was drained.
    std::thread::sleep(Pulses::EVERY * 3);
    let made = pulses.stop();
    done.assert_code(0);
    let result = done.assert_result(&[("outcome", json!("drained")), ("still_held", json!(0))]);
    let took = result["duration_ms"].as_u64().unwrap_or(u64::MAX);
    eprintln!(
        "without --quiet-for: ended 0 {took} ms after it started watching, while connections kept coming ({still_coming} accepted by then, {made} in all)"
    );
    assert!(
        took < 1000,
        "without --quiet-for the wait should end on the first zero, took {took} ms"
    );
    assert!(
        made as u64 > still_coming,
        "the connections did not go on after the wait ended"
    );
}

/// Bad input never signals anything: each case exits 2 with one clear line
/// naming the problem (clap's errors: their first line), while a live
/// target with no connections — which a drain would signal at once — is
/// named alongside where the case allows.
#[test]
fn bad_input() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("drain-bad");
    let server = Server::listen(&ns, "127.0.0.1:7407");
    let live = server.pid().to_string();

    let dir = TempDir::new("drain-bad");
    let missing = dir.path("missing.pid");
    let garbled = dir.write("garbled.pid", "garbage\n");
    let trailing = dir.write("trailing.pid", &format!("{live}abc\n"));
    let empty = dir.write("empty.pid", "");
    let zero = dir.write("zero.pid", "0\n");
    // A pid that existed a moment ago: a reaped child's.
    let dead = {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait for true");
        pid.to_string()
    };

    // (arguments, is a clap error, words the line must contain)
    #[rustfmt::skip]
    let cases: Vec<(Vec<&str>, bool, Vec<&str>)> = vec![
        (vec!["drain", "--pid", &live, "--signal", "BOGUS"], true, vec!["--signal", "BOGUS"]),
        (vec!["drain", "--pid", &live, "--signal", "SIGBOGUS"], true, vec!["--signal", "SIGBOGUS"]),
        (vec!["drain", "--pid", &live, "--signal", "0"], true, vec!["--signal", "0"]),
        (vec!["drain", "--pid", &live, "--signal", "65"], true, vec!["--signal", "65"]),
        (vec!["drain", "--pid", &live, "--timeout", "-5s"], true, vec!["--timeout", "-5s", "negative"]),
        (vec!["drain", "--pid", &live, "--min-wait", "-1s"], true, vec!["--min-wait", "-1s", "negative"]),
        (vec!["wait", "--pid", &live, "--timeout", "5x"], true, vec!["--timeout", "5x"]),
        (vec!["wait", "--pid", &live, "--timeout", "soon"], true, vec!["--timeout", "soon"]),
        (vec!["wait", "--pid", &live, "--timeout", ""], true, vec!["--timeout"]),
        (vec!["wait", "--pid", &live, "--min-wait", "1.5.2s"], true, vec!["--min-wait", "1.5.2s"]),
        (vec!["wait", "--pid", &live, "--timeout", "99999999999999999999h"], true, vec!["--timeout", "99999999999999999999h"]),
        (vec!["drain", "--pid", &live, "--on-timeout", "later"], true, vec!["--on-timeout", "later"]),
        (vec!["drain", "--pid", "abc"], true, vec!["--pid", "abc"]),
        (vec!["drain", "--pid", "-3"], true, vec!["-3"]),
        (vec!["drain"], false, vec!["--pid", "--pidfile"]),
        (vec!["drain", "--pid", &live, "--pidfile", &missing], false, vec![&missing, "pidfile"]),
        (vec!["drain", "--pid", &live, "--pidfile", &garbled], false, vec![&garbled, "does not hold a pid"]),
        (vec!["drain", "--pid", &live, "--pidfile", &trailing], false, vec![&trailing]),
        (vec!["drain", "--pid", &live, "--pidfile", &empty], false, vec![&empty]),
        (vec!["drain", "--pid", &live, "--pidfile", &zero], false, vec![&zero]),
        (vec!["drain", "--pid", &live, "--pid", &dead], false, vec![&dead, "does not exist"]),
        (vec!["wait", "--pid", &dead], false, vec![&dead, "does not exist"]),
        (vec!["drain", "--pid", "0"], true, vec!["--pid", "0"]),
    ];
    let soft = Soft::new();
    for (args, clap, words) in &cases {
        let done = gw.drain_to_end(args);
        let what = format!("gracewatch {args:?}");
        if done.code() != Some(2) {
            soft.fail(format!(
                "{what}: exited {}, expected 2\n{}",
                done.status,
                done.context()
            ));
            continue;
        }
        let first = done.stderr.first().cloned().unwrap_or_default();
        let lines = done.stderr.iter().filter(|l| !l.trim().is_empty()).count();
        if *clap {
            if !first.starts_with("error: ") {
                soft.fail(format!(
                    "{what}: first stderr line is not clap's `error: …`: {first:?}"
                ));
            }
        } else if lines != 1 || !first.starts_with("gracewatch: ") {
            soft.fail(format!(
                "{what}: expected exactly one line `gracewatch: …` on stderr, got {:?}",
                done.stderr
            ));
        }
        let lower = first.to_lowercase();
        for word in words {
            if !lower.contains(&word.to_lowercase()) {
                soft.fail(format!(
                    "{what}: stderr line does not name {word:?}: {first:?}"
                ));
            }
        }
        if !done.stdout.is_empty() {
            soft.fail(format!("{what}: printed on stdout: {:?}", done.stdout));
        }
        eprintln!("{what} -> 2: {first}");
    }
    // Nothing reached the live target.
    server.ping();
    server.assert_no_signal("every invocation was bad input");
    soft.finish();
}

/// A target that has exited but is not reaped yet (a zombie: its parent
/// does not wait for it) is no target: exit 2 saying it already exited,
/// nothing signalled, nothing reported drained — as for the same pid once
/// reaped ("does not exist"). Under `--children` a zombie descendant is
/// simply not a target. (Before: `drain` exited 0 with `"signal_sent":
/// "SIGTERM"` sent to the dead process, `wait` said "drained in 0.0s".)
#[test]
fn zombie_target_is_an_exited_target() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("drain-zombie");
    let parent = Child::python(&ns, "zombie parent", "zombie.py", &[]);
    let (zombie, parent_pid): (u32, u32) =
        parent.wait_line("`zombie PID parent PPID`", PROGRAM_TIMEOUT, |lines| {
            lines.iter().find_map(|l| {
                let mut w = l.strip_prefix("zombie ")?.split_whitespace();
                let z = w.next()?.parse().ok()?;
                let p = w.nth(1)?.parse().ok()?;
                Some((z, p))
            })
        });
    let z = zombie.to_string();
    let p = parent_pid.to_string();
    let state = procfs::stat(zombie).map(|s| s.state);
    assert_eq!(state, Some('Z'), "pid {zombie} should be a zombie");

    let soft = Soft::new();
    let expect_2 = |args: &[&str], words: &[&str]| {
        let done = gw.drain_to_end(args);
        let first = done.stderr.first().cloned().unwrap_or_default();
        eprintln!("gracewatch {args:?} -> {:?}: {first}", done.code());
        if done.code() != Some(2) {
            soft.fail(format!(
                "gracewatch {args:?}: exited {}, expected 2\n{}",
                done.status,
                done.context()
            ));
            return;
        }
        if !done.stdout.is_empty() || done.stderr.len() != 1 {
            soft.fail(format!(
                "gracewatch {args:?}: expected one stderr line and no stdout\n{}",
                done.context()
            ));
        }
        for w in words {
            if !first.contains(w) {
                soft.fail(format!("gracewatch {args:?}: {first:?} does not say {w:?}"));
            }
        }
    };
    expect_2(&["drain", "--pid", &z, "--json"], &[&z, "already exited"]);
    expect_2(&["wait", "--pid", &z], &[&z, "already exited"]);
    expect_2(
        &["drain", "--pid", &z, "--signal", "QUIT", "--json"],
        &[&z, "already exited"],
    );

    // Its parent with --children: the zombie is not among the targets.
    let done = gw.drain_to_end(&["wait", "--pid", &p, "--children", "--json"]);
    done.assert_code(0);
    done.assert_result(&[
        ("targets", json!([parent_pid])),
        ("outcome", json!("drained")),
        ("signal_sent", Value::Null),
    ]);

    // Reaped: the same answer, for the reason it now has.
    parent.request("reap", "reaped");
    expect_2(&["drain", "--pid", &z, "--json"], &[&z, "does not exist"]);
    expect_2(&["wait", "--pid", &z], &[&z, "does not exist"]);
    soft.finish();
}

/// `--children` waits for the named process and its descendants, but
/// signals only the named root: servers pass the signal on to their
/// workers, and workers already on their way out are left alone. Here the
/// old server and its handover child both hold connections; the drain
/// waits for both, then only the old server gets the signal. (Before:
/// every live descendant was signalled too.)
#[test]
fn children_are_waited_for_but_only_the_named_root_is_signalled() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("drain-children");
    let addr = "127.0.0.1:7408";
    let old = Server::listen(&ns, addr);
    let _c1 = Client::connect(&ns, addr, 2);
    old.wait_accepted(2);
    let new = old.handover();
    old.stopaccept();
    let _c2 = Client::connect(&ns, addr, 1);
    new.wait_accepted(1);

    let old_pid = old.pid().to_string();
    // USR1 does not end server.py, so the child stays reachable through it.
    let drain = gw.spawn_drain(&[
        "drain",
        "--pid",
        &old_pid,
        "--children",
        "--signal",
        "USR1",
        "--json",
    ]);
    assert_eq!(drain.wait_ready()["live"], 3);
    assert_eq!(old.closeall(), 2);
    drain.wait_progress("1 live (the child's)", STATE_TIMEOUT, |p| p["live"] == 1);
    assert!(
        !drain.has_exited(),
        "the drain ended while the child held a connection"
    );
    old.assert_no_signal("a descendant still held a connection");
    assert_eq!(new.closeall(), 1);
    let done = drain.wait(STATE_TIMEOUT);
    done.assert_code(0);
    let result = done.assert_result(&[
        ("outcome", json!("drained")),
        ("signal_sent", json!("SIGUSR1")),
        ("initial_live", json!(3)),
    ]);
    let mut targets: Vec<u64> = result["targets"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    targets.sort_unstable();
    let mut expected = vec![u64::from(old.pid()), u64::from(new.pid())];
    expected.sort_unstable();
    assert_eq!(targets, expected, "both are waited for");
    let seen = old.wait_signal(STATE_TIMEOUT);
    assert_eq!(
        (seen.name.as_str(), seen.from, seen.open),
        ("USR1", done.pid, 0),
        "the named root gets the signal from gracewatch, holding nothing"
    );
    // Round trip through the child: any signal it took is reported first.
    new.ping();
    new.assert_no_signal("a descendant under --children is never signalled");
}

/// `--exclude-peer` (issue 14): a server holds one connection from
/// 127.0.0.9 (a scraper, say) and one from 127.0.0.1 (a client). The drain
/// waits while the client's connection is open; when the server closes it,
/// SIGTERM follows at once although the 127.0.0.9 connection remains, and
/// the result names that connection and the rule that ended the drain.
#[test]
fn exclude_peer_ends_the_drain_when_only_excluded_peers_are_left() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("drain-xpeer");
    let addr = "127.0.0.1:7423";

    let mut server = Server::listen(&ns, addr);
    // The client's connection first: the server closes its oldest first.
    let _client = Client::connect(&ns, addr, 1);
    server.wait_accepted(1);
    let _scraper = Client::connect_from(&ns, addr, 1, Some("127.0.0.9"));
    server.wait_accepted(2);

    let pid = server.pid().to_string();
    let drain = gw.spawn_drain(&[
        "drain",
        "--pid",
        &pid,
        "--exclude-peer",
        "127.0.0.9",
        "--json",
    ]);
    let first = drain.wait_ready();
    assert_eq!(
        first["live"], 1,
        "only the 127.0.0.1 connection holds the drain: {first}"
    );
    assert!(
        first["message"]
            .as_str()
            .is_some_and(|m| m.contains("and 1 from excluded peers")),
        "{first}"
    );
    // It does not end while the client's connection is open.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !drain.has_exited(),
        "the drain ended with a client connection open"
    );
    server.assert_no_signal("a client connection is still open");

    server.close_after(&[50]);
    let closed = server.wait_closed_at(1, PROGRAM_TIMEOUT);
    let signal = server.wait_signal(STATE_TIMEOUT);
    let done = drain.wait(STATE_TIMEOUT);
    done.assert_code(0);
    let result = done.assert_result(&[
        ("outcome", json!("drained")),
        ("ended_by", json!("excluded_peers")),
        ("signal_sent", json!("SIGTERM")),
        ("initial_live", json!(1)),
        ("still_held", json!(0)),
        ("held", json!([])),
    ]);
    let excluded = result["excluded"].as_array().expect("excluded[]");
    assert_eq!(excluded.len(), 1, "{result}");
    let x = &excluded[0];
    assert_eq!(x["pid"], json!(server.pid()), "{x}");
    assert_eq!(x["local"], json!(addr), "{x}");
    assert!(
        x["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.9:")),
        "{x}"
    );
    assert_eq!(x["state"], json!("established"), "{x}");
    assert!(x["age_ms"].as_u64().is_some_and(|a| a >= 1000), "{x}");
    assert_eq!(
        (signal.name.as_str(), signal.from, signal.open),
        ("TERM", done.pid, 1),
        "SIGTERM from gracewatch while the server still held the 127.0.0.9 connection: {signal:?}"
    );
    let delay_ns = signal.at_ns.saturating_sub(closed[0]);
    assert!(
        signal.at_ns > closed[0] && delay_ns < 500_000_000,
        "SIGTERM {} after the client's connection closed\n{}",
        gap_ms(signal.at_ns, closed[0]),
        done.context()
    );
    eprintln!(
        "exclude-peer drain: SIGTERM {} after the last non-excluded close, 1 excluded connection left",
        gap_ms(signal.at_ns, closed[0])
    );
    assert_eq!(server.wait_exit(STATE_TIMEOUT).code(), Some(0));
}

/// `--exclude-peer 127.0.0.9` on a dual-stack listener (`[::]`), whose
/// IPv4 clients it sees as `::ffff:127.0.0.9`: the IPv4 rule matches them.
#[test]
fn exclude_peer_matches_ipv4_clients_of_a_dual_stack_listener() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("drain-xpeer6");
    let server = Server::listen(&ns, "[::]:7424");
    let _client = Client::connect(&ns, "127.0.0.1:7424", 1);
    server.wait_accepted(1);
    let _scraper = Client::connect_from(&ns, "127.0.0.1:7424", 1, Some("127.0.0.9"));
    server.wait_accepted(2);

    let pid = server.pid().to_string();
    let drain = gw.spawn_drain(&[
        "drain",
        "--pid",
        &pid,
        "--exclude-peer",
        "127.0.0.9",
        "--json",
    ]);
    assert_eq!(drain.wait_ready()["live"], 1);
    server.close(1);
    let signal = server.wait_signal(STATE_TIMEOUT);
    let done = drain.wait(STATE_TIMEOUT);
    done.assert_code(0);
    let result = done.assert_result(&[
        ("outcome", json!("drained")),
        ("ended_by", json!("excluded_peers")),
        ("signal_sent", json!("SIGTERM")),
    ]);
    let peer = result["excluded"][0]["peer"].as_str().unwrap_or_default();
    assert!(peer.starts_with("[::ffff:127.0.0.9]:"), "{result}");
    assert_eq!((signal.name.as_str(), signal.open), ("TERM", 1));
}
