//! Real upstreams on 127.0.0.1 that misbehave for real, a hyper-util client behind
//! `MapFaults`: each fault must yield the right status and `Proxy-Status` error name.

mod support;

use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tower::{Layer, Service, ServiceExt};
use tower_upstream::map_faults::MapFaultsLayer;

use support::*;

/// Sends `GET uri` through `MapFaults(client)`, returns (status, error name in Proxy-Status).
async fn through_gateway(client: TestClient, uri: &str) -> (StatusCode, String) {
    let layer = MapFaultsLayer::builder()
        .gateway_name("gw")
        .build()
        .unwrap();
    let mut svc = layer.layer(client);
    let req = Request::get(uri).body(empty()).unwrap();
    let res = tokio::time::timeout(REAL_TIMEOUT, svc.ready().await.unwrap().call(req))
        .await
        .expect("answered in time")
        .unwrap();
    let proxy_status = res
        .headers()
        .get("proxy-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let error = proxy_status
        .split("; ")
        .find_map(|p| p.strip_prefix("error="))
        .unwrap_or("")
        .to_owned();
    assert!(proxy_status.starts_with("gw; error="), "{proxy_status:?}");
    assert!(
        !proxy_status.contains("127.0.0.1"),
        "no address leaks by default: {proxy_status}"
    );
    (res.status(), error)
}

async fn check(uri: String, status: u16, error: &str) {
    let (got_status, got_error) = through_gateway(client(), &uri).await;
    assert_eq!(
        (got_status.as_u16(), got_error.as_str()),
        (status, error),
        "{uri}"
    );
}

#[tokio::test]
async fn connection_refused() {
    let addr = closed_port().await;
    check(format!("http://{addr}/"), 502, "connection_refused").await;
}

#[tokio::test]
async fn connection_reset() {
    let addr = raw_upstream(|mut s| async move {
        read_head(&mut s).await;
        #[allow(deprecated)] // linger 0 is exactly what sends a RST
        s.set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
    })
    .await;
    check(format!("http://{addr}/"), 502, "connection_terminated").await;
}

#[tokio::test]
async fn closed_with_no_bytes() {
    let addr = replying(b"").await;
    check(format!("http://{addr}/"), 502, "http_response_incomplete").await;
}

#[tokio::test]
async fn closed_in_the_middle_of_the_head() {
    let addr = replying(b"HTTP/1.1 200 OK\r\nContent-Le").await;
    check(format!("http://{addr}/"), 502, "http_response_incomplete").await;
}

#[tokio::test]
async fn garbage() {
    let addr = replying(b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n").await;
    check(format!("http://{addr}/"), 502, "http_protocol_error").await;
}

#[tokio::test]
async fn http09_style_reply() {
    let addr = replying(b"<html>hello, no status line</html>\n").await;
    check(format!("http://{addr}/"), 502, "http_protocol_error").await;
}

#[tokio::test]
async fn bad_content_length() {
    let addr = replying(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello").await;
    check(format!("http://{addr}/"), 502, "http_protocol_error").await;
}

#[tokio::test]
async fn two_different_content_lengths() {
    let addr =
        replying(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!").await;
    check(format!("http://{addr}/"), 502, "http_protocol_error").await;
}

#[tokio::test]
async fn huge_header_section() {
    // 128 KiB of headers: 2100 fields of 63 bytes.
    let addr = raw_upstream(|mut s| async move {
        read_head(&mut s).await;
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..2100 {
            head.extend_from_slice(format!("x-h-{i:05}: {:0>50}\r\n", i).as_bytes());
        }
        head.extend_from_slice(b"content-length: 0\r\n\r\n");
        assert!(head.len() >= 128 * 1024);
        let _ = s.write_all(&head).await;
        let _ = s.shutdown().await;
    })
    .await;
    check(
        format!("http://{addr}/"),
        502,
        "http_response_header_section_size",
    )
    .await;
}

#[tokio::test]
async fn dns_failure() {
    // `.invalid` never resolves (RFC 6761); the local resolver answers like getaddrinfo
    // does, without sending a query off the machine.
    check("http://upstream.invalid/".into(), 502, "dns_error").await;
}

#[tokio::test]
async fn connect_timeout() {
    let (addr, _full) = unconnectable().await;
    let client = client_with(|c| c.set_connect_timeout(Some(Duration::from_millis(300))));
    let (status, error) = through_gateway(client, &format!("http://{addr}/")).await;
    assert_eq!(
        (status.as_u16(), error.as_str()),
        (504, "connection_timeout")
    );
}

#[tokio::test]
async fn fault_classification_says_what_was_sent() {
    use tower_upstream::fault::{classify, Sent};
    // Refused: not sent. Reset after the request was read: maybe processed.
    let refused = closed_port().await;
    let err = get(format!("http://{refused}/")).await.unwrap_err();
    assert_eq!(classify(&err).sent(), Sent::NotSent);

    let reset = raw_upstream(|mut s| async move {
        read_head(&mut s).await;
        #[allow(deprecated)]
        s.set_linger(Some(Duration::ZERO)).unwrap();
    })
    .await;
    let err = get(format!("http://{reset}/")).await.unwrap_err();
    assert_eq!(classify(&err).sent(), Sent::MaybeProcessed);
}

/// An upstream that promises 100 bytes, sends 5, and closes.
async fn truncating_upstream() -> std::net::SocketAddr {
    replying(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello").await
}

#[tokio::test]
async fn truncated_body_is_aborted_not_complete() {
    let upstream = truncating_upstream().await;
    let gw = gateway(upstream, MapFaultsLayer::new()).await;

    // A real client of the gateway sees the head, then a failed body, never a complete one.
    let res = get(format!("http://{gw}/file")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = tokio::time::timeout(REAL_TIMEOUT, res.into_body().collect())
        .await
        .expect("body ends in time");
    assert!(body.is_err(), "a truncated body must not look complete");
}

#[tokio::test]
async fn truncated_grpc_body_ends_with_unavailable_trailers() {
    let upstream = raw_upstream(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ncontent-length: 100\r\n\r\n\x00\x00\x00")
            .await;
        let _ = s.shutdown().await;
    })
    .await;
    let gw = gateway(upstream, MapFaultsLayer::new()).await;

    // gRPC runs over HTTP/2: talk h2c to the gateway.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Body>();
    let req = Request::post(format!("http://{gw}/pkg.Svc/Method"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(empty())
        .unwrap();
    let res = h2.request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let collected = tokio::time::timeout(REAL_TIMEOUT, res.into_body().collect())
        .await
        .expect("body ends in time")
        .expect("ends with trailers, not a reset");
    let trailers = collected.trailers().expect("trailers").clone();
    assert_eq!(trailers["grpc-status"], "14");
}

#[tokio::test]
async fn gateway_answers_502_over_real_sockets() {
    let upstream = closed_port().await;
    let gw = gateway(
        upstream,
        MapFaultsLayer::builder()
            .gateway_name("gw")
            .build()
            .unwrap(),
    )
    .await;
    let res = get(format!("http://{gw}/x")).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        res.headers()["proxy-status"],
        "gw; error=connection_refused"
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(!String::from_utf8_lossy(&body).contains("127.0.0.1"));
}
