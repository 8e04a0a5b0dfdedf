//! One session's calls on the generated Builder stubs: open it with the
//! derivation's closure, upload what the builder lacks, build while
//! streaming events. [`super::remote_build`] decides what to call when.

use std::{collections::BTreeMap, pin::Pin};

use anyhow::{Context, anyhow};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tokio_util::io::ReaderStream;
use tonic::{Code, Status, codec::CompressionEncoding};

use super::{
    BuilderChannel,
    link::{Direction, LinkPolicy},
    status_error,
};
use crate::{
    nix::store_path::StorePath,
    nixcmd::{Nix, PathInfo},
    proto::{self, build_response::Event, builder_client::BuilderClient},
    store_nar,
    transport::http2,
};

/// NARs are uploaded in parts of at most this many bytes, each to the next
/// upload call in turn; small paths are one part each. A part costs no
/// round trip, so parts stay small: each call buffers one.
const PART: u64 = 1 << 20;

/// Reads the NARs of `paths` and deals them out as parts over `calls`.
/// Stops quietly when a call has ended: its status says why.
async fn send_parts(
    nix: Nix,
    paths: Vec<StorePath>,
    calls: Vec<mpsc::Sender<proto::UploadInputsRequest>>,
    progress: impl Fn(u64),
) -> anyhow::Result<()> {
    let mut sent = 0u64;
    let mut turn = 0;
    for path in paths {
        let mut nar = nar_chunks(&nix, &path)?;
        let (mut offset, mut part_left, mut call) = (0u64, 0u64, 0);
        while let Some(chunk) = nar.next().await {
            let mut chunk =
                chunk.with_context(|| format!("reading {path} from the local store"))?;
            while !chunk.is_empty() {
                let mut message = proto::UploadInputsRequest::default();
                if part_left == 0 {
                    call = turn % calls.len();
                    turn += 1;
                    part_left = PART;
                    message.store_path = path.to_string();
                    message.offset = offset;
                }
                let n = chunk.len().min(part_left as usize);
                message.data = chunk.split_to(n);
                part_left -= n as u64;
                offset += n as u64;
                sent += n as u64;
                if calls[call].send(message).await.is_err() {
                    return Ok(());
                }
                progress(sent);
            }
        }
    }
    Ok(())
}

/// The NAR of a local store path in chunks: read in-process when the path
/// is on this file system (no process per path), else from `nix-store
/// --dump`. The builder checks every NAR against its announced hash.
fn nar_chunks(
    nix: &Nix,
    path: &StorePath,
) -> anyhow::Result<Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>> {
    if let Some(physical) = store_nar::physical(path) {
        return Ok(Box::pin(store_nar::stream_range(
            physical,
            0..u64::MAX,
            http2::CHUNK,
        )));
    }
    let nar = nix.dump(path)?;
    Ok(Box::pin(ReaderStream::with_capacity(nar, http2::CHUNK)))
}

/// A session the builder admitted, seen from the client.
#[derive(Debug)]
pub struct RemoteSession {
    /// Its id.
    pub id: String,
    /// Inputs the builder lacks.
    pub missing: Vec<StorePath>,
    /// The limits that apply.
    pub limits: proto::SessionLimits,
    /// The signing key the builder announces. Never trusted for being
    /// announced: only compared with keys the client trusts already.
    pub announced_key: String,
    /// Whether the builder takes zstd-compressed uploads: it said so in
    /// `OpenSession`'s `grpc-accept-encoding`.
    accepts_zstd: bool,
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

/// Describes paths built elsewhere, with their signatures, for
/// `OpenSession`'s `signed_inputs`.
pub fn signed_inputs(infos: &[PathInfo]) -> Vec<proto::SignedPath> {
    infos
        .iter()
        .map(|info| proto::SignedPath {
            store_path: info.path.to_string(),
            references: info.references.iter().map(ToString::to_string).collect(),
            nar_hash: info.nar_hash.to_string(),
            nar_size: info.nar_size,
            deriver: info
                .deriver
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            signatures: info.signatures.iter().map(ToString::to_string).collect(),
        })
        .collect()
}

impl RemoteSession {
    /// Opens a session for `drv` with its closure `inputs` and the
    /// `signed_inputs` the builder may take instead of building them
    /// (admission: a ticket's use is taken here).
    pub async fn open(
        channel: BuilderChannel,
        drv: &StorePath,
        inputs: Vec<proto::InputPath>,
        signed_inputs: Vec<proto::SignedPath>,
    ) -> anyhow::Result<Self> {
        let mut builder = BuilderClient::new(channel)
            .max_decoding_message_size(http2::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(http2::MAX_MESSAGE_SIZE);
        let response = builder
            .open_session(proto::OpenSessionRequest {
                drv_path: drv.to_string(),
                inputs,
                signed_inputs,
            })
            .await
            .map_err(status_error)?;
        let accepts_zstd = response
            .metadata()
            .get(proto::ACCEPT_ENCODING_METADATA)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.split(',').any(|encoding| encoding.trim() == "zstd"));
        let response = response.into_inner();
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
            accepts_zstd,
            builder,
        })
    }

    /// Uploads the missing inputs, streaming each NAR from the local store
    /// in parts over `channels` in turn (one `UploadInputs` call each),
    /// compressed if `link` says so and the builder takes it. `progress` is
    /// called with the bytes sent so far.
    pub async fn upload(
        &mut self,
        nix: &Nix,
        channels: Vec<BuilderChannel>,
        link: &LinkPolicy,
        progress: impl Fn(u64) + Send + 'static,
    ) -> anyhow::Result<()> {
        let compress = self.accepts_zstd && link.compress(Direction::Up).await;
        let _measure = link.measure(Direction::Up).await;
        let mut senders = Vec::new();
        let mut calls = Vec::new();
        for channel in channels {
            let (tx, rx) = mpsc::channel(PART as usize / http2::CHUNK);
            // Every call names the session first, so one that gets no part
            // is still a well-formed (empty) upload.
            tx.try_send(proto::UploadInputsRequest {
                session_id: self.id.clone(),
                ..Default::default()
            })
            .expect("a new channel has room");
            let mut builder =
                BuilderClient::new(channel).max_encoding_message_size(http2::MAX_MESSAGE_SIZE);
            if compress {
                builder = builder.send_compressed(CompressionEncoding::Zstd);
            }
            calls.push(async move { builder.upload_inputs(ReceiverStream::new(rx)).await });
            senders.push(tx);
        }
        let producer = tokio::spawn(send_parts(
            nix.clone(),
            self.missing.clone(),
            senders,
            progress,
        ));
        let results = futures::future::join_all(calls).await;
        let produced = producer
            .await
            .map_err(|err| anyhow!("upload task failed: {err}"))?;
        // A local read failure ends the calls early; report that, not the
        // builder's complaint about a short NAR.
        produced?;
        let mut failures: Vec<Status> = results.into_iter().filter_map(Result::err).collect();
        // Report the cause: ABORTED only says that another call failed, and
        // a call cut off with it may see just the broken stream.
        failures.sort_by_key(|status| match status.code() {
            Code::Aborted => 2,
            Code::Unknown | Code::Cancelled | Code::Unavailable => 1,
            _ => 0,
        });
        match failures.into_iter().next() {
            Some(status) => Err(status_error(status)),
            None => Ok(()),
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
