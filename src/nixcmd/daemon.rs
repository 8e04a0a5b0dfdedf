//! The store through `nix-daemon --stdio`, in Nix's worker protocol:
//! validity and path-info queries, and NARs handed over as an `ssh-ng`
//! remote store's Nix receives them (one `AddToStoreNar` operation per
//! path, sent without waiting for the answers, each NAR streaming straight
//! from its source into Nix, with no narinfo files and no second copy on
//! disk).
//!
//! A connection serves one piece of work and is then closed. Nix remembers
//! what it learnt about a path for the life of its process (a missing path
//! for an hour), so a connection kept across pieces of work would go on
//! calling a path missing after another process added it. What a handle
//! may keep instead is a [`Spare`]: a connection that has finished the
//! handshake and asked nothing yet, so that the next piece of work does not
//! wait for Nix to start.
//!
//! Not `AddMultipleToStore`: Nix 2.8 does not read the NAR of a path that
//! is already valid there, and the rest of the stream is then misread. A
//! path another session imported a moment ago is valid; `AddToStoreNar`
//! frames each NAR on its own, and Nix skips what it does not read.
//!
//! `nix-daemon --stdio` serves a local store itself and forwards to the
//! system daemon otherwise, so the store's own rules apply either way. Each
//! addition asks for signatures to be checked, and the daemon runs with
//! `require-sigs` on; a daemon also forces that for a client it does not
//! trust.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use tokio::io::{AsyncWrite, AsyncWriteExt as _, BufReader, BufWriter};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;

use super::{
    Nix, NixCmdError, PathInfo, parse,
    process::{CommandLine, Program, Tail, collect_tail},
};
use crate::{
    nix::{narinfo::NarInfo, store_path::StorePath},
    worker_protocol::{self as wire, Reader, WireError, Writer, op},
};

/// Frames of NAR bytes are written as they come from the source, up to
/// this size each.
const MAX_FRAME: usize = 1 << 20;

/// What is gathered before writing to Nix: small NARs, frame headers,
/// requests and path infos. Larger chunks bypass the buffer, rather than
/// be copied into it.
const BUFFER: usize = 64 << 10;

/// How long Nix has to exit once its input is closed before it is killed.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A `nix-daemon --stdio` that has finished the handshake.
pub(super) struct Connection {
    line: CommandLine,
    child: Child,
    reader: Reader<BufReader<ChildStdout>>,
    out: BufWriter<ChildStdin>,
    stderr: JoinHandle<std::io::Result<Tail>>,
    /// Whether the store trusts this user, where it said so.
    trusted: Option<bool>,
    /// One of the handle's turns, while the connection serves a piece of
    /// work.
    turn: Option<OwnedSemaphorePermit>,
}

/// How talking to the daemon went wrong.
pub(super) enum Failure {
    /// Writing to it failed: it went away.
    Io(std::io::Error),
    /// What it said was not the protocol, or it went away.
    Wire(WireError),
    /// What it said was the protocol but not a value this module accepts.
    Malformed(String),
    /// It refused the operation, saying why.
    Refused(String),
    /// A NAR's source failed.
    Source(StorePath, String),
    /// A path asked about is not valid.
    NotValid(StorePath),
}

impl Connection {
    /// Starts `nix-daemon --stdio` through `nix` and shakes hands.
    pub(super) async fn open(nix: Nix) -> Result<Self, NixCmdError> {
        let args = ["--option", "require-sigs", "true", "--stdio"];
        let line = nix.command_line(Program::NixDaemon, args.map(Into::into).to_vec());
        let mut command = nix.tokio_command(&line);
        command.stdin(Stdio::piped());
        let mut child = command.spawn().map_err(|source| NixCmdError::Spawn {
            command: line.to_string(),
            source,
        })?;
        let stdin = child.stdin.take().expect("stdin was piped");
        let stdout = child.stdout.take().expect("stdout was piped");
        let stderr = tokio::spawn(collect_tail(child.stderr.take().expect("stderr was piped")));
        let mut connection = Self {
            line,
            child,
            reader: Reader::new(BufReader::new(stdout)),
            out: BufWriter::with_capacity(BUFFER, stdin),
            stderr,
            trusted: None,
            turn: None,
        };
        match wire::connect(&mut connection.reader, &mut connection.out).await {
            Ok(negotiated) => {
                connection.trusted = negotiated.trusted;
                Ok(connection)
            }
            Err(err) => Err(connection.fail(Failure::Wire(err)).await),
        }
    }

    /// Whether the store trusts this user, as it said in the handshake (Nix
    /// 2.15 and later).
    pub(super) fn trusted(&self) -> Option<bool> {
        self.trusted
    }

    /// Which of `paths` are valid (`QueryValidPaths`, substituting
    /// nothing).
    pub(super) async fn valid_paths(
        &mut self,
        paths: &[StorePath],
    ) -> Result<BTreeSet<StorePath>, Failure> {
        let mut w = Writer::default();
        w.u64(op::QUERY_VALID_PATHS)
            .strings(paths.iter().map(ToString::to_string))
            .bool(false);
        w.send(&mut self.out).await.map_err(Failure::Io)?;
        answer(&mut self.reader).await?;
        let valid = self.reader.paths().await.map_err(Failure::Wire)?;
        Ok(valid.into_iter().collect())
    }

    /// What the store knows about each of `paths`, `None` for a path that
    /// is not valid: one `QueryPathInfo` each, sent without waiting for the
    /// answers.
    pub(super) async fn path_infos(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<Option<PathInfo>>, Failure> {
        let Self { reader, out, .. } = self;
        let send = async {
            for path in paths {
                let mut w = Writer::default();
                w.u64(op::QUERY_PATH_INFO).string(&path.to_string());
                out.write_all(w.pending()).await.map_err(Failure::Io)?;
            }
            out.flush().await.map_err(Failure::Io)
        };
        // Reading alongside keeps both pipes moving: Nix answers while the
        // questions are still being written.
        let receive = async {
            let mut infos = Vec::with_capacity(paths.len());
            for path in paths {
                answer(reader).await?;
                if !reader.bool().await.map_err(Failure::Wire)? {
                    infos.push(None);
                    continue;
                }
                let info = wire::PathInfo::read(reader).await.map_err(Failure::Wire)?;
                let info = parse::wire_path_info(path.clone(), info).map_err(Failure::Malformed)?;
                infos.push(Some(info));
            }
            Ok(infos)
        };
        let ((), infos) = futures::try_join!(send, receive)?;
        Ok(infos)
    }

    /// Adds `infos`' paths, in this order, each NAR read from what `open`
    /// gives for its path once the ones before it are sent; returns once
    /// Nix has registered them all.
    pub(super) async fn add<S, E>(
        &mut self,
        infos: &[NarInfo],
        mut open: impl FnMut(&StorePath) -> Result<S, E>,
    ) -> Result<(), Failure>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: Display,
    {
        let Self { reader, out, .. } = self;
        // Nix logs while it reads; reading its answers alongside keeps both
        // pipes moving, and the first refusal ends the import.
        let answers = async {
            for _ in infos {
                answer(reader).await?;
            }
            Ok(())
        };
        futures::try_join!(send_paths(out, infos, &mut open), answers).map(drop)
    }

    /// Ends the connection after its work, successful or not, and returns
    /// what the work gave.
    pub(super) async fn finish<T>(self, worked: Result<T, Failure>) -> Result<T, NixCmdError> {
        match worked {
            Ok(value) => {
                self.close();
                Ok(value)
            }
            Err(failure) => Err(self.fail(failure).await),
        }
    }

    /// Closes Nix's input, which ends it, and leaves it to exit on its own.
    pub(super) fn close(self) {
        let Self { mut child, out, .. } = self;
        drop(out);
        tokio::spawn(async move {
            // Dropping the child kills it if it is still there.
            let _ = tokio::time::timeout(CLOSE_GRACE, child.wait()).await;
        });
    }

    /// The error for `failure`, with what Nix printed and how it ended.
    pub(super) async fn fail(self, failure: Failure) -> NixCmdError {
        let Self {
            line,
            mut child,
            reader,
            out,
            stderr,
            ..
        } = self;
        drop((out, reader));
        let tail = match tokio::time::timeout(CLOSE_GRACE, stderr).await {
            Ok(Ok(Ok(tail))) => tail.text(),
            _ => String::new(),
        };
        let status = tokio::time::timeout(CLOSE_GRACE, child.wait())
            .await
            .ok()
            .and_then(Result::ok);
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
        match failure {
            Failure::Refused(message) => NixCmdError::Refused(message),
            Failure::Source(path, reason) => NixCmdError::NarSource { path, reason },
            Failure::NotValid(path) => NixCmdError::NotValid(path),
            Failure::Malformed(reason) => NixCmdError::Parse {
                command: command.clone(),
                reason,
                stderr: tail.clone(),
            },
            Failure::Io(err) => stopped(err.to_string()),
            Failure::Wire(err) => stopped(err.to_string()),
        }
    }
}

/// Reads the log frames that end the answer to an operation: a refusal is
/// [`Failure::Refused`].
async fn answer(reader: &mut Reader<BufReader<ChildStdout>>) -> Result<(), Failure> {
    reader
        .reply()
        .await
        .map_err(Failure::Wire)?
        .map_err(Failure::Refused)
}

/// A connection opened before it is needed, kept by a handle that asks for
/// one; each piece of work takes it and opens the next in its place.
#[derive(Default)]
pub(super) struct Spare(std::sync::Mutex<Option<JoinHandle<Result<Connection, NixCmdError>>>>);

impl Spare {
    /// Starts opening the spare if there is none.
    fn prepare(&self, nix: &Nix) {
        let mut slot = self.0.lock().expect("the lock is never poisoned");
        if slot.is_none() {
            *slot = Some(tokio::spawn(Connection::open(nix.clone())));
        }
    }

    /// The spare, once open, or a new connection if there is none or it
    /// failed to open; the next one starts opening after.
    async fn take(&self, nix: &Nix) -> Result<Connection, NixCmdError> {
        let ready = self.0.lock().expect("the lock is never poisoned").take();
        let opened = match ready {
            Some(ready) => ready.await.ok().and_then(Result::ok),
            None => None,
        };
        let connection = match opened {
            Some(connection) => Ok(connection),
            None => Connection::open(nix.clone()).await,
        };
        // Only now: Nix sets a new store up when it first opens it, and two
        // processes doing that at once trip over each other.
        self.prepare(nix);
        connection
    }
}

impl std::fmt::Debug for Spare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Spare")
    }
}

impl Nix {
    /// A connection for one piece of work, once one of the handle's turns
    /// is free: the handle's spare if it keeps one, else a new one.
    pub(super) async fn connection(&self) -> Result<Connection, NixCmdError> {
        let turn = self
            .config
            .turns
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let mut connection = match &self.config.spare {
            Some(spare) => spare.take(self).await?,
            None => Connection::open(self.clone()).await?,
        };
        connection.turn = Some(turn);
        Ok(connection)
    }
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
        w.u64(op::ADD_TO_STORE_NAR);
        nar_info(&mut w, info);
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
fn nar_info(w: &mut Writer, info: &NarInfo) {
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
