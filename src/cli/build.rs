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

use anyhow::{Context, anyhow};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio::{
    io::AsyncWriteExt,
    signal::unix::{Signal, SignalKind, signal},
    sync::OnceCell,
};

use super::Failure;
use crate::{
    client::{
        Target,
        link::CompressMode,
        remote_build::{self, BuildOptions, Observer, Outcome, Plan, RemoteBuild},
    },
    nix::store_path::StorePath,
    nixcmd::{EvalFlags, Evaluated, Nix, strip_controls},
    proto::{self, build_response::Event},
    ticket::Ticket,
    transport::endpoint::RelayChoice,
    units::{format_bytes, plural},
};

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

    /// Compress NAR transfers (inputs up, outputs down) with zstd on the
    /// fly. Your Nix sees the same NARs either way.
    #[arg(
        long,
        value_name = "WHEN",
        env = "DRV_THRU_COMPRESS",
        value_enum,
        default_value_t = CompressMode::Auto
    )]
    compress: CompressMode,

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
            Some(Target::named_builder(name)?)
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
            // The builder's text is shown as it is only once no control
            // character in it can rewrite the user's screen.
            (_, Event::Log(line)) if !line.text.is_empty() => {
                eprintln!("{}", strip_controls(&line.text))
            }
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
    let mut interrupts = Interrupts::install();
    let nix = Nix::builder().spare_connection().build();
    // Bound only once a builder is to be contacted, and kept here so that
    // whatever ends the preparation closes it rather than drops it.
    let endpoint = OnceCell::new();
    let prepared = interrupts
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
        Prepared::Remote(mut build) => {
            let mut display = Display::new(args.no_nom);
            let options = BuildOptions {
                rebuild: args.rebuild,
                bulk_streams: args.nar_fetches.map(usize::from),
                compress: args.compress,
            };
            // Dropping the run kills its Nix processes and removes its files.
            let outcome = interrupts
                .unless(
                    build.run(&nix, options, &mut display),
                    "the builder cancels the session, and nothing was imported that Nix had not \
                     checked",
                )
                .await;
            display.progress.finish();
            let drv = build.plan().drv.clone();
            // A signal is noted but does not cut the close short: QUIC ends
            // it within a few probe timeouts whatever the builder does, and
            // iroh complains about an endpoint dropped unclosed.
            let close = build.close();
            tokio::pin!(close);
            let signalled = tokio::select! {
                () = &mut close => None,
                signal = interrupts.recv() => {
                    close.await;
                    Some(signal)
                }
            };
            let outputs = match outcome? {
                Outcome::Built(outputs) => outputs,
                Outcome::Failed(message) => {
                    return Err(Failure::BuildFailed(strip_controls(&message)));
                }
            };
            if let Some(signal) = signalled {
                return Err(anyhow!(
                    "interrupted by {signal}; the outputs are in the local store, but no result \
                     links were made"
                )
                .into());
            }
            (drv, outputs)
        }
    };
    interrupts
        .unless(
            finish(&args, &nix, &drv, &outputs),
            "the outputs are in the local store, but result links may be missing",
        )
        .await
}

/// Where the build will happen, once evaluated.
enum Prepared {
    /// The outputs are valid locally already.
    Valid(Evaluated),
    /// On a builder.
    Remote(Box<RemoteBuild>),
}

/// What the local store holds of an evaluated installable.
enum Locally {
    /// Every output it asks for.
    Valid(Evaluated),
    /// Not every output: the plan to build it elsewhere.
    Lacking(Plan),
}

/// Evaluates `args.installable` and, unless its outputs are valid here,
/// gets a remote build ready from `endpoint` (bound here). The caller closes
/// `endpoint` if this fails.
async fn prepare(
    args: &Args,
    nix: &Nix,
    relay: RelayChoice,
    endpoint: &OnceCell<iroh::Endpoint>,
) -> Result<Prepared, Failure> {
    let flags = args.eval_flags();
    let evaluation = remote_build::evaluate(nix, &args.installable, &flags);
    let Some(target) = args.target()? else {
        let evaluated = evaluation.await?;
        if !args.rebuild
            && remote_build::outputs_valid(&mut nix.questions().await?, &evaluated).await?
        {
            return Ok(valid_here(evaluated));
        }
        return Err(anyhow!(
            "say where to build: --ticket TICKET, --builder NAME or --server ENDPOINT_ID"
        )
        .into());
    };
    // The builder is dialled while Nix evaluates: a dial costs a build's
    // start tens of milliseconds, more over a long path. Valid outputs need
    // no builder, so that answer does not wait for the dial.
    let contact = remote_build::contact(&target, endpoint, relay, args.key_file.as_deref());
    let local = async {
        let evaluated = evaluation.await?;
        let mut questions = nix.questions().await?;
        if !args.rebuild && remote_build::outputs_valid(&mut questions, &evaluated).await? {
            return Ok(Locally::Valid(evaluated));
        }
        let plan = Plan::read(nix, &mut questions, evaluated.drv_path, evaluated.outputs).await?;
        anyhow::Ok(Locally::Lacking(plan))
    };
    tokio::pin!(contact, local);
    let mut contacted = None;
    let local = loop {
        tokio::select! {
            local = &mut local => break local?,
            made = &mut contact, if contacted.is_none() => contacted = Some(made),
        }
    };
    let plan = match local {
        Locally::Lacking(plan) => plan,
        Locally::Valid(evaluated) => return Ok(valid_here(evaluated)),
    };
    let connection = match contacted {
        Some(made) => made?,
        None => contact.await?,
    };
    let build = RemoteBuild::prepare(nix, &target, connection, plan).await?;
    Ok(Prepared::Remote(Box::new(build)))
}

fn valid_here(evaluated: Evaluated) -> Prepared {
    tracing::info!("outputs already valid locally; nothing to build");
    Prepared::Valid(evaluated)
}

/// SIGINT and SIGTERM, which end a build with a message saying what was
/// left in which state, instead of ending the process on the spot.
struct Interrupts(Vec<(Signal, &'static str)>);

impl Interrupts {
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

/// What the user sees of a remote build: progress on stderr and the
/// build's log.
struct Display {
    progress: Progress,
    no_nom: bool,
    log: Option<LogSink>,
}

impl Display {
    fn new(no_nom: bool) -> Self {
        Self {
            progress: Progress::new(),
            no_nom,
            log: None,
        }
    }
}

impl Observer for Display {
    fn uploading(&mut self, count: usize, bytes: u64) -> impl Fn(u64) + Send + 'static {
        self.progress.note(&format!(
            "drv-thru: uploading {} ({})",
            plural(count as u64, "input", "inputs"),
            format_bytes(bytes)
        ));
        self.progress.bytes("uploading", bytes)
    }

    fn uploaded(&mut self) {
        self.progress.finish();
    }

    async fn build_event(&mut self, event: Event) {
        let no_nom = self.no_nom;
        self.log
            .get_or_insert_with(|| LogSink::new(no_nom))
            .event(event)
            .await;
    }

    async fn build_ended(&mut self) {
        if let Some(log) = self.log.take() {
            log.close().await;
        }
    }

    fn importing_through_helper(&mut self) -> impl Fn(u64, u64, u64) + Send + 'static {
        self.progress.paths("importing through the import helper")
    }

    fn imported_through_helper(&mut self) {
        self.progress.finish();
    }
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
