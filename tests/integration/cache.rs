//! The Cache service reads only within the caller's own session, and only
//! what that session's build produced.

use drv_thru::{
    client::{Connection, Target},
    proto::{
        GetNarInfoRequest, GetNarRequest, GetNarsRequest, ListNarInfosRequest,
        cache_client::CacheClient,
    },
};
use tonic::Code;

use crate::common::{Builder, connect, key_file, open_session};

const UNNAMED_NAR: &str = "nar/1hb09lmdvs22v5ianga0vgpi9k446q3kw0000000000000000.nar";

/// `GetNars` of `urls` in `session`, refused with this code.
async fn get_nars_refusal(connection: &Connection, session: &str, urls: Vec<String>) -> Code {
    CacheClient::new(connection.channel.clone())
        .get_nars(GetNarsRequest {
            session_id: session.to_owned(),
            urls,
        })
        .await
        .expect_err("nars were refused")
        .code()
}

/// Every read of `session` that `connection` can attempt, and how each was
/// refused.
async fn refusals(connection: &Connection, session: &str) -> Vec<(&'static str, Code)> {
    let cache = || CacheClient::new(connection.channel.clone());
    let list = cache()
        .list_nar_infos(ListNarInfosRequest {
            session_id: session.to_owned(),
        })
        .await;
    let narinfo = cache()
        .get_nar_info(GetNarInfoRequest {
            session_id: session.to_owned(),
            store_path_hash: "hb09lmdvs22v5ianga0vgpi9k446q3kw".to_owned(),
        })
        .await;
    let nar = cache()
        .get_nar(GetNarRequest {
            session_id: session.to_owned(),
            url: UNNAMED_NAR.to_owned(),
            offset: 0,
            length: 0,
        })
        .await;
    vec![
        (
            "ListNarInfos",
            list.expect_err("listing was refused").code(),
        ),
        (
            "GetNarInfo",
            narinfo.expect_err("narinfo was refused").code(),
        ),
        ("GetNar", nar.expect_err("nar was refused").code()),
        (
            "GetNars",
            get_nars_refusal(connection, session, vec![UNNAMED_NAR.to_owned()]).await,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_reads_stay_within_the_callers_built_session() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::start(dir.path(), &[]);
    let owner = connect(
        &Target::Ticket(Box::new(builder.ticket(&[]))),
        &key_file(dir.path(), "owner"),
    )
    .await;
    let other = connect(
        &Target::Ticket(Box::new(builder.ticket(&[]))),
        &key_file(dir.path(), "other"),
    )
    .await;
    let session = open_session(&owner).await.unwrap().session_id;
    open_session(&other).await.unwrap();

    // Before its build the owner has nothing to read.
    assert_eq!(
        refusals(&owner, &session).await,
        [
            ("ListNarInfos", Code::FailedPrecondition),
            ("GetNarInfo", Code::NotFound),
            ("GetNar", Code::NotFound),
            ("GetNars", Code::NotFound),
        ]
    );
    assert_eq!(
        get_nars_refusal(&owner, &session, vec![UNNAMED_NAR.to_owned(); 1025]).await,
        Code::InvalidArgument
    );
    // Another client, admitted with its own ticket, cannot use the session.
    assert_eq!(
        refusals(&other, &session).await,
        [
            ("ListNarInfos", Code::NotFound),
            ("GetNarInfo", Code::NotFound),
            ("GetNar", Code::NotFound),
            ("GetNars", Code::NotFound),
        ]
    );
    owner.close().await;
    other.close().await;
}
