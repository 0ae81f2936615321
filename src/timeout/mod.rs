//! Per-attempt timeouts.
//!
//! An attempt that gets no response head in time fails with [`error::Elapsed`], which the
//! fault classifier names `http_response_timeout` (504).
//!
//! ```
//! use tower_upstream::fault::{classify, Fault};
//! use tower_upstream::timeout::error::Elapsed;
//!
//! let err: tower::BoxError = Box::new(Elapsed::new());
//! assert_eq!(classify(&*err).fault(), Fault::HttpResponseTimeout);
//! ```

pub mod error;
