//! The layer and its builder.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tower_layer::Layer;

use super::keyed::{default_stripes, KeyBy, Registry, RequestHead};
use super::listener::Transition;
use super::state::{Config, WindowConfig};

const MAX_OPEN: Duration = Duration::from_secs(24 * 3600);
use super::{BreakerHandle, CircuitBreaker, Shared};
use crate::fault::Classifier;
use crate::stripe::{Handle, Striped};
use crate::{grpc, ConfigError};

/// Applies [`CircuitBreaker`] to a service.
///
/// The breakers are made once, by [`Builder::build`] (or [`CircuitBreakerLayer::new`]), and
/// shared by every clone of the layer, every service it makes (every `layer()` call: axum
/// applies a layer once per route) and every clone of those services.
#[derive(Clone)]
pub struct CircuitBreakerLayer {
    pub(crate) shared: Arc<Shared>,
    /// The same, referenced per stripe by the services (so that their clones scale).
    striped: Arc<Striped<Arc<Shared>>>,
}

impl CircuitBreakerLayer {
    fn from_shared(shared: Shared) -> Self {
        let shared = Arc::new(shared);
        CircuitBreakerLayer {
            striped: Arc::new(Striped::new(shared.clone())),
            shared,
        }
    }

    /// The breakers' state as a service holds it.
    pub(crate) fn service_handle(&self) -> Handle<Arc<Shared>> {
        self.striped.handle()
    }
}

impl CircuitBreakerLayer {
    /// A layer with the default configuration (see [`Builder`]).
    pub fn new() -> Self {
        match Builder::default().build() {
            Ok(layer) => layer,
            // The defaults are valid; pinned by a test.
            Err(e) => unreachable!("default breaker configuration: {e}"),
        }
    }

    /// Starts a configuration from the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A handle on this layer's breakers: operator modes and snapshots.
    pub fn handle(&self) -> BreakerHandle {
        BreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

impl Default for CircuitBreakerLayer {
    fn default() -> Self {
        CircuitBreakerLayer::new()
    }
}

impl fmt::Debug for CircuitBreakerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("config", &self.shared.registry.config)
            .finish()
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker {
            inner,
            shared: self.service_handle(),
        }
    }
}

/// Configuration of a [`CircuitBreakerLayer`].
///
/// # Defaults, and why
///
/// - **Window**: time-based, the last 10 s in 10 buckets of 1 s. Ten seconds is long enough
///   to hold a meaningful number of calls at modest rates and short enough that the breaker
///   reacts within seconds. The time window is lock-free per core and is the one that scales;
///   [`count_window`](Builder::count_window) is exact but shares one cursor between cores.
/// - **Failure rate**: 50%, and only once the window holds **20 calls**: below that a rate is
///   noise (two failures out of three calls is not an outage).
/// - **Consecutive failures**: **5** in a row also trip, so a low-traffic upstream that is
///   plainly down (every call refused) is cut off without waiting for 20 calls.
/// - **Open time**: **5 s**, doubled on each consecutive trip, capped at **60 s**, shortened
///   by up to **20%** at random so that a fleet does not probe in lockstep; an upstream's
///   `Retry-After` on the failure that tripped it lengthens it (up to the cap).
/// - **Half-open**: **1** probe at a time, **1** success closes: the least load on an upstream
///   that may still be sick.
/// - **Failures**: every classified fault except local rejections (the breaker's own
///   `CircuitOpen`, local overload), and upstream **502, 503, 504** answers (gateways and
///   overloaded servers say so). 500 is often a bug hit by one request, not an outage, so it
///   is opt-in. 4xx are the client's doing and count as successes. gRPC trailers-only
///   answers with `grpc-status` **14 UNAVAILABLE** (gRPC's 503) count too.
/// - **Keys**: one breaker per request URI authority, at most **1024** keys; a key unused for
///   **5 minutes** may be evicted to make room; when the map is full and nothing is idle, new
///   keys share one overflow breaker ([`OVERFLOW_KEY`](super::OVERFLOW_KEY)) rather than grow
///   memory.
#[must_use]
pub struct Builder {
    window: WindowConfig,
    failure_rate: f64,
    min_calls: u32,
    consecutive_failures: u32,
    slow_call: Option<Duration>,
    open_base: Duration,
    open_max: Duration,
    jitter: f64,
    honor_retry_after: bool,
    probes: u32,
    probe_successes: u32,
    statuses: Vec<StatusCode>,
    grpc_codes: Vec<grpc::Code>,
    classifier: Classifier,
    listener: Option<super::listener::Listener>,
    max_keys: usize,
    idle_timeout: Duration,
    key_by: KeyBy,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            window: WindowConfig::Time {
                size: Duration::from_secs(10),
                buckets: 10,
            },
            failure_rate: 0.5,
            min_calls: 20,
            consecutive_failures: 5,
            slow_call: None,
            open_base: Duration::from_secs(5),
            open_max: Duration::from_secs(60),
            jitter: 0.2,
            honor_retry_after: true,
            probes: 1,
            probe_successes: 1,
            statuses: vec![
                StatusCode::BAD_GATEWAY,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::GATEWAY_TIMEOUT,
            ],
            grpc_codes: vec![grpc::Code::Unavailable],
            classifier: Classifier::new(),
            listener: None,
            max_keys: 1024,
            idle_timeout: Duration::from_secs(300),
            key_by: KeyBy::Authority,
        }
    }
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("window", &self.window)
            .field("failure_rate", &self.failure_rate)
            .field("min_calls", &self.min_calls)
            .field("consecutive_failures", &self.consecutive_failures)
            .field("key_by", &self.key_by)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// Judge the failure rate over the last `calls` calls (exact; 1 to 1,000,000). The
    /// cursor is shared by all cores, so prefer the time window for high request rates.
    pub fn count_window(mut self, calls: u32) -> Self {
        self.window = WindowConfig::Count(calls);
        self
    }

    /// Judge the failure rate over the last `size`, kept in `buckets` buckets (1 to 1000,
    /// each at least 1 ms). Default 10 s in 10 buckets.
    pub fn time_window(mut self, size: Duration, buckets: u32) -> Self {
        self.window = WindowConfig::Time { size, buckets };
        self
    }

    /// Failure rate in (0, 1] at or above which the circuit opens. Default 0.5.
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.failure_rate = rate;
        self
    }

    /// Calls the window must hold before the rate is judged (at least 1). Default 20.
    pub fn min_calls(mut self, calls: u32) -> Self {
        self.min_calls = calls;
        self
    }

    /// Failures in a row that open the circuit whatever the rate; 0 turns this off. Default 5.
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = n;
        self
    }

    /// Successful calls that took at least this long count as failures. Off by default (it
    /// costs a clock read when the call starts).
    pub fn slow_call_threshold(mut self, threshold: Duration) -> Self {
        self.slow_call = Some(threshold);
        self
    }

    /// Open time after the first trip. Default 5 s.
    pub fn open_duration(mut self, base: Duration) -> Self {
        self.open_base = base;
        self
    }

    /// Cap on the open time, which doubles on each consecutive trip. Default 60 s.
    pub fn max_open_duration(mut self, max: Duration) -> Self {
        self.open_max = max;
        self
    }

    /// Fraction in [0, 1) of the open time removed at random. Default 0.2.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Whether an upstream's `Retry-After` (or `grpc-retry-pushback-ms`) on the tripping
    /// failure may lengthen the open time, up to the cap. Default true.
    pub fn honor_retry_after(mut self, honor: bool) -> Self {
        self.honor_retry_after = honor;
        self
    }

    /// Probes allowed in flight while half-open (1 to 255). Default 1.
    pub fn half_open_probes(mut self, probes: u32) -> Self {
        self.probes = probes;
        self
    }

    /// Successful probes that close the circuit (1 to 255). Default 1.
    pub fn probe_successes(mut self, successes: u32) -> Self {
        self.probe_successes = successes;
        self
    }

    /// Upstream response statuses that count as failures, replacing the default 502, 503,
    /// 504. Only 5xx are accepted.
    pub fn failure_statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.statuses = statuses.into_iter().collect();
        self
    }

    /// `grpc-status` codes in a trailers-only response's headers that count as failures,
    /// replacing the default `UNAVAILABLE`. Empty turns gRPC status counting off.
    pub fn grpc_failure_codes(mut self, codes: impl IntoIterator<Item = grpc::Code>) -> Self {
        self.grpc_codes = codes.into_iter().collect();
        self
    }

    /// The classifier for errors of the inner service (with your own rules).
    pub fn classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = classifier;
        self
    }

    /// Called on every state change, after the `tracing` event. Keep it quick: it runs on
    /// the task whose call caused the change.
    pub fn on_transition<F>(mut self, listener: F) -> Self
    where
        F: Fn(&Transition<'_>) + Send + Sync + 'static,
    {
        self.listener = Some(Arc::new(listener));
        self
    }

    /// One breaker per request URI authority (the default).
    pub fn key_by_authority(mut self) -> Self {
        self.key_by = KeyBy::Authority;
        self
    }

    /// One breaker per key returned by `key`; `None` shares the [`NO_KEY`](super::NO_KEY)
    /// breaker. Return a borrowed key where you can: an owned one allocates per call.
    ///
    /// ```
    /// use std::borrow::Cow;
    /// use tower_upstream::breaker::CircuitBreakerLayer;
    ///
    /// let layer = CircuitBreakerLayer::builder()
    ///     .key_fn(|req| {
    ///         req.headers()
    ///             .get("x-tenant")
    ///             .and_then(|v| v.to_str().ok())
    ///             .map(Cow::Borrowed)
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # drop(layer);
    /// ```
    pub fn key_fn<F>(mut self, key: F) -> Self
    where
        F: for<'a> Fn(&RequestHead<'a>) -> Option<Cow<'a, str>> + Send + Sync + 'static,
    {
        self.key_by = KeyBy::Fn(Arc::new(key));
        self
    }

    /// One breaker for every request.
    pub fn single(mut self) -> Self {
        self.key_by = KeyBy::Single;
        self
    }

    /// Most keys kept (at least 1). Default 1024.
    pub fn max_keys(mut self, max: usize) -> Self {
        self.max_keys = max;
        self
    }

    /// A key unused this long may be evicted when the map is full (more than zero). A
    /// circuit still open is kept until its open time has passed. Default 5 minutes.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// Checks the configuration and makes the breakers' shared state.
    pub fn build(self) -> Result<CircuitBreakerLayer, ConfigError> {
        fn err(field: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::new(field, message)
        }
        match self.window {
            WindowConfig::Count(n) if !(1..=1_000_000).contains(&n) => {
                return Err(err(
                    "breaker.count_window",
                    format!("must be in 1..=1000000 calls (got {n})"),
                ))
            }
            WindowConfig::Time { size, buckets } => {
                if !(1..=1000).contains(&buckets) {
                    return Err(err(
                        "breaker.time_window",
                        format!("buckets must be in 1..=1000 (got {buckets})"),
                    ));
                }
                if size.as_millis() < u128::from(buckets) {
                    return Err(err(
                        "breaker.time_window",
                        format!("each bucket must be at least 1ms (got {size:?} / {buckets})"),
                    ));
                }
            }
            WindowConfig::Count(_) => {}
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err(err(
                "breaker.failure_rate",
                format!("must be in (0, 1] (got {})", self.failure_rate),
            ));
        }
        if self.min_calls == 0 {
            return Err(err("breaker.min_calls", "must be at least 1 (got 0)"));
        }
        if self.open_base.is_zero() {
            return Err(err(
                "breaker.open_duration",
                format!("must be more than zero (got {:?})", self.open_base),
            ));
        }
        if self.open_max < self.open_base || self.open_max > MAX_OPEN {
            return Err(err(
                "breaker.max_open_duration",
                format!(
                    "must be at least the open duration ({:?}) and at most a day (got {:?})",
                    self.open_base, self.open_max
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(err(
                "breaker.jitter",
                format!("must be in [0, 1) (got {})", self.jitter),
            ));
        }
        if !(1..=255).contains(&self.probes) {
            return Err(err(
                "breaker.half_open_probes",
                format!("must be in 1..=255 (got {})", self.probes),
            ));
        }
        if !(1..=255).contains(&self.probe_successes) {
            return Err(err(
                "breaker.probe_successes",
                format!("must be in 1..=255 (got {})", self.probe_successes),
            ));
        }
        let mut statuses = [0u64; 16];
        for s in &self.statuses {
            if !s.is_server_error() {
                return Err(err(
                    "breaker.failure_statuses",
                    format!("only 5xx statuses can count as failures (got {s})"),
                ));
            }
            let i = usize::from(s.as_u16());
            statuses[i / 64] |= 1 << (i % 64);
        }
        let grpc_codes = self
            .grpc_codes
            .iter()
            .fold(0u32, |acc, c| acc | 1 << c.as_i32());
        if self.max_keys == 0 {
            return Err(err("breaker.max_keys", "must be at least 1 (got 0)"));
        }
        if self.idle_timeout.is_zero() {
            // Zero would make every key evictable, busy ones too: their state would churn.
            return Err(err(
                "breaker.idle_timeout",
                "must be more than zero (got 0ns)",
            ));
        }
        let config = Arc::new(Config {
            window: self.window,
            failure_rate: self.failure_rate,
            min_calls: self.min_calls,
            consecutive_failures: self.consecutive_failures,
            slow_call: self.slow_call,
            open_base: self.open_base,
            open_max: self.open_max,
            jitter: self.jitter,
            honor_retry_after: self.honor_retry_after,
            probes: self.probes,
            probe_successes: self.probe_successes,
            statuses,
            grpc_codes,
            classifier: self.classifier,
            listener: self.listener,
            max_keys: self.max_keys,
            idle_timeout: self.idle_timeout,
            stripes: default_stripes(),
        });
        Ok(CircuitBreakerLayer::from_shared(Shared::new(
            Registry::new(config, self.key_by),
        )))
    }
}
