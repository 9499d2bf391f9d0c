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

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::File,
    mem::MaybeUninit,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use log::{debug, warn};
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SOCK_DIAG_BY_FAMILY, SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{InetResponse, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};
use rustix::fs::{AtFlags, Mode, OFlags, RawDir};

use super::netns::{self, NetNsHandle};
use crate::event::{Holder, ListenAddr, NetNs, SnapConn, SnapListener, Snapshot, Tuple};

/// TCP state numbers (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_CLOSE_WAIT: u8 = 8;
pub const TCP_LISTEN: u8 = 10;

/// The walk is kernel work per fd; on a big host more threads than this
/// would mostly take CPU from the servers being watched.
const MAX_WALKERS: usize = 4;

/// Directory-listing buffer of each walker: a 20k-fd table takes ~20 reads.
const DIRENT_BUF: usize = 32 * 1024;

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
    Ok(snapshot)
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
    let dir = open_dir(rustix::fs::CWD, format!("/proc/{pid}"))
        .with_context(|| format!("failed to open /proc/{pid}"))?;
    let handle = open_netns(dir.as_fd())
        .with_context(|| format!("failed to open network namespace of pid {pid}"))?;
    let mut table = ProcTable::default();
    let mut buf = vec![MaybeUninit::uninit(); DIRENT_BUF];
    socket_inodes(dir.as_fd(), &mut buf, |inode| {
        table.sockets.push((inode, pid))
    })
    .with_context(|| format!("failed to list socket fds of pid {pid}"))?;
    table.seal();
    let dump = dump_netns(&handle, known_listeners)?;
    let mut snapshot = Snapshot::default();
    assemble(handle.inode(), &dump, &table, &mut snapshot);
    Ok(snapshot.connections)
}

/// What the /proc walk found.
#[derive(Debug, Default)]
struct ProcTable {
    /// (socket inode, pid) for every socket fd, sorted and deduplicated
    /// once the walk is done ([`ProcTable::seal`]): a socket's holders are
    /// one run of equal inodes, sorted by pid. 16 bytes per fd, where a map
    /// from inode to a list of holders would cost several allocations.
    sockets: Vec<(u64, u32)>,
    /// Command name of each pid in `sockets`.
    comms: HashMap<u32, String>,
    /// Why the walk stopped early (out of fds or memory), if it did: the
    /// table is then partial and must not be taken for the host's state.
    failed: Option<String>,
}

impl ProcTable {
    fn seal(&mut self) {
        self.sockets.sort_unstable();
        self.sockets.dedup();
    }

    /// Every process holding the socket `inode`, sorted by pid.
    fn holders_of(&self, inode: u64) -> Vec<Holder> {
        let start = self.sockets.partition_point(|&(i, _)| i < inode);
        let run = self.sockets[start..]
            .iter()
            .take_while(|&&(i, _)| i == inode);
        // Exactly sized: collected from this iterator a Vec would reserve
        // room for four, and there is one per connection.
        let mut holders = Vec::with_capacity(run.clone().count());
        holders.extend(run.map(|&(_, pid)| Holder {
            pid,
            comm: self.comms.get(&pid).cloned().unwrap_or_default(),
        }));
        holders
    }

    /// Whether any process holds the socket `inode`.
    fn is_held(&self, inode: u64) -> bool {
        let start = self.sockets.partition_point(|&(i, _)| i < inode);
        self.sockets.get(start).is_some_and(|&(i, _)| i == inode)
    }
}

/// One namespace's dump: its listeners and its live inbound connections.
type Dumped = (NetNs, anyhow::Result<NetnsDump>);

/// Walks the /proc entries of `pids` on every core while one more thread
/// dumps each network namespace as soon as the walk first meets it (the
/// walk and the dumps are independent: both are newer than the snapshot's
/// `at`, which is all the merge relies on).
fn scan(proc_dir: BorrowedFd<'_>, pids: &[u32]) -> anyhow::Result<(ProcTable, Vec<Dumped>)> {
    let walkers = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_WALKERS);
    let next = AtomicUsize::new(0);
    let seen = Mutex::new(HashSet::new());
    thread::scope(|scope| {
        let (found, namespaces) = mpsc::channel::<NetNsHandle>();
        let dumper = thread::Builder::new()
            .name("gw-dump".to_owned())
            .spawn_scoped(scope, move || {
                namespaces
                    .into_iter()
                    .map(|handle| (handle.inode(), dump_netns(&handle, &[])))
                    .collect::<Vec<Dumped>>()
            })
            .context("failed to spawn the sock_diag dump thread")?;
        let (next, seen) = (&next, &seen);
        let mut others = Vec::new();
        for i in 1..walkers {
            let found = found.clone();
            let walker = thread::Builder::new()
                .name(format!("gw-walk-{i}"))
                .spawn_scoped(scope, move || walk(proc_dir, pids, next, seen, &found))
                .context("failed to spawn a /proc walker thread")?;
            others.push(walker);
        }
        let mut table = walk(proc_dir, pids, next, seen, &found);
        drop(found);
        for walker in others {
            let part = walker
                .join()
                .map_err(|_| anyhow!("a /proc walker thread panicked"))?;
            table.sockets.extend(part.sockets);
            table.comms.extend(part.comms);
            table.failed = table.failed.or(part.failed);
        }
        if let Some(why) = table.failed {
            anyhow::bail!("the /proc walk ran out of resources ({why}): no partial snapshot");
        }
        table.seal();
        let dumps = dumper
            .join()
            .map_err(|_| anyhow!("the sock_diag dump thread panicked"))?;
        Ok((table, dumps))
    })
}

/// Whether `err` comes from a lack of resources (EMFILE, ENFILE, ENOMEM),
/// not from the process it was about.
fn is_resource_error(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        let errno = c.downcast_ref::<rustix::io::Errno>().copied().or_else(|| {
            c.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error)
                .map(rustix::io::Errno::from_raw_os_error)
        });
        matches!(
            errno,
            Some(rustix::io::Errno::MFILE | rustix::io::Errno::NFILE | rustix::io::Errno::NOMEM)
        )
    })
}

/// One walker: takes the next pid until none is left. Processes that vanish
/// or deny access are skipped; a lack of resources stops the walk (see
/// [`ProcTable::failed`]).
fn walk(
    proc_dir: BorrowedFd<'_>,
    pids: &[u32],
    next: &AtomicUsize,
    seen: &Mutex<HashSet<NetNs>>,
    found: &mpsc::Sender<NetNsHandle>,
) -> ProcTable {
    let mut table = ProcTable::default();
    let mut buf = vec![MaybeUninit::uninit(); DIRENT_BUF];
    while let Some(&pid) = pids.get(next.fetch_add(1, Ordering::Relaxed)) {
        let before = table.sockets.len();
        let read = read_process(proc_dir, pid, &mut buf, seen, found, &mut table.sockets);
        match read {
            Ok(Some(comm)) => {
                table.comms.insert(pid, comm);
            }
            Ok(None) => {}
            // Out of fds or memory says nothing about the process: a
            // snapshot without it would retire its connections.
            Err(err) if is_resource_error(&err) => {
                table.sockets.truncate(before);
                table.failed.get_or_insert(format!("pid {pid}: {err:#}"));
                return table;
            }
            Err(err) => {
                table.sockets.truncate(before);
                debug!("skipping pid {pid}: {err:#}");
            }
        }
    }
    table
}

/// Reads one process: hands its network namespace to the dumper if it is
/// the first process seen there, appends (inode, pid) for each socket fd,
/// and returns its comm if it holds any socket. Everything is read relative
/// to one `/proc/<pid>` directory fd, so a recycled pid cannot mix two
/// processes' views.
fn read_process(
    proc_dir: BorrowedFd<'_>,
    pid: u32,
    buf: &mut [MaybeUninit<u8>],
    seen: &Mutex<HashSet<NetNs>>,
    found: &mpsc::Sender<NetNsHandle>,
    sockets: &mut Vec<(u64, u32)>,
) -> anyhow::Result<Option<String>> {
    let dir = open_dir(proc_dir, pid.to_string()).context("failed to open its /proc entry")?;
    let ns = rustix::fs::statat(&dir, "ns/net", AtFlags::empty())
        .context("failed to stat ns/net")?
        .st_ino;
    let ns = ns_inode(ns)?;
    // Namespaces are few: a handle is opened only for the first process
    // found in each (one stat per process otherwise). If that fails, the
    // namespace stays unseen and the next process there tries again.
    let mut seen = seen
        .lock()
        .map_err(|_| anyhow!("the namespace set is poisoned"))?;
    if !seen.contains(&ns) {
        let handle = open_netns(dir.as_fd())?;
        seen.insert(handle.inode());
        // The dumper stops only once every walker is done: it is there.
        let _ = found.send(handle);
    }
    drop(seen);
    let before = sockets.len();
    socket_inodes(dir.as_fd(), buf, |inode| sockets.push((inode, pid)))?;
    if sockets.len() == before {
        return Ok(None);
    }
    read_comm(dir.as_fd()).map(Some)
}

/// The pids in /proc, most open fds first. Reading the directory lists
/// thread-group leaders only: threads live under /proc/<pid>/task, so
/// every entry is a process.
///
/// The walkers take processes in this order, so that none is left alone
/// with a 20k-fd process at the end while the others idle. Linux 6.2+ gives
/// a `/proc/<pid>/fd` directory's size as its number of fds; older kernels
/// say 0, which keeps /proc's order.
fn list_pids(proc_dir: BorrowedFd<'_>) -> anyhow::Result<Vec<u32>> {
    let mut buf = vec![MaybeUninit::uninit(); DIRENT_BUF];
    let mut entries = RawDir::new(proc_dir, &mut buf);
    let mut pids = Vec::new();
    while let Some(entry) = entries.next() {
        let entry = entry.context("failed to read /proc")?;
        let name = entry.file_name().to_bytes();
        if let Some(pid) = parse_decimal(name).and_then(|p| u32::try_from(p).ok()) {
            pids.push(pid);
        }
    }
    let mut sized: Vec<(i64, u32)> = pids
        .into_iter()
        .map(|pid| {
            let fds = rustix::fs::statat(proc_dir, format!("{pid}/fd"), AtFlags::empty());
            (fds.map_or(0, |st| st.st_size), pid)
        })
        .collect();
    sized.sort_unstable_by_key(|&(fds, pid)| (std::cmp::Reverse(fds), pid));
    Ok(sized.into_iter().map(|(_, pid)| pid).collect())
}

fn open_dir<P: rustix::path::Arg>(at: BorrowedFd<'_>, path: P) -> anyhow::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        at,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opened relative to the process's /proc directory fd, so a recycled pid
/// cannot hand us another process's namespace.
fn open_netns(dir: BorrowedFd<'_>) -> anyhow::Result<NetNsHandle> {
    let fd = rustix::fs::openat(
        dir,
        "ns/net",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .context("failed to open ns/net")?;
    NetNsHandle::from_file(File::from(fd))
}

/// Calls `f` with the inode of each socket among the fds of the process
/// whose /proc directory is `dir`: one `readlinkat` per fd.
fn socket_inodes(
    dir: BorrowedFd<'_>,
    buf: &mut [MaybeUninit<u8>],
    mut f: impl FnMut(u64),
) -> anyhow::Result<()> {
    let fds = open_dir(dir, "fd").context("failed to open fd directory")?;
    let mut entries = RawDir::new(&fds, buf);
    // `socket:[` + 20 digits + `]` fits; anything longer is no socket.
    let mut link = [MaybeUninit::<u8>::uninit(); 64];
    while let Some(entry) = entries.next() {
        let entry = entry.context("failed to read fd directory")?;
        let name = entry.file_name();
        if name.to_bytes().starts_with(b".") {
            continue;
        }
        // An fd closed while we read the table is simply not there.
        if let Ok((target, rest)) = rustix::fs::readlinkat_raw(&fds, name, &mut link) {
            if !rest.is_empty() {
                if let Some(inode) = socket_inode(target) {
                    f(inode);
                }
            }
        }
    }
    Ok(())
}

/// The inode in an fd link `socket:[12345]`; `None` for anything else
/// (files, pipes, anonymous inodes, other sockets' pseudo-files).
fn socket_inode(link: &[u8]) -> Option<u64> {
    parse_decimal(link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?)
}

/// Plain ASCII digits only (`str::parse` would also take a leading `+`).
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn read_comm(dir: BorrowedFd<'_>) -> anyhow::Result<String> {
    let file = rustix::fs::openat(dir, "comm", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .context("failed to open comm")?;
    let mut buf = [0u8; 128];
    let n = rustix::io::read(&file, &mut buf).context("failed to read comm")?;
    let comm = buf.get(..n).unwrap_or_default();
    Ok(String::from_utf8_lossy(comm)
        .trim_end_matches('\n')
        .to_owned())
}

/// nsfs inode numbers are 32-bit (see [`netns`]).
fn ns_inode(ino: u64) -> anyhow::Result<NetNs> {
    NetNs::try_from(ino)
        .map_err(|_| anyhow!("network namespace inode {ino} does not fit in 32 bits"))
}

/// Which of `conns` (each with a pid holding it, to find its namespace) no
/// longer exist as ESTABLISHED or CLOSE_WAIT sockets. One sock_diag dump per
/// namespace and no /proc walk: the cheap second look after the startup
/// merge. A namespace that can no longer be entered (its process is gone)
/// keeps its connections out of the answer; the periodic rescans settle them.
pub fn gone(conns: &[(Tuple, u32)]) -> anyhow::Result<Vec<Tuple>> {
    let mut pid_in: BTreeMap<NetNs, u32> = BTreeMap::new();
    for (tuple, pid) in conns {
        pid_in.entry(tuple.netns).or_insert(*pid);
    }
    // Whittled down to the missing ones as the dumps show the others.
    let mut missing: HashSet<Tuple> = conns.iter().map(|c| c.0).collect();
    for (netns, pid) in pid_in {
        let handle = NetNsHandle::of_pid(pid).ok().filter(|h| h.inode() == netns);
        let Some(handle) = handle else {
            missing.retain(|t| t.netns != netns);
            continue;
        };
        let here = || missing.iter().filter(|t| t.netns == netns);
        let mut ports: Vec<u16> = here().map(|t| t.local.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        let filter = local_port_filter(&ports);
        let families: Vec<u8> = [AF_INET, AF_INET6]
            .into_iter()
            .filter(|&f| here().any(|t| t.local.is_ipv4() == (f == AF_INET)))
            .collect();
        let socket = diag_socket(&handle)?;
        for family in families {
            dump_tcp(&socket, family, live_states(), &filter, |s| {
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
    }
    let mut gone: Vec<Tuple> = missing.into_iter().collect();
    gone.sort_unstable();
    Ok(gone)
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

/// One namespace's listeners (held or not) and the connected sockets that
/// may be live inbound connections (see [`Inbound`]).
#[derive(Debug, Default)]
struct NetnsDump {
    listeners: Vec<DiagSocket>,
    connections: Vec<DiagSocket>,
}

/// Which connected sockets of one namespace can be live inbound
/// connections: ESTABLISHED or CLOSE_WAIT, held by a file (inode not 0),
/// and with a local address that matches a listener. Applied while the dump
/// streams in, so the other ends of loopback connections (as many again)
/// are never stored.
struct Inbound {
    netns: NetNs,
    /// Indexed by port: a busy namespace has ~100k connections and maybe
    /// hundreds of listeners.
    by_port: HashMap<u16, Vec<ListenAddr>>,
}

impl Inbound {
    /// `extra` counts as listeners of `netns` too (others are ignored).
    fn new(netns: NetNs, listeners: &[DiagSocket], extra: &[ListenAddr]) -> Self {
        let mut by_port: HashMap<u16, Vec<ListenAddr>> = HashMap::new();
        let dumped = listeners.iter().map(|l| ListenAddr {
            netns,
            local: l.local,
        });
        for addr in dumped.chain(extra.iter().copied().filter(|a| a.netns == netns)) {
            by_port.entry(addr.local.port()).or_default().push(addr);
        }
        Self { netns, by_port }
    }

    /// The address families that can have inbound connections here: an
    /// accepted socket has its listener's family (a dual-stack listener's
    /// IPv4 clients are IPv6 sockets with mapped addresses), so a dump of
    /// the other family would only walk the kernel's table for nothing.
    fn families(&self) -> Vec<u8> {
        let listeners = || self.by_port.values().flatten();
        let mut families = Vec::with_capacity(2);
        if listeners().any(|l| l.local.is_ipv4()) {
            families.push(AF_INET);
        }
        if listeners().any(|l| l.local.is_ipv6()) {
            families.push(AF_INET6);
        }
        families
    }

    /// The listening ports, sorted.
    fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.by_port.keys().copied().collect();
        ports.sort_unstable();
        ports
    }

    fn accepts(&self, s: &DiagSocket) -> bool {
        matches!(s.state, TCP_ESTABLISHED | TCP_CLOSE_WAIT)
            && s.inode != 0
            && self
                .by_port
                .get(&s.local.port())
                .is_some_and(|addrs| addrs.iter().any(|l| l.matches(self.netns, s.local)))
    }
}

/// The states [`dump_tcp`] asks for when looking for live connections.
fn live_states() -> StateFlags {
    StateFlags::ESTABLISHED | StateFlags::CLOSE_WAIT
}

/// Dumps the namespace `handle` refers to: listeners first, then the
/// connected sockets [`Inbound`] keeps (with `extra` as more listeners).
fn dump_netns(handle: &NetNsHandle, extra: &[ListenAddr]) -> anyhow::Result<NetnsDump> {
    let netns = handle.inode();
    let socket = diag_socket(handle)?;
    let mut dump = NetnsDump::default();
    for family in [AF_INET, AF_INET6] {
        dump_tcp(&socket, family, StateFlags::LISTEN, &[], |s| {
            if s.state == TCP_LISTEN {
                dump.listeners.push(s);
            }
        })
        .with_context(|| format!("failed to dump tcp listeners in netns {netns}"))?;
    }
    let inbound = Inbound::new(netns, &dump.listeners, extra);
    let ports = inbound.ports();
    if ports.is_empty() {
        // No listener: nothing here can be inbound.
        return Ok(dump);
    }
    let filter = local_port_filter(&ports);
    for family in inbound.families() {
        dump_tcp(&socket, family, live_states(), &filter, |s| {
            if inbound.accepts(&s) {
                dump.connections.push(s);
            }
        })
        .with_context(|| format!("failed to dump tcp sockets in netns {netns}"))?;
    }
    Ok(dump)
}

/// A sock_diag socket that sees the namespace `handle` refers to.
fn diag_socket(handle: &NetNsHandle) -> anyhow::Result<Socket> {
    let netns = handle.inode();
    handle
        .run_inside(|| Socket::new(NETLINK_SOCK_DIAG))
        .with_context(|| format!("failed to open a sock_diag socket in netns {netns}"))?
        .with_context(|| format!("failed to open a sock_diag socket in netns {netns}"))
}

/// `SOCK_DIAG_BY_FAMILY` request for a dump (linux/sock_diag.h,
/// linux/inet_diag.h): `nlmsghdr`, `inet_diag_req_v2` (all-zero socket id),
/// then `filter` as an `INET_DIAG_REQ_BYTECODE` attribute if not empty.
/// Built by hand because the netlink crate's request has no attributes.
fn dump_request(family: u8, states: StateFlags, filter: &[u8]) -> Vec<u8> {
    const NLMSG_HDR: usize = 16;
    const REQ_V2: usize = 56;
    const NLA_HDR: usize = 4;
    let attr = if filter.is_empty() {
        0
    } else {
        NLA_HDR + filter.len()
    };
    let len = NLMSG_HDR + REQ_V2 + attr;
    let mut msg = Vec::with_capacity(len);
    // Lengths are bounded by MAX_FILTER_PORTS, far below u16::MAX.
    msg.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend_from_slice(&[0; 8]); // sequence number, port id
    msg.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]); // + extensions, pad
    msg.extend_from_slice(&states.bits().to_ne_bytes());
    msg.resize(NLMSG_HDR + REQ_V2, 0); // socket id: not used by dumps
    if !filter.is_empty() {
        msg.extend_from_slice(&u16::try_from(attr).unwrap_or(u16::MAX).to_ne_bytes());
        msg.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        msg.extend_from_slice(filter);
    }
    msg
}

/// linux/inet_diag.h
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_S_EQ: u8 = 11;

/// A port filter longer than this is not built: the dump then returns
/// every socket and we filter alone.
const MAX_FILTER_PORTS: usize = 512;

/// inet_diag bytecode that accepts sockets whose local port is one of
/// `ports` (sorted, no duplicates); empty (no filter) if there are too
/// many. The kernel then skips the sockets we would throw away, such as
/// the client ends of loopback connections, before it formats them.
///
/// The kernel runs the program from the start: an op that holds jumps
/// `yes` bytes ahead, one that fails jumps `no` bytes; landing exactly on
/// the end accepts, past it rejects. Its audit requires every `yes` chain
/// to step through each op in turn, so an OR is written the way `ss`
/// writes it: `[S_EQ p0] [JMP] [S_EQ p1] [JMP] … [S_EQ pn]`, where a
/// matching `S_EQ` falls through to the next `JMP`, which always jumps to
/// the end, and a failing one jumps over that `JMP` to the next test (the
/// last one past the end).
fn local_port_filter(ports: &[u16]) -> Vec<u8> {
    const TEST: usize = 8; // S_EQ op + the op that carries the port
    const JMP: usize = 4;
    if ports.is_empty() || ports.len() > MAX_FILTER_PORTS {
        return Vec::new();
    }
    let total = ports.len() * (TEST + JMP) - JMP;
    let op = |code: u8, yes: usize, no: usize| {
        let mut b = [code, u8::try_from(yes).unwrap_or(u8::MAX), 0, 0];
        b[2..].copy_from_slice(&u16::try_from(no).unwrap_or(u16::MAX).to_ne_bytes());
        b
    };
    let mut bc = Vec::with_capacity(total);
    for (i, &port) in ports.iter().enumerate() {
        bc.extend_from_slice(&op(INET_DIAG_BC_S_EQ, TEST, TEST + JMP));
        bc.extend_from_slice(&op(0, 0, usize::from(port)));
        if i + 1 < ports.len() {
            let after = bc.len() + JMP;
            bc.extend_from_slice(&op(INET_DIAG_BC_JMP, JMP, total - after + JMP));
        }
    }
    bc
}

/// Larger than any datagram a netlink dump sends (the kernel caps dump
/// skbs at 32 KiB), so a message is never truncated.
const RECV_BUF: usize = 64 * 1024;

/// Dumps the `family` TCP sockets in `states` (and, if `filter` is not
/// empty, that this inet_diag bytecode accepts), calling `f` with each.
fn dump_tcp(
    socket: &Socket,
    family: u8,
    states: StateFlags,
    filter: &[u8],
    mut f: impl FnMut(DiagSocket),
) -> anyhow::Result<()> {
    let family_name = if family == AF_INET { "ipv4" } else { "ipv6" };
    let request = dump_request(family, states, filter);
    // The kernel replies to the sender; an unbound netlink socket gets an
    // automatic port id on send, so no bind/connect is needed.
    socket
        .send_to(&request, &NetlinkAddr::new(0, 0), 0)
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
                    f(DiagSocket::from_response(&response));
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

/// Joins one namespace's dump with the fd tables into `out`: its listeners
/// (held or not) and its live inbound connections that some process holds.
fn assemble(netns: NetNs, dump: &NetnsDump, table: &ProcTable, out: &mut Snapshot) {
    out.listeners
        .extend(dump.listeners.iter().map(|s| SnapListener {
            addr: ListenAddr {
                netns,
                local: s.local,
            },
            inode: s.inode,
            accept_queue: s.rqueue,
            holders: if s.inode == 0 {
                Vec::new()
            } else {
                table.holders_of(s.inode)
            },
        }));
    let held = dump.connections.iter().filter(|s| table.is_held(s.inode));
    out.connections.reserve(held.clone().count());
    out.connections.extend(held.map(|s| SnapConn {
        tuple: Tuple {
            netns,
            local: s.local,
            remote: s.remote,
        },
        inode: s.inode,
        state: s.state,
        holders: table.holders_of(s.inode),
    }));
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
    fn running_out_of_resources_is_told_apart_from_a_process_gone() {
        let wrapped = |e: rustix::io::Errno| {
            anyhow::Error::new(e)
                .context("failed to open fd directory")
                .context("failed to list socket fds of pid 7")
        };
        for e in [
            rustix::io::Errno::MFILE,
            rustix::io::Errno::NFILE,
            rustix::io::Errno::NOMEM,
        ] {
            assert!(is_resource_error(&wrapped(e)), "{e}");
        }
        for e in [
            rustix::io::Errno::NOENT,
            rustix::io::Errno::SRCH,
            rustix::io::Errno::ACCESS,
        ] {
            assert!(!is_resource_error(&wrapped(e)), "{e}");
        }
        let io = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EMFILE));
        assert!(is_resource_error(&io));
    }

    /// A walk's findings: (inode, pid) pairs, each pid named `p<pid>`.
    fn table(sockets: &[(u64, u32)]) -> ProcTable {
        let mut table = ProcTable {
            sockets: sockets.to_vec(),
            comms: sockets.iter().map(|&(_, p)| (p, format!("p{p}"))).collect(),
            failed: None,
        };
        table.seal();
        table
    }

    /// What `dump_netns` keeps of these sockets.
    fn dump_of(netns: NetNs, sockets: &[DiagSocket], extra: &[ListenAddr]) -> NetnsDump {
        let listeners: Vec<DiagSocket> = sockets
            .iter()
            .filter(|s| s.state == TCP_LISTEN)
            .cloned()
            .collect();
        let inbound = Inbound::new(netns, &listeners, extra);
        let connections = sockets
            .iter()
            .filter(|s| inbound.accepts(s))
            .cloned()
            .collect();
        NetnsDump {
            listeners,
            connections,
        }
    }

    #[test]
    fn assemble_keeps_held_inbound_connections_only() {
        let holder = |pid| Holder {
            pid,
            comm: format!("p{pid}"),
        };
        // Listed out of order, and 10 twice by pid 1 (two fds, one socket).
        let table = table(&[
            (11, 1),
            (10, 2),
            (10, 1),
            (12, 1),
            (13, 3),
            (14, 1),
            (10, 1),
        ]);
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
        let mut snap = Snapshot::default();
        assemble(7, &dump_of(7, &sockets, &[]), &table, &mut snap);
        let (listeners, conns) = (&snap.listeners, &snap.connections);
        assert_eq!(listeners.len(), 2);
        assert_eq!(listeners[0].holders, [holder(1), holder(2)]);
        assert_eq!(listeners[0].accept_queue, 2);
        assert!(listeners[1].holders.is_empty());
        let inodes: Vec<u64> = conns.iter().map(|c| c.inode).collect();
        assert_eq!(inodes, [11, 12]);
        assert_eq!(conns[0].holders, [holder(1)]);
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
        let mut snap = Snapshot::default();
        assemble(7, &dump_of(7, &sockets, &known), &table, &mut snap);
        let inodes: Vec<u64> = snap.connections.iter().map(|c| c.inode).collect();
        assert_eq!(inodes, [11, 12, 14]);
    }

    #[test]
    fn inbound_asks_only_for_the_families_and_ports_listened_on() {
        let v4 = [diag(TCP_LISTEN, "127.0.0.1:80", "0.0.0.0:0", 0, 1)];
        let inbound = Inbound::new(7, &v4, &[]);
        assert_eq!(inbound.families(), [AF_INET]);
        assert_eq!(inbound.ports(), [80]);
        let extra = [
            ListenAddr {
                netns: 7,
                local: "[::]:443".parse().unwrap(),
            },
            ListenAddr {
                netns: 8,
                local: "[::]:8443".parse().unwrap(),
            },
        ];
        let inbound = Inbound::new(7, &v4, &extra);
        assert_eq!(inbound.families(), [AF_INET, AF_INET6]);
        assert_eq!(inbound.ports(), [80, 443]);
        let none = Inbound::new(7, &[], &extra[1..]);
        assert!(none.families().is_empty() && none.ports().is_empty());
    }

    #[test]
    fn holders_are_runs_of_one_inode_sorted_by_pid() {
        let table = table(&[(5, 30), (5, 10), (6, 20), (5, 10), (4, 10)]);
        let pids = |inode| -> Vec<u32> { table.holders_of(inode).iter().map(|h| h.pid).collect() };
        assert_eq!(pids(5), [10, 30]);
        assert_eq!(pids(4), [10]);
        assert_eq!(pids(6), [20]);
        assert!(pids(7).is_empty() && pids(0).is_empty());
        assert!(table.is_held(6) && !table.is_held(3) && !table.is_held(7));
        assert_eq!(table.holders_of(6)[0].comm, "p20");
    }

    #[test]
    fn socket_inode_reads_socket_links_only() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        assert_eq!(socket_inode(b"socket:[0]"), Some(0));
        assert_eq!(
            socket_inode(b"socket:[18446744073709551615]"),
            Some(u64::MAX)
        );
        for not_one in [
            &b"socket:[18446744073709551616]"[..], // overflows u64
            b"socket:[]",
            b"socket:[+5]",
            b"socket:[12 ]",
            b"socket:[12",
            b"socket:12]",
            b"pipe:[12345]",
            b"anon_inode:[eventfd]",
            b"/tmp/socket:[1]",
            b"",
        ] {
            assert_eq!(
                socket_inode(not_one),
                None,
                "{:?}",
                String::from_utf8_lossy(not_one)
            );
        }
    }

    #[test]
    fn reads_own_socket_fds_and_lists_own_pid() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let inode = rustix::fs::fstat(&listener).unwrap().st_ino;
        let dir = open_dir(rustix::fs::CWD, "/proc/self").unwrap();
        let mut buf = vec![MaybeUninit::uninit(); DIRENT_BUF];
        let mut found = Vec::new();
        socket_inodes(dir.as_fd(), &mut buf, |i| found.push(i)).unwrap();
        assert!(found.contains(&inode), "{inode} not in {found:?}");

        let proc_dir = open_dir(rustix::fs::CWD, "/proc").unwrap();
        assert!(list_pids(proc_dir.as_fd()).unwrap().contains(&me()));
    }

    #[test]
    fn dump_request_without_filter_is_the_netlink_crates() {
        use netlink_packet_core::NetlinkHeader;
        use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId};
        for family in [AF_INET, AF_INET6] {
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_DUMP;
            let mut request = NetlinkMessage::new(
                header,
                SockDiagMessage::InetRequest(InetRequest {
                    family,
                    protocol: IPPROTO_TCP,
                    extensions: ExtensionFlags::empty(),
                    states: live_states(),
                    socket_id: if family == AF_INET {
                        SocketId::new_v4()
                    } else {
                        SocketId::new_v6()
                    },
                })
                .into(),
            );
            request.finalize();
            let mut want = vec![0; request.buffer_len()];
            request.serialize(&mut want);
            assert_eq!(dump_request(family, live_states(), &[]), want);
        }
        let with = dump_request(AF_INET, live_states(), &local_port_filter(&[80]));
        assert_eq!(with.len(), 72 + 4 + 8);
        assert_eq!(u32::from_ne_bytes(with[..4].try_into().unwrap()), 84);
        assert_eq!(&with[72..76], &[12, 0, 1, 0][..]);
    }

    /// One op of a bytecode: (code, yes, no).
    fn bc_op(bc: &[u8], at: usize) -> (u8, usize, usize) {
        let no = u16::from_ne_bytes([bc[at + 2], bc[at + 3]]);
        (bc[at], usize::from(bc[at + 1]), usize::from(no))
    }

    /// linux/net/ipv4/inet_diag.c, `inet_diag_bc_audit` for the ops we
    /// emit: the `yes` chain steps through every op to exactly the end, and
    /// each `no` lands on an op of that chain or exactly 4 bytes past the end.
    fn kernel_audit(bc: &[u8]) -> bool {
        let on_chain = |target: usize| {
            let mut at = 0;
            while at < target {
                match bc_op(bc, at).1 {
                    0 => return false,
                    yes => at += yes,
                }
            }
            at == target
        };
        let mut at = 0;
        while at < bc.len() {
            let (code, yes, no) = bc_op(bc, at);
            let left = bc.len() - at;
            let min = match code {
                INET_DIAG_BC_S_EQ => 8,
                INET_DIAG_BC_JMP => 4,
                _ => return false,
            };
            if left < min || no < min || no > left + 4 || no % 4 != 0 {
                return false;
            }
            if no < left && !on_chain(at + no) {
                return false;
            }
            if yes < min || yes > left + 4 || yes % 4 != 0 {
                return false;
            }
            at += yes;
        }
        at == bc.len()
    }

    /// linux/net/ipv4/inet_diag.c, `inet_diag_bc_run` for the ops we emit:
    /// accepted if the jumps end exactly at the end.
    fn kernel_run(bc: &[u8], sport: u16) -> bool {
        let mut at = 0;
        while at < bc.len() {
            let (code, yes, no) = bc_op(bc, at);
            let hit = code == INET_DIAG_BC_S_EQ && bc_op(bc, at + 4).2 == usize::from(sport);
            at += if hit { yes } else { no };
        }
        at == bc.len()
    }

    #[test]
    fn local_port_filter_passes_the_kernels_audit_and_keeps_exactly_its_ports() {
        for ports in [&[80u16][..], &[80, 443], &[22, 80, 443, 8080, 9200]] {
            let bc = local_port_filter(ports);
            assert_eq!(bc.len(), ports.len() * 12 - 4);
            assert!(kernel_audit(&bc), "{ports:?}: rejected by the audit");
            for port in [0, 21, 22, 79, 80, 81, 443, 8080, 9200, 65535] {
                assert_eq!(
                    kernel_run(&bc, port),
                    ports.contains(&port),
                    "{ports:?}, port {port}"
                );
            }
        }
        assert!(local_port_filter(&[]).is_empty());
        let many: Vec<u16> = (1..=u16::try_from(MAX_FILTER_PORTS + 1).unwrap()).collect();
        assert!(local_port_filter(&many).is_empty());
        let most = &many[..MAX_FILTER_PORTS];
        assert!(kernel_audit(&local_port_filter(most)));
    }
}
