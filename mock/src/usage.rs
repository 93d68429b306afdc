//! Token usage the mock put into its answers, per deployment, for
//! `/_mock/stats` (`usage`): what a real backend would bill, to check a
//! proxy's own token accounting against.
//!
//! Every admitted answer that carries a usage object counts (a chat or text
//! completion, an embedding, a Responses API create; a stream only when it
//! carries a usage chunk, i.e. the request asked for
//! `stream_options.include_usage`, or a Responses stream's
//! `response.completed`). Answers of stored objects (`GET .../responses/{id}`)
//! replay usage that was already counted and do not count again. An answer
//! whose usage never left the mock because a `reset_after_events` fault cut
//! the body first (a stream cut before its usage event, any cut JSON body)
//! counts in `cut` as well: billed, but no proxy can have seen it.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::state::ReplyBody;

/// Tokens of one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

/// Answers and their tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub answers: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Totals {
    fn add(&mut self, u: Usage) {
        self.answers += 1;
        self.prompt_tokens += u.prompt;
        self.completion_tokens += u.completion;
    }
}

/// One deployment's usage: everything billed, and the part of it in answers
/// cut before their usage was sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeploymentUsage {
    #[serde(flatten)]
    pub billed: Totals,
    pub cut: Totals,
}

/// Usage per deployment (`""` when the request named none).
#[derive(Debug, Default)]
pub struct Tally {
    by_deployment: BTreeMap<String, DeploymentUsage>,
}

impl Tally {
    /// Count an answer's usage (if it has one); `cut_after` is the
    /// `reset_after_events` the answer is delivered with.
    pub fn count(&mut self, deployment: &str, body: &ReplyBody, cut_after: Option<usize>) {
        let Some((usage, position)) = usage_of(body) else { return };
        let entry = self.by_deployment.entry(deployment.to_string()).or_default();
        entry.billed.add(usage);
        // A cut JSON body stops after half its bytes: never parseable. A cut
        // stream stops after `n` events: the usage event is lost when it is
        // the n-th (0-based) or later.
        let lost = match (cut_after, position) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(n), Some(p)) => p >= n,
        };
        if lost {
            entry.cut.add(usage);
        }
    }

    pub fn clear(&mut self) {
        self.by_deployment.clear();
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(&self.by_deployment).unwrap_or(Value::Null)
    }
}

/// The usage an answer carries and, for a stream, the index of the event
/// that carries it (head, content and tail events counted in order).
pub fn usage_of(body: &ReplyBody) -> Option<(Usage, Option<usize>)> {
    match body {
        ReplyBody::Json(v) => usage_in(v.get("usage")?).map(|u| (u, None)),
        ReplyBody::Stream(plan) => {
            let events = plan.head.iter().chain(&plan.content).chain(&plan.tail);
            let found = events.enumerate().filter_map(|(i, e)| event_usage(e).map(|u| (u, Some(i))));
            found.last()
        }
        ReplyBody::Raw { .. } => None,
    }
}

/// The usage in one SSE event: a chat/completion chunk's `usage`, a
/// Responses event's `response.usage`.
fn event_usage(event: &[u8]) -> Option<Usage> {
    let text = std::str::from_utf8(event).ok()?;
    let data = text.lines().find_map(|l| l.strip_prefix("data: "))?;
    let v: Value = serde_json::from_str(data).ok()?;
    v.get("usage").and_then(usage_in).or_else(|| v.pointer("/response/usage").and_then(usage_in))
}

/// `prompt_tokens`/`completion_tokens` (chat, completions, embeddings) or
/// `input_tokens`/`output_tokens` (Responses API); null is no usage.
fn usage_in(u: &Value) -> Option<Usage> {
    let field = |a: &str, b: &str| u.get(a).or_else(|| u.get(b)).and_then(Value::as_u64);
    let prompt = field("prompt_tokens", "input_tokens");
    let completion = field("completion_tokens", "output_tokens");
    (prompt.is_some() || completion.is_some())
        .then(|| Usage { prompt: prompt.unwrap_or(0), completion: completion.unwrap_or(0) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::{self, Ctx};
    use serde_json::json;

    fn ctx() -> Ctx<'static> {
        Ctx { name: "east", id: 1, created: 0, model: "gpt" }
    }

    #[test]
    fn usage_of_json_and_streams() {
        let chat = ReplyBody::Json(openai::chat_completion(&ctx(), 4, 5));
        assert_eq!(usage_of(&chat), Some((Usage { prompt: 4, completion: 5 }, None)));
        let no_usage = ReplyBody::Stream(openai::chat_stream(&ctx(), &json!({"stream": true}), 4, 3));
        assert_eq!(usage_of(&no_usage), None);
        let body = json!({"stream": true, "stream_options": {"include_usage": true}});
        let with_usage = ReplyBody::Stream(openai::chat_stream(&ctx(), &body, 4, 3));
        // role chunk, 3 content chunks, finish chunk, usage chunk (5), [DONE]
        assert_eq!(usage_of(&with_usage), Some((Usage { prompt: 4, completion: 3 }, Some(5))));
        let responses =
            ReplyBody::Json(json!({"object": "response", "usage": {"input_tokens": 7, "output_tokens": 2}}));
        assert_eq!(usage_of(&responses), Some((Usage { prompt: 7, completion: 2 }, None)));
        let queued = ReplyBody::Json(json!({"object": "response", "usage": null}));
        assert_eq!(usage_of(&queued), None);
        let raw = ReplyBody::Raw { content_type: "text/plain", bytes: bytes::Bytes::from_static(b"x") };
        assert_eq!(usage_of(&raw), None);
    }

    #[test]
    fn tally_counts_billed_and_cut() {
        let mut t = Tally::default();
        let body = json!({"stream": true, "stream_options": {"include_usage": true}});
        let stream = || ReplyBody::Stream(openai::chat_stream(&ctx(), &body, 4, 3));
        t.count("gpt", &ReplyBody::Json(openai::chat_completion(&ctx(), 4, 5)), None);
        t.count("gpt", &stream(), Some(6)); // cut after the usage event: delivered
        t.count("gpt", &stream(), Some(5)); // cut right before it: lost
        t.count("gpt", &ReplyBody::Json(openai::chat_completion(&ctx(), 4, 5)), Some(0)); // cut JSON: lost
        t.count("other", &ReplyBody::Stream(openai::chat_stream(&ctx(), &json!({"stream": true}), 4, 3)), None);
        assert_eq!(
            t.to_json(),
            json!({"gpt": {"answers": 4, "prompt_tokens": 16, "completion_tokens": 16,
                           "cut": {"answers": 2, "prompt_tokens": 8, "completion_tokens": 8}}})
        );
        t.clear();
        assert_eq!(t.to_json(), json!({}));
    }
}
