//! OpenAI / Azure OpenAI wire format: routes, token estimates, response bodies
//! and server-sent-event streams. Everything here is pure (no I/O).

use bytes::Bytes;
use serde_json::{json, Value};

use crate::multipart::Form;
use crate::state::Refusal;

/// Default `api-version` named in messages when the request has none (v1 routes).
pub const DEFAULT_API_VERSION: &str = "2024-10-21";

/// A data-plane operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
    ImageGenerations,
    /// `POST .../responses`
    CreateResponse,
    /// `GET .../responses/{id}`
    GetResponse,
    /// `DELETE .../responses/{id}`
    DeleteResponse,
    /// `POST .../responses/{id}/cancel`
    CancelResponse,
    /// `GET .../responses/{id}/input_items`
    ListInputItems,
    /// `POST .../files` (multipart)
    CreateFile,
    /// `GET .../files`
    ListFiles,
    /// `GET .../files/{id}`
    GetFile,
    /// `DELETE .../files/{id}`
    DeleteFile,
    /// `GET .../files/{id}/content`
    GetFileContent,
    /// `POST .../batches`
    CreateBatch,
    /// `GET .../batches`
    ListBatches,
    /// `GET .../batches/{id}`
    GetBatch,
    /// `POST .../batches/{id}/cancel`
    CancelBatch,
    /// `POST .../audio/transcriptions` (multipart)
    AudioTranscriptions,
    /// `POST .../audio/translations` (multipart)
    AudioTranslations,
    /// `POST .../images/edits` (multipart)
    ImageEdits,
    /// `GET .../realtime` (a websocket upgrade)
    Realtime,
}

impl Operation {
    /// The operation a deployment path (or a v1 path, a batch line's `url`) ends with.
    pub fn from_suffix(s: &str) -> Option<Self> {
        match s {
            "chat/completions" => Some(Operation::ChatCompletions),
            "completions" => Some(Operation::Completions),
            "embeddings" => Some(Operation::Embeddings),
            "images/generations" => Some(Operation::ImageGenerations),
            "images/edits" => Some(Operation::ImageEdits),
            "audio/transcriptions" => Some(Operation::AudioTranscriptions),
            "audio/translations" => Some(Operation::AudioTranslations),
            _ => None,
        }
    }

    /// Azure's operation name as used in rate-limit messages.
    pub fn azure_name(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "ChatCompletions_Create",
            Operation::Completions => "Completions_Create",
            Operation::Embeddings => "Embeddings_Create",
            Operation::ImageGenerations => "ImageGenerations_Create",
            Operation::CreateResponse => "Responses_Create",
            Operation::GetResponse => "Responses_Get",
            Operation::DeleteResponse => "Responses_Delete",
            Operation::CancelResponse => "Responses_Cancel",
            Operation::ListInputItems => "Responses_ListInputItems",
            Operation::CreateFile => "Files_Upload",
            Operation::ListFiles => "Files_List",
            Operation::GetFile => "Files_Get",
            Operation::DeleteFile => "Files_Delete",
            Operation::GetFileContent => "Files_GetContent",
            Operation::CreateBatch => "Batch_Create",
            Operation::ListBatches => "Batch_List",
            Operation::GetBatch => "Batch_Get",
            Operation::CancelBatch => "Batch_Cancel",
            Operation::AudioTranscriptions => "Transcriptions_Create",
            Operation::AudioTranslations => "Translations_Create",
            Operation::ImageEdits => "ImageEdits_Create",
            Operation::Realtime => "Realtime_Connect",
        }
    }

    /// Whether the request body is a `multipart/form-data` form (not JSON).
    pub fn takes_form(self) -> bool {
        matches!(
            self,
            Operation::CreateFile
                | Operation::AudioTranscriptions
                | Operation::AudioTranslations
                | Operation::ImageEdits
        )
    }

    /// Whether `"stream": true` in the body is honoured for this operation.
    pub fn can_stream(self) -> bool {
        matches!(self, Operation::ChatCompletions | Operation::Completions | Operation::CreateResponse)
    }
}

/// A parsed data-plane path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/openai/deployments/{deployment}/{op}` (requires `api-version`).
    Classic { deployment: String, op: Operation },
    /// `/openai/v1/{op}` or `/v1/{op}`, and the classic `/openai/responses`
    /// (which requires `api-version`): the deployment is the body's (or
    /// form's) `model`.
    ModelInBody { op: Operation, needs_api_version: bool },
    /// This backend's stored objects, no deployment: `.../responses/{id}`
    /// and its `/cancel`, `/input_items`; `.../files`, `.../files/{id}` and
    /// its `/content`; `.../batches`, `.../batches/{id}` and its `/cancel`.
    /// `id` is the object's, `None` for a create or a list.
    Stored { id: Option<String>, op: Operation, needs_api_version: bool },
}

impl Route {
    pub fn op(&self) -> Operation {
        match self {
            Route::Classic { op, .. } | Route::ModelInBody { op, .. } | Route::Stored { op, .. } => *op,
        }
    }

    /// Whether the route requires an `api-version` query parameter.
    pub fn needs_api_version(&self) -> bool {
        match self {
            Route::Classic { .. } => true,
            Route::ModelInBody { needs_api_version, .. } | Route::Stored { needs_api_version, .. } => {
                *needs_api_version
            }
        }
    }
}

/// Parse a request's method and path (without query string) into a
/// data-plane route; `None`: not one (404, no fault used).
pub fn parse_route(method: &str, path: &str) -> Option<Route> {
    let path = path.strip_suffix('/').unwrap_or(path);
    if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        let (deployment, suffix) = rest.split_once('/')?;
        if deployment.is_empty() || method != "POST" {
            return None;
        }
        let op = Operation::from_suffix(suffix)?;
        return Some(Route::Classic { deployment: deployment.to_string(), op });
    }
    if let Some(suffix) = path.strip_prefix("/openai/v1/").or_else(|| path.strip_prefix("/v1/")) {
        if let Some(op) = Operation::from_suffix(suffix) {
            return (method == "POST").then_some(Route::ModelInBody { op, needs_api_version: false });
        }
        return object_route(method, suffix, false);
    }
    object_route(method, path.strip_prefix("/openai/")?, true)
}

/// `{collection}`, `{collection}/{id}`, `{collection}/{id}/{action}` for the
/// stored-object APIs (responses, files, batches).
fn object_route(method: &str, suffix: &str, needs_api_version: bool) -> Option<Route> {
    let mut segments = suffix.splitn(3, '/');
    let collection = segments.next()?;
    let id = segments.next();
    if id == Some("") {
        return None;
    }
    let op = object_op(collection, method, id.is_some(), segments.next().unwrap_or(""))?;
    Some(match op {
        // A create is charged like a chat completion: its deployment is the body's model.
        Operation::CreateResponse => Route::ModelInBody { op, needs_api_version },
        _ => Route::Stored { id: id.map(str::to_string), op, needs_api_version },
    })
}

fn object_op(collection: &str, method: &str, has_id: bool, action: &str) -> Option<Operation> {
    Some(match (collection, method, has_id, action) {
        ("responses", "POST", false, "") => Operation::CreateResponse,
        ("responses", "GET", true, "") => Operation::GetResponse,
        ("responses", "DELETE", true, "") => Operation::DeleteResponse,
        ("responses", "POST", true, "cancel") => Operation::CancelResponse,
        ("responses", "GET", true, "input_items") => Operation::ListInputItems,
        ("files", "POST", false, "") => Operation::CreateFile,
        ("files", "GET", false, "") => Operation::ListFiles,
        ("files", "GET", true, "") => Operation::GetFile,
        ("files", "DELETE", true, "") => Operation::DeleteFile,
        ("files", "GET", true, "content") => Operation::GetFileContent,
        ("batches", "POST", false, "") => Operation::CreateBatch,
        ("batches", "GET", false, "") => Operation::ListBatches,
        ("batches", "GET", true, "") => Operation::GetBatch,
        ("batches", "POST", true, "cancel") => Operation::CancelBatch,
        _ => return None,
    })
}

/// Value of query parameter `name` in a raw query string (no percent-decoding).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

fn count_text(v: &Value, chars: &mut u64, tokens: &mut u64) {
    match v {
        Value::String(s) => *chars += s.chars().count() as u64,
        Value::Number(_) => *tokens += 1,
        Value::Array(items) => items.iter().for_each(|i| count_text(i, chars, tokens)),
        _ => {}
    }
}

/// Counts message contents: a string, or the `text` of each content part
/// (chat `messages`, Responses `input` items).
fn count_contents(items: &[Value], chars: &mut u64, tokens: &mut u64) {
    for m in items {
        match m.get("content") {
            Some(Value::String(s)) => *chars += s.chars().count() as u64,
            Some(Value::Array(parts)) => {
                for t in parts.iter().filter_map(|p| p.get("text")) {
                    count_text(t, chars, tokens);
                }
            }
            _ => {}
        }
    }
}

/// Estimated prompt tokens: ceil(chars / 4) over all message contents / prompt /
/// input strings / instructions (token-id arrays count one per id), minimum 1.
pub fn estimate_prompt_tokens(op: Operation, body: &Value) -> u64 {
    let (mut chars, mut tokens) = (0u64, 0u64);
    match op {
        Operation::ChatCompletions => {
            if let Some(msgs) = body.get("messages").and_then(Value::as_array) {
                count_contents(msgs, &mut chars, &mut tokens);
            }
        }
        Operation::Completions | Operation::ImageGenerations | Operation::ImageEdits => {
            if let Some(p) = body.get("prompt") {
                count_text(p, &mut chars, &mut tokens);
            }
        }
        Operation::Embeddings => {
            if let Some(i) = body.get("input") {
                count_text(i, &mut chars, &mut tokens);
            }
        }
        Operation::CreateResponse => {
            match body.get("input") {
                Some(Value::Array(items)) => count_contents(items, &mut chars, &mut tokens),
                Some(text) => count_text(text, &mut chars, &mut tokens),
                None => {}
            }
            if let Some(i) = body.get("instructions") {
                count_text(i, &mut chars, &mut tokens);
            }
        }
        // Stored-object requests and audio: nothing to count.
        _ => {}
    }
    (chars.div_ceil(4) + tokens).max(1)
}

fn u64_field(body: &Value, key: &str) -> Option<u64> {
    body.get(key).and_then(Value::as_u64)
}

/// Tokens charged against the quota at admission time: the prompt estimate
/// plus the output limit (`max_tokens`, `max_completion_tokens` or
/// `max_output_tokens`; default 16) times `best_of`.
pub fn quota_charge(op: Operation, body: &Value) -> u64 {
    match op {
        Operation::ChatCompletions | Operation::Completions | Operation::CreateResponse => {
            let max = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
                .into_iter()
                .find_map(|k| u64_field(body, k))
                .unwrap_or(16);
            let best_of = u64_field(body, "best_of").unwrap_or(1).max(1);
            estimate_prompt_tokens(op, body).saturating_add(max.saturating_mul(best_of))
        }
        Operation::Embeddings => estimate_prompt_tokens(op, body),
        // Images and audio count requests only; stored-object requests are never charged.
        _ => 0,
    }
}

/// Whether the body asks for a stream.
pub fn wants_stream(body: &Value) -> bool {
    body.get("stream").and_then(Value::as_bool).unwrap_or(false)
}

fn include_usage(body: &Value) -> bool {
    body.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false)
}

/// `{"error":{"code":..,"message":..}}`
pub fn error_body(code: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message}})
}

/// OpenAI's error shape: `message`, `type`, `param`, `code`.
pub fn invalid_request(message: &str, param: Option<&str>, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}})
}

/// 400 body for a request without the parameter `param`.
pub fn missing_parameter(param: &str) -> Value {
    invalid_request(&format!("Missing required parameter: '{param}'."), Some(param), Some("missing_required_parameter"))
}

/// 400 body for a form operation sent something else than a form.
pub fn not_multipart() -> Value {
    invalid_request(
        "Invalid Content-Type header, expected multipart/form-data with a boundary and well-formed parts.",
        None,
        Some("invalid_content_type"),
    )
}

pub fn resource_not_found() -> Value {
    error_body("404", "Resource not found")
}

pub fn deployment_not_found() -> Value {
    error_body(
        "DeploymentNotFound",
        "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again.",
    )
}

pub fn access_denied() -> Value {
    error_body(
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
    )
}

/// Azure's 429 body. `call_limit` selects "call rate limit" vs "token rate limit".
pub fn rate_limited(op: Operation, api_version: &str, call_limit: bool, retry_secs: u64) -> Value {
    let what = if call_limit { "call rate limit" } else { "token rate limit" };
    error_body(
        "429",
        &format!(
            "Requests to the {} Operation under Azure OpenAI API version {} have exceeded {} of your current OpenAI S0 pricing tier. Please retry after {} second{}. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit.",
            op.azure_name(),
            api_version,
            what,
            retry_secs,
            if retry_secs == 1 { "" } else { "s" }
        ),
    )
}

/// Body for an injected failure with `status`: Azure's own body where the
/// mock knows it (401, 404, 429, 5xx, ...), else a generic one.
pub fn injected_error(status: u16, op: Operation, api_version: &str, retry_after: Option<&str>) -> Value {
    match status {
        401 => access_denied(),
        404 => deployment_not_found(),
        429 => {
            let secs = retry_after.and_then(|r| r.trim().parse::<u64>().ok()).unwrap_or(1);
            rate_limited(op, api_version, true, secs)
        }
        500 => error_body(
            "InternalServerError",
            "The server had an error while processing your request. Sorry about that!",
        ),
        502 => error_body("BadGateway", "Bad gateway."),
        503 => error_body(
            "ServiceUnavailable",
            "The service is temporarily unable to process your request. Please try again later.",
        ),
        504 => error_body("GatewayTimeout", "The operation was timeout."),
        408 => error_body("Timeout", "The operation was timeout."),
        400 => error_body("BadRequest", "Injected bad request."),
        _ => error_body(&status.to_string(), &format!("Injected failure (status {status}).")),
    }
}

/// Per-response identity.
#[derive(Debug, Clone)]
pub struct Ctx<'a> {
    pub name: &'a str,
    pub id: u64,
    pub created: u64,
    pub model: &'a str,
}

/// The answer text, split into `n` stream pieces: "Hello ", "from ", "NAME ",
/// "part3 ", "part4 ", ... With fewer than 3 pieces the last one carries the
/// rest, so the answer always contains "Hello from NAME".
pub fn answer_chunks(name: &str, n: usize) -> Vec<String> {
    let n = n.max(1);
    let base = ["Hello ".to_string(), "from ".to_string(), format!("{name} ")];
    let mut out: Vec<String> = Vec::with_capacity(n.max(3));
    for (i, piece) in base.into_iter().enumerate() {
        if i < n {
            out.push(piece);
        } else if let Some(last) = out.last_mut() {
            last.push_str(&piece);
        }
    }
    for i in 3..n {
        out.push(format!("part{i} "));
    }
    out
}

/// Full (non-stream) answer: the stream pieces joined, trimmed.
pub fn answer_text(name: &str, n: usize) -> String {
    answer_chunks(name, n).concat().trim_end().to_string()
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Non-stream chat completion.
pub fn chat_completion(ctx: &Ctx, prompt_tokens: u64, chunks: usize) -> Value {
    let chunks = chunks.max(1);
    let choice = json!({
        "index": 0,
        "message": {"role": "assistant", "content": answer_text(ctx.name, chunks)},
        "finish_reason": "stop",
        "logprobs": null
    });
    completion_object(ctx, "chatcmpl", "chat.completion", choice, usage(prompt_tokens, chunks as u64))
}

/// Non-stream legacy completion.
pub fn text_completion(ctx: &Ctx, prompt_tokens: u64, chunks: usize) -> Value {
    let chunks = chunks.max(1);
    let choice = json!({
        "text": answer_text(ctx.name, chunks),
        "index": 0,
        "finish_reason": "stop",
        "logprobs": null
    });
    completion_object(ctx, "cmpl", "text_completion", choice, usage(prompt_tokens, chunks as u64))
}

/// A non-stream completion around its single choice.
fn completion_object(ctx: &Ctx, id_prefix: &str, object: &str, choice: Value, usage: Value) -> Value {
    json!({
        "id": format!("{id_prefix}-mock-{}", ctx.id),
        "object": object,
        "created": ctx.created,
        "model": ctx.model,
        "choices": [choice],
        "usage": usage
    })
}

fn input_count(body: &Value) -> usize {
    match body.get("input") {
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => 1,
        Some(Value::Array(items)) => items.len(),
        _ => 1,
    }
}

/// Embeddings response: one 8-float vector per input item (deterministic per backend).
pub fn embeddings(ctx: &Ctx, body: &Value, prompt_tokens: u64) -> Value {
    let seed = ctx.name.bytes().fold(17u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let data: Vec<Value> = (0..input_count(body))
        .map(|i| {
            let v: Vec<f64> = (0..8u64)
                .map(|j| {
                    let x = seed.wrapping_add((i as u64) * 8 + j).wrapping_mul(2_654_435_761) % 2000;
                    (x as f64) / 1000.0 - 1.0
                })
                .collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": ctx.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    })
}

/// A 1x1 transparent PNG.
pub const TINY_PNG_B64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAAC0lEQVR4nGNgAAIAAAUAAXpeqz8AAAAASUVORK5CYII=";

/// Image generation response; `first_image` numbers the URLs.
pub fn images(ctx: &Ctx, body: &Value, first_image: u64) -> Value {
    let n = u64_field(body, "n").unwrap_or(1).clamp(1, 128);
    let prompt = body.get("prompt").and_then(Value::as_str).unwrap_or("");
    let b64 = body.get("response_format").and_then(Value::as_str) == Some("b64_json");
    let data: Vec<Value> = (0..n)
        .map(|i| {
            let revised = format!("{prompt} (by {})", ctx.name);
            if b64 {
                json!({"b64_json": TINY_PNG_B64, "revised_prompt": revised})
            } else {
                json!({
                    "url": format!("https://mock.invalid/{}/image-{}.png", ctx.name, first_image + i),
                    "revised_prompt": revised
                })
            }
        })
        .collect();
    json!({"created": ctx.created, "data": data})
}

/// The checks of an image edit form: an `image` (or `image[]`) file and a `prompt`.
pub fn validate_image_edit(form: &Form) -> Result<(), Refusal> {
    if form.file("image").or_else(|| form.file("image[]")).is_none() {
        return Err((400, missing_parameter("image")));
    }
    if form.text("prompt").is_none_or(|p| p.is_empty()) {
        return Err((400, missing_parameter("prompt")));
    }
    Ok(())
}

/// An image edit form's fields (its summary) as the images code reads a
/// body: `n` as a number.
pub fn image_edit_request(fields: &Value) -> Value {
    let mut body = fields.clone();
    if let Some(n) = fields.get("n").and_then(Value::as_str).and_then(|n| n.trim().parse::<u64>().ok()) {
        body["n"] = json!(n);
    }
    body
}

/// Number of images an images request produces (for URL numbering).
pub fn image_count(body: &Value) -> u64 {
    u64_field(body, "n").unwrap_or(1).clamp(1, 128)
}

/// One SSE event: `data: <json>\n\n`.
pub fn sse_event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// One SSE event with a name: `event: <type>\ndata: <json>\n\n` (the
/// Responses API names each event after its `type`).
pub fn sse_named_event(v: &Value) -> Bytes {
    let name = v.get("type").and_then(Value::as_str).unwrap_or("message");
    Bytes::from(format!("event: {name}\ndata: {v}\n\n"))
}

/// A stream split into the part sent at once (`head`), the content events
/// (each preceded by the chunk delay) and the closing events (`tail`).
#[derive(Debug, Clone, Default)]
pub struct StreamPlan {
    pub head: Vec<Bytes>,
    pub content: Vec<Bytes>,
    pub tail: Vec<Bytes>,
}

impl StreamPlan {
    /// The same stream without its first `n` events.
    pub fn skip(mut self, n: usize) -> Self {
        let mut n = n;
        for part in [&mut self.head, &mut self.content, &mut self.tail] {
            let k = n.min(part.len());
            part.drain(..k);
            n -= k;
        }
        self
    }

    /// All events in order.
    #[cfg(test)]
    pub fn all(&self) -> impl Iterator<Item = &Bytes> {
        self.head.iter().chain(&self.content).chain(&self.tail)
    }
}

/// Azure's first chat completion chunk: no choices, only the prompt's
/// content filter results (Azure sends it before any content). Written out
/// so the wire bytes do not depend on how `serde_json` orders keys.
pub const AZURE_PROMPT_FILTER_CHUNK: &[u8] = b"data: {\"id\":\"\",\"object\":\"\",\"created\":0,\"model\":\"\",\"choices\":[],\"prompt_filter_results\":[{\"prompt_index\":0,\"content_filter_results\":{}}]}\n\n";

/// The error event Azure sends inside a stream that fails after its 200 head.
pub const STREAM_SERVER_ERROR: &[u8] = b"data: {\"error\":{\"code\":\"server_error\",\"message\":\"The server had an error while processing your request. Sorry about that!\",\"param\":null,\"type\":\"server_error\"}}\n\n";

/// `plan` with Azure's metadata-only chunk ([`AZURE_PROMPT_FILTER_CHUNK`])
/// first when it is a chat completion stream; the number of events put
/// before the plan's own (0 or 1).
pub fn with_prompt_filter_chunk(op: Operation, mut plan: StreamPlan) -> (StreamPlan, usize) {
    if op != Operation::ChatCompletions {
        return (plan, 0);
    }
    plan.head.insert(0, Bytes::from_static(AZURE_PROMPT_FILTER_CHUNK));
    (plan, 1)
}

/// The stream of a backend that fails before any content: (chat
/// completions) the metadata-only chunk, then [`STREAM_SERVER_ERROR`] in
/// place of the content (so it waits the chunk delay); no `[DONE]`.
pub fn failed_stream(op: Operation) -> StreamPlan {
    let error = StreamPlan { content: vec![Bytes::from_static(STREAM_SERVER_ERROR)], ..StreamPlan::default() };
    with_prompt_filter_chunk(op, error).0
}

/// Streamed chat completion.
pub fn chat_stream(ctx: &Ctx, body: &Value, prompt_tokens: u64, chunks: usize) -> StreamPlan {
    let chunks = chunks.max(1);
    let with_usage = include_usage(body);
    let id = format!("chatcmpl-mock-{}", ctx.id);
    let chunk = |delta: Value, finish: Value| {
        let mut v = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": ctx.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]
        });
        if with_usage {
            v["usage"] = Value::Null;
        }
        sse_event(&v)
    };
    let mut plan = StreamPlan {
        head: vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)],
        content: answer_chunks(ctx.name, chunks)
            .into_iter()
            .map(|c| chunk(json!({"content": c}), Value::Null))
            .collect(),
        tail: vec![chunk(json!({}), json!("stop"))],
    };
    finish_stream(&mut plan, with_usage, &id, "chat.completion.chunk", ctx, usage(prompt_tokens, chunks as u64));
    plan
}

/// Ends a stream: the usage-only chunk (when the client asked for it), then `[DONE]`.
fn finish_stream(plan: &mut StreamPlan, with_usage: bool, id: &str, object: &str, ctx: &Ctx, usage: Value) {
    if with_usage {
        plan.tail.push(sse_event(&json!({
            "id": id,
            "object": object,
            "created": ctx.created,
            "model": ctx.model,
            "choices": [],
            "usage": usage
        })));
    }
    plan.tail.push(Bytes::from_static(SSE_DONE));
}

/// Streamed legacy completion.
pub fn completion_stream(ctx: &Ctx, body: &Value, prompt_tokens: u64, chunks: usize) -> StreamPlan {
    let chunks = chunks.max(1);
    let with_usage = include_usage(body);
    let id = format!("cmpl-mock-{}", ctx.id);
    let chunk = |text: &str, finish: Value| {
        let mut v = json!({
            "id": id,
            "object": "text_completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": [{"text": text, "index": 0, "finish_reason": finish, "logprobs": null}]
        });
        if with_usage {
            v["usage"] = Value::Null;
        }
        sse_event(&v)
    };
    let mut plan = StreamPlan {
        head: vec![],
        content: answer_chunks(ctx.name, chunks).iter().map(|c| chunk(c, Value::Null)).collect(),
        tail: vec![chunk("", json!("stop"))],
    };
    finish_stream(&mut plan, with_usage, &id, "text_completion", ctx, usage(prompt_tokens, chunks as u64));
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx<'static> {
        Ctx { name: "eastus", id: 7, created: 1_700_000_000, model: "gpt-4o" }
    }

    /// Parse an SSE byte stream into its `data:` payloads.
    fn events(plan: &StreamPlan) -> Vec<String> {
        let all: Vec<u8> = plan.all().flat_map(|b| b.iter().copied()).collect();
        let text = String::from_utf8(all).unwrap();
        text.split("\n\n").filter(|e| !e.is_empty()).map(|e| e.strip_prefix("data: ").unwrap().to_string()).collect()
    }

    fn post(path: &str) -> Option<Route> {
        parse_route("POST", path)
    }

    fn model_in_body(op: Operation) -> Option<Route> {
        Some(Route::ModelInBody { op, needs_api_version: false })
    }

    #[test]
    fn paths() {
        assert_eq!(
            post("/openai/deployments/gpt4o/chat/completions"),
            Some(Route::Classic { deployment: "gpt4o".into(), op: Operation::ChatCompletions })
        );
        assert_eq!(
            post("/openai/deployments/emb/embeddings"),
            Some(Route::Classic { deployment: "emb".into(), op: Operation::Embeddings })
        );
        assert_eq!(post("/openai/deployments/d/images/generations").map(|r| r.op()), Some(Operation::ImageGenerations));
        assert_eq!(post("/openai/deployments/d/completions").map(|r| r.op()), Some(Operation::Completions));
        assert_eq!(post("/openai/v1/chat/completions"), model_in_body(Operation::ChatCompletions));
        assert_eq!(post("/v1/embeddings"), model_in_body(Operation::Embeddings));
        for bad in [
            "/openai/deployments//chat/completions",
            "/openai/deployments/d/chat",
            "/openai/deployments/d/responses",
            "/openai/chat/completions",
            "/v2/chat/completions",
            "/",
            "/_mock/stats",
        ] {
            assert_eq!(post(bad), None, "{bad}");
        }
        assert_eq!(parse_route("GET", "/openai/deployments/d/chat/completions"), None);
        assert_eq!(parse_route("GET", "/v1/chat/completions"), None);
    }

    #[test]
    fn file_batch_audio_and_edit_paths() {
        let route = |method: &str, path: &str| parse_route(method, path).map(|r| (r.op(), r.needs_api_version()));
        for (prefix, classic) in [("/openai/v1", false), ("/v1", false), ("/openai", true)] {
            let at = |suffix: &str| format!("{prefix}/{suffix}");
            assert_eq!(route("POST", &at("files")), Some((Operation::CreateFile, classic)), "{prefix}");
            assert_eq!(route("GET", &at("files/")), Some((Operation::ListFiles, classic)));
            assert_eq!(route("GET", &at("files/file-1")), Some((Operation::GetFile, classic)));
            assert_eq!(route("DELETE", &at("files/file-1")), Some((Operation::DeleteFile, classic)));
            assert_eq!(route("GET", &at("files/file-1/content")), Some((Operation::GetFileContent, classic)));
            assert_eq!(route("POST", &at("batches")), Some((Operation::CreateBatch, classic)));
            assert_eq!(route("GET", &at("batches")), Some((Operation::ListBatches, classic)));
            assert_eq!(route("GET", &at("batches/batch_1")), Some((Operation::GetBatch, classic)));
            assert_eq!(route("POST", &at("batches/batch_1/cancel")), Some((Operation::CancelBatch, classic)));
            for (method, suffix) in [
                ("DELETE", "files"),
                ("POST", "files/file-1"),
                ("POST", "files/file-1/content"),
                ("GET", "files//content"),
                ("GET", "files/file-1/content/x"),
                ("DELETE", "batches/batch_1"),
                ("GET", "batches/batch_1/cancel"),
                ("POST", "batches/batch_1/other"),
            ] {
                assert_eq!(route(method, &at(suffix)), None, "{method} {prefix}/{suffix}");
            }
        }
        assert_eq!(
            parse_route("GET", "/v1/files/file-9"),
            Some(Route::Stored { id: Some("file-9".into()), op: Operation::GetFile, needs_api_version: false })
        );
        assert_eq!(
            post("/openai/files"),
            Some(Route::Stored { id: None, op: Operation::CreateFile, needs_api_version: true })
        );
        for (suffix, op) in [
            ("audio/transcriptions", Operation::AudioTranscriptions),
            ("audio/translations", Operation::AudioTranslations),
            ("images/edits", Operation::ImageEdits),
        ] {
            let classic = post(&format!("/openai/deployments/whisper/{suffix}"));
            assert_eq!(classic, Some(Route::Classic { deployment: "whisper".into(), op }));
            assert_eq!(post(&format!("/openai/v1/{suffix}")), model_in_body(op));
            assert_eq!(post(&format!("/v1/{suffix}")), model_in_body(op));
            assert!(op.takes_form());
        }
        assert_eq!(post("/openai/audio/transcriptions"), None, "classic audio needs a deployment");
        assert_eq!(post("/openai/deployments/d/files"), None);
        assert!(Operation::CreateFile.takes_form() && !Operation::CreateBatch.takes_form());
    }

    #[test]
    fn image_edit_forms() {
        assert_eq!(image_edit_request(&json!({"n": "2", "prompt": "p"})), json!({"n": 2, "prompt": "p"}));
        assert_eq!(image_edit_request(&json!({"n": "x"})), json!({"n": "x"}));
        let form = |fields: &[(&str, &str)], image: &str| {
            let body = crate::multipart::tests::httpx_body(fields, &[(image, "a.png", "image/png", b"\x89PNG")]);
            crate::multipart::parse(&Bytes::from(body), crate::multipart::tests::BOUNDARY).unwrap()
        };
        assert_eq!(validate_image_edit(&form(&[("prompt", "hat")], "image")), Ok(()));
        assert_eq!(validate_image_edit(&form(&[("prompt", "hat")], "image[]")), Ok(()));
        assert_eq!(validate_image_edit(&form(&[("prompt", "hat")], "mask")), Err((400, missing_parameter("image"))));
        assert_eq!(validate_image_edit(&form(&[("prompt", "")], "image")), Err((400, missing_parameter("prompt"))));
    }

    #[test]
    fn responses_paths() {
        assert_eq!(post("/openai/v1/responses"), model_in_body(Operation::CreateResponse));
        assert_eq!(post("/v1/responses/"), model_in_body(Operation::CreateResponse));
        let classic = post("/openai/responses").unwrap();
        assert_eq!((classic.op(), classic.needs_api_version()), (Operation::CreateResponse, true));
        let stored = |method: &str, path: &str| parse_route(method, path).map(|r| (r.op(), r.needs_api_version()));
        assert_eq!(stored("GET", "/openai/v1/responses/resp_1"), Some((Operation::GetResponse, false)));
        assert_eq!(stored("DELETE", "/v1/responses/resp_1"), Some((Operation::DeleteResponse, false)));
        assert_eq!(stored("POST", "/openai/responses/resp_1/cancel"), Some((Operation::CancelResponse, true)));
        assert_eq!(stored("GET", "/openai/v1/responses/resp_1/input_items"), Some((Operation::ListInputItems, false)));
        assert_eq!(
            parse_route("GET", "/v1/responses/resp_9"),
            Some(Route::Stored { id: Some("resp_9".into()), op: Operation::GetResponse, needs_api_version: false })
        );
        for (method, path) in [
            ("GET", "/openai/v1/responses"),
            ("POST", "/openai/v1/responses/resp_1"),
            ("GET", "/openai/v1/responses/resp_1/cancel"),
            ("POST", "/openai/v1/responses/resp_1/other"),
            ("GET", "/openai/v1/responses//input_items"),
            ("POST", "/openai/v1/responsesx"),
            ("GET", "/openai/responses/resp_1/input_items/x"),
        ] {
            assert_eq!(parse_route(method, path), None, "{method} {path}");
        }
    }

    #[test]
    fn skipping_events() {
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        let plan = StreamPlan { head: vec![b("a"), b("b")], content: vec![b("c")], tail: vec![b("d")] };
        let all = |p: &StreamPlan| p.all().map(|x| String::from_utf8_lossy(x).to_string()).collect::<String>();
        assert_eq!(all(&plan.clone().skip(0)), "abcd");
        assert_eq!(all(&plan.clone().skip(3)), "d");
        assert_eq!(all(&plan.skip(9)), "");
        let named = sse_named_event(&json!({"type": "response.created", "x": 1}));
        assert_eq!(named, "event: response.created\ndata: {\"type\":\"response.created\",\"x\":1}\n\n");
    }

    #[test]
    fn query() {
        assert_eq!(query_param("api-version=2024-10-21", "api-version"), Some("2024-10-21"));
        assert_eq!(query_param("a=1&api-version=x&b", "api-version"), Some("x"));
        assert_eq!(query_param("b", "b"), Some(""));
        assert_eq!(query_param("", "api-version"), None);
        assert_eq!(query_param("api-versionx=1", "api-version"), None);
    }

    #[test]
    fn token_estimates() {
        let chat = json!({"messages": [
            {"role": "system", "content": "abcd"},
            {"role": "user", "content": [{"type": "text", "text": "efghi"}, {"type": "image_url", "image_url": {"url": "x"}}]}
        ]});
        // 9 chars -> ceil(9/4) = 3
        assert_eq!(estimate_prompt_tokens(Operation::ChatCompletions, &chat), 3);
        assert_eq!(quota_charge(Operation::ChatCompletions, &chat), 3 + 16);
        let chat2 =
            json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100, "best_of": 3});
        assert_eq!(quota_charge(Operation::ChatCompletions, &chat2), 1 + 300);
        let chat3 = json!({"messages": [], "max_tokens": 5, "max_completion_tokens": 100});
        assert_eq!(estimate_prompt_tokens(Operation::ChatCompletions, &chat3), 1);
        assert_eq!(quota_charge(Operation::ChatCompletions, &chat3), 6);

        let comp = json!({"prompt": ["12345678", "1"], "max_tokens": 10});
        assert_eq!(estimate_prompt_tokens(Operation::Completions, &comp), 3);
        assert_eq!(quota_charge(Operation::Completions, &comp), 13);

        let emb = json!({"input": "a".repeat(17)});
        assert_eq!(quota_charge(Operation::Embeddings, &emb), 5);
        let emb_tokens = json!({"input": [[1, 2, 3], [4, 5]]});
        assert_eq!(estimate_prompt_tokens(Operation::Embeddings, &emb_tokens), 5);
        assert_eq!(quota_charge(Operation::ImageGenerations, &json!({"prompt": "a cat"})), 0);
        // Multi-byte characters count as characters, not bytes.
        assert_eq!(estimate_prompt_tokens(Operation::Embeddings, &json!({"input": "ééééé"})), 2);
    }

    #[test]
    fn answer_splitting() {
        assert_eq!(answer_chunks("x", 5), vec!["Hello ", "from ", "x ", "part3 ", "part4 "]);
        assert_eq!(answer_chunks("x", 1), vec!["Hello from x "]);
        assert_eq!(answer_chunks("x", 2), vec!["Hello ", "from x "]);
        assert_eq!(answer_text("x", 3), "Hello from x");
        assert_eq!(answer_text("x", 0), "Hello from x");
    }

    #[test]
    fn chat_non_stream() {
        let v = chat_completion(&ctx(), 4, 5);
        assert_eq!(v["id"], "chatcmpl-mock-7");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "gpt-4o");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello from eastus part3 part4");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"], json!({"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}));
    }

    #[test]
    fn chat_stream_without_usage() {
        let plan = chat_stream(&ctx(), &json!({"stream": true}), 4, 5);
        assert_eq!(plan.head.len(), 1);
        assert_eq!(plan.content.len(), 5);
        let ev = events(&plan);
        assert_eq!(ev.len(), 1 + 5 + 1 + 1);
        assert_eq!(ev.last().unwrap(), "[DONE]");
        let parsed: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        assert_eq!(parsed[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        assert!(parsed[0].get("usage").is_none());
        let text: String =
            parsed[1..6].iter().map(|p| p["choices"][0]["delta"]["content"].as_str().unwrap().to_string()).collect();
        assert_eq!(text, "Hello from eastus part3 part4 ");
        assert_eq!(parsed[6]["choices"][0]["delta"], json!({}));
        assert_eq!(parsed[6]["choices"][0]["finish_reason"], "stop");
        for p in &parsed {
            assert_eq!(p["object"], "chat.completion.chunk");
            assert_eq!(p["id"], "chatcmpl-mock-7");
        }
    }

    #[test]
    fn chat_stream_with_usage() {
        let body = json!({"stream": true, "stream_options": {"include_usage": true}});
        let plan = chat_stream(&ctx(), &body, 4, 3);
        let ev = events(&plan);
        assert_eq!(ev.len(), 1 + 3 + 1 + 1 + 1);
        let parsed: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        for p in &parsed[..parsed.len() - 1] {
            assert_eq!(p["usage"], Value::Null);
            assert!(p.get("usage").is_some());
        }
        let last = parsed.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"], json!({"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}));
    }

    #[test]
    fn failed_and_prefixed_streams() {
        let chat = failed_stream(Operation::ChatCompletions);
        assert_eq!((chat.head.len(), chat.content.len(), chat.tail.len()), (1, 1, 0));
        let ev = events(&chat);
        assert_eq!(
            ev[0],
            r#"{"id":"","object":"","created":0,"model":"","choices":[],"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}"#
        );
        assert_eq!(
            serde_json::from_str::<Value>(&ev[1]).unwrap(),
            json!({"error": {"code": "server_error", "param": null, "type": "server_error",
                  "message": "The server had an error while processing your request. Sorry about that!"}})
        );
        assert_eq!(ev.len(), 2, "no [DONE]");
        let other = failed_stream(Operation::CreateResponse);
        assert_eq!(other.all().collect::<Vec<_>>(), [&Bytes::from_static(STREAM_SERVER_ERROR)]);

        let (plan, lead) = with_prompt_filter_chunk(Operation::ChatCompletions, chat_stream(&ctx(), &json!({}), 4, 2));
        assert_eq!((lead, plan.head.len(), plan.content.len()), (1, 2, 2));
        assert_eq!(plan.head[0], AZURE_PROMPT_FILTER_CHUNK);
        let (plan, lead) =
            with_prompt_filter_chunk(Operation::Completions, completion_stream(&ctx(), &json!({}), 4, 2));
        assert_eq!((lead, plan.head.len()), (0, 0));
    }

    #[test]
    fn completion_stream_shape() {
        let plan = completion_stream(&ctx(), &json!({}), 2, 3);
        let ev = events(&plan);
        assert_eq!(ev.len(), 3 + 1 + 1);
        let first: Value = serde_json::from_str(&ev[0]).unwrap();
        assert_eq!(first["object"], "text_completion");
        assert_eq!(first["choices"][0]["text"], "Hello ");
        let fin: Value = serde_json::from_str(&ev[3]).unwrap();
        assert_eq!(fin["choices"][0]["finish_reason"], "stop");
        let v = text_completion(&ctx(), 2, 3);
        assert_eq!(v["choices"][0]["text"], "Hello from eastus");
        assert_eq!(v["usage"]["total_tokens"], 5);
    }

    #[test]
    fn embeddings_shape() {
        let v = embeddings(&ctx(), &json!({"input": ["a", "b", "c"]}), 3);
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"].as_array().unwrap().len(), 3);
        assert_eq!(v["data"][2]["index"], 2);
        assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 8);
        assert_eq!(v["usage"], json!({"prompt_tokens": 3, "total_tokens": 3}));
        assert_eq!(embeddings(&ctx(), &json!({"input": [1, 2, 3]}), 3)["data"].as_array().unwrap().len(), 1);
        assert_eq!(embeddings(&ctx(), &json!({"input": "x"}), 1)["data"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn images_shape() {
        let v = images(&ctx(), &json!({"prompt": "a cat", "n": 2}), 10);
        assert_eq!(v["data"][0]["url"], "https://mock.invalid/eastus/image-10.png");
        assert_eq!(v["data"][1]["url"], "https://mock.invalid/eastus/image-11.png");
        assert_eq!(v["data"][0]["revised_prompt"], "a cat (by eastus)");
        let v = images(&ctx(), &json!({"prompt": "p", "response_format": "b64_json"}), 1);
        assert_eq!(v["data"][0]["b64_json"], TINY_PNG_B64);
        assert!(v["data"][0].get("url").is_none());
    }

    #[test]
    fn rate_limit_messages() {
        let v = rate_limited(Operation::ChatCompletions, "2024-10-21", false, 7);
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.starts_with("Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit"));
        assert!(m.contains("Please retry after 7 seconds."));
        assert_eq!(v["error"]["code"], "429");
        let v = rate_limited(Operation::Embeddings, "x", true, 1);
        assert!(v["error"]["message"].as_str().unwrap().contains("exceeded call rate limit"));
        assert_eq!(injected_error(500, Operation::ChatCompletions, "x", None)["error"]["code"], "InternalServerError");
        assert_eq!(injected_error(418, Operation::ChatCompletions, "x", None)["error"]["code"], "418");
        assert_eq!(injected_error(401, Operation::ChatCompletions, "x", None), access_denied());
        assert_eq!(injected_error(404, Operation::Embeddings, "x", None), deployment_not_found());
        let v = injected_error(429, Operation::ChatCompletions, "x", Some("12"));
        assert!(v["error"]["message"].as_str().unwrap().contains("retry after 12 seconds"));
    }
}
