//! The proxy-wasm host calls the filter makes, called through the ABI
//! directly rather than through the SDK's `hostcalls`, which panic on any
//! status they do not expect and decode header values with
//! `String::from_utf8(..).unwrap()`: one header that is not UTF-8, or a call
//! the host refuses in some phase, would trap the VM for every later request
//! on that worker. Here every call returns a `Result`, values come back as
//! bytes, and the caller decides what an error means (log and go on).
//!
//! The encoders are plain functions, tested natively; the calls exist only
//! on wasm32.

/// A host call that did not succeed: the ABI status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError(pub u32);

pub const STATUS_OK: u32 = 0;
pub const STATUS_NOT_FOUND: u32 = 1;
pub const STATUS_BAD_ARGUMENT: u32 = 2;
pub const STATUS_CAS_MISMATCH: u32 = 8;

use std::ops::Range;

/// Header pairs in the ABI's map encoding: the count, each name and value
/// length (u32, little endian), then each name and value followed by a NUL.
pub fn encode_header_pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    let size = 4 + pairs.iter().map(|(n, v)| 8 + n.len() + v.len() + 2).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&len_u32(pairs.len()).to_le_bytes());
    for (name, value) in pairs {
        out.extend_from_slice(&len_u32(name.len()).to_le_bytes());
        out.extend_from_slice(&len_u32(value.len()).to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

/// Decodes the ABI's map encoding (see `encode_header_pairs`): Envoy answers
/// a property that is a map (such as a metadata namespace) this way, each
/// value in its own property encoding. `None` when the bytes do not hold
/// exactly that layout.
pub fn decode_pairs(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let spans = pair_spans(bytes)?;
    spans.into_iter().map(|(n, v)| Some((bytes.get(n)?, bytes.get(v)?))).collect()
}

/// Where each name and value of `decode_pairs` lies in `bytes`.
pub fn pair_spans(bytes: &[u8]) -> Option<Vec<(Range<usize>, Range<usize>)>> {
    let word = |at: usize| -> Option<usize> {
        let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(raw)).ok()
    };
    let count = word(0)?;
    // Every pair takes at least 10 bytes: no count can promise more pairs than that.
    if count > bytes.len() / 10 {
        return None;
    }
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut spans = Vec::with_capacity(count);
    for i in 0..count {
        let (name_len, value_len) = (word(4 + i * 8)?, word(8 + i * 8)?);
        let name = data..data.checked_add(name_len)?;
        data = name.end;
        (bytes.get(data) == Some(&0)).then_some(())?;
        let value = data + 1..(data + 1).checked_add(value_len)?;
        data = value.end;
        (bytes.get(data) == Some(&0)).then_some(())?;
        data += 1;
        spans.push((name, value));
    }
    (data == bytes.len()).then_some(spans)
}

/// A map as the host encodes all of it (`decode_pairs`): a whole header map
/// (names lower case) or a metadata namespace, kept with its bytes. `get`
/// gives the first value of a name, as a single header read would.
pub struct PairMap {
    bytes: Vec<u8>,
    spans: Vec<(Range<usize>, Range<usize>)>,
}

impl PairMap {
    pub fn decode(bytes: Vec<u8>) -> Option<PairMap> {
        let spans = pair_spans(&bytes)?;
        Some(PairMap { bytes, spans })
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        let (_, value) = self.spans.iter().find(|(n, _)| self.bytes.get(n.clone()) == Some(name.as_bytes()))?;
        self.bytes.get(value.clone())
    }

    /// A value as text; bytes that are not UTF-8 are decoded lossily (they
    /// can then match nothing, which is the right answer).
    pub fn text(&self, name: &str) -> Option<String> {
        self.get(name).map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// A property path in the ABI's encoding: the segments joined by NUL.
pub fn encode_property_path(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// What a host call does, for counting them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    HeaderGet,
    /// A whole header map in one call.
    HeaderPairs,
    /// A header asked for and absent: no value crosses (far cheaper).
    HeaderMissing,
    HeaderSet,
    Property,
    PropertyMissing,
    SharedGet,
    SharedSet,
    BodyGet,
    BodySet,
    Reply,
    Foreign,
    Metric,
    Clock,
    Tick,
    Log,
    /// A gRPC call dispatched (the rate-limit service).
    Grpc,
}

pub const CALL_KINDS: usize = 17;

impl Call {
    pub const ALL: [Call; CALL_KINDS] = [
        Call::HeaderGet,
        Call::HeaderPairs,
        Call::HeaderMissing,
        Call::HeaderSet,
        Call::Property,
        Call::PropertyMissing,
        Call::SharedGet,
        Call::SharedSet,
        Call::BodyGet,
        Call::BodySet,
        Call::Reply,
        Call::Foreign,
        Call::Metric,
        Call::Clock,
        Call::Tick,
        Call::Log,
        Call::Grpc,
    ];

    /// The `call` label value.
    pub fn name(self) -> &'static str {
        match self {
            Call::HeaderGet => "header_get",
            Call::HeaderPairs => "header_pairs",
            Call::HeaderMissing => "header_get_missing",
            Call::HeaderSet => "header_set",
            Call::Property => "property",
            Call::PropertyMissing => "property_missing",
            Call::SharedGet => "shared_data_get",
            Call::SharedSet => "shared_data_set",
            Call::BodyGet => "body_get",
            Call::BodySet => "body_set",
            Call::Reply => "local_reply",
            Call::Foreign => "foreign_function",
            Call::Metric => "metric",
            Call::Clock => "clock",
            Call::Tick => "tick",
            Call::Log => "log",
            Call::Grpc => "grpc_call",
        }
    }
}

#[cfg(target_arch = "wasm32")]
pub use calls::*;

#[cfg(target_arch = "wasm32")]
mod calls {
    use super::{
        encode_header_pairs, encode_property_path, HostError, STATUS_BAD_ARGUMENT, STATUS_CAS_MISMATCH,
        STATUS_NOT_FOUND, STATUS_OK,
    };
    use super::{Call, CALL_KINDS};
    use std::ptr::null_mut;

    /// Header maps (ABI `MapType`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Headers {
        Request = 0,
        Response = 2,
    }

    /// Body buffers (ABI `BufferType`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Body {
        Request = 0,
        Response = 1,
        GrpcReceive = 5,
        PluginConfiguration = 7,
    }

    /// Metric kinds (ABI `MetricType`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum MetricKind {
        Counter = 0,
        Gauge = 1,
        Histogram = 2,
    }

    // Enums cross the ABI as plain u32: a status the host adds later must
    // not become an invalid Rust enum value.
    extern "C" {
        fn proxy_get_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> u32;
        fn proxy_get_header_map_pairs(map_type: u32, return_map_data: *mut *mut u8, return_map_size: *mut usize)
            -> u32;
        fn proxy_replace_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
        fn proxy_get_property(
            path_data: *const u8,
            path_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> u32;
        fn proxy_get_shared_data(
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
            return_cas: *mut u32,
        ) -> u32;
        fn proxy_set_shared_data(
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
            cas: u32,
        ) -> u32;
        fn proxy_get_buffer_bytes(
            buffer_type: u32,
            start: usize,
            max_size: usize,
            return_buffer_data: *mut *mut u8,
            return_buffer_size: *mut usize,
        ) -> u32;
        fn proxy_set_buffer_bytes(
            buffer_type: u32,
            start: usize,
            size: usize,
            buffer_data: *const u8,
            buffer_size: usize,
        ) -> u32;
        fn proxy_send_local_response(
            status_code: u32,
            status_code_details_data: *const u8,
            status_code_details_size: usize,
            body_data: *const u8,
            body_size: usize,
            headers_data: *const u8,
            headers_size: usize,
            grpc_status: i32,
        ) -> u32;
        fn proxy_call_foreign_function(
            function_name_data: *const u8,
            function_name_size: usize,
            arguments_data: *const u8,
            arguments_size: usize,
            results_data: *mut *mut u8,
            results_size: *mut usize,
        ) -> u32;
        fn proxy_define_metric(metric_type: u32, name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
        fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
        fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
        fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
        fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
        fn proxy_set_effective_context(context_id: u32) -> u32;
        fn proxy_continue_stream(stream_type: u32) -> u32;
        fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    }

    fn check(status: u32) -> Result<(), HostError> {
        if status == STATUS_OK {
            Ok(())
        } else {
            Err(HostError(status))
        }
    }

    /// Takes ownership of bytes the host wrote into memory it allocated
    /// through the SDK's `proxy_on_memory_allocate` (a `Vec` of exactly
    /// `size` bytes).
    ///
    /// # Safety
    /// `data` must be null or come from that allocator with `size` bytes.
    unsafe fn take(data: *mut u8, size: usize) -> Vec<u8> {
        if data.is_null() {
            Vec::new()
        } else {
            Vec::from_raw_parts(data, size, size)
        }
    }

    /// A header's value as bytes; `Ok(None)` when absent.
    pub fn header(map: Headers, name: &str) -> Result<Option<Vec<u8>>, HostError> {
        let (mut data, mut size) = (null_mut(), 0);
        // SAFETY: pointers to locals; the host fills them with memory from our allocator.
        let status = unsafe { proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size) };
        count_call(if status == STATUS_OK { Call::HeaderGet } else { Call::HeaderMissing });
        match status {
            STATUS_OK => Ok(Some(unsafe { take(data, size) })),
            STATUS_NOT_FOUND => Ok(None),
            other => Err(HostError(other)),
        }
    }

    /// A whole header map, encoded (see `PairMap`): one copy into the
    /// VM instead of one per header read.
    pub fn header_pairs(map: Headers) -> Result<Vec<u8>, HostError> {
        count_call(Call::HeaderPairs);
        let (mut data, mut size) = (null_mut(), 0);
        // SAFETY: as in `header`.
        let status = unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
        check(status).map(|()| unsafe { take(data, size) })
    }

    /// Sets (`Some`) or removes (`None`) a header.
    pub fn set_header(map: Headers, name: &str, value: Option<&[u8]>) -> Result<(), HostError> {
        count_call(Call::HeaderSet);
        // SAFETY: all pointers come from live slices with their lengths.
        check(unsafe {
            match value {
                Some(v) => proxy_replace_header_map_value(map as u32, name.as_ptr(), name.len(), v.as_ptr(), v.len()),
                None => proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()),
            }
        })
    }

    /// A property (e.g. `["xds", "cluster_name"]`); `Ok(None)` when absent.
    pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        let encoded = encode_property_path(path);
        let (mut data, mut size) = (null_mut(), 0);
        // SAFETY: as in `header`.
        let status = unsafe { proxy_get_property(encoded.as_ptr(), encoded.len(), &mut data, &mut size) };
        count_call(if status == STATUS_OK { Call::Property } else { Call::PropertyMissing });
        match status {
            STATUS_OK => Ok(Some(unsafe { take(data, size) })),
            STATUS_NOT_FOUND => Ok(None),
            other => Err(HostError(other)),
        }
    }

    /// A shared-data value and its CAS token; `(None, None)` when absent.
    pub fn shared_data(key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), HostError> {
        count_call(Call::SharedGet);
        let (mut data, mut size, mut cas) = (null_mut(), 0, 0u32);
        // SAFETY: as in `header`.
        let status = unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
        match status {
            STATUS_OK => Ok((Some(unsafe { take(data, size) }), Some(cas))),
            STATUS_NOT_FOUND => Ok((None, None)),
            other => Err(HostError(other)),
        }
    }

    /// Writes a shared-data value if its CAS token is still `cas`; `None`
    /// writes only if the key does not exist yet. Envoy creates a missing
    /// key whatever the CAS, and skips the check for CAS 0, so "absent" is
    /// asked with a token no existing key is expected to have (`u32::MAX`):
    /// two workers creating the same key cannot both win.
    pub fn set_shared_data(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        count_call(Call::SharedSet);
        let cas = cas.unwrap_or(u32::MAX);
        // SAFETY: pointers from live slices.
        match unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) } {
            STATUS_OK => Ok(()),
            STATUS_CAS_MISMATCH => Err(SetError::CasMismatch),
            other => Err(SetError::Host(HostError(other))),
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum SetError {
        CasMismatch,
        Host(HostError),
    }

    /// Up to `max` bytes of a body buffer from `start`.
    pub fn body(kind: Body, start: usize, max: usize) -> Result<Vec<u8>, HostError> {
        // An empty chunk (a body's end arriving on its own) asks the host for
        // nothing: the call would cost as much as a full read.
        if max == 0 {
            return Ok(Vec::new());
        }
        count_call(Call::BodyGet);
        let (mut data, mut size) = (null_mut(), 0);
        // SAFETY: as in `header`.
        let status = unsafe { proxy_get_buffer_bytes(kind as u32, start, max, &mut data, &mut size) };
        match status {
            STATUS_OK => Ok(unsafe { take(data, size) }),
            STATUS_NOT_FOUND => Ok(Vec::new()),
            other => Err(HostError(other)),
        }
    }

    /// Replaces `size` bytes of a body buffer from `start` with `bytes`.
    pub fn set_body(kind: Body, start: usize, size: usize, bytes: &[u8]) -> Result<(), HostError> {
        count_call(Call::BodySet);
        // SAFETY: pointer from a live slice.
        check(unsafe { proxy_set_buffer_bytes(kind as u32, start, size, bytes.as_ptr(), bytes.len()) })
    }

    /// Answers the request with a local reply.
    pub fn send_reply(status: u32, headers: &[(&str, &str)], body: &[u8]) -> Result<(), HostError> {
        count_call(Call::Reply);
        let encoded = encode_header_pairs(headers);
        let details = b"spillway";
        // SAFETY: pointers from live slices; -1 = not gRPC.
        check(unsafe {
            proxy_send_local_response(
                status,
                details.as_ptr(),
                details.len(),
                body.as_ptr(),
                body.len(),
                encoded.as_ptr(),
                encoded.len(),
                -1,
            )
        })
    }

    /// Calls a host extension function (e.g. Envoy's `clear_route_cache`).
    pub fn call_foreign(name: &str, args: &[u8]) -> Result<Vec<u8>, HostError> {
        count_call(Call::Foreign);
        let (mut data, mut size) = (null_mut(), 0);
        // SAFETY: as in `header`.
        let status = unsafe {
            proxy_call_foreign_function(name.as_ptr(), name.len(), args.as_ptr(), args.len(), &mut data, &mut size)
        };
        check(status).map(|()| unsafe { take(data, size) })
    }

    pub fn define_metric(kind: MetricKind, name: &str) -> Result<u32, HostError> {
        count_call(Call::Metric);
        let mut id = 0;
        // SAFETY: pointers from a live slice and a local.
        check(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) }).map(|()| id)
    }

    pub fn increment_metric(id: u32, by: i64) -> Result<(), HostError> {
        count_call(Call::Metric);
        // SAFETY: no pointers.
        check(unsafe { proxy_increment_metric(id, by) })
    }

    pub fn record_metric(id: u32, value: u64) -> Result<(), HostError> {
        count_call(Call::Metric);
        // SAFETY: no pointers.
        check(unsafe { proxy_record_metric(id, value) })
    }

    // WASI's clock, which proxy-wasm hosts implement: its monotonic clock
    // is the host's steady clock (one per process, shared by all workers).
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    extern "C" {
        fn clock_time_get(clock_id: i32, precision: i64, time: i32) -> i32;
    }

    const WASI_CLOCK_MONOTONIC: i32 = 1;

    thread_local! {
        static CALLS: std::cell::Cell<[u64; CALL_KINDS]> = const { std::cell::Cell::new([0; CALL_KINDS]) };
    }

    fn count_call(kind: Call) {
        CALLS.with(|c| {
            let mut counts = c.get();
            if let Some(n) = counts.get_mut(kind as usize) {
                *n = n.wrapping_add(1);
            }
            c.set(counts);
        });
    }

    /// Host calls this VM has made so far, by kind (`Call as usize`).
    pub fn calls() -> [u64; CALL_KINDS] {
        CALLS.with(std::cell::Cell::get)
    }

    /// The VM's linear memory, in bytes.
    pub fn memory_bytes() -> u64 {
        (core::arch::wasm32::memory_size(0) as u64).saturating_mul(65_536)
    }

    /// Steady time in milliseconds (an arbitrary origin, never stepped).
    pub fn monotonic_ms() -> Result<u64, HostError> {
        count_call(Call::Clock);
        let mut nanos = 0u64;
        let out = &mut nanos as *mut u64 as usize;
        // SAFETY: the host writes 8 bytes to a local; wasm32 pointers fit i32.
        let errno = unsafe { clock_time_get(WASI_CLOCK_MONOTONIC, 1_000_000, out as i32) };
        if errno == 0 {
            Ok(nanos / 1_000_000)
        } else {
            Err(HostError(errno.unsigned_abs()))
        }
    }

    /// Wall-clock time in milliseconds since the Unix epoch.
    pub fn now_ms() -> Result<u64, HostError> {
        count_call(Call::Clock);
        let mut nanos = 0u64;
        // SAFETY: pointer to a local.
        check(unsafe { proxy_get_current_time_nanoseconds(&mut nanos) }).map(|()| nanos / 1_000_000)
    }

    pub fn set_tick_period_ms(ms: u32) -> Result<(), HostError> {
        count_call(Call::Tick);
        // SAFETY: no pointers.
        check(unsafe { proxy_set_tick_period_milliseconds(ms) })
    }

    /// Makes the following calls act on stream `context_id` (from a root
    /// context's tick, for a request paused earlier).
    pub fn set_effective_context(context_id: u32) -> Result<(), HostError> {
        count_call(Call::Tick);
        // SAFETY: no pointers.
        check(unsafe { proxy_set_effective_context(context_id) })
    }

    /// Starts a unary gRPC call to `target` (a serialized `GrpcService`);
    /// its answer arrives at the calling context's `on_grpc_call_response`.
    /// The SDK's own dispatch is used because only it can route the answer
    /// by token; it panics on statuses other than parse and internal
    /// failure, which Envoy returns only when it cannot build a client for
    /// the target (never for a well-formed `envoy_grpc` target).
    pub fn dispatch_grpc(
        target: &[u8],
        service: &str,
        method: &str,
        message: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, HostError> {
        count_call(Call::Grpc);
        // The SDK takes the target as &str; a cluster name is ASCII, so the
        // message built from it is valid UTF-8.
        let target = std::str::from_utf8(target).map_err(|_| HostError(STATUS_BAD_ARGUMENT))?;
        proxy_wasm::hostcalls::dispatch_grpc_call(
            target,
            service,
            method,
            Vec::new(),
            Some(message),
            std::time::Duration::from_millis(timeout_ms),
        )
        .map_err(|status| HostError(status as u32))
    }

    /// Lets a paused request go on (ABI `StreamType::HttpRequest` = 0).
    pub fn resume_request() -> Result<(), HostError> {
        count_call(Call::Tick);
        // SAFETY: no pointers.
        check(unsafe { proxy_continue_stream(0) })
    }

    fn write_log(level: u32, message: &str) {
        count_call(Call::Log);
        // SAFETY: pointer from a live string. A failed log call is dropped.
        let _ = unsafe { proxy_log(level, message.as_ptr(), message.len()) };
    }

    /// `log` records to Envoy's log (the ABI's levels: trace 0 .. critical 5).
    struct HostLogger;

    impl log::Log for HostLogger {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.level() <= log::max_level()
        }

        fn log(&self, record: &log::Record<'_>) {
            if !self.enabled(record.metadata()) {
                return;
            }
            let level = match record.level() {
                log::Level::Trace => 0,
                log::Level::Debug => 1,
                log::Level::Info => 2,
                log::Level::Warn => 3,
                log::Level::Error => 4,
            };
            write_log(level, &record.args().to_string());
        }

        fn flush(&self) {}
    }

    static LOGGER: HostLogger = HostLogger;

    /// Routes `log` to Envoy at info level and up, and logs a panic before
    /// the VM traps (a panic should be impossible; if one happens, the log
    /// says where).
    pub fn install_logger() {
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Info);
        }
        std::panic::set_hook(Box::new(|info| {
            write_log(5, &format!("spillway: panic, this worker's filter VM stops serving: {info}"));
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_pairs_use_the_abi_layout() {
        let bytes = encode_header_pairs(&[("a", "bc"), ("de", "")]);
        let mut want = vec![2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(b"a\0bc\0de\0\0");
        assert_eq!(bytes, want);
        assert_eq!(encode_header_pairs(&[]), vec![0, 0, 0, 0]);
    }

    #[test]
    fn pairs_decode_what_they_encode_and_nothing_else() {
        let bytes = encode_header_pairs(&[("model", "gpt-x"), ("n", "\0\0\0\0\0\0\0@"), ("e", "")]);
        let pairs = decode_pairs(&bytes).unwrap();
        assert_eq!(pairs, vec![(&b"model"[..], &b"gpt-x"[..]), (b"n", b"\0\0\0\0\0\0\0@"), (b"e", b"")]);
        assert_eq!(decode_pairs(&encode_header_pairs(&[])).unwrap(), vec![]);
        // Truncated, with a byte too many, a missing NUL, or a count that lies.
        assert_eq!(decode_pairs(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode_pairs(&[bytes.as_slice(), b"x"].concat()), None);
        let mut no_nul = bytes.clone();
        // The NUL after the first name ("model"): count, three length pairs, five bytes.
        no_nul[4 + 3 * 8 + 5] = b'!';
        assert_eq!(decode_pairs(&no_nul), None);
        assert_eq!(decode_pairs(&[255, 255, 255, 255]), None);
        assert_eq!(decode_pairs(&[]), None);
    }

    /// What Envoy 1.40 answered for `metadata.filter_metadata.spillway`
    /// after json_to_metadata read `{"model":"gpt-x","max_tokens":16,"stream":false,"n":2}`.
    #[test]
    fn a_metadata_namespace_from_envoy_decodes() {
        let hex = "0500000006000000010000000600000001000000010000000800000005000000050000000a0000000800000073747265616d0000007061727365640031006e000000000000000040006d6f64656c006770742d78006d61785f746f6b656e7300000000000000304000";
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let pairs = decode_pairs(&bytes).unwrap();
        let names: Vec<&[u8]> = pairs.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, vec![&b"stream"[..], b"parsed", b"n", b"model", b"max_tokens"]);
        assert_eq!(pairs[3].1, b"gpt-x");
        assert_eq!(pairs[4].1, 16f64.to_le_bytes());
    }

    #[test]
    fn header_pairs_give_the_first_value_of_a_name() {
        let bytes = encode_header_pairs(&[(":path", "/a"), ("api-key", "one"), ("api-key", "two"), ("x", "\u{e9}")]);
        let h = PairMap::decode(bytes).unwrap();
        assert_eq!(h.get("api-key"), Some(&b"one"[..]));
        assert_eq!(h.text(":path").as_deref(), Some("/a"));
        assert_eq!(h.get("authorization"), None);
        assert_eq!(h.text("x").as_deref(), Some("\u{e9}"));
        let mut bad = encode_header_pairs(&[("k", "v")]);
        bad.pop();
        assert!(PairMap::decode(bad).is_none());
    }

    #[test]
    fn property_paths_join_with_nul() {
        assert_eq!(encode_property_path(&["xds", "cluster_name"]), b"xds\0cluster_name");
        assert_eq!(encode_property_path(&["plugin_root_id"]), b"plugin_root_id");
    }
}
