//! The HTTP routes of the agent and their error answers. Every failure a
//! client can cause is a 4xx with a JSON body `{"error": "..."}`; nothing
//! a request carries can stop the agent.

use std::{sync::Arc, time::Duration};

use super::{
    Agent, Transport,
    drains::{DrainRequest, Entry, MAX_RUNNING},
    events::{MAX_SUBSCRIBERS, redact_peers},
    metrics::{Format, MetricLabels, Scrape},
};
use crate::{
    drain,
    input::parse_duration,
    monitor::MonitorHandle,
    tracker::records::{RECORDS_KEPT, RestartsReport},
};
use axum::{
    Router,
    body::Body,
    extract::{Path, RawQuery, State, rejection::PathRejection},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Serialize;

/// Largest request body accepted (a drain request is a few hundred bytes).
const MAX_BODY: usize = 64 * 1024;
/// Longest long-poll (`?wait=`) accepted.
const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Most bytes of queued event lines sent in one chunk.
const EVENTS_CHUNK: usize = 32 * 1024;
/// How long `DELETE` waits for the cancelled drain's report.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Ctx {
    agent: Agent,
    transport: Transport,
}

pub(super) fn router(agent: Agent, transport: Transport) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .route("/v1/events", get(events))
        .route("/v1/restarts", get(restarts))
        .route("/v1/connections", get(connections))
        .route("/v1/peers", get(peers))
        .route("/v1/drains", post(start_drain).get(list_drains))
        .route("/v1/drains/{id}", get(get_drain).delete(cancel_drain))
        .route("/v1/drains/{id}/stream", get(stream_drain))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(Ctx { agent, transport })
}

/// A 4xx/5xx answer with a JSON body `{"error": message}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = json(self.status, &serde_json::json!({ "error": self.message }));
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// `value` as a JSON body (one line, newline-terminated for curl users).
fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(mut body) => {
            body.push(b'\n');
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("failed to encode the answer: {e}\n"),
        )
            .into_response(),
    }
}

/// One NDJSON line: `value`'s fields plus `"type": kind` (the format of
/// `gracewatch drain --json`), peer addresses hidden unless `peers`.
fn typed_line<T: Serialize>(kind: &str, value: &T, peers: bool) -> String {
    let mut v = serde_json::to_value(value).unwrap_or_default();
    if !peers {
        redact_peers(&mut v);
    }
    if let serde_json::Value::Object(map) = &mut v {
        map.insert("type".to_owned(), kind.into());
    }
    format!("{v}\n")
}

fn ndjson(body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

impl Ctx {
    fn monitor(&self) -> Result<&MonitorHandle, ApiError> {
        let handle = self.agent.monitor().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the monitor is starting (attaching the eBPF programs, taking the startup snapshot)",
            )
        })?;
        if let Some(why) = handle.failure() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the monitor stopped: {why}"),
            ));
        }
        Ok(handle)
    }

    /// Whether answers to this request may carry peer addresses: on the
    /// unix socket, and on TCP with the bearer token (a wrong token is
    /// refused rather than silently answered with less).
    fn may_see_peers(&self, headers: &HeaderMap) -> Result<bool, ApiError> {
        if self.transport == Transport::Unix {
            return Ok(true);
        }
        if self.agent.shared.token.is_none() || !headers.contains_key(header::AUTHORIZATION) {
            return Ok(false);
        }
        self.authorize(headers).map(|()| true)
    }

    /// `value` as JSON, with peer addresses hidden unless `peers`.
    fn json_for<T: Serialize>(&self, peers: bool, status: StatusCode, value: &T) -> Response {
        if peers {
            return json(status, value);
        }
        match serde_json::to_value(value) {
            Ok(mut v) => {
                redact_peers(&mut v);
                json(status, &v)
            }
            Err(e) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failed to encode the answer: {e}"),
            )
            .into_response(),
        }
    }

    /// Requests that can signal a process: trusted on the unix socket, and
    /// on TCP only with the bearer token.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.transport == Transport::Unix {
            return Ok(());
        }
        let Some(expected) = &self.agent.shared.token else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "starting and cancelling drains over TCP is disabled: this agent was started without --token-file (use its unix socket, or restart it with --token-file PATH)",
            ));
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing `Authorization: Bearer <token>` (the token is in the agent's --token-file)",
            ));
        };
        let given = value.to_str().ok().and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        match given {
            Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid token")),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the Authorization header must be `Bearer <token>`",
            )),
        }
    }

    fn drain(&self, id: Result<Path<String>, PathRejection>) -> Result<Arc<Entry>, ApiError> {
        let Path(id) = id.map_err(|e| ApiError::bad_request(e.body_text()))?;
        self.agent
            .shared
            .drains
            .get(&id)
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no drain with id `{id}`")))
    }

    fn shutdown(&self) -> tokio::sync::watch::Receiver<bool> {
        self.agent.shared.shutdown.subscribe()
    }
}

/// Compares without an early exit, so timing does not reveal how much of
/// a guessed token is right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(
        headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
    );
    let shared = &ctx.agent.shared;
    let monitor = ctx.agent.monitor();
    let programs = match monitor {
        Some(h) => h.program_stats().await.ok().flatten(),
        None => None,
    };
    let scrape = Scrape {
        status: monitor.map(MonitorHandle::status),
        programs,
        bpf_stats_enabled: shared
            .bpf_stats_enabled
            .load(std::sync::atomic::Ordering::Relaxed),
        labels: MetricLabels::from_bits(
            shared
                .metric_labels
                .load(std::sync::atomic::Ordering::Relaxed),
        ),
    };
    match shared.metrics.render(scrape, format) {
        Ok(text) => ([(header::CONTENT_TYPE, format.content_type())], text).into_response(),
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "failed to encode the metrics",
        )
        .into_response(),
    }
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(ctx): State<Ctx>) -> Response {
    match ctx.monitor() {
        Ok(_) => "ok\n".into_response(),
        Err(e) => (e.status, format!("{}\n", e.message)).into_response(),
    }
}

async fn status(State(ctx): State<Ctx>) -> Result<Response, ApiError> {
    let status = ctx.monitor()?.status();
    Ok(json(StatusCode::OK, &*status))
}

/// The drains the restart model observed, newest first
/// ([`RestartsReport`], `schema/restarts.schema.json`). Like `/v1/status`
/// it carries no peer address, so it is open to every reader.
/// `?pid=N` keeps one process's, `?limit=N` the newest N.
async fn restarts(State(ctx): State<Ctx>, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    let filter = parse_restarts_query(query.as_deref())?;
    let mut report: RestartsReport = ctx.monitor()?.restarts().report();
    if let Some(pid) = filter.pid {
        report.restarts.retain(|r| r.pid == pid);
    }
    if let Some(limit) = filter.limit {
        report.restarts.truncate(limit);
    }
    Ok(json(StatusCode::OK, &report))
}

/// Reads of `/v1/connections` running at once; more are refused with 429
/// rather than queued, so no reader can pile up sock_diag dumps.
static CONNECTION_READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Most pids one `/v1/connections` request names.
const MAX_CONNECTION_PIDS: usize = 64;

/// One of the few connection reads allowed at once (`/v1/connections`
/// and `/v1/peers` share them: both dump sockets), or 429.
fn connection_read_permit() -> Result<tokio::sync::SemaphorePermit<'static>, ApiError> {
    CONNECTION_READS.try_acquire().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many connection reads at once: retry shortly",
        )
    })
}

/// The live connections of `?pid=N` (repeatable) with how long each has
/// been idle and what is in flight, read from the kernel now
/// ([`crate::connections::report`], `schema/connections.schema.json`).
/// Peer addresses only for readers that may see them.
async fn connections(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let pids = parse_connections_query(query.as_deref())?;
    let peers = ctx.may_see_peers(&headers)?;
    let handle = ctx.monitor()?;
    let _permit = connection_read_permit()?;
    let report = crate::connections::report(handle, &pids)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failed to read the connections: {e:#}"),
            )
        })?;
    Ok(ctx.json_for(peers, StatusCode::OK, &report))
}

/// Who pins `?pid=N` (repeatable): its live connections grouped by peer
/// and, for readers that may see peers, the processes on this host
/// holding the other ends ([`crate::peer_report::report`],
/// `schema/peers.schema.json`). Shares `/v1/connections`' concurrency
/// limit (both dump sockets, and the naming walks /proc); readers that may
/// not see peers get the groups with `hidden` peers and nobody looks for
/// the peer processes.
async fn peers(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let pids = parse_connections_query(query.as_deref())?;
    let may_see = ctx.may_see_peers(&headers)?;
    let handle = ctx.monitor()?;
    let _permit = connection_read_permit()?;
    let report = crate::peer_report::report(handle, &pids, may_see)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failed to group the connections by peer: {e:#}"),
            )
        })?;
    Ok(ctx.json_for(may_see, StatusCode::OK, &report))
}

fn parse_connections_query(query: Option<&str>) -> Result<Vec<u32>, ApiError> {
    let mut pids = Vec::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "pid" {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter `{key}` (only `pid` is known)"
            )));
        }
        let pid: u32 =
            value.parse().ok().filter(|&p| p > 0).ok_or_else(|| {
                ApiError::bad_request(format!("pid: `{value}` is not a process id"))
            })?;
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    if pids.is_empty() {
        return Err(ApiError::bad_request("name a process: ?pid=N (repeatable)"));
    }
    if pids.len() > MAX_CONNECTION_PIDS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_CONNECTION_PIDS} pids per request"
        )));
    }
    Ok(pids)
}

#[derive(Debug, Default, PartialEq, Eq)]
struct RestartsQuery {
    pid: Option<u32>,
    limit: Option<usize>,
}

/// The `key=value` pairs of a query string, as sent (a key without `=` has
/// an empty value; nothing is percent-decoded: the values read here never
/// need it, and a percent sign is refused by their parsers).
fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

fn parse_restarts_query(query: Option<&str>) -> Result<RestartsQuery, ApiError> {
    let mut q = RestartsQuery::default();
    for (key, value) in query_pairs(query) {
        match key {
            "pid" => {
                q.pid = Some(value.parse().map_err(|_| {
                    ApiError::bad_request(format!("pid: `{value}` is not a process id"))
                })?);
            }
            "limit" => {
                let n: usize = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=RECORDS_KEPT).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "limit: `{value}` is not a number from 1 to {RECORDS_KEPT}"
                        ))
                    })?;
                q.limit = Some(n);
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{other}` (only `pid` and `limit` are known)"
                )));
            }
        }
    }
    Ok(q)
}

/// Every event the monitor applies from now on, one JSON object per line
/// (as `gracewatch record` prints them, peer addresses only for trusted
/// readers). A reader too slow to keep up gets a last `{"kind": "lagged",
/// ...}` line and is disconnected; at most [`MAX_SUBSCRIBERS`] at once.
async fn events(State(ctx): State<Ctx>, headers: HeaderMap) -> Result<Response, ApiError> {
    let peers = ctx.may_see_peers(&headers)?;
    ctx.monitor()?;
    let Some(rx) = ctx.agent.shared.events.subscribe(peers) else {
        let mut resp = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_SUBSCRIBERS} event streams are served already: try again later"),
        )
        .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
        return Ok(resp);
    };
    // Lines that queued up meanwhile go out in one chunk: a busy host costs
    // one write per wake-up, not one per event.
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let mut chunk = rx.recv().await?.to_string();
        while chunk.len() < EVENTS_CHUNK {
            match rx.try_recv() {
                Ok(line) => chunk.push_str(&line),
                Err(_) => break,
            }
        }
        Some((Ok::<_, std::convert::Infallible>(chunk), rx))
    });
    Ok(ndjson(Body::from_stream(stream)))
}

async fn start_drain(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    ctx.authorize(&headers)?;
    let handle = ctx.monitor()?.clone();
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|e| {
        let too_large =
            std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .any(|e| e.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {MAX_BODY} bytes"),
            )
        } else {
            ApiError::bad_request(format!("failed to read the request body: {e}"))
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "empty body: send the drain options as JSON, e.g. {\"pids\": [1234]}",
        ));
    }
    let req: DrainRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid drain request: {e}")))?;
    let (target_spec, spec) = req.to_specs().map_err(ApiError::bad_request)?;
    let shared = ctx.agent.shared.clone();
    let too_many = || {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{MAX_RUNNING} drains are running already: wait for one to finish or cancel one"
            ),
        )
    };
    // Checked before the targets are pinned; `start` checks again.
    if shared.drains.running() >= MAX_RUNNING {
        return Err(too_many());
    }
    let targets = drain::choose(&target_spec).map_err(|e| ApiError::bad_request(e.0))?;
    shared.metrics.drain_started();
    let done = shared.clone();
    let Some(entry) = shared.drains.start(handle, targets, spec, move |report| {
        done.metrics.drain_finished(report);
    }) else {
        // Not started: undo the gauge without counting an outcome.
        shared.metrics.drain_not_started();
        return Err(too_many());
    };
    let status = entry.status();
    let mut resp = json(
        StatusCode::ACCEPTED,
        &serde_json::json!({
            "id": entry.id,
            "targets": status.targets,
            "url": format!("/v1/drains/{}", entry.id),
        }),
    );
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/drains/{}", entry.id)) {
        resp.headers_mut().insert(header::LOCATION, location);
    }
    Ok(resp)
}

async fn list_drains(State(ctx): State<Ctx>, headers: HeaderMap) -> Result<Response, ApiError> {
    let peers = ctx.may_see_peers(&headers)?;
    let drains: Vec<_> = ctx
        .agent
        .shared
        .drains
        .all()
        .iter()
        .map(|e| e.status())
        .collect();
    Ok(ctx.json_for(
        peers,
        StatusCode::OK,
        &serde_json::json!({ "drains": drains }),
    ))
}

/// `?wait=DURATION`: hold the answer until the drain is done (or the wait
/// passes), so a preStop hook can be a single `curl`.
fn parse_wait(query: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let mut wait = None;
    for (key, value) in query_pairs(query) {
        match key {
            "wait" => {
                let d = parse_duration(value)
                    .map_err(|e| ApiError::bad_request(format!("wait: {e}")))?;
                if d > MAX_WAIT {
                    return Err(ApiError::bad_request(format!(
                        "wait: at most {}s",
                        MAX_WAIT.as_secs()
                    )));
                }
                wait = Some(d);
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{other}` (only `wait` is known)"
                )));
            }
        }
    }
    Ok(wait)
}

async fn get_drain(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let peers = ctx.may_see_peers(&headers)?;
    let wait = parse_wait(query.as_deref())?;
    let entry = ctx.drain(id)?;
    if let Some(wait) = wait {
        let mut stop = ctx.shutdown();
        tokio::select! {
            () = entry.wait_done(wait) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }
    Ok(ctx.json_for(peers, StatusCode::OK, &entry.status()))
}

async fn cancel_drain(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    ctx.authorize(&headers)?;
    let entry = ctx.drain(id)?;
    entry.cancel();
    entry.wait_done(CANCEL_WAIT).await;
    Ok(json(StatusCode::OK, &entry.status()))
}

/// The drain's progress and then its result, one JSON object per line, as
/// `gracewatch drain --json` prints them (`"type": "progress"` or
/// `"result"`). Ends after the result.
async fn stream_drain(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let peers = ctx.may_see_peers(&headers)?;
    let entry = ctx.drain(id)?;
    let mut progress = entry.progress.subscribe();
    // The current progress, if any, goes out first.
    progress.mark_changed();
    let report = entry.report.subscribe();
    let state = (progress, report, ctx.shutdown(), false);
    let stream = futures_util::stream::unfold(
        state,
        move |(mut progress, mut report, mut stop, finished)| async move {
            if finished {
                return None;
            }
            loop {
                let next = tokio::select! {
                    biased;
                    r = progress.changed() => match r {
                        Ok(()) => Next::Progress(progress.borrow_and_update().clone()),
                        Err(_) => Next::Stop,
                    },
                    r = report.wait_for(Option::is_some) => Next::Done(r.ok().and_then(|r| r.clone())),
                    _ = stop.wait_for(|s| *s) => Next::Stop,
                };
                let (line, finished) = match next {
                    Next::Progress(None) => continue,
                    Next::Progress(Some(p)) => (typed_line("progress", &p, peers), false),
                    Next::Done(Some(d)) => (
                        typed_line("result", &crate::exit::ReportJson(&d), peers),
                        true,
                    ),
                    Next::Done(None) | Next::Stop => return None,
                };
                let state = (progress, report, stop, finished);
                return Some((Ok::<_, std::convert::Infallible>(line), state));
            }
        },
    );
    Ok(ndjson(Body::from_stream(stream)))
}

enum Next {
    Progress(Option<drain::Progress>),
    Done(Option<drain::DrainReport>),
    Stop,
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no such endpoint: {method} {} (see /metrics, /livez, /readyz, /v1/status, /v1/events, /v1/restarts, /v1/connections, /v1/peers, /v1/drains)",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_parameter_is_validated() {
        assert_eq!(parse_wait(None).ok(), Some(None));
        assert_eq!(
            parse_wait(Some("wait=30s")).ok(),
            Some(Some(Duration::from_secs(30)))
        );
        for bad in ["wait=soon", "wait=2h", "wait=", "color=red", "wait=-1s"] {
            assert!(parse_wait(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn connections_query_is_validated() {
        assert_eq!(
            parse_connections_query(Some("pid=42&pid=7&pid=42")).ok(),
            Some(vec![42, 7])
        );
        for bad in [
            None,
            Some(""),
            Some("pid=x"),
            Some("pid=0"),
            Some("pid=-1"),
            Some("limit=3"),
        ] {
            assert!(parse_connections_query(bad).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (1..=65).map(|p| format!("pid={p}")).collect();
        assert!(parse_connections_query(Some(&many.join("&"))).is_err());
    }

    #[test]
    fn restarts_filters_are_validated() {
        assert_eq!(
            parse_restarts_query(None).ok(),
            Some(RestartsQuery::default())
        );
        assert_eq!(
            parse_restarts_query(Some("pid=42&limit=3")).ok(),
            Some(RestartsQuery {
                pid: Some(42),
                limit: Some(3)
            })
        );
        for bad in [
            "pid=x",
            "pid=-1",
            "pid=99999999999",
            "limit=0",
            "limit=257",
            "limit=",
            "since=1",
        ] {
            assert!(parse_restarts_query(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
