//! Every exit code of the `gracewatch` command, in one table (ARCHITECTURE.md
//! §5): the codes, the outcome of a drain each one stands for, and the help
//! texts that list them. Nothing else in the workspace picks a number; the
//! core library returns typed outcomes ([`Outcome`]) and errors
//! ([`MonitorError`](crate::monitor::MonitorError)), and this module maps
//! them.

use serde::{Serialize, Serializer, ser::SerializeStruct as _};

use hyper::StatusCode;

use crate::{
    agent::ClientError,
    drain::{DrainReport, Outcome},
};

pub const OK: u8 = 0;
pub const RUNTIME: u8 = 1;
pub const USAGE: u8 = 2;
pub const TARGET_EXITED: u8 = 3;
pub const CANNOT_MONITOR: u8 = 4;
/// The kernel refused the signal (a target that has not exited).
pub const SIGNAL_REFUSED: u8 = 5;
pub const TIMEOUT: u8 = 124;
pub const INTERRUPTED: u8 = 130;

/// The exit code of a drain's outcome.
pub fn of(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Drained => OK,
        Outcome::Error => RUNTIME,
        Outcome::TargetExited => TARGET_EXITED,
        Outcome::SignalRefused => SIGNAL_REFUSED,
        Outcome::Timeout => TIMEOUT,
        Outcome::Interrupted => INTERRUPTED,
    }
}

/// The exit code `drain --agent` uses when the agent refuses or cannot be
/// reached: a request the agent calls bad is a usage error, a refused token
/// is missing privileges, anything else is a runtime error.
pub fn of_client_error(e: &ClientError) -> u8 {
    match e {
        ClientError::Refused { status, .. } => match *status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => CANNOT_MONITOR,
            s if s.is_client_error() && s != StatusCode::TOO_MANY_REQUESTS => USAGE,
            _ => RUNTIME,
        },
        ClientError::Transport(_) => RUNTIME,
    }
}

/// A drain's report as the JSON contract has it (`drain --json`'s result
/// line, the agent's `report`): the core's typed report with the `exit_code`
/// of its outcome after `outcome`, in the field order of the schema.
pub struct ReportJson<'a>(pub &'a DrainReport);

impl Serialize for ReportJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let mut o = s.serialize_struct("DrainReport", 13)?;
        o.serialize_field("targets", &r.targets)?;
        o.serialize_field("outcome", &r.outcome)?;
        o.serialize_field("exit_code", &of(r.outcome))?;
        o.serialize_field("initial_live", &r.initial_live)?;
        o.serialize_field("peak_live", &r.peak_live)?;
        o.serialize_field("duration_ms", &r.duration_ms)?;
        o.serialize_field("signal_sent", &r.signal_sent)?;
        o.serialize_field("still_held", &r.still_held)?;
        o.serialize_field("held", &r.held)?;
        o.serialize_field("ended_by", &r.ended_by)?;
        o.serialize_field("excluded", &r.excluded)?;
        o.serialize_field("peers", &r.peers)?;
        o.serialize_field("idle", &r.idle)?;
        o.serialize_field("message", &r.message)?;
        o.end()
    }
}

/// `#[serde(serialize_with)]` for an optional report: [`ReportJson`].
pub fn serialize_report<S: Serializer>(r: &Option<DrainReport>, s: S) -> Result<S::Ok, S::Error> {
    r.as_ref().map(ReportJson).serialize(s)
}

/// The codes every subcommand can end with (`--help` of all but
/// `drain`/`wait`).
pub const GENERAL_HELP: &str = "\
Exit codes:
  0    success
  1    runtime error
  2    usage error (bad arguments)
  4    cannot monitor: missing privileges (root, or CAP_BPF + CAP_PERFMON) or kernel support (BTF, tracepoints)
  130  interrupted

Needs root (or CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_PTRACE) and a kernel with BTF.";

/// The codes of `drain` and `wait`: the general ones plus one per drain
/// outcome.
pub const DRAIN_HELP: &str = "\
Exit codes:
  0    drained (and the signal was delivered, if one was asked for)
  1    runtime error
  2    usage error: bad arguments, unknown signal, a number out of range,
       missing, garbled or untrusted pidfile, a pid that does not exist or
       already exited (also a zombie its parent has not reaped), a refused
       target (pid 1, a kernel thread, gracewatch or its ancestors,
       --children of pid 1): nothing is signalled
  3    the target exited before it drained (the message says how many
       connections it still held)
  4    cannot monitor: missing privileges or kernel support
  5    the kernel refused the signal (e.g. EPERM: another user's process
       and no CAP_KILL); the message names the errno and the target, which
       lives on
  124  --timeout passed with live connections left, or the drain could not
       be confirmed (e.g. the target's fds cannot be read; the message says
       why), like timeout(1)
  130  interrupted (Ctrl-C or SIGTERM): nothing is signalled

Who is signalled: the named targets (--pid, --pidfile) still alive. With
--children the drain also waits for every descendant, but signals only the
named roots: servers pass the signal on to their workers (nginx, HAProxy
master-worker, gunicorn, Apache), and workers already on their way out are
left alone.

Examples:
  gracewatch drain --pid \"$OLD\" --timeout 2m            # SIGTERM at zero
  gracewatch wait --pidfile /run/app.pid --min-wait 5s
  gracewatch drain --pid \"$OLD\" --exclude-peer 10.0.0.5 --timeout 2m  # a scraper's
      # keep-alive from 10.0.0.5 does not hold it (the signal cuts it)
  gracewatch drain --pid \"$OLD\" --until-idle 30s --timeout 10m  # ends once every
      # connection left moved no data for 30 s (the signal cuts them)
  gracewatch drain --pidfile /run/nginx.pid.oldbin --children \\
      --exclude \"$(cat /run/nginx.pid)\" --signal QUIT --timeout 5m";

#[cfg(test)]
mod tests {
    use super::*;

    /// Each code the table can return is explained in the help text that
    /// goes with it, and in README's table.
    #[test]
    fn every_code_is_documented() {
        let readme = include_str!("../../README.md");
        let outcomes = [
            Outcome::Drained,
            Outcome::Error,
            Outcome::TargetExited,
            Outcome::SignalRefused,
            Outcome::Timeout,
            Outcome::Interrupted,
        ];
        for code in outcomes.map(of).into_iter().chain([USAGE, CANNOT_MONITOR]) {
            let line = format!("\n  {code:<4} ");
            assert!(
                DRAIN_HELP.contains(&line),
                "code {code} missing from drain --help"
            );
            assert!(
                readme.contains(&format!("| {code} |")),
                "code {code} missing from README"
            );
        }
        for code in [OK, RUNTIME, USAGE, CANNOT_MONITOR, INTERRUPTED] {
            assert!(
                GENERAL_HELP.contains(&format!("\n  {code:<4} ")),
                "code {code} missing from --help"
            );
        }
    }
}
