//! The per-connection activity report shared by `gracewatch connections`
//! and the agent's `/v1/connections`: each live connection of chosen
//! processes with how long it has been idle and what is in flight, read on
//! demand through [`MonitorHandle::activity`] (never on a tick). Its JSON
//! is `gracewatch.connections.v1` (gracewatch/schema/connections.schema.json).

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    display::terminal_safe,
    event::ConnActivity,
    monitor::{MAX_ACTIVITY_CONNECTIONS, MonitorHandle, monotonic_now},
};

/// The answer: the pids asked about and their live connections, oldest first.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionsReport {
    pub schema: &'static str,
    pub pids: Vec<u32>,
    /// Live connections the pids hold, including any past the cap.
    pub total: u64,
    /// At most this many (the oldest) are read and listed.
    pub max_listed: u64,
    pub connections: Vec<Connection>,
}

/// One live connection and what it is doing.
#[derive(Clone, Debug, Serialize)]
pub struct Connection {
    /// A process holding it.
    pub pid: u32,
    /// Network namespace inode.
    pub netns: u32,
    /// The server side, `ip:port`.
    pub local: String,
    /// The client, `ip:port` (hidden from agent readers that may not see peers).
    pub peer: String,
    /// Age in milliseconds (a lower bound for connections older than the monitor).
    pub age_ms: u64,
    /// `null`: the kernel no longer shows it (it just closed) or its
    /// namespace could not be entered.
    pub activity: Option<ConnActivity>,
}

/// Reads what the live connections of `pids` are doing now.
pub async fn report(handle: &MonitorHandle, pids: &[u32]) -> anyhow::Result<ConnectionsReport> {
    let read = handle.activity(pids).await?;
    let now = monotonic_now();
    let connections = read
        .connections
        .into_iter()
        .map(|(c, activity)| Connection {
            pid: c.holders.first().copied().unwrap_or(0),
            netns: c.tuple.netns,
            local: c.tuple.local.to_string(),
            peer: c.tuple.remote.to_string(),
            age_ms: u64::try_from(now.saturating_sub(c.since).as_millis()).unwrap_or(u64::MAX),
            activity,
        })
        .collect();
    Ok(ConnectionsReport {
        schema: "gracewatch.connections.v1",
        pids: pids.to_vec(),
        total: read.total,
        max_listed: MAX_ACTIVITY_CONNECTIONS as u64,
        connections,
    })
}

/// Milliseconds as the tables show them: `850ms`, `12.3s`, `4m05s`.
pub fn short_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    }
}

/// What is in flight, for a table: `-` if nothing, else the byte counts.
pub fn in_flight_text(a: &ConnActivity) -> String {
    if !a.in_flight {
        return "-".to_owned();
    }
    let mut parts = Vec::new();
    if a.unread_bytes > 0 {
        parts.push(format!("{}B unread", a.unread_bytes));
    }
    match (a.unsent_bytes, a.unacked_bytes) {
        (Some(unsent), Some(unacked)) => {
            if unacked > 0 {
                parts.push(format!("{unacked}B unacked"));
            }
            if unsent > 0 {
                parts.push(format!("{unsent}B unsent"));
            }
        }
        // An older kernel: only the whole send queue is known.
        _ => parts.push("sending".to_owned()),
    }
    parts.join(", ")
}

/// The human table of `gracewatch connections`.
pub fn table(r: &ConnectionsReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>8}  {:<24} {:<24} {:>8} {:>8}  IN FLIGHT",
        "PID", "LOCAL", "PEER", "AGE", "IDLE"
    );
    for c in &r.connections {
        let (idle, flight) = match &c.activity {
            Some(a) => (
                a.idle_ms.map_or_else(|| "?".to_owned(), short_ms),
                in_flight_text(a),
            ),
            None => ("?".to_owned(), "?".to_owned()),
        };
        let _ = writeln!(
            out,
            "{:>8}  {:<24} {:<24} {:>8} {:>8}  {}",
            c.pid,
            terminal_safe(&c.local),
            terminal_safe(&c.peer),
            short_ms(c.age_ms),
            idle,
            flight
        );
    }
    if r.total > r.connections.len() as u64 {
        let _ = writeln!(
            out,
            "({} more not read: at most the {} oldest are)",
            r.total - r.connections.len() as u64,
            r.max_listed
        );
    }
    out
}
