//! Authorization as a tower layer, shared by every service we serve: a
//! policy looks at each request (its path, metadata and the transport's
//! peer identity) before any handler runs, refuses it with a gRPC status or
//! admits it, optionally attaching what it learned as a request extension.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::{Status, body::Body};
use tower::{Layer, Service};

/// Decides whether a request may reach its handler.
pub trait Policy: Send + Sync + 'static {
    /// What an admitted request carries to its handler as an extension.
    type Grant: Clone + Send + Sync + 'static;

    /// Admits `request` (with a grant to attach, if any) or refuses it.
    fn authorize(&self, request: &http::Request<Body>) -> Result<Option<Self::Grant>, Status>;
}

/// The layer that puts [`Authorized`] in front of a router.
#[derive(Debug)]
pub struct AuthorizeLayer<P> {
    policy: Arc<P>,
}

impl<P> AuthorizeLayer<P> {
    /// A layer enforcing `policy`.
    pub fn new(policy: Arc<P>) -> Self {
        Self { policy }
    }
}

impl<P> Clone for AuthorizeLayer<P> {
    fn clone(&self) -> Self {
        Self {
            policy: self.policy.clone(),
        }
    }
}

impl<S, P> Layer<S> for AuthorizeLayer<P> {
    type Service = Authorized<S, P>;

    fn layer(&self, inner: S) -> Authorized<S, P> {
        Authorized {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// Runs the policy on each request; refused requests never reach `inner`.
#[derive(Debug)]
pub struct Authorized<S, P> {
    inner: S,
    policy: Arc<P>,
}

impl<S: Clone, P> Clone for Authorized<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
        }
    }
}

impl<S, P> Service<http::Request<Body>> for Authorized<S, P>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    P: Policy,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        match self.policy.authorize(&request) {
            Ok(grant) => {
                if let Some(grant) = grant {
                    request.extensions_mut().insert(grant);
                }
                // The clone is ready-polled by the caller's next poll_ready;
                // the ready instance serves this request.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(request))
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}
