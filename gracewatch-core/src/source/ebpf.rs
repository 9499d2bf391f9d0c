//! Loads `gracewatch-ebpf` into the kernel, attaches its tracepoints, and
//! turns ring-buffer records into [`ConnEvent`]s.
//!
//! Everything the programs attach is owned by file descriptors held in
//! [`EbpfSource`]: when it drops, or when the process dies for any reason
//! (SIGKILL included), the kernel detaches and frees the programs, links and
//! maps. Nothing is pinned, so nothing can be left behind.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    time::Duration,
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, RingBuf},
    programs::RawTracePoint,
};
use gracewatch_common::{
    AF_INET, AF_INET6, Event, LiveConn, READER_QUIET_NS, READER_TAIL_NS, TupleKey, control,
    event_flag, event_kind, stat,
};
use tokio::io::unix::AsyncFd;

use super::{MonitorError, kernel_layout};
use crate::event::{ConnEvent, ListenAddr, Tuple};

/// While records keep coming, the reader looks at the ring buffer this often
/// without being woken (the programs wake it at once only for records that
/// can end a drain: see `gracewatch_common::WAKEUP_INTERVAL_NS`).
pub const READER_TAIL: Duration = Duration::from_nanos(READER_TAIL_NS);

/// After this long without records the reader waits for a wake-up alone.
pub const READER_QUIET: Duration = Duration::from_nanos(READER_QUIET_NS);

/// Sizes of the kernel-side tables.
#[derive(Clone, Copy, Debug)]
pub struct SourceOptions {
    /// Capacity of each per-socket map (pending, live, pre-existing).
    pub max_connections: u32,
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub ring_buffer_bytes: u32,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            max_connections: 1 << 20,
            ring_buffer_bytes: 1 << 22,
        }
    }
}

pub struct EbpfSource {
    // Field order is drop order: readers first, then the programs and maps.
    events: AsyncFd<RingBuf<MapData>>,
    preexisting: HashMap<MapData, TupleKey, u32>,
    /// The kernel's `LIVE` map (sk → accepted connection).
    live: HashMap<MapData, u64, LiveConn>,
    /// Registrations in `preexisting` less userspace's own removals, as
    /// last written to `CONTROL[PREEXISTING_REGISTERED]`.
    preexisting_registered: u64,
    stats: Array<MapData, u64>,
    control: Array<MapData, u64>,
    /// The kernel's `WATCHED` map.
    watched: HashMap<MapData, u32, u8>,
    /// The pids in `WATCHED`, counted in `CONTROL[WATCHING]`.
    watching: std::collections::BTreeSet<u32>,
    _ebpf: Ebpf,
}

impl EbpfSource {
    /// Loads the programs with this kernel's offsets and attaches them.
    pub fn start(opts: SourceOptions) -> Result<Self, MonitorError> {
        super::check_capabilities()?;
        let cfg = kernel_layout::resolve()?;
        let ring = opts.ring_buffer_bytes.max(4096).next_power_of_two();
        let entries = opts.max_connections.max(1024);
        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &cfg, true)
            .map_max_entries("LIVE", entries)
            .map_max_entries("PENDING", entries)
            .map_max_entries("PREEXISTING", entries)
            .map_max_entries("EVENTS", ring)
            .load(aya::include_bytes_aligned!(concat!(
                env!("OUT_DIR"),
                "/gracewatch"
            )))
            .map_err(|e| {
                MonitorError::from_load(
                    anyhow::Error::new(e).context("failed to load the eBPF programs"),
                )
            })?;

        for name in kernel_layout::RAW_TRACEPOINTS {
            attach_raw(&mut ebpf, name).map_err(MonitorError::from_load)?;
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("eBPF object has no map `{name}`"))
        };
        let events = RingBuf::try_from(take(&mut ebpf, "EVENTS")?)
            .context("failed to open ring buffer `EVENTS`")?;
        let events =
            super::register_readable(events).context("failed to poll ring buffer `EVENTS`")?;
        let preexisting = HashMap::try_from(take(&mut ebpf, "PREEXISTING")?)
            .context("failed to open map `PREEXISTING`")?;
        let live =
            HashMap::try_from(take(&mut ebpf, "LIVE")?).context("failed to open map `LIVE`")?;
        let stats =
            Array::try_from(take(&mut ebpf, "STATS")?).context("failed to open map `STATS`")?;
        let control =
            Array::try_from(take(&mut ebpf, "CONTROL")?).context("failed to open map `CONTROL`")?;
        let watched = HashMap::try_from(take(&mut ebpf, "WATCHED")?)
            .context("failed to open map `WATCHED`")?;
        Ok(Self {
            events,
            preexisting,
            live,
            preexisting_registered: 0,
            stats,
            control,
            watched,
            watching: std::collections::BTreeSet::new(),
            _ebpf: ebpf,
        })
    }

    /// Waits until the ring buffer has something.
    pub async fn readable(&mut self) -> anyhow::Result<()> {
        self.events
            .readable_mut()
            .await
            .context("failed to poll ring buffer")?
            .clear_ready();
        Ok(())
    }

    /// Decodes every record waiting in the ring buffer into `out`.
    pub fn drain(&mut self, out: &mut Vec<ConnEvent>) {
        let ring = self.events.get_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<Event>() {
                continue;
            }
            // SAFETY: the programs only submit `Event`s (checked length); the
            // record may be unaligned, hence read_unaligned.
            let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) };
            if let Some(ev) = decode(&ev) {
                out.push(ev);
            }
        }
    }

    /// Events the kernel could not deliver since load.
    pub fn lost_events(&self) -> u64 {
        self.stats.get(&stat::LOST_EVENTS, 0).unwrap_or(0)
    }

    /// Connections the kernel could not track since load, because `LIVE`
    /// (claims) or `PENDING` (handshakes) was full (`None` if a counter
    /// cannot be read).
    pub fn untracked_map_full(&self) -> Option<u64> {
        let live = self.stats.get(&stat::MAP_FULL, 0).ok()?;
        let pending = self.stats.get(&stat::PENDING_FULL, 0).ok()?;
        Some(live + pending)
    }

    /// Time the kernel spent running our programs, and how many times they
    /// ran, since they were loaded (the `bpf_prog_info` `run_time_ns` and
    /// `run_cnt`). Both stay at zero while the kernel's BPF statistics are
    /// off: see [`enable_run_time_stats`].
    pub fn program_stats(&self) -> anyhow::Result<ProgramStats> {
        let mut total = ProgramStats::default();
        for (name, prog) in self._ebpf.programs() {
            let info = prog
                .info()
                .with_context(|| format!("failed to read the info of program `{name}`"))?;
            total.run_time += info.run_time();
            total.run_count += info.run_count();
        }
        Ok(total)
    }

    /// Tells the programs about a connection that was live before they
    /// attached, so its end is reported as `PreexistingClose`.
    pub fn register_preexisting(&mut self, tuple: &Tuple, pid: u32) -> anyhow::Result<()> {
        // Raised before the insert: the programs look into the map only
        // while this count is ahead of the entries they removed.
        self.set_preexisting_registered(self.preexisting_registered + 1)?;
        let inserted = self.preexisting.insert(tuple_key(tuple), pid, 0);
        if inserted.is_err() {
            self.set_preexisting_registered(self.preexisting_registered - 1)?;
        }
        inserted.with_context(|| {
            format!(
                "failed to register pre-existing connection {} → {}",
                tuple.remote, tuple.local
            )
        })
    }

    /// Removes a registration. `true` if it was still there, i.e. the
    /// programs never reported the connection's end.
    pub fn unregister_preexisting(&mut self, tuple: &Tuple) -> bool {
        let removed = self.preexisting.remove(&tuple_key(tuple)).is_ok();
        if removed {
            // Lowered after the removal, for the same reason. Failing to
            // lower it only costs the programs a needless lookup.
            let _ = self.set_preexisting_registered(self.preexisting_registered - 1);
        }
        removed
    }

    /// Drops the `LIVE` entry of a connection the programs reported
    /// (accepted at `since`) that a rescan found gone: its end was missed,
    /// and the entry would stay until the socket is freed. An entry
    /// accepted at another time belongs to a later socket at the same
    /// address and is left alone.
    pub fn forget_live(&mut self, sk: u64, since: Duration) {
        let accepted_ns = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        match self.live.get(&sk, 0) {
            Ok(conn) if conn.accepted_ns == accepted_ns => {
                // Fails only if the programs removed it meanwhile (and
                // reported its end, which the tracker no longer needs).
                let _ = self.live.remove(&sk);
            }
            _ => {}
        }
    }

    /// Whether a drain waits on `pid`: any close of a connection a watched
    /// process owns wakes the reader at once (others are read within
    /// [`READER_TAIL`]).
    pub fn set_watched(&mut self, pid: u32, on: bool) -> anyhow::Result<()> {
        if on {
            self.watched
                .insert(pid, 1, 0)
                .with_context(|| format!("failed to watch pid {pid} in map `WATCHED`"))?;
            self.watching.insert(pid);
        } else {
            // Fails only if it was never inserted: nothing to undo.
            let _ = self.watched.remove(&pid);
            self.watching.remove(&pid);
        }
        // Raised after the insert and lowered after the removal, so the
        // programs never see a watched pid with the count at zero.
        self.control
            .set(control::WATCHING, self.watching.len() as u64, 0)
            .context("failed to update map `CONTROL`")
    }

    fn set_preexisting_registered(&mut self, n: u64) -> anyhow::Result<()> {
        self.control
            .set(control::PREEXISTING_REGISTERED, n, 0)
            .context("failed to update map `CONTROL`")?;
        self.preexisting_registered = n;
        Ok(())
    }
}

impl super::Source for EbpfSource {
    // The programs wake the reader at once only for records that can end
    // a drain, so while records keep coming the monitor also looks on its own.
    const TAIL: Option<(Duration, Duration)> = Some((READER_QUIET, READER_TAIL));

    fn readable(&mut self) -> impl std::future::Future<Output = anyhow::Result<()>> + Send {
        EbpfSource::readable(self)
    }

    fn drain(&mut self, out: &mut Vec<ConnEvent>) {
        EbpfSource::drain(self, out);
    }

    fn now(&self) -> Duration {
        super::monotonic_now()
    }

    fn liveness(&self, pid: u32) -> super::Liveness {
        super::liveness(pid)
    }

    fn cgroup_of(&self, pid: u32) -> Option<String> {
        super::process::cgroup_of(pid)
    }

    fn rescanner(&self) -> Option<super::Rescanner> {
        Some(|| super::snapshot::take_with_fds(super::monotonic_now))
    }

    fn lost_events(&self) -> u64 {
        EbpfSource::lost_events(self)
    }

    fn untracked_map_full(&self) -> Option<u64> {
        EbpfSource::untracked_map_full(self)
    }

    fn program_stats(&self) -> anyhow::Result<Option<ProgramStats>> {
        EbpfSource::program_stats(self).map(Some)
    }

    fn register_preexisting(&mut self, tuple: &Tuple, pid: u32) -> anyhow::Result<()> {
        EbpfSource::register_preexisting(self, tuple, pid)
    }

    fn unregister_preexisting(&mut self, tuple: &Tuple) -> bool {
        EbpfSource::unregister_preexisting(self, tuple)
    }

    fn forget_live(&mut self, sk: u64, since: Duration) {
        EbpfSource::forget_live(self, sk, since);
    }

    fn set_watched(&mut self, pid: u32, on: bool) -> anyhow::Result<()> {
        EbpfSource::set_watched(self, pid, on)
    }
}

/// Run-time statistics of the loaded programs, summed over all of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramStats {
    pub run_time: Duration,
    pub run_count: u64,
}

/// Turns on the kernel's BPF run-time statistics (`BPF_ENABLE_STATS`, like
/// `sysctl kernel.bpf_stats_enabled=1`) for as long as the returned fd is
/// open. It costs every BPF program on the host two clock reads per run,
/// so only long-lived consumers that report it (the agent) ask for it.
pub fn enable_run_time_stats() -> anyhow::Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow::anyhow!("failed to enable BPF run-time statistics: {e}"))
}

fn attach_raw(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let prog: &mut RawTracePoint = ebpf
        .program_mut(name)
        .with_context(|| format!("eBPF object has no program `{name}`"))?
        .try_into()
        .with_context(|| format!("program `{name}` is not a raw tracepoint"))?;
    prog.load()
        .with_context(|| format!("failed to load program `{name}`"))?;
    prog.attach(name)
        .with_context(|| format!("failed to attach raw tracepoint `{name}`"))?;
    Ok(())
}

fn tuple_key(t: &Tuple) -> TupleKey {
    let (family, laddr) = addr_bytes(&t.local);
    let (_, raddr) = addr_bytes(&t.remote);
    TupleKey {
        netns: t.netns,
        family,
        lport: t.local.port(),
        rport: t.remote.port(),
        _pad: 0,
        laddr,
        raddr,
    }
}

/// Family and the 16-byte form the tracepoint uses (IPv4 mapped).
fn addr_bytes(a: &SocketAddr) -> (u16, [u8; 16]) {
    match a {
        SocketAddr::V4(v4) => (AF_INET, v4.ip().to_ipv6_mapped().octets()),
        SocketAddr::V6(v6) => (AF_INET6, v6.ip().octets()),
    }
}

fn sockaddr(family: u16, bytes: [u8; 16], port: u16) -> SocketAddr {
    let v6 = Ipv6Addr::from(bytes);
    if family == AF_INET {
        let v4 = v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED);
        SocketAddr::V4(SocketAddrV4::new(v4, port))
    } else {
        SocketAddr::V6(SocketAddrV6::new(v6, port, 0, 0))
    }
}

fn comm(bytes: &[u8; 16]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Raw record → event; `None` for records this version does not know.
pub fn decode(ev: &Event) -> Option<ConnEvent> {
    let at = Duration::from_nanos(ev.ts_ns);
    let local = sockaddr(ev.family, ev.laddr, ev.lport);
    let tuple = Tuple {
        netns: ev.netns,
        local,
        remote: sockaddr(ev.family, ev.raddr, ev.rport),
    };
    let addr = ListenAddr {
        netns: ev.netns,
        local,
    };
    Some(match ev.kind {
        event_kind::LISTEN_START => ConnEvent::ListenStart {
            at,
            sk: ev.sk,
            addr,
            pid: ev.tgid,
            comm: comm(&ev.comm),
        },
        event_kind::LISTEN_STOP => ConnEvent::ListenStop {
            at,
            sk: ev.sk,
            addr,
            pid: ev.tgid,
            comm: comm(&ev.comm),
        },
        event_kind::HANDSHAKE => ConnEvent::Handshake {
            at,
            sk: ev.sk,
            tuple,
        },
        event_kind::ACCEPT => ConnEvent::Accept {
            at,
            sk: ev.sk,
            tuple,
            pid: ev.tgid,
            comm: comm(&ev.comm),
            was_queued: ev.flags & event_flag::WAS_QUEUED != 0,
        },
        event_kind::CLOSE => ConnEvent::Close {
            at,
            sk: ev.sk,
            tuple,
            pid: ev.tgid,
            by_exit: ev.flags & event_flag::OWNER_EXITING != 0,
        },
        event_kind::QUEUE_DROP => ConnEvent::QueueDrop {
            at,
            sk: ev.sk,
            tuple,
            exiting: if ev.flags & event_flag::OWNER_EXITING != 0 {
                ev.tgid
            } else {
                0
            },
        },
        event_kind::PREEXISTING_CLOSE => ConnEvent::PreexistingClose {
            at,
            tuple,
            pid: ev.tgid,
            by_exit: ev.flags & event_flag::OWNER_EXITING != 0,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_ipv4_accept_and_ipv6_close() {
        let mut ev = Event {
            ts_ns: 5_000_000,
            sk: 0xffff_8880_0000_1000,
            tgid: 42,
            netns: 4026531840,
            family: AF_INET,
            lport: 8080,
            rport: 40000,
            kind: event_kind::ACCEPT,
            flags: event_flag::WAS_QUEUED,
            laddr: Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets(),
            raddr: Ipv4Addr::new(127, 0, 0, 2).to_ipv6_mapped().octets(),
            ..Event::default()
        };
        ev.comm[..5].copy_from_slice(b"nginx");
        let Some(ConnEvent::Accept {
            at,
            tuple,
            pid,
            comm,
            was_queued,
            ..
        }) = decode(&ev)
        else {
            panic!("expected an accept");
        };
        assert_eq!(at, Duration::from_millis(5));
        assert_eq!(tuple.local, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(tuple.remote, "127.0.0.2:40000".parse().expect("addr"));
        assert_eq!((pid, comm.as_str(), was_queued), (42, "nginx", true));

        ev.kind = event_kind::CLOSE;
        ev.family = AF_INET6;
        ev.laddr = Ipv6Addr::LOCALHOST.octets();
        let Some(ConnEvent::Close { tuple, .. }) = decode(&ev) else {
            panic!("expected a close");
        };
        assert_eq!(tuple.local, "[::1]:8080".parse().expect("addr"));
        // A dual-stack socket keeps its IPv4-mapped peer as IPv6.
        assert_eq!(
            tuple.remote,
            "[::ffff:127.0.0.2]:40000".parse().expect("addr")
        );

        ev.kind = 200;
        assert_eq!(decode(&ev), None);
    }

    #[test]
    fn tuple_key_matches_the_tracepoint_layout() {
        let t = Tuple {
            netns: 7,
            local: "10.0.0.1:80".parse().expect("addr"),
            remote: "10.0.0.2:5555".parse().expect("addr"),
        };
        let k = tuple_key(&t);
        assert_eq!(
            (k.family, k.lport, k.rport, k.netns),
            (AF_INET, 80, 5555, 7)
        );
        assert_eq!(&k.laddr[10..], &[0xff, 0xff, 10, 0, 0, 1]);
        let t6 = Tuple {
            netns: 7,
            local: "[::]:80".parse().expect("addr"),
            remote: "[::ffff:10.0.0.2]:5555".parse().expect("addr"),
        };
        let k6 = tuple_key(&t6);
        assert_eq!(k6.family, AF_INET6);
        assert_eq!(k6.raddr, k.raddr);
    }
}
