//! The agent's generation governor against a real fd-handover server
//! (`gw-handover-server`) restarted in quick succession while clients pin
//! every generation.
//!
//! - `--govern-max-draining 2`, five reloads: the three oldest generations
//!   get SIGTERM (each one's exit status says so: the test is their
//!   subreaper), the two newest draining ones and the serving one are
//!   untouched and the serving one still accepts; `/metrics` counts exactly
//!   three signals and no failure; the agent logged one line for each, and
//!   `/v1/events` carried one `governor` line for each.
//! - `--govern-max-age 1s`, one reload: the old generation gets SIGTERM
//!   about a second after it stopped accepting, not before.

use std::{
    os::unix::process::ExitStatusExt as _,
    thread,
    time::{Duration, Instant},
};

use gracewatch_testkit::{
    Agent, Child, Client, Netns, STATE_TIMEOUT, Schema, TempDir, generations, listener, live_of,
    procfs::{holds_socket, listening_inode},
    promtool_accepts, setup,
};
use rustix::process::{Pid, Signal, WaitOptions, kill_process};
use serde_json::Value;

/// How long the governor may take to act once a limit is passed: a status
/// after the close (the monitor re-checks holders every 50 ms) and its own
/// look (every 100 ms at the latest).
const ACT_WITHIN: Duration = Duration::from_millis(600);

struct Fixture {
    ns: Netns,
    agent: Agent,
    address: String,
    pidfile: String,
    _dir: TempDir,
}

impl Fixture {
    fn start(tag: &str, port: u16, args: &[&str]) -> Option<(Fixture, Child)> {
        let gw = setup()?;
        // Each generation is the previous one's child: when one dies, its
        // successor is reparented here, so its exit status can be read.
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .expect("become a child subreaper");
        let ns = Netns::new(tag);
        let dir = TempDir::new(tag);
        let address = format!("127.0.0.1:{port}");
        let pidfile = dir.path("server.pid");
        let agent = Agent::builder().args(args).start(&gw, &dir);
        let mut server = ns.command(env!("CARGO_BIN_EXE_gw-handover-server"));
        server.args([address.as_str(), "--pidfile", &pidfile]);
        let first = Child::spawn_command("gw-handover-server", server);
        Some((
            Fixture {
                ns,
                agent,
                address,
                pidfile,
                _dir: dir,
            },
            first,
        ))
    }

    fn get(&self, path: &str) -> String {
        let answer = gracewatch_testkit::http::get(&self.agent.tcp(), path)
            .unwrap_or_else(|e| panic!("GET {path} failed: {e}\n{}", self.agent.context()));
        assert_eq!(answer.code, 200, "GET {path}: {}", answer.body);
        answer.body
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.get("/v1/status")).expect("/v1/status is JSON")
    }

    /// Pins `pid` (the serving generation) with two held connections and
    /// waits until the agent counts them.
    #[track_caller]
    fn pin(&self, pid: u32) -> Client {
        let clients = Client::connect_sending(&self.ns, &self.address, 2, "h");
        let deadline = Instant::now() + STATE_TIMEOUT;
        while live_of(&self.status(), pid) != Some(2) {
            assert!(
                Instant::now() < deadline,
                "generation {pid} never held its 2 clients\n{}",
                self.agent.context()
            );
            thread::sleep(Duration::from_millis(20));
        }
        clients
    }

    /// SIGHUP to the serving generation `pid`: waits until it closed its
    /// listener and returns the next generation's pid and when it closed.
    #[track_caller]
    fn reload(&self, pid: u32) -> (u32, Instant) {
        let inode = listening_inode(pid, &self.address);
        kill_process(Pid::from_raw(pid as i32).expect("a pid"), Signal::HUP)
            .expect("SIGHUP the serving generation");
        let deadline = Instant::now() + STATE_TIMEOUT;
        while holds_socket(pid, inode) != Some(false) {
            assert!(
                Instant::now() < deadline,
                "{pid} never let go of its listener"
            );
            thread::sleep(Duration::from_millis(1));
        }
        let closed = Instant::now();
        let next: u32 = std::fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .expect("the next generation's pid in the pid file");
        assert_ne!(next, pid, "the pid file names the next generation");
        (next, closed)
    }

    /// `name{labels} value` of `/metrics`.
    #[track_caller]
    fn metric(&self, series: &str) -> u64 {
        let text = self.get("/metrics");
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no `{series}` in /metrics:\n{text}")) as u64
    }

    /// The agent's governor log lines.
    fn governor_lines(&self) -> Vec<String> {
        self.agent
            .stderr_lines()
            .into_iter()
            .filter(|l| l.starts_with("gracewatch: governor: "))
            .collect()
    }
}

/// A `/v1/events` reader on its own thread, keeping every line.
struct EventTap {
    lines: std::sync::Arc<std::sync::Mutex<String>>,
}

impl EventTap {
    fn start(agent: &Agent) -> EventTap {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(&agent.addr).expect("connect to the agent");
        s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: agent\r\n\r\n")
            .expect("subscribe");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = lines.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        EventTap { lines }
    }

    /// The `governor` lines so far, each checked against the schema.
    fn governor(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines()
            .filter(|l| l.starts_with('{') && l.contains("\"governor\""))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["kind"] == "governor")
            .inspect(|v| {
                if let Err(e) = Schema::Event.check(v) {
                    panic!("/v1/events: {e}\n{v}");
                }
            })
            .collect()
    }
}

/// Waits for `pid`, a child of this process (directly or as its
/// subreaper), to exit; returns its signal and when it was reaped.
#[track_caller]
fn wait_signalled(pid: u32, within: Duration) -> (Option<i32>, Instant) {
    let deadline = Instant::now() + within;
    let p = Pid::from_raw(pid as i32).expect("a pid");
    loop {
        match rustix::process::waitpid(Some(p), WaitOptions::NOHANG) {
            Ok(Some((_, status))) => return (status.terminating_signal(), Instant::now()),
            Ok(None) => {}
            Err(e) => panic!("waitpid {pid}: {e} (not a child of the test?)"),
        }
        assert!(
            Instant::now() < deadline,
            "generation {pid} still runs after {within:?}"
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// Whether `pid` still runs (and is no zombie).
fn runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.trim_start().to_owned();
            rest.chars().next()
        })
        .is_some_and(|state| state != 'Z' && state != 'X')
}

#[test]
fn max_draining_two_signals_the_oldest_generations_and_never_the_serving_one() {
    let Some((fx, mut first)) = Fixture::start(
        "governor-count",
        7641,
        &["--govern-max-draining", "2", "--govern-port", "7641"],
    ) else {
        return;
    };
    let tap = EventTap::start(&fx.agent);
    let (mut pid, _) = first.wait_ready();
    let mut gens = vec![pid];
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(fx.pin(pid));
        let (next, _) = fx.reload(pid);
        pid = next;
        gens.push(pid);
    }
    let serving = pid;
    eprintln!("generations, oldest first: {gens:?}");

    // The three oldest got SIGTERM, in the server processes themselves.
    let first_status = first.wait_exit(STATE_TIMEOUT);
    assert_eq!(
        first_status.signal(),
        Some(libc_sigterm()),
        "generation {} ended by {first_status:?}\n{}",
        gens[0],
        fx.agent.context()
    );
    for &old in &gens[1..3] {
        let (signal, _) = wait_signalled(old, STATE_TIMEOUT);
        assert_eq!(
            signal,
            Some(libc_sigterm()),
            "generation {old} must end by SIGTERM\n{}",
            fx.agent.context()
        );
    }
    // Time for a wrong extra signal to show.
    thread::sleep(ACT_WITHIN * 2);
    for &kept in &gens[3..] {
        assert!(
            runs(kept),
            "generation {kept} must be untouched\n{}",
            fx.agent.context()
        );
    }
    // The status agrees: two draining with their clients, one serving.
    let status = fx.status();
    let l = listener(&status, fx.ns.netns_inode(), &fx.address).expect("the listener");
    let roles: Vec<(u32, String)> = generations(l);
    for (k, &g) in gens.iter().enumerate() {
        let role = roles.iter().find(|r| r.0 == g).map(|r| r.1.as_str());
        let want = match k {
            0..=2 => "exited",
            3 | 4 => "draining",
            _ => "serving",
        };
        assert_eq!(role, Some(want), "generation {g}: {roles:?}");
    }
    // The serving generation still accepts.
    let _more = fx.pin(serving);

    assert_eq!(
        fx.metric("gracewatch_governor_signals_total{reason=\"max_draining\"}"),
        3
    );
    assert_eq!(
        fx.metric("gracewatch_governor_signals_total{reason=\"max_age\"}"),
        0
    );
    for reason in ["max_draining", "max_age"] {
        assert_eq!(
            fx.metric(&format!(
                "gracewatch_governor_signal_failures_total{{reason=\"{reason}\"}}"
            )),
            0
        );
    }
    promtool_accepts(&fx.get("/metrics"));
    let lines = fx.governor_lines();
    assert_eq!(lines.len(), 3, "one line per signal: {lines:#?}");
    for (line, g) in lines.iter().zip(&gens[..3]) {
        for part in [
            format!("sent SIGTERM to pid {g} ("),
            fx.address.clone(),
            "max_draining".to_owned(),
        ] {
            assert!(line.contains(&part), "{line:?} lacks {part:?}");
        }
    }
    eprintln!("{}", lines.join("\n"));
    let events = tap.governor();
    let got: Vec<(u64, &str, &str, &str)> = events
        .iter()
        .map(|v| {
            (
                v["pid"].as_u64().unwrap_or(0),
                v["reason"].as_str().unwrap_or(""),
                v["outcome"].as_str().unwrap_or(""),
                v["listener"]["local"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let want: Vec<(u64, &str, &str, &str)> = gens[..3]
        .iter()
        .map(|&g| {
            (
                u64::from(g),
                "max_draining",
                "signalled",
                fx.address.as_str(),
            )
        })
        .collect();
    assert_eq!(got, want, "governor lines on /v1/events: {events:#?}");
    drop(clients);
    fx.agent.stop_within(STATE_TIMEOUT);
}

#[test]
fn max_age_signals_a_generation_draining_longer_than_that() {
    let age = Duration::from_secs(1);
    let Some((fx, mut first)) = Fixture::start(
        "governor-age",
        7642,
        &["--govern-max-age", "1s", "--govern-signal", "TERM"],
    ) else {
        return;
    };
    let (old, _) = first.wait_ready();
    let _clients = fx.pin(old);
    let (serving, closed) = fx.reload(old);
    // Its end is timed apart (reaping it waits for its pipes, which the
    // next generation holds too), while the next generation gets its
    // clients (which makes it known as serving at once).
    let ended = thread::spawn(move || {
        let deadline = Instant::now() + age + STATE_TIMEOUT;
        while runs(old) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        Instant::now()
    });
    let _new_clients = fx.pin(serving);
    let exited = ended.join().expect("the timing thread");
    let status = first.wait_exit(STATE_TIMEOUT);
    let took = exited - closed;
    assert_eq!(
        status.signal(),
        Some(libc_sigterm()),
        "{status:?}\n{}",
        fx.agent.context()
    );
    eprintln!("ended by SIGTERM {took:?} after it stopped accepting (limit {age:?})");
    // Not before the age (the close was seen by the test after it
    // happened, and the drain starts at the close), and soon after it.
    assert!(
        took >= age - Duration::from_millis(20),
        "signalled after {took:?}, before the limit of {age:?}"
    );
    assert!(
        took <= age + ACT_WITHIN,
        "signalled only after {took:?} (limit {age:?})\n{}",
        fx.agent.context()
    );
    thread::sleep(ACT_WITHIN);
    assert!(runs(serving), "the serving generation is untouched");
    assert_eq!(
        fx.metric("gracewatch_governor_signals_total{reason=\"max_age\"}"),
        1
    );
    let lines = fx.governor_lines();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains(&format!("sent SIGTERM to pid {old} (")) && lines[0].contains("max_age"),
        "{lines:?}"
    );
    fx.agent.stop_within(STATE_TIMEOUT);
}

fn libc_sigterm() -> i32 {
    Signal::TERM.as_raw()
}
