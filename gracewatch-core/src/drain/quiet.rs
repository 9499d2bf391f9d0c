//! `--quiet-for`: whether a drain's targets went long enough without a new
//! connection. A count of zero alone can be a moment between two short
//! requests while a load balancer still routes traffic to the targets; this
//! watches the facts every status carries instead: connections the targets
//! accepted, and handshakes completed on listeners only they hold (their
//! accept queues). Whatever it cannot account for counts as a new
//! connection (fail closed): a counter that moved back, a process or
//! listener first seen with connections behind it, lost kernel events.

use std::{collections::BTreeMap, time::Duration};

use tokio::time::Instant;

use crate::{event::ListenAddr, tracker::Status};

/// The quiet period of one drain.
pub(super) struct Quiet {
    period: Duration,
    /// When the last new connection was seen, or the drain started.
    last: Instant,
    /// Whether `last` is a connection (not the drain's start).
    seen: bool,
    /// Connections accepted per target, as last seen.
    accepted: BTreeMap<u32, u64>,
    /// Connections that reached the accept queue (accepted, dropped or
    /// still queued) per listener only the targets hold, as last seen.
    arrivals: BTreeMap<ListenAddr, u64>,
    /// (lost events, untracked episodes) as last seen; `None` before the
    /// first status.
    blind: Option<(u64, u64)>,
}

impl Quiet {
    /// A quiet period of `period`, counted from `start` until a new
    /// connection is seen.
    pub(super) fn new(period: Duration, start: Instant) -> Self {
        Self {
            period,
            last: start,
            seen: false,
            accepted: BTreeMap::new(),
            arrivals: BTreeMap::new(),
            blind: None,
        }
    }

    /// Folds in a status seen at `now`, for the drain of `targets`
    /// (listeners counted only on `ports`, all if empty). The first status
    /// sets the baseline. Returns whether it showed a new connection.
    pub(super) fn observe(
        &mut self,
        status: &Status,
        targets: &[u32],
        ports: &[u16],
        now: Instant,
    ) -> bool {
        let baseline = self.blind.is_none();
        // A counter seen for the first time after the baseline has a past
        // this drain did not see: any connection in it may be recent.
        let moved = |before: Option<u64>, now: u64| match before {
            Some(b) => b != now,
            None => !baseline && now > 0,
        };
        let mut new = false;
        for p in status.processes.iter().filter(|p| targets.contains(&p.pid)) {
            new |= moved(
                self.accepted.insert(p.pid, p.accepted_total),
                p.accepted_total,
            );
        }
        for l in &status.listeners {
            let theirs =
                !l.holders.is_empty() && l.holders.iter().all(|h| targets.contains(&h.pid));
            if !theirs || !(ports.is_empty() || ports.contains(&l.address.port())) {
                continue;
            }
            let key = ListenAddr {
                netns: l.netns,
                local: l.address,
            };
            let arrived = l.accepted_total + l.queue_drops_total + l.accept_queue;
            new |= moved(self.arrivals.insert(key, arrived), arrived);
            // A connection waits to be accepted: traffic has not stopped.
            new |= l.accept_queue > 0;
        }
        // Lost events or untracked connections: an accept may be missing.
        let blind = (status.lost_events, status.map_full_total);
        new |= self.blind.is_some_and(|b| b != blind);
        self.blind = Some(blind);
        if new {
            self.last = now;
            self.seen = true;
        }
        new
    }

    /// When the period ends if no new connection comes.
    pub(super) fn until(&self) -> Instant {
        self.last + self.period
    }

    /// Whether the period has passed at `now`.
    pub(super) fn is_quiet(&self, now: Instant) -> bool {
        now >= self.until()
    }

    /// The wait, for progress lines.
    pub(super) fn describe(&self, now: Instant) -> String {
        let ago = human(now.saturating_duration_since(self.last));
        let since = if self.seen {
            format!("last new connection {ago} ago")
        } else {
            format!("none since the drain started {ago} ago")
        };
        format!(
            "waiting for {} without new connections ({since})",
            human(self.period)
        )
    }

    /// Why the period has not passed, for the deadline's message.
    pub(super) fn pending(&self, now: Instant) -> String {
        let period = human(self.period);
        if self.seen {
            let ago = human(now.saturating_duration_since(self.last));
            format!("a new connection came {ago} before it, within --quiet-for {period}")
        } else {
            format!("--quiet-for {period} had not passed")
        }
    }

    pub(super) fn period(&self) -> Duration {
        self.period
    }
}

/// `300 ms`, `1s`, `1.5s`, `2m`.
pub(super) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::tracker::{Family, HolderStatus, ListenerStatus, ProcessStatus};

    const PERIOD: Duration = Duration::from_secs(1);

    fn addr(port: u16) -> SocketAddr {
        format!("127.0.0.1:{port}").parse().expect("address")
    }

    fn process(pid: u32, accepted_total: u64) -> ProcessStatus {
        ProcessStatus {
            pid,
            comm: "t".to_owned(),
            accepted_total,
            ..ProcessStatus::default()
        }
    }

    fn listener(port: u16, holders: &[u32], accepted: u64, queue: u64) -> ListenerStatus {
        ListenerStatus {
            netns: 1,
            address: addr(port),
            family: Family::Ipv4,
            holders: holders
                .iter()
                .map(|&pid| HolderStatus {
                    pid,
                    comm: "t".to_owned(),
                    live: 0,
                })
                .collect(),
            accept_queue: queue,
            accepted_total: accepted,
            queue_drops_total: 0,
            generations: Vec::new(),
        }
    }

    fn status(processes: Vec<ProcessStatus>, listeners: Vec<ListenerStatus>) -> Status {
        Status {
            processes,
            listeners,
            ..Status::default()
        }
    }

    #[test]
    fn an_accept_restarts_the_period_and_nothing_else_does() {
        let t0 = Instant::now();
        let mut q = Quiet::new(PERIOD, t0);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(!q.observe(&status(vec![process(7, 3)], vec![]), &[7], &[], at(0)));
        assert_eq!(q.until(), at(1000), "counted from the drain's start");
        assert!(
            q.describe(at(300))
                .contains("none since the drain started 300 ms ago")
        );
        // Another process accepting is not the targets' traffic.
        assert!(!q.observe(
            &status(vec![process(7, 3), process(8, 9)], vec![]),
            &[7],
            &[],
            at(400)
        ));
        assert!(q.observe(&status(vec![process(7, 4)], vec![]), &[7], &[], at(600)));
        assert!(!q.is_quiet(at(1500)));
        assert_eq!(q.until(), at(1600));
        assert_eq!(
            q.describe(at(900)),
            "waiting for 1s without new connections (last new connection 300 ms ago)"
        );
        assert_eq!(
            q.pending(at(900)),
            "a new connection came 300 ms before it, within --quiet-for 1s"
        );
        assert!(!q.observe(&status(vec![process(7, 4)], vec![]), &[7], &[], at(1200)));
        assert!(q.is_quiet(at(1600)));
    }

    #[test]
    fn handshakes_count_only_on_listeners_the_targets_alone_hold() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut q = Quiet::new(PERIOD, t0);
        let both = |shared_accepted, own_queue| {
            status(
                vec![process(7, 0)],
                vec![
                    listener(80, &[7, 8], shared_accepted, 0),
                    listener(81, &[7], 0, own_queue),
                ],
            )
        };
        assert!(!q.observe(&both(5, 0), &[7], &[], at(0)));
        // The new generation (pid 8) accepts on the shared listener.
        assert!(!q.observe(&both(9, 0), &[7], &[], at(100)));
        // A handshake completes on the target's own listener: it waits in
        // the queue, and keeps the period from starting while it waits.
        assert!(q.observe(&both(9, 1), &[7], &[], at(200)));
        assert!(q.observe(&both(9, 1), &[7], &[], at(300)));
        assert_eq!(q.until(), at(1300));
        // Only port 80 counted: the queue on 81 is none of this drain's.
        let mut on_80 = Quiet::new(PERIOD, t0);
        assert!(!on_80.observe(&both(5, 1), &[7], &[80], at(0)));
        assert!(!on_80.observe(&both(5, 2), &[7], &[80], at(100)));
    }

    #[test]
    fn what_it_cannot_account_for_is_a_new_connection() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut q = Quiet::new(PERIOD, t0);
        assert!(!q.observe(&status(vec![], vec![]), &[7], &[], at(0)));
        // The target shows up after the start with accepts behind it.
        assert!(q.observe(&status(vec![process(7, 2)], vec![]), &[7], &[], at(100)));
        // Lost kernel events: an accept may be among them.
        let mut lost = status(vec![process(7, 2)], vec![]);
        lost.lost_events = 1;
        assert!(q.observe(&lost, &[7], &[], at(200)));
        assert!(!q.observe(&lost, &[7], &[], at(300)));
        assert_eq!(q.until(), at(1200));
    }

    #[test]
    fn durations_read_like_the_command_line() {
        assert_eq!(human(Duration::from_millis(300)), "300 ms");
        assert_eq!(human(Duration::from_secs(5)), "5s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human(Duration::from_secs(120)), "2m");
    }
}
