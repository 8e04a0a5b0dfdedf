//! The bounded soak: several clients send mixed traffic for
//! `DRV_THRU_SOAK` (default 2m) from a fixed seed (`DRV_THRU_SOAK_SEED`):
//! real builds, failing builds, cancelled builds, over-limit uploads and
//! the suite's lighter attacks. The builder's memory, files, threads, tasks
//! and staged bytes are recorded every 5 s and must stay flat.

use std::{
    os::unix::process::CommandExt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    arena::Arena,
    attacks,
    common::Rng,
    faults::{ONE_AT_A_TIME, Outcome, Probe, Sample, Tally, count, tally_text},
    two_stores::available,
};

/// Clients sending traffic at once.
const CLIENTS: u64 = 3;
/// Time between two records of the builder's figures.
const RECORD_EVERY: Duration = Duration::from_secs(5);
/// How far the figures at the end may lie above those after the warm-up.
const RSS_TOLERANCE: u64 = 32 << 20;
const FD_TOLERANCE: u32 = 8;
const THREAD_TOLERANCE: u32 = 8;
const TASK_TOLERANCE: u64 = 32;

/// One record of the series.
#[derive(Debug, Clone, Copy)]
struct Record {
    at: Duration,
    sample: Sample,
    staged: u64,
}

impl Record {
    fn line(&self) -> String {
        format!(
            "t={:>5}s  rss {:>4} MiB  fds {:>3}  threads {:>3}  tasks {:>4}  staged {:>6} KiB{}",
            self.at.as_secs(),
            self.sample.rss >> 20,
            self.sample.fds,
            self.sample.threads,
            self.sample.tasks,
            self.staged >> 10,
            if self.sample.answered {
                ""
            } else {
                "  (status did not answer)"
            }
        )
    }
}

/// What one step of a client does, with the outcome it must see.
async fn step(arena: &Arc<Arena>, rng: &mut Rng) -> (&'static str, Result<String, String>) {
    match rng.below(10) {
        0..=2 => (
            "build",
            build(arena, "fresh").await.map(|_| "built".to_owned()),
        ),
        3 => {
            let seen = match build(arena, "fail").await {
                Err(err) if err.starts_with("exit status: 1 ") => {
                    Ok("failed as it must".to_owned())
                }
                Err(err) => Err(err),
                Ok(_) => Err("the failing build succeeded".to_owned()),
            };
            ("failing build", seen)
        }
        4 => {
            let after = Duration::from_millis(500 + rng.below(3000));
            (
                "cancelled build",
                cancelled_build(arena.clone(), after).await,
            )
        }
        5 => (
            "over-limit upload",
            expect(
                attacks::over_limit_upload(arena).await,
                "ResourceExhausted/upload-too-large",
            )
            .await,
        ),
        _ => {
            let (name, expected, attack) = light_attack(arena, rng.below(9));
            let hold = Duration::from_millis(rng.below(3000));
            let (seen, held) = attack.await;
            tokio::time::sleep(hold).await;
            (name, expect((seen, held), expected).await)
        }
    }
}

/// `drv-thru build` of the test flake's `attr` with a ticket of its own,
/// off the runtime.
async fn build(arena: &Arc<Arena>, attr: &'static str) -> Result<Duration, String> {
    let arena = arena.clone();
    tokio::task::spawn_blocking(move || {
        let ticket = arena.ticket(&[]).to_string();
        arena.client_build(attr, &ticket)
    })
    .await
    .unwrap()
}

/// Releases what an attack held; its outcome, if it is `expected`.
async fn expect(outcome: Outcome, expected: &str) -> Result<String, String> {
    let (seen, held) = outcome;
    held.release().await;
    if seen.starts_with(expected) {
        Ok(expected.to_owned())
    } else {
        Err(format!("expected {expected}, saw {seen}"))
    }
}

type Attack<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + 'a>>;

/// One of the suite's attacks light enough to repeat, with the outcome the
/// suite expects of it.
fn light_attack(arena: &Arena, which: u64) -> (&'static str, &'static str, Attack<'_>) {
    match which {
        0 => (
            "wrong ALPN",
            "handshake refused",
            Box::pin(attacks::wrong_alpn(arena)),
        ),
        1 => (
            "garbage HTTP/2",
            "stream closed",
            Box::pin(attacks::garbage_instead_of_http2(arena)),
        ),
        2 => (
            "garbage gRPC",
            "Internal",
            Box::pin(attacks::garbage_grpc_message(arena)),
        ),
        3 => (
            "oversized health",
            "OutOfRange",
            Box::pin(attacks::oversized_health_request(arena)),
        ),
        4 => (
            "unannounced upload",
            "InvalidArgument",
            Box::pin(attacks::unannounced_upload(arena)),
        ),
        5 => (
            "mismatching upload",
            "InvalidArgument",
            Box::pin(attacks::mismatching_upload(arena)),
        ),
        6 => (
            "NAR entry ..",
            "InvalidArgument",
            Box::pin(attacks::nar_with_dot_dot(arena)),
        ),
        7 => (
            "unread health requests",
            "held",
            Box::pin(attacks::unread_requests_from_strangers(arena, 2)),
        ),
        _ => (
            "another session's cache",
            "NotFound",
            Box::pin(attacks::read_another_sessions_cache(arena)),
        ),
    }
}

/// Starts a build of the silent `quiet` derivation and kills its client
/// (and the client's Nix) `after` a while, as a closed laptop would.
async fn cancelled_build(arena: Arc<Arena>, after: Duration) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        let ticket = arena.ticket(&[]).to_string();
        let mut client = arena
            .client_build_command("quiet", &ticket)
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(after);
        // SAFETY: kill(2) on the process group this test made.
        unsafe { libc::kill(-(client.id() as i32), libc::SIGKILL) };
        client.wait().unwrap();
        Ok("cancelled".to_owned())
    })
    .await
    .unwrap()
}

/// A client's loop until `deadline`: its steps' outcomes go into `tally`,
/// its failures into `failures`.
async fn client(
    arena: Arc<Arena>,
    mut rng: Rng,
    deadline: Instant,
    tally: Tally,
    failures: Arc<Mutex<Vec<String>>>,
) {
    while Instant::now() < deadline {
        let (name, result) = step(&arena, &mut rng).await;
        let key = match result {
            Ok(seen) => format!("{name}: {seen}"),
            Err(err) => {
                failures.lock().unwrap().push(format!("{name}: {err}"));
                format!("{name}: FAILED")
            }
        };
        count(&tally, key);
    }
}

/// How long the soak runs: `DRV_THRU_SOAK` (e.g. `30m`), else 2 minutes.
fn duration() -> Duration {
    std::env::var("DRV_THRU_SOAK").map_or(Duration::from_secs(120), |text| {
        humantime::parse_duration(&text)
            .unwrap_or_else(|err| panic!("DRV_THRU_SOAK={text:?} is no duration: {err}"))
    })
}

/// The seed: `DRV_THRU_SOAK_SEED`, else a fixed one.
fn seed() -> u64 {
    std::env::var("DRV_THRU_SOAK_SEED").map_or(0x5eed_d7b0, |text| {
        text.parse()
            .unwrap_or_else(|err| panic!("DRV_THRU_SOAK_SEED={text:?} is no number: {err}"))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn mixed_traffic_leaves_the_builder_flat() {
    if !available() {
        return;
    }
    let _alone = ONE_AT_A_TIME.lock().await;
    let (duration, seed) = (duration(), seed());
    println!(
        "soak: {} with seed {seed} (DRV_THRU_SOAK_SEED={seed} replays it)",
        humantime::format_duration(duration)
    );
    let arena = Arc::new(Arena::start("soak"));
    let probe = Probe::of(&arena);
    let started = Instant::now();
    let records = Arc::new(Mutex::new(Vec::new()));
    let recorder = tokio::spawn({
        let (arena, records, probe) = (arena.clone(), records.clone(), probe.clone());
        async move {
            loop {
                let record = Record {
                    at: started.elapsed(),
                    sample: probe.sample().await,
                    staged: arena.staging_bytes(),
                };
                println!("{}", record.line());
                records.lock().unwrap().push(record);
                tokio::time::sleep(RECORD_EVERY).await;
            }
        }
    });
    let tally = Tally::default();
    let failures = Arc::new(Mutex::new(Vec::new()));
    let deadline = started + duration;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            tokio::spawn(client(
                arena.clone(),
                Rng(seed.wrapping_add(n)),
                deadline,
                tally.clone(),
                failures.clone(),
            ))
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    recorder.abort();
    let end = settled(&arena, &probe, started).await;
    let records = records.lock().unwrap().clone();
    // The first records are the builder finding its feet (the first
    // sessions, Nix's caches, tokio's blocking threads).
    let warm = records[(records.len() / 6).min(records.len() - 1)];
    let middle = records[records.len() / 2];
    println!("soak steps: {}", tally_text(&tally));
    println!(
        "soak series (start / after warm-up / middle / end, settled):\n  {}\n  {}\n  {}\n  {}\n  {}",
        records[0].line(),
        warm.line(),
        middle.line(),
        records[records.len() - 1].line(),
        end.line()
    );
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "steps failed:\n{}",
        failures.join("\n")
    );
    let after_warm_up = &records[records.len() / 6..];
    let half = after_warm_up.len() / 2;
    let peak = |records: &[Record]| records.iter().map(|r| r.sample.rss).max().unwrap_or(0);
    assert!(
        after_warm_up.len() < 4
            || peak(&after_warm_up[half..]) <= peak(&after_warm_up[..half]) + RSS_TOLERANCE,
        "resident memory kept growing"
    );
    let (warm, end) = (warm.sample, end);
    assert!(
        end.sample.rss <= warm.rss + RSS_TOLERANCE,
        "memory: {} MiB after warm-up, {} MiB at the end",
        warm.rss >> 20,
        end.sample.rss >> 20
    );
    assert!(
        end.sample.fds <= warm.fds + FD_TOLERANCE,
        "{warm:?} {end:?}"
    );
    assert!(
        end.sample.threads <= warm.threads + THREAD_TOLERANCE,
        "{warm:?} {end:?}"
    );
    assert!(
        end.sample.tasks <= warm.tasks + TASK_TOLERANCE,
        "{warm:?} {end:?}"
    );
    assert_eq!(end.staged, 0, "staged files were left behind");
    assert!(end.sample.answered, "the status stopped answering");
}

/// The builder's figures once its sessions have ended (at most 30 s after
/// the traffic stops): tokio's idle blocking threads leave after 10 s.
async fn settled(arena: &Arena, probe: &Probe, started: Instant) -> Record {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: serde_json::Value = serde_json::from_str(&tokio::task::block_in_place(|| {
            arena.builder.cli_ok(&["status", "--json"])
        }))
        .unwrap();
        let busy =
            status["active"].as_array().unwrap().len() + status["queued"].as_array().unwrap().len();
        if busy == 0 || Instant::now() > deadline {
            tokio::time::sleep(Duration::from_secs(11)).await;
            return Record {
                at: started.elapsed(),
                sample: probe.sample().await,
                staged: arena.staging_bytes(),
            };
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
