//! Reaction time: from the target's last connection close to the target
//! receiving its SIGTERM, `gracewatch drain` against the polling loop a
//! deploy script would use (`ss -Htnp state established` filtered by pid,
//! every 100 ms and every 1 s, then `kill`).
//!
//! The target is `tests/programs/server.py` in a network namespace, holding
//! 3 connections from `client.py`. Both ends of the interval are taken by
//! the target itself on CLOCK_MONOTONIC: `closedat 3 T` right after its last
//! `close()`, and `signal TERM T` when its signal thread takes the signal
//! (it blocks the signals and waits in `sigwaitinfo`, so that is the
//! delivery time). The closes start at a random 100-1100 ms after the
//! watcher is ready, so the polling loops' phase is uniformly random. The
//! methods take turns, drain after drain.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{Ctx, Netns, Proc, Rng, check_interrupted, netns, percentile, verdict};
use xtask::cmd::command;

const CONNECTIONS: u32 = 3;
const PORT: u16 = 9100;
const GOAL_P99_MS: f64 = 5.0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    Gracewatch,
    Poll(u32),
}

impl Method {
    fn label(self) -> String {
        match self {
            Method::Gracewatch => "`gracewatch drain`".to_owned(),
            Method::Poll(ms) if ms >= 1000 => format!("`ss -tnp` poll every {} s", ms / 1000),
            Method::Poll(ms) => format!("`ss -tnp` poll every {ms} ms"),
        }
    }
}

/// A deploy script's polling loop, bounded to 10 minutes of polls.
const POLL_SCRIPT: &str = r#"pid=$1; period=$2; polls=$3
i=0
while [ "$i" -lt "$polls" ]; do
  ss -Htnp state established | grep -q "pid=$pid," || { kill -TERM "$pid"; exit 0; }
  sleep "$period"
  i=$((i + 1))
done
exit 124"#;

struct Sample {
    method: Method,
    reaction_ns: i64,
    /// The signal came from the watcher we started (its pid).
    from_watcher: bool,
    /// Connections the target still had open when it got the signal.
    open_at_signal: u32,
}

pub fn run(ctx: &Ctx, drains: u32) -> Result<String> {
    let ns = netns("reaction")?;
    let methods = [Method::Gracewatch, Method::Poll(100), Method::Poll(1000)];
    let mut rng = Rng::new();
    let mut samples: Vec<Sample> = Vec::new();
    for i in 0..drains {
        for k in 0..methods.len() {
            check_interrupted()?;
            // Rotate the order so no method always runs right after another.
            let method = methods[(i as usize + k) % methods.len()];
            let s = one_drain(ctx, &ns, method, &mut rng)
                .with_context(|| format!("drain {} with {}", i + 1, method.label()))?;
            samples.push(s);
        }
        if (i + 1) % 10 == 0 || i + 1 == drains {
            println!("reaction: {}/{drains} rounds", i + 1);
        }
    }
    Ok(report(&methods, &samples, drains))
}

fn one_drain(ctx: &Ctx, ns: &Netns, method: Method, rng: &mut Rng) -> Result<Sample> {
    let log = ctx.dir.join("reaction.log");
    let mut server = Proc::spawn(
        "server.py",
        ns.command("python3")
            .arg(ctx.program("server.py"))
            .args(["--listen", &format!("127.0.0.1:{PORT}")]),
        Some(&log),
    )?;
    let ready = server.expect(Duration::from_secs(10), |l| l.starts_with("ready "))?;
    let pid: u32 = ready
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .context("server.py printed no pid")?;
    let mut client = Proc::spawn(
        "client.py",
        ns.command("python3").arg(ctx.program("client.py")).args([
            "--connect",
            &format!("127.0.0.1:{PORT}"),
            "--n",
            &CONNECTIONS.to_string(),
        ]),
        Some(&log),
    )?;
    client.expect(Duration::from_secs(10), |l| {
        l == format!("connected {CONNECTIONS}")
    })?;
    server.expect(Duration::from_secs(10), |l| {
        l == format!("accepted {CONNECTIONS}")
    })?;

    let mut watcher = match method {
        Method::Gracewatch => {
            let mut c = command(&ctx.bin);
            c.args([
                "drain",
                "--pid",
                &pid.to_string(),
                "--json",
                "--timeout",
                "60s",
            ]);
            let mut p = Proc::spawn("gracewatch drain", &mut c, Some(&log))?;
            // The first progress line comes once the programs are attached
            // and the snapshot is merged: from then on it watches.
            p.expect(Duration::from_secs(20), |l| {
                l.contains(r#""type":"progress""#)
            })?;
            p
        }
        Method::Poll(ms) => {
            let period = format!("{:.3}", f64::from(ms) / 1000.0);
            let polls = (600_000 / ms).to_string();
            Proc::spawn(
                "polling script",
                ns.command("sh").args(["-c", POLL_SCRIPT, "poll"]).args([
                    &pid.to_string(),
                    &period,
                    &polls,
                ]),
                Some(&log),
            )?
        }
    };

    let first = 100 + rng.below(1000);
    server.send(&format!("closeafter {first} {} {}", first + 20, first + 40))?;
    let closed = server.expect(Duration::from_secs(10), |l| {
        l.starts_with(&format!("closedat {CONNECTIONS} "))
    })?;
    let closed_ns: i64 = closed
        .split_whitespace()
        .nth(2)
        .and_then(|t| t.parse().ok())
        .context("bad closedat line")?;
    let sig = server.expect(Duration::from_secs(30), |l| l.starts_with("signal "))?;
    // signal TERM <ns> open=<n> from=<pid>
    let words: Vec<&str> = sig.split_whitespace().collect();
    if words.get(1) != Some(&"TERM") {
        bail!("the target got {sig:?}, not SIGTERM");
    }
    let signal_ns: i64 = words
        .get(2)
        .and_then(|t| t.parse().ok())
        .context("bad signal line")?;
    let field = |key: &str| {
        words
            .iter()
            .find_map(|w| w.strip_prefix(key)?.parse::<u32>().ok())
    };
    let open_at_signal = field("open=").unwrap_or(u32::MAX);
    let from = field("from=").unwrap_or(0);
    let status = watcher
        .wait_timeout(Duration::from_secs(10))?
        .context("the watcher did not exit after signalling")?;
    if !status.success() {
        bail!("the watcher exited with {status}");
    }
    Ok(Sample {
        method,
        reaction_ns: signal_ns - closed_ns,
        from_watcher: from == watcher.pid(),
        open_at_signal,
    })
}

fn report(methods: &[Method], samples: &[Sample], drains: u32) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "{drains} drains per method, taking turns. Target: `tests/programs/server.py` in a network \
         namespace, holding {CONNECTIONS} connections, closing them 20 ms apart starting at a random \
         100-1100 ms; reaction = target's CLOCK_MONOTONIC when its SIGTERM was delivered − right \
         after its last `close()`.\n"
    );
    let _ = writeln!(
        md,
        "| method | drains | p50 | p90 | p99 | max | mean | signal from the watcher, 0 open |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut stats = Vec::new();
    for &m in methods {
        let mut v: Vec<f64> = samples
            .iter()
            .filter(|s| s.method == m)
            .map(|s| s.reaction_ns as f64 / 1e6)
            .collect();
        v.sort_by(f64::total_cmp);
        let ok = samples
            .iter()
            .filter(|s| s.method == m && s.from_watcher && s.open_at_signal == 0)
            .count();
        let (p50, p90, p99) = (
            percentile(&v, 50.0),
            percentile(&v, 90.0),
            percentile(&v, 99.0),
        );
        let max = v.last().copied().unwrap_or(f64::NAN);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {ok}/{} |",
            m.label(),
            v.len(),
            ms(p50),
            ms(p90),
            ms(p99),
            ms(max),
            ms(super::mean(&v)),
            v.len()
        );
        stats.push((m, p50, p99, v));
    }
    let gw = stats.iter().find(|s| s.0 == Method::Gracewatch);
    if let Some((_, gp50, gp99, _)) = gw {
        let _ = writeln!(md, "\nRatios (polling ÷ gracewatch):\n");
        for (m, p50, p99, _) in stats.iter().filter(|s| s.0 != Method::Gracewatch) {
            let _ = writeln!(
                md,
                "- {}: p50 {:.0}x, p99 {:.0}x slower",
                m.label(),
                p50 / gp50,
                p99 / gp99
            );
        }
        let _ = writeln!(
            md,
            "\nGoal: p99 under {GOAL_P99_MS} ms — {} (p99 {}).",
            verdict(*gp99 < GOAL_P99_MS),
            ms(*gp99)
        );
    }
    let _ = writeln!(
        md,
        "\n<details><summary>Raw samples (ms, in run order)</summary>\n"
    );
    for (m, _, _, _) in &stats {
        let raw: Vec<String> = samples
            .iter()
            .filter(|s| s.method == *m)
            .map(|s| format!("{:.3}", s.reaction_ns as f64 / 1e6))
            .collect();
        let _ = writeln!(md, "- {}: {}", m.label(), raw.join(" "));
    }
    let _ = writeln!(md, "\n</details>");
    md
}

fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.0} ms")
    }
}
