//! `cargo xtask bench`: the numbers behind gracewatch's claims, measured
//! side by side with the alternatives on this machine, printed and written
//! to `BENCHMARKS.md`. Six benchmarks, each runnable alone:
//!
//! - [`tax`]: ns per `getppid` / pipe `read` in an unwatched process,
//!   with and without `gracewatch agent`;
//! - [`cost`]: BPF and agent CPU per connection (kernel BPF statistics);
//! - [`overhead`]: nginx under `wrk` with and without `gracewatch agent`;
//! - [`reaction`]: last close → signal and → exit, `gracewatch drain` /
//!   `wait` vs `ss` polling;
//! - [`churn`]: a sustained connection rate across an fd-handover restart;
//! - [`scale`]: 100k established connections, `gracewatch status` vs `ss -tanp`.
//!
//! This module owns what they share: the guards that clean up every process
//! they start (on every path, including Ctrl-C), reading a child's output
//! line by line, the agent under test, and the `BENCHMARKS.md` update
//! (generated sections between markers, and the summary table's rows of
//! the benchmarks that ran; text outside them is kept). The
//! network namespace guard, the `/proc/PID` readers and the HTTP client
//! are the test kit's (`gracewatch-testkit`), shared with the e2e tests. The load processes the benchmarks start live in
//! [`helper`]. Benchmarks print numbers; they do not pass or fail.

mod churn;
mod cost;
mod helper;
mod overhead;
mod reaction;
mod scale;
mod tax;

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use clap::ValueEnum;
use gracewatch_testkit::{Netns, http, procfs};

pub use helper::Helper;

use xtask::{
    cmd::{self, command},
    setup,
};

/// `cargo xtask bench` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Benchmarks to run, in this order (default: all six, in the order
    /// tax cost overhead reaction churn scale).
    #[arg(value_enum, value_name = "BENCH")]
    benches: Vec<Which>,
    /// tax: interleaved (without, with agent) rounds.
    #[arg(long, default_value_t = 16)]
    tax_rounds: u32,
    /// cost: rounds (one agent each, a `Connection: close` and a keep-alive run).
    #[arg(long, default_value_t = 3)]
    cost_rounds: u32,
    /// cost: seconds per `Connection: close` run (keep-alive runs half).
    #[arg(long, default_value_t = 10)]
    cost_secs: u32,
    /// reaction: drains per method.
    #[arg(long, default_value_t = 50)]
    drains: u32,
    /// overhead: interleaved (without, with) pairs per connection mode.
    #[arg(long, default_value_t = 10)]
    pairs: u32,
    /// overhead: seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    run_secs: u32,
    /// scale: established connections to hold.
    #[arg(long, default_value_t = 100_000)]
    connections: u32,
    /// churn: seconds of sustained load per run (one run with gracewatch,
    /// one without before and one after).
    #[arg(long, default_value_t = 30)]
    churn_secs: u32,
    /// Print only; leave BENCHMARKS.md alone.
    #[arg(long)]
    no_write: bool,
    /// Benchmark this gracewatch binary instead of building this
    /// checkout's release binary (e.g. another branch's build).
    #[arg(long, value_name = "PATH")]
    gracewatch: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    Tax,
    Cost,
    Overhead,
    Reaction,
    Churn,
    Scale,
}

impl Which {
    /// Every benchmark, in the default order: the most noise-sensitive
    /// first, `ss -tanp` over 100k connections last.
    const ALL: [Which; 6] = [
        Which::Tax,
        Which::Cost,
        Which::Overhead,
        Which::Reaction,
        Which::Churn,
        Which::Scale,
    ];

    fn name(self) -> &'static str {
        match self {
            Which::Tax => "tax",
            Which::Cost => "cost",
            Which::Overhead => "overhead",
            Which::Reaction => "reaction",
            Which::Churn => "churn",
            Which::Scale => "scale",
        }
    }
}

/// `gracewatch-bench bench-helper …`: a load process started by a benchmark.
pub fn helper(h: Helper) -> Result<()> {
    helper::run(h)
}

/// What every benchmark needs.
struct Ctx {
    /// The release gracewatch binary.
    bin: PathBuf,
    /// This binary, `gracewatch-bench` (for the helpers).
    me: PathBuf,
    /// The workspace root.
    root: PathBuf,
    /// Scratch directory for configs, logs and state files.
    dir: PathBuf,
}

impl Ctx {
    fn program(&self, name: &str) -> PathBuf {
        self.root.join("tests").join("programs").join(name)
    }
}

/// One benchmark's generated Markdown and its rows of the summary table.
struct Section {
    which: Which,
    markdown: String,
    summary: Vec<Row>,
}

/// What a benchmark returns: its block and its summary rows.
type Output = (String, Vec<Row>);

/// A row of the summary table at the top of BENCHMARKS.md. `claim` starts
/// with the benchmark's name and a colon: that is how a later run of the
/// same benchmark finds the rows it replaces.
struct Row {
    claim: String,
    goal: String,
    measured: String,
    verdict: String,
}

impl Row {
    fn new(
        which: Which,
        claim: &str,
        goal: &str,
        measured: impl Into<String>,
        verdict: &str,
    ) -> Row {
        Row {
            claim: format!("{}: {claim}", which.name()),
            goal: goal.to_owned(),
            measured: measured.into(),
            verdict: verdict.to_owned(),
        }
    }
}

pub fn bench(args: &Args) -> Result<()> {
    if !cmd::is_root() {
        bail!("the benchmarks load eBPF programs and create network namespaces: run them as root");
    }
    install_interrupt_handler();
    setup::setup(setup::Options { test_deps: true })?;
    let root = cmd::repo_root();
    let bin = match &args.gracewatch {
        Some(path) => fs::canonicalize(path)
            .with_context(|| format!("no gracewatch binary at {}", path.display()))?,
        None => {
            cmd::run(command("cargo").current_dir(&root).args([
                "build",
                "--release",
                "-p",
                "gracewatch",
            ]))?;
            cmd::target_dir().join("release").join("gracewatch")
        }
    };
    let dir = std::env::temp_dir().join("gracewatch-bench");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let ctx = Ctx {
        bin,
        me: std::env::current_exe().context("failed to find the gracewatch-bench binary")?,
        root: root.clone(),
        dir,
    };
    let benches = if args.benches.is_empty() {
        Which::ALL.to_vec()
    } else {
        args.benches.clone()
    };
    let started = Instant::now();
    let machine = machine(&ctx, &benches);
    println!("\n{machine}");
    let mut sections = Vec::new();
    let mut failures = Vec::new();
    for which in benches {
        println!("\n==> bench {}", which.name());
        let t0 = Instant::now();
        let result = match which {
            Which::Tax => tax::run(&ctx, args.tax_rounds),
            Which::Cost => cost::run(&ctx, args.cost_rounds, args.cost_secs),
            Which::Overhead => overhead::run(&ctx, args.pairs, args.run_secs),
            Which::Reaction => reaction::run(&ctx, args.drains),
            Which::Churn => churn::run(&ctx, args.churn_secs),
            Which::Scale => scale::run(&ctx, args.connections),
        };
        match result {
            Ok((markdown, summary)) => {
                let took = t0.elapsed();
                println!("\n{markdown}");
                println!("(bench {} took {})", which.name(), cmd::human(took));
                let markdown = format!(
                    "{}\n\n_(`cargo xtask bench {}` took {}.)_",
                    markdown.trim_end(),
                    which.name(),
                    cmd::human(took)
                );
                sections.push(Section {
                    which,
                    markdown,
                    summary,
                });
            }
            Err(e) => {
                println!("bench {} failed: {e:#}", which.name());
                failures.push(format!("{}: {e:#}", which.name()));
            }
        }
        // Interrupted: stop here, but keep what finished.
        if interrupted() {
            break;
        }
    }
    println!("\n{}", summary_table(&sections, "", &today()));
    if !args.no_write && !sections.is_empty() {
        let path = root.join("BENCHMARKS.md");
        update_benchmarks_md(&path, &machine, &sections, &today())?;
        println!("\nwrote {}", path.display());
    }
    println!("bench total: {}", cmd::human(started.elapsed()));
    if !failures.is_empty() {
        bail!(
            "{} benchmark(s) failed: {}",
            failures.len(),
            failures.join("; ")
        );
    }
    Ok(())
}

// ---- interruption --------------------------------------------------------------

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Ctrl-C and SIGTERM only set a flag: the benchmark loops notice it and
/// return, so the guards' drops stop what they started.
fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is signal-safe.
        unsafe {
            libc::signal(sig, on_interrupt as *const () as libc::sighandler_t);
        }
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d`, waking early (with an error) on Ctrl-C.
fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        thread::sleep(left.min(Duration::from_millis(50)));
    }
}

// ---- processes and namespaces -----------------------------------------------------

fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) has no memory effects; a stale pid only fails.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// The benchmark's network namespace, `gw-bench-<tag>-<random>` with `lo`
/// up: testkit's guard, which kills every process still inside it on drop
/// (all started by this benchmark) and deletes it. The `gw-` prefix puts it
/// under `cargo xtask test`'s leak check too.
fn netns(tag: &str) -> Result<Netns> {
    Netns::create(&format!("bench-{tag}"))
        .with_context(|| format!("failed to create the network namespace of bench {tag}"))
}

/// A child process with its stdout read line by line on a thread; killed
/// (its whole process group when it leads one) and reaped on drop.
struct Proc {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Option<mpsc::Receiver<String>>,
    group: bool,
    /// Lines read while looking for another one.
    seen: Vec<String>,
}

impl Proc {
    /// Spawns `cmd` with stdin and stdout piped (stderr to `log`, or null).
    fn spawn(what: &str, cmd: &mut Command, log: Option<&Path>) -> Result<Proc> {
        Self::spawn_with(what, cmd, log, false)
    }

    /// Like [`Proc::spawn`], as the leader of a new process group: its
    /// descendants (a server's next generations) are killed with it.
    fn spawn_group(what: &str, cmd: &mut Command, log: Option<&Path>) -> Result<Proc> {
        Self::spawn_with(what, cmd, log, true)
    }

    fn spawn_with(what: &str, cmd: &mut Command, log: Option<&Path>, group: bool) -> Result<Proc> {
        use std::os::unix::process::CommandExt as _;
        let stderr = match log {
            Some(path) => Stdio::from(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("failed to open {}", path.display()))?,
            ),
            None => Stdio::null(),
        };
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        if group {
            cmd.process_group(0);
        }
        let line = cmd::display(cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("failed to start {what}: `{line}`"))?;
        let stdin = child.stdin.take();
        let lines = child.stdout.take().map(|out| {
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        Ok(Proc {
            what: what.to_owned(),
            child,
            stdin,
            lines,
            group,
            seen: Vec::new(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes one command line to its stdin.
    fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("failed to write to {}", self.what))
    }

    /// The next line that satisfies `pred` within `timeout` (the ones
    /// before it are kept in `seen`).
    fn expect(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let rx = self.lines.as_ref().context("stdout is not read")?;
        loop {
            check_interrupted()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "{} did not print the expected line within {timeout:?}; last lines: {:?}",
                    self.what,
                    self.seen.iter().rev().take(5).collect::<Vec<_>>()
                );
            }
            match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) if pred(&line) => return Ok(line),
                Ok(line) => {
                    if line.starts_with("error") {
                        bail!("{}: {line}", self.what);
                    }
                    self.seen.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!(
                    "{} ended its output before the expected line; last lines: {:?}",
                    self.what,
                    self.seen.iter().rev().take(5).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Waits up to `timeout` for the exit; `None` if it is still running.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit status.
    fn stop(&mut self, grace: Duration) -> Result<std::process::ExitStatus> {
        self.kill_with(libc::SIGTERM);
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        self.kill_with(libc::SIGKILL);
        Ok(self.child.wait()?)
    }

    fn kill_with(&self, sig: i32) {
        if self.group {
            if let Ok(pgid) = i32::try_from(self.pid()) {
                // SAFETY: kill(2) has no memory effects; the group is ours.
                unsafe {
                    libc::kill(-pgid, sig);
                }
            }
        } else {
            signal(self.pid(), sig);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stdin = None;
        self.kill_with(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// CLOCK_MONOTONIC now, in ns (the clock the test servers print).
fn monotonic_ns() -> i64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut t);
    }
    t.tv_sec * 1_000_000_000 + t.tv_nsec
}

/// A pidfd on a child, opened while it runs: it becomes readable the
/// moment the child exits, which is when a parent (a deploy script) can go
/// on, without the latency of polling `waitpid` in a sleep loop.
struct ExitClock {
    fd: std::os::fd::OwnedFd,
}

impl ExitClock {
    fn open(proc: &Proc) -> Result<ExitClock> {
        use std::os::fd::FromRawFd as _;
        let pid = libc::pid_t::try_from(proc.pid()).context("pid out of range")?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("failed to open a pidfd for {}", proc.what));
        }
        // SAFETY: the fd was just returned to us and is owned by nobody else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        Ok(ExitClock { fd })
    }

    /// Waits up to `timeout` for the exit; returns CLOCK_MONOTONIC (ns)
    /// when it was seen, and the status (the child is reaped).
    fn wait(&self, proc: &mut Proc, timeout: Duration) -> Result<(i64, std::process::ExitStatus)> {
        use std::os::fd::AsRawFd as _;
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll reads and writes the one pollfd we pass.
            let n = unsafe { libc::poll(&raw mut pfd, 1, 100) };
            let now = monotonic_ns();
            if n > 0 {
                let status = proc.child.wait()?;
                return Ok((now, status));
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e).context("poll on a pidfd failed");
                }
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", proc.what);
            }
        }
    }
}

/// `gracewatch agent` on `listen`, ready (its `/readyz` answered 200) when
/// [`Agent::start`] returns; stopped with SIGTERM on drop.
struct Agent {
    proc: Proc,
    /// Where it listens.
    target: http::Target,
    /// From spawn to the first `200` on `/readyz`.
    ready_after: Duration,
}

impl Agent {
    fn start(ctx: &Ctx, listen: &str, extra: &[&str], timeout: Duration) -> Result<Agent> {
        let listen: SocketAddr = listen.parse().context("bad agent address")?;
        let target = http::Target::Tcp(listen.to_string());
        let t0 = Instant::now();
        let mut c = command(&ctx.bin);
        c.args(["agent", "--listen", &listen.to_string()])
            .args(extra);
        let log = ctx.dir.join("agent.log");
        let mut proc = Proc::spawn("gracewatch agent", &mut c, Some(&log))?;
        loop {
            check_interrupted()?;
            if let Some(status) = proc.child.try_wait()? {
                bail!(
                    "gracewatch agent exited ({status}) before it was ready; see {}",
                    log.display()
                );
            }
            if http::get(&target, "/readyz").is_ok_and(|answer| answer.code == 200) {
                break;
            }
            if t0.elapsed() > timeout {
                bail!("gracewatch agent not ready after {timeout:?}");
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(Agent {
            proc,
            target,
            ready_after: t0.elapsed(),
        })
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Fails if the agent has exited: a run measured "with" it must have
    /// had it all along.
    fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.proc.child.try_wait()? {
            bail!("gracewatch agent exited ({status}) during the run; see its agent.log");
        }
        Ok(())
    }

    fn status(&self) -> Result<serde_json::Value> {
        let answer = http::get(&self.target, "/v1/status").context("agent /v1/status failed")?;
        if answer.code != 200 {
            bail!("agent /v1/status answered {}: {}", answer.code, answer.body);
        }
        serde_json::from_str(&answer.body).context("agent /v1/status is not JSON")
    }

    fn stop(mut self) -> Result<()> {
        self.proc.stop(Duration::from_secs(10))?;
        Ok(())
    }
}

/// The CPU time (user + system) of a process so far.
fn cpu_time(pid: u32) -> Option<Duration> {
    procfs::stat(pid).map(|stat| stat.cpu_time())
}

/// Restores `/proc/sys/kernel/bpf_stats_enabled` to what it was on drop.
struct BpfStatsSysctl {
    before: Option<String>,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStatsSysctl {
    fn enable() -> Result<BpfStatsSysctl> {
        let before = fs::read_to_string(BPF_STATS).ok();
        fs::write(BPF_STATS, "1").with_context(|| format!("failed to write 1 to {BPF_STATS}"))?;
        Ok(BpfStatsSysctl { before })
    }
}

impl Drop for BpfStatsSysctl {
    fn drop(&mut self) {
        if let Some(before) = &self.before {
            let _ = fs::write(BPF_STATS, before.trim());
        }
    }
}

/// Run time and count of the BPF programs held by `pid`, per program
/// name, from `bpftool -j prog show` (the kernel's `bpf_prog_info`). The
/// programs are those whose fds `pid` holds (`prog_id:` in
/// `/proc/PID/fdinfo`): Debian's bpftool does not list holders.
fn bpf_prog_stats(pid: u32) -> Result<Vec<(String, u64, u64)>> {
    let ids = bpf_prog_ids(pid);
    if ids.is_empty() {
        bail!("process {pid} holds no BPF program");
    }
    let out = cmd::output(command("bpftool").args(["-j", "prog", "show"]))?;
    let progs: serde_json::Value = serde_json::from_str(&out).context("bpftool printed no JSON")?;
    let mut stats = Vec::new();
    for p in progs.as_array().into_iter().flatten() {
        if p["id"].as_u64().is_some_and(|id| ids.contains(&id)) {
            stats.push((
                p["name"].as_str().unwrap_or("?").to_owned(),
                p["run_time_ns"].as_u64().unwrap_or(0),
                p["run_cnt"].as_u64().unwrap_or(0),
            ));
        }
    }
    stats.sort();
    Ok(stats)
}

/// Ids of the BPF programs whose fds `pid` holds.
fn bpf_prog_ids(pid: u32) -> Vec<u64> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut ids: Vec<u64> = dir
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:")?.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

// ---- statistics -------------------------------------------------------------------

/// The `p`-th percentile (0-100) of sorted `v`, nearest rank.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

fn stddev(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// xorshift64*: random delays without a dependency.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(nanos | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// `met` / `**missed**` for a goal line.
fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

// ---- BENCHMARKS.md ------------------------------------------------------------------

/// The machine and toolchain the numbers come from, and the command that
/// produced them.
fn machine(ctx: &Ctx, benches: &[Which]) -> String {
    let out = |c: &mut Command| {
        cmd::output(c.stderr(Stdio::piped()))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unavailable".to_owned())
    };
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim())
        })
        .unwrap_or("unknown");
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    // nginx prints its version on stderr.
    let nginx = Command::new("nginx")
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_else(|_| "unavailable".to_owned());
    let wrk = dpkg_version("wrk");
    let commit = out(command("git")
        .current_dir(&ctx.root)
        .args(["rev-parse", "--short", "HEAD"]));
    let date = out(command("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    let mut s = String::new();
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| date | {date} |");
    let _ = writeln!(s, "| CPU | {cpu}, {cores} cores (VM) |");
    let _ = writeln!(s, "| memory | {mem_gib:.1} GiB |");
    let _ = writeln!(s, "| kernel | {} |", out(command("uname").arg("-r")));
    if ctx.bin == cmd::target_dir().join("release").join("gracewatch") {
        let _ = writeln!(
            s,
            "| gracewatch | commit {commit}, `cargo build --release -p gracewatch` |"
        );
    } else {
        let _ = writeln!(
            s,
            "| gracewatch | `{}` (given with `--gracewatch`; bench code at commit {commit}) |",
            ctx.bin.display()
        );
    }
    let _ = writeln!(s, "| rustc | {} |", out(command("rustc").arg("-V")));
    let _ = writeln!(
        s,
        "| nginx | {nginx} (Debian nginx-light {}) |",
        dpkg_version("nginx-light")
    );
    let _ = writeln!(s, "| wrk | Debian wrk {wrk} |");
    let _ = writeln!(
        s,
        "| python3 | {} |",
        out(command("python3").arg("--version"))
    );
    let _ = writeln!(s, "| iproute2 (ss) | {} |", out(command("ss").arg("-V")));
    let names: Vec<&str> = benches.iter().map(|b| b.name()).collect();
    let _ = writeln!(
        s,
        "\nProduced by `cargo xtask bench {}` (as root).",
        names.join(" ")
    );
    s
}

fn dpkg_version(package: &str) -> String {
    cmd::output(command("dpkg-query").args(["-W", "-f", "${Version}", package]))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|_| "unavailable".to_owned())
}

fn begin_marker(name: &str) -> String {
    format!(
        "<!-- bench:{name}:begin (generated by `cargo xtask bench`; edits here are overwritten) -->"
    )
}

fn end_marker(name: &str) -> String {
    format!("<!-- bench:{name}:end -->")
}

const TEMPLATE: &str = "# gracewatch benchmarks\n\n\
Measured by `cargo xtask bench` (all six) or `cargo xtask bench tax|cost|overhead|reaction|churn|scale`\n\
(any of them, in that order), as root on a project machine. Each run rewrites the generated\n\
blocks below (and its own rows of the summary) and keeps the text around them.\n\n\
## Summary\n\n@summary@\n\n\
## Machine\n\n@machine@\n\n\
## 1. Reaction time\n\n@reaction@\n\n\
## 2. Overhead on the server\n\n@overhead@\n\n\
## 3. Scale\n\n@scale@\n\n\
## 4. Churn across an fd-handover restart\n\n@churn@\n\n\
## 5. Syscall tax on processes gracewatch does not watch\n\n@tax@\n\n\
## 6. Cost per connection\n\n@cost@\n";

/// Every generated block, in the template's order.
const BLOCKS: [&str; 8] = [
    "summary", "machine", "reaction", "overhead", "scale", "churn", "tax", "cost",
];

const SUMMARY_HEADER: &str = "| claim | goal | measured | verdict | run |\n|---|---|---|---|---|";

/// Today's date, for the summary's `run` column.
fn today() -> String {
    cmd::output(command("date").args(["-u", "+%Y-%m-%d"]))
        .map(|d| d.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

/// The summary table: the rows of `sections`, and of `previous` (an
/// earlier summary block) those of benchmarks that did not run now; in the
/// default order of the benchmarks.
fn summary_table(sections: &[Section], previous: &str, date: &str) -> String {
    let ran = |claim: &str| {
        sections
            .iter()
            .any(|s| claim.starts_with(&format!("{}:", s.which.name())))
    };
    let mut rows: Vec<String> = previous
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| claim |"))
        .filter(|l| !ran(l.trim_start_matches("| ")))
        .map(str::to_owned)
        .collect();
    for s in sections {
        for r in &s.summary {
            rows.push(format!(
                "| {} | {} | {} | {} | {date} |",
                r.claim, r.goal, r.measured, r.verdict
            ));
        }
    }
    let rank = |row: &str| {
        let claim = row.trim_start_matches("| ");
        Which::ALL
            .iter()
            .position(|w| claim.starts_with(&format!("{}:", w.name())))
            .unwrap_or(Which::ALL.len())
    };
    rows.sort_by_key(|r| rank(r));
    format!("{SUMMARY_HEADER}\n{}", rows.join("\n"))
}

/// Replaces the generated blocks of the benchmarks that ran, the machine
/// block, and their rows of the summary block; everything else in the file
/// stays as it was.
fn update_benchmarks_md(
    path: &Path,
    machine: &str,
    sections: &[Section],
    date: &str,
) -> Result<()> {
    let mut text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(_) => {
            let mut t = TEMPLATE.to_owned();
            for name in BLOCKS {
                let block = format!(
                    "{}\n_not run yet_\n{}",
                    begin_marker(name),
                    end_marker(name)
                );
                t = t.replace(&format!("@{name}@"), &block);
            }
            t
        }
    };
    let previous = block(&text, "summary").unwrap_or_default();
    let mut blocks = vec![
        ("summary", summary_table(sections, &previous, date)),
        ("machine", machine.to_owned()),
    ];
    blocks.extend(
        sections
            .iter()
            .map(|s| (s.which.name(), s.markdown.clone())),
    );
    for (name, body) in blocks {
        let (begin, end) = (begin_marker(name), end_marker(name));
        let replacement = format!("{begin}\n{}\n{end}", body.trim_end());
        let prefix = format!("<!-- bench:{name}:begin");
        match (text.find(&prefix), text.find(&end)) {
            (Some(b), Some(e)) if b < e => {
                text.replace_range(b..e + end.len(), &replacement);
            }
            _ => {
                text.push_str(&format!("\n## {name}\n\n{replacement}\n"));
            }
        }
    }
    fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))
}

/// The body of generated block `name` in `text`, if it is there.
fn block(text: &str, name: &str) -> Option<String> {
    let b = text.find(&format!("<!-- bench:{name}:begin"))?;
    let body = b + text[b..].find('\n')? + 1;
    let e = text.find(&end_marker(name))?;
    (body <= e).then(|| text[body..e].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }

    #[test]
    fn generated_blocks_are_replaced_and_the_rest_kept() {
        let dir = std::env::temp_dir().join(format!("gracewatch-bench-md-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("BENCHMARKS.md");
        let section = |which, body: &str| Section {
            which,
            markdown: body.to_owned(),
            summary: vec![Row::new(which, "claim", "goal", body, "met")],
        };
        update_benchmarks_md(&path, "m1", &[section(Which::Scale, "s1")], "d1")
            .expect("first write");
        update_benchmarks_md(&path, "m1", &[section(Which::Tax, "t1")], "d1").expect("first write");
        let mut text = fs::read_to_string(&path).expect("read");
        assert!(text.contains("s1") && text.contains("m1") && text.contains("_not run yet_"));
        text.push_str("\nhand-written analysis\n");
        fs::write(&path, text).expect("write");
        update_benchmarks_md(&path, "m2", &[section(Which::Scale, "s2")], "d2")
            .expect("second write");
        let text = fs::read_to_string(&path).expect("read");
        assert!(text.contains("s2") && !text.contains("s1") && text.contains("m2"));
        assert!(text.contains("hand-written analysis"));
        // The summary keeps the tax row of the earlier run, replaces the
        // scale row, and lists tax first.
        let summary = block(&text, "summary").expect("summary block");
        assert!(
            summary.contains("| tax: claim | goal | t1 | met | d1 |"),
            "{summary}"
        );
        assert!(
            summary.contains("| scale: claim | goal | s2 | met | d2 |"),
            "{summary}"
        );
        assert!(!summary.contains("s1"));
        assert!(summary.find("tax:") < summary.find("scale:"));
        let _ = fs::remove_dir_all(&dir);
    }
}
