//! The deadline inside `Upstream::builder()`'s stack: it travels without a request
//! extension, yet every attempt (a retry's too) is bounded by what it leaves and tells a gRPC
//! upstream so; a deadline layer passed in keeps its extension.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::util::BoxCloneService;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};
use tower_upstream::deadline::{DeadlineLayer, RequestDeadline};
use tower_upstream::grpc::{self, Code};
use tower_upstream::retry::{Idempotent, ReplayBody};
use tower_upstream::{RetryLayer, Upstream, UpstreamLayer};

/// What the inner service saw of one attempt.
#[derive(Debug, Clone, Copy)]
struct Seen {
    grpc_timeout: Option<Duration>,
    extension: bool,
}

/// A gRPC upstream that answers UNAVAILABLE (trailers-only) to the first attempt and OK to
/// the others, each after `delay`.
async fn two_attempts(layer: UpstreamLayer, delay: Duration) -> (Vec<Seen>, Response<()>) {
    two_attempts_through(layer, delay).await
}

/// [`two_attempts`] through any layer: the stack, or layers composed by hand.
async fn two_attempts_through<L, ResB>(layer: L, delay: Duration) -> (Vec<Seen>, Response<()>)
where
    L: Layer<Inner>,
    L::Service: Service<Request<Full<Bytes>>, Response = Response<ResB>>,
    <L::Service as Service<Request<Full<Bytes>>>>::Error: std::fmt::Debug,
{
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let inner: Inner =
        BoxCloneService::new(service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
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
    let svc = layer.layer(inner);
    let mut req = Request::post("http://upstream/pkg.Svc/Get")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    req.extensions_mut().insert(Idempotent);
    let res = svc.oneshot(req).await.unwrap().map(|_| ());
    let seen = seen.lock().unwrap().clone();
    (seen, res)
}

/// The scripted gRPC upstream of [`two_attempts`].
type Inner = BoxCloneService<Request<ReplayBody<Full<Bytes>>>, Response<Full<Bytes>>, Infallible>;

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
    let run = two_attempts(layer, Duration::from_millis(100)).await;
    assert!(run.0.iter().all(|s| s.extension), "{:?}", run.0);
    told_what_is_left(&run, Duration::from_millis(100));
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

/// A plain HTTP upstream whose attempt `n` (from 1) waits `waits[n - 1]` (forever when
/// there is none) and then answers 503 with `Retry-After: retry_after` seconds; it records
/// the `request-timeout` header each attempt carried.
fn slow_503s(
    waits: &'static [u64],
    retry_after: u64,
    seen: Arc<Mutex<Vec<Option<String>>>>,
) -> impl tower::Service<
    Request<ReplayBody<Full<Bytes>>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
        let attempt = {
            let mut seen = seen.lock().unwrap();
            seen.push(
                req.headers()
                    .get("request-timeout")
                    .map(|v| v.to_str().unwrap().to_owned()),
            );
            assert!(RequestDeadline::of(&req).is_none());
            seen.len()
        };
        async move {
            match waits.get(attempt - 1) {
                Some(0) => {}
                Some(&secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
                None => std::future::pending().await,
            }
            let rsp = Response::builder()
                .status(503)
                .header("retry-after", retry_after)
                .body(Full::new(Bytes::new()))
                .unwrap();
            Ok::<_, Infallible>(rsp)
        }
    })
}

/// On a plain HTTP request, the stack's deadline is worked out when it first matters (no
/// clock read for a request answered without waiting), and then once: a retry weighs its
/// pushback against the same deadline that ends the request.
#[tokio::test(start_paused = true)]
async fn a_plain_requests_deadline_is_worked_out_once() {
    let layer = Upstream::builder()
        .deadline(Duration::from_secs(5))
        .no_attempt_timeout()
        .build()
        .unwrap();

    // (attempt 1 waits, then asks for a pushback; status, when, attempts)
    let cases: [(&'static [u64], u64, u16, u64, usize); 3] = [
        // Attempt 1 answers at once (the deadline is worked out by the retry's decision),
        // attempt 2 hangs: 504 at 5 s sharp, not 5 s after the 1 s pushback.
        (&[0], 1, 504, 5, 2),
        // Attempt 1 waits 2 s (the deadline is worked out when it starts waiting), then asks
        // for 4 s: the deadline leaves 3 s, so its 503 is the answer.
        (&[2], 4, 503, 2, 1),
        // Asking for 2 s instead: retried, and attempt 2 is cut at 5 s.
        (&[2], 2, 504, 5, 2),
    ];
    for (waits, pushback, status, secs, attempts) in cases {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let svc = layer.layer(slow_503s(waits, pushback, seen.clone()));
        let started = tokio::time::Instant::now();
        let res = svc
            .oneshot(Request::get("/").body(Full::default()).unwrap())
            .await
            .unwrap();
        let case = (waits, pushback);
        assert_eq!(res.status(), status, "{case:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(secs), "{case:?}");
        assert_eq!(seen.lock().unwrap().len(), attempts, "{case:?}");
    }
}

/// The stack from a configuration file, with a deadline of `timeout` capped and propagated
/// by a `request-timeout` header (in seconds), and no attempt timeout.
fn with_deadline_header(timeout: &str) -> UpstreamLayer {
    let config: tower_upstream::config::UpstreamConfig = toml::from_str(&format!(
        r#"
        deadline = {{ timeout = "{timeout}", header = {{ name = "request-timeout", unit = "s" }} }}
        attempt_timeout.enabled = false
        "#
    ))
    .unwrap();
    config.build().unwrap()
}

/// A configured deadline header on a plain HTTP request (configuration file: the deadline
/// travels without an extension): it caps the deadline, is propagated with the time the
/// deadline gives, and ends the request in time.
#[tokio::test(start_paused = true)]
async fn a_deadline_header_caps_and_propagates_on_a_plain_request() {
    let layer = with_deadline_header("30s");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let svc = layer.layer(slow_503s(&[], 0, seen.clone()));

    let started = tokio::time::Instant::now();
    let req = Request::get("/")
        .header("request-timeout", "3")
        .body(Full::default())
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    assert_eq!(*seen.lock().unwrap(), [Some("3".to_owned())]);

    // Without the header the stack's own 30 s apply, and are propagated.
    seen.lock().unwrap().clear();
    let started = tokio::time::Instant::now();
    let res = svc
        .oneshot(Request::get("/").body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    assert_eq!(*seen.lock().unwrap(), [Some("30".to_owned())]);
}

/// Without an attempt timeout, a retry's gRPC attempt is still told what the deadline
/// leaves, not the time the whole request had at the start.
#[tokio::test(start_paused = true)]
async fn without_attempt_timeout_a_retry_is_told_what_is_left() {
    let layer = Upstream::builder()
        .deadline(Duration::from_secs(1))
        .no_attempt_timeout()
        .build()
        .unwrap();
    let run = two_attempts(layer, Duration::from_millis(300)).await;
    assert_eq!(run.0[0].grpc_timeout, Some(Duration::from_secs(1)));
    told_what_is_left(&run, Duration::from_millis(300));
}

/// With a 1 s deadline and a first attempt of `first`: the retry (after a backoff of at most
/// 25 ms) is told what is left, and it succeeds.
fn told_what_is_left((seen, res): &(Vec<Seen>, Response<()>), first: Duration) {
    assert_eq!(seen.len(), 2, "{seen:?}");
    let left = Duration::from_secs(1) - first;
    let second = seen[1].grpc_timeout.unwrap();
    assert!(
        second <= left && second >= left - Duration::from_millis(25),
        "{second:?}"
    );
    assert_eq!(grpc_code(res), Some(Code::Ok));
}

/// The same composed by hand, with no attempt timeout: the retry tells the upstream what the
/// deadline above leaves.
#[tokio::test(start_paused = true)]
async fn composed_by_hand_a_retry_is_told_what_is_left() {
    let layer = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(1)))
        .layer(RetryLayer::new());
    let run = two_attempts_through(layer, Duration::from_millis(300)).await;
    assert_eq!(run.0[0].grpc_timeout, Some(Duration::from_secs(1)));
    told_what_is_left(&run, Duration::from_millis(300));
}

/// The configured deadline header the stack propagates is lowered on every retry to what
/// the deadline leaves, as `grpc-timeout` is: the upstream is not told the whole time again.
#[tokio::test(start_paused = true)]
async fn a_retry_is_told_what_is_left_in_the_deadline_header() {
    let layer = with_deadline_header("10s");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let svc = layer.layer(slow_503s(&[4, 1], 0, seen.clone()));

    let started = tokio::time::Instant::now();
    let res = svc
        .oneshot(Request::get("/").body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    let seen = seen.lock().unwrap().clone();
    let seen: Vec<_> = seen.iter().map(|v| v.as_deref()).collect();
    assert_eq!(seen, [Some("10"), Some("6"), Some("5")]);
}
