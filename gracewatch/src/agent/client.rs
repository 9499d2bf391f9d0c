//! The client side of the agent's HTTP API ([`AgentClient`], a thin HTTP/1.1
//! client on hyper over TCP or a unix socket) and `gracewatch drain --agent`,
//! which runs a drain through a running agent and exits with the same codes
//! as a local drain.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Method, Request, StatusCode,
    body::{Bytes, Incoming},
    header,
};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{DrainRequest, DrainStatus};
use crate::{display::terminal_safe, drain::DrainReport, exit, tracker::Status};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Added to a long-poll's wait for the whole request.
const REQUEST_SLACK: Duration = Duration::from_secs(30);
/// How long `drain --agent` waits for an agent that is still starting.
const READY_PATIENCE: Duration = Duration::from_secs(60);
/// Reconnections `drain --agent` tries when it loses the agent mid-drain.
const RECONNECTS: u32 = 5;
/// Largest answer read whole (a status of a host with many processes fits;
/// an endless or hostile answer does not grow memory past this).
pub const MAX_ANSWER: usize = 64 * 1024 * 1024;
/// Longest line of a drain stream (a progress or result object is a few KiB).
pub const MAX_STREAM_LINE: usize = 1024 * 1024;

/// Why a request to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent answered with an error status and this message.
    #[error("the agent refused the request ({status}): {message}")]
    Refused { status: StatusCode, message: String },
    /// No usable answer: connection refused, reset, timed out, garbled.
    #[error("{0:#}")]
    Transport(#[from] anyhow::Error),
}

impl ClientError {
    fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            Self::Transport(_) => None,
        }
    }
}

#[derive(Clone, Debug)]
enum Endpoint {
    /// `host:port`, resolved at each connection.
    Tcp(String),
    Unix(PathBuf),
}

/// A client for one agent: `http://HOST:PORT[/prefix]` or `unix:/PATH`.
#[derive(Clone, Debug)]
pub struct AgentClient {
    endpoint: Endpoint,
    /// `Host` header value.
    host: String,
    /// Path prefix (for an agent behind a reverse proxy), without trailing `/`.
    base: String,
    token: Option<String>,
}

impl AgentClient {
    /// `url`: `http://127.0.0.1:9464`, `http://[::1]:9464/`, or
    /// `unix:/run/gracewatch.sock`. `token`: sent as `Authorization: Bearer`.
    pub fn new(url: &str, token: Option<String>) -> anyhow::Result<Self> {
        let url = url.trim();
        if let Some(path) = url
            .strip_prefix("unix://")
            .or_else(|| url.strip_prefix("unix:"))
        {
            if path.is_empty() {
                anyhow::bail!("`{url}`: the unix socket path is missing (unix:/PATH)");
            }
            return Ok(Self {
                endpoint: Endpoint::Unix(path.into()),
                host: "localhost".to_owned(),
                base: String::new(),
                token,
            });
        }
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            if url.starts_with("https://") {
                anyhow::anyhow!(
                    "`{url}`: https is not supported; reach the agent over loopback, its unix socket, or a TLS-terminating proxy"
                )
            } else {
                anyhow::anyhow!("`{url}` is not an agent URL (http://HOST:PORT or unix:/PATH)")
            }
        })?;
        let (authority, path) = rest
            .find(['/', '?'])
            .map_or((rest, ""), |i| rest.split_at(i));
        if authority.is_empty() {
            anyhow::bail!("`{url}`: the host is missing");
        }
        if authority.contains('@') {
            anyhow::bail!("`{url}`: credentials in the URL are not supported (use --token-file)");
        }
        if path.contains('?') {
            anyhow::bail!("`{url}`: a query string is not supported");
        }
        let has_port = match authority.rfind(']') {
            Some(i) => authority[i..].contains(':'),
            None => authority.contains(':'),
        };
        let addr = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            endpoint: Endpoint::Tcp(addr),
            host: authority.to_owned(),
            base: path.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// Sends one request and returns the answer's status and body head, the
    /// body still to be read. Each request uses its own connection.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<hyper::Response<Incoming>> {
        let uri = format!("{}{path}", self.base);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(&uri)
            .header(header::HOST, &self.host);
        if let Some(token) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .with_context(|| format!("invalid request {method} {uri}"))?;
        let what = || format!("{method} {uri} on {}", self.describe());
        let resp = match &self.endpoint {
            Endpoint::Tcp(addr) => {
                let stream =
                    tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
                        .await
                        .map_err(|_| anyhow::anyhow!("timed out connecting to {addr}"))?
                        .with_context(|| format!("failed to connect to the agent at {addr}"))?;
                exchange(stream, req).await
            }
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .with_context(|| {
                        format!("failed to connect to the agent at unix:{}", path.display())
                    })?;
                exchange(stream, req).await
            }
        };
        resp.with_context(what)
    }

    fn describe(&self) -> String {
        match &self.endpoint {
            Endpoint::Tcp(addr) => format!("http://{addr}"),
            Endpoint::Unix(path) => format!("unix:{}", path.display()),
        }
    }

    /// Sends a request and returns the status and the whole body.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        limit: Duration,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let work = async {
            let resp = self.send(method, path, body).await?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("failed to read the agent's answer: {e}"))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(limit, work)
            .await
            .map_err(|_| anyhow::anyhow!("the agent did not answer within {limit:?}"))?
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        limit: Duration,
    ) -> Result<T, ClientError> {
        let (status, body) = self.request(method, path, body, limit).await?;
        if !status.is_success() {
            return Err(refused(status, &body));
        }
        serde_json::from_slice(&body)
            .with_context(|| {
                format!(
                    "the agent's answer is not what was expected: {}",
                    String::from_utf8_lossy(&body)
                )
            })
            .map_err(ClientError::Transport)
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.call(Method::GET, "/v1/status", None, REQUEST_SLACK)
            .await
    }

    /// `POST /v1/drains`: starts a drain and returns its id.
    pub async fn start_drain(&self, req: &DrainRequest) -> Result<String, ClientError> {
        #[derive(serde::Deserialize)]
        struct Started {
            id: String,
        }
        let body = serde_json::to_vec(req).context("failed to encode the drain request")?;
        let started: Started = self
            .call(Method::POST, "/v1/drains", Some(body), REQUEST_SLACK)
            .await?;
        Ok(started.id)
    }

    /// `GET /v1/drains/{id}`, holding the answer until the drain is done
    /// or `wait` passes.
    pub async fn drain(
        &self,
        id: &str,
        wait: Option<Duration>,
    ) -> Result<DrainStatus, ClientError> {
        let path = match wait {
            Some(w) => format!("/v1/drains/{id}?wait={}ms", w.as_millis()),
            None => format!("/v1/drains/{id}"),
        };
        self.call(
            Method::GET,
            &path,
            None,
            wait.unwrap_or_default() + REQUEST_SLACK,
        )
        .await
    }

    /// Starts a drain and waits for its report (the library counterpart
    /// of `gracewatch drain --agent`).
    pub async fn run_drain(&self, req: &DrainRequest) -> Result<DrainReport, ClientError> {
        let id = self.start_drain(req).await?;
        loop {
            let status = self.drain(&id, Some(Duration::from_secs(60))).await?;
            if let Some(report) = status.report {
                return Ok(report);
            }
        }
    }

    /// `DELETE /v1/drains/{id}`: stops the drain without signalling and
    /// returns where it ended.
    pub async fn cancel_drain(&self, id: &str) -> Result<DrainStatus, ClientError> {
        self.call(
            Method::DELETE,
            &format!("/v1/drains/{id}"),
            None,
            REQUEST_SLACK,
        )
        .await
    }

    /// `GET /v1/drains/{id}/stream`: calls `on_line` with each progress
    /// and result object as it comes (the lines of `gracewatch drain
    /// --json`); returns the report, or `None` if the stream ended early.
    pub async fn follow_drain(
        &self,
        id: &str,
        mut on_line: impl FnMut(&serde_json::Value),
    ) -> Result<Option<DrainReport>, ClientError> {
        let resp = self
            .send(Method::GET, &format!("/v1/drains/{id}/stream"), None)
            .await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = http_body_util::Limited::new(body, MAX_STREAM_LINE)
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("failed to read the agent's answer: {e}"))?
                .to_bytes();
            return Err(refused(status, &bytes));
        }
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("the agent's stream broke")?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let Ok(value) = serde_json::from_slice::<serde_json::Value>(&line) else {
                    continue;
                };
                on_line(&value);
                if value["type"] == "result" {
                    let report = serde_json::from_value(value)
                        .context("the agent's result is not a drain report")?;
                    return Ok(Some(report));
                }
            }
            // What is left is the start of a line: bounded, whatever the
            // agent (or whoever answers on its address) sends.
            if buf.len() > MAX_STREAM_LINE {
                return Err(ClientError::Transport(anyhow::anyhow!(
                    "the agent's stream sent a line longer than {MAX_STREAM_LINE} bytes"
                )));
            }
        }
        Ok(None)
    }
}

/// The `error` field of an error answer, or its raw text.
fn refused(status: StatusCode, body: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    ClientError::Refused { status, message }
}

async fn exchange<I>(io: I, req: Request<Full<Bytes>>) -> anyhow::Result<hyper::Response<Incoming>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .context("HTTP handshake failed")?;
    // The connection task ends with the response body (or its reader).
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            log::debug!("agent connection: {e}");
        }
    });
    sender.send_request(req).await.context("request failed")
}

/// Prints progress and the result the way a local `gracewatch drain` does.
fn print_line(value: &serde_json::Value, json: bool) {
    use std::io::Write as _;
    if json {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{value}");
        let _ = out.flush();
        return;
    }
    if let Some(msg) = value["message"].as_str() {
        eprintln!("gracewatch: {}", terminal_safe(msg));
    }
    if value["type"] == "result" {
        for h in value["held"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            eprintln!(
                "gracewatch:   still held by pid {}: {} ← {} (age {:.1}s)",
                h["pid"],
                terminal_safe(h["local"].as_str().unwrap_or_default()),
                terminal_safe(h["peer"].as_str().unwrap_or_default()),
                h["age_ms"].as_f64().unwrap_or_default() / 1000.0
            );
        }
        // An older agent's result has no `peers`.
        for g in value["peers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if let Ok(g) = serde_json::from_value::<crate::peers::PeerGroupView>(g.clone()) {
                eprintln!("{}", crate::peer_report::drain_line(&g));
            }
        }
        for x in value["excluded"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            eprintln!(
                "gracewatch:   excluded peer, held by pid {}: {} ← {}{}",
                x["pid"],
                terminal_safe(x["local"].as_str().unwrap_or_default()),
                terminal_safe(x["peer"].as_str().unwrap_or_default()),
                x["age_ms"]
                    .as_f64()
                    .map(|ms| format!(" (age {:.1}s)", ms / 1000.0))
                    .unwrap_or_default()
            );
        }
    }
}

fn print_report(report: &DrainReport, json: bool) {
    let mut v = serde_json::to_value(exit::ReportJson(report)).unwrap_or_default();
    if let serde_json::Value::Object(map) = &mut v {
        map.insert("type".to_owned(), "result".into());
    }
    print_line(&v, json);
}

/// `gracewatch drain --agent URL` (and `wait --agent`): starts the drain
/// on the agent, prints its progress like a local drain, and returns the
/// same exit code. Ctrl-C or SIGTERM cancels it on the agent (nothing is
/// signalled) and exits 130.
pub async fn drain_cmd(url: &str, token_file: Option<&Path>, req: DrainRequest, json: bool) -> u8 {
    let token = match token_file.map(super::read_token).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gracewatch: {e:#}");
            return exit::USAGE;
        }
    };
    let client = match AgentClient::new(url, token) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gracewatch: {e:#}");
            return exit::USAGE;
        }
    };
    let Ok(mut sigterm) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        eprintln!("gracewatch: failed to handle SIGTERM");
        return exit::RUNTIME;
    };
    let interrupted = async {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
    };
    tokio::pin!(interrupted);

    // An agent that is still starting answers 503: give it time.
    let patience = tokio::time::Instant::now() + READY_PATIENCE;
    let mut said_waiting = false;
    let id = loop {
        let started = tokio::select! {
            r = client.start_drain(&req) => r,
            () = &mut interrupted => return exit::INTERRUPTED,
        };
        match started {
            Ok(id) => break id,
            Err(e)
                if e.status() == Some(StatusCode::SERVICE_UNAVAILABLE)
                    && tokio::time::Instant::now() < patience =>
            {
                if !said_waiting {
                    eprintln!("gracewatch: waiting for the agent to be ready ({e})");
                    said_waiting = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                // The agent's refusal quotes what the request named.
                eprintln!("gracewatch: {}", terminal_safe(&e.to_string()));
                return exit::of_client_error(&e);
            }
        }
    };

    let mut failures = 0;
    loop {
        let followed = tokio::select! {
            r = client.follow_drain(&id, |line| print_line(line, json)) => r,
            () = &mut interrupted => {
                return match client.cancel_drain(&id).await {
                    Ok(DrainStatus { report: Some(report), .. }) => {
                        print_report(&report, json);
                        exit::of(report.outcome)
                    }
                    Ok(_) => {
                        eprintln!("gracewatch: interrupted; drain {id} was cancelled on the agent");
                        exit::INTERRUPTED
                    }
                    Err(e) => {
                        eprintln!("gracewatch: interrupted, but cancelling drain {id} on the agent failed: {e}");
                        exit::INTERRUPTED
                    }
                };
            }
        };
        match followed {
            Ok(Some(report)) => return exit::of(report.outcome),
            Err(e @ ClientError::Refused { .. }) => {
                eprintln!("gracewatch: following drain {id}: {e}");
                return exit::RUNTIME;
            }
            Ok(None) | Err(ClientError::Transport(_)) => {
                failures += 1;
                if failures > RECONNECTS {
                    eprintln!(
                        "gracewatch: lost contact with the agent at {url}; drain {id} may still be running there"
                    );
                    return exit::RUNTIME;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_endpoints() {
        let c = AgentClient::new("http://127.0.0.1:9464", None).expect("tcp");
        assert!(matches!(&c.endpoint, Endpoint::Tcp(a) if a == "127.0.0.1:9464"));
        assert_eq!((c.host.as_str(), c.base.as_str()), ("127.0.0.1:9464", ""));
        let c = AgentClient::new("http://[::1]:9464/gw/", None).expect("v6 with prefix");
        assert!(matches!(&c.endpoint, Endpoint::Tcp(a) if a == "[::1]:9464"));
        assert_eq!(c.base, "/gw");
        let c = AgentClient::new("http://agent.local", None).expect("default port");
        assert!(matches!(&c.endpoint, Endpoint::Tcp(a) if a == "agent.local:80"));
        for unix in ["unix:/run/gw.sock", "unix:///run/gw.sock"] {
            let c = AgentClient::new(unix, None).expect("unix");
            assert!(matches!(&c.endpoint, Endpoint::Unix(p) if p == Path::new("/run/gw.sock")));
        }
        for bad in [
            "https://x:1",
            "ftp://x",
            "127.0.0.1:9464",
            "http://",
            "http://u:p@x:1",
            "unix:",
            "http://x:1/?a=b",
        ] {
            assert!(AgentClient::new(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn refusals_map_to_exit_codes() {
        let r = |status| ClientError::Refused {
            status,
            message: String::new(),
        };
        assert_eq!(
            exit::of_client_error(&r(StatusCode::BAD_REQUEST)),
            exit::USAGE
        );
        assert_eq!(
            exit::of_client_error(&r(StatusCode::UNAUTHORIZED)),
            exit::CANNOT_MONITOR
        );
        assert_eq!(
            exit::of_client_error(&r(StatusCode::FORBIDDEN)),
            exit::CANNOT_MONITOR
        );
        assert_eq!(
            exit::of_client_error(&r(StatusCode::TOO_MANY_REQUESTS)),
            exit::RUNTIME
        );
        assert_eq!(
            exit::of_client_error(&r(StatusCode::SERVICE_UNAVAILABLE)),
            exit::RUNTIME
        );
        let t = ClientError::Transport(anyhow::anyhow!("refused"));
        assert_eq!(exit::of_client_error(&t), exit::RUNTIME);
    }
}
