//! The stack's timers over real sockets on a multi-threaded runtime. Requests on every
//! worker share one timer per thread: a request whose upstream hangs is answered 504 when
//! its attempt timeout and its deadline say, never earlier, while the requests answered
//! meanwhile, on the same threads, are untouched by the timers around them.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};
use tower_upstream::retry::ReplayBody;
use tower_upstream::Upstream;

use support::{empty, local_resolver, serve};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_two_workers_only_the_hanging_requests_time_out_and_not_early() {
    let upstream = serve(service_fn(|req: Request<Incoming>| async move {
        if req.uri().path() == "/hang" {
            std::future::pending::<()>().await;
        }
        Ok::<_, Infallible>(Response::new(empty()))
    }))
    .await;
    let client: Client<_, ReplayBody<Full<Bytes>>> = Client::builder(TokioExecutor::new())
        .build(HttpConnector::new_with_resolver(local_resolver()));
    let attempt = Duration::from_millis(200);
    let deadline = Duration::from_millis(500);
    // No breaker: the timeouts would open it, and the hanging requests would then be
    // refused (503) before any timer.
    let layer = Upstream::builder()
        .no_breaker()
        .attempt_timeout(attempt)
        .deadline(deadline)
        .build()
        .unwrap();
    let svc = layer.layer(client);
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let path = if i % 10 == 0 { "/hang" } else { "/fast" };
                let req = Request::get(format!("http://{upstream}{path}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let start = Instant::now();
                let res = svc.oneshot(req).await.unwrap();
                (path, res.status(), start.elapsed())
            })
        })
        .collect();
    let (mut hung, mut answered, mut to_deadline) = (0, 0, 0);
    for task in tasks {
        // Timers that never fired would leave a request waiting: bounded here.
        let (path, status, elapsed) = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("every request is answered")
            .unwrap();
        // Generous: a busy two-core machine may be late, never early.
        assert!(elapsed < Duration::from_secs(5), "{path} took {elapsed:?}");
        if path == "/hang" {
            hung += 1;
            assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
            // At least one attempt's timeout; the deadline cuts any retry short.
            assert!(elapsed >= attempt, "a 504 after {elapsed:?}");
            to_deadline += usize::from(elapsed >= deadline);
        } else {
            answered += 1;
            assert_eq!(status, StatusCode::OK, "{path} after {elapsed:?}");
        }
    }
    assert_eq!((hung, answered), (30, 270));
    // Those the retry budget let retry ran until the deadline (the budget allows at least
    // ten retries a second).
    assert!(to_deadline > 0);
}
