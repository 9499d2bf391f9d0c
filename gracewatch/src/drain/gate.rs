//! The drain loop. It wakes on every status the monitor publishes (one per
//! batch of kernel events), so the signal follows the last close without a
//! polling delay; timers only drive the deadline, `--min-wait` and progress.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    future::Future,
    net::SocketAddr,
    time::Duration,
};

use tokio::{sync::broadcast::error::TryRecvError, time::Instant};

use super::{
    DrainReport, DrainSpec, HeldConnection, OnTimeout, Outcome, Progress, SignalSpec, Targets,
};
use crate::{
    event::{ConnEvent, ListenAddr},
    monitor::MonitorHandle,
    source::{monotonic_now, process::PinnedProcess, snapshot},
    tracker::Status,
};

const PROGRESS_EVERY: Duration = Duration::from_secs(1);
const ACCEPT_WINDOW: Duration = Duration::from_secs(10);
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// How soon to look at the fds again when the kernel count is zero but the
/// targets' fd tables still show live sockets (shared or passed fds).
const RECHECK: Duration = Duration::from_millis(100);

struct Gate<'a> {
    handle: &'a MonitorHandle,
    spec: &'a DrainSpec,
    alive: Vec<PinnedProcess>,
    all: Vec<u32>,
    start: Instant,
    initial: u64,
    peak: u64,
    /// Connections that ended because their owner was exiting, per target.
    closed_by_exit: HashMap<u32, u64>,
    /// Targets the monitor reported gone (`ProcessExit`) before their pidfd
    /// said so: their connections left the count without a close.
    exiting: BTreeSet<u32>,
    /// Addresses the targets listen(ed) on, so connections stay "inbound"
    /// for the fd check even after the listener is closed.
    listen_addrs: BTreeSet<ListenAddr>,
    /// (time, accepted, closed) totals over the targets.
    samples: VecDeque<(Instant, u64, u64)>,
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
    let mut gate = Gate {
        handle,
        spec,
        alive: targets.procs,
        all,
        start: Instant::now(),
        initial: 0,
        peak: 0,
        closed_by_exit: HashMap::new(),
        exiting: BTreeSet::new(),
        listen_addrs: BTreeSet::new(),
        samples: VecDeque::new(),
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
        let mut events = self.handle.events();
        let deadline = self.spec.timeout.map(|t| self.start + t);
        let min_wait_at = self.start + self.spec.min_wait;
        let mut next_progress = self.start;
        let mut recheck_at: Option<Instant> = None;
        let mut last_live = None;
        let mut waiting_for_exit = false;

        self.initial = self.live().await?;
        loop {
            changes.borrow_and_update();
            let status = status_rx.borrow_and_update().clone();
            self.observe(&status);
            let live = self.live().await?;
            // After `live`: the monitor broadcasts a batch's events before it
            // answers the next query, so every close that `live` reflects is
            // counted here (counting first would miss closes of a batch
            // applied in between, and take an exiting target for drained).
            self.count_exit_closes(&mut events);
            self.peak = self.peak.max(live);
            let now = Instant::now();

            if live == 0
                && now >= min_wait_at
                && !waiting_for_exit
                && recheck_at.is_none_or(|t| now >= t)
            {
                let held = self.fd_check();
                if held > 0 {
                    recheck_at = Some(now + RECHECK);
                    if last_live != Some(u64::MAX) {
                        on_progress(&self.progress(0, format!(
                            "kernel count is 0 but the targets' fds still hold {held} live inbound socket(s) (shared or passed fds): waiting"
                        )).await);
                        last_live = Some(u64::MAX);
                    }
                } else if self.alive.iter().any(|p| {
                    self.exiting.contains(&p.pid)
                        || self.closed_by_exit.get(&p.pid).is_some_and(|&n| n > 0)
                }) {
                    // Its connections ended because it is exiting: that is
                    // not a drain; its pidfd will say so in a moment.
                    waiting_for_exit = true;
                } else {
                    return Ok(self.finish_drained().await);
                }
            } else if live > 0 {
                recheck_at = None;
            }

            if last_live != Some(live) || now >= next_progress {
                if last_live != Some(u64::MAX) || live > 0 {
                    let msg = self.describe(live, &status).await;
                    on_progress(&self.progress(live, msg).await);
                }
                last_live = Some(live);
                next_progress = now + PROGRESS_EVERY;
            }

            let wake = [
                Some(next_progress),
                deadline,
                (now < min_wait_at).then_some(min_wait_at),
                recheck_at,
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
                    if let Some(report) = self.on_exit(i, &mut events).await? {
                        return Ok(report);
                    }
                    waiting_for_exit = false;
                }
                () = sleep_until_opt(deadline) => {
                    return Ok(self.on_deadline().await);
                }
                r = changes.changed() => {
                    if r.is_err() {
                        anyhow::bail!("the monitor stopped: {}", self.handle.failure().unwrap_or_default());
                    }
                }
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn alive_pids(&self) -> Vec<u32> {
        self.alive.iter().map(|p| p.pid).collect()
    }

    async fn live(&self) -> anyhow::Result<u64> {
        self.handle
            .live_of(&self.alive_pids(), &self.spec.ports)
            .await
    }

    fn observe(&mut self, status: &Status) {
        let alive = self.alive_pids();
        for l in &status.listeners {
            if l.holders.iter().any(|h| alive.contains(&h.pid)) {
                if let Ok(local) = l.address.parse::<SocketAddr>() {
                    self.listen_addrs.insert(ListenAddr {
                        netns: l.netns,
                        local,
                    });
                }
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

    fn count_exit_closes(&mut self, events: &mut tokio::sync::broadcast::Receiver<ConnEvent>) {
        loop {
            match events.try_recv() {
                Ok(ConnEvent::Close {
                    pid,
                    by_exit: true,
                    tuple,
                    ..
                })
                | Ok(ConnEvent::PreexistingClose {
                    pid,
                    by_exit: true,
                    tuple,
                    ..
                }) if self.all.contains(&pid) && self.port_counts(tuple.local.port()) => {
                    *self.closed_by_exit.entry(pid).or_default() += 1;
                }
                // The monitor drops a process's connections when it sees it
                // gone from /proc — which a multi-threaded process is (its
                // leader a zombie) while its other threads still hold and
                // then close its fds: its count reaches zero with no close,
                // before its pidfd is readable.
                Ok(ConnEvent::ProcessExit { pid, .. }) if self.all.contains(&pid) => {
                    self.exiting.insert(pid);
                }
                Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Empty | TryRecvError::Closed) => return,
            }
        }
    }

    fn port_counts(&self, port: u16) -> bool {
        self.spec.ports.is_empty() || self.spec.ports.contains(&port)
    }

    /// Live inbound sockets the targets still hold by their own fd tables.
    fn fd_check(&self) -> usize {
        let known: Vec<ListenAddr> = self.listen_addrs.iter().copied().collect();
        self.alive
            .iter()
            .filter(|p| !p.has_exited())
            .map(|p| {
                snapshot::live_inbound_fds_with(p.pid, &known)
                    .map(|v| {
                        v.iter()
                            .filter(|t| self.port_counts(t.local.port()))
                            .count()
                    })
                    .unwrap_or(0)
            })
            .sum()
    }

    async fn on_exit(
        &mut self,
        index: usize,
        events: &mut tokio::sync::broadcast::Receiver<ConnEvent>,
    ) -> anyhow::Result<Option<DrainReport>> {
        let gone = self.alive.remove(index);
        // Its sockets were closed before its pidfd became readable: make the
        // monitor apply those events, then count what it still held.
        self.handle.sync().await?;
        self.count_exit_closes(events);
        let held = self.closed_by_exit.get(&gone.pid).copied().unwrap_or(0)
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

    async fn finish_drained(&mut self) -> DrainReport {
        let signal = self.spec.signal;
        let sent = signal.map(|s| self.send(s));
        let took = self.start.elapsed().as_secs_f64();
        let who = self.who();
        let msg = match (signal, sent) {
            (Some(s), Some(0)) => {
                format!("{who} drained in {took:.1}s but exited before {s} could be sent")
            }
            (Some(s), _) => format!(
                "{who} drained in {took:.1}s (peak {} live); sent {s}",
                self.peak
            ),
            (None, _) => format!("{who} drained in {took:.1}s (peak {} live)", self.peak),
        };
        let sent_name = match (signal, sent) {
            (Some(s), Some(n)) if n > 0 => Some(s),
            _ => None,
        };
        self.report(Outcome::Drained, sent_name, msg).await
    }

    async fn on_deadline(&mut self) -> DrainReport {
        let live = self.live().await.unwrap_or(0);
        // What was held at the deadline, taken before a signal (SIGKILL)
        // can make the target close them.
        let (still_held, held) = self.held(10).await;
        let (sent, what) = match self.spec.on_timeout {
            OnTimeout::Leave => (None, "nothing was signalled".to_owned()),
            OnTimeout::Signal => match self.spec.signal {
                Some(s) if self.send(s) > 0 => (Some(s), format!("sent {s} anyway")),
                _ => (None, "nothing was signalled".to_owned()),
            },
            OnTimeout::Kill => {
                if self.send(SignalSpec::KILL) > 0 {
                    (Some(SignalSpec::KILL), "sent SIGKILL".to_owned())
                } else {
                    (None, "nothing was signalled".to_owned())
                }
            }
        };
        let msg = format!(
            "deadline passed: {} still held {live} live connection(s); {what}",
            self.who()
        );
        let mut report = self.report(Outcome::Timeout, sent, msg).await;
        report.still_held = still_held;
        report.held = held;
        report
    }

    /// Signals every target still alive; returns how many received it.
    fn send(&self, signal: SignalSpec) -> usize {
        self.alive
            .iter()
            .filter(|p| match p.signal(signal.number()) {
                Ok(()) => true,
                Err(e) => {
                    log::debug!("{e:#}");
                    false
                }
            })
            .count()
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

    async fn held(&self, limit: usize) -> (u64, Vec<HeldConnection>) {
        let now = monotonic_now();
        let (total, oldest) = self
            .handle
            .oldest_connections(&self.alive_pids(), &self.spec.ports, limit)
            .await
            .unwrap_or_default();
        let held = oldest
            .iter()
            .map(|c| HeldConnection {
                pid: c.holders.first().copied().unwrap_or(0),
                local: c.tuple.local.to_string(),
                peer: c.tuple.remote.to_string(),
                age_ms: now.saturating_sub(c.since).as_millis() as u64,
            })
            .collect();
        (total, held)
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

    async fn describe(&self, live: u64, status: &Status) -> String {
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
        let (closes, accepted) = self.rates();
        if live > 0 {
            msg.push_str(&format!(", {closes:.1} closes/s"));
            if closes > 0.0 {
                msg.push_str(&format!(", ~{:.0}s to zero", live as f64 / closes));
            }
            if let (_, Some(oldest)) = {
                let (_, v) = self.held(1).await;
                ((), v.into_iter().next())
            } {
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
        if Instant::now() < self.start + self.spec.min_wait && live == 0 {
            msg.push_str("; waiting for --min-wait");
        }
        msg
    }

    async fn progress(&self, live: u64, message: String) -> Progress {
        let (closes, accepted) = self.rates();
        let (_, oldest) = self.held(1).await;
        Progress {
            elapsed_ms: self.start.elapsed().as_millis() as u64,
            live,
            closes_per_sec: (closes * 10.0).round() / 10.0,
            eta_ms: (live > 0 && closes > 0.0).then(|| (live as f64 / closes * 1000.0) as u64),
            oldest: oldest.into_iter().next(),
            accepted_last_10s: accepted,
            message,
        }
    }

    async fn report(
        &self,
        outcome: Outcome,
        signal: Option<SignalSpec>,
        message: String,
    ) -> DrainReport {
        let (still_held, held) = if outcome == Outcome::Drained {
            (0, Vec::new())
        } else {
            self.held(10).await
        };
        DrainReport {
            targets: self.all.clone(),
            outcome,
            exit_code: outcome.exit_code(),
            initial_live: self.initial,
            peak_live: self.peak.max(self.initial),
            duration_ms: self.start.elapsed().as_millis() as u64,
            signal_sent: signal.map(|s| s.name()),
            still_held,
            held,
            message,
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
