//! Listeners and their holders: listen start and stop, SO_REUSEPORT,
//! namespaces, ordering, and handovers (fd passing, SO_REUSEPORT).

use super::kit::*;

// --- listeners ---

case!(
    listen_start_ipv4,
    [listen_start(1, 100, wildcard_v4(), 10)],
    [
        Expect::Processes(vec![10]),
        Expect::Live(10, 0),
        Expect::Oldest(10, None),
        Expect::Comm(10, "e10"),
        Expect::ProcListeners(10, vec!["0.0.0.0:80"]),
        Expect::Listeners(vec![(NS, "0.0.0.0:80")]),
        Expect::Family(wildcard_v4(), "ipv4"),
        Expect::Holders(wildcard_v4(), vec![(10, 0)]),
        Expect::Queue(wildcard_v4(), 0),
        Expect::ListenerTotals(wildcard_v4(), 0, 0),
    ]
);

case!(
    listen_start_ipv6_wildcard,
    [listen_start(1, 100, wildcard_v6(), 10)],
    [
        Expect::Listeners(vec![(NS, "[::]:80")]),
        Expect::Family(wildcard_v6(), "ipv6"),
        Expect::ProcListeners(10, vec!["[::]:80"]),
    ]
);

case!(
    listen_stop_removes_the_listener_and_the_idle_process,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        listen_stop(2, 100, wildcard_v4(), 10)
    ],
    [Expect::Listeners(vec![]), Expect::Processes(vec![])]
);

case!(
    listen_stop_keeps_accepted_connections_live_without_a_listener,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        listen_stop(3, 100, wildcard_v4(), 10),
    ],
    [
        Expect::Listeners(vec![]),
        Expect::Processes(vec![10]),
        Expect::Live(10, 1),
        Expect::ProcListeners(10, vec![]),
        Expect::Connections(10, vec![(conn_v4(1), false, None)]),
    ]
);

case!(
    so_reuseport_second_socket_on_the_address_merges_holders,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        listen_start(2, 101, wildcard_v4(), 20)
    ],
    [
        Expect::Listeners(vec![(NS, "0.0.0.0:80")]),
        Expect::Holders(wildcard_v4(), vec![(10, 0), (20, 0)]),
        Expect::ProcListeners(20, vec!["0.0.0.0:80"]),
    ]
);

case!(
    so_reuseport_one_socket_closing_leaves_the_other_listening,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        listen_start(2, 101, wildcard_v4(), 20),
        listen_stop(3, 100, wildcard_v4(), 10),
    ],
    [
        Expect::Listeners(vec![(NS, "0.0.0.0:80")]),
        Expect::Holders(wildcard_v4(), vec![(20, 0)]),
        Expect::Processes(vec![20]),
    ]
);

// ListenStart again for a known socket merges holders.
case!(
    listen_start_again_for_a_known_socket_merges_holders,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        listen_start(2, 100, wildcard_v4(), 20)
    ],
    [Expect::Holders(wildcard_v4(), vec![(10, 0), (20, 0)])]
);

case!(
    listen_stop_of_an_unknown_socket_is_ignored,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        listen_stop(2, 999, wildcard_v4(), 10),
        listen_stop(2, 998, listen_addr("0.0.0.0:81"), 10),
    ],
    [
        Expect::Listeners(vec![(NS, "0.0.0.0:80")]),
        Expect::Holders(wildcard_v4(), vec![(10, 0)]),
    ]
);

case!(
    a_listening_sk_seen_on_another_address_the_stale_socket_goes,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        listen_start(5, 100, listen_addr("0.0.0.0:81"), 10),
    ],
    [
        Expect::Listeners(vec![(NS, "0.0.0.0:81")]),
        Expect::ProcListeners(10, vec!["0.0.0.0:81"]),
    ]
);

case!(
    the_same_address_in_two_namespaces_stays_apart,
    [
        listen_start(1, 100, listen_addr_in(NS, "0.0.0.0:80"), 10),
        listen_start(1, 101, listen_addr_in(NS2, "0.0.0.0:80"), 20),
        accept(2, 200, tuple_in(NS2, "10.0.0.1:80", "192.0.2.1:40001"), 20),
    ],
    [
        Expect::Listeners(vec![(NS, "0.0.0.0:80"), (NS2, "0.0.0.0:80")]),
        Expect::Holders(listen_addr_in(NS, "0.0.0.0:80"), vec![(10, 0)]),
        Expect::Holders(listen_addr_in(NS2, "0.0.0.0:80"), vec![(20, 1)]),
        Expect::Live(10, 0),
        Expect::Live(20, 1),
    ]
);

// Listeners sorted by namespace then address; process listeners by address.
case!(
    listeners_sorted_by_namespace_then_address,
    [
        listen_start(1, 100, listen_addr_in(NS2, "0.0.0.0:80"), 10),
        listen_start(1, 101, listen_addr("[::]:80"), 10),
        listen_start(1, 102, listen_addr("10.0.0.10:80"), 10),
        listen_start(1, 103, listen_addr("9.0.0.1:80"), 10),
        listen_start(1, 104, listen_addr("0.0.0.0:443"), 10),
    ],
    [
        Expect::Listeners(vec![
            (NS, "0.0.0.0:443"),
            (NS, "9.0.0.1:80"),
            (NS, "10.0.0.10:80"),
            (NS, "[::]:80"),
            (NS2, "0.0.0.0:80"),
        ]),
        Expect::ProcListeners(
            10,
            vec![
                "0.0.0.0:80",
                "0.0.0.0:443",
                "9.0.0.1:80",
                "10.0.0.10:80",
                "[::]:80",
            ],
        ),
    ]
);

// --- handover ---

case!(
    fd_passing_old_and_new_process_both_accept_from_one_socket,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        accept(3, 201, conn_v4(2), 10),
        // The new process got the fd by passing (no event) and accepts.
        accept(5, 202, conn_v4(3), 20),
    ],
    [
        Expect::Holders(wildcard_v4(), vec![(10, 2), (20, 1)]),
        Expect::Live(10, 2),
        Expect::Live(20, 1),
        Expect::ProcListeners(20, vec!["0.0.0.0:80"]),
    ]
);

case!(
    fd_passing_the_old_process_drains_then_exits,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        accept(3, 201, conn_v4(2), 10),
        accept(5, 202, conn_v4(3), 20),
        close(6, 200, conn_v4(1), 10),
        close(7, 201, conn_v4(2), 10),
        process_exit(8, 10),
    ],
    [
        Expect::Processes(vec![20]),
        Expect::Holders(wildcard_v4(), vec![(20, 1)]),
        Expect::Listeners(vec![(NS, "0.0.0.0:80")]),
    ]
);

case!(
    so_reuseport_the_old_socket_closes_while_its_process_still_drains,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        listen_start(5, 101, wildcard_v4(), 20),
        accept(6, 201, conn_v4(2), 20),
        listen_stop(7, 100, wildcard_v4(), 10),
    ],
    [
        Expect::Processes(vec![10, 20]),
        Expect::Holders(wildcard_v4(), vec![(20, 1)]),
        Expect::Live(10, 1),
        Expect::ProcListeners(10, vec![]),
        Expect::Connections(10, vec![(conn_v4(1), false, Some(wildcard_v4()))]),
    ]
);

case!(
    so_reuseport_drained_old_process_leaves_the_status,
    [
        listen_start(1, 100, wildcard_v4(), 10),
        accept(2, 200, conn_v4(1), 10),
        listen_start(5, 101, wildcard_v4(), 20),
        listen_stop(7, 100, wildcard_v4(), 10),
        close(8, 200, conn_v4(1), 10),
    ],
    [Expect::Processes(vec![20]), Expect::Live(10, 0)]
);
