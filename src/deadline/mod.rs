//! Request deadlines: how much time a whole logical request has left.
//!
//! A [`RequestDeadline`] lives in the request's extensions. Every layer below the one that
//! set it reads it: a retry does not start an attempt or a back-off sleep that cannot finish
//! in time, an attempt timeout uses `min(per-attempt, remaining)`, and outgoing gRPC calls
//! carry the remaining time as `grpc-timeout`.
//!
//! ```
//! use std::time::Duration;
//! use tower_upstream::deadline::RequestDeadline;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let mut req = http::Request::new(());
//! req.extensions_mut().insert(RequestDeadline::after(Duration::from_secs(2)));
//!
//! tokio::time::sleep(Duration::from_millis(500)).await;
//! let deadline = RequestDeadline::of(&req).unwrap();
//! assert_eq!(deadline.remaining(), Duration::from_millis(1500));
//! # }
//! ```

pub mod error;

use std::time::Duration;

use tokio::time::Instant;

/// The instant by which a logical request must have its response head, stored in the
/// request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestDeadline {
    at: Instant,
}

impl RequestDeadline {
    /// A deadline at `at`.
    pub const fn at(at: Instant) -> Self {
        RequestDeadline { at }
    }

    /// A deadline `timeout` from now (saturating far in the future for huge durations).
    pub fn after(timeout: Duration) -> Self {
        let now = Instant::now();
        let at = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        RequestDeadline { at }
    }

    /// The instant the deadline falls on.
    pub const fn instant(&self) -> Instant {
        self.at
    }

    /// Time left before the deadline; zero once it has passed.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.at
    }

    /// The deadline of a request, if a layer set one.
    pub fn of<B>(req: &http::Request<B>) -> Option<RequestDeadline> {
        req.extensions().get::<RequestDeadline>().copied()
    }

    /// The earlier of two deadlines.
    pub fn min(self, other: RequestDeadline) -> RequestDeadline {
        if other.at < self.at {
            other
        } else {
            self
        }
    }
}
