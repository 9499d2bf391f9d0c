//! Connections the programs learn the owner of at their first send or
//! receive: one accepted and not yet read or written is still pending in
//! the kernel, so a rescan that finds it held counts it as the accept it
//! is; its later claim is not a second accept, and its end may come as a
//! queue drop.

use super::kit::*;
use crate::event::ConnEvent;
use crate::tracker::{Seen, found_id};

fn found_steps() -> Vec<Step> {
    vec![
        listen_start(1, 100, wildcard_v4(), 10),
        handshake(2, 200, conn_v4(1)),
        // Accepted by pid 10 and never touched: no claim yet. The rescan
        // finds it held; it returns nothing to register as pre-existing
        // (the kernel still reports its claim or end).
        snapshot(
            10,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(1), 72, ESTABLISHED, &[10])],
            vec![],
        ),
    ]
}

// Found held while pending: an accept, dated at its handshake, off the queue.
#[test]
fn a_rescan_counts_an_accepted_untouched_connection_as_an_accept() {
    let mut steps = found_steps();
    steps.extend([]);
    run_case(
        "a_rescan_counts_an_accepted_untouched_connection_as_an_accept",
        &steps,
        100_000,
        &[
            Expect::Live(10, 1),
            Expect::Totals(10, 1, 0),
            Expect::Queue(wildcard_v4(), 0),
            Expect::ListenerTotals(wildcard_v4(), 1, 0),
            Expect::Connections(10, vec![(conn_v4(1), false, Some(wildcard_v4()))]),
            Expect::ConnectionSince(10, conn_v4(1), 2),
        ],
    );
}

// Control: without its handshake the same connection is pre-existing.
case!(
    a_rescan_counts_a_connection_without_a_handshake_as_pre_existing,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        snapshot(
            10,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(1), 72, ESTABLISHED, &[10])],
            vec![(conn_v4(1), 10)],
        ),
    ],
    [
        Expect::Totals(10, 0, 0),
        Expect::Connections(10, vec![(conn_v4(1), true, Some(wildcard_v4()))]),
    ]
);

// Its first read is not a second accept; its close is reported by sk.
#[test]
fn the_claim_of_a_found_connection_is_not_a_second_accept() {
    let mut steps = found_steps();
    steps.extend([
        accept_queued(12, 200, conn_v4(1), 10),
        close(20, 200, conn_v4(1), 10),
    ]);
    run_case(
        "the_claim_of_a_found_connection_is_not_a_second_accept",
        &steps,
        100_000,
        &[
            Expect::Live(10, 0),
            Expect::Totals(10, 1, 1),
            Expect::Queue(wildcard_v4(), 0),
            Expect::ListenerTotals(wildcard_v4(), 1, 0),
        ],
    );
}

// Closed before any I/O: the kernel reports a queue drop, which ends it.
#[test]
fn a_queue_drop_of_a_found_connection_is_its_close() {
    let mut steps = found_steps();
    steps.extend([queue_drop(20, 200, conn_v4(1))]);
    run_case(
        "a_queue_drop_of_a_found_connection_is_its_close",
        &steps,
        100_000,
        &[
            Expect::Live(10, 0),
            Expect::Totals(10, 1, 1),
            Expect::Queue(wildcard_v4(), 0),
            Expect::ListenerTotals(wildcard_v4(), 1, 0),
        ],
    );
}

// A connection that dies in the queue is still a queue drop.
case!(
    a_queue_drop_of_a_queued_connection_leaves_the_queue,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        handshake(2, 200, conn_v4(1)),
        handshake(3, 201, conn_v4(2)),
        queue_drop(4, 200, conn_v4(1)),
    ],
    [
        Expect::Queue(wildcard_v4(), 1),
        Expect::ListenerTotals(wildcard_v4(), 0, 1),
        Expect::Totals(10, 0, 0),
    ]
);

/// The found accepts go to models of accepts once, and the claim that
/// follows is recognisable as not new.
#[test]
fn found_accepts_are_handed_out_once_and_their_claim_is_known() {
    let t = &mut run_steps("found", &found_steps());
    let found = t.take_found_accepts();
    assert_eq!(found.len(), 1, "{found:?}");
    let ConnEvent::Accept {
        at,
        tuple,
        pid,
        was_queued,
        ..
    } = &found[0]
    else {
        panic!("not an accept: {found:?}");
    };
    assert_eq!(
        (*at, *tuple, *pid, *was_queued),
        (ms(2), conn_v4(1), 10, true)
    );
    assert!(t.take_found_accepts().is_empty());

    let claim = ConnEvent::Accept {
        at: ms(12),
        sk: 200,
        tuple: conn_v4(1),
        pid: 10,
        comm: event_comm(10),
        was_queued: true,
    };
    assert_eq!(t.seen_as(&claim), Seen::Hidden);
    t.apply(&claim);
    assert_eq!(t.seen_as(&claim), Seen::Same, "claimed once");
    let other = ConnEvent::Accept {
        at: ms(13),
        sk: 201,
        tuple: conn_v4(2),
        pid: 10,
        comm: event_comm(10),
        was_queued: true,
    };
    assert_eq!(t.seen_as(&other), Seen::Same);
}

/// The end of a found connection before any I/O reaches consumers as its
/// close (by its exit if its holder was exiting), named like its accept.
#[test]
fn a_found_connection_ending_untouched_is_seen_as_its_close() {
    let mut t = run_steps("found", &found_steps());
    let drop = |exiting| ConnEvent::QueueDrop {
        at: ms(20),
        sk: 200,
        tuple: conn_v4(1),
        exiting,
    };
    let close = |by_exit| {
        Seen::Instead(ConnEvent::Close {
            at: ms(20),
            sk: found_id(&conn_v4(1)),
            tuple: conn_v4(1),
            pid: 10,
            by_exit,
        })
    };
    assert_eq!(t.seen_as(&drop(0)), close(false));
    assert_eq!(t.seen_as(&drop(10)), close(true));
    assert_eq!(
        t.seen_as(&drop(11)),
        close(false),
        "another process exiting"
    );
    t.apply(&drop(0));
    assert_eq!(
        t.seen_as(&drop(0)),
        Seen::Same,
        "a queue drop once it is gone"
    );
}
