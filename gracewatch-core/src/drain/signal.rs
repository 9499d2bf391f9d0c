//! Signal names as users write them: `TERM`, `SIGTERM`, `term`, `15`.

use std::{fmt, str::FromStr};

/// A validated signal number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalSpec(i32);

const NAMES: [(&str, i32); 18] = [
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ABRT", libc::SIGABRT),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("WINCH", libc::SIGWINCH),
];

impl SignalSpec {
    pub const TERM: Self = Self(libc::SIGTERM);
    pub const KILL: Self = Self(libc::SIGKILL);

    pub fn number(self) -> i32 {
        self.0
    }

    /// `SIGTERM`, or `SIG34` for signals without a classic name.
    pub fn name(self) -> String {
        NAMES.iter().find(|(_, n)| *n == self.0).map_or_else(
            || format!("SIG{}", self.0),
            |(name, _)| format!("SIG{name}"),
        )
    }

    /// Parses a signal, or `none` (only wait) as `Ok(None)`.
    pub fn parse_optional(s: &str) -> Result<Option<Self>, String> {
        if s.eq_ignore_ascii_case("none") {
            Ok(None)
        } else {
            s.parse().map(Some)
        }
    }
}

impl FromStr for SignalSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Ok(n) = t.parse::<i32>() {
            let max = libc::SIGRTMAX();
            return if (1..=max).contains(&n) {
                Ok(Self(n))
            } else {
                Err(format!("`{s}` is not a signal number (1 to {max})"))
            };
        }
        let upper = t.to_ascii_uppercase();
        let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
        NAMES
            .iter()
            .find(|(name, _)| *name == bare)
            .map(|&(_, n)| Self(n))
            .ok_or_else(|| format!("unknown signal `{s}` (examples: TERM, SIGQUIT, 15, none)"))
    }
}

impl fmt::Display for SignalSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_prefixes_numbers_and_none() {
        for s in ["TERM", "SIGTERM", "term", "sigterm", "15", " 15 "] {
            assert_eq!(s.parse::<SignalSpec>(), Ok(SignalSpec::TERM), "{s}");
        }
        assert_eq!(
            "QUIT".parse::<SignalSpec>().map(SignalSpec::number),
            Ok(libc::SIGQUIT)
        );
        assert_eq!("SIGKILL".parse::<SignalSpec>(), Ok(SignalSpec::KILL));
        assert_eq!(SignalSpec::parse_optional("none"), Ok(None));
        assert_eq!(SignalSpec::parse_optional("NONE"), Ok(None));
        assert_eq!(SignalSpec::TERM.name(), "SIGTERM");
        assert_eq!(SignalSpec(40).name(), "SIG40");
        for bad in ["TERMINATE", "SIG", "", "0", "-1", "99999", "15x"] {
            assert!(
                bad.parse::<SignalSpec>().is_err(),
                "{bad:?} must be rejected"
            );
        }
    }
}
