//! What gracewatch's end-to-end tests, benchmarks and demo share, written
//! once: network namespace guards, child processes read line by line, the
//! gracewatch spawners, the agent client, the fd-handover server and the
//! JSON Schema checks of gracewatch's output. Nothing here is part of the
//! product; it is `publish = false`.
//!
//! For the privileged end-to-end tests (package `gracewatch-e2e`, in `tests/`): network namespaces
//! ([`Netns`]), real servers and clients run inside them ([`Server`],
//! [`Client`], both Python programs under `tests/programs/` driven line by
//! line over stdin/stdout), and the binary under test ([`Gracewatch`],
//! [`Watch`]) whose JSON is checked against exact expectations ([`Expect`]).
//! [`Drain`] runs `gracewatch drain`/`wait` in the background (progress to
//! wait for, SIGSTOP/SIGCONT, the checked result); [`nginx`] runs Debian's
//! nginx with a slow upstream and HTTP clients.
//!
//! Every resource is a guard that cleans up on drop, so a failing assertion
//! still kills the processes and deletes the namespace. Tests never sleep to
//! "let something happen": they wait, with a deadline, for an acknowledgement
//! from a program or for a gracewatch status that matches.
//!
//! Start every test with `let Some(gw) = gracewatch_testkit::setup() else { return };`:
//! without root (or tools, or the binary) it skips — except in CI
//! (`CI=true`), where a privileged test that cannot run is a failure.
//!
//! To check the tests themselves independently of gracewatch, point them at
//! the `ss`-based oracle (slow, but obviously right):
//! `GRACEWATCH_BIN=$PWD/tests/programs/ss_oracle.py cargo test -p gracewatch-e2e`.

mod agent;
mod drain;
mod gracewatch;
pub mod handover;
pub mod http;
mod netns;
pub mod nginx;
mod process;
pub mod procfs;
mod programs;
pub mod schema;
mod soft;
pub mod status;
mod tmux;

use std::{path::Path, process::Command, time::Duration};

pub use agent::{Agent, AgentBuilder, free_port, promtool_accepts};
pub use drain::{Drain, Finished, gap_ms, monotonic_ns, without_caps};
pub use gracewatch::{Gracewatch, Watch};
pub use netns::Netns;
pub use process::{Child, collect_lines};
pub use programs::{Client, ConnCount, Server, SignalSeen, report_signals_of, wait_accepted_sum};
pub use schema::Schema;
pub use soft::Soft;
pub use status::{Expect, generations, holders, listener, live_of, process, role_of};
pub use tmux::Tmux;

/// How long a test waits for gracewatch to reflect a change it caused.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a test program may take to acknowledge a command.
pub const PROGRAM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `gracewatch watch` may take to print its first status (load and
/// attach the eBPF programs, take the startup snapshot) and how long a
/// one-shot `gracewatch status` may run.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether we run in CI, where a privileged test that cannot run must fail.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Reports that the test cannot run: a failure in CI, a skip elsewhere.
/// Returns `false` so callers can `return`.
fn cannot_run(why: &str) -> bool {
    if in_ci() {
        panic!(
            "privileged end-to-end test cannot run: {why} (CI=true: this is a failure, not a skip)"
        );
    }
    eprintln!("SKIPPED privileged end-to-end test: {why}");
    false
}

/// `true` when running as root. Otherwise panics in CI and returns `false`
/// (after printing a skip message) elsewhere.
pub fn require_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    cannot_run("needs root (network namespaces, eBPF); run as root or via `cargo xtask test`")
}

/// Everything a test needs before it starts: root, the `ip` and `python3`
/// tools, and the gracewatch binary. `None` means "skip" (never in CI).
pub fn setup() -> Option<Gracewatch> {
    if !require_root() {
        return None;
    }
    for (tool, arg) in [("ip", "-V"), ("python3", "--version")] {
        let ok = Command::new(tool)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            cannot_run(&format!("`{tool}` is not available"));
            return None;
        }
    }
    match Gracewatch::locate() {
        Ok(gw) => Some(gw),
        Err(why) => {
            cannot_run(&why);
            None
        }
    }
}

/// Where `cargo xtask setup --test-deps` installs HAProxy (Debian haproxy).
pub const HAPROXY: &str = "/usr/sbin/haproxy";

/// Whether HAProxy is installed; otherwise a skip (a failure in CI).
pub fn haproxy_available() -> bool {
    Path::new(HAPROXY).is_file()
        || cannot_run(&format!(
            "{HAPROXY} is missing (install it with `cargo xtask setup --test-deps`)"
        ))
}

/// Absolute path of a test program under `tests/programs/`.
pub fn program(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/programs")
        .join(name);
    assert!(path.is_file(), "test program {} is missing", path.display());
    path.to_string_lossy().into_owned()
}

/// A temporary directory under `$TMPDIR`, removed (with its contents) on drop.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    #[track_caller]
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "gracewatch-e2e-{tag}-{}-{}",
            std::process::id(),
            monotonic_ns()
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("failed to create {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn root(&self) -> &Path {
        &self.0
    }

    /// `DIR/name` as a string (for command lines and config files).
    pub fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }

    /// Writes `DIR/name` and returns its path.
    #[track_caller]
    pub fn write(&self, name: &str, text: &str) -> String {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("failed to write {path}: {e}"));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
