//! tower-upstream's breaker (closed) against failsafe's and tower-resilience's, in one
//! criterion group with the bare service, single task on a current_thread runtime.
//!
//! `cargo bench --bench compare -- --warm-up-time 1 --measurement-time 3`

use std::future::Future;
use std::hint::black_box;
use std::task::{Context, Poll};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response, Uri};
use tokio::time::Instant;
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};

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
    Future = impl Future<Output = Result<Response<()>, BoxError>> + Send,
> + Clone
       + Send
       + 'static {
    service_fn(|_req: Request<()>| async { Ok::<_, BoxError>(Response::new(())) })
}

/// failsafe has no tower layer: the smallest honest wrapper around its futures API.
#[derive(Clone)]
struct Failsafe<S, B> {
    inner: S,
    breaker: B,
}

impl<S, B> Service<Request<()>> for Failsafe<S, B>
where
    S: Service<Request<()>>,
    B: failsafe::futures::CircuitBreaker,
{
    type Response = S::Response;
    type Error = failsafe::Error<S::Error>;
    type Future = failsafe::futures::ResponseFuture<
        S::Future,
        B::FailurePolicy,
        B::Instrument,
        failsafe::Any,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(failsafe::Error::Inner)
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        self.breaker.call(self.inner.call(req))
    }
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

macro_rules! bench {
    ($g:expr, $rt:expr, $name:expr, $make:expr) => {
        $g.bench_function($name, |b| {
            b.to_async(&$rt).iter_custom(|iters| {
                let mut svc = $make;
                async move {
                    let start = Instant::now();
                    drive(&mut svc, iters).await;
                    start.elapsed()
                }
            })
        });
    };
}

fn compare(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ours = tower_upstream::CircuitBreakerLayer::new();
    let ours_single = tower_upstream::CircuitBreakerLayer::builder()
        .single()
        .build()
        .unwrap();
    let failsafe_sm = failsafe::Config::new().build();
    let resilience = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .build()
        .unwrap();

    let mut g = c.benchmark_group("breaker_compare");
    bench!(g, rt, "bare", bare());
    bench!(g, rt, "tower_upstream_keyed", ours.layer(bare()));
    bench!(g, rt, "tower_upstream_single", ours_single.layer(bare()));
    bench!(
        g,
        rt,
        "failsafe",
        Failsafe {
            inner: bare(),
            breaker: failsafe_sm.clone()
        }
    );
    bench!(g, rt, "tower_resilience", resilience.layer(bare()));
    g.finish();
}

criterion_group!(benches, compare);
criterion_main!(benches);
