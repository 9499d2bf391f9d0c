//! Churn: the highest connection rate this machine sustains, for 30 s,
//! across an fd-handover restart, with `gracewatch agent` and `gracewatch
//! watch --json` attached at their default ring buffer size (4 MiB). Are
//! kernel events lost, are the final counts exact, and what share of the
//! rate without gracewatch is left (the same script runs without it before
//! and after)? If this `watch` takes `--agent URL`, it reads the agent's
//! unix socket (one kernel side on the host); else it loads its own
//! programs (two), and the report says which.
//!
//! The server is `bench-helper churn-server` (the fd handover of
//! `server.py handover`, in a form that closes what its clients close and
//! keeps up with tens of thousands of connections a second; `server.py`
//! holds every connection until told to close it). Load: closed-loop
//! clients (connect, one byte each way, close), as many as the probe found
//! fastest; plus long-lived connections that make the final counts
//! non-trivial: 100 held by the first generation, a SIGHUP handover at half
//! time, 100 more held by the second, and 50 of the first's closed at three
//! quarters. At the end the server's own exact counts per generation are
//! compared with the agent's `/v1/status`, the last line of `watch
//! --json`, and `ss -tnp`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    Agent, Ctx, Netns, Proc, Row, Which, check_interrupted, cpu_time, mean, netns, signal,
};
use gracewatch_testkit::procfs;
use xtask::cmd::{self, command};

const PORT: u16 = 9300;
const HELD_FIRST: u32 = 100;
const HELD_SECOND: u32 = 100;
const CLOSED_FIRST: u32 = 50;
/// Client (and server) thread counts the probe tries.
const PROBE_THREADS: [u32; 3] = [4, 16, 64];
const PROBE_SECS: u32 = 5;
const GOAL_RATIO: f64 = 0.95;

/// A generation's own counts (its state file).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Truth {
    accepted: u64,
    closed: u64,
    held: u64,
    inflight: u64,
}

/// What one observer (agent, watch, ss) says about a pid.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    live: Option<u64>,
    accepted: Option<u64>,
    closed: Option<u64>,
}

/// One run of the load script (server, held connections, closed-loop
/// clients, the handover at half time and the closes at three quarters).
struct Session {
    server: Proc,
    hold: Proc,
    gen1: u32,
    gen2: u32,
    total: u64,
    errors: u64,
    elapsed: f64,
    per_sec: Vec<u64>,
    handover_at: Option<f64>,
    closed_at: Option<f64>,
}

impl Session {
    fn rate(&self) -> f64 {
        self.total as f64 / self.elapsed
    }
}

fn session(ctx: &Ctx, ns: &Netns, threads: u32, secs: u32, state: &Path) -> Result<Session> {
    let addr = format!("127.0.0.1:{PORT}");
    fs::create_dir_all(state)?;
    let mut server = start_server(ctx, ns, &addr, state, threads)?;
    let gen1 = server.pid();
    let mut hold = Proc::spawn(
        "churn-hold",
        ns.command(&ctx.me)
            .args(["bench-helper", "churn-hold", "--connect", &addr]),
        Some(&ctx.dir.join("churn.log")),
    )?;
    hold.expect(Duration::from_secs(10), |l| l.starts_with("ready "))?;
    hold.send(&format!("open {HELD_FIRST}"))?;
    hold.expect(Duration::from_secs(30), |l| l.starts_with("opened "))?;
    let mut gen2 = None;
    let mut handover_at = None;
    let mut closed_at = None;
    let (total, errors, elapsed, per_sec) = load(ctx, ns, &addr, threads, secs, |t| {
        if handover_at.is_none() && t >= f64::from(secs) / 2.0 {
            signal(gen1, libc::SIGHUP);
            let line = server.expect(Duration::from_secs(10), |l| l.starts_with("child "))?;
            gen2 = line[6..].trim().parse::<u32>().ok();
            wait_for(Duration::from_secs(10), || {
                Ok(read_state(state, gen1)?.1 == Some(false))
            })
            .context("the first generation did not stop accepting")?;
            handover_at = Some(t);
            hold.send(&format!("open {HELD_SECOND}"))?;
            hold.expect(Duration::from_secs(30), |l| l.starts_with("opened "))?;
        }
        if closed_at.is_none() && t >= f64::from(secs) * 0.75 {
            hold.send(&format!("close {CLOSED_FIRST}"))?;
            hold.expect(Duration::from_secs(30), |l| l.starts_with("closed "))?;
            closed_at = Some(t);
        }
        Ok(())
    })?;
    let gen2 = gen2.context("no handover happened (run too short?)")?;
    Ok(Session {
        server,
        hold,
        gen1,
        gen2,
        total,
        errors,
        elapsed,
        per_sec,
        handover_at,
        closed_at,
    })
}

/// Does this `gracewatch watch` take `--agent URL` (use a running agent's
/// kernel side instead of loading its own programs)?
fn watch_takes_agent(ctx: &Ctx) -> bool {
    cmd::output(command(&ctx.bin).args(["watch", "--help"]))
        .is_ok_and(|help| help.contains("--agent"))
}

pub fn run(ctx: &Ctx, secs: u32) -> Result<super::Output> {
    let ns = netns("churn")?;
    let addr = format!("127.0.0.1:{PORT}");

    // Probe: the fastest client concurrency, without gracewatch.
    let mut probe = Vec::new();
    for threads in PROBE_THREADS {
        check_interrupted()?;
        let state = ctx.dir.join(format!("churn-probe-{threads}"));
        fs::create_dir_all(&state)?;
        let _server = start_server(ctx, &ns, &addr, &state, threads)?;
        let (total, errors, elapsed, _) = load(ctx, &ns, &addr, threads, PROBE_SECS, |_| Ok(()))?;
        let rate = total as f64 / elapsed;
        println!("churn: probe {threads} clients: {rate:.0} conn/s ({errors} errors)");
        probe.push((threads, rate, errors));
    }
    let &(threads, probe_rate, _) = probe
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .context("no probe ran")?;

    // The same script without gracewatch, before and after the run with
    // it: the rate it is compared with, bracketing drift.
    let mut without = Vec::new();
    let before = session(ctx, &ns, threads, secs, &ctx.dir.join("churn-without-1"))?;
    println!(
        "churn: without gracewatch: {} connections = {:.0}/s",
        before.total,
        before.rate()
    );
    without.push((before.rate(), before.errors));
    drop(before);

    // The run, with both observers attached.
    let via_agent = watch_takes_agent(ctx);
    let unix = ctx.dir.join("churn-agent.sock");
    let unix_s = unix.to_string_lossy().into_owned();
    let agent = Agent::start(
        ctx,
        "127.0.0.1:19466",
        &["--unix", &unix_s],
        Duration::from_secs(30),
    )?;
    agent.status()?;
    let mut watch_cmd = command(&ctx.bin);
    watch_cmd.args(["watch", "--json"]);
    if via_agent {
        watch_cmd.args(["--agent", &format!("unix:{unix_s}")]);
    }
    let mut watch = Proc::spawn(
        "gracewatch watch",
        &mut watch_cmd,
        Some(&ctx.dir.join("watch.log")),
    )?;
    watch.expect(Duration::from_secs(30), |l| l.starts_with('{'))?;

    let agent_cpu0 = cpu_time(agent.pid()).unwrap_or_default();
    let watch_cpu0 = cpu_time(watch.pid()).unwrap_or_default();
    let sess = session(ctx, &ns, threads, secs, &ctx.dir.join("churn"))?;
    let agent_cpu = cpu_time(agent.pid())
        .unwrap_or_default()
        .saturating_sub(agent_cpu0);
    let watch_cpu = cpu_time(watch.pid())
        .unwrap_or_default()
        .saturating_sub(watch_cpu0);
    let (gen1, gen2) = (sess.gen1, sess.gen2);
    let state = ctx.dir.join("churn");
    println!(
        "churn: {} connections in {:.1} s = {:.0}/s, {} errors",
        sess.total,
        sess.elapsed,
        sess.rate(),
        sess.errors
    );

    // Quiescence: nothing in flight, held connections reaped.
    wait_for(Duration::from_secs(30), || {
        let a = read_state(&state, gen1)?.0;
        let b = read_state(&state, gen2)?.0;
        Ok(a.inflight == 0 && b.inflight == 0)
    })
    .context("the servers did not go quiet")?;
    super::sleep(Duration::from_secs(2))?;
    let truth1 = read_state(&state, gen1)?.0;
    let truth2 = read_state(&state, gen2)?.0;

    let status = agent.status()?;
    let agent_lost = status["lost_events"].as_u64();
    let agent_seen = [seen(&status, gen1), seen(&status, gen2)];
    let agent_hwm = procfs::status_mib(agent.pid(), "VmHWM")?;
    // watch prints a line per change, at most every 100 ms: its last line
    // is the final state. Stop it before the agent it may be reading from.
    let watch_status = watch.stop(Duration::from_secs(10))?;
    agent.stop()?;
    let last = watch
        .lines
        .take()
        .and_then(|rx| rx.try_iter().last())
        .context("no watch output")?;
    let watch_json: serde_json::Value = serde_json::from_str(&last).context("bad watch line")?;
    let watch_lost = watch_json["lost_events"].as_u64();
    let watch_seen = [seen(&watch_json, gen1), seen(&watch_json, gen2)];
    let ss = cmd::output(ns.command("ss").args(["-Htnp", "state", "established"]))?
        + &cmd::output(ns.command("ss").args(["-Htnp", "state", "close-wait"]))?;
    let ss_seen = [gen1, gen2].map(|pid| Seen {
        live: Some(
            ss.lines()
                .filter(|l| {
                    l.split_whitespace()
                        .nth(2)
                        .is_some_and(|a| a.ends_with(&format!(":{PORT}")))
                        && l.contains(&format!("pid={pid},"))
                })
                .count() as u64,
        ),
        ..Seen::default()
    });
    let Session {
        server,
        hold,
        total,
        errors,
        elapsed,
        per_sec,
        handover_at,
        closed_at,
        ..
    } = sess;
    drop(hold);
    drop(server);
    println!("churn: watch exited with {watch_status}");

    check_interrupted()?;
    let after = session(ctx, &ns, threads, secs, &ctx.dir.join("churn-without-2"))?;
    println!(
        "churn: without gracewatch: {} connections = {:.0}/s",
        after.total,
        after.rate()
    );
    without.push((after.rate(), after.errors));
    drop(after);

    let watch_label = if via_agent {
        "`gracewatch watch --json --agent unix:…` (last line)"
    } else {
        "`gracewatch watch --json` (last line)"
    };
    Ok(report(&Report {
        secs,
        probe,
        threads,
        probe_rate,
        without,
        via_agent,
        total,
        errors,
        elapsed,
        per_sec,
        handover_at,
        closed_at,
        gens: [(gen1, truth1), (gen2, truth2)],
        observers: vec![
            ("`gracewatch agent` (`/v1/status`)", agent_lost, agent_seen),
            (watch_label, watch_lost, watch_seen),
            ("`ss -tnp` (established + close-wait)", None, ss_seen),
        ],
        agent_cpu_pct: agent_cpu.as_secs_f64() / elapsed * 100.0,
        watch_cpu_pct: watch_cpu.as_secs_f64() / elapsed * 100.0,
        agent_hwm,
    }))
}

fn start_server(ctx: &Ctx, ns: &Netns, addr: &str, state: &Path, threads: u32) -> Result<Proc> {
    let mut server = Proc::spawn_group(
        "churn-server",
        ns.command(&ctx.me)
            .args([
                "bench-helper",
                "churn-server",
                "--listen",
                addr,
                "--state-dir",
            ])
            .arg(state)
            .args(["--threads", &threads.to_string()]),
        Some(&ctx.dir.join("churn.log")),
    )?;
    server.expect(Duration::from_secs(10), |l| l.starts_with("ready "))?;
    Ok(server)
}

/// Runs the closed-loop clients for `secs`, calling `tick(elapsed)` about
/// every 100 ms; returns (connections, errors, seconds, per-second counts).
fn load(
    ctx: &Ctx,
    ns: &Netns,
    addr: &str,
    threads: u32,
    secs: u32,
    mut tick: impl FnMut(f64) -> Result<()>,
) -> Result<(u64, u64, f64, Vec<u64>)> {
    let mut client = Proc::spawn(
        "churn-client",
        ns.command(&ctx.me).args([
            "bench-helper",
            "churn-client",
            "--connect",
            addr,
            "--threads",
            &threads.to_string(),
            "--secs",
            &secs.to_string(),
        ]),
        Some(&ctx.dir.join("churn.log")),
    )?;
    client.expect(Duration::from_secs(10), |l| l.starts_with("ready "))?;
    let t0 = Instant::now();
    let rx = client.lines.take().context("no client output")?;
    let mut per_sec = Vec::new();
    let deadline = t0 + Duration::from_secs(u64::from(secs) + 30);
    loop {
        check_interrupted()?;
        if Instant::now() > deadline {
            bail!("the churn client did not finish");
        }
        tick(t0.elapsed().as_secs_f64())?;
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let w: Vec<&str> = line.split_whitespace().collect();
                if let ["sec", _, "conns", n, ..] = w.as_slice() {
                    per_sec.push(n.parse().unwrap_or(0));
                } else if let Some(rest) = line.strip_prefix("done ") {
                    let kv: BTreeMap<&str, &str> = rest
                        .split_whitespace()
                        .filter_map(|x| x.split_once('='))
                        .collect();
                    let get =
                        |k: &str| kv.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                    return Ok((
                        get("total") as u64,
                        get("errors") as u64,
                        get("secs"),
                        per_sec,
                    ));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the churn client ended without a summary")
            }
        }
    }
}

fn wait_for(timeout: Duration, mut ok: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ok()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not so after {timeout:?}");
        }
        super::sleep(Duration::from_millis(20))?;
    }
}

/// A generation's counts and whether it still accepts.
fn read_state(dir: &Path, pid: u32) -> Result<(Truth, Option<bool>)> {
    let text = fs::read_to_string(dir.join(pid.to_string())).unwrap_or_default();
    let kv: BTreeMap<&str, u64> = text
        .split_whitespace()
        .filter_map(|x| {
            let (k, v) = x.split_once('=')?;
            Some((k, v.parse().ok()?))
        })
        .collect();
    let get = |k: &str| kv.get(k).copied().unwrap_or(0);
    Ok((
        Truth {
            accepted: get("accepted"),
            closed: get("closed"),
            held: get("held"),
            inflight: get("inflight"),
        },
        kv.get("accepting").map(|&a| a == 1),
    ))
}

fn seen(status: &serde_json::Value, pid: u32) -> Seen {
    let p = status["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["pid"].as_u64() == Some(u64::from(pid)));
    match p {
        Some(p) => Seen {
            live: p["live"].as_u64(),
            accepted: p["accepted_total"].as_u64(),
            closed: p["closed_total"].as_u64(),
        },
        None => Seen {
            live: Some(0),
            ..Seen::default()
        },
    }
}

struct Report {
    secs: u32,
    probe: Vec<(u32, f64, u64)>,
    threads: u32,
    probe_rate: f64,
    /// (rate, client errors) of the runs without gracewatch (before, after).
    without: Vec<(f64, u64)>,
    /// `watch` read the agent's unix socket (one kernel side) rather than
    /// loading its own programs.
    via_agent: bool,
    total: u64,
    errors: u64,
    elapsed: f64,
    per_sec: Vec<u64>,
    handover_at: Option<f64>,
    closed_at: Option<f64>,
    gens: [(u32, Truth); 2],
    observers: Vec<(&'static str, Option<u64>, [Seen; 2])>,
    agent_cpu_pct: f64,
    watch_cpu_pct: f64,
    agent_hwm: f64,
}

fn report(r: &Report) -> super::Output {
    let mut md = String::new();
    let mut rows = Vec::new();
    let probes: Vec<String> = r
        .probe
        .iter()
        .map(|(t, rate, e)| format!("{t} clients {rate:.0}/s ({e} errors)"))
        .collect();
    let _ = writeln!(
        md,
        "Probe without gracewatch ({PROBE_SECS} s each): {}; fastest: {} clients.\n",
        probes.join(", "),
        r.threads
    );
    let rate = r.total as f64 / r.elapsed;
    let (min, max) = (
        r.per_sec.iter().copied().min().unwrap_or(0),
        r.per_sec.iter().copied().max().unwrap_or(0),
    );
    let without: Vec<f64> = r.without.iter().map(|w| w.0).collect();
    let ratio = rate / mean(&without);
    let observers = if r.via_agent {
        "`gracewatch agent` and `gracewatch watch --json --agent unix:SOCKET` attached (watch \
         reads the agent's unix socket: **one kernel side**, the agent's; default 4 MiB ring \
         buffer)"
    } else {
        "`gracewatch agent` and `gracewatch watch --json` attached (this `watch` has no \
         `--agent`: **two kernel sides**, each loads its own programs, so every hook runs \
         twice; default 4 MiB ring buffer each)"
    };
    let _ = writeln!(
        md,
        "The same {} s script (server, held connections, handover, closes) without gracewatch \
         before and after the run with it: {} ({} client errors); their mean {:.0}/s is the rate \
         without.\n",
        r.secs,
        without
            .iter()
            .map(|w| format!("{w:.0}/s"))
            .collect::<Vec<_>>()
            .join(" and "),
        r.without.iter().map(|w| w.1).sum::<u64>(),
        mean(&without)
    );
    let _ = writeln!(
        md,
        "Run: {} s with {observers}: **{} connections, {rate:.0}/s sustained, {ratio:.3} of the \
         rate without** ({:.3} of the probe's; slowest second {min}, fastest {max}; {} client \
         errors). Handover (SIGHUP, first generation stops accepting) at {}, {CLOSED_FIRST} of \
         the first generation's {HELD_FIRST} held connections closed at {}. CPU over the run: \
         agent {:.1}%, watch {:.1}% of a core; agent VmHWM {:.1} MB.\n",
        r.secs,
        r.total,
        rate / r.probe_rate,
        r.errors,
        r.handover_at
            .map_or("-".to_owned(), |t| format!("{t:.1} s")),
        r.closed_at.map_or("-".to_owned(), |t| format!("{t:.1} s")),
        r.agent_cpu_pct,
        r.watch_cpu_pct,
        r.agent_hwm
    );
    let _ = writeln!(
        md,
        "| | generation 1 (pid {}) live / accepted / closed | generation 2 (pid {}) live / accepted / closed | lost events | exact |",
        r.gens[0].0, r.gens[1].0
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---|");
    let t = |x: &Truth| format!("{} / {} / {}", x.held, x.accepted, x.closed);
    let _ = writeln!(
        md,
        "| truth (the server's own counts) | {} | {} | | |",
        t(&r.gens[0].1),
        t(&r.gens[1].1)
    );
    let mut all_exact = true;
    let mut all_lost_zero = true;
    for (label, lost, seen) in &r.observers {
        let show = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        let mut exact = true;
        for (s, (_, truth)) in seen.iter().zip(&r.gens) {
            exact &= s.live == Some(truth.held);
            exact &= s.accepted.is_none_or(|a| a == truth.accepted);
            exact &= s.closed.is_none_or(|c| c == truth.closed);
        }
        all_exact &= exact;
        all_lost_zero &= lost.is_none_or(|l| l == 0);
        let _ = writeln!(
            md,
            "| {label} | {} / {} / {} | {} / {} / {} | {} | {} |",
            show(seen[0].live),
            show(seen[0].accepted),
            show(seen[0].closed),
            show(seen[1].live),
            show(seen[1].accepted),
            show(seen[1].closed),
            show(*lost),
            if exact { "yes" } else { "**no**" }
        );
    }
    let _ = writeln!(
        md,
        "\nGoal: 0 lost events at the default buffer size — {}; final counts exact against the \
         truth — {}.",
        super::verdict(all_lost_zero),
        super::verdict(all_exact)
    );
    let _ = writeln!(
        md,
        "\nGoal: rate with gracewatch ÷ rate without ≥ {GOAL_RATIO} — {} ({ratio:.3}).",
        super::verdict(ratio >= GOAL_RATIO)
    );
    let sides = if r.via_agent {
        "one kernel side"
    } else {
        "two kernel sides"
    };
    rows.push(Row::new(
        Which::Churn,
        &format!("rate with agent + watch ({sides}) ÷ without, {} s", r.secs),
        &format!("≥ {GOAL_RATIO}"),
        format!(
            "**{ratio:.3}** ({rate:.0}/s vs {:.0}/s, {} connections)",
            mean(&without),
            r.total
        ),
        super::verdict(ratio >= GOAL_RATIO),
    ));
    rows.push(Row::new(
        Which::Churn,
        "lost events, exact counts across an fd-handover restart",
        "0 lost, exact",
        format!(
            "lost {}; live/accepted/closed exact for both generations: {}",
            if all_lost_zero { "0" } else { "**> 0**" },
            if all_exact { "yes" } else { "**no**" }
        ),
        super::verdict(all_lost_zero && all_exact),
    ));
    let _ = writeln!(
        md,
        "\n<details><summary>Connections per second</summary>\n\n{}\n\n</details>",
        r.per_sec
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    (md, rows)
}
