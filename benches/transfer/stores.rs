//! The two stores and the builder process, on the shared test harness
//! (`tests/support/`).

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    builder::{Builder, Options},
    link::{BUILDER_IP, namespace},
    two_stores::{self, Store},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Builder,
    Client,
}

/// Where everything lives: the builder's and the client's stores in the
/// shared two-store world, plus what the benchmark adds around them.
pub(crate) struct World {
    pub(crate) dir: PathBuf,
    builder: Store,
    client: Store,
    /// Whether each side runs in its `--link` network namespace.
    pub(crate) link: bool,
    /// The client's `XDG_RUNTIME_DIR`: a private directory on a tmpfs, as a
    /// systemd login session has (`None` without `/dev/shm`).
    runtime: Option<tempfile::TempDir>,
}

impl World {
    /// The stores in `dir`, each in its `--link` network namespace if `link`.
    pub(crate) fn new(dir: PathBuf, link: bool) -> Self {
        let stores = Arc::new(two_stores::World::at(dir.clone(), "max-jobs = 2\n"));
        let store = |side: Side, name: &str| {
            let store = stores.store(name);
            std::fs::create_dir_all(store.home.join(".config/drv-thru")).expect("creating a home");
            if link {
                store.in_netns(&namespace(side))
            } else {
                store
            }
        };
        Self {
            builder: store(Side::Builder, "builder"),
            client: store(Side::Client, "client").with_etc(&dir.join("client-etc")),
            dir,
            link,
            runtime: tempfile::Builder::new()
                .prefix("drv-thru-bench-run-")
                .tempdir_in("/dev/shm")
                .ok(),
        }
    }

    fn store(&self, side: Side) -> &Store {
        match side {
            Side::Builder => &self.builder,
            Side::Client => &self.client,
        }
    }

    pub(crate) fn store_dir(&self, side: Side) -> &Path {
        &self.store(side).dir
    }

    /// The directory the client's commands see layered over their `/etc`.
    pub(crate) fn client_etc(&self) -> PathBuf {
        self.dir.join("client-etc/upper")
    }

    pub(crate) fn home(&self, side: Side) -> &Path {
        &self.store(side).home
    }

    /// `program` with `side`'s store mounted on `/nix` (and in `side`'s
    /// network namespace with `--link`).
    pub(crate) fn command(&self, side: Side, program: impl AsRef<OsStr>) -> Command {
        let mut command = isolated(self.store(side), &self.dir, program);
        if let (Side::Client, Some(runtime)) = (side, &self.runtime) {
            command.env("XDG_RUNTIME_DIR", runtime.path());
        }
        command
    }

    pub(crate) fn run_ok(&self, side: Side, program: &str, args: &[&str]) -> String {
        let output = self
            .command(side, program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("running {program}: {err}"));
        check(&output, program, args);
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }
    /// Deletes whichever of `paths` are valid, all at once.
    pub(crate) fn delete(&self, side: Side, paths: &[String]) {
        if paths.is_empty() {
            return;
        }
        let mut args = vec!["--check-validity", "--print-invalid"];
        args.extend(paths.iter().map(String::as_str));
        let invalid = self.run_ok(side, "nix-store", &args);
        let invalid: Vec<&str> = invalid.lines().collect();
        let valid: Vec<&str> = paths
            .iter()
            .map(String::as_str)
            .filter(|p| !invalid.contains(p))
            .collect();
        if valid.is_empty() {
            return;
        }
        let mut args = vec!["--delete"];
        args.extend(valid);
        // Nix counts files open in any process as roots, and both stores
        // share this machine's /proc: while the builder still reads its copy
        // of a path (compressing it for its cache), the client's copy of the
        // same path counts as alive.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let output = self
                .command(side, "nix-store")
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|err| panic!("running nix-store: {err}"));
            let alive = String::from_utf8_lossy(&output.stderr).contains("still alive");
            if output.status.success() || !alive || Instant::now() > deadline {
                check(&output, "nix-store", &args);
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Forgets Nix's narinfo cache, so every run asks its cache afresh.
    pub(crate) fn forget_narinfo_cache(&self, side: Side) {
        let _ = std::fs::remove_dir_all(self.store_dir(side).join("var/xdg-cache"));
    }
}

/// `program` in `store`, run from `dir`, with no Nix daemon or runtime
/// directory of this session.
fn isolated(store: &Store, dir: &Path, program: impl AsRef<OsStr>) -> Command {
    let mut command = store.command(program);
    command
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NIX_REMOTE")
        .current_dir(dir);
    command
}

fn check(output: &Output, program: &str, args: &[&str]) {
    assert!(
        output.status.success(),
        "{program} {} failed ({}):\n{}",
        shorten(&args.join(" ")),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn shorten(text: &str) -> String {
    if text.len() > 300 {
        format!("{}…", &text[..text.floor_char_boundary(300)])
    } else {
        text.to_owned()
    }
}

// === the builder process ===

/// Starts `bin` as the builder named `name`, trusting the client `trusted`.
pub(crate) fn start_builder(world: &World, bin: &Path, name: &str, trusted: &str) -> Builder {
    let listen = if world.link {
        format!("{BUILDER_IP}:0")
    } else {
        "127.0.0.1:0".to_owned()
    };
    let (store, dir, bin) = (
        world.store(Side::Builder).clone(),
        world.dir.clone(),
        bin.to_owned(),
    );
    Builder::start_in(
        Arc::new(move || isolated(&store, &dir, &bin)),
        world.dir.join(format!("builder-data-{name}")),
        Options {
            listen,
            rust_log: "drv_thru=info,iroh=warn".to_owned(),
            args: ["--trusted-client", trusted, "--max-concurrent-builds", "2"]
                .map(str::to_owned)
                .to_vec(),
        },
    )
}

/// Empties the builder's signed output cache.
pub(crate) fn clear_cache(builder: &Builder) {
    let cache = builder.data_dir.join("cache");
    if let Ok(entries) = std::fs::read_dir(&cache) {
        for entry in entries.flatten() {
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

/// The builder's `status --json`.
pub(crate) fn builder_status(world: &World, builder: &Builder) -> Value {
    let out = world.run_ok(
        Side::Builder,
        drv_thru_bin().to_str().expect("UTF-8 path"),
        &[
            "status",
            "--json",
            "--data-dir",
            builder.data_dir.to_str().expect("UTF-8 path"),
        ],
    );
    serde_json::from_str(&out).expect("status --json prints JSON")
}

pub(crate) fn drv_thru_bin() -> &'static Path {
    Path::new(crate::builder::binary())
}
