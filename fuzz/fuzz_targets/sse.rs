//! The SSE usage scanner, fed a stream cut at fuzzer-chosen points.
//!
//! Input: a flags byte (bit 0: strip the usage chunk, bit 1: end the stream
//! with an extra empty chunk, bits 2-4: the text cap), a byte N (cut count,
//! mod 16), N little-endian u16 cut offsets (mod the stream's length + 1),
//! then the stream.
//!
//! Properties: without stripping every chunk goes on unchanged; with or
//! without, the stream cut into pieces gives the same output (concatenated)
//! and the same usage, model, object id, text and streamed-token count as the
//! stream fed at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spillway::usage::SseScanner;

const TEXT_CAPS: [usize; 8] = [0, 1, 2, 3, 5, 16, 100, 2048];

fuzz_target!(|data: &[u8]| {
    let [flags, n, rest @ ..] = data else { return };
    let strip = flags & 1 != 0;
    let empty_end = flags & 2 != 0;
    let cap = TEXT_CAPS[usize::from(flags >> 2) & 7];
    let n = usize::from(n % 16);
    let Some(offsets) = rest.get(..2 * n) else { return };
    let stream = &rest[2 * n..];
    let mut cuts: Vec<usize> =
        offsets.chunks_exact(2).map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (stream.len() + 1)).collect();
    cuts.push(0);
    cuts.push(stream.len());
    cuts.sort_unstable();
    let pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &stream[w[0]..w[1]]).collect();

    let mut whole = SseScanner::new(strip, cap);
    let whole_out = whole.feed(stream, true);

    let mut cut = SseScanner::new(strip, cap);
    let mut cut_out = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let last = i + 1 == pieces.len() && !empty_end;
        let out = cut.feed(piece, last);
        if !strip {
            assert_eq!(&out, piece, "without stripping a chunk must pass unchanged");
        }
        cut_out.extend(out);
    }
    if empty_end {
        let out = cut.feed(b"", true);
        assert!(strip || out.is_empty());
        cut_out.extend(out);
    }

    if !strip {
        assert_eq!(whole_out, stream);
    }
    assert_eq!(whole_out, cut_out, "output depends on where the stream was cut: {pieces:?}");
    assert_eq!(whole.usage, cut.usage, "usage depends on the cuts: {pieces:?}");
    assert_eq!(whole.model, cut.model, "model depends on the cuts: {pieces:?}");
    assert_eq!(whole.object_id, cut.object_id, "object id depends on the cuts: {pieces:?}");
    assert_eq!(whole.text, cut.text, "text depends on the cuts: {pieces:?}");
    assert_eq!(whole.streamed_tokens, cut.streamed_tokens, "streamed tokens depend on the cuts: {pieces:?}");
    assert!(whole.text.len() <= cap);
    // Stripping removes whole events only; everything else passes in order.
    if strip {
        assert!(whole_out.len() <= stream.len());
    }
});
