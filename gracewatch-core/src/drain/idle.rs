//! `--until-idle`: whether every live connection a drain's targets hold has
//! moved no data for the idle period with nothing in flight, and when to
//! read the kernel again if not. Pure: the gate reads the targets' fd
//! tables, the tracker and the kernel's `tcp_info`, and hands each socket
//! here as a [`Row`]; anything the reads could not settle holds the drain
//! (fail closed). The next read is timed to the moment the least idle
//! connection would reach the period, so the signal follows the last
//! activity by the period plus a few milliseconds, not by a polling tick.

use std::time::Duration;

use super::quiet::human;
use crate::event::ConnActivity;

/// How soon to read again while something is in flight or undecided: the
/// moment it clears cannot be predicted, so this bounds how late the gate
/// learns of it (and how often it reads: one fd look and one sock_diag
/// dump per namespace each time).
pub(super) const RETRY: Duration = Duration::from_millis(50);
/// The kernel counts idle time in jiffies (4 ms at HZ=250, 10 ms at
/// HZ=100) and may round it up by one: a connection counts as idle only
/// once the kernel says this much more than the period, so it never ends
/// a drain before the period truly passed.
pub(super) const TICK: Duration = Duration::from_millis(10);
/// Read this much after the least idle connection should reach the
/// period (and [`TICK`]): a read that lands a hair early costs a whole
/// [`RETRY`].
pub(super) const SLACK: Duration = Duration::from_millis(5);

/// One socket the targets hold, as the gate's reads found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Row {
    /// The fd tables and the tracker both show it, and the kernel said this.
    Read(ConnActivity),
    /// The fd tables and the tracker show it, but the kernel's dump did not
    /// (it closed meanwhile, or its namespace could not be entered).
    NotFound,
    /// The fd tables or the tracker show it, not both (passed or shared
    /// fds the tracker does not attribute, or an accept after the fd look).
    Unmatched,
}

/// What one read of the targets' connections decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Decision {
    pub live: usize,
    /// Read, with bytes unread, unsent or unacknowledged.
    pub in_flight: usize,
    /// Not read, or read without an idle time: they hold the drain.
    pub undecided: usize,
    /// The least idle time among the read ones with nothing in flight.
    pub least_idle: Option<Duration>,
    /// `None`: every connection is idle for the period, nothing in flight.
    /// Otherwise how long after this read to read again.
    pub next_read: Option<Duration>,
}

impl Decision {
    pub fn idle(&self) -> bool {
        self.next_read.is_none()
    }

    /// The progress phrase: "all 3 idle for ≥1.2s, waiting for 2s idle
    /// with nothing in flight", "1 in flight, 2 idle for ≥300 ms, …".
    pub fn describe(&self, until: Duration) -> String {
        let mut parts = Vec::new();
        if self.in_flight > 0 {
            parts.push(format!("{} in flight", self.in_flight));
        }
        if self.undecided > 0 {
            parts.push(format!(
                "{} undecided (not found by the read, or not both tracked and in the fds: they hold the drain)",
                self.undecided
            ));
        }
        let quiet = self.live - self.in_flight - self.undecided;
        if let Some(least) = self.least_idle.filter(|_| quiet > 0) {
            let all = if quiet == self.live { "all " } else { "" };
            parts.push(format!("{all}{quiet} idle for ≥{}", human(least)));
        }
        if parts.is_empty() {
            parts.push("no connection read".to_owned());
        }
        format!(
            "{}, waiting for {} idle with nothing in flight",
            parts.join(", "),
            human(until)
        )
    }
}

/// Decides from one read of every socket the targets hold. An empty read
/// decides nothing: a drain with no connection left is the zero rule's to
/// confirm.
pub(super) fn decide(rows: &[Row], until: Duration) -> Decision {
    let mut d = Decision {
        live: rows.len(),
        in_flight: 0,
        undecided: 0,
        least_idle: None,
        next_read: Some(RETRY),
    };
    for row in rows {
        match row {
            Row::Read(a) => match a.idle_ms {
                None => d.undecided += 1,
                Some(_) if a.in_flight => d.in_flight += 1,
                Some(ms) => {
                    let idle = Duration::from_millis(ms);
                    d.least_idle = Some(d.least_idle.map_or(idle, |l| l.min(idle)));
                }
            },
            Row::NotFound | Row::Unmatched => d.undecided += 1,
        }
    }
    if rows.is_empty() || d.in_flight > 0 || d.undecided > 0 {
        return d;
    }
    // Every row was read with an idle time and nothing in flight.
    let Some(least) = d.least_idle else {
        return d;
    };
    let needed = until + TICK;
    d.next_read = (least < needed).then(|| needed - least + SLACK);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNTIL: Duration = Duration::from_secs(2);

    fn quiet(idle_ms: u64) -> Row {
        Row::Read(ConnActivity::new(
            Some(idle_ms),
            Some(idle_ms),
            0,
            0,
            Some(0),
        ))
    }

    #[test]
    fn idle_only_when_every_connection_passed_the_period() {
        let d = decide(&[quiet(2010), quiet(5000)], UNTIL);
        assert!(d.idle(), "{d:?}");
        assert_eq!(d.least_idle, Some(Duration::from_millis(2010)));
        assert_eq!(
            d.describe(UNTIL),
            "all 2 idle for ≥2.0s, waiting for 2s idle with nothing in flight"
        );
        // 2 s by the kernel's count, which may be a jiffy ahead: not yet,
        // read again when the least idle one is past the period for sure.
        let d = decide(&[quiet(2000), quiet(5000)], UNTIL);
        assert!(!d.idle());
        assert_eq!(d.next_read, Some(TICK + SLACK));
    }

    #[test]
    fn the_next_read_is_timed_to_the_least_idle_connection() {
        let d = decide(&[quiet(5000), quiet(800), quiet(1200)], UNTIL);
        assert!(!d.idle());
        assert_eq!(d.least_idle, Some(Duration::from_millis(800)));
        assert_eq!(
            d.next_read,
            Some(Duration::from_millis(1200) + TICK + SLACK)
        );
        assert_eq!(
            d.describe(UNTIL),
            "all 3 idle for ≥800 ms, waiting for 2s idle with nothing in flight"
        );
    }

    #[test]
    fn anything_in_flight_holds_the_drain_and_is_read_again_soon() {
        let unread = Row::Read(ConnActivity::new(Some(9000), Some(9000), 3, 0, Some(0)));
        let unsent = Row::Read(ConnActivity::new(
            Some(9000),
            Some(9000),
            0,
            4096,
            Some(4000),
        ));
        for row in [unread, unsent] {
            let d = decide(&[quiet(9000), row], UNTIL);
            assert!(!d.idle(), "{row:?}");
            assert_eq!((d.in_flight, d.next_read), (1, Some(RETRY)));
            assert_eq!(
                d.describe(UNTIL),
                "1 in flight, 1 idle for ≥9s, waiting for 2s idle with nothing in flight"
            );
        }
    }

    #[test]
    fn what_the_reads_cannot_settle_is_not_idle() {
        let no_times = Row::Read(ConnActivity::new(None, Some(9000), 0, 0, None));
        for row in [no_times, Row::NotFound, Row::Unmatched] {
            let d = decide(&[quiet(9000), row], UNTIL);
            assert!(!d.idle(), "{row:?}");
            assert_eq!((d.undecided, d.next_read), (1, Some(RETRY)), "{row:?}");
        }
        // Nothing read: the zero rule decides, not this one.
        let d = decide(&[], UNTIL);
        assert!(!d.idle());
        assert_eq!(
            d.describe(UNTIL),
            "no connection read, waiting for 2s idle with nothing in flight"
        );
    }
}
