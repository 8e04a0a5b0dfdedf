//! A `drv-thru serve` process, found through its `--ready-json` line: the
//! one builder launcher of the integration tests, the transfer benchmark and
//! the demo (each includes this file with `#[path]`, next to
//! `two_stores.rs`).

// Each includer uses a different part of this file.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use drv_thru::{client::Target, server::Ready, ticket::Ticket};
use iroh::EndpointId;

use super::two_stores::{Store, offline};

/// The `drv-thru` binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_drv-thru")
}

/// A `drv-thru` command on the host, offline.
pub fn command() -> Command {
    offline(Command::new(binary()))
}

/// How to start a `drv-thru` process: on the host, or inside a store.
pub type Launcher = Arc<dyn Fn() -> Command + Send + Sync>;

/// Launches `bin` (e.g. [`binary`]) in `store`.
pub fn launcher_in(store: &Store, bin: impl Into<PathBuf>) -> Launcher {
    let (store, bin) = (store.clone(), bin.into());
    Arc::new(move || store.command(&bin))
}

/// How a builder is started.
#[derive(Clone)]
pub struct Options {
    /// `--listen`.
    pub listen: String,
    /// Its `RUST_LOG`.
    pub rust_log: String,
    /// Further `serve` arguments.
    pub args: Vec<String>,
}

impl Options {
    /// On a loopback port of its own, logging at debug level, with `args`.
    pub fn new(args: &[&str]) -> Self {
        Self {
            listen: "127.0.0.1:0".to_owned(),
            rust_log: "drv_thru=debug,iroh=warn".to_owned(),
            args: args.iter().map(ToString::to_string).collect(),
        }
    }
}

/// A running `drv-thru serve`, stopped when dropped.
pub struct Builder {
    child: Option<Child>,
    /// Its `--data-dir`.
    pub data_dir: PathBuf,
    /// Its endpoint id.
    pub endpoint_id: EndpointId,
    /// Its first direct address.
    pub addr: SocketAddr,
    /// What it reported when ready.
    pub ready: Ready,
    log: Arc<Mutex<Vec<String>>>,
    options: Options,
    launcher: Launcher,
}

impl Builder {
    /// Starts a builder on the host, on a fresh data directory in `dir`.
    pub fn start(dir: &Path, extra_args: &[&str]) -> Self {
        Self::start_with(Arc::new(command), dir.join("data"), extra_args)
    }

    /// Starts a builder whose processes `launcher` makes (e.g. in a store).
    pub fn start_with(launcher: Launcher, data_dir: PathBuf, extra_args: &[&str]) -> Self {
        Self::start_in(launcher, data_dir, Options::new(extra_args))
    }

    /// Starts a builder as `options` say; waits until it is ready.
    pub fn start_in(launcher: Launcher, data_dir: PathBuf, options: Options) -> Self {
        let mut command = launcher();
        command
            .args(["serve", "--ready-json", "--listen", &options.listen])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(&options.args)
            .env("RUST_LOG", &options.rust_log)
            .stdout(Stdio::piped());
        let (mut child, _, log) = spawn_with_stderr(command);
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let ready: Ready = serde_json::from_str(&line).unwrap_or_else(|err| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "builder did not report ready ({err}: {line:?}); its log:\n{}",
                log.lock().unwrap().join("\n")
            )
        });
        Self {
            child: Some(child),
            data_dir,
            endpoint_id: ready.endpoint_id.parse().expect("a valid endpoint id"),
            addr: *ready
                .direct_addresses
                .first()
                .expect("the builder listens somewhere"),
            ready,
            log,
            options,
            launcher,
        }
    }

    /// The builder's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the builder is running").id()
    }

    /// Stops the builder gracefully (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait().unwrap();
            assert!(
                status.success(),
                "builder exited with {status}; log:\n{}",
                self.log()
            );
        }
    }

    /// Kills the builder with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts the builder again on the same data directory.
    pub fn restart(mut self) -> Self {
        self.stop();
        Self::start_in(
            self.launcher.clone(),
            self.data_dir.clone(),
            self.options.clone(),
        )
    }

    /// Starts a stopped or killed builder again on the same data directory.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "stop or kill the builder first");
        *self = Self::start_in(
            self.launcher.clone(),
            self.data_dir.clone(),
            self.options.clone(),
        );
    }

    /// The builder's log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Runs a `drv-thru` command against this builder's data directory.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut command = (self.launcher)();
        command
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdin(Stdio::null());
        command.output().unwrap()
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "drv-thru {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Creates a ticket with extra `ticket create` flags.
    pub fn ticket(&self, flags: &[&str]) -> Ticket {
        let mut args = vec!["ticket", "create"];
        args.extend_from_slice(flags);
        self.cli_ok(&args)
            .trim()
            .parse()
            .expect("ticket create prints a ticket")
    }

    /// A trusted-client target for this builder.
    pub fn direct_target(&self) -> Target {
        Target::Direct {
            endpoint_id: self.endpoint_id,
            relay_url: None,
            addrs: vec![self.addr],
        }
    }
}

impl Drop for Builder {
    /// Stops the builder gracefully, so its builds stop too; kills it if it
    /// does not exit in time.
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A spawned process, its stderr lines as they come, and all of them so far.
pub type Spawned = (Child, mpsc::Receiver<String>, Arc<Mutex<Vec<String>>>);

/// Spawns `command` with no stdin or stdout, collecting its stderr lines.
pub fn spawn_logged(mut command: Command) -> Spawned {
    command.stdout(Stdio::null());
    spawn_with_stderr(command)
}

/// Spawns `command` with no stdin, collecting its stderr lines.
fn spawn_with_stderr(mut command: Command) -> Spawned {
    let mut child = command
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let log = Arc::new(Mutex::new(Vec::new()));
    let log_writer = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            log_writer.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
    (child, rx, log)
}
