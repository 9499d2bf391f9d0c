//! A fresh read of one process's whole fd table: the narrow input with
//! which the monitor's targeted re-check tells the tracker that a process
//! closed its copy of a shared listener. No kernel event says so (closing
//! one of several fds on a listening socket only drops a reference), and a
//! full rescan may be seconds away on a busy host.
//!
//! Only releases are taken from it: a listener socket the read did not find
//! among the process's fds is no longer held by it, as of the read. A
//! holder gained (fd passing) waits for an accept or the next rescan. A
//! read names sockets by inode, and a socket opened since the last
//! snapshot is known by events only (no inode): a dump of its address's
//! listening sockets names it first ([`Tracker::listening_inodes`]).

use std::time::Duration;

use super::{MAX_RELEASE_MARKS, ReleaseMark, Tracker};
use crate::event::ListenAddr;

impl Tracker {
    /// `pid`'s whole fd table, read from `at` on, holds exactly the sockets
    /// `sockets` (inodes, any order). Every listening socket the tracker
    /// knows by inode and lists `pid` for on older evidence, but that the
    /// table lacks, loses `pid` as a holder; so does an address `pid` only
    /// accepted from, once none of its sockets (all known by inode) is in
    /// the table. A socket known only from events (no inode yet) proves
    /// nothing either way and keeps its holders. Evidence newer than `at`
    /// (a listen or accept after the read began) wins, and a snapshot
    /// older than `at` cannot list `pid` again. Returns whether `pid` let
    /// go of anything; that is published at once, like a listener closing.
    pub fn fd_table_read(&mut self, pid: u32, at: Duration, sockets: &[u64]) -> bool {
        let mut held = sockets.to_vec();
        held.sort_unstable();
        let holds = |inode: u64| held.binary_search(&inode).is_ok();
        let mut marks = Vec::new();
        let mut released = false;
        for l in self.listeners.values_mut() {
            for s in &mut l.sockets {
                let Some(inode) = s.inode else { continue };
                if holds(inode) || s.holders.get(&pid).is_none_or(|t| *t > at) {
                    continue;
                }
                s.holders.remove(&pid);
                marks.push(ReleaseMark { inode, pid, at });
                released = true;
            }
            // Accepting proves a holding of some socket of the address; the
            // read disproves it only if every socket is known by inode.
            let none_held = l.sockets.iter().all(|s| s.inode.is_some_and(|i| !holds(i)));
            if none_held && l.acceptors.get(&pid).is_some_and(|t| *t <= at) {
                l.acceptors.remove(&pid);
                released = true;
            }
        }
        for mark in marks {
            self.releases.push_back(mark);
            while self.releases.len() > MAX_RELEASE_MARKS {
                self.releases.pop_front();
            }
        }
        if released {
            self.idle.push(pid);
            self.significant = true;
            self.collect_idle();
        }
        released
    }

    /// A dump of the listening sockets at `addr`, taken from `at` on,
    /// shows the sockets `inodes`. If exactly one socket of the address is
    /// known only from events (no inode) and older than `at`, and exactly
    /// one of `inodes` is not yet some socket's, that is its inode (the
    /// rule of a snapshot merge, for one address). Returns whether it
    /// named one.
    pub fn listening_inodes(&mut self, addr: &ListenAddr, at: Duration, inodes: &[u64]) -> bool {
        let Some(l) = self.listeners.get_mut(addr) else {
            return false;
        };
        let unnamed: Vec<usize> = (0..l.sockets.len())
            .filter(|&i| l.sockets[i].inode.is_none() && l.sockets[i].since <= at)
            .collect();
        let mut free: Vec<u64> = inodes
            .iter()
            .copied()
            .filter(|&i| i != 0 && !l.sockets.iter().any(|s| s.inode == Some(i)))
            .collect();
        free.sort_unstable();
        free.dedup();
        match (unnamed.as_slice(), free.as_slice()) {
            ([i], [inode]) => {
                l.sockets[*i].inode = Some(*inode);
                true
            }
            _ => false,
        }
    }
}
