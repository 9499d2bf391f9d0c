//! Plays a recording (what the hidden `gracewatch record` prints: one event
//! per line) through the library and prints what the agent serves for it:
//! `/v1/status` (the `status --json` object) and `/metrics`. The replay
//! clock comes from the events, so the output is the same on every run: run
//! it on two commits and `diff` the outputs to show that a change left the
//! JSON and metrics contracts byte for byte as they were.
//!
//! `cargo run --example replay_dump -- RECORDING`

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
    let handle = MonitorHandle::from_replay(events, Snapshot::default());
    handle.sync().await?;
    let agent = Agent::new(None);
    anyhow::ensure!(agent.set_monitor(handle), "the agent took no monitor");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(agent.serve_tcp(listener));
    let client = AgentClient::new(&url, None)?;
    for path in ["/v1/status", "/metrics"] {
        let (status, body) = client
            .request(Method::GET, path, None, std::time::Duration::from_secs(30))
            .await?;
        println!("== GET {path} ({status})");
        println!("{}", String::from_utf8_lossy(&body).trim_end());
    }
    Ok(())
}
