//! The processes on this host that hold the other ends of chosen
//! connections ("who pins it"): on demand, never on a tick.
//!
//! For a server-side connection `local → remote` in namespace N, the other
//! end, if it is on this host in N, is the socket whose local address is
//! `remote` and whose remote address is `local`. One sock_diag dump per
//! namespace (filtered by the peers' ports) finds those sockets and their
//! inodes; a walk of `/proc/*/fd` then finds the processes holding those
//! inodes, the processes living in N first, and stops as soon as each has a
//! holder. The walk is the costly part, so it is bounded in time and in
//! socket fds read ([`WalkBounds`]); whatever it does not reach stays
//! unnamed. A second dump after the walk keeps only the ends whose socket
//! still has the inode the walk matched: a name is never a guess, and an
//! end that closed meanwhile is unnamed rather than wrong.
//!
//! IPv4-mapped addresses (a dual-stack server's IPv4 clients) are compared
//! as IPv4: the client's socket is usually an IPv4 one.

use std::{
    collections::{HashMap, HashSet},
    mem::MaybeUninit,
    net::SocketAddr,
    os::fd::AsFd,
    time::{Duration, Instant},
};

use anyhow::Context;
use netlink_packet_sock_diag::inet::StateFlags;
use rustix::fs::{AtFlags, Mode, OFlags};

use super::{
    families, in_each_netns, ports_filter,
    procfs::{DIRENT_BUF, list_pids, open_dir, read_comm, socket_inodes},
    sock_diag::dump_tcp,
};
use crate::{
    event::{NetNs, Tuple},
    source::process::cgroup_in,
};

/// How far one walk may go.
#[derive(Clone, Copy, Debug)]
pub struct WalkBounds {
    /// Stop after this long (checked between processes).
    pub time: Duration,
    /// Stop after reading this many socket fds (checked between processes).
    pub socket_fds: u64,
}

impl Default for WalkBounds {
    fn default() -> Self {
        Self {
            time: Duration::from_secs(1),
            socket_fds: 1_000_000,
        }
    }
}

/// A process holding the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEnd {
    pub pid: u32,
    pub comm: String,
    /// Its cgroup v2 path, if readable.
    pub cgroup: Option<String>,
}

/// What one walk found, and what it cost.
#[derive(Clone, Debug, Default)]
pub struct PeerWalk {
    /// Each connection asked about, with the process holding its other end
    /// (`None`: not on this host in that namespace, held by nobody, closed
    /// meanwhile, or past the walk's bounds), sorted by tuple.
    pub ends: Vec<(Tuple, Option<PeerEnd>)>,
    /// Other ends the dump found on this host (with an inode).
    pub local_ends: usize,
    pub processes_read: u64,
    pub socket_fds_read: u64,
    /// The walk stopped at a bound before every end had a holder.
    pub bounded: bool,
    pub took: Duration,
}

/// The canonical form of an address: IPv4-mapped IPv6 as IPv4.
fn canon(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// States the other end of a live server-side connection can be in (the
/// client's side of a CLOSE_WAIT is FIN_WAIT2).
fn end_states() -> StateFlags {
    StateFlags::ESTABLISHED
        | StateFlags::FIN_WAIT1
        | StateFlags::FIN_WAIT2
        | StateFlags::CLOSE_WAIT
        | StateFlags::CLOSING
        | StateFlags::LAST_ACK
}

/// The inode of each of `conns`' other ends that one dump per namespace
/// shows on this host (0, "held by nobody", left out).
fn other_end_inodes(conns: &[(Tuple, u32)]) -> anyhow::Result<HashMap<Tuple, u64>> {
    // (netns, the other end's local, its remote) → our tuple.
    let mut wanted: HashMap<(NetNs, SocketAddr, SocketAddr), Tuple> = HashMap::new();
    for (t, _) in conns {
        wanted.insert((t.netns, canon(t.remote), canon(t.local)), *t);
    }
    let mut found = HashMap::new();
    in_each_netns(conns, |netns, socket, here| {
        let Some(socket) = socket else {
            return Ok(());
        };
        let filter = ports_filter(here.iter().map(|t| t.remote.port()));
        // A mapped peer's end is an IPv4 socket, or a dual-stack IPv6 one.
        let v4 = here.iter().any(|t| t.remote.ip().to_canonical().is_ipv4());
        let v6 = here.iter().any(|t| t.remote.is_ipv6());
        for family in families(v4, v6) {
            dump_tcp(socket, family, end_states(), &filter, |s| {
                if s.inode == 0 {
                    return;
                }
                if let Some(t) = wanted.get(&(netns, canon(s.local), canon(s.remote))) {
                    found.insert(*t, s.inode);
                }
            })
            .with_context(|| format!("failed to dump the peers' sockets in netns {netns}"))?;
        }
        Ok(())
    })?;
    Ok(found)
}

/// The process holding the other end of each of `conns` (each with a pid
/// holding it, to find its namespace), looked for on this host within
/// `bounds`. See the module documentation.
pub fn peer_ends(conns: &[(Tuple, u32)], bounds: WalkBounds) -> anyhow::Result<PeerWalk> {
    let start = Instant::now();
    let inodes = other_end_inodes(conns)?;
    let mut walk = PeerWalk {
        local_ends: inodes.len(),
        ..PeerWalk::default()
    };
    let mut holder: HashMap<u64, PeerEnd> = HashMap::new();
    if !inodes.is_empty() {
        let mut left: HashSet<u64> = inodes.values().copied().collect();
        let nets: HashSet<NetNs> = inodes.keys().map(|t| t.netns).collect();
        let proc_dir = open_dir(rustix::fs::CWD, "/proc").context("failed to open /proc")?;
        let mut pids = list_pids(proc_dir.as_fd()).context("failed to list processes in /proc")?;
        // The peers' own namespace first: that is where clients live.
        let in_nets = |pid: &u32| {
            rustix::fs::statat(proc_dir.as_fd(), format!("{pid}/ns/net"), AtFlags::empty())
                .ok()
                .and_then(|st| NetNs::try_from(st.st_ino).ok())
                .is_some_and(|ns| nets.contains(&ns))
        };
        let mut keyed: Vec<(bool, u32)> = pids.drain(..).map(|p| (!in_nets(&p), p)).collect();
        // Stable: within each part, /proc's order by fd count holds.
        keyed.sort_by_key(|k| k.0);
        let mut buf = vec![MaybeUninit::uninit(); DIRENT_BUF];
        for (_, pid) in keyed {
            if left.is_empty() {
                break;
            }
            if start.elapsed() >= bounds.time || walk.socket_fds_read >= bounds.socket_fds {
                walk.bounded = true;
                break;
            }
            // A process that exited or denies access is simply not a holder.
            let Ok(dir) = open_dir(proc_dir.as_fd(), pid.to_string()) else {
                continue;
            };
            walk.processes_read += 1;
            let mut hits = Vec::new();
            let _ = socket_inodes(dir.as_fd(), &mut buf, |_, inode| {
                walk.socket_fds_read += 1;
                if left.contains(&inode) {
                    hits.push(inode);
                }
            });
            if hits.is_empty() {
                continue;
            }
            // Read relative to the directory the fds were read through, so
            // a recycled pid cannot lend its name.
            let comm = read_comm(dir.as_fd()).unwrap_or_default();
            let cgroup = rustix::fs::openat(
                dir.as_fd(),
                "cgroup",
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ok()
            .and_then(|fd| cgroup_in(fd.into()));
            for inode in hits {
                left.remove(&inode);
                holder.entry(inode).or_insert_with(|| PeerEnd {
                    pid,
                    comm: comm.clone(),
                    cgroup: cgroup.clone(),
                });
            }
        }
    }
    // Only ends whose socket still has the inode the walk matched: an end
    // that closed (and whose inode number could be reused) is unnamed.
    let asks: Vec<(Tuple, u32)> = conns
        .iter()
        .filter(|(t, _)| inodes.get(t).is_some_and(|i| holder.contains_key(i)))
        .copied()
        .collect();
    let still = if asks.is_empty() {
        HashMap::new()
    } else {
        other_end_inodes(&asks)?
    };
    walk.ends = conns
        .iter()
        .map(|(t, _)| {
            let end = inodes
                .get(t)
                .filter(|&&i| still.get(t) == Some(&i))
                .and_then(|i| holder.get(i).cloned());
            (*t, end)
        })
        .collect();
    walk.ends.sort_unstable_by_key(|e| e.0);
    walk.ends.dedup_by_key(|e| e.0);
    walk.took = start.elapsed();
    log::debug!(
        "peer walk: {} connection(s), {} end(s) on this host, {} named; read {} process(es), {} socket fd(s) in {:?}{}",
        conns.len(),
        walk.local_ends,
        walk.ends.iter().filter(|e| e.1.is_some()).count(),
        walk.processes_read,
        walk.socket_fds_read,
        walk.took,
        if walk.bounded {
            " (stopped at a bound)"
        } else {
            ""
        }
    );
    Ok(walk)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{
        io::{BufRead, BufReader, Write},
        net::{Ipv4Addr, TcpListener, TcpStream},
        process::{Command, Stdio},
    };

    use super::*;
    use crate::source::netns;

    /// A child process (`python3`) holds the client end of a loopback
    /// connection to our listener: the walk names it, not us, and the
    /// connection to a port nobody on this host holds stays unnamed.
    #[test]
    fn names_the_process_holding_the_other_end() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let script = format!(
            "import socket,sys\ns=socket.create_connection(('127.0.0.1',{port}))\nprint(s.getsockname()[1],flush=True)\nsys.stdin.read()\n"
        );
        let mut child = Command::new("python3")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let (server_side, _) = listener.accept().unwrap();
        let netns = netns::current_thread_netns().unwrap();
        let ours = Tuple {
            netns,
            local: server_side.local_addr().unwrap(),
            remote: server_side.peer_addr().unwrap(),
        };
        assert_eq!(ours.remote.port().to_string(), line.trim());
        // Our own connection to ourselves: both ends are ours.
        let mine = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mine_server, _) = listener.accept().unwrap();
        let own = Tuple {
            netns,
            local: mine_server.local_addr().unwrap(),
            remote: mine_server.peer_addr().unwrap(),
        };
        let nowhere = Tuple {
            netns,
            local: ours.local,
            remote: "127.0.0.1:1".parse().unwrap(),
        };
        let me = std::process::id();
        let walk = peer_ends(
            &[(ours, me), (own, me), (nowhere, me)],
            WalkBounds::default(),
        )
        .unwrap();
        let end = |t: &Tuple| walk.ends.iter().find(|e| e.0 == *t).unwrap().1.clone();
        let theirs = end(&ours).expect("the child's end is named");
        assert_eq!(theirs.pid, child.id());
        assert_eq!(theirs.comm, "python3");
        assert_eq!(end(&own).map(|e| e.pid), Some(me));
        assert_eq!(end(&nowhere), None);
        assert_eq!(walk.local_ends, 2);
        drop(mine);
        child.stdin.take().unwrap().write_all(b"").unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn a_walk_out_of_time_names_nothing_and_says_so() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        let t = Tuple {
            netns: netns::current_thread_netns().unwrap(),
            local: server_side.local_addr().unwrap(),
            remote: server_side.peer_addr().unwrap(),
        };
        let bounds = WalkBounds {
            time: Duration::ZERO,
            socket_fds: 0,
        };
        let walk = peer_ends(&[(t, std::process::id())], bounds).unwrap();
        assert_eq!(walk.ends, vec![(t, None)]);
        assert!(walk.bounded && walk.local_ends == 1);
        drop(client);
    }
}
