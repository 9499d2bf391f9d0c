//! The monitor joins a [`source`](crate::source) to a [`Tracker`]: it attaches
//! the programs *first*, then takes the startup snapshot, so no connection
//! falls in a gap between the two, and it dedupes what both saw so none is
//! counted twice. Afterwards it folds kernel events in as they arrive and
//! notices processes that exited. Consumers read [`Status`] from it.

use std::{collections::HashSet, time::Duration};

use anyhow::Context as _;

use crate::{
    event::{ConnEvent, Tuple},
    source::{
        MonitorError,
        ebpf::{EbpfSource, SourceOptions},
        monotonic_now, process_alive, snapshot,
    },
    tracker::{Status, Tracker},
};

/// How often exited processes and lost events are looked for.
const HOUSEKEEPING: Duration = Duration::from_millis(500);

pub struct Monitor {
    source: EbpfSource,
    tracker: Tracker,
    started: Duration,
    lost_seen: u64,
    batch: Vec<ConnEvent>,
    next_housekeeping: Duration,
}

impl Monitor {
    /// Attaches, snapshots, merges. When this returns, `status()` is exact.
    pub fn start(opts: SourceOptions) -> Result<Self, MonitorError> {
        let started = monotonic_now();
        let source = EbpfSource::start(opts)?;
        let mut monitor = Self {
            source,
            tracker: Tracker::new(),
            started,
            lost_seen: 0,
            batch: Vec::new(),
            next_housekeeping: started + HOUSEKEEPING,
        };
        monitor.merge_startup_snapshot()?;
        Ok(monitor)
    }

    fn merge_startup_snapshot(&mut self) -> anyhow::Result<()> {
        let snap = snapshot::take(monotonic_now).context("failed to take the startup snapshot")?;
        // Everything the programs saw up to now is folded in first, so the
        // merge can recognise connections both of them saw.
        self.pump();
        let added = self.tracker.merge_snapshot(&snap);
        for (tuple, pid) in &added {
            self.source.register_preexisting(tuple, *pid)?;
        }
        if added.is_empty() {
            return Ok(());
        }
        // A pre-existing connection that ended between the snapshot and its
        // registration produced no event: look again and retire those.
        let again =
            snapshot::take(monotonic_now).context("failed to re-check the startup snapshot")?;
        let still: HashSet<Tuple> = again.connections.iter().map(|c| c.tuple).collect();
        for (tuple, _) in &added {
            if !still.contains(tuple) && self.source.unregister_preexisting(tuple) {
                self.tracker.forget_connection(tuple);
            }
        }
        self.pump();
        Ok(())
    }

    /// Applies whatever the kernel has delivered, without waiting.
    fn pump(&mut self) -> bool {
        self.batch.clear();
        self.source.drain(&mut self.batch);
        for ev in &self.batch {
            self.tracker.apply(ev);
        }
        !self.batch.is_empty()
    }

    /// Waits for the next change (kernel events, an exited process, lost
    /// events). Returns after at most the housekeeping interval.
    pub async fn next_change(&mut self) -> anyhow::Result<bool> {
        let now = monotonic_now();
        let wait = self.next_housekeeping.saturating_sub(now);
        let mut changed = false;
        tokio::select! {
            r = self.source.readable() => { r?; }
            () = tokio::time::sleep(wait) => {}
        }
        changed |= self.pump();
        let now = monotonic_now();
        if now >= self.next_housekeeping {
            self.next_housekeeping = now + HOUSEKEEPING;
            changed |= self.housekeeping(now);
        }
        Ok(changed)
    }

    fn housekeeping(&mut self, now: Duration) -> bool {
        let mut changed = false;
        let lost = self.source.lost_events();
        if lost != self.lost_seen {
            self.lost_seen = lost;
            self.tracker.apply(&ConnEvent::Lost {
                at: now,
                total: lost,
            });
            changed = true;
        }
        let pids: Vec<u32> = self
            .tracker
            .status(now)
            .processes
            .iter()
            .map(|p| p.pid)
            .collect();
        for pid in pids {
            if !process_alive(pid) {
                self.tracker.apply(&ConnEvent::ProcessExit { at: now, pid });
                changed = true;
            }
        }
        changed
    }

    pub fn status(&self) -> Status {
        let now = monotonic_now();
        let mut status = self.tracker.status(now);
        status.uptime_ms = now.saturating_sub(self.started).as_millis() as u64;
        status
    }

    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }
}
