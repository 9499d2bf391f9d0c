//! Which container a process runs in, read from its cgroup v2 path: the
//! pure half of "which container" (the source reads `/proc/PID/cgroup`,
//! this parses it). Container runtimes and the kubelet name cgroups after
//! the container id and the pod UID; nothing else is asked of anyone, so a
//! path that does not follow one of the known forms yields no id rather
//! than a guess.
//!
//! The content comes from the host and is chosen in part by whoever
//! created the cgroups: it is bounded ([`MAX_PATH`]), never trusted to be
//! well formed, and nothing here can panic on it.

/// Longest cgroup path kept, in bytes (the kernel's `PATH_MAX`). A longer
/// one is dropped rather than cut: a cut path could name another cgroup,
/// and an id read from it could be wrong.
pub const MAX_PATH: usize = 4096;

/// The cgroup v2 path in the text of `/proc/PID/cgroup` (the `0::/path`
/// line), or `None` when there is nothing to tell: no such line (cgroup v1
/// only), the root `/` (a v1 or hybrid host shows every process there, so
/// it says nothing), an empty or relative path, or one longer than
/// [`MAX_PATH`]. Paths seen through a cgroup namespace may climb out of it
/// (`/../../kubepods.slice/…`): kept as the kernel wrote them.
/// Only whole lines count (ended by `\n`, as the kernel ends each), so a
/// read cut short cannot yield a shortened path.
pub fn v2_path(proc_cgroup: &str) -> Option<&str> {
    let path = proc_cgroup
        .split_inclusive('\n')
        .filter_map(|line| line.strip_suffix('\n'))
        .find_map(|line| line.strip_prefix("0::"))?;
    (path.starts_with('/') && path != "/" && path.len() <= MAX_PATH).then_some(path)
}

/// The container id a cgroup path names: the deepest component that is a
/// 64-digit lower-case hex id, alone (`/docker/<id>`, the cgroupfs driver's
/// `/kubepods/…/pod<uid>/<id>`, containerd's `/k8s.io/<id>`) or wrapped by
/// a runtime's systemd scope (`docker-<id>.scope`,
/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`),
/// also in the `slice:prefix:id` form containerd writes when its cgroup
/// driver does not match the kubelet's. The deepest wins because
/// containers nest (a kind node is a docker container whose cgroup holds
/// the pods' containers). Conmon's `crio-conmon-<id>.scope` and
/// `libpod-conmon-<id>.scope` are the runtime's monitor, not the
/// container: they yield nothing.
pub fn container_id(path: &str) -> Option<&str> {
    parts(path).rev().find_map(|part| {
        let id = part.strip_suffix(".scope").unwrap_or(part);
        let id = ["docker-", "cri-containerd-", "crio-", "libpod-"]
            .into_iter()
            .find_map(|prefix| id.strip_prefix(prefix))
            .unwrap_or(id);
        is_container_id(id).then_some(id)
    })
}

/// The Kubernetes pod UID a cgroup path names, with dashes: from the
/// systemd driver's `kubepods-<qos>-pod<uid with underscores>.slice` (or
/// `kubepods-pod<uid>.slice` for guaranteed pods), or the cgroupfs
/// driver's `pod<uid>` component below a `kubepods` one. A UID is a UUID,
/// or 32 hex digits for a static pod (the kubelet hashes its manifest).
pub fn pod_uid(path: &str) -> Option<String> {
    let mut below_kubepods = false;
    let mut found = None;
    for part in parts(path) {
        if let Some(slice) = part.strip_suffix(".slice") {
            // `kubepods-burstable-pod<uid>.slice`, `kubelet-kubepods-…`.
            if let Some((head, last)) = slice.rsplit_once('-') {
                if head.contains("kubepods") {
                    if let Some(uid) = last.strip_prefix("pod").and_then(uid) {
                        found = Some(uid);
                    }
                }
            }
        } else if below_kubepods {
            if let Some(uid) = part.strip_prefix("pod").and_then(uid) {
                found = Some(uid);
            }
        }
        below_kubepods |= part == "kubepods" || part.starts_with("kubepods.");
    }
    found
}

/// The components of a path, each also split at `:` (containerd's
/// `slice:prefix:name` form).
fn parts(path: &str) -> impl DoubleEndedIterator<Item = &str> {
    path.split('/')
        .flat_map(|c| c.split(':'))
        .filter(|c| !c.is_empty())
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A pod UID as written in a cgroup name (underscores for the systemd
/// driver, which reserves `-`), with dashes; `None` unless it is a UUID
/// (8-4-4-4-12 hex digits) or 32 hex digits.
fn uid(s: &str) -> Option<String> {
    let uid: String = s.chars().map(|c| if c == '_' { '-' } else { c }).collect();
    let hex = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_hexdigit());
    let groups: Vec<&str> = uid.split('-').collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    let ok = groups.iter().all(|g| hex(g)) && (lens == [8, 4, 4, 4, 12] || lens == [32]);
    ok.then(|| uid.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4b9a0c2d1e5f6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c";
    const ID2: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "8b5c3f2e-1d4a-4e6b-9c7d-0a1b2c3d4e5f";

    /// (path, container id, pod uid), from real hosts' shapes.
    fn table() -> Vec<(String, Option<&'static str>, Option<String>)> {
        let uid_ = UID.replace('-', "_");
        let pod = || Some(UID.to_owned());
        vec![
            // Docker, systemd driver / cgroupfs driver.
            (format!("/system.slice/docker-{ID}.scope"), Some(ID), None),
            (format!("/docker/{ID}"), Some(ID), None),
            // Kubernetes, containerd, systemd driver, each QoS class.
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                Some(ID),
                pod(),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                Some(ID),
                pod(),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                Some(ID),
                pod(),
            ),
            // CRI-O, and its conmon (the monitor, not the container).
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/crio-{ID}.scope"
                ),
                Some(ID),
                pod(),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/crio-conmon-{ID}.scope"
                ),
                None,
                pod(),
            ),
            // cgroupfs driver.
            (
                format!("/kubepods/burstable/pod{UID}/{ID}"),
                Some(ID),
                pod(),
            ),
            (format!("/kubepods/pod{UID}/{ID}"), Some(ID), pod()),
            // The pod's cgroup itself (no container yet).
            (format!("/kubepods/besteffort/pod{UID}"), None, pod()),
            // containerd with mismatched cgroup drivers.
            (
                format!(
                    "/system.slice/containerd.service/kubepods-burstable-pod{uid_}.slice:cri-containerd:{ID}"
                ),
                Some(ID),
                pod(),
            ),
            // Seen through the agent's own cgroup namespace.
            (
                format!(
                    "/../../kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                Some(ID),
                pod(),
            ),
            // kind: pods' containers inside a node that is a docker
            // container; the deepest id is the pod's container.
            (
                format!(
                    "/system.slice/docker-{ID2}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                Some(ID),
                pod(),
            ),
            // A static pod: its UID is a hash.
            (
                format!("/kubepods/burstable/pod{}/{ID}", &ID2[..32]),
                Some(ID),
                Some(ID2[..32].to_owned()),
            ),
            // Podman, rootful and rootless; containerd without Kubernetes.
            (format!("/machine.slice/libpod-{ID}.scope"), Some(ID), None),
            (
                format!(
                    "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
                ),
                Some(ID),
                None,
            ),
            (
                format!("/machine.slice/libpod-conmon-{ID}.scope"),
                None,
                None,
            ),
            (format!("/k8s.io/{ID}"), Some(ID), None),
            // systemd services and sessions: no container.
            ("/system.slice/nginx.service".to_owned(), None, None),
            (
                "/user.slice/user-1000.slice/session-3.scope".to_owned(),
                None,
                None,
            ),
            ("/gw-test-1-2".to_owned(), None, None),
            // Garbage and near misses.
            (format!("/docker/{}", &ID[..63]), None, None),
            (format!("/docker/{ID}0"), None, None),
            (format!("/docker/{}", ID.to_ascii_uppercase()), None, None),
            (format!("/docker-{ID}.scopes"), None, None),
            (format!("/notkube/pod{UID}"), None, None),
            (format!("/pod{UID}/x"), None, None),
            (format!("/kubepods/pod{}", &UID[1..]), None, None),
            (format!("/kubepods/pod{UID}x"), None, None),
            (format!("/kubepods-pod{uid_}.scope"), None, None),
            (format!("/kubepods-pod{uid_}-.slice"), None, None),
            ("/kubepods/pod".to_owned(), None, None),
            ("/kubepods.slice/kubepods-pod.slice".to_owned(), None, None),
            ("////::::".to_owned(), None, None),
            ("/é\u{fffd}\u{1b}[2J/docker-".to_owned(), None, None),
            (String::new(), None, None),
        ]
    }

    #[test]
    fn ids_come_from_the_known_forms_only() {
        for (path, id, pod) in table() {
            assert_eq!(container_id(&path), id, "container id of {path:?}");
            assert_eq!(pod_uid(&path), pod, "pod uid of {path:?}");
        }
    }

    #[test]
    fn the_v2_line_is_the_path() {
        let hybrid = "12:pids:/system.slice/x.service\n1:name=systemd:/system.slice/x.service\n0::/system.slice/x.service\n";
        for (text, want) in [
            (
                "0::/system.slice/nginx.service\n",
                Some("/system.slice/nginx.service"),
            ),
            (hybrid, Some("/system.slice/x.service")),
            ("0::/gw-test-1 (deleted)\n", Some("/gw-test-1 (deleted)")),
            ("0::/../../kubepods.slice\n", Some("/../../kubepods.slice")),
            // Nothing to tell: the root, v1 only, malformed.
            ("0::/\n", None),
            ("12:pids:/docker/x\n1:name=systemd:/docker/x\n", None),
            ("0::\n", None),
            ("0::relative\n", None),
            ("", None),
            ("garbage\0\n", None),
            ("10::/x\n", None),
            // A read cut short: the line is not whole.
            ("0::/system.slice/ngi", None),
        ] {
            assert_eq!(v2_path(text), want, "{text:?}");
        }
    }

    #[test]
    fn long_paths_are_dropped_not_cut() {
        let fits = format!("/{}", "a".repeat(MAX_PATH - 1));
        assert_eq!(v2_path(&format!("0::{fits}\n")), Some(fits.as_str()));
        let long = format!("/{}", "a".repeat(MAX_PATH));
        assert_eq!(v2_path(&format!("0::{long}\n")), None);
    }
}
