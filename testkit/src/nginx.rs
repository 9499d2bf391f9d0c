//! Real nginx (Debian's `/usr/sbin/nginx`) in a test namespace ([`Nginx`]),
//! with a slow upstream it proxies to ([`Upstream`], `upstream.py`: requests
//! stay in flight until the test answers them) and keep-alive HTTP clients
//! ([`HttpClient`], `http_client.py`).
//!
//! nginx runs as a daemon (`daemon on`: its binary upgrade, USR2, is
//! ignored by a master whose parent is still the one that started it), with
//! its own config, pid file and temp paths in a [`TempDir`], and
//! `error_log stderr notice`: the launcher's stderr pipe, inherited by every
//! nginx process, carries the error log, whose lines (`start worker process
//! N`, `gracefully shutting down`, `signal 3 (SIGQUIT) received from P`) are
//! the acknowledgements the tests wait for. Every nginx process lives in the
//! test's namespace and dies with it ([`crate::Netns`]'s drop).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use rustix::{
    event::{PollFd, PollFlags, poll},
    process::{Pid, PidfdFlags, pidfd_open},
};

use crate::{Child, Netns, PROGRAM_TIMEOUT, TempDir, process::tail};

/// Where `cargo xtask setup --test-deps` installs nginx (Debian nginx-light).
pub const NGINX: &str = "/usr/sbin/nginx";

/// One line of nginx's error log: `DATE TIME [level] PID#TID: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub pid: u32,
    pub message: String,
}

impl LogLine {
    fn parse(line: &str) -> Option<LogLine> {
        let (_, rest) = line.split_once("] ")?;
        let (who, message) = rest.split_once(": ")?;
        let pid = who.split('#').next()?.parse().ok()?;
        Some(LogLine {
            pid,
            message: message.to_owned(),
        })
    }

    /// `N` of a `start worker process N` line.
    pub fn started_worker(&self) -> Option<u32> {
        self.message
            .strip_prefix("start worker process ")?
            .trim()
            .parse()
            .ok()
    }
}

/// A running nginx: master, workers, config and pid files in a temp dir.
pub struct Nginx {
    launcher: Child,
    dir: TempDir,
    conf: String,
    master: u32,
    workers: Vec<u32>,
    /// `worker_processes`: how many `start worker process` lines a start or
    /// reload logs.
    worker_count: usize,
}

impl Nginx {
    /// Starts nginx inside `ns` listening on `127.0.0.1:port` with 2 workers
    /// (`reuseport`: one listening socket per worker, so connections from
    /// different source ports spread over both), proxying `/slow/…` to
    /// `upstream` and answering `/fast` itself with `fast $pid`. Returns once
    /// both workers are started.
    #[track_caller]
    pub fn start(ns: &Netns, port: u16, upstream: &str) -> Nginx {
        Nginx::start_with_workers(ns, port, upstream, 2)
    }

    /// [`Nginx::start`] with `workers` worker processes (one generation of a
    /// reload is then that many workers).
    #[track_caller]
    pub fn start_with_workers(ns: &Netns, port: u16, upstream: &str, workers: usize) -> Nginx {
        let dir = TempDir::new(&format!("nginx-{port}"));
        let d = dir.root().to_string_lossy().into_owned();
        let conf = dir.write(
            "nginx.conf",
            &format!(
                "daemon on;
master_process on;
worker_processes {workers};
user root;
pid {d}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_timeout 60s;
    server {{
        listen 127.0.0.1:{port} reuseport;
        location /slow/ {{
            proxy_pass http://{upstream};
            proxy_set_header X-Worker $pid;
            proxy_read_timeout 120s;
        }}
        location = /fast {{
            return 200 \"fast $pid\\n\";
        }}
    }}
}}
"
            ),
        );
        let mut launcher = Child::spawn(
            ns,
            &format!("nginx :{port} (netns {})", ns.name()),
            NGINX,
            &["-p", &d, "-c", &conf, "-e", "stderr"],
        );
        // The launcher exits once the daemon forked; its stderr pipe lives on
        // in every nginx process.
        let status = launcher.wait_exit(PROGRAM_TIMEOUT);
        assert!(
            status.success(),
            "nginx failed to start ({status})\n{}",
            launcher.context()
        );
        let mut nginx = Nginx {
            launcher,
            dir,
            conf,
            master: 0,
            workers: Vec::new(),
            worker_count: workers,
        };
        let (master, workers) = nginx.wait_workers_started(0, |_| true);
        nginx.master = master;
        nginx.workers = workers;
        assert_eq!(
            nginx.pidfile("nginx.pid"),
            Some(master),
            "nginx.pid does not name the master that started the workers"
        );
        nginx
    }

    pub fn master(&self) -> u32 {
        self.master
    }

    /// The workers started with the master.
    pub fn workers(&self) -> Vec<u32> {
        self.workers.clone()
    }

    /// `PREFIX/name`.
    pub fn path(&self, name: &str) -> String {
        self.dir.path(name)
    }

    /// The pid in `PREFIX/name` (`nginx.pid`, `nginx.pid.oldbin`).
    pub fn pidfile(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.dir.path(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The error log so far (every nginx process's lines).
    pub fn log(&self) -> Vec<LogLine> {
        self.launcher
            .stderr_lines()
            .iter()
            .filter_map(|l| LogLine::parse(l))
            .collect()
    }

    /// Number of log lines so far: pass it as `after` to look only at what
    /// comes next.
    pub fn log_mark(&self) -> usize {
        self.launcher.stderr_lines().len()
    }

    /// Waits until `f`, given the log lines after `after`, returns `Some`.
    #[track_caller]
    pub fn wait_log<T>(
        &self,
        what: &str,
        after: usize,
        mut f: impl FnMut(&[LogLine]) -> Option<T>,
    ) -> T {
        self.launcher
            .wait_stderr_line(what, PROGRAM_TIMEOUT, |all| {
                let lines: Vec<LogLine> = all
                    .get(after..)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|l| LogLine::parse(l))
                    .collect();
                f(&lines)
            })
    }

    /// Waits, after log line `after`, for a master accepted by `is_master`
    /// to log `start worker process N` once per worker; returns it and the
    /// workers.
    #[track_caller]
    pub fn wait_workers_started(
        &self,
        after: usize,
        is_master: impl Fn(u32) -> bool,
    ) -> (u32, Vec<u32>) {
        let want = self.worker_count;
        let what = format!("{want} `start worker process N` lines");
        self.wait_log(&what, after, |lines| {
            let mut by: Option<u32> = None;
            let mut workers = Vec::new();
            for l in lines {
                if let Some(w) = l.started_worker()
                    && is_master(l.pid)
                    && by.is_none_or(|m| m == l.pid)
                {
                    by = Some(l.pid);
                    workers.push(w);
                }
            }
            (workers.len() == want).then(|| (by.unwrap_or(0), workers))
        })
    }

    /// Waits until each of `pids` logged `gracefully shutting down` after
    /// log line `after`.
    #[track_caller]
    pub fn wait_shutting_down(&self, after: usize, pids: &[u32]) {
        self.wait_log(
            &format!("`gracefully shutting down` from each of {pids:?}"),
            after,
            |lines| {
                pids.iter()
                    .all(|p| {
                        lines
                            .iter()
                            .any(|l| l.pid == *p && l.message == "gracefully shutting down")
                    })
                    .then_some(())
            },
        );
    }

    /// `nginx -s reload` (HUP to the master named in the pid file).
    #[track_caller]
    pub fn reload(&self) {
        let d = self.dir.root().to_string_lossy().into_owned();
        let out = Command::new(NGINX)
            .args(["-p", &d, "-c", &self.conf, "-e", "stderr", "-s", "reload"])
            .output()
            .unwrap_or_else(|e| panic!("failed to run nginx -s reload: {e}"));
        assert!(
            out.status.success(),
            "nginx -s reload failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The error log, for failure messages.
    pub fn context(&self) -> String {
        format!(
            "  nginx error log:\n{}",
            tail(&self.launcher.stderr_lines(), 40)
        )
    }
}

/// Whether nginx is installed; otherwise a skip (a failure in CI).
pub fn nginx_available() -> bool {
    if std::path::Path::new(NGINX).is_file() {
        return true;
    }
    crate::cannot_run(&format!(
        "{NGINX} is missing (install it with `cargo xtask setup --test-deps`)"
    ))
}

/// The direct children of `pid`, by `pgrep -P` (what a deploy script uses).
#[track_caller]
pub fn pgrep_children(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("failed to run pgrep: {e}"));
    let mut pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// The parent of `pid` (`/proc/PID/stat`).
pub fn parent_of(pid: u32) -> Option<u32> {
    crate::procfs::stat(pid).map(|s| s.ppid)
}

/// Whether the process `pid` exits within `timeout`, watched through a pidfd
/// (readable at exit: no polling). A pid that is already gone counts.
pub fn exits_within(pid: u32, timeout: Duration) -> bool {
    let Some(fd) = Pid::from_raw(pid as i32).and_then(|p| pidfd_open(p, PidfdFlags::empty()).ok())
    else {
        return true;
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ts = rustix::time::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(n) if n > 0 => return true,
            Ok(_) => return false,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return false,
        }
    }
}

/// Whether `pid` is alive right now (its pidfd is not readable).
pub fn alive(pid: u32) -> bool {
    !exits_within(pid, Duration::ZERO)
}

/// `upstream.py`: an HTTP upstream that answers each request only when told.
pub struct Upstream {
    child: Child,
    address: String,
}

impl Upstream {
    #[track_caller]
    pub fn start(ns: &Netns, address: &str) -> Upstream {
        let label = format!("upstream {address} (netns {})", ns.name());
        let child = Child::python(ns, &label, "upstream.py", &["--listen", address]);
        let (_, rest) = child.wait_ready();
        let Some(address) = rest.into_iter().next() else {
            panic!("{}: no address in its ready line", child.label());
        };
        Upstream { child, address }
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Waits for request `name` to arrive; returns the nginx worker that
    /// proxies it.
    #[track_caller]
    pub fn wait_request(&self, name: &str) -> u32 {
        let prefix = format!("request {name} worker=");
        let worker =
            self.child
                .wait_line(&format!("`request {name} …`"), PROGRAM_TIMEOUT, |lines| {
                    lines
                        .iter()
                        .find_map(|l| l.strip_prefix(prefix.as_str()).map(str::to_owned))
                });
        worker.parse().unwrap_or_else(|_| {
            panic!(
                "{}: request {name} came without a worker pid ({worker:?})",
                self.child.label()
            )
        })
    }

    /// Answers request `name`; returns the CLOCK_MONOTONIC ns at which the
    /// answer was released (before it was written).
    #[track_caller]
    pub fn respond(&self, name: &str) -> u64 {
        let reply = self.child.request(&format!("respond {name}"), "responded");
        let mut words = reply.split_whitespace().skip(1);
        match (words.next(), words.next().and_then(|t| t.parse().ok())) {
            (Some(n), Some(t)) if n == name => t,
            _ => panic!("{}: unexpected reply {reply:?}", self.child.label()),
        }
    }
}

/// A response as `http_client.py` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// The body, spaces as `_`.
    pub body: String,
    /// CLOCK_MONOTONIC ns when the client had read all of it.
    pub at_ns: u64,
}

/// `http_client.py`: one keep-alive connection per request.
pub struct HttpClient {
    child: Child,
}

impl HttpClient {
    #[track_caller]
    pub fn start(ns: &Netns, address: &str) -> HttpClient {
        let label = format!("http client -> {address} (netns {})", ns.name());
        let child = Child::python(ns, &label, "http_client.py", &["--connect", address]);
        child.wait_ready();
        HttpClient { child }
    }

    /// Sends `GET path` as request `name` on a new connection; returns once
    /// it is written.
    #[track_caller]
    pub fn get(&self, name: &str, path: &str) {
        self.child.send(&format!("get {name} {path}"));
        self.wait(name, "sent", |rest| rest.is_empty().then_some(()));
    }

    /// Waits for the complete response to `name`.
    #[track_caller]
    pub fn wait_done(&self, name: &str) -> Response {
        self.wait(name, "done", |rest| {
            let mut w = rest.split_whitespace();
            Some(Response {
                status: w.next()?.parse().ok()?,
                body: w.next()?.to_owned(),
                at_ns: w.next()?.parse().ok()?,
            })
        })
    }

    /// Whether the response to `name` is already complete.
    pub fn is_done(&self, name: &str) -> bool {
        let prefix = format!("done {name} ");
        self.child.lines().iter().any(|l| l.starts_with(&prefix))
    }

    #[track_caller]
    fn wait<T>(&self, name: &str, kind: &str, parse: impl Fn(&str) -> Option<T>) -> T {
        let line = format!("{kind} {name}");
        let error = format!("error {name} ");
        let got = self
            .child
            .wait_line(&format!("`{line} …`"), PROGRAM_TIMEOUT, |lines| {
                lines.iter().find_map(|l| {
                    if l.starts_with(&error) {
                        return Some(Err((*l).to_owned()));
                    }
                    let rest = l.strip_prefix(line.as_str())?;
                    if !(rest.is_empty() || rest.starts_with(' ')) {
                        return None;
                    }
                    Some(parse(rest.trim()).ok_or_else(|| format!("malformed line {l:?}")))
                })
            });
        got.unwrap_or_else(|why| {
            panic!(
                "{}: request {name}: {why}\n{}",
                self.child.label(),
                self.child.context()
            )
        })
    }
}
