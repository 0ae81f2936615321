//! An axum application whose handlers call outbound HTTP APIs through a hyper-util client
//! wrapped in the whole stack, all on 127.0.0.1:
//!
//! - the orders API answers `503` to two calls of every three: the stack's retries turn
//!   that into a `200` for the handler;
//! - the stock API is down (connection refused): the handler gets the stack's `502`;
//! - the shipping API hangs: the handler gets the stack's `504` once its three 250 ms
//!   attempts have timed out, within the 1 s deadline.
//!
//! ```text
//! cargo run --example outbound_client
//! ```
//!
//! One `UpstreamLayer` serves all three APIs: outbound requests have absolute URIs, so its
//! breaker is keyed by each API's authority. `Upstream` has `Error = Infallible`: a handler
//! always gets a response, the API's own or the stack's answer for a fault (with the
//! [`Fault`] in its extensions). The example exits non-zero if any answer differs from what
//! it prints as expected.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower::{BoxError, Layer, ServiceExt};
use tower_upstream::retry::{Attempts, ReplayBody};
use tower_upstream::{Fault, Upstream};

/// The outbound client in the stack. It sends `ReplayBody<Empty<Bytes>>`: the stack's retry
/// keeps the body to send it again.
type Api = Upstream<Client<HttpConnector, ReplayBody<Empty<Bytes>>>>;

#[derive(Clone)]
struct AppState {
    api: Api,
    orders: SocketAddr,
    stock: SocketAddr,
    shipping: SocketAddr,
}

/// `GET /orders/{id}`: from the orders API.
async fn order(State(app): State<AppState>, Path(id): Path<u32>) -> Response {
    match call(&app.api, format!("http://{}/orders/{id}", app.orders)).await {
        Ok(body) => format!("order {id}: {body}").into_response(),
        Err(answer) => answer,
    }
}

/// `GET /stock/{sku}`: from the stock API.
async fn stock(State(app): State<AppState>, Path(sku): Path<String>) -> Response {
    match call(&app.api, format!("http://{}/stock/{sku}", app.stock)).await {
        Ok(body) => format!("stock of {sku}: {body}").into_response(),
        Err(answer) => answer,
    }
}

/// `GET /shipping/{id}`: from the shipping API.
async fn shipping(State(app): State<AppState>, Path(id): Path<u32>) -> Response {
    match call(&app.api, format!("http://{}/shipping/{id}", app.shipping)).await {
        Ok(body) => format!("shipping of {id}: {body}").into_response(),
        Err(answer) => answer,
    }
}

/// Calls an API through the stack: its body on success, otherwise the answer for the
/// handler's caller.
async fn call(api: &Api, uri: String) -> Result<String, Response> {
    let req = Request::get(uri)
        .body(Empty::new())
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())?;
    // `Upstream` is infallible: the API's answer, or the stack's for a fault.
    let Ok(rsp) = api.clone().oneshot(req).await;
    let attempts = Attempts::of(&rsp);
    if rsp.extensions().get::<Fault>().is_some() {
        // The stack's 502/503/504, with `Proxy-Status` and a problem+json body: pass it on
        // as it is (or make an answer of your own from the `Fault`).
        return Err(rsp.into_response());
    }
    if !rsp.status().is_success() {
        // The API's own error answer, after the retries the policy allowed.
        return Err((StatusCode::BAD_GATEWAY, "the API said no").into_response());
    }
    let body = rsp
        .into_body()
        .collect()
        .await
        .map_err(|_| StatusCode::BAD_GATEWAY.into_response())?
        .to_bytes();
    Ok(format!(
        "{} (after {attempts} attempts)",
        String::from_utf8_lossy(&body)
    ))
}

/// The three APIs: orders (503 twice in every three calls), shipping (hangs); stock is a
/// port nothing listens on.
async fn start_apis() -> Result<(SocketAddr, SocketAddr, SocketAddr), BoxError> {
    let calls = Arc::new(AtomicU32::new(0));
    let orders = Router::new().route(
        "/orders/{id}",
        get(move |Path(id): Path<u32>| {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            async move {
                if n % 3 < 2 {
                    (StatusCode::SERVICE_UNAVAILABLE, String::from("busy")).into_response()
                } else {
                    format!("#{id} shipped").into_response()
                }
            }
        }),
    );
    let shipping = Router::new().route(
        "/shipping/{id}",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            "never"
        }),
    );
    let stock = TcpListener::bind("127.0.0.1:0").await?.local_addr()?; // closed again
    Ok((serve(orders).await?, stock, serve(shipping).await?))
}

async fn serve(app: Router) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<ExitCode, BoxError> {
    let (orders, stock_api, shipping_api) = start_apis().await?;

    // One stack for every outbound call: 1 s per request, 250 ms per attempt, 3 attempts.
    let layer = Upstream::builder()
        .deadline(Duration::from_secs(1))
        .attempt_timeout(Duration::from_millis(250))
        .build()?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let state = AppState {
        api: layer.layer(client),
        orders,
        stock: stock_api,
        shipping: shipping_api,
    };
    let app = Router::new()
        .route("/orders/{id}", get(order))
        .route("/stock/{sku}", get(stock))
        .route("/shipping/{id}", get(shipping))
        .with_state(state);
    let addr = serve(app).await?;

    println!("An axum app calling three APIs through one Upstream stack:");
    let caller = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut all_ok = true;
    for (path, want) in [
        ("/orders/7", StatusCode::OK),
        ("/stock/apple", StatusCode::BAD_GATEWAY),
        ("/shipping/7", StatusCode::GATEWAY_TIMEOUT),
    ] {
        let rsp = caller
            .request(Request::get(format!("http://{addr}{path}")).body(Empty::new())?)
            .await?;
        let status = rsp.status();
        let proxy_status = rsp
            .headers()
            .get("proxy-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = rsp.into_body().collect().await?.to_bytes();
        let ok = status == want;
        all_ok &= ok;
        let mark = if ok { "ok " } else { "BAD" };
        println!("{mark} GET {path:<14} {status} {proxy_status}");
        println!("    {}", String::from_utf8_lossy(&body));
    }

    // The breakers the calls went through: one per API authority.
    if let Some(breakers) = layer.breaker_handle() {
        for snapshot in breakers.snapshots().iter().filter(|s| s.calls() > 0) {
            println!(
                "breaker {}: {:?}, {} calls, {} failures",
                snapshot.key(),
                snapshot.state(),
                snapshot.calls(),
                snapshot.failures()
            );
        }
    }

    println!();
    if all_ok {
        println!("every answer was as expected");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("some answers were not as expected");
        Ok(ExitCode::FAILURE)
    }
}
