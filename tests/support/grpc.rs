//! A small gRPC service and client written by hand, for tests and `examples/grpc.rs`: the
//! messages with `#[derive(prost::Message)]`, the server with `tonic::server::Grpc`, the client
//! with `tonic::client::Grpc`, both with `tonic_prost::ProstCodec`. No `.proto` file, no
//! `protoc`.
//!
//! The service is `hello.Greeter` with one unary method, `SayHello`:
//!
//! ```text
//! message HelloRequest { string name = 1; }
//! message HelloReply { string message = 1; }
//! service Greeter { rpc SayHello(HelloRequest) returns (HelloReply); }
//! ```
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::Uri;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::client::GrpcService;
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;
use tower::{BoxError, Service};

/// `hello.HelloRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `hello.HelloReply`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    #[prost(string, tag = "1")]
    pub message: String,
}

/// The method's path, as a gRPC client sends it.
pub const SAY_HELLO: &str = "/hello.Greeter/SayHello";

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Response<HelloReply>, Status>> + Send>>;
type Handler = Arc<dyn Fn(Request<HelloRequest>) -> HandlerFuture + Send + Sync>;

/// The `hello.Greeter` server, answering `SayHello` with a handler of your own.
#[derive(Clone)]
pub struct Greeter {
    handler: Handler,
}

impl Greeter {
    /// A greeter whose `SayHello` runs `f`.
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn(Request<HelloRequest>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response<HelloReply>, Status>> + Send + 'static,
    {
        Greeter {
            handler: Arc::new(move |req| Box::pin(f(req))),
        }
    }

    /// A greeter that answers `hello, <name>`.
    pub fn hello() -> Self {
        Greeter::new(|req: Request<HelloRequest>| async move {
            Ok(Response::new(HelloReply {
                message: format!("hello, {}", req.into_inner().name),
            }))
        })
    }
}

impl NamedService for Greeter {
    const NAME: &'static str = "hello.Greeter";
}

impl Service<http::Request<Body>> for Greeter {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let handler = self.handler.clone();
        Box::pin(async move {
            if req.uri().path() != SAY_HELLO {
                return Ok(Status::unimplemented("no such method").into_http());
            }
            let method = tower::service_fn(move |req| handler(req));
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<HelloReply, HelloRequest>::default());
            Ok(grpc.unary(method, req).await)
        })
    }
}

/// Serves `greeter` with tonic's own server (HTTP/2) on 127.0.0.1; returns the address.
pub async fn serve_greeter(greeter: Greeter) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(greeter)
            .serve_with_incoming(incoming),
    );
    addr
}

/// A tonic `Channel` to `addr` that connects on first use.
pub fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect_lazy()
}

/// The `http://addr` origin of a server.
pub fn origin(addr: SocketAddr) -> Uri {
    format!("http://{addr}").parse().expect("a valid URI")
}

/// Calls `SayHello` through `svc` (a `Channel`, a `Channel` wrapped in layers, or any HTTP/2
/// client service), with requests addressed to `origin`, as generated client code would.
pub async fn say_hello<T>(
    svc: T,
    origin: Uri,
    req: Request<HelloRequest>,
) -> Result<Response<HelloReply>, Status>
where
    T: GrpcService<Body>,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<BoxError> + Send,
{
    let mut grpc = tonic::client::Grpc::with_origin(svc, origin);
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(format!("service was not ready: {}", e.into())))?;
    grpc.unary(
        req,
        PathAndQuery::from_static(SAY_HELLO),
        ProstCodec::<HelloRequest, HelloReply>::default(),
    )
    .await
}

/// Calls `SayHello` on the server at `addr` through a fresh `Channel`; a test failure when
/// no answer comes within 10 s.
pub async fn say_hello_at(
    addr: SocketAddr,
    req: Request<HelloRequest>,
) -> Result<Response<HelloReply>, Status> {
    let call = say_hello(channel(addr), origin(addr), req);
    tokio::time::timeout(std::time::Duration::from_secs(10), call)
        .await
        .expect("an answer within 10 s")
}

/// A `SayHello` request for `name`.
pub fn hello_request(name: &str) -> Request<HelloRequest> {
    Request::new(HelloRequest {
        name: name.to_owned(),
    })
}

/// Serves a greeter that answers `UNAVAILABLE` ("warming up") to its first `failures` calls,
/// then `hello, <name>`; returns its address and each call's `grpc-previous-rpc-attempts`.
pub async fn recovering_greeter(failures: u32) -> (SocketAddr, Arc<Mutex<Vec<Option<String>>>>) {
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let greeter = Greeter::new(move |req: Request<HelloRequest>| {
        let n = calls.fetch_add(1, Ordering::Relaxed);
        let previous = req
            .metadata()
            .get("grpc-previous-rpc-attempts")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        record.lock().unwrap().push(previous);
        let name = req.into_inner().name;
        async move {
            if n < failures {
                Err(Status::unavailable("warming up"))
            } else {
                Ok(Response::new(HelloReply {
                    message: format!("hello, {name}"),
                }))
            }
        }
    });
    (serve_greeter(greeter).await, seen)
}
