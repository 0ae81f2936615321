//! The retry layer: policy, body replay, budget, backoff, Retry-After, deadlines.

#[path = "support/retry_upstreams.rs"]
mod support;

#[path = "support/counted.rs"]
mod counted;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_upstream::breaker::error::CircuitOpen;
use tower_upstream::deadline::{HeaderUnit, RequestDeadline};
use tower_upstream::fault::{classify, Fault};
use tower_upstream::grpc::Code;
use tower_upstream::retry::{Attempts, Backoff, Idempotent, ReplayBody};
use tower_upstream::timeout::error::Elapsed;
use tower_upstream::{DeadlineLayer, RetryBudget, RetryLayer};

use counted::Counted;
use support::{closed_addr, ok, status, Action, Upstream};

fn attempts<B>(rsp: &Response<B>) -> u32 {
    Attempts::of(rsp)
}

fn client<B>() -> Client<hyper_util::client::legacy::connect::HttpConnector, ReplayBody<B>>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

fn full(s: &'static str) -> Full<Bytes> {
    Full::new(Bytes::from_static(s.as_bytes()))
}

// ---------------------------------------------------------------------------------------
// Real sockets
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn get_succeeds_after_n_resets() {
    let upstream = Upstream::flaky(2, || Action::Reset).await;
    let mut svc = RetryLayer::new().layer(client::<Full<Bytes>>());
    let req = Request::get(upstream.url("/")).body(full("")).unwrap();
    let rsp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(attempts(&rsp), 3);
    assert_eq!(upstream.count(), 3);
}

#[tokio::test]
async fn post_is_not_retried_after_a_reset() {
    let upstream = Upstream::flaky(1, || Action::Reset).await;
    let mut svc = RetryLayer::new().layer(client::<Full<Bytes>>());
    let req = Request::post(upstream.url("/"))
        .body(full("order"))
        .unwrap();
    let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
    let c = classify(&*err);
    assert_eq!(c.sent(), tower_upstream::Sent::MaybeProcessed, "{err:?}");
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn post_with_idempotency_key_is_retried_after_a_reset() {
    let upstream = Upstream::flaky(1, || Action::Reset).await;
    let mut svc = RetryLayer::new().layer(client::<Full<Bytes>>());
    let req = Request::post(upstream.url("/"))
        .header("idempotency-key", "k-1")
        .body(full("order"))
        .unwrap();
    let rsp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(attempts(&rsp), 2);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].body, "order");
}

#[tokio::test]
async fn post_is_retried_after_a_refused_connection() {
    let upstream = Upstream::flaky(0, || Action::Reset).await;
    let closed = closed_addr().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let http = client::<Full<Bytes>>();
    // Attempt 1 goes to a port nobody listens on; later attempts to the upstream.
    let inner = tower::service_fn(move |mut req: Request<ReplayBody<Full<Bytes>>>| {
        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            *req.uri_mut() = format!("http://{closed}/").parse().unwrap();
        }
        http.clone().oneshot(req)
    });
    let mut svc = RetryLayer::new().layer(inner);
    let req = Request::post(upstream.url("/"))
        .body(full("hello"))
        .unwrap();
    let rsp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(attempts(&rsp), 2);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, http::Method::POST);
    assert_eq!(seen[0].body, "hello");
}

type Chunks = StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn streaming(total: usize, chunk: usize) -> (Chunks, Bytes) {
    let all: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
    let all = Bytes::from(all);
    let frames: Vec<_> = (0..total)
        .step_by(chunk)
        .map(|i| Ok(Frame::data(all.slice(i..(i + chunk).min(total)))))
        .collect();
    (StreamBody::new(stream::iter(frames)), all)
}

#[tokio::test]
async fn small_streaming_body_is_replayed_byte_for_byte() {
    let (body, expected) = streaming(10 * 1024, 1000);
    let want = expected.clone();
    // 503 until the upstream has seen the body twice; each time it checks the bytes.
    let upstream = Upstream::start(move |n, seen| {
        assert_eq!(seen.body, want, "attempt {n} body differs");
        if n == 0 {
            status(StatusCode::SERVICE_UNAVAILABLE)
        } else {
            ok()
        }
    })
    .await;
    let mut svc = RetryLayer::new().layer(client::<Chunks>());
    let req = Request::put(upstream.url("/blob")).body(body).unwrap();
    let rsp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(attempts(&rsp), 2);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|s| s.body == expected));
}

#[tokio::test]
async fn large_streaming_body_is_not_retried() {
    let (body, expected) = streaming(1024 * 1024, 16 * 1024);
    let upstream = Upstream::start(|_, _| status(StatusCode::SERVICE_UNAVAILABLE)).await;
    let layer = RetryLayer::new();
    let mut svc = layer.layer(client::<Chunks>());
    let req = Request::put(upstream.url("/blob")).body(body).unwrap();
    let rsp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(attempts(&rsp), 1);
    assert_eq!(upstream.seen()[0].body, expected);
    assert_eq!(upstream.count(), 1);
    assert_eq!(layer.budget().exhausted(), 0);
}

// ---------------------------------------------------------------------------------------
// Mock upstreams, paused time
// ---------------------------------------------------------------------------------------

type Req = Request<ReplayBody<Full<Bytes>>>;

/// A mock upstream answering `answers[n]` to attempt `n` (the last one afterwards), and
/// recording each attempt's headers and the virtual time it started.
#[derive(Clone)]
struct Script {
    answers: Arc<Vec<Response<()>>>,
    log: Arc<Mutex<Vec<(Instant, HeaderMap)>>>,
}

impl Script {
    fn new(answers: Vec<Response<()>>) -> Self {
        Script {
            answers: Arc::new(answers),
            log: Arc::default(),
        }
    }

    fn service(
        &self,
    ) -> impl Service<Req, Response = Response<()>, Error = BoxError, Future: Send> + Clone {
        let this = self.clone();
        tower::service_fn(move |req: Req| {
            let mut log = this.log.lock().unwrap();
            log.push((Instant::now(), req.headers().clone()));
            let a = &this.answers[(log.len() - 1).min(this.answers.len() - 1)];
            let mut rsp = Response::new(());
            *rsp.status_mut() = a.status();
            *rsp.headers_mut() = a.headers().clone();
            std::future::ready(Ok::<_, BoxError>(rsp))
        })
    }

    fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    fn times(&self) -> Vec<Instant> {
        self.log.lock().unwrap().iter().map(|(t, _)| *t).collect()
    }
}

fn answer(status: u16, headers: &[(&'static str, String)]) -> Response<()> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(()).unwrap()
}

async fn send<S>(svc: &mut S, req: Request<Full<Bytes>>) -> Result<Response<()>, BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<()>, Error = BoxError>,
{
    svc.ready().await?.call(req).await
}

fn get_req() -> Request<Full<Bytes>> {
    Request::get("http://upstream/")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

// Pins: the retry clones the service it wraps for a request's later attempts only, when the
// request comes to one; a request its first attempt answers clones nothing.
#[tokio::test(start_paused = true)]
async fn the_service_is_cloned_only_for_a_request_that_is_retried() {
    // The fourth attempt (the fourth request's first) answers 503, every other one 200.
    let script = Script::new(vec![
        answer(200, &[]),
        answer(200, &[]),
        answer(200, &[]),
        answer(503, &[]),
        answer(200, &[]),
    ]);
    let clones = Arc::new(AtomicUsize::new(0));
    let mut svc = RetryLayer::new().layer(Counted::new(&clones, script.service()));
    let made = clones.load(Ordering::SeqCst);

    for _ in 0..3 {
        let rsp = send(&mut svc, get_req()).await.unwrap();
        assert_eq!((rsp.status(), attempts(&rsp)), (StatusCode::OK, 1));
    }
    assert_eq!(
        clones.load(Ordering::SeqCst),
        made,
        "no clone for a request sent once"
    );

    let rsp = send(&mut svc, get_req()).await.unwrap();
    assert_eq!((rsp.status(), attempts(&rsp)), (StatusCode::OK, 2));
    assert_eq!(
        clones.load(Ordering::SeqCst),
        made + 1,
        "one clone for the retried request"
    );
    assert_eq!(script.count(), 5);
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_delays_the_retry() {
    let script = Script::new(vec![
        answer(503, &[("retry-after", "2".into())]),
        answer(200, &[]),
    ]);
    let mut svc = RetryLayer::new().layer(script.service());
    let start = Instant::now();
    let rsp = send(&mut svc, get_req()).await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(attempts(&rsp), 2);
    let t = script.times();
    assert_eq!(t[1] - t[0], Duration::from_secs(2));
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn retry_after_past_the_cap_returns_the_answer_at_once() {
    let script = Script::new(vec![
        answer(503, &[("retry-after", "3600".into())]),
        answer(200, &[]),
    ]);
    let mut svc = RetryLayer::new().layer(script.service());
    let start = Instant::now();
    let rsp = send(&mut svc, get_req()).await.unwrap();
    assert_eq!(rsp.status(), 503);
    assert_eq!(attempts(&rsp), 1);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(script.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_http_date() {
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3));
    let script = Script::new(vec![
        answer(503, &[("retry-after", date)]),
        answer(200, &[]),
    ]);
    let mut svc = RetryLayer::new().layer(script.service());
    let rsp = send(&mut svc, get_req()).await.unwrap();
    assert_eq!(rsp.status(), 200);
    let t = script.times();
    let waited = t[1] - t[0];
    // HTTP dates have whole-second resolution.
    assert!(
        waited >= Duration::from_secs(1) && waited <= Duration::from_secs(3),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn non_idempotent_503_is_not_retried_unless_keyed() {
    let script = Script::new(vec![answer(503, &[]), answer(200, &[])]);
    let mut svc = RetryLayer::new().layer(script.service());
    let post = Request::post("http://upstream/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&mut svc, post).await.unwrap().status(), 503);
    assert_eq!(script.count(), 1);

    let script = Script::new(vec![answer(503, &[]), answer(200, &[])]);
    let mut svc = RetryLayer::new().layer(script.service());
    let post = Request::post("http://upstream/")
        .header("idempotency-key", "abc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&mut svc, post).await.unwrap().status(), 200);
    assert_eq!(script.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn max_attempts_and_backoff_bounds() {
    let script = Script::new(vec![answer(502, &[])]);
    let layer = RetryLayer::builder()
        .max_attempts(4)
        .backoff(Backoff::full_jitter(
            Duration::from_millis(100),
            Duration::from_millis(300),
        ))
        .build()
        .unwrap();
    let mut svc = layer.layer(script.service());
    let rsp = send(&mut svc, get_req()).await.unwrap();
    assert_eq!(rsp.status(), 502);
    assert_eq!(attempts(&rsp), 4);
    let t = script.times();
    for (i, w) in t.windows(2).enumerate() {
        let cap = Duration::from_millis((100 << i).min(300));
        assert!(w[1] - w[0] <= cap, "retry {i}: {:?}", w[1] - w[0]);
    }
}

#[tokio::test(start_paused = true)]
async fn fast_path_with_one_attempt() {
    let script = Script::new(vec![answer(503, &[]), answer(200, &[])]);
    let layer = RetryLayer::builder().max_attempts(1).build().unwrap();
    let mut svc = layer.layer(script.service());
    let rsp = send(&mut svc, get_req()).await.unwrap();
    assert_eq!(rsp.status(), 503);
    assert_eq!(attempts(&rsp), 1);
    assert_eq!(layer.budget().balance(), 100); // nothing deposited or withdrawn
}

#[tokio::test(start_paused = true)]
async fn circuit_open_is_never_retried_nor_budgeted() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_: Req| {
        c.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err::<Response<()>, BoxError>(Box::new(CircuitOpen::new(
            Duration::from_millis(10),
        ))))
    });
    let layer = RetryLayer::new();
    let mut svc = layer.layer(inner);
    let before = layer.budget().balance();
    let err = send(&mut svc, get_req()).await.unwrap_err();
    assert_eq!(classify(&*err).fault(), Fault::DestinationUnavailable);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(layer.budget().balance() >= before);
    assert_eq!(layer.budget().exhausted(), 0);
}

#[tokio::test(start_paused = true)]
async fn deadline_bounds_attempts() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_: Req| {
        c.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_millis(250)).await;
            Err::<Response<()>, BoxError>(Box::new(Elapsed::new()))
        }
    });
    let mut svc = RetryLayer::new().layer(inner);
    let mut req = get_req();
    req.extensions_mut()
        .insert(RequestDeadline::after(Duration::from_millis(300)));
    let err = send(&mut svc, req).await.unwrap_err();
    let n = calls.load(Ordering::SeqCst);
    // Attempt 1 ends at 250 ms; a backoff of at most 25 ms fits, attempt 2 ends at ~500 ms,
    // and no time is left for a third.
    assert_eq!(n, 2, "{n} attempts");
    assert_eq!(classify(&*err).fault(), Fault::HttpResponseTimeout);
    assert_eq!(
        classify(&*err).fault().http_status(),
        StatusCode::GATEWAY_TIMEOUT
    );
}

/// A `Deadline` composed by hand above the retry, propagating its header: each retry is
/// told what the deadline leaves (rounded up), not the whole time again, as inside
/// `Upstream`. Attempt 1 takes 4 s, attempt 2 1 s; each answers 503 with no pushback.
#[tokio::test(start_paused = true)]
async fn a_deadline_header_above_the_retry_is_lowered_on_each_retry() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let inner = tower::service_fn(move |req: Req| {
        let attempt = {
            let mut log = log.lock().unwrap();
            let value = req.headers().get("request-timeout");
            log.push(value.map(|v| v.to_str().unwrap().to_owned()));
            log.len()
        };
        async move {
            let secs = if attempt == 1 { 4 } else { 1 };
            tokio::time::sleep(Duration::from_secs(secs)).await;
            Ok::<_, BoxError>(answer(503, &[("retry-after", "0".into())]))
        }
    });
    let deadline = DeadlineLayer::builder()
        .timeout(Duration::from_secs(10))
        .header("request-timeout", HeaderUnit::Seconds)
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(deadline)
        .layer(RetryLayer::new())
        .service(inner);
    let res = send(&mut svc, get_req()).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(attempts(&res), 3);
    let seen = seen.lock().unwrap().clone();
    let seen: Vec<_> = seen.iter().map(|v| v.as_deref()).collect();
    assert_eq!(seen, [Some("10"), Some("6"), Some("5")]);
}

#[tokio::test(start_paused = true)]
async fn budget_bounds_attempts_under_total_failure() {
    for (ratio, floor) in [(0.2, 10u32), (0.05, 1), (1.0, 0), (2.5, 3)] {
        let script = Script::new(vec![answer(503, &[])]);
        let budget = RetryBudget::builder()
            .ratio(ratio)
            .min_per_second(floor)
            .window(Duration::from_secs(10))
            .build()
            .unwrap();
        let layer = RetryLayer::builder()
            .max_attempts(5)
            .budget(budget.clone())
            .build()
            .unwrap();
        let svc = layer.layer(script.service());
        let requests = 10_000usize;
        let start = Instant::now();
        let all = (0..requests).map(|_| {
            let svc = svc.clone();
            async move { svc.oneshot(get_req()).await.unwrap() }
        });
        let rsps = futures_util::future::join_all(all).await;
        assert!(
            start.elapsed() < Duration::from_secs(9),
            "must stay in one window"
        );
        assert!(rsps.iter().all(|r| r.status() == 503));
        let attempts = script.count() as f64;
        let bound = requests as f64 * (1.0 + ratio) + f64::from(floor) * 10.0;
        assert!(attempts <= bound, "ratio {ratio}: {attempts} > {bound}");
        // The budget is what stopped them, and it was (nearly) used up.
        assert!(budget.exhausted() > 0);
        assert!(
            attempts >= bound - 2.0,
            "ratio {ratio}: {attempts} ≪ {bound}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn budget_is_shared_by_every_layer_call() {
    let layer = RetryLayer::new();
    let script = Script::new(vec![answer(200, &[])]);
    let mut a = layer.layer(script.service());
    let b = layer.layer(script.service());
    for _ in 0..10 {
        send(&mut a, get_req()).await.unwrap();
    }
    assert_eq!(b.budget().balance(), 102);
    assert_eq!(layer.budget().balance(), 102);
}

fn grpc_req(idempotent: bool) -> Request<Full<Bytes>> {
    let mut req = Request::post("http://upstream/pkg.Svc/Get")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    if idempotent {
        req.extensions_mut().insert(Idempotent);
    }
    req
}

fn grpc_answer(code: Code, pushback: Option<&str>) -> Response<()> {
    let mut h = vec![
        ("content-type", "application/grpc".to_string()),
        ("grpc-status", code.as_i32().to_string()),
    ];
    if let Some(p) = pushback {
        h.push(("grpc-retry-pushback-ms", p.to_string()));
    }
    answer(200, &h)
}

#[tokio::test(start_paused = true)]
async fn grpc_unavailable_is_retried_for_marked_calls() {
    let script = Script::new(vec![
        grpc_answer(Code::Unavailable, Some("500")),
        grpc_answer(Code::Ok, None),
    ]);
    let mut svc = RetryLayer::new().layer(script.service());
    let rsp = send(&mut svc, grpc_req(true)).await.unwrap();
    assert_eq!(rsp.headers()["grpc-status"], "0");
    assert_eq!(attempts(&rsp), 2);
    let log = script.log.lock().unwrap();
    assert_eq!(log[1].0 - log[0].0, Duration::from_millis(500));
    assert!(log[0].1.get("grpc-previous-rpc-attempts").is_none());
    assert_eq!(log[1].1["grpc-previous-rpc-attempts"], "1");
}

#[tokio::test(start_paused = true)]
async fn grpc_not_retried_unmarked_negative_pushback_or_other_codes() {
    for (req, ans) in [
        (grpc_req(false), grpc_answer(Code::Unavailable, None)),
        (grpc_req(true), grpc_answer(Code::Unavailable, Some("-1"))),
        (grpc_req(true), grpc_answer(Code::Internal, None)),
    ] {
        let script = Script::new(vec![ans, grpc_answer(Code::Ok, None)]);
        let mut svc = RetryLayer::new().layer(script.service());
        let rsp = send(&mut svc, req).await.unwrap();
        assert_eq!(attempts(&rsp), 1);
        assert_eq!(script.count(), 1);
    }
}

#[test]
fn config_errors() {
    let err = RetryLayer::builder().max_attempts(0).build().unwrap_err();
    assert_eq!(err.field(), "retry.max_attempts");
    let err = RetryLayer::builder()
        .backoff(Backoff::full_jitter(
            Duration::from_secs(2),
            Duration::from_secs(1),
        ))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "retry.backoff");
    assert!(err.to_string().starts_with("invalid retry.backoff: "));
}

#[tokio::test(start_paused = true)]
async fn response_before_the_body_was_sent_is_not_retried() {
    // The mock answers without reading the body: the upstream cannot have seen all of it,
    // and the rest is not recorded, so the 503 is returned as is.
    let script = Script::new(vec![answer(503, &[]), answer(200, &[])]);
    let mut svc = RetryLayer::new().layer(script.service());
    let put = Request::put("http://upstream/")
        .body(full("payload"))
        .unwrap();
    let rsp = send(&mut svc, put).await.unwrap();
    assert_eq!(rsp.status(), 503);
    assert_eq!(Attempts::of(&rsp), 1);
    assert_eq!(script.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn unsent_body_is_handed_back_and_sent_by_the_retry() {
    use http_body_util::BodyExt;
    // Attempt 1 fails as refused without touching the body; attempt 2 reads it all.
    let calls = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let (c, b) = (calls.clone(), bodies.clone());
    let inner = tower::service_fn(move |req: Req| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        let b = b.clone();
        async move {
            if n == 0 {
                drop(req);
                return Err::<Response<()>, BoxError>(Box::new(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                )));
            }
            let body = req.into_body().collect().await?.to_bytes();
            b.lock().unwrap().push(body);
            Ok(Response::new(()))
        }
    });
    let mut svc = RetryLayer::new().layer(inner);
    let post = Request::post("http://upstream/")
        .body(full("payload"))
        .unwrap();
    let rsp = send(&mut svc, post).await.unwrap();
    assert_eq!(Attempts::of(&rsp), 2);
    assert_eq!(
        *bodies.lock().unwrap(),
        vec![Bytes::from_static(b"payload")]
    );
}

#[tokio::test(start_paused = true)]
async fn grpc_calls_retryable_by_config() {
    use tower_upstream::retry::DefaultPolicy;
    let script = Script::new(vec![
        grpc_answer(Code::ResourceExhausted, None),
        grpc_answer(Code::Ok, None),
    ]);
    let layer = RetryLayer::builder()
        .policy(
            DefaultPolicy::new()
                .grpc_codes([Code::ResourceExhausted])
                .retry_all_grpc_calls(true),
        )
        .build()
        .unwrap();
    let mut svc = layer.layer(script.service());
    let rsp = send(&mut svc, grpc_req(false)).await.unwrap();
    assert_eq!(Attempts::of(&rsp), 2);
}
