//! Without the capabilities it needs, gracewatch refuses with exit code 4
//! and one line naming the missing capability — before touching the kernel
//! or any process. Capabilities are dropped with `capsh`, as an operator
//! running it unprivileged would have them dropped.

use std::process::{Command, Stdio};

use gracewatch_e2e::setup;

/// Runs `gracewatch ARGS` with `drop` removed from the bounding and
/// effective sets; returns (exit code, stderr).
fn run_without(gw: &gracewatch_e2e::Gracewatch, drop: &str, args: &str) -> (i32, String) {
    let cmd = format!("exec {} {args}", gw.bin().display());
    let out = Command::new("capsh")
        .args([&format!("--drop={drop}"), "--", "-c", &cmd])
        .stdin(Stdio::null())
        .output()
        .expect("capsh runs (package libcap2-bin)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_capabilities_exit_4_naming_the_capability() {
    let Some(gw) = setup() else { return };
    let cases = [
        ("cap_bpf,cap_sys_admin", "status", "CAP_BPF"),
        ("cap_perfmon,cap_sys_admin", "status --json", "CAP_PERFMON"),
        ("cap_bpf,cap_sys_admin", "watch --json", "CAP_BPF"),
    ];
    for (drop, args, named) in cases {
        let (code, stderr) = run_without(&gw, drop, args);
        assert_eq!(
            code, 4,
            "`gracewatch {args}` without {drop}: stderr {stderr:?}"
        );
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line, got {stderr:?}");
        assert!(
            lines[0].contains(named),
            "{named} must be named: {stderr:?}"
        );
        assert!(!stderr.contains("panicked"), "{stderr:?}");
    }
}

#[test]
fn drain_without_capabilities_exits_4_and_signals_nothing() {
    let Some(gw) = setup() else { return };
    // A target that would die of SIGTERM: it must still be alive afterwards.
    let mut target = Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    let (code, stderr) = run_without(
        &gw,
        "cap_bpf,cap_sys_admin",
        &format!("drain --pid {} --timeout 5s", target.id()),
    );
    let alive = target.try_wait().expect("try_wait").is_none();
    let _ = target.kill();
    let _ = target.wait();
    assert_eq!(code, 4, "stderr {stderr:?}");
    assert!(stderr.contains("CAP_BPF"), "{stderr:?}");
    assert!(alive, "the target must not have been signalled");
}
