//! The load processes the benchmarks start inside their network
//! namespaces (`gracewatch-bench bench-helper …`, hidden): servers and clients
//! that hold tens of thousands of sockets or open and close them as fast as
//! the machine allows, which the Python test programs cannot do. Each one
//! prints `ready PID` first and reports on stdout; every loop is bounded in
//! time, and each exits when its stdin closes (the benchmark's guard
//! dropped it) or at a hard deadline.
//!
//! - `scale-server` / `scale-client`: N established connections, the
//!   clients bound to many `127.1.x.y` source addresses (1,000 each) so
//!   that no address runs out of ephemeral ports;
//! - `churn-server`: a server that performs the classic fd-handover restart
//!   on SIGHUP (like `server.py handover`: the next generation inherits the
//!   listening socket, the old one stops accepting and keeps what it holds),
//!   answers `x` with `y` and closes after the client, holds connections
//!   that start with `h` until their client leaves, and publishes its exact
//!   counts (the truth gracewatch is compared with) in a state file;
//! - `churn-client`: closed-loop clients (connect, `x`, read `y`, close);
//! - `churn-hold`: holds connections on command (`open K`, `close K`).

use std::{
    fs,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;

/// No helper runs longer than this, whatever happens to its parent.
const MAX_LIFETIME: Duration = Duration::from_secs(20 * 60);

#[derive(Debug, Subcommand)]
pub enum Helper {
    /// Accepts COUNT connections and holds them until stdin closes.
    ScaleServer {
        #[arg(long)]
        listen: SocketAddrV4,
        #[arg(long)]
        count: u32,
    },
    /// Opens COUNT connections from 127.1.x.y sources and holds them.
    ScaleClient {
        #[arg(long)]
        connect: SocketAddrV4,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 1000)]
        per_source: u32,
        /// Number of the first source address (so that clients differ).
        #[arg(long, default_value_t = 0)]
        first_source: u32,
    },
    /// The handover server (see the module documentation).
    ChurnServer {
        #[arg(long, conflicts_with = "inherit_fd")]
        listen: Option<SocketAddrV4>,
        #[arg(long)]
        inherit_fd: Option<RawFd>,
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, default_value_t = 8)]
        threads: u32,
    },
    /// Closed-loop short connections for SECS seconds.
    ChurnClient {
        #[arg(long)]
        connect: SocketAddrV4,
        #[arg(long)]
        threads: u32,
        #[arg(long)]
        secs: u64,
    },
    /// Opens and closes long-lived connections on command.
    ChurnHold {
        #[arg(long)]
        connect: SocketAddrV4,
    },
}

pub fn run(h: Helper) -> Result<()> {
    // Die with the parent (the benchmark, or the previous generation), even
    // if it is SIGKILLed and its guards never run.
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    match h {
        Helper::ScaleServer { listen, count } => scale_server(listen, count),
        Helper::ScaleClient {
            connect,
            count,
            per_source,
            first_source,
        } => scale_client(connect, count, per_source, first_source),
        Helper::ChurnServer {
            listen,
            inherit_fd,
            state_dir,
            threads,
        } => churn_server(listen, inherit_fd, &state_dir, threads),
        Helper::ChurnClient {
            connect,
            threads,
            secs,
        } => churn_client(connect, threads, Duration::from_secs(secs)),
        Helper::ChurnHold { connect } => churn_hold(connect),
    }
}

fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Exits the process when stdin reaches EOF (the parent is gone or done).
fn exit_on_stdin_eof() {
    thread::spawn(|| {
        let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
        std::process::exit(0);
    });
}

fn exit_at_deadline() {
    thread::spawn(|| {
        thread::sleep(MAX_LIFETIME);
        std::process::exit(1);
    });
}

// ---- sockets ----------------------------------------------------------------------

/// Raises RLIMIT_NOFILE to `n` if the hard limit allows or we may raise it
/// (CAP_SYS_RESOURCE), else to the hard limit: callers that need more
/// fail later, at the fd that does not fit, and say how far they got.
fn raise_nofile(n: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(io::Error::last_os_error()).context("failed to read RLIMIT_NOFILE");
    }
    let want = libc::rlimit {
        rlim_cur: n.max(lim.rlim_cur),
        rlim_max: n.max(lim.rlim_max),
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const want) } == 0 {
        return Ok(());
    }
    let capped = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const capped) } != 0 {
        return Err(io::Error::last_os_error()).context("failed to raise RLIMIT_NOFILE");
    }
    Ok(())
}

/// The hard RLIMIT_NOFILE of this process.
pub(super) fn nofile_hard_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_max
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn tcp_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) has no memory effects; we own the new fd.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads an int from the pointer we pass.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// A listening socket with a backlog the 100k connect burst fits in
/// (capped by `net.core.somaxconn`).
fn listen_socket(addr: SocketAddrV4) -> io::Result<OwnedFd> {
    let fd = tcp_socket()?;
    set_int_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    let sa = sockaddr(addr);
    // SAFETY: bind and listen read the sockaddr we pass, on our fd.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    // SAFETY: as above.
    check(unsafe { libc::listen(fd.as_raw_fd(), 65535) })?;
    Ok(fd)
}

/// Connects from `src` (port chosen at connect time, per 4-tuple:
/// IP_BIND_ADDRESS_NO_PORT) to `dst`.
fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<OwnedFd> {
    const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;
    let fd = tcp_socket()?;
    set_int_opt(fd.as_raw_fd(), libc::IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)?;
    let local = sockaddr(SocketAddrV4::new(src, 0));
    let remote = sockaddr(dst);
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: bind and connect read the sockaddrs we pass, on our fd.
    check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const local).cast(), len) })?;
    loop {
        // SAFETY: as above.
        match check(unsafe { libc::connect(fd.as_raw_fd(), (&raw const remote).cast(), len) }) {
            Ok(_) => return Ok(fd),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn accept(listener: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: accept4 with null address pointers only returns a new fd.
    let fd = check(unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: the fd was just accepted and is ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `fd` becomes readable within `timeout_ms`.
fn poll_in(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd we pass.
    unsafe { libc::poll(&raw mut p, 1, timeout_ms) > 0 }
}

/// The 127.1.x.y (or 127.2.x.y…) source address number `k`.
fn source_addr(second: u8, k: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, second, ((k / 250) % 250) as u8, (k % 250 + 1) as u8)
}

// ---- scale ------------------------------------------------------------------------

fn scale_server(listen: SocketAddrV4, count: u32) -> Result<()> {
    raise_nofile(u64::from(count) + 4096)?;
    exit_at_deadline();
    let listener =
        listen_socket(listen).with_context(|| format!("failed to listen on {listen}"))?;
    say(&format!("ready {}", std::process::id()));
    exit_on_stdin_eof();
    let mut held = Vec::with_capacity(count as usize);
    while held.len() < count as usize {
        match accept(listener.as_raw_fd()) {
            Ok(fd) => held.push(fd),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                say(&format!("failed accepted={} error={e}", held.len()));
                break;
            }
        }
        if held.len() % 10_000 == 0 {
            say(&format!("accepted {}", held.len()));
        }
    }
    say(&format!("done accepted={}", held.len()));
    loop {
        thread::park();
    }
}

fn scale_client(
    connect: SocketAddrV4,
    count: u32,
    per_source: u32,
    first_source: u32,
) -> Result<()> {
    raise_nofile(u64::from(count) + 4096)?;
    exit_at_deadline();
    say(&format!("ready {}", std::process::id()));
    exit_on_stdin_eof();
    let mut held = Vec::with_capacity(count as usize);
    for i in 0..count {
        match connect_from(
            source_addr(1, first_source + i / per_source.max(1)),
            connect,
        ) {
            Ok(fd) => held.push(fd),
            Err(e) => {
                say(&format!("failed connected={} error={e}", held.len()));
                break;
            }
        }
        if held.len() % 10_000 == 0 {
            say(&format!("connected {}", held.len()));
        }
    }
    say(&format!("done connected={}", held.len()));
    loop {
        thread::park();
    }
}

// ---- churn ------------------------------------------------------------------------

/// A generation's exact counts.
#[derive(Default)]
struct Counts {
    accepted: AtomicU64,
    closed: AtomicU64,
    inflight: AtomicU64,
    accepting: AtomicBool,
}

static HANGUP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_hangup(_: libc::c_int) {
    HANGUP.store(true, Ordering::Relaxed);
}

fn churn_server(
    listen: Option<SocketAddrV4>,
    inherit_fd: Option<RawFd>,
    state_dir: &Path,
    threads: u32,
) -> Result<()> {
    raise_nofile(1 << 16)?;
    exit_at_deadline();
    // SAFETY: the handler only stores to an atomic, which is signal-safe.
    unsafe {
        libc::signal(libc::SIGHUP, on_hangup as *const () as libc::sighandler_t);
    }
    let listener = match (listen, inherit_fd) {
        (Some(addr), None) => {
            listen_socket(addr).with_context(|| format!("failed to listen on {addr}"))?
        }
        // SAFETY: the previous generation passed this fd for us to own.
        (None, Some(fd)) => unsafe { OwnedFd::from_raw_fd(fd) },
        _ => bail!("churn-server needs --listen or --inherit-fd"),
    };
    // Non-blocking (a flag of the open file description, so both
    // generations see it): the other generation or another thread may win
    // the race for a connection that poll() announced.
    // SAFETY: fcntl on the listener we hold.
    unsafe {
        let flags = libc::fcntl(listener.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(
            listener.as_raw_fd(),
            libc::F_SETFL,
            flags | libc::O_NONBLOCK,
        );
    }
    let listener = Arc::new(listener);
    let counts = Arc::new(Counts::default());
    counts.accepting.store(true, Ordering::Relaxed);
    let held: Arc<Mutex<Vec<OwnedFd>>> = Arc::default();
    let pid = std::process::id();

    let mut acceptors = Vec::new();
    for _ in 0..threads.max(1) {
        let (listener, counts, held) = (
            Arc::clone(&listener),
            Arc::clone(&counts),
            Arc::clone(&held),
        );
        acceptors.push(thread::spawn(move || {
            churn_accept_loop(listener.as_raw_fd(), &counts, &held)
        }));
    }
    {
        let (counts, held) = (Arc::clone(&counts), Arc::clone(&held));
        thread::spawn(move || reap_held(&counts, &held));
    }
    {
        let (counts, held, path) = (
            Arc::clone(&counts),
            Arc::clone(&held),
            state_dir.join(pid.to_string()),
        );
        thread::spawn(move || {
            loop {
                publish_state(&path, &counts, &held);
                thread::sleep(Duration::from_millis(20));
            }
        });
    }
    say(&format!("ready {pid}"));

    let started = Instant::now();
    let mut handed_over = false;
    while started.elapsed() < MAX_LIFETIME {
        thread::sleep(Duration::from_millis(5));
        if HANGUP.swap(false, Ordering::Relaxed) && !handed_over {
            let child = hand_over(listener.as_raw_fd(), state_dir, threads)?;
            // The next generation accepts now: stop, and keep what we hold.
            counts.accepting.store(false, Ordering::Relaxed);
            for a in acceptors.drain(..) {
                let _ = a.join();
            }
            eprintln!("churn-server {pid}: handed the listener to {child}");
            handed_over = true;
        }
    }
    Ok(())
}

/// Starts the next generation with the listener; returns once it is ready.
fn hand_over(fd: RawFd, state_dir: &Path, threads: u32) -> Result<u32> {
    // SAFETY: fcntl on our fd: clearing FD_CLOEXEC lets the child inherit it.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == -1 {
        bail!("failed to clear FD_CLOEXEC on the listener");
    }
    let me = std::env::current_exe().context("failed to find this binary")?;
    let mut child = Command::new(me)
        .args([
            "bench-helper",
            "churn-server",
            "--inherit-fd",
            &fd.to_string(),
            "--state-dir",
        ])
        .arg(state_dir)
        .args(["--threads", &threads.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("failed to start the next generation")?;
    // SAFETY: as above; close-on-exec again.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    if !line.starts_with("ready ") {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the next generation did not get ready (said {line:?})");
    }
    say(&format!("child {}", child.id()));
    // Not reaped: it outlives us if need be; the benchmark kills the group.
    Ok(child.id())
}

fn churn_accept_loop(listener: RawFd, counts: &Counts, held: &Mutex<Vec<OwnedFd>>) {
    while counts.accepting.load(Ordering::Relaxed) {
        if !poll_in(listener, 20) {
            continue;
        }
        let Ok(conn) = accept(listener) else { continue };
        counts.accepted.fetch_add(1, Ordering::Relaxed);
        counts.inflight.fetch_add(1, Ordering::Relaxed);
        let mut stream = TcpStream::from(conn);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'h' => {
                held.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(OwnedFd::from(stream));
            }
            Ok(1) if byte[0] == b'x' => {
                // Answer, then close after the client (its FIN first).
                if stream.write_all(b"y").is_ok() {
                    let mut rest = [0u8; 16];
                    while matches!(stream.read(&mut rest), Ok(n) if n > 0) {}
                }
                drop(stream);
                counts.closed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                drop(stream);
                counts.closed.fetch_add(1, Ordering::Relaxed);
            }
        }
        counts.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Closes held connections whose client left (EOF or reset).
fn reap_held(counts: &Counts, held: &Mutex<Vec<OwnedFd>>) {
    loop {
        thread::sleep(Duration::from_millis(10));
        let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_empty() {
            continue;
        }
        let mut fds: Vec<libc::pollfd> = held
            .iter()
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            })
            .collect();
        // SAFETY: poll reads and writes the array we pass, of that length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        if n <= 0 {
            continue;
        }
        let gone: Vec<RawFd> = fds
            .iter()
            .filter(|p| p.revents != 0)
            .map(|p| p.fd)
            .collect();
        let before = held.len();
        held.retain(|fd| !gone.contains(&fd.as_raw_fd()));
        counts
            .closed
            .fetch_add((before - held.len()) as u64, Ordering::Relaxed);
    }
}

fn publish_state(path: &Path, counts: &Counts, held: &Mutex<Vec<OwnedFd>>) {
    let held = held.lock().unwrap_or_else(|e| e.into_inner()).len();
    let line = format!(
        "accepted={} closed={} held={held} inflight={} accepting={}\n",
        counts.accepted.load(Ordering::Relaxed),
        counts.closed.load(Ordering::Relaxed),
        counts.inflight.load(Ordering::Relaxed),
        u8::from(counts.accepting.load(Ordering::Relaxed)),
    );
    let tmp = path.with_extension("tmp");
    if fs::write(&tmp, line).is_ok() {
        let _ = fs::rename(&tmp, path);
    }
}

fn churn_client(connect: SocketAddrV4, threads: u32, secs: Duration) -> Result<()> {
    raise_nofile(1 << 16)?;
    exit_at_deadline();
    say(&format!("ready {}", std::process::id()));
    exit_on_stdin_eof();
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + secs;
    let workers: Vec<_> = (0..threads.max(1))
        .map(|t| {
            let (done, errors) = (Arc::clone(&done), Arc::clone(&errors));
            thread::spawn(move || {
                let mut k = t * 7919;
                while Instant::now() < end {
                    k = k.wrapping_add(1);
                    match one_exchange(source_addr(2, k % 62_500), connect) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    let start = Instant::now();
    let mut last = 0;
    let mut sec = 0;
    while Instant::now() < end {
        sec += 1;
        let next = start + Duration::from_secs(sec);
        thread::sleep(next.saturating_duration_since(Instant::now()));
        let now = done.load(Ordering::Relaxed);
        say(&format!(
            "sec {sec} conns {} errors {}",
            now - last,
            errors.load(Ordering::Relaxed)
        ));
        last = now;
    }
    for w in workers {
        let _ = w.join();
    }
    say(&format!(
        "done total={} errors={} secs={:.3}",
        done.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn one_exchange(src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<()> {
    let mut s = TcpStream::from(connect_from(src, dst)?);
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    if s.read(&mut b)? != 1 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn churn_hold(connect: SocketAddrV4) -> Result<()> {
    exit_at_deadline();
    say(&format!("ready {}", std::process::id()));
    let mut held: Vec<TcpStream> = Vec::new();
    let mut k = 0;
    for line in io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["open", n] => {
                for _ in 0..n.parse::<u32>()? {
                    k += 1;
                    let mut s = TcpStream::from(connect_from(source_addr(3, k), connect)?);
                    s.write_all(b"h")?;
                    held.push(s);
                }
                say(&format!("opened {}", held.len()));
            }
            ["close", n] => {
                let n = n.parse::<usize>()?.min(held.len());
                held.drain(..n);
                say(&format!("closed {n} open={}", held.len()));
            }
            _ => say(&format!("error unknown command {line:?}")),
        }
    }
    Ok(())
}
