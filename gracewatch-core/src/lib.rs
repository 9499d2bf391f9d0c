//! gracewatch's library: count live inbound TCP connections per process and
//! per listener from the kernel (eBPF tracepoints), and gate graceful
//! restarts on the true drain. No UI here: no argument parsing, no printing,
//! no exit codes (those live in the `gracewatch` binary crate); outcomes are
//! typed.
//!
//! Data flows one way (ARCHITECTURE.md §2): `source` (private: the only
//! module that touches aya, netlink and procfs) produces
//! [`event::ConnEvent`]s and [`event::Snapshot`]s; [`tracker::Tracker`]
//! (from the pure `gracewatch-model` crate) folds them into a
//! [`tracker::Status`]; [`monitor`] runs both and hands consumers a
//! [`monitor::MonitorHandle`], the only door they use; [`drain`] is the gate
//! built on that handle.
//!
//! # Embedding
//!
//! 1. **start a monitor**: [`monitor::Monitor::spawn`] loads and attaches the
//!    eBPF programs, merges the startup snapshot, and returns a cheap,
//!    cloneable [`monitor::MonitorHandle`] (it needs root or `CAP_BPF` +
//!    `CAP_PERFMON`; it fails with [`monitor::MonitorError::CannotMonitor`]
//!    otherwise). [`monitor::MonitorHandle::from_replay`] gives the same
//!    handle over recorded events, without a kernel, for tests and demos;
//! 2. **subscribe to status updates**: [`monitor::MonitorHandle::subscribe`]
//!    is a `tokio::sync::watch` receiver that wakes after every batch of
//!    kernel events ([`monitor::MonitorHandle::events`] has the events
//!    themselves);
//! 3. **request a drain and await its outcome**: [`drain::choose`] pins the
//!    targets by pidfd, [`drain::run`] waits until they hold no live
//!    connection, signals them and returns a [`drain::DrainReport`] with a
//!    typed [`drain::Outcome`].
//!
//! ```no_run
//! use std::time::Duration;
//! use gracewatch_core::{
//!     drain::{self, DrainSpec, Outcome, TargetSpec},
//!     monitor::{Monitor, SourceOptions},
//! };
//!
//! # async fn example(old_pid: u32) -> anyhow::Result<()> {
//! let handle = Monitor::spawn(SourceOptions::default())?;
//! let mut updates = handle.subscribe();
//! tokio::spawn(async move {
//!     while updates.changed().await.is_ok() {
//!         let live: u64 = updates.borrow_and_update().processes.iter().map(|p| p.live).sum();
//!         log::info!("{live} live connections");
//!     }
//! });
//!
//! let targets = drain::choose(&TargetSpec { pids: vec![old_pid], ..TargetSpec::default() })?;
//! let spec = DrainSpec { timeout: Some(Duration::from_secs(120)), ..DrainSpec::default() };
//! let cancel = async { let _ = tokio::signal::ctrl_c().await; };
//! let report = drain::run(&handle, targets, &spec, |p| log::info!("{}", p.message), cancel).await;
//! anyhow::ensure!(report.outcome == Outcome::Drained, "{}", report.message);
//! # Ok(())
//! # }
//! ```
//!
//! The `gracewatch` crate's `examples/embed.rs` is a runnable version,
//! including a drain through an in-process agent.

pub use gracewatch_model::{cgroup, event, governor, peers, tracker};

pub mod display;
pub mod drain;
pub mod input;
pub mod monitor;
mod source;
