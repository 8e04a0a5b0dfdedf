//! Server lifecycle and configuration errors, and the standard gRPC
//! services next to ours.

use std::{
    os::unix::fs::PermissionsExt,
    time::{Duration, Instant},
};

use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use drv_thru::proto::{builder_client::BuilderClient, cache_client::CacheClient};

use crate::common::{
    Builder, Launcher, bare_connection, binary, closed_with, command, connect, key_file, refusal,
    session_request,
};

fn serve(args: &[&str]) -> std::process::Output {
    command().arg("serve").args(args).output().unwrap()
}

fn one_line_error(output: &std::process::Output) -> String {
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    errors[0].to_owned()
}

#[test]
fn refuses_a_secret_key_readable_by_others_with_the_chmod_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("secret.key"), format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(
        data.join("secret.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let error = one_line_error(&serve(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]));
    assert!(error.contains("chmod 600"), "{error}");
}

#[test]
fn config_errors_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.json");
    std::fs::write(&config, r#"{"max_concurent_builds": 2}"#).unwrap();
    let error = one_line_error(&serve(&["--config", config.to_str().unwrap()]));
    assert!(
        error.contains("server.json") && error.contains("max_concurent_builds"),
        "{error}"
    );
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let error = one_line_error(&serve(&[
        "--data-dir",
        builder.data_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]));
    assert!(error.contains("already using"), "{error}");
}

#[test]
fn graceful_stop_removes_the_admin_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mut builder = Builder::start(dir.path(), &[]);
    let socket = builder.data_dir.join("admin.sock");
    assert!(socket.exists());
    builder.stop();
    assert!(!socket.exists());
    let output = builder.cli(&["status"]);
    let error = one_line_error(&output);
    assert!(error.contains("no drv-thru server is running"), "{error}");
}

#[test]
fn secret_files_are_private_and_the_public_key_is_readable() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let mode = |name: &str| {
        std::fs::metadata(builder.data_dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    for secret in [
        "secret.key",
        "signing-secret.key",
        "ticket-secret.key",
        "tickets.json",
        "admin.sock",
    ] {
        if builder.data_dir.join(secret).exists() {
            assert_eq!(mode(secret) & 0o077, 0, "{secret} must be private");
        }
    }
    assert_eq!(mode("signing-public.key"), 0o644);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_answers_anyone_and_reflection_only_the_admin_socket() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let stranger = connect(&builder.direct_target(), &key_file(dir.path(), "stranger")).await;
    let mut health = HealthClient::new(stranger.channel.clone());
    let serving = health
        .check(HealthCheckRequest {
            service: "drvthru.v1.Builder".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serving.status(), ServingStatus::Serving);
    // A large request is refused before it is held, let alone echoed back.
    let oversized = health
        .check(HealthCheckRequest {
            service: "x".repeat(1 << 20),
        })
        .await
        .unwrap_err();
    assert_eq!(oversized.code(), Code::OutOfRange, "{oversized:?}");
    assert!(oversized.message().len() < 1024, "{}", oversized.message());

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let over_iroh = ServerReflectionClient::new(stranger.channel.clone())
        .server_reflection_info(tokio_stream::iter([request()]))
        .await
        .unwrap_err();
    assert_eq!(over_iroh.code(), Code::Unimplemented, "{over_iroh:?}");
    stranger.close().await;

    let admin = drv_thru::client::admin(&builder.data_dir).await.unwrap();
    let mut responses = ServerReflectionClient::new(admin.clone())
        .server_reflection_info(tokio_stream::iter([request()]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, SERVED);

    // Tools that speak only the older reflection (grpcio-reflection's own
    // client) see the same.
    use tonic_reflection::pb::v1alpha;
    let mut responses = v1alpha::server_reflection_client::ServerReflectionClient::new(admin)
        .server_reflection_info(tokio_stream::iter([v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        }]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, SERVED);
}

/// What the builder's reflection lists, sorted: what it serves, and not the
/// import helper, which only the client machine's helper serves.
const SERVED: [&str; 6] = [
    "drvthru.v1.Builder",
    "drvthru.v1.Cache",
    "drvthru.v1.Tickets",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_socket_manages_the_builder_and_does_not_build() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let admin = drv_thru::client::admin(&builder.data_dir).await.unwrap();
    let open = BuilderClient::new(admin.clone())
        .open_session(session_request())
        .await
        .unwrap_err();
    let nar_info = CacheClient::new(admin)
        .get_nar_info(drv_thru::proto::GetNarInfoRequest::default())
        .await
        .unwrap_err();
    for refused in [open, nar_info] {
        assert_eq!(
            (refused.code(), refusal(&refused)),
            (Code::PermissionDenied, "not-allowed"),
            "{refused:?}"
        );
        assert!(refused.message().contains("over Iroh"), "{refused:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_strangers_cannot_lock_out_clients() {
    use drv_thru::proto::{StatusRequest, builder_client::BuilderClient};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        r#"{ "max_unauthenticated_connections": 3, "max_connections_per_client": 1,
            "authentication_timeout": "2s" }"#,
    )
    .unwrap();
    let trusted_key = key_file(dir.path(), "trusted");
    let trusted_id = crate::common::endpoint_id_of(&trusted_key);
    let builder = Builder::start(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--trusted-client",
            &trusted_id.to_string(),
        ],
    );
    let target = builder.direct_target();
    // One client gets its one connection, not a second (close code 1).
    let mut strangers = vec![bare_connection(&target, &key_file(dir.path(), "s0")).await];
    let twin = bare_connection(&target, &key_file(dir.path(), "s0")).await;
    assert_eq!(closed_with(&twin.1).await, 1);
    // Three strangers hold every unauthenticated slot and never
    // authenticate. Once they have idled a second, a newcomer takes the
    // oldest one's place, which is closed as unauthenticated (code 2).
    for n in 1..3 {
        strangers.push(bare_connection(&target, &key_file(dir.path(), &format!("s{n}"))).await);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fourth = connect(&target, &key_file(dir.path(), "s3")).await;
    HealthClient::new(fourth.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    let (oldest_endpoint, oldest) = strangers.remove(0);
    assert_eq!(closed_with(&oldest).await, 2);
    oldest_endpoint.close().await;

    // A trusted client is not among them.
    let trusted = connect(&target, &trusted_key).await;
    BuilderClient::new(trusted.channel.clone())
        .status(StatusRequest {})
        .await
        .unwrap();

    // Past the deadline the strangers are closed (close code 2), and their
    // slots are free again.
    for (_, connection) in &strangers {
        assert_eq!(closed_with(connection).await, 2);
    }
    let newcomer = connect(&target, &key_file(dir.path(), "s4")).await;
    HealthClient::new(newcomer.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    trusted.close().await;
    newcomer.close().await;
    fourth.close().await;
    for (endpoint, _) in strangers.into_iter().chain([twin]) {
        endpoint.close().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_stream_does_not_hold_up_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut builder = Builder::start(dir.path(), &[]);
    let stranger = connect(&builder.direct_target(), &key_file(dir.path(), "stranger")).await;
    // A health watch streams for as long as the caller keeps it.
    let _watch = HealthClient::new(stranger.channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || builder.stop())
        .await
        .unwrap();
    // The drain is 5 s; before it was bounded, one stream held it for 41 s.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "shutdown took {:?}",
        started.elapsed()
    );
    stranger.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_that_sits_idle_is_ended() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{ "session_idle_timeout": "1s" }"#).unwrap();
    let builder = Builder::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let target = drv_thru::client::Target::Ticket(Box::new(builder.ticket(&[])));
    let client = connect(&target, &key_file(dir.path(), "idle")).await;
    let admitted = crate::common::open_session(&client).await.unwrap();
    // Nothing uploaded, no build: idle.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let ended = loop {
        let recent = builder.cli_ok(&["status", "--json"]);
        if recent.contains("session_idle_timeout") {
            break recent;
        }
        assert!(std::time::Instant::now() < deadline, "{recent}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(ended.contains(&admitted.session_id), "{ended}");
    let gone = drv_thru::proto::builder_client::BuilderClient::new(client.channel.clone())
        .build(drv_thru::proto::BuildRequest {
            session_id: admitted.session_id,
            rebuild: false,
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    client.close().await;
}

/// Seconds of CPU the process `pid` has used, user and system.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses, start at
    // the state (field 3); utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn a_server_out_of_descriptors_pauses_accepting_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let launcher: Launcher = std::sync::Arc::new(|| {
        let mut command = crate::two_stores::offline(std::process::Command::new("prlimit"));
        command.args(["--nofile=64", "--"]).arg(binary());
        command
    });
    let builder = Builder::start_with(launcher, dir.path().join("data"), &[]);
    let socket = builder.data_dir.join("admin.sock");
    // Each accepted connection takes one of the builder's 64 descriptors;
    // the rest wait in the socket's backlog, which keeps it readable.
    let held: Vec<_> = (0..100)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    // Time to accept what it can.
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu_seconds(builder.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(builder.pid()) - before;
    assert!(used < 0.2, "the builder used {used:.2} s of CPU in 2 s");
    assert_eq!(
        builder.log().matches("cannot accept connections").count(),
        1
    );

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !builder.cli(&["status"]).status.success() {
        assert!(Instant::now() < deadline, "{}", builder.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(builder.log().contains("accepting connections again"));
}

#[tokio::test(flavor = "multi_thread")]
async fn session_caps_come_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        r#"{ "max_sessions_per_client": 2, "max_sessions_per_ticket": 1, "max_sessions": 3 }"#,
    )
    .unwrap();
    let builder = Builder::start(dir.path(), &["--config", config.to_str().unwrap()]);
    // Client a holds three connections, each with a ticket of its own.
    let mut connections = Vec::new();
    for (key, flags) in [
        ("a", &["--unlimited"][..]),
        ("a", &[]),
        ("a", &[]),
        ("b", &[]),
        ("c", &[]),
    ] {
        let target = drv_thru::client::Target::Ticket(Box::new(builder.ticket(flags)));
        connections.push(connect(&target, &key_file(dir.path(), key)).await);
    }
    let open = |n: usize| crate::common::open_session(&connections[n]);
    let refused = |status: tonic::Status| refusal(&status).to_owned();
    open(0).await.unwrap();
    assert_eq!(
        refused(open(0).await.unwrap_err()),
        "too-many-sessions-for-ticket"
    );
    open(1).await.unwrap();
    assert_eq!(
        refused(open(2).await.unwrap_err()),
        "too-many-sessions-for-client"
    );
    open(3).await.unwrap();
    assert_eq!(refused(open(4).await.unwrap_err()), "too-many-sessions");
    for connection in connections {
        connection.close().await;
    }
}
