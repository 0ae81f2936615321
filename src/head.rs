//! [`RequestHead`]: the one read-only view of a request's head that policies and key
//! functions get; [`HeadCopy`]: the copy of a head that the retry keeps for later attempts.

use std::fmt;
use std::sync::OnceLock;

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Extensions, HeaderMap, Method, Uri, Version};

use crate::grpc;

/// A read-only view of a request's head (method, URI, headers, extensions), as the retry
/// policy and the breaker's key function see it; the body is the layers' business.
#[derive(Clone, Copy)]
pub struct RequestHead<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: Headers<'a>,
    extensions: &'a Extensions,
}

/// Where a [`RequestHead`]'s headers are: a request's own map, or a [`HeadCopy`]'s packed
/// headers, unpacked the first time they are read.
#[derive(Clone, Copy)]
enum Headers<'a> {
    Map(&'a HeaderMap),
    Packed(&'a Packed),
}

impl<'a> RequestHead<'a> {
    pub(crate) fn of<B>(req: &'a http::Request<B>) -> Self {
        RequestHead {
            method: req.method(),
            uri: req.uri(),
            headers: Headers::Map(req.headers()),
            extensions: req.extensions(),
        }
    }

    pub(crate) fn of_copy(copy: &'a HeadCopy) -> Self {
        RequestHead {
            method: &copy.method,
            uri: &copy.uri,
            headers: Headers::Packed(&copy.headers),
            extensions: &copy.extensions,
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
    ///
    /// Of a request the retry may send again, these are read from its copy of the head, which
    /// keeps them packed in one buffer: the first read in a request's life rebuilds the map
    /// (the default policy reads them only on the way to a retry).
    pub fn headers(&self) -> &'a HeaderMap {
        match self.headers {
            Headers::Map(map) => map,
            Headers::Packed(packed) => &packed.unpacked().map,
        }
    }

    /// Whether the request is a gRPC call, when that is known without a header lookup
    /// (from a copy of the head, which noted it while packing).
    pub(crate) fn grpc_hint(&self) -> Option<bool> {
        match self.headers {
            Headers::Map(_) => None,
            Headers::Packed(packed) => Some(packed.grpc),
        }
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
        ) || self.headers().contains_key("idempotency-key")
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

/// A copy of a request's head, kept for later attempts of a request the retry may send
/// again.
///
/// `http::request::Parts::clone` copies the header map as it is: two allocations (its index
/// and its entries) and, for each header, a clone of its name's and value's `Bytes` (an atomic
/// increment on a buffer shared with the request, or the promotion of one built from a
/// `String`: another allocation); the copy's drop undoes all of it. Most requests are never
/// retried, so the copy is made cheap instead and the map is rebuilt only when read: the
/// headers are packed into one buffer (one allocation, none for a request without headers),
/// and unpacked the first time a policy reads them or a retry needs them. Method, URI,
/// version and extensions are cloned as they are (cheap, or empty, for most requests).
pub(crate) struct HeadCopy {
    method: Method,
    uri: Uri,
    version: Version,
    extensions: Extensions,
    headers: Packed,
}

/// Headers packed into one buffer. Each header, in the map's iteration order (every value of
/// a name together, in order): the name's length (`u16`, as `http` limits names to
/// 65 535 bytes), the value's length (`u64`), whether the value is sensitive (one byte), the
/// name, the value.
struct Packed {
    /// Kept as it was filled: shrinking it would cost a reallocation.
    buf: Vec<u8>,
    /// How many headers `buf` holds.
    len: usize,
    /// Whether the headers make the request a gRPC call ([`grpc::is_grpc`]), noted while
    /// packing so that policies need not unpack to know.
    grpc: bool,
    /// The map, rebuilt when first read.
    unpacked: OnceLock<Box<Unpacked>>,
}

/// Packed headers as a map again.
struct Unpacked {
    map: HeaderMap,
    /// Whether every header could be rebuilt. One whose value holds bytes a `HeaderValue` may
    /// not hold (made with `from_maybe_shared_unchecked`, against its contract) is left out,
    /// and then the request is not sent again: a later attempt must not lose a header.
    complete: bool,
}

const NAME_LEN: usize = 2;
const VALUE_LEN: usize = 8;
const HEADER: usize = NAME_LEN + VALUE_LEN + 1;
/// The bytes of name and value a header is guessed to hold, for the buffer's first size.
const GUESS: usize = 40;

impl HeadCopy {
    /// Copies `head` (without its body).
    #[inline]
    pub(crate) fn of(head: &http::request::Parts) -> HeadCopy {
        HeadCopy {
            method: head.method.clone(),
            uri: head.uri.clone(),
            version: head.version,
            extensions: head.extensions.clone(),
            headers: Packed::pack(&head.headers),
        }
    }

    /// The copied extensions.
    pub(crate) fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// Whether [`to_parts`](Self::to_parts) gives the head back whole (see [`Unpacked`]).
    pub(crate) fn is_whole(&self) -> bool {
        self.headers.unpacked().complete
    }

    /// A head for another attempt, equal to the copied one.
    pub(crate) fn to_parts(&self) -> http::request::Parts {
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.method = self.method.clone();
        parts.uri = self.uri.clone();
        parts.version = self.version;
        parts.headers = self.headers.unpacked().map.clone();
        parts.extensions = self.extensions.clone();
        parts
    }
}

impl Packed {
    #[inline]
    fn pack(headers: &HeaderMap) -> Packed {
        if headers.is_empty() {
            return Packed {
                buf: Vec::new(),
                len: 0,
                grpc: false,
                unpacked: OnceLock::new(),
            };
        }
        Packed::pack_some(headers)
    }

    fn pack_some(headers: &HeaderMap) -> Packed {
        // One pass: a first guess that holds the usual head, grown (rarely) for a large one.
        let mut buf = Vec::with_capacity(headers.len() * (HEADER + GUESS));
        // Of the first `content-type`, as `grpc::is_grpc` reads it.
        let mut content_type = None;
        for (name, value) in headers {
            if content_type.is_none() && name == CONTENT_TYPE {
                content_type = Some(grpc::is_grpc_content_type(value.as_bytes()));
            }
            let name = name.as_str().as_bytes();
            let mut fixed = [0; HEADER];
            // `http` refuses longer names; a `u16` always holds the length.
            fixed[..NAME_LEN].copy_from_slice(&(name.len() as u16).to_le_bytes());
            fixed[NAME_LEN..NAME_LEN + VALUE_LEN]
                .copy_from_slice(&(value.len() as u64).to_le_bytes());
            fixed[HEADER - 1] = u8::from(value.is_sensitive());
            buf.extend_from_slice(&fixed);
            buf.extend_from_slice(name);
            buf.extend_from_slice(value.as_bytes());
        }
        Packed {
            buf,
            len: headers.len(),
            grpc: content_type.unwrap_or(false),
            unpacked: OnceLock::new(),
        }
    }

    fn unpacked(&self) -> &Unpacked {
        self.unpacked.get_or_init(|| Box::new(self.unpack()))
    }

    fn unpack(&self) -> Unpacked {
        // A hint only, kept small enough that `with_capacity` cannot refuse it.
        let mut map = HeaderMap::with_capacity(self.len.min(1024));
        let mut complete = true;
        let mut rest = &self.buf[..];
        while rest.len() >= HEADER {
            let (lens, tail) = rest.split_at(HEADER);
            let name_len = usize::from(u16::from_le_bytes([lens[0], lens[1]]));
            let mut value_len = [0; VALUE_LEN];
            value_len.copy_from_slice(&lens[NAME_LEN..NAME_LEN + VALUE_LEN]);
            let value_len = usize::try_from(u64::from_le_bytes(value_len)).unwrap_or(usize::MAX);
            let sensitive = lens[HEADER - 1] != 0;
            if tail.len() < name_len || tail.len() - name_len < value_len {
                complete = false;
                break;
            }
            let (name, tail) = tail.split_at(name_len);
            let (value, tail) = tail.split_at(value_len);
            rest = tail;
            match (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                (Ok(name), Ok(mut value)) => {
                    value.set_sensitive(sensitive);
                    if map.try_append(name, value).is_err() {
                        complete = false;
                    }
                }
                _ => complete = false,
            }
        }
        Unpacked { map, complete }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(build: http::request::Builder) -> http::request::Parts {
        build.body(()).unwrap().into_parts().0
    }

    fn assert_same(a: &http::request::Parts, b: &http::request::Parts) {
        assert_eq!(a.method, b.method);
        assert_eq!(a.uri, b.uri);
        assert_eq!(a.version, b.version);
        assert_eq!(a.headers, b.headers);
        let order = |h: &HeaderMap| {
            h.iter()
                .map(|(n, v)| (n.clone(), v.clone(), v.is_sensitive()))
                .collect::<Vec<_>>()
        };
        assert_eq!(order(&a.headers), order(&b.headers));
    }

    #[test]
    fn an_empty_head_is_copied_without_a_buffer() {
        let original = head(http::Request::get("/"));
        let copy = HeadCopy::of(&original);
        assert!(copy.headers.buf.is_empty());
        assert!(copy.is_whole());
        assert_same(&copy.to_parts(), &original);
    }

    #[test]
    fn headers_come_back_in_order_with_every_value_and_flag() {
        let mut sensitive = HeaderValue::from_static("Bearer secret");
        sensitive.set_sensitive(true);
        let mut original = head(
            http::Request::post("http://example.test:8080/a/b?c=d")
                .version(Version::HTTP_2)
                .header("host", "example.test")
                .header("x-custom-name", "one")
                .header("accept", "text/plain")
                .header("x-custom-name", "two")
                .header("authorization", sensitive)
                .header("x-empty", "")
                .header(
                    "x-obs-text",
                    HeaderValue::from_bytes(b"caf\xe9\tok").unwrap(),
                ),
        );
        original.extensions.insert(crate::retry::Idempotent);
        let copy = HeadCopy::of(&original);
        assert!(copy.is_whole());
        let again = copy.to_parts();
        assert_same(&again, &original);
        assert!(again.headers["authorization"].is_sensitive());
        assert!(again.extensions.get::<crate::retry::Idempotent>().is_some());
        let view = RequestHead::of_copy(&copy);
        assert_eq!(view.headers(), &original.headers);
        assert!(view.is_idempotent());
    }

    #[test]
    fn the_copy_knows_a_grpc_call_as_grpc_is_grpc_does() {
        for (types, grpc) in [
            (&["application/grpc+proto"][..], true),
            (&["Application/GRPC"], true),
            (&["application/grpc-web"], false),
            (&["text/plain", "application/grpc"], false),
            (&[], false),
        ] {
            let mut build = http::Request::post("/pkg.Svc/Call").header("te", "trailers");
            for t in types {
                build = build.header("content-type", *t);
            }
            let original = head(build);
            let copy = HeadCopy::of(&original);
            assert_eq!(grpc::is_grpc(&original.headers), grpc, "{types:?}");
            assert_eq!(
                RequestHead::of_copy(&copy).grpc_hint(),
                Some(grpc),
                "{types:?}"
            );
            assert_eq!(
                RequestHead::of(&http::Request::from_parts(original, ())).grpc_hint(),
                None
            );
        }
    }

    #[test]
    fn a_value_made_unchecked_with_a_forbidden_byte_makes_the_copy_partial() {
        // A stand-in for a value built unchecked: a packed buffer whose value holds
        // a byte `HeaderValue::from_bytes` refuses.
        let mut original = head(http::Request::get("/").header("x-ok", "fine"));
        original
            .headers
            .insert("x-bad", HeaderValue::from_static("placeholder"));
        let mut copy = HeadCopy::of(&original);
        let mut buf = copy.headers.buf.to_vec();
        let at = buf.len() - 1;
        buf[at] = b'\n';
        copy.headers.buf = buf;
        assert!(!copy.is_whole());
        assert_eq!(copy.to_parts().headers.len(), 1);
    }
}
