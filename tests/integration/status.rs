//! Status over the admin socket: ready as soon as the server is, and live
//! through `WatchStatus`.

use std::time::{Duration, Instant};

use drv_thru::{
    client::{self, Target},
    proto::{WatchStatusRequest, builder_client::BuilderClient},
};

use crate::common::{Builder, connect, key_file, open_session};

#[tokio::test(flavor = "multi_thread")]
async fn status_works_as_soon_as_the_server_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let json: serde_json::Value =
        serde_json::from_str(&builder.cli_ok(&["status", "--json"])).unwrap();
    assert_eq!(json["endpoint_id"], builder.endpoint_id.to_string());
    assert_eq!(json["max_concurrent_builds"], 1);
    assert!(
        json["signing_public_key"]
            .as_str()
            .unwrap()
            .starts_with("drv-thru-")
    );
    // The server's own resource use, as the admin sees it.
    let process = &json["process"];
    assert!(
        process["resident_bytes"].as_u64().unwrap() > 1 << 20,
        "{json}"
    );
    assert!(process["open_files"].as_u64().unwrap() > 3, "{json}");
    assert!(process["threads"].as_u64().unwrap() >= 1, "{json}");
    assert!(process["tasks"].as_u64().unwrap() >= 1, "{json}");
    let text = builder.cli_ok(&["status"]);
    assert!(
        text.contains(&builder.endpoint_id.to_string())
            && text.contains("idle")
            && text.contains(" MiB resident, "),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_status_pushes_a_change_within_100ms() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let admin = client::admin(&builder.data_dir).await.unwrap();
    let mut watch = BuilderClient::new(admin)
        .watch_status(WatchStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap().status.unwrap();
    assert!(first.active.is_empty());

    let ticket = builder.ticket(&[]);
    let client = connect(
        &Target::Ticket(Box::new(ticket)),
        &key_file(dir.path(), "c"),
    )
    .await;
    let admitted = open_session(&client).await.unwrap();
    let admitted_at = Instant::now();
    // Admitted, it waits for its upload.
    let frame = next_frame_where(&mut watch, |frame| {
        frame.active.iter().any(|build| {
            build.session_id == admitted.session_id
                && build.phase() == drv_thru::proto::BuildPhase::WaitingForClient
        })
    })
    .await;
    let delay = admitted_at.elapsed();
    assert!(
        delay < Duration::from_millis(100),
        "change arrived after {delay:?}"
    );
    assert_eq!(frame.open_connections, 1);

    // Leaving cancels the session and the watcher sees it finish.
    client.close().await;
    let frame = next_frame_where(&mut watch, |frame| {
        frame
            .recent
            .iter()
            .any(|build| build.session_id == admitted.session_id)
    })
    .await;
    assert_eq!(
        frame.recent[0].result(),
        drv_thru::proto::BuildResult::Cancelled
    );
    assert!(frame.active.is_empty());
}

/// The first frame of `watch` that satisfies `wanted`.
async fn next_frame_where(
    watch: &mut tonic::Streaming<drv_thru::proto::WatchStatusResponse>,
    wanted: impl Fn(&drv_thru::proto::BuilderStatus) -> bool,
) -> drv_thru::proto::BuilderStatus {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(15), watch.message())
            .await
            .expect("a frame arrives")
            .unwrap()
            .expect("the stream goes on")
            .status
            .unwrap();
        if wanted(&frame) {
            return frame;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_command_prints_frames() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let mut child = crate::common::command()
        .args(["status", "--watch", "--json", "--data-dir"])
        .arg(&builder.data_dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["endpoint_id"], builder.endpoint_id.to_string());
    child.kill().unwrap();
    child.wait().unwrap();
}
