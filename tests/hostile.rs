//! `gracewatch agent` under attack, as root: a real agent (its binary, with
//! the open-file limit its systemd unit sets) is flooded by slowloris, idle
//! and never-reading clients while a real server in a network namespace is
//! drained through the agent's unix socket; and each hardening of the agent
//! is attacked on its own (header limits, what read endpoints expose, slow
//! event readers, unsafe token files and socket directories, metrics that
//! `promtool` accepts).
//!
//! HTTP is spoken by hand (std sockets, HTTP/1.1): the attackers must send
//! exactly the bytes an attacker would, which no client library does.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use gracewatch_testkit::{
    Agent, Client, Gracewatch, Netns, PROGRAM_TIMEOUT, STARTUP_TIMEOUT, Schema, Server, TempDir,
    free_port, gap_ms,
    http::{Answer, dechunk, exchange, parse_answer},
    procfs, setup,
};
use serde_json::{Value, json};

/// The agent's limits these tests rely on (see `gracewatch/src/agent/`).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_SUBSCRIBERS: usize = 64;
/// `LimitNOFILE=` of `deploy/systemd/gracewatch-agent.service`.
const UNIT_NOFILE: u64 = 8192;
/// How long the agent may take to exit 0 on SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

const SLOWLORIS: usize = 2_000;
const IDLE: usize = 1_100;
const STUCK_READERS: usize = 500;

// --- plumbing -----------------------------------------------------------------

/// Raises this process's soft open-file limit to its hard limit (the
/// attackers hold thousands of sockets).
fn raise_nofile(needed: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        rustix::process::Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    );
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    assert!(
        now >= needed,
        "this test needs {needed} open files, the limit is {now} (raise the hard limit: ulimit -Hn)"
    );
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n{extra}\r\n")
}

fn post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The agent with a token file and the open-file limit of its unit.
#[track_caller]
fn start_agent(gw: &Gracewatch, dir: &TempDir) -> Agent {
    Agent::builder().token().nofile(UNIT_NOFILE).start(gw, dir)
}

/// Sends `request` (a whole HTTP/1.1 request, `Connection: close`) to the
/// agent over TCP and reads the answer to the end.
fn tcp(agent: &Agent, request: &str) -> std::io::Result<Answer> {
    exchange(
        agent.tcp().connect(Duration::from_secs(20))?,
        request.as_bytes(),
    )
}

/// Like [`tcp`], over the unix socket.
fn unix(agent: &Agent, request: &str) -> std::io::Result<Answer> {
    exchange(
        agent.unix().connect(Duration::from_secs(20))?,
        request.as_bytes(),
    )
}

/// The agent's (VmRSS, VmHWM) in MB.
fn rss_mb(agent: &Agent) -> (f64, f64) {
    let mb = |field| procfs::status_kb(agent.pid(), field).map_or(0.0, |kb| kb as f64 / 1024.0);
    (mb("VmRSS"), mb("VmHWM"))
}

/// Whether the agent closed `s` (EOF or reset), without blocking.
fn closed_by_peer(s: &TcpStream) -> bool {
    let _ = s.set_nonblocking(true);
    let mut buf = [0u8; 4096];
    let mut reader = s;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// The stuck `/v1/events` readers, the idle and the slowloris connections,
/// all at once. The slowloris ones send an unterminated 7 KB header and then
/// one more byte a second from a thread, until dropped.
struct Flood {
    readers: Vec<(TcpStream, u16)>,
    /// When the first idle connection was opened: none of them can have
    /// timed out before this plus the header timeout.
    idle_started: Instant,
    idle: Vec<TcpStream>,
    slowloris: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    dripper: Option<thread::JoinHandle<()>>,
}

impl Flood {
    fn launch(addr: &str) -> Flood {
        let t0 = Instant::now();
        let streams: Vec<TcpStream> = (0..STUCK_READERS)
            .map(|_| {
                let mut s = TcpStream::connect(addr).expect("connect reader");
                s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: agent\r\n\r\n")
                    .expect("write");
                s
            })
            .collect();
        // The status line only; the streams are never read afterwards.
        let readers = streams
            .into_iter()
            .map(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let mut head = [0u8; 12];
                let code = s
                    .read_exact(&mut head)
                    .ok()
                    .and_then(|()| std::str::from_utf8(&head[9..12]).ok()?.parse().ok())
                    .unwrap_or(0);
                (s, code)
            })
            .collect();
        eprintln!(
            "flood: {STUCK_READERS} event readers connected after {:?}",
            t0.elapsed()
        );
        let idle_started = Instant::now();
        let idle = (0..IDLE)
            .map(|_| TcpStream::connect(addr).expect("connect idle"))
            .collect();
        eprintln!("flood: {IDLE} idle connected after {:?}", t0.elapsed());
        let pad = "a".repeat(7 * 1024);
        let slowloris: Vec<TcpStream> = (0..SLOWLORIS)
            .map(|_| {
                let mut s = TcpStream::connect(addr).expect("connect slowloris");
                let _ = s.write_all(
                    format!("GET /livez HTTP/1.1\r\nHost: agent\r\nX-Pad: {pad}").as_bytes(),
                );
                s
            })
            .collect();
        let slowloris = Arc::new(Mutex::new(slowloris));
        let stop = Arc::new(AtomicBool::new(false));
        let dripper = {
            let (conns, stop) = (slowloris.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for s in conns.lock().unwrap_or_else(|e| e.into_inner()).iter_mut() {
                        let _ = s.set_nonblocking(true);
                        let _ = s.write(b"a");
                    }
                    thread::sleep(Duration::from_secs(1));
                }
            })
        };
        Flood {
            readers,
            idle_started,
            idle,
            slowloris,
            stop,
            dripper: Some(dripper),
        }
    }

    /// How many idle and slowloris connections are still open.
    fn still_open(&self) -> (usize, usize) {
        let idle = self.idle.iter().filter(|s| !closed_by_peer(s)).count();
        let slow = self
            .slowloris
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|s| !closed_by_peer(s))
            .count();
        (idle, slow)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.dripper.take() {
            let _ = t.join();
        }
    }
}

// --- the combined attack --------------------------------------------------------

#[test]
fn a_flood_of_hostile_clients_never_delays_a_drain_over_the_unix_socket() {
    let Some(gw) = setup() else { return };
    raise_nofile((SLOWLORIS + IDLE + STUCK_READERS) as u64 + 512);
    let dir = TempDir::new("hostile-flood");
    let ns = Netns::new("hflood");
    let addr = "127.0.0.1:7801";
    let server = Server::listen(&ns, addr);
    let pid = server.pid();
    let _clients = Client::connect(&ns, addr, 3);
    server.wait_accepted(3);
    let agent = start_agent(&gw, &dir);
    // A first scrape and status, so what they allocate counts as the start.
    let _ = tcp(&agent, &get("/metrics", ""));
    let _ = unix(&agent, &get("/v1/status", ""));
    let (rss_start, _) = rss_mb(&agent);

    let attack_started = Instant::now();
    let flood = Flood::launch(&agent.addr);
    let launched = attack_started.elapsed();
    eprintln!("flood: launched in {launched:?}");

    // The agent first works through the connections the kernel queued for
    // it during the burst (a /livez sent right after it waits behind them).
    let t = Instant::now();
    let first = tcp(&agent, &get("/livez", "")).expect("GET /livez after the burst");
    let catch_up_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(first.code, 200, "{first:?}");
    assert!(
        catch_up_ms < 5000.0,
        "first /livez after the burst took {catch_up_ms:.0} ms"
    );
    // Every attacker is held now (the agent counts its own connections).
    let held = (SLOWLORIS + IDLE + STUCK_READERS) as u64;
    let deadline = Instant::now() + Duration::from_secs(3);
    let all_held = loop {
        let a = unix(&agent, &get("/v1/status", "")).expect("GET /v1/status");
        let v: Value = serde_json::from_str(&a.body).expect("status JSON");
        let own = v["processes"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["pid"] == json!(agent.pid())))
            .and_then(|p| p["live"].as_u64())
            .unwrap_or(0);
        if own >= held {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the agent holds {own} of {held} attackers"
        );
        thread::sleep(Duration::from_millis(50));
    };
    // Under attack: /livez on TCP answers in under a second...
    let t = Instant::now();
    let livez = tcp(&agent, &get("/livez", "")).expect("GET /livez under attack");
    let livez_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(livez.code, 200, "{livez:?}");
    assert!(
        livez_ms < 1000.0,
        "/livez took {livez_ms:.0} ms under attack"
    );
    eprintln!("flood: /livez at {:?}", attack_started.elapsed());
    // ...the counts of the real server stay exact...
    let status = unix(&agent, &get("/v1/status", "")).expect("GET /v1/status");
    let v: Value = serde_json::from_str(&status.body).expect("status JSON");
    let live = v["processes"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["pid"] == json!(pid)))
        .map(|p| p["live"].clone());
    assert_eq!(live, Some(json!(3)), "{}", status.body);

    // ...and a drain over the unix socket signals within 100 ms of the
    // server's last close.
    let started = unix(
        &agent,
        &post(
            "/v1/drains",
            &json!({"pids": [pid], "signal": "TERM", "timeout": "30s"}).to_string(),
        ),
    )
    .expect("POST /v1/drains");
    assert_eq!(started.code, 202, "{started:?}");
    let id = serde_json::from_str::<Value>(&started.body).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    eprintln!("flood: drain started at {:?}", attack_started.elapsed());
    server.close_after(&[100, 200, 300]);
    let closed = server.wait_closed_at(3, PROGRAM_TIMEOUT);
    let signal = server.wait_signal(Duration::from_secs(10));
    let reaction_ms = signal.at_ns.saturating_sub(closed[2]) as f64 / 1e6;
    eprintln!("flood: signalled at {:?}", attack_started.elapsed());
    let done = unix(&agent, &get(&format!("/v1/drains/{id}?wait=10s"), "")).expect("GET drain");
    let report: Value = serde_json::from_str(&done.body).expect("drain JSON");
    assert_eq!(report["report"]["outcome"], "drained", "{}", done.body);
    assert_eq!(signal.name, "TERM");
    assert_eq!(signal.open, 0, "signalled while holding connections");
    assert!(
        signal.at_ns >= closed[2],
        "signalled before the last close ({})",
        gap_ms(signal.at_ns, closed[2])
    );
    let (_, rss_under_attack) = rss_mb(&agent);
    eprintln!(
        "flood: first /livez {catch_up_ms:.0} ms, /livez {livez_ms:.1} ms, drain reaction {reaction_ms:.1} ms, \
         RSS start {rss_start:.1} MB, peak so far {rss_under_attack:.1} MB"
    );
    assert!(
        Instant::now() < flood.idle_started + HEADER_READ_TIMEOUT,
        "the measurements ended after the first attackers could time out"
    );

    // The stuck readers: exactly the cap was served, the rest refused.
    let served = flood.readers.iter().filter(|(_, c)| *c == 200).count();
    let refused = flood.readers.iter().filter(|(_, c)| *c == 503).count();
    assert_eq!(
        (served, refused),
        (MAX_SUBSCRIBERS, STUCK_READERS - MAX_SUBSCRIBERS),
        "event readers served / refused"
    );

    // Idle and slowloris connections are closed by the header timeout.
    let deadline = all_held + HEADER_READ_TIMEOUT + Duration::from_secs(3);
    let mut open = flood.still_open();
    while open != (0, 0) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(250));
        open = flood.still_open();
    }
    assert_eq!(open, (0, 0), "idle / slowloris connections still open");
    let all_closed = attack_started.elapsed();

    let (_, rss_peak) = rss_mb(&agent);
    drop(flood);
    // Memory goes back once the attackers left.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut rss_after = rss_mb(&agent).0;
    while rss_after > rss_start + 20.0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(250));
        rss_after = rss_mb(&agent).0;
    }
    eprintln!(
        "flood of {SLOWLORIS} slowloris + {IDLE} idle + {STUCK_READERS} stuck readers (launched in {launched:?}): \
         first /livez {catch_up_ms:.0} ms, /livez {livez_ms:.1} ms, drain reaction {reaction_ms:.1} ms, \
         RSS start {rss_start:.1} MB / peak {rss_peak:.1} MB / after {rss_after:.1} MB, \
         idle and slowloris all closed after {all_closed:?}"
    );
    assert!(
        reaction_ms < 100.0,
        "drain reaction {reaction_ms:.1} ms under attack"
    );
    assert!(rss_peak < 150.0, "agent peak RSS {rss_peak:.1} MB");
    assert!(
        rss_after <= rss_start + 20.0,
        "agent RSS {rss_after:.1} MB after the attack, {rss_start:.1} MB before"
    );
    // Still serving, and stops cleanly.
    assert_eq!(tcp(&agent, &get("/livez", "")).expect("livez").code, 200);
    agent.stop_within(STOP_TIMEOUT);
}

// --- one finding at a time ------------------------------------------------------

#[test]
fn oversized_and_malformed_requests_get_json_errors() {
    let Some(gw) = setup() else { return };
    let dir = TempDir::new("hostile-431");
    let agent = start_agent(&gw, &dir);
    let big = "a".repeat(400 * 1024);
    let cases = [
        (
            format!("GET /livez HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n"),
            431,
        ),
        ("GET /livez HTTP/1.1\r\nHo st: a\r\n\r\n".to_owned(), 400),
        (get("/nope", ""), 404),
        (
            "PUT /livez HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
                .to_owned(),
            405,
        ),
    ];
    for (request, code) in cases {
        // A 431 may come before the whole request was sent.
        let mut s = TcpStream::connect(&agent.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = s.write_all(request.as_bytes());
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let a = parse_answer(&raw);
        assert_eq!(a.code, code, "{a:?}");
        assert!(a.head.contains("content-type: application/json"), "{a:?}");
        let v: Value = serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {a:?}"));
        assert!(v["error"].is_string(), "{a:?}");
    }
    let (rss, _) = rss_mb(&agent);
    assert!(rss < 150.0, "RSS {rss:.1} MB");
    agent.stop_within(STOP_TIMEOUT);
}

#[test]
fn read_endpoints_leak_no_kernel_address_and_peers_need_the_token() {
    let Some(gw) = setup() else { return };
    let dir = TempDir::new("hostile-leak");
    let ns = Netns::new("hleak");
    let addr = "127.0.0.1:7802";
    // It closes each connection once accepted: the programs report an
    // accept at the connection's first send, receive or close (an accepted
    // connection never touched is found by the monitor's rescans, which
    // `record` does not run), and every probe must give one.
    let server = Server::listen_with(&ns, addr, None, &["--hangup"]);
    let agent = start_agent(&gw, &dir);
    // `gracewatch record` prints the same kernel events from another
    // process: were `sk` a kernel address, both would print the same value.
    let mut record = Command::new(gw.bin())
        .arg("record")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn record");
    let record_lines = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let sink = record_lines.clone();
        let out = record.stdout.take().expect("piped");
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
    }
    let subscribe = |auth: Option<&str>, unix: bool| -> Box<dyn std::io::Read + Send> {
        let extra = auth
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!("GET /v1/events HTTP/1.1\r\nHost: a\r\n{extra}\r\n");
        if unix {
            let mut s = UnixStream::connect(&agent.socket).expect("connect");
            s.write_all(req.as_bytes()).expect("write");
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .expect("timeout");
            Box::new(s)
        } else {
            let mut s = TcpStream::connect(&agent.addr).expect("connect");
            s.write_all(req.as_bytes()).expect("write");
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .expect("timeout");
            Box::new(s)
        }
    };
    let mut readers = [
        ("tcp, no token", subscribe(None, false), false, Vec::new()),
        (
            "tcp, token",
            subscribe(agent.token.as_deref(), false),
            true,
            Vec::new(),
        ),
        ("unix socket", subscribe(None, true), true, Vec::new()),
    ];
    // Wait until `record` runs: it prints our probe connections.
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut clients = Vec::new();
    let record_accepts = loop {
        clients.push(Client::connect(&ns, addr, 1));
        thread::sleep(Duration::from_millis(300));
        let accepts: Vec<Value> = record_lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .inspect(|v| {
                if let Err(why) = Schema::Event.check(v) {
                    panic!("gracewatch record: {why}\n{v}");
                }
            })
            .filter(|v| v["kind"] == "accept" && v["pid"] == json!(server.pid()))
            .collect();
        if !accepts.is_empty() {
            break accepts;
        }
        assert!(
            Instant::now() < deadline,
            "gracewatch record printed nothing"
        );
    };
    let _ = record.kill();
    let _ = record.wait();
    let mut buf = vec![0u8; 64 * 1024];
    let server_accepts = |text: &str| -> Vec<Value> {
        text.lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .inspect(|v: &Value| {
                if let Err(why) = Schema::Event.check(v) {
                    panic!("/v1/events: {why}\n{v}");
                }
            })
            .filter(|v: &Value| v["kind"] == "accept" && v["pid"] == json!(server.pid()))
            .collect()
    };
    for (what, stream, peers, seen) in readers.iter_mut() {
        // The last probe's accept, seen by the agent and by `record`: the
        // two ids must differ. (This reader subscribed before the first probe.)
        let record_sk = record_accepts.last().map(|r| r["sk"].clone());
        let deadline = Instant::now() + Duration::from_secs(5);
        while server_accepts(&String::from_utf8_lossy(seen)).len() < clients.len()
            && Instant::now() < deadline
        {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        let text = String::from_utf8_lossy(seen).into_owned();
        let accepts = server_accepts(&text);
        assert_eq!(accepts.len(), clients.len(), "{what}: {text}");
        let (Some(ev), Some(record_sk)) = (accepts.last().cloned(), record_sk) else {
            panic!("{what}: no accept in {text}");
        };
        assert!(ev["sk"].is_u64() && record_sk.is_u64(), "{what}: {ev}");
        assert_ne!(
            ev["sk"], record_sk,
            "{what}: the same socket id in two processes: {ev}"
        );
        for ev in server_accepts(&text) {
            assert_eq!(ev["tuple"].get("remote").is_some(), *peers, "{what}: {ev}");
            assert_eq!(
                ev["tuple"]["local"],
                json!(addr),
                "{what}: local addresses stay: {ev}"
            );
        }
    }
    // Drain answers hide peers the same way.
    let t = tcp(&agent, &get("/v1/drains", "")).expect("GET /v1/drains");
    assert_eq!(t.code, 200, "{t:?}");
    drop(clients);
    agent.stop_within(STOP_TIMEOUT);
}

#[test]
fn a_reader_that_never_reads_is_dropped_and_others_get_every_event() {
    let Some(gw) = setup() else { return };
    let dir = TempDir::new("hostile-slow");
    let agent = start_agent(&gw, &dir);
    // A listener of this process: every accept of it is an event.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut slow = TcpStream::connect(&agent.addr).expect("connect");
    // A small receive window, so the agent's queue for it fills quickly.
    rustix::net::sockopt::set_socket_recv_buffer_size(&slow, 4096).expect("SO_RCVBUF");
    slow.write_all(b"GET /v1/events HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    let mut fast = TcpStream::connect(&agent.addr).expect("connect");
    fast.write_all(b"GET /v1/events HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    fast.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let wanted = 3_000usize;
    let needle = format!("\"local\":\"127.0.0.1:{port}\"");
    let counter = {
        let needle = needle.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(fast);
            let (mut seen, mut line) = (0usize, String::new());
            while seen < wanted {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        assert!(!line.contains("\"lagged\""), "the fast reader lagged");
                        if line.contains("\"kind\":\"accept\"") && line.contains(&needle) {
                            seen += 1;
                        }
                    }
                }
            }
            seen
        })
    };
    thread::sleep(Duration::from_millis(200));
    let made = Instant::now();
    // In bursts of 200 connections (600 events), 50 a second: a busy
    // server, which a reader that keeps up must see whole.
    for i in 0..wanted {
        let c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (s, _) = listener.accept().expect("accept");
        drop((c, s));
        if i % 200 == 199 {
            thread::sleep(Duration::from_millis(20));
        }
    }
    let seen = counter.join().expect("counter thread");
    eprintln!(
        "slow reader: {wanted} accepts made and counted in {:?}",
        made.elapsed()
    );
    assert_eq!(seen, wanted, "the reader that keeps up lost events");
    // The slow reader's stream ends with the lagged line.
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    while !raw.ends_with(b"\r\n0\r\n\r\n") {
        match slow.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let body = dechunk(
        String::from_utf8_lossy(&raw)
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b),
    );
    let last = body.lines().last().unwrap_or_default();
    let got = body.matches(&needle).count();
    eprintln!(
        "slow reader: got {got} events of this test's listener, {} bytes",
        body.len()
    );
    assert!(last.contains("\"kind\":\"lagged\""), "last line: {last}");
    assert!(got < wanted, "the slow reader got {got} of {wanted}");
    agent.stop_within(STOP_TIMEOUT);
}

#[test]
fn unsafe_token_files_and_socket_directories_are_refused_at_start() {
    let Some(gw) = setup() else { return };
    let dir = TempDir::new("hostile-refuse");
    let good_token = "0123456789abcdef0123456789abcdef";
    let file = |name: &str, text: &str, mode: u32| {
        let p = dir.write(name, text);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    };
    let good = file("good", good_token, 0o600);
    let fifo = dir.path("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo")
            .success()
    );
    let open_dir = dir.path("open");
    std::fs::create_dir(&open_dir).expect("mkdir");
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let private_sock = dir.path("agent.sock");
    let open_sock = format!("{open_dir}/agent.sock");
    let cases: [(String, &str, &str); 6] = [
        (
            file("readable", good_token, 0o644),
            &private_sock,
            "mode 644",
        ),
        (file("short", "x\n", 0o600), &private_sock, "shorter than"),
        (fifo, &private_sock, "not a regular file"),
        ("/dev/zero".to_owned(), &private_sock, "not a regular file"),
        (
            file("huge", &"a".repeat(100_000), 0o600),
            &private_sock,
            "larger than",
        ),
        (good, &open_sock, "writable by group or others"),
    ];
    for (token, socket, needle) in cases {
        let started = Instant::now();
        let mut child = Command::new(gw.bin())
            .args(["agent", "--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--token-file", &token, "--unix", socket])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn agent");
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("agent with token {token} and socket {socket} did not refuse to start");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .expect("piped")
            .read_to_string(&mut err)
            .expect("stderr");
        assert_eq!(status.code(), Some(2), "{token}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(needle), "{token}: {err}");
        assert!(
            !err.contains("0123456789abcdef"),
            "never echoes a token: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{token}: took {:?}",
            started.elapsed()
        );
        assert!(
            !Path::new(&open_sock).exists(),
            "no socket in an open directory"
        );
    }
}

#[test]
fn metrics_pass_promtool_and_follow_the_accept_header() {
    let Some(gw) = setup() else { return };
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| Path::new(p).is_file());
    let Some(promtool) = promtool else {
        let why = "`promtool` is not installed (Debian package `prometheus`; `cargo xtask setup --test-deps` installs it)";
        assert!(
            !gracewatch_testkit::in_ci(),
            "{why} (CI=true: this is a failure, not a skip)"
        );
        eprintln!("SKIPPED: {why}");
        return;
    };
    let dir = TempDir::new("hostile-metrics");
    let ns = Netns::new("hmetrics");
    let addr = "127.0.0.1:7803";
    // A server whose name carries CR and ESC: label values must stay clean.
    let script = format!(
        "import ctypes, socket, sys, time\n\
         ctypes.CDLL(None).prctl(15, b'ev\\r\\x1b]0;il', 0, 0, 0)\n\
         s = socket.socket()\n\
         s.bind(('127.0.0.1', {port}))\n\
         s.listen()\n\
         print('ready', flush=True)\n\
         held = [s.accept()[0] for _ in range(2)]\n\
         print('accepted', flush=True)\n\
         sys.stdin.read()\n",
        port = addr.rsplit_once(':').map_or("", |(_, p)| p)
    );
    let mut evil = ns
        .command("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn server");
    let mut out = BufReader::new(evil.stdout.take().expect("piped"));
    let mut line = String::new();
    out.read_line(&mut line).expect("ready");
    assert_eq!(line.trim(), "ready");
    let _clients = Client::connect(&ns, addr, 2);
    line.clear();
    out.read_line(&mut line).expect("accepted");
    assert_eq!(line.trim(), "accepted");
    let agent = start_agent(&gw, &dir);
    let text = tcp(&agent, &get("/metrics", "")).expect("GET /metrics");
    assert_eq!(text.code, 200, "{text:?}");
    assert!(
        text.head
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        text.head
    );
    assert!(
        !text.body.contains('\r') && !text.body.contains('\x1b'),
        "raw control characters:\n{}",
        text.body
    );
    assert!(
        text.body.contains("comm=\"ev\\\\r\\\\u{1b}]0;il\"} 2"),
        "the server's name, escaped, with its 2 connections:\n{}",
        text.body
    );
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    check
        .stdin
        .take()
        .expect("piped")
        .write_all(text.body.as_bytes())
        .expect("feed promtool");
    let out = check.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        text.body
    );
    let open = tcp(
        &agent,
        &get(
            "/metrics",
            "Accept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2\r\n",
        ))
        .expect("GET /metrics");
    assert!(
        open.head
            .contains("content-type: application/openmetrics-text"),
        "{}",
        open.head
    );
    assert!(open.body.ends_with("# EOF\n"), "{}", open.body);
    agent.stop_within(STOP_TIMEOUT);
    let _ = evil.kill();
    let _ = evil.wait();
}
