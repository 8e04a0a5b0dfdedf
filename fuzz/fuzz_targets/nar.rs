//! NAR streams, as builders and peers send them: the validator must give
//! the same verdict however the stream is chunked, never panic, and keep
//! its memory bounded.

#![no_main]

use drv_thru::nix::nar::{NarError, NarValidator, single_file_contents};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = validate(data, &mut std::iter::repeat(data.len().max(1)));
    if let Ok(size) = &whole {
        assert_eq!(*size, data.len() as u64);
    }
    assert_eq!(
        validate(data, &mut std::iter::repeat(1)),
        whole,
        "byte by byte"
    );
    assert_eq!(
        validate(data, &mut chunk_sizes(data)),
        whole,
        "uneven chunks"
    );
    if let Some(contents) = single_file_contents(data) {
        assert!(contents.len() <= data.len());
    }
});

fn validate(data: &[u8], sizes: &mut dyn Iterator<Item = usize>) -> Result<u64, NarError> {
    let mut validator = NarValidator::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(sizes.next().unwrap_or(1).clamp(1, rest.len()));
        rest = tail;
        // After an error the validator only repeats it, so keep pushing
        // to check that it does.
        let _ = validator.push(chunk);
    }
    validator.finish()
}

/// Chunk sizes from 1 to 64, drawn from a generator seeded by the input,
/// so every input is also split at boundaries no fixed size would hit.
fn chunk_sizes(data: &[u8]) -> impl Iterator<Item = usize> {
    let mut state = data.iter().fold(0x9e37_79b9_7f4a_7c15_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) | 1;
    std::iter::from_fn(move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        Some((state % 64) as usize + 1)
    })
}
