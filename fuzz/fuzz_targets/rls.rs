//! The rate-limit service's answers, as the request role reads them: any
//! bytes decode or are refused without a panic, and a decoded answer gives
//! a verdict that matches its overall code (admitted only on OK, limited
//! only on OVER_LIMIT, with a wait of at least 1 ms).
#![no_main]

use libfuzzer_sys::fuzz_target;
use spillway::global_limits::{self, Asked};
use spillway::limits::Admission;
use spillway::rls::{self, Code};

fuzz_target!(|data: &[u8]| {
    let Some(response) = rls::decode_response(data) else { return };
    for asked in [
        Asked { requests: true, tokens: true },
        Asked { requests: true, tokens: false },
        Asked { requests: false, tokens: true },
    ] {
        match global_limits::verdict(asked, &response, 10_000) {
            None => {}
            Some(Admission::Admitted(_)) => assert_eq!(response.overall, Code::Ok),
            Some(Admission::Limited { retry_after_ms, .. }) => {
                assert_eq!(response.overall, Code::OverLimit);
                assert!(retry_after_ms >= 1);
            }
        }
    }
});
