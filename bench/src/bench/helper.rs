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
//! - `churn-server`: the test kit's fd-handover server
//!   (`gracewatch_testkit::handover`, like `server.py handover`: the next
//!   generation inherits the listening socket on SIGHUP, the old one stops
//!   accepting and keeps what it holds), which answers `x` with `y` and
//!   closes after the client, holds connections that start with `h` until
//!   their client leaves, and publishes its exact counts (the truth
//!   gracewatch is compared with) in a state file;
//! - `churn-client`: closed-loop clients (connect, `x`, read `y`, close);
//! - `churn-hold`: holds connections on command (`open K`, `close K`);
//! - `tax-loop`: the syscall-tax probe (ns per `getppid` and per 1-byte
//!   pipe `read`), a process with no socket that gracewatch has no reason
//!   to watch.

use std::{
    ffi::OsStr,
    io::{self, BufRead as _, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd as _, RawFd},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use gracewatch_testkit::handover::{self, accept, connect_from, listen_socket};

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
    /// Times BATCHES batches of `getppid` and of 1-byte pipe `read`s.
    TaxLoop {
        #[arg(long, default_value_t = 30)]
        batches: u32,
        /// Calls per batch.
        #[arg(long, default_value_t = 65536)]
        calls: u32,
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
        Helper::TaxLoop { batches, calls } => tax_loop(batches, calls),
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

/// The fd-handover server of testkit (see [`handover`]) with the
/// benchmark's settings: it stays after a handover until the benchmark
/// kills its process group (or [`MAX_LIFETIME`]).
fn churn_server(
    listen: Option<SocketAddrV4>,
    inherit_fd: Option<RawFd>,
    state_dir: &Path,
    threads: u32,
) -> Result<()> {
    raise_nofile(1 << 16)?;
    exit_at_deadline();
    let listen = match (listen, inherit_fd) {
        (Some(addr), None) => handover::Listen::Bind(addr),
        (None, Some(fd)) => handover::Listen::Inherit(fd),
        _ => bail!("churn-server needs --listen or --inherit-fd"),
    };
    let threads_arg = threads.to_string();
    let args: [&OsStr; 6] = [
        "bench-helper".as_ref(),
        "churn-server".as_ref(),
        "--state-dir".as_ref(),
        state_dir.as_os_str(),
        "--threads".as_ref(),
        threads_arg.as_ref(),
    ];
    handover::serve(&handover::Config {
        acceptors: threads,
        state_dir: Some(state_dir.to_owned()),
        max_lifetime: MAX_LIFETIME,
        ..handover::Config::this_binary("churn-server", listen, &args)?
    })
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

// ---- syscall tax --------------------------------------------------------------------

/// This thread's CPU time in ns: time spent preempted by the rest of a
/// shared machine is not counted, only what the calls themselves cost.
fn thread_cpu_ns() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut t);
    }
    t.tv_sec as f64 * 1e9 + t.tv_nsec as f64
}

/// Prints `tax getppid_ns=M read_ns=M unix_pair_ns=M` with the median
/// batch of each (ns per call, per write+read pair for the last): a batch
/// of `calls` raw `getppid` system calls, a batch of `calls` 1-byte `read`s
/// from a pipe filled just before (the fill is not timed), and `calls / 8`
/// 1-byte write+read pairs over a unix socket pair. The median batch is robust to a batch that an interrupt or
/// a migration lengthened.
fn tax_loop(batches: u32, calls: u32) -> Result<()> {
    exit_at_deadline();
    let calls = calls.clamp(1, 1 << 20);
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds into the array we pass.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error()).context("failed to create a pipe");
    }
    let (rd, wr) = (fds[0], fds[1]);
    // SAFETY: fcntl on our own pipe fd; a failure leaves the default size.
    let size = unsafe { libc::fcntl(wr, libc::F_SETPIPE_SZ, calls as libc::c_int) };
    if size < 0 || (size as u32) < calls {
        bail!("failed to make the pipe hold {calls} bytes");
    }
    let fill = vec![b'x'; calls as usize];
    let mut sp = [0; 2];
    // SAFETY: socketpair writes two fds into the array we pass.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sp.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error()).context("failed to create a socket pair");
    }
    let pairs = (calls / 8).max(1);
    let (mut getppid, mut read, mut unix) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..batches.max(1) {
        let t0 = thread_cpu_ns();
        for _ in 0..calls {
            // SAFETY: getppid has no arguments and no memory effects.
            unsafe {
                libc::syscall(libc::SYS_getppid);
            }
        }
        getppid.push((thread_cpu_ns() - t0) / f64::from(calls));
        // SAFETY: writes from our buffer of `calls` bytes to our pipe.
        let n = unsafe { libc::write(wr, fill.as_ptr().cast(), fill.len()) };
        if n != fill.len() as isize {
            bail!("short write to the pipe ({n} of {calls})");
        }
        let mut c = 0u8;
        let t0 = thread_cpu_ns();
        for _ in 0..calls {
            // SAFETY: reads one byte into a local.
            if unsafe { libc::read(rd, (&raw mut c).cast(), 1) } != 1 {
                bail!("a 1-byte pipe read failed: {}", io::Error::last_os_error());
            }
        }
        read.push((thread_cpu_ns() - t0) / f64::from(calls));
        // A 1-byte write + read over a unix socket pair: two socket calls
        // (what hooks on socket send/receive would tax), no TCP socket for
        // gracewatch to watch.
        let t0 = thread_cpu_ns();
        for _ in 0..pairs {
            // SAFETY: writes one byte from and reads one byte into a local,
            // on our own socket pair.
            let ok = unsafe {
                libc::write(sp[0], (&raw const c).cast(), 1) == 1
                    && libc::read(sp[1], (&raw mut c).cast(), 1) == 1
            };
            if !ok {
                bail!(
                    "a unix socket pair write/read failed: {}",
                    io::Error::last_os_error()
                );
            }
        }
        unix.push((thread_cpu_ns() - t0) / f64::from(pairs));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    say(&format!(
        "tax getppid_ns={:.2} read_ns={:.2} unix_pair_ns={:.2}",
        median(&mut getppid),
        median(&mut read),
        median(&mut unix)
    ));
    Ok(())
}
