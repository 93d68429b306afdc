//! Decoders of what the filter keeps in Envoy's shared data: the health
//! table, client limit buckets, the response-affinity table, the credential
//! stash and the rotation counters (with the gateway reading them). Shared
//! data outlives a config generation and a filter version, so a decoder must
//! take any bytes; what an encoder writes must decode to what was encoded.
//!
//! Input: a selector byte (mod 5: health, limits, affinity, credentials,
//! rotation), then that decoder's input (see each function).
#![no_main]

use libfuzzer_sys::fuzz_target;
use spillway::config::Tier;
use spillway::config::{Config, Keys};
use spillway::contract::shared_data::{BACKEND_SET, HEALTH};
use spillway::credentials::{self, ClientCredential};
use spillway::gateway::Gateway;
use spillway::headroom::Headroom;
use spillway::health::{Health, HealthTable};
use spillway::limits::{self, Admission, Buckets, Limits, Remaining, Settlement};
use spillway::selection::Pool;
use spillway::store::{self, SharedStore};
use spillway::testing::{ManualClock, MemoryStore};
use spillway::{affinity, stateful};

const NOW: u64 = 1_767_225_600_000;
const CLOCKS: [u64; 4] = [0, NOW, u64::MAX - affinity::TTL_MS, u64::MAX];

fuzz_target!(|data: &[u8]| {
    let Some((&which, input)) = data.split_first() else { return };
    match which % 5 {
        0 => health(input),
        1 => limit_buckets(input),
        2 => affinity_table(input),
        3 => credential_stash(input),
        _ => rotation(input),
    }
});

fn le_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(bytes) {
        *d = *s;
    }
    u64::from_le_bytes(b)
}

/// The table's text, decoded for a fixed set of names; and a table built
/// from the input's bytes (81 per backend: health, then headroom), encoded
/// and decoded again, also under the names in another order.
fn health(input: &[u8]) {
    const NAMES: [&str; 4] = ["eastus", "westus2", "swc", "a-b_c"];
    let table = HealthTable::decode(input, &NAMES);
    assert_eq!(table.entries.len(), NAMES.len());
    assert_eq!(HealthTable::decode(&table.encode(&NAMES), &NAMES), table);

    let mut built = HealthTable::new(NAMES.len());
    for (h, b) in built.entries.iter_mut().zip(input.chunks(81)) {
        let field = |at: usize| le_u64(b.get(at..at + 8).unwrap_or(&[]));
        let present = b.get(28).copied().unwrap_or(0);
        let maybe = |bit: u8, at: usize| (present & (1 << bit) != 0).then(|| field(at));
        *h = Health {
            throttled_until_ms: field(0),
            consecutive_failures: le_u64(b.get(8..12).unwrap_or(&[])) as u32,
            open_until_ms: field(12),
            probe_until_ms: field(20),
            headroom: Headroom {
                requests: maybe(0, 29),
                tokens: maybe(1, 37),
                limit_requests: maybe(2, 45),
                limit_tokens: maybe(3, 53),
                utilization_permille: (present & (1 << 4) != 0).then(|| le_u64(b.get(61..65).unwrap_or(&[])) as u32),
                learned_ms: field(65),
                back_at_ms: field(73),
                tokens_limit_reported: present & (1 << 5) != 0,
            },
        };
    }
    let bytes = built.encode(&NAMES);
    assert_eq!(HealthTable::decode(&bytes, &NAMES), built, "{}", String::from_utf8_lossy(&bytes));
    let reversed: Vec<&str> = NAMES.iter().rev().copied().collect();
    let moved = HealthTable::decode(&bytes, &reversed);
    for (i, h) in moved.entries.iter().enumerate() {
        assert_eq!(*h, built.get(NAMES.len() - 1 - i));
    }
}

/// Input: limits selector, cost selector, then the stored bucket bytes.
fn limit_buckets(input: &[u8]) {
    const LIMITS: [(Option<u64>, Option<u64>); 8] = [
        (Some(3), None),
        (None, Some(1_000)),
        (Some(60), Some(90_000)),
        (Some(1), Some(1)),
        (Some(u64::MAX), Some(u64::MAX)),
        (None, None),
        (Some(1_000_000), None),
        (None, Some(10_000_000_000)),
    ];
    const COSTS: [u64; 4] = [0, 1, 4_000, u64::MAX];
    let [l, c, stored @ ..] = input else { return };
    let (requests_per_minute, tokens_per_minute) = LIMITS[usize::from(*l) % LIMITS.len()];
    let limits = Limits { requests_per_minute, tokens_per_minute };
    let cost = COSTS[usize::from(*c) % COSTS.len()];
    let now = CLOCKS[usize::from(*c >> 2) % 2 + 1] + u64::from(*l >> 3) * 7_919;

    let b = Buckets::decode(Some(stored), &limits, now);
    if b.requests.is_finite() && b.tokens.is_finite() {
        assert_eq!(Buckets::decode(Some(&b.encode()), &limits, 0), b);
    }

    let s = MemoryStore::default();
    let key = limits::key("client", &limits);
    s.set(&key, stored, None).expect("empty store");
    let within = |r: Remaining| {
        assert!(r.requests <= limits.requests_per_minute && r.tokens <= limits.tokens_per_minute, "{r:?}");
    };
    match limits::admit(&s, &key, &limits, now, cost) {
        Admission::Admitted(r) => within(r),
        Admission::Limited { retry_after_ms, remaining, .. } => {
            assert!(retry_after_ms >= 1);
            within(remaining);
        }
    }
    let settlement = Settlement { charged_tokens: cost, used_tokens: cost / 3, refund_request: true };
    limits::settle(&s, &key, &limits, now + 1, settlement);
    let (after, _) = s.get(&key);
    let after = after.expect("still there");
    if after != stored {
        // Whatever the filter wrote, it reads back as written.
        let text = std::str::from_utf8(&after).expect("UTF-8");
        let fields: Vec<&str> = text.split(' ').collect();
        assert!(
            fields.len() == 3
                && fields[0].parse::<f64>().is_ok()
                && fields[1].parse::<f64>().is_ok()
                && fields[2].parse::<u64>().is_ok(),
            "unreadable buckets {text:?}"
        );
    }
}

/// Input: clock selector, then `id \n backend \n stored-entry`.
fn affinity_table(input: &[u8]) {
    let [clock, rest @ ..] = input else { return };
    let now = CLOCKS[usize::from(*clock) % CLOCKS.len()];
    let mut parts = rest.splitn(3, |&b| b == b'\n');
    let id = String::from_utf8_lossy(parts.next().unwrap_or(&[])).into_owned();
    let backend = String::from_utf8_lossy(parts.next().unwrap_or(&[])).into_owned();
    let stored = parts.next().unwrap_or(&[]);

    if let Some(owner) = affinity::decode(stored, &id, now) {
        let text = std::str::from_utf8(stored).expect("decoded from UTF-8");
        assert!(text.contains(&owner) && text.ends_with(&id));
    }

    // What `remember` writes, `owner` finds, until it expires; another id
    // (maybe in the same slot) finds nothing.
    let s = MemoryStore::default();
    affinity::remember(&s, &id, &backend, now);
    let plain_backend =
        !backend.is_empty() && backend.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
    let found = affinity::owner(&s, &id, now);
    if stateful::is_object_id(&id) && plain_backend && now < u64::MAX - affinity::TTL_MS {
        assert_eq!(found.as_deref(), Some(backend.as_str()), "{id:?} at {now}");
        assert_eq!(affinity::owner(&s, &id, now + affinity::TTL_MS), None);
    } else if !stateful::is_object_id(&id) {
        assert_eq!(found, None);
    }
    assert_eq!(affinity::owner(&s, &format!("{id}0"), now), None);
}

/// Input: flags (bit 0: api-key present, bit 1: authorization present), a
/// split byte, then `token \n values` (the values split at the split byte).
fn credential_stash(input: &[u8]) {
    let [flags, split, rest @ ..] = input else { return };
    let Some(nl) = rest.iter().position(|&b| b == b'\n') else { return };
    let token = String::from_utf8_lossy(&rest[..nl]).into_owned();
    let values = &rest[nl + 1..];
    let at = usize::from(*split).min(values.len());
    let credential = ClientCredential {
        api_key: (flags & 1 != 0).then(|| values[..at].to_vec()),
        authorization: (flags & 2 != 0).then(|| values[at..].to_vec()),
    };

    let _ = credentials::decode(values, &token);
    let _ = credentials::decode(rest, &token);
    let encoded = credentials::encode(&token, &credential);
    assert_eq!(credentials::decode(&encoded, &token), Some(credential.clone()));

    let s = MemoryStore::default();
    let header = credentials::stash(&s, &token, &credential);
    if let Some(header) = &header {
        if !token.is_empty() {
            assert_eq!(credentials::recall(&s, header), Some(credential.clone()));
            credentials::clear(&s, header);
        }
        assert_eq!(credentials::recall(&s, header), None);
    } else {
        assert!(credential == ClientCredential::default() || values.len() > credentials::MAX_CREDENTIAL);
    }
    // A stash header from anywhere (a client can send one).
    let _ = credentials::recall(&s, &String::from_utf8_lossy(values));
    credentials::clear(&s, &String::from_utf8_lossy(values));
}

thread_local! {
    static GATEWAY: (Gateway, Vec<String>) = {
        let json = br#"{"backends":[
            {"name":"ptu","url":"https://ptu.example","priority":1,"weight":3},
            {"name":"east","url":"https://east.example","priority":1,"weight":2},
            {"name":"west","url":"http://10.0.0.1:8080","priority":2},
            {"name":"sweden","url":"https://[::1]:8443","priority":2,"weight":1000}],
            "circuit_breaker":{"consecutive_failures":2,"open_s":30}}"#;
        let config = Config::parse(json, Keys::NamesOnly).expect("fixed config");
        let counters = Pool::new(&config.backends).groups.into_iter().map(|g| g.counter_key).collect();
        (Gateway::new(config), counters)
    };
}

/// Input: stored counter bytes; also the health table and the backend set
/// the gateway reads before picking a backend.
fn rotation(input: &[u8]) {
    let s = MemoryStore::default();
    let key = "spillway.rr.p1.x*1";
    s.set(key, input, None).expect("empty store");
    let n = store::read_counter(&s, key);
    assert_eq!(store::fetch_increment(&s, key), n);
    assert_eq!(store::read_counter(&s, key), n.wrapping_add(1));

    GATEWAY.with(|(gateway, counters)| {
        let s = MemoryStore::default();
        for key in counters.iter().chain([&HEALTH.to_string(), &BACKEND_SET.to_string()]) {
            s.set(key, input, None).expect("empty store");
        }
        let _ = gateway.check_backend_set(&s);
        let health = gateway.read_health(&s);
        assert_eq!(health.entries.len(), 4);
        let clock = ManualClock::at(NOW);
        let tokens = le_u64(input.get(..8).unwrap_or(&[]));
        let _ = gateway.pick_first(&s, &clock, None, tokens, Tier::High);
        let _ = gateway.pick_first(&s, &clock, Some("gpt-4o"), tokens, Tier::Low);
    });
}
