//! tonic on both sides of the crate's layers, over real sockets on 127.0.0.1: a gateway in
//! front of a tonic server (HTTP/2 to the upstream), and a tonic `Channel` wrapped in the
//! retry layer; plus a plain HTTP route whose upstream speaks HTTP/1.1 or HTTP/2.
//!
//! The gRPC service is written by hand (`support/grpc.rs`): no protoc.

mod support;

#[path = "support/grpc.rs"]
mod grpc;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::Code;
use tower::util::MapRequest;
use tower::{service_fn, ServiceBuilder};
use tower_upstream::deadline::RequestDeadline;
use tower_upstream::map_faults::MapFaultsLayer;
use tower_upstream::retry::{Idempotent, ReplayBody};
use tower_upstream::{AttemptTimeout, AttemptTimeoutLayer, DeadlineLayer, Retry, RetryLayer};

use grpc::{hello_request, say_hello, Greeter, HelloReply};

/// A gateway (HTTP/1.1 + h2c) in front of `upstream`, forwarding over HTTP/2 (h2c), with the
/// layers for gRPC upstreams: faults answered as trailers-only gRPC statuses, a deadline
/// (capped by the caller's `grpc-timeout`), a timeout per attempt.
async fn grpc_gateway(upstream: SocketAddr, deadline: Duration, attempt: Duration) -> SocketAddr {
    let layers = ServiceBuilder::new()
        .layer(
            MapFaultsLayer::builder()
                .gateway_name("grpc-gw")
                .build()
                .unwrap(),
        )
        .layer(DeadlineLayer::new(deadline))
        .layer(AttemptTimeoutLayer::new(attempt));
    support::gateway_with(support::h2_client(), upstream, layers).await
}

fn within<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
    tokio::time::timeout(support::REAL_TIMEOUT, f)
}

fn proxy_status(metadata: &MetadataMap) -> Option<&str> {
    metadata.get("proxy-status").and_then(|v| v.to_str().ok())
}

// ---------------------------------------------------------------------------------------
// A gateway in front of a tonic server
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn gateway_forwards_a_call_to_a_healthy_upstream() {
    let upstream = grpc::serve_greeter(Greeter::hello()).await;
    let gw = grpc_gateway(upstream, Duration::from_secs(5), Duration::from_secs(5)).await;

    let rsp = grpc::say_hello_at(gw, hello_request("gateway"))
        .await
        .unwrap();
    assert_eq!(rsp.get_ref().message, "hello, gateway");
}

#[tokio::test]
async fn upstream_down_is_unavailable_with_the_gateways_message() {
    let upstream = support::closed_port().await;
    let gw = grpc_gateway(upstream, Duration::from_secs(5), Duration::from_secs(5)).await;

    let status = grpc::say_hello_at(gw, hello_request("nobody"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "upstream refused the connection");
    assert_eq!(
        proxy_status(status.metadata()),
        Some("grpc-gw; error=connection_refused")
    );
    // Nothing about the upstream's address leaks.
    assert!(!format!("{:?}", status.metadata()).contains(&upstream.port().to_string()));
}

/// A tonic handler that records the `grpc-timeout` it was given, then hangs.
fn hanging_greeter() -> (Greeter, Arc<Mutex<Vec<Duration>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let greeter = Greeter::new(move |req: tonic::Request<grpc::HelloRequest>| {
        let timeout = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| tower_upstream::grpc::parse_timeout(&v.to_str().ok()?.parse().ok()?));
        record
            .lock()
            .unwrap()
            .push(timeout.unwrap_or(Duration::MAX));
        async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(tonic::Response::new(HelloReply::default()))
        }
    });
    (greeter, seen)
}

/// The caller's `grpc-timeout` (shorter than the gateway's deadline) becomes the gateway's
/// deadline: the caller gets `DEADLINE_EXCEEDED` from the gateway when it passes, and the
/// upstream is told no more than the caller's `grpc-timeout`.
///
/// The caller here is tonic's client (`tonic::client::Grpc`, the codec generated clients use)
/// over a plain HTTP/2 client, not over a tonic `Channel`: a `Channel` enforces the
/// `grpc-timeout` it sends itself and, since its clock starts before the gateway's, always
/// fails first with its own `CANCELLED: Timeout expired`. The next test uses a `Channel`.
#[tokio::test]
async fn callers_grpc_timeout_caps_the_gateway_deadline_and_shrinks_on_the_way() {
    let (greeter, seen) = hanging_greeter();
    let upstream = grpc::serve_greeter(greeter).await;
    let gw = grpc_gateway(upstream, Duration::from_secs(5), Duration::from_secs(5)).await;

    let h2: Client<_, tonic::body::Body> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let mut req = hello_request("slow");
    req.set_timeout(Duration::from_millis(400));
    let start = Instant::now();
    let status = within(say_hello(h2, grpc::origin(gw), req))
        .await
        .unwrap()
        .unwrap_err();
    let took = start.elapsed();

    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(status.message(), "upstream did not answer in time");
    assert_eq!(
        proxy_status(status.metadata()),
        Some("grpc-gw; error=http_response_timeout")
    );
    assert!(took >= Duration::from_millis(390), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "one attempt: {seen:?}");
    // The gateway re-encodes the time left by its own clock, started when its deadline layer
    // read the caller's header: never more than the caller's 400 ms (equal when the gateway
    // spent no measurable time before the attempt).
    assert!(
        seen[0] <= Duration::from_millis(400) && seen[0] > Duration::from_millis(200),
        "upstream was told {:?}",
        seen[0]
    );
}

/// A tonic `Channel` caller with a generous `grpc-timeout` (5 s): the gateway's own deadline
/// (300 ms) is what runs out, the caller sees `DEADLINE_EXCEEDED`, and the upstream was told
/// the smaller `grpc-timeout` (at most 300 ms), not the caller's.
#[tokio::test]
async fn gateway_deadline_answers_a_channel_caller_with_deadline_exceeded() {
    let (greeter, seen) = hanging_greeter();
    let upstream = grpc::serve_greeter(greeter).await;
    let gw = grpc_gateway(upstream, Duration::from_millis(300), Duration::from_secs(5)).await;

    let mut req = hello_request("slow");
    req.set_timeout(Duration::from_secs(5));
    let start = Instant::now();
    let status = within(say_hello(grpc::channel(gw), grpc::origin(gw), req))
        .await
        .unwrap()
        .unwrap_err();
    let took = start.elapsed();

    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(status.message(), "upstream did not answer in time");
    assert!(took >= Duration::from_millis(290), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0] <= Duration::from_millis(300), "{:?}", seen[0]);
}

#[tokio::test]
async fn upstream_status_passes_through_unchanged() {
    let upstream = grpc::serve_greeter(Greeter::new(|_req| async {
        Err(tonic::Status::unavailable("orders database is down"))
    }))
    .await;
    let gw = grpc_gateway(upstream, Duration::from_secs(5), Duration::from_secs(5)).await;

    let status = grpc::say_hello_at(gw, hello_request("x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "orders database is down");
    assert_eq!(
        proxy_status(status.metadata()),
        None,
        "not the gateway's answer"
    );
}

/// The layers on tonic's own server (`Server::builder().layer(…)`): the handler reads the
/// request's deadline, and a handler that outlives it is answered `DEADLINE_EXCEEDED`.
#[tokio::test]
async fn layers_on_a_tonic_server() {
    let seen = Arc::new(Mutex::new(None));
    let record = seen.clone();
    let greeter = Greeter::new(move |req: tonic::Request<grpc::HelloRequest>| {
        *record.lock().unwrap() = req
            .extensions()
            .get::<RequestDeadline>()
            .map(RequestDeadline::remaining);
        async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(tonic::Response::new(HelloReply::default()))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let layers = ServiceBuilder::new()
        .layer(
            MapFaultsLayer::builder()
                .gateway_name("svc")
                .build()
                .unwrap(),
        )
        .layer(DeadlineLayer::new(Duration::from_millis(300)));
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(layers)
            .add_service(greeter)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let status = grpc::say_hello_at(addr, hello_request("slow"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(status.message(), "upstream did not answer in time");
    let left = seen
        .lock()
        .unwrap()
        .expect("the handler saw a RequestDeadline");
    assert!(
        left <= Duration::from_millis(300) && left > Duration::ZERO,
        "{left:?}"
    );
}

// ---------------------------------------------------------------------------------------
// An outbound tonic Channel wrapped in the layers
// ---------------------------------------------------------------------------------------

/// A `Channel` with retries and a timeout per attempt, as an outbound client. No `MapFaults`:
/// the caller of an outbound client wants the call's own `Status` (which tonic makes from the
/// error), not an answer made up for a downstream client.
///
/// `Retry` hands its inner service `http::Request<ReplayBody<B>>`; a `Channel` takes
/// `http::Request<tonic::body::Body>`, so one `map_request` wraps the replayable body back
/// into a tonic body.
fn retrying_channel(addr: SocketAddr, retry: RetryLayer) -> RetryingChannel {
    ServiceBuilder::new()
        .layer(retry)
        .layer(AttemptTimeoutLayer::new(Duration::from_secs(2)))
        .map_request(tonic_body as fn(_) -> _)
        .service(grpc::channel(addr))
}

/// What `retrying_channel` makes, named (so the futures it makes are known to be `Send`).
type RetryingChannel =
    Retry<AttemptTimeout<MapRequest<tonic::transport::Channel, fn(ReplayRequest) -> TonicRequest>>>;
type ReplayRequest = http::Request<ReplayBody<tonic::body::Body>>;
type TonicRequest = http::Request<tonic::body::Body>;

fn tonic_body(req: ReplayRequest) -> TonicRequest {
    req.map(tonic::body::Body::new)
}

#[tokio::test]
async fn channel_retries_an_idempotent_call_until_it_succeeds() {
    let (upstream, seen) = grpc::recovering_greeter(2).await;
    let retry = RetryLayer::builder().max_attempts(3).build().unwrap();
    let svc = retrying_channel(upstream, retry.clone());

    let mut req = hello_request("again");
    req.extensions_mut().insert(Idempotent);
    // Spawned: the call's future through the layers is `Send + 'static`, as a generated
    // client used from a task needs.
    let call = tokio::spawn(say_hello(svc, grpc::origin(upstream), req));
    let rsp = within(call).await.unwrap().unwrap().unwrap();
    assert_eq!(rsp.get_ref().message, "hello, again");
    assert_eq!(
        *seen.lock().unwrap(),
        [None, Some("1".to_owned()), Some("2".to_owned())],
        "grpc-previous-rpc-attempts per attempt"
    );
    assert_eq!(retry.budget().exhausted(), 0);
}

#[tokio::test]
async fn channel_does_not_retry_an_unmarked_call() {
    let (upstream, seen) = grpc::recovering_greeter(2).await;
    let svc = retrying_channel(
        upstream,
        RetryLayer::builder().max_attempts(3).build().unwrap(),
    );

    let status = within(say_hello(
        svc,
        grpc::origin(upstream),
        hello_request("once"),
    ))
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "warming up");
    assert_eq!(seen.lock().unwrap().len(), 1, "one attempt only");
}

#[tokio::test]
async fn channel_with_retry_all_grpc_calls_retries_unmarked_calls() {
    let (upstream, seen) = grpc::recovering_greeter(1).await;
    let retry = RetryLayer::builder()
        .policy(tower_upstream::retry::DefaultPolicy::new().retry_all_grpc_calls(true))
        .max_attempts(3)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(retry)
        .map_request(|req: http::Request<ReplayBody<tonic::body::Body>>| {
            req.map(tonic::body::Body::new)
        })
        .service(grpc::channel(upstream));

    let rsp = within(say_hello(svc, grpc::origin(upstream), hello_request("all")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rsp.get_ref().message, "hello, all");
    assert_eq!(seen.lock().unwrap().len(), 2);
}

/// A refused connection was never sent: retried for any call, marked or not; when every
/// attempt is refused the caller gets tonic's own `UNAVAILABLE` for the last one.
#[tokio::test]
async fn channel_to_a_dead_upstream_retries_then_reports_unavailable() {
    let dead = support::closed_port().await;
    let attempts = Arc::new(AtomicU32::new(0));
    let count = attempts.clone();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::builder().max_attempts(3).build().unwrap())
        .map_request(move |req| {
            count.fetch_add(1, Ordering::Relaxed);
            tonic_body(req)
        })
        .service(grpc::channel(dead));
    let status = within(say_hello(svc, grpc::origin(dead), hello_request("anyone")))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(attempts.load(Ordering::Relaxed), 3);
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 and HTTP/2 between gateway and upstream
// ---------------------------------------------------------------------------------------

/// An upstream (HTTP/1.1 and h2c) that answers with the protocol version it was spoken to in.
async fn version_upstream() -> SocketAddr {
    support::serve(service_fn(
        |req: http::Request<hyper::body::Incoming>| async move {
            let body = format!("{:?}", req.version());
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
        },
    ))
    .await
}

#[tokio::test]
async fn plain_http_route_works_over_http1_and_http2_to_the_upstream() {
    let upstream = version_upstream().await;
    let dead = support::closed_port().await;
    for (client, want) in [
        (support::client(), "HTTP/1.1"),
        (support::h2_client(), "HTTP/2.0"),
    ] {
        let gw = support::gateway_with(
            client.clone(),
            upstream,
            MapFaultsLayer::builder()
                .gateway_name("gw")
                .build()
                .unwrap(),
        )
        .await;
        let rsp = within(support::get(format!("http://{gw}/version")))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, want);

        // The same route with the upstream down: 502, whichever protocol was to be spoken.
        let gw = support::gateway_with(
            client,
            dead,
            MapFaultsLayer::builder()
                .gateway_name("gw")
                .build()
                .unwrap(),
        )
        .await;
        let rsp = within(support::get(format!("http://{gw}/version")))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY, "{want}");
        assert_eq!(
            rsp.headers()["proxy-status"],
            "gw; error=connection_refused",
            "{want}"
        );
    }
}
