//! What the TUI knows about the host, folded from the monitor's [`Status`]
//! stream, its [`ConnEvent`]s and its restart model ([`Restarts`]): the
//! processes shown with their chart series, the listeners, and the event
//! log. The meaning of a restart (roles, handovers, rates) is the
//! tracker's ([`crate::tracker::restart`]); this module only chooses what
//! to show and words it. Pure: callers pass the time in, nothing here reads
//! a clock or the system, so every transition is testable by hand.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::SocketAddr,
    time::Duration,
};

pub use crate::tracker::restart::{KEEP_GONE, Role};
use crate::{
    drain::{DrainReport, Progress},
    event::{ConnEvent, ListenAddr, NetNs},
    tracker::{
        ListenerStatus, Restarts, Status,
        restart::{Change, Fact, ProcRestart},
    },
};

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

/// A process shown: what the status and the restart model say of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Proc {
    pub pid: u32,
    pub comm: String,
    /// Listeners it holds now.
    pub listeners: Vec<SocketAddr>,
    /// Age of its oldest live connection at `Model::status_at`.
    pub oldest_live_ms: Option<u64>,
    /// Where it runs, as the status last said (kept once it is gone).
    pub cgroup: Option<String>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    /// Its role, drain and rates, as the tracker's restart model has them.
    pub restart: ProcRestart,
    /// The gate's latest progress, while a drain started here runs.
    pub progress: Option<Progress>,
    /// Live connections, one point per second: (seconds since start, live).
    pub history: VecDeque<(u64, u64)>,
}

impl Proc {
    fn new(pid: u32, comm: &str, restart: ProcRestart) -> Self {
        Self {
            pid,
            comm: comm.to_owned(),
            listeners: Vec::new(),
            oldest_live_ms: None,
            cgroup: None,
            container_id: None,
            pod_uid: None,
            restart,
            progress: None,
            history: VecDeque::new(),
        }
    }

    pub fn role(&self) -> Role {
        self.restart.role
    }

    pub fn live(&self) -> u64 {
        self.restart.live
    }

    /// In the latest status.
    pub fn present(&self) -> bool {
        self.restart.present
    }

    /// Accepts/s and closes/s as of `now` (see [`ProcRestart::rates`]).
    pub fn rates(&self, now: Duration) -> (f64, f64) {
        self.restart.rates(now)
    }

    /// Oldest live connection's age as of `now`.
    pub fn oldest_age(&self, status_at: Duration, now: Duration) -> Option<Duration> {
        if !self.present() || self.live() == 0 {
            return None;
        }
        self.oldest_live_ms
            .map(|ms| Duration::from_millis(ms) + now.saturating_sub(status_at))
    }

    /// Fraction of the drain done (0..=1) and the estimated time to zero.
    pub fn drain_progress(&self, now: Duration) -> Option<(f64, Option<Duration>)> {
        let mark = self.restart.drain.as_ref()?;
        let live = self.live();
        let from = mark.from_live.max(live).max(1);
        let done = 1.0 - live as f64 / from as f64;
        let eta = match &self.progress {
            Some(p) if mark.by_user => p.eta_ms.map(Duration::from_millis),
            _ => {
                let (_, closes) = self.rates(now);
                (closes > 0.0 && live > 0).then(|| Duration::from_secs_f64(live as f64 / closes))
            }
        };
        Some((done.clamp(0.0, 1.0), eta))
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
    observed: bool,
    /// (listener, pid, opened) already logged from an event, so the holder
    /// change seen in the next status is not logged twice.
    announced: BTreeSet<(ListenerKey, u32, bool)>,
    /// `seq` of the last restart fact taken from the restart model.
    last_fact: Option<u64>,
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
            observed: false,
            announced: BTreeSet::new(),
            last_fact: None,
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
        self.procs
            .get(&pid)
            .is_some_and(|p| p.role() != Role::Exited)
            || self.filter.matches(pid, comm, ports)
    }

    /// Folds in a status published by the monitor, with the restart model
    /// published with it.
    pub fn observe(&mut self, status: &Status, restarts: &Restarts, now: Duration) {
        // An episode before the event subscription (at startup) shows too.
        self.map_full = self.map_full.max(status.map_full_total);
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
        // What happened before this status (accepts, exits, time) is logged
        // before what the status shows.
        self.take_facts(restarts, Some(restarts.observed_from()));

        for p in &status.processes {
            let ports: Vec<u16> = p.listeners.iter().map(SocketAddr::port).collect();
            if !self.wants(p.pid, &p.comm, &ports) {
                continue;
            }
            let reused = self
                .procs
                .get(&p.pid)
                .is_some_and(|old| old.role() == Role::Exited);
            if reused {
                self.procs.remove(&p.pid);
            }
            let proc = self.procs.entry(p.pid).or_insert_with(|| {
                let restart = restarts.process(p.pid).cloned().unwrap_or_else(|| {
                    // The restart model published before this status: it
                    // has the process with the next one.
                    let mut r = ProcRestart::new(p.pid, &p.comm, now);
                    r.live = p.live;
                    r
                });
                Proc::new(p.pid, &p.comm, restart)
            });
            if !p.comm.is_empty() {
                proc.comm.clone_from(&p.comm);
            }
            proc.listeners.clone_from(&p.listeners);
            proc.oldest_live_ms = p.oldest_live_ms;
            proc.cgroup.clone_from(&p.cgroup);
            proc.container_id.clone_from(&p.container_id);
            proc.pod_uid.clone_from(&p.pod_uid);
        }

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
        self.follow(restarts);
    }

    /// Takes what the restart model says: the roles of the processes shown
    /// and the facts not yet logged.
    pub fn follow(&mut self, restarts: &Restarts) {
        self.take_facts(restarts, None);
        for p in self.procs.values_mut() {
            if let Some(r) = restarts.process(p.pid) {
                // A process forgotten by the model keeps its last word here.
                p.restart.clone_from(r);
            }
        }
    }

    /// Logs the restart facts after the last one taken and before `until`
    /// (all for `None`).
    fn take_facts(&mut self, restarts: &Restarts, until: Option<u64>) {
        let facts: Vec<Fact> = restarts
            .facts_after(self.last_fact)
            .take_while(|f| until.is_none_or(|u| f.seq < u))
            .cloned()
            .collect();
        for fact in facts {
            self.last_fact = Some(fact.seq);
            self.log_fact(&fact);
        }
    }

    fn log_fact(&mut self, fact: &Fact) {
        let pid = fact.pid;
        match &fact.change {
            Change::Handover {
                listener,
                comm,
                alongside,
            } => {
                if !self.wants(pid, comm, &[listener.local.port()]) {
                    return;
                }
                let others: Vec<String> = alongside
                    .iter()
                    .filter(|q| self.procs.contains_key(q))
                    .map(|&q| self.label(q))
                    .collect();
                if others.is_empty() {
                    return;
                }
                let line = format!(
                    "{}: pid {pid} ({comm}) starts accepting alongside {}",
                    display_addr(listener.local),
                    others.join(", ")
                );
                self.push_log(fact.at, LogKind::Handover, line);
            }
            Change::Role {
                to,
                why,
                live,
                drained,
                ..
            } => {
                // Drains started here are logged by the loop.
                if !self.procs.contains_key(&pid) || why.by_drain() {
                    return;
                }
                let text = match (to, drained) {
                    (Role::Draining, _) => format!("draining: {}, {live} live", why.text()),
                    (Role::Drained, Some((took, from))) => {
                        format!("drained: 0 live after {} (from {from})", human(*took))
                    }
                    (Role::Drained, None) => "drained: holds nothing any more".to_owned(),
                    (Role::Serving, _) => "accepts again: serving".to_owned(),
                    (Role::Exited, _) => return,
                };
                let line = format!("{} {text}", self.label(pid));
                self.push_log(fact.at, LogKind::Role, line);
            }
            Change::Exited { held, was } => {
                if !self.procs.contains_key(&pid) {
                    return;
                }
                let label = self.label(pid);
                let line = if *held > 0 {
                    format!("{label} exited holding {held} live connection(s)")
                } else if matches!(was, Role::Drained | Role::Draining) {
                    format!("{label} exited after draining")
                } else {
                    format!("{label} exited")
                };
                self.push_log(fact.at, LogKind::Exit, line);
            }
        }
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

    /// Folds in one kernel event (listeners, losses). Accepts and exits
    /// reach the log through the restart model.
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
            | ConnEvent::Accept { .. }
            | ConnEvent::Close { .. }
            | ConnEvent::PreexistingClose { .. }
            | ConnEvent::ProcessExit { .. } => {}
        }
    }

    /// Time passes: the chart's series, and forgetting processes gone
    /// long ago.
    pub fn tick(&mut self, now: Duration) {
        let sec = now.saturating_sub(self.started).as_secs();
        if self.last_history_sec.is_none_or(|s| sec > s) {
            self.last_history_sec = Some(sec);
            let keep_from = sec.saturating_sub(CHART_SPAN.as_secs());
            for p in self.procs.values_mut() {
                if p.role() != Role::Exited {
                    let live = if p.present() { p.live() } else { 0 };
                    p.history.push_back((sec, live));
                }
                while p.history.front().is_some_and(|&(s, _)| s < keep_from) {
                    p.history.pop_front();
                }
            }
        }
        self.procs.retain(|_, p| {
            p.present()
                || p.restart
                    .gone_at
                    .is_none_or(|t| now.saturating_sub(t) < KEEP_GONE)
        });
    }

    /// A drain started here with `d` (the loop tells the restart model).
    pub fn drain_started(&mut self, pid: u32, what: &str, now: Duration) {
        let label = self.label(pid);
        self.push_log(
            now,
            LogKind::Drain,
            format!("drain of {label} started: {what}"),
        );
    }

    pub fn drain_progress(&mut self, pid: u32, progress: Progress) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.progress = Some(progress);
        }
    }

    /// A drain started here ended (the loop tells the restart model).
    pub fn drain_finished(&mut self, pid: u32, report: &DrainReport, now: Duration) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.progress = None;
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
            .filter(|p| p.present())
            .map(|p| p.live())
            .sum()
    }

    /// Listen addresses a process held, for the fd look of the detail view.
    pub fn listen_addrs_of(&self, pid: u32) -> Vec<ListenAddr> {
        self.procs
            .get(&pid)
            .map(|p| p.restart.keys.iter().copied().collect())
            .unwrap_or_default()
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
