//! The request-body fields routing and admission need, as Envoy's
//! `json_to_metadata` filter copied them into dynamic metadata before the
//! request role ran (see `contract::body_metadata`). With them the request
//! role decides at the request headers, before any upstream call, without
//! holding or parsing the body itself.

use crate::contract::body_metadata;
use crate::usage::{completion_budget, RequestFacts};

/// The fields of one JSON request body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyFields {
    pub model: Option<String>,
    pub previous_response_id: Option<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub store: Option<bool>,
    pub background: bool,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub max_output_tokens: Option<u64>,
    pub n: Option<u64>,
    pub best_of: Option<u64>,
}

impl BodyFields {
    /// Reads the fields through `lookup(key)` (the metadata value's bytes as
    /// the host gives them). `None` unless the body was parsed as JSON.
    pub fn read(lookup: &dyn Fn(&str) -> Option<Vec<u8>>) -> Option<BodyFields> {
        lookup(body_metadata::PARSED)?;
        let text = |key: &str| lookup(key).map(|b| String::from_utf8_lossy(&b).into_owned());
        let number = |key: &str| lookup(key).and_then(|b| decode_number(&b));
        let flag = |key: &str| lookup(key).map(|b| decode_bool(&b));
        Some(BodyFields {
            model: text("model"),
            previous_response_id: text("previous_response_id"),
            stream: flag("stream").unwrap_or(false),
            include_usage: flag(body_metadata::INCLUDE_USAGE).unwrap_or(false),
            store: flag("store"),
            background: flag("background").unwrap_or(false),
            max_tokens: number("max_tokens"),
            max_completion_tokens: number("max_completion_tokens"),
            max_output_tokens: number("max_output_tokens"),
            n: number("n"),
            best_of: number("best_of"),
        })
    }

    /// What admission charges before the body is read: the body's size
    /// bounds the prompt, plus the completion budget for every copy.
    pub fn facts(&self, body_len: u64) -> RequestFacts {
        let copies = self.n.max(self.best_of).unwrap_or(1);
        let budget = completion_budget(self.max_completion_tokens, self.max_tokens, self.max_output_tokens);
        let (prompt_tokens, estimated_tokens) = RequestFacts::estimate(body_len, budget, copies);
        RequestFacts {
            stream: self.stream,
            include_usage: self.include_usage,
            prompt_tokens,
            estimated_tokens,
            model: self.model.clone(),
        }
    }
}

/// A metadata number: the host serialises it as an 8-byte little-endian
/// double. Negative, fractional or absurd values give `None`.
fn decode_number(bytes: &[u8]) -> Option<u64> {
    let raw: [u8; 8] = bytes.try_into().ok()?;
    let value = f64::from_le_bytes(raw);
    (value.is_finite() && value >= 0.0 && value <= u32::MAX as f64).then_some(value as u64)
}

/// A metadata boolean: one byte, non-zero for true.
fn decode_bool(bytes: &[u8]) -> bool {
    bytes.first().is_some_and(|b| *b != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(map: HashMap<&'static str, Vec<u8>>) -> impl Fn(&str) -> Option<Vec<u8>> {
        move |k| map.get(k).cloned()
    }

    #[test]
    fn fields_decode_as_envoy_serialises_them() {
        // Measured in Envoy 1.40: strings as bytes, numbers as 8-byte doubles, bools as one byte.
        let map: HashMap<&str, Vec<u8>> = [
            ("parsed", 1f64.to_le_bytes().to_vec()),
            ("model", b"gpt-4o-x".to_vec()),
            ("stream", vec![1]),
            ("include_usage", vec![0]),
            ("max_tokens", 77f64.to_le_bytes().to_vec()),
            ("n", 2f64.to_le_bytes().to_vec()),
            ("store", vec![0]),
        ]
        .into();
        let f = BodyFields::read(&lookup(map)).unwrap();
        assert_eq!(f.model.as_deref(), Some("gpt-4o-x"));
        assert!(f.stream && !f.include_usage);
        assert_eq!((f.max_tokens, f.n, f.store), (Some(77), Some(2), Some(false)));
        // 400 body bytes ~ 100 prompt tokens, plus 77 for each of 2 copies.
        assert_eq!(f.facts(400).estimated_tokens, 100 + 154);
    }

    #[test]
    fn without_the_marker_nothing_is_known() {
        let map: HashMap<&str, Vec<u8>> = [("model", b"x".to_vec())].into();
        assert_eq!(BodyFields::read(&lookup(map)), None);
    }

    #[test]
    fn every_budget_field_counts() {
        let f = |max_tokens, max_completion_tokens, max_output_tokens| BodyFields {
            max_tokens,
            max_completion_tokens,
            max_output_tokens,
            ..BodyFields::default()
        };
        assert_eq!(f(Some(10), None, None).facts(4).estimated_tokens, 11);
        assert_eq!(f(Some(10), Some(20), None).facts(4).estimated_tokens, 21);
        assert_eq!(f(None, None, Some(500)).facts(4).estimated_tokens, 501);
        assert_eq!(decode_number(&(-1f64).to_le_bytes()), None);
        assert_eq!(decode_number(&f64::NAN.to_le_bytes()), None);
        assert_eq!(decode_number(b"77"), None);
    }
}
