//! `MapFaults` on the happy path against the bare inner service, in one group.
//!
//! Inner service: `service_fn` returning a ready `Response<()>`; request `Request<()>`;
//! loop `ready().await` + `call(req).await` on a current-thread runtime. Read the ratio to
//! `bare`, not the absolute times: this machine is noisy.

use std::convert::Infallible;
use std::future::Ready;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use tokio::runtime::Runtime;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_upstream::map_faults::MapFaultsLayer;

type Inner = tower::util::ServiceFn<fn(Request<()>) -> Ready<Result<Response<()>, Infallible>>>;

fn inner() -> Inner {
    fn answer(_req: Request<()>) -> Ready<Result<Response<()>, Infallible>> {
        std::future::ready(Ok(Response::new(())))
    }
    service_fn(answer as fn(_) -> _)
}

/// Runs `iters` requests through `svc` and returns the time they took.
fn run<S>(rt: &Runtime, mut svc: S, iters: u64) -> Duration
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let res = svc.ready().await.unwrap().call(Request::new(())).await;
            std::hint::black_box(res.unwrap());
        }
        start.elapsed()
    })
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("map_faults");
    group.bench_function("bare", |b| b.iter_custom(|iters| run(&rt, inner(), iters)));
    group.bench_function("map_faults", |b| {
        let layer = MapFaultsLayer::new();
        b.iter_custom(|iters| run(&rt, layer.layer(inner()), iters))
    });
    group.bench_function("map_faults_named_gateway", |b| {
        let layer = MapFaultsLayer::builder()
            .gateway_name(String::from("edge-gw"))
            .build()
            .unwrap();
        b.iter_custom(|iters| run(&rt, layer.layer(inner()), iters))
    });
    group.finish();

    // 64 tasks sharing clones of one service, 1 worker vs 2: does it scale?
    let mut group = c.benchmark_group("map_faults_contention");
    for workers in [1, 2] {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .unwrap();
        group.bench_function(format!("bare/{workers}w"), |b| {
            b.iter_custom(|iters| run_shared(&rt, inner(), iters))
        });
        group.bench_function(format!("map_faults/{workers}w"), |b| {
            let layer = MapFaultsLayer::new();
            b.iter_custom(|iters| run_shared(&rt, layer.layer(inner()), iters))
        });
    }
    group.finish();
}

/// Runs `iters` requests spread over 64 tasks, each with a clone of `svc`.
fn run_shared<S>(rt: &Runtime, svc: S, iters: u64) -> Duration
where
    S: Service<Request<()>> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: std::fmt::Debug,
{
    const TASKS: u64 = 64;
    let per_task = iters.div_ceil(TASKS);
    rt.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let mut svc = svc.clone();
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        let res = svc.ready().await.unwrap().call(Request::new(())).await;
                        std::hint::black_box(res.unwrap());
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        start.elapsed()
    })
}

criterion_group!(benches, bench);
criterion_main!(benches);
