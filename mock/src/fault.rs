//! Injected faults: the `fail_next` entries of `/_mock/config`, parsed and
//! validated. Each entry is used by exactly one later data-plane request, in
//! order; the table of keys and their meaning is in the [`crate::server`] docs.
//!
//! Validation is strict: unknown keys, wrong types, two fault kinds in one
//! entry, and header names or values that HTTP/1.1 cannot carry are rejected,
//! so a test learns about a typo from the 400 of `/_mock/config`, not from a
//! fault that silently did nothing.

use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, RETRY_AFTER, TRANSFER_ENCODING};
use serde_json::{Map, Value};

/// Response headers in sending order (a later one replaces an earlier one of the same name).
pub type Headers = Vec<(HeaderName, HeaderValue)>;

/// One queued fault (`fail_next` entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `{"status": N, ...}`. N >= 400: answer with N, an Azure-style error body
    /// and `headers`. N < 400: no error; the request is served normally and
    /// `headers` are added to whatever it is answered with.
    Status { status: u16, headers: Headers },
    /// `{"reset": true}`: close the connection without any response.
    Reset,
    /// `{"reset_after_events": N}`: serve normally but abort the connection
    /// mid-body: after the first N SSE events of a stream, after half of a JSON body.
    ResetAfterEvents(usize),
    /// `{"hang": true}`: never answer; keep the connection open until the client closes it.
    Hang,
    /// `{"hang_ms": N}`: wait N ms more before answering normally (a slow backend).
    HangMs(u64),
    /// `{"stream_error_before_content": true}`: a stream request is served
    /// (checks, quota) but its stream carries Azure's mid-stream error event
    /// instead of any content; any other request gets an injected 500.
    StreamErrorBeforeContent,
    /// `{"first_content_delay_ms": N}`: a stream is served normally, but its
    /// events wait N ms more after the head (a slow first token); any other
    /// answer waits N ms before its head, as with `hang_ms`.
    FirstContentDelayMs(u64),
}

impl Fault {
    /// The name in a stats record's `fault` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Status { status, .. } if *status >= 400 => "status",
            Fault::Status { .. } => "pass",
            Fault::Reset => "reset",
            Fault::ResetAfterEvents(_) => "reset_after_events",
            Fault::Hang => "hang",
            Fault::HangMs(_) => "hang_ms",
            Fault::StreamErrorBeforeContent => "stream_error_before_content",
            Fault::FirstContentDelayMs(_) => "first_content_delay_ms",
        }
    }

    /// The fault as it applies to a request answered without a stream (not
    /// asking for one, or a realtime connection): the stream faults become
    /// their plain counterparts, an injected 500 and a `hang_ms`.
    pub fn for_plain_answer(&self) -> Fault {
        match self {
            Fault::StreamErrorBeforeContent => Fault::Status { status: 500, headers: Headers::new() },
            Fault::FirstContentDelayMs(ms) => Fault::HangMs(*ms),
            other => other.clone(),
        }
    }
}

/// Keys that select the fault kind; an entry has exactly one.
const KIND_KEYS: [&str; 7] = [
    "status",
    "reset",
    "reset_after_events",
    "hang",
    "hang_ms",
    "stream_error_before_content",
    "first_content_delay_ms",
];
/// Keys that only go with `status`.
const STATUS_KEYS: [&str; 4] = ["retry_after", "retry_after_ms", "headers", "raw_headers"];

/// Parse the `fail_next` array.
pub fn parse_faults(v: &Value) -> Result<Vec<Fault>, String> {
    v.as_array().ok_or("fail_next must be an array")?.iter().map(parse_fault).collect()
}

/// Parse one `fail_next` entry.
pub fn parse_fault(v: &Value) -> Result<Fault, String> {
    let obj = v.as_object().ok_or("fail_next entries must be objects")?;
    if let Some(k) = obj.keys().find(|k| !KIND_KEYS.contains(&k.as_str()) && !STATUS_KEYS.contains(&k.as_str())) {
        return Err(format!("unknown fail_next key: {k}"));
    }
    let kind = fault_kind(obj)?;
    if kind != "status" {
        if let Some(k) = STATUS_KEYS.iter().find(|k| obj.contains_key(**k)) {
            return Err(format!("fail_next.{k} only goes with \"status\""));
        }
    }
    match kind {
        "reset" => Ok(Fault::Reset),
        "hang" => Ok(Fault::Hang),
        "stream_error_before_content" => Ok(Fault::StreamErrorBeforeContent),
        "first_content_delay_ms" => Ok(Fault::FirstContentDelayMs(count(obj, kind)?)),
        "reset_after_events" => {
            let n = count(obj, kind)?;
            Ok(Fault::ResetAfterEvents(usize::try_from(n).map_err(|_| "reset_after_events too large".to_string())?))
        }
        "hang_ms" => Ok(Fault::HangMs(count(obj, kind)?)),
        _ => parse_status(obj),
    }
}

/// The one kind key present. A flag kind set to `false` (`"reset": false`,
/// ...) counts as absent.
fn fault_kind(obj: &Map<String, Value>) -> Result<&'static str, String> {
    let mut kinds = Vec::new();
    for key in KIND_KEYS {
        let present = match (key, obj.get(key)) {
            (_, None) => false,
            ("reset" | "hang" | "stream_error_before_content", Some(v)) => {
                v.as_bool().ok_or(format!("fail_next.{key} must be true or false"))?
            }
            _ => true,
        };
        if present {
            kinds.push(key);
        }
    }
    match kinds.as_slice() {
        [one] => Ok(*one),
        [] => Err("fail_next entry needs one of \"status\" (100-599), \"reset\": true, \
                   \"reset_after_events\": N, \"hang\": true, \"hang_ms\": N, \
                   \"stream_error_before_content\": true, \"first_content_delay_ms\": N"
            .into()),
        [a, b, ..] => Err(format!("fail_next entry mixes \"{a}\" and \"{b}\": one fault per entry")),
    }
}

fn count(obj: &Map<String, Value>, key: &str) -> Result<u64, String> {
    obj.get(key).and_then(Value::as_u64).ok_or_else(|| format!("fail_next.{key} must be a non-negative integer"))
}

fn parse_status(obj: &Map<String, Value>) -> Result<Fault, String> {
    let status = obj
        .get("status")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .filter(|s| (100..=599).contains(s))
        .ok_or("fail_next.status must be an integer 100-599")?;
    let mut headers = Headers::new();
    for (key, name) in [("retry_after", RETRY_AFTER), ("retry_after_ms", HeaderName::from_static("retry-after-ms"))] {
        if let Some(text) = scalar_text(obj.get(key)).map_err(|e| format!("fail_next.{key} {e}"))? {
            headers.push((name, header_value(key, text.as_bytes())?));
        }
    }
    if let Some(v) = obj.get("headers") {
        headers.extend(text_headers(v)?);
    }
    if let Some(v) = obj.get("raw_headers") {
        headers.extend(raw_headers(v)?);
    }
    Ok(Fault::Status { status, headers })
}

/// A header value given as a string or a number; `None` when absent or null.
fn scalar_text(v: Option<&Value>) -> Result<Option<String>, &'static str> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err("must be a string or number"),
    }
}

/// `"headers": {"name": "value" | number, ...}`
fn text_headers(v: &Value) -> Result<Headers, String> {
    let obj = v.as_object().ok_or("fail_next.headers must be an object of name: value")?;
    let mut out = Headers::new();
    for (name, value) in obj {
        let text = scalar_text(Some(value))
            .map_err(|e| format!("fail_next.headers.{name} {e}"))?
            .ok_or_else(|| format!("fail_next.headers.{name} must be a string or number"))?;
        out.push((header_name(name)?, header_value(name, text.as_bytes())?));
    }
    Ok(out)
}

/// `"raw_headers": [["name", "hex bytes"], ...]`; whitespace in the hex is ignored.
fn raw_headers(v: &Value) -> Result<Headers, String> {
    const SHAPE: &str = "fail_next.raw_headers must be an array of [\"name\", \"hex bytes\"] pairs";
    let items = v.as_array().ok_or(SHAPE)?;
    let mut out = Headers::new();
    for item in items {
        let (name, hex) = match item.as_array().map(Vec::as_slice) {
            Some([Value::String(name), Value::String(hex)]) => (name, hex),
            _ => return Err(SHAPE.into()),
        };
        let bytes = decode_hex(hex).ok_or_else(|| format!("fail_next.raw_headers {name}: {hex:?} is not hex bytes"))?;
        out.push((header_name(name)?, header_value(name, &bytes)?));
    }
    Ok(out)
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("invalid header name {name:?}"))?;
    if parsed == CONTENT_LENGTH || parsed == TRANSFER_ENCODING {
        return Err(format!("header {name} cannot be injected: the mock frames its bodies itself"));
    }
    Ok(parsed)
}

/// Any bytes HTTP/1.1 can carry in a value: everything but control characters
/// (tab is allowed), so 0x80-0xff (not UTF-8 on their own) are fine.
fn header_value(name: &str, bytes: &[u8]) -> Result<HeaderValue, String> {
    HeaderValue::from_bytes(bytes)
        .map_err(|_| format!("header {name}: control characters (other than tab) cannot be sent in a header value"))
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = text
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .map(|c| c.to_digit(16).and_then(|d| u8::try_from(d).ok()))
        .collect::<Option<_>>()?;
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    Some(digits.chunks_exact(2).map(|pair| pair.iter().fold(0u8, |acc, d| acc * 16 + d)).collect())
}

/// The `retry-after` an injected 429's message names: the last one among
/// `headers` (a later header replaces an earlier one on the wire too).
pub fn last_retry_after(headers: &Headers) -> Option<&str> {
    headers.iter().rev().filter(|(n, _)| n == RETRY_AFTER).find_map(|(_, v)| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Fault, String> {
        parse_fault(&v)
    }

    fn status_headers(v: Value) -> Vec<(String, Vec<u8>)> {
        match parse(v).unwrap() {
            Fault::Status { headers, .. } => {
                headers.into_iter().map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec())).collect()
            }
            other => panic!("not a status fault: {other:?}"),
        }
    }

    #[test]
    fn kinds() {
        assert_eq!(parse(json!({"reset": true})), Ok(Fault::Reset));
        assert_eq!(parse(json!({"hang": true})), Ok(Fault::Hang));
        assert_eq!(parse(json!({"hang_ms": 250})), Ok(Fault::HangMs(250)));
        assert_eq!(parse(json!({"stream_error_before_content": true})), Ok(Fault::StreamErrorBeforeContent));
        assert_eq!(parse(json!({"first_content_delay_ms": 0})), Ok(Fault::FirstContentDelayMs(0)));
        assert_eq!(parse(json!({"first_content_delay_ms": 900})), Ok(Fault::FirstContentDelayMs(900)));
        assert_eq!(
            parse(json!({"hang_ms": 5, "stream_error_before_content": false})),
            Ok(Fault::HangMs(5)),
            "false means not this kind"
        );
        assert_eq!(parse(json!({"reset_after_events": 0})), Ok(Fault::ResetAfterEvents(0)));
        assert_eq!(parse(json!({"reset_after_events": 3})), Ok(Fault::ResetAfterEvents(3)));
        assert_eq!(parse(json!({"status": 500})), Ok(Fault::Status { status: 500, headers: vec![] }));
        // `false` means "not this kind".
        assert_eq!(parse(json!({"status": 503, "reset": false})), Ok(Fault::Status { status: 503, headers: vec![] }));
        let names: Vec<&str> = [
            json!({"status": 429}),
            json!({"status": 200}),
            json!({"reset": true}),
            json!({"reset_after_events": 1}),
            json!({"hang": true}),
            json!({"hang_ms": 1}),
            json!({"stream_error_before_content": true}),
            json!({"first_content_delay_ms": 1}),
        ]
        .into_iter()
        .map(|v| parse(v).unwrap().kind())
        .collect();
        assert_eq!(
            names,
            [
                "status",
                "pass",
                "reset",
                "reset_after_events",
                "hang",
                "hang_ms",
                "stream_error_before_content",
                "first_content_delay_ms"
            ]
        );
    }

    #[test]
    fn rejects() {
        for bad in [
            json!({}),
            json!([]),
            json!({"bogus": 1}),
            json!({"reset": false}),
            json!({"reset": "yes"}),
            json!({"hang": 1}),
            json!({"status": 1000}),
            json!({"status": 99}),
            json!({"status": "500"}),
            json!({"status": 500, "reset": true}),
            json!({"hang": true, "hang_ms": 5}),
            json!({"reset_after_events": -1}),
            json!({"reset_after_events": 1.5}),
            json!({"hang_ms": "5"}),
            json!({"stream_error_before_content": false}),
            json!({"stream_error_before_content": 1}),
            json!({"stream_error_before_content": "true"}),
            json!({"stream_error_before_content": true, "status": 500}),
            json!({"stream_error_before_content": true, "retry_after": 1}),
            json!({"stream_error_before_content": true, "first_content_delay_ms": 5}),
            json!({"first_content_delay_ms": -1}),
            json!({"first_content_delay_ms": "5"}),
            json!({"first_content_delay_ms": 5, "hang_ms": 5}),
            json!({"first_content_delay_ms": 5, "headers": {"a": "b"}}),
            json!({"first_content_delay_ms": 5, "delay": 1}),
            json!({"reset": true, "retry_after": 1}),
            json!({"hang": true, "headers": {"a": "b"}}),
            json!({"status": 500, "retry_after": [1]}),
            json!({"status": 500, "headers": [["a", "b"]]}),
            json!({"status": 500, "headers": {"a": null}}),
            json!({"status": 500, "headers": {"bad name": "x"}}),
            json!({"status": 500, "headers": {"x": "a\r\nb: c"}}),
            json!({"status": 500, "headers": {"content-length": "5"}}),
            json!({"status": 500, "raw_headers": {"x": "ff"}}),
            json!({"status": 500, "raw_headers": [["x"]]}),
            json!({"status": 500, "raw_headers": [["x", "fff"]]}),
            json!({"status": 500, "raw_headers": [["x", "zz"]]}),
            json!({"status": 500, "raw_headers": [["x", "0a"]]}),
            json!({"status": 500, "raw_headers": [["Transfer-Encoding", "41"]]}),
        ] {
            assert!(parse(bad.clone()).is_err(), "accepted {bad}");
        }
        assert_eq!(parse(json!({"status": 1, "x": 1})).unwrap_err(), "unknown fail_next key: x");
        assert!(parse_faults(&json!({"status": 500})).is_err());
        assert_eq!(parse_faults(&json!([{"status": 500}, {"hang": true}])).unwrap().len(), 2);
    }

    #[test]
    fn stream_faults_without_a_stream() {
        let plain = |v: Value| parse(v).unwrap().for_plain_answer();
        assert_eq!(plain(json!({"stream_error_before_content": true})), Fault::Status { status: 500, headers: vec![] });
        assert_eq!(plain(json!({"first_content_delay_ms": 40})), Fault::HangMs(40));
        // Every other kind means the same with or without a stream.
        for v in [json!({"status": 503, "retry_after": 2}), json!({"reset_after_events": 1}), json!({"hang": true})] {
            assert_eq!(plain(v.clone()), parse(v).unwrap());
        }
    }

    #[test]
    fn headers_in_order() {
        let h = status_headers(json!({
            "status": 503,
            "retry_after": 3,
            "retry_after_ms": "2500",
            "headers": {"X-Trace": "abc", "retry-after": 7},
            "raw_headers": [["x-bin", "ff fe 41"], ["x-empty", ""]]
        }));
        let expect: Vec<(String, Vec<u8>)> = vec![
            ("retry-after".into(), b"3".to_vec()),
            ("retry-after-ms".into(), b"2500".to_vec()),
            // Object keys in the JSON map's (sorted) order.
            ("x-trace".into(), b"abc".to_vec()),
            ("retry-after".into(), b"7".to_vec()),
            ("x-bin".into(), vec![0xff, 0xfe, b'A']),
            ("x-empty".into(), vec![]),
        ];
        assert_eq!(h, expect);
        // Non-ASCII text is sent as its UTF-8 bytes.
        assert_eq!(status_headers(json!({"status": 500, "headers": {"x": "é"}}))[0].1, "é".as_bytes());
    }

    #[test]
    fn retry_after_for_the_message() {
        let Fault::Status { headers, .. } =
            parse(json!({"status": 429, "retry_after": 3, "headers": {"retry-after": "9"}})).unwrap()
        else {
            panic!("status fault expected")
        };
        assert_eq!(last_retry_after(&headers), Some("9"));
        assert_eq!(last_retry_after(&Headers::new()), None);
    }

    #[test]
    fn hex() {
        assert_eq!(decode_hex("fffe"), Some(vec![0xff, 0xfe]));
        assert_eq!(decode_hex(" FF\t0a "), Some(vec![0xff, 0x0a]));
        assert_eq!(decode_hex(""), Some(vec![]));
        assert_eq!(decode_hex("f"), None);
        assert_eq!(decode_hex("gg"), None);
        assert_eq!(decode_hex("é0"), None);
    }
}
