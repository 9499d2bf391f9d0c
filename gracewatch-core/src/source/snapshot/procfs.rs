//! The procfs side of a snapshot: the pids in /proc, each process's socket
//! fds (`/proc/<pid>/fd` links `socket:[inode]`), its command name and its
//! network namespace, and the table from socket inode to the processes that
//! hold it ([`ProcTable`]). Everything about one process is read relative
//! to its `/proc/<pid>` directory fd, so a recycled pid cannot mix two
//! processes' views.

use std::{
    collections::HashMap,
    fs::File,
    mem::MaybeUninit,
    os::fd::{BorrowedFd, OwnedFd},
};

use anyhow::{Context, anyhow};
use rustix::fs::{AtFlags, Mode, OFlags, RawDir};

use crate::{
    event::{Holder, NetNs},
    source::netns::NetNsHandle,
};

/// Directory-listing buffer of each walker: a 20k-fd table takes ~20 reads.
pub(super) const DIRENT_BUF: usize = 32 * 1024;

/// What the /proc walk found.
#[derive(Debug, Default)]
pub(super) struct ProcTable {
    /// (socket inode, pid, fd) for every socket fd, sorted once the walk
    /// is done ([`ProcTable::seal`]): a socket's holders are one run of
    /// equal inodes, sorted by pid (a pid with several fds on it appears
    /// once per fd). 16 bytes per fd (the fd fills what was padding), where
    /// a map from inode to a list of holders would cost several
    /// allocations. The fd is where the targeted re-check looks again
    /// ([`super::holders`]).
    pub(super) sockets: Vec<(u64, u32, u32)>,
    /// Command name of each pid in `sockets`.
    pub(super) comms: HashMap<u32, String>,
    /// Why the walk stopped early (out of fds or memory), if it did: the
    /// table is then partial and must not be taken for the host's state.
    pub(super) failed: Option<String>,
}

impl ProcTable {
    pub(super) fn seal(&mut self) {
        self.sockets.sort_unstable();
        self.sockets.dedup();
    }

    /// The (pid, fd) pairs through which `inode` is held, by pid then fd.
    pub(super) fn fds_of(&self, inode: u64) -> impl Iterator<Item = (u32, u32)> + '_ {
        let start = self.sockets.partition_point(|&(i, _, _)| i < inode);
        self.sockets[start..]
            .iter()
            .take_while(move |&&(i, _, _)| i == inode)
            .map(|&(_, pid, fd)| (pid, fd))
    }

    /// Every process holding the socket `inode`, sorted by pid.
    pub(super) fn holders_of(&self, inode: u64) -> Vec<Holder> {
        let mut pids: Vec<u32> = self.fds_of(inode).map(|(pid, _)| pid).collect();
        pids.dedup();
        // Exactly sized: one per connection.
        let mut holders = Vec::with_capacity(pids.len());
        holders.extend(pids.into_iter().map(|pid| Holder {
            pid,
            comm: self.comms.get(&pid).cloned().unwrap_or_default(),
        }));
        holders
    }

    /// Whether any process holds the socket `inode`.
    pub(super) fn is_held(&self, inode: u64) -> bool {
        self.fds_of(inode).next().is_some()
    }
}

/// The pids in /proc, most open fds first. Reading the directory lists
/// thread-group leaders only: threads live under /proc/<pid>/task, so
/// every entry is a process.
///
/// The walkers take processes in this order, so that none is left alone
/// with a 20k-fd process at the end while the others idle. Linux 6.2+ gives
/// a `/proc/<pid>/fd` directory's size as its number of fds; older kernels
/// say 0, which keeps /proc's order.
pub(super) fn list_pids(proc_dir: BorrowedFd<'_>) -> anyhow::Result<Vec<u32>> {
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

pub(super) fn open_dir<P: rustix::path::Arg>(
    at: BorrowedFd<'_>,
    path: P,
) -> anyhow::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        at,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opened relative to the process's /proc directory fd, so a recycled pid
/// cannot hand us another process's namespace.
pub(super) fn open_netns(dir: BorrowedFd<'_>) -> anyhow::Result<NetNsHandle> {
    let fd = rustix::fs::openat(
        dir,
        "ns/net",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .context("failed to open ns/net")?;
    NetNsHandle::from_file(File::from(fd))
}

/// Calls `f` with the fd number and inode of each socket among the fds of
/// the process whose /proc directory is `dir`: one `readlinkat` per fd.
pub(super) fn socket_inodes(
    dir: BorrowedFd<'_>,
    buf: &mut [MaybeUninit<u8>],
    mut f: impl FnMut(u32, u64),
) -> anyhow::Result<()> {
    let fds = open_dir(dir, "fd").context("failed to open fd directory")?;
    let mut entries = RawDir::new(&fds, buf);
    // `socket:[` + 20 digits + `]` fits; anything longer is no socket.
    let mut link = [MaybeUninit::<u8>::uninit(); 64];
    while let Some(entry) = entries.next() {
        let entry = entry.context("failed to read fd directory")?;
        let name = entry.file_name();
        let Some(fd) = parse_decimal(name.to_bytes()).and_then(|n| u32::try_from(n).ok()) else {
            continue;
        };
        // An fd closed while we read the table is simply not there.
        if let Ok((target, rest)) = rustix::fs::readlinkat_raw(&fds, name, &mut link) {
            if !rest.is_empty() {
                if let Some(inode) = socket_inode(target) {
                    f(fd, inode);
                }
            }
        }
    }
    Ok(())
}

/// The inode in an fd link `socket:[12345]`; `None` for anything else
/// (files, pipes, anonymous inodes, other sockets' pseudo-files).
pub(super) fn socket_inode(link: &[u8]) -> Option<u64> {
    parse_decimal(link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?)
}

/// Plain ASCII digits only (`str::parse` would also take a leading `+`).
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

pub(super) fn read_comm(dir: BorrowedFd<'_>) -> anyhow::Result<String> {
    let file = rustix::fs::openat(dir, "comm", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .context("failed to open comm")?;
    let mut buf = [0u8; 128];
    let n = rustix::io::read(&file, &mut buf).context("failed to read comm")?;
    let comm = buf.get(..n).unwrap_or_default();
    Ok(String::from_utf8_lossy(comm)
        .trim_end_matches('\n')
        .to_owned())
}

/// nsfs inode numbers are 32-bit (see [`crate::source::netns`]).
pub(super) fn ns_inode(ino: u64) -> anyhow::Result<NetNs> {
    NetNs::try_from(ino)
        .map_err(|_| anyhow!("network namespace inode {ino} does not fit in 32 bits"))
}

/// A walk's findings: (inode, pid) pairs, each pid named `p<pid>`, each
/// pair through an fd of its own (numbered by its place in the list).
#[cfg(test)]
pub(super) fn table_of(sockets: &[(u64, u32)]) -> ProcTable {
    let mut table = ProcTable {
        sockets: sockets
            .iter()
            .zip(3u32..)
            .map(|(&(inode, pid), fd)| (inode, pid, fd))
            .collect(),
        comms: sockets.iter().map(|&(_, p)| (p, format!("p{p}"))).collect(),
        failed: None,
    };
    table.seal();
    table
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{
        net::{Ipv4Addr, TcpListener},
        os::fd::AsFd,
    };

    use super::*;

    #[test]
    fn holders_are_runs_of_one_inode_sorted_by_pid() {
        let table = table_of(&[(5, 30), (5, 10), (6, 20), (5, 10), (4, 10)]);
        let pids = |inode| -> Vec<u32> { table.holders_of(inode).iter().map(|h| h.pid).collect() };
        assert_eq!(pids(5), [10, 30]);
        assert_eq!(pids(4), [10]);
        assert_eq!(pids(6), [20]);
        assert!(pids(7).is_empty() && pids(0).is_empty());
        assert!(table.is_held(6) && !table.is_held(3) && !table.is_held(7));
        assert_eq!(table.holders_of(6)[0].comm, "p20");
        // Pid 10 holds 5 through two fds (the 2nd and 4th listed).
        assert_eq!(
            table.fds_of(5).collect::<Vec<_>>(),
            [(10, 4), (10, 6), (30, 3)]
        );
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
        socket_inodes(dir.as_fd(), &mut buf, |fd, i| found.push((fd, i))).unwrap();
        let fd = u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&listener)).unwrap();
        assert!(
            found.contains(&(fd, inode)),
            "{fd}, {inode} not in {found:?}"
        );

        let proc_dir = open_dir(rustix::fs::CWD, "/proc").unwrap();
        assert!(
            list_pids(proc_dir.as_fd())
                .unwrap()
                .contains(&std::process::id())
        );
    }
}
