//! The whole stack (`UpstreamLayer`) with tonic, over real sockets on 127.0.0.1: around an
//! outbound tonic `Channel` (through `grpc::IntoTonicBody`), on a tonic server
//! (`Server::layer`), and one layer's breaker and retry budget shared by every use of it.
#![cfg(feature = "tonic")]

mod support;

#[path = "support/grpc.rs"]
mod grpc;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::metadata::MetadataMap;
use tonic::Code;
use tower::{Layer, ServiceBuilder};
use tower_upstream::breaker::{CircuitBreakerLayer, State};
use tower_upstream::grpc::{IntoTonicBody, IntoTonicBodyLayer};
use tower_upstream::retry::{Idempotent, RetryBudget};
use tower_upstream::{RetryLayer, Upstream, UpstreamLayer};

use grpc::{hello_request, say_hello, Greeter, HelloReply};

fn within<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
    tokio::time::timeout(support::REAL_TIMEOUT, f)
}

fn proxy_status(metadata: &MetadataMap) -> Option<&str> {
    metadata.get("proxy-status").and_then(|v| v.to_str().ok())
}

fn idempotent(name: &str) -> tonic::Request<grpc::HelloRequest> {
    let mut req = hello_request(name);
    req.extensions_mut().insert(Idempotent);
    req
}

/// A greeter that always answers `UNAVAILABLE`, counting its calls.
async fn unavailable_greeter() -> (std::net::SocketAddr, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let count = calls.clone();
    let greeter = Greeter::new(move |_req| {
        count.fetch_add(1, Ordering::Relaxed);
        async { Err(tonic::Status::unavailable("down for maintenance")) }
    });
    (grpc::serve_greeter(greeter).await, calls)
}

#[tokio::test]
async fn stack_around_a_channel_retries_an_idempotent_call_until_it_succeeds() {
    let (upstream, seen) = grpc::recovering_greeter(2).await;
    let layer = Upstream::builder().build().unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .layer(IntoTonicBodyLayer::new())
        .service(grpc::channel(upstream));

    // Spawned: the call's future through the whole stack is `Send + 'static`.
    let call = tokio::spawn(say_hello(svc, grpc::origin(upstream), idempotent("again")));
    let rsp = within(call).await.unwrap().unwrap().unwrap();
    assert_eq!(rsp.get_ref().message, "hello, again");
    assert_eq!(
        *seen.lock().unwrap(),
        [None, Some("1".to_owned()), Some("2".to_owned())],
        "three attempts, with grpc-previous-rpc-attempts"
    );
    // Every attempt was one sample of the breaker for the upstream's authority.
    let snapshot = layer
        .breaker_handle()
        .unwrap()
        .snapshot(&upstream.to_string())
        .expect("a breaker for the upstream");
    assert_eq!((snapshot.calls(), snapshot.failures()), (3, 2));
    assert_eq!(snapshot.state(), State::Closed);
}

#[tokio::test]
async fn stack_around_a_channel_does_not_retry_an_unmarked_call() {
    let (upstream, seen) = grpc::recovering_greeter(2).await;
    let svc = Upstream::builder()
        .build()
        .unwrap()
        .layer(IntoTonicBody::new(grpc::channel(upstream)));

    let status = within(say_hello(
        svc,
        grpc::origin(upstream),
        hello_request("once"),
    ))
    .await
    .unwrap()
    .unwrap_err();
    // The upstream's own status passes through the stack unchanged.
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "warming up");
    assert_eq!(proxy_status(status.metadata()), None);
    assert_eq!(seen.lock().unwrap().len(), 1, "one attempt only");
}

/// Refused connections were never sent: retried for any call; when every attempt is
/// refused, the stack's `MapFaults` answers the caller `UNAVAILABLE` with its own message.
#[tokio::test]
async fn stack_around_a_channel_to_a_dead_upstream_answers_unavailable() {
    let dead = support::closed_port().await;
    let layer = Upstream::builder()
        .map_faults(
            tower_upstream::MapFaultsLayer::builder()
                .gateway_name("client")
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let svc = layer.layer(IntoTonicBody::new(grpc::channel(dead)));

    let status = within(say_hello(svc, grpc::origin(dead), hello_request("anyone")))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "upstream refused the connection");
    assert_eq!(
        proxy_status(status.metadata()),
        Some("client; error=connection_refused")
    );
    let snapshot = layer
        .breaker_handle()
        .unwrap()
        .snapshot(&dead.to_string())
        .expect("a breaker for the upstream");
    assert_eq!(snapshot.failures(), 3, "three refused attempts");
}

/// One `UpstreamLayer` around two channels to one upstream: the breaker that the first
/// opened fails the second's call fast (the upstream never sees it), and both draw on, and
/// exhaust, the same retry budget.
#[tokio::test]
async fn one_layer_shares_breaker_and_budget_across_channels() {
    let (upstream, calls) = unavailable_greeter().await;
    let budget = RetryBudget::builder()
        .ratio(0.01)
        .min_per_second(0)
        .build()
        .unwrap();
    let layer = Upstream::builder()
        .retry(RetryLayer::builder().budget(budget).build().unwrap())
        .breaker(
            CircuitBreakerLayer::builder()
                .consecutive_failures(2)
                .open_duration(Duration::from_secs(60))
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let first = layer.layer(IntoTonicBody::new(grpc::channel(upstream)));
    let second = layer.layer(IntoTonicBody::new(grpc::channel(upstream)));

    // Two idempotent calls through the first: each is refused a retry by the empty budget,
    // and two failures in a row open the circuit.
    for _ in 0..2 {
        let status = within(say_hello(
            first.clone(),
            grpc::origin(upstream),
            idempotent("a"),
        ))
        .await
        .unwrap()
        .unwrap_err();
        assert_eq!(status.message(), "down for maintenance");
    }
    assert_eq!(calls.load(Ordering::Relaxed), 2);
    assert_eq!(layer.retry_budget().unwrap().exhausted(), 2);

    // The second channel's call meets the open circuit.
    let status = within(say_hello(second, grpc::origin(upstream), idempotent("b")))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        proxy_status(status.metadata()),
        Some("tower-upstream; error=destination_unavailable")
    );
    assert!(status.metadata().get("grpc-retry-pushback-ms").is_some());
    assert_eq!(
        calls.load(Ordering::Relaxed),
        2,
        "the upstream saw no third call"
    );
    let snapshot = layer
        .breaker_handle()
        .unwrap()
        .snapshot(&upstream.to_string())
        .unwrap();
    assert_eq!(snapshot.state(), State::Open);
}

/// The same layer type on a tonic server (`Server::layer`): the stack wraps the server's
/// routes, and a handler slower than the deadline is answered `DEADLINE_EXCEEDED`.
#[tokio::test]
async fn stack_on_a_tonic_server() {
    let layer: UpstreamLayer = Upstream::builder()
        .deadline(Duration::from_millis(200))
        .build()
        .unwrap();
    let greeter = Greeter::new(|req: tonic::Request<grpc::HelloRequest>| async move {
        let name = req.into_inner().name;
        if name == "slow" {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok(tonic::Response::new(HelloReply {
            message: format!("hello, {name}"),
        }))
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(layer.clone())
            .add_service(greeter)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let rsp = grpc::say_hello_at(addr, hello_request("quick"))
        .await
        .unwrap();
    assert_eq!(rsp.get_ref().message, "hello, quick");

    let status = grpc::say_hello_at(addr, hello_request("slow"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(status.message(), "upstream did not answer in time");
    let snapshot = layer
        .breaker_handle()
        .unwrap()
        .snapshot(&addr.to_string())
        .expect("the server's calls went through the layer's breaker");
    assert_eq!(snapshot.calls(), 2);
}

/// Sends one gRPC request straight to `channel` through `MapFaults`; returns the
/// classification of the channel's own error and the answer's `Proxy-Status` and
/// `grpc-status`.
async fn channel_fault(
    channel: tonic::transport::Channel,
    uri: &str,
) -> (tower_upstream::fault::Classification, String, String) {
    use tower::ServiceExt;
    let req = || {
        http::Request::builder()
            .uri(uri)
            .header("content-type", "application/grpc")
            .body(tonic::body::Body::empty())
            .unwrap()
    };
    let err = within(channel.clone().oneshot(req()))
        .await
        .unwrap()
        .unwrap_err();
    let c = tower_upstream::fault::classify(&err);
    let layer = tower_upstream::MapFaultsLayer::builder()
        .gateway_name("gw")
        .build()
        .unwrap();
    let res = within(layer.layer(channel).oneshot(req()))
        .await
        .unwrap()
        .unwrap();
    let header = |name: &str| res.headers()[name].to_str().unwrap().to_owned();
    (c, header("proxy-status"), header("grpc-status"))
}

/// A tonic `Channel` reports its connector's failures wrapped in `tonic::ConnectError`: a
/// name that does not resolve is `dns_error` and was not sent, as through a hyper-util client.
#[tokio::test]
async fn a_channel_to_a_name_that_does_not_resolve_is_a_dns_error() {
    use hyper_util::client::legacy::connect::HttpConnector;
    use tower_upstream::fault::{Fault, Sent};
    let channel = tonic::transport::Endpoint::from_static("http://upstream.invalid:50051")
        .connect_with_connector_lazy(HttpConnector::new_with_resolver(support::local_resolver()));
    let (c, proxy_status, grpc_status) = channel_fault(
        channel,
        "http://upstream.invalid:50051/hello.Greeter/SayHello",
    )
    .await;
    assert_eq!((c.fault(), c.sent()), (Fault::DnsError, Sent::NotSent));
    assert_eq!(proxy_status, "gw; error=dns_error");
    assert_eq!(grpc_status, "14");
}

/// A tonic `Channel` whose connect times out (`Endpoint::connect_timeout` sets the
/// `HttpConnector`'s) is `connection_timeout`, not sent; not a response timeout.
#[tokio::test]
async fn a_channel_whose_connect_times_out_is_a_connection_timeout() {
    use hyper_util::client::legacy::connect::HttpConnector;
    use tower_upstream::fault::{Fault, Sent};
    let (addr, _full) = support::unconnectable().await;
    // What `Endpoint::connect_lazy` builds for `connect_timeout(300ms)`.
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_millis(300)));
    let uri = format!("http://{addr}");
    let channel = tonic::transport::Endpoint::from_shared(uri.clone())
        .unwrap()
        .connect_with_connector_lazy(http);
    let (c, proxy_status, grpc_status) =
        channel_fault(channel, &format!("{uri}/hello.Greeter/SayHello")).await;
    assert_eq!(
        (c.fault(), c.sent()),
        (Fault::ConnectionTimeout, Sent::NotSent)
    );
    assert_eq!(proxy_status, "gw; error=connection_timeout");
    assert_eq!(grpc_status, "4");
}

/// A tonic `Channel` whose own timeout fires (`Endpoint::timeout`, or the `grpc-timeout` the
/// stack's attempt timeout puts on the request) fails with `tonic::TimeoutExpired`: a
/// response timeout, 504 / `DEADLINE_EXCEEDED`, not an unclassified error.
#[tokio::test]
async fn a_channel_whose_timeout_fires_is_a_response_timeout() {
    use tower_upstream::fault::{Fault, Sent};
    // An upstream that accepts and never answers.
    let addr = support::raw_upstream(|s| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    })
    .await;
    let uri = format!("http://{addr}");
    let channel = tonic::transport::Endpoint::from_shared(uri.clone())
        .unwrap()
        .timeout(Duration::from_millis(200))
        .connect_lazy();
    let (c, proxy_status, grpc_status) =
        channel_fault(channel, &format!("{uri}/hello.Greeter/SayHello")).await;
    assert_eq!(
        (c.fault(), c.sent()),
        (Fault::HttpResponseTimeout, Sent::MaybeProcessed)
    );
    assert_eq!(proxy_status, "gw; error=http_response_timeout");
    assert_eq!(grpc_status, "4");
}
