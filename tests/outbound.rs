//! An axum handler calling an outbound API through a hyper-util client wrapped in the whole
//! stack (the pattern of `examples/outbound_client.rs`), over real sockets on 127.0.0.1:
//! retries turn a flaky API's 503s into a 200 for the handler, and faults reach the
//! handler's caller as the stack's 502 / 504, or as the handler's own answer.

mod support;

#[path = "support/answers.rs"]
mod answers;

#[path = "support/upstreams.rs"]
mod upstreams;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};
use tower_upstream::retry::{Attempts, ReplayBody};
use tower_upstream::{Fault, MapFaultsLayer, Upstream, UpstreamLayer};

type Api = Upstream<Client<HttpConnector<support::LocalResolver>, ReplayBody<Full<Bytes>>>>;

#[derive(Clone)]
struct Outbound {
    api: Api,
    uri: String,
}

fn stack() -> UpstreamLayer {
    Upstream::builder()
        .map_faults(
            MapFaultsLayer::builder()
                .gateway_name("app")
                .build()
                .unwrap(),
        )
        .deadline(Duration::from_millis(600))
        .attempt_timeout(Duration::from_millis(150))
        .build()
        .unwrap()
}

fn outbound(layer: &UpstreamLayer, api: SocketAddr) -> Outbound {
    let client = Client::builder(TokioExecutor::new())
        .build(HttpConnector::new_with_resolver(support::local_resolver()));
    Outbound {
        api: layer.layer(client),
        uri: format!("http://{api}/price"),
    }
}

/// Passes the stack's answer for a fault on as it is; wraps the API's body otherwise.
async fn pass_through(State(out): State<Outbound>) -> Response {
    let req = Request::get(&out.uri).body(Full::default()).unwrap();
    let Ok(rsp) = out.api.oneshot(req).await; // Infallible
    if rsp.extensions().get::<Fault>().is_some() {
        return rsp.into_response(); // 502/503/504 with Proxy-Status and a problem body
    }
    let (status, attempts) = (rsp.status(), Attempts::of(&rsp));
    match rsp.into_body().collect().await {
        Ok(body) => {
            let body = String::from_utf8_lossy(&body.to_bytes()).into_owned();
            (status, format!("price {body} after {attempts} attempts")).into_response()
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

/// Makes an answer of its own from the fault.
async fn own_answer(State(out): State<Outbound>) -> Response {
    let req = Request::get(&out.uri).body(Full::default()).unwrap();
    let Ok(rsp) = out.api.oneshot(req).await;
    match rsp.extensions().get::<Fault>() {
        Some(fault) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("prices are unavailable ({fault})"),
        )
            .into_response(),
        None => rsp.into_response(),
    }
}

async fn serve_app(out: Outbound) -> SocketAddr {
    let app = Router::new()
        .route("/pass", get(pass_through))
        .route("/own", get(own_answer))
        .with_state(out);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn fetch(uri: String) -> (StatusCode, String, String) {
    let answer = answers::get(&support::client(), uri).await;
    (answer.status, answer.proxy_status, answer.body)
}

/// An API that answers 503 to its first `failures` calls, then `42`; counts its calls.
async fn flaky_api(failures: u32) -> (SocketAddr, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let count = calls.clone();
    let api = Router::new().route(
        "/price",
        get(move || {
            let n = count.fetch_add(1, Ordering::Relaxed);
            async move {
                if n < failures {
                    (StatusCode::SERVICE_UNAVAILABLE, "busy")
                } else {
                    (StatusCode::OK, "42")
                }
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, api).await });
    (addr, calls)
}

#[tokio::test]
async fn handler_gets_200_through_retries_from_a_flaky_api() {
    let (api, calls) = flaky_api(2).await;
    let layer = stack();
    let app = serve_app(outbound(&layer, api)).await;

    let (status, proxy_status, body) = fetch(format!("http://{app}/pass")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(proxy_status, "");
    assert_eq!(body, "price 42 after 3 attempts");
    assert_eq!(calls.load(Ordering::Relaxed), 3);
    // Outbound URIs are absolute: the breaker is the API's own.
    let snapshot = layer
        .breaker_handle()
        .unwrap()
        .snapshot(&api.to_string())
        .expect("a breaker keyed by the API's authority");
    assert_eq!((snapshot.calls(), snapshot.failures()), (3, 2));
}

/// More 503s than attempts: the API's own last answer reaches the handler (no `Fault`).
#[tokio::test]
async fn handler_sees_the_apis_own_answer_when_retries_run_out() {
    let (api, calls) = flaky_api(10).await;
    let app = serve_app(outbound(&stack(), api)).await;

    let (status, proxy_status, body) = fetch(format!("http://{app}/pass")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(proxy_status, "");
    assert_eq!(body, "price busy after 3 attempts");
    assert_eq!(calls.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn refused_api_reaches_the_caller_as_the_stacks_502() {
    let api = support::closed_port().await;
    let app = serve_app(outbound(&stack(), api)).await;

    let (status, proxy_status, body) = fetch(format!("http://{app}/pass")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(proxy_status, "app; error=connection_refused");
    assert!(body.contains(r#""fault":"connection_refused""#), "{body}");
    // Nothing of the API's address leaks to the handler's caller.
    assert!(!body.contains(&api.to_string()), "{body}");
}

#[tokio::test]
async fn hung_api_reaches_the_caller_as_the_stacks_504_within_the_deadline() {
    let (api, _requests) = upstreams::hanging_upstream().await;
    let app = serve_app(outbound(&stack(), api)).await;

    let uri = format!("http://{app}/pass");
    answers::expect_timely_504(&support::client(), uri, "app", Duration::from_secs(3)).await;
}

#[tokio::test]
async fn handler_makes_its_own_answer_from_the_fault() {
    let api = support::closed_port().await;
    let app = serve_app(outbound(&stack(), api)).await;

    let (status, proxy_status, body) = fetch(format!("http://{app}/own")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(proxy_status, "");
    assert_eq!(body, "prices are unavailable (connection_refused)");
}
