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

use std::{fs, time::Duration};

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
