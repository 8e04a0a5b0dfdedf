//! Nix's own scheduler building through drv-thru: a client store whose
//! `nix-daemon` has the machine line
//! `ssh-ng://localhost?remote-program=DRV_THRU&remote-store=NAME`, so Nix's
//! build hook runs `drv-thru --stdio --store NAME` as root, which builds on
//! a drv-thru builder in a store of its own.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use drv_thru::nix::signing::SecretKey;

use crate::{
    builder::{Builder, binary, launcher_in},
    builds::{build_processes, salt, wait_until},
    two_stores::{Daemon, Store, World, available},
};

/// A client store with its daemon and the machine line, and one builder.
struct Scheduled {
    salt: String,
    world: Arc<World>,
    client: Store,
    builder_store: Store,
    builder: Builder,
    _daemon: Daemon,
}

impl Scheduled {
    /// A builder named `b1` in `/etc/drv-thru/builders.json` of the client's
    /// namespace, trusting the machine key `/etc/drv-thru/machine.key`.
    fn new(test: &str) -> Self {
        Self::configured(test, None)
    }

    /// [`Self::new`], with `public_key` configured for the builder instead
    /// of its own.
    fn configured(test: &str, public_key: Option<&str>) -> Self {
        let salt = salt(test);
        let world = Arc::new(World::new(&salt));
        let etc = world.dir.join("etc");
        let client = world.store("client").with_etc(&etc);
        let drv_thru_etc = etc.join("upper/drv-thru");
        let machine =
            drv_thru::keys::load_or_create_endpoint_key(&drv_thru_etc.join("machine.key"))
                .unwrap()
                .public();
        let builder_store = world.store("builder");
        let builder = Builder::start_with(
            launcher_in(&builder_store, binary()),
            world.dir.join("data"),
            &["--trusted-client", &machine.to_string()],
        );
        let own_key = std::fs::read_to_string(builder.data_dir.join("signing-public.key")).unwrap();
        write_builders_json(
            &drv_thru_etc,
            &builder,
            public_key.unwrap_or(own_key.trim()),
        );
        let daemon = client.start_daemon_with(&format!(
            "builders = ssh-ng://localhost?remote-program={}&remote-store=b1 x86_64-linux - 1 1\n",
            binary()
        ));
        Self {
            salt,
            world,
            client,
            builder_store,
            builder,
            _daemon: daemon,
        }
    }

    /// `nix build -j0 -L` of `attrs` through the client's daemon.
    fn nix_build(&self, attrs: &[&str]) -> Command {
        let installables: Vec<String> = attrs.iter().map(|a| self.world.installable(a)).collect();
        let mut command = self.client.command("nix");
        command
            .args(["build", "-j0", "-L", "--no-link", "--json"])
            .args(&installables)
            .env("NIX_REMOTE", "daemon");
        command
    }

    /// Runs [`Self::nix_build`].
    fn build(&self, attrs: &[&str]) -> std::process::Output {
        self.nix_build(attrs).output().unwrap()
    }

    /// The client daemon's log and the builder's, for a failure message.
    fn logs(&self) -> String {
        let daemon = std::fs::read_to_string(self.world.dir.join("daemon-conf/client/daemon.log"))
            .unwrap_or_default();
        format!("daemon:\n{daemon}\nbuilder:\n{}", self.builder.log())
    }
}

/// `/etc/drv-thru/builders.json` naming `builder` `b1`, with `public_key`.
fn write_builders_json(dir: &Path, builder: &Builder, public_key: &str) {
    std::fs::write(
        dir.join("builders.json"),
        format!(
            r#"{{"builders": {{"b1": {{"endpoint_id": "{}", "relay_url": null, "addrs": ["{}"], "public_key": "{}"}}}}}}"#,
            builder.endpoint_id,
            builder.addr,
            public_key
        ),
    )
    .unwrap();
}

/// The output paths `nix build --json` printed.
fn out_paths(json: &[u8]) -> Vec<String> {
    let built: serde_json::Value = serde_json::from_slice(json).unwrap();
    built
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["outputs"].as_object().unwrap().values())
        .map(|p| p.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn nix_offloads_through_the_machine_line() {
    if !available() {
        return;
    }
    let scheduled = Scheduled::new("machine-line");
    let output = scheduled.build(&["lib", "blob"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}\n{}", scheduled.logs());
    let outputs = out_paths(&output.stdout);
    assert_eq!(outputs.len(), 2, "lib's default output and blob's");
    for path in &outputs {
        assert!(
            scheduled.client.has(path),
            "{path} is valid in the client store"
        );
        assert!(
            scheduled.builder_store.has(path),
            "{path} was built on the builder"
        );
    }
    // Nix's hook fetches every output of lib, the other one too.
    assert!(
        scheduled
            .client
            .entries()
            .iter()
            .any(|e| e.ends_with("-testlib-dev")),
        "{stderr}"
    );
    // `-L` shows the builder's log lines, and no empty ones.
    assert!(stderr.contains("blob> blob: writing 8 MiB"), "{stderr}");
    assert!(
        !stderr.lines().any(|line| line.trim_end() == "blob>"),
        "{stderr}"
    );
}

/// The stdio program is for the daemon's hook, as root: run by anyone else
/// it cannot keep outputs where the hook's connections share them, and says
/// so in one line.
#[test]
fn the_stdio_program_needs_root() {
    if !available() {
        return;
    }
    let scheduled = Scheduled::new("stdio-root");
    let output = scheduled
        .client
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args([binary(), "--stdio", "--store", "b1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot keep outputs in /run/drv-thru/nix-stdio, as drv-thru --stdio does when nix-daemon runs it as root"),
        "{stderr}"
    );
}

/// A user Nix does not trust builds through the daemon as root would: the
/// daemon's hook runs the stdio program as root either way.
#[test]
fn an_unprivileged_users_build_offloads() {
    if !available() {
        return;
    }
    const NOBODY: u32 = 65534;
    let scheduled = Scheduled::new("unprivileged");
    // The user must reach the test flake and a home of its own.
    std::fs::set_permissions(&scheduled.world.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = scheduled.world.dir.join("nobody");
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
    let output = scheduled
        .client
        .command("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "nix",
            "build",
            "-j0",
            "--no-link",
            "--json",
            &scheduled.world.installable("app"),
        ])
        .env("NIX_REMOTE", "daemon")
        .env("HOME", &home)
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}\n{}", scheduled.logs());
    let [app] = &out_paths(&output.stdout)[..] else {
        panic!("one output: {stderr}");
    };
    assert!(scheduled.client.has(app), "{app} is in the client store");
    assert!(scheduled.builder_store.has(app), "{app} was built remotely");
}

#[test]
fn unreachable_builder_fails_fast_with_its_reason() {
    if !available() {
        return;
    }
    let mut scheduled = Scheduled::new("unreachable");
    scheduled.builder.kill();
    let start = Instant::now();
    let output = scheduled.build(&["lib"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("cannot reach builder \"b1\""),
        "{stderr}\n{}",
        scheduled.logs()
    );
    assert_eq!(
        stderr
            .lines()
            .filter(|line| line.contains("cannot reach builder"))
            .count(),
        1,
        "the reason is one line: {stderr}"
    );
    assert!(start.elapsed() < Duration::from_secs(10), "{stderr}");
}

#[test]
fn outputs_signed_by_another_key_are_refused() {
    if !available() {
        return;
    }
    let other = SecretKey::generate("other-key").unwrap().to_public();
    let scheduled = Scheduled::configured("other-key", Some(&other.to_string()));
    let output = scheduled.build(&["lib"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("not the public_key other-key:"),
        "{stderr}\n{}",
        scheduled.logs()
    );
    assert!(
        !scheduled
            .client
            .entries()
            .iter()
            .any(|e| e.ends_with("-testlib")),
        "nothing reached the client store"
    );
}

#[test]
fn interrupting_nix_stops_the_build_on_the_builder() {
    stopping_nix_stops_the_build_on_the_builder("interrupt", libc::SIGINT);
}

#[test]
fn killing_nix_stops_the_build_on_the_builder() {
    stopping_nix_stops_the_build_on_the_builder("kill", libc::SIGKILL);
}

/// Sends `signal` to the client's `nix build` during a long build: the
/// daemon kills the hook, the stdio program sees its stdin end, and the
/// builder's build process is gone within 5 s.
fn stopping_nix_stops_the_build_on_the_builder(test: &str, signal: libc::c_int) {
    if !available() {
        return;
    }
    let scheduled = Scheduled::new(test);
    let mut nix = scheduled
        .nix_build(&["quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "the builder runs the build",
        Duration::from_secs(60),
        || !build_processes(&scheduled.salt).is_empty(),
    );
    // SAFETY: the pid is our child's, not yet reaped.
    unsafe { libc::kill(nix.id() as i32, signal) };
    nix.wait().unwrap();
    wait_until(
        "the builder has no build process left",
        Duration::from_secs(5),
        || build_processes(&scheduled.salt).is_empty(),
    );
}
