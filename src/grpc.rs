//! gRPC details the gateway needs: the status codes it emits, how to spot a gRPC call, and the
//! `grpc-timeout` header's codec; with the `tonic` feature, [`IntoTonicBody`] to put the whole
//! stack around a tonic `Channel`.
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
//!
//! `grpc-timeout`, as the [gRPC over HTTP/2] spec defines it: at most 8 ASCII digits and a unit.
//!
//! ```
//! use std::time::Duration;
//! use http::HeaderValue;
//! use tower_upstream::grpc;
//!
//! assert_eq!(grpc::parse_timeout(&HeaderValue::from_static("100m")), Some(Duration::from_millis(100)));
//! assert_eq!(grpc::parse_timeout(&HeaderValue::from_static("123456789n")), None); // 9 digits
//! assert_eq!(grpc::encode_timeout(Duration::from_millis(1500)), "1500000u");
//! ```
//!
//! [gRPC over HTTP/2]: https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md

use std::fmt;
use std::time::Duration;

use http::header::HeaderName;
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

pub(crate) fn is_grpc_content_type(ct: &[u8]) -> bool {
    const PREFIX: &[u8] = b"application/grpc";
    if ct.len() < PREFIX.len() || !ct[..PREFIX.len()].eq_ignore_ascii_case(PREFIX) {
        return false;
    }
    matches!(ct.get(PREFIX.len()), None | Some(b'+') | Some(b';'))
}

/// The `grpc-timeout` request header: how long the client waits for the call.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The `grpc-status` header (or trailer). A name made once: looking a header up by a `&str`
/// parses the name each time, and the breaker and the retry policy look this one up in every
/// response.
pub(crate) static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The `grpc-retry-pushback-ms` header (or trailer).
pub(crate) static GRPC_PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// The largest value `grpc-timeout` can carry: 8 digits.
const MAX_TIMEOUT_VALUE: u64 = 99_999_999;

/// Parses a `grpc-timeout` value strictly: 1 to 8 ASCII digits followed by one unit, `H`
/// (hours), `M` (minutes), `S` (seconds), `m` (milliseconds), `u` (microseconds) or `n`
/// (nanoseconds), nothing else (no sign, no spaces, no decimal point).
///
/// Returns `None` for anything else; never panics. The largest value, `99999999H`, is about
/// 11 400 years: callers cap it with their own limits.
///
/// ```
/// use std::time::Duration;
/// use http::HeaderValue;
/// use tower_upstream::grpc::parse_timeout;
///
/// assert_eq!(parse_timeout(&HeaderValue::from_static("5S")), Some(Duration::from_secs(5)));
/// assert_eq!(parse_timeout(&HeaderValue::from_static("0n")), Some(Duration::ZERO));
/// for bad in ["", "5", "S", "-5S", "5s", "5 S", "1.5S", "123456789m"] {
///     assert_eq!(parse_timeout(&HeaderValue::from_static(bad)), None, "{bad}");
/// }
/// ```
pub fn parse_timeout(value: &HeaderValue) -> Option<Duration> {
    let bytes = value.as_bytes();
    let (&unit, digits) = bytes.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The `grpc-timeout` of a request's headers, if it has a valid one.
///
/// A malformed value (see [`parse_timeout`]) is ignored with a `debug` event, as if the
/// header were absent; so is a header repeated with different values.
pub fn timeout_of(headers: &HeaderMap) -> Option<Duration> {
    let mut values = headers.get_all(&GRPC_TIMEOUT).iter();
    let value = values.next()?;
    let timeout = parse_timeout(value);
    if timeout.is_none() {
        tracing::debug!(value = ?value, "ignoring malformed grpc-timeout");
        return None;
    }
    if values.any(|other| other != value) {
        tracing::debug!("ignoring conflicting grpc-timeout values");
        return None;
    }
    timeout
}

/// Encodes a duration as a `grpc-timeout` value in the finest unit whose 8 digits can hold
/// it (`n`, `u`, `m`, `S`, `M`, then `H`), rounding down within that unit; a duration past
/// `99999999H` is sent as `99999999H`. Zero is `0n`.
///
/// ```
/// use std::time::Duration;
/// use tower_upstream::grpc::encode_timeout;
///
/// assert_eq!(encode_timeout(Duration::from_nanos(99_999_999)), "99999999n");
/// assert_eq!(encode_timeout(Duration::from_millis(100)), "100000u");
/// assert_eq!(encode_timeout(Duration::from_secs(3600)), "3600000m");
/// assert_eq!(encode_timeout(Duration::ZERO), "0n");
/// ```
pub fn encode_timeout(timeout: Duration) -> HeaderValue {
    let nanos = timeout.as_nanos();
    let secs = timeout.as_secs();
    let (n, unit) = if nanos <= u128::from(MAX_TIMEOUT_VALUE) {
        (nanos as u64, b'n')
    } else if timeout.as_micros() <= u128::from(MAX_TIMEOUT_VALUE) {
        (timeout.as_micros() as u64, b'u')
    } else if timeout.as_millis() <= u128::from(MAX_TIMEOUT_VALUE) {
        (timeout.as_millis() as u64, b'm')
    } else if secs <= MAX_TIMEOUT_VALUE {
        (secs, b'S')
    } else if secs / 60 <= MAX_TIMEOUT_VALUE {
        (secs / 60, b'M')
    } else {
        ((secs / 3600).min(MAX_TIMEOUT_VALUE), b'H')
    };
    let mut buf = [0u8; 9];
    let mut i = 8;
    buf[i] = unit;
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    HeaderValue::from_bytes(&buf[i..]).expect("digits and a unit letter are a valid header value")
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

#[cfg(feature = "tonic")]
pub use self::tonic_body::{IntoTonicBody, IntoTonicBodyLayer};

#[cfg(feature = "tonic")]
mod tonic_body {
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http::Request;
    use tower::BoxError;
    use tower_layer::Layer;
    use tower_service::Service;

    /// Hands a tonic client transport (a `tonic::transport::Channel`, or any service taking
    /// `http::Request<tonic::body::Body>`) requests with any body, by putting the body in a
    /// `tonic::body::Body`.
    ///
    /// The stack's retry hands its inner service `Request<ReplayBody<B>>` (the body it can
    /// send again); a `Channel` takes `Request<tonic::body::Body>`. This is the one step
    /// between them:
    ///
    /// ```
    /// use tonic::transport::Endpoint;
    /// use tower::{BoxError, Layer};
    /// use tower_upstream::grpc::IntoTonicBody;
    /// use tower_upstream::Upstream;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), BoxError> {
    /// let channel = Endpoint::from_static("http://127.0.0.1:50051").connect_lazy();
    /// let svc = Upstream::builder().build()?.layer(IntoTonicBody::new(channel));
    /// // `svc` is a `GrpcService`: `GreeterClient::new(svc)`, `tonic::client::Grpc::new(svc)`.
    /// # let _ = tonic::client::Grpc::new(svc);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// The [tonic guide](crate::guide::tonic) has the whole story.
    #[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
    #[derive(Clone, Debug)]
    pub struct IntoTonicBody<S> {
        inner: S,
    }

    impl<S> IntoTonicBody<S> {
        /// Wraps `inner`, a service taking `http::Request<tonic::body::Body>`.
        pub fn new(inner: S) -> Self {
            IntoTonicBody { inner }
        }

        inner_accessors!("service", S);
    }

    impl<S, B> Service<Request<B>> for IntoTonicBody<S>
    where
        S: Service<Request<tonic::body::Body>>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;

        #[inline]
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
            self.inner.poll_ready(cx)
        }

        #[inline]
        fn call(&mut self, req: Request<B>) -> S::Future {
            self.inner.call(req.map(tonic::body::Body::new))
        }
    }

    /// Applies [`IntoTonicBody`]: `ServiceBuilder::new().layer(upstream_layer)
    /// .layer(IntoTonicBodyLayer::new()).service(channel)`.
    #[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct IntoTonicBodyLayer {
        _private: (),
    }

    impl IntoTonicBodyLayer {
        /// The layer.
        pub fn new() -> Self {
            IntoTonicBodyLayer::default()
        }
    }

    impl<S> Layer<S> for IntoTonicBodyLayer {
        type Service = IntoTonicBody<S>;

        fn layer(&self, inner: S) -> IntoTonicBody<S> {
            IntoTonicBody::new(inner)
        }
    }
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

    fn parse(s: &[u8]) -> Option<Duration> {
        parse_timeout(&HeaderValue::from_bytes(s).unwrap())
    }

    #[test]
    fn timeout_units() {
        assert_eq!(parse(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse(b"4m"), Some(Duration::from_millis(4)));
        assert_eq!(parse(b"5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse(b"6n"), Some(Duration::from_nanos(6)));
        assert_eq!(parse(b"00000007S"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse(b"99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
    }

    #[test]
    fn malformed_timeouts_are_rejected() {
        let bad: &[&[u8]] = &[
            b"",
            b"m",
            b"100",
            b"123456789m", // 9 digits
            b"100x",       // unknown unit
            b"100s",       // units are case-sensitive
            b"100ms",
            b"-100m", // negative
            b"+100m",
            b" 100m",
            b"100m ",
            b"1.5S",
            b"1e3m",
            b"\xd9\xa1m",   // non-ASCII digit (U+0661)
            b"100\xc2\xb5", // non-ASCII unit
            b"0x10m",
        ];
        for v in bad {
            assert_eq!(parse(v), None, "{:?}", String::from_utf8_lossy(v));
        }
    }

    #[test]
    fn malformed_header_is_ignored() {
        let mut h = HeaderMap::new();
        assert_eq!(timeout_of(&h), None);
        h.insert(GRPC_TIMEOUT, HeaderValue::from_static("100x"));
        assert_eq!(timeout_of(&h), None);
        h.insert(GRPC_TIMEOUT, HeaderValue::from_static("100m"));
        assert_eq!(timeout_of(&h), Some(Duration::from_millis(100)));
        h.append(GRPC_TIMEOUT, HeaderValue::from_static("100m"));
        assert_eq!(timeout_of(&h), Some(Duration::from_millis(100)));
        h.append(GRPC_TIMEOUT, HeaderValue::from_static("1S"));
        assert_eq!(timeout_of(&h), None);
    }

    #[test]
    fn timeout_encoding() {
        let cases = [
            (Duration::ZERO, "0n"),
            (Duration::from_nanos(1), "1n"),
            (Duration::from_nanos(99_999_999), "99999999n"),
            (Duration::from_nanos(100_000_001), "100000u"),
            (Duration::from_millis(100), "100000u"),
            (Duration::from_secs(5), "5000000u"),
            (Duration::from_micros(99_999_999), "99999999u"),
            (Duration::from_secs(100), "100000m"),
            (Duration::from_secs(99_999), "99999000m"),
            (Duration::from_secs(100_000), "100000S"),
            (Duration::from_secs(99_999_999), "99999999S"),
            (Duration::from_secs(100_000_000), "1666666M"),
            (Duration::from_secs(99_999_999 * 60 + 59), "99999999M"),
            (Duration::from_secs(99_999_999 * 60 + 60), "1666666H"),
            (Duration::MAX, "99999999H"),
        ];
        for (d, want) in cases {
            let v = encode_timeout(d);
            assert_eq!(v, want, "{d:?}");
            // Every encoding parses back, never to more than the original.
            let back = parse_timeout(&v).unwrap();
            assert!(back <= d, "{d:?} -> {want} -> {back:?}");
        }
    }

    #[test]
    fn message_encoding() {
        assert_eq!(encode_message("plain text"), "plain text");
        assert_eq!(encode_message("100%"), "100%25");
        assert_eq!(encode_message("é\n"), "%C3%A9%0A");
    }
}
