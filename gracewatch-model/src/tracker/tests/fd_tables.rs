//! A fresh read of one process's fd table ([`Tracker::fd_table_read`]):
//! the holder that closed its copy of a shared listener is no longer
//! listed, at once, without a rescan; what the read cannot disprove stays;
//! newer evidence wins, and an older snapshot cannot bring it back.

use super::kit::*;

/// The master keeps the listener; the worker closes its copy.
const MASTER: u32 = 10;
const WORKER: u32 = 11;
/// The listening socket's inode.
const L: u64 = 900;
/// A connection socket's inode.
const C: u64 = 901;

/// A snapshot at 1 s: master and worker hold the listener (inode [`L`]),
/// the worker one live connection it accepted at 1.5 s.
fn shared() -> Vec<Step> {
    vec![
        snapshot(
            1000,
            vec![snap_listener(wildcard_v4(), L, 0, &[MASTER, WORKER])],
            vec![],
            vec![],
        ),
        accept(1500, 200, conn_v4(1), WORKER),
    ]
}

fn with(mut steps: Vec<Step>, more: Vec<Step>) -> Vec<Step> {
    steps.extend(more);
    steps
}

#[test]
fn a_holder_whose_table_lacks_the_listener_is_no_longer_listed() {
    let steps = with(shared(), vec![fd_table(WORKER, 2000, &[C], true)]);
    let t = run_steps("release", &steps);
    let st = t.status(ms(2100));
    check_holders(&st, &[(MASTER, 0)]);
    // It still holds its connection: listed, with no listener.
    let w = st.processes.iter().find(|p| p.pid == WORKER).unwrap();
    assert_eq!((w.live, w.listeners.len()), (1, 0));
}

#[test]
fn a_table_that_still_has_the_listener_changes_nothing() {
    let steps = with(shared(), vec![fd_table(WORKER, 2000, &[C, L], false)]);
    let t = run_steps("kept", &steps);
    check_holders(&t.status(ms(2100)), &[(MASTER, 0), (WORKER, 1)]);
}

#[test]
fn an_accept_newer_than_the_read_keeps_the_acceptor() {
    // Accepting after the read began proves it holds the listener then.
    let steps = with(
        shared(),
        vec![
            accept(2500, 201, conn_v4(2), WORKER),
            fd_table(WORKER, 2000, &[C], true),
        ],
    );
    let t = run_steps("newer accept", &steps);
    check_holders(&t.status(ms(3000)), &[(MASTER, 0), (WORKER, 2)]);
}

#[test]
fn a_socket_known_only_from_events_proves_nothing() {
    // A second socket on the address (SO_REUSEPORT) that no snapshot
    // showed: the read cannot tell whether the worker holds it.
    let steps = with(
        shared(),
        vec![
            listen_start(1800, 300, wildcard_v4(), MASTER),
            fd_table(WORKER, 2000, &[C], true),
        ],
    );
    let t = run_steps("unnamed socket", &steps);
    // Released from the socket the read disproves, but still an acceptor
    // of the address: listed until a rescan.
    check_holders(&t.status(ms(2100)), &[(MASTER, 0), (WORKER, 1)]);
}

#[test]
fn an_older_snapshot_merged_later_does_not_list_it_again() {
    let steps = with(
        shared(),
        vec![
            fd_table(WORKER, 2000, &[C], true),
            // A rescan that began before the read, merged after it.
            snapshot(
                1900,
                vec![snap_listener(wildcard_v4(), L, 0, &[MASTER, WORKER])],
                vec![snap_conn(conn_v4(1), C, ESTABLISHED, &[WORKER])],
                vec![],
            ),
        ],
    );
    let t = run_steps("older snapshot", &steps);
    check_holders(&t.status(ms(2100)), &[(MASTER, 0)]);
    // A later snapshot is the truth again (it got a copy back).
    let steps = with(
        steps,
        vec![snapshot(
            3000,
            vec![snap_listener(wildcard_v4(), L, 0, &[MASTER, WORKER])],
            vec![snap_conn(conn_v4(1), C, ESTABLISHED, &[WORKER])],
            vec![],
        )],
    );
    let t = run_steps("newer snapshot", &steps);
    check_holders(&t.status(ms(3100)), &[(MASTER, 0), (WORKER, 1)]);
}

#[test]
fn a_holder_with_nothing_left_leaves_the_status() {
    let steps = vec![
        snapshot(
            1000,
            vec![snap_listener(wildcard_v4(), L, 0, &[MASTER, WORKER])],
            vec![],
            vec![],
        ),
        fd_table(WORKER, 2000, &[], true),
        // Reading it again finds nothing more to release.
        fd_table(WORKER, 2100, &[], false),
        // Another process's read, or one of a process holding nothing.
        fd_table(99, 2100, &[], false),
    ];
    let t = run_steps("holds nothing", &steps);
    let st = t.status(ms(2200));
    check_holders(&st, &[(MASTER, 0)]);
    assert_eq!(
        st.processes.iter().map(|p| p.pid).collect::<Vec<_>>(),
        [MASTER]
    );
}

#[test]
fn a_release_is_significant() {
    let mut t = run_steps("significant", &shared());
    t.take_significant();
    assert!(t.fd_table_read(WORKER, ms(2000), &[C]));
    assert!(t.take_significant(), "published at once");
    assert!(!t.fd_table_read(WORKER, ms(2001), &[C]));
    assert!(!t.take_significant());
}

#[test]
fn a_socket_opened_since_the_snapshot_is_named_by_a_dump_then_released() {
    // No snapshot saw the socket: the worker's read cannot release it
    // until a dump of the address names it.
    let mut t = run_steps(
        "named",
        &[
            listen_start(1000, 300, wildcard_v4(), MASTER),
            accept(1500, 200, conn_v4(1), WORKER),
        ],
    );
    assert!(
        !t.fd_table_read(WORKER, ms(2000), &[C]),
        "unnamed: no evidence"
    );
    // A dump older than the socket, or one with two candidates, names nothing.
    assert!(!t.listening_inodes(&wildcard_v4(), ms(900), &[L]));
    assert!(!t.listening_inodes(&wildcard_v4(), ms(1900), &[L, L + 10]));
    assert!(t.listening_inodes(&wildcard_v4(), ms(1900), &[L]));
    assert!(
        !t.listening_inodes(&wildcard_v4(), ms(1900), &[L]),
        "named once"
    );
    assert!(t.fd_table_read(WORKER, ms(2000), &[C]));
    check_holders(&t.status(ms(2100)), &[(MASTER, 0)]);
}

fn check_holders(st: &Status, want: &[(u32, u64)]) {
    let l = st
        .listeners
        .iter()
        .find(|l| l.address == wildcard_v4().local)
        .expect("the listener");
    let got: Vec<(u32, u64)> = l.holders.iter().map(|h| (h.pid, h.live)).collect();
    assert_eq!(got, want, "{st:#?}");
}

// --- the restart model on top -------------------------------------------------

restart_case!(
    a_worker_that_closed_its_copy_is_draining_from_the_read_on,
    [
        snapshot(
            1000,
            vec![snap_listener(wildcard_v4(), L, 0, &[MASTER, WORKER])],
            vec![],
            vec![],
        ),
        accept(1500, 200, conn_v4(1), WORKER),
        publish(1600),
        fd_table(WORKER, 2000, &[C], true),
        publish(2010),
    ],
    [
        RExpect::RoleWhy(WORKER, Role::Draining, Why::ClosedItsListener),
        RExpect::Drain(WORKER, Some((1, 2010, None))),
        RExpect::Role(MASTER, Role::Serving),
    ]
);
