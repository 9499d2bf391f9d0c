//! The generation governor: caps old generations that pile up under reload
//! storms. Fed the monitor's statuses, it asks the pure
//! [`crate::governor::decide`] which draining generations are past a limit,
//! and signals each of them at most once, under the drain's target rules
//! ([`super::policy::Protected`]: never pid 1, kernel threads, gracewatch
//! itself or its ancestors) and through a pidfd, so a recycled pid is never
//! signalled. What it did is returned as [`Action`]s for the caller (the
//! agent) to log and count: no printing here.
//!
//! Which process a pid is: the governor reads each generation's start time
//! when it first sees it in a status (usually while it still serves, long
//! before its drain), and signals only a pinned process whose start time is
//! still that one. A pid it could not read then, or that names a process
//! started since, is left alone (fail closed).
//!
//! Memory is bounded: it remembers the pids the status lists as
//! generations of the listeners it governs (at most [`MAX_REMEMBERED`]),
//! and forgets each once the status no longer lists it there.

use std::collections::{BTreeSet, HashMap};

use super::{SignalSpec, policy::Protected};
use crate::{
    governor::{Decision, GovernorRules, decide},
    source::process::{self, Delivery, PinnedProcess},
    tracker::{Status, restart::Role},
};

/// Generations remembered at most (start times, and those acted on).
pub const MAX_REMEMBERED: usize = 4096;

/// What became of one decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActionOutcome {
    /// The kernel queued the signal for the generation.
    Delivered,
    /// It exited before the signal (nothing was sent).
    Exited,
    /// Not signalled, for this reason (a protected process, a pid that
    /// names another process now, the kernel's refusal).
    Failed(String),
}

/// One generation the governor acted on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    pub decision: Decision,
    pub signal: SignalSpec,
    pub outcome: ActionOutcome,
}

/// The governor's state: its rules, and what it remembers of generations.
pub struct Governor {
    rules: GovernorRules,
    signal: SignalSpec,
    protected: Protected,
    /// Each generation's start time when first seen (`None`: unreadable).
    seen: HashMap<u32, Option<u64>>,
    /// Generations acted on (signalled or given up on): never again.
    done: BTreeSet<u32>,
}

impl Governor {
    /// A governor enforcing `rules` with `signal`. Reads which processes
    /// are gracewatch's ancestors now (they are never signalled).
    pub fn new(rules: GovernorRules, signal: SignalSpec) -> Self {
        Self {
            rules,
            signal,
            protected: Protected::new(),
            seen: HashMap::new(),
            done: BTreeSet::new(),
        }
    }

    pub fn rules(&self) -> &GovernorRules {
        &self.rules
    }

    pub fn signal(&self) -> SignalSpec {
        self.signal
    }

    /// Looks at `status` at `now_ms` (its clock) and signals the
    /// generations past a limit. Must run within a tokio runtime (pidfds
    /// are registered with it).
    pub fn step(&mut self, status: &Status, now_ms: u64) -> Vec<Action> {
        self.remember(status);
        let decisions = decide(status, now_ms, &self.rules, &self.done);
        let mut actions = Vec::with_capacity(decisions.len());
        for decision in decisions {
            // At most once, whatever comes of it.
            self.done.insert(decision.pid);
            let outcome = self.act(decision.pid);
            actions.push(Action {
                decision,
                signal: self.signal,
                outcome,
            });
        }
        actions
    }

    /// Reads the start time of generations of governed listeners seen for
    /// the first time, and forgets those the status no longer lists.
    fn remember(&mut self, status: &Status) {
        let ports = &self.rules.ports;
        let governed = || {
            status
                .listeners
                .iter()
                .filter(|l| ports.is_empty() || ports.contains(&l.address.port()))
                .flat_map(|l| &l.generations)
        };
        let listed: BTreeSet<u32> = governed().map(|g| g.pid).collect();
        self.seen.retain(|pid, _| listed.contains(pid));
        self.done.retain(|pid| listed.contains(pid));
        for g in governed() {
            if g.role == Role::Exited || self.seen.contains_key(&g.pid) {
                continue;
            }
            if self.seen.len() >= MAX_REMEMBERED {
                break;
            }
            self.seen.insert(g.pid, process::start_time(g.pid));
        }
    }

    fn act(&self, pid: u32) -> ActionOutcome {
        let Some(&Some(started)) = self.seen.get(&pid) else {
            return ActionOutcome::Failed(
                "its start time was not read when it was first seen, so it cannot be told from a process that took its pid: left alone".to_owned(),
            );
        };
        let proc = match PinnedProcess::open(pid) {
            Ok(p) => p,
            Err(_) if matches!(process::liveness(pid), process::Liveness::Exited) => {
                return ActionOutcome::Exited;
            }
            Err(e) => return ActionOutcome::Failed(format!("{e:#}")),
        };
        // Read after pinning: if this is the start time first seen, the
        // pidfd holds that process (or one that exited since, which no
        // signal reaches).
        match process::start_time(pid) {
            Some(now) if now == started => {}
            _ if proc.has_exited() => return ActionOutcome::Exited,
            Some(_) => {
                return ActionOutcome::Failed(
                    "the pid now names a process that started later (the generation exited and its pid was reused): left alone".to_owned(),
                );
            }
            None => {
                return ActionOutcome::Failed(
                    "its start time cannot be read to check it is still the same process: left alone"
                        .to_owned(),
                );
            }
        }
        if let Err(r) = self.protected.refusal(&proc) {
            return ActionOutcome::Failed(r.why);
        }
        match proc.signal(self.signal.number()) {
            Delivery::Delivered => ActionOutcome::Delivered,
            Delivery::Exited => ActionOutcome::Exited,
            Delivery::Refused(e) => ActionOutcome::Failed(format!(
                "the kernel refused {}: {}",
                self.signal,
                process::errno_text(e)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::process::ExitStatusExt as _, process::Command, time::Duration};

    use super::*;
    use crate::{
        governor::Reason,
        tracker::{Family, GenerationStatus, ListenerStatus, ProcessStatus},
    };

    /// One listener whose generations are `draining` (oldest first), then
    /// `serving`.
    fn status(draining: &[u32], serving: u32) -> Status {
        let generation = |pid: u32, role: Role| GenerationStatus {
            pid,
            comm: "srv".to_owned(),
            role,
            role_since_ms: 0,
            live: 1,
        };
        let proc = |pid: u32, role: Role| ProcessStatus {
            pid,
            comm: "srv".to_owned(),
            live: 1,
            listeners: vec![],
            accepted_total: 0,
            closed_total: 0,
            oldest_live_ms: None,
            role,
            role_since_ms: 0,
            cgroup: None,
            container_id: None,
            pod_uid: None,
        };
        let address = "127.0.0.1:8080".parse().expect("an address");
        let mut generations: Vec<GenerationStatus> = draining
            .iter()
            .map(|&p| generation(p, Role::Draining))
            .collect();
        generations.push(generation(serving, Role::Serving));
        let mut processes: Vec<ProcessStatus> =
            draining.iter().map(|&p| proc(p, Role::Draining)).collect();
        processes.push(proc(serving, Role::Serving));
        Status {
            schema: crate::tracker::STATUS_SCHEMA.to_owned(),
            uptime_ms: 5000,
            processes,
            listeners: vec![ListenerStatus {
                netns: 1,
                address,
                family: Family::of(address),
                holders: vec![],
                accept_queue: 0,
                accepted_total: 0,
                queue_drops_total: 0,
                generations,
            }],
            lost_events: 0,
            map_full_total: 0,
        }
    }

    fn sleeper() -> std::process::Child {
        Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep")
    }

    fn rules(max_draining: u32) -> GovernorRules {
        GovernorRules {
            max_draining: Some(max_draining),
            max_age: None,
            ports: vec![],
        }
    }

    #[tokio::test]
    async fn signals_the_oldest_once_and_never_the_newer_ones() {
        let (mut old, mut newer, mut serving) = (sleeper(), sleeper(), sleeper());
        let st = status(&[old.id(), newer.id()], serving.id());
        let mut gov = Governor::new(rules(1), SignalSpec::TERM);
        let actions = gov.step(&st, 5000);
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert_eq!(actions[0].decision.pid, old.id());
        assert_eq!(actions[0].decision.reason, Reason::MaxDraining);
        assert_eq!(actions[0].outcome, ActionOutcome::Delivered);
        let status = old.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
        // Listed still (the tracker has not seen the exit yet): not again.
        assert!(gov.step(&st, 6000).is_empty());
        for p in [&mut newer, &mut serving] {
            assert_eq!(p.try_wait().expect("try_wait"), None, "untouched");
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    #[tokio::test]
    async fn a_pid_that_names_a_later_process_is_left_alone() {
        let (mut old, mut serving) = (sleeper(), sleeper());
        let st = status(&[old.id()], serving.id());
        let mut gov = Governor::new(rules(0), SignalSpec::TERM);
        // As if the generation first seen under this pid had started earlier.
        gov.remember(&st);
        if let Some(Some(t)) = gov.seen.get_mut(&old.id()) {
            *t -= 1;
        }
        let actions = gov.step(&st, 5000);
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert!(
            matches!(&actions[0].outcome, ActionOutcome::Failed(why) if why.contains("started later")),
            "{actions:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(old.try_wait().expect("try_wait"), None, "not signalled");
        assert!(gov.step(&st, 6000).is_empty(), "given up on: once");
        for p in [&mut old, &mut serving] {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    #[tokio::test]
    async fn gracewatch_itself_and_its_ancestors_are_never_signalled() {
        let mut serving = sleeper();
        let me = std::process::id();
        let st = status(&[me], serving.id());
        let mut gov = Governor::new(rules(0), SignalSpec::TERM);
        let actions = gov.step(&st, 5000);
        assert!(
            matches!(&actions[..], [a] if matches!(&a.outcome, ActionOutcome::Failed(why) if why.contains("itself"))),
            "{actions:?}"
        );
        let _ = serving.kill();
        let _ = serving.wait();
    }

    #[tokio::test]
    async fn memory_follows_the_status() {
        let (mut old, mut serving) = (sleeper(), sleeper());
        let mut gov = Governor::new(rules(5), SignalSpec::TERM);
        gov.step(&status(&[old.id()], serving.id()), 0);
        assert_eq!(gov.seen.len(), 2);
        gov.step(&status(&[], serving.id()), 0);
        assert_eq!(gov.seen.len(), 1, "forgotten once unlisted");
        for p in [&mut old, &mut serving] {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}
