//! Which credential each attempt carries. A backend with a key gets exactly
//! its key; a backend without one (pass-through, e.g. Entra ID tokens) gets
//! the client's own credential — never another backend's key, even after a
//! failover from a keyed backend rewrote the shared header map.
//!
//! Envoy gives all attempts of a request one header map, so the client's
//! original credential cannot wait in a header for a later attempt (every
//! backend would see it). The request role stashes it in shared data
//! instead, under a slot of a fixed ring and a random token; the request
//! carries only `slot.token` in an internal header, useless without the
//! process's shared data. The request role clears its slot when it ends;
//! the ring bounds memory however many requests never end cleanly:
//! `SLOTS` entries of at most `MAX_CREDENTIAL` bytes each.

use crate::contract::shared_data::{CREDENTIAL_PREFIX, CREDENTIAL_ROTATION};
use crate::store::{self, SharedStore};

/// Slots in the ring: a stash is overwritten only after this many newer
/// requests stashed theirs, far more than are in flight at once.
pub const SLOTS: u64 = 4096;
/// Longest credential header value kept (an Entra ID token is ~2-3 KB).
pub const MAX_CREDENTIAL: usize = 16 * 1024;

/// The client's credential headers as it sent them (bytes: they may not be
/// UTF-8, and are passed on untouched).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCredential {
    pub api_key: Option<Vec<u8>>,
    pub authorization: Option<Vec<u8>>,
}

/// What a pass-through attempt does with the credential headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassThrough {
    /// Nothing rewrote them: leave them as the client sent them.
    Leave,
    /// Put these back (the client's own).
    Restore(ClientCredential),
    /// Remove both: the client's own is gone (gateway keys are never
    /// forwarded, or the stash was overwritten) and another backend's key
    /// must not go out in its place.
    Strip,
}

fn slot_key(slot: u64) -> String {
    format!("{CREDENTIAL_PREFIX}{slot}")
}

/// Stashes the client's credential; returns the internal header value that
/// finds it again, or `None` when nothing needs stashing or it cannot be
/// kept (then pass-through attempts after a keyed one send no credential).
pub fn stash(store: &dyn SharedStore, token: &str, credential: &ClientCredential) -> Option<String> {
    if credential.api_key.is_none() && credential.authorization.is_none() {
        return None;
    }
    let too_long = |v: &Option<Vec<u8>>| v.as_ref().is_some_and(|b| b.len() > MAX_CREDENTIAL);
    if too_long(&credential.api_key) || too_long(&credential.authorization) {
        return None;
    }
    let slot = store::fetch_increment(store, CREDENTIAL_ROTATION) % SLOTS;
    let entry = encode(token, credential);
    let key = slot_key(slot);
    store::update(store, &key, |_| ((), Some(entry.clone())))?;
    Some(format!("{slot}.{token}"))
}

/// The credential a stash header names, if its slot still holds it.
pub fn recall(store: &dyn SharedStore, header: &str) -> Option<ClientCredential> {
    let (slot, token) = parse_header(header)?;
    let (bytes, _) = store.get(&slot_key(slot));
    decode(&bytes?, token)
}

/// Empties the slot if it still holds this request's stash, so the secret
/// does not outlive the request.
pub fn clear(store: &dyn SharedStore, header: &str) {
    let Some((slot, token)) = parse_header(header) else { return };
    store::update(store, &slot_key(slot), |current| {
        let ours = current.is_some_and(|b| decode(b, token).is_some());
        ((), ours.then(Vec::new))
    });
}

fn parse_header(header: &str) -> Option<(u64, &str)> {
    let (slot, token) = header.split_once('.')?;
    let slot: u64 = slot.parse().ok().filter(|s| *s < SLOTS)?;
    (!token.is_empty()).then_some((slot, token))
}

/// `token \n api-key-flag api-key \n authorization-flag authorization`, with
/// lengths so any bytes survive: `token` then for each header a `0` (absent)
/// or `1` + 4-byte little-endian length + the bytes.
/// Public for the fuzz targets (`fuzz/`), like `decode`.
pub fn encode(token: &str, c: &ClientCredential) -> Vec<u8> {
    let mut out = Vec::with_capacity(token.len() + 16);
    out.extend_from_slice(token.as_bytes());
    out.push(b'\n');
    for value in [&c.api_key, &c.authorization] {
        match value {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&u32::try_from(v.len()).unwrap_or(u32::MAX).to_le_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    out
}

/// What `encode` wrote, when it was written for `token`.
pub fn decode(bytes: &[u8], token: &str) -> Option<ClientCredential> {
    let rest = bytes.strip_prefix(token.as_bytes())?.strip_prefix(b"\n")?;
    let (api_key, rest) = decode_value(rest)?;
    let (authorization, rest) = decode_value(rest)?;
    rest.is_empty().then_some(ClientCredential { api_key, authorization })
}

fn decode_value(bytes: &[u8]) -> Option<(Option<Vec<u8>>, &[u8])> {
    let (flag, rest) = bytes.split_first()?;
    match flag {
        0 => Some((None, rest)),
        1 => {
            let len = usize::try_from(u32::from_le_bytes(rest.get(..4)?.try_into().ok()?)).ok()?;
            // Checked: on wasm32 a length near u32::MAX would overflow usize.
            let end = len.checked_add(4)?;
            let value = rest.get(4..end)?;
            Some((Some(value.to_vec()), rest.get(end..)?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemoryStore;

    fn cred(api_key: Option<&[u8]>, authorization: Option<&[u8]>) -> ClientCredential {
        ClientCredential { api_key: api_key.map(<[u8]>::to_vec), authorization: authorization.map(<[u8]>::to_vec) }
    }

    #[test]
    fn a_stash_comes_back_only_with_its_token() {
        let s = MemoryStore::default();
        let c = cred(None, Some(b"Bearer \xff entra-token"));
        let header = stash(&s, "t0k3n", &c).unwrap();
        assert_eq!(header, "0.t0k3n");
        assert_eq!(recall(&s, &header), Some(c.clone()));
        assert_eq!(recall(&s, "0.other-token"), None);
        assert_eq!(recall(&s, "0."), None);
        assert_eq!(recall(&s, "9999999.t0k3n"), None);
        assert_eq!(recall(&s, "junk"), None);
        // Clearing needs the token too, and leaves nothing behind.
        clear(&s, "0.other-token");
        assert_eq!(recall(&s, &header), Some(c));
        clear(&s, &header);
        assert_eq!(recall(&s, &header), None);
        assert_eq!(s.get("spillway.credential.0").0, Some(Vec::new()));
    }

    #[test]
    fn the_ring_is_bounded_and_an_overwritten_stash_is_gone() {
        let s = MemoryStore::default();
        let first = stash(&s, "first", &cred(Some(b"k1"), None)).unwrap();
        for i in 0..SLOTS {
            stash(&s, &format!("t{i}"), &cred(Some(b"k"), None)).unwrap();
        }
        assert_eq!(recall(&s, &first), None);
        assert!(s.get(&slot_key(SLOTS)).0.is_none(), "no slot beyond the ring");
    }

    #[test]
    fn nothing_to_stash_or_too_much() {
        let s = MemoryStore::default();
        assert_eq!(stash(&s, "t", &ClientCredential::default()), None);
        let huge = vec![b'a'; MAX_CREDENTIAL + 1];
        assert_eq!(stash(&s, "t", &cred(Some(&huge), None)), None);
    }
}
