//! The import helper: a real `drv-thru import-helper` on a unix socket,
//! hostile requests over real gRPC, callers running as another user, and an
//! untrusted user's build on a multi-user client (a real `nix-daemon`)
//! importing through it.

use std::{
    io::{Read, Write},
    net::TcpListener,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use drv_thru::{
    helper::{SOCKET_ENV, client::HelperClient},
    nix::signing::{PublicKey, SecretKey},
    proto::{CheckKeyRequest, ImportRequest, import_helper_client::ImportHelperClient},
    ticket::Ticket,
    transport,
};
use tonic::{Code, transport::Channel};

use crate::{
    common::{Builder, binary, spawn_logged},
    two_stores::{Store, World, available},
};

/// The helper's group in these tests: a bare id, so it need not exist on the
/// host or in the trixie root.
const GROUP: &str = "4242";

/// The ordinary user of the client machine: `nobody`, in both roots.
const USER: u32 = 65534;

/// A path no store here has.
const ABSENT: &str = "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-drv-thru-helper-test";

/// A running `drv-thru import-helper`, stopped with SIGTERM when dropped.
struct Helper {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Helper {
    /// Starts the helper as root in `store`'s mount namespace, serving group
    /// [`GROUP`], and waits until it serves. With `daemon`, it imports
    /// through the store's nix-daemon, as on a multi-user machine.
    fn start(store: &Store, socket: &Path, allowlist: &Path, daemon: bool) -> Self {
        let mut command = store.command(binary());
        command
            .arg("import-helper")
            .arg("--socket")
            .arg(socket)
            .arg("--trusted-public-key-file")
            .arg(allowlist)
            .args(["--group", GROUP])
            .env("RUST_LOG", "drv_thru=debug");
        if daemon {
            command.env("NIX_REMOTE", "daemon");
        }
        let (child, lines, log) = spawn_logged(command);
        let helper = Self {
            child: Some(child),
            lines,
            log,
        };
        helper.wait_for("import helper ready");
        helper
    }

    fn wait_for(&self, what: &str) {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line.contains(what) => return,
                Ok(_) => {}
                Err(_) => panic!("the helper never logged {what:?}; its log:\n{}", self.log()),
            }
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// How many Nix commands the helper has run.
    fn nix_runs(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains("nix command finished"))
            .count()
    }

    /// Sends SIGHUP and waits for the helper to log `outcome`.
    fn reload(&self, outcome: &str) {
        self.signal(libc::SIGHUP);
        self.wait_for(outcome);
    }

    fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("the helper runs");
        unsafe { libc::kill(child.id() as i32, signal) };
    }

    /// Stops the helper with SIGTERM; returns whether it exited cleanly.
    fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap().success()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            for _ in 0..100 {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A salt no earlier run used, so every derivation is new to every store.
fn salt(test: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!("{test}-{}-{}", std::process::id(), now.as_nanos())
}

/// A world whose directory other users can reach (they need the socket,
/// the flake and a home in it).
fn open_world(test: &str) -> Arc<World> {
    let world = Arc::new(World::new(&salt(test)));
    std::fs::set_permissions(&world.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(world.dir.join("helper")).unwrap();
    world
}

fn write_allowlist(path: &Path, keys: &[&PublicKey]) {
    let mut text = "# builder keys for the drv-thru import helper\n\n".to_owned();
    for key in keys {
        text.push_str(&format!("{key}\n"));
    }
    std::fs::write(path, text).unwrap();
}

fn key(name: &str) -> PublicKey {
    SecretKey::generate(name).unwrap().to_public()
}

/// A binary cache on a loopback port that holds nothing: Nix finds the
/// cache, then none of the paths it asks for.
fn empty_cache() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut head = Vec::new();
            let mut buf = [0; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head);
            let (status, body) = match head.split_whitespace().nth(1) {
                Some("/nix-cache-info") => ("200 OK", "StoreDir: /nix/store\n"),
                _ => ("404 Not Found", ""),
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// Environment of [`unprivileged_probe`]: the socket and the key to ask about.
const PROBE_SOCKET: &str = "DRV_THRU_TEST_PROBE_SOCKET";
const PROBE_KEY: &str = "DRV_THRU_TEST_PROBE_KEY";

/// The body of a caller running as another user: this test binary runs it
/// again through `setpriv` (see [`probe`]). On its own it does nothing.
#[tokio::test]
async fn unprivileged_probe() {
    let (Some(socket), Some(key)) = (
        std::env::var_os(PROBE_SOCKET),
        std::env::var(PROBE_KEY).ok(),
    ) else {
        return;
    };
    let key: PublicKey = key.parse().unwrap();
    let outcome = match HelperClient::connect(Path::new(&socket)).await {
        Err(err) => format!("error: {err}"),
        Ok(mut client) => match client.check_key(&key).await {
            Ok(allowlisted) => format!("allowlisted: {allowlisted}"),
            Err(err) => format!("error: {err}"),
        },
    };
    println!("PROBE-RESULT {outcome}");
}

/// Asks the helper about `key` as [`USER`] with these `setpriv` group
/// options; returns what the caller got.
fn probe(group_options: &[&str], socket: &Path, key: &PublicKey) -> String {
    let output = Command::new("setpriv")
        .arg(format!("--reuid={USER}"))
        .args(group_options)
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper::unprivileged_probe",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE_SOCKET, socket)
        .env(PROBE_KEY, key.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|line| line.split_once("PROBE-RESULT ").map(|(_, result)| result))
        .unwrap_or_else(|| {
            panic!(
                "the probe printed no result:\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
        .to_owned()
}

/// CheckKey's answer for `key`, or the code it was refused with.
async fn check_key(client: &mut ImportHelperClient<Channel>, key: &str) -> Result<bool, Code> {
    let request = CheckKeyRequest {
        builder_public_key: key.to_owned(),
    };
    match client.check_key(request).await {
        Ok(response) => Ok(response.into_inner().allowlisted),
        Err(status) => Err(status.code()),
    }
}

/// The code a request is refused with, or `None` if the helper accepted it.
async fn refusal(client: &mut ImportHelperClient<Channel>, request: ImportRequest) -> Option<Code> {
    client
        .import(request)
        .await
        .err()
        .map(|status| status.code())
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_requests_are_refused_before_nix_runs() {
    if !available() {
        return;
    }
    let world = open_world("helper-hostile");
    let store = world.store("client");
    let good_key = key("builder-1");
    let allowlist = world.dir.join("helper/keys");
    write_allowlist(&allowlist, &[&good_key]);
    let socket = world.dir.join("helper/import-helper.sock");
    let mut helper = Helper::start(&store, &socket, &allowlist, false);

    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid().to_string(), GROUP);

    let port = empty_cache();
    let good = ImportRequest {
        builder_public_key: good_key.to_string(),
        cache_url: format!("http://127.0.0.1:{port}"),
        store_paths: vec![ABSENT.to_owned()],
    };
    let with_url = |url: &str| ImportRequest {
        cache_url: url.to_owned(),
        ..good.clone()
    };
    let with_key = |key: &str| ImportRequest {
        builder_public_key: key.to_owned(),
        ..good.clone()
    };
    let with_paths = |paths: &[&str]| ImportRequest {
        store_paths: paths.iter().map(ToString::to_string).collect(),
        ..good.clone()
    };
    let link = world.dir.join("link-into-store");
    std::os::unix::fs::symlink(ABSENT, &link).unwrap();
    let link = link.to_str().unwrap().to_owned();
    let hash_and_name = &ABSENT["/nix/store/".len()..];
    let parent_trick = format!("/nix/store/../store/{hash_and_name}");
    let below = format!("{ABSENT}/bin/sh");
    let dotdot = format!("{ABSENT}/..");
    let trailing = format!("{ABSENT}/");
    let injected = format!("{ABSENT} --option require-sigs false");
    let bytes = good_key.to_string().split_once(':').unwrap().1.to_owned();
    let dash_key = format!("-v:{bytes}");
    let renamed_key = format!("builder-2:{bytes}");
    let padded_key = format!(" {good_key}");
    let too_many: Vec<String> = (0..10_001)
        .map(|i| format!("/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-p{i}"))
        .collect();
    let huge = format!(
        "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-{}",
        "x".repeat(5 << 20)
    );

    let rows: Vec<(&str, ImportRequest, Code)> = vec![
        // Cache URLs: loopback HTTP in the one plain form, nothing else.
        (
            "look-alike host",
            with_url(&format!("http://127.0.0.1.evil:{port}")),
            Code::InvalidArgument,
        ),
        (
            "userinfo after the port",
            with_url("http://127.0.0.1:1@x"),
            Code::InvalidArgument,
        ),
        (
            "userinfo before the host",
            with_url(&format!("http://x@127.0.0.1:{port}")),
            Code::InvalidArgument,
        ),
        (
            "a path",
            with_url("http://127.0.0.1:1/x"),
            Code::InvalidArgument,
        ),
        (
            "a store parameter",
            with_url(&format!("http://127.0.0.1:{port}?trusted=1")),
            Code::InvalidArgument,
        ),
        (
            "https",
            with_url("https://127.0.0.1:1"),
            Code::InvalidArgument,
        ),
        ("file", with_url("file:///tmp"), Code::InvalidArgument),
        (
            "localhost",
            with_url("http://localhost:1"),
            Code::InvalidArgument,
        ),
        (
            "another loopback address",
            with_url("http://127.0.0.2:1"),
            Code::InvalidArgument,
        ),
        (
            "IPv4 in IPv6",
            with_url("http://[::ffff:127.0.0.1]:1"),
            Code::InvalidArgument,
        ),
        (
            "port 0",
            with_url("http://127.0.0.1:0"),
            Code::InvalidArgument,
        ),
        (
            "port too big",
            with_url("http://127.0.0.1:65536"),
            Code::InvalidArgument,
        ),
        (
            "signed port",
            with_url("http://127.0.0.1:+1"),
            Code::InvalidArgument,
        ),
        ("daemon store", with_url("daemon"), Code::InvalidArgument),
        ("option as URL", with_url("--option"), Code::InvalidArgument),
        // Keys: exactly an allowlisted key, nothing option-like.
        ("option as key", with_key("--option"), Code::InvalidArgument),
        ("flag as key", with_key("-v"), Code::InvalidArgument),
        (
            "key name like a flag",
            with_key(&dash_key),
            Code::InvalidArgument,
        ),
        (
            "key with whitespace",
            with_key(&padded_key),
            Code::InvalidArgument,
        ),
        ("empty key", with_key(""), Code::InvalidArgument),
        (
            "same name, other key",
            with_key(&key("builder-1").to_string()),
            Code::PermissionDenied,
        ),
        (
            "allowlisted bytes, other name",
            with_key(&renamed_key),
            Code::PermissionDenied,
        ),
        // Paths: exact store paths only.
        (
            "option as path",
            with_paths(&["--option"]),
            Code::InvalidArgument,
        ),
        ("flag as path", with_paths(&["-v"]), Code::InvalidArgument),
        (
            "option after a path",
            with_paths(&[&injected]),
            Code::InvalidArgument,
        ),
        (
            "not in the store",
            with_paths(&["/etc/passwd"]),
            Code::InvalidArgument,
        ),
        (
            "relative",
            with_paths(&[hash_and_name]),
            Code::InvalidArgument,
        ),
        (
            "parent directory",
            with_paths(&[&dotdot]),
            Code::InvalidArgument,
        ),
        (
            "through the parent",
            with_paths(&[&parent_trick]),
            Code::InvalidArgument,
        ),
        (
            "below a store path",
            with_paths(&[&below]),
            Code::InvalidArgument,
        ),
        (
            "trailing slash",
            with_paths(&[&trailing]),
            Code::InvalidArgument,
        ),
        (
            "symlink into the store",
            with_paths(&[&link]),
            Code::InvalidArgument,
        ),
        (
            "profile symlink",
            with_paths(&["/nix/var/nix/profiles/default"]),
            Code::InvalidArgument,
        ),
        (
            "system symlink",
            with_paths(&["/run/current-system"]),
            Code::InvalidArgument,
        ),
        (
            "one bad path among good",
            with_paths(&[ABSENT, "/etc/shadow"]),
            Code::InvalidArgument,
        ),
        ("no paths", with_paths(&[]), Code::InvalidArgument),
        (
            "too many paths",
            ImportRequest {
                store_paths: too_many,
                ..good.clone()
            },
            Code::InvalidArgument,
        ),
        ("oversized request", with_paths(&[&huge]), Code::OutOfRange),
    ];
    let mut client = ImportHelperClient::new(transport::unix::connect(&socket).await.unwrap())
        .max_encoding_message_size(usize::MAX);
    for (what, request, expected) in rows {
        assert_eq!(
            refusal(&mut client, request).await,
            Some(expected),
            "{what}; helper log:\n{}",
            helper.log()
        );
    }
    assert_eq!(helper.nix_runs(), 0, "{}", helper.log());
    assert!(!store.has(ABSENT));

    // The same request done right reaches Nix, which finds nothing to copy.
    let mut stream = client.import(good.clone()).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!((first.paths_done, first.paths_total), (0, 1));
    let failed = stream.message().await.unwrap_err();
    assert_eq!(failed.code(), Code::Aborted, "{failed:?}");
    assert!(
        failed.message().starts_with("import failed: "),
        "{failed:?}"
    );
    // Log lines arrive in order: once this one is in, an earlier Nix run
    // would be too.
    helper.wait_for("nix command finished");
    assert_eq!(helper.nix_runs(), 1, "{}", helper.log());
    assert!(!store.has(ABSENT));

    // CheckKey answers without running anything.
    assert_eq!(
        check_key(&mut client, &good_key.to_string()).await,
        Ok(true)
    );
    assert_eq!(
        check_key(&mut client, &key("other").to_string()).await,
        Ok(false)
    );
    assert_eq!(
        check_key(&mut client, "--option").await,
        Err(Code::InvalidArgument)
    );

    // Other users: the socket's mode keeps out everyone outside the group,
    // and the helper checks again itself.
    let outside = ["--regid=65534", "--clear-groups"];
    assert!(probe(&outside, &socket, &good_key).contains("join its group"));
    assert_eq!(
        probe(&["--regid=65534", "--groups=4242"], &socket, &good_key),
        "allowlisted: true"
    );
    assert_eq!(
        probe(&["--regid=4242", "--clear-groups"], &socket, &good_key),
        "allowlisted: true"
    );
    assert!(!helper.log().contains("refused a caller"));
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert!(probe(&outside, &socket, &good_key).contains("join its group"));
    helper.wait_for("refused a caller outside the helper's group");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660)).unwrap();

    // A bad allowlist on reload keeps the old one; a good one replaces it.
    std::fs::write(&allowlist, format!("{good_key}\n--option\n")).unwrap();
    helper.reload("keeping the previous allowlist");
    assert!(
        helper
            .log()
            .contains(&format!("{}:2: ", allowlist.display()))
    );
    assert_eq!(
        check_key(&mut client, &good_key.to_string()).await,
        Ok(true)
    );
    let next_key = key("builder-2");
    write_allowlist(&allowlist, &[&next_key]);
    helper.reload("allowlist reloaded");
    assert_eq!(
        check_key(&mut client, &good_key.to_string()).await,
        Ok(false),
        "{}",
        helper.log()
    );
    assert_eq!(
        check_key(&mut client, &next_key.to_string()).await,
        Ok(true)
    );

    drop(client);
    assert!(helper.stop(), "{}", helper.log());
    assert!(!socket.exists(), "the socket is removed on exit");
}

#[test]
fn invalid_allowlist_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let allowlist = dir.path().join("keys");
    std::fs::write(&allowlist, format!("# keys\n{}\n-v\n", key("builder-1"))).unwrap();
    let socket = dir.path().join("helper.sock");
    let output = crate::common::command()
        .arg("import-helper")
        .arg("--socket")
        .arg(&socket)
        .arg("--trusted-public-key-file")
        .arg(&allowlist)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:3: ", allowlist.display())),
        "{stderr}"
    );
    assert!(!socket.exists());
}

/// `drv-thru build ATTR --ticket T` as [`USER`] (in [`GROUP`]) through the
/// client store's daemon, with a home of its own.
fn user_build(world: &World, client: &Store, home: &Path, socket: &Path, ticket: &str) -> Output {
    client
        .command("setpriv")
        .args([
            format!("--reuid={USER}"),
            format!("--regid={USER}"),
            format!("--groups={GROUP}"),
        ])
        .arg(binary())
        .args([
            "build",
            &world.installable("app"),
            "--no-nom",
            "--ticket",
            ticket,
        ])
        .arg("--out-link")
        .arg(home.join("result"))
        .env("NIX_REMOTE", "daemon")
        .env("HOME", home)
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env(SOCKET_ENV, socket)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn untrusted_user_imports_through_the_helper() {
    if !available() {
        return;
    }
    let world = open_world("helper-e2e");
    let client = world.store("client");
    let builder_store = world.store("builder");
    let builder = Builder::start_with(
        crate::builder::launcher_in(&builder_store, crate::builder::binary()),
        world.dir.join("data"),
        &[],
    );
    let _daemon = client.start_daemon();
    let home: PathBuf = world.dir.join("user");
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(USER), Some(USER)).unwrap();

    // One use: a refusal before upload must not spend it.
    let ticket: Ticket = builder.ticket(&[]);
    let builder_key = ticket.signing_key().clone();
    let allowlist = world.dir.join("helper/keys");
    write_allowlist(&allowlist, &[&key("someone-else-1")]);
    let socket = world.dir.join("helper/import-helper.sock");
    let helper = Helper::start(&client, &socket, &allowlist, true);

    let refused = user_build(&world, &client, &home, &socket, &ticket.to_string());
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr)
            .contains("services.drv-thru.client.ticketHelper.trustedBuilderPublicKeys"),
        "{}",
        text(&refused.stderr)
    );
    let builder_paths = builder_store.entries();
    assert!(
        !builder_paths
            .iter()
            .any(|name| name.ends_with("-busybox-static")),
        "inputs reached the builder: {builder_paths:?}"
    );
    assert!(
        !builder.log().contains("session admitted"),
        "{}",
        builder.log()
    );

    // Allowlisted (and reloaded), the same one-use ticket now builds, and
    // the outputs arrive through the helper.
    write_allowlist(&allowlist, &[&builder_key]);
    helper.reload("allowlist reloaded");
    let built = user_build(&world, &client, &home, &socket, &ticket.to_string());
    assert!(
        built.status.success(),
        "{}\nhelper:\n{}\nbuilder:\n{}",
        text(&built.stderr),
        helper.log(),
        builder.log()
    );
    let app = text(&built.stdout).trim().to_owned();
    assert!(
        app.starts_with("/nix/store/") && app.ends_with("-app"),
        "{app}"
    );
    assert!(client.has(&app));
    assert_eq!(
        std::fs::read_link(home.join("result")).unwrap(),
        Path::new(&app)
    );
    let sigs = client.run_ok("nix", &["path-info", "--sigs", &app]);
    assert!(sigs.contains(&format!("{}:", builder_key.name())), "{sigs}");
    assert!(
        text(&built.stderr).contains("importing through the import helper"),
        "{}",
        text(&built.stderr)
    );
    helper.wait_for("imported bytes=");
}
