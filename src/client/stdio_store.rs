//! The remote store Nix's build hook talks to for a machine line
//! `ssh-ng://localhost?remote-program=…/drv-thru&remote-store=NAME`: Nix
//! starts `drv-thru --stdio --store NAME` and speaks its worker protocol
//! on stdin/stdout. This module answers it, translating the operations a
//! remote build uses into one builder's `drvthru.v1` calls:
//!
//! - the handshake runs while the builder is dialled; a builder that
//!   cannot be reached within [`REACH_WITHIN`] fails the handshake with one
//!   line, so Nix moves on to another machine;
//! - validity and path-info queries are answered from the local store,
//!   which is where the inputs are read from anyway (see [`Store::valid`]);
//! - uploads Nix offers are drained, not stored: the session uploads what
//!   the builder lacks, by the rules of `drv-thru build`;
//! - `BuildDerivation` and `BuildPathsWithResults` build in a session of
//!   their own, the builder's log arriving as Nix log frames;
//! - the outputs are served to Nix (`QueryPathInfo`, `NarFromPath`) from
//!   the builder's `Cache` service, only once every narinfo of the output
//!   closure is signed by the builder's configured key: Nix's hook imports
//!   them without checking signatures, so this is where trust is kept.
//!   The checked outputs are downloaded at once into a directory the hook's
//!   other connections serve them from too ([`shared`]).
//!
//! The end of stdin (Nix killed the hook or the connection's process, see
//! `drv-thru --stdio`'s stand-in) ends the program and with it the
//! connection, so the builder cancels a running build.

pub mod shared;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tonic::codec::CompressionEncoding;

use self::shared::{SHARED_DIR, SharedOutputs};
use super::{
    Connection, Target, bind, dial,
    link::{CompressMode, Direction},
    remote_build::{BuildOptions, Observer, Plan, SessionBuild, build_in_session},
    status_error,
};
use crate::{
    config::{self, SYSTEM_BUILDERS_FILE},
    nix::{drv::Derivation, narinfo::NarInfo, signing::PublicKey, store_path::StorePath},
    nixcmd::{self, Nix},
    proto::{self, build_response::Event, cache_client::CacheClient},
    transport::endpoint::RelayChoice,
    worker_protocol::{
        self as wire, BasicDerivation, BuildStatus, DerivedPath, Field, Reader, Version, WireError,
        Writer, op,
    },
};

/// How long reaching the builder may take before Nix is told to try
/// another machine: short enough that, with starting up, Nix hears within
/// 10 s.
pub const REACH_WITHIN: Duration = Duration::from_secs(8);

/// The version string the handshake reports as the store's Nix version.
const STORE_VERSION: &str = concat!("drv-thru ", env!("CARGO_PKG_VERSION"));

/// Serves Nix's worker protocol on `input`/`output` for the builder `name`
/// of the system's builders file ([`SYSTEM_BUILDERS_FILE`]), dialling it
/// with the machine key ([`config::MACHINE_KEY_FILE`]), and sharing outputs
/// with the other connections of Nix's build hook, process `hook`. Returns
/// when Nix closes the connection.
pub async fn serve(
    name: &str,
    hook: u32,
    relay: RelayChoice,
    input: impl AsyncRead + Unpin,
    output: impl AsyncWrite + Unpin,
) -> anyhow::Result<()> {
    let target = Target::system_builder(name)?;
    let key = target.trusted_signing_key().cloned().ok_or_else(|| {
        anyhow!(
            "builder {name:?} has no public_key in {SYSTEM_BUILDERS_FILE}; add it, since the outputs Nix imports through drv-thru are checked against it"
        )
    })?;
    let shared = SharedOutputs::open(Path::new(SHARED_DIR), hook)?;
    let endpoint = bind(relay, Some(Path::new(config::MACHINE_KEY_FILE))).await?;
    let served = Store::start(name, key, shared, &target, &endpoint, input, output).await;
    let served = match served {
        Ok(store) => store.run().await,
        Err(err) => Err(err),
    };
    endpoint.close().await;
    served
}

/// Dials `target`, within [`REACH_WITHIN`].
async fn reach(
    endpoint: &iroh::Endpoint,
    target: &Target,
    name: &str,
) -> anyhow::Result<Connection> {
    match tokio::time::timeout(REACH_WITHIN, dial(endpoint, target)).await {
        Ok(connection) => connection.with_context(|| format!("cannot reach builder {name:?}")),
        Err(_) => Err(anyhow!(
            "cannot reach builder {name:?}: no answer within {} s",
            REACH_WITHIN.as_secs()
        )),
    }
}

/// How an operation failed.
#[derive(Debug)]
enum Failure {
    /// Refused with a message for Nix; the connection goes on.
    Refused(anyhow::Error),
    /// The stream cannot go on: it is malformed, or broke mid-reply.
    Fatal(anyhow::Error),
    /// An operation this store does not implement; its arguments cannot be
    /// skipped, so the connection ends after telling Nix.
    Unsupported(u64),
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Self::Refused(err)
    }
}

impl From<nixcmd::NixCmdError> for Failure {
    fn from(err: nixcmd::NixCmdError) -> Self {
        Self::Refused(err.into())
    }
}

impl From<WireError> for Failure {
    fn from(err: WireError) -> Self {
        Self::Fatal(err.into())
    }
}

impl From<std::io::Error> for Failure {
    fn from(err: std::io::Error) -> Self {
        Self::Fatal(anyhow::Error::new(err).context("writing to Nix"))
    }
}

/// A built output served to Nix: its checked narinfo and its NAR's file.
#[derive(Debug)]
struct Served {
    narinfo: NarInfo,
    nar: PathBuf,
}

/// One connection from Nix.
struct Store<R, W> {
    reader: Reader<BufReader<R>>,
    out: BufWriter<W>,
    version: Version,
    name: String,
    key: PublicKey,
    nix: Nix,
    connection: Connection,
    /// Where the hook's connections keep the outputs they built.
    shared: SharedOutputs,
    /// The outputs of the hook's builds asked for here, checked.
    served: BTreeMap<StorePath, Served>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Store<R, W> {
    /// Shakes hands with Nix while dialling the builder.
    async fn start(
        name: &str,
        key: PublicKey,
        shared: SharedOutputs,
        target: &Target,
        endpoint: &iroh::Endpoint,
        input: R,
        output: W,
    ) -> anyhow::Result<Self> {
        let mut reader = Reader::new(BufReader::new(input));
        let mut out = BufWriter::new(output);
        // Reported as trusted: this program answers for the local store Nix
        // runs it from and uploads by its own rules, so Nix 2.18 and later
        // send `BuildDerivation` with the input closure as 2.8 always does.
        let (negotiated, connection) = tokio::join!(
            wire::accept(&mut reader, &mut out, STORE_VERSION, true),
            reach(endpoint, target, name),
        );
        let negotiated = negotiated.context("talking to Nix on stdin/stdout")?;
        let mut w = Writer::default();
        let connection = match connection {
            Ok(connection) => connection,
            Err(err) => {
                // Nix shows this as the reason it cannot build here; it
                // reaches stderr through the caller too.
                w.error(&format!("{err:#}"));
                let _ = w.send(&mut out).await;
                return Err(err);
            }
        };
        w.last().send(&mut out).await?;
        tracing::debug!(version = %negotiated.version, "Nix connected");
        Ok(Self {
            reader,
            out,
            version: negotiated.version,
            name: name.to_owned(),
            key,
            nix: Nix::builder().spare_connection().build(),
            connection,
            shared,
            served: BTreeMap::new(),
        })
    }

    /// Answers operations until Nix closes the connection.
    async fn run(mut self) -> anyhow::Result<()> {
        let result = loop {
            let code = match self.reader.u64().await {
                Ok(code) => code,
                Err(WireError::Eof) => break Ok(()),
                Err(err) => break Err(err.into()),
            };
            let mut w = Writer::default();
            match self.op(code).await {
                Ok(()) => {}
                Err(Failure::Refused(err)) => {
                    tracing::debug!("{} refused: {err:#}", op::name(code));
                    w.error(&format!("{err:#}")).send(&mut self.out).await?;
                }
                Err(Failure::Unsupported(code)) => {
                    let message = format!(
                        "drv-thru's store for builder {:?} does not support the operation {}",
                        self.name,
                        op::name(code)
                    );
                    let _ = w.error(&message).send(&mut self.out).await;
                    break Err(anyhow!(message));
                }
                Err(Failure::Fatal(err)) => break Err(err),
            }
        };
        self.shared.close();
        self.connection.close().await;
        result
    }

    /// A built output of this hook's, its narinfo checked again as it is
    /// read: the file is not this process's own.
    fn lookup(&mut self, path: &StorePath) -> anyhow::Result<Option<&Served>> {
        if !self.served.contains_key(path) {
            let Some((narinfo, nar)) = self.shared.find(path)? else {
                return Ok(None);
            };
            check_narinfo(&narinfo, &self.key, &self.name)?;
            self.served.insert(path.clone(), Served { narinfo, nar });
        }
        Ok(self.served.get(path))
    }

    async fn op(&mut self, code: u64) -> Result<(), Failure> {
        let mut w = Writer::default();
        match code {
            op::SET_OPTIONS => {
                wire::skip_options(&mut self.reader, self.version).await?;
                w.last();
            }
            op::IS_VALID_PATH => {
                let path = self.reader.path().await?;
                let valid = self.valid(std::slice::from_ref(&path)).await?;
                w.last().bool(!valid.is_empty());
            }
            op::QUERY_VALID_PATHS => {
                let paths = self.reader.paths().await?;
                // Whether the store may substitute: it may not, nothing to skip.
                self.reader.bool().await?;
                let valid = self.valid(&paths).await?;
                w.last().strings(valid.iter().map(ToString::to_string));
            }
            op::ADD_TEMP_ROOT => {
                self.reader.path().await?;
                w.last().u64(1);
            }
            op::QUERY_PATH_INFO => {
                let path = self.reader.path().await?;
                let info = self.path_info(&path).await?;
                w.last().bool(info.is_some());
                if let Some(info) = info {
                    info.write(&mut w);
                }
            }
            op::NAR_FROM_PATH => {
                let path = self.reader.path().await?;
                return self.nar_from_path(&path).await;
            }
            op::ADD_TO_STORE_NAR => {
                self.reader.path().await?;
                wire::PathInfo::read(&mut self.reader).await?;
                // Repair, dontCheckSigs.
                self.reader.u64().await?;
                self.reader.u64().await?;
                self.reader.drain_framed().await?;
                w.last();
            }
            op::ADD_MULTIPLE_TO_STORE => {
                self.reader.u64().await?;
                self.reader.u64().await?;
                self.reader.drain_framed().await?;
                w.last();
            }
            op::QUERY_REALISATION => {
                self.reader.string().await?;
                // None: only floating content-addressed outputs have them.
                w.last().u64(0);
            }
            op::BUILD_DERIVATION => {
                let drv = self.reader.path().await?;
                let basic = BasicDerivation::read(&mut self.reader).await?;
                // The build mode: a repair or check is the builder's to decide.
                self.reader.u64().await?;
                let outputs = basic
                    .outputs
                    .into_iter()
                    .map(|(name, output)| Ok((name, output_path(&drv, &output.path)?)))
                    .collect::<anyhow::Result<_>>()?;
                let result = self.build(drv, outputs).await?;
                w.last();
                result.write(&mut w, self.version);
            }
            op::BUILD_PATHS_WITH_RESULTS => {
                let targets = self.reader.strings().await?;
                self.reader.u64().await?;
                let mut results = Vec::new();
                for target in targets {
                    let result = self.build_target(&target.parse()?).await?;
                    results.push((target, result));
                }
                w.last().u64(results.len() as u64);
                for (target, result) in results {
                    w.string(&target);
                    result.write(&mut w, self.version);
                }
            }
            other => return Err(Failure::Unsupported(other)),
        }
        w.send(&mut self.out).await?;
        Ok(())
    }

    /// Which of `paths` this store has: the local store's valid paths, and
    /// the outputs built here.
    ///
    /// The local ones are claimed because this program reads the inputs
    /// from the local store itself and uploads only what the builder lacks:
    /// Nix then sends nothing it would otherwise copy before a build (the
    /// whole input closure, once per build), and an output it asks for is
    /// never mistaken for one it already has.
    async fn valid(&mut self, paths: &[StorePath]) -> anyhow::Result<Vec<StorePath>> {
        let invalid: BTreeSet<StorePath> =
            self.nix.invalid_paths(paths).await?.into_iter().collect();
        let mut valid = Vec::new();
        for path in paths {
            if !invalid.contains(path) || self.lookup(path)?.is_some() {
                valid.push(path.clone());
            }
        }
        Ok(valid)
    }

    /// What this store knows about `path`: a built output's checked
    /// narinfo, else the local store's path info.
    async fn path_info(&mut self, path: &StorePath) -> anyhow::Result<Option<wire::PathInfo>> {
        if let Some(served) = self.lookup(path)? {
            let narinfo = &served.narinfo;
            return Ok(Some(wire::PathInfo {
                deriver: narinfo
                    .deriver
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                nar_hash: narinfo.nar_hash.to_hex(),
                references: narinfo.references.iter().map(ToString::to_string).collect(),
                registration_time: 0,
                nar_size: narinfo.nar_size,
                ultimate: false,
                sigs: narinfo.signatures.iter().map(ToString::to_string).collect(),
                ca: narinfo
                    .ca
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            }));
        }
        let info = self.nix.path_info(std::slice::from_ref(path)).await?;
        Ok(info.into_iter().next().map(|info| wire::PathInfo {
            deriver: info.deriver.map(|d| d.to_string()).unwrap_or_default(),
            nar_hash: info.nar_hash.to_hex(),
            references: info.references.iter().map(ToString::to_string).collect(),
            registration_time: 0,
            nar_size: info.nar_size,
            ultimate: false,
            sigs: info.signatures.iter().map(ToString::to_string).collect(),
            ca: info.ca.map(|ca| ca.to_string()).unwrap_or_default(),
        }))
    }

    /// Streams a built output's NAR to Nix from the file its build kept;
    /// Nix checks it against the narinfo's hash as it imports it.
    async fn nar_from_path(&mut self, path: &StorePath) -> Result<(), Failure> {
        let served = self.lookup(path)?.ok_or_else(|| {
            anyhow!("{path} is not an output built through drv-thru here, the only NARs it serves")
        })?;
        let (size, file) = (served.narinfo.nar_size, served.nar.clone());
        let mut nar = tokio::fs::File::open(&file)
            .await
            .with_context(|| format!("opening {}", file.display()))?;
        let on_disk = nar
            .metadata()
            .await
            .with_context(|| format!("reading {}", file.display()))?
            .len();
        if on_disk != size {
            return Err(anyhow!(
                "{} holds {on_disk} of {path}'s {size} bytes",
                file.display()
            )
            .into());
        }
        Writer::default().last().send(&mut self.out).await?;
        // From here on Nix reads raw NAR bytes: a failure can only end the
        // connection, and Nix reports the short NAR.
        tokio::io::copy(&mut nar, &mut self.out).await?;
        self.out.flush().await?;
        Ok(())
    }

    /// Downloads a checked output's NAR from the builder's session
    /// `session_id` into the hook's shared directory; returns its file.
    async fn download(&self, session_id: &str, narinfo: &NarInfo) -> anyhow::Result<PathBuf> {
        let link = self.connection.link_policy(CompressMode::Auto);
        let mut cache = CacheClient::new(self.connection.channel.clone());
        if !narinfo.is_compressed() && link.compress(Direction::Down).await {
            cache = cache.accept_compressed(CompressionEncoding::Zstd);
        }
        let _measure = link.measure(Direction::Down).await;
        let mut stream = cache
            .get_nar(proto::GetNarRequest {
                session_id: session_id.to_owned(),
                url: narinfo.url.clone(),
                offset: 0,
                length: 0,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let mut keeping = self.shared.keep(narinfo)?;
        while let Some(chunk) = stream.message().await.map_err(status_error)? {
            keeping.write(&chunk.data).await?;
        }
        keeping.finish().await
    }

    /// Builds a `BuildPathsWithResults` target.
    async fn build_target(&mut self, target: &DerivedPath) -> Result<wire::BuildResult, Failure> {
        match target {
            DerivedPath::Opaque(path) => {
                let valid = !self.valid(std::slice::from_ref(path)).await?.is_empty();
                Ok(wire::BuildResult {
                    status: if valid {
                        BuildStatus::AlreadyValid
                    } else {
                        BuildStatus::MiscFailure
                    },
                    error: if valid {
                        String::new()
                    } else {
                        format!("{path} is not valid and is not a derivation's output")
                    },
                    times: (0, 0),
                })
            }
            DerivedPath::Built {
                drv,
                outputs: wanted,
            } => {
                let text = tokio::fs::read(drv.to_string())
                    .await
                    .with_context(|| format!("reading {drv} from the local store"))?;
                let parsed = Derivation::parse(&text).with_context(|| format!("parsing {drv}"))?;
                let mut outputs = BTreeMap::new();
                for (name, output) in parsed.outputs() {
                    if wanted.is_empty() || wanted.contains(name) {
                        let path = output.path().map(ToString::to_string).unwrap_or_default();
                        outputs.insert(name.clone(), output_path(drv, &path)?);
                    }
                }
                if let Some(name) = wanted.iter().find(|name| !outputs.contains_key(*name)) {
                    return Err(anyhow!("{drv} has no output {name:?}").into());
                }
                self.build(drv.clone(), outputs).await
            }
        }
    }

    /// Builds `drv` for `outputs` in a session of its own; on success the
    /// output closure is checked and served.
    async fn build(
        &mut self,
        drv: StorePath,
        outputs: BTreeMap<String, StorePath>,
    ) -> Result<wire::BuildResult, Failure> {
        let plan = Plan::read(&self.nix, &mut self.nix.questions().await?, drv, outputs).await?;
        let started = proto::now_unix();
        let Self {
            reader,
            out,
            name,
            key,
            nix,
            connection,
            ..
        } = self;
        let mut observer = LogFrames::new(out, &plan.drv);
        let accept_key = |announced: &str| {
            if announced == key.to_string() {
                Ok(())
            } else {
                bail!(
                    "builder {name:?} announces the signing key {announced:?}, not the public_key {key} configured for it; its outputs would be refused"
                )
            }
        };
        let built = tokio::select! {
            built = build_in_session(connection, nix, &plan, BuildOptions::default(), &mut observer, accept_key) => built?,
            () = closed(reader) => {
                return Err(Failure::Fatal(anyhow!("Nix closed the connection during the build")));
            }
        };
        let times = (started, proto::now_unix());
        let finished = &built.finished;
        let status = match finished.result() {
            proto::BuildResult::Succeeded => {
                self.serve_outputs(&built, &plan).await?;
                BuildStatus::Built
            }
            proto::BuildResult::Failed => BuildStatus::PermanentFailure,
            proto::BuildResult::LimitExceeded => BuildStatus::TimedOut,
            _ => BuildStatus::MiscFailure,
        };
        Ok(wire::BuildResult {
            status,
            error: finished.message.clone(),
            times,
        })
    }

    /// Fetches the narinfos of a build's output closure and serves them,
    /// all or none: each must be signed by the builder's configured key.
    async fn serve_outputs(&mut self, built: &SessionBuild, plan: &Plan) -> anyhow::Result<()> {
        let outputs = built.requested_outputs(plan)?;
        let session_id = &built.session.id;
        let mut listing = CacheClient::new(self.connection.channel.clone())
            .list_nar_infos(proto::ListNarInfosRequest {
                session_id: session_id.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let mut listed = Vec::new();
        while let Some(item) = listing.message().await.map_err(status_error)? {
            let narinfo: NarInfo = item
                .narinfo
                .parse()
                .context("the builder listed a malformed narinfo")?;
            check_narinfo(&narinfo, &self.key, &self.name)?;
            listed.push(narinfo);
        }
        if let Some(path) = outputs
            .values()
            .find(|path| !listed.iter().any(|n| n.store_path == **path))
        {
            bail!("the builder did not list the output {path}");
        }
        // Only what the local store lacks: the rest of the closure (inputs)
        // is answered from it.
        let paths: Vec<StorePath> = listed.iter().map(|n| n.store_path.clone()).collect();
        let lacking: BTreeSet<StorePath> =
            self.nix.invalid_paths(&paths).await?.into_iter().collect();
        let mut served = BTreeMap::new();
        for narinfo in listed
            .into_iter()
            .filter(|n| lacking.contains(&n.store_path))
        {
            let nar = self.download(session_id, &narinfo).await?;
            served.insert(narinfo.store_path.clone(), Served { narinfo, nar });
        }
        self.served.extend(served);
        Ok(())
    }
}

/// Refuses a narinfo unless `key` signed it and its NAR comes as is.
fn check_narinfo(narinfo: &NarInfo, key: &PublicKey, name: &str) -> anyhow::Result<()> {
    let path = &narinfo.store_path;
    if !narinfo.is_signed_by(key) {
        bail!(
            "builder {name:?} did not sign {path} with its configured public_key {key}; its outputs are refused"
        );
    }
    if !matches!(narinfo.compression.as_deref(), None | Some("none"))
        || !narinfo.has_plain_nar_url()
    {
        bail!(
            "builder {name:?} serves {path} compressed or from elsewhere; drv-thru builders serve plain NARs"
        );
    }
    Ok(())
}

/// An output's path as a derivation names it; floating content-addressed
/// outputs have none yet, and are not supported.
fn output_path(drv: &StorePath, path: &str) -> anyhow::Result<StorePath> {
    if path.is_empty() {
        bail!(
            "{drv} has a floating content-addressed output, which drv-thru cannot build through Nix's scheduler"
        );
    }
    path.parse()
        .with_context(|| format!("{drv} names an invalid output path {path:?}"))
}

/// Returns once Nix has closed its end. Nix sends nothing while it waits
/// for a reply, so bytes that do arrive stay buffered for the next
/// operation.
async fn closed<R: AsyncRead + Unpin>(reader: &mut Reader<BufReader<R>>) {
    match reader.get_mut().fill_buf().await {
        Ok(buf) if !buf.is_empty() => std::future::pending().await,
        _ => {}
    }
}

/// A build's events as Nix log frames: a build activity whose log lines and
/// phases `nix build -L` and nix-output-monitor show as the builder's.
struct LogFrames<'a, W> {
    out: &'a mut BufWriter<W>,
    drv: String,
    activity: Option<u64>,
}

impl<'a, W: AsyncWrite + Unpin> LogFrames<'a, W> {
    fn new(out: &'a mut BufWriter<W>, drv: &StorePath) -> Self {
        Self {
            out,
            drv: drv.to_string(),
            activity: None,
        }
    }

    /// The build activity's id, appending its start the first time. Ids
    /// are unique per process, as Nix's own are.
    fn activity(&mut self, w: &mut Writer) -> u64 {
        *self.activity.get_or_insert_with(|| {
            let id = u64::from(std::process::id()) << 32 | 1;
            w.start_activity(
                id,
                wire::LEVEL_INFO,
                wire::ACTIVITY_BUILD,
                &format!("building '{}'", self.drv),
                &[
                    Field::Str(self.drv.clone()),
                    Field::Str(String::new()),
                    Field::Int(1),
                    Field::Int(1),
                ],
            );
            id
        })
    }

    async fn send(&mut self, mut w: Writer) {
        // Nix gone: the build is cancelled through the closed stdin.
        if let Err(err) = w.send(self.out).await {
            tracing::debug!("cannot pass the build log on to Nix: {err}");
        }
    }
}

impl<W: AsyncWrite + Unpin> Observer for LogFrames<'_, W> {
    fn uploading(&mut self, count: usize, bytes: u64) -> impl Fn(u64) + Send + 'static {
        tracing::debug!(count, bytes, "uploading inputs");
        |_| {}
    }

    fn uploaded(&mut self) {}

    async fn build_event(&mut self, event: Event) {
        let mut w = Writer::default();
        match event {
            Event::Queued(queued) => {
                w.next(&format!(
                    "waiting for a build slot on the builder (position {})",
                    queued.position
                ));
            }
            Event::Started(_) => {
                self.activity(&mut w);
            }
            // Structured lines only renderers of the builder's own Nix
            // would use: nothing to print.
            Event::Log(line) if line.text.is_empty() => return,
            Event::Log(line) => {
                let id = self.activity(&mut w);
                w.result(id, wire::RESULT_BUILD_LOG_LINE, &[Field::Str(line.text)]);
            }
            Event::Phase(phase) => {
                let id = self.activity(&mut w);
                w.result(id, wire::RESULT_SET_PHASE, &[Field::Str(phase.phase)]);
            }
            Event::Finished(_) => {}
        }
        self.send(w).await;
    }

    async fn build_ended(&mut self) {
        if let Some(id) = self.activity.take() {
            let mut w = Writer::default();
            w.stop_activity(id);
            self.send(w).await;
        }
    }

    fn importing_through_helper(&mut self) -> impl Fn(u64, u64, u64) + Send + 'static {
        // Nix imports the outputs itself; the helper is never used here.
        |_, _, _| {}
    }

    fn imported_through_helper(&mut self) {}
}
