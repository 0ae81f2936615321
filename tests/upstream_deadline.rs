//! The deadline inside `Upstream::builder()`'s stack: it travels without a request
//! extension, yet every attempt (a retry's too) is bounded by what it leaves and tells a gRPC
//! upstream so; a deadline layer passed in keeps its extension.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{service_fn, Layer, ServiceExt};
use tower_upstream::deadline::{DeadlineLayer, RequestDeadline};
use tower_upstream::grpc::{self, Code};
use tower_upstream::retry::{Idempotent, ReplayBody};
use tower_upstream::{Upstream, UpstreamLayer};

/// What the inner service saw of one attempt.
#[derive(Debug, Clone, Copy)]
struct Seen {
    grpc_timeout: Option<Duration>,
    extension: bool,
}

/// A gRPC upstream that answers UNAVAILABLE (trailers-only) to the first attempt and OK to
/// the others, each after `delay`.
async fn two_attempts(layer: UpstreamLayer, delay: Duration) -> (Vec<Seen>, Response<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let svc = layer.layer(service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
        let attempt = {
            let mut seen = record.lock().unwrap();
            seen.push(Seen {
                grpc_timeout: grpc::timeout_of(req.headers()),
                extension: RequestDeadline::of(&req).is_some(),
            });
            seen.len()
        };
        async move {
            tokio::time::sleep(delay).await;
            let code = if attempt == 1 { "14" } else { "0" };
            let rsp = Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", code)
                .body(Full::new(Bytes::new()))
                .unwrap();
            Ok::<_, Infallible>(rsp)
        }
    }));
    let mut req = Request::post("http://upstream/pkg.Svc/Get")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    req.extensions_mut().insert(Idempotent);
    let res = svc.oneshot(req).await.unwrap().map(|_| ());
    let seen = seen.lock().unwrap().clone();
    (seen, res)
}

fn grpc_code(res: &Response<()>) -> Option<Code> {
    res.headers().get("grpc-status").and_then(Code::from_header)
}

#[tokio::test(start_paused = true)]
async fn a_retry_gets_what_the_private_deadline_leaves() {
    let layer = Upstream::builder()
        .deadline(Duration::from_secs(1))
        .attempt_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let (seen, res) = two_attempts(layer, Duration::from_millis(600)).await;

    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|s| !s.extension), "{seen:?}");
    assert_eq!(seen[0].grpc_timeout, Some(Duration::from_secs(1)));
    // The retry starts after 600 ms and a backoff of at most 25 ms: the attempt timeout (10 s)
    // is cut to what the deadline leaves.
    let second = seen[1].grpc_timeout.unwrap();
    assert!(
        second <= Duration::from_millis(400) && second >= Duration::from_millis(375),
        "{second:?}"
    );
    // The second attempt outlives the deadline: answered DEADLINE_EXCEEDED at 1 s sharp.
    assert_eq!(grpc_code(&res), Some(Code::DeadlineExceeded));
    assert_eq!(started.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_deadline_layer_passed_in_keeps_its_extension() {
    let layer = Upstream::builder()
        .deadline_layer(DeadlineLayer::new(Duration::from_secs(1)))
        .attempt_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let (seen, res) = two_attempts(layer, Duration::from_millis(100)).await;

    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|s| s.extension), "{seen:?}");
    let second = seen[1].grpc_timeout.unwrap();
    assert!(
        second <= Duration::from_millis(900) && second >= Duration::from_millis(875),
        "{second:?}"
    );
    assert_eq!(grpc_code(&res), Some(Code::Ok));
}

/// Inside `Upstream`, the attempt timeout learns from the stack that the request is gRPC (it
/// is read once per request): a gRPC attempt is told the attempt's own, shorter timeout, a
/// retry's attempt too.
#[tokio::test(start_paused = true)]
async fn a_grpc_attempt_is_told_the_attempt_timeout() {
    let layer = Upstream::builder()
        .deadline(Duration::from_secs(30))
        .attempt_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let (seen, res) = two_attempts(layer, Duration::from_millis(100)).await;

    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].grpc_timeout, Some(Duration::from_secs(2)));
    assert_eq!(seen[1].grpc_timeout, Some(Duration::from_secs(2)));
    assert_eq!(grpc_code(&res), Some(Code::Ok));
}

/// What the stack knows of its request is not taken for another request that the wrapped
/// service makes while called: a plain HTTP request sent synchronously through an
/// `AttemptTimeout` from inside a gRPC call gets no `grpc-timeout`, and the gRPC call
/// itself is still told its own.
#[tokio::test(start_paused = true)]
async fn a_request_made_below_does_not_inherit_the_grpc_flag() {
    let nested_seen = Arc::new(Mutex::new(Vec::new()));
    let record = nested_seen.clone();
    let mut nested = tower_upstream::AttemptTimeout::new(
        service_fn(move |req: Request<()>| {
            record.lock().unwrap().push(grpc::timeout_of(req.headers()));
            async { Ok::<_, Infallible>(Response::new(())) }
        }),
        Duration::from_secs(1),
    );
    let outer_seen = Arc::new(Mutex::new(Vec::new()));
    let outer_record = outer_seen.clone();
    let svc = Upstream::builder()
        .attempt_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
        .layer(service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
            outer_record
                .lock()
                .unwrap()
                .push(grpc::timeout_of(req.headers()));
            // Called synchronously, inside the stack's call.
            let plain = tower::Service::call(&mut nested, Request::new(()));
            async move {
                plain.await.unwrap();
                let rsp = Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "0")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                Ok::<_, Infallible>(rsp)
            }
        }));
    let req = Request::post("http://upstream/pkg.Svc/Get")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap().map(|_| ());

    assert_eq!(grpc_code(&res), Some(Code::Ok));
    assert_eq!(*outer_seen.lock().unwrap(), [Some(Duration::from_secs(2))]);
    assert_eq!(*nested_seen.lock().unwrap(), [None]);
}
