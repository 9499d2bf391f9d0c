//! Human output for `status` and `watch`: pure functions of [`Status`].

use std::fmt::Write as _;

use super::FilterArgs;
use crate::{
    display::terminal_safe,
    tracker::{ProcessStatus, Status},
};

/// The `gracewatch status` table, or a sentence saying why it is empty.
pub fn table(status: &Status, filter: &FilterArgs) -> String {
    let mut out = String::new();
    if status.processes.is_empty() && status.listeners.is_empty() {
        let why = match (filter.pids.is_empty(), filter.ports.is_empty()) {
            (true, true) => "no process holds a listening TCP socket".to_owned(),
            (false, _) => format!(
                "no listening socket or live inbound connection held by pid {}",
                join(&filter.pids)
            ),
            (true, false) => format!("no listening TCP socket on port {}", join(&filter.ports)),
        };
        let _ = writeln!(out, "{why}");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<8} {:<16} {:>6}  LISTENERS",
        "PID", "COMMAND", "LIVE"
    );
    for p in &status.processes {
        let _ = writeln!(
            out,
            "{:<8} {:<16} {:>6}  {}",
            p.pid,
            terminal_safe(&p.comm),
            p.live,
            list_or_dash(&p.listeners)
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<28} {:<11} {:>6} {:>8}  HOLDERS (live)",
        "LISTENER", "NETNS", "QUEUE", "DROPPED"
    );
    for l in &status.listeners {
        let holders: Vec<String> = l
            .holders
            .iter()
            .map(|h| format!("{} {} ({})", h.pid, terminal_safe(&h.comm), h.live))
            .collect();
        let _ = writeln!(
            out,
            "{:<28} {:<11} {:>6} {:>8}  {}",
            l.address,
            l.netns,
            l.accept_queue,
            l.queue_drops_total,
            list_or_dash(&holders)
        );
    }
    if status.lost_events > 0 {
        let _ = writeln!(
            out,
            "\nwarning: {} kernel events were lost (ring buffer full); counts are repaired by the next rescan",
            status.lost_events
        );
    }
    if status.map_full_total > 0 {
        let _ = writeln!(
            out,
            "\nwarning: the kernel's connection table was full {} time(s) (raise --max-connections); counts are repaired by the next rescan",
            status.map_full_total
        );
    }
    out
}

/// Whether two statuses differ in anything but the passage of time.
pub fn differs(a: &Status, b: &Status) -> bool {
    let strip = |s: &Status| {
        let mut s = s.clone();
        s.uptime_ms = 0;
        for p in &mut s.processes {
            p.oldest_live_ms = None;
        }
        s
    };
    strip(a) != strip(b)
}

/// One line per change between two statuses (`watch` without `--json`).
pub fn changes(prev: Option<&Status>, cur: &Status) -> String {
    let mut out = String::new();
    let t = format!("{:>8.1}s", cur.uptime_ms as f64 / 1000.0);
    let find = |s: &Status, pid: u32| -> Option<ProcessStatus> {
        s.processes.iter().find(|p| p.pid == pid).cloned()
    };
    for p in &cur.processes {
        match prev.and_then(|s| find(s, p.pid)) {
            None => {
                let _ = writeln!(
                    out,
                    "{t} pid {} ({}) live {}  listeners: {}",
                    p.pid,
                    terminal_safe(&p.comm),
                    p.live,
                    list_or_dash(&p.listeners)
                );
            }
            Some(old) if old.live != p.live || old.listeners != p.listeners => {
                let _ = writeln!(
                    out,
                    "{t} pid {} ({}) live {} → {}",
                    p.pid,
                    terminal_safe(&p.comm),
                    old.live,
                    p.live
                );
                if old.listeners != p.listeners {
                    let _ = writeln!(
                        out,
                        "{t} pid {} ({}) listeners: {}",
                        p.pid,
                        terminal_safe(&p.comm),
                        list_or_dash(&p.listeners)
                    );
                }
            }
            Some(_) => {}
        }
        if let Some(old) = prev.and_then(|s| find(s, p.pid))
            && old.role != p.role
        {
            let _ = writeln!(
                out,
                "{t} pid {} ({}) {} → {}",
                p.pid,
                terminal_safe(&p.comm),
                old.role.name(),
                p.role.name()
            );
        }
    }
    if let Some(prev) = prev {
        for p in &prev.processes {
            if find(cur, p.pid).is_none() {
                let _ = writeln!(
                    out,
                    "{t} pid {} ({}) gone (held {} live)",
                    p.pid,
                    terminal_safe(&p.comm),
                    p.live
                );
            }
        }
        if prev.lost_events != cur.lost_events {
            let _ = writeln!(
                out,
                "{t} warning: {} kernel events lost so far",
                cur.lost_events
            );
        }
    }
    if prev.is_none() && cur.processes.is_empty() {
        let _ = writeln!(
            out,
            "{t} no process holds a listening TCP socket yet; watching"
        );
    }
    out
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `a, b, c`, or `-` for an empty list.
fn list_or_dash<T: ToString>(items: &[T]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items
            .iter()
            .map(T::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::{Family, HolderStatus, ListenerStatus, restart::Role};

    /// A status whose one process calls itself `name`.
    fn named(name: &str, live: u64) -> Status {
        Status {
            processes: vec![ProcessStatus {
                pid: 42,
                comm: name.to_owned(),
                live,
                listeners: vec![([127, 0, 0, 1], 80).into()],
                ..ProcessStatus::default()
            }],
            listeners: vec![ListenerStatus {
                netns: 0,
                address: ([127, 0, 0, 1], 80).into(),
                family: Family::Ipv4,
                holders: vec![HolderStatus {
                    pid: 42,
                    comm: name.to_owned(),
                    live,
                }],
                accept_queue: 0,
                accepted_total: 0,
                queue_drops_total: 0,
                generations: Vec::new(),
            }],
            ..Status::default()
        }
    }

    #[test]
    fn names_reach_the_terminal_escaped() {
        let evil = "ev\x1b]0;pwn\x07\r\x1b[2K";
        let shown = r"ev\x1b]0;pwn\x07\r\x1b[2K";
        let table = table(&named(evil, 1), &FilterArgs::default());
        let new = changes(None, &named(evil, 1));
        let moved = changes(Some(&named(evil, 1)), &named(evil, 0));
        let gone = changes(Some(&named(evil, 0)), &Status::default());
        for out in [&table, &new, &moved, &gone] {
            assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
            assert!(out.contains(shown), "{out}");
        }
        // The listener table names the holder too.
        assert_eq!(table.matches(shown).count(), 2, "{table}");
    }

    #[test]
    fn a_role_change_is_a_change_and_says_so() {
        let serving = named("nginx", 2);
        let mut draining = serving.clone();
        draining.processes[0].role = Role::Draining;
        draining.processes[0].role_since_ms = 1500;
        draining.uptime_ms = 1500;
        assert!(differs(&serving, &draining));
        assert_eq!(
            changes(Some(&serving), &draining),
            "     1.5s pid 42 (nginx) serving → draining\n"
        );
        // The same role later is no change.
        let mut later = draining.clone();
        later.uptime_ms = 9000;
        assert!(!differs(&draining, &later));
    }
}
