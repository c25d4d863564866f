//! The duration literals idem accepts, in one place.
//!
//! `#[idempotent(ttl = "PT5M")]` checks its literal at compile time and `IdemConfig` checks the
//! same strings at startup; both call [`parse`] so a literal that compiles is a literal the
//! config file accepts, and the other way round. This crate exists only because a proc-macro
//! crate cannot share ordinary functions with the runtime crate.
//!
//! Two spellings are accepted:
//!
//! - ISO-8601 durations: `PT30S`, `PT5M`, `PT1H30M`, `P1D`, `P2W`, `PT0.5S`.
//! - Shorthand: one or more `<integer><unit>` groups with units `ms`, `s`, `m`, `h`, `d`, `w`:
//!   `30s`, `5m`, `24h`, `1h30m`, `250ms`.
//!
//! Years and months are rejected in both spellings: their length depends on the calendar, and
//! a retry window must mean the same thing on every replica. A zero duration is rejected (it
//! would make every call a first call), and so is anything over [`MAX`].

use std::fmt;
use std::time::Duration;

/// The longest duration accepted: 3,650 days (about ten years).
///
/// It keeps every `now + duration` computation far from overflow on every store.
pub const MAX: Duration = Duration::from_secs(3_650 * 86_400);

/// Why a duration literal was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DurationError {
    /// The string was empty (or only white space).
    Empty,
    /// The string is neither an ISO-8601 duration nor shorthand.
    Malformed,
    /// The string uses years or months, whose length depends on the calendar.
    CalendarUnit,
    /// The duration is zero.
    Zero,
    /// The duration is longer than [`MAX`].
    TooLong,
    /// The duration is negative (`-PT5M`).
    Negative,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DurationError::Empty => "empty duration; write an ISO-8601 duration like `PT5M` or shorthand like `5m`",
            DurationError::Malformed => {
                "not a duration; write an ISO-8601 duration (`PT30S`, `PT1H30M`, `P1D`) or shorthand (`30s`, `5m`, `24h`)"
            }
            DurationError::CalendarUnit => {
                "years and months are ambiguous (their length depends on the calendar); use days or weeks, e.g. `P30D` or `P4W`"
            }
            DurationError::Zero => "a zero duration is not allowed; use at least one millisecond",
            DurationError::TooLong => "duration is longer than the maximum of 3650 days (`P3650D`)",
            DurationError::Negative => {
                "negative durations are not allowed: a TTL, lease or wait is a length of time; drop the `-`"
            }
        })
    }
}

impl std::error::Error for DurationError {}

/// Parses an ISO-8601 or shorthand duration with idem's rules (see the crate docs).
///
/// ```
/// use std::time::Duration;
/// assert_eq!(idem_duration::parse("PT1H30M"), Ok(Duration::from_secs(5_400)));
/// assert_eq!(idem_duration::parse("1h30m"), Ok(Duration::from_secs(5_400)));
/// assert!(idem_duration::parse("P1M").is_err()); // a month is not a fixed length
/// ```
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    if s.starts_with('-') {
        return Err(DurationError::Negative);
    }
    let parsed = if s.starts_with(['P', 'p']) {
        parse_iso(s)?
    } else {
        parse_shorthand(s)?
    };
    if parsed.is_zero() {
        return Err(DurationError::Zero);
    }
    if parsed > MAX {
        return Err(DurationError::TooLong);
    }
    Ok(parsed)
}

fn parse_iso(s: &str) -> Result<Duration, DurationError> {
    let upper = s.to_ascii_uppercase();
    let parsed = match iso8601::parsers::parse_duration(upper.as_bytes()) {
        Ok((b"", parsed)) => parsed,
        _ => return Err(DurationError::Malformed),
    };
    match parsed {
        iso8601::Duration::YMDHMS { year, month, .. } if year != 0 || month != 0 => {
            Err(DurationError::CalendarUnit)
        }
        // Day, hour and second are at most u32 each, so the sum in u64 cannot overflow.
        other => Ok(Duration::from(other)),
    }
}

fn parse_shorthand(s: &str) -> Result<Duration, DurationError> {
    let bytes = s.as_bytes();
    let mut total = Duration::ZERO;
    let mut i = 0;
    while i < bytes.len() {
        let digits_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == digits_start {
            return Err(DurationError::Malformed);
        }
        let amount: u64 = s[digits_start..i]
            .parse()
            .map_err(|_| DurationError::TooLong)?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit_secs_or_millis = match &s[unit_start..i] {
            "ms" => Unit::Millis(1),
            "s" => Unit::Secs(1),
            "m" => Unit::Secs(60),
            "h" => Unit::Secs(3_600),
            "d" => Unit::Secs(86_400),
            "w" => Unit::Secs(7 * 86_400),
            // `M` reads as minutes to some and months to others; `y` and `mo` are calendar units.
            "M" | "mo" | "y" | "Y" => return Err(DurationError::CalendarUnit),
            _ => return Err(DurationError::Malformed),
        };
        let part = match unit_secs_or_millis {
            Unit::Millis(n) => amount.checked_mul(n).map(Duration::from_millis),
            Unit::Secs(n) => amount.checked_mul(n).map(Duration::from_secs),
        }
        .ok_or(DurationError::TooLong)?;
        total = total.checked_add(part).ok_or(DurationError::TooLong)?;
    }
    Ok(total)
}

enum Unit {
    Millis(u64),
    Secs(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Result<Duration, DurationError> {
        Ok(Duration::from_secs(n))
    }

    #[test]
    fn iso_durations() {
        assert_eq!(parse("PT30S"), secs(30));
        assert_eq!(parse("PT5M"), secs(300));
        assert_eq!(parse("PT1H30M"), secs(5_400));
        assert_eq!(parse("P1D"), secs(86_400));
        assert_eq!(parse("P1DT12H"), secs(129_600));
        assert_eq!(parse("P2W"), secs(14 * 86_400));
        assert_eq!(parse("PT0.5S"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("pt5m"), secs(300), "lower case is accepted");
        assert_eq!(parse("  PT5M "), secs(300), "surrounding space is ignored");
    }

    #[test]
    fn shorthand_durations() {
        assert_eq!(parse("30s"), secs(30));
        assert_eq!(parse("5m"), secs(300));
        assert_eq!(parse("24h"), secs(86_400));
        assert_eq!(parse("1h30m"), secs(5_400));
        assert_eq!(parse("2d"), secs(172_800));
        assert_eq!(parse("1w"), secs(604_800));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn calendar_units_are_refused() {
        for s in ["P1M", "P1Y", "P1Y2M3D", "P0Y1M", "5M", "1y", "3mo"] {
            assert_eq!(parse(s), Err(DurationError::CalendarUnit), "{s}");
        }
    }

    #[test]
    fn malformed_literals_are_refused() {
        for s in [
            "5",
            "m",
            "5 m",
            "PT",
            "P",
            "PT5X",
            "PT5Mgarbage",
            "five minutes",
            "5.5m",
            "PT-5M",
            "1h 30m",
            "5min",
        ] {
            let got = parse(s);
            assert!(
                matches!(got, Err(DurationError::Malformed | DurationError::Zero)),
                "{s}: {got:?}"
            );
        }
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert_eq!(parse("   "), Err(DurationError::Empty));
    }

    #[test]
    fn negative_durations_say_so() {
        for s in ["-PT5M", "-5m", " -P1D"] {
            assert_eq!(parse(s), Err(DurationError::Negative), "{s}");
        }
        let msg = parse("-PT5M").unwrap_err().to_string();
        assert!(msg.contains("negative durations are not allowed"), "{msg}");
    }

    #[test]
    fn zero_and_huge_are_refused() {
        for s in ["PT0S", "0s", "0m0s", "P0D", "P0W"] {
            assert_eq!(parse(s), Err(DurationError::Zero), "{s}");
        }
        assert_eq!(parse("P3651D"), Err(DurationError::TooLong));
        assert_eq!(parse("99999999999999999999s"), Err(DurationError::TooLong));
        assert_eq!(parse("18446744073709551615w"), Err(DurationError::TooLong));
        assert_eq!(parse("P3650D"), Ok(MAX));
    }

    #[test]
    fn errors_say_what_to_write() {
        let msg = parse("P1M").unwrap_err().to_string();
        assert!(msg.contains("ambiguous") && msg.contains("P30D"), "{msg}");
        let msg = parse("soon").unwrap_err().to_string();
        assert!(msg.contains("PT30S") && msg.contains("5m"), "{msg}");
    }
}
