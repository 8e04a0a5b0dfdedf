//! Each session's outputs as garbage-collector roots (`DATA_DIR/gcroots`),
//! so a `nix-store --gc` on the builder between the build and the client's
//! fetch cannot delete what the client is about to read.
//!
//! A session's roots are the links `DATA_DIR/gcroots/<session>/result`
//! (and `result-<output>`) that `nix-store --realise --add-root` makes and
//! registers as indirect roots. Deleting a link ends its root: Nix's
//! collector skips, and later removes, registrations whose link is gone.
//! They are deleted when the session ends (its client has fetched the
//! outputs and left, or it was cancelled), when its build does not succeed,
//! and all at once at startup, as no session outlives the server.

use std::{io, path::PathBuf};

use tracing::warn;

/// The directory of every session's roots.
#[derive(Debug)]
pub struct GcRoots {
    dir: PathBuf,
}

impl GcRoots {
    /// The roots under `dir`, cleared of any a previous run left (after a
    /// crash, its sessions are gone, and so are their clients). Builds that
    /// run left running are killed first: they would root their outputs
    /// again, Nix making the directories anew.
    pub fn open(dir: PathBuf) -> io::Result<Self> {
        let orphans = crate::nixcmd::kill_builds_rooted_in(&dir);
        if orphans > 0 {
            warn!(
                orphans,
                "killed builds an earlier run of the server left running"
            );
        }
        match std::fs::remove_dir_all(&dir) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Where the roots of session `id` go: the `--add-root` base link in a
    /// directory of the session's own, created here.
    pub fn link_for(&self, id: &str) -> io::Result<PathBuf> {
        let dir = self.session_dir(id);
        std::fs::create_dir_all(&dir)?;
        Ok(dir.join("result"))
    }

    /// Ends the roots of session `id`, if it has any.
    pub fn remove(&self, id: &str) {
        match std::fs::remove_dir_all(self.session_dir(id)) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                warn!(
                    session = id,
                    "removing the outputs' garbage-collector roots: {err}"
                );
            }
            _ => {}
        }
    }

    fn session_dir(&self, id: &str) -> PathBuf {
        // Session ids are made by the server (`s-` and hex), never a path.
        debug_assert!(!id.contains('/') && !id.starts_with('.'));
        self.dir.join(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_clears_what_a_crash_left_and_remove_ends_one_session() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("gcroots");
        std::fs::create_dir_all(dir.join("s-old")).unwrap();
        std::os::unix::fs::symlink("/nix/store/x", dir.join("s-old/result")).unwrap();
        let roots = GcRoots::open(dir.clone()).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

        let link = roots.link_for("s-1").unwrap();
        assert_eq!(link, dir.join("s-1/result"));
        std::os::unix::fs::symlink("/nix/store/y", &link).unwrap();
        roots.link_for("s-2").unwrap();
        roots.remove("s-1");
        roots.remove("s-1");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(left, ["s-2"]);
    }
}
