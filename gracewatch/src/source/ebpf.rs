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
    programs::TracePoint,
};
use gracewatch_common::{AF_INET, AF_INET6, Event, TupleKey, event_flag, event_kind, stat};
use tokio::io::unix::AsyncFd;

use super::{MonitorError, kernel_layout};
use crate::event::{ConnEvent, ListenAddr, Tuple};

/// Sizes of the kernel-side tables.
#[derive(Clone, Copy, Debug)]
pub struct SourceOptions {
    /// Capacity of each per-socket map (queued, live, pre-existing).
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
    logger: Option<AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>>,
    preexisting: HashMap<MapData, TupleKey, u32>,
    stats: Array<MapData, u64>,
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
            .map_max_entries("QUEUED", entries)
            .map_max_entries("LIVE", entries)
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

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => super::register_readable(l).ok(),
            Err(e) => {
                log::debug!("eBPF logger unavailable: {e}");
                None
            }
        };
        for (category, name) in kernel_layout::TRACEPOINTS {
            attach(&mut ebpf, category, name).map_err(MonitorError::from_load)?;
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
        let stats =
            Array::try_from(take(&mut ebpf, "STATS")?).context("failed to open map `STATS`")?;
        Ok(Self {
            events,
            logger,
            preexisting,
            stats,
            _ebpf: ebpf,
        })
    }

    /// Waits until the ring buffer (or the programs' log) has something.
    pub async fn readable(&mut self) -> anyhow::Result<()> {
        match &mut self.logger {
            Some(logger) => {
                tokio::select! {
                    r = self.events.readable_mut() => { r.context("failed to poll ring buffer")?.clear_ready(); }
                    r = logger.readable_mut() => {
                        let mut guard = r.context("failed to poll eBPF log")?;
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                }
            }
            None => {
                self.events
                    .readable_mut()
                    .await
                    .context("failed to poll ring buffer")?
                    .clear_ready();
            }
        }
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

    /// Sockets the kernel could not track because a map was full.
    pub fn untracked_map_full(&self) -> u64 {
        self.stats.get(&stat::MAP_FULL, 0).unwrap_or(0)
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
        self.preexisting
            .insert(tuple_key(tuple), pid, 0)
            .with_context(|| {
                format!(
                    "failed to register pre-existing connection {} → {}",
                    tuple.remote, tuple.local
                )
            })
    }

    /// Removes a registration. `true` if it was still there, i.e. the
    /// programs never reported the connection's end.
    pub fn unregister_preexisting(&mut self, tuple: &Tuple) -> bool {
        self.preexisting.remove(&tuple_key(tuple)).is_ok()
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

fn attach(ebpf: &mut Ebpf, category: &str, name: &str) -> anyhow::Result<()> {
    let prog: &mut TracePoint = ebpf
        .program_mut(name)
        .with_context(|| format!("eBPF object has no program `{name}`"))?
        .try_into()
        .with_context(|| format!("program `{name}` is not a tracepoint"))?;
    prog.load()
        .with_context(|| format!("failed to load program `{name}`"))?;
    prog.attach(category, name)
        .with_context(|| format!("failed to attach tracepoint `{category}/{name}`"))?;
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
