//! Observed drains as records, and the restart model's JSON: the
//! `/v1/restarts` report ([`RestartsReport`]) and the `handover`,
//! `draining` and `drained` event lines ([`FactLine`]) that the agent's
//! `/v1/events` and `gracewatch watch --json --events` print, so both
//! serialize them the same way.
//!
//! A [`DrainRecord`] is a fold of the model's [`Fact`]s (the facts the
//! metrics count, so a record's duration is the one the observed-drain
//! histogram got): it opens when a process enters `draining` (by a
//! gracewatch drain or inferred), follows its role changes, and ends when
//! the process reaches zero (`drained`), exits (`exited`, with the
//! connections it `dropped`), serves again (`cancelled`) or is forgotten
//! without the model learning how it ended (`unknown`). After its end it
//! keeps collecting the process's role changes (a drained process that
//! exits, or serves again) until the process drains again (a new record)
//! or exits.
//!
//! Bounded: the latest [`RECORDS_KEPT`] records, each with a timeline of
//! at most [`TIMELINE_KEPT`] entries (the first, and the latest ones).
//! Records outlive the process's forgetting ([`KEEP_GONE`](super::restart::KEEP_GONE)).

use std::{collections::BTreeSet, collections::VecDeque, time::Duration};

use serde::Serialize;

use super::restart::{Change, Fact, Restarts, Role, Why};
use crate::event::ListenAddr;

/// Drain records kept, newest last.
pub const RECORDS_KEPT: usize = 256;
/// Timeline entries kept per record: the first and the latest ones.
pub const TIMELINE_KEPT: usize = 32;
/// The `schema` of the `/v1/restarts` answer.
pub const RESTARTS_SCHEMA: &str = "gracewatch.restarts.v1";

/// How a drain ended; in JSON its snake_case name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainOutcome {
    /// Still draining.
    Ongoing,
    /// Reached zero live connections (or a gracewatch drain confirmed it).
    Drained,
    /// Exited while draining; `dropped` says how many connections it held.
    Exited,
    /// Accepts again, or its gracewatch drain was cancelled: it serves.
    Cancelled,
    /// Forgotten while draining: it left the status and whether it still
    /// runs was never learned.
    Unknown,
}

/// One role change of a drained process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelineEntry {
    pub at: Duration,
    pub role: Role,
    pub why: Why,
    /// Live connections at the change (for an exit: those it held).
    pub live: u64,
}

/// One drain the model saw. Times are on the model's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainRecord {
    /// The `seq` of the fact that opened it: unique, increasing.
    pub id: u64,
    pub pid: u32,
    pub comm: String,
    /// The listeners it held or accepted from when it started draining.
    pub listeners: Vec<ListenAddr>,
    /// When it started draining (see the restart module on handovers).
    pub started: Duration,
    /// Why it started draining.
    pub why: Why,
    /// Live connections when it started.
    pub from_live: u64,
    /// When the drain ended, unless [`DrainOutcome::Ongoing`].
    pub ended: Option<Duration>,
    pub outcome: DrainOutcome,
    /// Live connections it held when it exited draining (0 otherwise).
    pub dropped: u64,
    pub timeline: Vec<TimelineEntry>,
    /// Still collecting its process's role changes.
    open: bool,
}

impl DrainRecord {
    /// How long it drained: to its end, or to `now` while ongoing.
    pub fn duration(&self, now: Duration) -> Duration {
        self.ended.unwrap_or(now).saturating_sub(self.started)
    }

    fn push(&mut self, entry: TimelineEntry) {
        if self.timeline.len() >= TIMELINE_KEPT {
            self.timeline.remove(1);
        }
        self.timeline.push(entry);
    }
}

/// The records, newest last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Records {
    kept: VecDeque<DrainRecord>,
}

impl Records {
    pub(super) fn iter(&self) -> impl DoubleEndedIterator<Item = &DrainRecord> {
        self.kept.iter()
    }

    /// Whether a record of `pid` still collects its role changes.
    pub(super) fn has_open(&self, pid: u32) -> bool {
        self.kept.iter().any(|r| r.open && r.pid == pid)
    }

    fn open_of(&mut self, pid: u32) -> Option<&mut DrainRecord> {
        self.kept.iter_mut().rev().find(|r| r.open && r.pid == pid)
    }

    /// Folds in a fact about a process named `comm` holding `keys`.
    pub(super) fn fold(&mut self, fact: &Fact, comm: &str, keys: &BTreeSet<ListenAddr>) {
        match &fact.change {
            Change::Handover { .. } => {}
            Change::Role {
                to,
                why,
                live,
                drained,
                ..
            } => {
                let entry = TimelineEntry {
                    at: fact.at,
                    role: *to,
                    why: *why,
                    live: *live,
                };
                let ongoing = self
                    .open_of(fact.pid)
                    .is_some_and(|r| r.outcome == DrainOutcome::Ongoing);
                if *to == Role::Draining && !ongoing {
                    if let Some(r) = self.open_of(fact.pid) {
                        r.open = false;
                    }
                    if self.kept.len() >= RECORDS_KEPT {
                        self.kept.pop_front();
                    }
                    self.kept.push_back(DrainRecord {
                        id: fact.seq,
                        pid: fact.pid,
                        comm: comm.to_owned(),
                        listeners: keys.iter().copied().collect(),
                        started: fact.at,
                        why: *why,
                        from_live: *live,
                        ended: None,
                        outcome: DrainOutcome::Ongoing,
                        dropped: 0,
                        timeline: vec![entry],
                        open: true,
                    });
                    return;
                }
                let Some(r) = self.open_of(fact.pid) else {
                    return;
                };
                if r.outcome == DrainOutcome::Ongoing {
                    match to {
                        Role::Drained => {
                            r.outcome = DrainOutcome::Drained;
                            // The duration the fact (and the histogram) has.
                            r.ended = Some(match drained {
                                Some((took, _)) => r.started + *took,
                                None => fact.at,
                            });
                        }
                        Role::Serving => {
                            r.outcome = DrainOutcome::Cancelled;
                            r.ended = Some(fact.at);
                        }
                        Role::Draining | Role::Exited => {}
                    }
                }
                r.push(entry);
            }
            Change::Exited { held, .. } => {
                let Some(r) = self.open_of(fact.pid) else {
                    return;
                };
                if r.outcome == DrainOutcome::Ongoing {
                    r.outcome = DrainOutcome::Exited;
                    r.dropped = *held;
                    r.ended = Some(fact.at);
                }
                r.push(TimelineEntry {
                    at: fact.at,
                    role: Role::Exited,
                    why: Why::Exited,
                    live: *held,
                });
                r.open = false;
            }
        }
    }

    /// `pid` is forgotten (it left the status at `gone_at`): an ongoing
    /// drain of it ended there, how is unknown.
    pub(super) fn lost(&mut self, pid: u32, gone_at: Duration) {
        if let Some(r) = self.open_of(pid) {
            if r.outcome == DrainOutcome::Ongoing {
                r.outcome = DrainOutcome::Unknown;
                r.ended = Some(gone_at.max(r.started));
            }
            r.open = false;
        }
    }
}

// --- JSON -----------------------------------------------------------------

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The `/v1/restarts` answer (`gracewatch/schema/restarts.schema.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RestartsReport {
    pub schema: &'static str,
    /// When the model was last fed, on the clock of a status's
    /// `uptime_ms`: ongoing drains' durations count to here.
    pub as_of_ms: u64,
    /// Newest first.
    pub restarts: Vec<RecordJson>,
}

/// A [`DrainRecord`] in JSON: times in ms on the clock of a status's
/// `uptime_ms` and `role_since_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecordJson {
    pub id: u64,
    pub pid: u32,
    pub comm: String,
    pub listeners: Vec<ListenAddr>,
    pub why: &'static str,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    pub duration_ms: u64,
    pub outcome: DrainOutcome,
    pub from_live: u64,
    pub dropped: u64,
    pub timeline: Vec<TimelineJson>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TimelineJson {
    pub at_ms: u64,
    pub role: Role,
    pub why: &'static str,
    pub live: u64,
}

impl Restarts {
    /// The records as `/v1/restarts` answers them, newest first.
    pub fn report(&self) -> RestartsReport {
        let started = self.started();
        let now = self.now();
        let ms = |t: Duration| millis(t.saturating_sub(started));
        RestartsReport {
            schema: RESTARTS_SCHEMA,
            as_of_ms: ms(now),
            restarts: self
                .records()
                .rev()
                .map(|r| RecordJson {
                    id: r.id,
                    pid: r.pid,
                    comm: r.comm.clone(),
                    listeners: r.listeners.clone(),
                    why: r.why.code(),
                    started_ms: ms(r.started),
                    ended_ms: r.ended.map(ms),
                    // From the fields shown, so they add up exactly.
                    duration_ms: ms(r.ended.unwrap_or(now).max(r.started))
                        .saturating_sub(ms(r.started)),
                    outcome: r.outcome,
                    from_live: r.from_live,
                    dropped: r.dropped,
                    timeline: r
                        .timeline
                        .iter()
                        .map(|e| TimelineJson {
                            at_ms: ms(e.at),
                            role: e.role,
                            why: e.why.code(),
                            live: e.live,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// The event line of a fact: `handover`, `draining` or `drained`
    /// (other role changes and exits have none: the kernel's
    /// `process_exit` event tells the exit). `at` is on the events' clock;
    /// a drain's `at` is when it started (back-dated for a handover).
    pub fn event_line(&self, fact: &Fact) -> Option<FactLine> {
        let comm = || {
            self.process(fact.pid)
                .map_or_else(String::new, |p| p.comm.clone())
        };
        Some(match &fact.change {
            Change::Handover {
                listener,
                comm,
                alongside,
            } => FactLine::Handover {
                at: fact.at,
                pid: fact.pid,
                comm: comm.clone(),
                listener: *listener,
                alongside: alongside.clone(),
            },
            Change::Role {
                to: Role::Draining,
                why,
                live,
                ..
            } => FactLine::Draining {
                at: fact.at,
                pid: fact.pid,
                comm: comm(),
                why: why.code(),
                live: *live,
            },
            Change::Role {
                to: Role::Drained,
                why,
                drained,
                ..
            } => FactLine::Drained {
                at: fact.at,
                pid: fact.pid,
                comm: comm(),
                why: why.code(),
                took_ms: drained.map(|(took, _)| millis(took)),
                from_live: drained.map(|(_, from)| from),
            },
            Change::Role { .. } | Change::Exited { .. } => return None,
        })
    }
}

/// A line of the event stream for a restart fact (`event.schema.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FactLine {
    /// `pid` started accepting on `listener`, which `alongside` serve.
    Handover {
        at: Duration,
        pid: u32,
        comm: String,
        listener: ListenAddr,
        alongside: Vec<u32>,
    },
    /// `pid` started draining at `at`, holding `live`.
    Draining {
        at: Duration,
        pid: u32,
        comm: String,
        why: &'static str,
        live: u64,
    },
    /// `pid` drained: `took_ms` from `from_live` (null when it was not
    /// draining before).
    Drained {
        at: Duration,
        pid: u32,
        comm: String,
        why: &'static str,
        took_ms: Option<u64>,
        from_live: Option<u64>,
    },
}

impl FactLine {
    /// The process the line is about.
    pub fn pid(&self) -> u32 {
        match self {
            Self::Handover { pid, .. } | Self::Draining { pid, .. } | Self::Drained { pid, .. } => {
                *pid
            }
        }
    }
}
