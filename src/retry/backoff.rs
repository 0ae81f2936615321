//! Backoff between attempts, and the upstream's own pushback (`Retry-After`,
//! `grpc-retry-pushback-ms`).

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// How long to wait before the next attempt.
///
/// - [`Backoff::full_jitter`] (the default, 25 ms base, 250 ms cap, as Envoy): before retry
///   *n* (1-based), wait a uniformly random time in `[0, min(cap, base × 2ⁿ⁻¹)]`.
/// - [`Backoff::decorrelated_jitter`]: wait a uniformly random time in
///   `[base, min(cap, 3 × previous wait)]` (AWS's "decorrelated jitter").
/// - [`Backoff::none`]: retry at once.
///
/// Nothing grows without bound: every computation saturates and is capped.
///
/// ```
/// use std::time::Duration;
/// use tower_upstream::retry::Backoff;
///
/// let b = Backoff::full_jitter(Duration::from_millis(10), Duration::from_millis(100));
/// assert_eq!(b.cap(), Duration::from_millis(100));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    kind: Kind,
    base: Duration,
    cap: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Full,
    Decorrelated,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::full_jitter(Duration::from_millis(25), Duration::from_millis(250))
    }
}

impl Backoff {
    /// Exponential backoff with full jitter.
    pub const fn full_jitter(base: Duration, cap: Duration) -> Self {
        Backoff {
            kind: Kind::Full,
            base,
            cap,
        }
    }

    /// Decorrelated jitter: each wait is random in `[base, 3 × the previous wait]`, capped.
    pub const fn decorrelated_jitter(base: Duration, cap: Duration) -> Self {
        Backoff {
            kind: Kind::Decorrelated,
            base,
            cap,
        }
    }

    /// No wait between attempts.
    pub const fn none() -> Self {
        Backoff::full_jitter(Duration::ZERO, Duration::ZERO)
    }

    /// The base delay.
    pub const fn base(&self) -> Duration {
        self.base
    }

    /// The longest delay this backoff ever waits.
    pub const fn cap(&self) -> Duration {
        self.cap
    }

    /// The wait before retry number `retry` (1-based), given the previous wait and a random
    /// number. Pure, so the arithmetic can be tested.
    pub(crate) fn delay_with(&self, retry: u32, prev: Duration, rand: u64) -> Duration {
        let base = self.base.min(self.cap);
        match self.kind {
            Kind::Full => {
                let exp = retry.saturating_sub(1).min(31);
                let ceiling = base.saturating_mul(1u32 << exp).min(self.cap);
                uniform(Duration::ZERO, ceiling, rand)
            }
            Kind::Decorrelated => {
                let ceiling = prev.saturating_mul(3).min(self.cap).max(base);
                uniform(base, ceiling, rand)
            }
        }
    }

    pub(crate) fn delay(&self, retry: u32, prev: Duration) -> Duration {
        if self.cap.is_zero() {
            return Duration::ZERO;
        }
        self.delay_with(retry, prev, next_random())
    }
}

/// A uniformly random duration in `[lo, hi]` (nanosecond resolution), `lo ≤ hi`.
fn uniform(lo: Duration, hi: Duration, rand: u64) -> Duration {
    let lo_ns = u64::try_from(lo.as_nanos()).unwrap_or(u64::MAX);
    let hi_ns = u64::try_from(hi.as_nanos()).unwrap_or(u64::MAX);
    if hi_ns <= lo_ns {
        return lo;
    }
    let span = u128::from(hi_ns - lo_ns) + 1;
    // Multiply-shift maps rand onto [0, span) without modulo bias worth speaking of.
    let offset = ((u128::from(rand) * span) >> 64) as u64;
    Duration::from_nanos(lo_ns + offset)
}

/// A fast per-thread pseudo-random number (xorshift64*), seeded from the OS-randomised
/// `RandomState`. Jitter needs spread, not cryptographic quality.
fn next_random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = const { Cell::new(0) };
    }
    STATE.with(|s| {
        let mut x = s.get();
        if x == 0 {
            let mut h = RandomState::new().build_hasher();
            h.write_usize(s as *const _ as usize);
            x = h.finish() | 1;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// What the upstream asked for before another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushback {
    /// Nothing said: use the backoff.
    None,
    /// Wait this long.
    After(Duration),
    /// Do not retry (a negative or malformed `grpc-retry-pushback-ms`).
    Never,
}

/// Reads `grpc-retry-pushback-ms` (gRPC A6: negative or unparseable means do not retry)
/// and `Retry-After` (RFC 9110 §10.2.3: delay-seconds or an HTTP-date; unparseable is
/// ignored).
pub(crate) fn pushback(headers: &HeaderMap) -> Pushback {
    if let Some(v) = headers.get(&crate::grpc::GRPC_PUSHBACK) {
        return match v.to_str().ok().map(str::trim) {
            Some(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                // Too many digits to fit: longer than any cap.
                Pushback::After(s.parse().map_or(Duration::MAX, Duration::from_millis))
            }
            _ => Pushback::Never,
        };
    }
    let Some(v) = headers.get(http::header::RETRY_AFTER) else {
        return Pushback::None;
    };
    let Ok(s) = v.to_str().map(str::trim) else {
        return Pushback::None;
    };
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return Pushback::After(s.parse().map_or(Duration::MAX, Duration::from_secs));
    }
    match httpdate::parse_http_date(s) {
        Ok(at) => Pushback::After(
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
        ),
        Err(_) => Pushback::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn headers(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn pushback_forms() {
        assert_eq!(pushback(&HeaderMap::new()), Pushback::None);
        assert_eq!(
            pushback(&headers("retry-after", "2")),
            Pushback::After(Duration::from_secs(2))
        );
        assert_eq!(
            pushback(&headers("retry-after", "99999999999999999999999")),
            Pushback::After(Duration::MAX)
        );
        assert_eq!(pushback(&headers("retry-after", "soon")), Pushback::None);
        assert_eq!(pushback(&headers("retry-after", "-1")), Pushback::None);
        let past = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH);
        assert_eq!(
            pushback(&headers("retry-after", &past)),
            Pushback::After(Duration::ZERO)
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
        match pushback(&headers("retry-after", &later)) {
            Pushback::After(d) => {
                assert!(d > Duration::from_secs(58) && d <= Duration::from_secs(60))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            pushback(&headers("grpc-retry-pushback-ms", "150")),
            Pushback::After(Duration::from_millis(150))
        );
        assert_eq!(
            pushback(&headers("grpc-retry-pushback-ms", "-1")),
            Pushback::Never
        );
        assert_eq!(
            pushback(&headers("grpc-retry-pushback-ms", "x")),
            Pushback::Never
        );
    }

    #[test]
    fn random_spreads() {
        let a = next_random();
        let b = next_random();
        assert_ne!(a, b);
    }

    proptest! {
        #[test]
        fn full_jitter_bounded(
            base_ms in 0u64..10_000, cap_ms in 0u64..100_000,
            retry in any::<u32>(), rand in any::<u64>(),
        ) {
            let b = Backoff::full_jitter(Duration::from_millis(base_ms), Duration::from_millis(cap_ms));
            let d = b.delay_with(retry, Duration::ZERO, rand);
            prop_assert!(d <= b.cap());
            let exp = retry.saturating_sub(1).min(31);
            let ceiling = Duration::from_millis(base_ms).saturating_mul(1 << exp);
            prop_assert!(d <= ceiling);
        }

        #[test]
        fn decorrelated_bounded(
            base_ms in 0u64..10_000, cap_ms in 0u64..100_000,
            prev_ns in any::<u64>(), rand in any::<u64>(),
        ) {
            let b = Backoff::decorrelated_jitter(Duration::from_millis(base_ms), Duration::from_millis(cap_ms));
            let prev = Duration::from_nanos(prev_ns);
            let d = b.delay_with(2, prev, rand);
            prop_assert!(d <= b.cap().max(b.base().min(b.cap())));
            prop_assert!(d >= b.base().min(b.cap()));
        }

        #[test]
        fn uniform_in_range(lo in any::<u64>(), span in any::<u64>(), rand in any::<u64>()) {
            let lo = Duration::from_nanos(lo / 2);
            let hi = lo + Duration::from_nanos(span / 2);
            let d = uniform(lo, hi, rand);
            prop_assert!(d >= lo && d <= hi);
        }
    }
}
