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

/// Runs `iters` sequential `ready().await` + `call(req).await` on one service.
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
