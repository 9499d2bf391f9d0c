//! The monitor joins a [`Source`] to a [`Tracker`]: one core, whichever
//! the source (the eBPF programs or a replay). For the kernel it attaches
//! the programs *first*, then takes the startup snapshot, so no connection
//! falls in a gap between the two, and it dedupes what both saw so none is
//! counted twice. Afterwards it folds events in as they arrive, notices
//! processes that exited, and answers consumers through a
//! [`MonitorHandle`].
//!
//! - `startup`: attach, snapshot, merge (and a replay's recorded start);
//! - `pump`: events into the tracker, exit accounts, housekeeping, rescans;
//! - `holders`: the targeted re-check of shared listeners' holders between
//!   rescans;
//! - `publish`: the status, the restart model and the change counter
//!   consumers read, and their pace;
//! - `handle`: the task, the handle and the query protocol;
//! - `look`: the direct looks consumers ask the handle for (fd tables,
//!   TCP states, liveness);
//! - `record`: the raw event stream, for recordings a replay plays back;
//! - `cgroups`: where the processes of the status run (their cgroups).
//!
//! Consumers name the source's configuration and error types through this
//! module, so none of them imports `source/`.

mod cgroups;
mod handle;
mod holders;
mod look;
mod publish;
mod pump;
mod record;
mod startup;

use std::{collections::BTreeMap, time::Duration};

use tokio::sync::broadcast;

pub use self::handle::{
    ActivityReport, ExitAccount, MAX_ACTIVITY_CONNECTIONS, MAX_NAMED_PEER_CONNECTIONS,
    MonitorHandle, PeerWalkCost, PeersReport, WatchGuard,
};
pub use self::look::{ExcludedFd, FdLook, FdSocket, FdSockets};
use self::pump::{ExitAccounts, Untracked};
pub use self::record::Recorder;
pub use crate::source::{
    MonitorError,
    ebpf::{ProgramStats, SourceOptions, enable_run_time_stats},
    monotonic_now,
    replay::ReplayFeed,
};
use crate::{
    event::{ConnEvent, Snapshot},
    source::{Source, ebpf::EbpfSource, snapshot::holders::ListenerFds},
    tracker::{Restarts, Status, Tracker},
};

/// A monitor over a source: the kernel's by default. [`Monitor::spawn`]
/// runs it as a task behind a [`MonitorHandle`]; [`Monitor::start`] and
/// [`Monitor::next_change`] drive it by hand.
pub struct Monitor<S = EbpfSource> {
    source: S,
    tracker: Tracker,
    /// The meaning of restarts, fed with every published status, every
    /// event and the liveness of processes that left the status.
    restarts: Restarts,
    /// When the monitor started, on the source's clock (for the uptime).
    started: Duration,
    lost_seen: u64,
    batch: Vec<ConnEvent>,
    /// When the source last had records (see [`Source::TAIL`]).
    last_records: Duration,
    /// Changes not yet published, and when routine ones may be (see
    /// [`publish::PUBLISH_MIN`]).
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
    /// A background snapshot in flight (see [`pump::RESCAN_MIN`]).
    rescan: Option<tokio::task::JoinHandle<anyhow::Result<(Snapshot, ListenerFds, Duration)>>>,
    next_rescan: Duration,
    /// Counts may be stale since now (lost events, untracked connections):
    /// a rescan must start as soon as none is in flight. A flag, not a
    /// time: a rescan already in flight may have taken its snapshot before
    /// the loss, and its completion sets the next periodic time.
    rescan_wanted: bool,
    /// The targeted re-check of listener holders between rescans.
    holders: holders::HolderCheck,
    untracked: Untracked,
    /// The cgroups of the processes of the published status.
    cgroups: cgroups::Cgroups,
}

impl<S: Source> Monitor<S> {
    /// A monitor of `source` and `tracker`, started at `started` on the
    /// source's clock and at `now` on the host's (pacing runs on the host's
    /// clock, whatever the source's).
    fn over(source: S, tracker: Tracker, started: Duration, now: Duration) -> Self {
        Self {
            source,
            tracker,
            restarts: Restarts::new(),
            started,
            lost_seen: 0,
            batch: Vec::new(),
            last_records: now,
            unpublished: false,
            next_publish: now,
            watched: BTreeMap::new(),
            exits: ExitAccounts::default(),
            liveness_doubt: false,
            next_housekeeping: now + pump::HOUSEKEEPING,
            events: None,
            rescan: None,
            next_rescan: now + pump::RESCAN_MIN,
            rescan_wanted: false,
            holders: holders::HolderCheck::default(),
            untracked: Untracked::default(),
            cgroups: cgroups::Cgroups::default(),
        }
    }

    /// The status now (with the cgroups known from the last publication).
    pub fn status(&self) -> Status {
        let mut status = publish::status_of(&self.tracker, self.source.now(), self.started);
        self.cgroups.fill(&mut status);
        status
    }

    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }
}
