//! Benchmark baseline for Spillway: a proxy-wasm HTTP filter that does the
//! least a real filter does, setting one response header. Envoy with this
//! filter measures what any proxy-wasm filter costs (VM context creation per
//! stream, the host-call round trips for headers), so Spillway's own cost is
//! what it adds on top.
//!
//! Build: `cargo build --target wasm32-wasip1 --release -p spillway-bench-trivial-filter`
//! → `target/wasm32-wasip1/release/spillway_bench_trivial_filter.wasm`.

/// The header every response gets.
pub const HEADER: &str = "x-bench-trivial";

#[cfg(target_arch = "wasm32")]
mod filter {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    }}

    struct Root;

    impl Context for Root {}

    impl RootContext for Root {
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Trivial))
        }
    }

    struct Trivial;

    impl Context for Trivial {}

    impl HttpContext for Trivial {
        fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
            self.set_http_response_header(super::HEADER, Some("1"));
            Action::Continue
        }
    }
}
