//! Benchmark probe for pricing host calls: a proxy-wasm HTTP filter that,
//! on every request's headers, makes `count` host calls of one `kind`
//! (plugin configuration `kind:count`, e.g. `header_get:100`). Envoy's CPU
//! per request with `kind:100` minus with `none:0`, divided by 100, is what
//! one call of that kind costs; `bench/bench.py --only hostcalls` measures
//! every kind and the attribution table multiplies these prices by the
//! calls Spillway makes per request.
//!
//! Build: `cargo build --target wasm32-wasip1 --release -p spillway-bench-hostcall-cost`.

/// The kinds of call the probe can make, as named in its configuration.
pub const KINDS: &[&str] = &[
    "none",
    "header_get",
    "header_get_missing",
    "header_pairs",
    "header_set",
    "header_remove_missing",
    "property",
    "shared_data_get",
    "shared_data_set",
    "metric_increment",
    "metric_define",
    "clock_wasi",
    "clock_proxy",
    "log_written",
    "log_filtered",
    "clear_route_cache",
    "alloc_4k",
];

/// `kind:count` → (kind, count); anything else is `None`.
pub fn parse(config: &str) -> Option<(&str, u32)> {
    let (kind, count) = config.trim().split_once(':')?;
    KINDS.contains(&kind).then_some(())?;
    Some((kind, count.parse().ok()?))
}

#[cfg(target_arch = "wasm32")]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod filter {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
    use std::rc::Rc;

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Info);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { plan: None }) });
    }}

    #[derive(Clone)]
    struct Plan {
        kind: String,
        count: u32,
        metric: u32,
    }

    struct Root {
        plan: Option<Rc<Plan>>,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _size: usize) -> bool {
            let config = self.get_plugin_configuration().unwrap_or_default();
            let text = String::from_utf8_lossy(&config);
            let Some((kind, count)) = super::parse(&text) else {
                log::error!("hostcall-cost: configuration must be kind:count, got {text:?}");
                return false;
            };
            // A value the size of Spillway's health table.
            let _ = hostcalls::set_shared_data("bench.value", Some(&[b'x'; 160]), None);
            let metric = hostcalls::define_metric(MetricType::Counter, "bench_hostcall_probe").unwrap_or(0);
            self.plan = Some(Rc::new(Plan { kind: kind.to_string(), count, metric }));
            true
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Probe { plan: self.plan.clone() }))
        }
    }

    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    extern "C" {
        fn clock_time_get(clock_id: i32, precision: i64, time: i32) -> i32;
    }

    struct Probe {
        plan: Option<Rc<Plan>>,
    }

    impl Context for Probe {}

    impl HttpContext for Probe {
        fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
            let Some(plan) = self.plan.clone() else { return Action::Continue };
            let mut sink = 0usize;
            for i in 0..plan.count {
                match plan.kind.as_str() {
                    "header_get" => sink += self.get_http_request_header(":path").map_or(0, |v| v.len()),
                    "header_get_missing" => sink += self.get_http_request_header("x-absent").map_or(0, |v| v.len()),
                    "header_pairs" => sink += self.get_http_request_headers_bytes().len(),
                    "header_set" => self.set_http_request_header("x-bench-probe", Some("1")),
                    "header_remove_missing" => self.set_http_request_header("x-absent", None),
                    "property" => sink += self.get_property(vec!["request", "path"]).map_or(0, |v| v.len()),
                    "shared_data_get" => sink += self.get_shared_data("bench.value").0.map_or(0, |v| v.len()),
                    "shared_data_set" => {
                        let _ = hostcalls::set_shared_data("bench.scratch", Some(&[b'y'; 160]), None);
                    }
                    "metric_increment" => {
                        let _ = hostcalls::increment_metric(plan.metric, 1);
                    }
                    "metric_define" => {
                        sink +=
                            hostcalls::define_metric(MetricType::Counter, "bench_hostcall_probe").unwrap_or(0) as usize
                    }
                    "clock_wasi" => {
                        let mut t = 0u64;
                        // SAFETY: the host writes 8 bytes to a local.
                        unsafe { clock_time_get(1, 1_000_000, &mut t as *mut u64 as usize as i32) };
                        sink += t as usize & 1;
                    }
                    "clock_proxy" => sink += self.get_current_time().elapsed().map_or(0, |d| d.as_nanos() as usize & 1),
                    "log_written" => log::info!("hostcall-cost probe {i}"),
                    "log_filtered" => log::debug!("hostcall-cost probe {i}"),
                    "clear_route_cache" => {
                        let _ = hostcalls::call_foreign_function("clear_route_cache", Some(&[]));
                    }
                    "alloc_4k" => sink += std::hint::black_box(vec![1u8; 4096]).len(),
                    _ => {}
                }
            }
            std::hint::black_box(sink);
            Action::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_names_a_known_kind_and_a_count() {
        assert_eq!(parse("header_get:100"), Some(("header_get", 100)));
        assert_eq!(parse("none:0\n"), Some(("none", 0)));
        assert_eq!(parse("teleport:3"), None);
        assert_eq!(parse("header_get"), None);
        assert_eq!(parse("header_get:-1"), None);
    }
}
