//! The server config and builders.json, as `serve --config` and
//! `build --builder` read them: JSON that must parse without panicking, and
//! a server config that serializes back to JSON meaning the same.
//!
//! `builders.json` is read through `find_builder`, which wants files and
//! follows `endpoint_id_file` to read further files; the target
//! deserializes its entries directly instead, so no input can make it read
//! `/dev/zero`.

#![no_main]

use std::collections::BTreeMap;

use drv_thru::config::{BuilderEntry, ServerConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = serde_json::from_str::<ServerConfig>(text) {
        let verdict = config.validate();
        let json = serde_json::to_string(&config).expect("a config serializes");
        let back: ServerConfig = serde_json::from_str(&json)
            .unwrap_or_else(|err| panic!("serialized config does not parse: {err}\n{json}"));
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        assert_eq!(back.validate(), verdict);
    }
    let _ = serde_json::from_str::<BTreeMap<String, BTreeMap<String, BuilderEntry>>>(text);
});
