//! Snapshot merges: pre-existing connections, holders, listeners learned
//! before or after the snapshot, dedupe with events, rescans, comm.

use super::kit::*;

// Startup snapshot: pre-existing connections, charged to their first holder.
case!(
    startup_snapshot_charges_preexisting_connections_to_the_first_holder,
    [snapshot(
        1_000,
        vec![snap_listener(wildcard_v4(), 7, 0, &[10, 11])],
        vec![
            snap_conn(conn_v4(1), 71, ESTABLISHED, &[11]),
            snap_conn(conn_v4(2), 72, CLOSE_WAIT, &[11, 12])
        ],
        vec![(conn_v4(1), 11), (conn_v4(2), 11)],
    )],
    [
        Expect::Processes(vec![10, 11, 12]),
        Expect::Live(11, 2),
        Expect::Live(12, 1),
        Expect::Comm(11, "s11"),
        Expect::Oldest(11, Some(99_000)),
        Expect::Connections(
            11,
            vec![
                (conn_v4(1), true, Some(wildcard_v4())),
                (conn_v4(2), true, Some(wildcard_v4()))
            ],
        ),
        Expect::ConnectionSince(11, conn_v4(1), 1_000),
        Expect::Holders(wildcard_v4(), vec![(10, 0), (11, 2)]),
        Expect::ProcListeners(12, vec![]),
        Expect::Totals(11, 0, 0),
    ]
);

// Dual-stack: a plain IPv4 tuple from the snapshot on the IPv6 wildcard listener.
case!(
    dual_stack_snapshot_ipv4_tuple_on_the_ipv6_wildcard_listener,
    [snapshot(
        1,
        vec![snap_listener(wildcard_v6(), 7, 0, &[10])],
        vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[10])],
        vec![(conn_v4(1), 10)],
    )],
    [
        Expect::Family(wildcard_v6(), "ipv6"),
        Expect::Holders(wildcard_v6(), vec![(10, 1)]),
        Expect::Connections(10, vec![(conn_v4(1), true, Some(wildcard_v6()))]),
    ]
);

case!(
    a_close_wait_connection_in_the_snapshot_is_live,
    [snapshot(
        1,
        vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
        vec![snap_conn(conn_v4(1), 71, CLOSE_WAIT, &[10])],
        vec![(conn_v4(1), 10)],
    )],
    [Expect::Live(10, 1)]
);

case!(
    snapshot_holders_replace_older_listener_holders,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 11),
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[20])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[11])],
            vec![],
        ),
    ],
    [
        Expect::Holders(wildcard_v4(), vec![(20, 0)]),
        Expect::Processes(vec![11, 20]),
        Expect::ProcListeners(11, vec![]),
    ]
);

case!(
    snapshot_holders_add_to_listener_holders_the_named_socket_keeps_its_sk,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10, 20])],
            vec![],
            vec![]
        ),
        listen_stop(6, 100, wildcard_v4(), 20),
    ],
    [Expect::Listeners(vec![]), Expect::Processes(vec![])]
);

case!(
    holders_learned_after_the_snapshot_survive_it,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(9, 200, conn_v4(1), 30),
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![],
            vec![]
        ),
    ],
    [Expect::Holders(wildcard_v4(), vec![(10, 0), (30, 1)])]
);

case!(
    a_listener_learned_after_the_snapshot_survives_it,
    [
        listen_start(6, 100, wildcard_v4(), 10),
        snapshot(5, vec![], vec![], vec![])
    ],
    [
        Expect::Listeners(vec![(NS, "0.0.0.0:80")]),
        Expect::Holders(wildcard_v4(), vec![(10, 0)]),
    ]
);

case!(
    a_listener_learned_before_the_snapshot_and_absent_from_it_is_gone,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        snapshot(5, vec![], vec![], vec![])
    ],
    [Expect::Listeners(vec![]), Expect::Processes(vec![])]
);

case!(
    a_listener_closed_after_the_snapshot_is_not_brought_back,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        listen_stop(6, 100, wildcard_v4(), 10),
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![],
            vec![]
        ),
    ],
    [Expect::Listeners(vec![]), Expect::Processes(vec![])]
);

case!(
    a_listener_started_and_closed_after_the_snapshot_does_not_hide_another,
    [
        listen_start(6, 100, wildcard_v4(), 20),
        listen_stop(7, 100, wildcard_v4(), 20),
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![],
            vec![]
        ),
    ],
    [
        Expect::Listeners(vec![(NS, "0.0.0.0:80")]),
        Expect::Holders(wildcard_v4(), vec![(10, 0)]),
    ]
);

// Startup order: a ListenStart older than the merged snapshot names its socket.
case!(
    startup_order_older_listen_start_names_the_snapshot_socket,
    [
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![],
            vec![]
        ),
        listen_start(1, 100, wildcard_v4(), 10),
    ],
    [
        Expect::Listeners(vec![(NS, "0.0.0.0:80")]),
        Expect::Holders(wildcard_v4(), vec![(10, 0)]),
    ]
);

// Startup order: the ListenStop of a socket named that way removes the listener.
case!(
    startup_order_then_its_listen_stop_removes_the_listener,
    [
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![],
            vec![]
        ),
        listen_start(1, 100, wildcard_v4(), 10),
        listen_stop(8, 100, wildcard_v4(), 10),
    ],
    [Expect::Listeners(vec![])]
);

// A ListenStop older than the snapshot for an unknown socket is ignored.
case!(
    listen_stop_older_than_the_snapshot_for_an_unknown_socket_is_ignored,
    [
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![],
            vec![]
        ),
        listen_stop(3, 999, wildcard_v4(), 10),
    ],
    [Expect::Listeners(vec![(NS, "0.0.0.0:80")])]
);

// A ListenStop newer than the snapshot closes a socket only the snapshot knew.
case!(
    listen_stop_newer_than_the_snapshot_closes_a_snapshot_only_socket,
    [
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![],
            vec![]
        ),
        listen_stop(8, 999, wildcard_v4(), 10),
    ],
    [Expect::Listeners(vec![])]
);

case!(
    two_snapshot_sockets_on_one_address_the_closers_goes,
    [
        snapshot(
            5,
            vec![
                snap_listener(wildcard_v4(), 7, 0, &[10]),
                snap_listener(wildcard_v4(), 8, 0, &[20])
            ],
            vec![],
            vec![],
        ),
        listen_stop(8, 999, wildcard_v4(), 10),
    ],
    [Expect::Holders(wildcard_v4(), vec![(20, 0)])]
);

// Dedupe, events first: an accepted connection in the snapshot is not added again.
case!(
    dedupe_events_first_snapshot_does_not_add_an_accepted_connection,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[10])],
            vec![],
        ),
    ],
    [
        Expect::Live(10, 1),
        Expect::Totals(10, 1, 0),
        Expect::Connections(10, vec![(conn_v4(1), false, Some(wildcard_v4()))]),
        Expect::ConnectionSince(10, conn_v4(1), 2),
    ]
);

case!(
    dedupe_snapshot_first_the_older_accept_replaces_the_pre_existing_entry,
    [
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[10])],
            vec![(conn_v4(1), 10)],
        ),
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
    ],
    [
        Expect::Live(10, 1),
        Expect::Totals(10, 1, 0),
        Expect::Connections(10, vec![(conn_v4(1), false, Some(wildcard_v4()))]),
        Expect::ConnectionSince(10, conn_v4(1), 2),
    ]
);

case!(
    dedupe_snapshot_first_its_close_then_ends_it,
    [
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[10])],
            vec![(conn_v4(1), 10)],
        ),
        accept(2, 200, conn_v4(1), 10),
        close(9, 200, conn_v4(1), 10),
    ],
    [Expect::Live(10, 0)]
);

case!(
    the_snapshot_shares_an_accepted_connection_with_a_second_holder,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10, 20])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[10, 20])],
            vec![],
        ),
    ],
    [
        Expect::Live(10, 1),
        Expect::Live(20, 1),
        Expect::ConnectionHolders(10, conn_v4(1), vec![10, 20]),
        Expect::Holders(wildcard_v4(), vec![(10, 1), (20, 1)]),
    ]
);

case!(
    snapshot_holders_win_over_an_older_accept_in_either_order,
    [
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10, 20])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[20])],
            vec![(conn_v4(1), 20)],
        ),
        accept(2, 200, conn_v4(1), 10),
    ],
    [
        Expect::Live(10, 0),
        Expect::Live(20, 1),
        Expect::ConnectionHolders(20, conn_v4(1), vec![20]),
        Expect::Totals(10, 1, 0),
    ]
);

case!(
    a_rescan_repairs_a_pre_existing_connection_that_ended_unseen,
    [
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![
                snap_conn(conn_v4(1), 71, ESTABLISHED, &[10]),
                snap_conn(conn_v4(2), 72, ESTABLISHED, &[10])
            ],
            vec![(conn_v4(1), 10), (conn_v4(2), 10)],
        ),
        snapshot(
            50,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(2), 72, ESTABLISHED, &[10])],
            vec![],
        ),
    ],
    [
        Expect::Live(10, 1),
        Expect::Connections(10, vec![(conn_v4(2), true, Some(wildcard_v4()))]),
        Expect::Oldest(10, Some(100_000 - 5)),
    ]
);

case!(
    a_rescan_keeps_a_pre_existing_connection_whose_listener_it_cannot_see,
    [
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[10])],
            vec![(conn_v4(1), 10)],
        ),
        snapshot(50, vec![], vec![], vec![]),
    ],
    [
        Expect::Live(10, 1),
        Expect::Listeners(vec![]),
        Expect::Connections(10, vec![(conn_v4(1), true, None)]),
    ]
);

case!(
    a_rescan_adds_a_connection_whose_accept_was_lost,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        snapshot(
            50,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[10])],
            vec![(conn_v4(1), 10)],
        ),
    ],
    [Expect::Live(10, 1)]
);

case!(
    the_same_snapshot_twice_adds_nothing_the_second_time,
    [
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[10])],
            vec![(conn_v4(1), 10)],
        ),
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[10])],
            vec![],
        ),
    ],
    [
        Expect::Live(10, 1),
        Expect::Holders(wildcard_v4(), vec![(10, 1)])
    ]
);

case!(
    a_connection_closed_after_the_snapshot_is_not_brought_back,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        close(7, 200, conn_v4(1), 10),
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[10])],
            vec![],
        ),
    ],
    [Expect::Live(10, 0)]
);

case!(
    a_connection_accepted_after_the_snapshot_keeps_the_events_view,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(7, 200, conn_v4(1), 10),
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10, 20])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[20])],
            vec![],
        ),
    ],
    [
        Expect::Live(10, 1),
        Expect::Live(20, 0),
        Expect::ConnectionSince(10, conn_v4(1), 7),
    ]
);

case!(
    a_holder_that_exited_after_the_snapshot_is_not_brought_back,
    [
        process_exit(7, 20),
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10, 20])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[20])],
            vec![],
        ),
    ],
    [
        Expect::Processes(vec![10]),
        Expect::Holders(wildcard_v4(), vec![(10, 0)])
    ]
);

// PreexistingClose ends it and counts for each holder.
case!(
    preexisting_close_ends_it_and_counts_for_each_holder,
    [
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[10, 20])],
            vec![(conn_v4(1), 10)],
        ),
        preexisting_close(9, conn_v4(1), 10),
    ],
    [
        Expect::Live(10, 0),
        Expect::Totals(10, 0, 1),
        Expect::Processes(vec![10]),
    ]
);

// PreexistingClose for an accepted connection is ignored.
case!(
    preexisting_close_for_an_accepted_connection_is_ignored,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        preexisting_close(9, conn_v4(1), 10),
    ],
    [Expect::Live(10, 1)]
);

// PreexistingClose for an unknown tuple is ignored.
case!(
    preexisting_close_for_an_unknown_tuple_is_ignored,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        preexisting_close(9, conn_v4(1), 10)
    ],
    [Expect::Live(10, 0), Expect::Totals(10, 0, 0)]
);

case!(
    forget_connection_removes_a_pre_existing_connection,
    [
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[10])],
            vec![(conn_v4(1), 10)],
        ),
        forget(conn_v4(1)),
        forget(conn_v4(2)),
    ],
    [
        Expect::Live(10, 0),
        Expect::Totals(10, 0, 0),
        Expect::Processes(vec![10]),
    ]
);

// Comm: the snapshot is newer than the ListenStart.
case!(
    comm_from_a_snapshot_newer_than_the_listen_start,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![],
            vec![]
        ),
    ],
    [Expect::Comm(10, "s10")]
);

case!(
    comm_an_event_newer_than_the_snapshot,
    [
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![],
            vec![]
        ),
        accept(6, 200, conn_v4(1), 10),
    ],
    [Expect::Comm(10, "e10")]
);
