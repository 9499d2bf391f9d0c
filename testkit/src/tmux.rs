//! A tmux server of the test's own, to drive `gracewatch tui` like a
//! person: keys in with `send-keys`, the screen out with `capture-pane`.

use std::{
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::in_ci;

/// A tmux server of our own (`-L`), so nothing else running tmux on the host
/// is touched; killed with everything in it on drop.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    /// A detached 120x40 session running a plain bash with prompt `gw$ `.
    pub fn start(tag: &str) -> Option<Tmux> {
        let socket = format!("gw-{tag}-{}", std::process::id());
        let ok = Command::new("tmux")
            .args([
                "-L",
                &socket,
                "new-session",
                "-d",
                "-s",
                "tui",
                "-x",
                "120",
                "-y",
                "40",
            ])
            .arg("env PS1='gw$ ' TERM=xterm-256color bash --norc --noprofile")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let why = "tmux is not available (apt-get install tmux; `cargo xtask setup --test-deps` installs it)";
            assert!(!in_ci(), "{why} (CI=true: this is a failure, not a skip)");
            eprintln!("SKIPPED: {why}");
            return None;
        }
        Some(Tmux { socket })
    }

    pub fn tmux(&self, args: &[&str]) -> Output {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("failed to run tmux {args:?}: {e}"));
        assert!(
            out.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Sends tmux key names (`q`, `Enter`, `Down`…).
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "tui"];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    /// Types `line` literally, then Enter.
    pub fn type_line(&self, line: &str) {
        self.tmux(&["send-keys", "-t", "tui", "-l", line]);
        self.keys(&["Enter"]);
    }

    pub fn screen(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p", "-t", "tui"]).stdout)
            .into_owned()
    }

    /// The pane's title (what an escape sequence in the output may set).
    pub fn title(&self) -> String {
        let out = self.tmux(&["display-message", "-p", "-t", "tui", "#{pane_title}"]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn alternate_screen(&self) -> bool {
        let out = self.tmux(&["display-message", "-p", "-t", "tui", "#{alternate_on}"]);
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    }

    /// Waits until `check` accepts the screen; panics with the last screen
    /// and why it did not match.
    #[track_caller]
    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            let why = match check(&screen) {
                Ok(()) => return screen,
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for: {what}\n  last mismatch: {why}\n  screen:\n{screen}"
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
