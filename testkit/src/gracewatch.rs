//! The binary under test: [`Gracewatch`] runs one-shot commands
//! (`status --json`), [`Watch`] runs `gracewatch watch --json` in the
//! background and waits for a status line that matches an expectation.
//! Both run in the root namespace: gracewatch sees every namespace.

use std::{
    path::PathBuf,
    process::{Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal, kill_process};
use serde_json::Value;

use crate::{
    Expect, STARTUP_TIMEOUT, STATE_TIMEOUT, Schema, Soft,
    process::{Lines, tail},
    status::pretty,
};

/// The gracewatch binary: `$GRACEWATCH_BIN` (set by `cargo xtask test`),
/// else `target/debug/gracewatch` of this workspace.
#[derive(Clone, Debug)]
pub struct Gracewatch {
    bin: PathBuf,
}

impl Gracewatch {
    /// Finds the binary. `Err` says why it cannot be used; an explicitly
    /// configured `$GRACEWATCH_BIN` that does not exist is a hard failure.
    pub fn locate() -> Result<Gracewatch, String> {
        if let Some(bin) = std::env::var_os("GRACEWATCH_BIN") {
            let bin = PathBuf::from(bin);
            assert!(
                bin.is_file(),
                "GRACEWATCH_BIN={} does not exist",
                bin.display()
            );
            return Ok(Gracewatch { bin });
        }
        let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/gracewatch");
        if bin.is_file() {
            Ok(Gracewatch { bin })
        } else {
            Err(format!(
                "gracewatch binary not found at {} (build it with `cargo build -p gracewatch`, set GRACEWATCH_BIN, or run `cargo xtask test`)",
                bin.display()
            ))
        }
    }

    pub fn bin(&self) -> &PathBuf {
        &self.bin
    }

    /// Runs `gracewatch ARGS…` to completion (killed after [`STARTUP_TIMEOUT`]).
    #[track_caller]
    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("gracewatch {}", args.join(" "));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("failed to spawn {what}: {e}"));
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("failed to wait for {what}: {e}"),
            Err(_) => {
                if let Some(pid) = Pid::from_raw(pid as i32) {
                    let _ = kill_process(pid, Signal::KILL);
                }
                let partial = rx.recv().ok().and_then(Result::ok);
                let (stdout, stderr) = partial.map_or_else(Default::default, |o| {
                    (
                        String::from_utf8_lossy(&o.stdout).into_owned(),
                        String::from_utf8_lossy(&o.stderr).into_owned(),
                    )
                });
                panic!(
                    "{what} did not finish within {STARTUP_TIMEOUT:?} (killed)\n  stdout: {stdout}\n  stderr: {stderr}"
                );
            }
        }
    }

    /// Runs `gracewatch ARGS…` like [`Gracewatch::run`]; it must exit 0.
    /// Returns its stdout and stderr.
    #[track_caller]
    pub fn run_ok(&self, args: &[&str]) -> (String, String) {
        let out = self.run(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "gracewatch {} failed ({})\n  stdout: {stdout}\n  stderr: {stderr}",
            args.join(" "),
            out.status
        );
        (stdout, stderr)
    }

    /// `gracewatch status ARGS… --json`: must exit 0 and print exactly one
    /// well-formed Status object, which is returned.
    #[track_caller]
    pub fn status(&self, args: &[&str]) -> Value {
        let mut full = vec!["status"];
        full.extend_from_slice(args);
        full.push("--json");
        let what = format!("gracewatch {}", full.join(" "));
        let (stdout, stderr) = self.run_ok(&full);
        let values: Result<Vec<Value>, _> = serde_json::Deserializer::from_str(&stdout)
            .into_iter::<Value>()
            .collect();
        let values = values.unwrap_or_else(|e| {
            panic!("{what}: stdout is not JSON ({e})\n  stdout: {stdout}\n  stderr: {stderr}")
        });
        let [status] = values.as_slice() else {
            panic!(
                "{what}: expected exactly one JSON object, got {}\n  stdout: {stdout}",
                values.len()
            );
        };
        if let Err(why) = Schema::Status.check(status) {
            panic!(
                "{what}: malformed status: {why}\n  status: {}",
                pretty(status)
            );
        }
        status.clone()
    }

    /// [`Gracewatch::status`], asserting that the result meets `expect`
    /// (hard) and recording violations of the status invariants in `soft`.
    #[track_caller]
    pub fn status_matching(&self, args: &[&str], expect: &Expect, soft: &Soft) -> Value {
        let status = self.status(args);
        let what = format!("gracewatch status {} --json", args.join(" "));
        expect.assert(&status, &what);
        soft.invariants(&what, &status);
        status
    }

    /// Starts `gracewatch watch ARGS… --json` and waits for its first status
    /// (printed once it is ready).
    #[track_caller]
    pub fn watch(&self, args: &[&str]) -> Watch {
        Watch::start(self, args)
    }
}

/// A running `gracewatch watch --json`: one Status object per line, printed
/// whenever the state changes. Killed on drop; [`Watch::stop`] checks that
/// it exits cleanly on SIGINT.
pub struct Watch {
    what: String,
    process: Mutex<Option<std::process::Child>>,
    stdout: Arc<Lines>,
    stderr: Arc<Lines>,
}

impl Watch {
    fn start(gw: &Gracewatch, args: &[&str]) -> Watch {
        let mut full = vec!["watch"];
        full.extend_from_slice(args);
        full.push("--json");
        let what = format!("gracewatch {}", full.join(" "));
        let mut process = Command::new(&gw.bin)
            .args(&full)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to spawn {what}: {e}"));
        let stdout = Lines::from_reader(process.stdout.take().expect("stdout is piped"));
        let stderr = Lines::from_reader(process.stderr.take().expect("stderr is piped"));
        let watch = Watch {
            what,
            process: Mutex::new(Some(process)),
            stdout,
            stderr,
        };
        watch.wait_check(
            STARTUP_TIMEOUT,
            "its first status line (printed once ready)",
            |_| Ok(()),
        );
        watch
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(std::process::Child::id)
    }

    /// Its stderr (warnings) so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.snapshot()
    }

    /// The latest status printed.
    pub fn latest(&self) -> Option<Value> {
        self.stdout
            .snapshot()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
    }

    /// Waits until a status (the latest one already printed, or a later
    /// one) satisfies `pred`, and returns it.
    #[track_caller]
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_check(timeout, what, |s| {
            if pred(s) {
                Ok(())
            } else {
                Err("predicate is false".to_owned())
            }
        })
    }

    /// Waits, up to [`STATE_TIMEOUT`], for a status meeting `expect`.
    #[track_caller]
    pub fn wait_for(&self, expect: &Expect) -> Value {
        self.wait_check(STATE_TIMEOUT, &expect.to_string(), |s| expect.check(s))
    }

    /// [`Watch::wait_for`], then records violations of the status
    /// invariants of the matching status in `soft`.
    #[track_caller]
    pub fn step(&self, expect: &Expect, soft: &Soft) -> Value {
        let status = self.wait_for(expect);
        soft.invariants(&format!("{} at [{expect}]", self.what), &status);
        status
    }

    /// Waits until `check` accepts a status (the latest one already printed,
    /// or a later one). On timeout, panics with why the last status did not
    /// match, the status itself, and gracewatch's stderr.
    #[track_caller]
    pub fn wait_check(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&Value) -> Result<(), String>,
    ) -> Value {
        let start = Instant::now();
        // Index of the next line to look at; starts at the latest line.
        let mut next: Option<usize> = None;
        let mut last: Option<(usize, Value, String)> = None;
        let result = self.stdout.wait(timeout, |lines| {
            let from = next.unwrap_or(lines.len().saturating_sub(1));
            for (i, line) in lines.iter().enumerate().skip(from) {
                let status: Value = match serde_json::from_str(line) {
                    Ok(v) => v,
                    Err(e) => {
                        return Some(Err(format!("line {} is not JSON ({e}): {line}", i + 1)));
                    }
                };
                if let Err(why) = Schema::Status.check(&status) {
                    return Some(Err(format!(
                        "line {} is not a valid status: {why}\n  line: {line}",
                        i + 1
                    )));
                }
                match check(&status) {
                    Ok(()) => return Some(Ok(status)),
                    Err(why) => last = Some((i + 1, status, why)),
                }
            }
            next = Some(lines.len());
            None
        });
        match result {
            Ok(Ok(status)) => status,
            Ok(Err(bad)) => panic!(
                "{}: printed a bad line: {bad}\n{}",
                self.what,
                self.stderr_tail()
            ),
            Err(eof) => {
                let total = self.stdout.snapshot().len();
                let why = if eof {
                    format!("exited ({}) while", self.exit_status_text())
                } else {
                    format!("timed out after {:?}", start.elapsed())
                };
                let last = match &last {
                    Some((n, status, mismatch)) => format!(
                        "  last status (line {n} of {total}) did not match: {mismatch}\n  last status: {}",
                        pretty(status)
                    ),
                    None if total == 0 => {
                        "  no status line printed at all (is stdout flushed after each line?)"
                            .to_owned()
                    }
                    None => format!(
                        "  no new status line since the wait began ({total} lines printed in all)"
                    ),
                };
                panic!(
                    "{}: {why} waiting for: {what}\n{last}\n{}",
                    self.what,
                    self.stderr_tail()
                );
            }
        }
    }

    fn stderr_tail(&self) -> String {
        format!(
            "  stderr of gracewatch watch:\n{}",
            tail(&self.stderr.snapshot(), 20)
        )
    }

    fn exit_status_text(&self) -> String {
        let mut process = self.process.lock().unwrap_or_else(|e| e.into_inner());
        match process.as_mut().map(std::process::Child::try_wait) {
            Some(Ok(Some(status))) => status.to_string(),
            Some(Ok(None)) => "stdout closed, process still running".to_owned(),
            _ => "unknown status".to_owned(),
        }
    }

    /// Waits up to `timeout` for watch to exit on its own (no signal: an
    /// error ended it) and returns its exit status; panics, killing it, if
    /// it still runs then.
    #[track_caller]
    pub fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        let taken = self
            .process
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let process = taken.expect("watch is running");
        self.reap(process, timeout, "still ran")
    }

    /// Waits up to `timeout` for `process` to exit; kills it and panics
    /// (saying it `still` ran, with its stderr) if it does not.
    #[track_caller]
    fn reap(&self, mut process: std::process::Child, timeout: Duration, still: &str) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            match process.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = process.kill();
                    let _ = process.wait();
                    panic!(
                        "{}: {still} {timeout:?} later\n{}",
                        self.what,
                        self.stderr_tail()
                    );
                }
            }
        }
    }

    /// Sends SIGINT and checks that watch exits with 0 or 130 within a few seconds.
    #[track_caller]
    pub fn stop(self) -> ExitStatus {
        let taken = self
            .process
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let process = taken.expect("watch is running");
        if let Some(pid) = Pid::from_raw(process.id() as i32) {
            let _ = kill_process(pid, Signal::INT);
        }
        let status = self.reap(process, STATE_TIMEOUT, "did not exit on SIGINT");
        assert!(
            matches!(status.code(), Some(0 | 130)),
            "{}: exited with {status} on SIGINT, expected exit code 0 or 130\n{}",
            self.what,
            self.stderr_tail()
        );
        status
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let taken = self
            .process
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut process) = taken {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}
