//! Tower middleware for resilient upstream calls.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]

pub mod breaker;
pub mod deadline;
mod error;
pub mod fault;
pub mod grpc;
pub mod map_faults;
pub mod timeout;

pub use error::ConfigError;
pub use fault::{Classification, Classifier, Fault, Sent};
pub use map_faults::{MapFaults, MapFaultsLayer};

/// The error type that travels between layers: any `std::error::Error`, boxed.
pub use tower::BoxError;
