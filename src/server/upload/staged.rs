//! One input path being received, possibly in parts out of order: written
//! to its staging file or handed to a reading Nix, and checked in order as
//! soon as the bytes before a part are in.

use std::{
    collections::BTreeMap,
    fs::File,
    io::Write as _,
    os::unix::fs::FileExt,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::internal;
use crate::{
    nix::{
        content_address::ContentAddress,
        hash::Sha256Hash,
        nar::{NarHasher, NarValidator},
    },
    server::{
        declared_input::DeclaredInput,
        error::{Budget, ServerError},
        nar_file::{Crowded, NarFile, Writer},
    },
};

/// Bytes read back at a time when checking parts that arrived early.
const READ_BACK: usize = 1 << 20;

/// Ranges of an upload's parts held ahead of the bytes before them, all its
/// paths together, once adjacent parts are merged. Each is kept in memory
/// until the gap before it fills, however few bytes it has, so their number
/// is capped rather than their size: a part's size shows only when the
/// next begins, and a client's messages are as small as its reads. The
/// real client leaves at most one gap per part in flight, a few hundred
/// over 16 calls with their flow-control windows full.
pub(super) const MAX_PARTS_AHEAD: usize = 4096;

/// The ranges held ahead across one upload, counted against
/// [`MAX_PARTS_AHEAD`]. Each path's ranges are counted while it holds them.
#[derive(Debug, Clone, Default)]
pub(super) struct PartsAhead(Arc<AtomicUsize>);

impl PartsAhead {
    /// Counts one more range; refused at the cap.
    fn take(&self) -> Result<(), ServerError> {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                (held < MAX_PARTS_AHEAD).then_some(held + 1)
            })
            .map(drop)
            .map_err(|_| {
                ServerError::OverBudget(
                    Budget::PartsAhead,
                    format!(
                        "{MAX_PARTS_AHEAD} parts of this upload are already held ahead of \
                         bytes not yet sent; send each path's parts closer to in order"
                    ),
                )
            })
    }

    fn give_back(&self, ranges: usize) {
        self.0.fetch_sub(ranges, Ordering::SeqCst);
    }
}

/// One path being received, possibly in parts out of order.
#[derive(Debug)]
pub(super) struct Staged {
    input: DeclaredInput,
    /// The upload's staging file, shared by all its paths: thousands of
    /// small inputs cost one file, not thousands.
    file: Arc<File>,
    /// Where this path's NAR begins in `file`.
    base: u64,
    /// Bytes checked, from the start.
    checked: u64,
    /// Parts written beyond `checked`, start → end; never overlapping or
    /// adjacent (adjacent parts are merged).
    ahead: BTreeMap<u64, u64>,
    /// The upload's count of ranges in `ahead`, of all its paths.
    parts_ahead: PartsAhead,
    hasher: NarHasher,
    validator: NarValidator,
    /// For a text-hashed input (a `.drv` file), the hash of its contents
    /// so far: the contents pass through, only the hash state stays.
    text: Option<Sha256>,
    /// Tells readers how far they may read; `None` once released.
    readers: Option<Writer>,
    /// Bytes readers were told of.
    published: u64,
}

impl Staged {
    /// Stages `input` at `base` in the upload's staging `file`, and gives
    /// the view of it its readers get; its parts held ahead count against
    /// `parts_ahead`.
    pub(super) fn start(
        input: DeclaredInput,
        file: &Arc<File>,
        base: u64,
        parts_ahead: PartsAhead,
    ) -> (Self, NarFile) {
        let text = match input.content_address() {
            Some(ContentAddress::Text(_)) => Some(Sha256::new()),
            Some(ContentAddress::Fixed { .. }) | None => None,
        };
        let (nar, readers) = NarFile::growing_in(file.clone(), base, input.nar_size);
        let staged = Self {
            input,
            file: file.clone(),
            base,
            checked: 0,
            ahead: BTreeMap::new(),
            parts_ahead,
            hasher: NarHasher::new(),
            validator: NarValidator::new(),
            text,
            readers: Some(readers),
            published: 0,
        };
        (staged, nar)
    }

    /// Takes `data` at `offset` (to the file, or to a reader) and checks
    /// whatever is now contiguous.
    /// Returns whether the whole NAR is in and has passed every check.
    pub(super) fn write(&mut self, offset: u64, data: Bytes) -> Result<bool, ServerError> {
        let result = self.write_and_check(offset, data);
        if let Err(err) = &result
            && let Some(readers) = self.readers.take()
        {
            readers.abandon(&err.to_string());
        }
        result
    }

    fn write_and_check(&mut self, offset: u64, data: Bytes) -> Result<bool, ServerError> {
        let path = &self.input.path;
        let end = offset.saturating_add(data.len() as u64);
        if end > self.input.nar_size {
            return Err(ServerError::InvalidArgument(format!(
                "the NAR of {path} is longer than the announced {} bytes",
                self.input.nar_size
            )));
        }
        let overlaps_before = self
            .ahead
            .range(..end)
            .next_back()
            .is_some_and(|(_, before_end)| *before_end > offset);
        if offset < self.checked || overlaps_before {
            return Err(ServerError::InvalidArgument(format!(
                "bytes {offset}..{end} of {path} were sent twice"
            )));
        }
        if offset == self.checked {
            self.check(&data)?;
            match &self.readers {
                Some(readers) if readers.hands_off(offset) => {
                    self.write_out(readers, readers.hand_off(offset, data))?;
                }
                readers => {
                    // Bytes held for a reader that has stopped go to the file
                    // first, where a later reader finds them.
                    if let Some(readers) = readers {
                        self.write_out(readers, readers.idle_held())?;
                    }
                    self.write_at(&data, offset)?;
                }
            }
        } else {
            self.hold_ahead(offset, &data)?;
        }
        if self.ahead.contains_key(&self.checked) {
            self.read_back()?;
        }
        // Readers never get a whole NAR before the upload is complete.
        self.publish(self.checked.min(self.input.nar_size.saturating_sub(1)));
        if self.checked < self.input.nar_size {
            return Ok(false);
        }
        self.finish()?;
        Ok(true)
    }

    /// Writes `data`, which belongs at `offset` past the checked bytes, to
    /// the file, merging its range with the ranges it touches.
    fn hold_ahead(&mut self, offset: u64, data: &[u8]) -> Result<(), ServerError> {
        let end = offset + data.len() as u64;
        let before = self
            .ahead
            .range(..offset)
            .next_back()
            .filter(|(_, before_end)| **before_end == offset)
            .map(|(start, _)| *start);
        let after = self.ahead.get(&end).copied();
        if before.is_none() && after.is_none() {
            self.parts_ahead.take()?;
        }
        self.write_at(data, offset)?;
        if after.is_some() {
            self.ahead.remove(&end);
        }
        if before.is_some() && after.is_some() {
            self.parts_ahead.give_back(1);
        }
        self.ahead
            .insert(before.unwrap_or(offset), after.unwrap_or(end));
        Ok(())
    }

    /// Writes `data` at `offset` of this path's NAR.
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), ServerError> {
        self.file
            .write_all_at(data, self.base + offset)
            .map_err(internal("writing the upload file"))
    }

    /// Writes bytes that `readers` held, at their offsets, to the file, and
    /// tells them so.
    fn write_out(&self, readers: &Writer, held: Vec<(u64, Bytes)>) -> Result<(), ServerError> {
        if let Some((last, bytes)) = held.last() {
            for (at, bytes) in &held {
                self.write_at(bytes, *at)?;
            }
            readers.written_out(last + bytes.len() as u64);
        }
        Ok(())
    }

    /// Checks the parts written ahead that are now contiguous, reading them
    /// back from the file.
    fn read_back(&mut self) -> Result<(), ServerError> {
        let mut buffer = vec![0; READ_BACK];
        while let Some(ahead_end) = self.ahead.remove(&self.checked) {
            self.parts_ahead.give_back(1);
            while self.checked < ahead_end {
                let n = (ahead_end - self.checked).min(READ_BACK as u64) as usize;
                self.file
                    .read_exact_at(&mut buffer[..n], self.base + self.checked)
                    .map_err(internal("reading the upload file back"))?;
                self.check(&buffer[..n])?;
            }
        }
        Ok(())
    }

    /// The held bytes a reader has yet to take, if they crowd memory.
    pub(super) fn crowded(&self) -> Option<Crowded> {
        self.readers.as_ref()?.crowded()
    }

    fn publish(&mut self, upto: u64) {
        if let Some(readers) = &self.readers
            && upto > self.published
        {
            readers.advance(upto - self.published);
            self.published = upto;
        }
    }

    /// Lets readers have the whole NAR, which has passed every check.
    pub(super) fn release(&mut self) {
        self.publish(self.input.nar_size);
        if let Some(readers) = self.readers.take() {
            readers.finish();
        }
    }

    fn check(&mut self, data: &[u8]) -> Result<(), ServerError> {
        let text = &mut self.text;
        self.validator
            .push_file_contents(data, |contents| {
                if let Some(text) = text {
                    text.update(contents);
                }
            })
            .map_err(|err| {
                ServerError::InvalidArgument(format!(
                    "the NAR of {} is malformed: {err}",
                    self.input.path
                ))
            })?;
        self.hasher
            .write_all(data)
            .expect("hashing into memory cannot fail");
        self.checked += data.len() as u64;
        Ok(())
    }

    /// Checks the complete NAR against what was announced.
    fn finish(&mut self) -> Result<(), ServerError> {
        let path = &self.input.path;
        let single_file = self.validator.is_single_file();
        std::mem::take(&mut self.validator)
            .finish()
            .map_err(|err| {
                ServerError::InvalidArgument(format!(
                    "the NAR of {path} is incomplete or malformed: {err}"
                ))
            })?;
        let (hash, size) = std::mem::take(&mut self.hasher).finish();
        if size != self.input.nar_size || hash != self.input.nar_hash {
            return Err(ServerError::InvalidArgument(format!(
                "the NAR of {path} does not match its announced hash and size ({hash}, {size} bytes)"
            )));
        }
        // Fixed-output paths need no more: the builder's Nix recomputes the
        // store path from the contents when importing. Nor do signed ones:
        // it checks their signatures.
        if let (Some(ContentAddress::Text(expected)), Some(text)) =
            (self.input.content_address(), self.text.take())
        {
            if !single_file {
                return Err(ServerError::InvalidArgument(format!(
                    "{path} is text-addressed but its NAR is not a single regular file"
                )));
            }
            if Sha256Hash::from_bytes(text.finalize().into()) != *expected {
                return Err(ServerError::InvalidArgument(format!(
                    "the contents of {path} do not match its content address"
                )));
            }
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.parts_ahead.give_back(self.ahead.len());
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::server::upload::tests::{nar_of, source, text};

    /// What the staging file holds from `staged`'s place to its end.
    fn written(staged: &Staged) -> Vec<u8> {
        let len = staged
            .file
            .metadata()
            .unwrap()
            .len()
            .saturating_sub(staged.base);
        let mut bytes = vec![0; len as usize];
        staged.file.read_exact_at(&mut bytes, staged.base).unwrap();
        bytes
    }

    async fn read_all(nar: &NarFile) -> Result<Vec<u8>, ServerError> {
        collect(nar.read_range(0, 0)?).await
    }

    async fn collect(
        mut chunks: tokio::sync::mpsc::Receiver<Result<Bytes, ServerError>>,
    ) -> Result<Vec<u8>, ServerError> {
        let mut out = Vec::new();
        while let Some(chunk) = chunks.recv().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    /// `contents` as an announced source, and its staging in a new directory.
    fn stage_source(
        contents: &[u8],
    ) -> (tempfile::TempDir, DeclaredInput, Vec<u8>, Staged, NarFile) {
        stage(|dir| source(contents, dir))
    }

    /// The input `announce` makes in a new directory, its NAR, and its
    /// staging there.
    fn stage(
        announce: impl FnOnce(&Path) -> (DeclaredInput, Vec<u8>),
    ) -> (tempfile::TempDir, DeclaredInput, Vec<u8>, Staged, NarFile) {
        stage_counting(announce, PartsAhead::default())
    }

    /// [`stage`], counting parts held ahead in `parts_ahead`.
    fn stage_counting(
        announce: impl FnOnce(&Path) -> (DeclaredInput, Vec<u8>),
        parts_ahead: PartsAhead,
    ) -> (tempfile::TempDir, DeclaredInput, Vec<u8>, Staged, NarFile) {
        let staging = tempfile::tempdir().unwrap();
        let (input, nar) = announce(staging.path());
        let file = Arc::new(tempfile::tempfile_in(staging.path()).unwrap());
        // Behind another path's place, as in an upload.
        let (staged, served) = Staged::start(input.clone(), &file, 4321, parts_ahead);
        (staging, input, nar, staged, served)
    }

    #[tokio::test]
    async fn parts_in_any_order_make_the_nar_which_readers_get_once_released() {
        let contents: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        let (_staging, _, nar, mut staged, served) = stage_source(&contents);
        let cuts = [0, 9_000, 20_000, 33_333, nar.len()];
        let parts: Vec<(u64, &[u8])> = cuts
            .windows(2)
            .map(|w| (w[0] as u64, &nar[w[0]..w[1]]))
            .collect();
        for (offset, data) in [parts[2], parts[3], parts[1]] {
            assert!(!staged.write(offset, Bytes::copy_from_slice(data)).unwrap());
        }
        assert!(
            staged
                .write(parts[0].0, Bytes::copy_from_slice(parts[0].1))
                .unwrap()
        );
        // Nobody was reading: all of it is in the file.
        let staged_file = written(&staged);
        assert_eq!(staged_file, nar);
        // Checked in full, but held back until the whole upload is.
        let reader = tokio::spawn(async move { read_all(&served).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!reader.is_finished());
        staged.release();
        assert_eq!(reader.await.unwrap().unwrap(), nar);
    }

    #[tokio::test]
    async fn a_reader_that_keeps_up_gets_the_nar_without_a_file() {
        let contents: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (_staging, _, nar, mut staged, served) = stage_source(&contents);
        let reader = tokio::spawn(collect(served.read_range(0, 0).unwrap()));
        let nar = Bytes::from(nar);
        for at in (0..nar.len()).step_by(30_000) {
            let part = nar.slice(at..(at + 30_000).min(nar.len()));
            staged.write(at as u64, part).unwrap();
            tokio::task::yield_now().await;
        }
        // Held back until the whole upload has passed, as from a file.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!reader.is_finished());
        staged.release();
        assert_eq!(reader.await.unwrap().unwrap(), nar);
        let staged_file = written(&staged);
        assert!(
            staged_file.is_empty(),
            "{} bytes written",
            staged_file.len()
        );
        let again = served.read_range(0, 0).unwrap_err();
        assert!(
            matches!(again, ServerError::FailedPrecondition(_)),
            "{again:?}"
        );
    }

    /// A NAR in parts, cut at `cuts`.
    fn parts(nar: &Bytes, cuts: &[usize]) -> Vec<(u64, Bytes)> {
        cuts.windows(2)
            .map(|w| (w[0] as u64, nar.slice(w[0]..w[1])))
            .collect()
    }

    #[tokio::test]
    async fn a_reader_gets_the_nar_from_the_file_and_from_memory_alike() {
        let contents: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let (_staging, _, nar, mut staged, served) = stage_source(&contents);
        let nar = Bytes::from(nar);
        let parts = parts(&nar, &[0, 40_000, 90_000, 150_000, 220_000, nar.len()]);
        // Before anyone reads: to the file.
        staged.write(parts[0].0, parts[0].1.clone()).unwrap();
        let reader = tokio::spawn(collect(served.read_range(0, 0).unwrap()));
        // Early, so to the file; then in order, held for the reader; the
        // early part read back; in order again.
        for i in [2, 1, 3, 4] {
            staged.write(parts[i].0, parts[i].1.clone()).unwrap();
            tokio::task::yield_now().await;
        }
        staged.release();
        assert_eq!(reader.await.unwrap().unwrap(), nar);
    }

    #[tokio::test]
    async fn overlapping_long_or_wrong_parts_are_refused() {
        let (_staging, _, nar, mut staged, _) = stage_source(b"some source text");
        staged
            .write(40, Bytes::copy_from_slice(&nar[40..60]))
            .unwrap();
        let twice = staged
            .write(50, Bytes::copy_from_slice(&nar[50..70]))
            .unwrap_err();
        assert!(twice.to_string().contains("sent twice"), "{twice:?}");
        let early = staged
            .write(30, Bytes::copy_from_slice(&nar[30..45]))
            .unwrap_err();
        assert!(early.to_string().contains("sent twice"), "{early:?}");
        let long = staged
            .write(nar.len() as u64 - 2, Bytes::from_static(b"abc"))
            .unwrap_err();
        assert!(long.to_string().contains("longer"), "{long:?}");

        let (_staging, _, mut nar, mut staged, served) = stage_source(b"some source text");
        let last = nar.len() - 20;
        nar[last] ^= 1;
        let err = staged.write(0, Bytes::from(nar)).unwrap_err();
        assert!(matches!(err, ServerError::InvalidArgument(_)), "{err:?}");
        // Readers learn why, and never get the bytes that failed.
        let read = read_all(&served).await.unwrap_err();
        assert!(read.to_string().contains("does not match"), "{read:?}");
    }

    #[test]
    fn an_unfinished_text_input_keeps_none_of_its_bytes() {
        let contents = vec![b'x'; 1 << 20];
        let (_staging, _, nar, mut staged, _) = stage(|dir| text(&contents, dir));
        let (most, last) = nar.split_at(nar.len() - 8);
        assert!(!staged.write(0, Bytes::copy_from_slice(most)).unwrap());
        // Debug shows all a `Staged` holds: the text's bytes are not there,
        // only the state of their hash.
        let held = format!("{staged:?}");
        assert!(held.len() < 4096, "{} bytes held: {held:.200}", held.len());
        assert!(
            staged
                .write(most.len() as u64, Bytes::copy_from_slice(last))
                .unwrap()
        );
    }

    #[test]
    fn a_text_input_must_match_its_content_address() {
        let (_staging, _, nar, mut staged, _) = stage(|dir| text(b"Derive([])", dir));
        assert!(staged.write(0, Bytes::from(nar)).unwrap());

        // Announced with the NAR it sends, but the address of other text.
        let (_staging, _, nar, mut staged, _) = stage(|dir| {
            let (mut input, _) = text(b"Derive([])", dir);
            let (other, nar) = text(b"Derive([1])", dir);
            (input.nar_hash, input.nar_size) = (other.nar_hash, other.nar_size);
            (input, nar)
        });
        let refused = staged.write(0, Bytes::from(nar)).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("do not match its content address"),
            "{refused:?}"
        );

        // A directory cannot be text, whatever its hash.
        let (_staging, _, nar, mut staged, _) = stage(|dir| {
            let (mut input, _) = text(b"Derive([])", dir);
            let tree = dir.join("tree");
            std::fs::create_dir(&tree).unwrap();
            let nar = nar_of(&tree);
            (input.nar_hash, input.nar_size) = (Sha256Hash::digest(&nar), nar.len() as u64);
            (input, nar)
        });
        let refused = staged.write(0, Bytes::from(nar)).unwrap_err();
        assert!(
            refused.to_string().contains("not a single regular file"),
            "{refused:?}"
        );
    }

    /// Writes byte `at` of `nar` alone.
    fn write_byte(staged: &mut Staged, nar: &[u8], at: usize) -> Result<bool, ServerError> {
        staged.write(at as u64, Bytes::copy_from_slice(&nar[at..=at]))
    }

    #[test]
    fn adjacent_parts_ahead_are_held_as_one() {
        let parts_ahead = PartsAhead::default();
        let contents = vec![3; 5000];
        let (_staging, _, nar, mut staged, _) =
            stage_counting(|dir| source(&contents, dir), parts_ahead.clone());
        // Backwards, byte by byte: each new byte joins the range after it.
        for at in (1..nar.len()).rev() {
            assert!(!write_byte(&mut staged, &nar, at).unwrap());
        }
        assert_eq!(staged.ahead.len(), 1);
        assert_eq!(parts_ahead.0.load(Ordering::SeqCst), 1);
        assert!(write_byte(&mut staged, &nar, 0).unwrap());
        assert_eq!(parts_ahead.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn parts_ahead_are_capped_across_an_upload() {
        let parts_ahead = PartsAhead::default();
        let contents = vec![5; 2 * MAX_PARTS_AHEAD];
        let (_a, _, nar_a, mut a, _) =
            stage_counting(|dir| source(&contents, dir), parts_ahead.clone());
        let (_b, _, nar_b, mut b, _) =
            stage_counting(|dir| text(&contents, dir), parts_ahead.clone());
        // Every other byte, half of them in each path: no two touch.
        let gaps = |nar: &[u8]| (2..nar.len()).step_by(2).take(MAX_PARTS_AHEAD / 2);
        for at in gaps(&nar_a) {
            write_byte(&mut a, &nar_a, at).unwrap();
        }
        for at in gaps(&nar_b) {
            write_byte(&mut b, &nar_b, at).unwrap();
        }
        let refused = write_byte(&mut a, &nar_a, MAX_PARTS_AHEAD + 2).unwrap_err();
        assert!(
            matches!(refused, ServerError::OverBudget(Budget::PartsAhead, _)),
            "{refused:?}"
        );
        // Filling a gap joins two ranges, which makes room for one more.
        write_byte(&mut b, &nar_b, 3).unwrap();
        write_byte(&mut a, &nar_a, MAX_PARTS_AHEAD + 2).unwrap();
        // A path gone gives its ranges back.
        drop(b);
        assert_eq!(
            parts_ahead.0.load(Ordering::SeqCst),
            MAX_PARTS_AHEAD / 2 + 1
        );
    }
}
