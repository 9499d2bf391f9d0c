//! `cargo xtask demo`: a graceful restart to watch in `gracewatch tui`,
//! with nothing to install beyond the build. Three parts, all in this
//! binary so that the demo needs no interpreter:
//!
//! - a **server** (`demo-server`, hidden; the test kit's fd-handover
//!   server, `gracewatch_testkit::handover`) that answers lines and, on
//!   SIGHUP, performs the classic fd-handover restart: it starts a copy of
//!   itself that inherits the listening socket, stops accepting once the
//!   copy is ready, keeps serving the connections it holds until their
//!   clients leave, then waits for SIGTERM (which `d` in the TUI sends at
//!   zero) or exits by itself a while after it drained;
//! - a **load generator** (`demo-load`, hidden) whose clients hold
//!   connections of varied lengths (1 s to 45 s) and reconnect, so that an
//!   old server takes a visible while to drain;
//! - the **orchestrator** (`demo`) that starts both on 127.0.0.1, restarts
//!   the server periodically (SIGHUP), runs `gracewatch tui --port PORT` in
//!   the foreground, and stops everything when the TUI exits.
//!
//! Traffic stays on the loopback address, and every loop is bounded in time.

use std::{
    ffi::{OsStr, OsString},
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use gracewatch_testkit::handover;
use xtask::{cmd, run};

/// Where the demo keeps its pid file and logs.
fn demo_dir() -> PathBuf {
    std::env::temp_dir().join("gracewatch-demo")
}

/// A server that handed over exits by itself this long after it drained.
const LINGER_AFTER_DRAIN: Duration = Duration::from_secs(30);
/// …and at the latest this long after the handover, drained or not.
const MAX_OLD_LIFETIME: Duration = Duration::from_secs(300);
/// Nothing in the demo runs longer than this.
const MAX_RUN: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug)]
pub struct Options {
    pub port: u16,
    pub clients: u32,
    /// Restart the server this often (`None`: only on demand).
    pub restart_every: Option<Duration>,
}

/// `cargo xtask demo`.
pub fn demo(opts: &Options) -> Result<()> {
    let bin = run::build()?;
    let dir = demo_dir();
    fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let pidfile = dir.join("server.pid");
    let _ = fs::remove_file(&pidfile);
    let me = std::env::current_exe().context("failed to find the gracewatch-bench binary")?;
    let port = opts.port.to_string();

    let mut server = Command::new(&me);
    server
        .args(["demo-server", "--port", &port, "--pidfile"])
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(&dir.join("server.log"))?)
        // Its own process group: every generation of the server is in it,
        // and one kill stops them all.
        .process_group(0);
    let server = server.spawn().context("failed to start the demo server")?;
    let group = Group(server.id());
    let first = wait_for_pid(&pidfile, Duration::from_secs(5))
        .context("the demo server did not start (see /tmp/gracewatch-demo/server.log)")?;

    let load = Command::new(&me)
        .args(["demo-load", "--port", &port, "--clients"])
        .arg(opts.clients.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(&dir.join("load.log"))?)
        .spawn()
        .context("failed to start the load generator")?;
    let load = Reaped(load);

    let stop = Arc::new(AtomicBool::new(false));
    if let Some(every) = opts.restart_every {
        let (stop, pidfile) = (Arc::clone(&stop), pidfile.clone());
        thread::spawn(move || restarter(&pidfile, every, &stop));
    }

    println!(
        "demo server on 127.0.0.1:{port} (pid {first}), {} clients holding connections of 1-45 s.",
        opts.clients
    );
    match opts.restart_every {
        Some(every) => println!(
            "It restarts itself every {}s (fd handover on SIGHUP); watch the old pid drain.",
            every.as_secs()
        ),
        None => println!("Restart it with `kill -HUP $(cat {})`.", pidfile.display()),
    }
    println!(
        "In the TUI: select a draining server and press d (SIGTERM at zero), or s then HUP to restart the current one."
    );
    let mut tui = run::privileged(
        &bin,
        &[
            OsString::from("tui"),
            OsString::from("--port"),
            OsString::from(&port),
        ],
    )?;
    println!("$ {}", cmd::display(&tui));
    let status = tui.status();
    stop.store(true, Ordering::Relaxed);
    drop(load);
    drop(group);
    let status = status.context("failed to run gracewatch tui")?;
    if !status.success() {
        bail!("gracewatch tui failed ({status})");
    }
    Ok(())
}

fn log_file(path: &Path) -> Result<fs::File> {
    fs::File::create(path).with_context(|| format!("failed to create {}", path.display()))
}

fn read_pid(pidfile: &Path) -> Option<i32> {
    fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

fn wait_for_pid(pidfile: &Path, timeout: Duration) -> Result<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(pid) = read_pid(pidfile) {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            bail!("no pid in {} after {timeout:?}", pidfile.display());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn restarter(pidfile: &Path, every: Duration, stop: &AtomicBool) {
    let start = Instant::now();
    let mut next = start + every;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < MAX_RUN {
        thread::sleep(Duration::from_millis(200));
        if Instant::now() >= next {
            next += every;
            if let Some(pid) = read_pid(pidfile) {
                signal(pid, libc::SIGHUP);
            }
        }
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory effects; a stale pid only fails.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The server's process group, terminated on drop.
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        if let Ok(pgid) = i32::try_from(self.0) {
            signal(-pgid, libc::SIGTERM);
        }
    }
}

/// A child killed and reaped on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---- the server --------------------------------------------------------------

/// `demo-server`: the test kit's fd-handover server (see
/// [`handover`]) on 127.0.0.1:PORT, named `demo-server`, whose old
/// generations exit [`LINGER_AFTER_DRAIN`] after they drained.
pub fn server(port: u16, pidfile: &Path, inherit_fd: Option<i32>) -> Result<()> {
    let listen = match inherit_fd {
        Some(fd) => handover::Listen::Inherit(fd),
        None => handover::Listen::Bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
    };
    let port_arg = port.to_string();
    let args: [&OsStr; 5] = [
        "demo-server".as_ref(),
        "--port".as_ref(),
        port_arg.as_ref(),
        "--pidfile".as_ref(),
        pidfile.as_os_str(),
    ];
    handover::serve(&handover::Config {
        set_process_name: true,
        pidfile: Some(pidfile.to_owned()),
        exit_after_drain: Some(LINGER_AFTER_DRAIN),
        max_after_handover: Some(MAX_OLD_LIFETIME),
        max_lifetime: MAX_RUN,
        ..handover::Config::this_binary("demo-server", listen, &args)?
    })
}

// ---- the load generator ------------------------------------------------------

/// `demo-load`: `clients` clients, each holding one connection at a time.
pub fn load(port: u16, clients: u32) -> Result<()> {
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            thread::Builder::new()
                .name(format!("client-{i}"))
                .spawn(move || client(port, u64::from(i)))
        })
        .collect::<Result<_, _>>()
        .context("failed to start the clients")?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// xorshift64*: varied lengths without a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Self((u64::from(nanos) ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }

    /// 40 % short (1-5 s), 40 % medium (5-20 s), 20 % long (20-45 s).
    fn hold(&mut self) -> Duration {
        let ms = match self.below(10) {
            0..=3 => 1_000 + self.below(4_000),
            4..=7 => 5_000 + self.below(15_000),
            _ => 20_000 + self.below(25_000),
        };
        Duration::from_millis(ms)
    }
}

fn client(port: u16, index: u64) {
    let mut rng = Rng::new(index);
    let start = Instant::now();
    // Spread the first connections over the first seconds.
    thread::sleep(Duration::from_millis(rng.below(3_000)));
    while start.elapsed() < MAX_RUN {
        if let Ok(conn) = TcpStream::connect(("127.0.0.1", port)) {
            hold(conn, rng.hold());
        }
        thread::sleep(Duration::from_millis(200 + rng.below(800)));
    }
}

/// Sends a line a second for `length`, then closes.
fn hold(mut conn: TcpStream, length: Duration) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let until = Instant::now() + length;
    let mut buf = [0_u8; 64];
    while Instant::now() < until {
        if conn.write_all(b"ping\n").is_err() {
            return;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        thread::sleep(Duration::from_secs(1).min(until.saturating_duration_since(Instant::now())));
    }
}
