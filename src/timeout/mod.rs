//! Per-attempt timeouts.
//!
//! [`AttemptTimeoutLayer`] limits each attempt (each call of the inner service, usually the
//! HTTP client) to `min(per-attempt timeout, time left before the request's deadline)`, reading
//! the deadline from the request's [`RequestDeadline`] extension. An attempt that gets no
//! response head in time fails with [`error::Elapsed`], which the fault classifier names
//! `http_response_timeout` (504); when the request's deadline is what ran out, it fails with
//! [`DeadlineExceeded`] instead (also 504), so a retry can tell that no time is left.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_upstream::fault::{classify, Fault};
//! use tower_upstream::timeout::{error::Elapsed, AttemptTimeoutLayer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(AttemptTimeoutLayer::new(Duration::from_millis(250)))
//!     .service(service_fn(|_req: http::Request<()>| async {
//!         tokio::time::sleep(Duration::from_secs(10)).await; // a hanging upstream
//!         Ok::<_, tower::BoxError>(http::Response::new(()))
//!     }));
//!
//! let start = tokio::time::Instant::now();
//! let err = svc.oneshot(http::Request::new(())).await.unwrap_err();
//! assert!(err.is::<Elapsed>());
//! assert_eq!(classify(&*err).fault(), Fault::HttpResponseTimeout); // 504
//! assert_eq!(start.elapsed(), Duration::from_millis(250));
//! # }
//! ```
//!
//! # Errors
//!
//! - [`error::Elapsed`]: the per-attempt timeout passed before a response head.
//! - [`DeadlineExceeded::in_flight()`]: the request's deadline passed first.
//! - [`DeadlineExceeded::before_start()`]: the deadline was already spent when the attempt
//!   was to start; the inner service is not called (nothing was sent).
//! - The inner service's own errors, unchanged (boxed as [`tower::BoxError`]): a connect
//!   timeout reported by hyper-util's connector stays `connection_timeout`.
//!
//! # When the clock starts
//!
//! For a request with a deadline, or a gRPC request (whose `grpc-timeout` needs it), the
//! attempt's clock starts at `call`; called synchronously from a
//! [`Deadline`](crate::deadline::Deadline)'s `call`, it reuses the clock reading the deadline
//! just made. Otherwise nothing needs the clock yet, and it is read when the inner future
//! first returns `Pending`: for clients that do their work in the future (hyper-util's,
//! tonic's `Channel`) that is the same moment, and an attempt that answers at once reads no
//! clock and arms no timer.
//!
//! # Propagation
//!
//! A gRPC request ([`grpc::is_grpc`]) leaves with a `grpc-timeout` of
//! this attempt's limit, so the upstream gives up when the gateway does; each retry's attempt
//! gets a fresh, smaller value. A tighter `grpc-timeout` already on the request is kept.
//!
//! # Response bodies
//!
//! The attempt timeout ends at the response head. [`ResponseBodyTimeoutLayer`] limits the
//! time a response body may wait for each frame; on expiry the body fails (so the server
//! aborts the stream) rather than ending early.
//!
//! [`RequestDeadline`]: crate::deadline::RequestDeadline
//! [`DeadlineExceeded`]: crate::deadline::DeadlineExceeded
//! [`DeadlineExceeded::in_flight()`]: crate::deadline::DeadlineExceeded::in_flight
//! [`DeadlineExceeded::before_start()`]: crate::deadline::DeadlineExceeded::before_start

pub mod body;
pub mod error;
pub mod future;
mod layer;

use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use tower_service::Service;

use crate::deadline::{cover, saturating_add, RequestDeadline};
use crate::grpc;
use crate::BoxError;

pub use self::body::{ResponseBodyTimeout, ResponseBodyTimeoutLayer};
pub use self::layer::{AttemptTimeoutBuilder, AttemptTimeoutLayer};

/// Limits each attempt to `min(per-attempt, remaining deadline)`. See the
/// [module docs](self).
#[derive(Clone)]
pub struct AttemptTimeout<S> {
    inner: S,
    /// `None`: a pass-through (inside `Upstream` without an attempt timeout), so that the
    /// stack's type and its futures' layout do not depend on the configuration.
    timeout: Option<Duration>,
    propagate: bool,
}

impl<S> AttemptTimeout<S> {
    /// Wraps `inner` with a per-attempt timeout of `timeout`, propagated to gRPC upstreams.
    /// A zero `timeout` fails every attempt as soon as it waits;
    /// [`AttemptTimeoutLayer::builder`] rejects it instead.
    pub fn new(inner: S, timeout: Duration) -> Self {
        AttemptTimeout {
            inner,
            timeout: Some(timeout),
            propagate: true,
        }
    }

    /// A pass-through: calls `inner` as is, its errors boxed.
    pub(crate) fn off(inner: S) -> Self {
        AttemptTimeout {
            inner,
            timeout: None,
            propagate: false,
        }
    }

    /// A layer that wraps services in an `AttemptTimeout` of `timeout`.
    pub fn layer(timeout: Duration) -> AttemptTimeoutLayer {
        AttemptTimeoutLayer::new(timeout)
    }

    inner_accessors!("service", S);
}

impl<S: fmt::Debug> fmt::Debug for AttemptTimeout<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttemptTimeout")
            .field("inner", &self.inner)
            .field("timeout", &self.timeout)
            .field("propagate", &self.propagate)
            .finish()
    }
}

impl<S, B> Service<Request<B>> for AttemptTimeout<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = future::ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // Taken even when not needed: it is about this request only, not about one that the
        // service below might make.
        let grpc = cover::take_grpc();
        let Some(timeout) = self.timeout else {
            return future::ResponseFuture::untimed(self.inner.call(req));
        };
        let deadline = request_deadline(&req);
        let propagate = self.propagate && grpc.unwrap_or_else(|| grpc::is_grpc(req.headers()));
        if deadline.is_none() && !propagate {
            // Nothing needs the clock yet: it is read if and when the attempt has to wait.
            return future::ResponseFuture::lazy(self.inner.call(req), timeout);
        }
        let now = cover::now();
        let attempt_at = saturating_add(now, timeout);
        let (at, by_deadline) = match deadline {
            Some(d) if d <= now => return future::ResponseFuture::spent(),
            Some(d) if d <= attempt_at => (d, true),
            _ => (attempt_at, false),
        };
        if propagate {
            // Never loosen a caller's tighter `grpc-timeout` (no deadline layer above read it).
            let limit = at - now;
            if grpc::timeout_of(req.headers()).is_none_or(|t| t > limit) {
                req.headers_mut()
                    .insert(grpc::GRPC_TIMEOUT, grpc::encode_timeout(limit));
            }
        }
        future::ResponseFuture::new(self.inner.call(req), at, by_deadline)
    }
}

/// The request's deadline: its extension's, or the one a `Deadline` inside `Upstream` shares
/// while calling (see [`cover`]), the earlier of the two.
#[inline]
fn request_deadline<B>(req: &Request<B>) -> Option<tokio::time::Instant> {
    let ext = RequestDeadline::of(req).map(|d| d.instant());
    match (ext, cover::deadline()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
