//! Answers the gateway gives itself, in the OpenAI error shape clients
//! already parse: `{"error":{"message","type","param","code"}}`.

use crate::contract::header;

/// A response the filter answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl LocalReply {
    /// An OpenAI-style JSON error.
    pub fn error(status: u32, code: &str, message: &str) -> LocalReply {
        let body = serde_json::json!({
            "error": { "message": message, "type": error_type(status), "param": null, "code": code }
        })
        .to_string();
        LocalReply { status, headers: vec![("content-type", "application/json".to_string())], body }
    }

    /// The wait its `retry-after-ms` tells, when it has one.
    pub fn retry_after_ms(&self) -> Option<u64> {
        self.headers.iter().find(|(k, _)| *k == "retry-after-ms").and_then(|(_, v)| v.parse().ok())
    }

    /// The path is not one of the APIs Spillway serves.
    pub fn not_found() -> LocalReply {
        LocalReply::error(
            404,
            "404",
            "Resource not found: Spillway serves /openai/... (Azure OpenAI) and /v1/... (OpenAI) paths",
        )
    }

    /// A path that could mean something else once resolved (`..`, `//`,
    /// encoded slashes): refused rather than guessed.
    pub fn ambiguous_path() -> LocalReply {
        LocalReply::error(
            400,
            "InvalidPath",
            "The request path has dot segments, empty segments, encoded slashes or control characters.",
        )
    }

    /// The deployment segment is not a plain deployment name.
    pub fn bad_deployment_name() -> LocalReply {
        LocalReply::error(400, "InvalidDeploymentName", "Deployment names are 1-64 letters, digits, '-', '_' or '.'.")
    }

    /// No backend serves the model (or deployment) the request names: Azure's
    /// own answer for a deployment a resource does not have.
    pub fn model_not_found(model: &str) -> LocalReply {
        LocalReply::error(
            404,
            "DeploymentNotFound",
            &format!("The API deployment {model} does not exist on any backend of this gateway."),
        )
    }

    /// No gateway key, or one no client has.
    pub fn unauthorized() -> LocalReply {
        LocalReply::error(
            401,
            "401",
            "Access denied due to a missing or invalid key. Send your gateway key in the api-key header (or Authorization: Bearer).",
        )
    }

    /// The request names a model longer than any deployment name.
    pub fn model_name_too_long(max: usize) -> LocalReply {
        LocalReply::error(400, "InvalidModel", &format!("The model name is longer than {max} characters."))
    }

    /// A token-limited client sent a body whose size cannot be known before
    /// it is forwarded (no `content-length`, not JSON).
    pub fn length_required() -> LocalReply {
        LocalReply::error(
            411,
            "LengthRequired",
            "This client has a token limit: send the request body with a content-length header, or as JSON.",
        )
    }

    /// A client's own request or token limit is spent.
    pub fn client_limited(client: &str, by_tokens: bool, wait_ms: u64) -> LocalReply {
        let what = if by_tokens { "token" } else { "request" };
        let secs = retry_after_secs(wait_ms);
        let mut reply = LocalReply::error(
            429,
            "429",
            &format!("Client {client} exceeded its {what} rate limit. Please retry after {secs} seconds."),
        );
        reply.headers.extend(retry_after_headers(wait_ms));
        reply
    }

    /// The backend holding the stored state a request names is throttled or
    /// open, and no other backend could answer it: 429 with its wait.
    pub fn owner_busy(wait_ms: u64) -> LocalReply {
        LocalReply::unavailable("The backend holding this response is", wait_ms)
    }

    /// Every backend is throttled or open: 429 with the wait until the first
    /// one frees.
    pub fn all_busy(wait_ms: u64) -> LocalReply {
        LocalReply::unavailable("All backends are", wait_ms)
    }

    /// Global client limits with `failure_mode: closed`, and the
    /// rate-limit service did not answer: nothing is forwarded uncounted.
    pub fn limit_service_unavailable() -> LocalReply {
        let mut reply = LocalReply::error(
            503,
            "rate_limit_service_unavailable",
            "The gateway cannot check your rate limits right now. Please retry after 1 second.",
        );
        reply.headers.extend(retry_after_headers(1_000));
        reply
    }

    fn unavailable(who: &str, wait_ms: u64) -> LocalReply {
        let secs = retry_after_secs(wait_ms);
        let message = format!("{who} throttled or unavailable. Please retry after {secs} seconds.");
        let mut reply = LocalReply::error(429, "429", &message);
        reply.headers.extend(retry_after_headers(wait_ms));
        reply.headers.push((header::ATTEMPTS, "0".to_string()));
        reply
    }
}

fn error_type(status: u32) -> &'static str {
    match status {
        401 => "authentication_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

/// `retry-after` in whole seconds: rounded up and at least 1, so a client
/// that obeys it never comes back before the real wait is over.
pub fn retry_after_secs(wait_ms: u64) -> u64 {
    wait_ms.div_ceil(1000).max(1)
}

/// The longest `retry-after-ms` the openai SDKs obey; above it they ignore
/// the header and come back after their own short backoff.
pub const SDK_MAX_RETRY_AFTER_MS: u64 = 60_000;

/// `retry-after` and `retry-after-ms` for a wait (at least 1 ms). The
/// seconds tell the whole wait; the milliseconds stop at what the SDKs
/// obey, so a longer wait makes them come back once a minute rather than
/// every second or so.
pub fn retry_after_headers(wait_ms: u64) -> [(&'static str, String); 2] {
    let wait_ms = wait_ms.max(1);
    [
        ("retry-after", retry_after_secs(wait_ms).to_string()),
        ("retry-after-ms", wait_ms.min(SDK_MAX_RETRY_AFTER_MS).to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn header<'a>(r: &'a LocalReply, name: &str) -> Option<&'a str> {
        r.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn retry_after_never_undershoots_the_wait() {
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(1000), 1);
        assert_eq!(retry_after_secs(1001), 2);
        let busy = LocalReply::all_busy(7_500);
        assert_eq!(header(&busy, "retry-after"), Some("8"));
        assert_eq!(header(&busy, "retry-after-ms"), Some("7500"));
        assert_eq!(header(&busy, header::ATTEMPTS), Some("0"));
        assert_eq!(header(&LocalReply::all_busy(0), "retry-after-ms"), Some("1"));
        let long = LocalReply::all_busy(300_000);
        assert_eq!((header(&long, "retry-after"), header(&long, "retry-after-ms")), (Some("300"), Some("60000")));
    }

    #[test]
    fn errors_have_the_openai_shape() {
        for (reply, status, kind) in [
            (LocalReply::not_found(), 404, "not_found_error"),
            (LocalReply::unauthorized(), 401, "authentication_error"),
            (LocalReply::client_limited("team-a", true, 2_000), 429, "rate_limit_error"),
            (LocalReply::error(400, "bad", "bad"), 400, "invalid_request_error"),
            (LocalReply::error(503, "x", "x"), 503, "server_error"),
        ] {
            assert_eq!(reply.status, status);
            let body: Value = serde_json::from_str(&reply.body).unwrap();
            assert_eq!(body["error"]["type"], kind);
            assert!(body["error"]["message"].is_string());
            assert_eq!(header(&reply, "content-type"), Some("application/json"));
        }
        let limited = LocalReply::client_limited("team-a", true, 2_000);
        assert!(limited.body.contains("team-a exceeded its token rate limit"), "{}", limited.body);
        assert_eq!(header(&limited, "retry-after"), Some("2"));
    }
}
