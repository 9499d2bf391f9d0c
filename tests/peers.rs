//! Who pins a process (issue 14, item 2) against a real server and real
//! clients in a network namespace: three client processes, each with a
//! command name of its own (`client.py --comm`), two connecting from
//! 127.0.0.1 and one from 127.0.0.9 (a bound source address, as a remote
//! peer would look). `gracewatch connections --by-peer --json` and the
//! agent's `/v1/peers` must group the server's connections by peer with
//! the right counts, and name, for each group, the client processes that
//! hold the other ends: their real pids (as the clients print them) and
//! comms. An untrusted agent reader gets the groups without peers or
//! names. A drain that times out lists the groups still holding it in its
//! result, with the peer processes (and in its human output); its progress
//! lines list them without.

use std::{collections::BTreeSet, time::Duration};

use gracewatch_testkit::{Agent, Client, Netns, Schema, Server, TempDir, http, setup};
use serde_json::{Value, json};

/// (pid, comm, connections) of a group's peer processes.
fn named(group: &Value) -> BTreeSet<(u64, String, u64)> {
    group["peer_processes"]
        .as_array()
        .unwrap_or_else(|| panic!("no peer processes in {group}"))
        .iter()
        .map(|p| {
            (
                p["pid"].as_u64().unwrap_or_default(),
                p["comm"].as_str().unwrap_or_default().to_owned(),
                p["connections"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// The group whose `peer` is `peer`.
fn group<'a>(groups: &'a Value, peer: &str) -> &'a Value {
    groups
        .as_array()
        .and_then(|g| g.iter().find(|g| g["peer"] == peer))
        .unwrap_or_else(|| panic!("no group {peer} in {groups}"))
}

#[test]
fn peer_grouping_on_loopback_names_the_client_processes() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("peers");
    let dir = TempDir::new("peers");
    let addr = "127.0.0.1:9951";
    let server = Server::listen(&ns, addr);
    let a = Client::connect_as(&ns, addr, 3, None, "peer-a");
    let b = Client::connect_as(&ns, addr, 2, None, "peer-b");
    let c = Client::connect_as(&ns, addr, 2, Some("127.0.0.9"), "peer-c");
    server.wait_accepted(7);
    let pid = server.pid().to_string();
    let (pa, pb, pc) = (u64::from(a.pid()), u64::from(b.pid()), u64::from(c.pid()));
    assert!(pa != pb && pb != pc && pa != pc);
    let check = |doc: &Value, what: &str| {
        if let Err(e) = Schema::Peers.check(doc) {
            panic!("{what}: does not follow peers.schema.json: {e}\n{doc}");
        }
        assert_eq!(doc["total"], 7, "{what}: {doc}");
        assert_eq!(doc["other"], 0, "{what}: {doc}");
        let groups = &doc["groups"];
        assert_eq!(groups.as_array().map(Vec::len), Some(2), "{what}: {doc}");
        // Most connections first.
        assert_eq!(groups[0]["peer"], "127.0.0.1", "{what}: {doc}");
        let lo = group(groups, "127.0.0.1");
        assert_eq!(lo["connections"], 5, "{what}: {doc}");
        assert_eq!(lo["prefix_len"], 32, "{what}: {doc}");
        assert_eq!(lo["unnamed"], 0, "{what}: {doc}");
        assert_eq!(
            named(lo),
            BTreeSet::from([(pa, "peer-a".to_owned(), 3), (pb, "peer-b".to_owned(), 2)]),
            "{what}: the 127.0.0.1 group names both loopback clients: {doc}"
        );
        let nine = group(groups, "127.0.0.9");
        assert_eq!(nine["connections"], 2, "{what}: {doc}");
        assert_eq!(
            named(nine),
            BTreeSet::from([(pc, "peer-c".to_owned(), 2)]),
            "{what}: {doc}"
        );
        assert_eq!(doc["walk"]["named"], 7, "{what}: {doc}");
        assert_eq!(doc["walk"]["bounded"], false, "{what}: {doc}");
        eprintln!("{what}: walk {}", doc["walk"]);
    };

    let out = gw.run(&["connections", "--pid", &pid, "--by-peer", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    check(&doc, "connections --by-peer --json");

    let out = gw.run(&["connections", "--pid", &pid, "--by-peer"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains(&format!("{pa} peer-a (3)"))
            && text.contains(&format!("{pc} peer-c (2)")),
        "the table names the peer processes:\n{text}"
    );

    let agent = Agent::builder().token().start(&gw, &dir);
    let path = format!("/v1/peers?pid={pid}");
    let answer = http::get(&agent.unix(), &path).expect("GET /v1/peers");
    assert_eq!(answer.code, 200, "{}\n{}", answer.body, agent.context());
    let doc: Value = serde_json::from_str(&answer.body).expect("JSON");
    check(&doc, "agent /v1/peers (unix socket)");

    // An untrusted reader: counts, but no peer and nobody looked.
    let answer = http::get(&agent.tcp(), &path).expect("GET /v1/peers over TCP");
    assert_eq!(answer.code, 200, "{}", answer.body);
    let doc: Value = serde_json::from_str(&answer.body).expect("JSON");
    Schema::Peers.check(&doc).expect("peers.schema.json");
    assert_eq!(doc["walk"], Value::Null, "{doc}");
    for g in doc["groups"].as_array().into_iter().flatten() {
        assert_eq!(g["peer"], "hidden", "{doc}");
        assert_eq!(g["peer_processes"], Value::Null, "{doc}");
    }
    assert!(
        !answer.body.contains("127.0.0.") && !answer.body.contains("peer-a"),
        "{doc}"
    );
    let bad = http::get(&agent.tcp(), "/v1/peers").expect("GET without pid");
    assert_eq!(bad.code, 400, "{}", bad.body);
}

#[test]
fn a_drain_that_times_out_lists_the_peers_still_holding_it() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("peers-drain");
    let addr = "127.0.0.1:9952";
    let server = Server::listen(&ns, addr);
    let a = Client::connect_as(&ns, addr, 2, None, "pin-a");
    let c = Client::connect_as(&ns, addr, 1, Some("127.0.0.9"), "pin-c");
    server.wait_accepted(3);
    let pid = server.pid().to_string();
    let drain = gw.spawn_drain(&["wait", "--pid", &pid, "--timeout", "1500ms", "--json"]);
    let done = drain.wait(Duration::from_secs(10));
    done.assert_code(124);
    for line in done.json() {
        if let Err(e) = Schema::Drain.check(&line) {
            panic!("drain line does not follow drain.schema.json: {e}\n{line}");
        }
    }
    let progress = done.progress();
    let first = progress.first().expect("a progress line");
    assert_eq!(first["peers"][0]["peer"], "127.0.0.1", "{first}");
    assert_eq!(first["peers"][0]["connections"], 2, "{first}");
    assert_eq!(first["peers"][0]["peer_processes"], Value::Null, "{first}");
    let result = done.assert_result(&[("outcome", json!("timeout")), ("still_held", json!(3))]);
    let peers = &result["peers"];
    assert_eq!(peers.as_array().map(Vec::len), Some(2), "{result}");
    assert_eq!(
        named(group(peers, "127.0.0.1")),
        BTreeSet::from([(u64::from(a.pid()), "pin-a".to_owned(), 2)]),
        "{result}"
    );
    assert_eq!(
        named(group(peers, "127.0.0.9")),
        BTreeSet::from([(u64::from(c.pid()), "pin-c".to_owned(), 1)]),
        "{result}"
    );
    // Without --json, the last lines name them too.
    let out = gw.run(&["wait", "--pid", &pid, "--timeout", "500ms"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{err}");
    assert!(
        err.contains("from 127.0.0.9: 1 connection(s)")
            && err.contains(&format!("{} pin-c (1)", c.pid()))
            && err.contains(&format!("{} pin-a (2)", a.pid())),
        "{err}"
    );
}
