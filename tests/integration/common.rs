//! Clients for the test builder (`tests/support/builder.rs`), shared by
//! the integration tests and the adversarial suite.

// Each includer uses a different part of this file.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};

use drv_thru::{
    client::{self, Connection, Target},
    proto::{self, builder_client::BuilderClient, cache_client::CacheClient},
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

/// The builder `name` of a builders file in `dir` holding `entry` (its
/// JSON object), resolved as `--builder NAME` resolves it.
pub fn named_builder(dir: &Path, name: &str, entry: &str) -> Target {
    let file = dir.join("builders.json");
    std::fs::write(&file, format!(r#"{{"builders": {{"{name}": {entry}}}}}"#)).unwrap();
    Target::Named(Box::new(
        drv_thru::config::find_builder(&[file], name).unwrap(),
    ))
}

/// Connects to a builder as the client whose key is in `key`.
pub async fn connect(target: &Target, key: &Path) -> Connection {
    client::connect(target, RelayChoice::Disabled, Some(key))
        .await
        .unwrap()
}

/// The NAR of a file or directory, as Nix would serialise it.
pub fn nar_of(path: &Path) -> Vec<u8> {
    let mut nar = Vec::new();
    drv_thru::store_nar::dump(path, drv_thru::transport::http2::CHUNK, |chunk| {
        nar.extend_from_slice(&chunk);
        Ok(())
    })
    .unwrap();
    nar
}

/// The `.drv` fixture of [`session_request`] (`/bin/sh -c 'echo hi > $out'`,
/// no other inputs): its store path and NAR.
pub fn fixture_drv() -> (String, Vec<u8>) {
    let name = "hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv";
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/nix")
        .join(name);
    (format!("/nix/store/{name}"), nar_of(&file))
}

/// An admission request for a real (tiny) derivation: a `.drv` fixture with
/// its true content address, NAR hash and size.
pub fn session_request() -> proto::OpenSessionRequest {
    let (drv_path, nar) = fixture_drv();
    let contents = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/nix")
            .join(drv_path.trim_start_matches("/nix/store/")),
    )
    .unwrap();
    let sha256 = |bytes: &[u8]| drv_thru::nix::hash::Sha256Hash::digest(bytes);
    proto::OpenSessionRequest {
        drv_path: drv_path.clone(),
        inputs: vec![proto::InputPath {
            store_path: drv_path,
            references: Vec::new(),
            content_address: format!("text:{}", sha256(&contents)),
            nar_hash: sha256(&nar).to_string(),
            nar_size: nar.len() as u64,
        }],
        ..Default::default()
    }
}

/// Uploads `inputs` (store path and NAR) to `session` in one call, each
/// NAR whole in chunks.
pub async fn upload(
    connection: &Connection,
    session: &str,
    inputs: &[(String, Vec<u8>)],
) -> Result<proto::UploadInputsResponse, tonic::Status> {
    let mut messages = vec![proto::UploadInputsRequest {
        session_id: session.to_owned(),
        ..Default::default()
    }];
    for (path, nar) in inputs {
        for (n, chunk) in nar.chunks(drv_thru::transport::http2::CHUNK).enumerate() {
            messages.push(proto::UploadInputsRequest {
                store_path: if n == 0 { path.clone() } else { String::new() },
                data: chunk.to_vec().into(),
                ..Default::default()
            });
        }
    }
    BuilderClient::new(connection.channel.clone())
        .max_encoding_message_size(drv_thru::transport::http2::MAX_MESSAGE_SIZE)
        .upload_inputs(tokio_stream::iter(messages))
        .await
        .map(tonic::Response::into_inner)
}

/// Builds `session` and returns how the build ended.
pub async fn build(
    connection: &Connection,
    session: &str,
) -> Result<proto::BuildFinished, tonic::Status> {
    let mut events = BuilderClient::new(connection.channel.clone())
        .build(proto::BuildRequest {
            session_id: session.to_owned(),
            rebuild: false,
        })
        .await?
        .into_inner();
    while let Some(response) = events.message().await? {
        match response.event {
            Some(proto::build_response::Event::Finished(finished)) => return Ok(finished),
            Some(proto::build_response::Event::Log(line)) => {
                assert!(!line.text.contains("--add-root"), "{}", line.text);
            }
            _ => {}
        }
    }
    Err(tonic::Status::aborted(
        "the build stream ended without a result",
    ))
}

/// The URL of the NAR of `store_path`, an output of `session`, from its
/// narinfo.
pub async fn nar_url(
    connection: &Connection,
    session: &str,
    store_path: &str,
) -> Result<String, tonic::Status> {
    let hash = &store_path.trim_start_matches("/nix/store/")[..32];
    let narinfo = CacheClient::new(connection.channel.clone())
        .get_nar_info(proto::GetNarInfoRequest {
            session_id: session.to_owned(),
            store_path_hash: hash.to_owned(),
        })
        .await?
        .into_inner()
        .narinfo;
    let narinfo: drv_thru::nix::narinfo::NarInfo = narinfo.parse().unwrap();
    Ok(narinfo.url)
}

/// Fetches the NAR of `store_path`, an output of `session`, through its
/// narinfo, whole.
pub async fn fetch_nar(
    connection: &Connection,
    session: &str,
    store_path: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let url = nar_url(connection, session, store_path).await?;
    let mut chunks = CacheClient::new(connection.channel.clone())
        .get_nar(proto::GetNarRequest {
            session_id: session.to_owned(),
            url,
            offset: 0,
            length: 0,
        })
        .await?
        .into_inner();
    let mut nar = Vec::new();
    while let Some(chunk) = chunks.message().await? {
        nar.extend_from_slice(&chunk.data);
    }
    Ok(nar)
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

/// How many uses of ticket `id` the builder has recorded.
pub fn uses_taken(builder: &Builder, id: &str) -> u64 {
    let listing: serde_json::Value =
        serde_json::from_str(&builder.cli_ok(&["ticket", "list", "--all", "--json"])).unwrap();
    listing
        .as_array()
        .unwrap()
        .iter()
        .find(|ticket| ticket["id"] == id)
        .map(|ticket| ticket["uses_taken"].as_u64().unwrap())
        .expect("the ticket is listed")
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

/// A small seeded pseudo-random generator (SplitMix64), so that a seed
/// replays a run's choices.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
