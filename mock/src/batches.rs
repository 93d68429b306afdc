//! The Batch API: the batches created on this backend (the newest
//! [`store::MAX_STORED`]), run on the files uploaded to it.
//!
//! Like an Azure OpenAI resource, a mock only runs batches on its own files:
//! a create naming a file this backend does not have fails with 400
//! `invalid_file_id`, and a request on a batch created elsewhere with 404.
//! Ids are `batch_` + 32 hex digits and say nothing about the backend.
//!
//! A batch is created `validating` and runs as soon as it is looked at (the
//! first `GET`): every line of its input file is answered like the live
//! request (chat completions, completions, embeddings), the answers go to an
//! output file and failed lines to an error file (both `batch_output` files
//! of this backend), and the batch is `completed`. A cancel before that makes
//! it `cancelling`, then `cancelled` when next looked at; a finished batch
//! stays as it is.
//!
//! Everything here is pure (no I/O); the key and `api-version` checks and
//! faults are applied by [`crate::state`]; no quota is used.

use bytes::Bytes;
use serde_json::{json, Value};

use crate::files::FileStore;
use crate::openai::{self, invalid_request, Ctx, Operation};
use crate::state::{Refusal, ReplyBody};
use crate::store::{self, Bounded, Ids};

/// A batch's input file expires after a day (`completion_window` "24h").
const EXPIRES_AFTER_S: u64 = 24 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Validating,
    Completed,
    Cancelling,
    Cancelled,
}

#[derive(Debug)]
struct Batch {
    object: Value,
    status: Status,
}

/// What a batch's requests are answered with: the backend's name, the
/// answer length (`stream_chunks`) and the time (unix seconds).
#[derive(Debug, Clone, Copy)]
pub struct Runner<'a> {
    pub name: &'a str,
    pub chunks: usize,
    pub now: u64,
}

/// The batches of one mock, by id.
#[derive(Debug)]
pub struct BatchStore {
    ids: Ids,
    batches: Bounded<Batch>,
}

impl BatchStore {
    pub fn new(name: &str) -> Self {
        BatchStore { ids: Ids::new(name), batches: Bounded::default() }
    }

    /// Batches currently stored.
    pub fn len(&self) -> usize {
        self.batches.len()
    }

    /// A create (`input_file_id` naming a file of this backend, `endpoint`,
    /// `completion_window`): the new batch, `validating`.
    pub fn create(&mut self, body: &Value, files: &FileStore, created_at: u64) -> Result<Value, Refusal> {
        for key in ["input_file_id", "endpoint", "completion_window"] {
            if !body.get(key).is_some_and(Value::is_string) {
                return Err((400, openai::missing_parameter(key)));
            }
        }
        let input = body["input_file_id"].as_str().unwrap_or_default();
        if files.content(input).is_none() {
            return Err((400, invalid_file(input)));
        }
        let id = format!("batch_{}", self.ids.hex(2));
        let object = json!({
            "id": id,
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": null,
            "input_file_id": input,
            "completion_window": body["completion_window"],
            "status": "validating",
            "output_file_id": null,
            "error_file_id": null,
            "created_at": created_at,
            "in_progress_at": null,
            "expires_at": created_at + EXPIRES_AFTER_S,
            "finalizing_at": null,
            "completed_at": null,
            "failed_at": null,
            "expired_at": null,
            "cancelling_at": null,
            "cancelled_at": null,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata").cloned().unwrap_or(Value::Null)
        });
        self.batches.insert(id, Batch { object: object.clone(), status: Status::Validating });
        Ok(object)
    }

    /// A list (newest first; `after`, `limit` 1-100, default 20), or a
    /// request on the batch `id`: status and body; 404 when this backend has
    /// no such batch.
    pub fn act(
        &mut self,
        op: Operation,
        id: Option<&str>,
        query: &str,
        files: &mut FileStore,
        runner: Runner,
    ) -> (u16, ReplyBody) {
        if op == Operation::ListBatches {
            let items = self.batches.values().map(|b| &b.object).collect();
            return (200, ReplyBody::Json(store::list_page(items, query, 20, 100)));
        }
        let id = id.unwrap_or_default();
        let Some(batch) = self.batches.get_mut(id) else {
            return (404, ReplyBody::Json(batch_not_found(id)));
        };
        match op {
            Operation::GetBatch => batch.settle(id, files, &mut self.ids, runner),
            Operation::CancelBatch => batch.cancel(runner.now),
            _ => return (404, ReplyBody::Json(openai::resource_not_found())),
        }
        (200, ReplyBody::Json(batch.object.clone()))
    }
}

impl Batch {
    fn set_status(&mut self, status: Status, name: &str, at_key: &str, now: u64) {
        self.status = status;
        self.object["status"] = json!(name);
        self.object[at_key] = json!(now);
    }

    /// Looked at: a validating batch runs, a cancelling one is cancelled.
    fn settle(&mut self, id: &str, files: &mut FileStore, ids: &mut Ids, runner: Runner) {
        match self.status {
            Status::Validating => self.run(id, files, ids, runner),
            Status::Cancelling => self.set_status(Status::Cancelled, "cancelled", "cancelled_at", runner.now),
            Status::Completed | Status::Cancelled => {}
        }
    }

    fn cancel(&mut self, now: u64) {
        if self.status == Status::Validating {
            self.set_status(Status::Cancelling, "cancelling", "cancelling_at", now);
        }
    }

    /// Answer every request of the input file (if it is still there); the
    /// answers go to an output file, the failures to an error file.
    fn run(&mut self, id: &str, files: &mut FileStore, ids: &mut Ids, runner: Runner) {
        let input = self.object["input_file_id"].as_str().and_then(|f| files.content(f)).cloned().unwrap_or_default();
        let (done, failed) = run_lines(&input, ids, runner);
        let mut save = |lines: &[String], kind: &str| {
            if lines.is_empty() {
                return Value::Null;
            }
            let name = format!("{id}_{kind}.jsonl");
            files.add(&name, "batch_output", Bytes::from(lines.concat()), runner.now)["id"].clone()
        };
        self.object["output_file_id"] = save(&done, "output");
        self.object["error_file_id"] = save(&failed, "error");
        let counts = json!({"total": done.len() + failed.len(), "completed": done.len(), "failed": failed.len()});
        self.object["request_counts"] = counts;
        for key in ["in_progress_at", "finalizing_at"] {
            self.object[key] = json!(runner.now);
        }
        self.set_status(Status::Completed, "completed", "completed_at", runner.now);
    }
}

/// The non-empty lines of an input file, answered: (output lines, error
/// lines), each a JSON object and a newline.
fn run_lines(input: &[u8], ids: &mut Ids, runner: Runner) -> (Vec<String>, Vec<String>) {
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    let text = String::from_utf8_lossy(input);
    for (n, line) in text.lines().map(str::trim).filter(|l| !l.is_empty()).enumerate() {
        let request: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        let custom_id = request.get("custom_id").cloned().unwrap_or(Value::Null);
        let mut record =
            json!({"id": format!("batch_req_{}", ids.hex(2)), "custom_id": custom_id, "response": null, "error": null});
        match answer(&request, n as u64 + 1, runner) {
            Ok(body) => {
                record["response"] = json!({"status_code": 200, "request_id": ids.hex(2), "body": body});
                done.push(format!("{record}\n"));
            }
            Err(message) => {
                record["error"] = json!({"code": "invalid_request", "message": message});
                failed.push(format!("{record}\n"));
            }
        }
    }
    (done, failed)
}

/// The answer to one request line (`{"custom_id", "method", "url", "body"}`):
/// a chat completion, completion or embeddings body as the live API gives.
fn answer(request: &Value, n: u64, runner: Runner) -> Result<Value, String> {
    let url = request.get("url").and_then(Value::as_str).ok_or("The request has no url.")?;
    let suffix = url.trim_start_matches("/openai").trim_start_matches("/v1").trim_start_matches('/');
    let body = request.get("body").filter(|b| b.is_object()).ok_or("The request has no body.")?;
    let model = body.get("model").and_then(Value::as_str).ok_or("The request body has no model.")?;
    let ctx = Ctx { name: runner.name, id: n, created: runner.now, model };
    match Operation::from_suffix(suffix) {
        Some(op @ Operation::ChatCompletions) => {
            Ok(openai::chat_completion(&ctx, openai::estimate_prompt_tokens(op, body), runner.chunks))
        }
        Some(op @ Operation::Completions) => {
            Ok(openai::text_completion(&ctx, openai::estimate_prompt_tokens(op, body), runner.chunks))
        }
        Some(op @ Operation::Embeddings) => {
            Ok(openai::embeddings(&ctx, body, openai::estimate_prompt_tokens(op, body)))
        }
        _ => Err(format!("The url '{url}' is not supported in a batch.")),
    }
}

/// 400 body of a create whose input file this backend does not have.
pub fn invalid_file(id: &str) -> Value {
    invalid_request(&format!("File with id '{id}' not found."), Some("input_file_id"), Some("invalid_file_id"))
}

/// 404 body for a batch id this backend does not have.
pub fn batch_not_found(id: &str) -> Value {
    invalid_request(&format!("Batch with id '{id}' not found."), Some("id"), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn runner() -> Runner<'static> {
        Runner { name: "eastus", chunks: 3, now: NOW + 5 }
    }

    fn json_of(body: ReplyBody) -> Value {
        match body {
            ReplyBody::Json(v) => v,
            other => panic!("not JSON: {other:?}"),
        }
    }

    fn batch_body(file: &Value) -> Value {
        json!({"input_file_id": file["id"], "endpoint": "/chat/completions", "completion_window": "24h"})
    }

    fn act(batches: &mut BatchStore, files: &mut FileStore, op: Operation, id: &Value) -> (u16, Value) {
        let (status, body) = batches.act(op, id.as_str(), "", files, runner());
        (status, json_of(body))
    }

    const INPUT: &str = concat!(
        r#"{"custom_id":"a","method":"POST","url":"/chat/completions","body":{"model":"gpt4o","messages":[{"role":"user","content":"hi"}]}}"#,
        "\r\n\n",
        r#"{"custom_id":"b","method":"POST","url":"/v1/embeddings","body":{"model":"emb","input":["x","y"]}}"#,
        "\n",
        r#"{"custom_id":"c","method":"POST","url":"/v1/images/generations","body":{"model":"dalle"}}"#,
        "\nnot json\n"
    );

    #[test]
    fn create_then_complete_on_retrieval() {
        let (mut files, mut batches) = (FileStore::new("eastus"), BatchStore::new("eastus"));
        let input = files.add("in.jsonl", "batch", Bytes::from_static(INPUT.as_bytes()), NOW);
        let created = batches.create(&batch_body(&input), &files, NOW).unwrap();
        let id = &created["id"];
        let hex = id.as_str().unwrap().strip_prefix("batch_").unwrap();
        assert!(hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        assert_eq!((&created["object"], &created["status"]), (&json!("batch"), &json!("validating")));
        assert_eq!((&created["endpoint"], &created["input_file_id"]), (&json!("/chat/completions"), &input["id"]));
        assert_eq!((&created["completion_window"], &created["created_at"]), (&json!("24h"), &json!(NOW)));
        assert_eq!(created["request_counts"], json!({"total": 0, "completed": 0, "failed": 0}));

        let (status, done) = act(&mut batches, &mut files, Operation::GetBatch, id);
        assert_eq!((status, &done["status"], &done["completed_at"]), (200, &json!("completed"), &json!(NOW + 5)));
        assert_eq!(done["request_counts"], json!({"total": 4, "completed": 2, "failed": 2}));
        let output =
            String::from_utf8(files.content(done["output_file_id"].as_str().unwrap()).unwrap().to_vec()).unwrap();
        let lines: Vec<Value> = output.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!((&lines[0]["custom_id"], &lines[0]["response"]["status_code"]), (&json!("a"), &json!(200)));
        let chat = &lines[0]["response"]["body"];
        assert_eq!(
            (&chat["model"], &chat["choices"][0]["message"]["content"]),
            (&json!("gpt4o"), &json!("Hello from eastus"))
        );
        assert_eq!(lines[1]["response"]["body"]["data"].as_array().unwrap().len(), 2);
        let errors =
            String::from_utf8(files.content(done["error_file_id"].as_str().unwrap()).unwrap().to_vec()).unwrap();
        let errors: Vec<Value> = errors.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!((&errors[0]["custom_id"], &errors[1]["custom_id"]), (&json!("c"), &Value::Null));
        // Done: later looks and a cancel change nothing.
        assert_eq!(act(&mut batches, &mut files, Operation::GetBatch, id), (200, done.clone()));
        assert_eq!(act(&mut batches, &mut files, Operation::CancelBatch, id), (200, done));
        assert_eq!(batches.len(), 1);
    }

    #[test]
    fn the_input_file_must_be_here() {
        let (mut files, mut batches) = (FileStore::new("eastus"), BatchStore::new("eastus"));
        let mut west = FileStore::new("west");
        let theirs = west.add("in.jsonl", "batch", Bytes::from_static(b"{}"), NOW);
        let (status, err) = batches.create(&batch_body(&theirs), &files, NOW).unwrap_err();
        assert_eq!((status, err), (400, invalid_file(theirs["id"].as_str().unwrap())));
        assert_eq!(invalid_file("f")["error"]["code"], "invalid_file_id");
        let (status, err) = batches.create(&json!({"input_file_id": "file-x"}), &files, NOW).unwrap_err();
        assert_eq!((status, &err["error"]["param"]), (400, &json!("endpoint")));
        assert_eq!(batches.len(), 0);
        let missing = json!("batch_nope");
        for op in [Operation::GetBatch, Operation::CancelBatch] {
            assert_eq!(act(&mut batches, &mut files, op, &missing), (404, batch_not_found("batch_nope")));
        }
    }

    #[test]
    fn cancel_and_list() {
        let (mut files, mut batches) = (FileStore::new("eastus"), BatchStore::new("eastus"));
        let input = files.add("in.jsonl", "batch", Bytes::from_static(INPUT.as_bytes()), NOW);
        let first = batches.create(&batch_body(&input), &files, NOW).unwrap();
        let second = batches.create(&batch_body(&input), &files, NOW).unwrap();
        let (status, cancelling) = act(&mut batches, &mut files, Operation::CancelBatch, &first["id"]);
        assert_eq!(
            (status, &cancelling["status"], &cancelling["cancelling_at"]),
            (200, &json!("cancelling"), &json!(NOW + 5))
        );
        let (_, cancelled) = act(&mut batches, &mut files, Operation::GetBatch, &first["id"]);
        assert_eq!((&cancelled["status"], &cancelled["output_file_id"]), (&json!("cancelled"), &Value::Null));
        let (status, list) = act(&mut batches, &mut files, Operation::ListBatches, &Value::Null);
        assert_eq!((status, &list["object"], &list["data"]), (200, &json!("list"), &json!([second, cancelled])));
        assert_eq!(files.len(), 1, "no output for a cancelled batch");
    }
}
