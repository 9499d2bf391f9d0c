//! The monitor's side of the targeted re-check of listener holders (the
//! looks themselves are `source::snapshot::holders`): when to look, and
//! what a look found, folded into the tracker. A process that closes its
//! copy of a shared listener is no longer listed as a holder within about
//! [`RECHECK_EVERY`], however many fds the host holds, instead of at the
//! next rescan (seconds apart on a busy host).

use std::{collections::BTreeMap, time::Duration};

use super::Monitor;
use crate::{
    event::ListenAddr,
    source::{
        Source, monotonic_now,
        snapshot::holders::{ListenerFds, Recheck, recheck},
    },
};

/// How often the fds of shared listeners are looked at. The interval grows
/// to 20× the last re-check's duration should one ever take longer than
/// that, so re-checks never take more than ~5% of the time.
pub(super) const RECHECK_EVERY: Duration = Duration::from_millis(50);

/// The fds to look at, the next look, and the one in flight.
#[derive(Debug, Default)]
pub(super) struct HolderCheck {
    fds: ListenerFds,
    /// A snapshot walked /proc (never for a replay).
    enabled: bool,
    next: Duration,
    job: Option<tokio::task::JoinHandle<Recheck>>,
}

impl HolderCheck {
    /// A snapshot's fds replace what the re-checks kept (and start the
    /// re-checks: only a source that walks /proc has any).
    pub(super) fn replace(&mut self, fds: ListenerFds) {
        self.fds = fds;
        self.enabled = true;
    }

    /// When the next re-check may start (`None`: no walk yet, or one is
    /// running).
    pub(super) fn due(&self) -> Option<Duration> {
        (self.enabled && self.job.is_none()).then_some(self.next)
    }

    /// The re-check in flight, to await.
    pub(super) fn job(&mut self) -> &mut Option<tokio::task::JoinHandle<Recheck>> {
        &mut self.job
    }
}

impl<S: Source> Monitor<S> {
    /// Starts a re-check, off the runtime, if one is due: of every
    /// remembered fd on a listening socket, and a first read of the tables
    /// of holders the tracker learned since the walk (by their accepts).
    pub(super) fn start_recheck(&mut self, now: Duration) {
        if self.holders.due().is_none_or(|due| now < due) {
            return;
        }
        self.holders.next = now + RECHECK_EVERY;
        let checks = self.holders.fds.checks();
        let probe = self
            .holders
            .fds
            .take_probes(self.tracker.listener_holders());
        if checks.is_empty() && probe.is_empty() {
            return;
        }
        self.holders.job = Some(tokio::task::spawn_blocking(move || {
            recheck(&checks, &probe, monotonic_now)
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
        // Sockets opened since the last rescan are known by events only:
        // the dumps name them, so that the reads below can release them.
        let mut by_addr: BTreeMap<ListenAddr, Vec<u64>> = BTreeMap::new();
        for &(inode, addr) in &outcome.listening {
            by_addr.entry(addr).or_default().push(inode);
        }
        for (addr, inodes) in by_addr {
            self.tracker
                .listening_inodes(&addr, outcome.listening_at, &inodes);
        }
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
