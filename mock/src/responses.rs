//! The Responses API: response objects, their SSE events, and the store of
//! the responses this backend created.
//!
//! Like an Azure OpenAI resource, a mock keeps the responses it created (the
//! newest [`store::MAX_STORED`]), so a follow-up (`previous_response_id`), a
//! retrieval, a deletion, a cancellation or an input-item listing only works
//! on the backend that created the response. Anywhere else it fails as on
//! Azure: 400 `previous_response_not_found` for a follow-up, 404 for the
//! others. Ids (`resp_`/`msg_` + 48 hex digits) are random-looking and say
//! nothing about the backend (see [`crate::store`]).
//!
//! Everything here is pure (no I/O); the request checks, quota and faults
//! are applied by [`crate::state`] as for any other operation.

use serde_json::{json, Value};

use crate::openai::{self, invalid_request, Ctx, Operation, StreamPlan};
use crate::state::{Refusal, ReplyBody};
use crate::store::{self, Bounded, Ids};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// A background response nobody has looked at yet.
    Queued,
    Completed,
    Cancelled,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Completed => "completed",
            Status::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug)]
struct Stored {
    /// The response object once completed (output and usage included).
    completed: Value,
    /// The answer's stream pieces, to replay the events.
    pieces: Vec<String>,
    input_items: Vec<Value>,
    /// 1 for a first response, previous turn + 1 for a follow-up.
    turn: u64,
    background: bool,
    status: Status,
}

impl Stored {
    /// The response as a client sees it now.
    fn view(&self) -> Value {
        match self.status {
            Status::Completed => self.completed.clone(),
            other => unfinished(&self.completed, other.name()),
        }
    }

    /// A queued (background) response completes as soon as it is looked at.
    fn settle(&mut self) {
        if self.status == Status::Queued {
            self.status = Status::Completed;
        }
    }
}

/// `completed` as it looks before it is: `status`, no output, no usage.
fn unfinished(completed: &Value, status: &str) -> Value {
    let mut v = completed.clone();
    v["status"] = json!(status);
    v["output"] = json!([]);
    v["usage"] = Value::Null;
    v
}

/// The responses one mock created, by id (the newest [`store::MAX_STORED`]).
#[derive(Debug)]
pub struct ResponseStore {
    ids: Ids,
    by_id: Bounded<Stored>,
}

impl ResponseStore {
    pub fn new(name: &str) -> Self {
        ResponseStore { ids: Ids::new(name), by_id: Bounded::default() }
    }

    /// Responses currently stored.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// `{prefix}_` + 48 hex digits, unique within and across mock processes.
    fn mint(&mut self, prefix: &str) -> String {
        format!("{prefix}_{}", self.ids.hex(3))
    }

    /// The checks of a create before quota admission: `previous_response_id`
    /// must name a response stored here, and `background` needs `store`.
    pub fn validate(&self, body: &Value) -> Result<(), Refusal> {
        if let Some(prev) = body.get("previous_response_id").filter(|v| !v.is_null()) {
            if !prev.as_str().is_some_and(|id| self.by_id.contains(id)) {
                let shown = prev.as_str().map_or_else(|| prev.to_string(), str::to_string);
                return Err((400, previous_not_found(&shown)));
            }
        }
        if flag(body, "background", false) && !flag(body, "store", true) {
            return Err((400, invalid_request("Background mode requires store=true.", Some("background"), None)));
        }
        Ok(())
    }

    /// The 200 body of an admitted create; the response is stored unless
    /// `store: false`. A background create answers `queued`.
    pub fn create(&mut self, ctx: &Ctx, body: &Value, input_tokens: u64, chunks: usize) -> ReplyBody {
        let turn = self.previous_turn(body) + 1;
        let (id, msg_id) = (self.mint("resp"), self.mint("msg"));
        let pieces = answer_pieces(ctx.name, chunks, turn);
        let message = message_item(&msg_id, "completed", vec![text_part(&pieces.concat())]);
        let usage = usage(input_tokens, pieces.len() as u64);
        let completed = response_object(ctx, &id, body, message, usage);
        let stream = openai::wants_stream(body);
        let background = flag(body, "background", false);
        let status = if background && !stream { Status::Queued } else { Status::Completed };
        let stored = Stored { completed, pieces, input_items: self.input_items(body), turn, background, status };
        let reply = if stream {
            ReplyBody::Stream(events(&stored.completed, &stored.pieces))
        } else {
            ReplyBody::Json(stored.view())
        };
        if flag(body, "store", true) {
            self.by_id.insert(id, stored);
        }
        reply
    }

    /// The turn of the `previous_response_id` response (0 without one).
    fn previous_turn(&mut self, body: &Value) -> u64 {
        let previous = body.get("previous_response_id").and_then(Value::as_str);
        previous.and_then(|id| self.by_id.get_mut(id)).map_or(0, |s| {
            s.settle();
            s.turn
        })
    }

    /// The request's `input` as stored items, each with an id; a string
    /// input is one user message.
    fn input_items(&mut self, body: &Value) -> Vec<Value> {
        match body.get("input") {
            Some(Value::String(text)) => vec![self.input_item(&json!({"role": "user", "content": text}))],
            Some(Value::Array(items)) => items.iter().map(|i| self.input_item(i)).collect(),
            _ => Vec::new(),
        }
    }

    /// An input item as the API lists it: messages get `type`, `status` and
    /// content parts; every item gets an id.
    fn input_item(&mut self, item: &Value) -> Value {
        let Value::Object(map) = item else { return item.clone() };
        let mut map = map.clone();
        if let Some(role) = map.get("role").and_then(Value::as_str).map(str::to_string) {
            map.entry("type").or_insert_with(|| json!("message"));
            map.entry("status").or_insert_with(|| json!("completed"));
            if let Some(text) = map.get("content").and_then(Value::as_str).map(str::to_string) {
                let kind = if role == "assistant" { "output_text" } else { "input_text" };
                map.insert("content".into(), json!([{"type": kind, "text": text}]));
            }
        }
        let prefix = if map.get("type").and_then(Value::as_str) == Some("message") { "msg" } else { "item" };
        map.entry("id").or_insert_with(|| json!(self.mint(prefix)));
        Value::Object(map)
    }

    /// A request on the stored response `id` (GET, DELETE, cancel,
    /// input_items): status and body; 404 when this backend has no such response.
    pub fn act(&mut self, op: Operation, id: &str, query: &str) -> (u16, ReplyBody) {
        let Some(stored) = self.by_id.get_mut(id) else {
            return (404, ReplyBody::Json(response_not_found(id)));
        };
        match op {
            Operation::GetResponse => {
                stored.settle();
                (200, retrieve(stored, query))
            }
            Operation::CancelResponse => cancel(stored),
            Operation::ListInputItems => {
                (200, ReplyBody::Json(store::list_page(stored.input_items.iter().collect(), query, 20, 100)))
            }
            Operation::DeleteResponse => {
                self.by_id.remove(id);
                (200, ReplyBody::Json(json!({"id": id, "object": "response.deleted", "deleted": true})))
            }
            _ => (404, ReplyBody::Json(openai::resource_not_found())),
        }
    }
}

/// GET: the response, or with `stream=true` its events after `starting_after`
/// (a cancelled response has none: its JSON).
fn retrieve(stored: &Stored, query: &str) -> ReplyBody {
    if openai::query_param(query, "stream") != Some("true") || stored.status != Status::Completed {
        return ReplyBody::Json(stored.view());
    }
    let plan = events(&stored.completed, &stored.pieces);
    // Events after sequence number N: skip N + 1 of them.
    let skip = openai::query_param(query, "starting_after")
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(0, |n| n.saturating_add(1));
    ReplyBody::Stream(plan.skip(skip))
}

/// Only a background response can be cancelled; a finished one stays as it is.
fn cancel(stored: &mut Stored) -> (u16, ReplyBody) {
    if !stored.background {
        return (400, ReplyBody::Json(invalid_request("Cannot cancel a synchronous response.", None, None)));
    }
    if stored.status == Status::Queued {
        stored.status = Status::Cancelled;
    }
    (200, ReplyBody::Json(stored.view()))
}

fn flag(body: &Value, key: &str, default: bool) -> bool {
    body.get(key).and_then(Value::as_bool).unwrap_or(default)
}

/// A request field echoed in the response, or its default.
fn echo(body: &Value, key: &str, default: Value) -> Value {
    body.get(key).filter(|v| !v.is_null()).cloned().unwrap_or(default)
}

/// The answer's stream pieces ([`openai::answer_chunks`]) joined give the
/// whole text: no trailing space, and on a follow-up the turn, e.g.
/// "Hello from eastus part3 part4 (turn 2)".
fn answer_pieces(name: &str, chunks: usize, turn: u64) -> Vec<String> {
    let mut pieces = openai::answer_chunks(name, chunks);
    if let Some(last) = pieces.last_mut() {
        last.truncate(last.trim_end().len());
        if turn > 1 {
            last.push_str(&format!(" (turn {turn})"));
        }
    }
    pieces
}

fn usage(input: u64, output: u64) -> Value {
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input + output
    })
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn message_item(id: &str, status: &str, content: Vec<Value>) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

/// A completed response object with the fields the API (and the `openai`
/// SDK's `Response` model) has; request settings are echoed.
fn response_object(ctx: &Ctx, id: &str, body: &Value, message: Value, usage: Value) -> Value {
    json!({
        "id": id,
        "object": "response",
        "created_at": ctx.created,
        "status": "completed",
        "background": flag(body, "background", false),
        "error": null,
        "incomplete_details": null,
        "instructions": echo(body, "instructions", Value::Null),
        "max_output_tokens": echo(body, "max_output_tokens", Value::Null),
        "metadata": echo(body, "metadata", json!({})),
        "model": ctx.model,
        "output": [message],
        "parallel_tool_calls": echo(body, "parallel_tool_calls", json!(true)),
        "previous_response_id": echo(body, "previous_response_id", Value::Null),
        "reasoning": {"effort": null, "summary": null},
        "service_tier": "default",
        "store": flag(body, "store", true),
        "temperature": echo(body, "temperature", json!(1.0)),
        "text": echo(body, "text", json!({"format": {"type": "text"}})),
        "tool_choice": echo(body, "tool_choice", json!("auto")),
        "tools": echo(body, "tools", json!([])),
        "top_p": echo(body, "top_p", json!(1.0)),
        "truncation": echo(body, "truncation", json!("disabled")),
        "usage": usage,
        "user": echo(body, "user", Value::Null)
    })
}

/// An event of `kind` with `fields`; numbered later.
fn event(kind: &str, fields: Value) -> Value {
    let mut v = fields;
    v["type"] = json!(kind);
    v
}

/// `fields` plus the position of the answer's text part.
fn at_text(item_id: &Value, fields: Value) -> Value {
    let mut v = fields;
    v["item_id"] = item_id.clone();
    v["output_index"] = json!(0);
    v["content_index"] = json!(0);
    v
}

/// The SSE events of a streamed create (and of a retrieval replay), with
/// `sequence_number` 0, 1, ...: `response.created`, `response.in_progress`,
/// `response.output_item.added`, `response.content_part.added`, one
/// `response.output_text.delta` per piece, `response.output_text.done`,
/// `response.content_part.done`, `response.output_item.done`,
/// `response.completed` (the whole response, usage included). No `[DONE]`.
pub fn events(completed: &Value, pieces: &[String]) -> StreamPlan {
    let item = completed.pointer("/output/0").cloned().unwrap_or(Value::Null);
    let id = item["id"].clone();
    let text = pieces.concat();
    let in_progress = unfinished(completed, "in_progress");
    let head = vec![
        event("response.created", json!({"response": in_progress})),
        event("response.in_progress", json!({"response": in_progress})),
        event("response.output_item.added", json!({"output_index": 0, "item": announced_item(&item)})),
        event("response.content_part.added", at_text(&id, json!({"part": text_part("")}))),
    ];
    let content = pieces
        .iter()
        .map(|p| event("response.output_text.delta", at_text(&id, json!({"delta": p, "logprobs": []}))))
        .collect();
    let tail = vec![
        event("response.output_text.done", at_text(&id, json!({"text": text, "logprobs": []}))),
        event("response.content_part.done", at_text(&id, json!({"part": text_part(&text)}))),
        event("response.output_item.done", json!({"output_index": 0, "item": item})),
        event("response.completed", json!({"response": completed})),
    ];
    numbered([head, content, tail])
}

/// The message item as first announced: in progress, no content yet.
fn announced_item(item: &Value) -> Value {
    message_item(item["id"].as_str().unwrap_or_default(), "in_progress", Vec::new())
}

/// Number the events in order and frame them as named SSE events.
fn numbered(groups: [Vec<Value>; 3]) -> StreamPlan {
    let mut seq = 0u64;
    let [head, content, tail] = groups.map(|group| {
        group
            .into_iter()
            .map(|mut v| {
                v["sequence_number"] = json!(seq);
                seq += 1;
                openai::sse_named_event(&v)
            })
            .collect::<Vec<_>>()
    });
    StreamPlan { head, content, tail }
}

/// 400 body of a follow-up whose `previous_response_id` this backend does not have.
pub fn previous_not_found(id: &str) -> Value {
    invalid_request(
        &format!("Previous response with id '{id}' not found."),
        Some("previous_response_id"),
        Some("previous_response_not_found"),
    )
}

/// 404 body for a response id this backend does not have.
pub fn response_not_found(id: &str) -> Value {
    invalid_request(&format!("Response with id '{id}' not found."), None, None)
}

/// A stream's events as (`event:` name, parsed `data:`), checking the name
/// is the data's `type` and that no `[DONE]` is sent.
#[cfg(test)]
pub fn parse_events(plan: &StreamPlan) -> Vec<(String, Value)> {
    plan.all()
        .map(|b| {
            let text = std::str::from_utf8(b).unwrap();
            let (name_line, rest) = text.split_once('\n').unwrap();
            let name = name_line.strip_prefix("event: ").unwrap().to_string();
            let data: Value = serde_json::from_str(rest.strip_prefix("data: ").unwrap().trim_end()).unwrap();
            assert_eq!(data["type"], name.as_str(), "{text}");
            assert!(text.ends_with("\n\n"), "{text:?}");
            (name, data)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx<'static> {
        Ctx { name: "eastus", id: 1, created: 1_700_000_000, model: "gpt-4o" }
    }

    fn json_of(body: ReplyBody) -> Value {
        match body {
            ReplyBody::Json(v) => v,
            other => panic!("not JSON: {other:?}"),
        }
    }

    fn plan_of(body: ReplyBody) -> StreamPlan {
        match body {
            ReplyBody::Stream(p) => p,
            other => panic!("not a stream: {other:?}"),
        }
    }

    #[test]
    fn ids_are_opaque_and_unique() {
        let mut a = ResponseStore::new("eastus");
        let mut b = ResponseStore::new("eastus");
        let ids: Vec<String> = (0..50).map(|_| a.mint("resp")).chain((0..50).map(|_| b.mint("resp"))).collect();
        for id in &ids {
            let hex = id.strip_prefix("resp_").unwrap();
            assert_eq!(hex.len(), 48, "{id}");
            assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
            assert!(!id.contains("eastus"));
        }
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "two stores never mint the same id");
    }

    #[test]
    fn response_object_shape() {
        let mut store = ResponseStore::new("eastus");
        let body = json!({"model": "gpt-4o", "input": "hi", "instructions": "be brief", "max_output_tokens": 50});
        let v = json_of(store.create(&ctx(), &body, 3, 5));
        for key in ["id", "created_at", "model", "object", "output", "parallel_tool_calls", "tool_choice", "tools"] {
            assert!(!v[key].is_null(), "{key} missing: {v}");
        }
        assert_eq!(
            (&v["object"], &v["status"], &v["created_at"]),
            (&json!("response"), &json!("completed"), &json!(1_700_000_000))
        );
        assert_eq!((&v["instructions"], &v["max_output_tokens"]), (&json!("be brief"), &json!(50)));
        assert_eq!((&v["previous_response_id"], &v["store"]), (&Value::Null, &json!(true)));
        let msg = &v["output"][0];
        assert!(msg["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(
            (&msg["type"], &msg["role"], &msg["status"]),
            (&json!("message"), &json!("assistant"), &json!("completed"))
        );
        assert_eq!(
            msg["content"][0],
            json!({"type": "output_text", "text": "Hello from eastus part3 part4", "annotations": [], "logprobs": []})
        );
        let usage = json!({
            "input_tokens": 3, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 8
        });
        assert_eq!(v["usage"], usage);
    }

    #[test]
    fn stream_events_in_order() {
        let mut store = ResponseStore::new("eastus");
        let plan = plan_of(store.create(&ctx(), &json!({"input": "hi", "stream": true}), 2, 3));
        assert_eq!((plan.head.len(), plan.content.len(), plan.tail.len()), (4, 3, 4));
        let ev = parse_events(&plan);
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, (_, data)) in ev.iter().enumerate() {
            assert_eq!(data["sequence_number"], i);
        }
        let created = &ev[0].1["response"];
        let done = &ev[10].1["response"];
        assert!(created["id"].as_str().unwrap().starts_with("resp_"));
        assert_eq!(created["id"], done["id"]);
        assert_eq!(
            (&created["status"], &created["usage"], &created["output"]),
            (&json!("in_progress"), &Value::Null, &json!([]))
        );
        assert_eq!(done["status"], "completed");
        assert_eq!(done["usage"]["total_tokens"], 5);
        let item_id = &done["output"][0]["id"];
        let deltas: String = ev[4..7]
            .iter()
            .map(|(_, d)| {
                assert_eq!((&d["item_id"], &d["output_index"], &d["content_index"]), (item_id, &json!(0), &json!(0)));
                d["delta"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(deltas, "Hello from eastus");
        assert_eq!(ev[7].1["text"], "Hello from eastus");
        assert_eq!(ev[2].1["item"]["status"], "in_progress");
        assert_eq!(ev[9].1["item"], done["output"][0]);
        assert!(!plan.all().any(|b| b.as_ref() == openai::SSE_DONE));
    }

    #[test]
    fn follow_ups_count_turns() {
        assert_eq!(answer_pieces("x", 3, 1).concat(), "Hello from x");
        assert_eq!(answer_pieces("x", 1, 3), ["Hello from x (turn 3)"]);
        let mut store = ResponseStore::new("eastus");
        let first = json_of(store.create(&ctx(), &json!({"input": "a"}), 1, 3));
        let follow = json!({"input": "b", "previous_response_id": first["id"]});
        assert_eq!(store.validate(&follow), Ok(()));
        let second = json_of(store.create(&ctx(), &follow, 1, 3));
        assert_eq!(second["output"][0]["content"][0]["text"], "Hello from eastus (turn 2)");
        assert_eq!(second["previous_response_id"], first["id"]);
        let third = json_of(store.create(&ctx(), &json!({"previous_response_id": second["id"]}), 1, 3));
        assert_eq!(third["output"][0]["content"][0]["text"], "Hello from eastus (turn 3)");
        let (status, err) = store.validate(&json!({"previous_response_id": "resp_nope"})).unwrap_err();
        assert_eq!(status, 400);
        assert_eq!(err, previous_not_found("resp_nope"));
        assert_eq!(store.validate(&json!({"previous_response_id": 5})).unwrap_err().1, previous_not_found("5"));
        assert_eq!(store.validate(&json!({"previous_response_id": null})), Ok(()));
        assert_eq!(store.validate(&json!({"background": true, "store": false})).unwrap_err().0, 400);
    }

    #[test]
    fn input_items_listing() {
        let mut store = ResponseStore::new("eastus");
        let input = json!([
            {"role": "system", "content": "s"},
            {"type": "message", "role": "assistant", "content": "a"},
            {"role": "user", "content": [{"type": "input_text", "text": "u"}]},
            {"type": "function_call_output", "call_id": "c1", "output": "42", "id": "fco_1"}
        ]);
        let v = json_of(store.create(&ctx(), &json!({"input": input}), 1, 1));
        let id = v["id"].as_str().unwrap();
        let list = |store: &mut ResponseStore, q: &str| json_of(store.act(Operation::ListInputItems, id, q).1);
        let all = list(&mut store, "");
        let data = all["data"].as_array().unwrap();
        assert_eq!(data.len(), 4);
        // Newest first by default.
        assert_eq!(data[0]["id"], "fco_1");
        assert_eq!(data[3]["content"], json!([{"type": "input_text", "text": "s"}]));
        assert_eq!((&data[3]["type"], &data[3]["status"]), (&json!("message"), &json!("completed")));
        assert_eq!(data[2]["content"], json!([{"type": "output_text", "text": "a"}]));
        assert!(data[3]["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(
            (&all["first_id"], &all["last_id"], &all["has_more"]),
            (&data[0]["id"], &data[3]["id"], &json!(false))
        );
        let page = list(&mut store, "order=asc&limit=2");
        assert_eq!((page["data"].as_array().unwrap().len(), &page["has_more"]), (2, &json!(true)));
        assert_eq!(page["first_id"], data[3]["id"]);
        let after = format!("order=asc&after={}", page["last_id"].as_str().unwrap());
        let rest = list(&mut store, &after);
        assert_eq!(
            (&rest["first_id"], &rest["last_id"], &rest["has_more"]),
            (&data[1]["id"], &json!("fco_1"), &json!(false))
        );
        let text = json_of(store.create(&ctx(), &json!({"input": "hello"}), 1, 1));
        let items = json_of(store.act(Operation::ListInputItems, text["id"].as_str().unwrap(), "").1);
        assert_eq!(items["data"][0]["content"], json!([{"type": "input_text", "text": "hello"}]));
        assert_eq!(items["data"][0]["role"], "user");
    }

    #[test]
    fn the_store_is_bounded() {
        let mut store = ResponseStore::new("eastus");
        let first = json_of(store.create(&ctx(), &json!({"input": "a"}), 1, 1));
        for _ in 0..store::MAX_STORED {
            store.create(&ctx(), &json!({"input": "b", "store": true}), 1, 1);
        }
        assert_eq!(store.len(), store::MAX_STORED);
        let (status, _) = store.act(Operation::GetResponse, first["id"].as_str().unwrap(), "");
        assert_eq!(status, 404, "the oldest was forgotten");
    }

    #[test]
    fn cancel_and_replay() {
        let mut store = ResponseStore::new("eastus");
        let sync = json_of(store.create(&ctx(), &json!({"input": "a"}), 1, 2));
        let (status, body) = store.act(Operation::CancelResponse, sync["id"].as_str().unwrap(), "");
        assert_eq!(
            (status, json_of(body)["error"]["message"].clone()),
            (400, json!("Cannot cancel a synchronous response."))
        );
        let bg = json_of(store.create(&ctx(), &json!({"input": "a", "background": true}), 1, 2));
        let id = bg["id"].as_str().unwrap();
        let (status, body) = store.act(Operation::CancelResponse, id, "");
        assert_eq!((status, json_of(body)["status"].clone()), (200, json!("cancelled")));
        // Cancelled stays cancelled; a stream request gets the JSON.
        let (_, body) = store.act(Operation::GetResponse, id, "stream=true");
        assert_eq!(json_of(body)["status"], "cancelled");
        // Replays: all events, or those after a sequence number.
        let sid = sync["id"].as_str().unwrap();
        let all = parse_events(&plan_of(store.act(Operation::GetResponse, sid, "stream=true").1));
        assert_eq!(all.len(), 4 + 2 + 4);
        let tail = parse_events(&plan_of(store.act(Operation::GetResponse, sid, "stream=true&starting_after=5").1));
        assert_eq!(tail.iter().map(|(_, d)| d["sequence_number"].as_u64().unwrap()).collect::<Vec<_>>(), [6, 7, 8, 9]);
        assert_eq!(tail.last().unwrap().1["response"], sync);
    }
}
