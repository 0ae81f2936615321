//! Shared test helpers: misbehaving upstreams on 127.0.0.1, clients, a gateway.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{service_fn, BoxError, Layer, Service};

mod counted;
#[allow(unused_imports)]
pub use counted::Counted;

pub type Body = BoxBody<Bytes, BoxError>;

/// A resolver that never leaves the machine: `localhost` is 127.0.0.1, names under
/// `.invalid` fail the way getaddrinfo fails for an unknown name (RFC 6761 says `.invalid`
/// never resolves), anything else fails too. Tests must not send DNS queries outside.
pub type LocalResolver = tower::util::ServiceFn<
    fn(Name) -> std::future::Ready<Result<std::vec::IntoIter<SocketAddr>, io::Error>>,
>;

pub fn local_resolver() -> LocalResolver {
    fn resolve(
        name: Name,
    ) -> std::future::Ready<Result<std::vec::IntoIter<SocketAddr>, io::Error>> {
        std::future::ready(if name.as_str() == "localhost" {
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], 0))].into_iter())
        } else {
            Err(io::Error::other(
                "failed to lookup address information: Name or service not known",
            ))
        })
    }
    service_fn(resolve as fn(Name) -> _)
}

pub type TestClient = Client<HttpConnector<LocalResolver>, Body>;

/// A hyper-util legacy client that resolves names locally only.
pub fn client() -> TestClient {
    client_with(|_| {})
}

/// Like [`client`], but speaking HTTP/2 only (h2c, prior knowledge): what a gateway in
/// front of a gRPC upstream needs.
pub fn h2_client() -> TestClient {
    let connector = HttpConnector::new_with_resolver(local_resolver());
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector)
}

pub fn client_with(configure: impl FnOnce(&mut HttpConnector<LocalResolver>)) -> TestClient {
    let mut connector = HttpConnector::new_with_resolver(local_resolver());
    configure(&mut connector);
    Client::builder(TokioExecutor::new()).build(connector)
}

pub fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

/// An upstream made of raw TCP: every accepted connection is handed to `behave`.
pub async fn raw_upstream<F, Fut>(behave: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(behave(stream));
        }
    });
    addr
}

/// Reads a request head (up to the blank line); returns it, or what came before EOF.
pub async fn read_head(stream: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf
}

/// An upstream that reads the request head, writes `reply` and closes.
pub async fn replying(reply: &'static [u8]) -> SocketAddr {
    raw_upstream(move |mut s| async move {
        read_head(&mut s).await;
        let _ = s.write_all(reply).await;
        let _ = s.shutdown().await;
    })
    .await
}

/// A port on 127.0.0.1 that nothing listens on: connections to it are refused.
///
/// The port stays bound (to a socket that never listens, kept open until the test process
/// ends), so that another test running alongside cannot be handed the same port for a
/// server of its own: a freed port would be, and this test would then reach that server.
pub async fn closed_port() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    std::mem::forget(socket);
    addr
}

/// An address on 127.0.0.1 where connecting hangs: a listener whose accept queue is full
/// drops further SYNs. The queue stays full while the returned listener and connections live.
pub async fn unconnectable() -> (
    SocketAddr,
    (tokio::net::TcpListener, Vec<tokio::net::TcpStream>),
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(
            std::time::Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
    }
    (addr, (listener, fillers))
}

/// Serves `svc` over HTTP/1.1 and h2c (prior knowledge) on 127.0.0.1; returns the address.
pub async fn serve<S, B>(svc: S) -> SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A forwarding service: sends each request to `upstream` (same path and query, same
/// method and headers, body streamed) through `client`.
pub fn forward(
    client: TestClient,
    upstream: SocketAddr,
) -> impl Service<
    Request<Incoming>,
    Response = Response<Incoming>,
    Error = hyper_util::client::legacy::Error,
    Future = impl Future<Output = Result<Response<Incoming>, hyper_util::client::legacy::Error>> + Send,
> + Clone {
    service_fn(move |req: Request<Incoming>| {
        let (mut parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        parts.uri = Uri::try_from(format!("http://{upstream}{pq}")).unwrap();
        parts.version = http::Version::HTTP_11;
        parts.headers.remove(http::header::HOST);
        let req = Request::from_parts(parts, body.map_err(BoxError::from).boxed());
        client.request(req)
    })
}

/// A gateway on 127.0.0.1 in front of `upstream`: `layer` around a forwarding client.
pub async fn gateway<L>(upstream: SocketAddr, layer: L) -> SocketAddr
where
    L: Layer<
        tower::util::BoxCloneSyncService<
            Request<Incoming>,
            Response<Incoming>,
            hyper_util::client::legacy::Error,
        >,
    >,
    L::Service: Service<Request<Incoming>, Error = Infallible> + Clone + Send + Sync + 'static,
    <L::Service as Service<Request<Incoming>>>::Response: IntoBodyResponse,
    <L::Service as Service<Request<Incoming>>>::Future: Send + 'static,
{
    gateway_with(client(), upstream, layer).await
}

/// Like [`gateway`], forwarding through `client` (e.g. [`h2_client`]).
pub async fn gateway_with<L>(client: TestClient, upstream: SocketAddr, layer: L) -> SocketAddr
where
    L: Layer<
        tower::util::BoxCloneSyncService<
            Request<Incoming>,
            Response<Incoming>,
            hyper_util::client::legacy::Error,
        >,
    >,
    L::Service: Service<Request<Incoming>, Error = Infallible> + Clone + Send + Sync + 'static,
    <L::Service as Service<Request<Incoming>>>::Response: IntoBodyResponse,
    <L::Service as Service<Request<Incoming>>>::Future: Send + 'static,
{
    let inner = tower::util::BoxCloneSyncService::new(forward(client, upstream));
    let svc = tower::ServiceBuilder::new()
        .map_response(IntoBodyResponse::into_body_response)
        .service(layer.layer(inner));
    serve(svc).await
}

/// Lets `gateway` accept any response body type with `Bytes` data.
pub trait IntoBodyResponse {
    fn into_body_response(self) -> Response<Body>;
}

impl<B> IntoBodyResponse for Response<B>
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    fn into_body_response(self) -> Response<Body> {
        self.map(|b| b.map_err(Into::into).boxed())
    }
}

/// Sends one request over HTTP/1.1 with a fresh client.
pub async fn get(
    uri: impl AsRef<str>,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    let req = Request::get(uri.as_ref()).body(empty()).unwrap();
    client().request(req).await
}

/// How long a test may wait on real sockets before it is a failure.
pub const REAL_TIMEOUT: Duration = Duration::from_secs(10);
