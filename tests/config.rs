//! The whole stack from a configuration file (feature `serde`): a TOML file made into a
//! working layer whose knobs take effect (over real sockets on 127.0.0.1, and with paused
//! time), defaults equal to the builder's, and errors that name the setting's path and
//! show the bad value.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_upstream::breaker::State;
use tower_upstream::config::{BreakerKey, UpstreamConfig};
use tower_upstream::grpc::Code;
use tower_upstream::retry::ReplayBody;
use tower_upstream::{ConfigError, Upstream, UpstreamLayer};

use support::*;

fn parse(text: &str) -> UpstreamConfig {
    match toml::from_str(text) {
        Ok(config) => config,
        Err(e) => panic!("{e}"),
    }
}

/// Deserializes through serde_path_to_error: the error's path and message.
fn parse_err(text: &str) -> (String, String) {
    let de = toml::Deserializer::parse(text).unwrap();
    let err = serde_path_to_error::deserialize::<_, UpstreamConfig>(de).unwrap_err();
    (err.path().to_string(), err.inner().to_string())
}

fn build_err(text: &str) -> ConfigError {
    parse(text).build().unwrap_err()
}

/// An in-process inner service: counts calls, answers with `answer`.
fn counting<F, Fut>(
    calls: &Arc<AtomicUsize>,
    answer: F,
) -> impl Service<
    Request<ReplayBody<Full<Bytes>>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone
       + Send
       + 'static
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send,
{
    let calls = calls.clone();
    service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
        calls.fetch_add(1, SeqCst);
        let answer = answer.clone();
        async move { Ok::<_, Infallible>(answer().await) }
    })
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::new(Bytes::new())).unwrap()
}

const FILE: &str = r#"
concurrency_limit = 64

[map_faults]
gateway_name = "edge"
body = "plain_text"
rewrite_upstream_5xx = true

[deadline]
timeout = "5s"

[retry]
max_attempts = 2
body_limit = 1024
grpc_codes = ["UNAVAILABLE", "resource_exhausted", 4]
backoff = { kind = "none" }
budget = { ratio = 0.5, min_per_second = 20, window = "30s" }

[breaker]
count_window = 50
min_calls = 10
consecutive_failures = 3
open_duration = "1.5s"
key = "authority"

[attempt_timeout]
timeout = "2s"
"#;

#[test]
fn a_full_file_reads_as_written() {
    let config = parse(FILE);
    assert_eq!(config.concurrency_limit, Some(64));
    assert_eq!(config.map_faults.gateway_name.as_deref(), Some("edge"));
    assert_eq!(config.deadline.timeout, Some(Duration::from_secs(5)));
    assert_eq!(config.retry.max_attempts, Some(2));
    assert_eq!(
        config.retry.grpc_codes,
        Some(vec![
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::DeadlineExceeded
        ])
    );
    assert_eq!(config.retry.budget.window, Some(Duration::from_secs(30)));
    assert_eq!(
        config.breaker.open_duration,
        Some(Duration::from_millis(1500))
    );
    assert_eq!(config.breaker.key, Some(BreakerKey::Authority));
    let layer = config.build().unwrap();
    let budget = layer.retry_budget().unwrap();
    assert_eq!(budget.ratio(), 0.5);
    assert_eq!(budget.min_per_second(), 20);
    assert_eq!(budget.window(), Duration::from_secs(30));
}

#[tokio::test]
async fn a_full_file_takes_effect_over_real_sockets() {
    // An upstream that answers every connection 503 and counts them.
    let hits = Arc::new(AtomicUsize::new(0));
    let upstream = {
        let hits = hits.clone();
        raw_upstream(move |mut s| {
            hits.fetch_add(1, SeqCst);
            async move {
                read_head(&mut s).await;
                let reply = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 13\r\n\
                              connection: close\r\n\r\nstack trace!!";
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
            }
        })
        .await
    };
    let refused = closed_port().await;
    let client: Client<_, ReplayBody<Full<Bytes>>> = Client::builder(TokioExecutor::new())
        .build(HttpConnector::new_with_resolver(local_resolver()));
    let layer = parse(FILE).build().unwrap();
    let mut outbound = layer.layer(client);

    // max_attempts = 2, no backoff; the 503 body is rewritten (plain text), named "edge".
    let res = tokio::time::timeout(REAL_TIMEOUT, async {
        let req = get(&format!("http://{upstream}/"));
        outbound.ready().await.unwrap().call(req).await.unwrap()
    })
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(hits.load(SeqCst), 2, "two attempts");
    assert_eq!(
        res.headers()["proxy-status"],
        "edge; received-status=503",
        "{res:?}"
    );
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(
        !body.is_empty() && !body.starts_with(b"stack trace"),
        "{body:?}"
    );

    let res = tokio::time::timeout(REAL_TIMEOUT, async {
        let req = get(&format!("http://{refused}/"));
        outbound.ready().await.unwrap().call(req).await.unwrap()
    })
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        res.headers()["proxy-status"],
        "edge; error=connection_refused"
    );

    // consecutive_failures = 3 per authority: the refusing upstream (2 refused attempts)
    // is not open yet, one more request opens it.
    let handle = layer.breaker_handle().unwrap();
    let key = refused.to_string();
    assert_eq!(handle.snapshot(&key).unwrap().state(), State::Closed);
    let req = get(&format!("http://{refused}/"));
    let _ = outbound.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(handle.snapshot(&key).unwrap().state(), State::Open);
    let req = get(&format!("http://{refused}/"));
    let res = outbound.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        res.headers()["proxy-status"],
        "edge; error=destination_unavailable"
    );
}

#[tokio::test(start_paused = true)]
async fn deadline_and_attempt_timeout_from_the_file() {
    let calls = Arc::new(AtomicUsize::new(0));
    let hang = counting(&calls, std::future::pending);

    // The deadline answers 504 at 250 ms; attempts (100 ms each) are retried until then.
    let layer = parse(
        r#"
        deadline.timeout = "250ms"
        attempt_timeout.timeout = "100ms"
        retry = { max_attempts = 10, backoff = { kind = "none" } }
        breaker.enabled = false
        "#,
    )
    .build()
    .unwrap();
    let start = Instant::now();
    let res = layer.layer(hang.clone()).oneshot(get("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(start.elapsed(), Duration::from_millis(250));
    assert_eq!(calls.load(SeqCst), 3, "attempts at 0, 100 and 200 ms");

    // Without a deadline, and with one attempt, the attempt timeout answers.
    calls.store(0, SeqCst);
    let layer = parse(
        r#"
        deadline.enabled = false
        attempt_timeout.timeout = "1.5s"
        retry.enabled = false
        "#,
    )
    .build()
    .unwrap();
    assert!(layer.retry_budget().is_none());
    let start = Instant::now();
    let res = layer.layer(hang).oneshot(get("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
    assert_eq!(calls.load(SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn breaker_modes_keys_and_the_concurrency_limit_from_the_file() {
    let calls = Arc::new(AtomicUsize::new(0));
    let ok = counting(&calls, || async { Response::new(Full::new(Bytes::new())) });

    // forced_open: every call refused, the service never called.
    let layer = parse("breaker.mode = \"forced_open\"").build().unwrap();
    let res = layer.layer(ok.clone()).oneshot(get("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(SeqCst), 0);
    assert_eq!(
        layer.breaker_handle().unwrap().mode(),
        Some(State::ForcedOpen)
    );
    let layer = parse("breaker.mode = \"disabled\"").build().unwrap();
    assert_eq!(
        layer.breaker_handle().unwrap().mode(),
        Some(State::Disabled)
    );
    let layer = parse("breaker.mode = \"automatic\"").build().unwrap();
    assert_eq!(layer.breaker_handle().unwrap().mode(), None);

    // One breaker per value of a header.
    let failing = counting(&calls, || async {
        let mut res = Response::new(Full::new(Bytes::new()));
        *res.status_mut() = StatusCode::BAD_GATEWAY;
        res
    });
    let layer = parse(
        r#"
        retry.enabled = false
        breaker = { consecutive_failures = 1, key = { header = "x-tenant" } }
        "#,
    )
    .build()
    .unwrap();
    let req = Request::get("/")
        .header("x-tenant", "a")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let _ = layer.layer(failing).oneshot(req).await.unwrap();
    let handle = layer.breaker_handle().unwrap();
    assert_eq!(handle.snapshot("a").unwrap().state(), State::Open);
    let req = Request::get("/")
        .header("x-tenant", "b")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = layer.layer(ok.clone()).oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(handle.snapshot("b").unwrap().state(), State::Closed);

    // concurrency_limit = 1: a second request while one is in flight is shed.
    let hang = counting(&calls, std::future::pending);
    let layer = parse("concurrency_limit = 1").build().unwrap();
    let mut svc = layer.layer(hang);
    let mut first = pin!(svc.ready().await.unwrap().call(get("/")));
    assert!(futures_util::poll!(first.as_mut()).is_pending());
    let res = svc.ready().await.unwrap().call(get("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        res.headers()["proxy-status"],
        "tower-upstream; error=connection_limit_reached"
    );
    assert!(matches!(futures_util::poll!(first), Poll::Pending));
}

#[test]
fn defaults_equal_the_builders() {
    let from_code = format!("{:?}", Upstream::builder().build().unwrap());
    assert_eq!(
        format!("{:?}", UpstreamConfig::default().build().unwrap()),
        from_code
    );
    assert_eq!(format!("{:?}", UpstreamLayer::new()), from_code);
    assert_eq!(parse(""), UpstreamConfig::default());
    // Empty sections are the defaults too.
    let empty = parse("[map_faults]\n[deadline]\n[retry]\n[retry.backoff]\n[retry.budget]\n[breaker]\n[attempt_timeout]");
    assert_eq!(empty, UpstreamConfig::default());
    // And the default writes as nothing at all.
    assert_eq!(toml::to_string(&UpstreamConfig::default()).unwrap(), "");
    assert_eq!(
        serde_json::to_string(&UpstreamConfig::default()).unwrap(),
        "{}"
    );
}

#[test]
fn every_part_can_be_turned_off() {
    let layer = parse(
        r#"
        deadline.enabled = false
        retry.enabled = false
        breaker.enabled = false
        attempt_timeout.enabled = false
        "#,
    )
    .build()
    .unwrap();
    let bare = Upstream::builder()
        .no_deadline()
        .no_retry()
        .no_breaker()
        .no_attempt_timeout()
        .build()
        .unwrap();
    assert_eq!(format!("{layer:?}"), format!("{bare:?}"));
}

#[test]
fn round_trips_through_toml_and_json() {
    let mut config = parse(FILE);
    config.deadline.header = Some(tower_upstream::config::DeadlineHeader::new(
        "x-timeout-ms",
        tower_upstream::deadline::HeaderUnit::Milliseconds,
    ));
    config.breaker.key = Some(BreakerKey::Header("x-tenant".into()));
    config.breaker.slow_call_threshold = Some(Duration::from_micros(2500));
    let text = toml::to_string(&config).unwrap();
    assert!(text.contains("slow_call_threshold = \"2500us\""), "{text}");
    assert!(text.contains("open_duration = \"1500ms\""), "{text}");
    assert_eq!(parse(&text), config, "{text}");
    let json = serde_json::to_string(&config).unwrap();
    assert_eq!(
        serde_json::from_str::<UpstreamConfig>(&json).unwrap(),
        config,
        "{json}"
    );
    assert!(config.build().is_ok());
}

#[test]
fn json_errors_name_the_path() {
    let json = r#"{ "retry": { "max_attempts": "three" } }"#;
    let de = &mut serde_json::Deserializer::from_str(json);
    let err = serde_path_to_error::deserialize::<_, UpstreamConfig>(de).unwrap_err();
    assert_eq!(err.path().to_string(), "retry.max_attempts");
    assert!(err
        .inner()
        .to_string()
        .contains("invalid type: string \"three\""));

    let config: UpstreamConfig =
        serde_json::from_str(r#"{ "breaker": { "key": "single", "count_window": 100 } }"#).unwrap();
    assert_eq!(config.breaker.key, Some(BreakerKey::Single));
    assert!(config.build().unwrap().breaker_handle().is_some());
}

#[test]
fn unknown_fields_are_rejected_with_their_path() {
    for (text, path, field) in [
        ("retries = 3", ".", "retries"),
        ("[retry]\nmax_attempt = 3", "retry", "max_attempt"),
        (
            "[retry.budget]\nratio = 0.2\nmin_per_sec = 1",
            "retry.budget",
            "min_per_sec",
        ),
        (
            "breaker.time_window = { size = \"10s\", buckets = 10, x = 1 }",
            "breaker.time_window",
            "x",
        ),
        (
            "deadline.header = { name = \"a\", unit = \"s\", y = 1 }",
            "deadline.header",
            "y",
        ),
    ] {
        let (at, message) = parse_err(text);
        let expected = if path == "." {
            field.to_owned()
        } else {
            format!("{path}.{field}")
        };
        assert_eq!(at, expected, "{text}");
        assert!(
            message.contains(&format!("unknown field `{field}`")),
            "{text}: {message}"
        );
        // Plain toml says which field, and where, too.
        let plain = toml::from_str::<UpstreamConfig>(text)
            .unwrap_err()
            .to_string();
        assert!(plain.contains(field) && plain.contains("line"), "{plain}");
    }
}

#[test]
fn bad_values_in_the_file_are_rejected_with_their_path() {
    for (text, path, message) in [
        (
            "deadline.timeout = \"5 parsecs\"",
            "deadline.timeout",
            "invalid duration \"5 parsecs\": no unit",
        ),
        (
            "deadline.timeout = \"5sec\"",
            "deadline.timeout",
            "unknown unit \"sec\"",
        ),
        (
            "deadline.timeout = 5",
            "deadline.timeout",
            "invalid duration 5: no unit",
        ),
        (
            "deadline.timeout = -5",
            "deadline.timeout",
            "must not be negative",
        ),
        (
            "deadline.timeout = true",
            "deadline.timeout",
            "expected a duration such as",
        ),
        (
            "retry.backoff.cap = \"1.0000000001s\"",
            "retry.backoff.cap",
            "finer than a nanosecond",
        ),
        (
            "breaker.idle_timeout = \"1d\"",
            "breaker.idle_timeout",
            "unknown unit \"d\"",
        ),
        (
            "retry.max_attempts = \"three\"",
            "retry.max_attempts",
            "invalid type: string",
        ),
        (
            "retry.max_attempts = -1",
            "retry.max_attempts",
            "invalid value",
        ),
        (
            "retry.grpc_codes = [\"UNAVAILABLE\", \"NOPE\"]",
            "retry.grpc_codes[1]",
            "unknown gRPC status code \"NOPE\"",
        ),
        (
            "retry.grpc_codes = [17]",
            "retry.grpc_codes[0]",
            "unknown gRPC status code 17",
        ),
        (
            "retry.backoff.kind = \"linear\"",
            "retry.backoff.kind",
            "unknown variant `linear`",
        ),
        (
            "map_faults.body = \"html\"",
            "map_faults.body",
            "unknown variant `html`",
        ),
        (
            "breaker.mode = \"off\"",
            "breaker.mode",
            "unknown variant `off`",
        ),
        (
            "breaker.key = \"path\"",
            "breaker.key",
            "unknown variant `path`",
        ),
        (
            "breaker.time_window = { size = \"10s\" }",
            "breaker.time_window",
            "missing field `buckets`",
        ),
        (
            "deadline.header = { name = \"a\", unit = \"min\" }",
            "deadline.header.unit",
            "unknown header unit \"min\"",
        ),
        (
            "deadline.enabled = \"no\"",
            "deadline.enabled",
            "invalid type: string",
        ),
    ] {
        let (at, got) = parse_err(text);
        assert_eq!(at, path, "{text}: {got}");
        assert!(got.contains(message), "{text}: {got}");
    }
}

#[test]
fn invalid_settings_name_their_path_and_value() {
    for (text, field, value) in [
        ("concurrency_limit = 0", "concurrency_limit", "(got 0)"),
        (
            "map_faults.gateway_name = \"\"",
            "map_faults.gateway_name",
            "(got \"\")",
        ),
        (
            "map_faults.gateway_name = \"é\"",
            "map_faults.gateway_name",
            "(got \"é\")",
        ),
        (
            "map_faults.unclassified_status = 404",
            "map_faults.unclassified_status",
            "(got 404)",
        ),
        (
            "map_faults.unclassified_status = 1000",
            "map_faults.unclassified_status",
            "not an HTTP status code (got 1000)",
        ),
        (
            "map_faults.unclassified_grpc_code = \"OK\"",
            "map_faults.unclassified_grpc_code",
            "(got 0)",
        ),
        (
            "deadline.timeout = \"0s\"",
            "deadline.timeout",
            "must be > 0 (got 0ns)",
        ),
        (
            "deadline.header = { name = \"bad header\", unit = \"s\" }",
            "deadline.header.name",
            "(got \"bad header\")",
        ),
        (
            "deadline.header = { name = \"grpc-timeout\", unit = \"s\" }",
            "deadline.header",
            "grpc-timeout",
        ),
        ("retry.max_attempts = 0", "retry.max_attempts", "(got 0)"),
        ("retry.max_attempts = 11", "retry.max_attempts", "(got 11)"),
        (
            "retry.backoff = { base = \"1s\" }",
            "retry.backoff",
            "(got base 1s, cap 250ms)",
        ),
        (
            "retry.backoff = { kind = \"none\", cap = \"1s\" }",
            "retry.backoff.cap",
            "not used by kind \"none\" (got 1s)",
        ),
        (
            "retry.grpc_codes = [\"UNAVAILABLE\", \"OK\"]",
            "retry.grpc_codes[1]",
            "(got \"OK\")",
        ),
        (
            "retry.budget.ratio = 11.0",
            "retry.budget.ratio",
            "must be in (0, 10] (got 11)",
        ),
        ("retry.budget.ratio = 0.0", "retry.budget.ratio", "(got 0)"),
        (
            "retry.budget.window = \"2m\"",
            "retry.budget.window",
            "(got 120s)",
        ),
        (
            "breaker.count_window = 0",
            "breaker.count_window",
            "(got 0)",
        ),
        (
            "breaker.count_window = 10\nbreaker.time_window = { size = \"10s\", buckets = 10 }",
            "breaker.count_window",
            "not both",
        ),
        (
            "breaker.time_window = { size = \"5ms\", buckets = 10 }",
            "breaker.time_window",
            "(got 5ms / 10)",
        ),
        (
            "breaker.time_window = { size = \"10s\", buckets = 0 }",
            "breaker.time_window",
            "(got 0)",
        ),
        (
            "breaker.failure_rate = 1.5",
            "breaker.failure_rate",
            "(got 1.5)",
        ),
        ("breaker.min_calls = 0", "breaker.min_calls", "(got 0)"),
        (
            "breaker.open_duration = \"0s\"",
            "breaker.open_duration",
            "(got 0ns)",
        ),
        (
            "breaker.max_open_duration = \"2s\"",
            "breaker.max_open_duration",
            "(got 2s)",
        ),
        ("breaker.jitter = 1.0", "breaker.jitter", "(got 1)"),
        (
            "breaker.half_open_probes = 256",
            "breaker.half_open_probes",
            "(got 256)",
        ),
        (
            "breaker.probe_successes = 0",
            "breaker.probe_successes",
            "(got 0)",
        ),
        (
            "breaker.failure_statuses = [503, 404]",
            "breaker.failure_statuses",
            "(got 404 Not Found)",
        ),
        (
            "breaker.failure_statuses = [503, 42]",
            "breaker.failure_statuses[1]",
            "not an HTTP status code (got 42)",
        ),
        (
            "breaker.grpc_failure_codes = [\"UNAVAILABLE\", 0]",
            "breaker.grpc_failure_codes[1]",
            "(got \"OK\")",
        ),
        ("breaker.max_keys = 0", "breaker.max_keys", "(got 0)"),
        (
            "breaker.key = { header = \"x y\" }",
            "breaker.key.header",
            "(got \"x y\")",
        ),
        (
            "attempt_timeout.timeout = \"0s\"",
            "attempt_timeout.timeout",
            "(got 0ns)",
        ),
    ] {
        let err = build_err(text);
        assert_eq!(err.field(), field, "{text}: {err}");
        assert!(err.message().contains(value), "{text}: {err}");
        assert_eq!(
            err.to_string(),
            format!("invalid {field}: {}", err.message())
        );
    }
}

#[test]
fn disabled_parts_are_not_checked() {
    // A section that is off is not built, so its settings are not judged.
    let layer = parse(
        r#"
        retry = { enabled = false, max_attempts = 0 }
        breaker = { enabled = false, failure_rate = 2.0 }
        "#,
    )
    .build()
    .unwrap();
    assert!(layer.retry_budget().is_none());
    assert!(layer.breaker_handle().is_none());
}

/// A gateway's file: a list of routes, each with its own stack.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Gateway {
    routes: Vec<Route>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Route {
    #[allow(dead_code)]
    path: String,
    #[serde(default)]
    upstream: UpstreamConfig,
}

#[test]
fn routes_in_a_list_name_the_route() {
    let gateway: Gateway = toml::from_str(
        r#"
        [[routes]]
        path = "/a"

        [[routes]]
        path = "/b"
        upstream.deadline.timeout = "2s"

        [[routes]]
        path = "/c"
        upstream.retry.budget.ratio = 11.0
        "#,
    )
    .unwrap();
    let built: Result<Vec<UpstreamLayer>, ConfigError> = gateway
        .routes
        .iter()
        .enumerate()
        .map(|(i, route)| {
            route
                .upstream
                .build()
                .map_err(|e| e.in_field("upstream").in_field(format!("routes[{i}]")))
        })
        .collect();
    let err = built.unwrap_err();
    assert_eq!(err.field(), "routes[2].upstream.retry.budget.ratio");
    assert_eq!(
        err.to_string(),
        "invalid routes[2].upstream.retry.budget.ratio: must be in (0, 10] (got 11)"
    );

    // A deserialization error in a route names it as well.
    let text =
        "[[routes]]\npath = \"/a\"\n[[routes]]\npath = \"/b\"\nupstream.retry.max_attempts = \"x\"";
    let err =
        serde_path_to_error::deserialize::<_, Gateway>(toml::Deserializer::parse(text).unwrap())
            .err()
            .expect("a string is no attempt count");
    assert!(
        err.path().to_string().starts_with("routes[1]"),
        "{}",
        err.path()
    );
}

#[tokio::test(start_paused = true)]
async fn to_builder_keeps_the_file_and_takes_a_layer_from_code() {
    let config = parse(
        r#"
        retry = { max_attempts = 1, budget = { ratio = 0.5 } }
        map_faults.gateway_name = "edge"
        "#,
    );
    let opened = Arc::new(AtomicUsize::new(0));
    let breaker = {
        let opened = opened.clone();
        tower_upstream::CircuitBreakerLayer::builder()
            .consecutive_failures(1)
            .on_transition(move |t| {
                if t.to() == State::Open {
                    opened.fetch_add(1, SeqCst);
                }
            })
            .build()
            .unwrap()
    };
    let layer = config
        .to_builder()
        .unwrap()
        .breaker(breaker)
        .build()
        .unwrap();
    assert_eq!(layer.retry_budget().unwrap().ratio(), 0.5);

    let calls = Arc::new(AtomicUsize::new(0));
    let failing = counting(&calls, || async {
        let mut res = Response::new(Full::new(Bytes::new()));
        *res.status_mut() = StatusCode::BAD_GATEWAY;
        res
    });
    let mut svc = layer.layer(failing);
    let res = svc.ready().await.unwrap().call(get("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(calls.load(SeqCst), 1, "one attempt, as the file says");
    assert_eq!(opened.load(SeqCst), 1, "the breaker from code opened");
    let res = svc.ready().await.unwrap().call(get("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        res.headers()["proxy-status"],
        "edge; error=destination_unavailable"
    );
    assert_eq!(calls.load(SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_reaches_the_service_as_an_extension_only_when_asked() {
    use tower_upstream::deadline::RequestDeadline;
    let seen = |layer: UpstreamLayer| async move {
        let probe = service_fn(|req: Request<ReplayBody<Full<Bytes>>>| async move {
            let left = RequestDeadline::of(&req).map(|d| d.remaining());
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("{left:?}")))))
        });
        let res = layer.layer(probe).oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    };
    // As with the builder's own deadline: it travels inside the stack, no extension.
    let private = parse(r#"deadline.timeout = "2s""#).build().unwrap();
    assert_eq!(seen(private).await, "None");
    let builder = Upstream::builder()
        .deadline(Duration::from_secs(2))
        .build()
        .unwrap();
    assert_eq!(seen(builder).await, "None");
    // Asked for, for a handler that reads the time left.
    let public = parse("deadline = { timeout = \"2s\", extension = true }")
        .build()
        .unwrap();
    assert_eq!(seen(public).await, "Some(2s)");
}

/// `FILE`, in YAML.
const YAML: &str = r#"
concurrency_limit: 64
map_faults:
  gateway_name: edge
  body: plain_text
  rewrite_upstream_5xx: true
deadline:
  timeout: 5s
retry:
  max_attempts: 2
  body_limit: 1024
  grpc_codes: [UNAVAILABLE, resource_exhausted, 4]
  backoff: { kind: none }
  budget: { ratio: 0.5, min_per_second: 20, window: 30s }
breaker:
  count_window: 50
  min_calls: 10
  consecutive_failures: 3
  open_duration: 1.5s
  key: authority
attempt_timeout:
  timeout: "2s"
"#;

#[test]
fn yaml_reads_as_the_same_toml_does_and_errors_name_the_path() {
    let yaml: UpstreamConfig = serde_norway::from_str(YAML).unwrap();
    assert_eq!(yaml, parse(FILE));
    let layer = yaml.build().unwrap();
    assert_eq!(
        layer.retry_budget().unwrap().window(),
        Duration::from_secs(30)
    );

    // Durations with units, nested sections, routes in a list: errors name the path.
    let text = r#"
routes:
  - path: /a
  - path: /b
    upstream: { deadline: { timeout: 250ms } }
  - path: /c
    upstream:
      retry:
        budget: { window: 10 }
"#;
    let de = serde_norway::Deserializer::from_str(text);
    let err = serde_path_to_error::deserialize::<_, Gateway>(de)
        .err()
        .expect("a duration needs a unit");
    assert_eq!(
        err.path().to_string(),
        "routes[2].upstream.retry.budget.window"
    );

    let gateway: Gateway = serde_norway::from_str(
        "routes:\n  - path: /a\n    upstream: { deadline: { timeout: 250ms } }\n  - path: /b\n    upstream: { retry: { budget: { ratio: 11.0 } } }\n",
    )
    .unwrap();
    assert_eq!(
        gateway.routes[0].upstream.deadline.timeout,
        Some(Duration::from_millis(250))
    );
    let err = gateway.routes[1]
        .upstream
        .build()
        .unwrap_err()
        .in_field("upstream")
        .in_field("routes[1]");
    assert_eq!(err.field(), "routes[1].upstream.retry.budget.ratio");
}
