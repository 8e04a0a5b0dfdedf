//! Keeping the cache within its size limit, least recently used entries
//! first, and removing what fills cut short by a crash left behind.

use std::path::Path;

use crate::nix::narinfo::NarInfo;

/// Removes the temporary files of fills a crash cut short: entries are only
/// ever made by renaming a complete file into place.
pub(super) fn remove_leftovers(dir: &Path) {
    for dir in [dir.to_owned(), dir.join("nar")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Marks the entry at `path` as just used: modification times are the LRU
/// clock of pruning.
pub(super) fn filetime_touch(path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::options().append(true).open(path)?;
    file.set_modified(std::time::SystemTime::now())
}

/// Removes the least recently used entries of `dir` until its files take at
/// most `max` bytes; returns how many it removed.
pub(super) fn prune_dir(dir: &Path, max: u64) -> std::io::Result<usize> {
    let mut entries = Vec::new();
    let mut total = 0u64;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".narinfo") {
            continue;
        }
        let Ok(narinfo) = std::fs::read_to_string(entry.path()).map(|t| t.parse::<NarInfo>())
        else {
            continue;
        };
        let Ok(narinfo) = narinfo else { continue };
        let size = narinfo.file_size.unwrap_or(narinfo.nar_size);
        total += size;
        entries.push((
            entry.metadata()?.modified()?,
            entry.path(),
            dir.join(&narinfo.url),
            size,
        ));
    }
    entries.sort_by_key(|(modified, ..)| *modified);
    let mut removed = 0;
    for (_, narinfo, nar, size) in entries {
        if total <= max {
            break;
        }
        std::fs::remove_file(&narinfo)?;
        let _ = std::fs::remove_file(&nar);
        total = total.saturating_sub(size);
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use crate::{nix::signing::SecretKey, nixcmd::Nix, server::cache::SignedCache};

    #[test]
    fn a_restart_removes_what_interrupted_fills_left() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("nar")).unwrap();
        for name in [
            "nar/.tmpAbC123",
            ".tmpXyZ789",
            "nar/kept.nar",
            "kept.narinfo",
        ] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        SignedCache::new(
            dir.path().to_owned(),
            SecretKey::generate("drv-thru-test-1").unwrap(),
            Nix::new(),
            1,
            None,
        );
        let mut left: Vec<String> = ["", "nar"]
            .iter()
            .flat_map(|sub| std::fs::read_dir(dir.path().join(sub)).unwrap())
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["kept.nar", "kept.narinfo", "nar"]);
    }
}
