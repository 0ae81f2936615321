use std::fmt;
use std::time::Duration;

use http::header::HeaderName;
use tower_layer::Layer;

use super::{Config, Deadline, HeaderUnit};
use crate::error::ConfigError;

/// Applies a [`Deadline`] to services. See the [module docs](super).
#[derive(Clone)]
pub struct DeadlineLayer {
    config: Config,
}

impl DeadlineLayer {
    /// A deadline of `timeout` for every request, capped by an incoming `grpc-timeout` and
    /// propagated to gRPC upstreams. A zero `timeout` fails every request at once;
    /// [`DeadlineLayer::builder`] rejects it instead.
    pub fn new(timeout: Duration) -> Self {
        DeadlineLayer {
            config: Config::new(timeout),
        }
    }

    /// A builder for the other settings.
    pub fn builder() -> DeadlineBuilder {
        DeadlineBuilder::default()
    }

    /// What the layer does, for `Upstream`, which applies it itself.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The same layer, but the deadline reaches the layers below through [`super::cover`]
    /// instead of a `RequestDeadline` extension: only for stacks where every layer below
    /// that needs it is the crate's own and called synchronously (`Upstream`).
    pub(crate) fn without_extension(mut self) -> Self {
        self.config.extension = false;
        self
    }
}

impl fmt::Debug for DeadlineLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineLayer")
            .field("timeout", &self.config.timeout)
            .field("grpc_timeout", &self.config.grpc_timeout)
            .field("header", &self.config.header)
            .field("propagate", &self.config.propagate)
            .finish()
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Builds a [`DeadlineLayer`]; see [`DeadlineLayer::builder`].
///
/// ```
/// use std::time::Duration;
/// use tower_upstream::deadline::{DeadlineLayer, HeaderUnit};
///
/// let layer = DeadlineLayer::builder()
///     .timeout(Duration::from_secs(30))
///     .header("x-envoy-upstream-rq-timeout-ms", HeaderUnit::Milliseconds)
///     .build()
///     .unwrap();
/// # let _ = layer;
/// ```
pub struct DeadlineBuilder {
    timeout: Option<Duration>,
    grpc_timeout: bool,
    header: Option<Result<(HeaderName, HeaderUnit), String>>,
    propagate: bool,
}

impl Default for DeadlineBuilder {
    fn default() -> Self {
        DeadlineBuilder {
            timeout: None,
            grpc_timeout: true,
            header: None,
            propagate: true,
        }
    }
}

impl fmt::Debug for DeadlineBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineBuilder")
            .field("timeout", &self.timeout)
            .field("grpc_timeout", &self.grpc_timeout)
            .field("header", &self.header)
            .field("propagate", &self.propagate)
            .finish()
    }
}

impl DeadlineBuilder {
    /// The longest a request may take (must be > 0). Without one, only requests that carry
    /// a `grpc-timeout` or the configured [`header`](Self::header) get a deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Whether an incoming `grpc-timeout` caps the deadline (default: yes). A malformed
    /// value is ignored with a `debug` event.
    pub fn grpc_timeout(mut self, honour: bool) -> Self {
        self.grpc_timeout = honour;
        self
    }

    /// A request header whose value, a whole number of `unit`s (1 to 9 ASCII digits), caps
    /// the deadline, like `request-timeout: 5`. A malformed value is ignored with a `debug`
    /// event. When [`propagate`](Self::propagate) is on, the header is also set on outgoing
    /// requests to the time that remains (rounded up to the unit), and each retry is told what
    /// is left then: by [`Upstream`](crate::Upstream), or by a [`Retry`](crate::Retry)
    /// composed by hand below this layer (with two such layers, each setting its own header,
    /// the retry lowers the inner one's).
    pub fn header<K>(mut self, name: K, unit: HeaderUnit) -> Self
    where
        HeaderName: TryFrom<K>,
        K: fmt::Debug,
    {
        let shown = format!("{name:?}");
        self.header = Some(
            HeaderName::try_from(name)
                .map(|name| (name, unit))
                .map_err(|_| format!("not a valid header name (got {shown})")),
        );
        self
    }

    /// Whether outgoing requests carry the remaining time (default: yes): gRPC requests as
    /// `grpc-timeout`, every request as the configured [`header`](Self::header), if any.
    pub fn propagate(mut self, propagate: bool) -> Self {
        self.propagate = propagate;
        self
    }

    /// The layer, or what is wrong with the configuration.
    pub fn build(self) -> Result<DeadlineLayer, ConfigError> {
        if let Some(t) = self.timeout {
            if t.is_zero() {
                return Err(ConfigError::new(
                    "deadline.timeout",
                    format!("must be > 0 (got {t:?})"),
                ));
            }
        }
        let header = match self.header {
            None => None,
            Some(Err(msg)) => return Err(ConfigError::new("deadline.header", msg)),
            Some(Ok((name, _))) if name == crate::grpc::GRPC_TIMEOUT => {
                return Err(ConfigError::new(
                    "deadline.header",
                    "grpc-timeout has its own codec: use `grpc_timeout(true)`",
                ))
            }
            Some(Ok(header)) => Some(header),
        };
        if self.timeout.is_none() && !self.grpc_timeout && header.is_none() {
            return Err(ConfigError::new(
                "deadline.timeout",
                "required when neither grpc-timeout nor a header sets the deadline",
            ));
        }
        Ok(DeadlineLayer {
            config: Config {
                timeout: self.timeout,
                grpc_timeout: self.grpc_timeout,
                header,
                propagate: self.propagate,
                extension: true,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors() {
        let err = DeadlineLayer::builder()
            .timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid deadline.timeout: must be > 0 (got 0ns)"
        );
        let err = DeadlineLayer::builder()
            .timeout(Duration::from_secs(1))
            .header("bad header", HeaderUnit::Seconds)
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid deadline.header: not a valid header name (got \"bad header\")"
        );
        let err = DeadlineLayer::builder()
            .header("grpc-timeout", HeaderUnit::Seconds)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "deadline.header");
        let err = DeadlineLayer::builder()
            .grpc_timeout(false)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "deadline.timeout");
        // Header-only deadlines are fine.
        assert!(DeadlineLayer::builder().build().is_ok());
    }
}
