//! The request-body fields routing and admission need, read by the request
//! role from the held body before it decides. The body is deserialized for
//! these members only (everything else, the messages included, is skipped
//! without being built), and a member of an unexpected type counts as absent.

use crate::lenient::{Budget, Flag, Text};
use crate::usage::{completion_budget, RequestFacts};
use serde::Deserialize;

/// Whether a `content-type` names a JSON body (`application/json`, with or
/// without parameters), the bodies whose fields are read.
pub fn is_json(content_type: &str) -> bool {
    let media = content_type.split(';').next().unwrap_or("").trim();
    media.eq_ignore_ascii_case("application/json")
}

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
    /// The fields of a JSON object body; `None` for anything else (not
    /// JSON, not an object, a duplicate member).
    pub fn from_json(body: &[u8]) -> Option<BodyFields> {
        let wire: Wire = serde_json::from_slice(body).ok()?;
        let text = |t: Option<Text>| t.and_then(|t| t.0);
        let flag = |f: Option<Flag>| f.and_then(|f| f.0);
        let number = |b: Option<Budget>| b.and_then(|b| b.0);
        Some(BodyFields {
            model: text(wire.model),
            previous_response_id: text(wire.previous_response_id),
            stream: flag(wire.stream).unwrap_or(false),
            include_usage: wire.stream_options.and_then(|o| o.include_usage()).unwrap_or(false),
            store: flag(wire.store),
            background: flag(wire.background).unwrap_or(false),
            max_tokens: number(wire.max_tokens),
            max_completion_tokens: number(wire.max_completion_tokens),
            max_output_tokens: number(wire.max_output_tokens),
            n: number(wire.n),
            best_of: number(wire.best_of),
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

/// The members of a request body the fields come from.
#[derive(Deserialize)]
struct Wire {
    model: Option<Text>,
    previous_response_id: Option<Text>,
    stream: Option<Flag>,
    stream_options: Option<StreamOptions>,
    store: Option<Flag>,
    background: Option<Flag>,
    max_tokens: Option<Budget>,
    max_completion_tokens: Option<Budget>,
    max_output_tokens: Option<Budget>,
    n: Option<Budget>,
    best_of: Option<Budget>,
}

/// `stream_options`: an object with `include_usage`, or anything else
/// (which asks for nothing).
enum StreamOptions {
    Object { include_usage: Option<bool> },
    Other,
}

impl StreamOptions {
    fn include_usage(self) -> Option<bool> {
        match self {
            StreamOptions::Object { include_usage } => include_usage,
            StreamOptions::Other => None,
        }
    }
}

impl<'de> Deserialize<'de> for StreamOptions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // An object is read for its one member; any other value is skipped.
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Object(map) => {
                let include_usage = map.get("include_usage").and_then(serde_json::Value::as_bool);
                Ok(StreamOptions::Object { include_usage })
            }
            _ => Ok(StreamOptions::Other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_come_from_the_top_level_members() {
        let body = br#"{"model":"gpt-4o-x","messages":[{"role":"user","content":"{\"model\":\"no\",\"n\":9}"}],
            "stream":true,"stream_options":{"include_usage":false},"max_tokens":77,"n":2,"store":false,
            "tools":[{"type":"function","function":{"name":"f","parameters":{"max_tokens":5}}}]}"#;
        let f = BodyFields::from_json(body).unwrap();
        assert_eq!(f.model.as_deref(), Some("gpt-4o-x"));
        assert!(f.stream && !f.include_usage && !f.background);
        assert_eq!((f.max_tokens, f.n, f.store, f.best_of), (Some(77), Some(2), Some(false), None));
        // 400 body bytes ~ 100 prompt tokens, plus 77 for each of 2 copies.
        assert_eq!(f.facts(400).estimated_tokens, 100 + 154);
        let f = BodyFields::from_json(
            br#"{"input":"hi","previous_response_id":"resp_1","background":true,
            "stream_options":{"include_usage":true},"max_output_tokens":12.5}"#,
        )
        .unwrap();
        assert_eq!(f.previous_response_id.as_deref(), Some("resp_1"));
        assert!(f.background && f.include_usage);
        assert_eq!(f.max_output_tokens, Some(12));
    }

    #[test]
    fn a_member_of_another_type_counts_as_absent() {
        let f = BodyFields::from_json(
            br#"{"model":5,"stream":"yes","stream_options":true,"max_tokens":-1,"n":"2","store":null,"best_of":1e12}"#,
        )
        .unwrap();
        assert_eq!(f, BodyFields::default());
    }

    #[test]
    fn only_a_json_object_has_fields() {
        for body in
            [&b"not json"[..], b"[1,2]", b"\"text\"", b"", b"{\"model\":\"a\"", b"{\"model\":\"a\",\"model\":\"b\"}"]
        {
            assert_eq!(BodyFields::from_json(body), None, "{:?}", String::from_utf8_lossy(body));
        }
        assert_eq!(BodyFields::from_json(b" {} "), Some(BodyFields::default()));
    }

    #[test]
    fn json_is_told_by_its_media_type() {
        for t in ["application/json", "Application/JSON", "application/json; charset=utf-8", " application/json "] {
            assert!(is_json(t), "{t}");
        }
        for t in ["multipart/form-data; boundary=x", "application/jsonl", "text/plain", ""] {
            assert!(!is_json(t), "{t}");
        }
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
    }
}
