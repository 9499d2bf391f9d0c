//! `cargo xtask run`: build the release binary and replace this process with
//! it, as root. `exec` rather than spawn-and-wait, so that the terminal,
//! signals (Ctrl-C reaches gracewatch directly) and the exit code are
//! gracewatch's own. The same for `bench` and `demo`, whose program is
//! the `gracewatch-bench` binary.

use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{self, command},
    setup,
};

pub fn run(args: Vec<OsString>) -> Result<()> {
    let bin = build()?;
    let args = if args.is_empty() {
        vec![OsString::from("tui")]
    } else {
        args
    };
    let mut gracewatch = privileged(&bin, &args)?;
    println!("$ {}", cmd::display(&gracewatch));
    let err = gracewatch.exec();
    Err(anyhow::Error::new(err).context(format!("failed to execute {}", bin.display())))
}

/// `cargo xtask bench|demo ARGS…`: builds `gracewatch-bench` (quietly, in
/// the dev profile, as cargo builds xtask itself) and replaces this process
/// with `gracewatch-bench TASK ARGS…`. That binary starts its own load
/// processes and servers (hidden subcommands) through its own path.
pub fn bench_binary(task: &str, args: Vec<OsString>) -> Result<()> {
    let mut build = command("cargo");
    build
        .current_dir(cmd::repo_root())
        .args(["build", "--quiet", "-p", "gracewatch-bench"]);
    let status = build
        .status()
        .with_context(|| format!("failed to start `{}`", cmd::display(&build)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", cmd::display(&build));
    }
    let bin = cmd::target_dir().join("debug").join("gracewatch-bench");
    let err = Command::new(&bin).arg(task).args(args).exec();
    Err(anyhow::Error::new(err).context(format!("failed to execute {}", bin.display())))
}

/// Sets up the toolchain and builds the release binary; returns its path.
pub fn build() -> Result<PathBuf> {
    setup::setup(setup::Options { test_deps: false })?;
    cmd::run(command("cargo").current_dir(cmd::repo_root()).args([
        "build",
        "--release",
        "-p",
        "gracewatch",
    ]))?;
    Ok(cmd::target_dir().join("release").join("gracewatch"))
}

/// `bin ARGS…` with the privileges it needs: as is when root or holding
/// the BPF capabilities, else through `sudo -E`.
pub fn privileged(bin: &Path, args: &[OsString]) -> Result<Command> {
    if cmd::is_root() || cmd::has_bpf_caps() {
        let mut c = command(bin);
        c.args(args);
        Ok(c)
    } else if cmd::find_on_path("sudo").is_some() {
        // -E keeps RUST_LOG and friends.
        let mut c = command("sudo");
        c.arg("-E").arg(bin).args(args);
        Ok(c)
    } else {
        bail!(
            "gracewatch needs root (or CAP_BPF and CAP_PERFMON) to load its eBPF programs, and \
             sudo is not installed; rerun as root"
        );
    }
}
