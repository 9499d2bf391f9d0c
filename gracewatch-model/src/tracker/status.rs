//! [`Status`]: the tracker's answer to "who holds what right now". Every
//! consumer (status/watch output, TUI, agent, drain) reads only this. Its
//! serde form is the `--json` contract documented in the README and checked
//! against `schema/status.schema.json`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::restart::Role;
use crate::event::NetNs;

/// Value of [`Status::schema`]; bump on any incompatible change. v2 added
/// the restart roles (`processes[].role`, `role_since_ms`,
/// `listeners[].generations`) and where each process runs
/// (`processes[].cgroup`, `container_id`, `pod_uid`): v1 declared unknown keys an error, so new
/// keys are an incompatible change (see the README's JSON section).
pub const STATUS_SCHEMA: &str = "gracewatch.status.v2";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub schema: String,
    /// Milliseconds since the monitor started (monotonic).
    pub uptime_ms: u64,
    /// Processes holding a listening socket or live inbound connections, by pid.
    pub processes: Vec<ProcessStatus>,
    /// Listening sockets, by namespace then address.
    pub listeners: Vec<ListenerStatus>,
    /// Kernel events lost since start (ring buffer full). Non-zero means
    /// counts may be stale until the next rescan repairs them.
    pub lost_events: u64,
    /// Episodes in which connections went untracked since start: a kernel
    /// table was full (more connections than `--max-connections`) or a
    /// pre-existing connection could not be registered. Non-zero means some
    /// counts may lag until the next rescan repairs them.
    pub map_full_total: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessStatus {
    pub pid: u32,
    pub comm: String,
    /// Live inbound connections this process holds (ESTABLISHED or CLOSE_WAIT).
    pub live: u64,
    /// Listeners this process holds (their [`ListenerStatus::address`]),
    /// one entry per address whatever the namespace.
    pub listeners: Vec<SocketAddr>,
    /// Connections this process accepted since the monitor started.
    pub accepted_total: u64,
    /// Of those and of the pre-existing ones it held, how many ended.
    pub closed_total: u64,
    /// Age of its oldest live connection, in milliseconds (`null` if none).
    /// For connections older than the monitor this is a lower bound.
    pub oldest_live_ms: Option<u64>,
    /// Its role in a restart (`serving`, `draining` or `drained`), from the
    /// restart model ([`super::Restarts`]); filled by the monitor when it
    /// publishes (see [`super::Restarts::annotate`]).
    pub role: Role,
    /// Since when it has that role, in milliseconds since the monitor
    /// started (the clock of [`Status::uptime_ms`]).
    pub role_since_ms: u64,
    /// Its cgroup v2 path (`/proc/<pid>/cgroup`), `None` when unknown: a
    /// replay, a host without cgroup v2 (or the root cgroup), an unreadable
    /// or over-long path. Filled by the monitor when it publishes.
    pub cgroup: Option<String>,
    /// The container id its cgroup path names (see
    /// [`crate::cgroup::container_id`]).
    pub container_id: Option<String>,
    /// The Kubernetes pod UID its cgroup path names (see
    /// [`crate::cgroup::pod_uid`]).
    pub pod_uid: Option<String>,
}

impl ProcessStatus {
    /// Sets [`Self::cgroup`] to `path` and the ids it names.
    pub fn set_cgroup(&mut self, path: Option<&str>) {
        self.container_id = path
            .and_then(crate::cgroup::container_id)
            .map(str::to_owned);
        self.pod_uid = path.and_then(crate::cgroup::pod_uid);
        self.cgroup = path.map(str::to_owned);
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerStatus {
    /// Network namespace inode: equal addresses in two containers stay apart.
    pub netns: NetNs,
    /// Serialised `ip:port`, IPv6 in brackets (`[::]:8080`).
    pub address: SocketAddr,
    /// Serialised `ipv4` or `ipv6`.
    pub family: Family,
    /// Processes holding this listener, by pid, each with the live
    /// connections it holds that came through this listener.
    pub holders: Vec<HolderStatus>,
    /// Connections whose handshake completed but that nobody accepted yet.
    pub accept_queue: u64,
    /// Connections accepted from this listener since the monitor started.
    pub accepted_total: u64,
    /// Connections that died in the accept queue (reset before any accept,
    /// or by the kernel when the last holder closed the listener).
    pub queue_drops_total: u64,
    /// The processes that held this listener or accepted from it while the
    /// restart model remembers them, oldest first: the generations of its
    /// restarts, each with its role (`exited` ones are kept a minute).
    pub generations: Vec<GenerationStatus>,
}

/// One process of a listener's [`ListenerStatus::generations`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationStatus {
    pub pid: u32,
    pub comm: String,
    pub role: Role,
    /// As [`ProcessStatus::role_since_ms`].
    pub role_since_ms: u64,
    /// Live connections the process holds (over all its listeners).
    pub live: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HolderStatus {
    pub pid: u32,
    pub comm: String,
    pub live: u64,
}

/// A listener's address family, as the JSON names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    /// The family of `addr`.
    pub fn of(addr: SocketAddr) -> Self {
        if addr.is_ipv4() {
            Self::Ipv4
        } else {
            Self::Ipv6
        }
    }
}
