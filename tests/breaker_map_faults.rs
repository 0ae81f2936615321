//! The breaker under `MapFaults`, over real sockets: an open circuit answers 503 with
//! `Retry-After` and `Proxy-Status: …; error=destination_unavailable` without touching the
//! upstream, and closes by itself once the upstream is healthy again.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tower::ServiceBuilder;
use tower_upstream::{CircuitBreakerLayer, MapFaultsLayer};

use support::*;

#[tokio::test]
async fn open_circuit_answers_503_with_retry_after_then_recovers() {
    let hits = Arc::new(AtomicUsize::new(0));
    let healthy = Arc::new(AtomicBool::new(false));
    let upstream = {
        let (hits, healthy) = (hits.clone(), healthy.clone());
        raw_upstream(move |mut s| {
            let (hits, healthy) = (hits.clone(), healthy.clone());
            async move {
                read_head(&mut s).await;
                hits.fetch_add(1, SeqCst);
                let reply: &[u8] = if healthy.load(SeqCst) {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                } else {
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                };
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
            }
        })
        .await
    };

    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(3)
        .open_duration(Duration::from_millis(300))
        .jitter(0.0)
        .build()
        .unwrap();
    let layers = ServiceBuilder::new()
        .layer(
            MapFaultsLayer::builder()
                .gateway_name("gw")
                .build()
                .unwrap(),
        )
        .layer(breaker)
        .into_inner();
    let gw = gateway(upstream, layers).await;

    // Three upstream 503s pass through and open the circuit.
    for _ in 0..3 {
        let res = get(format!("http://{gw}/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            res.headers().get("proxy-status").is_none(),
            "the upstream's own 503"
        );
    }
    assert_eq!(hits.load(SeqCst), 3);

    // Now the gateway refuses by itself, saying when to come back.
    for _ in 0..3 {
        let res = get(format!("http://{gw}/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            res.headers()["proxy-status"],
            "gw; error=destination_unavailable"
        );
        assert_eq!(res.headers()["retry-after"], "1", "300 ms rounded up");
    }
    assert_eq!(hits.load(SeqCst), 3, "the upstream was not touched");

    // The upstream recovers; after the open time the probe succeeds and the circuit closes.
    healthy.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    for _ in 0..3 {
        let res = get(format!("http://{gw}/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(hits.load(SeqCst), 6);
}
