//! The test kit's fd-handover server ([`gracewatch_testkit::handover`], the
//! one the demo and the churn benchmark run) as a program the end-to-end
//! tests start inside their network namespaces:
//! `gw-handover-server ADDR:PORT [--pidfile PATH] [--inherit-fd FD]`. It
//! prints `ready PID`; on SIGHUP it starts its next generation, which
//! inherits the listener, and prints `child PID` once that one serves.
//! Only the first generation's output reaches the caller: with
//! `--pidfile`, every generation writes its pid there as it starts. Old generations stay until
//! signalled (at most ten minutes). The Python `server.py` stays as the
//! tests' second implementation, in another language, on purpose.

use std::{ffi::OsStr, net::SocketAddrV4, path::PathBuf, process::ExitCode, time::Duration};

use gracewatch_testkit::handover::{Config, Listen, serve};

const USAGE: &str = "usage: gw-handover-server ADDR:PORT [--pidfile PATH] [--inherit-fd FD]";

fn main() -> ExitCode {
    let config = match parse(std::env::args().skip(1)) {
        Ok(config) => config,
        Err(why) => {
            eprintln!("gw-handover-server: {why}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match config.and_then(|c| serve(&c)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gw-handover-server: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The generation the arguments describe (an `Err` is a usage error; the
/// inner result, a failure to set it up).
fn parse(mut args: impl Iterator<Item = String>) -> Result<anyhow::Result<Config>, String> {
    let addr = args.next().ok_or("no address")?;
    let bind = addr
        .parse::<SocketAddrV4>()
        .map_err(|_| format!("`{addr}` is not an IPv4 ADDR:PORT"))?;
    let (mut inherit, mut pidfile) = (None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("`{flag}` needs a value"))?;
        match flag.as_str() {
            "--inherit-fd" => {
                let fd = value
                    .parse()
                    .map_err(|_| format!("`{value}` is not a file descriptor"))?;
                inherit = Some(fd);
            }
            "--pidfile" => pidfile = Some(value),
            _ => return Err(format!("unknown option `{flag}`")),
        }
    }
    let listen = match inherit {
        Some(fd) => Listen::Inherit(fd),
        None => Listen::Bind(bind),
    };
    // The next generation gets the same address and pid file.
    let mut next = vec![OsStr::new(&addr)];
    if let Some(path) = &pidfile {
        next.extend([OsStr::new("--pidfile"), OsStr::new(path)]);
    }
    Ok(
        Config::this_binary("gw-handover", listen, &next).map(|c| Config {
            set_process_name: true,
            pidfile: pidfile.as_deref().map(PathBuf::from),
            max_lifetime: Duration::from_secs(600),
            ..c
        }),
    )
}
