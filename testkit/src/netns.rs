//! [`Netns`]: a throw-away network namespace per test (or benchmark), so
//! that each one's loopback traffic, ports and sockets are isolated from the
//! host and from the others running in parallel. The `gw-` prefix puts
//! every one under `cargo xtask test`'s leak check.

use std::{
    collections::hash_map::RandomState,
    ffi::OsStr,
    hash::{BuildHasher, Hasher},
    os::unix::fs::MetadataExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal, kill_process};

/// A network namespace `gw-<test>-<random>` with `lo` up. On drop, every
/// process still inside it is killed and the namespace is deleted.
#[derive(Debug)]
pub struct Netns {
    name: String,
    inode: u64,
}

impl Netns {
    /// Creates the namespace. `test` is a short tag naming the test (or
    /// the benchmark). Panics on failure: see [`Netns::create`].
    #[track_caller]
    pub fn new(test: &str) -> Netns {
        Netns::create(test).unwrap_or_else(|e| panic!("network namespace for {test}: {e}"))
    }

    /// Creates the namespace, or says why it could not (`ip` missing or
    /// failing, no root).
    pub fn create(tag: &str) -> std::io::Result<Netns> {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        let name = format!("gw-{tag}-{:06x}", hasher.finish() & 0xff_ffff);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        // From here on the guard owns the namespace, even if bringing lo up fails.
        let mut ns = Netns { name, inode: 0 };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        let path = format!("/run/netns/{}", ns.name);
        ns.inode = std::fs::metadata(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("failed to stat {path}: {e}")))?
            .ino();
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Inode of the namespace (stat of `/run/netns/NAME`): what gracewatch
    /// reports as a listener's `netns`.
    pub fn netns_inode(&self) -> u64 {
        self.inode
    }

    /// `ip netns exec NAME program`: a command that runs inside the namespace.
    /// `ip netns exec` execs the program in place, so the spawned pid is the
    /// program's own.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Pids of the processes currently inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .stderr(Stdio::null())
            .output();
        match out {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill until empty: a process may fork while we kill (handover).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                if let Some(pid) = Pid::from_raw(pid) {
                    let _ = kill_process(pid, Signal::KILL);
                }
            }
            // Killed processes leave the namespace when the kernel has torn
            // them down; this is cleanup, not synchronisation of a test step.
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("warning: failed to delete network namespace {}", self.name);
        }
    }
}

fn run(cmd: &mut Command) -> std::io::Result<()> {
    let out = cmd
        .output()
        .map_err(|e| std::io::Error::new(e.kind(), format!("failed to run {cmd:?}: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(std::io::Error::other(format!(
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}
