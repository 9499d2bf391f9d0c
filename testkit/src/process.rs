//! Child processes driven line by line: [`Lines`] collects a pipe's output
//! on a background thread so that tests can wait, with a deadline, for the
//! line they expect; [`Child`] owns a process (killed and reaped on drop) and
//! offers request/acknowledge over its stdin/stdout.

use std::{
    io::{BufRead, BufReader, Read, Write},
    process::{ChildStdin, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal, kill_process};

use crate::{Netns, PROGRAM_TIMEOUT};

/// Prefix under which `server.py` relays the lines of its handover child.
pub(crate) const RELAY_PREFIX: &str = "child> ";

/// Every line read from one pipe so far, plus whether the pipe has closed.
pub(crate) struct Lines {
    state: Mutex<LinesState>,
    changed: Condvar,
}

struct LinesState {
    lines: Vec<String>,
    eof: bool,
}

impl Lines {
    /// Reads `reader` line by line on a background thread until EOF.
    pub(crate) fn from_reader(reader: impl Read + Send + 'static) -> Arc<Lines> {
        let lines = Arc::new(Lines {
            state: Mutex::new(LinesState {
                lines: Vec::new(),
                eof: false,
            }),
            changed: Condvar::new(),
        });
        let sink = Arc::clone(&lines);
        thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        sink.lock()
                            .lines
                            .push(line.trim_end_matches(['\n', '\r']).to_owned());
                        sink.changed.notify_all();
                    }
                }
            }
            sink.lock().eof = true;
            sink.changed.notify_all();
        });
        lines
    }

    fn lock(&self) -> MutexGuard<'_, LinesState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn snapshot(&self) -> Vec<String> {
        self.lock().lines.clone()
    }

    /// Calls `f` on all lines so far, again after each new line, until it
    /// returns `Some` or `timeout` passes (`Err(false)`) or the pipe closed
    /// without `f` being satisfied (`Err(true)`).
    pub(crate) fn wait<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&[String]) -> Option<T>,
    ) -> Result<T, bool> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(found) = f(&state.lines) {
                return Ok(found);
            }
            if state.eof {
                return Err(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(false);
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Like [`Lines::wait`], but a timeout or the pipe closing first fails
    /// the test: `who` waited for `what`; `context` says what it printed.
    #[track_caller]
    pub(crate) fn wait_or_fail<T>(
        &self,
        who: &str,
        what: &str,
        timeout: Duration,
        context: impl FnOnce() -> String,
        f: impl FnMut(&[String]) -> Option<T>,
    ) -> T {
        match self.wait(timeout, f) {
            Ok(found) => found,
            Err(eof) => {
                let why = if eof {
                    "its output closed (did it die?)"
                } else {
                    "timed out"
                };
                panic!(
                    "{who}: {why} after waiting up to {timeout:?} for {what}\n{}",
                    context()
                );
            }
        }
    }

    /// The last `n` lines, indented, for failure messages.
    pub(crate) fn tail(&self, n: usize) -> String {
        tail(&self.snapshot(), n)
    }
}

pub(crate) fn tail(lines: &[String], n: usize) -> String {
    if lines.is_empty() {
        return "    (nothing)".to_owned();
    }
    let skip = lines.len().saturating_sub(n);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!("    ... ({skip} earlier lines)\n"));
    }
    for line in &lines[skip..] {
        out.push_str("    ");
        out.push_str(line);
        out.push('\n');
    }
    out.trim_end().to_owned()
}

/// Which of a pipe's lines belong to a [`Child`]: its own, or those it
/// relays for its handover child (`child> ` prefix, stripped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum View {
    Own,
    Relayed,
}

impl View {
    pub(crate) fn filter(self, lines: &[String]) -> Vec<&str> {
        lines
            .iter()
            .filter_map(|l| match (self, l.strip_prefix(RELAY_PREFIX)) {
                (View::Own, None) => Some(l.as_str()),
                (View::Relayed, Some(rest)) => Some(rest),
                _ => None,
            })
            .collect()
    }
}

/// A test program, usually running inside a [`Netns`], with piped stdin and
/// stdout (and stderr, kept for failure messages). Killed and reaped on drop.
///
/// A relayed child (see [`Child::relayed`]) is a view of a process that
/// another program started and talks to on our behalf: it owns no process.
pub struct Child {
    label: String,
    process: Option<std::process::Child>,
    stdin: Arc<Mutex<Option<ChildStdin>>>,
    stdout: Arc<Lines>,
    stderr: Arc<Lines>,
    view: View,
}

impl Child {
    /// Spawns `python3 -u tests/programs/SCRIPT args…` inside `ns`.
    #[track_caller]
    pub fn python(ns: &Netns, label: &str, script: &str, args: &[&str]) -> Child {
        let script = crate::program(script);
        let mut argv = vec!["-u", script.as_str()];
        argv.extend_from_slice(args);
        Child::spawn(ns, label, "python3", &argv)
    }

    /// Spawns `program args…` inside `ns` (`ip netns exec`).
    pub fn spawn(ns: &Netns, label: &str, program: &str, args: &[&str]) -> Child {
        let mut cmd = ns.command(program);
        cmd.args(args);
        Child::spawn_command(label, cmd)
    }

    /// Spawns `cmd` as is (stdin, stdout and stderr piped); panics if it
    /// cannot be started.
    #[track_caller]
    pub fn spawn_command(label: &str, cmd: Command) -> Child {
        Child::try_spawn_command(label, cmd).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Child::spawn_command`], saying why it could not start (for
    /// callers that report errors rather than panic, such as benchmarks).
    pub fn try_spawn_command(label: &str, mut cmd: Command) -> std::io::Result<Child> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut process = cmd.spawn().map_err(|e| {
            std::io::Error::new(e.kind(), format!("failed to spawn {label} ({cmd:?}): {e}"))
        })?;
        let stdin = process.stdin.take();
        let stdout = Lines::from_reader(process.stdout.take().expect("stdout is piped"));
        let stderr = Lines::from_reader(process.stderr.take().expect("stderr is piped"));
        Ok(Child {
            label: label.to_owned(),
            process: Some(process),
            stdin: Arc::new(Mutex::new(stdin)),
            stdout,
            stderr,
            view: View::Own,
        })
    }

    /// The view of the process this child relays (`child> ` lines, commands
    /// sent as `tochild CMD`). Its lifetime is tied to this child's process.
    pub(crate) fn relayed(&self, label: &str) -> Child {
        Child {
            label: label.to_owned(),
            process: None,
            stdin: Arc::clone(&self.stdin),
            stdout: Arc::clone(&self.stdout),
            stderr: Arc::clone(&self.stderr),
            view: View::Relayed,
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Pid of the spawned process (`None` for a relayed view).
    pub fn process_id(&self) -> Option<u32> {
        self.process.as_ref().map(std::process::Child::id)
    }

    pub(crate) fn view(&self) -> View {
        self.view
    }

    pub(crate) fn stdout(&self) -> &Arc<Lines> {
        &self.stdout
    }

    /// This child's own stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.view
            .filter(&self.stdout.snapshot())
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// Writes one command line to the child's stdin.
    #[track_caller]
    pub fn send(&self, command: &str) {
        let line = match self.view {
            View::Own => format!("{command}\n"),
            View::Relayed => format!("tochild {command}\n"),
        };
        let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pipe) = stdin.as_mut() else {
            panic!(
                "{}: stdin already closed, cannot send {command:?}",
                self.label
            );
        };
        if let Err(e) = pipe.write_all(line.as_bytes()).and_then(|()| pipe.flush()) {
            drop(stdin);
            panic!(
                "{}: failed to send {command:?}: {e}\n{}",
                self.label,
                self.context()
            );
        }
    }

    /// Waits until `f`, called on this child's lines so far (and again after
    /// each new one), returns `Some`. Panics with the child's recent output
    /// on timeout or if the child's stdout closes first.
    #[track_caller]
    pub fn wait_line<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&[&str]) -> Option<T>,
    ) -> T {
        let view = self.view;
        self.stdout.wait_or_fail(
            &self.label,
            what,
            timeout,
            || self.context(),
            |all| f(&view.filter(all)),
        )
    }

    /// Sends `command` and waits for the reply: the first later line whose
    /// first word is `reply`. A later `error …` line fails the test.
    #[track_caller]
    pub fn request(&self, command: &str, reply: &str) -> String {
        let mark = self.lines().len();
        self.send(command);
        let line = self.wait_line(
            &format!("reply `{reply} …` to `{command}`"),
            PROGRAM_TIMEOUT,
            |lines| {
                lines.get(mark..)?.iter().find_map(|l| {
                    let first = l.split_whitespace().next();
                    (first == Some(reply) || first == Some("error")).then(|| (*l).to_owned())
                })
            },
        );
        if line.starts_with("error") {
            panic!(
                "{}: `{command}` failed: {line}\n{}",
                self.label,
                self.context()
            );
        }
        line
    }

    /// Waits for the `ready PID …` line the test programs print once they
    /// serve; returns PID and the words after it.
    #[track_caller]
    pub fn wait_ready(&self) -> (u32, Vec<String>) {
        let ready = self.wait_line("`ready PID …`", PROGRAM_TIMEOUT, |lines| {
            lines
                .iter()
                .find_map(|l| l.strip_prefix("ready "))
                .map(str::to_owned)
        });
        let mut words = ready.split_whitespace().map(str::to_owned);
        let Some(pid) = words.next().and_then(|p| p.parse().ok()) else {
            panic!("{}: malformed ready line {ready:?}", self.label);
        };
        (pid, words.collect())
    }

    /// Like [`Child::request`], for a reply `REPLY VALUE …`: returns VALUE.
    #[track_caller]
    pub fn request_value<T: std::str::FromStr>(&self, command: &str, reply: &str) -> T {
        let line = self.request(command, reply);
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{}: malformed reply {line:?}", self.label))
    }

    /// Recent stdout and stderr, for failure messages.
    pub fn context(&self) -> String {
        let own = self.lines();
        format!(
            "  recent output of {}:\n{}\n  stderr of the process:\n{}",
            self.label,
            tail(&own, 15),
            self.stderr.tail(15)
        )
    }

    /// This process's stderr lines so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.snapshot()
    }

    /// Like [`Child::wait_line`], on stderr (e.g. nginx's error log).
    #[track_caller]
    pub fn wait_stderr_line<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl FnMut(&[String]) -> Option<T>,
    ) -> T {
        self.stderr.wait_or_fail(
            &self.label,
            &format!("{what} on stderr"),
            timeout,
            || self.context(),
            f,
        )
    }

    /// Waits for the process (which this child must own) to exit by itself
    /// and reaps it. Fails, killing it, after `timeout`. std has no wait
    /// with a timeout: this polls `try_wait` every 2 ms, with a deadline.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let label = self.label.clone();
        if self.process.is_none() {
            panic!("{label}: not a process this test started");
        }
        match self.exit_within(timeout) {
            Ok(Some(status)) => status,
            Ok(None) => {
                let context = self.context();
                self.kill();
                panic!("{label}: still running after {timeout:?} (killed)\n{context}");
            }
            Err(e) => panic!("{label}: failed to wait: {e}"),
        }
    }

    /// Polls `try_wait` every 2 ms until the process this child owns exits
    /// (reaped, its last lines read) or `timeout` passes (`Ok(None)`).
    fn exit_within(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        while let Some(process) = self.process.as_mut() {
            if let Some(status) = process.try_wait()? {
                self.process = None;
                self.await_eof();
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(2));
        }
        Ok(None)
    }

    /// Sends `signal` to the process (if this child owns one and it still
    /// runs).
    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self
            .process_id()
            .and_then(|p| Pid::from_raw(i32::try_from(p).ok()?))
        {
            let _ = kill_process(pid, signal);
        }
    }

    /// SIGTERM, then waits up to `grace` for the process (which this child
    /// must own) to exit. Returns its exit status, or `None` if it had to be
    /// killed.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.process.as_ref()?;
        self.signal(Signal::TERM);
        match self.exit_within(grace) {
            Ok(Some(status)) => Some(status),
            _ => {
                self.kill();
                None
            }
        }
    }

    /// Lets the reader threads take the last lines of an exited process:
    /// waits (briefly: a grandchild may hold the pipes) for both to close.
    fn await_eof(&self) {
        for lines in [&self.stdout, &self.stderr] {
            let _ = lines.wait(Duration::from_secs(1), |_| None::<()>);
        }
    }

    /// Kills the process (if this child owns one) and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let mut process = self.process.take()?;
        let _ = process.kill();
        process.wait().ok()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Collects the lines `pipe` gives (a child's stderr, say) on a thread of
/// their own, until it closes.
pub fn collect_lines(
    pipe: impl std::io::Read + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::BufRead as _;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    lines
}
