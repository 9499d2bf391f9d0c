//! The only code that touches the kernel: loads and attaches the eBPF
//! programs, decodes their events, and takes sock_diag + procfs snapshots.
