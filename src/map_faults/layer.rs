//! [`MapFaultsLayer`] and its builder.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use tower_layer::Layer;

use super::response::{render_name, BodyFn, BodyStyle, Config, Custom, Extras, Problem, Settings};
use super::MapFaults;
use crate::error::ConfigError;
use crate::fault::Classifier;
use crate::grpc;

/// Applies [`MapFaults`] to a service: every error becomes the right 502/503/504 answer (or
/// gRPC status), and the service's error type becomes `Infallible`.
///
/// `MapFaultsLayer::new()` has the defaults: gateway name `tower-upstream`,
/// `application/problem+json` bodies, no error text shown to clients, unclassified errors
/// answered 502 / `UNAVAILABLE`, upstream answers passed through untouched. The
/// [builder](MapFaultsLayer::builder) changes them.
#[derive(Clone, Debug, Default)]
pub struct MapFaultsLayer {
    config: Config,
}

impl MapFaultsLayer {
    /// The layer with default settings.
    pub fn new() -> Self {
        MapFaultsLayer::default()
    }

    /// The settings, for `Upstream`, which answers faults itself.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// A builder for a layer with other settings.
    pub fn builder() -> MapFaultsLayerBuilder {
        MapFaultsLayerBuilder {
            settings: Settings::default(),
            classifier: None,
            custom_body: None,
            name: None,
            unclassified_status: StatusCode::BAD_GATEWAY,
            unclassified_grpc: grpc::Code::Unavailable,
        }
    }
}

impl<S> Layer<S> for MapFaultsLayer {
    type Service = MapFaults<S>;

    fn layer(&self, inner: S) -> MapFaults<S> {
        MapFaults::from_config(inner, self.config.clone())
    }
}

/// Builds a [`MapFaultsLayer`]; [`build`](MapFaultsLayerBuilder::build) checks the settings.
///
/// ```
/// use http::StatusCode;
/// use tower_upstream::map_faults::MapFaultsLayer;
///
/// let layer = MapFaultsLayer::builder()
///     .gateway_name("edge-gw")
///     .plain_text()
///     .unclassified_status(StatusCode::INTERNAL_SERVER_ERROR)
///     .rewrite_upstream_5xx(true)
///     .build()
///     .expect("valid settings");
/// # let _ = layer;
/// ```
#[must_use]
pub struct MapFaultsLayerBuilder {
    settings: Settings,
    classifier: Option<Classifier>,
    custom_body: Option<Arc<BodyFn>>,
    name: Option<Cow<'static, str>>,
    unclassified_status: StatusCode,
    unclassified_grpc: grpc::Code,
}

impl std::fmt::Debug for MapFaultsLayerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapFaultsLayerBuilder")
            .field("settings", &self.settings)
            .field("name", &self.name)
            .field("classifier", &self.classifier)
            .finish()
    }
}

impl MapFaultsLayerBuilder {
    /// The gateway's name in `Proxy-Status` (default `tower-upstream`). Any printable ASCII;
    /// names that are not structured-field tokens are sent quoted.
    ///
    /// A name that is not a `&'static str` is interned: stored once per distinct name for
    /// the life of the process, so that answering needs no reference count per request.
    pub fn gateway_name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The classifier deciding which fault an error is (default: the built-in rules).
    pub fn classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = Some(classifier);
        self
    }

    /// Answer with `application/problem+json` bodies (RFC 9457), the default.
    pub fn problem_json(mut self) -> Self {
        self.settings.body = BodyStyle::ProblemJson;
        self
    }

    /// Answer with one line of `text/plain`.
    pub fn plain_text(mut self) -> Self {
        self.settings.body = BodyStyle::PlainText;
        self
    }

    /// Answer with a body of your own: the closure returns the `content-type` and the body.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::HeaderValue;
    /// use tower_upstream::map_faults::MapFaultsLayer;
    ///
    /// let layer = MapFaultsLayer::builder()
    ///     .body_with(|problem| {
    ///         let html = format!("<h1>{}</h1><p>{}</p>", problem.status(), problem.title());
    ///         (HeaderValue::from_static("text/html; charset=utf-8"), Bytes::from(html))
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # let _ = layer;
    /// ```
    pub fn body_with<F>(mut self, f: F) -> Self
    where
        F: Fn(&Problem<'_>) -> (HeaderValue, Bytes) + Send + Sync + 'static,
    {
        self.settings.body = BodyStyle::Custom;
        self.custom_body = Some(Arc::new(f));
        self
    }

    /// Put the error's text (which may name upstream hosts and addresses) in answers:
    /// `details` of `Proxy-Status`, the problem's `detail`, the `grpc-message`. Off by
    /// default; meant for internal deployments. The full cause always goes to `tracing`.
    pub fn expose_details(mut self, expose: bool) -> Self {
        self.settings.expose_details = expose;
        self
    }

    /// The HTTP status for errors nothing recognised (default 502). Must be a 5xx.
    pub fn unclassified_status(mut self, status: StatusCode) -> Self {
        self.unclassified_status = status;
        self
    }

    /// The gRPC status for errors nothing recognised (default `UNAVAILABLE`). Must not be
    /// `OK`.
    pub fn unclassified_grpc_code(mut self, code: grpc::Code) -> Self {
        self.unclassified_grpc = code;
        self
    }

    /// Replace the bodies of the upstream's own 5xx answers (not gRPC ones) with the generic
    /// problem body, keeping the status and `Retry-After` and adding `Proxy-Status` with
    /// `received-status`, so that upstream internals (stack traces, host names) don't reach
    /// clients. Off by default: upstream answers pass through untouched.
    pub fn rewrite_upstream_5xx(mut self, rewrite: bool) -> Self {
        self.settings.rewrite_upstream_5xx = rewrite;
        self
    }

    /// Checks the settings and builds the layer.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field when the gateway name is empty or not printable
    /// ASCII, the unclassified status is not a 5xx, or the unclassified gRPC code is `OK`.
    pub fn build(self) -> Result<MapFaultsLayer, ConfigError> {
        let mut settings = self.settings;
        if let Some(name) = self.name {
            let shown = name.to_string();
            settings.name = render_name(name).ok_or_else(|| {
                ConfigError::new(
                    "map_faults.gateway_name",
                    format!("must be non-empty printable ASCII (got {shown:?})"),
                )
            })?;
        }
        if !self.unclassified_status.is_server_error() {
            return Err(ConfigError::new(
                "map_faults.unclassified_status",
                format!(
                    "must be a 5xx status (got {})",
                    self.unclassified_status.as_u16()
                ),
            ));
        }
        if self.unclassified_grpc == grpc::Code::Ok {
            return Err(ConfigError::new(
                "map_faults.unclassified_grpc_code",
                "must not be OK (got 0)",
            ));
        }
        settings.unclassified_status = self.unclassified_status;
        settings.unclassified_grpc = self.unclassified_grpc;
        let settings = settings.intern();
        let config = if self.classifier.is_some() || self.custom_body.is_some() {
            Config::Custom(Arc::new(Custom {
                settings,
                extras: Extras {
                    classifier: self.classifier.unwrap_or_default(),
                    body: self.custom_body,
                },
            }))
        } else {
            Config::Plain(settings)
        };
        Ok(MapFaultsLayer { config })
    }
}
