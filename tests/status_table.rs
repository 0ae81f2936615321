//! Pins every row of the status-mapping spec (DESIGN.md §3, the crate docs' table).
//!
//! Changing a row here is a breaking change: say so in the CHANGELOG.

use std::convert::Infallible;
use std::io;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::Layer;
use tower::{service_fn, BoxError, ServiceExt};
use tower_upstream::breaker::error::CircuitOpen;
use tower_upstream::deadline::error::DeadlineExceeded;
use tower_upstream::fault::{classify, Fault, Sent};
use tower_upstream::map_faults::MapFaultsLayer;
use tower_upstream::timeout::error::Elapsed;

/// One row: an error the inner service fails with, and what every client must see.
struct Row {
    what: &'static str,
    error: fn() -> BoxError,
    fault: Fault,
    http: u16,
    grpc: u8,
    sent: Sent,
    retry_after: Option<&'static str>,
    pushback_ms: Option<&'static str>,
}

#[derive(Debug)]
struct Unknown;
impl std::fmt::Display for Unknown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("something nobody classifies at 10.1.2.3:8080")
    }
}
impl std::error::Error for Unknown {}

/// An error wrapped in an io::Error of an unhelpful kind.
#[derive(Debug)]
struct Opaque;
impl std::fmt::Display for Opaque {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("opaque")
    }
}
impl std::error::Error for Opaque {}

fn rows() -> Vec<Row> {
    use Sent::*;
    vec![
        Row {
            what: "connection refused",
            error: || io::Error::from(io::ErrorKind::ConnectionRefused).into(),
            fault: Fault::ConnectionRefused,
            http: 502,
            grpc: 14,
            sent: NotSent,
            retry_after: None,
            pushback_ms: None,
        },
        Row {
            what: "connection reset",
            error: || io::Error::from(io::ErrorKind::ConnectionReset).into(),
            fault: Fault::ConnectionTerminated,
            http: 502,
            grpc: 14,
            sent: MaybeProcessed,
            retry_after: None,
            pushback_ms: None,
        },
        Row {
            what: "closed before the response head completed",
            error: || io::Error::from(io::ErrorKind::UnexpectedEof).into(),
            fault: Fault::ConnectionTerminated,
            http: 502,
            grpc: 14,
            sent: MaybeProcessed,
            retry_after: None,
            pushback_ms: None,
        },
        Row {
            what: "malformed response",
            error: || io::Error::from(io::ErrorKind::InvalidData).into(),
            fault: Fault::HttpProtocolError,
            http: 502,
            grpc: 14,
            sent: MaybeProcessed,
            retry_after: None,
            pushback_ms: None,
        },
        Row {
            what: "no route to host",
            error: || io::Error::from(io::ErrorKind::HostUnreachable).into(),
            fault: Fault::DestinationIpUnroutable,
            http: 502,
            grpc: 14,
            sent: NotSent,
            retry_after: None,
            pushback_ms: None,
        },
        Row {
            what: "attempt timed out",
            error: || Box::new(Elapsed::new()),
            fault: Fault::HttpResponseTimeout,
            http: 504,
            grpc: 4,
            sent: MaybeProcessed,
            retry_after: None,
            pushback_ms: None,
        },
        Row {
            what: "tower timeout",
            error: || Box::new(tower::timeout::error::Elapsed::new()),
            fault: Fault::HttpResponseTimeout,
            http: 504,
            grpc: 4,
            sent: MaybeProcessed,
            retry_after: None,
            pushback_ms: None,
        },
        Row {
            what: "deadline exceeded in flight",
            error: || Box::new(DeadlineExceeded::in_flight()),
            fault: Fault::HttpResponseTimeout,
            http: 504,
            grpc: 4,
            sent: MaybeProcessed,
            retry_after: None,
            pushback_ms: None,
        },
        Row {
            what: "deadline spent before an attempt could start",
            error: || Box::new(DeadlineExceeded::before_start()),
            fault: Fault::HttpResponseTimeout,
            http: 504,
            grpc: 4,
            sent: NotSent,
            retry_after: None,
            pushback_ms: None,
        },
        Row {
            what: "circuit open",
            error: || Box::new(CircuitOpen::new(Duration::from_millis(4200))),
            fault: Fault::DestinationUnavailable,
            http: 503,
            grpc: 14,
            sent: NotSent,
            retry_after: Some("5"),
            pushback_ms: Some("4200"),
        },
        Row {
            what: "shed (overloaded)",
            error: || Box::new(tower::load_shed::error::Overloaded::new()),
            fault: Fault::ConnectionLimitReached,
            http: 503,
            grpc: 14,
            sent: NotSent,
            retry_after: None,
            pushback_ms: None,
        },
        Row {
            what: "unclassified error",
            error: || Box::new(Unknown),
            fault: Fault::ProxyInternalError,
            http: 502,
            grpc: 14,
            sent: MaybeProcessed,
            retry_after: None,
            pushback_ms: None,
        },
        Row {
            what: "unclassified io error",
            error: || io::Error::other(Opaque).into(),
            fault: Fault::ProxyInternalError,
            http: 502,
            grpc: 14,
            sent: MaybeProcessed,
            retry_after: None,
            pushback_ms: None,
        },
    ]
}

/// The fixed contract of every fault kind, independent of any error: name, HTTP, gRPC, sent.
#[test]
fn fault_table() {
    use Sent::*;
    let table: &[(Fault, &str, u16, i32, Sent)] = &[
        (Fault::DnsError, "dns_error", 502, 14, NotSent),
        (Fault::DnsTimeout, "dns_timeout", 504, 4, NotSent),
        (
            Fault::DestinationIpUnroutable,
            "destination_ip_unroutable",
            502,
            14,
            NotSent,
        ),
        (
            Fault::ConnectionRefused,
            "connection_refused",
            502,
            14,
            NotSent,
        ),
        (
            Fault::ConnectionTimeout,
            "connection_timeout",
            504,
            4,
            NotSent,
        ),
        (
            Fault::ConnectionTerminated,
            "connection_terminated",
            502,
            14,
            MaybeProcessed,
        ),
        (
            Fault::TlsProtocolError,
            "tls_protocol_error",
            502,
            14,
            NotSent,
        ),
        (
            Fault::TlsCertificateError,
            "tls_certificate_error",
            502,
            14,
            NotSent,
        ),
        (
            Fault::HttpResponseIncomplete,
            "http_response_incomplete",
            502,
            14,
            MaybeProcessed,
        ),
        (
            Fault::HttpProtocolError,
            "http_protocol_error",
            502,
            14,
            MaybeProcessed,
        ),
        (
            Fault::HttpResponseHeaderSectionSize,
            "http_response_header_section_size",
            502,
            14,
            MaybeProcessed,
        ),
        (
            Fault::HttpResponseTimeout,
            "http_response_timeout",
            504,
            4,
            MaybeProcessed,
        ),
        (
            Fault::DestinationUnavailable,
            "destination_unavailable",
            503,
            14,
            NotSent,
        ),
        (
            Fault::ConnectionLimitReached,
            "connection_limit_reached",
            503,
            14,
            NotSent,
        ),
        (
            Fault::ProxyInternalError,
            "proxy_internal_error",
            502,
            14,
            MaybeProcessed,
        ),
    ];
    assert_eq!(table.len(), Fault::ALL.len(), "every fault is pinned");
    for (fault, name, http, grpc, sent) in table {
        assert_eq!(fault.name(), *name);
        assert_eq!(fault.to_string(), *name);
        assert_eq!(fault.http_status().as_u16(), *http, "{name}");
        assert_eq!(fault.grpc_code().as_i32(), *grpc, "{name}");
        assert_eq!(fault.sent(), *sent, "{name}");
        assert!(Fault::ALL.contains(fault));
    }
}

fn failing(
    make: fn() -> BoxError,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    service_fn(move |_req: Request<Full<Bytes>>| async move { Err(make()) })
}

#[tokio::test]
async fn every_row_over_http() {
    let layer = MapFaultsLayer::builder()
        .gateway_name("gw")
        .build()
        .unwrap();
    for row in rows() {
        let c = classify(&*(row.error)());
        assert_eq!((c.fault(), c.sent()), (row.fault, row.sent), "{}", row.what);

        let svc = layer.layer(failing(row.error));
        let res = svc.oneshot(Request::new(Full::default())).await.unwrap();
        assert_eq!(res.status().as_u16(), row.http, "{}", row.what);
        assert_eq!(
            res.headers()["proxy-status"],
            format!("gw; error={}", row.fault.name()).as_str(),
            "{}",
            row.what
        );
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        assert_eq!(
            res.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap()),
            row.retry_after,
            "{}",
            row.what
        );
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let body = std::str::from_utf8(&body).unwrap();
        assert!(body.starts_with("{\"type\":\"about:blank\""), "{body}");
        assert!(body.contains(&format!("\"status\":{}", row.http)), "{body}");
        assert!(
            body.contains(&format!("\"fault\":\"{}\"", row.fault.name())),
            "{body}"
        );
        assert!(
            !body.contains("10.1.2.3"),
            "no upstream detail by default: {body}"
        );
    }
}

#[tokio::test]
async fn every_row_over_grpc() {
    let layer = MapFaultsLayer::new();
    for row in rows() {
        let svc = layer.layer(failing(row.error));
        let req = Request::builder()
            .header("content-type", "application/grpc+proto")
            .body(Full::default())
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{}", row.what);
        assert_eq!(res.headers()["content-type"], "application/grpc");
        assert_eq!(
            res.headers()["grpc-status"],
            row.grpc.to_string().as_str(),
            "{}",
            row.what
        );
        assert_eq!(res.headers()["grpc-message"], row.fault.title());
        assert_eq!(
            res.headers()
                .get("grpc-retry-pushback-ms")
                .map(|v| v.to_str().unwrap()),
            row.pushback_ms,
            "{}",
            row.what
        );
        assert!(res.headers().get("retry-after").is_none());
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty(), "trailers-only answers have no body");
    }
}

#[tokio::test]
async fn upstream_answers_pass_through_untouched() {
    for status in [200u16, 404, 500, 502, 503, 504] {
        let svc =
            MapFaultsLayer::new().layer(service_fn(move |_req: Request<Full<Bytes>>| async move {
                let res = Response::builder()
                    .status(status)
                    .header("x-upstream", "yes")
                    .body(Full::new(Bytes::from_static(b"upstream body")))
                    .unwrap();
                Ok::<_, Infallible>(res)
            }));
        let res = svc.oneshot(Request::new(Full::default())).await.unwrap();
        assert_eq!(res.status().as_u16(), status);
        assert_eq!(res.headers()["x-upstream"], "yes");
        assert!(res.headers().get("proxy-status").is_none());
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"upstream body");
    }
}

#[tokio::test]
async fn upstream_5xx_rewritten_on_request() {
    let layer = MapFaultsLayer::builder()
        .gateway_name("gw")
        .rewrite_upstream_5xx(true)
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
        let status = if req.uri().path() == "/ok" { 404 } else { 503 };
        let res = Response::builder()
            .status(status)
            .header("retry-after", "7")
            .header("server", "internal-box-17")
            .body(Full::new(Bytes::from_static(
                b"stack trace at db-7.internal",
            )))
            .unwrap();
        Ok::<_, Infallible>(res)
    }));
    let res = svc
        .clone()
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["proxy-status"], "gw; received-status=503");
    assert_eq!(res.headers()["retry-after"], "7");
    assert!(res.headers().get("server").is_none());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let body = std::str::from_utf8(&body).unwrap();
    assert!(!body.contains("db-7"), "{body}");
    assert!(body.contains("\"status\":503"), "{body}");

    // 4xx still pass through.
    let req = Request::builder().uri("/ok").body(Full::default()).unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"stack trace at db-7.internal");
}

#[tokio::test]
async fn details_only_when_exposed() {
    let layer = MapFaultsLayer::builder()
        .gateway_name("gw")
        .expose_details(true)
        .build()
        .unwrap();
    let svc = layer.layer(failing(|| Box::new(Unknown)));
    let res = svc
        .clone()
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    assert_eq!(
        res.headers()["proxy-status"],
        "gw; error=proxy_internal_error; details=\"something nobody classifies at 10.1.2.3:8080\""
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(std::str::from_utf8(&body).unwrap().contains("10.1.2.3"));

    let req = Request::builder()
        .header("content-type", "application/grpc")
        .body(Full::default())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(
        res.headers()["grpc-message"],
        "upstream request failed: something nobody classifies at 10.1.2.3:8080"
    );
}

#[tokio::test]
async fn unclassified_status_is_configurable() {
    let layer = MapFaultsLayer::builder()
        .unclassified_status(StatusCode::INTERNAL_SERVER_ERROR)
        .unclassified_grpc_code(tower_upstream::grpc::Code::Internal)
        .plain_text()
        .build()
        .unwrap();
    let svc = layer.layer(failing(|| Box::new(Unknown)));
    let res = svc
        .clone()
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(res.headers()["content-type"], "text/plain; charset=utf-8");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        &body[..],
        b"500 Internal Server Error: upstream request failed\n"
    );
    let req = Request::builder()
        .header("content-type", "application/grpc")
        .body(Full::default())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "13");

    // A classified fault keeps its own status.
    let svc = MapFaultsLayer::builder()
        .unclassified_status(StatusCode::INTERNAL_SERVER_ERROR)
        .build()
        .unwrap()
        .layer(failing(|| {
            io::Error::from(io::ErrorKind::ConnectionRefused).into()
        }));
    let res = svc.oneshot(Request::new(Full::default())).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
}

#[test]
fn bad_configuration_is_an_error_not_a_panic() {
    let err = MapFaultsLayer::builder()
        .unclassified_status(StatusCode::OK)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "map_faults.unclassified_status");
    let err = MapFaultsLayer::builder()
        .unclassified_grpc_code(tower_upstream::grpc::Code::Ok)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "map_faults.unclassified_grpc_code");
    let err = MapFaultsLayer::builder()
        .gateway_name("")
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "map_faults.gateway_name");
    // A name that is not a token is quoted, not refused.
    assert!(MapFaultsLayer::builder()
        .gateway_name("my gateway")
        .build()
        .is_ok());
}
