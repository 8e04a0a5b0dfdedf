//! Who may call the helper, decided in one place for every request: root,
//! the helper's own user, and members of its group, by the credentials the
//! kernel reports for the socket's caller. Every request is logged with
//! those credentials.

use tonic::{Status, body::Body};
use tracing::{info, warn};

use super::HelperError;
use crate::transport::{
    UnixPeer,
    authorize::{AuthorizeLayer, Policy},
};

/// Which callers the helper serves.
#[derive(Debug, Clone)]
pub struct CallerPolicy {
    /// The helper's own uid.
    pub helper_uid: u32,
    /// Members of this group may call.
    pub gid: u32,
    /// The group's name, for messages (when known).
    pub group_name: Option<String>,
}

impl CallerPolicy {
    fn allows(&self, peer: &UnixPeer) -> bool {
        peer.uid == 0 || peer.uid == self.helper_uid || peer.is_member_of(self.gid)
    }

    fn check(&self, request: &http::Request<Body>) -> Result<(), Status> {
        let method = request.uri().path();
        let Some(peer) = request.extensions().get::<UnixPeer>() else {
            warn!(method, "request without peer credentials");
            return Err(Status::internal("request arrived without peer credentials"));
        };
        info!(
            uid = peer.uid,
            gid = peer.gid,
            pid = ?peer.pid,
            method,
            "import helper request"
        );
        if self.allows(peer) {
            return Ok(());
        }
        warn!(
            uid = peer.uid,
            gid = peer.gid,
            pid = ?peer.pid,
            group = self.gid,
            "refused a caller outside the helper's group"
        );
        Err(HelperError::CallerNotAllowed {
            uid: peer.uid,
            group: match &self.group_name {
                Some(name) => format!(" {name:?}"),
                None => format!(" (gid {})", self.gid),
            },
        }
        .to_status())
    }
}

impl Policy for CallerPolicy {
    /// Callers carry nothing further: the check is all.
    type Grant = ();

    fn authorize(&self, request: &http::Request<Body>) -> Result<Option<()>, Status> {
        self.check(request).map(|()| None)
    }
}

/// The layer that checks every caller of the helper's router.
pub type CallerLayer = AuthorizeLayer<CallerPolicy>;

#[cfg(test)]
mod tests {
    use super::*;

    fn request(peer: Option<UnixPeer>) -> http::Request<Body> {
        let mut request = http::Request::builder()
            .uri("/drvthru.v1.ImportHelper/CheckKey")
            .body(Body::empty())
            .unwrap();
        if let Some(peer) = peer {
            request.extensions_mut().insert(peer);
        }
        request
    }

    #[test]
    fn allows_root_itself_and_the_group_only() {
        let policy = CallerPolicy {
            helper_uid: 500,
            gid: 42,
            group_name: Some("drv-thru".into()),
        };
        let peer = |uid, gid| {
            Some(UnixPeer {
                uid,
                gid,
                pid: None,
                groups: vec![7],
            })
        };
        assert!(policy.check(&request(peer(0, 0))).is_ok());
        assert!(policy.check(&request(peer(500, 500))).is_ok());
        assert!(policy.check(&request(peer(1000, 42))).is_ok());
        let refused = policy.check(&request(peer(1000, 100))).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.message().contains("\"drv-thru\""), "{refused:?}");
        assert_eq!(
            policy.check(&request(None)).unwrap_err().code(),
            tonic::Code::Internal
        );
    }
}
