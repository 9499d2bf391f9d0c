//! Every command-line option that takes a value, swept with values a
//! script or a typo can produce (zero, negative, huge, not a number): each
//! must be a usage error — exit 2, one line on stderr, nothing on stdout —
//! and never a panic (exit 101) or a run. The options are read from each
//! subcommand's `--help`, so an option added later without a place in the
//! table below fails this test until it is classified.
//!
//! Unprivileged: every value here is refused before gracewatch touches the
//! kernel.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_gracewatch");
const SUBCOMMANDS: [&str; 7] = ["status", "watch", "drain", "wait", "tui", "agent", "record"];
/// A refused value exits at once; anything slower started running.
const PATIENCE: Duration = Duration::from_secs(20);

/// What an option takes, and so which hostile values it is swept with.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Pid,
    Port,
    /// A duration where zero means "none" (and is valid).
    DurationZeroOk,
    /// A deadline: zero is refused too.
    Timeout,
    /// A size or a count with a lower bound above zero.
    Count,
    /// A number of generations (`--govern-max-draining`): 0 to 1000.
    Generations,
    /// An `IP:PORT` address.
    Addr,
    /// A peer rule, `CIDR[:PORT]`.
    PeerRule,
    /// Not a number (a path, a URL, a name, a signal, an enum value):
    /// not part of this sweep.
    Other,
}

fn kind_of(flag: &str) -> Option<Kind> {
    Some(match flag {
        "--pid" | "--exclude" => Kind::Pid,
        "--port" | "--govern-port" => Kind::Port,
        "--govern-max-draining" => Kind::Generations,
        "--min-wait" | "--interval" | "--quiet-for" | "--until-idle" => Kind::DurationZeroOk,
        "--timeout" | "--govern-max-age" => Kind::Timeout,
        "--max-connections" | "--ring-buffer-size" => Kind::Count,
        "--listen" => Kind::Addr,
        "--exclude-peer" => Kind::PeerRule,
        "--pidfile" | "--token-file" | "--unix" | "--agent" | "--comm" | "--signal"
        | "--on-timeout" | "--metric-labels" | "--govern-signal" => Kind::Other,
        _ => return None,
    })
}

fn hostile_values(kind: Kind) -> Vec<String> {
    const HUGE: [&str; 4] = [
        "99999999999999999999999",
        "18446744073709551616",
        "4294967296",
        "10000000000000000000",
    ];
    let mut v: Vec<String> = match kind {
        Kind::Pid => vec![
            "0",
            "-1",
            "2147483648",
            "4294967295",
            "4194305",
            "abc",
            "1.5",
            "",
        ],
        Kind::Port => vec!["0", "-1", "65536", "http", ""],
        Kind::DurationZeroOk => vec![
            "-1",
            "-1s",
            "10000000000000000000s",
            "99999999999999999999h",
            "8785h",
            "1e400",
            "soon",
            "",
        ],
        Kind::Timeout => vec![
            "0",
            "0s",
            "-1",
            "10000000000000000000s",
            "99999999999999999999h",
            "8785h",
            "NaN",
            "soon",
            "",
        ],
        Kind::Count => vec!["0", "-1", "4294967295", "1023", "many", ""],
        Kind::Generations => vec!["-1", "1001", "1.5", "many", ""],
        Kind::Addr => vec!["127.0.0.1:-1", "127.0.0.1:65536", "127.0.0.1:abc", "-1", ""],
        Kind::PeerRule => vec![
            "bogus",
            "0.0.0.0/0",
            "::/0",
            "10.0.0.1/8",
            "10.0.0.0/33",
            "127.0.0.9:0",
            "127.0.0.9:65536",
            "[::1",
            "[::1]9100",
            "-1",
            "",
        ],
        Kind::Other => Vec::new(),
    }
    .into_iter()
    .map(str::to_owned)
    .collect();
    if !matches!(kind, Kind::Other | Kind::Addr) {
        v.extend(HUGE.iter().map(|s| (*s).to_owned()));
    }
    v
}

/// Every `--flag <VALUE>` of `gracewatch <sub> --help`.
fn value_options(sub: &str) -> Vec<String> {
    let out = Command::new(BIN)
        .args([sub, "--help"])
        .output()
        .expect("run --help");
    assert!(out.status.success(), "{sub} --help: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut flags = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace().skip_while(|w| !w.starts_with("--"));
        if let (Some(flag), Some(value)) = (words.next(), words.next()) {
            if value.starts_with('<') && !flags.iter().any(|f| f == flag) {
                flags.push(flag.trim_end_matches(',').to_owned());
            }
        }
    }
    flags
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(args: &[String]) -> Run {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gracewatch");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("poll gracewatch").is_some() {
            break;
        }
        if started.elapsed() > PATIENCE {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("collect output");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn every_numeric_option_refuses_zero_negative_huge_and_garbage_with_one_line() {
    let mut failures = Vec::new();
    let mut swept = 0;
    for sub in SUBCOMMANDS {
        let flags = value_options(sub);
        assert!(!flags.is_empty(), "{sub} --help lists no option");
        for flag in flags {
            let Some(kind) = kind_of(&flag) else {
                failures.push(format!(
                    "`{sub} {flag}` takes a value but is not classified in this test: add it to kind_of"
                ));
                continue;
            };
            for value in hostile_values(kind) {
                // A valid target, so only the swept option can be wrong.
                let mut args = vec![sub.to_owned()];
                if matches!(sub, "drain" | "wait") && flag != "--pid" {
                    args.extend(["--pid".to_owned(), "1234".to_owned()]);
                }
                args.push(format!("{flag}={value}"));
                let r = run(&args);
                swept += 1;
                let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
                let ok = r.code == Some(2)
                    && lines.len() == 1
                    && r.stdout.is_empty()
                    && !r.stderr.contains("panicked")
                    && lines[0].contains(&flag);
                if !ok {
                    failures.push(format!(
                        "gracewatch {}: exit {:?}, stdout {:?}, stderr {:?}",
                        args.join(" "),
                        r.code,
                        r.stdout,
                        r.stderr
                    ));
                }
            }
        }
    }
    assert!(swept > 200, "only {swept} invocations");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn usage_errors_are_one_line() {
    for args in [
        vec!["frobnicate"],
        vec!["drain", "--pid", "1234", "--bogus"],
        vec!["drain", "--on-timeout", "later", "--pid", "1234"],
        vec!["status", "--pid"],
    ] {
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        let r = run(&args);
        let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
        assert_eq!(lines.len(), 1, "{args:?}: {:?}", r.stderr);
        assert!(lines[0].starts_with("error: "), "{args:?}: {:?}", r.stderr);
    }
}

/// `--quiet-for` takes a duration like `--min-wait` (zero: off); anything
/// else is refused before a drain starts, naming the option and why.
#[test]
fn a_bad_quiet_for_is_a_usage_error_that_says_why() {
    for (sub, value, why) in [
        ("wait", "5x", "unknown unit `x`"),
        ("wait", "-1s", "cannot be negative"),
        ("drain", "soon", "is not a duration"),
        ("drain", "8785h", "too long"),
    ] {
        let args: Vec<String> = [sub, "--pid", "1234", "--quiet-for", value]
            .into_iter()
            .map(str::to_owned)
            .collect();
        let r = run(&args);
        let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{args:?}: {}", r.stdout);
        assert_eq!(lines.len(), 1, "{args:?}: {:?}", r.stderr);
        assert!(
            lines[0].contains("--quiet-for") && lines[0].contains(why),
            "{args:?}: {:?}",
            r.stderr
        );
    }
}

/// `--exclude-peer` takes an address or CIDR with an optional port; a
/// value that is none of these, a rule so wide it would end every drain
/// at once, or too many rules, is refused before a drain starts, naming the
/// option and why.
#[test]
fn a_bad_exclude_peer_is_a_usage_error_that_says_why() {
    let many: Vec<String> = (0..65)
        .flat_map(|i| ["--exclude-peer".to_owned(), format!("10.0.0.{i}")])
        .collect();
    for (sub, values, why) in [
        (
            "drain",
            vec!["--exclude-peer", "bogus"],
            "is not a peer rule",
        ),
        ("wait", vec!["--exclude-peer", "0.0.0.0/0"], "every peer"),
        (
            "drain",
            vec!["--exclude-peer", "10.0.0.1/8"],
            "did you mean 10.0.0.0/8",
        ),
        ("drain", vec!["--exclude-peer", "127.0.0.9:0"], "port 0"),
        (
            "wait",
            many.iter().map(String::as_str).collect(),
            "at most 64",
        ),
    ] {
        let mut args: Vec<String> = [sub, "--pid", "1234"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        args.extend(values.iter().map(|v| (*v).to_owned()));
        let r = run(&args);
        let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(r.code, Some(2), "{why}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{why}: {}", r.stdout);
        assert_eq!(lines.len(), 1, "{why}: {:?}", r.stderr);
        assert!(
            lines[0].starts_with("error: ")
                && lines[0].contains("--exclude-peer")
                && lines[0].contains(why),
            "{why}: {:?}",
            r.stderr
        );
    }
}
