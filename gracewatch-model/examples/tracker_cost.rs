//! What the tracker costs per connection, in userspace alone: a stream of
//! handshake, accept and close events (the three records the kernel side
//! sends per connection) for `N` connections from varied remote addresses
//! and ports, `WINDOW` of them live at a time, folded into a fresh
//! [`Tracker`]. Prints ns per connection, median and spread of the rounds,
//! as on-CPU time of this thread (`/proc/thread-self/schedstat`, so time
//! preempted by other work on a shared machine is not counted) and as wall
//! time.
//!
//! `cargo run --release -p gracewatch-model --example tracker_cost [N] [WINDOW] [ROUNDS]`
//!
//! Not a test and not part of `cargo xtask bench`: it isolates the
//! tracker (hashing, tables, tombstones) from the kernel, the ring buffer
//! and the monitor, to compare changes to the tracker itself.

use std::{hint::black_box, net::SocketAddr, time::Duration, time::Instant};

use gracewatch_model::{
    event::{ConnEvent, ListenAddr, Tuple},
    tracker::Tracker,
};

const NETNS: u32 = 4_026_531_840;
const PID: u32 = 4242;

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

/// Connection `i`'s tuple: a remote address and port that vary like
/// clients behind many hosts (a cheap mix, so neighbours differ).
fn tuple(i: u64) -> Tuple {
    let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let ip = [10, (x >> 8) as u8, (x >> 16) as u8, (x >> 24) as u8];
    let port = 1024 + (x >> 40) as u16 % 64_000;
    Tuple {
        netns: NETNS,
        local: SocketAddr::from(([10, 0, 0, 1], 80)),
        remote: SocketAddr::from((ip, port)),
    }
}

/// The events of `n` connections with `window` live at once: each
/// connection's handshake and accept, and the close of the one `window`
/// earlier.
fn stream(n: u64, window: u64) -> Vec<ConnEvent> {
    let mut out = Vec::with_capacity(3 * n as usize + 1);
    out.push(ConnEvent::ListenStart {
        at: Duration::ZERO,
        sk: 1,
        addr: ListenAddr {
            netns: NETNS,
            local: SocketAddr::from(([0, 0, 0, 0], 80)),
        },
        pid: PID,
        comm: "server".into(),
    });
    let sk = |i: u64| 0xffff_8880_0000_0000 + i * 0x800;
    let at = |i: u64| Duration::from_micros(10 + i);
    for i in 0..n + window {
        if i < n {
            out.push(ConnEvent::Handshake {
                at: at(i),
                sk: sk(i),
                tuple: tuple(i),
            });
            out.push(ConnEvent::Accept {
                at: at(i),
                sk: sk(i),
                tuple: tuple(i),
                pid: PID,
                comm: "server".into(),
                was_queued: true,
            });
        }
        if let Some(c) = i.checked_sub(window) {
            out.push(ConnEvent::Close {
                at: at(i),
                sk: sk(c),
                tuple: tuple(c),
                pid: PID,
                by_exit: false,
            });
        }
    }
    out
}

/// Nanoseconds this thread has run on a CPU.
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("/proc/thread-self/schedstat is readable")
}

fn spread(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{:.0} ns per connection (median) [{:.0}-{:.0}]",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1]
    )
}

fn main() {
    let n = arg(1, 200_000) as u64;
    let window = arg(2, 1_000) as u64;
    let rounds = arg(3, 15);
    let events = stream(n, window);
    let mut wall = Vec::with_capacity(rounds);
    let mut cpu = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let mut tracker = Tracker::new();
        let (t0, c0) = (Instant::now(), cpu_ns());
        for ev in &events {
            tracker.apply(black_box(ev));
        }
        let (took, cpu_took) = (t0.elapsed(), cpu_ns() - c0);
        let status = tracker.status(Duration::from_secs(3600));
        assert!(
            status.processes.iter().all(|p| p.live == 0),
            "every connection closed"
        );
        black_box(status);
        wall.push(took.as_nanos() as f64 / n as f64);
        cpu.push(cpu_took as f64 / n as f64);
    }
    println!("tracker: {n} connections ({window} live at a time), {rounds} rounds");
    println!("  on-CPU: {}", spread(cpu));
    println!("  wall:   {}", spread(wall));
}
