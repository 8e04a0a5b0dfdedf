//! The one place in drv-thru that runs Nix.
//!
//! Every `nix`, `nix-store` and `nix-daemon` process goes through a [`Nix`] handle, which fixes how
//! commands are started: the program is run directly with an argument vector (never through a
//! shell), stdin is closed, the environment is cleared down to a short list of variables Nix needs
//! plus whatever the handle adds (`NIX_CONF_DIR`, `NIX_REMOTE`, …), and the handle's `--store` and
//! `--option` settings are passed to every command. Methods take typed values ([`StorePath`], [`PublicKey`]) and return
//! typed results; failures carry the command line and the end of Nix's stderr.
//!
//! Nix's command line and output changed between Nix 2.8 (Debian 12) and 2.18–2.26 (and Lix).
//! Where possible this module uses commands that behave the same everywhere rather than checking
//! versions:
//!
//! - evaluation: `nix build --dry-run --json` prints `drvPath` and `outputs` in both and writes the
//!   `.drv` files, so one evaluation gives both (2.8 has no `--print-out-paths`);
//! - building: `nix-store --realise DRV!out,dev` means the same in both, where `nix build DRV`
//!   builds every output in 2.8 but nothing in 2.26, and `DRV^out` does not parse in 2.8;
//! - a `.drv` argument to `nix copy` means "its outputs" in 2.8 but the file itself in 2.26;
//!   `--derivation` means the file in both, but fails in 2.8 for other paths, so derivations and
//!   other paths go in separate calls;
//! - questions about paths (validity, path info, closures) and imports skip the command line: they
//!   go to `nix-daemon --stdio` in the worker protocol, whose answers are the same from Nix 2.8 on
//!   and which costs one Nix process per piece of work, none at all while a handle's spare
//!   connection is ready;
//! - `nix show-config` (2.8) is `nix config show` from 2.20 on; the old name still works in 2.26
//!   with a warning and is tried first.
//!
//! Submodules: [`log`] parses `--log-format internal-json` lines (pure); the rest is private, with
//! the types re-exported here.

mod cache;
mod daemon;
mod dump;
pub mod log;
mod parse;
mod process;
mod questions;
mod realise;
mod trust;
mod verifiable;

#[cfg(test)]
mod real_nix_tests;

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::nix::narinfo::NarInfo;
use crate::nix::signing::PublicKey;
use crate::nix::store_path::StorePath;

pub use dump::NarDump;
pub use log::{BuildEvent, Level, LogParser, strip_controls};
pub use parse::{Evaluated, PathInfo};
pub use questions::Questions;
pub use realise::{KillHandle, LogRecord, RealiseOutcome, RealiseRun, kill_builds_rooted_in};
pub use trust::{TrustBasis, TrustInfo};

use process::{CommandLine, Program};

/// Environment variables passed from drv-thru's own environment to Nix unless the handle says
/// otherwise: what Nix needs to find its configuration, caches, store and the network.
pub const DEFAULT_PASSTHROUGH_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "TMPDIR",
    "TZ",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "XDG_CONFIG_DIRS",
    "XDG_DATA_HOME",
    "XDG_STATE_HOME",
    "XDG_RUNTIME_DIR",
    "NIX_REMOTE",
    "NIX_CONF_DIR",
    "NIX_USER_CONF_FILES",
    "NIX_CONFIG",
    "NIX_PATH",
    "NIX_SSL_CERT_FILE",
    "SSL_CERT_FILE",
    "NIX_SSHOPTS",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
];

/// Most bytes of store path arguments given to one command; longer lists are split into batches.
const MAX_ARG_BYTES: usize = 128 * 1024;

/// Why running Nix failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NixCmdError {
    /// The program could not be started (not installed, not executable, …).
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Reading from or waiting for the process failed.
    #[error("i/o error while running `{command}`")]
    Io {
        /// The command line.
        command: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The command exited unsuccessfully.
    #[error("`{command}` {status}{}", stderr_suffix(.stderr))]
    Failed {
        /// The command line.
        command: String,
        /// How it ended, e.g. `exited with code 1`.
        status: String,
        /// The end of its stderr, trimmed.
        stderr: String,
    },
    /// The command printed something this module cannot read.
    #[error("cannot read the output of `{command}`: {reason}{}", stderr_suffix(.stderr))]
    Parse {
        /// The command line.
        command: String,
        /// What is wrong with the output.
        reason: String,
        /// The end of its stderr, trimmed.
        stderr: String,
    },
    /// The command printed more than this module is willing to hold.
    #[error("`{command}` printed more than {limit} bytes")]
    OutputTooLarge {
        /// The command line.
        command: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// An argument cannot be passed to Nix safely.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A path offered for [`Nix::add_verifiable`] is neither properly
    /// content-addressed nor signed.
    #[error("cannot add {path}: {reason}")]
    NotContentAddressed {
        /// The path.
        path: StorePath,
        /// What is wrong.
        reason: String,
    },
    /// The store refused paths offered for [`Nix::add_verifiable`], saying
    /// why.
    #[error("{0}")]
    Refused(String),
    /// A path asked about is not valid in the store.
    #[error("{0} is not valid in the store")]
    NotValid(StorePath),
    /// The NAR of a path offered for [`Nix::add_verifiable`] could not be
    /// read from its source.
    #[error("cannot read the NAR of {path}: {reason}")]
    NarSource {
        /// The path.
        path: StorePath,
        /// What went wrong.
        reason: String,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

/// Flags for evaluating an installable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvalFlags {
    /// `--impure`: allow access to the environment, `<nixpkgs>`, mutable paths.
    pub impure: bool,
    /// `--refresh`: consider cached downloads (flake inputs, tarballs) out of date.
    pub refresh: bool,
    /// `--override-input INPUT FLAKEREF` pairs.
    pub override_inputs: Vec<(String, String)>,
    /// `--file FILE`: read the installable as an attribute path of this Nix file, not a flake ref.
    pub file: Option<PathBuf>,
}

/// How [`Nix::copy_to_file_cache`] compresses the NARs it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheCompression {
    /// No compression: fastest, and the NAR files can be streamed as they are.
    None,
    /// zstd, Nix's default level.
    Zstd,
}

impl CacheCompression {
    /// The name in a store URL's `compression=` parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Zstd => "zstd",
        }
    }
}

/// How to run Nix: programs, environment, store and settings. Cheap to clone; every call goes
/// through one of these. Make one with [`Nix::new`] or [`Nix::builder`].
#[derive(Debug, Clone)]
pub struct Nix {
    config: Arc<Config>,
}

#[derive(Debug, Clone)]
struct Config {
    program_dir: Option<PathBuf>,
    passthrough: Vec<String>,
    env: Vec<(OsString, OsString)>,
    store: Option<String>,
    options: Vec<(String, String)>,
    credentials: Option<(u32, u32)>,
    /// Turns for commands run to the end (queries, copies), shared by every
    /// clone of the handle: peers can ask for work that runs Nix, and each
    /// process costs far more than waiting for a turn.
    turns: Arc<tokio::sync::Semaphore>,
    /// The store connection opened ahead of need, if the handle keeps one.
    spare: Option<Arc<daemon::Spare>>,
}

/// Nix commands run to the end at once through one handle; more wait.
const MAX_RUNNING: usize = 8;

/// Builds a [`Nix`] handle.
#[derive(Debug, Clone)]
pub struct NixBuilder {
    config: Config,
}

impl NixBuilder {
    /// Runs `nix` and `nix-store` from this directory instead of looking them up on `PATH`.
    pub fn program_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.program_dir = Some(dir.into());
        self
    }

    /// Sets an environment variable for every command (e.g. `NIX_CONF_DIR`, `NIX_REMOTE`,
    /// `XDG_CACHE_HOME`). It wins over the same variable passed through from drv-thru's environment.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        let key = key.into();
        self.config.env.retain(|(k, _)| *k != key);
        self.config.env.push((key, value.into()));
        self
    }

    /// Passes one more variable through from drv-thru's environment, if it is set.
    pub fn inherit_env(mut self, key: impl Into<String>) -> Self {
        self.config.passthrough.push(key.into());
        self
    }

    /// Replaces the list of variables passed through from drv-thru's environment
    /// ([`DEFAULT_PASSTHROUGH_ENV`] by default). An empty list passes nothing.
    pub fn passthrough_env<I, S>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.passthrough = keys.into_iter().map(Into::into).collect();
        self
    }

    /// Uses this store (`--store URL`, e.g. `daemon`, `local?root=/x`, `unix:///path/socket`)
    /// instead of the configured one.
    pub fn store(mut self, url: impl Into<String>) -> Self {
        self.config.store = Some(url.into());
        self
    }

    /// Passes `--option NAME VALUE` to every command. A later call for the same name wins.
    pub fn option(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        self.config.options.retain(|(n, _)| *n != name);
        self.config.options.push((name, value.into()));
        self
    }

    /// Runs every command as this user and group with no supplementary groups (needs root).
    /// Meant for a privileged process that must talk to the store as an ordinary user.
    pub fn run_as(mut self, uid: u32, gid: u32) -> Self {
        self.config.credentials = Some((uid, gid));
        self
    }

    /// Keeps a connection to the store (a `nix-daemon --stdio` that has asked nothing yet) open
    /// ahead of need, so that a query or import does not wait the tens of milliseconds Nix takes
    /// to start: one idle process for the handle and its clones, opened after each connection the
    /// handle makes, the first one included.
    pub fn spare_connection(mut self) -> Self {
        self.config.spare = Some(Arc::default());
        self
    }

    /// The handle.
    pub fn build(self) -> Nix {
        Nix {
            config: Arc::new(self.config),
        }
    }
}

impl Default for Nix {
    fn default() -> Self {
        Self::new()
    }
}

impl Nix {
    /// A handle using the `nix` on `PATH`, the configured store and the default environment.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder starting from the same defaults as [`Nix::new`].
    pub fn builder() -> NixBuilder {
        NixBuilder {
            config: Config {
                program_dir: None,
                passthrough: DEFAULT_PASSTHROUGH_ENV
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect(),
                env: Vec::new(),
                store: None,
                options: Vec::new(),
                credentials: None,
                turns: Arc::new(tokio::sync::Semaphore::new(MAX_RUNNING)),
                spare: None,
            },
        }
    }

    /// Evaluates an installable once, writing its `.drv` files to the store and returning each
    /// derivation with the paths of the outputs the installable selects.
    ///
    /// Runs `nix build --dry-run --json --no-link [flags] -- INSTALLABLE`, with the `nix-command`
    /// and `flakes` features enabled. The installable is one argument, e.g. `path:/dir#attr`,
    /// `github:o/r#x`, or an attribute path when [`EvalFlags::file`] is set. Which outputs are
    /// selected by default differs between versions (2.8 picks `out` of a `--file` attribute,
    /// 2.26 all outputs), so callers should not rely on more than `out` being present.
    pub async fn evaluate(
        &self,
        installable: &str,
        flags: &EvalFlags,
    ) -> Result<Vec<Evaluated>, NixCmdError> {
        if installable.contains('\0') {
            return Err(NixCmdError::InvalidArgument(
                "installable contains a nul byte".into(),
            ));
        }
        let mut args: Vec<OsString> = ["build", "--dry-run", "--json", "--no-link"]
            .map(OsString::from)
            .to_vec();
        if flags.impure {
            args.push("--impure".into());
        }
        if flags.refresh {
            args.push("--refresh".into());
        }
        for (input, flake_ref) in &flags.override_inputs {
            args.extend(["--override-input".into(), input.into(), flake_ref.into()]);
        }
        if let Some(file) = &flags.file {
            args.extend(["--file".into(), file.as_os_str().to_owned()]);
        }
        args.extend(["--".into(), installable.into()]);
        let line = self.command_line(Program::Nix, args);
        let output = self.run_ok(&line).await?;
        parse::evaluated(&output.stdout_text()).map_err(|reason| output.parse_error(&line, reason))
    }

    /// Questions about paths, asked together on one connection to the store; see [`Questions`].
    pub async fn questions(&self) -> Result<Questions, NixCmdError> {
        Ok(Questions::new(self.connection().await?))
    }

    /// The given paths that are not valid in the store, in the order given: one question on a
    /// connection of its own ([`Questions::invalid_paths`]).
    pub async fn invalid_paths(&self, paths: &[StorePath]) -> Result<Vec<StorePath>, NixCmdError> {
        self.questions().await?.invalid_paths(paths).await
    }

    /// What the store knows about the given valid paths and everything they refer to: one
    /// question on a connection of its own ([`Questions::closure_infos`]).
    pub async fn closure_infos(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, NixCmdError> {
        self.questions().await?.closure_infos(paths).await
    }

    /// Points the symlink `link` at the valid `path` and registers it as a
    /// garbage-collector root, as `nix build`'s `result` link is.
    ///
    /// Runs `nix-store --add-root LINK --realise PATH`, which makes an
    /// indirect root on every version.
    pub async fn add_root(&self, link: &Path, path: &StorePath) -> Result<(), NixCmdError> {
        let args: Vec<OsString> = vec![
            "--add-root".into(),
            link.as_os_str().to_owned(),
            "--realise".into(),
            path.to_string().into(),
        ];
        self.run_ok(&self.command_line(Program::NixStore, args))
            .await?;
        Ok(())
    }

    /// The output paths of the given valid derivations, sorted and without duplicates.
    ///
    /// Read from the `.drv` files themselves where the store is the default one (a `.drv` file's
    /// path is the hash of its contents, so whatever holds that path holds those contents);
    /// otherwise, or if one cannot be read or names no path for an output, asked of `nix-store
    /// --query --outputs`, in batches. A Nix process would cost more than reading the files.
    pub async fn derivation_outputs(
        &self,
        drvs: &[StorePath],
    ) -> Result<Vec<StorePath>, NixCmdError> {
        if self.config.store.is_none() {
            let files = drvs.to_vec();
            if let Ok(Some(outputs)) =
                tokio::task::spawn_blocking(move || outputs_from_drv_files(&files)).await
            {
                return Ok(outputs);
            }
        }
        let mut outputs = BTreeSet::new();
        for batch in batches(drvs) {
            let mut args: Vec<OsString> = vec!["--query".into(), "--outputs".into()];
            args.extend(batch.iter().map(|p| OsString::from(p.to_string())));
            let line = self.command_line(Program::NixStore, args);
            let output = self.run_ok(&line).await?;
            outputs.extend(
                parse::path_lines(&output.stdout_text())
                    .map_err(|reason| output.parse_error(&line, reason))?,
            );
        }
        Ok(outputs.into_iter().collect())
    }

    /// What the store knows about the given paths: one question on a connection of its own
    /// ([`Questions::path_info`]).
    pub async fn path_info(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, NixCmdError> {
        self.questions().await?.path_info(paths).await
    }

    /// Streams the NAR serialisation of a valid path (`nix-store --dump PATH`).
    ///
    /// The process is killed if the stream is dropped early. If Nix fails (e.g. the path is not
    /// valid; it may already have written the NAR header) the read that reaches the end of the
    /// stream returns the error, so a complete read means a complete NAR.
    pub fn dump(&self, path: &StorePath) -> Result<NarDump, NixCmdError> {
        let line = self.command_line(
            Program::NixStore,
            vec!["--dump".into(), path.to_string().into()],
        );
        NarDump::spawn(self, line)
    }

    /// Starts building `drv` (all outputs, or the named ones), in a process group of its own.
    ///
    /// Runs `nix-store --realise DRV[!OUT,…] --log-format internal-json -v`. With `check`, the
    /// outputs are first realised as usual (a no-op if they are valid) and then rebuilt with
    /// `--check` and compared, so checking works on a store that never built them. With `root`,
    /// the outputs become garbage-collector roots as they are realised (`--add-root ROOT`):
    /// symlinks `ROOT` for `out` and `ROOT-NAME` for the others, registered as indirect roots on
    /// 2.8 and 2.26 alike, so deleting the links ends them. Without one, Nix warns that the result
    /// might be garbage-collected. Must be called from within a tokio runtime. See [`RealiseRun`]
    /// for events, waiting and killing.
    pub fn realise(
        &self,
        drv: &StorePath,
        outputs: Option<&[String]>,
        check: bool,
        root: Option<&Path>,
    ) -> Result<RealiseRun, NixCmdError> {
        if !drv.is_derivation() {
            return Err(NixCmdError::InvalidArgument(format!(
                "{drv} is not a derivation"
            )));
        }
        let mut target = drv.to_string();
        if let Some(outputs) = outputs {
            if outputs.is_empty() {
                return Err(NixCmdError::InvalidArgument(format!(
                    "no outputs of {drv} requested"
                )));
            }
            if let Some(bad) = outputs.iter().find(|o| !is_output_name(o)) {
                return Err(NixCmdError::InvalidArgument(format!(
                    "invalid output name {bad:?}"
                )));
            }
            target = format!("{target}!{}", outputs.join(","));
        }
        let step = |check: bool| {
            let mut args: Vec<OsString> = vec!["--realise".into(), target.clone().into()];
            if check {
                args.push("--check".into());
            } else if let Some(root) = root {
                // The check step changes no output, so the first step's roots hold for both.
                args.extend(["--add-root".into(), root.as_os_str().to_owned()]);
            }
            args.extend(["--log-format", "internal-json", "-v"].map(OsString::from));
            self.command_line(Program::NixStore, args)
        };
        let mut steps = vec![step(false)];
        if check {
            steps.push(step(true));
        }
        RealiseRun::start(self, steps)
    }

    /// Copies paths and their closures from another store (`nix copy --from URL`).
    ///
    /// With a key, `--option trusted-public-keys KEY` makes it the only trusted key for this copy;
    /// `require_sigs` sets `--option require-sigs`. Both are restricted settings: a daemon ignores
    /// them for users that are not trusted (see [`Nix::trust`]) and applies its own. `.drv` paths
    /// are copied as files (`--derivation`), not built. For a plain `file:///dir` URL, the
    /// directories Nix insists on creating even to read (`nar/`, `realisations/`, `log/`) are made
    /// first if possible, so a cache that the Nix user cannot write to still works.
    pub async fn copy_from(
        &self,
        url: &str,
        paths: &[StorePath],
        trusted_public_key: Option<&PublicKey>,
        require_sigs: bool,
    ) -> Result<(), NixCmdError> {
        let mut options = Vec::new();
        if let Some(key) = trusted_public_key {
            options.push(("trusted-public-keys".to_owned(), key.to_string()));
        }
        options.push(("require-sigs".to_owned(), require_sigs.to_string()));
        if let Some(dir) = url.strip_prefix("file://").filter(|d| d.starts_with('/')) {
            // Best effort: if this fails, Nix reports the problem itself.
            let _ = cache::prepare_dir(Path::new(dir.split('?').next().unwrap_or(dir)));
        }
        let url = OsString::from(url);
        self.copy(&["--from".into(), url], &options, paths, false)
            .await
    }

    /// Writes paths and their closures into a `file://` binary cache in `dir` (created if need
    /// be), as `nix copy --to 'file://DIR?compression=…'` does. Unsigned; narinfos carry `CA:` for
    /// content-addressed paths. `.drv` paths are copied as files.
    pub async fn copy_to_file_cache(
        &self,
        dir: &Path,
        paths: &[StorePath],
        compression: CacheCompression,
    ) -> Result<(), NixCmdError> {
        let url = format!("{}?compression={}", file_url(dir)?, compression.as_str());
        self.copy(&["--to".into(), url.into()], &[], paths, false)
            .await
    }

    /// Adds paths to the store without needing a trusted user: content-addressed paths (`.drv`
    /// files, sources, fixed outputs), and input-addressed paths whose narinfos carry signatures,
    /// which the store checks against its own `trusted-public-keys`. Each path's NAR comes from
    /// what `open` gives for it, read once the paths it refers to are in.
    ///
    /// Nix accepts a content-addressed path without a signature because it recomputes the store
    /// path from the content address, name and references, and refuses the NAR if its content
    /// does not match the content address (`ca hash mismatch`); this works the same for an
    /// ordinary user through a nix-daemon (checked on Nix 2.8, 2.26 and 2.34). An input-addressed
    /// path needs a signature by a trusted key: the import runs with `require-sigs` on, which a
    /// daemon enforces for users that are not trusted anyway.
    ///
    /// Before Nix sees anything, every narinfo is checked: a content address must give back its
    /// store path from its name and references, and a narinfo without one must carry
    /// signatures, so nothing else can be smuggled in: a narinfo that fails this is refused with
    /// [`NixCmdError::NotContentAddressed`]. The paths go to Nix in dependency order, through one
    /// `nix-daemon --stdio`; any reference outside `infos` must already be valid. Nix registers
    /// each path once its NAR is whole and checked, and answers only when all are.
    pub async fn add_verifiable<S, E>(
        &self,
        infos: Vec<NarInfo>,
        open: impl FnMut(&StorePath) -> Result<S, E>,
    ) -> Result<(), NixCmdError>
    where
        S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: fmt::Display,
    {
        let ordered = verifiable::check_and_order(infos)?;
        let mut connection = self.connection().await?;
        let added = connection.add(&ordered, open).await;
        connection.finish(added).await
    }

    /// Whether the store treats the current user as trusted, and which signing keys it trusts.
    ///
    /// Takes the store's own word where it gives it: from Nix 2.15 on, the store says whether it
    /// trusts the client when a connection opens, as `nix store info` reports. Nix 2.8 does not;
    /// then the answer is worked out from `nix show-config --json` (`nix config show --json` on
    /// newer Nix) as the daemon does it: root, or a `trusted-users` entry `*`, the user's name, or
    /// `@group` for the user's primary group or a group listing the user. That reads the client's
    /// configuration, which is normally the daemon's `/etc/nix/nix.conf` too.
    pub async fn trust(&self) -> Result<TrustInfo, NixCmdError> {
        trust::probe(self).await
    }

    /// Runs `nix copy` with `direction` (`--from URL` / `--to URL`), one call for non-derivations
    /// and one with `--derivation` for `.drv` files, in batches.
    async fn copy(
        &self,
        direction: &[OsString],
        options: &[(String, String)],
        paths: &[StorePath],
        no_recursive: bool,
    ) -> Result<(), NixCmdError> {
        for (group, derivation) in split_derivations(paths) {
            for batch in batches(&group) {
                let mut args: Vec<OsString> = Vec::new();
                for (name, value) in options {
                    args.extend(["--option".into(), name.into(), value.into()]);
                }
                args.push("copy".into());
                args.extend(direction.iter().cloned());
                if no_recursive {
                    args.push("--no-recursive".into());
                }
                push_paths(&mut args, batch, derivation);
                let line = self.command_line(Program::Nix, args);
                self.run_ok(&line).await?;
            }
        }
        Ok(())
    }

    /// The full command line for `program` with `args` after the handle's global flags.
    fn command_line(&self, program: Program, args: Vec<OsString>) -> CommandLine {
        let config = &self.config;
        let mut full: Vec<OsString> = Vec::new();
        if program == Program::Nix {
            full.extend(
                ["--extra-experimental-features", "nix-command flakes"].map(OsString::from),
            );
        }
        if let Some(store) = &config.store {
            full.extend(["--store".into(), store.into()]);
        }
        for (name, value) in &config.options {
            full.extend(["--option".into(), name.into(), value.into()]);
        }
        full.extend(args);
        CommandLine::new(program, full)
    }

    /// The program to run for `program`.
    fn program_path(&self, program: Program) -> OsString {
        match &self.config.program_dir {
            Some(dir) => dir.join(program.name()).into_os_string(),
            None => OsStr::new(program.name()).to_owned(),
        }
    }
}

impl fmt::Display for CacheCompression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The output paths written in the `.drv` files `drvs`, or `None` if one cannot be read or parsed,
/// or leaves an output's path to be decided (content-addressed and impure outputs).
fn outputs_from_drv_files(drvs: &[StorePath]) -> Option<Vec<StorePath>> {
    let mut outputs = BTreeSet::new();
    for drv in drvs {
        let bytes = std::fs::read(drv.to_string()).ok()?;
        let parsed = crate::nix::drv::Derivation::parse(&bytes).ok()?;
        for output in parsed.outputs().values() {
            outputs.insert(output.path()?.clone());
        }
    }
    Some(outputs.into_iter().collect())
}

/// Ends a `nix` command line with `paths`: `.drv` files need `--derivation`,
/// or newer Nix would take them for their outputs.
fn push_paths(args: &mut Vec<OsString>, paths: &[StorePath], derivation: bool) {
    if derivation {
        args.push("--derivation".into());
    }
    args.push("--".into());
    args.extend(paths.iter().map(|p| OsString::from(p.to_string())));
}

/// Splits paths into non-derivations and derivations (with `true`), leaving out empty groups.
fn split_derivations(paths: &[StorePath]) -> Vec<(Vec<StorePath>, bool)> {
    let (drvs, others): (Vec<StorePath>, Vec<StorePath>) =
        paths.iter().cloned().partition(StorePath::is_derivation);
    [(others, false), (drvs, true)]
        .into_iter()
        .filter(|(group, _)| !group.is_empty())
        .collect()
}

/// Splits paths into batches of at most [`MAX_ARG_BYTES`] of arguments.
fn batches(paths: &[StorePath]) -> Vec<&[StorePath]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, path) in paths.iter().enumerate() {
        let len = path.to_string().len() + 1;
        if i > start && bytes + len > MAX_ARG_BYTES {
            out.push(&paths[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += len;
    }
    if start < paths.len() {
        out.push(&paths[start..]);
    }
    out
}

/// Whether `name` is a derivation output name Nix accepts.
fn is_output_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
}

/// `file://DIR` for an absolute directory whose path needs no escaping in a store URL.
pub fn file_url(dir: &Path) -> Result<String, NixCmdError> {
    let text = dir.to_str().filter(|s| {
        s.starts_with('/')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._+-=,@~:".contains(&b))
    });
    match text {
        Some(text) => Ok(format!("file://{text}")),
        None => Err(NixCmdError::InvalidArgument(format!(
            "cache directory {:?} must be absolute and use only letters, digits and /._+-=,@~:",
            dir
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_and_connections_take_turns() {
        use std::os::unix::fs::PermissionsExt as _;
        // Stand-ins that stay a while, so overlapping runs are seen: how
        // many real Nix queries overlap depends on the machine's speed. The
        // daemon's never shakes hands, so its connections fail, but only
        // after holding their turn.
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        for program in ["nix-store", "nix-daemon"] {
            let script = dir.path().join(program);
            std::fs::write(
                &script,
                format!(
                    "#!/bin/sh\necho start >> {0}\nsleep 0.2\necho end >> {0}\n",
                    log.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let nix = Nix::builder().program_dir(dir.path()).build();
        let link = dir.path().join("root");
        let paths = [path("x")];
        let roots = (0..2 * MAX_RUNNING).map(|_| nix.add_root(&link, &paths[0]));
        let queries = (0..2 * MAX_RUNNING).map(|_| nix.invalid_paths(&paths));
        let (roots, queries) = futures::join!(
            futures::future::join_all(roots),
            futures::future::join_all(queries)
        );
        assert!(roots.into_iter().all(|added| added.is_ok()));
        assert!(queries.into_iter().all(|asked| asked.is_err()));
        let (mut running, mut most) = (0, 0);
        for line in std::fs::read_to_string(&log).unwrap().lines() {
            running = if line == "start" {
                running + 1
            } else {
                running - 1
            };
            most = most.max(running);
        }
        assert!(most <= MAX_RUNNING, "{most} ran at once");
        assert!(most > 1, "queries should still overlap");
    }

    fn path(name: &str) -> StorePath {
        format!("/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-{name}")
            .parse()
            .unwrap()
    }

    #[test]
    fn splits_derivations_from_other_paths() {
        let split = split_derivations(&[path("a.drv"), path("src"), path("b.drv")]);
        assert_eq!(
            split,
            [
                (vec![path("src")], false),
                (vec![path("a.drv"), path("b.drv")], true)
            ]
        );
        assert!(split_derivations(&[]).is_empty());
    }

    #[test]
    fn batches_bound_argument_bytes() {
        let paths: Vec<StorePath> = (0..5000).map(|i| path(&format!("p{i}"))).collect();
        let batches = batches(&paths);
        assert!(batches.len() > 1);
        assert_eq!(batches.iter().map(|b| b.len()).sum::<usize>(), 5000);
        for batch in &batches {
            let bytes: usize = batch.iter().map(|p| p.to_string().len() + 1).sum();
            assert!(bytes <= MAX_ARG_BYTES);
        }
        assert!(super::batches(&[]).is_empty());
    }

    #[test]
    fn file_urls_are_plain() {
        assert_eq!(
            file_url(Path::new("/var/lib/drv-thru/up-1")).unwrap(),
            "file:///var/lib/drv-thru/up-1"
        );
        for bad in ["relative", "/a b", "/a?b", "/a#b", "/a%20", "/a&b"] {
            assert!(file_url(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn output_names() {
        assert!(is_output_name("out"));
        assert!(is_output_name("dev-1"));
        assert!(!is_output_name(""));
        assert!(!is_output_name("a,b"));
        assert!(!is_output_name("a!b"));
        assert!(!is_output_name(".x"));
    }

    #[test]
    fn command_lines_put_global_flags_first() {
        let nix = Nix::builder()
            .store("daemon")
            .option("substituters", "")
            .option("substituters", "file:///c")
            .build();
        let line = nix.command_line(Program::Nix, vec!["path-info".into(), "--json".into()]);
        assert_eq!(
            line.to_string(),
            "nix --extra-experimental-features 'nix-command flakes' --store daemon \
             --option substituters file:///c path-info --json"
        );
        let line = nix.command_line(Program::NixStore, vec!["-qR".into()]);
        assert_eq!(
            line.to_string(),
            "nix-store --store daemon --option substituters file:///c -qR"
        );
    }

    #[tokio::test]
    async fn realise_refuses_bad_arguments() {
        let nix = Nix::new();
        let err = |r: Result<RealiseRun, NixCmdError>| r.err().unwrap().to_string();
        assert!(err(nix.realise(&path("x"), None, false, None)).contains("not a derivation"));
        assert!(err(nix.realise(&path("x.drv"), Some(&[]), false, None)).contains("no outputs"));
        assert!(
            err(nix.realise(&path("x.drv"), Some(&["a,b".into()]), false, None))
                .contains("invalid output name")
        );
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let nix = Nix::builder().program_dir("/nonexistent-nix-dir").build();
        let err = nix.invalid_paths(&[path("x")]).await.unwrap_err();
        assert!(matches!(err, NixCmdError::Spawn { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("cannot run `nix-daemon --option require-sigs true --stdio`")
        );
    }
}
