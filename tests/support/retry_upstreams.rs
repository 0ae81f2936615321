//! Test upstreams on 127.0.0.1.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the upstream does with one request (after reading its whole body).
pub enum Action {
    /// Close the connection without an answer (the client sees the connection end before a
    /// response head: maybe processed).
    Reset,
    /// Answer with this response.
    Respond(Response<Full<Bytes>>),
}

/// One request the upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A hyper HTTP/1.1 upstream whose behaviour per request is scripted.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    /// Starts an upstream; `script(n, seen)` decides what request number `n` (0-based) gets.
    pub async fn start<F>(script: F) -> Upstream
    where
        F: Fn(usize, &Seen) -> Action + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(script);
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen2.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        let script = script.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = match body.collect().await {
                                Ok(b) => b.to_bytes(),
                                Err(e) => return Err(std::io::Error::other(e.to_string())),
                            };
                            let s = Seen {
                                method: parts.method,
                                headers: parts.headers,
                                body,
                            };
                            let n = {
                                let mut seen = seen.lock().unwrap();
                                seen.push(s.clone());
                                seen.len() - 1
                            };
                            match script(n, &s) {
                                Action::Reset => Err(std::io::Error::other("reset")),
                                Action::Respond(rsp) => Ok(rsp),
                            }
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, seen }
    }

    /// Fails the first `n` requests with `fail`, then answers 200 "ok".
    pub async fn flaky(n: usize, fail: fn() -> Action) -> Upstream {
        Upstream::start(move |i, _| if i < n { fail() } else { ok() }).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

pub fn ok() -> Action {
    status(StatusCode::OK)
}

pub fn status(status: StatusCode) -> Action {
    Action::Respond(
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"ok")))
            .unwrap(),
    )
}

/// An address nobody listens on: bound to a socket that never listens, kept open until the
/// test process ends, so that no other test is handed the port (see `closed_port` in
/// `support/mod.rs`).
pub async fn closed_addr() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    std::mem::forget(socket);
    addr
}
