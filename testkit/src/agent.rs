//! `gracewatch agent` as the tests run it ([`Agent`]): on a free loopback
//! port and a unix socket in the test's [`TempDir`], optionally with a
//! token file, extra arguments, a wrapper (`capsh`, `prlimit`) or an
//! open-file limit; ready (`/readyz` answered 200) when started, and
//! stopped with SIGTERM, which it must answer by exiting 0 and removing
//! its socket. Requests go through [`crate::http`].

use std::{
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::PathBuf,
    process::{Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use crate::{
    Child, Gracewatch, STARTUP_TIMEOUT, TempDir,
    http::{self, Answer, Target},
};

/// How long [`Agent::request`] waits for an answer (long polls included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A loopback port nobody listens on right now (root namespace).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port")
        .port()
}

/// How to start an [`Agent`].
#[derive(Clone, Debug, Default)]
pub struct AgentBuilder {
    token: bool,
    args: Vec<String>,
    wrapper: Vec<String>,
    nofile: Option<u64>,
}

impl AgentBuilder {
    /// With a token file (mode 0600, 32 characters: the agent refuses
    /// shorter tokens): `--token-file`.
    pub fn token(mut self) -> AgentBuilder {
        self.token = true;
        self
    }

    /// Extra `gracewatch agent` arguments.
    pub fn args(mut self, args: &[&str]) -> AgentBuilder {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Runs the agent as `WRAPPER… gracewatch agent …` (a wrapper that execs
    /// it, so the pid stays the agent's: `prlimit --as=N --`, `capsh`).
    pub fn wrapper(mut self, argv: &[&str]) -> AgentBuilder {
        self.wrapper = argv.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// Starts the agent with the open-file limit `nofile` (as its unit sets it).
    pub fn nofile(mut self, nofile: u64) -> AgentBuilder {
        self.nofile = Some(nofile);
        self
    }

    /// Starts the agent and waits until its `/readyz` answers 200.
    #[track_caller]
    pub fn start(self, gw: &Gracewatch, dir: &TempDir) -> Agent {
        let socket = dir.root().join("agent.sock");
        let addr = format!("127.0.0.1:{}", free_port());
        let token = self.token.then(|| {
            let token = format!(
                "{:032x}",
                u128::from(std::process::id()) * 0x9e37_79b9_7f4a_7c15 + 7
            );
            let file = dir.write("token", &format!("{token}\n"));
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                .expect("chmod token");
            (token, PathBuf::from(file))
        });
        let mut cmd = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(gw.bin());
                cmd
            }
            None => Command::new(gw.bin()),
        };
        cmd.args(["agent", "--listen", &addr, "--unix"])
            .arg(&socket);
        if let Some((_, file)) = &token {
            cmd.arg("--token-file").arg(file);
        }
        cmd.args(&self.args);
        if let Some(nofile) = self.nofile {
            // SAFETY: only an async-signal-safe call (setrlimit) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = rustix::process::Rlimit {
                        current: Some(nofile),
                        maximum: Some(nofile),
                    };
                    rustix::process::setrlimit(rustix::process::Resource::Nofile, lim)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let child = Child::spawn_command("gracewatch agent", cmd);
        let (token, token_file) = token.unzip();
        let agent = Agent {
            child,
            addr,
            socket,
            token,
            token_file,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            match http::get(&agent.tcp(), "/readyz") {
                Ok(a) if a.code == 200 => break,
                last => assert!(
                    Instant::now() < deadline,
                    "the agent did not get ready within {STARTUP_TIMEOUT:?}: {last:?}\n{}",
                    agent.context()
                ),
            }
            thread::sleep(Duration::from_millis(50));
        }
        agent
    }
}

/// A running `gracewatch agent`; killed on drop if a test fails before
/// [`Agent::stop`].
pub struct Agent {
    child: Child,
    /// Its loopback TCP address, `127.0.0.1:PORT`.
    pub addr: String,
    /// Its unix socket.
    pub socket: PathBuf,
    /// The token, when started with [`AgentBuilder::token`].
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
}

impl Agent {
    pub fn builder() -> AgentBuilder {
        AgentBuilder::default()
    }

    pub fn pid(&self) -> u32 {
        self.child.process_id().unwrap_or(0)
    }

    /// Where it listens on TCP.
    pub fn tcp(&self) -> Target {
        Target::Tcp(self.addr.clone())
    }

    /// Where it listens on its unix socket.
    pub fn unix(&self) -> Target {
        Target::Unix(self.socket.clone())
    }

    /// The `Authorization` header value (`Bearer TOKEN`).
    #[track_caller]
    pub fn auth(&self) -> String {
        let token = self
            .token
            .as_deref()
            .expect("an agent started with a token");
        format!("Bearer {token}")
    }

    /// One request to `target` (its [`Agent::tcp`] or [`Agent::unix`]),
    /// within [`REQUEST_TIMEOUT`].
    pub fn request(
        &self,
        target: &Target,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Answer> {
        http::request(target, method, path, headers, body, REQUEST_TIMEOUT)
    }

    /// Every line it wrote on stderr so far (its log).
    pub fn stderr_lines(&self) -> Vec<String> {
        self.child.stderr_lines()
    }

    /// Its recent stdout and stderr, for failure messages.
    pub fn context(&self) -> String {
        self.child.context()
    }

    /// SIGTERM; the agent must exit 0 within `timeout` and remove its unix
    /// socket. Panics otherwise (killing it).
    #[track_caller]
    pub fn stop_within(mut self, timeout: Duration) {
        let status = self.terminate(timeout);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "the agent must exit 0 on SIGTERM within {timeout:?} (got {status:?})\n{}",
            self.context()
        );
        assert!(
            !self.socket.exists(),
            "the agent must remove its unix socket on exit"
        );
    }

    /// SIGTERM, then its exit status within `timeout`; `None` if it had to
    /// be killed.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.child.terminate(timeout)
    }
}

/// `promtool check metrics` passes `text` (skipped without promtool,
/// except in CI, where that is a failure).
#[track_caller]
pub fn promtool_accepts(text: &str) {
    use std::io::Write as _;
    let Some(promtool) = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
    else {
        assert!(
            !crate::in_ci(),
            "`promtool` is not installed (CI=true: a failure)"
        );
        eprintln!("SKIPPED promtool check: `promtool` is not installed");
        return;
    };
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
