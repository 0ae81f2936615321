//! The breaker opening and recovering, with transitions logged.
//!
//! `cargo run --example breaker`

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_upstream::breaker::CircuitBreakerLayer;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt().with_target(false).init();

    let healthy = Arc::new(AtomicBool::new(false));
    let upstream = {
        let healthy = healthy.clone();
        service_fn(move |_req: http::Request<()>| {
            let status = if healthy.load(Ordering::Relaxed) {
                200
            } else {
                503
            };
            async move { Ok::<_, BoxError>(http::Response::builder().status(status).body(())?) }
        })
    };
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(3)
        .open_duration(Duration::from_millis(500))
        .on_transition(|t| {
            println!(
                "listener: {} {} -> {} ({})",
                t.key(),
                t.from(),
                t.to(),
                t.reason()
            )
        })
        .build()?;
    let handle = layer.handle();
    let mut svc = layer.layer(upstream);

    for i in 0..12 {
        if i == 6 {
            println!("-- upstream recovers");
            healthy.store(true, Ordering::Relaxed);
        }
        let req = http::Request::get("http://api.internal/").body(())?;
        match svc.ready().await?.call(req).await {
            Ok(resp) => println!("call {i}: upstream answered {}", resp.status()),
            Err(e) => println!("call {i}: refused: {e}"),
        }
        let snap = handle.snapshot("api.internal").expect("breaker exists");
        println!(
            "         state={} calls={} failures={} next probe in {:?}",
            snap.state(),
            snap.calls(),
            snap.failures(),
            snap.time_until_probe()
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    Ok(())
}
