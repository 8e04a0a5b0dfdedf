//! Narinfo text, as any binary cache or builder serves it: parsing must not
//! panic, and whatever parses must print to text that parses back to the
//! same value (drv-thru rewrites and re-serves narinfos).

#![no_main]

use drv_thru::nix::narinfo::NarInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(info) = text.parse::<NarInfo>() else {
        return;
    };
    let printed = info.to_string();
    let back: NarInfo = printed
        .parse()
        .unwrap_or_else(|err| panic!("printed narinfo does not parse: {err}\n{printed}"));
    assert_eq!(back, info, "{printed}");
    assert_eq!(back.to_string(), printed);
    let _ = info.has_plain_nar_url();
    let _ = info.fingerprint();
});
