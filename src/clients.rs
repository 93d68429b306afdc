//! Client authentication: which configured client a request's key belongs to.

use crate::config::Client;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// No clients configured: the gateway is open.
    Open,
    /// Index into `Config::clients`.
    Client(usize),
    Missing,
    Invalid,
}

/// Request headers a client may use for its credentials; the request role
/// removes them when clients are configured so no client key goes upstream.
pub const CLIENT_CREDENTIAL_HEADERS: [&str; 3] = ["api-key", "ocp-apim-subscription-key", "authorization"];

/// The credential a client sent, from the headers clients use: `api-key`
/// (AzureOpenAI SDK), `Ocp-Apim-Subscription-Key` (API Management habit),
/// `Authorization: Bearer` (OpenAI SDK), in that order.
pub fn presented_key<'a>(
    api_key: Option<&'a str>,
    apim_key: Option<&'a str>,
    authorization: Option<&'a str>,
) -> Option<&'a str> {
    let bearer = authorization.and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    [api_key.map(str::trim), apim_key.map(str::trim), bearer].into_iter().flatten().find(|k| !k.is_empty())
}

pub fn authenticate(clients: &[Client], presented: Option<&str>) -> Auth {
    if clients.is_empty() {
        return Auth::Open;
    }
    let Some(presented) = presented else { return Auth::Missing };
    // Compare against every key without stopping early, so timing does not
    // tell how many clients exist or which one nearly matched.
    let mut found = None;
    for (i, c) in clients.iter().enumerate() {
        if let Some(key) = &c.key {
            if constant_time_eq(presented.as_bytes(), key.expose().as_bytes()) {
                found = Some(i);
            }
        }
    }
    found.map_or(Auth::Invalid, Auth::Client)
}

/// Equality whose time depends only on the lengths, not on where bytes differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, y) in b.iter().enumerate() {
        let x = a.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Keys};

    fn clients() -> Vec<Client> {
        let json = r#"{"backends":[{"name":"a","url":"http://x"}],"clients":[
            {"name":"team-a","key":"key-of-team-a"},{"name":"team-b","key":"key-of-team-b"}]}"#;
        Config::parse(json.as_bytes(), Keys::NamesOnly).unwrap().clients
    }

    #[test]
    fn each_header_form_is_accepted() {
        let c = clients();
        assert_eq!(authenticate(&c, presented_key(Some("key-of-team-b"), None, None)), Auth::Client(1));
        assert_eq!(authenticate(&c, presented_key(None, Some("key-of-team-a"), None)), Auth::Client(0));
        assert_eq!(authenticate(&c, presented_key(None, None, Some("Bearer key-of-team-a"))), Auth::Client(0));
        assert_eq!(authenticate(&c, presented_key(None, None, Some("bearer  key-of-team-b "))), Auth::Client(1));
    }

    #[test]
    fn missing_and_wrong_keys() {
        let c = clients();
        assert_eq!(authenticate(&c, presented_key(None, None, None)), Auth::Missing);
        assert_eq!(authenticate(&c, presented_key(Some(""), None, Some("Basic abc"))), Auth::Missing);
        assert_eq!(authenticate(&c, presented_key(Some("key-of-team-c"), None, None)), Auth::Invalid);
        assert_eq!(authenticate(&c, presented_key(Some("key-of-team-a-and-more"), None, None)), Auth::Invalid);
        assert_eq!(authenticate(&c, presented_key(Some("key-of"), None, None)), Auth::Invalid);
        assert_eq!(authenticate(&[], None), Auth::Open);
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abc\0", b"abc"));
        assert!(constant_time_eq(b"", b""));
    }
}
