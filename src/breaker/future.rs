//! The breaker's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin as StdPin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::error::CircuitOpen;
use super::keyed::Pin;
use super::state::{Admit, Outcome};
use crate::deadline::DeadlineExceeded;
use crate::BoxError;

/// A call's hold on its breaker. Dropped without an outcome (the caller went away), it
/// counts nothing and gives a half-open probe slot back.
pub(crate) struct Permit {
    pin: Arc<Pin>,
    admit: Admit,
    started: Option<Instant>,
    done: bool,
}

impl Permit {
    #[inline]
    pub(crate) fn new(pin: Arc<Pin>, admit: Admit) -> Permit {
        let started = pin.core.config.slow_call.map(|_| Instant::now());
        Permit {
            pin,
            admit,
            started,
            done: false,
        }
    }

    #[inline]
    pub(crate) fn complete(mut self, mut outcome: Outcome) {
        self.done = true;
        let core = &self.pin.core;
        if let (Outcome::Success, Some(started), Some(slow)) =
            (outcome, self.started, core.config.slow_call)
        {
            if started.elapsed() >= slow {
                outcome = Outcome::Failure { retry_after: None };
            }
        }
        match self.admit {
            Admit::Closed => core.on_closed_outcome(self.pin.stripe, outcome),
            Admit::Probe(gen) => core.on_probe_outcome(gen, core.now_ms(), outcome),
        }
    }
}

impl Permit {
    /// Counts an attempt's result: a response as the breaker's configuration classifies
    /// it; an error as a failure, unless it is a local rejection (circuit open, shed) or a
    /// deadline the caller set ([`DeadlineExceeded::is_from_caller`]) or one spent before
    /// the attempt was sent ([`DeadlineExceeded::is_before_start`]), which say nothing
    /// about the upstream. `grpc`: whether the request may have a gRPC
    /// answer, whose `grpc-status` is read (`false` spares the lookup in every response to
    /// a request known not to be gRPC).
    #[inline]
    pub(crate) fn complete_with<B>(self, res: &Result<Response<B>, BoxError>, grpc: bool) {
        let config = &self.pin.core.config;
        let outcome = match res {
            Ok(resp) => config.response_outcome(resp, grpc),
            Err(e) => {
                let c = config.classifier.classify(&**e);
                if c.fault().is_local_rejection() || not_a_sample(&**e) {
                    Outcome::Ignored
                } else {
                    Outcome::Failure {
                        retry_after: c.retry_after(),
                    }
                }
            }
        };
        self.complete(outcome);
    }
}

/// Whether `error` is a deadline that says nothing of the upstream's health: one the caller
/// set, which cut the attempt short, or one spent before the attempt was sent.
#[cold]
fn not_a_sample(error: &(dyn std::error::Error + 'static)) -> bool {
    error
        .downcast_ref::<DeadlineExceeded>()
        .is_some_and(|e| e.is_from_caller() || e.is_before_start())
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let (false, Admit::Probe(gen)) = (self.done, self.admit) {
            let core = &self.pin.core;
            core.on_probe_outcome(gen, core.now_ms(), Outcome::Ignored);
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("key", &self.pin.core.key)
            .field("admit", &self.admit)
            .finish()
    }
}

pin_project! {
    /// Response future of [`CircuitBreaker`](super::CircuitBreaker).
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called {
            #[pin]
            future: F,
            permit: Option<Permit>,
        },
        Refused {
            error: Option<CircuitOpen>,
        },
    }
}

impl<F> ResponseFuture<F> {
    #[inline]
    pub(crate) fn called(future: F, permit: Option<Permit>) -> Self {
        ResponseFuture {
            kind: Kind::Called { future, permit },
        }
    }

    pub(crate) fn refused(error: CircuitOpen) -> Self {
        ResponseFuture {
            kind: Kind::Refused { error: Some(error) },
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Called { permit, .. } => f
                .debug_struct("ResponseFuture")
                .field("permit", permit)
                .finish_non_exhaustive(),
            Kind::Refused { error } => f
                .debug_struct("ResponseFuture")
                .field("refused", error)
                .finish(),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<B>, BoxError>;

    #[inline]
    fn poll(self: StdPin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called { future, permit } => {
                let res = ready!(future.poll(cx)).map_err(Into::into);
                if let Some(p) = permit.take() {
                    p.complete_with(&res, true);
                }
                Poll::Ready(res)
            }
            KindProj::Refused { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| CircuitOpen::new(Default::default()))
                .into())),
        }
    }
}
