//! Key handling: a pure function from (state, key) to the new state and the
//! [`Effect`]s the loop must carry out. Nothing here touches a process, the
//! monitor or the terminal, so every binding is unit-tested as is.

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::app::{App, ConnSort, Detail, Dialog, DialogKind, Effect, Field, Mode, Pin};

/// The bindings, for the help overlay and the README: (keys, what they do).
pub const BINDINGS: &[(&str, &str)] = &[
    (
        "↑ ↓  j k",
        "select a process (PgUp PgDn g G: page, first, last)",
    ),
    (
        "Enter",
        "its connections, idle, in flight (i: idle sort, b: by peer)",
    ),
    (
        "d",
        "drain it (signal, timeout, until idle, exclude); d: cancel",
    ),
    ("s", "send it a signal now (confirm)"),
    ("/", "filter by pid, command, role or listener (Esc clears)"),
    ("p", "pause / resume the display"),
    ("?", "this help"),
    (
        "q  Esc",
        "quit (Esc first clears a filter or closes a view)",
    ),
];

const PAGE: isize = 10;

/// Applies `key` to `app`; returns what the loop must do.
pub fn handle_key(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    if key.kind == KeyEventKind::Release {
        return Vec::new();
    }
    if key.modifiers.contains(KeyModifiers::CONTROL) && matches!(key.code, KeyCode::Char('c' | 'C'))
    {
        return vec![Effect::Quit];
    }
    app.notice = None;
    match std::mem::replace(&mut app.mode, Mode::Normal) {
        Mode::Normal => normal(app, key),
        Mode::Filter => {
            filter(app, key);
            Vec::new()
        }
        Mode::Help => Vec::new(),
        Mode::Detail => detail(app, key),
        Mode::Dialog(d) => dialog(app, d, key),
        Mode::ConfirmQuit => match key.code {
            KeyCode::Char('y' | 'Y' | 'q') | KeyCode::Enter => vec![Effect::Quit],
            _ => Vec::new(),
        },
    }
}

fn normal(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    match key.code {
        KeyCode::Char('q') => return quit(app),
        KeyCode::Esc if !app.filter.is_empty() => app.filter.clear(),
        KeyCode::Esc => return quit(app),
        KeyCode::Down | KeyCode::Char('j') => app.move_selection(1),
        KeyCode::Up | KeyCode::Char('k') => app.move_selection(-1),
        KeyCode::PageDown => app.move_selection(PAGE),
        KeyCode::PageUp => app.move_selection(-PAGE),
        KeyCode::Home | KeyCode::Char('g') => app.select_edge(false),
        KeyCode::End | KeyCode::Char('G') => app.select_edge(true),
        KeyCode::Char('/') => app.mode = Mode::Filter,
        KeyCode::Char('p') => app.toggle_pause(),
        KeyCode::Char('?') | KeyCode::F(1) => app.mode = Mode::Help,
        KeyCode::Enter => {
            if let Some(p) = app.selected_proc() {
                let (pid, comm) = (p.pid, p.comm.clone());
                app.selected = Some(pid);
                app.detail = Some(Detail {
                    pid,
                    comm,
                    rows: None,
                    error: None,
                    scroll: 0,
                    sort: ConnSort::Age,
                    by_peer: false,
                    peers: None,
                });
                app.mode = Mode::Detail;
                return vec![Effect::FetchConnections(pid)];
            }
            app.notice = Some("no process selected".to_owned());
        }
        KeyCode::Char('d') => {
            let pid = app.selected_proc().map(|p| p.pid);
            if let Some(pid) = pid.filter(|&pid| app.drain_running(pid)) {
                if let Some(p) = app.selected_proc() {
                    let d = Dialog::new(DialogKind::CancelDrain, p);
                    app.selected = Some(pid);
                    app.mode = Mode::Dialog(d);
                }
                return Vec::new();
            }
            return open_dialog(app, DialogKind::Drain);
        }
        KeyCode::Char('s') => return open_dialog(app, DialogKind::Signal),
        _ => {}
    }
    Vec::new()
}

fn quit(app: &mut App) -> Vec<Effect> {
    if app.running_drains.is_empty() {
        vec![Effect::Quit]
    } else {
        app.mode = Mode::ConfirmQuit;
        Vec::new()
    }
}

fn open_dialog(app: &mut App, kind: DialogKind) -> Vec<Effect> {
    match app.actionable() {
        Ok(p) => {
            let d = Dialog::new(kind, p);
            let pid = d.pid;
            app.selected = Some(pid);
            app.mode = Mode::Dialog(d);
            vec![Effect::Pin(pid)]
        }
        Err(why) => {
            app.notice = Some(why);
            Vec::new()
        }
    }
}

fn filter(app: &mut App, key: KeyEvent) {
    match key.code {
        KeyCode::Enter => return,
        KeyCode::Esc => {
            app.filter.clear();
            return;
        }
        KeyCode::Backspace => {
            app.filter.pop();
        }
        KeyCode::Down => app.move_selection(1),
        KeyCode::Up => app.move_selection(-1),
        KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => app.filter.push(c),
        _ => {}
    }
    app.mode = Mode::Filter;
}

fn detail(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    match key.code {
        KeyCode::Esc | KeyCode::Char('q') | KeyCode::Enter | KeyCode::Backspace => {
            app.detail = None;
            return Vec::new();
        }
        KeyCode::Down | KeyCode::Char('j') => scroll(app, 1),
        KeyCode::Up | KeyCode::Char('k') => scroll(app, -1),
        KeyCode::PageDown => scroll(app, PAGE),
        KeyCode::PageUp => scroll(app, -PAGE),
        KeyCode::Home | KeyCode::Char('g') => scroll(app, isize::MIN / 2),
        KeyCode::Char('p') => app.toggle_pause(),
        KeyCode::Char('i') => {
            if let Some(d) = app.detail.as_mut() {
                d.sort = match d.sort {
                    ConnSort::Age => ConnSort::Idle,
                    ConnSort::Idle => ConnSort::Age,
                };
                d.scroll = 0;
            }
        }
        KeyCode::Char('b') => {
            if let Some(d) = app.detail.as_mut() {
                d.by_peer = !d.by_peer;
                d.scroll = 0;
                app.mode = Mode::Detail;
                // Load the other view now rather than at the next refresh.
                return vec![Effect::FetchConnections(d.pid)];
            }
        }
        _ => {}
    }
    app.mode = Mode::Detail;
    Vec::new()
}

fn scroll(app: &mut App, by: isize) {
    if let Some(d) = app.detail.as_mut() {
        let max = if d.by_peer {
            d.peers.as_ref().map_or(0, |p| p.len().saturating_sub(1))
        } else {
            d.rows.as_ref().map_or(0, |r| r.len().saturating_sub(1))
        };
        d.scroll = (d.scroll as isize + by).clamp(0, max as isize) as usize;
    }
}

fn dialog(app: &mut App, mut d: Dialog, key: KeyEvent) -> Vec<Effect> {
    if d.confirming {
        return match key.code {
            KeyCode::Char('y' | 'Y') | KeyCode::Enter => confirm(app, d),
            KeyCode::Char('n' | 'N') | KeyCode::Esc if d.kind == DialogKind::CancelDrain => {
                Vec::new()
            }
            KeyCode::Char('n' | 'N') | KeyCode::Esc => {
                // Back to the fields: the answer was "not like this".
                d.confirming = false;
                app.mode = Mode::Dialog(d);
                Vec::new()
            }
            _ => {
                app.mode = Mode::Dialog(d);
                Vec::new()
            }
        };
    }
    match key.code {
        KeyCode::Esc => return vec![Effect::Unpin],
        KeyCode::Tab | KeyCode::BackTab | KeyCode::Down | KeyCode::Up
            if d.kind == DialogKind::Drain =>
        {
            let at = Field::DRAIN.iter().position(|f| *f == d.focus).unwrap_or(0);
            let n = Field::DRAIN.len();
            let back = matches!(key.code, KeyCode::BackTab | KeyCode::Up);
            d.focus = Field::DRAIN[if back { (at + n - 1) % n } else { (at + 1) % n }];
        }
        KeyCode::Backspace => {
            field(&mut d).pop();
            d.error = None;
        }
        KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => {
            field(&mut d).push(c);
            d.error = None;
        }
        KeyCode::Enter => {
            let valid = match d.kind {
                DialogKind::Drain => d.drain_spec().map(|_| ()),
                DialogKind::Signal => d.signal_spec().map(|_| ()),
                DialogKind::CancelDrain => Ok(()),
            };
            match (valid, &d.pin) {
                (Err(e), _) => d.error = Some(e),
                (Ok(()), Pin::Failed(e)) => d.error = Some(e.clone()),
                (Ok(()), Pin::Pending) => d.error = Some("still pinning the process…".to_owned()),
                (Ok(()), Pin::Ready) => d.confirming = true,
            }
        }
        _ => {}
    }
    app.mode = Mode::Dialog(d);
    Vec::new()
}

fn field(d: &mut Dialog) -> &mut String {
    match d.focus {
        Field::Signal => &mut d.signal,
        Field::Timeout => &mut d.timeout,
        Field::UntilIdle => &mut d.until_idle,
        Field::ExcludePeers => &mut d.exclude_peers,
    }
}

fn confirm(app: &mut App, d: Dialog) -> Vec<Effect> {
    match d.kind {
        DialogKind::Drain => match d.drain_spec() {
            Ok(spec) => {
                app.running_drains.push(d.pid);
                vec![Effect::StartDrain { pid: d.pid, spec }]
            }
            Err(e) => {
                app.notice = Some(e);
                vec![Effect::Unpin]
            }
        },
        DialogKind::Signal => match d.signal_spec() {
            Ok(signal) => vec![Effect::Signal { pid: d.pid, signal }],
            Err(e) => {
                app.notice = Some(e);
                vec![Effect::Unpin]
            }
        },
        DialogKind::CancelDrain => vec![Effect::CancelDrain(d.pid)],
    }
}
