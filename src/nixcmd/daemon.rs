//! Handing NARs to the store through `nix-daemon --stdio`, as an `ssh-ng`
//! remote store's Nix receives them: one `AddToStoreNar` operation per
//! path on one connection, sent without waiting for the answers, each NAR
//! streaming straight from its source into Nix, with no narinfo files, no
//! binary cache and no second copy on disk.
//!
//! Not `AddMultipleToStore`: Nix 2.8 does not read the NAR of a path that
//! is already valid there, and the rest of the stream is then misread. A
//! path another session imported a moment ago is valid; `AddToStoreNar`
//! frames each NAR on its own, and Nix skips what it does not read.
//!
//! `nix-daemon --stdio` serves a local store itself and forwards to the
//! system daemon otherwise, so the store's own rules apply either way. Each
//! operation asks for signatures to be checked; a daemon also forces that
//! for a client it does not trust.

use std::fmt::Display;

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use tokio::io::{AsyncWrite, AsyncWriteExt as _, BufReader, BufWriter};

use super::{
    Nix, NixCmdError,
    process::{Program, collect_tail},
};
use crate::{
    nix::{narinfo::NarInfo, store_path::StorePath},
    worker_protocol::{self as wire, Reader, WireError, Writer},
};

/// Frames of NAR bytes are written as they come from the source, up to
/// this size each.
const MAX_FRAME: usize = 1 << 20;

/// What is gathered before writing to Nix: small NARs, frame headers and
/// path infos. Larger chunks bypass the buffer, rather than be copied
/// into it.
const BUFFER: usize = 64 << 10;

/// Adds `infos`' paths, in this order, to the store behind `nix`, each
/// NAR read from what `open` gives for its path once the ones before it
/// are sent. Signatures are checked (`require-sigs` on, and each
/// operation's own flag), whatever the store's configuration says.
pub(super) async fn add_multiple<S, E>(
    nix: &Nix,
    infos: &[NarInfo],
    mut open: impl FnMut(&StorePath) -> Result<S, E>,
) -> Result<(), NixCmdError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Display,
{
    // A turn like any Nix command run to the end, held for the whole
    // import, as `nix copy` held one before: peers' uploads must not start
    // more Nix processes than the handle allows.
    // The semaphore is never closed.
    let _turn = nix.config.turns.acquire().await;
    let args = ["--option", "require-sigs", "true", "--stdio"];
    let line = nix.command_line(Program::NixDaemon, args.map(Into::into).to_vec());
    let mut command = nix.tokio_command(&line);
    command.stdin(std::process::Stdio::piped());
    let mut child = command.spawn().map_err(|source| NixCmdError::Spawn {
        command: line.to_string(),
        source,
    })?;
    let stdin = child.stdin.take().expect("stdin was piped");
    let stdout = child.stdout.take().expect("stdout was piped");
    let stderr = tokio::spawn(collect_tail(child.stderr.take().expect("stderr was piped")));
    let mut reader = Reader::new(BufReader::new(stdout));
    let mut out = BufWriter::with_capacity(BUFFER, stdin);

    let talked = async {
        wire::connect(&mut reader, &mut out)
            .await
            .map_err(Failure::Wire)?;
        // Nix logs while it reads; reading its answers alongside keeps both
        // pipes moving, and the first refusal ends the import.
        let answers = async {
            for _ in infos {
                reader
                    .reply()
                    .await
                    .map_err(Failure::Wire)?
                    .map_err(Failure::Refused)?;
            }
            Ok(())
        };
        futures::try_join!(send_paths(&mut out, infos, &mut open), answers).map(drop)
    }
    .await;

    drop(out);
    let tail = match stderr.await {
        Ok(Ok(tail)) => tail.text(),
        _ => String::new(),
    };
    let status = child.wait().await.ok();
    let failure = match talked {
        Ok(()) => return Ok(()),
        Err(failure) => failure,
    };
    let command = line.to_string();
    let stopped = |err: String| NixCmdError::Failed {
        command: command.clone(),
        status: status.map_or_else(
            || "stopped answering".to_owned(),
            super::process::describe_status,
        ),
        // What the daemon printed says more than a broken pipe.
        stderr: if tail.is_empty() { err } else { tail.clone() },
    };
    Err(match failure {
        Failure::Refused(message) => NixCmdError::Refused(message),
        Failure::Source(path, reason) => NixCmdError::NarSource { path, reason },
        Failure::Io(err) => stopped(err.to_string()),
        Failure::Wire(err) => stopped(err.to_string()),
    })
}

/// How talking to the daemon went wrong.
enum Failure {
    /// Writing to it failed: it went away.
    Io(std::io::Error),
    /// What it said was not the protocol, or it went away.
    Wire(WireError),
    /// It refused the operation, saying why.
    Refused(String),
    /// A NAR's source failed.
    Source(StorePath, String),
}

/// Writes an `AddToStoreNar` operation for each path: its info, no repair,
/// signatures checked, and its NAR as a framed stream.
async fn send_paths<S, E>(
    out: &mut (impl AsyncWrite + Unpin),
    infos: &[NarInfo],
    open: &mut impl FnMut(&StorePath) -> Result<S, E>,
) -> Result<(), Failure>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Display,
{
    for info in infos {
        let mut w = Writer::default();
        w.u64(wire::op::ADD_TO_STORE_NAR);
        path_info(&mut w, info);
        w.bool(false).bool(false);
        out.write_all(w.pending()).await.map_err(Failure::Io)?;
        let source = |err: E| Failure::Source(info.store_path.clone(), err.to_string());
        let mut nar = open(&info.store_path).map_err(source)?;
        let mut sent = 0u64;
        while let Some(chunk) = nar.next().await {
            let chunk = chunk.map_err(source)?;
            sent += chunk.len() as u64;
            for piece in chunk.chunks(MAX_FRAME) {
                frame(out, piece).await?;
            }
        }
        if sent != info.nar_size {
            return Err(Failure::Source(
                info.store_path.clone(),
                format!("the NAR ended after {sent} of its {} bytes", info.nar_size),
            ));
        }
        frame(out, &[]).await?;
        // The next path's bytes may be long in coming; this one's should
        // not wait in the buffer meanwhile.
        out.flush().await.map_err(Failure::Io)?;
    }
    Ok(())
}

/// A path's info as `AddToStoreNar` reads it: path, deriver, NAR hash in
/// hex, references, registration time, NAR size, ultimate, signatures,
/// content address.
fn path_info(w: &mut Writer, info: &NarInfo) {
    let deriver = info.deriver.as_ref().map(ToString::to_string);
    w.string(&info.store_path.to_string())
        .string(deriver.as_deref().unwrap_or(""))
        .string(&info.nar_hash.to_hex())
        .strings(info.references.iter().map(ToString::to_string))
        .u64(0)
        .u64(info.nar_size)
        .bool(false)
        .strings(info.signatures.iter().map(ToString::to_string));
    let ca = info.ca.as_ref().map(ToString::to_string);
    w.string(ca.as_deref().unwrap_or(""));
}

/// One frame of a framed stream: its length and its bytes, unpadded.
async fn frame(out: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> Result<(), Failure> {
    out.write_all(&(bytes.len() as u64).to_le_bytes())
        .await
        .map_err(Failure::Io)?;
    out.write_all(bytes).await.map_err(Failure::Io)
}
