//! The third-party examples against a real `drv-thru serve` (relays off):
//! the Rust one (`examples/status.rs`) over Iroh, and the Python one
//! (`examples/python/`) over the admin socket and Iroh. Each fails when an
//! outcome differs from what `proto/` documents.

#[path = "support/builder.rs"]
mod builder;
#[path = "support/two_stores.rs"]
mod two_stores;
// The example itself, so this test exercises exactly its code (its `main`
// is what `cargo run --example status` runs, unused here).
#[allow(dead_code)]
#[path = "../examples/status.rs"]
mod status_example;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use builder::Builder;
use iroh::SecretKey;
use status_example::proto::{StatusRequest, StatusResponse, builder_client::BuilderClient};
use tonic::Code;

/// The client the builder is started to trust.
fn trusted_key() -> SecretKey {
    SecretKey::from_bytes(&[7; 32])
}

/// A builder that trusts [`trusted_key`].
fn start_builder(dir: &Path) -> Builder {
    let trusted = trusted_key().public().to_string();
    Builder::start(dir, &["--trusted-client", &trusted])
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rust_example_asks_for_status_and_strangers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let builder = start_builder(dir.path());
    let reply = status(&builder, trusted_key()).await.unwrap().into_inner();
    assert_eq!(
        reply.status.unwrap().endpoint_id,
        builder.endpoint_id.to_string()
    );

    let refused = status(&builder, SecretKey::from_bytes(&[8; 32]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert_eq!(
        refused.metadata().get("drvthru-refusal").unwrap(),
        "client-not-trusted"
    );
}

/// `Builder/Status` through the example, as the client with `key`.
async fn status(
    builder: &Builder,
    key: SecretKey,
) -> Result<tonic::Response<StatusResponse>, tonic::Status> {
    let (endpoint, channel) = status_example::connect(key, builder.endpoint_id, builder.addr)
        .await
        .unwrap();
    let reply = BuilderClient::new(channel).status(StatusRequest {}).await;
    endpoint.close().await;
    reply
}

#[test]
fn the_python_example_gets_every_documented_outcome() {
    // tests/run.sh makes the virtual environment from the pinned
    // examples/python/requirements.txt; the test itself downloads nothing.
    let Some(venv) = std::env::var_os("DRV_THRU_PYTHON_VENV") else {
        two_stores::skip("the Python example needs DRV_THRU_PYTHON_VENV (tests/run.sh sets it)");
        return;
    };
    let bin = PathBuf::from(venv).join("bin");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python");
    let dir = tempfile::tempdir().unwrap();
    let builder = start_builder(dir.path());
    let generated = dir.path().join("gen");
    // Both scripts find the environment's `python3` first on PATH.
    let path = std::env::join_paths(
        std::iter::once(bin).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();

    run(Command::new("bash")
        .arg(examples.join("generate.sh"))
        .arg(&generated)
        .env("PATH", &path));
    let drv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/nix/hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv");
    run(Command::new("python3")
        .arg(examples.join("check.py"))
        .arg(serde_json::to_string(&builder.ready).unwrap())
        .arg(data_encoding::HEXLOWER.encode(&trusted_key().to_bytes()))
        .arg(drv)
        .env("PATH", &path)
        .env("PYTHONPATH", &generated));
}

/// Runs `command`, which must succeed; shows its output either way.
fn run(command: &mut Command) {
    let output = command.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    println!("{stdout}");
    assert!(
        output.status.success(),
        "{command:?} failed:\n{stdout}\n{stderr}"
    );
}
