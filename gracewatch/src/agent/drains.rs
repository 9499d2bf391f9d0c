//! Drains requested over HTTP: the JSON request ([`DrainRequest`]) and how
//! it maps onto the same [`TargetSpec`]/[`DrainSpec`] as `gracewatch drain`,
//! the per-drain state ([`DrainStatus`]) clients poll or stream, and the
//! registry that runs each drain as a task and keeps its report.

use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::{oneshot, watch},
    time::Instant,
};

use crate::{
    drain::{self, DrainReport, DrainSpec, OnTimeout, Progress, SignalSpec, TargetSpec, Targets},
    input::{MAX_PEER_RULES, check_pid, parse_duration, parse_peer_rule, parse_timeout},
    monitor::MonitorHandle,
};

/// Drains running at once; more is refused with 429 (each holds pidfds
/// and wakes on every status).
pub const MAX_RUNNING: usize = 64;
/// Finished drains kept for `GET /v1/drains/{id}`; the oldest go first.
const MAX_KEPT: usize = 256;

/// `POST /v1/drains`: the options of `gracewatch drain`, as JSON. Durations
/// are strings as on the command line (`"90s"`, `"2m"`, `"1500ms"`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// Target processes (pids as the agent sees them).
    #[serde(default)]
    pub pids: Vec<u32>,
    /// A file holding a pid, read by the agent (on the agent's filesystem).
    #[serde(default)]
    pub pidfile: Option<PathBuf>,
    /// Also drain the targets' descendants as they are now.
    #[serde(default)]
    pub children: bool,
    /// Leave these (and their descendants) out.
    #[serde(default)]
    pub exclude: Vec<u32>,
    /// Count only connections on these local ports (empty: all).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Signal to send once drained: `TERM` (default), `SIGQUIT`, `15`… or
    /// `none` to only wait.
    #[serde(default)]
    pub signal: Option<String>,
    /// Give up after this long (default: never).
    #[serde(default)]
    pub timeout: Option<String>,
    /// What to do when `timeout` passes: `leave` (default), `signal`, `kill`.
    #[serde(default)]
    pub on_timeout: OnTimeout,
    /// Never signal before this much time has passed, even at zero.
    #[serde(default)]
    pub min_wait: Option<String>,
    /// Drained only after this long without a new connection too (see
    /// `--quiet-for`); default `"0s"`: off. Left out of a serialised
    /// request when unset, so older agents take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_for: Option<String>,
    /// Peers whose connections do not hold the drain (see
    /// `--exclude-peer`): `["127.0.0.9", "10.0.0.0/8:9100"]`, at most 64.
    /// Left out of a serialised request when empty, so older agents take it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_peer: Vec<String>,
    /// Drained also once every live connection left has been idle this
    /// long with nothing in flight (see `--until-idle`); default: off.
    /// Left out of a serialised request when unset, so older agents take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_idle: Option<String>,
    /// Trust a pidfile that root does not own, that group or others can
    /// write, or whose owner does not own the process it names.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_unsafe_pidfile: bool,
    /// Allow pid 1, kernel threads, the agent itself and its ancestors, and
    /// `children` of pid 1 as targets.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_dangerous_target: bool,
}

impl DrainRequest {
    /// Validates the request into the specs the drain gate takes. `Err` is
    /// a message for a 400 answer.
    pub fn to_specs(&self) -> Result<(TargetSpec, DrainSpec), String> {
        if self.pids.is_empty() && self.pidfile.is_none() {
            return Err("no target: give \"pids\" or \"pidfile\"".to_owned());
        }
        let signal = match self.signal.as_deref() {
            None => Some(SignalSpec::TERM),
            Some(s) => SignalSpec::parse_optional(s).map_err(|e| format!("signal: {e}"))?,
        };
        // Bounded at parse time (crate::input), like the command line.
        let duration = |field: &str,
                        value: &Option<String>,
                        parse: fn(&str) -> Result<Duration, String>|
         -> Result<Option<Duration>, String> {
            let Some(s) = value else { return Ok(None) };
            parse(s).map(Some).map_err(|e| format!("{field}: {e}"))
        };
        let timeout = duration("timeout", &self.timeout, parse_timeout)?;
        let min_wait = duration("min_wait", &self.min_wait, parse_duration)?.unwrap_or_default();
        let quiet_for = duration("quiet_for", &self.quiet_for, parse_duration)?.unwrap_or_default();
        let until_idle = duration("until_idle", &self.until_idle, parse_duration)?;
        for &pid in self.pids.iter().chain(&self.exclude) {
            check_pid(pid)?;
        }
        if self.ports.contains(&0) {
            return Err("ports: port 0 is not a port a connection can use (1 to 65535)".to_owned());
        }
        if self.exclude_peer.len() > MAX_PEER_RULES {
            return Err(format!(
                "exclude_peer: {} rules, at most {MAX_PEER_RULES} (use a CIDR to cover many peers)",
                self.exclude_peer.len()
            ));
        }
        let exclude_peers = self
            .exclude_peer
            .iter()
            .map(|r| parse_peer_rule(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("exclude_peer: {e}"))?;
        let spec = DrainSpec {
            ports: self.ports.clone(),
            signal,
            timeout,
            on_timeout: self.on_timeout,
            min_wait,
            quiet_for,
            exclude_peers,
            until_idle,
        };
        let targets = TargetSpec {
            pids: self.pids.clone(),
            pidfile: self.pidfile.clone(),
            children: self.children,
            exclude: self.exclude.clone(),
            allow_unsafe_pidfile: self.allow_unsafe_pidfile,
            allow_dangerous_target: self.allow_dangerous_target,
            wait_only: !spec.can_signal(),
        };
        Ok((targets, spec))
    }
}

/// Whether a drain is still running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainState {
    Running,
    Done,
}

/// `GET /v1/drains/{id}`: where a drain stands. `report` is set once
/// `state` is `done`; its `outcome` and `exit_code` are those of
/// `gracewatch drain`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrainStatus {
    pub id: String,
    pub state: DrainState,
    /// The pids being drained (descendants included), pinned at the start.
    pub targets: Vec<u32>,
    pub elapsed_ms: u64,
    /// The latest progress event (as `gracewatch drain --json` prints them).
    pub progress: Option<Progress>,
    /// Serialised with its `exit_code` ([`crate::exit::ReportJson`]).
    #[serde(serialize_with = "crate::exit::serialize_report")]
    pub report: Option<DrainReport>,
}

/// One drain: its live progress and, once done, its report.
pub(crate) struct Entry {
    pub(crate) id: String,
    targets: Vec<u32>,
    started: Instant,
    pub(crate) progress: watch::Sender<Option<Progress>>,
    pub(crate) report: watch::Sender<Option<DrainReport>>,
    cancel: Mutex<Option<oneshot::Sender<()>>>,
}

impl Entry {
    pub(crate) fn status(&self) -> DrainStatus {
        let report = self.report.borrow().clone();
        DrainStatus {
            id: self.id.clone(),
            state: if report.is_some() {
                DrainState::Done
            } else {
                DrainState::Running
            },
            targets: self.targets.clone(),
            elapsed_ms: report.as_ref().map_or_else(
                || self.started.elapsed().as_millis() as u64,
                |r| r.duration_ms,
            ),
            progress: self.progress.borrow().clone(),
            report,
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.report.borrow().is_some()
    }

    /// Stops the drain without signalling (its outcome becomes `interrupted`).
    pub(crate) fn cancel(&self) {
        let tx = self.cancel.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
    }

    /// Waits until the drain is done or `limit` passes.
    pub(crate) async fn wait_done(&self, limit: Duration) {
        let mut rx = self.report.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await;
    }
}

/// Every drain this agent ran or runs, by id, oldest first.
pub(crate) struct Drains {
    /// Makes ids unique across agent restarts, so a client polling an id
    /// never gets another run's drain.
    prefix: String,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    entries: VecDeque<Arc<Entry>>,
}

impl Drains {
    pub(crate) fn new() -> Self {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            prefix: format!("{epoch:x}"),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.lock().entries.iter().find(|e| e.id == id).cloned()
    }

    pub(crate) fn all(&self) -> Vec<Arc<Entry>> {
        self.lock().entries.iter().cloned().collect()
    }

    pub(crate) fn running(&self) -> usize {
        self.lock().entries.iter().filter(|e| !e.is_done()).count()
    }

    /// Starts a drain task; `on_done` sees its report before clients do.
    /// `None` when [`MAX_RUNNING`] drains already run.
    pub(crate) fn start(
        &self,
        handle: MonitorHandle,
        targets: Targets,
        spec: DrainSpec,
        on_done: impl FnOnce(&DrainReport) + Send + 'static,
    ) -> Option<Arc<Entry>> {
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let entry = {
            let mut inner = self.lock();
            if inner.entries.iter().filter(|e| !e.is_done()).count() >= MAX_RUNNING {
                return None;
            }
            inner.next += 1;
            let entry = Arc::new(Entry {
                id: format!("{}-{}", self.prefix, inner.next),
                targets: targets.pids(),
                started: Instant::now(),
                progress: watch::channel(None).0,
                report: watch::channel(None).0,
                cancel: Mutex::new(Some(cancel_tx)),
            });
            inner.entries.push_back(entry.clone());
            while inner.entries.len() > MAX_KEPT {
                match inner.entries.iter().position(|e| e.is_done()) {
                    Some(i) => {
                        inner.entries.remove(i);
                    }
                    None => break,
                }
            }
            entry
        };
        let task = entry.clone();
        tokio::spawn(async move {
            // A dropped sender (the entry went away) also ends the drain.
            let cancel = async move {
                let _ = cancel_rx.await;
            };
            let progress = task.progress.clone();
            let report = drain::run(
                &handle,
                targets,
                &spec,
                move |p| {
                    progress.send_replace(Some(p.clone()));
                },
                cancel,
            )
            .await;
            on_done(&report);
            task.report.send_replace(Some(report));
            task.cancel.lock().unwrap_or_else(|e| e.into_inner()).take();
        });
        Some(entry)
    }

    /// Cancels every running drain (agent shutdown) and waits up to `limit`
    /// for their reports.
    pub(crate) async fn cancel_all(&self, limit: Duration) {
        let running: Vec<Arc<Entry>> = self.all().into_iter().filter(|e| !e.is_done()).collect();
        for e in &running {
            e.cancel();
        }
        let deadline = Instant::now() + limit;
        for e in running {
            e.wait_done(deadline.saturating_duration_since(Instant::now()))
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> Result<DrainRequest, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_the_cli() {
        let (targets, spec) = request(r#"{"pids": [42]}"#)
            .expect("parses")
            .to_specs()
            .expect("valid");
        assert_eq!(targets.pids, vec![42]);
        assert_eq!(spec, DrainSpec::default());
    }

    #[test]
    fn every_field_maps_onto_the_specs() {
        let req = request(
            r#"{"pids": [1, 2], "pidfile": "/run/x.pid", "children": true, "exclude": [3],
                "ports": [80, 443], "signal": "QUIT", "timeout": "90s",
                "on_timeout": "kill", "min_wait": "1500ms", "quiet_for": "2s",
                "exclude_peer": ["127.0.0.9", "[::1]:9100"], "until_idle": "30s"}"#,
        )
        .expect("parses");
        let (targets, spec) = req.to_specs().expect("valid");
        assert_eq!(
            targets,
            TargetSpec {
                pids: vec![1, 2],
                pidfile: Some("/run/x.pid".into()),
                children: true,
                exclude: vec![3],
                ..TargetSpec::default()
            }
        );
        let allowed = request(
            r#"{"pids": [1], "allow_unsafe_pidfile": true, "allow_dangerous_target": true}"#,
        )
        .expect("parses");
        let (targets, _) = allowed.to_specs().expect("valid");
        assert!(targets.allow_unsafe_pidfile && targets.allow_dangerous_target);
        assert!(
            !targets.wait_only,
            "TERM by default: the target policy applies"
        );
        for (json, wait_only) in [
            (r#"{"pids": [1], "signal": "none"}"#, true),
            (
                r#"{"pids": [1], "signal": "none", "timeout": "5s", "on_timeout": "signal"}"#,
                true,
            ),
            (
                r#"{"pids": [1], "signal": "none", "timeout": "5s", "on_timeout": "kill"}"#,
                false,
            ),
            (r#"{"pids": [1], "signal": "CONT"}"#, false),
        ] {
            let (targets, _) = request(json).expect("parses").to_specs().expect("valid");
            assert_eq!(targets.wait_only, wait_only, "{json}");
        }
        assert_eq!(spec.ports, vec![80, 443]);
        assert_eq!(
            spec.signal.map(SignalSpec::name).as_deref(),
            Some("SIGQUIT")
        );
        assert_eq!(spec.timeout, Some(Duration::from_secs(90)));
        assert_eq!(spec.on_timeout, OnTimeout::Kill);
        assert_eq!(spec.min_wait, Duration::from_millis(1500));
        assert_eq!(spec.quiet_for, Duration::from_secs(2));
        assert_eq!(spec.until_idle, Some(Duration::from_secs(30)));
        let rules: Vec<String> = spec.exclude_peers.iter().map(ToString::to_string).collect();
        assert_eq!(rules, ["127.0.0.9", "[::1]:9100"]);
        // Unset: off, and left out when the client serialises it.
        let plain = request(r#"{"pids": [1]}"#).expect("parses");
        assert_eq!(plain.to_specs().expect("valid").1.quiet_for, Duration::ZERO);
        let sent = serde_json::to_value(&plain).expect("serialises");
        assert!(sent.get("quiet_for").is_none(), "{sent}");
        assert!(sent.get("until_idle").is_none(), "{sent}");
        assert_eq!(plain.to_specs().expect("valid").1.until_idle, None);
        assert!(sent.get("exclude_peer").is_none(), "{sent}");
        let none = request(r#"{"pids": [1], "signal": "none"}"#).expect("parses");
        assert_eq!(none.to_specs().expect("valid").1.signal, None);
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        for (json, why) in [
            (r#"{"pids": [1], "color": "red"}"#, "unknown field"),
            (r#"{"pids": "1"}"#, "invalid type"),
            (r#"{"pids": [-1]}"#, "invalid value"),
            (r#"{"pids": [1], "ports": [70000]}"#, "invalid value"),
            (
                r#"{"pids": [1], "on_timeout": "explode"}"#,
                "unknown variant",
            ),
            (r#"{"pids": [1], "timeout": 90}"#, "invalid type"),
            ("{", "EOF"),
        ] {
            let err = request(json).expect_err(json);
            assert!(err.contains(why), "{json}: {err}");
        }
        for (json, why) in [
            ("{}", "no target"),
            (r#"{"pids": [1], "signal": "TERMINATE"}"#, "signal"),
            (r#"{"pids": [1], "timeout": "soon"}"#, "timeout"),
            (r#"{"pids": [1], "timeout": "-1s"}"#, "timeout"),
            (r#"{"pids": [1], "min_wait": "10x"}"#, "min_wait"),
            (
                r#"{"pids": [1], "timeout": "99999999999999999999h"}"#,
                "timeout",
            ),
            (r#"{"pids": [1], "timeout": "400d"}"#, "timeout"),
            (
                r#"{"pids": [1], "timeout": "10000000000000000000s"}"#,
                "timeout",
            ),
            (
                r#"{"pids": [1], "min_wait": "10000000000000000000s"}"#,
                "min_wait",
            ),
            (r#"{"pids": [1], "min_wait": "8785h"}"#, "min_wait"),
            (r#"{"pids": [1], "quiet_for": "-1s"}"#, "quiet_for"),
            (r#"{"pids": [1], "quiet_for": "soon"}"#, "quiet_for"),
            (r#"{"pids": [1], "until_idle": "soon"}"#, "until_idle"),
            (r#"{"pids": [1], "timeout": "0s"}"#, "timeout"),
            (r#"{"pids": [0]}"#, "pid 0"),
            (r#"{"pids": [2147483648]}"#, "pid 2147483648"),
            (r#"{"pids": [4194305]}"#, "out of range"),
            (r#"{"pids": [5], "exclude": [4294967295]}"#, "out of range"),
            (r#"{"pids": [5], "ports": [0]}"#, "port 0"),
            (
                r#"{"pids": [5], "exclude_peer": ["bogus"]}"#,
                "exclude_peer: `bogus`",
            ),
            (
                r#"{"pids": [5], "exclude_peer": ["10.0.0.1/8"]}"#,
                "did you mean",
            ),
            (
                r#"{"pids": [5], "exclude_peer": ["0.0.0.0/0"]}"#,
                "every peer",
            ),
            (r#"{"pids": [5], "exclude_peer": [""]}"#, "exclude_peer"),
        ] {
            let err = request(json).expect("parses").to_specs().expect_err(json);
            assert!(err.contains(why), "{json}: {err}");
        }
    }
}
