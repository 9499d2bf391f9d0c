//! `gracewatch tui` driven like a person would: the real binary in a tmux
//! pane (120x40), keys sent with `send-keys`, the screen read with
//! `capture-pane`, during a real fd-handover restart of `server.py` in a
//! network namespace. The screen must show both pids with the counts the
//! servers themselves report, the old one draining and then drained; a drain
//! started with `d` must signal it; and `q` must give back a clean shell
//! (same tty settings, no alternate screen).
//!
//! The screen is polled (every 100 ms, with a deadline): a terminal offers
//! nothing to wait on.

use std::time::Duration;

use gracewatch_testkit::{Client, Netns, STARTUP_TIMEOUT, Server, Tmux, setup, wait_accepted_sum};

/// How long the screen may take to show a change (the role heuristics wait
/// for 2 s of quiet, redraws happen at 4 Hz).
const SCREEN_TIMEOUT: Duration = Duration::from_secs(15);

/// A file deleted however the test ends.
struct RemoveOnDrop(String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The process table row of `pid`: (role, live — `None` for `-` —, the
/// rest of the row).
fn row(screen: &str, pid: u32) -> Option<(String, Option<u64>, String)> {
    let pid = pid.to_string();
    screen.lines().find_map(|line| {
        let words: Vec<&str> = line
            .split(|c: char| c == '│' || c.is_whitespace())
            .filter(|w| !w.is_empty() && *w != "▶")
            .collect();
        if words.first() != Some(&pid.as_str()) || words.len() < 4 {
            return None;
        }
        let live = words[3].parse().ok();
        Some((words[2].to_owned(), live, words[4..].join(" ")))
    })
}

fn expect_row(screen: &str, pid: u32, role: Option<&str>, live: u64) -> Result<(), String> {
    match row(screen, pid) {
        None => Err(format!("no row for pid {pid}")),
        Some((r, l, _)) if l != Some(live) || role.is_some_and(|want| want != r) => Err(format!(
            "pid {pid} shows {r} with {l:?} live, expected {} with {live} live",
            role.unwrap_or("any role")
        )),
        Some(_) => Ok(()),
    }
}

#[test]
fn tui_follows_an_fd_handover_restart() {
    let Some(gw) = setup() else { return };
    let ns = Netns::new("tui");
    let addr = "127.0.0.1:7401";
    let old = Server::listen(&ns, addr);
    let _c1 = Client::connect(&ns, addr, 4);
    old.wait_accepted(4);

    let Some(tmux) = Tmux::start("tui") else {
        return;
    };
    tmux.wait("a shell prompt", SCREEN_TIMEOUT, |s| {
        s.contains("gw$")
            .then_some(())
            .ok_or_else(|| "no prompt".to_owned())
    });
    let stty = std::env::temp_dir().join(format!("gw-tui-stty-{}", std::process::id()));
    let stty = stty.to_string_lossy().into_owned();
    let _stty_file = RemoveOnDrop(stty.clone());
    tmux.type_line(&format!("stty -g > {stty}; clear"));
    tmux.type_line(&format!("{} tui --port 7401", gw.bin().display()));

    // Startup: the old server alone, serving its 4 connections.
    tmux.wait("the old server serving 4", STARTUP_TIMEOUT, |s| {
        expect_row(s, old.pid(), Some("serving"), 4)
    });

    // The restart: the new process inherits the listener; both accept.
    let new = old.handover();
    let mut c2 = vec![Client::connect(&ns, addr, 3)];
    let mut sent = 7;
    wait_accepted_sum(&[&old, &new], sent);
    // Which of two processes waiting in accept() gets a connection is the
    // kernel's choice: connect until the new one has taken one, so that it
    // is seen accepting while the old one still serves.
    while new.count().open == 0 && sent < 30 {
        c2.push(Client::connect(&ns, addr, 1));
        sent += 1;
        wait_accepted_sum(&[&old, &new], sent);
    }
    assert!(
        new.count().open > 0,
        "the new server accepted none of {} connections",
        sent - 4
    );
    let (o, n) = (old.count().open, new.count().open);
    tmux.wait(
        &format!("both pids: old {o} live, new {n} live"),
        SCREEN_TIMEOUT,
        |s| {
            expect_row(s, old.pid(), None, o)?;
            expect_row(s, new.pid(), Some("serving"), n)
        },
    );

    // The old one stops accepting; only the new one takes connections now.
    old.stopaccept();
    let _c3 = Client::connect(&ns, addr, 3);
    new.wait_accepted(n + 3);
    let screen = tmux.wait("the old server draining", SCREEN_TIMEOUT, |s| {
        expect_row(s, old.pid(), Some("draining"), o)?;
        expect_row(s, new.pid(), Some("serving"), n + 3)
    });
    assert!(
        screen.contains(&format!(
            "pid {} (python3) starts accepting alongside pid {}",
            new.pid(),
            old.pid()
        )),
        "no handover line in the event log:\n{screen}"
    );

    // It drains: part way (a progress bar), then to zero.
    old.close(2);
    tmux.wait("the old server draining, 2 closed", SCREEN_TIMEOUT, |s| {
        expect_row(s, old.pid(), Some("draining"), o - 2)?;
        let (_, _, rest) = row(s, old.pid()).unwrap_or_default();
        rest.contains('%')
            .then_some(())
            .ok_or_else(|| format!("no progress on the old row: {rest}"))
    });
    old.closeall();
    tmux.wait("the old server drained", SCREEN_TIMEOUT, |s| {
        expect_row(s, old.pid(), Some("drained"), 0)?;
        expect_row(s, new.pid(), Some("serving"), n + 3)
    });
    // It lets go of the listener: still drained (alive, holding nothing).
    old.closelistener();
    tmux.wait(
        "the old server let go of the listener",
        SCREEN_TIMEOUT,
        |s| {
            s.contains(&format!(
                "pid {} (python3) let go of listener {addr}",
                old.pid()
            ))
            .then_some(())
            .ok_or_else(|| "no `let go of listener` line".to_owned())?;
            expect_row(s, old.pid(), Some("drained"), 0)
        },
    );

    // Drain it from the TUI: filter to its row, `d`, Enter (SIGTERM, no
    // deadline), `y`. It holds nothing, so the gate signals it at once
    // (through a pidfd) and it exits.
    tmux.keys(&["/"]);
    tmux.tmux(&["send-keys", "-t", "tui", "-l", &old.pid().to_string()]);
    tmux.keys(&["Enter", "d"]);
    tmux.wait("the drain dialog", SCREEN_TIMEOUT, |s| {
        s.contains(&format!("Drain pid {} (python3)", old.pid()))
            .then_some(())
            .ok_or_else(|| "no dialog".to_owned())
    });
    tmux.keys(&["Enter"]);
    tmux.wait("the confirmation", SCREEN_TIMEOUT, |s| {
        s.contains("then send SIGTERM; no deadline.")
            .then_some(())
            .ok_or_else(|| "no question".to_owned())
    });
    tmux.keys(&["y"]);
    tmux.wait("the old server signalled and gone", SCREEN_TIMEOUT, |s| {
        s.contains(&format!("drain: pid {} drained in", old.pid()))
            .then_some(())
            .ok_or_else(|| "no drain result in the log".to_owned())?;
        s.contains("sent SIGTERM")
            .then_some(())
            .ok_or_else(|| "no SIGTERM in the log".to_owned())?;
        match row(s, old.pid()) {
            Some((role, _, _)) if role == "exited" => Ok(()),
            other => Err(format!("old row: {other:?}")),
        }
    });
    tmux.keys(&["Escape"]);

    // `q` gives back the shell as it was.
    tmux.keys(&["q"]);
    tmux.wait("the alternate screen left", SCREEN_TIMEOUT, |_| {
        if tmux.alternate_screen() {
            Err("still on the alternate screen".to_owned())
        } else {
            Ok(())
        }
    });
    tmux.type_line(&format!(
        "echo tui-exit=$?; stty -g | cmp -s - {stty} && echo tty-restored || echo tty-changed"
    ));
    let screen = tmux.wait("the shell answering", SCREEN_TIMEOUT, |s| {
        s.lines()
            .any(|l| matches!(l.trim(), "tty-restored" | "tty-changed"))
            .then_some(())
            .ok_or_else(|| "no answer yet".to_owned())
    });
    assert!(
        screen.lines().any(|l| l.trim() == "tui-exit=0"),
        "gracewatch tui did not exit 0:\n{screen}"
    );
    assert!(
        screen.lines().any(|l| l.trim() == "tty-restored"),
        "tty settings differ after quitting:\n{screen}"
    );
    assert!(
        !screen.contains("Processes"),
        "the TUI left its screen behind:\n{screen}"
    );
    let last = screen
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    assert_eq!(
        last.trim(),
        "gw$",
        "the shell prompt is not back:\n{screen}"
    );
}
