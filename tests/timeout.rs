//! The attempt timeout and the response-body idle timeout.

#[path = "support/upstreams.rs"]
mod support;

use std::future::pending;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::time::Instant;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_upstream::deadline::DeadlineExceeded;
use tower_upstream::fault::{classify, Fault, Sent};
use tower_upstream::timeout::body::TimeoutBody;
use tower_upstream::timeout::error::Elapsed;
use tower_upstream::timeout::{future::ResponseFuture, ResponseBodyTimeoutLayer};
use tower_upstream::{AttemptTimeout, AttemptTimeoutLayer, DeadlineLayer, RequestDeadline};

#[allow(dead_code)]
fn assert_types() {
    type Inner = tower::util::BoxCloneSyncService<Request<()>, Response<()>, BoxError>;
    support::assert_send_sync::<AttemptTimeout<Inner>>();
    support::assert_send_sync::<AttemptTimeoutLayer>();
    support::assert_send_sync::<ResponseFuture<std::future::Ready<Result<(), BoxError>>>>();
    support::assert_send_sync::<tower_upstream::timeout::ResponseBodyTimeout<Inner>>();
    support::assert_send_sync::<TimeoutBody<http_body_util::Full<Bytes>>>();
}

fn hang() -> impl Service<Request<()>, Response = Response<()>, Error = BoxError> + Clone {
    service_fn(|_: Request<()>| pending::<Result<Response<()>, BoxError>>())
}

fn with_deadline(after: Duration) -> Request<()> {
    let mut req = Request::builder()
        .header("content-type", "application/grpc+proto")
        .body(())
        .unwrap();
    req.extensions_mut().insert(RequestDeadline::after(after));
    req
}

#[tokio::test(start_paused = true)]
async fn elapsed_at_the_per_attempt_time() {
    let start = Instant::now();
    let err = AttemptTimeout::new(hang(), Duration::from_millis(250))
        .oneshot(Request::new(()))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(250));
    assert!(err.is::<Elapsed>());
    let c = classify(&*err);
    assert_eq!(
        (c.fault(), c.sent()),
        (Fault::HttpResponseTimeout, Sent::MaybeProcessed)
    );
}

#[tokio::test(start_paused = true)]
async fn uses_the_smaller_of_attempt_and_remaining() {
    // The deadline is nearer: it is what runs out.
    let start = Instant::now();
    let err = AttemptTimeout::new(hang(), Duration::from_secs(1))
        .oneshot(with_deadline(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(
        err.downcast_ref::<DeadlineExceeded>(),
        Some(&DeadlineExceeded::in_flight())
    );
    assert_eq!(classify(&*err).fault(), Fault::HttpResponseTimeout);

    // The attempt is shorter: Elapsed.
    let start = Instant::now();
    let err = AttemptTimeout::new(hang(), Duration::from_millis(200))
        .oneshot(with_deadline(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(200));
    assert!(err.is::<Elapsed>());
}

#[tokio::test(start_paused = true)]
async fn spent_deadline_fails_without_calling_inner() {
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = {
        let calls = calls.clone();
        service_fn(move |_: Request<()>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>(Response::new(())) }
        })
    };
    let mut req = Request::new(());
    req.extensions_mut()
        .insert(RequestDeadline::at(Instant::now()));
    let err = AttemptTimeout::new(inner, Duration::from_secs(1))
        .oneshot(req)
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<DeadlineExceeded>(),
        Some(&DeadlineExceeded::before_start())
    );
    assert_eq!(classify(&*err).sent(), Sent::NotSent);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn grpc_requests_carry_the_attempts_limit() {
    let seen: Arc<Mutex<Option<HeaderMap>>> = Arc::default();
    let inner = {
        let seen = seen.clone();
        service_fn(move |req: Request<()>| {
            *seen.lock().unwrap() = Some(req.headers().clone());
            async { Ok::<_, BoxError>(Response::new(())) }
        })
    };
    let grpc_timeout = |layer: AttemptTimeoutLayer, req: Request<()>| {
        let svc = layer.layer(inner.clone());
        let seen = seen.clone();
        async move {
            svc.oneshot(req).await.unwrap();
            let headers = seen.lock().unwrap().take().unwrap();
            headers
                .get("grpc-timeout")
                .map(|v| v.to_str().unwrap().to_owned())
        }
    };
    use tower::Layer;
    let attempt = AttemptTimeoutLayer::new(Duration::from_millis(250));
    assert_eq!(
        grpc_timeout(attempt.clone(), with_deadline(Duration::from_secs(5))).await,
        Some("250000u".into())
    );
    assert_eq!(
        grpc_timeout(attempt.clone(), with_deadline(Duration::from_millis(50))).await,
        Some("50000000n".into())
    );
    // A caller's tighter grpc-timeout is kept; a looser one is replaced.
    let mut req = with_deadline(Duration::from_secs(5));
    req.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("100m"));
    assert_eq!(
        grpc_timeout(attempt.clone(), req).await,
        Some("100m".into())
    );
    let mut req = with_deadline(Duration::from_secs(5));
    req.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("1M"));
    assert_eq!(
        grpc_timeout(attempt.clone(), req).await,
        Some("250000u".into())
    );
    // Not gRPC: no header.
    assert_eq!(grpc_timeout(attempt, Request::new(())).await, None);
    // Turned off.
    let quiet = AttemptTimeoutLayer::builder()
        .timeout(Duration::from_secs(1))
        .propagate(false)
        .build()
        .unwrap();
    assert_eq!(
        grpc_timeout(quiet, with_deadline(Duration::from_secs(5))).await,
        None
    );
}

#[tokio::test(start_paused = true)]
async fn inner_errors_pass_through_unchanged() {
    let svc = AttemptTimeout::new(
        service_fn(|_: Request<()>| async {
            Err::<Response<()>, _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
        }),
        Duration::from_secs(1),
    );
    let err = svc.oneshot(Request::new(())).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<std::io::Error>().map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionRefused)
    );
}

// Real sockets.

#[tokio::test(start_paused = true)]
async fn silent_upstream_times_out_at_the_configured_time() {
    let addr = support::silent_listener().await;
    let svc = ServiceBuilder::new()
        .layer(AttemptTimeoutLayer::new(Duration::from_millis(200)))
        .service(support::client());
    let start = Instant::now();
    let err = svc
        .oneshot(support::request(addr).body(Default::default()).unwrap())
        .await
        .unwrap_err();
    let elapsed = start.elapsed();
    assert!(err.is::<Elapsed>(), "{err:?}");
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed <= Duration::from_millis(203),
        "{elapsed:?}"
    );
    assert_eq!(classify(&*err).fault(), Fault::HttpResponseTimeout);
}

#[tokio::test(start_paused = true)]
async fn hanging_hyper_upstream_times_out_after_the_request_was_sent() {
    let (addr, seen) = support::hanging_upstream().await;
    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(5)))
        .layer(AttemptTimeoutLayer::new(Duration::from_millis(400)))
        .service(support::client());
    let hold = support::hold_clock_until_seen(seen);
    let start = Instant::now();
    let err = svc
        .oneshot(support::request(addr).body(Default::default()).unwrap())
        .await
        .unwrap_err();
    let elapsed = start.elapsed();
    hold.await.unwrap();
    assert!(err.is::<Elapsed>(), "{err:?}");
    assert_eq!(elapsed, Duration::from_millis(400));
    let c = classify(&*err);
    assert_eq!(
        (c.fault(), c.sent()),
        (Fault::HttpResponseTimeout, Sent::MaybeProcessed)
    );
}

/// hyper-util's own connect timeout stays `connection_timeout` (not sent) when it comes out
/// of the deadline and attempt-timeout layers.
#[tokio::test(start_paused = true)]
async fn connect_timeout_still_classifies_through_the_layers() {
    // A listener whose accept queue is full: the kernel drops further SYNs, so a connect
    // hangs until the connector's timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(Duration::from_millis(10), connect).await {
            Ok(stream) => fillers.push(stream.unwrap()),
            Err(_) => break, // the queue is full
        }
    }

    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_millis(50)));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Empty<Bytes>>(connector);
    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(5)))
        .layer(AttemptTimeoutLayer::new(Duration::from_secs(1)))
        .service(client);
    let start = Instant::now();
    let err = svc
        .oneshot(support::request(addr).body(Default::default()).unwrap())
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(50), "{err:?}");
    let c = classify(&*err);
    assert_eq!(
        (c.fault(), c.sent()),
        (Fault::ConnectionTimeout, Sent::NotSent),
        "{err:?}"
    );
    drop((fillers, listener));
}

/// A resolver that times out (as a user's resolver with its own timeout does) stays
/// `dns_timeout` (not sent) through the layers.
#[tokio::test(start_paused = true)]
async fn dns_timeout_still_classifies_through_the_layers() {
    use hyper_util::client::legacy::connect::dns::Name;
    let resolver = service_fn(|_: Name| async {
        tokio::time::timeout(Duration::from_millis(50), pending::<()>()).await?;
        Ok::<_, BoxError>(std::iter::empty::<std::net::SocketAddr>())
    });
    let connector = hyper_util::client::legacy::connect::HttpConnector::new_with_resolver(resolver);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Empty<Bytes>>(connector);
    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(5)))
        .layer(AttemptTimeoutLayer::new(Duration::from_secs(1)))
        .service(client);
    let start = Instant::now();
    let req = Request::builder()
        .uri("http://upstream.invalid/")
        .body(Default::default())
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(50), "{err:?}");
    let c = classify(&*err);
    assert_eq!(
        (c.fault(), c.sent()),
        (Fault::DnsTimeout, Sent::NotSent),
        "{err:?}"
    );
}

// The response-body idle timeout.

type Frames = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send>,
>;

/// A body that sends a frame after each of `gaps`, then ends (or stalls, if `stall`).
fn slow_body(gaps: &'static [u64], stall: bool) -> StreamBody<Frames> {
    let frames = futures_util::stream::iter(gaps).then(|gap| async move {
        tokio::time::sleep(Duration::from_millis(*gap)).await;
        Ok(Frame::data(Bytes::from_static(b"x")))
    });
    let frames: Frames = if stall {
        Box::pin(frames.chain(futures_util::stream::pending()))
    } else {
        Box::pin(frames)
    };
    StreamBody::new(frames)
}

#[tokio::test(start_paused = true)]
async fn body_frames_in_time_reset_the_idle_timer() {
    let svc = ServiceBuilder::new()
        .layer(ResponseBodyTimeoutLayer::new(Duration::from_secs(1)))
        .service(service_fn(|_: Request<()>| async {
            Ok::<_, BoxError>(Response::new(slow_body(&[900, 900, 900], false)))
        }));
    let body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    let collected = body.collect().await.unwrap().to_bytes();
    assert_eq!(collected, "xxx");
}

#[tokio::test(start_paused = true)]
async fn idle_body_fails_instead_of_ending() {
    let svc = ServiceBuilder::new()
        .layer(ResponseBodyTimeoutLayer::new(Duration::from_secs(1)))
        .service(service_fn(|_: Request<()>| async {
            Ok::<_, BoxError>(Response::new(slow_body(&[500], true)))
        }));
    let body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    let mut body = std::pin::pin!(body);
    let start = Instant::now();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
    assert!(err.is::<Elapsed>());
    assert!(!http_body::Body::is_end_stream(&*body));
    // It keeps failing; it never looks complete.
    assert!(body.frame().await.unwrap().is_err());
}

#[tokio::test(start_paused = true)]
async fn huge_body_idle_timeout_does_not_panic() {
    // `Duration::MAX` means "no idle limit": the body must not panic computing its timer.
    let svc = ServiceBuilder::new()
        .layer(ResponseBodyTimeoutLayer::new(Duration::MAX))
        .service(service_fn(|_: Request<()>| async {
            Ok::<_, BoxError>(Response::new(slow_body(&[500, 500], false)))
        }));
    let body = svc.oneshot(Request::new(())).await.unwrap().into_body();
    let collected = body.collect().await.unwrap().to_bytes();
    assert_eq!(collected, "xx");
}

/// A gateway connection: an HTTP/1 server whose responses have a stalling body under a 1 s
/// idle timeout.
async fn serve_stalling(stream: tokio::net::TcpStream) {
    async fn handle(
        _: Request<hyper::body::Incoming>,
    ) -> Result<Response<StreamBody<Frames>>, BoxError> {
        Ok(Response::new(slow_body(&[0], true)))
    }
    let svc = ServiceBuilder::new()
        .layer(ResponseBodyTimeoutLayer::new(Duration::from_secs(1)))
        .service_fn(handle);
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(
            hyper_util::rt::TokioIo::new(stream),
            hyper_util::service::TowerToHyperService::new(svc),
        )
        .await;
}

/// End to end: the gateway serves an upstream body that stalls; its client sees the
/// stream aborted, never a clean end.
#[tokio::test(start_paused = true)]
async fn idle_body_aborts_the_downstream_stream() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        serve_stalling(stream).await;
    });

    let res = support::client()
        .request(support::request(addr).body(Default::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let start = Instant::now();
    let err = res.into_body().collect().await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(1), "{err:?}");
    // Chunked body cut off before its terminating chunk.
    assert_eq!(
        classify(&err).fault(),
        Fault::ConnectionTerminated,
        "{err:?}"
    );
}
