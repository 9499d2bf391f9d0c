//! The module boundary of ARCHITECTURE.md §6, checked on the source tree:
//! consumers (`cli/`, `tui/`, `agent/`, `drain/`) talk to the
//! [`super::MonitorHandle`] and never name `source::`, aya, netlink or
//! procfs code. The few documented departures are listed in [`ALLOWED`];
//! anything else fails the unit tests, and so CI.

use std::path::Path;

/// The consumer modules, relative to `src/`.
const CONSUMERS: [&str; 4] = ["cli", "tui", "agent", "drain"];

/// Documented departures: (file prefix relative to `src/`, the text the
/// offending line must contain). The drain pins its targets by pidfd
/// (choosing targets is the drain's job); the hidden `record` command
/// drives the eBPF source by hand to write replay files.
const ALLOWED: [(&str, &str); 2] = [
    ("drain/", "source::process::"),
    ("cli/mod.rs", "crate::source::ebpf::EbpfSource::start("),
];

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

fn visit(dir: &Path, src: &Path, found: &mut Vec<String>) {
    let entries = std::fs::read_dir(dir).expect("read a consumer directory");
    for entry in entries {
        let path = entry.expect("read a directory entry").path();
        if path.is_dir() {
            visit(&path, src, found);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path
            .strip_prefix(src)
            .expect("under src/")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).expect("read a consumer file");
        for (n, line) in text.lines().enumerate() {
            let Some(why) = forbidden(line) else { continue };
            let allowed = ALLOWED
                .iter()
                .any(|(prefix, needle)| rel.starts_with(prefix) && line.contains(needle));
            if !allowed {
                found.push(format!("src/{rel}:{}: {why}: {}", n + 1, line.trim()));
            }
        }
    }
}

#[test]
fn consumers_talk_only_to_the_monitor() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    for consumer in CONSUMERS {
        visit(&src.join(consumer), &src, &mut found);
    }
    assert!(
        found.is_empty(),
        "consumers must go through monitor::MonitorHandle (ARCHITECTURE.md §6):\n{}",
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
