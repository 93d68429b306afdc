//! The API's stateful objects. Stored responses, files, batches, vector
//! stores, fine-tuning jobs, containers, assistants, threads and uploads
//! exist only on the resource that created them: a request naming one must
//! reach that backend. Creations and list calls of most kinds go to one home
//! backend, so a batch finds its input file and a list shows everything;
//! Responses API creations are balanced (each response then stays where it
//! was made).

/// One kind of stateful object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// Path segment(s) of the collection after `/openai/v1/`, `/openai/` or `/v1/`.
    pub collection: &'static str,
    /// The `object` field of its JSON.
    pub object: &'static str,
    pub id_prefix: &'static str,
    /// Creations and lists go to the home backend (else: balanced).
    pub at_home: bool,
}

pub const KINDS: [Kind; 9] = [
    Kind { collection: "responses", object: "response", id_prefix: "resp_", at_home: false },
    Kind { collection: "files", object: "file", id_prefix: "file-", at_home: true },
    Kind { collection: "batches", object: "batch", id_prefix: "batch_", at_home: true },
    Kind { collection: "vector_stores", object: "vector_store", id_prefix: "vs_", at_home: true },
    Kind { collection: "fine_tuning/jobs", object: "fine_tuning.job", id_prefix: "ftjob-", at_home: true },
    Kind { collection: "containers", object: "container", id_prefix: "cntr_", at_home: true },
    Kind { collection: "assistants", object: "assistant", id_prefix: "asst_", at_home: true },
    Kind { collection: "threads", object: "thread", id_prefix: "thread_", at_home: true },
    Kind { collection: "uploads", object: "upload", id_prefix: "upload_", at_home: true },
];

/// What a request path addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// Nothing stored: balanced.
    Stateless,
    /// One stored object (and what hangs off it: `/cancel`, `/content`, ...).
    Object(&'a str),
    /// A collection: a creation or a list.
    Collection(&'static Kind),
}

const PLANES: [&str; 3] = ["/openai/v1/", "/openai/", "/v1/"];

pub fn classify(path: &str) -> Target<'_> {
    let path = path.split('?').next().unwrap_or("");
    for plane in PLANES {
        let Some(rest) = path.strip_prefix(plane) else { continue };
        for kind in &KINDS {
            let Some(after) = rest.strip_prefix(kind.collection) else { continue };
            if after.is_empty() || after == "/" {
                return Target::Collection(kind);
            }
            let Some(tail) = after.strip_prefix('/') else { continue };
            let id = tail.split('/').next().unwrap_or("");
            return if is_object_id(id) { Target::Object(id) } else { Target::Collection(kind) };
        }
    }
    Target::Stateless
}

/// An id of one of the stateful kinds, in the plain characters ids use.
pub fn is_object_id(id: &str) -> bool {
    KINDS.iter().any(|k| id.len() > k.id_prefix.len() && id.starts_with(k.id_prefix))
        && id.len() <= 128
        && id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

/// The id of a stored object an answer describes (`object` names its kind).
pub fn answer_object_id<'a>(object: &str, id: &'a str) -> Option<&'a str> {
    KINDS.iter().any(|k| k.object == object && id.starts_with(k.id_prefix) && is_object_id(id)).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_objects_and_collections() {
        assert_eq!(classify("/openai/v1/responses/resp_1a/cancel"), Target::Object("resp_1a"));
        assert_eq!(classify("/openai/responses/resp_1a?api-version=x"), Target::Object("resp_1a"));
        assert_eq!(classify("/v1/files/file-abc/content"), Target::Object("file-abc"));
        assert_eq!(classify("/openai/files/file-abc?api-version=x"), Target::Object("file-abc"));
        assert_eq!(classify("/openai/v1/fine_tuning/jobs/ftjob-9/events"), Target::Object("ftjob-9"));
        assert_eq!(classify("/openai/threads/thread_7/messages"), Target::Object("thread_7"));
        assert!(matches!(classify("/openai/v1/files"), Target::Collection(k) if k.at_home));
        assert!(
            matches!(classify("/openai/batches?api-version=x"), Target::Collection(k) if k.collection == "batches")
        );
        assert!(matches!(classify("/openai/v1/responses"), Target::Collection(k) if !k.at_home));
        assert!(matches!(classify("/openai/threads/runs"), Target::Collection(k) if k.collection == "threads"));
        for stateless in [
            "/openai/deployments/gpt-4o/chat/completions",
            "/openai/v1/chat/completions",
            "/openai/v1/responsesx",
            "/openai/v1/models",
        ] {
            assert_eq!(classify(stateless), Target::Stateless, "{stateless}");
        }
    }

    #[test]
    fn ids_and_answers() {
        assert!(is_object_id("resp_0a1b") && is_object_id("file-xyz") && is_object_id("batch_1"));
        assert!(!is_object_id("resp_") && !is_object_id("chatcmpl-1") && !is_object_id("resp_a b"));
        assert_eq!(answer_object_id("file", "file-1"), Some("file-1"));
        assert_eq!(answer_object_id("response", "resp_1"), Some("resp_1"));
        assert_eq!(answer_object_id("list", "resp_1"), None);
        assert_eq!(answer_object_id("file", "resp_1"), None);
    }
}
