//! The crate's configuration error.

use std::fmt;

/// A builder was given a value it cannot work with.
///
/// Returned by `build()` on every builder of the crate, which never panic on configuration.
/// Names the field and says what was wrong:
/// `invalid breaker.failure_rate: must be in (0, 1] (got 1.5)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    message: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, message: impl Into<String>) -> Self {
        ConfigError {
            field,
            message: message.into(),
        }
    }

    /// The configuration field that was rejected, such as `breaker.failure_rate`.
    pub fn field(&self) -> &'static str {
        self.field
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}
