//! `cargo xtask`: the project's task runner. It owns everything around the
//! cargo build that cargo cannot express on its own: installing the eBPF
//! toolchain (nightly + `rust-src`, `bpf-linker` and the LLVM it links
//! against), running the binary with the privileges it needs, and the CI
//! pipeline with its privileged end-to-end tests and leak checks.
//! `.ci/run` is a thin wrapper around `cargo xtask ci`. The benchmarks
//! and the demo are programs of their own (the `gracewatch-bench` crate);
//! `bench` and `demo` build that binary and hand it their arguments.

mod test;

use std::{ffi::OsString, process::ExitCode, time::Instant};

use clap::{Parser, Subcommand};
use xtask::{cmd, run, setup};

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
        cargo xtask bench                 benchmarks vs the alternatives and costs, into BENCHMARKS.md\n\n\
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
    /// Runs `gracewatch-bench demo` (see `cargo xtask demo --help`).
    #[command(disable_help_flag = true)]
    Demo(BenchArgs),
    /// Benchmarks against the alternatives; prints them and updates BENCHMARKS.md.
    ///
    /// Runs `gracewatch-bench bench` (see `cargo xtask bench --help`).
    #[command(disable_help_flag = true)]
    Bench(BenchArgs),
}

/// The arguments of `demo` and `bench`, handed to `gracewatch-bench` as
/// they are (`--help` included): that binary defines and documents them.
#[derive(clap::Args)]
struct BenchArgs {
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<OsString>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup { test_deps } => setup::setup(setup::Options { test_deps }),
        Task::Run { args } => run::run(args),
        Task::Test { unprivileged_only } => test::test(test::Options { unprivileged_only }),
        Task::Ci => ci(),
        Task::Demo(BenchArgs { args }) => run::bench_binary("demo", args),
        Task::Bench(BenchArgs { args }) => run::bench_binary("bench", args),
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
