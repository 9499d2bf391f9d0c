//! Embedding gracewatch in your own program: start a monitor, subscribe to
//! status updates, request a drain and await its outcome — directly, and
//! through an in-process agent's HTTP API. This is the API the CLI uses.
//!
//! ```text
//! cargo run --example embed            # as root: watches the kernel
//! cargo run --example embed            # unprivileged: a replay monitor
//! ```
//!
//! Without the privileges to load eBPF programs it falls back to a replay
//! monitor (no kernel, recorded events), so it runs anywhere. Either way it
//! drains two child `sleep` processes that hold no connections: each is
//! signalled as soon as the drain starts, and the reports are printed.

use std::{process::Command, time::Duration};

use gracewatch::{
    agent::{Agent, AgentClient, DrainRequest},
    drain::{self, DrainSpec, TargetSpec},
    event::Snapshot,
    monitor::{Monitor, MonitorError, MonitorHandle, SourceOptions},
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // 1. Start a monitor: attach the programs, take the startup snapshot.
    let handle = match Monitor::spawn(SourceOptions::default()) {
        Ok(handle) => handle,
        Err(MonitorError::CannotMonitor(why)) => {
            eprintln!("embed: no kernel monitor ({why});\nembed: using a replay monitor instead");
            MonitorHandle::from_replay(Vec::new(), Snapshot::default())
        }
        Err(e) => return Err(e.into()),
    };
    let status = handle.status();
    println!(
        "{} process(es) hold listeners or live connections, {} listener(s)",
        status.processes.len(),
        status.listeners.len()
    );

    // 2. Subscribe: a new Status arrives after every batch of kernel events.
    let mut updates = handle.subscribe();
    let watcher = tokio::spawn(async move {
        while updates.changed().await.is_ok() {
            let status = updates.borrow_and_update().clone();
            let live: u64 = status.processes.iter().map(|p| p.live).sum();
            eprintln!("embed: status update: {live} live connection(s) in all");
        }
    });

    // 3. Drain a process and await the outcome (what `gracewatch drain` does).
    let mut first = Command::new("sleep").arg("30").spawn()?;
    let targets = drain::choose(&TargetSpec {
        pids: vec![first.id()],
        ..TargetSpec::default()
    })?;
    let spec = DrainSpec {
        timeout: Some(Duration::from_secs(10)),
        ..DrainSpec::default()
    };
    let interrupted = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let report = drain::run(
        &handle,
        targets,
        &spec,
        |p| eprintln!("embed: {}", p.message),
        interrupted,
    )
    .await;
    println!("direct drain: {}", serde_json::to_string(&report)?);
    first.wait()?;

    // 4. The same through an agent served in-process (what a deploy hook in
    //    another container would do with `gracewatch drain --agent`).
    let token = format!("{:x}", std::process::id().wrapping_mul(2_654_435_761));
    let agent = Agent::new(Some(token.clone()));
    agent.set_monitor(handle.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(agent.clone().serve_tcp(listener));
    let mut second = Command::new("sleep").arg("30").spawn()?;
    let client = AgentClient::new(&url, Some(token))?;
    let report = client
        .run_drain(&DrainRequest {
            pids: vec![second.id()],
            timeout: Some("10s".to_owned()),
            ..DrainRequest::default()
        })
        .await?;
    println!(
        "drain through the agent at {url}: {}",
        serde_json::to_string(&report)?
    );
    second.wait()?;

    agent.shutdown().await;
    server.await??;
    watcher.abort();
    Ok(())
}
