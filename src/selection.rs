//! Backend selection: priority groups, smooth weighted round robin inside a
//! group, availability from the health table, and each backend's known
//! quota headroom for the request at hand. Pure: the rotation counters,
//! probe leases and headroom come in through closures.

use crate::config::Backend;
use crate::config::CircuitBreaker;
use crate::contract::shared_data::ROTATION_PREFIX;
use crate::headroom::Fit;
use crate::health::{Availability, HealthTable};

/// The backends of one priority, with the order smooth weighted round robin
/// visits them in (one full cycle; the shared counter indexes into it).
#[derive(Debug, Clone)]
pub struct Group {
    pub priority: u32,
    pub members: Vec<usize>,
    pub schedule: Vec<usize>,
    /// Shared-data key of the group's rotation counter; includes the members
    /// and weights so a changed config starts a fresh rotation.
    pub counter_key: String,
}

#[derive(Debug, Clone)]
pub struct Pool {
    pub groups: Vec<Group>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Use this backend (index into `Config::backends`).
    Backend(usize),
    /// Nothing can take the request before this epoch ms (0 when nothing will).
    NoneUntil(u64),
}

impl Pool {
    pub fn new(backends: &[Backend]) -> Pool {
        let mut priorities: Vec<u32> = backends.iter().map(|b| b.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let groups = priorities
            .into_iter()
            .map(|priority| {
                let members: Vec<usize> =
                    (0..backends.len()).filter(|&i| backends.get(i).is_some_and(|b| b.priority == priority)).collect();
                let weights: Vec<u32> = members.iter().filter_map(|&i| backends.get(i)).map(|b| b.weight).collect();
                let schedule =
                    smooth_wrr_cycle(&weights).into_iter().filter_map(|slot| members.get(slot).copied()).collect();
                let mut counter_key = format!("{ROTATION_PREFIX}p{priority}");
                for b in members.iter().filter_map(|&i| backends.get(i)) {
                    counter_key.push_str(&format!(".{}*{}", b.name, b.weight));
                }
                Group { priority, members, schedule, counter_key }
            })
            .collect();
        Pool { groups }
    }

    /// Chooses the backend for a request.
    ///
    /// Walks the groups in priority order; the first group with a usable,
    /// not excluded member asks `rotation` for its position (the caller
    /// increments the shared counter for a first pick and only reads it for
    /// a fallback). A half-open member at that position gets its probe;
    /// otherwise the position picks among the available members in schedule
    /// order, so an unavailable member's turns spread over all the others.
    /// `probe` is asked to lease the single probe of a half-open backend;
    /// with `probe = None` half-open backends are skipped.
    ///
    /// `fit` says how the request fits each backend's known quota headroom.
    /// A backend short of it is out for this request until its headroom is
    /// back, like a throttled one; one whose headroom cannot be said to come
    /// back in time (the request is larger than its known limit) is tried
    /// only when no other backend can take the request. Among the members
    /// that fit, known headroom spreads the turns (see `choose`).
    #[allow(clippy::too_many_arguments)]
    pub fn pick(
        &self,
        health: &HealthTable,
        cb: &CircuitBreaker,
        now_ms: u64,
        exclude: &[usize],
        fit: &dyn Fn(usize) -> Fit,
        rotation: &mut dyn FnMut(&Group) -> u64,
        mut probe: Option<&mut dyn FnMut(usize) -> bool>,
    ) -> Pick {
        let mut soonest: u64 = u64::MAX;
        let mut any_last_resort = false;
        for last_resort in [false, true] {
            if last_resort && !any_last_resort {
                break;
            }
            // The one predicate: Some(needs_probe) when the backend may take
            // this request now.
            let usable = |i: usize, soonest: &mut u64, any_last_resort: &mut bool| -> Option<bool> {
                if exclude.contains(&i) {
                    return None;
                }
                let short_until = match fit(i) {
                    Fit::Short { at_ms } if at_ms > now_ms => at_ms,
                    Fit::Short { at_ms: 0 } if !last_resort => {
                        *any_last_resort = true;
                        return None;
                    }
                    _ => 0,
                };
                // Back when both its health and its headroom allow.
                match health.get(i).availability(now_ms, cb) {
                    Availability::Unavailable { until_ms } => {
                        *soonest = (*soonest).min(until_ms.max(short_until));
                        None
                    }
                    _ if short_until > 0 => {
                        *soonest = (*soonest).min(short_until);
                        None
                    }
                    Availability::Available => Some(false),
                    Availability::NeedsProbe => Some(true),
                }
            };
            for group in &self.groups {
                let mut any = false;
                for &i in &group.members {
                    if let Some(needs_probe) = usable(i, &mut soonest, &mut any_last_resort) {
                        any |= !needs_probe || probe.is_some();
                    }
                }
                if !any || group.schedule.is_empty() {
                    continue;
                }
                let start = rotation(group);
                let len = group.schedule.len() as u64;
                let at = |n: u64| group.schedule.get(usize::try_from(n % len).unwrap_or(0)).copied();
                // A half-open backend gets its probe when its turn comes.
                if let (Some(i), Some(lease)) = (at(start), probe.as_mut()) {
                    if usable(i, &mut soonest, &mut any_last_resort) == Some(true) && lease(i) {
                        return Pick::Backend(i);
                    }
                }
                let mut ignored = (u64::MAX, false);
                let available: Vec<usize> = group
                    .schedule
                    .iter()
                    .copied()
                    .filter(|&i| usable(i, &mut ignored.0, &mut ignored.1) == Some(false))
                    .collect();
                if let Some(i) = choose(&available, start, fit) {
                    return Pick::Backend(i);
                }
                // Only half-open members are left: the first whose probe is free.
                for step in 0..len {
                    let Some(i) = at(start.wrapping_add(step)) else { continue };
                    if let (Some(true), Some(lease)) = (usable(i, &mut soonest, &mut any_last_resort), probe.as_mut()) {
                        if lease(i) {
                            return Pick::Backend(i);
                        }
                    }
                }
            }
        }
        Pick::NoneUntil(if soonest == u64::MAX { 0 } else { soonest })
    }
}

/// One of `available` (a group's schedule, filtered: a backend appears as
/// often as its weight says) for rotation position `start`.
///
/// While nothing is known about their headroom the members take turns
/// (round robin: the turns of a backend that is out are shared by all the
/// others, not all given to the one after it). Once some headroom is known,
/// each turn counts as much as the share of its backend's limit that is
/// left (unknown counts as full), and `start`, scrambled, picks a point in
/// that total: busy backends get fewer requests before they run out, and
/// concurrent requests, which all read the same snapshot, still spread.
fn choose(available: &[usize], start: u64, fit: &dyn Fn(usize) -> Fit) -> Option<usize> {
    let share = |i: usize| match fit(i) {
        Fit::Covers { share } => Some(u64::from(share.max(1))),
        _ => None,
    };
    if available.iter().all(|&i| share(i).is_none()) {
        let count = available.len() as u64;
        return available.get(usize::try_from(start.checked_rem(count)?).unwrap_or(0)).copied();
    }
    let weight = |i: usize| share(i).unwrap_or(1000);
    let total: u64 = available.iter().map(|&i| weight(i)).sum();
    let mut point = scramble(start).checked_rem(total)?;
    for &i in available {
        let w = weight(i);
        if point < w {
            return Some(i);
        }
        point -= w;
    }
    available.last().copied()
}

/// splitmix64's finaliser: consecutive counter values become unrelated
/// points, so turns do not march through the total in order.
fn scramble(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One cycle of nginx's smooth weighted round robin over slots `0..weights.len()`:
/// each slot appears `weight / gcd` times, spread out rather than in runs.
pub fn smooth_wrr_cycle(weights: &[u32]) -> Vec<usize> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w / g)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut cycle = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        // The first maximum wins ties, which keeps the cycle deterministic.
        let mut best = 0;
        let mut best_val = i64::MIN;
        for (i, c) in current.iter().enumerate() {
            if *c > best_val {
                best_val = *c;
                best = i;
            }
        }
        if let Some(c) = current.get_mut(best) {
            *c -= total;
        }
        cycle.push(best);
    }
    cycle
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Keys};
    use std::collections::HashMap;

    const CB: CircuitBreaker = CircuitBreaker { consecutive_failures: 2, open_ms: 10_000 };

    fn config(backends: &[(&str, u32, u32)]) -> Config {
        let list: Vec<String> = backends
            .iter()
            .map(|(n, p, w)| format!(r#"{{"name":"{n}","url":"http://{n}","priority":{p},"weight":{w}}}"#))
            .collect();
        Config::parse(format!(r#"{{"backends":[{}]}}"#, list.join(",")).as_bytes(), Keys::NamesOnly).unwrap()
    }

    /// Runs `n` first picks with a shared counter per group; counts per backend name.
    fn run(cfg: &Config, health: &HealthTable, n: usize) -> HashMap<String, usize> {
        let pool = Pool::new(&cfg.backends);
        let mut counters: HashMap<String, u64> = HashMap::new();
        let mut seen = HashMap::new();
        for _ in 0..n {
            let mut rot = |g: &Group| {
                let c = counters.entry(g.counter_key.clone()).or_insert(0);
                *c += 1;
                *c - 1
            };
            if let Pick::Backend(i) = pool.pick(health, &CB, 0, &[], &|_| Fit::Unknown, &mut rot, None) {
                *seen.entry(cfg.backends[i].name.clone()).or_insert(0) += 1;
            }
        }
        seen
    }

    #[test]
    fn smooth_cycle_spreads_heavy_weights() {
        assert_eq!(smooth_wrr_cycle(&[2, 1]), vec![0, 1, 0]);
        assert_eq!(smooth_wrr_cycle(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_wrr_cycle(&[50, 50]), vec![0, 1]);
        assert_eq!(smooth_wrr_cycle(&[1]), vec![0]);
    }

    #[test]
    fn equal_weights_rotate_evenly() {
        let cfg = config(&[("a", 1, 1), ("b", 1, 1), ("c", 1, 1)]);
        let seen = run(&cfg, &HealthTable::new(3), 30);
        assert_eq!((seen["a"], seen["b"], seen["c"]), (10, 10, 10));
    }

    #[test]
    fn weights_set_the_ratio() {
        let cfg = config(&[("a", 1, 3), ("b", 1, 1)]);
        let seen = run(&cfg, &HealthTable::new(2), 400);
        assert_eq!((seen["a"], seen["b"]), (300, 100));
    }

    #[test]
    fn lower_priority_only_when_the_better_group_is_out() {
        let cfg = config(&[("ptu", 1, 1), ("paygo", 2, 1)]);
        let mut health = HealthTable::new(2);
        assert_eq!(run(&cfg, &health, 10).get("paygo"), None);
        health.entries[0].record_throttle(0, 5_000);
        assert_eq!(run(&cfg, &health, 10)["paygo"], 10);
    }

    #[test]
    fn throttled_member_is_skipped_within_its_group() {
        let cfg = config(&[("a", 1, 1), ("b", 1, 1), ("c", 2, 1)]);
        let mut health = HealthTable::new(3);
        health.entries[0].record_throttle(0, 5_000);
        let seen = run(&cfg, &health, 10);
        assert_eq!(seen["b"], 10);
        assert_eq!(seen.get("c"), None);
    }

    #[test]
    fn an_unavailable_members_turns_are_shared_by_all_the_others() {
        // Found by the soak: the member after a throttled one used to get
        // every one of its turns (a:b = 2:1 here).
        let cfg = config(&[("a", 1, 1), ("b", 1, 1), ("c", 1, 1)]);
        let mut health = HealthTable::new(3);
        health.entries[2].record_throttle(0, 5_000);
        let seen = run(&cfg, &health, 60);
        assert_eq!((seen["a"], seen["b"], seen.get("c")), (30, 30, None));
        // With weights the others keep their ratio.
        let cfg = config(&[("a", 1, 3), ("b", 1, 1), ("c", 1, 4)]);
        let mut health = HealthTable::new(3);
        health.entries[2].record_throttle(0, 5_000);
        let seen = run(&cfg, &health, 400);
        assert_eq!((seen["a"], seen["b"]), (300, 100));
    }

    #[test]
    fn all_unavailable_reports_the_soonest_deadline() {
        let cfg = config(&[("a", 1, 1), ("b", 2, 1)]);
        let mut health = HealthTable::new(2);
        health.entries[0].record_throttle(0, 7_000);
        health.entries[1].record_throttle(0, 3_000);
        let pool = Pool::new(&cfg.backends);
        let pick = pool.pick(&health, &CB, 0, &[], &|_| Fit::Unknown, &mut |_| 0, None);
        assert_eq!(pick, Pick::NoneUntil(3_000));
    }

    #[test]
    fn exclusion_gives_a_different_backend_or_none() {
        let cfg = config(&[("a", 1, 1), ("b", 1, 1)]);
        let pool = Pool::new(&cfg.backends);
        let health = HealthTable::new(2);
        for start in 0..4 {
            assert_eq!(pool.pick(&health, &CB, 0, &[0], &|_| Fit::Unknown, &mut |_| start, None), Pick::Backend(1));
        }
        assert_eq!(pool.pick(&health, &CB, 0, &[0, 1], &|_| Fit::Unknown, &mut |_| 0, None), Pick::NoneUntil(0));
    }

    #[test]
    fn half_open_backend_takes_one_probe() {
        let cfg = config(&[("a", 1, 1), ("b", 2, 1)]);
        let pool = Pool::new(&cfg.backends);
        let mut health = HealthTable::new(2);
        health.entries[0].record_failure(0, &CB);
        health.entries[0].record_failure(0, &CB);
        let now = 10_000; // open time over
        let mut leased = 0;
        let mut lease = |_i: usize| {
            leased += 1;
            leased == 1
        };
        assert_eq!(
            pool.pick(&health, &CB, now, &[], &|_| Fit::Unknown, &mut |_| 0, Some(&mut lease)),
            Pick::Backend(0)
        );
        // Lease taken by someone else: spill to the next priority.
        assert_eq!(
            pool.pick(&health, &CB, now, &[], &|_| Fit::Unknown, &mut |_| 0, Some(&mut lease)),
            Pick::Backend(1)
        );
        // Fallbacks never probe.
        assert_eq!(pool.pick(&health, &CB, now, &[], &|_| Fit::Unknown, &mut |_| 0, None), Pick::Backend(1));
    }

    #[test]
    fn rotation_is_consulted_only_for_the_chosen_group() {
        let cfg = config(&[("a", 1, 1), ("b", 2, 1)]);
        let pool = Pool::new(&cfg.backends);
        let mut health = HealthTable::new(2);
        health.entries[0].record_throttle(0, 1_000);
        let mut asked = Vec::new();
        pool.pick(
            &health,
            &CB,
            0,
            &[],
            &|_| Fit::Unknown,
            &mut |g| {
                asked.push(g.priority);
                0
            },
            None,
        );
        assert_eq!(asked, vec![2]);
    }

    fn first_picks(cfg: &Config, fit: &dyn Fn(usize) -> Fit, n: u64) -> HashMap<String, usize> {
        let pool = Pool::new(&cfg.backends);
        let health = HealthTable::new(cfg.backends.len());
        let mut seen = HashMap::new();
        for start in 0..n {
            if let Pick::Backend(i) = pool.pick(&health, &CB, 0, &[], fit, &mut |_| start, None) {
                *seen.entry(cfg.backends[i].name.clone()).or_insert(0) += 1;
            }
        }
        seen
    }

    #[test]
    fn a_backend_short_of_headroom_is_out_for_that_request_until_it_refills() {
        let cfg = config(&[("a", 1, 1), ("b", 1, 1), ("c", 2, 1)]);
        let pool = Pool::new(&cfg.backends);
        let health = HealthTable::new(3);
        let short_a = |i: usize| if i == 0 { Fit::Short { at_ms: 4_000 } } else { Fit::Unknown };
        assert_eq!(first_picks(&cfg, &short_a, 10)["b"], 10);
        // Short everywhere: nobody is asked, the wait is the soonest refill.
        let all_short = |i: usize| Fit::Short { at_ms: 4_000 + i as u64 };
        assert_eq!(pool.pick(&health, &CB, 0, &[], &all_short, &mut |_| 0, None), Pick::NoneUntil(4_000));
        // Throttled and short, a backend is back at the later of the two.
        let mut throttled = HealthTable::new(3);
        throttled.entries[0].record_throttle(0, 9_000);
        assert_eq!(pool.pick(&throttled, &CB, 0, &[], &all_short, &mut |_| 0, None), Pick::NoneUntil(4_001));
        assert_eq!(pool.pick(&health, &CB, 5_000, &[], &all_short, &mut |_| 0, None), Pick::Backend(0));
    }

    #[test]
    fn a_request_larger_than_any_known_limit_is_tried_only_where_nothing_else_goes() {
        let cfg = config(&[("a", 1, 1), ("b", 2, 1)]);
        let never_a = |i: usize| if i == 0 { Fit::Short { at_ms: 0 } } else { Fit::Unknown };
        assert_eq!(first_picks(&cfg, &never_a, 10)["b"], 10);
        let never = |_| Fit::Short { at_ms: 0 };
        assert_eq!(first_picks(&cfg, &never, 10)["a"], 10);
    }

    #[test]
    fn known_headroom_spreads_the_turns() {
        let cfg = config(&[("a", 1, 1), ("b", 1, 1), ("c", 1, 2)]);
        // a has 90 % of its limit left, b 10 %, c is unknown (counts as full,
        // twice for its weight).
        let fit = |i: usize| match i {
            0 => Fit::Covers { share: 900 },
            1 => Fit::Covers { share: 100 },
            _ => Fit::Unknown,
        };
        let seen = first_picks(&cfg, &fit, 40_000);
        let ratio = |n: &str| seen[n] as f64 / 40_000.0;
        assert!((ratio("a") - 0.9 / 3.0).abs() < 0.02, "{seen:?}");
        assert!((ratio("b") - 0.1 / 3.0).abs() < 0.02, "{seen:?}");
        assert!((ratio("c") - 2.0 / 3.0).abs() < 0.02, "{seen:?}");
        // Consecutive requests do not march through one backend's turns.
        let runs = (0..100u64).map(|s| choose(&[0, 1, 2, 2], s, &fit)).collect::<Vec<_>>();
        assert!(runs.windows(2).filter(|w| w[0] != w[1]).count() > 30, "{runs:?}");
    }
}
