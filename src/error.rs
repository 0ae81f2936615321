//! The crate's one configuration error.

use std::borrow::Cow;
use std::fmt;

/// A layer's configuration was invalid: `build()` says which field, and why, with the bad
/// value.
///
/// ```
/// use tower_upstream::map_faults::MapFaultsLayer;
///
/// let err = MapFaultsLayer::builder().gateway_name("bad\nname").build().unwrap_err();
/// assert_eq!(err.field(), "map_faults.gateway_name");
/// assert!(err.to_string().starts_with("invalid map_faults.gateway_name: "));
///
/// // Where configurations sit in a list of your own, say where the bad one is:
/// let err = err.in_field("routes[2]");
/// assert_eq!(err.field(), "routes[2].map_faults.gateway_name");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: Cow<'static, str>,
    message: String,
}

impl ConfigError {
    /// An error about `field` (a dotted path, like `retry.budget.ratio`): `message` says
    /// what is wrong and should show the bad value, like `must be in (0, 10] (got 11)`.
    ///
    /// For settings of your own that sit next to the crate's, so that every configuration
    /// error reads the same.
    pub fn new(field: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error, found inside `prefix`: the field becomes `prefix.field`, like
    /// `routes[2].retry.budget.ratio` for `prefix` `routes[2]`. Apply it from the innermost
    /// prefix out; an empty prefix changes nothing.
    #[must_use]
    pub fn in_field(mut self, prefix: impl AsRef<str>) -> Self {
        let prefix = prefix.as_ref();
        if !prefix.is_empty() {
            self.field = if self.field.is_empty() {
                Cow::Owned(prefix.to_owned())
            } else {
                Cow::Owned(format!("{prefix}.{}", self.field))
            };
        }
        self
    }

    /// The field that was invalid, as a dotted path: `layer.field` (e.g.
    /// `retry.budget.ratio`), behind any prefixes given with [`in_field`](Self::in_field).
    pub fn field(&self) -> &str {
        &self.field
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

#[cfg(test)]
mod tests {
    use super::ConfigError;

    #[test]
    fn prefixes_nest() {
        let err = ConfigError::new("retry.budget.ratio", "must be in (0, 10] (got 11)");
        let err = err.in_field("upstream").in_field("routes[2]").in_field("");
        assert_eq!(err.field(), "routes[2].upstream.retry.budget.ratio");
        assert_eq!(
            err.to_string(),
            "invalid routes[2].upstream.retry.budget.ratio: must be in (0, 10] (got 11)"
        );
        assert_eq!(ConfigError::new("", "x").in_field("a").field(), "a");
    }
}
