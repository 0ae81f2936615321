//! The whole stack in a plain hyper 1 server, no framework: `service_fn` calling real
//! upstreams through a hyper-util client, wrapped in one `UpstreamLayer`, served with
//! hyper-util's `TowerToHyperService` by `hyper::server::conn::http1` and by hyper-util's
//! `auto` builder (HTTP/1.1 and h2c). Real sockets on 127.0.0.1.

mod support;

#[path = "support/answers.rs"]
mod answers;

#[path = "support/upstreams.rs"]
mod upstreams;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::{service_fn, BoxError, ServiceBuilder};
use tower_upstream::breaker::CircuitBreakerLayer;
use tower_upstream::retry::ReplayBody;
use tower_upstream::{MapFaultsLayer, Upstream, UpstreamLayer};

/// The stack for these tests: short deadline and attempts, and one breaker per path (a
/// server's requests carry no authority; each path here is its own upstream).
fn stack() -> UpstreamLayer {
    Upstream::builder()
        .map_faults(
            MapFaultsLayer::builder()
                .gateway_name("edge")
                .build()
                .unwrap(),
        )
        .deadline(Duration::from_millis(600))
        .attempt_timeout(Duration::from_millis(150))
        .breaker(
            CircuitBreakerLayer::builder()
                .key_fn(|req| Some(Cow::Borrowed(req.uri().path())))
                .build()
                .unwrap(),
        )
        .build()
        .unwrap()
}

/// The application: `/ok`, `/refused` and `/hung` each call their own upstream.
fn app(
    ok: SocketAddr,
    refused: SocketAddr,
    hung: SocketAddr,
) -> impl tower::Service<
    Request<ReplayBody<Incoming>>,
    Response = Response<Incoming>,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Response<Incoming>, BoxError>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    let client: Client<_, ReplayBody<Incoming>> = Client::builder(TokioExecutor::new())
        .build(HttpConnector::new_with_resolver(support::local_resolver()));
    service_fn(move |req: Request<ReplayBody<Incoming>>| {
        let client = client.clone();
        async move {
            let upstream = match req.uri().path() {
                "/ok" => ok,
                "/refused" => refused,
                _ => hung,
            };
            let (mut parts, body) = req.into_parts();
            parts.uri = Uri::try_from(format!("http://{upstream}/"))?;
            // An HTTP/2 request (h2c to the server) goes on over HTTP/1.1: say so.
            parts.version = http::Version::HTTP_11;
            Ok::<_, BoxError>(client.request(Request::from_parts(parts, body)).await?)
        }
    })
}

/// Starts the upstreams: answers `ok`, refuses, reads the request and hangs.
async fn upstreams() -> (SocketAddr, SocketAddr, SocketAddr) {
    let ok =
        support::replying(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            .await;
    let refused = support::closed_port().await;
    let (hung, _requests) = upstreams::hanging_upstream().await;
    (ok, refused, hung)
}

/// Checks the three answers through the server at `server`.
async fn check_answers(client: support::TestClient, server: SocketAddr) {
    let ok = answers::get(&client, format!("http://{server}/ok")).await;
    assert_eq!(
        (ok.status, ok.proxy_status.as_str(), ok.body.as_str()),
        (StatusCode::OK, "", "ok")
    );

    let refused = answers::get(&client, format!("http://{server}/refused")).await;
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY);
    assert_eq!(refused.proxy_status, "edge; error=connection_refused");

    let hung = format!("http://{server}/hung");
    answers::expect_timely_504(&client, hung, "edge", Duration::from_secs(3)).await;
}

#[tokio::test]
async fn hyper_http1_server_with_service_fn_and_the_stack() {
    let (ok, refused, hung) = upstreams().await;
    let layer = stack();
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(app(ok, refused, hung));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // `Upstream` has `Error = Infallible`: hyper gets an answer for every request.
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });

    check_answers(support::client(), server).await;

    // Each path had its breaker; the refused one saw three attempts.
    let refused_breaker = layer
        .breaker_handle()
        .unwrap()
        .snapshot("/refused")
        .unwrap();
    assert_eq!(refused_breaker.failures(), 3);
}

#[tokio::test]
async fn hyper_util_auto_server_over_http2_with_the_stack() {
    let (ok, refused, hung) = upstreams().await;
    let svc = ServiceBuilder::new()
        .layer(stack())
        .service(app(ok, refused, hung));
    // `support::serve` is hyper-util's `auto::Builder` with `TowerToHyperService`.
    let server = support::serve(svc).await;

    check_answers(support::h2_client(), server).await;
}

/// A request body reaches the upstream intact, through the stack's replayable body.
#[tokio::test]
async fn a_request_body_passes_through_the_stack() {
    let echo = support::serve(service_fn(|req: Request<Incoming>| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(body)))
    }))
    .await;
    let svc = ServiceBuilder::new()
        .layer(stack())
        .service(app(echo, echo, echo));
    let server = support::serve(svc).await;

    let req = Request::post(format!("http://{server}/ok"))
        .body(support::full("ping"))
        .unwrap();
    let rsp = support::client().request(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ping");
}
