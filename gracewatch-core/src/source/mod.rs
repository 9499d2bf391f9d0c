//! The only code that touches the kernel: loads and attaches the eBPF
//! programs, decodes their events, and takes sock_diag + procfs snapshots.
//! Everything it hands out is plain data from [`crate::event`].

pub mod ebpf;
pub mod kernel_layout;
pub mod netns;
pub mod process;

pub use process::{Liveness, liveness};
pub mod replay;
pub mod snapshot;

use std::{fs, future::Future, time::Duration};

use crate::event::{ConnEvent, Snapshot, Tuple};

/// Takes a rescan's snapshot (see [`Source::rescanner`]).
pub type Rescanner = fn() -> anyhow::Result<(Snapshot, snapshot::holders::ListenerFds)>;

/// What the monitor runs on: the eBPF programs ([`ebpf::EbpfSource`]) or a
/// recording ([`replay::ReplaySource`]). The monitor owns everything above
/// it (tracker, exit accounts, pacing, queries) once for both; what a
/// source cannot do has a default that does nothing, so a replay only says
/// how it delivers events and what its clock reads.
pub trait Source: Send + 'static {
    /// Whether the events are a recording, the whole truth about a small
    /// input: the monitor then publishes every batch at once instead of
    /// pacing status builds, and keeps the exit accounts of every pid,
    /// watched or not, for as long as it runs.
    const RECORDING: bool = false;

    /// For a source whose [`Source::readable`] does not wake for every
    /// record: while records keep coming, the monitor also looks every
    /// `.1`, until `.0` passes without any.
    const TAIL: Option<(Duration, Duration)> = None;

    /// Resolves once events may be waiting (a wake-up with none is fine).
    /// Must be cancel-safe: the monitor races it against timers and queries.
    fn readable(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Moves every event delivered so far into `out`, without waiting.
    fn drain(&mut self, out: &mut Vec<ConnEvent>);

    /// Now, on the clock of this source's events (status ages, uptime).
    fn now(&self) -> Duration;

    /// Whether `pid` still runs. A recording's processes exit when its
    /// events say so.
    fn liveness(&self, _pid: u32) -> Liveness {
        Liveness::Alive
    }

    /// The cgroup v2 path of `pid` (`None`: nothing to tell). A recording
    /// has no procfs: its processes run nowhere known.
    fn cgroup_of(&self, _pid: u32) -> Option<String> {
        None
    }

    /// How to take a fresh snapshot for a rescan (run off the runtime),
    /// with the fds holding each listener (for the re-checks between
    /// rescans); `None` if there is nothing to rescan.
    fn rescanner(&self) -> Option<Rescanner> {
        None
    }

    /// Events the source could not deliver so far.
    fn lost_events(&self) -> u64 {
        0
    }

    /// Accepts the source could not track because its table was full, so
    /// far (`None` if it cannot tell).
    fn untracked_map_full(&self) -> Option<u64> {
        None
    }

    /// Run-time statistics of the eBPF programs (`None` without any).
    fn program_stats(&self) -> anyhow::Result<Option<ebpf::ProgramStats>> {
        Ok(None)
    }

    /// Asks to be told the end of a connection found by a snapshot.
    fn register_preexisting(&mut self, _tuple: &Tuple, _pid: u32) -> anyhow::Result<()> {
        Ok(())
    }

    /// Withdraws a registration: `true` if its end was never reported.
    fn unregister_preexisting(&mut self, _tuple: &Tuple) -> bool {
        false
    }

    /// Drops what the source keeps about a connection it reported (accepted
    /// at `since`) that a rescan found gone.
    fn forget_live(&mut self, _sk: u64, _since: Duration) {}

    /// Whether a drain waits on `pid` (its closes may be delivered sooner).
    fn set_watched(&mut self, _pid: u32, _on: bool) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Failures a caller branches on (to pick exit code 4 or 1).
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// Missing privileges or kernel support: exit code 4. The message says
    /// what is missing and how to fix it.
    #[error("cannot monitor: {0}")]
    CannotMonitor(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl MonitorError {
    /// Classifies a load/attach failure: permission errors mean missing
    /// capabilities (or lockdown), not a bug.
    fn from_load(e: anyhow::Error) -> Self {
        let denied = e.chain().any(|c| {
            let s = c.to_string();
            s.contains("Operation not permitted") || s.contains("Permission denied")
        });
        if denied {
            Self::CannotMonitor(format!(
                "{e:#} — run as root, or grant CAP_BPF and CAP_PERFMON"
            ))
        } else {
            Self::Other(e)
        }
    }
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Fails with the first missing capability named, before anything touches the kernel.
pub fn check_capabilities() -> Result<(), MonitorError> {
    let status = fs::read_to_string("/proc/self/status").map_err(|e| {
        MonitorError::Other(anyhow::anyhow!("failed to read /proc/self/status: {e}"))
    })?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    for (cap, name) in [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")] {
        if !has(cap) && !has(CAP_SYS_ADMIN) {
            return Err(MonitorError::CannotMonitor(format!(
                "missing capability {name}: run as root, or grant CAP_BPF and CAP_PERFMON (e.g. `setcap cap_bpf,cap_perfmon,cap_sys_admin,cap_sys_ptrace,cap_dac_read_search+ep gracewatch`)"
            )));
        }
    }
    Ok(())
}

/// Registers an fd owner with the tokio reactor for readability.
///
/// Only for types that own their fd (ring buffers, log maps, pidfds): that
/// is what makes the `unsafe` registration sound.
pub(crate) fn register_readable<T: std::os::fd::AsRawFd>(
    inner: T,
) -> anyhow::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: every caller passes a value that owns its fd and keeps it open
    // and unchanged for as long as the AsyncFd that owns the value lives.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::Error::new(e.into_parts().1))
}

/// CLOCK_MONOTONIC now: the clock `bpf_ktime_get_ns` and every event use.
pub fn monotonic_now() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
