//! A source with no kernel behind it: recorded events (the output of
//! `gracewatch record`) or hand-made ones, and more fed later, folded by a
//! real [`Tracker`] in the same monitor core as the kernel's (built by
//! [`MonitorHandle::from_replay`]). It never fails, has no kernel
//! statistics and nothing to rescan. Everything
//! downstream of the monitor handle (the drain gate, the agent's HTTP API,
//! the TUI) can then run and be tested without root or eBPF.
//!
//! [`Tracker`]: crate::tracker::Tracker
//! [`MonitorHandle::from_replay`]: crate::monitor::MonitorHandle::from_replay

use std::time::{Duration, Instant};

#[cfg(test)]
use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::event::ConnEvent;

/// The events a [`ReplayFeed`] hands over, on the replay's clock.
#[derive(Debug)]
pub struct ReplaySource {
    clock: ReplayClock,
    feed: mpsc::UnboundedReceiver<ConnEvent>,
    /// Received while waiting for the feed, not yet drained.
    received: Vec<ConnEvent>,
    /// The feed was dropped: nothing more will come.
    feed_closed: bool,
}

impl ReplaySource {
    /// A source fed through the returned [`ReplayFeed`], whose clock starts
    /// at `clock`.
    pub(crate) fn new(clock: ReplayClock) -> (Self, ReplayFeed) {
        let (feed, rx) = ReplayFeed::channel();
        let source = Self {
            clock,
            feed: rx,
            received: Vec::new(),
            feed_closed: false,
        };
        (source, feed)
    }
}

impl super::Source for ReplaySource {
    const RECORDING: bool = true;

    async fn readable(&mut self) -> anyhow::Result<()> {
        if self.feed_closed {
            // A replay without a feed keeps answering; it never fails.
            std::future::pending::<()>().await;
        }
        match self.feed.recv().await {
            Some(ev) => {
                self.clock.observe(ev.at());
                self.received.push(ev);
            }
            None => self.feed_closed = true,
        }
        Ok(())
    }

    fn drain(&mut self, out: &mut Vec<ConnEvent>) {
        out.append(&mut self.received);
        while let Ok(ev) = self.feed.try_recv() {
            self.clock.observe(ev.at());
            out.push(ev);
        }
    }

    fn now(&self) -> Duration {
        self.clock.now()
    }
}

/// Feeds more events to a replay monitor after it started (see
/// [`MonitorHandle::from_replay_with_feed`](crate::monitor::MonitorHandle::from_replay_with_feed)).
/// Dropping it only stops the feed; the monitor keeps answering.
#[derive(Clone, Debug)]
pub struct ReplayFeed {
    tx: mpsc::UnboundedSender<ConnEvent>,
}

impl ReplayFeed {
    pub(crate) fn channel() -> (Self, mpsc::UnboundedReceiver<ConnEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// Hands one event to the monitor, which applies and publishes it like
    /// a kernel event. Fails once the monitor has stopped.
    pub fn send(&self, event: ConnEvent) -> anyhow::Result<()> {
        self.tx
            .send(event)
            .map_err(|_| anyhow::anyhow!("the replay monitor stopped"))
    }
}

/// The replay's notion of "now": the time of the newest evidence seen, plus
/// the real time elapsed since it was seen. It never runs behind an event it
/// has applied, so ages and uptimes stay sensible for recorded timestamps
/// and for hand-made ones that start near zero.
#[derive(Debug)]
pub(crate) struct ReplayClock {
    base: Duration,
    anchor: Instant,
}

impl ReplayClock {
    pub(crate) fn new(start: Duration) -> Self {
        Self {
            base: start,
            anchor: Instant::now(),
        }
    }

    pub(crate) fn now(&self) -> Duration {
        self.base + self.anchor.elapsed()
    }

    /// Moves the clock forward to `at` if it is behind.
    pub(crate) fn observe(&mut self, at: Duration) {
        if at > self.now() {
            self.base = at;
            self.anchor = Instant::now();
        }
    }
}

/// Parses a recording: one [`ConnEvent`] JSON object per line, as
/// `gracewatch record` prints them. Blank lines are skipped.
#[cfg(test)]
pub fn parse_recording(text: &str) -> anyhow::Result<Vec<ConnEvent>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("line {} of the recording is not an event", i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_follows_the_newest_event_and_never_goes_back() {
        let mut clock = ReplayClock::new(Duration::from_secs(10));
        assert!(clock.now() >= Duration::from_secs(10));
        clock.observe(Duration::from_secs(100));
        let t = clock.now();
        assert!(t >= Duration::from_secs(100));
        clock.observe(Duration::from_secs(50));
        assert!(clock.now() >= t);
    }

    #[test]
    fn recordings_parse_line_by_line_and_name_the_bad_line() {
        let ok = "{\"kind\":\"process_exit\",\"at\":{\"secs\":1,\"nanos\":0},\"pid\":7}\n\n";
        assert_eq!(
            parse_recording(ok).expect("parses"),
            vec![ConnEvent::ProcessExit {
                at: Duration::from_secs(1),
                pid: 7
            }]
        );
        let err = parse_recording(&format!("{ok}{{\"kind\":\"nope\"}}\n")).expect_err("bad line");
        assert!(format!("{err:#}").contains("line 3"), "{err:#}");
    }
}
