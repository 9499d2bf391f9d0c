//! Tests without a terminal or a kernel: the model's role transitions from
//! hand-made statuses and events, key handling, and `TestBackend` + `insta`
//! snapshots of every screen (`snapshots/` holds the accepted ones; review
//! changes with `cargo insta review`, or rerun with `INSTA_UPDATE=always`).

use std::{net::SocketAddr, time::Duration};

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::{Terminal, backend::TestBackend};

use super::{
    app::{App, ConnRow, Dialog, DialogKind, Effect, Field, Mode, Pin},
    keys::handle_key,
    model::{KEEP_GONE, LogKind, Model, Role, StartFilter},
    render::render,
};
use crate::{
    drain::{DrainSpec, SignalSpec},
    event::{ConnActivity, ConnEvent, ListenAddr, Tuple},
    tracker::{Family, HolderStatus, ListenerStatus, ProcessStatus, Restarts, Status},
};

const NS: u32 = 4026531840;
const T0: Duration = Duration::from_secs(1000);
const OLD: u32 = 4211;
const NEW: u32 = 4297;
const METRICS: u32 = 3990;

fn at(secs: f64) -> Duration {
    if secs < 0.0 {
        T0 - Duration::from_secs_f64(-secs)
    } else {
        T0 + Duration::from_secs_f64(secs)
    }
}

fn proc(
    pid: u32,
    comm: &str,
    live: u64,
    listeners: &[&str],
    acc: u64,
    closed: u64,
) -> ProcessStatus {
    ProcessStatus {
        pid,
        comm: comm.to_owned(),
        live,
        listeners: listeners
            .iter()
            .map(|s| s.parse().expect("an address"))
            .collect(),
        accepted_total: acc,
        closed_total: closed,
        oldest_live_ms: (live > 0).then_some(u64::from(pid % 100) * 1000 + 500),
        ..ProcessStatus::default()
    }
}

const CONTAINER: &str = "3f4b9a0c2d1e5f6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c";

/// `p` in a Kubernetes pod's container (systemd cgroup driver).
fn in_a_pod(mut p: ProcessStatus) -> ProcessStatus {
    p.set_cgroup(Some(&format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8b5c3f2e_1d4a_4e6b_9c7d_0a1b2c3d4e5f.slice/cri-containerd-{CONTAINER}.scope"
    )));
    p
}

fn listener(address: &str, holders: &[(u32, &str, u64)], queue: u64, drops: u64) -> ListenerStatus {
    ListenerStatus {
        netns: NS,
        address: address.parse().expect("an address"),
        family: if address.starts_with('[') {
            Family::Ipv6
        } else {
            Family::Ipv4
        },
        holders: holders
            .iter()
            .map(|&(pid, comm, live)| HolderStatus {
                pid,
                comm: comm.to_owned(),
                live,
            })
            .collect(),
        accept_queue: queue,
        accepted_total: 0,
        queue_drops_total: drops,
        generations: Vec::new(),
    }
}

fn status(processes: Vec<ProcessStatus>, listeners: Vec<ListenerStatus>) -> Status {
    Status {
        schema: crate::tracker::STATUS_SCHEMA.to_owned(),
        processes,
        listeners,
        ..Status::default()
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn accept(secs: f64, pid: u32, comm: &str, port: u16, peer_port: u16) -> ConnEvent {
    ConnEvent::Accept {
        at: at(secs),
        sk: u64::from(peer_port),
        tuple: Tuple {
            netns: NS,
            local: addr(&format!("127.0.0.1:{port}")),
            remote: addr(&format!("127.0.0.1:{peer_port}")),
        },
        pid,
        comm: comm.to_owned(),
        was_queued: true,
    }
}

/// The TUI's model fed like the loop feeds it, with the restart model the
/// monitor runs beside it (the monitor feeds that one the same events and
/// statuses, and ticks it).
struct Fed {
    model: Model,
    restarts: Restarts,
}

impl std::ops::Deref for Fed {
    type Target = Model;
    fn deref(&self) -> &Model {
        &self.model
    }
}

impl Fed {
    fn new(filter: StartFilter, started: Duration) -> Self {
        Self {
            model: Model::new(filter, started),
            restarts: Restarts::new(),
        }
    }

    fn on_event(&mut self, ev: &ConnEvent) {
        self.restarts.on_event(ev);
        self.model.on_event(ev);
    }

    fn observe(&mut self, status: &Status, now: Duration) {
        self.restarts.observe(status, now);
        self.model.observe(status, &self.restarts, now);
    }

    fn tick(&mut self, now: Duration) {
        self.restarts.tick(now);
        self.model.follow(&self.restarts);
        self.model.tick(now);
    }

    fn unchecked_gone(&self) -> Vec<u32> {
        self.restarts.unchecked_gone()
    }

    /// The monitor's answer for a process that left the status.
    fn liveness(&mut self, pid: u32, alive: bool, now: Duration) {
        self.restarts.liveness(pid, alive, now);
        self.model.follow(&self.restarts);
    }
}

/// Steps the model second by second to `until`, applying each status at
/// its time, like the loop does (status, then a tick).
fn play(model: &mut Fed, steps: &[(f64, Vec<ConnEvent>, Status)], until: f64) {
    let mut steps = steps.iter().peekable();
    let mut t = 0.0;
    while t <= until {
        while let Some((when, events, st)) = steps.next_if(|(when, _, _)| *when <= t) {
            for ev in events {
                model.on_event(ev);
            }
            model.observe(st, at(*when));
        }
        model.tick(at(t));
        t += 0.5;
    }
}

fn metrics() -> ProcessStatus {
    proc(METRICS, "node_exporter", 1, &["[::]:9100"], 0, 0)
}

fn metrics_listener() -> ListenerStatus {
    listener("[::]:9100", &[(METRICS, "node_exporter", 1)], 2, 1)
}

/// An fd-passing restart in progress: the old server (4211) drains while
/// the new one (4297), which inherited the listener, takes the traffic.
fn handover_model(until: f64) -> Fed {
    let mut m = Fed::new(StartFilter::default(), T0);
    let l = "127.0.0.1:8080";
    let steps = vec![
        (
            0.0,
            vec![],
            status(
                vec![metrics(), proc(OLD, "server", 6, &[l], 0, 0)],
                vec![listener(l, &[(OLD, "server", 6)], 0, 0), metrics_listener()],
            ),
        ),
        (
            5.0,
            vec![
                accept(5.0, NEW, "server", 8080, 50001),
                accept(5.0, NEW, "server", 8080, 50002),
            ],
            status(
                vec![
                    metrics(),
                    proc(OLD, "server", 8, &[l], 2, 0),
                    proc(NEW, "server", 3, &[l], 3, 0),
                ],
                vec![
                    listener(l, &[(OLD, "server", 8), (NEW, "server", 3)], 0, 0),
                    metrics_listener(),
                ],
            ),
        ),
        (
            6.0,
            vec![],
            status(
                vec![
                    metrics(),
                    proc(OLD, "server", 8, &[l], 2, 0),
                    proc(NEW, "server", 6, &[l], 6, 0),
                ],
                vec![
                    listener(l, &[(OLD, "server", 8), (NEW, "server", 6)], 0, 0),
                    metrics_listener(),
                ],
            ),
        ),
        (
            12.0,
            vec![ConnEvent::Lost {
                at: at(12.0),
                total: 3,
            }],
            status(
                vec![
                    metrics(),
                    in_a_pod(proc(OLD, "server", 3, &[l], 2, 5)),
                    proc(NEW, "server", 9, &[l], 9, 0),
                ],
                vec![
                    listener(l, &[(OLD, "server", 3), (NEW, "server", 9)], 1, 0),
                    metrics_listener(),
                ],
            ),
        ),
    ];
    play(&mut m, &steps, until);
    m
}

fn handover_app() -> App {
    handover_app_fed().0
}

/// [`handover_app`] with the restart model that fed it, to go on.
fn handover_app_fed() -> (App, Restarts) {
    let Fed { model, restarts } = handover_model(14.0);
    let mut app = App::new(model, at(14.0));
    app.selected = Some(OLD);
    (app, restarts)
}

/// The monitor saw `pid` exit at `at`; the app's model follows.
fn exit_in(app: &mut App, restarts: &mut Restarts, pid: u32, at: Duration) {
    restarts.on_event(&ConnEvent::ProcessExit { at, pid });
    app.model.follow(restarts);
}

fn draw(app: &App, w: u16, h: u16) -> Terminal<TestBackend> {
    let mut terminal = Terminal::new(TestBackend::new(w, h)).expect("test terminal");
    terminal
        .draw(|frame| render(frame, app))
        .expect("draw into the test backend");
    terminal
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

fn press(app: &mut App, keys: &str) -> Vec<Effect> {
    keys.chars()
        .flat_map(|c| handle_key(app, key(KeyCode::Char(c))))
        .collect()
}

// ---- model ----------------------------------------------------------------

#[test]
fn the_status_says_where_each_process_runs() {
    let m = handover_model(6.5);
    assert_eq!(m.procs[&OLD].cgroup, None, "not said yet");
    let m = handover_model(14.0);
    let old = &m.procs[&OLD];
    assert_eq!(old.container_id.as_deref(), Some(CONTAINER));
    assert_eq!(
        old.pod_uid.as_deref(),
        Some("8b5c3f2e-1d4a-4e6b-9c7d-0a1b2c3d4e5f")
    );
    assert!(old.cgroup.as_deref().is_some_and(|c| c.ends_with(".scope")));
    assert_eq!(m.procs[&NEW].cgroup, None);
    assert_eq!(m.procs[&NEW].container_id, None);
}

#[test]
fn handover_makes_the_old_process_draining_then_drained() {
    // The old one last accepted at 5 s; the new one accepted 3 then.
    let m = handover_model(6.5);
    assert_eq!(m.procs[&OLD].role(), Role::Serving, "quiet for only 1.5 s");
    assert_eq!(m.procs[&NEW].role(), Role::Serving);
    let m = handover_model(7.0);
    let old = &m.procs[&OLD];
    assert_eq!(old.role(), Role::Draining, "{:?}", m.log);
    assert_eq!(old.restart.drain.as_ref().map(|d| d.from_live), Some(8));
    assert!(
        m.log
            .iter()
            .any(|e| e.kind == LogKind::Handover && e.text.contains("pid 4297")),
        "{:?}",
        m.log
    );
    // Progress: 3 of 8 left.
    let m = handover_model(14.0);
    let (done, eta) = m.procs[&OLD].drain_progress(at(14.0)).expect("draining");
    assert!((done - 5.0 / 8.0).abs() < 1e-9, "{done}");
    assert!(eta.is_some());

    let mut m = m;
    let l = "127.0.0.1:8080";
    m.observe(
        &status(
            vec![
                metrics(),
                proc(OLD, "server", 0, &[l], 2, 8),
                proc(NEW, "server", 9, &[l], 9, 0),
            ],
            vec![listener(l, &[(OLD, "server", 0), (NEW, "server", 9)], 0, 0)],
        ),
        at(20.0),
    );
    assert_eq!(m.procs[&OLD].role(), Role::Drained);
    assert!(
        m.log
            .iter()
            // From 5 s, when the new process started taking its
            // connections (declared at 7 s, after the quiet period).
            .any(|e| e.text.contains("drained: 0 live after 15.0s (from 8)")),
        "{:?}",
        m.log
    );
}

#[test]
fn closing_its_listener_with_live_connections_is_draining_at_once() {
    let mut m = Fed::new(StartFilter::default(), T0);
    let l = "127.0.0.1:8080";
    m.observe(
        &status(
            vec![proc(OLD, "app", 4, &[l], 0, 0)],
            vec![listener(l, &[(OLD, "app", 4)], 0, 0)],
        ),
        at(0.0),
    );
    m.observe(
        &status(vec![proc(OLD, "app", 4, &[], 0, 0)], vec![]),
        at(1.0),
    );
    assert_eq!(m.procs[&OLD].role(), Role::Draining);
    assert!(m.log.iter().any(|e| e.text.contains("closed its listener")));
    assert!(
        m.log.iter().any(|e| e.text.contains("let go of listener")),
        "no ListenStop event: the holder change is logged: {:?}",
        m.log
    );
}

#[test]
fn accepting_again_makes_a_draining_process_serving() {
    let mut m = handover_model(8.0);
    assert_eq!(m.procs[&OLD].role(), Role::Draining);
    let l = "127.0.0.1:8080";
    m.observe(
        &status(
            vec![
                proc(OLD, "server", 9, &[l], 3, 0),
                proc(NEW, "server", 6, &[l], 6, 0),
            ],
            vec![listener(l, &[(OLD, "server", 9), (NEW, "server", 6)], 0, 0)],
        ),
        at(9.0),
    );
    assert_eq!(m.procs[&OLD].role(), Role::Serving);
}

#[test]
fn a_process_that_leaves_is_drained_if_alive_and_exited_if_not() {
    let mut m = Fed::new(StartFilter::default(), T0);
    let l = "127.0.0.1:8080";
    let both = status(
        vec![
            proc(OLD, "app", 2, &[l], 0, 0),
            proc(NEW, "app", 0, &[l], 0, 0),
        ],
        vec![listener(l, &[(OLD, "app", 2), (NEW, "app", 0)], 0, 0)],
    );
    m.observe(&both, at(0.0));
    for i in 0..2 {
        m.on_event(&ConnEvent::Close {
            at: at(1.0),
            sk: i,
            tuple: Tuple {
                netns: NS,
                local: addr(l),
                remote: addr(&format!("127.0.0.1:{}", 40000 + i)),
            },
            pid: NEW,
            by_exit: false,
        });
    }
    m.on_event(&ConnEvent::Close {
        at: at(1.0),
        sk: 9,
        tuple: Tuple {
            netns: NS,
            local: addr(l),
            remote: addr("127.0.0.1:40009"),
        },
        pid: OLD,
        by_exit: true,
    });
    m.observe(&status(vec![], vec![]), at(1.0));
    assert_eq!(m.unchecked_gone(), vec![OLD, NEW]);
    m.liveness(OLD, false, at(1.0));
    m.liveness(NEW, true, at(1.0));
    assert_eq!(m.procs[&OLD].role(), Role::Exited);
    assert_eq!(m.procs[&NEW].role(), Role::Drained);
    assert!(
        m.log
            .iter()
            .any(|e| e.text == "pid 4211 (app) exited holding 1 live connection(s)"),
        "{:?}",
        m.log
    );
    // Kept a while, then forgotten.
    m.tick(at(1.0) + KEEP_GONE - Duration::from_secs(1));
    assert!(m.procs.contains_key(&OLD));
    m.tick(at(1.0) + KEEP_GONE);
    assert!(!m.procs.contains_key(&OLD));
    assert!(!m.procs.contains_key(&NEW));
}

#[test]
fn a_full_kernel_table_is_a_header_warning_logged_once_per_episode() {
    let mut m = Fed::new(StartFilter::default(), T0);
    let mut s = status(vec![], vec![]);
    m.observe(&s, at(0.0));
    let header = |m: &Model| {
        let app = App::new(m.clone(), at(2.0));
        let terminal = draw(&app, 100, 12);
        let buf = terminal.backend().buffer();
        (0..buf.area.width)
            .map(|x| buf[(x, 0)].symbol().to_owned())
            .collect::<String>()
    };
    assert!(!header(&m).contains("table full"), "{}", header(&m));
    // One episode: one event, then statuses that repeat its total.
    m.on_event(&ConnEvent::MapFull {
        at: at(1.0),
        total: 1,
    });
    s.map_full_total = 1;
    m.observe(&s, at(1.0));
    m.observe(&s, at(1.5));
    let warnings = |m: &Model| {
        m.log
            .iter()
            .filter(|e| e.kind == LogKind::Warning && e.text.contains("table is full"))
            .count()
    };
    assert_eq!(warnings(&m), 1);
    assert!(header(&m).contains("table full"), "{}", header(&m));
    // An episode before the TUI subscribed shows from the status alone.
    let mut late = Fed::new(StartFilter::default(), T0);
    late.observe(&s, at(1.0));
    assert!(header(&late).contains("table full"), "{}", header(&late));
}

#[test]
fn a_listener_opened_is_logged_once() {
    let mut m = Fed::new(StartFilter::default(), T0);
    m.observe(&status(vec![], vec![]), at(0.0));
    m.on_event(&ConnEvent::ListenStart {
        at: at(1.0),
        sk: 1,
        addr: ListenAddr {
            netns: NS,
            local: addr("0.0.0.0:80"),
        },
        pid: 7,
        comm: "nginx".to_owned(),
    });
    m.observe(
        &status(
            vec![proc(7, "nginx", 0, &["0.0.0.0:80"], 0, 0)],
            vec![listener("0.0.0.0:80", &[(7, "nginx", 0)], 0, 0)],
        ),
        at(1.0),
    );
    let texts: Vec<&str> = m.log.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(texts, vec!["pid 7 (nginx) opened listener 0.0.0.0:80"]);
}

#[test]
fn startup_filters_keep_a_process_once_it_matched() {
    let filter = StartFilter {
        ports: vec![8080],
        ..StartFilter::default()
    };
    let mut m = Fed::new(filter, T0);
    let l = "127.0.0.1:8080";
    m.observe(
        &status(
            vec![proc(OLD, "app", 3, &[l], 0, 0), metrics()],
            vec![listener(l, &[(OLD, "app", 3)], 0, 0), metrics_listener()],
        ),
        at(0.0),
    );
    assert_eq!(m.procs.keys().copied().collect::<Vec<_>>(), vec![OLD]);
    assert_eq!(m.listeners.len(), 1);
    // It closes its listener (no longer on port 8080) and stays shown.
    m.observe(
        &status(vec![proc(OLD, "app", 3, &[], 0, 0), metrics()], vec![]),
        at(1.0),
    );
    assert_eq!(m.procs.keys().copied().collect::<Vec<_>>(), vec![OLD]);
    assert!(
        StartFilter {
            comms: vec!["a_very_long_command_name".to_owned()],
            ..StartFilter::default()
        }
        .matches(1, "a_very_long_com", &[])
    );
}

// ---- keys -----------------------------------------------------------------

#[test]
fn arrows_and_jk_move_the_selection_within_the_rows() {
    let mut app = handover_app();
    app.selected = None;
    assert_eq!(app.selected_proc().map(|p| p.pid), Some(METRICS));
    press(&mut app, "j");
    assert_eq!(app.selected, Some(OLD));
    handle_key(&mut app, key(KeyCode::Down));
    press(&mut app, "jjj");
    assert_eq!(app.selected, Some(NEW), "clamped at the last row");
    handle_key(&mut app, key(KeyCode::Up));
    assert_eq!(app.selected, Some(OLD));
    press(&mut app, "g");
    assert_eq!(app.selected, Some(METRICS));
    press(&mut app, "G");
    assert_eq!(app.selected, Some(NEW));
    press(&mut app, "kk");
    assert_eq!(app.selected, Some(METRICS));
}

#[test]
fn enter_opens_the_connections_of_the_selected_process() {
    let mut app = handover_app();
    let effects = handle_key(&mut app, key(KeyCode::Enter));
    assert_eq!(effects, vec![Effect::FetchConnections(OLD)]);
    assert_eq!(app.mode, Mode::Detail);
    assert_eq!(app.detail_pid(), Some(OLD));
    assert!(handle_key(&mut app, key(KeyCode::Esc)).is_empty());
    assert_eq!(app.mode, Mode::Normal);
    assert_eq!(app.detail_pid(), None);
}

#[test]
fn drain_dialog_validates_confirms_and_starts_the_drain() {
    let mut app = handover_app();
    assert_eq!(press(&mut app, "d"), vec![Effect::Pin(OLD)]);
    // Signal field: replace TERM with QUIT.
    for _ in 0..4 {
        handle_key(&mut app, key(KeyCode::Backspace));
    }
    press(&mut app, "QUIT");
    handle_key(&mut app, key(KeyCode::Tab));
    press(&mut app, "soon");
    handle_key(&mut app, key(KeyCode::Enter));
    let Mode::Dialog(d) = &app.mode else {
        panic!("dialog closed: {:?}", app.mode)
    };
    assert_eq!(d.focus, Field::Timeout);
    assert!(
        d.error
            .as_deref()
            .is_some_and(|e| e.contains("not a duration")),
        "{d:?}"
    );
    for _ in 0..4 {
        handle_key(&mut app, key(KeyCode::Backspace));
    }
    press(&mut app, "90s");
    handle_key(&mut app, key(KeyCode::Enter));
    let Mode::Dialog(d) = &app.mode else {
        panic!("dialog closed")
    };
    assert_eq!(d.error.as_deref(), Some("still pinning the process…"));
    app.pinned(OLD, Ok(()));
    handle_key(&mut app, key(KeyCode::Enter));
    let Mode::Dialog(d) = &app.mode else {
        panic!("dialog closed")
    };
    assert!(d.confirming);
    assert_eq!(
        d.question(),
        "Drain pid 4211 (server): wait until it holds no live connection, then send SIGQUIT; give up after 1m30s."
    );
    let effects = press(&mut app, "y");
    assert_eq!(
        effects,
        vec![Effect::StartDrain {
            pid: OLD,
            spec: DrainSpec {
                signal: "QUIT".parse().ok(),
                timeout: Some(Duration::from_secs(90)),
                ..DrainSpec::default()
            }
        }]
    );
    assert_eq!(app.mode, Mode::Normal);
    assert!(app.drain_running(OLD));

    // `d` again offers to cancel it; `q` asks before quitting.
    assert!(press(&mut app, "d").is_empty());
    assert_eq!(press(&mut app, "y"), vec![Effect::CancelDrain(OLD)]);
    assert!(press(&mut app, "q").is_empty());
    assert_eq!(app.mode, Mode::ConfirmQuit);
    assert!(press(&mut app, "n").is_empty());
    assert_eq!(app.mode, Mode::Normal);
    app.drain_ended(OLD);
    assert_eq!(press(&mut app, "q"), vec![Effect::Quit]);
}

#[test]
fn signal_dialog_sends_only_after_confirmation() {
    let mut app = handover_app();
    assert_eq!(press(&mut app, "s"), vec![Effect::Pin(OLD)]);
    app.pinned(OLD, Ok(()));
    for _ in 0..4 {
        handle_key(&mut app, key(KeyCode::Backspace));
    }
    press(&mut app, "hup");
    assert!(handle_key(&mut app, key(KeyCode::Enter)).is_empty());
    // `n` goes back to the field, Esc then cancels and unpins.
    assert!(press(&mut app, "n").is_empty());
    assert_eq!(handle_key(&mut app, key(KeyCode::Esc)), vec![Effect::Unpin]);
    assert_eq!(app.mode, Mode::Normal);

    press(&mut app, "s");
    app.pinned(OLD, Ok(()));
    handle_key(&mut app, key(KeyCode::Enter));
    assert_eq!(
        handle_key(&mut app, key(KeyCode::Enter)),
        vec![Effect::Signal {
            pid: OLD,
            signal: SignalSpec::TERM
        }]
    );
}

#[test]
fn a_failed_pin_blocks_the_action() {
    let mut app = handover_app();
    press(&mut app, "s");
    app.pinned(OLD, Err("pid 4211 does not exist".to_owned()));
    assert!(handle_key(&mut app, key(KeyCode::Enter)).is_empty());
    let Mode::Dialog(d) = &app.mode else {
        panic!("dialog closed")
    };
    assert!(!d.confirming);
    assert_eq!(d.pin, Pin::Failed("pid 4211 does not exist".to_owned()));
    assert_eq!(d.error.as_deref(), Some("pid 4211 does not exist"));
}

#[test]
fn exited_processes_cannot_be_signalled() {
    let (mut app, mut restarts) = handover_app_fed();
    exit_in(&mut app, &mut restarts, OLD, at(14.0));
    assert!(press(&mut app, "s").is_empty());
    assert_eq!(app.mode, Mode::Normal);
    assert_eq!(app.notice.as_deref(), Some("pid 4211 has exited"));
}

#[test]
fn slash_filters_rows_and_esc_clears() {
    let mut app = handover_app();
    press(&mut app, "/");
    assert_eq!(app.mode, Mode::Filter);
    press(&mut app, "node");
    assert_eq!(
        app.rows().iter().map(|p| p.pid).collect::<Vec<_>>(),
        vec![METRICS]
    );
    assert_eq!(app.selected_proc().map(|p| p.pid), Some(METRICS));
    handle_key(&mut app, key(KeyCode::Enter));
    assert_eq!(app.mode, Mode::Normal);
    assert_eq!(app.filter, "node");
    // Esc clears the filter first, then quits.
    assert!(handle_key(&mut app, key(KeyCode::Esc)).is_empty());
    assert_eq!(app.rows().len(), 3);
    assert_eq!(handle_key(&mut app, key(KeyCode::Esc)), vec![Effect::Quit]);
}

#[test]
fn pause_freezes_the_view_not_the_model() {
    let (mut app, mut restarts) = handover_app_fed();
    press(&mut app, "p");
    assert!(app.paused());
    exit_in(&mut app, &mut restarts, NEW, at(15.0));
    assert_eq!(app.view().0.procs[&NEW].role(), Role::Serving);
    press(&mut app, "p");
    assert_eq!(app.view().0.procs[&NEW].role(), Role::Exited);
}

#[test]
fn help_closes_on_any_key_and_ctrl_c_always_quits() {
    let mut app = handover_app();
    press(&mut app, "?");
    assert_eq!(app.mode, Mode::Help);
    assert!(
        press(&mut app, "q").is_empty(),
        "q closes help, not the TUI"
    );
    assert_eq!(app.mode, Mode::Normal);
    press(&mut app, "d");
    let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
    assert_eq!(handle_key(&mut app, ctrl_c), vec![Effect::Quit]);
    let mut release = key(KeyCode::Char('q'));
    release.kind = KeyEventKind::Release;
    assert!(handle_key(&mut app, release).is_empty());
}

// ---- snapshots --------------------------------------------------------------

#[test]
fn snapshot_main_view() {
    insta::assert_snapshot!(draw(&handover_app(), 120, 40).backend());
}

#[test]
fn snapshot_80x24() {
    insta::assert_snapshot!(draw(&handover_app(), 80, 24).backend());
}

#[test]
fn snapshot_narrow_60x15() {
    insta::assert_snapshot!(draw(&handover_app(), 60, 15).backend());
}

#[test]
fn snapshot_empty_state() {
    let mut model = Fed::new(StartFilter::default(), T0);
    model.observe(&status(vec![], vec![]), at(0.0));
    model.tick(at(3.0));
    insta::assert_snapshot!(draw(&App::new(model.model, at(3.0)), 80, 24).backend());
}

#[test]
fn snapshot_connection_detail() {
    let mut app = handover_app();
    handle_key(&mut app, key(KeyCode::Enter));
    app.detail_loaded(OLD, Ok(detail_rows()));
    insta::assert_snapshot!(draw(&app, 100, 20).backend());
}

/// An idle keep-alive, a busy connection with a response stuck unsent, and
/// one the kernel no longer showed.
fn detail_rows() -> Vec<ConnRow> {
    let row = |peer: &str, state, since: f64, pre, activity| ConnRow {
        local: addr("127.0.0.1:8080"),
        peer: addr(peer),
        state,
        since: at(since),
        preexisting: pre,
        activity,
    };
    vec![
        row(
            "10.0.3.7:51544",
            Some(1),
            -60.0,
            true,
            Some(ConnActivity::new(Some(41_200), Some(41_000), 0, 0, Some(0))),
        ),
        row(
            "10.0.3.9:40112",
            Some(8),
            1.5,
            false,
            Some(ConnActivity::new(
                Some(30),
                Some(900),
                0,
                70_000,
                Some(65_536),
            )),
        ),
        row("[2001:db8::17]:33018", None, 4.25, false, None),
    ]
}

/// `i` sorts the detail view by idle time, most idle first, unknown last;
/// `i` again goes back to oldest first.
#[test]
fn i_sorts_the_connections_by_idle_time_and_back() {
    let mut app = handover_app();
    handle_key(&mut app, key(KeyCode::Enter));
    let mut rows = detail_rows();
    // Make the second the most idle, so idle order differs from age order.
    rows[1].activity = Some(ConnActivity::new(Some(90_000), Some(95_000), 0, 0, Some(0)));
    app.detail_loaded(OLD, Ok(rows));
    let peers = |app: &App| -> Vec<String> {
        let d = app.detail.as_ref().expect("detail open");
        d.sorted_rows().iter().map(|r| r.peer.to_string()).collect()
    };
    let by_age = peers(&app);
    assert_eq!(
        by_age,
        ["10.0.3.7:51544", "10.0.3.9:40112", "[2001:db8::17]:33018"]
    );
    press(&mut app, "i");
    assert_eq!(app.mode, Mode::Detail);
    assert_eq!(
        peers(&app),
        ["10.0.3.9:40112", "10.0.3.7:51544", "[2001:db8::17]:33018"]
    );
    insta::assert_snapshot!(draw(&app, 100, 20).backend());
    press(&mut app, "i");
    assert_eq!(peers(&app), by_age);
}

#[test]
fn snapshot_help() {
    let mut app = handover_app();
    press(&mut app, "?");
    insta::assert_snapshot!(draw(&app, 100, 30).backend());
}

#[test]
fn snapshot_drain_dialog() {
    let mut app = handover_app();
    press(&mut app, "d");
    app.pinned(OLD, Ok(()));
    handle_key(&mut app, key(KeyCode::Tab));
    press(&mut app, "5m");
    insta::assert_snapshot!(draw(&app, 100, 30).backend());
}

#[test]
fn snapshot_confirm_dialog() {
    let mut app = handover_app();
    let Some(p) = app.model.procs.get(&OLD) else {
        panic!("fixture has pid {OLD}")
    };
    let mut d = Dialog::new(DialogKind::Signal, p);
    d.pin = Pin::Ready;
    d.signal = "HUP".to_owned();
    d.confirming = true;
    app.mode = Mode::Dialog(d);
    insta::assert_snapshot!(draw(&app, 100, 30).backend());
}

#[test]
fn a_timeout_out_of_range_is_an_error_in_the_dialog() {
    for typed in ["10000000000000000000s", "8785h", "0"] {
        let mut app = handover_app();
        press(&mut app, "d");
        app.pinned(OLD, Ok(()));
        handle_key(&mut app, key(KeyCode::Tab));
        press(&mut app, typed);
        assert_eq!(handle_key(&mut app, key(KeyCode::Enter)), vec![], "{typed}");
        let Mode::Dialog(d) = &app.mode else {
            panic!("dialog closed on {typed}: {:?}", app.mode)
        };
        assert!(
            d.error
                .as_deref()
                .is_some_and(|e| e.contains("too long") || e.contains("above zero")),
            "{typed}: {d:?}"
        );
    }
}

#[test]
fn process_names_with_control_characters_are_shown_escaped() {
    // A name any user can set with prctl(PR_SET_NAME): sets the terminal
    // title, then returns to the start of the line.
    let evil = "x\u{1b}]0;pwn\u{7}\r";
    let mut model = Fed::new(StartFilter::default(), at(0.0));
    let st = status(
        vec![proc(OLD, evil, 1, &["0.0.0.0:8080"], 1, 0)],
        vec![listener("0.0.0.0:8080", &[(OLD, evil, 1)], 0, 0)],
    );
    model.on_event(&accept(0.5, OLD, evil, 8080, 40000));
    model.observe(&st, at(1.0));
    model.tick(at(1.0));
    let mut app = App::new(model.model, at(1.0));
    app.selected = Some(OLD);
    press(&mut app, "s");
    let buffer = draw(&app, 120, 40).backend().buffer().clone();
    let screen: String = buffer
        .content()
        .chunks(usize::from(buffer.area.width))
        .map(|row| row.iter().map(|c| c.symbol()).collect::<String>() + "\n")
        .collect();
    // In the table (cut to its column) and in full in the dialog's title.
    let shown = screen.matches(r"x\x1b]0;pwn\x07").count();
    assert!(shown >= 2, "name shown escaped {shown} times:\n{screen}");
    assert!(screen.contains(r"(x\x1b]0;pwn\x07\r)"), "{screen}");
    assert!(
        buffer
            .content()
            .iter()
            .all(|c| !c.symbol().contains(char::is_control)),
        "a control character reached the terminal buffer"
    );
}

/// The same address in another network namespace is another listener: a
/// process there that starts accepting on its own `127.0.0.1:8080` is no
/// handover of the host's server (it used to be logged as "accepting
/// alongside" it, as if it shared the host's listener).
#[test]
fn an_equal_address_in_another_namespace_is_no_handover() {
    const NS2: u32 = 4026532001;
    const OTHER: u32 = 5120;
    let l = "127.0.0.1:8080";
    let in_ns2 = |holders: &[(u32, &str, u64)]| ListenerStatus {
        netns: NS2,
        ..listener(l, holders, 0, 0)
    };
    let mut m = Fed::new(StartFilter::default(), T0);
    let host_only = status(
        vec![proc(OLD, "server", 2, &[l], 0, 0)],
        vec![listener(l, &[(OLD, "server", 2)], 0, 0)],
    );
    let both = |other_live: u64, other_acc: u64| {
        status(
            vec![
                proc(OLD, "server", 2, &[l], 0, 0),
                proc(OTHER, "app", other_live, &[l], other_acc, 0),
            ],
            vec![
                listener(l, &[(OLD, "server", 2)], 0, 0),
                in_ns2(&[(OTHER, "app", other_live)]),
            ],
        )
    };
    let accept_ns2 = |secs: f64, peer_port: u16| ConnEvent::Accept {
        at: at(secs),
        sk: u64::from(peer_port),
        tuple: Tuple {
            netns: NS2,
            local: addr(l),
            remote: addr(&format!("127.0.0.1:{peer_port}")),
        },
        pid: OTHER,
        comm: "app".to_owned(),
        was_queued: true,
    };
    let steps = vec![
        (0.0, vec![], host_only),
        (2.0, vec![], both(0, 0)),
        (
            3.0,
            vec![accept_ns2(3.0, 50001), accept_ns2(3.0, 50002)],
            both(2, 2),
        ),
        (
            4.0,
            vec![accept_ns2(4.0, 50003), accept_ns2(4.0, 50004)],
            both(4, 4),
        ),
    ];
    play(&mut m, &steps, 8.0);
    let app = App::new(m.model, at(8.0));
    let buffer = draw(&app, 120, 30).backend().buffer().clone();
    let screen: String = buffer
        .content()
        .chunks(usize::from(buffer.area.width))
        .map(|row| row.iter().map(|c| c.symbol()).collect::<String>() + "\n")
        .collect();
    assert!(
        !screen.contains("alongside") && app.model.log.iter().all(|e| e.kind != LogKind::Handover),
        "a process in another namespace was taken for a handover:\n{screen}"
    );
    assert!(
        screen.contains("4211    server          serving"),
        "the host's server keeps serving:\n{screen}"
    );
    assert!(
        screen.contains("5120    app             serving"),
        "{screen}"
    );
}

/// `b` in the connection view groups by peer and asks for a load at once;
/// the groups show their counts, oldest ages and the peer processes (or
/// why none is named); `b` again lists the connections.
#[test]
fn b_groups_the_connection_view_by_peer() {
    use crate::peers::{PeerGroupView, PeerProcess};
    let mut app = handover_app();
    handle_key(&mut app, key(KeyCode::Enter));
    app.detail_loaded(OLD, Ok(detail_rows()));
    let effects = handle_key(&mut app, key(KeyCode::Char('b')));
    assert_eq!(effects, vec![Effect::FetchConnections(OLD)]);
    assert!(app.detail_by_peer() && app.mode == Mode::Detail);
    let process = |pid: u32, comm: &str, connections: u64| PeerProcess {
        pid,
        comm: comm.to_owned(),
        container_id: None,
        cgroup: None,
        connections,
    };
    let group = |peer: &str, prefix_len: u8, connections: u64, age: u64| PeerGroupView {
        peer: peer.to_owned(),
        prefix_len,
        addresses: 1,
        connections,
        oldest_age_ms: age,
        peer_processes: Some(Vec::new()),
        unnamed: Some(0),
    };
    let mut local = group("127.0.0.1", 32, 5, 3_500);
    local.peer_processes = Some(vec![process(4302, "peer-a", 3), process(4310, "peer-b", 2)]);
    let mut nine = group("127.0.0.9", 32, 2, 3_400);
    nine.peer_processes = Some(vec![process(4318, "peer-c", 2)]);
    let mut remote = group("10.1.2.0/24", 24, 40, 725_000);
    remote.addresses = 12;
    remote.unnamed = Some(40);
    app.peers_loaded(OLD, Ok(vec![remote, local, nine]));
    insta::assert_snapshot!(draw(&app, 100, 12).backend());
    handle_key(&mut app, key(KeyCode::Char('b')));
    assert!(!app.detail_by_peer());
}

#[test]
fn the_drain_dialog_takes_until_idle_and_excluded_peers() {
    let mut app = handover_app();
    press(&mut app, "d");
    app.pinned(OLD, Ok(()));
    // Signal → Timeout → Until idle → Exclude; BackTab goes back one.
    for _ in 0..3 {
        handle_key(&mut app, key(KeyCode::Tab));
    }
    handle_key(&mut app, key(KeyCode::BackTab));
    press(&mut app, "2s");
    handle_key(&mut app, key(KeyCode::Tab));
    press(&mut app, "127.0.0.9, 10.0.0.0/8:9100");
    // A bad rule is an error in the dialog, not a drain.
    press(&mut app, " 10.0.0.1/8");
    assert!(handle_key(&mut app, key(KeyCode::Enter)).is_empty());
    let Mode::Dialog(d) = &app.mode else {
        panic!("dialog closed: {:?}", app.mode)
    };
    assert_eq!(d.focus, Field::ExcludePeers);
    assert!(
        d.error
            .as_deref()
            .is_some_and(|e| e.starts_with("exclude peers:")),
        "{d:?}"
    );
    for _ in 0.." 10.0.0.1/8".len() {
        handle_key(&mut app, key(KeyCode::Backspace));
    }
    handle_key(&mut app, key(KeyCode::Enter));
    let Mode::Dialog(d) = &app.mode else {
        panic!("dialog closed")
    };
    assert!(d.confirming, "{d:?}");
    assert_eq!(
        d.question(),
        "Drain pid 4211 (server): wait until it holds no live connection (or until every one has been idle 2.0s with nothing in flight: the signal cuts them), not counting connections from 2 excluded peer rules, then send SIGTERM; no deadline."
    );
    let rules =
        ["127.0.0.9", "10.0.0.0/8:9100"].map(|r| crate::input::parse_peer_rule(r).expect("a rule"));
    assert_eq!(
        press(&mut app, "y"),
        vec![Effect::StartDrain {
            pid: OLD,
            spec: DrainSpec {
                until_idle: Some(Duration::from_secs(2)),
                exclude_peers: rules.to_vec(),
                ..DrainSpec::default()
            }
        }]
    );
}
