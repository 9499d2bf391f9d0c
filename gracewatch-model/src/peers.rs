//! Who pins a process: its live connections grouped by peer address, with
//! each group's count and oldest connection, and (once the monitor has
//! looked for the other ends on this host) the processes holding them.
//!
//! Pure: the tracker hands in each connection's peer address and since
//! when it is live, the core hands in what its walk found; nothing here
//! reads the kernel or a clock. The grouping is bounded whatever the
//! number of peers: exact addresses while they fit in `max_groups`, else
//! /24 (IPv4) and /64 (IPv6) networks, else /16 and /48, and past that the
//! largest groups, with the rest counted in [`PeerGrouping::other`]. An
//! IPv4-mapped IPv6 peer (`::ffff:a.b.c.d`, a dual-stack listener's IPv4
//! client) is the IPv4 address: one client is one group whichever socket
//! the server listens on.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Prefix lengths tried in turn, (IPv4, IPv6), until the groups fit.
const LEVELS: [(u8, u8); 3] = [(32, 128), (24, 64), (16, 48)];

/// Most processes named per group (the others are counted in `unnamed`).
pub const MAX_PROCESSES_PER_GROUP: usize = 8;

/// A process holding the other end of some of a group's connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerProcess {
    pub pid: u32,
    pub comm: String,
    /// From its cgroup path (see [`crate::cgroup::container_id`]).
    pub container_id: Option<String>,
    /// Its cgroup v2 path, if it could be read.
    pub cgroup: Option<String>,
    /// Connections of the group whose other end it holds.
    pub connections: u64,
}

/// Connections from one peer address or network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerGroup {
    /// The address (prefix 32 or 128) or the network's first address.
    pub net: IpAddr,
    pub prefix: u8,
    /// Distinct peer addresses in it.
    pub addresses: u64,
    pub count: u64,
    /// Since when its oldest connection is live (the tracker's time).
    pub oldest_since: Duration,
    /// Processes on this host holding the other ends, most connections
    /// first; `None` until [`PeerGrouping::name`] is given what the walk
    /// found (progress lines never look).
    pub processes: Option<Vec<PeerProcess>>,
    /// Of the connections looked for, those whose other end was not found
    /// on this host (a remote peer, a peer in another namespace, a race,
    /// the walk's bounds) or whose holder was past
    /// [`MAX_PROCESSES_PER_GROUP`]; `None` like `processes`.
    pub unnamed: Option<u64>,
}

/// A group as the JSON outputs show it (`gracewatch connections --by-peer`,
/// `/v1/peers`, the drain's `peers`): one serializer for all of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerGroupView {
    /// The address, or the network as `addr/len`.
    pub peer: String,
    pub prefix_len: u8,
    /// Distinct peer addresses in the group.
    pub addresses: u64,
    /// Live connections from it.
    pub connections: u64,
    /// Age of its oldest connection, in milliseconds.
    pub oldest_age_ms: u64,
    /// See [`PeerGroup::processes`] (named apart from a status's
    /// `processes`, so that the agent can hide it by its key).
    pub peer_processes: Option<Vec<PeerProcess>>,
    /// See [`PeerGroup::unnamed`].
    pub unnamed: Option<u64>,
}

impl PeerGroup {
    /// The group as the outputs show it, ages measured at `now` (the
    /// tracker's clock).
    pub fn view(&self, now: Duration) -> PeerGroupView {
        PeerGroupView {
            peer: self.peer(),
            prefix_len: self.prefix,
            addresses: self.addresses,
            connections: self.count,
            oldest_age_ms: u64::try_from(now.saturating_sub(self.oldest_since).as_millis())
                .unwrap_or(u64::MAX),
            peer_processes: self.processes.clone(),
            unnamed: self.unnamed,
        }
    }

    /// `a.b.c.d`, `a.b.c.0/24`, `2001:db8::/64`.
    pub fn peer(&self) -> String {
        if self.prefix == full_prefix(&self.net) {
            self.net.to_string()
        } else {
            format!("{}/{}", self.net, self.prefix)
        }
    }

    /// Whether `ip` (IPv4-mapped addresses as IPv4) is in this group.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.net.is_ipv4() && network(ip, self.prefix) == self.net
    }
}

/// A process's live connections by peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerGrouping {
    /// Most connections first, then the oldest, then by address; at most
    /// the `max_groups` asked for.
    pub groups: Vec<PeerGroup>,
    /// Connections grouped, including those in `other`.
    pub total: u64,
    /// Connections in groups past `max_groups` (0 if every group is listed).
    pub other: u64,
}

impl PeerGrouping {
    /// Counts what a walk found for the other ends of some connections:
    /// each peer address with the process holding that end, or `None` if
    /// it was looked for and not found. Every group gets `processes` and
    /// `unnamed` (empty and 0 if none of its connections was looked for).
    pub fn name(&mut self, ends: impl IntoIterator<Item = (IpAddr, Option<PeerProcess>)>) {
        for g in &mut self.groups {
            g.processes.get_or_insert_with(Vec::new);
            g.unnamed.get_or_insert(0);
        }
        for (ip, end) in ends {
            let Some(g) = self.groups.iter_mut().find(|g| g.contains(ip)) else {
                continue;
            };
            let (Some(procs), Some(unnamed)) = (&mut g.processes, &mut g.unnamed) else {
                continue;
            };
            match end {
                Some(p) => {
                    let full = procs.len() >= MAX_PROCESSES_PER_GROUP;
                    match procs.iter_mut().find(|q| q.pid == p.pid) {
                        Some(q) => q.connections += 1,
                        None if !full => procs.push(PeerProcess {
                            connections: 1,
                            ..p
                        }),
                        None => *unnamed += 1,
                    }
                }
                None => *unnamed += 1,
            }
        }
        for g in &mut self.groups {
            if let Some(procs) = &mut g.processes {
                procs.sort_by(|a, b| b.connections.cmp(&a.connections).then(a.pid.cmp(&b.pid)));
            }
        }
    }
}

fn full_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// The first address of `ip`'s network of `prefix` bits.
fn network(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & mask))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & mask))
        }
    }
}

/// Groups connections, each given as (peer address, since when live), by
/// peer: see the module documentation for how the groups stay within
/// `max_groups` (at least 1).
pub fn group(
    conns: impl IntoIterator<Item = (IpAddr, Duration)>,
    max_groups: usize,
) -> PeerGrouping {
    let max_groups = max_groups.max(1);
    // One entry per distinct address: (count, oldest).
    let mut by_addr: HashMap<IpAddr, (u64, Duration)> = HashMap::new();
    let mut total = 0u64;
    for (ip, since) in conns {
        total += 1;
        let e = by_addr.entry(ip.to_canonical()).or_insert((0, since));
        e.0 += 1;
        e.1 = e.1.min(since);
    }
    let mut groups = Vec::new();
    for (i, &(v4, v6)) in LEVELS.iter().enumerate() {
        let mut nets: HashMap<(IpAddr, u8), PeerGroup> = HashMap::new();
        for (&ip, &(count, since)) in &by_addr {
            let prefix = if ip.is_ipv4() { v4 } else { v6 };
            let net = network(ip, prefix);
            let g = nets.entry((net, prefix)).or_insert(PeerGroup {
                net,
                prefix,
                addresses: 0,
                count: 0,
                oldest_since: since,
                processes: None,
                unnamed: None,
            });
            g.addresses += 1;
            g.count += count;
            g.oldest_since = g.oldest_since.min(since);
        }
        if nets.len() <= max_groups || i + 1 == LEVELS.len() {
            groups = nets.into_values().collect();
            break;
        }
    }
    groups.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(a.oldest_since.cmp(&b.oldest_since))
            .then((a.net, a.prefix).cmp(&(b.net, b.prefix)))
    });
    let other = groups
        .get(max_groups..)
        .unwrap_or_default()
        .iter()
        .map(|g| g.count)
        .sum();
    groups.truncate(max_groups);
    PeerGrouping {
        groups,
        total,
        other,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// (peer, count, addresses, oldest since in s) of each group, in order.
    fn summary(g: &PeerGrouping) -> Vec<(String, u64, u64, u64)> {
        g.groups
            .iter()
            .map(|g| (g.peer(), g.count, g.addresses, g.oldest_since.as_secs()))
            .collect()
    }

    #[test]
    fn grouping_table() {
        struct Case {
            name: &'static str,
            conns: Vec<(&'static str, u64)>,
            max: usize,
            want: Vec<(&'static str, u64, u64, u64)>,
            other: u64,
        }
        let cases = [
            Case {
                name: "nothing",
                conns: vec![],
                max: 10,
                want: vec![],
                other: 0,
            },
            Case {
                name: "exact addresses while they fit: most connections first",
                conns: vec![
                    ("10.0.0.1", 5),
                    ("10.0.0.2", 3),
                    ("10.0.0.2", 4),
                    ("::1", 9),
                ],
                max: 10,
                want: vec![
                    ("10.0.0.2", 2, 1, 3),
                    ("10.0.0.1", 1, 1, 5),
                    ("::1", 1, 1, 9),
                ],
                other: 0,
            },
            Case {
                name: "equal counts: the oldest first, then the address",
                conns: vec![("10.0.0.3", 7), ("10.0.0.1", 2), ("10.0.0.2", 7)],
                max: 10,
                want: vec![
                    ("10.0.0.1", 1, 1, 2),
                    ("10.0.0.2", 1, 1, 7),
                    ("10.0.0.3", 1, 1, 7),
                ],
                other: 0,
            },
            Case {
                name: "an IPv4-mapped peer is its IPv4 address",
                conns: vec![("::ffff:127.0.0.9", 4), ("127.0.0.9", 6)],
                max: 10,
                want: vec![("127.0.0.9", 2, 1, 4)],
                other: 0,
            },
            Case {
                name: "too many addresses: /24 and /64",
                conns: vec![
                    ("10.1.2.3", 1),
                    ("10.1.2.4", 2),
                    ("10.1.2.200", 3),
                    ("10.9.0.1", 0),
                    ("2001:db8::1", 5),
                    ("2001:db8::2:1", 6),
                ],
                max: 3,
                want: vec![
                    ("10.1.2.0/24", 3, 3, 1),
                    ("2001:db8::/64", 2, 2, 5),
                    ("10.9.0.0/24", 1, 1, 0),
                ],
                other: 0,
            },
            Case {
                name: "still too many: /16 and /48",
                conns: vec![
                    ("10.1.1.1", 1),
                    ("10.1.2.1", 1),
                    ("10.1.3.1", 1),
                    ("2001:db8:0:1::1", 2),
                    ("2001:db8:0:2::1", 3),
                ],
                max: 2,
                want: vec![("10.1.0.0/16", 3, 3, 1), ("2001:db8::/48", 2, 2, 2)],
                other: 0,
            },
            Case {
                name: "and then the largest groups, the rest counted as other",
                conns: vec![
                    ("10.1.0.1", 1),
                    ("10.1.0.2", 1),
                    ("10.2.0.1", 2),
                    ("10.3.0.1", 3),
                    ("10.4.0.1", 4),
                ],
                max: 2,
                want: vec![("10.1.0.0/16", 2, 2, 1), ("10.2.0.0/16", 1, 1, 2)],
                other: 2,
            },
        ];
        for case in cases {
            let g = group(case.conns.iter().map(|&(a, s)| (ip(a), secs(s))), case.max);
            let want: Vec<_> = case
                .want
                .iter()
                .map(|&(p, c, a, s)| (p.to_owned(), c, a, s))
                .collect();
            assert_eq!(summary(&g), want, "{}", case.name);
            assert_eq!(g.other, case.other, "{}", case.name);
            assert_eq!(g.total, case.conns.len() as u64, "{}", case.name);
            assert!(
                g.groups.iter().all(|g| g.processes.is_none()),
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn membership_follows_the_prefix() {
        let g = group([(ip("10.1.2.3"), secs(1)), (ip("10.1.3.3"), secs(1))], 1);
        assert_eq!(g.groups[0].peer(), "10.1.0.0/16");
        assert!(g.groups[0].contains(ip("10.1.200.1")));
        assert!(g.groups[0].contains(ip("::ffff:10.1.0.1")));
        assert!(!g.groups[0].contains(ip("10.2.0.1")));
        assert!(!g.groups[0].contains(ip("::a01:1")));
    }

    fn proc_(pid: u32, comm: &str) -> Option<PeerProcess> {
        Some(PeerProcess {
            pid,
            comm: comm.to_owned(),
            container_id: None,
            cgroup: None,
            connections: 0,
        })
    }

    #[test]
    fn naming_counts_each_process_and_what_was_not_found() {
        let mut g = group(
            [
                (ip("127.0.0.1"), secs(1)),
                (ip("127.0.0.1"), secs(2)),
                (ip("127.0.0.1"), secs(3)),
                (ip("127.0.0.9"), secs(4)),
                (ip("10.0.0.1"), secs(5)),
            ],
            10,
        );
        g.name([
            (ip("127.0.0.1"), proc_(20, "b")),
            (ip("::ffff:127.0.0.1"), proc_(10, "a")),
            (ip("127.0.0.1"), proc_(20, "b")),
            (ip("127.0.0.9"), None),
            // Not in any group (it closed since): ignored.
            (ip("192.0.2.1"), proc_(30, "c")),
        ]);
        let local = &g.groups[0];
        assert_eq!(local.peer(), "127.0.0.1");
        let procs = local.processes.as_ref().unwrap();
        assert_eq!(
            procs
                .iter()
                .map(|p| (p.pid, p.comm.as_str(), p.connections))
                .collect::<Vec<_>>(),
            [(20, "b", 2), (10, "a", 1)]
        );
        assert_eq!(local.unnamed, Some(0));
        assert_eq!(g.groups[1].unnamed, Some(1));
        assert_eq!(g.groups[1].processes.as_deref(), Some(&[][..]));
        // Not looked for: empty and zero, not unknown.
        assert_eq!(g.groups[2].peer(), "10.0.0.1");
        assert_eq!(g.groups[2].unnamed, Some(0));
    }

    #[test]
    fn naming_is_bounded_per_group() {
        let n = MAX_PROCESSES_PER_GROUP as u32 + 3;
        let mut g = group((0..n).map(|_| (ip("127.0.0.1"), secs(1))), 10);
        g.name((0..n).map(|pid| (ip("127.0.0.1"), proc_(pid, "x"))));
        let local = &g.groups[0];
        assert_eq!(
            local.processes.as_ref().unwrap().len(),
            MAX_PROCESSES_PER_GROUP
        );
        assert_eq!(local.unnamed, Some(3));
    }
}
