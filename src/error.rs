//! The crate's one configuration error.

use std::fmt;

/// A layer's configuration was invalid: `build()` says which field and why.
///
/// ```
/// use tower_upstream::map_faults::MapFaultsLayer;
///
/// let err = MapFaultsLayer::builder().gateway_name("bad\nname").build().unwrap_err();
/// assert_eq!(err.field(), "map_faults.gateway_name");
/// assert!(err.to_string().starts_with("invalid map_faults.gateway_name: "));
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

    /// The field that was invalid, as `layer.field` (e.g. `retry.budget.ratio`).
    pub fn field(&self) -> &str {
        self.field
    }

    /// What was wrong with it.
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
