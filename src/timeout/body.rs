//! Response-body idle timeout: the time a response body may wait for its next frame.
//!
//! After the response head, the attempt timeout is over; a body that stalls forever would
//! hold the client's connection and the caller's stream. [`ResponseBodyTimeoutLayer`] wraps
//! response bodies in a [`TimeoutBody`] that fails with [`Elapsed`] when the upstream sends
//! no frame for the configured idle time. The body *fails*, it does not end: hyper then aborts
//! the stream (HTTP/1.1: the connection closes before the terminating chunk; HTTP/2:
//! `RST_STREAM`), so a client never takes a truncated body for a complete one.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use futures_util::StreamExt;
//! use http_body_util::{BodyExt, StreamBody};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_upstream::timeout::{error::Elapsed, ResponseBodyTimeoutLayer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(ResponseBodyTimeoutLayer::new(Duration::from_secs(1)))
//!     .service(service_fn(|_req: http::Request<()>| async {
//!         // One frame, then silence.
//!         let frames = futures_util::stream::iter([Ok::<_, std::io::Error>(
//!             http_body::Frame::data(Bytes::from_static(b"hello")),
//!         )])
//!         .chain(futures_util::stream::pending());
//!         Ok::<_, std::io::Error>(http::Response::new(StreamBody::new(frames)))
//!     }));
//!
//! let body = svc.oneshot(http::Request::new(())).await.unwrap().into_body();
//! let mut body = std::pin::pin!(body); // the body holds a timer: pin it to read it
//! let frame = body.frame().await.unwrap().unwrap();
//! assert_eq!(frame.into_data().unwrap(), "hello");
//! let err = body.frame().await.unwrap().unwrap_err();
//! assert!(err.is::<Elapsed>());
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::error::Elapsed;
use crate::deadline::saturating_add;
use crate::timer::Timer;
use crate::BoxError;

/// Applies [`ResponseBodyTimeout`] to services. See the [module docs](self).
#[derive(Debug, Clone, Copy)]
pub struct ResponseBodyTimeoutLayer {
    idle: Duration,
}

impl ResponseBodyTimeoutLayer {
    /// Response bodies fail when they wait longer than `idle` for a frame.
    pub fn new(idle: Duration) -> Self {
        ResponseBodyTimeoutLayer { idle }
    }
}

impl<S> Layer<S> for ResponseBodyTimeoutLayer {
    type Service = ResponseBodyTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResponseBodyTimeout {
            inner,
            idle: self.idle,
        }
    }
}

/// Wraps response bodies in a [`TimeoutBody`]. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct ResponseBodyTimeout<S> {
    inner: S,
    idle: Duration,
}

impl<S> ResponseBodyTimeout<S> {
    /// Wraps `inner`: its response bodies fail when they wait longer than `idle` for a frame.
    pub fn new(inner: S, idle: Duration) -> Self {
        ResponseBodyTimeout { inner, idle }
    }

    inner_accessors!("service", S);
}

impl<S, Req, B> Service<Req> for ResponseBodyTimeout<S>
where
    S: Service<Req, Response = http::Response<B>>,
{
    type Response = http::Response<TimeoutBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
            idle: self.idle,
        }
    }
}

pin_project! {
    /// Response future of [`ResponseBodyTimeout`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        idle: Duration,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<TimeoutBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.inner.poll(cx))?;
        let idle = *this.idle;
        Poll::Ready(Ok(res.map(|body| TimeoutBody::new(body, idle))))
    }
}

pin_project! {
    /// A body that fails with [`Elapsed`] when it waits longer than its idle timeout for a
    /// frame. The timer is armed only while the inner body is `Pending`.
    pub struct TimeoutBody<B> {
        #[pin]
        inner: B,
        idle: Duration,
        // When the current wait times out (cleared after every frame).
        until: Option<Instant>,
        timed_out: bool,
        timer: Timer,
    }
}

impl<B> TimeoutBody<B> {
    /// Wraps `inner`: it fails when it waits longer than `idle` for a frame.
    pub fn new(inner: B, idle: Duration) -> Self {
        TimeoutBody {
            inner,
            idle,
            until: None,
            timed_out: false,
            timer: Timer::new(),
        }
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// Consumes `self`, returning the inner body.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> fmt::Debug for TimeoutBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeoutBody")
            .field("idle", &self.idle)
            .field("timed_out", &self.timed_out)
            .finish_non_exhaustive()
    }
}

impl<B> Body for TimeoutBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.timed_out {
            // Keep failing: a body that timed out never looks complete.
            return Poll::Ready(Some(Err(Elapsed::new().into())));
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            if this.until.take().is_some() {
                // The body may now sit unread for long: its slot is not kept.
                this.timer.cancel();
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let idle = *this.idle;
        let at = *this
            .until
            .get_or_insert_with(|| saturating_add(Instant::now(), idle));
        if this.timer.poll_at(at, cx).is_ready() {
            *this.timed_out = true;
            return Poll::Ready(Some(Err(Elapsed::new().into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        !self.timed_out && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
