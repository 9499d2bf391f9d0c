//! Typed drivers for the test programs `tests/programs/server.py` and
//! `client.py` (their docstrings define the line protocol). Each method
//! sends a command and returns once the program acknowledged it, so the
//! kernel state it describes is already in place.

use std::{
    sync::{Arc, Mutex, Weak},
    thread,
    time::{Duration, Instant},
};

use crate::{
    Child, Netns, PROGRAM_TIMEOUT,
    process::{Lines, View, tail},
    program,
};

/// Every live `server.py` of this test binary, by pid: the independent
/// oracle [`crate::Drain`] asks, for every drain that ends 0 with a signal,
/// whether the target saw that signal and held nothing then.
static SERVERS: Mutex<Vec<(u32, Weak<Lines>, View)>> = Mutex::new(Vec::new());

/// Makes `child` (process `pid`, printing `signal NAME T open=N from=PID`
/// lines as `server.py` does) an oracle for the drains that target it.
/// [`Server`]s are registered on their own.
pub fn report_signals_of(pid: u32, child: &Child) {
    register(pid, child);
}

fn register(pid: u32, child: &Child) {
    let mut all = SERVERS.lock().unwrap_or_else(|e| e.into_inner());
    all.retain(|(p, lines, _)| *p != pid && lines.strong_count() > 0);
    all.push((pid, Arc::downgrade(child.stdout()), child.view()));
}

/// The output of the `server.py` processes among `pids` that this test
/// binary still drives (others are left out).
pub(crate) fn servers_among(pids: &[u32]) -> Vec<(u32, Arc<Lines>, View)> {
    let all = SERVERS.lock().unwrap_or_else(|e| e.into_inner());
    all.iter()
        .filter(|(pid, _, _)| pids.contains(pid))
        .filter_map(|(pid, lines, view)| Some((*pid, lines.upgrade()?, *view)))
        .collect()
}

/// The signals that the `server.py` processes among `pids` reported so
/// far, per pid; pids that are no running `server.py` of ours are left out.
pub(crate) fn signals_seen_by(pids: &[u32]) -> Vec<(u32, Vec<SignalSeen>)> {
    servers_among(pids)
        .into_iter()
        .map(|(pid, lines, view)| {
            let snapshot = lines.snapshot();
            let seen = view
                .filter(&snapshot)
                .into_iter()
                .filter_map(SignalSeen::parse)
                .collect();
            (pid, seen)
        })
        .collect()
}

/// A `server.py` process: listens (or adopts an inherited listener),
/// accepts in the background and holds every connection until told.
pub struct Server {
    child: Child,
    pid: u32,
    address: String,
}

impl Server {
    /// Starts `server.py --listen ADDR` inside `ns` and waits until it listens.
    /// `ADDR` is `127.0.0.1:P`, `[::1]:P`, or `[::]:P` (dual-stack).
    #[track_caller]
    pub fn listen(ns: &Netns, address: &str) -> Server {
        let label = format!("server {address} (netns {})", ns.name());
        Server::from_ready(Child::python(
            ns,
            &label,
            "server.py",
            &["--listen", address],
        ))
    }

    /// Like [`Server::listen`], with extra `server.py` options (e.g.
    /// `--name-hex fffe41`) and run as `uid` if given (`setpriv`, no
    /// supplementary groups): another user's process.
    #[track_caller]
    pub fn listen_with(ns: &Netns, address: &str, uid: Option<u32>, extra: &[&str]) -> Server {
        let prog = program("server.py");
        let ids = uid.map(|u| (format!("--reuid={u}"), format!("--regid={u}")));
        let mut args: Vec<&str> = Vec::new();
        if let Some((reuid, regid)) = &ids {
            // The system interpreter: a per-user install (pyenv under
            // /root) is not reachable for another user.
            args.extend([
                reuid.as_str(),
                regid.as_str(),
                "--clear-groups",
                "/usr/bin/python3",
            ]);
        }
        args.extend(["-u", &prog, "--listen", address]);
        args.extend_from_slice(extra);
        let label = format!(
            "server {address} {extra:?} uid {uid:?} (netns {})",
            ns.name()
        );
        let child = if uid.is_some() {
            Child::spawn(ns, &label, "setpriv", &args)
        } else {
            Child::spawn(ns, &label, "python3", &args)
        };
        Server::from_ready(child)
    }

    /// Like [`Server::listen`], with an accept queue of `backlog` (the
    /// kernel caps it at `net.core.somaxconn`).
    #[track_caller]
    pub fn listen_with_backlog(ns: &Netns, address: &str, backlog: u32) -> Server {
        Server::listen_with(ns, address, None, &["--backlog", &backlog.to_string()])
    }

    /// Like [`Server::listen`], but the server process gets exactly `pid`
    /// (`with_pid.py`: clone3 with `set_tid`), which must be free.
    #[track_caller]
    pub fn listen_with_pid(ns: &Netns, address: &str, pid: u32) -> Server {
        let pid_arg = pid.to_string();
        let child = Child::spawn(
            ns,
            &format!("server {address} as pid {pid} (netns {})", ns.name()),
            "python3",
            &[
                "-u",
                &program("with_pid.py"),
                &pid_arg,
                "python3",
                "-u",
                &program("server.py"),
                "--listen",
                address,
            ],
        );
        let server = Server::from_ready(child);
        assert_eq!(
            server.pid,
            pid,
            "{}: did not get the pid it asked for",
            server.child.label()
        );
        server
    }

    fn from_ready(child: Child) -> Server {
        let (pid, rest) = child.wait_ready();
        let Some(address) = rest.into_iter().next() else {
            panic!("{}: no address in its ready line", child.label());
        };
        register(pid, &child);
        Server {
            child,
            pid,
            address,
        }
    }

    /// Pid of the server process (as the process itself reports it).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The bound address as the server reports it (e.g. `127.0.0.1:7101`).
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn child(&self) -> &Child {
        &self.child
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Connections this process has accepted so far (its latest `accepted N`).
    pub fn accepted(&self) -> u64 {
        accepted_in(
            &self
                .child
                .lines()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
    }

    /// Waits until this process has accepted exactly `n` connections in total.
    #[track_caller]
    pub fn wait_accepted(&self, n: u64) {
        let got = self
            .child
            .wait_line(&format!("`accepted {n}`"), PROGRAM_TIMEOUT, |lines| {
                let got = accepted_in(lines);
                (got >= n).then_some(got)
            });
        assert_eq!(
            got,
            n,
            "{}: accepted more connections than expected\n{}",
            self.child.label(),
            self.child.context()
        );
    }

    /// Closes the `k` oldest connections this server holds.
    #[track_caller]
    pub fn close(&self, k: u64) {
        let reply = self.child.request(&format!("close {k}"), "closed");
        assert_eq!(
            reply,
            format!("closed {k}"),
            "{}: unexpected reply",
            self.child.label()
        );
    }

    /// Closes the connections the peer reset (state CLOSE); returns how many.
    #[track_caller]
    pub fn close_reset(&self) -> u64 {
        self.child.request_value("closereset", "closed")
    }

    /// Closes every connection this server holds; returns how many.
    #[track_caller]
    pub fn closeall(&self) -> u64 {
        self.child.request_value("closeall", "closed")
    }

    /// The connections this server holds, by kernel TCP state.
    #[track_caller]
    pub fn count(&self) -> ConnCount {
        let reply = self.child.request("count", "count");
        ConnCount::parse(&reply)
            .unwrap_or_else(|| panic!("{}: malformed reply {reply:?}", self.child.label()))
    }

    /// Asks for [`Server::count`] until `pred` holds. The state changes it
    /// waits for (a peer's FIN or RST reaching this socket) happen in the
    /// kernel without any acknowledgement we could wait on, so this polls,
    /// with a deadline.
    #[track_caller]
    pub fn wait_count(&self, what: &str, pred: impl Fn(&ConnCount) -> bool) -> ConnCount {
        let deadline = Instant::now() + PROGRAM_TIMEOUT;
        loop {
            let count = self.count();
            if pred(&count) {
                return count;
            }
            assert!(
                Instant::now() < deadline,
                "{}: timed out waiting for its connections to reach: {what}; last: {count:?}",
                self.child.label()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops accepting but keeps the listener open. No accept happens after this returns.
    #[track_caller]
    pub fn stopaccept(&self) {
        self.child.request("stopaccept", "stopped");
    }

    /// Closes this process's listening fd (the listener lives on in any other holder).
    #[track_caller]
    pub fn closelistener(&self) {
        self.child.request("closelistener", "listener");
    }

    /// Fork/execs a new `server.py --inherit-fd N` holding the same listener
    /// and returns it once it is ready. Both processes accept until this one
    /// is told to [`Server::stopaccept`]. The new process is driven through
    /// this one (relayed stdio) and dies with it.
    #[track_caller]
    pub fn handover(&self) -> Server {
        let pid: u32 = self.child.request_value("handover", "child");
        let child = self
            .child
            .relayed(&format!("handover child {pid} of {}", self.child.label()));
        let server = Server::from_ready(child);
        assert_eq!(
            server.pid, pid,
            "handover child reported another pid than its parent"
        );
        server
    }

    /// Asks the server to exit and waits for its goodbye.
    #[track_caller]
    pub fn exit(&self) {
        self.child.request("exit", "bye");
    }

    /// Round trip through the server's command loop: it is alive and reading.
    #[track_caller]
    pub fn ping(&self) {
        self.child.request("ping", "pong");
    }

    /// The server's CLOCK_MONOTONIC, in ns.
    #[track_caller]
    pub fn now(&self) -> u64 {
        self.child.request_value("now", "now")
    }

    /// Schedules closing the oldest connections one at a time, the i-th
    /// `delays_ms[i]` ms from now (requests of different lengths finishing).
    #[track_caller]
    pub fn close_after(&self, delays_ms: &[u64]) {
        let args: Vec<String> = delays_ms.iter().map(u64::to_string).collect();
        let reply = self
            .child
            .request(&format!("closeafter {}", args.join(" ")), "scheduled");
        assert_eq!(
            reply,
            format!("scheduled {}", delays_ms.len()),
            "{}: unexpected reply",
            self.child.label()
        );
    }

    /// Monotonic times (ns) of the scheduled closes, waiting for the first `k`.
    #[track_caller]
    pub fn wait_closed_at(&self, k: usize, timeout: Duration) -> Vec<u64> {
        self.child
            .wait_line(&format!("`closedat {k} …`"), timeout, |lines| {
                let times: Vec<u64> = lines
                    .iter()
                    .filter_map(|l| l.strip_prefix("closedat "))
                    .filter_map(|rest| rest.split_whitespace().nth(1)?.parse().ok())
                    .collect();
                (times.len() >= k).then_some(times)
            })
    }

    /// With `--hangup` (see [`Server::listen_with`]): the monotonic times
    /// (ns) at which its accepts returned, waiting for the first `n`.
    #[track_caller]
    pub fn wait_hungup(&self, n: usize) -> Vec<u64> {
        self.child
            .wait_line(&format!("`hungup {n} …`"), PROGRAM_TIMEOUT, |lines| {
                let times: Vec<u64> = lines
                    .iter()
                    .filter_map(|l| l.strip_prefix("hungup "))
                    .filter_map(|rest| rest.split_whitespace().nth(1)?.parse().ok())
                    .collect();
                (times.len() >= n).then_some(times)
            })
    }

    /// Every signal the server reported so far.
    pub fn signals(&self) -> Vec<SignalSeen> {
        self.child
            .lines()
            .iter()
            .filter_map(|l| SignalSeen::parse(l))
            .collect()
    }

    /// Waits for the server to report a signal; returns the first one.
    #[track_caller]
    pub fn wait_signal(&self, timeout: Duration) -> SignalSeen {
        self.child.wait_line("a `signal …` line", timeout, |lines| {
            lines.iter().find_map(|l| SignalSeen::parse(l))
        })
    }

    /// Fails if the server reported any signal.
    #[track_caller]
    pub fn assert_no_signal(&self, context: &str) {
        let seen = self.signals();
        assert!(
            seen.is_empty(),
            "{}: received {seen:?} ({context})\n{}",
            self.child.label(),
            self.child.context()
        );
    }

    /// Waits for the server process to exit by itself (see [`Child::wait_exit`]).
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.child.wait_exit(timeout)
    }
}

/// A `signal NAME T open=N from=PID` line of `server.py`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalSeen {
    /// `TERM`, `QUIT`…
    pub name: String,
    /// CLOCK_MONOTONIC (ns) when the server took it.
    pub at_ns: u64,
    /// Accepted connections it still held (not yet fully closed) then.
    pub open: u64,
    /// The sender's pid (`si_pid`).
    pub from: u32,
}

impl SignalSeen {
    pub(crate) fn parse(line: &str) -> Option<SignalSeen> {
        let mut words = line.strip_prefix("signal ")?.split_whitespace();
        let name = words.next()?.to_owned();
        let at_ns = words.next()?.parse().ok()?;
        let open = words.next()?.strip_prefix("open=")?.parse().ok()?;
        let from = words.next()?.strip_prefix("from=")?.parse().ok()?;
        Some(SignalSeen {
            name,
            at_ns,
            open,
            from,
        })
    }
}

/// Waits until `servers` (an old server and its handover child, which share
/// one output pipe) have accepted exactly `n` connections between them;
/// returns what each accepted.
#[track_caller]
pub fn wait_accepted_sum(servers: &[&Server], n: u64) -> Vec<u64> {
    let Some(first) = servers.first() else {
        return Vec::new();
    };
    for s in servers {
        assert!(
            std::sync::Arc::ptr_eq(s.child.stdout(), first.child.stdout()),
            "wait_accepted_sum needs servers of one handover family"
        );
    }
    let views: Vec<_> = servers.iter().map(|s| s.child.view()).collect();
    let got = first.child.stdout().wait(PROGRAM_TIMEOUT, |all| {
        let each: Vec<u64> = views.iter().map(|v| accepted_in(&v.filter(all))).collect();
        (each.iter().sum::<u64>() >= n).then_some(each)
    });
    match got {
        Ok(each) if each.iter().sum::<u64>() == n => each,
        Ok(each) => panic!("servers accepted {each:?} connections, more than the {n} expected"),
        Err(_) => panic!(
            "timed out waiting for {n} accepts in total by {:?}\n  their output:\n{}",
            servers.iter().map(|s| s.pid).collect::<Vec<_>>(),
            tail(&first.child.stdout().snapshot(), 30)
        ),
    }
}

fn accepted_in(lines: &[&str]) -> u64 {
    lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("accepted ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// A server's `count` reply: its open connection fds by kernel TCP state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCount {
    pub open: u64,
    pub established: u64,
    /// The peer closed (FIN) and the server still holds the socket.
    pub close_wait: u64,
    /// The peer reset the connection (state CLOSE) and the server still holds the fd.
    pub reset: u64,
    pub other: u64,
}

impl ConnCount {
    fn parse(line: &str) -> Option<ConnCount> {
        let mut c = ConnCount::default();
        for word in line.split_whitespace().skip(1) {
            let (key, value) = word.split_once('=')?;
            let value = value.parse().ok()?;
            match key {
                "open" => c.open = value,
                "established" => c.established = value,
                "close_wait" => c.close_wait = value,
                "reset" => c.reset = value,
                "other" => c.other = value,
                _ => return None,
            }
        }
        Some(c)
    }
}

/// A `client.py` process: holds outbound connections until told.
pub struct Client {
    child: Child,
    pid: u32,
    open: std::cell::Cell<u64>,
}

impl Client {
    /// Starts `client.py` inside `ns` and waits until `n` connections to
    /// `address` are established (one after the other, so the server accepts
    /// them in this order).
    #[track_caller]
    pub fn connect(ns: &Netns, address: &str, n: u64) -> Client {
        Client::connect_from(ns, address, n, None)
    }

    /// Like [`Client::connect`], binding each connection to `source` first.
    #[track_caller]
    pub fn connect_from(ns: &Netns, address: &str, n: u64, source: Option<&str>) -> Client {
        Client::start(ns, address, n, source, None, None)
    }

    /// Like [`Client::connect_from`], the client process named `comm`
    /// (its `/proc/PID/comm`; at most 15 bytes) before it connects.
    #[track_caller]
    pub fn connect_as(
        ns: &Netns,
        address: &str,
        n: u64,
        source: Option<&str>,
        comm: &str,
    ) -> Client {
        Client::start(ns, address, n, source, None, Some(comm))
    }

    /// Like [`Client::connect`], writing `text` on each connection once it
    /// is open (a server that waits for its client's first bytes).
    #[track_caller]
    pub fn connect_sending(ns: &Netns, address: &str, n: u64, text: &str) -> Client {
        Client::start(ns, address, n, None, Some(text), None)
    }

    #[track_caller]
    fn start(
        ns: &Netns,
        address: &str,
        n: u64,
        source: Option<&str>,
        send: Option<&str>,
        comm: Option<&str>,
    ) -> Client {
        let n_arg = n.to_string();
        let mut args = vec!["--connect", address, "--n", &n_arg];
        if let Some(source) = source {
            args.extend(["--source", source]);
        }
        if let Some(text) = send {
            args.extend(["--send", text]);
        }
        if let Some(comm) = comm {
            args.extend(["--comm", comm]);
        }
        let label = format!("client -> {address} (netns {})", ns.name());
        let child = Child::python(ns, &label, "client.py", &args);
        let (pid, _) = child.wait_ready();
        let connected = child.wait_line(&format!("`connected {n}`"), PROGRAM_TIMEOUT, |lines| {
            lines.iter().find_map(|l| {
                if l.starts_with("error") {
                    return Some(Err((*l).to_owned()));
                }
                l.strip_prefix("connected ")?
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .map(Ok)
            })
        });
        match connected {
            Ok(got) => assert_eq!(got, n, "{}: connected {got}, expected {n}", child.label()),
            Err(line) => panic!("{}: {line}\n{}", child.label(), child.context()),
        }
        Client {
            child,
            pid,
            open: std::cell::Cell::new(n),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Connections currently open on this client.
    pub fn open_count(&self) -> u64 {
        self.open.get()
    }

    /// Opens `k` more connections.
    #[track_caller]
    pub fn open(&self, k: u64) {
        let total = self.open.get() + k;
        let reply = self.child.request(&format!("open {k}"), "connected");
        assert_eq!(
            reply,
            format!("connected {total}"),
            "{}: unexpected reply",
            self.child.label()
        );
        self.open.set(total);
    }

    /// Closes (FIN) the `k` oldest connections: the server side goes to CLOSE_WAIT.
    #[track_caller]
    pub fn close(&self, k: u64) {
        let reply = self.child.request(&format!("close {k}"), "closed");
        assert_eq!(
            reply,
            format!("closed {k}"),
            "{}: unexpected reply",
            self.child.label()
        );
        self.open.set(self.open.get() - k);
    }

    /// Aborts (RST) the `k` oldest connections: the server side goes to CLOSE.
    #[track_caller]
    pub fn reset(&self, k: u64) {
        let reply = self.child.request(&format!("reset {k}"), "reset");
        assert_eq!(
            reply,
            format!("reset {k}"),
            "{}: unexpected reply",
            self.child.label()
        );
        self.open.set(self.open.get() - k);
    }

    #[track_caller]
    pub fn closeall(&self) {
        self.child.request("closeall", "closed");
        self.open.set(0);
    }
}
