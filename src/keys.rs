//! Key files: the only code that reads or writes secret key material.
//!
//! Every secret file is created `0600` without ever existing with looser
//! permissions (written to a private temporary file, then hard-linked into
//! place so two processes racing to create a key agree on one), and every
//! secret file we load must not be readable by group or others.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{self, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use crate::nix::signing;

/// Errors reading or creating key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("{action} {path}")]
    Io {
        /// What we were doing.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A secret file that group or others can read.
    #[error(
        "secret key file {path} has mode {mode:04o}, readable by group or others; \
         run `chmod 600 {path}` (and consider the key leaked if others could read it)"
    )]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A secret file owned by someone else, who could change or read it.
    #[error(
        "secret key file {path} is owned by uid {owner}, not by this user or root; \
         chown it to the user drv-thru runs as (and consider the key leaked)"
    )]
    NotOurs {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
    },
    /// The file's content is not a key of the expected kind.
    #[error("{path} does not hold a valid {kind}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What the file should hold.
        kind: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KeyError + use<> {
    let path = path.to_owned();
    move |source| KeyError::Io {
        action,
        path,
        source,
    }
}

/// Reads a secret file after checking that it is ours (or root's) and that
/// only its owner can read it.
///
/// A systemd credential is exempt from the mode check: its directory is
/// private to the service, and systemd may grant the service user read
/// access through an ACL, which shows as group bits.
fn read_private(path: &Path) -> Result<Option<String>, KeyError> {
    read_private_among(path, std::env::var_os("CREDENTIALS_DIRECTORY"))
}

/// [`read_private`], with systemd's credentials directory given.
fn read_private_among(
    path: &Path,
    credentials: Option<std::ffi::OsString>,
) -> Result<Option<String>, KeyError> {
    let metadata = match fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(io_error("reading", path)(err)),
    };
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    if metadata.uid() != me && metadata.uid() != 0 {
        return Err(KeyError::NotOurs {
            path: path.to_owned(),
            owner: metadata.uid(),
        });
    }
    let credential =
        credentials.is_some_and(|dir| Path::new(&dir).is_absolute() && path.starts_with(dir));
    let mode = metadata.mode() & 0o777;
    if mode & 0o077 != 0 && !credential {
        return Err(KeyError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    fs::read_to_string(path)
        .map(Some)
        .map_err(io_error("reading", path))
}

/// Writes `contents` to `path` unless it already exists, with `mode`.
///
/// Returns `false` when another process created the file first; the caller
/// then reads the winner's key.
fn create_file(path: &Path, contents: &str, mode: u32) -> Result<bool, KeyError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_error("creating directory for", path))?;
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; a public key must stay readable.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(err) => Err(err),
        }
    })();
    let _ = fs::remove_file(&tmp);
    result.map_err(io_error("creating", path))
}

/// Loads a hex-encoded 32-byte secret from `path`, creating it if missing.
fn load_or_create_secret_bytes(path: &Path, kind: &'static str) -> Result<[u8; 32], KeyError> {
    loop {
        if let Some(text) = read_private(path)? {
            return decode_hex32(text.trim()).ok_or_else(|| KeyError::Malformed {
                path: path.to_owned(),
                kind,
                reason: "expected 64 hexadecimal characters".to_owned(),
            });
        }
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|err| KeyError::Io {
            action: "generating",
            path: path.to_owned(),
            source: io::Error::other(err.to_string()),
        })?;
        if create_file(
            path,
            &format!("{}\n", data_encoding::HEXLOWER.encode(&bytes)),
            0o600,
        )? {
            return Ok(bytes);
        }
    }
}

fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    data_encoding::HEXLOWER_PERMISSIVE
        .decode(text.as_bytes())
        .ok()?
        .try_into()
        .ok()
}

/// Loads the Iroh endpoint secret key at `path`, creating it on first use.
///
/// The key is the endpoint's identity: its public half is the endpoint id
/// clients dial and builders allowlist.
pub fn load_or_create_endpoint_key(path: &Path) -> Result<iroh::SecretKey, KeyError> {
    load_or_create_secret_bytes(path, "Iroh secret key")
        .map(|bytes| iroh::SecretKey::from_bytes(&bytes))
}

/// Reads a ticket kept in a file (a builders.json entry's `ticket_file`):
/// its bearer secret is as sensitive as a key, so the file gets the same
/// ownership and mode checks.
pub fn load_ticket(path: &Path) -> Result<crate::ticket::Ticket, KeyError> {
    let text = read_private(path)?.ok_or_else(|| KeyError::Io {
        action: "reading",
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::NotFound, "the file does not exist"),
    })?;
    text.parse()
        .map_err(|err: crate::ticket::TicketParseError| KeyError::Malformed {
            path: path.to_owned(),
            kind: "drv-thru ticket",
            reason: err.to_string(),
        })
}

/// The default client key file: `$XDG_CONFIG_HOME/drv-thru/secret.key`,
/// falling back to `~/.config/drv-thru/secret.key`.
pub fn default_client_key_path() -> Option<PathBuf> {
    crate::config::user_config_dir().map(|dir| dir.join("secret.key"))
}

/// The key that derives ticket bearer secrets from ticket ids.
///
/// Keeping only this key (and not the secrets themselves) on disk means the
/// ticket state file reveals nothing usable, while `ticket reveal` can still
/// reproduce a ticket string.
pub struct TicketKey([u8; 32]);

impl TicketKey {
    /// Loads the ticket key at `path`, creating it on first use.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        load_or_create_secret_bytes(path, "ticket key").map(Self)
    }

    /// The bearer secret of the ticket `id`: HMAC-SHA256 keyed by this key.
    pub fn bearer_secret(&self, id: &str) -> [u8; 32] {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0)
            .expect("HMAC accepts keys of any length");
        mac.update(b"drv-thru ticket secret v1\0");
        mac.update(id.as_bytes());
        mac.finalize().into_bytes().into()
    }

    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TicketKey([redacted])")
    }
}

/// The builder's Nix signing key pair, in Nix's `NAME:BASE64` files.
pub struct SigningKeyFiles {
    /// The secret key, `0600`.
    pub secret: signing::SecretKey,
    /// The public key, `0644`, for admins to hand to clients.
    pub public: signing::PublicKey,
}

impl SigningKeyFiles {
    /// Loads `signing-secret.key` (and writes `signing-public.key` next to
    /// it) in `dir`, generating a key pair named for this builder on first
    /// use.
    ///
    /// The name must be unique per builder: Nix keeps one trusted key per
    /// name, so two builders sharing a name could not both be trusted.
    pub fn load_or_create(dir: &Path) -> Result<Self, KeyError> {
        let secret_path = dir.join("signing-secret.key");
        let public_path = dir.join("signing-public.key");
        loop {
            if let Some(text) = read_private(&secret_path)? {
                let secret: signing::SecretKey =
                    text.trim().parse().map_err(|err: signing::SigningError| {
                        KeyError::Malformed {
                            path: secret_path.clone(),
                            kind: "Nix signing secret key",
                            reason: err.to_string(),
                        }
                    })?;
                let public = secret.to_public();
                let public_text = format!("{public}\n");
                if fs::read_to_string(&public_path).ok().as_deref() != Some(public_text.as_str()) {
                    let _ = fs::remove_file(&public_path);
                    create_file(&public_path, &public_text, 0o644)?;
                }
                return Ok(Self { secret, public });
            }
            let secret = signing::SecretKey::generate(&unique_key_name()).map_err(|err| {
                KeyError::Malformed {
                    path: secret_path.clone(),
                    kind: "Nix signing secret key",
                    reason: err.to_string(),
                }
            })?;
            create_file(&secret_path, &format!("{secret}\n"), 0o600)?;
        }
    }
}

/// `drv-thru-<host>-<8 random hex>`: readable in `trusted-public-keys`, and
/// unique even for builders that share a host name.
fn unique_key_name() -> String {
    let host: String = hostname()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let mut suffix = [0u8; 4];
    // An all-zero suffix still yields a valid, if less unique, name.
    let _ = getrandom::fill(&mut suffix);
    let host = if host.is_empty() {
        "builder".to_owned()
    } else {
        host
    };
    format!(
        "drv-thru-{host}-{}",
        data_encoding::HEXLOWER.encode(&suffix)
    )
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_private_endpoint_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/secret.key");
        let first = load_or_create_endpoint_key(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let second = load_or_create_endpoint_key(&path).unwrap();
        assert_eq!(first.public(), second.public());
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary files must not remain");
    }

    #[test]
    fn refuses_group_readable_secret_with_chmod_hint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        load_or_create_endpoint_key(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_or_create_endpoint_key(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600") && err.contains("0640"), "{err}");
    }

    #[test]
    fn refuses_a_secret_owned_by_another_user() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        load_or_create_endpoint_key(&path).unwrap();
        if std::os::unix::fs::chown(&path, Some(65534), None).is_err() {
            return crate::two_stores::skip("changing a file's owner needs root");
        }
        let err = load_or_create_endpoint_key(&path).unwrap_err();
        assert!(
            matches!(err, KeyError::NotOurs { owner: 65534, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_systemd_credential_may_show_group_bits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret-key");
        create_file(&path, "key\n", 0o440).unwrap();
        let credentials = Some(dir.path().as_os_str().to_owned());
        assert_eq!(
            read_private_among(&path, credentials).unwrap().as_deref(),
            Some("key\n")
        );
        assert!(matches!(
            read_private_among(&path, None),
            Err(KeyError::TooOpen { mode: 0o440, .. })
        ));
        let elsewhere = Some(std::ffi::OsString::from("/run/credentials/other"));
        assert!(read_private_among(&path, elsewhere).is_err());
    }

    #[test]
    fn rejects_malformed_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        create_file(&path, "not a key\n", 0o600).unwrap();
        let err = load_or_create_endpoint_key(&path).unwrap_err();
        assert!(matches!(err, KeyError::Malformed { .. }), "{err}");
    }

    #[test]
    fn signing_keys_get_unique_names_and_public_file() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SigningKeyFiles::load_or_create(dir.path()).unwrap();
        let public_text = fs::read_to_string(dir.path().join("signing-public.key")).unwrap();
        assert_eq!(public_text.trim(), keys.public.to_string());
        assert!(public_text.starts_with("drv-thru-"), "{public_text}");
        let mode = |name: &str| fs::metadata(dir.path().join(name)).unwrap().mode() & 0o777;
        assert_eq!(mode("signing-secret.key"), 0o600);
        assert_eq!(mode("signing-public.key"), 0o644);

        let again = SigningKeyFiles::load_or_create(dir.path()).unwrap();
        assert_eq!(again.public.to_string(), keys.public.to_string());
        let other = tempfile::tempdir().unwrap();
        let other_keys = SigningKeyFiles::load_or_create(other.path()).unwrap();
        assert_ne!(other_keys.public.name(), keys.public.name());
    }

    #[test]
    fn ticket_secrets_depend_on_key_and_id() {
        let key = TicketKey::from_bytes([7; 32]);
        assert_eq!(key.bearer_secret("a"), key.bearer_secret("a"));
        assert_ne!(key.bearer_secret("a"), key.bearer_secret("b"));
        assert_ne!(
            TicketKey::from_bytes([8; 32]).bearer_secret("a"),
            key.bearer_secret("a")
        );
        assert_eq!(format!("{key:?}"), "TicketKey([redacted])");
    }
}
