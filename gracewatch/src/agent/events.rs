//! `/v1/events` fan-out: one task reads the monitor's events, encodes each
//! once, and hands the line to every subscriber through a bounded queue of
//! its own. A subscriber whose queue is full gets a last `lagged` line and
//! is disconnected: a reader that does not keep up costs a fixed amount of
//! memory and nothing else (the monitor, drains and other readers never
//! wait for it). At most [`MAX_SUBSCRIBERS`] are served at once.
//!
//! What a line shows depends on who asked: kernel socket addresses never
//! leave the process (events carry an opaque id, see
//! [`opaque_sock_id`](crate::event::opaque_sock_id)), and peer addresses
//! only go to trusted readers (the unix socket, or TCP with the token).
//!
//! Besides the kernel's events, the stream carries the restart model's
//! `handover`, `draining` and `drained` facts ([`fact_line`]), and what the
//! generation governor did (`governor` lines, see [`super::governor`]).

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::{
    event::ConnEvent,
    tracker::{Restarts, restart::Fact},
};

/// Event streams served at once.
pub const MAX_SUBSCRIBERS: usize = 64;
/// Lines queued per subscriber before it counts as too slow.
pub const SUBSCRIBER_BACKLOG: usize = 1024;

struct Subscriber {
    tx: mpsc::Sender<Arc<str>>,
    peers: bool,
}

/// The subscribers of `/v1/events`.
#[derive(Default)]
pub(crate) struct Hub {
    subscribers: Mutex<Vec<Subscriber>>,
}

impl Hub {
    /// A new subscriber's queue, or `None` when [`MAX_SUBSCRIBERS`] are
    /// served already. `peers`: whether its lines may carry peer addresses.
    pub(crate) fn subscribe(&self, peers: bool) -> Option<mpsc::Receiver<Arc<str>>> {
        let mut subs = self.subscribers.lock().ok()?;
        subs.retain(|s| !s.tx.is_closed());
        if subs.len() >= MAX_SUBSCRIBERS {
            return None;
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BACKLOG);
        subs.push(Subscriber { tx, peers });
        Some(rx)
    }

    /// Subscribers served now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.subscribers.lock().map_or(0, |s| s.len())
    }

    /// Queues `ev` for every subscriber; those whose queue is full get the
    /// `lagged` line in its last slot instead, and are let go.
    pub(crate) fn publish(&self, ev: &ConnEvent) {
        self.publish_with(|peers| encode(ev, peers));
    }

    /// Queues a line of the restart model (see [`fact_line`]) for every
    /// subscriber, as [`Hub::publish`] does for events.
    pub(crate) fn publish_fact(&self, fact: &Fact, model: &Restarts) {
        if let Some(line) = fact_line(fact, model) {
            self.publish_with(|_| line.clone());
        }
    }

    /// Queues a line of the agent's own (the governor's) for every
    /// subscriber; it carries no peer address.
    pub(crate) fn publish_line(&self, line: Arc<str>) {
        self.publish_with(|_| line.clone());
    }

    /// Queues the line `encode(peers)` gives for each subscriber, encoding
    /// it at most once per kind of reader.
    fn publish_with(&self, encode: impl Fn(bool) -> Arc<str>) {
        let Ok(mut subs) = self.subscribers.lock() else {
            return;
        };
        if subs.is_empty() {
            return;
        }
        let mut full: Option<Arc<str>> = None;
        let mut redacted: Option<Arc<str>> = None;
        subs.retain(|s| {
            let line = if s.peers {
                full.get_or_insert_with(|| encode(true)).clone()
            } else {
                redacted.get_or_insert_with(|| encode(false)).clone()
            };
            // The last slot is kept for the lagged line.
            if s.tx.capacity() <= 1 {
                let _ = s.tx.try_send(lagged_line(1));
                return false;
            }
            s.tx.try_send(line).is_ok()
        });
    }

    /// The hub itself missed `skipped` events: every subscriber's stream
    /// has a gap, so each gets the lagged line and is let go.
    pub(crate) fn lagged(&self, skipped: u64) {
        if let Ok(mut subs) = self.subscribers.lock() {
            for s in subs.drain(..) {
                let _ = s.tx.try_send(lagged_line(skipped));
            }
        }
    }

    /// Ends every stream (agent shutdown).
    pub(crate) fn close(&self) {
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.clear();
        }
    }
}

/// The last line a reader gets when it is let go for falling behind.
fn lagged_line(skipped: u64) -> Arc<str> {
    format!(
        "{}\n",
        serde_json::json!({
            "kind": "lagged",
            "skipped": skipped,
            "message": "this reader fell behind and was disconnected: reconnect, and read /v1/status for the current state",
        })
    )
    .into()
}

/// The `/v1/events` line of a restart fact: `handover`, `draining` or
/// `drained` ([`Restarts::event_line`], the serializer `gracewatch watch
/// --json --events` uses too); no peer address is in it.
pub(crate) fn fact_line(fact: &Fact, model: &Restarts) -> Option<Arc<str>> {
    let line = model.event_line(fact)?;
    let v = serde_json::to_string(&line).ok()?;
    Some(format!("{v}\n").into())
}

/// One NDJSON line for `ev`; without `peers`, connections lose their
/// remote address.
pub(crate) fn encode(ev: &ConnEvent, peers: bool) -> Arc<str> {
    let mut v = serde_json::to_value(ev).unwrap_or_default();
    if !peers {
        if let Some(tuple) = v.get_mut("tuple").and_then(|t| t.as_object_mut()) {
            tuple.remove("remote");
        }
    }
    format!("{v}\n").into()
}

/// Hides every `peer` field (drain progress and reports, peer groups) from
/// readers that may not see peer addresses, and those addresses wherever
/// else they appear (the human `message` of progress and reports quotes
/// them); a peer group's `peer_processes` and `unnamed` become null.
pub(crate) fn redact_peers(v: &mut serde_json::Value) {
    let mut peers = Vec::new();
    collect_peers(v, &mut peers);
    // Longest first, so no address is left half-replaced by a shorter one.
    peers.sort_by_key(|p| std::cmp::Reverse(p.len()));
    peers.dedup();
    hide(v, &peers);
}

fn collect_peers(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match value {
                    serde_json::Value::String(p) if key == "peer" && !p.is_empty() => {
                        out.push(p.clone());
                    }
                    other => collect_peers(other, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_peers(i, out)),
        _ => {}
    }
}

fn hide(v: &mut serde_json::Value, peers: &[String]) {
    match v {
        serde_json::Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if key == "peer" && value.is_string() {
                    *value = "hidden".into();
                } else if key == "peer_processes" || key == "unnamed" {
                    // Who is on the other end is the peer's business too
                    // (peer groups: as if nobody had looked).
                    *value = serde_json::Value::Null;
                } else {
                    hide(value, peers);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|i| hide(i, peers)),
        serde_json::Value::String(text) => {
            for p in peers {
                if text.contains(p.as_str()) {
                    *text = text.replace(p.as_str(), "(peer hidden)");
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Tuple;

    fn accept(sk: u64) -> ConnEvent {
        ConnEvent::Accept {
            at: std::time::Duration::from_millis(5),
            sk,
            tuple: Tuple {
                netns: 1,
                local: "10.0.0.1:80".parse().expect("addr"),
                remote: "192.0.2.7:40001".parse().expect("addr"),
            },
            pid: 7,
            comm: "srv".to_owned(),
            was_queued: false,
        }
    }

    #[test]
    fn lines_carry_no_kernel_address_and_peers_only_when_allowed() {
        let sk = 0xffff_8881_0322_5c80_u64;
        let full = encode(&accept(sk), true);
        let redacted = encode(&accept(sk), false);
        for line in [&full, &redacted] {
            assert!(!line.contains(&sk.to_string()), "{line}");
            assert!(!line.contains("ffff8881"), "{line}");
        }
        assert!(full.contains("192.0.2.7"), "{full}");
        assert!(!redacted.contains("192.0.2.7"), "{redacted}");
        assert!(redacted.contains("10.0.0.1:80"), "{redacted}");
        // The id is stable, so a reader can still pair a close with its accept.
        assert_eq!(full, encode(&accept(sk), true));
        assert_ne!(full, encode(&accept(sk + 8), true));
    }

    /// A drain result's peer groups: the address and the peer processes
    /// (pids, commands, cgroups of other tenants) go, the counts stay.
    #[test]
    fn peer_groups_lose_their_address_and_processes() {
        let mut v = serde_json::json!({
            "peers": [{"peer": "192.0.2.0/24", "prefix_len": 24, "addresses": 2, "connections": 3,
                       "oldest_age_ms": 5, "unnamed": 1,
                       "peer_processes": [{"pid": 77, "comm": "scraper", "container_id": null, "cgroup": "/tenant-b", "connections": 2}]}],
            "message": "oldest from 192.0.2.0/24"
        });
        redact_peers(&mut v);
        let g = &v["peers"][0];
        assert_eq!(g["peer"], "hidden", "{v}");
        assert!(
            g["peer_processes"].is_null() && g["unnamed"].is_null(),
            "{v}"
        );
        assert_eq!(g["connections"], 3, "{v}");
        let text = v.to_string();
        assert!(
            !text.contains("192.0.2") && !text.contains("scraper") && !text.contains("tenant-b"),
            "{v}"
        );
    }

    #[test]
    fn a_full_queue_ends_with_a_lagged_line_and_the_subscriber_is_dropped() {
        let hub = Hub::default();
        let mut slow = hub.subscribe(false).expect("subscribed");
        let mut fast = hub.subscribe(true).expect("subscribed");
        for i in 0..SUBSCRIBER_BACKLOG as u64 + 10 {
            hub.publish(&accept(i));
            // The fast reader keeps up.
            assert!(fast.try_recv().is_ok(), "fast reader lost event {i}");
        }
        assert_eq!(hub.len(), 1, "only the fast reader is left");
        let mut lines = Vec::new();
        while let Ok(l) = slow.try_recv() {
            lines.push(l);
        }
        assert_eq!(lines.len(), SUBSCRIBER_BACKLOG);
        let last: serde_json::Value =
            serde_json::from_str(lines.last().expect("last")).expect("json");
        assert_eq!(last["kind"], "lagged", "{last}");
        assert!(slow.is_closed() || slow.try_recv().is_err());
    }

    #[test]
    fn subscribers_are_capped() {
        let hub = Hub::default();
        let subs: Vec<_> = (0..MAX_SUBSCRIBERS)
            .map(|_| hub.subscribe(false).expect("under the cap"))
            .collect();
        assert!(hub.subscribe(false).is_none());
        drop(subs);
        assert!(
            hub.subscribe(false).is_some(),
            "closed ones free their slot"
        );
    }

    #[test]
    fn peers_are_hidden_in_drain_answers() {
        let mut v = serde_json::json!({"report": {"held": [{"pid": 1, "local": "10.0.0.1:80", "peer": "192.0.2.7:4000", "age_ms": 5}], "message": "held by 192.0.2.7:4000"}, "progress": {"oldest": {"peer": "192.0.2.8:1"}, "message": "oldest from 192.0.2.8:1"}});
        redact_peers(&mut v);
        let text = v.to_string();
        assert!(!text.contains("192.0.2."), "{text}");
        assert!(text.contains("10.0.0.1:80"), "{text}");
    }
}
