//! The one HTTP/1.1 client of the tests and benchmarks, for talking to
//! `gracewatch agent` over TCP or its unix socket: [`Target`] says where,
//! [`request`] (or [`get`]) sends one request with `Connection: close` and
//! reads the whole [`Answer`]. Hand-made on purpose: the hostile-input tests
//! control every byte an attacker could send ([`exchange`] sends raw bytes),
//! and the answers are read as they come off the socket ([`parse_answer`]).

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

/// How long [`get`] waits for a whole answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where an agent listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `host:port` (anything `TcpStream::connect` takes).
    Tcp(String),
    /// A unix socket path.
    Unix(PathBuf),
}

impl Target {
    /// The `Host` header: the address for TCP, `agent` for a unix socket.
    fn host(&self) -> &str {
        match self {
            Target::Tcp(addr) => addr,
            Target::Unix(_) => "agent",
        }
    }

    /// Connects, with `timeout` for reads and writes.
    pub fn connect(&self, timeout: Duration) -> std::io::Result<Box<dyn Stream>> {
        Ok(match self {
            Target::Tcp(addr) => {
                let s = TcpStream::connect(addr)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                Box::new(s)
            }
            Target::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                Box::new(s)
            }
        })
    }
}

/// A connected socket of either kind.
pub trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// An answer: status code, head (lower-cased names), de-chunked body.
#[derive(Debug)]
pub struct Answer {
    pub code: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    /// The value of header `name` (case-insensitive), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim())
        })
    }
}

/// Sends one request (`Connection: close`, `Content-Length`, then
/// `headers`) to `target` and reads the whole answer, waiting at most
/// `timeout` for each read or write.
pub fn request(
    target: &Target,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<Answer> {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        target.host(),
        body.len()
    )
    .into_bytes();
    for (k, v) in headers {
        raw.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    raw.extend_from_slice(body);
    exchange(target.connect(timeout)?, &raw)
}

/// `GET path` with no headers of our own, within [`DEFAULT_TIMEOUT`].
pub fn get(target: &Target, path: &str) -> std::io::Result<Answer> {
    request(target, "GET", path, &[], b"", DEFAULT_TIMEOUT)
}

/// Writes `raw` (a whole request) to `stream` and reads the answer to the end.
pub fn exchange(mut stream: impl Read + Write, raw: &[u8]) -> std::io::Result<Answer> {
    stream.write_all(raw)?;
    stream.flush()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Ok(parse_answer(&answer))
}

/// Splits a raw answer into code, head and body (de-chunked). A missing or
/// unparsable status line gives code 0.
pub fn parse_answer(raw: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let head = head.to_ascii_lowercase();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Answer { code, head, body }
}

/// The data of a chunked body, up to its last chunk (or the first malformed one).
pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_chunked_answer_and_its_headers() {
        let a = parse_answer(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        );
        assert_eq!(a.code, 200);
        assert_eq!(a.body, "abcde");
        assert_eq!(a.header("content-type"), Some("text/plain"));
        assert_eq!(a.header("X-Missing"), None);
    }

    #[test]
    fn talks_to_a_unix_socket() {
        let dir = crate::TempDir::new("http");
        let path = dir.root().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut req = Vec::new();
            let mut buf = [0u8; 256];
            while !req.ends_with(b"{}") {
                let n = s.read(&mut buf).expect("read");
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
                .expect("write");
            String::from_utf8(req).expect("text")
        });
        let a = request(
            &Target::Unix(path),
            "POST",
            "/v1/x",
            &[("Authorization", "Bearer t")],
            b"{}",
            DEFAULT_TIMEOUT,
        )
        .expect("answer");
        assert_eq!((a.code, a.body.as_str()), (201, "ok"));
        let req = server.join().expect("server");
        assert!(
            req.starts_with("POST /v1/x HTTP/1.1\r\nHost: agent\r\n"),
            "{req}"
        );
        assert!(
            req.contains("\r\nContent-Length: 2\r\nAuthorization: Bearer t\r\n\r\n{}"),
            "{req}"
        );
    }
}
