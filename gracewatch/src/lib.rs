//! The `gracewatch` command: its three consumers of the monitor — the CLI
//! ([`cli`]: `status`, `watch`, `drain`, `wait`), the terminal UI ([`tui`])
//! and the agent ([`agent`]: HTTP API, Prometheus metrics, and its client).
//! Everything that talks to a person or a shell lives here and only here:
//! argument parsing (clap), printing, and the exit codes, all in one table
//! ([`exit`]). The library underneath, `gracewatch-core`, has no UI; its
//! modules are re-exported so embedders need one dependency.
//!
//! Consumers talk only to the monitor's handle ([`monitor::MonitorHandle`]);
//! the kernel side (`source`) is private to the core (ARCHITECTURE.md §2).
//!
//! # Embedding
//!
//! [`monitor::Monitor::spawn`] starts a monitor, [`drain::choose`] and
//! [`drain::run`] drain through it and return a typed [`drain::Outcome`]
//! ([`exit::of`] maps it to the CLI's exit code). Through a running agent
//! (another container, another user), [`agent::AgentClient::run_drain`] does
//! the same over HTTP; [`agent::Agent`] serves that API from your own
//! process. `examples/embed.rs` is the runnable version (`cargo run
//! --example embed`; without privileges it falls back to a replay monitor).

pub use gracewatch_core::{display, drain, event, governor, input, monitor, peers, tracker};

pub mod agent;
pub mod cli;
pub mod connections;
pub mod exit;
pub mod peer_report;
pub mod tui;
