//! The tracker owns the meaning of "live", "queued", "holder": a pure state
//! machine fed with [`ConnEvent`]s and [`Snapshot`]s, read as a [`Status`].
//! No I/O, no clocks: callers pass the time in. [`restart`] reads a
//! restart's meaning (roles, handovers, rates) from the statuses and events.
//!
//! A live connection is keyed by its tuple (two live connections never share
//! one in a namespace), with an index by `sk` for the ones the kernel
//! reported: events name sockets, snapshots name tuples. A listener is keyed
//! by its address and remembers each socket behind it (`SO_REUSEPORT` puts
//! several on one address), so that one socket closing during a handover does
//! not hide the others.
//!
//! Events and snapshots race: a snapshot may be merged after events newer
//! than it (rescans) or before events older than it. Every record carries the
//! time of its evidence and the newer evidence wins; recent endings are kept
//! in [`tombstone::Tombstones`] so a snapshot cannot resurrect them. Nothing
//! here panics on any input order: missed or duplicated events only make
//! counts stale until the next snapshot repairs them.

mod fd_table;
pub mod records;
pub mod restart;
mod snapshot;
mod status;
#[cfg(test)]
mod tests;
mod tombstone;

pub use restart::Restarts;
pub use status::*;

use std::{
    collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque},
    time::Duration,
};

use crate::event::{ConnEvent, Holder, ListenAddr, SockId, Tuple};
use tombstone::Tombstones;

/// Listener closes remembered for the next snapshot merge.
const MAX_STOP_MARKS: usize = 4096;
/// Holders found gone by a fresh fd-table read, remembered for the next
/// snapshot merge (see [`Tracker::fd_table_read`]).
const MAX_RELEASE_MARKS: usize = 4096;
/// Handshakes remembered until their connection is claimed or ends (the
/// kernel's `PENDING` map is bounded by `--max-connections`, at most a
/// few million); beyond this, one is only counted in its listener's queue.
const MAX_PENDING: usize = 1 << 22;
/// A handshake older than this is forgotten at the next snapshot merge
/// (its claim or end was lost): a connection found later is then counted
/// as pre-existing rather than as an accept.
const PENDING_KEEP: Duration = Duration::from_secs(600);

/// How consumers see an event (see [`Tracker::seen_as`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// As it is.
    Same,
    /// Not at all.
    Hidden,
    /// As this one instead.
    Instead(ConnEvent),
}

/// The socket name given to consumers for a connection a snapshot found
/// accepted before the programs could name it: stable per tuple, and
/// never a kernel address (those are above 2^63 on every 64-bit kernel),
/// so its accept and its close pair up in a recording.
pub fn found_id(tuple: &Tuple) -> SockId {
    // FNV-1a over the tuple's text: stable across processes and versions.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{}|{}|{}", tuple.netns, tuple.local, tuple.remote).bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 1) | 1
}

/// One live connection, for the drain output and the TUI detail view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    pub tuple: Tuple,
    /// Processes holding it, by pid.
    pub holders: Vec<u32>,
    /// When it was accepted, or for a pre-existing one when a snapshot first
    /// saw it (a lower bound of its age).
    pub since: Duration,
    /// Found by a snapshot, not seen accepted.
    pub preexisting: bool,
    /// The listener it came through, while that listener exists.
    pub listener: Option<ListenAddr>,
}

/// The tracker's hash tables. Their keys are partly chosen by remote peers
/// (a connection's address and port), so the hasher is seeded at random
/// per process like std's, but foldhash instead of SipHash-1-3: several
/// lookups per event on a ~40-byte tuple made SipHash about a third of
/// the tracker's time per connection (`examples/tracker_cost.rs`).
pub(crate) type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Live connections, listeners and their holders, folded from events and
/// snapshots. See the module documentation for the model.
#[derive(Debug, Default)]
pub struct Tracker {
    conns: Map<Tuple, Conn>,
    conn_by_sk: Map<SockId, Tuple>,
    listeners: BTreeMap<ListenAddr, Listener>,
    listener_by_sk: Map<SockId, ListenAddr>,
    /// Exactly the pids holding a live connection or a listener (see [`Tracker::collect_idle`]).
    procs: Map<u32, Proc>,
    /// Pids that may have let go of their last holding during this call.
    idle: Vec<u32>,
    /// Queued connections no known listener matches.
    unmatched_queue: u64,
    lost_events: u64,
    /// Episodes of untracked connections (see [`ConnEvent::MapFull`]).
    map_full: u64,
    /// Kernel-reported connections the last snapshot merge retired, as (sk,
    /// accepted at): the source drops their kernel entries.
    retired: Vec<(SockId, Duration)>,
    /// `at` of the newest merged snapshot.
    last_snapshot: Option<Duration>,
    closed: Tombstones<Tuple>,
    exited: Tombstones<u32>,
    stops: VecDeque<StopMark>,
    releases: VecDeque<ReleaseMark>,
    /// Something a consumer must see at once happened since the last
    /// [`Tracker::take_significant`] (see there).
    significant: bool,
    /// Connections whose handshake the programs reported and that no
    /// process has read or written yet (the kernel keeps them pending), by
    /// tuple → handshake time: queued, or accepted and untouched.
    pending: Map<Tuple, Duration>,
    /// Accepts the last snapshot merge found (see [`Tracker::take_found_accepts`]).
    found_accepts: Vec<ConnEvent>,
}

#[derive(Debug)]
struct Conn {
    /// `None` for a pre-existing connection (found by a snapshot).
    sk: Option<SockId>,
    holders: BTreeSet<u32>,
    since: Duration,
    listener: Option<ListenAddr>,
    /// `at` of the last snapshot that vouched for `holders`.
    confirmed: Option<Duration>,
    /// Accepted and found held by a snapshot while the kernel still keeps
    /// it pending (no read or write yet): already counted as an accept, so
    /// its claim (first I/O) only names its socket, and its end comes as
    /// a queue drop.
    unclaimed: bool,
}

#[derive(Debug, Default)]
struct Listener {
    sockets: Vec<ListenSock>,
    /// Processes seen accepting from this address, with when. Accepting
    /// proves they hold one of its sockets even if no ListenStart or
    /// snapshot said so (workers inheriting a master's socket across fork).
    acceptors: BTreeMap<u32, Duration>,
    /// Connections in the accept queue, counted from handshake events.
    queued: u64,
    /// What the last snapshot saw queued beyond `queued`: connections whose
    /// handshake happened before the programs attached.
    queued_before: u64,
    accepted_total: u64,
    queue_drops_total: u64,
}

/// One listening socket behind an address.
#[derive(Debug)]
struct ListenSock {
    /// Known when an event named it.
    sk: Option<SockId>,
    /// Known when a snapshot showed it.
    inode: Option<u64>,
    /// When it was first learned of.
    since: Duration,
    /// `at` of the last snapshot that showed it.
    confirmed: Option<Duration>,
    /// Holders, each with the time of the evidence.
    holders: BTreeMap<u32, Duration>,
}

/// A listening socket that closed, kept so a snapshot taken before the close
/// does not bring it back.
#[derive(Debug)]
struct StopMark {
    addr: ListenAddr,
    at: Duration,
    pid: u32,
    inode: Option<u64>,
    /// When the closed socket was first learned of (zero if never).
    since: Duration,
}

/// A process found no longer holding a listening socket (see
/// [`Tracker::fd_table_read`]), kept so a snapshot taken before that read
/// does not list it again.
#[derive(Debug)]
struct ReleaseMark {
    inode: u64,
    pid: u32,
    at: Duration,
}

#[derive(Debug, Default)]
struct Proc {
    comm: String,
    comm_at: Duration,
    /// Live connections it holds.
    live: u64,
    accepted_total: u64,
    closed_total: u64,
}

impl Listener {
    fn holds(&self, pid: u32) -> bool {
        self.acceptors.contains_key(&pid)
            || self.sockets.iter().any(|s| s.holders.contains_key(&pid))
    }

    fn holder_pids(&self) -> BTreeSet<u32> {
        let mut pids: BTreeSet<u32> = self.acceptors.keys().copied().collect();
        for s in &self.sockets {
            pids.extend(s.holders.keys().copied());
        }
        pids
    }

    /// A socket no event named, for an event that names an unknown one:
    /// preferably one `pid` holds, then one nobody is known to hold.
    fn unnamed_socket(&self, pid: u32) -> Option<usize> {
        let unnamed = || {
            self.sockets
                .iter()
                .enumerate()
                .filter(|(_, s)| s.sk.is_none())
        };
        unnamed()
            .find(|(_, s)| s.holders.contains_key(&pid))
            .or_else(|| unnamed().find(|(_, s)| s.holders.is_empty()))
            .or_else(|| unnamed().next())
            .map(|(i, _)| i)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Tracker {
    /// An empty tracker: nothing known until events or a snapshot arrive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fold one kernel/source event in.
    pub fn apply(&mut self, ev: &ConnEvent) {
        match ev {
            ConnEvent::ListenStart {
                at,
                sk,
                addr,
                pid,
                comm,
            } => self.listen_start(*at, *sk, *addr, *pid, comm),
            ConnEvent::ListenStop {
                at,
                sk,
                addr,
                pid,
                comm,
            } => {
                self.set_comm(*pid, comm, *at);
                self.listen_stop(*at, *sk, *addr, *pid);
            }
            ConnEvent::Handshake { at, tuple, .. } => {
                match self.best_listener(tuple) {
                    Some(l) => l.queued += 1,
                    None => self.unmatched_queue += 1,
                }
                if self.pending.len() < MAX_PENDING {
                    self.pending.insert(*tuple, *at);
                }
            }
            ConnEvent::QueueDrop { at, tuple, .. } => self.queue_drop(*at, tuple),
            ConnEvent::Accept {
                at,
                sk,
                tuple,
                pid,
                comm,
                was_queued,
            } => self.accept(*at, *sk, tuple, *pid, comm, *was_queued),
            ConnEvent::Close {
                at, sk, tuple, pid, ..
            } => self.close(*at, *sk, tuple, *pid),
            ConnEvent::PreexistingClose { at, tuple, .. } => {
                self.close_unnamed(*at, tuple);
            }
            ConnEvent::ProcessExit { at, pid } => self.process_exit(*at, *pid),
            ConnEvent::Lost { total, .. } => self.lost_events = *total,
            ConnEvent::MapFull { total, .. } => self.map_full = *total,
        }
        if !matches!(
            ev,
            ConnEvent::Handshake { .. }
                | ConnEvent::Accept { .. }
                | ConnEvent::Close { .. }
                | ConnEvent::PreexistingClose { .. }
                | ConnEvent::QueueDrop { .. }
        ) {
            self.significant = true;
        }
        self.collect_idle();
    }

    /// Whether, since the last call, a process exited, a listener opened or
    /// closed, events were lost or connections went untracked. Consumers are sent a fresh status at
    /// once for these; connections coming and going can wait for the next
    /// periodic one (a drain does not wait for a status: it asks for its
    /// targets' count after every batch). Clears the flag.
    pub fn take_significant(&mut self) -> bool {
        std::mem::take(&mut self.significant)
    }

    /// A connection the source found to be gone without an event (e.g. it
    /// closed between the snapshot and the PREEXISTING registration). Removes it.
    pub fn forget_connection(&mut self, tuple: &Tuple) {
        self.remove_conn(tuple);
        self.collect_idle();
    }

    /// How consumers of events (models of accepts, exit accounts,
    /// subscribers) see `ev`, which is about to be applied: as the
    /// tracker counts it. A connection a snapshot found accepted before
    /// any I/O on it (see [`Tracker::take_found_accepts`]) was reported as
    /// an accept then; the kernel's claim of it later is no second accept
    /// ([`Seen::Hidden`]), and its end before any I/O, a queue drop for the
    /// kernel, is the close of that connection ([`Seen::Instead`]). Ask
    /// before [`Tracker::apply`].
    pub fn seen_as(&self, ev: &ConnEvent) -> Seen {
        match ev {
            ConnEvent::Accept { tuple, .. }
                if self.conns.get(tuple).is_some_and(|c| c.unclaimed) =>
            {
                Seen::Hidden
            }
            ConnEvent::QueueDrop {
                at, tuple, exiting, ..
            } => match self
                .unnamed_live(tuple, *at)
                .and_then(|c| Some((c, *c.holders.first()?)))
            {
                Some((c, pid)) => Seen::Instead(ConnEvent::Close {
                    at: *at,
                    sk: found_id(tuple),
                    tuple: *tuple,
                    pid,
                    by_exit: *exiting != 0 && c.holders.contains(exiting),
                }),
                None => Seen::Same,
            },
            _ => Seen::Same,
        }
    }

    /// The accepts the last snapshot merge found: connections accepted and
    /// not yet read or written (the programs see a connection's owner at
    /// its first send or receive), as [`ConnEvent::Accept`]s dated at their
    /// handshake, oldest first, named by [`found_id`]. Already counted
    /// here; for consumers of events (see [`Tracker::seen_as`]). Emptied.
    pub fn take_found_accepts(&mut self) -> Vec<ConnEvent> {
        std::mem::take(&mut self.found_accepts)
    }

    /// The kernel-reported connections the last snapshot merge found gone
    /// (see [`Tracker::merge_snapshot`]), as (sk, accepted at); emptied.
    pub fn take_retired(&mut self) -> Vec<(SockId, Duration)> {
        std::mem::take(&mut self.retired)
    }

    /// Who holds what at monotonic time `now` (the clock of event `at`s).
    /// Pids holding a listener or a live connection — the ones `status`
    /// lists — without building a whole [`Status`]. Unordered.
    pub fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.procs.keys().copied()
    }

    /// Every process holding some listener, by pid: a cheap look for the
    /// monitor's re-check of holders (without building a [`Status`]).
    pub fn listener_holders(&self) -> BTreeSet<u32> {
        self.listeners
            .values()
            .flat_map(Listener::holder_pids)
            .collect()
    }

    pub fn status(&self, now: Duration) -> Status {
        // Per process: (live, oldest since); per (listener, holder): live.
        let mut live: BTreeMap<u32, (u64, Duration)> = BTreeMap::new();
        let mut through: Map<(ListenAddr, u32), u64> = Map::default();
        for conn in self.conns.values() {
            for &pid in &conn.holders {
                let e = live.entry(pid).or_insert((0, conn.since));
                e.0 += 1;
                e.1 = e.1.min(conn.since);
                if let Some(l) = conn.listener {
                    *through.entry((l, pid)).or_default() += 1;
                }
            }
        }
        let comm_of = |pid: u32| {
            self.procs
                .get(&pid)
                .map(|p| p.comm.clone())
                .unwrap_or_default()
        };

        let mut held: BTreeMap<u32, Vec<ListenAddr>> = BTreeMap::new();
        let mut listeners = Vec::with_capacity(self.listeners.len());
        for (addr, l) in &self.listeners {
            let holders = l
                .holder_pids()
                .into_iter()
                .map(|pid| {
                    held.entry(pid).or_default().push(*addr);
                    HolderStatus {
                        pid,
                        comm: comm_of(pid),
                        live: through.get(&(*addr, pid)).copied().unwrap_or(0),
                    }
                })
                .collect();
            listeners.push(ListenerStatus {
                netns: addr.netns,
                address: addr.local,
                family: Family::of(addr.local),
                holders,
                accept_queue: l.queued + l.queued_before,
                accepted_total: l.accepted_total,
                queue_drops_total: l.queue_drops_total,
                // The restart model's part, filled by the monitor.
                generations: Vec::new(),
            });
        }

        let pids: BTreeSet<u32> = live.keys().chain(held.keys()).copied().collect();
        let processes = pids
            .into_iter()
            .map(|pid| {
                let (n, oldest) = match live.get(&pid) {
                    Some(&(n, since)) => (n, Some(millis(now.saturating_sub(since)))),
                    None => (0, None),
                };
                // By address then namespace, one entry per address string.
                let mut addrs = held.remove(&pid).unwrap_or_default();
                addrs.sort_by_key(|a| (a.local, a.netns));
                addrs.dedup_by_key(|a| a.local);
                let proc = self.procs.get(&pid);
                ProcessStatus {
                    pid,
                    comm: comm_of(pid),
                    live: n,
                    listeners: addrs.iter().map(|a| a.local).collect(),
                    accepted_total: proc.map_or(0, |p| p.accepted_total),
                    closed_total: proc.map_or(0, |p| p.closed_total),
                    oldest_live_ms: oldest,
                    ..ProcessStatus::default()
                }
            })
            .collect();

        Status {
            schema: STATUS_SCHEMA.to_owned(),
            uptime_ms: millis(now),
            processes,
            listeners,
            lost_events: self.lost_events,
            map_full_total: self.map_full,
        }
    }

    /// Live connections held by `pid`, oldest first (for drain output and the TUI detail view).
    pub fn connections_of(&self, pid: u32) -> Vec<ConnInfo> {
        self.connections_of_any(&[pid])
    }

    /// Live connections held by any of `pids`, each once, oldest first:
    /// one pass over the connections and a sort.
    pub fn connections_of_any(&self, pids: &[u32]) -> Vec<ConnInfo> {
        let wanted = sorted(pids);
        let mut out: Vec<ConnInfo> = self
            .conns
            .iter()
            .filter(|(_, c)| held_by_any(c, &wanted))
            .map(|(tuple, c)| conn_info(tuple, c))
            .collect();
        out.sort_by_key(|c| (c.since, c.tuple));
        out
    }

    /// The live connections of any of `pids` (only those on `ports` if any
    /// are given, and only those `keep` takes) grouped by peer, at most
    /// `max_groups` groups ([`crate::peers::group`]). One pass.
    pub fn peers_where(
        &self,
        pids: &[u32],
        ports: &[u16],
        max_groups: usize,
        keep: impl Fn(&Tuple) -> bool,
    ) -> crate::peers::PeerGrouping {
        let wanted = sorted(pids);
        crate::peers::group(
            self.conns
                .iter()
                .filter(|(tuple, c)| {
                    (ports.is_empty() || ports.contains(&tuple.local.port()))
                        && held_by_any(c, &wanted)
                        && keep(tuple)
                })
                .map(|(tuple, c)| (tuple.remote.ip(), c.since)),
            max_groups,
        )
    }

    /// How many live connections any of `pids` hold (only those on `ports`
    /// if any are given), and the `k` oldest of them, oldest first. One
    /// pass; only the `k` returned are copied out.
    pub fn oldest_of(&self, pids: &[u32], ports: &[u16], k: usize) -> (u64, Vec<ConnInfo>) {
        self.oldest_where(pids, ports, k, |_| true)
    }

    /// [`Tracker::oldest_of`], counting only the connections `keep` takes
    /// (the drain gate splits off those of excluded peers).
    pub fn oldest_where(
        &self,
        pids: &[u32],
        ports: &[u16],
        k: usize,
        keep: impl Fn(&Tuple) -> bool,
    ) -> (u64, Vec<ConnInfo>) {
        // A max-heap of the k oldest seen so far: its top is the youngest
        // of them, the one a still older connection replaces.
        let mut oldest: BinaryHeap<(Duration, Tuple)> =
            BinaryHeap::with_capacity(k.min(self.conns.len()));
        let mut total = 0u64;
        let wanted = sorted(pids);
        for (tuple, c) in &self.conns {
            if !(ports.is_empty() || ports.contains(&tuple.local.port()))
                || !held_by_any(c, &wanted)
                || !keep(tuple)
            {
                continue;
            }
            total += 1;
            let key = (c.since, *tuple);
            if oldest.len() < k {
                oldest.push(key);
            } else if oldest.peek().is_some_and(|top| key < *top) {
                oldest.pop();
                oldest.push(key);
            }
        }
        let list = oldest
            .into_sorted_vec()
            .iter()
            .filter_map(|(_, t)| self.conns.get(t).map(|c| conn_info(t, c)))
            .collect();
        (total, list)
    }

    /// Live count of one pid (sum over its listeners, optionally restricted
    /// to listener ports). A connection's listener port is its local port,
    /// so this also counts connections whose listener has closed.
    pub fn live_of(&self, pid: u32, ports: &[u16]) -> u64 {
        if ports.is_empty() {
            return self.procs.get(&pid).map_or(0, |p| p.live);
        }
        let n = self
            .conns
            .iter()
            .filter(|(t, c)| c.holders.contains(&pid) && ports.contains(&t.local.port()))
            .count();
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    // --- events -----------------------------------------------------------

    fn listen_start(&mut self, at: Duration, sk: SockId, addr: ListenAddr, pid: u32, comm: &str) {
        let alive = !self.exited.ended_since(&pid, at);
        if alive {
            self.procs.entry(pid).or_default();
            self.set_comm(pid, comm, at);
        }
        // The same sk on another address: that socket's close was missed.
        if let Some(old) = self.listener_by_sk.get(&sk).copied() {
            if old != addr {
                self.remove_socket_by_sk(old, sk);
            }
        }
        let older_than_snapshot = self.last_snapshot.is_some_and(|s| s > at);
        let l = self.listeners.entry(addr).or_default();
        if let Some(sock) = l.sockets.iter_mut().find(|s| s.sk == Some(sk)) {
            if alive {
                let t = sock.holders.entry(pid).or_insert(at);
                *t = (*t).max(at);
            }
        } else if let Some(i) = older_than_snapshot.then(|| l.unnamed_socket(pid)).flatten() {
            // A newer snapshot already shows this socket (and who holds it
            // now): just put a name on it.
            l.sockets[i].sk = Some(sk);
        } else {
            let mut holders = BTreeMap::new();
            if alive {
                holders.insert(pid, at);
            }
            l.sockets.push(ListenSock {
                sk: Some(sk),
                inode: None,
                since: at,
                confirmed: None,
                holders,
            });
        }
        self.listener_by_sk.insert(sk, addr);
        self.idle.push(pid);
    }

    fn listen_stop(&mut self, at: Duration, sk: SockId, addr: ListenAddr, pid: u32) {
        let named = self.listener_by_sk.get(&sk).copied();
        let addr = named.unwrap_or(addr);
        let older_than_snapshot = self.last_snapshot.is_some_and(|s| s > at);
        let Some(l) = self.listeners.get_mut(&addr) else {
            if !older_than_snapshot {
                self.push_stop(StopMark {
                    addr,
                    at,
                    pid,
                    inode: None,
                    since: Duration::ZERO,
                });
            }
            return;
        };
        let index = if named.is_some() {
            l.sockets.iter().position(|s| s.sk == Some(sk))
        } else if older_than_snapshot {
            // The snapshot is newer: whatever this closed is already gone from it.
            None
        } else {
            l.unnamed_socket(pid)
        };
        let Some(i) = index else {
            if named.is_some() {
                self.listener_by_sk.remove(&sk);
            }
            return;
        };
        if l.sockets[i].confirmed.is_some_and(|c| c > at) {
            // A snapshot saw this socket alive after the close: the name was
            // put on the wrong socket. Only take the name back.
            l.sockets[i].sk = None;
            self.listener_by_sk.remove(&sk);
            return;
        }
        let sock = l.sockets.remove(i);
        // The last process to let go of the socket no longer holds it; if it
        // holds another socket of this address, that socket says so.
        l.acceptors.remove(&pid);
        self.idle.extend(sock.holders.keys().copied());
        self.idle.push(pid);
        let now_empty = l.sockets.is_empty();
        if let Some(sk) = sock.sk {
            self.listener_by_sk.remove(&sk);
        }
        self.push_stop(StopMark {
            addr,
            at,
            pid,
            inode: sock.inode,
            since: sock.since,
        });
        if now_empty {
            self.remove_listener(&addr);
        }
    }

    fn accept(
        &mut self,
        at: Duration,
        sk: SockId,
        tuple: &Tuple,
        pid: u32,
        comm: &str,
        was_queued: bool,
    ) {
        let alive = !self.exited.ended_since(&pid, at);
        if alive {
            self.procs.entry(pid).or_default();
            self.set_comm(pid, comm, at);
        }
        self.idle.push(pid);
        self.pending.remove(tuple);
        if self.conn_by_sk.get(&sk) == Some(tuple) {
            // The same birth delivered twice: already counted.
            return;
        }
        if self.claim_found(sk, tuple, pid, at, alive) {
            return;
        }
        let listener = self.count_accept(at, tuple, pid, alive, was_queued);

        // This birth supersedes a stale entry for the same sk (its end was
        // lost) and any entry for the same tuple: the pre-existing record of
        // this very connection, or a stale one.
        if let Some(old) = self.conn_by_sk.get(&sk).copied() {
            self.remove_conn(&old);
        }
        let prior = self.remove_conn(tuple);
        let holders = match prior {
            // A snapshot newer than this accept saw who holds it since.
            Some(p) if p.sk.is_none() && p.confirmed.is_some_and(|c| c > at) => p.holders,
            _ if alive => BTreeSet::from([pid]),
            _ => BTreeSet::new(),
        };
        if holders.is_empty() {
            return;
        }
        self.insert_conn(
            *tuple,
            Conn {
                sk: Some(sk),
                holders,
                since: at,
                listener,
                confirmed: None,
                unclaimed: false,
            },
        );
    }

    /// Counts an accept by `pid` (and takes it off its listener's queue);
    /// returns the listener it came through.
    fn count_accept(
        &mut self,
        at: Duration,
        tuple: &Tuple,
        pid: u32,
        alive: bool,
        was_queued: bool,
    ) -> Option<ListenAddr> {
        if alive {
            if let Some(p) = self.procs.get_mut(&pid) {
                p.accepted_total += 1;
            }
        }
        let listener = self.best_listener_addr(tuple);
        match listener.and_then(|a| self.listeners.get_mut(&a)) {
            Some(l) => {
                l.accepted_total += 1;
                if was_queued {
                    l.queued = l.queued.saturating_sub(1);
                } else {
                    l.queued_before = l.queued_before.saturating_sub(1);
                }
                if alive {
                    let t = l.acceptors.entry(pid).or_insert(at);
                    *t = (*t).max(at);
                }
            }
            None if was_queued => self.unmatched_queue = self.unmatched_queue.saturating_sub(1),
            None => {}
        }
        listener
    }

    /// The first read or write of a connection a snapshot found accepted
    /// (see [`Conn::unclaimed`]): it gets its socket name, and its holder
    /// is whoever did the I/O unless a snapshot since vouched otherwise.
    /// `false` if `tuple` is no such connection.
    fn claim_found(
        &mut self,
        sk: SockId,
        tuple: &Tuple,
        pid: u32,
        at: Duration,
        alive: bool,
    ) -> bool {
        let Some(conn) = self.conns.get_mut(tuple) else {
            return false;
        };
        if !conn.unclaimed {
            return false;
        }
        conn.unclaimed = false;
        conn.sk = Some(sk);
        let vouched = conn.confirmed.is_some_and(|c| c > at) || conn.holders.contains(&pid);
        if let Some(old) = self.conn_by_sk.insert(sk, *tuple) {
            if old != *tuple {
                self.remove_conn(&old);
            }
        }
        if !vouched && alive {
            self.set_conn_holders(tuple, BTreeSet::from([pid]));
        }
        true
    }

    /// A connection no process read or wrote ended: one that died in an
    /// accept queue, or one a snapshot found accepted (then it is a close;
    /// pre-existing connections never reach the kernel's pending map, so a
    /// snapshot-found connection with this tuple is this socket).
    fn queue_drop(&mut self, at: Duration, tuple: &Tuple) {
        self.pending.remove(tuple);
        if self.close_unnamed(at, tuple) {
            return;
        }
        match self.best_listener(tuple) {
            Some(l) => {
                l.queued = l.queued.saturating_sub(1);
                l.queue_drops_total += 1;
            }
            None => self.unmatched_queue = self.unmatched_queue.saturating_sub(1),
        }
    }

    fn close(&mut self, at: Duration, sk: SockId, tuple: &Tuple, pid: u32) {
        let key = self.conn_by_sk.get(&sk).copied().unwrap_or(*tuple);
        // A connection born after this end is a later one on a reused sk or tuple.
        if self.conns.get(&key).is_none_or(|c| c.since > at) {
            return;
        }
        self.remove_conn(&key);
        self.closed.insert(key, at);
        if let Some(p) = self.procs.get_mut(&pid) {
            p.closed_total += 1;
        }
    }

    /// A live connection the kernel has no name for (pre-existing, or
    /// found held by a snapshot before any I/O) that existed at `at`: an
    /// entry the kernel knows by sk reports its own end as Close.
    fn unnamed_live(&self, tuple: &Tuple, at: Duration) -> Option<&Conn> {
        self.conns
            .get(tuple)
            .filter(|c| c.sk.is_none() && c.since <= at)
    }

    /// Ends the [`Tracker::unnamed_live`] connection `tuple`, charging the
    /// close to its holders; `false` if there is none.
    fn close_unnamed(&mut self, at: Duration, tuple: &Tuple) -> bool {
        if self.unnamed_live(tuple, at).is_none() {
            return false;
        }
        let Some(conn) = self.remove_conn(tuple) else {
            return false;
        };
        self.closed.insert(*tuple, at);
        for pid in &conn.holders {
            if let Some(p) = self.procs.get_mut(pid) {
                p.closed_total += 1;
            }
        }
        true
    }

    fn process_exit(&mut self, at: Duration, pid: u32) {
        self.exited.insert(pid, at);
        // Only pids that hold something have a record.
        if self.procs.remove(&pid).is_none() {
            return;
        }
        for l in self.listeners.values_mut() {
            l.acceptors.remove(&pid);
            for s in &mut l.sockets {
                s.holders.remove(&pid);
            }
        }
        // Connections nobody else holds are closed by the kernel with the
        // process; their Close events (if any) find nothing left.
        let mut orphans = Vec::new();
        for (tuple, conn) in &mut self.conns {
            if conn.holders.remove(&pid) && conn.holders.is_empty() {
                orphans.push(*tuple);
            }
        }
        for tuple in orphans {
            self.remove_conn(&tuple);
            self.closed.insert(tuple, at);
        }
    }

    // --- bookkeeping ------------------------------------------------------

    /// The listener an inbound connection to `tuple.local` came through.
    fn best_listener(&mut self, tuple: &Tuple) -> Option<&mut Listener> {
        let addr = self.best_listener_addr(tuple)?;
        self.listeners.get_mut(&addr)
    }

    /// Most specific match; ties go to the smallest address, for determinism.
    fn best_listener_addr(&self, tuple: &Tuple) -> Option<ListenAddr> {
        self.listeners
            .keys()
            .filter(|a| a.matches(tuple.netns, tuple.local))
            .min_by_key(|a| (std::cmp::Reverse(a.specificity(tuple.local)), **a))
            .copied()
    }

    fn set_comm(&mut self, pid: u32, comm: &str, at: Duration) {
        if comm.is_empty() {
            return;
        }
        if let Some(p) = self.procs.get_mut(&pid) {
            if p.comm.is_empty() || at >= p.comm_at {
                p.comm = comm.to_owned();
                p.comm_at = at;
            }
        }
    }

    /// Inserts a connection, superseding any entry with its tuple or sk.
    fn insert_conn(&mut self, tuple: Tuple, conn: Conn) {
        self.remove_conn(&tuple);
        if let Some(sk) = conn.sk {
            if let Some(old) = self.conn_by_sk.get(&sk).copied() {
                self.remove_conn(&old);
            }
            self.conn_by_sk.insert(sk, tuple);
        }
        for &pid in &conn.holders {
            self.procs.entry(pid).or_default().live += 1;
        }
        self.conns.insert(tuple, conn);
    }

    fn remove_conn(&mut self, tuple: &Tuple) -> Option<Conn> {
        let conn = self.conns.remove(tuple)?;
        if let Some(sk) = conn.sk {
            if self.conn_by_sk.get(&sk) == Some(tuple) {
                self.conn_by_sk.remove(&sk);
            }
        }
        self.release_holders(&conn.holders);
        Some(conn)
    }

    /// Replaces a connection's holders, keeping the per-process counts.
    fn set_conn_holders(&mut self, tuple: &Tuple, holders: BTreeSet<u32>) {
        let Some(conn) = self.conns.get_mut(tuple) else {
            return;
        };
        let old = std::mem::replace(&mut conn.holders, holders.clone());
        self.release_holders(&old);
        for pid in holders {
            self.procs.entry(pid).or_default().live += 1;
        }
    }

    fn release_holders(&mut self, holders: &BTreeSet<u32>) {
        for pid in holders {
            if let Some(p) = self.procs.get_mut(pid) {
                p.live = p.live.saturating_sub(1);
            }
            self.idle.push(*pid);
        }
    }

    fn remove_socket_by_sk(&mut self, addr: ListenAddr, sk: SockId) {
        self.listener_by_sk.remove(&sk);
        let Some(l) = self.listeners.get_mut(&addr) else {
            return;
        };
        if let Some(i) = l.sockets.iter().position(|s| s.sk == Some(sk)) {
            let sock = l.sockets.remove(i);
            self.idle.extend(sock.holders.keys().copied());
        }
        if l.sockets.is_empty() {
            self.remove_listener(&addr);
        }
    }

    /// Forgets a listener. Its connections stay live for their holders and
    /// show no listener; its queue is handed to the unmatched count, which
    /// the coming QueueDrops (the kernel resets a closed listener's queue)
    /// take back.
    fn remove_listener(&mut self, addr: &ListenAddr) {
        let Some(l) = self.listeners.remove(addr) else {
            return;
        };
        self.unmatched_queue += l.queued;
        for s in &l.sockets {
            if let Some(sk) = s.sk {
                if self.listener_by_sk.get(&sk) == Some(addr) {
                    self.listener_by_sk.remove(&sk);
                }
            }
            self.idle.extend(s.holders.keys().copied());
        }
        self.idle.extend(l.acceptors.keys().copied());
        for conn in self.conns.values_mut() {
            if conn.listener == Some(*addr) {
                conn.listener = None;
            }
        }
    }

    fn push_stop(&mut self, mark: StopMark) {
        self.stops.push_back(mark);
        while self.stops.len() > MAX_STOP_MARKS {
            self.stops.pop_front();
        }
    }

    /// Drops the records of processes that let go of their last connection
    /// and listener: a recycled pid must not inherit their counters.
    fn collect_idle(&mut self) {
        let mut idle = std::mem::take(&mut self.idle);
        idle.sort_unstable();
        idle.dedup();
        for pid in idle {
            let holds = self.procs.get(&pid).is_some_and(|p| p.live > 0)
                || self.listeners.values().any(|l| l.holds(pid));
            if !holds {
                self.procs.remove(&pid);
            }
        }
    }
}

fn sorted(pids: &[u32]) -> Vec<u32> {
    let mut v = pids.to_vec();
    v.sort_unstable();
    v
}

/// Whether one of the sorted `pids` holds `c`.
fn held_by_any(c: &Conn, pids: &[u32]) -> bool {
    c.holders.iter().any(|p| pids.binary_search(p).is_ok())
}

fn conn_info(tuple: &Tuple, c: &Conn) -> ConnInfo {
    ConnInfo {
        tuple: *tuple,
        holders: c.holders.iter().copied().collect(),
        since: c.since,
        preexisting: c.sk.is_none() && !c.unclaimed,
        listener: c.listener,
    }
}

/// Pids of `holders` still alive at `at`.
fn alive_holders(exited: &Tombstones<u32>, holders: &[Holder], at: Duration) -> BTreeSet<u32> {
    holders
        .iter()
        .map(|h| h.pid)
        .filter(|pid| !exited.ended_since(pid, at))
        .collect()
}
