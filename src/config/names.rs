//! Names for values that files spell as words: gRPC status codes and header units.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::deadline::HeaderUnit;
use crate::grpc::Code;

/// The gRPC spec's names of the codes, by number.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Written as the gRPC spec names it (`"UNAVAILABLE"`).
impl Serialize for Code {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(CODE_NAMES[self.as_i32() as usize])
    }
}

/// Read from the gRPC spec's name in any case (`"UNAVAILABLE"`, `"resource_exhausted"`) or
/// the number (`14`).
impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CodeVisitor)
    }
}

struct CodeVisitor;

impl Visitor<'_> for CodeVisitor {
    type Value = Code;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a gRPC status code, by name (\"UNAVAILABLE\") or number (14)")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Code, E> {
        CODE_NAMES
            .iter()
            .position(|name| name.eq_ignore_ascii_case(s))
            .and_then(|n| Code::from_i32(n as i32))
            .ok_or_else(|| E::custom(format_args!("unknown gRPC status code {s:?}")))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Code, E> {
        i32::try_from(n)
            .ok()
            .and_then(Code::from_i32)
            .ok_or_else(|| E::custom(format_args!("unknown gRPC status code {n} (0 to 16)")))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Code, E> {
        self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

/// `HeaderUnit` as `"s"` or `"ms"`; for `#[serde(with = "…")]`.
pub(crate) mod header_unit {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(unit: &HeaderUnit, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match unit {
            HeaderUnit::Seconds => "s",
            HeaderUnit::Milliseconds => "ms",
        })
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HeaderUnit, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "s" | "seconds" => Ok(HeaderUnit::Seconds),
            "ms" | "milliseconds" => Ok(HeaderUnit::Milliseconds),
            _ => Err(de::Error::custom(format_args!(
                "unknown header unit {s:?} (use \"s\" or \"ms\")"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_name() {
        for (n, name) in CODE_NAMES.iter().enumerate() {
            let code = Code::from_i32(n as i32).unwrap();
            // The spec's name is the Rust name in upper snake case.
            let rust: String = format!("{code:?}")
                .chars()
                .enumerate()
                .flat_map(|(i, c)| {
                    let sep = (i > 0 && c.is_ascii_uppercase()).then_some('_');
                    sep.into_iter().chain(Some(c.to_ascii_uppercase()))
                })
                .collect();
            assert_eq!(&rust, name);
            assert_eq!(CodeVisitor.visit_str::<de::value::Error>(name), Ok(code));
        }
    }
}
