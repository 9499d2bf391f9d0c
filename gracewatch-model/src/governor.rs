//! The generation governor's decision: given one [`Status`], the rules and
//! the generations already acted on, which draining generations of which
//! listeners are past a limit and should get the governor's signal, and
//! why. Pure (no clock, no /proc, no signal): the agent's governor
//! (`gracewatch_core::drain::governor`) pins, checks and signals what this
//! names.
//!
//! It fails closed. A generation is only named when the status is sure it
//! drains: its entry among the listener's generations *and* its process
//! entry both say `draining`, and a newer generation of the same listener
//! serves (so the listener keeps a server: a lone process that drains, e.g.
//! under a `gracewatch drain`, is never cut). A serving, drained or exited
//! generation, or one whose process entry is missing, is never named.
//!
//! The limits, per listener:
//! - `max_draining`: more than N generations draining → the oldest ones
//!   (in the listener's generation order, oldest first) beyond N. A named
//!   generation keeps counting until it is gone: one that ignores the
//!   signal is not replaced by the next one (no escalation to newer
//!   generations);
//! - `max_age`: a generation draining for at least this long (since
//!   `role_since_ms`, when its drain started).

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use crate::{
    event::NetNs,
    tracker::{Status, restart::Role},
};

/// What the governor enforces (at least one limit, or it names nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GovernorRules {
    /// At most this many draining generations per listener.
    pub max_draining: Option<u32>,
    /// At most this long draining.
    pub max_age: Option<Duration>,
    /// Only listeners on these local ports (empty: every listener).
    pub ports: Vec<u16>,
}

/// Which limit a generation is past.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    MaxDraining,
    MaxAge,
}

impl Reason {
    pub const ALL: [Reason; 2] = [Reason::MaxDraining, Reason::MaxAge];

    /// As metrics labels and event lines spell it.
    pub fn code(self) -> &'static str {
        match self {
            Self::MaxDraining => "max_draining",
            Self::MaxAge => "max_age",
        }
    }
}

/// One generation to signal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub pid: u32,
    pub comm: String,
    /// The listener whose limit it is past.
    pub netns: NetNs,
    pub listener: SocketAddr,
    pub reason: Reason,
    /// Generations of that listener draining now (itself included).
    pub draining: u32,
    /// How long it has been draining.
    pub draining_ms: u64,
}

/// The generations of `status` past a limit of `rules` at `now_ms` (the
/// status's clock: ms since the monitor started), leaving out the pids in
/// `done` (already signalled, or given up on). Each pid is named at most
/// once, for the first listener (in status order) that names it; within a
/// listener, oldest first. `max_draining` wins over `max_age` when both
/// apply.
pub fn decide(
    status: &Status,
    now_ms: u64,
    rules: &GovernorRules,
    done: &BTreeSet<u32>,
) -> Vec<Decision> {
    let mut out: Vec<Decision> = Vec::new();
    if rules.max_draining.is_none() && rules.max_age.is_none() {
        return out;
    }
    let process_draining = |pid: u32| {
        status
            .processes
            .iter()
            .any(|p| p.pid == pid && p.role == Role::Draining)
    };
    for l in &status.listeners {
        if !rules.ports.is_empty() && !rules.ports.contains(&l.address.port()) {
            continue;
        }
        let gens = &l.generations;
        let draining: Vec<usize> = (0..gens.len())
            .filter(|&i| gens[i].role == Role::Draining)
            .collect();
        let count = u32::try_from(draining.len()).unwrap_or(u32::MAX);
        let over = rules
            .max_draining
            .map_or(0, |n| count.saturating_sub(n) as usize);
        for (k, &i) in draining.iter().enumerate() {
            let g = &gens[i];
            let age = now_ms.saturating_sub(g.role_since_ms);
            let reason = if k < over {
                Reason::MaxDraining
            } else if rules
                .max_age
                .is_some_and(|max| u128::from(age) >= max.as_millis())
            {
                Reason::MaxAge
            } else {
                continue;
            };
            let newer_serves = gens[i + 1..]
                .iter()
                .any(|n| n.role == Role::Serving && n.pid != g.pid);
            if !newer_serves
                || !process_draining(g.pid)
                || done.contains(&g.pid)
                || out.iter().any(|d| d.pid == g.pid)
            {
                continue;
            }
            out.push(Decision {
                pid: g.pid,
                comm: g.comm.clone(),
                netns: l.netns,
                listener: l.address,
                reason,
                draining: count,
                draining_ms: age,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::{Family, GenerationStatus, ListenerStatus, ProcessStatus, STATUS_SCHEMA};

    /// A generation: pid, role, draining since (ms).
    type Gen = (u32, Role, u64);

    const L: &str = "127.0.0.1:8080";
    const OTHER: &str = "127.0.0.1:9090";

    /// A listener `addr` with generations (pid, role, draining since ms),
    /// oldest first; processes agree on the roles unless `disagree` names a
    /// pid whose process entry says otherwise (or is missing: `None`).
    fn status(listeners: &[(&str, &[Gen])], disagree: &[(u32, Option<Role>)]) -> Status {
        let mut processes: Vec<ProcessStatus> = Vec::new();
        let mut ls = Vec::new();
        for (addr, gens) in listeners {
            let address: SocketAddr = addr.parse().expect("an address");
            for &(pid, role, since) in *gens {
                if processes.iter().any(|p| p.pid == pid) {
                    continue;
                }
                let role = match disagree.iter().find(|d| d.0 == pid) {
                    Some((_, None)) => continue,
                    Some((_, Some(r))) => *r,
                    None => role,
                };
                processes.push(ProcessStatus {
                    pid,
                    comm: format!("srv{pid}"),
                    live: 1,
                    listeners: vec![],
                    accepted_total: 0,
                    closed_total: 0,
                    oldest_live_ms: None,
                    role,
                    role_since_ms: since,
                    cgroup: None,
                    container_id: None,
                    pod_uid: None,
                });
            }
            ls.push(ListenerStatus {
                netns: 7,
                address,
                family: Family::of(address),
                holders: vec![],
                accept_queue: 0,
                accepted_total: 0,
                queue_drops_total: 0,
                generations: gens
                    .iter()
                    .map(|&(pid, role, since)| GenerationStatus {
                        pid,
                        comm: format!("srv{pid}"),
                        role,
                        role_since_ms: since,
                        live: 1,
                    })
                    .collect(),
            });
        }
        Status {
            schema: STATUS_SCHEMA.to_owned(),
            uptime_ms: 10_000,
            processes,
            listeners: ls,
            lost_events: 0,
            map_full_total: 0,
        }
    }

    fn rules(max_draining: Option<u32>, max_age_ms: Option<u64>, ports: &[u16]) -> GovernorRules {
        GovernorRules {
            max_draining,
            max_age: max_age_ms.map(Duration::from_millis),
            ports: ports.to_vec(),
        }
    }

    use Role::{Drained, Draining as D, Exited, Serving as S};

    #[test]
    fn the_table() {
        // Five reloads: generations 1-5 draining, 6 serving.
        let five: &[Gen] = &[
            (1, D, 1000),
            (2, D, 2000),
            (3, D, 3000),
            (4, D, 4000),
            (5, D, 5000),
            (6, S, 5000),
        ];
        let none = BTreeSet::new();
        #[allow(clippy::type_complexity)]
        let cases: &[(&str, Status, GovernorRules, &[u32], u64, &[(u32, Reason)])] = &[
            (
                "max 2 of 5: the three oldest",
                status(&[(L, five)], &[]),
                rules(Some(2), None, &[]),
                &[],
                9000,
                &[
                    (1, Reason::MaxDraining),
                    (2, Reason::MaxDraining),
                    (3, Reason::MaxDraining),
                ],
            ),
            (
                "already signalled ones still count and are not replaced",
                status(&[(L, five)], &[]),
                rules(Some(2), None, &[]),
                &[1, 2],
                9000,
                &[(3, Reason::MaxDraining)],
            ),
            (
                "all signalled: nothing",
                status(&[(L, five)], &[]),
                rules(Some(2), None, &[]),
                &[1, 2, 3],
                9000,
                &[],
            ),
            (
                "at the limit: nothing",
                status(&[(L, &[(4, D, 1), (5, D, 2), (6, S, 2)])], &[]),
                rules(Some(2), None, &[]),
                &[],
                9000,
                &[],
            ),
            (
                "serving, drained and exited generations do not count and are never named",
                status(
                    &[(
                        L,
                        &[
                            (1, Exited, 0),
                            (2, Drained, 0),
                            (3, S, 0),
                            (4, D, 0),
                            (5, S, 0),
                        ],
                    )],
                    &[],
                ),
                rules(Some(0), Some(0), &[]),
                &[],
                9000,
                &[(4, Reason::MaxDraining)],
            ),
            (
                "max 0: every draining generation",
                status(&[(L, &[(1, D, 0), (2, D, 0), (3, S, 0)])], &[]),
                rules(Some(0), None, &[]),
                &[],
                9000,
                &[(1, Reason::MaxDraining), (2, Reason::MaxDraining)],
            ),
            (
                "max age: only those draining that long (the boundary included)",
                status(&[(L, five)], &[]),
                rules(None, Some(5000), &[]),
                &[],
                9000,
                &[
                    (1, Reason::MaxAge),
                    (2, Reason::MaxAge),
                    (3, Reason::MaxAge),
                    (4, Reason::MaxAge),
                ],
            ),
            (
                "both: the count first, then the age",
                status(&[(L, five)], &[]),
                rules(Some(3), Some(6000), &[]),
                &[],
                9000,
                &[
                    (1, Reason::MaxDraining),
                    (2, Reason::MaxDraining),
                    (3, Reason::MaxAge),
                ],
            ),
            (
                "no newer serving generation: the listener would lose its server",
                status(&[(L, &[(1, D, 0), (2, D, 0), (3, D, 0)])], &[]),
                rules(Some(1), Some(0), &[]),
                &[],
                9000,
                &[],
            ),
            (
                "a serving generation older than the draining ones does not count",
                status(&[(L, &[(9, S, 0), (1, D, 0), (2, D, 0)])], &[]),
                rules(Some(0), None, &[]),
                &[],
                9000,
                &[],
            ),
            (
                "the process entry disagrees or is missing: left alone (fail closed)",
                status(
                    &[(L, &[(1, D, 0), (2, D, 0), (3, D, 0), (4, S, 0)])],
                    &[(1, Some(S)), (2, None)],
                ),
                rules(Some(0), None, &[]),
                &[],
                9000,
                &[(3, Reason::MaxDraining)],
            ),
            (
                "scoped to a port: other listeners are not governed",
                status(
                    &[
                        (OTHER, &[(11, D, 0), (12, D, 0), (13, S, 0)]),
                        (L, &[(1, D, 0), (2, D, 0), (3, S, 0)]),
                    ],
                    &[],
                ),
                rules(Some(1), None, &[8080]),
                &[],
                9000,
                &[(1, Reason::MaxDraining)],
            ),
            (
                "every listener without ports; a pid named once",
                status(
                    &[
                        (OTHER, &[(1, D, 0), (12, D, 0), (13, S, 0)]),
                        (L, &[(1, D, 0), (2, D, 0), (3, S, 0)]),
                    ],
                    &[],
                ),
                rules(Some(1), None, &[]),
                &[],
                9000,
                &[(1, Reason::MaxDraining)],
            ),
            (
                "no limit: nothing",
                status(&[(L, five)], &[]),
                rules(None, None, &[]),
                &[],
                9000,
                &[],
            ),
        ];
        for (name, st, rules, done, now, want) in cases {
            let done: BTreeSet<u32> = done.iter().copied().collect();
            let got: Vec<(u32, Reason)> = decide(st, *now, rules, &done)
                .into_iter()
                .map(|d| (d.pid, d.reason))
                .collect();
            assert_eq!(&got, want, "{name}");
        }
        // What a decision says about its listener.
        let d = decide(
            &status(&[(L, five)], &[]),
            9000,
            &rules(Some(2), None, &[]),
            &none,
        );
        assert_eq!(d[0].listener, L.parse::<SocketAddr>().expect("addr"));
        assert_eq!((d[0].netns, d[0].draining, d[0].draining_ms), (7, 5, 8000));
        assert_eq!(d[0].comm, "srv1");
    }
}
