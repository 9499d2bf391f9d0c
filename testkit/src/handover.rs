//! The fd-handover server, written once for the demo (`demo-server`) and
//! the churn benchmark (`bench-helper churn-server`), both in
//! `gracewatch-bench`, and for anything else that needs the classic
//! graceful restart in Rust. (`tests/programs/server.py handover` stays as
//! the e2e tests' own server: a second implementation, in another language,
//! on purpose.)
//!
//! The restart: on SIGHUP (once per generation) the server clears
//! close-on-exec on its listening socket and starts the next generation,
//! the command line of [`Config::next_generation`] plus `--inherit-fd FD`.
//! The next generation adopts that socket ([`Listen::Inherit`]) and prints
//! `ready PID`; only then does the old one stop accepting (its acceptor
//! threads end), close its copy of the socket, print `child PID` and keep
//! serving what it holds. Both
//! generations share one open file description, made non-blocking, so
//! either may lose the race for a connection that `poll` announced.
//!
//! What a client gets depends on its first byte:
//! - `x`: answered `y`, then closed after the client (its FIN first): the
//!   churn benchmark's short connections;
//! - `h`: held, unanswered, until the client leaves (EOF or reset): the
//!   churn benchmark's long-lived connections;
//! - anything else: a line conversation, each line answered `pong`, until
//!   the client leaves or is silent for two minutes: the demo's clients;
//! - nothing within five seconds, or EOF: closed.
//!
//! The union of what the demo and the benchmark need, each optional in
//! [`Config`]: exact counts per generation (accepted, closed, held,
//! in flight, accepting) published every 20 ms to `STATE_DIR/PID` for a
//! benchmark to compare gracewatch with; a pid file rewritten by every
//! generation (where the demo sends SIGHUP); the process name (what
//! gracewatch shows); an old generation that exits a while after it
//! drained, or stays until killed; and a bound on its whole lifetime.
//! Stdout carries only `ready PID` and `child PID`; log lines go to
//! stderr.
//!
//! The socket calls the server and its load clients make (a listener with
//! a deep backlog, `accept4`, connecting from a chosen source address) are
//! here too, so that a benchmark's clients use the same ones.

use std::{
    ffi::{CString, OsStr, OsString},
    fs,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// How long the next generation may take to print `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that sends nothing this long after connecting is closed.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(5);
/// A line-conversation client silent this long is closed.
const LINE_TIMEOUT: Duration = Duration::from_secs(120);
/// The backlog of a listener we create (capped by `net.core.somaxconn`):
/// a benchmark's connect bursts fit in it.
const BACKLOG: libc::c_int = 65535;

/// Where the listening socket comes from.
#[derive(Clone, Copy, Debug)]
pub enum Listen {
    /// Bind and listen (the first generation).
    Bind(SocketAddrV4),
    /// Adopt this fd, passed by the previous generation (`--inherit-fd`).
    Inherit(RawFd),
}

/// One generation of the server.
#[derive(Clone, Debug)]
pub struct Config {
    /// Prefix of its log lines (`NAME PID: …`) and, with
    /// [`Config::set_process_name`], its process name (at most 15 bytes).
    pub name: String,
    /// Name the process [`Config::name`] (`PR_SET_NAME`), so that `ps` and
    /// gracewatch show it rather than the binary's name.
    pub set_process_name: bool,
    pub listen: Listen,
    /// Program and arguments of the next generation, without the
    /// `--inherit-fd FD` that the handover appends.
    pub next_generation: Vec<OsString>,
    /// Threads accepting (and answering `x`) in parallel.
    pub acceptors: u32,
    /// Publish the counts to `STATE_DIR/PID` (see the module documentation).
    pub state_dir: Option<PathBuf>,
    /// Write this process's pid here (every generation overwrites it).
    pub pidfile: Option<PathBuf>,
    /// After a handover, exit once nothing was live for this long (`None`:
    /// stay until killed or [`Config::max_lifetime`]).
    pub exit_after_drain: Option<Duration>,
    /// After a handover, exit at the latest this long after it.
    pub max_after_handover: Option<Duration>,
    /// Return at the latest this long after starting, whatever happens.
    pub max_lifetime: Duration,
}

impl Config {
    /// A generation named `name` whose next generation is this same binary
    /// run with `args` (then `--inherit-fd FD`); one acceptor, nothing
    /// published, no pid file, kept after a handover, an hour at most.
    pub fn this_binary(name: &str, listen: Listen, args: &[&OsStr]) -> Result<Config> {
        let me = std::env::current_exe().context("failed to find this binary")?;
        let mut next_generation = vec![me.into_os_string()];
        next_generation.extend(args.iter().map(|&a| a.to_owned()));
        Ok(Config {
            name: name.to_owned(),
            set_process_name: false,
            listen,
            next_generation,
            acceptors: 1,
            state_dir: None,
            pidfile: None,
            exit_after_drain: None,
            max_after_handover: None,
            max_lifetime: Duration::from_secs(3600),
        })
    }
}

/// A generation's exact counts; live = accepted − closed.
#[derive(Default)]
struct Counts {
    accepted: AtomicU64,
    closed: AtomicU64,
    /// Accepted and not yet closed or held: being answered.
    inflight: AtomicU64,
    accepting: AtomicBool,
}

impl Counts {
    fn live(&self) -> u64 {
        let accepted = self.accepted.load(Ordering::Relaxed);
        accepted.saturating_sub(self.closed.load(Ordering::Relaxed))
    }

    fn close_one(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connections held until their client leaves.
type Held = Mutex<Vec<OwnedFd>>;

static HANGUP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_hangup(_: libc::c_int) {
    HANGUP.store(true, Ordering::Relaxed);
}

/// Runs one generation until it exits (see [`Config`]).
pub fn serve(config: &Config) -> Result<()> {
    let pid = std::process::id();
    let name = &config.name;
    if config.set_process_name {
        set_process_name(name)?;
    }
    // SAFETY: the handler only stores to an atomic, which is signal-safe.
    let previous =
        unsafe { libc::signal(libc::SIGHUP, on_hangup as *const () as libc::sighandler_t) };
    if previous == libc::SIG_ERR {
        bail!("failed to handle SIGHUP");
    }
    let listener = match config.listen {
        Listen::Bind(addr) => {
            listen_socket(addr).with_context(|| format!("failed to listen on {addr}"))?
        }
        // SAFETY: the previous generation passed this fd for us alone to own.
        Listen::Inherit(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
    };
    set_nonblocking(listener.as_raw_fd()).context("failed to make the listener non-blocking")?;
    if let Some(pidfile) = &config.pidfile {
        fs::write(pidfile, format!("{pid}\n"))
            .with_context(|| format!("failed to write {}", pidfile.display()))?;
    }

    // `None` once handed over: our copy is closed then.
    let mut listener = Some(Arc::new(listener));
    let counts = Arc::new(Counts::default());
    counts.accepting.store(true, Ordering::Relaxed);
    let held: Arc<Held> = Arc::default();
    let mut acceptors = Vec::new();
    for _ in 0..config.acceptors.max(1) {
        let (listener, counts, held) = (listener.clone(), Arc::clone(&counts), Arc::clone(&held));
        acceptors.push(
            thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    if let Some(listener) = listener {
                        accept_loop(listener.as_raw_fd(), &counts, &held);
                    }
                })
                .context("failed to start an acceptor thread")?,
        );
    }
    {
        let (counts, held) = (Arc::clone(&counts), Arc::clone(&held));
        thread::spawn(move || reap_held(&counts, &held));
    }
    if let Some(dir) = &config.state_dir {
        let (counts, held, path) = (
            Arc::clone(&counts),
            Arc::clone(&held),
            dir.join(pid.to_string()),
        );
        thread::spawn(move || {
            loop {
                publish_state(&path, &counts, &held);
                thread::sleep(Duration::from_millis(20));
            }
        });
    }
    match config.listen {
        Listen::Bind(addr) => eprintln!("{name} {pid}: accepting on {addr}"),
        Listen::Inherit(fd) => eprintln!("{name} {pid}: accepting on inherited fd {fd}"),
    }
    say(&format!("ready {pid}"));

    let started = Instant::now();
    let mut handed_over: Option<Instant> = None;
    let mut drained: Option<Instant> = None;
    while started.elapsed() < config.max_lifetime {
        thread::sleep(Duration::from_millis(5));
        let hangup = HANGUP.swap(false, Ordering::Relaxed);
        if let Some(fd) = listener.as_ref().filter(|_| hangup).map(|l| l.as_raw_fd()) {
            match hand_over(fd, &config.next_generation) {
                Ok(child) => {
                    // The next generation accepts now: stop, keep what we
                    // hold, and close our copy of the listener (the last
                    // reference once the acceptors returned) so that
                    // gracewatch sees this generation let go of it.
                    counts.accepting.store(false, Ordering::Relaxed);
                    for a in acceptors.drain(..) {
                        let _ = a.join();
                    }
                    listener = None;
                    handed_over = Some(Instant::now());
                    say(&format!("child {child}"));
                    eprintln!(
                        "{name} {pid}: handed the listener to {child}; draining {} connection(s)",
                        counts.live()
                    );
                }
                Err(e) => eprintln!("{name} {pid}: handover failed: {e:#}"),
            }
        }
        let Some(since) = handed_over else { continue };
        if let Some(linger) = config.exit_after_drain {
            if counts.live() == 0 {
                if drained.get_or_insert_with(Instant::now).elapsed() >= linger {
                    break;
                }
            } else {
                drained = None;
            }
        }
        if config
            .max_after_handover
            .is_some_and(|max| since.elapsed() >= max)
        {
            break;
        }
    }
    eprintln!("{name} {pid}: exiting");
    Ok(())
}

/// One line on stdout, flushed; a closed stdout (the previous generation
/// read its `ready` line and went) is not an error.
fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn set_process_name(name: &str) -> Result<()> {
    let name = CString::new(name).context("process name with a NUL byte")?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string and copies at most
    // 16 bytes of it.
    if unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error()).context("failed to set the process name");
    }
    Ok(())
}

/// Starts the next generation with the listener; returns its pid once it
/// printed `ready`.
fn hand_over(fd: RawFd, next: &[OsString]) -> Result<u32> {
    let (program, args) = next.split_first().context("no next-generation command")?;
    set_cloexec(fd, false).context("failed to clear FD_CLOEXEC on the listener")?;
    let spawned = Command::new(program)
        .args(args)
        .args(["--inherit-fd", &fd.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn();
    // Close-on-exec again, so that nothing else we start inherits it.
    let restored = set_cloexec(fd, true);
    let mut child = spawned.context("failed to start the next generation")?;
    restored.context("failed to set FD_CLOEXEC on the listener again")?;
    let out = child
        .stdout
        .take()
        .context("no stdout of the next generation")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(READY_TIMEOUT).unwrap_or_default();
    if !line.starts_with("ready") {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the next generation did not get ready (said {line:?})");
    }
    // Not reaped: it outlives us (adopted by init), or whoever started the
    // first generation kills its process group.
    Ok(child.id())
}

fn accept_loop(listener: RawFd, counts: &Arc<Counts>, held: &Held) {
    while counts.accepting.load(Ordering::Relaxed) {
        if !poll_in(listener, 20) {
            continue;
        }
        // Nothing to accept: another thread or generation won the race.
        let Ok(conn) = accept(listener) else { continue };
        counts.accepted.fetch_add(1, Ordering::Relaxed);
        counts.inflight.fetch_add(1, Ordering::Relaxed);
        let mut stream = TcpStream::from(conn);
        let _ = stream.set_read_timeout(Some(FIRST_BYTE_TIMEOUT));
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'h' => {
                held.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(OwnedFd::from(stream));
                counts.inflight.fetch_sub(1, Ordering::Relaxed);
            }
            Ok(1) if byte[0] == b'x' => {
                // Answer, then close after the client (its FIN first).
                if stream.write_all(b"y").is_ok() {
                    let mut rest = [0u8; 16];
                    while matches!(stream.read(&mut rest), Ok(n) if n > 0) {}
                }
                drop(stream);
                counts.close_one();
            }
            Ok(1) => {
                // A thread per conversation: it may last minutes.
                let (first, done) = (byte[0], Arc::clone(counts));
                let spawned = thread::Builder::new()
                    .name("conversation".to_owned())
                    .spawn(move || {
                        converse(stream, first);
                        done.close_one();
                    });
                if spawned.is_err() {
                    // The stream went with the closure: closed already.
                    counts.close_one();
                }
            }
            _ => {
                drop(stream);
                counts.close_one();
            }
        }
    }
}

/// Answers each line with `pong` until the client leaves or goes silent.
fn converse(stream: TcpStream, first: u8) {
    let _ = stream.set_read_timeout(Some(LINE_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    // The first byte was read already: finish its line unless it ended it.
    let mut complete = first == b'\n' || reader.read_until(b'\n', &mut line).is_ok();
    while complete {
        if writer.write_all(b"pong\n").is_err() {
            break;
        }
        line.clear();
        complete = matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0);
    }
    let _ = writer.shutdown(Shutdown::Both);
}

/// Closes held connections whose client left (EOF or reset).
fn reap_held(counts: &Counts, held: &Held) {
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

/// Writes `accepted=A closed=C held=H inflight=I accepting=0|1` to `path`
/// (through a temporary file and a rename, so that readers see whole lines).
fn publish_state(path: &Path, counts: &Counts, held: &Held) {
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

// ---- sockets ----------------------------------------------------------------------

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
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

const SOCKADDR_IN_LEN: libc::socklen_t = size_of::<libc::sockaddr_in>() as libc::socklen_t;

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

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we hold, reading and setting its status flags.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: fcntl on an fd we hold, setting its descriptor flags.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, flags) }).map(drop)
}

/// A close-on-exec listening socket on `addr` (SO_REUSEADDR) with a
/// backlog a 100k connect burst fits in (capped by `net.core.somaxconn`).
pub fn listen_socket(addr: SocketAddrV4) -> io::Result<OwnedFd> {
    let fd = tcp_socket()?;
    set_int_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    let sa = sockaddr(addr);
    // SAFETY: bind reads the sockaddr we pass, on our fd.
    check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), SOCKADDR_IN_LEN) })?;
    // SAFETY: listen on our fd.
    check(unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) })?;
    Ok(fd)
}

/// The next connection on `listener`, close-on-exec and blocking.
pub fn accept(listener: RawFd) -> io::Result<OwnedFd> {
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

/// Connects from `src` to `dst`, the source port chosen at connect time
/// per 4-tuple (IP_BIND_ADDRESS_NO_PORT), so that many connections from
/// one address to different servers do not exhaust its ports.
pub fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<OwnedFd> {
    const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;
    let fd = tcp_socket()?;
    set_int_opt(fd.as_raw_fd(), libc::IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)?;
    let (local, remote) = (sockaddr(SocketAddrV4::new(src, 0)), sockaddr(dst));
    // SAFETY: bind reads the sockaddr we pass, on our fd.
    check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const local).cast(), SOCKADDR_IN_LEN) })?;
    loop {
        // SAFETY: connect reads the sockaddr we pass, on our fd.
        let ret =
            unsafe { libc::connect(fd.as_raw_fd(), (&raw const remote).cast(), SOCKADDR_IN_LEN) };
        match check(ret) {
            Ok(_) => return Ok(fd),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::fd::IntoRawFd as _};

    use super::*;

    /// The three kinds of client and the published counts, on one
    /// generation (the handover itself re-executes a binary: the demo and
    /// the churn benchmark exercise it).
    #[test]
    fn answers_each_kind_of_client_and_publishes_exact_counts() {
        let fd = listen_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).expect("listen");
        let addr = TcpListener::from(fd.try_clone().expect("dup"))
            .local_addr()
            .expect("local address");
        let dir = std::env::temp_dir().join(format!("testkit-handover-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("state dir");
        let config = Config {
            name: "handover-test".to_owned(),
            set_process_name: false,
            listen: Listen::Inherit(fd.into_raw_fd()),
            next_generation: Vec::new(),
            acceptors: 2,
            state_dir: Some(dir.clone()),
            pidfile: None,
            exit_after_drain: None,
            max_after_handover: None,
            max_lifetime: Duration::from_secs(2),
        };
        let server = thread::spawn(move || serve(&config));

        let mut short = TcpStream::connect(addr).expect("connect x");
        short.write_all(b"x").expect("send x");
        let mut answer = [0u8; 1];
        short.read_exact(&mut answer).expect("read y");
        assert_eq!(&answer, b"y");
        drop(short);

        let mut talk = TcpStream::connect(addr).expect("connect line");
        let mut lines = BufReader::new(talk.try_clone().expect("clone"));
        for _ in 0..2 {
            talk.write_all(b"ping\n").expect("send ping");
            let mut line = String::new();
            lines.read_line(&mut line).expect("read pong");
            assert_eq!(line, "pong\n");
        }
        drop((talk, lines));

        let mut held = TcpStream::connect(addr).expect("connect h");
        held.write_all(b"h").expect("send h");
        let state = dir.join(std::process::id().to_string());
        let wait_for = |want: &str| {
            let deadline = Instant::now() + Duration::from_secs(1);
            loop {
                let text = fs::read_to_string(&state).unwrap_or_default();
                if text.trim() == want || Instant::now() > deadline {
                    return text.trim().to_owned();
                }
                thread::sleep(Duration::from_millis(10));
            }
        };
        let want = "accepted=3 closed=2 held=1 inflight=0 accepting=1";
        assert_eq!(wait_for(want), want);
        drop(held);
        let want = "accepted=3 closed=3 held=0 inflight=0 accepting=1";
        assert_eq!(wait_for(want), want);

        server.join().expect("server thread").expect("serve");
        let _ = fs::remove_dir_all(&dir);
    }
}
