//! Errors of the attempt-timeout layer.

use std::fmt;

/// One attempt got no response head in time, or (from a
/// [`TimeoutBody`](super::body::TimeoutBody)) a response body waited too long for a frame.
///
/// Classified as [`Fault::HttpResponseTimeout`](crate::fault::Fault::HttpResponseTimeout):
/// 504 / `DEADLINE_EXCEEDED`, maybe processed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Elapsed(());

impl Elapsed {
    /// A new `Elapsed`.
    pub const fn new() -> Self {
        Elapsed(())
    }
}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("upstream attempt timed out")
    }
}

impl std::error::Error for Elapsed {}
