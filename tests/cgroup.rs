//! Which container: real servers moved into cgroups of their own (one a
//! plain cgroup, one named as the kubelet's systemd driver and containerd
//! name a pod's container) show their cgroup, and the container id and pod
//! UID it names, in `status --json`, in `watch --json` (the monitor's
//! publications) and in the agent's `/v1/status`; the agent puts them on
//! the per-process series only when asked (`--metric-labels`).
//!
//! The cgroups are created in the host's cgroup v2 hierarchy (wherever it
//! is mounted: `/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified`
//! on a hybrid one) and removed by a guard, after moving out whatever
//! still runs in them, even when the test fails.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use gracewatch_testkit::{
    Agent, Client, Netns, STATE_TIMEOUT, Schema, Server, TempDir, in_ci, monotonic_ns, process,
    promtool_accepts, setup,
};
use serde_json::Value;

/// The mount point of the cgroup v2 hierarchy, if it is mounted at its root
/// (a mount of a subtree would show paths relative to another root).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let fields: Vec<&str> = mount.split(' ').collect();
        let point = fields.get(4)?;
        (fs.split(' ').next() == Some("cgroup2") && fields.get(3) == Some(&"/"))
            .then(|| PathBuf::from(point))
    })
}

/// Our own cgroup v2 path must be shown from the hierarchy's root (no
/// cgroup namespace of our own), so the test knows what to expect.
fn own_cgroup_is_absolute() -> bool {
    std::fs::read_to_string("/proc/self/cgroup").is_ok_and(|t| {
        t.lines()
            .any(|l| l.starts_with("0::/") && !l.contains("/.."))
    })
}

/// Cgroups created for a test under the hierarchy's root, removed on drop:
/// every process still in one is moved back to the root cgroup first.
struct Cgroups {
    mount: PathBuf,
    /// Relative to the mount, in creation order (parents first).
    made: Vec<String>,
}

impl Cgroups {
    fn new(mount: PathBuf) -> Self {
        Self {
            mount,
            made: Vec::new(),
        }
    }

    /// Creates `rel` (and its missing parents), returning its cgroup path
    /// (`/rel`) as `/proc/PID/cgroup` shows it.
    #[track_caller]
    fn make(&mut self, rel: &str) -> String {
        let mut at = String::new();
        for part in rel.split('/') {
            at = if at.is_empty() {
                part.to_owned()
            } else {
                format!("{at}/{part}")
            };
            let dir = self.mount.join(&at);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("failed to create cgroup {}: {e}", dir.display()));
                self.made.push(at.clone());
            }
        }
        format!("/{rel}")
    }

    /// Moves process `pid` into cgroup `path` (as [`Cgroups::make`] returned it).
    #[track_caller]
    fn enter(&self, path: &str, pid: u32) {
        let procs = self
            .mount
            .join(path.trim_start_matches('/'))
            .join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("failed to move pid {pid} into {}: {e}", procs.display()));
        let shown = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        assert!(
            shown.lines().any(|l| l == format!("0::{path}")),
            "pid {pid} is not in {path}: {shown}"
        );
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let root_procs = self.mount.join("cgroup.procs");
        for rel in self.made.iter().rev() {
            let dir = self.mount.join(rel);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                for pid in read_pids(&dir.join("cgroup.procs")) {
                    let _ = std::fs::write(&root_procs, pid.to_string());
                }
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() >= deadline => {
                        eprintln!("failed to remove cgroup {}: {e}", dir.display());
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

fn read_pids(procs: &Path) -> Vec<u32> {
    std::fs::read_to_string(procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The process `pid` of `status`, which must be listed.
#[track_caller]
fn listed(status: &Value, pid: u32) -> &Value {
    process(status, pid).unwrap_or_else(|| panic!("pid {pid} not in {status:#}"))
}

#[track_caller]
fn assert_place(
    status: &Value,
    pid: u32,
    cgroup: &str,
    container: Option<&str>,
    pod: Option<&str>,
) {
    let p = listed(status, pid);
    assert_eq!(p["cgroup"].as_str(), Some(cgroup), "cgroup of {pid}: {p:#}");
    assert_eq!(
        p["container_id"].as_str(),
        container,
        "container_id of {pid}: {p:#}"
    );
    assert_eq!(p["pod_uid"].as_str(), pod, "pod_uid of {pid}: {p:#}");
}

#[test]
fn a_process_in_its_own_cgroup_shows_it() {
    let Some(gw) = setup() else { return };
    let Some(mount) = cgroup2_mount() else {
        assert!(
            !in_ci(),
            "no cgroup v2 hierarchy mounted at its root (CI=true: a failure)"
        );
        eprintln!("SKIPPED: no cgroup v2 hierarchy mounted at its root");
        return;
    };
    if !own_cgroup_is_absolute() {
        assert!(
            !in_ci(),
            "this test runs in a cgroup namespace (CI=true: a failure)"
        );
        eprintln!("SKIPPED: this test runs in a cgroup namespace");
        return;
    }
    // Declared first: dropped last, after the servers were killed.
    let mut cgroups = Cgroups::new(mount);
    let top = format!("gw-test-{}-{}", std::process::id(), monotonic_ns());
    let id = format!(
        "{:016x}{:016x}{:016x}{:016x}",
        monotonic_ns(),
        u64::from(std::process::id()),
        0x5eed_u64,
        monotonic_ns() ^ 0xdead_beef
    );
    let uid = "8b5c3f2e-1d4a-4e6b-9c7d-0a1b2c3d4e5f";
    let own = cgroups.make(&format!("{top}/own"));
    let in_pod = cgroups.make(&format!(
        "{top}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope",
        uid.replace('-', "_")
    ));

    let ns = Netns::new("cgroup");
    let plain = Server::listen(&ns, "127.0.0.1:7801");
    let pod = Server::listen(&ns, "127.0.0.1:7802");
    cgroups.enter(&own, plain.pid());
    cgroups.enter(&in_pod, pod.pid());
    let _held = (
        Client::connect(&ns, "127.0.0.1:7801", 2),
        Client::connect(&ns, "127.0.0.1:7802", 1),
    );
    plain.wait_accepted(2);
    pod.wait_accepted(1);
    let (a, b) = (plain.pid().to_string(), pod.pid().to_string());

    // One look (the startup snapshot's path), checked against the schema.
    let status = gw.status(&["--pid", &a, "--pid", &b]);
    assert_place(&status, plain.pid(), &own, None, None);
    assert_place(&status, pod.pid(), &in_pod, Some(&id), Some(uid));

    // A running monitor publishes the same (read when they first appear).
    let watch = gw.watch(&["--pid", &a, "--pid", &b]);
    let s = watch.wait_until(STATE_TIMEOUT, "both processes with their cgroups", |s| {
        process(s, plain.pid()).is_some_and(|p| p["cgroup"] == own.as_str())
            && process(s, pod.pid()).is_some_and(|p| p["cgroup"] == in_pod.as_str())
    });
    assert_place(&s, pod.pid(), &in_pod, Some(&id), Some(uid));
    drop(watch);

    // The agent: /v1/status says it; /metrics only when asked.
    let dir = TempDir::new("cgroup");
    for (labels, want_labels) in [(None, false), (Some("container,pod,cgroup"), true)] {
        let mut builder = Agent::builder();
        if let Some(labels) = labels {
            builder = builder.args(&["--metric-labels", labels]);
        }
        let agent = builder.start(&gw, &dir);
        let deadline = Instant::now() + STATE_TIMEOUT;
        let status = loop {
            let answer = agent
                .request(&agent.tcp(), "GET", "/v1/status", &[], b"")
                .expect("GET /v1/status");
            assert_eq!(answer.code, 200, "{}", answer.body);
            let status: Value = serde_json::from_str(&answer.body).expect("status JSON");
            if process(&status, pod.pid()).is_some() && process(&status, plain.pid()).is_some() {
                break status;
            }
            assert!(Instant::now() < deadline, "servers not listed: {status:#}");
            std::thread::sleep(Duration::from_millis(50));
        };
        Schema::Status.check(&status).expect("a valid status");
        assert_place(&status, plain.pid(), &own, None, None);
        assert_place(&status, pod.pid(), &in_pod, Some(&id), Some(uid));

        let metrics = agent
            .request(&agent.tcp(), "GET", "/metrics", &[], b"")
            .expect("GET /metrics");
        assert_eq!(metrics.code, 200);
        let line = |pid: u32| {
            metrics
                .body
                .lines()
                .find(|l| {
                    l.starts_with("gracewatch_process_live_connections{")
                        && l.contains(&format!("pid=\"{pid}\""))
                })
                .unwrap_or_else(|| panic!("no live series of {pid} in\n{}", metrics.body))
                .to_owned()
        };
        let plain_line = line(plain.pid());
        let pod_line = line(pod.pid());
        assert!(
            !plain_line.contains("container_id") && !plain_line.contains("pod_uid"),
            "{plain_line}"
        );
        if want_labels {
            assert!(
                pod_line.ends_with(&format!(
                    ",container_id=\"{id}\",pod_uid=\"{uid}\",cgroup=\"{in_pod}\"}} 1"
                )),
                "{pod_line}"
            );
            assert!(
                plain_line.ends_with(&format!(",cgroup=\"{own}\"}} 2")),
                "{plain_line}"
            );
            promtool_accepts(&metrics.body);
        } else {
            for line in [&pod_line, &plain_line] {
                assert!(
                    !line.contains("container_id")
                        && !line.contains("pod_uid")
                        && !line.contains("cgroup="),
                    "labels by default: {line}"
                );
            }
        }
        agent.stop_within(Duration::from_secs(10));
    }
}
