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
    monitor::{MonitorHandle, ReplayFeed},
    tracker::Status,
};
use gracewatch_testkit::Schema;
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
/// The `exit_code` the agent serves in drain `id`'s report (the typed
/// report has its outcome; the JSON contract adds the CLI's code).
async fn served_exit_code(client: &AgentClient, id: &str) -> i64 {
    let (status, v) = call(client, Method::GET, &format!("/v1/drains/{id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["report"]["exit_code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no exit_code: {v}"))
}

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
    assert_eq!(status.schema, "gracewatch.status.v2");
    let p = status
        .processes
        .iter()
        .find(|p| p.pid == 4242)
        .expect("pid 4242");
    assert_eq!((p.comm.as_str(), p.live), ("server", 1));
    assert_eq!(status.listeners.len(), 1);
    assert_eq!(status.listeners[0].address.to_string(), LISTEN);

    // The raw answer validates against the documented schema.
    let (code, raw) = call(&client, Method::GET, "/v1/status", None).await;
    assert_eq!(code, StatusCode::OK);
    if let Err(e) = Schema::Status.check(&raw) {
        panic!("{e}\n{raw}");
    }

    t.feed([accept(4242, "server", 2)]).await;
    let status = client.status().await.expect("status");
    assert_eq!(status.processes[0].live, 2);
}

/// A restart by listener hand-off: the old process closes its listener and
/// keeps its connection, the new one listens. `/v1/status` tells their
/// roles and the listener's generations, oldest first.
#[tokio::test]
async fn status_tells_restart_roles_and_generations() {
    let t = TestAgent::start(None, vec![listen(4242, "old"), accept(4242, "old", 1)]).await;
    let client = t.client(None);
    t.feed([
        ConnEvent::ListenStop {
            at: at(3000),
            sk: 1,
            addr: listen_addr(),
            pid: 4242,
            comm: "old".to_owned(),
        },
        ConnEvent::ListenStart {
            at: at(3001),
            sk: 2,
            addr: listen_addr(),
            pid: 4343,
            comm: "new".to_owned(),
        },
    ])
    .await;
    let (code, raw) = call(&client, Method::GET, "/v1/status", None).await;
    assert_eq!(code, StatusCode::OK);
    if let Err(e) = Schema::Status.check(&raw) {
        panic!("{e}\n{raw}");
    }
    let role = |pid: u32| gracewatch_testkit::status::role_of(&raw, pid).map(str::to_owned);
    assert_eq!(role(4242).as_deref(), Some("draining"), "{raw:#}");
    assert_eq!(role(4343).as_deref(), Some("serving"), "{raw:#}");
    let uptime = raw["uptime_ms"].as_u64().expect("uptime");
    assert!(raw["processes"][0]["role_since_ms"].as_u64() <= Some(uptime));
    let listener =
        gracewatch_testkit::status::listener(&raw, u64::from(NETNS), LISTEN).expect("the listener");
    assert_eq!(
        gracewatch_testkit::status::generations(listener),
        vec![(4242, "draining".to_owned()), (4343, "serving".to_owned())],
        "{raw:#}"
    );
    assert_eq!(
        gracewatch_testkit::status::invariants(&raw),
        Vec::<String>::new()
    );

    // Its last connection ends: no longer listed, drained (or gone) among
    // the listener's generations.
    t.feed([close(4242, 1)]).await;
    let status = client.status().await.expect("status");
    assert!(
        status.processes.iter().all(|p| p.pid != 4242),
        "{status:#?}"
    );
    let gens: Vec<(u32, &str)> = status.listeners[0]
        .generations
        .iter()
        .map(|g| (g.pid, g.role.name()))
        .collect();
    assert!(
        matches!(
            gens.as_slice(),
            [(4242, "drained" | "exited"), (4343, "serving")]
        ),
        "{gens:?}"
    );
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
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
        .collect();
    assert_eq!(events.len(), 2, "{text}");
    assert_eq!(events[0]["kind"], "accept", "{text}");
    assert_eq!(events[0]["pid"], 7, "{text}");
    assert_eq!(events[1]["kind"], "close", "{text}");
    // The opaque socket id still pairs the close with its accept.
    assert_eq!(events[0]["sk"], events[1]["sk"], "{text}");

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

async fn scrape(t: &TestAgent) -> Samples {
    let (head, text) = raw(
        &t.url,
        "GET /metrics HTTP/1.1\r\nhost: x\r\naccept: application/openmetrics-text; version=1.0.0\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
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
    let m = scrape(&t).await;
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
    let mut m = scrape(&t).await;
    for _ in 0..100 {
        if m.get("gracewatch_connections_closed_total") == Some(&2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = scrape(&t).await;
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

/// A restart as the metrics tell it: a new process takes over accepting
/// on the old one's listener (a handover), the old one closes its copy
/// (draining, per listener), its last client leaves (an observed drain),
/// and the new one exits holding a connection (dropped by an exit).
#[tokio::test]
async fn metrics_count_handovers_drains_and_exits() {
    let t = TestAgent::start(None, vec![listen(4242, "old"), accept(4242, "old", 1)]).await;
    // The same restart, as `/v1/events` lines.
    let events = t
        .client(None)
        .send(Method::GET, "/v1/events", None)
        .await
        .expect("GET /v1/events");
    assert_eq!(events.status(), StatusCode::OK);
    let mut events = events.into_body();
    let lis = format!("{{netns=\"{NETNS}\",address=\"{LISTEN}\"}}");
    let draining = format!("gracewatch_processes_draining{lis}");
    let oldest = format!("gracewatch_oldest_draining_seconds{lis}");
    let m = scrape(&t).await;
    assert_eq!(m.get(&draining), Some(&0.0), "{m:#?}");
    assert_eq!(m.get(&oldest), None, "no series while none drains");
    for zero in [
        "gracewatch_handovers_total",
        "gracewatch_connections_dropped_by_exit_total",
        "gracewatch_observed_drain_duration_seconds_count",
    ] {
        assert_eq!(m.get(zero), Some(&0.0), "{zero}: {m:#?}");
    }

    // The new process is seen holding the listener, then accepts from it.
    t.feed([ConnEvent::ListenStart {
        at: at(3000),
        sk: 2,
        addr: listen_addr(),
        pid: 4343,
        comm: "new".to_owned(),
    }])
    .await;
    t.feed([
        accept(4343, "new", 2),
        ConnEvent::ListenStop {
            at: at(3100),
            sk: 1,
            addr: listen_addr(),
            pid: 4242,
            comm: "old".to_owned(),
        },
    ])
    .await;
    // Facts reach the counters through the published model: give it a moment.
    let settle = |want: &'static [(&'static str, f64)]| {
        let t = &t;
        async move {
            let mut m = scrape(t).await;
            for _ in 0..100 {
                if want.iter().all(|(k, v)| m.get(*k) == Some(v)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                m = scrape(t).await;
            }
            m
        }
    };
    let m = settle(&[("gracewatch_handovers_total", 1.0)]).await;
    assert_eq!(m.get("gracewatch_handovers_total"), Some(&1.0), "{m:#?}");
    assert_eq!(m.get(&draining), Some(&1.0), "{m:#?}");
    assert!(m.get(&oldest).is_some_and(|s| *s >= 0.0), "{m:#?}");

    // Its last client leaves: drained, and the drain is observed.
    t.feed([close(4242, 1)]).await;
    let m = settle(&[("gracewatch_observed_drain_duration_seconds_count", 1.0)]).await;
    assert_eq!(
        m.get("gracewatch_observed_drain_duration_seconds_count"),
        Some(&1.0),
        "{m:#?}"
    );
    assert_eq!(m.get(&draining), Some(&0.0), "{m:#?}");
    assert_eq!(m.get(&oldest), None, "{m:#?}");

    // The new process exits holding its connection.
    t.feed([ConnEvent::ProcessExit {
        at: at(4000),
        pid: 4343,
    }])
    .await;
    let m = settle(&[("gracewatch_connections_dropped_by_exit_total", 1.0)]).await;
    assert_eq!(
        m.get("gracewatch_connections_dropped_by_exit_total"),
        Some(&1.0),
        "{m:#?}"
    );
    assert_eq!(m.get("gracewatch_handovers_total"), Some(&1.0), "{m:#?}");

    let mut text = String::new();
    let restart_lines = |text: &str| -> Vec<Value> {
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("a JSON object per line"))
            .filter(|v| {
                ["handover", "draining", "drained"].contains(&v["kind"].as_str().unwrap_or(""))
            })
            .collect()
    };
    use http_body_util::BodyExt as _;
    while restart_lines(&text).len() < 3 {
        let frame = tokio::time::timeout(LIMIT, events.frame())
            .await
            .expect("restart lines within the limit")
            .expect("stream open")
            .expect("frame");
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).expect("JSON");
        if let Err(e) = Schema::Event.check(&v) {
            panic!("{e}\n{line}");
        }
    }
    let lines = restart_lines(&text);
    let kinds: Vec<(&str, u64)> = lines
        .iter()
        .map(|v| {
            (
                v["kind"].as_str().unwrap_or(""),
                v["pid"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [("handover", 4343), ("draining", 4242), ("drained", 4242)],
        "{text}"
    );
    assert_eq!(lines[0]["alongside"], json!([4242]), "{text}");
    assert_eq!(lines[0]["listener"]["local"], LISTEN, "{text}");
    assert_eq!(lines[1]["why"], "closed_its_listener", "{text}");
    assert_eq!(lines[1]["live"], 1, "{text}");
    assert_eq!(lines[2]["from_live"], 1, "{text}");
    assert!(lines[2]["took_ms"].is_u64(), "{text}");
}

/// `/v1/restarts` lists the drain the restart model observed (the old
/// process closed its listener, then its last client left), in the
/// documented schema, with its timeline and the duration the histogram
/// got; its filters are checked.
#[tokio::test]
async fn restarts_list_observed_drains_with_their_timelines() {
    let t = TestAgent::start(None, vec![listen(4242, "old"), accept(4242, "old", 1)]).await;
    let client = t.client(None);
    let (code, v) = call(&client, Method::GET, "/v1/restarts", None).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    if let Err(e) = Schema::Restarts.check(&v) {
        panic!("{e}\n{v}");
    }
    assert_eq!(v["restarts"], json!([]), "{v}");

    t.feed([ConnEvent::ListenStart {
        at: at(3000),
        sk: 2,
        addr: listen_addr(),
        pid: 4343,
        comm: "new".to_owned(),
    }])
    .await;
    t.feed([
        accept(4343, "new", 2),
        ConnEvent::ListenStop {
            at: at(3100),
            sk: 1,
            addr: listen_addr(),
            pid: 4242,
            comm: "old".to_owned(),
        },
    ])
    .await;
    t.feed([close(4242, 1)]).await;
    // Facts reach the model's publication: give it a moment.
    let mut v = Value::Null;
    for _ in 0..200 {
        v = call(&client, Method::GET, "/v1/restarts", None).await.1;
        if v["restarts"][0]["outcome"] == "drained" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Err(e) = Schema::Restarts.check(&v) {
        panic!("{e}\n{v}");
    }
    let restarts = v["restarts"].as_array().expect("restarts");
    assert_eq!(restarts.len(), 1, "{v}");
    let r = &restarts[0];
    assert_eq!(r["pid"], 4242, "{v}");
    assert_eq!(r["comm"], "old", "{v}");
    assert_eq!(r["outcome"], "drained", "{v}");
    assert_eq!(r["why"], "closed_its_listener", "{v}");
    assert_eq!(r["from_live"], 1, "{v}");
    assert_eq!(r["dropped"], 0, "{v}");
    assert_eq!(
        r["listeners"],
        json!([{"netns": NETNS, "local": LISTEN}]),
        "{v}"
    );
    let (started, ended, took) = (
        r["started_ms"].as_u64().expect("started"),
        r["ended_ms"].as_u64().expect("ended"),
        r["duration_ms"].as_u64().expect("duration"),
    );
    assert_eq!(ended - started, took, "{v}");
    assert!(ended <= v["as_of_ms"].as_u64().expect("as_of"), "{v}");
    // Drained: it reached zero, and (holding nothing) left the status.
    let steps: Vec<(&str, u64)> = r["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .map(|e| {
            (
                e["role"].as_str().unwrap_or(""),
                e["live"].as_u64().unwrap_or(9),
            )
        })
        .collect();
    assert_eq!(steps, [("draining", 1), ("drained", 0)], "{v}");
    assert_eq!(r["timeline"][0]["at_ms"], r["started_ms"], "{v}");
    assert_eq!(r["timeline"][1]["at_ms"], r["ended_ms"], "{v}");
    // On the clock of the status's uptime_ms.
    let (_, status) = call(&client, Method::GET, "/v1/status", None).await;
    assert!(
        ended <= status["uptime_ms"].as_u64().expect("uptime"),
        "{v}\n{status}"
    );
    // The histogram got the same duration.
    let m = scrape(&t).await;
    let sum = m
        .get("gracewatch_observed_drain_duration_seconds_sum")
        .copied()
        .unwrap_or(-1.0);
    assert!(
        (sum - took as f64 / 1000.0).abs() < 0.0015,
        "{sum} vs {took} ms"
    );

    // Filters.
    let (_, one) = call(&client, Method::GET, "/v1/restarts?pid=4242&limit=1", None).await;
    assert_eq!(one["restarts"].as_array().map(Vec::len), Some(1), "{one}");
    let (_, none) = call(&client, Method::GET, "/v1/restarts?pid=4343", None).await;
    assert_eq!(none["restarts"], json!([]), "{none}");
    for bad in ["pid=x", "limit=0", "limit=100000", "color=red"] {
        let got = call(&client, Method::GET, &format!("/v1/restarts?{bad}"), None).await;
        let needle = bad.split('=').next().unwrap_or(bad);
        assert_error(&got, StatusCode::BAD_REQUEST, needle, bad);
    }
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
    assert_eq!(served_exit_code(&client, &id).await, 0);
    assert_eq!(report.signal_sent.as_deref(), Some("SIGTERM"));
    let exit = exited(&mut target).await.expect("the target got SIGTERM");
    assert_eq!(exit.signal(), Some(libc_sigterm()));

    // The list shows it, and the metrics counted it.
    let (code, list) = call(&client, Method::GET, "/v1/drains", None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(list["drains"][0]["id"], id.as_str());
    let m = scrape(&t).await;
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
    // The held connection's peer: shown with the token, hidden without.
    let peer = |v: &Value| v["progress"]["oldest"]["peer"].clone();
    let (_, with) = call(&client, Method::GET, &format!("/v1/drains/{id}"), None).await;
    assert_eq!(peer(&with), json!("127.0.0.2:40001"), "{with}");
    let (_, without) = call(
        &t.client(None),
        Method::GET,
        &format!("/v1/drains/{id}"),
        None,
    )
    .await;
    assert_eq!(peer(&without), json!("hidden"), "{without}");
    let (_, listed) = call(&t.client(None), Method::GET, "/v1/drains", None).await;
    assert!(!listed.to_string().contains("127.0.0.2"), "{listed}");

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
        (
            report.outcome,
            served_exit_code(&client, &id).await,
            report.still_held
        ),
        (gracewatch::drain::Outcome::Timeout, 124, 1),
        "{report:?}"
    );
    assert!(alive(&mut target));

    // DELETE cancels without signalling: 130.
    let id = post_drain(&client, json!({ "pids": [pid] })).await;
    let status = client.cancel_drain(&id).await.expect("DELETE");
    let report = status.report.expect("cancelled drains report at once");
    assert_eq!(
        (
            report.outcome,
            served_exit_code(&client, &id).await,
            report.signal_sent.clone()
        ),
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
        (report.outcome, served_exit_code(&client, &id).await),
        (gracewatch::drain::Outcome::TargetExited, 3),
        "{report:?}"
    );
    let _ = target.wait();

    let m = scrape(&t).await;
    for (outcome, n) in [
        ("timeout", 1.0),
        ("interrupted", 1.0),
        ("target_exited", 1.0),
    ] {
        let key = format!("gracewatch_drains_total{{outcome=\"{outcome}\"}}");
        assert_eq!(m.get(&key), Some(&n), "{key}");
    }
}

/// `quiet_for` holds a drain of an idle process for that long (counted
/// from its start: no connection came since), as `--quiet-for` does.
#[tokio::test]
async fn quiet_for_holds_a_drain_for_its_quiet_period() {
    let t = TestAgent::start(Some("tok"), Vec::new()).await;
    let target = sleeper();
    let req = DrainRequest {
        pids: vec![target.id()],
        signal: Some("none".to_owned()),
        quiet_for: Some("600ms".to_owned()),
        ..DrainRequest::default()
    };
    let report = t.client(Some("tok")).run_drain(&req).await.expect("drain");
    assert_eq!(
        report.outcome,
        gracewatch::drain::Outcome::Drained,
        "{report:?}"
    );
    assert!(
        report.duration_ms >= 600,
        "drained after {} ms, before quiet_for 600ms: {report:?}",
        report.duration_ms
    );
    assert!(
        report.message.contains("no new connection for 600 ms"),
        "{report:?}"
    );
    kill(target);
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
            format!("{{\"pids\": [{pid}], \"quiet_for\": \"5x\"}}").into_bytes(),
            StatusCode::BAD_REQUEST,
            "quiet_for",
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

// --- hostile clients (no kernel involved) --------------------------------------

/// Sends `request` as is on a new TCP connection and reads until the agent
/// closes it (bounded by [`LIMIT`]): the answer's head and body (de-chunked
/// if need be).
async fn raw(url: &str, request: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut bytes = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut bytes))
        .await
        .expect("the agent answers and closes within the limit")
        .expect("read");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_owned()
    };
    (head.to_owned(), body)
}

#[tokio::test]
async fn metrics_default_to_the_prometheus_text_format() {
    let t = TestAgent::start(None, vec![listen(7, "srv")]).await;
    for accept in ["", "accept: text/plain\r\n", "accept: */*\r\n"] {
        let (head, text) = raw(
            &t.url,
            &format!("GET /metrics HTTP/1.1\r\nhost: x\r\n{accept}connection: close\r\n\r\n"),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{accept:?}: {head}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT "),
            "{text}"
        );
        // Every family has its HELP under the name its samples carry.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
                .unwrap_or(name);
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "no HELP for {name}:\n{text}"
            );
        }
    }
}

#[tokio::test]
async fn events_hide_kernel_addresses_always_and_peers_from_untrusted_readers() {
    let t = TestAgent::start(Some("0123456789abcdef"), vec![listen(7, "srv")]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("agent.sock");
    tokio::spawn(
        t.agent
            .clone()
            .serve_unix(bind_unix(&sock).expect("bind unix")),
    );
    let unix = AgentClient::new(&format!("unix:{}", sock.display()), None).expect("client");
    let readers = [
        ("tcp without token", t.client(None), false),
        ("tcp with token", t.client(Some("0123456789abcdef")), true),
        ("unix socket", unix, true),
    ];
    let mut bodies = Vec::new();
    for (what, client, _) in &readers {
        let resp = client
            .send(Method::GET, "/v1/events", None)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_eq!(resp.status(), StatusCode::OK, "{what}");
        bodies.push(resp.into_body());
    }
    // A wrong token is refused, not answered with less.
    let wrong = call(&t.client(Some("nope")), Method::GET, "/v1/events", None).await;
    assert_error(
        &wrong,
        StatusCode::UNAUTHORIZED,
        "invalid token",
        "wrong token",
    );

    let sk: u64 = 0xffff_8881_0322_5c80;
    let mut ev = accept(7, "srv", 1);
    if let ConnEvent::Accept { sk: s, .. } = &mut ev {
        *s = sk;
    }
    t.feed([ev]).await;
    use http_body_util::BodyExt as _;
    for ((what, _, peers), body) in readers.iter().zip(&mut bodies) {
        let frame = tokio::time::timeout(LIMIT, body.frame())
            .await
            .expect("an event within the limit")
            .expect("stream open")
            .expect("frame");
        let line = String::from_utf8_lossy(frame.data_ref().expect("data")).into_owned();
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["kind"], "accept", "{what}: {line}");
        assert!(v["sk"].is_u64(), "{what}: an opaque id stays: {line}");
        assert_ne!(v["sk"], json!(sk), "{what}: {line}");
        assert!(!line.contains(&sk.to_string()), "{what}: {line}");
        assert_eq!(v["tuple"]["local"], LISTEN, "{what}: {line}");
        assert_eq!(
            v["tuple"].get("remote").is_some(),
            *peers,
            "{what}: peer shown only to trusted readers: {line}"
        );
        assert_eq!(line.contains("127.0.0.2"), *peers, "{what}: {line}");
    }
}

#[tokio::test]
async fn a_reader_that_falls_behind_gets_a_lagged_line_and_is_dropped() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let t = TestAgent::start(None, vec![listen(7, "srv")]).await;
    let addr: SocketAddr = t.url.trim_start_matches("http://").parse().expect("addr");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut slow = socket.connect(addr).await.expect("connect");
    slow.write_all(b"GET /v1/events HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    // A reader that keeps up, for comparison.
    let resp = t
        .client(None)
        .send(Method::GET, "/v1/events", None)
        .await
        .expect("GET /v1/events");
    let mut fast = resp.into_body();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Far more than the slow reader's queue and socket buffers hold, fed in
    // steps the agent keeps up with; the fast reader reads them all.
    let total: u16 = 20_000;
    let mut fast_lines = 0usize;
    use http_body_util::BodyExt as _;
    for chunk in (0..total).collect::<Vec<_>>().chunks(2_000) {
        t.feed(chunk.iter().map(|&i| accept(7, "srv", i))).await;
        while fast_lines < usize::from(chunk[chunk.len() - 1]) + 1 {
            let frame = tokio::time::timeout(LIMIT, fast.frame())
                .await
                .expect("the fast reader keeps getting events")
                .expect("stream open")
                .expect("frame");
            let data = frame.into_data().expect("data");
            fast_lines += data.iter().filter(|&&b| b == b'\n').count();
            assert!(
                !String::from_utf8_lossy(&data).contains("lagged"),
                "the fast reader is never dropped"
            );
        }
    }
    assert_eq!(fast_lines, usize::from(total));
    // The slow reader now reads what it was sent: its stream ends (the
    // last chunk of the answer) with the lagged line.
    let mut bytes = Vec::new();
    tokio::time::timeout(LIMIT, async {
        let mut buf = vec![0u8; 64 * 1024];
        while !bytes.ends_with(b"\r\n0\r\n\r\n") {
            let n = slow.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before the end of the answer");
            bytes.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the slow reader's stream ends");
    let text = String::from_utf8_lossy(&bytes);
    let lagged = text
        .lines()
        .rfind(|l| l.starts_with('{'))
        .expect("some lines");
    let v: Value = serde_json::from_str(lagged).expect("json");
    assert_eq!(v["kind"], "lagged", "{lagged}");
    let got = text.matches("\"kind\":\"accept\"").count();
    assert!(
        got < usize::from(total),
        "the slow reader was dropped early ({got} of {total} events)"
    );
}

#[tokio::test]
async fn event_subscribers_are_capped_with_a_json_503() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let t = TestAgent::start(None, vec![listen(7, "srv")]).await;
    let addr = t.url.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for _ in 0..gracewatch::agent::MAX_SUBSCRIBERS {
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        s.write_all(b"GET /v1/events HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(LIMIT, s.read(&mut buf))
            .await
            .expect("answer head")
            .expect("read");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200 "),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        held.push(s);
    }
    let got = call(&t.client(None), Method::GET, "/v1/events", None).await;
    assert_error(
        &got,
        StatusCode::SERVICE_UNAVAILABLE,
        "event streams",
        "one too many",
    );
    // A slot frees when a reader leaves.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let resp = t
            .client(None)
            .send(Method::GET, "/v1/events", None)
            .await
            .expect("GET /v1/events");
        if resp.status() == StatusCode::OK {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no slot freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn requests_hyper_cannot_parse_get_json_errors() {
    let t = TestAgent::start(None, Vec::new()).await;
    let big = "x".repeat(20_000);
    let many: String = (0..100).map(|i| format!("x-h{i}: v\r\n")).collect();
    for (what, request, status) in [
        (
            "oversized header",
            format!("GET /livez HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n"),
            "431",
        ),
        (
            "too many headers",
            format!("GET /livez HTTP/1.1\r\nhost: x\r\n{many}\r\n"),
            "431",
        ),
        ("garbage", "\x01\x02 nonsense\r\n\r\n".to_owned(), "400"),
        (
            "bad header",
            "GET /livez HTTP/1.1\r\nho st: x\r\n\r\n".to_owned(),
            "400",
        ),
    ] {
        let (head, body) = raw(&t.url, &request).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{what}: {head}"
        );
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {body:?}"));
        assert!(v["error"].is_string(), "{what}: {v}");
    }
    // The agent still serves.
    let (head, body) = raw(
        &t.url,
        "GET /livez HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(body, "ok\n");
}

#[tokio::test]
async fn slowloris_and_idle_connections_are_closed_by_the_header_timeout() {
    use gracewatch::agent::server::HEADER_READ_TIMEOUT;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let t = TestAgent::start(None, Vec::new()).await;
    let addr = t.url.trim_start_matches("http://").to_owned();
    let started = tokio::time::Instant::now();
    let mut idle = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    slow.write_all(b"GET /livez HTTP/1.1\r\n")
        .await
        .expect("write");
    let drip = async {
        // A header byte every second: it never completes.
        let mut buf = [0u8; 64];
        for _ in 0..30 {
            if slow.write_all(b"x").await.is_err() {
                return;
            }
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_secs(1), slow.read(&mut buf)).await
            {
                return;
            }
        }
        panic!("the slowloris connection was never closed");
    };
    let wait_idle = async {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(HEADER_READ_TIMEOUT * 2, idle.read(&mut buf))
            .await
            .expect("the idle connection is closed within the timeout");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    };
    tokio::join!(drip, wait_idle);
    let took = started.elapsed();
    assert!(
        took >= HEADER_READ_TIMEOUT - Duration::from_millis(500)
            && took < HEADER_READ_TIMEOUT + Duration::from_secs(3),
        "closed after {took:?}"
    );
}

#[tokio::test]
async fn a_full_tcp_budget_never_blocks_the_unix_socket() {
    let t = TestAgent::start(None, vec![listen(7, "srv")]).await;
    let agent = Agent::new(None);
    assert!(agent.set_monitor(t.handle.clone()));
    agent.set_max_tcp_connections(4);
    let url = serve(&agent).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("agent.sock");
    tokio::spawn(
        agent
            .clone()
            .serve_unix(bind_unix(&sock).expect("bind unix")),
    );
    let addr = url.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect"),
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // TCP is full: a fifth client waits in the backlog...
    let tcp = AgentClient::new(&url, None).expect("client");
    let blocked = tcp
        .request(Method::GET, "/livez", None, Duration::from_millis(500))
        .await;
    assert!(
        blocked.is_err(),
        "the fifth TCP client was served: {blocked:?}"
    );
    // ...while the unix socket answers at once.
    let unix = AgentClient::new(&format!("unix:{}", sock.display()), None).expect("client");
    let started = std::time::Instant::now();
    let (status, body) = unix
        .request(Method::GET, "/v1/status", None, LIMIT)
        .await
        .expect("unix socket answers");
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    // Once the idle clients leave, TCP serves again.
    drop(idle);
    let (status, _) = tcp
        .request(Method::GET, "/livez", None, LIMIT)
        .await
        .expect("TCP answers again");
    assert_eq!(status, StatusCode::OK);
}

// --- token files and socket directories ----------------------------------------

#[test]
fn unsafe_token_files_are_refused() {
    use gracewatch::agent::read_token;
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str, mode: u32| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    };
    let good = write("good", "0123456789abcdef0123\n", 0o600);
    assert_eq!(
        read_token(&good).expect("good token"),
        "0123456789abcdef0123"
    );
    // Followed through a symlink (Kubernetes secret volumes are links).
    let link = dir.path().join("link");
    symlink(&good, &link).expect("symlink");
    assert!(read_token(&link).is_ok());

    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("cstring");
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let zero_link = dir.path().join("zero");
    symlink("/dev/zero", &zero_link).expect("symlink");
    let cases = [
        (write("readable", "0123456789abcdef0123", 0o644), "mode 644"),
        (write("group", "0123456789abcdef0123", 0o640), "mode 640"),
        (write("short", "x\n", 0o600), "shorter than 16"),
        (write("empty", "\n", 0o600), "empty"),
        (write("large", &"a".repeat(5000), 0o600), "larger than"),
        (write("spaces", "0123456789 abcdef0123", 0o600), "spaces"),
        (fifo, "not a regular file"),
        (zero_link, "not a regular file"),
        (dir.path().to_path_buf(), "not a regular file"),
        (dir.path().join("missing"), "cannot open"),
    ];
    for (path, needle) in cases {
        let started = std::time::Instant::now();
        let err = read_token(&path).expect_err(needle);
        let text = format!("{err:#}");
        assert!(text.contains(needle), "{}: {text}", path.display());
        assert!(!text.contains('\n'), "one line: {text}");
        assert!(
            !text.contains("0123456789"),
            "never echoes the token: {text}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{needle}: blocked"
        );
    }
    if rustix::process::geteuid().is_root() {
        let other = write("other", "0123456789abcdef0123", 0o600);
        std::os::unix::fs::chown(&other, Some(65534), Some(65534)).expect("chown");
        let err = read_token(&other).expect_err("owned by nobody");
        assert!(format!("{err:#}").contains("owned by uid 65534"), "{err:#}");
    }
}

#[test]
fn unsafe_socket_directories_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = dir.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let err = bind_unix(&open.join("agent.sock")).expect_err("world-writable dir");
    assert!(
        format!("{err:#}").contains("writable by group or others"),
        "{err:#}"
    );
    assert!(!open.join("agent.sock").exists(), "nothing created");

    let group = dir.path().join("group");
    std::fs::create_dir(&group).expect("mkdir");
    std::fs::set_permissions(&group, std::fs::Permissions::from_mode(0o770)).expect("chmod");
    assert!(
        bind_unix(&group.join("agent.sock")).is_err(),
        "group-writable dir"
    );

    let private = dir.path().join("private");
    std::fs::create_dir(&private).expect("mkdir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let path = private.join("agent.sock");
        let _l = bind_unix(&path).expect("a private directory is fine");
        let mode = std::fs::symlink_metadata(&path)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    });
    if rustix::process::geteuid().is_root() {
        // A root-owned sticky directory (like /tmp) is fine: only the
        // owner of an entry can remove it.
        let sticky = dir.path().join("sticky");
        std::fs::create_dir(&sticky).expect("mkdir");
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        rt.block_on(async {
            assert!(bind_unix(&sticky.join("agent.sock")).is_ok());
        });
        // Someone else's directory is not.
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).expect("mkdir");
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
        let err = bind_unix(&theirs.join("agent.sock")).expect_err("owned by nobody");
        assert!(format!("{err:#}").contains("owned by uid 65534"), "{err:#}");
    }
}

/// The `gracewatch_` names in `text` (an alert rule file, a dashboard).
fn metric_names_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("gracewatch_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// deploy/prometheus/alerts.yml alerts on series the agent really exports
/// (scraped here while an old generation drains, so the series that exist
/// only then are there too), and promtool accepts the rules and passes
/// their unit tests (alerts.test.yml).
#[tokio::test]
async fn the_alert_rules_use_exported_series_and_pass_promtool() {
    let exported = exported_while_draining().await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus");
    let rules = std::fs::read_to_string(format!("{dir}/alerts.yml")).expect("alerts.yml");
    let used = metric_names_in(&rules);
    assert!(
        used.len() >= 3,
        "the rules name gracewatch series: {used:?}"
    );
    for name in &used {
        assert!(
            exported.contains(name),
            "alerts.yml uses {name}, which the agent does not export: {exported:?}"
        );
    }

    let promtool = |args: &[&str]| {
        std::process::Command::new("promtool")
            .args(args)
            .current_dir(dir)
            .output()
    };
    match promtool(&["check", "rules", "alerts.yml"]) {
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!(
                "skipping the promtool part: {e} (`cargo xtask setup --test-deps` installs it)"
            );
        }
        Err(e) => panic!("promtool is needed in CI: {e}"),
        Ok(out) => {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
            let out = promtool(&["test", "rules", "alerts.test.yml"]).expect("promtool test rules");
            assert!(
                out.status.success(),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The series names (without labels; `_total`, `_bucket`… as scraped) an
/// agent exports while an old generation drains, so the series that exist
/// only then are there too.
async fn exported_while_draining() -> std::collections::BTreeSet<String> {
    let t = TestAgent::start(None, vec![listen(4242, "old"), accept(4242, "old", 1)]).await;
    t.feed([
        ConnEvent::ListenStart {
            at: at(3000),
            sk: 2,
            addr: listen_addr(),
            pid: 4343,
            comm: "new".to_owned(),
        },
        accept(4343, "new", 2),
        ConnEvent::ListenStop {
            at: at(3100),
            sk: 1,
            addr: listen_addr(),
            pid: 4242,
            comm: "old".to_owned(),
        },
    ])
    .await;
    let draining =
        format!("gracewatch_oldest_draining_seconds{{netns=\"{NETNS}\",address=\"{LISTEN}\"}}");
    let mut m = scrape(&t).await;
    for _ in 0..200 {
        if m.contains_key(&draining) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = scrape(&t).await;
    }
    assert!(m.contains_key(&draining), "never draining: {m:#?}");
    m.keys()
        .map(|k| k.split('{').next().unwrap_or(k).to_owned())
        .collect()
}

/// deploy/grafana/gracewatch.json is a Grafana dashboard model: panels
/// with unique ids and titles, every query on the `${DS_PROMETHEUS}`
/// data source, the panels the README promises, and every `gracewatch_`
/// series it queries exported by the agent. promtool parses every query
/// (as the expression of a recording rule, Grafana's `$__rate_interval`
/// and `$instance` filled in).
#[tokio::test]
async fn the_grafana_dashboard_is_well_formed_and_queries_exported_series() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/gracewatch.json"
    );
    let text = std::fs::read_to_string(path).expect("gracewatch.json");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let ds = "${DS_PROMETHEUS}";
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dash["uid"].as_str().is_some_and(|t| !t.is_empty()));
    let version = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&version), "schemaVersion {version}");
    assert!(
        dash["__inputs"]
            .as_array()
            .is_some_and(|i| i.iter().any(|i| i["name"] == "DS_PROMETHEUS"
                && i["type"] == "datasource"
                && i["pluginId"] == "prometheus")),
        "the data source is an input"
    );
    let vars = dash["templating"]["list"].as_array().expect("templating");
    for var in ["DS_PROMETHEUS", "instance"] {
        assert!(vars.iter().any(|v| v["name"] == var), "variable {var}");
    }
    for v in vars.iter().filter(|v| v.get("datasource").is_some()) {
        assert_eq!(v["datasource"]["uid"], ds, "{v}");
    }

    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = std::collections::BTreeSet::new();
    let mut exprs = Vec::new();
    let mut titles = Vec::new();
    for p in panels {
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel without id: {p}"));
        assert!(ids.insert(id), "panel id {id} twice");
        let title = p["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "panel {id} has no title");
        titles.push(title.to_owned());
        for key in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][key].is_u64(), "panel {title}: gridPos.{key}");
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], ds, "panel {title}");
        assert_eq!(p["datasource"]["type"], "prometheus", "panel {title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} queries nothing");
        let mut refs = std::collections::BTreeSet::new();
        for t in targets {
            assert_eq!(t["datasource"]["uid"], ds, "panel {title}: {t}");
            assert!(
                refs.insert(t["refId"].as_str().expect("refId").to_owned()),
                "panel {title}: refId twice"
            );
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(expr.contains("gracewatch_"), "panel {title}: {expr:?}");
            assert!(
                expr.contains("$instance"),
                "panel {title} ignores the instance filter"
            );
            exprs.push(expr.to_owned());
        }
    }
    for want in [
        "Live connections per process",
        "Draining generations",
        "Oldest draining generation",
        "Observed drain durations (quantiles)",
        "Observed drain durations (heatmap)",
        "Handovers and connections dropped by exits",
        "Lost kernel events",
    ] {
        assert!(
            titles.iter().any(|t| t == want),
            "no panel {want:?}: {titles:?}"
        );
    }

    let used = metric_names_in(&exprs.join("\n"));
    for want in [
        "gracewatch_process_live_connections",
        "gracewatch_processes_draining",
        "gracewatch_oldest_draining_seconds",
        "gracewatch_observed_drain_duration_seconds_bucket",
        "gracewatch_handovers_total",
        "gracewatch_connections_dropped_by_exit_total",
        "gracewatch_lost_events_total",
    ] {
        assert!(used.contains(want), "the dashboard does not query {want}");
    }
    let exported = exported_while_draining().await;
    for name in &used {
        assert!(
            exported.contains(name),
            "the dashboard queries {name}, which the agent does not export: {exported:?}"
        );
    }

    // promtool parses PromQL when it checks rules: one recording rule per
    // query.
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let e = e
                .replace("$__rate_interval", "5m")
                .replace("$instance", ".*");
            json!({"record": format!("dashboard:query_{i}"), "expr": e})
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dashboard-queries.yml");
    // JSON is YAML.
    let doc = json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&file, doc.to_string()).expect("write the rules");
    match std::process::Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()
    {
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!(
                "skipping the promtool part: {e} (`cargo xtask setup --test-deps` installs it)"
            );
        }
        Err(e) => panic!("promtool is needed in CI: {e}"),
        Ok(out) => assert!(
            out.status.success(),
            "promtool rejects a dashboard query: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `/v1/connections` lists the named process's live connections in the
/// documented schema; on a replay monitor (no kernel to read) each one's
/// activity is `null`, never made up. Peers only with the token; a request
/// without a pid is refused.
#[tokio::test]
async fn connections_list_the_processes_connections_and_hide_peers_from_untrusted_readers() {
    const TOKEN: &str = "connections-token-0123456789";
    let t = TestAgent::start(
        Some(TOKEN),
        vec![
            listen(4242, "srv"),
            accept(4242, "srv", 1),
            accept(4242, "srv", 2),
        ],
    )
    .await;
    let trusted = t.client(Some(TOKEN));
    let (code, v) = call(&trusted, Method::GET, "/v1/connections?pid=4242", None).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    if let Err(e) = Schema::Connections.check(&v) {
        panic!("{e}\n{v}");
    }
    assert_eq!(
        (&v["pids"], &v["total"]),
        (&json!([4242]), &json!(2)),
        "{v}"
    );
    let conns = v["connections"].as_array().expect("connections");
    let peers: Vec<&str> = conns.iter().filter_map(|c| c["peer"].as_str()).collect();
    assert_eq!(peers, ["127.0.0.2:40001", "127.0.0.2:40002"], "{v}");
    assert!(conns.iter().all(|c| c["activity"].is_null()), "{v}");

    let (code, v) = call(
        &t.client(None),
        Method::GET,
        "/v1/connections?pid=4242",
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{v}");
    Schema::Connections
        .check(&v)
        .unwrap_or_else(|e| panic!("{e}\n{v}"));
    let conns = v["connections"].as_array().expect("connections");
    assert_eq!(conns.len(), 2, "{v}");
    assert!(conns.iter().all(|c| c["peer"] == "hidden"), "{v}");
    assert!(!v.to_string().contains("127.0.0.2"), "{v}");

    let got = call(&trusted, Method::GET, "/v1/connections", None).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "pid", "no pid");
    let got = call(&trusted, Method::GET, "/v1/connections?pid=4242&x=1", None).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "unknown query parameter",
        "unknown key",
    );
}

/// `/v1/peers` groups the named process's connections by peer in the
/// documented schema; on a replay monitor (no kernel, no /proc to walk)
/// nobody looks for the peer processes: `peer_processes`, `unnamed` and
/// `walk` are `null`, never made up. Peers only with the token.
#[tokio::test]
async fn peers_group_the_connections_and_hide_peers_from_untrusted_readers() {
    const TOKEN: &str = "peers-token-0123456789abcdef";
    let t = TestAgent::start(
        Some(TOKEN),
        vec![
            listen(4242, "srv"),
            accept(4242, "srv", 1),
            accept(4242, "srv", 2),
        ],
    )
    .await;
    let trusted = t.client(Some(TOKEN));
    let (code, v) = call(&trusted, Method::GET, "/v1/peers?pid=4242", None).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    if let Err(e) = Schema::Peers.check(&v) {
        panic!("{e}\n{v}");
    }
    assert_eq!((&v["total"], &v["walk"]), (&json!(2), &Value::Null), "{v}");
    let groups = v["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 1, "{v}");
    assert_eq!(
        (&groups[0]["peer"], &groups[0]["connections"]),
        (&json!("127.0.0.2"), &json!(2)),
        "{v}"
    );
    assert!(groups[0]["peer_processes"].is_null(), "{v}");

    let (code, v) = call(&t.client(None), Method::GET, "/v1/peers?pid=4242", None).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    Schema::Peers
        .check(&v)
        .unwrap_or_else(|e| panic!("{e}\n{v}"));
    assert_eq!(v["groups"][0]["peer"], "hidden", "{v}");
    assert_eq!(v["groups"][0]["connections"], 2, "{v}");
    assert!(!v.to_string().contains("127.0.0.2"), "{v}");

    let got = call(&trusted, Method::GET, "/v1/peers", None).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "pid", "no pid");
}
