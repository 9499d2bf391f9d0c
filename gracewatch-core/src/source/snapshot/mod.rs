//! Point-in-time views of the host's TCP sockets and who holds them: the
//! startup/reconcile [`Snapshot`] ([`take`]) and the drain gate's fresh look
//! at one process ([`live_inbound_fds`]).
//!
//! A snapshot joins two sources: every process's socket fds (`/proc/<pid>/fd`
//! links `socket:[inode]`) and one sock_diag netlink dump per network
//! namespace those processes live in. The namespace matters: a dump only
//! shows the namespace of the netlink socket that asks, so sockets of
//! containers (and of the tests' own namespaces) are invisible from ours. The
//! /proc walk hands over an nsfs handle on each namespace it finds, and that
//! namespace's netlink socket is created on a short-lived thread inside it
//! ([`super::netns`]); the dump itself then runs on one of ours, and none of
//! our long-lived threads ever changes namespace.
//!
//! At 100k connections the walk reads 200k fd links and a dump holds 200k
//! sockets (both ends of each loopback connection), so both are built for
//! that: one `readlinkat` per fd relative to the process's `fd` directory
//! (a generic procfs reader opens, stats and closes each fd as well), no
//! allocation per fd, the processes spread over every core, each namespace
//! dumped on a thread of its own while the walk goes on, and the kernel
//! asked only for sockets on a listening port ([`local_port_filter`]).
//!
//! "Inbound" is decided the only way a dump allows: a connected socket whose
//! local address matches a listener of the same namespace
//! ([`ListenAddr::matches`]). Only sockets some process holds count (inode
//! 0 means still in an accept queue).

//!
//! The code is split along those seams: [`procfs`] reads processes' fd
//! tables and names, [`scan`] spreads the walk and the dumps over threads,
//! [`sock_diag`] speaks the netlink protocol (request, port filter, reply
//! parser), [`join`] keeps the inbound connections of a namespace's dump
//! and joins them with the fd table, and [`holders`] remembers where the
//! walk found each listening socket and looks there again between
//! snapshots. This file holds the entry points.

pub mod holders;
mod join;
pub mod peers;
mod procfs;
mod scan;
mod sock_diag;

use std::{
    collections::{BTreeMap, HashSet},
    mem::MaybeUninit,
    os::fd::AsFd,
    time::Duration,
};

use anyhow::Context;
use log::{debug, warn};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6};

pub use self::sock_diag::{TCP_CLOSE_WAIT, TCP_ESTABLISHED};
use self::{
    holders::ListenerFds,
    join::{assemble, dump_netns},
    procfs::{DIRENT_BUF, ProcTable, list_pids, open_dir, open_netns, socket_inodes},
    scan::scan,
    sock_diag::{diag_socket, dump_tcp, dump_tcp_activity, live_states, local_port_filter},
};
use super::netns::{self, NetNsHandle};
use crate::event::{ConnActivity, ListenAddr, NetNs, SnapConn, Snapshot, Tuple};

/// Takes a snapshot of every listener and every live inbound connection on
/// the host, in every network namespace some process lives in.
///
/// `at` is `clock_now()` (normally [`super::monotonic_now`]) read before
/// the /proc walk starts: anything the event stream reports after `at` may
/// or may not be reflected here.
///
/// Processes that vanish or deny access are skipped; namespaces other than
/// ours that we may not enter (no `CAP_SYS_ADMIN`) are skipped with a
/// warning. Errors are for what makes the whole view meaningless (no /proc,
/// no sock_diag).
#[cfg(test)]
pub fn take(clock_now: impl Fn() -> Duration) -> anyhow::Result<Snapshot> {
    take_with_fds(clock_now).map(|(snapshot, _)| snapshot)
}

/// [`take`], with the fds through which each listening socket is held
/// (for the targeted re-check of holders between snapshots).
pub fn take_with_fds(clock_now: impl Fn() -> Duration) -> anyhow::Result<(Snapshot, ListenerFds)> {
    let at = clock_now();
    let own = netns::current_thread_netns()?;
    let proc_dir = open_dir(rustix::fs::CWD, "/proc").context("failed to open /proc")?;
    let pids = list_pids(proc_dir.as_fd()).context("failed to list processes in /proc")?;
    let (table, dumps) = scan(proc_dir.as_fd(), &pids)?;
    debug!(
        "snapshot: {} processes, {} socket fds, {} namespaces, walk and dumps took {:?}",
        pids.len(),
        table.sockets.len(),
        dumps.len(),
        clock_now().saturating_sub(at)
    );
    let mut snapshot = Snapshot {
        at,
        ..Snapshot::default()
    };
    for (netns, dumped) in dumps {
        let dump = match dumped {
            Ok(dump) => dump,
            Err(err) if netns != own && netns::is_permission_denied(&err) => {
                warn!("skipping netns {netns}: {err:#}");
                continue;
            }
            Err(err) => return Err(err),
        };
        assemble(netns, &dump, &table, &mut snapshot);
    }
    let fds = ListenerFds::of(&table, &snapshot.listeners);
    drop(table);
    // The walk and the dumps ran on threads of their own, and the previous
    // snapshot is gone by now: a monitor that rescans holds one at a time.
    release_freed_memory();
    snapshot.listeners.sort_by_key(|l| (l.addr, l.inode));
    // A connection's inode is never 0 and names one socket, so the keys are
    // unique and an unstable sort is deterministic; it needs no scratch
    // copy of 100k entries.
    snapshot
        .connections
        .sort_unstable_by_key(|c| (c.tuple, c.inode));
    Ok((snapshot, fds))
}

/// Hands the memory freed since the last call back to the system.
///
/// glibc keeps freed memory for reuse, in one arena per thread that
/// allocated it, and a snapshot at 100k connections allocates tens of MB on
/// several short-lived threads: without this, a long-running monitor keeps
/// every snapshot's peak resident, and each new one adds to it.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointer; it only returns free pages of
    // the allocator's arenas to the kernel, under the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The live inbound connections `pid` holds right now: its socket fds joined
/// with one sock_diag dump of its network namespace. Reads only this
/// process's /proc entries, never the whole of /proc.
///
/// Inbound means "matches a listener that exists now". A server that closed
/// its last listener before draining would hide its connections from this
/// test; use [`live_inbound_fds_with`] to add listen addresses known from
/// the event stream.
#[cfg(test)]
pub fn live_inbound_fds(pid: u32) -> anyhow::Result<Vec<Tuple>> {
    live_inbound_fds_with(pid, &[])
}

/// [`live_inbound_fds`], also counting as inbound any connection whose local
/// address matches one of `known_listeners` (addresses the caller saw the
/// target listen on, which may since have been closed).
#[cfg(test)]
pub fn live_inbound_fds_with(
    pid: u32,
    known_listeners: &[ListenAddr],
) -> anyhow::Result<Vec<Tuple>> {
    let mut tuples: Vec<Tuple> = live_inbound_conns_with(pid, known_listeners)?
        .into_iter()
        .map(|c| c.tuple)
        .collect();
    tuples.sort();
    Ok(tuples)
}

/// [`live_inbound_fds_with`] with each connection's TCP state (the TUI's
/// connection detail shows ESTABLISHED or CLOSE_WAIT).
pub fn live_inbound_conns_with(
    pid: u32,
    known_listeners: &[ListenAddr],
) -> anyhow::Result<Vec<SnapConn>> {
    let dir = open_dir(rustix::fs::CWD, format!("/proc/{pid}"))
        .with_context(|| format!("failed to open /proc/{pid}"))?;
    let handle = open_netns(dir.as_fd())
        .with_context(|| format!("failed to open network namespace of pid {pid}"))?;
    let mut table = ProcTable::default();
    let mut buf = vec![MaybeUninit::uninit(); DIRENT_BUF];
    socket_inodes(dir.as_fd(), &mut buf, |fd, inode| {
        table.sockets.push((inode, pid, fd))
    })
    .with_context(|| format!("failed to list socket fds of pid {pid}"))?;
    table.seal();
    let dump = dump_netns(&handle, known_listeners)?;
    let mut snapshot = Snapshot::default();
    assemble(handle.inode(), &dump, &table, &mut snapshot);
    Ok(snapshot.connections)
}

/// Calls `f` once per network namespace of `conns` (each with a pid
/// holding it, through which the namespace is entered) with that
/// namespace's tuples and a sock_diag socket that sees it: the set-up
/// every on-demand dump of chosen connections shares ([`gone`],
/// [`activity`], [`peers::peer_ends`]). The socket is `None` when the
/// namespace can no longer be entered through that pid (it exited, or
/// moved to another namespace).
fn in_each_netns(
    conns: &[(Tuple, u32)],
    mut f: impl FnMut(NetNs, Option<&netlink_sys::Socket>, &[Tuple]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut by_netns: BTreeMap<NetNs, (u32, Vec<Tuple>)> = BTreeMap::new();
    for (tuple, pid) in conns {
        by_netns
            .entry(tuple.netns)
            .or_insert_with(|| (*pid, Vec::new()))
            .1
            .push(*tuple);
    }
    for (netns, (pid, tuples)) in by_netns {
        match NetNsHandle::of_pid(pid).ok().filter(|h| h.inode() == netns) {
            Some(handle) => f(netns, Some(&diag_socket(&handle)?), &tuples)?,
            None => f(netns, None, &tuples)?,
        }
    }
    Ok(())
}

/// The bytecode filter that keeps sockets on these local `ports`.
fn ports_filter(ports: impl Iterator<Item = u16>) -> Vec<u8> {
    let mut ports: Vec<u16> = ports.collect();
    ports.sort_unstable();
    ports.dedup();
    local_port_filter(&ports)
}

/// The address families to dump: IPv4 if `v4`, IPv6 if `v6`.
fn families(v4: bool, v6: bool) -> Vec<u8> {
    [(AF_INET, v4), (AF_INET6, v6)]
        .into_iter()
        .filter_map(|(f, on)| on.then_some(f))
        .collect()
}

/// Which of `conns` (each with a pid holding it, to find its namespace) no
/// longer exist as ESTABLISHED or CLOSE_WAIT sockets. One sock_diag dump per
/// namespace and no /proc walk: the cheap second look after the startup
/// merge. A namespace that can no longer be entered (its process is gone)
/// keeps its connections out of the answer; the periodic rescans settle them.
pub fn gone(conns: &[(Tuple, u32)]) -> anyhow::Result<Vec<Tuple>> {
    // Whittled down to the missing ones as the dumps show the others.
    let mut missing: HashSet<Tuple> = conns.iter().map(|c| c.0).collect();
    in_each_netns(conns, |netns, socket, here| {
        let Some(socket) = socket else {
            missing.retain(|t| t.netns != netns);
            return Ok(());
        };
        let filter = ports_filter(here.iter().map(|t| t.local.port()));
        let v4 = here.iter().any(|t| t.local.is_ipv4());
        let v6 = here.iter().any(|t| t.local.is_ipv6());
        for family in families(v4, v6) {
            dump_tcp(socket, family, live_states(), &filter, |s| {
                if matches!(s.state, TCP_ESTABLISHED | TCP_CLOSE_WAIT) {
                    missing.remove(&Tuple {
                        netns,
                        local: s.local,
                        remote: s.remote,
                    });
                }
            })
            .with_context(|| format!("failed to dump tcp sockets in netns {netns}"))?;
        }
        Ok(())
    })?;
    let mut gone: Vec<Tuple> = missing.into_iter().collect();
    gone.sort_unstable();
    Ok(gone)
}

/// What each of `conns` (each with a pid holding it, to find its
/// namespace) is doing now: one sock_diag dump with `tcp_info` per
/// namespace and family, filtered by the connections' local ports, kept
/// to exactly these tuples. A connection the dump no longer shows (it
/// closed) or whose namespace cannot be entered is left out of the answer.
pub fn activity(conns: &[(Tuple, u32)]) -> anyhow::Result<Vec<(Tuple, ConnActivity)>> {
    let wanted: HashSet<Tuple> = conns.iter().map(|c| c.0).collect();
    let mut found = Vec::with_capacity(wanted.len());
    in_each_netns(conns, |netns, socket, here| {
        let Some(socket) = socket else {
            return Ok(());
        };
        let filter = ports_filter(here.iter().map(|t| t.local.port()));
        let v4 = here.iter().any(|t| t.local.is_ipv4());
        let v6 = here.iter().any(|t| t.local.is_ipv6());
        for family in families(v4, v6) {
            dump_tcp_activity(socket, family, &filter, |s, activity| {
                let tuple = Tuple {
                    netns,
                    local: s.local,
                    remote: s.remote,
                };
                if matches!(s.state, TCP_ESTABLISHED | TCP_CLOSE_WAIT) && wanted.contains(&tuple) {
                    found.push((tuple, activity));
                }
            })
            .with_context(|| format!("failed to dump tcp_info in netns {netns}"))?;
        }
        Ok(())
    })?;
    found.sort_unstable_by_key(|f| f.0);
    found.dedup_by_key(|f| f.0);
    Ok(found)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{
        io::{BufRead, BufReader, Write},
        net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream},
        process::{Child, Command, Stdio},
        time::Instant,
    };

    use super::*;
    use crate::{
        event::{Holder, SnapListener},
        source::monotonic_now,
    };

    fn me() -> u32 {
        std::process::id()
    }

    fn own_netns() -> NetNs {
        netns::current_thread_netns().unwrap()
    }

    fn tuple_of(netns: NetNs, server_side: &TcpStream) -> Tuple {
        Tuple {
            netns,
            local: server_side.local_addr().unwrap(),
            remote: server_side.peer_addr().unwrap(),
        }
    }

    /// Takes snapshots until `ready` holds (the server side of a loopback
    /// handshake can land in the accept queue a moment after `connect`
    /// returns), then returns the last one.
    fn take_until(ready: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let snap = take(monotonic_now).unwrap();
            if ready(&snap) || Instant::now() > deadline {
                return snap;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn listener_at(snap: &Snapshot, addr: ListenAddr) -> Option<&SnapListener> {
        snap.listeners.iter().find(|l| l.addr == addr)
    }

    #[test]
    fn snapshot_sees_own_listeners_and_accepted_connections_only() {
        let ns = own_netns();
        let dual_stack =
            std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "0");

        let l4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let l6 = TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)).unwrap();
        let (a4, a6) = (l4.local_addr().unwrap(), l6.local_addr().unwrap());

        let c1 = TcpStream::connect(a4).unwrap();
        let (s1, _) = l4.accept().unwrap();
        let c2 = TcpStream::connect(a4).unwrap(); // left in l4's accept queue
        let c4 = TcpStream::connect((Ipv6Addr::LOCALHOST, a6.port())).unwrap();
        let (s4, _) = l6.accept().unwrap();
        let mut server_side = vec![&s1, &s4];
        let mut clients = vec![&c1, &c2, &c4];
        let v4_to_v6 = dual_stack.then(|| {
            let c3 = TcpStream::connect((Ipv4Addr::LOCALHOST, a6.port())).unwrap();
            let (s3, _) = l6.accept().unwrap();
            (c3, s3)
        });
        if let Some((c3, s3)) = &v4_to_v6 {
            server_side.push(s3);
            clients.push(c3);
        } else {
            eprintln!("net.ipv6.bindv6only is 1: not testing IPv4 clients of an IPv6 listener");
        }

        let l4_addr = ListenAddr {
            netns: ns,
            local: a4,
        };
        let l6_addr = ListenAddr {
            netns: ns,
            local: a6,
        };
        let snap = take_until(|s| listener_at(s, l4_addr).is_some_and(|l| l.accept_queue == 1));
        assert!(snap.at > Duration::ZERO);

        let comm = std::fs::read_to_string("/proc/self/comm")
            .unwrap()
            .trim_end()
            .to_owned();
        let us = vec![Holder { pid: me(), comm }];
        let l4_snap = listener_at(&snap, l4_addr).expect("127.0.0.1 listener missing");
        assert_eq!(l4_snap.holders, us);
        assert_eq!(l4_snap.accept_queue, 1);
        assert_ne!(l4_snap.inode, 0);
        let l6_snap = listener_at(&snap, l6_addr).expect("[::] listener missing");
        assert!(matches!(l6_snap.addr.local, SocketAddr::V6(_)));
        assert_eq!(l6_snap.holders, us);
        assert_eq!(l6_snap.accept_queue, 0);

        let ours: Vec<&SnapConn> = snap
            .connections
            .iter()
            .filter(|c| {
                c.tuple.netns == ns && [a4.port(), a6.port()].contains(&c.tuple.local.port())
            })
            .collect();
        let mut got: Vec<Tuple> = ours.iter().map(|c| c.tuple).collect();
        let mut want: Vec<Tuple> = server_side.iter().map(|s| tuple_of(ns, s)).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "exactly the accepted server-side sockets");
        for conn in &ours {
            assert_eq!(conn.holders, us);
            assert_eq!(conn.state, TCP_ESTABLISHED);
            assert_ne!(conn.inode, 0);
        }
        for client in &clients {
            let local = client.local_addr().unwrap();
            assert!(
                !snap
                    .connections
                    .iter()
                    .any(|c| c.tuple.netns == ns && c.tuple.local == local),
                "outbound client socket {local} reported as inbound"
            );
        }
        if let Some((c3, _)) = &v4_to_v6 {
            let mapped = SocketAddr::V6(SocketAddrV6::new(
                Ipv4Addr::LOCALHOST.to_ipv6_mapped(),
                a6.port(),
                0,
                0,
            ));
            let conn = ours
                .iter()
                .find(|c| c.tuple.local == mapped)
                .expect("IPv4 client of the [::] listener missing as a v4-mapped IPv6 socket");
            assert_eq!(conn.tuple.remote.port(), c3.local_addr().unwrap().port());
            assert!(matches!(conn.tuple.remote, SocketAddr::V6(_)));
        }

        let mut sorted = snap.listeners.clone();
        sorted.sort_by_key(|l| (l.addr, l.inode));
        assert_eq!(sorted, snap.listeners);
        let mut sorted = snap.connections.clone();
        sorted.sort_by_key(|c| (c.tuple, c.inode));
        assert_eq!(sorted, snap.connections);
    }

    #[test]
    fn live_inbound_fds_of_own_pid() {
        let ns = own_netns();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        let want = tuple_of(ns, &server);

        let live = live_inbound_fds(me()).unwrap();
        assert!(live.contains(&want), "{want:?} missing from {live:?}");
        let client_local = client.local_addr().unwrap();
        assert!(
            !live.iter().any(|t| t.local == client_local),
            "outbound socket counted"
        );

        // Once the last listener is gone, the dump alone cannot tell the
        // connection is inbound; a listen address known from events can.
        drop(listener);
        assert!(!live_inbound_fds(me()).unwrap().contains(&want));
        let known = [ListenAddr {
            netns: ns,
            local: addr,
        }];
        assert!(live_inbound_fds_with(me(), &known).unwrap().contains(&want));

        drop(server);
        assert!(!live_inbound_fds_with(me(), &known).unwrap().contains(&want));
    }

    #[test]
    fn gone_follows_the_socket_not_the_process() {
        let ns = own_netns();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let live = tuple_of(ns, &server);
        let ended = Tuple {
            remote: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)),
            ..live
        };
        assert_eq!(gone(&[(live, me()), (ended, me())]).unwrap(), [ended]);

        // Server closes first: FIN_WAIT1/2 is no longer live.
        drop(server);
        assert_eq!(gone(&[(live, me())]).unwrap(), [live]);
        drop(client);
        // A namespace nobody can be found in keeps its connections.
        assert!(gone(&[(live, u32::MAX / 2)]).unwrap().is_empty());
    }

    /// Real loopback connections: one quiet, one with unread bytes at the
    /// server, one whose server-side writes the client does not read (its
    /// small receive buffer full, the rest waits in the server's send queue).
    #[test]
    fn activity_reads_idle_time_and_what_is_in_flight() {
        let ns = own_netns();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let quiet_client = TcpStream::connect(addr).unwrap();
        let (quiet, _) = listener.accept().unwrap();
        let mut unread_client = TcpStream::connect(addr).unwrap();
        let (unread, _) = listener.accept().unwrap();
        // A client that reads nothing, with a small receive buffer so the
        // server's writes back up on its side (set before connecting, so
        // the window is small from the handshake on).
        let stuck_client = socket2_like_small_rcvbuf(addr);
        let (mut stuck, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        unread_client.write_all(b"12345").unwrap();
        stuck.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0usize;
        while written < 16 << 20 {
            match stuck.write(&chunk) {
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        let t = |s: &TcpStream| (tuple_of(ns, s), me());
        let other = Tuple {
            remote: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)),
            ..tuple_of(ns, &quiet)
        };
        let got = activity(&[t(&quiet), t(&unread), t(&stuck), (other, me())]).unwrap();
        let of = |s: &TcpStream| got.iter().find(|g| g.0 == tuple_of(ns, s)).unwrap().1;
        assert_eq!(got.len(), 3, "{got:?}");

        let q = of(&quiet);
        assert!(!q.in_flight, "{q:?}");
        let idle = q.idle_ms.unwrap();
        assert!((300..1000).contains(&idle), "{q:?}");

        let u = of(&unread);
        assert!(u.in_flight && u.unread_bytes == 5, "{u:?}");
        assert!(
            u.last_recv_ms.unwrap() < 100 && u.idle_ms.unwrap() < 100,
            "{u:?}"
        );
        assert_eq!(u.unsent_bytes, Some(0));

        let s = of(&stuck);
        assert!(s.in_flight && s.unread_bytes == 0, "{s:?}");
        assert!(s.unsent_bytes.unwrap() > 0, "{s:?} after writing {written}");
        assert!(s.idle_ms.unwrap() < 200, "{s:?}");
        drop((quiet_client, stuck_client));
    }

    fn socket2_like_small_rcvbuf(addr: SocketAddr) -> TcpStream {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket/setsockopt/connect on a fresh fd we own;
        // the fd is handed to a TcpStream that closes it.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0);
            let size: libc::c_int = 4096;
            let rc = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            assert_eq!(rc, 0);
            let SocketAddr::V4(v4) = addr else {
                panic!("ipv4 only")
            };
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            let rc = libc::connect(
                fd,
                (&raw const sin).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            assert_eq!(rc, 0);
            TcpStream::from_raw_fd(fd)
        }
    }

    /// Enough sockets that the dump spans many netlink datagrams (the kernel
    /// starts with roughly page-sized ones).
    #[test]
    fn live_inbound_fds_across_many_datagrams() {
        let ns = own_netns();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut pairs = Vec::new();
        for _ in 0..150 {
            let client = TcpStream::connect(addr).unwrap();
            let (server, _) = listener.accept().unwrap();
            pairs.push((client, server));
        }
        let live = live_inbound_fds(me()).unwrap();
        let mine: Vec<&Tuple> = live.iter().filter(|t| t.local == addr).collect();
        assert_eq!(mine.len(), pairs.len());
        for (_, server) in &pairs {
            assert!(live.contains(&tuple_of(ns, server)));
        }
    }

    #[test]
    fn live_inbound_fds_of_missing_pid_fails() {
        let err = live_inbound_fds(u32::MAX >> 1).unwrap_err();
        assert!(format!("{err:#}").contains("/proc/"), "{err:#}");
    }

    /// Deletes the namespace and kills the server even when an assert fails.
    struct NsGuard {
        name: String,
        child: Option<Child>,
    }

    impl Drop for NsGuard {
        fn drop(&mut self) {
            if let Some(child) = &mut self.child {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    fn ip(args: &[&str]) {
        let status = Command::new("ip").args(args).status().unwrap();
        assert!(status.success(), "ip {args:?} failed: {status}");
    }

    const PY_SERVER: &str = r#"
import os, socket, sys
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(8)
port = l.getsockname()[1]
c = socket.create_connection(("127.0.0.1", port))
s, _ = l.accept()
print("ready", os.getpid(), port, flush=True)
sys.stdin.read()
"#;

    #[test]
    fn snapshot_enters_other_network_namespaces() {
        if !rustix::process::geteuid().is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "needs root (ip netns add)"
            );
            eprintln!("skipping: needs root to create a network namespace");
            return;
        }
        let name = format!("gw-snap-{}-{}", me(), monotonic_now().subsec_nanos());
        ip(&["netns", "add", &name]);
        let mut guard = NsGuard { name, child: None };
        ip(&["-n", &guard.name, "link", "set", "lo", "up"]);
        let child = Command::new("ip")
            .args(["netns", "exec", &guard.name, "python3", "-c", PY_SERVER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let child = guard.child.insert(child);
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            fields.first(),
            Some(&"ready"),
            "python server did not start: {line:?}"
        );
        let py_pid: u32 = fields[1].parse().unwrap();
        let port: u16 = fields[2].parse().unwrap();
        let their_ns = NetNsHandle::of_pid(py_pid).unwrap().inode();
        assert_ne!(their_ns, own_netns());

        let addr = ListenAddr {
            netns: their_ns,
            local: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        };
        let snap = take(monotonic_now).unwrap();
        let listener =
            listener_at(&snap, addr).unwrap_or_else(|| panic!("listener {addr:?} missing"));
        assert_eq!(
            listener.holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
            [py_pid]
        );
        assert!(
            listener.holders[0].comm.starts_with("python"),
            "{:?}",
            listener.holders
        );
        let theirs: Vec<&SnapConn> = snap
            .connections
            .iter()
            .filter(|c| c.tuple.netns == their_ns)
            .collect();
        assert_eq!(
            theirs.len(),
            1,
            "only the accepted side is inbound: {theirs:?}"
        );
        assert_eq!(theirs[0].tuple.local, addr.local);
        assert_eq!(
            theirs[0].holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
            [py_pid]
        );
        // Nothing from their namespace leaks into ours under the same address.
        assert!(
            !snap
                .listeners
                .iter()
                .any(|l| l.addr.netns != their_ns && l.inode == listener.inode)
        );

        let live = live_inbound_fds(py_pid).unwrap();
        assert_eq!(live, [theirs[0].tuple]);

        if let Some(stdin) = &mut child.stdin {
            let _ = stdin.flush();
        }
    }
}
