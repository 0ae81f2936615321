//! Helpers for the deadline and timeout tests: real upstreams on 127.0.0.1 and a way to keep
//! paused time still until a request has really reached the upstream. (Included with
//! `#[path]`, beside the shared `support/mod.rs` of other tests.)
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::mpsc;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A hyper-util legacy client, as a gateway would use.
pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A request to `addr`.
pub fn request(addr: SocketAddr) -> http::request::Builder {
    http::Request::builder().uri(format!("http://{addr}/"))
}

/// An HTTP/1 upstream (a real hyper server) that reports each request's headers on the
/// returned channel and then never answers.
pub async fn hanging_upstream() -> (SocketAddr, mpsc::Receiver<HeaderMap>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let _ = tx.send(req.headers().clone());
                    std::future::pending::<Result<http::Response<Empty<Bytes>>, Infallible>>()
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// A TCP listener that accepts connections and never reads or writes.
pub async fn silent_listener() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut open = Vec::new();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            open.push(stream);
        }
    });
    addr
}

/// Keeps paused time from auto-advancing until the upstream has seen a request, and yields
/// that request's headers.
///
/// With `start_paused`, tokio advances the clock whenever the runtime is idle, even while real
/// IO is still on its way; a blocking task in flight inhibits that. So the timers under test
/// fire at exactly their virtual time, and only after the request reached the upstream.
pub fn hold_clock_until_seen(seen: mpsc::Receiver<HeaderMap>) -> JoinHandle<HeaderMap> {
    tokio::task::spawn_blocking(move || seen.recv().expect("the upstream saw no request"))
}

/// Asserts at compile time that a type is `Send + Sync + 'static`.
pub fn assert_send_sync<T: Send + Sync + 'static>() {}
