//! Overhead on the server: Debian's nginx (one worker, `return 200`, the
//! cheapest request it serves, so the per-connection cost of the programs
//! weighs the most) under `wrk` (one thread), with and without `gracewatch
//! agent` running. Two modes: short-lived connections (`Connection:
//! close`, one connection per request: the highest connection rate this
//! machine reaches, where the tracepoints fire most) and keep-alive. Runs
//! are interleaved in pairs, the order alternating (off/on, on/off, …), so
//! drift on the VM hits both sides alike.
//!
//! The pairs run the agent as deployed (BPF run-time statistics off: they
//! cost every program two clock reads per run). After the pairs of each
//! mode, one more run with the agent has `kernel.bpf_stats_enabled` on, and
//! the programs' `run_time_ns`/`run_cnt` are read with `bpftool -j prog
//! show` before and after it: the kernel's own accounting of the time our
//! programs run per event.

use std::{fmt::Write as _, fs, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{
    Agent, BpfStatsSysctl, Ctx, Netns, Proc, bpf_prog_stats, check_interrupted, cpu_time, mean,
    netns, stddev, verdict,
};
use xtask::cmd;

const PORT: u16 = 8080;
const AGENT_LISTEN: &str = "127.0.0.1:19464";
const GOAL_LOSS_PCT: f64 = 2.0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Close,
    KeepAlive,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Close => "short-lived (`Connection: close`)",
            Mode::KeepAlive => "keep-alive",
        }
    }

    fn connections(self) -> &'static str {
        match self {
            Mode::Close => "32",
            Mode::KeepAlive => "64",
        }
    }
}

/// One wrk run.
#[derive(Clone, Debug, Default)]
struct Wrk {
    rps: f64,
    lat_avg_ms: f64,
    lat_p50_ms: f64,
    lat_p99_ms: f64,
    errors: u64,
}

/// One run with the agent: what its programs and its process cost.
#[derive(Clone, Debug, Default)]
struct AgentCost {
    /// (program, run time ns, run count) deltas over the run.
    progs: Vec<(String, u64, u64)>,
    /// The agent's own CPU time over the run, as a share of one core.
    cpu_pct: f64,
}

struct Pair {
    mode: Mode,
    without: Wrk,
    with: Wrk,
    cost: AgentCost,
}

/// The extra run per mode with the kernel's BPF statistics on.
struct StatsRun {
    mode: Mode,
    wrk: Wrk,
    cost: AgentCost,
}

pub fn run(ctx: &Ctx, pairs: u32, secs: u32) -> Result<String> {
    let ns = netns("overhead")?;
    let dir = ctx.dir.join("nginx");
    fs::create_dir_all(&dir)?;
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    fs::write(
        &conf,
        format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log stderr warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n\
             client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
             uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen 127.0.0.1:{PORT} backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n"
        ),
    )?;
    let log = ctx.dir.join("nginx.log");
    let _nginx = Proc::spawn_group(
        "nginx",
        ns.command("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .args(["-e", "stderr"]),
        Some(&log),
    )?;
    // Serving yet? A short wrk run answers that, and warms up.
    let mut up = false;
    for _ in 0..20 {
        super::sleep(Duration::from_millis(250))?;
        if wrk(&ns, Mode::KeepAlive, 1).is_ok_and(|w| w.rps > 0.0) {
            up = true;
            break;
        }
    }
    if !up {
        bail!(
            "nginx does not answer on 127.0.0.1:{PORT}; see {}",
            log.display()
        );
    }
    let mut results = Vec::new();
    let mut stats_runs = Vec::new();
    for mode in [Mode::Close, Mode::KeepAlive] {
        wrk(&ns, mode, 2)?; // warm-up
        for i in 0..pairs {
            check_interrupted()?;
            let mut without = None;
            let mut with = None;
            let order = if i % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for agent_on in order {
                if agent_on {
                    with = Some(with_agent(ctx, &ns, mode, secs)?);
                } else {
                    without = Some(wrk(&ns, mode, secs)?);
                }
            }
            let (without, (with, cost)) = (
                without.context("no run without")?,
                with.context("no run with")?,
            );
            println!(
                "overhead: {} pair {}/{pairs}: without {:.0} req/s, with {:.0} req/s ({:+.2}%), agent {:.1}% CPU",
                mode.label(),
                i + 1,
                without.rps,
                with.rps,
                (with.rps / without.rps - 1.0) * 100.0,
                cost.cpu_pct
            );
            results.push(Pair {
                mode,
                without,
                with,
                cost,
            });
        }
        check_interrupted()?;
        let stats = BpfStatsSysctl::enable()?;
        let (w, cost) = with_agent(ctx, &ns, mode, secs)?;
        drop(stats);
        println!(
            "overhead: {} with BPF run-time statistics on: {:.0} req/s, agent {:.1}% CPU",
            mode.label(),
            w.rps,
            cost.cpu_pct
        );
        stats_runs.push(StatsRun { mode, wrk: w, cost });
    }
    Ok(report(&results, &stats_runs, pairs, secs))
}

fn with_agent(ctx: &Ctx, ns: &Netns, mode: Mode, secs: u32) -> Result<(Wrk, AgentCost)> {
    let agent = Agent::start(ctx, AGENT_LISTEN, &[], Duration::from_secs(30))?;
    let before = bpf_prog_stats(agent.pid())?;
    let cpu0 = cpu_time(agent.pid()).unwrap_or_default();
    let w = wrk(ns, mode, secs)?;
    let cpu1 = cpu_time(agent.pid()).unwrap_or_default();
    let after = bpf_prog_stats(agent.pid())?;
    agent.stop()?;
    let progs = after
        .iter()
        .map(|(name, t, n)| {
            let (t0, n0) = before
                .iter()
                .find(|b| &b.0 == name)
                .map_or((0, 0), |b| (b.1, b.2));
            (name.clone(), t - t0, n - n0)
        })
        .collect();
    Ok((
        w,
        AgentCost {
            progs,
            cpu_pct: (cpu1.saturating_sub(cpu0)).as_secs_f64() / f64::from(secs) * 100.0,
        },
    ))
}

fn wrk(ns: &Netns, mode: Mode, secs: u32) -> Result<Wrk> {
    let mut c = ns.command("wrk");
    c.args([
        "-t1",
        "-c",
        mode.connections(),
        "-d",
        &format!("{secs}s"),
        "--latency",
    ]);
    if mode == Mode::Close {
        c.args(["-H", "Connection: close"]);
    }
    c.arg(format!("http://127.0.0.1:{PORT}/"));
    let out = cmd::output(&mut c)?;
    parse_wrk(&out).with_context(|| format!("unexpected wrk output:\n{out}"))
}

/// `1.10ms`, `313.18us`, `2.00s` → ms.
fn wrk_ms(s: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else {
        (s.strip_suffix('s')?, 1000.0)
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

fn parse_wrk(out: &str) -> Option<Wrk> {
    let mut w = Wrk::default();
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v, ..] => w.rps = v.parse().ok()?,
            ["Latency", avg, ..] if avg.chars().next()?.is_ascii_digit() => {
                w.lat_avg_ms = wrk_ms(avg)?;
            }
            ["50%", v] => w.lat_p50_ms = wrk_ms(v)?,
            ["99%", v] => w.lat_p99_ms = wrk_ms(v)?,
            ["Socket", "errors:", rest @ ..] => {
                w.errors += rest
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => w.errors += n.parse::<u64>().ok()?,
            _ => {}
        }
    }
    (w.rps > 0.0).then_some(w)
}

fn report(results: &[Pair], stats_runs: &[StatsRun], pairs: u32, secs: u32) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "nginx-light, 1 worker, `return 200 \"ok\"`, in a network namespace; `wrk -t1 --latency` \
         ({secs} s per run; 32 connections for `Connection: close`, 64 for keep-alive); {pairs} \
         interleaved pairs per mode, order alternating. \"with\" = `gracewatch agent` running \
         (default options: BPF run-time statistics off, 4 MiB ring buffer), started and ready \
         before the run. Means over the pairs; ratio = with ÷ without.\n"
    );
    let _ = writeln!(
        md,
        "| mode | req/s without | req/s with | throughput ratio | p50 latency without → with | p99 latency without → with | agent CPU |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    let mut close_loss = None;
    for mode in [Mode::Close, Mode::KeepAlive] {
        let rs: Vec<&Pair> = results.iter().filter(|p| p.mode == mode).collect();
        if rs.is_empty() {
            continue;
        }
        let col = |f: &dyn Fn(&Pair) -> f64| rs.iter().map(|p| f(p)).collect::<Vec<f64>>();
        let (off, on) = (col(&|p| p.without.rps), col(&|p| p.with.rps));
        let ratios = col(&|p| p.with.rps / p.without.rps);
        let ratio = mean(&on) / mean(&off);
        if mode == Mode::Close {
            close_loss = Some(((1.0 - ratio) * 100.0, stddev(&ratios) * 100.0));
        }
        let _ = writeln!(
            md,
            "| {} | {:.0} ± {:.0} | {:.0} ± {:.0} | {:.4} (per pair: {}) | {:.3} → {:.3} ms ({:.3}) | {:.3} → {:.3} ms ({:.3}) | {:.1}% of a core |",
            mode.label(),
            mean(&off),
            stddev(&off),
            mean(&on),
            stddev(&on),
            ratio,
            ratios
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            mean(&col(&|p| p.without.lat_p50_ms)),
            mean(&col(&|p| p.with.lat_p50_ms)),
            mean(&col(&|p| p.with.lat_p50_ms)) / mean(&col(&|p| p.without.lat_p50_ms)),
            mean(&col(&|p| p.without.lat_p99_ms)),
            mean(&col(&|p| p.with.lat_p99_ms)),
            mean(&col(&|p| p.with.lat_p99_ms)) / mean(&col(&|p| p.without.lat_p99_ms)),
            mean(&col(&|p| p.cost.cpu_pct)),
        );
    }
    if let Some((loss, spread)) = close_loss {
        let _ = writeln!(
            md,
            "\nGoal: throughput loss under {GOAL_LOSS_PCT}% at the highest connection rate \
             (short-lived) — {} (loss {loss:.2}%; per-pair ratios spread ±{spread:.2}%).",
            verdict(loss < GOAL_LOSS_PCT)
        );
    }

    let _ = writeln!(
        md,
        "\nBPF programs' own run time (kernel `bpf_stats_enabled`, `bpftool -j prog show`), \
         from one more {secs} s run per mode with the agent and the statistics on (they add two \
         clock reads to every run):\n"
    );
    let _ = writeln!(
        md,
        "| mode | program | runs | runs per request | ns per run |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|");
    for mode in [Mode::Close, Mode::KeepAlive] {
        let rs: Vec<&StatsRun> = stats_runs.iter().filter(|p| p.mode == mode).collect();
        let requests: f64 = rs.iter().map(|p| p.wrk.rps * f64::from(secs)).sum();
        let mut names: Vec<String> = rs
            .iter()
            .flat_map(|p| p.cost.progs.iter().map(|x| x.0.clone()))
            .collect();
        names.sort();
        names.dedup();
        let (mut total_t, mut total_n) = (0u64, 0u64);
        for name in names {
            let (t, n) = rs
                .iter()
                .flat_map(|p| p.cost.progs.iter().filter(|x| x.0 == name))
                .fold((0u64, 0u64), |(t, n), x| (t + x.1, n + x.2));
            total_t += t;
            total_n += n;
            let _ = writeln!(
                md,
                "| {} | `{name}` | {n} | {:.2} | {:.0} |",
                mode.label(),
                n as f64 / requests,
                t as f64 / n.max(1) as f64
            );
        }
        let _ = writeln!(
            md,
            "| {} | all | {total_n} | {:.2} | {:.0} (= {:.2} µs of BPF per request) |",
            mode.label(),
            total_n as f64 / requests,
            total_t as f64 / total_n.max(1) as f64,
            total_t as f64 / requests / 1000.0
        );
    }

    for r in stats_runs {
        let off: Vec<f64> = results
            .iter()
            .filter(|p| p.mode == r.mode)
            .map(|p| p.without.rps)
            .collect();
        let _ = writeln!(
            md,
            "\n{} with the statistics on: {:.0} req/s ({:.3} of the mean without), agent {:.1}% of a core.",
            r.mode.label(),
            r.wrk.rps,
            r.wrk.rps / mean(&off),
            r.cost.cpu_pct
        );
    }

    let _ = writeln!(md, "\n<details><summary>Raw runs</summary>\n");
    let _ = writeln!(
        md,
        "| mode | pair | req/s without | req/s with | p50 without/with (ms) | p99 without/with (ms) | errors without/with | agent CPU |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for (i, p) in results.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.3} / {:.3} | {:.3} / {:.3} | {} / {} | {:.1}% |",
            p.mode.label(),
            i % pairs.max(1) as usize + 1,
            p.without.rps,
            p.with.rps,
            p.without.lat_p50_ms,
            p.with.lat_p50_ms,
            p.without.lat_p99_ms,
            p.with.lat_p99_ms,
            p.without.errors,
            p.with.errors,
            p.cost.cpu_pct
        );
    }
    let _ = writeln!(md, "\n</details>");
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let out = "Running 2s test @ http://127.0.0.1:8080/\n  1 threads and 32 connections\n\
  Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
    Latency   313.18us  275.76us  12.82ms   94.62%\n\
    Req/Sec    20.49k     1.92k   22.50k    84.00%\n\
  Latency Distribution\n     50%  280.00us\n     75%  400.00us\n     90%  500.00us\n     99%    1.20ms\n\
  40000 requests in 2.00s, 5.00MB read\n\
  Socket errors: connect 0, read 2, write 0, timeout 1\n\
Requests/sec:  20401.34\nTransfer/sec:      2.50MB\n";
        let w = parse_wrk(out).expect("parsed");
        assert!((w.rps - 20401.34).abs() < 1e-6);
        assert!((w.lat_avg_ms - 0.31318).abs() < 1e-9);
        assert!((w.lat_p50_ms - 0.28).abs() < 1e-9);
        assert!((w.lat_p99_ms - 1.2).abs() < 1e-9);
        assert_eq!(w.errors, 3);
    }
}
