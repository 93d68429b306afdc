//! Request paths: which ones Spillway serves, the Azure `api-version` query
//! parameter, and renaming the deployment segment per backend.

use std::collections::BTreeMap;

const AZURE_DEPLOYMENTS: &str = "/openai/deployments/";

/// Azure (`/openai/...`) and OpenAI-style (`/v1/...`) API paths.
pub fn is_api_path(path: &str) -> bool {
    path.starts_with("/openai/") || path.starts_with("/v1/")
}

/// Why a path may not go to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathProblem {
    /// Not one of the APIs Spillway serves.
    NotApi,
    /// Could name something else once a server resolves it: dot segments,
    /// empty segments, (encoded) slashes or backslashes, control bytes.
    Ambiguous,
    /// The deployment segment is not a plain deployment name.
    BadDeployment,
}

/// Checks a request path before it goes anywhere with a backend's key.
/// Envoy normalises paths in the rendered config; this holds wherever the
/// filter runs (another listener, Istio), and a prefix check alone would
/// let `/openai/../admin` through.
pub fn check(path: &str) -> Result<(), PathProblem> {
    let (path_part, _) = split_query(path);
    let lower = path_part.to_ascii_lowercase();
    let ambiguous = path_part.bytes().any(|c| c == b'\\' || c <= b' ' || c == 0x7f || c == b'#')
        || ["%2e", "%2f", "%5c", "%00"].iter().any(|enc| lower.contains(enc))
        || !path_part.starts_with('/')
        || segments_are_ambiguous(path_part);
    if ambiguous {
        return Err(PathProblem::Ambiguous);
    }
    if !is_api_path(path_part) {
        return Err(PathProblem::NotApi);
    }
    if path_part.starts_with(AZURE_DEPLOYMENTS) {
        match deployment(path_part) {
            Some(d) if is_plain_deployment(d) => {}
            _ => return Err(PathProblem::BadDeployment),
        }
    }
    Ok(())
}

/// Dot segments anywhere, or an empty segment before the last (`//`; a
/// trailing slash is fine).
fn segments_are_ambiguous(path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    segments.iter().enumerate().any(|(i, seg)| seg == &"." || seg == &".." || (seg.is_empty() && i < last))
}

/// Azure deployment names: letters, digits, `-`, `_` and `.`, at most 64.
fn is_plain_deployment(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Azure's classic data plane needs `api-version`; the `/openai/v1/` plane does not.
pub fn with_api_version(path: &str, version: Option<&str>) -> String {
    let Some(version) = version else { return path.to_string() };
    if !path.starts_with("/openai/") || path.starts_with("/openai/v1/") {
        return path.to_string();
    }
    let (_, query) = split_query(path);
    let has_version = query.is_some_and(|q| q.split('&').any(|kv| kv.split('=').next() == Some("api-version")));
    if has_version {
        return path.to_string();
    }
    let sep = match query {
        None => "?",
        Some("") => "",
        Some(_) => "&",
    };
    format!("{path}{sep}api-version={version}")
}

/// The model a path names: a classic path's deployment, or a realtime
/// path's `deployment`/`model` query parameter.
pub fn model_in_path(path: &str) -> Option<&str> {
    deployment(path).or_else(|| realtime_deployment(path))
}

/// A classic API path (`/openai/deployments/...`): the deployment, the
/// model, is in the path.
pub fn is_deployment_path(path: &str) -> bool {
    path.starts_with(AZURE_DEPLOYMENTS)
}

/// The deployment named in an Azure classic path, if any.
pub fn deployment(path: &str) -> Option<&str> {
    let rest = path.strip_prefix(AZURE_DEPLOYMENTS)?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    rest.get(..end).filter(|d| !d.is_empty())
}

/// Renames the deployment segment according to a backend's `deployments` map.
pub fn rename_deployment(path: &str, renames: &BTreeMap<String, String>) -> String {
    if renames.is_empty() {
        return path.to_string();
    }
    match deployment(path).and_then(|d| renames.get(d).map(|to| (d.len(), to))) {
        Some((len, to)) => {
            let start = AZURE_DEPLOYMENTS.len();
            let tail = path.get(start + len..).unwrap_or("");
            format!("{AZURE_DEPLOYMENTS}{to}{tail}")
        }
        None => path.to_string(),
    }
}

const REALTIME_PATHS: [&str; 3] = ["/openai/realtime", "/openai/v1/realtime", "/v1/realtime"];
/// Query parameters that carry a realtime connection's deployment (GA:
/// `model`, preview: `deployment`).
const REALTIME_DEPLOYMENT_PARAMS: [&str; 2] = ["model", "deployment"];

/// A Realtime API websocket path.
pub fn is_realtime(path: &str) -> bool {
    REALTIME_PATHS.contains(&split_query(path).0)
}

/// The deployment a realtime connection names in its query.
pub fn realtime_deployment(path: &str) -> Option<&str> {
    if !is_realtime(path) {
        return None;
    }
    let (_, query) = split_query(path);
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (REALTIME_DEPLOYMENT_PARAMS.contains(&k) && !v.is_empty()).then_some(v)
    })
}

/// The `api-key` query parameter browsers use for realtime connections.
pub fn realtime_query_key(path: &str) -> Option<&str> {
    if !is_realtime(path) {
        return None;
    }
    split_query(path).1?.split('&').find_map(|kv| kv.strip_prefix("api-key="))
}

/// A realtime path for one backend: its deployment name in the query, and
/// without the client's `api-key` parameter when the backend's own key goes
/// in the header (a key in a path would reach access logs).
pub fn realtime_for_backend(path: &str, renames: &BTreeMap<String, String>, drop_query_key: bool) -> String {
    let (base, Some(query)) = split_query(path) else { return path.to_string() };
    let params: Vec<String> = query
        .split('&')
        .filter(|kv| !(drop_query_key && kv.starts_with("api-key=")))
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if REALTIME_DEPLOYMENT_PARAMS.contains(&k) => {
                format!("{k}={}", renames.get(v).map_or(v, String::as_str))
            }
            _ => kv.to_string(),
        })
        .collect();
    if params.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", params.join("&"))
    }
}

fn split_query(path: &str) -> (&str, Option<&str>) {
    match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_paths() {
        assert!(is_api_path("/openai/deployments/x/chat/completions"));
        assert!(is_api_path("/v1/embeddings"));
        assert!(!is_api_path("/"));
        assert!(!is_api_path("/openaix"));
        assert!(!is_api_path("/admin"));
    }

    #[test]
    fn only_plain_api_paths_pass() {
        for ok in [
            "/openai/deployments/gpt-4o/chat/completions?api-version=1",
            "/openai/deployments/gpt-4.1-mini_2/embeddings",
            "/v1/chat/completions",
            "/openai/v1/responses?x=../y",
            "/openai/deployments/dall-e-3/images/generations",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("/", PathProblem::NotApi),
            ("/admin", PathProblem::NotApi),
            ("/openaix/y", PathProblem::NotApi),
            ("/openai/../admin", PathProblem::Ambiguous),
            ("/openai/deployments/gpt-4o/../../admin", PathProblem::Ambiguous),
            ("/openai/./deployments/x/chat/completions", PathProblem::Ambiguous),
            ("/openai/%2e%2e/admin", PathProblem::Ambiguous),
            ("/openai/%2E%2e/admin", PathProblem::Ambiguous),
            ("//openai/deployments/x/chat", PathProblem::Ambiguous),
            ("/openai//deployments/x/chat", PathProblem::Ambiguous),
            ("/openai/deployments/a%2Fb/chat/completions", PathProblem::Ambiguous),
            ("/openai/deployments/a%5cb/chat/completions", PathProblem::Ambiguous),
            ("/openai/deployments/a\\b/chat/completions", PathProblem::Ambiguous),
            ("/openai/deployments/a%00/chat/completions", PathProblem::Ambiguous),
            ("/openai/deployments/", PathProblem::BadDeployment),
            ("openai/deployments/x/chat", PathProblem::Ambiguous),
            ("/openai/deployments/a%20b/chat/completions", PathProblem::BadDeployment),
            ("/openai/deployments/a:b/chat/completions", PathProblem::BadDeployment),
        ] {
            assert_eq!(check(bad), Err(why), "{bad}");
        }
    }

    #[test]
    fn realtime_paths_carry_deployment_and_key_in_the_query() {
        let ga = "/openai/v1/realtime?model=gpt-realtime&api-key=client-key";
        let preview = "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-rt";
        assert!(is_realtime(ga) && is_realtime(preview) && !is_realtime("/openai/v1/realtimex"));
        assert_eq!(realtime_deployment(ga), Some("gpt-realtime"));
        assert_eq!(realtime_deployment(preview), Some("gpt-4o-rt"));
        assert_eq!(realtime_deployment("/openai/v1/chat/completions?model=x"), None);
        assert_eq!(realtime_query_key(ga), Some("client-key"));
        let map: BTreeMap<String, String> = [("gpt-realtime".to_string(), "rt-east".to_string())].into();
        assert_eq!(realtime_for_backend(ga, &map, true), "/openai/v1/realtime?model=rt-east");
        assert_eq!(realtime_for_backend(ga, &BTreeMap::new(), false), ga);
        assert_eq!(realtime_for_backend("/openai/v1/realtime?api-key=k", &map, true), "/openai/v1/realtime");
    }

    #[test]
    fn adds_api_version_only_when_missing_and_needed() {
        let v = Some("2024-10-21");
        assert_eq!(
            with_api_version("/openai/deployments/g/chat/completions", v),
            "/openai/deployments/g/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            with_api_version("/openai/deployments/g/embeddings?x=1", v),
            "/openai/deployments/g/embeddings?x=1&api-version=2024-10-21"
        );
        assert_eq!(
            with_api_version("/openai/deployments/g/embeddings?", v),
            "/openai/deployments/g/embeddings?api-version=2024-10-21"
        );
        let kept = "/openai/deployments/g/embeddings?api-version=2023-05-15";
        assert_eq!(with_api_version(kept, v), kept);
        assert_eq!(with_api_version("/openai/v1/chat/completions", v), "/openai/v1/chat/completions");
        assert_eq!(with_api_version("/v1/chat/completions", v), "/v1/chat/completions");
        assert_eq!(with_api_version("/openai/deployments/g/x", None), "/openai/deployments/g/x");
    }

    #[test]
    fn renames_the_deployment_segment() {
        let map: BTreeMap<String, String> = [("gpt-4o".to_string(), "gpt-4o-ptu".to_string())].into();
        assert_eq!(
            rename_deployment("/openai/deployments/gpt-4o/chat/completions?api-version=1", &map),
            "/openai/deployments/gpt-4o-ptu/chat/completions?api-version=1"
        );
        assert_eq!(rename_deployment("/openai/deployments/gpt-4o?x", &map), "/openai/deployments/gpt-4o-ptu?x");
        let other = "/openai/deployments/gpt-4o-mini/chat/completions";
        assert_eq!(rename_deployment(other, &map), other);
        assert_eq!(rename_deployment("/v1/chat/completions", &map), "/v1/chat/completions");
        assert_eq!(deployment("/openai/deployments//chat"), None);
        assert_eq!(deployment("/openai/deployments/dall-e-3/images/generations"), Some("dall-e-3"));
    }
}
