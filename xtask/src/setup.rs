//! `cargo xtask setup`: makes the host able to build (and with
//! `--test-deps`, to test) gracewatch. Every item is checked first and
//! installed only when missing, so a second run is quick and changes nothing.
//! The recipe: the aya 0.14 family (newer needs rustc 1.98), the nightly
//! `rust-src` component, and bpf-linker built against Debian's LLVM 22.

use std::{fs, path::Path, thread, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{self, command};

/// Libraries `bpf-linker` links against (it embeds LLVM 22, matching the
/// nightly's LLVM).
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

/// What the end-to-end tests drive: namespaces (`ip`), real servers (nginx,
/// HAProxy (its packaged config listens on nothing, so a packaged instance
/// left running is harmless), python3), interactive sessions (tmux), capabilities (`setcap`), BPF
/// inspection for the leak check (`bpftool`) and a real Prometheus scraping
/// the agent (`prometheus`); `wrk` loads nginx in `cargo xtask bench`.
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "tmux",
    "python3",
    "nginx-light",
    "haproxy",
    "libcap2-bin",
    "bpftool",
    "prometheus",
    "wrk",
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Also install what `cargo xtask test` needs.
    pub test_deps: bool,
}

pub fn setup(opts: Options) -> Result<()> {
    let mut nightly_components = vec!["rust-src"];
    if opts.test_deps {
        // The eBPF crate is linted with the nightly clippy.
        nightly_components.push("clippy");
    }
    nightly(&nightly_components)?;
    if opts.test_deps {
        stable_components(&["clippy", "rustfmt"])?;
    }

    let mut apt = Apt::default();
    apt.ensure(BUILD_PACKAGES)?;
    bpf_linker()?;
    if opts.test_deps {
        let installed = apt.ensure(TEST_PACKAGES)?;
        if installed.contains(&"nginx-light") {
            stop_packaged_nginx();
        }
        if installed.contains(&"prometheus") {
            stop_packaged_prometheus();
        }
    }
    tracefs()
}

/// Whether `rustup component list --installed` output has `component`:
/// `rust-src` is listed bare, host components with the host triple
/// (`clippy-x86_64-unknown-linux-gnu`).
fn has_component(installed: &str, component: &str, host: &str) -> bool {
    let with_host = format!("{component}-{host}");
    installed
        .lines()
        .map(str::trim)
        .any(|line| line == component || line == with_host)
}

/// The host triple, e.g. `x86_64-unknown-linux-gnu`.
fn host_triple() -> Result<String> {
    let verbose = cmd::output(command("rustc").arg("-vV")).context("failed to run `rustc -vV`")?;
    verbose
        .lines()
        .find_map(|line| line.strip_prefix("host:"))
        .map(|host| host.trim().to_owned())
        .context("`rustc -vV` printed no `host:` line")
}

fn require_rustup() -> Result<()> {
    if cmd::find_on_path("rustup").is_none() {
        bail!(
            "rustup not found: a nightly toolchain with rust-src is required to build the eBPF \
             programs; install rustup from https://rustup.rs and rerun `cargo xtask setup`"
        );
    }
    Ok(())
}

fn nightly(components: &[&str]) -> Result<()> {
    require_rustup()?;
    let installed = cmd::output(command("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    match installed {
        Err(_) => {
            println!(
                "installing: nightly toolchain with {}",
                components.join(", ")
            );
            let mut install = command("rustup");
            install.args(["toolchain", "install", "nightly", "--profile", "minimal"]);
            for component in components {
                install.args(["--component", component]);
            }
            cmd::run(&mut install).context(
                "a nightly toolchain is required to build the eBPF programs \
                 (`-Z build-std=core` for bpfel-unknown-none), and installing one failed",
            )?;
        }
        Ok(installed) => {
            let host = host_triple()?;
            for component in components {
                if !has_component(&installed, component, &host) {
                    println!("installing: {component} for the nightly toolchain");
                    cmd::run(command("rustup").args([
                        "component",
                        "add",
                        component,
                        "--toolchain",
                        "nightly",
                    ]))
                    .with_context(|| {
                        format!("failed to add `{component}` to the nightly toolchain")
                    })?;
                }
            }
        }
    }
    let version = cmd::output(command("rustup").args(["run", "nightly", "rustc", "-V"]))
        .context("failed to run the nightly rustc")?;
    println!(
        "ok: nightly {} with {}",
        version.trim(),
        components.join(", ")
    );
    Ok(())
}

/// Components of the default (stable) toolchain the checks use.
fn stable_components(components: &[&str]) -> Result<()> {
    require_rustup()?;
    let installed = cmd::output(command("rustup").args(["component", "list", "--installed"]))
        .context("failed to list the components of the default toolchain")?;
    let host = host_triple()?;
    for component in components {
        if has_component(&installed, component, &host) {
            println!("ok: {component} (default toolchain)");
        } else {
            println!("installing: {component} for the default toolchain");
            cmd::run(command("rustup").args(["component", "add", component]))
                .with_context(|| format!("failed to add `{component}` to the default toolchain"))?;
        }
    }
    Ok(())
}

/// Debian packages, with `apt-get update` run at most once per setup.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    /// Installs the missing ones among `packages`; returns those it installed.
    fn ensure<'a>(&mut self, packages: &[&'a str]) -> Result<Vec<&'a str>> {
        if cmd::find_on_path("dpkg-query").is_none() {
            bail!(
                "dpkg-query not found: `cargo xtask setup` installs packages on Debian and Ubuntu \
                 only; install the equivalents of {} yourself",
                packages.join(" ")
            );
        }
        let mut missing = Vec::new();
        for &package in packages {
            match installed_version(package) {
                Some(version) => println!("ok: {package} {version}"),
                None => missing.push(package),
            }
        }
        if missing.is_empty() {
            return Ok(missing);
        }
        if !cmd::is_root() {
            bail!(
                "missing Debian packages: {list}; rerun `cargo xtask setup` as root or with sudo \
                 (or run `apt-get install {list}` yourself)",
                list = missing.join(" ")
            );
        }
        for package in &missing {
            println!("installing: {package} (apt)");
        }
        if !self.updated {
            cmd::run(command("apt-get").arg("update"))
                .context("failed to update the apt package lists")?;
            self.updated = true;
        }
        cmd::run(
            command("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y"])
                .args(&missing),
        )
        .with_context(|| format!("failed to install Debian packages {}", missing.join(" ")))?;
        for package in &missing {
            match installed_version(package) {
                Some(version) => println!("ok: {package} {version}"),
                None => bail!("package `{package}` is still not installed after `apt-get install`"),
            }
        }
        Ok(missing)
    }
}

/// The package's version if dpkg says "install ok installed".
fn installed_version(package: &str) -> Option<String> {
    let out = cmd::output(command("dpkg-query").args(["-W", "-f=${Status}\t${Version}", package]))
        .ok()?;
    let (status, version) = out.split_once('\t')?;
    (status == "install ok installed").then(|| version.trim().to_owned())
}

/// Installing nginx starts a system nginx on port 80 (through systemd, or the
/// init script where there is no systemd); the tests start their own nginx
/// and must not find the package's one running. Only the master recorded in
/// the package's pid file is stopped — never an nginx someone else started.
fn stop_packaged_nginx() {
    if cmd::find_on_path("systemctl").is_some() {
        // Fails harmlessly when systemd is not PID 1.
        cmd::succeeds(command("systemctl").args(["disable", "--now", "nginx"]));
    }
    let Some(pid) = fs::read_to_string("/run/nginx.pid")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        println!("ok: no packaged nginx running");
        return;
    };
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "nginx" {
        println!("ok: no packaged nginx running");
        return;
    }
    println!("stopping: the nginx (pid {pid}) the package started");
    // QUIT is nginx's graceful shutdown; it has no clients yet.
    cmd::succeeds(command("kill").args(["-QUIT", &pid.to_string()]));
    for _ in 0..50 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    cmd::succeeds(command("kill").args(["-KILL", &pid.to_string()]));
}

/// Installing prometheus enables and starts a system Prometheus (and the
/// node exporter it recommends); the agent test starts its own on a
/// temporary config, so the packaged services are stopped and disabled.
fn stop_packaged_prometheus() {
    const UNITS: [&str; 2] = ["prometheus", "prometheus-node-exporter"];
    if cmd::find_on_path("systemctl").is_some() {
        // Fails harmlessly when systemd is not PID 1.
        cmd::succeeds(command("systemctl").args(["disable", "--now"]).args(UNITS));
    }
    for unit in UNITS {
        let script = format!("/etc/init.d/{unit}");
        if Path::new(&script).exists() {
            cmd::succeeds(command(&script).arg("stop"));
        }
    }
    println!("ok: packaged prometheus services stopped");
}

fn bpf_linker() -> Result<()> {
    if let Some(path) = cmd::find_on_path("bpf-linker") {
        let version = cmd::output(command(&path).arg("--version"))
            .with_context(|| format!("failed to run `{} --version`", path.display()))?;
        println!("ok: {}", version.trim());
        warn_if_not_on_caller_path(&path);
        return Ok(());
    }
    println!("installing: bpf-linker (cargo install, about a minute)");
    let install = |locked: bool| {
        let mut c = command("cargo");
        c.env("LLVM_PREFIX", LLVM_PREFIX)
            .arg("install")
            .arg("bpf-linker");
        if locked {
            c.arg("--locked");
        }
        c.args(["--no-default-features", "--features", "llvm-22"]);
        cmd::run(&mut c)
    };
    if let Err(err) = install(true) {
        println!("note: `cargo install --locked` failed ({err:#}); retrying without --locked");
        install(false).context("failed to install bpf-linker")?;
    }
    let path = cmd::find_on_path("bpf-linker")
        .context("bpf-linker was installed but is not on PATH or in ~/.cargo/bin")?;
    let version = cmd::output(command(&path).arg("--version"))
        .context("failed to run the freshly installed bpf-linker")?;
    println!("ok: {}", version.trim());
    warn_if_not_on_caller_path(&path);
    Ok(())
}

/// The gracewatch build script looks bpf-linker up on PATH; xtask adds
/// ~/.cargo/bin for its children, but a bare `cargo build` would not.
fn warn_if_not_on_caller_path(path: &Path) {
    if let Some(dir) = path.parent().filter(|dir| !cmd::caller_path_has(dir)) {
        println!(
            "note: {} is not on your PATH; add it, or plain `cargo build` will not find bpf-linker",
            dir.display()
        );
    }
}

fn tracefs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("failed to read /proc/mounts")?;
    Ok(mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next();
        let target = fields.next();
        let fstype = fields.next();
        target == Some(TRACEFS) && fstype == Some("tracefs")
    }))
}

/// The programs read tracepoint formats from tracefs, which these machines
/// do not mount by default.
fn tracefs() -> Result<()> {
    if tracefs_mounted()? {
        println!("ok: tracefs mounted at {TRACEFS}");
        return Ok(());
    }
    if !cmd::is_root() {
        println!(
            "warning: tracefs is not mounted at {TRACEFS} and mounting it needs root; \
             run `mount -t tracefs tracefs {TRACEFS}` as root before starting gracewatch"
        );
        return Ok(());
    }
    println!("mounting: tracefs at {TRACEFS}");
    cmd::run(command("mount").args(["-t", "tracefs", "tracefs", TRACEFS]))
        .with_context(|| format!("failed to mount tracefs at {TRACEFS}"))?;
    Ok(())
}
