//! The monitor's side of the targeted re-check of listener holders (the
//! looks themselves are `source::snapshot::holders`): when to look, and
//! what a look found, folded into the tracker. A process that closes its
//! copy of a shared listener is no longer listed as a holder within about
//! [`RECHECK_EVERY`], however many fds the host holds, instead of at the
//! next rescan (seconds apart on a busy host).

use std::time::Duration;

use super::Monitor;
use crate::source::{
    Source, monotonic_now,
    snapshot::holders::{ListenerFds, Recheck, recheck},
};

/// How often the fds of shared listeners are looked at. The interval grows
/// to 20× the last re-check's duration should one ever take longer than
/// that, so re-checks never take more than ~5% of the time.
pub(super) const RECHECK_EVERY: Duration = Duration::from_millis(50);

/// The fds to look at, the next look, and the one in flight.
#[derive(Debug, Default)]
pub(super) struct HolderCheck {
    fds: ListenerFds,
    next: Duration,
    job: Option<tokio::task::JoinHandle<Recheck>>,
}

impl HolderCheck {
    /// A snapshot's fds replace what the re-checks kept.
    pub(super) fn replace(&mut self, fds: ListenerFds) {
        self.fds = fds;
    }

    /// When the next re-check may start (`None`: nothing to look at, or
    /// one is running).
    pub(super) fn due(&self) -> Option<Duration> {
        (self.job.is_none() && !self.fds.is_empty()).then_some(self.next)
    }

    /// The re-check in flight, to await.
    pub(super) fn job(&mut self) -> &mut Option<tokio::task::JoinHandle<Recheck>> {
        &mut self.job
    }
}

impl<S: Source> Monitor<S> {
    /// Starts a re-check, off the runtime, if one is due: of the fds on
    /// listeners the tracker lists more than one holder for (a listener's
    /// last holder closing it closes the socket, which the programs report).
    pub(super) fn start_recheck(&mut self, now: Duration) {
        if self.holders.due().is_none_or(|due| now < due) {
            return;
        }
        self.holders.next = now + RECHECK_EVERY;
        let tracker = &self.tracker;
        let checks = self
            .holders
            .fds
            .checks(|addr| tracker.holder_count(addr) >= 2);
        if checks.is_empty() {
            return;
        }
        self.holders.job = Some(tokio::task::spawn_blocking(move || {
            recheck(&checks, monotonic_now)
        }));
    }

    /// Folds a finished re-check in: each process whose fd table it read
    /// lets go of the listeners it no longer holds. Returns whether any did
    /// (the tracker marks that significant: published at once).
    pub(super) fn finish_recheck(&mut self, outcome: &Recheck) -> bool {
        self.holders.job = None;
        self.holders.next = self
            .holders
            .next
            .max(monotonic_now() + outcome.took.saturating_mul(19));
        if outcome.reads.is_empty() && outcome.unreadable.is_empty() {
            return false;
        }
        // Events up to now first, as for a rescan.
        let mut changed = self.pump();
        for read in &outcome.reads {
            let released = self
                .tracker
                .fd_table_read(read.pid, read.at, &read.inodes());
            if released {
                log::debug!(
                    "pid {} closed its copy of a shared listener (found by the re-check)",
                    read.pid
                );
            }
            changed |= released;
        }
        self.holders.fds.update(outcome);
        changed
    }
}
