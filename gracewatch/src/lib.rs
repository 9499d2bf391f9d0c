//! gracewatch: count live inbound TCP connections per process and per
//! listener from the kernel (eBPF tracepoints), and gate graceful restarts on
//! the true drain.
//!
//! Data flows one way (ARCHITECTURE.md §2): [`source`] (the only module that
//! touches aya, netlink and procfs) produces [`event::ConnEvent`]s and
//! [`event::Snapshot`]s; [`tracker::Tracker`] folds them into a
//! [`tracker::Status`]; the consumers ([`cli`], [`agent`]) only read `Status`.
//!
//! # Embedding
//!
//! The CLI is a thin layer over this library; a deploy tool, an operator or
//! a server that wants to drain itself can use the same API:
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
//!    connection, signals them and returns a [`drain::DrainReport`] whose
//!    `exit_code` is the CLI's. Through a running agent (another container,
//!    another user), [`agent::AgentClient::run_drain`] does the same over
//!    HTTP; [`agent::Agent`] serves that API from your own process.
//!
//! ```no_run
//! use std::time::Duration;
//! use gracewatch::{
//!     drain::{self, DrainSpec, TargetSpec},
//!     monitor::{Monitor, SourceOptions},
//! };
//!
//! # async fn example(old_pid: u32) -> anyhow::Result<()> {
//! let handle = Monitor::spawn(SourceOptions::default())?;
//! println!("{} processes hold listeners", handle.status().processes.len());
//!
//! let mut updates = handle.subscribe();
//! tokio::spawn(async move {
//!     while updates.changed().await.is_ok() {
//!         let live: u64 = updates.borrow_and_update().processes.iter().map(|p| p.live).sum();
//!         println!("{live} live connections");
//!     }
//! });
//!
//! let targets = drain::choose(&TargetSpec { pids: vec![old_pid], ..TargetSpec::default() })?;
//! let spec = DrainSpec { timeout: Some(Duration::from_secs(120)), ..DrainSpec::default() };
//! let cancel = async { let _ = tokio::signal::ctrl_c().await; };
//! let report = drain::run(&handle, targets, &spec, |p| eprintln!("{}", p.message), cancel).await;
//! std::process::exit(i32::from(report.exit_code));
//! # }
//! ```
//!
//! `examples/embed.rs` is the runnable version (`cargo run --example embed`;
//! without privileges it falls back to a replay monitor), including a drain
//! through an in-process [`agent::Agent`].

pub mod agent;
pub mod cli;
pub mod display;
pub mod drain;
pub mod event;
pub mod input;
pub mod monitor;
pub mod source;
pub mod tracker;
pub mod tui;
