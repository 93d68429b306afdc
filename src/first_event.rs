//! Where a streamed answer stands before its first content: the attempt
//! role holds a stream's head until this says the backend really answers,
//! so a stream that fails first (an error event) is failed over like a 5xx
//! and the client never sees it. After the first content the stream is
//! committed.

/// What the events so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Only metadata so far (Azure's `prompt_filter_results` chunk, a
    /// Responses API `response.created`): keep holding.
    Pending,
    /// Content (or anything not known to be metadata): let it through.
    Content,
    /// The stream failed before any content; `rate_limited` when the error
    /// says the backend's quota is spent.
    Failed { rate_limited: bool },
}

/// Held bytes past which the stream is let through whatever it says: a
/// backend that sends that much metadata is answering.
pub const MAX_HELD_BYTES: usize = 64 * 1024;

/// Classifies the complete events in `held` (the stream's bytes from the
/// start); an incomplete last event waits for more bytes.
pub fn verdict(held: &[u8]) -> Verdict {
    let text = String::from_utf8_lossy(held);
    let normalized = text.replace("\r\n", "\n");
    let mut events: Vec<&str> = normalized.split("\n\n").collect();
    // The part after the last blank line is not a whole event yet.
    events.pop();
    for event in events {
        match classify(event) {
            Verdict::Pending => continue,
            decided => return decided,
        }
    }
    if held.len() > MAX_HELD_BYTES {
        Verdict::Content
    } else {
        Verdict::Pending
    }
}

/// One event's `event:` name and `data:` lines.
fn classify(event: &str) -> Verdict {
    let mut name = "";
    let mut data = String::new();
    for line in event.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            name = v.trim();
        } else if let Some(v) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    if name.is_empty() && data.is_empty() {
        // A comment or keep-alive.
        return Verdict::Pending;
    }
    if matches!(name, "error" | "response.failed") {
        return Verdict::Failed { rate_limited: says_rate_limited(&data) };
    }
    if matches!(name, "response.created" | "response.in_progress" | "response.queued") {
        return Verdict::Pending;
    }
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&data) else {
        // `[DONE]` or text: not ours to judge.
        return Verdict::Content;
    };
    if json.get("error").is_some_and(|e| !e.is_null()) {
        return Verdict::Failed { rate_limited: says_rate_limited(&data) };
    }
    match json.get("choices").and_then(|c| c.as_array()) {
        Some(choices) if choices.is_empty() => Verdict::Pending,
        _ => Verdict::Content,
    }
}

fn says_rate_limited(data: &str) -> bool {
    let lower = data.to_ascii_lowercase();
    ["\"429\"", "ratelimit", "rate_limit", "rate limit", "too_many_requests"].iter().any(|s| lower.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMPT_FILTER: &str = "data: {\"id\":\"\",\"object\":\"\",\"created\":0,\"model\":\"\",\"choices\":[],\"prompt_filter_results\":[{\"prompt_index\":0,\"content_filter_results\":{}}]}\n\n";

    #[test]
    fn azure_metadata_first_then_content() {
        assert_eq!(verdict(b""), Verdict::Pending);
        assert_eq!(verdict(PROMPT_FILTER.as_bytes()), Verdict::Pending);
        let content =
            format!("{PROMPT_FILTER}data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\"}}}}]}}\n\n");
        assert_eq!(verdict(content.as_bytes()), Verdict::Content);
        // Half an event is not an event yet.
        assert_eq!(verdict(&content.as_bytes()[..content.len() - 3]), Verdict::Pending);
        assert_eq!(verdict(b": keep-alive\n\n"), Verdict::Pending);
        assert_eq!(verdict(b"data: [DONE]\n\n"), Verdict::Content);
    }

    #[test]
    fn an_error_before_content_fails_the_stream() {
        let error = format!(
            "{PROMPT_FILTER}data: {{\"error\":{{\"code\":\"server_error\",\"message\":\"The server had an error\"}}}}\r\n\r\n"
        );
        assert_eq!(verdict(error.as_bytes()), Verdict::Failed { rate_limited: false });
        let limited = "event: error\ndata: {\"error\":{\"code\":\"429\",\"message\":\"Rate limit reached\"}}\n\n";
        assert_eq!(verdict(limited.as_bytes()), Verdict::Failed { rate_limited: true });
        // After content, an error is the stream's business (committed).
        let late = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"error\":{}}\n\n";
        assert_eq!(verdict(late.as_bytes()), Verdict::Content);
    }

    #[test]
    fn responses_api_events() {
        let created = "event: response.created\ndata: {\"type\":\"response.created\"}\n\n";
        assert_eq!(verdict(created.as_bytes()), Verdict::Pending);
        let failed = format!("{created}event: response.failed\ndata: {{\"type\":\"response.failed\"}}\n\n");
        assert_eq!(verdict(failed.as_bytes()), Verdict::Failed { rate_limited: false });
        let delta = format!("{created}event: response.output_text.delta\ndata: {{\"delta\":\"Hi\"}}\n\n");
        assert_eq!(verdict(delta.as_bytes()), Verdict::Content);
    }

    #[test]
    fn endless_metadata_is_let_through() {
        let many = PROMPT_FILTER.repeat(MAX_HELD_BYTES / PROMPT_FILTER.len() + 1);
        assert_eq!(verdict(many.as_bytes()), Verdict::Content);
    }
}
