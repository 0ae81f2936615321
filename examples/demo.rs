//! The main job: a flaky upstream, a gateway with tower-upstream's layers in front of it,
//! and real requests through both, all on 127.0.0.1.
//!
//! ```text
//! cargo run --example demo
//! ```
//!
//! The upstream misbehaves per path (refuses, resets, sends garbage, hangs, truncates…); the
//! gateway is an axum app whose proxy route wraps a hyper-util client in the stack from
//! `Upstream::builder()`: `MapFaults`, a 1 s request deadline, retries, a circuit breaker
//! and a 250 ms attempt timeout. The
//! demo prints, for every case, what the gateway's client saw, and exits non-zero if any
//! answer differs from the status table.

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{dns::Name, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower::{service_fn, BoxError, Layer};
use tower_upstream::breaker::BreakerHandle;
use tower_upstream::map_faults::MapFaultsLayer;
use tower_upstream::retry::ReplayBody;
use tower_upstream::{CircuitBreakerLayer, RetryLayer, Upstream};

type Body = UnsyncBoxBody<Bytes, BoxError>;

/// How many requests reached `/flaky`: it resets the first two of every three.
static FLAKY_HITS: AtomicU32 = AtomicU32::new(0);

/// Whether `/down` has recovered (it answers 503 until then).
static DOWN_HEALED: AtomicBool = AtomicBool::new(false);

/// Calls the gateway's retry layer made to its inner service (attempts) for the current case.
static ATTEMPTS: AtomicU32 = AtomicU32::new(0);

/// What the flaky upstream does for a path.
async fn misbehave(mut stream: TcpStream) {
    let head = read_head(&mut stream).await;
    let path = head
        .split(|&b| b == b' ')
        .nth(1)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let reply: Vec<u8> = match path.as_str() {
        "/ok" => b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nhello\n".to_vec(),
        "/upstream-503" => b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 3\r\ncontent-length: 5\r\nconnection: close\r\n\r\nbusy\n".to_vec(),
        "/flaky" if FLAKY_HITS.fetch_add(1, Ordering::Relaxed) % 3 != 2 => {
            #[allow(deprecated)]
            let _ = stream.set_linger(Some(Duration::ZERO));
            return;
        }
        "/flaky" => b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nfinally".to_vec(),
        "/reset" => {
            #[allow(deprecated)] // SO_LINGER 0 is what makes close() send a RST
            let _ = stream.set_linger(Some(Duration::ZERO));
            return;
        }
        "/close" => Vec::new(),
        "/hang" => {
            // Read the request, then never answer (hold the connection open a while).
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        "/down" if DOWN_HEALED.load(Ordering::Relaxed) => {
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nback\n".to_vec()
        }
        "/down" => {
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec()
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(120)).await;
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nslow\n".to_vec()
        }
        "/garbage" => b"\x16\x03\x01 this is not HTTP\r\n\r\n".to_vec(),
        "/http09" => b"<html>no status line</html>\n".to_vec(),
        "/bad-length" => b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\nhello".to_vec(),
        "/two-lengths" => {
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!".to_vec()
        }
        "/huge-head" => {
            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..2100 {
                head.extend_from_slice(format!("x-h-{i:05}: {:0>50}\r\n", i).as_bytes());
            }
            head.extend_from_slice(b"content-length: 0\r\n\r\n");
            head
        }
        "/truncated" => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly 19 bytes here\n".to_vec(),
        _ => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
    };
    let _ = stream.write_all(&reply).await;
    let _ = stream.shutdown().await;
}

async fn read_head(stream: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf
}

async fn start_upstream() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(misbehave(stream));
        }
    });
    Ok(addr)
}

/// Resolves `localhost` only; names under `.invalid` fail as RFC 6761 says they must. The
/// demo never sends a DNS query off the machine.
fn local_resolver() -> impl tower::Service<
    Name,
    Response = std::vec::IntoIter<SocketAddr>,
    Error = io::Error,
    Future = std::future::Ready<io::Result<std::vec::IntoIter<SocketAddr>>>,
> + Clone {
    service_fn(|name: Name| {
        std::future::ready(if name.as_str() == "localhost" {
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], 0))].into_iter())
        } else {
            Err(io::Error::other(
                "failed to lookup address information: Name or service not known",
            ))
        })
    })
}

/// The gateway: an axum app whose proxy route is a hyper-util client wrapped in the crate's
/// stack. `/refused/*` goes to a port nobody listens on, `/dns/*` to a name that does not
/// resolve, everything else to the flaky upstream.
async fn start_gateway(
    upstream: SocketAddr,
    dead_port: SocketAddr,
) -> Result<(SocketAddr, BreakerHandle), BoxError> {
    let client: Client<_, Body> = Client::builder(TokioExecutor::new())
        .build(HttpConnector::new_with_resolver(local_resolver()));

    let proxy = service_fn(move |req: Request<ReplayBody<axum::body::Body>>| {
        let client = client.clone();
        ATTEMPTS.fetch_add(1, Ordering::Relaxed);
        async move {
            let (mut parts, body) = req.into_parts();
            let path = parts.uri.path().to_owned();
            let target = if let Some(rest) = path.strip_prefix("/refused") {
                format!("http://{dead_port}{rest}")
            } else if let Some(rest) = path.strip_prefix("/dns") {
                format!("http://upstream.invalid{rest}")
            } else {
                format!("http://{upstream}{path}")
            };
            parts.uri = Uri::try_from(target)?;
            parts.headers.remove(http::header::HOST);
            let req = Request::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
            Ok::<_, BoxError>(client.request(req).await?)
        }
    });

    // One circuit per path here, so that each demo case has its own (a real gateway keys by
    // upstream, the default); 5 failures in a row open it for 500 ms.
    let breaker = CircuitBreakerLayer::builder()
        .key_fn(|head| Some(Cow::Borrowed(head.uri().path())))
        .consecutive_failures(5)
        .open_duration(Duration::from_millis(500))
        .jitter(0.0)
        .build()?;

    // The stack, outermost first: answer faults; give each request 1 s in all; retry safely
    // (at most 3 attempts, within a budget); break the circuit; give each attempt 250 ms.
    let layer = Upstream::builder()
        .map_faults(MapFaultsLayer::builder().gateway_name("demo-gw").build()?)
        .deadline(Duration::from_secs(1))
        .retry(RetryLayer::builder().max_attempts(3).build()?)
        .breaker(breaker)
        .attempt_timeout(Duration::from_millis(250))
        .build()?;
    let handle = layer.breaker_handle().ok_or("the stack has a breaker")?;
    let app = Router::new().fallback_service(layer.layer(proxy));

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, handle))
}

struct Case {
    method: &'static str,
    path: &'static str,
    fault: &'static str,
    expect: StatusCode,
    /// Attempts the retry layer should make (a range where wall-clock time decides).
    attempts: std::ops::RangeInclusive<u32>,
}

const CASES: &[Case] = &[
    Case {
        method: "GET",
        path: "/ok",
        fault: "none (healthy)",
        expect: StatusCode::OK,
        attempts: 1..=1,
    },
    Case {
        method: "GET",
        path: "/flaky",
        fault: "reset twice, then ok",
        expect: StatusCode::OK,
        attempts: 3..=3,
    },
    Case {
        method: "POST",
        path: "/reset",
        fault: "reset (not idempotent)",
        expect: StatusCode::BAD_GATEWAY,
        attempts: 1..=1,
    },
    Case {
        method: "POST",
        path: "/refused/y",
        fault: "refused (never sent)",
        expect: StatusCode::BAD_GATEWAY,
        attempts: 3..=3,
    },
    Case {
        method: "GET",
        path: "/upstream-503",
        fault: "upstream answers 503",
        expect: StatusCode::SERVICE_UNAVAILABLE,
        attempts: 1..=1,
    },
    Case {
        method: "GET",
        path: "/refused/x",
        fault: "connection refused",
        expect: StatusCode::BAD_GATEWAY,
        attempts: 3..=3,
    },
    Case {
        method: "GET",
        path: "/dns/x",
        fault: "name does not resolve",
        expect: StatusCode::BAD_GATEWAY,
        attempts: 3..=3,
    },
    Case {
        method: "GET",
        path: "/reset",
        fault: "connection reset",
        expect: StatusCode::BAD_GATEWAY,
        attempts: 3..=3,
    },
    Case {
        method: "GET",
        path: "/close",
        fault: "closed, no bytes",
        expect: StatusCode::BAD_GATEWAY,
        attempts: 3..=3,
    },
    Case {
        method: "GET",
        path: "/garbage",
        fault: "garbage bytes",
        expect: StatusCode::BAD_GATEWAY,
        attempts: 3..=3,
    },
    Case {
        method: "GET",
        path: "/http09",
        fault: "HTTP/0.9-style reply",
        expect: StatusCode::BAD_GATEWAY,
        attempts: 3..=3,
    },
    Case {
        method: "GET",
        path: "/bad-length",
        fault: "Content-Length: abc",
        expect: StatusCode::BAD_GATEWAY,
        attempts: 3..=3,
    },
    Case {
        method: "GET",
        path: "/two-lengths",
        fault: "two Content-Lengths",
        expect: StatusCode::BAD_GATEWAY,
        attempts: 3..=3,
    },
    Case {
        method: "GET",
        path: "/huge-head",
        fault: "128 KiB of headers",
        expect: StatusCode::BAD_GATEWAY,
        attempts: 3..=3,
    },
    Case {
        method: "GET",
        path: "/slow",
        fault: "answers in 120 ms",
        expect: StatusCode::OK,
        attempts: 1..=1,
    },
    Case {
        method: "GET",
        path: "/hang",
        fault: "never answers",
        expect: StatusCode::GATEWAY_TIMEOUT,
        // 3 × 250 ms fits in the 1 s deadline, unless a loaded machine delays the backoffs.
        attempts: 2..=3,
    },
    Case {
        method: "GET",
        path: "/truncated",
        fault: "body cut after 200",
        expect: StatusCode::OK,
        attempts: 1..=1,
    },
];

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let upstream = start_upstream().await?;
    let dead_port = {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        l.local_addr()?
    };
    let (gateway, breaker) = start_gateway(upstream, dead_port).await?;
    println!("flaky upstream on {upstream}, gateway on {gateway}\n");

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    println!(
        "{:<6} {:<13} {:<22} {:<6} {:<8} {:<54} {:<10} {:>8}",
        "method", "path", "upstream fault", "status", "attempts", "proxy-status", "body", "latency"
    );
    println!("{}", "-".repeat(134));
    let mut wrong = 0;
    for case in CASES {
        let started = Instant::now();
        ATTEMPTS.store(0, Ordering::Relaxed);
        let req = Request::builder()
            .method(case.method)
            .uri(format!("http://{gateway}{}", case.path))
            .body(Empty::new())?;
        let res: Response<Incoming> = client.request(req).await?;
        let status = res.status();
        let proxy_status = res
            .headers()
            .get("proxy-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let body = match res.into_body().collect().await {
            Ok(b) => format!("{} bytes", b.to_bytes().len()),
            Err(_) => "aborted".to_owned(),
        };
        let body = match body.as_str() {
            "aborted" => body,
            b => b.replace(" bytes", " B"),
        };
        let latency = started.elapsed();
        let attempts = ATTEMPTS.load(Ordering::Relaxed);
        let ok = status == case.expect && case.attempts.contains(&attempts);
        wrong += usize::from(!ok);
        println!(
            "{:<6} {:<13} {:<22} {:<6} {:<8} {:<54} {:<10} {:>6.1}ms{}",
            case.method,
            case.path,
            case.fault,
            status.as_u16(),
            attempts,
            proxy_status,
            body,
            latency.as_secs_f64() * 1e3,
            if ok { "" } else { "  <-- unexpected" }
        );
    }

    println!("\ncircuit breaker on /down (the upstream answers 503 until it recovers):\n");
    println!(
        "{:<34} {:<6} {:<8} {:<42} {:<11} {:<8}",
        "step", "status", "attempts", "proxy-status", "retry-after", "breaker"
    );
    println!("{}", "-".repeat(114));
    let steps: [(&str, bool, StatusCode, u32); 4] = [
        ("GET /down", false, StatusCode::SERVICE_UNAVAILABLE, 3),
        (
            "GET /down (5th failure trips it)",
            false,
            StatusCode::SERVICE_UNAVAILABLE,
            2,
        ),
        (
            "GET /down (open: not sent)",
            false,
            StatusCode::SERVICE_UNAVAILABLE,
            0,
        ),
        ("upstream heals; 0.6 s later GET", true, StatusCode::OK, 1),
    ];
    for (step, heal, expect, expect_attempts) in steps {
        if heal {
            DOWN_HEALED.store(true, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        ATTEMPTS.store(0, Ordering::Relaxed);
        let req = Request::get(format!("http://{gateway}/down")).body(Empty::new())?;
        let res = client.request(req).await?;
        let header = |name: &str| {
            res.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        let (proxy_status, retry_after) = (header("proxy-status"), header("retry-after"));
        let state = breaker
            .snapshot("/down")
            .map(|s| format!("{:?}", s.state()))
            .unwrap_or_default();
        let attempts = ATTEMPTS.load(Ordering::Relaxed);
        let ok = res.status() == expect && attempts == expect_attempts;
        wrong += usize::from(!ok);
        println!(
            "{:<34} {:<6} {:<8} {:<42} {:<11} {:<8}{}",
            step,
            res.status().as_u16(),
            attempts,
            proxy_status,
            retry_after,
            state,
            if ok { "" } else { "  <-- unexpected" }
        );
    }

    println!();
    if wrong > 0 {
        eprintln!("{wrong} answer(s) differ from the status table or the retry policy");
        std::process::exit(1);
    }
    println!("every answer matches the status table and the retry policy");
    Ok(())
}
