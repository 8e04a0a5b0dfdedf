//! One remote build, from an evaluated derivation to its outputs in the
//! local store: connect, decide how the outputs will be imported, open a
//! session, upload what the builder lacks, build, import.
//!
//! Whoever drives it (the `build` command today) shows progress and logs
//! through an [`Observer`] and decides what a signal interrupts; this module
//! decides nothing about the terminal.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::Path,
};

use anyhow::{Context, anyhow, bail};
use tokio::sync::OnceCell;

use super::{
    BuilderChannel, Connection, Target, bind,
    cache_proxy::CacheProxy,
    dial,
    link::{CompressMode, LinkPolicy},
    session::{self, RemoteSession},
    trust::OutputImport,
};
use crate::{
    nix::{signing::PublicKey, store_path::StorePath},
    nixcmd::{EvalFlags, Evaluated, Nix, NixCmdError, PathInfo, Questions},
    proto::{self, BuildResult, build_response::Event},
    transport::endpoint::RelayChoice,
};

/// Parallel streams on a long path unless the caller says: four 1.25 MB
/// QUIC windows in flight carry about 100 MiB/s at 50 ms round trip.
const LONG_PATH_STREAMS: usize = 4;

/// Evaluates `installable` with the local Nix, which must name exactly one
/// derivation.
pub async fn evaluate(
    nix: &Nix,
    installable: &str,
    flags: &EvalFlags,
) -> anyhow::Result<Evaluated> {
    let evaluated = nix
        .evaluate(installable, flags)
        .await
        .context("evaluating locally")?;
    <[_; 1]>::try_from(evaluated)
        .map(|[one]| one)
        .map_err(|all| {
            anyhow!(
                "{installable} evaluates to {} derivations; name one",
                all.len()
            )
        })
}

/// Whether every output of `evaluated` is valid in the local store already.
pub async fn outputs_valid(
    questions: &mut Questions,
    evaluated: &Evaluated,
) -> anyhow::Result<bool> {
    let outputs: Vec<StorePath> = evaluated.outputs.values().cloned().collect();
    Ok(questions.invalid_paths(&outputs).await?.is_empty())
}

/// What to build: the derivation, the outputs asked for, and the
/// derivation's closure as the local store describes it.
#[derive(Debug)]
pub struct Plan {
    /// The derivation.
    pub drv: StorePath,
    /// The outputs to import, by name.
    pub outputs: BTreeMap<String, StorePath>,
    /// The derivation's closure, offered to the builder as inputs.
    pub inputs: Vec<PathInfo>,
    /// Paths built elsewhere that the local store holds with signatures:
    /// outputs of the closure's derivations and the signed paths they refer
    /// to. Offered to the builder, which takes those signed by a key it
    /// trusts instead of building them.
    pub signed: Vec<PathInfo>,
}

impl Plan {
    /// The plan to build `drv` for `outputs`: its closure, and the paths
    /// built elsewhere that may save building some of it, as the local
    /// store answers `questions`.
    pub async fn read(
        nix: &Nix,
        questions: &mut Questions,
        drv: StorePath,
        outputs: BTreeMap<String, StorePath>,
    ) -> anyhow::Result<Self> {
        let inputs = questions
            .closure_infos(std::slice::from_ref(&drv))
            .await
            .with_context(|| format!("reading the closure of {drv} from the local store"))?;
        let signed = built_elsewhere(nix, questions, &drv, &inputs).await;
        Ok(Self {
            drv,
            outputs,
            inputs,
            signed,
        })
    }
}

/// How a remote build may be run.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildOptions {
    /// Build again on the builder and compare, as `nix build --rebuild`.
    pub rebuild: bool,
    /// QUIC streams for bulk transfers; by the path's round-trip time if
    /// `None`.
    pub bulk_streams: Option<usize>,
    /// Whether bulk transfers are compressed.
    pub compress: CompressMode,
}

/// How a remote build ended, short of an error.
#[derive(Debug)]
pub enum Outcome {
    /// Built and imported: the outputs asked for, by name.
    Built(BTreeMap<String, StorePath>),
    /// The build failed on the builder, with its message.
    Failed(String),
}

/// What a remote build reports to whoever drives it, as it goes.
pub trait Observer {
    /// `count` missing inputs of `bytes` in all are about to be uploaded;
    /// the function returned is called with the bytes sent so far.
    fn uploading(&mut self, count: usize, bytes: u64) -> impl Fn(u64) + Send + 'static;

    /// The upload has ended.
    fn uploaded(&mut self);

    /// An event of the running build (all but the final one).
    fn build_event(&mut self, event: Event) -> impl Future<Output = ()>;

    /// The build's events have ended.
    fn build_ended(&mut self) -> impl Future<Output = ()>;

    /// The outputs are about to be imported through the import helper; the
    /// function returned is called with paths done, paths in all and bytes
    /// received so far.
    fn importing_through_helper(&mut self) -> impl Fn(u64, u64, u64) + Send + 'static;

    /// The import through the helper has ended.
    fn imported_through_helper(&mut self);
}

/// Connects to `target` from the endpoint in `endpoint` (bound here with
/// `relay` and the client key at `key_file`). Nothing in it needs the
/// derivation, so it can run while Nix evaluates. The caller owns
/// `endpoint` and closes it if this fails.
pub async fn contact(
    target: &Target,
    endpoint: &OnceCell<iroh::Endpoint>,
    relay: RelayChoice,
    key_file: Option<&Path>,
) -> anyhow::Result<Connection> {
    let endpoint = endpoint.get_or_try_init(|| bind(relay, key_file)).await?;
    dial(endpoint, target).await
}

/// A build ready to be sent to a connected builder: everything that may
/// still refuse it before a session is opened has been checked.
#[derive(Debug)]
pub struct RemoteBuild {
    import: OutputImport,
    connection: Connection,
    plan: Plan,
}

impl RemoteBuild {
    /// The build of `plan` on the builder at the other end of `connection`,
    /// once it is decided how its outputs will be imported: a refusal here
    /// costs no ticket use and no upload.
    pub async fn prepare(
        nix: &Nix,
        target: &Target,
        connection: Connection,
        plan: Plan,
    ) -> anyhow::Result<Self> {
        let import = OutputImport::prepare(nix, target.trusted_signing_key()).await?;
        Ok(Self {
            import,
            connection,
            plan,
        })
    }

    /// What is to be built.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Opens a session, uploads the inputs the builder lacks, builds, and
    /// imports the outputs asked for. Dropping the future kills its Nix
    /// processes and removes its files; the builder cancels the session
    /// once the connection is closed.
    pub async fn run(
        &mut self,
        nix: &Nix,
        options: BuildOptions,
        observer: &mut impl Observer,
    ) -> anyhow::Result<Outcome> {
        let import = &self.import;
        let built = build_in_session(
            &self.connection,
            nix,
            &self.plan,
            options,
            observer,
            |key| import.accept_announced(key),
        )
        .await?;
        if built.finished.result() != BuildResult::Succeeded {
            return Ok(Outcome::Failed(built.finished.message));
        }
        let outputs = built.requested_outputs(&self.plan)?;
        self.import(nix, built, &outputs, observer).await?;
        Ok(Outcome::Built(outputs))
    }

    /// Imports `outputs` of a successful build into the local store by the
    /// route decided in [`Self::prepare`].
    async fn import(
        &mut self,
        nix: &Nix,
        built: SessionBuild,
        outputs: &BTreeMap<String, StorePath>,
        observer: &mut impl Observer,
    ) -> anyhow::Result<()> {
        let import = &mut self.import;
        let proxy = CacheProxy::start(
            built.bulk,
            built.width,
            built.link,
            built.session.id.clone(),
            import.required_key().cloned(),
            nix.clone(),
        )
        .context("starting the loopback cache")?;
        let paths: Vec<StorePath> = outputs.values().cloned().collect();
        match import {
            OutputImport::Helper(helper, key) => {
                let report = observer.importing_through_helper();
                let imported = helper
                    .import(key, &proxy.url(), &paths, |step| {
                        report(
                            step.paths_done.into(),
                            step.paths_total.into(),
                            proxy.bytes_received(),
                        )
                    })
                    .await;
                observer.imported_through_helper();
                imported.context("importing the outputs through the import helper")?;
            }
            OutputImport::Direct(_) | OutputImport::IfNixTrustsAnnounced(_) => {
                let key = import.required_key();
                if !import_spooled(nix, &proxy, &paths, key).await {
                    nix.copy_from(&proxy.url(), &paths, key, true)
                        .await
                        .context("importing the outputs into the local store")?;
                }
            }
        }
        tracing::info!(bytes = proxy.bytes_received(), "outputs imported");
        Ok(())
    }

    /// Closes the connection, telling the builder we are gone.
    pub async fn close(self) {
        self.connection.close().await;
    }
}

/// A build that ran in an open session; its outputs, if any, are still on
/// the builder, served by its `Cache` service under the session's id.
#[derive(Debug)]
pub struct SessionBuild {
    /// The session.
    pub session: RemoteSession,
    /// Channels for bulk transfers, shared by the upload and the outputs.
    pub bulk: Vec<BuilderChannel>,
    /// How many of them a transfer should use.
    pub width: usize,
    /// Whether a transfer is compressed.
    pub link: LinkPolicy,
    /// How the build ended.
    pub finished: proto::BuildFinished,
}

impl SessionBuild {
    /// The outputs of `plan` the builder reported, by name; only those asked
    /// for, even if the derivation has more.
    pub fn requested_outputs(&self, plan: &Plan) -> anyhow::Result<BTreeMap<String, StorePath>> {
        let outputs: BTreeMap<String, StorePath> = session::outputs(&self.finished)?
            .into_iter()
            .filter(|(name, _)| plan.outputs.contains_key(name))
            .collect();
        if let Some(name) = plan
            .outputs
            .keys()
            .find(|name| !outputs.contains_key(*name))
        {
            bail!("the builder did not report the requested output {name:?}");
        }
        Ok(outputs)
    }
}

/// Opens a session for `plan` on `connection`, uploads the inputs the
/// builder lacks and builds, reporting to `observer`. `accept_key` judges
/// the signing key the builder announces, before anything is uploaded.
/// Imports nothing: the caller decides where the outputs go.
pub async fn build_in_session(
    connection: &Connection,
    nix: &Nix,
    plan: &Plan,
    options: BuildOptions,
    observer: &mut impl Observer,
    accept_key: impl FnOnce(&str) -> anyhow::Result<()>,
) -> anyhow::Result<SessionBuild> {
    let mut session = RemoteSession::open(
        connection.channel.clone(),
        &plan.drv,
        session::inputs(&plan.inputs),
        session::signed_inputs(&plan.signed),
    )
    .await?;
    accept_key(&session.announced_key)?;
    // The same streams carry the upload and, after the build, the outputs.
    let width = match options.bulk_streams {
        Some(n) => n,
        None => connection.bulk_width(LONG_PATH_STREAMS).await,
    };
    let bulk = connection.bulk_channels(width);
    let link = connection.link_policy(options.compress);
    if !session.missing.is_empty() {
        let bytes: u64 = plan
            .inputs
            .iter()
            .chain(&plan.signed)
            .filter(|info| session.missing.contains(&info.path))
            .map(|info| info.nar_size)
            .sum();
        let report = observer.uploading(session.missing.len(), bytes);
        let uploaded = session.upload(nix, bulk.clone(), &link, report).await;
        observer.uploaded();
        uploaded?;
    }
    let mut events = session.build(options.rebuild).await?;
    let finished = loop {
        match events.next().await {
            Ok(Event::Finished(finished)) => break Ok(finished),
            Ok(event) => observer.build_event(event).await,
            Err(err) => break Err(err),
        }
    };
    observer.build_ended().await;
    Ok(SessionBuild {
        session,
        bulk,
        width,
        link,
        finished: finished?,
    })
}

/// The outputs of the derivations in `closure` (but `drv`'s own) that the
/// local store holds with signatures, and the signed paths they refer to,
/// outside `closure`. Offering them is only a saving, so a failure to find
/// them offers none.
async fn built_elsewhere(
    nix: &Nix,
    questions: &mut Questions,
    drv: &StorePath,
    closure: &[PathInfo],
) -> Vec<PathInfo> {
    match signed_outputs(nix, questions, drv, closure).await {
        Ok(signed) => signed,
        Err(err) => {
            tracing::warn!("dependencies built elsewhere are not offered to the builder: {err}");
            Vec::new()
        }
    }
}

async fn signed_outputs(
    nix: &Nix,
    questions: &mut Questions,
    drv: &StorePath,
    closure: &[PathInfo],
) -> Result<Vec<PathInfo>, NixCmdError> {
    let drvs: Vec<StorePath> = closure
        .iter()
        .map(|info| &info.path)
        .filter(|path| path.is_derivation() && *path != drv)
        .cloned()
        .collect();
    if drvs.is_empty() {
        return Ok(Vec::new());
    }
    let outputs = nix.derivation_outputs(&drvs).await?;
    let signed: Vec<StorePath> = questions
        .path_info(&outputs)
        .await?
        .into_iter()
        .filter(|info| !info.signatures.is_empty())
        .map(|info| info.path)
        .collect();
    if signed.is_empty() {
        return Ok(Vec::new());
    }
    let in_closure: BTreeSet<&StorePath> = closure.iter().map(|info| &info.path).collect();
    Ok(questions
        .closure_infos(&signed)
        .await?
        .into_iter()
        .filter(|info| !info.signatures.is_empty() && !in_closure.contains(&info.path))
        .collect())
}

/// Imports the small outputs the proxy spools, if it does; whether that
/// imported all of `paths`. Whatever goes wrong here is left to the HTTP
/// cache, which can serve every path.
async fn import_spooled(
    nix: &Nix,
    proxy: &CacheProxy,
    paths: &[StorePath],
    key: Option<&PublicKey>,
) -> bool {
    let spool = match proxy.spool().await {
        Ok(Some(spool)) => spool,
        Ok(None) => return false,
        Err(err) => {
            tracing::debug!("small outputs not spooled: {err}");
            return false;
        }
    };
    match nix.copy_from(spool.url(), spool.roots(), key, true).await {
        Ok(()) => spool.holds_all(paths),
        Err(err) => {
            tracing::warn!(
                "importing the small outputs from files failed, so all go over HTTP: {err}"
            );
            false
        }
    }
}
