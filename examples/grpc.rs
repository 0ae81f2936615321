//! tonic with tower-upstream, both ways, all on 127.0.0.1:
//!
//! 1. **A gateway in front of gRPC upstreams.** A hyper-util server (HTTP/1.1 and h2c) whose
//!    service is `MapFaults → Deadline → AttemptTimeout` around a hyper-util client speaking
//!    HTTP/2 to the upstream. A tonic client calls through it: a healthy upstream answers, a
//!    dead one becomes `UNAVAILABLE`, a hanging one `DEADLINE_EXCEEDED`, an upstream's own
//!    status passes through.
//! 2. **An outbound tonic `Channel` in the whole stack.** `Upstream::builder()` (deadline,
//!    retry with its budget, circuit breaker, attempt timeout) around the `Channel`, with
//!    `IntoTonicBody` between them: a call marked `Idempotent` to an upstream that is
//!    `UNAVAILABLE` twice succeeds on the third attempt; an unmarked call is not retried.
//!
//! ```text
//! cargo run --example grpc --features tonic
//! ```
//!
//! The gRPC service (`hello.Greeter/SayHello`) is written by hand with `prost` derives and
//! tonic's generic server and client, so nothing needs `protoc`. The example exits non-zero if
//! any call ends differently from what is printed as expected.

#[path = "../tests/support/grpc.rs"]
mod greeter;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tonic::Code;
use tower::{service_fn, BoxError, Layer, ServiceBuilder};
use tower_upstream::grpc::IntoTonicBody;
use tower_upstream::map_faults::MapFaultsLayer;
use tower_upstream::retry::Idempotent;
use tower_upstream::{AttemptTimeoutLayer, DeadlineLayer, Upstream};

use greeter::{hello_request, say_hello, Greeter, HelloReply};

/// Starts a gateway in front of `upstream`; returns its address.
async fn start_gateway(upstream: SocketAddr) -> Result<SocketAddr, BoxError> {
    // HTTP/2 (h2c, prior knowledge) to the upstream: gRPC needs it.
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let forward = service_fn(move |req: Request<Incoming>| {
        let (mut parts, body) = req.into_parts();
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = Uri::try_from(format!("http://{upstream}{pq}")).expect("a valid URI");
        let req = Request::from_parts(parts, body.map_err(BoxError::from).boxed());
        client.request(req)
    });
    let svc = ServiceBuilder::new()
        .layer(MapFaultsLayer::builder().gateway_name("grpc-gw").build()?)
        .layer(DeadlineLayer::new(Duration::from_millis(500)))
        .layer(AttemptTimeoutLayer::new(Duration::from_secs(2)))
        .service(forward);

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Prints one outcome; returns whether it was the expected one.
fn report(
    case: &str,
    got: &Result<tonic::Response<HelloReply>, tonic::Status>,
    want: Code,
) -> bool {
    let (code, text) = match got {
        Ok(rsp) => (Code::Ok, rsp.get_ref().message.clone()),
        Err(status) => (status.code(), status.message().to_owned()),
    };
    let ok = code == want;
    let mark = if ok { "ok " } else { "BAD" };
    println!("{mark} {case:<44} {:<18} {text}", format!("{code:?}"));
    if !ok {
        println!("    expected {want:?}");
    }
    ok
}

#[tokio::main]
async fn main() -> Result<ExitCode, BoxError> {
    let mut all_ok = true;

    // --- 1. A gateway in front of gRPC upstreams ------------------------------------------
    println!("A tonic client through a gateway (MapFaults, 500 ms deadline, 2 s attempts):");

    let healthy = greeter::serve_greeter(Greeter::hello()).await;
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        l.local_addr()?
    }; // nothing listens there any more
    let hanging = greeter::serve_greeter(Greeter::new(|_req| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok(tonic::Response::new(HelloReply::default()))
    }))
    .await;
    let refusing = greeter::serve_greeter(Greeter::new(|_req| async {
        Err(tonic::Status::unavailable("orders database is down"))
    }))
    .await;

    for (case, upstream, want) in [
        ("healthy upstream", healthy, Code::Ok),
        (
            "upstream down (connection refused)",
            dead,
            Code::Unavailable,
        ),
        ("upstream hangs", hanging, Code::DeadlineExceeded),
        (
            "upstream answers its own UNAVAILABLE",
            refusing,
            Code::Unavailable,
        ),
    ] {
        let gw = start_gateway(upstream).await?;
        let got = say_hello(
            greeter::channel(gw),
            greeter::origin(gw),
            hello_request("gateway"),
        )
        .await;
        all_ok &= report(case, &got, want);
    }

    // --- 2. An outbound tonic Channel with retries ------------------------------------------
    println!();
    println!("An outbound tonic Channel in the whole stack (3 attempts, 1 s each):");

    // UNAVAILABLE for the first two calls it gets, then OK.
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let flaky = greeter::serve_greeter(Greeter::new(move |req| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        async move {
            if n % 3 < 2 {
                Err(tonic::Status::unavailable("warming up"))
            } else {
                Ok(tonic::Response::new(HelloReply {
                    message: format!("hello, {}", req.into_inner().name),
                }))
            }
        }
    }))
    .await;

    // The whole stack; `IntoTonicBody` puts the retry's replayable body in a tonic body.
    let layer = Upstream::builder()
        .attempt_timeout(Duration::from_secs(1))
        .build()?;
    let channel = layer.layer(IntoTonicBody::new(greeter::channel(flaky)));

    let mut req = hello_request("retries");
    req.extensions_mut().insert(Idempotent);
    let got = say_hello(channel.clone(), greeter::origin(flaky), req).await;
    let attempts = calls.swap(0, Ordering::Relaxed);
    all_ok &= report("idempotent call", &got, Code::Ok);
    println!("    attempts: {attempts}");
    all_ok &= attempts == 3;

    let got = say_hello(channel, greeter::origin(flaky), hello_request("once")).await;
    let attempts = calls.swap(0, Ordering::Relaxed);
    all_ok &= report("unmarked call (not retried)", &got, Code::Unavailable);
    println!("    attempts: {attempts}");
    all_ok &= attempts == 1;

    println!();
    if all_ok {
        println!("every call ended as expected");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("some calls did not end as expected");
        Ok(ExitCode::FAILURE)
    }
}
