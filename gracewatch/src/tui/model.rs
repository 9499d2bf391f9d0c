//! What the TUI knows about the host, folded from the monitor's [`Status`]
//! stream and its [`ConnEvent`]s: per-process history (rates, a chart
//! series), the role of each process in a restart, the listeners, and the
//! event log. Pure like the tracker: callers pass the time in, nothing here
//! reads a clock or the system, so every transition is testable by hand.
//!
//! Roles are the TUI's reading of a restart, derived from what the kernel
//! shows (the tracker only counts):
//!
//! - **serving**: the default;
//! - **draining**: it holds live connections and either a drain was started
//!   on it here, or it closed its listener, or another process keeps
//!   accepting on a listener it shares while it accepts nothing (the
//!   handover of an fd-passing restart);
//! - **drained**: it was draining and reached zero (or let go of everything);
//! - **exited**: it is gone. Kept a while, greyed, then dropped.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::SocketAddr,
    time::Duration,
};

use crate::{
    drain::{DrainReport, Outcome, Progress},
    event::{ConnEvent, ListenAddr, NetNs},
    tracker::{ListenerStatus, Status},
};

/// Window over which accepts/s and closes/s are measured.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);
/// A process that accepted nothing for this long while others accepted on
/// its listener is draining…
pub const HANDOVER_QUIET: Duration = Duration::from_secs(2);
/// …once the others accepted at least this many connections since its last
/// accept (one stray connection is not a handover).
pub const HANDOVER_MIN_ACCEPTS: u64 = 3;
/// How long an exited (or vanished) process stays in the table.
pub const KEEP_GONE: Duration = Duration::from_secs(60);
/// The chart's span, and how much per-process history is kept.
pub const CHART_SPAN: Duration = Duration::from_secs(300);
/// Log lines kept.
const LOG_CAP: usize = 1000;

/// A listener as users name it: namespace plus `ip:port`.
pub type ListenerKey = (NetNs, SocketAddr);

/// Startup filters (`--pid`, `--port`, `--comm`). A process is shown when
/// it matches every kind given, and stays shown once it did (an old server
/// that closed its listener no longer holds the port but is still draining).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartFilter {
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    pub comms: Vec<String>,
}

impl StartFilter {
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty() && self.ports.is_empty() && self.comms.is_empty()
    }

    pub fn matches(&self, pid: u32, comm: &str, ports: &[u16]) -> bool {
        (self.pids.is_empty() || self.pids.contains(&pid))
            && (self.comms.is_empty() || self.comms.iter().any(|c| comm_matches(comm, c)))
            && (self.ports.is_empty() || ports.iter().any(|p| self.ports.contains(p)))
    }
}

/// The kernel keeps 15 bytes of a command name: `--comm` may name it in full.
fn comm_matches(comm: &str, wanted: &str) -> bool {
    comm == wanted || (comm.len() >= 15 && wanted.starts_with(comm))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
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

/// A drain in the TUI's sense: from when the process started draining.
#[derive(Clone, Debug, PartialEq)]
pub struct DrainMark {
    /// Live connections when the drain began (the progress bar's 0 %).
    pub from_live: u64,
    pub since: Duration,
    /// Started here with `d` (the drain gate runs); otherwise inferred.
    pub by_user: bool,
    /// The gate's latest progress, for drains started here.
    pub progress: Option<Progress>,
    /// When it reached zero.
    pub done_at: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sample {
    at: Duration,
    accepted: u64,
    closed: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Proc {
    pub pid: u32,
    pub comm: String,
    pub role: Role,
    pub role_since: Duration,
    /// Why it has its role (shown in the log and the detail view).
    pub reason: String,
    pub live: u64,
    /// Listeners it holds now.
    pub listeners: Vec<SocketAddr>,
    /// Listeners it held or accepted from since it was first seen.
    pub keys: BTreeSet<ListenerKey>,
    /// It held a listener in some status (a handover child may accept from
    /// an inherited one before a rescan lists it as a holder).
    pub held_listener: bool,
    pub accepted_total: u64,
    pub closed_total: u64,
    /// Age of its oldest live connection at `Model::status_at`.
    pub oldest_live_ms: Option<u64>,
    pub first_seen: Duration,
    /// In the latest status.
    pub present: bool,
    /// When it left the status or exited.
    pub gone_at: Option<Duration>,
    /// Whether the loop has checked if a vanished process is still alive.
    pub alive_checked: bool,
    /// Connections that ended because it was exiting.
    pub exit_closes: u64,
    pub drain: Option<DrainMark>,
    /// Live connections, one point per second: (seconds since start, live).
    pub history: VecDeque<(u64, u64)>,
    samples: VecDeque<Sample>,
    last_accept: Option<Duration>,
    /// Accepts by processes sharing a listener with it since its last accept.
    others_accepted: u64,
}

impl Proc {
    fn new(pid: u32, comm: &str, now: Duration) -> Self {
        Self {
            pid,
            comm: comm.to_owned(),
            role: Role::Serving,
            role_since: now,
            reason: String::new(),
            live: 0,
            listeners: Vec::new(),
            keys: BTreeSet::new(),
            held_listener: false,
            accepted_total: 0,
            closed_total: 0,
            oldest_live_ms: None,
            first_seen: now,
            present: true,
            gone_at: None,
            alive_checked: false,
            exit_closes: 0,
            drain: None,
            history: VecDeque::new(),
            samples: VecDeque::new(),
            last_accept: None,
            others_accepted: 0,
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

    /// Oldest live connection's age as of `now`.
    pub fn oldest_age(&self, status_at: Duration, now: Duration) -> Option<Duration> {
        if !self.present || self.live == 0 {
            return None;
        }
        self.oldest_live_ms
            .map(|ms| Duration::from_millis(ms) + now.saturating_sub(status_at))
    }

    /// Fraction of the drain done (0..=1) and the estimated time to zero.
    pub fn drain_progress(&self, now: Duration) -> Option<(f64, Option<Duration>)> {
        let mark = self.drain.as_ref()?;
        let from = mark.from_live.max(self.live).max(1);
        let done = 1.0 - self.live as f64 / from as f64;
        let eta = match &mark.progress {
            Some(p) if mark.by_user => p.eta_ms.map(Duration::from_millis),
            _ => {
                let (_, closes) = self.rates(now);
                (closes > 0.0 && self.live > 0)
                    .then(|| Duration::from_secs_f64(self.live as f64 / closes))
            }
        };
        Some((done.clamp(0.0, 1.0), eta))
    }

    fn shares_with(&self, other: &Proc) -> bool {
        self.keys.iter().any(|k| other.keys.contains(k))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogKind {
    Listener,
    Handover,
    Role,
    Exit,
    Signal,
    Drain,
    Warning,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub at: Duration,
    pub kind: LogKind,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// When the TUI started: log times and the chart are relative to it.
    pub started: Duration,
    pub filter: StartFilter,
    pub procs: BTreeMap<u32, Proc>,
    /// Listeners shown (those the filter keeps).
    pub listeners: Vec<ListenerStatus>,
    /// When the latest status arrived.
    pub status_at: Duration,
    pub lost_events: u64,
    /// Episodes of untracked connections (a full kernel table), latest total.
    pub map_full: u64,
    pub log: VecDeque<LogEntry>,
    /// Every listener of the latest status, parsed, to place accepted connections.
    all_listeners: Vec<(ListenAddr, ListenerKey)>,
    observed: bool,
    /// (listener, pid, opened) already logged from an event, so the holder
    /// change seen in the next status is not logged twice.
    announced: BTreeSet<(ListenerKey, u32, bool)>,
    handovers: BTreeSet<(ListenerKey, u32)>,
    last_history_sec: Option<u64>,
}

impl Model {
    pub fn new(filter: StartFilter, started: Duration) -> Self {
        Self {
            started,
            filter,
            procs: BTreeMap::new(),
            listeners: Vec::new(),
            status_at: started,
            lost_events: 0,
            map_full: 0,
            log: VecDeque::new(),
            all_listeners: Vec::new(),
            observed: false,
            announced: BTreeSet::new(),
            handovers: BTreeSet::new(),
            last_history_sec: None,
        }
    }

    fn push_log(&mut self, at: Duration, kind: LogKind, text: String) {
        if self.log.len() == LOG_CAP {
            self.log.pop_front();
        }
        self.log.push_back(LogEntry {
            at: at.max(self.started),
            kind,
            text,
        });
    }

    fn label(&self, pid: u32) -> String {
        match self.procs.get(&pid) {
            Some(p) if !p.comm.is_empty() => format!("pid {pid} ({})", p.comm),
            _ => format!("pid {pid}"),
        }
    }

    /// Whether a process not yet shown should be.
    fn wants(&self, pid: u32, comm: &str, ports: &[u16]) -> bool {
        self.procs.get(&pid).is_some_and(|p| p.role != Role::Exited)
            || self.filter.matches(pid, comm, ports)
    }

    /// Folds in a status published by the monitor.
    pub fn observe(&mut self, status: &Status, now: Duration) {
        // An episode before the event subscription (at startup) shows too.
        self.map_full = self.map_full.max(status.map_full_total);
        let mut keys_of: HashMap<u32, Vec<ListenerKey>> = HashMap::new();
        for l in &status.listeners {
            for h in &l.holders {
                keys_of.entry(h.pid).or_default().push((l.netns, l.address));
            }
        }
        let before: BTreeMap<ListenerKey, BTreeSet<u32>> = self
            .listeners
            .iter()
            .map(|l| {
                (
                    (l.netns, l.address),
                    l.holders.iter().map(|h| h.pid).collect(),
                )
            })
            .collect();

        let mut accepted_by: Vec<(u32, u64)> = Vec::new();
        let mut seen = BTreeSet::new();
        for p in &status.processes {
            let ports: Vec<u16> = p.listeners.iter().map(SocketAddr::port).collect();
            if !self.wants(p.pid, &p.comm, &ports) {
                continue;
            }
            seen.insert(p.pid);
            let reused = self
                .procs
                .get(&p.pid)
                .is_some_and(|old| old.role == Role::Exited);
            if reused {
                self.procs.remove(&p.pid);
            }
            let observed = self.observed;
            let proc = self
                .procs
                .entry(p.pid)
                .or_insert_with(|| Proc::new(p.pid, &p.comm, now));
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
            proc.listeners.clone_from(&p.listeners);
            proc.held_listener |= !p.listeners.is_empty();
            proc.accepted_total = p.accepted_total;
            proc.closed_total = p.closed_total;
            proc.oldest_live_ms = p.oldest_live_ms;
            proc.present = true;
            proc.gone_at = None;
            proc.alive_checked = false;
            if let Some(keys) = keys_of.get(&p.pid) {
                proc.keys.extend(keys.iter().cloned());
            }
            proc.samples.push_back(Sample {
                at: now,
                accepted: p.accepted_total,
                closed: p.closed_total,
            });
            prune_samples(&mut proc.samples, now);
            if delta > 0 {
                proc.last_accept = Some(now);
                proc.others_accepted = 0;
                accepted_by.push((p.pid, delta));
            }
        }
        for (pid, n) in accepted_by {
            let Some(acceptor) = self.procs.get(&pid).cloned() else {
                continue;
            };
            for other in self.procs.values_mut() {
                if other.pid != pid && other.shares_with(&acceptor) {
                    other.others_accepted += n;
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

        self.all_listeners = status
            .listeners
            .iter()
            .map(|l| {
                (
                    ListenAddr {
                        netns: l.netns,
                        local: l.address,
                    },
                    (l.netns, l.address),
                )
            })
            .collect();
        self.listeners = status
            .listeners
            .iter()
            .filter(|l| {
                self.filter.is_empty()
                    || l.holders.iter().any(|h| self.procs.contains_key(&h.pid))
                    || (!self.filter.ports.is_empty()
                        && self.filter.ports.contains(&l.address.port()))
            })
            .cloned()
            .collect();
        if self.observed {
            self.log_holder_changes(&before, now);
        }
        self.status_at = now;
        self.observed = true;
        self.reassess(now);
    }

    /// Logs processes that took or let go of a listener someone else holds
    /// too (inherited fds): the kernel reports no event for those.
    fn log_holder_changes(&mut self, before: &BTreeMap<ListenerKey, BTreeSet<u32>>, now: Duration) {
        let mut lines = Vec::new();
        let mut after_keys = BTreeSet::new();
        for l in &self.listeners {
            let key = (l.netns, l.address);
            let after: BTreeSet<u32> = l.holders.iter().map(|h| h.pid).collect();
            let prev = before.get(&key);
            for &pid in &after {
                if prev.is_some_and(|p| !p.contains(&pid))
                    && !self.announced.remove(&(key, pid, true))
                {
                    lines.push(format!("{} now holds listener {}", self.label(pid), key.1));
                }
            }
            if let Some(prev) = prev {
                for &pid in prev.difference(&after) {
                    if !self.announced.remove(&(key, pid, false)) {
                        lines.push(format!("{} let go of listener {}", self.label(pid), key.1));
                    }
                }
            }
            after_keys.insert(key);
        }
        for (key, prev) in before {
            if after_keys.contains(key) {
                continue;
            }
            // Closed for good: the event said so already, for every holder.
            let stopped: Vec<_> = self
                .announced
                .iter()
                .filter(|(k, _, opened)| k == key && !opened)
                .cloned()
                .collect();
            if !stopped.is_empty() {
                for a in stopped {
                    self.announced.remove(&a);
                }
                continue;
            }
            for &pid in prev {
                if !self.announced.remove(&(*key, pid, false)) {
                    lines.push(format!("{} let go of listener {}", self.label(pid), key.1));
                }
            }
        }
        for line in lines {
            self.push_log(now, LogKind::Listener, line);
        }
    }

    /// Folds in one kernel event (listeners, accepts, exits, losses).
    pub fn on_event(&mut self, ev: &ConnEvent) {
        match ev {
            ConnEvent::ListenStart {
                at,
                addr,
                pid,
                comm,
                ..
            } => {
                if self.wants(*pid, comm, &[addr.local.port()]) {
                    let key = key_of(addr);
                    let line = format!(
                        "pid {pid} ({comm}) opened listener {}",
                        display_addr(addr.local)
                    );
                    self.announced.insert((key, *pid, true));
                    self.push_log(*at, LogKind::Listener, line);
                }
            }
            ConnEvent::ListenStop {
                at,
                addr,
                pid,
                comm,
                ..
            } => {
                if self.wants(*pid, comm, &[addr.local.port()]) {
                    let key = key_of(addr);
                    let line = format!(
                        "listener {} closed (last holder pid {pid} ({comm}))",
                        display_addr(addr.local)
                    );
                    self.announced.insert((key, *pid, false));
                    self.push_log(*at, LogKind::Listener, line);
                }
            }
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
            ConnEvent::ProcessExit { at, pid } => self.mark_exited(*pid, *at),
            ConnEvent::Lost { at, total } => {
                if *total > self.lost_events {
                    let line = format!(
                        "the kernel lost {} event(s) ({total} in all): counts may be stale until the next rescan",
                        total - self.lost_events
                    );
                    self.lost_events = *total;
                    self.push_log(*at, LogKind::Warning, line);
                }
            }
            ConnEvent::MapFull { at, total } => {
                if *total > self.map_full {
                    self.map_full = *total;
                    self.push_log(
                        *at,
                        LogKind::Warning,
                        "the kernel's connection table is full (raise --max-connections): \
                         some connections are counted only by rescans"
                            .to_owned(),
                    );
                }
            }
            ConnEvent::Handshake { .. }
            | ConnEvent::QueueDrop { .. }
            | ConnEvent::Close { .. }
            | ConnEvent::PreexistingClose { .. } => {}
        }
    }

    /// Places an accepted connection on its listener; a process that starts
    /// accepting on a listener an earlier process serves is a handover.
    fn on_accept(&mut self, at: Duration, netns: NetNs, local: SocketAddr, pid: u32, comm: &str) {
        if !self.wants(pid, comm, &[local.port()]) {
            return;
        }
        let Some(key) = self
            .all_listeners
            .iter()
            .filter(|(addr, _)| addr.matches(netns, local))
            .max_by_key(|(addr, _)| addr.specificity(local))
            .map(|(_, key)| *key)
        else {
            return;
        };
        let newcomer_since = self.procs.get(&pid).map(|p| p.first_seen);
        if let Some(p) = self.procs.get_mut(&pid) {
            p.keys.insert(key);
        }
        if self.handovers.contains(&(key, pid)) {
            return;
        }
        let earlier = self
            .procs
            .values()
            .filter(|q| {
                q.pid != pid
                    && q.present
                    && q.role == Role::Serving
                    && q.listeners.contains(&key.1)
                    && newcomer_since.is_none_or(|t| q.first_seen < t)
            })
            .map(|q| q.pid)
            .collect::<Vec<_>>();
        if earlier.is_empty() {
            return;
        }
        self.handovers.insert((key, pid));
        let others = earlier
            .iter()
            .map(|&q| self.label(q))
            .collect::<Vec<_>>()
            .join(", ");
        let line = format!(
            "{}: pid {pid} ({comm}) starts accepting alongside {others}",
            key.1
        );
        self.push_log(at, LogKind::Handover, line);
    }

    /// Processes that left the status and whose liveness the loop should check.
    pub fn unchecked_gone(&self) -> Vec<u32> {
        self.procs
            .values()
            .filter(|p| !p.present && !p.alive_checked && p.role != Role::Exited)
            .map(|p| p.pid)
            .collect()
    }

    /// Processes that left the status but were alive when last checked.
    pub fn gone_alive(&self) -> Vec<u32> {
        self.procs
            .values()
            .filter(|p| !p.present && p.alive_checked && p.role != Role::Exited)
            .map(|p| p.pid)
            .collect()
    }

    /// The loop's answer for a process that left the status.
    pub fn liveness(&mut self, pid: u32, alive: bool, now: Duration) {
        if alive {
            if let Some(p) = self.procs.get_mut(&pid) {
                p.alive_checked = true;
            }
            self.reassess(now);
        } else {
            self.mark_exited(pid, now);
        }
    }

    pub fn mark_exited(&mut self, pid: u32, at: Duration) {
        let label = self.label(pid);
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        if p.role == Role::Exited {
            return;
        }
        let held = p.exit_closes.max(if p.present { p.live } else { 0 });
        let was = p.role;
        set_role(p, Role::Exited, at, "");
        p.present = false;
        p.live = 0;
        p.gone_at = Some(at);
        let line = if held > 0 {
            format!("{label} exited holding {held} live connection(s)")
        } else if matches!(was, Role::Drained | Role::Draining) {
            format!("{label} exited after draining")
        } else {
            format!("{label} exited")
        };
        self.push_log(at, LogKind::Exit, line);
    }

    /// Role transitions that depend on time as well as on counts.
    fn reassess(&mut self, now: Duration) {
        let mut lines = Vec::new();
        for p in self.procs.values_mut() {
            let user_drain = p
                .drain
                .as_ref()
                .is_some_and(|d| d.by_user && d.done_at.is_none());
            match p.role {
                Role::Exited => {}
                _ if !p.present => {
                    if !p.alive_checked {
                        continue;
                    }
                    if p.role != Role::Drained {
                        let from = p.role;
                        p.live = 0;
                        set_role(p, Role::Drained, now, "holds nothing any more");
                        lines.push((p.pid, drained_line(p, from, now)));
                    }
                }
                Role::Serving if p.live > 0 => {
                    let quiet = now.saturating_sub(p.last_accept.unwrap_or(p.first_seen));
                    let why = if p.listeners.is_empty() && p.held_listener {
                        Some("closed its listener")
                    } else if p.others_accepted >= HANDOVER_MIN_ACCEPTS && quiet >= HANDOVER_QUIET {
                        Some("another process accepts on its listener")
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        start_draining(p, now, why, false);
                        lines.push((p.pid, format!("draining: {why}, {} live", p.live)));
                    }
                }
                Role::Serving => {}
                Role::Draining | Role::Drained
                    if !user_drain && p.last_accept.is_some_and(|t| t > p.role_since) =>
                {
                    set_role(p, Role::Serving, now, "accepts again");
                    p.drain = None;
                    lines.push((p.pid, "accepts again: serving".to_owned()));
                }
                Role::Draining if p.live == 0 => {
                    set_role(p, Role::Drained, now, "reached zero");
                    lines.push((p.pid, drained_line(p, Role::Draining, now)));
                }
                Role::Draining | Role::Drained => {}
            }
        }
        for (pid, text) in lines {
            let line = format!("{} {text}", self.label(pid));
            self.push_log(now, LogKind::Role, line);
        }
    }

    /// Time passes: roles that depend on quiet time, the chart's series,
    /// and forgetting processes gone long ago.
    pub fn tick(&mut self, now: Duration) {
        self.reassess(now);
        let sec = now.saturating_sub(self.started).as_secs();
        if self.last_history_sec.is_none_or(|s| sec > s) {
            self.last_history_sec = Some(sec);
            let keep_from = sec.saturating_sub(CHART_SPAN.as_secs());
            for p in self.procs.values_mut() {
                if p.role != Role::Exited {
                    p.history
                        .push_back((sec, if p.present { p.live } else { 0 }));
                }
                while p.history.front().is_some_and(|&(s, _)| s < keep_from) {
                    p.history.pop_front();
                }
                prune_samples(&mut p.samples, now);
            }
        }
        self.procs.retain(|_, p| {
            p.present || p.gone_at.is_none_or(|t| now.saturating_sub(t) < KEEP_GONE)
        });
    }

    /// A drain started here with `d`.
    pub fn drain_started(&mut self, pid: u32, what: &str, now: Duration) {
        let label = self.label(pid);
        if let Some(p) = self.procs.get_mut(&pid) {
            start_draining(p, now, "drain started", true);
        }
        self.push_log(
            now,
            LogKind::Drain,
            format!("drain of {label} started: {what}"),
        );
    }

    pub fn drain_progress(&mut self, pid: u32, progress: Progress) {
        if let Some(mark) = self.procs.get_mut(&pid).and_then(|p| p.drain.as_mut()) {
            mark.progress = Some(progress);
        }
    }

    pub fn drain_finished(&mut self, pid: u32, report: &DrainReport, now: Duration) {
        if let Some(p) = self.procs.get_mut(&pid) {
            if let Some(mark) = p.drain.as_mut() {
                mark.by_user = false;
                mark.progress = None;
            }
            if report.outcome == Outcome::Drained && p.role == Role::Draining {
                set_role(p, Role::Drained, now, "drain finished");
                if let Some(mark) = p.drain.as_mut() {
                    mark.done_at.get_or_insert(now);
                }
            } else if report.outcome == Outcome::Interrupted && p.role == Role::Draining {
                set_role(p, Role::Serving, now, "drain cancelled");
                p.drain = None;
            }
        }
        let kind = if report.signal_sent.is_some() {
            LogKind::Signal
        } else {
            LogKind::Drain
        };
        self.push_log(now, kind, format!("drain: {}", report.message));
    }

    /// A signal sent with `s`, or why it could not be.
    pub fn signal_result(
        &mut self,
        pid: u32,
        signal: &str,
        result: Result<(), String>,
        now: Duration,
    ) {
        let label = self.label(pid);
        match result {
            Ok(()) => self.push_log(now, LogKind::Signal, format!("sent {signal} to {label}")),
            Err(e) => self.push_log(
                now,
                LogKind::Warning,
                format!("could not send {signal} to {label}: {e}"),
            ),
        }
    }

    /// A line from the loop (errors of background work).
    pub fn note(&mut self, now: Duration, kind: LogKind, text: String) {
        self.push_log(now, kind, text);
    }

    pub fn total_live(&self) -> u64 {
        self.procs
            .values()
            .filter(|p| p.present)
            .map(|p| p.live)
            .sum()
    }

    /// Listen addresses a process held, for the fd look of the detail view.
    pub fn listen_addrs_of(&self, pid: u32) -> Vec<ListenAddr> {
        self.procs
            .get(&pid)
            .map(|p| {
                p.keys
                    .iter()
                    .map(|&(netns, local)| ListenAddr { netns, local })
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn set_role(p: &mut Proc, role: Role, now: Duration, reason: &str) {
    p.role = role;
    p.role_since = now;
    reason.clone_into(&mut p.reason);
}

fn start_draining(p: &mut Proc, now: Duration, why: &str, by_user: bool) {
    set_role(p, Role::Draining, now, why);
    let keep = p.drain.as_ref().is_some_and(|d| d.done_at.is_none());
    if keep {
        if let Some(d) = p.drain.as_mut() {
            d.by_user |= by_user;
        }
    } else {
        p.drain = Some(DrainMark {
            from_live: p.live,
            since: now,
            by_user,
            progress: None,
            done_at: None,
        });
    }
}

fn drained_line(p: &mut Proc, from: Role, now: Duration) -> String {
    match p.drain.as_mut() {
        Some(mark) if from == Role::Draining => {
            mark.done_at = Some(now);
            format!(
                "drained: 0 live after {} (from {})",
                human(now.saturating_sub(mark.since)),
                mark.from_live
            )
        }
        _ => "drained: holds nothing any more".to_owned(),
    }
}

fn prune_samples(samples: &mut VecDeque<Sample>, now: Duration) {
    // Keep one sample at or before the window's start as the baseline.
    let from = now.saturating_sub(RATE_WINDOW);
    while samples.len() > 1 && samples.get(1).is_some_and(|s| s.at <= from) {
        samples.pop_front();
    }
}

fn key_of(addr: &ListenAddr) -> ListenerKey {
    (addr.netns, addr.local)
}

/// `ip:port` as the status prints it (IPv6 in brackets).
pub fn display_addr(addr: SocketAddr) -> String {
    addr.to_string()
}

/// `850ms`, `4.2s`, `3m12s`, `1h05m`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else if ms < 3_600_000 {
        let s = d.as_secs();
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let m = d.as_secs() / 60;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}
