//! The monitor joins a [`source`](crate::source) to a [`Tracker`]: it attaches
//! the programs *first*, then takes the startup snapshot, so no connection
//! falls in a gap between the two, and it dedupes what both saw so none is
//! counted twice. Afterwards it folds kernel events in as they arrive and
//! notices processes that exited. Consumers read [`Status`] from it.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::{
    event::{ConnEvent, Snapshot, Tuple},
    source::{
        Liveness, MonitorError,
        ebpf::{EbpfSource, ProgramStats, READER_QUIET, READER_TAIL, SourceOptions},
        liveness, monotonic_now,
        replay::{ReplayClock, ReplayFeed},
        snapshot,
    },
    tracker::{ConnInfo, Status, Tracker},
};

/// Events buffered per subscriber of [`MonitorHandle::events`].
const EVENT_BACKLOG: usize = 8192;

/// Rescans refresh what events cannot tell: which processes hold a
/// listener they inherited (fork/exec handover) or got over a unix socket,
/// holders that closed their copy, and connections whose end no event
/// reported (lost events, a reset racing its accept, a full kernel table). They run
/// at most this often, and never take more than ~5% of the time (the
/// interval grows to 20× the last rescan's duration on a busy host).
const RESCAN_MIN: Duration = Duration::from_secs(1);

/// How often exited processes and lost events are looked for.
const HOUSEKEEPING: Duration = Duration::from_millis(500);

/// Building a [`Status`] walks every live connection. Routine changes
/// (connections coming and going) are published at most every
/// `max(PUBLISH_MIN, 20 × the last build's duration)`, so publishing costs
/// at most ~5% of a core even on a host with 100k connections; significant
/// ones (an exit, a listener, lost events: see
/// [`Tracker::take_significant`]) at once. Drains do not wait for a status:
/// they wake on [`MonitorHandle::changes`], bumped after every batch.
const PUBLISH_MIN: Duration = Duration::from_millis(20);

pub struct Monitor {
    source: EbpfSource,
    tracker: Tracker,
    started: Duration,
    lost_seen: u64,
    batch: Vec<ConnEvent>,
    /// When the ring buffer last had records (see [`READER_TAIL`]).
    last_records: Duration,
    /// Changes not yet published, and when routine ones may be (see [`PUBLISH_MIN`]).
    unpublished: bool,
    next_publish: Duration,
    /// Pids drains wait on, with how many drains wait on each.
    watched: BTreeMap<u32, usize>,
    /// Exits and by-exit closes of watched pids, for drains to query
    /// (see [`ExitAccounts`]).
    exits: ExitAccounts,
    /// A liveness look failed (EMFILE…) and was logged: not again until
    /// one full pass succeeds.
    liveness_doubt: bool,
    next_housekeeping: Duration,
    /// Every applied event, for consumers that show or count them.
    events: Option<broadcast::Sender<ConnEvent>>,
    /// A background snapshot in flight (see [`RESCAN_MIN`]).
    rescan: Option<tokio::task::JoinHandle<anyhow::Result<(Snapshot, Duration)>>>,
    next_rescan: Duration,
    untracked: Untracked,
}

/// Connections the kernel side could not track: accepts that found `LIVE`
/// full, and pre-existing connections whose registration in `PREEXISTING`
/// failed. Both degrade the same way: counted (once per episode, as a
/// [`ConnEvent::MapFull`]), logged once, and left to the rescans, which
/// find the untracked connections and retire those that ended.
#[derive(Debug, Default)]
struct Untracked {
    /// The kernel's count of failed `LIVE` inserts, as last read.
    kernel_seen: u64,
    /// It rose at the last housekeeping.
    kernel_failing: bool,
    /// The last snapshot merge could not register some connections.
    registration_failing: bool,
    episodes: u64,
}

impl Monitor {
    /// Attaches, snapshots, merges. When this returns, `status()` is exact.
    pub fn start(opts: SourceOptions) -> Result<Self, MonitorError> {
        let mut monitor = Self::attach(opts)?;
        monitor.merge_startup_snapshot()?;
        Ok(monitor)
    }

    /// The status once, exact when it returns, as `gracewatch status`
    /// prints it: attaches, snapshots, merges, detaches.
    ///
    /// Unlike [`Monitor::start`] it does not register the snapshot's
    /// connections with the programs (nor look at them again after): that
    /// is only for a monitor that goes on to see them end, and at 100k
    /// connections it is most of the startup's system calls.
    pub fn status_once(opts: SourceOptions) -> Result<Status, MonitorError> {
        let mut monitor = Self::attach(opts)?;
        let t0 = monotonic_now();
        let snap = monitor.snapshot()?;
        let t1 = monotonic_now();
        let started = monitor.started;
        let mut tracker = std::mem::take(&mut monitor.tracker);
        // The programs have done their part. Detaching them waits out a
        // kernel grace period per tracepoint (~80 ms each here), so that
        // runs while we merge.
        let detached = std::thread::Builder::new()
            .name("gw-detach".to_owned())
            .spawn(move || drop(monitor))
            .context("failed to spawn a thread to detach the programs")?;
        tracker.merge_snapshot(&snap);
        drop(snap);
        let status = status_of(&tracker, started);
        let t2 = monotonic_now();
        detached
            .join()
            .map_err(|_| anyhow::anyhow!("the thread detaching the programs panicked"))?;
        log::debug!(
            "status: attach {:?}, snapshot {:?}, merge {:?}, detach waited {:?}",
            t0.saturating_sub(started),
            t1.saturating_sub(t0),
            t2.saturating_sub(t1),
            monotonic_now().saturating_sub(t2)
        );
        Ok(status)
    }

    /// Loads and attaches the programs; the tracker knows nothing yet.
    fn attach(opts: SourceOptions) -> Result<Self, MonitorError> {
        let started = monotonic_now();
        let source = EbpfSource::start(opts)?;
        Ok(Self {
            source,
            tracker: Tracker::new(),
            started,
            lost_seen: 0,
            batch: Vec::new(),
            last_records: started,
            unpublished: false,
            next_publish: started,
            watched: BTreeMap::new(),
            exits: ExitAccounts::default(),
            liveness_doubt: false,
            next_housekeeping: started + HOUSEKEEPING,
            events: None,
            rescan: None,
            next_rescan: started + RESCAN_MIN,
            untracked: Untracked::default(),
        })
    }

    fn merge_startup_snapshot(&mut self) -> anyhow::Result<()> {
        let t0 = monotonic_now();
        let snap = self.snapshot()?;
        let t1 = monotonic_now();
        let added = self.tracker.merge_snapshot(&snap);
        drop(snap);
        let t2 = monotonic_now();
        // A registration that fails leaves the connection counted, its end
        // seen by a rescan instead of an event: degrade, do not abort.
        self.register_added(&added, t2);
        self.forget_retired();
        let t3 = monotonic_now();
        if !added.is_empty() {
            // A pre-existing connection that ended between the snapshot and
            // its registration produced no event: look again and retire those.
            let gone = snapshot::gone(&added)
                .context("failed to re-check the startup snapshot's connections")?;
            drop(added);
            for tuple in &gone {
                if self.source.unregister_preexisting(tuple) {
                    self.tracker.forget_connection(tuple);
                }
            }
            self.pump();
        }
        snapshot::release_freed_memory();
        log::debug!(
            "startup: attach {:?}, snapshot {:?}, merge {:?}, registration {:?}, re-check {:?}",
            t0.saturating_sub(self.started),
            t1.saturating_sub(t0),
            t2.saturating_sub(t1),
            t3.saturating_sub(t2),
            monotonic_now().saturating_sub(t3)
        );
        Ok(())
    }

    /// The startup snapshot, with everything the programs saw up to now
    /// folded in first, so the merge can recognise connections both saw.
    fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        let snap = snapshot::take(monotonic_now).context("failed to take the startup snapshot")?;
        self.pump();
        Ok(snap)
    }

    /// Applies whatever the kernel has delivered, without waiting.
    fn pump(&mut self) -> bool {
        self.batch.clear();
        self.source.drain(&mut self.batch);
        if self.batch.is_empty() {
            return false;
        }
        self.last_records = monotonic_now();
        for ev in &self.batch {
            self.tracker.apply(ev);
            self.exits.record(ev, |pid| self.watched.contains_key(&pid));
        }
        if let Some(tx) = &self.events {
            for ev in &self.batch {
                let _ = tx.send(ev.clone());
            }
        }
        true
    }

    fn apply_one(&mut self, ev: ConnEvent) {
        self.tracker.apply(&ev);
        self.exits
            .record(&ev, |pid| self.watched.contains_key(&pid));
        if let Some(tx) = &self.events {
            let _ = tx.send(ev);
        }
    }

    /// Waits for the next change (kernel events, an exited process, lost
    /// events). Returns after at most the housekeeping interval.
    ///
    /// The programs wake this reader at once only for records that can end
    /// a drain, and otherwise at most every few milliseconds; so while
    /// records keep coming it also looks on its own every
    /// [`READER_TAIL`], and waits for a wake-up alone after
    /// [`READER_QUIET`] without any (an idle host costs no wake-ups).
    pub async fn next_change(&mut self) -> anyhow::Result<bool> {
        let now = monotonic_now();
        let mut wait = self.next_housekeeping.saturating_sub(now);
        if now.saturating_sub(self.last_records) < READER_QUIET {
            wait = wait.min(READER_TAIL);
        }
        if self.unpublished {
            wait = wait.min(self.next_publish.saturating_sub(now));
        }
        let mut changed = false;
        tokio::select! {
            r = self.source.readable() => { r?; }
            () = tokio::time::sleep(wait) => {}
            done = join_pending(&mut self.rescan) => {
                self.rescan = None;
                match done {
                    Ok(Ok((snap, took))) => {
                        changed |= self.merge_rescan(&snap);
                        self.next_rescan = monotonic_now() + RESCAN_MIN.max(took * 20);
                    }
                    Ok(Err(e)) => log::warn!("rescan failed: {e:#}"),
                    Err(e) => log::warn!("rescan task failed: {e}"),
                }
            }
        }
        changed |= self.pump();
        let now = monotonic_now();
        if now >= self.next_housekeeping {
            self.next_housekeeping = now + HOUSEKEEPING;
            changed |= self.housekeeping(now);
        }
        Ok(changed)
    }

    /// Folds a periodic snapshot in; connections it finds that no event
    /// told of (lost events, accepts the programs cannot see) are registered
    /// like the startup ones.
    fn merge_rescan(&mut self, snap: &Snapshot) -> bool {
        self.pump();
        let added = self.tracker.merge_snapshot(snap);
        let now = monotonic_now();
        self.register_added(&added, now);
        self.forget_retired();
        true
    }

    /// Drops the kernel entries of the connections the programs reported
    /// and the last merge found gone: they would otherwise stay until the
    /// socket is freed.
    fn forget_retired(&mut self) {
        for (sk, since) in self.tracker.take_retired() {
            self.source.forget_live(sk, since);
        }
    }

    /// Registers a merge's new pre-existing connections with the programs.
    /// Failures (a full `PREEXISTING` map) are logged once and counted
    /// (see [`Untracked`]); the connections stay counted.
    fn register_added(&mut self, added: &[(Tuple, u32)], now: Duration) {
        let mut failed = 0usize;
        let mut first = None;
        for (tuple, pid) in added {
            if let Err(e) = self.source.register_preexisting(tuple, *pid) {
                failed += 1;
                first.get_or_insert(e);
            }
        }
        let was = self.untracked.registration_failing;
        self.untracked.registration_failing = failed > 0;
        if let Some(e) = first {
            if !was && !self.untracked.kernel_failing {
                self.untracked_episode(
                    now,
                    format_args!(
                        "{failed} pre-existing connection(s) could not be registered with the \
                         kernel ({e:#}): their ends are seen by rescans only"
                    ),
                );
            }
        }
    }

    /// Starts an episode of untracked connections: counted, logged once,
    /// and a rescan to find them (later ones are found by the periodic
    /// rescans).
    fn untracked_episode(&mut self, now: Duration, why: std::fmt::Arguments<'_>) {
        log::warn!("{why}");
        self.next_rescan = self.next_rescan.min(now);
        self.untracked.episodes += 1;
        self.apply_one(ConnEvent::MapFull {
            at: now,
            total: self.untracked.episodes,
        });
    }

    fn housekeeping(&mut self, now: Duration) -> bool {
        let mut changed = false;
        let lost = self.source.lost_events();
        if lost != self.lost_seen {
            self.lost_seen = lost;
            self.apply_one(ConnEvent::Lost {
                at: now,
                total: lost,
            });
            // Counts may be stale: repair them with a rescan right away.
            self.next_rescan = now;
            changed = true;
        }
        // Unreadable: as if unchanged (the periodic rescans go on anyway).
        let full = self
            .source
            .untracked_map_full()
            .unwrap_or(self.untracked.kernel_seen);
        let was = self.untracked.kernel_failing;
        self.untracked.kernel_failing = full != self.untracked.kernel_seen;
        if self.untracked.kernel_failing {
            let n = full.saturating_sub(self.untracked.kernel_seen);
            self.untracked.kernel_seen = full;
            if !was && !self.untracked.registration_failing {
                self.untracked_episode(
                    now,
                    format_args!(
                        "the kernel's connection table is full ({n} accept(s) not tracked; \
                         raise --max-connections): counting them from rescans"
                    ),
                );
                changed = true;
            }
        }
        let pids: Vec<u32> = self.tracker.pids().collect();
        let mut doubt = None;
        for pid in pids {
            match liveness(pid) {
                Liveness::Alive => {}
                Liveness::Exited => {
                    self.apply_one(ConnEvent::ProcessExit { at: now, pid });
                    changed = true;
                }
                // Not an exit: its connections stay counted until a look succeeds.
                Liveness::Unknown(e) => doubt = doubt.or(Some((pid, e))),
            }
        }
        match doubt {
            Some((pid, e)) if !self.liveness_doubt => {
                self.liveness_doubt = true;
                log::warn!(
                    "cannot tell whether pid {pid} still runs ({}): its connections stay counted; said once until it recovers",
                    crate::source::process::errno_text(e)
                );
            }
            Some(_) => {}
            None if self.liveness_doubt => {
                self.liveness_doubt = false;
                log::info!("process liveness checks work again");
            }
            None => {}
        }
        if self.rescan.is_none() && now >= self.next_rescan {
            self.rescan = Some(tokio::task::spawn_blocking(|| {
                let t0 = monotonic_now();
                let snap = snapshot::take(monotonic_now)?;
                Ok((snap, monotonic_now().saturating_sub(t0)))
            }));
        }
        changed
    }

    /// After a batch (`changed`): bumps the change counter, and publishes a
    /// status if changes are waiting and one is due (see [`PUBLISH_MIN`])
    /// or `now` asks for it regardless of the pace.
    fn publish(
        &mut self,
        changed: bool,
        now: bool,
        changes: &watch::Sender<u64>,
        status: &watch::Sender<Arc<Status>>,
    ) {
        if changed {
            changes.send_modify(|n| *n += 1);
        }
        self.unpublished |= changed;
        if !self.unpublished {
            return;
        }
        let t0 = monotonic_now();
        let significant = self.tracker.take_significant();
        if !now && !significant && t0 < self.next_publish {
            return;
        }
        status.send_replace(Arc::new(self.status()));
        let took = monotonic_now().saturating_sub(t0);
        self.unpublished = false;
        self.next_publish = t0 + PUBLISH_MIN.max(took * 20);
    }

    /// One more (`on`) or one less drain waiting on each of `pids`; the
    /// kernel is told when a pid's first drain starts and its last ends.
    fn watch(&mut self, pids: &[u32], on: bool) {
        for &pid in pids {
            let n = self.watched.entry(pid).or_default();
            let was = *n;
            *n = if on { was + 1 } else { was.saturating_sub(1) };
            let now = *n;
            if now == 0 {
                self.watched.remove(&pid);
                self.exits.forget(pid);
            }
            if (was == 0) != (now == 0) {
                if let Err(e) = self.source.set_watched(pid, on) {
                    // Without it the drain still reacts within the reader's tail period.
                    log::warn!("{e:#}");
                }
            }
        }
    }

    pub fn status(&self) -> Status {
        status_of(&self.tracker, self.started)
    }

    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }
}

/// `tracker`'s status now, for a monitor started at `started`.
fn status_of(tracker: &Tracker, started: Duration) -> Status {
    let now = monotonic_now();
    let mut status = tracker.status(now);
    status.uptime_ms = now.saturating_sub(started).as_millis() as u64;
    status
}

/// A drain starting (`true`) or ending (`false`) its wait on these pids.
type WatchRequest = (Vec<u32>, bool);

/// What drains must know about their targets' exits, kept by the monitor
/// itself (a drain reading the event broadcast could lag behind and miss
/// them): per pid, connections that ended because their owner was exiting
/// (by local port), and whether the process was seen gone. Only pids some
/// drain watches are kept, and forgotten when the last drain stops.
#[derive(Debug, Default)]
struct ExitAccounts {
    closes: HashMap<u32, HashMap<u16, u64>>,
    exited: HashSet<u32>,
}

impl ExitAccounts {
    fn record(&mut self, ev: &ConnEvent, keep: impl Fn(u32) -> bool) {
        match ev {
            ConnEvent::Close {
                pid,
                by_exit: true,
                tuple,
                ..
            }
            | ConnEvent::PreexistingClose {
                pid,
                by_exit: true,
                tuple,
                ..
            } if keep(*pid) => {
                *self
                    .closes
                    .entry(*pid)
                    .or_default()
                    .entry(tuple.local.port())
                    .or_default() += 1;
            }
            ConnEvent::ProcessExit { pid, .. } if keep(*pid) => {
                self.exited.insert(*pid);
            }
            _ => {}
        }
    }

    fn forget(&mut self, pid: u32) {
        self.closes.remove(&pid);
        self.exited.remove(&pid);
    }

    /// The accounts of `pids` taken together.
    fn of(&self, pids: &[u32], ports: &[u16]) -> ExitAccount {
        let closed_by_exit = pids
            .iter()
            .filter_map(|pid| self.closes.get(pid))
            .flat_map(|by_port| by_port.iter())
            .filter(|(port, _)| ports.is_empty() || ports.contains(port))
            .map(|(_, n)| n)
            .sum();
        ExitAccount {
            closed_by_exit,
            seen_exit: pids.iter().any(|pid| self.exited.contains(pid)),
        }
    }
}

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
    /// Apply everything the kernel delivered so far, then answer.
    Sync(oneshot::Sender<()>),
    /// Exit accounts of watched pids, counting closes on these ports (all if empty).
    ExitAccount(Vec<u32>, Vec<u16>, oneshot::Sender<ExitAccount>),
    /// Run-time statistics of the eBPF programs (`None` without a kernel source).
    ProgramStats(oneshot::Sender<Option<ProgramStats>>),
}

/// A running monitor: the cheap, cloneable way every consumer (CLI, TUI,
/// agent, drain, library users) reads it. The monitor task publishes a new
/// [`Status`] at the pace described at [`PUBLISH_MIN`], and bumps
/// [`MonitorHandle::changes`] after every batch (a drain wakes on that, so
/// it sees its target's last close as soon as the kernel reports it).
#[derive(Clone)]
pub struct MonitorHandle {
    status: watch::Receiver<Arc<Status>>,
    changes: watch::Receiver<u64>,
    watch_tx: mpsc::UnboundedSender<WatchRequest>,
    queries: mpsc::Sender<Query>,
    failed: watch::Receiver<Option<String>>,
    events: broadcast::Sender<ConnEvent>,
}

impl Monitor {
    /// Starts a monitor (attach, snapshot, merge) and runs it on the current
    /// tokio runtime until every handle is dropped.
    pub fn spawn(opts: SourceOptions) -> Result<MonitorHandle, MonitorError> {
        let mut monitor = Self::start(opts)?;
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        monitor.events = Some(events.clone());
        let (status_tx, status) = watch::channel(Arc::new(monitor.status()));
        let (changes_tx, changes) = watch::channel(0u64);
        let (watch_tx, mut watch_rx) = mpsc::unbounded_channel::<WatchRequest>();
        let (failed_tx, failed) = watch::channel(None);
        let (queries, mut rx) = mpsc::channel::<Query>(64);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = monitor.next_change() => match changed {
                        Ok(changed) => monitor.publish(changed, false, &changes_tx, &status_tx),
                        Err(e) => {
                            let _ = failed_tx.send(Some(format!("{e:#}")));
                            return;
                        }
                    },
                    Some((pids, on)) = watch_rx.recv() => monitor.watch(&pids, on),
                    q = rx.recv() => match q {
                        Some(Query::ExitAccount(pids, ports, reply)) => {
                            // A drain asks right after it starts watching:
                            // take its watch request first.
                            while let Ok((watch, on)) = watch_rx.try_recv() {
                                monitor.watch(&watch, on);
                            }
                            let _ = reply.send(monitor.exits.of(&pids, &ports));
                        }
                        Some(Query::Connections(pids, reply)) => {
                            let _ = reply.send(monitor.tracker.connections_of_any(&pids));
                        }
                        Some(Query::Oldest(pids, ports, k, reply)) => {
                            let t0 = monotonic_now();
                            let answer = monitor.tracker.oldest_of(&pids, &ports, k);
                            log::debug!(
                                "query: {} connection(s) of {} pid(s), {} oldest listed in {:?}",
                                answer.0,
                                pids.len(),
                                answer.1.len(),
                                monotonic_now().saturating_sub(t0)
                            );
                            let _ = reply.send(answer);
                        }
                        Some(Query::LiveOf(pids, ports, reply)) => {
                            let n = pids.iter().map(|&p| monitor.tracker.live_of(p, &ports)).sum();
                            let _ = reply.send(n);
                        }
                        Some(Query::Sync(reply)) => {
                            let changed = monitor.pump();
                            monitor.publish(changed, true, &changes_tx, &status_tx);
                            let _ = reply.send(());
                        }
                        Some(Query::ProgramStats(reply)) => {
                            let stats = monitor.source.program_stats();
                            if let Err(e) = &stats {
                                log::debug!("{e:#}");
                            }
                            let _ = reply.send(stats.ok());
                        }
                        None => return,
                    },
                    () = status_tx.closed() => return,
                }
            }
        });
        Ok(MonitorHandle {
            status,
            changes,
            watch_tx,
            queries,
            failed,
            events,
        })
    }
}

impl MonitorHandle {
    /// The latest status.
    pub fn status(&self) -> Arc<Status> {
        self.status.borrow().clone()
    }

    /// A receiver that wakes on every published status (see
    /// [`PUBLISH_MIN`] for how often that is).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Status>> {
        self.status.clone()
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
            anyhow::bail!(
                "the monitor stopped: {}",
                self.failure().unwrap_or_default()
            );
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
}

/// Awaits the task if there is one; never resolves otherwise.
async fn join_pending<T>(
    task: &mut Option<tokio::task::JoinHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

impl MonitorHandle {
    /// A monitor with no kernel behind it: a [`Tracker`] that merges
    /// `snapshot` (skipped if empty), applies the recorded `events`, and then
    /// answers like a live monitor (status, subscriptions, queries, drains).
    /// For tests and demos that must run without root. Must be called
    /// within a tokio runtime.
    pub fn from_replay(events: Vec<ConnEvent>, snapshot: Snapshot) -> MonitorHandle {
        Self::from_replay_with_feed(events, snapshot).0
    }

    /// [`MonitorHandle::from_replay`], plus a feed to hand it more events
    /// later, each applied and published as if the kernel had sent it.
    pub fn from_replay_with_feed(
        events: Vec<ConnEvent>,
        snapshot: Snapshot,
    ) -> (MonitorHandle, ReplayFeed) {
        let started = events
            .iter()
            .map(ConnEvent::at)
            .chain((snapshot != Snapshot::default()).then_some(snapshot.at))
            .min()
            .unwrap_or_default();
        let mut clock = ReplayClock::new(started);
        let mut tracker = Tracker::new();
        if snapshot != Snapshot::default() {
            clock.observe(snapshot.at);
            tracker.merge_snapshot(&snapshot);
        }
        for ev in &events {
            clock.observe(ev.at());
            tracker.apply(ev);
        }
        let status_of = move |tracker: &Tracker, clock: &ReplayClock| {
            let now = clock.now();
            let mut status = tracker.status(now);
            status.uptime_ms = now.saturating_sub(started).as_millis() as u64;
            Arc::new(status)
        };
        let (feed, mut feed_rx) = ReplayFeed::channel();
        let (events_tx, _) = broadcast::channel(EVENT_BACKLOG);
        let (status_tx, status) = watch::channel(status_of(&tracker, &clock));
        let (changes_tx, changes) = watch::channel(0u64);
        // A replay has no kernel to tell: watch requests are dropped.
        let (watch_tx, _) = mpsc::unbounded_channel::<WatchRequest>();
        let (never_fails, failed) = watch::channel(None);
        let (queries, mut rx) = mpsc::channel::<Query>(64);
        let publish = events_tx.clone();
        tokio::spawn(async move {
            // A replay never fails; held so `failure()` keeps reading `None`.
            let _never_fails = never_fails;
            let mut feed_open = true;
            // A replay keeps the exit accounts of every pid (tests are small).
            let mut exits = ExitAccounts::default();
            let apply = |ev: ConnEvent,
                         tracker: &mut Tracker,
                         clock: &mut ReplayClock,
                         exits: &mut ExitAccounts| {
                clock.observe(ev.at());
                tracker.apply(&ev);
                exits.record(&ev, |_| true);
                let _ = publish.send(ev);
            };
            loop {
                tokio::select! {
                    ev = feed_rx.recv(), if feed_open => match ev {
                        Some(ev) => {
                            apply(ev, &mut tracker, &mut clock, &mut exits);
                            while let Ok(ev) = feed_rx.try_recv() {
                                apply(ev, &mut tracker, &mut clock, &mut exits);
                            }
                            changes_tx.send_modify(|n| *n += 1);
                            status_tx.send_replace(status_of(&tracker, &clock));
                        }
                        None => feed_open = false,
                    },
                    q = rx.recv() => match q {
                        Some(Query::Connections(pids, reply)) => {
                            let _ = reply.send(tracker.connections_of_any(&pids));
                        }
                        Some(Query::Oldest(pids, ports, k, reply)) => {
                            let _ = reply.send(tracker.oldest_of(&pids, &ports, k));
                        }
                        Some(Query::LiveOf(pids, ports, reply)) => {
                            let n = pids.iter().map(|&p| tracker.live_of(p, &ports)).sum();
                            let _ = reply.send(n);
                        }
                        Some(Query::Sync(reply)) => {
                            let mut any = false;
                            while let Ok(ev) = feed_rx.try_recv() {
                                apply(ev, &mut tracker, &mut clock, &mut exits);
                                any = true;
                            }
                            if any {
                                changes_tx.send_modify(|n| *n += 1);
                                status_tx.send_replace(status_of(&tracker, &clock));
                            }
                            let _ = reply.send(());
                        }
                        Some(Query::ProgramStats(reply)) => {
                            let _ = reply.send(None);
                        }
                        Some(Query::ExitAccount(pids, ports, reply)) => {
                            let _ = reply.send(exits.of(&pids, &ports));
                        }
                        None => return,
                    },
                    () = status_tx.closed() => return,
                }
            }
        });
        let handle = MonitorHandle {
            status,
            changes,
            watch_tx,
            queries,
            failed,
            events: events_tx,
        };
        (handle, feed)
    }
}
