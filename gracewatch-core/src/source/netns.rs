//! Network namespace handles, and running a closure inside another network
//! namespace without moving any of our long-lived threads.
//!
//! A sock_diag dump (like `/proc/net/tcp`) only shows the network namespace
//! of the socket that asks, and a netlink socket belongs to the namespace of
//! the thread that created it. To see a container's sockets we therefore
//! create the socket on a short-lived thread that first joins the container's
//! namespace (`setns`); the thread ends right after, so the rest of the
//! process (tokio workers, the TUI, the drain gate) never changes namespace.

use std::{
    fs::File,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::Path,
    thread,
};

use anyhow::{Context, anyhow};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use crate::event::NetNs;

/// An open handle on a network namespace (an `nsfs` file such as
/// `/proc/<pid>/ns/net`). Holding it keeps the namespace alive, so it can be
/// entered even after the process it was found through has exited.
#[derive(Debug)]
pub struct NetNsHandle {
    inode: NetNs,
    file: File,
}

impl NetNsHandle {
    /// Opens the network namespace of process `pid`.
    pub fn of_pid(pid: u32) -> anyhow::Result<Self> {
        let path = format!("/proc/{pid}/ns/net");
        let file = File::open(&path)
            .with_context(|| format!("failed to open network namespace of pid {pid} ({path})"))?;
        Self::from_file(file)
            .with_context(|| format!("failed to identify network namespace of pid {pid}"))
    }

    /// Wraps an already opened nsfs file (for example one opened relative to
    /// a `/proc/<pid>` directory fd, which cannot race with pid reuse).
    pub fn from_file(file: File) -> anyhow::Result<Self> {
        let ino = file
            .metadata()
            .context("failed to stat network namespace file")?
            .ino();
        Ok(Self {
            inode: ns_inode(ino)?,
            file,
        })
    }

    /// The namespace's inode number, as in `net:[N]`.
    pub fn inode(&self) -> NetNs {
        self.inode
    }

    /// Runs `f` with the calling thread's view replaced by this namespace.
    ///
    /// If the calling thread already is in this namespace, `f` runs right
    /// here (no privileges needed). Otherwise it runs on a scoped thread that
    /// first joins the namespace, which needs `CAP_SYS_ADMIN`; the returned
    /// error then wraps the `setns` errno so callers can tell EPERM apart
    /// (see [`is_permission_denied`]).
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        if current_thread_netns()? == self.inode {
            return Ok(f());
        }
        let ns = self.file.as_fd();
        let inode = self.inode;
        thread::scope(|scope| {
            let worker = thread::Builder::new()
                .name(format!("gw-netns-{inode}"))
                .spawn_scoped(scope, move || {
                    move_into_link_name_space(ns, Some(LinkNameSpaceType::Network))?;
                    Ok::<T, rustix::io::Errno>(f())
                })
                .with_context(|| format!("failed to spawn a thread to enter netns {inode}"))?;
            match worker.join() {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(errno)) => Err(anyhow::Error::new(std::io::Error::from(errno)))
                    .with_context(|| format!("failed to enter netns {inode} (setns)")),
                Err(_) => Err(anyhow!("thread working inside netns {inode} panicked")),
            }
        })
    }
}

/// The network namespace of the calling thread (threads may differ, so this
/// reads `/proc/thread-self`, not `/proc/self`).
pub fn current_thread_netns() -> anyhow::Result<NetNs> {
    let path = Path::new("/proc/thread-self/ns/net");
    let ino = std::fs::metadata(path)
        .context("failed to stat our own network namespace (/proc/thread-self/ns/net)")?
        .ino();
    ns_inode(ino)
}

/// Whether `err` (from [`NetNsHandle::run_inside`]) failed because we lack
/// the privileges to join the namespace.
pub fn is_permission_denied(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
    })
}

/// nsfs inode numbers are allocated from a 32-bit range (`proc_inum`); the
/// rest of gracewatch (and the eBPF side, which reads `ns.inum`) uses `u32`.
fn ns_inode(ino: u64) -> anyhow::Result<NetNs> {
    NetNs::try_from(ino)
        .map_err(|_| anyhow!("network namespace inode {ino} does not fit in 32 bits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_runs_in_place() -> anyhow::Result<()> {
        let handle = NetNsHandle::of_pid(std::process::id())?;
        assert_eq!(handle.inode(), current_thread_netns()?);
        let tid = handle.run_inside(rustix::thread::gettid)?;
        assert_eq!(
            tid,
            rustix::thread::gettid(),
            "own namespace must not spawn a thread"
        );
        Ok(())
    }
}
