//! Calling the import helper from the CLI, with errors that say what to do.

use std::path::{Path, PathBuf};

use thiserror::Error;
use tonic::{Code, Status, transport::Channel};

use super::{DEFAULT_SOCKET, SOCKET_ENV, error::CALLER_NOT_ALLOWED};
use crate::{
    nix::{signing::PublicKey, store_path::StorePath},
    proto::{
        CheckKeyRequest, ImportRequest, ImportResponse, REFUSAL_METADATA, import_helper_client,
    },
    transport,
};

/// Why the helper cannot be used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HelperClientError {
    /// Nothing at the socket path.
    #[error(
        "no import helper runs on this machine ({} does not exist); \
         enable services.drv-thru.client.ticketHelper",
        .path.display()
    )]
    Missing {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket (or the helper) refuses this user.
    #[error(
        "you may not use the import helper at {}: join its group \
         (services.drv-thru.client.ticketHelper.group) and log in again",
        .path.display()
    )]
    NotAllowed {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket exists but does not answer.
    #[error("the import helper at {} does not answer", .path.display())]
    Unreachable {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The helper refused or failed the call.
    #[error("the import helper: {}", .0.message())]
    Refused(Status),
    /// The helper's answer ended early.
    #[error("the import helper stopped after {done} of {total} paths")]
    Incomplete {
        /// Paths imported.
        done: u32,
        /// Paths asked for.
        total: u32,
    },
}

/// Where the helper's socket is: `$DRV_THRU_IMPORT_HELPER_SOCKET`, or
/// [`DEFAULT_SOCKET`].
pub fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET_ENV)
        .filter(|path| !path.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from)
}

/// A connection to the import helper.
#[derive(Debug, Clone)]
pub struct HelperClient {
    path: PathBuf,
    client: import_helper_client::ImportHelperClient<Channel>,
}

impl HelperClient {
    /// Connects to the helper's socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, HelperClientError> {
        let channel = transport::unix::connect(path).await.map_err(|source| {
            let path = path.to_owned();
            match source.kind() {
                std::io::ErrorKind::NotFound => HelperClientError::Missing { path },
                std::io::ErrorKind::PermissionDenied => HelperClientError::NotAllowed { path },
                _ => HelperClientError::Unreachable { path, source },
            }
        })?;
        Ok(Self {
            path: path.to_owned(),
            client: import_helper_client::ImportHelperClient::new(channel),
        })
    }

    /// Whether the helper would import outputs signed by `key`.
    pub async fn check_key(&mut self, key: &PublicKey) -> Result<bool, HelperClientError> {
        let request = CheckKeyRequest {
            builder_public_key: key.to_string(),
        };
        match self.client.check_key(request).await {
            Ok(response) => Ok(response.into_inner().allowlisted),
            Err(status) => Err(self.refused(status)),
        }
    }

    /// Imports `paths` (and their closures) from the loopback cache at
    /// `url`, trusting only `key`; `progress` sees every report.
    pub async fn import(
        &mut self,
        key: &PublicKey,
        url: &str,
        paths: &[StorePath],
        mut progress: impl FnMut(&ImportResponse),
    ) -> Result<(), HelperClientError> {
        let request = ImportRequest {
            builder_public_key: key.to_string(),
            cache_url: url.to_owned(),
            store_paths: paths.iter().map(ToString::to_string).collect(),
        };
        let mut stream = match self.client.import(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Err(self.refused(status)),
        };
        let mut last = None;
        loop {
            match stream.message().await {
                Ok(Some(report)) => {
                    progress(&report);
                    last = Some(report);
                }
                Ok(None) => break,
                Err(status) => return Err(self.refused(status)),
            }
        }
        match last {
            Some(report) if report.paths_done == report.paths_total => Ok(()),
            report => Err(HelperClientError::Incomplete {
                done: report.as_ref().map_or(0, |r| r.paths_done),
                total: report.map_or(paths.len() as u32, |r| r.paths_total),
            }),
        }
    }

    fn refused(&self, status: Status) -> HelperClientError {
        match status.code() {
            // The helper's own check of the caller (the socket's mode let
            // the connection through).
            Code::PermissionDenied
                if status
                    .metadata()
                    .get(REFUSAL_METADATA)
                    .is_some_and(|reason| reason == CALLER_NOT_ALLOWED) =>
            {
                HelperClientError::NotAllowed {
                    path: self.path.clone(),
                }
            }
            Code::Unavailable => HelperClientError::Unreachable {
                path: self.path.clone(),
                source: std::io::Error::other(status.message().to_owned()),
            },
            _ => HelperClientError::Refused(status),
        }
    }
}
