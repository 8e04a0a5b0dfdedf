//! A NAR file that can be read by byte range, also while it is still being
//! written: an uploaded input still arriving, or a cache entry being filled
//! from a store that is not on this file system.
//!
//! Every reader follows the writer through the file rather than taking bytes
//! from it directly: the writer then runs at disk speed whoever is reading,
//! one client can fetch several ranges of a large file over parallel
//! streams, and a second client asking for the same entry joins the fill
//! instead of starting another. The one exception is an upload's reader
//! that keeps up with the writer (see `Handoff`).

use std::{
    collections::VecDeque,
    fs::File,
    os::unix::fs::FileExt,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, watch};

use super::error::ServerError;
use crate::transport::http2::CHUNK;

/// Bytes read from the file at a time: one [`CHUNK`], so a reader whose
/// peer does not read holds no more than [`READ_AHEAD`] plus one.
const READ_BLOCK: u64 = CHUNK as u64;

/// Chunks a NAR reader queues ahead of its peer: one is ready when the
/// peer takes the last, and a stream whose peer never reads holds two (the
/// queued one and the one waiting to be queued), not megabytes.
pub const READ_AHEAD: usize = 1;

/// Why readers stop when the writer went away without saying why.
const ABANDONED: &str = "the NAR file was abandoned before it was complete";

/// Bytes held in memory for readers at most; beyond this the writer writes
/// the oldest to the file after all.
const HANDOFF_LIMIT: u64 = 8 << 20;

/// Runs `read` on the blocking pool: file I/O may block, and a runtime
/// worker must not.
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(read)
        .await
        .unwrap_or_else(|err| Err(std::io::Error::other(err)))
}

/// How far the writer has got.
#[derive(Debug, Clone, Default)]
struct Written {
    bytes: u64,
    /// Set once the file is complete (`Ok`) or abandoned (`Err`, why).
    done: Option<Result<(), Arc<str>>>,
}

/// A file of known final size, complete or being written.
#[derive(Debug, Clone)]
pub struct NarFile {
    file: Arc<File>,
    /// Where the NAR begins in `file`, which may hold others.
    base: u64,
    size: u64,
    written: watch::Receiver<Written>,
    handoff: Option<Arc<HandoffCell>>,
}

/// The latest bytes of a growing file, held in memory for the readers
/// reading it now, in order from `start`: a reader that keeps up takes them
/// from here, and the writer need not write them to the file at all. For an
/// upload, writing each byte to disk and reading it back is most of what
/// the builder spends per byte; its Nix reads each NAR once, at the pace it
/// arrives.
///
/// Held bytes are not in the file (unless written out for room, in which
/// case they are dropped from here). Every other byte is in the file, except
/// those the only reader there ever was has taken from here: those are
/// dropped unwritten, and no reader may start after that.
#[derive(Debug, Default)]
struct Handoff {
    start: u64,
    chunks: VecDeque<Bytes>,
    held: u64,
    /// Readers reading now.
    active: usize,
    /// Readers that ever started.
    started: usize,
    /// Whether bytes were dropped unwritten.
    lossy: bool,
}

impl Handoff {
    fn end(&self) -> u64 {
        self.start + self.held
    }

    /// The held chunks with their offsets.
    fn held(&self) -> impl Iterator<Item = (u64, &Bytes)> {
        self.chunks.iter().scan(self.start, |at, chunk| {
            let offset = *at;
            *at += chunk.len() as u64;
            Some((offset, chunk))
        })
    }

    /// The held bytes from `pos` up to `upto`, or, if `pos` is not held,
    /// how far from `pos` the file has the bytes. A sole reader's bytes are
    /// dropped as it takes them.
    fn take(&mut self, pos: u64, upto: u64) -> Found {
        if self.held == 0 || pos >= self.end() {
            return Found::InFile { upto };
        }
        if pos < self.start {
            return Found::InFile {
                upto: upto.min(self.start),
            };
        }
        let taken: Vec<Bytes> = self
            .held()
            .take_while(|(at, _)| *at < upto)
            .filter(|(at, chunk)| at + chunk.len() as u64 > pos)
            .map(|(at, chunk)| {
                let from = (pos.max(at) - at) as usize;
                let to = (upto.min(at + chunk.len() as u64) - at) as usize;
                chunk.slice(from..to)
            })
            .collect();
        if self.started == 1 {
            let taken_to = pos + taken.iter().map(|c| c.len() as u64).sum::<u64>();
            self.lossy |= self.forget_before(taken_to) > 0;
        }
        Found::Held(taken)
    }

    /// Whether the sole reader, still reading, has more than half the
    /// memory limit to take. With several readers taking frees nothing.
    fn crowded(&self) -> bool {
        self.active > 0 && self.started == 1 && self.held > HANDOFF_LIMIT / 2
    }

    /// Drops the held chunks that end at or before `offset`; returns how
    /// many bytes that was.
    fn forget_before(&mut self, offset: u64) -> u64 {
        let mut dropped = 0;
        while let Some(front) = self.chunks.front() {
            let len = front.len() as u64;
            if self.start + len > offset {
                break;
            }
            self.chunks.pop_front();
            self.start += len;
            self.held -= len;
            dropped += len;
        }
        dropped
    }
}

/// Where a reader finds the bytes at its position.
enum Found {
    /// Held in memory: these.
    Held(Vec<Bytes>),
    /// In the file, up to this offset (where held bytes begin).
    InFile { upto: u64 },
}

/// A [`Handoff`] shared by a writer and its readers.
#[derive(Debug, Default)]
struct HandoffCell {
    state: Mutex<Handoff>,
    /// Told when a reader takes held bytes or stops reading.
    progress: Notify,
}

fn lock(cell: &HandoffCell) -> MutexGuard<'_, Handoff> {
    cell.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts a reader as reading until dropped.
struct Reading(Option<Arc<HandoffCell>>);

impl Drop for Reading {
    fn drop(&mut self) {
        if let Some(handoff) = &self.0 {
            lock(handoff).active -= 1;
            handoff.progress.notify_waiters();
        }
    }
}

/// The writing end of a [`NarFile`]: reports progress to its readers.
#[derive(Debug)]
pub struct Writer {
    written: watch::Sender<Written>,
    handoff: Option<Arc<HandoffCell>>,
}

impl NarFile {
    /// A complete file of `size` bytes.
    pub fn complete(file: File, size: u64) -> Self {
        let (_, written) = watch::channel(Written {
            bytes: size,
            done: Some(Ok(())),
        });
        Self {
            file: Arc::new(file),
            base: 0,
            size,
            written,
            handoff: None,
        }
    }

    /// A file that will hold `size` bytes once written through the
    /// returned [`Writer`]. `file` must be opened for reading.
    pub fn growing(file: File, size: u64) -> (Self, Writer) {
        Self::growing_from(Arc::new(file), 0, size, None)
    }

    /// Like [`NarFile::growing`], for `size` bytes at `base` in `file`,
    /// which holds other NARs too: an upload of thousands of inputs stages
    /// them in one file, not thousands. Its writer may hand bytes to readers
    /// in memory ([`Writer::hands_off`]), so that the file is whole only if
    /// nobody read it while it was being written.
    pub fn growing_in(file: Arc<File>, base: u64, size: u64) -> (Self, Writer) {
        Self::growing_from(file, base, size, Some(Arc::default()))
    }

    fn growing_from(
        file: Arc<File>,
        base: u64,
        size: u64,
        handoff: Option<Arc<HandoffCell>>,
    ) -> (Self, Writer) {
        let (tx, written) = watch::channel(Written::default());
        let nar = Self {
            file,
            base,
            size,
            written,
            handoff: handoff.clone(),
        };
        (
            nar,
            Writer {
                written: tx,
                handoff,
            },
        )
    }

    /// The size of the complete file.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Streams `length` bytes from `offset` (0: to the end), waiting for the
    /// writer as needed. Ends with an error if the writer gives up.
    pub fn read_range(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<mpsc::Receiver<Result<Bytes, ServerError>>, ServerError> {
        let end = range_end(offset, length, self.size)?;
        if let Some(handoff) = &self.handoff {
            let mut handoff = lock(handoff);
            if handoff.lossy {
                return Err(ServerError::FailedPrecondition(
                    "this NAR was handed to its reader from memory and is not kept for another"
                        .to_owned(),
                ));
            }
            handoff.started += 1;
            handoff.active += 1;
        }
        let reading = Reading(self.handoff.clone());
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let (file, base) = (self.file.clone(), self.base);
        let mut written = self.written.clone();
        // Waiting for the writer is async: a reader may wait as long as an
        // upload lasts and must not hold one of the runtime's blocking
        // threads meanwhile. Only each `pread` (mostly from the page cache)
        // goes to the blocking pool.
        tokio::spawn(async move {
            let handoff = reading.0.clone();
            let _reading = reading;
            let mut pos = offset;
            while pos < end {
                let state = tokio::select! {
                    _ = tx.closed() => return,
                    state = written.wait_for(|w| w.bytes > pos || w.done.is_some()) => {
                        state.map(|state| state.clone())
                    }
                };
                let available = match state {
                    Ok(Written { bytes, .. }) if bytes > pos => Ok(bytes),
                    Ok(Written {
                        done: Some(Err(why)),
                        ..
                    }) => Err(ServerError::Internal(why.to_string())),
                    _ => Err(ServerError::Internal(ABANDONED.to_owned())),
                };
                let block = match available {
                    Ok(available) => {
                        let upto = available.min(end).min(pos + READ_BLOCK);
                        let found = match &handoff {
                            Some(handoff) => lock(handoff).take(pos, upto),
                            None => Found::InFile { upto },
                        };
                        match found {
                            Found::Held(held) => {
                                if let Some(handoff) = &handoff {
                                    handoff.progress.notify_waiters();
                                }
                                Ok(held)
                            }
                            Found::InFile { upto } => {
                                let (file, at, n) = (file.clone(), pos, (upto - pos) as usize);
                                blocking(move || {
                                    let mut block = vec![0; n];
                                    file.read_exact_at(&mut block, base + at).map(|()| block)
                                })
                                .await
                                .map(|block| vec![Bytes::from(block)])
                                .map_err(|err| {
                                    ServerError::Internal(format!("reading a NAR file: {err}"))
                                })
                            }
                        }
                    }
                    Err(err) => Err(err),
                };
                match block {
                    Ok(block) => {
                        for mut piece in block {
                            pos += piece.len() as u64;
                            while !piece.is_empty() {
                                let chunk = piece.split_to(piece.len().min(CHUNK));
                                if tx.send(Ok(chunk)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    Err(err) => {
                        let _ = tx.send(Err(err)).await;
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// Where a read of `length` bytes from `offset` (0: to the end) of a file of
/// `size` bytes ends; an error if `offset` is past the end.
pub fn range_end(offset: u64, length: u64, size: u64) -> Result<u64, ServerError> {
    if offset > size || (offset == size && size > 0) {
        return Err(ServerError::OutOfRange(format!(
            "offset {offset} is past the end of the file ({size} bytes)"
        )));
    }
    Ok(match length {
        0 => size,
        length => offset.saturating_add(length).min(size),
    })
}

impl Writer {
    /// Whether the bytes from `offset` on had better be handed to the
    /// readers in memory ([`Self::hand_off`]) than written to the file:
    /// someone is reading, and they go right after the bytes held.
    pub fn hands_off(&self, offset: u64) -> bool {
        self.handoff.as_ref().is_some_and(|handoff| {
            let handoff = lock(handoff);
            handoff.active > 0 && (handoff.held == 0 || handoff.end() == offset)
        })
    }

    /// While the only reader there was is reading, and more than half the
    /// memory limit is held: what to wait on for it to take more (which
    /// frees them), rather than write them to the file.
    pub fn crowded(&self) -> Option<Crowded> {
        let handoff = self.handoff.as_ref()?;
        lock(handoff).crowded().then(|| Crowded(handoff.clone()))
    }

    /// Holds `bytes`, which go at `offset`, for the readers instead of
    /// writing them (only when [`Self::hands_off`] said so). Returns the
    /// oldest held bytes beyond the memory limit, with their offsets: the
    /// caller writes them to the file, then calls [`Self::written_out`].
    pub fn hand_off(&self, offset: u64, bytes: Bytes) -> Vec<(u64, Bytes)> {
        let Some(handoff) = &self.handoff else {
            return vec![(offset, bytes)];
        };
        let mut handoff = lock(handoff);
        if handoff.held == 0 {
            handoff.start = offset;
        }
        handoff.held += bytes.len() as u64;
        handoff.chunks.push_back(bytes);
        let excess = handoff.held.saturating_sub(HANDOFF_LIMIT);
        handoff
            .held()
            .take_while(|(at, _)| *at < handoff.start + excess)
            .map(|(at, chunk)| (at, chunk.clone()))
            .collect()
    }

    /// The held bytes, with their offsets, if nobody is reading: the caller
    /// writes them to the file, then calls [`Self::written_out`].
    pub fn idle_held(&self) -> Vec<(u64, Bytes)> {
        let Some(handoff) = &self.handoff else {
            return Vec::new();
        };
        let handoff = lock(handoff);
        if handoff.active > 0 {
            return Vec::new();
        }
        handoff
            .held()
            .map(|(at, chunk)| (at, chunk.clone()))
            .collect()
    }

    /// The bytes before `offset` are in the file now; readers read them
    /// there.
    pub fn written_out(&self, offset: u64) {
        if let Some(handoff) = &self.handoff {
            lock(handoff).forget_before(offset);
        }
    }

    /// `bytes` more bytes may be read, from the file or as handed off.
    pub fn advance(&self, bytes: u64) {
        self.written.send_modify(|w| w.bytes += bytes);
    }

    /// The file is complete.
    pub fn finish(self) {
        self.written.send_modify(|w| w.done = Some(Ok(())));
    }

    /// The file will not be completed, because of `why`.
    pub fn abandon(self, why: &str) {
        self.written
            .send_modify(|w| w.done = Some(Err(Arc::from(why))));
    }
}

/// Held bytes of a [`Writer`] that its sole reader has yet to take.
#[derive(Debug)]
pub struct Crowded(Arc<HandoffCell>);

impl Crowded {
    /// Waits until the reader has taken enough of them or stopped reading,
    /// or has taken nothing for `patience`.
    pub async fn wait(self, patience: Duration) {
        loop {
            let progress = self.0.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if !lock(&self.0).crowded() {
                return;
            }
            if tokio::time::timeout(patience, progress).await.is_err() {
                return;
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // A writer that panicked or returned early must not leave readers waiting.
        self.written.send_if_modified(|w| {
            let unfinished = w.done.is_none();
            if unfinished {
                w.done = Some(Err(Arc::from(ABANDONED)));
            }
            unfinished
        });
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    async fn collect(
        mut rx: mpsc::Receiver<Result<Bytes, ServerError>>,
    ) -> Result<Vec<u8>, ServerError> {
        let mut out = Vec::new();
        while let Some(chunk) = rx.recv().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn reads_ranges_of_a_complete_file() {
        let bytes = data(3 * CHUNK + 17);
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();
        let nar = NarFile::complete(file, bytes.len() as u64);
        let whole = collect(nar.read_range(0, 0).unwrap()).await.unwrap();
        assert_eq!(whole, bytes);
        let middle = collect(nar.read_range(100, 2 * CHUNK as u64).unwrap())
            .await
            .unwrap();
        assert_eq!(middle, &bytes[100..100 + 2 * CHUNK]);
        let tail = collect(nar.read_range(bytes.len() as u64 - 5, 1 << 30).unwrap())
            .await
            .unwrap();
        assert_eq!(tail, &bytes[bytes.len() - 5..]);
        let err = nar.read_range(bytes.len() as u64, 0).unwrap_err();
        assert!(matches!(err, ServerError::OutOfRange(_)), "{err:?}");
    }

    #[tokio::test]
    async fn readers_follow_the_writer() {
        let bytes = data(2 * CHUNK + 3);
        let mut file = tempfile::tempfile().unwrap();
        let (nar, writer) = NarFile::growing(file.try_clone().unwrap(), bytes.len() as u64);
        let early = nar.read_range(CHUNK as u64, 0).unwrap();
        let whole = nar.read_range(0, 0).unwrap();
        for piece in bytes.chunks(1000) {
            file.write_all(piece).unwrap();
            writer.advance(piece.len() as u64);
        }
        writer.finish();
        assert_eq!(collect(early).await.unwrap(), &bytes[CHUNK..]);
        assert_eq!(collect(whole).await.unwrap(), bytes);
    }

    #[tokio::test]
    async fn waiting_readers_hold_no_blocking_threads() {
        // More readers than the blocking pool has threads (512), while the
        // writer needs that pool, as upload staging does.
        let mut file = tempfile::tempfile().unwrap();
        let (nar, writer) = NarFile::growing(file.try_clone().unwrap(), 3);
        let readers: Vec<_> = (0..600).map(|_| nar.read_range(0, 0).unwrap()).collect();
        tokio::task::yield_now().await;
        let write = tokio::task::spawn_blocking(move || {
            file.write_all(b"nar").unwrap();
            writer.advance(3);
            writer.finish();
        });
        tokio::time::timeout(std::time::Duration::from_secs(20), write)
            .await
            .expect("the writer got a blocking thread")
            .unwrap();
        for reader in readers {
            assert_eq!(collect(reader).await.unwrap(), b"nar");
        }
    }

    #[tokio::test]
    async fn handed_off_bytes_beyond_the_limit_go_to_the_file() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let bytes = Bytes::from(data(3 * HANDOFF_LIMIT as usize / 2));
        // Behind another NAR's bytes, as in an upload's staging file.
        let base = 1234;
        let (nar, writer) = NarFile::growing_in(file.clone(), base, bytes.len() as u64);
        assert!(!writer.hands_off(0), "nobody reads yet");
        let reader = nar.read_range(0, 0).unwrap();
        let mut spilled = 0;
        // Parts that do not line up with the reader's blocks, so that some
        // block begins in the file and ends in memory.
        let part_size = CHUNK + 1000;
        for at in (0..bytes.len()).step_by(part_size) {
            assert!(writer.hands_off(at as u64));
            let part = bytes.slice(at..(at + part_size).min(bytes.len()));
            for (offset, part) in writer.hand_off(at as u64, part) {
                file.write_all_at(&part, base + offset).unwrap();
                spilled = offset + part.len() as u64;
            }
            writer.written_out(spilled);
        }
        assert!(spilled >= bytes.len() as u64 - HANDOFF_LIMIT, "{spilled}");
        writer.advance(bytes.len() as u64);
        writer.finish();
        assert_eq!(collect(reader).await.unwrap(), bytes);
    }

    #[tokio::test]
    async fn a_crowded_writer_waits_for_its_reader_but_not_forever() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let bytes = Bytes::from(data(HANDOFF_LIMIT as usize * 3 / 4));
        let (nar, writer) = NarFile::growing_in(file, 0, bytes.len() as u64);
        let mut stalled = nar.read_range(0, 0).unwrap();
        assert!(writer.hand_off(0, bytes.clone()).is_empty());
        writer.advance(bytes.len() as u64);
        let crowded = writer.crowded().expect("more than half the limit is held");
        // The reader takes a few blocks, then nobody drains it.
        let patience = Duration::from_millis(300);
        let started = std::time::Instant::now();
        crowded.wait(patience).await;
        assert!(started.elapsed() >= patience);
        let reader = tokio::spawn(async move {
            let mut got = 0;
            while let Some(chunk) = stalled.recv().await {
                got += chunk.unwrap().len();
            }
            got
        });
        let started = std::time::Instant::now();
        writer
            .crowded()
            .unwrap()
            .wait(Duration::from_secs(30))
            .await;
        assert!(started.elapsed() < Duration::from_secs(20));
        assert!(writer.crowded().is_none());
        writer.finish();
        assert_eq!(reader.await.unwrap(), bytes.len());
    }

    #[tokio::test]
    async fn bytes_held_for_a_reader_that_stopped_can_go_to_the_file() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let bytes = Bytes::from(data(3 * CHUNK));
        let (nar, writer) = NarFile::growing_in(file.clone(), 0, bytes.len() as u64);
        let stopped = nar.read_range(0, 0).unwrap();
        assert!(writer.hand_off(0, bytes.clone()).is_empty());
        assert!(writer.idle_held().is_empty(), "someone is reading");
        drop(stopped);
        let idle = loop {
            tokio::task::yield_now().await;
            let idle = writer.idle_held();
            if !idle.is_empty() {
                break idle;
            }
        };
        for (offset, part) in &idle {
            file.write_all_at(part, *offset).unwrap();
        }
        writer.written_out(bytes.len() as u64);
        writer.advance(bytes.len() as u64);
        writer.finish();
        let mut whole = vec![0; bytes.len()];
        file.read_exact_at(&mut whole, 0).unwrap();
        assert_eq!(whole, bytes);
        let again = collect(nar.read_range(0, 0).unwrap()).await.unwrap();
        assert_eq!(again, bytes);
    }

    #[tokio::test]
    async fn an_abandoned_fill_fails_its_readers() {
        let mut file = tempfile::tempfile().unwrap();
        let (nar, writer) = NarFile::growing(file.try_clone().unwrap(), 10_000);
        let reader = nar.read_range(0, 0).unwrap();
        file.write_all(&[1; 100]).unwrap();
        writer.advance(100);
        writer.abandon("the NAR does not match");
        let err = collect(reader).await.unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err:?}");
        let dropped = {
            let (nar, writer) = NarFile::growing(tempfile::tempfile().unwrap(), 10);
            let reader = nar.read_range(0, 0).unwrap();
            drop(writer);
            collect(reader).await
        };
        assert!(dropped.is_err());
    }
}
