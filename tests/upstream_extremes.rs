//! The stack at the edges of its settings: durations of `Duration::MAX`, odd part settings,
//! and the concurrency limit under many threads. Nothing may panic at request time, and no
//! place under the limit may be lost.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_upstream::retry::{Backoff, ReplayBody};
use tower_upstream::{CircuitBreakerLayer, DeadlineLayer, RetryLayer, Upstream};

fn get(host: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{host}/x"))
        .body(Full::default())
        .unwrap()
}

fn grpc() -> Request<Full<Bytes>> {
    Request::post("http://upstream/p.S/M")
        .header("content-type", "application/grpc")
        .body(Full::default())
        .unwrap()
}

/// Durations of `Duration::MAX` (a natural way to say "no limit") work on plain and gRPC
/// requests, and a gRPC upstream is told a `grpc-timeout` it can parse.
#[tokio::test(start_paused = true)]
async fn durations_of_duration_max_work() {
    let layers = [
        Upstream::builder().deadline(Duration::MAX).build().unwrap(),
        Upstream::builder()
            .attempt_timeout(Duration::MAX)
            .no_deadline()
            .build()
            .unwrap(),
        Upstream::builder()
            .attempt_timeout(Duration::MAX)
            .deadline(Duration::MAX)
            .build()
            .unwrap(),
        Upstream::builder()
            .deadline_layer(DeadlineLayer::new(Duration::MAX))
            .attempt_timeout(Duration::MAX)
            .build()
            .unwrap(),
    ];
    for (i, layer) in layers.into_iter().enumerate() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let svc = layer.layer(service_fn(move |r: Request<ReplayBody<Full<Bytes>>>| {
            record
                .lock()
                .unwrap()
                .push(tower_upstream::grpc::timeout_of(r.headers()));
            async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let rsp = Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "0")
                    .body(Full::<Bytes>::default())
                    .unwrap();
                Ok::<_, Infallible>(rsp)
            }
        }));
        let res = svc.clone().oneshot(get("upstream")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "layer {i}");
        let res = svc.oneshot(grpc()).await.unwrap();
        assert_eq!(res.headers()["grpc-status"], "0", "layer {i}");
        let seen = seen.lock().unwrap();
        assert!(
            seen[1].is_some(),
            "layer {i}: a gRPC upstream is told its time"
        );
    }
}

/// Parts configured at their extremes (huge idle and slow-call thresholds, one key, a
/// `Duration::MAX` backoff and pushback cap, no body limit) with an upstream that fails
/// every other call and asks for a `Retry-After` of three thousand years: every request
/// gets an answer, none panics.
#[tokio::test(start_paused = true)]
async fn parts_at_their_extremes_answer_every_request() {
    let breaker = CircuitBreakerLayer::builder()
        .idle_timeout(Duration::MAX)
        .slow_call_threshold(Duration::MAX)
        .max_keys(1)
        .build()
        .unwrap();
    let retry = RetryLayer::builder()
        .pushback_cap(Duration::MAX)
        .backoff(Backoff::full_jitter(Duration::MAX, Duration::MAX))
        .body_limit(usize::MAX)
        .build()
        .unwrap();
    let layer = Upstream::builder()
        .breaker(breaker)
        .retry(retry)
        .deadline(Duration::from_secs(100))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let count = calls.clone();
    let svc = layer.layer(service_fn(move |_r: Request<ReplayBody<Full<Bytes>>>| {
        let k = count.fetch_add(1, SeqCst);
        async move {
            let mut b = Response::builder().status(if k % 2 == 0 { 503 } else { 200 });
            if k % 4 == 0 {
                b = b.header("retry-after", "99999999999");
            }
            Ok::<_, Infallible>(b.body(Full::<Bytes>::default()).unwrap())
        }
    }));
    for i in 0..6 {
        let status = svc
            .clone()
            .oneshot(get(&format!("u{i}")))
            .await
            .unwrap()
            .status();
        assert!([200, 503, 504].contains(&status.as_u16()), "{i}: {status}");
    }
    let status = svc.oneshot(grpc()).await.unwrap().status();
    assert!([200, 503].contains(&status.as_u16()), "gRPC: {status}");
    assert!(calls.load(SeqCst) >= 6);
}

/// 64 tasks on 4 threads through one limit of 5: never more than 5 in flight, and every
/// place is given back (afterwards, 5 hanging requests are let through and a 6th is shed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_limit_holds_across_threads_and_loses_no_place() {
    let max = 5;
    let layer = Upstream::builder()
        .no_retry()
        .no_breaker()
        .concurrency_limit(max)
        .build()
        .unwrap();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (now, high) = (in_flight.clone(), peak.clone());
    let svc = layer.layer(service_fn(move |_r: Request<ReplayBody<Full<Bytes>>>| {
        let (now, high) = (now.clone(), high.clone());
        async move {
            high.fetch_max(now.fetch_add(1, SeqCst) + 1, SeqCst);
            tokio::task::yield_now().await;
            now.fetch_sub(1, SeqCst);
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        }
    }));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                for _ in 0..200 {
                    svc.clone().oneshot(get("upstream")).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert!(peak.load(SeqCst) <= max, "peak {}", peak.load(SeqCst));

    let hang = layer.layer(service_fn(|_r: Request<ReplayBody<Full<Bytes>>>| async {
        std::future::pending::<()>().await;
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    }));
    let mut hanging = Vec::new();
    for _ in 0..max {
        let mut h = hang.clone();
        h.ready().await.unwrap();
        hanging.push(tokio::spawn(h.call(get("upstream"))));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    for h in &hanging {
        assert!(!h.is_finished(), "a request under the limit was shed");
    }
    let res = hang.oneshot(get("upstream")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
}
