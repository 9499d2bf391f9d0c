//! Process exits: what an exit removes and keeps, late events of an exited
//! process, recycled pids.

use super::kit::*;

case!(
    exit_removes_the_process_from_listeners_and_connections,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        process_exit(5, 10),
    ],
    [
        Expect::Processes(vec![]),
        // The socket itself goes with its ListenStop.
        Expect::Listeners(vec![(NS, "0.0.0.0:80")]),
        Expect::Holders(wildcard_v4(), vec![]),
        Expect::Connections(10, vec![]),
        Expect::Live(10, 0),
    ]
);

case!(
    exit_keeps_a_shared_connection_for_the_other_holder,
    [
        snapshot(
            1,
            vec![snap_listener(wildcard_v4(), 7, 0, &[10])],
            vec![snap_conn(conn_v4(1), 71, ESTABLISHED, &[10, 20])],
            vec![(conn_v4(1), 10)],
        ),
        process_exit(5, 10),
    ],
    [
        Expect::Processes(vec![20]),
        Expect::Live(20, 1),
        Expect::Totals(20, 0, 0),
        Expect::ConnectionHolders(20, conn_v4(1), vec![20]),
    ]
);

case!(
    the_kernels_close_after_an_exit_is_ignored,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        process_exit(5, 10),
        close(6, 200, conn_v4(1), 10),
        listen_stop(6, 100, wildcard_v4(), 10),
    ],
    [Expect::Processes(vec![]), Expect::Listeners(vec![])]
);

case!(
    a_late_birth_of_an_exited_process_does_not_resurrect_it,
    [
        process_exit(10, 10),
        listen_start(4, 100, wildcard_v4(), 10),
        accept(5, 200, conn_v4(1), 10),
    ],
    [
        Expect::Processes(vec![]),
        Expect::Holders(wildcard_v4(), vec![]),
        Expect::ListenerTotals(wildcard_v4(), 1, 0),
    ]
);

case!(
    a_recycled_pid_starts_fresh,
    [
        accept(2, 200, conn_v4(1), 10),
        process_exit(10, 10),
        listen_start(20, 100, wildcard_v4(), 10),
    ],
    [
        Expect::Processes(vec![10]),
        Expect::Totals(10, 0, 0),
        Expect::Live(10, 0),
    ]
);

case!(
    a_process_that_let_go_of_everything_is_forgotten,
    [
        accept(2, 200, conn_v4(1), 10),
        close(3, 200, conn_v4(1), 10),
        accept(4, 201, conn_v4(2), 10),
    ],
    [Expect::Processes(vec![10]), Expect::Totals(10, 1, 0)]
);

case!(
    exit_of_an_unknown_pid_is_harmless,
    [listen_start(1, 100, wildcard_v4(), 10), process_exit(5, 99)],
    [Expect::Processes(vec![10])]
);
