//! Tower middleware for resilient upstream calls.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod breaker;
pub mod deadline;
mod error;
pub mod fault;
pub mod grpc;
pub mod timeout;

pub use breaker::{CircuitBreaker, CircuitBreakerLayer};
pub use error::ConfigError;
pub use fault::{Classification, Classifier, Fault, Sent};

/// The error type that travels between layers: any `std::error::Error`, boxed.
pub use tower::BoxError;
