//! Plays a recording (what the hidden `gracewatch record` prints: one event
//! per line) through the library and prints what the agent serves for it:
//! `/v1/status` (the `status --json` object) after every `CHUNK` events
//! (default 20,000) and `/metrics` at the end. Run it on two commits and
//! `diff` the outputs to show that a change left the JSON and metrics
//! contracts byte for byte as they were. Two things differ between any two
//! runs and must be masked first: clock readings (the replay clock runs on in
//! real time after the last event: `uptime_ms`, `oldest_live_ms`, the
//! `_seconds` ages), and the order of one metric family's samples
//! (prometheus-client keeps label sets in a hash map).
//!
//! `cargo run --example replay_dump -- RECORDING [CHUNK]`

use gracewatch::{
    agent::{Agent, AgentClient},
    event::{ConnEvent, Snapshot},
    monitor::MonitorHandle,
};
use hyper::Method;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: replay_dump RECORDING"))?;
    let text = std::fs::read_to_string(&path)?;
    let events = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str::<ConnEvent>)
        .collect::<Result<Vec<_>, _>>()?;
    let chunk: usize = match std::env::args().nth(2) {
        Some(n) => n.parse()?,
        None => 20_000,
    };
    let (handle, feed) = MonitorHandle::from_replay_with_feed(Vec::new(), Snapshot::default());
    let agent = Agent::new(None);
    anyhow::ensure!(
        agent.set_monitor(handle.clone()),
        "the agent took no monitor"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(agent.serve_tcp(listener));
    let client = AgentClient::new(&url, None)?;
    for (i, part) in events.chunks(chunk.max(1)).enumerate() {
        for ev in part {
            feed.send(ev.clone())?;
        }
        handle.sync().await?;
        let (status, body) = client
            .request(
                Method::GET,
                "/v1/status",
                None,
                std::time::Duration::from_secs(30),
            )
            .await?;
        println!(
            "== after {} events: GET /v1/status ({status})",
            i * chunk + part.len()
        );
        println!("{}", String::from_utf8_lossy(&body).trim_end());
    }
    for path in ["/metrics"] {
        let (status, body) = client
            .request(Method::GET, path, None, std::time::Duration::from_secs(30))
            .await?;
        println!("== GET {path} ({status})");
        println!("{}", String::from_utf8_lossy(&body).trim_end());
    }
    Ok(())
}
