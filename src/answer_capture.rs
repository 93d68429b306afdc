//! What a JSON answer's body is kept of on its way to the client: its first
//! and last bytes, never the whole body. OpenAI and Azure answers name their
//! id, object and model first and their usage last, so a few KiB at each end
//! hold everything accounting and affinity read, whatever the answer's size
//! (an embeddings answer can be megabytes of floats) and however many are in
//! flight at once.

use crate::usage::{self, AnswerFacts};

/// Bytes kept from each end of an answer.
pub const KEPT_AT_EACH_END: usize = 16 << 10;

#[derive(Debug, Default)]
pub struct JsonCapture {
    head: Vec<u8>,
    head_cap: usize,
    /// The last bytes seen, once the head is full (at most twice the
    /// kept size before it is trimmed).
    tail: Vec<u8>,
    total: usize,
}

impl JsonCapture {
    /// `text_cap`: bytes of answer text wanted for the log (kept in the head).
    pub fn new(text_cap: usize) -> JsonCapture {
        JsonCapture { head_cap: KEPT_AT_EACH_END.saturating_add(text_cap), ..JsonCapture::default() }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        self.total = self.total.saturating_add(chunk.len());
        let room = self.head_cap.saturating_sub(self.head.len()).min(chunk.len());
        let (to_head, rest) = chunk.split_at(room);
        self.head.extend_from_slice(to_head);
        self.tail.extend_from_slice(rest);
        if self.tail.len() > 2 * KEPT_AT_EACH_END {
            let cut = self.tail.len() - KEPT_AT_EACH_END;
            self.tail.drain(..cut);
        }
    }

    /// The whole answer, when nothing of it was dropped.
    fn whole(&self) -> Option<Vec<u8>> {
        (self.head.len() + self.tail.len() == self.total).then(|| [self.head.as_slice(), &self.tail].concat())
    }

    /// Usage, model and (for answers about stored objects) the object's id.
    pub fn facts(&self, stateful: bool) -> AnswerFacts {
        if let Some(whole) = self.whole() {
            return usage::json_answer(&whole, stateful);
        }
        let end = usage::json_answer(&self.tail, false);
        let start = usage::json_answer(&self.head, false);
        AnswerFacts {
            usage: end.usage,
            model: start.model.or(end.model),
            object_id: if stateful { leading_object_id(&self.head) } else { None },
        }
    }

    /// The answer's first message text (for body logging).
    pub fn text(&self) -> String {
        let whole = self.whole();
        let body = whole.as_deref().unwrap_or(&self.head);
        usage::answer_text(body)
    }
}

/// The top-level `id` of an answer whose top-level `object` names a stored
/// kind, from the start of the answer only (both come first).
fn leading_object_id(head: &[u8]) -> Option<String> {
    let members = top_level_strings(head, &["id", "object"]);
    let [Some(id), Some(object)] = members else { return None };
    crate::stateful::answer_object_id(&object, &id).map(str::to_string)
}

/// The string values of top-level members named in `keys`, from a JSON
/// object that may be cut off anywhere: the scan stops where the bytes end.
pub fn top_level_strings<const N: usize>(body: &[u8], keys: &[&str; N]) -> [Option<String>; N] {
    let mut found: [Option<String>; N] = std::array::from_fn(|_| None);
    let mut at = match body.iter().position(|b| !b.is_ascii_whitespace()) {
        Some(p) if body.get(p) == Some(&b'{') => p + 1,
        _ => return found,
    };
    loop {
        at = skip_whitespace(body, at);
        let Some(key_end) = (body.get(at) == Some(&b'"')).then(|| string_end(body, at)).flatten() else {
            return found;
        };
        let key = body.get(at..key_end);
        at = skip_whitespace(body, key_end);
        if body.get(at) != Some(&b':') {
            return found;
        }
        at = skip_whitespace(body, at + 1);
        let Some(value_end) = value_end(body, at) else { return found };
        if let (Some(key), Some(value)) = (key, body.get(at..value_end)) {
            let key: Option<String> = serde_json::from_slice(key).ok();
            if let Some(slot) = key.and_then(|k| keys.iter().position(|want| *want == k)) {
                if let (Some(place), Ok(text)) = (found.get_mut(slot), serde_json::from_slice::<String>(value)) {
                    *place = Some(text);
                }
            }
        }
        at = skip_whitespace(body, value_end);
        match body.get(at) {
            Some(b',') => at += 1,
            _ => return found,
        }
    }
}

fn skip_whitespace(body: &[u8], mut at: usize) -> usize {
    while body.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

/// End (exclusive) of the string starting at `start` (its opening quote).
fn string_end(body: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match body.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// End (exclusive) of the JSON value starting at `start`; `None` when the
/// bytes end first.
fn value_end(body: &[u8], start: usize) -> Option<usize> {
    match body.get(start)? {
        b'"' => string_end(body, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            loop {
                match body.get(i)? {
                    b'"' => {
                        i = string_end(body, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let len =
                body.get(start..)?.iter().position(|b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace());
            len.map(|n| start + n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Usage;

    fn fed(body: &[u8], piece: usize) -> JsonCapture {
        let mut c = JsonCapture::new(0);
        for chunk in body.chunks(piece) {
            c.feed(chunk);
        }
        c
    }

    #[test]
    fn a_huge_answer_keeps_only_its_ends_and_still_gives_its_facts() {
        let floats = "0.123456,".repeat(400_000);
        let body = format!(
            r#"{{"object":"list","data":[{{"embedding":[{floats}0.1]}}],"model":"text-embedding-3","usage":{{"prompt_tokens":9,"total_tokens":9}}}}"#
        );
        let c = fed(body.as_bytes(), 65_536);
        assert!(c.head.len() + c.tail.len() <= 3 * KEPT_AT_EACH_END, "{}", c.tail.len());
        let f = c.facts(false);
        assert_eq!(f.usage, Some(Usage { prompt: 9, completion: 0, total: 9 }));
        assert_eq!(f.model.as_deref(), Some("text-embedding-3"));
    }

    #[test]
    fn a_long_stored_response_keeps_its_id() {
        let text = "word ".repeat(20_000);
        let body = format!(
            r#"{{"id":"resp_abc","object":"response","model":"gpt-4o","output":[{{"id":"msg_1","content":[{{"text":"{text}"}}]}}],"usage":{{"input_tokens":3,"output_tokens":20000,"total_tokens":20003}}}}"#
        );
        let f = fed(body.as_bytes(), 1000).facts(true);
        assert_eq!(f.object_id.as_deref(), Some("resp_abc"));
        assert_eq!(f.usage.map(|u| u.total), Some(20_003));
        assert_eq!(f.model.as_deref(), Some("gpt-4o"));
    }

    #[test]
    fn small_answers_are_read_whole() {
        let body = br#"{"model":"m","object":"response","id":"resp_1","usage":{"input_tokens":1,"output_tokens":1}}"#;
        let f = fed(body, 7).facts(true);
        assert_eq!((f.object_id.as_deref(), f.usage.map(|u| u.total)), (Some("resp_1"), Some(2)));
    }

    #[test]
    fn top_level_members_are_read_from_a_cut_body() {
        let body = br#" { "id" : "a\"b", "nested": {"id": "no", "x": [1, {"object":"no"}]}, "n": -1.5e3, "object":"response", "cut": "abc"#;
        assert_eq!(
            top_level_strings(body, &["id", "object"]),
            [Some("a\"b".to_string()), Some("response".to_string())]
        );
        let cut = br#"{"id":"x","object"#;
        assert_eq!(top_level_strings(cut, &["id", "object"]), [Some("x".to_string()), None]);
        assert_eq!(top_level_strings(b"[1]", &["id"]), [None]);
        assert_eq!(top_level_strings(b"", &["id"]), [None]);
    }
}
