//! The JSON Schema checks of gracewatch's output: every JSON object a test
//! reads is validated against the documented contract in
//! `gracewatch/schema/` ([`Schema::check`]), so a renamed, missing, extra or
//! mistyped key fails the test that saw it. The tests themselves assert
//! the exact values.

use std::sync::OnceLock;

use serde_json::Value;

/// One documented JSON contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schema {
    /// `status --json`, each `watch --json` line, the agent's `/v1/status`.
    Status,
    /// Each `drain --json` / `wait --json` line (progress or result).
    Drain,
    /// The agent's `GET /v1/drains/{id}` answer (`#/$defs/agent_drain` of
    /// the drain schema).
    AgentDrain,
    /// Each line of `record`, of the agent's `/v1/events` and of
    /// `watch --json --events`.
    Event,
    /// The agent's `/v1/restarts` answer.
    Restarts,
    /// `connections --json` and the agent's `/v1/connections`.
    Connections,
    /// `connections --by-peer --json` and the agent's `/v1/peers`.
    Peers,
}

const STATUS: &str = include_str!("../../gracewatch/schema/status.schema.json");
const DRAIN: &str = include_str!("../../gracewatch/schema/drain.schema.json");
const EVENT: &str = include_str!("../../gracewatch/schema/event.schema.json");
const RESTARTS: &str = include_str!("../../gracewatch/schema/restarts.schema.json");
const CONNECTIONS: &str = include_str!("../../gracewatch/schema/connections.schema.json");
const PEERS: &str = include_str!("../../gracewatch/schema/peers.schema.json");

impl Schema {
    pub const ALL: [Schema; 7] = [
        Schema::Status,
        Schema::Drain,
        Schema::AgentDrain,
        Schema::Event,
        Schema::Restarts,
        Schema::Connections,
        Schema::Peers,
    ];

    /// Checks `v`; `Err` lists every violation with where it is.
    pub fn check(self, v: &Value) -> Result<(), String> {
        let errors: Vec<String> = self
            .validator()
            .iter_errors(v)
            .map(|e| {
                let at = e.instance_path.to_string();
                let at = if at.is_empty() { "/".to_owned() } else { at };
                format!("{at}: {e}")
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn validator(self) -> &'static jsonschema::Validator {
        static CELLS: [OnceLock<jsonschema::Validator>; 7] = [const { OnceLock::new() }; 7];
        let i = Schema::ALL.iter().position(|&s| s == self).unwrap_or(0);
        CELLS[i].get_or_init(|| {
            let schema = self.document();
            jsonschema::draft202012::new(&schema)
                .unwrap_or_else(|e| panic!("the {self:?} schema is not a valid JSON Schema: {e}"))
        })
    }

    /// The schema document this check validates against.
    fn document(self) -> Value {
        let parse = |text: &str| -> Value {
            serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("the {self:?} schema is not JSON: {e}"))
        };
        match self {
            Schema::Status => parse(STATUS),
            Schema::Drain => parse(DRAIN),
            Schema::Event => parse(EVENT),
            Schema::Restarts => parse(RESTARTS),
            Schema::Connections => parse(CONNECTIONS),
            Schema::Peers => parse(PEERS),
            // The drain document, entered at its `agent_drain` definition.
            Schema::AgentDrain => {
                let mut doc = parse(DRAIN);
                if let Some(root) = doc.as_object_mut() {
                    root.remove("oneOf");
                    root.insert("$ref".to_owned(), "#/$defs/agent_drain".into());
                }
                doc
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Real output of the debug binary (a server in a network namespace
    /// holding one connection), one or more samples per schema.
    fn samples(schema: Schema) -> Vec<Value> {
        let held = json!({"age_ms": 3018, "local": "127.0.0.1:9912", "peer": "127.0.0.1:51604", "pid": 16729, "idle_ms": 2950, "in_flight": false});
        let unread = json!({"age_ms": 1008, "local": "127.0.0.1:9912", "peer": "127.0.0.1:51604", "pid": 16729, "idle_ms": null, "in_flight": null});
        let named = json!({"peer": "127.0.0.1", "prefix_len": 32, "addresses": 1, "connections": 3, "oldest_age_ms": 3018,
            "peer_processes": [{"pid": 16801, "comm": "peer-a", "container_id": null, "cgroup": "/user.slice", "connections": 2},
                          {"pid": 16802, "comm": "peer-b", "container_id": "4f1c2a", "cgroup": "/system.slice/docker-4f1c2a.scope", "connections": 1}],
            "unnamed": 0});
        let unnamed = json!({"peer": "10.1.2.0/24", "prefix_len": 24, "addresses": 2, "connections": 2, "oldest_age_ms": 120, "peer_processes": null, "unnamed": null});
        let progress = json!({"peers": [unnamed.clone()], "accepted_last_10s": 0, "closes_per_sec": 0.0, "elapsed_ms": 1008, "eta_ms": null, "live": 1, "message": "pid 16729 (python3): 1 live, 0.0 closes/s, oldest 1.0s from 127.0.0.1:51604", "oldest": held});
        let report = json!({"duration_ms": 3001, "exit_code": 124, "held": [held], "initial_live": 1, "message": "deadline passed: pid 16729 still held 1 live connection(s); nothing was signalled", "outcome": "timeout", "peak_live": 1, "signal_sent": null, "still_held": 1, "targets": [16729], "ended_by": null, "excluded": [], "idle": [], "peers": [named.clone(), unnamed.clone()]});
        let typed = |v: &Value, ty: &str| {
            let mut v = v.clone();
            v["type"] = ty.into();
            v
        };
        let tuple =
            json!({"netns": 4026532178u32, "local": "127.0.0.1:9911", "remote": "127.0.0.1:52794"});
        let at = json!({"secs": 11211, "nanos": 84934454});
        match schema {
            Schema::Status => vec![json!({
                "schema": "gracewatch.status.v2", "uptime_ms": 1440,
                "processes": [{"pid": 18084, "comm": "python3", "live": 1, "listeners": ["127.0.0.1:9913"], "accepted_total": 0, "closed_total": 0, "oldest_live_ms": 20, "role": "serving", "role_since_ms": 0, "cgroup": "/system.slice/app.service", "container_id": null, "pod_uid": null}],
                "listeners": [{"netns": 4026532178u32, "address": "127.0.0.1:9913", "family": "ipv4", "holders": [{"pid": 18084, "comm": "python3", "live": 1}], "accept_queue": 0, "accepted_total": 0, "queue_drops_total": 0,
                    "generations": [{"pid": 18080, "comm": "python3", "role": "exited", "role_since_ms": 1200, "live": 0}, {"pid": 18084, "comm": "python3", "role": "serving", "role_since_ms": 0, "live": 1}]}],
                "lost_events": 0, "map_full_total": 0
            })],
            Schema::Drain => vec![
                typed(&progress, "progress"),
                typed(&report, "result"),
                json!({"type": "progress", "peers": [], "accepted_last_10s": 0, "closes_per_sec": 0.0, "elapsed_ms": 1208, "eta_ms": null, "live": 3, "message": "pid 16729 (python3): 3 live, 0.0 closes/s, oldest 1.2s from 127.0.0.1:51604; until idle: 1 in flight, 2 idle for ≥80 ms, waiting for 2s idle with nothing in flight", "oldest": unread}),
                json!({"type": "result", "duration_ms": 6012, "exit_code": 0, "held": [], "initial_live": 3, "message": "pid 16729 drained in 6.0s (peak 3 live); sent SIGTERM to pid 16729 (python3); ended by --until-idle with 3 live connection(s) left, every one idle for at least 2s with nothing in flight (the signal cuts them)", "outcome": "drained", "peak_live": 3, "signal_sent": "SIGTERM", "still_held": 0, "targets": [16729], "ended_by": "idle", "excluded": [], "peers": [],
                    "idle": [{"pid": 16729, "local": "127.0.0.1:9912", "peer": "127.0.0.1:51606", "idle_ms": 2003, "age_ms": 6100}, {"pid": 16729, "local": "127.0.0.1:9912", "peer": "127.0.0.1:51604", "idle_ms": 5870, "age_ms": null}]}),
            ],
            Schema::AgentDrain => vec![
                json!({"elapsed_ms": 1280, "id": "6b0efc1f-1", "progress": progress, "report": null, "state": "running", "targets": [18084]}),
                json!({"elapsed_ms": 3001, "id": "6b0efc1f-1", "progress": progress, "report": report, "state": "done", "targets": [18084]}),
            ],
            Schema::Event => vec![
                json!({"kind": "handshake", "at": at, "sk": 11137627865198403777u64, "tuple": tuple}),
                json!({"kind": "accept", "at": at, "sk": 11137627865198403777u64, "tuple": tuple, "pid": 16229, "comm": "python3", "was_queued": true}),
                json!({"kind": "close", "at": at, "sk": 11137627865198403777u64, "tuple": tuple, "pid": 16229, "by_exit": false}),
                json!({"kind": "listen_start", "at": at, "sk": 7, "addr": {"netns": 4026532178u32, "local": "[::]:9911"}, "pid": 16229, "comm": "python3"}),
                json!({"kind": "lost", "at": at, "total": 3}),
                json!({"kind": "handover", "at": at, "pid": 16330, "comm": "python3", "listener": {"netns": 4026532178u32, "local": "127.0.0.1:9911"}, "alongside": [16229]}),
                json!({"kind": "draining", "at": at, "pid": 16229, "comm": "python3", "why": "closed_its_listener", "live": 3}),
                json!({"kind": "drained", "at": at, "pid": 16229, "comm": "python3", "why": "reached_zero", "took_ms": 1200, "from_live": 3}),
                json!({"kind": "drained", "at": at, "pid": 16229, "comm": "python3", "why": "holds_nothing", "took_ms": null, "from_live": null}),
                json!({"kind": "governor", "pid": 16229, "comm": "python3", "listener": {"netns": 4026532178u32, "local": "127.0.0.1:9911"}, "reason": "max_draining", "signal": "SIGTERM", "outcome": "signalled", "error": null, "draining": 3, "draining_ms": 2100}),
                json!({"kind": "governor", "pid": 16229, "comm": "python3", "listener": {"netns": 4026532178u32, "local": "127.0.0.1:9911"}, "reason": "max_age", "signal": "SIGQUIT", "outcome": "failed", "error": "pid 16229 (python3) is a kernel thread: refused", "draining": 1, "draining_ms": 600000}),
                json!({"kind": "lagged", "skipped": 1, "message": "this reader fell behind"}),
            ],
            Schema::Restarts => vec![json!({
                "schema": "gracewatch.restarts.v1", "as_of_ms": 9100,
                "restarts": [
                    {"id": 7, "pid": 16229, "comm": "python3", "listeners": [{"netns": 4026532178u32, "local": "127.0.0.1:9911"}], "why": "another_accepts",
                     "started_ms": 5000, "ended_ms": 7100, "duration_ms": 2100, "outcome": "drained", "from_live": 3, "dropped": 0,
                     "timeline": [{"at_ms": 5000, "role": "draining", "why": "another_accepts", "live": 3}, {"at_ms": 7100, "role": "drained", "why": "reached_zero", "live": 0}]},
                    {"id": 3, "pid": 16100, "comm": "python3", "listeners": [], "why": "drain_started",
                     "started_ms": 1000, "ended_ms": null, "duration_ms": 8100, "outcome": "ongoing", "from_live": 1, "dropped": 0,
                     "timeline": [{"at_ms": 1000, "role": "draining", "why": "drain_started", "live": 1}]}
                ]
            })],
            Schema::Peers => vec![json!({
                "schema": "gracewatch.peers.v1", "pids": [16729], "total": 5, "other": 0, "max_groups": 32,
                "groups": [named, unnamed],
                "walk": {"looked_up": 5, "local_ends": 3, "named": 3, "processes_read": 9, "socket_fds_read": 21, "bounded": false, "took_ms": 22}
            })],
            Schema::Connections => vec![json!({
                "schema": "gracewatch.connections.v1", "pids": [16729], "total": 2, "max_listed": 4096,
                "connections": [
                    {"pid": 16729, "netns": 4026532178u32, "local": "127.0.0.1:9912", "peer": "127.0.0.1:51604", "age_ms": 3018,
                     "activity": {"idle_ms": 1402, "last_sent_ms": 1402, "last_recv_ms": 1410, "in_flight": true, "unread_bytes": 0, "unacked_bytes": 0, "unsent_bytes": 4063232}},
                    {"pid": 16729, "netns": 4026532178u32, "local": "127.0.0.1:9912", "peer": "hidden", "age_ms": 20, "activity": null}
                ]
            })],
        }
    }

    /// Every leaf-holding object key of `v`, as a path of keys and indices.
    fn key_paths(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match v {
            Value::Object(map) => {
                for (k, x) in map {
                    at.push(k.clone());
                    out.push(at.clone());
                    key_paths(x, at, out);
                    at.pop();
                }
            }
            Value::Array(items) => {
                for (i, x) in items.iter().enumerate() {
                    at.push(i.to_string());
                    key_paths(x, at, out);
                    at.pop();
                }
            }
            _ => {}
        }
    }

    fn parent_mut<'a>(v: &'a mut Value, path: &[String]) -> &'a mut Value {
        path.iter().fold(v, |v, k| match v {
            Value::Array(items) => &mut items[k.parse::<usize>().expect("index")],
            other => &mut other[k.as_str()],
        })
    }

    #[test]
    fn every_schema_accepts_real_output() {
        for schema in Schema::ALL {
            for sample in samples(schema) {
                assert_eq!(schema.check(&sample), Ok(()), "{schema:?}: {sample}");
            }
        }
    }

    #[test]
    fn every_schema_rejects_a_missing_or_unknown_key_anywhere() {
        for schema in Schema::ALL {
            for sample in samples(schema) {
                let mut paths = Vec::new();
                key_paths(&sample, &mut Vec::new(), &mut paths);
                for path in paths {
                    let (key, parent) = path.split_last().expect("a key");
                    // `tuple.remote` is optional: the agent hides it.
                    if key == "remote" {
                        continue;
                    }
                    let mut missing = sample.clone();
                    let obj = parent_mut(&mut missing, parent);
                    let value = obj
                        .as_object_mut()
                        .and_then(|o| o.remove(key))
                        .expect("the key");
                    assert!(
                        schema.check(&missing).is_err(),
                        "{schema:?} accepts a sample without {path:?}: {missing}"
                    );
                    // The same key renamed: missing and unknown at once.
                    let obj = parent_mut(&mut missing, parent);
                    obj[format!("{key}_renamed")] = value;
                    assert!(
                        schema.check(&missing).is_err(),
                        "{schema:?} accepts {path:?} renamed: {missing}"
                    );
                }
            }
        }
    }

    #[test]
    fn schemas_reject_wrong_values() {
        let mut status = samples(Schema::Status).remove(0);
        status["listeners"][0]["family"] = "ipx".into();
        assert!(Schema::Status.check(&status).is_err());
        let mut result = samples(Schema::Drain).remove(1);
        result["outcome"] = "drained_ish".into();
        assert!(Schema::Drain.check(&result).is_err());
        result["outcome"] = "drained".into();
        result["signal_sent"] = "TERM".into();
        assert!(Schema::Drain.check(&result).is_err());
        result["signal_sent"] = "SIGTERM".into();
        assert_eq!(Schema::Drain.check(&result), Ok(()));
        // A result line is not an agent drain, nor the other way round.
        assert!(Schema::AgentDrain.check(&result).is_err());
        let agent = samples(Schema::AgentDrain).remove(0);
        assert!(Schema::Drain.check(&agent).is_err());
        let mut event = samples(Schema::Event).remove(1);
        event["kind"] = "close".into();
        assert!(Schema::Event.check(&event).is_err());
        // Peers hidden: `remote` may go.
        let mut hidden = samples(Schema::Event).remove(1);
        hidden["tuple"]
            .as_object_mut()
            .expect("tuple")
            .remove("remote");
        assert_eq!(Schema::Event.check(&hidden), Ok(()));
    }
}
