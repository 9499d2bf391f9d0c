//! The boundaries of ARCHITECTURE.md §2 and §6, checked on the source tree
//! (they are CI's, since `cargo test` runs this):
//!
//! - the consumers (the CLI, the TUI and the agent in this crate, and the
//!   drain gate in `gracewatch-core`) talk to the
//!   `monitor::MonitorHandle` and never name `source::`, aya, netlink or
//!   procfs code. The compiler already keeps this crate out (`source` is
//!   private to the core); this also covers the gate and text like
//!   `gracewatch_core::source`. The one documented departure is in
//!   [`ALLOWED`];
//! - no import cycle: the agent and the TUI never import the CLI (the CLI
//!   dispatches to both);
//! - the core library has no UI: none of clap, ratatui, crossterm, axum,
//!   hyper or prometheus-client among its dependencies, no printing and no
//!   exit codes in its code; the pure model depends on serde and a
//!   hasher alone (see [`MODEL_DEPENDENCIES`]).

use std::path::{Path, PathBuf};

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The consumer directories, relative to the workspace root.
const CONSUMERS: [&str; 4] = [
    "gracewatch/src/cli",
    "gracewatch/src/tui",
    "gracewatch/src/agent",
    "gracewatch-core/src/drain",
];

/// Documented departures: (file prefix relative to the workspace root, the
/// text the offending line must contain). The drain pins its targets by
/// pidfd, and choosing targets is the drain's job.
const ALLOWED: [(&str, &str); 1] = [("gracewatch-core/src/drain/", "source::process::")];

/// Why `line` (code, not a comment) names code consumers must not, if it
/// does.
fn forbidden(line: &str) -> Option<&'static str> {
    let code = line.split("//").next().unwrap_or_default();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if !(c.is_ascii_alphabetic() || c == b'_') {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        let ident = &code[start..i];
        let path_after = code[i..].trim_start().starts_with("::");
        let path_before = code[..start].trim_end().ends_with("::");
        if ident == "source" && (path_after || path_before) {
            return Some("names the source module");
        }
        if ident == "aya" || ident.starts_with("aya_") {
            return Some("names aya");
        }
        if ident.starts_with("netlink") {
            return Some("names netlink");
        }
        if ident == "procfs" {
            return Some("names procfs");
        }
    }
    None
}

/// Every `.rs` file below `dir`, with its text.
fn rust_files(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("read a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("read a source file");
            out.push((path, text));
        }
    }
}

/// `path` relative to the workspace root, for messages and [`ALLOWED`].
fn rel(path: &Path) -> String {
    let root = root().canonicalize().expect("the workspace root");
    let path = path.canonicalize().expect("a source file");
    path.strip_prefix(&root)
        .expect("in the workspace")
        .to_string_lossy()
        .into_owned()
}

/// The lines of `text` before its unit tests (`#[cfg(test)]` at the start
/// of a line), numbered from 1: tests may print and name anything.
fn product_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .enumerate()
        .map(|(n, l)| (n + 1, l))
}

#[test]
fn consumers_talk_only_to_the_monitor() {
    let mut found = Vec::new();
    for consumer in CONSUMERS {
        let mut files = Vec::new();
        rust_files(&root().join(consumer), &mut files);
        for (path, text) in &files {
            let rel = rel(path);
            for (n, line) in text.lines().enumerate() {
                let Some(why) = forbidden(line) else { continue };
                let allowed = ALLOWED
                    .iter()
                    .any(|(prefix, needle)| rel.starts_with(prefix) && line.contains(needle));
                if !allowed {
                    found.push(format!("{rel}:{}: {why}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "consumers must go through monitor::MonitorHandle (ARCHITECTURE.md §6):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_agent_and_the_tui_never_import_the_cli() {
    let mut found = Vec::new();
    for dir in ["gracewatch/src/agent", "gracewatch/src/tui"] {
        let mut files = Vec::new();
        rust_files(&root().join(dir), &mut files);
        for (path, text) in &files {
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                if code.contains("crate::cli") || code.contains("cli::") && code.contains("use ") {
                    found.push(format!("{}:{}: {}", rel(path), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "an import cycle through the CLI:\n{}",
        found.join("\n")
    );
}

/// The `[dependencies]` names of a crate's manifest.
fn dependencies(krate: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).expect("a manifest");
    text.split("\n[")
        .find(|s| s.starts_with("dependencies]"))
        .into_iter()
        .flat_map(|s| s.lines().skip(1))
        .filter_map(|l| l.split_once('=').map(|(name, _)| name.trim().to_owned()))
        .filter(|name| !name.is_empty() && !name.starts_with('#'))
        .collect()
}

/// What the pure model may depend on: plain data (serde) and the
/// tracker's hasher (foldhash: a seeded hash function over bytes it is
/// handed, no I/O, no clock, no runtime; SipHash cost the tracker a third
/// of its time per connection). Anything else is a decision to make here.
const MODEL_DEPENDENCIES: [&str; 2] = ["foldhash", "serde"];

#[test]
fn the_core_has_no_ui_and_the_model_no_io() {
    let core = dependencies("gracewatch-core");
    assert!(
        core.contains(&"aya".to_owned()),
        "parsed the core's manifest: {core:?}"
    );
    for ui in [
        "clap",
        "ratatui",
        "crossterm",
        "axum",
        "hyper",
        "hyper-util",
        "prometheus-client",
        "env_logger",
    ] {
        assert!(
            !core.contains(&ui.to_owned()),
            "gracewatch-core depends on {ui}"
        );
    }
    assert_eq!(
        dependencies("gracewatch-model"),
        MODEL_DEPENDENCIES,
        "the model is pure"
    );

    let mut files = Vec::new();
    rust_files(&root().join("gracewatch-core/src"), &mut files);
    rust_files(&root().join("gracewatch-model/src"), &mut files);
    let mut found = Vec::new();
    for (path, text) in &files {
        for (n, line) in product_lines(text) {
            let code = line.split("//").next().unwrap_or_default();
            for ui in [
                "println!",
                "eprintln!",
                "print!(",
                "eprint!(",
                "process::exit",
                "ExitCode",
                "exit_code",
            ] {
                if code.contains(ui) {
                    found.push(format!("{}:{n}: {ui}: {}", rel(path), line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "the core prints or picks exit codes:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_catches_what_it_must() {
    for bad in [
        "use crate::source::snapshot;",
        "    source::{Liveness, liveness},",
        "use crate::source;",
        "let s = crate::source::snapshot::live_inbound_fds_with(pid, &k);",
        "use aya::maps::HashMap;",
        "use aya_log::EbpfLogger;",
        "use netlink_sys::Socket;",
        "use rustix::procfs::proc_self_fd;",
    ] {
        assert!(forbidden(bad).is_some(), "not caught: {bad}");
    }
    for fine in [
        "let mut lim = getrlimit(Resource::Nofile);",
        "// the fds, looked at off the runtime (procfs, netlink, setns block)",
        "let x = 1; // source::snapshot did this before",
        "use crate::monitor::{MonitorHandle, SourceOptions};",
        "let source = open();",
    ] {
        assert_eq!(forbidden(fine), None, "wrongly caught: {fine}");
    }
}
