//! Wall-clock helpers. Timestamps on the wire are Unix milliseconds or seconds.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub fn now_unix() -> u64 {
    now_unix_ms() / 1000
}

/// RFC 3339 (UTC, seconds) for a Unix timestamp in seconds; "-" for 0.
pub fn rfc3339(unix_secs: u64) -> String {
    if unix_secs == 0 {
        return "-".to_string();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix_secs)).to_string()
}

/// RFC 3339 with milliseconds for a Unix timestamp in milliseconds; "-" for 0.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".to_string();
    }
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// Parse a duration such as `24h`, `90m`, `30s`, `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, BadDuration> {
    humantime::parse_duration(text.trim()).map_err(|source| BadDuration { text: text.to_string(), source })
}

#[derive(Debug, thiserror::Error)]
#[error("invalid duration {text:?} ({source}); use e.g. 30s, 15m, 24h")]
pub struct BadDuration {
    text: String,
    source: humantime::DurationError,
}
