//! Tower middleware for resilient upstream calls.
//!
//! When a service calls another one, things fail: the upstream refuses the connection,
//! resets it, answers garbage, hangs, is overloaded. tower-upstream classifies every such
//! failure as a [`Fault`] (named after RFC 9209's proxy error types) and answers the client
//! correctly: **502** when the upstream's answer was invalid or missing, **503** when the
//! gateway deliberately refuses for now, **504** when no timely answer came, or the matching
//! `grpc-status` for gRPC callers.
//!
//! # Quick start (axum)
//!
//! Put [`MapFaultsLayer`] around a proxy route: its service has `Error = Infallible`, so no
//! `HandleErrorLayer` is needed.
//!
//! ```
//! use axum::{body::Body, Router};
//! use http::{Request, StatusCode};
//! use http_body_util::BodyExt;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::{service_fn, BoxError, Layer, ServiceExt};
//! use tower_upstream::MapFaultsLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! # // Bound, never listening: connections are refused, and no other test gets the port.
//! # let dead = tokio::net::TcpSocket::new_v4()?;
//! # dead.bind("127.0.0.1:0".parse()?)?;
//! # let upstream = dead.local_addr()?;
//! let client = Client::builder(TokioExecutor::new()).build_http();
//!
//! // Forward every request to the upstream, path and query kept.
//! let proxy = service_fn(move |mut req: Request<Body>| {
//!     let client = client.clone();
//!     async move {
//!         let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
//!         *req.uri_mut() = format!("http://{upstream}{pq}").parse()?;
//!         Ok::<_, BoxError>(client.request(req).await?)
//!     }
//! });
//!
//! let app = Router::new().fallback_service(
//!     MapFaultsLayer::builder().gateway_name("my-gateway").build()?.layer(proxy),
//! );
//!
//! let res = app.oneshot(Request::get("/orders/7").body(Body::empty())?).await?;
//! assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
//! assert_eq!(res.headers()["proxy-status"], "my-gateway; error=connection_refused");
//! # Ok(())
//! # }
//! ```
//!
//! # The whole stack
//!
//! [`Upstream::builder()`] composes every layer below in the right order (see
//! [`upstream`'s ordering notes](upstream#ordering)) with defaults a gateway can start from:
//! `Upstream::builder().build()?.layer(proxy)` in place of `MapFaultsLayer` above, with the
//! proxy taking `Request<ReplayBody<Body>>`.
//!
//! # Modules
//!
//! - [`fault`]: the taxonomy and the one classifier every layer uses.
//! - [`map_faults`]: the outermost layer, turning every fault into the right answer.
//! - [`deadline`]: the request's overall deadline ([`Deadline`]), capped by an incoming
//!   `grpc-timeout`, and propagated.
//! - [`timeout`]: per-attempt timeouts ([`AttemptTimeout`]) and a response-body idle timeout.
//! - [`retry`]: retries ([`Retry`]) with a safe default policy, a shared lock-free
//!   [`RetryBudget`], jittered backoff, `Retry-After`, and replay of streaming request bodies.
//! - [`breaker`]: keyed circuit breaking ([`CircuitBreaker`]) that fails fast with
//!   `CircuitOpen`, answered 503 with `Retry-After`.
//! - [`grpc`]: gRPC status codes and detection.
//! - [`upstream`]: the whole stack in one layer, [`Upstream::builder()`].
//! - [`config`] (feature `serde`): the whole stack from a configuration file.
//! - [`guide`]: wiring guides, doc-tested: [the order of the layers and why](guide::ordering),
//!   [axum](guide::axum), [outbound clients](guide::outbound), [tonic](guide::tonic) (server
//!   and client), configuration files (`guide::config`, feature `serde`).
//!
//! # Feature flags
//!
//! - `hyper` (default): classify `hyper::Error`, `hyper_util::client::legacy::Error` and
//!   `h2::Error`. An axum application has these crates already.
//! - `tonic`: classify `tonic::Status` and `tonic::transport::Error`.
//! - `serde`: [`config::UpstreamConfig`], the whole stack read from TOML, YAML, JSON or any
//!   format serde reads, with durations like `"250ms"`.
//! - `rustls`: classify `rustls::Error` (certificate problems as `tls_certificate_error`,
//!   the rest as `tls_protocol_error`), as hyper-rustls and tokio-rustls report it.
//!
#![doc = include_str!("docs/status_mapping.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]

/// `get_ref` / `get_mut` / `into_inner` for a middleware whose wrapped value is the field
/// `inner` (tower-http does the same with a macro).
macro_rules! inner_accessors {
    ($what:literal, $ty:ident) => {
        #[doc = concat!("The inner ", $what, ".")]
        pub fn get_ref(&self) -> &$ty {
            &self.inner
        }

        #[doc = concat!("The inner ", $what, ", mutably.")]
        pub fn get_mut(&mut self) -> &mut $ty {
            &mut self.inner
        }

        #[doc = concat!("Consumes `self`, returning the inner ", $what, ".")]
        pub fn into_inner(self) -> $ty {
            self.inner
        }
    };
}

pub mod breaker;
#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
pub mod config;
pub mod deadline;
mod error;
pub mod fault;
pub mod grpc;
mod head;
pub mod map_faults;

/// Guides: how to wire the layers into real services. Their examples are doc-tested.
///
/// - [`ordering`](guide::ordering): the order of the layers, and why.
/// - [`axum`](guide::axum): proxy routes, `Router::layer` / `route_layer`, breaker keys, a
///   health endpoint.
/// - [`outbound`](guide::outbound): a hyper-util client in the stack, called from a handler.
/// - [`tonic`](guide::tonic): a gateway in front of gRPC upstreams, a `Channel` in the stack,
///   a tonic server.
/// - `config` (feature `serde`): every setting of a configuration file.
pub mod guide {
    #[doc = include_str!("docs/ordering.md")]
    pub mod ordering {}

    #[doc = include_str!("docs/axum.md")]
    pub mod axum {}

    #[doc = include_str!("docs/outbound.md")]
    pub mod outbound {}

    #[doc = include_str!("docs/tonic.md")]
    pub mod tonic {}

    #[cfg(feature = "serde")]
    #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
    #[doc = include_str!("docs/config.md")]
    pub mod config {}
}
pub mod retry;
mod stripe;
pub mod timeout;
mod timer;
pub mod upstream;

pub use breaker::{CircuitBreaker, CircuitBreakerLayer};
pub use deadline::{Deadline, DeadlineLayer, RequestDeadline};
pub use error::ConfigError;
pub use fault::{Classification, Classifier, Fault, Sent};
pub use head::RequestHead;
pub use map_faults::{MapFaults, MapFaultsLayer};
pub use retry::{Retry, RetryBudget, RetryLayer};
pub use timeout::{AttemptTimeout, AttemptTimeoutLayer};
pub use upstream::{Upstream, UpstreamLayer};

/// The error type that travels between layers: any `std::error::Error`, boxed.
pub use tower::BoxError;
