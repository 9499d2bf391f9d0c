//! The drain loop. It wakes on every status the monitor publishes (one per
//! batch of kernel events), so the signal follows the last close without a
//! polling delay; timers only drive the deadline, `--min-wait`,
//! `--quiet-for` and progress. With `--quiet-for` it also wakes on every
//! status (new connections are read from those), and takes a fresh one
//! before it ends the quiet period. With `--until-idle` it reads what the
//! live connections are doing when the least idle one would reach the
//! period (see [`super::idle`]), never on a fixed tick.

use std::{
    collections::{BTreeSet, VecDeque},
    future::Future,
    time::Duration,
};

use tokio::time::Instant;

use super::{
    DrainReport, DrainSpec, EndedBy, ExcludedConnection, HeldConnection, IdleConnection, OnTimeout,
    Outcome, Progress, SignalSpec, Targets,
    idle::{self, Row},
    quiet::{Quiet, human},
};
use crate::{
    event::ListenAddr,
    monitor::{
        ExcludedFd, FdLook, FdSockets, MAX_ACTIVITY_CONNECTIONS, MonitorHandle, monotonic_now,
    },
    peers::PeerGroupView,
    source::process::{Delivery, PinnedProcess, errno_text},
    tracker::{ConnInfo, Status},
};

const PROGRESS_EVERY: Duration = Duration::from_secs(1);
const ACCEPT_WINDOW: Duration = Duration::from_secs(10);
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// How soon to look at the fds again when the kernel count is zero but the
/// targets' fd tables still show live sockets (accepted and not yet read
/// or written, or shared or passed fds).
const RECHECK: Duration = Duration::from_millis(100);
/// Connections named in a result's `held` and `excluded`.
const MAX_NAMED: usize = 10;
/// Peer groups in progress and results.
const MAX_PEER_GROUPS: usize = 10;
/// `--until-idle` reads the targets' connections at most this often (each
/// read is an fd look and a sock_diag dump per namespace).
const IDLE_MIN_GAP: Duration = Duration::from_millis(50);
/// Progress lines read what their oldest connection is doing at most this
/// often.
const HELD_READ_EVERY: Duration = Duration::from_secs(1);

/// A TCP state as the result names it.
fn state_name(state: u8) -> &'static str {
    match state {
        1 => "established",
        8 => "close_wait",
        _ => "other",
    }
}

struct Gate<'a> {
    handle: &'a MonitorHandle,
    spec: &'a DrainSpec,
    alive: Vec<PinnedProcess>,
    all: Vec<u32>,
    /// The targets the user named (not their descendants): the only ones
    /// signalled. Servers pass the signal on to their workers.
    named: BTreeSet<u32>,
    start: Instant,
    initial: u64,
    peak: u64,
    /// The count at the last look (what a result says is still held when
    /// the monitor cannot list the connections any more).
    last_live: u64,
    /// Why the last look at the targets' fds could not decide, if it could
    /// not: the gate waits, and names it if the deadline passes.
    doubt: Option<String>,
    /// Addresses the targets listen(ed) on, so connections stay "inbound"
    /// for the fd check even after the listener is closed.
    listen_addrs: BTreeSet<ListenAddr>,
    /// (time, accepted, closed) totals over the targets.
    samples: VecDeque<(Instant, u64, u64)>,
    /// `--quiet-for`, if asked for.
    quiet: Option<Quiet>,
    /// The last peer groups progress showed, and when they were read.
    peers_seen: Option<(Instant, Vec<PeerGroupView>)>,
    /// `--until-idle`, if asked for.
    idle: Option<IdleWatch>,
    /// When a progress line last read its oldest connection's activity.
    held_read_at: Option<Instant>,
}

/// Where `--until-idle` stands.
struct IdleWatch {
    until: Duration,
    /// When to read the connections next.
    next_read: Instant,
    /// What the last read said, for progress lines.
    phrase: Option<String>,
}

/// How an `--until-idle` read ended the drain: the idle connections it cut
/// and the excluded peers' sockets the same fd look found.
struct IdleEnd {
    /// The period they were all idle for.
    until: Duration,
    idle: Vec<IdleConnection>,
    count: usize,
    excluded: Vec<ExcludedFd>,
}

/// What one `--until-idle` read found.
enum IdleRead {
    Idle(IdleEnd),
    /// Not idle: read again this long after the read; why, for progress.
    Wait(Duration, String),
}

/// Runs a drain to its end. `on_progress` is called about once a second
/// and whenever the count changes; `cancel` resolving means interrupted.
pub async fn run(
    handle: &MonitorHandle,
    targets: Targets,
    spec: &DrainSpec,
    mut on_progress: impl FnMut(&Progress),
    cancel: impl Future<Output = ()>,
) -> DrainReport {
    let all = targets.pids();
    let named = targets.named_pids().into_iter().collect();
    let start = Instant::now();
    let quiet = (!spec.quiet_for.is_zero()).then(|| Quiet::new(spec.quiet_for, start));
    let mut gate = Gate {
        handle,
        spec,
        alive: targets.procs,
        all,
        named,
        start,
        initial: 0,
        peak: 0,
        last_live: 0,
        doubt: None,
        listen_addrs: BTreeSet::new(),
        samples: VecDeque::new(),
        quiet,
        peers_seen: None,
        idle: spec.until_idle.map(|until| IdleWatch {
            until,
            next_read: start,
            phrase: None,
        }),
        held_read_at: None,
    };
    match gate.drive(&mut on_progress, cancel).await {
        Ok(report) => report,
        Err(e) => {
            gate.report(Outcome::Error, None, format!("monitoring failed: {e:#}"))
                .await
        }
    }
}

impl Gate<'_> {
    async fn drive(
        &mut self,
        on_progress: &mut impl FnMut(&Progress),
        cancel: impl Future<Output = ()>,
    ) -> anyhow::Result<DrainReport> {
        tokio::pin!(cancel);
        // The kernel wakes the monitor at once for the targets' last close,
        // and the monitor bumps `changes` after every batch it applies.
        let _watch = self.handle.watch(&self.alive_pids());
        let mut changes = self.handle.changes();
        let mut status_rx = self.handle.subscribe();
        let deadline = self.spec.timeout.map(|t| self.start + t);
        let min_wait_at = self.start + self.spec.min_wait;
        let mut next_progress = self.start;
        let mut recheck_at: Option<Instant> = None;
        let mut last_live = None;
        let mut waiting_for_exit = false;

        // Asked first so that the monitor keeps the targets' exit accounts
        // from before the first count on.
        self.exiting().await?;
        self.initial = self.live().await?;
        loop {
            changes.borrow_and_update();
            let status = status_rx.borrow_and_update().clone();
            self.observe(&status);
            let live = self.live().await?;
            // After `live`: the monitor answers in order, so every close
            // that `live` reflects is in the exit accounts asked for here
            // (asking first would miss closes of a batch applied in between,
            // and take an exiting target for drained).
            let exiting = self.exiting().await?;
            self.peak = self.peak.max(live);
            self.last_live = live;
            let now = Instant::now();

            if live == 0
                && now >= min_wait_at
                && !waiting_for_exit
                && recheck_at.is_none_or(|t| now >= t)
                && self.quiet_passed(now).await?
            {
                if exiting {
                    // Its connections ended because it is exiting: that is
                    // not a drain; its pidfd will say so in a moment.
                    waiting_for_exit = true;
                } else {
                    match self.fd_check().await {
                        FdCheck::Clear(excluded) => {
                            return Ok(self.finish_drained(excluded).await);
                        }
                        FdCheck::Held(held) => {
                            recheck_at = Some(now + RECHECK);
                            self.doubt = None;
                            if last_live != Some(u64::MAX) {
                                on_progress(&self.progress(0, format!(
                                    "kernel count is 0 but the targets' fds still hold {held} live inbound socket(s) (accepted and not yet read or written, or shared or passed fds): waiting"
                                )).await);
                                last_live = Some(u64::MAX);
                            }
                        }
                        // Its pidfd ends the drain (exit 3 or 0) at once.
                        FdCheck::TargetExited => recheck_at = Some(now + RECHECK),
                        FdCheck::Unknown(why) => {
                            recheck_at = Some(now + RECHECK);
                            if self.doubt.as_ref() != Some(&why) {
                                on_progress(&self.progress(0, format!(
                                    "kernel count is 0 but {why}: cannot confirm the drain, looking again"
                                )).await);
                                last_live = Some(u64::MAX);
                            }
                            self.doubt = Some(why);
                        }
                    }
                }
            } else if live > 0 {
                recheck_at = None;
                self.doubt = None;
                if now >= min_wait_at
                    && !waiting_for_exit
                    && !exiting
                    && self.idle.as_ref().is_some_and(|w| now >= w.next_read)
                    && self.quiet_passed(now).await?
                {
                    if let Some(end) = self.idle_check().await? {
                        return Ok(self.finish_idle(end).await);
                    }
                }
            }

            if last_live != Some(live) || now >= next_progress {
                if last_live != Some(u64::MAX) || live > 0 {
                    self.refresh_peers().await;
                    let oldest = self.oldest().await;
                    let excluded = if self.spec.exclude_peers.is_empty() {
                        0
                    } else {
                        self.split(true, 0).await?.0
                    };
                    let msg = self.describe(live, excluded, &status, oldest.as_ref());
                    on_progress(&self.progress_with(live, oldest, msg));
                }
                last_live = Some(live);
                next_progress = now + PROGRESS_EVERY;
            }

            let wake = [
                Some(next_progress),
                deadline,
                (now < min_wait_at).then_some(min_wait_at),
                recheck_at,
                self.quiet.as_ref().map(Quiet::until).filter(|&t| t > now),
                // Past due only while another rule holds the read back
                // (--min-wait, --quiet-for, an exit): those wake it.
                self.idle
                    .as_ref()
                    .map(|w| w.next_read)
                    .filter(|&t| live > 0 && t > now),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + PROGRESS_EVERY);
            tokio::select! {
                biased;
                () = &mut cancel => {
                    return Ok(self.report(Outcome::Interrupted, None, "interrupted: nothing was signalled".to_owned()).await);
                }
                i = first_exit(&self.alive) => {
                    if let Some(report) = self.on_exit(i).await? {
                        return Ok(report);
                    }
                    waiting_for_exit = false;
                }
                () = sleep_until_opt(deadline) => {
                    return Ok(self.on_deadline().await);
                }
                r = changes.changed() => {
                    if r.is_err() {
                        anyhow::bail!("{}", self.handle.stopped());
                    }
                }
                // A status published after its batch (the monitor paces
                // them) may be the first to show an accept.
                r = status_rx.changed(), if self.quiet.is_some() => {
                    if r.is_err() {
                        anyhow::bail!("{}", self.handle.stopped());
                    }
                }
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// One `--until-idle` read; schedules the next one if it does not end
    /// the drain. Only a monitor that stopped is an error: a read that
    /// fails is doubt, and doubt waits.
    async fn idle_check(&mut self) -> anyhow::Result<Option<IdleEnd>> {
        let Some(until) = self.idle.as_ref().map(|w| w.until) else {
            return Ok(None);
        };
        let read_at = Instant::now();
        let (wait, phrase) = match self.read_idle(until).await {
            Ok(IdleRead::Idle(end)) => return Ok(Some(end)),
            Ok(IdleRead::Wait(wait, phrase)) => (wait, phrase),
            Err(e) => {
                // The monitor itself stopped: that ends the drain.
                if self.handle.failure().is_some() {
                    return Err(e);
                }
                (
                    idle::RETRY,
                    format!("cannot tell whether the connections are idle: {e:#}"),
                )
            }
        };
        log::debug!(
            "until idle: read in {:?}: {phrase}; next in {wait:?}",
            read_at.elapsed()
        );
        if let Some(w) = &mut self.idle {
            w.next_read = read_at + wait.max(IDLE_MIN_GAP);
            w.phrase = Some(phrase);
        }
        Ok(None)
    }

    /// Reads every socket the targets hold by their fd tables, what the
    /// kernel says each is doing, then (after the monitor applied what the
    /// kernel delivered meanwhile) the tracker's list, and decides.
    async fn read_idle(&self, until: Duration) -> anyhow::Result<IdleRead> {
        let targets = self.running_targets();
        let looked = self
            .handle
            .held_sockets(
                targets,
                self.listen_addrs.iter().copied().collect(),
                self.spec.ports.clone(),
                self.spec.exclude_peers.clone(),
            )
            .await;
        let (held, excluded) = match looked {
            FdSockets::Found { held, excluded } => (held, excluded),
            FdSockets::Doubt { reason, .. } => {
                return Ok(IdleRead::Wait(
                    idle::RETRY,
                    format!("cannot tell whether the connections are idle: {reason}"),
                ));
            }
        };
        let too_many = |n: usize| {
            IdleRead::Wait(
                PROGRESS_EVERY,
                format!(
                    "{n} live connections, more than the {MAX_ACTIVITY_CONNECTIONS} an idle read takes: not idle"
                ),
            )
        };
        if held.len() > MAX_ACTIVITY_CONNECTIONS {
            return Ok(too_many(held.len()));
        }
        let read = self
            .handle
            .activity_of(held.iter().map(|f| (f.tuple, f.pid)).collect())
            .await?;
        self.handle.sync().await?;
        let (total, listed) = self.tracked(MAX_ACTIVITY_CONNECTIONS + 1).await?;
        if total as usize > MAX_ACTIVITY_CONNECTIONS {
            return Ok(too_many(total as usize));
        }
        let found = |t: &crate::event::Tuple| {
            read.binary_search_by_key(t, |r| r.0)
                .ok()
                .map(|i| read[i].1)
        };
        let mut rows: Vec<Row> = held
            .iter()
            .map(|f| {
                if !listed.iter().any(|c| c.tuple == f.tuple) {
                    Row::Unmatched
                } else {
                    found(&f.tuple).map_or(Row::NotFound, Row::Read)
                }
            })
            .collect();
        // Tracked but not in the fds: an accept after the look, say.
        rows.extend(
            listed
                .iter()
                .filter(|c| !held.iter().any(|f| f.tuple == c.tuple))
                .map(|_| Row::Unmatched),
        );
        let decision = idle::decide(&rows, until);
        if !decision.idle() {
            let wait = decision.next_read.unwrap_or(idle::RETRY);
            return Ok(IdleRead::Wait(wait, decision.describe(until)));
        }
        let now = monotonic_now();
        let mut cut: Vec<IdleConnection> = held
            .iter()
            .filter_map(|f| {
                Some(IdleConnection {
                    pid: f.pid,
                    local: f.tuple.local.to_string(),
                    peer: f.tuple.remote.to_string(),
                    idle_ms: found(&f.tuple)?.idle_ms?,
                    age_ms: listed
                        .iter()
                        .find(|c| c.tuple == f.tuple)
                        .map(|c| now.saturating_sub(c.since).as_millis() as u64),
                })
            })
            .collect();
        // A socket two targets share is one connection.
        cut.sort_by(|a, b| (&a.local, &a.peer).cmp(&(&b.local, &b.peer)));
        cut.dedup_by(|a, b| a.local == b.local && a.peer == b.peer);
        let count = cut.len();
        cut.sort_by_key(|c| (c.idle_ms, c.pid, c.local.clone(), c.peer.clone()));
        cut.truncate(MAX_NAMED);
        Ok(IdleRead::Idle(IdleEnd {
            until,
            idle: cut,
            count,
            excluded,
        }))
    }

    /// The targets that have not exited, with their names, for a look at
    /// their fd tables.
    fn running_targets(&self) -> Vec<(u32, String)> {
        self.alive
            .iter()
            .filter(|p| !p.has_exited())
            .map(|p| (p.pid, p.comm.clone()))
            .collect()
    }

    fn alive_pids(&self) -> Vec<u32> {
        self.alive.iter().map(|p| p.pid).collect()
    }

    /// Live connections that hold the drain: all of the targets' live
    /// connections, less those of `--exclude-peer` peers.
    async fn live(&self) -> anyhow::Result<u64> {
        if self.spec.exclude_peers.is_empty() {
            return self
                .handle
                .live_of(&self.alive_pids(), &self.spec.ports)
                .await;
        }
        Ok(self.split(false, 0).await?.0)
    }

    /// The targets' live connections whose peer the rules exclude
    /// (`excluded`) or not, as the tracker knows them: the count and the
    /// `k` oldest.
    async fn split(&self, excluded: bool, k: usize) -> anyhow::Result<(u64, Vec<ConnInfo>)> {
        self.handle
            .oldest_by_peer(
                &self.alive_pids(),
                &self.spec.ports,
                k,
                &self.spec.exclude_peers,
                excluded,
            )
            .await
    }

    /// Whether `--quiet-for` (if asked for) has passed without a new
    /// connection. Before it says so it makes the monitor apply everything
    /// the kernel delivered and looks at that status: a status published
    /// late, or not yet, must not end the period on an accept it misses.
    async fn quiet_passed(&mut self, now: Instant) -> anyhow::Result<bool> {
        let Some(quiet) = &self.quiet else {
            return Ok(true);
        };
        if !quiet.is_quiet(now) {
            return Ok(false);
        }
        self.handle.sync().await?;
        let status = self.handle.status();
        let seen = Instant::now();
        let Some(quiet) = &mut self.quiet else {
            return Ok(true);
        };
        quiet.observe(&status, &self.all, &self.spec.ports, seen);
        Ok(quiet.is_quiet(seen))
    }

    fn observe(&mut self, status: &Status) {
        if let Some(quiet) = &mut self.quiet {
            quiet.observe(status, &self.all, &self.spec.ports, Instant::now());
        }
        let alive = self.alive_pids();
        for l in &status.listeners {
            if l.holders.iter().any(|h| alive.contains(&h.pid)) {
                self.listen_addrs.insert(ListenAddr {
                    netns: l.netns,
                    local: l.address,
                });
            }
        }
        let (mut accepted, mut closed) = (0, 0);
        for p in status
            .processes
            .iter()
            .filter(|p| self.all.contains(&p.pid))
        {
            accepted += p.accepted_total;
            closed += p.closed_total;
        }
        let now = Instant::now();
        self.samples.push_back((now, accepted, closed));
        while self
            .samples
            .front()
            .is_some_and(|s| now.duration_since(s.0) > ACCEPT_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Whether a live target is on its way out: the monitor saw it gone,
    /// or saw connections of it end because it was exiting. Its count then
    /// fell to zero without a drain; its pidfd will be readable in a moment.
    async fn exiting(&self) -> anyhow::Result<bool> {
        let account = self
            .handle
            .exit_account(&self.alive_pids(), &self.spec.ports)
            .await?;
        Ok(account.seen_exit || account.closed_by_exit > 0)
    }

    /// Live inbound sockets the targets still hold by their own fd tables
    /// (the monitor looks off the async runtime). A table that cannot be
    /// read decides nothing.
    async fn fd_check(&self) -> FdCheck {
        let known: Vec<ListenAddr> = self.listen_addrs.iter().copied().collect();
        let targets = self.running_targets();
        let looked = self
            .handle
            .held_fds(
                targets,
                known,
                self.spec.ports.clone(),
                self.spec.exclude_peers.clone(),
            )
            .await;
        match looked {
            FdLook::Held { held: 0, excluded } => FdCheck::Clear(excluded),
            FdLook::Held { held, .. } => FdCheck::Held(held),
            // A target that exited meanwhile: its pidfd ends the drain.
            FdLook::Doubt { pid: Some(pid), .. }
                if self.alive.iter().any(|p| p.pid == pid && p.has_exited()) =>
            {
                FdCheck::TargetExited
            }
            FdLook::Doubt { reason, .. } => FdCheck::Unknown(reason),
        }
    }

    async fn on_exit(&mut self, index: usize) -> anyhow::Result<Option<DrainReport>> {
        let gone = self.alive.remove(index);
        // Its sockets were closed before its pidfd became readable: make the
        // monitor apply those events, then count what it still held.
        self.handle.sync().await?;
        let held = self
            .handle
            .exit_account(&[gone.pid], &self.spec.ports)
            .await?
            .closed_by_exit
            + self.handle.live_of(&[gone.pid], &self.spec.ports).await?;
        if held > 0 {
            let msg = format!(
                "pid {} ({}) exited before it drained: it still held {held} live connection(s)",
                gone.pid, gone.comm
            );
            let mut report = self.report(Outcome::TargetExited, None, msg).await;
            report.still_held += held;
            return Ok(Some(report));
        }
        if self.alive.is_empty() {
            let msg = format!(
                "pid {} ({}) drained and exited by itself; no signal needed",
                gone.pid, gone.comm
            );
            return Ok(Some(self.report(Outcome::Drained, None, msg).await));
        }
        Ok(None)
    }

    /// Ends a confirmed drain: `excluded` are the live sockets of excluded
    /// peers the fresh look found (the drain ended by `--exclude-peer` if
    /// there are any, by zero otherwise).
    async fn finish_drained(&mut self, excluded: Vec<ExcludedFd>) -> DrainReport {
        let ended_by = if excluded.is_empty() {
            EndedBy::Zero
        } else {
            EndedBy::ExcludedPeers
        };
        let excluded = self.name_excluded(excluded).await;
        let report = self.finish_signal().await;
        let mut report = report;
        if report.outcome == Outcome::Drained {
            report.ended_by = Some(ended_by);
        }
        if ended_by == EndedBy::ExcludedPeers {
            let n = excluded.len();
            report.message = format!(
                "{}; ended with {n} live connection(s) left, every one from a peer --exclude-peer excludes{}",
                report.message,
                if report.signal_sent.is_some() {
                    " (the signal cuts them)"
                } else {
                    ""
                }
            );
        }
        report.excluded = excluded;
        report
    }

    /// Ends a drain `--until-idle` found idle: signals as for a zero, and
    /// names the idle connections the signal cuts.
    async fn finish_idle(&mut self, end: IdleEnd) -> DrainReport {
        let excluded = self.name_excluded(end.excluded).await;
        let mut report = self.finish_signal().await;
        if report.outcome == Outcome::Drained {
            report.ended_by = Some(EndedBy::Idle);
        }
        report.message = format!(
            "{}; ended by --until-idle with {} live connection(s) left, every one idle for at least {} with nothing in flight{}",
            report.message,
            end.count,
            human(end.until),
            if report.signal_sent.is_some() {
                " (the signal cuts them)"
            } else {
                ""
            }
        );
        report.idle = end.idle;
        report.excluded = excluded;
        report
    }

    /// The excluded sockets of a fresh look as the result names them,
    /// oldest first by the tracker's ages (those it does not know last),
    /// at most 10.
    async fn name_excluded(&self, found: Vec<ExcludedFd>) -> Vec<ExcludedConnection> {
        let now = monotonic_now();
        let known = self
            .split(true, found.len().min(MAX_NAMED))
            .await
            .map(|(_, v)| v)
            .unwrap_or_default();
        let mut named: Vec<ExcludedConnection> = found
            .into_iter()
            .map(|f| ExcludedConnection {
                pid: f.pid,
                local: f.tuple.local.to_string(),
                peer: f.tuple.remote.to_string(),
                state: Some(state_name(f.state).to_owned()),
                age_ms: known
                    .iter()
                    .find(|c| c.tuple == f.tuple)
                    .map(|c| now.saturating_sub(c.since).as_millis() as u64),
            })
            .collect();
        named.sort_by_key(|c| {
            (
                std::cmp::Reverse(c.age_ms),
                c.pid,
                c.local.clone(),
                c.peer.clone(),
            )
        });
        named.truncate(MAX_NAMED);
        named
    }

    async fn finish_signal(&mut self) -> DrainReport {
        let took = self.start.elapsed().as_secs_f64();
        let who = self.who();
        let who = match &self.quiet {
            Some(q) => format!("{who} (no new connection for {})", human(q.period())),
            None => who,
        };
        let Some(signal) = self.spec.signal else {
            let msg = format!("{who} drained in {took:.1}s (peak {} live)", self.peak);
            return self.report(Outcome::Drained, None, msg).await;
        };
        let sent = self.send(signal);
        if let Some(refused) = sent.refused() {
            let msg = format!(
                "{who} drained in {took:.1}s, but {refused}{}",
                sent.also_delivered(signal)
            );
            return self
                .report(Outcome::SignalRefused, sent.any_delivered(signal), msg)
                .await;
        }
        let msg = if sent.delivered.is_empty() {
            format!(
                "{who} drained in {took:.1}s; {} exited by itself before {signal} could be sent",
                sent.exited_names()
            )
        } else {
            format!(
                "{who} drained in {took:.1}s (peak {} live); sent {signal} to {}",
                self.peak,
                sent.delivered.join(", ")
            )
        };
        self.report(Outcome::Drained, sent.any_delivered(signal), msg)
            .await
    }

    async fn on_deadline(&mut self) -> DrainReport {
        // What was held at the deadline, taken before a signal (SIGKILL)
        // can make the target close them. A count or list the monitor
        // cannot give is said, never taken for zero.
        let (live, count_failed) = match self.live().await {
            Ok(n) => (n, None),
            Err(e) => (self.last_live, Some(format!("{e:#}"))),
        };
        let left = self.left().await;
        let unlisted = match count_failed.or(left.list_failed.clone()) {
            Some(e) => format!(" (as last counted: the monitor cannot list them now: {e})"),
            None => String::new(),
        };
        let signal = match self.spec.on_timeout {
            OnTimeout::Leave => None,
            OnTimeout::Signal => self.spec.signal,
            OnTimeout::Kill => Some(SignalSpec::KILL),
        };
        let sent = signal.map(|s| (s, self.send(s)));
        let what = match &sent {
            None => "nothing was signalled".to_owned(),
            Some((s, sent)) => match sent.refused() {
                Some(why) => format!("{why}{}", sent.also_delivered(*s)),
                None if !sent.delivered.is_empty() => {
                    format!("sent {s} to {}", sent.delivered.join(", "))
                }
                None => format!("{s} not sent: the targets exited"),
            },
        };
        let now = Instant::now();
        let doubt = match (&self.doubt, &self.quiet) {
            (Some(why), _) if live == 0 => format!(" (by the kernel's count), but {why}"),
            (_, Some(quiet)) if live == 0 && !quiet.is_quiet(now) => {
                format!(", but {}", quiet.pending(now))
            }
            _ => String::new(),
        };
        let msg = format!(
            "deadline passed: {} still held {live} live connection(s){unlisted}{doubt}; {what}",
            self.who()
        );
        let refused = sent.as_ref().is_some_and(|(_, s)| s.refused().is_some());
        let delivered = sent.and_then(|(s, sent)| sent.any_delivered(s));
        let outcome = if refused {
            Outcome::SignalRefused
        } else {
            Outcome::Timeout
        };
        // All taken before the signal (SIGKILL would close them).
        self.report_with(outcome, delivered, msg, left).await
    }

    /// Sends `signal` to every named target still alive (descendants
    /// chosen with `--children` are waited for, never signalled: servers
    /// pass it on to their workers).
    fn send(&self, signal: SignalSpec) -> Sent {
        let mut sent = Sent::default();
        for p in self.alive.iter().filter(|p| self.named.contains(&p.pid)) {
            let who = format!("pid {} ({})", p.pid, p.comm);
            match p.signal(signal.number()) {
                Delivery::Delivered => sent.delivered.push(who),
                Delivery::Exited => sent.exited.push(who),
                Delivery::Refused(e) => sent.refused.push(format!(
                    "the kernel refused {signal} for {who}: {}",
                    errno_text(e)
                )),
            }
        }
        sent
    }

    fn who(&self) -> String {
        match self.all.as_slice() {
            [one] => format!("pid {one}"),
            many => format!(
                "pids {}",
                many.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// The live connections that hold the drain, as the tracker lists
    /// them: the count and the `k` oldest.
    async fn tracked(&self, k: usize) -> anyhow::Result<(u64, Vec<ConnInfo>)> {
        if self.spec.exclude_peers.is_empty() {
            self.handle
                .oldest_connections(&self.alive_pids(), &self.spec.ports, k)
                .await
        } else {
            self.split(false, k).await
        }
    }

    /// The `limit` oldest connections that hold the drain, and how many
    /// there are; with `read`, each with what the kernel says it is doing
    /// (one sock_diag read of just these).
    /// When the monitor cannot list them: the count of the last look, none
    /// named, and why.
    async fn held(&self, limit: usize, read: bool) -> (u64, Vec<HeldConnection>, Option<String>) {
        let now = monotonic_now();
        let (total, mut oldest) = match self.tracked(limit).await {
            Ok(found) => found,
            Err(e) => return (self.last_live, Vec::new(), Some(format!("{e:#}"))),
        };
        // Every tracked connection has a holder; one that somehow has none
        // is counted but not named (never as pid 0).
        oldest.retain(|c| !c.holders.is_empty());
        let mut held: Vec<HeldConnection> = oldest
            .iter()
            .filter_map(|c| {
                Some(HeldConnection {
                    pid: *c.holders.first()?,
                    local: c.tuple.local.to_string(),
                    peer: c.tuple.remote.to_string(),
                    age_ms: now.saturating_sub(c.since).as_millis() as u64,
                    idle_ms: None,
                    in_flight: None,
                })
            })
            .collect();
        if read && !oldest.is_empty() {
            let asks = oldest
                .iter()
                .filter_map(|c| Some((c.tuple, *c.holders.first()?)))
                .collect();
            // A read that fails leaves them unknown (null), nothing else.
            if let Ok(found) = self.handle.activity_of(asks).await {
                for (h, c) in held.iter_mut().zip(&oldest) {
                    if let Ok(i) = found.binary_search_by_key(&c.tuple, |f| f.0) {
                        h.idle_ms = found[i].1.idle_ms;
                        h.in_flight = Some(found[i].1.in_flight);
                    }
                }
            }
        }
        (total, held, None)
    }

    fn rates(&self) -> (f64, u64) {
        let (Some(last), Some(first)) = (self.samples.back(), self.samples.front()) else {
            return (0.0, 0);
        };
        let accepted = last.1.saturating_sub(first.1);
        let recent = self
            .samples
            .iter()
            .find(|s| last.0.duration_since(s.0) <= RATE_WINDOW)
            .unwrap_or(first);
        let span = last.0.duration_since(recent.0).as_secs_f64().max(1.0);
        let closes = last.2.saturating_sub(recent.2) as f64 / span;
        (closes, accepted)
    }

    fn describe(
        &self,
        live: u64,
        excluded: u64,
        status: &Status,
        oldest: Option<&HeldConnection>,
    ) -> String {
        let mut parts = Vec::new();
        for pid in self.alive_pids() {
            let comm = status
                .processes
                .iter()
                .find(|p| p.pid == pid)
                .map(|p| p.comm.clone())
                .or_else(|| {
                    self.alive
                        .iter()
                        .find(|p| p.pid == pid)
                        .map(|p| p.comm.clone())
                })
                .unwrap_or_default();
            parts.push(format!("pid {pid} ({comm})"));
        }
        let mut msg = format!("{}: {live} live", parts.join(", "));
        if excluded > 0 {
            msg.push_str(&format!(
                " (and {excluded} from excluded peers, which do not hold the drain)"
            ));
        }
        let (closes, accepted) = self.rates();
        if live > 0 {
            msg.push_str(&format!(", {closes:.1} closes/s"));
            if closes > 0.0 {
                msg.push_str(&format!(", ~{:.0}s to zero", live as f64 / closes));
            }
            if let Some(oldest) = oldest {
                msg.push_str(&format!(
                    ", oldest {:.1}s from {}",
                    oldest.age_ms as f64 / 1000.0,
                    oldest.peer
                ));
            }
        }
        if accepted > 0 {
            msg.push_str(&format!(
                "; still accepting: {accepted} new connection(s) in the last 10 s"
            ));
        }
        let now = Instant::now();
        if now < self.start + self.spec.min_wait && live == 0 {
            msg.push_str("; waiting for --min-wait");
        }
        if let Some(quiet) = self
            .quiet
            .as_ref()
            .filter(|q| live == 0 && !q.is_quiet(now))
        {
            msg.push_str("; ");
            msg.push_str(&quiet.describe(now));
        }
        if let Some(w) = self.idle.as_ref().filter(|_| live > 0) {
            msg.push_str("; until idle: ");
            match &w.phrase {
                Some(p) => msg.push_str(p),
                None => msg.push_str(&format!("not read yet (waiting for {})", human(w.until))),
            }
        }
        msg
    }

    /// The oldest connection the targets hold, for progress lines.
    async fn oldest(&mut self) -> Option<HeldConnection> {
        let now = Instant::now();
        let read = self
            .held_read_at
            .is_none_or(|t| now.duration_since(t) >= HELD_READ_EVERY);
        if read {
            self.held_read_at = Some(now);
        }
        self.held(1, read).await.1.into_iter().next()
    }

    async fn progress(&mut self, live: u64, message: String) -> Progress {
        self.refresh_peers().await;
        let oldest = self.oldest().await;
        self.progress_with(live, oldest, message)
    }

    fn progress_with(
        &self,
        live: u64,
        oldest: Option<HeldConnection>,
        message: String,
    ) -> Progress {
        let (closes, accepted) = self.rates();
        Progress {
            elapsed_ms: self.start.elapsed().as_millis() as u64,
            live,
            closes_per_sec: (closes * 10.0).round() / 10.0,
            eta_ms: (live > 0 && closes > 0.0).then(|| (live as f64 / closes * 1000.0) as u64),
            oldest,
            accepted_last_10s: accepted,
            peers: self
                .peers_seen
                .as_ref()
                .map(|(_, p)| p.clone())
                .unwrap_or_default(),
            message,
        }
    }

    /// The live connections that hold the drain, grouped by peer; with
    /// `name`, the processes holding the other ends too (a sock_diag dump
    /// and a bounded /proc walk: for results, never for progress).
    async fn peer_groups(&self, name: bool) -> Vec<PeerGroupView> {
        let read = self
            .handle
            .peers(
                &self.alive_pids(),
                &self.spec.ports,
                &self.spec.exclude_peers,
                MAX_PEER_GROUPS,
                name,
            )
            .await;
        let now = monotonic_now();
        match read {
            Ok(r) => r.grouping.groups.iter().map(|g| g.view(now)).collect(),
            // A result without peers is still a result; the count says more.
            Err(e) => {
                log::debug!("drain: cannot group the connections by peer: {e:#}");
                Vec::new()
            }
        }
    }

    /// Re-reads the progress lines' peer groups if the last read is a
    /// second old: progress may come many times a second.
    async fn refresh_peers(&mut self) {
        let now = Instant::now();
        let fresh = self
            .peers_seen
            .as_ref()
            .is_some_and(|(at, _)| now.duration_since(*at) < PROGRESS_EVERY);
        if !fresh {
            self.peers_seen = Some((now, self.peer_groups(false).await));
        }
    }

    /// How many more live inbound sockets a fresh look finds in the
    /// running targets' fds than the `counted` ones: connections accepted
    /// and not yet read or written, which the monitor learns of at their
    /// first I/O or the next rescan. 0 when the look decides nothing.
    async fn unseen(&self, counted: u64) -> u64 {
        if self.running_targets().is_empty() {
            return 0;
        }
        match self.fd_check().await {
            FdCheck::Held(n) => (n as u64).saturating_sub(counted),
            _ => 0,
        }
    }

    /// What still holds a drain that ends without draining, looked at
    /// once: the monitor's list, what only the targets' fds show, and who
    /// the peers are.
    async fn left(&self) -> Left {
        let (counted, held, list_failed) = self.held(MAX_NAMED, true).await;
        // Connections accepted and not yet read or written are in the
        // targets' fds before any rescan tells the monitor: a result must
        // not count fewer than a fresh look finds.
        let unseen = self.unseen(counted).await;
        Left {
            still_held: counted + unseen,
            unseen,
            held,
            list_failed,
            peers: self.peer_groups(true).await,
        }
    }

    async fn report(
        &self,
        outcome: Outcome,
        signal: Option<SignalSpec>,
        message: String,
    ) -> DrainReport {
        let left = if outcome == Outcome::Drained {
            Left::default()
        } else {
            self.left().await
        };
        self.report_with(outcome, signal, message, left).await
    }

    async fn report_with(
        &self,
        outcome: Outcome,
        signal: Option<SignalSpec>,
        message: String,
        left: Left,
    ) -> DrainReport {
        let Left {
            still_held,
            unseen,
            held,
            list_failed,
            peers,
        } = left;
        // What the tracker knows of excluded peers' connections; a drain
        // ended by them replaces this with what its fresh look found.
        let excluded = if self.spec.exclude_peers.is_empty() {
            Vec::new()
        } else {
            let now = monotonic_now();
            self.split(true, MAX_NAMED)
                .await
                .map(|(_, v)| v)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|c| {
                    Some(ExcludedConnection {
                        pid: *c.holders.first()?,
                        local: c.tuple.local.to_string(),
                        peer: c.tuple.remote.to_string(),
                        state: None,
                        age_ms: Some(now.saturating_sub(c.since).as_millis() as u64),
                    })
                })
                .collect()
        };
        let mut message = match list_failed {
            Some(e) => format!(
                "{message} (still held as last counted: the monitor cannot list the connections now: {e})"
            ),
            None => message,
        };
        if unseen > 0 {
            message = format!(
                "{message} ({unseen} of them found only in the targets' fds: accepted and not yet read or written, not named below)"
            );
        }
        DrainReport {
            targets: self.all.clone(),
            outcome,
            initial_live: self.initial,
            peak_live: self.peak.max(self.initial),
            duration_ms: self.start.elapsed().as_millis() as u64,
            signal_sent: signal.map(|s| s.name()),
            still_held,
            held,
            ended_by: (outcome == Outcome::Drained).then_some(EndedBy::Zero),
            excluded,
            peers,
            idle: Vec::new(),
            message,
        }
    }
}

/// See [`Gate::left`].
#[derive(Default)]
struct Left {
    still_held: u64,
    /// Of `still_held`, those only the targets' fds showed (not in `held`).
    unseen: u64,
    held: Vec<HeldConnection>,
    list_failed: Option<String>,
    peers: Vec<PeerGroupView>,
}

/// What a look at the targets' own fd tables found.
enum FdCheck {
    /// No live inbound socket but those of excluded peers (listed): drained.
    Clear(Vec<ExcludedFd>),
    /// This many still held (accepted and untouched, or shared or passed
    /// fds: what the kernel count misses).
    Held(usize),
    /// A target exited while it was looked at.
    TargetExited,
    /// A table could not be read (why): nothing can be concluded.
    Unknown(String),
}

/// Who a signal reached, by `pid N (comm)`.
#[derive(Default)]
struct Sent {
    delivered: Vec<String>,
    exited: Vec<String>,
    /// One sentence per refusal, naming the errno and the target.
    refused: Vec<String>,
}

impl Sent {
    fn refused(&self) -> Option<String> {
        (!self.refused.is_empty()).then(|| self.refused.join("; "))
    }

    fn any_delivered(&self, signal: SignalSpec) -> Option<SignalSpec> {
        (!self.delivered.is_empty()).then_some(signal)
    }

    fn also_delivered(&self, signal: SignalSpec) -> String {
        if self.delivered.is_empty() {
            String::new()
        } else {
            format!(" ({signal} was delivered to {})", self.delivered.join(", "))
        }
    }

    fn exited_names(&self) -> String {
        if self.exited.is_empty() {
            "every named target".to_owned()
        } else {
            self.exited.join(", ")
        }
    }
}

/// Resolves with the index of the first process in `procs` that exits.
async fn first_exit(procs: &[PinnedProcess]) -> usize {
    if procs.is_empty() {
        return std::future::pending().await;
    }
    std::future::poll_fn(|cx| {
        for (i, p) in procs.iter().enumerate() {
            if p.poll_exited(cx).is_ready() {
                return std::task::Poll::Ready(i);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, os::unix::process::ExitStatusExt as _, time::Duration};

    use super::*;
    use crate::{
        drain::{TargetSpec, choose},
        event::{ConnEvent, Snapshot, Tuple},
    };

    fn tuple(local_port: u16, peer_port: u16) -> Tuple {
        let addr = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().expect("address") };
        Tuple {
            netns: 1,
            local: addr(local_port),
            remote: addr(peer_port),
        }
    }

    fn accept(pid: u32, sk: u64, peer_port: u16) -> ConnEvent {
        ConnEvent::Accept {
            at: Duration::from_millis(sk),
            sk,
            tuple: tuple(80, peer_port),
            pid,
            comm: "t".to_owned(),
            was_queued: false,
        }
    }

    fn close(pid: u32, sk: u64, peer_port: u16, by_exit: bool) -> ConnEvent {
        ConnEvent::Close {
            at: Duration::from_millis(sk),
            sk,
            tuple: tuple(80, peer_port),
            pid,
            by_exit,
        }
    }

    /// A monitor that stops while the targets hold connections: the drain
    /// ends in an error whose result says what was last counted (and that
    /// it cannot list them), never "0 still held".
    #[test]
    fn a_monitor_that_dies_mid_drain_is_no_zero_in_the_result() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        // The monitor runs on its own runtime, which the test then shuts
        // down under the drain.
        let monitor_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let (handle, feed) = monitor_rt.block_on(async {
            MonitorHandle::from_replay_with_feed(
                vec![accept(pid, 1, 40001), accept(pid, 2, 40002)],
                Snapshot::default(),
            )
        });
        let drain_rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let report = drain_rt.block_on(async {
            let targets = choose(&TargetSpec {
                pids: vec![pid],
                ..TargetSpec::default()
            })
            .expect("the child is a target");
            let spec = DrainSpec {
                signal: None,
                ..DrainSpec::default()
            };
            let (seen_tx, seen) = tokio::sync::oneshot::channel();
            let mut seen_tx = Some(seen_tx);
            let drain = run(
                &handle,
                targets,
                &spec,
                |p| {
                    if p.live == 2 {
                        if let Some(tx) = seen_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                },
                std::future::pending(),
            );
            let kill = async {
                seen.await.expect("a progress line with 2 live");
                drop(feed);
                monitor_rt.shutdown_background();
                std::future::pending::<()>().await
            };
            tokio::select! {
                r = drain => r,
                () = kill => unreachable!(),
            }
        });
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(report.outcome, Outcome::Error, "{report:?}");
        assert_eq!(report.still_held, 2, "{report:?}");
        assert!(
            report.message.contains("cannot list the connections"),
            "{}",
            report.message
        );
    }

    /// `--quiet-for`: short connections that each end before the next
    /// comes leave the count at zero most of the time, yet the gate waits
    /// while they come; once they stop it ends one quiet period after the
    /// last accept (and not before).
    #[tokio::test]
    async fn quiet_for_waits_out_short_connections() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let listen = ConnEvent::ListenStart {
            at: Duration::ZERO,
            sk: 1_000_000,
            addr: ListenAddr {
                netns: 1,
                local: tuple(80, 1).local,
            },
            pid,
            comm: "t".to_owned(),
        };
        let (handle, feed) =
            MonitorHandle::from_replay_with_feed(vec![listen], Snapshot::default());
        let targets = choose(&TargetSpec {
            pids: vec![pid],
            ..TargetSpec::default()
        })
        .expect("the child is a target");
        const QUIET: Duration = Duration::from_millis(600);
        let (progress_tx, mut progress) = tokio::sync::mpsc::unbounded_channel();
        let gate_handle = handle.clone();
        let mut drain = tokio::spawn(async move {
            let spec = DrainSpec {
                signal: None,
                quiet_for: QUIET,
                ..DrainSpec::default()
            };
            let report = run(
                &gate_handle,
                targets,
                &spec,
                |p| {
                    let _ = progress_tx.send(p.message.clone());
                },
                std::future::pending(),
            )
            .await;
            (report, Instant::now())
        });
        let first = progress.recv().await.expect("a first progress line");
        assert!(
            first.contains(
                "0 live; waiting for 600 ms without new connections (none since the drain started"
            ),
            "{first}"
        );
        // A connection every 200 ms, each over before the next: 1.6 s, well
        // past the quiet period.
        let mut last_accept = Instant::now();
        for i in 0..8u64 {
            last_accept = Instant::now();
            feed.send(accept(pid, 10 + i, 40000 + i as u16))
                .expect("feed");
            feed.send(close(pid, 10 + i, 40000 + i as u16, false))
                .expect("feed");
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(
                !drain.is_finished(),
                "the gate ended between two connections"
            );
        }
        let (report, ended) = tokio::time::timeout(Duration::from_secs(10), &mut drain)
            .await
            .expect("the gate ends once the connections stop")
            .expect("the gate task");
        assert_eq!(report.outcome, Outcome::Drained, "{report:?}");
        let after = ended.duration_since(last_accept);
        assert!(
            after >= QUIET && after < QUIET + Duration::from_millis(400),
            "ended {after:?} after the last accept (quiet period {QUIET:?})"
        );
        assert!(
            report.message.contains("no new connection for 600 ms"),
            "{report:?}"
        );
        let mut lines = Vec::new();
        while let Ok(line) = progress.try_recv() {
            lines.push(line);
        }
        assert!(
            lines.iter().any(|l| l.contains("(last new connection ")),
            "{lines:#?}"
        );
        child.kill().expect("kill the target");
        let _ = child.wait();
    }

    /// A connection of the target ends because the target is exiting, and
    /// a flood of other events (more than any subscriber's backlog) follows
    /// in the same batch. The gate must still know the target is exiting:
    /// no signal, and exit 3 with the connection it held once its pidfd
    /// says it is gone. (Counting from the event broadcast, the lagged
    /// gate skipped that close, found 0 live and no socket fd, signalled
    /// the target and reported `drained`.)
    #[tokio::test]
    async fn an_exit_close_is_not_lost_in_a_flood_of_events() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let (handle, feed) =
            MonitorHandle::from_replay_with_feed(vec![accept(pid, 1, 40000)], Snapshot::default());
        let targets = choose(&TargetSpec {
            pids: vec![pid],
            ..TargetSpec::default()
        })
        .expect("the child is a target");
        let (progress_tx, mut progress) = tokio::sync::mpsc::unbounded_channel();
        let gate_handle = handle.clone();
        let mut drain = tokio::spawn(async move {
            let spec = DrainSpec::default();
            run(
                &gate_handle,
                targets,
                &spec,
                |p| {
                    let _ = progress_tx.send(p.live);
                },
                std::future::pending(),
            )
            .await
        });
        assert_eq!(progress.recv().await, Some(1), "the gate counts 1 live");

        // No await in between: the monitor applies all of it in one batch.
        feed.send(close(pid, 1, 40000, true)).expect("feed");
        for i in 0..5000u64 {
            let port = 1000 + (i % 30000) as u16;
            feed.send(accept(1, 100 + i, port)).expect("feed");
            feed.send(close(1, 100 + i, port, false)).expect("feed");
        }
        let early = tokio::time::timeout(Duration::from_millis(500), &mut drain).await;
        assert!(
            early.is_err(),
            "the gate ended while its target was exiting: {early:?}"
        );
        assert_eq!(
            child.try_wait().expect("try_wait"),
            None,
            "the target was signalled"
        );

        child.kill().expect("kill the target");
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        let report = tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .expect("the gate sees the exit")
            .expect("the gate task");
        assert_eq!(report.outcome, Outcome::TargetExited, "{report:?}");
        assert_eq!(report.still_held, 1, "{report:?}");
        assert_eq!(report.signal_sent, None);
    }

    /// A real server-side socket held (as stdin) by a `sleep` target, its
    /// client bound to `client_ip`; the replayed monitor is told the
    /// connection came from `tracked_peer_ip` (which lets a test make the
    /// tracker and the socket disagree). Returns the child, the monitor,
    /// the real peer address, the client, and a copy of the server side
    /// (for a test to send from it as the server would).
    fn held_by_child(
        client_ip: [u8; 4],
        tracked_peer_ip: [u8; 4],
    ) -> (
        std::process::Child,
        MonitorHandle,
        SocketAddr,
        std::net::TcpStream,
        std::net::TcpStream,
    ) {
        use std::os::{fd::OwnedFd, unix::fs::MetadataExt as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let server = listener.local_addr().expect("listener address");
        let fd = rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::STREAM,
            None,
        )
        .expect("socket");
        let from = std::net::SocketAddrV4::new(client_ip.into(), 0);
        rustix::net::bind(&fd, &from).expect("bind the client's source address");
        rustix::net::connect(&fd, &server).expect("connect");
        let client = std::net::TcpStream::from(fd);
        let (accepted, peer) = listener.accept().expect("accept");
        let server_side = accepted.try_clone().expect("dup the server side");
        let child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::from(OwnedFd::from(accepted)))
            .spawn()
            .expect("spawn sleep");
        let netns = std::fs::metadata("/proc/self/ns/net")
            .expect("own netns")
            .ino() as u32;
        let pid = child.id();
        let tracked = SocketAddr::new(tracked_peer_ip.into(), peer.port());
        let events = vec![
            ConnEvent::ListenStart {
                at: Duration::ZERO,
                sk: 1_000_000,
                addr: ListenAddr {
                    netns,
                    local: server,
                },
                pid,
                comm: "sleep".to_owned(),
            },
            ConnEvent::Accept {
                at: Duration::from_millis(1),
                sk: 7,
                tuple: Tuple {
                    netns,
                    local: server,
                    remote: tracked,
                },
                pid,
                comm: "sleep".to_owned(),
                was_queued: false,
            },
        ];
        let handle = MonitorHandle::from_replay(events, Snapshot::default());
        drop(listener);
        (child, handle, peer, client, server_side)
    }

    fn exclude_9() -> DrainSpec {
        DrainSpec {
            exclude_peers: vec![crate::input::parse_peer_rule("127.0.0.9").expect("rule")],
            ..DrainSpec::default()
        }
    }

    /// `--exclude-peer 127.0.0.9` with one live connection left, from
    /// 127.0.0.9: drained at once, by `excluded_peers`, the connection
    /// named (peer, state) and the target signalled. Without the rule the
    /// same connection holds the drain.
    #[tokio::test]
    async fn only_excluded_peers_left_ends_the_drain_and_names_them() {
        let (mut child, handle, peer, _client, _server) =
            held_by_child([127, 0, 0, 9], [127, 0, 0, 9]);
        let pid = child.id();
        let pick = || {
            choose(&TargetSpec {
                pids: vec![pid],
                ..TargetSpec::default()
            })
            .expect("the child is a target")
        };
        let plain = DrainSpec {
            signal: None,
            ..DrainSpec::default()
        };
        let held = tokio::time::timeout(
            Duration::from_millis(500),
            run(&handle, pick(), &plain, |_| {}, std::future::pending()),
        )
        .await;
        assert!(held.is_err(), "ended without the rule: {held:?}");

        let started = Instant::now();
        let report = tokio::time::timeout(
            Duration::from_secs(10),
            run(
                &handle,
                pick(),
                &exclude_9(),
                |_| {},
                std::future::pending(),
            ),
        )
        .await
        .expect("the gate ends");
        let took = started.elapsed();
        assert_eq!(report.outcome, Outcome::Drained, "{report:?}");
        assert_eq!(report.ended_by, Some(EndedBy::ExcludedPeers), "{report:?}");
        assert_eq!(report.signal_sent.as_deref(), Some("SIGTERM"), "{report:?}");
        assert_eq!(report.still_held, 0);
        assert_eq!(report.excluded.len(), 1, "{report:?}");
        let x = &report.excluded[0];
        assert_eq!((x.pid, x.peer.as_str()), (pid, peer.to_string().as_str()));
        assert_eq!(x.state.as_deref(), Some("established"));
        assert!(x.age_ms.is_some(), "{x:?}");
        assert!(report.message.contains("--exclude-peer"), "{report:?}");
        assert!(took < Duration::from_secs(1), "took {took:?}");
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }

    /// Fail closed: the tracker says the peer is excluded, but the socket
    /// the target holds says otherwise. The fresh look decides: no end,
    /// no signal.
    #[tokio::test]
    async fn the_socket_not_the_tracker_says_whether_a_peer_is_excluded() {
        let (mut child, handle, _peer, _client, _server) =
            held_by_child([127, 0, 0, 1], [127, 0, 0, 9]);
        let targets = choose(&TargetSpec {
            pids: vec![child.id()],
            ..TargetSpec::default()
        })
        .expect("the child is a target");
        let spec = exclude_9();
        let mut drain = tokio::spawn(async move {
            run(&handle, targets, &spec, |_| {}, std::future::pending()).await
        });
        let early = tokio::time::timeout(Duration::from_millis(800), &mut drain).await;
        assert!(early.is_err(), "ended on the tracker's word: {early:?}");
        assert_eq!(child.try_wait().expect("try_wait"), None, "signalled");
        child.kill().expect("kill the target");
        let _ = child.wait();
        let report = tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .expect("the gate sees the exit")
            .expect("the gate task");
        assert_ne!(report.outcome, Outcome::Drained, "{report:?}");
        assert_eq!(report.signal_sent, None);
    }

    fn until_idle(period: Duration) -> DrainSpec {
        DrainSpec {
            until_idle: Some(period),
            ..DrainSpec::default()
        }
    }

    /// `--until-idle 400ms` on a target whose one connection moves data
    /// every 100 ms for a second, then goes quiet: no end while it moves,
    /// then an end by `idle` within a few tens of ms after 400 ms of
    /// quiet (the read is timed to it, not polled), the connection named
    /// with its idle time, and the target signalled.
    #[tokio::test]
    async fn until_idle_ends_once_the_last_activity_is_a_period_old() {
        use std::io::Write as _;
        const PERIOD: Duration = Duration::from_millis(400);
        let (mut child, handle, peer, _client, mut server) =
            held_by_child([127, 0, 0, 1], [127, 0, 0, 1]);
        let targets = choose(&TargetSpec {
            pids: vec![child.id()],
            ..TargetSpec::default()
        })
        .expect("the child is a target");
        let (progress_tx, mut progress) = tokio::sync::mpsc::unbounded_channel();
        let mut drain = tokio::spawn(async move {
            let spec = until_idle(PERIOD);
            let report = run(
                &handle,
                targets,
                &spec,
                |p| {
                    let _ = progress_tx.send(p.clone());
                },
                std::future::pending(),
            )
            .await;
            (report, Instant::now())
        });
        let mut last_send = Instant::now();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            server.write_all(b"0123456789").expect("send");
            last_send = Instant::now();
            assert!(!drain.is_finished(), "ended while data moved");
        }
        let (report, ended) = tokio::time::timeout(Duration::from_secs(10), &mut drain)
            .await
            .expect("the gate ends once the connection is idle")
            .expect("the gate task");
        let after = ended.duration_since(last_send);
        eprintln!("ended {after:?} after the last send (period {PERIOD:?})");
        assert_eq!(report.outcome, Outcome::Drained, "{report:?}");
        assert_eq!(report.ended_by, Some(EndedBy::Idle), "{report:?}");
        assert!(
            after >= PERIOD && after < PERIOD + Duration::from_millis(100),
            "ended {after:?} after the last send"
        );
        assert_eq!(report.idle.len(), 1, "{report:?}");
        let cut = &report.idle[0];
        assert_eq!(cut.peer, peer.to_string());
        assert!(cut.idle_ms >= 400 && cut.age_ms.is_some(), "{cut:?}");
        assert!(report.message.contains("--until-idle"), "{report:?}");
        let mut lines = Vec::new();
        while let Ok(p) = progress.try_recv() {
            lines.push(p);
        }
        assert!(
            lines
                .iter()
                .any(|p| p.message.contains("until idle: all 1 idle for")),
            "{lines:#?}"
        );
        // The first progress line read its oldest connection.
        let oldest = lines.first().and_then(|p| p.oldest.clone());
        assert!(
            oldest.as_ref().is_some_and(|o| o.in_flight == Some(false)),
            "{oldest:?}"
        );
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }

    /// Fail closed: bytes the target never reads are in flight, and a
    /// socket the tracker does not list (it knows the connection under
    /// another peer) cannot be decided; neither ends the drain, however
    /// long they stay quiet.
    #[tokio::test]
    async fn in_flight_or_untracked_connections_are_not_idle() {
        use std::io::Write as _;
        // 1: tracked, but 3 bytes sit unread.
        let (mut child, handle, _peer, mut client, _server) =
            held_by_child([127, 0, 0, 1], [127, 0, 0, 1]);
        client.write_all(b"abc").expect("send");
        // 2: quiet, but the tracker lists it from 127.0.0.9.
        let (mut child2, handle2, _peer2, _client2, _server2) =
            held_by_child([127, 0, 0, 1], [127, 0, 0, 9]);
        for (child, handle, why) in [
            (&mut child, handle, "1 in flight"),
            (&mut child2, handle2, "undecided"),
        ] {
            let targets = choose(&TargetSpec {
                pids: vec![child.id()],
                ..TargetSpec::default()
            })
            .expect("the child is a target");
            let (progress_tx, mut progress) = tokio::sync::mpsc::unbounded_channel();
            let spec = until_idle(Duration::from_millis(100));
            let ended = tokio::time::timeout(
                Duration::from_millis(1500),
                run(
                    &handle,
                    targets,
                    &spec,
                    |p| {
                        let _ = progress_tx.send(p.message.clone());
                    },
                    std::future::pending(),
                ),
            )
            .await;
            assert!(ended.is_err(), "{why}: ended: {ended:?}");
            assert_eq!(
                child.try_wait().expect("try_wait"),
                None,
                "{why}: signalled"
            );
            let mut lines = Vec::new();
            while let Ok(l) = progress.try_recv() {
                lines.push(l);
            }
            assert!(lines.iter().any(|l| l.contains(why)), "{why}: {lines:#?}");
            child.kill().expect("kill the target");
            let _ = child.wait();
        }
    }
}
