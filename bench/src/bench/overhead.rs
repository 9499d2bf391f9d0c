//! Overhead on the server: Debian's nginx (one worker, `return 200`, the
//! cheapest request it serves, so the per-connection cost of the programs
//! weighs the most) under `wrk` (one thread), with and without `gracewatch
//! agent` running. Two modes: short-lived connections (`Connection:
//! close`, one connection per request: the highest connection rate this
//! machine reaches, where the tracepoints fire most) and keep-alive. Runs
//! are interleaved in pairs, the order alternating (off/on, on/off, …), so
//! drift on the VM hits both sides alike; the loss is reported with a 95 %
//! confidence interval (Student t over the per-pair losses), since on a
//! shared VM one pair can move by more than the effect.
//!
//! The agent runs as deployed (BPF run-time statistics off). What its
//! programs and its process cost per connection is the [`super::cost`]
//! benchmark's job. The nginx and `wrk` set-up here is shared with it.

use std::{fmt::Write as _, fs, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{
    Agent, Ctx, Netns, Output, Proc, Row, Which, check_interrupted, cpu_time, mean, netns, stddev,
};
use xtask::cmd;

const PORT: u16 = 8080;
const AGENT_LISTEN: &str = "127.0.0.1:19464";
const GOAL_CLOSE_LOSS_PCT: f64 = 2.0;
const GOAL_KEEPALIVE_LOSS_PCT: f64 = 0.5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Close,
    KeepAlive,
}

impl Mode {
    pub(super) fn label(self) -> &'static str {
        match self {
            Mode::Close => "short-lived (`Connection: close`)",
            Mode::KeepAlive => "keep-alive",
        }
    }

    pub(super) fn connections(self) -> &'static str {
        match self {
            Mode::Close => "32",
            Mode::KeepAlive => "64",
        }
    }

    fn goal_loss_pct(self) -> f64 {
        match self {
            Mode::Close => GOAL_CLOSE_LOSS_PCT,
            Mode::KeepAlive => GOAL_KEEPALIVE_LOSS_PCT,
        }
    }
}

/// One wrk run.
#[derive(Clone, Debug, Default)]
pub(super) struct Wrk {
    /// Requests completed (with `Connection: close`, one connection each).
    pub(super) requests: u64,
    pub(super) rps: f64,
    lat_avg_ms: f64,
    lat_p50_ms: f64,
    lat_p99_ms: f64,
    pub(super) errors: u64,
}

/// One run with the agent: what its process cost.
#[derive(Clone, Debug, Default)]
struct AgentCost {
    /// The agent's own CPU time over the run, as a share of one core.
    cpu_pct: f64,
}

struct Pair {
    mode: Mode,
    without: Wrk,
    with: Wrk,
    cost: AgentCost,
}

/// Debian's nginx (one worker, `return 200`) serving 127.0.0.1:[`PORT`]
/// in `ns`, answering (a short `wrk` run succeeded); killed on drop.
pub(super) fn start_nginx(ctx: &Ctx, ns: &Netns) -> Result<Proc> {
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
    let nginx = Proc::spawn_group(
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
    for _ in 0..20 {
        super::sleep(Duration::from_millis(250))?;
        if wrk(ns, Mode::KeepAlive, 1).is_ok_and(|w| w.rps > 0.0) {
            return Ok(nginx);
        }
    }
    bail!(
        "nginx does not answer on 127.0.0.1:{PORT}; see {}",
        log.display()
    )
}

pub fn run(ctx: &Ctx, pairs: u32, secs: u32) -> Result<Output> {
    let ns = netns("overhead")?;
    let _nginx = start_nginx(ctx, &ns)?;
    let mut results = Vec::new();
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
    }
    Ok(report(&results, pairs, secs))
}

fn with_agent(ctx: &Ctx, ns: &Netns, mode: Mode, secs: u32) -> Result<(Wrk, AgentCost)> {
    let mut agent = Agent::start(ctx, AGENT_LISTEN, &[], Duration::from_secs(30))?;
    let cpu0 = cpu_time(agent.pid()).unwrap_or_default();
    let w = wrk(ns, mode, secs)?;
    let cpu1 = cpu_time(agent.pid()).unwrap_or_default();
    agent.ensure_running()?;
    agent.stop()?;
    Ok((
        w,
        AgentCost {
            cpu_pct: (cpu1.saturating_sub(cpu0)).as_secs_f64() / f64::from(secs) * 100.0,
        },
    ))
}

pub(super) fn wrk(ns: &Netns, mode: Mode, secs: u32) -> Result<Wrk> {
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
            [n, "requests", "in", ..] => w.requests = n.parse().ok()?,
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

/// The 97.5 % quantile of Student's t with `df` degrees of freedom (a 95 %
/// two-sided interval).
pub(super) fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => T[df - 1],
        31..=60 => 2.000,
        _ => 1.960,
    }
}

/// Mean and the half-width of its 95 % confidence interval.
pub(super) fn mean_ci(v: &[f64]) -> (f64, f64) {
    let half = t975(v.len().saturating_sub(1)) * stddev(v) / (v.len() as f64).sqrt();
    (mean(v), half)
}

/// A loss goal against a confidence interval: met only if the whole
/// interval is under it; missed only if the whole interval is above.
pub(super) fn ci_verdict(mean: f64, half: f64, goal: f64) -> &'static str {
    if mean + half < goal {
        "met"
    } else if mean - half > goal {
        "**missed**"
    } else {
        "**not resolved** (the interval contains the goal)"
    }
}

fn report(results: &[Pair], pairs: u32, secs: u32) -> Output {
    let mut md = String::new();
    let mut rows = Vec::new();
    let _ = writeln!(
        md,
        "nginx-light, 1 worker, `return 200 \"ok\"`, in a network namespace; `wrk -t1 --latency` \
         ({secs} s per run; 32 connections for `Connection: close`, 64 for keep-alive); {pairs} \
         interleaved pairs per mode, order alternating. \"with\" = `gracewatch agent` running \
         (default options: BPF run-time statistics off, 4 MiB ring buffer), started and ready \
         before the run. req/s: mean ± standard deviation over the runs. Loss per pair = 1 − \
         with ÷ without; reported as the mean over the pairs with its 95 % confidence interval \
         (Student t, n − 1 degrees of freedom).\n"
    );
    let _ = writeln!(
        md,
        "| mode | pairs | req/s without | req/s with | loss, mean [95 % CI] | per-pair loss min–max | p50 latency without → with | p99 latency without → with | agent CPU | goal |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut goals = Vec::new();
    for mode in [Mode::Close, Mode::KeepAlive] {
        let rs: Vec<&Pair> = results.iter().filter(|p| p.mode == mode).collect();
        if rs.is_empty() {
            continue;
        }
        let col = |f: &dyn Fn(&Pair) -> f64| rs.iter().map(|p| f(p)).collect::<Vec<f64>>();
        let (off, on) = (col(&|p| p.without.rps), col(&|p| p.with.rps));
        let losses = col(&|p| (1.0 - p.with.rps / p.without.rps) * 100.0);
        let (loss, half) = mean_ci(&losses);
        let goal = mode.goal_loss_pct();
        let v = ci_verdict(loss, half, goal);
        let lo = losses.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} ± {:.0} | {:.0} ± {:.0} | **{loss:.2} %** [{:.2}, {:.2}] | {lo:.2} – {hi:.2} % | {:.3} → {:.3} ms | {:.3} → {:.3} ms | {:.1}% of a core | < {goal} %: {v} |",
            mode.label(),
            rs.len(),
            mean(&off),
            stddev(&off),
            mean(&on),
            stddev(&on),
            loss - half,
            loss + half,
            mean(&col(&|p| p.without.lat_p50_ms)),
            mean(&col(&|p| p.with.lat_p50_ms)),
            mean(&col(&|p| p.without.lat_p99_ms)),
            mean(&col(&|p| p.with.lat_p99_ms)),
            mean(&col(&|p| p.cost.cpu_pct)),
        );
        rows.push(Row::new(
            Which::Overhead,
            &format!("nginx throughput loss, {}", mode.label()),
            &format!("< {goal} %"),
            format!(
                "**{loss:.2} %** [95 % CI {:.2} to {:.2}] over {} pairs at {:.0} req/s",
                loss - half,
                loss + half,
                rs.len(),
                mean(&off)
            ),
            v,
        ));
        goals.push(format!(
            "{}: loss {loss:.2} % ± {half:.2} (goal < {goal} %) — {v}",
            mode.label()
        ));
    }
    let _ = writeln!(md, "\nGoals: {}.", goals.join("; "));

    let _ = writeln!(md, "\n<details><summary>Raw runs</summary>\n");
    let _ = writeln!(
        md,
        "| mode | pair | req/s without | req/s with | loss | p50 without/with (ms) | p99 without/with (ms) | errors without/with | agent CPU |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, p) in results.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.2} % | {:.3} / {:.3} | {:.3} / {:.3} | {} / {} | {:.1}% |",
            p.mode.label(),
            i % pairs.max(1) as usize + 1,
            p.without.rps,
            p.with.rps,
            (1.0 - p.with.rps / p.without.rps) * 100.0,
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
    (md, rows)
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
        assert_eq!(w.requests, 40000);
    }

    #[test]
    fn confidence_intervals_use_student_t() {
        // n = 2: t(1) = 12.706, sd of [0, 2] = sqrt(2), half = 12.706.
        let (m, half) = mean_ci(&[0.0, 2.0]);
        assert!((m - 1.0).abs() < 1e-12);
        assert!((half - 12.706).abs() < 1e-9);
        assert_eq!(ci_verdict(1.0, 0.5, 2.0), "met");
        assert_eq!(ci_verdict(3.0, 0.5, 2.0), "**missed**");
        assert!(ci_verdict(2.0, 0.5, 2.0).contains("not resolved"));
    }
}
