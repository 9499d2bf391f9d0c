//! The drain gate: wait until the chosen processes hold no live inbound
//! connection, confirm it with a fresh look at their own file descriptors,
//! then signal them — through pidfds opened when they were chosen, so a
//! recycled pid is never signalled. Used by `gracewatch drain`/`wait`, the
//! TUI and the agent; the binary maps its typed [`Outcome`] to the exit codes
//! of ARCHITECTURE.md §5.

mod gate;
pub mod governor;
mod idle;
mod policy;
mod quiet;
mod signal;

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

pub use gate::run;
pub use signal::SignalSpec;

use crate::{
    input::PeerRule,
    peers::PeerGroupView,
    source::process::{self, PinnedProcess},
};

/// Which processes to drain, as the user named them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetSpec {
    pub pids: Vec<u32>,
    /// A file holding a pid (e.g. nginx's `nginx.pid.oldbin`).
    pub pidfile: Option<PathBuf>,
    /// Also every descendant of the named processes, as they are now.
    pub children: bool,
    /// Leave these (and their descendants) out.
    pub exclude: Vec<u32>,
    /// Trust a pidfile whoever owns it (see [`choose`]).
    pub allow_unsafe_pidfile: bool,
    /// Allow pid 1, kernel threads, gracewatch itself and its ancestors,
    /// and `children` of pid 1 as targets.
    pub allow_dangerous_target: bool,
    /// The drain can never signal (no signal, and no SIGKILL at the
    /// deadline): it only watches, so the target policy, which guards
    /// against signals, does not apply (`gracewatch wait --pid 1` in a
    /// container whose server is pid 1). Pidfiles are checked all the same.
    pub wait_only: bool,
}

/// What to do when the deadline passes with connections left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// Send nothing (exit 124).
    #[default]
    Leave,
    /// Send the drain signal anyway (exit 124).
    Signal,
    /// Send SIGKILL (exit 124).
    Kill,
}

/// How to drain, once the targets are chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainSpec {
    /// Count only connections on these local ports (empty: all).
    pub ports: Vec<u16>,
    /// `None`: only wait (`gracewatch wait`).
    pub signal: Option<SignalSpec>,
    pub timeout: Option<Duration>,
    pub on_timeout: OnTimeout,
    /// Never signal before this much time has passed, even at zero.
    pub min_wait: Duration,
    /// Drained only once the targets also went this long without a new
    /// connection: none accepted by a target, and no handshake completed on
    /// a listener only the targets hold. Measured from the drain's start or
    /// the last such connection, whichever is later; zero: off. A momentary
    /// zero between two short requests then ends nothing.
    pub quiet_for: Duration,
    /// `--exclude-peer`: live connections from these peers do not hold the
    /// drain. The gate ends it when every live connection the targets hold
    /// is excluded, as a fresh look at the targets' sockets confirms (the
    /// peer read from the socket, never from the tracker alone).
    pub exclude_peers: Vec<PeerRule>,
    /// `--until-idle`: the targets also count as drained when every live
    /// connection they hold (that holds the drain) has moved no data for
    /// this long and has nothing in flight, as a fresh read of the
    /// kernel's `tcp_info` for each socket their fd tables show says.
    /// Anything the read cannot decide holds the drain. `None`: off.
    pub until_idle: Option<Duration>,
}

impl Default for DrainSpec {
    fn default() -> Self {
        Self {
            ports: Vec::new(),
            signal: Some(SignalSpec::TERM),
            timeout: None,
            on_timeout: OnTimeout::Leave,
            min_wait: Duration::ZERO,
            quiet_for: Duration::ZERO,
            exclude_peers: Vec::new(),
            until_idle: None,
        }
    }
}

impl DrainSpec {
    /// Whether this drain can send any signal (the drain signal, or SIGKILL
    /// at the deadline).
    pub fn can_signal(&self) -> bool {
        self.signal.is_some() || (self.timeout.is_some() && self.on_timeout == OnTimeout::Kill)
    }
}

/// Bad input: the caller exits 2 (or answers 4xx).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TargetError(pub String);

/// The processes a drain watches, each pinned by a pidfd.
pub struct Targets {
    /// The named processes first, then their descendants (`--children`).
    pub procs: Vec<PinnedProcess>,
    /// How many of `procs` (the first ones) were named: only those are
    /// signalled.
    pub named: usize,
}

impl Targets {
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.pid).collect()
    }

    /// The named targets (the ones a drain signals).
    pub fn named_pids(&self) -> Vec<u32> {
        self.procs.iter().take(self.named).map(|p| p.pid).collect()
    }
}

/// Resolves and pins the targets. Every failure is the user's input.
///
/// Refused unless the spec's `allow_*` flags say otherwise: pids outside
/// 1..=[`crate::input::PID_MAX`]; pid 1, kernel threads, this process and
/// its ancestors (named or among the descendants) and `children` of pid 1,
/// unless the drain is `wait_only`; a
/// pidfile that is not a small regular file; a pidfile that root does not
/// own, that group or others can write, or whose owner is not the owner of
/// the process it names (systemd's rule for `PIDFile=`).
pub fn choose(spec: &TargetSpec) -> Result<Targets, TargetError> {
    for &pid in spec.pids.iter().chain(&spec.exclude) {
        crate::input::check_pid(pid).map_err(TargetError)?;
    }
    let mut pids = spec.pids.clone();
    let pidfile = match &spec.pidfile {
        Some(path) => Some(policy::read_pidfile(path)?),
        None => None,
    };
    if let Some(file) = &pidfile {
        pids.push(file.pid);
    }
    if pids.is_empty() {
        return Err(TargetError(
            "no target: give --pid PID or --pidfile PATH".to_owned(),
        ));
    }
    pids.retain(|p| !spec.exclude.contains(p));
    if pids.is_empty() {
        return Err(TargetError("every target is excluded".to_owned()));
    }
    let allow_danger = spec.allow_dangerous_target || spec.wait_only;
    if spec.children {
        policy::check_children_roots(&pids, allow_danger)?;
    }
    let protected = policy::Protected::new();
    // Pin the named processes first, so a pid that does not exist is
    // reported before anything else happens.
    let mut procs = Vec::new();
    for &pid in &pids {
        if procs.iter().any(|p: &PinnedProcess| p.pid == pid) {
            continue;
        }
        let proc = PinnedProcess::open(pid).map_err(|e| TargetError(format!("{e:#}")))?;
        protected.check(&proc, allow_danger)?;
        if let Some(file) = pidfile.as_ref().filter(|f| f.pid == pid) {
            file.vouches_for(&proc, spec.allow_unsafe_pidfile)?;
        }
        procs.push(proc);
    }
    let named = procs.len();
    if spec.children {
        let below = process::descendants(&pids, &spec.exclude)
            .map_err(|e| TargetError(format!("{e:#}")))?;
        for pid in below {
            // A child that exits between the listing and here, or already
            // had (a zombie), is simply not a target.
            if let Ok(p) = PinnedProcess::open(pid) {
                protected.check(&p, allow_danger)?;
                procs.push(p);
            }
        }
    }
    Ok(Targets { procs, named })
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Zero live connections, confirmed; the signal (if any) was delivered.
    Drained,
    /// A target exited while it still held connections.
    TargetExited,
    /// The deadline passed with connections left.
    Timeout,
    /// Stopped by the user (Ctrl-C, SIGTERM, a cancelled API drain).
    Interrupted,
    /// The kernel refused the signal for a target that has not exited
    /// (EPERM: another user's process and no CAP_KILL). It lives on.
    SignalRefused,
    /// Monitoring failed.
    Error,
}

/// A live connection named in progress and results ("who is pinning it").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldConnection {
    pub pid: u32,
    pub local: String,
    pub peer: String,
    pub age_ms: u64,
    /// Milliseconds since data last moved on it, as the kernel said when
    /// read for this line; `None` when not read (progress reads at most
    /// once a second) or the read could not tell.
    #[serde(default)]
    pub idle_ms: Option<u64>,
    /// Anything unread, unsent or unacknowledged on it, read as `idle_ms`.
    #[serde(default)]
    pub in_flight: Option<bool>,
}

/// A live connection an `--until-idle` drain cut: it had moved no data for
/// at least the idle period and had nothing in flight when the gate's last
/// read found it, and the signal ends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleConnection {
    pub pid: u32,
    pub local: String,
    pub peer: String,
    /// Milliseconds since data last moved on it, at that read.
    pub idle_ms: u64,
    /// `None` when the tracker does not know the connection's age.
    pub age_ms: Option<u64>,
}

/// A live connection from an excluded peer (`--exclude-peer`), named in
/// the result: the drain did not wait for it, and the signal cuts it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExcludedConnection {
    pub pid: u32,
    pub local: String,
    pub peer: String,
    /// `established` or `close_wait`, as the gate's fresh look at the
    /// targets' sockets found it; `None` where only the tracker's view is
    /// known (a drain that did not end by them).
    pub state: Option<String>,
    /// `None` when the tracker does not know the connection (yet).
    pub age_ms: Option<u64>,
}

/// Which rule ended a drain that drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndedBy {
    /// The targets held no live connection (and `--min-wait`/`--quiet-for`,
    /// if given, had passed), or drained and exited by themselves.
    Zero,
    /// Every live connection left was from a peer `--exclude-peer` names.
    ExcludedPeers,
    /// Every live connection left (that held the drain) had been idle for
    /// `--until-idle` with nothing in flight.
    Idle,
}

/// One progress event (`--json`: `"type": "progress"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub elapsed_ms: u64,
    pub live: u64,
    /// Connections that ended per second over the last few seconds.
    pub closes_per_sec: f64,
    /// Estimated time to zero at that rate (`null` when unknown).
    pub eta_ms: Option<u64>,
    /// The oldest live connection, if any.
    pub oldest: Option<HeldConnection>,
    /// New connections the targets accepted in the last 10 s (still accepting).
    pub accepted_last_10s: u64,
    /// The live connections that hold the drain, grouped by peer (at most
    /// 10 groups, see [`crate::peers`]), without looking for the peer
    /// processes (`peer_processes` is `None`): recomputed at most once a second.
    #[serde(default)]
    pub peers: Vec<PeerGroupView>,
    /// A sentence for humans.
    pub message: String,
}

/// The final result (`--json`: `"type": "result"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrainReport {
    pub targets: Vec<u32>,
    pub outcome: Outcome,
    pub initial_live: u64,
    pub peak_live: u64,
    pub duration_ms: u64,
    /// Signal delivered (e.g. `SIGTERM`), `null` if none.
    pub signal_sent: Option<String>,
    /// Connections still held when the drain ended.
    pub still_held: u64,
    /// The oldest of those, oldest first (at most 10).
    pub held: Vec<HeldConnection>,
    /// What ended it when `outcome` is `drained`; `None` otherwise.
    #[serde(default)]
    pub ended_by: Option<EndedBy>,
    /// Live connections from excluded peers when the drain ended, oldest
    /// first (at most 10): for a drain ended by `excluded_peers`, the ones
    /// the fresh look found, which the signal cuts. Not in `still_held`.
    #[serde(default)]
    pub excluded: Vec<ExcludedConnection>,
    /// The connections in `still_held` grouped by peer (at most 10
    /// groups), each with the processes on this host holding the other
    /// ends (the one costly look, made once, when the drain ends without
    /// draining). Empty for a drain that drained.
    #[serde(default)]
    pub peers: Vec<PeerGroupView>,
    /// For a drain ended by `idle`: the idle connections it cut, least idle
    /// first (at most 10). Empty otherwise. Not in `still_held`.
    #[serde(default)]
    pub idle: Vec<IdleConnection>,
    pub message: String,
}
