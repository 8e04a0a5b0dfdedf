//! Receiving input uploads: only announced, missing, content-addressed paths,
//! checked byte by byte while they stream, then handed to the builder's Nix
//! as a throwaway binary cache so that Nix checks them again and no trusted
//! user rights are needed.

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
};

use tokio::io::AsyncWriteExt;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use tracing::{debug, info};

use super::session::{DeclaredInput, Session};
use crate::{
    nix::{
        content_address::ContentAddress,
        hash::Sha256Hash,
        nar::{NarHasher, NarValidator, single_file_contents},
        narinfo::NarInfo,
        store_path::StorePath,
    },
    nixcmd::Nix,
    proto::{UploadInputsRequest, UploadInputsResponse},
};

/// Text-hashed inputs (`.drv` files) are checked in memory; a derivation
/// this large is not a derivation.
const MAX_TEXT_INPUT: u64 = 16 << 20;

/// One path being received.
struct Incoming {
    input: DeclaredInput,
    file: tokio::fs::File,
    hasher: NarHasher,
    validator: NarValidator,
    received: u64,
    text: Option<Vec<u8>>,
}

impl Incoming {
    async fn start(input: DeclaredInput, staging: &Path) -> Result<Self, Status> {
        let file = tokio::fs::File::create(nar_file(staging, &input.path))
            .await
            .map_err(internal("creating an upload file"))?;
        let text = match input.ca {
            ContentAddress::Text(_) if input.nar_size <= MAX_TEXT_INPUT => Some(Vec::new()),
            ContentAddress::Text(_) => {
                return Err(Status::invalid_argument(format!(
                    "input {} is a {}-byte text file; that is too large for a derivation",
                    input.path, input.nar_size
                )));
            }
            ContentAddress::Fixed { .. } => None,
        };
        Ok(Self {
            input,
            file,
            hasher: NarHasher::new(),
            validator: NarValidator::new(),
            received: 0,
            text,
        })
    }

    async fn push(&mut self, data: &[u8]) -> Result<(), Status> {
        let path = &self.input.path;
        self.received += data.len() as u64;
        if self.received > self.input.nar_size {
            return Err(Status::invalid_argument(format!(
                "the NAR of {path} is longer than the announced {} bytes",
                self.input.nar_size
            )));
        }
        self.validator.push(data).map_err(|err| {
            Status::invalid_argument(format!("the NAR of {path} is malformed: {err}"))
        })?;
        self.hasher
            .write_all(data)
            .expect("hashing into memory cannot fail");
        if let Some(text) = &mut self.text {
            text.extend_from_slice(data);
        }
        self.file
            .write_all(data)
            .await
            .map_err(internal("writing an upload file"))
    }

    /// Checks the complete NAR and returns the narinfo to import it with.
    async fn finish(mut self) -> Result<NarInfo, Status> {
        let path = self.input.path.clone();
        self.validator.finish().map_err(|err| {
            Status::invalid_argument(format!(
                "the NAR of {path} is incomplete or malformed: {err}"
            ))
        })?;
        let (hash, size) = self.hasher.finish();
        if size != self.input.nar_size || hash != self.input.nar_hash {
            return Err(Status::invalid_argument(format!(
                "the NAR of {path} does not match its announced hash and size ({hash}, {size} bytes)"
            )));
        }
        match (&self.input.ca, &self.text) {
            (ContentAddress::Text(expected), Some(nar)) => {
                let contents = single_file_contents(nar).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "{path} is text-addressed but its NAR is not a single regular file"
                    ))
                })?;
                if Sha256Hash::digest(contents) != *expected {
                    return Err(Status::invalid_argument(format!(
                        "the contents of {path} do not match its content address"
                    )));
                }
            }
            _ if self.input.nar_hash_is_content_hash() => {}
            // Flat or non-SHA-256 fixed paths: the builder's Nix recomputes
            // the store path from the contents when importing.
            _ => {}
        }
        // No fsync: Nix imports the file right away and staging does not
        // outlive a crash; flushing is all that is needed.
        self.file
            .flush()
            .await
            .map_err(internal("writing an upload file"))?;
        Ok(NarInfo {
            store_path: path.clone(),
            url: nar_url(&path),
            compression: Some("none".to_owned()),
            file_hash: None,
            file_size: None,
            nar_hash: hash,
            nar_size: size,
            references: self.input.references.clone(),
            deriver: None,
            signatures: Vec::new(),
            ca: Some(self.input.ca.clone()),
            extra: Vec::new(),
        })
    }
}

fn nar_url(path: &StorePath) -> String {
    format!("nar/{}.nar", path.hash_part())
}

fn nar_file(staging: &Path, path: &StorePath) -> PathBuf {
    staging.join(nar_url(path))
}

fn internal(action: &'static str) -> impl Fn(std::io::Error) -> Status {
    move |err| {
        tracing::error!("{action}: {err}");
        Status::internal(format!("the builder failed {action}; see its log"))
    }
}

/// Receives one `UploadInputs` stream for `session`, staging under
/// `uploads_dir`. Everything staged is removed whatever the outcome.
pub async fn receive(
    session: &Session,
    nix: &Nix,
    uploads_dir: &Path,
    stream: impl Stream<Item = Result<UploadInputsRequest, Status>>,
) -> Result<UploadInputsResponse, Status> {
    tokio::pin!(stream);
    tokio::fs::create_dir_all(uploads_dir)
        .await
        .map_err(internal("creating the uploads directory"))?;
    let staging = tempfile::Builder::new()
        .prefix(&format!("{}-", session.id))
        .tempdir_in(uploads_dir)
        .map_err(internal("creating an upload directory"))?;
    tokio::fs::create_dir(staging.path().join("nar"))
        .await
        .map_err(internal("creating an upload directory"))?;
    tokio::fs::write(
        staging.path().join("nix-cache-info"),
        "StoreDir: /nix/store\n",
    )
    .await
    .map_err(internal("creating an upload directory"))?;

    let missing = session.missing();
    let mut received: Vec<StorePath> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut current: Option<Incoming> = None;
    let mut bytes = 0u64;
    while let Some(message) = stream.next().await.transpose()? {
        if !message.store_path.is_empty() {
            if let Some(done) = current.take() {
                write_narinfo(staging.path(), done.finish().await?).await?;
            }
            let path: StorePath = message
                .store_path
                .parse()
                .map_err(|err| Status::invalid_argument(format!("store_path: {err}")))?;
            if !missing.contains(&path) || !seen.insert(path.clone()) {
                return Err(Status::invalid_argument(format!(
                    "{path} was not reported missing for this session (or was sent twice); only missing inputs are accepted"
                )));
            }
            let input = session
                .inputs
                .get(&path)
                .cloned()
                .expect("missing inputs are announced inputs");
            debug!(session = %session.id, %path, bytes = input.nar_size, "receiving input");
            current = Some(Incoming::start(input, staging.path()).await?);
            received.push(path);
        }
        if message.data.is_empty() {
            continue;
        }
        let Some(incoming) = current.as_mut() else {
            return Err(Status::invalid_argument("data before the first store_path"));
        };
        session.count_upload(message.data.len() as u64)?;
        bytes += message.data.len() as u64;
        incoming.push(&message.data).await?;
    }
    if let Some(done) = current.take() {
        write_narinfo(staging.path(), done.finish().await?).await?;
    }
    if received.is_empty() {
        return Ok(UploadInputsResponse::default());
    }

    // Nix recomputes each store path from the NAR and its `CA:` field, so
    // this needs no trusted-user rights and admits nothing unverifiable.
    nix.add_content_addressed_from_cache(staging.path(), &received)
        .await
        .map_err(|err| {
            Status::invalid_argument(format!(
                "the builder's Nix refused the uploaded inputs: {err}"
            ))
        })?;
    session.mark_present(&received);
    info!(session = %session.id, paths = received.len(), bytes, "inputs uploaded");
    Ok(UploadInputsResponse {
        paths_imported: u32::try_from(received.len()).unwrap_or(u32::MAX),
        bytes_received: bytes,
    })
}

async fn write_narinfo(staging: &Path, narinfo: NarInfo) -> Result<(), Status> {
    let file = staging.join(format!("{}.narinfo", narinfo.store_path.hash_part()));
    tokio::fs::write(file, narinfo.to_string())
        .await
        .map_err(internal("writing an upload narinfo"))
}
