//! The kill -9 loop: a builder on one persistent data directory is killed
//! at random points of admissions, uploads and cache fills, started again
//! and checked after every kill:
//! - ticket uses add up: uses recorded = admissions the client saw succeed,
//!   plus at most the one whose answer the kill cut off;
//! - no half-imported path is valid, and valid ones have the NAR announced;
//! - every cached NAR matches its narinfo (size and hash);
//! - nothing from before the kill (temporary files, staging, roots) is left
//!   once the new server is ready, and the lock and socket let it start.
//!
//! `DRV_THRU_CRASH_SEED` picks the kill points; the seed, the kill count and
//! where each kill landed are printed.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use drv_thru::{
    client::{Connection, Target},
    nix::{drv::Derivation, hash::Sha256Hash, narinfo::NarInfo},
    proto::{self, builder_client::BuilderClient},
};

use crate::{
    common::{self, Builder, Rng},
    two_stores::{Store, World, available},
};

/// The seed when `DRV_THRU_CRASH_SEED` is not set.
const DEFAULT_SEED: u64 = 13;

/// Kills per run, spread evenly over the three targets.
const KILLS: usize = 51;

/// Each build's one source input: large enough that the builder imports it
/// while it arrives (the riskier import path), small enough to be quick.
const BLOB_BYTES: usize = 3 << 20;

/// Each build's output: compressible and over the 1 MiB from which the
/// cache keeps a zstd copy, so fetching it starts a cache fill. A power of
/// two, as the builder doubles a 16-byte string until it is this long.
const OUTPUT_BYTES: usize = 8 << 20;

/// What the kill aims at.
#[derive(Debug, Clone, Copy)]
enum Aim {
    Admission,
    Upload,
    Fill,
}

/// How far one build has come; kept in an `AtomicU8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Admitting = 0,
    Uploading = 1,
    Building = 2,
    Fetching = 3,
    Fetched = 4,
}

impl Stage {
    fn from_u8(n: u8) -> Self {
        [
            Self::Admitting,
            Self::Uploading,
            Self::Building,
            Self::Fetching,
            Self::Fetched,
        ][usize::from(n)]
    }
}

/// One build of the loop: a derivation and its source, as uploads carry
/// them.
#[derive(Clone)]
struct Job {
    drv: String,
    inputs: Vec<proto::InputPath>,
    nars: Vec<(String, Vec<u8>)>,
}

/// Makes `count` derivations in the client store, each reading a source
/// of random bytes and writing a compressible output.
fn jobs(world: &World, client: &Store, count: usize, rng: &mut Rng) -> Vec<Job> {
    let blobs = world.dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    for n in 0..count {
        let bytes: Vec<u8> = (0..BLOB_BYTES / 8)
            .flat_map(|_| rng.next().to_le_bytes())
            .collect();
        std::fs::write(blobs.join(format!("blob-{n}")), bytes).unwrap();
    }
    // Plain sh, which both the host and the trixie root have.
    let doublings = (OUTPUT_BYTES / 16).trailing_zeros();
    let script = format!(
        "s=0123456789abcdef; i=0; while [ $i -lt {doublings} ]; do s=$s$s; i=$((i+1)); done; \
         printf %s \\\"$s\\\" > $out"
    );
    let expression = world.dir.join("crash.nix");
    std::fs::write(
        &expression,
        format!(
            r#"builtins.genList (n: derivation {{
                name = "crash-${{toString n}}";
                system = "x86_64-linux";
                builder = "/bin/sh";
                blob = ./blobs + "/blob-${{toString n}}";
                args = [ "-c" "{script}" ];
            }}) {count}"#
        ),
    )
    .unwrap();
    let listed = client.run_ok("nix-instantiate", &[expression.to_str().unwrap()]);
    let store = client.dir.join("store");
    listed
        .lines()
        .map(|drv| {
            let file = store.join(drv.trim_start_matches("/nix/store/"));
            let contents = std::fs::read(&file).unwrap();
            let parsed = Derivation::parse(&contents).unwrap();
            let blob = parsed.input_srcs().iter().next().unwrap().to_string();
            let blob_nar = common::nar_of(&store.join(blob.trim_start_matches("/nix/store/")));
            let drv_nar = common::nar_of(&file);
            let input =
                |path: &str, nar: &[u8], ca: String, references: Vec<String>| proto::InputPath {
                    store_path: path.to_owned(),
                    references,
                    content_address: ca,
                    nar_hash: Sha256Hash::digest(nar).to_string(),
                    nar_size: nar.len() as u64,
                };
            Job {
                drv: drv.to_owned(),
                inputs: vec![
                    input(
                        drv,
                        &drv_nar,
                        format!("text:{}", Sha256Hash::digest(&contents)),
                        vec![blob.clone()],
                    ),
                    input(
                        &blob,
                        &blob_nar,
                        format!("fixed:r:{}", Sha256Hash::digest(&blob_nar)),
                        Vec::new(),
                    ),
                ],
                // References first, in the order the builder imports.
                nars: vec![(blob, blob_nar), (drv.to_owned(), drv_nar)],
            }
        })
        .collect()
}

/// One job through the builder: admitted, uploaded, built, its output
/// fetched (which starts the cache fill); `stage` says how far it came.
async fn run_job(connection: &Connection, job: &Job, stage: &AtomicU8) -> anyhow::Result<()> {
    let session = BuilderClient::new(connection.channel.clone())
        .max_encoding_message_size(drv_thru::transport::http2::MAX_MESSAGE_SIZE)
        .open_session(proto::OpenSessionRequest {
            drv_path: job.drv.clone(),
            inputs: job.inputs.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .session_id;
    stage.store(Stage::Uploading as u8, Ordering::SeqCst);
    common::upload(connection, &session, &job.nars).await?;
    stage.store(Stage::Building as u8, Ordering::SeqCst);
    let finished = common::build(connection, &session).await?;
    anyhow::ensure!(
        finished.result() == proto::BuildResult::Succeeded,
        "{}",
        finished.message
    );
    stage.store(Stage::Fetching as u8, Ordering::SeqCst);
    let nar = common::fetch_nar(connection, &session, &finished.outputs[0].store_path).await?;
    anyhow::ensure!(nar.len() > OUTPUT_BYTES, "a short NAR was served");
    stage.store(Stage::Fetched as u8, Ordering::SeqCst);
    Ok(())
}

/// Admits sessions back to back with `target`, one connection each, as
/// separate builds would; counts those the client saw admitted. Runs until
/// aborted: a refusal (a session cap, while the builder has yet to notice
/// that earlier connections closed) or a failure costs no use and is tried
/// again.
async fn admit_forever(target: Target, key: PathBuf, admitted: Arc<AtomicU64>) {
    loop {
        let Ok(connection) = drv_thru::client::connect(
            &target,
            drv_thru::transport::endpoint::RelayChoice::Disabled,
            Some(&key),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let answer = common::open_session(&connection).await;
        connection.close().await;
        if answer.is_ok() {
            admitted.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Everything a kill must not leave behind in `data`, found there: what
/// each is, and its path.
fn leftovers(data: &Path) -> Vec<(&'static str, PathBuf)> {
    let mut found = Vec::new();
    let mut look = |kind: &'static str, dir: &Path, bad: &dyn Fn(&str) -> bool| {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if bad(&entry.file_name().to_string_lossy()) {
                found.push((kind, entry.path()));
            }
        }
    };
    look("key or ticket temp file", data, &|name| {
        name.starts_with('.') && name.ends_with(".tmp")
    });
    look("admin socket staging", data, &|name| {
        name.starts_with(".socket-")
    });
    look("upload staging", &data.join("uploads"), &|_| true);
    look("garbage-collector roots", &data.join("gcroots"), &|_| true);
    look("cache temp file", &data.join("cache"), &|name| {
        name.starts_with(".tmp")
    });
    look("cache temp file", &data.join("cache/nar"), &|name| {
        name.starts_with(".tmp")
    });
    found
}

/// Checks the cache entries not in `checked` (and adds them): each one's
/// file is there, of the size and hash its narinfo says, and unpacks to the
/// NAR it names.
fn check_cache(data: &Path, checked: &mut BTreeSet<String>) {
    let dir = data.join("cache");
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".narinfo") || checked.contains(&name) {
            continue;
        }
        let narinfo: NarInfo = std::fs::read_to_string(entry.path())
            .unwrap()
            .parse()
            .unwrap();
        let file = std::fs::read(dir.join(&narinfo.url))
            .unwrap_or_else(|err| panic!("{name} names {}: {err}", narinfo.url));
        assert_eq!(Some(file.len() as u64), narinfo.file_size, "{name}");
        assert_eq!(Some(Sha256Hash::digest(&file)), narinfo.file_hash, "{name}");
        let nar = match narinfo.compression.as_deref() {
            Some("zstd") => zstd::decode_all(file.as_slice()).unwrap(),
            _ => file,
        };
        assert_eq!(nar.len() as u64, narinfo.nar_size, "{name}");
        assert_eq!(Sha256Hash::digest(&nar), narinfo.nar_hash, "{name}");
        checked.insert(name);
    }
}

/// Checks that of `nars`' paths, those valid in the builder's store hold
/// exactly the NAR announced; returns how many are valid.
fn check_store(store: &Store, nars: &[(String, Vec<u8>)]) -> usize {
    let paths: Vec<&str> = nars.iter().map(|(path, _)| path.as_str()).collect();
    let mut args = vec!["--check-validity", "--print-invalid"];
    args.extend(&paths);
    let invalid = store.run_ok("nix-store", &args);
    let valid: Vec<&(String, Vec<u8>)> = nars
        .iter()
        .filter(|(path, _)| !invalid.lines().any(|line| line == path))
        .collect();
    for (path, nar) in &valid {
        let dumped = store.run("nix-store", &["--dump", path]);
        assert!(dumped.status.success(), "{path} is valid but unreadable");
        assert_eq!(
            Sha256Hash::digest(&dumped.stdout),
            Sha256Hash::digest(nar),
            "{path} is valid with other contents than were uploaded"
        );
    }
    if !valid.is_empty() {
        let mut args = vec!["--verify-path"];
        args.extend(valid.iter().map(|(path, _)| path.as_str()));
        store.run_ok("nix-store", &args);
    }
    valid.len()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_loop_leaves_a_consistent_builder() {
    if !available() {
        return;
    }
    let seed = std::env::var("DRV_THRU_CRASH_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    eprintln!("kill -9 loop: seed {seed} (set DRV_THRU_CRASH_SEED to change it)");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let world = Arc::new(World::new(&format!("crash-{seed}-{}", std::process::id())));
    let client = world.store("client");
    let builder_store = world.store("builder");
    let jobs = jobs(&world, &client, KILLS, &mut rng);
    // One port for every run of the builder: tickets carry its addresses.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut builder = Builder::start_in(
        crate::builder::launcher_in(&builder_store, crate::builder::binary()),
        world.dir.join("data"),
        crate::builder::Options {
            listen: format!("127.0.0.1:{port}"),
            ..crate::builder::Options::new(&[])
        },
    );
    let admissions = builder.ticket(&["--uses", "1000000"]);
    let admissions_id = admissions.id().to_string();
    let builds = builder.ticket(&["--unlimited"]);
    let admitted = Arc::new(AtomicU64::new(0));
    let mut landed: BTreeMap<&str, usize> = BTreeMap::new();
    let mut left_by_kills: BTreeMap<&str, usize> = BTreeMap::new();
    let mut uploaded = Vec::new();
    let mut cached = BTreeSet::new();
    let mut answers_lost = 0;

    for (n, job) in jobs.iter().enumerate() {
        let aim = [Aim::Admission, Aim::Upload, Aim::Fill][n % 3];
        let taken_before = common::uses_taken(&builder, &admissions_id);
        let admitted_before = admitted.load(Ordering::SeqCst);
        let compressed_before = builder.log().matches("cache entry compressed").count();

        let admitter = tokio::spawn(admit_forever(
            Target::Ticket(Box::new(admissions.clone())),
            world.dir.join("admitter.key"),
            admitted.clone(),
        ));
        let stage = Arc::new(AtomicU8::new(Stage::Admitting as u8));
        let mut pipeline = {
            let (stage, job) = (stage.clone(), job.clone());
            let target = Target::Ticket(Box::new(builds.clone()));
            let key = world.dir.join("builds.key");
            tokio::spawn(async move {
                let connection = common::connect(&target, &key).await;
                run_job(&connection, &job, &stage).await
            })
        };

        // Wait for the aimed-at stage, then a random moment into it.
        let (wait_for, window) = match aim {
            Aim::Admission => (Stage::Admitting, Duration::from_millis(300)),
            Aim::Upload => (Stage::Uploading, Duration::from_millis(60)),
            Aim::Fill => (Stage::Fetching, Duration::from_millis(80)),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Stage::from_u8(stage.load(Ordering::SeqCst)) < wait_for
            || (matches!(aim, Aim::Admission) && admitted.load(Ordering::SeqCst) == admitted_before)
        {
            if pipeline.is_finished() && Stage::from_u8(stage.load(Ordering::SeqCst)) < wait_for {
                let ended = (&mut pipeline).await;
                panic!(
                    "job {n} ended before {wait_for:?}: {ended:?}\nbuilder log:\n{}",
                    builder.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "job {n} did not reach {wait_for:?} within a minute; builder log:\n{}",
                builder.log()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_micros(rng.below(window.as_micros() as u64))).await;
        let at = Stage::from_u8(stage.load(Ordering::SeqCst));
        let compressed =
            builder.log().matches("cache entry compressed").count() > compressed_before;
        builder.kill();
        let place = match (aim, at) {
            (Aim::Admission, Stage::Building) => "admission, while a build ran",
            (Aim::Admission, _) => "admission",
            (_, Stage::Admitting) => "admission of the build",
            (_, Stage::Uploading) => "upload",
            (_, Stage::Building) => "build",
            (_, _) if compressed => "fill, after its entry was written",
            (_, Stage::Fetching) => "fill, while serving",
            (_, Stage::Fetched) => "fill, while compressing",
        };
        eprintln!("kill {n}: aimed at {aim:?}, landed in {place}");
        *landed.entry(place).or_default() += 1;

        // Answers already on their way still count as seen; then stop.
        tokio::time::sleep(Duration::from_millis(50)).await;
        admitter.abort();
        pipeline.abort();
        let _ = admitter.await;
        let _ = pipeline.await;
        for (kind, _) in leftovers(&builder.data_dir) {
            *left_by_kills.entry(kind).or_default() += 1;
        }

        builder.start_again();
        let left = leftovers(&builder.data_dir);
        assert!(left.is_empty(), "left from before kill {n}: {left:?}");
        if builder.log().contains("killed builds an earlier run") {
            *left_by_kills.entry("running build").or_default() += 1;
        }
        let taken = common::uses_taken(&builder, &admissions_id) - taken_before;
        let seen = admitted.load(Ordering::SeqCst) - admitted_before;
        assert!(
            (seen..=seen + 1).contains(&taken),
            "kill {n}: {seen} admissions seen, {taken} uses recorded"
        );
        answers_lost += taken - seen;
        uploaded.extend(job.nars.iter().cloned());
        check_store(&builder_store, &job.nars);
        check_cache(&builder.data_dir, &mut cached);
    }

    let valid = check_store(&builder_store, &uploaded);
    check_cache(&builder.data_dir, &mut BTreeSet::new());
    builder_store.run_ok("nix-store", &["--verify", "--check-contents"]);
    eprintln!(
        "kill -9 loop: seed {seed}, {KILLS} kills in {:.0?}; landed: {landed:?}; \
         {} admissions seen, {answers_lost} more taken whose answer the kill cut off; {valid} of {} uploaded paths valid; {} cache entries; \
         left behind by kills and cleared at restart: {left_by_kills:?}",
        started.elapsed(),
        admitted.load(Ordering::SeqCst),
        uploaded.len(),
        cached.len(),
    );
}
