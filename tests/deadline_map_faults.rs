//! The deadline and the attempt timeout under `MapFaults`: a hanging upstream answers 504 (or
//! `grpc-status: 4`) at the configured virtual time.

#[path = "support/upstreams.rs"]
mod support;

use std::time::Duration;

use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_upstream::map_faults::MapFaultsLayer;
use tower_upstream::{AttemptTimeoutLayer, DeadlineLayer};

#[tokio::test(start_paused = true)]
async fn hanging_upstream_answers_504_at_the_deadline() {
    let (addr, seen) = support::hanging_upstream().await;
    let gateway = ServiceBuilder::new()
        .layer(
            MapFaultsLayer::builder()
                .gateway_name("gw")
                .build()
                .unwrap(),
        )
        .layer(DeadlineLayer::new(Duration::from_millis(300)))
        .layer(AttemptTimeoutLayer::new(Duration::from_secs(10)))
        .service(support::client());
    let hold = support::hold_clock_until_seen(seen);
    let start = Instant::now();
    let res = gateway
        .oneshot(support::request(addr).body(Default::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    hold.await.unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(
        res.headers()["proxy-status"],
        "gw; error=http_response_timeout"
    );
}

#[tokio::test(start_paused = true)]
async fn grpc_caller_gets_deadline_exceeded_after_its_timeout() {
    let (addr, seen) = support::hanging_upstream().await;
    let gateway = ServiceBuilder::new()
        .layer(MapFaultsLayer::new())
        .layer(DeadlineLayer::new(Duration::from_secs(5)))
        .layer(AttemptTimeoutLayer::new(Duration::from_secs(10)))
        .service(support::client());
    let hold = support::hold_clock_until_seen(seen);
    let req = support::request(addr)
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "100m")
        .body(Default::default())
        .unwrap();
    let start = Instant::now();
    let res = gateway.oneshot(req).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    let upstream = hold.await.unwrap();
    assert_eq!(upstream["grpc-timeout"], "100000u");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["grpc-status"], "4");
}
