//! Ticket holders: peers the builder admitted, misusing what a ticket lets
//! them call.

use crate::{
    arena::Arena,
    attacks,
    faults::{FaultTable, ONE_AT_A_TIME},
    two_stores::available,
};

#[tokio::test(flavor = "multi_thread")]
async fn ticket_holders_cannot_hurt_a_build() {
    if !available() {
        return;
    }
    let _alone = ONE_AT_A_TIME.lock().await;
    let arena = Arena::start("holders");
    let mut table = FaultTable::new("ticket holders");
    let a = &arena;
    table
        .run(
            a,
            "request over 4 MiB",
            "OutOfRange",
            attacks::oversized_authenticated_message(a),
        )
        .await;
    table
        .run(
            a,
            "unannounced upload",
            "InvalidArgument",
            attacks::unannounced_upload(a),
        )
        .await;
    table
        .run(
            a,
            "mismatching upload",
            "InvalidArgument",
            attacks::mismatching_upload(a),
        )
        .await;
    table
        .run(
            a,
            "NAR entry named ..",
            "InvalidArgument",
            attacks::nar_with_dot_dot(a),
        )
        .await;
    table
        .run(
            a,
            "NAR with an absolute symlink",
            "Ok",
            attacks::nar_with_absolute_symlink(a),
        )
        .await;
    table
        .run(
            a,
            "reading another session's cache",
            "NotFound",
            attacks::read_another_sessions_cache(a),
        )
        .await;
    table
        .run(
            a,
            "ticket revoked mid-upload",
            "Cancelled",
            attacks::ticket_revoked_mid_upload(a),
        )
        .await;
    table
        .run(
            a,
            "#6 20 OpenSession, one key",
            "8 admitted",
            attacks::open_session_race(a, 1, 20),
        )
        .await;
    table
        .run(
            a,
            "#6 60 OpenSession, 6 keys",
            "8 admitted",
            attacks::open_session_race(a, 6, 60),
        )
        .await;
    table
        .run(
            a,
            "#12 sizes near 2^63",
            "ResourceExhausted/upload-too-large",
            attacks::sizes_near_2_pow_63(a),
        )
        .await;
    table
        .run(
            a,
            "#12 offset near 2^64",
            "InvalidArgument",
            attacks::offset_near_2_pow_64(a),
        )
        .await;
    table
        .run(
            a,
            "#13 OpenSession cancelled half-way",
            "no ghost sessions",
            attacks::open_session_cancelled_half_way(a),
        )
        .await;
    table
        .run(
            a,
            "#5 100 GetNarInfo at once",
            "bounded",
            attacks::repeated_get_nar_info(a, 100),
        )
        .await;
    table.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zstd_bomb_inflates_no_further_than_the_message_limit() {
    if !available() {
        return;
    }
    let _alone = ONE_AT_A_TIME.lock().await;
    let arena = Arena::start("zstd-bomb");
    let mut table = FaultTable::new("compressed messages");
    let a = &arena;
    table
        .run(
            a,
            "zstd bomb in an upload part",
            "ResourceExhausted, 0 bytes staged",
            attacks::zstd_bomb_in_an_upload_part(a),
        )
        .await;
    table.finish();
}
