//! What the per-backend object stores (Responses API responses, files,
//! batches) share: opaque ids, a bounded map that forgets the oldest
//! objects, and the list pages of the API.
//!
//! Like an Azure OpenAI resource, a mock only knows the objects created on
//! it: their ids are random-looking, unique across mock processes, and never
//! contain the backend's name, so a client (or a proxy) cannot tell from an
//! id which backend holds it.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::openai;

/// Objects of one kind kept per mock process (older ones are forgotten).
pub const MAX_STORED: usize = 10_000;

/// Mints opaque ids: hex digits from a keyed hash of a per-process seed and
/// a counter.
#[derive(Debug)]
pub struct Ids {
    keys: RandomState,
    /// Hash of the backend name, process id and start time.
    seed: u64,
    minted: u64,
    /// The backend name, lowercased: never part of an id.
    name: String,
}

impl Ids {
    pub fn new(name: &str) -> Self {
        let keys = RandomState::new();
        let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        let seed = keys.hash_one((name, std::process::id(), started));
        Ids { keys, seed, minted: 0, name: name.to_ascii_lowercase() }
    }

    /// `lanes` × 16 hex digits, unique within and across mock processes;
    /// never containing the backend name (a name such as `a1` could appear
    /// in hex digits: such a draw is replaced).
    pub fn hex(&mut self, lanes: u8) -> String {
        loop {
            self.minted += 1;
            let hex: String =
                (0..lanes).map(|lane| format!("{:016x}", self.keys.hash_one((self.seed, self.minted, lane)))).collect();
            if self.name.is_empty() || !hex.contains(&self.name) {
                return hex;
            }
        }
    }
}

/// Objects by id, at most [`MAX_STORED`]: inserting one more forgets the oldest.
#[derive(Debug)]
pub struct Bounded<T> {
    by_id: HashMap<String, T>,
    /// Ids in creation order.
    order: VecDeque<String>,
}

impl<T> Default for Bounded<T> {
    fn default() -> Self {
        Bounded { by_id: HashMap::new(), order: VecDeque::new() }
    }
}

impl<T> Bounded<T> {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn get(&self, id: &str) -> Option<&T> {
        self.by_id.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut T> {
        self.by_id.get_mut(id)
    }

    pub fn insert(&mut self, id: String, value: T) {
        if self.order.len() >= MAX_STORED {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
        self.order.push_back(id.clone());
        self.by_id.insert(id, value);
    }

    pub fn remove(&mut self, id: &str) -> Option<T> {
        let removed = self.by_id.remove(id)?;
        self.order.retain(|o| o != id);
        Some(removed)
    }

    /// The objects, oldest first.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.order.iter().filter_map(|id| self.by_id.get(id))
    }
}

/// A list page as the API answers one: `items` (oldest first) ordered by
/// the query's `order` (`desc`, the default, or `asc`), after the item
/// `after` (an id), at most `limit` (1 to `max_limit`, default
/// `default_limit`) of them.
pub fn list_page(items: Vec<&Value>, query: &str, default_limit: usize, max_limit: usize) -> Value {
    let param = |name| openai::query_param(query, name);
    let limit = param("limit").and_then(|v| v.parse::<usize>().ok()).unwrap_or(default_limit).clamp(1, max_limit);
    let mut ordered = items;
    if param("order") != Some("asc") {
        ordered.reverse();
    }
    let start = param("after").and_then(|a| ordered.iter().position(|i| i["id"] == a)).map_or(0, |p| p + 1);
    let page: Vec<Value> = ordered.iter().skip(start).take(limit).map(|v| (*v).clone()).collect();
    json!({
        "object": "list",
        "data": page,
        "first_id": page.first().map(|i| i["id"].clone()),
        "last_id": page.last().map(|i| i["id"].clone()),
        "has_more": ordered.len() > start + page.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_never_contain_the_name() {
        // A one-digit name shows up in most 32-digit draws: all are replaced.
        let mut ids = Ids::new("A");
        for _ in 0..200 {
            let hex = ids.hex(2);
            assert_eq!(hex.len(), 32);
            assert!(!hex.contains('a'), "{hex}");
        }
    }

    #[test]
    fn bounded_forgets_the_oldest_and_lists_in_order() {
        let mut b = Bounded::default();
        for i in 0..MAX_STORED + 2 {
            b.insert(format!("id{i}"), i);
        }
        assert_eq!(b.len(), MAX_STORED);
        assert!(!b.contains("id0") && !b.contains("id1") && b.contains("id2"));
        assert_eq!(b.remove("id2"), Some(2));
        assert_eq!(b.remove("id2"), None);
        assert_eq!(b.values().next(), Some(&3));
        // Room again: the next insert forgets nothing.
        b.insert("new".into(), 0);
        assert!(b.contains("id3"));
    }

    #[test]
    fn list_pages() {
        let items: Vec<Value> = (1..=5).map(|i| json!({"id": format!("x{i}")})).collect();
        let page = |q: &str| list_page(items.iter().collect(), q, 2, 3);
        let first = page("");
        assert_eq!(first["data"], json!([{"id": "x5"}, {"id": "x4"}]));
        assert_eq!(
            (&first["first_id"], &first["last_id"], &first["has_more"]),
            (&json!("x5"), &json!("x4"), &json!(true))
        );
        assert_eq!(page("after=x4&limit=9")["data"], json!([{"id": "x3"}, {"id": "x2"}, {"id": "x1"}]));
        let last = page("order=asc&after=x3");
        assert_eq!((&last["data"], &last["has_more"]), (&json!([{"id": "x4"}, {"id": "x5"}]), &json!(false)));
        let empty = list_page(Vec::new(), "", 20, 100);
        assert_eq!(empty, json!({"object": "list", "data": [], "first_id": null, "last_id": null, "has_more": false}));
    }
}
