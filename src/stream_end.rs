//! Why an attempt ended without response headers, from what Envoy recorded
//! on the request's stream info (`response.flags`, `response.code_details`)
//! when the attempt role is told it is done. A client that gives up is not a
//! backend failure: counting it as one would let a handful of impatient
//! clients open every circuit.

/// Envoy `ResponseFlag` bits (`response.flags`).
const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4;
const UPSTREAM_REMOTE_RESET: u64 = 0x10;
const UPSTREAM_CONNECTION_TERMINATION: u64 = 0x40;
const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 0x4000;
const STREAM_IDLE_TIMEOUT: u64 = 0x10000;

/// Whether some attempt reached its backend and then ended without an
/// answer (timed out, reset, connection closed): the backend may have done
/// the work. A refused connection or no healthy host means it did not.
pub fn upstream_may_have_worked(flags: u64) -> bool {
    flags & (UPSTREAM_REQUEST_TIMEOUT | UPSTREAM_REMOTE_RESET | UPSTREAM_CONNECTION_TERMINATION | STREAM_IDLE_TIMEOUT)
        != 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostAttempt {
    /// The client disconnected, reset its stream, or the whole request's
    /// time ran out: nothing is known about the backend.
    ClientSide,
    /// Refused, reset, timed out per try, or the backend hung up: a failure.
    Backend,
}

/// `flags`: Envoy's response flags; `details`: its response code details.
pub fn classify(flags: u64, details: &str) -> LostAttempt {
    let client_reset = flags & DOWNSTREAM_CONNECTION_TERMINATION != 0 || details.starts_with("downstream_");
    // The route's overall timeout is the client's budget running out; a
    // per-try timeout ("upstream_per_try_timeout") is the backend hanging.
    let route_timeout = flags & UPSTREAM_REQUEST_TIMEOUT != 0 && details == "response_timeout";
    if client_reset || route_timeout {
        LostAttempt::ClientSide
    } else {
        LostAttempt::Backend
    }
}

/// `response.flags` as the host returns it: a little-endian u64.
pub fn decode_flags(bytes: &[u8]) -> u64 {
    bytes.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ends_are_told_from_backend_failures() {
        // Measured in Envoy 1.40 (attempt role's on_done).
        assert_eq!(classify(0x4000, "downstream_remote_disconnect"), LostAttempt::ClientSide);
        assert_eq!(classify(0, "downstream_remote_disconnect"), LostAttempt::ClientSide);
        assert_eq!(classify(0x4, "response_timeout"), LostAttempt::ClientSide);
        assert_eq!(classify(0, ""), LostAttempt::Backend);
        assert_eq!(classify(0x8000, ""), LostAttempt::Backend);
        assert_eq!(classify(0x4, "upstream_per_try_timeout"), LostAttempt::Backend);
        assert_eq!(
            classify(0x20 | 0x8000, "upstream_reset_before_response_started{remote_connection_failure}"),
            LostAttempt::Backend
        );
    }

    #[test]
    fn timeouts_and_resets_may_have_cost_refused_connections_did_not() {
        assert!(upstream_may_have_worked(0x4));
        assert!(upstream_may_have_worked(0x10 | 0x8000));
        assert!(upstream_may_have_worked(0x40));
        // Connection failure, no healthy upstream, overflow.
        assert!(!upstream_may_have_worked(0x20 | 0x8000));
        assert!(!upstream_may_have_worked(0x2));
        assert!(!upstream_may_have_worked(0x80));
        assert!(!upstream_may_have_worked(0));
    }

    #[test]
    fn flags_decode_from_eight_bytes() {
        assert_eq!(decode_flags(&16384u64.to_le_bytes()), 16384);
        assert_eq!(decode_flags(&[1, 2]), 0);
        assert_eq!(decode_flags(&[]), 0);
    }
}
