//! Retries that are safe by default: an idempotency-aware policy, a retry budget, jittered
//! backoff, `Retry-After`, deadlines and request-body replay.
//!
//! [`Retry`] sends an `http::Request<B>` for any [`http_body::Body`] (no `Clone` needed) and
//! retries it when the [`Policy`] says the outcome is worth another attempt, the request
//! body can be replayed, the [`RetryBudget`] allows it, the upstream's `Retry-After` is not
//! too long, and the request's [`RequestDeadline`] leaves time for the backoff. Otherwise the
//! last attempt's outcome is returned as is.
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_upstream::retry::{Attempts, ReplayBody, RetryLayer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! // An upstream that answers 503 once, then 200.
//! let calls = Arc::new(AtomicU32::new(0));
//! let upstream = tower::service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
//!     let n = calls.fetch_add(1, Ordering::Relaxed);
//!     let status = if n == 0 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
//!     async move { Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap()) }
//! });
//!
//! let layer = RetryLayer::builder().max_attempts(3).build()?;
//! let mut svc = ServiceBuilder::new().layer(layer.clone()).service(upstream);
//!
//! let req = Request::get("http://upstream/items").body(Full::new(Bytes::new()))?;
//! let rsp = svc.ready().await?.call(req).await?;
//! assert_eq!(rsp.status(), StatusCode::OK);
//! assert_eq!(rsp.extensions().get::<Attempts>(), Some(&Attempts(2)));
//! assert_eq!(layer.budget().exhausted(), 0);
//! # Ok(())
//! # }
//! ```
//!
//! # What is retried
//!
//! The [`DefaultPolicy`] retries errors the classifier says were not sent (any method),
//! errors that may have been processed and upstream 502/503/504 answers for idempotent
//! requests (RFC 9110 §9.2.2 methods, an `Idempotency-Key` header, or the [`Idempotent`]
//! extension), and gRPC trailers-only `UNAVAILABLE` answers for calls marked idempotent.
//! Local rejections (`destination_unavailable` from an open circuit, `connection_limit_reached`)
//! are never retried and never draw on the budget, whatever the policy.
//!
//! # Errors
//!
//! Errors pass through as [`BoxError`], unchanged: when no retry is possible or allowed, the
//! caller gets the last attempt's own error (or response), so the mapper answers for what
//! really happened. In particular, when the [`RequestDeadline`] leaves no time for another
//! attempt, the last outcome (typically a `http_response_timeout`) is returned rather than
//! a `DeadlineExceeded`: it names the upstream's fault, and the status (504) is the same.
//!
//! # Request bodies
//!
//! The body is wrapped in [`ReplayBody`]. A request the policy can never retry
//! ([`Policy::may_retry`] says no, or `max_attempts` is 1) is passed through untouched: no
//! recording, no allocation. Otherwise the first attempt records the body's frames as they
//! are sent, up to [`body_limit`](RetryLayerBuilder::body_limit) (64 KiB by default). A body
//! over the limit, a body that failed, or a response that arrived before the body was fully
//! sent makes the request not retryable. An attempt that failed before sending its whole
//! body hands the rest back, so the next attempt sends the recorded frames, then the rest.
//!
//! # Request head
//!
//! Retries reuse a copy of the whole request head taken before the first attempt: method,
//! URI, version, headers and all extensions (http 1.x extensions are `Clone`), so the
//! [`RequestDeadline`] and [`Idempotent`] markers travel with every attempt. gRPC retries
//! add `grpc-previous-rpc-attempts`, and are told what the deadline leaves in `grpc-timeout`;
//! so is a deadline header a [`Deadline`](crate::Deadline) above propagates (see
//! [`DeadlineBuilder::header`](crate::deadline::DeadlineBuilder::header)).
//!
//! Most requests are never retried, so the copy is made cheap: the headers are packed into
//! one buffer (one allocation, none without headers; no reference counts touched) and a
//! header map is rebuilt from it only when a retry is sent or a [`Policy`] reads
//! [`RequestHead::headers`]. Every header comes back, in order, with its sensitive flag. A
//! value that `HeaderValue::from_bytes` refuses (one made with
//! `from_maybe_shared_unchecked` against its contract) cannot be rebuilt; such a request is
//! not retried rather than sent again without it.
//!
//! # Visibility
//!
//! Each retry emits a `DEBUG` tracing event with the attempt number, the fault name (or
//! status) and the delay; giving up for the budget, the deadline, an over-long
//! `Retry-After` or an unreplayable body emits one too. A final response that took more
//! than one attempt carries an [`Attempts`] extension ([`Attempts::of`] reads it).
//!
//! # Ordering
//!
//! Inside the deadline layer (so backoffs never outlive the deadline) and outside the
//! circuit breaker and the attempt timeout (so each attempt is one breaker sample and has its
//! own timeout). See the crate's design notes.
//!
//! [`RequestDeadline`]: crate::deadline::RequestDeadline

pub(crate) mod backoff;
mod budget;
pub mod future;
mod layer;
mod policy;
mod replay;

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use tower::BoxError;
use tower_service::Service;

pub use self::backoff::Backoff;
pub use self::budget::{RetryBudget, RetryBudgetBuilder};
pub use self::layer::{RetryLayer, RetryLayerBuilder};
pub use self::policy::{DefaultPolicy, Idempotent, Outcome, Policy, RequestHead};
pub use self::replay::ReplayBody;

pub(crate) use self::budget::{stripe_index, STRIPES};
pub(crate) use self::future::{mark, Tries};
use self::future::{Ctx, ResponseFuture};
use crate::deadline::cover;
use crate::fault::Classifier;
use crate::stripe::{Handle, Striped};

/// How many attempts a request took, in the final response's extensions when it took more
/// than one (inserting an extension allocates, so the first-attempt happy path does not);
/// [`Attempts::of`] reads it, absent meaning one.
///
/// ```
/// use tower_upstream::retry::Attempts;
///
/// let mut rsp = http::Response::new(());
/// assert_eq!(Attempts::of(&rsp), 1);
/// rsp.extensions_mut().insert(Attempts(3));
/// assert_eq!(Attempts::of(&rsp), 3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attempts(pub u32);

impl Attempts {
    /// Attempts a response took: its `Attempts` extension, or 1 if it has none.
    pub fn of<B>(response: &Response<B>) -> u32 {
        response.extensions().get::<Attempts>().map_or(1, |a| a.0)
    }
}

pub(crate) struct Config<P> {
    pub(crate) policy: P,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) budget: RetryBudget,
    pub(crate) pushback_cap: Duration,
    pub(crate) body_limit: usize,
    pub(crate) classifier: Classifier,
}

impl<P: fmt::Debug> fmt::Debug for Config<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("policy", &self.policy)
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("budget", &self.budget)
            .field("pushback_cap", &self.pushback_cap)
            .field("body_limit", &self.body_limit)
            .field("classifier", &self.classifier)
            .finish()
    }
}

/// The configuration of a layer, referenced per request through the thread's budget
/// stripe (see [`Striped`]).
pub(crate) type Shared<P> = Striped<Config<P>>;

/// The service a layer wrapped, kept for the later attempts of the requests that come to
/// one: cloned then, not for every request (most are never retried, and a clone of a hyper
/// client or a tonic channel writes reference counts that every core shares). Behind a lock
/// taken only then, so that a service that is `Send` but not `Sync` (`BoxCloneService`) will
/// do.
pub(crate) struct Prototype<S>(Mutex<S>);

impl<S> Prototype<S> {
    pub(crate) fn new(service: S) -> Self {
        Prototype(Mutex::new(service))
    }

    /// A clone of the service, for a request's later attempts.
    pub(crate) fn get(&self) -> S
    where
        S: Clone,
    {
        // A clone that panicked left nothing half-done in the service it cloned.
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// What one service made by a [`RetryLayer`] (and its clones) shares, reached through the
/// calling thread's stripe: the layer's configuration, and the service as the layer wrapped
/// it.
pub(crate) struct Share<S, P> {
    layer: Arc<Shared<P>>,
    pub(crate) service: Prototype<S>,
}

impl<S, P> Deref for Share<S, P> {
    type Target = Config<P>;

    #[inline]
    fn deref(&self) -> &Config<P> {
        self.layer.get()
    }
}

/// Retries upstream requests; see the [module docs](self).
///
/// A request's later attempts go to a clone of the service as the layer wrapped it, made
/// when the request comes to its second attempt (a change made through
/// [`get_mut`](Self::get_mut) reaches first attempts only).
pub struct Retry<S, P = DefaultPolicy> {
    inner: S,
    shared: Handle<Share<S, P>>,
}

impl<S: Clone> Retry<S> {
    /// Wraps `inner` with the defaults of [`RetryLayer::new`] (and a budget of its own).
    pub fn new(inner: S) -> Self {
        RetryLayer::new().layer_service(inner)
    }
}

impl<S, P> Retry<S, P> {
    pub(crate) fn from_shared(inner: S, shared: &Arc<Shared<P>>) -> Self
    where
        S: Clone,
    {
        let share = Arc::new(Striped::new(Share {
            layer: shared.clone(),
            service: Prototype::new(inner.clone()),
        }));
        Retry {
            inner,
            shared: share.handle(),
        }
    }

    /// The budget this service draws on (shared with its clones and its layer).
    pub fn budget(&self) -> &RetryBudget {
        &self.shared.get().budget
    }

    inner_accessors!("service", S);
}

impl RetryLayer {
    fn layer_service<S: Clone>(&self, inner: S) -> Retry<S> {
        tower_layer::Layer::layer(self, inner)
    }
}

impl<S: Clone, P> Clone for Retry<S, P> {
    fn clone(&self) -> Self {
        Retry {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, P: fmt::Debug> fmt::Debug for Retry<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("config", &**self.shared.get())
            .finish()
    }
}

impl<S, P, B, ResB> Service<Request<B>> for Retry<S, P>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    P: Policy,
    B: Body,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, P, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        // When the budget needs the time, a `Deadline` calling us synchronously shares its
        // clock reading (no second read), and maybe its deadline.
        let (req, tries) = Tries::begin(self.shared.get(), req, cover::now);
        let deadline = cover::due();
        // Call the service that was polled ready; later attempts clone the layer's (see
        // `Prototype`), and poll it ready before each of them.
        let fut = self.inner.call(req);
        match tries {
            None => ResponseFuture::once(fut),
            Some((stripe, tries)) => ResponseFuture::retrying(
                fut,
                Ctx {
                    config: self.shared.stripe(stripe),
                    service: None,
                    tries,
                    deadline,
                },
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + 'static>() {}
    fn assert_send<T: Send + 'static>() {}

    #[test]
    fn send_sync() {
        type Inner = tower::util::BoxCloneSyncService<
            Request<ReplayBody<http_body_util::Full<bytes::Bytes>>>,
            Response<()>,
            BoxError,
        >;
        assert_send_sync::<Retry<Inner>>();
        assert_send_sync::<RetryLayer>();
        assert_send_sync::<RetryBudget>();
        assert_send_sync::<ReplayBody<http_body_util::Full<bytes::Bytes>>>();
        assert_send::<ResponseFuture<Inner, DefaultPolicy, http_body_util::Full<bytes::Bytes>>>();
    }
}
