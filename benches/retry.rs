//! Retry benches: the happy path (first attempt succeeds) next to the bare service and tower's
//! `Retry` + `TpsBudget`, and budget deposit/withdraw under contention (1 vs 2 workers).
//!
//! Read ratios, not absolute times. Run briefly with
//! `cargo bench --bench retry -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::Request;
use http_body_util::{Empty, Full};
use tower::retry::budget::{Budget, TpsBudget};
use tower::Layer;
use tower_upstream::retry::ReplayBody;
use tower_upstream::{RetryBudget, RetryLayer};

mod common;
use common::{inner, shared_service, spread, timed, tower_policy};

fn happy_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let layer = RetryLayer::new();
    // Requests as PERFORMANCE.md's: `Request::new` (GET /), no URI parsing in the loop.
    let unit = || Request::new(());
    let full = || {
        let mut req = Request::new(Full::new(Bytes::from_static(b"{\"id\":1}")));
        *req.method_mut() = http::Method::POST;
        req
    };
    let empty = || Request::new(Empty::<Bytes>::new());

    let mut g = c.benchmark_group("retry");
    g.bench_function("bare", |b| {
        b.iter_custom(|n| rt.block_on(timed(inner::<()>(), n, unit)))
    });
    g.bench_function("tower_retry_tps", |b| {
        b.iter_custom(|n| {
            let svc = tower::retry::Retry::new(tower_policy(), inner::<()>());
            rt.block_on(timed(svc, n, unit))
        })
    });
    g.bench_function("upstream_retry", |b| {
        b.iter_custom(|n| {
            let svc = layer.layer(inner::<ReplayBody<Empty<Bytes>>>());
            rt.block_on(timed(svc, n, empty))
        })
    });
    g.bench_function("bare/body", |b| {
        b.iter_custom(|n| rt.block_on(timed(inner::<Full<Bytes>>(), n, full)))
    });
    g.bench_function("tower_retry_tps/body", |b| {
        b.iter_custom(|n| {
            let svc = tower::retry::Retry::new(tower_policy(), inner::<Full<Bytes>>());
            rt.block_on(timed(svc, n, full))
        })
    });
    g.bench_function("upstream_retry/body", |b| {
        b.iter_custom(|n| {
            let svc = layer.layer(inner::<ReplayBody<Full<Bytes>>>());
            rt.block_on(timed(svc, n, full))
        })
    });
    g.finish();
}

/// Runs `iters` operations spread over 64 tasks on a runtime with `workers` threads.
fn contended<F>(workers: usize, iters: u64, op: F) -> Duration
where
    F: Fn(u64) + Clone + Send + 'static,
{
    spread(workers, iters, |n| {
        let op = op.clone();
        async move {
            for i in 0..n {
                op(i);
                if i % 64 == 63 {
                    tokio::task::yield_now().await;
                }
            }
        }
    })
}

fn budget_contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("retry_budget_contention");
    for workers in [1usize, 2] {
        // One in ten requests fails and withdraws, the others deposit.
        g.bench_function(format!("upstream_budget/{workers}w"), |b| {
            b.iter_custom(|n| {
                let budget = RetryBudget::default();
                contended(workers, n, move |i| {
                    if i % 10 == 9 {
                        black_box(budget.withdraw());
                    } else {
                        budget.deposit();
                    }
                })
            })
        });
        // Healthy traffic: every request deposits, none withdraws.
        g.bench_function(format!("upstream_budget_deposit_only/{workers}w"), |b| {
            b.iter_custom(|n| {
                let budget = RetryBudget::default();
                contended(workers, n, move |_| budget.deposit())
            })
        });
        g.bench_function(format!("tower_tps_budget_deposit_only/{workers}w"), |b| {
            b.iter_custom(|n| {
                let budget = Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2));
                contended(workers, n, move |_| budget.deposit())
            })
        });
        g.bench_function(format!("tower_tps_budget/{workers}w"), |b| {
            b.iter_custom(|n| {
                let budget = Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2));
                contended(workers, n, move |i| {
                    if i % 10 == 9 {
                        black_box(budget.withdraw());
                    } else {
                        budget.deposit();
                    }
                })
            })
        });
    }
    g.finish();
}

/// The whole service shared by 64 tasks: bare, tower's Retry + TpsBudget, ours.
fn service_contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("retry_service_contention");
    for workers in [1usize, 2] {
        g.bench_function(format!("bare/{workers}w"), |b| {
            b.iter_custom(|n| shared_service(workers, n, inner::<()>(), || Request::new(()), false))
        });
        g.bench_function(format!("tower_retry_tps/{workers}w"), |b| {
            b.iter_custom(|n| {
                let svc = tower::retry::Retry::new(tower_policy(), inner::<()>());
                shared_service(workers, n, svc, || Request::new(()), false)
            })
        });
        g.bench_function(format!("upstream_retry/{workers}w"), |b| {
            b.iter_custom(|n| {
                let svc = RetryLayer::new().layer(inner::<ReplayBody<Empty<Bytes>>>());
                shared_service(workers, n, svc, || Request::new(Empty::new()), false)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, happy_path, budget_contention, service_contention);
criterion_main!(benches);
