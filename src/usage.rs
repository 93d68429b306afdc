//! Token accounting: estimates from request bodies, real `usage` from JSON
//! answers and from SSE streams (scanned incrementally, optionally with the
//! usage-only chunk removed for clients that did not ask for it).

use crate::stateful;
use serde_json::Value;

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

/// What the gateway needs to know about a request body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    pub stream: bool,
    pub include_usage: bool,
    /// Prompt estimate plus the completion budget: what the token limit charges up front.
    pub estimated_tokens: u64,
    pub model: Option<String>,
}

/// Characters per token for estimates (the usual rule of thumb for English).
pub const CHARS_PER_TOKEN: u64 = 4;

pub fn request_facts(body: &[u8]) -> RequestFacts {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        // Not JSON (e.g. multipart audio): estimate from the size.
        return RequestFacts {
            estimated_tokens: (body.len() as u64).div_ceil(CHARS_PER_TOKEN).max(1),
            ..RequestFacts::default()
        };
    };
    let mut chars = 0u64;
    if let Some(messages) = v.get("messages").and_then(Value::as_array) {
        for m in messages {
            chars += text_chars(m.get("content"));
        }
    }
    chars += text_chars(v.get("prompt")) + text_chars(v.get("input"));
    let prompt = chars.div_ceil(CHARS_PER_TOKEN).max(1);
    let field = |k: &str| v.get(k).and_then(Value::as_u64);
    let budget = completion_budget(field("max_completion_tokens"), field("max_tokens"), field("max_output_tokens"));
    let copies =
        [v.get("n"), v.get("best_of")].into_iter().flatten().filter_map(Value::as_u64).max().unwrap_or(1).max(1);
    RequestFacts {
        stream: v.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: v.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false),
        estimated_tokens: prompt.saturating_add(budget.saturating_mul(copies)),
        model: v.get("model").and_then(Value::as_str).map(str::to_string),
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

/// Characters of text in a string, an array of strings / token ids, or
/// content parts (`[{"type":"text","text":...}]`).
fn text_chars(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::String(s)) => s.chars().count() as u64,
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.chars().count() as u64,
                // A token id counts as one token's worth of characters.
                Value::Number(_) => CHARS_PER_TOKEN,
                Value::Array(_) => text_chars(Some(item)),
                Value::Object(o) => text_chars(o.get("text")),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// The body with `stream_options.include_usage = true`, for streamed
/// requests that did not ask for usage; `None` when nothing needs changing.
pub fn with_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    if v.get("stream").and_then(Value::as_bool) != Some(true) {
        return None;
    }
    let obj = v.as_object_mut()?;
    let options = obj.entry("stream_options").or_insert_with(|| Value::Object(Default::default()));
    let options = options.as_object_mut()?;
    if options.get("include_usage").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    options.insert("include_usage".to_string(), Value::Bool(true));
    serde_json::to_vec(&v).ok()
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
pub fn with_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    v.as_object_mut()?.insert("model".to_string(), Value::String(model.to_string()));
    serde_json::to_vec(&v).ok()
}

/// Usage, `model` and, for answers about stored objects (`stateful`), the
/// object's id from a complete JSON answer. Only usage and model are picked
/// out of other answers, which are not parsed whole (an embeddings answer
/// can be megabytes of floats).
pub fn json_answer(body: &[u8], stateful: bool) -> AnswerFacts {
    let usage = top_level_value(body, b"\"usage\"").and_then(|u| {
        let wrapped = serde_json::json!({ "usage": u });
        Usage::from_json(&wrapped)
    });
    let model = top_level_value(body, b"\"model\"").and_then(|m| m.as_str().map(str::to_string));
    let object_id = if stateful { stored_object_id(body) } else { None };
    AnswerFacts { usage, model, object_id }
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
fn top_level_value(body: &[u8], key: &[u8]) -> Option<Value> {
    let mut end = body.len();
    while let Some(pos) = rfind(body.get(..end)?, key) {
        end = pos;
        if pos > 0 && body.get(pos - 1) == Some(&b'\\') {
            continue;
        }
        let rest = body.get(pos + key.len()..)?;
        let rest = trim_start(rest);
        let Some(rest) = rest.strip_prefix(b":") else { continue };
        let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<Value>();
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
    (0..=hay.len() - needle.len()).rev().find(|&i| hay.get(i..i + needle.len()) == Some(needle))
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
    fn estimates_prompt_and_budget() {
        let f = request_facts(br#"{"messages":[{"role":"user","content":"12345678"},{"role":"user","content":[{"type":"text","text":"abcd"}]}],"max_tokens":100,"n":2,"stream":true}"#);
        assert_eq!(f.estimated_tokens, 3 + 200);
        assert!(f.stream && !f.include_usage);
        assert_eq!(request_facts(br#"{"input":["abcd","efgh"],"model":"emb"}"#).estimated_tokens, 2);
        assert_eq!(request_facts(br#"{"input":[[1,2,3]]}"#).estimated_tokens, 3);
        assert_eq!(request_facts(b"not json at all!").estimated_tokens, 4);
        assert_eq!(request_facts(br#"{"prompt":"x","max_completion_tokens":10}"#).estimated_tokens, 11);
    }

    #[test]
    fn include_usage_is_added_only_when_missing() {
        let out = with_include_usage(br#"{"stream":true,"messages":[]}"#).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert!(with_include_usage(br#"{"stream":true,"stream_options":{"include_usage":true}}"#).is_none());
        assert!(with_include_usage(br#"{"messages":[]}"#).is_none());
        let kept = with_include_usage(br#"{"stream":true,"stream_options":{"x":1}}"#).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&kept).unwrap()["stream_options"]["x"], 1);
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
