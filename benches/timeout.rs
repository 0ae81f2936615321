//! Deadline and attempt-timeout overhead, against the bare service and tower's `Timeout`, in
//! one group so every figure reads as a ratio to the floor.
//!
//! Inner service: a `tower::service_fn` returning a ready `http::Response<()>`; each
//! iteration is `ready().await` + `call(http::Request::new(())).await` on a current-thread
//! runtime. Run: `cargo bench --bench timeout -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use http::{Request, Response};
use tokio::runtime::Runtime;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_upstream::{AttemptTimeoutLayer, DeadlineLayer};

mod common;
use common::{inner, later};

fn bench<S>(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &Runtime,
    name: &str,
    make: impl Fn() -> S,
) where
    S: Service<Request<()>, Response = Response<()>>,
    S::Error: std::fmt::Debug,
{
    group.bench_function(name, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let mut svc = make();
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let svc = svc.ready().await.unwrap();
                    black_box(svc.call(black_box(Request::new(()))).await.unwrap());
                }
                start.elapsed()
            }
        })
    });
}

fn timeout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let second = Duration::from_secs(1);
    let mut group = c.benchmark_group("timeout");
    bench(&mut group, &rt, "bare", inner::<()>);
    bench(&mut group, &rt, "tower_timeout", || {
        ServiceBuilder::new().timeout(second).service(inner::<()>())
    });
    bench(&mut group, &rt, "attempt_timeout", || {
        ServiceBuilder::new()
            .layer(AttemptTimeoutLayer::new(second))
            .service(inner::<()>())
    });
    bench(&mut group, &rt, "deadline", || {
        ServiceBuilder::new()
            .layer(DeadlineLayer::new(second))
            .service(inner::<()>())
    });
    bench(&mut group, &rt, "deadline+attempt_timeout", || {
        ServiceBuilder::new()
            .layer(DeadlineLayer::new(Duration::from_secs(5)))
            .layer(AttemptTimeoutLayer::new(second))
            .service(inner::<()>())
    });
    group.finish();

    // The same around an answer that comes on a later poll: the timers are set.
    let mut group = c.benchmark_group("timeout_later");
    bench(&mut group, &rt, "bare", later::<()>);
    bench(&mut group, &rt, "tower_timeout", || {
        ServiceBuilder::new().timeout(second).service(later::<()>())
    });
    bench(&mut group, &rt, "attempt_timeout", || {
        ServiceBuilder::new()
            .layer(AttemptTimeoutLayer::new(second))
            .service(later::<()>())
    });
    bench(&mut group, &rt, "deadline+attempt_timeout", || {
        ServiceBuilder::new()
            .layer(DeadlineLayer::new(Duration::from_secs(5)))
            .layer(AttemptTimeoutLayer::new(second))
            .service(later::<()>())
    });
    group.finish();
}

criterion_group!(benches, timeout);
criterion_main!(benches);
