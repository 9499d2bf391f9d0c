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
    collections::{BTreeMap, BTreeSet, HashMap},
    io::Read,
    net::SocketAddr,
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use log::{debug, warn};
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
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
/// the /proc walk starts: anything the
/// event stream reports after `at` may or may not be reflected here.
/// Processes that vanish or deny access are skipped; namespaces we may not
/// enter (no `CAP_SYS_ADMIN`) are skipped with a warning. Errors are for
/// what makes the whole view meaningless (no /proc, no sock_diag).
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
pub fn live_inbound_fds_with(pid: u32, known_listeners: &[ListenAddr]) -> anyhow::Result<Vec<Tuple>> {
    let process = open_process(pid).with_context(|| format!("failed to open /proc/{pid}"))?;
    let handle = open_netns(&process).with_context(|| format!("failed to open network namespace of pid {pid}"))?;
    let inodes = socket_inodes(&process).with_context(|| format!("failed to list socket fds of pid {pid}"))?;
    let holder = Holder {
        pid,
        comm: String::new(),
    };
    let holders: HashMap<u64, Vec<Holder>> = inodes.into_iter().map(|inode| (inode, vec![holder.clone()])).collect();
    let sockets = dump_netns(&handle)?;
    let (_, connections) = assemble(handle.inode(), &sockets, &holders, known_listeners);
    let mut tuples: Vec<Tuple> = connections.into_iter().map(|c| c.tuple).collect();
    tuples.sort();
    Ok(tuples)
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
        let Ok(pid) = u32::try_from(process.pid) else { continue };
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
    Ok(ProcTable { holders, namespaces })
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
    let file = process.open_relative("ns/net").context("failed to open ns/net")?;
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
            bail!("{family_name} sock_diag reply of {len} bytes exceeds our {} byte buffer", buf.len());
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
                    return Err(anyhow::Error::new(err.to_io()))
                        .with_context(|| format!("kernel rejected the {family_name} sock_diag dump"));
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
            addr: ListenAddr { netns, local: s.local },
            inode: s.inode,
            accept_queue: s.rqueue,
            holders: if s.inode == 0 { Vec::new() } else { holders_of(s.inode) },
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
            (!holders.is_empty()).then(|| SnapConn {
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
