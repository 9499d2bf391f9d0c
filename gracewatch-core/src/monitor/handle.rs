//! The running monitor and how consumers talk to it: one task per monitor,
//! whatever its source, serving a cloneable [`MonitorHandle`] (status and
//! change subscriptions, the restart model, events, watch requests, drain
//! notes and the queries).

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::{Monitor, publish::Outlets};
use crate::{
    event::{ConnActivity, Tuple},
    event::{ConnEvent, Snapshot},
    input::{PeerRule, peer_excluded},
    peers::{PeerGrouping, PeerProcess},
    source::{
        MonitorError, Source,
        ebpf::{EbpfSource, ProgramStats, SourceOptions},
        monotonic_now,
        replay::ReplayFeed,
    },
    tracker::{ConnInfo, Restarts, Status, restart::DrainNote},
};

/// Most connections [`MonitorHandle::activity`] reads in one call (the
/// oldest): the read is one sock_diag dump per namespace, filtered by
/// port, so its cost grows with the connections on those ports; the cap
/// keeps one request's memory and time bounded.
pub const MAX_ACTIVITY_CONNECTIONS: usize = 4096;

/// What [`MonitorHandle::activity`] found.
#[derive(Clone, Debug, Default)]
pub struct ActivityReport {
    /// Live connections of the pids, oldest first, at most
    /// [`MAX_ACTIVITY_CONNECTIONS`], each with what the kernel said it is
    /// doing (`None`: it closed before the read, its namespace could not be
    /// entered, or the monitor runs on a recording, which has no kernel).
    pub connections: Vec<(ConnInfo, Option<ConnActivity>)>,
    /// All their live connections, including those past the cap.
    pub total: u64,
}

/// Most connections whose other end [`MonitorHandle::peers`] looks for
/// (the oldest): each costs a socket in the dump and an inode to find in
/// the /proc walk.
pub const MAX_NAMED_PEER_CONNECTIONS: usize = 1024;

/// What [`MonitorHandle::peers`] found.
#[derive(Clone, Debug, Default)]
pub struct PeersReport {
    /// The live connections by peer; each group's `processes` are `None`
    /// unless naming was asked for and the monitor reads the kernel.
    pub grouping: PeerGrouping,
    /// What naming cost, if it ran.
    pub walk: Option<PeerWalkCost>,
}

/// The cost of one naming walk (reported, and logged at debug level).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PeerWalkCost {
    /// Connections whose other end was looked for (the oldest, at most
    /// [`MAX_NAMED_PEER_CONNECTIONS`]).
    pub looked_up: u64,
    /// Other ends found on this host, in the same namespace.
    pub local_ends: u64,
    /// Of those, the ones whose holder the walk found (and confirmed).
    pub named: u64,
    pub processes_read: u64,
    pub socket_fds_read: u64,
    /// The walk stopped at its time or fd bound.
    pub bounded: bool,
    pub took_ms: u64,
}

/// Events buffered per subscriber of [`MonitorHandle::events`].
const EVENT_BACKLOG: usize = 8192;

/// A drain starting (`true`) or ending (`false`) its wait on these pids.
type WatchRequest = (Vec<u32>, bool);

/// Watched processes' exits, as [`MonitorHandle::exit_account`] tells them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitAccount {
    /// Live connections they held that ended because their owner was exiting.
    pub closed_by_exit: u64,
    /// The monitor saw one of them gone.
    pub seen_exit: bool,
}

/// Keeps pids watched (see [`MonitorHandle::watch`]) until dropped.
#[must_use = "the pids are watched only while the guard lives"]
pub struct WatchGuard {
    pids: Vec<u32>,
    tx: mpsc::UnboundedSender<WatchRequest>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        // A monitor that stopped has nothing left to unwatch.
        let _ = self.tx.send((std::mem::take(&mut self.pids), false));
    }
}

/// A question for the monitor task about its tracker's state.
enum Query {
    Connections(Vec<u32>, oneshot::Sender<Vec<ConnInfo>>),
    /// (pids, ports, k): the count and the k oldest.
    Oldest(
        Vec<u32>,
        Vec<u16>,
        usize,
        oneshot::Sender<(u64, Vec<ConnInfo>)>,
    ),
    LiveOf(Vec<u32>, Vec<u16>, oneshot::Sender<u64>),
    /// [`Query::Oldest`] of the connections whose peer the rules exclude
    /// (`true`) or do not exclude (`false`).
    OldestByPeer(
        Vec<u32>,
        Vec<u16>,
        usize,
        Vec<PeerRule>,
        bool,
        oneshot::Sender<(u64, Vec<ConnInfo>)>,
    ),
    /// (pids, ports, max groups, rules): the live connections the rules
    /// do not exclude, grouped by peer.
    Peers(
        Vec<u32>,
        Vec<u16>,
        usize,
        Vec<PeerRule>,
        oneshot::Sender<PeerGrouping>,
    ),
    /// Apply everything the kernel delivered so far, then answer.
    Sync(oneshot::Sender<()>),
    /// Exit accounts of watched pids, counting closes on these ports (all if empty).
    ExitAccount(Vec<u32>, Vec<u16>, oneshot::Sender<ExitAccount>),
    /// Run-time statistics of the eBPF programs (`None` without a kernel source).
    ProgramStats(oneshot::Sender<Option<ProgramStats>>),
}

/// A running monitor: the cheap, cloneable way every consumer (CLI, TUI,
/// agent, drain, library users) reads it. The monitor task publishes a new
/// [`Status`] at a bounded pace (routine changes at most every 20 ms, more
/// seldom on a busy host; significant ones at once), and bumps
/// [`MonitorHandle::changes`] after every batch (a drain wakes on that, so
/// it sees its target's last close as soon as the kernel reports it).
#[derive(Clone)]
pub struct MonitorHandle {
    status: watch::Receiver<Arc<Status>>,
    restarts: watch::Receiver<Arc<Restarts>>,
    drain_notes: mpsc::UnboundedSender<(u32, DrainNote)>,
    changes: watch::Receiver<u64>,
    watch_tx: mpsc::UnboundedSender<WatchRequest>,
    queries: mpsc::Sender<Query>,
    failed: watch::Receiver<Option<String>>,
    events: broadcast::Sender<ConnEvent>,
    /// The source is the kernel (not a recording): [`MonitorHandle::activity`] may read it.
    kernel: bool,
}

impl Monitor<EbpfSource> {
    /// Starts a monitor (attach, snapshot, merge) and runs it on the current
    /// tokio runtime until every handle is dropped.
    pub fn spawn(opts: SourceOptions) -> Result<MonitorHandle, MonitorError> {
        Ok(Self::start(opts)?.serve())
    }
}

impl<S: Source> Monitor<S> {
    /// Runs the monitor as a task on the current tokio runtime until every
    /// handle is dropped, or the source fails (then
    /// [`MonitorHandle::failure`] tells why).
    fn serve(mut self) -> MonitorHandle {
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        self.events = Some(events.clone());
        let (first, first_restarts) = self.observe();
        let (status_tx, status) = watch::channel(Arc::new(first));
        let (restarts_tx, restarts) = watch::channel(first_restarts);
        let (changes_tx, changes) = watch::channel(0u64);
        let out = Outlets {
            changes: changes_tx,
            status: status_tx,
            restarts: restarts_tx,
        };
        let (drain_notes, mut notes_rx) = mpsc::unbounded_channel::<(u32, DrainNote)>();
        let (watch_tx, mut watch_rx) = mpsc::unbounded_channel::<WatchRequest>();
        let (failed_tx, failed) = watch::channel(None);
        let (queries, mut rx) = mpsc::channel::<Query>(64);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = self.next_change() => match changed {
                        Ok(changed) => self.publish(changed, false, &out),
                        Err(e) => {
                            let _ = failed_tx.send(Some(format!("{e:#}")));
                            return;
                        }
                    },
                    Some((pids, on)) = watch_rx.recv() => self.watch(&pids, on),
                    Some((pid, note)) = notes_rx.recv() => {
                        self.restarts.drain_note(pid, note, self.source.now());
                        self.unpublished = true;
                        self.publish(false, true, &out);
                    }
                    q = rx.recv() => match q {
                        Some(q) => self.answer(q, &mut watch_rx, &out),
                        None => return,
                    },
                    () = out.status.closed() => return,
                }
            }
        });
        MonitorHandle {
            status,
            restarts,
            drain_notes,
            changes,
            watch_tx,
            queries,
            failed,
            events,
            kernel: !S::RECORDING,
        }
    }

    /// Answers one query from the tracker's state as it is now.
    fn answer(
        &mut self,
        q: Query,
        watch_rx: &mut mpsc::UnboundedReceiver<WatchRequest>,
        out: &Outlets,
    ) {
        match q {
            Query::ExitAccount(pids, ports, reply) => {
                // A drain asks right after it starts watching: take its
                // watch request first.
                while let Ok((watch, on)) = watch_rx.try_recv() {
                    self.watch(&watch, on);
                }
                let _ = reply.send(self.exits.of(&pids, &ports));
            }
            Query::Connections(pids, reply) => {
                let _ = reply.send(self.tracker.connections_of_any(&pids));
            }
            Query::Oldest(pids, ports, k, reply) => {
                let t0 = monotonic_now();
                let answer = self.tracker.oldest_of(&pids, &ports, k);
                log::debug!(
                    "query: {} connection(s) of {} pid(s), {} oldest listed in {:?}",
                    answer.0,
                    pids.len(),
                    answer.1.len(),
                    monotonic_now().saturating_sub(t0)
                );
                let _ = reply.send(answer);
            }
            Query::OldestByPeer(pids, ports, k, rules, excluded, reply) => {
                let answer = self.tracker.oldest_where(&pids, &ports, k, |t| {
                    peer_excluded(&rules, &t.remote) == excluded
                });
                let _ = reply.send(answer);
            }
            Query::Peers(pids, ports, max_groups, rules, reply) => {
                let answer = self.tracker.peers_where(&pids, &ports, max_groups, |t| {
                    !peer_excluded(&rules, &t.remote)
                });
                let _ = reply.send(answer);
            }
            Query::LiveOf(pids, ports, reply) => {
                let n = pids.iter().map(|&p| self.tracker.live_of(p, &ports)).sum();
                let _ = reply.send(n);
            }
            Query::Sync(reply) => {
                let changed = self.pump();
                self.publish(changed, true, out);
                let _ = reply.send(());
            }
            Query::ProgramStats(reply) => {
                let stats = self.source.program_stats();
                if let Err(e) = &stats {
                    log::debug!("{e:#}");
                }
                let _ = reply.send(stats.ok().flatten());
            }
        }
    }
}

impl MonitorHandle {
    /// The latest status.
    pub fn status(&self) -> Arc<Status> {
        self.status.borrow().clone()
    }

    /// A receiver that wakes on every published status (see
    /// [`MonitorHandle`] for how often that is).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Status>> {
        self.status.clone()
    }

    /// The restart model (roles, handovers, rates) as of the latest
    /// status: published with every status, just before it, so a consumer
    /// woken by [`MonitorHandle::subscribe`] reads the model that goes
    /// with the status (or a newer one).
    pub fn restarts(&self) -> Arc<Restarts> {
        self.restarts.borrow().clone()
    }

    /// A receiver that wakes on every published restart model.
    pub fn subscribe_restarts(&self) -> watch::Receiver<Arc<Restarts>> {
        self.restarts.clone()
    }

    /// Tells the restart model that a drain gracewatch runs on `pid`
    /// started or ended (its role follows: see [`DrainNote`]).
    pub fn note_drain(&self, pid: u32, note: DrainNote) {
        // A monitor that stopped has no model left to tell.
        let _ = self.drain_notes.send((pid, note));
    }

    /// A receiver that wakes after every batch of changes the monitor
    /// applied (cheap: no status is built for it). Ask what changed with
    /// the queries, e.g. [`MonitorHandle::live_of`].
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// Asks the kernel to wake the monitor at once when the last live
    /// connection of one of `pids` closes (others are read within a few
    /// milliseconds), for as long as the guard lives.
    pub fn watch(&self, pids: &[u32]) -> WatchGuard {
        let _ = self.watch_tx.send((pids.to_vec(), true));
        WatchGuard {
            pids: pids.to_vec(),
            tx: self.watch_tx.clone(),
        }
    }

    /// Every event the monitor applies from now on. A receiver that falls
    /// more than a few thousand events behind gets `Lagged` and skips ahead.
    pub fn events(&self) -> broadcast::Receiver<ConnEvent> {
        self.events.subscribe()
    }

    /// Live connections held by any of `pids`, oldest first.
    pub async fn connections(&self, pids: &[u32]) -> anyhow::Result<Vec<ConnInfo>> {
        let (tx, rx) = oneshot::channel();
        self.ask(Query::Connections(pids.to_vec(), tx)).await?;
        rx.await.context("the monitor stopped")
    }

    /// What the live connections of `pids` are doing, read now from the
    /// kernel (`tcp_info` and socket queues through sock_diag, see
    /// [`ConnActivity`]): on demand, never on a tick. Reads the oldest
    /// [`MAX_ACTIVITY_CONNECTIONS`]; `total` says how many there are. The
    /// read runs on a blocking thread, never on the monitor's task.
    pub async fn activity(&self, pids: &[u32]) -> anyhow::Result<ActivityReport> {
        let (total, conns) = self
            .oldest_connections(pids, &[], MAX_ACTIVITY_CONNECTIONS)
            .await?;
        if !self.kernel || conns.is_empty() {
            let connections = conns.into_iter().map(|c| (c, None)).collect();
            return Ok(ActivityReport { connections, total });
        }
        // Each tuple with a pid holding it, to find its namespace.
        let asks: Vec<_> = conns
            .iter()
            .filter_map(|c| Some((c.tuple, *c.holders.first().or(pids.first())?)))
            .collect();
        let found = tokio::task::spawn_blocking(move || crate::source::snapshot::activity(&asks))
            .await
            .context("the activity reader panicked")??;
        let connections = conns
            .into_iter()
            .map(|c| {
                let a = found
                    .binary_search_by_key(&c.tuple, |f| f.0)
                    .ok()
                    .map(|i| found[i].1);
                (c, a)
            })
            .collect();
        Ok(ActivityReport { connections, total })
    }

    /// The live connections of `pids` (only those on `ports` if any are
    /// given, and not those of peers `exclude` names) grouped by peer, at
    /// most `max_groups` groups (see [`crate::peers`]). With `name`, also
    /// the processes on this host holding the other ends of the oldest
    /// [`MAX_NAMED_PEER_CONNECTIONS`]: one sock_diag dump per namespace and
    /// a bounded walk of /proc (see `source::snapshot::peers`), on a
    /// blocking thread, never on the monitor's task. Without `name` (or on
    /// a recording) it is one pass over the tracker's connections.
    pub async fn peers(
        &self,
        pids: &[u32],
        ports: &[u16],
        exclude: &[PeerRule],
        max_groups: usize,
        name: bool,
    ) -> anyhow::Result<PeersReport> {
        let (tx, rx) = oneshot::channel();
        self.ask(Query::Peers(
            pids.to_vec(),
            ports.to_vec(),
            max_groups,
            exclude.to_vec(),
            tx,
        ))
        .await?;
        let mut grouping = rx.await.context("the monitor stopped")?;
        if !name || !self.kernel || grouping.total == 0 {
            return Ok(PeersReport {
                grouping,
                walk: None,
            });
        }
        let (_, conns) = self
            .oldest_by_peer(pids, ports, MAX_NAMED_PEER_CONNECTIONS, exclude, false)
            .await?;
        let asks: Vec<_> = conns
            .iter()
            .filter_map(|c| Some((c.tuple, *c.holders.first().or(pids.first())?)))
            .collect();
        let looked_up = asks.len() as u64;
        let walk = tokio::task::spawn_blocking(move || {
            crate::source::snapshot::peers::peer_ends(&asks, Default::default())
        })
        .await
        .context("the peer walk panicked")??;
        let named = walk.ends.iter().filter(|e| e.1.is_some()).count() as u64;
        grouping.name(walk.ends.into_iter().map(|(t, end)| {
            let end = end.map(|e| PeerProcess {
                pid: e.pid,
                comm: e.comm,
                container_id: e
                    .cgroup
                    .as_deref()
                    .and_then(crate::cgroup::container_id)
                    .map(str::to_owned),
                cgroup: e.cgroup,
                connections: 0,
            });
            (t.remote.ip(), end)
        }));
        Ok(PeersReport {
            grouping,
            walk: Some(PeerWalkCost {
                looked_up,
                local_ends: walk.local_ends as u64,
                named,
                processes_read: walk.processes_read,
                socket_fds_read: walk.socket_fds_read,
                bounded: walk.bounded,
                took_ms: u64::try_from(walk.took.as_millis()).unwrap_or(u64::MAX),
            }),
        })
    }

    /// What exactly these connections (each with a pid holding it, to find
    /// its namespace) are doing, read now from the kernel as for
    /// [`MonitorHandle::activity`]: for callers that found the sockets
    /// themselves (the drain gate's fd look), so it reads the kernel even
    /// on a recording's monitor. A connection the read does not find is
    /// left out; sorted by tuple. At most [`MAX_ACTIVITY_CONNECTIONS`]
    /// are read: more is an error, not a partial answer.
    pub async fn activity_of(
        &self,
        conns: Vec<(Tuple, u32)>,
    ) -> anyhow::Result<Vec<(Tuple, ConnActivity)>> {
        if conns.len() > MAX_ACTIVITY_CONNECTIONS {
            anyhow::bail!(
                "{} connections, more than the {MAX_ACTIVITY_CONNECTIONS} one read takes",
                conns.len()
            );
        }
        if conns.is_empty() {
            return Ok(Vec::new());
        }
        tokio::task::spawn_blocking(move || crate::source::snapshot::activity(&conns))
            .await
            .context("the activity reader panicked")?
    }

    /// How many live connections `pids` hold (only those on `ports` if any
    /// are given), with the `k` oldest, oldest first. Cheap whatever the
    /// count: only the `k` are copied.
    pub async fn oldest_connections(
        &self,
        pids: &[u32],
        ports: &[u16],
        k: usize,
    ) -> anyhow::Result<(u64, Vec<ConnInfo>)> {
        let (tx, rx) = oneshot::channel();
        self.ask(Query::Oldest(pids.to_vec(), ports.to_vec(), k, tx))
            .await?;
        rx.await.context("the monitor stopped")
    }

    /// [`MonitorHandle::oldest_connections`] split by peer: only the
    /// connections whose peer (as the tracker knows it) `rules` exclude
    /// (`excluded`), or only those they do not.
    pub async fn oldest_by_peer(
        &self,
        pids: &[u32],
        ports: &[u16],
        k: usize,
        rules: &[PeerRule],
        excluded: bool,
    ) -> anyhow::Result<(u64, Vec<ConnInfo>)> {
        let (tx, rx) = oneshot::channel();
        self.ask(Query::OldestByPeer(
            pids.to_vec(),
            ports.to_vec(),
            k,
            rules.to_vec(),
            excluded,
            tx,
        ))
        .await?;
        rx.await.context("the monitor stopped")
    }

    /// Live connections held by `pids`, counting only those on `ports` if any are given.
    pub async fn live_of(&self, pids: &[u32], ports: &[u16]) -> anyhow::Result<u64> {
        let (tx, rx) = oneshot::channel();
        self.ask(Query::LiveOf(pids.to_vec(), ports.to_vec(), tx))
            .await?;
        rx.await.context("the monitor stopped")
    }

    /// How `pids`, which a drain watches (see [`MonitorHandle::watch`]),
    /// exited so far: their by-exit closes on `ports` (all if empty) and
    /// whether the monitor saw one gone. Kept by the monitor from the
    /// moment the watch starts, so no lagging subscriber can miss one.
    pub async fn exit_account(&self, pids: &[u32], ports: &[u16]) -> anyhow::Result<ExitAccount> {
        let (tx, rx) = oneshot::channel();
        self.ask(Query::ExitAccount(pids.to_vec(), ports.to_vec(), tx))
            .await?;
        rx.await.context("the monitor stopped")
    }

    /// Returns once every event the kernel delivered before this call has
    /// been applied (and published to status and event subscribers).
    pub async fn sync(&self) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.ask(Query::Sync(tx)).await?;
        rx.await.context("the monitor stopped")
    }

    async fn ask(&self, q: Query) -> anyhow::Result<()> {
        if self.queries.send(q).await.is_err() {
            anyhow::bail!("{}", self.stopped());
        }
        Ok(())
    }

    /// Time the kernel spent running the eBPF programs, and their run
    /// count, since load: `None` for a replay monitor or when the kernel
    /// does not tell. Zero unless BPF statistics are on (see
    /// [`enable_run_time_stats`](crate::source::ebpf::enable_run_time_stats)).
    pub async fn program_stats(&self) -> anyhow::Result<Option<ProgramStats>> {
        let (tx, rx) = oneshot::channel();
        self.ask(Query::ProgramStats(tx)).await?;
        rx.await.context("the monitor stopped")
    }

    /// Why the monitor task stopped, if it failed.
    pub fn failure(&self) -> Option<String> {
        self.failed.borrow().clone()
    }

    /// "the monitor stopped", with why if it failed.
    pub fn stopped(&self) -> String {
        match self.failure() {
            Some(why) => format!("the monitor stopped: {why}"),
            None => "the monitor stopped".to_owned(),
        }
    }
}

impl MonitorHandle {
    /// A monitor with no kernel behind it: a [`Tracker`](crate::tracker::Tracker)
    /// that merges `snapshot` (skipped if empty), applies the recorded
    /// `events`, and then answers like a live monitor (status,
    /// subscriptions, queries, drains). For tests and demos that must run
    /// without root. Must be called within a tokio runtime.
    pub fn from_replay(events: Vec<ConnEvent>, snapshot: Snapshot) -> MonitorHandle {
        Self::from_replay_with_feed(events, snapshot).0
    }

    /// [`MonitorHandle::from_replay`], plus a feed to hand it more events
    /// later, each applied and published as if the kernel had sent it.
    pub fn from_replay_with_feed(
        events: Vec<ConnEvent>,
        snapshot: Snapshot,
    ) -> (MonitorHandle, ReplayFeed) {
        let (monitor, feed) = Monitor::replay(events, snapshot);
        (monitor.serve(), feed)
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use super::*;
    use crate::event::Tuple;

    /// Pids no process has: a replay must not look at the host, so they
    /// stay as the events say.
    const PID: u32 = 4_000_000_001;

    fn tuple(peer_port: u16) -> Tuple {
        let addr = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().expect("address") };
        Tuple {
            netns: 1,
            local: addr(80),
            remote: addr(peer_port),
        }
    }

    fn accept(sk: u64) -> ConnEvent {
        accept_by(PID, sk)
    }

    fn accept_by(pid: u32, sk: u64) -> ConnEvent {
        ConnEvent::Accept {
            at: Duration::from_millis(sk),
            sk,
            tuple: tuple(40000 + sk as u16),
            pid,
            comm: "t".to_owned(),
            was_queued: false,
        }
    }

    fn close_by_exit(sk: u64) -> ConnEvent {
        ConnEvent::Close {
            at: Duration::from_millis(sk),
            sk,
            tuple: tuple(40000 + sk as u16),
            pid: PID,
            by_exit: true,
        }
    }

    fn live(handle: &MonitorHandle) -> Option<u64> {
        live_of(handle, PID)
    }

    fn live_of(handle: &MonitorHandle, pid: u32) -> Option<u64> {
        let status = handle.status();
        let process = status.processes.iter().find(|p| p.pid == pid);
        process.map(|p| p.live)
    }

    /// The replay runs on the same core as the kernel monitor and keeps
    /// its own semantics: recorded events are the starting state (in no
    /// exit account), fed ones are applied and published at once on
    /// `sync`, every pid's exit account is kept (watched or not, and after
    /// its watch ends), pids it never heard of are not looked up on the
    /// host, and it has no program statistics and never fails.
    #[tokio::test]
    async fn a_replay_keeps_its_semantics_on_the_shared_core() {
        let (handle, feed) = MonitorHandle::from_replay_with_feed(
            vec![accept(1), accept(2), close_by_exit(2)],
            Snapshot::default(),
        );
        assert_eq!(live(&handle), Some(1));
        let account = handle.exit_account(&[PID], &[]).await.expect("account");
        assert_eq!(account, ExitAccount::default(), "recorded events are state");

        let changes = *handle.changes().borrow();
        feed.send(accept(3)).expect("feed");
        feed.send(close_by_exit(1)).expect("feed");
        handle.sync().await.expect("sync");
        assert_eq!(live(&handle), Some(1));
        assert!(*handle.changes().borrow() > changes);
        let account = handle.exit_account(&[PID], &[80]).await.expect("account");
        assert_eq!(account.closed_by_exit, 1, "unwatched pids are kept");

        drop(handle.watch(&[PID]));
        feed.send(ConnEvent::ProcessExit {
            at: Duration::from_millis(10),
            pid: PID,
        })
        .expect("feed");
        handle.sync().await.expect("sync");
        let account = handle.exit_account(&[PID], &[]).await.expect("account");
        assert_eq!(
            account,
            ExitAccount {
                closed_by_exit: 1,
                seen_exit: true
            },
            "kept after the watch ended"
        );
        assert_eq!(live(&handle), None, "the recorded exit ended it");

        // Past a housekeeping round: no liveness look, no rescan, no failure.
        feed.send(accept_by(PID + 1, 4)).expect("feed");
        tokio::time::sleep(super::super::pump::HOUSEKEEPING * 2).await;
        handle.sync().await.expect("sync");
        assert_eq!(
            live_of(&handle, PID + 1),
            Some(1),
            "a pid unknown to the host stays"
        );
        assert_eq!(handle.program_stats().await.expect("stats"), None);
        assert_eq!(handle.failure(), None);
        drop(feed);
        handle
            .sync()
            .await
            .expect("a replay answers after its feed is dropped");
    }

    /// The restart model goes out with every status (whose roles it
    /// fills), follows the events, and hears the drains a consumer runs
    /// ([`MonitorHandle::note_drain`]).
    #[tokio::test]
    async fn the_restart_model_is_published_and_hears_drains() {
        use crate::tracker::restart::{Change, Role, Why};

        let (handle, feed) =
            MonitorHandle::from_replay_with_feed(vec![accept(1), accept(2)], Snapshot::default());
        let role = |h: &MonitorHandle| h.restarts().process(PID).map(|p| (p.role, p.why));
        assert_eq!(role(&handle), Some((Role::Serving, Why::Seen)));

        let mut published = handle.subscribe_restarts();
        handle.note_drain(PID, DrainNote::Started);
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while role(&handle) != Some((Role::Draining, Why::DrainStarted)) {
                published.changed().await.expect("the monitor runs");
            }
        })
        .await
        .expect("the drain note reached the model");
        // The status that went out with it carries the role.
        let status = handle.status();
        let listed = status.processes.iter().find(|p| p.pid == PID);
        assert_eq!(listed.map(|p| p.role), Some(Role::Draining), "{status:#?}");
        assert!(listed.is_some_and(|p| p.role_since_ms <= status.uptime_ms));

        for sk in [1, 2] {
            feed.send(ConnEvent::Close {
                at: Duration::from_millis(10 + sk),
                sk,
                tuple: tuple(40000 + sk as u16),
                pid: PID,
                by_exit: false,
            })
            .expect("feed");
        }
        handle.sync().await.expect("sync");
        handle.note_drain(PID, DrainNote::Drained);
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while role(&handle).is_some_and(|(r, _)| r != Role::Drained) {
                published.changed().await.expect("the monitor runs");
            }
        })
        .await
        .expect("drained");
        let restarts = handle.restarts();
        let drained = restarts.facts_after(None).any(|f| {
            f.pid == PID
                && matches!(
                    f.change,
                    Change::Role {
                        to: Role::Drained,
                        drained: Some((_, 2)),
                        ..
                    }
                )
        });
        assert!(drained, "{restarts:#?}");
    }
}
