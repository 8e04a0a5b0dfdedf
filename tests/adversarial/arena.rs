//! The ground the attacks are made on: a builder in a store of its own, a
//! client store whose well-behaved builds must go through, and the means to
//! make hostile peers and the inputs they declare.

use std::{
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use drv_thru::{
    client::{Connection, Target},
    proto::{
        self, BuildRequest, OpenSessionRequest, UploadInputsRequest, build_response::Event,
        builder_client::BuilderClient,
    },
    ticket::Ticket,
};

use crate::{
    builder::{Builder, binary, launcher_in},
    common::{connect, key_file},
    two_stores::{Store, World},
};

/// The longest a well-behaved build may take beside an attack: its own few
/// seconds, and room for a connection refused while strangers hold every
/// unauthenticated slot until their authentication deadline.
pub const BUILD_BOUND: Duration = Duration::from_secs(90);

/// The configuration the suite's builders run with: the defaults, but a
/// short authentication deadline so a case holding every unauthenticated
/// slot frees them within the well-behaved build's bound.
const CONFIG: &str = r#"{ "authentication_timeout": "5s" }"#;

/// A builder, the store it builds in, and a client store beside it.
pub struct Arena {
    world: Arc<World>,
    client: Store,
    builder_store: Store,
    /// The builder under attack.
    pub builder: Builder,
    /// The well-behaved client's ticket.
    ticket: String,
    nonce: AtomicU64,
}

impl Arena {
    /// A fresh builder (and stores) named for `test`, warmed up by one
    /// well-behaved build so later ones upload nothing but their own `.drv`.
    pub fn start(test: &str) -> Self {
        let salt = format!("{test}-{}-{}", std::process::id(), proto::now_unix());
        let world = Arc::new(World::new(&salt));
        let client = world.store("client");
        let builder_store = world.store("builder");
        let config = world.dir.join("config.json");
        std::fs::write(&config, CONFIG).unwrap();
        let builder = Builder::start_with(
            launcher_in(&builder_store, binary()),
            world.dir.join("data"),
            &["--config", config.to_str().unwrap()],
        );
        let ticket = builder
            .ticket(&["--unlimited", "--expires", "1day", "--name", "well-behaved"])
            .to_string();
        let arena = Self {
            world,
            client,
            builder_store,
            builder,
            ticket,
            nonce: AtomicU64::new(0),
        };
        if let Err(err) = arena.well_behaved_build() {
            panic!("the warm-up build failed: {err}");
        }
        arena
    }

    /// Builds a derivation no store has yet, as a ticket holder would with
    /// `drv-thru build`; how long it took, or why it failed.
    pub fn well_behaved_build(&self) -> Result<Duration, String> {
        self.client_build("fresh", &self.ticket)
    }

    /// `drv-thru build` of the test flake's `attr` with `ticket`, with a
    /// fresh nonce for attributes that read one; how long it took, or its
    /// exit status and the end of its stderr.
    pub fn client_build(&self, attr: &str, ticket: &str) -> Result<Duration, String> {
        let nonce = self.nonce.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let output = self
            .client
            .command(binary())
            .args(["build", &self.world.installable(attr), "--impure"])
            .args(["--no-nom", "--no-link", "--ticket", ticket])
            .env("NIX_PATH", format!("nonce-{}-{nonce}", proto::now_unix()))
            .current_dir(&self.world.dir)
            .output()
            .unwrap();
        if output.status.success() {
            return Ok(started.elapsed());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        Err(format!(
            "{} after {:?}: {}",
            output.status,
            started.elapsed(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ))
    }

    /// The `drv-thru build` command for `attr` with `ticket`, to run (and
    /// perhaps kill) by hand.
    pub fn client_build_command(&self, attr: &str, ticket: &str) -> Command {
        let mut command = self.client.command(binary());
        command
            .args(["build", &self.world.installable(attr)])
            .args(["--no-nom", "--no-link", "--ticket", ticket])
            .current_dir(&self.world.dir);
        command
    }

    /// A key file for the peer called `name`.
    pub fn key(&self, name: &str) -> PathBuf {
        key_file(&self.world.dir, name)
    }

    /// A new ticket with `ticket create` flags.
    pub fn ticket(&self, flags: &[&str]) -> Ticket {
        self.builder.ticket(flags)
    }

    /// A connection as `name` holding a new ticket of its own with these
    /// `ticket create` flags.
    pub async fn holder_with(&self, name: &str, flags: &[&str]) -> Connection {
        let target = Target::Ticket(Box::new(self.ticket(flags)));
        connect(&target, &self.key(name)).await
    }

    /// A connection as `name` holding a new ticket of unlimited uses.
    pub async fn holder(&self, name: &str) -> Connection {
        self.holder_with(name, &["--unlimited", "--expires", "1day"])
            .await
    }

    /// A connection as `name`, a stranger with no ticket.
    pub async fn stranger(&self, name: &str) -> Connection {
        connect(&self.builder.direct_target(), &self.key(name)).await
    }

    /// Runs `program` in the client store; its stdout, trimmed.
    fn client_run(&self, program: &str, args: &[&str]) -> String {
        self.client.run_ok(program, args).trim().to_owned()
    }

    /// A derivation in the client store whose build writes `bytes` random
    /// bytes and needs nothing but the host's `/bin/sh` (the stores build
    /// unsandboxed), named uniquely; its `.drv` path.
    pub fn random_output_drv(&self, bytes: u64) -> String {
        let nonce = self.nonce.fetch_add(1, Ordering::Relaxed);
        let expression = format!(
            "derivation {{ name = \"random-{nonce}-{}\"; system = \"x86_64-linux\"; \
             builder = \"/bin/sh\"; args = [ \"-c\" \
             \"/usr/bin/head -c {bytes} /dev/urandom > $out\" ]; }}",
            proto::now_unix()
        );
        self.client_run("nix-instantiate", &["--expr", &expression])
    }

    /// How the client store describes the `.drv` at `path`, as
    /// `OpenSession` declares it, and its NAR.
    pub fn declared(&self, path: &str) -> (proto::InputPath, Vec<u8>) {
        // Without --derivation, Nix 2.8 describes the outputs instead.
        let json = self.client_run("nix", &["path-info", "--json", "--derivation", path]);
        let info: serde_json::Value = serde_json::from_str(&json).unwrap();
        let info = &info[0];
        let text = |key: &str| info[key].as_str().unwrap_or_default().to_owned();
        let references = info["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .filter(|r| r != path)
            .collect();
        let nar = self.client.run("nix-store", &["--dump", path]).stdout;
        let input = proto::InputPath {
            store_path: path.to_owned(),
            references,
            content_address: text("ca"),
            nar_hash: text("narHash"),
            nar_size: info["narSize"].as_u64().unwrap(),
        };
        (input, nar)
    }

    /// Opens a session on `connection` for a fresh derivation writing
    /// `bytes` random bytes, uploads it and builds it.
    pub async fn built_session(&self, connection: &Connection, bytes: u64) -> BuiltSession {
        let drv = self.random_output_drv(bytes);
        let (input, nar) = self.declared(&drv);
        let builder = || BuilderClient::new(connection.channel.clone());
        let session_id = builder()
            .open_session(OpenSessionRequest {
                drv_path: drv.clone(),
                inputs: vec![input],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .session_id;
        builder()
            .upload_inputs(tokio_stream::iter([UploadInputsRequest {
                session_id: session_id.clone(),
                store_path: drv,
                data: nar.into(),
                offset: 0,
            }]))
            .await
            .unwrap();
        let mut events = builder()
            .build(BuildRequest {
                session_id: session_id.clone(),
                rebuild: false,
            })
            .await
            .unwrap()
            .into_inner();
        let finished = loop {
            match events.message().await.unwrap().expect("the build finishes") {
                proto::BuildResponse {
                    event: Some(Event::Finished(finished)),
                } => break finished,
                _ => continue,
            }
        };
        assert_eq!(
            finished.result(),
            proto::BuildResult::Succeeded,
            "{finished:?}"
        );
        let output = &finished.outputs[0].store_path;
        let hash = output
            .trim_start_matches("/nix/store/")
            .split('-')
            .next()
            .unwrap();
        let url = crate::common::nar_url(connection, &session_id, output)
            .await
            .unwrap();
        BuiltSession {
            id: session_id,
            output_hash: hash.to_owned(),
            url,
        }
    }

    /// Where `store_path` is on the host, in the builder's store.
    pub fn builder_store_path(&self, store_path: &str) -> PathBuf {
        self.builder_store
            .dir
            .join("store")
            .join(store_path.trim_start_matches("/nix/store/"))
    }

    /// The bytes the builder has staged: its data directory's `uploads`,
    /// where sessions' inputs wait to be imported.
    pub fn staging_bytes(&self) -> u64 {
        tree_bytes(&self.builder.data_dir.join("uploads"))
    }
}

/// A session whose build succeeded, and where its output is in the cache.
pub struct BuiltSession {
    /// The session id.
    pub id: String,
    /// The hash part of its output's store path.
    pub output_hash: String,
    /// The `URL:` of its output's narinfo.
    pub url: String,
}

/// The bytes of the regular files under `dir` (0 if there is none).
fn tree_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => tree_bytes(&entry.path()),
            Ok(_) => entry.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}
