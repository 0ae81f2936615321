//! Circuit breaker overhead: the bare service and the breaker (closed) in one group, so every
//! figure reads as a ratio to the floor; and 64 tasks sharing one instance on 1 and 2 workers.
//!
//! Run briefly on a shared machine:
//! `cargo bench --bench breaker -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response, Uri};
use tokio::time::Instant;
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_upstream::breaker::CircuitBreakerLayer;

const TASKS: u64 = 64;

/// A request to an upstream with an authority (so the keyed breaker really looks its key
/// up); the URI is parsed once, a clone of it is cheap.
fn request() -> Request<()> {
    static URI: std::sync::OnceLock<Uri> = std::sync::OnceLock::new();
    let mut req = Request::new(());
    *req.uri_mut() = URI
        .get_or_init(|| Uri::from_static("http://upstream.internal/"))
        .clone();
    req
}

fn bare() -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Response<()>, BoxError>> + Send,
> + Clone
       + Send
       + 'static {
    service_fn(|_req: Request<()>| async { Ok::<_, BoxError>(Response::new(())) })
}

async fn drive<S>(svc: &mut S, iters: u64)
where
    S: Service<Request<()>, Response = Response<()>>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..iters {
        let resp = svc.ready().await.unwrap().call(request()).await.unwrap();
        black_box(resp);
    }
}

fn single_task(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let keyed = CircuitBreakerLayer::new();
    let single = CircuitBreakerLayer::builder().single().build().unwrap();
    let counted = CircuitBreakerLayer::builder()
        .count_window(100)
        .build()
        .unwrap();

    let mut g = c.benchmark_group("breaker");
    g.bench_function("bare", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut svc = bare();
            let start = Instant::now();
            drive(&mut svc, iters).await;
            start.elapsed()
        })
    });
    for (name, layer) in [
        ("closed_keyed", &keyed),
        ("closed_single", &single),
        ("closed_count_window", &counted),
    ] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let mut svc = layer.layer(bare());
                async move {
                    let start = Instant::now();
                    drive(&mut svc, iters).await;
                    start.elapsed()
                }
            })
        });
    }
    g.finish();
}

/// 64 tasks share one instance (clones of one service); reports time per call, so
/// throughput(2 workers) / throughput(1 worker) = time(1) / time(2).
fn contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker_contention");
    for workers in [1usize, 2] {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .unwrap();
        let layer = CircuitBreakerLayer::new();
        g.bench_function(format!("bare/{workers}"), |b| {
            b.iter_custom(|iters| rt.block_on(run_tasks(bare(), iters, false)))
        });
        g.bench_function(format!("closed_keyed/{workers}"), |b| {
            b.iter_custom(|iters| rt.block_on(run_tasks(layer.layer(bare()), iters, false)))
        });
        // A clone per request, as a server makes.
        g.bench_function(format!("closed_keyed_clone_per_request/{workers}"), |b| {
            b.iter_custom(|iters| rt.block_on(run_tasks(layer.layer(bare()), iters, true)))
        });
    }
    g.finish();
}

async fn run_tasks<S>(svc: S, iters: u64, clone_per_request: bool) -> Duration
where
    S: Service<Request<()>, Response = Response<()>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
    S::Future: Send,
{
    let per_task = iters.div_ceil(TASKS);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let mut svc = svc.clone();
        tasks.spawn(async move {
            if clone_per_request {
                for _ in 0..per_task {
                    black_box(svc.clone().oneshot(request()).await.unwrap());
                }
            } else {
                drive(&mut svc, per_task).await
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    start.elapsed()
}

criterion_group!(benches, single_task, contention);
criterion_main!(benches);
