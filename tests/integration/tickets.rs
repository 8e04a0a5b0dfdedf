//! Tickets over real Iroh connections: admission, every refusal, the
//! one-use race, persistence across restarts and crashes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drv_thru::{
    client::Target,
    proto::{builder_client::BuilderClient, tickets_client::TicketsClient},
    ticket::{BearerSecret, Ticket},
};
use tonic::Code;

use crate::common::{
    Builder, connect, endpoint_id_of, key_file, named_builder, open_session, refusal, uses_taken,
};

#[tokio::test(flavor = "multi_thread")]
async fn one_use_ticket_admits_one_build_then_says_used_up() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let ticket = builder.ticket(&["--name", "friend"]);
    assert_eq!(ticket.builder_id(), builder.endpoint_id);

    let client = connect(
        &Target::Ticket(Box::new(ticket.clone())),
        &key_file(dir.path(), "a"),
    )
    .await;
    let admitted = open_session(&client).await.unwrap();
    assert_eq!(admitted.client_label, "friend");
    let limits = admitted.limits.unwrap();
    assert_eq!(limits.max_upload_bytes, 20 << 30);
    assert_eq!(limits.max_build_time.unwrap().seconds, 30 * 60);

    let again = open_session(&client).await.unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted, "{again:?}");
    assert_eq!(refusal(&again), "ticket-used-up");
    assert!(
        again.message().contains("no uses left"),
        "{}",
        again.message()
    );
    client.close().await;
}

/// A builders.json entry naming a `ticket_file` presents that ticket, as
/// Nix's daemon does when it offloads: no trusted key, one use per session.
#[tokio::test(flavor = "multi_thread")]
async fn named_builder_with_a_ticket_file_presents_its_ticket() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let ticket = builder.ticket(&["--name", "farm", "--unlimited"]);
    let ticket_file = dir.path().join("farm.ticket");
    std::fs::write(&ticket_file, format!("{ticket}\n")).unwrap();
    std::fs::set_permissions(&ticket_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let target = named_builder(
        dir.path(),
        "farm",
        &format!(r#"{{"ticket_file": "{}"}}"#, ticket_file.display()),
    );

    let client = connect(&target, &key_file(dir.path(), "machine")).await;
    for _ in 0..2 {
        assert_eq!(open_session(&client).await.unwrap().client_label, "farm");
    }
    assert_eq!(uses_taken(&builder, &ticket.id().to_string()), 2);
    client.close().await;
}

/// Inputs past a session's budgets are refused before admission takes the
/// ticket's use.
#[tokio::test(flavor = "multi_thread")]
async fn inputs_past_a_budget_cost_no_ticket_use() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let ticket = builder.ticket(&[]);
    let client = connect(
        &Target::Ticket(Box::new(ticket)),
        &key_file(dir.path(), "a"),
    )
    .await;
    let mut too_many = crate::common::session_request();
    too_many.inputs = vec![Default::default(); 50_001];
    // The fixture's one input is a text-hashed .drv file.
    let mut too_much_text = crate::common::session_request();
    too_much_text.inputs[0].nar_size = (256 << 20) + 1;
    for (request, reason) in [
        (too_many, "too-many-inputs"),
        (too_much_text, "text-inputs-too-large"),
    ] {
        let refused = BuilderClient::new(client.channel.clone())
            .open_session(request)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert_eq!(refusal(&refused), reason, "{refused:?}");
    }
    open_session(&client).await.unwrap();
    client.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_refusal_is_distinct() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let key = key_file(dir.path(), "client");
    let me = endpoint_id_of(&key);

    // Unknown: right builder, forged secret.
    let real = builder.ticket(&[]);
    let forged = Ticket::new(
        real.builder().clone(),
        real.signing_key().clone(),
        real.id(),
        BearerSecret::from_bytes([7; 32]),
    );
    // Revoked.
    let revoked = builder.ticket(&[]);
    builder.cli_ok(&["ticket", "revoke", &revoked.id().to_string()]);
    // Expired.
    let expired = builder.ticket(&["--expires", "1s"]);
    // Bound to someone else, and bound to us.
    let other = endpoint_id_of(&key_file(dir.path(), "other"));
    let bound_elsewhere = builder.ticket(&["--bind-client", &other.to_string()]);
    let bound_to_me = builder.ticket(&["--bind-client", &me.to_string()]);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let cases = [
        (
            forged,
            Code::Unauthenticated,
            "ticket-unknown",
            "did not issue",
        ),
        (revoked, Code::PermissionDenied, "ticket-revoked", "revoked"),
        (expired, Code::PermissionDenied, "ticket-expired", "expired"),
        (
            bound_elsewhere,
            Code::PermissionDenied,
            "ticket-bound-to-other-client",
            "bound to client",
        ),
    ];
    for (ticket, code, reason, text) in cases {
        let client = connect(&Target::Ticket(Box::new(ticket)), &key).await;
        let refused = open_session(&client).await.unwrap_err();
        assert_eq!(
            (refused.code(), refusal(&refused)),
            (code, reason),
            "{refused:?}"
        );
        assert!(refused.message().contains(text), "{}", refused.message());
        client.close().await;
    }

    let client = connect(&Target::Ticket(Box::new(bound_to_me)), &key).await;
    open_session(&client)
        .await
        .expect("a ticket bound to this client admits it");
    client.close().await;

    // No ticket and not trusted.
    let stranger = connect(&builder.direct_target(), &key).await;
    let refused = open_session(&stranger).await.unwrap_err();
    assert_eq!(
        (refused.code(), refusal(&refused)),
        (Code::Unauthenticated, "client-not-trusted")
    );
    assert!(
        refused.message().contains("--ticket"),
        "{}",
        refused.message()
    );
    stranger.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_clients_get_exactly_one_admission() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let ticket = builder.ticket(&[]);
    let mut clients = Vec::new();
    for n in 0..12 {
        let target = Target::Ticket(Box::new(ticket.clone()));
        clients.push(connect(&target, &key_file(dir.path(), &format!("c{n}"))).await);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(clients.len()));
    let attempts: Vec<_> = clients
        .iter()
        .map(|client| {
            let channel = client.channel.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                BuilderClient::new(channel)
                    .open_session(crate::common::session_request())
                    .await
            })
        })
        .collect();
    let mut admitted = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(_) => admitted += 1,
            Err(status) => assert_eq!(refusal(&status), "ticket-used-up", "{status:?}"),
        }
    }
    assert_eq!(admitted, 1);
    for client in clients {
        client.close().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tickets_and_uses_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let ticket = builder.ticket(&["--uses", "2"]);
    let id = ticket.id().to_string();
    let key = key_file(dir.path(), "client");
    let client = connect(&Target::Ticket(Box::new(ticket.clone())), &key).await;
    open_session(&client).await.unwrap();
    client.close().await;

    let builder = builder.restart();
    assert_eq!(uses_taken(&builder, &id), 1);
    let revealed: Ticket = builder
        .cli_ok(&["ticket", "reveal", &id])
        .trim()
        .parse()
        .unwrap();
    assert!(
        revealed.secret().matches(ticket.secret()),
        "reveal reproduces the same secret"
    );
    assert_eq!(
        revealed.signing_key(),
        ticket.signing_key(),
        "the signing key survives restarts"
    );

    // The restarted builder listens on a new port: the revealed ticket has it.
    let client = connect(&Target::Ticket(Box::new(revealed.clone())), &key).await;
    open_session(&client).await.unwrap();
    let refused = open_session(&client).await.unwrap_err();
    assert_eq!(refusal(&refused), "ticket-used-up");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_neither_loses_nor_duplicates_uses() {
    let dir = tempfile::tempdir().unwrap();
    let mut builder = Builder::start(dir.path(), &[]);
    let ticket = builder.ticket(&["--uses", "1000"]);
    let id = ticket.id().to_string();
    let target = Target::Ticket(Box::new(ticket));
    let key = key_file(dir.path(), "client");

    // Admit sessions back to back (one connection each, as separate builds
    // would) and kill the builder mid-stream.
    let acknowledged = Arc::new(AtomicU64::new(0));
    let counted = acknowledged.clone();
    let admitting = tokio::spawn(async move {
        loop {
            let Ok(client) = drv_thru::client::connect(
                &target,
                drv_thru::transport::endpoint::RelayChoice::Disabled,
                Some(&key),
            )
            .await
            else {
                return;
            };
            let mut request = tonic::Request::new(crate::common::session_request());
            // A dead builder is otherwise noticed only at the QUIC idle timeout.
            request.set_timeout(Duration::from_secs(5));
            let attempt = BuilderClient::new(client.channel.clone())
                .open_session(request)
                .await;
            client.close().await;
            if attempt.is_err() {
                return;
            }
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    // A few admissions first, however long a loaded machine takes for them.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acknowledged.load(Ordering::SeqCst) < 3 && !admitting.is_finished() {
        assert!(Instant::now() < deadline, "three admissions took over 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    builder.kill();
    admitting.await.unwrap();
    let acknowledged = acknowledged.load(Ordering::SeqCst);
    assert!(
        acknowledged > 0,
        "some sessions were admitted before the crash"
    );

    builder.start_again();
    let taken = uses_taken(&builder, &id);
    // Every acknowledged use is on disk; at most the one in flight when the
    // process died was recorded without its reply reaching the client.
    assert!(
        (acknowledged..=acknowledged + 1).contains(&taken),
        "acknowledged {acknowledged}, recorded {taken}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ticket_commands_manage_tickets() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let created: serde_json::Value = serde_json::from_str(&builder.cli_ok(&[
        "ticket",
        "create",
        "--json",
        "--name",
        "ci",
        "--expires",
        "3h",
        "--unlimited",
        "--max-build-time",
        "1h",
        "--max-upload-bytes",
        "1G",
    ]))
    .unwrap();
    assert_eq!(created["name"], "ci");
    assert_eq!(created["uses_granted"], serde_json::Value::Null);
    assert_eq!(created["max_build_time_secs"], 3600);
    assert_eq!(created["max_upload_bytes"], 1u64 << 30);
    let ticket_string = created["ticket"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();

    let listing = builder.cli_ok(&["ticket", "list"]);
    assert!(listing.contains(id) && listing.contains("ci"), "{listing}");
    assert!(
        !listing.contains(ticket_string),
        "list must not print secrets"
    );

    let inspected: serde_json::Value =
        serde_json::from_str(&builder.cli_ok(&["ticket", "inspect", ticket_string, "--json"]))
            .unwrap();
    assert_eq!(
        inspected["builder_endpoint_id"],
        builder.endpoint_id.to_string()
    );
    assert_eq!(inspected["state"]["state"], "active");

    builder.cli_ok(&["ticket", "revoke", id]);
    assert!(
        !builder.cli_ok(&["ticket", "list"]).contains(id),
        "revoked tickets leave the default list"
    );
    assert!(
        builder
            .cli_ok(&["ticket", "list", "--all"])
            .contains("revoked")
    );

    let unknown = builder.cli(&["ticket", "reveal", "0123456789abcdef"]);
    assert_eq!(unknown.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.starts_with("error: no ticket with id") && stderr.lines().count() == 1,
        "{stderr}"
    );

    let garbage = builder.cli(&["ticket", "inspect", "drvthruhello"]);
    assert_eq!(garbage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&garbage.stderr).contains("ticket"));
}

#[tokio::test(flavor = "multi_thread")]
async fn ticket_holders_cannot_manage_or_watch_the_builder() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let ticket = builder.ticket(&["--uses", "3"]);
    let client = connect(
        &Target::Ticket(Box::new(ticket)),
        &key_file(dir.path(), "c"),
    )
    .await;
    let status = BuilderClient::new(client.channel.clone())
        .status(drv_thru::proto::StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let create = TicketsClient::new(client.channel.clone())
        .create_ticket(drv_thru::proto::CreateTicketRequest::default())
        .await
        .unwrap_err();
    assert_eq!(create.code(), Code::PermissionDenied, "{create:?}");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_is_useless_on_another_connection_of_the_same_client() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let target = Target::Ticket(Box::new(builder.ticket(&["--uses", "2"])));
    let key = key_file(dir.path(), "a");
    let first = connect(&target, &key).await;
    let admitted = open_session(&first).await.unwrap();
    let second = connect(&target, &key).await;
    let elsewhere = BuilderClient::new(second.channel.clone())
        .build(drv_thru::proto::BuildRequest {
            session_id: admitted.session_id,
            rebuild: false,
        })
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code(), Code::NotFound, "{elsewhere:?}");
    assert!(
        elsewhere.message().contains("on this connection"),
        "{}",
        elsewhere.message()
    );
    first.close().await;
    second.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ticket_change_that_cannot_be_recorded_is_unavailable_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let state = builder.data_dir.join("tickets.json");
    // Renaming the new state over a directory fails, for root too.
    let _ = std::fs::remove_file(&state);
    std::fs::create_dir(&state).unwrap();
    let mut tickets = TicketsClient::new(drv_thru::client::admin(&builder.data_dir).await.unwrap());
    let refused = tickets
        .create_ticket(drv_thru::proto::CreateTicketRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(!builder.data_dir.join(".tickets.json.tmp").exists());
    let listed = tickets
        .list_tickets(drv_thru::proto::ListTicketsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.tickets.is_empty(), "{listed:?}");

    std::fs::remove_dir(&state).unwrap();
    tickets
        .create_ticket(drv_thru::proto::CreateTicketRequest::default())
        .await
        .unwrap();
}
