//! The response body of [`MapFaults`](super::MapFaults).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::BoxError;

use crate::grpc;

pin_project! {
    /// The body of a response that went through [`MapFaults`](super::MapFaults): the
    /// upstream's body, passed through, or an answer the mapper made.
    ///
    /// An upstream body that fails part-way is never ended as if it were complete: the error
    /// is returned, so the server aborts the stream (HTTP/1.1 closes the connection before
    /// the last chunk, HTTP/2 resets the stream). For a gRPC call whose upstream has not sent
    /// its trailers yet, the body ends instead with trailers carrying `grpc-status: 14`
    /// (`UNAVAILABLE`), which every gRPC client reads as a failed call.
    #[derive(Debug)]
    pub struct FaultBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Upstream {
            #[pin]
            body: B,
            grpc: bool,
            done: bool,
        },
        // Boxed so that wrapping an upstream body stays small: a synthesized answer is the
        // rare path, the size of every response is not.
        Full {
            data: Option<Box<Bytes>>,
        },
    }
}

impl<B> FaultBody<B> {
    pub(crate) fn upstream(body: B, grpc: bool) -> Self {
        FaultBody {
            kind: Kind::Upstream {
                body,
                grpc,
                done: false,
            },
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        FaultBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then(|| Box::new(data)),
            },
        }
    }

    pub(crate) fn empty() -> Self {
        FaultBody {
            kind: Kind::Full { data: None },
        }
    }
}

impl<B> Body for FaultBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(*d)))),
            KindProj::Upstream { body, grpc, done } => {
                if *done {
                    return Poll::Ready(None);
                }
                match body.poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if frame.is_trailers() {
                            // Nothing may follow the trailers.
                            *done = true;
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(err))) => {
                        let err: BoxError = err.into();
                        tracing::warn!(
                            error = %super::response::Chain(&*err),
                            grpc = *grpc,
                            "upstream response body failed after the head was sent"
                        );
                        *done = true;
                        if *grpc {
                            Poll::Ready(Some(Ok(Frame::trailers(unavailable_trailers()))))
                        } else {
                            Poll::Ready(Some(Err(err)))
                        }
                    }
                    Poll::Ready(None) => {
                        *done = true;
                        Poll::Ready(None)
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Upstream { body, done, .. } => *done || body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Upstream { body, done, grpc } => {
                if *done {
                    SizeHint::with_exact(0)
                } else if *grpc {
                    // Never exact: the body may have to end early with trailers, so no
                    // content-length may be promised for it.
                    let mut hint = SizeHint::new();
                    hint.set_lower(body.size_hint().lower());
                    hint
                } else {
                    body.size_hint()
                }
            }
        }
    }
}

fn unavailable_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(2);
    trailers.insert(
        HeaderName::from_static("grpc-status"),
        grpc::Code::Unavailable.to_header_value(),
    );
    trailers.insert(
        HeaderName::from_static("grpc-message"),
        HeaderValue::from_static("upstream response body failed"),
    );
    trailers
}
