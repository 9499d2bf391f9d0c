//! Point-in-time views of the host's TCP sockets and who holds them: the
//! startup/reconcile [`Snapshot`] ([`take`]) and the drain gate's fresh look
//! at one process ([`live_inbound_fds`]).
//!
//! A snapshot joins two sources: every process's socket fds (`/proc/<pid>/fd`
//! links `socket:[inode]`, via `procfs`) and one sock_diag netlink dump per
//! network namespace those processes live in. The namespace matters: a dump
//! only shows the namespace of the netlink socket that asks, so sockets of
//! containers (and of the tests' own namespaces) are invisible from ours. We
//! keep an nsfs handle on each namespace found during the /proc walk and
//! create that namespace's netlink socket on a short-lived thread inside it
//! ([`super::netns`]); the dump itself then runs here, and none of our
//! long-lived threads ever changes namespace.
//!
//! "Inbound" is decided the only way a dump allows: a connected socket whose
//! local address matches a listener of the same namespace
//! ([`ListenAddr::matches`]). Only sockets some process holds count (inode
//! 0 means still in an accept queue).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    io::Read,
    net::SocketAddr,
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use log::{debug, warn};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};
use procfs::process::{FDTarget, Process};

use super::netns::{self, NetNsHandle};
use crate::event::{Holder, ListenAddr, NetNs, SnapConn, SnapListener, Snapshot, Tuple};

/// TCP state numbers (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_CLOSE_WAIT: u8 = 8;
pub const TCP_LISTEN: u8 = 10;

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
pub fn take(clock_now: impl Fn() -> Duration) -> anyhow::Result<Snapshot> {
    let at = clock_now();
    let own = netns::current_thread_netns()?;
    let procs = walk_proc()?;
    let mut snapshot = Snapshot {
        at,
        ..Snapshot::default()
    };
    for (netns, handle) in &procs.namespaces {
        let sockets = match dump_netns(handle) {
            Ok(sockets) => sockets,
            Err(err) if *netns != own && netns::is_permission_denied(&err) => {
                warn!("skipping netns {netns}: {err:#}");
                continue;
            }
            Err(err) => return Err(err),
        };
        let (listeners, connections) = assemble(*netns, &sockets, &procs.holders, &[]);
        snapshot.listeners.extend(listeners);
        snapshot.connections.extend(connections);
    }
    snapshot.listeners.sort_by_key(|l| (l.addr, l.inode));
    snapshot.connections.sort_by_key(|c| (c.tuple, c.inode));
    Ok(snapshot)
}

/// The live inbound connections `pid` holds right now: its socket fds joined
/// with one sock_diag dump of its network namespace. Reads only this
/// process's /proc entries, never the whole of /proc.
///
/// Inbound means "matches a listener that exists now". A server that closed
/// its last listener before draining would hide its connections from this
/// test; use [`live_inbound_fds_with`] to add listen addresses known from
/// the event stream.
pub fn live_inbound_fds(pid: u32) -> anyhow::Result<Vec<Tuple>> {
    live_inbound_fds_with(pid, &[])
}

/// [`live_inbound_fds`], also counting as inbound any connection whose local
/// address matches one of `known_listeners` (addresses the caller saw the
/// target listen on, which may since have been closed).
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
    let process = open_process(pid).with_context(|| format!("failed to open /proc/{pid}"))?;
    let handle = open_netns(&process)
        .with_context(|| format!("failed to open network namespace of pid {pid}"))?;
    let inodes = socket_inodes(&process)
        .with_context(|| format!("failed to list socket fds of pid {pid}"))?;
    let holder = Holder {
        pid,
        comm: String::new(),
    };
    let holders: HashMap<u64, Vec<Holder>> = inodes
        .into_iter()
        .map(|inode| (inode, vec![holder.clone()]))
        .collect();
    let sockets = dump_netns(&handle)?;
    let (_, connections) = assemble(handle.inode(), &sockets, &holders, known_listeners);
    Ok(connections)
}

/// What the /proc walk found.
struct ProcTable {
    /// Socket inode → the processes holding it (sorted by pid, deduplicated).
    holders: HashMap<u64, Vec<Holder>>,
    /// Every network namespace some process lives in, with a handle to enter it.
    namespaces: BTreeMap<NetNs, NetNsHandle>,
}

fn walk_proc() -> anyhow::Result<ProcTable> {
    let mut holders: HashMap<u64, Vec<Holder>> = HashMap::new();
    let mut namespaces = BTreeMap::new();
    // Reading the directory lists thread-group leaders only: threads live
    // under /proc/<pid>/task, so every entry here is a process.
    for entry in procfs::process::all_processes().context("failed to list processes in /proc")? {
        let process = match entry {
            Ok(process) => process,
            Err(err) => {
                debug!("skipping a /proc entry: {err}");
                continue;
            }
        };
        let Ok(pid) = u32::try_from(process.pid) else {
            continue;
        };
        match read_process(&process) {
            Ok((handle, comm, inodes)) => {
                // One handle per namespace is enough; the others close here.
                namespaces.entry(handle.inode()).or_insert(handle);
                for inode in inodes {
                    holders.entry(inode).or_default().push(Holder {
                        pid,
                        comm: comm.clone(),
                    });
                }
            }
            Err(err) => debug!("skipping pid {pid}: {err:#}"),
        }
    }
    for list in holders.values_mut() {
        list.sort();
        list.dedup_by_key(|h| h.pid);
    }
    Ok(ProcTable {
        holders,
        namespaces,
    })
}

/// One process's network namespace, comm and socket inodes.
fn read_process(process: &Process) -> anyhow::Result<(NetNsHandle, String, BTreeSet<u64>)> {
    let handle = open_netns(process)?;
    let inodes = socket_inodes(process)?;
    let comm = read_comm(process)?;
    Ok((handle, comm, inodes))
}

fn open_process(pid: u32) -> anyhow::Result<Process> {
    let pid = i32::try_from(pid).map_err(|_| anyhow!("pid {pid} out of range"))?;
    Ok(Process::new(pid)?)
}

/// Opened relative to the process's /proc directory fd, so a recycled pid
/// cannot hand us another process's namespace.
fn open_netns(process: &Process) -> anyhow::Result<NetNsHandle> {
    let file = process
        .open_relative("ns/net")
        .context("failed to open ns/net")?;
    NetNsHandle::from_file(file)
}

fn socket_inodes(process: &Process) -> anyhow::Result<BTreeSet<u64>> {
    let mut inodes = BTreeSet::new();
    for fd in process.fd().context("failed to read fd directory")? {
        // An fd closed while we read the table is simply not there.
        let Ok(fd) = fd else { continue };
        if let FDTarget::Socket(inode) = fd.target {
            inodes.insert(inode);
        }
    }
    Ok(inodes)
}

fn read_comm(process: &Process) -> anyhow::Result<String> {
    let mut comm = String::new();
    process
        .open_relative("comm")
        .context("failed to open comm")?
        .read_to_string(&mut comm)
        .context("failed to read comm")?;
    Ok(comm.trim_end_matches('\n').to_owned())
}

/// Which of `conns` (each with a pid holding it, to find its namespace)
/// still exist as ESTABLISHED or CLOSE_WAIT sockets. One sock_diag dump per
/// namespace and no /proc walk: the cheap second look after the startup
/// merge. A namespace that can no longer be entered (its process is gone)
/// keeps its connections in the answer; the periodic rescans settle them.
pub fn still_open(conns: &[(Tuple, u32)]) -> anyhow::Result<HashSet<Tuple>> {
    let mut pid_in: BTreeMap<NetNs, u32> = BTreeMap::new();
    for (tuple, pid) in conns {
        pid_in.entry(tuple.netns).or_insert(*pid);
    }
    let mut open = HashSet::new();
    for (netns, pid) in pid_in {
        let dumped = NetNsHandle::of_pid(pid)
            .ok()
            .filter(|h| h.inode() == netns)
            .map(|h| dump_netns(&h))
            .transpose()?;
        match dumped {
            Some(sockets) => open.extend(
                sockets
                    .iter()
                    .filter(|s| matches!(s.state, TCP_ESTABLISHED | TCP_CLOSE_WAIT))
                    .map(|s| Tuple {
                        netns,
                        local: s.local,
                        remote: s.remote,
                    }),
            ),
            None => open.extend(conns.iter().map(|c| c.0).filter(|t| t.netns == netns)),
        }
    }
    Ok(open)
}

/// One TCP socket from a sock_diag dump.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DiagSocket {
    state: u8,
    local: SocketAddr,
    remote: SocketAddr,
    /// For a listener: its accept-queue length. Otherwise unread bytes.
    rqueue: u32,
    /// 0 when no file refers to the socket (not accepted yet, or orphaned).
    inode: u64,
}

impl DiagSocket {
    fn from_response(response: &InetResponse) -> Self {
        let header = &response.header;
        let id = &header.socket_id;
        // The crate already decodes addresses by family (AF_INET → V4,
        // AF_INET6 → V6) and ports from network order. Scope ids are left
        // at 0, as the eBPF side reports them.
        Self {
            state: header.state,
            local: SocketAddr::new(id.source_address, id.source_port),
            remote: SocketAddr::new(id.destination_address, id.destination_port),
            rqueue: header.recv_queue,
            inode: u64::from(header.inode),
        }
    }
}

/// All IPv4 and IPv6 TCP sockets in LISTEN, ESTABLISHED or CLOSE_WAIT in the
/// namespace `handle` refers to.
fn dump_netns(handle: &NetNsHandle) -> anyhow::Result<Vec<DiagSocket>> {
    let netns = handle.inode();
    let socket = handle
        .run_inside(|| Socket::new(NETLINK_SOCK_DIAG))
        .with_context(|| format!("failed to open a sock_diag socket in netns {netns}"))?
        .with_context(|| format!("failed to open a sock_diag socket in netns {netns}"))?;
    let mut sockets = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump_tcp(&socket, family, &mut sockets)
            .with_context(|| format!("failed to dump tcp sockets in netns {netns}"))?;
    }
    Ok(sockets)
}

/// Larger than any datagram a netlink dump sends (the kernel caps dump
/// skbs at 32 KiB), so a message is never truncated.
const RECV_BUF: usize = 64 * 1024;

fn dump_tcp(socket: &Socket, family: u8, out: &mut Vec<DiagSocket>) -> anyhow::Result<()> {
    let family_name = if family == AF_INET { "ipv4" } else { "ipv6" };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::LISTEN | StateFlags::ESTABLISHED | StateFlags::CLOSE_WAIT,
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    // The kernel replies to the sender; an unbound netlink socket gets an
    // automatic port id on send, so no bind/connect is needed.
    socket
        .send_to(&buf, &NetlinkAddr::new(0, 0), 0)
        .with_context(|| format!("failed to send {family_name} sock_diag request"))?;

    let mut buf = vec![0u8; RECV_BUF];
    loop {
        // MSG_TRUNC makes recv return the datagram's real length.
        let len = socket
            .recv(&mut &mut buf[..], libc::MSG_TRUNC)
            .with_context(|| format!("failed to receive {family_name} sock_diag reply"))?;
        if len > buf.len() {
            bail!(
                "{family_name} sock_diag reply of {len} bytes exceeds our {} byte buffer",
                buf.len()
            );
        }
        let mut offset = 0;
        while offset < len {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..len])
                .with_context(|| format!("failed to decode {family_name} sock_diag reply"))?;
            let msg_len = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    out.push(DiagSocket::from_response(&response));
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(err) => {
                    return Err(anyhow::Error::new(err.to_io())).with_context(|| {
                        format!("kernel rejected the {family_name} sock_diag dump")
                    });
                }
                // Noop, Overrun, and other message kinds carry no socket.
                _ => {}
            }
            if msg_len == 0 {
                bail!("{family_name} sock_diag reply holds a zero-length message");
            }
            // Netlink messages are 4-byte aligned within a datagram.
            offset += (msg_len + 3) & !3;
        }
    }
}

/// Joins one namespace's dump with the fd tables: its listeners (held or
/// not) and its live inbound connections that some process holds.
/// `extra_listeners` count as listeners of `netns` for the inbound test.
fn assemble(
    netns: NetNs,
    sockets: &[DiagSocket],
    holders: &HashMap<u64, Vec<Holder>>,
    extra_listeners: &[ListenAddr],
) -> (Vec<SnapListener>, Vec<SnapConn>) {
    let holders_of = |inode: u64| holders.get(&inode).cloned().unwrap_or_default();
    let listeners: Vec<SnapListener> = sockets
        .iter()
        .filter(|s| s.state == TCP_LISTEN)
        .map(|s| SnapListener {
            addr: ListenAddr {
                netns,
                local: s.local,
            },
            inode: s.inode,
            accept_queue: s.rqueue,
            holders: if s.inode == 0 {
                Vec::new()
            } else {
                holders_of(s.inode)
            },
        })
        .collect();
    // Indexed by port: a busy namespace has ~100k connections and maybe
    // hundreds of listeners.
    let mut by_port: HashMap<u16, Vec<ListenAddr>> = HashMap::new();
    for addr in listeners
        .iter()
        .map(|l| l.addr)
        .chain(extra_listeners.iter().copied().filter(|a| a.netns == netns))
    {
        by_port.entry(addr.local.port()).or_default().push(addr);
    }
    let is_inbound = |local: SocketAddr| {
        by_port
            .get(&local.port())
            .is_some_and(|addrs| addrs.iter().any(|l| l.matches(netns, local)))
    };
    let connections = sockets
        .iter()
        .filter(|s| matches!(s.state, TCP_ESTABLISHED | TCP_CLOSE_WAIT) && s.inode != 0)
        .filter(|s| is_inbound(s.local))
        .filter_map(|s| {
            let holders = holders_of(s.inode);
            (!holders.is_empty()).then_some(SnapConn {
                tuple: Tuple {
                    netns,
                    local: s.local,
                    remote: s.remote,
                },
                inode: s.inode,
                state: s.state,
                holders,
            })
        })
        .collect();
    (listeners, connections)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{
        io::{BufRead, BufReader, Write},
        net::{Ipv4Addr, Ipv6Addr, SocketAddrV6, TcpListener, TcpStream},
        process::{Child, Command, Stdio},
        time::Instant,
    };

    use super::*;
    use crate::source::monotonic_now;

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
    fn still_open_follows_the_socket_not_the_process() {
        let ns = own_netns();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let want = tuple_of(ns, &server);
        let gone = Tuple {
            remote: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)),
            ..want
        };
        let open = still_open(&[(want, me()), (gone, me())]).unwrap();
        assert!(open.contains(&want) && !open.contains(&gone), "{open:?}");

        // Server closes first: FIN_WAIT1/2 is no longer live.
        drop(server);
        assert!(!still_open(&[(want, me())]).unwrap().contains(&want));
        drop(client);
        // A namespace nobody can be found in keeps its connections.
        assert!(still_open(&[(want, u32::MAX / 2)]).unwrap().contains(&want));
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

    fn diag(state: u8, local: &str, remote: &str, rqueue: u32, inode: u64) -> DiagSocket {
        DiagSocket {
            state,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            rqueue,
            inode,
        }
    }

    #[test]
    fn assemble_keeps_held_inbound_connections_only() {
        let holder = |pid| Holder {
            pid,
            comm: format!("p{pid}"),
        };
        let holders: HashMap<u64, Vec<Holder>> = [
            (10, vec![holder(1), holder(2)]),
            (11, vec![holder(1)]),
            (12, vec![holder(1)]),
            (13, vec![holder(3)]),
            (14, vec![holder(1)]),
        ]
        .into();
        let sockets = [
            diag(TCP_LISTEN, "0.0.0.0:80", "0.0.0.0:0", 2, 10),
            diag(TCP_LISTEN, "[::]:443", "[::]:0", 0, 20), // kernel-owned: no holder
            diag(TCP_ESTABLISHED, "10.0.0.1:80", "10.0.0.9:5000", 0, 11),
            diag(
                TCP_CLOSE_WAIT,
                "[::ffff:10.0.0.1]:443",
                "[::ffff:10.0.0.9]:5001",
                0,
                12,
            ),
            diag(TCP_ESTABLISHED, "10.0.0.1:80", "10.0.0.9:5002", 0, 0), // queued
            diag(TCP_ESTABLISHED, "10.0.0.1:80", "10.0.0.9:5003", 0, 99), // unheld
            diag(TCP_ESTABLISHED, "10.0.0.1:40000", "10.0.0.7:80", 0, 13), // outbound
            diag(TCP_ESTABLISHED, "10.0.0.1:8080", "10.0.0.9:5004", 0, 14), // listener gone
        ];
        let (listeners, conns) = assemble(7, &sockets, &holders, &[]);
        assert_eq!(listeners.len(), 2);
        assert_eq!(listeners[0].holders, [holder(1), holder(2)]);
        assert_eq!(listeners[0].accept_queue, 2);
        assert!(listeners[1].holders.is_empty());
        let inodes: Vec<u64> = conns.iter().map(|c| c.inode).collect();
        assert_eq!(inodes, [11, 12]);
        assert_eq!(conns[1].state, TCP_CLOSE_WAIT);
        assert!(conns.iter().all(|c| c.tuple.netns == 7));

        let known = [
            ListenAddr {
                netns: 7,
                local: "0.0.0.0:8080".parse().unwrap(),
            },
            ListenAddr {
                netns: 8,
                local: "0.0.0.0:40000".parse().unwrap(),
            },
        ];
        let (_, conns) = assemble(7, &sockets, &holders, &known);
        let inodes: Vec<u64> = conns.iter().map(|c| c.inode).collect();
        assert_eq!(inodes, [11, 12, 14]);
    }
}
