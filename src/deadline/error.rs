//! Errors of the deadline layer.

use std::fmt;

/// The request's overall deadline passed before a response head arrived.
///
/// Classified as [`Fault::HttpResponseTimeout`](crate::fault::Fault::HttpResponseTimeout):
/// 504 / `DEADLINE_EXCEEDED`. When the deadline was already spent before an attempt could
/// start, the request was not sent ([`is_before_start`](DeadlineExceeded::is_before_start)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineExceeded {
    before_start: bool,
    from_caller: bool,
}

impl DeadlineExceeded {
    /// The deadline was spent before any attempt started: nothing was sent.
    pub const fn before_start() -> Self {
        DeadlineExceeded {
            before_start: true,
            from_caller: false,
        }
    }

    /// The deadline passed while an attempt was in flight.
    pub const fn in_flight() -> Self {
        DeadlineExceeded {
            before_start: false,
            from_caller: false,
        }
    }

    /// The same, about a deadline the caller set (or not): see
    /// [`RequestDeadline::is_from_caller`](super::RequestDeadline::is_from_caller). A
    /// circuit breaker does not count an attempt that such a deadline cut short.
    pub const fn from_caller(mut self, from_caller: bool) -> Self {
        self.from_caller = from_caller;
        self
    }

    /// Whether the deadline that passed was one the caller set.
    pub const fn is_from_caller(&self) -> bool {
        self.from_caller
    }

    /// Whether the deadline was spent before an attempt could start.
    pub const fn is_before_start(&self) -> bool {
        self.before_start
    }
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.before_start {
            f.write_str("request deadline spent before the upstream was called")
        } else {
            f.write_str("request deadline exceeded")
        }
    }
}

impl std::error::Error for DeadlineExceeded {}
