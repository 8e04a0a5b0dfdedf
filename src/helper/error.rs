//! Why the helper refuses or fails a call, and the one place that maps it to
//! a gRPC status.

use thiserror::Error;
use tonic::{Code, Status, metadata::MetadataValue};

use super::MAX_PATHS;
use crate::{nixcmd::NixCmdError, proto::REFUSAL_METADATA};

/// Longest piece of caller input quoted back in a message.
const SHOWN_INPUT: usize = 120;

/// Longest piece of Nix's error text passed on to the caller.
const SHOWN_NIX_ERROR: usize = 2000;

/// A refused or failed helper call.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HelperError {
    /// The builder key is not a Nix public key written exactly.
    #[error("invalid builder public key {}: {reason}", shown(.key))]
    InvalidKey {
        /// The key as given (shortened).
        key: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The key (written out) is well-formed but not allowlisted.
    #[error(
        "builder key {0} is not in this machine's import helper allowlist \
         (services.drv-thru.client.ticketHelper.trustedBuilderPublicKeys)"
    )]
    KeyNotAllowed(String),
    /// The cache URL is not a loopback HTTP URL of the one accepted form.
    #[error(
        "invalid cache URL {}: it must be http://127.0.0.1:PORT or http://[::1]:PORT, nothing else",
        shown(.0)
    )]
    InvalidUrl(String),
    /// A store path is not written exactly as Nix writes store paths.
    #[error("invalid store path {}: {reason}", shown(.path))]
    InvalidPath {
        /// The path as given.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The request names no paths.
    #[error("no store paths to import")]
    NoPaths,
    /// The request names more paths than one request may.
    #[error("{0} store paths requested; at most {MAX_PATHS} per request")]
    TooManyPaths(usize),
    /// The caller is not root, the helper's user or in the helper's group.
    #[error(
        "uid {uid} may not use the import helper: only root and members of its group{group} may; \
         join the group (services.drv-thru.client.ticketHelper.group) and log in again"
    )]
    CallerNotAllowed {
        /// The caller's uid.
        uid: u32,
        /// ` "name"` of the group, or empty.
        group: String,
    },
    /// `nix copy` (or the check after it) failed; the text is Nix's.
    #[error("import failed: {0}")]
    ImportFailed(String),
}

impl HelperError {
    /// The error for a failed Nix command, with the end of Nix's own error
    /// text rather than the whole command line.
    pub fn import_failed(err: &NixCmdError) -> Self {
        let text = match err {
            NixCmdError::Failed { stderr, .. } if !stderr.is_empty() => stderr.clone(),
            other => other.to_string(),
        };
        Self::ImportFailed(tail(&text, SHOWN_NIX_ERROR).to_owned())
    }

    /// The gRPC status the caller gets.
    pub fn to_status(&self) -> Status {
        let code = match self {
            Self::InvalidKey { .. }
            | Self::InvalidUrl(_)
            | Self::InvalidPath { .. }
            | Self::NoPaths
            | Self::TooManyPaths(_) => Code::InvalidArgument,
            Self::KeyNotAllowed(_) | Self::CallerNotAllowed { .. } => Code::PermissionDenied,
            Self::ImportFailed(_) => Code::Aborted,
        };
        let mut status = Status::new(code, self.to_string());
        if let Some(reason) = self.refusal() {
            status
                .metadata_mut()
                .insert(REFUSAL_METADATA, MetadataValue::from_static(reason));
        }
        status
    }

    /// The stable reason, in the `drvthru-refusal` metadata, of a refusal
    /// a client acts on.
    fn refusal(&self) -> Option<&'static str> {
        match self {
            Self::KeyNotAllowed(_) => Some(KEY_NOT_ALLOWLISTED),
            Self::CallerNotAllowed { .. } => Some(CALLER_NOT_ALLOWED),
            _ => None,
        }
    }
}

/// Refusal reason: the key is not allowlisted.
pub const KEY_NOT_ALLOWLISTED: &str = "key-not-allowlisted";

/// Refusal reason: the caller is not root, the helper's user or in its group.
pub const CALLER_NOT_ALLOWED: &str = "caller-not-allowed";

/// `s` quoted, shortened to [`SHOWN_INPUT`] characters.
fn shown(s: &str) -> String {
    match s.char_indices().nth(SHOWN_INPUT) {
        Some((end, _)) => format!("{:?}…", &s[..end]),
        None => format!("{s:?}"),
    }
}

/// The last `max` bytes of `s`, cut at a character boundary.
fn tail(s: &str, max: usize) -> &str {
    let s = s.trim();
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_by_kind() {
        let code = |e: HelperError| e.to_status().code();
        assert_eq!(code(HelperError::NoPaths), Code::InvalidArgument);
        assert_eq!(
            code(HelperError::InvalidUrl("x".into())),
            Code::InvalidArgument
        );
        assert_eq!(
            code(HelperError::CallerNotAllowed {
                uid: 1,
                group: String::new()
            }),
            Code::PermissionDenied
        );
        let status = HelperError::CallerNotAllowed {
            uid: 1,
            group: String::new(),
        }
        .to_status();
        assert_eq!(
            status.metadata().get(REFUSAL_METADATA).unwrap(),
            CALLER_NOT_ALLOWED
        );
        assert_eq!(code(HelperError::ImportFailed("x".into())), Code::Aborted);
    }

    #[test]
    fn messages_stay_bounded() {
        let long = "é".repeat(1 << 20);
        let message = HelperError::InvalidUrl(long.clone()).to_string();
        assert!(message.len() < 500, "{}", message.len());
        let failed = HelperError::import_failed(&NixCmdError::Failed {
            command: "nix copy".into(),
            status: "exited with code 1".into(),
            stderr: format!("{long}\nerror: the last line"),
        });
        let message = failed.to_string();
        assert!(message.len() <= SHOWN_NIX_ERROR + 20);
        assert!(message.ends_with("error: the last line"));
    }
}
