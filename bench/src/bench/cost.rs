//! Per-connection cost: what one short connection costs gracewatch, in the
//! kernel (its BPF programs) and in the agent's process, at the highest
//! connection rate this machine reaches: the overhead benchmark's nginx
//! under `wrk` with `Connection: close` (one connection per request), and
//! for reference keep-alive (per request).
//!
//! `kernel.bpf_stats_enabled` is set to 1 for the benchmark and back to
//! what it was on every exit path (a guard). Per run: the `run_cnt` and
//! `run_time_ns` of the programs the agent holds (prog ids from
//! `/proc/AGENT/fdinfo`, values from `bpftool -j prog show`) and the
//! agent's utime + stime (`/proc/AGENT/stat`) are read before and after,
//! and divided by the requests `wrk` completed. The statistics add two
//! clock reads to every program run, so the BPF figures are upper bounds;
//! the programs see the whole host, so other processes' connections during
//! the run are in the counts too.

use std::{fmt::Write as _, time::Duration};

use anyhow::Result;

use super::{
    Agent, BpfStatsSysctl, Ctx, Output, Row, Which, bpf_prog_stats, check_interrupted, cpu_time,
    median, netns,
    overhead::{Mode, start_nginx, wrk},
    verdict,
};

const AGENT_LISTEN: &str = "127.0.0.1:19469";
const GOAL_NS_PER_CONN: f64 = 1000.0;
/// Seconds of no load before the runs, for the agent's idle CPU.
const IDLE_SECS: u64 = 3;

/// One run with the agent.
struct Run {
    mode: Mode,
    requests: u64,
    rps: f64,
    /// (program, run time ns, run count) deltas over the run.
    progs: Vec<(String, u64, u64)>,
    agent_cpu_ns: u64,
    /// The same agent's CPU per second with no load, measured before the
    /// runs (its periodic rescans and status builds, plus whatever else
    /// the host does meanwhile).
    idle_ns_per_sec: f64,
    secs: u32,
}

impl Run {
    fn bpf_ns(&self) -> u64 {
        self.progs.iter().map(|p| p.1).sum()
    }

    fn per_request(&self, v: u64) -> f64 {
        v as f64 / self.requests.max(1) as f64
    }

    /// Agent CPU per request above what it burns idle.
    fn agent_net(&self) -> f64 {
        let idle = self.idle_ns_per_sec * f64::from(self.secs);
        (self.agent_cpu_ns as f64 - idle).max(0.0) / self.requests.max(1) as f64
    }
}

pub fn run(ctx: &Ctx, rounds: u32, secs: u32) -> Result<Output> {
    let ns = netns("cost")?;
    let _nginx = start_nginx(ctx, &ns)?;
    wrk(&ns, Mode::Close, 2)?; // warm-up
    let stats = BpfStatsSysctl::enable()?;
    let mut runs = Vec::new();
    for r in 0..rounds {
        check_interrupted()?;
        let mut agent = Agent::start(ctx, AGENT_LISTEN, &[], Duration::from_secs(30))?;
        agent.status()?;
        let idle0 = cpu_time(agent.pid()).unwrap_or_default();
        super::sleep(Duration::from_secs(IDLE_SECS))?;
        let idle_ns_per_sec = cpu_time(agent.pid())
            .unwrap_or_default()
            .saturating_sub(idle0)
            .as_nanos() as f64
            / IDLE_SECS as f64;
        // Keep-alive runs shorter: its per-request cost is the small one.
        for (mode, secs) in [(Mode::Close, secs), (Mode::KeepAlive, secs.div_ceil(2))] {
            let before = bpf_prog_stats(agent.pid())?;
            let cpu0 = cpu_time(agent.pid()).unwrap_or_default();
            let w = wrk(&ns, mode, secs)?;
            let cpu1 = cpu_time(agent.pid()).unwrap_or_default();
            let after = bpf_prog_stats(agent.pid())?;
            agent.ensure_running()?;
            let progs = after
                .iter()
                .map(|(name, t, n)| {
                    let (t0, n0) = before
                        .iter()
                        .find(|b| &b.0 == name)
                        .map_or((0, 0), |b| (b.1, b.2));
                    (name.clone(), t.saturating_sub(t0), n.saturating_sub(n0))
                })
                .collect();
            let run = Run {
                mode,
                requests: w.requests,
                rps: w.rps,
                progs,
                agent_cpu_ns: u64::try_from(cpu1.saturating_sub(cpu0).as_nanos())
                    .unwrap_or(u64::MAX),
                idle_ns_per_sec,
                secs,
            };
            println!(
                "cost: round {}/{rounds} {}: {} requests ({:.0}/s), BPF {:.0} ns + agent {:.0} ns per request",
                r + 1,
                mode.label(),
                run.requests,
                run.rps,
                run.per_request(run.bpf_ns()),
                run.per_request(run.agent_cpu_ns),
            );
            runs.push(run);
        }
        agent.stop()?;
    }
    drop(stats);
    Ok(report(&runs, rounds, secs))
}

fn report(runs: &[Run], rounds: u32, secs: u32) -> Output {
    let mut md = String::new();
    let mut rows = Vec::new();
    let _ = writeln!(
        md,
        "The overhead benchmark's nginx (1 worker, `return 200`) in a network namespace under \
         `wrk -t1` with `Connection: close` (32 connections, {secs} s per run: one connection \
         per request, the highest connection rate this machine reaches) and keep-alive (64 \
         connections, {} s), {rounds} rounds, one `gracewatch agent` per round (default \
         options), with `kernel.bpf_stats_enabled=1` during the benchmark (restored after). \
         Per run: `run_cnt`/`run_time_ns` deltas of the programs the agent holds (ids from \
         `/proc/AGENT/fdinfo`, `bpftool -j prog show`) and the agent's utime + stime delta \
         (`/proc/AGENT/stat`, 10 ms ticks), divided by the requests wrk completed; the agent's idle CPU is measured over {IDLE_SECS} s \
         with no load before the runs. **The \
         statistics add two clock reads to every program run, so the BPF figures are upper \
         bounds**; the programs see the whole host, so other processes' connections during a run \
         count too.\n",
        secs.div_ceil(2)
    );
    let mut close_total = None;
    for mode in [Mode::Close, Mode::KeepAlive] {
        let rs: Vec<&Run> = runs.iter().filter(|r| r.mode == mode).collect();
        if rs.is_empty() {
            continue;
        }
        let unit = if mode == Mode::Close {
            "connection"
        } else {
            "request"
        };
        let requests: u64 = rs.iter().map(|r| r.requests).sum();
        let rps: Vec<f64> = rs.iter().map(|r| r.rps).collect();
        let _ = writeln!(
            md,
            "**{}**: {requests} requests in {} runs ({:.0} req/s median).\n",
            mode.label(),
            rs.len(),
            median(&rps)
        );
        let _ = writeln!(
            md,
            "| program | runs | runs per {unit} | ns per run | ns per {unit} |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|");
        let mut names: Vec<&str> = rs
            .iter()
            .flat_map(|r| r.progs.iter().map(|p| p.0.as_str()))
            .collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let (t, n) = rs
                .iter()
                .flat_map(|r| r.progs.iter().filter(|p| p.0 == name))
                .fold((0u64, 0u64), |(t, n), p| (t + p.1, n + p.2));
            let _ = writeln!(
                md,
                "| `{name}` | {n} | {:.2} | {:.0} | {:.0} |",
                n as f64 / requests.max(1) as f64,
                t as f64 / n.max(1) as f64,
                t as f64 / requests.max(1) as f64
            );
        }
        let spread = |f: &dyn Fn(&Run) -> f64| {
            let v: Vec<f64> = rs.iter().map(|r| f(r)).collect();
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (median(&v), lo, hi)
        };
        let bpf = spread(&|r| r.per_request(r.bpf_ns()));
        let agent = spread(&|r| r.per_request(r.agent_cpu_ns));
        let net = spread(&|r| r.agent_net());
        let idle = spread(&|r| r.idle_ns_per_sec / 1e7);
        let total = spread(&|r| r.per_request(r.bpf_ns() + r.agent_cpu_ns));
        let _ = writeln!(
            md,
            "\n| per {unit}, median of runs [min–max] | ns |\n|---|---:|\n\
             | BPF (all programs) | {:.0} [{:.0}–{:.0}] |\n\
             | agent CPU (utime + stime) | {:.0} [{:.0}–{:.0}] |\n\
             | (agent CPU above its idle rate of {:.2} % of a core) | ({:.0} [{:.0}–{:.0}]) |\n\
             | **total** (BPF + agent CPU) | **{:.0}** [{:.0}–{:.0}] |\n",
            bpf.0,
            bpf.1,
            bpf.2,
            agent.0,
            agent.1,
            agent.2,
            idle.0,
            net.0,
            net.1,
            net.2,
            total.0,
            total.1,
            total.2
        );
        if mode == Mode::Close {
            close_total = Some((total.0, bpf.0, agent.0));
            rows.push(Row::new(
                Which::Cost,
                "BPF + agent CPU per short connection (nginx, `Connection: close`)",
                "< 1 µs",
                format!(
                    "**{:.2} µs** (BPF {:.2} µs, upper bound with stats on; agent {:.2} µs) at {:.0} conn/s, {} runs",
                    total.0 / 1000.0,
                    bpf.0 / 1000.0,
                    agent.0 / 1000.0,
                    median(&rps),
                    rs.len()
                ),
                verdict(total.0 < GOAL_NS_PER_CONN),
            ));
        } else {
            rows.push(Row::new(
                Which::Cost,
                "BPF + agent CPU per keep-alive request",
                "(reference)",
                format!(
                    "{:.0} ns (BPF {:.0} ns, agent {:.0} ns)",
                    total.0, bpf.0, agent.0
                ),
                "-",
            ));
        }
    }
    if let Some((total, bpf, agent)) = close_total {
        let _ = writeln!(
            md,
            "Goal: < 1 µs per connection in total — {} ({:.2} µs: BPF {:.2} µs, an upper bound, \
             + agent {:.2} µs).",
            verdict(total < GOAL_NS_PER_CONN),
            total / 1000.0,
            bpf / 1000.0,
            agent / 1000.0
        );
    }
    (md, rows)
}
