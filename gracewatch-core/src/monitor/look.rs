//! Direct looks at the host that consumers need beside the tracker's
//! counts: the targets' own fd tables (the drain gate's fd check), a
//! connection's TCP state (the TUI's detail view) and whether a process
//! still runs. They go through [`MonitorHandle`] so that no consumer
//! touches procfs, netlink or pidfds itself; each runs off the async
//! runtime where it blocks (procfs, netlink and setns do).

use std::collections::HashMap;

use super::MonitorHandle;
use crate::{
    event::{ListenAddr, Tuple},
    input::{PeerRule, peer_excluded},
    source::{Liveness, liveness, snapshot},
};

/// What a look at some processes' fd tables found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FdLook {
    /// Every table was read: `held` live inbound sockets hold the drain,
    /// and `excluded` are those whose peer, as the socket itself says, the
    /// rules exclude.
    Held {
        held: usize,
        excluded: Vec<ExcludedFd>,
    },
    /// A table could not be read, so nothing is decided: `pid` names the
    /// process whose table failed (none if the look itself failed).
    Doubt { pid: Option<u32>, reason: String },
}

/// A live inbound socket a target holds, as one fresh look at the fd
/// table and a sock_diag dump found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdSocket {
    /// The target whose fd table holds it.
    pub pid: u32,
    pub tuple: Tuple,
    /// TCP state number (1 ESTABLISHED, 8 CLOSE_WAIT).
    pub state: u8,
}

/// An excluded peer's socket (see [`FdSocket`]).
pub type ExcludedFd = FdSocket;

/// What [`MonitorHandle::held_sockets`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FdSockets {
    /// Every table was read: `held` hold the drain, `excluded` are those
    /// whose peer, as the socket itself says, the rules exclude.
    Found {
        held: Vec<FdSocket>,
        excluded: Vec<ExcludedFd>,
    },
    /// As [`FdLook::Doubt`].
    Doubt { pid: Option<u32>, reason: String },
}

impl MonitorHandle {
    /// Live inbound sockets that `targets` (pid, command name) hold by
    /// their own fd tables, counting only those on `ports` if any are
    /// given. A socket counts as inbound when its local address is one of
    /// `known` listeners or one the process listens on now. Fails closed:
    /// the first table that cannot be read makes the whole look a
    /// [`FdLook::Doubt`]. A socket counts as excluded only when its peer,
    /// read from the socket in this look, matches one of `rules`; a socket
    /// shared by several targets is counted once per target, as before.
    pub async fn held_fds(
        &self,
        targets: Vec<(u32, String)>,
        known: Vec<ListenAddr>,
        ports: Vec<u16>,
        rules: Vec<PeerRule>,
    ) -> FdLook {
        match self.held_sockets(targets, known, ports, rules).await {
            FdSockets::Found { held, excluded } => FdLook::Held {
                held: held.len(),
                excluded,
            },
            FdSockets::Doubt { pid, reason } => FdLook::Doubt { pid, reason },
        }
    }

    /// [`MonitorHandle::held_fds`] with each socket that holds the drain
    /// named too (`--until-idle` reads what each one is doing). The same
    /// rules: inbound, on `ports`, excluded by `rules` as the socket says,
    /// and fail closed on the first table that cannot be read.
    pub async fn held_sockets(
        &self,
        targets: Vec<(u32, String)>,
        known: Vec<ListenAddr>,
        ports: Vec<u16>,
        rules: Vec<PeerRule>,
    ) -> FdSockets {
        let looked = tokio::task::spawn_blocking(move || {
            let mut held = Vec::new();
            let mut excluded = Vec::new();
            for (pid, comm) in targets {
                match snapshot::live_inbound_conns_with(pid, &known) {
                    Ok(v) => {
                        for c in v
                            .iter()
                            .filter(|c| ports.is_empty() || ports.contains(&c.tuple.local.port()))
                        {
                            let found = FdSocket {
                                pid,
                                tuple: c.tuple,
                                state: c.state,
                            };
                            if peer_excluded(&rules, &c.tuple.remote) {
                                excluded.push(found);
                            } else {
                                held.push(found);
                            }
                        }
                    }
                    Err(e) => {
                        return FdSockets::Doubt {
                            pid: Some(pid),
                            reason: format!("the fds of pid {pid} ({comm}) cannot be read: {e:#}"),
                        };
                    }
                }
            }
            FdSockets::Found { held, excluded }
        })
        .await;
        looked.unwrap_or_else(|e| FdSockets::Doubt {
            pid: None,
            reason: format!("the fd check failed: {e}"),
        })
    }

    /// The TCP states of the live inbound connections `pid` holds by its
    /// own fd table (inbound as for [`MonitorHandle::held_fds`]).
    pub async fn conn_states(
        &self,
        pid: u32,
        known: Vec<ListenAddr>,
    ) -> anyhow::Result<HashMap<Tuple, u8>> {
        let conns =
            tokio::task::spawn_blocking(move || snapshot::live_inbound_conns_with(pid, &known))
                .await??;
        Ok(conns.into_iter().map(|c| (c.tuple, c.state)).collect())
    }

    /// Whether `pid` may still run: only a pidfd that says so is an exit;
    /// a failure to look (EMFILE…) keeps the process, to be asked again.
    pub fn may_run(&self, pid: u32) -> bool {
        liveness(pid) != Liveness::Exited
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Snapshot;

    /// Above the kernel's PID_MAX_LIMIT: never a running process.
    const NO_SUCH_PID: u32 = 4_194_305;

    #[tokio::test]
    async fn an_unreadable_fd_table_is_a_doubt_naming_its_pid() {
        let handle = MonitorHandle::from_replay(Vec::new(), Snapshot::default());
        assert_eq!(
            handle
                .held_fds(Vec::new(), Vec::new(), Vec::new(), Vec::new())
                .await,
            FdLook::Held {
                held: 0,
                excluded: Vec::new()
            }
        );
        let looked = handle
            .held_fds(
                vec![(NO_SUCH_PID, "gone".into())],
                Vec::new(),
                vec![80],
                Vec::new(),
            )
            .await;
        let FdLook::Doubt { pid, reason } = looked else {
            panic!("a missing fd table decided something: {looked:?}");
        };
        assert_eq!(pid, Some(NO_SUCH_PID));
        assert!(
            reason.contains(&format!("pid {NO_SUCH_PID} (gone)")),
            "{reason}"
        );
        assert!(handle.conn_states(NO_SUCH_PID, Vec::new()).await.is_err());
    }

    #[tokio::test]
    async fn liveness_tells_a_running_process_from_a_missing_one() {
        let handle = MonitorHandle::from_replay(Vec::new(), Snapshot::default());
        assert!(handle.may_run(std::process::id()));
        assert!(!handle.may_run(NO_SUCH_PID));
    }
}
