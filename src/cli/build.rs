//! `drv-thru build`: evaluate locally, build remotely, import the signed
//! outputs.

use std::{
    future::Future,
    io::{IsTerminal, Write},
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio::{
    io::AsyncWriteExt,
    signal::unix::{Signal, SignalKind, signal},
    sync::OnceCell,
};

use super::Failure;
use crate::{
    client::{self, Target, cache_proxy::CacheProxy, session::Session},
    endpoint::RelayChoice,
    helper::{self, client::HelperClient},
    nix::{signing::PublicKey, store_path::StorePath},
    nixcmd::{EvalFlags, Nix},
    proto::{self, BuildResult, build_response::Event},
    ticket::Ticket,
    units::format_bytes,
};

/// Parallel streams on a long path, unless `--nar-fetches` says: four
/// 1.25 MB QUIC windows in flight carry about 100 MiB/s at 50 ms round trip.
const LONG_PATH_STREAMS: usize = 4;

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// What to build: a flake reference such as `nixpkgs#hello`, `.` or
    /// `path:/src#attr`, evaluated by your local Nix.
    installable: String,

    /// Build with this ticket (`drvthru...`), as handed out by the builder's
    /// admin. It names the builder and the key its outputs are signed with.
    #[arg(long, value_name = "TICKET", conflicts_with_all = ["builder", "server"])]
    ticket: Option<Ticket>,
    /// Build on this builder from builders.json, as a trusted client.
    #[arg(long, value_name = "NAME", conflicts_with = "server")]
    builder: Option<String>,
    /// Build on the builder with this endpoint id, as a trusted client.
    #[arg(long, value_name = "ENDPOINT_ID")]
    server: Option<iroh::EndpointId>,
    /// With --server: a relay to reach it through.
    #[arg(long, value_name = "URL", requires = "server")]
    relay_url: Option<iroh::RelayUrl>,
    /// With --server: a direct address to dial (repeatable).
    #[arg(long = "addr", value_name = "IP:PORT", requires = "server")]
    addrs: Vec<SocketAddr>,
    /// The client key [default: $XDG_CONFIG_HOME/drv-thru/secret.key].
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,

    /// Let evaluation read the environment (e.g. NIXPKGS_ALLOW_UNSUPPORTED_SYSTEM).
    #[arg(long)]
    impure: bool,
    /// Re-fetch flake inputs instead of using cached copies.
    #[arg(long)]
    refresh: bool,
    /// Replace a flake input for this evaluation (repeatable).
    #[arg(long, num_args = 2, value_names = ["INPUT", "FLAKE_REF"])]
    override_input: Vec<String>,
    /// Build again on the builder and check the result matches (like `nix build --rebuild`).
    #[arg(long)]
    rebuild: bool,

    /// NAR parts moved at once, each over a QUIC stream of its own: output
    /// downloads and input uploads [default: 1 on a path under 5 ms round
    /// trip, else 4]. One stream carries about its window divided by the
    /// round-trip time, so long links want several; on short ones one
    /// stream is fastest.
    #[arg(
        long,
        value_name = "N",
        env = "DRV_THRU_NAR_FETCHES",
        value_parser = clap::value_parser!(u8).range(1..=16),
    )]
    nar_fetches: Option<u8>,

    /// Show plain build logs instead of nix-output-monitor's view.
    #[arg(long)]
    no_nom: bool,
    /// Where to put the result link [default: ./result].
    #[arg(long, short = 'o', value_name = "PATH", conflicts_with = "no_link")]
    out_link: Option<PathBuf>,
    /// Do not create a result link.
    #[arg(long)]
    no_link: bool,
    /// Print the output paths (the default; kept for `nix build` habits).
    #[arg(long)]
    print_out_paths: bool,
    /// Print `nix build --json`-style JSON instead of paths.
    #[arg(long)]
    json: bool,
}

impl Args {
    fn target(&self) -> anyhow::Result<Option<Target>> {
        Ok(if let Some(ticket) = &self.ticket {
            Some(Target::Ticket(Box::new(ticket.clone())))
        } else if let Some(name) = &self.builder {
            Some(client::named(name)?)
        } else {
            self.server.map(|endpoint_id| Target::Direct {
                endpoint_id,
                relay_url: self.relay_url.clone(),
                addrs: self.addrs.clone(),
            })
        })
    }

    fn eval_flags(&self) -> EvalFlags {
        EvalFlags {
            impure: self.impure,
            refresh: self.refresh,
            override_inputs: self
                .override_input
                .chunks(2)
                .map(|pair| (pair[0].clone(), pair[1].clone()))
                .collect(),
            file: None,
        }
    }
}

/// Progress on stderr: a bar on a terminal, occasional lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new() -> Self {
        Self { bar: None }
    }

    fn note(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => eprintln!("{message}"),
        }
    }

    fn bytes(&mut self, message: &'static str, total: u64) -> impl Fn(u64) + Send + 'static {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total).with_message(message);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .expect("the template is valid")
                .progress_chars("=> "),
            );
            self.bar = Some(bar.clone());
            Box::new(move |done| bar.set_position(done)) as Box<dyn Fn(u64) + Send>
        } else {
            let started = Instant::now();
            let last = std::sync::Mutex::new(Instant::now());
            Box::new(move |done| {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                if last.elapsed() >= Duration::from_secs(2) || done == total {
                    *last = Instant::now();
                    let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
                    eprintln!(
                        "{message}: {} of {} ({}/s)",
                        format_bytes(done),
                        format_bytes(total),
                        format_bytes(rate as u64)
                    );
                }
            })
        }
    }

    /// Counts paths: the closure takes paths done, paths in all and bytes
    /// received so far.
    fn paths(&mut self, message: &'static str) -> impl Fn(u64, u64, u64) + Send + 'static {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0).with_message(message);
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} paths {prefix}")
                    .expect("the template is valid")
                    .progress_chars("=> "),
            );
            self.bar = Some(bar.clone());
            bar
        });
        move |done, total, bytes| match &bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done);
                bar.set_prefix(format!("({} received)", format_bytes(bytes)));
            }
            None => eprintln!(
                "{message}: {done} of {total} paths ({} received)",
                format_bytes(bytes)
            ),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// Where build events go: nix-output-monitor or plain stderr lines.
enum LogSink {
    Nom(tokio::process::Child),
    Plain,
}

impl LogSink {
    fn new(no_nom: bool) -> Self {
        if no_nom {
            return Self::Plain;
        }
        // nom draws on its stdout; ours carries only the output paths.
        let Ok(stderr) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() else {
            return Self::Plain;
        };
        match tokio::process::Command::new("nom")
            .arg("--json")
            .stdin(Stdio::piped())
            .stdout(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => Self::Nom(child),
            Err(_) => Self::Plain,
        }
    }

    async fn event(&mut self, event: Event) {
        match (self, event) {
            (Self::Nom(child), Event::Log(proto::BuildLogLine { internal_json, .. }))
            | (Self::Nom(child), Event::Phase(proto::BuildPhaseChange { internal_json, .. }))
                if !internal_json.is_empty() =>
            {
                if let Some(stdin) = child.stdin.as_mut() {
                    let line = format!("@nix {internal_json}\n");
                    // nom going away only loses the pretty view, not the build.
                    let _ = stdin.write_all(line.as_bytes()).await;
                }
            }
            (_, Event::Log(line)) if !line.text.is_empty() => eprintln!("{}", line.text),
            (_, Event::Queued(queued)) => {
                eprintln!("drv-thru: queued, position {}", queued.position)
            }
            (_, Event::Started(_)) => eprintln!("drv-thru: building"),
            (_, Event::Log(_) | Event::Phase(_) | Event::Finished(_)) => {}
        }
    }

    async fn close(self) {
        if let Self::Nom(mut child) = self {
            drop(child.stdin.take());
            let _ = child.wait().await;
        }
    }
}

pub(super) async fn run(args: Args, relay: RelayChoice) -> Result<(), Failure> {
    // From the start: a signal that found no handler would end drv-thru
    // without its Nix processes, and one handled only later is swallowed.
    let mut signals = Signals::install();
    let nix = Nix::new();
    // Bound only once a builder is to be contacted, and kept here so that
    // whatever ends the preparation closes it rather than drops it.
    let endpoint = OnceCell::new();
    let prepared = signals
        .unless(
            prepare(&args, &nix, relay, &endpoint),
            "nothing was sent to a builder",
        )
        .await;
    let prepared = match (prepared, endpoint.get()) {
        (Err(err), Some(endpoint)) => {
            endpoint.close().await;
            return Err(err);
        }
        (prepared, _) => prepared?,
    };
    let (drv, outputs) = match prepared {
        Prepared::Valid(evaluated) => (evaluated.drv_path, evaluated.outputs),
        Prepared::Remote(ready) => {
            let Ready {
                import,
                connection,
                plan,
            } = *ready;
            let mut progress = Progress::new();
            // Dropping `remote` kills its Nix processes and removes its files.
            let outcome = signals
                .unless(
                    remote(&args, &nix, import, &connection, &plan, &mut progress),
                    "the builder cancels the session, and nothing was imported that Nix had not \
                     checked",
                )
                .await;
            progress.finish();
            // A signal is noted but does not cut the close short: QUIC ends
            // it within a few probe timeouts whatever the builder does, and
            // iroh complains about an endpoint dropped unclosed.
            let close = connection.close();
            tokio::pin!(close);
            let signalled = tokio::select! {
                () = &mut close => None,
                signal = signals.recv() => {
                    close.await;
                    Some(signal)
                }
            };
            let outputs = match outcome? {
                Remote::Built(outputs) => outputs,
                Remote::Failed(message) => return Err(Failure::BuildFailed(message)),
            };
            if let Some(signal) = signalled {
                return Err(anyhow!(
                    "interrupted by {signal}; the outputs are in the local store, but no result \
                     links were made"
                )
                .into());
            }
            (plan.drv, outputs)
        }
    };
    signals
        .unless(
            finish(&args, &nix, &drv, &outputs),
            "the outputs are in the local store, but result links may be missing",
        )
        .await
}

/// Where the build will happen, once evaluated.
enum Prepared {
    /// The outputs are valid locally already.
    Valid(crate::nixcmd::Evaluated),
    /// On a builder.
    Remote(Box<Ready>),
}

/// A build ready to be sent to the builder at the other end of `connection`.
struct Ready {
    import: Import,
    connection: client::Connection,
    plan: Plan,
}

/// Evaluates `args.installable` and, unless its outputs are valid here,
/// connects to the builder from `endpoint` (bound here) and gets everything
/// ready that may still refuse the build before a session is opened. The
/// caller closes `endpoint` if this fails.
async fn prepare(
    args: &Args,
    nix: &Nix,
    relay: RelayChoice,
    endpoint: &OnceCell<iroh::Endpoint>,
) -> Result<Prepared, Failure> {
    let evaluated = nix
        .evaluate(&args.installable, &args.eval_flags())
        .await
        .context("evaluating locally")?;
    let [evaluated] = <[_; 1]>::try_from(evaluated).map_err(|all| {
        anyhow!(
            "{} evaluates to {} derivations; name one",
            args.installable,
            all.len()
        )
    })?;
    let outputs: Vec<StorePath> = evaluated.outputs.values().cloned().collect();

    if !args.rebuild && nix.invalid_paths(&outputs).await?.is_empty() {
        tracing::info!("outputs already valid locally; not contacting a builder");
        return Ok(Prepared::Valid(evaluated));
    }
    let target = args.target()?.ok_or_else(|| {
        anyhow!("say where to build: --ticket TICKET, --builder NAME or --server ENDPOINT_ID")
    })?;

    // The trust decision, the closure and the connection are independent,
    // so they run together. Whether the outputs will be importable is
    // settled before the session is opened: a refusal costs no ticket use
    // and no upload.
    let inputs = async {
        anyhow::Ok(
            nix.closure_infos(std::slice::from_ref(&evaluated.drv_path))
                .await?,
        )
    };
    let connection = async {
        let endpoint = endpoint
            .get_or_try_init(|| client::bind(relay, args.key_file.as_deref()))
            .await?;
        client::dial(endpoint, &target).await
    };
    let (import, inputs, connection) = tokio::join!(import_trust(nix, &target), inputs, connection);
    let (import, inputs, connection) = (import?, inputs?, connection?);
    Ok(Prepared::Remote(Box::new(Ready {
        import,
        connection,
        plan: Plan {
            inputs,
            drv: evaluated.drv_path,
            outputs: evaluated.outputs,
        },
    })))
}

/// SIGINT and SIGTERM, which end a build with a message saying what was
/// left in which state, instead of ending the process on the spot.
struct Signals(Vec<(Signal, &'static str)>);

impl Signals {
    /// Handles SIGINT and SIGTERM from now on; one whose handler cannot be
    /// installed keeps its default action.
    fn install() -> Self {
        Self(
            [
                (SignalKind::interrupt(), "SIGINT"),
                (SignalKind::terminate(), "SIGTERM"),
            ]
            .into_iter()
            .filter_map(|(kind, name)| Some((signal(kind).ok()?, name)))
            .collect(),
        )
    }

    /// The name of the next signal to arrive.
    async fn recv(&mut self) -> &'static str {
        if self.0.is_empty() {
            return std::future::pending().await;
        }
        let arrivals = self.0.iter_mut().map(|(signal, name)| {
            Box::pin(async move {
                signal.recv().await;
                *name
            })
        });
        futures::future::select_all(arrivals).await.0
    }

    /// `work`'s outcome, or, if a signal arrives first, an error that says
    /// so and `then`: what dropping `work` left behind.
    async fn unless<T, E: Into<Failure>>(
        &mut self,
        work: impl Future<Output = Result<T, E>>,
        then: &str,
    ) -> Result<T, Failure> {
        tokio::select! {
            // A Ctrl-C reaches Nix too; say why it failed.
            biased;
            signal = self.recv() => Err(anyhow!("interrupted by {signal}; {then}").into()),
            outcome = work => outcome.map_err(Into::into),
        }
    }
}

/// What to build: the derivation, the outputs asked for, and the
/// derivation's closure as the local store describes it.
struct Plan {
    drv: StorePath,
    outputs: std::collections::BTreeMap<String, StorePath>,
    inputs: Vec<crate::nixcmd::PathInfo>,
}

enum Remote {
    Built(std::collections::BTreeMap<String, StorePath>),
    Failed(String),
}

/// Streams for bulk transfers: as `--nar-fetches` says, or by the path's
/// round-trip time.
async fn bulk_width(args: &Args, connection: &client::Connection) -> usize {
    match args.nar_fetches {
        Some(n) => n.into(),
        None => connection.bulk_width(LONG_PATH_STREAMS).await,
    }
}

async fn remote(
    args: &Args,
    nix: &Nix,
    import: Import,
    connection: &client::Connection,
    plan: &Plan,
    progress: &mut Progress,
) -> anyhow::Result<Remote> {
    let infos = &plan.inputs;
    let requested = &plan.outputs;
    let mut session = Session::open(
        connection.channel.clone(),
        &plan.drv,
        client::session::inputs(infos),
    )
    .await?;
    if let Import::NixTrusted(trust) = &import {
        let trusted = session
            .announced_key
            .parse::<PublicKey>()
            .is_ok_and(|announced| trust.trusts_key(&announced));
        if !trusted {
            bail!(
                "the builder signs with {:?}, which your Nix does not trust, and no key is configured \
                 for it here; build with a ticket, give the builder a builders.json entry with \
                 \"public_key\", or add the key to nix.settings.trusted-public-keys",
                session.announced_key
            );
        }
    }
    // The same streams carry the upload and, after the build, the outputs.
    let width = bulk_width(args, connection).await;
    let bulk = connection.bulk_channels(width);
    if !session.missing.is_empty() {
        let total: u64 = infos
            .iter()
            .filter(|info| session.missing.contains(&info.path))
            .map(|info| info.nar_size)
            .sum();
        progress.note(&format!(
            "drv-thru: uploading {} inputs ({})",
            session.missing.len(),
            format_bytes(total)
        ));
        let report = progress.bytes("uploading", total);
        session.upload(nix, bulk.clone(), report).await?;
        progress.finish();
    }
    let mut sink = LogSink::new(args.no_nom);
    let mut events = session.build(args.rebuild).await?;
    let finished = loop {
        match events.next().await {
            Ok(Event::Finished(finished)) => break Ok(finished),
            Ok(event) => sink.event(event).await,
            Err(err) => break Err(err),
        }
    };
    sink.close().await;
    let finished = finished?;
    if finished.result() != BuildResult::Succeeded {
        return Ok(Remote::Failed(finished.message));
    }
    // Import only what was asked for, even if the derivation has more outputs.
    let outputs: std::collections::BTreeMap<String, StorePath> =
        client::session::outputs(&finished)?
            .into_iter()
            .filter(|(name, _)| requested.contains_key(name))
            .collect();
    if let Some(name) = requested.keys().find(|name| !outputs.contains_key(*name)) {
        bail!("the builder did not report the requested output {name:?}");
    }
    let proxy = CacheProxy::start(
        bulk,
        width,
        session.id.clone(),
        import.key().cloned(),
        nix.clone(),
    )
    .context("starting the loopback cache")?;
    let paths: Vec<StorePath> = outputs.values().cloned().collect();
    match import {
        Import::NixTrusted(_) | Import::Direct(_) => {
            let key = import.key();
            if !import_spooled(nix, &proxy, &paths, key).await {
                nix.copy_from(&proxy.url(), &paths, key, true)
                    .await
                    .context("importing the outputs into the local store")?;
            }
        }
        Import::Helper(mut helper, key) => {
            let report = progress.paths("importing through the import helper");
            helper
                .import(&key, &proxy.url(), &paths, |step| {
                    report(
                        step.paths_done.into(),
                        step.paths_total.into(),
                        proxy.bytes_received(),
                    )
                })
                .await
                .context("importing the outputs through the import helper")?;
            progress.finish();
        }
    }
    tracing::info!(bytes = proxy.bytes_received(), "outputs imported");
    Ok(Remote::Built(outputs))
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

/// How the outputs get into the local store.
enum Import {
    /// `nix copy` as this user, trusting this key for the copy (or nothing
    /// more when Nix already trusts the builder's key).
    Direct(Option<PublicKey>),
    /// Through the root import helper, which has this key on its allowlist.
    Helper(Box<HelperClient>, PublicKey),
    /// No key is configured for the builder (`--server`): plain `nix copy`,
    /// provided the key the builder announces is one Nix trusts already.
    NixTrusted(crate::nixcmd::TrustInfo),
}

impl Import {
    /// The key the outputs must be signed with, if Nix is not to decide.
    fn key(&self) -> Option<&PublicKey> {
        match self {
            Self::Direct(key) => key.as_ref(),
            Self::Helper(_, key) => Some(key),
            Self::NixTrusted(_) => None,
        }
    }
}

/// Decides, before anything is uploaded, how the outputs will be imported:
/// directly when Nix trusts the builder's key or the user, otherwise through
/// the import helper, which must be reachable and have the key allowlisted.
async fn import_trust(nix: &Nix, target: &Target) -> anyhow::Result<Import> {
    let trust = nix.trust().await.context("asking Nix whom it trusts")?;
    let Some(key) = target.trusted_signing_key() else {
        // Only Nix's own trusted keys can vouch for this builder; whether
        // they include its key is checked once the session is open, still
        // before anything is uploaded.
        return Ok(Import::NixTrusted(trust));
    };
    if trust.trusts_key(key) {
        return Ok(Import::Direct(None));
    }
    if trust.trusted_user {
        return Ok(Import::Direct(Some(key.clone())));
    }
    let untrusted = format!(
        "your Nix does not trust the builder's key {key} and you are not a trusted Nix user, so \
         the outputs can only be imported through the drv-thru import helper"
    );
    let socket = helper::client::socket_path();
    let mut helper = HelperClient::connect(&socket)
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
    Ok(Import::Helper(Box::new(helper), key.clone()))
}

async fn finish(
    args: &Args,
    nix: &Nix,
    drv: &StorePath,
    outputs: &std::collections::BTreeMap<String, StorePath>,
) -> Result<(), Failure> {
    if !args.no_link {
        let base = args
            .out_link
            .clone()
            .unwrap_or_else(|| PathBuf::from("result"));
        for (name, path) in outputs {
            let link = if name == "out" {
                base.clone()
            } else {
                PathBuf::from(format!("{}-{name}", base.display()))
            };
            nix.add_root(&link, path).await?;
        }
    }
    let mut stdout = std::io::stdout().lock();
    let text = if args.json {
        let outputs: serde_json::Map<String, serde_json::Value> = outputs
            .iter()
            .map(|(name, path)| (name.clone(), json!(path.to_string())))
            .collect();
        format!(
            "{}\n",
            json!([{ "drvPath": drv.to_string(), "outputs": outputs }])
        )
    } else {
        outputs.values().map(|path| format!("{path}\n")).collect()
    };
    stdout
        .write_all(text.as_bytes())
        .context("writing to stdout")?;
    Ok(())
}
