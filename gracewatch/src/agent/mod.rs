//! `gracewatch agent`: a long-lived sidecar or node daemon that serves the
//! monitor over HTTP — Prometheus metrics, the status JSON, a stream of
//! kernel events, health checks, and drains that deploy tooling starts,
//! polls and cancels (see the README's "Agent" section for the API).
//!
//! The agent only reads a [`MonitorHandle`], so it runs the same on the
//! kernel monitor and on a replay one ([`MonitorHandle::from_replay`]), which
//! is how its HTTP API is tested without root. [`Agent`] is the embeddable
//! piece: give it a handle, serve its router on TCP or a unix socket.
//!
//! Security model: read-only endpoints are open to whoever can reach the
//! listener (loopback by default), without kernel addresses and, unless the
//! reader is trusted, without peer addresses. Endpoints that can signal a
//! process (`POST`/`DELETE /v1/drains…`) need `Authorization: Bearer
//! <token>` on TCP, and are refused on TCP altogether when no token file was
//! given; on the unix socket (created `0600` in a directory only the agent
//! can write, so only its owner and root can connect) they need no token.
//! Whatever clients do, what they can make the agent hold is bounded (see
//! [`server`] and the event hub).

mod api;
pub mod client;
mod drains;
mod events;
mod governor;
mod metrics;
pub mod server;

use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    net::{TcpListener, UnixListener},
    sync::{broadcast::error::RecvError, watch},
};

pub use client::{AgentClient, ClientError};
pub use drains::{DrainRequest, DrainState, DrainStatus, MAX_RUNNING};
pub use events::{MAX_SUBSCRIBERS, SUBSCRIBER_BACKLOG};
pub use governor::GovernorArgs;
pub use metrics::MetricLabel;

use crate::{
    exit,
    monitor::{Monitor, MonitorHandle, SourceOptions, enable_run_time_stats},
};

/// Where the agent listens unless told otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

/// How long shutdown waits for running drains to report and for HTTP
/// connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `gracewatch agent` options.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentArgs {
    /// Serve HTTP on this IP:PORT. The default is loopback only; to let a
    /// Prometheus on another host scrape, listen on a routable address and
    /// protect drains with --token-file.
    #[arg(long, default_value = DEFAULT_LISTEN, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Also serve on this unix socket, created with mode 0600. Requests on
    /// it may start and cancel drains without a token.
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,
    /// File holding the bearer token that POST/DELETE requests on TCP must
    /// present (and that lets TCP readers see peer addresses). Without it,
    /// those requests are refused on TCP. It must be a regular file of root
    /// or the agent's user, mode 0600 or stricter, holding at least 16
    /// characters.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Turn on the kernel's BPF run-time statistics while the agent runs,
    /// so gracewatch_bpf_run_time_seconds_total and gracewatch_bpf_runs_total
    /// show what gracewatch's programs cost. Off by default: it costs every
    /// BPF program on the host two clock reads per run (`sysctl
    /// kernel.bpf_stats_enabled=1` turns them on host-wide instead).
    #[arg(long)]
    pub bpf_stats: bool,
    /// Label the per-process series (gracewatch_process_*) with where the
    /// process runs, comma-separated: `container` (container_id), `pod`
    /// (pod_uid), `cgroup` (the cgroup v2 path). Off by default: cardinality.
    ///
    /// Each value is read from the process's cgroup (as `status --json`
    /// shows it) and the label is left out where the cgroup names none. It
    /// adds no series per scrape (a process runs in one container), but
    /// every container and pod ever started leaves new label values in
    /// Prometheus' index for its retention, and `cgroup` values can be long.
    #[arg(long, value_name = "LABELS", value_delimiter = ',', value_enum)]
    pub metric_labels: Vec<MetricLabel>,
    #[command(flatten)]
    pub governor: GovernorArgs,
}

/// Which listener a request came through: it decides whether drains need
/// the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Anyone who can reach the address: drains need the bearer token.
    Tcp,
    /// Only the socket's owner (and root) can connect: trusted.
    Unix,
}

/// The HTTP agent around a monitor. Cheap to clone; every clone serves the
/// same state.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

struct Shared {
    token: Option<String>,
    monitor: OnceLock<MonitorHandle>,
    drains: drains::Drains,
    metrics: metrics::Metrics,
    events: events::Hub,
    /// Concurrent TCP connections served at most (see [`server::fd_budget`]).
    tcp_budget: std::sync::atomic::AtomicUsize,
    bpf_stats_enabled: std::sync::atomic::AtomicBool,
    /// The optional labels of the per-process series, as
    /// [`metrics::MetricLabels::bits`].
    metric_labels: std::sync::atomic::AtomicU8,
    shutdown: watch::Sender<bool>,
}

impl Agent {
    /// An agent that is not ready yet (`/readyz` answers 503) until
    /// [`Agent::set_monitor`]. `token`: what `Authorization: Bearer` must
    /// carry for drains over TCP; `None` refuses them on TCP.
    pub fn new(token: Option<String>) -> Self {
        Self {
            shared: Arc::new(Shared {
                token,
                monitor: OnceLock::new(),
                drains: drains::Drains::new(),
                metrics: metrics::Metrics::new(),
                events: events::Hub::default(),
                tcp_budget: server::MAX_TCP_CONNECTIONS.into(),
                bpf_stats_enabled: false.into(),
                metric_labels: 0.into(),
                shutdown: watch::channel(false).0,
            }),
        }
    }

    /// Hands the agent its monitor: from now on it is ready. Only the first
    /// call counts (`false` for later ones). Must be called within a tokio
    /// runtime: it starts counting the monitor's events and the restart
    /// model's facts, and handing the events to `/v1/events` readers (one
    /// task for all, which never waits for a reader).
    pub fn set_monitor(&self, handle: MonitorHandle) -> bool {
        let mut events = handle.events();
        let mut restarts = handle.subscribe_restarts();
        if self.shared.monitor.set(handle).is_err() {
            return false;
        }
        let shared = self.shared.clone();
        let mut shutdown = self.shared.shutdown.subscribe();
        tokio::spawn(async move {
            // The restart model's facts, counted once each: those already
            // recorded, then those each publication brings.
            let mut last_fact = None;
            restarts.mark_changed();
            loop {
                tokio::select! {
                    changed = restarts.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let model = restarts.borrow_and_update().clone();
                        for fact in model.facts_after(last_fact) {
                            shared.metrics.fact(fact);
                            shared.events.publish_fact(fact, &model);
                            last_fact = Some(fact.seq);
                        }
                    }
                    ev = events.recv() => match ev {
                        Ok(ev) => {
                            shared.metrics.observe(&ev);
                            shared.events.publish(&ev);
                        }
                        Err(RecvError::Lagged(n)) => {
                            shared.metrics.skipped(n);
                            shared.events.lagged(n);
                        }
                        Err(RecvError::Closed) => return,
                    },
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
        });
        true
    }

    /// Starts the generation governor on the monitor (see
    /// [`crate::drain::governor`]): it signals draining generations past its
    /// limits, logs each action on stderr and counts it in `/metrics`.
    /// `false` (and nothing started) before [`Agent::set_monitor`]. Must be
    /// called within a tokio runtime.
    pub fn start_governor(&self, governor: crate::drain::governor::Governor) -> bool {
        let Some(handle) = self.shared.monitor.get() else {
            return false;
        };
        governor::spawn(self.shared.clone(), handle, governor);
        true
    }

    /// The monitor, once [`Agent::set_monitor`] was called.
    pub fn monitor(&self) -> Option<&MonitorHandle> {
        self.shared.monitor.get()
    }

    /// Records whether the kernel's BPF run-time statistics are on (exported
    /// as `gracewatch_bpf_stats_enabled`).
    pub fn set_bpf_stats_enabled(&self, on: bool) {
        self.shared
            .bpf_stats_enabled
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Adds `labels` to the per-process series of `/metrics` (none by
    /// default: see [`AgentArgs::metric_labels`]).
    pub fn set_metric_labels(&self, labels: &[MetricLabel]) {
        self.shared.metric_labels.store(
            metrics::MetricLabels::of(labels).bits(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Sets how many TCP connections are served at once (the default is
    /// [`server::MAX_TCP_CONNECTIONS`]; [`run`] lowers it to fit the fd
    /// limit). Takes effect for servers started afterwards.
    pub fn set_max_tcp_connections(&self, n: usize) {
        self.shared
            .tcp_budget
            .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// The HTTP API as an axum router, for requests arriving through `transport`.
    pub fn router(&self, transport: Transport) -> axum::Router {
        api::router(self.clone(), transport)
    }

    /// Serves the API on `listener` until [`Agent::shutdown`], with the
    /// limits of [`server`] and a connection budget of its own.
    pub async fn serve_tcp(self, listener: TcpListener) -> std::io::Result<()> {
        let app = self.router(Transport::Tcp);
        let budget = self
            .shared
            .tcp_budget
            .load(std::sync::atomic::Ordering::Relaxed);
        server::serve(listener, app, budget, self.shared.shutdown.subscribe()).await
    }

    /// Serves the API on a unix socket until [`Agent::shutdown`] (see
    /// [`bind_unix`] to create one safely), with its own budget of
    /// [`server::MAX_UNIX_CONNECTIONS`]: a flood on TCP cannot take it.
    pub async fn serve_unix(self, listener: UnixListener) -> std::io::Result<()> {
        let app = self.router(Transport::Unix);
        server::serve(
            listener,
            app,
            server::MAX_UNIX_CONNECTIONS,
            self.shared.shutdown.subscribe(),
        )
        .await
    }

    /// Stops serving: streams and long polls end, running drains are
    /// cancelled (nothing is signalled) and their reports awaited briefly.
    pub async fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        self.shared.events.close();
        self.shared.drains.cancel_all(SHUTDOWN_GRACE).await;
    }
}

/// Longest token file accepted.
pub const MAX_TOKEN_FILE: u64 = 4096;
/// Shortest token accepted: 16 characters (e.g. `openssl rand -hex 16`
/// gives 32) keep guessing out of reach.
pub const MIN_TOKEN_LEN: usize = 16;

/// Reads a bearer token: the file's content without surrounding whitespace.
///
/// The file decides who can signal processes through the agent, so it must
/// be a regular file (a FIFO or a device would block or never end), owned
/// by root or the agent's user, readable by no one else, at most
/// [`MAX_TOKEN_FILE`] bytes, and hold a token of at least
/// [`MIN_TOKEN_LEN`] characters. Anything else is refused.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    use std::{
        io::Read as _,
        os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    };
    let shown = path.display();
    // Non-blocking: opening a FIFO must not wait for a writer.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("cannot open token file {shown}"))?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot inspect token file {shown}"))?;
    if !meta.file_type().is_file() {
        anyhow::bail!("token file {shown} is not a regular file");
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        anyhow::bail!(
            "token file {shown} is owned by uid {}: it must belong to root or to the agent's user",
            meta.uid()
        );
    }
    if meta.mode() & 0o077 != 0 {
        anyhow::bail!(
            "token file {shown} has mode {:03o}: group and others must have no access (chmod 600)",
            meta.mode() & 0o777
        );
    }
    if meta.len() > MAX_TOKEN_FILE {
        anyhow::bail!("token file {shown} is larger than {MAX_TOKEN_FILE} bytes");
    }
    let mut bytes = Vec::new();
    file.take(MAX_TOKEN_FILE + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read token file {shown}"))?;
    if bytes.len() as u64 > MAX_TOKEN_FILE {
        anyhow::bail!("token file {shown} is larger than {MAX_TOKEN_FILE} bytes");
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("token file {shown} is not UTF-8 text"))?;
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!("token file {shown} is empty");
    }
    if token.chars().any(|c| c.is_control() || c == ' ') {
        anyhow::bail!("token file {shown} holds spaces or control characters inside the token");
    }
    if token.chars().count() < MIN_TOKEN_LEN {
        anyhow::bail!(
            "the token in {shown} is shorter than {MIN_TOKEN_LEN} characters (make one with `openssl rand -hex 32`)"
        );
    }
    Ok(token.to_owned())
}

/// Refuses a directory for the agent's unix socket that others could
/// write to: they could replace the socket with theirs and receive the
/// drain requests of deploy tooling. Accepted: owned by root or the
/// agent's user and writable by no one else, or a root-owned sticky
/// directory like `/tmp` (where only the owner of an entry can remove it).
///
/// A missing directory is created, mode 0700 (its parent must exist): a
/// shared volume that everyone can write, like a Kubernetes `emptyDir`, is
/// used through a private directory of the agent's inside it.
pub fn check_socket_dir(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot create the socket directory {}", dir.display()));
        }
    }
    let meta = fs::metadata(dir)
        .with_context(|| format!("cannot inspect the socket directory {}", dir.display()))?;
    if !meta.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    let me = rustix::process::geteuid().as_raw();
    let writable_by_others = meta.mode() & 0o022 != 0;
    let sticky = meta.mode() & 0o1000 != 0;
    if meta.uid() != 0 && meta.uid() != me {
        anyhow::bail!(
            "the socket directory {} is owned by uid {}: it must belong to root or to the agent's user",
            dir.display(),
            meta.uid()
        );
    }
    if writable_by_others && !(sticky && meta.uid() == 0) {
        anyhow::bail!(
            "the socket directory {} is writable by group or others (mode {:o}): use a directory only the agent can write, e.g. /run/gracewatch",
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// Binds a unix socket that only its owner (and root) can connect to
/// (mode 0600, created so from the start). A stale socket left by an
/// earlier run is replaced; a live one, or any other kind of file, is not.
/// The directory must pass [`check_socket_dir`].
pub fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    check_socket_dir(path)?;
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "{} is in use by another process (another agent?)",
                    path.display()
                );
            }
            fs::remove_file(path)
                .with_context(|| format!("failed to remove stale socket {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket: refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("failed to inspect {}", path.display()));
        }
    }
    // The umask makes the socket 0600 at creation: no window in which
    // others could connect, and no chmod by path afterwards (which would
    // follow a symlink put in its place). Nothing else creates files at
    // this point: the monitor starts later.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.with_context(|| format!("failed to listen on {}", path.display()))?;
    // Checked without following links: what clients reach at `path` must
    // be this socket, private.
    let meta = fs::symlink_metadata(path)
        .with_context(|| format!("failed to inspect {}", path.display()))?;
    if !meta.file_type().is_socket() || meta.permissions().mode() & 0o077 != 0 {
        anyhow::bail!(
            "{} changed under the agent right after it was bound: refusing to serve on it",
            path.display()
        );
    }
    Ok(listener)
}

/// `gracewatch agent`: serves until SIGINT/SIGTERM (exit 0), or until the
/// monitor fails (exit 1; 4 if it cannot start for lack of privileges).
pub async fn run(opts: SourceOptions, args: AgentArgs) -> anyhow::Result<u8> {
    let token = match args.token_file.as_deref().map(read_token).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gracewatch: {e:#}");
            return Ok(exit::USAGE);
        }
    };
    if let Some(Err(e)) = args.unix.as_deref().map(check_socket_dir) {
        eprintln!("gracewatch: {e:#}");
        return Ok(exit::USAGE);
    }
    let budget = match server::fd_budget() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("gracewatch: {e:#}");
            return Ok(exit::USAGE);
        }
    };
    let agent = Agent::new(token);
    agent.set_max_tcp_connections(budget);
    agent.set_metric_labels(&args.metric_labels);
    let tcp =
        listen_tcp(args.listen).with_context(|| format!("failed to listen on {}", args.listen))?;
    let local = tcp.local_addr().unwrap_or(args.listen);
    let unix = args.unix.as_deref().map(bind_unix).transpose()?;
    let mut servers = vec![tokio::spawn(agent.clone().serve_tcp(tcp))];
    if let Some(unix) = unix {
        servers.push(tokio::spawn(agent.clone().serve_unix(unix)));
    }
    eprintln!(
        "gracewatch: agent serving http://{local}{} (ready once the monitor has started)",
        args.unix
            .as_deref()
            .map(|p| format!(" and unix:{}", p.display()))
            .unwrap_or_default()
    );

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // The monitor runs on a thread and runtime of its own: however busy
    // HTTP clients keep the agent's runtime, kernel events are read and
    // drains woken on time. Attaching and the startup snapshot block for a
    // while there too, so /livez answers meanwhile.
    let (monitor_thread, starting) = spawn_monitor_thread(opts)?;
    let started: anyhow::Result<Option<MonitorHandle>> = tokio::select! {
        r = starting => match r {
            Ok(Ok(handle)) => Ok(Some(handle)),
            Ok(Err(e)) => Err(anyhow::Error::new(e)),
            Err(_) => Err(anyhow::anyhow!("the monitor thread ended before the monitor started")),
        },
        _ = tokio::signal::ctrl_c() => Ok(None),
        _ = sigterm.recv() => Ok(None),
    };
    // Turned on once the programs loaded: without the privileges for that,
    // the monitor's error is the one worth reading.
    let mut stats_fd = None;
    let result = match started {
        Ok(Some(handle)) => {
            if args.bpf_stats {
                match enable_run_time_stats() {
                    Ok(fd) => stats_fd = Some(fd),
                    Err(e) => {
                        log::warn!("{e:#}: gracewatch_bpf_run_time_seconds_total will stay flat")
                    }
                }
            }
            agent.set_bpf_stats_enabled(stats_fd.is_some() || sysctl_bpf_stats());
            agent.set_monitor(handle.clone());
            if let Some(governor) = args.governor.governor() {
                eprintln!("gracewatch: {}", governor::summary(&governor));
                agent.start_governor(governor);
            }
            let mut status = handle.subscribe();
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break Ok(exit::OK),
                    _ = sigterm.recv() => break Ok(exit::OK),
                    r = status.changed() => if r.is_err() {
                        break Err(anyhow::anyhow!("{}", handle.stopped()));
                    },
                }
            }
        }
        Ok(None) => Ok(exit::OK),
        Err(e) => Err(e),
    };

    agent.shutdown().await;
    for server in servers {
        match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => log::warn!("HTTP server failed: {e}"),
            Ok(Err(e)) => log::warn!("HTTP server task failed: {e}"),
            Err(_) => log::warn!("HTTP connections still open after {SHUTDOWN_GRACE:?}: closing"),
        }
    }
    if let Some(path) = &args.unix {
        let _ = fs::remove_file(path);
    }
    drop(stats_fd);
    drop(agent);
    // Dropping the last handle ends the monitor; its thread detaches the
    // programs and exits.
    monitor_thread.stop();
    result
}

/// Connections the kernel completes for the agent before it accepts them:
/// a burst of clients (a fleet's scrapers, or an attacker) waits there
/// instead of having its SYNs dropped (the kernel caps it at somaxconn).
const LISTEN_BACKLOG: u32 = 4096;

fn listen_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The thread the monitor runs on, with its own single-threaded runtime.
struct MonitorThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl MonitorThread {
    fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

type Started = tokio::sync::oneshot::Receiver<Result<MonitorHandle, crate::monitor::MonitorError>>;

/// Starts [`Monitor::spawn`] on a thread of its own and returns how to
/// stop it, and the handle once the monitor started.
fn spawn_monitor_thread(opts: SourceOptions) -> anyhow::Result<(MonitorThread, Started)> {
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the monitor's runtime")?;
    std::thread::Builder::new()
        .name("gracewatch-monitor".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                let _ = started_tx.send(Monitor::spawn(opts));
                // The monitor task runs on this runtime until the agent is
                // done (or drops the receiver).
                let _ = stop.await;
            });
        })
        .context("failed to spawn the monitor thread")?;
    Ok((
        MonitorThread {
            stop: Some(stop_tx),
        },
        started,
    ))
}

/// Whether `sysctl kernel.bpf_stats_enabled` is on (someone else turned
/// the statistics on for the whole host).
fn sysctl_bpf_stats() -> bool {
    fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}
