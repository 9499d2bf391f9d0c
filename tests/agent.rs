//! `gracewatch agent` end to end, as root: a real Prometheus (Debian's
//! `prometheus`) scrapes the agent on loopback and its own query API must
//! show the true live count of a real server; and a drain run through
//! `POST /v1/drains` and through `gracewatch drain --agent` must end with
//! the same outcomes (and exit codes) as a local `gracewatch drain`.
//!
//! HTTP is spoken by hand here (HTTP/1.1, `Connection: close`): the
//! requests are few and simple, and it keeps the test independent of the
//! client code it checks.

use std::{
    os::unix::{fs::PermissionsExt as _, process::ExitStatusExt as _},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use gracewatch_testkit::{
    Agent, Child, Client, Gracewatch, Netns, STARTUP_TIMEOUT, STATE_TIMEOUT, Schema, Server,
    TempDir, free_port, http, procfs, setup,
};
use serde_json::{Value, json};

/// How long Prometheus may take to start and to scrape a change.
const PROMETHEUS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a drain may take once its last connection closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

// --- plumbing -----------------------------------------------------------------

/// One HTTP/1.1 exchange: returns the status code and the (de-chunked) body.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let target = http::Target::Tcp(addr.to_owned());
    let timeout = DRAIN_TIMEOUT + STARTUP_TIMEOUT;
    let answer = http::request(&target, method, path, headers, body, timeout)?;
    Ok((answer.code, answer.body))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `f` until it returns `Some`, or panics with `what` and the last
/// observation after `timeout`.
#[track_caller]
fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A process in the root namespace (killed and reaped on drop).
fn spawn(label: &str, program: &Path, args: &[&str]) -> Child {
    let mut cmd = Command::new(program);
    cmd.args(args);
    Child::spawn_command(label, cmd)
}

/// The agent with a token file and `--bpf-stats` (off by default; the
/// Prometheus test checks the run time); its unix socket must be 0600.
#[track_caller]
fn start_agent(gw: &Gracewatch, dir: &TempDir) -> Agent {
    let agent = Agent::builder()
        .token()
        .args(&["--bpf-stats"])
        .start(gw, dir);
    let mode = std::fs::metadata(&agent.socket)
        .expect("the unix socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the unix socket must be 0600");
    agent
}

/// A Prometheus server with a temp config and TSDB, scraping `target` every second.
struct Prometheus {
    _bg: Child,
    addr: String,
}

impl Prometheus {
    fn start(dir: &TempDir, target: &str) -> Option<Prometheus> {
        let Some(bin) = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
        else {
            let why = "`prometheus` is not installed (Debian package `prometheus`; `cargo xtask setup --test-deps` installs it)";
            assert!(
                !gracewatch_testkit::in_ci(),
                "{why} (CI=true: this is a failure, not a skip)"
            );
            eprintln!("SKIPPED: {why}");
            return None;
        };
        let config = dir.root().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: gracewatch\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus config");
        let addr = format!("127.0.0.1:{}", free_port());
        let data = dir.root().join("tsdb");
        let bg = spawn(
            "prometheus",
            &bin,
            &[
                &format!("--config.file={}", config.display()),
                &format!("--storage.tsdb.path={}", data.display()),
                &format!("--web.listen-address={addr}"),
            ],
        );
        let prom = Prometheus { _bg: bg, addr };
        eventually(PROMETHEUS_TIMEOUT, "Prometheus to be ready", || match http(
            &prom.addr,
            "GET",
            "/-/ready",
            &[],
            b"",
        ) {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}\n{}", prom._bg.context())),
        });
        Some(prom)
    }

    /// Runs an instant query; returns the values of the result vector.
    fn query(&self, promql: &str) -> Result<Vec<f64>, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (code, body) = http(&self.addr, "GET", &path, &[], b"").map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{code}: {e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("{code}: {body}"));
        }
        Ok(v["data"]["result"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|r| r["value"][1].as_str()?.parse().ok())
            .collect())
    }

    /// Waits until `promql` yields exactly one sample equal to `want`.
    #[track_caller]
    fn wait_value(&self, promql: &str, want: f64) {
        eventually(
            PROMETHEUS_TIMEOUT,
            &format!("Prometheus: {promql} == {want}"),
            || match self.query(promql)? {
                v if v == [want] => Ok(()),
                v => Err(format!("{v:?}")),
            },
        );
    }
}

// --- Prometheus ---------------------------------------------------------------

#[test]
fn prometheus_scrapes_the_true_live_count() {
    let Some(gw) = setup() else { return };
    let dir = TempDir::new("prom");
    let ns = Netns::new("prom");
    let addr = "127.0.0.1:7711";
    let server = Server::listen(&ns, addr);
    let pid = server.pid();

    // Two connections older than the agent (startup snapshot) …
    let early = Client::connect(&ns, addr, 2);
    server.wait_accepted(2);
    let agent = start_agent(&gw, &dir);
    let Some(prom) = Prometheus::start(&dir, &agent.addr) else {
        return;
    };
    // … and three accepted while it runs (kernel events).
    let late = Client::connect(&ns, addr, 3);
    server.wait_accepted(5);
    let truth = server.count();
    assert_eq!(truth.established, 5, "{truth:?}");

    prom.wait_value("up{job=\"gracewatch\"}", 1.0);
    let per_process = format!("gracewatch_process_live_connections{{pid=\"{pid}\"}}");
    let per_listener = format!(
        "gracewatch_listener_live_connections{{netns=\"{}\",address=\"{addr}\"}}",
        ns.netns_inode()
    );
    prom.wait_value(&per_process, truth.established as f64);
    prom.wait_value(&per_listener, truth.established as f64);
    prom.wait_value(
        &format!("gracewatch_listener_holders{{address=\"{addr}\"}}"),
        1.0,
    );

    // The server closes two: the true count drops to three, and so must
    // what Prometheus scrapes.
    server.close(2);
    let truth = server.count();
    assert_eq!(truth.open, 3, "{truth:?}");
    prom.wait_value(&per_process, 3.0);
    prom.wait_value(&per_listener, 3.0);
    // The peers half-close the rest: CLOSE_WAIT is still live.
    early.closeall();
    late.closeall();
    server.wait_count("3 connections in CLOSE_WAIT", |c| c.close_wait == 3);
    prom.wait_value(&per_process, 3.0);
    assert_eq!(server.closeall(), 3);
    prom.wait_value(&per_process, 0.0);
    // Closes seen by the agent's kernel events: at least the five above.
    let closed = prom
        .query("gracewatch_connections_closed_total")
        .unwrap_or_default();
    assert!(
        closed.first().is_some_and(|&n| n >= 5.0),
        "gracewatch_connections_closed_total: {closed:?}"
    );
    // Its own BPF run time is exported (and counts once stats are on).
    let runs = prom.query("gracewatch_bpf_runs_total").unwrap_or_default();
    assert!(
        runs.first().is_some_and(|&n| n > 0.0),
        "gracewatch_bpf_runs_total: {runs:?}"
    );

    agent.stop_within(STATE_TIMEOUT);
}

// --- drains: CLI vs POST /v1/drains vs drain --agent --------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// `gracewatch drain` watching the kernel itself.
    Cli,
    /// `POST /v1/drains`, then `GET /v1/drains/{id}?wait=`.
    Api,
    /// `gracewatch drain --agent http://… --token-file …`.
    AgentCli,
    /// `gracewatch drain --agent unix:/…` (no token).
    AgentUnix,
}

const ALL: [Via; 4] = [Via::Cli, Via::Api, Via::AgentCli, Via::AgentUnix];

/// What a drain ended with, however it was run.
#[derive(Debug, PartialEq)]
struct Ended {
    exit_code: i32,
    outcome: String,
    signal_sent: Value,
    still_held: u64,
}

/// A drain in flight.
enum Running {
    Process(Child),
    Api { id: String },
}

fn start_drain(gw: &Gracewatch, agent: &Agent, via: Via, pid: u32, extra: &[&str]) -> Running {
    let pid_s = pid.to_string();
    let mut args = vec!["drain", "--pid", &pid_s, "--json"];
    args.extend_from_slice(extra);
    let url = format!("http://{}", agent.addr);
    let unix = format!("unix:{}", agent.socket.display());
    let token = agent
        .token_file
        .as_ref()
        .expect("a token file")
        .to_string_lossy()
        .into_owned();
    match via {
        Via::Cli => {}
        Via::AgentCli => args.extend_from_slice(&["--agent", &url, "--token-file", &token]),
        Via::AgentUnix => args.extend_from_slice(&["--agent", &unix]),
        Via::Api => {
            let mut body = json!({ "pids": [pid] });
            for pair in extra.chunks(2) {
                if let [flag, value] = pair {
                    let key = flag.trim_start_matches("--").replace('-', "_");
                    if key == "exclude_peer" {
                        // Repeatable on the command line: a list in the API.
                        let list = body[&key].as_array().cloned().unwrap_or_default();
                        body[&key] = json!([list, vec![json!(value)]].concat());
                    } else {
                        body[key] = json!(value);
                    }
                }
            }
            let auth = agent.auth();
            let (code, resp) = http(
                &agent.addr,
                "POST",
                "/v1/drains",
                &[
                    ("Authorization", &auth),
                    ("Content-Type", "application/json"),
                ],
                body.to_string().as_bytes(),
            )
            .expect("POST /v1/drains");
            assert_eq!(code, 202, "POST /v1/drains {body}: {resp}");
            let v: Value = serde_json::from_str(&resp).expect("JSON");
            return Running::Api {
                id: v["id"].as_str().expect("id").to_owned(),
            };
        }
    }
    Running::Process(spawn(
        &format!("gracewatch {}", args.join(" ")),
        gw.bin(),
        &args,
    ))
}

impl Running {
    /// Waits until the drain reports `live` live connections.
    #[track_caller]
    fn wait_live(&self, agent: &Agent, live: u64) {
        eventually(
            STARTUP_TIMEOUT,
            &format!("drain progress with live={live}"),
            || match self {
                Running::Process(bg) => {
                    let lines = bg.lines();
                    let seen = lines.iter().any(|l| {
                        serde_json::from_str::<Value>(l)
                            .is_ok_and(|v| v["type"] == "progress" && v["live"] == json!(live))
                    });
                    if seen { Ok(()) } else { Err(bg.context()) }
                }
                Running::Api { id } => {
                    let (_, body) = http(&agent.addr, "GET", &format!("/v1/drains/{id}"), &[], b"")
                        .map_err(|e| e.to_string())?;
                    let v: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
                    if let Err(why) = Schema::AgentDrain.check(&v) {
                        panic!("GET /v1/drains/{id}: {why}\n{body}");
                    }
                    if v["progress"]["live"] == json!(live) {
                        Ok(())
                    } else {
                        Err(body)
                    }
                }
            },
        );
    }

    #[track_caller]
    fn finish(self, agent: &Agent) -> Ended {
        let (exit_code, r) = self.finish_report(agent);
        Ended {
            exit_code,
            outcome: r["outcome"].as_str().unwrap_or_default().to_owned(),
            signal_sent: r["signal_sent"].clone(),
            still_held: r["still_held"].as_u64().unwrap_or(u64::MAX),
        }
    }

    /// The exit code and the result object (schema-checked), however the
    /// drain ran.
    #[track_caller]
    fn finish_report(self, agent: &Agent) -> (i32, Value) {
        match self {
            Running::Process(mut bg) => {
                let status = bg.wait_exit(DRAIN_TIMEOUT + STARTUP_TIMEOUT);
                let lines = bg.lines();
                let result: Value = lines
                    .iter()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .find(|v| v["type"] == "result")
                    .unwrap_or_else(|| panic!("no result line\n{}", bg.context()));
                if let Err(why) = Schema::Drain.check(&result) {
                    panic!("malformed result line: {why}\n{}", bg.context());
                }
                let code = status.code().unwrap_or(-1);
                assert_eq!(
                    result["exit_code"],
                    json!(code),
                    "the printed exit code is the process's\n{}",
                    bg.context()
                );
                (code, result)
            }
            Running::Api { id } => {
                let path = format!(
                    "/v1/drains/{id}?wait={}s",
                    (DRAIN_TIMEOUT + STARTUP_TIMEOUT).as_secs()
                );
                let (code, body) = http(&agent.addr, "GET", &path, &[], b"").expect("long poll");
                assert_eq!(code, 200, "{body}");
                let v: Value = serde_json::from_str(&body).expect("JSON");
                if let Err(why) = Schema::AgentDrain.check(&v) {
                    panic!("GET {path}: {why}\n{body}");
                }
                assert_eq!(v["state"], "done", "{body}");
                let r = v["report"].clone();
                (r["exit_code"].as_i64().map_or(-1, |c| c as i32), r)
            }
        }
    }
}

/// `--exclude-peer` (issue 14) the same way everywhere: locally, as
/// `exclude_peer` in `POST /v1/drains`, and through `drain --agent`. A
/// server holds a client connection from 127.0.0.1 and a scraper's from
/// 127.0.0.9; once the client's closes, SIGTERM reaches the server while
/// it still holds the scraper's, and the result says `excluded_peers` and
/// names it (its peer hidden from a reader without the token, as `held[]`
/// peers are).
#[test]
fn exclude_peer_drains_alike_through_the_agent() {
    let Some(gw) = setup() else { return };
    let dir = TempDir::new("xpeer");
    let ns = Netns::new("agentxpeer");
    let agent = start_agent(&gw, &dir);
    let mut port = 7740;
    for via in ALL {
        port += 1;
        let addr = format!("127.0.0.1:{port}");
        let server = Server::listen(&ns, &addr);
        let _client = Client::connect(&ns, &addr, 1);
        server.wait_accepted(1);
        let _scraper = Client::connect_from(&ns, &addr, 1, Some("127.0.0.9"));
        server.wait_accepted(2);
        let drain = start_drain(
            &gw,
            &agent,
            via,
            server.pid(),
            &["--exclude-peer", "127.0.0.9", "--timeout", "60s"],
        );
        drain.wait_live(&agent, 1);
        server.assert_no_signal("a client connection is still open");
        server.close(1);
        let (code, r) = drain.finish_report(&agent);
        assert_eq!(
            (code, &r["outcome"], &r["ended_by"], &r["signal_sent"]),
            (
                0,
                &json!("drained"),
                &json!("excluded_peers"),
                &json!("SIGTERM")
            ),
            "{via:?}: {r}"
        );
        let excluded = r["excluded"].as_array().cloned().unwrap_or_default();
        assert_eq!(excluded.len(), 1, "{via:?}: {r}");
        let peer = excluded[0]["peer"].as_str().unwrap_or_default();
        if via == Via::Api {
            assert_eq!(peer, "hidden", "{via:?}: a reader without the token: {r}");
        } else {
            assert!(peer.starts_with("127.0.0.9:"), "{via:?}: {r}");
        }
        let seen = server.wait_signal(STATE_TIMEOUT);
        assert_eq!(
            (seen.name.as_str(), seen.open),
            ("TERM", 1),
            "{via:?}: SIGTERM with the scraper's connection still open"
        );
    }
    // A bad rule is a 400 naming it.
    let (code, body) = http(
        &agent.addr,
        "POST",
        "/v1/drains",
        &[("Authorization", &agent.auth())],
        br#"{"pids": [1], "exclude_peer": ["10.0.0.1/8"]}"#,
    )
    .expect("POST");
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("exclude_peer") && body.contains("10.0.0.0/8"),
        "{body}"
    );
}

#[test]
fn drains_through_the_agent_end_like_local_drains() {
    let Some(gw) = setup() else { return };
    let dir = TempDir::new("drain");
    let ns = Netns::new("agentdrain");
    let agent = start_agent(&gw, &dir);
    let mut port = 7720;
    let mut next_addr = || {
        port += 1;
        format!("127.0.0.1:{port}")
    };

    for via in ALL {
        // Drained: two connections close, then SIGTERM reaches the server.
        let addr = next_addr();
        let server = Server::listen(&ns, &addr);
        let client = Client::connect(&ns, &addr, 2);
        server.wait_accepted(2);
        let drain = start_drain(&gw, &agent, via, server.pid(), &["--timeout", "60s"]);
        drain.wait_live(&agent, 2);
        client.closeall();
        server.wait_count("2 connections in CLOSE_WAIT", |c| c.close_wait == 2);
        assert_eq!(server.closeall(), 2);
        let ended = drain.finish(&agent);
        assert_eq!(
            ended,
            Ended {
                exit_code: 0,
                outcome: "drained".to_owned(),
                signal_sent: json!("SIGTERM"),
                still_held: 0,
            },
            "{via:?}: drained"
        );
        // The independent oracle: the server's own report of the signal
        // and of what it held when it took it.
        let seen = server.wait_signal(STATE_TIMEOUT);
        assert_eq!(
            (seen.name.as_str(), seen.open),
            ("TERM", 0),
            "{via:?}: the server's own report of the signal"
        );
        eventually(STATE_TIMEOUT, "the server to die of SIGTERM", || {
            if procfs::exited(server.pid()) {
                Ok(())
            } else {
                Err(format!("{via:?}: pid {} alive", server.pid()))
            }
        });

        // Deadline with a connection left: 124, nothing signalled.
        let addr = next_addr();
        let server = Server::listen(&ns, &addr);
        let _client = Client::connect(&ns, &addr, 1);
        server.wait_accepted(1);
        let drain = start_drain(&gw, &agent, via, server.pid(), &["--timeout", "1s"]);
        let ended = drain.finish(&agent);
        assert_eq!(
            ended,
            Ended {
                exit_code: 124,
                outcome: "timeout".to_owned(),
                signal_sent: Value::Null,
                still_held: 1,
            },
            "{via:?}: timeout"
        );
        assert!(
            !procfs::exited(server.pid()),
            "{via:?}: a timed-out drain signals nothing"
        );
        assert_eq!(server.count().established, 1);
    }

    // A pid that does not exist is a usage error everywhere: exit 2 / 400.
    for via in [Via::Cli, Via::AgentCli, Via::AgentUnix] {
        let Running::Process(mut bg) = start_drain(&gw, &agent, via, 999_999_999, &[]) else {
            unreachable!("process drains");
        };
        let status = bg.wait_exit(STARTUP_TIMEOUT);
        assert_eq!(
            status.code(),
            Some(2),
            "{via:?}: unknown pid\n{}",
            bg.context()
        );
        assert!(status.signal().is_none());
    }
    let (code, body) = http(
        &agent.addr,
        "POST",
        "/v1/drains",
        &[("Authorization", &agent.auth())],
        // In range (PID_MAX_LIMIT), above any pid_max: never a process.
        br#"{"pids": [4194304]}"#,
    )
    .expect("POST");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("does not exist"), "{body}");

    // A wrong token: refused (exit 4 for the CLI), nothing signalled.
    let addr = next_addr();
    let server = Server::listen(&ns, &addr);
    let bad_token = dir.root().join("bad-token");
    // A well-formed token file (the client refuses unsafe ones, exit 2)
    // holding the wrong token.
    std::fs::write(&bad_token, "nope-nope-nope-nope-nope\n").expect("write");
    std::fs::set_permissions(&bad_token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let pid = server.pid().to_string();
    let url = format!("http://{}", agent.addr);
    let mut bg = spawn(
        "drain with a wrong token",
        gw.bin(),
        &[
            "drain",
            "--pid",
            &pid,
            "--agent",
            &url,
            "--token-file",
            &bad_token.to_string_lossy(),
        ],
    );
    assert_eq!(
        bg.wait_exit(STARTUP_TIMEOUT).code(),
        Some(4),
        "{}",
        bg.context()
    );
    assert!(!procfs::exited(server.pid()));

    agent.stop_within(STATE_TIMEOUT);
}

/// `/v1/restarts` on a real agent: an fd-inheritance restart whose old
/// process stops accepting and keeps two clients, which leave later. The
/// agent lists the old process's drain — valid against the schema, a
/// handover (`another_accepts`) from 2 connections, `drained` — and its
/// duration is the clients' own: from the new process's first accept to
/// the old one's last close, within 100 ms.
#[test]
fn restarts_list_an_observed_drain_timed_like_its_clients() {
    let Some(gw) = setup() else { return };
    let dir = TempDir::new("restarts");
    let agent = Agent::builder().start(&gw, &dir);
    let ns = Netns::new("restarts");
    let addr = "127.0.0.1:7301";
    let old = Server::listen(&ns, addr);
    let _c1 = Client::connect(&ns, addr, 2);
    old.wait_accepted(2);
    let new = old.handover();
    old.stopaccept();
    let ms = || gracewatch_testkit::monotonic_ns() / 1_000_000;
    // The new process's first accept, as the server reports it (within
    // its 5 ms poll), then two more.
    let _c2 = Client::connect(&ns, addr, 1);
    new.wait_accepted(1);
    let first_ms = ms();
    let _c3 = Client::connect(&ns, addr, 2);
    new.wait_accepted(3);

    let path = format!("/v1/restarts?pid={}", old.pid());
    let record = |want: &str| -> Result<Value, String> {
        let answer = agent
            .request(&agent.tcp(), "GET", &path, &[], b"")
            .map_err(|e| e.to_string())?;
        if answer.code != 200 {
            return Err(format!("{}: {}", answer.code, answer.body));
        }
        let v: Value = serde_json::from_str(&answer.body).map_err(|e| e.to_string())?;
        if let Err(why) = Schema::Restarts.check(&v) {
            panic!("/v1/restarts: {why}\n{v}");
        }
        match v["restarts"].as_array().map(Vec::as_slice) {
            Some([r]) if r["outcome"] == want => Ok(r.clone()),
            _ => Err(v.to_string()),
        }
    };
    let draining = eventually(STATE_TIMEOUT * 3, "the old process draining", || {
        record("ongoing")
    });
    assert_eq!(draining["why"], "another_accepts", "{draining}");
    assert_eq!(draining["from_live"], 2, "{draining}");
    assert_eq!(
        draining["listeners"],
        json!([{"netns": ns.netns_inode(), "local": addr}]),
        "{draining}"
    );
    // Its clients stay a while after it was declared draining.
    thread::sleep(Duration::from_millis(700));
    let before_close = ms();
    assert_eq!(old.closeall(), 2);
    let close_ms = (before_close + ms()) / 2;
    let drained = eventually(STATE_TIMEOUT, "the old process drained", || {
        record("drained")
    });
    let took = drained["duration_ms"].as_u64().expect("duration_ms");
    let truth = close_ms - first_ms;
    println!("observed drain: {took} ms; the clients: {truth} ms");
    assert!(
        took.abs_diff(truth) <= 100,
        "observed {took} ms, the clients' own timing {truth} ms: {drained}"
    );
    assert_eq!(drained["dropped"], 0, "{drained}");
    assert_eq!(drained["started_ms"], draining["started_ms"], "{drained}");
    let roles: Vec<&str> = drained["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .filter_map(|e| e["role"].as_str())
        .collect();
    assert_eq!(roles, ["draining", "drained"], "{drained}");
    drop(new);
    agent.stop_within(STATE_TIMEOUT);
}
