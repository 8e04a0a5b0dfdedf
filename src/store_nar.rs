//! NARs of valid store paths, serialised in-process straight from the file
//! system, as `nix-store --dump` writes them.
//!
//! Spawning `nix-store --dump` costs a process per path, which dominates
//! when a closure has thousands of small paths. Store paths are immutable
//! and world-readable once valid, so reading them directly gives the same
//! bytes. Callers still check every NAR against the hash the store (or the
//! peer) records, so a store that is not at `/nix/store` on this file system
//! shows up as a hash mismatch, never as wrong data accepted.

use std::{
    ffi::OsString,
    fs,
    io::{self, Read, Seek, SeekFrom},
    ops::Range,
    os::unix::{ffi::OsStrExt, fs::PermissionsExt},
    path::{Path, PathBuf},
};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::nix::store_path::StorePath;

/// Bytes per chunk handed on.
pub const CHUNK: usize = 256 << 10;

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
/// many were handed on. What comes before the range is skipped without
/// reading the files it holds, and serialisation stops at its end, so a
/// byte range of a large NAR costs about what those bytes cost to read.
pub fn dump_range(
    path: &Path,
    range: Range<u64>,
    chunk: usize,
    sink: impl FnMut(Bytes) -> io::Result<()>,
) -> io::Result<u64> {
    let mut out = Chunker {
        buffer: BytesMut::with_capacity(chunk),
        chunk,
        sink,
        at: 0,
        range,
        sent: 0,
    };
    out.string(b"nix-archive-1")?;
    node(&mut out, path)?;
    out.flush()?;
    Ok(out.sent)
}

/// Streams `range` of the NAR of `path` (all of it: `0..u64::MAX`) from a
/// blocking thread, a few chunks ahead of the reader. Reading ends with an
/// error if serialisation fails.
pub fn stream(path: PathBuf, range: Range<u64>) -> ReceiverStream<io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let result = dump_range(&path, range, CHUNK, |bytes| {
            tx.blocking_send(Ok(bytes))
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "NAR reader went away"))
        });
        if let Err(err) = result {
            let _ = tx.blocking_send(Err(err));
        }
    });
    ReceiverStream::new(rx)
}

struct Chunker<F> {
    buffer: BytesMut,
    chunk: usize,
    sink: F,
    /// Position in the whole NAR.
    at: u64,
    /// The part of the NAR handed on.
    range: Range<u64>,
    /// Bytes handed on.
    sent: u64,
}

impl<F: FnMut(Bytes) -> io::Result<()>> Chunker<F> {
    /// Whether the rest of the NAR lies past the range.
    fn done(&self) -> bool {
        self.at >= self.range.end
    }

    /// The part of the next `len` bytes of the NAR that lies in the range,
    /// as offsets into those bytes.
    fn wanted(&self, len: u64) -> Range<u64> {
        let start = self.range.start.saturating_sub(self.at).min(len);
        let end = self.range.end.saturating_sub(self.at).min(len);
        start..end.max(start)
    }

    fn raw(&mut self, data: &[u8]) -> io::Result<()> {
        let wanted = self.wanted(data.len() as u64);
        self.at += data.len() as u64;
        let mut data = &data[wanted.start as usize..wanted.end as usize];
        while !data.is_empty() {
            let n = (self.chunk - self.buffer.len()).min(data.len());
            self.buffer.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buffer.len() >= self.chunk {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        let padding = (8 - len % 8) % 8;
        self.raw(&[0u8; 8][..padding as usize])
    }

    fn string(&mut self, text: &[u8]) -> io::Result<()> {
        self.raw(&(text.len() as u64).to_le_bytes())?;
        self.raw(text)?;
        self.pad(text.len() as u64)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let bytes = self.buffer.split().freeze();
        self.buffer.reserve(self.chunk);
        self.sent += bytes.len() as u64;
        (self.sink)(bytes)
    }

    /// Copies the part in range of the `len` bytes of the file at `path`;
    /// the file is not even opened when none of it is wanted.
    fn contents(&mut self, path: &Path, len: u64) -> io::Result<()> {
        self.raw(&len.to_le_bytes())?;
        let wanted = self.wanted(len);
        self.at += len;
        if !wanted.is_empty() {
            let mut file = fs::File::open(path)?;
            file.seek(SeekFrom::Start(wanted.start))?;
            let mut left = wanted.end - wanted.start;
            while left > 0 {
                if self.buffer.len() >= self.chunk {
                    self.flush()?;
                }
                let room =
                    (self.chunk - self.buffer.len()).min(left.try_into().unwrap_or(usize::MAX));
                let start = self.buffer.len();
                self.buffer.resize(start + room, 0);
                let n = file.read(&mut self.buffer[start..])?;
                self.buffer.truncate(start + n);
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "a store file shrank while it was read",
                    ));
                }
                left -= n as u64;
            }
        }
        self.pad(len)
    }
}

fn node<F: FnMut(Bytes) -> io::Result<()>>(out: &mut Chunker<F>, path: &Path) -> io::Result<()> {
    if out.done() {
        return Ok(());
    }
    let meta = fs::symlink_metadata(path)?;
    let kind = meta.file_type();
    out.string(b"(")?;
    out.string(b"type")?;
    if kind.is_symlink() {
        out.string(b"symlink")?;
        out.string(b"target")?;
        out.string(fs::read_link(path)?.as_os_str().as_bytes())?;
    } else if kind.is_file() {
        out.string(b"regular")?;
        if meta.permissions().mode() & 0o100 != 0 {
            out.string(b"executable")?;
            out.string(b"")?;
        }
        out.string(b"contents")?;
        out.contents(path, meta.len())?;
    } else if kind.is_dir() {
        out.string(b"directory")?;
        let mut names = fs::read_dir(path)?
            .map(|entry| entry.map(|entry| entry.file_name()))
            .collect::<io::Result<Vec<OsString>>>()?;
        // Nix orders entries by their bytes, as `OsString` does on Unix.
        names.sort();
        for name in names {
            if out.done() {
                return Ok(());
            }
            out.string(b"entry")?;
            out.string(b"(")?;
            out.string(b"name")?;
            out.string(name.as_bytes())?;
            out.string(b"node")?;
            node(out, &path.join(&name))?;
            out.string(b")")?;
        }
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is neither a file, a directory nor a symlink",
                path.display()
            ),
        ));
    }
    out.string(b")")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::nix::nar::NarValidator;

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
