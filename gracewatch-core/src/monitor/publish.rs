//! What consumers read from a running monitor, and how often it is
//! rebuilt: the change counter after every batch, the [`Status`] and the
//! [`Restarts`] fed with it at a pace that keeps their cost bounded.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use super::Monitor;
use crate::{
    source::{Liveness, Source, monotonic_now},
    tracker::{Restarts, Status, Tracker},
};

/// Building a [`Status`] walks every live connection. Routine changes
/// (connections coming and going) are published at most every
/// `max(PUBLISH_MIN, 20 × the last build's duration)`, so publishing costs
/// at most ~5% of a core even on a host with 100k connections; significant
/// ones (an exit, a listener, lost events: see
/// [`Tracker::take_significant`]) at once. A recording (see
/// [`Source::RECORDING`]) publishes every batch at once. Drains do not wait
/// for a status: they wake on
/// [`MonitorHandle::changes`](super::MonitorHandle::changes), bumped after
/// every batch.
pub(super) const PUBLISH_MIN: Duration = Duration::from_millis(20);

/// Where a running monitor publishes.
pub(super) struct Outlets {
    pub(super) changes: watch::Sender<u64>,
    pub(super) status: watch::Sender<Arc<Status>>,
    pub(super) restarts: watch::Sender<Arc<Restarts>>,
}

impl<S: Source> Monitor<S> {
    /// After a batch (`changed`): bumps the change counter, and publishes a
    /// status if changes are waiting and one is due (see [`PUBLISH_MIN`])
    /// or `now` asks for it regardless of the pace.
    pub(super) fn publish(&mut self, changed: bool, now: bool, to: &Outlets) {
        if changed {
            to.changes.send_modify(|n| *n += 1);
        }
        self.unpublished |= changed;
        if !self.unpublished {
            return;
        }
        let t0 = monotonic_now();
        let significant = self.tracker.take_significant() | self.restarts.take_significant();
        if !now && !significant && !S::RECORDING && t0 < self.next_publish {
            return;
        }
        let (status, restarts) = self.observe();
        // The restart model first: a consumer woken by the status reads
        // the model that goes with it (or a newer one).
        to.restarts.send_replace(restarts);
        to.status.send_replace(Arc::new(status));
        let took = monotonic_now().saturating_sub(t0);
        self.unpublished = false;
        self.next_publish = t0 + PUBLISH_MIN.max(took * 20);
    }
}

impl<S: Source> Monitor<S> {
    /// The status now, with the cgroups of its processes, folded into the
    /// restart model; processes that left the status are asked whether
    /// they still run (a failed look is no exit: asked again at the next
    /// housekeeping). The status goes out with the model's roles and
    /// generations filled in, so every consumer of the status reads the
    /// same roles as readers of the model.
    pub(super) fn observe(&mut self) -> (Status, Arc<Restarts>) {
        // One instant for both, so no role is newer than the status.
        let now = self.source.now();
        let mut status = status_of(&self.tracker, now, self.started);
        let source = &self.source;
        self.cgroups
            .learn(&mut status, monotonic_now(), |pid| source.cgroup_of(pid));
        self.restarts.observe(&status, now);
        for pid in self.restarts.unchecked_gone() {
            let alive = self.source.liveness(pid) != Liveness::Exited;
            self.restarts.liveness(pid, alive, now);
        }
        self.restarts.annotate(&mut status, self.started);
        // Facts of this status go out with it.
        self.restarts.take_significant();
        (status, Arc::new(self.restarts.clone()))
    }
}

/// `tracker`'s status at `now`, for a monitor started at `started`.
pub(super) fn status_of(tracker: &Tracker, now: Duration, started: Duration) -> Status {
    let mut status = tracker.status(now);
    status.uptime_ms = now.saturating_sub(started).as_millis() as u64;
    status
}
