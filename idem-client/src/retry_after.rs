//! `Retry-After` (RFC 9110, section 10.2.3): a number of seconds, or an HTTP-date.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};

/// The most a server may make the client wait: past this a value is taken as a mistake and
/// capped (the total time bound still applies on top).
const LONGEST: Duration = Duration::from_secs(24 * 3600);

/// How long `headers` ask to wait, as seen at `now`; `None` without a (valid) header. A date
/// in the past is no wait.
pub(crate) fn parse(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or_default()
    };
    Some(wait.min(LONGEST))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn after(value: &str, now: SystemTime) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(value).expect("a header"));
        parse(&headers, now)
    }

    #[test]
    fn seconds_and_dates_are_waits() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 21 Oct 2015 07:28:00
        assert_eq!(after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past is no wait"
        );
        assert_eq!(after("99999999999", now), Some(LONGEST));
    }

    #[test]
    fn anything_else_is_no_header() {
        let now = SystemTime::now();
        for bad in ["soon", "-5", "1.5", "Wed, 21 Oct 2015"] {
            assert_eq!(after(bad, now), None, "{bad}");
        }
        assert_eq!(parse(&HeaderMap::new(), now), None);
    }
}
