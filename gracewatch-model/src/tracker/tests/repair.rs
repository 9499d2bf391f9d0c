//! Lost events and repair: rescans that retire connections whose end went
//! unseen, the lost-event total, and the bounded tombstones.

use super::kit::*;

// After lost events a rescan drops a reported connection it no longer shows.
case!(
    rescan_after_lost_events_drops_a_connection_it_no_longer_shows,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        accept(3, 201, conn_v4(2), 10),
        lost_events(4, 1),
        // conn_v4(1)'s Close was among the lost: the snapshot only shows conn_v4(2).
        snapshot(
            10,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(2), 72, ESTABLISHED, &[10])],
            vec![],
        ),
    ],
    [
        Expect::Live(10, 1),
        Expect::Connections(10, vec![(conn_v4(2), false, Some(wildcard_v4()))]),
    ]
);

// Without lost events too, a rescan retires a reported connection it no longer shows (a reset that
// raced its accept).
case!(
    rescan_retires_a_connection_it_no_longer_shows_without_lost_events,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        accept(3, 201, conn_v4(2), 10),
        snapshot(
            10,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(2), 72, ESTABLISHED, &[10])],
            vec![],
        ),
    ],
    [
        Expect::Live(10, 1),
        Expect::Connections(10, vec![(conn_v4(2), false, Some(wildcard_v4()))]),
        Expect::Retired(vec![(200, 2)]),
    ]
);

// A rescan that could not read the holder's fds retires none of its connections.
case!(
    rescan_blind_to_a_holders_fds_retires_none_of_its_connections,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        // The listener is in the dump, but pid 10's fd table was
        // unreadable: no holder, no connection.
        snapshot(
            10,
            vec![snap_listener(wildcard_v4(), 7, 0, &[])],
            vec![],
            vec![]
        ),
    ],
    [
        Expect::Connections(10, vec![(conn_v4(1), false, Some(wildcard_v4()))]),
        Expect::Retired(vec![]),
    ]
);

case!(
    a_connection_accepted_during_or_after_the_snapshot_survives_it,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(10, 200, conn_v4(1), 10),
        accept(12, 201, conn_v4(2), 10),
        snapshot(
            10,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![],
            vec![]
        ),
    ],
    [Expect::Live(10, 2), Expect::Retired(vec![])]
);

case!(
    lost_events_the_latest_total,
    [lost_events(1, 3), lost_events(2, 7)],
    [Expect::Lost(7)]
);

#[test]
fn tombstones_are_bounded_and_pruned() {
    let mut t = Tracker::new();
    for i in 0..(1u64 << 16) + 100 {
        let tuple = tuple(
            "10.0.0.1:80",
            &format!("192.0.2.{}:{}", i / 60_000, 1 + i % 60_000),
        );
        t.apply(&ConnEvent::Accept {
            at: ms(i),
            sk: i,
            tuple,
            pid: 10,
            comm: String::new(),
            was_queued: false,
        });
        t.apply(&ConnEvent::Close {
            at: ms(i),
            sk: i,
            tuple,
            pid: 10,
            by_exit: false,
        });
    }
    assert_eq!(t.closed.len(), 1 << 16);
    t.merge_snapshot(&Snapshot {
        at: ms(1 << 16),
        ..Snapshot::default()
    });
    assert_eq!(t.closed.len(), 100);
}
