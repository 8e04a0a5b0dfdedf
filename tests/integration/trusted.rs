//! Trusted clients: a configured key builds and watches without a ticket; a
//! stranger is refused.

use drv_thru::proto::{
    ListTicketsRequest, StatusRequest, builder_client::BuilderClient, tickets_client::TicketsClient,
};
use tonic::Code;

use crate::common::{
    Builder, connect, endpoint_id_of, key_file, named_builder, open_session, refusal,
};

#[tokio::test(flavor = "multi_thread")]
async fn trusted_key_builds_and_watches_a_stranger_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let alex_key = key_file(dir.path(), "alex");
    let alex = endpoint_id_of(&alex_key);
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        format!(r#"{{"trusted_clients": {{"alex": {{"public_key": "{alex}", "max_build_time": "5m", "max_upload_bytes": "1G"}}}}}}"#),
    )
    .unwrap();
    let builder = Builder::start(dir.path(), &["--config", config.to_str().unwrap()]);

    let trusted = connect(&builder.direct_target(), &alex_key).await;
    let session = open_session(&trusted).await.unwrap();
    assert_eq!(session.client_label, "alex");
    assert_eq!(session.limits.unwrap().max_upload_bytes, 1 << 30);
    let status = BuilderClient::new(trusted.channel.clone())
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.endpoint_id, builder.endpoint_id.to_string());
    assert_eq!(status.active.len(), 1, "the open session shows as active");
    // Known and trusted, but tickets are the local admin's business.
    let tickets = list_tickets(&trusted).await;
    assert_eq!(
        (tickets.code(), refusal(&tickets)),
        (Code::PermissionDenied, "not-allowed")
    );
    trusted.close().await;

    let stranger = connect(&builder.direct_target(), &key_file(dir.path(), "stranger")).await;
    let status = BuilderClient::new(stranger.channel.clone())
        .status(StatusRequest {})
        .await
        .unwrap_err();
    // A stranger learns the same from every method, tickets included.
    for refused in [status, list_tickets(&stranger).await] {
        assert_eq!(
            (refused.code(), refusal(&refused)),
            (Code::Unauthenticated, "client-not-trusted")
        );
    }
    stranger.close().await;
}

/// How `ListTickets` over Iroh is refused.
async fn list_tickets(connection: &drv_thru::client::Connection) -> tonic::Status {
    TicketsClient::new(connection.channel.clone())
        .list_tickets(ListTicketsRequest::default())
        .await
        .unwrap_err()
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_client_flag_and_named_builder_work() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "sam");
    let sam = endpoint_id_of(&key);
    let builder = Builder::start(dir.path(), &["--trusted-client", &sam.to_string()]);
    let named = named_builder(
        dir.path(),
        "leviathan",
        &format!(
            r#"{{"endpoint_id": "{}", "addrs": ["{}"]}}"#,
            builder.endpoint_id, builder.addr
        ),
    );
    let client = connect(&named, &key).await;
    open_session(&client).await.unwrap();
    client.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn status_of_a_remote_builder_from_builders_json() {
    let dir = tempfile::tempdir().unwrap();
    let config_home = dir.path().join("config");
    let key = config_home.join("drv-thru/secret.key");
    let me = endpoint_id_of(&key);
    let builder = Builder::start(dir.path(), &["--trusted-client", &me.to_string()]);
    std::fs::write(
        config_home.join("drv-thru/builders.json"),
        format!(
            r#"{{"builders": {{"leviathan": {{"endpoint_id": "{}", "relay_url": null, "addrs": ["{}"]}}}}}}"#,
            builder.endpoint_id, builder.addr
        ),
    )
    .unwrap();
    let output = crate::common::command()
        .args(["status", "--builder", "leviathan", "--json"])
        .env("XDG_CONFIG_HOME", &config_home)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["endpoint_id"], builder.endpoint_id.to_string());
}
