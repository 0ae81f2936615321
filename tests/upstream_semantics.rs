//! What `Upstream::builder()`'s composed stack does where its parts meet: the attempt
//! timeout against the deadline, retries against the breaker, the concurrency limit and the
//! inner service's readiness, gRPC headers across attempts, an outer deadline, real sockets.
//! Pinned so that merging the retry, the breaker and the attempt timeout into one state
//! machine cannot change any of it unnoticed.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_upstream::breaker::{BreakerHandle, Snapshot, State};
use tower_upstream::grpc::{self, Code};
use tower_upstream::retry::{Attempts, Idempotent, ReplayBody};
use tower_upstream::{CircuitBreakerLayer, DeadlineLayer, MapFaultsLayer, RetryLayer, Upstream};

use support::{local_resolver, raw_upstream, read_head, Counted, REAL_TIMEOUT};

/// The breaker key of the in-memory tests' requests (their URI's authority).
const KEY: &str = "upstream";

/// What the inner service does with one attempt.
#[derive(Clone, Copy, Debug)]
enum Act {
    /// Answers at once with this status.
    Status(u16),
    /// Answers at once with this status and `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    /// Answers this status after a wait.
    After(Duration, u16),
    /// Never answers.
    Hang,
}

/// What the inner service saw of one attempt.
#[derive(Clone, Debug)]
struct Seen {
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

/// Every attempt the inner service saw, in order.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

impl Log {
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
}

/// An inner service: attempt `n` (0-based, counting every attempt of every request) reads
/// its whole body, is logged, then does `script(n)`.
fn scripted<B>(
    log: &Log,
    script: impl Fn(usize) -> Act + Clone + Send + Sync + 'static,
) -> impl Service<
    Request<ReplayBody<B>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone
       + Send
       + Sync
       + 'static
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let log = log.clone();
    service_fn(move |req: Request<ReplayBody<B>>| {
        let (log, script) = (log.clone(), script.clone());
        async move {
            let at = Instant::now();
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let n = {
                let mut seen = log.0.lock().unwrap();
                seen.push(Seen {
                    headers: parts.headers,
                    body,
                    at,
                });
                seen.len() - 1
            };
            let (status, retry_after) = match script(n) {
                Act::Status(status) => (status, None),
                Act::RetryAfter(status, secs) => (status, Some(secs)),
                Act::After(wait, status) => {
                    tokio::time::sleep(wait).await;
                    (status, None)
                }
                Act::Hang => std::future::pending().await,
            };
            let mut rsp = Response::builder().status(status);
            if let Some(secs) = retry_after {
                rsp = rsp.header("retry-after", secs);
            }
            Ok(rsp
                .body(Full::new(Bytes::from_static(b"upstream")))
                .unwrap())
        }
    })
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{KEY}{path}"))
        .body(Full::default())
        .unwrap()
}

/// A gRPC call marked idempotent (so that the default policy retries it).
fn grpc_call() -> Request<Full<Bytes>> {
    let mut req = Request::post(format!("http://{KEY}/pkg.Svc/Get"))
        .header("content-type", "application/grpc")
        .body(Full::default())
        .unwrap();
    req.extensions_mut().insert(Idempotent);
    req
}

/// A header's value, empty when absent.
fn header_in(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn header<B>(res: &Response<B>, name: &str) -> String {
    header_in(res.headers(), name)
}

/// A fault mapper that names the error in `proxy-status` (`details`): it tells the
/// deadline's expiry ("request deadline exceeded") from an attempt timeout's ("upstream
/// attempt timed out"), which share the fault `http_response_timeout`.
fn detailed() -> MapFaultsLayer {
    MapFaultsLayer::builder()
        .expose_details(true)
        .build()
        .unwrap()
}

const DEADLINE_FAULT: &str =
    "tower-upstream; error=http_response_timeout; details=\"request deadline exceeded\"";
const ATTEMPT_TIMEOUT_FAULT: &str =
    "tower-upstream; error=http_response_timeout; details=\"upstream attempt timed out\"";

fn counts(snap: &Snapshot) -> (State, u64, u64) {
    (snap.state(), snap.calls(), snap.failures())
}

/// The state, calls and failures of the in-memory tests' breaker.
fn breaker_counts(handle: &BreakerHandle) -> (State, u64, u64) {
    counts(&handle.snapshot(KEY).unwrap())
}

/// The stack's answer has this status and `proxy-status` (empty: none, the upstream's own).
#[track_caller]
fn assert_answer<B>(res: &Response<B>, status: StatusCode, proxy_status: &str) {
    assert_eq!(
        (res.status(), header(res, "proxy-status").as_str()),
        (status, proxy_status)
    );
}

// Pins: an attempt that times out is one breaker failure, is retried after a backoff, and
// the retry's answer comes back with `Attempts` = 2.
#[tokio::test(start_paused = true)]
async fn an_attempt_timeout_is_retried_and_counted_by_the_breaker() -> Result<(), BoxError> {
    let layer = Upstream::builder()
        .attempt_timeout(Duration::from_secs(1))
        .build()?;
    let handle = layer.breaker_handle().unwrap();
    let log = Log::default();
    let svc = layer.layer(scripted(&log, |n| match n {
        0 => Act::Hang,
        _ => Act::Status(200),
    }));

    let started = Instant::now();
    let res = svc.oneshot(get("/")).await?;
    assert_answer(&res, StatusCode::OK, "");
    assert_eq!(Attempts::of(&res), 2);
    let seen = log.seen();
    assert_eq!(seen.len(), 2);
    // The second attempt starts after the timeout and a full-jitter backoff (≤ 25 ms).
    let retry_at = seen[1].at - started;
    assert!(
        retry_at >= Duration::from_secs(1) && retry_at <= Duration::from_millis(1025),
        "{retry_at:?}"
    );
    assert_eq!(started.elapsed(), retry_at);
    let snap = handle.snapshot(KEY).unwrap();
    assert_eq!(counts(&snap), (State::Closed, 2, 1));
    assert_eq!(snap.consecutive_failures(), 0);
    Ok(())
}

// Pins: an attempt timeout longer than what the deadline leaves is cut to the deadline; the
// request ends at the deadline with the deadline's fault, after one attempt.
#[tokio::test(start_paused = true)]
async fn an_attempt_timeout_past_the_deadline_ends_at_the_deadline() -> Result<(), BoxError> {
    let layer = Upstream::builder()
        .map_faults(detailed())
        .deadline(Duration::from_secs(1))
        .attempt_timeout(Duration::from_secs(5))
        .build()?;
    let handle = layer.breaker_handle().unwrap();
    let log = Log::default();
    let svc = layer.layer(scripted(&log, |_| Act::Hang));

    let started = Instant::now();
    let res = svc.oneshot(get("/")).await?;
    assert_answer(&res, StatusCode::GATEWAY_TIMEOUT, DEADLINE_FAULT);
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(log.count(), 1, "no retry once the deadline is spent");
    // The stack's own deadline (its configured timeout) counts as an upstream failure: an
    // upstream that hangs past it must open the circuit even when the attempt timeout is
    // longer. A deadline the caller set does not (next test).
    assert_eq!(breaker_counts(&handle), (State::Closed, 1, 1));
    Ok(())
}

// Pins: a `Retry-After` longer than what the deadline leaves is not waited for (the
// upstream's answer comes back at once, untouched); a shorter one is.
#[tokio::test(start_paused = true)]
async fn a_pushback_past_the_deadline_returns_the_upstream_answer() -> Result<(), BoxError> {
    // A pushback cap above 5 s: the deadline, not the cap, is what refuses the wait.
    let retry = RetryLayer::builder()
        .pushback_cap(Duration::from_secs(10))
        .build()?;
    let layer = Upstream::builder()
        .deadline(Duration::from_secs(2))
        .retry(retry)
        .build()?;
    let log = Log::default();
    let svc = layer.layer(scripted(&log, |n| match n {
        0 => Act::RetryAfter(503, 5),
        1 => Act::RetryAfter(503, 1),
        _ => Act::Status(200),
    }));

    let started = Instant::now();
    let res = svc.clone().oneshot(get("/")).await?;
    // The upstream's own answer.
    assert_answer(&res, StatusCode::SERVICE_UNAVAILABLE, "");
    assert_eq!(header(&res, "retry-after"), "5");
    assert_eq!(Attempts::of(&res), 1);
    assert_eq!(log.count(), 1);
    assert_eq!(started.elapsed(), Duration::ZERO);

    // Retry-After: 1 fits in the 2 s: waited for exactly, then retried.
    let started = Instant::now();
    let res = svc.oneshot(get("/")).await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(Attempts::of(&res), 2);
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(layer.retry_budget().unwrap().exhausted(), 0);
    Ok(())
}

/// An inner service whose first instance is ready and answers 503 at once, and whose clones
/// (the retry keeps one for its later attempts) get ready as `Then` says.
struct FirstReadyOnly {
    calls: Arc<AtomicUsize>,
    clone: bool,
    then: Then,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

/// What a clone of [`FirstReadyOnly`] does when polled ready.
#[derive(Clone, Copy)]
enum Then {
    /// Never gets ready (and never wakes: only a timer above can end the wait).
    Never,
    /// Fails to.
    Fail,
    /// Gets ready at this instant.
    At(Instant),
}

impl FirstReadyOnly {
    fn new(fail: bool) -> (Self, Arc<AtomicUsize>) {
        Self::then(if fail { Then::Fail } else { Then::Never })
    }

    fn then(then: Then) -> (Self, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = FirstReadyOnly {
            calls: calls.clone(),
            clone: false,
            then,
            sleep: None,
        };
        (svc, calls)
    }
}

impl Clone for FirstReadyOnly {
    fn clone(&self) -> Self {
        let sleep = match self.then {
            Then::At(at) => Some(Box::pin(tokio::time::sleep_until(at))),
            Then::Never | Then::Fail => None,
        };
        FirstReadyOnly {
            calls: self.calls.clone(),
            clone: true,
            then: self.then,
            sleep,
        }
    }
}

impl<B> Service<Request<ReplayBody<B>>> for FirstReadyOnly {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Full<Bytes>>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if !self.clone {
            return Poll::Ready(Ok(()));
        }
        match (self.then, &mut self.sleep) {
            (Then::Never, _) => Poll::Pending,
            (Then::Fail, _) => Poll::Ready(Err(std::io::Error::other("pool closed").into())),
            (Then::At(_), Some(sleep)) => std::future::Future::poll(sleep.as_mut(), cx).map(Ok),
            (Then::At(_), None) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, _req: Request<ReplayBody<B>>) -> Self::Future {
        self.calls.fetch_add(1, SeqCst);
        let rsp = Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(Full::default())
            .unwrap();
        std::future::ready(Ok(rsp))
    }
}

// Pins: the stack clones the service it wraps for a request's later attempts only, when the
// request comes to one. A request its first attempt answers clones nothing: a clone per
// request would write a hyper client's or a tonic channel's shared counts from every core.
#[tokio::test(start_paused = true)]
async fn the_service_is_cloned_only_for_a_request_that_is_retried() -> Result<(), BoxError> {
    let log = Log::default();
    let clones = Arc::new(AtomicUsize::new(0));
    // Attempt 3, the fourth request's first, answers 503; every other one 200.
    let inner = Counted::new(
        &clones,
        scripted(&log, |n| Act::Status(if n == 3 { 503 } else { 200 })),
    );
    let mut svc = Upstream::builder().build()?.layer(inner);
    let made = clones.load(SeqCst);

    for _ in 0..3 {
        let res = svc.ready().await?.call(get("/")).await?;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(Attempts::of(&res), 1);
    }
    assert_eq!(
        clones.load(SeqCst),
        made,
        "no clone for a request sent once"
    );

    let res = svc.ready().await?.call(get("/")).await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(Attempts::of(&res), 2);
    assert_eq!(
        clones.load(SeqCst),
        made + 1,
        "one clone for the retried request"
    );
    assert_eq!(log.count(), 5);
    Ok(())
}

// Pins: a retry waiting on a service that never becomes ready is ended by the deadline.
#[tokio::test(start_paused = true)]
async fn a_retry_whose_service_never_gets_ready_ends_at_the_deadline() -> Result<(), BoxError> {
    let layer = Upstream::builder()
        .map_faults(detailed())
        .deadline(Duration::from_secs(1))
        .build()?;
    let (inner, calls) = FirstReadyOnly::new(false);
    let svc = layer.layer(inner);

    let started = Instant::now();
    let res = svc.oneshot(get("/")).await?;
    assert_answer(&res, StatusCode::GATEWAY_TIMEOUT, DEADLINE_FAULT);
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(calls.load(SeqCst), 1);
    Ok(())
}

// Pins: a `poll_ready` error met by a retry ends the request with the mapper's answer for
// that error (an unknown error: 502 `proxy_internal_error`).
// Decided (documented in the `upstream` module docs): the first attempt's 503 was dropped
// when the retry was decided (keeping an answer through the backoff would hold its body and
// its connection), so the error that stopped the retry is what is answered.
#[tokio::test(start_paused = true)]
async fn a_ready_error_on_the_retry_is_answered_for_that_error() -> Result<(), BoxError> {
    let layer = Upstream::builder().map_faults(detailed()).build()?;
    let (inner, calls) = FirstReadyOnly::new(true);
    let svc = layer.layer(inner);

    let res = svc.oneshot(get("/")).await?;
    assert_answer(
        &res,
        StatusCode::BAD_GATEWAY,
        "tower-upstream; error=proxy_internal_error; details=\"pool closed\"",
    );
    assert_eq!(calls.load(SeqCst), 1);
    Ok(())
}

// Pins: a forced-open breaker answers 503 with `Retry-After` without calling or retrying;
// a disabled one lets calls (and their retries) through without counting them.
#[tokio::test(start_paused = true)]
async fn forced_open_refuses_and_disabled_counts_nothing() -> Result<(), BoxError> {
    let layer = Upstream::builder().build()?;
    let handle = layer.breaker_handle().unwrap();
    let log = Log::default();
    let svc = layer.layer(scripted(&log, |n| match n {
        0 => Act::Status(200),
        _ => Act::Status(503),
    }));
    assert_eq!(
        svc.clone().oneshot(get("/")).await?.status(),
        StatusCode::OK
    );
    assert_eq!(breaker_counts(&handle), (State::Closed, 1, 0));

    handle.force_open();
    let res = svc.clone().oneshot(get("/")).await?;
    assert_answer(
        &res,
        StatusCode::SERVICE_UNAVAILABLE,
        "tower-upstream; error=destination_unavailable",
    );
    assert_eq!(header(&res, "retry-after"), "5");
    assert_eq!(Attempts::of(&res), 1);
    assert_eq!(log.count(), 1, "the inner service was not called");
    assert_eq!(layer.retry_budget().unwrap().exhausted(), 0);

    handle.disable();
    let res = svc.oneshot(get("/")).await?;
    // The upstream's own 503.
    assert_answer(&res, StatusCode::SERVICE_UNAVAILABLE, "");
    assert_eq!(log.count(), 4, "three attempts went through");
    assert_eq!(breaker_counts(&handle), (State::Disabled, 1, 0));
    Ok(())
}

// Pins: a circuit that opens on attempt 1 refuses the retry; the request is answered with
// the circuit-open 503, and the upstream was called once.
// Decided (documented in the `upstream` module docs): the client gets the breaker's 503
// (`destination_unavailable`, `Retry-After: 5`) rather than the upstream's own 503 of attempt
// 1, which was dropped when the retry was decided: the breaker's answer is the current one,
// and it says when to come back.
#[tokio::test(start_paused = true)]
async fn a_circuit_opening_between_attempts_refuses_the_retry() -> Result<(), BoxError> {
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .jitter(0.0)
        .build()?;
    let layer = Upstream::builder().breaker(breaker).build()?;
    let handle = layer.breaker_handle().unwrap();
    let log = Log::default();
    let svc = layer.layer(scripted(&log, |_| Act::Status(503)));

    let res = svc.oneshot(get("/")).await?;
    assert_answer(
        &res,
        StatusCode::SERVICE_UNAVAILABLE,
        "tower-upstream; error=destination_unavailable",
    );
    assert_eq!(header(&res, "retry-after"), "5");
    assert_eq!(Attempts::of(&res), 1, "a fault answer carries no count");
    assert_eq!(log.count(), 1);
    assert_eq!(breaker_counts(&handle), (State::Open, 1, 1));
    assert_eq!(layer.retry_budget().unwrap().exhausted(), 0);
    Ok(())
}

fn grpc_timeout(seen: &Seen) -> Duration {
    grpc::timeout_of(&seen.headers).unwrap()
}

fn previous_attempts(seen: &Seen) -> String {
    header_in(&seen.headers, "grpc-previous-rpc-attempts")
}

// Pins: a gRPC attempt is told the attempt timeout while it is the smaller, a retry what
// the deadline leaves (with `grpc-previous-rpc-attempts: 1`), and the deadline's expiry is
// answered 200 `grpc-status: 4`.
#[tokio::test(start_paused = true)]
async fn grpc_attempts_are_told_their_timeout_and_the_deadline_answers_4() -> Result<(), BoxError> {
    let layer = Upstream::builder()
        .deadline(Duration::from_secs(3))
        .attempt_timeout(Duration::from_secs(2))
        .build()?;
    let log = Log::default();
    let svc = layer.layer(scripted(&log, |_| Act::Hang));

    let started = Instant::now();
    let res = svc.oneshot(grpc_call()).await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "content-type"), "application/grpc");
    assert_eq!(
        res.headers().get("grpc-status").and_then(Code::from_header),
        Some(Code::DeadlineExceeded)
    );
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    let seen = log.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(grpc_timeout(&seen[0]), Duration::from_secs(2));
    assert_eq!(previous_attempts(&seen[0]), "");
    // Attempt 2 starts after 2 s and a backoff of at most 25 ms: it gets what is left of 3 s.
    let second = grpc_timeout(&seen[1]);
    assert!(
        second <= Duration::from_secs(1) && second >= Duration::from_millis(975),
        "{second:?}"
    );
    assert_eq!(previous_attempts(&seen[1]), "1");
    Ok(())
}

// Pins: gRPC attempts that each time out are retried with a fresh `grpc-timeout` and a
// growing `grpc-previous-rpc-attempts`; the last one's timeout is answered 200
// `grpc-status: 4`.
#[tokio::test(start_paused = true)]
async fn grpc_attempt_timeouts_are_retried_then_answered_4() -> Result<(), BoxError> {
    let layer = Upstream::builder()
        .attempt_timeout(Duration::from_secs(1))
        .build()?;
    let log = Log::default();
    let svc = layer.layer(scripted(&log, |_| Act::Hang));

    let started = Instant::now();
    let res = svc.oneshot(grpc_call()).await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers().get("grpc-status").and_then(Code::from_header),
        Some(Code::DeadlineExceeded)
    );
    let seen = log.seen();
    assert_eq!(seen.len(), 3);
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(grpc_timeout(s), Duration::from_secs(1), "attempt {i}");
    }
    let previous: Vec<String> = seen.iter().map(previous_attempts).collect();
    assert_eq!(previous, ["", "1", "2"]);
    // Three timeouts and two backoffs (≤ 25 ms, ≤ 50 ms).
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed <= Duration::from_millis(3075),
        "{elapsed:?}"
    );
    Ok(())
}

// Pins: without an attempt timeout, the deadline alone ends a retry that hangs (one timer,
// at the deadline).
#[tokio::test(start_paused = true)]
async fn without_attempt_timeout_the_deadline_ends_a_hung_retry() -> Result<(), BoxError> {
    let layer = Upstream::builder()
        .map_faults(detailed())
        .deadline(Duration::from_secs(2))
        .no_attempt_timeout()
        .build()?;
    let log = Log::default();
    let svc = layer.layer(scripted(&log, |n| match n {
        0 => Act::Status(503),
        _ => Act::Hang,
    }));

    let started = Instant::now();
    let res = svc.oneshot(get("/")).await?;
    assert_answer(&res, StatusCode::GATEWAY_TIMEOUT, DEADLINE_FAULT);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(log.count(), 2);
    Ok(())
}

// Pins: without a deadline, a hung upstream gets max_attempts attempts, each ended by the
// attempt timeout; the answer is the last attempt's timeout.
#[tokio::test(start_paused = true)]
async fn without_deadline_every_attempt_ends_at_the_attempt_timeout() -> Result<(), BoxError> {
    let layer = Upstream::builder()
        .map_faults(detailed())
        .no_deadline()
        .attempt_timeout(Duration::from_secs(1))
        .build()?;
    let handle = layer.breaker_handle().unwrap();
    let log = Log::default();
    let svc = layer.layer(scripted(&log, |_| Act::Hang));

    let started = Instant::now();
    let res = svc.oneshot(get("/")).await?;
    assert_answer(&res, StatusCode::GATEWAY_TIMEOUT, ATTEMPT_TIMEOUT_FAULT);
    // A fault answer carries no `Attempts` (documented): it reads as one.
    assert_eq!(Attempts::of(&res), 1);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed <= Duration::from_millis(3075),
        "{elapsed:?}"
    );
    let seen = log.seen();
    assert_eq!(seen.len(), 3);
    for pair in seen.windows(2) {
        assert!(pair[1].at - pair[0].at >= Duration::from_secs(1));
    }
    assert_eq!(breaker_counts(&handle), (State::Closed, 3, 3));
    Ok(())
}

type Chunks =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A streaming body of these chunks (not `is_end_stream` up front, no known length).
fn chunks(parts: &[&'static str]) -> Chunks {
    let frames: Vec<_> = parts
        .iter()
        .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
        .collect();
    StreamBody::new(futures_util::stream::iter(frames))
}

// Pins: a POST whose streamed body was read is not retried after an attempt timeout; a GET
// whose streamed body was read is replayed byte for byte.
#[tokio::test(start_paused = true)]
async fn post_is_not_retried_and_a_read_get_body_is_replayed() -> Result<(), BoxError> {
    let layer = Upstream::builder()
        .attempt_timeout(Duration::from_secs(1))
        .build()?;
    let log = Log::default();
    let svc = layer.layer(scripted(&log, |n| match n {
        0 => Act::Hang,
        1 => Act::Status(503),
        _ => Act::Status(200),
    }));

    let post = Request::post(format!("http://{KEY}/orders"))
        .body(chunks(&["{\"id\":", "7", "}"]))
        .unwrap();
    let res = svc.clone().oneshot(post).await?;
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(log.count(), 1, "not retried");
    assert_eq!(log.seen()[0].body, "{\"id\":7}");

    let get = Request::get(format!("http://{KEY}/search"))
        .body(chunks(&["query ", "in ", "three parts"]))
        .unwrap();
    let res = svc.oneshot(get).await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(Attempts::of(&res), 2);
    let seen = log.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1].body, "query in three parts");
    assert_eq!(seen[2].body, seen[1].body);
    Ok(())
}

// Pins: with a limit of 1, the one permit is held through a request's retries (another
// request meanwhile is shed) and is free again once it is answered.
#[tokio::test(start_paused = true)]
async fn the_permit_is_held_across_retries_then_freed() -> Result<(), BoxError> {
    let layer = Upstream::builder().concurrency_limit(1).build()?;
    let log = Log::default();
    let svc = layer.layer(scripted(&log, |n| match n {
        0 => Act::Status(503),
        1 => Act::After(Duration::from_secs(1), 200),
        _ => Act::Status(200),
    }));

    let first = tokio::spawn(svc.clone().oneshot(get("/first")));
    // Attempt 1 failed, attempt 2 (after ≤ 25 ms of backoff) is in flight.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(log.count(), 2);
    let res = svc.clone().oneshot(get("/second")).await?;
    assert_answer(
        &res,
        StatusCode::SERVICE_UNAVAILABLE,
        "tower-upstream; error=connection_limit_reached",
    );
    assert_eq!(log.count(), 2, "shed without a call");

    let res = first.await??;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(Attempts::of(&res), 2);
    let res = svc.oneshot(get("/third")).await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(log.count(), 3);
    Ok(())
}

// Pins: dropping a request's future mid-attempt frees its concurrency permit, counts
// nothing in the breaker, and gives a half-open probe slot back.
#[tokio::test(start_paused = true)]
async fn a_dropped_request_frees_its_permit_and_its_probe() -> Result<(), BoxError> {
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_duration(Duration::from_secs(1))
        .jitter(0.0)
        .build()?;
    let layer = Upstream::builder()
        .concurrency_limit(1)
        .no_retry()
        .breaker(breaker)
        .build()?;
    let handle = layer.breaker_handle().unwrap();
    let log = Log::default();
    let svc = layer.layer(scripted(&log, |n| match n {
        0 => Act::Status(503),
        1 => Act::Hang,
        _ => Act::Status(200),
    }));

    let res = svc.clone().oneshot(get("/")).await?;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(breaker_counts(&handle), (State::Open, 1, 1));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The probe hangs; its caller gives up.
    let gave_up = tokio::time::timeout(Duration::from_millis(100), svc.clone().oneshot(get("/")))
        .await
        .is_err();
    assert!(gave_up);
    assert_eq!(log.count(), 2, "the probe reached the upstream");
    let snap = handle.snapshot(KEY).unwrap();
    assert_eq!(counts(&snap), (State::HalfOpen, 1, 1));
    assert_eq!(snap.probes_in_flight(), 0);

    // Neither the permit nor the probe slot is held: the next request probes and closes.
    let res = svc.oneshot(get("/")).await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(handle.snapshot(KEY).unwrap().state(), State::Closed);
    Ok(())
}

// Pins: an inner service that panics in `call` itself (before it returns its future), the
// panic caught above the stack as tower-http's `CatchPanic` does, does not keep the place
// under the limit: with a limit of 1, the next request is let through, retried or not.
#[tokio::test(start_paused = true)]
async fn a_panic_in_the_inner_call_frees_the_permit() -> Result<(), BoxError> {
    for retrying in [true, false] {
        let builder = Upstream::builder().concurrency_limit(1);
        let builder = if retrying {
            builder
        } else {
            builder.no_retry()
        };
        let layer = builder.build()?;
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = {
            let calls = calls.clone();
            service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
                assert_ne!(calls.fetch_add(1, SeqCst), 0, "the first call panics");
                async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
            })
        };
        let mut svc = layer.layer(inner);
        svc.ready().await?;
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(svc.call(get("/panics")));
        }));
        assert!(caught.is_err(), "retrying {retrying}");
        let res = svc.ready().await?.call(get("/next")).await?;
        assert_eq!(res.status(), StatusCode::OK, "retrying {retrying}");
        assert_eq!(calls.load(SeqCst), 2, "retrying {retrying}");
    }
    Ok(())
}

// Pins: composed by hand, an attempt whose deadline is spent before the `AttemptTimeout`
// below the breaker could send it is not a breaker sample: nothing reached the upstream.
#[tokio::test(start_paused = true)]
async fn composed_by_hand_a_spent_deadline_is_not_counted() -> Result<(), BoxError> {
    let log = Log::default();
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .build()?;
    let handle = breaker.handle();
    let svc = tower::ServiceBuilder::new()
        .layer(RetryLayer::new())
        .layer(breaker)
        .layer(tower_upstream::AttemptTimeoutLayer::new(
            Duration::from_secs(5),
        ))
        .service(scripted(&log, |_| Act::Status(200)));
    for _ in 0..3 {
        let mut req = get("/");
        req.extensions_mut()
            .insert(tower_upstream::RequestDeadline::at(Instant::now()));
        let err = svc.clone().oneshot(req).await.unwrap_err();
        let exceeded = err
            .downcast_ref::<tower_upstream::deadline::DeadlineExceeded>()
            .expect("the deadline's error");
        assert!(exceeded.is_before_start());
    }
    assert_eq!(log.count(), 0, "nothing was sent");
    assert_eq!(breaker_counts(&handle), (State::Closed, 0, 0));
    let res = svc.oneshot(get("/")).await?;
    assert_eq!(res.status(), StatusCode::OK);
    Ok(())
}

// Pins: a call that `poll_ready` did not precede holds no place under the limit, so it is
// shed (503 `connection_limit_reached`, the service below not called), as tower's
// `LoadShed` sheds it: it is never let past the limit. A later `poll_ready` takes a place.
#[tokio::test(start_paused = true)]
async fn a_call_without_poll_ready_is_shed_not_let_past_the_limit() -> Result<(), BoxError> {
    let layer = Upstream::builder().concurrency_limit(1).build()?;
    let log = Log::default();
    let mut svc = layer.layer(scripted(&log, |_| Act::After(Duration::from_secs(1), 200)));
    svc.ready().await?;
    let first = tokio::spawn(svc.call(get("/first")));
    let res = svc.call(get("/second")).await?;
    assert_answer(
        &res,
        StatusCode::SERVICE_UNAVAILABLE,
        "tower-upstream; error=connection_limit_reached",
    );
    assert_eq!(first.await??.status(), StatusCode::OK);
    assert_eq!(log.count(), 1, "the second call never reached the service");
    let res = svc.ready().await?.call(get("/third")).await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(log.count(), 2);

    // Without a limit there is no place to hold: the call goes through.
    let log = Log::default();
    let mut svc = Upstream::builder()
        .build()?
        .layer(scripted(&log, |_| Act::Status(200)));
    svc.ready().await?;
    svc.call(get("/one")).await?;
    assert_eq!(svc.call(get("/two")).await?.status(), StatusCode::OK);
    assert_eq!(log.count(), 2);
    Ok(())
}

// Pins: a user's `DeadlineLayer` around the stack, shorter than the stack's own deadline,
// ends the request at its time with the stack's 504 (the stack honours the extension).
#[tokio::test(start_paused = true)]
async fn an_outer_deadline_layer_ends_the_request_with_504() -> Result<(), BoxError> {
    let stack = Upstream::builder().map_faults(detailed()).build()?;
    let handle = stack.breaker_handle().unwrap();
    let log = Log::default();
    let svc = DeadlineLayer::new(Duration::from_millis(200))
        .layer(stack.layer(scripted(&log, |_| Act::Hang)));

    let started = Instant::now();
    let res = svc.oneshot(get("/")).await?;
    assert_answer(&res, StatusCode::GATEWAY_TIMEOUT, DEADLINE_FAULT);
    assert_eq!(started.elapsed(), Duration::from_millis(200));
    assert_eq!(log.count(), 1);
    // As with the stack's own deadline, the cut attempt is a breaker failure.
    assert_eq!(breaker_counts(&handle), (State::Closed, 1, 1));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Real sockets on 127.0.0.1, through hyper-util's legacy client
// ---------------------------------------------------------------------------------------

type RealClient = Client<HttpConnector<support::LocalResolver>, ReplayBody<Full<Bytes>>>;

fn real_client() -> RealClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new_with_resolver(local_resolver()))
}

/// An upstream whose connection number `n` (0-based) is handed to `behave(n, stream)`;
/// returns its address and the count of accepted connections.
async fn counting<F, Fut>(behave: F) -> (std::net::SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(usize, tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let addr = raw_upstream(move |s| behave(counter.fetch_add(1, SeqCst), s)).await;
    (addr, accepted)
}

// Pins: a GET whose first connection is reset is retried on a new one and answered 200.
#[tokio::test]
async fn real_reset_then_answer_is_retried() -> Result<(), BoxError> {
    let (upstream, accepted) = counting(|n, mut s| async move {
        read_head(&mut s).await;
        if n == 0 {
            #[allow(deprecated)] // linger 0 is exactly what sends a RST
            s.set_linger(Some(Duration::ZERO)).unwrap();
            return;
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            .await;
        let _ = s.shutdown().await;
    })
    .await;
    let layer = Upstream::builder().build()?;
    let handle = layer.breaker_handle().unwrap();
    let svc = layer.layer(real_client());

    let req = Request::get(format!("http://{upstream}/")).body(Full::default())?;
    let res = tokio::time::timeout(REAL_TIMEOUT, svc.oneshot(req)).await??;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(Attempts::of(&res), 2);
    assert_eq!(res.into_body().collect().await?.to_bytes(), "ok");
    assert_eq!(accepted.load(SeqCst), 2);
    let snap = handle.snapshot(&upstream.to_string()).unwrap();
    assert_eq!(counts(&snap), (State::Closed, 2, 1));
    Ok(())
}

// Pins: an upstream that accepts but never answers gets three attempts, each ended by the
// 100 ms attempt timeout, well within the 1 s deadline; answered 504.
#[tokio::test]
async fn real_silent_upstream_gets_three_timed_out_attempts() -> Result<(), BoxError> {
    let (upstream, accepted) = counting(|_, mut s| async move {
        read_head(&mut s).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    })
    .await;
    let layer = Upstream::builder()
        .map_faults(detailed())
        .deadline(Duration::from_secs(1))
        .attempt_timeout(Duration::from_millis(100))
        .build()?;
    let svc = layer.layer(real_client());

    let started = Instant::now();
    let req = Request::get(format!("http://{upstream}/")).body(Full::default())?;
    let res = tokio::time::timeout(REAL_TIMEOUT, svc.oneshot(req)).await??;
    let elapsed = started.elapsed();
    assert_answer(&res, StatusCode::GATEWAY_TIMEOUT, ATTEMPT_TIMEOUT_FAULT);
    assert_eq!(accepted.load(SeqCst), 3);
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(1),
        "{elapsed:?}"
    );
    Ok(())
}

/// A gRPC call with `grpc-timeout: 100m` through `svc` (whose upstream hangs) is answered
/// DEADLINE_EXCEEDED at 100 ms sharp.
async fn a_call_with_100ms_ends_at_100ms<S, B>(svc: S) -> Result<(), BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    let mut call = grpc_call();
    call.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("100m"));
    let started = Instant::now();
    let res = svc.oneshot(call).await.map_err(Into::into)?;
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    assert_eq!(
        res.headers().get("grpc-status").and_then(Code::from_header),
        Some(Code::DeadlineExceeded)
    );
    Ok(())
}

// Pins: an attempt cut short by a deadline the caller set (an incoming `grpc-timeout`, or
// the configured deadline header, earlier than the stack's own timeout) is not counted by
// the breaker: callers with short deadlines cannot open the circuit of a healthy upstream
// for everybody. The caller still gets its DEADLINE_EXCEEDED / 504.
#[tokio::test(start_paused = true)]
async fn a_deadline_the_caller_set_is_not_counted_by_the_breaker() -> Result<(), BoxError> {
    let breaker = || {
        CircuitBreakerLayer::builder()
            .consecutive_failures(2)
            .build()
            .unwrap()
    };
    let log = Log::default();

    // gRPC: `grpc-timeout: 100m` against the default 30 s deadline and 5 s attempts.
    let layer = Upstream::builder()
        .breaker(breaker())
        .attempt_timeout(Duration::from_secs(5))
        .build()?;
    let handle = layer.breaker_handle().unwrap();
    let svc = layer.layer(scripted(&log, |_| Act::Hang));
    for _ in 0..3 {
        a_call_with_100ms_ends_at_100ms(svc.clone()).await?;
    }
    assert_eq!(log.count(), 3, "every call reached the upstream");
    assert_eq!(breaker_counts(&handle), (State::Closed, 0, 0));

    // A longer `grpc-timeout` leaves the stack's own deadline (1 s) in charge: counted.
    let layer = Upstream::builder()
        .breaker(breaker())
        .deadline(Duration::from_secs(1))
        .attempt_timeout(Duration::from_secs(5))
        .build()?;
    let handle = layer.breaker_handle().unwrap();
    let svc = layer.layer(scripted(&log, |_| Act::Hang));
    let mut call = grpc_call();
    call.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("10S"));
    let res = svc.oneshot(call).await?;
    assert_eq!(
        res.headers().get("grpc-status").and_then(Code::from_header),
        Some(Code::DeadlineExceeded)
    );
    assert_eq!(breaker_counts(&handle), (State::Closed, 1, 1));

    // HTTP, with a configured deadline header: the same.
    let deadline = DeadlineLayer::builder()
        .timeout(Duration::from_secs(30))
        .header(
            "request-timeout",
            tower_upstream::deadline::HeaderUnit::Seconds,
        )
        .build()?;
    let layer = Upstream::builder()
        .map_faults(detailed())
        .breaker(breaker())
        .deadline_layer(deadline)
        .attempt_timeout(Duration::from_secs(5))
        .build()?;
    let handle = layer.breaker_handle().unwrap();
    let svc = layer.layer(scripted(&log, |_| Act::Hang));
    for _ in 0..3 {
        let mut req = get("/");
        req.headers_mut()
            .insert("request-timeout", http::HeaderValue::from_static("1"));
        let res = svc.clone().oneshot(req).await?;
        assert_answer(&res, StatusCode::GATEWAY_TIMEOUT, DEADLINE_FAULT);
    }
    assert_eq!(breaker_counts(&handle), (State::Closed, 0, 0));
    Ok(())
}

// Only the answer to a gRPC call is a gRPC answer: a `grpc-status` on the answer to a plain
// HTTP request is neither a breaker failure nor a reason to retry.
#[tokio::test(start_paused = true)]
async fn a_grpc_status_counts_only_in_the_answer_to_a_grpc_call() -> Result<(), BoxError> {
    let layer = Upstream::builder().build()?;
    let handle = layer.breaker_handle().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let svc = layer.layer(service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
        seen.fetch_add(1, SeqCst);
        async {
            let mut rsp = Response::new(Full::<Bytes>::default());
            rsp.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            rsp.headers_mut()
                .insert("grpc-status", "14".parse().unwrap());
            Ok::<_, Infallible>(rsp)
        }
    }));

    let res = svc.clone().oneshot(get("/")).await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(Attempts::of(&res), 1);
    assert_eq!(calls.load(SeqCst), 1, "not retried");
    assert_eq!(breaker_counts(&handle), (State::Closed, 1, 0), "a success");

    let res = svc.oneshot(grpc_call()).await?;
    assert_eq!(header(&res, "grpc-status"), "14");
    assert_eq!(
        Attempts::of(&res),
        3,
        "an idempotent UNAVAILABLE call is retried"
    );
    assert_eq!(calls.load(SeqCst), 4);
    assert_eq!(
        breaker_counts(&handle),
        (State::Closed, 4, 3),
        "three failures"
    );
    Ok(())
}

// The same stack composed by hand, in the design's order (MapFaults, Deadline, Retry,
// CircuitBreaker, AttemptTimeout): the attempt timeout below the breaker ends the attempt
// at the caller's deadline and says so, and the breaker does not count it. The deadline
// layer's own timeout still counts.
#[tokio::test(start_paused = true)]
async fn composed_by_hand_a_deadline_the_caller_set_is_not_counted_either() -> Result<(), BoxError>
{
    let log = Log::default();
    let stack = |deadline: Duration| -> Result<_, BoxError> {
        let breaker = CircuitBreakerLayer::builder()
            .consecutive_failures(2)
            .build()?;
        let handle = breaker.handle();
        let svc = tower::ServiceBuilder::new()
            .layer(detailed())
            .layer(
                DeadlineLayer::builder()
                    .timeout(deadline)
                    .header(
                        "request-timeout",
                        tower_upstream::deadline::HeaderUnit::Seconds,
                    )
                    .build()?,
            )
            .layer(RetryLayer::new())
            .layer(breaker)
            .layer(tower_upstream::AttemptTimeoutLayer::new(
                Duration::from_secs(5),
            ))
            .service(scripted(&log, |_| Act::Hang));
        Ok((svc, handle))
    };

    // gRPC, `grpc-timeout: 100m`; HTTP, `request-timeout: 1`: the caller's, not counted.
    let (svc, handle) = stack(Duration::from_secs(30))?;
    for _ in 0..3 {
        a_call_with_100ms_ends_at_100ms(svc.clone()).await?;

        let mut req = get("/");
        req.headers_mut()
            .insert("request-timeout", http::HeaderValue::from_static("1"));
        let res = svc.clone().oneshot(req).await?;
        assert_answer(&res, StatusCode::GATEWAY_TIMEOUT, DEADLINE_FAULT);
    }
    assert_eq!(log.count(), 6, "every call reached the upstream");
    assert_eq!(breaker_counts(&handle), (State::Closed, 0, 0));

    // The layer's own deadline (1 s, shorter than the attempts' 5 s): counted, and two in
    // a row open the circuit.
    let (svc, handle) = stack(Duration::from_secs(1))?;
    for _ in 0..2 {
        let res = svc.clone().oneshot(get("/")).await?;
        assert_answer(&res, StatusCode::GATEWAY_TIMEOUT, DEADLINE_FAULT);
    }
    assert_eq!(breaker_counts(&handle).0, State::Open);
    Ok(())
}

// A deadline the caller set, on a stack without a deadline of its own (`no_deadline`, a
// user's `DeadlineLayer` with a header around it): the attempt it cuts short is not counted
// by the breaker either, as with the stack's own deadline layer or composed by hand.
#[tokio::test(start_paused = true)]
async fn without_its_deadline_the_stack_still_does_not_count_the_callers() -> Result<(), BoxError> {
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(2)
        .build()?;
    let stack = Upstream::builder()
        .map_faults(detailed())
        .breaker(breaker)
        .no_deadline()
        .attempt_timeout(Duration::from_secs(5))
        .build()?;
    let handle = stack.breaker_handle().unwrap();
    let log = Log::default();
    let outer = DeadlineLayer::builder()
        .timeout(Duration::from_secs(30))
        .header(
            "request-timeout",
            tower_upstream::deadline::HeaderUnit::Seconds,
        )
        .build()?;
    let svc = outer.layer(stack.layer(scripted(&log, |_| Act::Hang)));
    for _ in 0..3 {
        let mut req = get("/");
        req.headers_mut()
            .insert("request-timeout", http::HeaderValue::from_static("1"));
        let started = Instant::now();
        let res = svc.clone().oneshot(req).await?;
        assert_answer(&res, StatusCode::GATEWAY_TIMEOUT, DEADLINE_FAULT);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }
    assert_eq!(log.count(), 3, "every call reached the upstream");
    assert_eq!(breaker_counts(&handle), (State::Closed, 0, 0));
    Ok(())
}

// A retry whose service gets ready only as the deadline passes is not sent (the deadline is
// spent before it starts), and the breaker does not count what never reached the upstream:
// only the first attempt's 503 is a sample.
#[tokio::test(start_paused = true)]
async fn a_retry_spent_before_it_starts_is_not_a_breaker_sample() -> Result<(), BoxError> {
    let layer = Upstream::builder()
        .deadline(Duration::from_secs(1))
        .build()?;
    let handle = layer.breaker_handle().unwrap();
    let (inner, calls) = FirstReadyOnly::then(Then::At(Instant::now() + Duration::from_secs(1)));
    let svc = layer.layer(inner);

    let started = Instant::now();
    let res = svc.oneshot(get("/")).await?;
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(calls.load(SeqCst), 1, "the retry was not sent");
    assert_eq!(breaker_counts(&handle), (State::Closed, 1, 1));
    Ok(())
}
