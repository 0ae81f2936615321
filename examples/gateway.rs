//! A small reverse proxy built on tower-upstream: routes by path prefix, each route with its
//! own upstream and its own stack (deadline, attempt timeout, retries, circuit breaker with a
//! forced-open switch, concurrency limit), HTTP/1.1 and h2c downstream.
//!
//! ```text
//! cargo run --example gateway -- --config examples/gateway.toml
//! cargo run --example gateway -- --check --config examples/gateway.toml   # validate, exit
//! cargo run --example gateway -- --bare                                  # no layers at all
//! ```
//!
//! Options: `--config PATH` (default `examples/gateway.toml`), `--listen ADDR` (overrides the
//! file's `listen`), `--bare` (the same proxy with no tower-upstream layers: upstream errors
//! answer a plain 502; for load comparisons), `--check` (load and build every route, print a
//! summary, exit 0; non-zero on any configuration error).
//!
//! What it does with a request:
//!
//! - **Routing**: the longest route prefix that matches on a segment boundary (`/api` matches
//!   `/api`, `/api/x` and `/api?q`, not `/apix`) wins; the prefix is stripped, the rest of the
//!   path and the query are appended to the route's upstream URL (`http://10.0.0.7/v1` +
//!   `/api/users?id=7` → `http://10.0.0.7/v1/users?id=7`). No match: 404 from the gateway.
//!   A path with a `..` segment (which the upstream would resolve out of the base path)
//!   answers 400. `CONNECT` answers 405 (no tunnels), `OPTIONS *` the gateway answers itself.
//! - **Hop-by-hop headers** (RFC 9110 §7.6.1), in both directions: `Connection` and every
//!   header it names, `Proxy-Connection`, `Keep-Alive`, `TE` (but `te: trailers` is kept on
//!   requests, which gRPC needs), `Transfer-Encoding`, `Upgrade`, `Proxy-Authenticate` and
//!   `Proxy-Authorization` are not forwarded. Upgrades (WebSocket) are not supported.
//! - **`Via`** (RFC 9110 §7.6.3): `1.1 <name>` (the received version: `1.0`, `1.1` or `2`)
//!   appended to forwarded requests and to the upstream's responses; answers the gateway
//!   makes itself (404, 502/503/504) carry none.
//! - **`Forwarded`** (RFC 7239): `for=<client ip>;proto=http;host=<Host the client sent>`
//!   appended (IPv6 and `host:port` quoted). The upstream's `Host` is its own authority.
//! - **The stack**: each route's `UpstreamLayer` around a hyper-util client (HTTP/1.1, or
//!   h2c with `http2 = true`); faults answer 502/503/504 with `Proxy-Status` (or a gRPC
//!   status for gRPC requests). The stack is read as `tower_upstream::config::UpstreamConfig`
//!   (durations like `"250ms"`); `breaker.mode = "forced_open"` is an operator's switch: the
//!   route answers 503 with `Retry-After` without calling the upstream.
//! - **`Max-Forwards`** (RFC 9110 §7.6.2), on `OPTIONS` and `TRACE`: decremented when
//!   forwarded; at `0` the gateway answers as the final recipient instead of forwarding:
//!   `OPTIONS` gets `200` with `Allow`, `TRACE` gets `405` (reflecting a request echoes its
//!   credentials; the RFC only says SHOULD). A value that is not a number answers `400`.
//! - **`/_upstream/status`**: JSON with every route's breakers (state, calls, failures,
//!   failure rate…) and retry budget balance.
//! - **`POST /_upstream/breaker?route=/api&mode=forced_open`** (or `automatic`, `disabled`):
//!   the operator's switch at run time, accepted from loopback addresses only (there is no
//!   authentication); answers the route's status.
//!
//! The functions here are a small library, so that `tests/gateway.rs` can drive the same code
//! over real sockets: [`Config`], [`Gateway`] and [`serve`].

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as HttpBody;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{self, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use pin_project_lite::pin_project;
use serde::Deserialize;
use tokio::net::TcpListener;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_upstream::breaker::{NO_KEY, OVERFLOW_KEY};
use tower_upstream::config::UpstreamConfig;
use tower_upstream::map_faults::FaultBody;
use tower_upstream::retry::ReplayBody;
use tower_upstream::{ConfigError, Upstream, UpstreamLayer};

/// Where the gateway serves its status JSON.
pub const STATUS_PATH: &str = "/_upstream/status";
/// Where an operator switches a route's breakers at run time:
/// `POST /_upstream/breaker?route=/api&mode=forced_open` (or `automatic`, `disabled`), from
/// the gateway's own host only.
pub const BREAKER_PATH: &str = "/_upstream/breaker";

/// Every response body the gateway sends: through the stack, through the bare proxy, or
/// made by the gateway itself (404, status JSON, the bare proxy's 502).
pub type Body = Either<Either<FaultBody<Incoming>, Incoming>, Full<Bytes>>;

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// The gateway's configuration file (TOML); see `examples/gateway.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where to listen (default `127.0.0.1:8080`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The gateway's name, in `Via` and `Proxy-Status` (default `tower-upstream-gateway`).
    #[serde(default = "default_name")]
    pub name: String,
    /// The routes, matched by longest prefix.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// One route: a path prefix, an upstream and the stack in front of it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The path prefix, starting with `/` (`/` alone matches everything).
    pub prefix: String,
    /// The upstream's base URL: `http://host:port` with an optional base path.
    pub upstream: String,
    /// Speak HTTP/2 (h2c, prior knowledge) to the upstream instead of HTTP/1.1.
    #[serde(default)]
    pub http2: bool,
    /// The route's stack, as [`UpstreamConfig`] reads it: every field optional (the
    /// crate's defaults). `breaker.mode = "forced_open"` is the operator's switch: the route
    /// answers 503 + `Retry-After` without calling its upstream.
    #[serde(default)]
    pub stack: UpstreamConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_name() -> String {
    "tower-upstream-gateway".to_owned()
}

impl Config {
    /// Parses a configuration from TOML text. An error names the setting by its path
    /// (`routes[1].stack.retry.backoff.base`).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError::new("toml", e.to_string().trim_end().to_owned()))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "toml".to_owned() } else { path };
            ConfigError::new(field, e.into_inner().to_string().trim_end().to_owned())
        })
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("file", format!("{}: {e}", path.display())))?;
        Config::from_toml(&text)
    }
}

fn invalid(route: usize, field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::new(format!("routes[{route}].{field}"), message)
}

// ---------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------

/// With or without tower-upstream's layers.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Each route's full stack.
    Full,
    /// No layers: the client alone; an upstream error answers a plain 502.
    Bare,
}

/// The proxy: its routes, each with its client and stack. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Gateway {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    mode: Mode,
    via: Arc<Via>,
    /// In configuration order (the status JSON's order).
    routes: Vec<Route>,
    /// Indexes into `routes`, longest prefix first.
    by_length: Vec<usize>,
}

struct Route {
    prefix: String,
    upstream: String,
    target: Target,
    http2: bool,
    service: RouteService,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("prefix", &self.prefix)
            .field("upstream", &self.upstream)
            .field("http2", &self.http2)
            .finish_non_exhaustive()
    }
}

// One per route, made once: their sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum RouteService {
    Full(Stacked),
    Bare(Forward<Incoming>),
}

/// A route's stack, and the layer it came from (for the status JSON).
struct Stacked {
    service: Upstream<Forward<ReplayBody<Incoming>>>,
    layer: UpstreamLayer,
}

impl Gateway {
    /// [`new`](Self::new), but every route's stack is checked even for a bare gateway: a
    /// file that `--bare` (or `--check --bare`) accepts is one the full gateway runs.
    pub fn checked(config: &Config, mode: Mode) -> Result<Gateway, ConfigError> {
        let full = Gateway::new(config, Mode::Full)?;
        match mode {
            Mode::Full => Ok(full),
            Mode::Bare => Gateway::new(config, Mode::Bare),
        }
    }

    /// Checks `config` and builds every route's client and stack. Fails on the first bad
    /// field (a malformed or duplicate prefix, a non-`http` upstream, an invalid stack
    /// setting…), naming it: `routes[2].stack.retry.budget.ratio`.
    pub fn new(config: &Config, mode: Mode) -> Result<Gateway, ConfigError> {
        let via = Arc::new(Via::new(&config.name).map_err(|e| ConfigError::new("name", e))?);
        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, rc) in config.routes.iter().enumerate() {
            let prefix = normalize_prefix(&rc.prefix).map_err(|e| invalid(i, "prefix", e))?;
            if let Some(j) = routes.iter().position(|r: &Route| r.prefix == prefix) {
                return Err(invalid(
                    i,
                    "prefix",
                    format!("{prefix:?} is also routes[{j}]'s"),
                ));
            }
            let target = Target::parse(&rc.upstream).map_err(|e| invalid(i, "upstream", e))?;
            let service = match mode {
                Mode::Bare => RouteService::Bare(Forward::new(rc.http2, via.clone())),
                Mode::Full => {
                    let mut stack = rc.stack.clone();
                    stack
                        .map_faults
                        .gateway_name
                        .get_or_insert_with(|| config.name.clone());
                    let layer = stack
                        .build()
                        .map_err(|e| e.in_field(format!("routes[{i}].stack")))?;
                    let service = layer.layer(Forward::new(rc.http2, via.clone()));
                    RouteService::Full(Stacked { service, layer })
                }
            };
            routes.push(Route {
                prefix,
                upstream: rc.upstream.clone(),
                target,
                http2: rc.http2,
                service,
            });
        }
        let mut by_length: Vec<usize> = (0..routes.len()).collect();
        by_length.sort_by_key(|&i| std::cmp::Reverse(routes[i].prefix.len()));
        Ok(Gateway {
            inner: Arc::new(Inner {
                name: config.name.clone(),
                mode,
                via,
                routes,
                by_length,
            }),
        })
    }

    /// The routes' prefixes and upstreams, in configuration order.
    pub fn routes(&self) -> impl Iterator<Item = (&str, &str)> {
        self.inner
            .routes
            .iter()
            .map(|r| (r.prefix.as_str(), r.upstream.as_str()))
    }

    /// Answers one request from a client at `peer`. Never fails: faults are answers.
    pub async fn handle(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let path = req.uri().path();
        if path == STATUS_PATH {
            return json_response(StatusCode::OK, &self.status());
        }
        if path == BREAKER_PATH {
            return self.switch_breaker(&req, peer);
        }
        // Only a path is routed: a CONNECT (authority form) would be turned into a tunnel
        // to the upstream itself, `OPTIONS *` into `OPTIONS <base>*`, and a GET in
        // authority form into one for the base path.
        if req.method() == Method::CONNECT {
            let mut res = text_response(StatusCode::METHOD_NOT_ALLOWED, "no tunnels\n");
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(ALLOW));
            return res;
        }
        if !path.starts_with('/') {
            if req.method() == Method::OPTIONS && path == "*" {
                let mut res = Response::new(Either::Right(Full::new(Bytes::new())));
                res.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(ALLOW));
                return res;
            }
            return text_response(StatusCode::BAD_REQUEST, "bad request target\n");
        }
        let Some(route) = self.route(path) else {
            return text_response(StatusCode::NOT_FOUND, "no route\n");
        };
        if let Some(answer) = max_forwards(&mut req) {
            return answer;
        }
        let req = match route.prepare(req, peer, &self.inner.via) {
            Ok(req) => req,
            Err(msg) => return text_response(StatusCode::BAD_REQUEST, msg),
        };
        match &route.service {
            RouteService::Full(stacked) => {
                // `ready`, then `call`, on a clone: what `oneshot` does, without moving the
                // request and then the response future into a state machine of its own (a
                // copy of each, measured at 300 instructions a request).
                let mut service = stacked.service.clone();
                let Ok(ready) = service.ready().await;
                match ready.call(req).await {
                    Ok(res) => res.map(|b| Either::Left(Either::Left(b))),
                    Err(never) => match never {},
                }
            }
            // What a proxy without tower-upstream does: call the client.
            RouteService::Bare(forward) => match forward.send(req).await {
                Ok(res) => res.map(|b| Either::Left(Either::Right(b))),
                Err(_) => text_response(StatusCode::BAD_GATEWAY, "bad gateway\n"),
            },
        }
    }

    fn route(&self, path: &str) -> Option<&Route> {
        let routes = &self.inner.routes;
        self.inner
            .by_length
            .iter()
            .map(|&i| &routes[i])
            .find(|r| prefix_matches(&r.prefix, path))
    }

    /// The operator's switch: sets the breaker mode of the route named in the query
    /// (`route=<prefix as configured>&mode=forced_open|automatic|disabled`) and answers the
    /// route's status. Only `POST`, and only from a loopback address: the gateway has no
    /// authentication, so the switch is for someone on its host.
    fn switch_breaker<B>(&self, req: &Request<B>, peer: SocketAddr) -> Response<Body> {
        // Canonical: on a dual-stack listener 127.0.0.1 arrives as ::ffff:127.0.0.1.
        if !peer.ip().to_canonical().is_loopback() {
            return text_response(StatusCode::FORBIDDEN, "only from the gateway's host\n");
        }
        if req.method() != Method::POST {
            let mut res = text_response(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return res;
        }
        let (mut route, mut mode) = (None, None);
        for pair in req.uri().query().unwrap_or("").split('&') {
            match pair.split_once('=') {
                Some(("route", v)) => route = Some(v),
                Some(("mode", v)) => mode = Some(v),
                _ => {}
            }
        }
        let (Some(route), Some(mode)) = (route, mode) else {
            return text_response(
                StatusCode::BAD_REQUEST,
                "want ?route=<prefix>&mode=forced_open|automatic|disabled\n",
            );
        };
        let Some(route) = normalize_prefix(route)
            .ok()
            .and_then(|p| self.inner.routes.iter().find(|r| r.prefix == p))
        else {
            return text_response(StatusCode::NOT_FOUND, "no such route\n");
        };
        let handle = match &route.service {
            RouteService::Full(stacked) => stacked.layer.breaker_handle(),
            RouteService::Bare(_) => None,
        };
        let Some(handle) = handle else {
            return text_response(StatusCode::CONFLICT, "the route has no breaker\n");
        };
        match mode {
            "forced_open" => handle.force_open(),
            "disabled" => handle.disable(),
            "automatic" => handle.automatic(),
            _ => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    "mode is forced_open, automatic or disabled\n",
                )
            }
        }
        json_response(StatusCode::OK, &route.status())
    }

    /// The status JSON: every route's breakers and retry budget.
    pub fn status(&self) -> serde_json::Value {
        let routes: Vec<_> = self.inner.routes.iter().map(Route::status).collect();
        serde_json::json!({
            "gateway": self.inner.name,
            "mode": match self.inner.mode { Mode::Full => "full", Mode::Bare => "bare" },
            "routes": routes,
        })
    }
}

impl Route {
    /// Rewrites a client's request for the upstream: target URI, version, hop-by-hop headers
    /// out, `Via` and `Forwarded` in, `Host` left for the client to set from the URI.
    fn prepare(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        via: &Via,
    ) -> Result<Request<Incoming>, &'static str> {
        let (mut parts, body) = req.into_parts();
        // The target's authority first: with an absolute-form target (or HTTP/2's
        // `:authority`) the received Host is to be ignored (RFC 9112 §3.2.2). Without its
        // userinfo (`user:password@`), which is no part of the host and must not travel.
        let host = parts
            .uri
            .authority()
            .and_then(|a| {
                let host_port = a.as_str().rsplit('@').next().unwrap_or_default();
                HeaderValue::from_str(host_port).ok()
            })
            .or_else(|| parts.headers.get(header::HOST).cloned());
        parts.uri = self.target.join(&self.prefix, &parts.uri)?;
        strip_hop_by_hop(&mut parts.headers, Direction::Request);
        parts
            .headers
            .append(header::VIA, via.for_version(parts.version));
        parts
            .headers
            .append(header::FORWARDED, forwarded(peer, host.as_ref()));
        parts.headers.remove(header::HOST);
        parts.version = if self.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        Ok(Request::from_parts(parts, body))
    }

    fn status(&self) -> serde_json::Value {
        let (breaker, budget) = match &self.service {
            RouteService::Full(stacked) => (
                stacked.layer.breaker_handle().map(|h| {
                    let circuits: Vec<_> = h
                        .snapshots()
                        .iter()
                        // The breakers for requests without a key and for keys past the
                        // limit exist from the start; show them once they have seen calls.
                        .filter(|s| s.calls() > 0 || (s.key() != NO_KEY && s.key() != OVERFLOW_KEY))
                        .map(|s| {
                            serde_json::json!({
                                "key": s.key(),
                                "state": s.state().as_str(),
                                "calls": s.calls(),
                                "failures": s.failures(),
                                "failure_rate": s.failure_rate(),
                                "consecutive_failures": s.consecutive_failures(),
                                "probes_in_flight": s.probes_in_flight(),
                                "ms_until_probe": s.time_until_probe().map(|d| d.as_millis() as u64),
                            })
                        })
                        .collect();
                    serde_json::json!({
                        "mode": h.mode().map_or("automatic", |m| m.as_str()),
                        "circuits": circuits,
                    })
                }),
                stacked.layer.retry_budget().map(|b| {
                    serde_json::json!({
                        "balance": b.balance(),
                        "exhausted": b.exhausted(),
                        "ratio": b.ratio(),
                        "min_per_second": b.min_per_second(),
                    })
                }),
            ),
            RouteService::Bare(_) => (None, None),
        };
        serde_json::json!({
            "prefix": self.prefix,
            "upstream": self.upstream,
            "http2": self.http2,
            "breaker": breaker,
            "retry_budget": budget,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Routing and rewriting
// ---------------------------------------------------------------------------------------

/// A prefix as routing uses it: starts with `/`, no trailing `/` (except `/` itself), no
/// query, not under `/_upstream`.
fn normalize_prefix(prefix: &str) -> Result<String, String> {
    if !prefix.starts_with('/') {
        return Err(format!("must start with '/' (got {prefix:?})"));
    }
    if prefix.contains(['?', '#']) || prefix.parse::<PathAndQuery>().is_err() {
        return Err(format!("must be a plain path (got {prefix:?})"));
    }
    let trimmed = prefix.trim_end_matches('/');
    if trimmed == "/_upstream" || trimmed.starts_with("/_upstream/") {
        return Err(format!("{prefix:?} is reserved for the gateway's status"));
    }
    Ok(if trimmed.is_empty() { "/" } else { trimmed }.to_owned())
}

/// Whether `prefix` matches `path` on a segment boundary.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// A route's upstream: scheme and authority, and a base path to put in front.
#[derive(Debug)]
struct Target {
    authority: Authority,
    /// Without a trailing `/`; empty for none.
    base: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("not a URL ({e}): {url:?}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "only http:// upstreams (this example has no TLS), got {other}://"
                ))
            }
            None => return Err(format!("needs http://host:port, got {url:?}")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("needs a host, got {url:?}"))?
            .clone();
        if uri.query().is_some() {
            return Err(format!("must not have a query, got {url:?}"));
        }
        Ok(Target {
            authority,
            base: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The upstream URI for a request: the base path, then the request's path without the
    /// route's prefix, then its query.
    fn join(&self, prefix: &str, uri: &Uri) -> Result<Uri, &'static str> {
        let path = uri.path();
        // The upstream resolves `..` (RFC 3986 §5.2.4, `%2e` being `.`): `/api/../admin`
        // would reach `/admin` there, out of the route's base path, under this route's
        // stack. Clients remove dot segments before sending; one that did not is refused.
        if path.split('/').any(is_dot_dot) {
            return Err("dot segments in the path\n");
        }
        let rest = if prefix == "/" {
            path
        } else {
            &path[prefix.len().min(path.len())..]
        };
        let mut pq = String::with_capacity(
            self.base.len() + rest.len() + 1 + uri.query().map_or(0, str::len),
        );
        pq.push_str(&self.base);
        pq.push_str(rest);
        if pq.is_empty() {
            pq.push('/');
        }
        if let Some(q) = uri.query() {
            pq.push('?');
            pq.push_str(q);
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(
            PathAndQuery::from_maybe_shared(Bytes::from(pq)).map_err(|_| "bad request target\n")?,
        );
        Uri::from_parts(parts).map_err(|_| "bad request target\n")
    }
}

/// Whether a path segment is `..`, dots percent-encoded or not (no allocation: it runs on
/// every segment of every request).
fn is_dot_dot(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', e, tail @ ..] if e.eq_ignore_ascii_case(&b'e') => tail,
            _ => return false,
        };
        dots += 1;
    }
    dots == 2
}

// ---------------------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------------------

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1): those `Connection` names, and the
/// ones every proxy knows. A request's `te: trailers` survives (gRPC over h2 needs it).
fn strip_hop_by_hop(headers: &mut HeaderMap, direction: Direction) {
    let keep_trailers = direction == Direction::Request
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            });
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            // Bytes, not `to_str`: one non-ASCII option must not keep the others.
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    if keep_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// `Via` values for each received version, made once.
#[derive(Debug)]
struct Via {
    http10: HeaderValue,
    http11: HeaderValue,
    http2: HeaderValue,
    http3: HeaderValue,
}

impl Via {
    fn new(name: &str) -> Result<Via, String> {
        let value = |version: &str| {
            HeaderValue::from_str(&format!("{version} {name}"))
                .ok()
                .filter(|_| !name.is_empty() && name.bytes().all(is_tchar))
                .ok_or_else(|| {
                    format!("{name:?} is not a valid Via pseudonym (a token, no spaces)")
                })
        };
        Ok(Via {
            http10: value("1.0")?,
            http11: value("1.1")?,
            http2: value("2")?,
            http3: value("3")?,
        })
    }

    fn for_version(&self, version: Version) -> HeaderValue {
        match version {
            Version::HTTP_10 | Version::HTTP_09 => self.http10.clone(),
            Version::HTTP_2 => self.http2.clone(),
            Version::HTTP_3 => self.http3.clone(),
            _ => self.http11.clone(),
        }
    }
}

/// `for=…;proto=http;host=…` (RFC 7239): IPv6 in quoted brackets, values that are not
/// tokens quoted.
fn forwarded(peer: SocketAddr, host: Option<&HeaderValue>) -> HeaderValue {
    let mut value = match peer.ip().to_canonical() {
        IpAddr::V4(ip) => format!("for={ip};proto=http"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\";proto=http"),
    };
    if let Some(host) = host.and_then(|h| h.to_str().ok()) {
        value.push_str(";host=");
        if !host.is_empty() && host.bytes().all(is_tchar) {
            value.push_str(host);
        } else {
            value.push('"');
            for c in host.chars() {
                if c == '"' || c == '\\' {
                    value.push('\\');
                }
                value.push(c);
            }
            value.push('"');
        }
    }
    // Made of an IP, ASCII tokens and a quoted visible-ASCII string: always valid.
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("for=unknown"))
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

// ---------------------------------------------------------------------------------------
// The client side: one request to the upstream
// ---------------------------------------------------------------------------------------

/// Sends a prepared request to its upstream with a hyper-util client, and makes the answer
/// fit for the client: hop-by-hop headers out, `Via` in.
pub struct Forward<B> {
    // One reference to count per clone (the gateway clones a route's stack, and so this,
    // for each request), not one per part of the client.
    inner: Arc<ForwardInner<B>>,
}

struct ForwardInner<B> {
    client: Client<HttpConnector, B>,
    via: Arc<Via>,
}

impl<B> Clone for Forward<B> {
    fn clone(&self) -> Self {
        Forward {
            inner: self.inner.clone(),
        }
    }
}

impl<B> fmt::Debug for Forward<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward").finish_non_exhaustive()
    }
}

impl<B> Forward<B>
where
    B: HttpBody + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn new(http2: bool, via: Arc<Via>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .pool_max_idle_per_host(256)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Forward {
            inner: Arc::new(ForwardInner { client, via }),
        }
    }

    /// Sends `req`; what the bare gateway calls directly, and the stack through `Service`.
    fn send(&self, req: Request<B>) -> ForwardFuture {
        ForwardFuture {
            inner: self.inner.client.request(req),
            via: self.inner.via.clone(),
        }
    }
}

impl<B> Service<Request<B>> for Forward<B>
where
    B: HttpBody + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Incoming>;
    type Error = legacy::Error;
    type Future = ForwardFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> ForwardFuture {
        self.send(req)
    }
}

pin_project! {
    /// The upstream's answer, headers cleaned.
    pub struct ForwardFuture {
        #[pin]
        inner: legacy::ResponseFuture,
        via: Arc<Via>,
    }
}

impl Future for ForwardFuture {
    type Output = Result<Response<Incoming>, legacy::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = std::task::ready!(this.inner.poll(cx))?;
        let version = res.version();
        let headers = res.headers_mut();
        strip_hop_by_hop(headers, Direction::Response);
        headers.append(header::VIA, this.via.for_version(version));
        Poll::Ready(Ok(res))
    }
}

// ---------------------------------------------------------------------------------------
// The server side
// ---------------------------------------------------------------------------------------

/// Serves `gateway` on `listener` (HTTP/1.1 and h2c) until `shutdown` completes, then lets
/// open connections finish (up to 10 s).
pub async fn serve(listener: TcpListener, gateway: Gateway, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors, most likely: let some connections close.
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let gateway = gateway.clone();
        let svc = hyper::service::service_fn(move |req| {
            let gateway = gateway.clone();
            async move { Ok::<_, Infallible>(gateway.handle(req, peer).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(10)) => {}
    }
}

/// The methods the gateway forwards, for an `OPTIONS` it answers itself.
pub const ALLOW: &str = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE";

/// RFC 9110 §7.6.2: on `OPTIONS` and `TRACE`, a `Max-Forwards` of 0 makes the gateway the
/// final recipient (its own answer, returned), and a larger one is decremented for the
/// upstream. Other methods are forwarded untouched (the RFC lets a proxy ignore it there).
fn max_forwards<B>(req: &mut Request<B>) -> Option<Response<Body>> {
    if req.method() != Method::OPTIONS && req.method() != Method::TRACE {
        return None;
    }
    let value = req.headers().get(header::MAX_FORWARDS)?;
    // 1*DIGIT; a larger number than u32 holds is as good as "many".
    let text = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()));
    let Some(text) = text else {
        return Some(text_response(
            StatusCode::BAD_REQUEST,
            "max-forwards is not a number\n",
        ));
    };
    let hops = text.parse::<u32>().unwrap_or(u32::MAX);
    if hops > 0 {
        req.headers_mut()
            .insert(header::MAX_FORWARDS, HeaderValue::from(hops - 1));
        return None;
    }
    Some(if req.method() == Method::OPTIONS {
        let mut res = Response::new(Either::Right(Full::new(Bytes::new())));
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(ALLOW));
        res
    } else {
        let mut res = text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "the gateway does not reflect TRACE requests\n",
        );
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(ALLOW));
        res
    })
}

fn text_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut res = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut res = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "{value:#}\n"
    )))));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

// ---------------------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct Args {
    config: PathBuf,
    listen: Option<SocketAddr>,
    mode: Mode,
    check: bool,
}

const USAGE: &str = "usage: gateway [--config PATH] [--listen ADDR] [--bare] [--check]";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut out = Args {
        config: PathBuf::from("examples/gateway.toml"),
        listen: None,
        mode: Mode::Full,
        check: false,
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => out.config = args.next().ok_or("--config needs a path")?.into(),
            "--listen" => {
                let addr = args.next().ok_or("--listen needs an address")?;
                out.listen = Some(
                    addr.parse()
                        .map_err(|e| format!("--listen {addr:?}: {e} (an IP:port)"))?,
                );
            }
            "--bare" => out.mode = Mode::Bare,
            "--check" => out.check = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let built = Config::load(&args.config).and_then(|c| Ok((Gateway::checked(&c, args.mode)?, c)));
    let (gateway, config) = match built {
        Ok(built) => built,
        Err(e) => {
            eprintln!("gateway: {}: {e}", args.config.display());
            return ExitCode::FAILURE;
        }
    };
    for (prefix, upstream) in gateway.routes() {
        println!("route {prefix} -> {upstream}");
    }
    if args.check {
        println!("{}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    let listen = args.listen.unwrap_or(config.listen);
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gateway: listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(addr) => println!("listening on http://{addr}"),
        Err(e) => eprintln!("gateway: {e}"),
    }
    serve(listener, gateway, async {
        let _ = tokio::signal::ctrl_c().await;
        println!("shutting down");
    })
    .await;
    ExitCode::SUCCESS
}

// Run by `tests/gateway.rs`, which compiles this file in as a module.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_switch_refuses_peers_off_the_host() {
        let config =
            Config::from_toml("[[routes]]\nprefix = \"/api\"\nupstream = \"http://127.0.0.1:9\"\n")
                .unwrap();
        let gw = Gateway::new(&config, Mode::Full).unwrap();
        let req = Request::post(format!("{BREAKER_PATH}?route=/api&mode=forced_open"))
            .body(())
            .unwrap();
        let off_the_host = [
            SocketAddr::from(([192, 0, 2, 7], 4000)),
            // As a dual-stack (`[::]`) listener sees 192.0.2.7.
            SocketAddr::from(([0, 0, 0, 0, 0, 0xffff, 0xc000, 0x0207], 4000)),
        ];
        for peer in off_the_host {
            assert_eq!(
                gw.switch_breaker(&req, peer).status(),
                StatusCode::FORBIDDEN
            );
        }
        assert_eq!(gw.status()["routes"][0]["breaker"]["mode"], "automatic");
        let on_the_host = [
            SocketAddr::from(([127, 0, 0, 1], 4000)),
            // As a dual-stack listener sees 127.0.0.1.
            SocketAddr::from(([0, 0, 0, 0, 0, 0xffff, 0x7f00, 0x0001], 4000)),
        ];
        for peer in on_the_host {
            assert_eq!(
                gw.switch_breaker(&req, peer).status(),
                StatusCode::OK,
                "{peer}"
            );
        }
        assert_eq!(gw.status()["routes"][0]["breaker"]["mode"], "forced_open");
    }

    #[test]
    fn a_bare_gateway_still_checks_every_stack() {
        let config = Config::from_toml(
            "[[routes]]\nprefix = \"/api\"\nupstream = \"http://127.0.0.1:9\"\n\
             stack.retry.budget.ratio = 11.0\n",
        )
        .unwrap();
        assert!(
            Gateway::new(&config, Mode::Bare).is_ok(),
            "bare builds no stack"
        );
        let err = Gateway::checked(&config, Mode::Bare).unwrap_err();
        assert_eq!(err.field(), "routes[0].stack.retry.budget.ratio");
    }

    #[test]
    fn dot_dot_segments_in_every_spelling() {
        for yes in ["..", "%2e%2e", "%2E.", ".%2e"] {
            assert!(is_dot_dot(yes), "{yes}");
        }
        for no in [
            "", ".", "...", "..x", "a..", "%2e", "%2", "%2e%2", "%2f..", "hello",
        ] {
            assert!(!is_dot_dot(no), "{no}");
        }
    }

    #[test]
    fn forwarded_quotes_ipv6_and_non_token_hosts() {
        let v6 = SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 4711));
        let host = HeaderValue::from_static("example.com");
        assert_eq!(
            forwarded(v6, Some(&host)),
            "for=\"[2001:db8::1]\";proto=http;host=example.com"
        );
        let v4 = SocketAddr::from(([192, 0, 2, 7], 4711));
        let host = HeaderValue::from_static("example.com:8080");
        assert_eq!(
            forwarded(v4, Some(&host)),
            "for=192.0.2.7;proto=http;host=\"example.com:8080\""
        );
        // An IPv4-mapped IPv6 peer (a dual-stack listener) is reported as IPv4.
        let mapped = SocketAddr::from(([0, 0, 0, 0, 0, 0xffff, 0xc000, 0x0207], 1));
        assert_eq!(forwarded(mapped, None), "for=192.0.2.7;proto=http");
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert_eq!(normalize_prefix("/api/").unwrap(), "/api");
        assert_eq!(normalize_prefix("/").unwrap(), "/");
        assert_eq!(normalize_prefix("//").unwrap(), "/");
        assert!(normalize_prefix("api").is_err());
        assert!(normalize_prefix("/a?b").is_err());
        assert!(normalize_prefix("/_upstream/x").is_err());
        assert!(normalize_prefix("/_upstreams").is_ok());
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(!prefix_matches("/api", "/ap"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn targets_join_without_double_slashes() {
        let join = |base: &str, prefix: &str, uri: &str| {
            Target::parse(base)
                .unwrap()
                .join(prefix, &uri.parse().unwrap())
                .unwrap()
                .to_string()
        };
        assert_eq!(join("http://h:1", "/api", "/api/x?y=1"), "http://h:1/x?y=1");
        assert_eq!(join("http://h:1/", "/api", "/api"), "http://h:1/");
        assert_eq!(join("http://h:1/v1/", "/api", "/api/"), "http://h:1/v1/");
        assert_eq!(join("http://h:1/v1", "/api", "/api?q"), "http://h:1/v1?q");
        assert_eq!(join("http://h:1/v1", "/", "/a//b"), "http://h:1/v1/a//b");
        // An absolute-form request target (HTTP/2, proxies) keeps only path and query.
        assert_eq!(
            join("http://h:1", "/api", "http://gw:8/api/x?q"),
            "http://h:1/x?q"
        );
    }

    #[test]
    fn hop_by_hop_headers_go_te_trailers_stays_on_requests() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("X-A, x-b"));
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("2"));
        h.insert("x-c", HeaderValue::from_static("3"));
        h.insert(header::TE, HeaderValue::from_static("gzip, Trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let mut res = h.clone();
        strip_hop_by_hop(&mut h, Direction::Request);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-c", "te"]);
        assert_eq!(h[header::TE], "trailers");
        strip_hop_by_hop(&mut res, Direction::Response);
        let names: Vec<_> = res.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-c"]);
    }
}
