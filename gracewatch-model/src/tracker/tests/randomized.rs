//! Randomized runs: arbitrary sequences (out of order, with snapshots and
//! forgotten connections) must keep the tracker's invariants, and in-order
//! event streams, as the kernel would send them, must agree with a reference
//! model that counts accepts and closes on its own.

use super::kit::*;

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
        wildcard_v4(),
        specific_v4(),
        wildcard_v6(),
        listen_addr("0.0.0.0:81"),
        listen_addr_in(NS2, "0.0.0.0:80"),
        listen_addr("[::ffff:10.0.0.1]:80"),
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
                tuples.push(tuple_in(ns, l, r));
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
                    exiting: 0,
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
                                snap_listener(
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
                                snap_conn(rng.pick(&tuples), 0, ESTABLISHED, &h)
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

/// What an in-order event stream must leave behind, computed without the
/// tracker: the connections each process accepted and has not closed, and its
/// accept and close counts since it was born (a pid reused after an exit is a
/// new process).
#[derive(Default)]
struct Model {
    /// Open connections by sk: (tuple, accepting pid).
    open: BTreeMap<u64, (Tuple, u32)>,
    /// Handshakes waiting in an accept queue: (sk, tuple).
    queued: Vec<(u64, Tuple)>,
    /// Open listening sockets: sk -> (address, pid that opened it).
    listening: BTreeMap<u64, (ListenAddr, u32)>,
    accepted: BTreeMap<u32, u64>,
    closed: BTreeMap<u32, u64>,
    next_sk: u64,
    lost: u64,
    /// Exits that took live connections with them.
    exits_with_connections: u64,
}

impl Model {
    fn fresh_sk(&mut self) -> u64 {
        self.next_sk += 1;
        self.next_sk
    }

    /// A tuple no open or queued connection uses (the kernel never has two
    /// sockets on one 4-tuple), if the pool has one left.
    fn free_tuple(&self, rng: &mut Rng, pool: &[Tuple]) -> Option<Tuple> {
        let used = |t: &Tuple| {
            self.open.values().any(|(u, _)| u == t) || self.queued.iter().any(|(_, u)| u == t)
        };
        (0..8).map(|_| rng.pick(pool)).find(|t| !used(t))
    }

    fn live(&self, pid: u32) -> u64 {
        let accepted = self.accepted.get(&pid).copied().unwrap_or(0);
        let closed = self.closed.get(&pid).copied().unwrap_or(0);
        accepted - closed
    }

    /// The next event of a well-formed stream at `at`; several when a
    /// process exits (the exit, then the kernel closing what it held).
    fn next_events(&mut self, rng: &mut Rng, at: Duration, c: &Pools) -> Vec<ConnEvent> {
        match rng.below(12) {
            0 => {
                let sk = self.fresh_sk();
                let (addr, pid) = (rng.pick(c.addrs), rng.pick(c.pids));
                self.listening.insert(sk, (addr, pid));
                vec![ConnEvent::ListenStart {
                    at,
                    sk,
                    addr,
                    pid,
                    comm: format!("p{pid}"),
                }]
            }
            1 if !self.listening.is_empty() => {
                let sk = *rng.pick(&self.listening.keys().collect::<Vec<_>>());
                let (addr, pid) = self.listening.remove(&sk).unwrap();
                vec![ConnEvent::ListenStop {
                    at,
                    sk,
                    addr,
                    pid,
                    comm: format!("p{pid}"),
                }]
            }
            2 | 3 => match self.free_tuple(rng, c.tuples) {
                Some(tuple) => {
                    let sk = self.fresh_sk();
                    self.queued.push((sk, tuple));
                    vec![ConnEvent::Handshake { at, sk, tuple }]
                }
                None => vec![],
            },
            4 if !self.queued.is_empty() => {
                let (sk, tuple) = self.queued.remove(rng.below(self.queued.len()));
                vec![ConnEvent::QueueDrop {
                    at,
                    sk,
                    tuple,
                    exiting: 0,
                }]
            }
            5..=7 => {
                let pid = rng.pick(c.pids);
                let (sk, tuple, was_queued) = if !self.queued.is_empty() && rng.below(2) == 0 {
                    let (sk, tuple) = self.queued.remove(rng.below(self.queued.len()));
                    (sk, tuple, true)
                } else {
                    match self.free_tuple(rng, c.tuples) {
                        Some(tuple) => (self.fresh_sk(), tuple, false),
                        None => return vec![],
                    }
                };
                self.open.insert(sk, (tuple, pid));
                *self.accepted.entry(pid).or_default() += 1;
                vec![ConnEvent::Accept {
                    at,
                    sk,
                    tuple,
                    pid,
                    comm: format!("p{pid}"),
                    was_queued,
                }]
            }
            8 | 9 if !self.open.is_empty() => {
                let sk = *rng.pick(&self.open.keys().collect::<Vec<_>>());
                let (tuple, pid) = self.open.remove(&sk).unwrap();
                *self.closed.entry(pid).or_default() += 1;
                vec![ConnEvent::Close {
                    at,
                    sk,
                    tuple,
                    pid,
                    by_exit: false,
                }]
            }
            10 => {
                self.lost += rng.below(3) as u64;
                vec![ConnEvent::Lost {
                    at,
                    total: self.lost,
                }]
            }
            11 => {
                // The process and what only it held go; a later process with
                // this pid starts from zero.
                let pid = rng.pick(c.pids);
                let mut events = vec![ConnEvent::ProcessExit { at, pid }];
                let gone: Vec<u64> = self
                    .open
                    .iter()
                    .filter(|(_, (_, p))| *p == pid)
                    .map(|(sk, _)| *sk)
                    .collect();
                if !gone.is_empty() {
                    self.exits_with_connections += 1;
                }
                for sk in gone {
                    let (tuple, _) = self.open.remove(&sk).unwrap();
                    events.push(ConnEvent::Close {
                        at,
                        sk,
                        tuple,
                        pid,
                        by_exit: true,
                    });
                }
                let stopped: Vec<u64> = self
                    .listening
                    .iter()
                    .filter(|(_, (_, p))| *p == pid)
                    .map(|(sk, _)| *sk)
                    .collect();
                for sk in stopped {
                    let (addr, _) = self.listening.remove(&sk).unwrap();
                    events.push(ConnEvent::ListenStop {
                        at,
                        sk,
                        addr,
                        pid,
                        comm: format!("p{pid}"),
                    });
                }
                self.accepted.remove(&pid);
                self.closed.remove(&pid);
                events
            }
            _ => vec![],
        }
    }
}

/// The values an in-order stream draws from.
struct Pools<'a> {
    addrs: &'a [ListenAddr],
    tuples: &'a [Tuple],
    pids: &'a [u32],
}

#[test]
fn in_order_streams_match_the_reference_model() {
    let addrs = [
        wildcard_v4(),
        specific_v4(),
        wildcard_v6(),
        listen_addr("0.0.0.0:81"),
        listen_addr_in(NS2, "0.0.0.0:80"),
    ];
    let mut tuples = Vec::new();
    for ns in [NS, NS2] {
        for local in [
            "10.0.0.1:80",
            "10.0.0.2:81",
            "[::ffff:10.0.0.1]:80",
            "[::1]:80",
        ] {
            for port in 1..=6 {
                tuples.push(tuple_in(ns, local, &format!("192.0.2.1:{port}")));
            }
        }
    }
    let pids = [1u32, 2, 3, 4];
    let pools = Pools {
        addrs: &addrs,
        tuples: &tuples,
        pids: &pids,
    };
    let ports = [80u16, 81];

    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut busy_steps = 0u64;
    let mut exits_with_connections = 0u64;
    for seq in 0..1_000 {
        let mut t = Tracker::new();
        let mut model = Model::default();
        let mut now = 1_000u64;
        for step in 0..80 {
            now += 1 + rng.below(3) as u64;
            for ev in model.next_events(&mut rng, ms(now), &pools) {
                t.apply(&ev);
            }
            let ctx = format!("seq {seq} step {step}");
            check_invariants(&t, ms(now), &ctx);
            let st = t.status(ms(now));
            for &pid in &pids {
                let want = model.live(pid);
                let shown = st
                    .processes
                    .iter()
                    .find(|p| p.pid == pid)
                    .map_or(0, |p| p.live);
                assert_eq!(
                    shown, want,
                    "{ctx}: status live of {pid} = accepted - closed"
                );
                assert_eq!(t.live_of(pid, &[]), want, "{ctx}: live_of {pid}");
                let mut got: Vec<Tuple> = t.connections_of(pid).iter().map(|c| c.tuple).collect();
                let mut open: Vec<Tuple> = model
                    .open
                    .values()
                    .filter(|(_, p)| *p == pid)
                    .map(|(tuple, _)| *tuple)
                    .collect();
                got.sort_unstable();
                open.sort_unstable();
                assert_eq!(got, open, "{ctx}: connections of {pid}");
                for port in ports {
                    let on_port = open.iter().filter(|t| t.local.port() == port).count() as u64;
                    assert_eq!(
                        t.live_of(pid, &[port]),
                        on_port,
                        "{ctx}: live_of {pid} port {port}"
                    );
                }
            }
            if model.open.len() >= 3 {
                busy_steps += 1;
            }
            assert_eq!(st.lost_events, model.lost, "{ctx}: lost events");
        }
        exits_with_connections += model.exits_with_connections;
    }
    // The streams reach the states worth checking, not only empty ones.
    assert!(busy_steps > 80_000 / 4, "only {busy_steps} busy steps");
    assert!(
        exits_with_connections > 1_000,
        "only {exits_with_connections} exits with live connections"
    );
}
