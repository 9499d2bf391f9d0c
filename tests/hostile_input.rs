//! Hostile input to the real CLI, a real running agent and the TUI, as a
//! local user with a shell account could send it, or a service that
//! controls its own pidfile, or a process that names itself:
//!
//! - a pidfile that is a FIFO (the old code blocked in `read_to_string`: the
//!   CLI hung, the agent's only runtime thread froze and ignored SIGTERM),
//!   `/dev/zero` (the old code read it until memory ran out), a secret file
//!   (the old error quoted its first 40 characters, read as root);
//! - a pidfile written by an unprivileged user naming another user's process
//!   (the old code signalled whatever it named);
//! - pid 1, a kernel thread, gracewatch's own ancestors, the agent itself
//!   (`signal: "STOP"` froze the old agent), `--children` of pid 1 (every
//!   process on the host): all accepted by the old code;
//! - a server whose command name holds ESC and CR (any user can set it with
//!   `prctl(PR_SET_NAME)`): the old `status` and `watch` printed it raw (the
//!   terminal's title changed, the line was erased), the old TUI dropped the
//!   control characters silently (the name shown was not the name).
//!
//! Every refusal is checked to leave the target untouched. The agent is
//! reached over its unix socket with hand-written HTTP (independent of the
//! client code). Run one test at a time (`--test-threads=1`): each starts
//! its own gracewatch processes.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::{
        fs::PermissionsExt as _,
        process::{CommandExt as _, ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use gracewatch_testkit::{Gracewatch, Netns, STARTUP_TIMEOUT, TempDir, Tmux, http, procfs, setup};
use serde_json::{Value, json};

/// A refused request or command must answer within this (the old code
/// never answered a FIFO).
const PROMPT: Duration = Duration::from_secs(3);
/// The unprivileged user that owns the "unsafe" pidfiles and processes.
const NOBODY: u32 = 65534;
/// What a process named by an attacker calls itself: ESC ] 0 ; … BEL sets
/// the terminal's title, CR returns to the start of the line, ESC [ 2 K
/// erases it. 14 bytes: the kernel keeps 15 with the NUL.
const EVIL_COMM: &[u8] = b"ev\x1b]0;pwn\x07\r\x1b[2K";
/// How long the agent may take to exit on SIGTERM: its own grace period
/// for drains and connections (5 s) and slack for a loaded machine.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Address space the agent may use in these tests (bytes).
const AGENT_MAX_AS: u64 = 4 << 30;
/// How it must be shown on a terminal.
const EVIL_SHOWN: &str = r"ev\x1b]0;pwn\x07\r\x1b[2K";

// --- plumbing -----------------------------------------------------------------

/// A process of the test, killed and reaped on drop.
struct Proc(Child);

impl Proc {
    fn sleeper(uid: Option<u32>) -> Proc {
        let mut cmd = Command::new("sleep");
        cmd.arg("300").stdin(Stdio::null());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        Proc(cmd.spawn().expect("spawn sleep"))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Still running (not exited, not stopped by a signal we did not send).
    fn running(&mut self) -> bool {
        self.0.try_wait().ok().flatten().is_none()
            && proc_state(self.pid()).is_some_and(|s| s != 'T' && s != 'Z')
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proc_state(pid: u32) -> Option<char> {
    procfs::stat(pid).map(|s| s.state)
}

fn rss_kb(pid: u32) -> u64 {
    procfs::status_kb(pid, "VmRSS").unwrap_or(0)
}

struct Ran {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Ran {
    fn context(&self) -> String {
        format!(
            "exit {:?} (signal {:?}) after {:?}\n  stdout: {}\n  stderr: {}",
            self.code, self.signal, self.took, self.stdout, self.stderr
        )
    }

    /// Exit 2 with one `gracewatch: …` line naming every word.
    #[track_caller]
    fn assert_refused(&self, what: &str, words: &[&str]) {
        let lines: Vec<&str> = self.stderr.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(self.code, Some(2), "{what}: {}", self.context());
        assert_eq!(
            lines.len(),
            1,
            "{what}: one line expected: {}",
            self.context()
        );
        assert!(self.took < PROMPT, "{what}: too slow: {}", self.context());
        for w in words {
            assert!(
                lines[0].contains(w),
                "{what}: the error does not say {w:?}: {}",
                self.context()
            );
        }
        eprintln!("{what}: {}", lines[0]);
    }
}

/// Runs gracewatch, killed after `limit` (a hang is then visible as a
/// `None` exit code and a long `took`).
fn run(gw: &Gracewatch, args: &[&str], limit: Duration) -> Ran {
    let started = Instant::now();
    let mut child = Command::new(gw.bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gracewatch");
    while child.try_wait().expect("poll").is_none() && started.elapsed() < limit {
        thread::sleep(Duration::from_millis(10));
    }
    let took = started.elapsed();
    let _ = child.kill();
    let out = child.wait_with_output().expect("collect");
    Ran {
        code: out.status.code(),
        signal: out.status.signal(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took,
    }
}

/// A `gracewatch agent` serving on a unix socket (and loopback TCP, which
/// it always does); killed on drop if a test fails before `stop`.
struct Agent(gracewatch_testkit::Agent);

impl Agent {
    /// Under an address-space limit, so that reading /dev/zero (as the old
    /// code did) ends in a failed allocation, not in a host OOM.
    fn start(gw: &Gracewatch, dir: &TempDir) -> Agent {
        let limit = format!("--as={AGENT_MAX_AS}");
        Agent(
            gracewatch_testkit::Agent::builder()
                .wrapper(&["prlimit", &limit, "--"])
                .start(gw, dir),
        )
    }

    fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// One HTTP/1.1 exchange on the unix socket: status, body, time taken.
    fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> std::io::Result<(u16, String, Duration)> {
        let started = Instant::now();
        let body = body.map(Value::to_string).unwrap_or_default();
        let answer = http::request(
            &self.0.unix(),
            method,
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
            PROMPT * 3,
        )?;
        Ok((answer.code, answer.body, started.elapsed()))
    }

    /// POST /v1/drains must answer 400 promptly, with a JSON error naming
    /// every word; returns the error.
    #[track_caller]
    fn assert_refused(&self, what: &str, req: &Value, words: &[&str]) -> String {
        let (code, body, took) = self
            .http("POST", "/v1/drains", Some(req))
            .unwrap_or_else(|e| panic!("{what}: no answer from the agent: {e}"));
        assert_eq!(code, 400, "{what}: {req} -> {code} {body}");
        assert!(took < PROMPT, "{what}: answered after {took:?}");
        let v: Value = serde_json::from_str(body.trim())
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
        let error = v["error"].as_str().unwrap_or_default().to_owned();
        for w in words {
            assert!(
                error.contains(w),
                "{what}: the error does not say {w:?}: {error}"
            );
        }
        eprintln!("{what}: 400 {error} ({took:?})");
        error
    }

    #[track_caller]
    fn assert_alive(&self, what: &str) {
        let (code, body, took) = self
            .http("GET", "/livez", None)
            .unwrap_or_else(|e| panic!("after {what}: /livez does not answer: {e}"));
        assert_eq!(code, 200, "after {what}: /livez {body}");
        assert!(
            took < Duration::from_secs(1),
            "after {what}: /livez took {took:?}"
        );
        assert_eq!(
            proc_state(self.pid()).map(|s| s != 'T'),
            Some(true),
            "after {what}: the agent is stopped"
        );
    }

    /// SIGTERM: must exit 0 within [`STOP_TIMEOUT`].
    fn stop(self) {
        self.0.stop_within(STOP_TIMEOUT);
    }
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo")
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mkfifo {}", path.display());
}

/// A secret a root-only file holds, in a shape the old code quoted.
const SECRET: &str = "4242 s3cr3t-t0ken:do-not-leak";

fn write_mode(path: &str, text: &str, mode: u32, owner: u32) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::os::unix::fs::chown(path, Some(owner), Some(owner)).expect("chown");
}

// --- pidfiles -------------------------------------------------------------------

#[test]
fn hostile_pidfiles_are_refused_promptly_by_the_cli() {
    let Some(gw) = setup() else { return };
    let dir = TempDir::new("hostile-pidfile");
    let fifo = PathBuf::from(dir.path("fifo.pid"));
    mkfifo(&fifo);
    let fifo = fifo.to_string_lossy().into_owned();
    let secret = dir.path("secret");
    write_mode(&secret, SECRET, 0o600, 0);
    let link = dir.path("link.pid");
    std::os::unix::fs::symlink(&secret, &link).expect("symlink");
    let mut target = Proc::sleeper(None);

    run(
        &gw,
        &["drain", "--pidfile", &fifo, "--signal", "KILL"],
        PROMPT * 2,
    )
    .assert_refused("FIFO pidfile", &[&fifo, "FIFO"]);
    run(
        &gw,
        &["drain", "--pidfile", "/dev/zero", "--signal", "KILL"],
        PROMPT * 2,
    )
    .assert_refused("/dev/zero pidfile", &["/dev/zero", "character device"]);
    let r = run(
        &gw,
        &["drain", "--pidfile", &secret, "--signal", "KILL"],
        PROMPT * 2,
    );
    r.assert_refused("secret file as pidfile", &[&secret, "does not hold a pid"]);
    for part in ["4242", "s3cr3t", "t0ken", "leak"] {
        assert!(
            !r.stderr.contains(part),
            "the error quotes the file: {}",
            r.stderr
        );
    }
    run(
        &gw,
        &["drain", "--pidfile", &link, "--signal", "KILL"],
        PROMPT * 2,
    )
    .assert_refused("symlink pidfile", &[&link, "symbolic link"]);
    assert!(target.running(), "nothing may be signalled");
}

#[test]
fn pidfiles_are_trusted_only_as_far_as_their_owner() {
    let Some(gw) = setup() else { return };
    let dir = TempDir::new("hostile-owner");
    std::fs::set_permissions(dir.root(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    let mut root_target = Proc::sleeper(None);
    let mut nobody_target = Proc::sleeper(Some(NOBODY));
    // Written by an unprivileged service, naming root's process.
    let foreign = dir.path("foreign.pid");
    write_mode(&foreign, &format!("{}\n", root_target.pid()), 0o644, NOBODY);
    // Written by that service, naming its own process.
    let own = dir.path("own.pid");
    write_mode(&own, &format!("{}\n", nobody_target.pid()), 0o644, NOBODY);
    // Root's file, but anyone may rewrite it.
    let shared = dir.path("shared.pid");
    write_mode(&shared, &format!("{}\n", root_target.pid()), 0o666, 0);

    run(
        &gw,
        &["drain", "--pidfile", &foreign, "--signal", "KILL"],
        PROMPT * 2,
    )
    .assert_refused(
        "pidfile of uid 65534 naming a root process",
        &[&foreign, "uid 65534", "uid 0", "--allow-unsafe-pidfile"],
    );
    run(
        &gw,
        &["drain", "--pidfile", &shared, "--signal", "KILL"],
        PROMPT * 2,
    )
    .assert_refused(
        "world-writable pidfile",
        &[
            &shared,
            "writable by group or others",
            "--allow-unsafe-pidfile",
        ],
    );
    assert!(root_target.running(), "a refused pidfile signalled its pid");

    // Owners match: trusted (a wait: nothing is signalled either way).
    let r = run(
        &gw,
        &["wait", "--pidfile", &own, "--timeout", "20s"],
        STARTUP_TIMEOUT,
    );
    assert_eq!(r.code, Some(0), "own process: {}", r.context());
    // The flag names the danger and overrides.
    let r = run(
        &gw,
        &[
            "wait",
            "--pidfile",
            &foreign,
            "--timeout",
            "20s",
            "--allow-unsafe-pidfile",
        ],
        STARTUP_TIMEOUT,
    );
    assert_eq!(r.code, Some(0), "--allow-unsafe-pidfile: {}", r.context());
    assert!(root_target.running() && nobody_target.running());

    // The same rules through the agent.
    let agent = Agent::start(&gw, &dir);
    agent.assert_refused(
        "agent: foreign pidfile",
        &json!({"pidfile": foreign, "signal": "KILL"}),
        &["uid 65534", "allow_unsafe_pidfile"],
    );
    agent.assert_refused(
        "agent: shared pidfile",
        &json!({"pidfile": shared, "signal": "KILL"}),
        &["writable by group or others"],
    );
    let (code, body, _) = agent
        .http(
            "POST",
            "/v1/drains",
            Some(&json!({"pidfile": foreign, "signal": "none", "allow_unsafe_pidfile": true})),
        )
        .expect("agent answers");
    assert_eq!(code, 202, "allow_unsafe_pidfile: {body}");
    assert!(
        root_target.running(),
        "the agent signalled a refused pidfile's pid"
    );
    agent.stop();
}

#[test]
fn hostile_pidfiles_neither_block_nor_bloat_the_agent() {
    let Some(gw) = setup() else { return };
    let dir = TempDir::new("hostile-agent-pidfile");
    let fifo = PathBuf::from(dir.path("fifo.pid"));
    mkfifo(&fifo);
    let secret = dir.path("secret");
    write_mode(&secret, SECRET, 0o600, 0);
    let agent = Agent::start(&gw, &dir);
    let mut target = Proc::sleeper(None);

    agent.assert_refused(
        "agent: FIFO pidfile",
        &json!({"pidfile": fifo, "signal": "KILL"}),
        &["FIFO"],
    );
    agent.assert_alive("a FIFO pidfile");

    let before = rss_kb(agent.pid());
    for _ in 0..5 {
        agent.assert_refused(
            "agent: /dev/zero pidfile",
            &json!({"pidfile": "/dev/zero", "signal": "KILL"}),
            &["character device"],
        );
    }
    let after = rss_kb(agent.pid());
    eprintln!("agent RSS {before} kB -> {after} kB after 5 /dev/zero pidfiles");
    assert!(
        after < before + 5 * 1024,
        "agent RSS grew from {before} kB to {after} kB"
    );
    agent.assert_alive("/dev/zero pidfiles");

    let error = agent.assert_refused(
        "agent: secret file as pidfile",
        &json!({"pidfile": secret, "signal": "KILL"}),
        &["does not hold a pid"],
    );
    for part in ["4242", "s3cr3t", "t0ken", "leak"] {
        assert!(!error.contains(part), "the error quotes the file: {error}");
    }
    assert!(target.running(), "nothing may be signalled");
    agent.stop();
}

// --- dangerous targets ----------------------------------------------------------

/// A kernel thread: kthreadd (pid 2) on the host, else the first one found.
fn kernel_thread() -> u32 {
    let is_kthread = |pid: u32| procfs::stat(pid).is_some_and(|s| s.kernel_thread());
    if is_kthread(2) {
        return 2;
    }
    (3..100_000)
        .find(|&p| is_kthread(p))
        .expect("no kernel thread visible")
}

#[test]
fn dangerous_targets_are_refused_by_the_cli() {
    let Some(gw) = setup() else { return };
    let kthread = kernel_thread();
    let kt = kthread.to_string();
    // The test runs gracewatch: it is gracewatch's parent.
    let me = std::process::id().to_string();
    let before = (proc_state(1), proc_state(kthread));
    // SIGCONT: harmless even if a refusal failed.
    run(
        &gw,
        &["drain", "--pid", "1", "--signal", "CONT"],
        PROMPT * 2,
    )
    .assert_refused("pid 1", &["pid 1", "init", "--allow-dangerous-target"]);
    run(
        &gw,
        &["drain", "--pid", &kt, "--signal", "CONT"],
        PROMPT * 2,
    )
    .assert_refused("a kernel thread", &[&kt, "kernel thread"]);
    run(
        &gw,
        &["drain", "--pid", &me, "--signal", "CONT"],
        PROMPT * 2,
    )
    .assert_refused("gracewatch's parent", &[&me, "ancestor"]);
    run(
        &gw,
        &[
            "drain",
            "--pid",
            "1",
            "--children",
            "--signal",
            "CONT",
            "--timeout",
            "2s",
        ],
        PROMPT * 2,
    )
    .assert_refused("--children of pid 1", &["--children of pid 1"]);
    // No signal, but SIGKILL at the deadline: a drain that can signal.
    run(
        &gw,
        &[
            "wait",
            "--pid",
            &kt,
            "--timeout",
            "2s",
            "--on-timeout",
            "kill",
        ],
        PROMPT * 2,
    )
    .assert_refused(
        "wait --on-timeout kill on a kernel thread",
        &["kernel thread"],
    );
    assert_eq!((proc_state(1), proc_state(kthread)), before);
    // A wait that can never signal only watches: the policy, which guards
    // against signals, lets it through (`wait --pid 1` is the preStop
    // recipe in a container whose server is pid 1). A kernel thread holds
    // no connection, so it is drained at once.
    let r = run(
        &gw,
        &["wait", "--pid", &kt, "--timeout", "20s"],
        STARTUP_TIMEOUT,
    );
    assert_eq!(r.code, Some(0), "wait on a kernel thread: {}", r.context());
    // The override is honoured (SIGCONT: a kernel thread ignores it).
    let r = run(
        &gw,
        &[
            "drain",
            "--pid",
            &kt,
            "--signal",
            "CONT",
            "--timeout",
            "20s",
            "--allow-dangerous-target",
        ],
        STARTUP_TIMEOUT,
    );
    assert_eq!(r.code, Some(0), "--allow-dangerous-target: {}", r.context());
}

#[test]
fn dangerous_targets_are_refused_by_the_agent() {
    let Some(gw) = setup() else { return };
    let dir = TempDir::new("hostile-agent-targets");
    let agent = Agent::start(&gw, &dir);
    let kthread = kernel_thread();
    let me = std::process::id();
    agent.assert_refused(
        "agent: pid 1",
        &json!({"pids": [1], "signal": "CONT"}),
        &["pid 1", "allow_dangerous_target"],
    );
    agent.assert_refused(
        "agent: kernel thread",
        &json!({"pids": [kthread], "signal": "CONT"}),
        &["kernel thread"],
    );
    agent.assert_refused(
        "agent: its parent",
        &json!({"pids": [me], "signal": "CONT"}),
        &["ancestor"],
    );
    agent.assert_refused(
        "agent: children of pid 1",
        &json!({"pids": [1], "children": true, "signal": "CONT", "timeout": "2s"}),
        &["children of pid 1"],
    );
    agent.assert_refused(
        "agent: STOP to itself",
        &json!({"pids": [agent.pid()], "signal": "STOP"}),
        &["itself"],
    );
    agent.assert_alive("a STOP aimed at the agent");
    // Only watching the agent itself is fine (nothing can be signalled).
    let (code, body, _) = agent
        .http(
            "POST",
            "/v1/drains",
            Some(&json!({"pids": [agent.pid()], "signal": "none", "timeout": "1s"})),
        )
        .expect("agent answers");
    assert_eq!(code, 202, "a wait on the agent itself: {body}");
    agent.assert_refused(
        "agent: pid out of range",
        &json!({"pids": [2_147_483_648_u64], "signal": "CONT"}),
        &["out of range"],
    );
    agent.assert_refused(
        "agent: huge timeout",
        &json!({"pids": [me], "timeout": "10000000000000000000s"}),
        &["timeout", "too long"],
    );
    agent.assert_alive("every refusal");
    agent.stop();
}

// --- names on terminals -----------------------------------------------------------

/// A listening server in `ns` whose command name is [`EVIL_COMM`], holding
/// one accepted connection (to itself).
struct EvilServer(Child);

impl EvilServer {
    fn start(ns: &Netns, port: u16) -> EvilServer {
        let code = format!(
            r#"
import ctypes, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(15, ctypes.c_char_p(bytes.fromhex("{name}")), 0, 0, 0) != 0:
    sys.exit("prctl failed")
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {port}))
s.listen(16)
c = socket.create_connection(("127.0.0.1", {port}))
a, _ = s.accept()
print("ready", flush=True)
sys.stdin.read()
"#,
            name = EVIL_COMM
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            port = port
        );
        let mut child = ns
            .command("python3")
            .args(["-u", "-c", &code])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("read ready");
        assert_eq!(line.trim(), "ready", "the evil server did not start");
        let comm = std::fs::read(format!("/proc/{}/comm", child.id())).expect("comm");
        assert_eq!(
            comm.strip_suffix(b"\n"),
            Some(EVIL_COMM),
            "prctl did not name it"
        );
        EvilServer(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for EvilServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn has_control(text: &str) -> bool {
    text.chars().any(|c| c.is_control() && c != '\n')
}

#[test]
fn process_names_are_escaped_in_status_and_watch() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("hostile-comm");
    let server = EvilServer::start(&ns, 7431);
    let pid = server.pid().to_string();

    // JSON stays JSON: the name is there, JSON-escaped by serde.
    let status = gw.status(&["--port", "7431"]);
    let names: Vec<&str> = status["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["comm"].as_str())
        .collect();
    assert_eq!(names, vec![String::from_utf8_lossy(EVIL_COMM)]);

    let r = run(&gw, &["status", "--port", "7431"], STARTUP_TIMEOUT);
    assert_eq!(r.code, Some(0), "{}", r.context());
    assert!(
        !has_control(&r.stdout),
        "status printed a control character: {:?}",
        r.stdout
    );
    let row = r
        .stdout
        .lines()
        .find(|l| l.starts_with(&pid))
        .unwrap_or_default();
    assert!(
        row.contains(EVIL_SHOWN),
        "status row: {row:?}\n{}",
        r.stdout
    );

    let mut watch = Command::new(gw.bin())
        .args(["watch", "--port", "7431"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn watch");
    let stdout = watch.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
            line.clear();
        }
    });
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut seen = Vec::new();
    let found = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.contains(&format!("pid {pid} ")) => break Some(line),
            Ok(line) => seen.push(line),
            Err(_) if Instant::now() >= deadline => break None,
            Err(_) => {}
        }
    };
    let _ = watch.kill();
    let _ = watch.wait();
    let line = found.unwrap_or_else(|| panic!("watch never named pid {pid}: {seen:?}"));
    assert!(
        !has_control(line.trim_end_matches('\n')),
        "watch printed a control character: {line:?}"
    );
    assert!(line.contains(EVIL_SHOWN), "watch line: {line:?}");

    // Drain progress names the target: a wait that cannot drain (the
    // server holds its connection) prints it until the deadline.
    let r = run(
        &gw,
        &["wait", "--pid", &pid, "--timeout", "2s"],
        STARTUP_TIMEOUT,
    );
    assert_eq!(r.code, Some(124), "{}", r.context());
    assert!(
        !has_control(&r.stderr),
        "drain messages printed a control character: {:?}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!("pid {pid} ({EVIL_SHOWN})")),
        "drain messages: {}",
        r.stderr
    );
}

#[test]
fn process_names_are_escaped_in_the_tui() {
    let Some(gw) = setup() else { return };
    let Some(tmux) = Tmux::start("hostile") else {
        return;
    };
    let ns = Netns::new("hostile-tui");
    let server = EvilServer::start(&ns, 7432);
    let pid = server.pid().to_string();
    let shown = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(format!("no {what} yet"))
        }
    };
    tmux.wait("a prompt", STARTUP_TIMEOUT, |s| {
        shown(s.contains("gw$"), "prompt")
    });
    let title_before = tmux.title();
    tmux.type_line(&format!("{} tui --port 7432", gw.bin().display()));
    // The table cuts the name to its column; the escapes show in it.
    let screen = tmux.wait("the server's row", STARTUP_TIMEOUT, |s| {
        shown(
            s.lines()
                .any(|l| l.contains(&pid) && l.contains(r"ev\x1b]0;pwn")),
            "row",
        )
    });
    assert!(!screen.contains("pwn\r"), "{screen}");
    // The signal dialog names it in full.
    tmux.keys(&["s"]);
    tmux.wait("the signal dialog", STARTUP_TIMEOUT, |s| {
        shown(
            s.contains(&format!("Signal pid {pid} ({EVIL_SHOWN})")),
            "dialog",
        )
    });
    tmux.keys(&["Escape"]);
    tmux.keys(&["q"]);
    tmux.wait("the prompt back", STARTUP_TIMEOUT, |s| {
        shown(
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .is_some_and(|l| l.starts_with("gw$")),
            "prompt",
        )
    });
    let title_after = tmux.title();
    assert_eq!(
        title_after, title_before,
        "the process name set the terminal's title"
    );
    assert_ne!(title_after, "pwn");
}
