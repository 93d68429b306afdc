//! The Realtime API over a websocket: routes and the (minimal, text-only)
//! protocol. Everything here is pure; the server owns the socket and
//! [`crate::state::Mock::handle_realtime`] decides whether to upgrade.
//!
//! Routes (`GET`, `Connection: Upgrade`, `Upgrade: websocket`):
//!
//! - GA: `/openai/v1/realtime?model=DEPLOYMENT` (also `/v1/realtime`);
//! - preview: `/openai/realtime?api-version=...&deployment=DEPLOYMENT`.
//!
//! After the upgrade the server sends `session.created`, then answers each
//! client event (JSON text frame):
//!
//! | client event | server events |
//! | --- | --- |
//! | `session.update` | `session.updated` (the session with the event's `session` fields merged in) |
//! | `conversation.item.create` | `conversation.item.created` (the item, given an `id` when it had none) |
//! | `response.create` | `response.created`, one `response.output_text.delta` per `stream_chunks` piece of "Hello from NAME ...", `response.output_text.done`, `response.done` (with `usage`) |
//! | anything else, or not JSON | `error` |
//!
//! The preview route names the text events as the preview protocol does:
//! `response.text.delta`, `response.text.done`.

use serde_json::{json, Map, Value};

use crate::openai::{self, Operation};

/// A realtime connection request's route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealtimeRoute {
    /// `/openai/realtime` (needs `api-version`; deployment in `deployment`).
    pub preview: bool,
    /// The query's `model` (GA) or `deployment` (preview); `None` when absent or empty.
    pub deployment: Option<String>,
}

/// `Some` when `method` and `path` name a realtime endpoint.
pub fn parse_route(method: &str, path: &str, query: &str) -> Option<RealtimeRoute> {
    if method != "GET" {
        return None;
    }
    let path = path.strip_suffix('/').unwrap_or(path);
    let preview = match path {
        "/openai/v1/realtime" | "/v1/realtime" => false,
        "/openai/realtime" => true,
        _ => return None,
    };
    let param = if preview { "deployment" } else { "model" };
    let deployment = openai::query_param(query, param).filter(|d| !d.is_empty()).map(str::to_string);
    Some(RealtimeRoute { preview, deployment })
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    name: String,
    preview: bool,
    chunks: usize,
    /// Sleep before each text delta, in ms.
    pub delay_ms: u64,
    id: String,
    config: Map<String, Value>,
    /// Conversation items so far (for ids and the input token estimate).
    items: Vec<Value>,
    next_event: u64,
    next_object: u64,
}

impl Session {
    pub fn new(name: &str, deployment: &str, preview: bool, id: u64, chunks: usize, delay_ms: u64) -> Self {
        let config = json!({
            "type": "realtime",
            "object": "realtime.session",
            "id": format!("sess_{name}_{id}"),
            "model": deployment,
            "output_modalities": ["text"],
            "instructions": "",
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
        });
        let Value::Object(config) = config else { unreachable!("a json! object") };
        Session {
            name: name.to_string(),
            preview,
            chunks: chunks.max(1),
            delay_ms,
            id: format!("{name}_{id}"),
            config,
            items: Vec::new(),
            next_event: 1,
            next_object: 1,
        }
    }

    /// A server event of `kind` with the next `event_id` and `fields`.
    fn event(&mut self, kind: &str, fields: Value) -> Value {
        let mut ev = json!({"type": kind, "event_id": format!("event_{}_{}", self.id, self.next_event)});
        self.next_event += 1;
        if let (Some(ev), Value::Object(fields)) = (ev.as_object_mut(), fields) {
            ev.extend(fields);
        }
        ev
    }

    fn mint(&mut self, prefix: &str) -> String {
        let id = format!("{prefix}_{}_{}", self.id, self.next_object);
        self.next_object += 1;
        id
    }

    /// The first event, sent right after the upgrade.
    pub fn created(&mut self) -> Value {
        let session = Value::Object(self.config.clone());
        self.event("session.created", json!({ "session": session }))
    }

    /// The answer to one text frame: the events to send, each with the delay
    /// (ms) to wait before it.
    pub fn on_text(&mut self, text: &str) -> Vec<(Value, u64)> {
        let Ok(Value::Object(ev)) = serde_json::from_str::<Value>(text) else {
            return vec![(self.error("invalid_json", "The event is not a JSON object.", None), 0)];
        };
        let client_id = ev.get("event_id").cloned();
        match ev.get("type").and_then(Value::as_str).unwrap_or_default() {
            "session.update" => {
                if let Some(Value::Object(fields)) = ev.get("session") {
                    // The id, model and kind stay the server's.
                    for (k, v) in fields.iter().filter(|(k, _)| !matches!(k.as_str(), "id" | "object" | "model")) {
                        self.config.insert(k.clone(), v.clone());
                    }
                }
                let session = Value::Object(self.config.clone());
                vec![(self.event("session.updated", json!({ "session": session })), 0)]
            }
            "conversation.item.create" => match ev.get("item") {
                Some(Value::Object(item)) => {
                    let mut item = item.clone();
                    if !item.get("id").is_some_and(Value::is_string) {
                        item.insert("id".into(), json!(self.mint("item")));
                    }
                    item.entry("object").or_insert(json!("realtime.item"));
                    item.entry("status").or_insert(json!("completed"));
                    let previous = self.items.last().map_or(Value::Null, |i| i["id"].clone());
                    let item = Value::Object(item);
                    self.items.push(item.clone());
                    vec![(
                        self.event("conversation.item.created", json!({"previous_item_id": previous, "item": item})),
                        0,
                    )]
                }
                _ => vec![(
                    self.error("missing_required_parameter", "Missing required parameter: 'item'.", client_id),
                    0,
                )],
            },
            "response.create" => self.respond(),
            "" => vec![(self.error("invalid_request_error", "The event has no 'type'.", client_id), 0)],
            other => {
                let msg = format!("Invalid value: '{other}'. This mock supports session.update, conversation.item.create and response.create.");
                vec![(self.error("invalid_value", &msg, client_id), 0)]
            }
        }
    }

    /// The answer to a binary frame (the protocol only has text frames).
    pub fn on_binary(&mut self) -> Vec<(Value, u64)> {
        vec![(self.error("invalid_request_error", "Binary frames are not supported; send JSON text.", None), 0)]
    }

    fn error(&mut self, code: &str, message: &str, client_event_id: Option<Value>) -> Value {
        let error = json!({
            "type": "invalid_request_error",
            "code": code,
            "message": message,
            "param": null,
            "event_id": client_event_id.unwrap_or(Value::Null),
        });
        self.event("error", json!({ "error": error }))
    }

    /// `response.create`: a text answer in `chunks` deltas.
    fn respond(&mut self) -> Vec<(Value, u64)> {
        let response_id = self.mint("resp");
        let item_id = self.mint("item");
        let pieces = openai::answer_chunks(&self.name, self.chunks);
        let text = pieces.concat();
        let input = openai::estimate_prompt_tokens(Operation::CreateResponse, &json!({ "input": self.items }));
        let output = pieces.len() as u64;
        let base = |status: &str, output_items: Value, usage: Value| {
            json!({
                "object": "realtime.response",
                "id": response_id,
                "status": status,
                "status_details": null,
                "output": output_items,
                "output_modalities": ["text"],
                "conversation_id": "auto",
                "max_output_tokens": "inf",
                "metadata": null,
                "usage": usage,
            })
        };
        let (delta_kind, done_kind) = if self.preview {
            ("response.text.delta", "response.text.done")
        } else {
            ("response.output_text.delta", "response.output_text.done")
        };
        let mut out =
            vec![(self.event("response.created", json!({"response": base("in_progress", json!([]), Value::Null)})), 0)];
        for piece in &pieces {
            let fields = json!({"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece});
            out.push((self.event(delta_kind, fields), self.delay_ms));
        }
        let fields = json!({"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0, "text": text});
        out.push((self.event(done_kind, fields), 0));
        let item = json!({
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": if self.preview { "text" } else { "output_text" }, "text": text}],
        });
        self.items.push(item.clone());
        let usage = json!({
            "total_tokens": input + output,
            "input_tokens": input,
            "output_tokens": output,
            "input_token_details": {"text_tokens": input, "audio_tokens": 0, "cached_tokens": 0},
            "output_token_details": {"text_tokens": output, "audio_tokens": 0},
        });
        out.push((self.event("response.done", json!({"response": base("completed", json!([item]), usage)})), 0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let ga = parse_route("GET", "/openai/v1/realtime", "model=gpt-rt").unwrap();
        assert_eq!(ga, RealtimeRoute { preview: false, deployment: Some("gpt-rt".into()) });
        assert!(!parse_route("GET", "/v1/realtime/", "model=a").unwrap().preview);
        let pv = parse_route("GET", "/openai/realtime", "api-version=2024-10-01-preview&deployment=d").unwrap();
        assert_eq!(pv, RealtimeRoute { preview: true, deployment: Some("d".into()) });
        assert_eq!(parse_route("GET", "/openai/realtime", "model=d").unwrap().deployment, None);
        assert_eq!(parse_route("GET", "/openai/v1/realtime", "model=").unwrap().deployment, None);
        assert_eq!(parse_route("POST", "/openai/v1/realtime", "model=a"), None);
        assert_eq!(parse_route("GET", "/openai/v1/realtimes", "model=a"), None);
    }

    fn kinds(events: &[(Value, u64)]) -> Vec<&str> {
        events.iter().map(|(e, _)| e["type"].as_str().unwrap()).collect()
    }

    #[test]
    fn a_conversation() {
        let mut s = Session::new("eastus", "gpt-rt", false, 7, 3, 5);
        let created = s.created();
        assert_eq!((&created["type"], &created["session"]["model"]), (&json!("session.created"), &json!("gpt-rt")));
        assert_eq!(created["session"]["id"], "sess_eastus_7");
        assert!(created["event_id"].as_str().unwrap().starts_with("event_"));
        let updated = s.on_text(
            r#"{"type":"session.update","session":{"type":"realtime","instructions":"be brief","model":"x"}}"#,
        );
        assert_eq!(kinds(&updated), ["session.updated"]);
        assert_eq!(
            (&updated[0].0["session"]["instructions"], &updated[0].0["session"]["model"]),
            (&json!("be brief"), &json!("gpt-rt"))
        );
        let item = r#"{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"12345678"}]}}"#;
        let created = s.on_text(item);
        assert_eq!(kinds(&created), ["conversation.item.created"]);
        let item = &created[0].0["item"];
        assert!(item["id"].as_str().unwrap().starts_with("item_"), "{item}");
        assert_eq!(
            (&item["content"][0]["text"], &created[0].0["previous_item_id"]),
            (&json!("12345678"), &Value::Null)
        );
        let answer = s.on_text(r#"{"type":"response.create"}"#);
        assert_eq!(
            kinds(&answer),
            [
                "response.created",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.done"
            ]
        );
        assert_eq!(answer.iter().map(|(_, d)| *d).collect::<Vec<_>>(), [0, 5, 5, 5, 0, 0]);
        let deltas: String = answer[1..4].iter().map(|(e, _)| e["delta"].as_str().unwrap()).collect();
        assert_eq!(deltas, "Hello from eastus ");
        let done = &answer[5].0["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["output"][0]["content"][0]["text"], "Hello from eastus ");
        let usage = &done["usage"];
        assert_eq!(usage["output_tokens"], 3);
        assert!(usage["input_tokens"].as_u64().unwrap() >= 2, "{usage}");
        assert_eq!(usage["total_tokens"], usage["input_tokens"].as_u64().unwrap() + 3);
        // Ids are unique across events.
        let ids: std::collections::BTreeSet<&str> =
            answer.iter().map(|(e, _)| e["event_id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), answer.len());
    }

    #[test]
    fn preview_names_and_errors() {
        let mut s = Session::new("west", "d", true, 1, 1, 0);
        let answer = s.on_text(r#"{"type":"response.create"}"#);
        assert_eq!(kinds(&answer), ["response.created", "response.text.delta", "response.text.done", "response.done"]);
        assert_eq!(answer[1].0["delta"], "Hello from west ");
        for bad in [
            "nope",
            "[1]",
            r#"{"type":"bogus","event_id":"c1"}"#,
            r#"{"x":1}"#,
            r#"{"type":"conversation.item.create"}"#,
        ] {
            let out = s.on_text(bad);
            assert_eq!(kinds(&out), ["error"], "{bad}");
        }
        assert_eq!(s.on_text(r#"{"type":"bogus","event_id":"c1"}"#)[0].0["error"]["event_id"], "c1");
        assert_eq!(kinds(&s.on_binary()), ["error"]);
    }
}
