//! The test kit's fd-handover server ([`gracewatch_testkit::handover`], the
//! one the demo and the churn benchmark run) as a program the end-to-end
//! tests start inside their network namespaces:
//! `gw-handover-server ADDR:PORT [--inherit-fd FD]`. It prints `ready PID`;
//! on SIGHUP it starts its next generation, which inherits the listener,
//! and prints `child PID` once that one serves. Old generations stay until
//! signalled (at most ten minutes). The Python `server.py` stays as the
//! tests' second implementation, in another language, on purpose.

use std::{ffi::OsStr, net::SocketAddrV4, process::ExitCode, time::Duration};

use gracewatch_testkit::handover::{Config, Listen, serve};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, inherit) = match args.as_slice() {
        [addr] => (addr, None),
        [addr, flag, fd] if flag == "--inherit-fd" => match fd.parse() {
            Ok(fd) => (addr, Some(fd)),
            Err(_) => {
                eprintln!("gw-handover-server: `{fd}` is not a file descriptor");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("usage: gw-handover-server ADDR:PORT [--inherit-fd FD]");
            return ExitCode::from(2);
        }
    };
    let Ok(bind) = addr.parse::<SocketAddrV4>() else {
        eprintln!("gw-handover-server: `{addr}` is not an IPv4 ADDR:PORT");
        return ExitCode::from(2);
    };
    let listen = match inherit {
        Some(fd) => Listen::Inherit(fd),
        None => Listen::Bind(bind),
    };
    let result = Config::this_binary("gw-handover", listen, &[OsStr::new(addr)]).and_then(|c| {
        serve(&Config {
            set_process_name: true,
            max_lifetime: Duration::from_secs(600),
            ..c
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gw-handover-server: {e:#}");
            ExitCode::from(1)
        }
    }
}
