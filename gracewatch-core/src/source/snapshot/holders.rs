//! The targeted re-check of listener holders: where the last full walk
//! found each listening socket ([`ListenerFds`]: pid, fd, inode), and the
//! cheap look that finds a process that closed its copy ([`recheck`]), or
//! where a holder learned since (by its accepts) holds it.
//!
//! No kernel event fires when a process closes one of several fds on a
//! listening socket (only the file's reference count drops; the socket
//! closes, and `inet_sock_set_state` reports it, only with the last one),
//! and a full rescan walks every fd on the host: seconds apart on a busy
//! one. So the monitor looks again, every few tens of milliseconds, at just
//! the fds the walk found on listening sockets: one `readlinkat` of
//! `/proc/<pid>/fd/<n>` each, whatever the host's fd count. (All of them,
//! not only those of listeners with several known holders: the process
//! that shares one may not be known yet, like a new generation that
//! inherited the socket and accepted nothing so far.) A holder the walk
//! did not see (a worker forked since, known by its accepts) has its table
//! read once, to learn its fds. A link that no
//! longer names `socket:[inode]` (closed, or the number reused) makes the
//! process suspect, and only then is its own fd table read in full (cost in
//! proportion to its own fds), so a copy kept on another fd is never taken
//! for a close. Anything unreadable is no evidence: the holder stays, and
//! the next rescan decides.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    mem::MaybeUninit,
    os::fd::AsFd,
    time::Duration,
};

use log::debug;
use rustix::io::Errno;

use anyhow::Context as _;
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6},
    inet::StateFlags,
};

use super::{
    procfs::{DIRENT_BUF, ProcTable, open_dir, open_netns, socket_inode, socket_inodes},
    sock_diag::{TCP_LISTEN, diag_socket, dump_tcp},
};
use crate::event::{ListenAddr, NetNs, SnapListener};

/// Fds remembered at most (~60 bytes each): beyond this many, the rest of
/// the holders wait for the rescans.
const MAX_FDS: usize = 16_384;
/// Processes whose fd table one re-check reads at most; more suspects wait
/// for the next re-check.
const MAX_READS: usize = 16;

/// One fd through which a process holds a listening socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListenerFd {
    pub pid: u32,
    pub fd: u32,
    pub inode: u64,
    pub addr: ListenAddr,
}

/// The fds through which processes hold listening sockets, from the last
/// full walk, kept up to date by the re-checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerFds {
    /// Sorted by (pid, fd).
    fds: Vec<ListenerFd>,
    /// Every listening socket of the walk, by inode.
    inodes: HashMap<u64, ListenAddr>,
    /// Holders whose table was read to find their fds since the walk
    /// (found or not, never read again until the next walk).
    probed: HashSet<u32>,
}

impl ListenerFds {
    /// Every fd of the walk on a socket of `listeners` (bounded by [`MAX_FDS`]).
    pub(super) fn of(table: &ProcTable, listeners: &[SnapListener]) -> Self {
        let mut fds = Vec::new();
        let mut inodes = HashMap::new();
        for l in listeners.iter().filter(|l| l.inode != 0) {
            inodes.insert(l.inode, l.addr);
            fds.extend(table.fds_of(l.inode).map(|(pid, fd)| ListenerFd {
                pid,
                fd,
                inode: l.inode,
                addr: l.addr,
            }));
        }
        let mut out = Self {
            fds: Vec::new(),
            inodes,
            probed: HashSet::new(),
        };
        out.set_fds(fds);
        out
    }

    fn set_fds(&mut self, mut fds: Vec<ListenerFd>) {
        fds.sort_unstable();
        fds.dedup();
        if fds.len() > MAX_FDS {
            debug!(
                "{} fds on listening sockets: re-checking {MAX_FDS}, the rest at rescans",
                fds.len()
            );
            fds.truncate(MAX_FDS);
        }
        self.fds = fds;
    }

    /// Every remembered fd, to look at.
    pub fn checks(&self) -> Vec<ListenerFd> {
        self.fds.clone()
    }

    /// Of `holders` (every process the tracker lists as holding a
    /// listener), those with no remembered fd and not read since the walk,
    /// at most [`MAX_READS`]: their tables are to be read once. Marks them
    /// read.
    pub fn take_probes(&mut self, holders: impl IntoIterator<Item = u32>) -> Vec<u32> {
        if self.probed.len() >= MAX_FDS {
            return Vec::new();
        }
        let known: HashSet<u32> = self.fds.iter().map(|f| f.pid).collect();
        let probe: Vec<u32> = holders
            .into_iter()
            .filter(|pid| !known.contains(pid) && !self.probed.contains(pid))
            .take(MAX_READS)
            .collect();
        self.probed.extend(probe.iter().copied());
        probe
    }

    /// Takes in what a re-check read: a process read in full keeps exactly
    /// the fds it still has on a remembered listening socket (a copy moved
    /// to another fd included); one whose table could not be read is
    /// dropped until the next rescan (the tracker keeps it as a holder).
    pub fn update(&mut self, outcome: &Recheck) {
        if outcome.reads.is_empty() && outcome.unreadable.is_empty() {
            return;
        }
        if self.inodes.len() > MAX_FDS {
            // Bounded: the next walk starts afresh.
            return;
        }
        self.inodes.extend(outcome.listening.iter().copied());
        let addr_of = &self.inodes;
        let redone = |pid: u32| {
            outcome.reads.iter().any(|r| r.pid == pid) || outcome.unreadable.contains(&pid)
        };
        let mut fds: Vec<ListenerFd> = self.fds.drain(..).filter(|f| !redone(f.pid)).collect();
        for read in &outcome.reads {
            fds.extend(read.sockets.iter().filter_map(|&(fd, inode)| {
                addr_of.get(&inode).map(|&addr| ListenerFd {
                    pid: read.pid,
                    fd,
                    inode,
                    addr,
                })
            }));
        }
        self.set_fds(fds);
    }
}

/// What one look at a remembered fd found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Look {
    /// It still names the socket.
    Same,
    /// It is closed, or names something else: read the table.
    Changed,
    /// It could not be read (denied, out of fds…): no evidence.
    Unknown,
}

/// Classifies one `readlinkat` of `/proc/<pid>/fd/<n>` that should name
/// the socket `inode`.
pub(super) fn classify(link: Result<&[u8], Errno>, inode: u64) -> Look {
    match link {
        Ok(target) if socket_inode(target) == Some(inode) => Look::Same,
        Ok(_) | Err(Errno::NOENT) => Look::Changed,
        Err(_) => Look::Unknown,
    }
}

/// One process's fd table, read in full from `at` on: its sockets as (fd, inode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdTableRead {
    pub pid: u32,
    pub at: Duration,
    pub sockets: Vec<(u32, u64)>,
}

impl FdTableRead {
    /// The socket inodes, as the tracker takes them.
    pub fn inodes(&self) -> Vec<u64> {
        self.sockets.iter().map(|&(_, inode)| inode).collect()
    }
}

/// What one re-check found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recheck {
    /// The suspects' fd tables.
    pub reads: Vec<FdTableRead>,
    /// The listening sockets (inode, address) of the namespaces of the
    /// holders read for the first time: a socket opened since the walk
    /// is known by its inode only from here.
    pub listening: Vec<(u64, ListenAddr)>,
    /// When the first of those dumps began.
    pub listening_at: Duration,
    /// Suspects whose table could not be read (gone, denied): no evidence.
    pub unreadable: Vec<u32>,
    /// How long it took.
    pub took: Duration,
}

/// Looks at each of `checks` once, and reads the whole fd table of each
/// process (up to [`MAX_READS`]) one of whose links changed, and of each
/// of `probe`. `now` is the clock the reads are stamped with. Blocking:
/// run off the runtime.
pub fn recheck(checks: &[ListenerFd], probe: &[u32], now: impl Fn() -> Duration) -> Recheck {
    let t0 = now();
    let mut out = Recheck::default();
    let proc_dir = match open_dir(rustix::fs::CWD, "/proc") {
        Ok(dir) => dir,
        Err(e) => {
            debug!("holder re-check: failed to open /proc: {e:#}");
            return out;
        }
    };
    let mut path = String::with_capacity(32);
    let mut link = [MaybeUninit::<u8>::uninit(); 64];
    let mut suspects: Vec<u32> = Vec::new();
    for c in checks {
        if suspects.last() == Some(&c.pid) {
            continue;
        }
        path.clear();
        let _ = write!(path, "{}/fd/{}", c.pid, c.fd);
        let read = rustix::fs::readlinkat_raw(&proc_dir, path.as_str(), &mut link)
            .map(|(target, rest)| if rest.is_empty() { &[][..] } else { &*target });
        if classify(read, c.inode) == Look::Changed {
            suspects.push(c.pid);
        }
    }
    suspects.truncate(MAX_READS);
    let first_reads: Vec<u32> = probe
        .iter()
        .filter(|p| !suspects.contains(p))
        .copied()
        .collect();
    // Their namespaces' listening sockets, once per namespace.
    let mut dumped: HashSet<NetNs> = HashSet::new();
    out.listening_at = now();
    for &pid in &first_reads {
        if let Err(e) = listening_of(proc_dir.as_fd(), pid, &mut dumped, &mut out.listening) {
            debug!("holder re-check: no listening sockets for pid {pid}: {e:#}");
        }
    }
    suspects.extend(first_reads);
    let mut buf = vec![MaybeUninit::uninit(); DIRENT_BUF];
    for pid in suspects {
        let at = now();
        let mut sockets = Vec::new();
        let read = open_dir(proc_dir.as_fd(), pid.to_string()).and_then(|dir| {
            socket_inodes(dir.as_fd(), &mut buf, |fd, inode| sockets.push((fd, inode)))
        });
        match read {
            Ok(()) => out.reads.push(FdTableRead { pid, at, sockets }),
            Err(e) => {
                debug!("holder re-check: cannot read the fds of pid {pid}: {e:#}");
                out.unreadable.push(pid);
            }
        }
    }
    out.took = now().saturating_sub(t0);
    out
}

/// Appends the listening sockets of `pid`'s network namespace to `out`,
/// unless that namespace is in `dumped` (then adds it).
fn listening_of(
    proc_dir: std::os::fd::BorrowedFd<'_>,
    pid: u32,
    dumped: &mut HashSet<NetNs>,
    out: &mut Vec<(u64, ListenAddr)>,
) -> anyhow::Result<()> {
    let dir = open_dir(proc_dir, pid.to_string()).context("failed to open its /proc entry")?;
    let handle = open_netns(dir.as_fd())?;
    let netns = handle.inode();
    if !dumped.insert(netns) {
        return Ok(());
    }
    let socket = diag_socket(&handle)?;
    for family in [AF_INET, AF_INET6] {
        dump_tcp(&socket, family, StateFlags::LISTEN, &[], |s| {
            if s.state == TCP_LISTEN && s.inode != 0 {
                out.push((
                    s.inode,
                    ListenAddr {
                        netns,
                        local: s.local,
                    },
                ));
            }
        })
        .with_context(|| format!("failed to dump tcp listeners in netns {netns}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{
        net::{Ipv4Addr, TcpListener},
        os::fd::AsRawFd,
    };

    use super::*;
    use crate::source::monotonic_now;

    fn addr(port: u16) -> ListenAddr {
        ListenAddr {
            netns: 7,
            local: (Ipv4Addr::LOCALHOST, port).into(),
        }
    }

    fn lfd(pid: u32, fd: u32, inode: u64, port: u16) -> ListenerFd {
        ListenerFd {
            pid,
            fd,
            inode,
            addr: addr(port),
        }
    }

    #[test]
    fn only_a_changed_link_is_evidence() {
        assert_eq!(classify(Ok(b"socket:[42]"), 42), Look::Same);
        assert_eq!(classify(Ok(b"socket:[43]"), 42), Look::Changed);
        assert_eq!(classify(Ok(b"/dev/null"), 42), Look::Changed);
        assert_eq!(classify(Err(Errno::NOENT), 42), Look::Changed);
        for e in [
            Errno::ACCESS,
            Errno::PERM,
            Errno::MFILE,
            Errno::NOMEM,
            Errno::SRCH,
        ] {
            assert_eq!(classify(Err(e), 42), Look::Unknown, "{e}");
        }
    }

    fn remembered(fds: Vec<ListenerFd>) -> ListenerFds {
        let mut out = ListenerFds {
            inodes: fds.iter().map(|f| (f.inode, f.addr)).collect(),
            ..ListenerFds::default()
        };
        out.set_fds(fds);
        out
    }

    #[test]
    fn holders_without_a_remembered_fd_are_probed_once() {
        let mut fds = remembered(vec![
            lfd(20, 5, 100, 80),
            lfd(10, 3, 100, 80),
            lfd(10, 3, 100, 80),
        ]);
        assert_eq!(fds.checks(), [lfd(10, 3, 100, 80), lfd(20, 5, 100, 80)]);
        assert_eq!(fds.take_probes([10, 20, 30, 40]), [30, 40]);
        assert!(fds.take_probes([10, 20, 30, 40]).is_empty(), "once");
    }

    #[test]
    fn an_update_keeps_what_each_read_table_still_holds() {
        let mut fds = remembered(vec![
            lfd(10, 3, 100, 80),
            lfd(20, 5, 100, 80),
            lfd(20, 6, 200, 443),
            lfd(30, 7, 100, 80),
        ]);
        fds.update(&Recheck {
            reads: vec![FdTableRead {
                pid: 20,
                at: Duration::ZERO,
                // Closed fd 5, moved its copy of 200 to fd 9, and holds a
                // connection socket (not remembered).
                sockets: vec![(9, 200), (11, 555)],
            }],
            unreadable: vec![30],
            ..Recheck::default()
        });
        assert_eq!(fds.fds, [lfd(10, 3, 100, 80), lfd(20, 9, 200, 443)]);
    }

    /// The real thing on our own fds: a closed copy is found, a copy kept
    /// on another fd is not taken for a close, and a process that cannot
    /// be read is unreadable, not released.
    #[test]
    fn recheck_reads_the_table_of_a_process_whose_link_changed() {
        let me = std::process::id();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let inode = rustix::fs::fstat(&listener).unwrap().st_ino;
        let copy = listener.try_clone().unwrap();
        let fd = |l: &TcpListener| u32::try_from(l.as_raw_fd()).unwrap();
        let (kept, closed) = (fd(&listener), fd(&copy));
        let port = listener.local_addr().unwrap().port();
        let check = lfd(me, kept, inode, port);

        // Unchanged: nothing to read.
        assert_eq!(recheck(&[check], &[], monotonic_now).reads, []);
        // Probed: read although unchanged, with our namespace's listeners
        // (how a socket opened since the walk gets known by inode).
        let probed = recheck(&[check], &[me], monotonic_now);
        assert_eq!(probed.reads.len(), 1);
        assert!(
            probed
                .listening
                .iter()
                .any(|&(i, a)| i == inode && a.local.port() == port),
            "{probed:?}"
        );

        // The copy closes: our table is read, and still has the socket.
        drop(copy);
        let t0 = monotonic_now();
        let out = recheck(&[lfd(me, closed, inode, port)], &[], monotonic_now);
        assert_eq!(out.reads.len(), 1, "{out:?}");
        let read = &out.reads[0];
        assert_eq!(read.pid, me);
        assert!(read.at >= t0);
        assert!(read.sockets.contains(&(kept, inode)), "{read:?}");
        assert!(!read.sockets.iter().any(|&(fd, _)| fd == closed));

        // A pid that does not exist: unreadable, no evidence.
        let gone = u32::MAX >> 1;
        let out = recheck(&[lfd(gone, 3, inode, port)], &[], monotonic_now);
        assert_eq!((out.reads, out.unreadable), (vec![], vec![gone]));
    }
}
