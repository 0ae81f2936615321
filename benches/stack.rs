//! The full default stack from `Upstream::builder()` on the happy path, next to the bare
//! service and tower's `Timeout` + `Retry` + `TpsBudget`, in one group.
//!
//! Inner service: `service_fn` returning a ready `Response<()>`; loop `ready().await` +
//! `call(req).await` on a current-thread runtime, as in `benches/map_faults.rs`. Read the
//! ratios to `bare`, not the absolute times. Run briefly with
//! `cargo bench --bench stack -- --warm-up-time 1 --measurement-time 3`.

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::Request;
use http_body_util::Empty;
use tower::{Layer, ServiceBuilder};
use tower_upstream::retry::ReplayBody;
use tower_upstream::Upstream;

mod common;
use common::{client_like, inner, later, shared_service, timed, tower_policy};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // GET /, no URI parsing in the loop.
    let unit = || Request::new(());
    let empty = || Request::new(Empty::<Bytes>::new());

    let mut g = c.benchmark_group("stack");
    g.bench_function("bare", |b| {
        b.iter_custom(|n| rt.block_on(timed(inner::<()>(), n, unit)))
    });
    g.bench_function("tower_timeout_retry_tps", |b| {
        b.iter_custom(|n| {
            let svc = ServiceBuilder::new()
                .retry(tower_policy())
                .timeout(Duration::from_secs(10))
                .service(inner::<()>());
            rt.block_on(timed(svc, n, unit))
        })
    });
    let layer = Upstream::builder().build().unwrap();
    g.bench_function("upstream_default", |b| {
        b.iter_custom(|n| {
            let svc = layer.layer(inner::<ReplayBody<Empty<Bytes>>>());
            rt.block_on(timed(svc, n, empty))
        })
    });
    // Ours doing what tower's three do (a retry within a budget, a timeout), and no more.
    let like_tower = Upstream::builder()
        .no_deadline()
        .no_breaker()
        .build()
        .unwrap();
    g.bench_function("upstream_like_tower", |b| {
        b.iter_custom(|n| {
            let svc = like_tower.layer(inner::<ReplayBody<Empty<Bytes>>>());
            rt.block_on(timed(svc, n, empty))
        })
    });
    let limited = Upstream::builder().concurrency_limit(1024).build().unwrap();
    g.bench_function("upstream_default_with_limit", |b| {
        b.iter_custom(|n| {
            let svc = limited.layer(inner::<ReplayBody<Empty<Bytes>>>());
            rt.block_on(timed(svc, n, empty))
        })
    });
    g.finish();

    // Where the time goes: the default stack with one part off.
    let mut g = c.benchmark_group("stack_parts");
    let variants: [(&str, tower_upstream::UpstreamLayer); 5] = [
        (
            "no_deadline",
            Upstream::builder().no_deadline().build().unwrap(),
        ),
        ("no_retry", Upstream::builder().no_retry().build().unwrap()),
        (
            "no_breaker",
            Upstream::builder().no_breaker().build().unwrap(),
        ),
        (
            "no_attempt_timeout",
            Upstream::builder().no_attempt_timeout().build().unwrap(),
        ),
        (
            "map_faults_only",
            Upstream::builder()
                .no_deadline()
                .no_retry()
                .no_breaker()
                .no_attempt_timeout()
                .build()
                .unwrap(),
        ),
    ];
    for (name, layer) in variants {
        g.bench_function(name, |b| {
            b.iter_custom(|n| {
                let svc = layer.layer(inner::<ReplayBody<Empty<Bytes>>>());
                rt.block_on(timed(svc, n, empty))
            })
        });
    }
    g.finish();
}

/// The stack shared by 64 tasks on one and on two worker threads: what a second core buys.
/// `bare` scales (about 1.8x on this kind of machine); shared counters written on every
/// request would not. `upstream_default_clone_per_request` clones the service for every
/// request, as a server handing each request to `svc.clone().oneshot(req)` does. The
/// `client_like` variants wrap a service whose clone writes a shared count (as a hyper
/// client's or a tonic channel's does): tower's `Retry` clones it into every request's
/// future, the stack only into a request that comes to a second attempt. The `later`
/// variants wrap a service that answers on its future's second poll, as an upstream does,
/// so that the timers are set (with `inner`, the answer is ready before any timer is).
fn contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("stack_contention");
    for workers in [1usize, 2] {
        g.bench_function(format!("bare/{workers}w"), |b| {
            b.iter_custom(|n| shared_service(workers, n, inner::<()>(), || Request::new(()), false))
        });
        g.bench_function(format!("tower_timeout_retry_tps/{workers}w"), |b| {
            b.iter_custom(|n| {
                let svc = ServiceBuilder::new()
                    .retry(tower_policy())
                    .timeout(Duration::from_secs(10))
                    .service(inner::<()>());
                shared_service(workers, n, svc, || Request::new(()), false)
            })
        });
        let layer = Upstream::builder().build().unwrap();
        g.bench_function(format!("upstream_default/{workers}w"), |b| {
            b.iter_custom(|n| {
                let svc = layer.layer(inner::<ReplayBody<Empty<Bytes>>>());
                shared_service(workers, n, svc, || Request::new(Empty::new()), false)
            })
        });
        g.bench_function(
            format!("upstream_default_clone_per_request/{workers}w"),
            |b| {
                b.iter_custom(|n| {
                    let svc = layer.layer(inner::<ReplayBody<Empty<Bytes>>>());
                    shared_service(workers, n, svc, || Request::new(Empty::new()), true)
                })
            },
        );
        g.bench_function(format!("bare_client_like/{workers}w"), |b| {
            b.iter_custom(|n| {
                shared_service(workers, n, client_like::<()>(), || Request::new(()), false)
            })
        });
        g.bench_function(
            format!("tower_timeout_retry_tps_client_like/{workers}w"),
            |b| {
                b.iter_custom(|n| {
                    let svc = ServiceBuilder::new()
                        .retry(tower_policy())
                        .timeout(Duration::from_secs(10))
                        .service(client_like::<()>());
                    shared_service(workers, n, svc, || Request::new(()), false)
                })
            },
        );
        g.bench_function(format!("upstream_default_client_like/{workers}w"), |b| {
            b.iter_custom(|n| {
                let svc = layer.layer(client_like::<ReplayBody<Empty<Bytes>>>());
                shared_service(workers, n, svc, || Request::new(Empty::new()), false)
            })
        });
        g.bench_function(format!("bare_later/{workers}w"), |b| {
            b.iter_custom(|n| shared_service(workers, n, later::<()>(), || Request::new(()), false))
        });
        g.bench_function(format!("tower_timeout_retry_tps_later/{workers}w"), |b| {
            b.iter_custom(|n| {
                let svc = ServiceBuilder::new()
                    .retry(tower_policy())
                    .timeout(Duration::from_secs(10))
                    .service(later::<()>());
                shared_service(workers, n, svc, || Request::new(()), false)
            })
        });
        g.bench_function(format!("upstream_default_later/{workers}w"), |b| {
            b.iter_custom(|n| {
                let svc = layer.layer(later::<ReplayBody<Empty<Bytes>>>());
                shared_service(workers, n, svc, || Request::new(Empty::new()), false)
            })
        });
        let limited = Upstream::builder().concurrency_limit(4096).build().unwrap();
        g.bench_function(
            format!("upstream_with_limit_clone_per_request/{workers}w"),
            |b| {
                b.iter_custom(|n| {
                    let svc = limited.layer(inner::<ReplayBody<Empty<Bytes>>>());
                    shared_service(workers, n, svc, || Request::new(Empty::new()), true)
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench, contention);
criterion_main!(benches);
