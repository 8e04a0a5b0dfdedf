//! Whose outputs may enter the local store, and by which route: the client
//! side of the README's trust rules.
//!
//! The route is decided before a session is opened, so a build whose
//! outputs could not be imported costs no ticket use and no upload. The
//! decision itself ([`ImportRoute::decide`]) is pure; [`OutputImport`] adds
//! what it needs from the machine (the import helper's connection).

use std::path::Path;

use anyhow::{Context, bail};

use crate::{
    helper::{self, client::HelperClient},
    nix::signing::PublicKey,
    nixcmd::{Nix, TrustInfo},
};

/// How the builder's outputs get into the local store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportRoute {
    /// Nix trusts the configured key already: a plain `nix copy`.
    NixTrustsKey,
    /// The user is a trusted Nix user: `nix copy` trusting the configured
    /// key for this copy only.
    TrustedUser(PublicKey),
    /// Neither: the root import helper, which must have the key on its
    /// allowlist.
    Helper(PublicKey),
    /// No key is configured (`--server`): the key the builder announces is
    /// accepted only if Nix trusts it already, checked once the session is
    /// open and still before anything is uploaded.
    AnnouncedKeyIfNixTrusts,
}

impl ImportRoute {
    /// The route for outputs signed with `configured`, the key a ticket or a
    /// builders.json entry names (none with `--server`), given whom the local
    /// Nix trusts. A key the builder merely announces is never trusted for
    /// that alone.
    pub fn decide(trust: &TrustInfo, configured: Option<&PublicKey>) -> Self {
        match configured {
            None => Self::AnnouncedKeyIfNixTrusts,
            Some(key) if trust.trusts_key(key) => Self::NixTrustsKey,
            Some(key) if trust.trusted_user => Self::TrustedUser(key.clone()),
            Some(key) => Self::Helper(key.clone()),
        }
    }
}

/// A decided route, with the import helper's connection when it takes
/// that route.
#[derive(Debug)]
pub enum OutputImport {
    /// `nix copy` as this user, trusting this key for the copy (or nothing
    /// more when Nix already trusts the builder's key).
    Direct(Option<PublicKey>),
    /// Through the import helper, which has this key on its allowlist.
    Helper(Box<HelperClient>, PublicKey),
    /// Plain `nix copy`, provided [`Self::accept_announced`] accepts the key
    /// the builder announces.
    IfNixTrustsAnnounced(TrustInfo),
}

impl OutputImport {
    /// Asks Nix whom it trusts and decides the route for outputs signed with
    /// `configured`; on the helper's route, checks that the helper runs and
    /// has the key on its allowlist.
    pub async fn prepare(nix: &Nix, configured: Option<&PublicKey>) -> anyhow::Result<Self> {
        let trust = nix.trust().await.context("asking Nix whom it trusts")?;
        Ok(match ImportRoute::decide(&trust, configured) {
            ImportRoute::AnnouncedKeyIfNixTrusts => Self::IfNixTrustsAnnounced(trust),
            ImportRoute::NixTrustsKey => Self::Direct(None),
            ImportRoute::TrustedUser(key) => Self::Direct(Some(key)),
            ImportRoute::Helper(key) => {
                let helper = connect_helper(&helper::client::socket_path(), &key).await?;
                Self::Helper(Box::new(helper), key)
            }
        })
    }

    /// Refuses the session's `announced` signing key unless this route may
    /// import what it signs. Only a route without a configured key depends
    /// on it, and then only Nix's own trusted keys can vouch for it.
    pub fn accept_announced(&self, announced: &str) -> anyhow::Result<()> {
        let Self::IfNixTrustsAnnounced(trust) = self else {
            return Ok(());
        };
        let trusted = announced
            .parse::<PublicKey>()
            .is_ok_and(|key| trust.trusts_key(&key));
        if !trusted {
            bail!(
                "the builder signs with {announced:?}, which your Nix does not trust, and no key \
                 is configured for it here; build with a ticket, give the builder a builders.json \
                 entry with \"public_key\", or add the key to nix.settings.trusted-public-keys"
            );
        }
        Ok(())
    }

    /// The key the outputs must be signed with, if Nix is not to decide.
    pub fn required_key(&self) -> Option<&PublicKey> {
        match self {
            Self::Direct(key) => key.as_ref(),
            Self::Helper(_, key) => Some(key),
            Self::IfNixTrustsAnnounced(_) => None,
        }
    }
}

/// The connection to the import helper at `socket`, once it has said it
/// accepts `key`.
async fn connect_helper(socket: &Path, key: &PublicKey) -> anyhow::Result<HelperClient> {
    let untrusted = format!(
        "your Nix does not trust the builder's key {key} and you are not a trusted Nix user, so \
         the outputs can only be imported through the drv-thru import helper"
    );
    let mut helper = HelperClient::connect(socket)
        .await
        .with_context(|| untrusted.clone())?;
    if !helper
        .check_key(key)
        .await
        .with_context(|| untrusted.clone())?
    {
        bail!(
            "{untrusted}, but the key is not on its allowlist; add it to \
             services.drv-thru.client.ticketHelper.trustedBuilderPublicKeys (or \
             nix.settings.trusted-public-keys) on this machine"
        );
    }
    tracing::debug!(socket = %socket.display(), "outputs will be imported through the import helper");
    Ok(helper)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{nix::signing::SecretKey, nixcmd::TrustBasis};

    fn key(name: &str) -> PublicKey {
        SecretKey::generate(name)
            .expect("a valid key name")
            .to_public()
    }

    fn trust(trusted_user: bool, keys: &[&PublicKey]) -> TrustInfo {
        TrustInfo {
            trusted_user,
            basis: TrustBasis::NotTrusted,
            trusted_public_keys: keys.iter().map(ToString::to_string).collect(),
            require_sigs: true,
        }
    }

    fn without_helper(announced: &str, trust: TrustInfo) -> anyhow::Result<()> {
        OutputImport::IfNixTrustsAnnounced(trust).accept_announced(announced)
    }

    #[test]
    fn a_configured_key_nix_trusts_is_imported_by_a_plain_copy() {
        let builder = key("builder-1");
        for trusted_user in [false, true] {
            assert_eq!(
                ImportRoute::decide(&trust(trusted_user, &[&builder]), Some(&builder)),
                ImportRoute::NixTrustsKey
            );
        }
    }

    #[test]
    fn a_trusted_user_imports_with_the_configured_key_trusted_for_the_copy() {
        let builder = key("builder-1");
        assert_eq!(
            ImportRoute::decide(&trust(true, &[]), Some(&builder)),
            ImportRoute::TrustedUser(builder)
        );
    }

    #[test]
    fn anyone_else_goes_through_the_import_helper() {
        let builder = key("builder-1");
        assert_eq!(
            ImportRoute::decide(&trust(false, &[]), Some(&builder)),
            ImportRoute::Helper(builder)
        );
    }

    #[test]
    fn a_key_of_the_same_name_with_other_bytes_is_not_nix_trusted() {
        let builder = key("builder-1");
        let impostor = key("builder-1");
        assert_eq!(
            ImportRoute::decide(&trust(false, &[&impostor]), Some(&builder)),
            ImportRoute::Helper(builder)
        );
    }

    #[test]
    fn without_a_configured_key_only_an_announced_key_nix_trusts_is_accepted() {
        let builder = key("builder-1");
        assert_eq!(
            ImportRoute::decide(&trust(true, &[&builder]), None),
            ImportRoute::AnnouncedKeyIfNixTrusts
        );
        without_helper(&builder.to_string(), trust(false, &[&builder])).unwrap();
    }

    #[test]
    fn an_announced_key_nix_does_not_trust_is_refused_even_for_a_trusted_user() {
        let builder = key("builder-1");
        let err = without_helper(&builder.to_string(), trust(true, &[])).unwrap_err();
        assert!(
            err.to_string().contains("which your Nix does not trust"),
            "{err}"
        );
        let err = without_helper("not a key", trust(true, &[&builder])).unwrap_err();
        assert!(err.to_string().contains("\"not a key\""), "{err}");
    }

    #[tokio::test]
    async fn the_helper_route_without_a_helper_says_how_to_get_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = connect_helper(&dir.path().join("absent.sock"), &key("builder-1"))
            .await
            .unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains("you are not a trusted Nix user"),
            "{message}"
        );
        assert!(
            message.contains("enable services.drv-thru.client.ticketHelper"),
            "{message}"
        );
    }

    /// An import helper serving `allowed` on a socket in `dir`.
    fn serve_helper(dir: &Path, allowed: &PublicKey) -> std::path::PathBuf {
        use crate::{
            helper::{
                allowlist::{Allowlist, SharedAllowlist},
                service::ImportHelperService,
            },
            proto::import_helper_server::ImportHelperServer,
            transport,
        };
        let socket = dir.join("helper.sock");
        let list = Allowlist::parse(&format!("{allowed}\n"), &dir.join("keys")).unwrap();
        let service =
            ImportHelperService::new(std::sync::Arc::new(SharedAllowlist::new(list)), Nix::new());
        let (listener, socket_file) = transport::unix::bind(&socket, 0o600, None).unwrap();
        tokio::spawn(async move {
            let _socket_file = socket_file;
            tonic::transport::Server::builder()
                .add_service(ImportHelperServer::new(service))
                .serve_with_incoming(transport::unix::incoming(listener))
                .await
        });
        socket
    }

    #[tokio::test]
    async fn the_helper_route_needs_the_key_on_the_helpers_allowlist() {
        let dir = tempfile::tempdir().unwrap();
        let builder = key("builder-1");
        let socket = serve_helper(dir.path(), &builder);
        connect_helper(&socket, &builder).await.unwrap();
        let err = connect_helper(&socket, &key("builder-2"))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("but the key is not on its allowlist; add it to"),
            "{err}"
        );
    }

    #[test]
    fn a_configured_route_ignores_what_the_builder_announces() {
        let builder = key("builder-1");
        OutputImport::Direct(Some(builder.clone()))
            .accept_announced("anything")
            .unwrap();
        assert_eq!(
            OutputImport::Direct(Some(builder.clone())).required_key(),
            Some(&builder)
        );
        assert_eq!(OutputImport::Direct(None).required_key(), None);
    }
}
