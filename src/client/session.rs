//! One remote build, driven over the generated Builder stubs: open a
//! session with the derivation's closure, upload what the builder lacks,
//! build while streaming events.

use std::{collections::BTreeMap, pin::Pin};

use anyhow::{Context, anyhow};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tokio_util::io::ReaderStream;

use super::{BuilderChannel, status_error};
use crate::{
    nix::store_path::StorePath,
    nixcmd::{Nix, PathInfo},
    proto::{self, build_response::Event, builder_client::BuilderClient},
    store_nar,
    transport::http2,
};

/// Upload chunk size: large enough to amortise per-message costs, small
/// enough to keep memory flat.
const CHUNK: usize = 256 << 10;

/// The NAR of a local store path in chunks: read in-process when the path
/// is on this file system (no process per path), else from `nix-store
/// --dump`. The builder checks every NAR against its announced hash.
fn nar_chunks(
    nix: &Nix,
    path: &StorePath,
) -> anyhow::Result<Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>> {
    if let Some(physical) = store_nar::physical(path) {
        return Ok(Box::pin(store_nar::stream(physical)));
    }
    let nar = nix.dump(path)?;
    Ok(Box::pin(ReaderStream::with_capacity(nar, CHUNK)))
}

/// An admitted session.
#[derive(Debug)]
pub struct Session {
    /// Its id.
    pub id: String,
    /// Inputs the builder lacks.
    pub missing: Vec<StorePath>,
    /// The limits that apply.
    pub limits: proto::SessionLimits,
    /// The signing key the builder announces. Never trusted for being
    /// announced: only compared with keys the client trusts already.
    pub announced_key: String,
    builder: BuilderClient<BuilderChannel>,
}

/// Describes the derivation closure for `OpenSession`.
pub fn inputs(infos: &[PathInfo]) -> Vec<proto::InputPath> {
    infos
        .iter()
        .map(|info| proto::InputPath {
            store_path: info.path.to_string(),
            references: info.references.iter().map(ToString::to_string).collect(),
            content_address: info
                .ca
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            nar_hash: info.nar_hash.to_string(),
            nar_size: info.nar_size,
        })
        .collect()
}

impl Session {
    /// Opens a session for `drv` with its closure `inputs` (admission: a
    /// ticket's use is taken here).
    pub async fn open(
        channel: BuilderChannel,
        drv: &StorePath,
        inputs: Vec<proto::InputPath>,
    ) -> anyhow::Result<Self> {
        let mut builder = BuilderClient::new(channel)
            .max_decoding_message_size(http2::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(http2::MAX_MESSAGE_SIZE);
        let response = builder
            .open_session(proto::OpenSessionRequest {
                drv_path: drv.to_string(),
                inputs,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let missing = response
            .missing_inputs
            .iter()
            .map(|path| path.parse())
            .collect::<Result<Vec<StorePath>, _>>()
            .context("the builder named an invalid missing input")?;
        Ok(Self {
            id: response.session_id,
            missing,
            limits: response.limits.unwrap_or_default(),
            announced_key: response.signing_public_key,
            builder,
        })
    }

    /// Uploads the missing inputs, streaming each NAR from the local store.
    /// `progress` is called with the bytes sent so far.
    pub async fn upload(
        &mut self,
        nix: &Nix,
        progress: impl Fn(u64) + Send + 'static,
    ) -> anyhow::Result<proto::UploadInputsResponse> {
        let (tx, rx) = mpsc::channel::<proto::UploadInputsRequest>(8);
        let paths = self.missing.clone();
        let session_id = self.id.clone();
        let nix = nix.clone();
        let producer = tokio::spawn(async move {
            let mut sent = 0u64;
            let mut first = true;
            for path in paths {
                // The first chunk of each NAR names its path, so a small
                // path is one message.
                let mut header = Some(proto::UploadInputsRequest {
                    session_id: if first {
                        session_id.clone()
                    } else {
                        String::new()
                    },
                    store_path: path.to_string(),
                    data: Default::default(),
                });
                first = false;
                let mut nar = nar_chunks(&nix, &path)?;
                while let Some(chunk) = nar.next().await {
                    let chunk =
                        chunk.with_context(|| format!("reading {path} from the local store"))?;
                    sent += chunk.len() as u64;
                    let mut message = header.take().unwrap_or_default();
                    message.data = chunk;
                    if tx.send(message).await.is_err() {
                        // The builder ended the call; its status says why.
                        return Ok(());
                    }
                    progress(sent);
                }
            }
            anyhow::Ok(())
        });
        let result = self.builder.upload_inputs(ReceiverStream::new(rx)).await;
        let produced = producer
            .await
            .map_err(|err| anyhow!("upload task failed: {err}"))?;
        match result {
            Ok(response) => {
                produced?;
                Ok(response.into_inner())
            }
            // A local read failure ends the stream early; report that, not
            // the builder's complaint about a short NAR.
            Err(status) => Err(produced.err().unwrap_or_else(|| status_error(status))),
        }
    }

    /// Starts the build; its events follow through [`BuildEvents`].
    pub async fn build(&mut self, rebuild: bool) -> anyhow::Result<BuildEvents> {
        let events = self
            .builder
            .build(proto::BuildRequest {
                session_id: self.id.clone(),
                rebuild,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        Ok(BuildEvents(events))
    }
}

/// The events of a running build.
#[derive(Debug)]
pub struct BuildEvents(tonic::Streaming<proto::BuildResponse>);

impl BuildEvents {
    /// The next event; the last one is always `Event::Finished`.
    pub async fn next(&mut self) -> anyhow::Result<Event> {
        loop {
            match self.0.message().await.map_err(status_error)? {
                Some(proto::BuildResponse { event: Some(event) }) => return Ok(event),
                Some(_) => {}
                None => {
                    return Err(anyhow!(
                        "the builder ended the build stream without a result"
                    ));
                }
            }
        }
    }
}

/// The outputs a finished build reports, by name.
pub fn outputs(finished: &proto::BuildFinished) -> anyhow::Result<BTreeMap<String, StorePath>> {
    finished
        .outputs
        .iter()
        .map(|output| {
            let path = output.store_path.parse().with_context(|| {
                format!(
                    "the builder reported an invalid output path {:?}",
                    output.store_path
                )
            })?;
            Ok((output.name.clone(), path))
        })
        .collect()
}
