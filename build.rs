//! Generates the `drvthru.v1` gRPC code from `proto/` with a pure-Rust
//! protobuf compiler, so a fresh machine needs no system `protoc`.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO_ROOT: &str = "proto";
const PROTOS: &[&str] = &[
    "drvthru/v1/builder.proto",
    "drvthru/v1/cache.proto",
    "drvthru/v1/import_helper.proto",
    "drvthru/v1/tickets.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let descriptors = protox::Compiler::new([PROTO_ROOT])?
        .include_source_info(true)
        .include_imports(true)
        .open_files(PROTOS)?
        .file_descriptor_set();
    // Server reflection serves this set, so third parties can discover the API live.
    fs::write(
        out_dir.join("drvthru_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .bytes(".drvthru.v1.GetNarResponse.data")
        .bytes(".drvthru.v1.GetNarsResponse.data")
        .bytes(".drvthru.v1.UploadInputsRequest.data")
        .compile_fds(descriptors)?;
    Ok(())
}
