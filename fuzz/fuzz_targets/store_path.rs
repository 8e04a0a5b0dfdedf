//! Store paths and base names, as they arrive in requests, narinfos and
//! `nix` output: whatever parses prints back to a form that parses to the
//! same path.

#![no_main]

use drv_thru::nix::store_path::{StorePath, StorePathHash};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(path) = text.parse::<StorePath>() {
        assert_eq!(path.to_string(), text, "a full path has one spelling");
        check(&path);
    }
    if let Ok(path) = StorePath::from_base_name(text) {
        assert_eq!(path.base_name(), text, "a base name has one spelling");
        check(&path);
    }
    if let Ok(hash) = text.parse::<StorePathHash>() {
        assert_eq!(hash.to_string().parse::<StorePathHash>().unwrap(), hash);
    }
});

fn check(path: &StorePath) {
    assert_eq!(path.to_string().parse::<StorePath>().unwrap(), *path);
    assert_eq!(StorePath::from_base_name(&path.base_name()).unwrap(), *path);
    assert_eq!(
        StorePath::from_parts(*path.hash_part(), path.name()).unwrap(),
        *path
    );
}
