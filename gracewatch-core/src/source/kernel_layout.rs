//! Resolves the running kernel's layout into a [`Config`] for the programs:
//! struct-member offsets from BTF (`/sys/kernel/btf/vmlinux`).
//!
//! aya has no CO-RE for Rust programs, so nothing about the kernel's layout
//! may be compiled in: a kernel with a different `struct file` must still
//! work, and one without what we need must be refused with a clear reason.

use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use btf_rs::{Backend, Btf, Type};
use gracewatch_common::Config;

use super::MonitorError;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The raw tracepoints the programs attach to, each program named after
/// its tracepoint: the state changes (the event `sock:inet_sock_set_state`,
/// without its trace record), the first send/receive that claims a
/// connection (`sock:sock_recv_length`, `sock:sock_send_length`) and the
/// backstop `tcp:tcp_destroy_sock`. Raw tracepoints only, never a
/// `syscalls:*` one: while any of those is attached, every syscall of every
/// task on the host takes the slow path, and detaching one takes 60–80 ms.
pub const RAW_TRACEPOINTS: [&str; 4] = [
    "inet_sock_set_state",
    "sock_recv_length",
    "sock_send_length",
    "tcp_destroy_sock",
];

/// Builds the programs' `CONFIG` for this kernel.
pub fn resolve() -> Result<Config, MonitorError> {
    if !Path::new(VMLINUX_BTF).exists() {
        return Err(MonitorError::CannotMonitor(format!(
            "kernel BTF not found at {VMLINUX_BTF}: gracewatch needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
        )));
    }
    // Mapped, the few lookups below take milliseconds; parsed into the heap
    // (the fallback, for kernels whose sysfs cannot map it) the whole of
    // vmlinux's BTF costs ~150 ms and ~40 MB at every start.
    let btf = Btf::from_file_with_backend(VMLINUX_BTF, Backend::Mmap)
        .or_else(|e| {
            log::debug!("cannot map kernel BTF {VMLINUX_BTF} ({e}): reading it instead");
            Btf::from_file(VMLINUX_BTF)
        })
        .map_err(|e| {
            MonitorError::CannotMonitor(format!("cannot read kernel BTF {VMLINUX_BTF}: {e}"))
        })?;
    let mut cfg = struct_offsets(&btf).map_err(|e| {
        MonitorError::CannotMonitor(format!(
            "kernel BTF lacks a structure gracewatch needs: {e:#}"
        ))
    })?;

    // Report pids as our own pid namespace sees them (what /proc shows us).
    let pidns = rustix::fs::stat("/proc/self/ns/pid")
        .map_err(|e| MonitorError::CannotMonitor(format!("cannot stat /proc/self/ns/pid: {e}")))?;
    cfg.pidns_dev = pidns.st_dev;
    cfg.pidns_ino = pidns.st_ino;
    Ok(cfg)
}

fn struct_offsets(btf: &Btf) -> anyhow::Result<Config> {
    let off = |s: &str, path: &str| member_offset(btf, s, path);
    let sk_common = off("sock", "__sk_common")?;
    let skc = |m: &str| -> anyhow::Result<u32> { Ok(sk_common + off("sock_common", m)?) };
    Ok(Config {
        skc_family: skc("skc_family")?,
        skc_state: skc("skc_state")?,
        inet_sport: off("inet_sock", "inet_sport")?,
        skc_dport: skc("skc_dport")?,
        skc_v6_daddr: skc("skc_v6_daddr")?,
        skc_v6_rcv_saddr: skc("skc_v6_rcv_saddr")?,
        skc_daddr: skc("skc_daddr")?,
        skc_rcv_saddr: skc("skc_rcv_saddr")?,
        skc_net: skc("skc_net")?,
        sk_protocol: off("sock", "sk_protocol")?,
        sk_socket: off("sock", "sk_socket")?,
        task_flags: off("task_struct", "flags")?,
        net_ns_inum: off("net", "ns")? + off("ns_common", "inum")?,
        ..Config::default()
    })
}

/// Byte offset of `member` in `struct name`, looking through anonymous
/// structs and unions (where `sock_common` keeps most of its fields).
pub fn member_offset(btf: &Btf, name: &str, member: &str) -> anyhow::Result<u32> {
    let types = btf
        .resolve_types_by_name(name)
        .with_context(|| format!("struct `{name}` not found"))?;
    let strukt = types
        .iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or_else(|| anyhow!("struct `{name}` not found"))?;
    find_member(btf, strukt, member)?
        .ok_or_else(|| anyhow!("struct `{name}` has no member `{member}`"))
}

fn find_member(btf: &Btf, strukt: &btf_rs::Struct, member: &str) -> anyhow::Result<Option<u32>> {
    for m in &strukt.members {
        let mname = btf.resolve_name(m).unwrap_or_default();
        if mname == member {
            if m.bitfield_size().is_some_and(|s| s != 0) || m.bit_offset() % 8 != 0 {
                bail!("member `{member}` is a bitfield");
            }
            return Ok(Some(m.bit_offset() / 8));
        }
        if mname.is_empty() {
            let mut ty = btf.resolve_chained_type(m)?;
            while let Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) = ty {
                let Some(inner) = ty.as_btf_type() else { break };
                ty = btf.resolve_chained_type(inner)?;
            }
            if let Type::Struct(inner) | Type::Union(inner) = &ty {
                if let Some(o) = find_member(btf, inner, member)? {
                    return Ok(Some(m.bit_offset() / 8 + o));
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs against this machine's kernel: every offset must resolve and the
    /// ones with a fixed ABI position must be where the ABI says.
    #[test]
    fn resolves_offsets_from_running_kernel_btf() {
        if !Path::new(VMLINUX_BTF).exists() {
            assert!(
                std::env::var("CI").is_err(),
                "CI machines must have kernel BTF"
            );
            return;
        }
        let btf = Btf::from_file(VMLINUX_BTF).expect("read vmlinux BTF");
        let cfg = struct_offsets(&btf).expect("resolve offsets");
        // `struct sock` starts with `__sk_common`, whose address pair and
        // port pair open it on every kernel since 2.6.
        assert_eq!(cfg.skc_daddr, 0);
        assert_eq!(cfg.skc_rcv_saddr, 4);
        assert_eq!(cfg.skc_dport, 12);
        assert!(cfg.inet_sport > cfg.sk_protocol);
        assert!(cfg.task_flags > 0 && cfg.skc_net > 0 && cfg.net_ns_inum > 0);
        assert!(cfg.sk_socket > cfg.skc_net && cfg.sk_protocol > cfg.skc_net);
        assert!(member_offset(&btf, "sock_common", "no_such_member").is_err());
    }
}
