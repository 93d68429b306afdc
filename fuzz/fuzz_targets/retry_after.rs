//! `retry-after-ms` / `retry-after` (seconds, fractions, the three HTTP-date
//! forms), as backends send them.
//!
//! Input: one flags byte (bit 0: `retry-after-ms` present, bit 1:
//! `retry-after` present, bits 2-3: the clock), then `retry-after-ms`'s value,
//! a newline, and `retry-after`'s value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spillway::retry_after::{parse_http_date, RetryAfterPolicy};

const POLICY: RetryAfterPolicy = RetryAfterPolicy { default_ms: 10_000, max_ms: 300_000 };
const CLOCKS: [u64; 4] = [0, 784_111_777_000, 1_767_225_600_000, u64::MAX];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    let (ms, secs) = text.split_once('\n').unwrap_or((&text, ""));
    let ms = (flags & 1 != 0).then_some(ms);
    let secs = (flags & 2 != 0).then_some(secs);
    let now = CLOCKS[usize::from(flags >> 2) & 3];

    let wait = POLICY.wait_ms(ms, secs, now);
    assert!(wait <= POLICY.max_ms, "{wait}");
    // Whole seconds, and no usable `retry-after-ms`: exactly that long.
    if let (None, Some(n)) = (ms, secs.and_then(|s| s.trim().parse::<u64>().ok())) {
        if n > 0 {
            assert_eq!(wait, n.saturating_mul(1000).min(POLICY.max_ms));
        }
    }

    for candidate in [ms, secs].into_iter().flatten() {
        if let Some(at) = parse_http_date(candidate) {
            // The same instant written as an IMF-fixdate reads back the same.
            let fixdate = imf_fixdate(at);
            assert_eq!(parse_http_date(&fixdate), Some(at), "{candidate:?} -> {at} -> {fixdate}");
        }
    }
});

/// `Sun, 06 Nov 1994 08:49:37 GMT` for epoch seconds (the weekday is not
/// checked by the parser; any will do).
fn imf_fixdate(secs: u64) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("Mon, {d:02} {} {y:04} {:02}:{:02}:{:02} GMT", MONTHS[m as usize - 1], rem / 3600, rem / 60 % 60, rem % 60)
}

/// Howard Hinnant's civil_from_days.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}
