//! [`Restarts`]: what a restart means, read from the counts. The rest of
//! the tracker says who holds what; this part says which process of a
//! restart serves, which drains and which is done, and when a new process
//! took over a listener an older one serves (a handover). Every consumer
//! reads the same answer through the monitor's handle, so none derives its
//! own (ARCHITECTURE.md §6).
//!
//! Like the tracker it is pure: fed with the published [`Status`]es, the
//! [`ConnEvent`]s, whether processes that left the status still run, and
//! the time, which callers pass in. Listeners are keyed by
//! [`ListenAddr`] (network namespace plus address): equal addresses in two
//! namespaces are two listeners, and a process in one is never a handover
//! of a process in the other.
//!
//! Roles:
//!
//! - **serving**: the default;
//! - **draining**: it holds live connections and either a drain was
//!   started on it (a [`DrainNote`]), or it closed its listener, or another
//!   process keeps accepting on a listener it shares while it accepts
//!   nothing (the handover of an fd-passing restart);
//! - **drained**: it was draining and reached zero (or let go of everything
//!   while it still runs);
//! - **exited**: it is gone. Kept [`KEEP_GONE`], then forgotten.
//!
//! Each change is also recorded as a [`Fact`] with a sequence number, so a
//! consumer that reads the published state now and then can tell what
//! happened in between (the TUI's event log). The facts are folded into
//! [`DrainRecord`]s, one per drain the model saw (see [`super::records`]),
//! which outlive the process's forgetting.
//!
//! When a drain starts: when the process's drain was started, it closed
//! its listener, or — for a handover — when it stopped accepting. The
//! model can only *declare* a handover's old process draining after it was
//! quiet for [`HANDOVER_QUIET`], so it back-dates that drain to the first
//! accept by another process sharing its listener after its own last
//! accept (as the events tell it; the time of the status that showed it
//! when events were lost), with the live count it had then (as of the
//! latest status before that accept). `role_since`, the drain's `since`,
//! the fact's `at` and so the drain's duration all count from there.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::SocketAddr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{
    GenerationStatus, Status,
    records::{DrainRecord, Records},
};
use crate::event::{ConnEvent, ListenAddr, NetNs};

/// Window over which accepts/s and closes/s are measured.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);
/// A process that accepted nothing for this long while others accepted on
/// its listener is draining…
pub const HANDOVER_QUIET: Duration = Duration::from_secs(2);
/// …once the others accepted at least this many connections since its last
/// accept (one stray connection is not a handover).
pub const HANDOVER_MIN_ACCEPTS: u64 = 3;
/// How long an exited (or vanished) process is remembered.
pub const KEEP_GONE: Duration = Duration::from_secs(60);
/// Rate samples closer together than this are merged: a monitor publishes
/// up to 50 statuses a second, the rates need a few per window (and the
/// model is copied for every publication).
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Facts kept for readers that fell behind.
const FACTS_KEPT: usize = 1024;

/// A process's role in restarts; in JSON its [`Role::name`].
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Serving,
    Draining,
    Drained,
    Exited,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::Draining => "draining",
            Self::Drained => "drained",
            Self::Exited => "exited",
        }
    }
}

/// Why a process has its role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Why {
    /// First seen: serving until something says otherwise.
    Seen,
    ClosedItsListener,
    /// Another process accepts on a listener it shares (a handover).
    AnotherAccepts,
    AcceptsAgain,
    ReachedZero,
    /// It left the status (holds nothing) but still runs.
    HoldsNothing,
    DrainStarted,
    DrainFinished,
    DrainCancelled,
    Exited,
}

impl Why {
    /// In words, as the TUI shows it (empty for the self-evident ones).
    pub fn text(self) -> &'static str {
        match self {
            Self::Seen | Self::Exited => "",
            Self::ClosedItsListener => "closed its listener",
            Self::AnotherAccepts => "another process accepts on its listener",
            Self::AcceptsAgain => "accepts again",
            Self::ReachedZero => "reached zero",
            Self::HoldsNothing => "holds nothing any more",
            Self::DrainStarted => "drain started",
            Self::DrainFinished => "drain finished",
            Self::DrainCancelled => "drain cancelled",
        }
    }

    /// As a machine reads it (the agent's `/v1/events` lines): snake_case.
    pub fn code(self) -> &'static str {
        match self {
            Self::Seen => "seen",
            Self::ClosedItsListener => "closed_its_listener",
            Self::AnotherAccepts => "another_accepts",
            Self::AcceptsAgain => "accepts_again",
            Self::ReachedZero => "reached_zero",
            Self::HoldsNothing => "holds_nothing",
            Self::DrainStarted => "drain_started",
            Self::DrainFinished => "drain_finished",
            Self::DrainCancelled => "drain_cancelled",
            Self::Exited => "exited",
        }
    }

    /// Whether a drain run by gracewatch caused it (its runner reports
    /// those itself).
    pub fn by_drain(self) -> bool {
        matches!(
            self,
            Self::DrainStarted | Self::DrainFinished | Self::DrainCancelled
        )
    }
}

/// A drain: from when the process started draining.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainMark {
    /// Live connections when the drain began (a progress bar's 0 %).
    pub from_live: u64,
    pub since: Duration,
    /// A drain gracewatch runs (see [`DrainNote`]); otherwise inferred.
    pub by_user: bool,
    /// When it reached zero.
    pub done_at: Option<Duration>,
}

/// A drain gracewatch runs on a process, as its runner reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainNote {
    Started,
    /// The gate confirmed zero.
    Drained,
    /// Cancelled: nothing was signalled, the process serves on.
    Cancelled,
    /// Any other end (deadline, exit, error): the role follows the counts.
    Ended,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sample {
    at: Duration,
    accepted: u64,
    closed: u64,
}

/// One process as the restart model sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcRestart {
    pub pid: u32,
    pub comm: String,
    pub role: Role,
    pub role_since: Duration,
    pub why: Why,
    /// Live connections in the latest status, plus its accepts since (0
    /// once gone).
    pub live: u64,
    /// Listeners it holds now.
    pub listeners: BTreeSet<ListenAddr>,
    /// Listeners it held or accepted from since it was first seen.
    pub keys: BTreeSet<ListenAddr>,
    /// It held a listener in some status (a handover child may accept from
    /// an inherited one before a rescan lists it as a holder).
    pub held_listener: bool,
    pub accepted_total: u64,
    pub closed_total: u64,
    pub first_seen: Duration,
    /// In the latest status.
    pub present: bool,
    /// When it left the status or exited.
    pub gone_at: Option<Duration>,
    /// Whether a process that left the status was found still running.
    pub alive_checked: bool,
    /// Connections that ended because it was exiting.
    pub exit_closes: u64,
    pub drain: Option<DrainMark>,
    samples: VecDeque<Sample>,
    /// When a status first showed its latest accept.
    last_accept: Option<Duration>,
    /// Its latest accept as the events tell it.
    last_accept_event: Option<Duration>,
    /// Accepts by processes sharing a listener with it since its last accept.
    others_accepted: u64,
    /// The first of those: when, and its live count then. A handover's
    /// drain starts there.
    others_since: Option<(Duration, u64)>,
    /// When the model made the latest role change (`role_since` may be
    /// back-dated): only accepts after it make a draining process serve
    /// again.
    role_set_at: Duration,
}

impl ProcRestart {
    /// A process first seen at `now`: serving.
    pub fn new(pid: u32, comm: &str, now: Duration) -> Self {
        Self {
            pid,
            comm: comm.to_owned(),
            role: Role::Serving,
            role_since: now,
            why: Why::Seen,
            live: 0,
            listeners: BTreeSet::new(),
            keys: BTreeSet::new(),
            held_listener: false,
            accepted_total: 0,
            closed_total: 0,
            first_seen: now,
            present: true,
            gone_at: None,
            alive_checked: false,
            exit_closes: 0,
            drain: None,
            samples: VecDeque::new(),
            last_accept: None,
            last_accept_event: None,
            others_accepted: 0,
            others_since: None,
            role_set_at: now,
        }
    }

    /// Accepts/s and closes/s over the last [`RATE_WINDOW`] as of `now`.
    pub fn rates(&self, now: Duration) -> (f64, f64) {
        let Some(last) = self.samples.back() else {
            return (0.0, 0.0);
        };
        let from = now.saturating_sub(RATE_WINDOW);
        let base = self
            .samples
            .iter()
            .rev()
            .find(|s| s.at <= from)
            .or(self.samples.front())
            .copied()
            .unwrap_or(*last);
        let span = now.saturating_sub(base.at).as_secs_f64().max(1.0);
        (
            last.accepted.saturating_sub(base.accepted) as f64 / span,
            last.closed.saturating_sub(base.closed) as f64 / span,
        )
    }

    fn shares_with(&self, keys: &BTreeSet<ListenAddr>) -> bool {
        self.keys.iter().any(|k| keys.contains(k))
    }

    fn set_role(&mut self, role: Role, now: Duration, why: Why) {
        self.role = role;
        self.role_since = now;
        self.role_set_at = now;
        self.why = why;
    }

    /// Starts draining at `now`, counted from `since` (earlier for a
    /// handover, see the module documentation) with `from_live` then.
    fn start_draining(
        &mut self,
        (since, from_live): (Duration, u64),
        now: Duration,
        why: Why,
        by_user: bool,
    ) {
        self.set_role(Role::Draining, now, why);
        match self.drain.as_mut() {
            Some(d) if d.done_at.is_none() => {
                d.by_user |= by_user;
                self.role_since = d.since;
            }
            _ => {
                self.role_since = since.min(now);
                self.drain = Some(DrainMark {
                    from_live,
                    since: self.role_since,
                    by_user,
                    done_at: None,
                });
            }
        }
    }

    /// Becomes drained at `now`; returns (how long, from how many) if a
    /// drain ended with it.
    fn drained(&mut self, now: Duration, why: Why) -> Option<(Duration, u64)> {
        let from = self.role;
        self.set_role(Role::Drained, now, why);
        match self.drain.as_mut() {
            Some(mark) if from == Role::Draining => {
                mark.done_at = Some(now);
                Some((now.saturating_sub(mark.since), mark.from_live))
            }
            _ => None,
        }
    }
}

/// One change of the restart model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fact {
    /// Increases by one per fact.
    pub seq: u64,
    pub at: Duration,
    pub pid: u32,
    pub change: Change,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// `pid` (named `comm` by the accept) started accepting on `listener`,
    /// which the `alongside` processes, seen before it, serve.
    Handover {
        listener: ListenAddr,
        comm: String,
        alongside: Vec<u32>,
    },
    /// A role change other than an exit.
    Role {
        from: Role,
        to: Role,
        why: Why,
        /// Live connections at the change.
        live: u64,
        /// For a drain that reached zero: how long it took, from how many.
        drained: Option<(Duration, u64)>,
    },
    /// It exited holding `held` live connections, while in role `was`.
    Exited { held: u64, was: Role },
}

/// The restart model: roles, handovers and rates of every process the
/// statuses showed. See the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restarts {
    procs: BTreeMap<u32, ProcRestart>,
    /// Every listener of the latest status, to place accepted connections.
    listeners: Vec<ListenAddr>,
    /// A status was observed: later processes' accepts are news.
    observed: bool,
    /// (listener, pid) handovers already reported.
    handovers: BTreeSet<(ListenAddr, u32)>,
    facts: VecDeque<Fact>,
    next_seq: u64,
    /// `seq` of the first fact the latest [`Restarts::observe`] recorded.
    observed_from: u64,
    /// A fact was recorded since the last [`Restarts::take_significant`].
    significant: bool,
    /// Every drain seen, folded from the facts. Shared between the
    /// published copies of the model (one per publication) and copied only
    /// when a fact changes them.
    records: std::sync::Arc<Records>,
    /// The monitor's start on the model's clock (see [`Restarts::annotate`]).
    started: Duration,
    /// The latest time the model was fed.
    now: Duration,
}

impl Restarts {
    pub fn new() -> Self {
        Self::default()
    }

    // --- reading ------------------------------------------------------------

    /// A process, while it is remembered.
    pub fn process(&self, pid: u32) -> Option<&ProcRestart> {
        self.procs.get(&pid)
    }

    /// Every remembered process, by pid.
    pub fn processes(&self) -> impl Iterator<Item = &ProcRestart> {
        self.procs.values()
    }

    /// The generations of a listener: the remembered processes that held
    /// it or accepted from it, oldest first.
    pub fn generations(&self, listener: &ListenAddr) -> Vec<&ProcRestart> {
        let mut gens: Vec<&ProcRestart> = self
            .procs
            .values()
            .filter(|p| p.keys.contains(listener))
            .collect();
        gens.sort_by_key(|p| (p.first_seen, p.pid));
        gens
    }

    /// Facts recorded after `seq` (all kept ones for `None`), oldest first.
    pub fn facts_after(&self, seq: Option<u64>) -> impl Iterator<Item = &Fact> {
        self.facts
            .iter()
            .filter(move |f| seq.is_none_or(|s| f.seq > s))
    }

    /// The observed drains, oldest first (at most
    /// [`RECORDS_KEPT`](super::records::RECORDS_KEPT)).
    pub fn records(&self) -> impl DoubleEndedIterator<Item = &DrainRecord> {
        self.records.iter()
    }

    /// The monitor's start on the model's clock, as the latest
    /// [`Restarts::annotate`] was told: times minus this count like a
    /// status's `uptime_ms`.
    pub fn started(&self) -> Duration {
        self.started
    }

    /// The latest time the model was fed (a status, an event, a tick).
    pub fn now(&self) -> Duration {
        self.now
    }

    /// `seq` of the first fact the latest status brought: facts before it
    /// came from events and time before that status.
    pub fn observed_from(&self) -> u64 {
        self.observed_from
    }

    /// Whether a fact was recorded since the last call; clears the flag
    /// (the monitor publishes at once for these).
    pub fn take_significant(&mut self) -> bool {
        std::mem::take(&mut self.significant)
    }

    /// Whether a fact was recorded since the last [`Restarts::take_significant`].
    pub fn significant(&self) -> bool {
        self.significant
    }

    /// Processes that left the status and whose liveness is not known:
    /// the caller looks and answers with [`Restarts::liveness`].
    pub fn unchecked_gone(&self) -> Vec<u32> {
        self.procs
            .values()
            .filter(|p| !p.present && !p.alive_checked && p.role != Role::Exited)
            .map(|p| p.pid)
            .collect()
    }

    /// Processes that left the status but were alive when last checked:
    /// the caller looks again now and then.
    pub fn gone_alive(&self) -> Vec<u32> {
        self.procs
            .values()
            .filter(|p| !p.present && p.alive_checked && p.role != Role::Exited)
            .map(|p| p.pid)
            .collect()
    }

    /// Fills the role fields of `status` (the one this model last
    /// observed) from the model: `processes[].role`/`role_since_ms` and
    /// `listeners[].generations`. `started` is the monitor's start on the
    /// clock the model is fed with, so `role_since_ms` counts like
    /// `uptime_ms`. A listed process the model does not know is serving
    /// since it was first seen; one it believes exited (a pid reused
    /// between two looks) is drained: a listed process never shows
    /// `exited`. A draining process's `role_since_ms` is when its drain
    /// started, which for a handover is before the model declared it (see
    /// the module documentation). The model remembers `started` for
    /// readers of its records ([`Restarts::started`]).
    pub fn annotate(&mut self, status: &mut Status, started: Duration) {
        self.started = started;
        let since = |t: Duration| t.saturating_sub(started).as_millis() as u64;
        for p in &mut status.processes {
            let (role, role_since) = match self.procs.get(&p.pid) {
                Some(r) if r.role == Role::Exited => (Role::Drained, r.role_since),
                Some(r) => (r.role, r.role_since),
                None => (Role::Serving, started),
            };
            p.role = role;
            p.role_since_ms = since(role_since);
        }
        for l in &mut status.listeners {
            let key = ListenAddr {
                netns: l.netns,
                local: l.address,
            };
            l.generations = self
                .generations(&key)
                .into_iter()
                .map(|g| GenerationStatus {
                    pid: g.pid,
                    comm: g.comm.clone(),
                    role: g.role,
                    role_since_ms: since(g.role_since),
                    live: g.live,
                })
                .collect();
        }
    }

    // --- feeding ------------------------------------------------------------

    /// Folds in a status published at `now`.
    pub fn observe(&mut self, status: &Status, now: Duration) {
        self.now = self.now.max(now);
        self.observed_from = self.next_seq;
        let mut held: BTreeMap<u32, BTreeSet<ListenAddr>> = BTreeMap::new();
        let mut listeners = Vec::with_capacity(status.listeners.len());
        for l in &status.listeners {
            let addr = ListenAddr {
                netns: l.netns,
                local: l.address,
            };
            listeners.push(addr);
            for h in &l.holders {
                held.entry(h.pid).or_default().insert(addr);
            }
        }

        let mut accepted_by: Vec<(u32, u64)> = Vec::new();
        let mut seen = BTreeSet::new();
        for p in &status.processes {
            seen.insert(p.pid);
            if self
                .procs
                .get(&p.pid)
                .is_some_and(|old| old.role == Role::Exited)
            {
                // A recycled pid: another process.
                self.forget(p.pid);
            }
            let observed = self.observed;
            let proc = self
                .procs
                .entry(p.pid)
                .or_insert_with(|| ProcRestart::new(p.pid, &p.comm, now));
            let delta = if proc.samples.is_empty() {
                // Accepts before the first look are history, unless the
                // process appeared while we watched.
                if observed { p.accepted_total } else { 0 }
            } else {
                p.accepted_total.saturating_sub(proc.accepted_total)
            };
            if !p.comm.is_empty() {
                proc.comm.clone_from(&p.comm);
            }
            proc.live = p.live;
            proc.listeners = held.remove(&p.pid).unwrap_or_default();
            proc.held_listener |= !proc.listeners.is_empty();
            proc.keys.extend(proc.listeners.iter().copied());
            proc.accepted_total = p.accepted_total;
            proc.closed_total = p.closed_total;
            proc.present = true;
            proc.gone_at = None;
            proc.alive_checked = false;
            push_sample(
                &mut proc.samples,
                Sample {
                    at: now,
                    accepted: p.accepted_total,
                    closed: p.closed_total,
                },
            );
            prune_samples(&mut proc.samples, now);
            if delta > 0 {
                proc.last_accept = Some(now);
                proc.others_accepted = 0;
                // The events told whether another process accepted after
                // this one's latest accept; without them (lost), it counts
                // from the next status that shows one.
                let after_own = proc.others_since.is_some_and(|(first, _)| {
                    proc.last_accept_event.is_some_and(|own| own <= first)
                });
                if !after_own {
                    proc.others_since = None;
                }
                accepted_by.push((p.pid, delta));
            }
        }
        for (pid, n) in accepted_by {
            let Some(keys) = self.procs.get(&pid).map(|p| p.keys.clone()) else {
                continue;
            };
            for other in self.procs.values_mut() {
                if other.pid != pid && other.shares_with(&keys) {
                    other.others_accepted += n;
                    if other.others_since.is_none() {
                        other.others_since = Some((now, other.live));
                    }
                }
            }
        }
        for proc in self.procs.values_mut() {
            if proc.present && !seen.contains(&proc.pid) {
                proc.present = false;
                proc.gone_at = Some(now);
                proc.alive_checked = false;
            }
        }
        self.listeners = listeners;
        self.observed = true;
        self.reassess(now);
    }

    /// Folds in one event: accepts (handovers), exits and the connections
    /// they ended.
    pub fn on_event(&mut self, ev: &ConnEvent) {
        match ev {
            ConnEvent::Accept {
                at,
                tuple,
                pid,
                comm,
                ..
            } => self.on_accept(*at, tuple.netns, tuple.local, *pid, comm),
            ConnEvent::Close {
                pid, by_exit: true, ..
            }
            | ConnEvent::PreexistingClose {
                pid, by_exit: true, ..
            } => {
                if let Some(p) = self.procs.get_mut(pid) {
                    p.exit_closes += 1;
                }
            }
            ConnEvent::ProcessExit { at, pid } => self.exited(*pid, *at),
            _ => {}
        }
    }

    /// Time passes: roles that depend on quiet time, and forgetting
    /// processes gone long ago.
    pub fn tick(&mut self, now: Duration) {
        self.now = self.now.max(now);
        self.reassess(now);
        for p in self.procs.values_mut() {
            prune_samples(&mut p.samples, now);
        }
        let old: Vec<u32> = self
            .procs
            .values()
            .filter(|p| {
                !p.present
                    && p.gone_at
                        .is_some_and(|t| now.saturating_sub(t) >= KEEP_GONE)
            })
            .map(|p| p.pid)
            .collect();
        for pid in old {
            self.forget(pid);
        }
    }

    /// The caller's answer for a process that left the status.
    pub fn liveness(&mut self, pid: u32, alive: bool, now: Duration) {
        if alive {
            if let Some(p) = self.procs.get_mut(&pid) {
                p.alive_checked = true;
            }
            self.reassess(now);
        } else {
            self.exited(pid, now);
        }
    }

    /// A drain gracewatch runs on `pid` started or ended.
    pub fn drain_note(&mut self, pid: u32, note: DrainNote, now: Duration) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        let from = p.role;
        let change = match note {
            DrainNote::Started if p.role != Role::Exited => {
                p.start_draining((now, p.live), now, Why::DrainStarted, true);
                Some(None)
            }
            DrainNote::Started => None,
            DrainNote::Drained | DrainNote::Cancelled | DrainNote::Ended => {
                if let Some(mark) = p.drain.as_mut() {
                    mark.by_user = false;
                }
                match note {
                    DrainNote::Drained if p.role == Role::Draining => {
                        p.set_role(Role::Drained, now, Why::DrainFinished);
                        let drained = p.drain.as_mut().map(|mark| {
                            let done = *mark.done_at.get_or_insert(now);
                            (done.saturating_sub(mark.since), mark.from_live)
                        });
                        Some(drained)
                    }
                    DrainNote::Cancelled if p.role == Role::Draining => {
                        p.set_role(Role::Serving, now, Why::DrainCancelled);
                        p.drain = None;
                        Some(None)
                    }
                    _ => None,
                }
            }
        };
        if let Some(drained) = change {
            let (to, why, live) = (p.role, p.why, p.live);
            self.record(
                now,
                pid,
                Change::Role {
                    from,
                    to,
                    why,
                    live,
                    drained,
                },
            );
        }
    }

    // --- the model ----------------------------------------------------------

    /// Places an accepted connection on its listener; a process that starts
    /// accepting on a listener an earlier process serves is a handover.
    fn on_accept(&mut self, at: Duration, netns: NetNs, local: SocketAddr, pid: u32, comm: &str) {
        let Some(key) = self
            .listeners
            .iter()
            .filter(|addr| addr.matches(netns, local))
            .max_by_key(|addr| addr.specificity(local))
            .copied()
        else {
            return;
        };
        self.now = self.now.max(at);
        let newcomer_since = self.procs.get(&pid).map(|p| p.first_seen);
        if let Some(p) = self.procs.get_mut(&pid) {
            p.keys.insert(key);
            p.last_accept_event = Some(at);
            p.others_since = None;
            // Live as the last status showed it, plus what it accepted
            // since: what it holds when another process starts accepting
            // may include accepts no status has shown yet (a rescan can
            // find both at once).
            if p.present {
                p.live += 1;
            }
        }
        // Where a handover's drain will count from (module documentation).
        for q in self.procs.values_mut() {
            if q.pid != pid && q.keys.contains(&key) && q.others_since.is_none() {
                q.others_since = Some((at, q.live));
            }
        }
        if self.handovers.contains(&(key, pid)) {
            return;
        }
        let alongside: Vec<u32> = self
            .procs
            .values()
            .filter(|q| {
                q.pid != pid
                    && q.present
                    && q.role == Role::Serving
                    && q.listeners.contains(&key)
                    && newcomer_since.is_none_or(|t| q.first_seen < t)
            })
            .map(|q| q.pid)
            .collect();
        if alongside.is_empty() {
            return;
        }
        self.handovers.insert((key, pid));
        self.record(
            at,
            pid,
            Change::Handover {
                listener: key,
                comm: comm.to_owned(),
                alongside,
            },
        );
    }

    fn exited(&mut self, pid: u32, at: Duration) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        if p.role == Role::Exited {
            return;
        }
        let held = p.exit_closes.max(if p.present { p.live } else { 0 });
        if p.role == Role::Draining && held == 0 {
            // It let go of its last connection and exited before a status
            // showed it at zero (a draining process without a listener
            // leaves the status as its count reaches zero): a drain that
            // ended when it left the status, not one cut short.
            let zero = p.gone_at.unwrap_or(at);
            p.live = 0;
            let drained = p.drained(zero, Why::ReachedZero);
            self.record(
                zero,
                pid,
                Change::Role {
                    from: Role::Draining,
                    to: Role::Drained,
                    why: Why::ReachedZero,
                    live: 0,
                    drained,
                },
            );
        }
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        let was = p.role;
        p.set_role(Role::Exited, at, Why::Exited);
        p.present = false;
        p.live = 0;
        p.gone_at = Some(at);
        self.record(at, pid, Change::Exited { held, was });
    }

    /// Role transitions that depend on time as well as on counts.
    fn reassess(&mut self, now: Duration) {
        let mut changes = Vec::new();
        for p in self.procs.values_mut() {
            let user_drain = p
                .drain
                .as_ref()
                .is_some_and(|d| d.by_user && d.done_at.is_none());
            let from = p.role;
            let mut drained = None;
            match p.role {
                Role::Exited => continue,
                _ if !p.present => {
                    if !p.alive_checked || p.role == Role::Drained {
                        continue;
                    }
                    p.live = 0;
                    drained = p.drained(now, Why::HoldsNothing);
                }
                Role::Serving if p.live > 0 => {
                    let quiet = now.saturating_sub(p.last_accept.unwrap_or(p.first_seen));
                    let why = if p.listeners.is_empty() && p.held_listener {
                        Why::ClosedItsListener
                    } else if p.others_accepted >= HANDOVER_MIN_ACCEPTS && quiet >= HANDOVER_QUIET {
                        Why::AnotherAccepts
                    } else {
                        continue;
                    };
                    let from = match why {
                        Why::AnotherAccepts => p.others_since.unwrap_or((now, p.live)),
                        _ => (now, p.live),
                    };
                    p.start_draining(from, now, why, false);
                }
                Role::Serving => continue,
                Role::Draining | Role::Drained
                    if !user_drain && p.last_accept.is_some_and(|t| t > p.role_set_at) =>
                {
                    p.set_role(Role::Serving, now, Why::AcceptsAgain);
                    p.drain = None;
                }
                Role::Draining if p.live == 0 => {
                    drained = p.drained(now, Why::ReachedZero);
                }
                Role::Draining | Role::Drained => continue,
            }
            // A drain's fact is dated when it started (back-dated for a
            // handover); other changes happen now.
            changes.push((
                p.pid,
                p.role_since.min(now),
                Change::Role {
                    from,
                    to: p.role,
                    why: p.why,
                    live: p.live,
                    drained,
                },
            ));
        }
        for (pid, at, change) in changes {
            self.record(at, pid, change);
        }
    }

    fn record(&mut self, at: Duration, pid: u32, change: Change) {
        if self.facts.len() == FACTS_KEPT {
            self.facts.pop_front();
        }
        let fact = Fact {
            seq: self.next_seq,
            at,
            pid,
            change,
        };
        // Handovers are no part of a drain record: leave the shared
        // records uncopied.
        if let Some(p) = self.procs.get(&pid)
            && !matches!(fact.change, Change::Handover { .. })
        {
            std::sync::Arc::make_mut(&mut self.records).fold(&fact, &p.comm, &p.keys);
        }
        self.facts.push_back(fact);
        self.next_seq += 1;
        self.significant = true;
    }

    fn forget(&mut self, pid: u32) {
        if let Some(p) = self.procs.remove(&pid)
            && self.records.has_open(pid)
        {
            std::sync::Arc::make_mut(&mut self.records).lost(pid, p.gone_at.unwrap_or(self.now));
        }
        self.handovers.retain(|(_, p)| *p != pid);
    }
}

fn push_sample(samples: &mut VecDeque<Sample>, sample: Sample) {
    let len = samples.len();
    if len >= 2 && sample.at.saturating_sub(samples[len - 2].at) < SAMPLE_EVERY {
        samples[len - 1] = sample;
    } else {
        samples.push_back(sample);
    }
}

fn prune_samples(samples: &mut VecDeque<Sample>, now: Duration) {
    // Keep one sample at or before the window's start as the baseline.
    let from = now.saturating_sub(RATE_WINDOW);
    while samples.len() > 1 && samples.get(1).is_some_and(|s| s.at <= from) {
        samples.pop_front();
    }
}
