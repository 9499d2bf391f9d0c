//! gracewatch: count live inbound TCP connections per process and per
//! listener from the kernel (eBPF tracepoints), and gate graceful restarts on
//! the true drain.
//!
//! Data flows one way (DESIGN.md §2): [`source`] (the only module that
//! touches aya, netlink and procfs) produces [`event::ConnEvent`]s and
//! [`event::Snapshot`]s; [`tracker::Tracker`] folds them into a
//! [`tracker::Status`]; the consumers ([`cli`]) only read `Status`.

pub mod cli;
pub mod drain;
pub mod event;
pub mod monitor;
pub mod source;
pub mod tracker;
