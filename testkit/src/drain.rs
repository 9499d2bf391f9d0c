//! `gracewatch drain` / `gracewatch wait` as a background process
//! ([`Drain`]): its `--json` progress lines can be waited for (so a test
//! changes something only once gracewatch watches), it can be frozen and
//! thawed (SIGSTOP/SIGCONT through a pidfd), and its end ([`Finished`])
//! carries the exit code, the CLOCK_MONOTONIC time at which it was seen to
//! exit, and the checked result object.

use std::{
    os::fd::{AsFd, OwnedFd},
    process::{Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use rustix::process::{
    Pid, PidfdFlags, Signal, WaitId, WaitIdOptions, pidfd_open, pidfd_send_signal, waitid,
};
use serde_json::Value;

use crate::{
    Gracewatch, STARTUP_TIMEOUT, Schema,
    process::{Lines, tail},
    status::pretty,
};

/// CLOCK_MONOTONIC in nanoseconds: the clock the test programs stamp their
/// events with (`time.clock_gettime_ns(time.CLOCK_MONOTONIC)`).
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// A wrapper for [`Gracewatch::spawn_drain_under`]: runs the binary with
/// the capabilities `drop` (e.g. `cap_kill`) removed, as `capsh` does.
pub fn without_caps(drop: &str) -> Vec<String> {
    vec![
        "capsh".to_owned(),
        format!("--drop={drop}"),
        "--".to_owned(),
        "-c".to_owned(),
        "exec \"$0\" \"$@\"".to_owned(),
    ]
}

/// Formats a difference of two monotonic stamps (`later - earlier`) in ms.
pub fn gap_ms(later: u64, earlier: u64) -> String {
    let d = later as i128 - earlier as i128;
    format!("{:.3} ms", d as f64 / 1e6)
}

/// A running `gracewatch drain|wait ARGS…` (killed on drop).
pub struct Drain {
    what: String,
    /// A `drain` that was asked to signal (not `wait`, not `--signal none`).
    asks_signal: bool,
    pid: u32,
    pidfd: OwnedFd,
    spawned_ns: u64,
    spawned: Instant,
    stdout: Arc<Lines>,
    stderr: Arc<Lines>,
    /// Exit status and the monotonic time the waiter thread saw it.
    done: mpsc::Receiver<(std::io::Result<ExitStatus>, u64)>,
    finished: Mutex<Option<(std::io::Result<ExitStatus>, u64)>>,
    /// The waiter thread reported the exit (the process is reaped).
    reaped: AtomicBool,
}

impl Gracewatch {
    /// Starts `gracewatch ARGS…` (e.g. `["drain", "--pid", "42", "--json"]`)
    /// in the background.
    #[track_caller]
    pub fn spawn_drain(&self, args: &[&str]) -> Drain {
        self.spawn_drain_under(&[], args)
    }

    /// [`Gracewatch::spawn_drain`] through a program that execs the binary
    /// given after `wrapper` (the pid stays gracewatch's), e.g. `capsh
    /// --drop=cap_kill -- -c 'exec "$0" "$@"'` (see [`without_caps`]).
    #[track_caller]
    pub fn spawn_drain_under(&self, wrapper: &[&str], args: &[&str]) -> Drain {
        let what = format!("{} gracewatch {}", wrapper.join(" "), args.join(" "))
            .trim()
            .to_owned();
        let spawned_ns = monotonic_ns();
        let spawned = Instant::now();
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(self.bin());
                cmd
            }
            None => Command::new(self.bin()),
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to spawn {what}: {e}"));
        let pid = child.id();
        // Our child, not yet waited for: the pid is still its own. Signals
        // to it go through this pidfd, so they cannot reach a recycled pid
        // after the waiter thread reaped it.
        let pidfd = Pid::from_raw(pid as i32)
            .and_then(|p| pidfd_open(p, PidfdFlags::empty()).ok())
            .unwrap_or_else(|| panic!("failed to open a pidfd for {what} (pid {pid})"));
        let stdout = Lines::from_reader(child.stdout.take().expect("stdout is piped"));
        let stderr = Lines::from_reader(child.stderr.take().expect("stderr is piped"));
        let (tx, done) = mpsc::channel();
        thread::spawn(move || {
            let status = child.wait();
            let _ = tx.send((status, monotonic_ns()));
        });
        let asks_signal = args.first() == Some(&"drain")
            && !args.iter().enumerate().any(|(i, a)| {
                a.eq_ignore_ascii_case("--signal=none")
                    || (*a == "--signal"
                        && args
                            .get(i + 1)
                            .is_some_and(|v| v.eq_ignore_ascii_case("none")))
            });
        Drain {
            what,
            asks_signal,
            pid,
            pidfd,
            spawned_ns,
            spawned,
            stdout,
            stderr,
            done,
            finished: Mutex::new(None),
            reaped: AtomicBool::new(false),
        }
    }

    /// Runs `gracewatch ARGS…` to completion (at most [`STARTUP_TIMEOUT`]).
    #[track_caller]
    pub fn drain_to_end(&self, args: &[&str]) -> Finished {
        self.spawn_drain(args).wait(STARTUP_TIMEOUT)
    }
}

impl Drain {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// CLOCK_MONOTONIC (ns) taken just before the process was spawned.
    pub fn spawned_ns(&self) -> u64 {
        self.spawned_ns
    }

    /// Waits until a `{"type":"progress"}` line satisfies `pred` and returns
    /// it. Fails if gracewatch prints its result or exits first.
    #[track_caller]
    pub fn wait_progress(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let found = self.stdout.wait_or_fail(
            &self.what,
            &format!("progress `{what}`"),
            timeout,
            || self.context(),
            |lines| {
                for line in lines {
                    let v = match parse_line(line) {
                        Ok(v) => v,
                        Err(bad) => return Some(Err(bad)),
                    };
                    if v["type"] == "result" {
                        return Some(Err(format!("it printed its result first: {line}")));
                    }
                    if pred(&v) {
                        return Some(Ok(v));
                    }
                }
                None
            },
        );
        found.unwrap_or_else(|why| {
            panic!(
                "{}: while waiting for progress `{what}`: {why}\n{}",
                self.what,
                self.context()
            )
        })
    }

    /// Waits until a stderr line (human output) satisfies `pred`.
    #[track_caller]
    pub fn wait_stderr(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        self.stderr.wait_or_fail(
            &self.what,
            &format!("{what} on stderr"),
            timeout,
            || self.context(),
            |lines| lines.iter().find(|l| pred(l)).cloned(),
        )
    }

    /// The first progress line (gracewatch prints it once it watches the
    /// targets, when there is something to wait for).
    #[track_caller]
    pub fn wait_ready(&self) -> Value {
        self.wait_progress("the first progress line", STARTUP_TIMEOUT, |_| true)
    }

    /// Waits for the result line; returns the CLOCK_MONOTONIC time (ns) at
    /// which this test saw it: an upper bound of when gracewatch decided,
    /// without the time it then takes to exit (detaching its programs).
    #[track_caller]
    pub fn wait_result_seen(&self, timeout: Duration) -> u64 {
        self.stdout.wait_or_fail(
            &self.what,
            "the result line",
            timeout,
            || self.context(),
            |lines| {
                lines
                    .iter()
                    .any(|l| parse_line(l).is_ok_and(|v| v["type"] == "result"))
                    .then(monotonic_ns)
            },
        )
    }

    /// Whether the process has exited (without waiting).
    pub fn has_exited(&self) -> bool {
        if self.reaped.load(Ordering::SeqCst) {
            return true;
        }
        let mut finished = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(done) = self.done.try_recv() {
            *finished = Some(done);
            self.reaped.store(true, Ordering::SeqCst);
        }
        finished.is_some()
    }

    fn signal(&self, sig: Signal) {
        if let Err(e) = pidfd_send_signal(self.pidfd.as_fd(), sig) {
            panic!("{}: failed to send {sig:?}: {e}", self.what);
        }
    }

    /// Freezes gracewatch (SIGSTOP) and returns once the kernel reports it
    /// stopped (waitid WSTOPPED, which needs no polling).
    #[track_caller]
    pub fn freeze(&self) {
        self.signal(Signal::STOP);
        let status = waitid(
            WaitId::PidFd(self.pidfd.as_fd()),
            WaitIdOptions::STOPPED | WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
        );
        match status {
            Ok(Some(s)) if s.stopped() => {}
            other => panic!(
                "{}: not stopped after SIGSTOP ({other:?})\n{}",
                self.what,
                self.context()
            ),
        }
    }

    /// Lets a frozen gracewatch run again (SIGCONT).
    #[track_caller]
    pub fn thaw(&self) {
        self.signal(Signal::CONT);
    }

    /// Waits for the process to exit; kills it and fails after `timeout`.
    #[track_caller]
    pub fn wait(self, timeout: Duration) -> Finished {
        let got = {
            let mut finished = self.finished.lock().unwrap_or_else(|e| e.into_inner());
            match finished.take() {
                Some(done) => Some(done),
                None => self.done.recv_timeout(timeout).ok(),
            }
        };
        if got.is_some() {
            self.reaped.store(true, Ordering::SeqCst);
        }
        let Some((status, exited_ns)) = got else {
            let _ = pidfd_send_signal(self.pidfd.as_fd(), Signal::KILL);
            panic!(
                "{}: still running after {timeout:?} (killed)\n{}",
                self.what,
                self.context()
            );
        };
        let status = status.unwrap_or_else(|e| panic!("{}: failed to wait: {e}", self.what));
        // The pipes close when the process exits; collect everything.
        let stdout = wait_eof(&self.stdout);
        let stderr = wait_eof(&self.stderr);
        let finished = Finished {
            what: self.what.clone(),
            asks_signal: self.asks_signal,
            pid: self.pid,
            status,
            exited_ns,
            elapsed: self.spawned.elapsed(),
            spawned_ns: self.spawned_ns,
            stdout,
            stderr,
        };
        finished.check_lines();
        finished.check_signal_oracle();
        finished
    }

    fn context(&self) -> String {
        format!(
            "  stdout:\n{}\n  stderr:\n{}",
            self.stdout.tail(20),
            self.stderr.tail(20)
        )
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        if !self.has_exited() {
            let _ = pidfd_send_signal(self.pidfd.as_fd(), Signal::KILL);
            // Resume a frozen process so that SIGKILL takes effect at once
            // (it does anyway; this keeps the waiter thread's exit prompt).
            let _ = pidfd_send_signal(self.pidfd.as_fd(), Signal::CONT);
            let _ = self.done.recv_timeout(Duration::from_secs(5));
        }
    }
}

fn wait_eof(lines: &Lines) -> Vec<String> {
    // Err(true) = EOF; a grandchild holding the pipe would make this time out.
    let _ = lines.wait(Duration::from_secs(5), |_| None::<()>);
    lines.snapshot()
}

fn parse_line(line: &str) -> Result<Value, String> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| format!("stdout line is not JSON ({e}): {line}"))?;
    Schema::Drain
        .check(&v)
        .map_err(|why| format!("malformed line: {why}\n  line: {line}"))?;
    Ok(v)
}

/// A finished `gracewatch drain|wait`.
#[derive(Debug)]
pub struct Finished {
    what: String,
    asks_signal: bool,
    /// gracewatch's pid (what a signalled server reports as the sender).
    pub pid: u32,
    pub status: ExitStatus,
    /// CLOCK_MONOTONIC (ns) at which the test saw the process exit (after
    /// the real exit: an upper bound).
    pub exited_ns: u64,
    /// CLOCK_MONOTONIC (ns) just before it was spawned.
    pub spawned_ns: u64,
    /// From spawn to the exit being seen.
    pub elapsed: Duration,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Fails unless the process exited with `code`.
    #[track_caller]
    pub fn assert_code(&self, code: i32) {
        assert_eq!(
            self.code(),
            Some(code),
            "{}: exited with {}, expected exit code {code}\n{}",
            self.what,
            self.status,
            self.context()
        );
    }

    /// The JSON objects printed on stdout, in order.
    pub fn json(&self) -> Vec<Value> {
        self.stdout
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn progress(&self) -> Vec<Value> {
        self.json()
            .into_iter()
            .filter(|v| v["type"] == "progress")
            .collect()
    }

    /// The `{"type":"result"}` object (`--json` runs): exactly one, last.
    #[track_caller]
    pub fn result(&self) -> Value {
        let all = self.json();
        let results: Vec<&Value> = all.iter().filter(|v| v["type"] == "result").collect();
        match (results.as_slice(), all.last()) {
            ([one], Some(last)) if std::ptr::eq(*one, last) => (*one).clone(),
            _ => panic!(
                "{}: expected exactly one result object, as the last line\n{}",
                self.what,
                self.context()
            ),
        }
    }

    /// Checks the result's fields named in `expected` (exact JSON values).
    #[track_caller]
    pub fn assert_result(&self, expected: &[(&str, Value)]) -> Value {
        let result = self.result();
        let wrong: Vec<String> = expected
            .iter()
            .filter(|(k, v)| result[*k] != *v)
            .map(|(k, v)| format!("`{k}` is {}, expected {v}", result[*k]))
            .collect();
        assert!(
            wrong.is_empty(),
            "{}: wrong result: {}\n  result: {}\n{}",
            self.what,
            wrong.join("; "),
            pretty(&result),
            self.context()
        );
        result
    }

    fn check_lines(&self) {
        for line in &self.stdout {
            if let Err(why) = parse_line(line) {
                panic!("{}: {why}\n{}", self.what, self.context());
            }
        }
        if let Some(last) = self.json().last().filter(|v| v["type"] == "result") {
            assert_eq!(
                last["exit_code"].as_i64(),
                self.code().map(i64::from),
                "{}: the result's exit_code differs from the process's\n{}",
                self.what,
                self.context()
            );
        }
    }

    /// The promise behind exit 0, checked against the targets themselves
    /// for every drain that ends 0 having sent a signal: each `server.py`
    /// target reports every signal it takes with the connections it held
    /// at that moment. At least one target must have seen the signal after
    /// gracewatch started, and every target that saw it must have held
    /// nothing (but the excluded connections the result names, for a drain
    /// ended by `--exclude-peer`). Targets that are no `server.py` (nginx…) are left to the
    /// test's own oracle.
    #[track_caller]
    fn check_signal_oracle(&self) {
        if self.code() != Some(0) {
            return;
        }
        let Some(result) = self
            .json()
            .into_iter()
            .rev()
            .find(|v| v["type"] == "result")
        else {
            return;
        };
        let targets: Vec<u32> = result["targets"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_u64().and_then(|p| u32::try_from(p).ok()))
                    .collect()
            })
            .unwrap_or_default();
        let Some(sent) = result["signal_sent"].as_str() else {
            if self.asks_signal {
                self.check_targets_gone(&targets);
            }
            return;
        };
        let name = sent.trim_start_matches("SIG").to_owned();
        let since = self.spawned_ns;
        let seen = |all: &[(u32, Vec<crate::SignalSeen>)]| -> Vec<(u32, crate::SignalSeen)> {
            all.iter()
                .flat_map(|(pid, signals)| {
                    signals
                        .iter()
                        .filter(|s| s.name == name && s.at_ns >= since)
                        .map(|s| (*pid, s.clone()))
                })
                .collect()
        };
        if crate::programs::signals_seen_by(&targets).is_empty() {
            return;
        }
        // The target reports a signal as it takes it, a moment after the send.
        let deadline = Instant::now() + crate::PROGRAM_TIMEOUT;
        let observed = loop {
            let observed = seen(&crate::programs::signals_seen_by(&targets));
            if !observed.is_empty() || Instant::now() >= deadline {
                break observed;
            }
            thread::sleep(Duration::from_millis(5));
        };
        assert!(
            !observed.is_empty(),
            "{}: exit 0 with signal_sent {sent}, but no target ({targets:?}) reported receiving it\n{}",
            self.what,
            self.context()
        );
        // A drain ended by `--exclude-peer` signals with the excluded
        // connections (and only those) still open: the ones it names.
        // Likewise a drain ended by `--until-idle`, with the idle ones it
        // names (at most 10: a test with more checks its own oracle).
        let excluded_of = |pid: u32| -> u64 {
            let key = match result["ended_by"].as_str() {
                Some("excluded_peers") => "excluded",
                Some("idle") => "idle",
                _ => return 0,
            };
            result[key]
                .as_array()
                .map_or(0, |a| a.iter().filter(|x| x["pid"] == pid).count() as u64)
        };
        for (pid, s) in &observed {
            assert_eq!(
                s.open,
                excluded_of(*pid),
                "{}: exit 0, but target {pid} still held {} connection(s) when it received {sent} (excluded peers named: {}): {s:?}\n{}",
                self.what,
                s.open,
                excluded_of(*pid),
                self.context()
            );
        }
    }

    /// A drain asked to signal that ends 0 without a signal says its
    /// targets exited by themselves: each `server.py` target of its own
    /// (not relayed) output must be gone (its output closed).
    #[track_caller]
    fn check_targets_gone(&self, targets: &[u32]) {
        for (pid, lines, view) in crate::programs::servers_among(targets) {
            if view != crate::process::View::Own {
                continue;
            }
            let gone = matches!(
                lines.wait(crate::PROGRAM_TIMEOUT, |_| None::<()>),
                Err(true)
            );
            assert!(
                gone,
                "{}: exit 0 and no signal sent, but target {pid} still runs: nothing it was asked to deliver was delivered\n{}",
                self.what,
                self.context()
            );
        }
    }

    pub fn context(&self) -> String {
        format!(
            "  stdout of {}:\n{}\n  stderr:\n{}",
            self.what,
            tail(&self.stdout, 20),
            tail(&self.stderr, 20)
        )
    }
}
