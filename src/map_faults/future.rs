//! Response future of [`MapFaults`](super::MapFaults).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use tower::BoxError;

use super::body::FaultBody;
use super::response::Config;

pin_project! {
    /// Response future of [`MapFaults`](super::MapFaults): never fails.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        // The configuration, with the request's gRPC flag folded in.
        config: Config,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called {
            #[pin]
            future: F,
        },
        // `poll_ready` of the inner service failed; answer that error.
        Failed {
            error: Option<BoxError>,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn called(future: F, config: Config) -> Self {
        ResponseFuture {
            state: State::Called { future },
            config,
        }
    }

    pub(crate) fn failed(error: BoxError, config: Config) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
            config,
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("grpc", &self.config.is_grpc())
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<FaultBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.state.project() {
            StateProj::Called { future } => ready!(future.poll(cx)).map_err(Into::into),
            StateProj::Failed { error } => Err(error
                .take()
                .expect("ResponseFuture polled after completion")),
        };
        Poll::Ready(Ok(answer(this.config, result)))
    }
}

/// The answer to an outcome: the upstream's response (wrapped, maybe rewritten), or the
/// fault's. `config` has the request's gRPC flag folded in ([`Config::for_request`]).
#[inline(always)]
pub(crate) fn answer<B>(
    config: &Config,
    result: Result<Response<B>, BoxError>,
) -> Response<FaultBody<B>> {
    match result {
        // The happy path, inline: an HTTP answer passed on as it is.
        Ok(res)
            if !config.is_grpc()
                && (!config.view().settings.rewrite_upstream_5xx
                    || !res.status().is_server_error()) =>
        {
            res.map(|body| FaultBody::upstream(body, false))
        }
        other => answer_other(config, other),
    }
}

/// [`answer`] for a gRPC answer, an upstream 5xx to rewrite, or a fault.
#[inline(never)]
fn answer_other<B>(
    config: &Config,
    result: Result<Response<B>, BoxError>,
) -> Response<FaultBody<B>> {
    let grpc = config.is_grpc();
    let view = config.view();
    match result {
        Ok(res) => {
            if view.settings.rewrite_upstream_5xx && !grpc && res.status().is_server_error() {
                tracing::debug!(
                    status = res.status().as_u16(),
                    "rewriting upstream 5xx answer"
                );
                view.rewrite_upstream(&res)
            } else {
                let mut res = res;
                if grpc {
                    // A gRPC body may have to end early with UNAVAILABLE trailers; a
                    // content-length would make that a protocol error.
                    res.headers_mut().remove(http::header::CONTENT_LENGTH);
                }
                res.map(|body| FaultBody::upstream(body, grpc))
            }
        }
        Err(err) => view.fault_response(&*err, grpc),
    }
}
