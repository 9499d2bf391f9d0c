//! The inbound join: which sockets of one namespace's sock_diag dump are
//! live inbound connections ([`Inbound`]: ESTABLISHED or CLOSE_WAIT, held
//! by a file, local address matching a listener), the dump that applies it
//! while the reply streams in ([`dump_netns`]), and the join of that dump
//! with the /proc fd table into a [`Snapshot`] ([`assemble`]).

use std::collections::HashMap;

use anyhow::Context;
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6},
    inet::StateFlags,
};

use super::{
    procfs::ProcTable,
    sock_diag::{
        DiagSocket, TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCP_LISTEN, diag_socket, dump_tcp,
        live_states, local_port_filter,
    },
};
use crate::{
    event::{ListenAddr, NetNs, SnapConn, SnapListener, Snapshot, Tuple},
    source::netns::NetNsHandle,
};

/// One namespace's listeners (held or not) and the connected sockets that
/// may be live inbound connections (see [`Inbound`]).
#[derive(Debug, Default)]
pub(super) struct NetnsDump {
    pub(super) listeners: Vec<DiagSocket>,
    pub(super) connections: Vec<DiagSocket>,
}

/// Which connected sockets of one namespace can be live inbound
/// connections: ESTABLISHED or CLOSE_WAIT, held by a file (inode not 0),
/// and with a local address that matches a listener. Applied while the dump
/// streams in, so the other ends of loopback connections (as many again)
/// are never stored.
struct Inbound {
    netns: NetNs,
    /// Indexed by port: a busy namespace has ~100k connections and maybe
    /// hundreds of listeners.
    by_port: HashMap<u16, Vec<ListenAddr>>,
}

impl Inbound {
    /// `extra` counts as listeners of `netns` too (others are ignored).
    fn new(netns: NetNs, listeners: &[DiagSocket], extra: &[ListenAddr]) -> Self {
        let mut by_port: HashMap<u16, Vec<ListenAddr>> = HashMap::new();
        let dumped = listeners.iter().map(|l| ListenAddr {
            netns,
            local: l.local,
        });
        for addr in dumped.chain(extra.iter().copied().filter(|a| a.netns == netns)) {
            by_port.entry(addr.local.port()).or_default().push(addr);
        }
        Self { netns, by_port }
    }

    /// The address families that can have inbound connections here: an
    /// accepted socket has its listener's family (a dual-stack listener's
    /// IPv4 clients are IPv6 sockets with mapped addresses), so a dump of
    /// the other family would only walk the kernel's table for nothing.
    fn families(&self) -> Vec<u8> {
        let listeners = || self.by_port.values().flatten();
        let mut families = Vec::with_capacity(2);
        if listeners().any(|l| l.local.is_ipv4()) {
            families.push(AF_INET);
        }
        if listeners().any(|l| l.local.is_ipv6()) {
            families.push(AF_INET6);
        }
        families
    }

    /// The listening ports, sorted.
    fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.by_port.keys().copied().collect();
        ports.sort_unstable();
        ports
    }

    fn accepts(&self, s: &DiagSocket) -> bool {
        matches!(s.state, TCP_ESTABLISHED | TCP_CLOSE_WAIT)
            && s.inode != 0
            && self
                .by_port
                .get(&s.local.port())
                .is_some_and(|addrs| addrs.iter().any(|l| l.matches(self.netns, s.local)))
    }
}

/// Dumps the namespace `handle` refers to: listeners first, then the
/// connected sockets [`Inbound`] keeps (with `extra` as more listeners).
pub(super) fn dump_netns(handle: &NetNsHandle, extra: &[ListenAddr]) -> anyhow::Result<NetnsDump> {
    let netns = handle.inode();
    let socket = diag_socket(handle)?;
    let mut dump = NetnsDump::default();
    for family in [AF_INET, AF_INET6] {
        dump_tcp(&socket, family, StateFlags::LISTEN, &[], |s| {
            if s.state == TCP_LISTEN {
                dump.listeners.push(s);
            }
        })
        .with_context(|| format!("failed to dump tcp listeners in netns {netns}"))?;
    }
    let inbound = Inbound::new(netns, &dump.listeners, extra);
    let ports = inbound.ports();
    if ports.is_empty() {
        // No listener: nothing here can be inbound.
        return Ok(dump);
    }
    let filter = local_port_filter(&ports);
    for family in inbound.families() {
        dump_tcp(&socket, family, live_states(), &filter, |s| {
            if inbound.accepts(&s) {
                dump.connections.push(s);
            }
        })
        .with_context(|| format!("failed to dump tcp sockets in netns {netns}"))?;
    }
    Ok(dump)
}

/// Joins one namespace's dump with the fd tables into `out`: its listeners
/// (held or not) and its live inbound connections that some process holds.
pub(super) fn assemble(netns: NetNs, dump: &NetnsDump, table: &ProcTable, out: &mut Snapshot) {
    out.listeners
        .extend(dump.listeners.iter().map(|s| SnapListener {
            addr: ListenAddr {
                netns,
                local: s.local,
            },
            inode: s.inode,
            accept_queue: s.rqueue,
            holders: if s.inode == 0 {
                Vec::new()
            } else {
                table.holders_of(s.inode)
            },
        }));
    let held = dump.connections.iter().filter(|s| table.is_held(s.inode));
    out.connections.reserve(held.clone().count());
    out.connections.extend(held.map(|s| SnapConn {
        tuple: Tuple {
            netns,
            local: s.local,
            remote: s.remote,
        },
        inode: s.inode,
        state: s.state,
        holders: table.holders_of(s.inode),
    }));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{event::Holder, source::snapshot::procfs::table_of};

    fn diag(state: u8, local: &str, remote: &str, rqueue: u32, inode: u64) -> DiagSocket {
        DiagSocket::of(state, local, remote, rqueue, inode)
    }

    /// What `dump_netns` keeps of these sockets.
    fn dump_of(netns: NetNs, sockets: &[DiagSocket], extra: &[ListenAddr]) -> NetnsDump {
        let listeners: Vec<DiagSocket> = sockets
            .iter()
            .filter(|s| s.state == TCP_LISTEN)
            .cloned()
            .collect();
        let inbound = Inbound::new(netns, &listeners, extra);
        let connections = sockets
            .iter()
            .filter(|s| inbound.accepts(s))
            .cloned()
            .collect();
        NetnsDump {
            listeners,
            connections,
        }
    }

    #[test]
    fn assemble_keeps_held_inbound_connections_only() {
        let holder = |pid| Holder {
            pid,
            comm: format!("p{pid}"),
        };
        // Listed out of order, and 10 twice by pid 1 (two fds, one socket).
        let table = table_of(&[
            (11, 1),
            (10, 2),
            (10, 1),
            (12, 1),
            (13, 3),
            (14, 1),
            (10, 1),
        ]);
        let sockets = [
            diag(TCP_LISTEN, "0.0.0.0:80", "0.0.0.0:0", 2, 10),
            diag(TCP_LISTEN, "[::]:443", "[::]:0", 0, 20), // kernel-owned: no holder
            diag(TCP_ESTABLISHED, "10.0.0.1:80", "10.0.0.9:5000", 0, 11),
            diag(
                TCP_CLOSE_WAIT,
                "[::ffff:10.0.0.1]:443",
                "[::ffff:10.0.0.9]:5001",
                0,
                12,
            ),
            diag(TCP_ESTABLISHED, "10.0.0.1:80", "10.0.0.9:5002", 0, 0), // queued
            diag(TCP_ESTABLISHED, "10.0.0.1:80", "10.0.0.9:5003", 0, 99), // unheld
            diag(TCP_ESTABLISHED, "10.0.0.1:40000", "10.0.0.7:80", 0, 13), // outbound
            diag(TCP_ESTABLISHED, "10.0.0.1:8080", "10.0.0.9:5004", 0, 14), // listener gone
        ];
        let mut snap = Snapshot::default();
        assemble(7, &dump_of(7, &sockets, &[]), &table, &mut snap);
        let (listeners, conns) = (&snap.listeners, &snap.connections);
        assert_eq!(listeners.len(), 2);
        assert_eq!(listeners[0].holders, [holder(1), holder(2)]);
        assert_eq!(listeners[0].accept_queue, 2);
        assert!(listeners[1].holders.is_empty());
        let inodes: Vec<u64> = conns.iter().map(|c| c.inode).collect();
        assert_eq!(inodes, [11, 12]);
        assert_eq!(conns[0].holders, [holder(1)]);
        assert_eq!(conns[1].state, TCP_CLOSE_WAIT);
        assert!(conns.iter().all(|c| c.tuple.netns == 7));

        let known = [
            ListenAddr {
                netns: 7,
                local: "0.0.0.0:8080".parse().unwrap(),
            },
            ListenAddr {
                netns: 8,
                local: "0.0.0.0:40000".parse().unwrap(),
            },
        ];
        let mut snap = Snapshot::default();
        assemble(7, &dump_of(7, &sockets, &known), &table, &mut snap);
        let inodes: Vec<u64> = snap.connections.iter().map(|c| c.inode).collect();
        assert_eq!(inodes, [11, 12, 14]);
    }

    #[test]
    fn inbound_asks_only_for_the_families_and_ports_listened_on() {
        let v4 = [diag(TCP_LISTEN, "127.0.0.1:80", "0.0.0.0:0", 0, 1)];
        let inbound = Inbound::new(7, &v4, &[]);
        assert_eq!(inbound.families(), [AF_INET]);
        assert_eq!(inbound.ports(), [80]);
        let extra = [
            ListenAddr {
                netns: 7,
                local: "[::]:443".parse().unwrap(),
            },
            ListenAddr {
                netns: 8,
                local: "[::]:8443".parse().unwrap(),
            },
        ];
        let inbound = Inbound::new(7, &v4, &extra);
        assert_eq!(inbound.families(), [AF_INET, AF_INET6]);
        assert_eq!(inbound.ports(), [80, 443]);
        let none = Inbound::new(7, &[], &extra[1..]);
        assert!(none.families().is_empty() && none.ports().is_empty());
    }
}
