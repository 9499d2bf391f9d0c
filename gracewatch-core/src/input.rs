//! Bounds on every number that comes from outside — command line, TUI
//! dialog, agent API — and the parsers that enforce them. Checked once, at
//! parse time, so nothing downstream can overflow clock arithmetic
//! (`Instant + Duration` panics past its range) or cast a pid into a
//! negative `pid_t`. Also the peer rules of `--exclude-peer` (parsed
//! here, matched by the drain gate against peers read from the sockets).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

/// The largest pid Linux can ever hand out (`PID_MAX_LIMIT` on 64-bit
/// kernels, the ceiling of `/proc/sys/kernel/pid_max`).
pub const PID_MAX: u32 = 4_194_304;

/// The longest duration accepted anywhere (timeouts, minimum waits,
/// intervals). A year is far beyond any drain, and keeps `now + d` well
/// inside the range of `Instant` and of tokio's timer.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Bounds of `--max-connections` (entries in the kernel's per-socket tables).
pub const MAX_CONNECTIONS: (u32, u32) = (1024, 1 << 24);
/// Bounds of `--ring-buffer-size` in bytes (rounded up to a power of two,
/// so the upper bound must itself be one).
pub const RING_BUFFER_BYTES: (u32, u32) = (4096, 1 << 30);

/// A pid: a decimal number from 1 to [`PID_MAX`].
pub fn parse_pid(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let pid: u64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a pid (a number from 1 to {PID_MAX})"))?;
    u32::try_from(pid)
        .ok()
        .and_then(|p| check_pid(p).ok())
        .ok_or_else(|| format!("pid {s} is out of range (1 to {PID_MAX})"))
}

/// `pid` if it can name a process (1 to [`PID_MAX`]).
pub fn check_pid(pid: u32) -> Result<u32, String> {
    if (1..=PID_MAX).contains(&pid) {
        Ok(pid)
    } else {
        Err(format!("pid {pid} is out of range (1 to {PID_MAX})"))
    }
}

/// A TCP port: 1 to 65535 (port 0 never holds a connection).
pub fn parse_port(s: &str) -> Result<u16, String> {
    let s = s.trim();
    match s.parse::<u16>() {
        Ok(0) => Err("port 0 is not a port a connection can use (1 to 65535)".to_owned()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("`{s}` is not a port (a number from 1 to 65535)")),
    }
}

/// `--max-connections`.
pub fn parse_max_connections(s: &str) -> Result<u32, String> {
    parse_bounded(s, MAX_CONNECTIONS, "entries")
}

/// `--ring-buffer-size`.
pub fn parse_ring_buffer_size(s: &str) -> Result<u32, String> {
    parse_bounded(s, RING_BUFFER_BYTES, "bytes")
}

fn parse_bounded(s: &str, (lo, hi): (u32, u32), unit: &str) -> Result<u32, String> {
    let s = s.trim();
    let n: u64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number ({lo} to {hi} {unit})"))?;
    if (u64::from(lo)..=u64::from(hi)).contains(&n) {
        // In range, so it fits.
        u32::try_from(n).map_err(|_| format!("{s} is out of range ({lo} to {hi} {unit})"))
    } else {
        Err(format!("{s} is out of range ({lo} to {hi} {unit})"))
    }
}

/// Parses `90s`, `2m`, `1500ms`, `1h`, or a bare number of seconds, up to
/// [`MAX_DURATION`]. Zero is allowed (a minimum wait of none).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(format!("`{s}`: a duration cannot be negative"));
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (examples: 500ms, 90s, 2m)"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    };
    let too_long = || {
        format!(
            "`{s}` is too long (at most {}h, a year)",
            MAX_DURATION.as_secs() / 3600
        )
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(too_long());
    }
    let d = Duration::try_from_secs_f64(secs).map_err(|_| too_long())?;
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

/// A deadline (`--timeout`, the TUI dialog's timeout, the API's `timeout`):
/// a duration above zero. A zero deadline would pass before the first look
/// at the target; no deadline is said by leaving the option out.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!(
            "`{}`: a timeout must be above zero (leave it out for no deadline)",
            s.trim()
        ));
    }
    Ok(d)
}

/// At most this many `--exclude-peer` rules (each is tried on every live
/// connection the gate looks at).
pub const MAX_PEER_RULES: usize = 64;
/// A peer rule is at most this long (`[ffff:…:ffff]/128:65535` is 48).
const PEER_RULE_MAX_LEN: usize = 64;

/// `--exclude-peer CIDR[:PORT]`: connections whose peer (the client end)
/// is in `net` (and on `port`, if given) do not hold a drain. An IPv4 rule
/// also matches IPv4-mapped IPv6 peers (`::ffff:a.b.c.d`, a dual-stack
/// listener's view of an IPv4 client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerRule {
    addr: IpAddr,
    prefix: u8,
    port: Option<u16>,
}

impl PeerRule {
    /// Whether a connection from `peer` is excluded by this rule.
    pub fn matches(&self, peer: &SocketAddr) -> bool {
        if self.port.is_some_and(|p| p != peer.port()) {
            return false;
        }
        match (self.addr, canonical(peer.ip())) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Whether any of `rules` excludes `peer`.
pub fn peer_excluded(rules: &[PeerRule], peer: &SocketAddr) -> bool {
    rules.iter().any(|r| r.matches(peer))
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl fmt::Display for PeerRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = if self.addr.is_ipv4() { 32 } else { 128 };
        let net = if self.prefix == full {
            self.addr.to_string()
        } else {
            format!("{}/{}", self.addr, self.prefix)
        };
        match (self.port, self.addr) {
            (None, _) => write!(f, "{net}"),
            (Some(p), IpAddr::V4(_)) => write!(f, "{net}:{p}"),
            (Some(p), IpAddr::V6(a)) if self.prefix == full => write!(f, "[{a}]:{p}"),
            (Some(p), IpAddr::V6(a)) => write!(f, "[{a}]/{}:{p}", self.prefix),
        }
    }
}

/// Parses a peer rule: an IPv4 or IPv6 address or CIDR, with an optional
/// port (`127.0.0.9`, `10.0.0.0/8`, `10.0.0.0/8:9100`, `::1`,
/// `2001:db8::/32`, `[::1]:9100`, `[2001:db8::]/32:443`). An IPv6 rule
/// with a port needs the brackets (`::1:80` is an address). Refused: host
/// bits set past the prefix (`10.0.0.1/8`: a typo that widens the rule
/// silently), and a prefix of 0 (every peer: the drain would end at once).
pub fn parse_peer_rule(s: &str) -> Result<PeerRule, String> {
    let s = s.trim();
    let usage = "expected ADDR, ADDR/PREFIX, either with :PORT, IPv6 in brackets when a port follows (e.g. 10.0.0.0/8:9100, [::1]:9100)";
    if s.is_empty() {
        return Err(format!("an empty peer rule: {usage}"));
    }
    if s.len() > PEER_RULE_MAX_LEN || !s.is_ascii() {
        return Err(format!(
            "a peer rule of {} bytes is not an address: {usage}",
            s.len()
        ));
    }
    let bad = || format!("`{s}` is not a peer rule: {usage}");
    // Split into the network part (address and prefix) and the port.
    let (addr, prefix, port) = if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or_else(bad)?;
        let (inside_addr, inside_prefix) = match inside.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (inside, None),
        };
        let (prefix, port) = match (inside_prefix, after) {
            (p, "") => (p, None),
            (None, a) => match a.strip_prefix('/') {
                Some(rest) => match rest.split_once(':') {
                    Some((p, port)) => (Some(p), Some(port)),
                    None => (Some(rest), None),
                },
                None => (None, Some(a.strip_prefix(':').ok_or_else(bad)?)),
            },
            (Some(p), a) => (Some(p), Some(a.strip_prefix(':').ok_or_else(bad)?)),
        };
        let addr: Ipv6Addr = inside_addr.parse().map_err(|_| bad())?;
        (IpAddr::V6(addr), prefix, port)
    } else if s.contains("::") || s.matches(':').count() > 1 {
        // Bare IPv6: no port.
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: Ipv6Addr = a.parse().map_err(|_| bad())?;
        (IpAddr::V6(addr), p, None)
    } else {
        let (net, port) = match s.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (s, None),
        };
        let (a, p) = match net.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (net, None),
        };
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        (IpAddr::V4(addr), p, port)
    };
    let full: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => full,
        Some(p) => match p.parse::<u8>() {
            Ok(n) if (1..=full).contains(&n) && p.bytes().all(|b| b.is_ascii_digit()) => n,
            Ok(0) => {
                return Err(format!(
                    "`{s}`: a prefix of 0 excludes every peer (the drain would end at once): refused"
                ));
            }
            _ => return Err(format!("`{s}`: the prefix must be 1 to {full}")),
        },
    };
    let port = match port {
        None => None,
        Some(p) => Some(parse_port(p).map_err(|e| format!("`{s}`: {e}"))?),
    };
    // An IPv4-mapped IPv6 rule is the IPv4 rule it carries, so it matches
    // IPv4 peers of dual-stack and IPv4 listeners alike.
    let (addr, prefix) = match addr {
        IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
            Some(v4) => (IpAddr::V4(v4), prefix - 96),
            None => (addr, prefix),
        },
        _ => (addr, prefix),
    };
    if prefix == 0 {
        return Err(format!(
            "`{s}`: a prefix of 96 on an IPv4-mapped address excludes every IPv4 peer: refused"
        ));
    }
    let rule = PeerRule { addr, prefix, port };
    let masked = PeerRule {
        addr: match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        },
        ..rule
    };
    if masked != rule {
        return Err(format!(
            "`{s}` has host bits set past the /{prefix} prefix: did you mean {masked}?"
        ));
    }
    Ok(rule)
}

/// At most [`MAX_PEER_RULES`] rules.
pub fn check_peer_rules(rules: &[PeerRule]) -> Result<(), String> {
    if rules.len() > MAX_PEER_RULES {
        return Err(format!(
            "{} peer rules: at most {MAX_PEER_RULES} (use a CIDR to cover many peers)",
            rules.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_reject_garbage() {
        let ok = [
            ("90s", 90_000),
            ("2m", 120_000),
            ("1500ms", 1500),
            ("1h", 3_600_000),
            ("3", 3000),
            ("0.5s", 500),
            ("0", 0),
            ("8784h", 8784 * 3_600_000),
        ];
        for (s, ms) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        for bad in [
            "",
            "-1s",
            "abc",
            "10x",
            "1.2.3s",
            "s",
            "8785h",
            "10000000000000000000s",
            "99999999999999999999h",
            "1e400",
            ".",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("0.0").is_err());
        assert_eq!(parse_timeout("1ms"), Ok(Duration::from_millis(1)));
    }

    #[test]
    fn every_accepted_duration_can_be_added_to_now() {
        let now = std::time::Instant::now();
        let longest = parse_duration(&format!("{}s", MAX_DURATION.as_secs())).expect("max");
        assert!(now.checked_add(longest).is_some());
        assert!(tokio::time::Instant::now().checked_add(longest).is_some());
    }

    #[test]
    fn pids_stay_within_the_kernel_limit() {
        assert_eq!(parse_pid("1"), Ok(1));
        assert_eq!(parse_pid("4194304"), Ok(PID_MAX));
        for bad in [
            "0",
            "-1",
            "4194305",
            "2147483648",
            "4294967295",
            "4294967296",
            "99999999999999999999999",
            "abc",
            "",
            "1.5",
        ] {
            assert!(parse_pid(bad).is_err(), "{bad}");
        }
        assert!(check_pid(0).is_err());
        assert!(check_pid(1 << 31).is_err());
    }

    #[test]
    fn ports_and_kernel_sizes_are_bounded() {
        assert_eq!(parse_port("80"), Ok(80));
        for bad in ["0", "-1", "65536", "http"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_ring_buffer_size("4096"), Ok(4096));
        assert!(parse_ring_buffer_size("4294967295").is_err());
        assert!(parse_ring_buffer_size("0").is_err());
        assert!(parse_max_connections("0").is_err());
        assert_eq!(parse_max_connections("1048576"), Ok(1 << 20));
        assert!(RING_BUFFER_BYTES.1.is_power_of_two());
    }

    #[test]
    fn peer_rules_parse_and_match() {
        let peer = |s: &str| -> SocketAddr { s.parse().expect("peer") };
        // (rule, canonical form, peers it matches, peers it does not)
        let table: &[(&str, &str, &[&str], &[&str])] = &[
            (
                "127.0.0.9",
                "127.0.0.9",
                &["127.0.0.9:5555", "[::ffff:127.0.0.9]:5555"],
                &["127.0.0.1:5555", "127.0.0.10:1", "[::1]:5555"],
            ),
            (
                "10.0.0.0/8",
                "10.0.0.0/8",
                &["10.1.2.3:1", "10.255.255.255:65535", "[::ffff:10.9.9.9]:80"],
                &["11.0.0.0:1", "9.255.255.255:1"],
            ),
            (
                "10.0.0.0/8:9100",
                "10.0.0.0/8:9100",
                &["10.0.0.1:9100", "[::ffff:10.0.0.1]:9100"],
                &["10.0.0.1:9101", "11.0.0.1:9100"],
            ),
            (
                "127.0.0.9:80",
                "127.0.0.9:80",
                &["127.0.0.9:80"],
                &["127.0.0.9:81"],
            ),
            ("::1", "::1", &["[::1]:9"], &["127.0.0.1:9", "[::2]:9"]),
            ("[::1]:9100", "[::1]:9100", &["[::1]:9100"], &["[::1]:9101"]),
            (
                "[2001:db8::]/32:443",
                "[2001:db8::]/32:443",
                &["[2001:db8:ffff::1]:443"],
                &["[2001:db9::1]:443", "[2001:db8::1]:444"],
            ),
            (
                "[2001:db8::/32]:443",
                "[2001:db8::]/32:443",
                &["[2001:db8::1]:443"],
                &[],
            ),
            (
                "2001:db8::/32",
                "2001:db8::/32",
                &["[2001:db8::1]:1"],
                &["[2001:db7::1]:1"],
            ),
            (
                "[2001:db8::]/32",
                "2001:db8::/32",
                &["[2001:db8::1]:1"],
                &[],
            ),
            // An IPv4-mapped rule is its IPv4 rule.
            (
                "::ffff:192.0.2.0/120",
                "192.0.2.0/24",
                &["192.0.2.7:1", "[::ffff:192.0.2.7]:1"],
                &["192.0.3.1:1"],
            ),
            (" 127.0.0.9 ", "127.0.0.9", &["127.0.0.9:1"], &[]),
        ];
        for (text, shown, hits, misses) in table {
            let rule = parse_peer_rule(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(rule.to_string(), *shown, "{text}");
            assert_eq!(parse_peer_rule(shown), Ok(rule), "{shown} round trip");
            for p in *hits {
                assert!(rule.matches(&peer(p)), "{text} should match {p}");
            }
            for p in *misses {
                assert!(!rule.matches(&peer(p)), "{text} should not match {p}");
            }
        }
        let rules = [
            parse_peer_rule("127.0.0.9").expect("rule"),
            parse_peer_rule("[::1]:80").expect("rule"),
        ];
        assert!(peer_excluded(&rules, &peer("[::1]:80")));
        assert!(!peer_excluded(&rules, &peer("127.0.0.1:80")));
        assert!(!peer_excluded(&[], &peer("127.0.0.9:80")));
    }

    #[test]
    fn bad_peer_rules_are_refused_with_a_reason() {
        for (bad, says) in [
            ("", "empty"),
            ("bogus", "not a peer rule"),
            ("127.0.0.9:0", "port 0"),
            ("127.0.0.9:65536", "not a port"),
            ("127.0.0.9:", "not a port"),
            ("127.0.0.9:http", "not a port"),
            ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
            ("10.0.0.0/33", "prefix must be 1 to 32"),
            ("10.0.0.0/-1", "prefix must be"),
            ("10.0.0.0/+8", "prefix must be"),
            ("10.0.0.0/", "prefix must be"),
            ("0.0.0.0/0", "every peer"),
            ("::/0", "every peer"),
            ("::ffff:0.0.0.0/96", "every IPv4 peer"),
            ("::1/129", "1 to 128"),
            ("[::1]", ""),
            ("[::1", "not a peer rule"),
            ("[::1]9100", "not a peer rule"),
            ("[127.0.0.1]:80", "not a peer rule"),
            ("::1:80:", "not a peer rule"),
            ("1.2.3.4.5", "not a peer rule"),
            ("256.0.0.1", "not a peer rule"),
            ("127.0.0.9:80:81", "not a peer rule"),
            ("fe80::1%eth0", "not a peer rule"),
            ("127.0.0.９", "not an address"),
            ("-1", "not a peer rule"),
        ] {
            if bad == "[::1]" {
                // A bracketed address without a port is still an address.
                assert!(parse_peer_rule(bad).is_ok());
                continue;
            }
            let e = parse_peer_rule(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.contains(says), "{bad}: {e}");
        }
        let long = "1".repeat(10_000);
        assert!(parse_peer_rule(&long).is_err());
        let many = vec![parse_peer_rule("127.0.0.9").expect("rule"); MAX_PEER_RULES + 1];
        assert!(check_peer_rules(&many).is_err());
        assert!(check_peer_rules(&many[..MAX_PEER_RULES]).is_ok());
    }
}
