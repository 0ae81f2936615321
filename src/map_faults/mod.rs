//! Turns every upstream fault into the right answer: 502, 503 or 504 with `Proxy-Status`
//! (or, for gRPC calls, a trailers-only answer with the right `grpc-status`).
//!
//! [`MapFaults`] wraps any `Service<http::Request<B>, Response = http::Response<R>>` whose
//! error converts into [`BoxError`], and has `Error = Infallible`: it drops into
//! `axum::Router::layer` with no `HandleErrorLayer`. It is the outermost layer of a stack
//! and the only one that turns errors into responses.
//!
//! # Example
//!
//! ```
//! use std::io;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Empty;
//! use bytes::Bytes;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_upstream::map_faults::MapFaultsLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // An "upstream client" whose upstream refuses connections.
//! let client = service_fn(|_req: Request<Empty<Bytes>>| async {
//!     Err::<Response<Empty<Bytes>>, _>(io::Error::from(io::ErrorKind::ConnectionRefused))
//! });
//! let gateway = ServiceBuilder::new()
//!     .layer(MapFaultsLayer::builder().gateway_name("edge").build().unwrap())
//!     .service(client);
//!
//! let res = gateway.oneshot(Request::new(Empty::new())).await.unwrap(); // Infallible
//! assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
//! assert_eq!(res.headers()["proxy-status"], "edge; error=connection_refused");
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//! assert_eq!(
//!     res.extensions().get::<tower_upstream::Fault>(),
//!     Some(&tower_upstream::Fault::ConnectionRefused)
//! );
//! # }
//! ```
//!
//! With axum, the layer goes straight on a router:
//!
//! ```
//! use axum::{routing::get, Router};
//! use tower_upstream::map_faults::MapFaultsLayer;
//!
//! # async fn proxy() -> &'static str { "ok" }
//! let app: Router = Router::new()
//!     .route("/api/{*rest}", get(proxy))
//!     .layer(MapFaultsLayer::new());
//! # let _ = app;
//! ```
//!
//! # What it answers
//!
//! Per the crate's status table (see the [crate docs](crate#status-mapping)):
//!
//! - HTTP: the fault's status, `Proxy-Status: <gateway>; error=<fault>`, `Retry-After` on a
//!   503 when the time is known (an open circuit's next probe, rounded up to whole
//!   seconds), and an `application/problem+json` body (RFC 9457) with `type`, `title`,
//!   `status`, `detail` and `fault`; plain text or your own body on request.
//! - gRPC (request `content-type: application/grpc…`): HTTP 200, `content-type:
//!   application/grpc`, `grpc-status`, `grpc-message`, empty body; plus
//!   `grpc-retry-pushback-ms` when a circuit is open.
//! - Nothing of the error's text, hence no upstream host name or address, reaches the
//!   client unless [`expose_details`](MapFaultsLayerBuilder::expose_details) is on; the full
//!   cause goes to a `tracing` event (WARN for upstream faults, DEBUG for local rejections).
//! - Upstream answers of any status pass through untouched, unless
//!   [`rewrite_upstream_5xx`](MapFaultsLayerBuilder::rewrite_upstream_5xx) is on.
//! - A body that fails after the head was sent ends with an error (see [`FaultBody`]).
//! - Every answer the mapper makes for a fault carries that [`Fault`](crate::Fault) in its
//!   extensions, so code calling an outbound client through the stack tells the stack's
//!   answer from the upstream's own: `res.extensions().get::<Fault>()` is `None` for an
//!   upstream's answer.
//!
//! # Errors
//!
//! None: `MapFaults` is infallible. An error from the inner service's `poll_ready` is
//! answered like an error from its `call`, on the next request.

mod body;
mod future;
mod layer;
mod response;

use std::convert::Infallible;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::BoxError;
use tower_service::Service;

pub use self::body::FaultBody;
pub(crate) use self::future::answer;
pub use self::future::ResponseFuture;
pub use self::layer::{MapFaultsLayer, MapFaultsLayerBuilder};
pub(crate) use self::response::Config;
pub use self::response::Problem;
use crate::grpc;

/// Middleware that answers every error of the inner service with the right 502/503/504 (or
/// gRPC status). See the [module docs](self).
#[derive(Clone, Debug)]
pub struct MapFaults<S> {
    inner: S,
    config: Config,
    // An error from the inner service's poll_ready, answered on the next call.
    ready_error: ReadyError,
}

/// A `poll_ready` error kept for the next call; `Clone` so the service stays `Clone`
/// (a clone does not inherit it).
#[derive(Debug, Default)]
pub(crate) struct ReadyError(Option<BoxError>);

impl Clone for ReadyError {
    fn clone(&self) -> Self {
        ReadyError(None)
    }
}

impl ReadyError {
    /// Polls an inner service ready unless an error is already kept; keeps the error it
    /// returns. Ready (with nothing to report) once the next call has something to answer.
    #[inline]
    pub(crate) fn poll_ready<E: Into<BoxError>>(
        &mut self,
        poll: impl FnOnce() -> Poll<Result<(), E>>,
    ) -> Poll<Result<(), Infallible>> {
        if self.0.is_some() {
            return Poll::Ready(Ok(()));
        }
        match poll() {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(err)) => {
                self.0 = Some(err.into());
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// The kept error, for the call that answers it.
    #[inline]
    pub(crate) fn take(&mut self) -> Option<BoxError> {
        self.0.take()
    }
}

impl<S> MapFaults<S> {
    /// Wraps `inner` with the default settings (see [`MapFaultsLayer::new`]).
    pub fn new(inner: S) -> Self {
        MapFaults::from_config(inner, Config::default())
    }

    pub(crate) fn from_config(inner: S, config: Config) -> Self {
        MapFaults {
            inner,
            config,
            ready_error: ReadyError(None),
        }
    }

    inner_accessors!("service", S);
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for MapFaults<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<FaultBody<ResB>>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        let inner = &mut self.inner;
        self.ready_error.poll_ready(|| inner.poll_ready(cx))
    }

    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let grpc = grpc::is_grpc(req.headers());
        if let Some(err) = self.ready_error.take() {
            return ResponseFuture::failed(err, self.config.for_request(grpc));
        }
        ResponseFuture::called(self.inner.call(req), self.config.for_request(grpc))
    }
}
