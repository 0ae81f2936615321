//! Errors of the circuit breaker.

use std::fmt;
use std::time::Duration;

/// The circuit for this upstream is open: the call was refused without touching it.
///
/// Classified as [`Fault::DestinationUnavailable`](crate::fault::Fault::DestinationUnavailable):
/// 503 with `Retry-After` (or `UNAVAILABLE` with `grpc-retry-pushback-ms`), not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitOpen {
    retry_after: Duration,
}

impl CircuitOpen {
    /// A refusal whose circuit probes again in `retry_after`.
    pub const fn new(retry_after: Duration) -> Self {
        CircuitOpen { retry_after }
    }

    /// Time until the breaker lets a probe through.
    pub const fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "circuit open; next probe in {}ms",
            self.retry_after.as_millis()
        )
    }
}

impl std::error::Error for CircuitOpen {}
