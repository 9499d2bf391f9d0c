//! The test kit: named builders for events, snapshots and expected status
//! fragments, the table runner with its [`case!`] macro (one `#[test]` per
//! row, so a failure names its case and rows run in parallel), and the
//! invariants checked after every step.

pub(super) use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

pub(super) use crate::event::{
    ConnEvent, Holder, ListenAddr, NetNs, SnapConn, SnapListener, Snapshot, Tuple,
};
pub(super) use crate::tracker::{
    ConnInfo, Family, GenerationStatus, ListenerStatus, ProcessStatus, STATUS_SCHEMA, Status,
    Tracker,
};

/// One table row as its own test: `case!(name, [steps], [expected])`, or
/// `case!(name, now = MS, [steps], [expected])` to read the status at another
/// time than 100 s.
macro_rules! case {
    ($name:ident, now = $now:expr, [$($step:expr),* $(,)?], [$($expect:expr),* $(,)?] $(,)?) => {
        #[test]
        fn $name() {
            $crate::tracker::tests::kit::run_case(
                stringify!($name),
                &[$($step),*],
                $now,
                &[$($expect),*],
            );
        }
    };
    ($name:ident, [$($step:expr),* $(,)?], [$($expect:expr),* $(,)?] $(,)?) => {
        case!($name, now = 100_000, [$($step),*], [$($expect),*]);
    };
}

/// The host namespace and another one.
pub(super) const NS: NetNs = 4_026_531_840;
pub(super) const NS2: NetNs = 4_026_532_001;

// --- vocabulary -------------------------------------------------------------

/// `n` milliseconds of the monotonic clock events are stamped with.
pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Parses `ip:port`.
pub(super) fn socket_addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A listening address in the default namespace [`NS`].
pub(super) fn listen_addr(s: &str) -> ListenAddr {
    listen_addr_in(NS, s)
}

/// A listening address in namespace `netns`.
pub(super) fn listen_addr_in(netns: NetNs, s: &str) -> ListenAddr {
    ListenAddr {
        netns,
        local: socket_addr(s),
    }
}

/// A connection `local` <- `remote` in the default namespace [`NS`].
pub(super) fn tuple(local: &str, remote: &str) -> Tuple {
    tuple_in(NS, local, remote)
}

/// A connection `local` <- `remote` in namespace `netns`.
pub(super) fn tuple_in(netns: NetNs, local: &str, remote: &str) -> Tuple {
    Tuple {
        netns,
        local: socket_addr(local),
        remote: socket_addr(remote),
    }
}

/// Connection `n` to 10.0.0.1:80.
pub(super) fn conn_v4(n: u16) -> Tuple {
    tuple("10.0.0.1:80", &format!("192.0.2.1:{}", 40000 + n))
}

/// Connection `n` to 10.0.0.1:`port`.
pub(super) fn conn_v4_port(port: u16, n: u16) -> Tuple {
    tuple(
        &format!("10.0.0.1:{port}"),
        &format!("192.0.2.1:{}", 40000 + n),
    )
}

/// The IPv4 wildcard listener on port 80.
pub(super) fn wildcard_v4() -> ListenAddr {
    listen_addr("0.0.0.0:80")
}

/// A listener on one IPv4 address, port 80 (more specific than the wildcard).
pub(super) fn specific_v4() -> ListenAddr {
    listen_addr("10.0.0.1:80")
}

/// The IPv6 wildcard listener on port 80 (dual stack).
pub(super) fn wildcard_v6() -> ListenAddr {
    listen_addr("[::]:80")
}

/// A listener on one IPv6 address, port 443.
pub(super) fn specific_v6() -> ListenAddr {
    listen_addr("[2001:db8::1]:443")
}

/// A connection to `specific_v6()`.
pub(super) fn conn_v6() -> Tuple {
    tuple("[2001:db8::1]:443", "[2001:db8::99]:50000")
}

/// An IPv4 client of a dual-stack IPv6 socket, as the kernel reports it.
pub(super) fn conn_v4_mapped() -> Tuple {
    tuple("[::ffff:10.0.0.1]:80", "[::ffff:192.0.2.7]:40007")
}

/// The comm an event reports for `pid` (a snapshot reports `s{pid}`).
pub(super) fn event_comm(pid: u32) -> String {
    format!("e{pid}")
}

pub(super) fn listen_start(at: u64, sk: u64, addr: ListenAddr, pid: u32) -> Step {
    Step::Ev(ConnEvent::ListenStart {
        at: ms(at),
        sk,
        addr,
        pid,
        comm: event_comm(pid),
    })
}

pub(super) fn listen_stop(at: u64, sk: u64, addr: ListenAddr, pid: u32) -> Step {
    Step::Ev(ConnEvent::ListenStop {
        at: ms(at),
        sk,
        addr,
        pid,
        comm: event_comm(pid),
    })
}

pub(super) fn handshake(at: u64, sk: u64, tuple: Tuple) -> Step {
    Step::Ev(ConnEvent::Handshake {
        at: ms(at),
        sk,
        tuple,
    })
}

/// A process accepts a connection that was not counted in the queue (its
/// handshake came before the programs attached, or was not seen).
pub(super) fn accept(at: u64, sk: u64, tuple: Tuple, pid: u32) -> Step {
    accept_event(at, sk, tuple, pid, false)
}

/// A process accepts a connection whose handshake was counted in the queue.
pub(super) fn accept_queued(at: u64, sk: u64, tuple: Tuple, pid: u32) -> Step {
    accept_event(at, sk, tuple, pid, true)
}

fn accept_event(at: u64, sk: u64, tuple: Tuple, pid: u32, was_queued: bool) -> Step {
    Step::Ev(ConnEvent::Accept {
        at: ms(at),
        sk,
        tuple,
        pid,
        comm: event_comm(pid),
        was_queued,
    })
}

pub(super) fn close(at: u64, sk: u64, tuple: Tuple, pid: u32) -> Step {
    Step::Ev(ConnEvent::Close {
        at: ms(at),
        sk,
        tuple,
        pid,
        by_exit: false,
    })
}

/// A close because its process was exiting.
pub(super) fn close_by_exit(at: u64, sk: u64, tuple: Tuple, pid: u32) -> Step {
    Step::Ev(ConnEvent::Close {
        at: ms(at),
        sk,
        tuple,
        pid,
        by_exit: true,
    })
}

pub(super) fn queue_drop(at: u64, sk: u64, tuple: Tuple) -> Step {
    Step::Ev(ConnEvent::QueueDrop {
        exiting: 0,
        at: ms(at),
        sk,
        tuple,
    })
}

pub(super) fn preexisting_close(at: u64, tuple: Tuple, pid: u32) -> Step {
    Step::Ev(ConnEvent::PreexistingClose {
        at: ms(at),
        tuple,
        pid,
        by_exit: false,
    })
}

pub(super) fn process_exit(at: u64, pid: u32) -> Step {
    Step::Ev(ConnEvent::ProcessExit { at: ms(at), pid })
}

pub(super) fn lost_events(at: u64, total: u64) -> Step {
    Step::Ev(ConnEvent::Lost { at: ms(at), total })
}

/// Holders as a snapshot reports them (comm `s{pid}`).
pub(super) fn holders(pids: &[u32]) -> Vec<Holder> {
    pids.iter()
        .map(|&pid| Holder {
            pid,
            comm: format!("s{pid}"),
        })
        .collect()
}

/// A listening socket in a snapshot, with its accept queue and holders.
pub(super) fn snap_listener(
    addr: ListenAddr,
    inode: u64,
    accept_queue: u32,
    pids: &[u32],
) -> SnapListener {
    SnapListener {
        addr,
        inode,
        accept_queue,
        holders: holders(pids),
    }
}

/// TCP states as `sock_diag` reports them.
pub(super) const ESTABLISHED: u8 = 1;
pub(super) const CLOSE_WAIT: u8 = 8;

/// A connection in a snapshot, in TCP `state`, with its holders.
pub(super) fn snap_conn(tuple: Tuple, inode: u64, state: u8, pids: &[u32]) -> SnapConn {
    SnapConn {
        tuple,
        inode,
        state,
        holders: holders(pids),
    }
}

/// A snapshot step and the (tuple, pid charged) pairs it must return.
pub(super) fn snapshot(
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

/// The source found `tuple` gone without an event ([`Tracker::forget_connection`]).
pub(super) fn forget(tuple: Tuple) -> Step {
    Step::Forget(tuple)
}

/// A fresh read of `pid`'s fd table from `at` ms found these socket
/// inodes; `releases` is what [`Tracker::fd_table_read`] must return.
pub(super) fn fd_table(pid: u32, at: u64, sockets: &[u64], releases: bool) -> Step {
    Step::FdTable(pid, at, sockets.to_vec(), releases)
}

/// One input to the tracker in a table row.
pub(super) enum Step {
    /// An event to apply.
    Ev(ConnEvent),
    /// A snapshot to merge and the (tuple, pid charged) pairs the merge must return.
    Snap(Snapshot, Vec<(Tuple, u32)>),
    /// A connection to forget.
    Forget(Tuple),
    /// A fresh fd-table read: (pid, at ms, socket inodes, whether it released anything).
    FdTable(u32, u64, Vec<u64>, bool),
}

/// A fragment of the expected outcome.
#[derive(Debug)]
pub(super) enum Expect {
    /// Exactly these pids in `status.processes`, in this order.
    Processes(Vec<u32>),
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
    ListenerTotals(ListenAddr, u64, u64),
    Family(ListenAddr, &'static str),
    Lost(u64),
    /// `connections_of(pid)`: (tuple, preexisting, listener), oldest first.
    Connections(u32, Vec<(Tuple, bool, Option<ListenAddr>)>),
    ConnectionHolders(u32, Tuple, Vec<u32>),
    ConnectionSince(u32, Tuple, u64),
    LiveOf(u32, Vec<u16>, u64),
    Unmatched(u64),
    Uptime(u64),
    /// Kernel-reported connections the last merge retired: (sk, accepted at ms).
    Retired(Vec<(u64, u64)>),
}

pub(super) fn run_steps(name: &str, steps: &[Step]) -> Tracker {
    let mut t = Tracker::new();
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Ev(ev) => t.apply(ev),
            Step::Snap(s, want) => {
                let got = t.merge_snapshot(s);
                assert_eq!(&got, want, "{name}: step {i}: merge_snapshot returned");
            }
            Step::Forget(tuple) => t.forget_connection(tuple),
            Step::FdTable(pid, at, sockets, want) => {
                let got = t.fd_table_read(*pid, ms(*at), sockets);
                assert_eq!(got, *want, "{name}: step {i}: fd_table_read returned");
            }
        }
        check_invariants(&t, ms(100_000), &format!("{name}: after step {i}"));
    }
    t
}

/// Runs one table row: the steps (checking the invariants after each), then
/// every expected fragment against the status at `now` (ms).
pub(super) fn run_case(name: &str, steps: &[Step], now: u64, expect: &[Expect]) {
    let t = run_steps(name, steps);
    let st = t.status(ms(now));
    for e in expect {
        check(name, &t, &st, e);
    }
}

fn proc_of<'a>(name: &str, st: &'a Status, pid: u32) -> &'a ProcessStatus {
    st.processes
        .iter()
        .find(|p| p.pid == pid)
        .unwrap_or_else(|| panic!("{name}: pid {pid} not in status: {st:#?}"))
}

fn listener_of<'a>(name: &str, st: &'a Status, addr: &ListenAddr) -> &'a ListenerStatus {
    st.listeners
        .iter()
        .find(|l| l.netns == addr.netns && l.address == addr.local)
        .unwrap_or_else(|| panic!("{name}: listener {} not in status: {st:#?}", addr.local))
}

fn check(name: &str, t: &Tracker, st: &Status, e: &Expect) {
    let ctx = format!("{name}: {e:?}");
    match e {
        Expect::Retired(want) => {
            let want: Vec<(u64, Duration)> = want.iter().map(|&(sk, at)| (sk, ms(at))).collect();
            assert_eq!(t.retired, want, "{ctx}");
        }
        Expect::Processes(pids) => {
            let got: Vec<u32> = st.processes.iter().map(|p| p.pid).collect();
            assert_eq!(&got, pids, "{ctx}");
        }
        Expect::Live(pid, n) => {
            // A process holding nothing is absent; its live count is zero.
            let got = st
                .processes
                .iter()
                .find(|p| p.pid == *pid)
                .map_or(0, |p| p.live);
            assert_eq!(got, *n, "{ctx}");
            assert_eq!(t.live_of(*pid, &[]), *n, "{ctx}: live_of");
        }
        Expect::Totals(pid, accepted, closed) => {
            let p = proc_of(name, st, *pid);
            assert_eq!(
                (p.accepted_total, p.closed_total),
                (*accepted, *closed),
                "{ctx}"
            );
        }
        Expect::ProcListeners(pid, addrs) => {
            let got: Vec<String> = proc_of(name, st, *pid)
                .listeners
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(&got, addrs, "{ctx}");
        }
        Expect::Comm(pid, comm) => assert_eq!(proc_of(name, st, *pid).comm, *comm, "{ctx}"),
        Expect::Oldest(pid, want) => {
            assert_eq!(proc_of(name, st, *pid).oldest_live_ms, *want, "{ctx}")
        }
        Expect::Listeners(want) => {
            let got: Vec<(NetNs, String)> = st
                .listeners
                .iter()
                .map(|l| (l.netns, l.address.to_string()))
                .collect();
            let want: Vec<(NetNs, String)> =
                want.iter().map(|(n, a)| (*n, (*a).to_owned())).collect();
            assert_eq!(got, want, "{ctx}");
        }
        Expect::Holders(addr, want) => {
            let got: Vec<(u32, u64)> = listener_of(name, st, addr)
                .holders
                .iter()
                .map(|h| (h.pid, h.live))
                .collect();
            assert_eq!(&got, want, "{ctx}");
        }
        Expect::Queue(addr, n) => assert_eq!(listener_of(name, st, addr).accept_queue, *n, "{ctx}"),
        Expect::ListenerTotals(addr, accepted, drops) => {
            let l = listener_of(name, st, addr);
            assert_eq!(
                (l.accepted_total, l.queue_drops_total),
                (*accepted, *drops),
                "{ctx}"
            );
        }
        Expect::Family(addr, family) => {
            let got = serde_json::to_value(listener_of(name, st, addr).family).expect("a family");
            assert_eq!(got, *family, "{ctx}")
        }
        Expect::Lost(n) => assert_eq!(st.lost_events, *n, "{ctx}"),
        Expect::Connections(pid, want) => {
            let got: Vec<(Tuple, bool, Option<ListenAddr>)> = t
                .connections_of(*pid)
                .into_iter()
                .map(|c| (c.tuple, c.preexisting, c.listener))
                .collect();
            assert_eq!(&got, want, "{ctx}");
        }
        Expect::ConnectionHolders(pid, tuple, want) => {
            let c = t
                .connections_of(*pid)
                .into_iter()
                .find(|c| c.tuple == *tuple);
            assert_eq!(c.map(|c| c.holders), Some(want.clone()), "{ctx}");
        }
        Expect::ConnectionSince(pid, tuple, since) => {
            let c = t
                .connections_of(*pid)
                .into_iter()
                .find(|c| c.tuple == *tuple);
            assert_eq!(c.map(|c| c.since), Some(ms(*since)), "{ctx}");
        }
        Expect::LiveOf(pid, ports, n) => assert_eq!(t.live_of(*pid, ports), *n, "{ctx}"),
        Expect::Unmatched(n) => assert_eq!(t.unmatched_queue, *n, "{ctx}"),
        Expect::Uptime(n) => assert_eq!(st.uptime_ms, *n, "{ctx}"),
    }
}

/// What must hold after any input sequence.
pub(super) fn check_invariants(t: &Tracker, now: Duration, ctx: &str) {
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

// --- restart model ------------------------------------------------------------

pub(super) use crate::tracker::restart::{Change, DrainNote, KEEP_GONE, Restarts, Role, Why};

/// One table row of the restart model as its own test:
/// `restart_case!(name, [steps], [expected])`. Events go to a tracker and
/// the restart model as the monitor's pump sends them; [`publish`] feeds
/// the model the tracker's status as the monitor publishes it; [`then`]
/// checks part way. `restart_case!(name, from = steps, [steps], [expected])`
/// starts from a shared beginning (a `Vec<RStep>`).
macro_rules! restart_case {
    ($name:ident, from = $from:expr, [$($step:expr),* $(,)?], [$($expect:expr),* $(,)?] $(,)?) => {
        #[test]
        fn $name() {
            let mut steps: Vec<$crate::tracker::tests::kit::RStep> = $from;
            steps.extend([$($crate::tracker::tests::kit::RStep::from($step)),*]);
            $crate::tracker::tests::kit::run_restart_case(
                stringify!($name),
                &steps,
                &[$($expect),*],
            );
        }
    };
    ($name:ident, [$($step:expr),* $(,)?], [$($expect:expr),* $(,)?] $(,)?) => {
        restart_case!($name, from = Vec::new(), [$($step),*], [$($expect),*]);
    };
}

/// One input to the restart model in a table row.
pub(super) enum RStep {
    /// A tracker step; its events go to the restart model too.
    Tracker(Step),
    /// The monitor publishes at this ms: the restart model observes the
    /// tracker's status.
    Publish(u64),
    /// Time passes (the monitor's housekeeping) at this ms.
    Tick(u64),
    /// Whether a process that left the status still runs: (pid, alive, at ms).
    Liveness(u32, bool, u64),
    /// A drain gracewatch runs: (pid, note, at ms).
    Drain(u32, DrainNote, u64),
    /// A check at this point of the row.
    Check(RExpect),
}

impl From<Step> for RStep {
    fn from(step: Step) -> Self {
        Self::Tracker(step)
    }
}

pub(super) fn publish(at: u64) -> RStep {
    RStep::Publish(at)
}

pub(super) fn tick(at: u64) -> RStep {
    RStep::Tick(at)
}

/// `pid`, which left the status, still runs at `at`.
pub(super) fn still_runs(pid: u32, at: u64) -> RStep {
    RStep::Liveness(pid, true, at)
}

/// `pid`, which left the status, is found gone at `at`.
pub(super) fn found_gone(pid: u32, at: u64) -> RStep {
    RStep::Liveness(pid, false, at)
}

pub(super) fn drain_note(pid: u32, note: DrainNote, at: u64) -> RStep {
    RStep::Drain(pid, note, at)
}

pub(super) fn then(expect: RExpect) -> RStep {
    RStep::Check(expect)
}

/// A fragment of the restart model's expected state.
#[derive(Debug)]
pub(super) enum RExpect {
    Role(u32, Role),
    /// Role and why.
    RoleWhy(u32, Role, Why),
    /// The drain mark: (from_live, since ms, done_at ms), or none.
    Drain(u32, Option<(u64, u64, Option<u64>)>),
    /// Exactly these handovers were reported: (listener, new pid, alongside).
    Handovers(Vec<(ListenAddr, u32, Vec<u32>)>),
    /// Exactly these role changes of a pid, in order: (to, why), exits as
    /// (Exited, Why::Exited).
    Changes(u32, Vec<(Role, Why)>),
    /// It exited holding this many live connections, while in this role.
    Exited(u32, u64, Role),
    /// A drain that reached zero was recorded: (pid, took ms, from live).
    DrainedAfter(u32, u64, u64),
    /// No longer remembered.
    Forgotten(u32),
    /// A listener's generations, oldest first.
    Generations(ListenAddr, Vec<u32>),
    /// Processes that left the status, liveness unknown.
    UncheckedGone(Vec<u32>),
    /// (pid, now ms, accepts/s, closes/s)
    Rates(u32, u64, f64, f64),
    /// The latest published status lists pid with this role, since this ms.
    Published(u32, Role, u64),
    /// The latest published status gives a listener these generations.
    PublishedGenerations(ListenAddr, Vec<(u32, Role)>),
    /// Exactly these drain records, oldest first: (pid, started ms, why,
    /// from live, outcome, ended ms, dropped).
    Records(Vec<RecordWant>),
    /// The timeline of pid's latest record: (at ms, role, why, live).
    Timeline(u32, Vec<(u64, Role, Why, u64)>),
}

/// A drain record as [`RExpect::Records`] wants it.
pub(super) type RecordWant = (
    u32,
    u64,
    Why,
    u64,
    crate::tracker::records::DrainOutcome,
    Option<u64>,
    u64,
);

pub(super) fn run_restart_case(name: &str, steps: &[RStep], expect: &[RExpect]) {
    let mut t = Tracker::new();
    let mut r = Restarts::new();
    let mut published = Status::default();
    for (i, step) in steps.iter().enumerate() {
        let ctx = format!("{name}: step {i}");
        match step {
            RStep::Tracker(Step::Ev(ev)) => {
                t.apply(ev);
                r.on_event(ev);
            }
            RStep::Tracker(Step::Snap(s, _)) => {
                t.merge_snapshot(s);
            }
            RStep::Tracker(Step::Forget(tuple)) => t.forget_connection(tuple),
            RStep::Tracker(Step::FdTable(pid, at, sockets, _)) => {
                t.fd_table_read(*pid, ms(*at), sockets);
            }
            RStep::Publish(at) => {
                // As the monitor publishes: observed, then annotated.
                published = t.status(ms(*at));
                r.observe(&published, ms(*at));
                r.annotate(&mut published, ms(0));
                check_annotated(&published, &r, &ctx);
            }
            RStep::Tick(at) => r.tick(ms(*at)),
            RStep::Liveness(pid, alive, at) => r.liveness(*pid, *alive, ms(*at)),
            RStep::Drain(pid, note, at) => r.drain_note(*pid, *note, ms(*at)),
            RStep::Check(e) => check_restart(&ctx, &r, &published, e),
        }
        check_restart_invariants(&r, &ctx);
    }
    for e in expect {
        check_restart(name, &r, &published, e);
    }
}

/// A published status carries the model's roles: each listed process's
/// role and since, each listener's generations.
fn check_annotated(st: &Status, r: &Restarts, ctx: &str) {
    for p in &st.processes {
        let want = r
            .process(p.pid)
            .map_or((Role::Serving, 0), |m| (m.role, millis(m.role_since)));
        assert_eq!((p.role, p.role_since_ms), want, "{ctx}: pid {}", p.pid);
        assert_ne!(p.role, Role::Exited, "{ctx}: pid {}", p.pid);
    }
    for l in &st.listeners {
        let key = ListenAddr {
            netns: l.netns,
            local: l.address,
        };
        let want: Vec<(u32, Role)> = r
            .generations(&key)
            .iter()
            .map(|g| (g.pid, g.role))
            .collect();
        let got: Vec<(u32, Role)> = l.generations.iter().map(|g| (g.pid, g.role)).collect();
        assert_eq!(got, want, "{ctx}: {}", l.address);
        for h in &l.holders {
            assert!(
                got.iter().any(|(pid, _)| *pid == h.pid),
                "{ctx}: holder {}",
                h.pid
            );
        }
    }
}

fn check_restart(name: &str, r: &Restarts, published: &Status, e: &RExpect) {
    let ctx = format!("{name}: {e:?}");
    let proc = |pid: u32| {
        r.process(pid)
            .unwrap_or_else(|| panic!("{ctx}: pid {pid} not remembered: {r:#?}"))
    };
    match e {
        RExpect::Role(pid, role) => assert_eq!(proc(*pid).role, *role, "{ctx}: {r:#?}"),
        RExpect::RoleWhy(pid, role, why) => {
            let p = proc(*pid);
            assert_eq!((p.role, p.why), (*role, *why), "{ctx}: {r:#?}");
        }
        RExpect::Drain(pid, want) => {
            let got = proc(*pid)
                .drain
                .as_ref()
                .map(|d| (d.from_live, millis(d.since), d.done_at.map(millis)));
            assert_eq!(got, *want, "{ctx}");
        }
        RExpect::Handovers(want) => {
            let got: Vec<(ListenAddr, u32, Vec<u32>)> = r
                .facts_after(None)
                .filter_map(|f| match &f.change {
                    Change::Handover {
                        listener,
                        alongside,
                        ..
                    } => Some((*listener, f.pid, alongside.clone())),
                    _ => None,
                })
                .collect();
            assert_eq!(&got, want, "{ctx}");
        }
        RExpect::Changes(pid, want) => {
            let got: Vec<(Role, Why)> = r
                .facts_after(None)
                .filter(|f| f.pid == *pid)
                .filter_map(|f| match &f.change {
                    Change::Role { to, why, .. } => Some((*to, *why)),
                    Change::Exited { .. } => Some((Role::Exited, Why::Exited)),
                    Change::Handover { .. } => None,
                })
                .collect();
            assert_eq!(&got, want, "{ctx}");
        }
        RExpect::Exited(pid, held, was) => {
            let got: Vec<(u64, Role)> = r
                .facts_after(None)
                .filter(|f| f.pid == *pid)
                .filter_map(|f| match &f.change {
                    Change::Exited { held, was } => Some((*held, *was)),
                    _ => None,
                })
                .collect();
            assert_eq!(got, vec![(*held, *was)], "{ctx}");
        }
        RExpect::DrainedAfter(pid, took, from) => {
            let got: Vec<(Duration, u64)> = r
                .facts_after(None)
                .filter(|f| f.pid == *pid)
                .filter_map(|f| match &f.change {
                    Change::Role { drained, .. } => *drained,
                    _ => None,
                })
                .collect();
            assert_eq!(got, vec![(ms(*took), *from)], "{ctx}");
        }
        RExpect::Forgotten(pid) => assert!(r.process(*pid).is_none(), "{ctx}: {r:#?}"),
        RExpect::Generations(listener, want) => {
            let got: Vec<u32> = r.generations(listener).iter().map(|p| p.pid).collect();
            assert_eq!(&got, want, "{ctx}");
        }
        RExpect::UncheckedGone(want) => assert_eq!(&r.unchecked_gone(), want, "{ctx}"),
        RExpect::Published(pid, role, since) => {
            let got = published
                .processes
                .iter()
                .find(|p| p.pid == *pid)
                .map(|p| (p.role, p.role_since_ms));
            assert_eq!(got, Some((*role, *since)), "{ctx}: {published:#?}");
        }
        RExpect::PublishedGenerations(listener, want) => {
            let got: Option<Vec<(u32, Role)>> = published
                .listeners
                .iter()
                .find(|l| l.netns == listener.netns && l.address == listener.local)
                .map(|l| l.generations.iter().map(|g| (g.pid, g.role)).collect());
            assert_eq!(got.as_ref(), Some(want), "{ctx}: {published:#?}");
        }
        RExpect::Records(want) => {
            let got: Vec<RecordWant> = r
                .records()
                .map(|d| {
                    (
                        d.pid,
                        millis(d.started),
                        d.why,
                        d.from_live,
                        d.outcome,
                        d.ended.map(millis),
                        d.dropped,
                    )
                })
                .collect();
            assert_eq!(&got, want, "{ctx}: {r:#?}");
        }
        RExpect::Timeline(pid, want) => {
            let got: Vec<(u64, Role, Why, u64)> = r
                .records()
                .rev()
                .find(|d| d.pid == *pid)
                .map(|d| {
                    d.timeline
                        .iter()
                        .map(|e| (millis(e.at), e.role, e.why, e.live))
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(&got, want, "{ctx}: {r:#?}");
        }
        RExpect::Rates(pid, now, acc, clo) => {
            let (a, c) = proc(*pid).rates(ms(*now));
            assert!(
                (a - acc).abs() < 1e-9 && (c - clo).abs() < 1e-9,
                "{ctx}: got ({a}, {c})"
            );
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap()
}

/// What must hold of the restart model after any input sequence.
fn check_restart_invariants(r: &Restarts, ctx: &str) {
    let seqs: Vec<u64> = r.facts_after(None).map(|f| f.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "{ctx}: fact numbers"
    );
    // One derivation: a drain that reached zero lasted, in its record,
    // what its fact (which the histogram counts) says.
    for f in r.facts_after(None) {
        if let Change::Role {
            drained: Some((took, from)),
            ..
        } = f.change
        {
            let rec = r
                .records()
                .rev()
                .find(|d| d.pid == f.pid && d.started <= f.at)
                .unwrap_or_else(|| panic!("{ctx}: no record for {f:?}"));
            assert_eq!(
                (rec.ended.map(|e| e - rec.started), rec.from_live),
                (Some(took), from),
                "{ctx}: {rec:?}"
            );
        }
    }
    assert!(r.records().count() <= crate::tracker::records::RECORDS_KEPT);
    for d in r.records() {
        assert!(
            d.timeline.len() <= crate::tracker::records::TIMELINE_KEPT,
            "{ctx}"
        );
        assert_eq!(
            d.ended.is_none(),
            d.outcome == crate::tracker::records::DrainOutcome::Ongoing,
            "{ctx}: {d:?}"
        );
    }
    for p in r.processes() {
        match p.role {
            Role::Exited => assert!(
                !p.present && p.live == 0 && p.gone_at.is_some(),
                "{ctx}: exited {p:?}"
            ),
            Role::Draining => assert!(p.drain.is_some(), "{ctx}: draining without a mark {p:?}"),
            Role::Serving | Role::Drained => {}
        }
        assert_eq!(p.present, p.gone_at.is_none(), "{ctx}: {p:?}");
        assert!(p.listeners.is_subset(&p.keys), "{ctx}: {p:?}");
    }
}
