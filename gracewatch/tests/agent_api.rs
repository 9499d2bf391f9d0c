//! The agent's HTTP API, without root: a replay monitor
//! ([`MonitorHandle::from_replay_with_feed`]) stands in for the kernel, the
//! agent serves it on loopback (and a unix socket), and the crate's own
//! [`AgentClient`] talks to it. Drains target real child processes
//! (`sleep`), pinned by pidfd and really signalled.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::unix::{fs::PermissionsExt as _, process::ExitStatusExt as _},
    process::{Child, Command, ExitStatus},
    time::Duration,
};

use gracewatch::{
    agent::{Agent, AgentClient, DrainRequest, DrainState, DrainStatus, bind_unix},
    event::{ConnEvent, ListenAddr, Snapshot, Tuple},
    monitor::MonitorHandle,
    source::replay::ReplayFeed,
    tracker::Status,
};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

const NETNS: u32 = 4026531840;
const LISTEN: &str = "127.0.0.1:8080";
const LIMIT: Duration = Duration::from_secs(10);

fn listen_addr() -> ListenAddr {
    ListenAddr {
        netns: NETNS,
        local: LISTEN.parse().expect("addr"),
    }
}

fn tuple(i: u16) -> Tuple {
    Tuple {
        netns: NETNS,
        local: LISTEN.parse().expect("addr"),
        remote: SocketAddr::from(([127, 0, 0, 2], 40000 + i)),
    }
}

fn at(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn listen(pid: u32, comm: &str) -> ConnEvent {
    ConnEvent::ListenStart {
        at: at(1000),
        sk: 1,
        addr: listen_addr(),
        pid,
        comm: comm.to_owned(),
    }
}

fn accept(pid: u32, comm: &str, i: u16) -> ConnEvent {
    ConnEvent::Accept {
        at: at(2000 + u64::from(i)),
        sk: 100 + u64::from(i),
        tuple: tuple(i),
        pid,
        comm: comm.to_owned(),
        was_queued: false,
    }
}

fn close(pid: u32, i: u16) -> ConnEvent {
    ConnEvent::Close {
        at: at(5000 + u64::from(i)),
        sk: 100 + u64::from(i),
        tuple: tuple(i),
        pid,
        by_exit: false,
    }
}

/// An agent on a replay monitor, served on an ephemeral loopback port.
struct TestAgent {
    agent: Agent,
    handle: MonitorHandle,
    feed: ReplayFeed,
    url: String,
}

impl TestAgent {
    async fn start(token: Option<&str>, events: Vec<ConnEvent>) -> TestAgent {
        let agent = Agent::new(token.map(str::to_owned));
        let (handle, feed) = MonitorHandle::from_replay_with_feed(events, Snapshot::default());
        assert!(agent.set_monitor(handle.clone()));
        let url = serve(&agent).await;
        TestAgent {
            agent,
            handle,
            feed,
            url,
        }
    }

    fn client(&self, token: Option<&str>) -> AgentClient {
        AgentClient::new(&self.url, token.map(str::to_owned)).expect("client")
    }

    /// Feeds events and waits until the monitor applied them.
    async fn feed(&self, events: impl IntoIterator<Item = ConnEvent>) {
        for ev in events {
            self.feed.send(ev).expect("feed");
        }
        self.handle.sync().await.expect("sync");
    }
}

async fn serve(agent: &Agent) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(agent.clone().serve_tcp(listener));
    url
}

/// A request whose answer must be JSON: returns status and body.
async fn call(
    client: &AgentClient,
    method: Method,
    path: &str,
    body: Option<&[u8]>,
) -> (StatusCode, Value) {
    let (status, bytes) = client
        .request(method.clone(), path, body.map(<[u8]>::to_vec), LIMIT)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{method} {path}: answer ({status}) is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, value)
}

/// Asserts a 4xx (or given status) with `{"error": "..."}` mentioning `needle`.
#[track_caller]
fn assert_error(got: &(StatusCode, Value), status: StatusCode, needle: &str, what: &str) {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    let msg = got.1["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no `error` string in {}", got.1));
    assert!(
        msg.to_lowercase().contains(&needle.to_lowercase()),
        "{what}: error {msg:?} should mention {needle:?}"
    );
    assert_eq!(
        got.1.as_object().map(|o| o.len()),
        Some(1),
        "{what}: the error body is exactly {{\"error\": ...}}: {}",
        got.1
    );
}

fn sleeper() -> Child {
    Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("spawn sleep")
}

/// Waits (bounded) for a child to exit.
async fn exited(child: &mut Child) -> Option<ExitStatus> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while tokio::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

fn alive(child: &mut Child) -> bool {
    child.try_wait().expect("try_wait").is_none()
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

async fn post_drain(client: &AgentClient, body: Value) -> String {
    let (status, v) = call(
        client,
        Method::POST,
        "/v1/drains",
        Some(body.to_string().as_bytes()),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "POST /v1/drains {body}: {v}");
    v["id"].as_str().expect("id").to_owned()
}

async fn wait_done(client: &AgentClient, id: &str) -> DrainStatus {
    let status = client
        .drain(id, Some(LIMIT))
        .await
        .expect("GET /v1/drains/{id}?wait");
    assert_eq!(status.state, DrainState::Done, "{status:?}");
    status
}

// --- status, health, events ---------------------------------------------------

#[tokio::test]
async fn status_is_the_status_json_and_follows_events() {
    let t = TestAgent::start(
        None,
        vec![listen(4242, "server"), accept(4242, "server", 1)],
    )
    .await;
    let client = t.client(None);
    let status: Status = client.status().await.expect("status");
    assert_eq!(status.schema, "gracewatch.status.v1");
    let p = status
        .processes
        .iter()
        .find(|p| p.pid == 4242)
        .expect("pid 4242");
    assert_eq!((p.comm.as_str(), p.live), ("server", 1));
    assert_eq!(status.listeners.len(), 1);
    assert_eq!(status.listeners[0].address, LISTEN);

    // The raw answer validates against the documented schema.
    let (code, raw) = call(&client, Method::GET, "/v1/status", None).await;
    assert_eq!(code, StatusCode::OK);
    let schema: Value =
        serde_json::from_str(include_str!("../schema/status.schema.json")).expect("schema");
    let validator = jsonschema::draft202012::new(&schema).expect("validator");
    let errors: Vec<String> = validator.iter_errors(&raw).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}\n{raw}");

    t.feed([accept(4242, "server", 2)]).await;
    let status = client.status().await.expect("status");
    assert_eq!(status.processes[0].live, 2);
}

#[tokio::test]
async fn health_endpoints_follow_readiness() {
    let agent = Agent::new(None);
    let url = serve(&agent).await;
    let client = AgentClient::new(&url, None).expect("client");
    let get = |path: &'static str| {
        let client = client.clone();
        async move {
            client
                .request(Method::GET, path, None, LIMIT)
                .await
                .expect(path)
        }
    };
    assert_eq!(get("/livez").await.0, StatusCode::OK);
    let (code, body) = get("/readyz").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(&body).contains("starting"));
    assert_error(
        &call(&client, Method::GET, "/v1/status", None).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready",
        "status before ready",
    );
    let (code, body) = get("/metrics").await;
    assert_eq!(code, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("gracewatch_ready 0\n"));

    agent.set_monitor(MonitorHandle::from_replay(Vec::new(), Snapshot::default()));
    assert_eq!(get("/readyz").await.0, StatusCode::OK);
    assert_eq!(get("/livez").await.0, StatusCode::OK);
}

#[tokio::test]
async fn events_stream_as_ndjson_and_end_at_shutdown() {
    let t = TestAgent::start(None, vec![listen(7, "srv")]).await;
    let client = t.client(None);
    let resp = client
        .send(Method::GET, "/v1/events", None)
        .await
        .expect("GET /v1/events");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/x-ndjson")
    );
    let mut body = resp.into_body();
    t.feed([accept(7, "srv", 1), close(7, 1)]).await;
    let mut text = String::new();
    use http_body_util::BodyExt as _;
    while text.lines().count() < 2 {
        let frame = tokio::time::timeout(LIMIT, body.frame())
            .await
            .expect("an event within the limit")
            .expect("stream open")
            .expect("frame");
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    let events: Vec<ConnEvent> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a ConnEvent per line"))
        .collect();
    assert_eq!(events, vec![accept(7, "srv", 1), close(7, 1)]);

    // Shutdown ends the stream instead of hanging the server.
    t.agent.shutdown().await;
    let end = tokio::time::timeout(LIMIT, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
    assert!(end.is_ok(), "the event stream must end at shutdown");
}

// --- metrics ------------------------------------------------------------------

type Samples = BTreeMap<String, f64>;

/// A strict enough OpenMetrics text parser: every sample belongs to the
/// family declared just before it, label values are quoted and escaped,
/// values are numbers, and the exposition ends with `# EOF`.
fn parse_metrics(text: &str) -> Result<Samples, String> {
    let mut samples = Samples::new();
    let mut family: Option<(String, String)> = None;
    let mut eof = false;
    for line in text.lines() {
        if eof {
            return Err(format!("content after # EOF: {line:?}"));
        }
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, value) = (parts.next(), parts.next(), parts.next());
            match (kind, name, value) {
                (Some("TYPE"), Some(name), Some(t)) => {
                    if !["counter", "gauge", "histogram", "info", "unknown"].contains(&t) {
                        return Err(format!("unknown type in {line:?}"));
                    }
                    family = Some((name.to_owned(), t.to_owned()));
                }
                (Some("HELP" | "UNIT"), Some(_), Some(_)) => {}
                _ => return Err(format!("bad comment line {line:?}")),
            }
            continue;
        }
        let (name_labels, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("no value in {line:?}"))?;
        let value: f64 = value
            .parse()
            .map_err(|_| format!("bad value in {line:?}"))?;
        let (name, labels) = match name_labels.split_once('{') {
            Some((n, l)) => (n, Some(l)),
            None => (name_labels, None),
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(format!("bad metric name in {line:?}"));
        }
        let (fam, kind) = family
            .as_ref()
            .ok_or_else(|| format!("sample before any # TYPE: {line:?}"))?;
        let suffixes: &[&str] = match kind.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_count", "_sum", "_created"],
            _ => &[""],
        };
        if !suffixes.iter().any(|s| name == format!("{fam}{s}")) {
            return Err(format!("sample {name} is not of family {fam} ({kind})"));
        }
        let mut key = name.to_owned();
        if let Some(labels) = labels {
            let body = labels
                .strip_suffix('}')
                .ok_or_else(|| format!("unclosed labels in {line:?}"))?;
            // Validate quoting and escapes while copying.
            let mut chars = body.chars();
            let mut in_value = false;
            while let Some(c) = chars.next() {
                match (in_value, c) {
                    (true, '\\') => match chars.next() {
                        Some('\\' | '"' | 'n') => {}
                        other => return Err(format!("bad escape {other:?} in {line:?}")),
                    },
                    (_, '"') => in_value = !in_value,
                    (true, '\n') => return Err(format!("raw newline in {line:?}")),
                    _ => {}
                }
            }
            if in_value {
                return Err(format!("unterminated label value in {line:?}"));
            }
            key = format!("{name}{{{body}}}");
        }
        if samples.insert(key.clone(), value).is_some() {
            return Err(format!("duplicate series {key}"));
        }
    }
    if !eof {
        return Err("no # EOF at the end".to_owned());
    }
    Ok(samples)
}

async fn scrape(client: &AgentClient) -> Samples {
    let resp = client
        .send(Method::GET, "/metrics", None)
        .await
        .expect("GET /metrics");
    assert_eq!(resp.status(), StatusCode::OK);
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    use http_body_util::BodyExt as _;
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
    parse_metrics(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[tokio::test]
async fn metrics_parse_and_match_the_status() {
    let t = TestAgent::start(
        None,
        vec![
            listen(4242, "server"),
            accept(4242, "server", 1),
            accept(4242, "server", 2),
        ],
    )
    .await;
    let client = t.client(None);
    let m = scrape(&client).await;
    let proc_live = "gracewatch_process_live_connections{pid=\"4242\",comm=\"server\"}";
    let lis = format!("{{netns=\"{NETNS}\",address=\"{LISTEN}\"}}");
    assert_eq!(m.get(proc_live), Some(&2.0), "{m:#?}");
    assert_eq!(
        m.get(&format!("gracewatch_listener_live_connections{lis}")),
        Some(&2.0)
    );
    assert_eq!(
        m.get(&format!("gracewatch_listener_accept_queue_depth{lis}")),
        Some(&0.0)
    );
    assert_eq!(
        m.get(&format!("gracewatch_listener_holders{lis}")),
        Some(&1.0)
    );
    assert_eq!(m.get("gracewatch_ready"), Some(&1.0));
    assert_eq!(m.get("gracewatch_lost_events_total"), Some(&0.0));
    assert_eq!(m.get("gracewatch_connections_accepted_total"), Some(&0.0));
    for outcome in [
        "drained",
        "target_exited",
        "signal_refused",
        "timeout",
        "interrupted",
        "error",
    ] {
        let key = format!("gracewatch_drains_total{{outcome=\"{outcome}\"}}");
        assert_eq!(m.get(&key), Some(&0.0), "{key}");
    }
    // A replay has no BPF programs: no run-time series rather than zeros.
    assert!(
        !m.keys().any(|k| k.starts_with("gracewatch_bpf_")),
        "{m:#?}"
    );

    // Events after the agent started move the counters and the gauges.
    t.feed([
        accept(4242, "server", 3),
        close(4242, 1),
        close(4242, 2),
        ConnEvent::Lost {
            at: at(6000),
            total: 3,
        },
    ])
    .await;
    // The counters are fed through the event broadcast: give it a moment.
    let mut m = scrape(&client).await;
    for _ in 0..100 {
        if m.get("gracewatch_connections_closed_total") == Some(&2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = scrape(&client).await;
    }
    assert_eq!(m.get(proc_live), Some(&1.0));
    assert_eq!(m.get("gracewatch_connections_accepted_total"), Some(&1.0));
    assert_eq!(m.get("gracewatch_connections_closed_total"), Some(&2.0));
    assert_eq!(m.get("gracewatch_lost_events_total"), Some(&3.0));
    assert_eq!(
        m.get("gracewatch_process_accepted_connections_total{pid=\"4242\",comm=\"server\"}"),
        Some(&3.0)
    );
}

#[test]
fn the_metrics_parser_rejects_broken_expositions() {
    for bad in [
        "x 1\n# EOF\n",
        "# TYPE a gauge\na 1\n",
        "# TYPE a gauge\nb 1\n# EOF\n",
        "# TYPE a gauge\na{l=\"v} 1\n# EOF\n",
        "# TYPE a gauge\na{l=\"\\x\"} 1\n# EOF\n",
        "# TYPE a gauge\na one\n# EOF\n",
        "# TYPE a counter\na 1\n# EOF\n",
        "# TYPE a gauge\na 1\na 2\n# EOF\n",
    ] {
        assert!(parse_metrics(bad).is_err(), "{bad:?}");
    }
    assert!(parse_metrics("# TYPE a counter\na_total 1\n# EOF\n").is_ok());
}

// --- drains -------------------------------------------------------------------

#[tokio::test]
async fn drain_of_an_idle_process_signals_it_and_reports_drained() {
    let t = TestAgent::start(None, Vec::new()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("agent.sock");
    let unix = bind_unix(&sock).expect("bind unix");
    assert_eq!(
        std::fs::metadata(&sock)
            .expect("socket")
            .permissions()
            .mode()
            & 0o777,
        0o600,
        "the unix socket must be created 0600"
    );
    tokio::spawn(t.agent.clone().serve_unix(unix));
    // No token is configured: the unix socket is the way in.
    let client = AgentClient::new(&format!("unix:{}", sock.display()), None).expect("client");

    let mut target = sleeper();
    let pid = target.id();
    let id = post_drain(&client, json!({ "pids": [pid] })).await;
    let status = wait_done(&client, &id).await;
    let report = status.report.expect("report");
    assert_eq!(status.targets, vec![pid]);
    assert_eq!(
        report.outcome,
        gracewatch::drain::Outcome::Drained,
        "{report:?}"
    );
    assert_eq!(report.exit_code, 0);
    assert_eq!(report.signal_sent.as_deref(), Some("SIGTERM"));
    let exit = exited(&mut target).await.expect("the target got SIGTERM");
    assert_eq!(exit.signal(), Some(libc_sigterm()));

    // The list shows it, and the metrics counted it.
    let (code, list) = call(&client, Method::GET, "/v1/drains", None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(list["drains"][0]["id"], id.as_str());
    let m = scrape(&client).await;
    assert_eq!(
        m.get("gracewatch_drains_total{outcome=\"drained\"}"),
        Some(&1.0)
    );
    assert_eq!(
        m.get("gracewatch_drain_duration_seconds_count{outcome=\"drained\"}"),
        Some(&1.0)
    );
    assert_eq!(m.get("gracewatch_drains_running"), Some(&0.0));
}

fn libc_sigterm() -> i32 {
    15
}

#[tokio::test]
async fn drain_waits_for_the_last_close_and_streams_progress() {
    let t = TestAgent::start(Some("s3cret"), Vec::new()).await;
    let client = t.client(Some("s3cret"));
    let mut target = sleeper();
    let pid = target.id();
    t.feed([listen(pid, "sleep"), accept(pid, "sleep", 1)])
        .await;

    let id = post_drain(&client, json!({ "pids": [pid], "signal": "none" })).await;
    // Still one live connection: the long poll comes back running.
    let status = client
        .drain(&id, Some(Duration::from_millis(300)))
        .await
        .expect("poll");
    assert_eq!(status.state, DrainState::Running, "{status:?}");
    assert_eq!(
        status.progress.as_ref().map(|p| p.live),
        Some(1),
        "{status:?}"
    );

    let follower = {
        let client = client.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let mut lines = Vec::new();
            let report = client
                .follow_drain(&id, |l| lines.push(l.clone()))
                .await
                .expect("stream");
            (lines, report)
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    t.feed([close(pid, 1)]).await;
    let status = wait_done(&client, &id).await;
    let report = status.report.expect("report");
    assert_eq!(report.outcome, gracewatch::drain::Outcome::Drained);
    assert_eq!(
        (report.initial_live, report.signal_sent.as_deref()),
        (1, None)
    );
    assert!(alive(&mut target), "signal none must not signal");

    let (lines, streamed) = tokio::time::timeout(LIMIT, follower)
        .await
        .expect("the stream ends with the result")
        .expect("task");
    assert_eq!(streamed.as_ref(), Some(&report));
    assert_eq!(
        lines.first().map(|l| l["type"].clone()),
        Some(json!("progress"))
    );
    assert_eq!(
        lines.last().map(|l| l["type"].clone()),
        Some(json!("result"))
    );
    kill(target);
}

#[tokio::test]
async fn drain_timeout_cancel_and_target_exit_map_to_the_cli_outcomes() {
    let t = TestAgent::start(Some("tok"), Vec::new()).await;
    let client = t.client(Some("tok"));
    let mut target = sleeper();
    let pid = target.id();
    t.feed([listen(pid, "sleep"), accept(pid, "sleep", 1)])
        .await;

    // Deadline with a connection left: 124, nothing signalled.
    let id = post_drain(&client, json!({ "pids": [pid], "timeout": "300ms" })).await;
    let report = wait_done(&client, &id).await.report.expect("report");
    assert_eq!(
        (report.outcome, report.exit_code, report.still_held),
        (gracewatch::drain::Outcome::Timeout, 124, 1),
        "{report:?}"
    );
    assert!(alive(&mut target));

    // DELETE cancels without signalling: 130.
    let id = post_drain(&client, json!({ "pids": [pid] })).await;
    let status = client.cancel_drain(&id).await.expect("DELETE");
    let report = status.report.expect("cancelled drains report at once");
    assert_eq!(
        (report.outcome, report.exit_code, report.signal_sent.clone()),
        (gracewatch::drain::Outcome::Interrupted, 130, None)
    );
    assert!(alive(&mut target));
    // Cancelling again is harmless and answers the same.
    let again = client.cancel_drain(&id).await.expect("DELETE again");
    assert_eq!(again.report, Some(report));

    // The target dies holding its connection: 3.
    let id = post_drain(&client, json!({ "pids": [pid] })).await;
    let _ = target.kill();
    let report = wait_done(&client, &id).await.report.expect("report");
    assert_eq!(
        (report.outcome, report.exit_code),
        (gracewatch::drain::Outcome::TargetExited, 3),
        "{report:?}"
    );
    let _ = target.wait();

    let m = scrape(&client).await;
    for (outcome, n) in [
        ("timeout", 1.0),
        ("interrupted", 1.0),
        ("target_exited", 1.0),
    ] {
        let key = format!("gracewatch_drains_total{{outcome=\"{outcome}\"}}");
        assert_eq!(m.get(&key), Some(&n), "{key}");
    }
}

#[tokio::test]
async fn run_drain_is_the_library_way_to_await_an_outcome() {
    let t = TestAgent::start(Some("tok"), Vec::new()).await;
    let mut target = sleeper();
    let req = DrainRequest {
        pids: vec![target.id()],
        signal: Some("KILL".to_owned()),
        ..DrainRequest::default()
    };
    let report = t.client(Some("tok")).run_drain(&req).await.expect("drain");
    assert_eq!(report.signal_sent.as_deref(), Some("SIGKILL"));
    assert_eq!(exited(&mut target).await.and_then(|s| s.signal()), Some(9));
}

// --- auth ---------------------------------------------------------------------

#[tokio::test]
async fn mutating_endpoints_need_the_token_on_tcp() {
    let t = TestAgent::start(Some("right-token"), Vec::new()).await;
    let mut target = sleeper();
    let body = json!({ "pids": [target.id()], "signal": "none" }).to_string();
    let post = |client: AgentClient| {
        let body = body.clone();
        async move { call(&client, Method::POST, "/v1/drains", Some(body.as_bytes())).await }
    };

    let missing = post(t.client(None)).await;
    assert_error(
        &missing,
        StatusCode::UNAUTHORIZED,
        "authorization",
        "no token",
    );
    let wrong = post(t.client(Some("wrong-token"))).await;
    assert_error(
        &wrong,
        StatusCode::UNAUTHORIZED,
        "invalid token",
        "wrong token",
    );
    let (status, started) = post(t.client(Some("right-token"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let id = started["id"].as_str().expect("id").to_owned();

    // Reading is open; cancelling is not.
    let (code, _) = call(
        &t.client(None),
        Method::GET,
        &format!("/v1/drains/{id}"),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let del = call(
        &t.client(None),
        Method::DELETE,
        &format!("/v1/drains/{id}"),
        None,
    )
    .await;
    assert_error(
        &del,
        StatusCode::UNAUTHORIZED,
        "authorization",
        "DELETE without token",
    );
    let del = call(
        &t.client(Some("wrong-token")),
        Method::DELETE,
        &format!("/v1/drains/{id}"),
        None,
    )
    .await;
    assert_error(
        &del,
        StatusCode::UNAUTHORIZED,
        "invalid token",
        "DELETE with a wrong token",
    );
    assert!(alive(&mut target));
    kill(target);
}

#[tokio::test]
async fn without_a_token_file_tcp_refuses_drains_and_says_why() {
    let t = TestAgent::start(None, Vec::new()).await;
    let mut target = sleeper();
    let body = json!({ "pids": [target.id()] }).to_string();
    for token in [None, Some("anything")] {
        let got = call(
            &t.client(token),
            Method::POST,
            "/v1/drains",
            Some(body.as_bytes()),
        )
        .await;
        assert_error(
            &got,
            StatusCode::FORBIDDEN,
            "--token-file",
            "POST without a token file",
        );
    }
    let got = call(&t.client(None), Method::DELETE, "/v1/drains/x-1", None).await;
    assert_error(
        &got,
        StatusCode::FORBIDDEN,
        "--token-file",
        "DELETE without a token file",
    );
    assert!(alive(&mut target), "nothing may be signalled");
    kill(target);
}

// --- bad input ----------------------------------------------------------------

#[tokio::test]
async fn every_bad_input_gets_a_4xx_json_error_and_the_agent_survives() {
    let t = TestAgent::start(Some("tok"), Vec::new()).await;
    let client = t.client(Some("tok"));
    let mut target = sleeper();
    let pid = target.id();
    let huge = format!(
        "{{\"pids\": [{pid}], \"exclude\": [{}]}}",
        "1,".repeat(40_000) + "1"
    );
    let bad_bodies: Vec<(Vec<u8>, StatusCode, &str)> = vec![
        (
            b"{".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid drain request",
        ),
        (b"".to_vec(), StatusCode::BAD_REQUEST, "empty body"),
        (
            b"\xff\xfe\x00garbage".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid drain request",
        ),
        (
            b"[1, 2]".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid drain request",
        ),
        (
            format!("{{\"pids\": [{pid}], \"colour\": \"red\"}}").into_bytes(),
            StatusCode::BAD_REQUEST,
            "unknown field `colour`",
        ),
        (
            b"{\"pids\": \"1\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid type",
        ),
        (
            b"{\"pids\": [-4]}".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid value",
        ),
        (
            format!("{{\"pids\": [{pid}], \"timeout\": \"soon\"}}").into_bytes(),
            StatusCode::BAD_REQUEST,
            "timeout",
        ),
        (
            format!("{{\"pids\": [{pid}], \"min_wait\": \"-5s\"}}").into_bytes(),
            StatusCode::BAD_REQUEST,
            "min_wait",
        ),
        (
            format!("{{\"pids\": [{pid}], \"timeout\": \"99999999999999999999999h\"}}")
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "timeout",
        ),
        (
            format!("{{\"pids\": [{pid}], \"signal\": \"SIGFOO\"}}").into_bytes(),
            StatusCode::BAD_REQUEST,
            "unknown signal",
        ),
        (
            format!("{{\"pids\": [{pid}], \"on_timeout\": \"explode\"}}").into_bytes(),
            StatusCode::BAD_REQUEST,
            "unknown variant",
        ),
        (b"{}".to_vec(), StatusCode::BAD_REQUEST, "no target"),
        (
            b"{\"pids\": [0]}".to_vec(),
            StatusCode::BAD_REQUEST,
            "pid 0",
        ),
        (
            b"{\"pids\": [999999999]}".to_vec(),
            StatusCode::BAD_REQUEST,
            "out of range",
        ),
        (
            b"{\"pids\": [2147483648]}".to_vec(),
            StatusCode::BAD_REQUEST,
            "out of range",
        ),
        // In range, but above any pid_max: never a process.
        (
            b"{\"pids\": [4194304]}".to_vec(),
            StatusCode::BAD_REQUEST,
            "does not exist",
        ),
        (
            format!("{{\"pids\": [{pid}], \"timeout\": \"10000000000000000000s\"}}").into_bytes(),
            StatusCode::BAD_REQUEST,
            "timeout",
        ),
        (
            b"{\"pidfile\": \"/nonexistent/gracewatch.pid\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "cannot read pidfile",
        ),
        (
            huge.into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger than",
        ),
    ];
    for (body, status, needle) in bad_bodies {
        let what = format!(
            "POST {:?}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
        let got = call(&client, Method::POST, "/v1/drains", Some(&body)).await;
        assert_error(&got, status, needle, &what);
    }
    for (method, path, status, needle) in [
        (
            Method::GET,
            "/v1/drains/nope",
            StatusCode::NOT_FOUND,
            "no drain",
        ),
        (
            Method::DELETE,
            "/v1/drains/nope",
            StatusCode::NOT_FOUND,
            "no drain",
        ),
        (
            Method::GET,
            "/v1/drains/nope/stream",
            StatusCode::NOT_FOUND,
            "no drain",
        ),
        (
            Method::GET,
            "/v1/drains/x?wait=soon",
            StatusCode::BAD_REQUEST,
            "wait",
        ),
        (
            Method::GET,
            "/v1/drains/x?wait=5h",
            StatusCode::BAD_REQUEST,
            "wait",
        ),
        (
            Method::GET,
            "/v1/drains/x?color=red",
            StatusCode::BAD_REQUEST,
            "unknown query",
        ),
        (
            Method::GET,
            "/v2/everything",
            StatusCode::NOT_FOUND,
            "no such endpoint",
        ),
        (
            Method::PUT,
            "/v1/status",
            StatusCode::METHOD_NOT_ALLOWED,
            "not allowed",
        ),
        (
            Method::POST,
            "/metrics",
            StatusCode::METHOD_NOT_ALLOWED,
            "not allowed",
        ),
        (
            Method::PATCH,
            "/v1/drains",
            StatusCode::METHOD_NOT_ALLOWED,
            "not allowed",
        ),
    ] {
        let got = call(&client, method.clone(), path, None).await;
        assert_error(&got, status, needle, &format!("{method} {path}"));
    }

    // Not even HTTP: the connection is answered or closed, nothing more.
    let addr = t.url.trim_start_matches("http://").to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Write as _};
        let mut raw = std::net::TcpStream::connect(&addr).expect("connect");
        raw.set_read_timeout(Some(LIMIT)).expect("timeout");
        raw.write_all(b"\x00\x01GARBAGE \xff\r\n\r\n")
            .expect("write");
        let mut buf = Vec::new();
        let _ = raw.read_to_end(&mut buf);
    })
    .await
    .expect("raw client");

    assert!(alive(&mut target), "no bad request may signal anything");
    let (code, _) = client
        .request(Method::GET, "/livez", None, LIMIT)
        .await
        .expect("the agent still answers");
    assert_eq!(code, StatusCode::OK);
    let (code, list) = call(&client, Method::GET, "/v1/drains", None).await;
    assert_eq!((code, list), (StatusCode::OK, json!({ "drains": [] })));
    kill(target);
}
