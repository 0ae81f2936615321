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
