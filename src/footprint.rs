//! The filter's own footprint, as gauges operators can watch: the largest
//! linear memory a role's VMs have had (a wasm memory grows and never
//! shrinks, so a plateau shows nothing leaks), and how many shared-data
//! keys exist (Envoy never deletes them; every structure is bounded); and
//! how many host calls serving requests took.

use crate::contract::shared_data::{KEY_COUNT, VM_MEMORY_PREFIX};
use crate::contract::Role;
use crate::metrics::{self, Metrics};
use crate::store::{self, SharedStore};

/// Records that a key was created (call after a create-only write won).
pub fn count_created_key(store: &dyn SharedStore, key: &str) {
    if key != KEY_COUNT {
        store::fetch_increment(store, KEY_COUNT);
    }
}

/// Reports the role's largest VM memory so far, `own_bytes` being this VM's,
/// and (from the request role) the key count.
pub fn report(store: &dyn SharedStore, metrics: &dyn Metrics, role: Role, own_bytes: u64) {
    let key = format!("{VM_MEMORY_PREFIX}{}", role.name());
    let largest = store::update(store, &key, |current| {
        let known = store::parse_counter(current);
        if own_bytes > known {
            (own_bytes, Some(own_bytes.to_string().into_bytes()))
        } else {
            (known, None)
        }
    })
    .unwrap_or(own_bytes);
    metrics.set(&metrics::name(metrics::VM_MEMORY, &[("role", role.name())]), largest);
    if role == Role::Request {
        // The counter itself is a key too.
        let keys = store::read_counter(store, KEY_COUNT).saturating_add(1);
        metrics.set(metrics::SHARED_DATA_KEYS, keys);
    }
}

/// Adds the host calls a VM made serving requests (its ticks' own left out),
/// so calls per request can be watched without timing anything.
/// `calls`: (kind of call, how many).
pub fn count_host_calls(metrics: &dyn Metrics, calls: &[(&str, u64)]) {
    for (kind, n) in calls.iter().filter(|(_, n)| *n > 0) {
        metrics.add(&metrics::name(metrics::HOST_CALLS, &[("call", kind)]), *n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{MemoryStore, Recorder};

    #[test]
    fn the_gauge_shows_the_largest_memory_of_the_role() {
        let (store, metrics) = (MemoryStore::default(), Recorder::default());
        report(&store, &metrics, Role::Attempt, 3 << 20);
        report(&store, &metrics, Role::Attempt, 2 << 20);
        assert_eq!(metrics.get("spillway_vm_memory_bytes.role.attempt"), 3 << 20);
        report(&store, &metrics, Role::Request, 1 << 20);
        assert_eq!(metrics.get("spillway_vm_memory_bytes.role.request"), 1 << 20);
    }

    #[test]
    fn created_keys_are_counted() {
        let (store, metrics) = (MemoryStore::default(), Recorder::default());
        for key in ["a", "b", KEY_COUNT] {
            count_created_key(&store, key);
        }
        report(&store, &metrics, Role::Request, 0);
        assert_eq!(metrics.get("spillway_shared_data_keys"), 3);
    }
}
