//! A fixed loop for instruction counts, not a criterion bench: `cargo bench` builds it and
//! runs it as a no-op (so CI only pays for the build). Count instructions per request with
//!
//! ```text
//! B=$(ls target/release/deps/callgrind-* | grep -v '\.d$')
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null $B stack 1000
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null $B stack 11000
//! ```
//!
//! and divide the difference of the two totals by 10 000. Scenarios: `bare`, `tower_retry`,
//! `retry`, `tower_stack`, `stack`, `stack_like_tower` (no deadline, no breaker), `shell` (every part off); `bare_proxied`, `stack_proxied`: the same with the head of
//! a request as a proxy forwards it (see [`proxied`]) and an answer with headers; `sizes`
//! prints the response futures' sizes.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::Empty;
use tower::{Layer, Service, ServiceBuilder};
use tower_upstream::retry::ReplayBody;
use tower_upstream::{RetryLayer, Upstream};

mod common;
use common::{drive, inner, tower_policy};

/// A request as examples/gateway hands it to its client: an absolute URI whose path and query
/// were built per request; three headers as hyper parses them (slices of one shared read
/// buffer), `via` from the configuration and `forwarded` built per request. Copying it (as a
/// retry must) allocates, unlike the empty heads of the other scenarios.
fn proxied<B: Default>() -> Request<B> {
    let uri = http::Uri::from_maybe_shared(Bytes::from(String::from(
        "http://127.0.0.1:8080/hello?from=load",
    )))
    .unwrap();
    let mut read = BytesMut::from(&b"127.0.0.1:9090wrk*/*"[..]);
    let parsed = read.split_to(20).freeze();
    let value = |range| http::HeaderValue::from_maybe_shared(parsed.slice(range)).unwrap();
    Request::builder()
        .uri(uri)
        .header("host", value(0..14))
        .header("user-agent", value(14..17))
        .header("accept", value(17..20))
        .header("via", http::HeaderValue::from_static("1.1 load-gw"))
        .header(
            "forwarded",
            http::HeaderValue::try_from(String::from(
                "for=127.0.0.1;proto=http;host=\"127.0.0.1:9090\"",
            ))
            .unwrap(),
        )
        .body(B::default())
        .unwrap()
}

/// The inner service of the `_proxied` scenarios: a ready response with the headers an
/// upstream's answer has (which the breaker and the retry policy look at).
fn upstream_answer<B>(
) -> impl Service<Request<B>, Response = Response<()>, Error = std::convert::Infallible> + Clone {
    tower::service_fn(|_req: Request<B>| {
        let rsp = Response::builder()
            .header("content-type", http::HeaderValue::from_static("text/plain"))
            .header("content-length", http::HeaderValue::from_static("12"))
            .header(
                "date",
                http::HeaderValue::from_static("Sun, 22 Nov 2026 07:00:00 GMT"),
            )
            .body(())
            .unwrap();
        std::future::ready(Ok(rsp))
    })
}

fn size_of_future<S, B>(mut svc: S, req: Request<B>) -> usize
where
    S: Service<Request<B>>,
{
    std::mem::size_of_val(&svc.call(req))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`: nothing to do.
    let (Some(scenario), iters) = (
        args.first().filter(|a| !a.starts_with("--")),
        args.get(1)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(1000),
    ) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let unit = || Request::new(());
    let empty = || Request::new(Empty::<Bytes>::new());
    match scenario.as_str() {
        "bare" => rt.block_on(drive(inner::<()>(), iters, unit)),
        "tower_retry" => rt.block_on(drive(
            tower::retry::Retry::new(tower_policy(), inner::<()>()),
            iters,
            unit,
        )),
        "retry" => rt.block_on(drive(
            RetryLayer::new().layer(inner::<ReplayBody<Empty<Bytes>>>()),
            iters,
            empty,
        )),
        "tower_stack" => rt.block_on(drive(
            ServiceBuilder::new()
                .retry(tower_policy())
                .timeout(Duration::from_secs(10))
                .service(inner::<()>()),
            iters,
            unit,
        )),
        "stack" => {
            let layer = Upstream::builder().build().unwrap();
            rt.block_on(drive(
                layer.layer(inner::<ReplayBody<Empty<Bytes>>>()),
                iters,
                empty,
            ))
        }
        // Ours doing what tower's three do (retry with a budget, a timeout), and no more.
        "stack_like_tower" => {
            let layer = Upstream::builder()
                .no_deadline()
                .no_breaker()
                .build()
                .unwrap();
            rt.block_on(drive(
                layer.layer(inner::<ReplayBody<Empty<Bytes>>>()),
                iters,
                empty,
            ))
        }
        // The stack with every part off: what `Upstream` itself costs.
        "shell" => {
            let layer = Upstream::builder()
                .no_deadline()
                .no_retry()
                .no_breaker()
                .no_attempt_timeout()
                .build()
                .unwrap();
            rt.block_on(drive(
                layer.layer(inner::<ReplayBody<Empty<Bytes>>>()),
                iters,
                empty,
            ))
        }
        "bare_proxied" => rt.block_on(drive(upstream_answer::<()>(), iters, proxied::<()>)),
        "stack_proxied" => {
            let layer = Upstream::builder().build().unwrap();
            rt.block_on(drive(
                layer.layer(upstream_answer::<ReplayBody<Empty<Bytes>>>()),
                iters,
                proxied::<Empty<Bytes>>,
            ))
        }
        "sizes" => {
            let _guard = rt.enter();
            let layer = Upstream::builder().build().unwrap();
            println!(
                "retry future: {} bytes",
                size_of_future(
                    RetryLayer::new().layer(inner::<ReplayBody<Empty<Bytes>>>()),
                    empty()
                )
            );
            println!(
                "tokio Sleep: {} bytes, request head: {} bytes, Response<()>: {} bytes",
                std::mem::size_of::<tokio::time::Sleep>(),
                std::mem::size_of::<http::request::Parts>(),
                std::mem::size_of::<Response<()>>(),
            );
            println!(
                "stack future: {} bytes",
                size_of_future(layer.layer(inner::<ReplayBody<Empty<Bytes>>>()), empty())
            );
        }
        other => eprintln!("unknown scenario {other}"),
    }
}
