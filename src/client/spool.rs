//! Small outputs handed to Nix as a `file://` binary cache.
//!
//! Nix's HTTP binary cache costs about a millisecond of CPU per path more
//! than its `file://` one (a request per narinfo and per NAR, each through
//! curl's worker thread and the narinfo disk cache), which dominates a
//! closure of many small paths. The small NARs the cache proxy fetched ahead
//! are therefore written to a private directory and imported from there
//! first, as long as each one's missing references are among them too; the
//! rest still streams through the loopback HTTP cache. Nix checks the
//! signatures and hashes the same way whichever cache it reads.

use std::{
    collections::{HashMap, HashSet},
    io,
    path::{Path, PathBuf},
};

use bytes::Bytes;
use tempfile::TempDir;

use crate::nix::{narinfo::NarInfo, store_path::StorePath};

/// Small outputs written as a `file://` binary cache; removed when dropped.
#[derive(Debug)]
pub struct Spool {
    dir: TempDir,
    url: String,
    paths: HashSet<StorePath>,
    roots: Vec<StorePath>,
}

impl Spool {
    /// Writes each NAR with its narinfo into a new private directory in
    /// `parent`, and the narinfos of `present` paths (which the local store
    /// has) without a NAR: `nix copy` walks a path's closure in the cache it
    /// reads before it skips what the store has. The narinfos' URLs are
    /// replaced by names chosen here, so nothing the builder sends decides
    /// where a file goes; signatures do not cover the URL. `parent` must be
    /// a path a store URL can carry as it is.
    pub fn write(
        parent: &Path,
        entries: Vec<(NarInfo, Bytes)>,
        present: &[NarInfo],
    ) -> io::Result<Self> {
        let plain = |dir: &Path| {
            crate::nixcmd::file_url(dir)
                .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err.to_string()))
        };
        plain(parent)?;
        let dir = tempfile::Builder::new()
            .prefix("drv-thru-import-")
            .tempdir_in(parent)?;
        let url = plain(dir.path())?;
        std::fs::create_dir(dir.path().join("nar"))?;
        let write_narinfo = |narinfo: &mut NarInfo| {
            let hash = narinfo.store_path.hash_part().to_string();
            narinfo.url = format!("nar/{hash}.nar");
            std::fs::write(
                dir.path().join(format!("{hash}.narinfo")),
                narinfo.to_string(),
            )
        };
        for narinfo in present {
            write_narinfo(&mut narinfo.clone())?;
        }
        let mut paths = HashSet::with_capacity(entries.len());
        let mut referred = HashSet::new();
        for (mut narinfo, nar) in entries {
            write_narinfo(&mut narinfo)?;
            std::fs::write(dir.path().join(&narinfo.url), &nar)?;
            referred.extend(
                narinfo
                    .references
                    .iter()
                    .filter(|reference| **reference != narinfo.store_path)
                    .cloned(),
            );
            paths.insert(narinfo.store_path);
        }
        let mut roots: Vec<StorePath> = paths.difference(&referred).cloned().collect();
        roots.sort();
        Ok(Self {
            dir,
            url,
            paths,
            roots,
        })
    }

    /// The directory holding the cache.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cache's `file://` URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The paths no other spooled path refers to: copying them copies all.
    pub fn roots(&self) -> &[StorePath] {
        &self.roots
    }

    /// Whether every one of `paths` is in the spool.
    pub fn holds_all(&self, paths: &[StorePath]) -> bool {
        paths.iter().all(|path| self.paths.contains(path))
    }
}

/// Where to spool: the user's runtime directory when there is one, a tmpfs
/// on systemd machines, else the temporary directory. Creating thousands of
/// files costs little on either, except on an ext4 without a journal, which
/// scans past inodes freed in the last few minutes (as a store's garbage
/// collection frees them) before it reuses one.
pub fn parent_dir() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute() && dir.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

/// The narinfos of `candidates` that Nix can import from the candidates
/// alone: each of its references is itself, in `valid` (already in the local
/// store) or another candidate kept by the same rule.
pub fn self_contained<'a>(
    candidates: &'a [NarInfo],
    valid: &HashSet<StorePath>,
) -> Vec<&'a NarInfo> {
    let index: HashMap<&StorePath, usize> = candidates
        .iter()
        .enumerate()
        .map(|(at, narinfo)| (&narinfo.store_path, at))
        .collect();
    let mut referrers = vec![Vec::new(); candidates.len()];
    let mut dropped = vec![false; candidates.len()];
    let mut queue = Vec::new();
    for (at, narinfo) in candidates.iter().enumerate() {
        for reference in &narinfo.references {
            if *reference == narinfo.store_path || valid.contains(reference) {
                continue;
            }
            match index.get(reference) {
                Some(&other) => referrers[other].push(at),
                None if !dropped[at] => {
                    dropped[at] = true;
                    queue.push(at);
                }
                None => {}
            }
        }
    }
    // Whatever refers to a dropped path, directly or not, goes too.
    while let Some(at) = queue.pop() {
        for &referrer in &referrers[at] {
            if !dropped[referrer] {
                dropped[referrer] = true;
                queue.push(referrer);
            }
        }
    }
    candidates
        .iter()
        .zip(dropped)
        .filter_map(|(narinfo, dropped)| (!dropped).then_some(narinfo))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::hash::Sha256Hash;

    fn path(name: &str) -> StorePath {
        format!("/nix/store/{}-{name}", "a".repeat(31) + &name[..1])
            .parse()
            .unwrap()
    }

    fn narinfo(name: &str, refs: &[&str]) -> NarInfo {
        NarInfo {
            store_path: path(name),
            url: "nar/../../elsewhere".to_owned(),
            compression: Some("none".to_owned()),
            file_hash: None,
            file_size: Some(3),
            nar_hash: Sha256Hash::digest(name.as_bytes()),
            nar_size: 3,
            references: refs.iter().map(|r| path(r)).collect(),
            deriver: None,
            signatures: Vec::new(),
            ca: None,
            extra: Vec::new(),
        }
    }

    fn names(kept: &[&NarInfo]) -> Vec<String> {
        let mut names: Vec<String> = kept
            .iter()
            .map(|n| n.store_path.name().to_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn keeps_paths_whose_missing_references_are_candidates() {
        let candidates = [
            narinfo("a", &["a"]),
            narinfo("b", &["a", "v"]),
            narinfo("c", &["b"]),
        ];
        let valid = HashSet::from([path("v")]);
        assert_eq!(names(&self_contained(&candidates, &valid)), ["a", "b", "c"]);
    }

    #[test]
    fn drops_everything_that_leads_to_a_path_left_out() {
        // "x" is neither valid nor a candidate (a large NAR, say): "b"
        // refers to it, "c" to "b", "d" to "c"; "f" is independent.
        let candidates = [
            narinfo("d", &["c"]),
            narinfo("c", &["b"]),
            narinfo("b", &["x", "a"]),
            narinfo("a", &[]),
            narinfo("f", &["a"]),
        ];
        assert_eq!(
            names(&self_contained(&candidates, &HashSet::new())),
            ["a", "f"]
        );
    }

    #[test]
    fn writes_a_cache_with_names_of_its_own() {
        let entries = vec![
            (narinfo("a", &[]), Bytes::from_static(b"nar")),
            (narinfo("b", &["a", "b"]), Bytes::from_static(b"rab")),
        ];
        let parent = tempfile::tempdir().unwrap();
        let present = [narinfo("v", &[])];
        let spool = Spool::write(parent.path(), entries, &present).unwrap();
        let dir = spool.dir().to_owned();
        assert_eq!(spool.url(), format!("file://{}", dir.display()));
        assert_eq!(spool.roots(), [path("b")]);
        assert!(spool.holds_all(&[path("a"), path("b")]));
        assert!(!spool.holds_all(&[path("a"), path("x")]));
        let hash = path("b").hash_part().to_string();
        let text = std::fs::read_to_string(dir.join(format!("{hash}.narinfo"))).unwrap();
        let written: NarInfo = text.parse().unwrap();
        assert_eq!(written.url, format!("nar/{hash}.nar"));
        assert_eq!(written.references, narinfo("b", &["a", "b"]).references);
        assert_eq!(std::fs::read(dir.join(&written.url)).unwrap(), b"rab");
        assert!(!parent.path().join("elsewhere").exists());
        let present = path("v").hash_part().to_string();
        assert!(dir.join(format!("{present}.narinfo")).exists());
        assert!(!dir.join(format!("nar/{present}.nar")).exists());
        drop(spool);
        assert!(std::fs::read_dir(parent.path()).unwrap().next().is_none());
    }

    #[test]
    fn writes_nothing_where_a_store_url_cannot_point() {
        let parent = tempfile::tempdir().unwrap();
        let odd = parent.path().join("a b");
        std::fs::create_dir(&odd).unwrap();
        let entries = vec![(narinfo("a", &[]), Bytes::from_static(b"nar"))];
        let err = Spool::write(&odd, entries, &[]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(std::fs::read_dir(&odd).unwrap().next().is_none());
    }
}
