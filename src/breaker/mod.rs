//! Circuit breaking: stop calling an upstream that is failing, probe it, resume when it
//! answers again.
//!
//! [`CircuitBreaker`] keeps one breaker per upstream key (by default the request URI's
//! authority). While a breaker is **closed**, calls flow and their outcomes are counted; when
//! the failure rate over a sliding window (after a minimum number of calls), or a run of
//! consecutive failures, crosses its threshold, the breaker **opens**: calls fail at once with
//! [`CircuitOpen`], which the fault classifier names
//! `destination_unavailable` (503 with `Retry-After`), without touching the upstream. After the
//! open time (5 s by default, doubling on consecutive trips up to 60 s, jittered) the breaker
//! is **half-open**: a bounded number of probes go through; enough successes close it, a
//! failure opens it again.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
//! use tower_upstream::breaker::{error::CircuitOpen, CircuitBreakerLayer, State};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let layer = CircuitBreakerLayer::builder()
//!     .consecutive_failures(3)
//!     .open_duration(Duration::from_secs(5))
//!     .build()?;
//! let handle = layer.handle();
//!
//! // An upstream that answers 503.
//! let mut svc = ServiceBuilder::new().layer(layer).service(service_fn(|_req: http::Request<()>| async {
//!     Ok::<_, BoxError>(http::Response::builder().status(503).body(()).unwrap())
//! }));
//!
//! let req = || http::Request::get("http://api.internal/").body(()).unwrap();
//! for _ in 0..3 {
//!     assert_eq!(svc.ready().await?.call(req()).await?.status(), 503);
//! }
//! // Open: refused without calling the upstream.
//! let err = svc.ready().await?.call(req()).await.unwrap_err();
//! let open = err.downcast_ref::<CircuitOpen>().unwrap();
//! assert!(open.retry_after() <= Duration::from_secs(5));
//!
//! let snap = handle.snapshot("api.internal").unwrap();
//! assert_eq!(snap.state(), State::Open);
//! # Ok(())
//! # }
//! ```
//!
//! # What counts as a failure
//!
//! Errors of the inner service, judged by the crate's one classifier
//! ([`Classifier`](crate::Classifier), replaceable with [`Builder::classifier`]), except local
//! rejections ([`Fault::is_local_rejection`](crate::Fault::is_local_rejection)), which are
//! not samples. Upstream 502, 503 and 504 responses (configurable; 500 is opt-in), and
//! trailers-only gRPC answers whose `grpc-status` is `UNAVAILABLE` (configurable). Everything
//! else, 4xx included, is a success. A call whose future is dropped is not a sample, and a
//! half-open probe slot it held is given back.
//!
//! An attempt cut short by a deadline **the caller set** (an incoming `grpc-timeout`, or
//! the deadline's configured header, earlier than the gateway's own timeout) is not a sample
//! either: otherwise any caller sending tiny deadlines could open the circuit of a healthy
//! upstream for everybody. The error says so ([`DeadlineExceeded::is_from_caller`]): inside
//! [`Upstream`](crate::Upstream), and in a stack composed by hand where a
//! [`DeadlineLayer`](crate::DeadlineLayer) sits above the breaker and an
//! [`AttemptTimeout`](crate::AttemptTimeout) below it (the design's order), which ends the
//! attempt at that deadline. The gateway's own deadline does count, so that an upstream that
//! hangs opens the circuit even with a long attempt timeout.
//!
//! Inside [`Upstream`](crate::Upstream), a `grpc-status` is read only in the answer to a gRPC
//! call (a request whose `content-type` is `application/grpc…`): on the answer to a plain
//! HTTP request it is just a header.
//!
//! [`DeadlineExceeded::is_from_caller`]: crate::deadline::DeadlineExceeded::is_from_caller
//!
//! # Errors
//!
//! `Error = BoxError`: the inner service's error, or [`CircuitOpen`]
//! carrying the time until the next probe.
//!
//! # Readiness
//!
//! `poll_ready` is the inner service's. The breaker refuses in `call`, never by holding back
//! readiness: axum drives readiness inside `call`, and a breaker that withholds `poll_ready`
//! turns into a silent queue.
//!
//! # Ordering
//!
//! Inside the retry (each attempt is one sample; with keyed breakers a retry can land on a
//! healthy key), outside the attempt timeout (a timed-out attempt is a failure).
//!
//! # Operators and health endpoints
//!
//! [`CircuitBreakerLayer::handle`] gives a cloneable [`BreakerHandle`]: force every circuit
//! open, disable breaking, return to automatic, and read a [`Snapshot`] per key.
//!
//! # Cost
//!
//! A closed breaker admits with one atomic load. A success is one uncontended atomic add on
//! this thread's stripe of the window (and, every 64 successes of a stripe, one clock read to
//! file them under a time bucket: filed late, they can only look more recent, so the failure
//! rate is never overstated). A failure reads the clock and sums the stripes. The key lookup
//! is a thread-local comparison with the last key this thread used, else this stripe's own
//! read lock. Each call clones one reference count that only its stripe touches. No
//! allocation per call; nothing shared between cores is written on the happy path.
//!
//! Open times are kept at a 4 ms granularity.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tower_service::Service;

pub mod error;
pub mod future;
mod keyed;
mod layer;
mod listener;
mod state;
mod window;

pub use self::keyed::{RequestHead, NO_KEY, OVERFLOW_KEY};
pub use self::layer::{Builder, CircuitBreakerLayer};
pub use self::listener::{Reason, State, Transition};

use self::error::CircuitOpen;
pub(crate) use self::future::Permit;
use self::future::ResponseFuture;
use self::keyed::Registry;
use self::listener::emit;
use self::state::Core;
use crate::stripe::Handle;
use crate::BoxError;

const AUTO: u8 = 0;
const FORCED_OPEN: u8 = 1;
const DISABLED: u8 = 2;

/// State shared by a layer, its services and their clones.
#[derive(Debug)]
pub(crate) struct Shared {
    mode: AtomicU8,
    registry: Registry,
}

impl Shared {
    pub(crate) fn new(registry: Registry) -> Shared {
        Shared {
            mode: AtomicU8::new(AUTO),
            registry,
        }
    }

    /// Lets a call through or refuses it: `Ok(None)` while the breakers are disabled (the
    /// call is not counted), `Ok(Some(permit))` when admitted, `Err` when refused.
    #[inline]
    pub(crate) fn admit<B>(&self, req: &Request<B>) -> Result<Option<Permit>, CircuitOpen> {
        let mode = self.mode.load(Relaxed);
        if mode != AUTO {
            // The key the request would have gone by: an operator who switched the breakers
            // still reads in the span which upstream a refused request was for.
            if tracing::enabled!(tracing::Level::DEBUG) {
                record_key(&self.registry.key(req));
            }
            if mode == DISABLED {
                return Ok(None);
            }
            return Err(CircuitOpen::new(self.registry.config.open_base));
        }
        let pin = self.registry.pin(req);
        if tracing::enabled!(tracing::Level::DEBUG) {
            record_key(&pin.core.key);
        }
        let admit = pin.core.try_acquire()?;
        Ok(Some(Permit::new(pin, admit)))
    }
}

/// Records a request's breaker key into its span, when there is one with the field
/// (`Upstream`'s).
fn record_key(key: &str) {
    tracing::Span::current().record("breaker_key", key);
}

/// Per-upstream circuit breaking; see the [module docs](self).
#[derive(Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    shared: Handle<Arc<Shared>>,
}

impl<S> CircuitBreaker<S> {
    /// Wraps `inner` with a breaker of `layer`'s (sharing its state).
    pub fn new(inner: S, layer: &CircuitBreakerLayer) -> Self {
        CircuitBreaker {
            inner,
            shared: layer.service_handle(),
        }
    }

    /// A handle on the breakers: operator modes and snapshots.
    pub fn handle(&self) -> BreakerHandle {
        BreakerHandle {
            shared: self.shared.get().clone(),
        }
    }

    inner_accessors!("service", S);
}

impl<S: fmt::Debug> fmt::Debug for CircuitBreaker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("keys", &self.shared.get().registry.len())
            .finish()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for CircuitBreaker<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        match self.shared.get().admit(&req) {
            Ok(permit) => ResponseFuture::called(self.inner.call(req), permit),
            Err(open) => ResponseFuture::refused(open),
        }
    }
}

/// Operator switches and snapshots for the breakers of one [`CircuitBreakerLayer`]. Cheap to
/// clone; every clone acts on the same breakers.
#[derive(Clone)]
pub struct BreakerHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for BreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerHandle")
            .field("mode", &self.mode())
            .field("keys", &self.shared.registry.len())
            .finish()
    }
}

impl BreakerHandle {
    /// Opens every circuit until [`automatic`](Self::automatic) or [`disable`](Self::disable):
    /// every call is refused with `CircuitOpen` (its retry-after is the base open duration).
    pub fn force_open(&self) {
        self.set_mode(FORCED_OPEN);
    }

    /// Turns breaking off: every call goes through and nothing is counted.
    pub fn disable(&self) {
        self.set_mode(DISABLED);
    }

    /// Back to automatic breaking, each breaker in the state it was left in.
    pub fn automatic(&self) {
        self.set_mode(AUTO);
    }

    /// The operator mode: [`State::ForcedOpen`], [`State::Disabled`], or `None` when
    /// breaking is automatic.
    pub fn mode(&self) -> Option<State> {
        mode_state(self.shared.mode.load(Relaxed))
    }

    fn set_mode(&self, mode: u8) {
        let old = self.shared.mode.swap(mode, Relaxed);
        if old != mode {
            let to = mode_state(mode).unwrap_or(State::Closed);
            let from = mode_state(old).unwrap_or(State::Closed);
            emit(
                self.shared.registry.config.listener.as_ref(),
                Transition {
                    key: "*",
                    from,
                    to,
                    reason: Reason::Operator,
                },
            );
        }
    }

    /// The breaker of `key` (an authority such as `api.internal:8080`, [`NO_KEY`] or
    /// [`OVERFLOW_KEY`]), if it exists.
    pub fn snapshot(&self, key: &str) -> Option<Snapshot> {
        let core = self.shared.registry.core(key)?;
        Some(self.snap(&core))
    }

    /// Every breaker: keyed ones in key order, then [`NO_KEY`] and [`OVERFLOW_KEY`].
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.shared
            .registry
            .cores()
            .iter()
            .map(|c| self.snap(c))
            .collect()
    }

    fn snap(&self, core: &Core) -> Snapshot {
        let now = core.now_ms();
        let totals = core.totals(now);
        let mode = mode_state(self.shared.mode.load(Relaxed));
        Snapshot {
            key: core.key.to_string(),
            state: mode.unwrap_or_else(|| core.state()),
            calls: totals.calls,
            failures: totals.failures,
            consecutive_failures: core.consecutive_failures(),
            probes_in_flight: core.probes_in_flight(),
            until_probe: core.until_probe(now),
        }
    }
}

fn mode_state(mode: u8) -> Option<State> {
    match mode {
        FORCED_OPEN => Some(State::ForcedOpen),
        DISABLED => Some(State::Disabled),
        _ => None,
    }
}

/// One breaker at one moment, for health endpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    key: String,
    state: State,
    calls: u64,
    failures: u64,
    consecutive_failures: u32,
    probes_in_flight: u32,
    until_probe: Option<Duration>,
}

impl Snapshot {
    /// The breaker's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Its state (the operator's mode, when one is set).
    pub fn state(&self) -> State {
        self.state
    }

    /// Calls in the window. While open or half-open, the window holds the calls that opened
    /// the circuit; it restarts empty when the circuit closes.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// Failures in the window.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Failures over calls in the window; `None` with no calls.
    pub fn failure_rate(&self) -> Option<f64> {
        (self.calls > 0).then(|| self.failures as f64 / self.calls as f64)
    }

    /// Failures in a row, while closed.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Probes in flight, while half-open.
    pub fn probes_in_flight(&self) -> u32 {
        self.probes_in_flight
    }

    /// Time until the next probe may go through, while open.
    pub fn time_until_probe(&self) -> Option<Duration> {
        self.until_probe
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync + 'static>() {}
    is::<CircuitBreakerLayer>();
    is::<BreakerHandle>();
    is::<CircuitBreaker<tower::util::BoxCloneSyncService<Request<()>, Response<()>, BoxError>>>();
    is::<ResponseFuture<futures_util::future::Ready<Result<Response<()>, BoxError>>>>();
    is::<Snapshot>();
}
