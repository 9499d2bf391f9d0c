//! Types shared by the eBPF programs (`gracewatch-ebpf`) and userspace (`gracewatch`).
//!
//! Every type here crosses the kernel/user boundary as raw bytes (ring buffer
//! records, map keys and values, program globals), so each is `#[repr(C)]` with
//! fixed-width fields, explicit padding and a `const` size assertion: a layout
//! change must be deliberate and show up at compile time on both sides.
#![no_std]

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// What a ring-buffer [`Event`] reports.
pub mod event_kind {
    /// A socket entered LISTEN; `tgid` called `listen()`.
    pub const LISTEN_START: u8 = 1;
    /// A socket left LISTEN; `tgid` is the process that released it.
    pub const LISTEN_STOP: u8 = 2;
    /// An inbound handshake completed: the connection waits in a listener's accept queue.
    pub const HANDSHAKE: u8 = 3;
    /// `tgid` claimed the connection `sk`: the first send or receive on it
    /// ran in `tgid` (it accepted it, or was handed it before any I/O). It
    /// is now live and owned by `tgid`.
    pub const ACCEPT: u8 = 4;
    /// A live connection owned by `tgid` ended (left ESTABLISHED/CLOSE_WAIT).
    pub const CLOSE: u8 = 5;
    /// A connection no process claimed ended (it was in `PENDING`, so its
    /// handshake was reported): it died in an accept queue, or it was
    /// accepted and closed before any send or receive on it. Userspace
    /// tells the two apart by whether a rescan found a process holding it.
    pub const QUEUE_DROP: u8 = 6;
    /// A connection that was live before gracewatch started (registered by
    /// userspace in `PREEXISTING`) ended.
    pub const PREEXISTING_CLOSE: u8 = 7;
}

/// Bits of [`Event::flags`].
pub mod event_flag {
    /// ACCEPT: the connection was taken from the accept queue the programs
    /// saw it enter (always, for a claim out of `PENDING`).
    pub const WAS_QUEUED: u8 = 1;
    /// The map that should have tracked this socket was full: the event is
    /// paired with an immediate compensating one and counted in `STATS`.
    pub const MAP_FULL: u8 = 2;
    /// CLOSE/PREEXISTING_CLOSE: the owner itself ended it while exiting
    /// (its fds were being released by `exit()`), not by `close()`.
    pub const OWNER_EXITING: u8 = 4;
}

/// One record on the `EVENTS` ring buffer.
///
/// Addresses are always 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`),
/// exactly as the `sock:inet_sock_set_state` tracepoint records it. `l*` is the
/// local (server) side, `r*` the peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`: an opaque identity, stable while the socket lives.
    pub sk: u64,
    pub tgid: u32,
    /// Inode number of the socket's network namespace.
    pub netns: u32,
    pub family: u16,
    pub lport: u16,
    pub rport: u16,
    pub kind: u8,
    pub old_state: u8,
    pub new_state: u8,
    /// [`event_flag`] bits.
    pub flags: u8,
    pub _pad: [u8; 6],
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
    /// Command name of the current task (for LISTEN_*, ACCEPT), NUL padded.
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Event>() == 88);

/// A connection identified by its addresses, for sockets whose kernel address
/// userspace cannot know (those that existed before the programs attached).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub netns: u32,
    pub family: u16,
    pub lport: u16,
    pub rport: u16,
    pub _pad: u16,
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<TupleKey>() == 44);

/// Value of the `LIVE` map (keyed by sk address): an accepted, not yet closed connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveConn {
    pub accepted_ns: u64,
    pub owner: u32,
    pub netns: u32,
    pub family: u16,
    pub lport: u16,
    pub rport: u16,
    pub _pad: u16,
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<LiveConn>() == 56);

/// Indexes into the `STATS` array.
pub mod stat {
    /// Ring-buffer reservations that failed: events userspace never saw.
    pub const LOST_EVENTS: u32 = 0;
    /// Completed handshakes not kept in `PENDING` because it was full:
    /// their owner is only found by a rescan.
    pub const PENDING_FULL: u32 = 1;
    /// Accepted sockets not tracked because `LIVE` was full (one per failed
    /// insert; userspace reports episodes).
    pub const MAP_FULL: u32 = 2;
    pub const COUNT: u32 = 4;
}

/// Indexes into the `CONTROL` array: state shared by the programs and
/// userspace that is not a health counter.
pub mod control {
    /// `bpf_ktime_get_ns()` of the last ring-buffer record submitted with a
    /// forced wake-up (written by the programs).
    pub const LAST_WAKEUP_NS: u32 = 0;
    /// Pre-existing connections userspace registered in `PREEXISTING`, less
    /// those it removed itself (written by userspace only, raised *before*
    /// an insert and lowered *after* a removal).
    pub const PREEXISTING_REGISTERED: u32 = 1;
    /// `PREEXISTING` entries the programs removed (atomic adds by the
    /// programs only). While it equals `PREEXISTING_REGISTERED` the map is
    /// empty and the programs skip looking into it.
    pub const PREEXISTING_ENDED: u32 = 2;
    /// Entries in `PENDING` (atomic adds and subtractions by the programs).
    /// While it is zero, the send/receive hooks return after this one read.
    pub const PENDING: u32 = 3;
    /// Processes in `WATCHED` (written by userspace): while nonzero, the
    /// end of a connection no process claimed yet (its owner unknown to
    /// the programs) wakes the reader at once, as it may be a drain's last.
    pub const WATCHING: u32 = 4;
    pub const COUNT: u32 = 8;
}

/// The programs wake the ring buffer's reader at once for a record that can
/// end a drain (a live connection of a process userspace listed in
/// `WATCHED` closed), for a listener opening or closing, and when the
/// buffer is a quarter full; any other record wakes it only if no wake-up was sent for
/// this long. A busy host so costs the reader a few hundred wake-ups a
/// second instead of one per connection; the reader, while records keep
/// coming, looks again on its own every [`READER_TAIL_NS`].
pub const WAKEUP_INTERVAL_NS: u64 = 5_000_000;

/// How often the reader looks at the ring buffer without being woken, for
/// as long as it found records in the last [`READER_QUIET_NS`]. Must not
/// exceed [`WAKEUP_INTERVAL_NS`] by much: it bounds how late a record
/// submitted without a wake-up is read.
pub const READER_TAIL_NS: u64 = 5_000_000;

/// After this long without records the reader waits for a wake-up only. It
/// must exceed [`WAKEUP_INTERVAL_NS`]: the programs then see the last
/// wake-up as old enough and wake the reader for the next record.
pub const READER_QUIET_NS: u64 = 100_000_000;
const _: () = assert!(READER_QUIET_NS > 2 * WAKEUP_INTERVAL_NS);

/// Struct-member offsets, resolved at startup from `/sys/kernel/btf/vmlinux`
/// and handed to the programs as the global `CONFIG`: nothing about the
/// running kernel's layout is compiled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    // struct member offsets, in bytes
    pub skc_family: u32,
    pub skc_state: u32,
    /// `inet_sock.inet_sport` (network order), not `skc_num`: a socket
    /// moving to CLOSE gives its port back (`skc_num = 0`) before the state
    /// change is traced.
    pub inet_sport: u32,
    pub skc_dport: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_net: u32,
    pub sk_protocol: u32,
    pub sk_socket: u32,
    pub task_flags: u32,
    /// `offsetof(struct net, ns) + offsetof(struct ns_common, inum)`.
    pub net_ns_inum: u32,
    pub _pad: u32,
    /// Device and inode of gracewatch's own pid namespace (`stat
    /// /proc/self/ns/pid`): pids are reported as seen from it, so a
    /// container sharing a pod's pid namespace sees the pod's pids. Tasks
    /// outside it are not reported. `pidns_ino == 0`: host pids.
    pub pidns_dev: u64,
    pub pidns_ino: u64,
}
const _: () = assert!(core::mem::size_of::<Config>() == 72);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and byte
    // arrays with explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TupleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LiveConn {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
}
