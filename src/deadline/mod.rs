//! Request deadlines: how much time a whole logical request has left.
//!
//! [`DeadlineLayer`] gives every request an overall deadline: its configured timeout, capped
//! by the caller's `grpc-timeout` and (if configured) a header such as `request-timeout`, and
//! by any earlier deadline already on the request. It stores the deadline as a
//! [`RequestDeadline`] in the request's extensions, tells a gRPC upstream how long it has
//! (`grpc-timeout`), and fails the request with [`DeadlineExceeded`] when no response head
//! arrived in time.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_upstream::deadline::{DeadlineLayer, RequestDeadline};
//! use tower_upstream::fault::{classify, Fault};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let layer = DeadlineLayer::builder()
//!     .timeout(Duration::from_secs(5))
//!     .header("request-timeout", tower_upstream::deadline::HeaderUnit::Seconds)
//!     .build()?;
//! let svc = ServiceBuilder::new().layer(layer).service(service_fn(
//!     |req: http::Request<()>| async move {
//!         // Layers and handlers below see the deadline.
//!         let left = RequestDeadline::of(&req).unwrap().remaining();
//!         assert_eq!(left, Duration::from_secs(2));
//!         tokio::time::sleep(Duration::from_secs(10)).await; // a slow upstream
//!         Ok::<_, tower::BoxError>(http::Response::new(()))
//!     },
//! ));
//!
//! let req = http::Request::builder().header("request-timeout", "2").body(())?;
//! let err = svc.oneshot(req).await.unwrap_err();
//! assert_eq!(err.to_string(), "request deadline exceeded");
//! assert_eq!(classify(&*err).fault(), Fault::HttpResponseTimeout); // 504
//! # Ok(())
//! # }
//! ```
//!
//! A [`RequestDeadline`] can also be set and read by hand:
//!
//! ```
//! use std::time::Duration;
//! use tower_upstream::deadline::RequestDeadline;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let mut req = http::Request::new(());
//! req.extensions_mut().insert(RequestDeadline::after(Duration::from_secs(2)));
//!
//! tokio::time::sleep(Duration::from_millis(500)).await;
//! let deadline = RequestDeadline::of(&req).unwrap();
//! assert_eq!(deadline.remaining(), Duration::from_millis(1500));
//! # }
//! ```
//!
//! # Errors
//!
//! - [`DeadlineExceeded::before_start()`] when the deadline was already spent when the
//!   request arrived (a `grpc-timeout: 0n`, an earlier layer's deadline): the inner service is
//!   not called.
//! - [`DeadlineExceeded::in_flight()`] when it passed before the inner service answered.
//! - The inner service's own errors, unchanged (boxed as [`tower::BoxError`]).
//!
//! Both classify as [`Fault::HttpResponseTimeout`](crate::fault::Fault::HttpResponseTimeout):
//! 504 / `DEADLINE_EXCEEDED`.
//!
//! # Ordering
//!
//! Put the deadline outside the retry and an
//! [`AttemptTimeout`](crate::timeout::AttemptTimeout) innermost (see the design's stack:
//! `MapFaults → Deadline → … → Retry → CircuitBreaker → AttemptTimeout → client`). The attempt
//! timeout then enforces `min(per-attempt, remaining)` and returns `DeadlineExceeded` itself
//! when the deadline is what ran out; the deadline notices that a timer below it will wake
//! the request in time and arms no timer of its own, so the pair costs one timer per attempt.
//! The deadline's own timer exists only while nothing below would wake it in time (a retry's
//! back-off, a service without an attempt timeout), and is created only once the inner future
//! has returned `Pending`.

pub mod error;
pub mod future;
mod layer;

pub(crate) mod cover;

use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HeaderName;
use http::{HeaderValue, Request};
use tokio::time::Instant;
use tower_service::Service;

use crate::grpc;
use crate::BoxError;

pub use self::error::DeadlineExceeded;
pub use self::layer::{DeadlineBuilder, DeadlineLayer};

/// How far in the future a deadline "never" is: longer timeouts (a `grpc-timeout` of
/// `99999999H` is 11 000 years) are capped to it, so no deadline is absurd or overflows.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `now + timeout`, with `timeout` capped at 100 years.
#[inline]
pub(crate) fn saturating_add(now: Instant, timeout: Duration) -> Instant {
    let timeout = timeout.min(FAR_FUTURE);
    now.checked_add(timeout)
        .or_else(|| now.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(now)
}

/// A request's deadline as [`Upstream`](crate::Upstream) keeps it: none, an instant, or a
/// time that starts when the deadline first matters.
///
/// `After` spares a request that is answered without waiting the clock read: its deadline
/// is worked out (`now + timeout`) the first time something needs it (the attempt has to
/// wait, a retry is weighed, a layer below asks). Up to then no time has been spent waiting,
/// so the deadline is the one the request would have had, give or take the synchronous work
/// done before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Due {
    /// No deadline.
    Never,
    /// At this instant.
    At(Instant),
    /// This long after the deadline first matters.
    After(Duration),
}

impl Due {
    /// The deadline, worked out from `now` if it was not yet.
    #[inline]
    pub(crate) fn resolve(&mut self, now: impl FnOnce() -> Instant) -> Option<Instant> {
        match *self {
            Due::Never => None,
            Due::At(at) => Some(at),
            Due::After(timeout) => {
                let at = saturating_add(now(), timeout);
                *self = Due::At(at);
                Some(at)
            }
        }
    }

    /// The deadline, reading the clock if it was not yet worked out.
    #[inline]
    pub(crate) fn get(&mut self) -> Option<Instant> {
        self.resolve(Instant::now)
    }

    /// The deadline as an instant, if it is one already (no clock read).
    #[inline]
    pub(crate) fn known(&self) -> Option<Instant> {
        match *self {
            Due::At(at) => Some(at),
            _ => None,
        }
    }

    /// Whether there is a deadline at all.
    #[inline]
    pub(crate) fn is_never(&self) -> bool {
        matches!(self, Due::Never)
    }
}

impl From<Option<Instant>> for Due {
    #[inline]
    fn from(at: Option<Instant>) -> Self {
        at.map_or(Due::Never, Due::At)
    }
}

/// The instant by which a logical request must have its response head, stored in the
/// request's extensions.
///
/// It also says whether the caller set it ([`is_from_caller`](Self::is_from_caller)): a
/// [`DeadlineLayer`] marks the deadline it gives when an incoming `grpc-timeout` or its
/// configured header made it earlier than the layer's own timeout. An attempt cut short by
/// such a deadline says nothing about the upstream, so a circuit breaker does not count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestDeadline {
    at: Instant,
    from_caller: bool,
}

impl RequestDeadline {
    /// A deadline at `at` (not from the caller).
    pub const fn at(at: Instant) -> Self {
        RequestDeadline {
            at,
            from_caller: false,
        }
    }

    /// A deadline `timeout` from now (at most 100 years from now; not from the caller).
    pub fn after(timeout: Duration) -> Self {
        RequestDeadline::at(saturating_add(Instant::now(), timeout))
    }

    /// The same deadline, marked as set by the caller (or not).
    pub const fn from_caller(mut self, from_caller: bool) -> Self {
        self.from_caller = from_caller;
        self
    }

    /// Whether the caller set the deadline (a header of its request), rather than the
    /// gateway's own configuration.
    pub const fn is_from_caller(&self) -> bool {
        self.from_caller
    }

    /// The instant the deadline falls on.
    pub const fn instant(&self) -> Instant {
        self.at
    }

    /// Time left before the deadline; zero once it has passed.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.at
    }

    /// The deadline of a request, if a layer set one.
    pub fn of<B>(req: &http::Request<B>) -> Option<RequestDeadline> {
        req.extensions().get::<RequestDeadline>().copied()
    }

    /// The earlier of two deadlines.
    pub fn min(self, other: RequestDeadline) -> RequestDeadline {
        if other.at < self.at {
            other
        } else {
            self
        }
    }
}

/// The unit of a configured deadline header's value (see [`DeadlineBuilder::header`]).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderUnit {
    /// Whole seconds, like `request-timeout: 5`.
    Seconds,
    /// Whole milliseconds, like Envoy's `x-envoy-upstream-rq-timeout-ms: 5000`.
    Milliseconds,
}

impl HeaderUnit {
    /// Parses a header value strictly: 1 to 9 ASCII digits, nothing else.
    fn parse(self, value: &HeaderValue) -> Option<Duration> {
        let digits = value.as_bytes();
        if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = digits
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        Some(match self {
            HeaderUnit::Seconds => Duration::from_secs(n),
            HeaderUnit::Milliseconds => Duration::from_millis(n),
        })
    }

    /// Encodes a remaining time, rounded up to the unit (an upstream told "0" would give up
    /// at once while the gateway still waits).
    fn encode(self, remaining: Duration) -> HeaderValue {
        let n = match self {
            HeaderUnit::Seconds => remaining.as_secs() + u64::from(remaining.subsec_nanos() > 0),
            HeaderUnit::Milliseconds => {
                let ms =
                    remaining.as_millis() + u128::from(remaining.subsec_nanos() % 1_000_000 > 0);
                u64::try_from(ms).unwrap_or(u64::MAX)
            }
        };
        HeaderValue::from(n.min(999_999_999))
    }
}

/// A deadline header the stack propagates, as a later attempt's request carries it.
pub(crate) type Propagated = (HeaderName, HeaderUnit);

/// The deadline header a [`Deadline`] layer set on a request, kept in its extensions beside
/// its [`RequestDeadline`] so that a [`Retry`](crate::Retry) composed below it by hand
/// lowers that header on later attempts (inside [`Upstream`](crate::Upstream), the stack
/// hands it over itself). Private: one per request, the innermost layer's.
#[derive(Clone)]
pub(crate) struct PropagatedHeader(pub(crate) Propagated);

/// Lowers a propagated deadline header in `headers` to what is `left`, when it says more
/// (a later attempt's copy of the head carries the time the request had at the start).
/// Never adds the header.
pub(crate) fn lower_propagated(
    headers: &mut http::HeaderMap,
    (name, unit): &Propagated,
    left: Duration,
) {
    if headers
        .get(name)
        .and_then(|v| unit.parse(v))
        .is_some_and(|said| said > left)
    {
        headers.insert(name.clone(), unit.encode(left));
    }
}

/// What a [`Deadline`] does; made by [`DeadlineBuilder`].
#[derive(Clone, Debug)]
pub(crate) struct Config {
    timeout: Option<Duration>,
    grpc_timeout: bool,
    header: Option<(HeaderName, HeaderUnit)>,
    propagate: bool,
    /// Whether the deadline goes into the request's extensions (always, but inside
    /// `Upstream`, where it travels privately: see [`cover`]).
    extension: bool,
}

impl Config {
    /// The header this deadline sets on outgoing requests, if it propagates one.
    pub(crate) fn propagated(&self) -> Option<Propagated> {
        self.header.clone().filter(|_| self.propagate)
    }

    fn new(timeout: Duration) -> Self {
        Config {
            timeout: Some(timeout),
            grpc_timeout: true,
            header: None,
            propagate: true,
            extension: true,
        }
    }

    /// The deadline this layer gives a request (before any earlier one is considered), if
    /// any, and whether a header of the request set it (made it earlier than the layer's
    /// own timeout, or there is none). `grpc` is whether the request is gRPC, when the
    /// caller knows: only a gRPC request's `grpc-timeout` is read then.
    #[inline]
    fn deadline_of<B>(
        &self,
        req: &Request<B>,
        now: Instant,
        grpc: Option<bool>,
    ) -> Option<(Instant, bool)> {
        self.timeout_of(req, grpc)
            .map(|(t, by_caller)| (saturating_add(now, t), by_caller))
    }

    /// [`deadline_of`](Self::deadline_of) as a time from now: the layer's timeout, capped by
    /// the request's headers.
    #[inline(always)]
    fn timeout_of<B>(&self, req: &Request<B>, grpc: Option<bool>) -> Option<(Duration, bool)> {
        let mut limit = self.timeout.map(|t| (t.min(FAR_FUTURE), false));
        let mut cap = |t: Duration| {
            let t = t.min(FAR_FUTURE);
            if limit.is_none_or(|(l, _)| t < l) {
                limit = Some((t, true));
            }
        };
        if self.grpc_timeout && grpc != Some(false) {
            if let Some(t) = grpc::timeout_of(req.headers()) {
                cap(t);
            }
        }
        if let Some((name, unit)) = &self.header {
            if let Some(value) = req.headers().get(name) {
                match unit.parse(value) {
                    Some(t) => cap(t),
                    None => {
                        tracing::debug!(header = %name, ?value, "ignoring malformed timeout header")
                    }
                }
            }
        }
        limit
    }

    /// Gives a request its deadline, as the layer's `call` does before calling the inner
    /// service: stores it (in the extensions, unless it travels privately), propagates the
    /// remaining time. Call the inner service only on [`Start::Timed`] (within
    /// [`Start::share`]) or [`Start::Untimed`].
    #[inline]
    pub(crate) fn start<B>(&self, req: &mut Request<B>) -> Start {
        self.start_grpc(req, None)
    }

    /// [`start`](Self::start), told whether the request is gRPC when the caller knows.
    #[inline]
    pub(crate) fn start_grpc<B>(&self, req: &mut Request<B>, grpc: Option<bool>) -> Start {
        let now = cover::now();
        let own = self.deadline_of(req, now, grpc);
        let earlier = RequestDeadline::of(req);
        let (at, ours, by_caller) = match (own, earlier) {
            (None, None) => return Start::Untimed,
            (Some((at, by_caller)), None) => (at, true, by_caller),
            (Some((at, by_caller)), Some(e)) if at < e.instant() => (at, true, by_caller),
            (_, Some(e)) => (e.instant(), false, e.is_from_caller()),
        };
        if at <= now {
            return Start::Spent;
        }
        if ours && self.extension {
            req.extensions_mut()
                .insert(RequestDeadline::at(at).from_caller(by_caller));
        }
        if self.propagate {
            if grpc.unwrap_or_else(|| grpc::is_grpc(req.headers())) {
                req.headers_mut()
                    .insert(grpc::GRPC_TIMEOUT, grpc::encode_timeout(at - now));
            }
            if let Some(header @ (name, unit)) = &self.header {
                req.headers_mut()
                    .insert(name.clone(), unit.encode(at - now));
                if self.extension {
                    req.extensions_mut()
                        .insert(PropagatedHeader(header.clone()));
                }
            }
        }
        Start::Timed {
            at,
            now,
            private: !self.extension,
            by_caller,
        }
    }
}

impl Config {
    /// [`start_grpc`](Self::start_grpc) inside [`Upstream`](crate::Upstream), where the
    /// deadline travels privately: when nothing needs the clock now (a request that is not
    /// gRPC, without a deadline in its extensions, from a layer that adds none), the deadline
    /// is left as a time from when it first matters ([`Due::After`]) and no clock is read.
    /// A configured deadline header is still propagated: it carries that time.
    #[inline(always)]
    pub(crate) fn start_in_upstream<B>(&self, req: &mut Request<B>, grpc: bool) -> UpstreamStart {
        if grpc || self.extension || RequestDeadline::of(req).is_some() {
            return UpstreamStart::Now(self.start_grpc(req, Some(grpc)));
        }
        let Some((timeout, by_caller)) = self.timeout_of(req, Some(false)) else {
            return UpstreamStart::Now(Start::Untimed);
        };
        if timeout.is_zero() {
            return UpstreamStart::Now(Start::Spent);
        }
        if self.propagate {
            if let Some((name, unit)) = &self.header {
                req.headers_mut().insert(name.clone(), unit.encode(timeout));
            }
        }
        UpstreamStart::After { timeout, by_caller }
    }
}

/// What [`Config::start_in_upstream`] made of a request.
pub(crate) enum UpstreamStart {
    /// As [`Config::start_grpc`] says.
    Now(Start),
    /// A deadline `timeout` after it first matters; `by_caller` as in [`Start::Timed`].
    After { timeout: Duration, by_caller: bool },
}

/// What [`Config::start`] made of a request.
pub(crate) enum Start {
    /// No deadline: call the inner service as is.
    Untimed,
    /// The deadline has already passed: answer [`DeadlineExceeded::before_start`].
    Spent,
    /// A deadline at `at`, read at `now`.
    Timed {
        at: Instant,
        now: Instant,
        /// The deadline travels privately (see [`cover`]).
        private: bool,
        /// The caller set it, with a header of the request: see
        /// [`Upstream`](crate::Upstream)'s breaker, which does not count an attempt that
        /// such a deadline cut short.
        by_caller: bool,
    },
}

impl Start {
    /// What the layers called below may read while the inner service is called: the clock
    /// reading and, if it travels privately, the deadline. Keep it until the call returns.
    #[inline]
    pub(crate) fn share(&self) -> Option<cover::Shared> {
        self.share_grpc(None)
    }

    /// [`share`](Self::share), and whether the request is gRPC (see
    /// [`cover::Shared::share_grpc`]).
    #[inline]
    pub(crate) fn share_grpc(&self, grpc: Option<bool>) -> Option<cover::Shared> {
        match *self {
            Start::Timed {
                at, now, private, ..
            } => Some(cover::Shared::share_grpc(
                Some(now),
                private.then_some(at),
                grpc,
            )),
            _ => None,
        }
    }
}

/// Gives each request an overall deadline and fails it with [`DeadlineExceeded`] when no
/// response head arrived in time. See the [module docs](self).
#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    config: Config,
}

impl<S> Deadline<S> {
    /// Wraps `inner` with a deadline of `timeout` (capped by an incoming `grpc-timeout`,
    /// propagated to gRPC upstreams). A zero `timeout` fails every request at once;
    /// [`DeadlineLayer::builder`] rejects it instead.
    pub fn new(inner: S, timeout: Duration) -> Self {
        Deadline {
            inner,
            config: Config::new(timeout),
        }
    }

    /// A layer that wraps services in a `Deadline` of `timeout`; see [`Deadline::new`].
    pub fn layer(timeout: Duration) -> DeadlineLayer {
        DeadlineLayer::new(timeout)
    }

    inner_accessors!("service", S);
}

impl<S: fmt::Debug> fmt::Debug for Deadline<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deadline")
            .field("inner", &self.inner)
            .field("timeout", &self.config.timeout)
            .field("grpc_timeout", &self.config.grpc_timeout)
            .field("header", &self.config.header)
            .field("propagate", &self.config.propagate)
            .finish()
    }
}

impl<S, B> Service<Request<B>> for Deadline<S>
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
        let start = self.config.start(&mut req);
        match start {
            Start::Untimed => future::ResponseFuture::untimed(self.inner.call(req)),
            Start::Spent => future::ResponseFuture::spent(),
            Start::Timed { at, by_caller, .. } => {
                let _shared = start.share();
                future::ResponseFuture::timed(self.inner.call(req), at, by_caller)
            }
        }
    }
}
