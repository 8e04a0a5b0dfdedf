//! A builder process for tests, and clients for it.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use drv_thru::{
    client::{self, Connection, Target},
    endpoint::RelayChoice,
    proto::{self, builder_client::BuilderClient},
    ticket::Ticket,
};
use iroh::EndpointId;

/// The `drv-thru` binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_drv-thru")
}

/// A `drv-thru` command with a clean, offline environment.
pub fn command() -> Command {
    offline(Command::new(binary()))
}

/// Makes `command` run offline, with no inherited drv-thru settings.
pub fn offline(mut command: Command) -> Command {
    command
        .env_remove("RUST_LOG")
        .env_remove("DRV_THRU_DATA_DIR")
        .env("DRV_THRU_RELAY", "disabled");
    command
}

/// A running `drv-thru serve`, killed when dropped.
pub struct Builder {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub endpoint_id: EndpointId,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    extra_args: Vec<String>,
    launcher: Launcher,
}

/// How to start a `drv-thru` process: on the host, or inside a test store.
pub type Launcher = Arc<dyn Fn() -> Command + Send + Sync>;

fn host_launcher() -> Launcher {
    Arc::new(command)
}

impl Builder {
    /// Starts a builder on a fresh data directory.
    pub fn start(dir: &Path, extra_args: &[&str]) -> Self {
        Self::start_with(host_launcher(), dir.join("data"), extra_args)
    }

    /// Starts a builder whose processes `launcher` makes (e.g. in a store).
    pub fn start_with(launcher: Launcher, data_dir: PathBuf, extra_args: &[&str]) -> Self {
        Self::start_in(
            launcher,
            data_dir,
            extra_args.iter().map(ToString::to_string).collect(),
        )
    }

    fn start_in(launcher: Launcher, data_dir: PathBuf, extra_args: Vec<String>) -> Self {
        let (child, lines, log) = spawn_server(launcher(), &data_dir, &extra_args);
        let mut endpoint_id = None;
        let mut addr = None;
        loop {
            let line = match lines.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => line,
                Err(_) => panic!(
                    "builder did not become ready; its log:\n{}",
                    log.lock().unwrap().join("\n")
                ),
            };
            if let Some(rest) = line.split("endpoint_id=").nth(1) {
                endpoint_id = rest
                    .split_whitespace()
                    .next()
                    .and_then(|id| id.parse().ok());
            }
            if let Some(rest) = line.split("listening on ").nth(1) {
                addr = addr.or_else(|| rest.split_whitespace().next().and_then(|a| a.parse().ok()));
            }
            if line.contains("admin socket ready") {
                break;
            }
        }
        Self {
            child: Some(child),
            data_dir,
            endpoint_id: endpoint_id.expect("the log names the endpoint id"),
            addr: addr.expect("the log names a listening address"),
            log,
            extra_args,
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
        let data_dir = self.data_dir.clone();
        let args = std::mem::take(&mut self.extra_args);
        Self::start_in(self.launcher.clone(), data_dir, args)
    }

    /// Starts a stopped or killed builder again on the same data directory.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "stop or kill the builder first");
        *self = Self::start_in(
            self.launcher.clone(),
            self.data_dir.clone(),
            std::mem::take(&mut self.extra_args),
        );
    }

    /// The builder's log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Runs a `drv-thru` command against this builder's data directory.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut command = (self.launcher)();
        command.args(args).arg("--data-dir").arg(&self.data_dir);
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
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
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

fn spawn_server(mut command: Command, data_dir: &Path, extra_args: &[String]) -> Spawned {
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra_args)
        .env("RUST_LOG", "drv_thru=debug,iroh=warn");
    spawn_logged(command)
}

/// Spawns `command` with no stdin or stdout, collecting its stderr lines.
pub fn spawn_logged(mut command: Command) -> Spawned {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
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

/// A client key file in `dir` named `name` (created on first connect).
pub fn key_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

/// The endpoint id of the key in `path`, creating the key if needed.
pub fn endpoint_id_of(path: &Path) -> EndpointId {
    drv_thru::keys::load_or_create_endpoint_key(path)
        .unwrap()
        .public()
}

/// Connects to a builder as the client whose key is in `key`.
pub async fn connect(target: &Target, key: &Path) -> Connection {
    client::connect(target, RelayChoice::Disabled, Some(key))
        .await
        .unwrap()
}

/// An admission request for a real (tiny) derivation: a `.drv` fixture with
/// its true content address, NAR hash and size.
pub fn session_request() -> proto::OpenSessionRequest {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nix");
    let name = "hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv";
    let contents = std::fs::read(dir.join(name)).unwrap();
    let mut nar = Vec::new();
    drv_thru::store_nar::dump(
        &dir.join(name),
        drv_thru::transport::http2::CHUNK,
        |chunk| {
            nar.extend_from_slice(&chunk);
            Ok(())
        },
    )
    .unwrap();
    let sha256 = |bytes: &[u8]| drv_thru::nix::hash::Sha256Hash::digest(bytes);
    let drv_path = format!("/nix/store/{name}");
    proto::OpenSessionRequest {
        drv_path: drv_path.clone(),
        inputs: vec![proto::InputPath {
            store_path: drv_path,
            references: Vec::new(),
            content_address: format!("text:{}", sha256(&contents)),
            nar_hash: sha256(&nar).to_string(),
            nar_size: nar.len() as u64,
        }],
    }
}

/// Opens a build session; returns the response or the refusal.
pub async fn open_session(
    connection: &Connection,
) -> Result<proto::OpenSessionResponse, tonic::Status> {
    BuilderClient::new(connection.channel.clone())
        .open_session(session_request())
        .await
        .map(tonic::Response::into_inner)
}

/// The `drvthru-refusal` reason of a refused call.
pub fn refusal(status: &tonic::Status) -> &str {
    status
        .metadata()
        .get("drvthru-refusal")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
}
