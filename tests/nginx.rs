//! Real nginx from Debian (`/usr/sbin/nginx`), the two ways it restarts
//! gracefully, gated by gracewatch:
//!
//! - reload (`nginx -s reload`): the master starts new workers and tells the
//!   old ones to finish what they have in flight; `gracewatch wait` on the
//!   old workers' pids (taken with `pgrep -P MASTER` before the reload, as
//!   the README shows) must return only once their last request is done;
//! - binary upgrade (USR2, then WINCH): the old master re-execs nginx as its
//!   own child (the new master, with its own workers), and the pid file
//!   becomes `nginx.pid.oldbin`; `gracewatch drain --pidfile
//!   nginx.pid.oldbin --children --exclude NEWMASTER --signal QUIT` must
//!   send QUIT to the old master only once the old workers' connections
//!   are gone, and the new master keeps serving.
//!
//! An old worker closes idle keep-alive connections at once when told to
//! stop, so what holds it is a request in flight: `/slow/NAME` is proxied to
//! `upstream.py`, which answers only when the test says so, and reports
//! which worker (nginx's `$pid`) proxied it. With `reuseport` each worker
//! has its own listening socket, so requests from different source ports
//! spread over both workers; the tests open requests until both old workers
//! hold some.

use gracewatch_testkit::{
    Drain, Netns, STATE_TIMEOUT, gap_ms,
    nginx::{
        HttpClient, Nginx, Upstream, alive, exits_within, nginx_available, parent_of,
        pgrep_children,
    },
    setup,
};
use rustix::process::{Pid, Signal, kill_process};
use serde_json::json;

/// Opens requests `r1`, `r2`… until each of `workers` proxies at least one
/// (and at least 3 in all); returns (name, worker) in order.
#[track_caller]
fn requests_on_each(
    upstream: &Upstream,
    client: &HttpClient,
    workers: &[u32],
) -> Vec<(String, u32)> {
    let mut requests: Vec<(String, u32)> = Vec::new();
    // Each request lands on either worker by the hash of its source port:
    // 40 tries leave a 2^-39 chance that one worker got none.
    for i in 1..=40 {
        let name = format!("r{i}");
        client.get(&name, &format!("/slow/{name}"));
        let worker = upstream.wait_request(&name);
        assert!(
            workers.contains(&worker),
            "request {name} was proxied by {worker}, not by a worker of {workers:?}"
        );
        requests.push((name, worker));
        let covered = workers.iter().all(|w| requests.iter().any(|(_, r)| r == w));
        if covered && requests.len() >= 3 {
            return requests;
        }
    }
    panic!("40 requests did not reach every worker of {workers:?}: {requests:?}");
}

/// Answers every request but the last, one at a time, each time waiting
/// until the client has its complete response and gracewatch's live count
/// went down by one. Returns the release times.
#[track_caller]
fn finish_all_but_last(
    upstream: &Upstream,
    client: &HttpClient,
    drain: &Drain,
    requests: &[(String, u32)],
) -> Vec<u64> {
    let k = requests.len() as u64;
    let mut released = Vec::new();
    for (i, (name, _)) in requests[..requests.len() - 1].iter().enumerate() {
        released.push(upstream.respond(name));
        let response = client.wait_done(name);
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, format!("done_{name}").as_str()),
            "request {name} did not complete"
        );
        let left = k - 1 - i as u64;
        drain.wait_progress(&format!("live {left}"), STATE_TIMEOUT, |p| {
            p["live"] == left
        });
    }
    released
}

fn send(pid: u32, signal: Signal) {
    let p = Pid::from_raw(pid as i32).expect("a pid");
    kill_process(p, signal).unwrap_or_else(|e| panic!("failed to send {signal:?} to {pid}: {e}"));
}

#[test]
fn reload_wait_returns_after_old_workers_finish() {
    let Some(gw) = setup() else { return };
    if !nginx_available() {
        return;
    }
    let ns = Netns::new("nginx-reload");
    let upstream = Upstream::start(&ns, "127.0.0.1:7512");
    let nginx = Nginx::start(&ns, 7511, upstream.address());
    let client = HttpClient::start(&ns, "127.0.0.1:7511");
    let master = nginx.master();

    // What a deploy script does: the old workers, before the reload.
    let mut old = nginx.workers();
    old.sort_unstable();
    assert_eq!(
        pgrep_children(master),
        old,
        "`pgrep -P MASTER` should list exactly the workers nginx started"
    );
    let requests = requests_on_each(&upstream, &client, &old);
    let k = requests.len() as u64;

    let mark = nginx.log_mark();
    nginx.reload();
    let (by, new) = nginx.wait_workers_started(mark, |p| p == master);
    assert_eq!(by, master);
    nginx.wait_shutting_down(mark, &old);
    // The new workers take the new traffic.
    client.get("fresh", "/fast");
    let fresh = client.wait_done("fresh");
    assert!(
        fresh.status == 200 && new.iter().any(|w| fresh.body == format!("fast_{w}")),
        "a request after the reload should be answered by a new worker {new:?}: {fresh:?}"
    );

    let (w1, w2) = (old[0].to_string(), old[1].to_string());
    let wait = gw.spawn_drain(&["wait", "--pid", &w1, "--pid", &w2, "--json"]);
    let first = wait.wait_ready();
    assert_eq!(
        first["live"],
        k,
        "the old workers hold the {k} requests in flight: {first}\n{}",
        nginx.context()
    );
    let mut released = finish_all_but_last(&upstream, &client, &wait, &requests);
    assert!(
        !wait.has_exited(),
        "gracewatch wait returned with a request still in flight"
    );

    let (last, last_worker) = requests.last().cloned().expect("requests");
    released.push(upstream.respond(&last));
    let last_response = client.wait_done(&last);
    assert_eq!(last_response.status, 200);
    let done = wait.wait(STATE_TIMEOUT);
    done.assert_code(0);
    done.assert_result(&[
        ("targets", json!([old[0], old[1]])),
        ("outcome", json!("drained")),
        ("signal_sent", serde_json::Value::Null),
        ("initial_live", json!(k)),
        ("peak_live", json!(k)),
        ("still_held", json!(0)),
    ]);
    let last_release = *released.last().expect("released");
    // Causal: the old worker could not close the last connection before
    // the upstream released its answer.
    assert!(
        done.exited_ns > last_release,
        "gracewatch wait exited {} before the last answer was released",
        gap_ms(last_release, done.exited_ns)
    );
    // And after the client had its complete response (the margin is the
    // worker's close plus gracewatch's whole reaction to it).
    assert!(
        done.exited_ns > last_response.at_ns,
        "gracewatch wait exited {} before the last client completed",
        gap_ms(last_response.at_ns, done.exited_ns)
    );
    eprintln!(
        "nginx reload: {k} requests on old workers {old:?} (last on {last_worker}); wait exited {} after the last answer was released, {} after the last client completed",
        gap_ms(done.exited_ns, last_release),
        gap_ms(done.exited_ns, last_response.at_ns)
    );
    // nginx's own graceful shutdown: the old workers exit once drained.
    for w in &old {
        assert!(
            exits_within(*w, STATE_TIMEOUT),
            "old worker {w} did not exit\n{}",
            nginx.context()
        );
    }
    assert!(alive(master), "the master must survive a reload");
}

#[test]
fn binary_upgrade_quits_old_master_after_old_workers_drain() {
    let Some(gw) = setup() else { return };
    if !nginx_available() {
        return;
    }
    let ns = Netns::new("nginx-upgrade");
    let upstream = Upstream::start(&ns, "127.0.0.1:7522");
    let nginx = Nginx::start(&ns, 7521, upstream.address());
    let client = HttpClient::start(&ns, "127.0.0.1:7521");
    let old_master = nginx.master();
    let mut old = nginx.workers();
    old.sort_unstable();
    let requests = requests_on_each(&upstream, &client, &old);
    let k = requests.len() as u64;

    // USR2: the old master re-execs nginx; the new master is its child.
    let mark = nginx.log_mark();
    send(old_master, Signal::USR2);
    let (new_master, new_workers) = nginx.wait_workers_started(mark, |p| p != old_master);
    assert_eq!(
        parent_of(new_master),
        Some(old_master),
        "the new master should be a child of the old one"
    );
    assert_eq!(nginx.pidfile("nginx.pid"), Some(new_master));
    assert_eq!(nginx.pidfile("nginx.pid.oldbin"), Some(old_master));
    // WINCH: the old workers stop accepting and finish what is in flight.
    let mark = nginx.log_mark();
    send(old_master, Signal::WINCH);
    nginx.wait_shutting_down(mark, &old);

    let oldbin = nginx.path("nginx.pid.oldbin");
    let exclude = new_master.to_string();
    let drain = gw.spawn_drain(&[
        "drain",
        "--pidfile",
        &oldbin,
        "--children",
        "--exclude",
        &exclude,
        "--signal",
        "QUIT",
        "--json",
    ]);
    let first = drain.wait_ready();
    assert_eq!(
        first["live"],
        k,
        "the old workers hold the {k} requests in flight: {first}\n{}",
        nginx.context()
    );
    let mut released = finish_all_but_last(&upstream, &client, &drain, &requests);
    let quit_seen = |lines: &[gracewatch_testkit::nginx::LogLine]| {
        lines
            .iter()
            .any(|l| l.pid == old_master && l.message.starts_with("signal 3 (SIGQUIT)"))
    };
    assert!(
        !drain.has_exited() && alive(old_master) && !quit_seen(&nginx.log()),
        "the old master was signalled (or gracewatch returned) with a request still in flight\n{}",
        nginx.context()
    );

    let (last, _) = requests.last().cloned().expect("requests");
    released.push(upstream.respond(&last));
    let last_response = client.wait_done(&last);
    assert_eq!(last_response.status, 200);
    let done = drain.wait(STATE_TIMEOUT);
    done.assert_code(0);
    let result = done.assert_result(&[
        ("outcome", json!("drained")),
        ("signal_sent", json!("SIGQUIT")),
        ("initial_live", json!(k)),
        ("peak_live", json!(k)),
        ("still_held", json!(0)),
    ]);
    let mut targets: Vec<u64> = result["targets"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default();
    targets.sort_unstable();
    let mut expected = vec![u64::from(old_master), u64::from(old[0]), u64::from(old[1])];
    expected.sort_unstable();
    assert_eq!(
        targets, expected,
        "targets should be the old master and its workers, without the new master's tree"
    );
    let last_release = *released.last().expect("released");
    assert!(
        done.exited_ns > last_release && done.exited_ns > last_response.at_ns,
        "gracewatch drain exited before the last request finished (release {}, client {})",
        gap_ms(last_release, done.exited_ns),
        gap_ms(last_response.at_ns, done.exited_ns)
    );

    // The old master got QUIT from gracewatch, and exits.
    assert!(
        exits_within(old_master, STATE_TIMEOUT),
        "the old master did not exit after QUIT\n{}",
        nginx.context()
    );
    let quit = nginx.log().into_iter().find(|l| {
        l.pid == old_master && l.message.starts_with("signal 3 (SIGQUIT) received from ")
    });
    assert_eq!(
        quit.as_ref().map(|l| l.message.clone()),
        Some(format!(
            "signal 3 (SIGQUIT) received from {}, shutting down",
            done.pid
        )),
        "the old master's log should show QUIT from gracewatch (pid {})\n{}",
        done.pid,
        nginx.context()
    );
    eprintln!(
        "nginx binary upgrade: {k} requests on old workers {old:?}; drain (QUIT to old master {old_master}) seen exiting {} after the last answer was released",
        gap_ms(done.exited_ns, last_release)
    );

    // The new master keeps serving.
    assert!(alive(new_master), "the new master died");
    assert_eq!(nginx.pidfile("nginx.pid"), Some(new_master));
    client.get("after", "/fast");
    let after = client.wait_done("after");
    assert!(
        after.status == 200
            && new_workers
                .iter()
                .any(|w| after.body == format!("fast_{w}")),
        "the new master's workers {new_workers:?} should answer: {after:?}"
    );
}
