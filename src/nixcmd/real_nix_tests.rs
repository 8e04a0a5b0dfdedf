//! Tests against the real Nix, each in a store of its own.
//!
//! Each test runs this test binary again, for itself alone, inside a private mount namespace in
//! which a fresh temporary directory is bound over `/nix` (`unshare --mount`, plus `--user
//! --map-root-user` when not root). Everything the test builds or copies lands in that directory,
//! which is deleted afterwards; the machine's `/nix/store` is never written. The inner run sees
//! `NIXCMD_TEST_INNER` set to its own name and runs the body. Nix is configured offline
//! (`substituters =`) with `sandbox = false`, as the fixture builders are the host's `/bin/sh`.
//!
//! A test passes with a note on stderr, without checking anything, when `nix` is not on `PATH` or
//! no mount namespace can be made, unless `CI` is set. To run them against another Nix, run the test binary where that
//! Nix is installed, e.g. in the trixie root of `tests/nix/in-root.sh` (Nix 2.26).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;

use super::*;
use crate::nix::content_address::{ContentAddress, FileIngestionMethod};
use crate::nix::narinfo::NarInfo;
use crate::nix::signing::SecretKey;

use crate::two_stores;

const FIXTURE_NIX: &str = include_str!("../../tests/data/nixcmd/fixture.nix");
const FIXTURE_INPUT: &str = include_str!("../../tests/data/nixcmd/src/input.txt");

/// An unprivileged uid/gid for the untrusted daemon client; it needs no passwd entry.
const UNTRUSTED_ID: u32 = 60123;

/// The environment of a test body inside its namespace.
struct TestEnv {
    /// A scratch directory outside the store (readable by everyone).
    dir: PathBuf,
    /// The fixture directory: `fixture.nix`, `src/`, `flake.nix`.
    fixture: PathBuf,
    /// Nix on the test's own store.
    nix: Nix,
    /// Whether the test runs as real root (needed for `run_as` and build users).
    root: bool,
}

impl TestEnv {
    fn file_flags(&self) -> EvalFlags {
        EvalFlags {
            file: Some(self.fixture.join("fixture.nix")),
            ..EvalFlags::default()
        }
    }

    /// Evaluates `attr` of the fixture file and returns its derivation.
    async fn drv(&self, attr: &str) -> Evaluated {
        let mut evaluated = self.nix.evaluate(attr, &self.file_flags()).await.unwrap();
        assert_eq!(evaluated.len(), 1);
        evaluated.remove(0)
    }

    /// Evaluates `attr` with extra `--argstr`-like arguments by writing a wrapper file.
    async fn drv_with(&self, attr: &str, args: &str) -> Evaluated {
        let wrapper = self.dir.join(format!("wrapper-{attr}.nix"));
        std::fs::write(
            &wrapper,
            format!("import {}/fixture.nix {{ {args} }}", self.fixture.display()),
        )
        .unwrap();
        let flags = EvalFlags {
            file: Some(wrapper),
            ..EvalFlags::default()
        };
        let mut evaluated = self.nix.evaluate(attr, &flags).await.unwrap();
        evaluated.remove(0)
    }
}

/// Runs `body` in a private store; see the module documentation.
fn in_private_store<F>(test: &str, body: F)
where
    F: AsyncFnOnce(TestEnv),
{
    let module = module_path!()
        .split_once("::")
        .map_or(module_path!(), |(_, rest)| rest);
    let full_name = format!("{module}::{test}");
    if std::env::var("NIXCMD_TEST_INNER").as_deref() == Ok(full_name.as_str()) {
        let dir = PathBuf::from(std::env::var_os("NIXCMD_TEST_DIR").expect("set by the outer run"));
        std::fs::write(dir.join("ran"), "").unwrap();
        let env = TestEnv {
            fixture: dir.join("fixture"),
            dir: dir.join("work"),
            nix: Nix::new(),
            root: std::env::var_os("NIXCMD_TEST_ROOT").is_some(),
        };
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(body(env));
        return;
    }

    if !on_path("nix") || !on_path("nix-store") || !on_path("unshare") {
        two_stores::skip(&format!("{test}: nix, nix-store or unshare is not on PATH"));
        return;
    }
    // SAFETY: geteuid(2) cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let userns: &[&str] = if root {
        &[]
    } else {
        &["--user", "--map-root-user"]
    };
    let probe = std::process::Command::new("unshare")
        .args(userns)
        .args(["--mount", "true"])
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        two_stores::skip(&format!("{test}: cannot make a mount namespace"));
        return;
    }

    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    for sub in [
        "store",
        "conf",
        "home",
        "cache",
        "tmp",
        "work",
        "fixture/src",
    ] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    // Readable by the unprivileged client of the daemon test.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // No build users: every test store would pick nixbld1 from its own user pool, and Nix kills
    // all processes of a build user before using it, so parallel tests would kill each other.
    std::fs::write(
        dir.join("conf/nix.conf"),
        "sandbox = false\nsubstituters =\nexperimental-features = nix-command flakes\n\
         build-users-group =\n",
    )
    .unwrap();
    std::fs::write(dir.join("fixture/fixture.nix"), FIXTURE_NIX).unwrap();
    std::fs::write(dir.join("fixture/src/input.txt"), FIXTURE_INPUT).unwrap();
    std::fs::write(
        dir.join("fixture/flake.nix"),
        format!(
            "{{ outputs = {{ self }}: {{ legacyPackages.{system} = import ./fixture.nix \
             {{ system = \"{system}\"; }}; }}; }}\n",
            system = format!("{}-linux", std::env::consts::ARCH)
        ),
    )
    .unwrap();

    let exe = std::env::current_exe().unwrap();
    let mut command = two_stores::in_store(&dir.join("store"), exe);
    command
        .args(["--exact", &full_name, "--nocapture", "--test-threads=1"])
        .env("NIXCMD_TEST_INNER", &full_name)
        .env("NIXCMD_TEST_DIR", dir)
        .env("NIX_CONF_DIR", dir.join("conf"))
        .env("HOME", dir.join("home"))
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env("TMPDIR", dir.join("tmp"))
        .env_remove("NIX_REMOTE");
    if root {
        command.env("NIXCMD_TEST_ROOT", "1");
    }
    let status = command.status().unwrap();
    let ran = dir.join("ran").exists();
    // Store paths are read-only; without write access to their directories an unprivileged
    // user could not delete the temporary directory.
    make_removable(dir);
    assert!(status.success(), "{test} failed inside its namespace");
    assert!(
        ran,
        "{test} did not run inside its namespace (test name {full_name:?} not found)"
    );
}

/// Gives the owner write access to every directory below `dir` (not following symlinks).
fn make_removable(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
            make_removable(&path);
        }
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Collects every event of a run, then its outcome.
async fn finish(mut run: RealiseRun) -> (Vec<BuildEvent>, RealiseOutcome) {
    let mut events = Vec::new();
    while let Some(record) = run.next_event().await {
        events.push(record.event);
    }
    (events, run.wait().await.unwrap())
}

fn log_lines(events: &[BuildEvent]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            BuildEvent::LogLine { line, .. } => Some(line.as_str()),
            _ => None,
        })
        .collect()
}

async fn read_all(mut reader: impl tokio::io::AsyncRead + Unpin) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    reader.read_to_end(&mut out).await?;
    Ok(out)
}

#[test]
fn evaluates_and_queries_the_store() {
    in_private_store("evaluates_and_queries_the_store", async |env| {
        let flake = format!("path:{}#multi", env.fixture.display());
        let from_flake = env
            .nix
            .evaluate(&flake, &EvalFlags::default())
            .await
            .unwrap();
        assert_eq!(from_flake.len(), 1);
        let multi = env.drv("multi").await;
        assert_eq!(multi.drv_path, from_flake[0].drv_path);
        assert_eq!(multi.drv_path.name(), "nixcmd-multi.drv");
        let out = multi.outputs["out"].clone();
        assert_eq!(out.name(), "nixcmd-multi");
        assert_eq!(from_flake[0].outputs["out"], out);
        // Read from the .drv file, and asked of nix-store where the store
        // is named: the same outputs.
        let drvs = std::slice::from_ref(&multi.drv_path);
        let read = env.nix.derivation_outputs(drvs).await.unwrap();
        assert!(read.len() == 2 && read.contains(&out), "{read:?}");
        let named = Nix::builder().store("local").build();
        assert_eq!(named.derivation_outputs(drvs).await.unwrap(), read);

        // Evaluation wrote the .drv files but built nothing.
        let missing: StorePath = "/nix/store/00000000000000000000000000000000-missing"
            .parse()
            .unwrap();
        let asked = [multi.drv_path.clone(), out.clone(), missing.clone()];
        assert_eq!(
            env.nix.invalid_paths(&asked).await.unwrap(),
            [out.clone(), missing.clone()]
        );

        let closure = paths_of(
            env.nix
                .closure_infos(std::slice::from_ref(&multi.drv_path))
                .await
                .unwrap(),
        );
        let names: BTreeSet<&str> = closure.iter().map(StorePath::name).collect();
        assert_eq!(
            names,
            BTreeSet::from(["nixcmd-multi.drv", "nixcmd-hello.drv", "nixcmd-fixture-src"])
        );
        let refs = env
            .nix
            .path_info(std::slice::from_ref(&multi.drv_path))
            .await
            .unwrap()
            .remove(0)
            .references;
        assert_eq!(refs.len(), 2);
        let src = refs.iter().find(|p| !p.is_derivation()).unwrap().clone();

        let infos = env
            .nix
            .path_info(&[
                out.clone(),
                multi.drv_path.clone(),
                missing.clone(),
                src.clone(),
            ])
            .await
            .unwrap();
        assert_eq!(infos.len(), 2, "{infos:?}");
        assert_eq!(infos[0].path, multi.drv_path);
        assert_eq!(infos[1].path, src);
        assert!(matches!(infos[0].ca, Some(ContentAddress::Text(_))));
        assert!(matches!(
            infos[1].ca,
            Some(ContentAddress::Fixed {
                method: FileIngestionMethod::Recursive,
                ..
            })
        ));
        assert_eq!(infos[0].references, refs.iter().cloned().collect());
        for info in &infos {
            super::parse::assert_ca_recomputes(info);
        }

        // The NAR stream matches what the store recorded.
        for info in &infos {
            let nar = read_all(env.nix.dump(&info.path).unwrap()).await.unwrap();
            assert_eq!(nar.len() as u64, info.nar_size);
            let hash: [u8; 32] = Sha256::digest(&nar).into();
            assert_eq!(hash, *info.nar_hash.as_bytes());
        }
        // A missing path: Nix writes the NAR header first, so the error comes at the end.
        let err = read_all(env.nix.dump(&missing).unwrap()).await.unwrap_err();
        let message = format!("{}", err.get_ref().unwrap());
        assert!(
            message.starts_with("`nix-store --dump /nix/store/"),
            "{message}"
        );
        assert!(message.contains("exited with code 1"), "{message}");
        // Dropping a dump early is fine.
        drop(env.nix.dump(&src).unwrap());

        // Nix's errors carry the command and Nix's message.
        let err = env
            .nix
            .evaluate("no-such-attribute", &env.file_flags())
            .await
            .unwrap_err();
        assert!(matches!(err, NixCmdError::Failed { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.starts_with("`nix --extra-experimental-features"),
            "{message}"
        );
        assert!(message.contains("no-such-attribute"), "{message}");
        let err = env
            .nix
            .closure_infos(std::slice::from_ref(&missing))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("is not valid"), "{err}");
    });
}

#[test]
fn realises_with_events() {
    in_private_store("realises_with_events", async |env| {
        let hello = env.drv("hello").await;
        // Realised as a garbage-collector root, so Nix has no warning to give.
        let root = env.dir.join("hello-root");
        let (events, outcome) = finish(
            env.nix
                .realise(&hello.drv_path, None, false, Some(&root))
                .unwrap(),
        )
        .await;
        assert!(outcome.success(), "{outcome:?}");
        assert_eq!(outcome.outputs, [hello.outputs["out"].clone()]);
        assert!(outcome.errors.is_empty());
        assert_eq!(
            std::fs::read_link(&root).unwrap(),
            Path::new(&outcome.outputs[0].to_string())
        );
        assert!(
            !events.iter().any(|e| matches!(
                e,
                BuildEvent::Message { text, .. } if text.contains("--add-root")
            )),
            "{events:?}"
        );
        assert!(events.iter().any(|e| matches!(
            e,
            BuildEvent::BuildStarted { drv, .. } if *drv == hello.drv_path
        )));
        assert!(events.iter().any(|e| matches!(
            e,
            BuildEvent::Phase { phase, drv: Some(drv), .. }
                if phase == "installPhase" && *drv == hello.drv_path
        )));
        assert_eq!(
            log_lines(&events),
            ["hello: stdout line", "hello: stderr line"]
        );
        assert!(
            env.nix
                .invalid_paths(&outcome.outputs)
                .await
                .unwrap()
                .is_empty()
        );

        // A result link that is also a garbage-collector root.
        let link = env.dir.join("result");
        env.nix.add_root(&link, &outcome.outputs[0]).await.unwrap();
        let target = std::fs::read_link(&link).unwrap();
        assert_eq!(target, Path::new(&outcome.outputs[0].to_string()));
        let roots: Vec<PathBuf> = std::fs::read_dir("/nix/var/nix/gcroots/auto")
            .unwrap()
            .map(|e| std::fs::read_link(e.unwrap().path()).unwrap())
            .collect();
        assert!(roots.contains(&link), "{roots:?}");

        // One output of several: the `!dev` form.
        let multi = env.drv("multi").await;
        let dev = ["dev".to_owned()];
        let (_, outcome) = finish(
            env.nix
                .realise(&multi.drv_path, Some(&dev), false, None)
                .unwrap(),
        )
        .await;
        assert!(outcome.success(), "{outcome:?}");
        assert_eq!(outcome.outputs.len(), 1);
        assert_eq!(outcome.outputs[0].name(), "nixcmd-multi-dev");

        // Checking a deterministic build succeeds, and events can be read elsewhere.
        let mut run = env.nix.realise(&hello.drv_path, None, true, None).unwrap();
        let mut events = run.take_events().unwrap();
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            while let Some(record) = events.recv().await {
                all.push(record.event);
            }
            all
        });
        let outcome = run.wait().await.unwrap();
        assert!(outcome.success(), "{outcome:?}");
        let events = reader.await.unwrap();
        assert!(events.iter().any(|e| matches!(
            e,
            BuildEvent::BuildStarted { text, .. } if text.starts_with("checking outputs of")
        )));
    });
}

#[test]
fn reports_failures_and_nondeterminism() {
    in_private_store("reports_failures_and_nondeterminism", async |env| {
        let fail_dep = env.drv("failDep").await;
        let (events, outcome) = finish(
            env.nix
                .realise(&fail_dep.drv_path, None, false, None)
                .unwrap(),
        )
        .await;
        assert!(!outcome.success());
        assert!(!outcome.killed);
        assert_eq!(outcome.exit_code(), Some(100));
        assert!(outcome.outputs.is_empty());
        let message = outcome.error_message().unwrap();
        assert!(
            message.starts_with("error: builder for '/nix/store/"),
            "{message}"
        );
        assert!(
            message.ends_with("-nixcmd-fail.drv' failed with exit code 3"),
            "{message}"
        );
        assert_eq!(
            log_lines(&events),
            ["fail: some stdout", "fail: about to fail"]
        );

        // `check` on outputs that were never built: built first, then checked.
        let nondet = env.drv("nondet").await;
        let (_, outcome) =
            finish(env.nix.realise(&nondet.drv_path, None, true, None).unwrap()).await;
        assert!(!outcome.success());
        assert!(outcome.not_deterministic(), "{outcome:?}");
        assert_eq!(outcome.exit_code(), Some(104));
        let message = outcome.error_message().unwrap();
        assert!(message.contains("may not be deterministic"), "{message}");
    });
}

#[test]
fn kill_stops_the_build_and_its_children() {
    in_private_store("kill_stops_the_build_and_its_children", async |env| {
        let salt = format!("kill-{}", std::process::id());
        let slow = env
            .drv_with("slow", &format!("salt = \"{salt}\"; sleepSecs = \"120\";"))
            .await;
        let started = Instant::now();
        let mut run = env.nix.realise(&slow.drv_path, None, false, None).unwrap();
        let killer = run.kill_handle();
        while let Some(record) = run.next_event().await {
            if matches!(&record.event, BuildEvent::LogLine { line, .. } if line == "slow: tick 1") {
                break;
            }
        }
        // By now the builder has started a sleep in a session of its own.
        assert!(!builder_processes(&salt).is_empty());
        killer.kill();
        let outcome = run.wait().await.unwrap();
        assert!(outcome.killed);
        assert!(!outcome.success());
        assert!(started.elapsed() < Duration::from_secs(60));
        let mut left = builder_processes(&salt);
        for _ in 0..50 {
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = builder_processes(&salt);
        }
        assert!(left.is_empty(), "builder processes survived: {left:?}");
        // The build directory the killed nix-store could not remove is gone too.
        let tmp: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name())
            .collect();
        assert!(tmp.is_empty(), "left in TMPDIR: {tmp:?}");
        assert_eq!(
            env.nix
                .invalid_paths(&[slow.outputs["out"].clone()])
                .await
                .unwrap()
                .len(),
            1
        );
    });
}

/// Live (not zombie) processes whose environment holds `salt=SALT`, with their command lines.
fn builder_processes(salt: &str) -> Vec<(i32, String)> {
    let needle = format!("salt={salt}\0");
    let mut found = Vec::new();
    for pid in super::realise::process_ids() {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if super::realise::running(pid)
            && environ
                .windows(needle.len())
                .any(|w| w == needle.as_bytes())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

#[test]
fn copies_through_file_caches() {
    in_private_store("copies_through_file_caches", async |env| {
        let hello = env.drv("hello").await;
        let (_, outcome) =
            finish(env.nix.realise(&hello.drv_path, None, false, None).unwrap()).await;
        assert!(outcome.success(), "{outcome:?}");
        let out = hello.outputs["out"].clone();
        let cache = env.dir.join("cache-zstd");
        let both = [out.clone(), hello.drv_path.clone()];
        env.nix
            .copy_to_file_cache(&cache, &both, CacheCompression::Zstd)
            .await
            .unwrap();
        let narinfo_file =
            |dir: &Path, path: &StorePath| dir.join(format!("{}.narinfo", path.hash_part()));
        let narinfo = std::fs::read_to_string(narinfo_file(&cache, &out)).unwrap();
        assert!(narinfo.contains("Compression: zstd"), "{narinfo}");
        // The .drv was copied as a file (with its closure), not built.
        let drv_info = std::fs::read_to_string(narinfo_file(&cache, &hello.drv_path)).unwrap();
        assert!(drv_info.contains("CA: text:sha256:"), "{drv_info}");

        let plain = env.dir.join("cache-none");
        env.nix
            .copy_to_file_cache(&plain, std::slice::from_ref(&out), CacheCompression::None)
            .await
            .unwrap();
        assert!(
            std::fs::read_to_string(narinfo_file(&plain, &out))
                .unwrap()
                .contains("Compression: none")
        );

        // A second store: a chroot store under the scratch directory.
        let other = Nix::builder()
            .store(format!("local?root={}", env.dir.join("other").display()))
            .build();
        let url = format!("file://{}", plain.display());
        let err = other
            .copy_from(&url, std::slice::from_ref(&out), None, true)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("signature"), "{err}");

        // Signed by a key: accepted with that key, refused with another.
        let key = SecretKey::generate("nixcmd-test-1").unwrap();
        let wrong = SecretKey::generate("nixcmd-test-1").unwrap();
        let file = narinfo_file(&plain, &out);
        let mut info: NarInfo = std::fs::read_to_string(&file).unwrap().parse().unwrap();
        info.sign(&key);
        std::fs::write(&file, info.to_string()).unwrap();
        let err = other
            .copy_from(
                &url,
                std::slice::from_ref(&out),
                Some(&wrong.to_public()),
                true,
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("signature"), "{err}");
        other
            .copy_from(
                &url,
                std::slice::from_ref(&out),
                Some(&key.to_public()),
                true,
            )
            .await
            .unwrap();
        assert!(
            other
                .invalid_paths(std::slice::from_ref(&out))
                .await
                .unwrap()
                .is_empty()
        );
        let copied = other.path_info(std::slice::from_ref(&out)).await.unwrap();
        assert_eq!(copied[0].signatures.len(), 1);
        assert_eq!(copied[0].signatures[0].key_name(), "nixcmd-test-1");

        // Content-addressed .drv files need no signature even with require-sigs.
        let zstd_url = format!("file://{}", cache.display());
        other
            .copy_from(&zstd_url, std::slice::from_ref(&hello.drv_path), None, true)
            .await
            .unwrap();
        assert!(
            other
                .invalid_paths(std::slice::from_ref(&hello.drv_path))
                .await
                .unwrap()
                .is_empty()
        );
    });
}

#[test]
fn trust_probe_on_a_local_store() {
    in_private_store("trust_probe_on_a_local_store", async |env| {
        let key = SecretKey::generate("nixcmd-trust-1").unwrap().to_public();
        let other = SecretKey::generate("nixcmd-trust-2").unwrap().to_public();
        let nix = Nix::builder()
            .option("trusted-public-keys", key.to_string())
            .build();
        let trust = nix.trust().await.unwrap();
        // Root (or the owner, in a user namespace) of a local store is trusted.
        assert!(trust.trusted_user, "{trust:?}");
        assert!(trust.trusts_key(&key));
        assert!(!trust.trusts_key(&other));
        assert!(trust.require_sigs);
        let _ = env;
    });
}

/// A nix-daemon on its own store, in a mount namespace of its own.
struct Daemon {
    child: tokio::process::Child,
    socket: PathBuf,
}

impl Daemon {
    async fn start(store: &Path, conf: &Path) -> Self {
        std::fs::create_dir_all(store).unwrap();
        let child = tokio::process::Command::from(two_stores::in_store(store, "nix-daemon"))
            .env("NIX_CONF_DIR", conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let socket = store.join("var/nix/daemon-socket/socket");
        // The socket file appears before the daemon listens on it.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::UnixStream::connect(&socket).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon did not start"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Self { child, socket }
    }

    fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    async fn stop(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// Writes an uncompressed `file://` cache of `paths` from `nix`'s store, as drv-thru's builder
/// would from an upload: NAR files and narinfos with `CA:` and `References:`, no signatures.
/// Offers `paths` from the `file://` cache in `dir` (uncompressed NARs) to
/// [`Nix::add_verifiable`], as an upload would.
async fn add_from_cache(nix: &Nix, dir: &Path, paths: &[StorePath]) -> Result<(), NixCmdError> {
    let mut infos = Vec::new();
    let mut nars = std::collections::HashMap::new();
    for path in paths {
        let file = dir.join(format!("{}.narinfo", path.hash_part()));
        let info: NarInfo = std::fs::read_to_string(file).unwrap().parse().unwrap();
        nars.insert(path.clone(), std::fs::read(dir.join(&info.url)).unwrap());
        infos.push(info);
    }
    nix.add_verifiable(infos, |path| {
        let nar = bytes::Bytes::from(nars[path].clone());
        Ok::<_, std::io::Error>(futures::stream::iter([Ok(nar)]))
    })
    .await
}

async fn write_cache(nix: &Nix, dir: &Path, paths: &[StorePath]) {
    std::fs::create_dir_all(dir.join("nar")).unwrap();
    std::fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    for info in nix.path_info(paths).await.unwrap() {
        let nar = read_all(nix.dump(&info.path).unwrap()).await.unwrap();
        let url = format!("nar/{}.nar", info.nar_hash.to_nix_base32());
        std::fs::write(dir.join(&url), nar).unwrap();
        let mut narinfo = info.to_narinfo(url);
        narinfo.deriver = None;
        narinfo.signatures.clear();
        std::fs::write(
            dir.join(format!("{}.narinfo", info.path.hash_part())),
            narinfo.to_string(),
        )
        .unwrap();
    }
}

/// Makes a directory tree readable (and directories enterable) by everyone.
fn open_up(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let mode = if path.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        if path.is_dir() {
            open_up(&path);
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn adds_content_addressed_paths_as_an_untrusted_daemon_client() {
    in_private_store(
        "adds_content_addressed_paths_as_an_untrusted_daemon_client",
        async |env| {
            if !env.root {
                two_stores::skip("needs root to run a client as another user");
                return;
            }
            // Store A (ours) evaluates; store B behind a daemon receives.
            let multi = env.drv("multi").await;
            let hello = env.drv("hello").await;
            let (_, outcome) =
                finish(env.nix.realise(&hello.drv_path, None, false, None).unwrap()).await;
            assert!(outcome.success());
            let hello_out = hello.outputs["out"].clone();
            let closure = paths_of(
                env.nix
                    .closure_infos(std::slice::from_ref(&multi.drv_path))
                    .await
                    .unwrap(),
            );
            assert_eq!(closure.len(), 3);
            let src = closure.iter().find(|p| !p.is_derivation()).unwrap().clone();

            let honest = env.dir.join("honest");
            write_cache(&env.nix, &honest, &closure).await;
            write_cache(&env.nix, &honest, std::slice::from_ref(&hello_out)).await;

            // A source whose NAR was altered: NarHash matches the new bytes, CA the old ones.
            let lie_nar = env.dir.join("lie-nar");
            write_cache(&env.nix, &lie_nar, std::slice::from_ref(&src)).await;
            let file = lie_nar.join(format!("{}.narinfo", src.hash_part()));
            let mut info: NarInfo = std::fs::read_to_string(&file).unwrap().parse().unwrap();
            let nar_file = lie_nar.join(&info.url);
            let mut evil = std::fs::read(&nar_file).unwrap();
            let (from, to) = (b"fixture source", b"tampered input");
            let at = evil.windows(from.len()).position(|w| w == from).unwrap();
            evil[at..at + to.len()].copy_from_slice(to);
            std::fs::write(&nar_file, &evil).unwrap();
            let digest: [u8; 32] = Sha256::digest(&evil).into();
            info.nar_hash = crate::nix::hash::Sha256Hash::from_bytes(digest);
            info.file_hash = Some(info.nar_hash);
            std::fs::write(&file, info.to_string()).unwrap();

            // A .drv whose narinfo drops a reference.
            let lie_refs = env.dir.join("lie-refs");
            write_cache(&env.nix, &lie_refs, &closure).await;
            let file = lie_refs.join(format!("{}.narinfo", multi.drv_path.hash_part()));
            let mut info: NarInfo = std::fs::read_to_string(&file).unwrap().parse().unwrap();
            info.references.retain(|r| !r.is_derivation());
            std::fs::write(&file, info.to_string()).unwrap();
            open_up(&env.dir);

            let daemon_conf = env.dir.join("daemon-conf");
            std::fs::create_dir_all(&daemon_conf).unwrap();
            let user_conf = std::fs::read_to_string(
                PathBuf::from(std::env::var_os("NIX_CONF_DIR").unwrap()).join("nix.conf"),
            )
            .unwrap();
            std::fs::write(
                daemon_conf.join("nix.conf"),
                format!("{user_conf}trusted-users = root\nallowed-users = *\n"),
            )
            .unwrap();
            let daemon = Daemon::start(&env.dir.join("store-b"), &daemon_conf).await;
            let home = env.dir.join("untrusted-home");
            std::fs::create_dir_all(&home).unwrap();
            std::os::unix::fs::chown(&home, Some(UNTRUSTED_ID), Some(UNTRUSTED_ID)).unwrap();
            let untrusted = Nix::builder()
                .store(daemon.url())
                .run_as(UNTRUSTED_ID, UNTRUSTED_ID)
                .env("HOME", &home)
                .env("XDG_CACHE_HOME", home.join("cache"))
                .build();
            let root_b = Nix::builder().store(daemon.url()).build();

            let trust = untrusted.trust().await.unwrap();
            assert!(!trust.trusted_user, "{trust:?}");
            let trust = root_b.trust().await.unwrap();
            assert!(trust.trusted_user, "{trust:?}");

            // Refused by our own check: a narinfo whose references do not give its path.
            let err = add_from_cache(&untrusted, &lie_refs, &closure)
                .await
                .unwrap_err();
            assert!(
                matches!(err, NixCmdError::NotContentAddressed { .. }),
                "{err}"
            );
            // Refused by our own check: an input-addressed path.
            let err = add_from_cache(&untrusted, &honest, std::slice::from_ref(&hello_out))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("no CA field"), "{err}");
            // Refused by Nix: the NAR does not match the content address.
            let err = add_from_cache(&untrusted, &lie_nar, std::slice::from_ref(&src))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("ca hash mismatch"), "{err}");
            assert_eq!(root_b.invalid_paths(&closure).await.unwrap(), closure);
            // Nix itself refuses the input-addressed path for an untrusted user, whatever it asks.
            let url = format!("file://{}", honest.display());
            let err = untrusted
                .copy_from(&url, std::slice::from_ref(&hello_out), None, false)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("signature"), "{err}");

            // The honest upload: a .drv referring to another .drv and a builtins.path source.
            add_from_cache(&untrusted, &honest, &closure).await.unwrap();
            assert!(root_b.invalid_paths(&closure).await.unwrap().is_empty());
            let infos = root_b.path_info(&closure).await.unwrap();
            assert_eq!(infos.len(), 3);
            assert!(
                infos
                    .iter()
                    .all(|i| i.ca.is_some() && i.signatures.is_empty())
            );
            // Adding again is a no-op.
            add_from_cache(&untrusted, &honest, &closure).await.unwrap();

            // And the untrusted user can build what it uploaded.
            let (events, outcome) = finish(
                untrusted
                    .realise(&multi.drv_path, None, false, None)
                    .unwrap(),
            )
            .await;
            assert!(outcome.success(), "{outcome:?}");
            assert!(events.iter().any(|e| matches!(
                e,
                BuildEvent::BuildStarted { drv, .. } if *drv == multi.drv_path
            )));
            assert!(
                root_b
                    .invalid_paths(&outcome.outputs)
                    .await
                    .unwrap()
                    .is_empty()
            );

            // Killing a client stops the build the daemon runs for it.
            let salt = format!("daemon-kill-{}", std::process::id());
            let slow = env
                .drv_with("slow", &format!("salt = \"{salt}\"; sleepSecs = \"120\";"))
                .await;
            let closure = paths_of(
                env.nix
                    .closure_infos(std::slice::from_ref(&slow.drv_path))
                    .await
                    .unwrap(),
            );
            let upload = env.dir.join("upload-slow");
            write_cache(&env.nix, &upload, &closure).await;
            open_up(&upload);
            add_from_cache(&untrusted, &upload, &closure).await.unwrap();
            let mut run = untrusted
                .realise(&slow.drv_path, None, false, None)
                .unwrap();
            while let Some(record) = run.next_event().await {
                if matches!(&record.event, BuildEvent::LogLine { line, .. } if line == "slow: tick 1")
                {
                    break;
                }
            }
            assert!(!builder_processes(&salt).is_empty());
            run.kill();
            assert!(run.wait().await.unwrap().killed);
            // The daemon kills the builder's process group. Without build users (see
            // in_private_store) it cannot kill by user, so the sleep the builder moved to a
            // session of its own outlives it: that is Nix's doing, not ours.
            // The builder's children (`sleep 1`) die with its process group but may still be
            // exiting when the builder is already gone, so wait until only the escaped sleep
            // is left.
            let builder_gone =
                |left: &[(i32, String)]| left.iter().all(|(_, cmd)| cmd.starts_with("sleep 120"));
            let mut left = builder_processes(&salt);
            for _ in 0..100 {
                if builder_gone(&left) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                left = builder_processes(&salt);
            }
            assert!(
                builder_gone(&left),
                "the daemon's builder survived: {left:?}"
            );
            for (pid, _) in left {
                // SAFETY: kill(2) on a pid; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            daemon.stop().await;
        },
    );
}

fn paths_of(infos: Vec<PathInfo>) -> Vec<StorePath> {
    infos.into_iter().map(|info| info.path).collect()
}
