//! The threaded scan behind a full snapshot: /proc walkers on up to
//! [`MAX_WALKERS`] cores take processes one at a time, and one more thread
//! dumps each network namespace over sock_diag as soon as a walker first
//! meets it. A walk that runs out of fds or memory fails the whole scan
//! rather than hand over a partial table.

use std::{
    collections::HashSet,
    mem::MaybeUninit,
    os::fd::{AsFd, BorrowedFd},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
};

use anyhow::{Context, anyhow};
use log::debug;
use rustix::fs::AtFlags;

use super::{
    join::{NetnsDump, dump_netns},
    procfs::{DIRENT_BUF, ProcTable, ns_inode, open_dir, open_netns, read_comm, socket_inodes},
};
use crate::{event::NetNs, source::netns::NetNsHandle};

/// The walk is kernel work per fd; on a big host more threads than this
/// would mostly take CPU from the servers being watched.
const MAX_WALKERS: usize = 4;

/// One namespace's dump: its listeners and its live inbound connections.
type Dumped = (NetNs, anyhow::Result<NetnsDump>);

/// Walks the /proc entries of `pids` on every core while one more thread
/// dumps each network namespace as soon as the walk first meets it (the
/// walk and the dumps are independent: both are newer than the snapshot's
/// `at`, which is all the merge relies on).
pub(super) fn scan(
    proc_dir: BorrowedFd<'_>,
    pids: &[u32],
) -> anyhow::Result<(ProcTable, Vec<Dumped>)> {
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
    sockets: &mut Vec<(u64, u32, u32)>,
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
    socket_inodes(dir.as_fd(), buf, |fd, inode| sockets.push((inode, pid, fd)))?;
    if sockets.len() == before {
        return Ok(None);
    }
    read_comm(dir.as_fd()).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
