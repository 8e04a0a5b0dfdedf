//! Strangers: no ticket, no trusted key, only what anyone who knows the
//! builder's endpoint id can send.

use crate::{
    arena::Arena,
    attacks,
    faults::{FaultTable, ONE_AT_A_TIME},
    two_stores::available,
};

#[tokio::test(flavor = "multi_thread")]
async fn strangers_cannot_hurt_a_build() {
    if !available() {
        return;
    }
    let _alone = ONE_AT_A_TIME.lock().await;
    let arena = Arena::start("strangers");
    let mut table = FaultTable::new("strangers");
    let a = &arena;
    table
        .run(a, "wrong ALPN", "handshake refused", attacks::wrong_alpn(a))
        .await;
    table
        .run(
            a,
            "garbage instead of HTTP/2",
            "stream closed",
            attacks::garbage_instead_of_http2(a),
        )
        .await;
    table
        .run(
            a,
            "garbage gRPC message",
            "Internal",
            attacks::garbage_grpc_message(a),
        )
        .await;
    table
        .run(
            a,
            "health request over 16 KiB",
            "OutOfRange",
            attacks::oversized_health_request(a),
        )
        .await;
    table
        .run(
            a,
            "#19 long unknown service name",
            "NotFound",
            attacks::huge_unknown_service_name(a),
        )
        .await;
    table
        .run(
            a,
            "#2 reflection over Iroh",
            "Unimplemented",
            attacks::reflection_over_iroh(a),
        )
        .await;
    table
        .run(
            a,
            "#2 unread health requests",
            "held",
            attacks::unread_requests_from_strangers(a, 16),
        )
        .await;
    table
        .run(
            a,
            "#1 1000 idle connections, 250 keys",
            "held",
            attacks::idle_connections_from_many_keys(a, 250, 4),
        )
        .await;
    table.finish();
}
