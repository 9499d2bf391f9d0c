//! Processes as drain targets: pidfds (so a signal can never reach a
//! recycled pid), exit notification, and the process tree under a target.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    os::fd::OwnedFd,
};

use anyhow::Context as _;
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
use tokio::io::unix::AsyncFd;

/// A process pinned by a pidfd at the moment it was chosen. Its pid may be
/// reused after it exits; the pidfd never refers to the new process.
pub struct PinnedProcess {
    pub pid: u32,
    pub comm: String,
    fd: AsyncFd<OwnedFd>,
}

impl PinnedProcess {
    /// Opens a pidfd for `pid`. Fails if the process does not exist.
    pub fn open(pid: u32) -> anyhow::Result<Self> {
        let raw = Pid::from_raw(pid as i32)
            .with_context(|| format!("pid {pid} is not a valid process id"))?;
        let fd = pidfd_open(raw, PidfdFlags::empty()).map_err(|e| {
            if e == rustix::io::Errno::SRCH {
                anyhow::anyhow!("pid {pid} does not exist")
            } else {
                anyhow::anyhow!("failed to open pidfd for pid {pid}: {e}")
            }
        })?;
        let comm = comm_of(pid).unwrap_or_default();
        let fd =
            super::register_readable(fd).with_context(|| format!("failed to watch pid {pid}"))?;
        Ok(Self { pid, comm, fd })
    }

    /// Resolves once the process has exited (a pidfd polls readable then).
    pub async fn exited(&self) -> anyhow::Result<()> {
        let mut guard = self
            .fd
            .readable()
            .await
            .with_context(|| format!("failed to wait for pid {}", self.pid))?;
        guard.retain_ready();
        Ok(())
    }

    /// Polls for exit (for waiting on several processes at once).
    pub fn poll_exited(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        match self.fd.poll_read_ready(cx) {
            std::task::Poll::Ready(Ok(mut guard)) => {
                guard.retain_ready();
                std::task::Poll::Ready(())
            }
            std::task::Poll::Ready(Err(_)) => std::task::Poll::Ready(()),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    /// Whether the process has exited, without waiting.
    pub fn has_exited(&self) -> bool {
        let mut fds = [rustix::event::PollFd::new(
            self.fd.get_ref(),
            rustix::event::PollFlags::IN,
        )];
        matches!(rustix::event::poll(&mut fds, Some(&rustix::time::Timespec::default())), Ok(n) if n > 0)
    }

    /// Sends `signal` to exactly this process (never to a recycled pid).
    pub fn signal(&self, signal: i32) -> anyhow::Result<()> {
        let sig = Signal::from_named_raw(signal)
            .with_context(|| format!("{signal} is not a signal number"))?;
        pidfd_send_signal(self.fd.get_ref(), sig)
            .with_context(|| format!("failed to send signal {signal} to pid {}", self.pid))
    }
}

/// The command name of `pid` (`/proc/<pid>/comm`).
pub fn comm_of(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// Every descendant of `roots` (children, grandchildren…) as they are now,
/// leaving out `exclude` and everything under it.
pub fn descendants(roots: &[u32], exclude: &[u32]) -> anyhow::Result<Vec<u32>> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in fs::read_dir("/proc").context("failed to list /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(ppid) = parent_of(pid) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    Ok(walk(&children, roots, exclude))
}

fn walk(children: &HashMap<u32, Vec<u32>>, roots: &[u32], exclude: &[u32]) -> Vec<u32> {
    let mut out = BTreeSet::new();
    let mut stack: Vec<u32> = roots.to_vec();
    while let Some(pid) = stack.pop() {
        for &child in children.get(&pid).map(Vec::as_slice).unwrap_or_default() {
            if !exclude.contains(&child) && !roots.contains(&child) && out.insert(child) {
                stack.push(child);
            }
        }
    }
    out.into_iter().collect()
}

fn parent_of(pid: u32) -> Option<u32> {
    stat_after_comm(pid)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Whether `pid` still exists. A zombie counts as gone (it holds no fds)
/// only once it is the last of its threads: a main thread that exited while
/// others still run (or are still releasing the process's sockets) leaves
/// the process alive.
pub fn process_alive(pid: u32) -> bool {
    let Some(stat) = stat_after_comm(pid) else {
        return false;
    };
    match stat.split_whitespace().next().unwrap_or("X") {
        "Z" | "X" => fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|d| d.count() > 1),
        _ => true,
    }
}

/// `/proc/<pid>/stat` after the command name: `state ppid …`. The name may
/// hold spaces and parentheses, hence the split at the last `)`.
fn stat_after_comm(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')').map(|(_, rest)| rest.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_collects_the_subtree_and_prunes_excluded_branches() {
        // 1 ─┬─ 2 ── 4
        //    └─ 3 ── 5 ── 6      (3 excluded: 5 and 6 go with it)
        let children: HashMap<u32, Vec<u32>> =
            [(1, vec![2, 3]), (2, vec![4]), (3, vec![5]), (5, vec![6])]
                .into_iter()
                .collect();
        assert_eq!(walk(&children, &[1], &[]), vec![2, 3, 4, 5, 6]);
        assert_eq!(walk(&children, &[1], &[3]), vec![2, 4]);
        assert_eq!(walk(&children, &[2], &[]), vec![4]);
        assert!(walk(&children, &[9], &[]).is_empty());
    }

    #[tokio::test]
    async fn pidfd_sees_exit_and_cannot_signal_after_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        // Until it has exec'd, the child still carries the test thread's name.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while comm_of(pid).as_deref() != Some("sleep") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let pinned = PinnedProcess::open(pid).expect("pidfd");
        assert_eq!(pinned.comm, "sleep");
        assert!(!pinned.has_exited());
        assert!(
            descendants(&[std::process::id()], &[])
                .expect("tree")
                .contains(&pid)
        );
        pinned.signal(libc::SIGKILL).expect("kill via pidfd");
        pinned.exited().await.expect("exit seen");
        assert!(pinned.has_exited());
        let _ = child.wait();
        // Reaped: the pid may now be reused, and the pidfd refuses to signal.
        assert!(pinned.signal(libc::SIGTERM).is_err());
        assert!(PinnedProcess::open(u32::MAX / 2).is_err());
    }

    #[test]
    fn process_alive_tells_running_zombie_and_reaped_apart() {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        // Unreaped and single-threaded: a zombie holding nothing counts as gone.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while process_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!process_alive(pid), "a zombie is not alive");
        let _ = child.wait();
        assert!(!process_alive(pid), "a reaped pid is not alive");
    }
}
