//! `cargo xtask`: the project's task runner. It owns everything around the
//! cargo build that cargo cannot express on its own: installing the eBPF
//! toolchain (nightly + `rust-src`, `bpf-linker` and the LLVM it links
//! against), running the binary with the privileges it needs, and the CI
//! pipeline with its privileged end-to-end tests and leak checks.
//! `.ci/run` is a thin wrapper around `cargo xtask ci`.

mod bench;
mod cmd;
mod demo;
mod run;
mod setup;
mod test;

use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Duration, time::Instant};

use clap::{Parser, Subcommand};

/// Tasks for developing gracewatch: toolchain setup, running, testing, CI.
#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    long_about = "Tasks for developing gracewatch: toolchain setup, running, testing, CI.\n\n\
        gracewatch embeds eBPF programs (the `gracewatch-ebpf` crate) that its build script \
        compiles with a nightly toolchain and `bpf-linker` during the normal cargo build, so a \
        plain `cargo build` only works once `cargo xtask setup` has installed those. Loading the \
        programs needs root (or CAP_BPF + CAP_PERFMON); `cargo xtask run` takes care of that.",
    after_help = "Typical use:\n  \
        cargo xtask setup                 install the eBPF toolchain (idempotent; quick once done)\n  \
        cargo xtask run                   build in release mode, start `gracewatch tui` as root\n  \
        cargo xtask run -- drain --help   pass other arguments to gracewatch\n  \
        cargo xtask demo                  a demo server restarting under load, watched in the TUI\n  \
        cargo xtask test                  fmt, clippy (host + eBPF), unit tests, privileged e2e\n  \
        cargo xtask ci                    what `.ci/run` runs (`test`, with timings)\n  \
        cargo xtask bench                 benchmarks vs the alternatives, into BENCHMARKS.md\n\n\
        Run `cargo xtask <TASK> --help` for the details of each task."
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs, each item only when missing.
    ///
    /// Checks, in order, and prints one line per item (`ok: …` or
    /// `installing: …`): the nightly toolchain with `rust-src` (the eBPF
    /// crate is built with `-Z build-std=core`); the Debian packages
    /// `bpf-linker` links against (llvm-22-dev, libpolly-22-dev, libzstd-dev,
    /// zlib1g-dev); `bpf-linker` itself (`cargo install`, about a minute);
    /// with `--test-deps`, the tools the tests use (clippy/rustfmt, iproute2,
    /// tmux, python3, nginx-light, libcap2-bin, bpftool); and tracefs mounted
    /// at /sys/kernel/tracing. Installing Debian packages or mounting tracefs
    /// needs root.
    Setup {
        /// Also install what `cargo xtask test` needs.
        #[arg(long)]
        test_deps: bool,
    },
    /// Build gracewatch in release mode and run it with the privileges it needs.
    ///
    /// Runs `setup` first, then `cargo build --release -p gracewatch`, then
    /// replaces itself with `target/release/gracewatch ARGS…` (default: `tui`).
    /// When not root, the binary is started through `sudo -E`. The exit code
    /// is gracewatch's own.
    Run {
        /// Arguments for gracewatch; put them after `--`, e.g.
        /// `cargo xtask run -- drain --pid 42`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Run every check, stopping at the first failure.
    ///
    /// Steps: setup (with test dependencies), `cargo fmt --check`, clippy on
    /// the host crates, clippy on the eBPF crate (nightly, bpfel target),
    /// unit and unprivileged tests, then the privileged end-to-end tests
    /// (`gracewatch-e2e`, one at a time, with `GRACEWATCH_BIN` pointing at a
    /// fresh debug build), then a check that they left no `gw-*` network
    /// namespace and no gracewatch BPF program behind. The privileged tests
    /// need root; without it the run fails unless `--unprivileged-only` is
    /// given (refused in CI, where `CI=true`).
    Test {
        /// Stop after the unprivileged steps (not allowed when CI=true).
        #[arg(long)]
        unprivileged_only: bool,
    },
    /// What `.ci/run` runs: `test`, with a total time at the end.
    Ci,
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
    /// reaction (last close → signal: `gracewatch drain` vs `ss` polling),
    /// overhead (nginx under wrk, with and without `gracewatch agent`),
    /// scale (100k connections: `gracewatch status` vs `ss -tanp`, agent
    /// memory), churn (a sustained connection rate across an fd-handover
    /// restart: lost events, exact counts). Needs root; builds the release
    /// binary first. Every process and namespace it starts is stopped.
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
        Task::Setup { test_deps } => setup::setup(setup::Options { test_deps }),
        Task::Run { args } => run::run(args),
        Task::Test { unprivileged_only } => test::test(test::Options { unprivileged_only }),
        Task::Ci => ci(),
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

/// `test` plus the facts a CI log reader needs first: which kernel and
/// toolchains produced this result, and how long it took.
fn ci() -> anyhow::Result<()> {
    let started = Instant::now();
    cmd::print_environment();
    let result = test::test(test::Options {
        unprivileged_only: false,
    });
    let verdict = if result.is_ok() { "passed" } else { "FAILED" };
    println!("ci {verdict}: total {}", cmd::human(started.elapsed()));
    result
}
