//! Request and answer bodies: the token estimate, usage/model/object id and
//! logged text of a JSON answer, and the two rewrites
//! (`stream_options.include_usage`, a backend's `model`). Only JSON is
//! rewritten, and a rewrite is JSON saying what was asked.
//!
//! "JSON" is RFC 8259's: UTF-8 and the grammar. serde_json's `Value` refuses
//! some of that (numbers beyond f64, lone surrogate escapes); a rewrite copies
//! such members unchanged, so those bodies are checked member by member.
//!
//! Input: a flags byte (bit 0: the answer is about stored state, bits 1-2:
//! the model name to write), then the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use serde_json::Value;
use spillway::stateful;
use spillway::usage::{answer_text, json_answer, request_facts, with_include_usage, with_model};
use std::collections::BTreeMap;

const MODELS: [&str; 4] = ["gpt-4o-east", "", "model \"quoted\" \\ \u{e9}\u{1f600}", "usage"];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else { return };
    let stateful_answer = flags & 1 != 0;
    let model = MODELS[usize::from(flags >> 1) & 3];

    let facts = request_facts(body);

    let _ = answer_text(body);
    let answer = json_answer(body, stateful_answer);
    if let Some(id) = &answer.object_id {
        assert!(stateful_answer && stateful::is_object_id(id), "{id:?}");
    }

    // `request_facts` reads a rewritten body as it read the original, plus the
    // change; checked where it read the original at all (one field of an
    // unexpected type, e.g. `"max_tokens": true`, makes it read nothing).
    let is_value = serde_json::from_slice::<Value>(body).is_ok();

    if let Some(out) = with_include_usage(body) {
        assert!(is_json(body), "with_include_usage rewrote a body that is not JSON");
        assert!(is_json(&out), "with_include_usage wrote a body that is not JSON");
        let top = members(&out).expect("with_include_usage wrote an object");
        assert_eq!(top.get("stream").map(|v| v.get()), Some("true"));
        let options = top.get("stream_options").and_then(|v| members(v.get().as_bytes())).expect("stream_options");
        assert_eq!(options.get("include_usage").map(|v| v.get()), Some("true"));
        assert_eq!(with_include_usage(&out), None, "a second pass changes nothing");
        if is_value && facts.stream {
            let after = request_facts(&out);
            assert!(after.stream && after.include_usage);
            assert_eq!(after.model, facts.model);
        }
    }

    if let Some(out) = with_model(body, model) {
        assert!(is_json(body), "with_model rewrote a body that is not JSON");
        assert!(is_json(&out), "with_model wrote a body that is not JSON");
        let top = members(&out).expect("with_model wrote an object");
        let written = top.get("model").and_then(|v| serde_json::from_str::<String>(v.get()).ok());
        assert_eq!(written.as_deref(), Some(model));
        if is_value && (facts.stream || facts.model.is_some()) {
            let after = request_facts(&out);
            assert_eq!(after.model.as_deref(), Some(model));
            assert_eq!(after.stream, facts.stream);
        }
    }
});

/// UTF-8 and the JSON grammar (what serde_json skips over unparsed).
fn is_json(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok() && serde_json::from_slice::<IgnoredAny>(bytes).is_ok()
}

/// An object's members, values unparsed (the last of duplicate names wins).
fn members(bytes: &[u8]) -> Option<BTreeMap<String, &RawValue>> {
    serde_json::from_slice(bytes).ok()
}
