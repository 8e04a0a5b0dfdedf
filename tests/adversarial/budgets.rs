//! A ticket holder against the per-session budgets (findings 3, 4, 8 and
//! 9): each attack is refused with its `drvthru-refusal` reason, or costs
//! the builder nothing it keeps.

use crate::{
    arena::Arena,
    attacks,
    faults::{FaultTable, ONE_AT_A_TIME},
    two_stores::available,
};

#[tokio::test(flavor = "multi_thread")]
async fn per_session_budgets_hold() {
    if !available() {
        return;
    }
    let _alone = ONE_AT_A_TIME.lock().await;
    let arena = Arena::start("budgets");
    let mut table = FaultTable::new("per-session budgets");
    let a = &arena;
    // Text inputs under their byte budget are admitted, and never held.
    table
        .run(
            a,
            "#3 100 unfinished text inputs",
            "",
            attacks::unfinished_text_inputs(a, 100, 1 << 20),
        )
        .await;
    table
        .run(
            a,
            "#4 256 unread GetNar streams",
            "ResourceExhausted/too-many-cache-streams",
            attacks::unread_get_nar_streams(a, 256),
        )
        .await;
    table
        .run(
            a,
            "#9 8-byte pieces out of order, with gaps",
            "ResourceExhausted/too-many-parts-ahead",
            attacks::tiny_out_of_order_pieces(a, 1 << 20),
        )
        .await;
    table
        .run(
            a,
            "#8 15000 declared inputs, none uploaded",
            "Ok",
            attacks::many_declared_inputs(a, 15000),
        )
        .await;
    table.finish();
}
