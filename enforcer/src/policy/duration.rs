//! TTL syntax shared by the config, the CLI (`--ttl`) and the mint API (`"ttl": "5m"`).

use std::time::Duration;

/// Parses a humantime duration ("90s", "5m", "1h 30m"). Zero is rejected: a zero TTL would mint a
/// grant that is already expired, which is never what the caller meant.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration (examples: 90s, 5m, 1h 30m)".into());
    }
    let d = humantime::parse_duration(t)
        .map_err(|e| format!("invalid duration `{s}`: {e} (examples: 90s, 5m, 1h 30m)"))?;
    if d.is_zero() {
        return Err(format!("duration `{s}` must be greater than zero"));
    }
    Ok(d)
}

/// Formats a duration in the same syntax `parse_duration` accepts.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_durations() {
        let cases = [
            ("90s", 90),
            ("5m", 300),
            ("1h 30m", 5400),
            ("1h30m", 5400),
            (" 15min ", 900),
            ("2days", 172_800),
        ];
        for (s, secs) in cases {
            assert_eq!(parse_duration(s), Ok(Duration::from_secs(secs)), "{s}");
        }
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn bad_durations() {
        for s in ["", "  ", "0s", "0", "5", "abc", "5 parsecs", "-5m", "5m garbage"] {
            assert!(parse_duration(s).is_err(), "{s:?} should be rejected");
        }
        assert!(parse_duration("0s").unwrap_err().contains("greater than zero"));
    }

    #[test]
    fn format_round_trips() {
        let d = Duration::from_secs(5400);
        assert_eq!(parse_duration(&format_duration(d)), Ok(d));
    }
}
