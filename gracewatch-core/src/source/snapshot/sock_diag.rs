//! The sock_diag netlink protocol (linux/sock_diag.h, linux/inet_diag.h):
//! a `SOCK_DIAG_BY_FAMILY` dump request built by hand with an inet_diag
//! bytecode filter on local ports ([`local_port_filter`]), and the parser
//! of the kernel's multi-part reply into [`DiagSocket`]s ([`dump_tcp`],
//! [`parse_datagram`]). A reply that does not decode is an error, never a
//! panic and never a silently shorter list.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SOCK_DIAG_BY_FAMILY, SockDiagMessage,
    constants::{AF_INET, IPPROTO_TCP},
    inet::{InetResponse, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

use crate::{event::ConnActivity, source::netns::NetNsHandle};

pub use crate::event::{TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCP_LISTEN};

/// One TCP socket from a sock_diag dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct DiagSocket {
    pub(super) state: u8,
    pub(super) local: SocketAddr,
    pub(super) remote: SocketAddr,
    /// For a listener: its accept-queue length. Otherwise unread bytes.
    pub(super) rqueue: u32,
    /// 0 when no file refers to the socket (not accepted yet, or orphaned).
    pub(super) inode: u64,
}

impl DiagSocket {
    fn from_response(response: &InetResponse) -> Self {
        let header = &response.header;
        let id = &header.socket_id;
        // The crate already decodes addresses by family (AF_INET → V4,
        // AF_INET6 → V6) and ports from network order. Scope ids are left
        // at 0, as the eBPF side reports them.
        Self {
            state: header.state,
            local: SocketAddr::new(id.source_address, id.source_port),
            remote: SocketAddr::new(id.destination_address, id.destination_port),
            rqueue: header.recv_queue,
            inode: u64::from(header.inode),
        }
    }
}

/// The states [`dump_tcp`] asks for when looking for live connections.
pub(super) fn live_states() -> StateFlags {
    StateFlags::ESTABLISHED | StateFlags::CLOSE_WAIT
}

/// A sock_diag socket that sees the namespace `handle` refers to.
pub(super) fn diag_socket(handle: &NetNsHandle) -> anyhow::Result<Socket> {
    let netns = handle.inode();
    handle
        .run_inside(|| Socket::new(NETLINK_SOCK_DIAG))
        .with_context(|| format!("failed to open a sock_diag socket in netns {netns}"))?
        .with_context(|| format!("failed to open a sock_diag socket in netns {netns}"))
}

/// `SOCK_DIAG_BY_FAMILY` request for a dump (linux/sock_diag.h,
/// linux/inet_diag.h): `nlmsghdr`, `inet_diag_req_v2` (all-zero socket id),
/// then `filter` as an `INET_DIAG_REQ_BYTECODE` attribute if not empty.
/// Built by hand because the netlink crate's request has no attributes.
fn dump_request(family: u8, states: StateFlags, filter: &[u8]) -> Vec<u8> {
    dump_request_ext(family, 0, states, filter)
}

/// [`dump_request`] asking for the `extensions` attributes too (a bit
/// mask of `1 << (INET_DIAG_x - 1)`).
fn dump_request_ext(family: u8, extensions: u8, states: StateFlags, filter: &[u8]) -> Vec<u8> {
    const NLMSG_HDR: usize = 16;
    const REQ_V2: usize = 56;
    const NLA_HDR: usize = 4;
    let attr = if filter.is_empty() {
        0
    } else {
        NLA_HDR + filter.len()
    };
    let len = NLMSG_HDR + REQ_V2 + attr;
    let mut msg = Vec::with_capacity(len);
    // Lengths are bounded by MAX_FILTER_PORTS, far below u16::MAX.
    msg.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend_from_slice(&[0; 8]); // sequence number, port id
    msg.extend_from_slice(&[family, IPPROTO_TCP, extensions, 0]); // + pad
    msg.extend_from_slice(&states.bits().to_ne_bytes());
    msg.resize(NLMSG_HDR + REQ_V2, 0); // socket id: not used by dumps
    if !filter.is_empty() {
        msg.extend_from_slice(&u16::try_from(attr).unwrap_or(u16::MAX).to_ne_bytes());
        msg.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        msg.extend_from_slice(filter);
    }
    msg
}

/// linux/inet_diag.h
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_S_EQ: u8 = 11;

/// A port filter longer than this is not built: the dump then returns
/// every socket and we filter alone.
const MAX_FILTER_PORTS: usize = 512;

/// inet_diag bytecode that accepts sockets whose local port is one of
/// `ports` (sorted, no duplicates); empty (no filter) if there are too
/// many. The kernel then skips the sockets we would throw away, such as
/// the client ends of loopback connections, before it formats them.
///
/// The kernel runs the program from the start: an op that holds jumps
/// `yes` bytes ahead, one that fails jumps `no` bytes; landing exactly on
/// the end accepts, past it rejects. Its audit requires every `yes` chain
/// to step through each op in turn, so an OR is written the way `ss`
/// writes it: `[S_EQ p0] [JMP] [S_EQ p1] [JMP] … [S_EQ pn]`, where a
/// matching `S_EQ` falls through to the next `JMP`, which always jumps to
/// the end, and a failing one jumps over that `JMP` to the next test (the
/// last one past the end).
pub(super) fn local_port_filter(ports: &[u16]) -> Vec<u8> {
    const TEST: usize = 8; // S_EQ op + the op that carries the port
    const JMP: usize = 4;
    if ports.is_empty() || ports.len() > MAX_FILTER_PORTS {
        return Vec::new();
    }
    let total = ports.len() * (TEST + JMP) - JMP;
    let op = |code: u8, yes: usize, no: usize| {
        let mut b = [code, u8::try_from(yes).unwrap_or(u8::MAX), 0, 0];
        b[2..].copy_from_slice(&u16::try_from(no).unwrap_or(u16::MAX).to_ne_bytes());
        b
    };
    let mut bc = Vec::with_capacity(total);
    for (i, &port) in ports.iter().enumerate() {
        bc.extend_from_slice(&op(INET_DIAG_BC_S_EQ, TEST, TEST + JMP));
        bc.extend_from_slice(&op(0, 0, usize::from(port)));
        if i + 1 < ports.len() {
            let after = bc.len() + JMP;
            bc.extend_from_slice(&op(INET_DIAG_BC_JMP, JMP, total - after + JMP));
        }
    }
    bc
}

/// Larger than any datagram a netlink dump sends (the kernel caps dump
/// skbs at 32 KiB), so a message is never truncated.
const RECV_BUF: usize = 64 * 1024;

/// Dumps the `family` TCP sockets in `states` (and, if `filter` is not
/// empty, that this inet_diag bytecode accepts), calling `f` with each.
pub(super) fn dump_tcp(
    socket: &Socket,
    family: u8,
    states: StateFlags,
    filter: &[u8],
    mut f: impl FnMut(DiagSocket),
) -> anyhow::Result<()> {
    let request = dump_request(family, states, filter);
    dump(socket, family, &request, |r| {
        f(DiagSocket::from_response(r))
    })
}

/// linux/inet_diag.h: the `INET_DIAG_INFO` extension (`struct tcp_info`).
const INET_DIAG_INFO: u8 = 2;

/// [`dump_tcp`] of ESTABLISHED and CLOSE_WAIT sockets with their
/// `tcp_info`: `f` gets each socket and what [`activity_of`] makes of it.
pub(super) fn dump_tcp_activity(
    socket: &Socket,
    family: u8,
    filter: &[u8],
    mut f: impl FnMut(DiagSocket, ConnActivity),
) -> anyhow::Result<()> {
    let request = dump_request_ext(family, 1 << (INET_DIAG_INFO - 1), live_states(), filter);
    dump(socket, family, &request, |r| {
        f(DiagSocket::from_response(r), activity_of(r));
    })
}

/// Offsets in linux/tcp.h `struct tcp_info` (stable: the kernel only
/// appends), each a native-endian u32.
const TCPI_LAST_DATA_SENT: usize = 44;
const TCPI_LAST_DATA_RECV: usize = 52;
const TCPI_NOTSENT_BYTES: usize = 144;

/// What a connection is doing, from its sock_diag reply: the header's
/// queues (for ESTABLISHED and CLOSE_WAIT, `idiag_rqueue` is bytes received
/// and not yet read by the application, `idiag_wqueue` bytes written and
/// not yet acknowledged by the peer, `write_seq - snd_una`) and, where the
/// `tcp_info` the kernel returned is long enough to hold them, the times
/// since data was last sent and received and the unsent bytes. A field
/// the reply does not cover is `None`, never 0.
pub(super) fn activity_of(response: &InetResponse) -> ConnActivity {
    let info = response.nlas.iter().find_map(|nla| match nla {
        Nla::TcpInfo(bytes) => Some(bytes.as_slice()),
        _ => None,
    });
    let field = |at: usize| {
        let b = info?.get(at..at + 4)?;
        Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let send_queue = response.header.send_queue;
    let unsent = field(TCPI_NOTSENT_BYTES);
    ConnActivity::new(
        field(TCPI_LAST_DATA_SENT).map(u64::from),
        field(TCPI_LAST_DATA_RECV).map(u64::from),
        u64::from(response.header.recv_queue),
        u64::from(send_queue),
        // notsent is write_seq - snd_nxt, the rest of the send queue was
        // sent and awaits its ack. Read at one instant in the kernel, so
        // never more than the queue; min() keeps a torn read sane.
        unsent.map(|u| u64::from(u.min(send_queue))),
    )
}

/// Sends `request` (a `family` dump) and calls `f` with each socket of the reply.
fn dump(
    socket: &Socket,
    family: u8,
    request: &[u8],
    mut f: impl FnMut(&InetResponse),
) -> anyhow::Result<()> {
    let family_name = if family == AF_INET { "ipv4" } else { "ipv6" };
    // The kernel replies to the sender; an unbound netlink socket gets an
    // automatic port id on send, so no bind/connect is needed.
    socket
        .send_to(request, &NetlinkAddr::new(0, 0), 0)
        .with_context(|| format!("failed to send {family_name} sock_diag request"))?;

    let mut buf = vec![0u8; RECV_BUF];
    loop {
        // MSG_TRUNC makes recv return the datagram's real length.
        let len = socket
            .recv(&mut &mut buf[..], libc::MSG_TRUNC)
            .with_context(|| format!("failed to receive {family_name} sock_diag reply"))?;
        if len > buf.len() {
            bail!(
                "{family_name} sock_diag reply of {len} bytes exceeds our {} byte buffer",
                buf.len()
            );
        }
        if parse_datagram(&buf[..len], family_name, &mut f)? == Reply::Done {
            return Ok(());
        }
    }
}

/// Whether a reply datagram ended the dump.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    More,
    Done,
}

/// Parses one datagram of a `family_name` sock_diag dump reply, calling `f`
/// with each socket in it, up to the `NLMSG_DONE` that ends the dump. A
/// message that does not decode, a zero length that would never advance,
/// or an error from the kernel fails the whole dump.
fn parse_datagram(
    datagram: &[u8],
    family_name: &str,
    f: &mut impl FnMut(&InetResponse),
) -> anyhow::Result<Reply> {
    let mut offset = 0;
    while offset < datagram.len() {
        let message = NetlinkMessage::<SockDiagMessage>::deserialize(&datagram[offset..])
            .with_context(|| format!("failed to decode {family_name} sock_diag reply"))?;
        let msg_len = message.header.length as usize;
        match message.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                f(&response);
            }
            NetlinkPayload::Done(_) => return Ok(Reply::Done),
            NetlinkPayload::Error(err) => {
                return Err(anyhow::Error::new(err.to_io()))
                    .with_context(|| format!("kernel rejected the {family_name} sock_diag dump"));
            }
            // Noop, Overrun, and other message kinds carry no socket.
            _ => {}
        }
        if msg_len == 0 {
            bail!("{family_name} sock_diag reply holds a zero-length message");
        }
        // Netlink messages are 4-byte aligned within a datagram.
        offset += (msg_len + 3) & !3;
    }
    Ok(Reply::More)
}

/// A socket as a dump would report it, for tests here and in the join.
#[cfg(test)]
impl DiagSocket {
    pub(super) fn of(state: u8, local: &str, remote: &str, rqueue: u32, inode: u64) -> Self {
        #![allow(clippy::unwrap_used)]
        Self {
            state,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            rqueue,
            inode,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::IpAddr;

    use netlink_packet_sock_diag::constants::AF_INET6;

    use super::*;

    #[test]
    fn dump_request_without_filter_is_the_netlink_crates() {
        use netlink_packet_core::NetlinkHeader;
        use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId};
        for family in [AF_INET, AF_INET6] {
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_DUMP;
            let mut request = NetlinkMessage::new(
                header,
                SockDiagMessage::InetRequest(InetRequest {
                    family,
                    protocol: IPPROTO_TCP,
                    extensions: ExtensionFlags::empty(),
                    states: live_states(),
                    socket_id: if family == AF_INET {
                        SocketId::new_v4()
                    } else {
                        SocketId::new_v6()
                    },
                })
                .into(),
            );
            request.finalize();
            let mut want = vec![0; request.buffer_len()];
            request.serialize(&mut want);
            assert_eq!(dump_request(family, live_states(), &[]), want);
        }
        let with = dump_request(AF_INET, live_states(), &local_port_filter(&[80]));
        assert_eq!(with.len(), 72 + 4 + 8);
        assert_eq!(u32::from_ne_bytes(with[..4].try_into().unwrap()), 84);
        assert_eq!(&with[72..76], &[12, 0, 1, 0][..]);
    }

    /// One op of a bytecode: (code, yes, no).
    fn bc_op(bc: &[u8], at: usize) -> (u8, usize, usize) {
        let no = u16::from_ne_bytes([bc[at + 2], bc[at + 3]]);
        (bc[at], usize::from(bc[at + 1]), usize::from(no))
    }

    /// linux/net/ipv4/inet_diag.c, `inet_diag_bc_audit` for the ops we
    /// emit: the `yes` chain steps through every op to exactly the end, and
    /// each `no` lands on an op of that chain or exactly 4 bytes past the end.
    fn kernel_audit(bc: &[u8]) -> bool {
        let on_chain = |target: usize| {
            let mut at = 0;
            while at < target {
                match bc_op(bc, at).1 {
                    0 => return false,
                    yes => at += yes,
                }
            }
            at == target
        };
        let mut at = 0;
        while at < bc.len() {
            let (code, yes, no) = bc_op(bc, at);
            let left = bc.len() - at;
            let min = match code {
                INET_DIAG_BC_S_EQ => 8,
                INET_DIAG_BC_JMP => 4,
                _ => return false,
            };
            if left < min || no < min || no > left + 4 || no % 4 != 0 {
                return false;
            }
            if no < left && !on_chain(at + no) {
                return false;
            }
            if yes < min || yes > left + 4 || yes % 4 != 0 {
                return false;
            }
            at += yes;
        }
        at == bc.len()
    }

    /// linux/net/ipv4/inet_diag.c, `inet_diag_bc_run` for the ops we emit:
    /// accepted if the jumps end exactly at the end.
    fn kernel_run(bc: &[u8], sport: u16) -> bool {
        let mut at = 0;
        while at < bc.len() {
            let (code, yes, no) = bc_op(bc, at);
            let hit = code == INET_DIAG_BC_S_EQ && bc_op(bc, at + 4).2 == usize::from(sport);
            at += if hit { yes } else { no };
        }
        at == bc.len()
    }

    #[test]
    fn local_port_filter_passes_the_kernels_audit_and_keeps_exactly_its_ports() {
        for ports in [&[80u16][..], &[80, 443], &[22, 80, 443, 8080, 9200]] {
            let bc = local_port_filter(ports);
            assert_eq!(bc.len(), ports.len() * 12 - 4);
            assert!(kernel_audit(&bc), "{ports:?}: rejected by the audit");
            for port in [0, 21, 22, 79, 80, 81, 443, 8080, 9200, 65535] {
                assert_eq!(
                    kernel_run(&bc, port),
                    ports.contains(&port),
                    "{ports:?}, port {port}"
                );
            }
        }
        assert!(local_port_filter(&[]).is_empty());
        let many: Vec<u16> = (1..=u16::try_from(MAX_FILTER_PORTS + 1).unwrap()).collect();
        assert!(local_port_filter(&many).is_empty());
        let most = &many[..MAX_FILTER_PORTS];
        assert!(kernel_audit(&local_port_filter(most)));
    }

    // Reply fixtures, built byte by byte from the layouts in linux/netlink.h
    // (`nlmsghdr`, `nlmsgerr`) and linux/inet_diag.h (`inet_diag_msg`):
    // native byte order, except the ports and addresses of
    // `inet_diag_sockid`, which are network order.

    const NLMSG_NOOP: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLM_F_MULTI: u16 = 2;

    /// One netlink message: a 16-byte `nlmsghdr` whose length covers
    /// `payload`, padded to 4 bytes as the kernel aligns messages.
    fn nlmsg(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&u32::try_from(16 + payload.len()).unwrap().to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&NLM_F_MULTI.to_ne_bytes());
        m.extend_from_slice(&7u32.to_ne_bytes()); // sequence number
        m.extend_from_slice(&4242u32.to_ne_bytes()); // port id
        m.extend_from_slice(payload);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    /// A `SOCK_DIAG_BY_FAMILY` reply message: one 72-byte `inet_diag_msg`.
    fn inet_diag_msg(s: &DiagSocket) -> Vec<u8> {
        let family = if s.local.is_ipv4() { AF_INET } else { AF_INET6 };
        let mut m = vec![family, s.state, 0, 0]; // + timer, retransmits
        m.extend_from_slice(&s.local.port().to_be_bytes());
        m.extend_from_slice(&s.remote.port().to_be_bytes());
        for ip in [s.local.ip(), s.remote.ip()] {
            let mut a = [0u8; 16];
            match ip {
                IpAddr::V4(v4) => a[..4].copy_from_slice(&v4.octets()),
                IpAddr::V6(v6) => a = v6.octets(),
            }
            m.extend_from_slice(&a);
        }
        m.extend_from_slice(&1u32.to_ne_bytes()); // interface
        m.extend_from_slice(&[0xa5; 8]); // cookie
        m.extend_from_slice(&1500u32.to_ne_bytes()); // expires
        m.extend_from_slice(&s.rqueue.to_ne_bytes());
        m.extend_from_slice(&3u32.to_ne_bytes()); // wqueue
        m.extend_from_slice(&1000u32.to_ne_bytes()); // uid
        m.extend_from_slice(&u32::try_from(s.inode).unwrap().to_ne_bytes());
        assert_eq!(m.len(), 72);
        nlmsg(SOCK_DIAG_BY_FAMILY, &m)
    }

    fn done() -> Vec<u8> {
        nlmsg(NLMSG_DONE, &0i32.to_ne_bytes())
    }

    /// An `nlmsgerr`: a negative errno and the header of the failed request.
    fn nlmsg_error(errno: i32) -> Vec<u8> {
        let mut payload = (-errno).to_ne_bytes().to_vec();
        payload.extend_from_slice(&dump_request(AF_INET, live_states(), &[])[..16]);
        nlmsg(NLMSG_ERROR, &payload)
    }

    fn sock(state: u8, local: &str, remote: &str, rqueue: u32, inode: u64) -> DiagSocket {
        DiagSocket::of(state, local, remote, rqueue, inode)
    }

    fn fixture_sockets() -> [DiagSocket; 4] {
        [
            sock(TCP_LISTEN, "127.0.0.1:8080", "0.0.0.0:0", 2, 1001),
            sock(TCP_ESTABLISHED, "10.1.2.3:8080", "10.9.8.7:50123", 17, 1002),
            sock(
                TCP_CLOSE_WAIT,
                "[::ffff:10.1.2.3]:443",
                "[::ffff:10.9.8.7]:50124",
                0,
                1003,
            ),
            sock(
                TCP_ESTABLISHED,
                "[2001:db8::1]:443",
                "[2001:db8::2]:65535",
                0,
                u64::from(u32::MAX),
            ),
        ]
    }

    fn parse(datagram: &[u8]) -> (anyhow::Result<Reply>, Vec<DiagSocket>) {
        let mut got = Vec::new();
        let reply = parse_datagram(datagram, "ipv4", &mut |r| {
            got.push(DiagSocket::from_response(r));
        });
        (reply, got)
    }

    #[test]
    fn reply_fixture_parses_every_socket_and_ends_at_done() {
        let sockets = fixture_sockets();
        let mut first: Vec<u8> = sockets[..2].iter().flat_map(inet_diag_msg).collect();
        first.extend(nlmsg(NLMSG_NOOP, &[])); // carries no socket
        let (reply, got) = parse(&first);
        assert_eq!(reply.unwrap(), Reply::More, "no NLMSG_DONE yet");
        assert_eq!(got, sockets[..2]);

        let mut last: Vec<u8> = sockets[2..].iter().flat_map(inet_diag_msg).collect();
        last.extend(done());
        // Whatever follows NLMSG_DONE is not part of the dump.
        last.extend(inet_diag_msg(&sockets[0]));
        let (reply, got) = parse(&last);
        assert_eq!(reply.unwrap(), Reply::Done);
        assert_eq!(got, sockets[2..]);

        assert_eq!(parse(&[]).0.unwrap(), Reply::More);
    }

    /// `s` as [`inet_diag_msg`] has it (send queue 3), followed by an
    /// `INET_DIAG_INFO` attribute holding `info` if given.
    fn with_tcp_info(s: &DiagSocket, info: Option<&[u8]>) -> Vec<u8> {
        let mut body = inet_diag_msg(s)[16..16 + 72].to_vec();
        if let Some(info) = info {
            body.extend_from_slice(&u16::try_from(4 + info.len()).unwrap().to_ne_bytes());
            body.extend_from_slice(&u16::from(INET_DIAG_INFO).to_ne_bytes());
            body.extend_from_slice(info);
            body.resize(body.len().next_multiple_of(4), 0);
        }
        nlmsg(SOCK_DIAG_BY_FAMILY, &body)
    }

    fn tcp_info(len: usize, sent: u32, recv: u32, notsent: u32) -> Vec<u8> {
        let mut info = vec![0u8; 232];
        info[TCPI_LAST_DATA_SENT..][..4].copy_from_slice(&sent.to_ne_bytes());
        info[TCPI_LAST_DATA_RECV..][..4].copy_from_slice(&recv.to_ne_bytes());
        info[TCPI_NOTSENT_BYTES..][..4].copy_from_slice(&notsent.to_ne_bytes());
        info.truncate(len);
        info
    }

    /// Only the fields the returned `tcp_info` covers are read: a shorter
    /// one (an older kernel) leaves the rest unknown, never 0.
    #[test]
    fn tcp_info_fields_are_read_only_as_far_as_the_reply_covers() {
        let s = &fixture_sockets()[1]; // 17 bytes unread, send queue 3
        let activity = |info: Option<Vec<u8>>| {
            let mut got = Vec::new();
            let datagram = with_tcp_info(s, info.as_deref());
            parse_datagram(&datagram, "ipv4", &mut |r| got.push(activity_of(r))).unwrap();
            assert_eq!(got.len(), 1);
            got[0]
        };
        let full = activity(Some(tcp_info(232, 500, 20, 2)));
        assert_eq!(
            full,
            ConnActivity::new(Some(500), Some(20), 17, 3, Some(2)),
            "{full:?}"
        );
        assert_eq!((full.idle_ms, full.unacked_bytes), (Some(20), Some(1)));
        // Linux 4.1: no tcpi_notsent_bytes yet.
        let old = activity(Some(tcp_info(TCPI_NOTSENT_BYTES, 500, 20, 2)));
        assert_eq!(
            (old.idle_ms, old.unsent_bytes, old.unacked_bytes),
            (Some(20), None, None)
        );
        // Cut inside tcpi_last_data_recv: idle is unknown.
        let cut = activity(Some(tcp_info(TCPI_LAST_DATA_RECV + 3, 500, 20, 2)));
        assert_eq!(
            (cut.last_sent_ms, cut.last_recv_ms, cut.idle_ms),
            (Some(500), None, None)
        );
        let none = activity(None);
        assert_eq!(none, ConnActivity::new(None, None, 17, 3, None));
        assert!(none.in_flight, "the queues alone tell what is in flight");
    }

    #[test]
    fn reply_fixture_kernel_error_fails_the_dump() {
        let mut datagram = inet_diag_msg(&fixture_sockets()[0]);
        datagram.extend(nlmsg_error(libc::EPERM));
        datagram.extend(done());
        let (reply, _) = parse(&datagram);
        let err = reply.unwrap_err();
        assert!(
            format!("{err:#}").starts_with("kernel rejected the ipv4 sock_diag dump"),
            "{err:#}"
        );
        let io = err.chain().find_map(|c| c.downcast_ref::<std::io::Error>());
        assert_eq!(io.and_then(std::io::Error::raw_os_error), Some(libc::EPERM));
    }

    /// Every cut of a valid reply either ends on a message boundary (and
    /// parses as far as it goes) or fails to decode: never a panic, never a
    /// socket made up from a partial message.
    #[test]
    fn truncated_reply_fixtures_are_errors_not_panics() {
        let sockets = fixture_sockets();
        let messages: Vec<Vec<u8>> = sockets.iter().map(inet_diag_msg).chain([done()]).collect();
        let full: Vec<u8> = messages.concat();
        let mut boundaries = vec![0];
        for m in &messages {
            boundaries.push(boundaries.last().unwrap() + m.len());
        }
        for cut in 0..=full.len() {
            let (reply, got) = parse(&full[..cut]);
            match boundaries.iter().position(|&b| b == cut) {
                Some(n) if n == messages.len() => {
                    assert_eq!(reply.unwrap(), Reply::Done);
                    assert_eq!(got, sockets);
                }
                Some(n) => {
                    assert_eq!(reply.unwrap(), Reply::More, "cut at {cut}");
                    assert_eq!(got, sockets[..n]);
                }
                None => {
                    let err = reply.expect_err(&format!("cut at {cut} accepted"));
                    assert!(
                        format!("{err:#}").starts_with("failed to decode ipv4 sock_diag reply"),
                        "cut at {cut}: {err:#}"
                    );
                    let whole = boundaries.iter().filter(|&&b| b < cut).count() - 1;
                    assert_eq!(got, sockets[..whole], "cut at {cut}");
                }
            }
        }
    }

    #[test]
    fn malformed_reply_fixtures_are_errors_not_panics() {
        let good = inet_diag_msg(&fixture_sockets()[1]);
        let with_len = |len: u32| {
            let mut m = good.clone();
            m[..4].copy_from_slice(&len.to_ne_bytes());
            m
        };
        let mut unknown_family = good.clone();
        unknown_family[16] = 99;
        let cases = [
            ("length field 0", with_len(0)),
            ("length field shorter than nlmsghdr", with_len(15)),
            ("length field past the datagram", with_len(89)),
            ("length field cuts the inet_diag_msg", with_len(16 + 71)),
            ("header only", with_len(16)[..16].to_vec()),
            ("unknown address family", unknown_family),
            ("short nlmsgerr", nlmsg(NLMSG_ERROR, &[0xff; 3])),
            ("short NLMSG_DONE", nlmsg(NLMSG_DONE, &[0; 2])),
        ];
        for (what, datagram) in cases {
            let (reply, got) = parse(&datagram);
            assert!(reply.is_err(), "{what}: accepted as {reply:?}");
            assert!(got.is_empty(), "{what}: made up {got:?}");
        }
    }

    /// Random byte flips of a valid reply: whatever they make of it, the
    /// parser returns (a panic fails the test).
    #[test]
    fn corrupted_reply_fixtures_never_panic() {
        let full: Vec<u8> = fixture_sockets()
            .iter()
            .map(inet_diag_msg)
            .chain([done()])
            .collect::<Vec<_>>()
            .concat();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut rejected = 0;
        for _ in 0..5000 {
            let mut datagram = full.clone();
            for _ in 0..=next() % 4 {
                let at = usize::try_from(next() % full.len() as u64).unwrap();
                datagram[at] = u8::try_from(next() & 0xff).unwrap();
            }
            rejected += usize::from(parse(&datagram).0.is_err());
        }
        // Most flips land in addresses and counters, which any value fits;
        // some hit lengths, types and families, which must be refused.
        assert!(
            rejected > 0 && rejected < 5000,
            "{rejected} of 5000 refused"
        );
    }
}
