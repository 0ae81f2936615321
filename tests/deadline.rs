//! The deadline layer: alone, with mocks, and in front of a real client and upstream.

#[path = "support/upstreams.rs"]
mod support;

use std::future::pending;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response};
use tokio::time::Instant;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_upstream::deadline::{future::ResponseFuture, DeadlineExceeded, HeaderUnit};
use tower_upstream::fault::{classify, Fault, Sent};
use tower_upstream::timeout::AttemptTimeoutLayer;
use tower_upstream::{AttemptTimeout, Deadline, DeadlineLayer, RequestDeadline};

#[allow(dead_code)]
fn assert_types() {
    type Inner = tower::util::BoxCloneSyncService<Request<()>, Response<()>, BoxError>;
    support::assert_send_sync::<Deadline<Inner>>();
    support::assert_send_sync::<DeadlineLayer>();
    support::assert_send_sync::<ResponseFuture<std::future::Ready<Result<(), BoxError>>>>();
    support::assert_send_sync::<Deadline<AttemptTimeout<Inner>>>();
}

/// One call as the inner service saw it: its deadline's remaining time and its headers.
type Call = (Option<Duration>, HeaderMap);

/// What the inner service saw.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Call>>>);

impl Seen {
    /// An inner service that records what it sees and then waits for `wait`.
    fn service(
        &self,
        wait: Duration,
    ) -> impl Service<Request<()>, Response = Response<()>, Error = BoxError, Future: Send> + Clone
    {
        let seen = self.clone();
        service_fn(move |req: Request<()>| {
            let remaining = RequestDeadline::of(&req).map(|d| d.remaining());
            seen.0
                .lock()
                .unwrap()
                .push((remaining, req.headers().clone()));
            async move {
                tokio::time::sleep(wait).await;
                Ok::<_, BoxError>(Response::new(()))
            }
        })
    }

    fn last(&self) -> Call {
        self.0.lock().unwrap().last().cloned().expect("not called")
    }

    fn calls(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

fn grpc_request(timeout: Option<&'static [u8]>) -> Request<()> {
    let mut req = Request::builder()
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    if let Some(t) = timeout {
        req.headers_mut()
            .insert("grpc-timeout", HeaderValue::from_bytes(t).unwrap());
    }
    req
}

#[tokio::test(start_paused = true)]
async fn expires_at_the_configured_time() {
    let seen = Seen::default();
    let svc = Deadline::new(
        seen.service(Duration::from_secs(60)),
        Duration::from_secs(2),
    );
    let start = Instant::now();
    let err = svc.oneshot(Request::new(())).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(
        err.downcast_ref::<DeadlineExceeded>(),
        Some(&DeadlineExceeded::in_flight())
    );
    let c = classify(&*err);
    assert_eq!(
        (c.fault(), c.sent()),
        (Fault::HttpResponseTimeout, Sent::MaybeProcessed)
    );
    // The inner service saw the deadline; a non-gRPC request gets no grpc-timeout.
    let (remaining, headers) = seen.last();
    assert_eq!(remaining, Some(Duration::from_secs(2)));
    assert!(headers.get("grpc-timeout").is_none());
}

#[tokio::test(start_paused = true)]
async fn answers_in_time_pass_through() {
    let seen = Seen::default();
    let svc = Deadline::new(seen.service(Duration::from_secs(1)), Duration::from_secs(2));
    svc.oneshot(Request::new(())).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn inner_errors_pass_through_unchanged() {
    #[derive(Debug)]
    struct Boom;
    impl std::fmt::Display for Boom {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("boom")
        }
    }
    impl std::error::Error for Boom {}
    let svc = Deadline::new(
        service_fn(|_: Request<()>| async { Err::<Response<()>, _>(Boom) }),
        Duration::from_secs(1),
    );
    let err = svc.oneshot(Request::new(())).await.unwrap_err();
    assert!(err.is::<Boom>());
}

#[tokio::test(start_paused = true)]
async fn spent_on_arrival_fails_without_calling_inner() {
    let seen = Seen::default();
    let mut svc = Deadline::new(seen.service(Duration::ZERO), Duration::from_secs(5));
    for req in [grpc_request(Some(b"0n")), {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(RequestDeadline::at(Instant::now()));
        req
    }] {
        let start = Instant::now();
        let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(
            err.downcast_ref::<DeadlineExceeded>(),
            Some(&DeadlineExceeded::before_start())
        );
        let c = classify(&*err);
        assert_eq!(
            (c.fault(), c.sent()),
            (Fault::HttpResponseTimeout, Sent::NotSent)
        );
    }
    assert_eq!(seen.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn grpc_timeout_caps_the_deadline_and_is_propagated() {
    let seen = Seen::default();
    let mut svc = Deadline::new(seen.service(Duration::ZERO), Duration::from_secs(5));

    // A tighter grpc-timeout wins, and the upstream is told what remains.
    let req = grpc_request(Some(b"100m"));
    svc.ready().await.unwrap().call(req).await.unwrap();
    let (remaining, headers) = seen.last();
    assert_eq!(remaining, Some(Duration::from_millis(100)));
    assert_eq!(headers["grpc-timeout"], "100000u");

    // A looser one does not extend the configured deadline.
    let req = grpc_request(Some(b"1M"));
    svc.ready().await.unwrap().call(req).await.unwrap();
    let (remaining, headers) = seen.last();
    assert_eq!(remaining, Some(Duration::from_secs(5)));
    assert_eq!(headers["grpc-timeout"], "5000000u");

    // No grpc-timeout: the configured deadline is propagated.
    svc.ready()
        .await
        .unwrap()
        .call(grpc_request(None))
        .await
        .unwrap();
    assert_eq!(seen.last().1["grpc-timeout"], "5000000u");
}

#[tokio::test(start_paused = true)]
async fn malformed_grpc_timeouts_are_ignored() {
    let seen = Seen::default();
    let mut svc = Deadline::new(seen.service(Duration::ZERO), Duration::from_secs(5));
    let bad: &[&[u8]] = &[
        b"",                  // empty
        b"123456789m",        // 9 digits
        b"100x",              // unknown unit
        b"-100m",             // negative
        b"\xd9\xa1\xd9\xa0m", // non-ASCII digits
        b"100",               // no unit
        b"1.5S",
    ];
    for value in bad {
        svc.ready()
            .await
            .unwrap()
            .call(grpc_request(Some(value)))
            .await
            .unwrap();
        let (remaining, headers) = seen.last();
        let shown = String::from_utf8_lossy(value);
        assert_eq!(remaining, Some(Duration::from_secs(5)), "{shown}");
        assert_eq!(headers["grpc-timeout"], "5000000u", "{shown}");
    }
}

#[tokio::test(start_paused = true)]
async fn huge_grpc_timeouts_are_capped() {
    // Header-only configuration: the caller's 11 000 years become 100.
    let seen = Seen::default();
    let layer = DeadlineLayer::builder().build().unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(seen.service(Duration::ZERO));
    svc.oneshot(grpc_request(Some(b"99999999H"))).await.unwrap();
    let (remaining, headers) = seen.last();
    let century = Duration::from_secs(100 * 365 * 24 * 3600);
    assert_eq!(remaining, Some(century));
    assert_eq!(headers["grpc-timeout"], "52560000M");
}

#[tokio::test(start_paused = true)]
async fn an_earlier_deadline_is_kept_a_later_one_is_tightened() {
    let seen = Seen::default();
    let mut svc = Deadline::new(seen.service(Duration::ZERO), Duration::from_secs(5));
    for (earlier, want) in [(1, 1), (10, 5)] {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(RequestDeadline::after(Duration::from_secs(earlier)));
        svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(seen.last().0, Some(Duration::from_secs(want)));
    }
}

#[tokio::test(start_paused = true)]
async fn configured_header_caps_and_is_propagated() {
    let seen = Seen::default();
    let layer = DeadlineLayer::builder()
        .timeout(Duration::from_secs(30))
        .header("request-timeout", HeaderUnit::Seconds)
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(seen.service(Duration::ZERO));
    for (value, want) in [("2", 2), ("60", 30), ("2.5", 30), ("-1", 30), ("", 30)] {
        let req = Request::builder()
            .header("request-timeout", value)
            .body(())
            .unwrap();
        svc.ready().await.unwrap().call(req).await.unwrap();
        let (remaining, headers) = seen.last();
        assert_eq!(remaining, Some(Duration::from_secs(want)), "{value:?}");
        assert_eq!(headers["request-timeout"], want.to_string().as_str());
    }

    // Milliseconds; the propagated value is rounded up.
    let layer = DeadlineLayer::builder()
        .header("x-timeout-ms", HeaderUnit::Milliseconds)
        .build()
        .unwrap();
    let mut svc =
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(|req: Request<()>| async move {
                Ok::<_, BoxError>(req.headers()["x-timeout-ms"].clone())
            }));
    let mut req = Request::new(());
    req.extensions_mut()
        .insert(RequestDeadline::after(Duration::from_micros(1500)));
    req.headers_mut()
        .insert("x-timeout-ms", HeaderValue::from_static("250"));
    let sent = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(sent, "2");
}

#[tokio::test(start_paused = true)]
async fn without_a_deadline_requests_pass_untouched() {
    // Header-only configuration, request without the header.
    let layer = DeadlineLayer::builder().build().unwrap();
    let seen = Seen::default();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(seen.service(Duration::from_secs(3600)));
    let res =
        tokio::time::timeout(Duration::from_secs(3599), svc.oneshot(grpc_request(None))).await;
    assert!(res.is_err(), "no deadline applies");
    let (remaining, headers) = seen.last();
    assert_eq!(remaining, None);
    assert!(headers.get("grpc-timeout").is_none());
}

#[tokio::test(start_paused = true)]
async fn propagation_can_be_turned_off() {
    let seen = Seen::default();
    let layer = DeadlineLayer::builder()
        .timeout(Duration::from_secs(1))
        .propagate(false)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(seen.service(Duration::ZERO));
    svc.oneshot(grpc_request(None)).await.unwrap();
    assert!(seen.last().1.get("grpc-timeout").is_none());
}

/// The deadline arms no timer of its own while an attempt timeout below covers it.
#[tokio::test(start_paused = true)]
async fn one_timer_for_the_pair() {
    let hang = || service_fn(|_: Request<()>| pending::<Result<Response<()>, BoxError>>());

    // Alone: the deadline arms its own timer once the inner future is pending.
    let mut alone = Deadline::new(hang(), Duration::from_secs(1));
    let mut fut = tokio_test::task::spawn(alone.call(Request::new(())));
    assert!(format!("{fut:?}").contains("own_timer: false"));
    assert!(fut.poll().is_pending());
    assert!(format!("{fut:?}").contains("own_timer: true"));

    // Over an attempt timeout (whichever is shorter): no timer of its own.
    for attempt in [500, 5_000] {
        let mut pair = ServiceBuilder::new()
            .layer(DeadlineLayer::new(Duration::from_secs(1)))
            .layer(AttemptTimeoutLayer::new(Duration::from_millis(attempt)))
            .service(hang());
        let mut fut = tokio_test::task::spawn(pair.call(Request::new(())));
        assert!(fut.poll().is_pending());
        assert!(format!("{fut:?}").contains("own_timer: false"), "{fut:?}");
        let start = Instant::now();
        let err = fut.await.unwrap_err();
        if attempt < 1000 {
            assert!(err.is::<tower_upstream::timeout::error::Elapsed>());
            assert_eq!(start.elapsed(), Duration::from_millis(attempt));
        } else {
            // The attempt timeout enforced the deadline and said so.
            assert!(err.is::<DeadlineExceeded>());
            assert_eq!(start.elapsed(), Duration::from_secs(1));
        }
    }
}

/// Between attempts (here: an inner future that sleeps without any attempt timeout) the
/// deadline arms its own timer again.
#[tokio::test(start_paused = true)]
async fn arms_its_own_timer_when_no_longer_covered() {
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = {
        let calls = calls.clone();
        service_fn(move |req: Request<()>| {
            let calls = calls.clone();
            async move {
                // First attempt: times out after 100 ms; then a long "back-off".
                let mut attempt = AttemptTimeout::new(
                    service_fn(|_: Request<()>| pending::<Result<Response<()>, BoxError>>()),
                    Duration::from_millis(100),
                );
                let err = attempt.call(req).await.unwrap_err();
                calls.fetch_add(1, Ordering::SeqCst);
                assert!(err.is::<tower_upstream::timeout::error::Elapsed>());
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok::<_, BoxError>(Response::new(()))
            }
        })
    };
    let start = Instant::now();
    let err = Deadline::new(inner, Duration::from_secs(1))
        .oneshot(Request::new(()))
        .await
        .unwrap_err();
    assert!(err.is::<DeadlineExceeded>());
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

// Real sockets: a hyper-util client and a hyper upstream on 127.0.0.1.

#[tokio::test(start_paused = true)]
async fn hanging_upstream_fails_at_the_deadline() {
    let (addr, seen) = support::hanging_upstream().await;
    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_millis(300)))
        .layer(AttemptTimeoutLayer::new(Duration::from_secs(10)))
        .service(support::client());
    let hold = support::hold_clock_until_seen(seen);
    let start = Instant::now();
    let err = svc
        .oneshot(support::request(addr).body(Default::default()).unwrap())
        .await
        .unwrap_err();
    let elapsed = start.elapsed();
    hold.await.unwrap();
    assert!(err.is::<DeadlineExceeded>(), "{err:?}");
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed <= Duration::from_millis(303),
        "{elapsed:?}"
    );
    assert_eq!(classify(&*err).fault(), Fault::HttpResponseTimeout);
}

/// A gRPC-style request through `Deadline(deadline)` → 10 ms of gateway work →
/// `AttemptTimeout(10 s)` → a hyper-util client → a hanging hyper upstream. Returns the error,
/// the virtual time it took, and the headers the upstream saw.
async fn through_gateway(
    grpc_timeout: &'static str,
    deadline: Duration,
) -> (BoxError, Duration, HeaderMap) {
    let (addr, seen) = support::hanging_upstream().await;
    let seen = Arc::new(Mutex::new(Some(seen)));
    let hold = Arc::new(Mutex::new(None));
    let attempt = AttemptTimeout::new(support::client(), Duration::from_secs(10));
    let gateway_work = {
        let hold = hold.clone();
        service_fn(move |req| {
            let mut attempt = attempt.clone();
            let hold = hold.clone();
            let seen = seen.lock().unwrap().take().unwrap();
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                *hold.lock().unwrap() = Some(support::hold_clock_until_seen(seen));
                attempt.ready().await?.call(req).await
            }
        })
    };
    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(deadline))
        .service(gateway_work);
    let req = support::request(addr)
        .header("content-type", "application/grpc")
        .header("grpc-timeout", grpc_timeout)
        .body(Default::default())
        .unwrap();
    let start = Instant::now();
    let err = svc.oneshot(req).await.unwrap_err();
    let elapsed = start.elapsed();
    let hold = hold.lock().unwrap().take().expect("no attempt was made");
    (err, elapsed, hold.await.unwrap())
}

#[tokio::test(start_paused = true)]
async fn grpc_caller_timeout_is_honoured_and_shrinks_upstream() {
    let (err, elapsed, upstream) = through_gateway("100m", Duration::from_secs(5)).await;
    assert!(err.is::<DeadlineExceeded>(), "{err:?}");
    assert_eq!(classify(&*err).fault(), Fault::HttpResponseTimeout);
    assert!(
        elapsed >= Duration::from_millis(100) && elapsed <= Duration::from_millis(103),
        "{elapsed:?}"
    );
    // 10 ms went by before the attempt: the upstream is told 90 ms.
    assert_eq!(upstream["grpc-timeout"], "90000000n");
}

#[tokio::test(start_paused = true)]
async fn malformed_grpc_timeout_is_ignored_over_the_wire() {
    for bad in ["123456789m", "100x", "-100m", ""] {
        let (err, elapsed, upstream) = through_gateway(bad, Duration::from_millis(200)).await;
        assert!(err.is::<DeadlineExceeded>(), "{bad:?}: {err:?}");
        assert!(
            elapsed >= Duration::from_millis(200) && elapsed <= Duration::from_millis(203),
            "{bad:?}: {elapsed:?}"
        );
        assert_eq!(upstream["grpc-timeout"], "190000u", "{bad:?}");
    }
}

/// The deadline says whether the caller set it: marked when a header made it earlier than
/// the layer's own timeout, and the `DeadlineExceeded` of the layer's own timer (nothing
/// below to end the attempt) says so too.
#[tokio::test(start_paused = true)]
async fn a_deadline_the_caller_set_is_marked_as_such() {
    let layer = DeadlineLayer::builder()
        .timeout(Duration::from_secs(30))
        .header("request-timeout", HeaderUnit::Seconds)
        .build()
        .unwrap();
    let svc =
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(|req: Request<()>| async move {
                let from_caller = RequestDeadline::of(&req).unwrap().is_from_caller();
                pending::<()>().await;
                Ok::<_, BoxError>(from_caller)
            }));
    for (value, from_caller) in [(Some("2"), true), (Some("60"), false), (None, false)] {
        let mut req = Request::new(());
        if let Some(v) = value {
            req.headers_mut()
                .insert("request-timeout", HeaderValue::from_static(v));
        }
        let err = svc.clone().oneshot(req).await.unwrap_err();
        let exceeded = err.downcast_ref::<DeadlineExceeded>().unwrap();
        assert_eq!(exceeded.is_from_caller(), from_caller, "{value:?}");
        assert!(!exceeded.is_before_start());
        // Either way a 504.
        assert_eq!(classify(&*err).fault(), Fault::HttpResponseTimeout);
    }

    // An earlier deadline already on the request keeps its own mark.
    let mut req = Request::new(());
    req.extensions_mut()
        .insert(RequestDeadline::after(Duration::from_secs(1)).from_caller(true));
    let err = svc.clone().oneshot(req).await.unwrap_err();
    assert!(err
        .downcast_ref::<DeadlineExceeded>()
        .unwrap()
        .is_from_caller());

    // An attempt timeout below ends the attempt at the caller's deadline and says so.
    let layer = DeadlineLayer::builder()
        .header("request-timeout", HeaderUnit::Seconds)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(AttemptTimeoutLayer::new(Duration::from_secs(10)))
        .service(service_fn(|_req: Request<()>| async {
            pending::<()>().await;
            Ok::<_, BoxError>(())
        }));
    let req = Request::builder()
        .header("request-timeout", "1")
        .body(())
        .unwrap();
    let started = Instant::now();
    let err = svc.oneshot(req).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert!(err
        .downcast_ref::<DeadlineExceeded>()
        .unwrap()
        .is_from_caller());
}
