//! The one classifier: walks an error's `source()` chain and names the fault.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::sync::Arc;

use super::{Classification, Fault, Sent};

type Rule = dyn Fn(&(dyn StdError + 'static)) -> Option<Classification> + Send + Sync;

/// Classifies errors into [`Classification`]s: the built-in rules, plus your own in front.
///
/// A `Classifier` is cheap to clone (an `Arc`), and every layer of this crate that looks at
/// errors (the retry deciding, the breaker counting, the mapper answering) takes one, so the
/// same rules apply everywhere. [`Classifier::default()`] has only the built-in rules, which
/// is what [`classify`] uses.
///
/// Custom rules are tried first, on every error of the `source()` chain from the outermost
/// in; the first rule to return `Some` wins. Where none does, the built-in rules run.
///
/// ```
/// use tower_upstream::fault::{Classification, Classifier, Fault, Sent};
///
/// // Treat any error whose message says "quota" as the upstream shedding load.
/// let classifier = Classifier::new().with(|err| {
///     err.to_string()
///         .contains("quota")
///         .then(|| Classification::new(Fault::ConnectionLimitReached).with_sent(Sent::NotSent))
/// });
/// let err: tower::BoxError = "quota exceeded".into();
/// assert_eq!(classifier.classify(&*err).fault(), Fault::ConnectionLimitReached);
/// ```
#[derive(Clone, Default)]
pub struct Classifier {
    rules: Option<Arc<[Arc<Rule>]>>,
}

impl Classifier {
    /// A classifier with the built-in rules only.
    pub fn new() -> Self {
        Classifier::default()
    }

    /// Adds a rule, tried before the built-in ones (and after rules added earlier) on each
    /// error of the chain.
    pub fn with<F>(self, rule: F) -> Self
    where
        F: Fn(&(dyn StdError + 'static)) -> Option<Classification> + Send + Sync + 'static,
    {
        let mut rules: Vec<Arc<Rule>> = self.rules.as_deref().unwrap_or(&[]).to_vec();
        rules.push(Arc::new(rule));
        Classifier {
            rules: Some(rules.into()),
        }
    }

    /// Classifies an error.
    pub fn classify(&self, err: &(dyn StdError + 'static)) -> Classification {
        if let Some(rules) = &self.rules {
            let mut cur = Some(err);
            while let Some(e) = cur {
                for rule in rules.iter() {
                    if let Some(c) = rule(e) {
                        return c;
                    }
                }
                cur = next_in_chain(e);
            }
        }
        classify(err)
    }
}

impl fmt::Debug for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Classifier")
            .field("custom_rules", &self.rules.as_ref().map_or(0, |r| r.len()))
            .finish()
    }
}

/// What the chain walked so far says about where the error happened.
#[derive(Default, Clone, Copy)]
struct Context {
    /// Below a connector error: nothing was sent.
    connect: bool,
    /// Below a name-resolution error.
    dns: bool,
}

enum Step {
    /// This error names the fault.
    Done(Classification),
    /// Nothing definite here; look at the source.
    Next,
}

/// Classifies an error with the built-in rules.
///
/// Walks the error and its `source()` chain from the outermost in, and recognises:
///
/// - the errors of this crate's layers ([`DeadlineExceeded`](crate::deadline::error::DeadlineExceeded),
///   [`Elapsed`](crate::timeout::error::Elapsed), [`CircuitOpen`](crate::breaker::error::CircuitOpen));
/// - `tower::load_shed::error::Overloaded` (shed: `connection_limit_reached`);
/// - `tower::timeout::error::Elapsed` and `tokio::time::error::Elapsed` (timeouts);
/// - `std::io::Error`, by [`io::ErrorKind`];
/// - with the `hyper` feature: `hyper::Error`, `hyper_util::client::legacy::Error`
///   (connect errors, DNS failures, connect timeouts) and `h2::Error` (`REFUSED_STREAM` and a
///   peer's `GOAWAY` mean the request was not processed);
/// - with the `tonic` feature: `tonic::Status` (by code, when its source says nothing
///   more), `tonic::transport::Error`, `tonic::ConnectError` (a `Channel`'s connect
///   errors: not sent) and `tonic::TimeoutExpired` (a `Channel`'s timeout);
/// - with the `rustls` feature: `rustls::Error` (certificate problems are
///   `tls_certificate_error`, the rest `tls_protocol_error`).
///
/// An error nothing recognises is [`Fault::ProxyInternalError`], maybe processed, unless it
/// sits below a connect error, in which case it was not sent.
pub fn classify(err: &(dyn StdError + 'static)) -> Classification {
    let mut ctx = Context::default();
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Step::Done(c) = step(e, &mut ctx) {
            return c;
        }
        cur = next_in_chain(e);
    }
    if ctx.dns {
        Classification::new(Fault::DnsError)
    } else if ctx.connect {
        // A connector failed for a reason we do not know: nothing was sent.
        Classification::new(Fault::ProxyInternalError).with_sent(Sent::NotSent)
    } else {
        Classification::new(Fault::ProxyInternalError)
    }
}

/// The next error of the chain. `io::Error::source()` skips the error it wraps (it returns
/// the wrapped error's source), so look at the wrapped error itself.
fn next_in_chain<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a (dyn StdError + 'static)> {
    if let Some(inner) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
        return Some(inner);
    }
    e.source()
}

fn step(e: &(dyn StdError + 'static), ctx: &mut Context) -> Step {
    use crate::breaker::error::CircuitOpen;
    use crate::deadline::error::DeadlineExceeded;
    use crate::timeout::error::Elapsed;

    if let Some(open) = e.downcast_ref::<CircuitOpen>() {
        return Step::Done(
            Classification::new(Fault::DestinationUnavailable).with_retry_after(open.retry_after()),
        );
    }
    if let Some(d) = e.downcast_ref::<DeadlineExceeded>() {
        let c = Classification::new(Fault::HttpResponseTimeout);
        return Step::Done(if d.is_before_start() {
            c.with_sent(Sent::NotSent)
        } else {
            c
        });
    }
    if e.is::<Elapsed>()
        || e.is::<tower::timeout::error::Elapsed>()
        || e.is::<tokio::time::error::Elapsed>()
    {
        return Step::Done(timed_out(ctx));
    }
    if e.is::<tower::load_shed::error::Overloaded>() {
        return Step::Done(Classification::new(Fault::ConnectionLimitReached));
    }
    if let Some(io) = e.downcast_ref::<io::Error>() {
        return io_error(io, ctx);
    }
    #[cfg(feature = "hyper")]
    if let Some(step) = hyper_support::step(e, ctx) {
        return step;
    }
    #[cfg(feature = "tonic")]
    if let Some(step) = tonic_support::step(e, ctx) {
        return step;
    }
    #[cfg(feature = "rustls")]
    if let Some(err) = e.downcast_ref::<rustls::Error>() {
        return Step::Done(rustls_error(err, ctx));
    }
    Step::Next
}

/// A timer fired: which fault that is depends on what was being waited for.
fn timed_out(ctx: &Context) -> Classification {
    if ctx.dns {
        Classification::new(Fault::DnsTimeout)
    } else if ctx.connect {
        Classification::new(Fault::ConnectionTimeout)
    } else {
        Classification::new(Fault::HttpResponseTimeout)
    }
}

fn io_error(io: &io::Error, ctx: &mut Context) -> Step {
    use io::ErrorKind as K;
    // An io::Error may wrap the real cause (a timer, a TLS error, a user's error): when that
    // says something definite, it wins over the kind.
    if let Some(inner) = io.get_ref() {
        let mut inner_ctx = *ctx;
        if let Some(c) = classify_from(inner, &mut inner_ctx) {
            return Step::Done(c);
        }
    }
    let fault = match io.kind() {
        K::TimedOut => return Step::Done(timed_out(ctx)),
        K::ConnectionRefused => Fault::ConnectionRefused,
        K::HostUnreachable | K::NetworkUnreachable | K::AddrNotAvailable => {
            Fault::DestinationIpUnroutable
        }
        K::ConnectionReset
        | K::ConnectionAborted
        | K::BrokenPipe
        | K::UnexpectedEof
        | K::NotConnected => Fault::ConnectionTerminated,
        K::InvalidData => Fault::HttpProtocolError,
        _ if ctx.dns => Fault::DnsError,
        _ => return Step::Next,
    };
    let c = Classification::new(fault);
    Step::Done(if ctx.connect {
        c.with_sent(Sent::NotSent)
    } else {
        c
    })
}

/// TLS failures: the certificate (ours or theirs) was refused, or the handshake or record
/// layer failed. During connect nothing was sent; after it, the request may have been.
#[cfg(feature = "rustls")]
fn rustls_error(err: &rustls::Error, ctx: &Context) -> Classification {
    use rustls::AlertDescription as A;
    let fault = match err {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::InvalidCertRevocationList(_)
        | rustls::Error::AlertReceived(
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::CertificateRequired,
        ) => Fault::TlsCertificateError,
        _ => Fault::TlsProtocolError,
    };
    let c = Classification::new(fault);
    if ctx.connect {
        c
    } else {
        c.with_sent(Sent::MaybeProcessed)
    }
}

#[cfg(feature = "hyper")]
mod hyper_support {
    use std::error::Error as StdError;

    use super::{Context, Step};
    use crate::fault::{Classification, Fault, Sent};

    pub(super) fn step(e: &(dyn StdError + 'static), ctx: &mut Context) -> Option<Step> {
        if let Some(err) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
            if err.is_connect() {
                ctx.connect = true;
            }
            return Some(Step::Next);
        }
        if let Some(err) = e.downcast_ref::<hyper::Error>() {
            return Some(hyper_error(err));
        }
        if let Some(err) = e.downcast_ref::<h2::Error>() {
            return Some(h2_error(err, ctx));
        }
        // hyper-util's connector error type is private; its message is its only name.
        if ctx.connect && !ctx.dns && e.to_string() == "dns error" {
            ctx.dns = true;
            return Some(Step::Next);
        }
        None
    }

    fn hyper_error(err: &hyper::Error) -> Step {
        let fault = if err.is_parse_too_large() {
            Fault::HttpResponseHeaderSectionSize
        } else if err.is_parse() || err.is_parse_status() {
            Fault::HttpProtocolError
        } else if err.is_incomplete_message() {
            Fault::HttpResponseIncomplete
        } else if err.is_timeout() {
            Fault::HttpResponseTimeout
        } else if err.is_canceled() || err.is_closed() {
            // The request was dropped, or the connection task gone, before it was written.
            return Step::Done(
                Classification::new(Fault::ConnectionTerminated).with_sent(Sent::NotSent),
            );
        } else {
            // Io, Http2, body and user errors: the source says more.
            return Step::Next;
        };
        Step::Done(Classification::new(fault))
    }

    fn h2_error(err: &h2::Error, ctx: &mut Context) -> Step {
        if let Some(io) = err.get_io() {
            // h2::Error has no source(): look at the io::Error it holds.
            return super::io_error(io, ctx);
        }
        if err.is_go_away() && err.is_remote() {
            // h2 fails a stream with the peer's GOAWAY only when its id is above the peer's
            // last processed stream, or when it was opened after the GOAWAY: never processed.
            return Step::Done(
                Classification::new(Fault::ConnectionTerminated).with_sent(Sent::NotSent),
            );
        }
        let fault = match err.reason() {
            Some(h2::Reason::REFUSED_STREAM) => {
                return Step::Done(
                    Classification::new(Fault::ConnectionTerminated).with_sent(Sent::NotSent),
                )
            }
            Some(
                h2::Reason::PROTOCOL_ERROR
                | h2::Reason::FRAME_SIZE_ERROR
                | h2::Reason::COMPRESSION_ERROR
                | h2::Reason::FLOW_CONTROL_ERROR
                | h2::Reason::STREAM_CLOSED,
            ) => Fault::HttpProtocolError,
            Some(h2::Reason::HTTP_1_1_REQUIRED) => Fault::HttpProtocolError,
            _ if err.is_library() => Fault::HttpProtocolError,
            _ => Fault::ConnectionTerminated,
        };
        let c = Classification::new(fault);
        Step::Done(if ctx.connect {
            c.with_sent(Sent::NotSent)
        } else {
            c
        })
    }
}

#[cfg(feature = "tonic")]
mod tonic_support {
    use std::error::Error as StdError;

    use super::{Context, Step};
    use crate::fault::{Classification, Fault};

    pub(super) fn step(e: &(dyn StdError + 'static), ctx: &mut Context) -> Option<Step> {
        if e.is::<tonic::transport::Error>() {
            // "transport error": its source says what happened.
            return Some(Step::Next);
        }
        if e.is::<tonic::TimeoutExpired>() {
            // A `Channel`'s own timer (`Endpoint::timeout` or the request's `grpc-timeout`).
            return Some(Step::Done(super::timed_out(ctx)));
        }
        if e.is::<tonic::ConnectError>() {
            // A `Channel`'s connector failed (DNS, connect, connect timeout, TLS): nothing
            // was sent, and its source names the fault as under a hyper-util connect error.
            ctx.connect = true;
            return Some(Step::Next);
        }
        let status = e.downcast_ref::<tonic::Status>()?;
        if let Some(src) = status.source() {
            let mut inner = *ctx;
            let c = super::classify_from(src, &mut inner);
            if let Some(c) = c {
                return Some(Step::Done(c));
            }
        }
        let fault = match status.code() {
            tonic::Code::DeadlineExceeded => Fault::HttpResponseTimeout,
            tonic::Code::Unavailable => Fault::ConnectionTerminated,
            tonic::Code::Cancelled => Fault::ConnectionTerminated,
            _ => Fault::ProxyInternalError,
        };
        Some(Step::Done(Classification::new(fault)))
    }
}

/// Walks `err`'s chain with a context; `None` where nothing was definite.
fn classify_from(err: &(dyn StdError + 'static), ctx: &mut Context) -> Option<Classification> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Step::Done(c) = step(e, ctx) {
            return Some(c);
        }
        cur = next_in_chain(e);
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::breaker::error::CircuitOpen;
    use crate::deadline::error::DeadlineExceeded;

    /// An error that wraps another, like client libraries do.
    #[derive(Debug)]
    struct Wrap(&'static str, Box<dyn StdError + Send + Sync>);
    impl fmt::Display for Wrap {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl StdError for Wrap {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&*self.1)
        }
    }

    fn io(kind: io::ErrorKind) -> Box<dyn StdError + Send + Sync> {
        Box::new(io::Error::from(kind))
    }

    #[test]
    fn io_kinds() {
        use io::ErrorKind as K;
        let cases = [
            (
                K::ConnectionRefused,
                Fault::ConnectionRefused,
                Sent::NotSent,
            ),
            (
                K::ConnectionReset,
                Fault::ConnectionTerminated,
                Sent::MaybeProcessed,
            ),
            (
                K::BrokenPipe,
                Fault::ConnectionTerminated,
                Sent::MaybeProcessed,
            ),
            (
                K::UnexpectedEof,
                Fault::ConnectionTerminated,
                Sent::MaybeProcessed,
            ),
            (
                K::TimedOut,
                Fault::HttpResponseTimeout,
                Sent::MaybeProcessed,
            ),
            (
                K::HostUnreachable,
                Fault::DestinationIpUnroutable,
                Sent::NotSent,
            ),
            (
                K::InvalidData,
                Fault::HttpProtocolError,
                Sent::MaybeProcessed,
            ),
            (K::Other, Fault::ProxyInternalError, Sent::MaybeProcessed),
        ];
        for (kind, fault, sent) in cases {
            let c = classify(&*io(kind));
            assert_eq!((c.fault(), c.sent()), (fault, sent), "{kind:?}");
        }
    }

    #[test]
    fn walks_the_chain() {
        let err = Wrap(
            "outer",
            Box::new(Wrap("middle", io(io::ErrorKind::ConnectionReset))),
        );
        assert_eq!(classify(&err).fault(), Fault::ConnectionTerminated);
        // An io::Error that wraps a timer is a timeout.
        let err = io::Error::other(crate::timeout::error::Elapsed::new());
        assert_eq!(classify(&err).fault(), Fault::HttpResponseTimeout);
        // The wrapped cause wins over the io kind.
        let err = io::Error::new(
            io::ErrorKind::InvalidData,
            CircuitOpen::new(Duration::from_secs(1)),
        );
        assert_eq!(classify(&err).fault(), Fault::DestinationUnavailable);
        // Nothing definite inside: the kind decides.
        let err = io::Error::new(io::ErrorKind::InvalidData, "bad frame");
        assert_eq!(classify(&err).fault(), Fault::HttpProtocolError);
    }

    #[test]
    fn own_errors() {
        let c = classify(&CircuitOpen::new(Duration::from_millis(1500)));
        assert_eq!(c.fault(), Fault::DestinationUnavailable);
        assert_eq!(c.retry_after(), Some(Duration::from_millis(1500)));
        assert_eq!(c.sent(), Sent::NotSent);

        let c = classify(&DeadlineExceeded::before_start());
        assert_eq!(
            (c.fault(), c.sent()),
            (Fault::HttpResponseTimeout, Sent::NotSent)
        );
        let c = classify(&DeadlineExceeded::in_flight());
        assert_eq!(
            (c.fault(), c.sent()),
            (Fault::HttpResponseTimeout, Sent::MaybeProcessed)
        );
        let c = classify(&tower::load_shed::error::Overloaded::new());
        assert_eq!(
            (c.fault(), c.sent()),
            (Fault::ConnectionLimitReached, Sent::NotSent)
        );
    }

    #[test]
    fn custom_rules_come_first_and_see_the_chain() {
        let classifier = Classifier::new()
            .with(|e| (e.to_string() == "middle").then(|| Fault::TlsCertificateError.into()));
        let err = Wrap(
            "outer",
            Box::new(Wrap("middle", io(io::ErrorKind::ConnectionReset))),
        );
        assert_eq!(
            classifier.classify(&err).fault(),
            Fault::TlsCertificateError
        );
        // Without a match the built-in rules still apply.
        let err = Wrap("outer", io(io::ErrorKind::ConnectionRefused));
        assert_eq!(classifier.classify(&err).fault(), Fault::ConnectionRefused);
        assert_eq!(
            Classifier::new().classify(&err).fault(),
            Fault::ConnectionRefused
        );
    }

    #[test]
    fn unknown_is_internal_error() {
        let err: Box<dyn StdError + Send + Sync> = "something odd".into();
        let c = classify(&*err);
        assert_eq!(
            (c.fault(), c.sent()),
            (Fault::ProxyInternalError, Sent::MaybeProcessed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_elapsed_is_a_timeout() {
        let err = tokio::time::timeout(Duration::from_millis(1), std::future::pending::<()>())
            .await
            .unwrap_err();
        assert_eq!(classify(&err).fault(), Fault::HttpResponseTimeout);
    }

    #[cfg(feature = "hyper")]
    #[test]
    fn h2_reasons() {
        let refused = h2::Error::from(h2::Reason::REFUSED_STREAM);
        let c = classify(&refused);
        assert_eq!(
            (c.fault(), c.sent()),
            (Fault::ConnectionTerminated, Sent::NotSent)
        );

        let protocol = h2::Error::from(h2::Reason::PROTOCOL_ERROR);
        assert_eq!(classify(&protocol).fault(), Fault::HttpProtocolError);

        let cancel = h2::Error::from(h2::Reason::CANCEL);
        let c = classify(&cancel);
        assert_eq!(
            (c.fault(), c.sent()),
            (Fault::ConnectionTerminated, Sent::MaybeProcessed)
        );

        // Wrapped, as hyper and clients wrap it.
        let wrapped = Wrap(
            "client error",
            Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)),
        );
        assert_eq!(classify(&wrapped).sent(), Sent::NotSent);
    }

    /// An HTTP/2 stream whose connection went away under it fails with an `h2::Error` that
    /// holds an `io::Error` and has no `source()`: still `connection_terminated`.
    #[cfg(feature = "hyper")]
    #[tokio::test]
    async fn h2_stream_on_a_closed_connection_is_terminated() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            // Take the request, then drop the connection without answering.
            let _req = conn.accept().await.unwrap().unwrap();
        });
        let (send, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let (res, _) = send
            .send_request(http::Request::get("http://up/").body(()).unwrap(), true)
            .unwrap();
        server.await.unwrap();
        let err = res.await.unwrap_err();
        assert!(err.is_io(), "{err:?}");
        let c = classify(&err);
        assert_eq!(
            (c.fault(), c.sent()),
            (Fault::ConnectionTerminated, Sent::MaybeProcessed),
            "{err:?}"
        );
    }

    #[cfg(feature = "tonic")]
    #[test]
    fn tonic_status() {
        let c = classify(&tonic::Status::unavailable("down"));
        assert_eq!(c.fault(), Fault::ConnectionTerminated);
        let c = classify(&tonic::Status::deadline_exceeded("slow"));
        assert_eq!(c.fault(), Fault::HttpResponseTimeout);
        let c = classify(&tonic::Status::invalid_argument("bad"));
        assert_eq!(c.fault(), Fault::ProxyInternalError);

        // A status whose source says more is classified by its source.
        let status =
            tonic::Status::from_error(Box::new(io::Error::from(io::ErrorKind::ConnectionRefused)));
        let c = classify(&status);
        assert_eq!(
            (c.fault(), c.sent()),
            (Fault::ConnectionRefused, Sent::NotSent)
        );
    }
}
