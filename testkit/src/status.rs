//! Reading gracewatch's `--json` Status objects (schema
//! `gracewatch.status.v2`, see `gracewatch-model/src/tracker/status.rs`): field
//! accessors and [`Expect`], an exact expectation whose mismatches are
//! spelled out. Every object we receive is also checked against
//! `gracewatch/schema/status.schema.json` ([`Schema::Status`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use serde_json::Value;

use crate::Schema;

pub const SCHEMA: &str = "gracewatch.status.v2";

/// The process entry for `pid`, if listed.
pub fn process(status: &Value, pid: u32) -> Option<&Value> {
    array(status, "processes")
        .iter()
        .find(|p| p["pid"].as_u64() == Some(u64::from(pid)))
}

/// `live` of the process `pid`, `None` if the process is not listed.
pub fn live_of(status: &Value, pid: u32) -> Option<u64> {
    process(status, pid).and_then(|p| p["live"].as_u64())
}

/// Pids of the listed processes.
pub fn pids(status: &Value) -> BTreeSet<u32> {
    array(status, "processes")
        .iter()
        .filter_map(|p| p["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
        .collect()
}

/// The listener bound to `address` in the namespace with inode `netns`.
pub fn listener<'a>(status: &'a Value, netns: u64, address: &str) -> Option<&'a Value> {
    array(status, "listeners")
        .iter()
        .find(|l| l["netns"].as_u64() == Some(netns) && l["address"].as_str() == Some(address))
}

/// Listeners on `port`, in any namespace.
pub fn listeners_on_port(status: &Value, port: u16) -> Vec<&Value> {
    array(status, "listeners")
        .iter()
        .filter(|l| l["address"].as_str().and_then(port_of) == Some(port))
        .collect()
}

/// `role` of the process `pid` (`serving`, `draining`, `drained`), `None`
/// if the process is not listed.
pub fn role_of(status: &Value, pid: u32) -> Option<&str> {
    process(status, pid).and_then(|p| p["role"].as_str())
}

/// `generations` of a listener as (pid, role), oldest first.
pub fn generations(listener: &Value) -> Vec<(u32, String)> {
    array(listener, "generations")
        .iter()
        .filter_map(|g| {
            Some((
                u32::try_from(g["pid"].as_u64()?).ok()?,
                g["role"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// `holders` of a listener as pid → live.
pub fn holders(listener: &Value) -> BTreeMap<u32, u64> {
    array(listener, "holders")
        .iter()
        .filter_map(|h| Some((u32::try_from(h["pid"].as_u64()?).ok()?, h["live"].as_u64()?)))
        .collect()
}

/// The port of an `ip:port` / `[ipv6]:port` address.
pub fn port_of(address: &str) -> Option<u16> {
    address.rsplit_once(':')?.1.parse().ok()
}

fn array<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v[key].as_array().map_or(&[], Vec::as_slice)
}

/// An exact expectation about a Status: which processes are listed with
/// which live counts, and which listeners exist with which holders.
#[derive(Clone, Debug, Default)]
pub struct Expect {
    /// pid → `Some(live)` (listed with that count) or `None` (not listed).
    processes: BTreeMap<u32, Option<u64>>,
    only_listed: bool,
    listeners: Vec<ExpectListener>,
    only_listeners: bool,
}

#[derive(Clone, Debug)]
struct ExpectListener {
    netns: u64,
    address: String,
    family: String,
    holders: BTreeMap<u32, u64>,
    accept_queue: u64,
}

impl Expect {
    pub fn new() -> Expect {
        Expect::default()
    }

    /// Process `pid` is listed with exactly `live` live connections.
    pub fn live(mut self, pid: u32, live: u64) -> Expect {
        self.processes.insert(pid, Some(live));
        self
    }

    /// Process `pid` is not listed (it holds no listener and no live connection).
    pub fn absent(mut self, pid: u32) -> Expect {
        self.processes.insert(pid, None);
        self
    }

    /// No process is listed besides those given to [`Expect::live`].
    pub fn only_listed(mut self) -> Expect {
        self.only_listed = true;
        self
    }

    /// The listener on `address` in namespace `netns` exists, has `family`,
    /// exactly these holders (pid, live through this listener), an empty
    /// accept queue, and each listed holder process names it in its
    /// `listeners`.
    pub fn listener(
        mut self,
        netns: u64,
        address: &str,
        family: &str,
        holders: &[(u32, u64)],
    ) -> Expect {
        self.listeners.push(ExpectListener {
            netns,
            address: address.to_owned(),
            family: family.to_owned(),
            holders: holders.iter().copied().collect(),
            accept_queue: 0,
        });
        self
    }

    /// No listener is listed besides those given to [`Expect::listener`].
    pub fn only_listeners(mut self) -> Expect {
        self.only_listeners = true;
        self
    }

    /// Every way `status` differs from this expectation (`Ok` if none).
    pub fn check(&self, status: &Value) -> Result<(), String> {
        Schema::Status.check(status)?;
        let mut errors = Vec::new();
        for (&pid, &want) in &self.processes {
            match (want, process(status, pid)) {
                (Some(n), Some(p)) if p["live"].as_u64() == Some(n) => {}
                (Some(n), Some(p)) => {
                    errors.push(format!("pid {pid}: live is {}, expected {n}", p["live"]))
                }
                (Some(n), None) => errors.push(format!("pid {pid}: not listed, expected live {n}")),
                (None, Some(p)) => errors.push(format!(
                    "pid {pid}: listed (live {}), expected absent",
                    p["live"]
                )),
                (None, None) => {}
            }
        }
        if self.only_listed {
            let want: BTreeSet<u32> = self
                .processes
                .iter()
                .filter(|(_, w)| w.is_some())
                .map(|(p, _)| *p)
                .collect();
            let got = pids(status);
            if got != want {
                errors.push(format!(
                    "listed pids are {got:?}, expected exactly {want:?}"
                ));
            }
        }
        for want in &self.listeners {
            let Some(l) = listener(status, want.netns, &want.address) else {
                let port = port_of(&want.address).unwrap_or(0);
                let seen: Vec<String> = listeners_on_port(status, port)
                    .iter()
                    .map(|l| format!("{} (netns {})", l["address"], l["netns"]))
                    .collect();
                errors.push(format!(
                    "listener {} in netns {} is missing (listeners on port {port}: {seen:?})",
                    want.address, want.netns
                ));
                continue;
            };
            let at = format!("listener {}", want.address);
            if l["family"].as_str() != Some(want.family.as_str()) {
                errors.push(format!(
                    "{at}: family is {}, expected {:?}",
                    l["family"], want.family
                ));
            }
            let got = holders(l);
            if got != want.holders {
                errors.push(format!(
                    "{at}: holders (pid: live) are {got:?}, expected {:?}",
                    want.holders
                ));
            }
            if l["accept_queue"].as_u64() != Some(want.accept_queue) {
                errors.push(format!(
                    "{at}: accept_queue is {}, expected {}",
                    l["accept_queue"], want.accept_queue
                ));
            }
            for pid in want.holders.keys() {
                if let Some(p) = process(status, *pid) {
                    let names = array(p, "listeners")
                        .iter()
                        .any(|a| a.as_str() == Some(want.address.as_str()));
                    if !names {
                        errors.push(format!(
                            "pid {pid}: its listeners {} do not name {}",
                            p["listeners"], want.address
                        ));
                    }
                }
            }
        }
        if self.only_listeners {
            let want: BTreeSet<(u64, String)> = self
                .listeners
                .iter()
                .map(|l| (l.netns, l.address.clone()))
                .collect();
            let got: BTreeSet<(u64, String)> = array(status, "listeners")
                .iter()
                .map(|l| {
                    (
                        l["netns"].as_u64().unwrap_or(0),
                        l["address"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect();
            if got != want {
                errors.push(format!(
                    "listeners (netns, address) are {got:?}, expected exactly {want:?}"
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Panics, showing `status`, unless it meets this expectation.
    #[track_caller]
    pub fn assert(&self, status: &Value, context: &str) {
        if let Err(why) = self.check(status) {
            panic!(
                "{context}: status does not match\n  expected: {self}\n  mismatch: {why}\n  status: {}",
                pretty(status)
            );
        }
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (pid, want) in &self.processes {
            parts.push(match want {
                Some(n) => format!("pid {pid} live={n}"),
                None => format!("pid {pid} not listed"),
            });
        }
        if self.only_listed {
            parts.push("no other process".to_owned());
        }
        for l in &self.listeners {
            let mut s = format!(
                "listener {} ({}, netns {}) holders {:?}",
                l.address, l.family, l.netns, l.holders
            );
            let _ = write!(s, " accept_queue={}", l.accept_queue);
            parts.push(s);
        }
        if self.only_listeners {
            parts.push("no other listener".to_owned());
        }
        f.write_str(&parts.join("; "))
    }
}

/// Indented pretty JSON for failure messages.
pub fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v)
        .unwrap_or_else(|_| v.to_string())
        .replace('\n', "\n    ")
}

/// Internal consistency of one status, independent of what the test did:
/// documented orderings, `oldest_live_ms` null exactly when nothing is live,
/// a process's live count equal to the sum of what it holds through
/// each of its listeners, and the restart roles agreeing with themselves
/// (every holder of a listener is one of its generations, with the role
/// its process entry has; no role is newer than the status). Returns every
/// violation.
pub fn invariants(status: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let procs = array(status, "processes");
    let listeners = array(status, "listeners");
    let pid_order: Vec<u64> = procs.iter().filter_map(|p| p["pid"].as_u64()).collect();
    if !pid_order.is_sorted() {
        errors.push(format!("processes are not ordered by pid: {pid_order:?}"));
    }
    let listener_order: Vec<(u64, String)> = listeners
        .iter()
        .map(|l| {
            (
                l["netns"].as_u64().unwrap_or(0),
                l["address"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    if !listener_order.is_sorted_by(|a, b| a.0 <= b.0) {
        errors.push(format!(
            "listeners are not ordered by namespace: {listener_order:?}"
        ));
    }
    for l in listeners {
        let order: Vec<u64> = array(l, "holders")
            .iter()
            .filter_map(|h| h["pid"].as_u64())
            .collect();
        if !order.is_sorted() {
            errors.push(format!(
                "listener {}: holders are not ordered by pid: {order:?}",
                l["address"]
            ));
        }
    }
    let uptime = status["uptime_ms"].as_u64().unwrap_or(0);
    for l in listeners {
        let gens = generations(l);
        for pid in holders(l).keys() {
            match gens.iter().find(|(g, _)| g == pid) {
                None => errors.push(format!(
                    "listener {}: holder {pid} is not among its generations {gens:?}",
                    l["address"]
                )),
                Some((_, role)) => {
                    if let Some(listed) = role_of(status, *pid)
                        && listed != role
                    {
                        errors.push(format!(
                            "listener {}: generation {pid} is {role} but its process is {listed}",
                            l["address"]
                        ));
                    }
                }
            }
        }
    }
    for p in procs {
        let pid = p["pid"].as_u64().unwrap_or(0);
        let live = p["live"].as_u64().unwrap_or(0);
        if p["role_since_ms"].as_u64().unwrap_or(0) > uptime {
            errors.push(format!(
                "pid {pid}: role_since_ms {} is after uptime_ms {uptime}",
                p["role_since_ms"]
            ));
        }
        if (live == 0) != p["oldest_live_ms"].is_null() {
            errors.push(format!(
                "pid {pid}: live is {live} but oldest_live_ms is {}",
                p["oldest_live_ms"]
            ));
        }
        // Only when every listener the process names is in this status (a
        // filter may hide some), and it names one: the connections of a
        // process that let go of its listeners (the old generation of a
        // handover that closed its copy) outlive every holder entry.
        let named = array(p, "listeners").len();
        let holding: Vec<u64> = listeners
            .iter()
            .flat_map(|l| array(l, "holders"))
            .filter(|h| h["pid"].as_u64() == Some(pid))
            .filter_map(|h| h["live"].as_u64())
            .collect();
        if named > 0 && holding.len() == named && holding.iter().sum::<u64>() != live {
            errors.push(format!(
                "pid {pid}: live is {live} but its holder entries add up to {}",
                holding.iter().sum::<u64>()
            ));
        }
    }
    errors
}
