//! gracewatch's kernel side: four raw tracepoints that attribute every
//! inbound TCP connection to the process that serves it and count it until
//! it ends. Raw tracepoints only: a classic `syscalls:*` tracepoint would put
//! every task on the host on the slow syscall path while attached (+26 % on
//! a `getppid`) and takes 60–80 ms to detach.
//!
//! - `inet_sock_set_state` (its arguments are the `sk` and the two states,
//!   with no trace record built, so the seven of every ten state changes
//!   that mean nothing to us cost almost nothing) sees listeners open and
//!   close, handshakes complete and connections end. It runs in whatever
//!   context changes the state (often softirq), so it never attributes
//!   anything to `current` except for LISTEN transitions, which only happen
//!   in the process calling `listen()`/`close()`. A completed handshake is
//!   kept in `PENDING`.
//! - `sock_recv_length` / `sock_send_length` run after every receive and
//!   send on a socket, always in the process doing it (io_uring's included).
//!   While nothing is pending they return after one array read; otherwise
//!   the first one on a pending socket claims it: a `LIVE` entry owned by
//!   current's tgid, and an ACCEPT record. A connection accepted and never
//!   read or written stays pending: userspace's rescans and a drain's fresh
//!   look at the target's fds find those.
//! - `tcp_destroy_sock` is the backstop: the kernel frees the socket, so an
//!   entry still in `LIVE`, `PENDING` or `PREEXISTING` is an end the state
//!   change missed. That happens: `inet_sock_set_state` runs just before the
//!   kernel stores the new state, so a reset on one CPU can slip between a
//!   claim's insert and its look at the state on another.
//!
//! Membership in `PENDING`/`LIVE`/`PREEXISTING` is the truth; whoever
//! deletes an entry successfully is the one that reports what follows (a
//! claim or an end), so a socket racing between a claim (one CPU) and a
//! reset (another) is counted exactly once. The birth event is emitted
//! *before* the map insert, so userspace always reads a socket's birth before
//! its end. A pending socket that ends is reported as dropped from the queue;
//! userspace matches it to the handshake it saw and to what its rescans
//! found. Meaning (listeners, queues, roles, drains) lives in userspace.
#![no_std]
#![no_main]
// The BPF target has no `core::sync::atomic` read-modify-write methods; the
// intrinsic lowers to the BPF atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP,
        BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE, bpf_pidns_info,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_current_task, bpf_get_ns_current_pid_tgid, bpf_ktime_get_ns},
    },
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, RingBuf},
    programs::RawTracePointContext,
};
use gracewatch_common::{
    AF_INET, AF_INET6, Config, Event, IPPROTO_TCP, LiveConn, TupleKey, WAKEUP_INTERVAL_NS, control,
    event_flag, event_kind, stat, tcp_state,
};

/// Offsets of the running kernel, written by userspace before load.
#[unsafe(no_mangle)]
// SAFETY: `Config` is plain integers; all-zero is a valid value.
static CONFIG: Config = unsafe { core::mem::zeroed() };

/// Defaults; userspace resizes each map before load (`--max-connections`,
/// `--ring-buffer-size`). The hash maps are not preallocated: an idle host
/// pays only for the bucket array.
const MAX_SOCKETS: u32 = 1 << 20;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Accepted, not yet ended connections, keyed by sk address.
#[map]
static LIVE: HashMap<u64, LiveConn> = HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Server-side connections whose handshake completed (SYN_RECV →
/// ESTABLISHED) and that no process has claimed yet, keyed by sk address,
/// with the tuple read at the handshake. The first
/// `sock_recv_length`/`sock_send_length` on the socket (process context:
/// the process doing I/O on it) moves it to `LIVE`, owned by current's
/// tgid. Sized like `LIVE`: a server may accept many connections and wait
/// for their clients to speak first.
#[map]
static PENDING: HashMap<u64, LiveConn> = HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Connections that were live before the programs attached (found by
/// userspace's startup snapshot) → the pid userspace charged them to.
#[map]
static PREEXISTING: HashMap<TupleKey, u32> =
    HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Health counters, indexed by `gracewatch_common::stat`.
#[map]
static STATS: Array<u64> = Array::with_max_entries(stat::COUNT, 0);

/// Processes a drain is waiting on (tgid → 1), written by userspace: any
/// close of a connection one of them owns wakes the reader at once (it may
/// be the last; the programs keep no per-process count to tell).
#[map]
static WATCHED: HashMap<u32, u8> = HashMap::with_max_entries(MAX_WATCHED, 0);
const MAX_WATCHED: u32 = 1024;

/// Wake-up and gating state, indexed by `gracewatch_common::control`.
#[map]
static CONTROL: Array<u64> = Array::with_max_entries(control::COUNT, 0);

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    let _ = try_inet_sock_set_state(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: RawTracePointContext) -> i32 {
    let _ = try_tcp_destroy_sock(&ctx);
    0
}

/// `TP_PROTO(struct sock *sk, int ret, int flags)`, from
/// `sock_recvmsg_nosec` (every recvmsg/read/recv on any socket, io_uring's
/// included), always in process context.
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_length(ctx: RawTracePointContext) -> i32 {
    let _ = try_sock_io(&ctx);
    0
}

/// As `sock_recv_length`, from `sock_sendmsg_nosec`.
#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_send_length(ctx: RawTracePointContext) -> i32 {
    let _ = try_sock_io(&ctx);
    0
}

#[inline(always)]
fn config() -> Config {
    // SAFETY: CONFIG is a plain global the loader fills before load; a
    // volatile read stops the compiler from folding its zero initialiser.
    unsafe { core::ptr::read_volatile(&CONFIG) }
}

/// Reads a `T` at `base + off` in kernel memory.
#[inline(always)]
fn kread<T>(base: u64, off: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel validates the address and fails cleanly
    // on a bad pointer; `T` is a plain integer or byte array.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: no arguments, no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn bump(map: &Array<u64>, index: u32) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: array values live as long as the map; the atomic add makes
        // concurrent updates from several CPUs exact.
        unsafe { add(p, 1u64) };
    }
}

/// Atomic `*p += v`.
///
/// # Safety
/// `p` must point to a live, aligned map value.
#[inline(always)]
unsafe fn add<T: Copy>(p: *mut T, v: T) {
    // SAFETY: guaranteed by the caller.
    unsafe { atomic_xadd::<T, T, { AtomicOrdering::Relaxed }>(p, v) };
}

/// Submits `ev`. An `urgent` record (a close of a process a drain waits
/// on, a listener opening or closing) wakes the reader at once;
/// others only if the last wake-up is older than
/// `WAKEUP_INTERVAL_NS` or the buffer is filling up (see
/// `gracewatch_common::WAKEUP_INTERVAL_NS` for the reader's side). A wake-up
/// is an IPI and a context switch: one per connection was most of what
/// gracewatch cost a busy server.
#[inline(always)]
fn emit(ev: &Event, urgent: bool) {
    let flags = if wake_due(ev.ts_ns, urgent) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS.output::<Event>(ev, flags as u64).is_err() {
        bump(&STATS, stat::LOST_EVENTS);
    }
}

#[inline(always)]
fn wake_due(now: u64, urgent: bool) -> bool {
    let Some(last) = CONTROL.get_ptr_mut(control::LAST_WAKEUP_NS) else {
        return true;
    };
    // SAFETY: array values live as long as the map. Concurrent writers race
    // benignly: each stores a recent time, and a lost store only means one
    // more wake-up.
    let due = urgent
        || now.wrapping_sub(unsafe { core::ptr::read_volatile(last) }) >= WAKEUP_INTERVAL_NS
        || EVENTS.query(BPF_RB_AVAIL_DATA as u64) * 4 >= EVENTS.query(BPF_RB_RING_SIZE as u64);
    if due {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(last, now) };
    }
    due
}

/// Whether a drain waits on `tgid` (its closes must wake the reader).
#[inline(always)]
fn watched(tgid: u32) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { WATCHED.get(tgid) }.is_some()
}

#[inline(always)]
fn control(index: u32) -> u64 {
    CONTROL.get(index).copied().unwrap_or(0)
}

/// The current tgid as seen from gracewatch's pid namespace; `None` for a
/// task outside it (not ours to report).
#[inline(always)]
fn current_tgid(cfg: &Config) -> Option<u32> {
    if cfg.pidns_ino == 0 {
        return Some((bpf_get_current_pid_tgid() >> 32) as u32);
    }
    let mut info = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: `info` is a valid, writable bpf_pidns_info of the size passed.
    let r = unsafe {
        bpf_get_ns_current_pid_tgid(
            cfg.pidns_dev,
            cfg.pidns_ino,
            &mut info,
            core::mem::size_of::<bpf_pidns_info>() as u32,
        )
    };
    (r == 0).then_some(info.tgid)
}

/// Fills the current process into `ev`; `false` if it is outside our pid namespace.
#[inline(always)]
fn current_into(cfg: &Config, ev: &mut Event) -> bool {
    let Some(tgid) = current_tgid(cfg) else {
        return false;
    };
    ev.tgid = tgid;
    if let Ok(comm) = bpf_get_current_comm() {
        ev.comm = comm;
    }
    true
}

#[inline(always)]
fn netns_of(cfg: &Config, sk: u64) -> u32 {
    let net: u64 = kread(sk, cfg.skc_net).unwrap_or(0);
    if net == 0 {
        return 0;
    }
    kread(net, cfg.net_ns_inum).unwrap_or(0)
}

fn try_inet_sock_set_state(ctx: &RawTracePointContext) -> Result<(), i32> {
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let sk: u64 = ctx.arg(0);
    let old = ctx.arg::<u64>(1) as u8;
    let new = ctx.arg::<u64>(2) as u8;
    let cfg = config();

    let is_end = matches!(
        old,
        tcp_state::ESTABLISHED | tcp_state::CLOSE_WAIT | tcp_state::SYN_RECV
    ) && matches!(
        new,
        tcp_state::FIN_WAIT1 | tcp_state::LAST_ACK | tcp_state::CLOSE
    );
    if is_end {
        // Before any read: a `LIVE` socket is TCP.
        return end_of_connection(&cfg, sk, old, new);
    }
    let kind = if new == tcp_state::LISTEN {
        event_kind::LISTEN_START
    } else if old == tcp_state::LISTEN && new == tcp_state::CLOSE {
        // (A child socket is cloned from its listener and so also starts
        // with LISTEN → SYN_RECV: that is not the listener closing.)
        event_kind::LISTEN_STOP
    } else if old == tcp_state::SYN_RECV && new == tcp_state::ESTABLISHED {
        // A TCP Fast Open child can be accepted before its handshake completes.
        if LIVE.get_ptr(sk).is_some() {
            return Ok(());
        }
        event_kind::HANDSHAKE
    } else {
        return Ok(());
    };
    let Some(mut ev) = sock_event(&cfg, sk, kind, old, new)? else {
        return Ok(());
    };
    if kind == event_kind::HANDSHAKE {
        // Kept before it is reported: no process can claim the socket
        // before this program returns (the claim's I/O takes the socket
        // lock, which the handshake holds), so the record still comes
        // first. One `PENDING` cannot keep is not reported at all (its
        // claim and end would not be): counted in `STATS`, userspace finds
        // it by rescans, as a pre-existing connection.
        if remember_pending(sk, &ev) {
            emit(&ev, false);
        }
    } else if current_into(&cfg, &mut ev) {
        emit(&ev, true);
    }
    Ok(())
}

/// Keeps a just-completed handshake in `PENDING` until a process does I/O
/// on it (or it ends); `false` if `PENDING` is full.
#[inline(always)]
fn remember_pending(sk: u64, ev: &Event) -> bool {
    let conn = LiveConn {
        accepted_ns: ev.ts_ns,
        owner: 0,
        netns: ev.netns,
        family: ev.family,
        lport: ev.lport,
        rport: ev.rport,
        _pad: 0,
        laddr: ev.laddr,
        raddr: ev.raddr,
    };
    match PENDING.insert(sk, conn, BPF_NOEXIST as u64) {
        Ok(()) => {
            if let Some(p) = CONTROL.get_ptr_mut(control::PENDING) {
                // SAFETY: array values live as long as the map.
                unsafe { add(p, 1u64) };
            }
            true
        }
        // A stale entry for a reused address (its end was missed): the
        // newer socket replaces it; the count already includes it.
        Err(e) if e == -EEXIST => PENDING.insert(sk, conn, BPF_ANY as u64).is_ok(),
        Err(_) => {
            bump(&STATS, stat::PENDING_FULL);
            false
        }
    }
}

/// Removes `sk` from `PENDING`; `Some(entry)` if this call
/// removed it (whoever removes it owns what follows: a claim or an end).
#[inline(always)]
fn take_pending(sk: u64) -> Option<LiveConn> {
    if control(control::PENDING) == 0 {
        return None;
    }
    let p = PENDING.get_ptr(sk)?;
    // SAFETY: map values stay readable for the whole program run (RCU);
    // a preallocated value may be reused by a concurrent insert, which
    // only happens for a reused sk address, i.e. after this socket's end.
    let conn = unsafe { *p };
    PENDING.remove(sk).ok()?;
    if let Some(c) = CONTROL.get_ptr_mut(control::PENDING) {
        // SAFETY: as in `remember_pending`; adding u64::MAX subtracts one.
        unsafe { add(c, u64::MAX) };
    }
    Some(conn)
}

/// First send/recv of a pending connection: the process doing it owns it. The common case (nothing pending, or a socket already
/// known / not TCP / not server-side) costs one array read, or one array
/// read and one hash miss.
fn try_sock_io(ctx: &RawTracePointContext) -> Result<(), i32> {
    if control(control::PENDING) == 0 {
        return Ok(());
    }
    let sk: u64 = ctx.arg(0);
    let Some(pending) = take_pending(sk) else {
        return Ok(());
    };
    let cfg = config();
    let mut ev = Event {
        ts_ns: now_ns(),
        sk,
        kind: event_kind::ACCEPT,
        // Every claim takes a connection out of `PENDING`, where its
        // handshake put it: it leaves the accept queue userspace counted.
        flags: event_flag::WAS_QUEUED,
        family: pending.family,
        lport: pending.lport,
        rport: pending.rport,
        netns: pending.netns,
        laddr: pending.laddr,
        raddr: pending.raddr,
        ..Event::default()
    };
    if !current_into(&cfg, &mut ev) {
        return Ok(());
    }
    own(&cfg, sk, &mut ev)
}

/// An event about `sk` with its addresses, ports and network namespace, as
/// `sock:inet_sock_set_state` would record them (IPv4 as IPv4-mapped);
/// `None` for a socket that is not TCP over IPv4/IPv6.
#[inline(always)]
fn sock_event(cfg: &Config, sk: u64, kind: u8, old: u8, new: u8) -> Result<Option<Event>, i32> {
    if kread::<u16>(sk, cfg.sk_protocol)? != IPPROTO_TCP {
        return Ok(None);
    }
    let family: u16 = kread(sk, cfg.skc_family)?;
    if family != AF_INET && family != AF_INET6 {
        return Ok(None);
    }
    let mut ev = Event {
        ts_ns: now_ns(),
        sk,
        kind,
        old_state: old,
        new_state: new,
        family,
        lport: u16::from_be(kread(sk, cfg.inet_sport)?),
        rport: u16::from_be(kread(sk, cfg.skc_dport)?),
        netns: netns_of(cfg, sk),
        ..Event::default()
    };
    if family == AF_INET6 {
        ev.laddr = kread(sk, cfg.skc_v6_rcv_saddr)?;
        ev.raddr = kread(sk, cfg.skc_v6_daddr)?;
    } else {
        let l: [u8; 4] = kread(sk, cfg.skc_rcv_saddr)?;
        let r: [u8; 4] = kread(sk, cfg.skc_daddr)?;
        ev.laddr = v4_mapped(l);
        ev.raddr = v4_mapped(r);
    }
    Ok(Some(ev))
}

/// `PF_EXITING` in `task_struct.flags` (include/linux/sched.h).
const PF_EXITING: u32 = 0x4;

/// Whether the current task belongs to `owner` and is exiting: its sockets
/// are being released by `exit()`.
#[inline(always)]
fn owner_exiting(cfg: &Config, owner: u32) -> bool {
    current_tgid(cfg) == Some(owner) && current_exiting(cfg)
}

/// Whether the current task is exiting.
#[inline(always)]
fn current_exiting(cfg: &Config) -> bool {
    current_flags(cfg).is_some_and(|f| f & PF_EXITING != 0)
}

/// `PF_KTHREAD` in `task_struct.flags` (include/linux/sched.h).
const PF_KTHREAD: u32 = 0x0020_0000;

/// Whether the current task is a kernel thread (a deferred `fput` runs
/// there, in no process that held the socket). Unknown counts as one.
#[inline(always)]
fn current_is_kthread(cfg: &Config) -> bool {
    current_flags(cfg).is_none_or(|f| f & PF_KTHREAD != 0)
}

#[inline(always)]
fn current_flags(cfg: &Config) -> Option<u32> {
    // SAFETY: no arguments, no preconditions.
    let task = unsafe { bpf_get_current_task() };
    kread::<u32>(task, cfg.task_flags).ok()
}

/// A connection left ESTABLISHED/CLOSE_WAIT: report it to whichever map
/// held it. Most sockets that get here are the client ends of outbound
/// connections, held by none: they cost one lookup and one read (and a
/// lookup by tuple only while pre-existing connections are registered).
#[inline(always)]
fn end_of_connection(cfg: &Config, sk: u64, old: u8, new: u8) -> Result<(), i32> {
    if end_live(sk, old, new) {
        return Ok(());
    }
    // A connection that ended before any process did I/O on it (in the
    // accept queue, or accepted and never touched): userspace matches it to
    // its handshake and to what its rescans found.
    if let Some(pending) = take_pending(sk) {
        report_pending_end(sk, &pending, old, new);
        return Ok(());
    }
    // Otherwise a client end, a connection that died in an accept queue
    // while `PENDING` was full or before the programs attached (neither
    // reported: userspace never counted them), or a pre-existing one.
    end_preexisting(cfg, sk, old, new)
}

/// If `sk` is in `LIVE`, removes it and reports its end (whoever removes
/// the entry reports it, so a socket is reported once). `true` if it was
/// there, removed by us or by a racing program.
///
/// A BPF function of its own, not inlined: the claim calls it with its own
/// event on the stack, and both would not fit one frame.
#[inline(never)]
fn end_live(sk: u64, old: u8, new: u8) -> bool {
    let Some(conn) = LIVE.get_ptr(sk) else {
        return false;
    };
    // SAFETY: map values stay readable for the whole program run (RCU).
    let conn = unsafe { *conn };
    if LIVE.remove(sk).is_ok() {
        report_live_end(&config(), sk, &conn, old, new);
    }
    true
}

/// Emits the CLOSE of a `LIVE` entry this program removed.
#[inline(always)]
fn report_live_end(cfg: &Config, sk: u64, conn: &LiveConn, old: u8, new: u8) {
    let mut ev = Event {
        ts_ns: now_ns(),
        sk,
        tgid: conn.owner,
        netns: conn.netns,
        family: conn.family,
        lport: conn.lport,
        rport: conn.rport,
        kind: event_kind::CLOSE,
        old_state: old,
        new_state: new,
        laddr: conn.laddr,
        raddr: conn.raddr,
        ..Event::default()
    };
    if owner_exiting(cfg, conn.owner) {
        ev.flags |= event_flag::OWNER_EXITING;
    }
    emit(&ev, watched(conn.owner));
}

/// The end of a connection no process claimed (it was in `PENDING`).
///
/// Closed by its holder before any send or receive: `close()` and
/// `shutdown()` are the only ways to FIN_WAIT1 or LAST_ACK, and they run
/// in the process doing them, which holds the fd (a socket is attached:
/// it was accepted). That process is its owner, and the close its first
/// I/O: an accept and a close by it. Any other end (a reset, or a child
/// still in an accept queue) is reported as a queue drop; its owner is
/// unknown here, so while any drain waits it wakes the reader at once (it
/// may be the last connection of a target), and if the process whose
/// exit released it is current, that process is named.
#[inline(never)]
fn report_pending_end(sk: u64, conn: &LiveConn, old: u8, new: u8) {
    let cfg = config();
    let mut ev = Event {
        ts_ns: now_ns(),
        sk,
        netns: conn.netns,
        family: conn.family,
        lport: conn.lport,
        rport: conn.rport,
        kind: event_kind::QUEUE_DROP,
        old_state: old,
        new_state: new,
        laddr: conn.laddr,
        raddr: conn.raddr,
        ..Event::default()
    };
    let by_holder = matches!(new, tcp_state::FIN_WAIT1 | tcp_state::LAST_ACK)
        && kread::<u64>(sk, cfg.sk_socket).is_ok_and(|s| s != 0)
        && !current_is_kthread(&cfg);
    if by_holder && current_into(&cfg, &mut ev) {
        ev.kind = event_kind::ACCEPT;
        ev.flags = event_flag::WAS_QUEUED;
        emit(&ev, false);
        ev.kind = event_kind::CLOSE;
        ev.flags = 0;
        if current_exiting(&cfg) {
            ev.flags |= event_flag::OWNER_EXITING;
        }
        emit(&ev, watched(ev.tgid));
        return;
    }
    // Released by an exiting process (its fds closed by `exit()`, in its
    // own context): it held the listener this connection was queued on,
    // and loses it. Userspace counts it against that exit.
    if let Some(tgid) = current_tgid(&cfg)
        && current_exiting(&cfg)
    {
        ev.tgid = tgid;
        ev.flags |= event_flag::OWNER_EXITING;
    }
    emit(&ev, control(control::WATCHING) != 0);
}

/// If `sk`'s tuple is in `PREEXISTING`, removes it and reports its end.
/// Costs nothing while no pre-existing connection is registered.
#[inline(always)]
fn end_preexisting(cfg: &Config, sk: u64, old: u8, new: u8) -> Result<(), i32> {
    if control(control::PREEXISTING_REGISTERED) <= control(control::PREEXISTING_ENDED) {
        return Ok(());
    }
    let Some(mut ev) = sock_event(cfg, sk, event_kind::PREEXISTING_CLOSE, old, new)? else {
        return Ok(());
    };
    let key = TupleKey {
        netns: ev.netns,
        family: ev.family,
        lport: ev.lport,
        rport: ev.rport,
        _pad: 0,
        laddr: ev.laddr,
        raddr: ev.raddr,
    };
    if let Some(owner) = PREEXISTING.get_ptr(key) {
        // SAFETY: as above.
        let owner = unsafe { *owner };
        if PREEXISTING.remove(key).is_ok() {
            bump(&CONTROL, control::PREEXISTING_ENDED);
            ev.tgid = owner;
            if owner_exiting(cfg, owner) {
                ev.flags |= event_flag::OWNER_EXITING;
            }
            // Pre-existing connections are counted in userspace only, so
            // any of them may be a drain's last.
            emit(&ev, watched(owner));
        }
    }
    Ok(())
}

/// The kernel is freeing `sk` (TP_PROTO(struct sock *sk)), which is in
/// CLOSE by then. It runs for every TCP socket, so the common case (the end
/// was already reported) is one hash lookup, plus a look by tuple only
/// while pre-existing connections are registered.
fn try_tcp_destroy_sock(ctx: &RawTracePointContext) -> Result<(), i32> {
    let sk: u64 = ctx.arg(0);
    if end_live(sk, tcp_state::CLOSE, tcp_state::CLOSE) {
        return Ok(());
    }
    if let Some(pending) = take_pending(sk) {
        report_pending_end(sk, &pending, tcp_state::CLOSE, tcp_state::CLOSE);
        return Ok(());
    }
    end_preexisting(&config(), sk, tcp_state::CLOSE, tcp_state::CLOSE)
}

/// Records `ev` (an ACCEPT by current) in `LIVE` and reports it.
#[inline(always)]
fn own(cfg: &Config, sk: u64, ev: &mut Event) -> Result<(), i32> {
    let conn = LiveConn {
        accepted_ns: ev.ts_ns,
        owner: ev.tgid,
        netns: ev.netns,
        family: ev.family,
        lport: ev.lport,
        rport: ev.rport,
        _pad: 0,
        laddr: ev.laddr,
        raddr: ev.raddr,
    };
    // An entry for this address is a freed socket whose end was never
    // seen (the address was reused): report that end first, so userspace
    // reads it before this birth.
    end_live(sk, tcp_state::CLOSE, tcp_state::CLOSE);
    emit(ev, false);
    if let Err(e) = LIVE.insert(sk, conn, BPF_NOEXIST as u64) {
        // EEXIST after the removal above needs a second claim of the same
        // socket, which `PENDING` rules out: the newer entry wins then.
        let replaced = e == -EEXIST && LIVE.insert(sk, conn, BPF_ANY as u64).is_ok();
        if !replaced {
            // The map is full. Userspace counts the episode from STATS
            // and rescans; the compensating CLOSE keeps its counts exact
            // until then.
            bump(&STATS, stat::MAP_FULL);
            ev.kind = event_kind::CLOSE;
            ev.flags |= event_flag::MAP_FULL;
            emit(ev, false);
            return Ok(());
        }
    }

    // The connection may have ended between its handshake and this claim
    // (a reset racing the first I/O on another CPU).
    let state: u8 = kread(sk, cfg.skc_state)?;
    if !matches!(
        state,
        tcp_state::ESTABLISHED | tcp_state::CLOSE_WAIT | tcp_state::SYN_RECV
    ) && LIVE.remove(sk).is_ok()
    {
        ev.kind = event_kind::CLOSE;
        ev.ts_ns = now_ns();
        ev.new_state = state;
        emit(ev, watched(ev.tgid));
    }
    Ok(())
}

/// `EEXIST` as the map helpers return it (negated).
const EEXIST: i32 = 17;

#[inline(always)]
fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
