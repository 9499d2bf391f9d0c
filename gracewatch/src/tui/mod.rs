//! `gracewatch tui`: the live view an operator keeps open during a restart.
//! This module owns the terminal and the one `tokio::select!` loop that
//! feeds the state ([`app::App`], [`model::Model`]) from the monitor's
//! statuses, restart model and events, from keys ([`keys::handle_key`], pure) and from
//! background work (drains, signals, connection lists), and redraws it
//! ([`render::render`], pure).
//!
//! Redraws happen at once after a key or a resize, and otherwise at most
//! [`FRAME`] apart when something changed, plus once a second while idle
//! for the ages and rates that move with time: the loop sleeps in between.
//! The terminal is restored on every exit path: quit, error (a guard),
//! panic (`ratatui::try_init` installs a hook) and SIGTERM/SIGHUP (handled
//! like quit).

pub mod app;
pub mod keys;
pub mod model;
pub mod render;
#[cfg(test)]
mod tests;

use std::{collections::HashMap, time::Duration};

use anyhow::Context as _;
use crossterm::event::{Event, EventStream, KeyEventKind};
use futures_util::StreamExt as _;
use ratatui::{Terminal, backend::Backend};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{broadcast::error::RecvError, mpsc, oneshot},
    time::{Instant, MissedTickBehavior},
};

use self::{
    app::{App, ConnRow, Effect},
    model::{LogKind, Model, StartFilter},
};
use crate::{
    drain::{self, DrainReport, Outcome, Progress, TargetSpec, Targets},
    event::{ConnEvent, Tuple},
    monitor::{Monitor, MonitorHandle, SourceOptions, monotonic_now},
    peers::PeerGroupView,
    tracker::restart::DrainNote,
};

/// Shortest time between two redraws caused by data (4 Hz).
pub const FRAME: Duration = Duration::from_millis(250);
/// Redraw this often even when nothing changed (ages, rates, the chart).
const IDLE_REDRAW: Duration = Duration::from_secs(1);
/// How often the open connection detail is reloaded.
const DETAIL_REFRESH: Duration = Duration::from_secs(1);
/// The same with the view grouped by peer: each refresh looks for the peer
/// processes (a dump and a /proc walk, bounded to 1 s), so less often.
const PEERS_REFRESH: Duration = Duration::from_secs(5);
/// Events handled per wake-up before the loop looks at keys again.
const EVENT_BATCH: usize = 4096;

/// `gracewatch tui` arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TuiArgs {
    /// Only this process (repeatable).
    #[arg(long = "pid", value_name = "PID", value_parser = crate::input::parse_pid, allow_hyphen_values = true)]
    pub pids: Vec<u32>,
    /// Only processes holding a listener on this port (repeatable). A
    /// process stays shown once it matched, e.g. after it closed its
    /// listener to drain.
    #[arg(long = "port", value_name = "PORT", value_parser = crate::input::parse_port, allow_hyphen_values = true)]
    pub ports: Vec<u16>,
    /// Only processes with this command name (repeatable).
    #[arg(long = "comm", value_name = "NAME")]
    pub comms: Vec<String>,
}

impl TuiArgs {
    pub fn filter(&self) -> StartFilter {
        StartFilter {
            pids: self.pids.clone(),
            ports: self.ports.clone(),
            comms: self.comms.clone(),
        }
    }
}

/// Work finished in the background, reported to the loop.
enum Done {
    DrainProgress(u32, Progress),
    Drain(u32, DrainReport),
    Connections(u32, Result<Vec<ConnRow>, String>),
    Peers(u32, Result<Vec<PeerGroupView>, String>),
}

/// Restores the terminal when dropped: on return and on `?`.
struct RestoreTerminal;

impl Drop for RestoreTerminal {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Runs the TUI until the user quits; returns the exit code.
pub async fn run(opts: SourceOptions, args: TuiArgs) -> anyhow::Result<u8> {
    // Attach before touching the terminal, so that "cannot monitor" prints
    // as a plain error with its exit code.
    let handle = Monitor::spawn(opts)?;
    let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("failed to handle SIGHUP")?;
    let mut terminal = ratatui::try_init().context("failed to set up the terminal")?;
    let guard = RestoreTerminal;
    let result = event_loop(&mut terminal, &handle, &args, &mut sigterm, &mut sighup).await;
    drop(guard);
    result
}

async fn event_loop<B: Backend>(
    terminal: &mut Terminal<B>,
    handle: &MonitorHandle,
    args: &TuiArgs,
    sigterm: &mut tokio::signal::unix::Signal,
    sighup: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<u8> {
    let started = monotonic_now();
    let mut app = App::new(Model::new(args.filter(), started), started);
    let mut status_rx = handle.subscribe();
    let mut events = handle.events();
    let first = status_rx.borrow_and_update().clone();
    app.model.observe(&first, &handle.restarts(), started);
    app.model.tick(started);

    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut pinned: Option<(u32, Targets)> = None;
    let mut drains: HashMap<u32, oneshot::Sender<()>> = HashMap::new();
    let mut detail_due: Option<Instant> = None;
    let mut last_draw: Option<Instant> = None;
    let mut dirty = true;
    let mut draw_now = true;

    loop {
        let now = Instant::now();
        let idle_due = last_draw.is_none_or(|t| now.duration_since(t) >= IDLE_REDRAW);
        let data_due = dirty && last_draw.is_none_or(|t| now.duration_since(t) >= FRAME);
        if draw_now || data_due || (idle_due && !app.paused()) {
            app.now = monotonic_now();
            terminal
                .draw(|frame| render::render(frame, &app))
                .context("failed to draw")?;
            last_draw = Some(Instant::now());
            dirty = false;
            draw_now = false;
        }

        tokio::select! {
            biased;
            _ = sigterm.recv() => return Ok(crate::exit::INTERRUPTED),
            _ = sighup.recv() => return Ok(crate::exit::INTERRUPTED),
            key = keys.next() => match key {
                Some(Ok(Event::Key(key))) if key.kind != KeyEventKind::Release => {
                    let effects = keys::handle_key(&mut app, key);
                    for effect in effects {
                        let quit = apply(
                            effect,
                            &mut app,
                            handle,
                            &done_tx,
                            &mut pinned,
                            &mut drains,
                        );
                        if quit {
                            return Ok(crate::exit::OK);
                        }
                    }
                    if app.detail_pid().is_some() && detail_due.is_none() {
                        detail_due = Some(Instant::now() + DETAIL_REFRESH);
                    }
                    draw_now = true;
                }
                Some(Ok(Event::Resize(..))) => {
                    terminal.autoresize().context("failed to resize")?;
                    draw_now = true;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("failed to read the terminal"),
                None => return Ok(crate::exit::OK),
            },
            ev = events.recv() => {
                let now = monotonic_now();
                match ev {
                    Ok(ev) => {
                        on_event(&mut app, &ev);
                        for _ in 0..EVENT_BATCH {
                            match events.try_recv() {
                                Ok(ev) => on_event(&mut app, &ev),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(RecvError::Lagged(n)) => app.model.note(
                        now,
                        LogKind::Warning,
                        format!("the display fell behind and skipped {n} event(s); counts are unaffected"),
                    ),
                    Err(RecvError::Closed) => {
                        anyhow::bail!("{}", handle.stopped());
                    }
                }
                dirty = true;
            }
            changed = status_rx.changed() => {
                if changed.is_err() {
                    anyhow::bail!("{}", handle.stopped());
                }
                let status = status_rx.borrow_and_update().clone();
                // Published just before the status (see `MonitorHandle::restarts`).
                let restarts = handle.restarts();
                app.model.observe(&status, &restarts, monotonic_now());
                dirty = true;
            }
            Some(done) = done_rx.recv() => {
                let now = monotonic_now();
                match done {
                    Done::DrainProgress(pid, p) => app.model.drain_progress(pid, p),
                    Done::Drain(pid, report) => {
                        drains.remove(&pid);
                        app.drain_ended(pid);
                        handle.note_drain(pid, drain_note(&report));
                        app.model.drain_finished(pid, &report, now);
                    }
                    Done::Connections(pid, rows) => app.detail_loaded(pid, rows),
                    Done::Peers(pid, groups) => app.peers_loaded(pid, groups),
                }
                dirty = true;
            }
            _ = tick.tick() => {
                app.model.tick(monotonic_now());
                if let Some(pid) = app.detail_pid() {
                    if detail_due.is_some_and(|t| Instant::now() >= t) {
                        fetch_connections(pid, &app, handle, &done_tx);
                        let every = if app.detail_by_peer() { PEERS_REFRESH } else { DETAIL_REFRESH };
                        detail_due = Some(Instant::now() + every);
                    }
                } else {
                    detail_due = None;
                }
            }
        }
    }
}

fn on_event(app: &mut App, ev: &ConnEvent) {
    app.model.on_event(ev);
}

/// How a drain's end changes its target's role (see [`DrainNote`]).
fn drain_note(report: &DrainReport) -> DrainNote {
    match report.outcome {
        Outcome::Drained => DrainNote::Drained,
        Outcome::Interrupted => DrainNote::Cancelled,
        _ => DrainNote::Ended,
    }
}

/// Carries out one effect; returns whether to quit.
fn apply(
    effect: Effect,
    app: &mut App,
    handle: &MonitorHandle,
    done_tx: &mpsc::UnboundedSender<Done>,
    pinned: &mut Option<(u32, Targets)>,
    drains: &mut HashMap<u32, oneshot::Sender<()>>,
) -> bool {
    let now = monotonic_now();
    match effect {
        Effect::Quit => return true,
        Effect::Pin(pid) => {
            let chosen = drain::choose(&TargetSpec {
                pids: vec![pid],
                ..TargetSpec::default()
            });
            match chosen {
                Ok(targets) => {
                    *pinned = Some((pid, targets));
                    app.pinned(pid, Ok(()));
                }
                Err(e) => {
                    *pinned = None;
                    app.pinned(pid, Err(e.to_string()));
                }
            }
        }
        Effect::Unpin => *pinned = None,
        Effect::FetchConnections(pid) => fetch_connections(pid, app, handle, done_tx),
        Effect::Signal { pid, signal } => {
            let result = match pinned.take() {
                Some((p, targets)) if p == pid => targets
                    .procs
                    .iter()
                    .try_for_each(|proc| {
                        proc.signal(signal.number()).into_result(
                            proc.pid,
                            &proc.comm,
                            signal.number(),
                        )
                    })
                    .map_err(|e| format!("{e:#}")),
                _ => Err("the process was not pinned".to_owned()),
            };
            app.model.signal_result(pid, &signal.name(), result, now);
        }
        Effect::StartDrain { pid, spec } => {
            let Some((_, targets)) = pinned.take().filter(|(p, _)| *p == pid) else {
                app.drain_ended(pid);
                app.model.note(
                    now,
                    LogKind::Warning,
                    format!("could not drain pid {pid}: the process was not pinned"),
                );
                return false;
            };
            let what = app::summarize_drain(&spec);
            app.model.drain_started(pid, &what, now);
            handle.note_drain(pid, DrainNote::Started);
            let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
            drains.insert(pid, cancel_tx);
            let handle = handle.clone();
            let tx = done_tx.clone();
            tokio::spawn(async move {
                let progress_tx = tx.clone();
                let report = drain::run(
                    &handle,
                    targets,
                    &spec,
                    |p| {
                        let _ = progress_tx.send(Done::DrainProgress(pid, p.clone()));
                    },
                    async move {
                        // Resolves on cancel and when the TUI goes away.
                        let _ = cancel_rx.await;
                    },
                )
                .await;
                let _ = tx.send(Done::Drain(pid, report));
            });
        }
        Effect::CancelDrain(pid) => {
            // Dropping the sender resolves the drain's cancel future.
            drains.remove(&pid);
        }
    }
    false
}

/// Loads `pid`'s live connections (oldest first) and their TCP states in
/// the background.
fn fetch_connections(
    pid: u32,
    app: &App,
    handle: &MonitorHandle,
    done_tx: &mpsc::UnboundedSender<Done>,
) {
    let handle = handle.clone();
    let tx = done_tx.clone();
    if app.detail_by_peer() {
        tokio::spawn(async move {
            let result = handle
                .peers(&[pid], &[], &[], crate::peer_report::MAX_PEER_GROUPS, true)
                .await
                .map(|r| {
                    let now = monotonic_now();
                    r.grouping.groups.iter().map(|g| g.view(now)).collect()
                })
                .map_err(|e| format!("{e:#}"));
            let _ = tx.send(Done::Peers(pid, result));
        });
        return;
    }
    let known = app.model.listen_addrs_of(pid);
    tokio::spawn(async move {
        let result = async {
            // With what each is doing (one sock_diag dump with tcp_info,
            // only while this view is open, at most every DETAIL_REFRESH).
            let conns = handle.activity(&[pid]).await?.connections;
            // The state needs a fresh look at the process's own fds; if
            // that fails (it exited), the list is still worth showing.
            let states: HashMap<Tuple, u8> =
                handle.conn_states(pid, known).await.unwrap_or_default();
            let rows = conns
                .into_iter()
                .map(|(c, activity)| ConnRow {
                    local: c.tuple.local,
                    peer: c.tuple.remote,
                    state: states.get(&c.tuple).copied(),
                    since: c.since,
                    preexisting: c.preexisting,
                    activity,
                })
                .collect::<Vec<_>>();
            anyhow::Ok(rows)
        }
        .await
        .map_err(|e| format!("{e:#}"));
        let _ = tx.send(Done::Connections(pid, result));
    });
}
