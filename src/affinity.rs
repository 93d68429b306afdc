//! Stored state stays with its owner. A stored object (a response, a file,
//! a batch, ...; `stateful`) exists only on the backend that created it:
//! follow-ups (`previous_response_id`), retrievals, deletes, cancels, stream
//! resumes and polls must go there. The request role learns `id -> backend`
//! from every answer that carries such an id and keeps it in shared data.
//!
//! Shared data cannot delete keys, so the map is a fixed table: an id's slot
//! is a hash of the id, and a newer id in the same slot replaces the older.
//! Bounded: `SLOTS` keys of at most ~200 bytes, about 3 MiB with Envoy's
//! per-key overhead. Entries expire after `TTL_MS` (Azure keeps stored
//! responses 30 days). An id that is not known (replaced, expired, another
//! Envoy replica, a restart) is looked up by trying the backends in order.

use crate::contract::shared_data::AFFINITY_PREFIX;
use crate::stateful::is_object_id;
use crate::store::{self, SharedStore};

/// Slots in the table.
pub const SLOTS: u64 = 16_384;
/// How long an id is remembered.
pub const TTL_MS: u64 = 30 * 24 * 3_600 * 1_000;

/// FNV-1a: a fixed, fast spread of ids over slots.
fn slot(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)) % SLOTS
}

fn key(id: &str) -> String {
    format!("{AFFINITY_PREFIX}{}", slot(id))
}

/// Remembers that `backend` holds `id`.
pub fn remember(store: &dyn SharedStore, id: &str, backend: &str, now_ms: u64) {
    if !is_object_id(id) {
        return;
    }
    let entry = format!("{} {backend} {id}", now_ms.saturating_add(TTL_MS)).into_bytes();
    store::update(store, &key(id), |current| {
        // The same answer seen again changes nothing: skip the write.
        let same = current.is_some_and(|c| decode(c, id, 0) == Some(backend.to_string()));
        ((), (!same).then(|| entry.clone()))
    });
}

/// The backend holding `id`, if it is remembered and not expired.
pub fn owner(store: &dyn SharedStore, id: &str, now_ms: u64) -> Option<String> {
    if !is_object_id(id) {
        return None;
    }
    decode(&store.get(&key(id)).0?, id, now_ms)
}

/// `expires backend id` -> backend, when the entry is for `id` and live.
/// Public for the fuzz targets (`fuzz/`).
pub fn decode(bytes: &[u8], id: &str, now_ms: u64) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.splitn(3, ' ');
    let expires: u64 = parts.next()?.parse().ok()?;
    let backend = parts.next()?;
    (parts.next()? == id && expires > now_ms).then(|| backend.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemoryStore;

    #[test]
    fn an_id_leads_to_its_owner_until_it_expires() {
        let s = MemoryStore::default();
        remember(&s, "resp_abc123", "eastus", 1_000);
        assert_eq!(owner(&s, "resp_abc123", 2_000).as_deref(), Some("eastus"));
        assert_eq!(owner(&s, "resp_other", 2_000), None);
        assert_eq!(owner(&s, "resp_abc123", 1_000 + TTL_MS), None);
        // Moved (e.g. found elsewhere by lookup): the newest owner wins.
        remember(&s, "resp_abc123", "westus", 3_000);
        assert_eq!(owner(&s, "resp_abc123", 4_000).as_deref(), Some("westus"));
    }

    #[test]
    fn only_stored_object_ids_are_kept() {
        let s = MemoryStore::default();
        for bad in ["", "chatcmpl-1", "resp_ with space", "resp_\n"] {
            remember(&s, bad, "eastus", 0);
            assert_eq!(owner(&s, bad, 0), None);
        }
    }

    #[test]
    fn the_table_is_bounded() {
        let s = MemoryStore::default();
        for i in 0..(SLOTS * 2) {
            remember(&s, &format!("resp_{i}"), "eastus", 0);
        }
        let keys = (0..SLOTS * 2).map(|i| key(&format!("resp_{i}"))).collect::<std::collections::HashSet<_>>();
        assert!(keys.len() as u64 <= SLOTS);
        // A recent id is found; some older ids were replaced by newer ones in their slot.
        assert_eq!(owner(&s, &format!("resp_{}", SLOTS * 2 - 1), 1).as_deref(), Some("eastus"));
        let lost = (0..SLOTS).filter(|i| owner(&s, &format!("resp_{i}"), 1).is_none()).count();
        assert!(lost > 0);
    }

    #[test]
    fn remembering_the_same_owner_again_does_not_write() {
        let s = MemoryStore::default();
        remember(&s, "resp_x", "eastus", 0);
        let before = s.get(&key("resp_x"));
        remember(&s, "resp_x", "eastus", 5);
        assert_eq!(s.get(&key("resp_x")), before);
    }
}
