//! The fastest upstream there is: answers every request `200 hello` over HTTP/1.1 and h2c.
//! For `benches/gateway-load.sh` and for trying `examples/gateway.rs` by hand.
//!
//! ```text
//! cargo run --example hello_upstream -- --listen 127.0.0.1:8081
//! ```
//!
//! Prints `listening on http://ADDR` (`--listen 127.0.0.1:0`, the default, picks a free
//! port) and serves until Ctrl-C.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

async fn hello(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut res = Response::new(Full::new(Bytes::from_static(b"hello\n")));
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(res)
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 0));
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().map(|a| a.parse())) {
            ("--listen", Some(Ok(addr))) => listen = addr,
            _ => {
                eprintln!("usage: hello_upstream [--listen IP:PORT]");
                return ExitCode::from(2);
            }
        }
    }
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hello_upstream: listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(addr) => println!("listening on http://{addr}"),
        Err(e) => eprintln!("hello_upstream: {e}"),
    }
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(_) => continue,
            },
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection(TokioIo::new(stream), hyper::service::service_fn(hello))
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
