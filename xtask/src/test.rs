//! `cargo xtask test`: every check the project gates on, in order, stopping
//! at the first failure. Privileged end-to-end tests run last and are
//! followed by a leak check, because a test that leaves a network namespace
//! or an attached BPF program behind poisons every later run on the host.

use std::{
    collections::BTreeSet,
    fmt, thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{self, command},
    setup,
};

/// Prefix of the network namespaces the e2e tests create.
const NETNS_PREFIX: &str = "gw-";

/// Names of our programs as `bpftool prog show` prints them. The kernel keeps
/// 15 characters of a name (`inet_sock_set_s`); bpftool shows the full name
/// only when the program carries BTF, so match on the truncated prefix.
const PROG_NAME_PREFIXES: &[&str] = &[
    "inet_sock_set_s",
    "sock_recv_lengt",
    "sock_send_lengt",
    "tcp_destroy_soc",
];

/// How long programs and namespaces may take to go away after the last test
/// process exits (the kernel releases BPF programs asynchronously).
const LEAK_GRACE: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Skip the privileged steps (refused in CI).
    pub unprivileged_only: bool,
}

pub fn test(opts: Options) -> Result<()> {
    if opts.unprivileged_only && cmd::in_ci() {
        bail!(
            "--unprivileged-only is refused when CI=true: in CI a privileged test that cannot \
             run is a failure, not a skip"
        );
    }
    let mut steps = Steps::new();
    let result = run_steps(opts, &mut steps);
    steps.summary(result.is_ok());
    result
}

fn run_steps(opts: Options, steps: &mut Steps) -> Result<()> {
    let root = cmd::repo_root();
    let cargo = || {
        let mut c = command("cargo");
        c.current_dir(&root);
        c
    };

    steps.step("setup (with test dependencies)", || {
        setup::setup(setup::Options { test_deps: true })
    })?;
    steps.step("rustfmt", || {
        cmd::run(cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    steps.step(
        "pure model tests (stable only: no nightly, no bpf-linker)",
        pure_model_tests,
    )?;
    // gracewatch-ebpf only builds for the BPF target; it gets its own step.
    steps.step("clippy (host crates)", || {
        cmd::run(cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "gracewatch-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    steps.step("clippy (eBPF crate, nightly, bpfel)", || {
        // `rustup run` rather than `cargo +nightly`: the `+toolchain` syntax
        // only works through the rustup proxy, and RUSTC (set when xtask is
        // started by cargo) would silently pin the stable compiler.
        cmd::run(
            command("rustup")
                .current_dir(root.join("gracewatch-ebpf"))
                .env_remove("RUSTC")
                .env_remove("RUSTC_WORKSPACE_WRAPPER")
                .args(["run", "nightly", "cargo", "clippy"])
                .args(["-p", "gracewatch-ebpf", "--target", "bpfel-unknown-none"])
                .args(["-Z", "build-std=core", "--release", "--", "-D", "warnings"]),
        )
    })?;
    steps.step("unit and unprivileged tests", || {
        cmd::run(cargo().args([
            "test",
            "--workspace",
            "--exclude",
            "gracewatch-e2e",
            "--exclude",
            "gracewatch-ebpf",
        ]))
    })?;

    if !cmd::is_root() {
        if opts.unprivileged_only {
            steps.skip("privileged end-to-end tests", "--unprivileged-only");
            return Ok(());
        }
        let why = if cmd::in_ci() {
            "CI=true and not running as root: the privileged end-to-end tests cannot run, \
             which is a failure in CI"
        } else {
            "the privileged end-to-end tests need root (they load eBPF programs and create \
             network namespaces); rerun as root, or pass --unprivileged-only to stop before them"
        };
        steps.fail("privileged end-to-end tests", why);
        bail!("{why}");
    }

    steps.step("build gracewatch (debug) for the e2e tests", || {
        cmd::run(cargo().args(["build", "-p", "gracewatch"]))
    })?;
    let bin = cmd::target_dir().join("debug").join("gracewatch");
    let before = Leftovers::collect()?;
    if !before.is_empty() {
        println!("warning: present before the e2e tests (not counted as leaks):\n{before}");
    }
    let e2e = steps.step("privileged end-to-end tests", || {
        cmd::run(cargo().env("GRACEWATCH_BIN", &bin).args([
            "test",
            "-p",
            "gracewatch-e2e",
            "--",
            "--test-threads=1",
        ]))
    });
    // Check for leaks even when a test failed: that is when they happen.
    let leaks = steps.step("leak check (netns, BPF programs)", || check_leaks(&before));
    e2e.and(leaks)
}

/// Network namespaces and BPF programs that look like ours.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Leftovers {
    netns: BTreeSet<String>,
    /// `bpftool prog show` lines, which start with the program id.
    progs: BTreeSet<String>,
}

impl Leftovers {
    fn collect() -> Result<Self> {
        let netns = cmd::output(command("ip").args(["netns", "list"]))
            .context("failed to list network namespaces")?;
        let progs = cmd::output(command("bpftool").args(["prog", "show"]))
            .context("failed to list BPF programs with bpftool")?;
        Ok(Self::parse(&netns, &progs))
    }

    fn parse(netns: &str, progs: &str) -> Self {
        let netns = netns
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|name| name.starts_with(NETNS_PREFIX))
            .map(str::to_owned)
            .collect();
        let progs = progs
            .lines()
            .filter(|line| {
                // `42: tracepoint  name inet_sock_set_state  tag … gpl`
                let mut words = line.split_whitespace();
                words.any(|w| w == "name")
                    && words
                        .next()
                        .is_some_and(|name| PROG_NAME_PREFIXES.iter().any(|p| name.starts_with(p)))
            })
            .map(|line| line.trim().to_owned())
            .collect();
        Self { netns, progs }
    }

    fn is_empty(&self) -> bool {
        self.netns.is_empty() && self.progs.is_empty()
    }

    fn minus(&self, earlier: &Self) -> Self {
        Self {
            netns: self.netns.difference(&earlier.netns).cloned().collect(),
            progs: self.progs.difference(&earlier.progs).cloned().collect(),
        }
    }
}

impl fmt::Display for Leftovers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for name in &self.netns {
            writeln!(f, "  network namespace {name}")?;
        }
        for line in &self.progs {
            writeln!(f, "  BPF program {line}")?;
        }
        Ok(())
    }
}

fn check_leaks(before: &Leftovers) -> Result<()> {
    let deadline = Instant::now() + LEAK_GRACE;
    loop {
        let leaked = Leftovers::collect()?.minus(before);
        if leaked.is_empty() {
            println!("ok: no network namespace or BPF program left behind");
            return Ok(());
        }
        if Instant::now() >= deadline {
            println!("left behind by the e2e tests:\n{leaked}");
            bail!(
                "the e2e tests leaked {} network namespace(s) and {} BPF program(s)",
                leaked.netns.len(),
                leaked.progs.len()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Failed,
    Skipped,
}

/// `cargo test -p gracewatch-model` as on a machine with a stable toolchain
/// and nothing else: `PATH` holds only the rustup proxies for cargo and
/// rustc (no `bpf-linker`), the toolchain is pinned to stable, and the build
/// has its own target directory so no eBPF object built earlier helps. It
/// proves the pure part (events + tracker) builds and tests without the eBPF
/// toolchain (ARCHITECTURE.md §2).
fn pure_model_tests() -> Result<()> {
    let bin = cmd::cargo_bin_dir().context("no cargo bin directory (CARGO_HOME or HOME)")?;
    let tools = cmd::target_dir().join("stable-only-tools");
    std::fs::create_dir_all(&tools)
        .with_context(|| format!("failed to create {}", tools.display()))?;
    for tool in ["cargo", "rustc"] {
        let link = tools.join(tool);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(bin.join(tool), &link)
            .with_context(|| format!("failed to link {}", link.display()))?;
    }
    let mut path = std::ffi::OsString::from(&tools);
    path.push(":/usr/bin:/bin");
    cmd::run(
        std::process::Command::new(tools.join("cargo"))
            .current_dir(cmd::repo_root())
            .env("PATH", path)
            .env("RUSTUP_TOOLCHAIN", "stable")
            .env("CARGO_TARGET_DIR", cmd::target_dir().join("stable-only"))
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .args(["test", "-p", "gracewatch-model"]),
    )
}

/// The steps run so far, for one summary line each at the end.
struct Steps {
    started: Instant,
    done: Vec<(String, Outcome, Duration, Option<String>)>,
}

impl Steps {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            done: Vec::new(),
        }
    }

    fn step(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        println!("\n==> {name}");
        let started = Instant::now();
        let result = f();
        let elapsed = started.elapsed();
        let outcome = if result.is_ok() {
            Outcome::Ok
        } else {
            Outcome::Failed
        };
        println!("==> {} {name} ({})", label(outcome), cmd::human(elapsed));
        self.done.push((name.to_owned(), outcome, elapsed, None));
        result.with_context(|| format!("step `{name}` failed"))
    }

    fn skip(&mut self, name: &str, why: &str) {
        println!("\n==> skipped {name}: {why}");
        self.done.push((
            name.to_owned(),
            Outcome::Skipped,
            Duration::ZERO,
            Some(why.to_owned()),
        ));
    }

    fn fail(&mut self, name: &str, why: &str) {
        println!("\n==> FAILED {name}: {why}");
        self.done.push((
            name.to_owned(),
            Outcome::Failed,
            Duration::ZERO,
            Some(why.to_owned()),
        ));
    }

    fn summary(&self, passed: bool) {
        println!("\nsummary:");
        for (name, outcome, elapsed, note) in &self.done {
            let note = note
                .as_deref()
                .map(|n| format!(" — {n}"))
                .unwrap_or_default();
            println!(
                "  {:<7} {:>7}  {name}{note}",
                label(*outcome),
                cmd::human(*elapsed)
            );
        }
        let verdict = if passed { "passed" } else { "FAILED" };
        println!("test {verdict} in {}", cmd::human(self.started.elapsed()));
    }
}

fn label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Ok => "ok",
        Outcome::Failed => "FAILED",
        Outcome::Skipped => "skipped",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_match_our_namespaces_and_programs_only() {
        let netns = "gw-drain-1 (id: 0)\nother\ngw-x\n";
        let progs = "\
12: tracepoint  name inet_sock_set_s  tag 0123456789abcdef  gpl
\tloaded_at 2025-01-01T00:00:00+0000  uid 0
13: raw_tracepoint  name sock_recv_lengt  tag 0123456789abcdef  gpl
14: raw_tracepoint  name sock_send_length  tag 0123456789abcdef  gpl
15: cgroup_skb  name sd_fw_egress  tag 0123456789abcdef  gpl
16: tracepoint  name inet_sock_set_state  tag 0123456789abcdef  gpl
17: raw_tracepoint  name tcp_destroy_soc  tag 0123456789abcdef  gpl
";
        let found = Leftovers::parse(netns, progs);
        assert_eq!(
            found.netns,
            BTreeSet::from(["gw-drain-1".to_owned(), "gw-x".to_owned()])
        );
        let ids: Vec<&str> = found
            .progs
            .iter()
            .filter_map(|l| l.split(':').next())
            .collect();
        assert_eq!(ids, ["12", "13", "14", "16", "17"]);
    }

    #[test]
    fn only_new_leftovers_are_leaks() {
        let before = Leftovers::parse(
            "gw-old\n",
            "1: raw_tracepoint  name sock_recv_lengt  tag a\n",
        );
        let after = Leftovers::parse(
            "gw-old\ngw-new\n",
            "1: raw_tracepoint  name sock_recv_lengt  tag a\n2: raw_tracepoint  name sock_recv_lengt  tag a\n",
        );
        let leaked = after.minus(&before);
        assert_eq!(leaked.netns, BTreeSet::from(["gw-new".to_owned()]));
        assert_eq!(leaked.progs.len(), 1);
    }
}
