//! Tracker tests: tables of event/snapshot sequences with the status
//! fragments they must produce (one table per area, every transition of the
//! contract), a randomized run checking the invariants on thousands of
//! arbitrary sequences, and the JSON schema check of [`Status`].
#![allow(clippy::unwrap_used)]

use std::{net::SocketAddr, time::Duration};

use super::*;
use crate::event::{ConnEvent, Holder, ListenAddr, NetNs, SnapConn, SnapListener, Snapshot, Tuple};

const NS: NetNs = 4_026_531_840;
const NS2: NetNs = 4_026_532_001;

// --- vocabulary -------------------------------------------------------------

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn la(s: &str) -> ListenAddr {
    la_ns(NS, s)
}

fn la_ns(netns: NetNs, s: &str) -> ListenAddr {
    ListenAddr {
        netns,
        local: sa(s),
    }
}

fn tu(local: &str, remote: &str) -> Tuple {
    tu_ns(NS, local, remote)
}

fn tu_ns(netns: NetNs, local: &str, remote: &str) -> Tuple {
    Tuple {
        netns,
        local: sa(local),
        remote: sa(remote),
    }
}

/// Connection `n` to 10.0.0.1:80.
fn t4(n: u16) -> Tuple {
    tu("10.0.0.1:80", &format!("192.0.2.1:{}", 40000 + n))
}

/// Connection `n` to 10.0.0.1:`port`.
fn tp(port: u16, n: u16) -> Tuple {
    tu(
        &format!("10.0.0.1:{port}"),
        &format!("192.0.2.1:{}", 40000 + n),
    )
}

fn l4() -> ListenAddr {
    la("0.0.0.0:80")
}

fn l4s() -> ListenAddr {
    la("10.0.0.1:80")
}

fn l6() -> ListenAddr {
    la("[::]:80")
}

fn l6s() -> ListenAddr {
    la("[2001:db8::1]:443")
}

fn t6() -> Tuple {
    tu("[2001:db8::1]:443", "[2001:db8::99]:50000")
}

/// An IPv4 client of a dual-stack IPv6 socket, as the kernel reports it.
fn tmapped() -> Tuple {
    tu("[::ffff:10.0.0.1]:80", "[::ffff:192.0.2.7]:40007")
}

fn ev_comm(pid: u32) -> String {
    format!("e{pid}")
}

fn listen(at: u64, sk: u64, addr: ListenAddr, pid: u32) -> Step {
    Step::Ev(ConnEvent::ListenStart {
        at: ms(at),
        sk,
        addr,
        pid,
        comm: ev_comm(pid),
    })
}

fn unlisten(at: u64, sk: u64, addr: ListenAddr, pid: u32) -> Step {
    Step::Ev(ConnEvent::ListenStop {
        at: ms(at),
        sk,
        addr,
        pid,
        comm: ev_comm(pid),
    })
}

fn hs(at: u64, sk: u64, tuple: Tuple) -> Step {
    Step::Ev(ConnEvent::Handshake {
        at: ms(at),
        sk,
        tuple,
    })
}

fn acc(at: u64, sk: u64, tuple: Tuple, pid: u32, was_queued: bool) -> Step {
    Step::Ev(ConnEvent::Accept {
        at: ms(at),
        sk,
        tuple,
        pid,
        comm: ev_comm(pid),
        was_queued,
    })
}

fn close(at: u64, sk: u64, tuple: Tuple, pid: u32) -> Step {
    Step::Ev(ConnEvent::Close {
        at: ms(at),
        sk,
        tuple,
        pid,
        by_exit: false,
    })
}

fn qdrop(at: u64, sk: u64, tuple: Tuple) -> Step {
    Step::Ev(ConnEvent::QueueDrop {
        at: ms(at),
        sk,
        tuple,
    })
}

fn pclose(at: u64, tuple: Tuple, pid: u32) -> Step {
    Step::Ev(ConnEvent::PreexistingClose {
        at: ms(at),
        tuple,
        pid,
        by_exit: false,
    })
}

fn exit(at: u64, pid: u32) -> Step {
    Step::Ev(ConnEvent::ProcessExit { at: ms(at), pid })
}

fn lost(at: u64, total: u64) -> Step {
    Step::Ev(ConnEvent::Lost { at: ms(at), total })
}

fn holders(pids: &[u32]) -> Vec<Holder> {
    pids.iter()
        .map(|&pid| Holder {
            pid,
            comm: format!("s{pid}"),
        })
        .collect()
}

fn sl(addr: ListenAddr, inode: u64, accept_queue: u32, pids: &[u32]) -> SnapListener {
    SnapListener {
        addr,
        inode,
        accept_queue,
        holders: holders(pids),
    }
}

fn sc(tuple: Tuple, inode: u64, state: u8, pids: &[u32]) -> SnapConn {
    SnapConn {
        tuple,
        inode,
        state,
        holders: holders(pids),
    }
}

/// A snapshot step and the (tuple, pid charged) pairs it must return.
fn snap(
    at: u64,
    listeners: Vec<SnapListener>,
    connections: Vec<SnapConn>,
    returns: Vec<(Tuple, u32)>,
) -> Step {
    Step::Snap(
        Snapshot {
            at: ms(at),
            listeners,
            connections,
        },
        returns,
    )
}

enum Step {
    Ev(ConnEvent),
    Snap(Snapshot, Vec<(Tuple, u32)>),
    Forget(Tuple),
}

/// A fragment of the expected outcome.
#[derive(Debug)]
enum Exp {
    /// Exactly these pids in `status.processes`, in this order.
    Procs(Vec<u32>),
    Live(u32, u64),
    /// (pid, accepted_total, closed_total)
    Totals(u32, u64, u64),
    ProcListeners(u32, Vec<&'static str>),
    Comm(u32, &'static str),
    Oldest(u32, Option<u64>),
    /// Exactly these listeners, in this order.
    Listeners(Vec<(NetNs, &'static str)>),
    /// A listener's holders with their live counts, in order.
    Holders(ListenAddr, Vec<(u32, u64)>),
    Queue(ListenAddr, u64),
    /// (listener, accepted_total, queue_drops_total)
    LTotals(ListenAddr, u64, u64),
    Family(ListenAddr, &'static str),
    Lost(u64),
    /// `connections_of(pid)`: (tuple, preexisting, listener), oldest first.
    Conns(u32, Vec<(Tuple, bool, Option<ListenAddr>)>),
    ConnHolders(u32, Tuple, Vec<u32>),
    ConnSince(u32, Tuple, u64),
    LiveOf(u32, Vec<u16>, u64),
    Unmatched(u64),
    Uptime(u64),
    /// Kernel-reported connections the last merge retired: (sk, accepted at ms).
    Retired(Vec<(u64, u64)>),
}

struct Case {
    name: &'static str,
    steps: Vec<Step>,
    now: u64,
    expect: Vec<Exp>,
}

fn case(name: &'static str, steps: Vec<Step>, expect: Vec<Exp>) -> Case {
    Case {
        name,
        steps,
        now: 100_000,
        expect,
    }
}

fn run_steps(name: &str, steps: &[Step]) -> Tracker {
    let mut t = Tracker::new();
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Ev(ev) => t.apply(ev),
            Step::Snap(s, want) => {
                let got = t.merge_snapshot(s);
                assert_eq!(&got, want, "{name}: step {i}: merge_snapshot returned");
            }
            Step::Forget(tuple) => t.forget_connection(tuple),
        }
        check_invariants(&t, ms(100_000), &format!("{name}: after step {i}"));
    }
    t
}

fn run(cases: Vec<Case>) {
    for c in cases {
        let t = run_steps(c.name, &c.steps);
        let st = t.status(ms(c.now));
        for e in &c.expect {
            check(c.name, &t, &st, e);
        }
    }
}

fn proc_of<'a>(name: &str, st: &'a Status, pid: u32) -> &'a ProcessStatus {
    st.processes
        .iter()
        .find(|p| p.pid == pid)
        .unwrap_or_else(|| panic!("{name}: pid {pid} not in status: {st:#?}"))
}

fn listener_of<'a>(name: &str, st: &'a Status, addr: &ListenAddr) -> &'a ListenerStatus {
    let address = addr.local.to_string();
    st.listeners
        .iter()
        .find(|l| l.netns == addr.netns && l.address == address)
        .unwrap_or_else(|| panic!("{name}: listener {address} not in status: {st:#?}"))
}

fn check(name: &str, t: &Tracker, st: &Status, e: &Exp) {
    let ctx = format!("{name}: {e:?}");
    match e {
        Exp::Retired(want) => {
            let want: Vec<(u64, Duration)> = want.iter().map(|&(sk, at)| (sk, ms(at))).collect();
            assert_eq!(t.retired, want, "{ctx}");
        }
        Exp::Procs(pids) => {
            let got: Vec<u32> = st.processes.iter().map(|p| p.pid).collect();
            assert_eq!(&got, pids, "{ctx}");
        }
        Exp::Live(pid, n) => {
            // A process holding nothing is absent; its live count is zero.
            let got = st
                .processes
                .iter()
                .find(|p| p.pid == *pid)
                .map_or(0, |p| p.live);
            assert_eq!(got, *n, "{ctx}");
            assert_eq!(t.live_of(*pid, &[]), *n, "{ctx}: live_of");
        }
        Exp::Totals(pid, accepted, closed) => {
            let p = proc_of(name, st, *pid);
            assert_eq!(
                (p.accepted_total, p.closed_total),
                (*accepted, *closed),
                "{ctx}"
            );
        }
        Exp::ProcListeners(pid, addrs) => {
            assert_eq!(&proc_of(name, st, *pid).listeners, addrs, "{ctx}");
        }
        Exp::Comm(pid, comm) => assert_eq!(proc_of(name, st, *pid).comm, *comm, "{ctx}"),
        Exp::Oldest(pid, want) => {
            assert_eq!(proc_of(name, st, *pid).oldest_live_ms, *want, "{ctx}")
        }
        Exp::Listeners(want) => {
            let got: Vec<(NetNs, String)> = st
                .listeners
                .iter()
                .map(|l| (l.netns, l.address.clone()))
                .collect();
            let want: Vec<(NetNs, String)> =
                want.iter().map(|(n, a)| (*n, (*a).to_owned())).collect();
            assert_eq!(got, want, "{ctx}");
        }
        Exp::Holders(addr, want) => {
            let got: Vec<(u32, u64)> = listener_of(name, st, addr)
                .holders
                .iter()
                .map(|h| (h.pid, h.live))
                .collect();
            assert_eq!(&got, want, "{ctx}");
        }
        Exp::Queue(addr, n) => assert_eq!(listener_of(name, st, addr).accept_queue, *n, "{ctx}"),
        Exp::LTotals(addr, accepted, drops) => {
            let l = listener_of(name, st, addr);
            assert_eq!(
                (l.accepted_total, l.queue_drops_total),
                (*accepted, *drops),
                "{ctx}"
            );
        }
        Exp::Family(addr, family) => {
            assert_eq!(listener_of(name, st, addr).family, *family, "{ctx}")
        }
        Exp::Lost(n) => assert_eq!(st.lost_events, *n, "{ctx}"),
        Exp::Conns(pid, want) => {
            let got: Vec<(Tuple, bool, Option<ListenAddr>)> = t
                .connections_of(*pid)
                .into_iter()
                .map(|c| (c.tuple, c.preexisting, c.listener))
                .collect();
            assert_eq!(&got, want, "{ctx}");
        }
        Exp::ConnHolders(pid, tuple, want) => {
            let c = t
                .connections_of(*pid)
                .into_iter()
                .find(|c| c.tuple == *tuple);
            assert_eq!(c.map(|c| c.holders), Some(want.clone()), "{ctx}");
        }
        Exp::ConnSince(pid, tuple, since) => {
            let c = t
                .connections_of(*pid)
                .into_iter()
                .find(|c| c.tuple == *tuple);
            assert_eq!(c.map(|c| c.since), Some(ms(*since)), "{ctx}");
        }
        Exp::LiveOf(pid, ports, n) => assert_eq!(t.live_of(*pid, ports), *n, "{ctx}"),
        Exp::Unmatched(n) => assert_eq!(t.unmatched_queue, *n, "{ctx}"),
        Exp::Uptime(n) => assert_eq!(st.uptime_ms, *n, "{ctx}"),
    }
}

/// What must hold after any input sequence.
fn check_invariants(t: &Tracker, now: Duration, ctx: &str) {
    let st = t.status(now);
    assert_eq!(st.schema, STATUS_SCHEMA, "{ctx}");
    let mut pids: Vec<u32> = t.pids().collect();
    pids.sort_unstable();
    let listed: Vec<u32> = st.processes.iter().map(|p| p.pid).collect();
    assert_eq!(
        pids, listed,
        "{ctx}: pids() lists exactly the processes of status()"
    );

    // Indexes agree with the records.
    for (sk, tuple) in &t.conn_by_sk {
        assert_eq!(
            t.conns.get(tuple).and_then(|c| c.sk),
            Some(*sk),
            "{ctx}: conn_by_sk"
        );
    }
    for (tuple, c) in &t.conns {
        assert!(
            !c.holders.is_empty(),
            "{ctx}: connection {tuple:?} without holders"
        );
        if let Some(sk) = c.sk {
            assert_eq!(t.conn_by_sk.get(&sk), Some(tuple), "{ctx}: sk index");
        }
        if let Some(l) = c.listener {
            assert!(
                t.listeners.contains_key(&l),
                "{ctx}: connection names a gone listener"
            );
        }
    }
    for (sk, addr) in &t.listener_by_sk {
        let l = t
            .listeners
            .get(addr)
            .unwrap_or_else(|| panic!("{ctx}: listener_by_sk to a gone listener"));
        assert!(
            l.sockets.iter().any(|s| s.sk == Some(*sk)),
            "{ctx}: listener_by_sk"
        );
    }
    for (addr, l) in &t.listeners {
        assert!(
            !l.sockets.is_empty(),
            "{ctx}: listener {addr:?} without sockets"
        );
        for s in &l.sockets {
            if let Some(sk) = s.sk {
                assert_eq!(
                    t.listener_by_sk.get(&sk),
                    Some(addr),
                    "{ctx}: socket sk not indexed"
                );
            }
        }
    }

    // Process records: exactly the pids holding something, with exact counts.
    let mut holding: BTreeMap<u32, u64> = BTreeMap::new();
    for c in t.conns.values() {
        for pid in &c.holders {
            *holding.entry(*pid).or_default() += 1;
        }
    }
    for l in t.listeners.values() {
        for pid in l.holder_pids() {
            holding.entry(pid).or_default();
        }
    }
    let recorded: BTreeSet<u32> = t.procs.keys().copied().collect();
    let expected: BTreeSet<u32> = holding.keys().copied().collect();
    assert_eq!(recorded, expected, "{ctx}: process records");
    for (pid, n) in &holding {
        assert_eq!(t.procs[pid].live, *n, "{ctx}: live counter of {pid}");
    }

    // Status agrees with the records and with the queries.
    let pids: Vec<u32> = st.processes.iter().map(|p| p.pid).collect();
    assert_eq!(
        pids,
        holding.keys().copied().collect::<Vec<_>>(),
        "{ctx}: status pids"
    );
    for p in &st.processes {
        let n = holding[&p.pid];
        assert_eq!(p.live, n, "{ctx}: live of {}", p.pid);
        assert_eq!(t.live_of(p.pid, &[]), n, "{ctx}: live_of");
        let conns = t.connections_of(p.pid);
        assert_eq!(conns.len() as u64, n, "{ctx}: connections_of");
        assert!(
            conns.windows(2).all(|w| w[0].since <= w[1].since),
            "{ctx}: oldest first"
        );
        assert_eq!(p.oldest_live_ms.is_some(), n > 0, "{ctx}: oldest_live_ms");
        let through: u64 = st
            .listeners
            .iter()
            .flat_map(|l| &l.holders)
            .filter(|h| h.pid == p.pid)
            .map(|h| h.live)
            .sum();
        assert!(
            through <= p.live,
            "{ctx}: listener lives of {} exceed its live",
            p.pid
        );
    }
    let keys: Vec<(NetNs, SocketAddr)> = t.listeners.keys().map(|a| (a.netns, a.local)).collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "{ctx}: listeners sorted"
    );
    for l in &st.listeners {
        assert!(
            l.holders.windows(2).all(|w| w[0].pid < w[1].pid),
            "{ctx}: holders sorted"
        );
    }
}

// --- tables -----------------------------------------------------------------

#[test]
fn empty_tracker() {
    let st = Tracker::new().status(ms(1234));
    assert_eq!(
        st,
        Status {
            schema: STATUS_SCHEMA.to_owned(),
            uptime_ms: 1234,
            processes: vec![],
            listeners: vec![],
            lost_events: 0,
            map_full_total: 0,
        }
    );
}

#[test]
fn untracked_episodes_reach_the_status_at_once() {
    let mut t = Tracker::new();
    t.take_significant();
    t.apply(&ConnEvent::MapFull {
        at: ms(5),
        total: 2,
    });
    assert!(
        t.take_significant(),
        "an untracked episode is published at once"
    );
    assert_eq!(t.status(ms(6)).map_full_total, 2);
}

#[test]
fn listeners() {
    run(vec![
        case(
            "listen start ipv4",
            vec![listen(1, 100, l4(), 10)],
            vec![
                Exp::Procs(vec![10]),
                Exp::Live(10, 0),
                Exp::Oldest(10, None),
                Exp::Comm(10, "e10"),
                Exp::ProcListeners(10, vec!["0.0.0.0:80"]),
                Exp::Listeners(vec![(NS, "0.0.0.0:80")]),
                Exp::Family(l4(), "ipv4"),
                Exp::Holders(l4(), vec![(10, 0)]),
                Exp::Queue(l4(), 0),
                Exp::LTotals(l4(), 0, 0),
            ],
        ),
        case(
            "listen start ipv6 wildcard",
            vec![listen(1, 100, l6(), 10)],
            vec![
                Exp::Listeners(vec![(NS, "[::]:80")]),
                Exp::Family(l6(), "ipv6"),
                Exp::ProcListeners(10, vec!["[::]:80"]),
            ],
        ),
        case(
            "listen stop removes the listener and the idle process",
            vec![listen(1, 100, l4(), 10), unlisten(2, 100, l4(), 10)],
            vec![Exp::Listeners(vec![]), Exp::Procs(vec![])],
        ),
        case(
            "listen stop keeps accepted connections live, without a listener",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                unlisten(3, 100, l4(), 10),
            ],
            vec![
                Exp::Listeners(vec![]),
                Exp::Procs(vec![10]),
                Exp::Live(10, 1),
                Exp::ProcListeners(10, vec![]),
                Exp::Conns(10, vec![(t4(1), false, None)]),
            ],
        ),
        case(
            "SO_REUSEPORT second socket on the address merges holders",
            vec![listen(1, 100, l4(), 10), listen(2, 101, l4(), 20)],
            vec![
                Exp::Listeners(vec![(NS, "0.0.0.0:80")]),
                Exp::Holders(l4(), vec![(10, 0), (20, 0)]),
                Exp::ProcListeners(20, vec!["0.0.0.0:80"]),
            ],
        ),
        case(
            "SO_REUSEPORT: one socket closing leaves the other listening",
            vec![
                listen(1, 100, l4(), 10),
                listen(2, 101, l4(), 20),
                unlisten(3, 100, l4(), 10),
            ],
            vec![
                Exp::Listeners(vec![(NS, "0.0.0.0:80")]),
                Exp::Holders(l4(), vec![(20, 0)]),
                Exp::Procs(vec![20]),
            ],
        ),
        case(
            "ListenStart again for a known socket merges holders",
            vec![listen(1, 100, l4(), 10), listen(2, 100, l4(), 20)],
            vec![Exp::Holders(l4(), vec![(10, 0), (20, 0)])],
        ),
        case(
            "listen stop of an unknown socket is ignored",
            vec![
                listen(1, 100, l4(), 10),
                unlisten(2, 999, l4(), 10),
                unlisten(2, 998, la("0.0.0.0:81"), 10),
            ],
            vec![
                Exp::Listeners(vec![(NS, "0.0.0.0:80")]),
                Exp::Holders(l4(), vec![(10, 0)]),
            ],
        ),
        case(
            "a listening sk seen on another address: the stale socket goes",
            vec![
                listen(1, 100, l4(), 10),
                listen(5, 100, la("0.0.0.0:81"), 10),
            ],
            vec![
                Exp::Listeners(vec![(NS, "0.0.0.0:81")]),
                Exp::ProcListeners(10, vec!["0.0.0.0:81"]),
            ],
        ),
        case(
            "the same address in two namespaces stays apart",
            vec![
                listen(1, 100, la_ns(NS, "0.0.0.0:80"), 10),
                listen(1, 101, la_ns(NS2, "0.0.0.0:80"), 20),
                acc(
                    2,
                    200,
                    tu_ns(NS2, "10.0.0.1:80", "192.0.2.1:40001"),
                    20,
                    false,
                ),
            ],
            vec![
                Exp::Listeners(vec![(NS, "0.0.0.0:80"), (NS2, "0.0.0.0:80")]),
                Exp::Holders(la_ns(NS, "0.0.0.0:80"), vec![(10, 0)]),
                Exp::Holders(la_ns(NS2, "0.0.0.0:80"), vec![(20, 1)]),
                Exp::Live(10, 0),
                Exp::Live(20, 1),
            ],
        ),
        case(
            "listeners sorted by namespace then address; process listeners by address",
            vec![
                listen(1, 100, la_ns(NS2, "0.0.0.0:80"), 10),
                listen(1, 101, la("[::]:80"), 10),
                listen(1, 102, la("10.0.0.10:80"), 10),
                listen(1, 103, la("9.0.0.1:80"), 10),
                listen(1, 104, la("0.0.0.0:443"), 10),
            ],
            vec![
                Exp::Listeners(vec![
                    (NS, "0.0.0.0:443"),
                    (NS, "9.0.0.1:80"),
                    (NS, "10.0.0.10:80"),
                    (NS, "[::]:80"),
                    (NS2, "0.0.0.0:80"),
                ]),
                Exp::ProcListeners(
                    10,
                    vec![
                        "0.0.0.0:80",
                        "0.0.0.0:443",
                        "9.0.0.1:80",
                        "10.0.0.10:80",
                        "[::]:80",
                    ],
                ),
            ],
        ),
    ]);
}

#[test]
fn accept_and_close() {
    run(vec![
        case(
            "handshakes queue on the listener",
            vec![
                listen(1, 100, l4(), 10),
                hs(2, 200, t4(1)),
                hs(2, 201, t4(2)),
            ],
            vec![Exp::Queue(l4(), 2), Exp::Live(10, 0)],
        ),
        case(
            "a queued accept leaves the queue and goes live",
            vec![
                listen(1, 100, l4(), 10),
                hs(2, 200, t4(1)),
                hs(2, 201, t4(2)),
                acc(3, 200, t4(1), 10, true),
            ],
            vec![
                Exp::Queue(l4(), 1),
                Exp::Live(10, 1),
                Exp::Totals(10, 1, 0),
                Exp::LTotals(l4(), 1, 0),
                Exp::Holders(l4(), vec![(10, 1)]),
                Exp::Conns(10, vec![(t4(1), false, Some(l4()))]),
                Exp::ConnSince(10, t4(1), 3),
            ],
        ),
        case(
            "processes that accept without listening become holders (prefork workers)",
            vec![
                listen(1, 100, l4(), 1),
                acc(2, 200, t4(1), 11, false),
                acc(3, 201, t4(2), 12, false),
            ],
            vec![
                Exp::Procs(vec![1, 11, 12]),
                Exp::Holders(l4(), vec![(1, 0), (11, 1), (12, 1)]),
                Exp::ProcListeners(11, vec!["0.0.0.0:80"]),
                Exp::Totals(11, 1, 0),
                Exp::Totals(1, 0, 0),
                Exp::LTotals(l4(), 2, 0),
            ],
        ),
        case(
            "close ends the connection",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                close(5, 200, t4(1), 10),
            ],
            vec![
                Exp::Procs(vec![10]),
                Exp::Live(10, 0),
                Exp::Totals(10, 1, 1),
                Exp::Oldest(10, None),
                Exp::Holders(l4(), vec![(10, 0)]),
                Exp::Conns(10, vec![]),
            ],
        ),
        case(
            "close with an unknown sk falls back to the tuple",
            vec![
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(1), 71, 1, &[10])],
                    vec![(t4(1), 10)],
                ),
                close(10, 999, t4(1), 10),
            ],
            vec![Exp::Live(10, 0), Exp::Totals(10, 0, 1)],
        ),
        case(
            "close of a connection never seen is ignored",
            vec![close(5, 999, t4(1), 77)],
            vec![Exp::Procs(vec![]), Exp::Listeners(vec![])],
        ),
        case(
            "close older than the connection with that tuple is ignored",
            vec![
                snap(
                    10,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(1), 71, 1, &[10])],
                    vec![(t4(1), 10)],
                ),
                close(5, 999, t4(1), 10),
            ],
            vec![Exp::Live(10, 1)],
        ),
        case(
            "a duplicate accept is counted once",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                acc(2, 200, t4(1), 10, false),
            ],
            vec![
                Exp::Live(10, 1),
                Exp::Totals(10, 1, 0),
                Exp::LTotals(l4(), 1, 0),
            ],
        ),
        case(
            "an sk reused by a new connection replaces the stale one",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                acc(5, 200, t4(2), 10, false),
            ],
            vec![
                Exp::Live(10, 1),
                Exp::Conns(10, vec![(t4(2), false, Some(l4()))]),
                Exp::Totals(10, 2, 0),
            ],
        ),
        case(
            "a tuple reused with a new sk replaces the stale one",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                acc(5, 201, t4(1), 10, false),
                // The old socket's end, delivered late (another CPU).
                close(4, 200, t4(1), 10),
            ],
            vec![Exp::Live(10, 1), Exp::ConnSince(10, t4(1), 5)],
        ),
        case(
            "accept with no known listener still counts",
            vec![acc(2, 200, t4(1), 10, false)],
            vec![
                Exp::Procs(vec![10]),
                Exp::Live(10, 1),
                Exp::Listeners(vec![]),
                Exp::ProcListeners(10, vec![]),
                Exp::Conns(10, vec![(t4(1), false, None)]),
            ],
        ),
        case(
            "the most specific listener wins",
            vec![
                listen(1, 100, l4(), 10),
                listen(1, 101, l4s(), 20),
                listen(1, 102, l6(), 30),
                acc(2, 200, t4(1), 20, false),
                acc(2, 201, tu("10.0.0.2:80", "192.0.2.1:40002"), 10, false),
            ],
            vec![
                Exp::Holders(l4s(), vec![(20, 1)]),
                Exp::Holders(l4(), vec![(10, 1)]),
                Exp::Holders(l6(), vec![(30, 0)]),
            ],
        ),
        case(
            "an IPv4 wildcard beats the dual-stack IPv6 wildcard",
            vec![
                listen(1, 100, l6(), 30),
                listen(1, 101, l4(), 10),
                acc(2, 200, t4(1), 10, false),
            ],
            vec![
                Exp::Holders(l4(), vec![(10, 1)]),
                Exp::Holders(l6(), vec![(30, 0)]),
            ],
        ),
        case(
            "IPv6 end to end",
            vec![
                listen(1, 100, l6s(), 10),
                hs(2, 200, t6()),
                acc(3, 200, t6(), 10, true),
            ],
            vec![
                Exp::Listeners(vec![(NS, "[2001:db8::1]:443")]),
                Exp::Family(l6s(), "ipv6"),
                Exp::Queue(l6s(), 0),
                Exp::Holders(l6s(), vec![(10, 1)]),
                Exp::Conns(10, vec![(t6(), false, Some(l6s()))]),
            ],
        ),
        case(
            "IPv6 close",
            vec![
                listen(1, 100, l6s(), 10),
                acc(3, 200, t6(), 10, false),
                close(4, 200, t6(), 10),
            ],
            vec![Exp::Live(10, 0), Exp::Holders(l6s(), vec![(10, 0)])],
        ),
        case(
            "dual-stack: an IPv4-mapped accept on the IPv6 wildcard listener",
            vec![listen(1, 100, l6(), 10), acc(2, 200, tmapped(), 10, false)],
            vec![
                Exp::Family(l6(), "ipv6"),
                Exp::Holders(l6(), vec![(10, 1)]),
                Exp::Conns(10, vec![(tmapped(), false, Some(l6()))]),
            ],
        ),
        case(
            "CLOSE_WAIT has no event: only Close ends a connection",
            vec![listen(1, 100, l4(), 10), acc(2, 200, t4(1), 10, false)],
            vec![Exp::Live(10, 1), Exp::Oldest(10, Some(100_000 - 2))],
        ),
        case(
            "oldest_live_ms follows the oldest live connection",
            vec![
                acc(1_000, 200, t4(1), 10, false),
                acc(3_000, 201, t4(2), 10, false),
                close(4_000, 200, t4(1), 10),
            ],
            vec![Exp::Oldest(10, Some(100_000 - 3_000))],
        ),
        Case {
            name: "oldest_live_ms never goes negative",
            steps: vec![acc(5_000, 200, t4(1), 10, false)],
            now: 1_000,
            expect: vec![Exp::Oldest(10, Some(0)), Exp::Uptime(1_000)],
        },
    ]);
}

#[test]
fn accept_queue() {
    run(vec![
        case(
            "a queue drop leaves the queue and counts",
            vec![
                listen(1, 100, l4(), 10),
                hs(2, 200, t4(1)),
                hs(2, 201, t4(2)),
                qdrop(3, 200, t4(1)),
            ],
            vec![Exp::Queue(l4(), 1), Exp::LTotals(l4(), 0, 1)],
        ),
        case(
            "queue drops saturate at zero",
            vec![
                listen(1, 100, l4(), 10),
                qdrop(3, 200, t4(1)),
                qdrop(3, 201, t4(2)),
            ],
            vec![Exp::Queue(l4(), 0), Exp::LTotals(l4(), 0, 2)],
        ),
        case(
            "a handshake no listener matches is kept aside",
            vec![hs(2, 200, t4(1)), hs(2, 201, t4(2))],
            vec![
                Exp::Listeners(vec![]),
                Exp::Unmatched(2),
                Exp::Procs(vec![]),
            ],
        ),
        case(
            "unmatched queue drains by drop and by accept",
            vec![
                hs(2, 200, t4(1)),
                hs(2, 201, t4(2)),
                qdrop(3, 200, t4(1)),
                acc(4, 201, t4(2), 10, true),
                qdrop(5, 202, t4(3)),
            ],
            vec![Exp::Unmatched(0), Exp::Live(10, 1)],
        ),
        case(
            "a closing listener hands its queue to the unmatched count until the drops arrive",
            vec![
                listen(1, 100, l4(), 10),
                hs(2, 200, t4(1)),
                hs(2, 201, t4(2)),
                unlisten(3, 100, l4(), 10),
            ],
            vec![Exp::Listeners(vec![]), Exp::Unmatched(2)],
        ),
        case(
            "... and the drops take it back",
            vec![
                listen(1, 100, l4(), 10),
                hs(2, 200, t4(1)),
                hs(2, 201, t4(2)),
                unlisten(3, 100, l4(), 10),
                qdrop(3, 200, t4(1)),
                qdrop(3, 201, t4(2)),
            ],
            vec![Exp::Unmatched(0)],
        ),
        case(
            "the snapshot's queue beyond the counted one is a pre-existing remainder",
            vec![
                listen(1, 100, l4(), 10),
                hs(2, 200, t4(1)),
                snap(5, vec![sl(l4(), 7, 3, &[10])], vec![], vec![]),
            ],
            vec![Exp::Queue(l4(), 3)],
        ),
        case(
            "an unqueued accept takes from the remainder, a queued one from the count",
            vec![
                listen(1, 100, l4(), 10),
                hs(2, 200, t4(1)),
                snap(5, vec![sl(l4(), 7, 3, &[10])], vec![], vec![]),
                acc(6, 300, t4(2), 10, false),
                acc(6, 301, t4(3), 10, false),
                acc(6, 302, t4(4), 10, false),
                acc(7, 200, t4(1), 10, true),
            ],
            vec![Exp::Queue(l4(), 0), Exp::Live(10, 4)],
        ),
        case(
            "a snapshot with a smaller queue leaves no remainder",
            vec![
                listen(1, 100, l4(), 10),
                hs(2, 200, t4(1)),
                hs(2, 201, t4(2)),
                snap(5, vec![sl(l4(), 7, 1, &[10])], vec![], vec![]),
            ],
            vec![Exp::Queue(l4(), 2)],
        ),
    ]);
}

#[test]
fn process_exit_and_lost() {
    run(vec![
        case(
            "after lost events a rescan drops a reported connection it no longer shows",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                acc(3, 201, t4(2), 10, false),
                lost(4, 1),
                // t4(1)'s Close was among the lost: the snapshot only shows t4(2).
                snap(
                    10,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(2), 72, 1, &[10])],
                    vec![],
                ),
            ],
            vec![
                Exp::Live(10, 1),
                Exp::Conns(10, vec![(t4(2), false, Some(l4()))]),
            ],
        ),
        case(
            "without lost events too, a rescan retires a reported connection it no longer shows \
             (a reset that raced its accept)",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                acc(3, 201, t4(2), 10, false),
                snap(
                    10,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(2), 72, 1, &[10])],
                    vec![],
                ),
            ],
            vec![
                Exp::Live(10, 1),
                Exp::Conns(10, vec![(t4(2), false, Some(l4()))]),
                Exp::Retired(vec![(200, 2)]),
            ],
        ),
        case(
            "a rescan that could not read the holder's fds retires none of its connections",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                // The listener is in the dump, but pid 10's fd table was
                // unreadable: no holder, no connection.
                snap(10, vec![sl(l4(), 7, 0, &[])], vec![], vec![]),
            ],
            vec![
                Exp::Conns(10, vec![(t4(1), false, Some(l4()))]),
                Exp::Retired(vec![]),
            ],
        ),
        case(
            "a connection accepted during or after the snapshot survives it",
            vec![
                listen(1, 100, l4(), 10),
                acc(10, 200, t4(1), 10, false),
                acc(12, 201, t4(2), 10, false),
                snap(10, vec![sl(l4(), 7, 0, &[10])], vec![], vec![]),
            ],
            vec![Exp::Live(10, 2), Exp::Retired(vec![])],
        ),
        case(
            "exit removes the process from listeners and connections",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                exit(5, 10),
            ],
            vec![
                Exp::Procs(vec![]),
                // The socket itself goes with its ListenStop.
                Exp::Listeners(vec![(NS, "0.0.0.0:80")]),
                Exp::Holders(l4(), vec![]),
                Exp::Conns(10, vec![]),
                Exp::Live(10, 0),
            ],
        ),
        case(
            "exit keeps a shared connection for the other holder",
            vec![
                snap(
                    1,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(1), 71, 1, &[10, 20])],
                    vec![(t4(1), 10)],
                ),
                exit(5, 10),
            ],
            vec![
                Exp::Procs(vec![20]),
                Exp::Live(20, 1),
                Exp::Totals(20, 0, 0),
                Exp::ConnHolders(20, t4(1), vec![20]),
            ],
        ),
        case(
            "the kernel's Close after an exit is ignored",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                exit(5, 10),
                close(6, 200, t4(1), 10),
                unlisten(6, 100, l4(), 10),
            ],
            vec![Exp::Procs(vec![]), Exp::Listeners(vec![])],
        ),
        case(
            "a late birth of an exited process does not resurrect it",
            vec![
                exit(10, 10),
                listen(4, 100, l4(), 10),
                acc(5, 200, t4(1), 10, false),
            ],
            vec![
                Exp::Procs(vec![]),
                Exp::Holders(l4(), vec![]),
                Exp::LTotals(l4(), 1, 0),
            ],
        ),
        case(
            "a recycled pid starts fresh",
            vec![
                acc(2, 200, t4(1), 10, false),
                exit(10, 10),
                listen(20, 100, l4(), 10),
            ],
            vec![
                Exp::Procs(vec![10]),
                Exp::Totals(10, 0, 0),
                Exp::Live(10, 0),
            ],
        ),
        case(
            "a process that let go of everything is forgotten",
            vec![
                acc(2, 200, t4(1), 10, false),
                close(3, 200, t4(1), 10),
                acc(4, 201, t4(2), 10, false),
            ],
            vec![Exp::Procs(vec![10]), Exp::Totals(10, 1, 0)],
        ),
        case(
            "exit of an unknown pid is harmless",
            vec![listen(1, 100, l4(), 10), exit(5, 99)],
            vec![Exp::Procs(vec![10])],
        ),
        case(
            "lost events: the latest total",
            vec![lost(1, 3), lost(2, 7)],
            vec![Exp::Lost(7)],
        ),
    ]);
}

#[test]
fn handover() {
    run(vec![
        case(
            "fd passing: old and new process both accept from one socket",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                acc(3, 201, t4(2), 10, false),
                // The new process got the fd by passing (no event) and accepts.
                acc(5, 202, t4(3), 20, false),
            ],
            vec![
                Exp::Holders(l4(), vec![(10, 2), (20, 1)]),
                Exp::Live(10, 2),
                Exp::Live(20, 1),
                Exp::ProcListeners(20, vec!["0.0.0.0:80"]),
            ],
        ),
        case(
            "fd passing: the old process drains, then exits",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                acc(3, 201, t4(2), 10, false),
                acc(5, 202, t4(3), 20, false),
                close(6, 200, t4(1), 10),
                close(7, 201, t4(2), 10),
                exit(8, 10),
            ],
            vec![
                Exp::Procs(vec![20]),
                Exp::Holders(l4(), vec![(20, 1)]),
                Exp::Listeners(vec![(NS, "0.0.0.0:80")]),
            ],
        ),
        case(
            "SO_REUSEPORT: the old socket closes while its process still drains",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                listen(5, 101, l4(), 20),
                acc(6, 201, t4(2), 20, false),
                unlisten(7, 100, l4(), 10),
            ],
            vec![
                Exp::Procs(vec![10, 20]),
                Exp::Holders(l4(), vec![(20, 1)]),
                Exp::Live(10, 1),
                Exp::ProcListeners(10, vec![]),
                Exp::Conns(10, vec![(t4(1), false, Some(l4()))]),
            ],
        ),
        case(
            "SO_REUSEPORT: drained old process leaves the status",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                listen(5, 101, l4(), 20),
                unlisten(7, 100, l4(), 10),
                close(8, 200, t4(1), 10),
            ],
            vec![Exp::Procs(vec![20]), Exp::Live(10, 0)],
        ),
    ]);
}

#[test]
fn snapshots() {
    run(vec![
        case(
            "startup snapshot: pre-existing connections, charged to their first holder",
            vec![snap(
                1_000,
                vec![sl(l4(), 7, 0, &[10, 11])],
                vec![sc(t4(1), 71, 1, &[11]), sc(t4(2), 72, 8, &[11, 12])],
                vec![(t4(1), 11), (t4(2), 11)],
            )],
            vec![
                Exp::Procs(vec![10, 11, 12]),
                Exp::Live(11, 2),
                Exp::Live(12, 1),
                Exp::Comm(11, "s11"),
                Exp::Oldest(11, Some(99_000)),
                Exp::Conns(
                    11,
                    vec![(t4(1), true, Some(l4())), (t4(2), true, Some(l4()))],
                ),
                Exp::ConnSince(11, t4(1), 1_000),
                Exp::Holders(l4(), vec![(10, 0), (11, 2)]),
                Exp::ProcListeners(12, vec![]),
                Exp::Totals(11, 0, 0),
            ],
        ),
        case(
            "dual-stack: a plain IPv4 tuple from the snapshot on the IPv6 wildcard listener",
            vec![snap(
                1,
                vec![sl(l6(), 7, 0, &[10])],
                vec![sc(t4(1), 71, 1, &[10])],
                vec![(t4(1), 10)],
            )],
            vec![
                Exp::Family(l6(), "ipv6"),
                Exp::Holders(l6(), vec![(10, 1)]),
                Exp::Conns(10, vec![(t4(1), true, Some(l6()))]),
            ],
        ),
        case(
            "a CLOSE_WAIT connection in the snapshot is live",
            vec![snap(
                1,
                vec![sl(l4(), 7, 0, &[10])],
                vec![sc(t4(1), 71, 8, &[10])],
                vec![(t4(1), 10)],
            )],
            vec![Exp::Live(10, 1)],
        ),
        case(
            "snapshot holders replace older listener holders",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 11, false),
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[20])],
                    vec![sc(t4(1), 71, 1, &[11])],
                    vec![],
                ),
            ],
            vec![
                Exp::Holders(l4(), vec![(20, 0)]),
                Exp::Procs(vec![11, 20]),
                Exp::ProcListeners(11, vec![]),
            ],
        ),
        case(
            "snapshot holders add to listener holders; the named socket keeps its sk",
            vec![
                listen(1, 100, l4(), 10),
                snap(5, vec![sl(l4(), 7, 0, &[10, 20])], vec![], vec![]),
                unlisten(6, 100, l4(), 20),
            ],
            vec![Exp::Listeners(vec![]), Exp::Procs(vec![])],
        ),
        case(
            "holders learned after the snapshot survive it",
            vec![
                listen(1, 100, l4(), 10),
                acc(9, 200, t4(1), 30, false),
                snap(5, vec![sl(l4(), 7, 0, &[10])], vec![], vec![]),
            ],
            vec![Exp::Holders(l4(), vec![(10, 0), (30, 1)])],
        ),
        case(
            "a listener learned after the snapshot survives it",
            vec![listen(6, 100, l4(), 10), snap(5, vec![], vec![], vec![])],
            vec![
                Exp::Listeners(vec![(NS, "0.0.0.0:80")]),
                Exp::Holders(l4(), vec![(10, 0)]),
            ],
        ),
        case(
            "a listener learned before the snapshot and absent from it is gone",
            vec![listen(1, 100, l4(), 10), snap(5, vec![], vec![], vec![])],
            vec![Exp::Listeners(vec![]), Exp::Procs(vec![])],
        ),
        case(
            "a listener closed after the snapshot is not brought back",
            vec![
                listen(1, 100, l4(), 10),
                unlisten(6, 100, l4(), 10),
                snap(5, vec![sl(l4(), 7, 0, &[10])], vec![], vec![]),
            ],
            vec![Exp::Listeners(vec![]), Exp::Procs(vec![])],
        ),
        case(
            "a listener started and closed after the snapshot does not hide another",
            vec![
                listen(6, 100, l4(), 20),
                unlisten(7, 100, l4(), 20),
                snap(5, vec![sl(l4(), 7, 0, &[10])], vec![], vec![]),
            ],
            vec![
                Exp::Listeners(vec![(NS, "0.0.0.0:80")]),
                Exp::Holders(l4(), vec![(10, 0)]),
            ],
        ),
        case(
            "startup order: a ListenStart older than the merged snapshot names its socket",
            vec![
                snap(5, vec![sl(l4(), 7, 0, &[10])], vec![], vec![]),
                listen(1, 100, l4(), 10),
            ],
            vec![
                Exp::Listeners(vec![(NS, "0.0.0.0:80")]),
                Exp::Holders(l4(), vec![(10, 0)]),
            ],
        ),
        case(
            "startup order: ... so its ListenStop removes the listener",
            vec![
                snap(5, vec![sl(l4(), 7, 0, &[10])], vec![], vec![]),
                listen(1, 100, l4(), 10),
                unlisten(8, 100, l4(), 10),
            ],
            vec![Exp::Listeners(vec![])],
        ),
        case(
            "a ListenStop older than the snapshot for an unknown socket is ignored",
            vec![
                snap(5, vec![sl(l4(), 7, 0, &[10])], vec![], vec![]),
                unlisten(3, 999, l4(), 10),
            ],
            vec![Exp::Listeners(vec![(NS, "0.0.0.0:80")])],
        ),
        case(
            "a ListenStop newer than the snapshot closes a socket only the snapshot knew",
            vec![
                snap(5, vec![sl(l4(), 7, 0, &[10])], vec![], vec![]),
                unlisten(8, 999, l4(), 10),
            ],
            vec![Exp::Listeners(vec![])],
        ),
        case(
            "two snapshot sockets on one address: the closer's goes",
            vec![
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10]), sl(l4(), 8, 0, &[20])],
                    vec![],
                    vec![],
                ),
                unlisten(8, 999, l4(), 10),
            ],
            vec![Exp::Holders(l4(), vec![(20, 0)])],
        ),
        case(
            "dedupe, events first: an accepted connection in the snapshot is not added again",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(1), 71, 1, &[10])],
                    vec![],
                ),
            ],
            vec![
                Exp::Live(10, 1),
                Exp::Totals(10, 1, 0),
                Exp::Conns(10, vec![(t4(1), false, Some(l4()))]),
                Exp::ConnSince(10, t4(1), 2),
            ],
        ),
        case(
            "dedupe, snapshot first: the older accept replaces the pre-existing entry",
            vec![
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(1), 71, 1, &[10])],
                    vec![(t4(1), 10)],
                ),
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
            ],
            vec![
                Exp::Live(10, 1),
                Exp::Totals(10, 1, 0),
                Exp::Conns(10, vec![(t4(1), false, Some(l4()))]),
                Exp::ConnSince(10, t4(1), 2),
            ],
        ),
        case(
            "dedupe, snapshot first: its Close then ends it",
            vec![
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(1), 71, 1, &[10])],
                    vec![(t4(1), 10)],
                ),
                acc(2, 200, t4(1), 10, false),
                close(9, 200, t4(1), 10),
            ],
            vec![Exp::Live(10, 0)],
        ),
        case(
            "the snapshot shares an accepted connection with a second holder",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10, 20])],
                    vec![sc(t4(1), 71, 1, &[10, 20])],
                    vec![],
                ),
            ],
            vec![
                Exp::Live(10, 1),
                Exp::Live(20, 1),
                Exp::ConnHolders(10, t4(1), vec![10, 20]),
                Exp::Holders(l4(), vec![(10, 1), (20, 1)]),
            ],
        ),
        case(
            "snapshot holders win over an older accept, in either order",
            vec![
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10, 20])],
                    vec![sc(t4(1), 71, 1, &[20])],
                    vec![(t4(1), 20)],
                ),
                acc(2, 200, t4(1), 10, false),
            ],
            vec![
                Exp::Live(10, 0),
                Exp::Live(20, 1),
                Exp::ConnHolders(20, t4(1), vec![20]),
                Exp::Totals(10, 1, 0),
            ],
        ),
        case(
            "a rescan repairs a pre-existing connection that ended unseen",
            vec![
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(1), 71, 1, &[10]), sc(t4(2), 72, 1, &[10])],
                    vec![(t4(1), 10), (t4(2), 10)],
                ),
                snap(
                    50,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(2), 72, 1, &[10])],
                    vec![],
                ),
            ],
            vec![
                Exp::Live(10, 1),
                Exp::Conns(10, vec![(t4(2), true, Some(l4()))]),
                Exp::Oldest(10, Some(100_000 - 5)),
            ],
        ),
        case(
            "a rescan keeps a pre-existing connection whose listener it cannot see",
            vec![
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(1), 71, 1, &[10])],
                    vec![(t4(1), 10)],
                ),
                snap(50, vec![], vec![], vec![]),
            ],
            vec![
                Exp::Live(10, 1),
                Exp::Listeners(vec![]),
                Exp::Conns(10, vec![(t4(1), true, None)]),
            ],
        ),
        case(
            "a rescan adds a connection whose accept was lost",
            vec![
                listen(1, 100, l4(), 10),
                snap(
                    50,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(1), 71, 1, &[10])],
                    vec![(t4(1), 10)],
                ),
            ],
            vec![Exp::Live(10, 1)],
        ),
        case(
            "the same snapshot twice adds nothing the second time",
            vec![
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(1), 71, 1, &[10])],
                    vec![(t4(1), 10)],
                ),
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(1), 71, 1, &[10])],
                    vec![],
                ),
            ],
            vec![Exp::Live(10, 1), Exp::Holders(l4(), vec![(10, 1)])],
        ),
        case(
            "a connection closed after the snapshot is not brought back",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                close(7, 200, t4(1), 10),
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(1), 71, 1, &[10])],
                    vec![],
                ),
            ],
            vec![Exp::Live(10, 0)],
        ),
        case(
            "a connection accepted after the snapshot keeps the event's view",
            vec![
                listen(1, 100, l4(), 10),
                acc(7, 200, t4(1), 10, false),
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10, 20])],
                    vec![sc(t4(1), 71, 1, &[20])],
                    vec![],
                ),
            ],
            vec![
                Exp::Live(10, 1),
                Exp::Live(20, 0),
                Exp::ConnSince(10, t4(1), 7),
            ],
        ),
        case(
            "a holder that exited after the snapshot is not brought back",
            vec![
                exit(7, 20),
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10, 20])],
                    vec![sc(t4(1), 71, 1, &[20])],
                    vec![],
                ),
            ],
            vec![Exp::Procs(vec![10]), Exp::Holders(l4(), vec![(10, 0)])],
        ),
        case(
            "PreexistingClose ends it and counts for each holder",
            vec![
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(1), 71, 1, &[10, 20])],
                    vec![(t4(1), 10)],
                ),
                pclose(9, t4(1), 10),
            ],
            vec![
                Exp::Live(10, 0),
                Exp::Totals(10, 0, 1),
                Exp::Procs(vec![10]),
            ],
        ),
        case(
            "PreexistingClose for an accepted connection is ignored",
            vec![
                listen(1, 100, l4(), 10),
                acc(2, 200, t4(1), 10, false),
                pclose(9, t4(1), 10),
            ],
            vec![Exp::Live(10, 1)],
        ),
        case(
            "PreexistingClose for an unknown tuple is ignored",
            vec![listen(1, 100, l4(), 10), pclose(9, t4(1), 10)],
            vec![Exp::Live(10, 0), Exp::Totals(10, 0, 0)],
        ),
        case(
            "forget_connection removes a pre-existing connection",
            vec![
                snap(
                    5,
                    vec![sl(l4(), 7, 0, &[10])],
                    vec![sc(t4(1), 71, 1, &[10])],
                    vec![(t4(1), 10)],
                ),
                Step::Forget(t4(1)),
                Step::Forget(t4(2)),
            ],
            vec![
                Exp::Live(10, 0),
                Exp::Totals(10, 0, 0),
                Exp::Procs(vec![10]),
            ],
        ),
        case(
            "comm: the snapshot is newer than the ListenStart",
            vec![
                listen(1, 100, l4(), 10),
                snap(5, vec![sl(l4(), 7, 0, &[10])], vec![], vec![]),
            ],
            vec![Exp::Comm(10, "s10")],
        ),
        case(
            "comm: an event newer than the snapshot",
            vec![
                snap(5, vec![sl(l4(), 7, 0, &[10])], vec![], vec![]),
                acc(6, 200, t4(1), 10, false),
            ],
            vec![Exp::Comm(10, "e10")],
        ),
    ]);
}

#[test]
fn queries() {
    run(vec![case(
        "connections_of is oldest first; live_of filters by port",
        vec![
            listen(1, 100, l4(), 10),
            listen(1, 101, la("0.0.0.0:443"), 10),
            acc(3, 200, tp(80, 1), 10, false),
            acc(1, 201, tp(443, 2), 10, false),
            acc(2, 202, tp(80, 3), 10, false),
            acc(2, 203, tp(80, 4), 20, false),
        ],
        vec![
            Exp::Conns(
                10,
                vec![
                    (tp(443, 2), false, Some(la("0.0.0.0:443"))),
                    (tp(80, 3), false, Some(l4())),
                    (tp(80, 1), false, Some(l4())),
                ],
            ),
            Exp::LiveOf(10, vec![], 3),
            Exp::LiveOf(10, vec![443], 1),
            Exp::LiveOf(10, vec![80, 443], 3),
            Exp::LiveOf(10, vec![8080], 0),
            Exp::LiveOf(99, vec![], 0),
            Exp::LiveOf(20, vec![80], 1),
            Exp::Uptime(100_000),
        ],
    )]);
}

#[test]
fn tombstones_are_bounded_and_pruned() {
    let mut t = Tracker::new();
    for i in 0..(1u64 << 16) + 100 {
        let tuple = tu(
            "10.0.0.1:80",
            &format!("192.0.2.{}:{}", i / 60_000, 1 + i % 60_000),
        );
        t.apply(&ConnEvent::Accept {
            at: ms(i),
            sk: i,
            tuple,
            pid: 10,
            comm: String::new(),
            was_queued: false,
        });
        t.apply(&ConnEvent::Close {
            at: ms(i),
            sk: i,
            tuple,
            pid: 10,
            by_exit: false,
        });
    }
    assert_eq!(t.closed.len(), 1 << 16);
    t.merge_snapshot(&Snapshot {
        at: ms(1 << 16),
        ..Snapshot::default()
    });
    assert_eq!(t.closed.len(), 100);
}

// --- randomized ---------------------------------------------------------------

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn pids(&mut self, pool: &[u32]) -> Vec<u32> {
        let mut v: Vec<u32> = (0..1 + self.below(3)).map(|_| self.pick(pool)).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

#[test]
fn random_sequences_keep_the_invariants() {
    let addrs = [
        l4(),
        l4s(),
        l6(),
        la("0.0.0.0:81"),
        la_ns(NS2, "0.0.0.0:80"),
        la("[::ffff:10.0.0.1]:80"),
    ];
    let locals = [
        "10.0.0.1:80",
        "10.0.0.2:80",
        "[::ffff:10.0.0.1]:80",
        "10.0.0.1:81",
        "[::1]:80",
    ];
    let remotes = ["192.0.2.1:1", "192.0.2.1:2", "[2001:db8::9]:3"];
    let mut tuples = Vec::new();
    for ns in [NS, NS2] {
        for l in locals {
            for r in remotes {
                tuples.push(tu_ns(ns, l, r));
            }
        }
    }
    let pids = [1u32, 2, 3, 4, 5];
    let conn_sks = [1u64, 2, 3, 4, 5, 6, 7, 8];
    let listen_sks = [100u64, 101, 102, 103];

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for seq in 0..2_000 {
        let mut t = Tracker::new();
        let mut now = 1_000u64;
        for step in 0..60 {
            // Mostly forward, sometimes out of order, as events and
            // snapshots interleave.
            now = match rng.below(10) {
                0 => now.saturating_sub(rng.below(20) as u64),
                _ => now + rng.below(5) as u64,
            };
            let at = ms(now);
            let ev = match rng.below(13) {
                0 | 1 => ConnEvent::ListenStart {
                    at,
                    sk: rng.pick(&listen_sks),
                    addr: rng.pick(&addrs),
                    pid: rng.pick(&pids),
                    comm: "x".to_owned(),
                },
                2 => ConnEvent::ListenStop {
                    at,
                    sk: rng.pick(&listen_sks),
                    addr: rng.pick(&addrs),
                    pid: rng.pick(&pids),
                    comm: String::new(),
                },
                3 => ConnEvent::Handshake {
                    at,
                    sk: rng.pick(&conn_sks),
                    tuple: rng.pick(&tuples),
                },
                4..=6 => ConnEvent::Accept {
                    at,
                    sk: rng.pick(&conn_sks),
                    tuple: rng.pick(&tuples),
                    pid: rng.pick(&pids),
                    comm: "y".to_owned(),
                    was_queued: rng.below(2) == 0,
                },
                7 | 8 => ConnEvent::Close {
                    at,
                    sk: rng.pick(&conn_sks),
                    tuple: rng.pick(&tuples),
                    pid: rng.pick(&pids),
                    by_exit: false,
                },
                9 => ConnEvent::QueueDrop {
                    at,
                    sk: rng.pick(&conn_sks),
                    tuple: rng.pick(&tuples),
                },
                10 => ConnEvent::PreexistingClose {
                    at,
                    tuple: rng.pick(&tuples),
                    pid: rng.pick(&pids),
                    by_exit: false,
                },
                11 => ConnEvent::ProcessExit {
                    at,
                    pid: rng.pick(&pids),
                },
                _ => ConnEvent::Lost {
                    at,
                    total: rng.next() % 10,
                },
            };
            match rng.below(12) {
                0 => {
                    let snap = Snapshot {
                        at: ms(now.saturating_sub(rng.below(10) as u64)),
                        listeners: (0..rng.below(4))
                            .map(|_| {
                                let h = rng.pids(&pids);
                                sl(
                                    rng.pick(&addrs),
                                    1 + rng.below(4) as u64,
                                    rng.below(3) as u32,
                                    &h,
                                )
                            })
                            .collect(),
                        connections: (0..rng.below(6))
                            .map(|_| {
                                let h = rng.pids(&pids);
                                sc(rng.pick(&tuples), 0, 1, &h)
                            })
                            .collect(),
                    };
                    let added = t.merge_snapshot(&snap);
                    for (tuple, pid) in &added {
                        let c = t.connections_of(*pid);
                        assert!(
                            c.iter().any(|c| c.tuple == *tuple && c.preexisting),
                            "seq {seq} step {step}: returned connection not held by its charged pid"
                        );
                    }
                }
                1 => t.forget_connection(&rng.pick(&tuples)),
                _ => t.apply(&ev),
            }
            check_invariants(
                &t,
                ms(now + rng.below(3) as u64),
                &format!("seq {seq} step {step}"),
            );
        }
    }
}

// --- JSON schema --------------------------------------------------------------

const SCHEMA: &str = include_str!("../../schema/status.schema.json");

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
        listen(1, 100, l4(), 10),
        listen(1, 101, l6(), 10),
        listen(1, 102, la_ns(NS2, "[2001:db8::1]:443"), 30),
        hs(2, 300, t4(9)),
        acc(2, 200, t4(1), 10, false),
        acc(3, 201, tmapped(), 11, false),
        acc(
            4,
            202,
            tu_ns(NS2, "[2001:db8::1]:443", "[2001:db8::99]:5000"),
            30,
            false,
        ),
        close(
            5,
            202,
            tu_ns(NS2, "[2001:db8::1]:443", "[2001:db8::99]:5000"),
            30,
        ),
        qdrop(5, 301, t4(8)),
        snap(
            6,
            vec![
                sl(l4(), 7, 4, &[10, 20]),
                sl(l6(), 8, 0, &[10]),
                sl(la_ns(NS2, "[2001:db8::1]:443"), 9, 0, &[30]),
            ],
            vec![sc(t4(1), 71, 1, &[10, 20]), sc(t4(2), 72, 8, &[20])],
            vec![(t4(2), 20)],
        ),
        lost(7, 3),
    ];
    run_steps("busy", &steps).status(ms(u64::from(u32::MAX) * 1000))
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
    assert!(busy.listeners.iter().any(|l| l.family == "ipv6"));
    assert!(busy.listeners.iter().any(|l| l.accept_queue > 0));
    let extreme = Status {
        schema: STATUS_SCHEMA.to_owned(),
        uptime_ms: u64::MAX,
        processes: vec![ProcessStatus {
            pid: u32::MAX,
            comm: "a-15-byte-name!".to_owned(),
            live: u64::MAX,
            listeners: vec!["[fe80::1%2]:65535".to_owned()],
            accepted_total: u64::MAX,
            closed_total: 0,
            oldest_live_ms: Some(u64::MAX),
        }],
        listeners: vec![],
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
            || name.starts_with("missing") && name != "missing oldest_live_ms";
        if serde_can_tell {
            assert!(
                serde_json::from_value::<Status>(instance).is_err(),
                "{name}: serde accepted it"
            );
        }
    }
}

// --- what must be published at once ------------------------------------------

#[test]
fn significant_changes_are_flagged_once() {
    let addr = la("10.0.0.1:80");
    let mut t = Tracker::new();
    let mut apply = |step: Step| -> bool {
        let Step::Ev(ev) = step else {
            unreachable!("events only")
        };
        t.apply(&ev);
        t.take_significant()
    };
    // (step, significant): listeners, exits and lost events; connections
    // coming and going never, not even a process's last.
    let table = [
        (listen(1, 100, addr, 1), true),
        (hs(2, 1, t4(1)), false),
        (acc(3, 1, t4(1), 1, true), false),
        (hs(4, 2, t4(2)), false),
        (acc(5, 2, t4(2), 1, true), false),
        (close(6, 1, t4(1), 1), false),
        (hs(7, 3, t4(3)), false),
        (qdrop(8, 3, t4(3)), false),
        (close(9, 2, t4(2), 1), false),
        (acc(10, 4, t4(4), 1, false), false),
        (lost(11, 3), true),
        (close(12, 4, t4(4), 1), false),
        (unlisten(13, 100, addr, 1), true),
        (exit(14, 1), true),
    ];
    for (i, (step, want)) in table.into_iter().enumerate() {
        assert_eq!(apply(step), want, "step {i}");
    }
}

#[test]
fn connection_lists_for_several_pids_count_each_connection_once() {
    // Pid 10 accepted three connections on port 80 and one on port 81; the
    // oldest on port 80 is shared with pid 11 (fork); pid 12 holds one.
    let t = run_steps(
        "lists",
        &[
            listen(1, 100, l4(), 10),
            acc(2, 200, t4(1), 10, false),
            acc(3, 201, t4(2), 10, false),
            acc(4, 202, tp(81, 3), 10, false),
            acc(5, 203, t4(4), 12, false),
            acc(6, 204, t4(5), 10, false),
            snap(
                7,
                vec![sl(l4(), 7, 0, &[10, 11, 12])],
                vec![
                    sc(t4(1), 71, 1, &[10, 11]),
                    sc(t4(2), 72, 1, &[10]),
                    sc(tp(81, 3), 73, 1, &[10]),
                    sc(t4(4), 74, 1, &[12]),
                    sc(t4(5), 75, 1, &[10]),
                ],
                vec![],
            ),
        ],
    );
    let tuples = |v: &[ConnInfo]| v.iter().map(|c| c.tuple).collect::<Vec<_>>();
    // The shared one appears once, oldest first.
    assert_eq!(
        tuples(&t.connections_of_any(&[11, 10])),
        vec![t4(1), t4(2), tp(81, 3), t4(5)]
    );
    assert_eq!(t.connections_of(11).len(), 1);
    // Count of all, only the k oldest listed, in order.
    let (n, oldest) = t.oldest_of(&[10, 11, 12], &[], 2);
    assert_eq!((n, tuples(&oldest)), (5, vec![t4(1), t4(2)]));
    assert_eq!(oldest[0].holders, vec![10, 11]);
    // Restricted to ports.
    let (n, oldest) = t.oldest_of(&[10], &[81], 10);
    assert_eq!((n, tuples(&oldest)), (1, vec![tp(81, 3)]));
    let (n, oldest) = t.oldest_of(&[10, 12], &[80], 3);
    assert_eq!((n, tuples(&oldest)), (4, vec![t4(1), t4(2), t4(4)]));
    // k = 0: the count alone; nobody's: nothing.
    assert_eq!(t.oldest_of(&[10], &[], 0), (4, vec![]));
    assert_eq!(t.oldest_of(&[99], &[], 5), (0, vec![]));
    // The list and the count agree with the full listing.
    let all = t.connections_of_any(&[10, 11, 12]);
    let (n, oldest) = t.oldest_of(&[10, 11, 12], &[], usize::MAX);
    assert_eq!((n as usize, &oldest), (all.len(), &all));
}
