//! The TUI's whole state: the [`Model`] (what the host shows) plus what the
//! user is doing with it (selection, filter, pause, open view or dialog).
//! Rendering reads only this; key handling ([`super::keys`]) only changes it
//! and asks the loop for [`Effect`]s, so both are testable without a
//! terminal or a kernel.

use std::{net::SocketAddr, time::Duration};

use super::model::{Model, Proc, Role};
use crate::{
    drain::{DrainSpec, SignalSpec},
    event::ConnActivity,
    peers::PeerGroupView,
};

/// Something only the loop can do (it touches processes or the monitor).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    Quit,
    /// Pin `pid` with a pidfd now, so the action confirmed later reaches
    /// this process and never a recycled pid.
    Pin(u32),
    /// Forget the pinned process (dialog cancelled).
    Unpin,
    /// Load the connection list of the detail view.
    FetchConnections(u32),
    StartDrain {
        pid: u32,
        spec: DrainSpec,
    },
    CancelDrain(u32),
    Signal {
        pid: u32,
        signal: SignalSpec,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Typing the `/` filter.
    Filter,
    Help,
    Detail,
    Dialog(Dialog),
    /// `q` while drains run: quitting cancels them.
    ConfirmQuit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialogKind {
    Drain,
    Signal,
    CancelDrain,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Signal,
    Timeout,
    UntilIdle,
    ExcludePeers,
}

impl Field {
    /// The drain dialog's fields in Tab order.
    pub const DRAIN: [Field; 4] = [
        Field::Signal,
        Field::Timeout,
        Field::UntilIdle,
        Field::ExcludePeers,
    ];
}

/// Whether the dialog's target is pinned by a pidfd yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pin {
    Pending,
    Ready,
    Failed(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dialog {
    pub kind: DialogKind,
    pub pid: u32,
    pub comm: String,
    pub live: u64,
    pub signal: String,
    /// Empty: no deadline.
    pub timeout: String,
    /// `--until-idle`; empty: off.
    pub until_idle: String,
    /// `--exclude-peer` rules, separated by spaces or commas; empty: none.
    pub exclude_peers: String,
    pub focus: Field,
    /// The question "really?" is showing.
    pub confirming: bool,
    pub error: Option<String>,
    pub pin: Pin,
}

impl Dialog {
    pub fn new(kind: DialogKind, p: &Proc) -> Self {
        Self {
            kind,
            pid: p.pid,
            comm: p.comm.clone(),
            live: p.live(),
            signal: "TERM".to_owned(),
            timeout: String::new(),
            until_idle: String::new(),
            exclude_peers: String::new(),
            focus: Field::Signal,
            confirming: kind == DialogKind::CancelDrain,
            error: None,
            pin: if kind == DialogKind::CancelDrain {
                Pin::Ready
            } else {
                Pin::Pending
            },
        }
    }

    /// The drain this dialog describes, or why its fields are wrong.
    pub fn drain_spec(&self) -> Result<DrainSpec, String> {
        let signal = SignalSpec::parse_optional(&self.signal)?;
        let timeout = match self.timeout.trim() {
            "" => None,
            t if t.eq_ignore_ascii_case("none") => None,
            t => Some(crate::input::parse_timeout(t)?),
        };
        let until_idle = match self.until_idle.trim() {
            "" => None,
            t => Some(crate::input::parse_duration(t).map_err(|e| format!("until idle: {e}"))?),
        };
        let exclude_peers = self
            .exclude_peers
            .split([' ', ','])
            .filter(|r| !r.is_empty())
            .map(|r| crate::input::parse_peer_rule(r).map_err(|e| format!("exclude peers: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        crate::input::check_peer_rules(&exclude_peers)
            .map_err(|e| format!("exclude peers: {e}"))?;
        Ok(DrainSpec {
            signal,
            timeout,
            until_idle,
            exclude_peers,
            ..DrainSpec::default()
        })
    }

    pub fn signal_spec(&self) -> Result<SignalSpec, String> {
        self.signal.parse()
    }

    /// One sentence: what confirming will do.
    pub fn question(&self) -> String {
        let who = format!("pid {} ({})", self.pid, self.comm);
        match self.kind {
            DialogKind::Drain => match self.drain_spec() {
                Ok(spec) => describe_drain(&who, &spec),
                Err(e) => e,
            },
            DialogKind::Signal => match self.signal_spec() {
                Ok(s) => format!(
                    "Send {s} to {who} now? It holds {} live connection(s).",
                    self.live
                ),
                Err(e) => e,
            },
            DialogKind::CancelDrain => {
                format!("Cancel the drain of {who}? Nothing will be signalled.")
            }
        }
    }
}

/// `Drain pid 42 (app): wait until it holds no live connection, then send SIGTERM; no deadline.`
pub fn describe_drain(who: &str, spec: &DrainSpec) -> String {
    let then = match spec.signal {
        Some(s) => format!("then send {s}"),
        None => "then only report".to_owned(),
    };
    format!(
        "Drain {who}: wait until it holds no live connection{}, {then}; {}.",
        policies(spec),
        deadline(spec)
    )
}

/// `, or until every one is idle for 2s, not counting 2 excluded peer rules`:
/// the policies that can end a drain with connections left.
fn policies(spec: &DrainSpec) -> String {
    let mut out = String::new();
    if let Some(t) = spec.until_idle {
        out.push_str(&format!(
            " (or until every one has been idle {} with nothing in flight: the signal cuts them)",
            super::model::human(t)
        ));
    }
    match spec.exclude_peers.len() {
        0 => {}
        n => out.push_str(&format!(
            ", not counting connections from {}",
            if n == 1 {
                spec.exclude_peers[0].to_string()
            } else {
                format!("{n} excluded peer rules")
            }
        )),
    }
    out
}

/// `SIGTERM at zero, give up after 2m00s`: a drain in a log line.
pub fn summarize_drain(spec: &DrainSpec) -> String {
    let at_zero = match spec.signal {
        Some(s) => format!("{s} at zero"),
        None => "report at zero".to_owned(),
    };
    let mut also = String::new();
    if let Some(t) = spec.until_idle {
        also.push_str(&format!(" or when all idle {}", super::model::human(t)));
    }
    if !spec.exclude_peers.is_empty() {
        also.push_str(&format!(
            ", {} excluded peer rule(s)",
            spec.exclude_peers.len()
        ));
    }
    format!("{at_zero}{also}, {}", deadline(spec))
}

fn deadline(spec: &DrainSpec) -> String {
    match spec.timeout {
        Some(t) => format!("give up after {}", super::model::human(t)),
        None => "no deadline".to_owned(),
    }
}

/// One row of the connection detail view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnRow {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// TCP state number from a fresh look at the process's fds (`None`:
    /// unknown, e.g. the look failed).
    pub state: Option<u8>,
    /// Monotonic time it was accepted (or first seen, if `preexisting`).
    pub since: Duration,
    pub preexisting: bool,
    /// What it is doing, read from the kernel with the list (`None`:
    /// unknown, e.g. it closed meanwhile).
    pub activity: Option<ConnActivity>,
}

/// The order of the connection detail view (`i` toggles).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConnSort {
    /// Oldest first (as the monitor lists them).
    #[default]
    Age,
    /// Most idle first; unknown idle times last.
    Idle,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detail {
    pub pid: u32,
    pub comm: String,
    /// `None` until the first answer arrives.
    pub rows: Option<Vec<ConnRow>>,
    pub error: Option<String>,
    pub scroll: usize,
    pub sort: ConnSort,
    /// `b`: show the connections grouped by peer, with the peer processes.
    pub by_peer: bool,
    /// The groups, once loaded (`None` until the first answer).
    pub peers: Option<Vec<PeerGroupView>>,
}

impl Detail {
    /// The rows in the chosen order (stable: ties keep the oldest first).
    pub fn sorted_rows(&self) -> Vec<&ConnRow> {
        let mut rows: Vec<&ConnRow> = self.rows.iter().flatten().collect();
        if self.sort == ConnSort::Idle {
            let idle = |r: &ConnRow| r.activity.and_then(|a| a.idle_ms);
            rows.sort_by_key(|r| std::cmp::Reverse(idle(r).map_or(0, |i| i.saturating_add(1))));
        }
        rows
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct App {
    pub model: Model,
    /// While paused: the model and clock as they were at `p`.
    pub frozen: Option<(Box<Model>, Duration)>,
    /// The clock rendering uses.
    pub now: Duration,
    pub selected: Option<u32>,
    pub mode: Mode,
    pub filter: String,
    pub detail: Option<Detail>,
    /// Pids with a drain running in the background.
    pub running_drains: Vec<u32>,
    /// A one-line message in the footer (e.g. why a key did nothing).
    pub notice: Option<String>,
}

impl App {
    pub fn new(model: Model, now: Duration) -> Self {
        Self {
            model,
            frozen: None,
            now,
            selected: None,
            mode: Mode::Normal,
            filter: String::new(),
            detail: None,
            running_drains: Vec::new(),
            notice: None,
        }
    }

    /// What to show: the frozen view while paused, else the live one.
    pub fn view(&self) -> (&Model, Duration) {
        match &self.frozen {
            Some((model, at)) => (model, *at),
            None => (&self.model, self.now),
        }
    }

    pub fn paused(&self) -> bool {
        self.frozen.is_some()
    }

    pub fn toggle_pause(&mut self) {
        self.frozen = match self.frozen.take() {
            Some(_) => None,
            None => Some((Box::new(self.model.clone()), self.now)),
        };
    }

    /// The table's rows, in order: the `/` filter applied, by pid.
    pub fn rows(&self) -> Vec<&Proc> {
        let (model, _) = self.view();
        let needle = self.filter.trim().to_lowercase();
        model
            .procs
            .values()
            .filter(|p| {
                needle.is_empty()
                    || p.pid.to_string().contains(&needle)
                    || p.comm.to_lowercase().contains(&needle)
                    || p.role().name().contains(&needle)
                    || p.listeners.iter().any(|l| l.to_string().contains(&needle))
            })
            .collect()
    }

    /// The selected row's index, falling back to the first row when the
    /// selected process is not shown (filtered out, forgotten).
    pub fn selected_index(&self) -> Option<usize> {
        let rows = self.rows();
        if rows.is_empty() {
            return None;
        }
        Some(
            self.selected
                .and_then(|pid| rows.iter().position(|p| p.pid == pid))
                .unwrap_or(0),
        )
    }

    pub fn selected_proc(&self) -> Option<&Proc> {
        let rows = self.rows();
        self.selected_index().and_then(|i| rows.get(i).copied())
    }

    pub fn move_selection(&mut self, by: isize) {
        let rows = self.rows();
        if rows.is_empty() {
            return;
        }
        let at = self.selected_index().unwrap_or(0) as isize;
        let to = (at + by).clamp(0, rows.len() as isize - 1) as usize;
        self.selected = rows.get(to).map(|p| p.pid);
    }

    pub fn select_edge(&mut self, last: bool) {
        let rows = self.rows();
        let pick = if last { rows.last() } else { rows.first() };
        self.selected = pick.map(|p| p.pid);
    }

    /// The loop pinned (or failed to pin) the dialog's process.
    pub fn pinned(&mut self, pid: u32, result: Result<(), String>) {
        if let Mode::Dialog(d) = &mut self.mode {
            if d.pid == pid {
                d.pin = match result {
                    Ok(()) => Pin::Ready,
                    Err(e) => Pin::Failed(e),
                };
            }
        }
    }

    /// The pid whose connections the detail view shows, if open.
    pub fn detail_pid(&self) -> Option<u32> {
        match self.mode {
            Mode::Detail => self.detail.as_ref().map(|d| d.pid),
            _ => None,
        }
    }

    pub fn detail_loaded(&mut self, pid: u32, result: Result<Vec<ConnRow>, String>) {
        if let Some(d) = self.detail.as_mut().filter(|d| d.pid == pid) {
            match result {
                Ok(rows) => {
                    d.rows = Some(rows);
                    d.error = None;
                }
                Err(e) => d.error = Some(e),
            }
        }
    }

    pub fn peers_loaded(&mut self, pid: u32, result: Result<Vec<PeerGroupView>, String>) {
        if let Some(d) = self.detail.as_mut().filter(|d| d.pid == pid) {
            match result {
                Ok(groups) => {
                    d.peers = Some(groups);
                    d.error = None;
                }
                Err(e) => d.error = Some(e),
            }
        }
    }

    /// Whether the open detail view groups by peer.
    pub fn detail_by_peer(&self) -> bool {
        self.detail.as_ref().is_some_and(|d| d.by_peer)
    }

    pub fn drain_running(&self, pid: u32) -> bool {
        self.running_drains.contains(&pid)
    }

    pub fn drain_ended(&mut self, pid: u32) {
        self.running_drains.retain(|&p| p != pid);
    }

    /// Whether the selected row may be acted on, or why not.
    pub fn actionable(&self) -> Result<&Proc, String> {
        match self.selected_proc() {
            None => Err("no process selected".to_owned()),
            Some(p) if p.role() == Role::Exited => Err(format!("pid {} has exited", p.pid)),
            Some(p) => Ok(p),
        }
    }
}
