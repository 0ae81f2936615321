//! gRPC details the gateway needs: the status codes it emits and how to spot a gRPC call.
//!
//! ```
//! use tower_upstream::grpc::{self, Code};
//!
//! let req = http::Request::builder()
//!     .header("content-type", "application/grpc+proto")
//!     .body(())
//!     .unwrap();
//! assert!(grpc::is_grpc(req.headers()));
//! assert_eq!(Code::Unavailable.as_i32(), 14);
//! assert_eq!(Code::from_header(&http::HeaderValue::from_static("4")), Some(Code::DeadlineExceeded));
//! ```

use std::fmt;

use http::{HeaderMap, HeaderValue};

/// A gRPC status code (the `grpc-status` trailer), as the gRPC spec numbers them.
#[non_exhaustive]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    /// 0: not an error.
    Ok,
    /// 1: the operation was cancelled, typically by the caller.
    Cancelled,
    /// 2: unknown error.
    Unknown,
    /// 3: the client specified an invalid argument.
    InvalidArgument,
    /// 4: the deadline expired before the operation could complete.
    DeadlineExceeded,
    /// 5: some requested entity was not found.
    NotFound,
    /// 6: the entity that a client attempted to create already exists.
    AlreadyExists,
    /// 7: the caller does not have permission.
    PermissionDenied,
    /// 8: some resource has been exhausted.
    ResourceExhausted,
    /// 9: the system is not in a state required for the operation.
    FailedPrecondition,
    /// 10: the operation was aborted.
    Aborted,
    /// 11: the operation was attempted past the valid range.
    OutOfRange,
    /// 12: the operation is not implemented or supported.
    Unimplemented,
    /// 13: internal error.
    Internal,
    /// 14: the service is currently unavailable; retrying may help.
    Unavailable,
    /// 15: unrecoverable data loss or corruption.
    DataLoss,
    /// 16: the request lacks valid authentication credentials.
    Unauthenticated,
}

const CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

const DIGITS: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

impl Code {
    /// The code's number.
    pub const fn as_i32(self) -> i32 {
        self as i32
    }

    /// The code with this number, if there is one.
    pub fn from_i32(n: i32) -> Option<Code> {
        usize::try_from(n).ok().and_then(|i| CODES.get(i).copied())
    }

    /// Parses a `grpc-status` header value (decimal digits only).
    pub fn from_header(value: &HeaderValue) -> Option<Code> {
        let s = value.to_str().ok()?;
        if s.is_empty() || s.len() > 2 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Code::from_i32(s.parse().ok()?)
    }

    /// The code as a `grpc-status` header value (no allocation).
    pub fn to_header_value(self) -> HeaderValue {
        HeaderValue::from_static(DIGITS[self as usize])
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Whether a request (or response) is gRPC: its `content-type` is `application/grpc`,
/// optionally followed by `+<codec>` or `;<params>`.
///
/// gRPC-Web (`application/grpc-web…`) is not gRPC in this sense: it carries trailers in the
/// body, so it gets ordinary HTTP answers.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|ct| is_grpc_content_type(ct.as_bytes()))
}

fn is_grpc_content_type(ct: &[u8]) -> bool {
    const PREFIX: &[u8] = b"application/grpc";
    if ct.len() < PREFIX.len() || !ct[..PREFIX.len()].eq_ignore_ascii_case(PREFIX) {
        return false;
    }
    matches!(ct.get(PREFIX.len()), None | Some(b'+') | Some(b';'))
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 spec says: every byte outside
/// printable ASCII (0x20..=0x7E), and `%` itself, becomes `%XX`.
pub(crate) fn encode_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc+json",
            "application/grpc;charset=utf-8",
            "Application/GRPC",
        ] {
            assert!(is_grpc_content_type(ct.as_bytes()), "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/grpcx",
            "application/json",
            "",
            "application/grp",
        ] {
            assert!(!is_grpc_content_type(ct.as_bytes()), "{ct}");
        }
    }

    #[test]
    fn codes_round_trip() {
        for (i, code) in CODES.iter().enumerate() {
            assert_eq!(code.as_i32(), i as i32);
            assert_eq!(Code::from_i32(i as i32), Some(*code));
            assert_eq!(Code::from_header(&code.to_header_value()), Some(*code));
        }
        assert_eq!(Code::from_i32(17), None);
        assert_eq!(Code::from_i32(-1), None);
        for bad in ["", "-1", "+4", "004", "17", "99", "1.0", "a"] {
            assert_eq!(
                Code::from_header(&HeaderValue::from_static(bad)),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn message_encoding() {
        assert_eq!(encode_message("plain text"), "plain text");
        assert_eq!(encode_message("100%"), "100%25");
        assert_eq!(encode_message("é\n"), "%C3%A9%0A");
    }
}
