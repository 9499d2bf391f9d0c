//! Which processes a drain may aim at, and how far a pidfile is trusted.
//! gracewatch usually runs as root with the power to signal any process,
//! so the targets a user, a script or an API client names are checked
//! before anything is pinned for signalling: pid 1, kernel threads,
//! gracewatch itself and its ancestors are refused (a STOP or TERM there
//! takes the host or the tool down), and a pidfile is read the way systemd
//! reads `PIDFile=` — bounded, without blocking, without echoing what it
//! holds, and trusted only when its owner could signal the process anyway.

use std::{
    fs,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use rustix::{
    fs::{FileType, Mode, OFlags},
    io::Errno,
};

use super::TargetError;
use crate::{
    input::check_pid,
    source::process::{self, PinnedProcess},
};

/// `task_struct.flags` bit of a kernel thread (`include/linux/sched.h`).
const PF_KTHREAD: u64 = 0x0020_0000;
/// A pidfile holds a pid of at most 7 digits and a newline; anything
/// longer is not a pidfile.
const PIDFILE_MAX_BYTES: usize = 64;
/// Longest parent chain followed from gracewatch up to pid 1 (guards
/// against a cycle read from a racing /proc).
const MAX_ANCESTRY: usize = 4096;

/// A pid read from a pidfile, and whether the file's owner vouches for it.
pub(super) struct PidfileTarget {
    pub pid: u32,
    path: PathBuf,
    owner: u32,
    /// Group or others may write the file: its owner does not decide what it says.
    shared_write: bool,
}

/// Opens `path` without following a final symlink and without blocking
/// (a FIFO would otherwise hang the caller until a writer shows up),
/// refuses anything but a small regular file, and reads at most
/// [`PIDFILE_MAX_BYTES`]. Errors name the file, never its content (and
/// are escaped where they reach a terminal, like every message).
pub(super) fn read_pidfile(path: &Path) -> Result<PidfileTarget, TargetError> {
    let shown = path.display();
    let fail = |why: String| TargetError(format!("pidfile {shown}: {why}"));
    let fd: OwnedFd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::LOOP => fail(
            "is a symbolic link (name the file it points to, after checking who can change the link)"
                .to_owned(),
        ),
        e => TargetError(format!(
            "cannot read pidfile {shown}: {}",
            std::io::Error::from(e)
        )),
    })?;
    let st = rustix::fs::fstat(&fd)
        .map_err(|e| fail(format!("cannot inspect it: {}", std::io::Error::from(e))))?;
    let kind = FileType::from_raw_mode(st.st_mode);
    if kind != FileType::RegularFile {
        return Err(fail(format!(
            "is not a regular file (it is a {})",
            describe(kind)
        )));
    }
    if usize::try_from(st.st_size).map_or(true, |n| n > PIDFILE_MAX_BYTES) {
        return Err(fail(format!(
            "is {} bytes long: a pidfile holds one pid",
            st.st_size
        )));
    }
    let mut buf = [0u8; PIDFILE_MAX_BYTES + 1];
    let mut len = 0;
    // Bounded: every pass but the last adds at least one byte.
    while len < buf.len() {
        match rustix::io::read(&fd, &mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(Errno::INTR) => {}
            Err(e) => {
                return Err(fail(format!("cannot read it: {}", std::io::Error::from(e))));
            }
        }
    }
    if len > PIDFILE_MAX_BYTES {
        return Err(fail(
            "grew past the size of a pid while being read".to_owned(),
        ));
    }
    let pid = std::str::from_utf8(&buf[..len])
        .ok()
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse::<u32>().ok())
        .and_then(|p| check_pid(p).ok())
        .ok_or_else(|| {
            fail(format!(
                "does not hold a pid (expected one decimal number from 1 to {}; its content is not shown)",
                crate::input::PID_MAX
            ))
        })?;
    Ok(PidfileTarget {
        pid,
        path: path.to_owned(),
        owner: st.st_uid,
        shared_write: st.st_mode & 0o022 != 0,
    })
}

fn describe(kind: FileType) -> &'static str {
    match kind {
        FileType::Fifo => "FIFO",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Directory => "directory",
        FileType::Socket => "socket",
        FileType::Symlink => "symbolic link",
        _ => "special file",
    }
}

impl PidfileTarget {
    /// The pidfile rule of systemd's `PIDFile=`: a file only root can write
    /// is trusted; a file another user owns (and only they can write) is
    /// trusted for that user's own processes, which they could signal
    /// anyway. Anything else is refused unless `allow` says otherwise.
    pub(super) fn vouches_for(&self, proc: &PinnedProcess, allow: bool) -> Result<(), TargetError> {
        if allow || (self.owner == 0 && !self.shared_write) {
            return Ok(());
        }
        let shown = self.path.display();
        let hint =
            "pass --allow-unsafe-pidfile (API: allow_unsafe_pidfile) to trust whoever can write it";
        if self.shared_write {
            return Err(TargetError(format!(
                "pidfile {shown} is writable by group or others, so any of them chooses the target: refused; {hint}"
            )));
        }
        let uid = real_uid(proc.pid);
        // A process that exited is not judged by what /proc says about its
        // pid now (which may be another process's); its pidfd can no
        // longer signal anything.
        if !still_same(proc) {
            return Ok(());
        }
        let Some(uid) = uid else {
            return Err(TargetError(format!(
                "pidfile {shown} is owned by uid {} and the owner of pid {} cannot be read: refused; {hint}",
                self.owner, proc.pid
            )));
        };
        if uid != self.owner {
            return Err(TargetError(format!(
                "pidfile {shown} is owned by uid {}, but pid {} runs as uid {uid}: refused, the file's owner could aim the signal at another user's process; {hint}",
                self.owner, proc.pid
            )));
        }
        Ok(())
    }
}

/// What the process running `choose` must never signal: itself and every
/// process above it (the shell or service manager that started it).
pub(super) struct Protected {
    own: Vec<u32>,
}

impl Protected {
    pub(super) fn new() -> Self {
        let me = std::process::id();
        let mut own = vec![me];
        let mut pid = me;
        while own.len() < MAX_ANCESTRY {
            match stat_fields(pid).and_then(|f| f.ppid) {
                Some(ppid) if ppid != 0 && !own.contains(&ppid) => {
                    own.push(ppid);
                    pid = ppid;
                }
                _ => break,
            }
        }
        Self { own }
    }

    /// Refuses pid 1, gracewatch and its ancestors, and kernel threads,
    /// unless `allow`; the refusal says how to override it.
    pub(super) fn check(&self, proc: &PinnedProcess, allow: bool) -> Result<(), TargetError> {
        if allow {
            return Ok(());
        }
        self.refusal(proc).map_err(|r| {
            TargetError(if r.overridable {
                format!(
                    "{}; pass --allow-dangerous-target (API: allow_dangerous_target) if you mean it",
                    r.why
                )
            } else {
                r.why
            })
        })
    }

    /// Why `proc` may not be signalled, if it may not (no override: the
    /// governor has none). A process that has already exited passes: its
    /// pidfd can no longer signal anything, and what it was is for the
    /// caller to report.
    pub(super) fn refusal(&self, proc: &PinnedProcess) -> Result<(), Refusal> {
        let pid = proc.pid;
        let who = if proc.comm.is_empty() {
            format!("pid {pid}")
        } else {
            format!("pid {pid} ({})", proc.comm)
        };
        let why = if pid == 1 {
            Some("is the init process: signalling it can take the whole host or container down")
        } else if pid == std::process::id() {
            Some("is this gracewatch process itself")
        } else if self.own.contains(&pid) {
            Some("is an ancestor of this gracewatch process (the shell or service that started it)")
        } else {
            match stat_fields(pid) {
                Some(f) if f.flags & PF_KTHREAD != 0 => Some("is a kernel thread"),
                Some(_) => None,
                None if !still_same(proc) => None,
                None => {
                    return Err(Refusal {
                        why: format!(
                            "{who}: cannot read /proc/{pid}/stat to check what it is: refused"
                        ),
                        overridable: false,
                    });
                }
            }
        };
        match why {
            // A process that exited (and whose pid may be reused) is not
            // judged by what /proc says about that pid now.
            Some(_) if !still_same(proc) => Ok(()),
            Some(why) => Err(Refusal {
                why: format!("{who} {why}: refused"),
                overridable: true,
            }),
            None => Ok(()),
        }
    }
}

/// Why a process may not be signalled ([`Protected::refusal`]).
pub(super) struct Refusal {
    pub why: String,
    /// `--allow-dangerous-target` would lift it (an unreadable /proc
    /// entry is refused whatever the flags).
    pub overridable: bool,
}

/// Refuses `--children` of pid 1: every process of the host (or container).
pub(super) fn check_children_roots(roots: &[u32], allow: bool) -> Result<(), TargetError> {
    if !allow && roots.contains(&1) {
        return Err(TargetError(
            "--children of pid 1 is every process on the host (or in the container): refused; pass --allow-dangerous-target (API: allow_dangerous_target) if you mean it"
                .to_owned(),
        ));
    }
    Ok(())
}

/// Whether `proc` still runs, so what /proc said about its pid a moment ago
/// was about it and not about a process that took the pid since.
fn still_same(proc: &PinnedProcess) -> bool {
    !proc.has_exited()
}

struct StatFields {
    ppid: Option<u32>,
    flags: u64,
}

/// `ppid` and `flags` of `/proc/<pid>/stat` (the source's one reader of it,
/// which splits at the last `)`: a command name may be any bytes).
fn stat_fields(pid: u32) -> Option<StatFields> {
    let rest = process::stat_after_comm(pid)?;
    // After the name: state ppid pgrp session tty_nr tpgid flags …
    let fields: Vec<&str> = rest.split_ascii_whitespace().take(7).collect();
    Some(StatFields {
        ppid: fields.get(1)?.parse().ok(),
        flags: fields.get(6)?.parse().ok()?,
    })
}

/// The real uid of `pid` (`Uid:` in `/proc/<pid>/status`), as systemd's
/// `get_process_uid`.
fn real_uid(pid: u32) -> Option<u32> {
    let raw = fs::read(format!("/proc/{pid}/status")).ok()?;
    let text = String::from_utf8_lossy(&raw);
    text.lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_reads_as_a_user_process_with_a_parent() {
        let f = stat_fields(std::process::id()).expect("own stat");
        assert_eq!(f.flags & PF_KTHREAD, 0);
        assert!(f.ppid.is_some());
        assert_eq!(
            real_uid(std::process::id()),
            Some(rustix::process::getuid().as_raw())
        );
        let p = Protected::new();
        assert!(p.own.contains(&std::process::id()));
        assert!(
            p.own.len() >= 2,
            "the test runner has a parent: {:?}",
            p.own
        );
    }

    #[test]
    fn children_of_init_are_refused_unless_allowed() {
        assert!(check_children_roots(&[1], false).is_err());
        assert!(check_children_roots(&[1], true).is_ok());
        assert!(check_children_roots(&[42], false).is_ok());
    }

    fn pidfile(content: &[u8]) -> (PathBuf, Result<PidfileTarget, TargetError>) {
        let dir = std::env::temp_dir().join(format!(
            "gw-pidfile-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ));
        fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("x.pid");
        fs::write(&path, content).expect("write");
        let r = read_pidfile(&path);
        let _ = fs::remove_dir_all(&dir);
        (path, r)
    }

    #[test]
    fn pidfiles_parse_strictly_and_never_echo_content() {
        assert_eq!(pidfile(b"1234\n").1.map(|t| t.pid).ok(), Some(1234));
        assert_eq!(pidfile(b"  77  ").1.map(|t| t.pid).ok(), Some(77));
        for bad in [
            &b"root:$6$secretsalt$hash:19000:0:99999:7:::"[..],
            b"",
            b"0\n",
            b"-5\n",
            b"12 34\n",
            b"2147483648\n",
            b"4194305\n",
            b"\xff\xfe",
            &[b'7'; 65][..],
        ] {
            let (path, r) = pidfile(bad);
            // The path is named (and may hold any digits): look past it.
            let msg = r
                .err()
                .expect("refused")
                .0
                .replace(&*path.to_string_lossy(), "PATH");
            let content = String::from_utf8_lossy(bad);
            let content = content.trim();
            assert!(
                content.len() < 2 || !msg.contains(content),
                "{msg:?} echoes {content:?}"
            );
            assert!(!msg.contains("secret"), "{msg}");
        }
    }

    #[test]
    fn special_files_are_refused_without_blocking() {
        for (path, word) in [
            ("/dev/zero", "character device"),
            ("/proc/self", "symbolic link"),
            ("/tmp", "directory"),
        ] {
            let msg = read_pidfile(Path::new(path)).err().expect(path).0;
            assert!(msg.contains(word), "{path}: {msg}");
        }
        // A FIFO with no writer: opening it non-blocking returns at once.
        let dir = std::env::temp_dir().join(format!("gw-fifo-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let fifo = dir.join("fifo.pid");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        let started = std::time::Instant::now();
        let msg = read_pidfile(&fifo).err().expect("fifo refused").0;
        assert!(msg.contains("FIFO"), "{msg}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let _ = fs::remove_dir_all(&dir);
    }
}
