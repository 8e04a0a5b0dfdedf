//! Nix's scheduler spreading builds over two drv-thru builders: three
//! stores on one machine. The client's `nix-daemon` has the machine lines
//! `drv-thru machines` prints for both, and the builders run different Nix
//! versions: the first the client's, the second the host's 2.8 when the
//! client runs in a Debian root, else Debian trixie's 2.26.
//!
//! The cases one builder cannot show live here; those it can (trust of the
//! builder's key, reach, `-L`, forged inputs) are in `scale_out.rs` and
//! `builds.rs`.

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    builder::{Builder, binary, launcher_in},
    builds::{build_processes, path_infos, salt, wait_until},
    two_stores::{Daemon, Store, World, available, skip},
};

/// Where `tests/run.sh` makes the Debian trixie root (Nix 2.26).
const TRIXIE: &str = "/var/cache/drv-thru-tests/trixie";

/// The builders' names in `/etc/drv-thru/builders.json`.
const NAMES: [&str; 2] = ["b1", "b2"];

/// A client store with its daemon and two builders, each in a store of its
/// own.
struct Fleet {
    // First, so that it and its build hooks stop before the rest goes.
    _daemon: Daemon,
    salt: String,
    world: Arc<World>,
    client: Store,
    stores: [Store; 2],
    builders: [Builder; 2],
}

impl Fleet {
    /// A fleet whose builders have `scheduling` (each a JSON object of
    /// builders.json scheduling fields) and, with `trust`, trust each
    /// other's signing keys; `None` if it cannot be made here.
    fn new(test: &str, scheduling: [serde_json::Value; 2], trust: bool) -> Option<Self> {
        if !available() {
            return None;
        }
        let salt = salt(test);
        let world = Arc::new(World::new(&salt));
        let second_root = match world.root() {
            Some(_) => None,
            None if Path::new(TRIXIE).join("usr/bin/nix").exists() => Some(PathBuf::from(TRIXIE)),
            None => {
                skip(&format!(
                    "the second builder needs Nix 2.26 in {TRIXIE} (tests/run.sh makes it)"
                ));
                return None;
            }
        };
        let etc = world.dir.join("etc");
        let client = world.store("client").with_etc(&etc);
        let drv_thru_etc = etc.join("upper/drv-thru");
        let machine =
            drv_thru::keys::load_or_create_endpoint_key(&drv_thru_etc.join("machine.key"))
                .unwrap()
                .public()
                .to_string();
        let stores = [
            world.store(NAMES[0]),
            world.store(NAMES[1]).on_root(second_root.as_deref()),
        ];
        let builders = [0, 1].map(|i| {
            Builder::start_with(
                launcher_in(&stores[i], binary()),
                world.dir.join(format!("data-{}", NAMES[i])),
                &["--trusted-client", &machine, "--max-concurrent-builds", "2"],
            )
        });
        let keys = builders
            .each_ref()
            .map(|b| std::fs::read_to_string(b.data_dir.join("signing-public.key")).unwrap());
        if trust {
            // All stores share one Nix configuration, so each builder's Nix now
            // takes the other's outputs as signed inputs.
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(world.dir.join("conf/nix.conf"))
                .unwrap();
            std::io::Write::write_all(
                &mut conf,
                format!(
                    "trusted-public-keys = {} {}\n",
                    keys[0].trim(),
                    keys[1].trim()
                )
                .as_bytes(),
            )
            .unwrap();
        }
        let mut entries = serde_json::Map::new();
        for ((name, builder), (key, mut entry)) in
            NAMES.iter().zip(&builders).zip(keys.iter().zip(scheduling))
        {
            let fields = entry.as_object_mut().expect("scheduling is a JSON object");
            fields.insert("endpoint_id".into(), builder.endpoint_id.to_string().into());
            fields.insert("addrs".into(), vec![builder.addr.to_string()].into());
            fields.insert("public_key".into(), key.trim().into());
            entries.insert((*name).to_owned(), entry);
        }
        std::fs::write(
            drv_thru_etc.join("builders.json"),
            serde_json::json!({ "builders": entries }).to_string(),
        )
        .unwrap();
        let machines = client.command(binary()).arg("machines").output().unwrap();
        assert!(
            machines.status.success(),
            "drv-thru machines: {}",
            String::from_utf8_lossy(&machines.stderr)
        );
        let machines_file = world.dir.join("machines");
        std::fs::write(&machines_file, &machines.stdout).unwrap();
        let daemon =
            client.start_daemon_with(&format!("builders = @{}\n", machines_file.display()));
        Some(Self {
            _daemon: daemon,
            salt,
            world,
            client,
            stores,
            builders,
        })
    }

    /// `nix-build -j0 --no-out-link -A ATTR…` of the test graph through the
    /// client's daemon.
    fn nix_build(&self, attrs: &[&str]) -> Command {
        let mut command = self.client.command("nix-build");
        command
            .arg(self.world.flake.join("graph.nix"))
            .args(["--argstr", "salt", &self.salt, "-j0", "--no-out-link"])
            .args(attrs.iter().flat_map(|attr| ["-A", attr]))
            .env("NIX_REMOTE", "daemon")
            .stdin(Stdio::null());
        command
    }

    /// Runs [`Self::nix_build`], which must succeed; returns its stderr.
    fn build(&self, attrs: &[&str]) -> String {
        let output = self.nix_build(attrs).output().unwrap();
        self.assert_built(&output);
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// Asserts that `output` is of a successful build, showing Nix's
    /// stderr and every log if not.
    fn assert_built(&self, output: &Output) {
        assert!(
            output.status.success(),
            "nix-build failed: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.logs()
        );
    }

    /// The output path of `attr`.
    fn out_path(&self, attr: &str) -> String {
        let graph = self.world.flake.join("graph.nix");
        let expression = format!(
            "(import {} {{ salt = \"{}\"; }}).{attr}.outPath",
            graph.display(),
            self.salt
        );
        self.client
            .run_ok("nix-instantiate", &["--eval", "--expr", &expression])
            .trim()
            .trim_matches('"')
            .to_owned()
    }

    /// The builders (by index) that built `path` themselves, rather than
    /// importing it.
    fn built_by(&self, path: &str) -> Vec<usize> {
        (0..2)
            .filter(|&i| {
                self.stores[i].has(path)
                    && path_infos(&self.stores[i], &[path])
                        .iter()
                        .all(|(_, info)| info["ultimate"] == true)
            })
            .collect()
    }

    /// Whether `path` in builder `on`'s store carries builder `by`'s
    /// signature.
    fn signed_by(&self, on: usize, path: &str, by: usize) -> bool {
        let key =
            std::fs::read_to_string(self.builders[by].data_dir.join("signing-public.key")).unwrap();
        let prefix = format!("{}:", key.split(':').next().unwrap());
        path_infos(&self.stores[on], &[path])
            .iter()
            .any(|(_, info)| {
                info["signatures"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s.as_str().unwrap().starts_with(&prefix))
            })
    }

    /// The client daemon's log and the builders', for a failure message.
    fn logs(&self) -> String {
        let daemon = std::fs::read_to_string(self.world.dir.join("daemon-conf/client/daemon.log"))
            .unwrap_or_default();
        format!(
            "daemon:\n{daemon}\n{}:\n{}\n{}:\n{}",
            NAMES[0],
            self.builders[0].log(),
            NAMES[1],
            self.builders[1].log()
        )
    }

    /// The slot lock files of Nix's build hook in the client's store, each
    /// with whether a process still holds it.
    fn slot_locks(&self) -> Vec<(String, bool)> {
        let dir = self.client.dir.join("var/nix/current-load");
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("{dir:?}: {err}"));
        entries
            .flatten()
            .map(|entry| {
                let file = std::fs::File::open(entry.path()).unwrap();
                // Nix holds a slot with flock(2) while a build runs there.
                // SAFETY: the descriptor is open for the call.
                let free =
                    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
                (entry.file_name().to_string_lossy().into_owned(), !free)
            })
            .collect()
    }

    /// How many builds `builder` runs or queues now.
    fn active(&self, builder: usize) -> usize {
        let status: serde_json::Value =
            serde_json::from_str(&self.builders[builder].cli_ok(&["status", "--json"])).unwrap();
        status["active"].as_array().unwrap().len() + status["queued"].as_array().unwrap().len()
    }
}

/// A builders.json entry's scheduling columns.
fn scheduling(max_jobs: u32, speed_factor: u32, features: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "max_jobs": max_jobs,
        "speed_factor": speed_factor,
        "supported_features": features,
    })
}

#[test]
fn four_builds_split_two_and_two() {
    let Some(fleet) = Fleet::new(
        "split",
        [scheduling(2, 1, &[]), scheduling(2, 1, &[])],
        true,
    ) else {
        return;
    };
    let start = Instant::now();
    let stderr = fleet.build(&["naps"]);
    let took = start.elapsed();
    eprintln!("four 3-second builds and their dependent took {took:?}");

    let naps: Vec<String> = (0..4).map(|i| fleet.out_path(&format!("nap{i}"))).collect();
    let mut per_builder = [0; 2];
    for nap in &naps {
        let built_by = fleet.built_by(nap);
        assert_eq!(built_by.len(), 1, "{nap} was built once: {built_by:?}");
        per_builder[built_by[0]] += 1;
        assert!(fleet.client.has(nap), "{nap} reached the client");
    }
    assert_eq!(per_builder, [2, 2], "{stderr}\n{}", fleet.logs());
    // The dependent's builder took the other's two as signed inputs.
    let naps_out = fleet.out_path("naps");
    let [last] = fleet.built_by(&naps_out)[..] else {
        panic!("naps was built by one builder");
    };
    for nap in &naps {
        assert!(
            fleet.built_by(nap) == [last] || fleet.signed_by(last, nap, 1 - last),
            "{nap} is on the last builder, built there or signed by the other"
        );
    }
    assert!(fleet.client.has(&naps_out));
    // `nix-build` shows both builders' log lines.
    for i in 0..4 {
        assert!(stderr.contains(&format!("nap {i}: sleeping")), "{stderr}");
    }
    let locks = fleet.slot_locks();
    for name in NAMES {
        assert!(
            locks
                .iter()
                .any(|(file, _)| file.contains(&format!("remote-store={name}-"))),
            "{name} had a slot: {locks:?}"
        );
    }
    wait_until("no slot lock is held", Duration::from_secs(5), || {
        fleet.slot_locks().iter().all(|(_, held)| !held)
    });
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn outputs_of_an_untrusted_builder_are_built_again() {
    let Some(fleet) = Fleet::new(
        "untrusted",
        [scheduling(2, 1, &[]), scheduling(2, 1, &[])],
        false,
    ) else {
        return;
    };
    fleet.build(&["naps"]);
    let [last] = fleet.built_by(&fleet.out_path("naps"))[..] else {
        panic!("naps was built by one builder");
    };
    for i in 0..4 {
        let nap = fleet.out_path(&format!("nap{i}"));
        assert!(
            fleet.built_by(&nap).contains(&last),
            "the last builder built {nap} itself"
        );
        assert!(!fleet.signed_by(last, &nap, 1 - last));
    }
}

#[test]
fn required_features_pick_the_builder_that_has_them() {
    // The first builder is faster, so Nix would prefer it but for the
    // feature.
    let Some(fleet) = Fleet::new(
        "features",
        [scheduling(2, 10, &[]), scheduling(2, 1, &["big-parallel"])],
        true,
    ) else {
        return;
    };
    let stderr = fleet.build(&["big0", "big1"]);
    for attr in ["big0", "big1"] {
        let path = fleet.out_path(attr);
        assert_eq!(
            fleet.built_by(&path),
            vec![1],
            "{attr} was built where big-parallel is\n{stderr}"
        );
        assert!(!fleet.stores[0].has(&path));
        assert!(fleet.client.has(&path));
    }
}

#[test]
fn with_one_builder_stopped_the_other_builds_everything() {
    let Some(mut fleet) = Fleet::new(
        "one-stopped",
        [scheduling(2, 1, &[]), scheduling(2, 1, &[])],
        true,
    ) else {
        return;
    };
    fleet.builders[1].stop();
    let stderr = fleet.build(&["naps"]);
    for attr in ["nap0", "nap1", "nap2", "nap3", "naps"] {
        let path = fleet.out_path(attr);
        assert_eq!(fleet.built_by(&path), vec![0], "{attr}\n{stderr}");
        assert!(fleet.client.has(&path));
    }
    assert!(
        stderr.contains(&format!("cannot reach builder \"{}\"", NAMES[1])),
        "Nix shows why it passed over the stopped builder:\n{stderr}"
    );
}

#[test]
fn interrupting_nix_stops_the_builds_on_both_builders() {
    let Some(fleet) = Fleet::new(
        "interrupt",
        [scheduling(1, 1, &[]), scheduling(1, 1, &[])],
        true,
    ) else {
        return;
    };
    let mut nix = fleet
        .nix_build(&["quiet", "slow"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "each builder runs one of the builds",
        Duration::from_secs(120),
        || fleet.active(0) == 1 && fleet.active(1) == 1,
    );
    wait_until("the builds run", Duration::from_secs(60), || {
        build_processes(&fleet.salt).len() >= 2
    });
    // SAFETY: the pid is our child's, not yet reaped.
    unsafe { libc::kill(nix.id() as i32, libc::SIGINT) };
    nix.wait().unwrap();
    wait_until(
        "no build process is left on either builder",
        Duration::from_secs(5),
        || build_processes(&fleet.salt).is_empty(),
    );
}
