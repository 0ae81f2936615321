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

use tokio::time::Instant;

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
    config: Config,
}

impl<S> AttemptTimeout<S> {
    /// Wraps `inner` with a per-attempt timeout of `timeout`, propagated to gRPC upstreams.
    /// A zero `timeout` fails every attempt as soon as it waits;
    /// [`AttemptTimeoutLayer::builder`] rejects it instead.
    pub fn new(inner: S, timeout: Duration) -> Self {
        AttemptTimeout {
            inner,
            config: Config {
                timeout,
                propagate: true,
            },
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
            .field("timeout", &self.config.timeout)
            .field("propagate", &self.config.propagate)
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
        let shared = cover::deadline();
        let ext = RequestDeadline::of(&req);
        // A deadline the caller set, if it is the one that can end the attempt early.
        let from_caller =
            ext.is_some_and(|d| d.is_from_caller() && shared.is_none_or(|s| d.instant() <= s));
        match self.config.start(&mut req, grpc, (ext, shared), cover::now) {
            Timing::Spent => future::ResponseFuture::spent(),
            timing => future::ResponseFuture::new(self.inner.call(req), timing, from_caller),
        }
    }
}

/// An attempt timeout's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    pub(crate) timeout: Duration,
    /// Tell a gRPC upstream (`grpc-timeout`).
    pub(crate) propagate: bool,
}

/// When an attempt must end, as decided when it starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Timing {
    /// Never.
    Untimed,
    /// Its timeout after `start`, or after it first has to wait when `None` (the clock is
    /// read then), or at `deadline` if that comes first: worked out only if the attempt has
    /// to wait.
    Lazy {
        start: Option<Instant>,
        timeout: Duration,
        deadline: Option<Instant>,
    },
    /// At `at`: the request's deadline when `by_deadline`, else its own timeout.
    At { at: Instant, by_deadline: bool },
    /// The request's deadline passed before the attempt started.
    Spent,
}

impl Timing {
    /// Folds in a deadline at `at` that was not known when the attempt started (it is worked
    /// out at `now`, when the attempt first waits): the attempt ends by then at the latest.
    #[inline]
    pub(crate) fn fold_deadline(&mut self, now: Instant, at: Instant) {
        *self = match *self {
            Timing::Untimed => Timing::At {
                at,
                by_deadline: true,
            },
            Timing::Lazy {
                start,
                timeout,
                deadline,
            } => Timing::Lazy {
                start: Some(start.unwrap_or(now)),
                timeout,
                deadline: Some(deadline.map_or(at, |d| d.min(at))),
            },
            Timing::At {
                at: own,
                by_deadline,
            } if own <= at => Timing::At {
                at: own,
                by_deadline,
            },
            Timing::At { .. } => Timing::At {
                at,
                by_deadline: true,
            },
            Timing::Spent => Timing::Spent,
        };
    }

    /// When the attempt must end, and whether that is the deadline; `None` when never. A
    /// lazy timing reads the clock now and keeps the result.
    #[inline]
    pub(crate) fn resolve(&mut self) -> Option<(Instant, bool)> {
        match *self {
            Timing::Untimed | Timing::Spent => None,
            Timing::Lazy {
                start,
                timeout,
                deadline,
            } => {
                let own = saturating_add(start.unwrap_or_else(Instant::now), timeout);
                let (at, by_deadline) = match deadline {
                    Some(d) if d <= own => (d, true),
                    _ => (own, false),
                };
                *self = Timing::At { at, by_deadline };
                Some((at, by_deadline))
            }
            Timing::At { at, by_deadline } => Some((at, by_deadline)),
        }
    }
}

impl Config {
    /// Starts an attempt of `req`: when it must end, given the deadline shared by a layer
    /// above (`deadline`, folded with `ext`, the one in the request's extensions, which the
    /// caller looked up); tells a gRPC upstream how long it has. `grpc` is whether the
    /// request is gRPC, when the caller knows; `now` reads the clock (only when needed).
    #[inline]
    pub(crate) fn start<B>(
        &self,
        req: &mut Request<B>,
        grpc: Option<bool>,
        (ext, deadline): (Option<RequestDeadline>, Option<Instant>),
        now: impl FnOnce() -> Instant,
    ) -> Timing {
        let ext = ext.map(|d| d.instant());
        let deadline = match (ext, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let propagate = self.propagate && grpc.unwrap_or_else(|| grpc::is_grpc(req.headers()));
        if !propagate {
            let Some(d) = deadline else {
                // Nothing needs the clock yet: it is read if and when the attempt has to wait.
                return Timing::Lazy {
                    start: None,
                    timeout: self.timeout,
                    deadline: None,
                };
            };
            let now = now();
            if d <= now {
                return Timing::Spent;
            }
            return Timing::Lazy {
                start: Some(now),
                timeout: self.timeout,
                deadline,
            };
        }
        let now = now();
        let attempt_at = saturating_add(now, self.timeout);
        let (at, by_deadline) = match deadline {
            Some(d) if d <= now => return Timing::Spent,
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
        Timing::At { at, by_deadline }
    }
}
