//! The JSON contract of [`Status`](crate::tracker::Status): the schema is
//! valid, every status shape matches it, and it rejects what it must.

use super::kit::*;

const SCHEMA: &str = include_str!("../../../../gracewatch/schema/status.schema.json");

fn schema() -> serde_json::Value {
    serde_json::from_str(SCHEMA).unwrap()
}

fn validator() -> jsonschema::Validator {
    jsonschema::draft202012::new(&schema()).unwrap()
}

fn errors(v: &jsonschema::Validator, instance: &serde_json::Value) -> Vec<String> {
    v.iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect()
}

/// A status with every shape of value: processes with and without live
/// connections, IPv4/IPv6/dual-stack listeners, namespaces, queues, totals.
fn busy_status() -> Status {
    let steps = vec![
        listen_start(1, 100, wildcard_v4(), 10),
        listen_start(1, 101, wildcard_v6(), 10),
        listen_start(1, 102, listen_addr_in(NS2, "[2001:db8::1]:443"), 30),
        handshake(2, 300, conn_v4(9)),
        accept(2, 200, conn_v4(1), 10),
        accept(3, 201, conn_v4_mapped(), 11),
        accept(
            4,
            202,
            tuple_in(NS2, "[2001:db8::1]:443", "[2001:db8::99]:5000"),
            30,
        ),
        close(
            5,
            202,
            tuple_in(NS2, "[2001:db8::1]:443", "[2001:db8::99]:5000"),
            30,
        ),
        queue_drop(5, 301, conn_v4(8)),
        snapshot(
            6,
            vec![
                snap_listener(wildcard_v4(), 7, 4, &[10, 20]),
                snap_listener(wildcard_v6(), 8, 0, &[10]),
                snap_listener(listen_addr_in(NS2, "[2001:db8::1]:443"), 9, 0, &[30]),
            ],
            vec![
                snap_conn(conn_v4(1), 71, ESTABLISHED, &[10, 20]),
                snap_conn(conn_v4(2), 72, CLOSE_WAIT, &[20]),
            ],
            vec![(conn_v4(2), 20)],
        ),
        lost_events(7, 3),
    ];
    let now = ms(u64::from(u32::MAX) * 1000);
    let mut status = run_steps("busy", &steps).status(now);
    // The roles as a monitor publishes them.
    let mut restarts = Restarts::new();
    restarts.observe(&status, now);
    restarts.annotate(&mut status, ms(0));
    // One process in a container, as the monitor fills it in.
    status.processes[0].set_cgroup(Some(
        "/kubepods.slice/kubepods-pod8b5c3f2e_1d4a_4e6b_9c7d_0a1b2c3d4e5f.slice/cri-containerd-\
         0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope",
    ));
    status
}

#[test]
fn schema_is_valid_draft_2020_12() {
    let s = schema();
    jsonschema::meta::validate(&s).unwrap();
    assert_eq!(s["properties"]["schema"]["const"], STATUS_SCHEMA);
}

#[test]
fn status_json_matches_schema() {
    let v = validator();
    let busy = busy_status();
    assert!(busy.processes.iter().any(|p| p.oldest_live_ms.is_none()));
    assert!(busy.processes.iter().any(|p| p.oldest_live_ms.is_some()));
    assert!(busy.processes.iter().any(|p| p.cgroup.is_none()));
    assert!(busy.processes.iter().any(|p| p.pod_uid.is_some()));
    assert!(busy.processes.iter().any(|p| p.container_id.is_some()));
    assert!(busy.listeners.iter().any(|l| l.family == Family::Ipv6));
    assert!(busy.listeners.iter().any(|l| l.accept_queue > 0));
    assert!(busy.listeners.iter().all(|l| !l.generations.is_empty()));
    let extreme = Status {
        schema: STATUS_SCHEMA.to_owned(),
        uptime_ms: u64::MAX,
        processes: vec![ProcessStatus {
            pid: u32::MAX,
            comm: "a-15-byte-name!".to_owned(),
            live: u64::MAX,
            listeners: vec!["[fe80::1%2]:65535".parse().expect("an address")],
            accepted_total: u64::MAX,
            closed_total: 0,
            oldest_live_ms: Some(u64::MAX),
            role: Role::Draining,
            role_since_ms: u64::MAX,
            cgroup: Some("/../kubepods.slice/x\u{1b}[2J\u{fffd} (deleted)".to_owned()),
            container_id: Some("f".repeat(64)),
            pod_uid: Some("8b5c3f2e-1d4a-4e6b-9c7d-0a1b2c3d4e5f".to_owned()),
        }],
        listeners: vec![ListenerStatus {
            netns: u32::MAX,
            address: "[fe80::1%2]:65535".parse().expect("an address"),
            family: Family::Ipv6,
            holders: vec![],
            accept_queue: 0,
            accepted_total: 0,
            queue_drops_total: 0,
            generations: [Role::Serving, Role::Draining, Role::Drained, Role::Exited]
                .into_iter()
                .zip(1..)
                .map(|(role, pid)| GenerationStatus {
                    pid,
                    comm: String::new(),
                    role,
                    role_since_ms: u64::MAX,
                    live: u64::MAX,
                })
                .collect(),
        }],
        lost_events: u64::MAX,
        map_full_total: u64::MAX,
    };
    for (name, status) in [
        ("empty", Tracker::new().status(ms(0))),
        ("busy", busy),
        ("extreme", extreme),
    ] {
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(errors(&v, &json), Vec::<String>::new(), "{name}: {json:#}");
        // And back: the contract round-trips.
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back, status, "{name}");
    }
}

#[test]
fn schema_is_strict() {
    let v = validator();
    let good = serde_json::to_value(busy_status()).unwrap();
    let mut bad = Vec::new();

    let mut extra = good.clone();
    extra["surprise"] = serde_json::json!(1);
    bad.push(("unknown top-level key", extra));

    let mut extra = good.clone();
    extra["processes"][0]["surprise"] = serde_json::json!(1);
    bad.push(("unknown process key", extra));

    let mut extra = good.clone();
    extra["listeners"][0]["holders"][0]["surprise"] = serde_json::json!(1);
    bad.push(("unknown holder key", extra));

    for key in [
        "schema",
        "uptime_ms",
        "processes",
        "listeners",
        "lost_events",
        "map_full_total",
    ] {
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove(key);
        bad.push(("missing top-level key", missing));
    }
    for key in ["role", "role_since_ms"] {
        let mut missing = good.clone();
        missing["processes"][0].as_object_mut().unwrap().remove(key);
        bad.push(("missing process role", missing));
    }
    for key in ["cgroup", "container_id", "pod_uid"] {
        let mut missing = good.clone();
        missing["processes"][0].as_object_mut().unwrap().remove(key);
        bad.push(("missing process cgroup key", missing));
    }
    for (key, value) in [
        ("cgroup", serde_json::json!("relative/path")),
        ("cgroup", serde_json::json!(7)),
        ("container_id", serde_json::json!("abc")),
        ("container_id", serde_json::json!("F".repeat(64))),
        (
            "pod_uid",
            serde_json::json!("8b5c3f2e_1d4a_4e6b_9c7d_0a1b2c3d4e5f"),
        ),
        ("pod_uid", serde_json::json!("")),
    ] {
        let mut wrong = good.clone();
        wrong["processes"][0][key] = value;
        bad.push(("malformed cgroup key", wrong));
    }
    let mut missing = good.clone();
    missing["listeners"][0]
        .as_object_mut()
        .unwrap()
        .remove("generations");
    bad.push(("missing generations", missing));
    let mut extra = good.clone();
    extra["listeners"][0]["generations"][0]["surprise"] = serde_json::json!(1);
    bad.push(("unknown generation key", extra));
    let mut wrong = good.clone();
    wrong["processes"][0]["role"] = serde_json::json!("exited");
    bad.push(("a listed process exited", wrong));
    let mut wrong = good.clone();
    wrong["listeners"][0]["generations"][0]["role"] = serde_json::json!("retired");
    bad.push(("unknown generation role", wrong));
    let mut missing = good.clone();
    missing["processes"][0]
        .as_object_mut()
        .unwrap()
        .remove("oldest_live_ms");
    bad.push(("missing oldest_live_ms", missing));
    let mut missing = good.clone();
    missing["listeners"][0]
        .as_object_mut()
        .unwrap()
        .remove("accept_queue");
    bad.push(("missing accept_queue", missing));

    let mut wrong = good.clone();
    wrong["schema"] = serde_json::json!("gracewatch.status.v0");
    bad.push(("other schema version", wrong));
    let mut wrong = good.clone();
    wrong["listeners"][0]["family"] = serde_json::json!("inet");
    bad.push(("unknown family", wrong));
    let mut wrong = good.clone();
    wrong["processes"][0]["live"] = serde_json::json!(-1);
    bad.push(("negative count", wrong));
    let mut wrong = good.clone();
    wrong["processes"][0]["pid"] = serde_json::json!(1u64 << 32);
    bad.push(("pid beyond u32", wrong));
    let mut wrong = good.clone();
    wrong["listeners"][0]["address"] = serde_json::json!("localhost:80");
    bad.push(("address not ip:port", wrong));

    for (name, instance) in bad {
        assert!(!v.is_valid(&instance), "{name}: accepted {instance:#}");
        // serde agrees: the Rust side rejects what the schema rejects,
        // where the types can tell.
        // (serde reads a missing `Option` as `None`; the schema is stricter.)
        let serde_can_tell = name.starts_with("unknown") && name.ends_with("key")
            || name.starts_with("missing")
                && !["missing oldest_live_ms", "missing process cgroup key"].contains(&name);
        if serde_can_tell {
            assert!(
                serde_json::from_value::<Status>(instance).is_err(),
                "{name}: serde accepted it"
            );
        }
    }
}
