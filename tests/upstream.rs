//! The whole stack from `Upstream::builder()`, over real sockets on 127.0.0.1: an axum
//! proxy answering 502/503/504 for faults, one breaker shared by two routes, the
//! concurrency limit shedding, retries, a hyper-util client wrapped as an outbound client,
//! and configuration errors that name the field.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body as AxumBody;
use axum::routing::get as get_route;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::{service_fn, BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_upstream::breaker::State;
use tower_upstream::retry::ReplayBody;
use tower_upstream::{CircuitBreakerLayer, RetryBudget, RetryLayer, Upstream, UpstreamLayer};

use support::*;

type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

fn assert_send_sync<T: Send + Sync + 'static>() {}
fn assert_send<T: Send + 'static>() {}

#[test]
fn services_and_futures_are_send_sync() {
    assert_send_sync::<UpstreamLayer>();
    assert_send_sync::<Upstream<axum::routing::Route>>();
    assert_send_sync::<Upstream<TestClient>>();
    assert_send::<<Upstream<axum::routing::Route> as Service<Request<AxumBody>>>::Future>();
    // A service that is `Send` but not `Sync`: the stack keeps a copy of it for later
    // attempts, which must not make the stack or its future lose `Send`.
    type Unsync =
        tower::util::BoxCloneService<Request<ReplayBody<AxumBody>>, Response<AxumBody>, BoxError>;
    assert_send::<Upstream<Unsync>>();
    assert_send::<<Upstream<Unsync> as Service<Request<AxumBody>>>::Future>();
}

/// A proxy to `upstream`: path and query kept, through a hyper-util client.
fn proxy(
    upstream: SocketAddr,
) -> impl Service<
    Request<ReplayBody<AxumBody>>,
    Response = Response<hyper::body::Incoming>,
    Error = BoxError,
    Future: Send,
> + Clone
       + Send
       + Sync
       + 'static {
    let client: Client<_, ProxyBody> = Client::builder(TokioExecutor::new())
        .build(HttpConnector::new_with_resolver(local_resolver()));
    service_fn(move |req: Request<ReplayBody<AxumBody>>| {
        let client = client.clone();
        async move {
            let (mut parts, body) = req.into_parts();
            let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            parts.uri = Uri::try_from(format!("http://{upstream}{pq}"))?;
            parts.headers.remove(http::header::HOST);
            let req = Request::from_parts(parts, body.boxed_unsync());
            Ok::<_, BoxError>(client.request(req).await?)
        }
    })
}

/// Serves an axum app on 127.0.0.1.
async fn serve_app(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

async fn fetch(uri: String) -> (StatusCode, String, usize) {
    let res = tokio::time::timeout(REAL_TIMEOUT, get(uri))
        .await
        .expect("answered in time")
        .expect("an HTTP answer");
    let status = res.status();
    let proxy_status = res
        .headers()
        .get("proxy-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let len = res.into_body().collect().await.unwrap().to_bytes().len();
    (status, proxy_status, len)
}

/// An upstream that reads the request head and never answers.
async fn hanging() -> SocketAddr {
    raw_upstream(|mut s| async move {
        read_head(&mut s).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    })
    .await
}

#[tokio::test]
async fn axum_proxy_answers_502_504_and_passes_200() {
    let ok = replying(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
    let refused = closed_port().await;
    let garbage = replying(b"\x16\x03\x01 not http\r\n\r\n").await;
    let hang = hanging().await;

    // One layer per upstream: a layer's breaker judges one upstream (server-side requests
    // carry no authority to key by).
    let stack = || {
        Upstream::builder()
            .map_faults(
                tower_upstream::MapFaultsLayer::builder()
                    .gateway_name("gw")
                    .build()
                    .unwrap(),
            )
            .deadline(Duration::from_millis(600))
            .attempt_timeout(Duration::from_millis(150))
            .build()
            .unwrap()
    };
    let app = Router::new()
        .route_service("/ok", stack().layer(proxy(ok)))
        .route_service("/refused", stack().layer(proxy(refused)))
        .route_service("/garbage", stack().layer(proxy(garbage)))
        .fallback_service(stack().layer(proxy(hang)));
    let gw = serve_app(app).await;

    assert_eq!(
        fetch(format!("http://{gw}/ok")).await,
        (StatusCode::OK, String::new(), 2)
    );
    let (status, ps, _) = fetch(format!("http://{gw}/refused")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(ps, "gw; error=connection_refused");
    let (status, ps, _) = fetch(format!("http://{gw}/garbage")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(ps.starts_with("gw; error=http_"), "{ps}");
    let started = tokio::time::Instant::now();
    let (status, ps, _) = fetch(format!("http://{gw}/hang")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(ps, "gw; error=http_response_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the deadline bounds the retries: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn router_layer_and_route_layer_need_no_handle_error_layer() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        move || {
            let calls = calls.clone();
            async move {
                // 503 twice, then 200: the default retry (3 attempts) recovers.
                if calls.fetch_add(1, SeqCst) % 3 < 2 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                }
            }
        }
    };
    let layer = Upstream::builder().build().unwrap();
    let app = Router::new()
        .route("/a", get_route(handler.clone()))
        .layer(layer.clone())
        .merge(
            Router::new()
                .route("/b", get_route(handler))
                .route_layer(layer.clone()),
        );
    let gw = serve_app(app).await;

    assert_eq!(fetch(format!("http://{gw}/a")).await.0, StatusCode::OK);
    assert_eq!(calls.load(SeqCst), 3);
    assert_eq!(fetch(format!("http://{gw}/b")).await.0, StatusCode::OK);
    assert_eq!(calls.load(SeqCst), 6);
    assert_eq!(layer.retry_budget().unwrap().exhausted(), 0);
}

/// An upstream that answers every connection with `reply` and closes it; counts requests.
async fn counting_upstream(reply: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let addr = raw_upstream(move |mut s| {
        let hits = counted.clone();
        async move {
            read_head(&mut s).await;
            hits.fetch_add(1, SeqCst);
            let _ = s.write_all(reply).await;
            let _ = s.shutdown().await;
        }
    })
    .await;
    (addr, hits)
}

#[tokio::test]
async fn retry_counts_come_from_the_retry_layer_passed_in() {
    let (upstream, hits) = counting_upstream(
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await;
    let layer = Upstream::builder()
        .retry(RetryLayer::builder().max_attempts(2).build().unwrap())
        .no_breaker()
        .build()
        .unwrap();
    let gw = serve_app(Router::new().fallback_service(layer.layer(proxy(upstream)))).await;
    let (status, ps, _) = fetch(format!("http://{gw}/x")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ps, "", "the upstream's own 503 passes through");
    assert_eq!(hits.load(SeqCst), 2);

    // Without retries: one attempt.
    hits.store(0, SeqCst);
    let layer = Upstream::builder().no_retry().build().unwrap();
    assert!(layer.retry_budget().is_none());
    let gw = serve_app(Router::new().fallback_service(layer.layer(proxy(upstream)))).await;
    assert_eq!(
        fetch(format!("http://{gw}/x")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(hits.load(SeqCst), 1);
}

#[tokio::test]
async fn one_breaker_for_two_routes() {
    let (upstream, hits) = counting_upstream(
        b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await;
    let layer = Upstream::builder()
        .no_retry()
        .breaker(
            CircuitBreakerLayer::builder()
                .consecutive_failures(3)
                .jitter(0.0)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    // Two routes, two `layer()` calls, one upstream.
    let app = Router::new()
        .route_service("/a", layer.layer(proxy(upstream)))
        .route_service("/b", layer.clone().layer(proxy(upstream)));
    let gw = serve_app(app).await;

    for _ in 0..3 {
        assert_eq!(
            fetch(format!("http://{gw}/a")).await.0,
            StatusCode::BAD_GATEWAY
        );
    }
    assert_eq!(hits.load(SeqCst), 3);
    // /b never failed, but its breaker is /a's: open.
    let (status, ps, _) = fetch(format!("http://{gw}/b")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ps, "tower-upstream; error=destination_unavailable");
    assert_eq!(hits.load(SeqCst), 3, "the upstream was not touched");
    // Server-side requests carry no authority: the layer's one key-less breaker.
    let handle = layer.breaker_handle().unwrap();
    let snapshot = handle.snapshot(tower_upstream::breaker::NO_KEY).unwrap();
    assert_eq!(snapshot.state(), State::Open);
}

#[tokio::test]
async fn concurrency_limit_sheds_while_another_request_is_in_flight() {
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let inner = {
        let (entered, release) = (entered.clone(), release.clone());
        service_fn(move |_req: Request<ReplayBody<AxumBody>>| {
            let (entered, release) = (entered.clone(), release.clone());
            async move {
                entered.notify_one();
                release.notified().await;
                Ok::<_, Infallible>(Response::new(AxumBody::from("done")))
            }
        })
    };
    let layer = Upstream::builder().concurrency_limit(1).build().unwrap();
    // Two routes through one layer share the one permit.
    let app = Router::new()
        .route_service("/a", layer.layer(inner.clone()))
        .route_service("/b", layer.layer(inner));
    let gw = serve_app(app).await;

    let first = tokio::spawn(fetch(format!("http://{gw}/a")));
    entered.notified().await;
    let (status, ps, _) = fetch(format!("http://{gw}/b")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ps, "tower-upstream; error=connection_limit_reached");

    release.notify_one();
    assert_eq!(first.await.unwrap(), (StatusCode::OK, String::new(), 4));
    // The permit is back.
    let again = tokio::spawn(fetch(format!("http://{gw}/b")));
    entered.notified().await;
    release.notify_one();
    assert_eq!(again.await.unwrap().0, StatusCode::OK);
}

#[tokio::test]
async fn wraps_a_hyper_util_client_with_service_builder() {
    let ok = replying(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
    let refused = closed_port().await;
    let client: Client<_, ReplayBody<Full<Bytes>>> = Client::builder(TokioExecutor::new())
        .build(HttpConnector::new_with_resolver(local_resolver()));
    let layer = Upstream::builder()
        .attempt_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut outbound = ServiceBuilder::new().layer(layer.clone()).service(client);

    let req = Request::get(format!("http://{ok}/"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = outbound.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok");

    let req = Request::post(format!("http://{refused}/orders"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let res = outbound.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        res.headers()["proxy-status"],
        "tower-upstream; error=connection_refused"
    );
    // Outbound requests have an authority: one breaker per upstream.
    let handle = layer.breaker_handle().unwrap();
    assert!(handle.snapshot(&refused.to_string()).is_some());
    assert!(handle.snapshot(&ok.to_string()).is_some());
}

#[tokio::test(start_paused = true)]
async fn one_budget_for_every_layer_call() {
    // A budget that allows no retry: every retry is refused and counted.
    let budget = RetryBudget::builder()
        .ratio(0.01)
        .min_per_second(0)
        .build()
        .unwrap();
    let layer = Upstream::builder()
        .retry(RetryLayer::builder().budget(budget).build().unwrap())
        .build()
        .unwrap();
    let failing = || {
        service_fn(|_req: Request<ReplayBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
        })
    };
    let a = layer.layer(failing());
    let b = layer.clone().layer(failing());
    for svc in [a, b] {
        let req = Request::get("http://upstream/")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(layer.retry_budget().unwrap().exhausted(), 2);
}

#[tokio::test(start_paused = true)]
async fn deadline_bounds_a_hung_service_without_attempt_timeout() {
    let layer = Upstream::builder()
        .deadline(Duration::from_secs(2))
        .no_attempt_timeout()
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|_req: Request<ReplayBody<Full<Bytes>>>| async {
        std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>().await
    }));
    let started = tokio::time::Instant::now();
    let req = Request::get("http://upstream/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
}

#[test]
fn config_errors_name_the_field_and_the_value() {
    let err = Upstream::builder()
        .deadline(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "deadline.timeout");
    assert!(err.message().contains("0ns"), "{err}");

    let err = Upstream::builder()
        .attempt_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "attempt_timeout.timeout");

    let err = Upstream::builder()
        .concurrency_limit(0)
        .build()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid concurrency_limit: must be at least 1 (got 0)"
    );
}

/// A `MakeWriter` into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn take(&self) -> String {
        String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
    }

    /// A subscriber up to `level` that writes here, spans' closes included.
    fn subscriber(&self, level: tracing::Level) -> impl tracing::Subscriber {
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_ansi(false)
            .with_writer(self.clone())
            .finish()
    }
}

#[tokio::test(start_paused = true)]
async fn one_span_per_request_and_nothing_above_debug_when_healthy() {
    let layer = Upstream::builder().build().unwrap();
    let svc = layer.layer(service_fn(
        |req: Request<ReplayBody<Full<Bytes>>>| async move {
            match req.uri().path() {
                "/down" => Err(BoxError::from(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                ))),
                // An upstream that is itself a proxy answers for its own upstream's fault:
                // its answer, not one of the stack's.
                "/proxy" => Ok(Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .header("proxy-status", "next; error=destination_not_found")
                    .body(Full::new(Bytes::new()))
                    .unwrap()),
                _ => Ok(Response::new(Full::new(Bytes::new()))),
            }
        },
    ));
    let request = |path: &str| {
        Request::get(format!("http://upstream.test{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    // At INFO, a healthy request logs nothing.
    let info = Captured::default();
    {
        let _guard = tracing::subscriber::set_default(info.subscriber(tracing::Level::INFO));
        let res = svc.clone().oneshot(request("/ok")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(info.take(), "");

    // At DEBUG, the request's span closes with its status, attempts or fault, and breaker key.
    let debug = Captured::default();
    {
        let _guard = tracing::subscriber::set_default(debug.subscriber(tracing::Level::DEBUG));
        let res = svc.clone().oneshot(request("/ok")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let res = svc.clone().oneshot(request("/down")).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
        let res = svc.clone().oneshot(request("/proxy")).await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
    }
    let out = debug.take();
    let closes: Vec<&str> = out.lines().filter(|l| l.contains("close")).collect();
    assert_eq!(closes.len(), 3, "{out}");
    for (line, want) in closes.iter().zip([
        ["path=\"/ok\"", "status=200", "attempts=1"],
        [
            "path=\"/down\"",
            "status=502",
            "fault=\"connection_refused\"",
        ],
        ["path=\"/proxy\"", "status=404", "attempts=1"],
    ]) {
        if line.contains("/proxy") {
            assert!(
                !line.contains("fault="),
                "the upstream's own answer: {line}"
            );
        }
        assert!(line.contains("upstream.request"), "{line}");
        assert!(line.contains("method=GET"), "{line}");
        assert!(line.contains("authority=\"upstream.test\""), "{line}");
        assert!(line.contains("breaker_key=\"upstream.test\""), "{line}");
        for w in want {
            assert!(line.contains(w), "{w} in {line}");
        }
    }

    // With the breakers switched by an operator, the span still names the key the request
    // went by: forced open (refused, 503) and disabled (let through, not counted).
    let breakers = layer.breaker_handle().unwrap();
    let debug = Captured::default();
    {
        let _guard = tracing::subscriber::set_default(debug.subscriber(tracing::Level::DEBUG));
        breakers.force_open();
        let res = svc.clone().oneshot(request("/ok")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        breakers.disable();
        let res = svc.clone().oneshot(request("/ok")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    let out = debug.take();
    let closes: Vec<&str> = out.lines().filter(|l| l.contains(": close ")).collect();
    assert_eq!(closes.len(), 2, "{out}");
    for (line, want) in closes.iter().zip(["status=503", "status=200"]) {
        assert!(line.contains(want), "{want} in {line}");
        assert!(line.contains("breaker_key=\"upstream.test\""), "{line}");
    }
}

const BODY: &[u8] = b"{\"n\":1}";

/// An upstream that records each request's head (up to the blank line), reads its body and
/// answers the first request 503, the others 200.
async fn recording_upstream() -> (SocketAddr, Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = heads.clone();
    let addr = raw_upstream(move |mut s| {
        let log = log.clone();
        async move {
            // The head, then the whole body, so that the answer comes after it.
            let mut head = read_head(&mut s).await;
            let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let mut body = head.split_off(end);
            let mut chunk = [0u8; 64];
            while body.len() < BODY.len() {
                match tokio::io::AsyncReadExt::read(&mut s, &mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => body.extend_from_slice(&chunk[..n]),
                }
            }
            assert_eq!(body, BODY, "every attempt sends the whole body");
            let first = {
                let mut log = log.lock().unwrap();
                log.push(head);
                log.len() == 1
            };
            let reply: &[u8] = if first {
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
            };
            let _ = s.write_all(reply).await;
            let _ = s.shutdown().await;
        }
    })
    .await;
    (addr, heads)
}

/// A request with repeated, empty, non-ASCII and sensitive headers.
fn request_with_many_headers(upstream: SocketAddr) -> Request<Full<Bytes>> {
    let mut secret = http::HeaderValue::from_static("Bearer s3cret");
    secret.set_sensitive(true);
    Request::post(format!("http://{upstream}/orders?id=7"))
        .header("idempotency-key", "k-1")
        .header("x-tag", "one")
        .header("accept", "application/json")
        .header("x-tag", "two")
        .header("x-empty", "")
        .header(
            "x-latin1",
            http::HeaderValue::from_bytes(b"caf\xe9\tau lait").unwrap(),
        )
        .header("authorization", secret)
        .body(Full::new(Bytes::from_static(BODY)))
        .unwrap()
}

#[tokio::test]
async fn a_retry_sends_the_same_head_again() {
    let client: Client<_, ReplayBody<Full<Bytes>>> = Client::builder(TokioExecutor::new())
        .build(HttpConnector::new_with_resolver(local_resolver()));
    let retry = || RetryLayer::builder().max_attempts(2).build().unwrap();

    // The whole stack, and the retry layer on its own: each keeps its own copy of the head.
    let (upstream, heads) = recording_upstream().await;
    let layer = Upstream::builder().retry(retry()).build().unwrap();
    let mut stack = ServiceBuilder::new().layer(layer).service(client.clone());
    let res = stack
        .ready()
        .await
        .unwrap()
        .call(request_with_many_headers(upstream))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    let (alone, alone_heads) = recording_upstream().await;
    let mut retry_only = ServiceBuilder::new().layer(retry()).service(client);
    let res = retry_only
        .ready()
        .await
        .unwrap()
        .call(request_with_many_headers(alone))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    for (heads, upstream) in [(heads, upstream), (alone_heads, alone)] {
        let heads = heads.lock().unwrap();
        assert_eq!(heads.len(), 2, "one retry after the 503");
        assert_eq!(
            String::from_utf8_lossy(&heads[0]),
            String::from_utf8_lossy(&heads[1]),
            "the second attempt's head is the first one's"
        );
        let text = String::from_utf8_lossy(&heads[0]).to_ascii_lowercase();
        assert!(text.starts_with("post /orders?id=7 http/1.1\r\n"), "{text}");
        assert!(text.contains(&format!("host: {upstream}\r\n")), "{text}");
        let tags: Vec<_> = text.matches("x-tag: ").collect();
        assert_eq!(tags.len(), 2, "{text}");
        assert!(text.find("x-tag: one").unwrap() < text.find("x-tag: two").unwrap());
        let latin1: &[u8] = b"x-latin1: caf\xe9\tau lait\r\n";
        assert!(heads[0].windows(latin1.len()).any(|w| w == latin1));
        assert!(text.contains("x-empty: \r\n"), "{text}");
        assert!(text.contains("authorization: bearer s3cret\r\n"), "{text}");
    }
}
