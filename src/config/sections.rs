//! One configuration struct per part of the stack, each made into its layer through the
//! layer's own builder, so that the rules (and the error messages) live in one place.

use std::borrow::Cow;
use std::time::Duration;

use http::{HeaderName, StatusCode};
use serde::{Deserialize, Serialize};

use super::names::header_unit;
use crate::breaker::{self, CircuitBreakerLayer};
use crate::deadline::{DeadlineBuilder, DeadlineLayer, HeaderUnit};
use crate::error::ConfigError;
use crate::fault::Classifier;
use crate::grpc::Code;
use crate::map_faults::{MapFaultsLayer, MapFaultsLayerBuilder};
use crate::retry::{
    Backoff, DefaultPolicy, RetryBudget, RetryBudgetBuilder, RetryLayer, RetryLayerBuilder,
};
use crate::timeout::{AttemptTimeoutBuilder, AttemptTimeoutLayer};
use crate::upstream::{DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_DEADLINE};

/// `[map_faults]`: how faults are answered; see
/// [`MapFaultsLayerBuilder`](crate::map_faults::MapFaultsLayerBuilder). Always on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MapFaultsConfig {
    /// The gateway's name in `Proxy-Status` (default `tower-upstream`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_name: Option<String>,
    /// The body of fault answers (default `problem_json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<BodyFormat>,
    /// Show the error's text to clients (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expose_details: Option<bool>,
    /// The HTTP status for errors nothing recognised, a 5xx (default 502).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unclassified_status: Option<u16>,
    /// The gRPC status for errors nothing recognised, not `OK` (default `UNAVAILABLE`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unclassified_grpc_code: Option<Code>,
    /// Replace the bodies of the upstream's own 5xx answers (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite_upstream_5xx: Option<bool>,
}

/// The body of a fault answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BodyFormat {
    /// `application/problem+json` (RFC 9457), `"problem_json"`.
    ProblemJson,
    /// One line of `text/plain`, `"plain_text"`.
    PlainText,
}

impl MapFaultsConfig {
    pub(super) fn layer(
        &self,
        classifier: Option<&Classifier>,
    ) -> Result<MapFaultsLayer, ConfigError> {
        let mut b = MapFaultsLayer::builder();
        if let Some(name) = &self.gateway_name {
            b = b.gateway_name(name.clone());
        }
        b = match self.body {
            Some(BodyFormat::PlainText) => b.plain_text(),
            Some(BodyFormat::ProblemJson) | None => b.problem_json(),
        };
        b = set(
            b,
            self.expose_details,
            MapFaultsLayerBuilder::expose_details,
        );
        if let Some(status) = self.unclassified_status {
            b = b.unclassified_status(status_code("map_faults.unclassified_status", status)?);
        }
        b = set(
            b,
            self.unclassified_grpc_code,
            MapFaultsLayerBuilder::unclassified_grpc_code,
        );
        b = set(
            b,
            self.rewrite_upstream_5xx,
            MapFaultsLayerBuilder::rewrite_upstream_5xx,
        );
        if let Some(c) = classifier {
            b = b.classifier(c.clone());
        }
        b.build()
    }
}

/// `[deadline]`: the request's overall deadline; see
/// [`DeadlineBuilder`](crate::deadline::DeadlineBuilder).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct DeadlineConfig {
    /// `false` turns the deadline off (default true); the other settings are then unused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// The longest a request may take (default 30 s).
    #[serde(
        with = "super::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Whether an incoming `grpc-timeout` caps the deadline (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_timeout: Option<bool>,
    /// A request header that caps the deadline, like `request-timeout` in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<DeadlineHeader>,
    /// Whether outgoing requests carry the remaining time (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub propagate: Option<bool>,
    /// Whether the wrapped service sees the deadline as a
    /// [`RequestDeadline`](crate::deadline::RequestDeadline) extension (default false: the
    /// deadline travels inside the stack without one, as with
    /// [`UpstreamBuilder::deadline`](crate::upstream::UpstreamBuilder::deadline), which spares each
    /// request the extension's allocations; a handler that reads the time left needs true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extension: Option<bool>,
}

/// `header = { name = "request-timeout", unit = "s" }`: a header that caps the deadline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DeadlineHeader {
    /// The header's name.
    pub name: String,
    /// Its unit: `"s"` (or `"seconds"`) or `"ms"` (or `"milliseconds"`).
    #[serde(with = "header_unit")]
    pub unit: HeaderUnit,
}

impl DeadlineHeader {
    /// A header `name` counting in `unit`s.
    pub fn new(name: impl Into<String>, unit: HeaderUnit) -> Self {
        DeadlineHeader {
            name: name.into(),
            unit,
        }
    }
}

impl DeadlineConfig {
    pub(super) fn layer(&self) -> Result<Option<DeadlineLayer>, ConfigError> {
        if self.enabled == Some(false) {
            return Ok(None);
        }
        let mut b = DeadlineLayer::builder().timeout(self.timeout.unwrap_or(DEFAULT_DEADLINE));
        b = set(b, self.grpc_timeout, DeadlineBuilder::grpc_timeout);
        if let Some(h) = &self.header {
            b = b.header(header_name("deadline.header.name", &h.name)?, h.unit);
        }
        b = set(b, self.propagate, DeadlineBuilder::propagate);
        let layer = b.build()?;
        Ok(Some(if self.extension == Some(true) {
            layer
        } else {
            layer.without_extension()
        }))
    }
}

/// `[retry]`: retries, their backoff and budget; see
/// [`RetryLayerBuilder`](crate::retry::RetryLayerBuilder) and
/// [`DefaultPolicy`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryConfig {
    /// `false` turns retries off (default true); the other settings are then unused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Attempts in total, the first included, 1 to 10 (default 3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The wait between attempts.
    #[serde(skip_serializing_if = "BackoffConfig::is_empty")]
    pub backoff: BackoffConfig,
    /// The longest `Retry-After` / `grpc-retry-pushback-ms` honoured (default 3 s).
    #[serde(
        with = "super::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub pushback_cap: Option<Duration>,
    /// Bytes of a request body recorded for replay (default 65536).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_limit: Option<usize>,
    /// The retry budget.
    #[serde(skip_serializing_if = "BudgetConfig::is_empty")]
    pub budget: BudgetConfig,
    /// `grpc-status` codes retried for idempotent calls (default `["UNAVAILABLE"]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_codes: Option<Vec<Code>>,
    /// Retry the `grpc_codes` for every gRPC call, marked idempotent or not (default false);
    /// errors that may have reached the upstream are still retried for idempotent calls only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_all_grpc_calls: Option<bool>,
}

/// `[retry.backoff]`; see [`Backoff`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BackoffConfig {
    /// `"full_jitter"` (the default), `"decorrelated_jitter"` or `"none"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<BackoffKind>,
    /// The base delay (default 25 ms).
    #[serde(
        with = "super::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub base: Option<Duration>,
    /// The longest delay (default 250 ms).
    #[serde(
        with = "super::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub cap: Option<Duration>,
}

/// The shape of the backoff; see [`Backoff`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BackoffKind {
    /// [`Backoff::full_jitter`].
    FullJitter,
    /// [`Backoff::decorrelated_jitter`].
    DecorrelatedJitter,
    /// [`Backoff::none`]: retry at once (no `base` or `cap`).
    None,
}

impl BackoffConfig {
    fn is_empty(&self) -> bool {
        *self == BackoffConfig::default()
    }

    fn backoff(&self) -> Result<Backoff, ConfigError> {
        let default = Backoff::default();
        let base = self.base.unwrap_or(default.base());
        let cap = self.cap.unwrap_or(default.cap());
        Ok(match self.kind {
            Some(BackoffKind::FullJitter) | None => Backoff::full_jitter(base, cap),
            Some(BackoffKind::DecorrelatedJitter) => Backoff::decorrelated_jitter(base, cap),
            Some(BackoffKind::None) => {
                for (field, value) in [("base", self.base), ("cap", self.cap)] {
                    if let Some(d) = value {
                        return Err(ConfigError::new(
                            format!("retry.backoff.{field}"),
                            format!(
                                "not used by kind \"none\" (got {})",
                                super::duration::format(d)
                            ),
                        ));
                    }
                }
                Backoff::none()
            }
        })
    }
}

/// `[retry.budget]`; see [`RetryBudget`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BudgetConfig {
    /// Retries allowed per first attempt, in (0, 10] (default 0.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Retries per second allowed whatever the traffic (default 10).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_per_second: Option<u32>,
    /// How long attempts are remembered, 1 s to 60 s (default 10 s).
    #[serde(
        with = "super::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub window: Option<Duration>,
}

impl BudgetConfig {
    fn is_empty(&self) -> bool {
        *self == BudgetConfig::default()
    }

    fn budget(&self) -> Result<RetryBudget, ConfigError> {
        let mut b = RetryBudget::builder();
        b = set(b, self.ratio, RetryBudgetBuilder::ratio);
        b = set(b, self.min_per_second, RetryBudgetBuilder::min_per_second);
        b = set(b, self.window, RetryBudgetBuilder::window);
        b.build()
    }
}

impl RetryConfig {
    /// The layer, or `None` when retries are off.
    pub(super) fn layer(
        &self,
        classifier: Option<&Classifier>,
    ) -> Result<Option<RetryLayer>, ConfigError> {
        if self.enabled == Some(false) {
            return Ok(None);
        }
        let mut policy = DefaultPolicy::new();
        if let Some(codes) = &self.grpc_codes {
            policy = policy.grpc_codes(failure_codes("retry.grpc_codes", codes)?);
        }
        if let Some(all) = self.retry_all_grpc_calls {
            policy = policy.retry_all_grpc_calls(all);
        }
        let mut b = RetryLayer::builder()
            .policy(policy)
            .backoff(self.backoff.backoff()?)
            .budget(self.budget.budget()?);
        b = set(b, self.max_attempts, RetryLayerBuilder::max_attempts);
        b = set(b, self.pushback_cap, RetryLayerBuilder::pushback_cap);
        b = set(b, self.body_limit, RetryLayerBuilder::body_limit);
        if let Some(c) = classifier {
            b = b.classifier(c.clone());
        }
        b.build().map(Some)
    }
}

/// `[breaker]`: circuit breaking; see [`Builder`](crate::breaker::Builder) for what each
/// setting does and its default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// `false` takes the breaker out of the stack (default true); the other settings are
    /// then unused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// The operator mode the breaker starts in (default `automatic`); it can be changed at
    /// run time with [`BreakerHandle`](crate::breaker::BreakerHandle).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<BreakerMode>,
    /// Judge the failure rate over the last this many calls (1 to 1,000,000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count_window: Option<u32>,
    /// Judge the failure rate over a time window (the default: 10 s in 10 buckets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_window: Option<TimeWindow>,
    /// Failure rate in (0, 1] that opens the circuit (default 0.5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<f64>,
    /// Calls the window must hold before the rate is judged (default 20).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_calls: Option<u32>,
    /// Failures in a row that open the circuit; 0 turns this off (default 5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// Successful calls at least this slow count as failures (default off).
    #[serde(
        with = "super::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub slow_call_threshold: Option<Duration>,
    /// Open time after the first trip (default 5 s).
    #[serde(
        with = "super::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub open_duration: Option<Duration>,
    /// Cap on the open time, which doubles on each trip (default 60 s).
    #[serde(
        with = "super::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_open_duration: Option<Duration>,
    /// Fraction in [0, 1) of the open time removed at random (default 0.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
    /// Whether an upstream's `Retry-After` may lengthen the open time (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub honor_retry_after: Option<bool>,
    /// Probes allowed in flight while half-open, 1 to 255 (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub half_open_probes: Option<u32>,
    /// Successful probes that close the circuit, 1 to 255 (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_successes: Option<u32>,
    /// Upstream 5xx statuses that count as failures (default `[502, 503, 504]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_statuses: Option<Vec<u16>>,
    /// `grpc-status` codes that count as failures (default `["UNAVAILABLE"]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_failure_codes: Option<Vec<Code>>,
    /// What a breaker is kept per (default `"authority"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<BreakerKey>,
    /// Most keys kept, at least 1 (default 1024).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<usize>,
    /// A key unused this long may be evicted (default 5 minutes).
    #[serde(
        with = "super::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<Duration>,
}

/// `time_window = { size = "10s", buckets = 10 }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TimeWindow {
    /// How far back the window reaches.
    #[serde(with = "super::duration")]
    pub size: Duration,
    /// How many buckets it is kept in, 1 to 1000, each at least 1 ms.
    pub buckets: u32,
}

impl TimeWindow {
    /// The last `size`, in `buckets` buckets.
    pub fn new(size: Duration, buckets: u32) -> Self {
        TimeWindow { size, buckets }
    }
}

/// The operator mode a breaker starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BreakerMode {
    /// Circuits open and close on their own (the default).
    Automatic,
    /// Every circuit is open: every call is refused with `CircuitOpen` (503), as by
    /// [`BreakerHandle::force_open`](crate::breaker::BreakerHandle::force_open).
    ForcedOpen,
    /// Breaking is off: every call goes through, nothing is counted, as by
    /// [`BreakerHandle::disable`](crate::breaker::BreakerHandle::disable).
    Disabled,
}

/// What a breaker is kept per: `key = "authority"`, `key = "single"`, or
/// `key = { header = "x-tenant" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BreakerKey {
    /// One breaker per request URI authority (the default).
    Authority,
    /// One breaker for every request.
    Single,
    /// One breaker per value of this request header; requests without it share the
    /// [`NO_KEY`](crate::breaker::NO_KEY) breaker.
    Header(String),
}

impl BreakerConfig {
    /// The layer, or `None` when the breaker is off.
    pub(super) fn layer(
        &self,
        classifier: Option<&Classifier>,
    ) -> Result<Option<CircuitBreakerLayer>, ConfigError> {
        if self.enabled == Some(false) {
            return Ok(None);
        }
        let mut b = CircuitBreakerLayer::builder();
        match (self.count_window, &self.time_window) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "breaker.count_window",
                    "set either count_window or time_window, not both",
                ))
            }
            (Some(calls), None) => b = b.count_window(calls),
            (None, Some(w)) => b = b.time_window(w.size, w.buckets),
            (None, None) => {}
        }
        b = set(b, self.failure_rate, breaker::Builder::failure_rate);
        b = set(b, self.min_calls, breaker::Builder::min_calls);
        b = set(
            b,
            self.consecutive_failures,
            breaker::Builder::consecutive_failures,
        );
        b = set(
            b,
            self.slow_call_threshold,
            breaker::Builder::slow_call_threshold,
        );
        b = set(b, self.open_duration, breaker::Builder::open_duration);
        b = set(
            b,
            self.max_open_duration,
            breaker::Builder::max_open_duration,
        );
        b = set(b, self.jitter, breaker::Builder::jitter);
        b = set(
            b,
            self.honor_retry_after,
            breaker::Builder::honor_retry_after,
        );
        b = set(b, self.half_open_probes, breaker::Builder::half_open_probes);
        b = set(b, self.probe_successes, breaker::Builder::probe_successes);
        if let Some(statuses) = &self.failure_statuses {
            let statuses = statuses
                .iter()
                .enumerate()
                .map(|(i, s)| status_code(&format!("breaker.failure_statuses[{i}]"), *s))
                .collect::<Result<Vec<_>, _>>()?;
            b = b.failure_statuses(statuses);
        }
        if let Some(codes) = &self.grpc_failure_codes {
            b = b.grpc_failure_codes(failure_codes("breaker.grpc_failure_codes", codes)?);
        }
        match &self.key {
            None | Some(BreakerKey::Authority) => {}
            Some(BreakerKey::Single) => b = b.single(),
            Some(BreakerKey::Header(name)) => {
                let name = header_name("breaker.key.header", name)?;
                b = b.key_fn(move |req| {
                    req.headers()
                        .get(&name)
                        .and_then(|v| v.to_str().ok())
                        .map(Cow::Borrowed)
                });
            }
        }
        b = set(b, self.max_keys, breaker::Builder::max_keys);
        b = set(b, self.idle_timeout, breaker::Builder::idle_timeout);
        if let Some(c) = classifier {
            b = b.classifier(c.clone());
        }
        let layer = b.build()?;
        match self.mode {
            None | Some(BreakerMode::Automatic) => {}
            Some(BreakerMode::ForcedOpen) => layer.handle().force_open(),
            Some(BreakerMode::Disabled) => layer.handle().disable(),
        }
        Ok(Some(layer))
    }
}

/// `[attempt_timeout]`: the timeout of each attempt; see
/// [`AttemptTimeoutBuilder`](crate::timeout::AttemptTimeoutBuilder).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AttemptTimeoutConfig {
    /// `false` turns the attempt timeout off (default true); the other settings are then
    /// unused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// The longest one attempt may wait for a response head (default 10 s).
    #[serde(
        with = "super::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Whether gRPC requests leave with a `grpc-timeout` of the attempt's limit (default
    /// true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub propagate: Option<bool>,
}

impl AttemptTimeoutConfig {
    /// The layer, or `None` when the attempt timeout is off.
    pub(super) fn layer(&self) -> Result<Option<AttemptTimeoutLayer>, ConfigError> {
        if self.enabled == Some(false) {
            return Ok(None);
        }
        let mut b =
            AttemptTimeoutLayer::builder().timeout(self.timeout.unwrap_or(DEFAULT_ATTEMPT_TIMEOUT));
        b = set(b, self.propagate, AttemptTimeoutBuilder::propagate);
        b.build().map(Some)
    }
}

/// gRPC codes that name failures: `OK` among them is a mistake, not a wish.
fn failure_codes(field: &str, codes: &[Code]) -> Result<Vec<Code>, ConfigError> {
    match codes.iter().position(|c| *c == Code::Ok) {
        Some(i) => Err(ConfigError::new(
            format!("{field}[{i}]"),
            "OK is not a failure (got \"OK\")",
        )),
        None => Ok(codes.to_vec()),
    }
}

fn status_code(field: &str, status: u16) -> Result<StatusCode, ConfigError> {
    StatusCode::from_u16(status).map_err(|_| {
        ConfigError::new(
            field.to_owned(),
            format!("not an HTTP status code (got {status})"),
        )
    })
}

fn header_name(field: &'static str, name: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::try_from(name)
        .map_err(|_| ConfigError::new(field, format!("not a valid header name (got {name:?})")))
}

/// `value`, if the file set it, through the builder's own setter.
fn set<B, T>(builder: B, value: Option<T>, setter: impl FnOnce(B, T) -> B) -> B {
    match value {
        Some(value) => setter(builder, value),
        None => builder,
    }
}
