//! Running external programs and asking the host about itself (privileges,
//! paths). Every child process goes through [`command`], so that tools
//! installed by `cargo install` are found even when `~/.cargo/bin` is not on
//! the caller's `PATH`.

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// Linux capability numbers (`linux/capability.h`).
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The workspace root: xtask lives one level below it.
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Where cargo puts build output, honouring `CARGO_TARGET_DIR`.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                repo_root().join(dir)
            }
        }
        _ => repo_root().join("target"),
    }
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`), where `cargo install` puts tools.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(home).join("bin"));
    }
    env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".cargo").join("bin"))
}

/// The caller's `PATH` with the cargo bin directory appended if it was missing.
fn search_path() -> &'static OsString {
    static PATH: OnceLock<OsString> = OnceLock::new();
    PATH.get_or_init(|| {
        let mut dirs: Vec<PathBuf> = env::var_os("PATH")
            .map(|p| env::split_paths(&p).collect())
            .unwrap_or_default();
        if let Some(bin) = cargo_bin_dir().filter(|bin| !dirs.contains(bin)) {
            dirs.push(bin);
        }
        env::join_paths(dirs).unwrap_or_else(|_| env::var_os("PATH").unwrap_or_default())
    })
}

/// Whether the caller's own `PATH` (not the one we give children) has `dir`.
pub fn caller_path_has(dir: &Path) -> bool {
    env::var_os("PATH").is_some_and(|p| env::split_paths(&p).any(|d| d == dir))
}

/// A command for `program` that searches [`search_path`].
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let program = program.as_ref();
    // `Command` resolves a bare name with the parent's PATH, not the child's,
    // so resolve it here against the PATH we hand down.
    let resolved = if Path::new(program).components().count() == 1 {
        find_on_path(program).map_or_else(|| program.to_os_string(), PathBuf::into_os_string)
    } else {
        program.to_os_string()
    };
    let mut cmd = Command::new(resolved);
    cmd.env("PATH", search_path());
    cmd
}

/// The first executable called `name` on [`search_path`].
pub fn find_on_path(name: impl AsRef<OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    env::split_paths(search_path())
        .map(|dir| dir.join(name.as_ref()))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The command line as a user would type it, for logs and error messages.
pub fn display(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    // Print `cargo`, not `/root/.cargo/bin/cargo`: shorter and copy-pasteable.
    let program = match program.file_name() {
        Some(name) if find_on_path(name).as_deref() == Some(program) => name,
        _ => program.as_os_str(),
    };
    let mut line = quote(program);
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(arg));
    }
    line
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Echoes and runs `cmd` with inherited stdio; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    println!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout; fails unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!("`{line}` failed ({}): {}", out.status, stderr.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` quietly and reports whether it exited 0 (false if it cannot start).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A field of `/proc/self/status`, e.g. `Uid` or `CapEff`.
fn proc_status_field(name: &str) -> Option<String> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == name).then(|| value.trim().to_owned())
    })
}

/// Whether the effective uid is 0.
pub fn is_root() -> bool {
    proc_status_field("Uid")
        .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// Whether this process may load and attach the tracepoint programs without
/// being root: CAP_BPF and CAP_PERFMON in its effective set.
pub fn has_bpf_caps() -> bool {
    proc_status_field("CapEff")
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_BPF) != 0 && caps & (1 << CAP_PERFMON) != 0)
}

/// `CI=true` (any non-empty value other than `false`/`0`), as CI services set it.
pub fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// `1.2s`, `2m03s`: short enough for a summary column.
pub fn human(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = d.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

/// One line per fact a CI log reader needs to reproduce a result.
pub fn print_environment() {
    let facts: [(&str, Command); 4] = [
        ("kernel", {
            let mut c = command("uname");
            c.arg("-r");
            c
        }),
        ("rustc", {
            let mut c = command("rustc");
            c.arg("-V");
            c
        }),
        ("rustc nightly", {
            let mut c = command("rustup");
            c.args(["run", "nightly", "rustc", "-V"]);
            c
        }),
        ("bpf-linker", {
            let mut c = command("bpf-linker");
            c.arg("--version");
            c
        }),
    ];
    for (what, mut cmd) in facts {
        let value = output(&mut cmd)
            .map(|out| out.trim().to_owned())
            .unwrap_or_else(|_| "unavailable".to_owned());
        println!("{what}: {value}");
    }
    println!("ci: {}", if in_ci() { "CI=true" } else { "CI not set" });
}
