//! The command line: argument parsing (clap), exit codes (ARCHITECTURE.md §5), and
//! dispatch to the subcommands. Errors are printed once, here.

mod render;

use std::{io::Write as _, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};

pub use crate::input::parse_duration;
use crate::{
    agent::client::AgentClient,
    display::terminal_safe,
    drain::{self, DrainSpec, OnTimeout, SignalSpec, TargetSpec},
    exit,
    input::{
        PeerRule, check_peer_rules, parse_max_connections, parse_peer_rule, parse_pid, parse_port,
        parse_ring_buffer_size, parse_timeout,
    },
    monitor::{Monitor, MonitorError, Recorder, SourceOptions},
    tracker::{Restarts, Status, records::FactLine},
};

/// Count live inbound TCP connections per process and per listener, from the
/// kernel, and see graceful restarts drain.
#[derive(Debug, Parser)]
#[command(name = "gracewatch", version, after_help = exit::GENERAL_HELP)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    kernel: KernelArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print who holds which listeners and how many live connections, once.
    ///
    /// Lists every process holding a listening TCP socket (in any network
    /// namespace) with its live inbound connections (ESTABLISHED or
    /// CLOSE_WAIT, accepted and not yet closed), then every listener with
    /// its holders and accept-queue depth.
    #[command(after_help = exit::GENERAL_HELP)]
    Status {
        #[command(flatten)]
        filter: FilterArgs,
        /// Read the status of a running `gracewatch agent` (e.g.
        /// unix:/run/gracewatch.sock or http://127.0.0.1:9464) instead of
        /// loading a second copy of the eBPF programs: same output, the
        /// agent's view. Fails (exit 1) if the agent cannot be read.
        #[arg(long, value_name = "URL")]
        agent: Option<String>,
    },
    /// List a process's live connections with how long each has been idle
    /// and what is in flight.
    ///
    /// Reads each connection's `tcp_info` and socket queues from the
    /// kernel (sock_diag) once, now: IDLE is the time since data was last
    /// sent or received, whichever is later (ACKs and keep-alive probes
    /// are not data); IN FLIGHT lists bytes received and not yet read by
    /// the server, sent and not yet acknowledged, and written but not yet
    /// sent (the client's window is full). `?` is unknown (the connection
    /// just closed, or an old kernel's tcp_info lacks the field). Reads the
    /// 4096 oldest connections at most. With --json, one object (schema:
    /// gracewatch/schema/connections.schema.json).
    ///
    /// With --by-peer: who pins the process. Its live connections grouped
    /// by peer address (by /24 and /64 networks, then /16 and /48, when
    /// there are more than 32 distinct peers; at most 32 groups, largest
    /// first), each with its count and oldest age, and the processes on
    /// this host holding the other ends (pid, command, container), found
    /// through a sock_diag dump in the process's network namespace and a
    /// walk of /proc/*/fd bounded to 1 s (the 1024 oldest connections
    /// looked up). A peer that is remote, in another namespace, or not
    /// found within the bound is counted as not found, never guessed.
    /// With --json, schema gracewatch/schema/peers.schema.json.
    #[command(after_help = exit::GENERAL_HELP)]
    Connections {
        /// The process (repeatable).
        #[arg(long = "pid", value_name = "PID", required = true, value_parser = parse_pid, allow_hyphen_values = true)]
        pids: Vec<u32>,
        /// Group by peer and name the peer processes on this host.
        #[arg(long)]
        by_peer: bool,
        /// Print JSON (documented in the README).
        #[arg(long)]
        json: bool,
    },
    /// Stream changes until interrupted.
    ///
    /// Prints a line whenever a process's live count or a listener changes.
    /// With --json, prints the whole status (same format as `status --json`)
    /// as one JSON object per line, at most every --interval. With --json
    /// --events, prints the restart events instead (see --events).
    #[command(after_help = exit::GENERAL_HELP)]
    Watch {
        #[command(flatten)]
        filter: FilterArgs,
        /// Minimum time between two updates, e.g. `100ms`, `1s`.
        #[arg(long, default_value = "100ms", value_parser = parse_duration, allow_hyphen_values = true)]
        interval: Duration,
        /// With --json: print restart events instead of statuses, one JSON
        /// object per line as the agent's /v1/events has them: `handover`
        /// (a process started accepting on a listener an older one serves),
        /// `draining` (a process stopped accepting or closed its listener
        /// while holding connections), `drained` (it reached zero), and
        /// `lagged` if this reader missed some. Schema:
        /// gracewatch/schema/event.schema.json. --pid/--port keep the
        /// events of those processes/listeners.
        #[arg(long, requires = "json")]
        events: bool,
        /// Follow a running `gracewatch agent` (e.g.
        /// unix:/run/gracewatch.sock or http://127.0.0.1:9464) instead of
        /// loading a second copy of the eBPF programs: its status is read
        /// every --interval and printed as above when it changed. Exits 1
        /// if the agent cannot be read (at start or later). Not with
        /// --events (read the agent's /v1/events instead).
        #[arg(long, value_name = "URL", conflicts_with = "events")]
        agent: Option<String>,
    },
    /// Wait until the target holds no live connection, then signal it.
    ///
    /// Replaces `sleep 30` in deploy scripts: the signal follows the
    /// target's last close as soon as the kernel reports it, after a fresh
    /// look at the target's own fds confirms that nothing live is left. The
    /// signal goes through a pidfd opened when the target was chosen, so a
    /// recycled pid can never receive it.
    #[command(after_help = exit::DRAIN_HELP)]
    Drain {
        #[command(flatten)]
        drain: DrainArgs,
        /// Signal to send once drained: TERM, SIGQUIT, 15… or `none` to only wait.
        #[arg(long, default_value = "TERM", value_parser = parse_signal)]
        signal: SignalArg,
    },
    /// Wait until the target holds no live connection (`drain --signal none`).
    #[command(after_help = exit::DRAIN_HELP)]
    Wait {
        #[command(flatten)]
        drain: DrainArgs,
    },
    /// Watch restarts drain live: processes, listeners, a chart, events.
    ///
    /// Shows every process holding a listening TCP socket (or those the
    /// filters name) with its role (serving, draining, drained, exited),
    /// live connections, accept/close rates and drain progress. Keys: ↑↓/jk
    /// select, Enter connections (i: sort by idle, b: group by peer with
    /// the peer processes), d drain, s signal, / filter, p pause,
    /// ? help, q quit.
    #[command(after_help = exit::GENERAL_HELP)]
    Tui(crate::tui::TuiArgs),
    /// Serve Prometheus metrics, the status, events and drains over HTTP.
    ///
    /// A sidecar or node daemon: GET /metrics, /v1/status, /v1/events,
    /// /v1/connections?pid=P, /v1/peers?pid=P (who pins P: its connections
    /// by peer, with the peer processes for trusted readers),
    /// /livez, /readyz; POST /v1/drains starts a drain (as `drain` does),
    /// GET /v1/drains/ID?wait=30s long-polls it, DELETE cancels it without
    /// signalling. Starting and cancelling drains needs the bearer token
    /// on TCP (refused without --token-file) and nothing on the unix socket.
    #[command(after_help = exit::GENERAL_HELP)]
    Agent(crate::agent::AgentArgs),
    /// Print the raw kernel events, one JSON object per line, until
    /// interrupted (for debugging and for recording replay fixtures).
    #[command(hide = true)]
    Record,
}

#[derive(Debug, Args, Clone)]
struct DrainArgs {
    /// Target process (repeatable).
    #[arg(long = "pid", value_name = "PID", value_parser = parse_pid, allow_hyphen_values = true)]
    pids: Vec<u32>,
    /// Read the target pid from this file (e.g. /run/nginx.pid.oldbin).
    #[arg(long, value_name = "PATH")]
    pidfile: Option<PathBuf>,
    /// Also wait for the targets' descendants as they are now (nginx/HAProxy
    /// workers, gunicorn workers…). Only the named targets are signalled.
    #[arg(long)]
    children: bool,
    /// Leave this process and its descendants out (e.g. the new master in
    /// nginx's binary upgrade, which is a child of the old one). Repeatable.
    #[arg(long, value_name = "PID", value_parser = parse_pid, allow_hyphen_values = true)]
    exclude: Vec<u32>,
    /// Count only connections on this local port (repeatable).
    #[arg(long = "port", value_name = "PORT", value_parser = parse_port, allow_hyphen_values = true)]
    ports: Vec<u16>,
    /// Give up after this long, e.g. `90s`, `2m`.
    #[arg(long, value_parser = parse_timeout, allow_hyphen_values = true)]
    timeout: Option<Duration>,
    /// What to do when --timeout passes with connections left.
    #[arg(long, value_enum, default_value_t = OnTimeoutArg::Leave)]
    on_timeout: OnTimeoutArg,
    /// Never signal before this much time has passed, even at zero (time
    /// for load balancers to stop sending traffic).
    #[arg(long, value_parser = parse_duration, default_value = "0s", allow_hyphen_values = true)]
    min_wait: Duration,
    /// Drained only once the targets also went this long without a new
    /// connection (none accepted by them, no handshake on a listener only
    /// they hold), so a zero between two short requests ends nothing. For a
    /// server a load balancer may still route to, e.g. a terminating
    /// Kubernetes pod, whose preStop hook can then replace `sleep` with
    /// `gracewatch wait --pid 1 --quiet-for 5s --timeout 60s`. Counted from
    /// the start or the last new connection; --min-wait must pass as well.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "0s", allow_hyphen_values = true)]
    quiet_for: Duration,
    /// Connections from this peer do not hold the drain (repeatable, at
    /// most 64): an address or CIDR with an optional port, e.g. 127.0.0.9,
    /// 10.0.0.0/8:9100, [::1]:9100, 2001:db8::/32 (a monitoring scraper, a
    /// health checker). The drain ends once every live connection left is
    /// from such a peer, as a fresh look at the target's sockets confirms,
    /// and the result names them. Risk: the signal then cuts those
    /// connections, and a CIDR wider than the scraper (or a port that real
    /// clients share) ends the drain with real clients still connected. An
    /// IPv4 rule also matches IPv4 clients of a dual-stack listener.
    #[arg(long, value_name = "CIDR[:PORT]", value_parser = parse_peer_rule, allow_hyphen_values = true)]
    exclude_peer: Vec<PeerRule>,
    /// Also count the targets as drained once every live connection they
    /// still hold has moved no data (sent or received) for this long and
    /// has nothing in flight (no unread, unsent or unacknowledged byte), as
    /// the kernel's tcp_info for each socket in their fd tables says, e.g.
    /// `30s`. A socket that cannot be read or decided holds the drain. The
    /// result names the idle connections in `idle`. Risk: the signal cuts
    /// them, so a keep-alive idle between two requests loses its
    /// connection (the client must reconnect, or retry a request it was
    /// about to send); only servers that close idle keep-alives on
    /// shutdown (Go, nginx, Envoy) then finish cleanly. Choose a period
    /// longer than the pauses inside your slowest request or stream.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, allow_hyphen_values = true)]
    until_idle: Option<Duration>,
    /// One JSON object per progress event, then a result object, on stdout.
    /// Both carry `peers`: the connections still holding the drain grouped
    /// by peer (at most 10 groups); the result, when the drain ends without
    /// draining, also names the processes on this host holding the other
    /// ends (without --json, the final lines list them).
    #[arg(long)]
    json: bool,
    /// Run the drain through a running `gracewatch agent` (e.g.
    /// http://127.0.0.1:9464 or unix:/run/gracewatch.sock) instead of
    /// watching the kernel from here. Pids and --pidfile are as the agent
    /// sees them; the exit codes are the same.
    #[arg(long, value_name = "URL")]
    agent: Option<String>,
    /// File holding the agent's bearer token (drains over TCP need it).
    #[arg(long, value_name = "PATH", requires = "agent")]
    token_file: Option<PathBuf>,
    /// Trust a --pidfile that is not owned by root, is writable by group or
    /// others, or names a process of another user than the file's owner.
    /// Whoever can write such a file chooses which process gets the signal.
    #[arg(long)]
    allow_unsafe_pidfile: bool,
    /// Allow a target that is pid 1, a kernel thread, gracewatch itself or
    /// one of its ancestors, or --children of pid 1 (every process).
    #[arg(long)]
    allow_dangerous_target: bool,
}

#[derive(Debug, Args, Clone, Default)]
pub struct FilterArgs {
    /// Only this process (repeatable).
    #[arg(long = "pid", value_name = "PID", value_parser = parse_pid, allow_hyphen_values = true)]
    pids: Vec<u32>,
    /// Only listeners on this port, and the processes holding them (repeatable).
    #[arg(long = "port", value_name = "PORT", value_parser = parse_port, allow_hyphen_values = true)]
    ports: Vec<u16>,
    /// Print JSON (documented in the README; schema in gracewatch/schema/).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args, Clone)]
struct KernelArgs {
    /// Capacity of the kernel's per-socket tables.
    #[arg(long, global = true, default_value_t = 1 << 20, value_name = "N", value_parser = parse_max_connections, allow_hyphen_values = true)]
    max_connections: u32,
    /// Size of the kernel→gracewatch event ring buffer, in bytes (rounded up to a power of two).
    #[arg(long, global = true, default_value_t = 1 << 22, value_name = "BYTES", value_parser = parse_ring_buffer_size, allow_hyphen_values = true)]
    ring_buffer_size: u32,
}

/// `--signal`: a signal, or `none` (only wait).
#[derive(Clone, Copy, Debug)]
struct SignalArg(Option<SignalSpec>);

fn parse_signal(s: &str) -> Result<SignalArg, String> {
    SignalSpec::parse_optional(s).map(SignalArg)
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            eprintln!("{}", one_line_usage_error(&e));
            return ExitCode::from(exit::USAGE);
        }
        Err(e) => {
            // --help and --version: clap's own output, on stdout.
            let _ = e.print();
            return ExitCode::from(exit::OK);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // The agent serves many clients while drains run: two worker threads,
    // so one busy connection never holds up the rest (its monitor has a
    // thread of its own). The other commands need one thread.
    let mut builder = if matches!(cli.command, Command::Agent(_)) {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gracewatch: failed to start the async runtime: {e}");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    let result = runtime.block_on(run(cli));
    // The answer is decided and printed: exit now. Dropping the runtime
    // would first wait for blocking work still in flight (a rescan, a look
    // at /proc), and a deploy script only sees the exit.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = match e.downcast_ref::<MonitorError>() {
                Some(MonitorError::CannotMonitor(_)) => exit::CANNOT_MONITOR,
                _ => exit::RUNTIME,
            };
            eprintln!("gracewatch: {}", terminal_safe(&format!("{e:#}")));
            ExitCode::from(code)
        }
    }
}

/// clap's error as one line (`error: …`), so a script's log shows the
/// whole reason on the line it greps: the usage block and the `--help`
/// hint are dropped, the remaining lines joined.
fn one_line_usage_error(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect();
    let line = terminal_safe(&parts.join(" ")).into_owned();
    if line.starts_with("error:") {
        line
    } else {
        format!("error: {line}")
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let opts = SourceOptions {
        max_connections: cli.kernel.max_connections,
        ring_buffer_bytes: cli.kernel.ring_buffer_size,
    };
    match cli.command {
        Command::Status { filter, agent } => {
            let status = match &agent {
                Some(url) => agent_status(&AgentClient::new(url, None)?, url).await?,
                None => Monitor::status_once(opts)?,
            };
            let status = filter.apply(status);
            let mut out = std::io::stdout().lock();
            if filter.json {
                serde_json::to_writer(&mut out, &status)?;
                writeln!(out)?;
            } else {
                write!(out, "{}", render::table(&status, &filter))?;
            }
            Ok(exit::OK)
        }
        Command::Connections {
            pids,
            by_peer: true,
            json,
        } => {
            let handle = Monitor::spawn(opts)?;
            let report = crate::peer_report::report(&handle, &pids, true).await?;
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer(&mut out, &report)?;
                writeln!(out)?;
            } else {
                write!(out, "{}", crate::peer_report::table(&report))?;
            }
            Ok(exit::OK)
        }
        Command::Connections { pids, json, .. } => {
            let handle = Monitor::spawn(opts)?;
            let report = crate::connections::report(&handle, &pids).await?;
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer(&mut out, &report)?;
                writeln!(out)?;
            } else {
                write!(out, "{}", crate::connections::table(&report))?;
            }
            Ok(exit::OK)
        }
        Command::Watch {
            filter,
            events: true,
            ..
        } => watch_events(opts, filter).await,
        Command::Watch {
            filter,
            interval,
            agent: Some(url),
            ..
        } => watch_agent(&url, filter, interval).await,
        Command::Watch {
            filter, interval, ..
        } => watch(opts, filter, interval).await,
        Command::Agent(args) => crate::agent::run(opts, args).await,
        Command::Record => record(opts).await,
        Command::Tui(args) => crate::tui::run(opts, args).await,
        Command::Drain { drain, signal } => drain_cmd(opts, drain, signal.0).await,
        Command::Wait { drain } => drain_cmd(opts, drain, None).await,
    }
}

async fn watch(opts: SourceOptions, filter: FilterArgs, interval: Duration) -> anyhow::Result<u8> {
    let handle = Monitor::spawn(opts)?;
    let mut updates = handle.subscribe();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut last: Option<Status> = None;
    let mut next_print = tokio::time::Instant::now();
    let mut pending = true;
    loop {
        if pending && tokio::time::Instant::now() >= next_print {
            let status = filter.apply(Status::clone(&updates.borrow_and_update()));
            print_if_changed(&filter, &mut last, status)?;
            pending = false;
            next_print = tokio::time::Instant::now() + interval;
        }
        let wake = if pending {
            next_print
        } else {
            tokio::time::Instant::now() + Duration::from_secs(3600)
        };
        tokio::select! {
            changed = updates.changed() => {
                if changed.is_err() {
                    anyhow::bail!("{}", handle.stopped());
                }
                pending = true;
            }
            () = tokio::time::sleep_until(wake) => {}
            _ = tokio::signal::ctrl_c() => return Ok(exit::INTERRUPTED),
            _ = sigterm.recv() => return Ok(exit::INTERRUPTED),
        }
    }
}

/// `watch`'s output: `status` if it differs from the `last` one printed
/// (a JSON line, or the changes in words).
fn print_if_changed(
    filter: &FilterArgs,
    last: &mut Option<Status>,
    status: Status,
) -> anyhow::Result<()> {
    if last.as_ref().is_some_and(|l| !render::differs(l, &status)) {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    if filter.json {
        serde_json::to_writer(&mut out, &status)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", render::changes(last.as_ref(), &status))?;
    }
    out.flush()?;
    *last = Some(status);
    Ok(())
}

/// The status of the agent at `url`: what `status` would print, read
/// from the agent's kernel side instead of a copy of our own.
async fn agent_status(client: &AgentClient, url: &str) -> anyhow::Result<Status> {
    // The error's text already holds its whole chain (its source repeats it).
    client
        .status()
        .await
        .map_err(|e| anyhow::anyhow!("failed to read the status of the agent at {url}: {e}"))
}

/// `watch --agent`: the agent's status, read every `interval`, printed as
/// `watch` prints its own whenever it changed. An agent that cannot be
/// read ends the watch with an error: a stream that silently stops
/// changing would read as "nothing changes".
async fn watch_agent(url: &str, filter: FilterArgs, interval: Duration) -> anyhow::Result<u8> {
    let client = AgentClient::new(url, None)?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut last: Option<Status> = None;
    loop {
        let status = filter.apply(agent_status(&client, url).await?);
        print_if_changed(&filter, &mut last, status)?;
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(exit::INTERRUPTED),
            _ = sigterm.recv() => return Ok(exit::INTERRUPTED),
        }
    }
}

/// `watch --json --events`: the restart model's facts as event lines, each
/// printed once, in order (the model keeps the latest facts for readers
/// that fall behind; a gap is told with a `lagged` line).
async fn watch_events(opts: SourceOptions, filter: FilterArgs) -> anyhow::Result<u8> {
    let handle = Monitor::spawn(opts)?;
    let mut restarts = handle.subscribe_restarts();
    restarts.mark_changed();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut last: Option<u64> = None;
    loop {
        tokio::select! {
            changed = restarts.changed() => {
                if changed.is_err() {
                    anyhow::bail!("{}", handle.stopped());
                }
                let model = restarts.borrow_and_update().clone();
                let mut out = std::io::stdout().lock();
                for fact in model.facts_after(last) {
                    let skipped = last.map_or(0, |l| fact.seq.saturating_sub(l + 1));
                    if skipped > 0 {
                        let lagged = serde_json::json!({
                            "kind": "lagged",
                            "skipped": skipped,
                            "message": "this reader fell behind: restart events were missed (gracewatch watch --json shows the current roles)",
                        });
                        writeln!(out, "{lagged}")?;
                    }
                    last = Some(fact.seq);
                    let Some(line) = model.event_line(fact) else { continue };
                    if filter.keeps_fact(&model, &line) {
                        serde_json::to_writer(&mut out, &line)?;
                        writeln!(out)?;
                    }
                }
                out.flush()?;
            }
            _ = tokio::signal::ctrl_c() => return Ok(exit::INTERRUPTED),
            _ = sigterm.recv() => return Ok(exit::INTERRUPTED),
        }
    }
}

async fn drain_cmd(
    opts: SourceOptions,
    args: DrainArgs,
    signal: Option<SignalSpec>,
) -> anyhow::Result<u8> {
    if let Err(e) = check_peer_rules(&args.exclude_peer) {
        eprintln!("error: --exclude-peer: {e}");
        return Ok(exit::USAGE);
    }
    if let Some(url) = &args.agent {
        let req = crate::agent::DrainRequest {
            pids: args.pids.clone(),
            pidfile: args.pidfile.clone(),
            children: args.children,
            exclude: args.exclude.clone(),
            ports: args.ports.clone(),
            signal: Some(signal.map_or_else(|| "none".to_owned(), SignalSpec::name)),
            timeout: args.timeout.map(|d| format!("{}s", d.as_secs_f64())),
            on_timeout: args.on_timeout.into(),
            min_wait: Some(format!("{}s", args.min_wait.as_secs_f64())),
            // Left out when off, so an older agent takes the request.
            quiet_for: (!args.quiet_for.is_zero())
                .then(|| format!("{}s", args.quiet_for.as_secs_f64())),
            exclude_peer: args.exclude_peer.iter().map(ToString::to_string).collect(),
            until_idle: args.until_idle.map(|d| format!("{}s", d.as_secs_f64())),
            allow_unsafe_pidfile: args.allow_unsafe_pidfile,
            allow_dangerous_target: args.allow_dangerous_target,
        };
        let token = args.token_file.as_deref();
        return Ok(crate::agent::client::drain_cmd(url, token, req, args.json).await);
    }
    let spec = DrainSpec {
        ports: args.ports.clone(),
        signal,
        timeout: args.timeout,
        on_timeout: args.on_timeout.into(),
        min_wait: args.min_wait,
        quiet_for: args.quiet_for,
        exclude_peers: args.exclude_peer.clone(),
        until_idle: args.until_idle,
    };
    let targets = match drain::choose(&TargetSpec {
        pids: args.pids.clone(),
        pidfile: args.pidfile.clone(),
        children: args.children,
        exclude: args.exclude.clone(),
        allow_unsafe_pidfile: args.allow_unsafe_pidfile,
        allow_dangerous_target: args.allow_dangerous_target,
        wait_only: !spec.can_signal(),
    }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gracewatch: {}", terminal_safe(&e.to_string()));
            return Ok(exit::USAGE);
        }
    };
    let handle = Monitor::spawn(opts)?;
    let json = args.json;
    use tokio::signal::unix::{SignalKind, signal as unix_signal};
    let mut sigterm = unix_signal(SignalKind::terminate())?;
    // Registered now, not when the drain first polls `cancel`: a Ctrl-C
    // right after the first progress line must interrupt, not kill us.
    let mut sigint = unix_signal(SignalKind::interrupt())?;
    let cancel = async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
    };
    let report = drain::run(
        &handle,
        targets,
        &spec,
        |p| {
            if json {
                print_json_line("progress", p);
            } else {
                eprintln!("gracewatch: {}", terminal_safe(&p.message));
            }
        },
        cancel,
    )
    .await;
    if json {
        print_json_line("result", &exit::ReportJson(&report));
    } else {
        eprintln!("gracewatch: {}", terminal_safe(&report.message));
        for h in &report.held {
            let doing = match (h.idle_ms, h.in_flight) {
                (_, Some(true)) => ", in flight".to_owned(),
                (Some(ms), _) => format!(", idle {:.1}s", ms as f64 / 1000.0),
                _ => String::new(),
            };
            eprintln!(
                "gracewatch:   still held by pid {}: {} ← {} (age {:.1}s{doing})",
                h.pid,
                terminal_safe(&h.local),
                terminal_safe(&h.peer),
                h.age_ms as f64 / 1000.0
            );
        }
        for g in &report.peers {
            eprintln!("{}", crate::peer_report::drain_line(g));
        }
        for c in &report.idle {
            eprintln!(
                "gracewatch:   idle (cut), held by pid {}: {} ← {} (idle {:.1}s{})",
                c.pid,
                terminal_safe(&c.local),
                terminal_safe(&c.peer),
                c.idle_ms as f64 / 1000.0,
                c.age_ms
                    .map(|ms| format!(", age {:.1}s", ms as f64 / 1000.0))
                    .unwrap_or_default()
            );
        }
        for x in &report.excluded {
            eprintln!(
                "gracewatch:   excluded peer, held by pid {}: {} ← {}{}",
                x.pid,
                terminal_safe(&x.local),
                terminal_safe(&x.peer),
                x.age_ms
                    .map(|ms| format!(" (age {:.1}s)", ms as f64 / 1000.0))
                    .unwrap_or_default()
            );
        }
    }
    Ok(exit::of(report.outcome))
}

/// Prints `{"type": kind, ...value}` as one line on stdout.
fn print_json_line<T: serde::Serialize>(kind: &str, value: &T) {
    let mut v = serde_json::to_value(value).unwrap_or_default();
    if let serde_json::Value::Object(map) = &mut v {
        map.insert("type".to_owned(), kind.into());
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

async fn record(opts: SourceOptions) -> anyhow::Result<u8> {
    let mut recorder = Recorder::start(opts)?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            r = recorder.next_batch(&mut batch) => r?,
            _ = tokio::signal::ctrl_c() => return Ok(exit::INTERRUPTED),
            _ = sigterm.recv() => return Ok(exit::INTERRUPTED),
        }
        let mut out = std::io::stdout().lock();
        for ev in batch.drain(..) {
            serde_json::to_writer(&mut out, &ev)?;
            writeln!(out)?;
        }
        out.flush()?;
    }
}

/// `--on-timeout`: the command-line face of [`OnTimeout`] (the core has no
/// clap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnTimeoutArg {
    /// Send nothing (exit 124).
    Leave,
    /// Send the drain signal anyway (exit 124).
    Signal,
    /// Send SIGKILL (exit 124).
    Kill,
}

impl From<OnTimeoutArg> for OnTimeout {
    fn from(a: OnTimeoutArg) -> Self {
        match a {
            OnTimeoutArg::Leave => Self::Leave,
            OnTimeoutArg::Signal => Self::Signal,
            OnTimeoutArg::Kill => Self::Kill,
        }
    }
}

impl FilterArgs {
    /// Keeps the processes named by --pid and the listeners on --port, and
    /// what connects the two (a process is kept if it holds a kept listener).
    pub fn apply(&self, mut status: Status) -> Status {
        if !self.ports.is_empty() {
            status
                .listeners
                .retain(|l| self.ports.contains(&l.address.port()));
            let kept: Vec<SocketAddr> = status.listeners.iter().map(|l| l.address).collect();
            status
                .processes
                .retain(|p| p.listeners.iter().any(|a| kept.contains(a)));
            for p in &mut status.processes {
                p.listeners.retain(|a| kept.contains(a));
            }
        }
        if !self.pids.is_empty() {
            status.processes.retain(|p| self.pids.contains(&p.pid));
            status
                .listeners
                .retain(|l| l.holders.iter().any(|h| self.pids.contains(&h.pid)));
        }
        status
    }

    /// Whether `watch --json --events` prints `line`: it is about a kept
    /// pid (for a handover: the new process or one it took over from), and
    /// on a kept port (a handover's listener; for a drain, a listener the
    /// process held or accepted from).
    fn keeps_fact(&self, model: &Restarts, line: &FactLine) -> bool {
        let (pids, ports): (Vec<u32>, Vec<u16>) = match line {
            FactLine::Handover {
                pid,
                listener,
                alongside,
                ..
            } => (
                std::iter::once(*pid)
                    .chain(alongside.iter().copied())
                    .collect(),
                vec![listener.local.port()],
            ),
            other => (
                vec![other.pid()],
                model
                    .process(other.pid())
                    .map(|p| p.keys.iter().map(|k| k.local.port()).collect())
                    .unwrap_or_default(),
            ),
        };
        (self.pids.is_empty() || pids.iter().any(|p| self.pids.contains(p)))
            && (self.ports.is_empty() || ports.iter().any(|p| self.ports.contains(p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tui_subcommand_parses_its_filters() {
        let ok = Cli::try_parse_from([
            "gracewatch",
            "tui",
            "--pid",
            "1",
            "--pid",
            "2",
            "--port",
            "80",
            "--comm",
            "nginx",
        ]);
        assert!(ok.is_ok(), "{ok:?}");
        for bad in [
            vec!["gracewatch", "tui", "--port", "70000"],
            vec!["gracewatch", "tui", "--pid", "x"],
            vec!["gracewatch", "tui", "--bogus"],
        ] {
            let err = Cli::try_parse_from(&bad).expect_err("must be rejected");
            assert!(err.use_stderr(), "{bad:?}");
        }
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        for args in [
            vec!["gracewatch", "status", "--pid", "abc"],
            vec!["gracewatch", "status", "--port", "70000"],
            vec!["gracewatch", "watch", "--interval", "soon"],
            // Event lines are JSON only.
            vec!["gracewatch", "watch", "--events"],
            vec!["gracewatch", "frobnicate"],
        ] {
            let err = Cli::try_parse_from(&args).expect_err("must be rejected");
            assert!(err.use_stderr(), "{args:?}");
        }
        let ok = Cli::try_parse_from(["gracewatch", "watch", "--json", "--events", "--port", "80"]);
        assert!(ok.is_ok(), "{ok:?}");
        assert!(
            Cli::try_parse_from(["gracewatch", "status", "--pid", "1", "--pid", "2", "--json"])
                .is_ok()
        );
    }
}
