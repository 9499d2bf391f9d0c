//! The vocabulary between `source/` and `tracker/`: decoded kernel events
//! ([`ConnEvent`]) and point-in-time views of the host ([`Snapshot`]).
//!
//! These types carry no aya, netlink or procfs types, so the tracker and
//! everything downstream can be tested with hand-made values. Times are
//! CLOCK_MONOTONIC durations (the clock `bpf_ktime_get_ns` uses).

use std::{
    hash::BuildHasher as _,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// TCP state numbers (include/net/tcp_states.h), as the kernel reports
/// them and consumers show them.
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_CLOSE_WAIT: u8 = 8;
pub const TCP_LISTEN: u8 = 10;

/// Kernel address of a `struct sock`: identifies a socket while it lives.
///
/// It is a kernel heap address, which would undo KASLR for whoever reads
/// it: it never leaves the process as is. JSON carries [`opaque_sock_id`]
/// instead (see [`serialize_sock_id`]).
pub type SockId = u64;

/// An id for `sk` that is stable within this process (so a recording still
/// pairs each close with its accept) but tells nothing about the address:
/// SipHash keyed with 128 random bits drawn once per process.
pub fn opaque_sock_id(sk: SockId) -> u64 {
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    KEY.get_or_init(std::collections::hash_map::RandomState::new)
        .hash_one(sk)
}

/// Serializes a [`SockId`] as its [`opaque_sock_id`]: every JSON that
/// carries events (`record`, the agent's `/v1/events`) goes through here.
pub fn serialize_sock_id<S: serde::Serializer>(sk: &SockId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(opaque_sock_id(*sk))
}

/// Inode number of a network namespace (`readlink /proc/<pid>/ns/net`).
pub type NetNs = u32;

/// The two ends of a TCP connection as seen by the server, in one network namespace.
///
/// `local` is the server side. IPv4 sockets carry `SocketAddr::V4`; IPv6
/// sockets carry `SocketAddr::V6`, which on a dual-stack listener may be an
/// IPv4-mapped address (`::ffff:a.b.c.d`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Tuple {
    pub netns: NetNs,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// A listening socket's identity as users see it: namespace plus bound address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ListenAddr {
    pub netns: NetNs,
    pub local: SocketAddr,
}

impl ListenAddr {
    /// Whether an inbound connection whose server side is `local` (in `netns`)
    /// could have been accepted from this listener: same namespace and port,
    /// and the same address or a wildcard one. An IPv6 wildcard (`::`)
    /// listener also matches IPv4 connections (dual-stack), which reach it as
    /// IPv4-mapped addresses on an IPv6 socket or, from the snapshot, as
    /// plain IPv4.
    pub fn matches(&self, netns: NetNs, local: SocketAddr) -> bool {
        if self.netns != netns || self.local.port() != local.port() {
            return false;
        }
        let mine = canonical_ip(self.local.ip());
        let theirs = canonical_ip(local.ip());
        if mine == theirs {
            return true;
        }
        match self.local.ip() {
            IpAddr::V4(a) => a.is_unspecified() && theirs.is_ipv4(),
            IpAddr::V6(a) => a.is_unspecified(),
        }
    }

    /// How specific a match is: exact address beats a same-family wildcard,
    /// which beats a dual-stack wildcard. Used to pick one listener when
    /// several match.
    pub fn specificity(&self, local: SocketAddr) -> u8 {
        let mine = canonical_ip(self.local.ip());
        if mine == canonical_ip(local.ip()) {
            3
        } else if self.local.is_ipv4() == local.is_ipv4() {
            2
        } else {
            1
        }
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, everything else unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One decoded record from the kernel programs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ConnEvent {
    /// `pid` put the socket `sk` into LISTEN on `addr`.
    ListenStart {
        at: Duration,
        #[serde(serialize_with = "serialize_sock_id")]
        sk: SockId,
        addr: ListenAddr,
        pid: u32,
        comm: String,
    },
    /// The listening socket `sk` was closed for good (last fd released) by `pid`.
    ListenStop {
        at: Duration,
        #[serde(serialize_with = "serialize_sock_id")]
        sk: SockId,
        addr: ListenAddr,
        pid: u32,
        comm: String,
    },
    /// An inbound handshake completed; the connection waits in an accept queue.
    Handshake {
        at: Duration,
        #[serde(serialize_with = "serialize_sock_id")]
        sk: SockId,
        tuple: Tuple,
    },
    /// `pid` accepted `sk`. `was_queued`: the programs saw its handshake, so
    /// it leaves an accept queue they counted.
    Accept {
        at: Duration,
        #[serde(serialize_with = "serialize_sock_id")]
        sk: SockId,
        tuple: Tuple,
        pid: u32,
        comm: String,
        was_queued: bool,
    },
    /// The live connection `sk`, accepted by `pid`, ended. `by_exit`: it
    /// ended because `pid` was exiting (not by an explicit close).
    Close {
        at: Duration,
        #[serde(serialize_with = "serialize_sock_id")]
        sk: SockId,
        tuple: Tuple,
        pid: u32,
        #[serde(default)]
        by_exit: bool,
    },
    /// A connection died in an accept queue before anyone accepted it.
    QueueDrop {
        at: Duration,
        #[serde(serialize_with = "serialize_sock_id")]
        sk: SockId,
        tuple: Tuple,
        /// The process whose exit released it (its fds were being closed
        /// by `exit()`), 0 if none: such a connection was accepted by it or
        /// queued on a listener it held, and is lost with it. From the
        /// programs, for the monitor's exit accounts; not part of the JSON.
        #[serde(skip)]
        exiting: u32,
    },
    /// A connection from the startup snapshot ended.
    PreexistingClose {
        at: Duration,
        tuple: Tuple,
        pid: u32,
        #[serde(default)]
        by_exit: bool,
    },
    /// The process `pid` exited (seen by the source, not the programs).
    ProcessExit { at: Duration, pid: u32 },
    /// The kernel could not deliver some events (ring buffer full); `total`
    /// is the running count since the programs were loaded.
    Lost { at: Duration, total: u64 },
    /// Connections went untracked: a kernel table was full (more
    /// connections than `--max-connections`) or a pre-existing connection
    /// could not be registered. `total` counts such episodes since start
    /// (one per run of failures, not one per connection). Until a rescan
    /// finds them, those connections are missing or their ends are late.
    MapFull { at: Duration, total: u64 },
}

impl ConnEvent {
    pub fn at(&self) -> Duration {
        match self {
            Self::ListenStart { at, .. }
            | Self::ListenStop { at, .. }
            | Self::Handshake { at, .. }
            | Self::Accept { at, .. }
            | Self::Close { at, .. }
            | Self::QueueDrop { at, .. }
            | Self::PreexistingClose { at, .. }
            | Self::ProcessExit { at, .. }
            | Self::Lost { at, .. }
            | Self::MapFull { at, .. } => *at,
        }
    }
}

/// A process holding a socket through one of its file descriptors.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
}

/// A listening TCP socket found by a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapListener {
    pub addr: ListenAddr,
    /// Socket inode (`socket:[N]` in `/proc/<pid>/fd`).
    pub inode: u64,
    /// Connections waiting in the accept queue at the time of the snapshot.
    pub accept_queue: u32,
    /// Every process with an fd on this socket, sorted by pid.
    pub holders: Vec<Holder>,
}

/// A live inbound connection found by a snapshot (ESTABLISHED or
/// CLOSE_WAIT, server side of some listener, held by at least one process).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapConn {
    pub tuple: Tuple,
    pub inode: u64,
    /// TCP state number (1 ESTABLISHED, 8 CLOSE_WAIT).
    pub state: u8,
    /// Every process with an fd on this socket, sorted by pid.
    pub holders: Vec<Holder>,
}

/// The host as seen by one sock_diag dump per network namespace joined with
/// every process's socket fds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Monotonic time when the dump started.
    pub at: Duration,
    pub listeners: Vec<SnapListener>,
    pub connections: Vec<SnapConn>,
}

/// What one connection is doing, read on demand from the kernel's
/// `tcp_info` and socket queues (sock_diag): how long since data last
/// moved, and whether any is in flight. Values are as of the read.
///
/// `None` is "the kernel did not say" (an older kernel's shorter
/// `tcp_info`), never zero. `in_flight` is always known: it comes from the
/// queue lengths every reply carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnActivity {
    /// Milliseconds since data was last sent or received, whichever is
    /// later (`tcpi_last_data_sent`, `tcpi_last_data_recv`). Bare ACKs and
    /// keep-alive or window probes are not data.
    pub idle_ms: Option<u64>,
    /// Milliseconds since data was last sent to the peer.
    pub last_sent_ms: Option<u64>,
    /// Milliseconds since data was last received from the peer.
    pub last_recv_ms: Option<u64>,
    /// Anything in flight: bytes received that the server has not read,
    /// or bytes it wrote that the peer has not acknowledged (sent or not).
    pub in_flight: bool,
    /// Bytes received and not yet read by the application.
    pub unread_bytes: u64,
    /// Bytes sent to the peer and not yet acknowledged.
    pub unacked_bytes: Option<u64>,
    /// Bytes written by the application and not yet sent (the peer's
    /// window is full, or congestion control holds them).
    pub unsent_bytes: Option<u64>,
}

impl ConnActivity {
    /// From the kernel's numbers: times since data was last sent and
    /// received, the receive queue, the send queue (written and not yet
    /// acknowledged) and the part of it not sent yet.
    pub fn new(
        last_sent_ms: Option<u64>,
        last_recv_ms: Option<u64>,
        unread_bytes: u64,
        send_queue_bytes: u64,
        unsent_bytes: Option<u64>,
    ) -> Self {
        let idle_ms = match (last_sent_ms, last_recv_ms) {
            (Some(s), Some(r)) => Some(s.min(r)),
            // One time alone says nothing about the other direction.
            _ => None,
        };
        Self {
            idle_ms,
            last_sent_ms,
            last_recv_ms,
            in_flight: unread_bytes > 0 || send_queue_bytes > 0,
            unread_bytes,
            unacked_bytes: unsent_bytes.map(|u| send_queue_bytes.saturating_sub(u)),
            unsent_bytes,
        }
    }
}

#[cfg(test)]
mod activity_tests {
    use super::ConnActivity;

    #[test]
    fn idle_is_the_later_of_sent_and_received_and_unknown_stays_unknown() {
        let a = ConnActivity::new(Some(900), Some(40), 0, 0, Some(0));
        assert_eq!(a.idle_ms, Some(40));
        assert!(!a.in_flight);
        assert_eq!(ConnActivity::new(None, Some(40), 0, 0, None).idle_ms, None);
        assert_eq!(ConnActivity::new(Some(7), None, 0, 0, None).idle_ms, None);
    }

    #[test]
    fn in_flight_is_any_unread_or_unacknowledged_byte() {
        let unread = ConnActivity::new(Some(1), Some(1), 3, 0, Some(0));
        assert!(unread.in_flight);
        let stuck = ConnActivity::new(Some(1), Some(1), 0, 5000, Some(4000));
        assert!(stuck.in_flight);
        assert_eq!(
            (stuck.unacked_bytes, stuck.unsent_bytes),
            (Some(1000), Some(4000))
        );
        let old_kernel = ConnActivity::new(None, None, 0, 10, None);
        assert!(old_kernel.in_flight);
        assert_eq!(
            (old_kernel.unacked_bytes, old_kernel.unsent_bytes),
            (None, None)
        );
    }
}
