//! Bounds on every number that comes from outside — command line, TUI
//! dialog, agent API — and the parsers that enforce them. Checked once, at
//! parse time, so nothing downstream can overflow clock arithmetic
//! (`Instant + Duration` panics past its range) or cast a pid into a
//! negative `pid_t`.

use std::time::Duration;

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
}
