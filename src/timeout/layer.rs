use std::time::Duration;

use tower_layer::Layer;

use super::AttemptTimeout;
use crate::error::ConfigError;

/// Applies an [`AttemptTimeout`] to services. See the [module docs](super).
#[derive(Debug, Clone)]
pub struct AttemptTimeoutLayer {
    timeout: Duration,
    propagate: bool,
}

impl AttemptTimeoutLayer {
    /// A per-attempt timeout of `timeout`, propagated to gRPC upstreams. A zero `timeout`
    /// fails every attempt as soon as it waits; [`AttemptTimeoutLayer::builder`] rejects it
    /// instead.
    pub fn new(timeout: Duration) -> Self {
        AttemptTimeoutLayer {
            timeout,
            propagate: true,
        }
    }

    /// The settings, for `Upstream`, which runs the timeout in its own future.
    pub(crate) fn config(&self) -> super::Config {
        super::Config {
            timeout: self.timeout,
            propagate: self.propagate,
        }
    }

    /// A builder for the other settings.
    pub fn builder() -> AttemptTimeoutBuilder {
        AttemptTimeoutBuilder {
            timeout: None,
            propagate: true,
        }
    }
}

impl<S> Layer<S> for AttemptTimeoutLayer {
    type Service = AttemptTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AttemptTimeout {
            inner,
            config: self.config(),
        }
    }
}

/// Builds an [`AttemptTimeoutLayer`]; see [`AttemptTimeoutLayer::builder`].
///
/// ```
/// use std::time::Duration;
/// use tower_upstream::timeout::AttemptTimeoutLayer;
///
/// let layer = AttemptTimeoutLayer::builder()
///     .timeout(Duration::from_secs(2))
///     .propagate(false)
///     .build()
///     .unwrap();
/// # let _ = layer;
/// assert!(AttemptTimeoutLayer::builder().build().is_err()); // no timeout
/// ```
#[derive(Debug, Clone)]
pub struct AttemptTimeoutBuilder {
    timeout: Option<Duration>,
    propagate: bool,
}

impl AttemptTimeoutBuilder {
    /// The longest one attempt may wait for a response head (required, > 0).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Whether gRPC requests leave with a `grpc-timeout` of the attempt's limit (default:
    /// yes).
    pub fn propagate(mut self, propagate: bool) -> Self {
        self.propagate = propagate;
        self
    }

    /// The layer, or what is wrong with the configuration.
    pub fn build(self) -> Result<AttemptTimeoutLayer, ConfigError> {
        match self.timeout {
            None => Err(ConfigError::new("attempt_timeout.timeout", "required")),
            Some(t) if t.is_zero() => Err(ConfigError::new(
                "attempt_timeout.timeout",
                format!("must be > 0 (got {t:?})"),
            )),
            Some(timeout) => Ok(AttemptTimeoutLayer {
                timeout,
                propagate: self.propagate,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors() {
        let err = AttemptTimeoutLayer::builder()
            .timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid attempt_timeout.timeout: must be > 0 (got 0ns)"
        );
        assert!(AttemptTimeoutLayer::builder().build().is_err());
    }
}
