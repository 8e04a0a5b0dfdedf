//! Remote builds end to end: a builder and a client with separate Nix
//! stores, the real `drv-thru` binary on both sides, real Nix.

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use drv_thru::{
    client::{BuilderChannel, Target},
    proto::{
        self, build_response::Event, builder_client::BuilderClient, cache_client::CacheClient,
    },
    ticket::Ticket,
};

use crate::{
    common::{self, Builder, Launcher, connect, refusal},
    two_stores::{Store, World, available},
};

/// A builder and a client, each with its own store.
pub struct Pair {
    salt: String,
    pub world: Arc<World>,
    pub client: Store,
    pub builder_store: Store,
    pub builder: Builder,
}

impl Pair {
    pub fn new(salt: &str, builder_args: &[&str]) -> Self {
        Self::with_builder(
            salt,
            |store| crate::builder::launcher_in(store, crate::builder::binary()),
            builder_args,
        )
    }

    /// A pair whose builder `launcher` starts in the builder's store.
    fn with_builder(
        salt: &str,
        launcher: impl Fn(&Store) -> Launcher,
        builder_args: &[&str],
    ) -> Self {
        let world = Arc::new(World::new(salt));
        let client = world.store("client");
        let builder_store = world.store("builder");
        let builder = Builder::start_with(
            launcher(&builder_store),
            world.dir.join("data"),
            builder_args,
        );
        Self {
            salt: salt.to_owned(),
            world,
            client,
            builder_store,
            builder,
        }
    }

    /// Asserts that `output` is of a successful build, showing the client's
    /// stderr and the builder's log if not.
    pub fn assert_built(&self, output: &std::process::Output) {
        assert!(
            output.status.success(),
            "{}\nbuilder:\n{}",
            stderr(output),
            self.builder.log()
        );
    }

    pub fn ticket(&self, flags: &[&str]) -> String {
        let ticket: Ticket = self.builder.ticket(flags);
        ticket.to_string()
    }

    /// `drv-thru build path:FLAKE#attr ARGS --no-nom` in the client store.
    pub fn build(&self, attr: &str, args: &[&str]) -> std::process::Output {
        let installable = self.world.installable(attr);
        let mut all = vec!["build", installable.as_str(), "--no-nom"];
        all.extend_from_slice(args);
        self.client
            .command(crate::common::binary())
            .args(&all)
            .current_dir(&self.world.dir)
            .output()
            .unwrap()
    }

    pub fn out_path(&self, attr: &str) -> String {
        let expression = format!("{}.outPath", self.world.installable(attr));
        self.client.run_ok("nix", &["eval", "--raw", &expression])
    }
}

pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A salt no other test or run shares.
pub fn salt(test: &str) -> String {
    format!(
        "{test}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// Build processes of the world salted with `salt` (Nix passes derivation
/// attributes, the salt among them, in the builder's environment).
pub fn build_processes(salt: &str) -> Vec<String> {
    let marker = format!("salt={salt}\0");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if String::from_utf8_lossy(&environ).contains(&marker) {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
        }
    }
    found
}

/// Waits until `done`, failing after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn builder_active(pair: &Pair) -> usize {
    let status: serde_json::Value =
        serde_json::from_str(&pair.builder.cli_ok(&["status", "--json"])).unwrap();
    status["active"].as_array().unwrap().len() + status["queued"].as_array().unwrap().len()
}

#[test]
fn ticket_build_imports_signed_outputs_once() {
    if !available() {
        return;
    }
    let pair = Pair::new(&salt("ticket"), &[]);
    let ticket = pair.ticket(&[]);
    // Ranges of the large outputs over several streams, as on a long link.
    let output = pair.build("app", &["--ticket", &ticket, "--nar-fetches", "3", "-v"]);
    pair.assert_built(&output);
    // Small outputs come from files, the large text output over HTTP.
    let log = stderr(&output);
    assert!(log.contains("small outputs spooled"), "{log}");
    assert!(
        !log.contains("queued"),
        "an idle builder queues nothing: {log}"
    );
    assert!(log.contains("copy --from file:///"), "{log}");
    assert!(log.contains("copy --from http://127.0.0.1:"), "{log}");
    let app = pair.out_path("app");
    assert_eq!(stdout(&output).trim(), app);
    assert!(pair.client.has(&app));
    let key_name = ticket
        .parse::<Ticket>()
        .unwrap()
        .signing_key()
        .name()
        .to_owned();
    let sigs = pair.client.run_ok("nix", &["path-info", "--sigs", &app]);
    assert!(sigs.contains(&format!("{key_name}:")), "{sigs}");
    let result = pair.world.dir.join("result");
    assert_eq!(std::fs::read_link(&result).unwrap(), Path::new(&app));
    let run = pair.client.run_ok(&format!("{app}/bin/app"), &[]);
    assert!(
        run.contains("hello from the test source") && run.contains("libdata"),
        "{run}"
    );

    // The builder keeps compressible NARs as zstd and serves random data
    // straight from its store, copying nothing.
    let nar_dir = pair.builder.data_dir.join("cache/nar");
    let has = |suffix: &str| {
        std::fs::read_dir(&nar_dir)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(suffix))
            })
            .unwrap_or(false)
    };
    wait_until(
        "a compressed entry is kept",
        Duration::from_secs(20),
        || pair.builder.log().contains("cache entry compressed"),
    );
    assert!(has(".nar.zst"));
    assert!(!has(".nar"), "no plain NAR was copied into the cache");
    let seen = pair.builder.log().len();

    // A second client gets the compressed entry.
    let second = pair.world.store("client2");
    let output = second
        .command(crate::common::binary())
        .args([
            "build",
            &pair.world.installable("app"),
            "--no-nom",
            "--no-link",
            "--ticket",
            &pair.ticket(&[]),
        ])
        .output()
        .unwrap();
    pair.assert_built(&output);
    assert!(second.has(&app));
    let later = pair.builder.log()[seen..].to_owned();
    assert!(
        later
            .lines()
            .any(|line| line.contains("narinfo served") && line.contains(".nar.zst")),
        "the second client was served the compressed entry:\n{later}"
    );
    assert!(!later.contains("cache entry compressed"), "{later}");
    assert!(!has(".nar"), "{later}");

    // `fail` is not in the closure of `app`, so it must go to the builder.
    let again = pair.build("fail", &["--ticket", &ticket]);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("no uses left"),
        "{}",
        stderr(&again)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_are_garbage_collector_roots_until_the_client_has_them() {
    if !available() {
        return;
    }
    let pair = Pair::new(&salt("gcroots"), &[]);
    let target = drv_thru::client::Target::Ticket(Box::new(pair.builder.ticket(&[])));
    let connection = common::connect(&target, &pair.world.dir.join("client.key")).await;
    let session = common::open_session(&connection).await.unwrap().session_id;
    common::upload(&connection, &session, &[common::fixture_drv()])
        .await
        .unwrap();
    let finished = common::build(&connection, &session).await.unwrap();
    assert_eq!(finished.result(), drv_thru::proto::BuildResult::Succeeded);
    let output = finished.outputs[0].store_path.clone();
    let root = pair.builder.data_dir.join("gcroots").join(&session);

    // Built, not fetched yet: a collection on the builder keeps the output.
    let gc = || pair.builder_store.run_ok("nix-store", &["--gc"]);
    gc();
    assert!(pair.builder_store.has(&output), "{}", pair.builder.log());
    assert_eq!(
        std::fs::read_link(root.join("result")).unwrap(),
        Path::new(&output)
    );
    let nar = common::fetch_nar(&connection, &session, &output)
        .await
        .unwrap();
    assert!(!nar.is_empty());

    // Fetched and gone: the root goes with the session.
    connection.close().await;
    wait_until(
        "the session's roots are gone",
        Duration::from_secs(20),
        || !root.exists(),
    );
    gc();
    assert!(!pair.builder_store.has(&output));
}

/// Writes the large input source `checksum` reads; returns its contents.
fn write_big_input(pair: &Pair) -> Vec<u8> {
    let big = pair.world.flake.join("big");
    std::fs::create_dir_all(&big).unwrap();
    // Not a multiple of the part size, so the last part is short.
    let data: Vec<u8> = (0..(9 << 20) + 12_345u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(big.join("data.bin"), &data).unwrap();
    data
}

/// Large enough to be imported while it arrives, through the builder's
/// loopback cache.
#[test]
fn large_input_arrives_intact_in_parallel_parts() {
    if !available() {
        return;
    }
    let pair = Pair::new(&salt("big-input"), &[]);
    let data = write_big_input(&pair);
    // Several streams even on loopback, where one would be chosen.
    let output = pair.build(
        "checksum",
        &[
            "--ticket",
            &pair.ticket(&[]),
            "--no-link",
            "--nar-fetches",
            "3",
        ],
    );
    pair.assert_built(&output);
    let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&data).into();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let out = pair.out_path("checksum");
    let line = pair.client.run_ok("cat", &[&out]);
    assert!(line.starts_with(&hex), "{line} vs {hex}");
    assert!(!pair.data_dir_has_uploads());
}

/// An input whose bytes do not match what the client announced is caught
/// while the builder's Nix is already reading it: Nix is stopped before it
/// can finish, and nothing of the upload becomes valid or stays staged.
/// (Nix may leave the invalid directory it was writing, as after any
/// interrupted substitution; it deletes that before it next adds the path.)
#[test]
fn corrupt_large_input_is_refused_while_importing() {
    if !available() {
        return;
    }
    let pair = Pair::new(&salt("corrupt-input"), &[]);
    write_big_input(&pair);
    // Evaluating adds the source to the client's store; then it rots there.
    pair.out_path("checksum");
    let source = pair
        .client
        .entries()
        .into_iter()
        .find(|name| name.ends_with("-big-src"))
        .expect("the source is in the client's store");
    let file = pair.client.dir.join("store").join(&source).join("data.bin");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();

    let output = pair.build("checksum", &["--ticket", &pair.ticket(&[])]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("does not match its announced hash"),
        "{}\nbuilder:\n{}",
        stderr(&output),
        pair.builder.log()
    );
    assert!(!pair.builder_store.has(&format!("/nix/store/{source}")));
    // The refusal may reach the client before the staging, removed on the
    // builder's blocking pool, is gone.
    wait_until("the staging is removed", Duration::from_secs(10), || {
        !pair.data_dir_has_uploads()
    });
    wait_until(
        "the builder's import is stopped",
        Duration::from_secs(10),
        || children_named(pair.builder.pid(), "nix").is_empty(),
    );
}

/// A builder may hold only a few files open, fewer than the inputs it
/// receives: staging keeps a file open only while its parts are coming.
#[test]
fn many_inputs_need_few_open_files() {
    if !available() {
        return;
    }
    let pair = Pair::with_builder(
        &salt("many-inputs"),
        |store| {
            let store = store.clone();
            Arc::new(move || {
                let mut command = store.command("prlimit");
                command.args(["--nofile=128", "--", crate::common::binary()]);
                command
            })
        },
        &[],
    );
    let output = pair.build("many", &["--ticket", &pair.ticket(&[])]);
    pair.assert_built(&output);
    let count = pair.client.run_ok("cat", &[&pair.out_path("many")]);
    assert_eq!(count.trim(), "300");
}

/// Processes named `name` whose parent is `parent`.
fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …; comm may hold spaces, so split at the last ')'.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let comm = head.split_once(" (").map_or("", |(_, comm)| comm);
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if comm == name && ppid == Some(parent) {
            found.extend(
                entry
                    .file_name()
                    .to_str()
                    .and_then(|p| p.parse::<u32>().ok()),
            );
        }
    }
    found
}

#[test]
fn named_builder_with_direct_addresses() {
    if !available() {
        return;
    }
    let world_salt = salt("named");
    let world = Arc::new(World::new(&world_salt));
    let client = world.store("client");
    let key = client.home.join(".config/drv-thru/secret.key");
    let me = drv_thru::keys::load_or_create_endpoint_key(&key)
        .unwrap()
        .public();
    let builder_store = world.store("builder");
    let builder = Builder::start_with(
        crate::builder::launcher_in(&builder_store, crate::builder::binary()),
        world.dir.join("data"),
        &["--trusted-client", &me.to_string()],
    );
    let public_key = std::fs::read_to_string(builder.data_dir.join("signing-public.key")).unwrap();
    std::fs::write(
        client.home.join(".config/drv-thru/builders.json"),
        format!(
            r#"{{"builders": {{"leviathan": {{"endpoint_id": "{}", "relay_url": null, "addrs": ["{}"], "public_key": "{}"}}}}}}"#,
            builder.endpoint_id,
            builder.addr,
            public_key.trim()
        ),
    )
    .unwrap();
    let pair = Pair {
        salt: world_salt,
        world,
        client,
        builder_store,
        builder,
    };
    let output = pair.build("lib", &["--builder", "leviathan", "--no-link", "--json"]);
    pair.assert_built(&output);
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let out = json[0]["outputs"]["out"].as_str().unwrap().to_owned();
    assert!(pair.client.has(&out));
    assert!(pair.builder_store.has(&out));
}

#[test]
fn failing_build_exits_1_with_its_log() {
    if !available() {
        return;
    }
    let pair = Pair::new(&salt("fail"), &[]);
    let output = pair.build("fail", &["--ticket", &pair.ticket(&[])]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(err.contains("fail: about to fail"), "{err}");
    assert!(
        err.contains("error: the build failed on the builder"),
        "{err}"
    );
}

#[test]
fn locally_valid_outputs_skip_the_builder() {
    if !available() {
        return;
    }
    let world = Arc::new(World::new(&salt("local")));
    let client = world.store("client");
    let installable = world.installable("lib");
    client.run_ok("nix", &["build", "--no-link", &installable]);
    let nobody = iroh::SecretKey::generate().public().to_string();
    let output = client
        .command(crate::common::binary())
        .args(["build", &installable, "--server", &nobody, "--no-link"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).trim().ends_with("-testlib"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn time_limit_stops_the_whole_build() {
    if !available() {
        return;
    }
    let pair = Pair::new(&salt("limit"), &[]);
    let started = Instant::now();
    let output = pair.build(
        "slow",
        &["--ticket", &pair.ticket(&["--max-build-time", "3s"])],
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("max_build_time of 3s"),
        "{}",
        stderr(&output)
    );
    // Well short of the build's own 60 s, however loaded the machine.
    assert!(started.elapsed() < Duration::from_secs(55));
    wait_until(
        "the build's processes are gone",
        Duration::from_secs(10),
        || build_processes(&pair.salt).is_empty(),
    );
    wait_until("the builder is idle", Duration::from_secs(15), || {
        builder_active(&pair) == 0
    });
}

#[test]
fn upload_over_its_limit_is_refused_and_leaves_nothing() {
    if !available() {
        return;
    }
    let pair = Pair::new(&salt("upload-limit"), &[]);
    let output = pair.build(
        "app",
        &["--ticket", &pair.ticket(&["--max-upload-bytes", "64K"])],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("max_upload_bytes of 64K"),
        "{}",
        stderr(&output)
    );
    let store = pair.builder_store.entries();
    assert!(
        !store.iter().any(|name| name.ends_with("-busybox-static")),
        "{store:?}"
    );
    assert!(!pair.data_dir_has_uploads());
}

impl Pair {
    pub fn data_dir_has_uploads(&self) -> bool {
        std::fs::read_dir(self.builder.data_dir.join("uploads"))
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false)
    }
}

#[test]
fn forged_dependency_output_never_reaches_the_builder() {
    if !available() {
        return;
    }
    let pair = Pair::new(&salt("forged"), &[]);
    let tools = pair.out_path("tools");
    // Root on the client registers a forged output of a dependency.
    let script = format!(
        "set -e; mkdir -p {tools}/bin; echo forged > {tools}/FORGED; \
         printf '%s\\n%s\\n%s\\n\\n0\\n' {tools} $(nix-hash --type sha256 {tools}) $(nix-store --dump {tools} | wc -c) \
         | nix-store --register-validity --hash-given"
    );
    pair.client.run_ok("sh", &["-c", &script]);
    assert!(pair.client.has(&tools));

    let output = pair.build("app", &["--ticket", &pair.ticket(&[])]);
    pair.assert_built(&output);
    let forged = pair
        .builder_store
        .dir
        .join("store")
        .join(tools.trim_start_matches("/nix/store/"))
        .join("FORGED");
    assert!(
        pair.builder_store.has(&tools),
        "the builder built the dependency itself"
    );
    assert!(!forged.exists(), "the forged output reached the builder");
}

impl Pair {
    /// A new Nix signing key named `name` in the world; with `trusted`, the
    /// stores' Nix trusts it (the builder's among them: all share one
    /// configuration). Returns the secret key's file.
    fn signing_key(&self, name: &str, trusted: bool) -> std::path::PathBuf {
        let secret = self.world.dir.join(format!("{name}.secret"));
        let public = self.world.dir.join(format!("{name}.public"));
        let (secret_arg, public_arg) = (secret.to_str().unwrap(), public.to_str().unwrap());
        self.client.run_ok(
            "nix-store",
            &["--generate-binary-cache-key", name, secret_arg, public_arg],
        );
        if trusted {
            let key = std::fs::read_to_string(&public).unwrap();
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(self.world.dir.join("conf/nix.conf"))
                .unwrap();
            std::io::Write::write_all(
                &mut conf,
                format!("trusted-public-keys = {}\n", key.trim()).as_bytes(),
            )
            .unwrap();
        }
        secret
    }

    /// Builds `tools` in the client's store, as another builder would have,
    /// then makes this copy tell: a `MARKER` file a build never makes,
    /// registered as the path's contents and signed with the key in
    /// `secret`. Returns the path.
    fn marked_tools(&self, secret: &Path) -> String {
        let tools = self.out_path("tools");
        self.client.run_ok(
            "nix",
            &["build", "--no-link", &self.world.installable("tools")],
        );
        let script = format!(
            "set -e; t={tools}; echo imported > $t/MARKER; refs=$(nix-store -q --references $t); \
             printf '%s\\n%s\\n%s\\n\\n%s\\n%s\\n' $t $(nix-hash --type sha256 $t) \
             $(nix-store --dump $t | wc -c) $(echo \"$refs\" | wc -l) \"$refs\" \
             | nix-store --register-validity --reregister --hash-given; \
             nix store sign --key-file {} $t",
            secret.display()
        );
        self.client.run_ok("sh", &["-c", &script]);
        tools
    }

    /// Whether the builder's `tools` is the client's marked copy.
    fn builder_has_marked(&self, tools: &str) -> bool {
        self.builder_store
            .dir
            .join("store")
            .join(tools.trim_start_matches("/nix/store/"))
            .join("MARKER")
            .exists()
    }
}

#[test]
fn dependency_signed_by_a_trusted_key_is_imported_not_rebuilt() {
    if !available() {
        return;
    }
    let pair = Pair::new(&salt("signed-trusted"), &[]);
    let key = pair.signing_key("dependency-trusted-1", true);
    let tools = pair.marked_tools(&key);
    let output = pair.build("lib", &["--ticket", &pair.ticket(&[]), "--no-link"]);
    pair.assert_built(&output);
    assert!(
        pair.builder_has_marked(&tools),
        "the builder built the dependency itself"
    );
    let imported = signed_input(&pair.builder_store, &tools);
    assert!(
        imported
            .signatures
            .iter()
            .any(|s| s.starts_with("dependency-trusted-1:")),
        "{imported:?}"
    );
}

#[test]
fn dependency_signed_by_an_untrusted_key_is_built_by_the_builder() {
    if !available() {
        return;
    }
    let pair = Pair::new(&salt("signed-untrusted"), &[]);
    let key = pair.signing_key("dependency-untrusted-1", false);
    let tools = pair.marked_tools(&key);
    let output = pair.build("lib", &["--ticket", &pair.ticket(&[]), "--no-link"]);
    pair.assert_built(&output);
    assert!(pair.builder_store.has(&tools));
    assert!(
        !pair.builder_has_marked(&tools),
        "a path signed by a key the builder does not trust reached it"
    );
}

/// Announcements a client makes up: a signature that does not verify is
/// not asked for, and a NAR other than the signed one is refused as it
/// arrives; either way the builder's store stays clean.
#[tokio::test(flavor = "multi_thread")]
async fn forged_signed_dependencies_are_not_imported() {
    if !available() {
        return;
    }
    let pair = Pair::new(&salt("signed-forged"), &[]);
    let key = pair.signing_key("dependency-trusted-1", true);
    let tools = pair.marked_tools(&key);
    let honest = signed_input(&pair.client, &tools);
    let drv = pair.client.run_ok(
        "nix",
        &[
            "eval",
            "--raw",
            &format!("{}.drvPath", pair.world.installable("lib")),
        ],
    );
    let ticket = Target::Ticket(Box::new(pair.builder.ticket(&["--uses", "2"])));
    let client = connect(&ticket, &pair.world.dir.join("forger.key")).await;
    let mut builder = BuilderClient::new(client.channel.clone());
    let open = |signed: proto::SignedPath| proto::OpenSessionRequest {
        drv_path: drv.clone(),
        inputs: closure_inputs(&pair.client, &drv),
        signed_inputs: vec![signed],
    };

    // Signatures that verify over nothing announced: one from another
    // path, one made up under the trusted key's name.
    let bbsrc = honest
        .references
        .iter()
        .find(|r| r.ends_with("-busybox-static"))
        .unwrap()
        .clone();
    pair.client.run_ok(
        "nix",
        &["store", "sign", "--key-file", key.to_str().unwrap(), &bbsrc],
    );
    let mut forged = honest.clone();
    forged.signatures = signed_input(&pair.client, &bbsrc).signatures;
    forged.signatures.push(format!(
        "dependency-trusted-1:{}",
        data_encoding::BASE64.encode(&[7; 64])
    ));
    let admitted = builder
        .open_session(open(forged))
        .await
        .unwrap()
        .into_inner();
    assert!(!admitted.missing_inputs.contains(&tools), "{admitted:?}");

    // The signed metadata, but other bytes.
    let admitted = builder
        .open_session(open(honest))
        .await
        .unwrap()
        .into_inner();
    assert!(admitted.missing_inputs.contains(&tools), "{admitted:?}");
    let nar = pair
        .client
        .command("nix-store")
        .args(["--dump", &tools])
        .output()
        .unwrap()
        .stdout;
    let at = nar.windows(8).position(|w| w == b"imported").unwrap();
    let mut tampered = nar.clone();
    tampered[at..at + 8].copy_from_slice(b"imparted");
    let refused = common::upload(&client, &admitted.session_id, &[(tools.clone(), tampered)])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("does not match"), "{refused:?}");
    assert!(!pair.builder_store.has(&tools));
    assert!(!pair.builder_has_marked(&tools));
}

/// A builder, and a client building `quiet` (silent for minutes) with it in
/// its own process group and with the returned directory as its
/// `XDG_RUNTIME_DIR`, once the build runs on the builder.
fn quiet_build(test: &str) -> (Pair, tempfile::TempDir, std::process::Child) {
    let pair = Pair::new(&salt(test), &[]);
    let runtime = tempfile::tempdir().unwrap();
    let ticket = pair.ticket(&[]);
    let installable = pair.world.installable("quiet");
    let client = pair
        .client
        .command(crate::common::binary())
        .args([
            "build",
            &installable,
            "--no-nom",
            "--no-link",
            "--ticket",
            &ticket,
        ])
        .env("XDG_RUNTIME_DIR", runtime.path())
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the build runs", Duration::from_secs(120), || {
        !build_processes(&pair.salt).is_empty()
    });
    (pair, runtime, client)
}

/// Waits until the builder has no session and no build process left.
fn assert_builder_cleans_up(pair: &Pair) {
    let start = Instant::now();
    while builder_active(pair) != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "builder still busy:\n{}",
            pair.builder.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let start = Instant::now();
    while !build_processes(&pair.salt).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "build processes remain: {:?}\nbuilder log:\n{}",
            build_processes(&pair.salt),
            pair.builder.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn disconnecting_client_cancels_a_silent_build() {
    if !available() {
        return;
    }
    let (pair, _runtime, mut client) = quiet_build("disconnect");
    unsafe { libc::kill(-(client.id() as i32), libc::SIGKILL) };
    client.wait().unwrap();
    assert_builder_cleans_up(&pair);
}

#[test]
fn interrupted_client_says_so_and_leaves_nothing() {
    if !available() {
        return;
    }
    let (pair, runtime, client) = quiet_build("interrupt");
    // As a terminal's Ctrl-C does: the whole foreground group.
    unsafe { libc::kill(-(client.id() as i32), libc::SIGINT) };
    let output = client.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("interrupted by SIGINT") && !message.contains("panicked"),
        "{message}"
    );
    assert_eq!(std::fs::read_dir(runtime.path()).unwrap().count(), 0);
    assert_builder_cleans_up(&pair);
}

#[test]
fn revoking_the_ticket_stops_its_running_build() {
    if !available() {
        return;
    }
    let (pair, _runtime, client) = quiet_build("revoke");
    let listing: serde_json::Value =
        serde_json::from_str(&pair.builder.cli_ok(&["ticket", "list", "--all", "--json"])).unwrap();
    let id = listing[0]["id"].as_str().unwrap().to_owned();
    pair.builder.cli_ok(&["ticket", "revoke", &id]);
    let output = client.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("its ticket was revoked"),
        "{}",
        stderr(&output)
    );
    assert_builder_cleans_up(&pair);
}

#[test]
fn signal_during_evaluation_leaves_no_nix_behind() {
    if !available() {
        return;
    }
    let pair = Pair::new(&salt("eval-signal"), &[]);
    let client = pair
        .client
        .command(crate::common::binary())
        .args([
            "build",
            &pair.world.installable("slowEval"),
            "--no-link",
            "--ticket",
            &pair.ticket(&[]),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("evaluation's build sleeps", Duration::from_secs(60), || {
        build_processes(&pair.salt)
            .iter()
            .any(|command| command.starts_with("sleep "))
    });
    // To drv-thru alone, as a service manager or a CI time limit sends it.
    unsafe { libc::kill(client.id() as i32, libc::SIGTERM) };
    let output = client.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("interrupted by SIGTERM; nothing was sent to a builder"),
        "{message}"
    );
    wait_until(
        "evaluation's processes end",
        Duration::from_secs(10),
        || build_processes(&pair.salt).is_empty(),
    );
}

/// The endpoint of a client stopped while dialling is closed, not dropped:
/// the user reads drv-thru's one line, not also iroh's complaint.
#[test]
fn signal_while_dialling_leaves_one_line() {
    if !available() {
        return;
    }
    let world = Arc::new(World::new(&salt("dial-signal")));
    let client = world.store("client");
    let nobody = iroh::SecretKey::generate().public().to_string();
    let mut command = client.command(crate::common::binary());
    command
        .args(["build", &world.installable("lib"), "--no-link"])
        .args(["--server", &nobody, "--addr", "127.0.0.1:9"])
        .env("RUST_LOG", "drv_thru=debug,iroh=error");
    let (mut child, lines, log) = crate::common::spawn_logged(command);
    while !lines
        .recv_timeout(Duration::from_secs(60))
        .expect("the client dials")
        .contains("dialing the builder")
    {}
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    // Until the reader has seen the end of stderr.
    while lines.recv_timeout(Duration::from_secs(10)).is_ok() {}
    let log = log.lock().unwrap().join("\n");
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("interrupted by SIGINT; nothing was sent to a builder"),
        "{log}"
    );
    assert!(!log.contains("without calling"), "{log}");
}

#[test]
fn rebuild_checks_even_on_a_builder_that_never_built_it() {
    if !available() {
        return;
    }
    let pair = Pair::new(&salt("rebuild"), &[]);
    let output = pair.build(
        "lib",
        &["--ticket", &pair.ticket(&[]), "--rebuild", "--no-link"],
    );
    pair.assert_built(&output);
}

/// The builder service needs no Nix trusted-user rights: it runs as an
/// unprivileged user talking to a `nix-daemon` that trusts only root, and
/// still accepts uploads (content-addressed, so Nix needs no signature) and
/// builds.
#[test]
fn multi_user_builder_needs_no_trusted_user_rights() {
    if !available() {
        return;
    }
    const NOBODY: &str = "65534";
    let world = Arc::new(World::new(&salt("multi-user")));
    // The builder's user must reach its data directory inside the world.
    std::fs::set_permissions(&world.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let client = world.store("client");
    let builder_store = world.store("builder");
    let _daemon = builder_store.start_daemon();
    let home = world.dir.join("builder-home");
    let data_dir = world.dir.join("data");
    for dir in [&home, &data_dir] {
        std::fs::create_dir_all(dir).unwrap();
        std::os::unix::fs::chown(dir, Some(65534), Some(65534)).unwrap();
    }
    let launcher: crate::common::Launcher = {
        let store = builder_store.clone();
        let home = home.clone();
        Arc::new(move || {
            let mut command = store.command("setpriv");
            command
                .args([
                    &format!("--reuid={NOBODY}"),
                    &format!("--regid={NOBODY}"),
                    "--clear-groups",
                    crate::common::binary(),
                ])
                .env("NIX_REMOTE", "daemon")
                .env("HOME", &home)
                .env("XDG_CACHE_HOME", home.join(".cache"));
            command
        })
    };
    let builder = Builder::start_with(launcher, data_dir, &[]);
    let pair = Pair {
        salt: String::new(),
        world,
        client,
        builder_store,
        builder,
    };
    let output = pair.build("app", &["--ticket", &pair.ticket(&[]), "--no-link"]);
    pair.assert_built(&output);
    let app = pair.out_path("app");
    assert!(pair.client.has(&app));
    assert!(pair.builder_store.has(&app));
}

/// `--server ID` names no signing key: the builder's announced key is good
/// only if the client's Nix trusts it already, and that is settled before
/// anything is uploaded.
#[test]
fn server_by_endpoint_id_relies_on_keys_nix_trusts() {
    if !available() {
        return;
    }
    let world = Arc::new(World::new(&salt("server-id")));
    let client = world.store("client");
    let me = drv_thru::keys::load_or_create_endpoint_key(
        &client.home.join(".config/drv-thru/secret.key"),
    )
    .unwrap()
    .public();
    let builder_store = world.store("builder");
    let builder = Builder::start_with(
        crate::builder::launcher_in(&builder_store, crate::builder::binary()),
        world.dir.join("data"),
        &["--trusted-client", &me.to_string()],
    );
    let key = std::fs::read_to_string(builder.data_dir.join("signing-public.key")).unwrap();
    let build = |nix_config: Option<String>| {
        let mut command = client.command(crate::common::binary());
        command.args([
            "build",
            &world.installable("lib"),
            "--no-nom",
            "--no-link",
            "--server",
            &builder.endpoint_id.to_string(),
            "--addr",
            &builder.addr.to_string(),
        ]);
        if let Some(config) = nix_config {
            command.env("NIX_CONFIG", config);
        }
        command.output().unwrap()
    };

    let refused = build(None);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("which your Nix does not trust"),
        "{}",
        stderr(&refused)
    );
    let store = builder_store.entries();
    assert!(
        !store.iter().any(|name| name.ends_with(".drv")),
        "nothing was uploaded: {store:?}"
    );

    let built = build(Some(format!("extra-trusted-public-keys = {}", key.trim())));
    assert!(
        built.status.success(),
        "{}\nbuilder:\n{}",
        stderr(&built),
        builder.log()
    );
    assert!(
        stdout(&built).trim().ends_with("-testlib"),
        "{}",
        stdout(&built)
    );
}

/// `nix path-info --json ARGS` in `store`, by path, as its Nix (2.8: an
/// array) describes them.
pub fn path_infos(store: &Store, args: &[&str]) -> Vec<(String, serde_json::Value)> {
    let mut all = vec!["path-info", "--json"];
    all.extend_from_slice(args);
    let json = store.run_ok("nix", &all);
    // Nix 2.19 and later key the infos by path; earlier ones list them.
    match serde_json::from_str(&json).unwrap() {
        serde_json::Value::Object(by_path) => by_path.into_iter().collect(),
        serde_json::Value::Array(list) => list
            .into_iter()
            .map(|info| (info["path"].as_str().unwrap().to_owned(), info))
            .collect(),
        other => panic!("unexpected path-info output: {other}"),
    }
}

fn json_text(value: &serde_json::Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

fn json_texts(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|values| values.iter().map(json_text).collect())
        .unwrap_or_default()
}

/// What `OpenSession` is told about the closure of `drv` in `store`.
fn closure_inputs(store: &Store, drv: &str) -> Vec<proto::InputPath> {
    path_infos(store, &["--recursive", "--derivation", drv])
        .into_iter()
        .map(|(path, info)| proto::InputPath {
            store_path: path,
            references: json_texts(&info["references"]),
            content_address: json_text(&info["ca"]),
            nar_hash: json_text(&info["narHash"]),
            nar_size: info["narSize"].as_u64().unwrap(),
        })
        .collect()
}

/// What `OpenSession` is told about the signed `path` in `store`.
fn signed_input(store: &Store, path: &str) -> proto::SignedPath {
    let [(store_path, info)] = <[_; 1]>::try_from(path_infos(store, &[path])).unwrap();
    proto::SignedPath {
        store_path,
        references: json_texts(&info["references"]),
        nar_hash: json_text(&info["narHash"]),
        nar_size: info["narSize"].as_u64().unwrap(),
        deriver: json_text(&info["deriver"]),
        signatures: json_texts(&info["signatures"]),
    }
}

/// A session keeps at most its share of Cache streams open unread; one
/// dropped or read to its end makes room for another.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_holds_at_most_its_share_of_cache_streams() {
    if !available() {
        return;
    }
    // The builder gets the blob's inputs and output from a first build.
    // The blob is larger than the connection's window plus a chunk, so no
    // unread stream can hand its last bytes to HTTP/2 and end: an 8 MiB one
    // sometimes did, giving its place back before the test looked.
    let pair = Pair::new(&salt("cache-streams"), &[]);
    std::fs::write(
        pair.world.flake.join("params.nix"),
        format!("{{ salt = \"{}\"; blobMiB = 24; }}\n", pair.salt),
    )
    .unwrap();
    pair.assert_built(&pair.build("blob", &["--ticket", &pair.ticket(&[]), "--no-link"]));
    let installable = pair.world.installable("blob");
    let drv = pair
        .client
        .run_ok("nix", &["eval", "--raw", &format!("{installable}.drvPath")]);
    let ticket = Target::Ticket(Box::new(pair.builder.ticket(&[])));
    let client = connect(&ticket, &pair.world.dir.join("reader.key")).await;
    let mut builder = BuilderClient::new(client.channel.clone());
    let admitted = builder
        .open_session(proto::OpenSessionRequest {
            drv_path: drv.clone(),
            inputs: closure_inputs(&pair.client, &drv),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(admitted.missing_inputs.is_empty(), "{admitted:?}");
    let session_id = admitted.session_id;
    let mut events = builder
        .build(proto::BuildRequest {
            session_id: session_id.clone(),
            rebuild: false,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(reply) = events.message().await.unwrap() {
        if let Some(Event::Finished(finished)) = reply.event {
            assert_eq!(
                finished.result(),
                proto::BuildResult::Succeeded,
                "{finished:?}"
            );
            break;
        }
    }

    let out = pair.out_path("blob");
    let reader = CacheClient::new(client.channel.clone());
    let url = common::nar_url(&client, &session_id, &out).await.unwrap();
    let get_nar = |mut cache: CacheClient<BuilderChannel>| {
        let request = proto::GetNarRequest {
            session_id: session_id.clone(),
            url: url.clone(),
            offset: 0,
            length: 0,
        };
        async move {
            cache
                .get_nar(request)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let mut unread = Vec::new();
    for _ in 0..proto::MAX_CACHE_STREAMS_PER_SESSION {
        unread.push(get_nar(reader.clone()).await.unwrap());
    }
    let refused = get_nar(reader.clone()).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert_eq!(refusal(&refused), "too-many-cache-streams");

    // Dropping one frees its place once the builder sees the reset. The
    // new one is read on a channel of its own, whose window the unread
    // streams do not hold.
    unread.pop();
    let other = CacheClient::new(client.bulk_channels(1).remove(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut replacement = loop {
        match get_nar(other.clone()).await {
            Ok(stream) => break stream,
            Err(status) if Instant::now() < deadline => {
                assert_eq!(refusal(&status), "too-many-cache-streams");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("a dropped stream kept its place: {status:?}"),
        }
    };
    let mut read = 0;
    while let Some(chunk) = replacement.message().await.unwrap() {
        read += chunk.data.len();
    }
    assert!(read > 24 << 20, "{read}");
    // A stream read to its end has given its place back by then.
    let last = get_nar(other.clone()).await.unwrap();
    assert_eq!(
        refusal(&get_nar(other.clone()).await.unwrap_err()),
        "too-many-cache-streams"
    );
    drop((unread, last));
    client.close().await;
}
