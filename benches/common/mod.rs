//! What the benches share: the inner service (the floor), tower's retry policy and the
//! request loop.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::Arc;
use std::time::Duration;

use std::hint::black_box;

use http::{Request, Response};
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Service, ServiceExt};

/// tower's `Retry` policy as its docs show it: deposit on success, withdraw on failure;
/// never retries here (the inner service always succeeds) but clones the request.
#[derive(Clone)]
#[allow(dead_code)] // not every bench uses it
pub(crate) struct TowerPolicy {
    budget: Arc<TpsBudget>,
}

impl<Req: Clone, Res, E> tower::retry::Policy<Req, Res, E> for TowerPolicy {
    type Future = Ready<()>;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                self.budget.deposit();
                None
            }
            Err(_) => self.budget.withdraw().then(|| ready(())),
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// tower's policy with a `TpsBudget` like our default budget (10 s, 10/s, 20 %).
#[allow(dead_code)] // not every bench uses it
pub(crate) fn tower_policy() -> TowerPolicy {
    TowerPolicy {
        budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
    }
}

/// The bare inner service: a ready `Response<()>`.
pub(crate) fn inner<B>(
) -> impl Service<Request<B>, Response = Response<()>, Error = Infallible, Future: Send> + Clone + Send
{
    tower::service_fn(|_req: Request<B>| ready(Ok::<_, Infallible>(Response::new(()))))
}

/// [`inner`] holding a reference-counted handle, as a hyper client or a tonic channel does:
/// each clone writes a count that every clone on every core shares.
#[allow(dead_code)] // not every bench uses it
pub(crate) fn client_like<B>(
) -> impl Service<Request<B>, Response = Response<()>, Error = Infallible, Future: Send> + Clone + Send
{
    let pool = std::sync::Arc::new(());
    tower::service_fn(move |_req: Request<B>| {
        black_box(&pool);
        ready(Ok::<_, Infallible>(Response::new(())))
    })
}

/// [`inner`] whose answer comes on the future's second poll (it wakes its task and yields
/// once), as an upstream's does: a timed layer's timer is set, unlike with [`inner`], whose
/// future is ready at once.
#[allow(dead_code)] // not every bench uses it
pub(crate) fn later<B>(
) -> impl Service<Request<B>, Response = Response<()>, Error = Infallible, Future: Send> + Clone + Send
{
    tower::service_fn(|_req: Request<B>| {
        let mut yielded = false;
        std::future::poll_fn(move |cx| {
            if std::mem::replace(&mut yielded, true) {
                std::task::Poll::Ready(Ok::<_, Infallible>(Response::new(())))
            } else {
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            }
        })
    })
}

/// Runs `iters` sequential `ready().await` + `call(req).await` on one service.
#[allow(dead_code)] // not every bench uses it
pub(crate) async fn drive<S, B>(mut svc: S, iters: u64, make: impl Fn() -> Request<B>)
where
    S: Service<Request<B>>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..iters {
        let rsp = svc.ready().await.unwrap().call(make()).await.unwrap();
        black_box(rsp);
    }
}

/// [`drive`], timed (for criterion's `iter_custom`).
#[allow(dead_code)] // not every bench times its loop itself
pub(crate) async fn timed<S, B>(svc: S, iters: u64, make: impl Fn() -> Request<B>) -> Duration
where
    S: Service<Request<B>>,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    drive(svc, iters, make).await;
    start.elapsed()
}

/// How many tasks share one service in the contention benches.
#[allow(dead_code)] // not every bench has a contention group
pub(crate) const TASKS: u64 = 64;

/// Spawns [`TASKS`] tasks on a runtime with `workers` threads, each running
/// `task(per_task)` with `iters` split evenly between them; returns the time they all took.
#[allow(dead_code)] // not every bench has a contention group
pub(crate) fn spread<F, Fut>(workers: usize, iters: u64, task: F) -> Duration
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let per_task = iters.div_ceil(TASKS);
        let start = Instant::now();
        let tasks: Vec<_> = (0..TASKS).map(|_| tokio::spawn(task(per_task))).collect();
        for t in tasks {
            t.await.unwrap();
        }
        start.elapsed()
    })
}

/// Runs `iters` requests spread over [`TASKS`] tasks on a runtime with `workers` threads,
/// all through clones of `svc`: each task clones it once (`per_request == false`), or
/// clones it for every request and calls the clone once, as a server that hands every
/// connection's request to `svc.clone().oneshot(req)` does (`per_request == true`).
#[allow(dead_code)] // not every bench has a contention group
pub(crate) fn shared_service<S, B>(
    workers: usize,
    iters: u64,
    svc: S,
    make: fn() -> Request<B>,
    per_request: bool,
) -> Duration
where
    S: Service<Request<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    S::Response: Send,
    B: Send + 'static,
{
    spread(workers, iters, |n| {
        let mut svc = svc.clone();
        async move {
            for i in 0..n {
                let rsp = if per_request {
                    svc.clone().oneshot(make()).await.unwrap()
                } else {
                    svc.ready().await.unwrap().call(make()).await.unwrap()
                };
                black_box(rsp);
                if i % 64 == 63 {
                    tokio::task::yield_now().await;
                }
            }
        }
    })
}
