//! Preparing a `file://` binary cache for Nix to read.

use std::path::Path;

/// Creates what Nix's `file://` store insists on creating when opened, so the cache can be read by
/// a user that may not write to it later: `nar/`, `realisations/`, `log/` and `nix-cache-info`.
pub(super) fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    for sub in ["nar", "realisations", "log"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let info = dir.join("nix-cache-info");
    if !info.exists() {
        std::fs::write(info, "StoreDir: /nix/store\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepares_the_directory_once() {
        let dir = tempfile::tempdir().unwrap();
        prepare_dir(dir.path()).unwrap();
        for sub in ["nar", "realisations", "log"] {
            assert!(dir.path().join(sub).is_dir());
        }
        std::fs::write(
            dir.path().join("nix-cache-info"),
            "StoreDir: /nix/store\nPriority: 9\n",
        )
        .unwrap();
        prepare_dir(dir.path()).unwrap();
        let info = std::fs::read_to_string(dir.path().join("nix-cache-info")).unwrap();
        assert!(info.contains("Priority: 9"));
    }
}
