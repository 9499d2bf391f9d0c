//! Reaction time: from the target's last connection close to what a
//! deploy script sees, `gracewatch drain` and `gracewatch wait` against
//! the polling loop a deploy script would use (`ss -Htnp state
//! established` filtered by pid, every 100 ms and every 1 s, then `kill`).
//! Two intervals per drain: last close → the target receives its SIGTERM
//! (`drain` and the polling loops), and last close → the watcher process
//! exits (all four: the moment a deploy script's next step can run).
//!
//! The target is `tests/programs/server.py` in a network namespace, holding
//! 3 connections from `client.py`; it never reads or writes them (so a
//! kernel side that attributes connections at their first I/O learns them
//! from its rescans and the gate's fd look). The times are on
//! CLOCK_MONOTONIC: `closedat 3 T` printed by the target right after its
//! last `close()`; `signal TERM T` when its signal thread takes the signal
//! (it blocks the signals and waits in `sigwaitinfo`, so that is the
//! delivery time); the watcher's exit is seen by the benchmark, its parent,
//! polling a pidfd opened when the watcher started, then reaped. The closes
//! start at a random 100-1100 ms after the watcher is ready, so the polling
//! loops' phase is uniformly random. The methods take turns, drain after
//! drain.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{
    Ctx, ExitClock, Netns, Output, Proc, Rng, Row, Which, check_interrupted, netns, percentile,
    verdict,
};
use xtask::cmd::command;

const CONNECTIONS: u32 = 3;
const PORT: u16 = 9100;
const GOAL_P99_MS: f64 = 5.0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    Drain,
    Wait,
    Poll(u32),
}

impl Method {
    fn label(self) -> String {
        match self {
            Method::Drain => "`gracewatch drain`".to_owned(),
            Method::Wait => "`gracewatch wait`".to_owned(),
            Method::Poll(ms) if ms >= 1000 => format!("`ss -tnp` poll every {} s", ms / 1000),
            Method::Poll(ms) => format!("`ss -tnp` poll every {ms} ms"),
        }
    }

    /// Does this method signal the target?
    fn signals(self) -> bool {
        self != Method::Wait
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
    /// Last close → SIGTERM delivered (methods that signal).
    signal_ns: Option<i64>,
    /// Last close → the watcher exited.
    exit_ns: i64,
    /// The signal came from the watcher we started (its pid), or no
    /// signal was due and none came.
    from_watcher: bool,
    /// Connections the target still had open when it got the signal (0
    /// when none was due).
    open_at_signal: u32,
}

pub fn run(ctx: &Ctx, drains: u32) -> Result<Output> {
    let ns = netns("reaction")?;
    let methods = [
        Method::Drain,
        Method::Wait,
        Method::Poll(100),
        Method::Poll(1000),
    ];
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
        Method::Drain | Method::Wait => {
            let mut c = command(&ctx.bin);
            c.args([
                if method == Method::Drain {
                    "drain"
                } else {
                    "wait"
                },
                "--pid",
                &pid.to_string(),
                "--json",
                "--timeout",
                "60s",
            ]);
            let mut p = Proc::spawn("gracewatch", &mut c, Some(&log))?;
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
    let exit_clock = ExitClock::open(&watcher)?;

    let first = 100 + rng.below(1000);
    server.send(&format!("closeafter {first} {} {}", first + 20, first + 40))?;
    let (exited_ns, status) = exit_clock.wait(&mut watcher, Duration::from_secs(30))?;
    if !status.success() {
        bail!("the watcher exited with {status}");
    }
    let closed = server.expect(Duration::from_secs(10), |l| {
        l.starts_with(&format!("closedat {CONNECTIONS} "))
    })?;
    let closed_ns: i64 = closed
        .split_whitespace()
        .nth(2)
        .and_then(|t| t.parse().ok())
        .context("bad closedat line")?;
    if !method.signals() {
        // `wait` signals nothing: the target must still run, untouched.
        server.send("ping")?;
        let reply = server.expect(Duration::from_secs(10), |l| {
            l == "pong" || l.starts_with("signal ")
        })?;
        return Ok(Sample {
            method,
            signal_ns: None,
            exit_ns: exited_ns - closed_ns,
            from_watcher: reply == "pong",
            open_at_signal: 0,
        });
    }
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
    Ok(Sample {
        method,
        signal_ns: Some(signal_ns - closed_ns),
        exit_ns: exited_ns - closed_ns,
        from_watcher: from == watcher.pid(),
        open_at_signal,
    })
}

/// p50, p90, p99, max, mean of `v` (ms), sorted in place.
fn stats(v: &mut [f64]) -> [f64; 5] {
    v.sort_by(f64::total_cmp);
    [
        percentile(v, 50.0),
        percentile(v, 90.0),
        percentile(v, 99.0),
        v.last().copied().unwrap_or(f64::NAN),
        super::mean(v),
    ]
}

fn report(methods: &[Method], samples: &[Sample], drains: u32) -> Output {
    let mut md = String::new();
    let mut rows = Vec::new();
    let _ = writeln!(
        md,
        "{drains} drains per method, taking turns. Target: `tests/programs/server.py` in a network \
         namespace, holding {CONNECTIONS} connections it never reads or writes, closing them 20 ms \
         apart starting at a random 100-1100 ms. Times on CLOCK_MONOTONIC from right after the \
         target's last `close()`: **→ signal** = when its SIGTERM was delivered (its \
         `sigwaitinfo` thread); **→ exit** = when the watcher process exited (seen by the \
         benchmark, its parent, on a pidfd; then reaped): what a deploy script waiting for the \
         command sees. `gracewatch wait` signals nothing (it must leave the target untouched).\n"
    );
    let _ = writeln!(
        md,
        "| method | interval | drains | p50 | p90 | p99 | max | mean | right signal, 0 open |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut p99s = Vec::new();
    let mut p50s = Vec::new();
    for &m in methods {
        let ss: Vec<&Sample> = samples.iter().filter(|s| s.method == m).collect();
        let ok = ss
            .iter()
            .filter(|s| s.from_watcher && s.open_at_signal == 0)
            .count();
        let intervals: [(&str, Vec<f64>); 2] = [
            (
                "→ signal",
                ss.iter()
                    .filter_map(|s| s.signal_ns)
                    .map(|n| n as f64 / 1e6)
                    .collect(),
            ),
            (
                "→ exit",
                ss.iter().map(|s| s.exit_ns as f64 / 1e6).collect(),
            ),
        ];
        for (what, mut v) in intervals {
            if v.is_empty() {
                continue;
            }
            let [p50, p90, p99, max, mean] = stats(&mut v);
            let _ = writeln!(
                md,
                "| {} | {what} | {} | {} | {} | {} | {} | {} | {ok}/{} |",
                m.label(),
                v.len(),
                ms(p50),
                ms(p90),
                ms(p99),
                ms(max),
                ms(mean),
                ss.len()
            );
            p99s.push((m, what, p99));
            p50s.push((m, what, p50));
        }
    }
    let find = |v: &[(Method, &str, f64)], m: Method, what: &str| {
        v.iter()
            .find(|x| x.0 == m && x.1 == what)
            .map(|x| x.2)
            .unwrap_or(f64::NAN)
    };
    let _ = writeln!(md, "\nRatios (polling ÷ `gracewatch drain`):\n");
    for &m in methods.iter().filter(|m| matches!(m, Method::Poll(_))) {
        for what in ["→ signal", "→ exit"] {
            let _ = writeln!(
                md,
                "- {} {what}: p50 {:.0}x, p99 {:.0}x slower",
                m.label(),
                find(&p50s, m, what) / find(&p50s, Method::Drain, what),
                find(&p99s, m, what) / find(&p99s, Method::Drain, what)
            );
        }
    }
    let sig99 = find(&p99s, Method::Drain, "→ signal");
    let drain_exit99 = find(&p99s, Method::Drain, "→ exit");
    let wait_exit99 = find(&p99s, Method::Wait, "→ exit");
    let exit_met = drain_exit99 < GOAL_P99_MS && wait_exit99 < GOAL_P99_MS;
    let _ = writeln!(
        md,
        "\nGoals: last close → signal p99 under {GOAL_P99_MS} ms — {} (`drain` p99 {}); last close \
         → process exit p99 under {GOAL_P99_MS} ms — {} (`wait` p99 {}, `drain` p99 {}).",
        verdict(sig99 < GOAL_P99_MS),
        ms(sig99),
        verdict(exit_met),
        ms(wait_exit99),
        ms(drain_exit99)
    );
    let poll = |what| {
        format!(
            "`ss` polling every 100 ms: p99 {}, every 1 s: p99 {}",
            ms(find(&p99s, Method::Poll(100), what)),
            ms(find(&p99s, Method::Poll(1000), what))
        )
    };
    rows.push(Row::new(
        Which::Reaction,
        "last close → SIGTERM received (`drain`), p99",
        "< 5 ms",
        format!(
            "**{}** (p50 {}); {}",
            ms(sig99),
            ms(find(&p50s, Method::Drain, "→ signal")),
            poll("→ signal")
        ),
        verdict(sig99 < GOAL_P99_MS),
    ));
    rows.push(Row::new(
        Which::Reaction,
        "last close → `wait` / `drain` process exit (deploy-script view), p99",
        "< 5 ms",
        format!(
            "`wait` **{}** (p50 {}), `drain` **{}** (p50 {}); {}",
            ms(wait_exit99),
            ms(find(&p50s, Method::Wait, "→ exit")),
            ms(drain_exit99),
            ms(find(&p50s, Method::Drain, "→ exit")),
            poll("→ exit")
        ),
        verdict(exit_met),
    ));
    let _ = writeln!(
        md,
        "\n<details><summary>Raw samples (ms, in run order)</summary>\n"
    );
    for &m in methods {
        let raw = |f: &dyn Fn(&Sample) -> Option<i64>| {
            samples
                .iter()
                .filter(|s| s.method == m)
                .filter_map(f)
                .map(|n| format!("{:.3}", n as f64 / 1e6))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if m.signals() {
            let _ = writeln!(md, "- {} → signal: {}", m.label(), raw(&|s| s.signal_ns));
        }
        let _ = writeln!(md, "- {} → exit: {}", m.label(), raw(&|s| Some(s.exit_ns)));
    }
    let _ = writeln!(md, "\n</details>");
    (md, rows)
}

fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.0} ms")
    }
}
