//! The crate's one configuration error.

use std::fmt;

/// A layer's builder was given a configuration that cannot work.
///
/// Returned by the `build()` methods of the layers' builders instead of a panic. It names the
/// field (`deadline.timeout`, `attempt_timeout.timeout`…) and says what is wrong with it.
///
/// ```
/// use std::time::Duration;
/// use tower_upstream::DeadlineLayer;
///
/// let err = DeadlineLayer::builder().timeout(Duration::ZERO).build().unwrap_err();
/// assert_eq!(err.field(), "deadline.timeout");
/// assert_eq!(err.to_string(), "invalid deadline.timeout: must be > 0 (got 0ns)");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    message: String,
}

impl ConfigError {
    /// A configuration error about `field`.
    pub(crate) fn new(field: &'static str, message: impl Into<String>) -> Self {
        ConfigError {
            field,
            message: message.into(),
        }
    }

    /// The configuration field that is wrong, as `layer.field`.
    pub fn field(&self) -> &str {
        self.field
    }

    /// What is wrong with it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}
