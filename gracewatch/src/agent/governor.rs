//! The agent's side of the generation governor
//! ([`crate::drain::governor`]): its flags, the task that feeds it every
//! status the monitor publishes (and, for the age limit, the passing time),
//! and what it reports of each action: one line on stderr, the
//! `gracewatch_governor_*` counters, and a `governor` line on `/v1/events`.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use super::Shared;
use crate::{
    display::terminal_safe,
    drain::{
        SignalSpec,
        governor::{Action, ActionOutcome, Governor},
    },
    governor::{GovernorRules, Reason},
    input::{parse_port, parse_timeout},
    monitor::MonitorHandle,
};

/// How often the age limit is looked at when no status arrives (only
/// with `--govern-max-age`: the draining count changes with a status).
const TICK: Duration = Duration::from_millis(100);

/// Largest `--govern-max-draining`.
const MAX_DRAINING_LIMIT: u32 = 1000;

/// `gracewatch agent` options of the generation governor.
#[derive(Clone, Debug, Default, clap::Args)]
#[command(group(clap::ArgGroup::new("govern_limit").multiple(true).args(["govern_max_draining", "govern_max_age"])))]
#[command(next_help_heading = "Generation governor (off unless a limit is given)")]
pub struct GovernorArgs {
    /// Signal the oldest draining generations of a listener once more than
    /// N of its generations drain (0 to 1000). Risk: the signal cuts the
    /// connections those generations still hold.
    ///
    /// A generation is signalled once: one that ignores the signal still
    /// counts, and no newer one is signalled in its place. Only generations
    /// the monitor is sure drain are signalled, and only while a newer
    /// generation of the listener serves; never pid 1, kernel threads or
    /// gracewatch and its ancestors.
    #[arg(long, value_name = "N", value_parser = parse_max_draining)]
    pub govern_max_draining: Option<u32>,
    /// Signal a generation that has been draining for this long (`90s`,
    /// `10m`): from when it stopped accepting. Same risk and rules as
    /// --govern-max-draining.
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    pub govern_max_age: Option<Duration>,
    /// The governor's signal [default: TERM] (`QUIT`, `SIGKILL`, `15`…).
    #[arg(long, value_name = "SIG", value_parser = parse_signal, requires = "govern_limit")]
    pub govern_signal: Option<SignalSpec>,
    /// Govern only listeners on this local port (repeatable; default: every
    /// listener the agent sees).
    #[arg(long = "govern-port", value_name = "PORT", value_parser = parse_port, requires = "govern_limit")]
    pub govern_ports: Vec<u16>,
}

fn parse_max_draining(s: &str) -> Result<u32, String> {
    s.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| *n <= MAX_DRAINING_LIMIT)
        .ok_or_else(|| format!("`{s}` is not a number of generations (0 to {MAX_DRAINING_LIMIT})"))
}

fn parse_signal(s: &str) -> Result<SignalSpec, String> {
    s.parse()
}

impl GovernorArgs {
    /// The governor these options ask for (`None`: no limit, no governor).
    pub fn governor(&self) -> Option<Governor> {
        if self.govern_max_draining.is_none() && self.govern_max_age.is_none() {
            return None;
        }
        let rules = GovernorRules {
            max_draining: self.govern_max_draining,
            max_age: self.govern_max_age,
            ports: self.govern_ports.clone(),
        };
        Some(Governor::new(
            rules,
            self.govern_signal.unwrap_or(SignalSpec::TERM),
        ))
    }
}

/// Runs `governor` on every status of `handle` until the agent shuts down.
pub(super) fn spawn(shared: Arc<Shared>, handle: &MonitorHandle, mut governor: Governor) {
    shared.metrics.governor_on();
    let mut statuses = handle.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    let ages = governor.rules().max_age.is_some();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut latest = (statuses.borrow_and_update().clone(), Instant::now());
        loop {
            tokio::select! {
                changed = statuses.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    latest = (statuses.borrow_and_update().clone(), Instant::now());
                }
                _ = tick.tick(), if ages => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            // The status's clock, moved on by the time since it came.
            let elapsed = u64::try_from(latest.1.elapsed().as_millis()).unwrap_or(u64::MAX);
            let now_ms = latest.0.uptime_ms.saturating_add(elapsed);
            for action in governor.step(&latest.0, now_ms) {
                report(&shared, &governor, &action);
            }
        }
    });
}

/// The line the agent prints when the governor starts.
pub(super) fn summary(governor: &Governor) -> String {
    let rules = governor.rules();
    let mut limits = Vec::new();
    if let Some(n) = rules.max_draining {
        limits.push(format!(
            "the oldest draining generations beyond {n} per listener"
        ));
    }
    if let Some(age) = rules.max_age {
        limits.push(format!("a generation draining for {age:?}"));
    }
    let scope = if rules.ports.is_empty() {
        "every listener".to_owned()
    } else {
        let ports: Vec<String> = rules.ports.iter().map(u16::to_string).collect();
        format!("listeners on port {}", ports.join(", "))
    };
    format!(
        "governor on: {} to {}, on {scope}",
        governor.signal(),
        limits.join(" and to ")
    )
}

/// One line on stderr, and the counters.
fn report(shared: &Shared, governor: &Governor, action: &Action) {
    eprintln!("gracewatch: governor: {}", describe(governor, action));
    shared.events.publish_line(event_line(action));
    match action.outcome {
        ActionOutcome::Delivered => shared.metrics.governor_action(action.decision.reason, true),
        ActionOutcome::Failed(_) => shared
            .metrics
            .governor_action(action.decision.reason, false),
        ActionOutcome::Exited => {}
    }
}

/// The `/v1/events` line of an action (`kind: governor`, see
/// `schema/event.schema.json`).
fn event_line(action: &Action) -> Arc<str> {
    let d = &action.decision;
    let (outcome, error) = match &action.outcome {
        ActionOutcome::Delivered => ("signalled", None),
        ActionOutcome::Exited => ("exited", None),
        ActionOutcome::Failed(why) => ("failed", Some(why.as_str())),
    };
    let v = serde_json::json!({
        "kind": "governor",
        "pid": d.pid,
        "comm": d.comm,
        "listener": { "netns": d.netns, "local": d.listener.to_string() },
        "reason": d.reason.code(),
        "signal": action.signal.name(),
        "outcome": outcome,
        "error": error,
        "draining": d.draining,
        "draining_ms": d.draining_ms,
    });
    format!("{v}\n").into()
}

/// What a log line says: what was done to whom, on which listener, why.
fn describe(governor: &Governor, action: &Action) -> String {
    let d = &action.decision;
    let who = format!("pid {} ({})", d.pid, terminal_safe(&d.comm));
    let limit = match d.reason {
        Reason::MaxDraining => format!(
            "{} generations draining, more than --govern-max-draining {}",
            d.draining,
            governor.rules().max_draining.unwrap_or_default()
        ),
        Reason::MaxAge => format!(
            "draining for {:.1}s, --govern-max-age {:?}",
            d.draining_ms as f64 / 1000.0,
            governor.rules().max_age.unwrap_or_default()
        ),
    };
    let whom = format!(
        "{who}, a draining generation of {} (netns {})",
        d.listener, d.netns
    );
    let reason = d.reason.code();
    match &action.outcome {
        ActionOutcome::Delivered => {
            format!("sent {} to {whom}: {reason}: {limit}", action.signal)
        }
        ActionOutcome::Exited => format!(
            "{whom} exited before {} was sent: {reason}: {limit}",
            action.signal
        ),
        ActionOutcome::Failed(why) => format!(
            "did not send {} to {whom}: {}: {reason}: {limit}",
            action.signal,
            terminal_safe(why)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governor::Decision;

    #[test]
    fn a_log_line_names_pid_comm_listener_and_reason() {
        let gov = GovernorArgs {
            govern_max_draining: Some(2),
            ..GovernorArgs::default()
        }
        .governor()
        .expect("a limit: a governor");
        let action = Action {
            decision: Decision {
                pid: 4211,
                comm: "srv\u{1b}[2J".to_owned(),
                netns: 4026531840,
                listener: "127.0.0.1:8080".parse().expect("addr"),
                reason: Reason::MaxDraining,
                draining: 3,
                draining_ms: 1500,
            },
            signal: SignalSpec::TERM,
            outcome: ActionOutcome::Delivered,
        };
        let line = describe(&gov, &action);
        assert_eq!(
            line,
            "sent SIGTERM to pid 4211 (srv\\x1b[2J), a draining generation of 127.0.0.1:8080 (netns 4026531840): max_draining: 3 generations draining, more than --govern-max-draining 2"
        );
        let v: serde_json::Value = serde_json::from_str(&event_line(&action)).expect("a JSON line");
        assert_eq!(
            v,
            serde_json::json!({"kind": "governor", "pid": 4211, "comm": "srv\u{1b}[2J",
                "listener": {"netns": 4026531840u32, "local": "127.0.0.1:8080"},
                "reason": "max_draining", "signal": "SIGTERM", "outcome": "signalled",
                "error": null, "draining": 3, "draining_ms": 1500})
        );
        assert!(GovernorArgs::default().governor().is_none());
        assert_eq!(parse_max_draining("1000"), Ok(1000));
        assert!(parse_max_draining("1001").is_err());
        assert!(parse_max_draining("-1").is_err());
    }
}
