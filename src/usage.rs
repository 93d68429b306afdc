//! Token accounting: estimates from request bodies, real `usage` from JSON
//! answers and from SSE streams (scanned incrementally, optionally with the
//! usage-only chunk removed for clients that did not ask for it).

use crate::lenient::{Count, Text};
use crate::stateful;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Number, Value};
use std::borrow::Cow;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
}

impl Usage {
    /// `v.usage` in either naming: chat and completions (`prompt_tokens`,
    /// `completion_tokens`) or the Responses API (`input_tokens`,
    /// `output_tokens`).
    fn from_json(v: &Value) -> Option<Usage> {
        let u = v.get("usage")?;
        let count = |a: &str, b: &str| u.get(a).or_else(|| u.get(b)).and_then(Value::as_u64).unwrap_or(0);
        let prompt = count("prompt_tokens", "input_tokens");
        let completion = count("completion_tokens", "output_tokens");
        let total = u.get("total_tokens").and_then(Value::as_u64).unwrap_or(prompt + completion);
        u.is_object().then_some(Usage { prompt, completion, total })
    }
}

/// An answer's `usage` object as `Usage` reads it, deserialized without
/// building a `Value` (it runs on every answer): each count is a number or
/// nothing, and other members are skipped.
#[derive(Deserialize)]
struct UsageFields {
    prompt_tokens: Option<Count>,
    input_tokens: Option<Count>,
    completion_tokens: Option<Count>,
    output_tokens: Option<Count>,
    total_tokens: Option<Count>,
}

impl UsageFields {
    /// As `Usage::from_json`: either naming, a present name wins even when
    /// its value is not a count.
    fn usage(&self) -> Usage {
        let count = |a: &Option<Count>, b: &Option<Count>| a.as_ref().or(b.as_ref()).and_then(|c| c.0).unwrap_or(0);
        let prompt = count(&self.prompt_tokens, &self.input_tokens);
        let completion = count(&self.completion_tokens, &self.output_tokens);
        let total = self.total_tokens.as_ref().and_then(|c| c.0).unwrap_or(prompt + completion);
        Usage { prompt, completion, total }
    }
}

/// What the gateway needs to know about a request body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    pub stream: bool,
    pub include_usage: bool,
    /// The prompt's estimate alone (what a backend bills as input).
    pub prompt_tokens: u64,
    /// Prompt estimate plus the completion budget of every copy: what the
    /// token limit charges up front.
    pub estimated_tokens: u64,
    pub model: Option<String>,
}

impl RequestFacts {
    /// The estimate for a body of `body_len` bytes: everything in it counts
    /// as prompt (messages and all their parts, tools and function schemas,
    /// response formats; the JSON around them is a small overcount), plus
    /// the completion budget for each of `copies` (`n`, `best_of`).
    pub fn estimate(body_len: u64, budget: u64, copies: u64) -> (u64, u64) {
        let prompt = body_len.div_ceil(CHARS_PER_TOKEN).max(1);
        (prompt, prompt.saturating_add(budget.saturating_mul(copies.max(1))))
    }
}

/// Characters per token for estimates (the usual rule of thumb for English).
pub const CHARS_PER_TOKEN: u64 = 4;

/// The top-level request fields the estimate needs, read without building
/// the body's tree (everything else is skipped as it is parsed).
#[derive(Deserialize, Default)]
#[serde(default)]
struct RequestHeadFields<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<Number>,
    max_completion_tokens: Option<Number>,
    max_output_tokens: Option<Number>,
    n: Option<Number>,
    best_of: Option<Number>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// A count as a client may write it (`100`, `100.0`); negative or absurd
/// values count as absent.
fn count(n: Option<&Number>) -> Option<u64> {
    let n = n?;
    n.as_u64().or_else(|| n.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f.ceil() as u64))
}

pub fn request_facts(body: &[u8]) -> RequestFacts {
    let head: RequestHeadFields = serde_json::from_slice(body).unwrap_or_default();
    let budget = completion_budget(
        count(head.max_completion_tokens.as_ref()),
        count(head.max_tokens.as_ref()),
        count(head.max_output_tokens.as_ref()),
    );
    let copies = count(head.n.as_ref()).max(count(head.best_of.as_ref())).unwrap_or(1);
    let (prompt_tokens, estimated_tokens) = RequestFacts::estimate(body.len() as u64, budget, copies);
    RequestFacts {
        stream: head.stream.unwrap_or(false),
        include_usage: head.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
        prompt_tokens,
        estimated_tokens,
        model: head.model.map(Cow::into_owned),
    }
}

/// The most a request may generate per copy: `max_completion_tokens`
/// (chat, newer), `max_tokens` (chat, completions) or `max_output_tokens`
/// (Responses API), whichever is given first; 0 when none is.
pub fn completion_budget(
    max_completion_tokens: Option<u64>,
    max_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
) -> u64 {
    max_completion_tokens.or(max_tokens).or(max_output_tokens).unwrap_or(0)
}

/// Where a top-level member's value sits in the body, and where a new
/// member could go: read without building the body's tree.
#[derive(Deserialize)]
struct MemberSpan<'a> {
    #[serde(borrow, default, deserialize_with = "raw_member")]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw_member")]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw_member")]
    model: Option<&'a RawValue>,
}

/// A member's raw value, `null` included (`Option` alone reads `null` as absent).
fn raw_member<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue as Deserialize>::deserialize(d).map(Some)
}

/// The body's top-level members, when it is a JSON object: UTF-8 checked
/// first (serde_json does not check strings it skips), and an object (the
/// derive would also read an array positionally).
fn member_span(body: &[u8]) -> Option<MemberSpan<'_>> {
    let text = std::str::from_utf8(body).ok()?;
    after_open_brace(body)?;
    serde_json::from_str(text).ok()
}

/// Byte range of `value` (a slice of `body`) inside `body`.
fn range_in(body: &[u8], value: &RawValue) -> Option<std::ops::Range<usize>> {
    let start = (value.get().as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start.checked_add(value.get().len())?;
    (end <= body.len()).then_some(start..end)
}

/// Just after the body's opening brace.
fn after_open_brace(body: &[u8]) -> Option<usize> {
    let pos = body.iter().position(|b| !b.is_ascii_whitespace())?;
    (body.get(pos) == Some(&b'{')).then_some(pos + 1)
}

/// `body` with `member` (`"key":value`) inserted as the object's first member.
fn insert_member(body: &[u8], member: &str) -> Option<Vec<u8>> {
    let at = after_open_brace(body)?;
    let empty = body.get(at..)?.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let mut out = Vec::with_capacity(body.len() + member.len() + 1);
    out.extend_from_slice(body.get(..at)?);
    out.extend_from_slice(member.as_bytes());
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(body.get(at..)?);
    Some(out)
}

/// `body` with the bytes in `range` replaced by `value`.
fn splice(body: &[u8], range: std::ops::Range<usize>, value: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len() + value.len());
    out.extend_from_slice(body.get(..range.start)?);
    out.extend_from_slice(value);
    out.extend_from_slice(body.get(range.end..)?);
    Some(out)
}

/// The body with `stream_options.include_usage = true`, for streamed
/// requests that did not ask for usage; `None` when nothing needs changing.
/// Only the `stream_options` member changes; the rest is copied as is.
pub fn with_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let span = member_span(body)?;
    if span.stream.map(RawValue::get) != Some("true") {
        return None;
    }
    let Some(options) = span.stream_options else {
        return insert_member(body, r#""stream_options":{"include_usage":true}"#);
    };
    if options.get() == "null" {
        return splice(body, range_in(body, options)?, br#"{"include_usage":true}"#);
    }
    let mut parsed: serde_json::Map<String, Value> = serde_json::from_str(options.get()).ok()?;
    if parsed.get("include_usage").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    parsed.insert("include_usage".to_string(), Value::Bool(true));
    splice(body, range_in(body, options)?, &serde_json::to_vec(&parsed).ok()?)
}

/// What an answer says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnswerFacts {
    pub usage: Option<Usage>,
    pub model: Option<String>,
    /// The id of a stored object (a response, a file, a batch, ...), which
    /// only the backend that made it knows.
    pub object_id: Option<String>,
}

/// The body with its top-level `model` set to `model` (a v1 request's
/// deployment name for one backend); `None` when it is not a JSON object.
/// Only the value changes; the rest is copied as is.
pub fn with_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let span = member_span(body)?;
    let value = serde_json::to_string(model).ok()?;
    match span.model {
        Some(old) => splice(body, range_in(body, old)?, value.as_bytes()),
        None => insert_member(body, &format!(r#""model":{value}"#)),
    }
}

/// Usage, `model` and, for answers about stored objects (`stateful`), the
/// object's id from a complete JSON answer. Only usage and model are picked
/// out of other answers, which are not parsed whole (an embeddings answer
/// can be megabytes of floats).
pub fn json_answer(body: &[u8], stateful: bool) -> AnswerFacts {
    let usage = top_level::<UsageFields>(body, b"\"usage\"").map(|u| u.usage());
    let model = top_level::<Text>(body, b"\"model\"").and_then(|m| m.0);
    let object_id = if stateful { stored_object_id(body) } else { None };
    AnswerFacts { usage, model, object_id }
}

/// The first message text of a JSON answer (chat `message.content`,
/// completions `text`), for body logging; from the start of a cut-off
/// answer too.
pub fn answer_text(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let text = v.pointer("/choices/0/message/content").or_else(|| v.pointer("/choices/0/text"));
        return text.and_then(Value::as_str).unwrap_or("").to_string();
    }
    let Ok(text) =
        std::str::from_utf8(body).or_else(|e| std::str::from_utf8(body.get(..e.valid_up_to()).unwrap_or(&[])))
    else {
        return String::new();
    };
    for key in ["\"content\":", "\"text\":"] {
        let Some(at) = text.find(key) else { continue };
        let value = text.get(at + key.len()..).unwrap_or("").trim_start();
        let Some(rest) = value.strip_prefix('"') else { continue };
        let len = string_chars_len(rest.as_bytes());
        let quoted = format!("\"{}\"", rest.get(..len).unwrap_or(""));
        return serde_json::from_str::<String>(&quoted).unwrap_or_default();
    }
    String::new()
}

/// The top-level `id` of an answer describing a stored object (nested
/// items have ids of their own).
fn stored_object_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Head {
        id: Option<String>,
        object: Option<String>,
    }
    let head: Head = serde_json::from_slice(body).ok()?;
    let id = head.id?;
    stateful::answer_object_id(head.object.as_deref()?, &id).map(str::to_string)
}

/// The value after the last `"key":` in `body` that is not inside a string
/// (an escaped quote comes after a backslash). OpenAI and Azure put `usage`
/// and `model` at the top level; nested objects do not use these keys.
fn top_level<T: serde::de::DeserializeOwned>(body: &[u8], key: &[u8]) -> Option<T> {
    let mut end = body.len();
    while let Some(pos) = rfind(body.get(..end)?, key) {
        end = pos;
        if pos > 0 && body.get(pos - 1) == Some(&b'\\') {
            continue;
        }
        let rest = body.get(pos + key.len()..)?;
        let rest = trim_start(rest);
        let Some(rest) = rest.strip_prefix(b":") else { continue };
        let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<T>();
        if let Some(Ok(v)) = values.next() {
            return Some(v);
        }
    }
    None
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    // Comparing only where the first byte matches: a slice comparison at
    // every position costs a call each (this runs on every answer).
    let first = needle.first()?;
    (0..=hay.len() - needle.len())
        .rev()
        .find(|&i| hay.get(i) == Some(first) && hay.get(i..i + needle.len()) == Some(needle))
}

fn trim_start(mut s: &[u8]) -> &[u8] {
    while let Some((first, rest)) = s.split_first() {
        if !first.is_ascii_whitespace() {
            break;
        }
        s = rest;
    }
    s
}

/// Longest partial event kept between chunks; a longer one is passed on
/// unscanned rather than held (SSE events from these APIs are small).
const MAX_PENDING: usize = 1 << 20;

/// Incremental SSE scanner. Feed it each chunk as it passes; it finds the
/// usage chunk and, when `strip_usage` is set, returns the chunk without it.
#[derive(Debug, Default)]
pub struct SseScanner {
    strip_usage: bool,
    pending: Vec<u8>,
    pub usage: Option<Usage>,
    pub model: Option<String>,
    /// The stored response's id, from a Responses API stream's
    /// `response.created` event.
    pub object_id: Option<String>,
    /// Text of the answer's content deltas (for body logging), capped.
    pub text: String,
    text_cap: usize,
    /// Estimated tokens of the content streamed so far: what the answer
    /// cost when it carries no usage (not asked for, or cut before it).
    pub streamed_tokens: u64,
}

impl SseScanner {
    pub fn new(strip_usage: bool, text_cap: usize) -> SseScanner {
        SseScanner { strip_usage, text_cap, ..SseScanner::default() }
    }

    /// Consumes a chunk; returns what to send on in its place. Without
    /// stripping that is the chunk itself; with stripping, complete events
    /// are sent and a trailing partial event waits for the next chunk.
    pub fn feed(&mut self, chunk: &[u8], end_of_stream: bool) -> Vec<u8> {
        let mut pending = std::mem::take(&mut self.pending);
        pending.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(if self.strip_usage { pending.len() } else { 0 });
        let mut start = 0;
        while let Some(end) = find_event_end(&pending, start) {
            let event = pending.get(start..end).unwrap_or(&[]);
            let drop_it = self.scan_event(event);
            if self.strip_usage && !drop_it {
                out.extend_from_slice(event);
            }
            start = end;
        }
        self.pending = pending.split_off(start.min(pending.len()));
        if end_of_stream || self.pending.len() > MAX_PENDING {
            let tail = std::mem::take(&mut self.pending);
            if end_of_stream {
                self.scan_event(&tail);
            }
            if self.strip_usage {
                out.extend_from_slice(&tail);
            }
        }
        if self.strip_usage {
            out
        } else {
            // Only scanning: the chunk goes on unchanged.
            chunk.to_vec()
        }
    }

    /// Records what the event says; true if it is a usage-only chunk to strip.
    fn scan_event(&mut self, event: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(event) else { return false };
        let mut is_usage_only = false;
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data:") else { continue };
            let data = data.trim();
            if data == "[DONE]" || data.is_empty() {
                continue;
            }
            let streamed = streamed_chars(data);
            if streamed > 0 {
                self.streamed_tokens = self.streamed_tokens.saturating_add(streamed.div_ceil(CHARS_PER_TOKEN));
            }
            // With include_usage every chunk carries `"usage":null`; only a
            // real usage object is worth parsing.
            let has_usage =
                data.contains("\"usage\"") && !data.contains("\"usage\":null") && !data.contains("\"usage\": null");
            let wants_text = self.text.len() < self.text_cap;
            if !has_usage && !wants_text && self.model.is_some() {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
            if let Some(kind) = v.get("type").and_then(Value::as_str) {
                self.scan_responses_event(kind, &v);
                continue;
            }
            if self.model.is_none() {
                self.model = v.get("model").and_then(Value::as_str).map(str::to_string);
            }
            if wants_text {
                if let Some(delta) = v.pointer("/choices/0/delta/content").and_then(Value::as_str) {
                    push_capped(&mut self.text, delta, self.text_cap);
                } else if let Some(t) = v.pointer("/choices/0/text").and_then(Value::as_str) {
                    push_capped(&mut self.text, t, self.text_cap);
                }
            }
            if let Some(u) = Usage::from_json(&v) {
                self.usage = Some(u);
                let no_choices = v.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty);
                is_usage_only |= no_choices;
            }
        }
        is_usage_only
    }
}

impl SseScanner {
    /// A Responses API stream event (`{"type": "response.…", …}`): the first
    /// one carries the response's id and model, the last one its usage.
    fn scan_responses_event(&mut self, kind: &str, v: &Value) {
        let response = v.get("response");
        match kind {
            "response.created" => {
                let id = response.and_then(|r| r.get("id")).and_then(Value::as_str);
                self.object_id = id.and_then(|id| stateful::answer_object_id("response", id)).map(str::to_string);
                self.model = response.and_then(|r| r.get("model")).and_then(Value::as_str).map(str::to_string);
            }
            "response.completed" | "response.failed" | "response.incomplete" => {
                if let Some(u) = response.and_then(Usage::from_json) {
                    self.usage = Some(u);
                }
            }
            "response.output_text.delta" if self.text.len() < self.text_cap => {
                if let Some(delta) = v.get("delta").and_then(Value::as_str) {
                    push_capped(&mut self.text, delta, self.text_cap);
                }
            }
            _ => {}
        }
    }
}

/// Appends at most up to `cap` bytes, cutting on a character boundary.
pub fn push_capped(buf: &mut String, s: &str, cap: usize) {
    for ch in s.chars() {
        if buf.len() + ch.len_utf8() > cap {
            break;
        }
        buf.push(ch);
    }
}

/// Characters of generated content in one SSE event's data, found without
/// parsing it: the string after `"content":` (chat), `"arguments":` (tool
/// calls) or `"text":` (legacy completions); in the Responses API only the
/// `"delta":` of delta events (its `.done` events repeat the whole text).
fn streamed_chars(data: &str) -> u64 {
    const CHAT: [&str; 3] = ["\"content\":", "\"arguments\":", "\"text\":"];
    const RESPONSES: [&str; 1] = ["\"delta\":"];
    let keys: &[&str] = if data.contains("\"type\":\"response.") { &RESPONSES } else { &CHAT };
    keys.iter().find_map(|key| data.find(key).map(|at| at + key.len())).map_or(0, |at| {
        let value = data.get(at..).unwrap_or("").trim_start();
        value.strip_prefix('"').map_or(0, |s| string_chars(s.as_bytes()))
    })
}

/// Characters up to the closing quote of a JSON string's body (an escape
/// counts as one); all of them when the string is not closed.
fn string_chars(s: &[u8]) -> u64 {
    let (mut chars, mut i) = (0u64, 0usize);
    while let Some(&b) = s.get(i) {
        match b {
            b'"' => break,
            b'\\' => i += 2,
            _ => i += 1,
        }
        chars += 1;
    }
    chars
}

/// Bytes up to the closing quote of a JSON string's body, or up to the
/// last whole escape when it is not closed.
fn string_chars_len(s: &[u8]) -> usize {
    let mut i = 0usize;
    while let Some(&b) = s.get(i) {
        match b {
            b'"' => return i,
            b'\\' if i + 1 < s.len() => i += 2,
            b'\\' => return i,
            _ => i += 1,
        }
    }
    i
}

/// End (exclusive) of the first complete event at or after `from`: the
/// position after a blank line (`\n\n` or `\r\n\r\n`).
fn find_event_end(buf: &[u8], from: usize) -> Option<usize> {
    let hay = buf.get(from..)?;
    let mut i = 0;
    while i + 1 < hay.len() {
        match (hay.get(i), hay.get(i + 1)) {
            (Some(b'\n'), Some(b'\n')) => return Some(from + i + 2),
            (Some(b'\r'), Some(b'\n')) if hay.get(i + 2..i + 4) == Some(b"\r\n") => return Some(from + i + 4),
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello \"}}],\"usage\":null}\n\n",
        "data: {\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"world\"}}],\"usage\":null}\n\n",
        "data: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn everything_in_the_body_counts_as_prompt_with_every_copy_of_the_budget() {
        let chat = br#"{"messages":[{"role":"user","content":"12345678"},{"role":"user","content":[{"type":"text","text":"abcd"}]}],"max_tokens":100,"n":2,"stream":true}"#;
        let f = request_facts(chat);
        let prompt = (chat.len() as u64).div_ceil(4);
        assert_eq!((f.prompt_tokens, f.estimated_tokens), (prompt, prompt + 200));
        assert!(f.stream && !f.include_usage);
        // Tools, schemas and response formats are billed as prompt: a body
        // that is mostly schema costs what the schema costs.
        let schema = format!(r#"{{"type":"object","properties":{{"p":{{"description":"{}"}}}}}}"#, "d".repeat(4000));
        let tools = format!(
            r#"{{"messages":[{{"role":"user","content":"hi"}}],"tools":[{{"type":"function","function":{{"name":"f","parameters":{schema}}}}}],
                "response_format":{{"type":"json_schema","json_schema":{{"name":"s","schema":{schema}}}}}}}"#
        );
        assert!(request_facts(tools.as_bytes()).prompt_tokens >= 2 * 4000 / 4);
        let copies = br#"{"prompt":"x","max_completion_tokens":10,"best_of":3,"n":2}"#;
        assert_eq!(request_facts(copies).estimated_tokens, 15 + 3 * 10);
        assert_eq!(request_facts(br#"{"input":"x","max_output_tokens":10.0}"#).estimated_tokens, 10 + 10);
        // Not JSON (multipart audio): its size.
        assert_eq!(request_facts(b"not json at all!").estimated_tokens, 4);
        assert_eq!(request_facts(br#"{"max_tokens":-5}"#).estimated_tokens, 5);
    }

    #[test]
    fn include_usage_is_added_only_when_missing_and_nothing_else_changes() {
        let out = with_include_usage(br#" {"stream":true,"messages":[]}"#).unwrap();
        assert_eq!(out, br#" {"stream_options":{"include_usage":true},"stream":true,"messages":[]}"#);
        assert!(with_include_usage(br#"{"stream":true,"stream_options":{"include_usage":true}}"#).is_none());
        assert!(with_include_usage(br#"{"messages":[]}"#).is_none());
        assert!(with_include_usage(br#"{"stream":false}"#).is_none());
        let kept = with_include_usage(br#"{"stream":true,"stream_options":{"x":1},"m":"stream_options"}"#).unwrap();
        let v: Value = serde_json::from_slice(&kept).unwrap();
        assert_eq!(
            (v["stream_options"]["x"].as_u64(), v["stream_options"]["include_usage"].as_bool()),
            (Some(1), Some(true))
        );
        assert_eq!(v["m"], "stream_options");
        assert!(with_include_usage(b"[1]").is_none());
        // Found by fuzzing: a null member is present (not inserted twice),
        // an array is not an object, bytes that are not UTF-8 are not JSON.
        let null = with_include_usage(br#"{"stream":true,"stream_options":null}"#).unwrap();
        assert_eq!(null, br#"{"stream":true,"stream_options":{"include_usage":true}}"#);
        assert!(with_include_usage(br#"[true,{"a":1}]"#).is_none());
        assert!(with_include_usage(b"{\"stream\":true,\"x\":\"\xa4\"}").is_none());
        assert_eq!(with_model(br#"{"model":null}"#, "n").unwrap(), br#"{"model":"n"}"#);
        assert_eq!(with_model(br#"["x","x","y"]"#, "n"), None);
        assert_eq!(with_model(b"{\"model\":\"a\",\"x\":\"\xa4\"}", "n"), None);
    }

    #[test]
    fn json_answer_reads_only_top_level_usage_and_model() {
        let body = br#"{"model":"gpt-4o","choices":[{"message":{"content":"say \"usage\": {\"total_tokens\": 999} and \"model\": \"x\""}}],
            "usage" : {"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        let a = json_answer(body, false);
        assert_eq!(a.usage, Some(Usage { prompt: 3, completion: 4, total: 7 }));
        assert_eq!(a.model.as_deref(), Some("gpt-4o"));
        let a =
            json_answer(br#"{"data":[{"embedding":[0.1,0.2]}],"usage":{"prompt_tokens":5,"total_tokens":5}}"#, false);
        assert_eq!(a.usage, Some(Usage { prompt: 5, completion: 0, total: 5 }));
        assert_eq!(json_answer(b"not json", true), AnswerFacts::default());
        assert_eq!(json_answer(br#"{"usage":null}"#, false).usage, None);
    }

    #[test]
    fn responses_answers_give_usage_and_their_id() {
        // Keys in any order (the id need not come first).
        let body = br#"{"background":false,"model":"gpt-4o","output":[{"id":"msg_9","type":"message"}],"object":"response",
            "usage":{"input_tokens":11,"input_tokens_details":{"cached_tokens":0},"output_tokens":5,"total_tokens":16},"id":"resp_0a1b2c"}"#;
        let a = json_answer(body, true);
        assert_eq!(a.usage, Some(Usage { prompt: 11, completion: 5, total: 16 }));
        assert_eq!(a.object_id.as_deref(), Some("resp_0a1b2c"));
        assert_eq!(json_answer(body, false).object_id, None);
        // Only a response object's own id counts, not a nested item's.
        assert_eq!(
            json_answer(br#"{"object":"list","data":[{"id":"resp_x","object":"response"}]}"#, true).object_id,
            None
        );
        assert_eq!(json_answer(br#"{"id":"chatcmpl-1","object":"chat.completion"}"#, true).object_id, None);
    }

    #[test]
    fn responses_streams_give_id_usage_and_text() {
        let stream = concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_77\",\"model\":\"gpt-4o\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hel\"}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"lo\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_77\",\"usage\":{\"input_tokens\":3,\"output_tokens\":2,\"total_tokens\":5}}}\n\n",
        );
        let mut scanner = SseScanner::new(false, 100);
        // Fed in pieces that cut events apart.
        for piece in stream.as_bytes().chunks(17) {
            scanner.feed(piece, false);
        }
        scanner.feed(b"", true);
        assert_eq!(scanner.object_id.as_deref(), Some("resp_77"));
        assert_eq!(scanner.model.as_deref(), Some("gpt-4o"));
        assert_eq!(scanner.usage, Some(Usage { prompt: 3, completion: 2, total: 5 }));
        assert_eq!(scanner.text, "Hello");
    }

    #[test]
    fn the_model_is_renamed_and_nothing_else_changes() {
        let out =
            with_model(br#"{"model":"gpt-4o","messages":[{"role":"user","content":"model: gpt-4o"}]}"#, "gpt-4o-east");
        let v: Value = serde_json::from_slice(&out.unwrap()).unwrap();
        assert_eq!(v["model"], "gpt-4o-east");
        assert_eq!(v["messages"][0]["content"], "model: gpt-4o");
        assert_eq!(with_model(b"[1]", "x"), None);
        assert_eq!(with_model(b"not json", "x"), None);
        assert_eq!(with_model(br#"{"a":1, "model" : "m"}"#, "n\"x").unwrap(), br#"{"a":1, "model" : "n\"x"}"#);
        assert_eq!(with_model(br#"{}"#, "n").unwrap(), br#"{"model":"n"}"#);
        assert_eq!(with_model(br#"{"a":1}"#, "n").unwrap(), br#"{"model":"n","a":1}"#);
    }

    #[test]
    fn json_answer_usage() {
        let a = json_answer(
            br#"{"model":"gpt-4o","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
            false,
        );
        assert_eq!(a.usage, Some(Usage { prompt: 3, completion: 4, total: 7 }));
        assert_eq!(a.model.as_deref(), Some("gpt-4o"));
        assert_eq!(json_answer(b"{}", false).usage, None);
        // Counts that are not whole numbers count as absent; other members are skipped.
        let a = json_answer(
            br#"{"model":7,"usage":{"prompt_tokens":"3","input_tokens":9,"completion_tokens":-1,"output_tokens":2.5,
                "prompt_tokens_details":{"cached_tokens":[1,{"x":null}]},"total_tokens":null}}"#,
            false,
        );
        assert_eq!(a.usage, Some(Usage { prompt: 0, completion: 0, total: 0 }));
        assert_eq!(a.model, None);
        let a = json_answer(br#"{"usage":{"input_tokens":9,"output_tokens":2},"model":"m"}"#, false);
        assert_eq!(a.usage, Some(Usage { prompt: 9, completion: 2, total: 11 }));
        assert_eq!(a.model.as_deref(), Some("m"));
        assert_eq!(json_answer(br#"{"usage":[1,2]}"#, false).usage, None);
    }

    #[test]
    fn scanning_passes_chunks_unchanged_and_finds_usage_across_splits() {
        let bytes = STREAM.as_bytes();
        for split in [1, 7, 50, 200, bytes.len()] {
            let mut s = SseScanner::new(false, 100);
            let mut out = Vec::new();
            let chunks: Vec<&[u8]> = bytes.chunks(split).collect();
            for (i, c) in chunks.iter().enumerate() {
                out.extend(s.feed(c, i + 1 == chunks.len()));
            }
            assert_eq!(out, bytes);
            assert_eq!(s.usage, Some(Usage { prompt: 7, completion: 2, total: 9 }));
            assert_eq!(s.text, "Hello world");
            assert_eq!(s.model.as_deref(), Some("gpt-4o"));
        }
    }

    #[test]
    fn stripping_removes_only_the_usage_chunk() {
        let bytes = STREAM.as_bytes();
        for split in [1, 13, 64, bytes.len()] {
            let mut s = SseScanner::new(true, 0);
            let mut out = Vec::new();
            let chunks: Vec<&[u8]> = bytes.chunks(split).collect();
            for (i, c) in chunks.iter().enumerate() {
                out.extend(s.feed(c, i + 1 == chunks.len()));
            }
            let text = String::from_utf8(out).unwrap();
            assert!(!text.contains("prompt_tokens"), "{text}");
            assert_eq!(text.matches("data: ").count(), 4);
            assert!(text.ends_with("data: [DONE]\n\n"));
            assert_eq!(s.usage.map(|u| u.total), Some(9));
        }
    }

    #[test]
    fn streamed_content_is_counted_without_usage() {
        let mut s = SseScanner::new(false, 0);
        s.feed(STREAM.as_bytes(), true);
        // "Hello " and "world": 2 tokens each by size; the role-only and
        // usage chunks none.
        assert_eq!(s.streamed_tokens, 4);
        let mut tools = SseScanner::new(false, 0);
        tools.feed(b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"function\":{\"arguments\":\"{\\\"city\\\": \\\"Paris\\\"}\"}}]}}]}\n\n", true);
        // {"city": "Paris"}: 17 characters.
        assert_eq!(tools.streamed_tokens, 5);
        let mut responses = SseScanner::new(false, 0);
        responses.feed(
            concat!(
                "data: {\"type\":\"response.output_text.delta\",\"content_index\":0,\"delta\":\"Hello\"}\n\n",
                "data: {\"type\":\"response.output_text.done\",\"text\":\"Hello\"}\n\n",
            )
            .as_bytes(),
            true,
        );
        assert_eq!(responses.streamed_tokens, 2);
    }

    #[test]
    fn crlf_events_and_capped_text() {
        let mut s = SseScanner::new(true, 3);
        let input: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"abcdef\"}}]}\r\n\r\ndata: [DONE]\r\n\r\n";
        assert_eq!(s.feed(input, true), input);
        assert_eq!(s.text, "abc");
        let mut capped = String::new();
        push_capped(&mut capped, "héllo", 2);
        assert_eq!(capped, "h");
    }
}
