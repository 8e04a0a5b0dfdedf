//! `.drv` files in ATerm form, as a client uploads them to a builder.

#![no_main]

use drv_thru::nix::drv::Derivation;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(drv) = Derivation::parse(data) else {
        return;
    };
    assert!(drv.references().len() <= drv.input_drvs().len() + drv.input_srcs().len());
    for output in drv.outputs().values() {
        let _ = (output.path(), output.hash_algo(), output.hash());
    }
});
