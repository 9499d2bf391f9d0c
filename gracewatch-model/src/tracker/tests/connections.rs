//! Connections: accept and close, the accept queue, listener matching
//! (specificity, IPv6, dual stack) and the per-process queries.

use super::kit::*;

// --- accept and close ---

case!(
    handshakes_queue_on_the_listener,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        handshake(2, 200, conn_v4(1)),
        handshake(2, 201, conn_v4(2)),
    ],
    [Expect::Queue(wildcard_v4(), 2), Expect::Live(10, 0)]
);

case!(
    a_queued_accept_leaves_the_queue_and_goes_live,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        handshake(2, 200, conn_v4(1)),
        handshake(2, 201, conn_v4(2)),
        accept_queued(3, 200, conn_v4(1), 10),
    ],
    [
        Expect::Queue(wildcard_v4(), 1),
        Expect::Live(10, 1),
        Expect::Totals(10, 1, 0),
        Expect::ListenerTotals(wildcard_v4(), 1, 0),
        Expect::Holders(wildcard_v4(), vec![(10, 1)]),
        Expect::Connections(10, vec![(conn_v4(1), false, Some(wildcard_v4()))]),
        Expect::ConnectionSince(10, conn_v4(1), 3),
    ]
);

// Processes that accept without listening become holders (prefork workers).
case!(
    prefork_workers_that_accept_without_listening_become_holders,
    [
        listen_start(1, 100, wildcard_v4(), 1),
        accept(2, 200, conn_v4(1), 11),
        accept(3, 201, conn_v4(2), 12),
    ],
    [
        Expect::Processes(vec![1, 11, 12]),
        Expect::Holders(wildcard_v4(), vec![(1, 0), (11, 1), (12, 1)]),
        Expect::ProcListeners(11, vec!["0.0.0.0:80"]),
        Expect::Totals(11, 1, 0),
        Expect::Totals(1, 0, 0),
        Expect::ListenerTotals(wildcard_v4(), 2, 0),
    ]
);

case!(
    close_ends_the_connection,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        close(5, 200, conn_v4(1), 10),
    ],
    [
        Expect::Processes(vec![10]),
        Expect::Live(10, 0),
        Expect::Totals(10, 1, 1),
        Expect::Oldest(10, None),
        Expect::Holders(wildcard_v4(), vec![(10, 0)]),
        Expect::Connections(10, vec![]),
    ]
);

case!(
    close_with_an_unknown_sk_falls_back_to_the_tuple,
    [
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[10])],
            vec![(conn_v4(1), 10)],
        ),
        close(10, 999, conn_v4(1), 10),
    ],
    [Expect::Live(10, 0), Expect::Totals(10, 0, 1)]
);

case!(
    close_of_a_connection_never_seen_is_ignored,
    [close(5, 999, conn_v4(1), 77)],
    [Expect::Processes(vec![]), Expect::Listeners(vec![])]
);

case!(
    close_older_than_the_connection_with_that_tuple_is_ignored,
    [
        snapshot(
            10,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[10])],
            vec![(conn_v4(1), 10)],
        ),
        close(5, 999, conn_v4(1), 10),
    ],
    [Expect::Live(10, 1)]
);

case!(
    a_duplicate_accept_is_counted_once,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        accept(2, 200, conn_v4(1), 10),
    ],
    [
        Expect::Live(10, 1),
        Expect::Totals(10, 1, 0),
        Expect::ListenerTotals(wildcard_v4(), 1, 0),
    ]
);

case!(
    an_sk_reused_by_a_new_connection_replaces_the_stale_one,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        accept(5, 200, conn_v4(2), 10),
    ],
    [
        Expect::Live(10, 1),
        Expect::Connections(10, vec![(conn_v4(2), false, Some(wildcard_v4()))]),
        Expect::Totals(10, 2, 0),
    ]
);

case!(
    a_tuple_reused_with_a_new_sk_replaces_the_stale_one,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        accept(5, 201, conn_v4(1), 10),
        // The old socket's end, delivered late (another CPU).
        close(4, 200, conn_v4(1), 10),
    ],
    [
        Expect::Live(10, 1),
        Expect::ConnectionSince(10, conn_v4(1), 5)
    ]
);

case!(
    accept_with_no_known_listener_still_counts,
    [accept(2, 200, conn_v4(1), 10)],
    [
        Expect::Processes(vec![10]),
        Expect::Live(10, 1),
        Expect::Listeners(vec![]),
        Expect::ProcListeners(10, vec![]),
        Expect::Connections(10, vec![(conn_v4(1), false, None)]),
    ]
);

case!(
    the_most_specific_listener_wins,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        listen_start(1, 101, specific_v4(), 20),
        listen_start(1, 102, wildcard_v6(), 30),
        accept(2, 200, conn_v4(1), 20),
        accept(2, 201, tuple("10.0.0.2:80", "192.0.2.1:40002"), 10),
    ],
    [
        Expect::Holders(specific_v4(), vec![(20, 1)]),
        Expect::Holders(wildcard_v4(), vec![(10, 1)]),
        Expect::Holders(wildcard_v6(), vec![(30, 0)]),
    ]
);

case!(
    an_ipv4_wildcard_beats_the_dual_stack_ipv6_wildcard,
    [
        listen_start(1, 100, wildcard_v6(), 30),
        listen_start(1, 101, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
    ],
    [
        Expect::Holders(wildcard_v4(), vec![(10, 1)]),
        Expect::Holders(wildcard_v6(), vec![(30, 0)]),
    ]
);

case!(
    ipv6_end_to_end,
    [
        listen_start(1, 100, specific_v6(), 10),
        handshake(2, 200, conn_v6()),
        accept_queued(3, 200, conn_v6(), 10),
    ],
    [
        Expect::Listeners(vec![(NS, "[2001:db8::1]:443")]),
        Expect::Family(specific_v6(), "ipv6"),
        Expect::Queue(specific_v6(), 0),
        Expect::Holders(specific_v6(), vec![(10, 1)]),
        Expect::Connections(10, vec![(conn_v6(), false, Some(specific_v6()))]),
    ]
);

case!(
    ipv6_close,
    [
        listen_start(1, 100, specific_v6(), 10),
        accept(3, 200, conn_v6(), 10),
        close(4, 200, conn_v6(), 10),
    ],
    [
        Expect::Live(10, 0),
        Expect::Holders(specific_v6(), vec![(10, 0)])
    ]
);

case!(
    dual_stack_an_ipv4_mapped_accept_on_the_ipv6_wildcard_listener,
    [
        listen_start(1, 100, wildcard_v6(), 10),
        accept(2, 200, conn_v4_mapped(), 10)
    ],
    [
        Expect::Family(wildcard_v6(), "ipv6"),
        Expect::Holders(wildcard_v6(), vec![(10, 1)]),
        Expect::Connections(10, vec![(conn_v4_mapped(), false, Some(wildcard_v6()))]),
    ]
);

case!(
    close_wait_has_no_event_only_close_ends_a_connection,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10)
    ],
    [Expect::Live(10, 1), Expect::Oldest(10, Some(100_000 - 2))]
);

case!(
    oldest_live_ms_follows_the_oldest_live_connection,
    [
        accept(1_000, 200, conn_v4(1), 10),
        accept(3_000, 201, conn_v4(2), 10),
        close(4_000, 200, conn_v4(1), 10),
    ],
    [Expect::Oldest(10, Some(100_000 - 3_000))]
);

case!(
    oldest_live_ms_never_goes_negative,
    now = 1_000,
    [accept(5_000, 200, conn_v4(1), 10)],
    [Expect::Oldest(10, Some(0)), Expect::Uptime(1_000)]
);

// --- accept queue ---

case!(
    a_queue_drop_leaves_the_queue_and_counts,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        handshake(2, 200, conn_v4(1)),
        handshake(2, 201, conn_v4(2)),
        queue_drop(3, 200, conn_v4(1)),
    ],
    [
        Expect::Queue(wildcard_v4(), 1),
        Expect::ListenerTotals(wildcard_v4(), 0, 1)
    ]
);

case!(
    queue_drops_saturate_at_zero,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        queue_drop(3, 200, conn_v4(1)),
        queue_drop(3, 201, conn_v4(2)),
    ],
    [
        Expect::Queue(wildcard_v4(), 0),
        Expect::ListenerTotals(wildcard_v4(), 0, 2)
    ]
);

case!(
    a_handshake_no_listener_matches_is_kept_aside,
    [handshake(2, 200, conn_v4(1)), handshake(2, 201, conn_v4(2))],
    [
        Expect::Listeners(vec![]),
        Expect::Unmatched(2),
        Expect::Processes(vec![]),
    ]
);

case!(
    unmatched_queue_drains_by_drop_and_by_accept,
    [
        handshake(2, 200, conn_v4(1)),
        handshake(2, 201, conn_v4(2)),
        queue_drop(3, 200, conn_v4(1)),
        accept_queued(4, 201, conn_v4(2), 10),
        queue_drop(5, 202, conn_v4(3)),
    ],
    [Expect::Unmatched(0), Expect::Live(10, 1)]
);

// A closing listener hands its queue to the unmatched count until the drops arrive.
case!(
    closing_listener_hands_its_queue_to_the_unmatched_count,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        handshake(2, 200, conn_v4(1)),
        handshake(2, 201, conn_v4(2)),
        listen_stop(3, 100, wildcard_v4(), 10),
    ],
    [Expect::Listeners(vec![]), Expect::Unmatched(2)]
);

// After a listener closed with a queue, the drops take it back from the unmatched count.
case!(
    drops_after_the_listener_closed_take_its_queue_back,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        handshake(2, 200, conn_v4(1)),
        handshake(2, 201, conn_v4(2)),
        listen_stop(3, 100, wildcard_v4(), 10),
        queue_drop(3, 200, conn_v4(1)),
        queue_drop(3, 201, conn_v4(2)),
    ],
    [Expect::Unmatched(0)]
);

// The snapshot's queue beyond the counted one is a pre-existing remainder.
case!(
    snapshot_queue_beyond_the_counted_one_is_a_remainder,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        handshake(2, 200, conn_v4(1)),
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 3, &[10])],
            vec![],
            vec![]
        ),
    ],
    [Expect::Queue(wildcard_v4(), 3)]
);

// An unqueued accept takes from the remainder, a queued one from the count.
case!(
    unqueued_accept_takes_from_the_remainder_queued_from_the_count,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        handshake(2, 200, conn_v4(1)),
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 3, &[10])],
            vec![],
            vec![]
        ),
        accept(6, 300, conn_v4(2), 10),
        accept(6, 301, conn_v4(3), 10),
        accept(6, 302, conn_v4(4), 10),
        accept_queued(7, 200, conn_v4(1), 10),
    ],
    [Expect::Queue(wildcard_v4(), 0), Expect::Live(10, 4)]
);

case!(
    a_snapshot_with_a_smaller_queue_leaves_no_remainder,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        handshake(2, 200, conn_v4(1)),
        handshake(2, 201, conn_v4(2)),
        snapshot(
            5,
            vec![snap_listener(wildcard_v4(), 7, 1, &[10])],
            vec![],
            vec![]
        ),
    ],
    [Expect::Queue(wildcard_v4(), 2)]
);

// --- queries ---

case!(
    connections_of_is_oldest_first_live_of_filters_by_port,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        listen_start(1, 101, listen_addr("0.0.0.0:443"), 10),
        accept(3, 200, conn_v4_port(80, 1), 10),
        accept(1, 201, conn_v4_port(443, 2), 10),
        accept(2, 202, conn_v4_port(80, 3), 10),
        accept(2, 203, conn_v4_port(80, 4), 20),
    ],
    [
        Expect::Connections(
            10,
            vec![
                (
                    conn_v4_port(443, 2),
                    false,
                    Some(listen_addr("0.0.0.0:443"))
                ),
                (conn_v4_port(80, 3), false, Some(wildcard_v4())),
                (conn_v4_port(80, 1), false, Some(wildcard_v4())),
            ],
        ),
        Expect::LiveOf(10, vec![], 3),
        Expect::LiveOf(10, vec![443], 1),
        Expect::LiveOf(10, vec![80, 443], 3),
        Expect::LiveOf(10, vec![8080], 0),
        Expect::LiveOf(99, vec![], 0),
        Expect::LiveOf(20, vec![80], 1),
        Expect::Uptime(100_000),
    ]
);

#[test]
fn connection_lists_for_several_pids_count_each_connection_once() {
    // Pid 10 accepted three connections on port 80 and one on port 81; the
    // oldest on port 80 is shared with pid 11 (fork); pid 12 holds one.
    let t = run_steps(
        "lists",
        &[
            listen_start(1, 100, wildcard_v4(), 10),
            accept(2, 200, conn_v4(1), 10),
            accept(3, 201, conn_v4(2), 10),
            accept(4, 202, conn_v4_port(81, 3), 10),
            accept(5, 203, conn_v4(4), 12),
            accept(6, 204, conn_v4(5), 10),
            snapshot(
                7,
                vec![snap_listener(wildcard_v4(), 7, 0, &[10, 11, 12])],
                vec![
                    snap_conn(conn_v4(1), 71, ESTABLISHED, &[10, 11]),
                    snap_conn(conn_v4(2), 72, ESTABLISHED, &[10]),
                    snap_conn(conn_v4_port(81, 3), 73, ESTABLISHED, &[10]),
                    snap_conn(conn_v4(4), 74, ESTABLISHED, &[12]),
                    snap_conn(conn_v4(5), 75, ESTABLISHED, &[10]),
                ],
                vec![],
            ),
        ],
    );
    let tuples = |v: &[ConnInfo]| v.iter().map(|c| c.tuple).collect::<Vec<_>>();
    // The shared one appears once, oldest first.
    assert_eq!(
        tuples(&t.connections_of_any(&[11, 10])),
        vec![conn_v4(1), conn_v4(2), conn_v4_port(81, 3), conn_v4(5)]
    );
    assert_eq!(t.connections_of(11).len(), 1);
    // Count of all, only the k oldest listed, in order.
    let (n, oldest) = t.oldest_of(&[10, 11, 12], &[], 2);
    assert_eq!((n, tuples(&oldest)), (5, vec![conn_v4(1), conn_v4(2)]));
    assert_eq!(oldest[0].holders, vec![10, 11]);
    // Restricted to ports.
    let (n, oldest) = t.oldest_of(&[10], &[81], 10);
    assert_eq!((n, tuples(&oldest)), (1, vec![conn_v4_port(81, 3)]));
    let (n, oldest) = t.oldest_of(&[10, 12], &[80], 3);
    assert_eq!(
        (n, tuples(&oldest)),
        (4, vec![conn_v4(1), conn_v4(2), conn_v4(4)])
    );
    // k = 0: the count alone; nobody's: nothing.
    assert_eq!(t.oldest_of(&[10], &[], 0), (4, vec![]));
    assert_eq!(t.oldest_of(&[99], &[], 5), (0, vec![]));
    // The list and the count agree with the full listing.
    let all = t.connections_of_any(&[10, 11, 12]);
    let (n, oldest) = t.oldest_of(&[10, 11, 12], &[], usize::MAX);
    assert_eq!((n as usize, &oldest), (all.len(), &all));
}
