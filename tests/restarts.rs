//! Restarts as the agent reports them, with real servers restarting three
//! times in a row while clients pin every old generation: nginx `-s
//! reload`, HAProxy `-sf` and the fd-handover server. After the third
//! restart `/v1/status` must show one serving generation and the three
//! older ones draining with their true counts; as each generation's
//! clients finish, the observed-drain histogram must count that drain with
//! the duration the clients themselves saw (from the restart that stopped
//! the generation accepting to its last connection's end) within
//! [`TOLERANCE`].
//!
//! The clients' timing has an uncertainty of its own: a restart is known
//! to have stopped the old generation between the moment the test started
//! it and the moment the test saw it done (nginx's `gracefully shutting
//! down` log line, the old process's fd table without the listener, the
//! new HAProxy alone on the port). The observed duration must lie within
//! [`TOLERANCE`] of that window; every drain prints both.

use std::{
    thread,
    time::{Duration, Instant},
};

use gracewatch_testkit::{
    Agent, Child, Client, HAPROXY, Netns, STATE_TIMEOUT, Schema, Server, TempDir, generations,
    haproxy_available, http, listener, monotonic_ns,
    nginx::{HttpClient, Nginx, Upstream, exits_within, nginx_available},
    procfs::{holds_socket, listening_inode},
    setup,
};
use rustix::process::{Pid, Signal, kill_process};
use serde_json::Value;

/// How far an observed drain duration may be from the clients' own timing.
const TOLERANCE: Duration = Duration::from_millis(100);
/// Restarts in a row.
const RESTARTS: usize = 3;

/// The agent's `/v1/status` and `/metrics`, read over its loopback port.
struct Observer {
    agent: Agent,
}

impl Observer {
    fn get(&self, path: &str) -> String {
        let answer = http::get(&self.agent.tcp(), path)
            .unwrap_or_else(|e| panic!("GET {path} failed: {e}\n{}", self.agent.context()));
        assert_eq!(answer.code, 200, "GET {path}: {}", answer.body);
        answer.body
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.get("/v1/status")).expect("/v1/status is JSON")
    }

    /// `/v1/restarts`, checked against its schema.
    fn restarts(&self) -> Value {
        let v: Value =
            serde_json::from_str(&self.get("/v1/restarts")).expect("/v1/restarts is JSON");
        if let Err(e) = Schema::Restarts.check(&v) {
            panic!("/v1/restarts does not follow its schema: {e}\n{v}");
        }
        v
    }

    /// Checks that `/v1/restarts` recorded the drain of each of `drains`
    /// (pid, live it started from, observed seconds): drained, started
    /// because it stopped accepting with `why`, from that count, lasting
    /// what the histogram got.
    #[track_caller]
    fn check_records(&self, why: &str, drains: &[(u32, u64, f64)]) {
        let v = self.restarts();
        let records = v["restarts"].as_array().cloned().unwrap_or_default();
        for (pid, from_live, seconds) in drains {
            let Some(r) = records.iter().find(|r| r["pid"] == *pid) else {
                panic!("/v1/restarts has no record of pid {pid}: {v}");
            };
            let duration = r["duration_ms"].as_f64().unwrap_or(-1.0);
            let ok = r["outcome"] == "drained"
                && r["why"] == why
                && r["from_live"] == *from_live
                && r["dropped"] == 0
                && (duration - seconds * 1e3).abs() <= 1.0;
            assert!(
                ok,
                "record of pid {pid}: want drained ({why}) from {from_live}, {:.1} ms, 0 dropped; got {r}",
                seconds * 1e3
            );
        }
    }

    /// `(count, sum)` of `gracewatch_observed_drain_duration_seconds`.
    fn observed_drains(&self) -> (u64, f64) {
        let text = self.get("/metrics");
        let value = |name: &str| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(name)?
                        .strip_prefix(' ')?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or_else(|| panic!("no `{name}` in /metrics:\n{text}"))
        };
        (
            value("gracewatch_observed_drain_duration_seconds_count") as u64,
            value("gracewatch_observed_drain_duration_seconds_sum"),
        )
    }

    /// Waits until the histogram counted `n` drains; returns its sum.
    #[track_caller]
    fn wait_drains(&self, n: u64) -> f64 {
        let deadline = Instant::now() + STATE_TIMEOUT;
        loop {
            let (count, sum) = self.observed_drains();
            if count == n {
                return sum;
            }
            assert!(
                count < n,
                "the histogram counted {count} drains, expected {n}; status: {}\n{}",
                self.status(),
                self.agent.context()
            );
            assert!(
                Instant::now() < deadline,
                "the histogram counted {count} drains after {STATE_TIMEOUT:?}, expected {n}\n{}",
                self.agent.context()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the listener `address` of namespace `netns` shows the
    /// generations `want` (pid, role, live) in this order, oldest first.
    #[track_caller]
    fn wait_generations(&self, netns: u64, address: &str, want: &[(u32, &str, u64)]) -> Value {
        let deadline = Instant::now() + STATE_TIMEOUT * 3;
        loop {
            let status = self.status();
            let got: Vec<(u32, String, u64)> = listener(&status, netns, address)
                .and_then(|l| l["generations"].as_array())
                .map(|gens| {
                    gens.iter()
                        .map(|g| {
                            (
                                g["pid"].as_u64().unwrap_or(0) as u32,
                                g["role"].as_str().unwrap_or("").to_owned(),
                                g["live"].as_u64().unwrap_or(u64::MAX),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let same = got.len() == want.len()
                && got
                    .iter()
                    .zip(want)
                    .all(|(g, w)| g.0 == w.0 && g.1 == w.1 && g.2 == w.2);
            if same {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "generations of {address}: want {want:?}, got {got:?} (roles {:?})\n{}",
                listener(&status, netns, address).map(generations),
                self.agent.context()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One restart: the window in which it stopped the old generation accepting.
#[derive(Clone, Copy, Debug)]
struct Stopped {
    /// Just before the test started the restart.
    from_ns: u64,
    /// When the test saw the server acknowledge it.
    acked_ns: u64,
}

/// Checks drain `k` (of the generation stopped by `stopped`, whose last
/// connection ended at `ended_ns`) against the histogram: waits for its
/// count to reach `k + 1` and compares the sum's growth with the clients'
/// timing, which lies between `ended - acked` and `ended - from` (the
/// restart stopped the generation somewhere in that window). Returns the
/// new sum.
#[track_caller]
fn check_drain(
    obs: &Observer,
    what: &str,
    k: usize,
    stopped: Stopped,
    ended_ns: u64,
    sum: f64,
) -> f64 {
    let new_sum = obs.wait_drains(k as u64 + 1);
    let observed = new_sum - sum;
    let longest = ended_ns.saturating_sub(stopped.from_ns) as f64 / 1e9;
    let shortest = ended_ns.saturating_sub(stopped.acked_ns) as f64 / 1e9;
    let off = if observed > longest {
        observed - longest
    } else if observed < shortest {
        observed - shortest
    } else {
        0.0
    };
    eprintln!(
        "{what}: drain {k}: observed {:.1} ms, the clients saw {:.1}-{:.1} ms, off by {:+.1} ms",
        observed * 1e3,
        shortest * 1e3,
        longest * 1e3,
        off * 1e3
    );
    assert!(
        off.abs() <= TOLERANCE.as_secs_f64(),
        "{what}: drain {k} observed as {:.1} ms, the clients saw {:.1}-{:.1} ms (more than {TOLERANCE:?} apart)\n{}",
        observed * 1e3,
        shortest * 1e3,
        longest * 1e3,
        obs.agent.context()
    );
    new_sum
}

fn start_observer(gw: &gracewatch_testkit::Gracewatch, dir: &TempDir) -> Observer {
    Observer {
        agent: Agent::builder().start(gw, dir),
    }
}

#[test]
fn nginx_reloads_three_times_and_each_old_generation_drain_is_observed() {
    let Some(gw) = setup() else { return };
    if !nginx_available() {
        return;
    }
    let ns = Netns::new("restarts-nginx");
    let netns = ns.netns_inode();
    let address = "127.0.0.1:7611";
    let upstream = Upstream::start(&ns, "127.0.0.1:7612");
    // One worker per generation: each reload leaves one old worker.
    let nginx = Nginx::start_with_workers(&ns, 7611, upstream.address(), 1);
    let client = HttpClient::start(&ns, address);
    let dir = TempDir::new("restarts-nginx");
    let obs = start_observer(&gw, &dir);
    let master = nginx.master();

    let mut workers = nginx.workers();
    let mut stops = Vec::new();
    for k in 0..RESTARTS {
        let worker = workers[0];
        // A request in flight on this generation's worker (idle keep-alive
        // connections are closed by a stopping worker at once).
        let name = format!("g{k}");
        client.get(&name, &format!("/slow/{name}"));
        assert_eq!(upstream.wait_request(&name), worker, "request {name}");
        thread::sleep(Duration::from_millis(200));

        let inode = listening_inode(worker, address);
        let mark = nginx.log_mark();
        let from_ns = monotonic_ns();
        nginx.reload();
        let (_, new) = nginx.wait_workers_started(mark, |p| p == master);
        // A stopping worker logs `gracefully shutting down`, then closes its
        // copies of the listening sockets.
        nginx.wait_shutting_down(mark, &[worker]);
        wait_let_go(worker, inode);
        stops.push((
            worker,
            Stopped {
                from_ns,
                acked_ns: monotonic_ns(),
            },
        ));
        workers = new;
    }

    // The master holds the listener with the serving worker; every old
    // worker drains one request.
    let mut want: Vec<(u32, &str, u64)> = vec![(master, "serving", 0)];
    want.extend(stops.iter().map(|(w, _)| (*w, "draining", 1)));
    want.push((workers[0], "serving", 0));
    obs.wait_generations(netns, address, &want);

    let mut sum = obs.wait_drains(0);
    let mut drains = Vec::new();
    for (k, (worker, stopped)) in stops.iter().enumerate() {
        thread::sleep(Duration::from_millis(300));
        let name = format!("g{k}");
        upstream.respond(&name);
        let done = client.wait_done(&name);
        assert_eq!(done.status, 200, "request {name}");
        let new_sum = check_drain(&obs, "nginx reload", k, *stopped, done.at_ns, sum);
        drains.push((*worker, 1, new_sum - sum));
        sum = new_sum;
        assert!(
            exits_within(*worker, STATE_TIMEOUT),
            "old worker {worker} did not exit\n{}",
            nginx.context()
        );
    }
    obs.check_records("closed_its_listener", &drains);
    obs.agent.stop_within(STATE_TIMEOUT);
}

/// `haproxy -f CFG -db [-sf OLD]` inside `ns`: a foreground HAProxy.
fn haproxy(ns: &Netns, cfg: &str, old: Option<u32>) -> Child {
    let mut cmd = ns.command(HAPROXY);
    cmd.args(["-f", cfg, "-db"]);
    if let Some(old) = old {
        cmd.args(["-sf", &old.to_string()]);
    }
    Child::spawn_command("haproxy", cmd)
}

/// Waits until a fresh connection to `address` is accepted by `pid`, as the
/// agent sees it, so that the next clients land on that generation.
#[track_caller]
fn wait_serving(obs: &Observer, pid: u32, netns: u64, address: &str) {
    let deadline = Instant::now() + STATE_TIMEOUT * 3;
    loop {
        let status = obs.status();
        let holds = listener(&status, netns, address).is_some_and(|l| {
            l["holders"]
                .as_array()
                .is_some_and(|h| h.iter().any(|h| h["pid"] == pid))
        });
        if holds {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "haproxy {pid} never listed as a holder of {address}\n{}",
            obs.agent.context()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn haproxy_soft_restarts_three_times_and_each_old_generation_drain_is_observed() {
    let Some(gw) = setup() else { return };
    if !haproxy_available() {
        return;
    }
    let ns = Netns::new("restarts-haproxy");
    let netns = ns.netns_inode();
    let address = "127.0.0.1:7621";
    let backend = "127.0.0.1:7622";
    // The backend holds every connection until its client leaves (`h`).
    let mut server = ns.command(env!("CARGO_BIN_EXE_gw-handover-server"));
    server.arg(backend);
    let backend_server = Child::spawn_command("gw-handover-server (backend)", server);
    backend_server.wait_ready();

    let dir = TempDir::new("restarts-haproxy");
    let cfg = dir.write(
        "haproxy.cfg",
        &format!(
            "global
    maxconn 256
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend fe
    bind {address}
    default_backend be
backend be
    server s1 {backend}
"
        ),
    );
    let obs = start_observer(&gw, &dir);

    let mut current = haproxy(&ns, &cfg, None);
    let mut pid = current.process_id().expect("haproxy pid");
    wait_serving(&obs, pid, netns, address);
    let mut old: Vec<(Child, Client, Stopped)> = Vec::new();
    for k in 0..RESTARTS {
        let inode = listening_inode(pid, address);
        // Two clients pin this generation.
        let clients = Client::connect_sending(&ns, address, 2, "h");
        let deadline = Instant::now() + STATE_TIMEOUT;
        while gracewatch_testkit::live_of(&obs.status(), pid) != Some(2) {
            assert!(
                Instant::now() < deadline,
                "haproxy {pid} never held its 2 clients (restart {k})"
            );
            thread::sleep(Duration::from_millis(20));
        }
        thread::sleep(Duration::from_millis(200));
        let from_ns = monotonic_ns();
        let next = haproxy(&ns, &cfg, Some(pid));
        let next_pid = next.process_id().expect("haproxy pid");
        wait_serving(&obs, next_pid, netns, address);
        // Each HAProxy listens on a socket of its own (SO_REUSEPORT): the
        // old one stopped once its fd table no longer has it.
        wait_let_go(pid, inode);
        let stopped = Stopped {
            from_ns,
            acked_ns: monotonic_ns(),
        };
        old.push((std::mem::replace(&mut current, next), clients, stopped));
        pid = next_pid;
    }

    let mut want: Vec<(u32, &str, u64)> = old
        .iter()
        .map(|(c, _, _)| (c.process_id().unwrap_or(0), "draining", 2))
        .collect();
    want.push((pid, "serving", 0));
    obs.wait_generations(netns, address, &want);

    let mut sum = obs.wait_drains(0);
    for (k, (child, clients, stopped)) in old.iter_mut().enumerate() {
        thread::sleep(Duration::from_millis(300));
        clients.closeall();
        let ended = monotonic_ns();
        sum = check_drain(&obs, "haproxy -sf", k, *stopped, ended, sum);
        let status = child.wait_exit(STATE_TIMEOUT);
        assert!(
            status.success(),
            "old haproxy exits 0 once drained ({status})"
        );
    }
    obs.agent.stop_within(STATE_TIMEOUT);
}

/// Waits until `pid`'s fd table no longer has the socket `inode`, looking
/// every millisecond.
#[track_caller]
fn wait_let_go(pid: u32, inode: u64) {
    let deadline = Instant::now() + STATE_TIMEOUT;
    while holds_socket(pid, inode) != Some(false) {
        assert!(
            Instant::now() < deadline,
            "{pid} never let go of the listening socket {inode}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn handover_server_restarts_three_times_and_each_old_generation_drain_is_observed() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("restarts-handover");
    let netns = ns.netns_inode();
    let address = "127.0.0.1:7631";
    let dir = TempDir::new("restarts-handover");
    let pidfile = dir.path("server.pid");
    let obs = start_observer(&gw, &dir);

    let mut server = ns.command(env!("CARGO_BIN_EXE_gw-handover-server"));
    server.args([address, "--pidfile", &pidfile]);
    let first = Child::spawn_command("gw-handover-server", server);
    let (mut pid, _) = first.wait_ready();
    let inode = listening_inode(pid, address);
    let mut old: Vec<(u32, Client, Stopped)> = Vec::new();
    for k in 0..RESTARTS {
        let clients = Client::connect_sending(&ns, address, 2, "h");
        let deadline = Instant::now() + STATE_TIMEOUT;
        while gracewatch_testkit::live_of(&obs.status(), pid) != Some(2) {
            assert!(
                Instant::now() < deadline,
                "generation {pid} never held its 2 clients (restart {k})"
            );
            thread::sleep(Duration::from_millis(20));
        }
        thread::sleep(Duration::from_millis(200));
        let from_ns = monotonic_ns();
        let p = Pid::from_raw(pid as i32).expect("a pid");
        kill_process(p, Signal::HUP).expect("SIGHUP the serving generation");
        // The old generation lets go of the listener once the next one is
        // ready: the truth is its own fd table, looked at every millisecond.
        wait_let_go(pid, inode);
        let stopped = Stopped {
            from_ns,
            acked_ns: monotonic_ns(),
        };
        let next: u32 = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .expect("the next generation's pid in the pid file");
        assert_ne!(next, pid, "the pid file names the next generation");
        old.push((pid, clients, stopped));
        pid = next;
    }

    let mut want: Vec<(u32, &str, u64)> = old.iter().map(|(p, _, _)| (*p, "draining", 2)).collect();
    want.push((pid, "serving", 0));
    obs.wait_generations(netns, address, &want);

    let mut sum = obs.wait_drains(0);
    let mut drains = Vec::new();
    for (k, (old_pid, clients, stopped)) in old.iter().enumerate() {
        thread::sleep(Duration::from_millis(300));
        clients.closeall();
        let ended = monotonic_ns();
        let new_sum = check_drain(&obs, "fd handover", k, *stopped, ended, sum);
        drains.push((*old_pid, 2, new_sum - sum));
        sum = new_sum;
    }
    obs.check_records("closed_its_listener", &drains);
    obs.agent.stop_within(STATE_TIMEOUT);
    // The old generations stay until signalled: the namespace's end kills them.
    drop(first);
}

/// `gracewatch_handovers_total` as the agent exports it.
fn handovers(obs: &Observer) -> u64 {
    let text = obs.get("/metrics");
    text.lines()
        .find_map(|l| {
            l.strip_prefix("gracewatch_handovers_total ")?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no gracewatch_handovers_total in /metrics:\n{text}")) as u64
}

/// Two network namespaces with a server each on `127.0.0.1:8080`: the
/// second one's accepts, while the first accepts nothing for longer than a
/// handover's quiet period, are no handover of the first (two listeners,
/// each with one serving generation, no drain). Then, as a control, a real
/// handover in the first namespace (the listener inherited by a second
/// process, which takes over accepting) is reported, once.
#[test]
fn equal_addresses_in_two_namespaces_are_no_handover() {
    let Some(gw) = setup() else { return };
    let (ns1, ns2) = (Netns::new("restarts-ns-a"), Netns::new("restarts-ns-b"));
    let address = "127.0.0.1:8080";
    let dir = TempDir::new("restarts-netns");
    let obs = start_observer(&gw, &dir);

    let first = Server::listen(&ns1, address);
    let _held = Client::connect(&ns1, address, 2);
    first.wait_accepted(2);
    let deadline = Instant::now() + STATE_TIMEOUT;
    while gracewatch_testkit::live_of(&obs.status(), first.pid()) != Some(2) {
        assert!(
            Instant::now() < deadline,
            "the first server never showed 2 live"
        );
        thread::sleep(Duration::from_millis(20));
    }

    let second = Server::listen(&ns2, address);
    let _other = Client::connect(&ns2, address, 4);
    second.wait_accepted(4);
    // Longer than the quiet period after which a process that stopped
    // accepting while another accepts on its listener turns draining.
    thread::sleep(Duration::from_millis(2600));
    let _more = Client::connect(&ns2, address, 1);
    second.wait_accepted(5);
    thread::sleep(Duration::from_millis(300));

    let want_alone = |netns: u64, pid: u32, live: u64| {
        obs.wait_generations(netns, address, &[(pid, "serving", live)]);
    };
    want_alone(ns1.netns_inode(), first.pid(), 2);
    want_alone(ns2.netns_inode(), second.pid(), 5);
    assert_eq!(handovers(&obs), 0, "no handover across namespaces");
    let records = obs.restarts();
    assert_eq!(
        records["restarts"].as_array().map(Vec::len),
        Some(0),
        "no drain was observed: {records}"
    );

    // The control: a handover within the first namespace is one.
    let next = first.handover();
    first.stopaccept();
    let _c = Client::connect(&ns1, address, 3);
    next.wait_accepted(3);
    let deadline = Instant::now() + STATE_TIMEOUT;
    while handovers(&obs) != 1 {
        assert!(
            Instant::now() < deadline,
            "the handover in one namespace was not counted ({} counted)",
            handovers(&obs)
        );
        thread::sleep(Duration::from_millis(20));
    }
    obs.agent.stop_within(STATE_TIMEOUT);
}
