//! The messages of Envoy's rate-limit service protocol
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`), encoded
//! and decoded by hand: the filter needs one request shape and three fields
//! of the answer, far less than a protobuf runtime would cost in the module.
//!
//! Field numbers (from `envoy/service/ratelimit/v3/rls.proto` and
//! `envoy/extensions/common/ratelimit/v3/ratelimit.proto`):
//! `RateLimitRequest { domain = 1; descriptors = 2; hits_addend = 3 }`,
//! `RateLimitDescriptor { entries = 1; limit = 2; hits_addend = 3 (UInt64Value) }`,
//! `Entry { key = 1; value = 2 }`, `RateLimitOverride { requests_per_unit = 1; unit = 2 }`,
//! `RateLimitResponse { overall_code = 1; statuses = 2 }`,
//! `DescriptorStatus { code = 1; current_limit = 2; limit_remaining = 3; duration_until_reset = 4 }`,
//! `Duration { seconds = 1; nanos = 2 }`.

/// The gRPC service and method the filter calls.
pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

/// A `GrpcService { envoy_grpc { cluster_name } }` naming `cluster`, the
/// form of the gRPC call's target that Envoy takes as it is. A bare cluster
/// name is first parsed as this message, and a name that happens to parse
/// would reach a path whose status the Rust SDK panics on; with the message,
/// a missing cluster is refused with a status the SDK returns as an error,
/// which the failure mode handles like an unreachable service.
pub fn grpc_service(cluster: &str) -> Vec<u8> {
    let mut envoy_grpc = Vec::with_capacity(cluster.len() + 4);
    put_bytes(&mut envoy_grpc, 1, cluster.as_bytes());
    let mut out = Vec::with_capacity(envoy_grpc.len() + 4);
    put_bytes(&mut out, 1, &envoy_grpc);
    out
}

/// `envoy.type.v3.RateLimitUnit.MINUTE`: client limits are per minute.
pub const UNIT_MINUTE: u64 = 2;

/// One descriptor: its entries, the limit it is held to (sent as an
/// override, so the service needs no configuration of its own) and what
/// this request adds to its counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor<'a> {
    pub entries: Vec<(&'a str, &'a str)>,
    pub per_minute: u64,
    pub hits: u64,
}

/// `RateLimitRequest` bytes. The request-level `hits_addend` is left unset:
/// every descriptor carries its own.
pub fn encode_request(domain: &str, descriptors: &[Descriptor<'_>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + 64 * descriptors.len());
    put_bytes(&mut out, 1, domain.as_bytes());
    for d in descriptors {
        let mut desc = Vec::with_capacity(64);
        for (key, value) in &d.entries {
            let mut entry = Vec::with_capacity(key.len() + value.len() + 4);
            put_bytes(&mut entry, 1, key.as_bytes());
            put_bytes(&mut entry, 2, value.as_bytes());
            put_bytes(&mut desc, 1, &entry);
        }
        let mut limit = Vec::with_capacity(12);
        // requests_per_unit is a uint32 in the protocol.
        put_varint_field(&mut limit, 1, d.per_minute.min(u64::from(u32::MAX)));
        put_varint_field(&mut limit, 2, UNIT_MINUTE);
        put_bytes(&mut desc, 2, &limit);
        let mut hits = Vec::with_capacity(11);
        // A wrapper message: proto3 omits a zero value, and an empty
        // wrapper still means "set, to 0" (check without charging).
        if d.hits > 0 {
            put_varint_field(&mut hits, 1, d.hits);
        }
        put_bytes(&mut desc, 3, &hits);
        put_bytes(&mut out, 2, &desc);
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Code {
    #[default]
    Unknown,
    Ok,
    OverLimit,
}

impl Code {
    fn from_wire(v: u64) -> Code {
        match v {
            1 => Code::Ok,
            2 => Code::OverLimit,
            _ => Code::Unknown,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    pub code: Code,
    /// What is left of the descriptor's limit (0 when not said).
    pub remaining: u64,
    /// When the counter's window ends, if the service said.
    pub reset_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Response {
    pub overall: Code,
    /// One per descriptor, in the request's order.
    pub statuses: Vec<Status>,
}

/// Decodes a `RateLimitResponse`; `None` when the bytes are not one.
pub fn decode_response(bytes: &[u8]) -> Option<Response> {
    let mut response = Response::default();
    for field in Fields(bytes) {
        match field? {
            (1, Value::Varint(v)) => response.overall = Code::from_wire(v),
            (2, Value::Bytes(b)) => response.statuses.push(decode_status(b)?),
            _ => {}
        }
    }
    Some(response)
}

fn decode_status(bytes: &[u8]) -> Option<Status> {
    let mut status = Status::default();
    for field in Fields(bytes) {
        match field? {
            (1, Value::Varint(v)) => status.code = Code::from_wire(v),
            (3, Value::Varint(v)) => status.remaining = v,
            (4, Value::Bytes(b)) => status.reset_ms = Some(decode_duration_ms(b)?),
            _ => {}
        }
    }
    Some(status)
}

fn decode_duration_ms(bytes: &[u8]) -> Option<u64> {
    let (mut seconds, mut nanos) = (0u64, 0u64);
    for field in Fields(bytes) {
        match field? {
            // Negative values (two's complement varints) mean "now".
            (1, Value::Varint(v)) => seconds = if v > i64::MAX as u64 { 0 } else { v },
            (2, Value::Varint(v)) => nanos = if v > i32::MAX as u64 { 0 } else { v },
            _ => {}
        }
    }
    Some(seconds.saturating_mul(1000).saturating_add(nanos.div_ceil(1_000_000)))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    put_varint(out, field << 3);
    put_varint(out, v);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Other,
}

/// The fields of one message, in order; an `Err`-like `None` item ends the
/// walk on malformed bytes.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Option<(u64, Value<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let item = self.read();
        if item.is_none() {
            self.0 = &[];
        }
        Some(item)
    }
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.0.split_first()?;
            self.0 = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let taken = self.0.get(..n)?;
        self.0 = self.0.get(n..)?;
        Some(taken)
    }

    fn read(&mut self) -> Option<(u64, Value<'a>)> {
        let key = self.varint()?;
        let field = key >> 3;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Other
            }
            2 => {
                let len = usize::try_from(self.varint()?).ok()?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Other
            }
            _ => return None,
        };
        Some((field, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes_match_the_protobuf_encoding() {
        let d = Descriptor { entries: vec![("client", "team-a")], per_minute: 300, hits: 1 };
        let bytes = encode_request("spillway", &[d]);
        let expected: Vec<u8> = [
            &[0x0a, 8][..],
            b"spillway",
            // descriptors: entries{key, value}, limit{300, MINUTE}, hits{1}
            &[0x12, 29, 0x0a, 16, 0x0a, 6],
            b"client",
            &[0x12, 6],
            b"team-a",
            &[0x12, 5, 0x08, 0xac, 0x02, 0x10, 0x02],
            &[0x1a, 2, 0x08, 0x01],
        ]
        .concat();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn the_call_target_is_an_envoy_grpc_service_message() {
        assert_eq!(grpc_service("rls"), vec![0x0a, 5, 0x0a, 3, b'r', b'l', b's']);
    }

    #[test]
    fn zero_hits_are_an_empty_wrapper_that_is_still_present() {
        let d = Descriptor { entries: vec![("k", "v")], per_minute: 1, hits: 0 };
        let bytes = encode_request("d", &[d]);
        assert!(bytes.ends_with(&[0x1a, 0]));
    }

    #[test]
    fn response_codes_remaining_and_reset_are_read() {
        // overall OVER_LIMIT; statuses [{OK, remaining 7}, {OVER_LIMIT, remaining 0, reset 12.5 s}]
        let status_ok = [0x08, 0x01, 0x18, 0x07];
        let status_over = [0x08, 0x02, 0x22, 0x08, 0x08, 0x0c, 0x10, 0x80, 0xca, 0xb5, 0xee, 0x01];
        let bytes = [&[0x08, 0x02, 0x12, 4][..], &status_ok, &[0x12, 12], &status_over].concat();
        let r = decode_response(&bytes).expect("a response");
        assert_eq!(r.overall, Code::OverLimit);
        assert_eq!(
            r.statuses,
            vec![
                Status { code: Code::Ok, remaining: 7, reset_ms: None },
                Status { code: Code::OverLimit, remaining: 0, reset_ms: Some(12_500) },
            ]
        );
    }

    #[test]
    fn unknown_fields_are_skipped_and_garbage_is_refused() {
        // raw_body (5) and a fixed64 field before the code.
        let bytes = [0x2a, 2, b'h', b'i', 0x49, 1, 2, 3, 4, 5, 6, 7, 8, 0x08, 0x01];
        assert_eq!(decode_response(&bytes).map(|r| r.overall), Some(Code::Ok));
        assert_eq!(decode_response(&[0x12, 50, 1]), None);
        assert_eq!(decode_response(&[0xff; 12]), None);
        assert_eq!(decode_response(&[0x0b]), None);
        assert_eq!(decode_response(&[]), Some(Response::default()));
    }
}
