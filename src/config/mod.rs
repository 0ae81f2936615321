//! The whole stack from a configuration file (feature `serde`): [`UpstreamConfig`] is what
//! [`Upstream::builder()`](crate::Upstream::builder) can be told, as a serde type, read from
//! TOML, YAML, JSON or anything serde reads, with durations written like `"250ms"`.
//!
//! ```
//! use tower_upstream::config::UpstreamConfig;
//!
//! let config: UpstreamConfig = toml::from_str(r#"
//!     concurrency_limit = 256
//!
//!     [map_faults]
//!     gateway_name = "edge"
//!
//!     [deadline]
//!     timeout = "5s"
//!
//!     [retry]
//!     max_attempts = 2
//!     budget = { ratio = 0.1, min_per_second = 5 }
//!
//!     [breaker]
//!     enabled = false
//! "#)?;
//! let layer = config.build()?; // an `UpstreamLayer`, as `Upstream::builder().build()` makes
//! assert!(layer.breaker_handle().is_none());
//! assert_eq!(layer.retry_budget().unwrap().ratio(), 0.1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Every setting is optional: what a file leaves out has the builder's default (an empty
//! file is [`UpstreamLayer::new()`](crate::UpstreamLayer::new)). Unknown fields are errors, so
//! that a typo is not silently ignored. The [guide](crate::guide::config) lists every setting.
//!
//! # Errors
//!
//! [`build`](UpstreamConfig::build) checks the settings with the layers' own builders, so a
//! file is held to the same rules as code, and never panics. A [`ConfigError`] names the
//! setting by its path in the file and shows the bad value:
//!
//! ```
//! # use tower_upstream::config::UpstreamConfig;
//! let config: UpstreamConfig = toml::from_str("[retry.budget]\nratio = 11.0")?;
//! let err = config.build().unwrap_err();
//! assert_eq!(err.field(), "retry.budget.ratio");
//! assert_eq!(err.to_string(), "invalid retry.budget.ratio: must be in (0, 10] (got 11)");
//!
//! // Configurations in a list of your own: say which one.
//! let err = err.in_field("routes[2]");
//! assert_eq!(err.field(), "routes[2].retry.budget.ratio");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Errors in the file itself (a wrong type, an unknown field, a bad duration) come from the
//! format's deserializer. To have them name the setting's path too, deserialize through
//! [`serde_path_to_error`](https://docs.rs/serde_path_to_error):
//!
//! ```
//! # use tower_upstream::config::UpstreamConfig;
//! let text = "[retry.backoff]\nbase = \"5 parsecs\"";
//! let err = serde_path_to_error::deserialize::<_, UpstreamConfig>(toml::Deserializer::parse(text)?)
//!     .unwrap_err();
//! assert_eq!(err.path().to_string(), "retry.backoff.base");
//! assert!(err.to_string().contains(r#"invalid duration "5 parsecs": no unit"#));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod names;
mod sections;

pub mod duration;

pub use self::sections::{
    AttemptTimeoutConfig, BackoffConfig, BackoffKind, BodyFormat, BreakerConfig, BreakerKey,
    BreakerMode, BudgetConfig, DeadlineConfig, DeadlineHeader, MapFaultsConfig, RetryConfig,
    TimeWindow,
};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::fault::Classifier;
use crate::upstream::{Upstream, UpstreamBuilder, UpstreamLayer};

/// The whole stack's configuration, as a file says it; [`build`](Self::build) makes the
/// [`UpstreamLayer`]. See the [module docs](self) and the [guide](crate::guide::config).
///
/// Its fields are public, so that code can adjust what a file says; it is
/// `#[non_exhaustive]`, so start from [`UpstreamConfig::default()`] (every default) or a
/// deserialized value.
///
/// ```
/// use std::time::Duration;
/// use tower_upstream::config::UpstreamConfig;
///
/// let mut config = UpstreamConfig::default();
/// config.deadline.timeout = Some(Duration::from_secs(5));
/// config.retry.enabled = Some(false);
/// let layer = config.build()?;
/// assert!(layer.retry_budget().is_none());
/// # Ok::<(), tower_upstream::ConfigError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct UpstreamConfig {
    /// How faults are answered (always on).
    #[serde(skip_serializing_if = "is_default")]
    pub map_faults: MapFaultsConfig,
    /// The request's overall deadline (default 30 s).
    #[serde(skip_serializing_if = "is_default")]
    pub deadline: DeadlineConfig,
    /// At most this many requests in flight, the rest answered 503 at once (default: no
    /// limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency_limit: Option<usize>,
    /// Retries (default 3 attempts, with a budget).
    #[serde(skip_serializing_if = "is_default")]
    pub retry: RetryConfig,
    /// Circuit breaking (default on, per authority).
    #[serde(skip_serializing_if = "is_default")]
    pub breaker: BreakerConfig,
    /// The timeout of each attempt (default 10 s).
    #[serde(skip_serializing_if = "is_default")]
    pub attempt_timeout: AttemptTimeoutConfig,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

impl UpstreamConfig {
    /// Checks the settings and makes the layer, with its breakers, budget and limit, as
    /// [`UpstreamBuilder::build`] does.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] whose [`field`](ConfigError::field) is the bad setting's path
    /// (`retry.budget.ratio`, `breaker.failure_statuses[1]`) and whose message shows the
    /// bad value.
    pub fn build(&self) -> Result<UpstreamLayer, ConfigError> {
        self.builder(None)?.build()
    }

    /// The [`UpstreamBuilder`] this configuration stands for, its layers checked and made,
    /// for code to change what a file cannot say: replace a part with a layer of your own
    /// (a breaker with a [`key_fn`](crate::breaker::Builder::key_fn) or a listener, a retry
    /// with another policy) and keep the rest of the file.
    ///
    /// The layers are made here, with the built-in classifier: a
    /// [`classifier`](UpstreamBuilder::classifier) set on the builder afterwards reaches
    /// none of them; use [`build_with_classifier`](Self::build_with_classifier) instead.
    ///
    /// ```
    /// use tower_upstream::config::UpstreamConfig;
    /// use tower_upstream::CircuitBreakerLayer;
    ///
    /// let config: UpstreamConfig = toml::from_str("deadline.timeout = \"5s\"")?;
    /// let breaker = CircuitBreakerLayer::builder()
    ///     .on_transition(|t| eprintln!("{t:?}"))
    ///     .build()?;
    /// let layer = config.to_builder()?.breaker(breaker).build()?;
    /// # drop(layer);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn to_builder(&self) -> Result<UpstreamBuilder, ConfigError> {
        self.builder(None)
    }

    /// [`build`](Self::build), with a classifier of your own (rules for your errors) for
    /// the fault mapper, the retry and the breaker.
    pub fn build_with_classifier(
        &self,
        classifier: Classifier,
    ) -> Result<UpstreamLayer, ConfigError> {
        self.builder(Some(&classifier))?.build()
    }

    fn builder(&self, classifier: Option<&Classifier>) -> Result<UpstreamBuilder, ConfigError> {
        let mut b = Upstream::builder().map_faults(self.map_faults.layer(classifier)?);
        b = match self.deadline.layer()? {
            Some(layer) => b.deadline_layer(layer),
            None => b.no_deadline(),
        };
        if let Some(max) = self.concurrency_limit {
            b = b.concurrency_limit(max);
        }
        b = match self.retry.layer(classifier)? {
            Some(layer) => b.retry(layer),
            None => b.no_retry(),
        };
        b = match self.breaker.layer(classifier)? {
            Some(layer) => b.breaker(layer),
            None => b.no_breaker(),
        };
        b = match self.attempt_timeout.layer()? {
            Some(layer) => b.attempt_timeout_layer(layer),
            None => b.no_attempt_timeout(),
        };
        Ok(b)
    }
}
