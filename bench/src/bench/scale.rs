//! Scale: N (default 100,000) established loopback connections in a
//! network namespace, accepted and held by one server process
//! (`bench-helper scale-server`) from clients bound to 127.1.x.y, 1,000
//! per source address. Then:
//!
//! 1. a `gracewatch agent` attached *before* the connections were made
//!    (it learns them from kernel events): time until its status shows all
//!    N, lost events, resident memory (VmHWM) — then it is stopped, so that
//!    its periodic rescans do not skew the timings below;
//! 2. `ss -tanp` (and `ss -tan`, without process info, for reference) on
//!    the same connections, timed, counted against the truth;
//! 3. `gracewatch status --json` from cold start (attach, snapshot, merge),
//!    timed, counted against the truth;
//! 4. a `gracewatch agent` started *after* the connections exist (it learns
//!    them from its startup snapshot): time to ready, exact count, VmHWM;
//! 5. the connection list a drain asks for (how many the servers hold and
//!    the 10 oldest), timed inside the monitor of a `gracewatch wait` on
//!    the servers: what a drain pays per progress tick and at its deadline.

use std::{
    fmt::Write as _,
    io::Read as _,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{Agent, Ctx, Proc, Row, Which, check_interrupted, netns, verdict};
use gracewatch_testkit::procfs;
use xtask::cmd::command;

const PORT: u16 = 9200;
const GOAL_SPEEDUP: f64 = 10.0;
const GOAL_RSS_MB: f64 = 150.0;
const GOAL_LIST_MS: f64 = 200.0;
/// Runs of each timed command (ss -tanp takes tens of seconds at 100k).
const RUNS: usize = 3;

struct Timed {
    secs: Vec<f64>,
    counted: Vec<u64>,
}

impl Timed {
    fn median(&self) -> f64 {
        let mut v = self.secs.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn min(&self) -> f64 {
        self.secs.iter().copied().fold(f64::INFINITY, f64::min)
    }

    fn exact(&self, truth: u64) -> bool {
        self.counted.iter().all(|&c| c == truth)
    }

    fn raw(&self) -> String {
        self.secs
            .iter()
            .zip(&self.counted)
            .map(|(s, c)| format!("{s:.3} s ({c})"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

struct AgentResult {
    ready_s: f64,
    complete_s: f64,
    live: u64,
    lost: u64,
    hwm_mb: f64,
    rss_mb: f64,
}

pub fn run(ctx: &Ctx, n: u32) -> Result<super::Output> {
    let ns = netns("scale")?;
    let log = ctx.dir.join("scale.log");
    // Each process may hold at most the hard RLIMIT_NOFILE (which only
    // CAP_SYS_RESOURCE could raise): split the connections over as many
    // server/client pairs as that takes, one port per server.
    let hard = super::helper::nofile_hard_limit();
    let per_proc = u32::try_from(hard.saturating_sub(1000).max(1000)).unwrap_or(u32::MAX);
    let procs = n.div_ceil(per_proc).max(1);
    let shares: Vec<u32> = (0..procs)
        .map(|i| n / procs + u32::from(i < n % procs))
        .collect();

    let before = Agent::start(ctx, "127.0.0.1:19465", &[], Duration::from_secs(60))?;
    let before_t0 = Instant::now();

    let mut servers = Vec::new();
    for (i, &count) in shares.iter().enumerate() {
        let addr = format!("127.0.0.1:{}", PORT + i as u16);
        let mut server = Proc::spawn(
            "scale-server",
            ns.command(&ctx.me)
                .args(["bench-helper", "scale-server", "--listen", &addr, "--count"])
                .arg(count.to_string()),
            Some(&log),
        )?;
        server.expect(Duration::from_secs(10), |l| l.starts_with("ready "))?;
        servers.push(server);
    }
    let spids: Vec<u32> = servers.iter().map(Proc::pid).collect();
    let t0 = Instant::now();
    let mut clients = Vec::new();
    let mut first_source = 0;
    for (i, &count) in shares.iter().enumerate() {
        let addr = format!("127.0.0.1:{}", PORT + i as u16);
        let mut client = Proc::spawn(
            "scale-client",
            ns.command(&ctx.me)
                .args([
                    "bench-helper",
                    "scale-client",
                    "--connect",
                    &addr,
                    "--count",
                ])
                .arg(count.to_string())
                .args(["--first-source", &first_source.to_string()]),
            Some(&log),
        )?;
        first_source += count.div_ceil(1000);
        client.expect(Duration::from_secs(10), |l| l.starts_with("ready "))?;
        clients.push(client);
    }
    let mut connected = 0u64;
    let mut accepted = 0u64;
    let mut limit_note = None;
    for (client, server) in clients.iter_mut().zip(&mut servers) {
        let done = client.expect(Duration::from_secs(600), |l| l.starts_with("done "))?;
        let c: u64 = done
            .strip_prefix("done connected=")
            .and_then(|v| v.parse().ok())
            .context("bad scale-client line")?;
        if let Some(l) = client.seen.iter().find(|l| l.starts_with("failed ")) {
            limit_note.get_or_insert_with(|| l.clone());
        }
        connected += c;
        // The server accepts the last ones a moment later; if the client
        // stopped short, the server still waits for the rest.
        let line = server.expect(Duration::from_secs(5), |l| {
            l.starts_with("done ") || l == format!("accepted {c}")
        });
        accepted += match line {
            Ok(l) => l
                .rsplit(['=', ' '])
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            Err(_) => c,
        };
    }
    let setup_s = t0.elapsed().as_secs_f64();
    let truth = accepted.min(connected);
    println!(
        "scale: {connected} connected, {accepted} accepted by {procs} server process(es) in \
         {setup_s:.1} s{}",
        limit_note
            .as_deref()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default()
    );

    // 1. The agent that watched them arrive.
    let mut complete_s = f64::NAN;
    let mut live = 0;
    let mut lost = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        check_interrupted()?;
        let status = before.status()?;
        live = live_of(&status, &spids);
        lost = status["lost_events"]
            .as_u64()
            .context("the agent's status has no lost_events")?;
        if live == truth {
            complete_s = before_t0.elapsed().as_secs_f64();
            break;
        }
        super::sleep(Duration::from_millis(100))?;
    }
    let watched = AgentResult {
        ready_s: before.ready_after.as_secs_f64(),
        complete_s,
        live,
        lost,
        hwm_mb: procfs::status_mib(before.pid(), "VmHWM")?,
        rss_mb: procfs::status_mib(before.pid(), "VmRSS")?,
    };
    before.stop()?;
    println!(
        "scale: agent attached before: {} live, {} lost, VmHWM {:.1} MB",
        watched.live, watched.lost, watched.hwm_mb
    );

    // 2. ss.
    let mut ss_p = Timed {
        secs: Vec::new(),
        counted: Vec::new(),
    };
    let mut ss_plain = Timed {
        secs: Vec::new(),
        counted: Vec::new(),
    };
    for _ in 0..RUNS {
        check_interrupted()?;
        let (secs, out) = timed_output(ns.command("ss").arg("-tanp"))?;
        ss_p.secs.push(secs);
        ss_p.counted.push(count_ss(&out, procs, Some(&spids)));
        let (secs, out) = timed_output(ns.command("ss").arg("-tan"))?;
        ss_plain.secs.push(secs);
        ss_plain.counted.push(count_ss(&out, procs, None));
        println!(
            "scale: ss -tanp {:.2} s ({} for the servers), ss -tan {:.3} s",
            ss_p.secs.last().unwrap_or(&0.0),
            ss_p.counted.last().unwrap_or(&0),
            ss_plain.secs.last().unwrap_or(&0.0)
        );
    }

    // 3. gracewatch status --json from cold.
    let mut gw = Timed {
        secs: Vec::new(),
        counted: Vec::new(),
    };
    for _ in 0..RUNS {
        check_interrupted()?;
        let (secs, out) = timed_output(command(&ctx.bin).args(["status", "--json"]))?;
        let status: serde_json::Value =
            serde_json::from_str(out.trim()).context("status --json printed no JSON")?;
        gw.secs.push(secs);
        gw.counted.push(live_of(&status, &spids));
        println!(
            "scale: gracewatch status --json {secs:.3} s ({} live for the servers)",
            live_of(&status, &spids)
        );
    }

    // 5. The drain's connection list.
    let list = time_connection_list(ctx, &spids)?;
    println!(
        "scale: connection list of the servers ({} connections, 10 oldest): {:.3} ms",
        list.count, list.ms
    );

    // 4. An agent started after them.
    let after = Agent::start(ctx, "127.0.0.1:19465", &[], Duration::from_secs(300))?;
    let status = after.status()?;
    let snap = AgentResult {
        ready_s: after.ready_after.as_secs_f64(),
        complete_s: after.ready_after.as_secs_f64(),
        live: live_of(&status, &spids),
        lost: status["lost_events"]
            .as_u64()
            .context("the agent's status has no lost_events")?,
        hwm_mb: procfs::status_mib(after.pid(), "VmHWM")?,
        rss_mb: procfs::status_mib(after.pid(), "VmRSS")?,
    };
    // Its first periodic rescan at this size: let it run once, then look again.
    super::sleep(Duration::from_secs(5))?;
    let snap_hwm_later = procfs::status_mib(after.pid(), "VmHWM")?;
    after.stop()?;
    drop(clients);
    drop(servers);

    Ok(report(&Report {
        n,
        procs,
        hard,
        truth,
        connected,
        limit_note,
        setup_s,
        watched,
        snap,
        snap_hwm_later,
        ss_p,
        ss_plain,
        gw,
        list,
    }))
}

/// The slowest "count + 10 oldest" query of a drain's gate, in ms, and
/// the count it answered.
struct ListTiming {
    ms: f64,
    count: u64,
}

/// Runs `gracewatch wait` on `pids` until its 1 s timeout (they hold their
/// connections: exit 124) with the monitor's debug log on, and reads the
/// time of each connection-list query it answered from that log.
fn time_connection_list(ctx: &Ctx, pids: &[u32]) -> Result<ListTiming> {
    let mut c = command(&ctx.bin);
    c.env("RUST_LOG", "gracewatch_core::monitor=debug")
        .args(["wait", "--timeout", "1s", "--json"]);
    for p in pids {
        c.args(["--pid", &p.to_string()]);
    }
    let out = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("failed to run gracewatch wait")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(124) {
        bail!(
            "gracewatch wait ended {} (expected 124, the deadline): {stderr}",
            out.status
        );
    }
    let mut worst: Option<ListTiming> = None;
    for line in stderr.lines() {
        let Some(q) = line.split_once("query: ").map(|(_, q)| q) else {
            continue;
        };
        let count = q.split_whitespace().next().and_then(|n| n.parse().ok());
        let ms = q
            .rsplit_once(" listed in ")
            .and_then(|(_, d)| parse_debug_ms(d));
        if let (Some(count), Some(ms)) = (count, ms)
            && worst.as_ref().is_none_or(|w| ms > w.ms)
        {
            worst = Some(ListTiming { ms, count });
        }
    }
    worst.with_context(|| format!("gracewatch wait logged no connection-list query: {stderr}"))
}

/// A `Duration`'s `Debug` form (`850.2µs`, `1.5ms`, `2.1s`, `12ns`) in ms.
fn parse_debug_ms(d: &str) -> Option<f64> {
    let d = d.trim();
    let split = d.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = d.split_at(split);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "ns" => v / 1e6,
        "µs" => v / 1e3,
        "ms" => v,
        "s" => v * 1e3,
        _ => return None,
    })
}

/// Runs `c`, reading all its stdout; (wall seconds, stdout).
fn timed_output(c: &mut std::process::Command) -> Result<(f64, String)> {
    let t0 = Instant::now();
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("failed to start a timed command")?;
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut out)?;
    }
    let status = child.wait()?;
    let secs = t0.elapsed().as_secs_f64();
    if !status.success() {
        bail!("timed command failed ({status})");
    }
    Ok((secs, out))
}

/// Established connections on the servers' local ports in `ss -tan[p]`
/// output, held by one of `pids` when given.
fn count_ss(out: &str, procs: u32, pids: Option<&[u32]>) -> u64 {
    let ports: Vec<String> = (0..procs)
        .map(|i| format!("127.0.0.1:{}", PORT + i as u16))
        .collect();
    let owners: Option<Vec<String>> = pids.map(|p| p.iter().map(|p| format!("pid={p},")).collect());
    out.lines()
        .filter(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.first() == Some(&"ESTAB")
                && w.get(3).is_some_and(|a| ports.iter().any(|p| p == a))
                && owners
                    .as_ref()
                    .is_none_or(|o| o.iter().any(|o| l.contains(o.as_str())))
        })
        .count() as u64
}

/// Live connections of `pids`, summed, in a status object.
fn live_of(status: &serde_json::Value, pids: &[u32]) -> u64 {
    status["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["pid"]
                .as_u64()
                .is_some_and(|x| pids.iter().any(|&q| u64::from(q) == x))
        })
        .filter_map(|p| p["live"].as_u64())
        .sum()
}

struct Report {
    n: u32,
    procs: u32,
    hard: u64,
    truth: u64,
    connected: u64,
    limit_note: Option<String>,
    setup_s: f64,
    watched: AgentResult,
    snap: AgentResult,
    snap_hwm_later: f64,
    ss_p: Timed,
    ss_plain: Timed,
    gw: Timed,
    list: ListTiming,
}

fn report(r: &Report) -> super::Output {
    let mut md = String::new();
    let mut rows = Vec::new();
    let _ = writeln!(
        md,
        "{} established loopback connections asked for, {} made (in {:.1} s) and held in a network \
         namespace by {} server process(es), one port each, from as many client processes bound \
         to 127.1.x.y (1,000 connections per source address). Several processes because a \
         process may hold at most the hard `RLIMIT_NOFILE` ({} here), which only \
         `CAP_SYS_RESOURCE` could raise, and that capability is not in this machine's bounding \
         set.{}\n",
        r.n,
        r.truth,
        r.setup_s,
        r.procs,
        r.hard,
        match &r.limit_note {
            Some(l) => format!(" The client stopped at {}: `{l}`.", r.connected),
            None => String::new(),
        }
    );
    let yes = |b: bool| if b { "yes" } else { "**no**" };
    let _ = writeln!(
        md,
        "| how | wall time, median of {RUNS} (min) | count for the servers | exact | raw runs (count) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---|---|");
    for (label, t, pid_known) in [
        (
            "`gracewatch status --json` (cold: attach, snapshot, merge)",
            &r.gw,
            true,
        ),
        ("`ss -tanp`", &r.ss_p, true),
        (
            "`ss -tan` (no process info: cannot tell whose)",
            &r.ss_plain,
            false,
        ),
    ] {
        let _ = writeln!(
            md,
            "| {label} | {:.3} s ({:.3} s) | {}{} | {} | {} |",
            t.median(),
            t.min(),
            t.counted.first().copied().unwrap_or(0),
            if pid_known { "" } else { " (any process)" },
            yes(t.exact(r.truth)),
            t.raw()
        );
    }
    let speedup = r.ss_p.median() / r.gw.median();
    let _ = writeln!(
        md,
        "\nRatio: `ss -tanp` ÷ `gracewatch status` = **{speedup:.1}x** (medians). Goal: at least \
         {GOAL_SPEEDUP}x faster — {}.\n",
        verdict(speedup >= GOAL_SPEEDUP && r.gw.exact(r.truth))
    );
    rows.push(Row::new(
        Which::Scale,
        &format!("`gracewatch status` vs `ss -tanp`, {} connections", r.truth),
        &format!("≥ {GOAL_SPEEDUP}x faster"),
        format!(
            "**{speedup:.1}x** ({:.3} s vs {:.3} s, medians of {RUNS}); exact: {}",
            r.gw.median(),
            r.ss_p.median(),
            yes(r.gw.exact(r.truth) && r.ss_p.exact(r.truth))
        ),
        verdict(speedup >= GOAL_SPEEDUP && r.gw.exact(r.truth)),
    ));
    let _ = writeln!(
        md,
        "| `gracewatch agent` | ready after | all {} counted after | live for the servers | lost events | VmHWM | VmRSS |",
        r.truth
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    for (label, a) in [
        (
            "attached before the connections (learns them from events)",
            &r.watched,
        ),
        (
            "started after them (learns them from its startup snapshot)",
            &r.snap,
        ),
    ] {
        let _ = writeln!(
            md,
            "| {label} | {:.3} s | {} | {} | {} | {:.1} MB | {:.1} MB |",
            a.ready_s,
            if a.complete_s.is_nan() {
                "never (2 min)".to_owned()
            } else {
                format!("{:.3} s", a.complete_s)
            },
            a.live,
            a.lost,
            a.hwm_mb,
            a.rss_mb
        );
    }
    let worst = r.watched.hwm_mb.max(r.snap.hwm_mb).max(r.snap_hwm_later);
    let _ = writeln!(
        md,
        "\n(The agent started after: VmHWM {:.1} MB 5 s later, after its first periodic rescan.) \
         The first agent's \"all counted after\" runs from its start, so it includes the {:.1} s \
         the clients took to connect.\n",
        r.snap_hwm_later, r.setup_s
    );
    let _ = writeln!(
        md,
        "Goal: agent under {GOAL_RSS_MB} MB RSS holding them — {} (peak VmHWM {worst:.1} MB).",
        verdict(worst < GOAL_RSS_MB)
    );
    rows.push(Row::new(
        Which::Scale,
        &format!("agent memory holding {}", r.truth),
        &format!("< {GOAL_RSS_MB} MB"),
        format!(
            "**{:.1} MB** attached before; {:.1} MB peak started after",
            r.watched.hwm_mb,
            r.snap.hwm_mb.max(r.snap_hwm_later)
        ),
        verdict(worst < GOAL_RSS_MB),
    ));
    let _ = writeln!(
        md,
        "\nList the connections of the processes holding them (what a drain asks at each \
         progress tick and at its deadline: how many, and the 10 oldest), timed in the monitor of \
         a `gracewatch wait` on the servers: **{:.3} ms** for {} connections (slowest of its \
         queries). Goal: under {GOAL_LIST_MS} ms — {}.",
        r.list.ms,
        r.list.count,
        verdict(r.list.ms < GOAL_LIST_MS && r.list.count == r.truth)
    );
    rows.push(Row::new(
        Which::Scale,
        &format!(
            "a drain's connection list (count + 10 oldest) at {}",
            r.truth
        ),
        &format!("< {GOAL_LIST_MS} ms"),
        format!("**{:.3} ms** for {} connections", r.list.ms, r.list.count),
        verdict(r.list.ms < GOAL_LIST_MS && r.list.count == r.truth),
    ));
    (md, rows)
}

#[cfg(test)]
mod tests {
    use super::parse_debug_ms;

    #[test]
    fn debug_durations_parse_to_ms() {
        assert_eq!(parse_debug_ms("1.5ms"), Some(1.5));
        assert_eq!(parse_debug_ms("850µs"), Some(0.85));
        assert_eq!(parse_debug_ms("2s"), Some(2000.0));
        assert_eq!(parse_debug_ms("12ns"), Some(0.000012));
        assert_eq!(parse_debug_ms("soon"), None);
    }
}
