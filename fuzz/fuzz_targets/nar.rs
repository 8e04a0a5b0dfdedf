//! NAR streams, as builders and peers send them: the validator must give
//! the same verdict and hand out the same file contents however the stream
//! is chunked, never panic, and keep its memory bounded.

#![no_main]

use drv_thru::nix::nar::{NarError, NarValidator};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = validate(data, &mut std::iter::repeat(data.len().max(1)));
    if let (Ok(size), contents) = &whole {
        assert_eq!(*size, data.len() as u64);
        assert!(contents.as_ref().is_none_or(|c| c.len() <= data.len()));
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
});

/// The verdict on `data` pushed in chunks of `sizes`, and the file contents
/// handed out if it is a single file.
fn validate(
    data: &[u8],
    sizes: &mut dyn Iterator<Item = usize>,
) -> (Result<u64, NarError>, Option<Vec<u8>>) {
    let mut validator = NarValidator::new();
    let mut contents = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(sizes.next().unwrap_or(1).clamp(1, rest.len()));
        rest = tail;
        // After an error the validator only repeats it, so keep pushing
        // to check that it does.
        let _ = validator.push_file_contents(chunk, |part| contents.extend_from_slice(part));
    }
    let single = validator.is_single_file();
    (validator.finish(), single.then_some(contents))
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
