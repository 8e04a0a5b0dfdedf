//! Separate Nix stores on one machine, as two machines would have: each
//! store is a directory bind-mounted over `/nix` in a private mount
//! namespace, so store paths are identical everywhere and an upload or an
//! import really moves data. Needs root (or is skipped).
//!
//! By default the host's Nix (Debian 12: 2.8) runs. With
//! `DRV_THRU_TEST_TRIXIE=DIR` every command runs inside that Debian trixie
//! root instead (Nix 2.26, see `tests/nix/make-trixie-root.sh`).

use std::{
    ffi::OsStr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::common::{Launcher, binary, offline};

/// Whether end-to-end tests can run here; prints why not when they cannot.
pub fn available() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let nix = Command::new("nix-store").arg("--version").output().is_ok();
    if !root || !nix {
        eprintln!("skipping: end-to-end tests need root and Nix (run tests/run.sh as root)");
    }
    root && nix
}

/// A test's Nix world: a scratch directory, a Nix configuration and the
/// test graph, shared by its stores.
pub struct World {
    pub dir: tempfile::TempDir,
    pub flake: PathBuf,
    conf: PathBuf,
    trixie: Option<PathBuf>,
}

impl World {
    /// A fresh world whose derivations are salted with `salt`, so no store
    /// has them yet.
    pub fn new(salt: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("drv-thru-e2e-")
            .tempdir_in("/tmp")
            .unwrap();
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(
            conf.join("nix.conf"),
            "sandbox = false\nsubstituters =\nexperimental-features = nix-command flakes\n\
             build-users-group =\nwarn-dirty = false\n",
        )
        .unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/e2e");
        let flake = dir.path().join("flake");
        copy_dir(&fixture, &flake);
        std::fs::create_dir_all(flake.join("bb/bin")).unwrap();
        std::fs::copy(busybox(), flake.join("bb/bin/busybox")).unwrap();
        std::fs::write(
            flake.join("params.nix"),
            format!("{{ salt = \"{salt}\"; }}\n"),
        )
        .unwrap();
        let trixie = std::env::var_os("DRV_THRU_TEST_TRIXIE").map(PathBuf::from);
        Self {
            dir,
            flake,
            conf,
            trixie,
        }
    }

    /// A new, empty store named `name`.
    pub fn store(self: &Arc<Self>, name: &str) -> Store {
        let dir = self.dir.path().join("stores").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Store {
            world: self.clone(),
            dir,
            home: self.dir.path().join("home").join(name),
        }
    }

    /// `path:FLAKE#attr`.
    pub fn installable(&self, attr: &str) -> String {
        format!("path:{}#{attr}", self.flake.display())
    }
}

fn busybox() -> &'static str {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .expect("busybox is installed (apt-get install busybox-static)")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// One machine's Nix store (and that machine's user home).
#[derive(Clone)]
pub struct Store {
    world: Arc<World>,
    pub dir: PathBuf,
    pub home: PathBuf,
}

/// Environment variables a command in a store may see.
const PASSED: &[&str] = &[
    "NIX_CONF_DIR",
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "HOME",
    "RUST_LOG",
    "DRV_THRU_RELAY",
    "NIX_REMOTE",
    "NIX_CONFIG",
    "DRV_THRU_IMPORT_HELPER_SOCKET",
];

impl Store {
    /// A command that runs `program` with this store mounted at `/nix`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        std::fs::create_dir_all(self.home.join(".config")).unwrap();
        let mut command = match &self.world.trixie {
            None => {
                let mut command = Command::new("unshare");
                command.args([
                    "-m",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    r#"mount --bind "$0" /nix && exec "$@""#,
                ]);
                command.arg(&self.dir);
                command
            }
            Some(root) => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nix/in-trixie.sh");
                let bin_dir = Path::new(binary()).parent().unwrap();
                let mut command = Command::new(script);
                command
                    .arg(root)
                    .env("NIXDIR", &self.dir)
                    .env(
                        "BIND",
                        format!("{} {}", self.world.dir.path().display(), bin_dir.display()),
                    )
                    .env("PASSENV", PASSED.join(" "));
                command
            }
        };
        command
            .arg(program)
            .env("NIX_CONF_DIR", &self.world.conf)
            .env("XDG_CACHE_HOME", "/nix/var/xdg-cache")
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .env("HOME", &self.home);
        offline(command)
    }

    /// Runs a command in this store and returns its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program).args(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> String {
        let output = self.run(program, args);
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Whether `path` is valid in this store.
    pub fn has(&self, path: &str) -> bool {
        self.run_ok("nix-store", &["--check-validity", "--print-invalid", path])
            .trim()
            .is_empty()
    }

    /// Starts a `nix-daemon` on this store, as on a multi-user machine: root
    /// is its only trusted user, builds run as the `nixbld` users and
    /// nothing is substituted. Commands reach it with `NIX_REMOTE=daemon`.
    pub fn start_daemon(&self) -> Daemon {
        let conf = self
            .world
            .dir
            .path()
            .join("daemon-conf")
            .join(self.dir.file_name().expect("a store directory has a name"));
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(
            conf.join("nix.conf"),
            "sandbox = false\nsubstituters =\nexperimental-features = nix-command flakes\n\
             build-users-group = nixbld\ntrusted-users = root\nallowed-users = *\n",
        )
        .unwrap();
        let log = conf.join("daemon.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut child = self
            .command("nix-daemon")
            .env("NIX_CONF_DIR", &conf)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let socket = self.dir.join("var/nix/daemon-socket/socket");
        let start = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            let exited = child.try_wait().unwrap();
            if exited.is_some() || start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!(
                    "nix-daemon did not start ({exited:?}); its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Daemon { child }
    }

    /// The names of the entries in this store's `/nix/store` directory
    /// (valid or not), to check that nothing arrived.
    pub fn entries(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("store"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Launches `drv-thru` processes in this store.
    pub fn launcher(&self) -> Launcher {
        let store = self.clone();
        Arc::new(move || store.command(binary()))
    }
}

/// A running `nix-daemon`; dropping it kills the daemon and every process it
/// started (its per-connection workers and their builds), which would
/// otherwise outlive it.
pub struct Daemon {
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // Stopped, it forks no new workers while its tree is collected.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        for descendant in descendants(pid) {
            unsafe { libc::kill(descendant, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every process below `pid`, children before their own children.
fn descendants(pid: i32) -> Vec<i32> {
    let mut parents: Vec<(i32, i32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `PID (COMM) STATE PPID ...`; COMM may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            parents.push((child, ppid));
        }
    }
    let mut found = vec![pid];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        next += 1;
    }
    found.remove(0);
    found
}
