//! How a monitor starts. Over the kernel: attach the programs, then take
//! the startup snapshot with what the programs saw meanwhile folded in,
//! merge, register the snapshot's connections so their ends are reported,
//! and look again for those that ended before their registration. Over a
//! replay: merge the recorded snapshot and apply the recorded events.

use anyhow::Context as _;

use super::{Monitor, publish::status_of};
use crate::{
    event::{ConnEvent, Snapshot},
    source::{
        MonitorError,
        ebpf::{EbpfSource, SourceOptions},
        monotonic_now, process,
        replay::{ReplayClock, ReplayFeed, ReplaySource},
        snapshot,
    },
    tracker::{Restarts, Status, Tracker},
};

impl Monitor<EbpfSource> {
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
        let now = monotonic_now();
        let mut status = status_of(&tracker, now, started);
        super::cgroups::Cgroups::default().learn(&mut status, now, process::cgroup_of);
        // The restart model of one look: it meets every process now, so
        // each serves since now; generations are the holders.
        let mut restarts = Restarts::new();
        restarts.observe(&status, now);
        restarts.annotate(&mut status, started);
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
        Ok(Self::over(source, Tracker::new(), started, started))
    }

    fn merge_startup_snapshot(&mut self) -> anyhow::Result<()> {
        let t0 = monotonic_now();
        let snap = self.snapshot()?;
        let t1 = monotonic_now();
        let added = self.tracker.merge_snapshot(&snap);
        self.found_accepts();
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
        let (snap, fds) = snapshot::take_with_fds(monotonic_now)
            .context("failed to take the startup snapshot")?;
        self.holders.replace(fds);
        self.pump();
        Ok(snap)
    }
}

impl Monitor<ReplaySource> {
    /// A monitor whose tracker merged `snapshot` (skipped if empty) and
    /// applied the recorded `events`, and the feed for more. The recorded
    /// events are its starting state: they reach no subscriber and no exit
    /// account (no drain can watch before the monitor exists).
    pub(super) fn replay(events: Vec<ConnEvent>, snapshot: Snapshot) -> (Self, ReplayFeed) {
        let recorded = snapshot != Snapshot::default();
        let started = events
            .iter()
            .map(ConnEvent::at)
            .chain(recorded.then_some(snapshot.at))
            .min()
            .unwrap_or_default();
        let mut clock = ReplayClock::new(started);
        let mut tracker = Tracker::new();
        if recorded {
            clock.observe(snapshot.at);
            tracker.merge_snapshot(&snapshot);
        }
        for ev in &events {
            clock.observe(ev.at());
            tracker.apply(ev);
        }
        let (source, feed) = ReplaySource::new(clock);
        let monitor = Self::over(source, tracker, started, monotonic_now());
        (monitor, feed)
    }
}
