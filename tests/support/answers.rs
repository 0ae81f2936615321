//! What a caller saw, for the integration tests of servers with the stack in them
//! (`hyper_server.rs`, `outbound.rs`). Included with `#[path]` beside `support/mod.rs`.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;

use crate::support::{empty, TestClient, REAL_TIMEOUT};

/// One answer: its status, its `Proxy-Status` (empty when absent) and its body as text.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub proxy_status: String,
    pub body: String,
}

/// Sends `GET uri` through `client` and reads the whole answer; a test failure when none
/// comes in time.
pub async fn get(client: &TestClient, uri: String) -> Answer {
    let req = Request::get(uri).body(empty()).unwrap();
    let rsp = tokio::time::timeout(REAL_TIMEOUT, client.request(req))
        .await
        .expect("an answer in time")
        .expect("the server answered");
    let status = rsp.status();
    let proxy_status = rsp
        .headers()
        .get("proxy-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        proxy_status,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Sends `GET uri`, expecting the stack's 504 `http_response_timeout` from `gateway`, sooner
/// than `within` (the deadline, not the upstream, ended the wait).
pub async fn expect_timely_504(client: &TestClient, uri: String, gateway: &str, within: Duration) {
    let started = tokio::time::Instant::now();
    let answer = get(client, uri).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT, "{answer:?}");
    assert_eq!(
        answer.proxy_status,
        format!("{gateway}; error=http_response_timeout")
    );
    assert!(
        started.elapsed() < within,
        "the deadline bounds the attempts: {:?}",
        started.elapsed()
    );
}
