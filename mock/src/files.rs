//! The Files API: the files uploaded to this backend (and the output files
//! of its batches), the newest [`store::MAX_STORED`].
//!
//! Like an Azure OpenAI resource, a mock only knows its own files: a
//! retrieval, a deletion, a content download or a batch naming a file
//! uploaded elsewhere fails (404; 400 `invalid_file_id` for a batch). Ids are
//! `file-` + 32 hex digits and say nothing about the backend.
//!
//! Everything here is pure (no I/O); the key and `api-version` checks and
//! faults are applied by [`crate::state`]; no quota is used.

use bytes::Bytes;
use serde_json::{json, Value};

use crate::multipart::Form;
use crate::openai::{self, invalid_request, Operation};
use crate::state::{Refusal, ReplyBody};
use crate::store::{self, Bounded, Ids};

#[derive(Debug)]
struct StoredFile {
    object: Value,
    content: Bytes,
}

/// The files of one mock, by id.
#[derive(Debug)]
pub struct FileStore {
    ids: Ids,
    files: Bounded<StoredFile>,
}

impl FileStore {
    pub fn new(name: &str) -> Self {
        FileStore { ids: Ids::new(name), files: Bounded::default() }
    }

    /// Files currently stored.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// A stored file's content.
    pub fn content(&self, id: &str) -> Option<&Bytes> {
        self.files.get(id).map(|f| &f.content)
    }

    /// An upload (`purpose` and a `file` part): the new file's object.
    pub fn upload(&mut self, form: &Form, created_at: u64) -> Result<Value, Refusal> {
        let purpose =
            form.text("purpose").filter(|p| !p.is_empty()).ok_or((400, openai::missing_parameter("purpose")))?;
        let file = form.file("file").ok_or((400, openai::missing_parameter("file")))?;
        let filename = file.filename.as_deref().unwrap_or_default();
        Ok(self.add(filename, &purpose, file.data.clone(), created_at))
    }

    /// Store a file; its object.
    pub fn add(&mut self, filename: &str, purpose: &str, content: Bytes, created_at: u64) -> Value {
        let id = format!("file-{}", self.ids.hex(2));
        let object = json!({
            "id": id,
            "object": "file",
            "bytes": content.len(),
            "created_at": created_at,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": null,
            "expires_at": null
        });
        self.files.insert(id, StoredFile { object: object.clone(), content });
        object
    }

    /// A list, or a request on the file `id`: status and body; 404 when this
    /// backend has no such file.
    pub fn act(&mut self, op: Operation, id: Option<&str>, query: &str) -> (u16, ReplyBody) {
        if op == Operation::ListFiles {
            return (200, ReplyBody::Json(self.list(query)));
        }
        let id = id.unwrap_or_default();
        let Some(file) = self.files.get(id) else {
            return (404, ReplyBody::Json(file_not_found(id)));
        };
        match op {
            Operation::GetFile => (200, ReplyBody::Json(file.object.clone())),
            Operation::GetFileContent => {
                (200, ReplyBody::Raw { content_type: "application/octet-stream", bytes: file.content.clone() })
            }
            Operation::DeleteFile => {
                self.files.remove(id);
                (200, ReplyBody::Json(json!({"id": id, "object": "file", "deleted": true})))
            }
            _ => (404, ReplyBody::Json(openai::resource_not_found())),
        }
    }

    /// This backend's files, newest first; `purpose` filters; `order`,
    /// `after` and `limit` (default and at most 10000) page.
    fn list(&self, query: &str) -> Value {
        let purpose = openai::query_param(query, "purpose").filter(|p| !p.is_empty());
        let objects = self.files.values().map(|f| &f.object);
        let items: Vec<&Value> = objects.filter(|o| purpose.is_none_or(|p| o["purpose"] == p)).collect();
        store::list_page(items, query, 10_000, 10_000)
    }
}

/// 404 body for a file id this backend does not have.
pub fn file_not_found(id: &str) -> Value {
    invalid_request(&format!("File with id '{id}' not found."), Some("id"), None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::multipart::tests::httpx_body;
    use crate::multipart::{self, Part};

    fn json_of(body: ReplyBody) -> Value {
        match body {
            ReplyBody::Json(v) => v,
            other => panic!("not JSON: {other:?}"),
        }
    }

    fn upload(store: &mut FileStore, purpose: &str, filename: &str, data: &[u8]) -> Value {
        let body = httpx_body(&[("purpose", purpose)], &[("file", filename, "application/octet-stream", data)]);
        let form = multipart::parse(&Bytes::from(body), multipart::tests::BOUNDARY).unwrap();
        store.upload(&form, 1_700_000_000).unwrap()
    }

    #[test]
    fn upload_retrieve_content_delete() {
        let mut store = FileStore::new("eastus");
        let data = b"{\"custom_id\":\"1\"}\r\n{\"custom_id\":\"2\"}\n";
        let file = upload(&mut store, "batch", "in.jsonl", data);
        let id = file["id"].as_str().unwrap().to_string();
        let hex = id.strip_prefix("file-").unwrap();
        assert!(hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        let want = json!({
            "id": id, "object": "file", "bytes": data.len(), "created_at": 1_700_000_000, "filename": "in.jsonl",
            "purpose": "batch", "status": "processed", "status_details": null, "expires_at": null
        });
        assert_eq!(file, want);
        assert_eq!(json_of(store.act(Operation::GetFile, Some(&id), "").1), want);
        let (status, content) = store.act(Operation::GetFileContent, Some(&id), "");
        let ReplyBody::Raw { content_type, bytes } = content else { panic!("not raw") };
        assert_eq!((status, content_type, bytes.as_ref()), (200, "application/octet-stream", &data[..]));
        let (status, deleted) = store.act(Operation::DeleteFile, Some(&id), "");
        assert_eq!((status, json_of(deleted)), (200, json!({"id": id, "object": "file", "deleted": true})));
        for op in [Operation::GetFile, Operation::GetFileContent, Operation::DeleteFile] {
            let (status, err) = store.act(op, Some(&id), "");
            assert_eq!((status, json_of(err)), (404, file_not_found(&id)), "{op:?}");
        }
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn list_is_this_backends_files() {
        let mut store = FileStore::new("eastus");
        let mut other = FileStore::new("eastus");
        let a = upload(&mut store, "batch", "a.jsonl", b"a");
        let b = upload(&mut store, "assistants", "b.txt", b"b");
        let elsewhere = upload(&mut other, "batch", "c.jsonl", b"c");
        let list = json_of(store.act(Operation::ListFiles, None, "").1);
        assert_eq!(
            (&list["object"], &list["data"], &list["has_more"]),
            (&json!("list"), &json!([b, a]), &json!(false))
        );
        let batch_only = json_of(store.act(Operation::ListFiles, None, "purpose=batch").1);
        assert_eq!(batch_only["data"], json!([a]));
        assert_eq!(store.act(Operation::GetFile, elsewhere["id"].as_str(), "").0, 404, "another backend's file");
    }

    #[test]
    fn upload_needs_purpose_and_file() {
        let mut store = FileStore::new("eastus");
        let part = |name: &str, filename: Option<&str>| Part {
            name: name.into(),
            filename: filename.map(str::to_string),
            content_type: None,
            data: Bytes::from_static(b"x"),
        };
        let no_file = Form { parts: vec![part("purpose", None), part("file", None)] };
        assert_eq!(store.upload(&no_file, 0), Err((400, openai::missing_parameter("file"))));
        let no_purpose = Form { parts: vec![part("file", Some("f"))] };
        assert_eq!(store.upload(&no_purpose, 0).unwrap_err().1["error"]["param"], "purpose");
        assert_eq!(store.len(), 0);
    }
}
