//! Durations in configuration files: `"250ms"`, `"1.5s"`, `"2m"`, `"1h30m"`.
//!
//! A duration is a string of one or more parts, each a decimal number and a unit, with
//! optional spaces between parts:
//!
//! | unit | meaning |
//! |---|---|
//! | `ns` | nanoseconds |
//! | `us`, `µs` | microseconds |
//! | `ms` | milliseconds |
//! | `s` | seconds |
//! | `m` | minutes |
//! | `h` | hours |
//!
//! The number may have a fraction (`"1.5s"`, `"0.25h"`), which must come out as a whole
//! number of nanoseconds. `"0"` alone is zero. Nothing else is accepted: no sign, no
//! exponent, no unit-less number other than `"0"`, no days (`"24h"`). Parsing is exact:
//! `"0.1s"` is 100 ms, not the nearest floating-point value.
//!
//! The crate reads durations this way (`humantime` was considered: it has no fractions,
//! and `"1.5s"` is the natural way to write a second and a half). Use the same format
//! for durations of your own with `#[serde(with = "tower_upstream::config::duration")]`
//! (or [`option`] for an `Option<Duration>`):
//!
//! ```
//! use std::time::Duration;
//! use tower_upstream::config::duration;
//!
//! assert_eq!(duration::parse("250ms"), Ok(Duration::from_millis(250)));
//! assert_eq!(duration::parse("1.5s"), Ok(Duration::from_millis(1500)));
//! assert_eq!(duration::parse("1h 30m"), Ok(Duration::from_secs(5400)));
//! assert!(duration::parse("5").is_err()); // which unit?
//!
//! // Written back in the largest unit that is exact.
//! assert_eq!(duration::format(Duration::from_millis(1500)), "1500ms");
//! assert_eq!(duration::format(Duration::from_secs(120)), "2m");
//! ```

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Serializer;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// The units and their length in nanoseconds.
const UNITS: [(&str, u128); 7] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("h", 3600 * NANOS_PER_SEC),
];

/// Units for [`format()`], largest first.
const FORMAT_UNITS: [(&str, u128); 6] = [
    ("h", 3600 * NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("s", NANOS_PER_SEC),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Parses a duration; see the [module docs](self) for the accepted forms. The error says
/// what is wrong, for a message such as `invalid duration "5": no unit`.
pub fn parse(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err("empty".to_owned());
    }
    let mut rest = text;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let (nanos, after) = part(rest)?;
        total = total
            .checked_add(nanos)
            .ok_or_else(|| "too long".to_owned())?;
        rest = after.trim_start();
    }
    let secs = u64::try_from(total / NANOS_PER_SEC).map_err(|_| "too long".to_owned())?;
    // Below 10⁹: fits.
    let nanos = (total % NANOS_PER_SEC) as u32;
    Ok(Duration::new(secs, nanos))
}

/// One `<number><unit>` at the start of `s`: its nanoseconds and what follows.
fn part(s: &str) -> Result<(u128, &str), String> {
    let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
    let (int, after_int) = s.split_at(int_len);
    let (frac, after_num) = match after_int.strip_prefix('.') {
        Some(f) => {
            let frac_len = f.bytes().take_while(u8::is_ascii_digit).count();
            if frac_len == 0 {
                return Err("a digit must follow the decimal point".to_owned());
            }
            f.split_at(frac_len)
        }
        None => ("", after_int),
    };
    if int.is_empty() {
        return Err(match after_num.chars().next() {
            Some(c) => format!("expected a number, found {c:?}"),
            None => "expected a number".to_owned(),
        });
    }
    // The unit runs to the next digit or space: `5sec` is an unknown unit, not `5s` and
    // garbage.
    let unit_len = after_num
        .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
        .unwrap_or(after_num.len());
    let (unit, after) = after_num.split_at(unit_len);
    let unit_nanos = match UNITS.iter().find(|(name, _)| *name == unit) {
        Some(&(_, nanos)) => nanos,
        None if unit.is_empty() => return Err("no unit (use ns, us, ms, s, m or h)".to_owned()),
        None => return Err(format!("unknown unit {unit:?} (use ns, us, ms, s, m or h)")),
    };
    let too_long = || "too long".to_owned();
    let int: u128 = if int.len() > 30 {
        return Err(too_long());
    } else {
        int.parse().map_err(|_| too_long())?
    };
    let mut nanos = int.checked_mul(unit_nanos).ok_or_else(too_long)?;
    if !frac.is_empty() {
        // Trailing zeros add nothing; past them, at most 13 digits can be exact (hours).
        let frac = frac.trim_end_matches('0');
        if frac.len() > 13 {
            return Err("finer than a nanosecond".to_owned());
        }
        if !frac.is_empty() {
            let scale = 10u128.pow(frac.len() as u32);
            let digits: u128 = frac.parse().map_err(|_| too_long())?;
            let scaled = digits * unit_nanos;
            if scaled % scale != 0 {
                return Err("finer than a nanosecond".to_owned());
            }
            nanos = nanos.checked_add(scaled / scale).ok_or_else(too_long)?;
        }
    }
    Ok((nanos, after))
}

/// Writes a duration in the largest unit that is exact (`"1500ms"`, `"2m"`, `"0s"`), a
/// form [`parse`] reads back to the same value.
pub fn format(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    let (name, unit) = FORMAT_UNITS
        .iter()
        .copied()
        .find(|&(_, unit)| nanos % unit == 0)
        .unwrap_or(("ns", 1));
    format!("{}{name}", nanos / unit)
}

/// Serializes a `Duration` as [`format()`] writes it; for `#[serde(with = "…")]`.
pub fn serialize<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format(*d))
}

/// Deserializes a `Duration` from a string [`parse`] accepts; for `#[serde(with = "…")]`.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    deserializer.deserialize_str(DurationVisitor)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"250ms\", \"1.5s\" or \"2m\"")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
        parse(s).map_err(|why| E::custom(format_args!("invalid duration {s:?}: {why}")))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
        if n == 0 {
            Ok(Duration::ZERO)
        } else {
            Err(E::custom(format_args!(
                "invalid duration {n}: no unit (write it as a string, like \"{n}s\" or \"{n}ms\")"
            )))
        }
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(E::custom(format_args!(
                "invalid duration {n}: must not be negative"
            ))),
        }
    }
}

/// The same for an `Option<Duration>` (`None` when absent, with `#[serde(default)]`).
pub mod option {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes `Some` as [`format`](fn@super::format) writes it, `None` as nothing.
    pub fn serialize<S: Serializer>(
        d: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serialize(d, serializer),
            None => serializer.serialize_none(),
        }
    }

    /// Deserializes a present value with [`deserialize`](super::deserialize).
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super")] Duration);
        Option::<Wrap>::deserialize(deserializer).map(|w| w.map(|Wrap(d)| d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted() {
        let ok = |s: &str, d: Duration| assert_eq!(parse(s), Ok(d), "{s}");
        ok("0", Duration::ZERO);
        ok("0s", Duration::ZERO);
        ok("250ms", Duration::from_millis(250));
        ok("1.5s", Duration::from_millis(1500));
        ok("0.1s", Duration::from_millis(100));
        ok("2m", Duration::from_secs(120));
        ok("30s", Duration::from_secs(30));
        ok("1h30m", Duration::from_secs(5400));
        ok("1h 30m 15s", Duration::from_secs(5415));
        ok(" 7us ", Duration::from_micros(7));
        ok("7µs", Duration::from_micros(7));
        ok("3ns", Duration::from_nanos(3));
        ok("1.000000000s", Duration::from_secs(1));
        ok("0.000000001s", Duration::from_nanos(1));
        ok("0.5ms", Duration::from_micros(500));
        ok("0.25h", Duration::from_secs(900));
    }

    #[test]
    fn rejected() {
        let bad = |s: &str, why: &str| {
            let err = parse(s).unwrap_err();
            assert!(err.contains(why), "{s}: {err}");
        };
        bad("", "empty");
        bad("5", "no unit");
        bad("5 s", "no unit");
        bad("5sec", "unknown unit \"sec\"");
        bad("5d", "unknown unit \"d\"");
        bad("-5s", "expected a number, found '-'");
        bad("s", "expected a number");
        bad("1.s", "digit must follow");
        bad(".5s", "expected a number");
        bad("0.0000000001s", "finer than a nanosecond");
        bad("1.5ns", "finer than a nanosecond");
        bad("99999999999999999999999999999999h", "too long");
        bad("99999999999999999999999h", "too long");
        bad("1e3s", "unknown unit \"e\"");
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_micros(1500),
            Duration::from_millis(250),
            Duration::from_millis(1500),
            Duration::from_secs(30),
            Duration::from_secs(120),
            Duration::from_secs(7200),
            Duration::new(3, 7),
            Duration::MAX,
        ] {
            assert_eq!(parse(&format(d)), Ok(d), "{}", format(d));
        }
        assert_eq!(format(Duration::from_secs(5400)), "90m");
    }
}
