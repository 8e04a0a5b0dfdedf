//! Separate Nix stores on one machine, as two machines would have: each
//! store is a directory bind-mounted over `/nix` in a private mount
//! namespace, so store paths are identical everywhere and an upload or an
//! import really moves data.
//!
//! The one copy of this world, included with `#[path]` by the real-Nix unit
//! tests (`src/nixcmd/real_nix_tests.rs`), the integration tests, the transfer
//! benchmark and the demo. It uses only std, `libc` and `tempfile`, so the
//! library's own unit tests can include it too. By default the host's Nix
//! (Debian 12: 2.8) runs. With `DRV_THRU_TEST_NIX_ROOT=DIR` every command runs
//! inside that Debian root instead (trixie's Nix 2.26 or sid's 2.34, made by
//! `tests/nix/make-debian-root.sh`).

// Each includer uses a different part of this file.
#![allow(dead_code)]

use std::{
    ffi::OsStr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

/// Nix settings every store shares: offline, no sandbox (the fixtures'
/// builders are the host's busybox or `/bin/sh`) and no build users, since
/// every store would pick nixbld1 from its own pool and Nix kills all
/// processes of a build user before using it.
pub const NIX_CONF: &str = "sandbox = false\nsubstituters =\nexperimental-features = nix-command \
                            flakes\nbuild-users-group =\nwarn-dirty = false\n";

/// Reports that a test cannot run here. Under CI (`CI` set) that is a
/// failure, so a machine that lost root or Nix cannot pass by skipping.
pub fn skip(reason: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "CI is set, so this must not be skipped: {reason}"
    );
    eprintln!("skipping: {reason}");
}

/// Whether stores can be made here (root and Nix); reports why not through
/// [`skip`].
pub fn available() -> bool {
    // SAFETY: geteuid(2) cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let nix = Command::new("nix-store").arg("--version").output().is_ok();
    if !root || !nix {
        skip("end-to-end tests need root and Nix (run tests/run.sh as root)");
    }
    root && nix
}

/// `unshare` running `program` with `store` bound over `/nix` in a private
/// mount namespace (in a user namespace of its own when not root).
/// `program` replaces the shell, so the child's pid is the program's own.
pub fn in_store(store: &Path, program: impl AsRef<OsStr>) -> Command {
    in_store_with_etc(store, None, program)
}

/// [`in_store`], with `etc/upper` (and its work directory `etc/work`)
/// layered over `/etc` when `etc` is given, so the command sees files in
/// `/etc` the host does not have.
fn in_store_with_etc(store: &Path, etc: Option<&Path>, program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new("unshare");
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        command.args(["--user", "--map-root-user"]);
    }
    command
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            r#"mount --bind "$1" /nix && shift && if [ -n "$1" ]; then mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1/upper,workdir=$1/work" /etc; fi && shift && exec "$@""#,
        )
        .arg("sh")
        .arg(store)
        .arg(etc.unwrap_or(Path::new("")))
        .arg(program);
    command
}

/// Makes `command` run offline, with no inherited drv-thru settings.
pub fn offline(mut command: Command) -> Command {
    command
        .env_remove("RUST_LOG")
        .env_remove("DRV_THRU_DATA_DIR")
        .env("DRV_THRU_RELAY", "disabled");
    command
}

/// The stores' world: a scratch directory, a Nix configuration and a test
/// flake, shared by its stores.
pub struct World {
    /// `stores/NAME` are the stores, `home/NAME` their users' homes.
    pub dir: PathBuf,
    /// The test flake (`tests/data/e2e`), when made by [`World::new`].
    pub flake: PathBuf,
    conf: PathBuf,
    /// The Debian root whose Nix runs here, if not the host's.
    root: Option<PathBuf>,
    _temp: Option<tempfile::TempDir>,
}

impl World {
    /// A fresh world in a temporary directory (removed when dropped) with
    /// the test flake, its derivations salted with `salt` so no store has
    /// them yet.
    pub fn new(salt: &str) -> Self {
        let temp = tempfile::Builder::new()
            .prefix("drv-thru-e2e-")
            .tempdir_in("/tmp")
            .unwrap();
        let mut world = Self::at(temp.path().to_owned(), "");
        world._temp = Some(temp);
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/e2e");
        copy_dir(&fixture, &world.flake);
        std::fs::create_dir_all(world.flake.join("bb/bin")).unwrap();
        let busybox = busybox().expect("busybox is installed (apt-get install busybox-static)");
        std::fs::copy(busybox, world.flake.join("bb/bin/busybox")).unwrap();
        std::fs::write(
            world.flake.join("params.nix"),
            format!("{{ salt = \"{salt}\"; }}\n"),
        )
        .unwrap();
        world
    }

    /// A world in `dir`, which outlives it, without the test flake;
    /// `extra_conf` is added to [`NIX_CONF`].
    pub fn at(dir: PathBuf, extra_conf: &str) -> Self {
        let conf = dir.join("conf");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("nix.conf"), format!("{NIX_CONF}{extra_conf}")).unwrap();
        Self {
            flake: dir.join("flake"),
            dir,
            conf,
            root: std::env::var_os("DRV_THRU_TEST_NIX_ROOT").map(PathBuf::from),
            _temp: None,
        }
    }

    /// A new, empty store named `name`.
    pub fn store(self: &Arc<Self>, name: &str) -> Store {
        let dir = self.dir.join("stores").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Store {
            world: self.clone(),
            dir,
            home: self.dir.join("home").join(name),
            netns: None,
            etc: None,
            root: self.root.clone(),
        }
    }

    /// The Debian root whose Nix runs in this world's stores
    /// (`DRV_THRU_TEST_NIX_ROOT`), or `None` for the host's.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// `path:FLAKE#attr`.
    pub fn installable(&self, attr: &str) -> String {
        format!("path:{}#{attr}", self.flake.display())
    }
}

/// The host's static busybox, which the fixtures' builders run.
pub fn busybox() -> Option<&'static str> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|path| Path::new(path).exists())
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
    /// The directory mounted at `/nix`.
    pub dir: PathBuf,
    /// The machine's user's home.
    pub home: PathBuf,
    netns: Option<String>,
    etc: Option<PathBuf>,
    root: Option<PathBuf>,
}

/// Environment variables a command in a Debian root's store may see.
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
    /// This store, its commands seeing `dir/upper` over their `/etc` (e.g.
    /// `dir/upper/drv-thru/builders.json` as `/etc/drv-thru/builders.json`).
    pub fn with_etc(mut self, dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("upper")).unwrap();
        std::fs::create_dir_all(dir.join("work")).unwrap();
        self.etc = Some(dir.to_owned());
        self
    }

    /// This store, its commands run by the Nix of the Debian root `root`
    /// rather than the world's (see [`World::root`]); `None` is the host's.
    pub fn on_root(mut self, root: Option<&Path>) -> Self {
        self.root = root.map(Path::to_owned);
        self
    }

    /// This store, its commands run in the network namespace `name`.
    pub fn in_netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// A command that runs `program` with this store mounted at `/nix`,
    /// offline.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        std::fs::create_dir_all(self.home.join(".config")).unwrap();
        let mut command = match (&self.root, &self.netns) {
            (None, None) => in_store_with_etc(&self.dir, self.etc.as_deref(), program),
            (None, Some(netns)) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]);
                let unshare = in_store(&self.dir, program);
                command.arg(unshare.get_program()).args(unshare.get_args());
                command
            }
            (Some(root), _) => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nix/in-root.sh");
                // The drv-thru under test must be visible inside the root
                // too (the library's unit tests have none).
                let mut bind = self.world.dir.display().to_string();
                if let Some(bin) = option_env!("CARGO_BIN_EXE_drv-thru") {
                    let dir = Path::new(bin).parent().expect("a binary is in a directory");
                    bind = format!("{bind} {}", dir.display());
                }
                let mut command = Command::new(script);
                command
                    .arg(root)
                    .arg(program)
                    .env("NIXDIR", &self.dir)
                    .env("ETCDIR", self.etc.as_deref().unwrap_or(Path::new("")))
                    .env("BIND", bind)
                    .env("PASSENV", PASSED.join(" "));
                command
            }
        };
        command
            .env("NIX_CONF_DIR", &self.world.conf)
            .env("XDG_CACHE_HOME", "/nix/var/xdg-cache")
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .env("HOME", &self.home);
        offline(command)
    }

    /// Runs a command in this store and returns its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("running {program}: {err}"))
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> String {
        let output = self.run(program, args);
        assert!(
            output.status.success(),
            "{program} {args:?} failed ({}): {}",
            output.status,
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
        self.start_daemon_with("")
    }

    /// [`Self::start_daemon`] with `extra_conf` added to its `nix.conf`.
    pub fn start_daemon_with(&self, extra_conf: &str) -> Daemon {
        let conf = self
            .world
            .dir
            .join("daemon-conf")
            .join(self.dir.file_name().expect("a store directory has a name"));
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(
            conf.join("nix.conf"),
            format!(
                "sandbox = false\nsubstituters =\nexperimental-features = nix-command flakes\n\
             build-users-group = nixbld\ntrusted-users = root\nallowed-users = *\n{extra_conf}"
            ),
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
