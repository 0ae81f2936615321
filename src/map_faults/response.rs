//! The answers the mapper makes: problem+json, plain text, user bodies, gRPC trailers-only.

use std::borrow::Cow;
use std::collections::HashSet;
use std::error::Error as StdError;
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Response, StatusCode};

use crate::fault::{Classification, Classifier, Fault};
use crate::grpc;

use super::body::FaultBody;

pub(crate) static PROXY_STATUS: HeaderName = HeaderName::from_static("proxy-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// Longest `details` the mapper puts in a client-facing answer when details are exposed.
const MAX_DETAILS: usize = 512;

/// What a custom body gets to work with: everything the mapper knows that is safe to show.
#[derive(Debug)]
pub struct Problem<'a> {
    pub(crate) fault: Option<Fault>,
    pub(crate) status: StatusCode,
    pub(crate) title: &'static str,
    pub(crate) details: Option<&'a str>,
}

impl Problem<'_> {
    /// The fault, or `None` when the answer rewrites an upstream's own 5xx response.
    pub fn fault(&self) -> Option<Fault> {
        self.fault
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// A short, fixed, client-safe sentence.
    pub fn title(&self) -> &'static str {
        self.title
    }

    /// The error's text, only when the mapper was built with
    /// [`expose_details(true)`](super::MapFaultsLayerBuilder::expose_details).
    pub fn details(&self) -> Option<&str> {
        self.details
    }
}

pub(crate) type BodyFn = dyn Fn(&Problem<'_>) -> (HeaderValue, Bytes) + Send + Sync;

/// How the body of a synthesized HTTP answer is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum BodyStyle {
    ProblemJson,
    PlainText,
    /// The closure in [`Extras::body`].
    Custom,
}

/// The settings that hold closures or shared rules; absent in the common case.
pub(crate) struct Extras {
    pub(crate) classifier: Classifier,
    pub(crate) body: Option<Arc<BodyFn>>,
}

/// Renders a gateway name as an RFC 8941 token where it is one, else as a string; `None` if
/// it cannot be a structured-field string (non-printable or non-ASCII).
///
/// The result is `'static` so that response futures can carry it without a reference
/// count: names that are not already `'static` are interned, once per distinct name.
pub(crate) fn render_name(name: Cow<'static, str>) -> Option<&'static str> {
    if name.is_empty() || !name.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return None;
    }
    if is_sf_token(&name) {
        return Some(match name {
            Cow::Borrowed(s) => s,
            Cow::Owned(s) => intern(s),
        });
    }
    let mut quoted = String::with_capacity(name.len() + 2);
    push_sf_string(&mut quoted, &name);
    Some(intern(quoted))
}

/// Interns a gateway name: each distinct name is stored once for the life of the process.
/// Names are configuration (a handful per process), never per-request data.
fn intern(name: String) -> &'static str {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(existing) = names.get(name.as_str()) {
        return existing;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    names.insert(leaked);
    leaked
}

fn is_sf_token(s: &str) -> bool {
    let mut bytes = s.bytes();
    let first_ok = matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'*');
    first_ok && bytes.all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b))
}

/// Appends `s` as an RFC 8941 sf-string (printable ASCII only; others become `?`).
fn push_sf_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
}

/// The plain settings of a mapper: `Copy`, comparable, and interned, so that a response
/// future carries them as one `&'static` pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Settings {
    pub(crate) name: &'static str,
    pub(crate) body: BodyStyle,
    pub(crate) expose_details: bool,
    pub(crate) rewrite_upstream_5xx: bool,
    pub(crate) unclassified_status: StatusCode,
    pub(crate) unclassified_grpc: grpc::Code,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            name: "tower-upstream",
            body: BodyStyle::ProblemJson,
            expose_details: false,
            unclassified_status: StatusCode::BAD_GATEWAY,
            unclassified_grpc: grpc::Code::Unavailable,
            rewrite_upstream_5xx: false,
        }
    }
}

impl Settings {
    /// Interns these settings: stored once per distinct value for the life of the process
    /// (settings are configuration, a handful per process).
    pub(crate) fn intern(self) -> &'static Settings {
        static DEFAULT: OnceLock<&'static Settings> = OnceLock::new();
        static ALL: OnceLock<Mutex<HashSet<&'static Settings>>> = OnceLock::new();
        if self == Settings::default() {
            return DEFAULT.get_or_init(|| Box::leak(Box::new(Settings::default())));
        }
        let mut all = ALL
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(existing) = all.get(&self) {
            return existing;
        }
        let leaked: &'static Settings = Box::leak(Box::new(self));
        all.insert(leaked);
        leaked
    }
}

/// Settings with closures or shared rules: a custom classifier or body.
pub(crate) struct Custom {
    pub(crate) settings: &'static Settings,
    pub(crate) extras: Extras,
}

/// What a mapper is configured with, as its services and response futures hold it.
///
/// It is one pointer plus the request's gRPC flag (folded into the variant), so the response
/// future stays small, and with no custom classifier or body a clone touches no shared
/// reference count: a count that every request on every core bumps is what stops a
/// middleware from scaling (measured: an `Arc<Config>` here made 2 workers slower than 1).
#[derive(Clone)]
pub(crate) enum Config {
    Plain(&'static Settings),
    PlainGrpc(&'static Settings),
    Custom(Arc<Custom>),
    CustomGrpc(Arc<Custom>),
}

impl Default for Config {
    fn default() -> Self {
        Config::Plain(Settings::default().intern())
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let view = self.view();
        f.debug_struct("MapFaultsConfig")
            .field("settings", view.settings)
            .field("classifier", &view.extras.map(|e| &e.classifier))
            .field(
                "custom_body",
                &view.extras.is_some_and(|e| e.body.is_some()),
            )
            .finish()
    }
}

impl Config {
    /// The same configuration, for a request that is (or is not) gRPC.
    pub(crate) fn for_request(&self, grpc: bool) -> Config {
        match (self, grpc) {
            (Config::Plain(s) | Config::PlainGrpc(s), false) => Config::Plain(s),
            (Config::Plain(s) | Config::PlainGrpc(s), true) => Config::PlainGrpc(s),
            (Config::Custom(c) | Config::CustomGrpc(c), false) => Config::Custom(c.clone()),
            (Config::Custom(c) | Config::CustomGrpc(c), true) => Config::CustomGrpc(c.clone()),
        }
    }

    pub(crate) fn is_grpc(&self) -> bool {
        matches!(self, Config::PlainGrpc(_) | Config::CustomGrpc(_))
    }

    pub(crate) fn view(&self) -> View<'_> {
        match self {
            Config::Plain(settings) | Config::PlainGrpc(settings) => View {
                settings,
                extras: None,
            },
            Config::Custom(c) | Config::CustomGrpc(c) => View {
                settings: c.settings,
                extras: Some(&c.extras),
            },
        }
    }
}

/// A borrowed view of a [`Config`]: what answering needs.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub(crate) settings: &'a Settings,
    extras: Option<&'a Extras>,
}

impl View<'_> {
    /// The answer for an error of the inner service.
    pub(crate) fn fault_response<B>(
        &self,
        err: &(dyn StdError + 'static),
        grpc: bool,
    ) -> Response<FaultBody<B>> {
        let c = match self.extras {
            Some(extras) => extras.classifier.classify(err),
            None => crate::fault::classify(err),
        };
        let fault = c.fault();
        if fault.is_local_rejection() {
            tracing::debug!(fault = fault.name(), error = %Chain(err), "request refused locally");
        } else {
            tracing::warn!(fault = fault.name(), error = %Chain(err), "upstream call failed");
        }
        let details = self.settings.expose_details.then(|| details(err));
        if grpc {
            self.grpc_response(&c, details.as_deref())
        } else {
            self.http_response(&c, details.as_deref())
        }
    }

    fn http_status(&self, fault: Fault) -> StatusCode {
        if fault == Fault::ProxyInternalError {
            self.settings.unclassified_status
        } else {
            fault.http_status()
        }
    }

    fn grpc_code(&self, fault: Fault) -> grpc::Code {
        if fault == Fault::ProxyInternalError {
            self.settings.unclassified_grpc
        } else {
            fault.grpc_code()
        }
    }

    fn http_response<B>(
        &self,
        c: &Classification,
        details: Option<&str>,
    ) -> Response<FaultBody<B>> {
        let fault = c.fault();
        let status = self.http_status(fault);
        let problem = Problem {
            fault: Some(fault),
            status,
            title: fault.title(),
            details,
        };
        let mut res = self.problem_response(&problem);
        let proxy_status = self.proxy_status(Some(fault), None, details);
        let headers = res.headers_mut();
        headers.insert(PROXY_STATUS.clone(), proxy_status);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            if let Some(after) = c.retry_after() {
                headers.insert(RETRY_AFTER, HeaderValue::from(whole_seconds_up(after)));
            }
        }
        res.extensions_mut().insert(fault);
        res
    }

    fn grpc_response<B>(
        &self,
        c: &Classification,
        details: Option<&str>,
    ) -> Response<FaultBody<B>> {
        let fault = c.fault();
        let message = match details {
            Some(d) => grpc::encode_message(&format!("{}: {}", fault.title(), d)),
            None => grpc::encode_message(fault.title()),
        };
        let mut res = Response::new(FaultBody::empty());
        let headers = res.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(
            grpc::GRPC_STATUS.clone(),
            self.grpc_code(fault).to_header_value(),
        );
        if let Ok(v) = HeaderValue::try_from(message) {
            headers.insert(GRPC_MESSAGE.clone(), v);
        }
        if let Some(after) = c
            .retry_after()
            .filter(|_| fault == Fault::DestinationUnavailable)
        {
            let ms = whole_millis_up(after);
            headers.insert(grpc::GRPC_PUSHBACK.clone(), HeaderValue::from(ms));
        }
        headers.insert(
            PROXY_STATUS.clone(),
            self.proxy_status(Some(fault), None, details),
        );
        res.extensions_mut().insert(fault);
        res
    }

    /// Rewrites an upstream 5xx answer into the generic one, keeping its status.
    pub(crate) fn rewrite_upstream<B, U>(&self, upstream: &Response<U>) -> Response<FaultBody<B>> {
        let status = upstream.status();
        let problem = Problem {
            fault: None,
            status,
            title: "upstream answered with an error",
            details: None,
        };
        let mut res = self.problem_response(&problem);
        *res.version_mut() = upstream.version();
        let headers = res.headers_mut();
        headers.insert(
            PROXY_STATUS.clone(),
            self.proxy_status(None, Some(status), None),
        );
        if let Some(after) = upstream.headers().get(RETRY_AFTER) {
            headers.insert(RETRY_AFTER, after.clone());
        }
        res
    }

    fn problem_response<B>(&self, p: &Problem<'_>) -> Response<FaultBody<B>> {
        let custom = self.extras.and_then(|e| e.body.as_ref());
        let (content_type, body) = match (self.settings.body, custom) {
            (BodyStyle::Custom, Some(f)) => f(p),
            (BodyStyle::ProblemJson | BodyStyle::Custom, _) => (
                HeaderValue::from_static("application/problem+json"),
                Bytes::from(problem_json(p)),
            ),
            (BodyStyle::PlainText, _) => (
                HeaderValue::from_static("text/plain; charset=utf-8"),
                Bytes::from(plain_text(p)),
            ),
        };
        let mut res = Response::new(FaultBody::full(body));
        *res.status_mut() = p.status;
        res.headers_mut().insert(CONTENT_TYPE, content_type);
        res
    }

    fn proxy_status(
        &self,
        fault: Option<Fault>,
        received: Option<StatusCode>,
        details: Option<&str>,
    ) -> HeaderValue {
        let mut v = String::with_capacity(64);
        v.push_str(self.settings.name);
        if let Some(fault) = fault {
            v.push_str("; error=");
            v.push_str(fault.name());
        }
        if let Some(status) = received {
            let _ = write!(v, "; received-status={}", status.as_u16());
        }
        if let Some(d) = details {
            v.push_str("; details=");
            push_sf_string(&mut v, d);
        }
        // Every part is printable ASCII by construction.
        HeaderValue::try_from(v).unwrap_or_else(|_| HeaderValue::from_static("tower-upstream"))
    }
}

/// Whole seconds, rounded up (`Retry-After` takes delay-seconds).
/// Rounded up, as `Retry-After` is: a client that honours it never comes back before the
/// breaker lets a probe through.
fn whole_millis_up(d: Duration) -> u64 {
    let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 > 0);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

fn whole_seconds_up(d: Duration) -> u64 {
    // Saturating: `Duration::MAX` (a hand-made `CircuitOpen`, a classifier's rule) must not
    // overflow (a panic in debug builds, `Retry-After: 0` in release ones).
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

/// The error chain as one line, for logs and (when exposed) for clients.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn StdError + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

fn details(err: &(dyn StdError + 'static)) -> String {
    let mut s = Chain(err).to_string();
    if s.len() > MAX_DETAILS {
        let mut end = MAX_DETAILS;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn problem_json(p: &Problem<'_>) -> String {
    let mut s = String::with_capacity(192);
    s.push_str("{\"type\":\"about:blank\",\"title\":");
    push_json_string(&mut s, p.status.canonical_reason().unwrap_or("Error"));
    let _ = write!(s, ",\"status\":{},\"detail\":", p.status.as_u16());
    match p.details {
        Some(d) => push_json_string(&mut s, &format!("{}: {}", p.title, d)),
        None => push_json_string(&mut s, p.title),
    }
    if let Some(fault) = p.fault {
        s.push_str(",\"fault\":");
        push_json_string(&mut s, fault.name());
    }
    s.push('}');
    s
}

fn plain_text(p: &Problem<'_>) -> String {
    match p.details {
        Some(d) => format!(
            "{} {}: {}: {}\n",
            p.status.as_u16(),
            p.status.canonical_reason().unwrap_or(""),
            p.title,
            d
        ),
        None => format!(
            "{} {}: {}\n",
            p.status.as_u16(),
            p.status.canonical_reason().unwrap_or(""),
            p.title
        ),
    }
}

fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_render_as_token_or_string() {
        let render = |s: &'static str| render_name(s.into());
        assert_eq!(render("gw"), Some("gw"));
        assert_eq!(render("edge-1.example"), Some("edge-1.example"));
        assert_eq!(render("my gw"), Some("\"my gw\""));
        assert_eq!(render("1gw"), Some("\"1gw\""));
        assert_eq!(render("a\"b"), Some("\"a\\\"b\""));
        assert_eq!(render(""), None);
        assert_eq!(render("é"), None);
        assert_eq!(render("a\nb"), None);
    }

    #[test]
    fn owned_names_and_settings_are_interned_once() {
        let a = render_name(String::from("interned-gw").into()).unwrap();
        let b = render_name(String::from("interned-gw").into()).unwrap();
        assert_eq!(a, "interned-gw");
        assert!(std::ptr::eq(a, b), "the same name is stored once");
        let s = Settings {
            name: a,
            ..Settings::default()
        };
        assert!(std::ptr::eq(s.intern(), s.intern()));
        assert!(std::ptr::eq(
            Settings::default().intern(),
            Settings::default().intern()
        ));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(whole_seconds_up(Duration::from_millis(0)), 0);
        assert_eq!(whole_seconds_up(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds_up(Duration::from_millis(1000)), 1);
        assert_eq!(whole_seconds_up(Duration::from_millis(4001)), 5);
        assert_eq!(whole_seconds_up(Duration::MAX), u64::MAX);
        assert_eq!(whole_millis_up(Duration::from_micros(1500)), 2);
        assert_eq!(whole_millis_up(Duration::from_millis(7)), 7);
        assert_eq!(whole_millis_up(Duration::ZERO), 0);
        assert_eq!(whole_millis_up(Duration::MAX), u64::MAX);
    }

    #[test]
    fn json_escapes() {
        let mut s = String::new();
        push_json_string(&mut s, "a\"b\\c\n\u{1}é");
        assert_eq!(s, "\"a\\\"b\\\\c\\n\\u0001é\"");
    }
}
