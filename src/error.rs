//! The crate's one configuration error.

use std::fmt;

/// A builder was given a value it cannot work with.
///
/// Builders of this crate never panic on configuration: `build()` returns this error,
/// naming the field and what is wrong with it.
///
/// ```
/// use tower_upstream::RetryBudget;
///
/// let err = RetryBudget::builder().ratio(0.0).build().unwrap_err();
/// assert_eq!(err.field(), "retry.budget.ratio");
/// assert_eq!(err.to_string(), "invalid retry.budget.ratio: must be in (0, 10] (got 0)");
/// ```
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

    /// The configuration field that was rejected, e.g. `retry.budget.ratio`.
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
