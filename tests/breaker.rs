//! Circuit breaker behaviour: tripping, open, half-open, keys, operators, snapshots.

#[path = "support/breaker_upstreams.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_upstream::breaker::error::CircuitOpen;
use tower_upstream::breaker::{CircuitBreaker, CircuitBreakerLayer, State, NO_KEY, OVERFLOW_KEY};
use tower_upstream::fault::{classify, Fault};
use tower_upstream::ConfigError;

use support::{req, send, upstream, Recorder};

const UP: &str = "up.test";

fn open_err(r: Result<http::Response<()>, BoxError>) -> CircuitOpen {
    let e = r.expect_err("expected a refusal");
    *e.downcast_ref::<CircuitOpen>()
        .unwrap_or_else(|| panic!("not CircuitOpen: {e}"))
}

fn cfg() -> tower_upstream::breaker::Builder {
    CircuitBreakerLayer::builder()
        .jitter(0.0)
        .open_duration(Duration::from_secs(5))
}

#[test]
fn defaults_are_valid_and_errors_name_the_field() {
    let _ = CircuitBreakerLayer::new();
    let e: ConfigError = CircuitBreakerLayer::builder()
        .failure_rate(1.5)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "breaker.failure_rate");
    assert_eq!(
        e.to_string(),
        "invalid breaker.failure_rate: must be in (0, 1] (got 1.5)"
    );
    let cases: Vec<(tower_upstream::breaker::Builder, &str)> = vec![
        (
            CircuitBreakerLayer::builder().failure_rate(f64::NAN),
            "breaker.failure_rate",
        ),
        (
            CircuitBreakerLayer::builder().failure_rate(0.0),
            "breaker.failure_rate",
        ),
        (
            CircuitBreakerLayer::builder().count_window(0),
            "breaker.count_window",
        ),
        (
            CircuitBreakerLayer::builder().idle_timeout(Duration::ZERO),
            "breaker.idle_timeout",
        ),
        (
            CircuitBreakerLayer::builder().time_window(Duration::from_millis(5), 10),
            "breaker.time_window",
        ),
        (
            CircuitBreakerLayer::builder().min_calls(0),
            "breaker.min_calls",
        ),
        (
            CircuitBreakerLayer::builder().open_duration(Duration::ZERO),
            "breaker.open_duration",
        ),
        (
            CircuitBreakerLayer::builder().max_open_duration(Duration::from_secs(1)),
            "breaker.max_open_duration",
        ),
        (CircuitBreakerLayer::builder().jitter(1.0), "breaker.jitter"),
        (
            CircuitBreakerLayer::builder().half_open_probes(0),
            "breaker.half_open_probes",
        ),
        (
            CircuitBreakerLayer::builder().probe_successes(256),
            "breaker.probe_successes",
        ),
        (
            CircuitBreakerLayer::builder().failure_statuses([StatusCode::NOT_FOUND]),
            "breaker.failure_statuses",
        ),
        (
            CircuitBreakerLayer::builder().max_keys(0),
            "breaker.max_keys",
        ),
    ];
    for (b, field) in cases {
        assert_eq!(b.build().unwrap_err().field(), field);
    }
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_open_then_a_probe_closes() {
    let hits = Arc::new(AtomicUsize::new(0));
    let rec = Recorder::default();
    let layer = cfg()
        .consecutive_failures(3)
        .on_transition(rec.listener())
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(upstream(hits.clone()));

    for _ in 0..2 {
        assert_eq!(send(&mut svc, req(UP, "503")).await.unwrap().status(), 503);
    }
    // A success resets the run.
    send(&mut svc, req(UP, "200")).await.unwrap();
    for _ in 0..3 {
        assert_eq!(send(&mut svc, req(UP, "502")).await.unwrap().status(), 502);
    }
    assert_eq!(hits.load(SeqCst), 6);

    // Open: refused at once, upstream untouched, retry-after counts down.
    let open = open_err(send(&mut svc, req(UP, "200")).await);
    assert_eq!(open.retry_after(), Duration::from_secs(5));
    let c = classify(&open);
    assert_eq!(c.fault(), Fault::DestinationUnavailable);
    assert_eq!(c.retry_after(), Some(Duration::from_secs(5)));
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        open_err(send(&mut svc, req(UP, "200")).await).retry_after(),
        Duration::from_secs(3)
    );
    assert_eq!(hits.load(SeqCst), 6);
    let snap = handle.snapshot(UP).unwrap();
    assert_eq!(snap.state(), State::Open);
    assert_eq!(snap.time_until_probe(), Some(Duration::from_secs(3)));

    tokio::time::advance(Duration::from_secs(3)).await;
    send(&mut svc, req(UP, "200")).await.unwrap();
    assert_eq!(hits.load(SeqCst), 7);
    assert_eq!(handle.snapshot(UP).unwrap().state(), State::Closed);
    assert_eq!(
        rec.states(),
        vec![
            (State::Closed, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Closed),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn failure_rate_needs_min_calls() {
    let hits = Arc::new(AtomicUsize::new(0));
    let layer = cfg()
        .consecutive_failures(0)
        .count_window(10)
        .min_calls(10)
        .failure_rate(0.5)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(upstream(hits.clone()));
    // 4 failures out of 9 calls: below the minimum, whatever the rate.
    for i in 0..9 {
        let what = if i % 2 == 0 { "200" } else { "504" };
        send(&mut svc, req(UP, what)).await.unwrap();
    }
    let snap = handle.snapshot(UP).unwrap();
    assert_eq!((snap.calls(), snap.failures()), (9, 4));
    assert_eq!(snap.state(), State::Closed);
    // 10th call fails: 5/10 = 50%.
    send(&mut svc, req(UP, "503")).await.unwrap();
    assert_eq!(handle.snapshot(UP).unwrap().state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_old_failures() {
    let hits = Arc::new(AtomicUsize::new(0));
    let layer = cfg()
        .consecutive_failures(0)
        .time_window(Duration::from_secs(10), 10)
        .min_calls(4)
        .failure_rate(0.75)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(upstream(hits));
    for _ in 0..2 {
        send(&mut svc, req(UP, "503")).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(11)).await;
    // The two old failures have left the window: 2 of 3 is under 75%... and under min calls.
    send(&mut svc, req(UP, "200")).await.unwrap();
    send(&mut svc, req(UP, "503")).await.unwrap();
    send(&mut svc, req(UP, "503")).await.unwrap();
    let snap = handle.snapshot(UP).unwrap();
    assert_eq!((snap.calls(), snap.failures()), (3, 2));
    assert_eq!(snap.state(), State::Closed);
    send(&mut svc, req(UP, "503")).await.unwrap();
    assert_eq!(handle.snapshot(UP).unwrap().state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn what_counts_as_a_failure() {
    let hits = Arc::new(AtomicUsize::new(0));
    let layer = cfg().consecutive_failures(1).build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(upstream(hits.clone()));
    // 4xx, 500 and local overload are not failures.
    for what in ["404", "429", "500", "200", "overloaded"] {
        let _ = send(&mut svc, req(UP, what)).await;
        assert_eq!(
            handle.snapshot(UP).unwrap().state(),
            State::Closed,
            "{what}"
        );
    }
    // Overloaded is not even a sample.
    assert_eq!(handle.snapshot(UP).unwrap().calls(), 4);
    // A classified transport fault is.
    let err = send(&mut svc, req(UP, "refused")).await.unwrap_err();
    assert_eq!(classify(&*err).fault(), Fault::ConnectionRefused);
    assert_eq!(handle.snapshot(UP).unwrap().state(), State::Open);

    // gRPC UNAVAILABLE in a trailers-only answer counts; 500 when configured.
    for (what, grpc, statuses) in [
        ("200", Some("14"), None),
        ("500", None, Some(StatusCode::INTERNAL_SERVER_ERROR)),
    ] {
        let mut b = cfg().consecutive_failures(1);
        if let Some(s) = statuses {
            b = b.failure_statuses([s]);
        }
        let l = b.build().unwrap();
        let h = l.handle();
        let mut svc = l.layer(upstream(hits.clone()));
        let mut r = req(UP, what);
        if let Some(g) = grpc {
            r.headers_mut().insert("x-grpc", g.parse().unwrap());
        }
        send(&mut svc, r).await.unwrap();
        assert_eq!(h.snapshot(UP).unwrap().state(), State::Open, "{what}");
    }
    // gRPC OK or NOT_FOUND does not.
    let l = cfg().consecutive_failures(1).build().unwrap();
    let mut svc = l.layer(upstream(hits));
    let mut r = req(UP, "200");
    r.headers_mut().insert("x-grpc", "5".parse().unwrap());
    send(&mut svc, r).await.unwrap();
    assert_eq!(l.handle().snapshot(UP).unwrap().state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_bounded_probes_and_failure_reopens_longer() {
    let hits = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let inner = {
        let hits = hits.clone();
        tower::service_fn(move |r: http::Request<()>| {
            hits.fetch_add(1, SeqCst);
            let wait = (r.headers().get("x-do").unwrap() == "wait")
                .then(|| rx.lock().unwrap().take().unwrap());
            async move {
                if let Some(w) = wait {
                    let _ = w.await;
                    return Ok::<_, BoxError>(
                        http::Response::builder().status(503).body(()).unwrap(),
                    );
                }
                Ok(http::Response::builder().status(503).body(()).unwrap())
            }
        })
    };
    let layer = cfg()
        .consecutive_failures(1)
        .max_open_duration(Duration::from_secs(60))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    send(&mut svc, req(UP, "503")).await.unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;

    // One probe in flight, the next caller is refused.
    let probe = svc.ready().await.unwrap().call(req(UP, "wait"));
    assert_eq!(handle.snapshot(UP).unwrap().state(), State::HalfOpen);
    assert_eq!(handle.snapshot(UP).unwrap().probes_in_flight(), 1);
    open_err(send(&mut svc, req(UP, "200")).await);
    assert_eq!(hits.load(SeqCst), 2);

    // The probe fails: open again, twice as long.
    tx.send(()).unwrap();
    assert_eq!(probe.await.unwrap().status(), 503);
    assert_eq!(
        handle.snapshot(UP).unwrap().time_until_probe(),
        Some(Duration::from_secs(10))
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    send(&mut svc, req(UP, "503")).await.unwrap();
    assert_eq!(
        handle.snapshot(UP).unwrap().time_until_probe(),
        Some(Duration::from_secs(20))
    );
}

#[tokio::test(start_paused = true)]
async fn dropped_call_is_not_a_sample() {
    let inner = tower::service_fn(|_r: http::Request<()>| async {
        std::future::pending::<()>().await;
        Ok::<_, BoxError>(http::Response::new(()))
    });
    let layer = cfg().consecutive_failures(1).build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    let r = tokio::time::timeout(Duration::from_millis(1), send(&mut svc, req(UP, "200"))).await;
    assert!(r.is_err(), "the hanging call was dropped");
    let snap = handle.snapshot(UP).unwrap();
    assert_eq!((snap.calls(), snap.state()), (0, State::Closed));
}

#[tokio::test(start_paused = true)]
async fn dropped_probe_returns_permit() {
    let hits = Arc::new(AtomicUsize::new(0));
    let layer = cfg().consecutive_failures(1).build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(upstream(hits.clone()));
    send(&mut svc, req(UP, "503")).await.unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;
    let probe = svc.ready().await.unwrap().call(req(UP, "200"));
    assert_eq!(handle.snapshot(UP).unwrap().probes_in_flight(), 1);
    open_err(send(&mut svc, req(UP, "200")).await);
    drop(probe);
    assert_eq!(handle.snapshot(UP).unwrap().probes_in_flight(), 0);
    assert_eq!(handle.snapshot(UP).unwrap().state(), State::HalfOpen);
    // The slot is free again: the next call probes, succeeds, closes.
    send(&mut svc, req(UP, "200")).await.unwrap();
    assert_eq!(handle.snapshot(UP).unwrap().state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn several_probes_and_successes() {
    let hits = Arc::new(AtomicUsize::new(0));
    let layer = cfg()
        .consecutive_failures(1)
        .half_open_probes(2)
        .probe_successes(3)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(upstream(hits.clone()));
    send(&mut svc, req(UP, "503")).await.unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;
    let a = svc.ready().await.unwrap().call(req(UP, "200"));
    let b = svc.ready().await.unwrap().call(req(UP, "200"));
    open_err(send(&mut svc, req(UP, "200")).await);
    a.await.unwrap();
    b.await.unwrap();
    assert_eq!(handle.snapshot(UP).unwrap().state(), State::HalfOpen);
    send(&mut svc, req(UP, "200")).await.unwrap();
    assert_eq!(handle.snapshot(UP).unwrap().state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn retry_after_lengthens_open_time_up_to_the_cap() {
    let hits = Arc::new(AtomicUsize::new(0));
    let layer = cfg()
        .consecutive_failures(1)
        .max_open_duration(Duration::from_secs(30))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(upstream(hits.clone()));
    let mut r = req(UP, "503");
    r.headers_mut()
        .insert("x-retry-after", "20".parse().unwrap());
    send(&mut svc, r).await.unwrap();
    assert_eq!(
        handle.snapshot(UP).unwrap().time_until_probe(),
        Some(Duration::from_secs(20))
    );
    let mut r = req("b.test", "503");
    r.headers_mut()
        .insert("x-retry-after", "3600".parse().unwrap());
    send(&mut svc, r).await.unwrap();
    assert_eq!(
        handle.snapshot("b.test").unwrap().time_until_probe(),
        Some(Duration::from_secs(30))
    );
    // Not honoured when switched off.
    let l = cfg()
        .consecutive_failures(1)
        .honor_retry_after(false)
        .build()
        .unwrap();
    let mut svc = l.layer(upstream(hits));
    let mut r = req(UP, "503");
    r.headers_mut()
        .insert("x-retry-after", "20".parse().unwrap());
    send(&mut svc, r).await.unwrap();
    assert_eq!(
        l.handle().snapshot(UP).unwrap().time_until_probe(),
        Some(Duration::from_secs(5))
    );
}

#[tokio::test(start_paused = true)]
async fn jitter_shortens_within_bounds() {
    let hits = Arc::new(AtomicUsize::new(0));
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .jitter(0.5)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(upstream(hits));
    let mut seen = std::collections::HashSet::new();
    for i in 0..20 {
        let key = format!("k{i}.test");
        send(&mut svc, req(&key, "503")).await.unwrap();
        let t = handle.snapshot(&key).unwrap().time_until_probe().unwrap();
        assert!(
            t >= Duration::from_millis(2500) && t <= Duration::from_secs(5),
            "{t:?}"
        );
        seen.insert(t);
    }
    assert!(seen.len() > 10, "jitter spreads open times: {seen:?}");
}

#[tokio::test(start_paused = true)]
async fn slow_calls_count_as_failures() {
    let inner = tower::service_fn(|_r: http::Request<()>| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok::<_, BoxError>(http::Response::new(()))
    });
    let layer = cfg()
        .consecutive_failures(2)
        .slow_call_threshold(Duration::from_secs(1))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    send(&mut svc, req(UP, "200")).await.unwrap();
    assert_eq!(handle.snapshot(UP).unwrap().failures(), 1);
    send(&mut svc, req(UP, "200")).await.unwrap();
    assert_eq!(handle.snapshot(UP).unwrap().state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn keys_are_independent_and_shared_across_layer_calls() {
    let hits = Arc::new(AtomicUsize::new(0));
    let layer = cfg().consecutive_failures(2).build().unwrap();
    let handle = layer.handle();
    // Two `layer()` calls (two axum routes) and a clone share the breakers.
    let mut a = layer.layer(upstream(hits.clone()));
    let mut b = layer.clone().layer(upstream(hits.clone()));
    let mut c = b.clone();
    send(&mut a, req("down.test", "503")).await.unwrap();
    send(&mut b, req("down.test", "503")).await.unwrap();
    open_err(send(&mut c, req("down.test", "200")).await);
    // Another upstream is untouched.
    send(&mut c, req("fine.test", "200")).await.unwrap();
    assert_eq!(handle.snapshot("fine.test").unwrap().state(), State::Closed);
    // Requests without an authority share one breaker.
    for _ in 0..2 {
        let r = http::Request::get("/x")
            .header("x-do", "503")
            .body(())
            .unwrap();
        send(&mut a, r).await.unwrap();
    }
    assert_eq!(handle.snapshot(NO_KEY).unwrap().state(), State::Open);
    let keys: Vec<_> = handle
        .snapshots()
        .iter()
        .map(|s| s.key().to_owned())
        .collect();
    assert_eq!(keys, ["down.test", "fine.test", NO_KEY, OVERFLOW_KEY]);
}

#[tokio::test(start_paused = true)]
async fn custom_key_fn() {
    let hits = Arc::new(AtomicUsize::new(0));
    let layer = cfg()
        .consecutive_failures(1)
        .key_fn(|r| {
            r.headers()
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .map(std::borrow::Cow::Borrowed)
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(upstream(hits));
    let mut r = req(UP, "503");
    r.headers_mut().insert("x-tenant", "acme".parse().unwrap());
    send(&mut svc, r).await.unwrap();
    assert_eq!(handle.snapshot("acme").unwrap().state(), State::Open);
    assert!(handle.snapshot(UP).is_none());
    send(&mut svc, req(UP, "200")).await.unwrap();
    assert_eq!(handle.snapshot(NO_KEY).unwrap().calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn map_is_bounded_with_idle_eviction_and_overflow() {
    let hits = Arc::new(AtomicUsize::new(0));
    let layer = cfg()
        .max_keys(2)
        .idle_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(upstream(hits));
    send(&mut svc, req("a.test", "200")).await.unwrap();
    send(&mut svc, req("b.test", "200")).await.unwrap();
    // Full, nothing idle: the third key shares the overflow breaker.
    send(&mut svc, req("c.test", "200")).await.unwrap();
    assert!(handle.snapshot("c.test").is_none());
    assert_eq!(handle.snapshot(OVERFLOW_KEY).unwrap().calls(), 1);
    for i in 0..100 {
        send(&mut svc, req(&format!("x{i}.test"), "200"))
            .await
            .unwrap();
    }
    assert_eq!(handle.snapshots().len(), 4);
    // `a` stays busy, `b` goes idle and makes room for `c`.
    for _ in 0..7 {
        tokio::time::advance(Duration::from_secs(10)).await;
        send(&mut svc, req("a.test", "200")).await.unwrap();
    }
    send(&mut svc, req("c.test", "200")).await.unwrap();
    assert!(handle.snapshot("b.test").is_none());
    assert!(handle.snapshot("a.test").is_some());
    assert_eq!(handle.snapshot("c.test").unwrap().calls(), 1);
}

// Pins: the breaker reads `Retry-After` as the retry does, an HTTP-date as well as
// delay-seconds (RFC 9110 §10.2.3): the circuit opens until then (capped).
#[tokio::test(start_paused = true)]
async fn retry_after_as_an_http_date_sets_the_open_time() {
    let hits = Arc::new(AtomicUsize::new(0));
    let layer = cfg()
        .consecutive_failures(1)
        .max_open_duration(Duration::from_secs(3600))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(upstream(hits));
    let at = std::time::SystemTime::now() + Duration::from_secs(600);
    let mut r = req(UP, "503");
    r.headers_mut().insert(
        "x-retry-after",
        httpdate::fmt_http_date(at).parse().unwrap(),
    );
    send(&mut svc, r).await.unwrap();
    let left = handle.snapshot(UP).unwrap().time_until_probe().unwrap();
    assert!(
        left > Duration::from_secs(590) && left <= Duration::from_secs(600),
        "{left:?}"
    );
}

// Pins: a full map does not evict a circuit still open, however idle: its key would get a
// closed breaker and send traffic the upstream asked to hold back (`Retry-After`). Once its
// open time has passed, it may go like any idle key.
#[tokio::test(start_paused = true)]
async fn an_open_circuit_is_not_evicted_until_its_time_has_come() {
    let hits = Arc::new(AtomicUsize::new(0));
    let layer = cfg()
        .consecutive_failures(1)
        .max_open_duration(Duration::from_secs(3600))
        .max_keys(2)
        .idle_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(upstream(hits.clone()));
    let mut r = req("a.test", "503");
    r.headers_mut()
        .insert("x-retry-after", "600".parse().unwrap());
    send(&mut svc, r).await.unwrap();
    assert_eq!(handle.snapshot("a.test").unwrap().state(), State::Open);
    send(&mut svc, req("b.test", "200")).await.unwrap();

    // A first scan only takes the keys' used marks (`z` shares the overflow breaker); two
    // minutes later both are idle, `a` the longest, but only the closed `b` makes room.
    tokio::time::advance(Duration::from_secs(1)).await;
    send(&mut svc, req("z.test", "200")).await.unwrap();
    assert!(handle.snapshot("z.test").is_none());
    tokio::time::advance(Duration::from_secs(120)).await;
    send(&mut svc, req("c.test", "200")).await.unwrap();
    assert!(handle.snapshot("b.test").is_none());
    assert_eq!(handle.snapshot("a.test").unwrap().state(), State::Open);
    assert_eq!(handle.snapshot("c.test").unwrap().calls(), 1);
    let before = hits.load(SeqCst);
    open_err(send(&mut svc, req("a.test", "200")).await);
    assert_eq!(
        hits.load(SeqCst),
        before,
        "still refused, the upstream untouched"
    );

    // `a`'s 600 s have passed and it is the idlest: it goes for `d`.
    tokio::time::advance(Duration::from_secs(600)).await;
    send(&mut svc, req("d.test", "200")).await.unwrap();
    assert!(handle.snapshot("a.test").is_none());
    assert_eq!(handle.snapshot("d.test").unwrap().calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn operator_modes() {
    let hits = Arc::new(AtomicUsize::new(0));
    let rec = Recorder::default();
    let layer = cfg()
        .consecutive_failures(1)
        .on_transition(rec.listener())
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = CircuitBreaker::new(upstream(hits.clone()), &layer);
    handle.clone().force_open();
    assert_eq!(handle.mode(), Some(State::ForcedOpen));
    open_err(send(&mut svc, req(UP, "200")).await);
    assert_eq!(hits.load(SeqCst), 0);
    handle.disable();
    for _ in 0..5 {
        send(&mut svc, req(UP, "503")).await.unwrap();
    }
    assert_eq!(hits.load(SeqCst), 5);
    assert!(
        handle.snapshot(UP).is_none(),
        "disabled breakers count nothing"
    );
    handle.automatic();
    assert_eq!(handle.mode(), None);
    send(&mut svc, req(UP, "503")).await.unwrap();
    assert_eq!(handle.snapshot(UP).unwrap().state(), State::Open);
    let log = rec.0.lock().unwrap().clone();
    assert_eq!(log[0], ("*".to_owned(), State::Closed, State::ForcedOpen));
    assert_eq!(log[1], ("*".to_owned(), State::ForcedOpen, State::Disabled));
    assert_eq!(log[3], (UP.to_owned(), State::Closed, State::Open));
}

#[tokio::test(start_paused = true)]
async fn accessors_and_debug() {
    let layer = CircuitBreakerLayer::new();
    let mut svc = layer.layer(upstream(Arc::new(AtomicUsize::new(0))));
    let _ = svc.get_ref();
    let _ = svc.get_mut();
    assert!(format!("{layer:?}").contains("CircuitBreakerLayer"));
    assert!(format!("{:?}", layer.handle()).contains("BreakerHandle"));
    let _inner = svc.into_inner();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_counts_add_up() {
    for builder in [
        CircuitBreakerLayer::builder().time_window(Duration::from_secs(60), 6),
        CircuitBreakerLayer::builder().count_window(1_000_000),
    ] {
        let hits = Arc::new(AtomicUsize::new(0));
        let layer = builder
            .consecutive_failures(0)
            .min_calls(u32::MAX)
            .build()
            .unwrap();
        let handle = layer.handle();
        let svc = layer.layer(upstream(hits.clone()));
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..64 {
            let mut svc = svc.clone();
            tasks.spawn(async move {
                for i in 0..500 {
                    let what = if (t + i) % 10 == 0 { "503" } else { "200" };
                    let key = if i % 2 == 0 { "a.test" } else { "b.test" };
                    send(&mut svc, req(key, what)).await.unwrap();
                    if i % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let (a, b) = (
            handle.snapshot("a.test").unwrap(),
            handle.snapshot("b.test").unwrap(),
        );
        assert_eq!(a.calls() + b.calls(), 64 * 500);
        assert_eq!(a.failures() + b.failures(), 64 * 500 / 10);
        assert_eq!(hits.load(SeqCst), 64 * 500);
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync + 'static>() {}
    is::<
        CircuitBreaker<
            tower::util::BoxCloneSyncService<http::Request<()>, http::Response<()>, BoxError>,
        >,
    >();
    is::<
        tower_upstream::breaker::future::ResponseFuture<
            futures_util::future::Ready<Result<http::Response<()>, BoxError>>,
        >,
    >();
    is::<tower_upstream::breaker::BreakerHandle>();
    is::<tower_upstream::breaker::Snapshot>();
}

mod state_machine {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Mutex;

    use proptest::prelude::*;
    use tokio::sync::oneshot;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Start,
        Finish { which: usize, fail: bool },
        Drop { which: usize },
        Advance { ms: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Start),
            3 => (any::<usize>(), any::<bool>()).prop_map(|(which, fail)| Op::Finish { which, fail }),
            1 => any::<usize>().prop_map(|which| Op::Drop { which }),
            2 => (0u64..3000).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    type Fut = Pin<Box<dyn Future<Output = Result<http::Response<()>, BoxError>> + Send>>;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn invariants(probes in 1u32..4, successes in 1u32..4, ops in proptest::collection::vec(op(), 1..120)) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(run(probes, successes, ops));
        }
    }

    async fn run(probes: u32, successes: u32, ops: Vec<Op>) {
        let slot: Arc<Mutex<Option<oneshot::Receiver<bool>>>> = Arc::default();
        let hits = Arc::new(AtomicUsize::new(0));
        let inner = {
            let (slot, hits) = (slot.clone(), hits.clone());
            tower::service_fn(move |_r: http::Request<()>| {
                hits.fetch_add(1, SeqCst);
                let rx = slot.lock().unwrap().take().unwrap();
                async move {
                    let fail = rx.await.unwrap_or(false);
                    Ok::<_, BoxError>(
                        http::Response::builder()
                            .status(if fail { 503 } else { 200 })
                            .body(())
                            .unwrap(),
                    )
                }
            })
        };
        let rec = Recorder::default();
        let layer = CircuitBreakerLayer::builder()
            .single()
            .consecutive_failures(2)
            .count_window(5)
            .min_calls(3)
            .open_duration(Duration::from_secs(1))
            .max_open_duration(Duration::from_secs(4))
            .half_open_probes(probes)
            .probe_successes(successes)
            .on_transition(rec.listener())
            .build()
            .unwrap();
        let handle = layer.handle();
        let mut svc = layer.layer(inner);
        // (outcome sender, future, admitted as a probe of this half-open period)
        let mut pending: Vec<(oneshot::Sender<bool>, Fut, Option<u32>)> = Vec::new();
        let mut period = 0u32;
        let mut probe_ok = 0u32;
        let mut seen = 0usize;

        for op in ops {
            let before = handle.snapshot(NO_KEY).unwrap();
            match op {
                Op::Start => {
                    let (tx, rx) = oneshot::channel();
                    *slot.lock().unwrap() = Some(rx);
                    let h0 = hits.load(SeqCst);
                    let mut fut: Fut = Box::pin(svc.call(http::Request::new(())));
                    let admitted = hits.load(SeqCst) > h0;
                    let live_probes = pending.iter().filter(|p| p.2 == Some(period)).count() as u32;
                    match before.state() {
                        State::Closed => assert!(admitted, "closed always admits"),
                        State::Open if before.time_until_probe() > Some(Duration::ZERO) => {
                            assert!(!admitted, "open never admits")
                        }
                        _ => assert_eq!(admitted, live_probes < probes, "probe bound"),
                    }
                    if admitted {
                        let probe = match before.state() {
                            State::Closed => None,
                            State::Open => Some(period + 1),
                            _ => Some(period),
                        };
                        pending.push((tx, fut, probe));
                    } else {
                        slot.lock().unwrap().take();
                        match futures_util::FutureExt::now_or_never(fut.as_mut()) {
                            Some(Err(e)) => assert!(e.is::<CircuitOpen>()),
                            _ => panic!("refusal must be immediate"),
                        }
                    }
                }
                Op::Finish { which, fail } => {
                    if !pending.is_empty() {
                        let (tx, fut, probe) = pending.remove(which % pending.len());
                        tx.send(fail).unwrap();
                        fut.await.unwrap();
                        if probe == Some(period) && !fail {
                            probe_ok += 1;
                        }
                    }
                }
                Op::Drop { which } => {
                    if !pending.is_empty() {
                        drop(pending.remove(which % pending.len()));
                    }
                }
                Op::Advance { ms } => tokio::time::advance(Duration::from_millis(ms)).await,
            }
            let after = handle.snapshot(NO_KEY).unwrap();
            assert!(after.probes_in_flight() <= probes, "probes in flight");
            for (from, to) in rec.states()[seen..].iter().copied() {
                if (from, to) == (State::HalfOpen, State::Closed) {
                    assert!(
                        probe_ok >= successes,
                        "closed after {probe_ok} probe successes"
                    );
                }
                if to == State::HalfOpen {
                    probe_ok = 0;
                    period += 1;
                }
            }
            seen = rec.states().len();
        }
    }
}

/// A real upstream on 127.0.0.1 answers 503, then goes away (refused), then comes back on the
/// same port; a hyper-util client behind the breaker. Real time, short open durations.
mod end_to_end {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http_body_util::{Empty, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::TcpListener;

    use super::*;

    fn spawn_upstream(
        listener: TcpListener,
        hits: Arc<AtomicUsize>,
        status: u16,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let hits = hits.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        hits.fetch_add(1, SeqCst);
                        async move {
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        })
    }

    #[tokio::test]
    async fn upstream_goes_down_and_comes_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let key = addr.to_string();
        let hits = Arc::new(AtomicUsize::new(0));
        let server = spawn_upstream(listener, hits.clone(), 503);

        let rec = Recorder::default();
        let layer = CircuitBreakerLayer::builder()
            .consecutive_failures(3)
            .open_duration(Duration::from_millis(300))
            .max_open_duration(Duration::from_secs(2))
            .jitter(0.0)
            .on_transition(rec.listener())
            .build()
            .unwrap();
        let handle = layer.handle();
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let mut svc = layer.layer(client);
        let uri = format!("http://{addr}/");
        let get = || {
            http::Request::get(&uri)
                .body(Empty::<Bytes>::new())
                .unwrap()
        };

        // 503s open the circuit.
        for _ in 0..3 {
            let resp = svc.ready().await.unwrap().call(get()).await.unwrap();
            assert_eq!(resp.status(), 503);
        }
        assert_eq!(hits.load(SeqCst), 3);
        assert_eq!(handle.snapshot(&key).unwrap().state(), State::Open);

        // Refused without touching the upstream.
        for _ in 0..5 {
            let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
            let open = err.downcast_ref::<CircuitOpen>().expect("CircuitOpen");
            assert!(open.retry_after() > Duration::ZERO);
            // Open times are kept at a 4 ms granularity.
            assert!(open.retry_after() <= Duration::from_millis(304));
            let c = classify(&*err);
            assert_eq!(c.fault(), Fault::DestinationUnavailable);
            assert_eq!(c.retry_after(), Some(open.retry_after()));
        }
        assert_eq!(hits.load(SeqCst), 3);

        // The upstream goes away: the probe is refused, the circuit opens again, longer.
        server.abort();
        let _ = server.await;
        tokio::time::sleep(Duration::from_millis(350)).await;
        let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
        assert!(
            !err.is::<CircuitOpen>(),
            "the probe reached the network: {err}"
        );
        let fault = classify(&*err).fault();
        assert!(
            matches!(
                fault,
                Fault::ConnectionRefused | Fault::ConnectionTerminated
            ),
            "{fault}: {err:?}"
        );
        let snap = handle.snapshot(&key).unwrap();
        assert_eq!(snap.state(), State::Open);
        assert!(snap.time_until_probe().unwrap() > Duration::from_millis(300));

        // It comes back on the same port; the breaker closes by itself once the open time
        // has passed.
        let listener = TcpListener::bind(addr).await.unwrap();
        let server = spawn_upstream(listener, hits.clone(), 200);
        let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
        assert!(err.is::<CircuitOpen>());
        assert_eq!(hits.load(SeqCst), 3);
        tokio::time::sleep(Duration::from_millis(650)).await;
        for _ in 0..3 {
            let resp = svc.ready().await.unwrap().call(get()).await.unwrap();
            assert_eq!(resp.status(), 200);
        }
        assert_eq!(hits.load(SeqCst), 6);
        assert_eq!(handle.snapshot(&key).unwrap().state(), State::Closed);
        assert_eq!(
            rec.states(),
            vec![
                (State::Closed, State::Open),
                (State::Open, State::HalfOpen),
                (State::HalfOpen, State::Open),
                (State::Open, State::HalfOpen),
                (State::HalfOpen, State::Closed),
            ]
        );
        server.abort();
    }
}

/// Many threads race through the open → half-open move: exactly `probes` calls get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_open_race_admits_exactly_the_probe_limit() {
    let hits = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let inner = {
        let (hits, release) = (hits.clone(), release.clone());
        tower::service_fn(move |r: http::Request<()>| {
            hits.fetch_add(1, SeqCst);
            let fail = r.headers().contains_key("x-do");
            let release = release.clone();
            async move {
                if !fail {
                    release.notified().await;
                }
                Ok::<_, BoxError>(
                    http::Response::builder()
                        .status(if fail { 503 } else { 200 })
                        .body(())
                        .unwrap(),
                )
            }
        })
    };
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_duration(Duration::from_millis(20))
        .jitter(0.0)
        .half_open_probes(3)
        .probe_successes(3)
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(inner);
    send(&mut svc.clone(), req(UP, "503")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    hits.store(0, SeqCst);

    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (mut svc, barrier) = (svc.clone(), barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            let r = http::Request::get(format!("http://{UP}/"))
                .body(())
                .unwrap();
            svc.ready().await.unwrap().call(r).await
        });
    }
    // Let every task reach the breaker, then let the probes finish.
    while hits.load(SeqCst) < 3 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(hits.load(SeqCst), 3);
    assert_eq!(handle.snapshot(UP).unwrap().probes_in_flight(), 3);
    let (mut ok, mut refused) = (0, 0);
    while !tasks.is_empty() {
        release.notify_waiters();
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(5), tasks.join_next()).await
        {
            match r.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert!(e.is::<CircuitOpen>());
                    refused += 1;
                }
            }
        }
    }
    assert_eq!((ok, refused), (3, 61));
    assert_eq!(handle.snapshot(UP).unwrap().state(), State::Closed);
}
