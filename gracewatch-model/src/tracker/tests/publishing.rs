//! What the status shows at once: the empty tracker, untracked episodes
//! (map full) and the changes flagged as significant.

use super::kit::*;

#[test]
fn empty_tracker() {
    let st = Tracker::new().status(ms(1234));
    assert_eq!(
        st,
        Status {
            schema: STATUS_SCHEMA.to_owned(),
            uptime_ms: 1234,
            processes: vec![],
            listeners: vec![],
            lost_events: 0,
            map_full_total: 0,
        }
    );
}

#[test]
fn untracked_episodes_reach_the_status_at_once() {
    let mut t = Tracker::new();
    t.take_significant();
    t.apply(&ConnEvent::MapFull {
        at: ms(5),
        total: 2,
    });
    assert!(
        t.take_significant(),
        "an untracked episode is published at once"
    );
    assert_eq!(t.status(ms(6)).map_full_total, 2);
}

#[test]
fn significant_changes_are_flagged_once() {
    let addr = listen_addr("10.0.0.1:80");
    let mut t = Tracker::new();
    let mut apply = |step: Step| -> bool {
        let Step::Ev(ev) = step else {
            unreachable!("events only")
        };
        t.apply(&ev);
        t.take_significant()
    };
    // (step, significant): listeners, exits and lost events; connections
    // coming and going never, not even a process's last.
    let table = [
        (listen_start(1, 100, addr, 1), true),
        (handshake(2, 1, conn_v4(1)), false),
        (accept_queued(3, 1, conn_v4(1), 1), false),
        (handshake(4, 2, conn_v4(2)), false),
        (accept_queued(5, 2, conn_v4(2), 1), false),
        (close(6, 1, conn_v4(1), 1), false),
        (handshake(7, 3, conn_v4(3)), false),
        (queue_drop(8, 3, conn_v4(3)), false),
        (close(9, 2, conn_v4(2), 1), false),
        (accept(10, 4, conn_v4(4), 1), false),
        (lost_events(11, 3), true),
        (close(12, 4, conn_v4(4), 1), false),
        (listen_stop(13, 100, addr, 1), true),
        (process_exit(14, 1), true),
    ];
    for (i, (step, want)) in table.into_iter().enumerate() {
        assert_eq!(apply(step), want, "step {i}");
    }
}
