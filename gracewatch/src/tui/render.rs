//! Rendering: a pure function of [`App`] onto a ratatui [`Frame`]. No clock
//! is read here (ages use `App::now`), so the same state always draws the
//! same screen, which the snapshot tests rely on.
//!
//! The layout adapts to the terminal: header, process table, listeners and
//! chart side by side, event log, footer. Below 80x20 the chart goes and
//! columns drop out of the table; 60x15 still shows every process.

use ratatui::{
    Frame,
    layout::{Alignment, Constraint, Layout, Rect},
    style::{Color, Modifier, Style, Stylize},
    symbols,
    text::{Line, Span, Text},
    widgets::{
        Axis, Block, BorderType, Borders, Cell, Chart, Clear, Dataset, GraphType, HighlightSpacing,
        Padding, Paragraph, Row, Table, TableState, Wrap,
    },
};

use super::{
    app::{App, ConnSort, DialogKind, Field, Mode, Pin},
    keys::BINDINGS,
    model::{CHART_SPAN, LogKind, Model, Proc, Role, human},
};
use crate::{
    display::terminal_safe,
    event::ConnActivity,
    event::{TCP_CLOSE_WAIT, TCP_ESTABLISHED},
    tracker::Family,
};

const PALETTE: [Color; 8] = [
    Color::Cyan,
    Color::Yellow,
    Color::Magenta,
    Color::Green,
    Color::LightBlue,
    Color::LightRed,
    Color::LightCyan,
    Color::LightYellow,
];
const DIM: Style = Style::new().fg(Color::DarkGray);

pub fn render(frame: &mut Frame, app: &App) {
    let area = frame.area();
    let [header, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(area);
    render_header(frame, header, app);
    if app.mode == Mode::Detail {
        render_detail(frame, body, app);
    } else {
        render_main(frame, body, app);
    }
    render_footer(frame, footer, app);
    match &app.mode {
        Mode::Help => render_help(frame, body),
        Mode::Dialog(_) => render_dialog(frame, body, app),
        Mode::ConfirmQuit => render_confirm_quit(frame, body, app),
        Mode::Normal | Mode::Filter | Mode::Detail => {}
    }
}

fn color_of(model: &Model, pid: u32) -> Color {
    let i = model.procs.keys().position(|&p| p == pid).unwrap_or(0);
    PALETTE[i % PALETTE.len()]
}

fn role_style(role: Role) -> Style {
    match role {
        Role::Serving => Style::new().fg(Color::Cyan),
        Role::Draining => Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        Role::Drained => Style::new().fg(Color::Green),
        Role::Exited => DIM,
    }
}

fn render_header(frame: &mut Frame, area: Rect, app: &App) {
    let (model, now) = app.view();
    let shown = model.procs.values().filter(|p| p.present()).count();
    let mut spans = vec![
        Span::styled(" gracewatch ", Style::new().bold().reversed()),
        Span::raw(if area.width >= 80 {
            format!(
                " {shown} proc · {} listener{} · {} live",
                model.listeners.len(),
                if model.listeners.len() == 1 { "" } else { "s" },
                model.total_live()
            )
        } else {
            format!(" {shown} proc · {} live", model.total_live())
        }),
    ];
    if model.lost_events > 0 {
        spans.push(Span::styled(
            format!(" · lost {}", model.lost_events),
            Style::new().fg(Color::Red).bold(),
        ));
    }
    if model.map_full > 0 {
        spans.push(Span::styled(
            " · table full",
            Style::new().fg(Color::Red).bold(),
        ));
    }
    let f = &model.filter;
    if !f.is_empty() {
        let mut parts = Vec::new();
        parts.extend(f.pids.iter().map(|p| format!("pid {p}")));
        parts.extend(f.ports.iter().map(|p| format!("port {p}")));
        parts.extend(f.comms.iter().map(|c| format!("comm {}", terminal_safe(c))));
        spans.push(Span::styled(format!(" · {}", parts.join(", ")), DIM));
    }
    if app.paused() {
        spans.push(Span::styled(
            " PAUSED ",
            Style::new().fg(Color::Black).bg(Color::Yellow).bold(),
        ));
    }
    let up = now.saturating_sub(model.started).as_secs();
    let clock = format!("up {:02}:{:02} ", up / 60, up % 60);
    let [left, right] =
        Layout::horizontal([Constraint::Min(0), Constraint::Length(clock.len() as u16)])
            .areas(area);
    frame.render_widget(Line::from(spans), left);
    frame.render_widget(Line::styled(clock, DIM).alignment(Alignment::Right), right);
}

fn panel(title: &str) -> Block<'_> {
    Block::new()
        .borders(Borders::ALL)
        .border_type(BorderType::Rounded)
        .border_style(DIM)
        .title(Span::styled(format!(" {title} "), Style::new().bold()))
}

fn render_main(frame: &mut Frame, body: Rect, app: &App) {
    let compact = body.height < 18 || body.width < 70;
    let rows = app.rows().len() as u16;
    if compact {
        let listeners = app.view().0.listeners.len() as u16;
        let listen_h = (listeners.max(1) + 3).min(4);
        // Every process first: the log gets what is left, at least 3 lines.
        let table_h = (rows.max(1) + 3)
            .min(body.height.saturating_sub(listen_h + 3))
            .max(4);
        let [t, l, g] = Layout::vertical([
            Constraint::Length(table_h),
            Constraint::Length(listen_h),
            Constraint::Min(3),
        ])
        .areas(body);
        render_table(frame, t, app);
        render_listeners(frame, l, app);
        render_log(frame, g, app);
        return;
    }
    let table_h = (rows.max(1) + 3).clamp(4, (body.height * 45 / 100).max(4));
    let [t, mid, g] = Layout::vertical([
        Constraint::Length(table_h),
        Constraint::Percentage(45),
        Constraint::Min(4),
    ])
    .areas(body);
    render_table(frame, t, app);
    // Narrower terminals give the listeners more: their holders must fit.
    let listen_pct = if body.width < 110 { 60 } else { 48 };
    let [l, c] = Layout::horizontal([
        Constraint::Percentage(listen_pct),
        Constraint::Percentage(100 - listen_pct),
    ])
    .areas(mid);
    render_listeners(frame, l, app);
    render_chart(frame, c, app);
    render_log(frame, g, app);
}

/// A column of the process table.
struct Col {
    title: &'static str,
    width: u16,
    right: bool,
}

/// The table's columns for a terminal `width` wide: the rates go below 78
/// columns, the age below 56; the progress column takes what is left.
fn columns(width: u16) -> Vec<Col> {
    let col = |title, width, right| Col {
        title,
        width,
        right,
    };
    let command = match width {
        100.. => 15,
        78.. => 12,
        _ => 10,
    };
    let mut cols = vec![
        col("PID", 7, false),
        col("COMMAND", command, false),
        col("ROLE", 8, false),
        col("LIVE", 5, true),
    ];
    if width >= 78 {
        cols.extend([col("ACC/s", 5, true), col("CLO/s", 5, true)]);
    }
    if width >= 56 {
        cols.push(col("OLDEST", 7, true));
    }
    let inner = width.saturating_sub(2 + 2); // borders, highlight symbol
    let fixed: u16 = cols.iter().map(|c| c.width + 1).sum();
    cols.push(col("PROGRESS", inner.saturating_sub(fixed), false));
    cols
}

fn render_table(frame: &mut Frame, area: Rect, app: &App) {
    let (model, now) = app.view();
    let block = panel("Processes");
    let cols = columns(area.width);
    let widths: Vec<u16> = cols.iter().map(|c| c.width).collect();
    let progress_w = widths.last().copied().unwrap_or(0);
    let rows = app.rows();
    if rows.is_empty() {
        let msg = if model.procs.is_empty() {
            if model.filter.is_empty() {
                "no process holds a listening TCP socket (yet)".to_owned()
            } else {
                "no process matches the startup filter (yet)".to_owned()
            }
        } else {
            format!("nothing matches the filter /{}", app.filter)
        };
        frame.render_widget(
            Paragraph::new(Line::styled(msg, DIM).alignment(Alignment::Center))
                .block(block)
                .wrap(Wrap { trim: true }),
            area,
        );
        return;
    }
    let header = Row::new(cols.iter().map(|c| {
        let cell = Line::from(c.title);
        Cell::from(if c.right {
            cell.alignment(Alignment::Right)
        } else {
            cell
        })
    }))
    .style(Style::new().bold().fg(Color::Gray));
    let body = rows.iter().map(|p| {
        let cells = cols.iter().map(|c| {
            let text: Line = match c.title {
                "PID" => Line::from(p.pid.to_string()),
                "COMMAND" => Line::from(terminal_safe(&p.comm).into_owned()),
                "ROLE" => Line::styled(p.role().name(), role_style(p.role())),
                "LIVE" => Line::from(if p.present() || p.role() == Role::Drained {
                    p.live().to_string()
                } else {
                    "-".to_owned()
                }),
                "ACC/s" | "CLO/s" => {
                    let (acc, clo) = p.rates(now);
                    let v = if c.title == "ACC/s" { acc } else { clo };
                    Line::from(if p.present() { rate(v) } else { "-".to_owned() })
                }
                "OLDEST" => Line::from(
                    p.oldest_age(model.status_at, now)
                        .map_or_else(|| "-".to_owned(), human),
                ),
                _ => progress_line(p, now, progress_w as usize),
            };
            Cell::from(if c.right {
                text.alignment(Alignment::Right)
            } else {
                text
            })
        });
        let row = Row::new(cells);
        if p.role() == Role::Exited {
            row.style(DIM)
        } else {
            row
        }
    });
    let constraints = widths.iter().map(|&w| Constraint::Length(w));
    let table = Table::new(body, constraints)
        .header(header)
        .block(block)
        .column_spacing(1)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("▶ ")
        .highlight_spacing(HighlightSpacing::Always);
    let mut state = TableState::default().with_selected(app.selected_index());
    frame.render_stateful_widget(table, area, &mut state);
}

fn rate(v: f64) -> String {
    if v <= 0.0 {
        "0".to_owned()
    } else if v < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// Progress bar and ETA for a draining process; for the others, a word on
/// what they are doing.
fn progress_line(p: &Proc, now: std::time::Duration, width: usize) -> Line<'static> {
    match p.role() {
        Role::Draining => {
            let Some((done, eta)) = p.drain_progress(now) else {
                return Line::from(terminal_safe(p.restart.why.text()).into_owned());
            };
            let pct = format!(" {:>3.0}%", done * 100.0);
            let eta = match eta {
                Some(t) => format!(" ~{}", human(t)),
                None => " ~?".to_owned(),
            };
            let bar_w = width.saturating_sub(pct.len() + eta.len()).min(24);
            let filled = ((done * bar_w as f64).round() as usize).min(bar_w);
            Line::from(vec![
                Span::styled("█".repeat(filled), Style::new().fg(Color::Yellow)),
                Span::styled("░".repeat(bar_w - filled), DIM),
                Span::raw(pct),
                Span::styled(eta, DIM),
            ])
        }
        Role::Drained => {
            let text = match p.restart.drain.as_ref().and_then(|d| Some((d, d.done_at?))) {
                Some((d, at)) => format!(
                    "0 live after {} (from {})",
                    human(at.saturating_sub(d.since)),
                    d.from_live
                ),
                None => terminal_safe(p.restart.why.text()).into_owned(),
            };
            Line::styled(text, Style::new().fg(Color::Green))
        }
        Role::Exited => Line::from(format!(
            "exited {} ago",
            human(now.saturating_sub(p.restart.gone_at.unwrap_or(now)))
        )),
        Role::Serving => Line::styled(
            p.listeners
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" "),
            DIM,
        ),
    }
}

fn render_listeners(frame: &mut Frame, area: Rect, app: &App) {
    let (model, _) = app.view();
    let block = panel("Listeners");
    if model.listeners.is_empty() {
        frame.render_widget(
            Paragraph::new(Line::styled("no listener", DIM)).block(block),
            area,
        );
        return;
    }
    let many_ns = model
        .listeners
        .iter()
        .any(|l| l.netns != model.listeners[0].netns);
    let addr_w = model
        .listeners
        .iter()
        .map(|l| l.address.to_string().len())
        .max()
        .unwrap_or(0)
        .clamp(9, 28) as u16;
    let mut header = vec![Cell::from("ADDRESS")];
    let mut widths = vec![Constraint::Length(addr_w)];
    if many_ns {
        header.push(Cell::from("NETNS"));
        widths.push(Constraint::Length(10));
    }
    header.extend([
        Cell::from(Line::from("QUEUE").alignment(Alignment::Right)),
        Cell::from(Line::from("RESET").alignment(Alignment::Right)),
        Cell::from("HOLDERS (live)"),
    ]);
    widths.extend([
        Constraint::Length(5),
        Constraint::Length(5),
        Constraint::Min(8),
    ]);
    let rows = model.listeners.iter().map(|l| {
        let fam = if l.family == Family::Ipv6 { " v6" } else { "" };
        let mut cells = vec![Cell::from(format!("{}{fam}", l.address))];
        if many_ns {
            cells.push(Cell::from(l.netns.to_string()));
        }
        let holders: Vec<Span> = l
            .holders
            .iter()
            .flat_map(|h| {
                [
                    Span::styled(
                        format!("{} ({})", h.pid, h.live),
                        Style::new().fg(color_of(model, h.pid)),
                    ),
                    Span::raw(" "),
                ]
            })
            .collect();
        cells.extend([
            Cell::from(Line::from(l.accept_queue.to_string()).alignment(Alignment::Right)),
            Cell::from(
                Line::from(l.queue_drops_total.to_string())
                    .alignment(Alignment::Right)
                    .style(if l.queue_drops_total > 0 {
                        Style::new().fg(Color::Red)
                    } else {
                        Style::new()
                    }),
            ),
            Cell::from(Line::from(holders)),
        ]);
        Row::new(cells)
    });
    let table = Table::new(rows, widths)
        .header(Row::new(header).style(Style::new().bold().fg(Color::Gray)))
        .block(block)
        .column_spacing(1);
    frame.render_widget(table, area);
}

fn render_chart(frame: &mut Frame, area: Rect, app: &App) {
    let (model, now) = app.view();
    let now_sec = now.saturating_sub(model.started).as_secs();
    let span = now_sec.clamp(60, CHART_SPAN.as_secs());
    let series: Vec<(&Proc, Vec<(f64, f64)>)> = model
        .procs
        .values()
        .filter(|p| !p.history.is_empty())
        .map(|p| {
            let points = p
                .history
                .iter()
                .map(|&(s, live)| (s as f64 - now_sec as f64, live as f64))
                .collect();
            (p, points)
        })
        .collect();
    let max = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|&(_, y)| y))
        .fold(1.0_f64, f64::max);
    let top = (max * 1.1).ceil();
    let datasets = series
        .iter()
        .map(|(p, pts)| {
            Dataset::default()
                .name(format!("{} {}", p.pid, terminal_safe(&p.comm)))
                .marker(symbols::Marker::Braille)
                .graph_type(GraphType::Line)
                .style(if p.role() == Role::Exited {
                    DIM
                } else {
                    Style::new().fg(color_of(model, p.pid))
                })
                .data(pts)
        })
        .collect();
    let span_label = if span >= 60 {
        format!("-{}m", span / 60)
    } else {
        format!("-{span}s")
    };
    let name = if area.width < 50 {
        " Live "
    } else {
        " Live connections "
    };
    let mut title = vec![Span::styled(name, Style::new().bold())];
    for (p, _) in &series {
        let style = if p.role() == Role::Exited {
            DIM
        } else {
            Style::new().fg(color_of(model, p.pid))
        };
        title.push(Span::styled(format!("━ {} ", p.pid), style));
    }
    let block = Block::new()
        .borders(Borders::ALL)
        .border_type(BorderType::Rounded)
        .border_style(DIM)
        .title(Line::from(title));
    let chart = Chart::new(datasets)
        .block(block)
        .x_axis(
            Axis::default()
                .bounds([-(span as f64), 0.0])
                .labels([Span::styled(span_label, DIM), Span::styled("now", DIM)])
                .style(DIM),
        )
        .y_axis(
            Axis::default()
                .bounds([0.0, top])
                .labels([
                    Span::styled("0", DIM),
                    Span::styled(format!("{top:.0}"), DIM),
                ])
                .style(DIM),
        )
        .legend_position(None);
    frame.render_widget(chart, area);
}

fn log_tag(kind: LogKind) -> (&'static str, Style) {
    match kind {
        LogKind::Listener => ("listen", Style::new().fg(Color::Cyan)),
        LogKind::Handover => ("handover", Style::new().fg(Color::Magenta).bold()),
        LogKind::Role => ("role", Style::new().fg(Color::Yellow)),
        LogKind::Exit => ("exit", Style::new().fg(Color::Gray)),
        LogKind::Signal => ("signal", Style::new().fg(Color::LightRed).bold()),
        LogKind::Drain => ("drain", Style::new().fg(Color::Green)),
        LogKind::Warning => ("warning", Style::new().fg(Color::Red).bold()),
    }
}

fn render_log(frame: &mut Frame, area: Rect, app: &App) {
    let (model, _) = app.view();
    let height = area.height.saturating_sub(2) as usize;
    let narrow = area.width < 70;
    let lines: Vec<Line> = model
        .log
        .iter()
        .skip(model.log.len().saturating_sub(height))
        .map(|e| {
            let t = e.at.saturating_sub(model.started).as_secs();
            let (tag, style) = log_tag(e.kind);
            let mut spans = vec![Span::styled(format!("{:02}:{:02} ", t / 60, t % 60), DIM)];
            if !narrow {
                spans.push(Span::styled(format!("{tag:<8} "), style));
            }
            spans.push(Span::raw(terminal_safe(&e.text).into_owned()));
            Line::from(spans)
        })
        .collect();
    let body = if lines.is_empty() {
        Text::from(Line::styled(
            "listeners opening and closing, handovers, exits and signals appear here",
            DIM,
        ))
    } else {
        Text::from(lines)
    };
    frame.render_widget(Paragraph::new(body).block(panel("Events")), area);
}

fn render_footer(frame: &mut Frame, area: Rect, app: &App) {
    let key = |k: &'static str| Span::styled(k, Style::new().fg(Color::Black).bg(Color::Gray));
    let line = if let Some(n) = &app.notice {
        Line::styled(format!(" {n}"), Style::new().fg(Color::Yellow))
    } else {
        match app.mode {
            Mode::Filter => Line::from(vec![
                Span::styled(" / ", Style::new().bold()),
                Span::raw(app.filter.clone()),
                Span::styled("█", Style::new().fg(Color::Gray)),
                Span::styled("   Enter keep · Esc clear", DIM),
            ]),
            Mode::Detail => Line::from(vec![
                key(" Esc "),
                Span::raw(" back  "),
                key(" ↑↓ "),
                Span::raw(" scroll  "),
                key(" i "),
                Span::raw(" sort by idle/age  "),
                key(" b "),
                Span::raw(" by peer  "),
                key(" p "),
                Span::raw(" pause"),
            ]),
            _ => {
                let mut spans = vec![
                    key(" ↑↓ "),
                    Span::raw(" select "),
                    key(" ⏎ "),
                    Span::raw(" conns "),
                    key(" d "),
                    Span::raw(" drain "),
                    key(" s "),
                    Span::raw(" signal "),
                    key(" / "),
                    Span::raw(" filter "),
                    key(" p "),
                    Span::raw(" pause "),
                    key(" ? "),
                    Span::raw(" help "),
                    key(" q "),
                    Span::raw(" quit"),
                ];
                if !app.filter.is_empty() {
                    spans.insert(
                        0,
                        Span::styled(format!(" /{} ", app.filter), Style::new().bold()),
                    );
                }
                Line::from(spans)
            }
        }
    };
    frame.render_widget(line, area);
}

/// What is in flight, in a few columns: the largest of unread, unacked
/// and unsent bytes, `+` if there is more than one kind (the CLI's
/// `connections` has them all).
fn in_flight_short(a: &ConnActivity) -> String {
    let bytes = |n: u64| match n {
        0..1024 => format!("{n}B"),
        1024..1_048_576 => format!("{:.0}K", n as f64 / 1024.0),
        _ => format!("{:.1}M", n as f64 / 1_048_576.0),
    };
    let (Some(unacked), Some(unsent)) = (a.unacked_bytes, a.unsent_bytes) else {
        // An older kernel: the send queue is not broken down.
        return if a.unread_bytes > 0 {
            format!("{} unread+", bytes(a.unread_bytes))
        } else {
            "sending".to_owned()
        };
    };
    let mut kinds: Vec<(u64, &str)> = [
        (a.unread_bytes, "unread"),
        (unacked, "unacked"),
        (unsent, "unsent"),
    ]
    .into_iter()
    .filter(|k| k.0 > 0)
    .collect();
    kinds.sort_by_key(|k| std::cmp::Reverse(k.0));
    match kinds.as_slice() {
        [] => "-".to_owned(),
        [(n, what)] => format!("{} {what}", bytes(*n)),
        [(n, what), ..] => format!("{} {what}+", bytes(*n)),
    }
}

fn render_detail(frame: &mut Frame, area: Rect, app: &App) {
    let (model, now) = app.view();
    let Some(d) = &app.detail else {
        return;
    };
    if d.by_peer {
        render_peers(frame, area, app);
        return;
    }
    let role = model.procs.get(&d.pid).map_or("gone", |p| p.role().name());
    let count = d.rows.as_ref().map_or(0, Vec::len);
    let order = match d.sort {
        ConnSort::Age => "oldest first",
        ConnSort::Idle => "most idle first",
    };
    let title = format!(
        "pid {} ({}) · {role} · {count} live connection{}, {order} (i: sort by {})",
        d.pid,
        terminal_safe(&d.comm),
        if count == 1 { "" } else { "s" },
        if d.sort == ConnSort::Age {
            "idle"
        } else {
            "age"
        },
    );
    let block = panel(&title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let place = model.procs.get(&d.pid).and_then(place_line);
    let [place_area, area] = Layout::vertical([
        Constraint::Length(u16::from(place.is_some())),
        Constraint::Min(0),
    ])
    .areas(inner);
    if let Some(place) = place {
        frame.render_widget(place, place_area);
    }
    let message = match (&d.rows, &d.error) {
        (_, Some(e)) => Some(Line::styled(
            format!("cannot list connections: {}", terminal_safe(e)),
            Style::new().fg(Color::Red),
        )),
        (None, None) => Some(Line::styled("loading…", DIM)),
        (Some(rows), None) if rows.is_empty() => Some(Line::styled("no live connection", DIM)),
        _ => None,
    };
    if let Some(message) = message {
        frame.render_widget(Paragraph::new(message), area);
        return;
    }
    let rows = d.sorted_rows();
    let narrow = area.width < 70;
    let addr_w = if narrow { 21 } else { 26 };
    let header = Row::new([
        Cell::from("LOCAL"),
        Cell::from("PEER"),
        Cell::from("STATE"),
        Cell::from(Line::from("AGE").alignment(Alignment::Right)),
        Cell::from(Line::from("IDLE").alignment(Alignment::Right)),
        Cell::from("IN FLIGHT"),
    ])
    .style(Style::new().bold().fg(Color::Gray));
    let body = rows.iter().skip(d.scroll).map(|c| {
        let (idle, flight) = match &c.activity {
            Some(a) => (
                a.idle_ms.map_or_else(
                    || Span::styled("?", DIM),
                    |ms| Span::raw(human(std::time::Duration::from_millis(ms))),
                ),
                if a.in_flight {
                    Span::styled(in_flight_short(a), Style::new().fg(Color::Yellow))
                } else {
                    Span::styled("-", DIM)
                },
            ),
            None => (Span::styled("?", DIM), Span::styled("?", DIM)),
        };
        let state = match c.state {
            Some(TCP_ESTABLISHED) => Span::raw(if narrow { "ESTAB" } else { "ESTABLISHED" }),
            Some(TCP_CLOSE_WAIT) => Span::styled("CLOSE_WAIT", Style::new().fg(Color::Yellow)),
            Some(n) => Span::raw(format!("state {n}")),
            None => Span::styled("?", DIM),
        };
        let age = human(now.saturating_sub(c.since));
        let age = if c.preexisting {
            format!("≥{age}")
        } else {
            age
        };
        Row::new([
            Cell::from(c.local.to_string()),
            Cell::from(c.peer.to_string()),
            Cell::from(Line::from(state)),
            Cell::from(Line::from(age).alignment(Alignment::Right)),
            Cell::from(Line::from(idle).alignment(Alignment::Right)),
            Cell::from(Line::from(flight)),
        ])
    });
    let widths = if narrow {
        [
            Constraint::Length(0),
            Constraint::Length(addr_w),
            Constraint::Length(10),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Min(0),
        ]
    } else {
        [
            Constraint::Length(addr_w),
            Constraint::Length(addr_w),
            Constraint::Length(11),
            Constraint::Length(8),
            Constraint::Length(6),
            Constraint::Min(9),
        ]
    };
    frame.render_widget(
        Table::new(body, widths).header(header).column_spacing(1),
        area,
    );
}

/// The detail view grouped by peer (`b`): who pins the process, each group
/// with its count, oldest connection and the processes on this host
/// holding the other ends.
fn render_peers(frame: &mut Frame, area: Rect, app: &App) {
    let (model, _) = app.view();
    let Some(d) = &app.detail else {
        return;
    };
    let role = model.procs.get(&d.pid).map_or("gone", |p| p.role().name());
    let groups = d.peers.as_deref().unwrap_or_default();
    let conns: u64 = groups.iter().map(|g| g.connections).sum();
    let title = format!(
        "pid {} ({}) · {role} · {conns} live connection{} by peer (b: list them)",
        d.pid,
        terminal_safe(&d.comm),
        if conns == 1 { "" } else { "s" },
    );
    let block = panel(&title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let message = match (&d.peers, &d.error) {
        (_, Some(e)) => Some(Line::styled(
            format!("cannot group the connections: {}", terminal_safe(e)),
            Style::new().fg(Color::Red),
        )),
        (None, None) => Some(Line::styled("looking for the peers…", DIM)),
        (Some(g), None) if g.is_empty() => Some(Line::styled("no live connection", DIM)),
        _ => None,
    };
    if let Some(message) = message {
        frame.render_widget(Paragraph::new(message), inner);
        return;
    }
    let header = Row::new([
        Cell::from("PEER"),
        Cell::from(Line::from("CONNS").alignment(Alignment::Right)),
        Cell::from(Line::from("OLDEST").alignment(Alignment::Right)),
        Cell::from("PEER PROCESSES"),
    ])
    .style(Style::new().bold().fg(Color::Gray));
    let body = groups.iter().skip(d.scroll).map(|g| {
        let procs = crate::peer_report::processes_text(g);
        let procs = if g.peer_processes.as_ref().is_some_and(|p| !p.is_empty()) {
            Span::raw(procs)
        } else {
            Span::styled(procs, DIM)
        };
        Row::new([
            Cell::from(terminal_safe(&g.peer).into_owned()),
            Cell::from(Line::from(g.connections.to_string()).alignment(Alignment::Right)),
            Cell::from(
                Line::from(human(std::time::Duration::from_millis(g.oldest_age_ms)))
                    .alignment(Alignment::Right),
            ),
            Cell::from(Line::from(procs)),
        ])
    });
    let widths = [
        Constraint::Length(26),
        Constraint::Length(6),
        Constraint::Length(8),
        Constraint::Min(10),
    ];
    frame.render_widget(
        Table::new(body, widths).header(header).column_spacing(1),
        inner,
    );
}

/// Where a process runs, for the detail view: its container (the short id
/// `docker ps` shows), pod UID and cgroup, those known; `None` if none is.
fn place_line(p: &Proc) -> Option<Line<'static>> {
    let parts = [
        (
            "container ",
            p.container_id
                .as_deref()
                .map(|id| id.get(..12).unwrap_or(id)),
        ),
        ("pod ", p.pod_uid.as_deref()),
        ("cgroup ", p.cgroup.as_deref()),
    ];
    let mut spans = Vec::new();
    for (name, value) in parts {
        let Some(value) = value else { continue };
        if !spans.is_empty() {
            spans.push(Span::styled(" · ", DIM));
        }
        spans.push(Span::styled(name, DIM));
        spans.push(Span::raw(terminal_safe(value).into_owned()));
    }
    (!spans.is_empty()).then(|| Line::from(spans))
}

/// A `w`x`h` rectangle centred in `area`, clipped to it.
fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

fn render_help(frame: &mut Frame, area: Rect) {
    let mut lines: Vec<Line> = BINDINGS
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!(" {k:<10}"), Style::new().bold().fg(Color::Cyan)),
                Span::raw(*what),
            ])
        })
        .collect();
    lines.push(Line::raw(""));
    for (role, what) in [
        (Role::Serving, "accepting on its listeners"),
        (
            Role::Draining,
            "holds connections, no longer takes new ones",
        ),
        (Role::Drained, "was draining and reached 0 live"),
        (Role::Exited, "gone (kept a minute, greyed)"),
    ] {
        lines.push(Line::from(vec![
            Span::styled(format!(" {:<10}", role.name()), role_style(role)),
            Span::raw(what),
        ]));
    }
    let h = lines.len() as u16 + 2;
    let rect = centered(area, 74, h);
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines).block(panel("Help · any key closes")),
        rect,
    );
}

fn input<'a>(label: &'a str, value: &'a str, focused: bool, hint: &'a str) -> Line<'a> {
    let shown = if value.is_empty() && !focused {
        "none"
    } else {
        value
    };
    let style = if focused {
        Style::new().fg(Color::Black).bg(Color::Gray)
    } else {
        Style::new().underlined()
    };
    let cursor = if focused { "█" } else { "" };
    Line::from(vec![
        Span::styled(format!("{label:<10} "), Style::new().bold()),
        Span::styled(format!("{shown}{cursor}"), style),
        Span::raw("  "),
        Span::styled(hint, DIM),
    ])
}

fn render_dialog(frame: &mut Frame, area: Rect, app: &App) {
    let Mode::Dialog(d) = &app.mode else {
        return;
    };
    let title = match d.kind {
        DialogKind::Drain => format!("Drain pid {} ({})", d.pid, terminal_safe(&d.comm)),
        DialogKind::Signal => format!("Signal pid {} ({})", d.pid, terminal_safe(&d.comm)),
        DialogKind::CancelDrain => format!("Cancel drain of pid {}", d.pid),
    };
    let mut lines = Vec::new();
    if d.confirming {
        lines.push(Line::raw(""));
        lines.push(Line::styled(
            terminal_safe(&d.question()).into_owned(),
            Style::new().bold(),
        ));
        lines.push(Line::raw(""));
        lines.push(Line::from(vec![
            Span::styled(" y ", Style::new().fg(Color::Black).bg(Color::Green)),
            Span::raw(" confirm    "),
            Span::styled(" n ", Style::new().fg(Color::Black).bg(Color::Gray)),
            Span::raw(if d.kind == DialogKind::CancelDrain {
                " keep draining"
            } else {
                " back"
            }),
        ]));
    } else {
        let what = match d.kind {
            DialogKind::Drain => {
                "Wait until it holds no live connection (confirmed by a fresh look at its fds), then send the signal: like `gracewatch drain`."
            }
            _ => "Sent through a pidfd opened now: a recycled pid never receives it.",
        };
        lines.push(Line::styled(format!("{} live now. {what}", d.live), DIM));
        lines.push(Line::raw(""));
        let hint = if d.kind == DialogKind::Drain {
            "TERM, QUIT, 15… or none"
        } else {
            "TERM, HUP, QUIT, USR2, 15…"
        };
        lines.push(input("Signal", &d.signal, d.focus == Field::Signal, hint));
        if d.kind == DialogKind::Drain {
            lines.push(input(
                "Timeout",
                &d.timeout,
                d.focus == Field::Timeout,
                "e.g. 90s, 5m; empty: none",
            ));
            lines.push(input(
                "Until idle",
                &d.until_idle,
                d.focus == Field::UntilIdle,
                "e.g. 2s: cut idle keep-alives; empty: off",
            ));
            lines.push(input(
                "Exclude",
                &d.exclude_peers,
                d.focus == Field::ExcludePeers,
                "peer CIDR[:PORT] …, e.g. 10.0.0.9; empty: none",
            ));
        }
        lines.push(Line::raw(""));
        match (&d.error, &d.pin) {
            (Some(e), _) | (None, Pin::Failed(e)) => {
                lines.push(Line::styled(
                    terminal_safe(e).into_owned(),
                    Style::new().fg(Color::Red),
                ));
            }
            _ => lines.push(Line::styled(
                if d.kind == DialogKind::Drain {
                    "Tab next field · Enter continue · Esc cancel"
                } else {
                    "Enter continue · Esc cancel"
                },
                DIM,
            )),
        }
    }
    let rect = centered(area, 72, if d.kind == DialogKind::Drain { 12 } else { 10 });
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines)
            .block(
                panel(&title)
                    .border_style(Style::new().fg(Color::Yellow))
                    .padding(Padding::horizontal(1)),
            )
            .wrap(Wrap { trim: false }),
        rect,
    );
}

fn render_confirm_quit(frame: &mut Frame, area: Rect, app: &App) {
    let pids = app
        .running_drains
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let lines = vec![
        Line::raw(""),
        Line::styled(
            format!(
                "A drain is running (pid {pids}). Quitting cancels it: nothing will be signalled."
            ),
            Style::new().bold(),
        ),
        Line::raw(""),
        Line::from(vec![
            Span::styled(" y ", Style::new().fg(Color::Black).bg(Color::Green)),
            Span::raw(" quit    "),
            Span::styled(" n ", Style::new().fg(Color::Black).bg(Color::Gray)),
            Span::raw(" stay"),
        ]),
    ];
    let rect = centered(area, 60, 8);
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines)
            .block(
                panel("Quit?")
                    .border_style(Style::new().fg(Color::Yellow))
                    .padding(Padding::horizontal(1)),
            )
            .wrap(Wrap { trim: false }),
        rect,
    );
}
