//! The allowlist: the builder signing keys the helper imports for.
//!
//! One key per line, exactly as Nix writes it (`NAME:BASE64` of 32 bytes,
//! e.g. a builder's `signing-public.key`); blank lines and lines starting
//! with `#` are ignored, and surrounding whitespace is trimmed. The first
//! line that is anything else makes the whole file invalid.

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use thiserror::Error;

use crate::nix::signing::PublicKey;

/// Why an allowlist file cannot be used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AllowlistError {
    /// The file cannot be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// Someone other than root or the helper's user could change the file,
    /// and with it what the helper imports.
    #[error(
        "{} is writable by group or others or owned by uid {owner}; \
         it must be owned by root (or the helper's user) and writable only by its owner",
        .path.display()
    )]
    Unsafe {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
    },
    /// A line is neither a key, a comment nor blank.
    #[error("{}:{line}: {reason}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// The allowlisted keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    keys: Vec<PublicKey>,
}

impl Allowlist {
    /// Reads and checks the allowlist file at `path`.
    ///
    /// The file must be owned by root or the current user and not be
    /// writable by group or others.
    pub fn load(path: &Path) -> Result<Self, AllowlistError> {
        let read = |source| AllowlistError::Read {
            path: path.to_owned(),
            source,
        };
        let metadata = std::fs::metadata(path).map_err(read)?;
        // SAFETY: geteuid cannot fail and touches no memory.
        let me = unsafe { libc::geteuid() };
        if metadata.mode() & 0o022 != 0 || (metadata.uid() != 0 && metadata.uid() != me) {
            return Err(AllowlistError::Unsafe {
                path: path.to_owned(),
                owner: metadata.uid(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Self::parse(&text, path)
    }

    /// Parses the text of an allowlist; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, AllowlistError> {
        let mut keys = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = parse_exact_key(line).map_err(|reason| AllowlistError::Invalid {
                path: path.to_owned(),
                line: index + 1,
                reason: reason.to_owned(),
            })?;
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        Ok(Self { keys })
    }

    /// Whether `key` (name and bytes) is on the list.
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.keys.contains(key)
    }

    /// The number of distinct keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the list has no keys, so every import is refused.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The allowlist in use, replaced as a whole on reload.
#[derive(Debug, Default)]
pub struct SharedAllowlist(RwLock<Arc<Allowlist>>);

impl SharedAllowlist {
    /// Starts with `list`.
    pub fn new(list: Allowlist) -> Self {
        Self(RwLock::new(Arc::new(list)))
    }

    /// The current list.
    pub fn get(&self) -> Arc<Allowlist> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the list.
    pub fn replace(&self, list: Allowlist) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(list);
    }
}

/// Parses a public key that must be written exactly as Nix writes it: no
/// surrounding whitespace, canonical base64, and a name that cannot be
/// mistaken for a command-line option.
pub(crate) fn parse_exact_key(text: &str) -> Result<PublicKey, &'static str> {
    const FORM: &str = "not a Nix public key NAME:BASE64 (32 bytes of ed25519), \
                        as in a builder's signing-public.key";
    let key: PublicKey = text.parse().map_err(|_| FORM)?;
    if key.to_string() != text {
        return Err(FORM);
    }
    if key.name().starts_with('-') {
        return Err("a key name must not start with '-'");
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::signing::SecretKey;

    fn key(name: &str) -> PublicKey {
        SecretKey::generate(name).unwrap().to_public()
    }

    #[test]
    fn reads_keys_comments_and_blank_lines() {
        let (a, b) = (key("builder-a-1"), key("builder-b-1"));
        let text = format!("# builders\n\n{a}\n   {b}  \n# {a}\n{a}\n");
        let list = Allowlist::parse(&text, Path::new("keys")).unwrap();
        assert_eq!(list.len(), 2);
        assert!(list.contains(&a) && list.contains(&b));
        assert!(!list.contains(&key("builder-a-1")));
        assert!(Allowlist::parse("", Path::new("keys")).unwrap().is_empty());
    }

    #[test]
    fn names_file_and_line_of_a_bad_entry() {
        let good = key("builder-1");
        for bad in [
            "--option".to_owned(),
            "-v".to_owned(),
            "builder-1:".to_owned(),
            format!("{good} # trailing comment"),
            format!("{good}="),
            format!("-x:{}", good.to_string().split_once(':').unwrap().1),
            "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-x".to_owned(),
        ] {
            let text = format!("# ok\n{good}\n{bad}\n");
            let err = Allowlist::parse(&text, Path::new("/etc/keys")).unwrap_err();
            assert!(
                err.to_string().starts_with("/etc/keys:3: "),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn exact_keys_only() {
        let good = key("builder-1").to_string();
        assert!(parse_exact_key(&good).is_ok());
        for bad in [
            format!(" {good}"),
            format!("{good}\n"),
            good.replace("builder-1:", "builder-1: "),
        ] {
            assert!(parse_exact_key(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refuses_a_file_others_can_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("{}\n", key("builder-1"))).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(Allowlist::load(&path).unwrap().len(), 1);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert!(matches!(
            Allowlist::load(&path),
            Err(AllowlistError::Unsafe { .. })
        ));
        assert!(matches!(
            Allowlist::load(&dir.path().join("missing")),
            Err(AllowlistError::Read { .. })
        ));
    }
}
