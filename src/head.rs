//! [`RequestHead`]: the one read-only view of a request's head that policies and key
//! functions get.

use std::fmt;

use http::{Extensions, HeaderMap, Method, Uri};

/// A read-only view of a request's head (method, URI, headers, extensions), as the retry
/// policy and the breaker's key function see it; the body is the layers' business.
#[derive(Clone, Copy)]
pub struct RequestHead<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    extensions: &'a Extensions,
}

impl<'a> RequestHead<'a> {
    pub(crate) fn of<B>(req: &'a http::Request<B>) -> Self {
        RequestHead {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }

    pub(crate) fn of_parts(parts: &'a http::request::Parts) -> Self {
        RequestHead {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            extensions: &parts.extensions,
        }
    }

    /// The request method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// The request URI.
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }

    /// The request headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The request extensions.
    pub fn extensions(&self) -> &'a Extensions {
        self.extensions
    }

    /// Whether the request may be repeated after it may have been processed: its method
    /// is idempotent (RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE), it carries
    /// an `Idempotency-Key` header, or the caller marked it with the [`Idempotent`](crate::retry::Idempotent)
    /// extension.
    pub fn is_idempotent(&self) -> bool {
        matches!(
            *self.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        ) || self.headers.contains_key("idempotency-key")
            || self.extensions.get::<crate::retry::Idempotent>().is_some()
    }
}

impl fmt::Debug for RequestHead<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestHead")
            .field("method", self.method)
            .field("uri", self.uri)
            .finish_non_exhaustive()
    }
}
