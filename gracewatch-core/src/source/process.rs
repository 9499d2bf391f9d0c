//! Processes as drain targets: pidfds (so a signal can never reach a
//! recycled pid), exit notification, and the process tree under a target;
//! and what procfs says of a process (its name, its cgroup).

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    io::Read as _,
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
    /// Opens a pidfd for `pid`. Fails if the process does not exist, and
    /// also if it has already exited but its parent has not reaped it yet
    /// (a zombie holds nothing and can receive no signal that matters): both
    /// are "no such process" to a caller choosing targets.
    pub fn open(pid: u32) -> anyhow::Result<Self> {
        let raw = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .with_context(|| format!("pid {pid} is not a valid process id"))?;
        let fd = pidfd_open(raw, PidfdFlags::empty()).map_err(|e| match e {
            // EINVAL: the number names a thread, not a process.
            rustix::io::Errno::SRCH | rustix::io::Errno::INVAL => {
                anyhow::anyhow!("pid {pid} does not exist")
            }
            e => anyhow::anyhow!("failed to open pidfd for pid {pid}: {e}"),
        })?;
        let comm = comm_of(pid).unwrap_or_default();
        if pidfd_exited(&fd) {
            anyhow::bail!(
                "pid {pid} ({comm}) does not exist any more: it already exited (its parent has not reaped it yet)"
            );
        }
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

    /// Whether the process has exited (every thread of it), without
    /// waiting. A failed poll says "not known to have exited".
    pub fn has_exited(&self) -> bool {
        pidfd_exited(self.fd.get_ref())
    }

    /// Sends `signal` to exactly this process (never to a recycled pid).
    ///
    /// A process that has exited is told apart by its pidfd, never by a
    /// failed send: checked before (a zombie accepts signals it will never
    /// act on) and, when the kernel refuses, after (ESRCH is confirmed).
    pub fn signal(&self, signal: i32) -> Delivery {
        if !(1..=libc::SIGRTMAX()).contains(&signal) {
            return Delivery::Refused(rustix::io::Errno::INVAL);
        }
        // SAFETY: `signal` is a valid, non-zero signal number (checked just
        // above); it is only sent to another process, never handled,
        // blocked or consumed in ours, which is what the reserved real-time
        // numbers forbid.
        let sig = unsafe { Signal::from_raw_unchecked(signal) };
        if self.has_exited() {
            return Delivery::Exited;
        }
        match pidfd_send_signal(self.fd.get_ref(), sig) {
            Ok(()) => Delivery::Delivered,
            Err(_) if self.has_exited() => Delivery::Exited,
            Err(e) => Delivery::Refused(e),
        }
    }
}

/// What became of a signal sent through a pidfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The kernel queued it for the live process.
    Delivered,
    /// The process had exited (its pidfd said so): nobody received it.
    Exited,
    /// The kernel refused it for a process that has not exited (EPERM
    /// without CAP_KILL for another user's process, …).
    Refused(rustix::io::Errno),
}

impl Delivery {
    /// `Err` with a one-line reason for anything but delivery.
    pub fn into_result(self, pid: u32, comm: &str, signal: i32) -> anyhow::Result<()> {
        match self {
            Self::Delivered => Ok(()),
            Self::Exited => anyhow::bail!("pid {pid} ({comm}) has already exited"),
            Self::Refused(e) => anyhow::bail!(
                "the kernel refused signal {signal} for pid {pid} ({comm}): {}",
                errno_text(e)
            ),
        }
    }
}

/// `EPERM (Operation not permitted)`: the errno's name, then its meaning.
pub fn errno_text(e: rustix::io::Errno) -> String {
    let name = match e {
        rustix::io::Errno::PERM => "EPERM",
        rustix::io::Errno::SRCH => "ESRCH",
        rustix::io::Errno::INVAL => "EINVAL",
        rustix::io::Errno::ACCESS => "EACCES",
        rustix::io::Errno::MFILE => "EMFILE",
        rustix::io::Errno::NFILE => "ENFILE",
        rustix::io::Errno::NOMEM => "ENOMEM",
        rustix::io::Errno::NOENT => "ENOENT",
        _ => return format!("errno {}", e.raw_os_error()),
    };
    // rustix says "Operation not permitted (os error 1)": the name says the number.
    let text = e.to_string();
    let meaning = text.split(" (os error").next().unwrap_or(&text);
    format!("{name} ({meaning})")
}

/// Whether a pidfd polls readable: the whole thread group has exited. A
/// zombie main thread whose other threads still run is not readable (its
/// sockets are not released yet).
fn pidfd_exited(fd: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
    matches!(rustix::event::poll(&mut fds, Some(&rustix::time::Timespec::default())), Ok(n) if n > 0)
}

/// What is known about a process's life. `Unknown` is not an exit: a
/// failure to look (EMFILE, ENOMEM…) must never retire a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Exited,
    Unknown(rustix::io::Errno),
}

/// Whether the process `pid` still runs, from a pidfd: ESRCH (no such
/// process) or a readable pidfd (every thread exited) is an exit; anything
/// else that fails is `Unknown`. Nothing is read from /proc.
pub fn liveness(pid: u32) -> Liveness {
    let Some(raw) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return Liveness::Exited;
    };
    judge(pidfd_open(raw, PidfdFlags::empty()).and_then(|fd| {
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        rustix::event::poll(&mut fds, Some(&rustix::time::Timespec::default())).map(|n| n > 0)
    }))
}

/// A pidfd look (`Ok(readable)`) as liveness. ESRCH: no such process;
/// EINVAL: the number is now a thread of another process, so the process
/// it named is gone. Every other failure is a doubt, not an exit.
fn judge(look: rustix::io::Result<bool>) -> Liveness {
    match look {
        Ok(false) => Liveness::Alive,
        Ok(true) | Err(rustix::io::Errno::SRCH | rustix::io::Errno::INVAL) => Liveness::Exited,
        Err(e) => Liveness::Unknown(e),
    }
}

/// The command name of `pid` (`/proc/<pid>/comm`). Any process may set
/// bytes that are not UTF-8 (`prctl(PR_SET_NAME)`): shown lossily.
pub fn comm_of(pid: u32) -> Option<String> {
    fs::read(format!("/proc/{pid}/comm")).ok().map(|b| {
        String::from_utf8_lossy(&b)
            .trim_end_matches('\n')
            .to_owned()
    })
}

/// How much of `/proc/<pid>/cgroup` is read: the v2 line comes last, after
/// up to a dozen v1 lines on a hybrid host, each as long as a path may be.
const CGROUP_READ_MAX: u64 = 64 * 1024;

/// The cgroup v2 path of `pid` (see [`crate::cgroup::v2_path`]), `None` if
/// there is nothing to tell or it cannot be read (the process exited, no
/// permission). Whoever names the cgroups chooses the bytes: at most
/// [`CGROUP_READ_MAX`] are read (a line cut there is not used), and bytes
/// that are not UTF-8 are shown lossily.
pub fn cgroup_of(pid: u32) -> Option<String> {
    cgroup_in(fs::File::open(format!("/proc/{pid}/cgroup")).ok()?)
}

/// [`cgroup_of`] from an opened `/proc/<pid>/cgroup` (the peer walk opens
/// it relative to the process's /proc directory, so a recycled pid cannot
/// name another process's cgroup).
pub(crate) fn cgroup_in(file: fs::File) -> Option<String> {
    let mut bytes = Vec::new();
    file.take(CGROUP_READ_MAX).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    crate::cgroup::v2_path(&text).map(str::to_owned)
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

/// When `pid` started (`starttime`, field 22 of `/proc/<pid>/stat`, in
/// clock ticks since boot): with the pid, it names one process for good,
/// since a recycled pid starts later. `None` if it cannot be read.
pub fn start_time(pid: u32) -> Option<u64> {
    // After the name: state (3) … starttime (22).
    stat_after_comm(pid)?
        .split_ascii_whitespace()
        .nth(22 - 3)?
        .parse()
        .ok()
}

/// `/proc/<pid>/stat` after the command name: `state ppid …`. The name may
/// hold spaces, parentheses and bytes that are not UTF-8, hence bytes and
/// the split at the last `)`.
pub(crate) fn stat_after_comm(pid: u32) -> Option<String> {
    let stat = fs::read(format!("/proc/{pid}/stat")).ok()?;
    let end = stat.iter().rposition(|&b| b == b')')?;
    Some(String::from_utf8_lossy(stat.get(end + 1..)?).into_owned())
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

    #[test]
    fn start_time_tells_processes_apart() {
        let me = start_time(std::process::id()).expect("own start time");
        assert!(me > 0);
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn sleep");
        let other = start_time(child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(other.is_some_and(|t| t >= me), "{other:?} vs {me}");
        assert_eq!(start_time(u32::MAX), None);
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
        // A real-time signal too (its default action ends `sleep`).
        assert_eq!(pinned.signal(libc::SIGRTMIN() + 1), Delivery::Delivered);
        pinned.exited().await.expect("exit seen");
        assert!(pinned.has_exited());
        // Exited, not yet reaped: no signal is reported delivered to it,
        // and it cannot be chosen as a target.
        assert_eq!(pinned.signal(libc::SIGTERM), Delivery::Exited);
        let err = PinnedProcess::open(pid).err().map(|e| format!("{e:#}"));
        assert!(
            err.as_deref().is_some_and(|e| e.contains("already exited")),
            "{err:?}"
        );
        let _ = child.wait();
        // Reaped: the pid may now be reused, and the pidfd refuses to signal.
        assert_eq!(pinned.signal(libc::SIGTERM), Delivery::Exited);
        assert!(PinnedProcess::open(u32::MAX / 2).is_err());
    }

    #[test]
    fn cgroup_of_reads_the_v2_line_and_nothing_for_a_missing_process() {
        let own = fs::read_to_string("/proc/self/cgroup").expect("our own cgroup");
        assert_eq!(
            cgroup_of(std::process::id()).as_deref(),
            crate::cgroup::v2_path(&own)
        );
        assert_eq!(cgroup_of(u32::MAX), None);
    }

    #[test]
    fn liveness_tells_running_zombie_and_reaped_apart() {
        assert_eq!(liveness(std::process::id()), Liveness::Alive);
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        // Unreaped and single-threaded: a zombie holding nothing counts as gone.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while liveness(pid) == Liveness::Alive && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(liveness(pid), Liveness::Exited, "a zombie is not alive");
        let _ = child.wait();
        assert_eq!(liveness(pid), Liveness::Exited, "a reaped pid is not alive");
        assert_eq!(liveness(u32::MAX), Liveness::Exited, "not a pid");
    }

    /// Runs `script` in python3 with piped stdin and returns once it printed
    /// its first line (the script is set up), with that line.
    fn python_ready(script: &str) -> (std::process::Child, String) {
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        );
        (child, line)
    }

    /// A main thread that exited while another thread runs leaves a
    /// zombie leader, but the process lives on (and holds its fds).
    #[test]
    fn a_zombie_leader_with_a_live_thread_is_alive() {
        let (mut child, _) = python_ready(
            "import ctypes,sys,threading\nthreading.Thread(target=sys.stdin.read).start()\nprint('ok', flush=True)\nctypes.CDLL(None).syscall(60, 0)",
        );
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let state =
            || stat_after_comm(pid).and_then(|s| s.split_whitespace().next().map(str::to_owned));
        while state().as_deref() != Some("Z") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(state().as_deref(), Some("Z"), "the leader exited");
        assert_eq!(liveness(pid), Liveness::Alive, "its thread still runs");
        // EOF ends the reader thread: the whole process exits.
        drop(child.stdin.take());
        let _ = child.wait();
        assert_eq!(liveness(pid), Liveness::Exited);
    }

    #[test]
    fn a_failure_to_look_is_not_an_exit() {
        for e in [
            rustix::io::Errno::MFILE,
            rustix::io::Errno::NFILE,
            rustix::io::Errno::NOMEM,
            rustix::io::Errno::PERM,
        ] {
            assert_eq!(judge(Err(e)), Liveness::Unknown(e));
        }
        assert_eq!(judge(Err(rustix::io::Errno::SRCH)), Liveness::Exited);
        assert_eq!(judge(Ok(true)), Liveness::Exited);
        assert_eq!(judge(Ok(false)), Liveness::Alive);
    }

    #[tokio::test]
    async fn comm_and_parent_of_a_process_whose_name_is_not_utf8() {
        // PR_SET_NAME on a thread of ours names the thread; the process's
        // comm is its main thread's, so use a child that renames itself.
        let (mut child, line) = python_ready(
            "import ctypes,sys\nctypes.CDLL(None).prctl(15, b'\\xff\\xfe(x) y', 0, 0, 0)\nprint('ok', flush=True)\nsys.stdin.read()",
        );
        let pid = child.id();
        assert_eq!(line.trim(), "ok");
        assert_eq!(comm_of(pid).as_deref(), Some("\u{fffd}\u{fffd}(x) y"));
        assert_eq!(parent_of(pid), Some(std::process::id()));
        assert_eq!(liveness(pid), Liveness::Alive);
        let pinned = PinnedProcess::open(pid).expect("pidfd");
        assert_eq!(pinned.comm, "\u{fffd}\u{fffd}(x) y");
        drop(child.stdin.take());
        let _ = child.wait();
    }
}
