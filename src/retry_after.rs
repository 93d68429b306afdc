//! How long a 429 asks us to leave a backend alone, from `retry-after-ms`,
//! `retry-after` (seconds or HTTP-date), or the configured default; capped.

pub struct RetryAfterPolicy {
    pub default_ms: u64,
    pub max_ms: u64,
}

impl RetryAfterPolicy {
    /// `now_ms` is the epoch time, needed for the HTTP-date form.
    ///
    /// Zero, negative or unparsable values are "no hint" (services send 0 or
    /// -1 in place of a missing value), so `retry-after-ms: 0` falls through
    /// to `retry-after`. An HTTP-date is an instant: one in the past means
    /// the wait is over (0), not "no hint".
    pub fn wait_ms(&self, retry_after_ms: Option<&str>, retry_after: Option<&str>, now_ms: u64) -> u64 {
        let hint = retry_after_ms
            .and_then(parse_millis)
            .filter(|ms| *ms > 0)
            .or_else(|| retry_after.and_then(|v| parse_retry_after(v, now_ms)));
        hint.unwrap_or(self.default_ms).min(self.max_ms)
    }
}

fn parse_millis(v: &str) -> Option<u64> {
    let v = v.trim();
    if let Ok(n) = v.parse::<u64>() {
        return Some(n);
    }
    // Some services send fractional milliseconds.
    let f: f64 = v.parse().ok()?;
    (f.is_finite() && f > 0.0).then(|| f.ceil() as u64)
}

fn parse_retry_after(v: &str, now_ms: u64) -> Option<u64> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return (secs > 0).then(|| secs.saturating_mul(1000));
    }
    if let Ok(f) = v.parse::<f64>() {
        return (f.is_finite() && f > 0.0).then(|| (f * 1000.0).ceil() as u64);
    }
    let at_ms = parse_http_date(v)?.checked_mul(1000)?;
    Some(at_ms.saturating_sub(now_ms))
}

/// Parses the three HTTP-date forms of RFC 9110 to epoch seconds:
/// `Sun, 06 Nov 1994 08:49:37 GMT`, `Sunday, 06-Nov-94 08:49:37 GMT`,
/// `Sun Nov  6 08:49:37 1994`.
pub fn parse_http_date(v: &str) -> Option<u64> {
    let parts: Vec<&str> = v.split_whitespace().collect();
    let (day, month, year, time) = match parts.as_slice() {
        [_, d, m, y, t, "GMT"] => (d.parse::<u32>().ok()?, *m, y.parse::<i64>().ok()?, *t),
        [_, dmy, t, "GMT"] => {
            let mut it = dmy.split('-');
            let d = it.next()?.parse::<u32>().ok()?;
            let m = it.next()?;
            let y2 = it.next()?.parse::<i64>().ok()?;
            // RFC 9110: two-digit years more than 50 years ahead are in the past century.
            let y = if y2 < 70 {
                2000 + y2
            } else if y2 < 100 {
                1900 + y2
            } else {
                y2
            };
            (d, m, y, *t)
        }
        [_, m, d, t, y] => (d.parse::<u32>().ok()?, *m, y.parse::<i64>().ok()?, *t),
        _ => return None,
    };
    let month = match month {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let mut hms = time.split(':').map(|p| p.parse::<u32>().ok());
    let (h, mi, s) = (hms.next()??, hms.next()??, hms.next()??);
    // An HTTP-date's year has four digits; a longer one would overflow the
    // day arithmetic below.
    if hms.next().is_some() || !(1..=31).contains(&day) || h > 23 || mi > 59 || s > 60 || !(0..=9999).contains(&year) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + i64::from(h) * 3_600 + i64::from(mi) * 60 + i64::from(s);
    u64::try_from(secs).ok()
}

/// Days since 1970-01-01 (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: RetryAfterPolicy = RetryAfterPolicy { default_ms: 10_000, max_ms: 300_000 };
    // 1994-11-06T08:49:37Z
    const T0: u64 = 784_111_777_000;

    #[test]
    fn prefers_retry_after_ms() {
        assert_eq!(P.wait_ms(Some("2500"), Some("7"), T0), 2_500);
        assert_eq!(P.wait_ms(Some("12.3"), None, T0), 13);
    }

    #[test]
    fn seconds_form() {
        assert_eq!(P.wait_ms(None, Some("7"), T0), 7_000);
        assert_eq!(P.wait_ms(Some("junk"), Some(" 3 "), T0), 3_000);
    }

    #[test]
    fn http_date_forms() {
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), Some(784_111_777));
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse_http_date("Sat, 29 Feb 2020 23:59:59 GMT"), Some(1_583_020_799));
        assert_eq!(P.wait_ms(None, Some("Sun, 06 Nov 1994 08:50:07 GMT"), T0), 30_000);
    }

    #[test]
    fn a_zero_retry_after_ms_does_not_hide_retry_after() {
        assert_eq!(P.wait_ms(Some("0"), Some("7"), T0), 7_000);
        assert_eq!(P.wait_ms(Some("-1"), Some("7"), T0), 7_000);
        assert_eq!(P.wait_ms(Some("0.0"), Some("7"), T0), 7_000);
    }

    #[test]
    fn a_date_in_the_past_means_now() {
        assert_eq!(P.wait_ms(None, Some("Sun, 06 Nov 1994 08:00:00 GMT"), T0), 0);
        assert_eq!(P.wait_ms(None, Some("Sun, 06 Nov 1994 08:49:37 GMT"), T0), 0);
    }

    #[test]
    fn missing_zero_negative_and_garbage_use_the_default() {
        assert_eq!(P.wait_ms(None, None, T0), 10_000);
        assert_eq!(P.wait_ms(Some("0"), Some("0"), T0), 10_000);
        assert_eq!(P.wait_ms(Some("-1"), Some("-1"), T0), 10_000);
        assert_eq!(P.wait_ms(None, Some("soon"), T0), 10_000);
        assert_eq!(P.wait_ms(None, Some("Sun, 32 Nov 1994 08:00:00 GMT"), T0), 10_000);
    }

    #[test]
    fn years_beyond_four_digits_are_not_dates() {
        // Found by fuzz/ (retry_after target): overflowed the day arithmetic.
        assert_eq!(parse_http_date("Sun Nov  6 0:5:3 994999999999"), None);
        assert_eq!(parse_http_date("Sun, 06 Nov 9223372036854775807 08:49:37 GMT"), None);
        assert_eq!(parse_http_date("Sun, 06-Nov--9223372036854775808 08:49:37 GMT"), None);
        assert_eq!(parse_http_date("Fri, 31 Dec 9999 23:59:59 GMT"), Some(253_402_300_799));
    }

    #[test]
    fn huge_values_are_capped() {
        assert_eq!(P.wait_ms(None, Some("86400"), T0), 300_000);
        assert_eq!(P.wait_ms(Some("99999999999999999999"), None, T0), 300_000);
        assert_eq!(P.wait_ms(None, Some("Fri, 31 Dec 2100 00:00:00 GMT"), T0), 300_000);
    }
}
