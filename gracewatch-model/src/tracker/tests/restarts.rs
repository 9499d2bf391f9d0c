//! The restart model ([`Restarts`]): roles, handovers, drains and exits as
//! the monitor feeds them (events, published statuses, time, liveness of
//! processes that left the status, drain notes), one row per transition.

use super::kit::*;

const OLD: u32 = 10;
const NEW: u32 = 20;
/// A server in another network namespace.
const OTHER: u32 = 30;

/// The server's listener, in the host namespace [`NS`].
fn app() -> ListenAddr {
    listen_addr("127.0.0.1:8080")
}

/// The same address in namespace [`NS2`]: another listener.
fn app_in_ns2() -> ListenAddr {
    listen_addr_in(NS2, "127.0.0.1:8080")
}

fn keep_gone_ms() -> u64 {
    u64::try_from(KEEP_GONE.as_millis()).unwrap()
}

/// Connection `n` to [`app`].
fn to_app(n: u16) -> Tuple {
    tuple("127.0.0.1:8080", &format!("192.0.2.1:{}", 40000 + n))
}

/// Connection `n` to [`app_in_ns2`].
fn to_app_in_ns2(n: u16) -> Tuple {
    tuple_in(NS2, "127.0.0.1:8080", &format!("192.0.2.1:{}", 40000 + n))
}

/// An fd-passing restart: OLD serves 3 connections (the last accepted at
/// 4.1 s, after the first look), NEW inherits the listener and accepts 3
/// at 5 s; at 6.1 s OLD has been quiet for `HANDOVER_QUIET` (2 s) and is
/// declared draining, since 5 s: when NEW first accepted after OLD's last
/// accept (OLD stopped accepting then).
fn draining_after_handover() -> Vec<RStep> {
    vec![
        listen_start(1, 100, app(), OLD).into(),
        accept(2, 201, to_app(1), OLD).into(),
        accept(3, 202, to_app(2), OLD).into(),
        publish(1000),
        accept(4000, 203, to_app(3), OLD).into(),
        publish(4100),
        accept(5000, 301, to_app(11), NEW).into(),
        accept(5001, 302, to_app(12), NEW).into(),
        accept(5002, 303, to_app(13), NEW).into(),
        publish(5100),
        tick(6100),
    ]
}

// --- handovers --------------------------------------------------------------

restart_case!(
    the_published_status_carries_roles_and_generations,
    from = draining_after_handover(),
    [
        publish(6200),
        // Back-dated to NEW's first accept, not when it was declared.
        then(RExpect::Published(OLD, Role::Draining, 5000)),
        then(RExpect::Published(NEW, Role::Serving, 5100)),
        then(RExpect::PublishedGenerations(
            app(),
            vec![(OLD, Role::Draining), (NEW, Role::Serving)]
        )),
        close(7000, 201, to_app(1), OLD),
        close(7001, 202, to_app(2), OLD),
        close(7002, 203, to_app(3), OLD),
        publish(7100),
    ],
    [
        RExpect::Published(OLD, Role::Drained, 7100),
        RExpect::Published(NEW, Role::Serving, 5100),
        RExpect::PublishedGenerations(app(), vec![(OLD, Role::Drained), (NEW, Role::Serving)]),
    ]
);

restart_case!(
    a_handover_in_one_namespace_makes_the_quiet_old_process_draining,
    [
        listen_start(1, 100, app(), OLD),
        accept(2, 201, to_app(1), OLD),
        accept(3, 202, to_app(2), OLD),
        publish(1000),
        accept(4000, 203, to_app(3), OLD),
        publish(4100),
        accept(5000, 301, to_app(11), NEW),
        accept(5001, 302, to_app(12), NEW),
        accept(5002, 303, to_app(13), NEW),
        publish(5100),
        then(RExpect::Role(OLD, Role::Serving)),
        // Quiet for 1.9 s: not yet.
        tick(6000),
        then(RExpect::Role(OLD, Role::Serving)),
        tick(6100),
    ],
    [
        RExpect::Handovers(vec![(app(), NEW, vec![OLD])]),
        RExpect::RoleWhy(OLD, Role::Draining, Why::AnotherAccepts),
        RExpect::Drain(OLD, Some((3, 5000, None))),
        RExpect::Role(NEW, Role::Serving),
        RExpect::Changes(NEW, vec![]),
        RExpect::Generations(app(), vec![OLD, NEW]),
    ]
);

restart_case!(
    an_equal_address_in_another_namespace_is_no_handover,
    [
        listen_start(1, 100, app(), OLD),
        accept(2, 201, to_app(1), OLD),
        publish(1000),
        // Later, a server in another namespace on the same address.
        listen_start(2000, 110, app_in_ns2(), OTHER),
        publish(2500),
        accept(3000, 401, to_app_in_ns2(1), OTHER),
        accept(3001, 402, to_app_in_ns2(2), OTHER),
        accept(3002, 403, to_app_in_ns2(3), OTHER),
        publish(3500),
        tick(9000),
    ],
    [
        RExpect::Handovers(vec![]),
        RExpect::Role(OLD, Role::Serving),
        RExpect::Changes(OLD, vec![]),
        RExpect::Role(OTHER, Role::Serving),
        RExpect::Generations(app(), vec![OLD]),
        RExpect::Generations(app_in_ns2(), vec![OTHER]),
        RExpect::PublishedGenerations(app(), vec![(OLD, Role::Serving)]),
        RExpect::PublishedGenerations(app_in_ns2(), vec![(OTHER, Role::Serving)]),
    ]
);

restart_case!(
    a_handover_names_only_the_servers_of_its_own_namespace,
    [
        listen_start(1, 100, app(), OLD),
        listen_start(1, 110, app_in_ns2(), OTHER),
        accept(2, 201, to_app(1), OLD),
        accept(2, 401, to_app_in_ns2(1), OTHER),
        publish(1000),
        accept(5000, 301, to_app(11), NEW),
        accept(5001, 302, to_app(12), NEW),
        accept(5002, 303, to_app(13), NEW),
        publish(5100),
        tick(7000),
    ],
    [
        RExpect::Handovers(vec![(app(), NEW, vec![OLD])]),
        RExpect::Role(OLD, Role::Draining),
        RExpect::Role(OTHER, Role::Serving),
        RExpect::Changes(OTHER, vec![]),
    ]
);

restart_case!(
    a_handover_is_reported_once,
    [
        listen_start(1, 100, app(), OLD),
        accept(2, 201, to_app(1), OLD),
        publish(1000),
        accept(5000, 301, to_app(11), NEW),
        publish(5100),
        accept(6000, 302, to_app(12), NEW),
        accept(7000, 303, to_app(13), NEW),
    ],
    [RExpect::Handovers(vec![(app(), NEW, vec![OLD])])]
);

restart_case!(
    a_process_that_accepts_again_serves_again,
    from = draining_after_handover(),
    [accept(7000, 204, to_app(4), OLD), publish(7100),],
    [
        RExpect::RoleWhy(OLD, Role::Serving, Why::AcceptsAgain),
        RExpect::Drain(OLD, None),
        RExpect::Changes(
            OLD,
            vec![
                (Role::Draining, Why::AnotherAccepts),
                (Role::Serving, Why::AcceptsAgain),
            ]
        ),
    ]
);

// --- draining and drained ---------------------------------------------------

restart_case!(
    closing_its_listener_with_live_connections_is_draining_at_once,
    [
        listen_start(1, 100, app(), OLD),
        accept(2, 201, to_app(1), OLD),
        accept(3, 202, to_app(2), OLD),
        publish(1000),
        listen_stop(1500, 100, app(), OLD),
        publish(1600),
    ],
    [
        RExpect::RoleWhy(OLD, Role::Draining, Why::ClosedItsListener),
        RExpect::Drain(OLD, Some((2, 1600, None))),
    ]
);

restart_case!(
    reaching_zero_while_holding_the_listener_is_drained,
    from = draining_after_handover(),
    [
        close(7000, 201, to_app(1), OLD),
        close(7001, 202, to_app(2), OLD),
        close(7002, 203, to_app(3), OLD),
        publish(7100),
    ],
    [
        RExpect::RoleWhy(OLD, Role::Drained, Why::ReachedZero),
        // From 5 s (NEW's first accept), not 6.1 s (declared): 2.1 s.
        RExpect::DrainedAfter(OLD, 2100, 3),
        RExpect::Drain(OLD, Some((3, 5000, Some(7100)))),
        RExpect::Changes(
            OLD,
            vec![
                (Role::Draining, Why::AnotherAccepts),
                (Role::Drained, Why::ReachedZero),
            ]
        ),
    ]
);

restart_case!(
    letting_go_of_everything_while_running_is_drained,
    [
        listen_start(1, 100, app(), OLD),
        accept(2, 201, to_app(1), OLD),
        accept(3, 202, to_app(2), OLD),
        publish(1000),
        listen_stop(1500, 100, app(), OLD),
        publish(1600),
        close(2000, 201, to_app(1), OLD),
        close(2001, 202, to_app(2), OLD),
        // It holds nothing: it leaves the status, and may still run.
        publish(2100),
        then(RExpect::UncheckedGone(vec![OLD])),
        then(RExpect::Role(OLD, Role::Draining)),
        still_runs(OLD, 2150),
    ],
    [
        RExpect::UncheckedGone(vec![]),
        RExpect::RoleWhy(OLD, Role::Drained, Why::HoldsNothing),
        RExpect::DrainedAfter(OLD, 550, 2),
    ]
);

// nginx's old workers and HAProxy's old process: the last close and the
// exit come together, before anyone looked whether it still runs. The drain
// ended when it left the status, at zero; nothing was dropped.
restart_case!(
    exiting_right_after_the_last_close_completes_the_drain,
    [
        listen_start(1, 100, app(), OLD),
        accept(2, 201, to_app(1), OLD),
        accept(3, 202, to_app(2), OLD),
        publish(1000),
        listen_stop(1500, 100, app(), OLD),
        publish(1600),
        close(2000, 201, to_app(1), OLD),
        close(2001, 202, to_app(2), OLD),
        publish(2100),
        process_exit(2102, OLD),
    ],
    [
        RExpect::DrainedAfter(OLD, 500, 2),
        RExpect::Exited(OLD, 0, Role::Drained),
        RExpect::Changes(
            OLD,
            vec![
                (Role::Draining, Why::ClosedItsListener),
                (Role::Drained, Why::ReachedZero),
                (Role::Exited, Why::Exited),
            ]
        ),
    ]
);

restart_case!(
    exiting_while_draining_with_connections_is_no_completed_drain,
    [
        listen_start(1, 100, app(), OLD),
        accept(2, 201, to_app(1), OLD),
        publish(1000),
        listen_stop(1500, 100, app(), OLD),
        publish(1600),
        close_by_exit(2000, 201, to_app(1), OLD),
        process_exit(2000, OLD),
    ],
    [
        RExpect::Exited(OLD, 1, Role::Draining),
        RExpect::Changes(
            OLD,
            vec![
                (Role::Draining, Why::ClosedItsListener),
                (Role::Exited, Why::Exited),
            ]
        ),
    ]
);

restart_case!(
    a_serving_process_that_holds_nothing_and_runs_is_drained_without_a_drain,
    [
        listen_start(1, 100, app(), OLD),
        publish(1000),
        listen_stop(1500, 100, app(), OLD),
        publish(1600),
        still_runs(OLD, 1700),
    ],
    [
        RExpect::RoleWhy(OLD, Role::Drained, Why::HoldsNothing),
        RExpect::Drain(OLD, None),
        RExpect::Changes(OLD, vec![(Role::Drained, Why::HoldsNothing)]),
    ]
);

// --- exits ------------------------------------------------------------------

restart_case!(
    an_exit_after_draining_is_recorded_and_forgotten_later,
    from = draining_after_handover(),
    [
        close(7000, 201, to_app(1), OLD),
        close(7001, 202, to_app(2), OLD),
        close(7002, 203, to_app(3), OLD),
        publish(7100),
        process_exit(8000, OLD),
        tick(8000 + keep_gone_ms() - 1),
        then(RExpect::Role(OLD, Role::Exited)),
        tick(8000 + keep_gone_ms()),
    ],
    [
        RExpect::Exited(OLD, 0, Role::Drained),
        RExpect::Forgotten(OLD),
        RExpect::Generations(app(), vec![NEW]),
    ]
);

restart_case!(
    an_exit_holding_connections_counts_them,
    [
        listen_start(1, 100, app(), OLD),
        accept(2, 201, to_app(1), OLD),
        accept(3, 202, to_app(2), OLD),
        publish(1000),
        process_exit(2000, OLD),
    ],
    [
        RExpect::Exited(OLD, 2, Role::Serving),
        RExpect::Changes(OLD, vec![(Role::Exited, Why::Exited)]),
    ]
);

restart_case!(
    a_process_that_left_the_status_and_is_found_gone_exited,
    [
        listen_start(1, 100, app(), OLD),
        accept(2, 201, to_app(1), OLD),
        publish(1000),
        listen_stop(1500, 100, app(), OLD),
        close(1600, 201, to_app(1), OLD),
        publish(1700),
        found_gone(OLD, 1800),
    ],
    [
        RExpect::Exited(OLD, 0, Role::Serving),
        RExpect::UncheckedGone(vec![]),
    ]
);

restart_case!(
    a_recycled_pid_starts_serving_afresh,
    [
        listen_start(1, 100, app(), OLD),
        accept(2, 201, to_app(1), OLD),
        publish(1000),
        process_exit(2000, OLD),
        listen_start(3000, 101, app(), OLD),
        publish(3100),
    ],
    [RExpect::RoleWhy(OLD, Role::Serving, Why::Seen)]
);

// --- drains gracewatch runs ---------------------------------------------------

restart_case!(
    a_drain_run_here_is_draining_until_its_gate_says_drained,
    [
        listen_start(1, 100, app(), OLD),
        accept(2, 201, to_app(1), OLD),
        accept(3, 202, to_app(2), OLD),
        publish(1000),
        drain_note(OLD, DrainNote::Started, 1500),
        // Accepting does not end a drain someone runs.
        accept(2000, 203, to_app(3), OLD),
        publish(2100),
        then(RExpect::RoleWhy(OLD, Role::Draining, Why::DrainStarted)),
        drain_note(OLD, DrainNote::Drained, 2500),
    ],
    [
        RExpect::RoleWhy(OLD, Role::Drained, Why::DrainFinished),
        RExpect::Drain(OLD, Some((2, 1500, Some(2500)))),
        RExpect::DrainedAfter(OLD, 1000, 2),
    ]
);

restart_case!(
    a_cancelled_drain_serves_again,
    [
        listen_start(1, 100, app(), OLD),
        accept(2, 201, to_app(1), OLD),
        publish(1000),
        drain_note(OLD, DrainNote::Started, 1500),
        drain_note(OLD, DrainNote::Cancelled, 1600),
    ],
    [
        RExpect::RoleWhy(OLD, Role::Serving, Why::DrainCancelled),
        RExpect::Drain(OLD, None),
    ]
);

// --- rates --------------------------------------------------------------------

restart_case!(
    rates_count_accepts_and_closes_over_the_window,
    [
        listen_start(1, 100, app(), OLD),
        publish(1000),
        accept(1100, 201, to_app(1), OLD),
        accept(1200, 202, to_app(2), OLD),
        accept(1300, 203, to_app(3), OLD),
        accept(1400, 204, to_app(4), OLD),
        accept(1500, 205, to_app(5), OLD),
        publish(2000),
        close(2500, 201, to_app(1), OLD),
        close(2600, 202, to_app(2), OLD),
        publish(3000),
        then(RExpect::Rates(OLD, 3000, 2.5, 1.0)),
        tick(8000),
    ],
    [RExpect::Rates(OLD, 8000, 0.0, 0.0)]
);

/// A publication every 100 ms (samples merged) still counts every accept.
fn ten_accepts_published_every_100_ms() -> Vec<RStep> {
    let mut steps: Vec<RStep> = vec![listen_start(1, 100, app(), OLD).into(), publish(1000)];
    for k in 0..10u16 {
        let at = 1010 + 100 * u64::from(k);
        steps.push(accept(at, 200 + u64::from(k), to_app(k), OLD).into());
        steps.push(publish(at + 90));
    }
    steps
}

restart_case!(
    frequent_publications_keep_the_rates_exact,
    from = ten_accepts_published_every_100_ms(),
    [],
    [
        RExpect::Rates(OLD, 2000, 10.0, 0.0),
        RExpect::Rates(OLD, 3000, 5.0, 0.0),
    ]
);

// --- observed drains as records -----------------------------------------------

use crate::tracker::records::{DrainOutcome, RECORDS_KEPT, TIMELINE_KEPT};

restart_case!(
    a_handover_drain_is_recorded_from_the_first_accept_elsewhere,
    from = draining_after_handover(),
    [
        then(RExpect::Records(vec![(
            OLD,
            5000,
            Why::AnotherAccepts,
            3,
            DrainOutcome::Ongoing,
            None,
            0
        )])),
        close(7000, 201, to_app(1), OLD),
        close(7001, 202, to_app(2), OLD),
        close(7002, 203, to_app(3), OLD),
        publish(7100),
    ],
    [
        // Declared at 6.1 s, started at 5 s: 2.1 s, as the histogram has it.
        RExpect::Records(vec![(
            OLD,
            5000,
            Why::AnotherAccepts,
            3,
            DrainOutcome::Drained,
            Some(7100),
            0
        )]),
        RExpect::Timeline(
            OLD,
            vec![
                (5000, Role::Draining, Why::AnotherAccepts, 3),
                (7100, Role::Drained, Why::ReachedZero, 0),
            ]
        ),
        RExpect::DrainedAfter(OLD, 2100, 3),
    ]
);

restart_case!(
    a_handover_drain_counts_from_the_first_accept_elsewhere_after_its_own_last,
    [
        listen_start(1, 100, app(), OLD),
        accept(2, 201, to_app(1), OLD),
        accept(3, 202, to_app(2), OLD),
        publish(1000),
        accept(4000, 203, to_app(3), OLD),
        publish(4100),
        // NEW accepts once, then OLD again: OLD still served at 4.5 s.
        accept(4500, 301, to_app(11), NEW),
        publish(4550),
        accept(4600, 204, to_app(4), OLD),
        publish(4700),
        accept(5000, 302, to_app(12), NEW),
        accept(5001, 303, to_app(13), NEW),
        accept(5002, 304, to_app(14), NEW),
        publish(5100),
        tick(6600),
        then(RExpect::Role(OLD, Role::Serving)),
        tick(6700),
        publish(6800),
    ],
    [
        RExpect::RoleWhy(OLD, Role::Draining, Why::AnotherAccepts),
        RExpect::Published(OLD, Role::Draining, 5000),
        RExpect::Drain(OLD, Some((4, 5000, None))),
        RExpect::Records(vec![(
            OLD,
            5000,
            Why::AnotherAccepts,
            4,
            DrainOutcome::Ongoing,
            None,
            0
        )]),
    ]
);

restart_case!(
    a_drain_that_exits_holding_connections_is_recorded_as_dropping_them_and_outlives_the_process,
    from = draining_after_handover(),
    [
        close(7000, 201, to_app(1), OLD),
        publish(7100),
        process_exit(8000, OLD),
        tick(8000 + keep_gone_ms()),
    ],
    [
        RExpect::Forgotten(OLD),
        RExpect::Records(vec![(
            OLD,
            5000,
            Why::AnotherAccepts,
            3,
            DrainOutcome::Exited,
            Some(8000),
            2
        )]),
        RExpect::Timeline(
            OLD,
            vec![
                (5000, Role::Draining, Why::AnotherAccepts, 3),
                (8000, Role::Exited, Why::Exited, 2),
            ]
        ),
    ]
);

restart_case!(
    a_drained_process_that_exits_keeps_its_outcome_and_adds_the_exit,
    from = draining_after_handover(),
    [
        close(7000, 201, to_app(1), OLD),
        close(7001, 202, to_app(2), OLD),
        close(7002, 203, to_app(3), OLD),
        publish(7100),
        process_exit(8000, OLD),
        // The pid is reused: a new process, whose drain is a new record.
        listen_start(9000, 101, app(), OLD),
        accept(9001, 205, to_app(5), OLD),
        publish(9100),
        listen_stop(9500, 101, app(), OLD),
        publish(9600),
    ],
    [
        RExpect::Records(vec![
            (
                OLD,
                5000,
                Why::AnotherAccepts,
                3,
                DrainOutcome::Drained,
                Some(7100),
                0
            ),
            (
                OLD,
                9600,
                Why::ClosedItsListener,
                1,
                DrainOutcome::Ongoing,
                None,
                0
            ),
        ]),
        RExpect::Timeline(OLD, vec![(9600, Role::Draining, Why::ClosedItsListener, 1)]),
    ]
);

restart_case!(
    a_drain_that_accepts_again_is_recorded_as_cancelled,
    from = draining_after_handover(),
    [accept(7000, 204, to_app(4), OLD), publish(7100)],
    [RExpect::Records(vec![(
        OLD,
        5000,
        Why::AnotherAccepts,
        3,
        DrainOutcome::Cancelled,
        Some(7100),
        0
    )])]
);

restart_case!(
    drains_run_here_are_recorded_from_their_start,
    [
        listen_start(1, 100, app(), OLD),
        accept(2, 201, to_app(1), OLD),
        accept(3, 202, to_app(2), OLD),
        publish(1000),
        drain_note(OLD, DrainNote::Started, 1500),
        drain_note(OLD, DrainNote::Cancelled, 1600),
        drain_note(OLD, DrainNote::Started, 2000),
        drain_note(OLD, DrainNote::Drained, 2500),
    ],
    [RExpect::Records(vec![
        (
            OLD,
            1500,
            Why::DrainStarted,
            2,
            DrainOutcome::Cancelled,
            Some(1600),
            0
        ),
        (
            OLD,
            2000,
            Why::DrainStarted,
            2,
            DrainOutcome::Drained,
            Some(2500),
            0
        ),
    ])]
);

restart_case!(
    a_process_forgotten_while_draining_ends_its_record_unknown,
    [
        listen_start(1, 100, app(), OLD),
        accept(2, 201, to_app(1), OLD),
        publish(1000),
        listen_stop(1500, 100, app(), OLD),
        publish(1600),
        // It leaves the status; whether it still runs is never learned.
        close(1700, 201, to_app(1), OLD),
        publish(1800),
        tick(1800 + keep_gone_ms()),
    ],
    [
        RExpect::Forgotten(OLD),
        RExpect::Records(vec![(
            OLD,
            1600,
            Why::ClosedItsListener,
            1,
            DrainOutcome::Unknown,
            Some(1800),
            0
        )]),
    ]
);

/// `n` drains started and cancelled on OLD, 10 ms apart.
fn drains_started_and_cancelled(n: u64) -> Vec<RStep> {
    let mut steps = vec![
        listen_start(1, 100, app(), OLD).into(),
        accept(2, 201, to_app(1), OLD).into(),
        publish(1000),
    ];
    for i in 0..n {
        steps.push(drain_note(OLD, DrainNote::Started, 2000 + i * 10));
        steps.push(drain_note(OLD, DrainNote::Cancelled, 2005 + i * 10));
    }
    steps
}

#[test]
fn records_are_bounded_and_the_oldest_go_first() {
    let n = RECORDS_KEPT as u64 + 10;
    let steps = drains_started_and_cancelled(n);
    let mut want: Vec<RecordWant> = (10..n)
        .map(|i| {
            (
                OLD,
                2000 + i * 10,
                Why::DrainStarted,
                1,
                DrainOutcome::Cancelled,
                Some(2005 + i * 10),
                0,
            )
        })
        .collect();
    run_restart_case(
        "records_are_bounded",
        &steps,
        &[RExpect::Records(std::mem::take(&mut want))],
    );
}

#[test]
fn a_timeline_is_bounded_and_keeps_its_start() {
    let mut steps = drains_started_and_cancelled(0);
    // A drain started again and again while it runs: one record.
    for i in 0..TIMELINE_KEPT as u64 + 5 {
        steps.push(drain_note(OLD, DrainNote::Started, 2000 + i));
    }
    let mut want = vec![(2000, Role::Draining, Why::DrainStarted, 1)];
    want.extend(
        (6..TIMELINE_KEPT as u64 + 5).map(|i| (2000 + i, Role::Draining, Why::DrainStarted, 1)),
    );
    assert_eq!(want.len(), TIMELINE_KEPT);
    run_restart_case(
        "a_timeline_is_bounded",
        &steps,
        &[
            RExpect::Timeline(OLD, want),
            RExpect::Records(vec![(
                OLD,
                2000,
                Why::DrainStarted,
                1,
                DrainOutcome::Ongoing,
                None,
                0,
            )]),
        ],
    );
}
