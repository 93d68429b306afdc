//! OpenTelemetry GenAI semantic conventions: the names under which token
//! telemetry is also exported, so dashboards built for those conventions
//! work unchanged. Metric attributes become Prometheus labels with dots
//! turned into underscores (`gen_ai.token.type` -> `gen_ai_token_type`), as
//! OpenTelemetry's own Prometheus exporter names them.

/// `gen_ai.client.token.usage`: a histogram of tokens per request and type.
pub const TOKEN_USAGE: &str = "gen_ai_client_token_usage";

/// `gen_ai.provider.name` for Azure OpenAI and its OpenAI-compatible peers
/// (in the log line; a metric label value cannot hold its dots).
pub const PROVIDER: &str = "azure.ai.openai";

/// `gen_ai.operation.name` for a request path: the convention's well-known
/// values where one fits, else the API's own operation.
pub fn operation(path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or("");
    const OPERATIONS: [(&str, &str); 10] = [
        ("/chat/completions", "chat"),
        ("/completions", "text_completion"),
        ("/embeddings", "embeddings"),
        ("/responses", "chat"),
        ("/images/generations", "generate_content"),
        ("/images/edits", "generate_content"),
        ("/audio/speech", "generate_content"),
        ("/audio/transcriptions", "generate_content"),
        ("/audio/translations", "generate_content"),
        ("/realtime", "chat"),
    ];
    OPERATIONS.iter().find(|(suffix, _)| path.ends_with(suffix)).map_or("other", |(_, op)| op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_follow_the_convention() {
        assert_eq!(operation("/openai/deployments/x/chat/completions?api-version=1"), "chat");
        assert_eq!(operation("/openai/v1/responses"), "chat");
        assert_eq!(operation("/openai/deployments/x/completions"), "text_completion");
        assert_eq!(operation("/openai/v1/embeddings"), "embeddings");
        assert_eq!(operation("/openai/v1/files"), "other");
    }
}
