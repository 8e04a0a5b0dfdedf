//! Clients for the test builder (`tests/support/builder.rs`), shared by
//! the integration tests and the adversarial suite.

// Each includer uses a different part of this file.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};

use drv_thru::{
    client::{self, Connection, Target},
    proto::{self, builder_client::BuilderClient},
    transport::endpoint::RelayChoice,
};
use iroh::EndpointId;

pub use crate::builder::{Builder, Launcher, binary, command, spawn_logged};

/// A client key file in `dir` named `name` (created on first connect).
pub fn key_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

/// The endpoint id of the key in `path`, creating the key if needed.
pub fn endpoint_id_of(path: &Path) -> EndpointId {
    drv_thru::keys::load_or_create_endpoint_key(path)
        .unwrap()
        .public()
}

/// Connects to a builder as the client whose key is in `key`.
pub async fn connect(target: &Target, key: &Path) -> Connection {
    client::connect(target, RelayChoice::Disabled, Some(key))
        .await
        .unwrap()
}

/// An admission request for a real (tiny) derivation: a `.drv` fixture with
/// its true content address, NAR hash and size.
pub fn session_request() -> proto::OpenSessionRequest {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nix");
    let name = "hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv";
    let contents = std::fs::read(dir.join(name)).unwrap();
    let mut nar = Vec::new();
    drv_thru::store_nar::dump(
        &dir.join(name),
        drv_thru::transport::http2::CHUNK,
        |chunk| {
            nar.extend_from_slice(&chunk);
            Ok(())
        },
    )
    .unwrap();
    let sha256 = |bytes: &[u8]| drv_thru::nix::hash::Sha256Hash::digest(bytes);
    let drv_path = format!("/nix/store/{name}");
    proto::OpenSessionRequest {
        drv_path: drv_path.clone(),
        inputs: vec![proto::InputPath {
            store_path: drv_path,
            references: Vec::new(),
            content_address: format!("text:{}", sha256(&contents)),
            nar_hash: sha256(&nar).to_string(),
            nar_size: nar.len() as u64,
        }],
    }
}

/// Opens a build session; returns the response or the refusal.
pub async fn open_session(
    connection: &Connection,
) -> Result<proto::OpenSessionResponse, tonic::Status> {
    BuilderClient::new(connection.channel.clone())
        .open_session(session_request())
        .await
        .map(tonic::Response::into_inner)
}

/// The `drvthru-refusal` reason of a refused call.
pub fn refusal(status: &tonic::Status) -> &str {
    status
        .metadata()
        .get("drvthru-refusal")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
}

/// A stranger's bare QUIC connection to `target`, which sends nothing and
/// never redials, with the endpoint it came from.
pub async fn bare_connection(
    target: &drv_thru::client::Target,
    key: &std::path::Path,
) -> (iroh::Endpoint, iroh::endpoint::Connection) {
    let endpoint = drv_thru::client::bind(
        drv_thru::transport::endpoint::RelayChoice::Disabled,
        Some(key),
    )
    .await
    .unwrap();
    let connection = endpoint
        .connect(target.addr().unwrap(), drv_thru::proto::ALPN)
        .await
        .unwrap();
    (endpoint, connection)
}

/// The application close code the builder ended `connection` with, within
/// 30 s.
pub async fn closed_with(connection: &iroh::endpoint::Connection) -> u64 {
    let reason = tokio::time::timeout(std::time::Duration::from_secs(30), connection.closed())
        .await
        .expect("the builder closed the connection");
    match reason {
        iroh::endpoint::ConnectionError::ApplicationClosed(close) => close.error_code.into_inner(),
        other => panic!("closed otherwise: {other:?}"),
    }
}
