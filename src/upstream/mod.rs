//! The whole stack in one layer: [`Upstream::builder()`] composes [`MapFaults`],
//! [`Deadline`], an optional concurrency limit with load shedding, [`Retry`] (with its
//! budget), [`CircuitBreaker`] and [`AttemptTimeout`], in that order, with defaults a
//! production gateway can start from.
//!
//! ```
//! use std::time::Duration;
//! use axum::{body::Body, Router};
//! use http::{Request, StatusCode};
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::{service_fn, BoxError, Layer, ServiceExt};
//! use tower_upstream::retry::ReplayBody;
//! use tower_upstream::Upstream;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! # // Bound, never listening: connections are refused, and no other test gets the port.
//! # let dead = tokio::net::TcpSocket::new_v4()?;
//! # dead.bind("127.0.0.1:0".parse()?)?;
//! # let upstream = dead.local_addr()?;
//! let client = Client::builder(TokioExecutor::new()).build_http();
//!
//! // Forward every request to the upstream, path and query kept. The retry layer hands
//! // the request body over as a `ReplayBody`, so that it can be sent again.
//! let proxy = service_fn(move |mut req: Request<ReplayBody<Body>>| {
//!     let client = client.clone();
//!     async move {
//!         let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
//!         *req.uri_mut() = format!("http://{upstream}{pq}").parse()?;
//!         Ok::<_, BoxError>(client.request(req).await?)
//!     }
//! });
//!
//! let layer = Upstream::builder()
//!     .deadline(Duration::from_secs(5))
//!     .attempt_timeout(Duration::from_secs(2))
//!     .concurrency_limit(256)
//!     .build()?;
//! let app = Router::new().fallback_service(layer.layer(proxy));
//!
//! let res = app.oneshot(Request::get("/orders/7").body(Body::empty())?).await?;
//! assert_eq!(res.status(), StatusCode::BAD_GATEWAY); // refused, three times
//! assert_eq!(res.headers()["proxy-status"], "tower-upstream; error=connection_refused");
//! # Ok(())
//! # }
//! ```
//!
//! # Defaults, and why
//!
//! | part | default | why |
//! |---|---|---|
//! | [`MapFaults`] | [`MapFaultsLayer::new()`] | always on: it is what makes `Error = Infallible` |
//! | [`Deadline`] | 30 s, capped by `grpc-timeout` | a client rarely waits longer; nothing should hang forever |
//! | concurrency limit | off | a good limit depends on the upstream; set one with [`concurrency_limit`](UpstreamBuilder::concurrency_limit) |
//! | [`Retry`] | [`RetryLayer::new()`]: 3 attempts, safe policy, budget 20 % + 10/s | recovers blips; the budget stops retry storms |
//! | [`CircuitBreaker`] | [`CircuitBreakerLayer::new()`]: per authority, 50 % of ≥ 20 calls or 5 in a row, 5 s open | fails fast when an upstream is down |
//! | [`AttemptTimeout`] | 10 s | a third of the deadline, so that a hung attempt leaves time for another |
//!
//! Every part but `MapFaults` can be turned off (`no_deadline`, `no_retry`, …) or replaced
//! by a layer of your own making (`deadline_layer`, `retry`, `breaker`, …).
//!
//! # Shared state
//!
//! The breakers, the retry budget and the concurrency limit's permits are made once, by
//! [`build`](UpstreamBuilder::build). Every clone of the [`UpstreamLayer`] and every
//! service it makes (every `layer()` call: axum calls it once per route) share them, so
//! one upstream has one breaker and one budget however many routes reach it. Build two
//! layers for two independent upstreams.
//! [`UpstreamLayer::breaker_handle`] and [`UpstreamLayer::retry_budget`] reach that state
//! for a health endpoint.
//!
//! The default breaker is keyed by the request URI's authority. Around an outbound client
//! (absolute URIs) that is one breaker per upstream. Behind an axum route, the incoming
//! requests carry no authority (HTTP/1.1 origin form), so the whole layer has one breaker:
//! give each upstream its own `UpstreamLayer`, or pass a breaker with a
//! [`key_fn`](crate::breaker::Builder::key_fn).
//!
//! # Ordering
//!
//! Outermost first, as in the crate's design notes:
//!
//! ```text
//! MapFaults ─► Deadline ─► [LoadShed ─► ConcurrencyLimit] ─► Retry ─► CircuitBreaker ─► AttemptTimeout ─► service
//! ```
//!
//! - **MapFaults** is outermost: it is the only layer that turns errors into answers
//!   (502/503/504 or a `grpc-status`), and its `Error = Infallible` is what axum requires.
//!   Everything below may fail; nothing above it sees an error.
//! - **Deadline** is outside the retry, so that backoff sleeps and later attempts never
//!   outlive the request's overall deadline.
//! - **The limit** bounds *logical* requests in flight (retries of one request hold one
//!   permit). It sheds instead of queueing: a request over the limit is answered 503
//!   `connection_limit_reached` at once. It is below the deadline only so that a shed
//!   request costs nothing more than a refused permit.
//! - **Retry** is outside the breaker, so that each attempt is one breaker sample and an
//!   open circuit (`CircuitOpen`, never retried) fails the request fast.
//! - **AttemptTimeout** is innermost: each attempt gets its own timeout (the smaller of
//!   its own and the time the deadline leaves), and a timed-out attempt counts as one
//!   failure for the breaker; one cut short by a deadline the caller set (its
//!   `grpc-timeout` or the deadline header) does not count (see the
//!   [breaker's docs](crate::breaker#what-counts-as-a-failure)).
//!
//! Another order is possible by composing the layers by hand with `ServiceBuilder`.
//!
//! # The deadline inside the stack
//!
//! The stack's own deadline (the default, or [`deadline`](UpstreamBuilder::deadline)) does
//! not go into the request's extensions: every layer that needs it is the crate's own and
//! learns it as it is called, which spares every request the allocations of an extension
//! and of its copy for the retries. Each attempt, a retry's too, is still bounded by what the
//! deadline leaves, and a gRPC upstream is still told (`grpc-timeout`). The service you wrap
//! therefore sees no [`RequestDeadline`]; pass a layer of
//! your own with [`deadline_layer`](UpstreamBuilder::deadline_layer) if it needs one: that
//! layer behaves as it does alone. A deadline already on the incoming request is honoured
//! either way.
//!
//! An incoming `grpc-timeout` caps the deadline of gRPC requests (`content-type:
//! application/grpc…`); the stack does not look for one on other requests.
//!
//! On a request that is not gRPC, the deadline starts counting when it first matters: when
//! the first attempt has to wait for its answer, when a retry is weighed, or when a layer
//! of the crate's inside the service asks for it. A request the service answers without
//! waiting (a cache, a local handler) therefore reads no clock for its deadline. The
//! difference is the synchronous work done before the first wait, microseconds at most.
//! gRPC requests read the clock at once: their `grpc-timeout` must carry the time left.
//!
//! # When a retry cannot go ahead
//!
//! An answer the retry decided to retry is dropped then (keeping it through the backoff
//! would hold its body and the connection under it). If the next attempt cannot be made
//! after all, the request is answered for what stopped it: the breaker's 503 with
//! `Retry-After` when the circuit opened in the meantime, the deadline's 504 when it
//! passed, the mapper's answer for the error of the service's `poll_ready`.
//!
//! # One future, one timer
//!
//! The parts run as one state machine in [`Upstream`]'s own future, with the standalone
//! layers' code: the retry's decisions, the breaker's permits, the attempt timeout's and the
//! deadline's timing. A request arms at most one timer at a time (the attempt's end, which
//! is its timeout or the deadline, whichever comes first; a backoff; or the deadline while
//! the next attempt waits for the service), and none while the service answers without
//! waiting. The behaviour is the one of the layers composed in the order below.
//!
//! A timer is not a tokio `Sleep` of its own: the requests in flight on a thread share one,
//! armed for the earliest of their deadlines, and a request's timer is its deadline and its
//! waker in that thread's table. A `Sleep` per request would write, on every request, a
//! reference count and a lock that every core of the runtime shares. The timers keep tokio's
//! clock: `tokio::time::pause` and `advance` drive them as they drive any. A thread's table
//! serves one runtime at a time and keeps an idle task on it, which tells the table when
//! the runtime shuts down; a request on another runtime has a `Sleep` of its own. (The
//! standalone [`AttemptTimeout`](crate::AttemptTimeout), [`Deadline`](crate::Deadline) and
//! [`TimeoutBody`](crate::timeout::body::TimeoutBody) time the same way.)
//!
//! # Body types
//!
//! The service you wrap receives `Request<ReplayBody<B>>` (the retry records the body to
//! send it again), and the stack answers `Response<FaultBody<R>>` for an inner response
//! body `R`. With retries off the body is still wrapped (in a pass-through `ReplayBody`),
//! so that the inner service's type does not depend on the configuration.
//!
//! # Observability
//!
//! Each request runs in a `DEBUG` span `upstream.request` with `method`, `authority`,
//! `path`, and, once answered, `status` and either `attempts` (when the upstream answered)
//! or `fault` (its RFC 9209 name, when the stack answered for a fault), and `breaker_key`,
//! the key of the breaker the request went through (when the stack has a breaker, in every
//! mode: forced open or disabled too). The layers' own events (retries, breaker
//! transitions, faults) happen inside it. Nothing is logged above `DEBUG` per request on
//! the happy path.
//!
//! [`MapFaults`]: crate::MapFaults
//! [`Deadline`]: crate::Deadline
//! [`Retry`]: crate::Retry
//! [`CircuitBreaker`]: crate::CircuitBreaker
//! [`AttemptTimeout`]: crate::AttemptTimeout

mod future;
mod limit;

use std::convert::Infallible;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use tower::load_shed::error::Overloaded;
use tower::BoxError;
use tower_layer::Layer;
use tower_service::Service;

pub use self::future::ResponseFuture;

use crate::breaker::{self, BreakerHandle, CircuitBreakerLayer};
use crate::deadline::{
    self, DeadlineExceeded, DeadlineLayer, Due, RequestDeadline, Start, UpstreamStart,
};
use crate::error::ConfigError;
use crate::fault::Classifier;
use crate::grpc;
use crate::map_faults::{self, FaultBody, MapFaultsLayer, ReadyError};
use crate::retry::{self, DefaultPolicy, Policy, ReplayBody, RetryBudget, RetryLayer};
use crate::stripe::{Handle, Striped};
use crate::timeout::{self, AttemptTimeoutLayer};

/// The default overall deadline of a request.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// The default timeout of one attempt.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The whole stack around a service `S`, made by an [`UpstreamLayer`]. See the
/// [module docs](self).
///
/// It implements `Service<http::Request<B>>` with `Error = Infallible` and
/// `Response = http::Response<FaultBody<R>>` when `S` implements
/// `Service<http::Request<ReplayBody<B>>, Response = http::Response<R>>` and `Clone` (a
/// clone makes a retry's later attempts; it is required with retries off too).
///
/// A request's later attempts go to a clone of the service as the layer wrapped it, made
/// when the request comes to its second attempt: most requests never do, and a clone per
/// request would write the service's shared reference counts (a hyper client's, a tonic
/// channel's) from every core on every request. (A change made through
/// [`get_mut`](Self::get_mut) reaches first attempts only.)
///
/// Every part runs in this service's own call and future, with the same code as the
/// standalone layers ([`MapFaults`](crate::MapFaults), [`Deadline`](crate::Deadline),
/// [`Retry`](crate::Retry), [`CircuitBreaker`](crate::CircuitBreaker),
/// [`AttemptTimeout`](crate::AttemptTimeout)): one future and one timer per request rather
/// than a future per layer wrapped in the next, which would copy the futures below once per
/// level.
pub struct Upstream<S, P = DefaultPolicy> {
    inner: S,
    stack: Handle<Stack<S, P>>,
    map_faults: map_faults::Config,
    ready_error: ReadyError,
    deadline: Option<deadline::Config>,
    limit: Reserve<S, P>,
}

/// The parts every attempt goes through, made once per layer and shared by every service
/// it makes.
pub(crate) struct Parts<P> {
    retry: Arc<retry::Shared<P>>,
    breaker: Option<Arc<breaker::Shared>>,
    attempt: Option<timeout::Config>,
    limit: Option<Arc<limit::Limit>>,
    /// The deadline's configured header, when it is propagated: lowered on later attempts.
    deadline_header: Option<deadline::Propagated>,
}

impl<P> Clone for Parts<P> {
    fn clone(&self) -> Self {
        Parts {
            retry: self.retry.clone(),
            breaker: self.breaker.clone(),
            attempt: self.attempt,
            limit: self.limit.clone(),
            deadline_header: self.deadline_header.clone(),
        }
    }
}

/// What one service made by the layer (and its clones) shares, reached through the calling
/// thread's stripe: the layer's parts, and the service as the layer wrapped it.
pub(crate) struct Stack<S, P> {
    parts: Parts<P>,
    pub(crate) service: retry::Prototype<S>,
}

impl<S, P> Deref for Stack<S, P> {
    type Target = Parts<P>;

    #[inline]
    fn deref(&self) -> &Parts<P> {
        &self.parts
    }
}

/// The concurrency limit's state in one service: as tower's `ConcurrencyLimit` under
/// `LoadShed`, a place is taken in `poll_ready` (kept until a call uses it); without one, or
/// while the service below is not ready, the call is answered `Overloaded` at once.
struct Reserve<S, P> {
    permit: Option<limit::Permit<S, P>>,
    shed: bool,
}

impl Upstream<(), DefaultPolicy> {
    /// Starts configuring a stack from the defaults (see the [module docs](self)).
    pub fn builder() -> UpstreamBuilder {
        UpstreamBuilder::new()
    }
}

impl<S: Clone, P> Clone for Upstream<S, P> {
    fn clone(&self) -> Self {
        Upstream {
            inner: self.inner.clone(),
            stack: self.stack.clone(),
            map_faults: self.map_faults.clone(),
            ready_error: self.ready_error.clone(),
            deadline: self.deadline.clone(),
            limit: Reserve {
                permit: None,
                shed: false,
            },
        }
    }
}

impl<S, P> fmt::Debug for Upstream<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

impl<S, P> Upstream<S, P> {
    inner_accessors!("service", S);
}

impl<S, P, B, ResB> Service<Request<B>> for Upstream<S, P>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    P: Policy,
    B: Body,
{
    type Response = Response<FaultBody<ResB>>;
    type Error = Infallible;
    type Future = ResponseFuture<S, P, B, ResB>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        let inner = &mut self.inner;
        if self.stack.get().limit.is_none() {
            return self.ready_error.poll_ready(|| inner.poll_ready(cx));
        }
        let reserve = &mut self.limit;
        if reserve.permit.is_none() {
            let stripe = self.stack.stripe(retry::stripe_index());
            reserve.permit = limit::Permit::try_acquire(stripe);
        }
        if reserve.permit.is_none() {
            reserve.shed = true;
            return Poll::Ready(Ok(()));
        }
        match self.ready_error.poll_ready(|| inner.poll_ready(cx)) {
            Poll::Ready(_) => reserve.shed = false,
            Poll::Pending => reserve.shed = true,
        }
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Checked first: with tracing's `log` feature and no subscriber, even a disabled
        // span records its fields for `log`, which costs more than the rest of the call.
        let span = if tracing::enabled!(tracing::Level::DEBUG) {
            request_span(&req)
        } else {
            None
        };
        // One call site, so that the request is not moved once more into another frame.
        let entered = span.as_deref().cloned();
        let _entered = entered.as_ref().map(tracing::Span::enter);
        self.call_in(req, span)
    }
}

/// The request's span (`upstream.request`), made only when DEBUG is enabled; `None` when
/// no subscriber wants it.
#[inline(never)]
fn request_span<B>(req: &Request<B>) -> Option<Box<tracing::Span>> {
    let span = tracing::debug_span!(
        "upstream.request",
        method = %req.method(),
        authority = req.uri().authority().map(|a| a.as_str()),
        path = req.uri().path(),
        status = tracing::field::Empty,
        attempts = tracing::field::Empty,
        fault = tracing::field::Empty,
        breaker_key = tracing::field::Empty,
    );
    (!span.is_disabled()).then(|| Box::new(span))
}

impl<S, P> Upstream<S, P> {
    /// The call, in `span`: the parts above the retry, then the retry.
    #[inline]
    fn call_in<B, ResB>(
        &mut self,
        mut req: Request<B>,
        span: Option<Box<tracing::Span>>,
    ) -> ResponseFuture<S, P, B, ResB>
    where
        S: Service<Request<ReplayBody<B>>, Response = Response<ResB>> + Clone,
        S::Error: Into<BoxError>,
        P: Policy,
        B: Body,
    {
        // Read once, for the fault answers, the deadline and every attempt's timeout.
        let grpc = grpc::is_grpc(req.headers());
        let map_faults = self.map_faults.for_request(grpc);
        if let Some(error) = self.ready_error.take() {
            return ResponseFuture::answer(error, map_faults, span);
        }
        let start = match &self.deadline {
            Some(config) => config.start_in_upstream(&mut req, grpc),
            None => UpstreamStart::Now(Start::Untimed),
        };
        let clock = match start {
            // No deadline of the stack's own: one on the request (a layer above) may still
            // end an attempt, and says whether the caller set it.
            UpstreamStart::Now(Start::Untimed) => (
                None,
                Due::Never,
                RequestDeadline::of(&req).is_some_and(|d| d.is_from_caller()),
            ),
            UpstreamStart::Now(Start::Spent) => {
                let error = DeadlineExceeded::before_start().into();
                return ResponseFuture::answer(error, map_faults, span);
            }
            UpstreamStart::Now(Start::Timed {
                at, now, by_caller, ..
            }) => (Some(now), Due::At(at), by_caller),
            // No clock read: the deadline is worked out when it first matters.
            UpstreamStart::After { timeout, by_caller } => (None, Due::After(timeout), by_caller),
        };
        let permit = self.limit.permit.take();
        // Shed: no place under the limit, or the service below was not ready. A call that
        // `poll_ready` did not precede holds no place either, and is shed as tower's
        // `LoadShed` sheds it, rather than let past the limit.
        if self.limit.shed || (permit.is_none() && self.stack.get().limit.is_some()) {
            return ResponseFuture::answer(Overloaded::new().into(), map_faults, span);
        }
        ResponseFuture::start(
            &mut self.inner,
            &self.stack,
            req,
            clock,
            permit,
            map_faults,
            span,
        )
    }
}

/// Applies the whole stack, [`Upstream`], to a service. Made by [`Upstream::builder()`];
/// cheap to clone, and every clone and every service it makes share one set of breakers,
/// one retry budget and one concurrency limit.
///
/// Each service it makes (each `layer` call) gets a little state of its own, allocated
/// once: a reference per core to the layer's parts and a copy of the wrapped service for
/// later attempts, which its clones and their requests share without writing a count that
/// every core writes. Wrap a service once and clone it, rather than calling `layer` per
/// request.
pub struct UpstreamLayer<P = DefaultPolicy> {
    map_faults: MapFaultsLayer,
    deadline: Option<DeadlineLayer>,
    parts: Parts<P>,
    retry: RetryLayer<P>,
    retrying: bool,
    breaker: Option<CircuitBreakerLayer>,
    attempt_timeout: Option<AttemptTimeoutLayer>,
}

impl UpstreamLayer {
    /// The stack with every default (see the [module docs](self)); the same as
    /// `Upstream::builder().build()`, which cannot fail with the defaults.
    pub fn new() -> Self {
        match UpstreamBuilder::new().build() {
            Ok(layer) => layer,
            // The defaults are valid; pinned by a test.
            Err(e) => unreachable!("default stack configuration: {e}"),
        }
    }

    /// Starts configuring a stack from the defaults; the same as [`Upstream::builder()`].
    pub fn builder() -> UpstreamBuilder {
        UpstreamBuilder::new()
    }
}

impl Default for UpstreamLayer {
    fn default() -> Self {
        UpstreamLayer::new()
    }
}

impl<P> UpstreamLayer<P> {
    /// A handle on the breakers (snapshots, operator modes), or `None` without a breaker.
    pub fn breaker_handle(&self) -> Option<BreakerHandle> {
        self.breaker.as_ref().map(CircuitBreakerLayer::handle)
    }

    /// The retry budget every service of this layer draws on, or `None` without retries.
    pub fn retry_budget(&self) -> Option<RetryBudget> {
        self.retrying.then(|| self.retry.budget().clone())
    }
}

impl<P> Clone for UpstreamLayer<P> {
    fn clone(&self) -> Self {
        UpstreamLayer {
            map_faults: self.map_faults.clone(),
            deadline: self.deadline.clone(),
            parts: self.parts.clone(),
            retry: self.retry.clone(),
            retrying: self.retrying,
            breaker: self.breaker.clone(),
            attempt_timeout: self.attempt_timeout.clone(),
        }
    }
}

impl<P: fmt::Debug> fmt::Debug for UpstreamLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamLayer")
            .field("map_faults", &self.map_faults)
            .field("deadline", &self.deadline)
            .field("limit", &self.parts.limit.is_some())
            .field("retry", &self.retrying.then_some(&self.retry))
            .field("breaker", &self.breaker)
            .field("attempt_timeout", &self.attempt_timeout)
            .finish()
    }
}

impl<S: Clone, P> Layer<S> for UpstreamLayer<P> {
    type Service = Upstream<S, P>;

    fn layer(&self, inner: S) -> Upstream<S, P> {
        let stack = Arc::new(Striped::new(Stack {
            parts: self.parts.clone(),
            service: retry::Prototype::new(inner.clone()),
        }));
        Upstream {
            inner,
            stack: stack.handle(),
            map_faults: self.map_faults.config().clone(),
            ready_error: ReadyError::default(),
            deadline: self.deadline.as_ref().map(|l| l.config().clone()),
            limit: Reserve {
                permit: None,
                shed: false,
            },
        }
    }
}

type MakeRetry<P> = Box<dyn FnOnce(Option<Classifier>) -> Result<RetryLayer<P>, ConfigError>>;

/// Configures an [`UpstreamLayer`]; see [`Upstream::builder()`] and the
/// [module docs](self) for the defaults.
///
/// Settings are checked by [`build`](Self::build), which never panics.
///
/// A [`classifier`](Self::classifier) applies to the layers the builder makes itself; a
/// layer you pass in (`.retry(…)`, `.breaker(…)`, `.map_faults(…)`) keeps the classifier
/// it was built with.
#[must_use]
pub struct UpstreamBuilder<P = DefaultPolicy> {
    map_faults: Option<MapFaultsLayer>,
    deadline: Part<DeadlineLayer>,
    limit: Option<usize>,
    retry: MakeRetry<P>,
    retrying: bool,
    breaker: Part<CircuitBreakerLayer>,
    attempt_timeout: Part<AttemptTimeoutLayer>,
    classifier: Option<Classifier>,
}

/// One optional part of the stack: its default, a duration to check, a layer, or off.
#[derive(Debug)]
enum Part<L> {
    Default,
    Duration(Duration),
    Layer(L),
    Off,
}

impl UpstreamBuilder {
    fn new() -> Self {
        UpstreamBuilder {
            map_faults: None,
            deadline: Part::Default,
            limit: None,
            retry: Box::new(default_retry),
            retrying: true,
            breaker: Part::Default,
            attempt_timeout: Part::Default,
            classifier: None,
        }
    }
}

fn default_retry(classifier: Option<Classifier>) -> Result<RetryLayer, ConfigError> {
    let builder = RetryLayer::builder();
    match classifier {
        Some(c) => builder.classifier(c).build(),
        None => builder.build(),
    }
}

impl<P> UpstreamBuilder<P> {
    /// The outermost layer, answering faults (default [`MapFaultsLayer::new()`]).
    pub fn map_faults(mut self, layer: MapFaultsLayer) -> Self {
        self.map_faults = Some(layer);
        self
    }

    /// The overall deadline of a request (default 30 s; must be > 0), capped by an
    /// incoming `grpc-timeout` and propagated to gRPC upstreams.
    pub fn deadline(mut self, timeout: Duration) -> Self {
        self.deadline = Part::Duration(timeout);
        self
    }

    /// A deadline layer of your own making (other headers, no propagation…).
    pub fn deadline_layer(mut self, layer: DeadlineLayer) -> Self {
        self.deadline = Part::Layer(layer);
        self
    }

    /// No overall deadline: a request takes as long as its attempts and backoffs do.
    pub fn no_deadline(mut self) -> Self {
        self.deadline = Part::Off;
        self
    }

    /// At most `max` requests in flight through every service of the layer together (at
    /// least 1, at most `usize::MAX >> 3`); a request over the limit is
    /// not queued but answered 503 `connection_limit_reached` at once (as tower's
    /// `ConcurrencyLimit` under `LoadShed`). Off by default.
    pub fn concurrency_limit(mut self, max: usize) -> Self {
        self.limit = Some(max);
        self
    }

    /// No concurrency limit (the default).
    pub fn no_concurrency_limit(mut self) -> Self {
        self.limit = None;
        self
    }

    /// The retry layer (default [`RetryLayer::new()`]). Its budget is the layer's: pass
    /// clones of one `RetryLayer` to several builders to share one budget.
    pub fn retry<P2>(self, layer: RetryLayer<P2>) -> UpstreamBuilder<P2>
    where
        P2: 'static,
    {
        UpstreamBuilder {
            map_faults: self.map_faults,
            deadline: self.deadline,
            limit: self.limit,
            retry: Box::new(move |_| Ok(layer)),
            retrying: true,
            breaker: self.breaker,
            attempt_timeout: self.attempt_timeout,
            classifier: self.classifier,
        }
    }

    /// No retries: every request is sent once (its body passes through untouched).
    pub fn no_retry(self) -> UpstreamBuilder {
        UpstreamBuilder {
            map_faults: self.map_faults,
            deadline: self.deadline,
            limit: self.limit,
            retry: Box::new(|_| RetryLayer::builder().max_attempts(1).build()),
            retrying: false,
            breaker: self.breaker,
            attempt_timeout: self.attempt_timeout,
            classifier: self.classifier,
        }
    }

    /// The circuit breaker layer (default [`CircuitBreakerLayer::new()`]).
    pub fn breaker(mut self, layer: CircuitBreakerLayer) -> Self {
        self.breaker = Part::Layer(layer);
        self
    }

    /// No circuit breaker.
    pub fn no_breaker(mut self) -> Self {
        self.breaker = Part::Off;
        self
    }

    /// The timeout of each attempt (default 10 s; must be > 0). The deadline's remaining
    /// time shortens it when smaller.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Part::Duration(timeout);
        self
    }

    /// An attempt timeout layer of your own making.
    pub fn attempt_timeout_layer(mut self, layer: AttemptTimeoutLayer) -> Self {
        self.attempt_timeout = Part::Layer(layer);
        self
    }

    /// No per-attempt timeout: an attempt may take what the deadline leaves.
    pub fn no_attempt_timeout(mut self) -> Self {
        self.attempt_timeout = Part::Off;
        self
    }

    /// The classifier for the layers the builder makes (the fault mapper, the retry and the
    /// breaker, unless passed in). Default: the built-in rules.
    pub fn classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = Some(classifier);
        self
    }

    /// Checks the settings and makes the layer, with its breakers, budget and limit.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field and the bad value: `deadline.timeout` or
    /// `attempt_timeout.timeout` of zero, `concurrency_limit` of zero or too large, or whatever a
    /// default layer's own builder rejects.
    pub fn build(self) -> Result<UpstreamLayer<P>, ConfigError> {
        let classifier = self.classifier;
        let map_faults = match self.map_faults {
            Some(layer) => layer,
            None => match &classifier {
                Some(c) => MapFaultsLayer::builder().classifier(c.clone()).build()?,
                None => MapFaultsLayer::new(),
            },
        };
        let deadline = match self.deadline {
            // The stack's own deadline travels privately (no extension, see the module
            // docs); a layer passed in behaves as it would alone.
            Part::Default => Some(DeadlineLayer::new(DEFAULT_DEADLINE).without_extension()),
            Part::Duration(d) => Some(
                DeadlineLayer::builder()
                    .timeout(d)
                    .build()?
                    .without_extension(),
            ),
            Part::Layer(layer) => Some(layer),
            Part::Off => None,
        };
        let limit = match self.limit {
            Some(0) => {
                return Err(ConfigError::new(
                    "concurrency_limit",
                    "must be at least 1 (got 0)",
                ))
            }
            Some(max) if max > limit::MAX => {
                return Err(ConfigError::new(
                    "concurrency_limit",
                    format!("must be at most {} (got {max})", limit::MAX),
                ))
            }
            Some(max) => Some(Arc::new(limit::Limit::new(max))),
            None => None,
        };
        let breaker = match self.breaker {
            Part::Default | Part::Duration(_) => Some(match &classifier {
                Some(c) => CircuitBreakerLayer::builder()
                    .classifier(c.clone())
                    .build()?,
                None => CircuitBreakerLayer::new(),
            }),
            Part::Layer(layer) => Some(layer),
            Part::Off => None,
        };
        let attempt_timeout = match self.attempt_timeout {
            Part::Default => Some(AttemptTimeoutLayer::new(DEFAULT_ATTEMPT_TIMEOUT)),
            Part::Duration(d) => Some(AttemptTimeoutLayer::builder().timeout(d).build()?),
            Part::Layer(layer) => Some(layer),
            Part::Off => None,
        };
        let retry = (self.retry)(classifier)?;
        let parts = Parts {
            retry: retry.shared().clone(),
            breaker: breaker.as_ref().map(|b| b.shared.clone()),
            attempt: attempt_timeout.as_ref().map(AttemptTimeoutLayer::config),
            limit,
            deadline_header: deadline.as_ref().and_then(|l| l.config().propagated()),
        };
        Ok(UpstreamLayer {
            map_faults,
            deadline,
            parts,
            retry,
            retrying: self.retrying,
            breaker,
            attempt_timeout,
        })
    }
}

impl<P> fmt::Debug for UpstreamBuilder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBuilder")
            .field("map_faults", &self.map_faults)
            .field("deadline", &self.deadline)
            .field("limit", &self.limit)
            .field("retrying", &self.retrying)
            .field("breaker", &self.breaker)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("classifier", &self.classifier)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + 'static>() {}
    fn assert_send<T: Send + 'static>() {}

    type Inner = tower::util::BoxCloneSyncService<
        Request<ReplayBody<http_body_util::Full<bytes::Bytes>>>,
        Response<http_body_util::Full<bytes::Bytes>>,
        BoxError,
    >;

    #[test]
    fn send_sync() {
        assert_send_sync::<UpstreamLayer>();
        assert_send_sync::<Upstream<Inner>>();
        assert_send::<
            ResponseFuture<
                Inner,
                DefaultPolicy,
                http_body_util::Full<bytes::Bytes>,
                http_body_util::Full<bytes::Bytes>,
            >,
        >();
    }

    #[test]
    fn a_limit_too_large_is_a_config_error() {
        let err = Upstream::builder()
            .concurrency_limit(usize::MAX)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "concurrency_limit");
        assert!(Upstream::builder()
            .concurrency_limit(limit::MAX)
            .build()
            .is_ok());
    }

    #[test]
    fn defaults_build() {
        let layer = Upstream::builder().build().unwrap();
        let _ = UpstreamLayer::new();
        assert!(layer.breaker_handle().is_some());
        assert!(layer.retry_budget().is_some());
        let bare = Upstream::builder()
            .no_deadline()
            .no_retry()
            .no_breaker()
            .no_attempt_timeout()
            .build()
            .unwrap();
        assert!(bare.breaker_handle().is_none());
        assert!(bare.retry_budget().is_none());
    }
}
