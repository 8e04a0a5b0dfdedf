//! Questions about store paths, asked together on one connection.

use std::collections::{BTreeMap, BTreeSet};

use super::daemon::{Connection, Failure};
use super::{NixCmdError, PathInfo};
use crate::nix::store_path::StorePath;

/// Questions about store paths asked together on one connection to the store, from
/// [`super::Nix::questions`]: each costs a round trip to a Nix process that is already running.
///
/// Nix answers from what it saw when it first looked at a path, for the life of the connection,
/// so take one for the questions of one moment and drop it: a path added meanwhile by someone
/// else may still be reported missing. After a failed question the connection is gone and every
/// later one fails too.
pub struct Questions {
    connection: Option<Connection>,
}

impl Questions {
    pub(super) fn new(connection: Connection) -> Self {
        Self {
            connection: Some(connection),
        }
    }

    /// The given paths that are not valid in the store, in the order given (`QueryValidPaths`).
    pub async fn invalid_paths(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<StorePath>, NixCmdError> {
        let valid = self
            .ask(async |connection| connection.valid_paths(paths).await)
            .await?;
        Ok(paths
            .iter()
            .filter(|p| !valid.contains(p))
            .cloned()
            .collect())
    }

    /// What the store knows about the given paths: hashes, sizes, references, deriver, content
    /// address and signatures (`QueryPathInfo`). Paths that are not valid are left out; the rest
    /// come in the order given.
    pub async fn path_info(&mut self, paths: &[StorePath]) -> Result<Vec<PathInfo>, NixCmdError> {
        let infos = self
            .ask(async |connection| connection.path_infos(paths).await)
            .await?;
        Ok(infos.into_iter().flatten().collect())
    }

    /// What the store knows about the given valid paths and everything they refer to, directly
    /// or not, sorted by path: a round of `QueryPathInfo` for each level of references. For a
    /// `.drv` this is the other `.drv` files and sources it needs, not outputs. Fails if a path
    /// is not valid.
    pub async fn closure_infos(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<PathInfo>, NixCmdError> {
        self.ask(async |connection| {
            let mut closure = BTreeMap::new();
            let mut next: BTreeSet<StorePath> = paths.iter().cloned().collect();
            while !next.is_empty() {
                let round: Vec<StorePath> = std::mem::take(&mut next).into_iter().collect();
                let infos = connection.path_infos(&round).await?;
                for (path, info) in round.into_iter().zip(infos) {
                    let info = info.ok_or_else(|| Failure::NotValid(path.clone()))?;
                    next.extend(info.references.iter().cloned());
                    closure.insert(path, info);
                }
                next.retain(|p| !closure.contains_key(p));
            }
            Ok(closure.into_values().collect())
        })
        .await
    }

    /// Runs `question` on the connection; a failure ends the connection with Nix's last words.
    async fn ask<T>(
        &mut self,
        question: impl AsyncFnOnce(&mut Connection) -> Result<T, Failure>,
    ) -> Result<T, NixCmdError> {
        let Some(connection) = self.connection.as_mut() else {
            return Err(NixCmdError::InvalidArgument(
                "a question on a connection to the store that an earlier one broke".to_owned(),
            ));
        };
        match question(connection).await {
            Ok(answer) => Ok(answer),
            Err(failure) => {
                let connection = self.connection.take().expect("checked above");
                Err(connection.fail(failure).await)
            }
        }
    }
}

impl Drop for Questions {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            connection.close();
        }
    }
}
