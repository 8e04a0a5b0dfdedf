//! Keeping a zstd-compressed copy of a cache entry, when that saves at
//! least a tenth: compressible outputs then cost less to send and store,
//! while incompressible ones never pay for decompression.

use std::{
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    ops::Range,
    path::Path,
    sync::Arc,
};

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::{CacheError, ReadNar, SignedCache, on_blocking_pool, record_entry};
use crate::{
    nix::{hash::Sha256Hash, nar::NarHasher, narinfo::NarInfo},
    store_nar,
    transport::http2::CHUNK,
};

/// Paths remembered as not worth compressing (or being compressed);
/// beyond this they are forgotten, and at worst tried once more.
const MAX_TRIED: usize = 20_000;

impl SignedCache {
    /// Tries, once per path and holding a fill permit, to keep a compressed
    /// copy of the plain NAR that `narinfo` names.
    pub(super) fn compress_later(self: &Arc<Self>, narinfo: NarInfo) {
        if narinfo.nar_size < COMPRESS_FROM {
            return;
        }
        {
            let mut tried = self.tried.lock().unwrap_or_else(|p| p.into_inner());
            if tried.len() >= MAX_TRIED {
                tried.clear();
            }
            if !tried.insert(narinfo.store_path.clone()) {
                return;
            }
        }
        let cache = self.clone();
        tokio::spawn(async move {
            let _permit = cache.fills.clone().acquire_owned().await;
            let path = narinfo.store_path.clone();
            if cache.read_ready(&path).await.is_none() {
                let keep = cache.clone();
                match on_blocking_pool(move || keep.keep_compressed(&narinfo)).await {
                    Ok(true) => info!(%path, "cache entry compressed"),
                    Ok(false) => {
                        debug!(%path, "not worth compressing");
                        return;
                    }
                    Err(err) => warn!(%path, "compressing a cache entry: {err}"),
                }
            }
            // Kept entries are found on disk, and a failure may pass.
            cache
                .tried
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&path);
        });
    }

    /// Keeps a compressed copy of the plain NAR `narinfo` names, read from
    /// the store, if that pays; returns whether it did.
    fn keep_compressed(&self, narinfo: &NarInfo) -> Result<bool, CacheError> {
        let path = &narinfo.store_path;
        let physical =
            store_nar::physical(path).ok_or_else(|| CacheError::NotInStore(path.clone()))?;
        let read: ReadNar = &|range, sink| store_nar::dump_range(&physical, range, CHUNK, sink);
        let Some(compressed) = compress(read, &self.dir, narinfo)? else {
            return Ok(false);
        };
        record_entry(
            &self.dir,
            &self.narinfo_path(path),
            &compressed,
            self.max_bytes,
        )?;
        Ok(true)
    }
}

/// Entries shrink to at most this fraction (in tenths) of their NAR size,
/// or they stay uncompressed.
const WORTHWHILE_TENTHS: u64 = 9;

/// Smaller NARs stay uncompressed: their transfer costs round trips, not
/// bytes.
pub(super) const COMPRESS_FROM: u64 = 1 << 20;

/// A zstd-compressed copy of the NAR of `narinfo`, which `read` gives, with
/// the narinfo naming it, when that saves at least a tenth. Compressible
/// outputs then cost less to send and store, while incompressible ones
/// never pay for decompression. The signature covers the NAR's hash and
/// size, not the file, so it stays valid, and the NAR is checked against
/// them. The first MiB decides whether trying the whole NAR is worth it:
/// random data would otherwise cost seconds of CPU per GiB for nothing.
pub(super) fn compress(
    read: ReadNar,
    dir: &Path,
    narinfo: &NarInfo,
) -> Result<Option<NarInfo>, CacheError> {
    let mut sample = Vec::with_capacity(COMPRESS_FROM as usize);
    read(0..COMPRESS_FROM, &mut |bytes| {
        sample.extend_from_slice(&bytes);
        Ok(())
    })?;
    let compressed = zstd::bulk::compress(&sample, 3)?;
    if !worthwhile(compressed.len() as u64, sample.len() as u64) {
        return Ok(None);
    }
    let nar_dir = dir.join("nar");
    std::fs::create_dir_all(&nar_dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(nar_dir)?;
    let mut encoder = zstd::stream::Encoder::new(HashingWriter::new(tmp.as_file_mut()), 3)?;
    let mut nar = NarHasher::new();
    read(0..u64::MAX, &mut |bytes| {
        nar.write_all(&bytes)?;
        encoder.write_all(&bytes)
    })?;
    let (file_hash, file_size) = encoder.finish()?.finish();
    if nar.finish() != (narinfo.nar_hash, narinfo.nar_size) {
        return Err(CacheError::Corrupt(narinfo.store_path.clone()));
    }
    if !worthwhile(file_size, narinfo.nar_size) {
        return Ok(None);
    }
    let url = format!("nar/{}.nar.zst", file_hash.to_nix_base32());
    tmp.persist(dir.join(&url)).map_err(|err| err.error)?;
    Ok(Some(NarInfo {
        url,
        compression: Some("zstd".to_owned()),
        file_hash: Some(file_hash),
        file_size: Some(file_size),
        ..narinfo.clone()
    }))
}

/// Hands `range` of the file at `path` to `sink` in chunks.
pub(super) fn read_file(
    path: &Path,
    range: Range<u64>,
    sink: &mut dyn FnMut(Bytes) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(range.start))?;
    let mut file = file.take(range.end.saturating_sub(range.start));
    let mut sent = 0;
    loop {
        let mut chunk = Vec::with_capacity(CHUNK);
        let n = (&mut file).take(CHUNK as u64).read_to_end(&mut chunk)?;
        if n == 0 {
            return Ok(sent);
        }
        sent += n as u64;
        sink(chunk.into())?;
    }
}

fn worthwhile(compressed: u64, plain: u64) -> bool {
    compressed.saturating_mul(10) <= plain.saturating_mul(WORTHWHILE_TENTHS)
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    size: u64,
}

impl<W: std::io::Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: sha2::Digest::new(),
            size: 0,
        }
    }

    fn finish(self) -> (Sha256Hash, u64) {
        let digest: [u8; 32] = sha2::Digest::finalize(self.hasher).into();
        (Sha256Hash::from_bytes(digest), self.size)
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
