//! Filling a cache entry from `nix-store --dump`, for a store this file
//! system cannot read by range: readers follow the file as it is written,
//! and the entry is made only once the NAR matches the store's hash.

use std::{
    collections::HashMap,
    io::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tracing::{info, warn};

use super::{
    CacheError, SignedCache,
    compress::{COMPRESS_FROM, compress, read_file},
    on_blocking_pool, record_entry,
};
use crate::{
    nix::{nar::NarHasher, narinfo::NarInfo},
    nixcmd::Nix,
    server::nar_file::{NarFile, Writer},
    transport::http2::CHUNK,
};

impl SignedCache {
    /// Starts writing the entry of `narinfo` from `nix-store --dump`; readers
    /// follow the returned file as it grows.
    pub(super) fn start_fill(&self, narinfo: NarInfo) -> Result<NarFile, CacheError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = open.get(&narinfo.url) {
            return Ok(entry.nar.clone());
        }
        let nar_dir = self.dir.join("nar");
        std::fs::create_dir_all(&nar_dir)?;
        let tmp = tempfile::NamedTempFile::new_in(&nar_dir)?;
        let (nar, writer) = NarFile::growing(tmp.reopen()?, narinfo.nar_size);
        open.insert(
            narinfo.url.clone(),
            OpenEntry {
                nar: nar.clone(),
                touched: Instant::now(),
            },
        );
        let fill = Fill {
            dir: self.dir.clone(),
            narinfo_path: self.narinfo_path(&narinfo.store_path),
            max_bytes: self.max_bytes,
            nix: self.nix.clone(),
            narinfo,
        };
        let fills = self.fills.clone();
        let open = self.open.clone();
        tokio::spawn(async move {
            let url = fill.narinfo.url.clone();
            let path = fill.narinfo.store_path.clone();
            let nar_size = fill.narinfo.nar_size;
            let permit = fills.acquire_owned().await;
            let result = on_blocking_pool(move || fill.run(tmp, writer)).await;
            drop(permit);
            match result {
                Ok(replaced) => {
                    info!(%path, nar_size, "cache entry filled");
                    if replaced {
                        linger(&open, &url).await;
                    }
                }
                Err(err) => warn!(%path, "filling a cache entry: {err}"),
            }
            open.lock().unwrap_or_else(|p| p.into_inner()).remove(&url);
        });
        Ok(nar)
    }
}

/// How long an entry whose plain file compression replaced stays readable
/// under the URL it was filled as, after its last use: a client may still
/// be fetching ranges of it (one that pauses longer gets the plain NAR
/// filled again). Short, because while the file is open the kernel writes
/// the deleted file's pages back to disk like any other.
const LINGER: Duration = Duration::from_secs(10);

async fn linger(open: &OpenEntries, url: &str) {
    loop {
        let touched = match open.lock().unwrap_or_else(|p| p.into_inner()).get(url) {
            Some(entry) => entry.touched,
            None => return,
        };
        if touched.elapsed() >= LINGER {
            return;
        }
        tokio::time::sleep(LINGER - touched.elapsed()).await;
    }
}

/// Entries being filled or recently filled, by URL.
pub(super) type OpenEntries = Arc<Mutex<HashMap<String, OpenEntry>>>;

#[derive(Debug)]
pub(super) struct OpenEntry {
    pub(super) nar: NarFile,
    pub(super) touched: Instant,
}

/// Everything needed to write one cache entry on a blocking thread.
struct Fill {
    dir: PathBuf,
    narinfo_path: PathBuf,
    narinfo: NarInfo,
    max_bytes: Option<u64>,
    nix: Nix,
}

impl Fill {
    /// Writes the NAR into `tmp`, telling readers through `writer`, checks it
    /// against the store's hash and only then makes it an entry (compressed
    /// if that pays), narinfo last. Returns whether a compressed file
    /// replaced the plain one.
    fn run(self, tmp: tempfile::NamedTempFile, writer: Writer) -> Result<bool, CacheError> {
        match self.write(tmp.as_file(), &writer) {
            Ok(()) => {}
            Err(err) => {
                writer.abandon(&format!(
                    "the builder could not serve {}: {err}",
                    self.narinfo.store_path
                ));
                return Err(err);
            }
        }
        let plain = self.dir.join(&self.narinfo.url);
        tmp.persist(&plain).map_err(|err| err.error)?;
        writer.finish();
        let compressed = if self.narinfo.nar_size >= COMPRESS_FROM {
            compress(
                &|range, sink| read_file(&plain, range, sink),
                &self.dir,
                &self.narinfo,
            )
        } else {
            Ok(None)
        };
        let (narinfo, replaced) = match compressed {
            Ok(Some(compressed)) => {
                // Readers hold the plain file open, so it can go.
                let _ = std::fs::remove_file(&plain);
                (compressed, true)
            }
            Ok(None) => (self.narinfo.clone(), false),
            Err(err) => {
                warn!(path = %self.narinfo.store_path, "compressing a cache entry: {err}");
                (self.narinfo.clone(), false)
            }
        };
        record_entry(&self.dir, &self.narinfo_path, &narinfo, self.max_bytes)?;
        Ok(replaced)
    }

    fn write(&self, mut out: &std::fs::File, writer: &Writer) -> Result<(), CacheError> {
        let mut hasher = NarHasher::new();
        let mut sink = |bytes: Bytes| -> std::io::Result<()> {
            hasher
                .write_all(&bytes)
                .expect("hashing into memory cannot fail");
            out.write_all(&bytes)?;
            writer.advance(bytes.len() as u64);
            Ok(())
        };
        let handle = tokio::runtime::Handle::current();
        handle.block_on(async {
            let mut reader = self.nix.dump(&self.narinfo.store_path)?;
            let mut buffer = vec![0u8; CHUNK];
            loop {
                let n = reader.read(&mut buffer).await?;
                if n == 0 {
                    break;
                }
                sink(Bytes::copy_from_slice(&buffer[..n]))?;
            }
            Ok::<_, CacheError>(())
        })?;
        let (nar_hash, nar_size) = hasher.finish();
        if nar_hash != self.narinfo.nar_hash || nar_size != self.narinfo.nar_size {
            return Err(CacheError::Corrupt(self.narinfo.store_path.clone()));
        }
        Ok(())
    }
}
