//! The "who pins it" report shared by `gracewatch connections --by-peer`
//! and the agent's `/v1/peers`: chosen processes' live connections grouped
//! by peer (address, or network when there are many, see
//! [`crate::peers`]), each group with its count, its oldest connection and,
//! when naming is asked for, the processes on this host holding the other
//! ends ([`MonitorHandle::peers`]). Its JSON is `gracewatch.peers.v1`
//! (gracewatch/schema/peers.schema.json).

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    display::terminal_safe,
    monitor::{MonitorHandle, PeerWalkCost, monotonic_now},
    peers::PeerGroupView,
};

/// Most groups listed (the largest; the rest are counted in `other`).
pub const MAX_PEER_GROUPS: usize = 32;

/// The answer.
#[derive(Clone, Debug, Serialize)]
pub struct PeersReport {
    pub schema: &'static str,
    pub pids: Vec<u32>,
    /// Live connections the pids hold.
    pub total: u64,
    /// Connections in groups past `max_groups`, not listed.
    pub other: u64,
    pub max_groups: u64,
    /// Most connections first, then the oldest.
    pub groups: Vec<PeerGroupView>,
    /// What naming the peer processes cost; `null` when it did not run
    /// (not asked for, no connection, or a reader that may not see peers).
    pub walk: Option<PeerWalkCost>,
}

/// Groups the live connections of `pids` by peer now; with `name`, also
/// looks for the processes holding the other ends on this host.
pub async fn report(
    handle: &MonitorHandle,
    pids: &[u32],
    name: bool,
) -> anyhow::Result<PeersReport> {
    let read = handle.peers(pids, &[], &[], MAX_PEER_GROUPS, name).await?;
    let now = monotonic_now();
    Ok(PeersReport {
        schema: "gracewatch.peers.v1",
        pids: pids.to_vec(),
        total: read.grouping.total,
        other: read.grouping.other,
        max_groups: MAX_PEER_GROUPS as u64,
        groups: read.grouping.groups.iter().map(|g| g.view(now)).collect(),
        walk: read.walk,
    })
}

/// The processes of a group for a table: `1234 nginx (3), 99 curl (1)`,
/// `+N not found` for the rest, `-` when nobody looked.
pub fn processes_text(g: &PeerGroupView) -> String {
    let Some(procs) = &g.peer_processes else {
        return "-".to_owned();
    };
    let mut parts: Vec<String> = procs
        .iter()
        .map(|p| {
            let mut s = format!("{} {} ({})", p.pid, terminal_safe(&p.comm), p.connections);
            if let Some(id) = &p.container_id {
                let short: String = id.chars().take(12).collect();
                let _ = write!(s, " [{}]", terminal_safe(&short));
            }
            s
        })
        .collect();
    match g.unnamed {
        Some(n) if n > 0 && parts.is_empty() => parts.push(format!("not on this host ({n})")),
        Some(n) if n > 0 => parts.push(format!("+{n} not found")),
        _ => {}
    }
    if parts.is_empty() {
        return "-".to_owned();
    }
    parts.join(", ")
}

/// One group as the human drain output ends with (local and `--agent`).
pub fn drain_line(g: &PeerGroupView) -> String {
    format!(
        "gracewatch:   from {}: {} connection(s), oldest {:.1}s; peer processes: {}",
        terminal_safe(&g.peer),
        g.connections,
        g.oldest_age_ms as f64 / 1000.0,
        processes_text(g)
    )
}

/// The human table of `gracewatch connections --by-peer`.
pub fn table(r: &PeersReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:>7} {:>8}  PEER PROCESSES",
        "PEER", "CONNS", "OLDEST"
    );
    for g in &r.groups {
        let _ = writeln!(
            out,
            "{:<28} {:>7} {:>8}  {}",
            terminal_safe(&g.peer),
            g.connections,
            crate::connections::short_ms(g.oldest_age_ms),
            processes_text(g)
        );
    }
    if r.other > 0 {
        let _ = writeln!(
            out,
            "({} more connection(s) in smaller groups: at most {} groups are listed)",
            r.other, r.max_groups
        );
    }
    if let Some(w) = &r.walk {
        if w.bounded {
            let _ = writeln!(
                out,
                "(the search for peer processes stopped at its bound after {} ms; some are not named)",
                w.took_ms
            );
        }
    }
    out
}
