//! Merging a [`Snapshot`] into the tracker: the startup view of everything
//! that predates the programs, and later rescans that repair what lost
//! events left stale.
//!
//! The snapshot is authoritative about who holds which fd at `snap.at`, but
//! the dump takes time: anything the events report after `snap.at` may or
//! may not be in it. So evidence newer than `snap.at` (sockets learned,
//! connections accepted, closes, exits) always survives the merge, and
//! evidence older than it gives way to the snapshot.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    time::Duration,
};

use super::{Conn, ListenSock, Tracker, alive_holders};
use crate::event::{ConnEvent, ListenAddr, NetNs, Snapshot, Tuple};

/// One listening socket as the snapshot shows it.
struct SnapSock {
    inode: u64,
    holders: BTreeSet<u32>,
    queue: u64,
}

impl Tracker {
    /// Merge a snapshot (startup, or a later rescan). Returns the live
    /// connections that were NOT already known from events and were added as
    /// pre-existing, as (tuple, pid charged) pairs: the source registers these in the
    /// kernel `PREEXISTING` map so their end is reported as PreexistingClose.
    /// The kernel-reported connections it retired are then in
    /// [`Tracker::take_retired`].
    pub fn merge_snapshot(&mut self, snap: &Snapshot) -> Vec<(Tuple, u32)> {
        let s = snap.at;
        self.retired.clear();
        self.found_accepts.clear();
        self.pending
            .retain(|_, at| at.saturating_add(super::PENDING_KEEP) >= s);
        self.last_snapshot = Some(self.last_snapshot.map_or(s, |last| last.max(s)));

        let mut comms: BTreeMap<u32, &str> = BTreeMap::new();
        let all_holders = snap
            .listeners
            .iter()
            .flat_map(|l| &l.holders)
            .chain(snap.connections.iter().flat_map(|c| &c.holders));
        for h in all_holders {
            comms.entry(h.pid).or_insert(&h.comm);
        }
        for (pid, comm) in comms {
            if !self.exited.ended_since(&pid, s) {
                self.procs.entry(pid).or_default();
                self.set_comm(pid, comm, s);
                self.idle.push(pid);
            }
        }

        self.merge_listeners(snap);
        let added = self.merge_connections(snap);

        // Endings older than this snapshot are reflected in it, and later
        // snapshots are newer still.
        self.closed.retain_since(s);
        self.stops.retain(|m| m.at >= s);
        self.releases.retain(|m| m.at >= s);
        self.collect_idle();
        added
    }

    fn merge_listeners(&mut self, snap: &Snapshot) {
        let s = snap.at;
        let mut shown: BTreeMap<ListenAddr, Vec<SnapSock>> = BTreeMap::new();
        for sl in &snap.listeners {
            let holders = alive_holders(&self.exited, &sl.holders, s);
            let queue = u64::from(sl.accept_queue);
            let socks = shown.entry(sl.addr).or_default();
            match socks
                .iter_mut()
                .find(|x| sl.inode != 0 && x.inode == sl.inode)
            {
                Some(x) => {
                    x.holders.extend(holders);
                    x.queue = x.queue.max(queue);
                }
                None => socks.push(SnapSock {
                    inode: sl.inode,
                    holders,
                    queue,
                }),
            }
        }

        // A socket that closed after the dump started may still be in it.
        for m in self.stops.iter().filter(|m| m.at >= s) {
            let Some(socks) = shown.get_mut(&m.addr) else {
                continue;
            };
            let i = match m.inode {
                Some(inode) => socks.iter().position(|x| x.inode == inode),
                None => socks
                    .iter()
                    .position(|x| x.holders.contains(&m.pid))
                    // Only a socket that existed at `s` must be in the dump.
                    .or_else(|| (m.since < s && socks.len() == 1).then_some(0)),
            };
            if let Some(i) = i {
                socks.remove(i);
            }
        }

        // A process a fresh read of its fds found without a socket after
        // the dump started may still be listed in it.
        for m in self.releases.iter().filter(|m| m.at >= s) {
            for x in shown.values_mut().flatten().filter(|x| x.inode == m.inode) {
                x.holders.remove(&m.pid);
            }
        }

        let known: Vec<ListenAddr> = self.listeners.keys().copied().collect();
        for addr in known {
            if shown.get(&addr).is_none_or(|v| v.is_empty()) {
                self.keep_newer_sockets(addr, s);
            }
        }
        for (addr, socks) in shown {
            if !socks.is_empty() {
                self.merge_listener(addr, socks, s);
            }
        }
    }

    /// A listener the snapshot does not show keeps only sockets learned
    /// after it; with none left it is gone.
    fn keep_newer_sockets(&mut self, addr: ListenAddr, s: Duration) {
        let Some(l) = self.listeners.get_mut(&addr) else {
            return;
        };
        let (newer, gone): (Vec<ListenSock>, Vec<ListenSock>) = std::mem::take(&mut l.sockets)
            .into_iter()
            .partition(|x| x.since >= s);
        l.sockets = newer;
        l.queued_before = 0;
        let before: Vec<u32> = l.acceptors.keys().copied().collect();
        l.acceptors.retain(|_, t| *t >= s);
        let empty = l.sockets.is_empty();
        self.idle.extend(before);
        for x in gone {
            if let Some(sk) = x.sk {
                self.listener_by_sk.remove(&sk);
            }
            self.idle.extend(x.holders.keys().copied());
        }
        if empty {
            self.remove_listener(&addr);
        }
    }

    /// Rebuilds one address's sockets from the snapshot, carrying over the
    /// sk names events gave them and whatever events learned after `s`.
    fn merge_listener(&mut self, addr: ListenAddr, socks: Vec<SnapSock>, s: Duration) {
        let l = self.listeners.entry(addr).or_default();
        let current = std::mem::take(&mut l.sockets);

        // Which current socket each snapshot socket is.
        let mut pair: Vec<Option<usize>> = vec![None; socks.len()];
        let mut used = vec![false; current.len()];
        for (j, x) in socks.iter().enumerate() {
            if let Some(i) =
                (0..current.len()).find(|&i| !used[i] && current[i].inode == Some(x.inode))
            {
                used[i] = true;
                pair[j] = Some(i);
            }
        }
        // Sockets only events named: by a process both say holds it.
        for (j, x) in socks.iter().enumerate() {
            if pair[j].is_some() {
                continue;
            }
            let found = (0..current.len()).find(|&i| {
                !used[i]
                    && current[i].inode.is_none()
                    && current[i].holders.keys().any(|p| x.holders.contains(p))
            });
            if let Some(i) = found {
                used[i] = true;
                pair[j] = Some(i);
            }
        }
        // One unexplained socket on each side, both older than the snapshot:
        // the same socket whose holders changed hands.
        let free_snap: Vec<usize> = (0..socks.len()).filter(|&j| pair[j].is_none()).collect();
        let free_old: Vec<usize> = (0..current.len())
            .filter(|&i| !used[i] && current[i].inode.is_none() && current[i].since < s)
            .collect();
        if let ([j], [i]) = (free_snap.as_slice(), free_old.as_slice()) {
            pair[*j] = Some(*i);
        }

        let seen_queue: u64 = socks.iter().map(|x| x.queue).sum();
        let mut current: Vec<Option<ListenSock>> = current.into_iter().map(Some).collect();
        let mut sockets = Vec::with_capacity(socks.len());
        let mut released = Vec::new();
        for (j, x) in socks.into_iter().enumerate() {
            let mut holders: BTreeMap<u32, Duration> = x.holders.iter().map(|p| (*p, s)).collect();
            let (sk, since) = match pair[j].and_then(|i| current.get_mut(i).and_then(Option::take))
            {
                Some(old) => {
                    for (pid, t) in old.holders {
                        if t >= s {
                            holders.entry(pid).or_insert(t);
                        } else {
                            released.push(pid);
                        }
                    }
                    (old.sk, old.since.min(s))
                }
                None => (None, s),
            };
            sockets.push(ListenSock {
                sk,
                inode: Some(x.inode),
                since,
                confirmed: Some(s),
                holders,
            });
        }
        for old in current.into_iter().flatten() {
            if old.since >= s {
                sockets.push(old);
            } else {
                // Older than the snapshot and not in it: closed unseen.
                if let Some(sk) = old.sk {
                    if self.listener_by_sk.get(&sk) == Some(&addr) {
                        self.listener_by_sk.remove(&sk);
                    }
                }
                released.extend(old.holders.keys().copied());
            }
        }
        for sk in sockets.iter().filter_map(|x| x.sk) {
            self.listener_by_sk.insert(sk, addr);
        }
        l.sockets = sockets;
        released.extend(l.acceptors.keys().copied());
        l.acceptors.retain(|_, t| *t >= s);
        l.queued_before = seen_queue.saturating_sub(l.queued);
        self.idle.extend(released);
    }

    fn merge_connections(&mut self, snap: &Snapshot) -> Vec<(Tuple, u32)> {
        let s = snap.at;
        let mut seen: HashSet<Tuple> = HashSet::with_capacity(snap.connections.len());
        let mut added = Vec::new();
        // Sized once: growing to a startup snapshot's 100k connections
        // would rehash the table a dozen times, the last with both copies
        // alive.
        self.conns
            .reserve(snap.connections.len().saturating_sub(self.conns.len()));
        for sc in &snap.connections {
            if !seen.insert(sc.tuple) || self.closed.ended_since(&sc.tuple, s) {
                // Ended after the dump saw it.
                continue;
            }
            let holders = alive_holders(&self.exited, &sc.holders, s);
            if let Some(conn) = self.conns.get_mut(&sc.tuple) {
                if conn.since > s {
                    // Accepted after the snapshot: the event knows better.
                    continue;
                }
                conn.confirmed = Some(s);
                if holders.is_empty() {
                    self.remove_conn(&sc.tuple);
                } else {
                    // fd passing and fork share a connection: each holder counts it.
                    self.set_conn_holders(&sc.tuple, holders);
                }
                continue;
            }
            let Some(&charged) = holders.first() else {
                continue;
            };
            if let Some(handshake) = self.pending.remove(&sc.tuple) {
                // Accepted and not read or written yet: the programs see a
                // connection's owner at its first send or receive, and keep
                // it pending until then. An accept all the same, counted
                // now; the kernel reports its claim or its end (as a queue
                // drop), so it is not registered as pre-existing.
                let at = handshake.min(s);
                let listener = self.count_accept(at, &sc.tuple, charged, true, true);
                self.insert_conn(
                    sc.tuple,
                    Conn {
                        sk: None,
                        holders,
                        since: at,
                        listener,
                        confirmed: Some(s),
                        unclaimed: true,
                    },
                );
                let comm = sc
                    .holders
                    .iter()
                    .find(|h| h.pid == charged)
                    .map(|h| h.comm.clone())
                    .unwrap_or_default();
                self.found_accepts.push(ConnEvent::Accept {
                    at,
                    sk: super::found_id(&sc.tuple),
                    tuple: sc.tuple,
                    pid: charged,
                    comm,
                    was_queued: true,
                });
                continue;
            }
            let listener = self.best_listener_addr(&sc.tuple);
            self.insert_conn(
                sc.tuple,
                Conn {
                    sk: None,
                    holders,
                    since: s,
                    listener,
                    confirmed: Some(s),
                    unclaimed: false,
                },
            );
            added.push((sc.tuple, charged));
        }
        self.found_accepts.sort_by_key(ConnEvent::at);

        // Repair: a connection older than this snapshot and not in it has
        // ended unseen: a pre-existing one whose registration failed, or a
        // reported one whose end the programs missed (lost events, or a
        // reset that raced its accept). One accepted at or after `s` may be
        // missing from the dump and is left alone. The snapshot only calls a
        // connection inbound when a listener it saw matches it, so one whose
        // listener is gone (a server draining after closing its listener) is
        // not evidence of an end and stays.
        let mut vouched: HashMap<(NetNs, u16), Vec<ListenAddr>> = HashMap::new();
        for sl in &snap.listeners {
            vouched
                .entry((sl.addr.netns, sl.addr.local.port()))
                .or_default()
                .push(sl.addr);
        }
        let covered = |t: &Tuple| {
            vouched
                .get(&(t.netns, t.local.port()))
                .is_some_and(|ls| ls.iter().any(|l| l.matches(t.netns, t.local)))
        };
        // And only where the snapshot read a holder's fds: a process whose
        // fd table could not be read (gone, denied, out of fds) shows none of
        // its connections, which is no evidence that they ended.
        let walked: HashSet<u32> = snap
            .listeners
            .iter()
            .flat_map(|l| &l.holders)
            .chain(snap.connections.iter().flat_map(|c| &c.holders))
            .map(|h| h.pid)
            .collect();
        let stale: Vec<Tuple> = self
            .conns
            .iter()
            .filter(|(t, c)| {
                c.since < s
                    && !seen.contains(*t)
                    && covered(t)
                    && c.holders.iter().any(|p| walked.contains(p))
            })
            .map(|(t, _)| *t)
            .collect();
        for t in stale {
            if let Some(conn) = self.remove_conn(&t) {
                if let Some(sk) = conn.sk {
                    self.retired.push((sk, conn.since));
                }
            }
        }
        added
    }
}
