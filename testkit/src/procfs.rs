//! What tests and benchmarks read about a process from `/proc`, parsed in
//! one place: [`stat`] (`/proc/PID/stat`: state, parent, flags, CPU time,
//! start time) and [`status_kb`] (`/proc/PID/status` sizes such as `VmRSS`),
//! and which sockets a process's fd table holds ([`holds_socket`],
//! [`listening_inode`]).

use std::time::Duration;

/// `PF_KTHREAD` in [`Stat::flags`]: the process is a kernel thread.
pub const PF_KTHREAD: u64 = 0x0020_0000;

/// The fields of `/proc/PID/stat` that tests and benchmarks look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `D`, `T` (stopped), `t`, `Z` (zombie), `X`, …
    pub state: char,
    pub ppid: u32,
    /// `PF_*` flags (see [`PF_KTHREAD`]).
    pub flags: u64,
    /// User and system CPU time, in clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// Start time after boot, in clock ticks: with the pid, names one
    /// process even after its pid is reused.
    pub starttime: u64,
}

impl Stat {
    /// Parses the text of `/proc/PID/stat`. The command name in parentheses
    /// may hold spaces and parentheses itself, so the fields are counted
    /// from the last `)`.
    pub fn parse(raw: &[u8]) -> Option<Stat> {
        let close = raw.iter().rposition(|&b| b == b')')?;
        let rest = std::str::from_utf8(raw.get(close + 1..)?).ok()?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| fields.get(i)?.parse::<u64>().ok();
        Some(Stat {
            state: fields.first()?.chars().next()?,
            ppid: u32::try_from(num(1)?).ok()?,
            flags: num(6)?,
            utime: num(11)?,
            stime: num(12)?,
            starttime: num(19)?,
        })
    }

    /// Whether the process has exited (a zombie not yet reaped, or dead).
    pub fn exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }

    /// Whether the process is a kernel thread.
    pub fn kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }

    /// User plus system CPU time.
    pub fn cpu_time(&self) -> Duration {
        // SAFETY: sysconf has no memory effects.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
            .ok()
            .filter(|&hz| hz > 0)
            .unwrap_or(100);
        Duration::from_micros((self.utime + self.stime) * 1_000_000 / hz)
    }
}

/// `/proc/PID/stat` of `pid`; `None` if the process is gone (or unreadable).
pub fn stat(pid: u32) -> Option<Stat> {
    Stat::parse(&std::fs::read(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether `pid` is gone or a zombie (it exited; its parent has not reaped it).
pub fn exited(pid: u32) -> bool {
    stat(pid).is_none_or(|s| s.exited())
}

/// A size field of `/proc/PID/status` in kB (`"VmRSS"`, `"VmHWM"`, …).
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// A size from `/proc/PID/status` (`VmHWM`, `VmRSS`) in MiB, or an error
/// naming what could not be read: a benchmark must not report a size it did
/// not measure.
pub fn status_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    use anyhow::Context as _;
    let kb = status_kb(pid, field)
        .with_context(|| format!("failed to read {field} of pid {pid} from /proc/{pid}/status"))?;
    Ok(kb as f64 / 1024.0)
}

/// Whether `pid` has an fd on the socket with inode `inode` (`None`: its
/// fd table cannot be read).
pub fn holds_socket(pid: u32, inode: u64) -> Option<bool> {
    let want = format!("socket:[{inode}]");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str())),
    )
}

/// The inode of a socket listening on `address` (IPv4) that `pid` holds
/// (from its namespace's `/proc/PID/net/tcp` and its own fd table).
#[track_caller]
pub fn listening_inode(pid: u32, address: &str) -> u64 {
    let port = address.rsplit(':').next().unwrap_or("");
    let port = format!(":{:04X}", port.parse::<u16>().expect("a port"));
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).expect("/proc/PID/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let listening = f.get(3) == Some(&"0A") && f.get(1)?.ends_with(&port);
            listening.then(|| f.get(9)?.parse().ok()).flatten()
        })
        .find(|inode| holds_socket(pid, *inode) == Some(true))
        .unwrap_or_else(|| panic!("{pid} holds no socket listening on {address}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_name_with_spaces_and_parentheses() {
        let raw = b"42 (a) b (c) S 7 42 42 0 -1 4194560 1 2 3 4 11 22 0 0 20 0 1 0 12345 0 0";
        let s = Stat::parse(raw).expect("parses");
        assert_eq!(
            s,
            Stat {
                state: 'S',
                ppid: 7,
                flags: 4_194_560,
                utime: 11,
                stime: 22,
                starttime: 12345,
            }
        );
        assert!(!s.exited() && !s.kernel_thread());
    }

    #[test]
    fn reads_this_process() {
        let me = stat(std::process::id()).expect("our own stat");
        // The main thread waits for this test's thread: sleeping or running.
        assert!(matches!(me.state, 'R' | 'S'), "{me:?}");
        assert_eq!(
            Some(me.ppid),
            rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32)
        );
        assert!(!exited(std::process::id()));
        assert!(status_kb(std::process::id(), "VmRSS").is_some_and(|kb| kb > 0));
    }
}
