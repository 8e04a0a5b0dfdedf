//! Import requests as the root import helper receives them from any local
//! user: protobuf bytes, decoded and checked. Whatever passes must be
//! exactly what was asked for, written as Nix writes it.

#![no_main]

use std::path::Path;

use drv_thru::helper::allowlist::Allowlist;
use drv_thru::helper::request::{LoopbackUrl, ValidImport, exact_key};
use drv_thru::proto::ImportRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// The allowlisted key; the seed corpus asks for imports under it.
const KEY: &str = "builder-1:WGZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmY=";

fuzz_target!(|data: &[u8]| {
    let Ok(request) = ImportRequest::decode(data) else {
        return;
    };
    let allowlist = Allowlist::parse(KEY, Path::new("allowlist")).expect("the key is valid");
    if let Ok(key) = exact_key(&request.builder_public_key) {
        assert_eq!(key.to_string(), request.builder_public_key);
    }
    if let Ok(url) = request.cache_url.parse::<LoopbackUrl>() {
        assert_eq!(url.to_string(), request.cache_url);
    }
    let Ok(import) = ValidImport::check(&request, &allowlist) else {
        return;
    };
    assert_eq!(import.key.to_string(), KEY);
    assert_eq!(import.url.to_string(), request.cache_url);
    for path in &import.paths {
        assert!(request.store_paths.contains(&path.to_string()));
    }
    for text in &request.store_paths {
        assert!(import.paths.iter().any(|path| path.to_string() == *text));
    }
});
