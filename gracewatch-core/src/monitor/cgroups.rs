//! Where each process of the status runs: its cgroup v2 path (and the
//! container id and pod UID the path names), read through the source when
//! the process first appears in a published status, kept while it stays
//! there, and read again every [`REFRESH`] (a process can be moved to
//! another cgroup, rarely: systemd's `MoveProcess`, `cgclassify`, a test).
//! Bounded by the status: a pid that leaves it is forgotten, so a recycled
//! pid is read afresh when it appears again (one that exits and is reused
//! between two publications keeps the old path until the next refresh).
//! Each read is one small procfs file (~14 µs measured), on the monitor's
//! thread: once per new process, then once per process per [`REFRESH`].

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use crate::tracker::Status;

/// How old a cgroup read may get before it is read again. A move is shown
/// within this (plus a housekeeping interval); each process costs one small
/// procfs read per period.
pub(super) const REFRESH: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub(super) struct Cgroups {
    known: HashMap<u32, Known>,
}

#[derive(Debug)]
struct Known {
    path: Option<String>,
    read_at: Duration,
}

impl Cgroups {
    /// Reads (with `read`) the cgroups of the processes of `status` not
    /// known yet, forgets those no longer in it, and fills in every
    /// process's cgroup, container id and pod UID.
    pub(super) fn learn(
        &mut self,
        status: &mut Status,
        now: Duration,
        read: impl Fn(u32) -> Option<String>,
    ) {
        if self.known.len() > status.processes.len()
            || status
                .processes
                .iter()
                .any(|p| !self.known.contains_key(&p.pid))
        {
            let present: HashSet<u32> = status.processes.iter().map(|p| p.pid).collect();
            self.known.retain(|pid, _| present.contains(pid));
            for p in &status.processes {
                self.known.entry(p.pid).or_insert_with(|| Known {
                    path: read(p.pid),
                    read_at: now,
                });
            }
        }
        self.fill(status);
    }

    /// Fills in what is known, reading nothing.
    pub(super) fn fill(&self, status: &mut Status) {
        for p in &mut status.processes {
            p.set_cgroup(self.known.get(&p.pid).and_then(|k| k.path.as_deref()));
        }
    }

    /// Reads again the cgroups read [`REFRESH`] or longer ago; whether any
    /// changed (a status is then due).
    pub(super) fn refresh(&mut self, now: Duration, read: impl Fn(u32) -> Option<String>) -> bool {
        let mut changed = false;
        for (pid, k) in &mut self.known {
            if now.saturating_sub(k.read_at) >= REFRESH {
                let path = read(*pid);
                k.read_at = now;
                changed |= path != k.path;
                k.path = path;
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use super::*;
    use crate::tracker::{ProcessStatus, STATUS_SCHEMA};

    fn status(pids: &[u32]) -> Status {
        Status {
            schema: STATUS_SCHEMA.to_owned(),
            processes: pids
                .iter()
                .map(|&pid| ProcessStatus {
                    pid,
                    ..ProcessStatus::default()
                })
                .collect(),
            ..Status::default()
        }
    }

    const DOCKER: &str = "/system.slice/docker-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope";

    #[test]
    fn read_once_per_appearance_refreshed_and_forgotten() {
        let reads = Cell::new(0);
        let paths = RefCell::new(HashMap::from([(1, DOCKER.to_owned())]));
        let read = |pid: u32| {
            reads.set(reads.get() + 1);
            paths.borrow().get(&pid).cloned()
        };
        let s = |secs| Duration::from_secs(secs);
        let mut c = Cgroups::default();

        let mut st = status(&[1, 2]);
        c.learn(&mut st, s(0), read);
        assert_eq!(reads.get(), 2);
        assert_eq!(st.processes[0].cgroup.as_deref(), Some(DOCKER));
        assert_eq!(
            st.processes[0].container_id.as_deref(),
            Some(&DOCKER[21..85])
        );
        assert_eq!(st.processes[1].cgroup, None);

        // Published again: nothing read.
        let mut st = status(&[1, 2]);
        c.learn(&mut st, s(1), read);
        assert_eq!(reads.get(), 2);
        assert_eq!(st.processes[0].cgroup.as_deref(), Some(DOCKER));

        // Moved: seen at the refresh, not before.
        paths.borrow_mut().insert(1, "/gw-moved".to_owned());
        assert!(!c.refresh(s(29), read));
        assert_eq!(reads.get(), 2);
        assert!(c.refresh(s(30), read));
        assert_eq!(reads.get(), 4);
        let mut st = status(&[1, 2]);
        c.learn(&mut st, s(31), read);
        assert_eq!(st.processes[0].cgroup.as_deref(), Some("/gw-moved"));
        assert_eq!(st.processes[0].container_id, None);
        assert!(!c.refresh(s(31), read), "nothing changed");

        // Pid 1 leaves the status: forgotten, read afresh if it comes back.
        let mut st = status(&[2]);
        c.learn(&mut st, s(32), read);
        assert_eq!(c.known.len(), 1);
        let mut st = status(&[1, 2]);
        c.learn(&mut st, s(33), read);
        assert_eq!(reads.get(), 5);
        assert_eq!(st.processes[0].cgroup.as_deref(), Some("/gw-moved"));
    }
}
