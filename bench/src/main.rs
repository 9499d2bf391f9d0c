//! `gracewatch-bench`: the program behind `cargo xtask bench` and `cargo
//! xtask demo`, which build it and hand it their arguments. It owns the
//! benchmarks against the alternatives ([`bench`]) and the demo ([`demo`]),
//! and, as hidden subcommands, the load processes and servers they start
//! (found through this binary's own path, also inside network namespaces).
//! Host glue (running programs, setup, building gracewatch) comes from the
//! `xtask` library; the fd-handover server from `gracewatch-testkit`.

mod bench;
mod demo;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

/// Benchmarks and the demo of gracewatch (run through `cargo xtask`).
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Watch a graceful restart drain in `gracewatch tui`, under load.
    ///
    /// Builds gracewatch (like `run`), then starts on 127.0.0.1:PORT a demo
    /// server that performs an fd-handover restart on SIGHUP (the new
    /// process inherits the listening socket, the old one stops accepting
    /// and serves its connections until their clients leave), and a load
    /// generator whose clients hold connections for 1 to 45 seconds. The
    /// server is restarted every --restart-every; `gracewatch tui --port
    /// PORT` runs in the foreground, and quitting it stops everything. Logs
    /// and the server's pid file are in /tmp/gracewatch-demo/.
    Demo {
        /// Port of the demo server (on 127.0.0.1).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Clients, each holding one connection at a time.
        #[arg(long, default_value_t = 40)]
        clients: u32,
        /// Restart the server this often, in seconds (0: only on demand,
        /// with `kill -HUP` or `s` in the TUI).
        #[arg(long, default_value = "30s", value_parser = parse_secs)]
        restart_every: Duration,
    },
    /// Benchmarks against the alternatives; prints them and updates BENCHMARKS.md.
    ///
    /// In this order by default: tax (ns per `getppid` / pipe `read` in a
    /// process gracewatch does not watch, with and without the agent),
    /// cost (BPF and agent CPU per connection, kernel BPF statistics on
    /// for the run), overhead (nginx under wrk, with and without
    /// `gracewatch agent`, both connection modes, 95 % intervals),
    /// reaction (last close → signal and → exit: `gracewatch drain` /
    /// `wait` vs `ss` polling), churn (a sustained connection rate across
    /// an fd-handover restart: rate vs without, lost events, exact counts),
    /// scale (100k connections: `gracewatch status` vs `ss -tanp`, agent
    /// memory). About 25 minutes in all on a 2-core VM. Needs root; builds
    /// the release binary first. Every process and namespace it starts is
    /// stopped, and `kernel.bpf_stats_enabled` is restored.
    Bench(bench::Args),
    /// A load process of `bench` (started by it).
    #[command(hide = true)]
    BenchHelper {
        #[command(subcommand)]
        helper: bench::Helper,
    },
    /// The demo's server (started by `demo`).
    #[command(hide = true)]
    DemoServer {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        pidfile: PathBuf,
        /// Adopt this listening fd (handover) instead of binding.
        #[arg(long)]
        inherit_fd: Option<i32>,
    },
    /// The demo's load generator (started by `demo`).
    #[command(hide = true)]
    DemoLoad {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        clients: u32,
    },
}

/// `30s`, `30` or `2m`.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let (num, mult) = match s.strip_suffix('m') {
        Some(n) => (n, 60),
        None => (s.strip_suffix('s').unwrap_or(s), 1),
    };
    num.parse::<u64>()
        .map(|n| Duration::from_secs(n * mult))
        .map_err(|_| format!("`{s}` is not a duration in seconds (e.g. 30s, 2m, 0)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Demo {
            port,
            clients,
            restart_every,
        } => demo::demo(&demo::Options {
            port,
            clients,
            restart_every: (!restart_every.is_zero()).then_some(restart_every),
        }),
        Task::DemoServer {
            port,
            pidfile,
            inherit_fd,
        } => demo::server(port, &pidfile, inherit_fd),
        Task::DemoLoad { port, clients } => demo::load(port, clients),
        Task::Bench(args) => bench::bench(&args),
        Task::BenchHelper { helper } => bench::helper(helper),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
