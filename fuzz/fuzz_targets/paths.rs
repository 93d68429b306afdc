//! Request paths: the safety check, the deployment segment and its rename,
//! `api-version`, realtime query parameters and stored-object routing.
//!
//! Input: the path (lossy UTF-8).
#![no_main]

use libfuzzer_sys::fuzz_target;
use spillway::paths;
use spillway::stateful::{self, Target};
use std::collections::BTreeMap;

const RENAMED: &str = "renamed-deployment_1.0";

fuzz_target!(|data: &[u8]| {
    let path = String::from_utf8_lossy(data);
    let path = path.as_ref();
    let path_part = path.split('?').next().unwrap_or("");

    let checked = paths::check(path);
    if checked.is_ok() {
        assert!(paths::is_api_path(path) && path.starts_with('/'));
        assert!(!path_part.split('/').any(|s| s == "." || s == ".."), "{path}");
        assert!(!path_part.contains('\\') && !path_part.bytes().any(|c| c <= b' '));
    }

    let deployment = paths::deployment(path);
    if let Some(d) = deployment {
        assert!(!d.is_empty() && !d.contains(['/', '?']));
        assert!(path.starts_with(&format!("/openai/deployments/{d}")));
    }

    // Renames: only the deployment segment changes, to the new name.
    let empty = BTreeMap::new();
    assert_eq!(paths::rename_deployment(path, &empty), path);
    let other: BTreeMap<String, String> = [("no/such".to_string(), RENAMED.to_string())].into();
    assert_eq!(paths::rename_deployment(path, &other), path);
    if let Some(d) = deployment {
        let renames: BTreeMap<String, String> = [(d.to_string(), RENAMED.to_string())].into();
        let renamed = paths::rename_deployment(path, &renames);
        assert_eq!(paths::deployment(&renamed), Some(RENAMED), "{path} -> {renamed}");
        assert_eq!(renamed.len() + d.len(), path.len() + RENAMED.len());
        if checked.is_ok() {
            assert_eq!(paths::check(&renamed), Ok(()), "{path} -> {renamed}");
        }
    }

    // api-version: added at most once, never changing what was there.
    for version in [Some("2024-10-21"), Some(""), None] {
        let with = paths::with_api_version(path, version);
        assert!(with.starts_with(path));
        assert_eq!(paths::with_api_version(&with, version), with, "not idempotent for {path:?}");
        if version.is_none() || !path.starts_with("/openai/") || path.starts_with("/openai/v1/") {
            assert_eq!(with, path);
        }
        if checked.is_ok() {
            assert_eq!(paths::check(&with), Ok(()), "{path} -> {with}");
        }
    }

    // Realtime: the deployment and key ride in the query.
    let realtime = paths::is_realtime(path);
    let rt_deployment = paths::realtime_deployment(path);
    let rt_key = paths::realtime_query_key(path);
    if !realtime {
        assert!(rt_deployment.is_none() && rt_key.is_none());
    }
    assert_eq!(paths::realtime_for_backend(path, &empty, false), path);
    let stripped = paths::realtime_for_backend(path, &empty, true);
    assert_eq!(paths::realtime_query_key(&stripped), None, "{path} -> {stripped}");
    assert_eq!(paths::is_realtime(&stripped), realtime);
    if let Some(d) = rt_deployment {
        assert!(!d.is_empty());
        let renames: BTreeMap<String, String> = [(d.to_string(), RENAMED.to_string())].into();
        let renamed = paths::realtime_for_backend(path, &renames, false);
        assert_eq!(paths::realtime_deployment(&renamed), Some(RENAMED), "{path} -> {renamed}");
    }

    // Stored objects: an id named in the path is a plain id from the path.
    match stateful::classify(path) {
        Target::Object(id) => {
            assert!(stateful::is_object_id(id), "{id:?}");
            assert!(path_part.contains(id));
        }
        Target::Collection(kind) => assert!(path_part.contains(kind.collection)),
        Target::Stateless => {}
    }
    for segment in path_part.split('/') {
        if stateful::is_object_id(segment) {
            assert!(
                segment.len() <= 128 && segment.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
            );
        }
    }
});
