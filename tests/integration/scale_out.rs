//! Nix's own scheduler building through drv-thru: a client store whose
//! `nix-daemon` has the machine line
//! `ssh-ng://localhost?remote-program=DRV_THRU&remote-store=NAME`, so Nix's
//! build hook runs `drv-thru --stdio --store NAME` as root, which builds on
//! a drv-thru builder in a store of its own.

use std::{path::Path, sync::Arc};

use crate::{
    builder::{Builder, binary, launcher_in},
    two_stores::{Daemon, Store, World, available},
};

/// A client store with its daemon and the machine line, and one builder.
struct Scheduled {
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
        let world = Arc::new(World::new(&crate::builds::salt(test)));
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
        write_builders_json(&drv_thru_etc, &builder);
        let daemon = client.start_daemon_with(&format!(
            "builders = ssh-ng://localhost?remote-program={}&remote-store=b1 x86_64-linux - 1 1\n",
            binary()
        ));
        Self {
            world,
            client,
            builder_store,
            builder,
            _daemon: daemon,
        }
    }

    /// `nix build -j0 -L` of `attrs` through the client's daemon.
    fn build(&self, attrs: &[&str]) -> std::process::Output {
        let installables: Vec<String> = attrs.iter().map(|a| self.world.installable(a)).collect();
        self.client
            .command("nix")
            .args(["build", "-j0", "-L", "--no-link", "--json"])
            .args(&installables)
            .env("NIX_REMOTE", "daemon")
            .output()
            .unwrap()
    }

    /// The client daemon's log and the builder's, for a failure message.
    fn logs(&self) -> String {
        let daemon = std::fs::read_to_string(self.world.dir.join("daemon-conf/client/daemon.log"))
            .unwrap_or_default();
        format!("daemon:\n{daemon}\nbuilder:\n{}", self.builder.log())
    }
}

/// `/etc/drv-thru/builders.json` naming `builder` `b1`, with its key.
fn write_builders_json(dir: &Path, builder: &Builder) {
    let public_key = std::fs::read_to_string(builder.data_dir.join("signing-public.key")).unwrap();
    std::fs::write(
        dir.join("builders.json"),
        format!(
            r#"{{"builders": {{"b1": {{"endpoint_id": "{}", "relay_url": null, "addrs": ["{}"], "public_key": "{}"}}}}}}"#,
            builder.endpoint_id,
            builder.addr,
            public_key.trim()
        ),
    )
    .unwrap();
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
    let built: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let outputs: Vec<&str> = built
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["outputs"].as_object().unwrap().values())
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(outputs.len(), 2, "lib's default output and blob's");
    for path in outputs {
        assert!(
            scheduled.client.has(path),
            "{path} is valid in the client store"
        );
        assert!(
            scheduled.builder_store.has(path),
            "{path} was built on the builder"
        );
    }
    // `-L` shows the builder's log lines.
    assert!(stderr.contains("blob: writing 8 MiB"), "{stderr}");
}
