//! The fault taxonomy: what went wrong with an upstream call, and what that means.
//!
//! Every failure that crosses a layer of this crate is, or can be classified as, a [`Fault`].
//! A fault's name is the proxy error type of [RFC 9209] (the `error=` parameter of the
//! `Proxy-Status` header), and each fault knows the HTTP status and gRPC code a gateway
//! answers with, and whether the request may have reached the upstream application
//! ([`Sent`]), which is what decides whether a retry is safe.
//!
//! [`classify`] walks an error's [`source()`](std::error::Error::source) chain and recognises
//! the errors of the crate's own layers, `std::io::Error`, tower's and tokio's `Elapsed`,
//! tower's `Overloaded`, and (behind features) hyper, hyper-util, h2 and tonic errors. A
//! [`Classifier`] adds your own rules for your own error types in front of the built-in ones.
//!
//! # Example
//!
//! ```
//! use std::io;
//! use http::StatusCode;
//! use tower_upstream::fault::{classify, Fault, Sent};
//!
//! let err: tower::BoxError = Box::new(io::Error::from(io::ErrorKind::ConnectionRefused));
//! let c = classify(&*err);
//! assert_eq!(c.fault(), Fault::ConnectionRefused);
//! assert_eq!(c.fault().name(), "connection_refused");
//! assert_eq!(c.fault().http_status(), StatusCode::BAD_GATEWAY);
//! assert_eq!(c.sent(), Sent::NotSent); // safe to retry, whatever the method
//! ```
//!
//! # Your own errors
//!
//! ```
//! use std::fmt;
//! use tower_upstream::fault::{Classification, Classifier, Fault};
//!
//! #[derive(Debug)]
//! struct PoolExhausted;
//! impl fmt::Display for PoolExhausted {
//!     fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
//!         f.write_str("connection pool exhausted")
//!     }
//! }
//! impl std::error::Error for PoolExhausted {}
//!
//! let classifier = Classifier::new().with(|err| {
//!     err.is::<PoolExhausted>()
//!         .then(|| Classification::new(Fault::ConnectionLimitReached))
//! });
//! let err: tower::BoxError = Box::new(PoolExhausted);
//! assert_eq!(classifier.classify(&*err).fault(), Fault::ConnectionLimitReached);
//! ```
//!
//! [RFC 9209]: https://www.rfc-editor.org/rfc/rfc9209

mod classify;

use std::fmt;
use std::time::Duration;

use http::StatusCode;

use crate::grpc;

pub use self::classify::{classify, Classifier};

/// What went wrong with an upstream call, named as RFC 9209's proxy error types.
///
/// The table of [`Fault::http_status`], [`Fault::grpc_code`] and [`Fault::sent`] is the
/// crate's stable contract (see the crate docs' status table); changing a row is a breaking
/// change.
#[non_exhaustive]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// `dns_error`: the upstream's name did not resolve. 502, not sent.
    DnsError,
    /// `dns_timeout`: resolving the upstream's name timed out. 504, not sent.
    DnsTimeout,
    /// `destination_ip_unroutable`: no route to the upstream's address (host or network
    /// unreachable). 502, not sent.
    DestinationIpUnroutable,
    /// `connection_refused`: the upstream refused the connection. 502, not sent.
    ConnectionRefused,
    /// `connection_timeout`: connecting to the upstream timed out. 504, not sent.
    ConnectionTimeout,
    /// `connection_terminated`: the connection was reset or closed before a complete
    /// response head arrived. 502, maybe processed.
    ConnectionTerminated,
    /// `tls_protocol_error`: the TLS handshake with the upstream failed. 502, not sent.
    TlsProtocolError,
    /// `tls_certificate_error`: the upstream's certificate was rejected. 502, not sent.
    TlsCertificateError,
    /// `http_response_incomplete`: the upstream closed the connection before its response
    /// head was complete (in the middle of it, or, as hyper reports it, before any of it).
    /// 502, maybe processed.
    HttpResponseIncomplete,
    /// `http_protocol_error`: the upstream's response was malformed (bad status line, bad
    /// header, bad or conflicting length, HTTP/0.9, HTTP/2 protocol error). 502, maybe
    /// processed.
    HttpProtocolError,
    /// `http_response_header_section_size`: the upstream's response head was too large.
    /// 502, maybe processed.
    HttpResponseHeaderSectionSize,
    /// `http_response_timeout`: no response head arrived before the attempt timeout or the
    /// request's deadline. 504, maybe processed (not sent when the deadline was spent before
    /// an attempt could start).
    HttpResponseTimeout,
    /// `destination_unavailable`: the gateway refuses to call the upstream for now (its
    /// circuit is open). 503 with `Retry-After`, not sent.
    DestinationUnavailable,
    /// `connection_limit_reached`: the gateway shed the request because too many are in
    /// flight. 503, not sent.
    ConnectionLimitReached,
    /// `proxy_internal_error`: an error nothing recognised. 502 by default (the mapper can
    /// be configured otherwise), maybe processed.
    ProxyInternalError,
}

/// Whether a failed request may have reached the upstream application.
///
/// This is the one fact a retry needs: a request that was [`NotSent`](Sent::NotSent) can be
/// retried whatever its method; one that was [`MaybeProcessed`](Sent::MaybeProcessed) only
/// if it is idempotent (RFC 9110 §9.2.2) or carries an `Idempotency-Key`.
#[non_exhaustive]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Sent {
    /// The request never left the gateway, or the upstream said it did not process it.
    NotSent,
    /// The request may have been processed by the upstream application.
    MaybeProcessed,
}

impl Fault {
    /// Every fault, in declaration order.
    pub const ALL: &'static [Fault] = &[
        Fault::DnsError,
        Fault::DnsTimeout,
        Fault::DestinationIpUnroutable,
        Fault::ConnectionRefused,
        Fault::ConnectionTimeout,
        Fault::ConnectionTerminated,
        Fault::TlsProtocolError,
        Fault::TlsCertificateError,
        Fault::HttpResponseIncomplete,
        Fault::HttpProtocolError,
        Fault::HttpResponseHeaderSectionSize,
        Fault::HttpResponseTimeout,
        Fault::DestinationUnavailable,
        Fault::ConnectionLimitReached,
        Fault::ProxyInternalError,
    ];

    /// The RFC 9209 proxy error type, as sent in `Proxy-Status: gw; error=<name>`.
    pub const fn name(self) -> &'static str {
        match self {
            Fault::DnsError => "dns_error",
            Fault::DnsTimeout => "dns_timeout",
            Fault::DestinationIpUnroutable => "destination_ip_unroutable",
            Fault::ConnectionRefused => "connection_refused",
            Fault::ConnectionTimeout => "connection_timeout",
            Fault::ConnectionTerminated => "connection_terminated",
            Fault::TlsProtocolError => "tls_protocol_error",
            Fault::TlsCertificateError => "tls_certificate_error",
            Fault::HttpResponseIncomplete => "http_response_incomplete",
            Fault::HttpProtocolError => "http_protocol_error",
            Fault::HttpResponseHeaderSectionSize => "http_response_header_section_size",
            Fault::HttpResponseTimeout => "http_response_timeout",
            Fault::DestinationUnavailable => "destination_unavailable",
            Fault::ConnectionLimitReached => "connection_limit_reached",
            Fault::ProxyInternalError => "proxy_internal_error",
        }
    }

    /// The HTTP status a gateway answers with for this fault.
    pub const fn http_status(self) -> StatusCode {
        match self {
            Fault::DnsTimeout | Fault::ConnectionTimeout | Fault::HttpResponseTimeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Fault::DestinationUnavailable | Fault::ConnectionLimitReached => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Fault::DnsError
            | Fault::DestinationIpUnroutable
            | Fault::ConnectionRefused
            | Fault::ConnectionTerminated
            | Fault::TlsProtocolError
            | Fault::TlsCertificateError
            | Fault::HttpResponseIncomplete
            | Fault::HttpProtocolError
            | Fault::HttpResponseHeaderSectionSize
            | Fault::ProxyInternalError => StatusCode::BAD_GATEWAY,
        }
    }

    /// The `grpc-status` a gateway answers a gRPC call with for this fault.
    pub const fn grpc_code(self) -> grpc::Code {
        match self {
            Fault::DnsTimeout | Fault::ConnectionTimeout | Fault::HttpResponseTimeout => {
                grpc::Code::DeadlineExceeded
            }
            _ => grpc::Code::Unavailable,
        }
    }

    /// Whether a request that failed with this fault may have been processed, when nothing
    /// more specific is known. [`Classification::sent`] is the authoritative answer for one
    /// error: an HTTP/2 `REFUSED_STREAM` is a [`ConnectionTerminated`](Fault::ConnectionTerminated)
    /// that was not sent, for example.
    pub const fn sent(self) -> Sent {
        match self {
            Fault::DnsError
            | Fault::DnsTimeout
            | Fault::DestinationIpUnroutable
            | Fault::ConnectionRefused
            | Fault::ConnectionTimeout
            | Fault::TlsProtocolError
            | Fault::TlsCertificateError
            | Fault::DestinationUnavailable
            | Fault::ConnectionLimitReached => Sent::NotSent,
            Fault::ConnectionTerminated
            | Fault::HttpResponseIncomplete
            | Fault::HttpProtocolError
            | Fault::HttpResponseHeaderSectionSize
            | Fault::HttpResponseTimeout
            | Fault::ProxyInternalError => Sent::MaybeProcessed,
        }
    }

    /// Whether the gateway itself refused the request (circuit open, shed): such faults say
    /// nothing about the upstream's health, so a breaker does not count them and a retry
    /// budget is not drawn on for them.
    pub const fn is_local_rejection(self) -> bool {
        matches!(
            self,
            Fault::DestinationUnavailable | Fault::ConnectionLimitReached
        )
    }

    /// A short, fixed, client-safe sentence describing the fault (no host names, addresses
    /// or error text). Used as the problem's `detail` (its `title` is the status's reason
    /// phrase) and the default `grpc-message`.
    pub const fn title(self) -> &'static str {
        match self {
            Fault::DnsError => "upstream name did not resolve",
            Fault::DnsTimeout => "upstream name resolution timed out",
            Fault::DestinationIpUnroutable => "upstream is unreachable",
            Fault::ConnectionRefused => "upstream refused the connection",
            Fault::ConnectionTimeout => "upstream connection timed out",
            Fault::ConnectionTerminated => "upstream connection was terminated",
            Fault::TlsProtocolError => "TLS handshake with upstream failed",
            Fault::TlsCertificateError => "upstream TLS certificate was rejected",
            Fault::HttpResponseIncomplete => "upstream response was incomplete",
            Fault::HttpProtocolError => "upstream response was malformed",
            Fault::HttpResponseHeaderSectionSize => "upstream response head was too large",
            Fault::HttpResponseTimeout => "upstream did not answer in time",
            Fault::DestinationUnavailable => "upstream is temporarily unavailable",
            Fault::ConnectionLimitReached => "gateway is overloaded",
            Fault::ProxyInternalError => "upstream request failed",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The outcome of classifying one error: the [`Fault`], whether the request was [`Sent`],
/// and the time after which the caller may try again, where known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classification {
    fault: Fault,
    sent: Sent,
    retry_after: Option<Duration>,
}

impl Classification {
    /// A classification with the fault's default [`Sent`] and no retry-after.
    pub const fn new(fault: Fault) -> Self {
        Classification {
            fault,
            sent: fault.sent(),
            retry_after: None,
        }
    }

    /// Overrides whether the request was sent.
    pub const fn with_sent(mut self, sent: Sent) -> Self {
        self.sent = sent;
        self
    }

    /// Sets the time after which the caller may try again (a circuit's next probe, a
    /// shed request's back-off).
    pub const fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// The fault.
    pub const fn fault(&self) -> Fault {
        self.fault
    }

    /// Whether the request may have been processed by the upstream.
    pub const fn sent(&self) -> Sent {
        self.sent
    }

    /// When the caller may try again, if known.
    pub const fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl From<Fault> for Classification {
    fn from(fault: Fault) -> Self {
        Classification::new(fault)
    }
}
