//! Test doubles for the host services: an in-memory shared store with
//! Envoy's CAS semantics, a clock set by hand and a metrics recorder.
//! Compiled for tests and, with the `testing` feature, for native tools
//! such as the selection benchmark; never part of the filter.

use crate::metrics::Metrics;
use crate::store::{Clock, SharedStore, StoreError};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};

/// In-process store with Envoy's CAS semantics, for tests and native tools.
#[derive(Default)]
pub struct MemoryStore {
    map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: Cell<u32>,
    /// Forces the next N `set` calls to fail with `CasMismatch` (tests).
    pub conflicts_to_inject: Cell<u32>,
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.map.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        if self.conflicts_to_inject.get() > 0 {
            self.conflicts_to_inject.set(self.conflicts_to_inject.get() - 1);
            return Err(StoreError::CasMismatch);
        }
        let mut map = self.map.borrow_mut();
        match (cas, map.get(key)) {
            (Some(expected), Some((_, current))) if expected != *current => return Err(StoreError::CasMismatch),
            (None, Some(_)) => return Err(StoreError::CasMismatch),
            _ => {}
        }
        self.next_cas.set(self.next_cas.get().wrapping_add(1).max(1));
        map.insert(key.to_string(), (value.to_vec(), self.next_cas.get()));
        Ok(())
    }
}

/// A clock tests set by hand: time passes on both clocks; the wall clock
/// can also be stepped alone, as NTP or an operator would.
pub struct ManualClock {
    steady: Cell<u64>,
    wall: Cell<u64>,
}

impl ManualClock {
    pub fn at(ms: u64) -> Self {
        ManualClock { steady: Cell::new(ms), wall: Cell::new(ms) }
    }
    pub fn advance(&self, ms: u64) {
        self.steady.set(self.steady.get() + ms);
        self.wall.set(self.wall.get() + ms);
    }
    pub fn step_wall(&self, delta_ms: i64) {
        self.wall.set(self.wall.get().saturating_add_signed(delta_ms));
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.steady.get()
    }
    fn wall_ms(&self) -> u64 {
        self.wall.get()
    }
}

/// Collects metrics in memory, for tests.
#[derive(Default)]
pub struct Recorder(pub RefCell<BTreeMap<String, u64>>);

impl Metrics for Recorder {
    fn add(&self, name: &str, value: u64) {
        *self.0.borrow_mut().entry(name.to_string()).or_insert(0) += value;
    }
    fn set(&self, name: &str, value: u64) {
        self.0.borrow_mut().insert(name.to_string(), value);
    }
    /// A histogram is kept as the sum of its samples.
    fn record(&self, name: &str, value: u64) {
        self.add(name, value);
    }
}

impl Recorder {
    pub fn get(&self, name: &str) -> u64 {
        self.0.borrow().get(name).copied().unwrap_or(0)
    }
}
