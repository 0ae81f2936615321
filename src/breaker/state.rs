//! One breaker's state machine: a packed state word changed only by compare-and-swap.

use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed},
};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Response};
use tokio::time::Instant;

use super::error::CircuitOpen;
use super::listener::{emit, Listener, Reason, State, Transition};
use super::window::{CountWindow, TimeWindow, Totals, Window};
use crate::fault::Classifier;
use crate::grpc;
use crate::retry::backoff::{pushback, Pushback};

/// What the refusal says while the half-open probes are busy: probes finish within an attempt
/// timeout, so one second is a fair hint.
pub(crate) const PROBES_BUSY_RETRY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug)]
pub(crate) enum WindowConfig {
    Count(u32),
    Time { size: Duration, buckets: u32 },
}

/// Everything a breaker needs to know, fixed at `build()`.
pub(crate) struct Config {
    pub(crate) window: WindowConfig,
    pub(crate) failure_rate: f64,
    pub(crate) min_calls: u32,
    pub(crate) consecutive_failures: u32,
    pub(crate) slow_call: Option<Duration>,
    pub(crate) open_base: Duration,
    pub(crate) open_max: Duration,
    pub(crate) jitter: f64,
    pub(crate) honor_retry_after: bool,
    pub(crate) probes: u32,
    pub(crate) probe_successes: u32,
    pub(crate) statuses: [u64; 16],
    pub(crate) grpc_codes: u32,
    pub(crate) classifier: Classifier,
    pub(crate) listener: Option<Listener>,
    pub(crate) max_keys: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) stripes: usize,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("window", &self.window)
            .field("failure_rate", &self.failure_rate)
            .field("min_calls", &self.min_calls)
            .field("consecutive_failures", &self.consecutive_failures)
            .field("slow_call", &self.slow_call)
            .field("open_base", &self.open_base)
            .field("open_max", &self.open_max)
            .field("jitter", &self.jitter)
            .field("honor_retry_after", &self.honor_retry_after)
            .field("probes", &self.probes)
            .field("probe_successes", &self.probe_successes)
            .field("grpc_codes", &format_args!("{:#x}", self.grpc_codes))
            .field("classifier", &self.classifier)
            .field("listener", &self.listener.is_some())
            .field("max_keys", &self.max_keys)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl Config {
    pub(crate) fn status_is_failure(&self, status: u16) -> bool {
        let i = usize::from(status);
        i < 1024 && self.statuses[i / 64] & (1 << (i % 64)) != 0
    }

    /// Judges an upstream response: a configured status (502/503/504 by default), or a
    /// configured `grpc-status` in a trailers-only response's headers (read when `grpc`:
    /// the request may be a gRPC call), is a failure.
    #[inline]
    pub(crate) fn response_outcome<B>(&self, resp: &Response<B>, grpc: bool) -> Outcome {
        if self.status_is_failure(resp.status().as_u16()) {
            return Outcome::Failure {
                retry_after: retry_after(resp.headers()),
            };
        }
        if grpc && self.grpc_codes != 0 && !resp.headers().is_empty() {
            if let Some(code) = resp
                .headers()
                .get(&grpc::GRPC_STATUS)
                .and_then(grpc::Code::from_header)
            {
                if self.grpc_codes & (1 << code.as_i32()) != 0 {
                    return Outcome::Failure {
                        retry_after: retry_after(resp.headers()),
                    };
                }
            }
        }
        Outcome::Success
    }
}

/// What the upstream asked for before it is called again, read as the retry reads it:
/// `grpc-retry-pushback-ms`, or `Retry-After` in delay-seconds or as an HTTP-date (RFC 9110
/// §10.2.3); nothing when absent or malformed.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    match pushback(headers) {
        Pushback::After(after) => Some(after),
        Pushback::None | Pushback::Never => None,
    }
}

/// How a call ended, as far as the breaker is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Failure {
        retry_after: Option<Duration>,
    },
    /// Not a sample: a local rejection, or the caller dropped the future.
    Ignored,
}

/// How a call was admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    Closed,
    /// A probe of this half-open period (`Word::period`).
    Probe(u64),
}

// The state word:
// [open_until in 4 ms units: 38][half-open generation: 3][trips: 5][probe successes: 8][probes in flight: 8][state: 2]
// While half-open, open_until keeps the end of the open period that led there: with the
// generation, it names the half-open period (`Word::period`), so that a late probe of an
// earlier period is told from a current one however many periods went by (the
// generation alone wraps after 8; the open periods' ends only grow).
const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const STATE_MASK: u64 = 0b11;
const INFLIGHT_SHIFT: u32 = 2;
const SUCCESS_SHIFT: u32 = 10;
const TRIPS_SHIFT: u32 = 18;
const GEN_SHIFT: u32 = 23;
const UNTIL_SHIFT: u32 = 26;
const BYTE: u64 = 0xFF;
const TRIPS_MAX: u64 = 31;
const GEN_MASK: u64 = 0b111;
/// The largest open-until time the word can hold, in ms since the breaker was made (~35
/// years of uptime).
const UNTIL_MAX: u64 = ((1 << 38) - 1) * UNTIL_UNIT;
const UNTIL_UNIT: u64 = 4;

#[derive(Clone, Copy, PartialEq, Eq)]
struct Word(u64);

impl Word {
    fn state(self) -> u64 {
        self.0 & STATE_MASK
    }
    fn in_flight(self) -> u64 {
        (self.0 >> INFLIGHT_SHIFT) & BYTE
    }
    fn successes(self) -> u64 {
        (self.0 >> SUCCESS_SHIFT) & BYTE
    }
    fn trips(self) -> u64 {
        (self.0 >> TRIPS_SHIFT) & TRIPS_MAX
    }
    /// Open until, in ms since the breaker was made.
    fn until(self) -> u64 {
        (self.0 >> UNTIL_SHIFT) * UNTIL_UNIT
    }
    fn gen(self) -> u64 {
        (self.0 >> GEN_SHIFT) & GEN_MASK
    }
    /// Which half-open period this is (meaningful while half-open): the generation and
    /// the end of the open period before it.
    fn period(self) -> u64 {
        self.0 >> GEN_SHIFT
    }
    fn new(state: u64, in_flight: u64, successes: u64, trips: u64, until: u64) -> Word {
        Word(
            state
                | (in_flight & BYTE) << INFLIGHT_SHIFT
                | (successes & BYTE) << SUCCESS_SHIFT
                | trips.min(TRIPS_MAX) << TRIPS_SHIFT
                | until.min(UNTIL_MAX).div_ceil(UNTIL_UNIT) << UNTIL_SHIFT,
        )
    }
    fn with_gen(self, gen: u64) -> Word {
        Word(self.0 & !(GEN_MASK << GEN_SHIFT) | (gen & GEN_MASK) << GEN_SHIFT)
    }
    fn public(self) -> State {
        match self.state() {
            CLOSED => State::Closed,
            OPEN => State::Open,
            _ => State::HalfOpen,
        }
    }
}

/// One breaker (one key).
pub(crate) struct Core {
    word: AtomicU64,
    consecutive: AtomicU32,
    window: Window,
    base: Instant,
    /// Last use seen with a clock, in units of 1024 ms since `base`; written at most about
    /// once a second.
    last_used: AtomicU64,
    /// Used since the last eviction scan (successes read no clock): second chance.
    used: AtomicBool,
    rng: AtomicU64,
    pub(crate) key: Box<str>,
    pub(crate) config: Arc<Config>,
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Core")
            .field("key", &self.key)
            .field("state", &Word(self.word.load(Relaxed)).public())
            .finish_non_exhaustive()
    }
}

impl Core {
    pub(crate) fn new(key: Box<str>, config: Arc<Config>) -> Core {
        let window = match config.window {
            WindowConfig::Count(n) => Window::Count(CountWindow::new(n as usize)),
            WindowConfig::Time { size, buckets } => {
                let bucket_ms = (size.as_millis() as u64 / u64::from(buckets)).max(1);
                Window::Time(TimeWindow::new(bucket_ms, buckets as usize, config.stripes))
            }
        };
        let seed = std::collections::hash_map::RandomState::new().hash_one(&key);
        Core {
            word: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            window,
            base: Instant::now(),
            last_used: AtomicU64::new(0),
            used: AtomicBool::new(false),
            rng: AtomicU64::new(seed | 1),
            key,
            config,
        }
    }

    #[inline]
    pub(crate) fn now_ms(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.base)
            .as_millis() as u64
    }

    #[inline]
    pub(crate) fn touch(&self, now_ms: u64) {
        let t = now_ms >> 10;
        if self.last_used.load(Relaxed) != t {
            self.last_used.store(t, Relaxed);
        }
    }

    /// How long this breaker has gone unused, as far as is known; called by the eviction
    /// scan, which also clears the used flag (a breaker used since the last scan is not idle).
    pub(crate) fn idle_for(&self, now_ms: u64) -> Duration {
        if self.used.swap(false, Relaxed) {
            self.touch(now_ms);
            return Duration::ZERO;
        }
        Duration::from_millis(now_ms.saturating_sub(self.last_used.load(Relaxed) << 10))
    }

    /// Admission: closed admits with one atomic load; open refuses until its time has come,
    /// then exactly one caller wins the move to half-open and becomes the first probe.
    #[inline]
    pub(crate) fn try_acquire(&self) -> Result<Admit, CircuitOpen> {
        let mut cur = Word(self.word.load(Acquire));
        if cur.state() == CLOSED {
            return Ok(Admit::Closed);
        }
        let now = self.now_ms();
        self.touch(now);
        loop {
            let next = match cur.state() {
                CLOSED => return Ok(Admit::Closed),
                OPEN => {
                    if now < cur.until() {
                        return Err(CircuitOpen::new(Duration::from_millis(cur.until() - now)));
                    }
                    Word::new(HALF_OPEN, 1, 0, cur.trips(), cur.until()).with_gen(cur.gen() + 1)
                }
                _ => {
                    if cur.in_flight() >= u64::from(self.config.probes) {
                        return Err(CircuitOpen::new(PROBES_BUSY_RETRY));
                    }
                    Word::new(
                        HALF_OPEN,
                        cur.in_flight() + 1,
                        cur.successes(),
                        cur.trips(),
                        cur.until(),
                    )
                    .with_gen(cur.gen())
                }
            };
            match self.word.compare_exchange(cur.0, next.0, AcqRel, Acquire) {
                Ok(_) => {
                    if cur.state() == OPEN {
                        self.emit(State::Open, State::HalfOpen, Reason::OpenTimeElapsed);
                    }
                    return Ok(Admit::Probe(next.period()));
                }
                Err(actual) => cur = Word(actual),
            }
        }
    }

    /// Records the outcome of a call admitted while closed. A success reads no clock (but
    /// every [`CLOCK_EVERY`](super::window::CLOCK_EVERY)-th of a stripe); a failure does.
    #[inline]
    pub(crate) fn on_closed_outcome(&self, stripe: usize, outcome: Outcome) {
        let retry_after = match outcome {
            Outcome::Ignored => return,
            Outcome::Success => None,
            Outcome::Failure { retry_after } => Some(retry_after),
        };
        // A call admitted before the circuit opened is not a sample of the new state.
        if Word(self.word.load(Relaxed)).state() != CLOSED {
            return;
        }
        let Some(retry_after) = retry_after else {
            if !self.used.load(Relaxed) {
                self.used.store(true, Relaxed);
            }
            if self.window.record_success(stripe) {
                let now = self.now_ms();
                self.touch(now);
                self.window.tick(stripe, now);
            }
            if self.consecutive.load(Relaxed) != 0 {
                self.consecutive.store(0, Relaxed);
            }
            return;
        };
        let now_ms = self.now_ms();
        self.touch(now_ms);
        self.window.record_failure(stripe, now_ms);
        let c = &*self.config;
        let in_a_row = self.consecutive.fetch_add(1, Relaxed).saturating_add(1);
        if c.consecutive_failures != 0 && in_a_row >= c.consecutive_failures {
            self.trip_from_closed(now_ms, retry_after, Reason::ConsecutiveFailures);
            return;
        }
        let t = self.window.totals(now_ms);
        if t.calls >= u64::from(c.min_calls) && t.failures as f64 >= c.failure_rate * t.calls as f64
        {
            self.trip_from_closed(now_ms, retry_after, Reason::FailureRate);
        }
    }

    fn trip_from_closed(&self, now_ms: u64, retry_after: Option<Duration>, reason: Reason) {
        let mut cur = Word(self.word.load(Acquire));
        loop {
            if cur.state() != CLOSED {
                return;
            }
            let trips = cur.trips() + 1;
            let until = now_ms + self.open_ms(trips, retry_after);
            let next = Word::new(OPEN, 0, 0, trips, until).with_gen(cur.gen());
            match self.word.compare_exchange(cur.0, next.0, AcqRel, Acquire) {
                Ok(_) => {
                    self.consecutive.store(0, Relaxed);
                    self.emit(State::Closed, State::Open, reason);
                    return;
                }
                Err(actual) => cur = Word(actual),
            }
        }
    }

    /// Records the outcome of a probe of half-open `period` (or returns its permit).
    pub(crate) fn on_probe_outcome(&self, period: u64, now_ms: u64, outcome: Outcome) {
        let mut cur = Word(self.word.load(Acquire));
        loop {
            // A late probe of an earlier half-open period has no say in this one.
            if cur.state() != HALF_OPEN || cur.period() != period {
                return;
            }
            let gen = cur.gen();
            let in_flight = cur.in_flight().saturating_sub(1);
            let (next, change) = match outcome {
                Outcome::Ignored => (
                    Word::new(
                        HALF_OPEN,
                        in_flight,
                        cur.successes(),
                        cur.trips(),
                        cur.until(),
                    )
                    .with_gen(gen),
                    None,
                ),
                Outcome::Success => {
                    let successes = cur.successes() + 1;
                    if successes >= u64::from(self.config.probe_successes) {
                        // The window is not written while half-open, so clearing it before
                        // the move to closed loses nothing.
                        self.window.reset();
                        self.consecutive.store(0, Relaxed);
                        (
                            Word::new(CLOSED, 0, 0, 0, 0).with_gen(gen),
                            Some((State::Closed, Reason::ProbesSucceeded)),
                        )
                    } else {
                        (
                            Word::new(HALF_OPEN, in_flight, successes, cur.trips(), cur.until())
                                .with_gen(gen),
                            None,
                        )
                    }
                }
                Outcome::Failure { retry_after } => {
                    let trips = cur.trips() + 1;
                    let until = now_ms + self.open_ms(trips, retry_after);
                    (
                        Word::new(OPEN, 0, 0, trips, until).with_gen(gen),
                        Some((State::Open, Reason::ProbeFailed)),
                    )
                }
            };
            match self.word.compare_exchange(cur.0, next.0, AcqRel, Acquire) {
                Ok(_) => {
                    if let Some((to, reason)) = change {
                        self.emit(State::HalfOpen, to, reason);
                    }
                    return;
                }
                Err(actual) => cur = Word(actual),
            }
        }
    }

    /// Open time for the `trips`-th trip in a row: base × 2^(trips-1), capped, minus up to
    /// `jitter` of it, lengthened (up to the cap) by the upstream's `Retry-After`.
    fn open_ms(&self, trips: u64, retry_after: Option<Duration>) -> u64 {
        let c = &*self.config;
        let base = c.open_base.as_millis() as u64;
        let max = c.open_max.as_millis() as u64;
        let mut ms = base
            .saturating_mul(1u64 << (trips.saturating_sub(1)).min(40))
            .min(max);
        if c.jitter > 0.0 {
            ms -= (ms as f64 * c.jitter * self.random_unit()) as u64;
        }
        if c.honor_retry_after {
            if let Some(ra) = retry_after {
                ms = ms.max(u64::try_from(ra.as_millis()).unwrap_or(u64::MAX).min(max));
            }
        }
        ms.max(1)
    }

    /// xorshift64*: a cheap per-breaker generator, only used when a circuit opens.
    fn random_unit(&self) -> f64 {
        let mut x = self.rng.load(Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Relaxed);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn emit(&self, from: State, to: State, reason: Reason) {
        emit(
            self.config.listener.as_ref(),
            Transition {
                key: &self.key,
                from,
                to,
                reason,
            },
        );
    }

    pub(crate) fn state(&self) -> State {
        Word(self.word.load(Acquire)).public()
    }

    pub(crate) fn probes_in_flight(&self) -> u32 {
        Word(self.word.load(Acquire)).in_flight() as u32
    }

    /// Time until a probe may go through, when open.
    pub(crate) fn until_probe(&self, now_ms: u64) -> Option<Duration> {
        let w = Word(self.word.load(Acquire));
        (w.state() == OPEN).then(|| Duration::from_millis(w.until().saturating_sub(now_ms)))
    }

    pub(crate) fn totals(&self, now_ms: u64) -> Totals {
        self.window.totals(now_ms)
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core(open_base: Duration, open_max: Duration) -> Core {
        core_with(open_base, open_max, 1)
    }

    fn core_with(open_base: Duration, open_max: Duration, probes: u32) -> Core {
        let config = Config {
            window: WindowConfig::Count(10),
            failure_rate: 0.5,
            min_calls: 10,
            consecutive_failures: 1,
            slow_call: None,
            open_base,
            open_max,
            jitter: 0.0,
            honor_retry_after: true,
            probes,
            probe_successes: 1,
            statuses: [0; 16],
            grpc_codes: 0,
            classifier: Classifier::new(),
            listener: None,
            max_keys: 1,
            idle_timeout: Duration::from_secs(300),
            stripes: 2,
        };
        Core::new("k".into(), Arc::new(config))
    }

    /// A `Retry-After` too large for a count of milliseconds in a `u64` is still longer than
    /// the cap: the circuit opens for the cap, not for whatever the truncated value is.
    #[tokio::test(start_paused = true)]
    async fn huge_retry_after_opens_for_the_cap() {
        let core = core(Duration::from_secs(1), Duration::from_secs(60));
        // (u64::MAX / 1000 + 1) s = 2^64 + 384 ms.
        let ra = Duration::from_secs(u64::MAX / 1000 + 1);
        core.on_closed_outcome(
            0,
            Outcome::Failure {
                retry_after: Some(ra),
            },
        );
        assert_eq!(core.state(), State::Open);
        assert_eq!(
            core.until_probe(core.now_ms()),
            Some(Duration::from_secs(60))
        );
    }

    /// A probe still in flight when its half-open period ended has no say in a later one,
    /// even 8 periods later, when the 3-bit generation has come round to its own again.
    #[tokio::test(start_paused = true)]
    async fn a_probe_from_8_periods_ago_does_not_close_the_circuit() {
        let second = Duration::from_secs(1);
        let core = core_with(second, second, 2);
        let fail = Outcome::Failure { retry_after: None };
        core.on_closed_outcome(0, fail);
        tokio::time::advance(second).await;
        // A probe that hangs, and one that fails: open again.
        let Ok(Admit::Probe(hung)) = core.try_acquire() else {
            panic!("a probe")
        };
        let Ok(Admit::Probe(other)) = core.try_acquire() else {
            panic!("a second probe")
        };
        core.on_probe_outcome(other, core.now_ms(), fail);
        for _ in 0..7 {
            tokio::time::advance(second).await;
            let Ok(Admit::Probe(p)) = core.try_acquire() else {
                panic!("a probe")
            };
            core.on_probe_outcome(p, core.now_ms(), fail);
            assert_eq!(core.state(), State::Open);
        }
        // The 9th half-open period: its generation is the hung probe's again.
        tokio::time::advance(second).await;
        let Ok(Admit::Probe(_current)) = core.try_acquire() else {
            panic!("a probe")
        };
        core.on_probe_outcome(hung, core.now_ms(), Outcome::Success);
        assert_eq!(
            core.state(),
            State::HalfOpen,
            "the late success is not this period's"
        );
        assert_eq!(core.probes_in_flight(), 1, "nor is its slot");
    }
}
