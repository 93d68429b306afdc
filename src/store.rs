//! The host services the decisions need, behind small traits so the logic
//! runs natively in `cargo test`: a clock and Envoy's shared data (a
//! process-wide key/value store with compare-and-swap).

pub trait Clock {
    /// Milliseconds on a clock that never steps (NTP corrections, an
    /// operator setting the date): every deadline and window is on it. One
    /// clock for the whole process, so all workers agree.
    fn now_ms(&self) -> u64;
    /// Milliseconds since the Unix epoch: only to read an HTTP date.
    fn wall_ms(&self) -> u64 {
        self.now_ms()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Another worker wrote the key since we read it.
    CasMismatch,
    /// Any other host failure.
    Unavailable,
}

pub trait SharedStore {
    /// The value and its CAS token (`None` when the key does not exist).
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes `value` if the key's token still equals `cas`; `None`: only if
    /// the key does not exist (so two first writers cannot both win).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

/// How often a CAS loop retries before giving up on a conflicting key.
pub const CAS_ATTEMPTS: usize = 16;

/// Read-modify-write with CAS retries. `change` gets the current bytes and
/// returns the new value, or `None` when nothing needs writing. Returns the
/// value that was written (or left alone), or `None` if every try conflicted.
pub fn update<T>(
    store: &dyn SharedStore,
    key: &str,
    mut change: impl FnMut(Option<&[u8]>) -> (T, Option<Vec<u8>>),
) -> Option<T> {
    for _ in 0..CAS_ATTEMPTS {
        let (current, cas) = store.get(key);
        let (result, new_value) = change(current.as_deref());
        let Some(new_value) = new_value else {
            return Some(result);
        };
        match store.set(key, &new_value, cas) {
            Ok(()) => return Some(result),
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Unavailable) => return None,
        }
    }
    None
}

/// Atomically adds one to a decimal counter; returns the value before.
/// Falls back to the last value read if every CAS try lost a race, so a
/// request is never failed over bookkeeping.
pub fn fetch_increment(store: &dyn SharedStore, key: &str) -> u64 {
    let mut last = 0;
    update(store, key, |current| {
        let n = parse_counter(current);
        last = n;
        (n, Some(n.wrapping_add(1).to_string().into_bytes()))
    })
    .unwrap_or(last)
}

pub fn read_counter(store: &dyn SharedStore, key: &str) -> u64 {
    parse_counter(store.get(key).0.as_deref())
}

/// A decimal counter's value (0 when absent or unreadable).
pub fn parse_counter(bytes: Option<&[u8]>) -> u64 {
    bytes.and_then(|b| std::str::from_utf8(b).ok()).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemoryStore;

    #[test]
    fn increment_survives_cas_conflicts() {
        let s = MemoryStore::default();
        assert_eq!(fetch_increment(&s, "c"), 0);
        s.conflicts_to_inject.set(3);
        assert_eq!(fetch_increment(&s, "c"), 1);
        assert_eq!(read_counter(&s, "c"), 2);
    }

    #[test]
    fn two_first_writers_do_not_lose_an_update() {
        let s = MemoryStore::default();
        // Both read "absent" before either writes.
        let (first, second) = (s.get("c"), s.get("c"));
        assert_eq!((first.1, second.1), (None, None));
        s.set("c", b"1", first.1).unwrap();
        assert_eq!(s.set("c", b"1", second.1), Err(StoreError::CasMismatch));
        // The loser retries through `update` and counts on top.
        assert_eq!(fetch_increment(&s, "c"), 1);
        assert_eq!(read_counter(&s, "c"), 2);
    }

    #[test]
    fn stale_cas_is_rejected() {
        let s = MemoryStore::default();
        s.set("k", b"1", None).unwrap();
        let (_, cas) = s.get("k");
        s.set("k", b"2", cas).unwrap();
        assert_eq!(s.set("k", b"3", cas), Err(StoreError::CasMismatch));
    }

    #[test]
    fn update_gives_up_after_persistent_conflicts() {
        let s = MemoryStore::default();
        s.conflicts_to_inject.set(CAS_ATTEMPTS as u32);
        assert_eq!(update(&s, "k", |_| ((), Some(b"x".to_vec()))), None);
        assert_eq!(update(&s, "k", |_| ((), None)), Some(()));
    }
}
