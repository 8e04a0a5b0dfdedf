//! Nix's internal-json log lines, which a builder relays to clients: the
//! parser takes any line, and `strip_controls` leaves nothing that could
//! drive the client's terminal.

#![no_main]

use drv_thru::nixcmd::log::{LogParser, strip_controls};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parser = LogParser::new();
    for line in text.split_inclusive('\n') {
        let _ = parser.parse(line);
    }
    let stripped = strip_controls(&text);
    assert!(
        stripped
            .chars()
            .all(|c| !c.is_control() || c == '\n' || c == '\t'),
        "{stripped:?}"
    );
    assert_eq!(strip_controls(&stripped), stripped);
});
