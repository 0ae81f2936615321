//! Circuit breaking.
//!
//! A breaker that refuses a call fails it with [`error::CircuitOpen`], which the fault
//! classifier names `destination_unavailable` (503 with `Retry-After`).
//!
//! ```
//! use std::time::Duration;
//! use tower_upstream::breaker::error::CircuitOpen;
//! use tower_upstream::fault::{classify, Fault};
//!
//! let err: tower::BoxError = Box::new(CircuitOpen::new(Duration::from_secs(5)));
//! let c = classify(&*err);
//! assert_eq!(c.fault(), Fault::DestinationUnavailable);
//! assert_eq!(c.retry_after(), Some(Duration::from_secs(5)));
//! ```

pub mod error;
