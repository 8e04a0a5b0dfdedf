//! NARs of valid store paths, serialised in-process straight from the file
//! system, as `nix-store --dump` writes them.
//!
//! Spawning `nix-store --dump` costs a process per path, which dominates
//! when a closure has thousands of small paths. Store paths are immutable
//! and world-readable once valid, so reading them directly gives the same
//! bytes. Whoever receives a NAR still checks it against the hash the store
//! records (the builder for uploads, the client's Nix for outputs), so a
//! store that is not at `/nix/store` on this file system shows up as a hash
//! mismatch, never as wrong data accepted.

use std::{
    ffi::OsString,
    fs,
    io::{self, Read, Seek, SeekFrom},
    ops::Range,
    os::unix::{ffi::OsStrExt, fs::PermissionsExt},
    path::{Path, PathBuf},
};

use bytes::{Bytes, BytesMut};
use futures::{Stream, TryStreamExt as _, stream};

use crate::nix::store_path::StorePath;

/// Where `path` lives on this machine's file system, if it is there.
pub fn physical(path: &StorePath) -> Option<PathBuf> {
    let physical = PathBuf::from(path.to_string());
    fs::symlink_metadata(&physical).is_ok().then_some(physical)
}

/// Serialises the file system object at `path` as a NAR, handing `sink`
/// chunks of at most `chunk` bytes; returns the NAR's size.
pub fn dump(
    path: &Path,
    chunk: usize,
    sink: impl FnMut(Bytes) -> io::Result<()>,
) -> io::Result<u64> {
    dump_range(path, 0..u64::MAX, chunk, sink)
}

/// Like [`dump`], for only the bytes of the NAR in `range`; returns how
/// many were handed on.
pub fn dump_range(
    path: &Path,
    range: Range<u64>,
    chunk: usize,
    mut sink: impl FnMut(Bytes) -> io::Result<()>,
) -> io::Result<u64> {
    let mut nar = Serialiser::new(path.to_owned(), range, chunk);
    let mut sent = 0;
    while let Some(bytes) = nar.next_chunk()? {
        sent += bytes.len() as u64;
        sink(bytes)?;
    }
    Ok(sent)
}

/// Streams the chunks of `nar`, serialising each on the blocking pool: no
/// thread is held while the reader is slow, and no file either (the file
/// being read is closed after each chunk and opened again for the next,
/// which costs far less than the chunk). Ends with the serialiser, which
/// may go on with a later range ([`Serialiser::continue_with`]), or with an
/// error if serialisation fails.
pub fn stream(nar: Serialiser) -> impl Stream<Item = io::Result<Step>> + Send + 'static {
    stream::try_unfold(Some(nar), |nar| async move {
        let Some(mut nar) = nar else {
            return Ok(None);
        };
        let (nar, chunk) = tokio::task::spawn_blocking(move || {
            let chunk = nar.next_chunk();
            nar.close_files();
            chunk.map(|chunk| (nar, chunk))
        })
        .await
        .map_err(io::Error::other)??;
        Ok(Some(match chunk {
            Some(bytes) => (Step::Chunk(bytes), Some(nar)),
            None => (Step::End(nar), None),
        }))
    })
}

/// Streams `range` of the NAR of `path` (all of it: `0..u64::MAX`) in
/// chunks of `chunk` bytes as [`stream()`] does, without the serialiser at
/// the end.
pub fn stream_range(
    path: PathBuf,
    range: Range<u64>,
    chunk: usize,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    stream(Serialiser::new(path, range, chunk)).try_filter_map(|step| async move {
        Ok(match step {
            Step::Chunk(bytes) => Some(bytes),
            Step::End(_) => None,
        })
    })
}

/// What [`stream()`] yields.
#[derive(Debug)]
pub enum Step {
    /// The next bytes of the range.
    Chunk(Bytes),
    /// The range is complete.
    End(Serialiser),
}

/// A NAR being serialised a chunk at a time, for one byte range of it.
///
/// What comes before the range is skipped without reading the files it
/// holds (their metadata is read), and work stops at the range's end with
/// the walk's position kept, so the serialiser can go on with the next
/// range without walking the tree again.
#[derive(Debug)]
pub struct Serialiser {
    /// What is left to write, the next thing last.
    todo: Vec<Todo>,
    /// Serialised bytes not yet handed on, from NAR offset `at - buffer.len()`.
    buffer: BytesMut,
    chunk: usize,
    /// The NAR offset serialisation has reached.
    at: u64,
    range: Range<u64>,
}

#[derive(Debug)]
enum Todo {
    /// The node at this path.
    Node(PathBuf),
    /// The `)` that closes a node or a directory entry.
    Close,
    /// A directory's entries still to write, in NAR order.
    Entries {
        dir: PathBuf,
        names: std::vec::IntoIter<OsString>,
    },
    /// A regular file's `len` bytes of contents, `done` of them passed;
    /// `file` is opened once some of them are wanted.
    Contents {
        path: PathBuf,
        len: u64,
        done: u64,
        file: Option<fs::File>,
    },
}

impl Serialiser {
    /// Serialises `range` of the NAR of the file system object at `path`, in
    /// chunks of at most `chunk` bytes.
    pub fn new(path: PathBuf, range: Range<u64>, chunk: usize) -> Self {
        let mut nar = Self {
            todo: vec![Todo::Node(path)],
            buffer: BytesMut::new(),
            chunk: chunk.max(1),
            at: 0,
            range,
        };
        nar.string(b"nix-archive-1");
        nar
    }

    /// The NAR offset of the next byte this serialiser would hand on.
    pub fn position(&self) -> u64 {
        self.at - self.buffer.len() as u64
    }

    /// Closes the file being read, if any, until work goes on: a paused
    /// serialiser holds no descriptor, and keeps no store path in use.
    pub fn close_files(&mut self) {
        for todo in &mut self.todo {
            if let Todo::Contents { file, .. } = todo {
                *file = None;
            }
        }
    }

    /// Goes on with `range`, which starts at or after [`Self::position`]:
    /// what lies between is skipped as before the first range.
    pub fn continue_with(&mut self, range: Range<u64>) {
        let skip = range.start.saturating_sub(self.position());
        let _ = self
            .buffer
            .split_to(skip.min(self.buffer.len() as u64) as usize);
        self.range = range;
    }

    /// The next chunk of the range; `None` once it is complete (or the NAR
    /// ended before it).
    pub fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        while self.buffer.len() < self.chunk && self.at < self.range.end {
            let Some(todo) = self.todo.pop() else {
                break;
            };
            self.work(todo)?;
        }
        let wanted = self.range.end.saturating_sub(self.position());
        let n = self
            .buffer
            .len()
            .min(self.chunk)
            .min(wanted.try_into().unwrap_or(usize::MAX));
        Ok((n > 0).then(|| self.buffer.split_to(n).freeze()))
    }

    fn work(&mut self, todo: Todo) -> io::Result<()> {
        match todo {
            Todo::Node(path) => self.node(path),
            Todo::Close => {
                self.string(b")");
                Ok(())
            }
            Todo::Entries { dir, mut names } => {
                if let Some(name) = names.next() {
                    let child = dir.join(&name);
                    self.todo.push(Todo::Entries { dir, names });
                    for token in [&b"entry"[..], b"(", b"name", name.as_bytes(), b"node"] {
                        self.string(token);
                    }
                    self.todo.push(Todo::Close);
                    self.todo.push(Todo::Node(child));
                }
                Ok(())
            }
            Todo::Contents {
                path,
                len,
                done,
                file,
            } => self.contents(path, len, done, file),
        }
    }

    fn node(&mut self, path: PathBuf) -> io::Result<()> {
        let meta = fs::symlink_metadata(&path)?;
        let kind = meta.file_type();
        self.string(b"(");
        self.string(b"type");
        self.todo.push(Todo::Close);
        if kind.is_symlink() {
            self.string(b"symlink");
            self.string(b"target");
            self.string(fs::read_link(&path)?.as_os_str().as_bytes());
        } else if kind.is_file() {
            self.string(b"regular");
            if meta.permissions().mode() & 0o100 != 0 {
                self.string(b"executable");
                self.string(b"");
            }
            self.string(b"contents");
            self.raw(&meta.len().to_le_bytes());
            self.todo.push(Todo::Contents {
                path,
                len: meta.len(),
                done: 0,
                file: None,
            });
        } else if kind.is_dir() {
            self.string(b"directory");
            let mut names = fs::read_dir(&path)?
                .map(|entry| entry.map(|entry| entry.file_name()))
                .collect::<io::Result<Vec<OsString>>>()?;
            // Nix orders entries by their bytes, as `OsString` does on Unix.
            names.sort();
            self.todo.push(Todo::Entries {
                dir: path,
                names: names.into_iter(),
            });
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is neither a file, a directory nor a symlink",
                    path.display()
                ),
            ));
        }
        Ok(())
    }

    /// Passes the next part of a file's contents: skips what lies before
    /// the range, reads at most what fills the chunk and is wanted, and pads
    /// at the end.
    fn contents(
        &mut self,
        path: PathBuf,
        len: u64,
        mut done: u64,
        mut file: Option<fs::File>,
    ) -> io::Result<()> {
        let skip = self.range.start.saturating_sub(self.at).min(len - done);
        self.at += skip;
        done += skip;
        if skip > 0
            && let Some(file) = &mut file
        {
            file.seek(SeekFrom::Start(done))?;
        }

        let room = self.chunk.saturating_sub(self.buffer.len()) as u64;
        let n = (len - done)
            .min(room)
            .min(self.range.end.saturating_sub(self.at)) as usize;
        if n > 0 {
            let file = match &mut file {
                Some(file) => file,
                None => {
                    let mut opened = fs::File::open(&path)?;
                    opened.seek(SeekFrom::Start(done))?;
                    file.insert(opened)
                }
            };
            let start = self.buffer.len();
            self.buffer.resize(start + n, 0);
            let read = file.read(&mut self.buffer[start..])?;
            self.buffer.truncate(start + read);
            if read == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} shrank while it was read", path.display()),
                ));
            }
            self.at += read as u64;
            done += read as u64;
        }
        if done < len {
            self.todo.push(Todo::Contents {
                path,
                len,
                done,
                file,
            });
        } else {
            self.pad(len);
        }
        Ok(())
    }

    /// Appends `data`, less what lies before the range.
    fn raw(&mut self, data: &[u8]) {
        let skip = self
            .range
            .start
            .saturating_sub(self.at)
            .min(data.len() as u64);
        self.buffer.extend_from_slice(&data[skip as usize..]);
        self.at += data.len() as u64;
    }

    fn pad(&mut self, len: u64) {
        let padding = (8 - len % 8) % 8;
        self.raw(&[0u8; 8][..padding as usize]);
    }

    fn string(&mut self, text: &[u8]) {
        self.raw(&(text.len() as u64).to_le_bytes());
        self.raw(text);
        self.pad(text.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::{nix::nar::NarValidator, transport::http2::CHUNK};

    fn nar_of(path: &Path, chunk: usize) -> Vec<u8> {
        let mut nar = Vec::new();
        let size = dump(path, chunk, |bytes| {
            assert!(bytes.len() <= chunk);
            nar.extend_from_slice(&bytes);
            Ok(())
        })
        .unwrap();
        assert_eq!(size, nar.len() as u64);
        nar
    }

    #[test]
    fn dumps_a_tree_as_a_canonical_nar_in_any_chunk_size() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("sub/deeper")).unwrap();
        fs::write(root.join("b.txt"), b"hello\n").unwrap();
        fs::write(root.join("a"), vec![7u8; 70_000]).unwrap();
        fs::write(root.join("sub/empty"), b"").unwrap();
        fs::write(root.join("sub/run.sh"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("sub/run.sh"), fs::Permissions::from_mode(0o555)).unwrap();
        symlink("../b.txt", root.join("sub/link")).unwrap();
        let whole = nar_of(&root, 1 << 20);
        let mut validator = NarValidator::new();
        validator.push(&whole).unwrap();
        assert_eq!(validator.finish().unwrap(), whole.len() as u64);
        for chunk in [1, 7, 8, 4096] {
            assert_eq!(nar_of(&root, chunk), whole, "chunk {chunk}");
        }
        let text = String::from_utf8_lossy(&whole);
        let (a, b, sub) = (
            text.find("\0a\0").unwrap(),
            text.find("b.txt").unwrap(),
            text.find("sub").unwrap(),
        );
        assert!(a < b && b < sub, "entries are sorted");
        assert!(text.contains("executable"));
        assert!(text.contains("../b.txt"));
    }

    #[test]
    fn dumps_any_byte_range_of_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(root.join("a"), vec![3u8; 5000]).unwrap();
        fs::write(
            root.join("sub/b"),
            (0..3000).map(|i| i as u8).collect::<Vec<_>>(),
        )
        .unwrap();
        symlink("a", root.join("sub/c")).unwrap();
        let whole = nar_of(&root, 1 << 20);
        let len = whole.len() as u64;
        let ranges = (0..len)
            .step_by(97)
            .flat_map(|start| [start..start + 1, start..start + 700, start..len]);
        for range in ranges.chain([0..u64::MAX, len..len + 5]) {
            let mut part = Vec::new();
            let sent = dump_range(&root, range.clone(), 64, |bytes| {
                part.extend_from_slice(&bytes);
                Ok(())
            })
            .unwrap();
            let expected = &whole[range.start.min(len) as usize..range.end.min(len) as usize];
            assert_eq!(part, expected, "range {range:?}");
            assert_eq!(sent, expected.len() as u64);
        }
    }

    #[test]
    fn a_paused_serialiser_goes_on_with_later_ranges_with_its_files_closed_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("d")).unwrap();
        for (name, len) in [("a", 900), ("d/b", 5000), ("d/c", 0), ("e", 3000)] {
            let contents: Vec<u8> = (0..len).map(|i| (i * 7 + name.len()) as u8).collect();
            fs::write(root.join(name), contents).unwrap();
        }
        let whole = nar_of(&root, 1 << 20);
        let len = whole.len() as u64;
        for (step, gap) in [(1, 0), (100, 0), (333, 0), (1000, 0), (100, 57), (250, 700)] {
            let mut nar = Serialiser::new(root.clone(), 0..step, 64);
            let mut start = 0;
            while start < len {
                let end = (start + step).min(len);
                nar.continue_with(start..end);
                let mut part = Vec::new();
                while let Some(bytes) = nar.next_chunk().unwrap() {
                    assert!(bytes.len() <= 64);
                    part.extend_from_slice(&bytes);
                }
                assert_eq!(
                    part,
                    &whole[start as usize..end as usize],
                    "step {step}, gap {gap}, at {start}"
                );
                assert_eq!(nar.position(), end);
                if end % 2 == 0 {
                    nar.close_files();
                }
                start = end + gap;
            }
        }
    }

    #[tokio::test]
    async fn streams_hold_no_blocking_thread_between_chunks() {
        use futures::StreamExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, vec![1u8; 3 * CHUNK]).unwrap();
        // More paused streams than the blocking pool has threads (512).
        let mut streams: Vec<_> = (0..600)
            .map(|_| Box::pin(stream_range(file.clone(), 0..u64::MAX, CHUNK)))
            .collect();
        let first_chunks = async {
            for stream in &mut streams {
                assert_eq!(stream.next().await.unwrap().unwrap().len(), CHUNK);
            }
            tokio::task::spawn_blocking(|| ()).await.unwrap();
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), first_chunks)
            .await
            .expect("paused streams left blocking threads free");
        let rest: Vec<usize> = streams[0]
            .by_ref()
            .map(|chunk| chunk.unwrap().len())
            .collect()
            .await;
        assert_eq!(
            CHUNK + rest.iter().sum::<usize>(),
            nar_of(&file, CHUNK).len()
        );
    }

    #[tokio::test]
    async fn a_stream_between_chunks_holds_no_file_open() {
        use futures::StreamExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, vec![1u8; 3 * CHUNK]).unwrap();
        let mut chunks = Box::pin(stream_range(file.clone(), 0..u64::MAX, CHUNK));
        let first = chunks.next().await.unwrap().unwrap();
        // A file of the same size put in its place is what the next chunk
        // reads: the stream did not keep the first one open.
        let replacement = dir.path().join("g");
        fs::write(&replacement, vec![2u8; 3 * CHUNK]).unwrap();
        fs::rename(&replacement, &file).unwrap();
        let next = chunks.next().await.unwrap().unwrap();
        assert_eq!(first[first.len() - 1], 1);
        assert!(
            next.iter().all(|byte| *byte == 2),
            "the old file stayed open"
        );
    }

    #[test]
    fn dumps_a_single_file_as_nix_does() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"abc").unwrap();
        let mut expected = Vec::new();
        for part in [
            &b"nix-archive-1"[..],
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"abc",
            b")",
        ] {
            expected.extend_from_slice(&(part.len() as u64).to_le_bytes());
            expected.extend_from_slice(part);
            expected.resize(expected.len().div_ceil(8) * 8, 0);
        }
        assert_eq!(nar_of(&file, CHUNK), expected);
    }
}
