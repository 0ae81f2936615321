//! What a breaker tells the world when its state changes.

use std::fmt;
use std::sync::Arc;

/// The state of one breaker.
#[non_exhaustive]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// Traffic flows; outcomes are counted.
    Closed,
    /// Calls are refused with [`CircuitOpen`](super::error::CircuitOpen) until the open time
    /// has passed.
    Open,
    /// A bounded number of probe calls go through; the rest are refused.
    HalfOpen,
    /// An operator opened every circuit (see [`BreakerHandle::force_open`](super::BreakerHandle::force_open)).
    ForcedOpen,
    /// An operator switched breaking off: everything goes through, nothing is counted.
    Disabled,
}

impl State {
    /// The state's name in logs: `closed`, `open`, `half_open`, `forced_open`, `disabled`.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a breaker changed state.
#[non_exhaustive]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The failure rate over the window reached the threshold (after the minimum calls).
    FailureRate,
    /// The configured number of failures happened in a row.
    ConsecutiveFailures,
    /// The open time has passed; probes may go through.
    OpenTimeElapsed,
    /// The required number of probes succeeded.
    ProbesSucceeded,
    /// A probe failed.
    ProbeFailed,
    /// An operator changed the mode through a [`BreakerHandle`](super::BreakerHandle).
    Operator,
}

impl Reason {
    /// The reason's name in logs, such as `failure_rate`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::FailureRate => "failure_rate",
            Reason::ConsecutiveFailures => "consecutive_failures",
            Reason::OpenTimeElapsed => "open_time_elapsed",
            Reason::ProbesSucceeded => "probes_succeeded",
            Reason::ProbeFailed => "probe_failed",
            Reason::Operator => "operator",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One state change, as given to the listener set with
/// [`Builder::on_transition`](super::Builder::on_transition).
#[derive(Clone, Copy, Debug)]
pub struct Transition<'a> {
    pub(crate) key: &'a str,
    pub(crate) from: State,
    pub(crate) to: State,
    pub(crate) reason: Reason,
}

impl<'a> Transition<'a> {
    /// The breaker's key: the upstream authority by default; [`NO_KEY`](super::NO_KEY) for
    /// requests without one, [`OVERFLOW_KEY`](super::OVERFLOW_KEY) for the shared overflow
    /// breaker, `"*"` for an operator's change of every breaker.
    pub fn key(&self) -> &'a str {
        self.key
    }

    /// The state before.
    pub fn from(&self) -> State {
        self.from
    }

    /// The state after.
    pub fn to(&self) -> State {
        self.to
    }

    /// Why it changed.
    pub fn reason(&self) -> Reason {
        self.reason
    }
}

pub(crate) type Listener = Arc<dyn Fn(&Transition<'_>) + Send + Sync>;

/// Emits the tracing event and calls the listener.
pub(crate) fn emit(listener: Option<&Listener>, t: Transition<'_>) {
    match t.to {
        State::Open | State::ForcedOpen => tracing::warn!(
            target: "tower_upstream::breaker",
            key = t.key, from = t.from.as_str(), to = t.to.as_str(), reason = t.reason.as_str(),
            "circuit breaker state change"
        ),
        _ => tracing::info!(
            target: "tower_upstream::breaker",
            key = t.key, from = t.from.as_str(), to = t.to.as_str(), reason = t.reason.as_str(),
            "circuit breaker state change"
        ),
    }
    if let Some(l) = listener {
        l(&t);
    }
}
