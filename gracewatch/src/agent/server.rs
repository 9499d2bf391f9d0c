//! The agent's HTTP/1.1 server loop, with the limits an agent reachable by
//! untrusted clients needs (`axum::serve` sets none of them): every
//! listener has its own connection budget, so a flood on TCP can never
//! take the unix socket's slots (the drains of deploy tooling); headers
//! must arrive whole within [`HEADER_READ_TIMEOUT`] (hyper starts that
//! clock whenever it waits for a request, so it is also the keep-alive
//! idle timeout) and fit in [`MAX_HEADER_BYTES`]; a client that takes no
//! bytes of an answer for [`WRITE_STALL_TIMEOUT`] is disconnected.
//!
//! hyper answers requests it cannot parse (400, 414, 431) itself, with an
//! empty body; [`Guarded`] replaces those answers with the JSON error every
//! other refusal of the API carries.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, UnixListener},
    sync::{Semaphore, watch},
    time::Sleep,
};

/// Time a client has to send a request's whole header, counted from when
/// the server starts waiting for it (so an idle keep-alive connection is
/// closed after this long too).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that accepts no byte of an answer for this long is dropped
/// (slow event readers, stuck long polls, zero-window attacks).
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request header (request line included) accepted; more is a 431.
/// hyper's smallest read buffer is 8 KiB, the header limit is set below it.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// hyper's read and write buffer limit per connection.
const MAX_BUF: usize = 16 * 1024;
/// Most headers a request may carry.
const MAX_HEADERS: usize = 64;
/// Concurrent connections on the unix socket (a budget of their own).
pub const MAX_UNIX_CONNECTIONS: usize = 64;
/// Concurrent TCP connections at most (lowered to fit the fd limit).
pub const MAX_TCP_CONNECTIONS: usize = 4096;
/// File descriptors kept for everything but TCP clients: the unix socket's
/// clients, the eBPF maps and programs, rescans of `/proc`, pidfds.
pub const FD_RESERVE: u64 = 1024;
/// `SO_SNDBUF` of TCP clients (the kernel doubles it for its bookkeeping).
const SEND_BUFFER: usize = 128 * 1024;
/// How long shutdown lets open connections finish.
const DRAIN_CONNECTIONS: Duration = Duration::from_secs(5);

/// Raises the soft `RLIMIT_NOFILE` to the hard one, and returns how many
/// TCP connections the agent may hold with what it got: at most
/// [`MAX_TCP_CONNECTIONS`], and always [`FD_RESERVE`] descriptors below the
/// limit so that a TCP flood cannot starve the monitor or the unix socket.
pub fn fd_budget() -> anyhow::Result<usize> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let wanted = rustix::process::Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        match setrlimit(Resource::Nofile, wanted) {
            Ok(()) => lim = wanted,
            Err(e) => log::warn!("cannot raise the open file limit to its hard limit: {e}"),
        }
    }
    let soft = lim.current.unwrap_or(u64::MAX);
    // Below this the agent cannot serve a useful number of clients and
    // keep its reserve: refuse to start rather than fail under load.
    let needed = FD_RESERVE + 256;
    if soft < needed {
        anyhow::bail!(
            "the open file limit is {soft}: the agent needs at least {needed} (set LimitNOFILE= in its unit, or ulimit -n)"
        );
    }
    let budget = usize::try_from(soft - FD_RESERVE).unwrap_or(usize::MAX);
    Ok(budget.min(MAX_TCP_CONNECTIONS))
}

fn http1() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        // Streams write small lines: no vectored writes, so the answers
        // hyper makes itself reach [`Guarded`] in one piece.
        .writev(false);
    b
}

/// Something that accepts connections: a TCP or a unix listener.
pub trait Accept {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        let (stream, _) = TcpListener::accept(self).await?;
        // Small JSON answers and event lines: no Nagle delay.
        let _ = stream.set_nodelay(true);
        // A fixed send buffer instead of autotuning (up to 4 MiB each): a
        // client that stops reading pins this much kernel memory, and a
        // stuck event reader reaches its lagged line sooner.
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&stream, SEND_BUFFER);
        Ok(stream)
    }
}

impl Accept for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        Ok(UnixListener::accept(self).await?.0)
    }
}

/// Serves `app` on `listener` with at most `max_connections` at once (a
/// client beyond waits in the kernel's backlog until one ends), until
/// `stop` turns true; then open connections get [`DRAIN_CONNECTIONS`] to
/// finish.
pub async fn serve<L: Accept>(
    listener: L,
    app: axum::Router,
    max_connections: usize,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(max_connections));
    let builder = Arc::new(http1());
    let (closing_tx, closing) = watch::channel(false);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = stopped(&mut stop) => break,
        };
        let io = tokio::select! {
            r = listener.accept() => match r {
                Ok(io) => io,
                Err(e) => {
                    // EMFILE and friends: the reserve is for others, so
                    // back off instead of spinning on the error.
                    log::warn!("failed to accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let conn = builder.serve_connection(TokioIo::new(Guarded::new(io)), service);
        let mut closing = closing.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        log::debug!("HTTP connection: {e}");
                    }
                    return;
                }
                () = stopped(&mut closing) => conn.as_mut().graceful_shutdown(),
            }
            let _ = tokio::time::timeout(DRAIN_CONNECTIONS, conn).await;
        });
    }
    closing_tx.send_replace(true);
    // Every connection holds a permit until it ends: all of them back means
    // all closed.
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(
        DRAIN_CONNECTIONS + Duration::from_secs(1),
        slots.acquire_many(all),
    )
    .await;
    Ok(())
}

/// Resolves once `rx` holds `true` (or its sender is gone). The guard
/// `wait_for` returns is dropped here: it must not live across an await.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// A connection's socket with a write-stall timeout, and hyper's own
/// (empty) error answers rewritten as JSON.
pub struct Guarded<T> {
    inner: T,
    stall: Option<Pin<Box<Sleep>>>,
    /// A replacement answer being written, and how much of it went out.
    rewrite: Option<(Vec<u8>, usize)>,
}

impl<T> Guarded<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            stall: None,
            rewrite: None,
        }
    }
}

impl<T: AsyncWrite + Unpin> Guarded<T> {
    /// Turns a write that stays pending past [`WRITE_STALL_TIMEOUT`] into an
    /// error (hyper then drops the connection); any progress rearms it.
    fn stalled<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.stall = None;
            return r;
        }
        let sleep = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL_TIMEOUT)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no data for too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Writes what is left of a replacement answer.
    fn poll_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.rewrite {
            if *done >= bytes.len() {
                break;
            }
            let r = Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]);
            match ready!(self.stalled(cx, r)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    if let Some((_, done)) = &mut self.rewrite {
                        *done += n;
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The JSON answer to send instead of `head`, when `head` is an answer
/// hyper made itself for a request it could not parse: a 400, 414 or 431
/// with no body (every answer of the API's own has one).
pub fn rewrite_parse_error(head: &[u8]) -> Option<Vec<u8>> {
    let rest = head
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| head.strip_prefix(b"HTTP/1.0 "))?;
    let message = match rest.get(..4)? {
        b"400 " => "malformed HTTP request".to_owned(),
        b"414 " => "the request URI is too long".to_owned(),
        b"431 " => format!(
            "the request header is larger than {MAX_HEADER_BYTES} bytes or has more than {MAX_HEADERS} fields"
        ),
        _ => return None,
    };
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let lower = head[..end].to_ascii_lowercase();
    if end != head.len() || !lower.windows(21).any(|w| w == b"\r\ncontent-length: 0\r\n") {
        return None;
    }
    let line_end = head.windows(2).position(|w| w == b"\r\n")?;
    let body = format!("{}\n", serde_json::json!({ "error": message }));
    let mut out = head[..line_end].to_vec();
    out.extend_from_slice(
        format!(
            "\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    Some(out)
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.rewrite.is_some() {
            // The connection closes after hyper's error answer; whatever
            // it writes afterwards goes out after the replacement.
            ready!(this.poll_rewrite(cx))?;
        } else if let Some(json) = rewrite_parse_error(buf) {
            this.rewrite = Some((json, 0));
            // Claimed as written: the replacement goes out in its place.
            return match this.poll_rewrite(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Ready(Ok(buf.len())),
            };
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.stalled(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_rewrite(cx))?;
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.stalled(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_rewrite(cx))?;
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.stalled(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_own_empty_parse_errors_are_rewritten() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 14:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite_parse_error(head).expect("rewritten")).expect("utf8");
        assert!(
            out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{out}"
        );
        let body = out.split("\r\n\r\n").nth(1).expect("body");
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert!(
            v["error"].as_str().expect("error").contains("header"),
            "{v}"
        );
        assert!(
            out.contains(&format!("content-length: {}\r\n", body.len())),
            "{out}"
        );
        // An answer of the API (with a body), a success, a partial head:
        // left alone.
        for other in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"{\"kind\":\"accept\"}\n",
        ] {
            assert!(rewrite_parse_error(other).is_none(), "{other:?}");
        }
    }
}
