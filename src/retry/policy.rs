//! Which outcomes are worth another attempt.

use std::error::Error as StdError;
use std::fmt;

use http::{HeaderMap, StatusCode};

use crate::fault::{Classification, Sent};
use crate::grpc::{self, Code};
pub use crate::head::RequestHead;

/// A request extension marking a request (typically a gRPC call, whose method is always
/// POST) as safe to repeat even if the upstream may have processed it.
///
/// ```
/// use tower_upstream::retry::Idempotent;
///
/// let mut req = http::Request::post("http://svc/pkg.Service/Get").body(()).unwrap();
/// req.extensions_mut().insert(Idempotent);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Idempotent;

/// How one attempt ended, as a policy sees it.
#[non_exhaustive]
#[derive(Clone, Copy)]
pub enum Outcome<'a> {
    /// The upstream answered (any status).
    Response {
        /// The response status.
        status: StatusCode,
        /// The response headers (for a gRPC trailers-only answer, `grpc-status` is here).
        headers: &'a HeaderMap,
    },
    /// The attempt failed.
    Error {
        /// What the crate's classifier made of the error.
        classification: &'a Classification,
        /// The error itself.
        error: &'a (dyn StdError + Send + Sync + 'static),
    },
}

impl fmt::Debug for Outcome<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Response { status, .. } => f.debug_tuple("Response").field(status).finish(),
            Outcome::Error { classification, .. } => {
                f.debug_tuple("Error").field(classification).finish()
            }
        }
    }
}

/// Decides whether an attempt's outcome is worth another attempt.
///
/// The layer does the rest: it never retries local rejections (circuit open, overload),
/// counts attempts, draws on the budget, honours `Retry-After` and the deadline, and
/// replays the body. A policy only says whether this outcome, for this request, is
/// retryable.
///
/// ```
/// use tower_upstream::retry::{Outcome, Policy, RequestHead};
///
/// /// Retries only upstream 503s, for any method.
/// #[derive(Debug, Clone)]
/// struct Only503;
///
/// impl Policy for Only503 {
///     fn should_retry(&self, _req: RequestHead<'_>, outcome: &Outcome<'_>) -> bool {
///         matches!(outcome, Outcome::Response { status, .. } if status.as_u16() == 503)
///     }
/// }
/// ```
pub trait Policy: Send + Sync + 'static {
    /// Whether this request could ever be retried. `false` sends it down the fast path:
    /// no body recording, no head clone. The default says `true`.
    fn may_retry(&self, req: RequestHead<'_>) -> bool {
        let _ = req;
        true
    }

    /// Whether to retry after this outcome.
    ///
    /// Called after every attempt while attempts are left, on the happy path too. `req` is
    /// read from the retry's copy of the head: its method, URI and extensions are at hand,
    /// while the first call to [`RequestHead::headers`] in a request's life rebuilds its
    /// header map (see [Request head](crate::retry#request-head)). Look at `outcome` first,
    /// as [`DefaultPolicy`] does, to keep the happy path cheap.
    fn should_retry(&self, req: RequestHead<'_>, outcome: &Outcome<'_>) -> bool;
}

/// The policy used when you write none.
///
/// It retries:
/// - any request whose error was [`Sent::NotSent`] (refused, DNS error, connect timeout,
///   TLS failure, HTTP/2 `REFUSED_STREAM`…), whatever its method;
/// - [idempotent](RequestHead::is_idempotent) requests after [`Sent::MaybeProcessed`]
///   errors (reset, attempt timeout, malformed response) and after upstream 502, 503 and 504
///   answers;
/// - gRPC calls marked [`Idempotent`] (or with an `Idempotency-Key`) whose trailers-only answer carries a `grpc-status` in
///   the retryable set (default: `UNAVAILABLE`).
///
/// It never retries a request that is not idempotent once it may have been processed.
/// (Local rejections such as an open circuit are never retried, whatever the policy.)
///
/// ```
/// use tower_upstream::grpc::Code;
/// use tower_upstream::retry::DefaultPolicy;
///
/// let policy = DefaultPolicy::new()
///     .grpc_codes([Code::Unavailable, Code::ResourceExhausted])
///     .retry_all_grpc_calls(true);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct DefaultPolicy {
    /// Bit n set: gRPC code n is retryable.
    grpc_codes: u32,
    /// Every gRPC call counts as marked.
    grpc_all: bool,
}

impl Default for DefaultPolicy {
    fn default() -> Self {
        DefaultPolicy {
            grpc_codes: 1 << Code::Unavailable.as_i32(),
            grpc_all: false,
        }
    }
}

impl DefaultPolicy {
    /// The default policy.
    pub fn new() -> Self {
        DefaultPolicy::default()
    }

    /// The `grpc-status` codes (of trailers-only answers to calls marked [`Idempotent`])
    /// that are retried. Default: `UNAVAILABLE` only.
    pub fn grpc_codes(mut self, codes: impl IntoIterator<Item = Code>) -> Self {
        self.grpc_codes = codes
            .into_iter()
            .filter(|c| *c != Code::Ok)
            .fold(0, |acc, c| acc | 1 << c.as_i32());
        self
    }

    /// Treats every gRPC call as marked [`Idempotent`] for the retryable `grpc-status`
    /// codes (for upstreams whose methods are all safe to repeat). Default `false`.
    pub fn retry_all_grpc_calls(mut self, yes: bool) -> Self {
        self.grpc_all = yes;
        self
    }

    fn grpc_code_retryable(&self, code: Code) -> bool {
        self.grpc_codes & (1 << code.as_i32()) != 0
    }
}

impl fmt::Debug for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let codes: Vec<_> = (0..17)
            .filter(|n| self.grpc_codes & (1 << n) != 0)
            .filter_map(Code::from_i32)
            .collect();
        f.debug_struct("DefaultPolicy")
            .field("grpc_codes", &codes)
            .field("retry_all_grpc_calls", &self.grpc_all)
            .finish()
    }
}

impl Policy for DefaultPolicy {
    fn should_retry(&self, req: RequestHead<'_>, outcome: &Outcome<'_>) -> bool {
        match outcome {
            Outcome::Error { classification, .. } => match classification.sent() {
                Sent::NotSent => true,
                Sent::MaybeProcessed => req.is_idempotent(),
            },
            Outcome::Response { status, headers } => match status.as_u16() {
                // A gRPC answer is HTTP 200 with `grpc-status` in the headers (trailers-only).
                // Checked in this order so an HTTP 200 costs one header lookup at most.
                200 => {
                    // From the retry's copy of the head, known without a lookup.
                    req.grpc_hint() != Some(false)
                        && !headers.is_empty()
                        && headers
                            .get(&grpc::GRPC_STATUS)
                            .and_then(Code::from_header)
                            .is_some_and(|code| self.grpc_code_retryable(code))
                        && grpc::is_grpc(req.headers())
                        && (self.grpc_all || req.is_idempotent())
                }
                502..=504 => req.is_idempotent(),
                _ => false,
            },
        }
    }
}
