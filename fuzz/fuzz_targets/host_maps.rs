//! Maps the host answers in its pair encoding: a whole header map, a
//! metadata namespace. The decoder takes any bytes; what it accepts is
//! exactly one encoding (re-encoding gives the same bytes), and a header
//! lookup gives the first value of its name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spillway::host::{decode_pairs, encode_header_pairs, PairMap};

fuzz_target!(|data: &[u8]| {
    let Some(pairs) = decode_pairs(data) else {
        assert!(PairMap::decode(data.to_vec()).is_none());
        return;
    };
    let text: Option<Vec<(&str, &str)>> =
        pairs.iter().map(|(n, v)| Some((std::str::from_utf8(n).ok()?, std::str::from_utf8(v).ok()?))).collect();
    if let Some(text) = text {
        assert_eq!(encode_header_pairs(&text), data);
    }
    let headers = PairMap::decode(data.to_vec()).expect("the same bytes decode as headers");
    for (name, value) in &pairs {
        if let Ok(name) = std::str::from_utf8(name) {
            let first = pairs.iter().find(|(n, _)| *n == name.as_bytes()).map(|(_, v)| *v);
            assert_eq!(headers.get(name), first);
            assert!(
                first.is_some_and(|f| f == *value) || pairs.iter().filter(|(n, _)| *n == name.as_bytes()).count() > 1
            );
        }
    }
});
