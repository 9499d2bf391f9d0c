//! The monitor's loop body, the same for every source: folds what the
//! source delivered into the tracker and the exit accounts, and keeps the
//! count honest between events (lost events, a full kernel table, processes
//! that exited without a word, rescans that find what no event told).

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use tokio::sync::broadcast;

use super::{ExitAccount, Monitor};
use crate::{
    event::{ConnEvent, Snapshot, Tuple},
    source::{Liveness, Source, monotonic_now},
    tracker::Seen,
};

/// Rescans refresh what events cannot tell: which processes hold a
/// listener they inherited (fork/exec handover) or got over a unix socket,
/// holders that closed their copy (sooner found by the re-checks of
/// `holders`), and connections whose end no event reported (lost events, a reset racing its accept, a full kernel table). They run
/// at most this often, and never take more than ~5% of the time (the
/// interval grows to 20× the last rescan's duration on a busy host).
pub(super) const RESCAN_MIN: Duration = Duration::from_secs(1);

/// How often exited processes and lost events are looked for.
pub(super) const HOUSEKEEPING: Duration = Duration::from_millis(500);

/// Connections the kernel side could not track: accepts that found `LIVE`
/// full, and pre-existing connections whose registration in `PREEXISTING`
/// failed. Both degrade the same way: counted (once per episode, as a
/// [`ConnEvent::MapFull`]), logged once, and left to the rescans, which
/// find the untracked connections and retire those that ended.
#[derive(Debug, Default)]
pub(super) struct Untracked {
    /// The kernel's count of failed `LIVE` inserts, as last read.
    kernel_seen: u64,
    /// It rose at the last housekeeping.
    kernel_failing: bool,
    /// The last snapshot merge could not register some connections.
    registration_failing: bool,
    episodes: u64,
}

impl<S: Source> Monitor<S> {
    /// Applies whatever the source has delivered, without waiting.
    pub(super) fn pump(&mut self) -> bool {
        self.batch.clear();
        self.source.drain(&mut self.batch);
        if self.batch.is_empty() {
            return false;
        }
        self.last_records = monotonic_now();
        let tx = self.subscribed().cloned();
        let batch = std::mem::take(&mut self.batch);
        for ev in &batch {
            self.apply_seen(ev, tx.as_ref());
        }
        self.batch = batch;
        true
    }

    /// Applies `ev` to the tracker, then hands it on as the tracker sees it
    /// (see [`Tracker::seen_as`](crate::tracker::Tracker::seen_as)).
    fn apply_seen(&mut self, ev: &ConnEvent, tx: Option<&broadcast::Sender<ConnEvent>>) {
        let seen = self.tracker.seen_as(ev);
        self.tracker.apply(ev);
        match &seen {
            Seen::Same => self.hand_on(ev, tx),
            Seen::Hidden => {}
            Seen::Instead(instead) => self.hand_on(instead, tx),
        }
    }

    /// The consumers of events: the restart model, the drains' exit
    /// accounts, and subscribers (`tx`, when anyone listens).
    fn hand_on(&mut self, ev: &ConnEvent, tx: Option<&broadcast::Sender<ConnEvent>>) {
        self.restarts.on_event(ev);
        self.exits
            .record(ev, |pid| S::RECORDING || self.watched.contains_key(&pid));
        if let Some(tx) = tx {
            let _ = tx.send(ev.clone());
        }
    }

    /// The event sender, if anyone listens. With no subscriber a send
    /// would clone the event (its `comm` is a fresh allocation) only for
    /// the channel to drop it: a per-event cost nobody asked for. Skipping
    /// it loses nothing: a receiver only ever gets what is sent after it
    /// subscribed, and one that subscribes after this check is, to the
    /// channel, one that subscribed after these sends.
    fn subscribed(&self) -> Option<&broadcast::Sender<ConnEvent>> {
        self.events.as_ref().filter(|tx| tx.receiver_count() > 0)
    }

    fn apply_one(&mut self, ev: ConnEvent) {
        let tx = self.subscribed().cloned();
        self.apply_seen(&ev, tx.as_ref());
    }

    /// Waits for the next change (events, an exited process, lost events).
    /// Returns after at most the housekeeping interval.
    ///
    /// The eBPF programs wake this reader at once only for records that
    /// can end a drain, and otherwise at most every few milliseconds; so
    /// while records keep coming it also looks on its own (see
    /// [`Source::TAIL`]), and waits for a wake-up alone after a quiet
    /// spell (an idle host costs no wake-ups).
    pub async fn next_change(&mut self) -> anyhow::Result<bool> {
        let now = monotonic_now();
        let mut wait = self.next_housekeeping.saturating_sub(now);
        if let Some((quiet, tail)) = S::TAIL {
            if now.saturating_sub(self.last_records) < quiet {
                wait = wait.min(tail);
            }
        }
        if self.unpublished {
            wait = wait.min(self.next_publish.saturating_sub(now));
        }
        if let Some(due) = self.holders.due() {
            wait = wait.min(due.saturating_sub(now));
        }
        let mut changed = false;
        tokio::select! {
            r = self.source.readable() => { r?; }
            () = tokio::time::sleep(wait) => {}
            done = join_pending(&mut self.rescan) => {
                self.rescan = None;
                match done {
                    Ok(Ok((snap, fds, took))) => {
                        changed |= self.merge_rescan(&snap);
                        self.holders.replace(fds);
                        self.next_rescan = monotonic_now() + RESCAN_MIN.max(took * 20);
                    }
                    Ok(Err(e)) => log::warn!("rescan failed: {e:#}"),
                    Err(e) => log::warn!("rescan task failed: {e}"),
                }
            }
            done = join_pending(self.holders.job()) => match done {
                Ok(outcome) => changed |= self.finish_recheck(&outcome),
                Err(e) => {
                    *self.holders.job() = None;
                    log::warn!("holder re-check task failed: {e}");
                }
            },
        }
        changed |= self.pump();
        let now = monotonic_now();
        if now >= self.next_housekeeping {
            self.next_housekeeping = now + HOUSEKEEPING;
            changed |= self.housekeeping(now);
        }
        self.start_recheck(now);
        Ok(changed)
    }

    /// Folds a periodic snapshot in; connections it finds that no event
    /// told of (lost events) are registered like the startup ones, and
    /// those accepted but not read or written yet (whose owner the programs
    /// learn at the first send or receive) count as the accepts they are.
    fn merge_rescan(&mut self, snap: &Snapshot) -> bool {
        self.pump();
        let added = self.tracker.merge_snapshot(snap);
        self.found_accepts();
        let now = monotonic_now();
        self.register_added(&added, now);
        self.forget_retired();
        true
    }

    /// Hands the accepts a merge found to the consumers of events, oldest
    /// first, before any status shows their counts: as kernel-reported
    /// accepts would have been.
    pub(super) fn found_accepts(&mut self) {
        let tx = self.subscribed().cloned();
        for ev in self.tracker.take_found_accepts() {
            self.hand_on(&ev, tx.as_ref());
        }
    }

    /// Drops the kernel entries of the connections the programs reported
    /// and the last merge found gone: they would otherwise stay until the
    /// socket is freed.
    pub(super) fn forget_retired(&mut self) {
        for (sk, since) in self.tracker.take_retired() {
            self.source.forget_live(sk, since);
        }
    }

    /// Registers a merge's new pre-existing connections with the programs.
    /// Failures (a full `PREEXISTING` map) are logged once and counted
    /// (see [`Untracked`]); the connections stay counted.
    pub(super) fn register_added(&mut self, added: &[(Tuple, u32)], now: Duration) {
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
        self.rescan_wanted = true;
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
            // Counts may be stale: repair them with a rescan right away
            // (or right after the one in flight, which may predate the loss).
            self.rescan_wanted = true;
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
            match self.source.liveness(pid) {
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
        changed |= self.restart_housekeeping();
        let source = &self.source;
        changed |= self.cgroups.refresh(now, |pid| source.cgroup_of(pid));
        if self.rescan.is_none() && (self.rescan_wanted || now >= self.next_rescan) {
            if let Some(take) = self.source.rescanner() {
                self.rescan_wanted = false;
                self.rescan = Some(tokio::task::spawn_blocking(move || {
                    let t0 = monotonic_now();
                    let (snap, fds) = take()?;
                    Ok((snap, fds, monotonic_now().saturating_sub(t0)))
                }));
            }
        }
        changed
    }

    /// Time-based restart roles (a handover's quiet old process), and
    /// whether processes that left the status but ran at the last look
    /// still run. Returns whether the model has news to publish.
    fn restart_housekeeping(&mut self) -> bool {
        let now = self.source.now();
        for pid in self.restarts.gone_alive() {
            if self.source.liveness(pid) == Liveness::Exited {
                self.restarts.liveness(pid, false, now);
            }
        }
        self.restarts.tick(now);
        self.restarts.significant()
    }

    /// One more (`on`) or one less drain waiting on each of `pids`; the
    /// source is told when a pid's first drain starts and its last ends.
    pub(super) fn watch(&mut self, pids: &[u32], on: bool) {
        for &pid in pids {
            let n = self.watched.entry(pid).or_default();
            let was = *n;
            *n = if on { was + 1 } else { was.saturating_sub(1) };
            let now = *n;
            if now == 0 {
                self.watched.remove(&pid);
                // A recording keeps every account (see `Source::RECORDING`).
                if !S::RECORDING {
                    self.exits.forget(pid);
                }
            }
            if (was == 0) != (now == 0) {
                if let Err(e) = self.source.set_watched(pid, on) {
                    // Without it the drain still reacts within the reader's tail period.
                    log::warn!("{e:#}");
                }
            }
        }
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

/// What drains must know about their targets' exits, kept by the monitor
/// itself (a drain reading the event broadcast could lag behind and miss
/// them): per pid, connections that ended because their owner was exiting
/// (by local port), and whether the process was seen gone. Only pids some
/// drain watches are kept (every pid for a recording), and forgotten when
/// the last drain stops.
#[derive(Debug, Default)]
pub(super) struct ExitAccounts {
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
            // Accepted by an exiting process and never read or written
            // (or queued on its listener): lost with it.
            ConnEvent::QueueDrop { exiting, tuple, .. } if *exiting != 0 && keep(*exiting) => {
                *self
                    .closes
                    .entry(*exiting)
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
    pub(super) fn of(&self, pids: &[u32], ports: &[u16]) -> ExitAccount {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

    use super::*;
    use crate::{source::snapshot::holders::ListenerFds, tracker::Tracker};

    static TAKEN: AtomicUsize = AtomicUsize::new(0);
    static RELEASE: AtomicBool = AtomicBool::new(false);
    static LOST: AtomicU64 = AtomicU64::new(0);

    /// A source whose events are lost on demand and whose rescans block
    /// until released, then take as long as a rescan of a monitor that was
    /// stopped (SIGSTOP) while it ran.
    struct Stalling;

    fn stalled_rescan() -> anyhow::Result<(Snapshot, ListenerFds)> {
        TAKEN.fetch_add(1, Ordering::SeqCst);
        while !RELEASE.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(200));
        Ok((Snapshot::default(), ListenerFds::default()))
    }

    impl Source for Stalling {
        async fn readable(&mut self) -> anyhow::Result<()> {
            std::future::pending().await
        }

        fn drain(&mut self, _out: &mut Vec<ConnEvent>) {}

        fn now(&self) -> Duration {
            monotonic_now()
        }

        fn rescanner(&self) -> Option<crate::source::Rescanner> {
            Some(stalled_rescan)
        }

        fn lost_events(&self) -> u64 {
            LOST.load(Ordering::SeqCst)
        }
    }

    /// Counts the allocations of the thread that switched counting on,
    /// so a test can tell what one call costs in allocations while other
    /// tests run on other threads.
    struct Counting;

    thread_local! {
        static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    // SAFETY: every call is forwarded unchanged to the system allocator;
    // the counter is a const-initialized thread local (no allocation, no
    // re-entry).
    unsafe impl std::alloc::GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            if COUNTING.with(std::cell::Cell::get) {
                ALLOCATIONS.with(|n| n.set(n.get() + 1));
            }
            // SAFETY: the caller's contract is the system allocator's.
            unsafe { std::alloc::System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            // SAFETY: `ptr` came from `alloc` above, i.e. from `System`.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    /// Allocations made by `f` on this thread.
    fn allocations(f: impl FnOnce()) -> u64 {
        ALLOCATIONS.with(|n| n.set(0));
        COUNTING.with(|c| c.set(true));
        f();
        COUNTING.with(|c| c.set(false));
        ALLOCATIONS.with(std::cell::Cell::get)
    }

    /// A source that hands over whatever the test queued.
    struct Queued(Vec<ConnEvent>);

    impl Source for Queued {
        async fn readable(&mut self) -> anyhow::Result<()> {
            std::future::pending().await
        }

        fn drain(&mut self, out: &mut Vec<ConnEvent>) {
            out.append(&mut self.0);
        }

        fn now(&self) -> Duration {
            monotonic_now()
        }
    }

    /// Connection `n`'s handshake, accept and close, with a `comm` as long
    /// as the kernel's (the clone a send makes allocates it).
    fn connection(n: u16) -> [ConnEvent; 3] {
        let tuple = Tuple {
            netns: 1,
            local: "10.0.0.1:80".parse().expect("an address"),
            remote: std::net::SocketAddr::from(([192, 0, 2, 1], 40000 + n)),
        };
        let sk = 0xffff_0000_0000 + u64::from(n);
        let at = Duration::from_millis(u64::from(n));
        [
            ConnEvent::Handshake { at, sk, tuple },
            ConnEvent::Accept {
                at,
                sk,
                tuple,
                pid: 7,
                comm: "server-process1".into(),
                was_queued: true,
            },
            ConnEvent::Close {
                at,
                sk,
                tuple,
                pid: 7,
                by_exit: false,
            },
        ]
    }

    fn queued(from: u16, to: u16) -> Queued {
        Queued((from..to).flat_map(connection).collect())
    }

    /// Allocations `pump` makes for 100 connections, with `events` as the
    /// monitor's event sender.
    fn pump_allocations(events: Option<broadcast::Sender<ConnEvent>>) -> u64 {
        let now = monotonic_now();
        let mut m = Monitor::over(queued(0, 100), Tracker::new(), now, now);
        // Warm up the tracker's and the batch's tables, so both runs
        // compared below only pay for their events.
        m.pump();
        m.source = queued(100, 200);
        m.events = events;
        allocations(|| {
            m.pump();
        })
    }

    /// With no subscriber the monitor pays nothing per event for the
    /// channel: no clone (whose `comm` would be allocated) to be dropped.
    #[test]
    fn events_nobody_subscribed_to_cost_no_allocation() {
        let (tx, rx) = broadcast::channel(16);
        drop(rx);
        let without_sender = pump_allocations(None);
        let without_receiver = pump_allocations(Some(tx.clone()));
        assert_eq!(
            without_receiver, without_sender,
            "a sender nobody listens to costs allocations"
        );
        // And the measure sees the clones when someone does listen.
        let _rx = tx.subscribe();
        assert!(pump_allocations(Some(tx)) > without_sender);
    }

    /// A subscriber that comes late still gets every event applied from
    /// then on, in order, once the monitor skipped sends for nobody.
    #[test]
    fn a_late_subscriber_gets_every_event_from_when_it_subscribed() {
        let now = monotonic_now();
        let mut m = Monitor::over(queued(0, 10), Tracker::new(), now, now);
        let (tx, _) = broadcast::channel(1024);
        m.events = Some(tx.clone());
        assert!(m.pump(), "the first batch is applied");
        let mut rx = tx.subscribe();
        m.source = queued(10, 20);
        assert!(m.pump());
        m.apply_one(ConnEvent::Lost { at: now, total: 3 });
        let mut got = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            got.push(ev);
        }
        let mut want: Vec<ConnEvent> = (10..20).flat_map(connection).collect();
        want.push(ConnEvent::Lost { at: now, total: 3 });
        assert_eq!(got, want);
        assert_eq!(m.tracker.status(monotonic_now()).lost_events, 3);
    }

    /// Events lost while a rescan runs may postdate its snapshot: the
    /// repair rescan they ask for must still run once that one is done,
    /// not after its back-off (which grows with a long, e.g. stopped, run).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_loss_during_a_rescan_gets_a_repair_rescan_of_its_own() {
        let now = monotonic_now();
        let mut m = Monitor::over(Stalling, Tracker::new(), now, now);
        m.next_rescan = now;
        m.housekeeping(now);
        while TAKEN.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        LOST.store(1759, Ordering::SeqCst);
        assert!(m.housekeeping(monotonic_now()), "the loss is news");
        assert_eq!(m.tracker.status(monotonic_now()).lost_events, 1759);
        RELEASE.store(true, Ordering::SeqCst);
        // Until the first rescan is merged (or a second one started).
        let give_up = monotonic_now() + Duration::from_secs(30);
        while m.rescan.is_some() && TAKEN.load(Ordering::SeqCst) == 1 {
            assert!(monotonic_now() < give_up, "the rescan never finished");
            m.next_change().await.expect("no source error");
        }
        if m.rescan.is_none() {
            m.housekeeping(monotonic_now());
        }
        // The rescan counts itself once its blocking thread runs, which
        // may be after `housekeeping` returned.
        while m.rescan.is_some() && TAKEN.load(Ordering::SeqCst) == 1 {
            assert!(monotonic_now() < give_up, "the repair rescan never ran");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(
            TAKEN.load(Ordering::SeqCst),
            2,
            "a repair rescan starts as soon as the one in flight is done"
        );
    }
}
