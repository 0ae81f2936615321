//! The [`AttemptTimeout`](super::AttemptTimeout) response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use super::error::Elapsed;
use super::Timing;
use crate::deadline::{cover, DeadlineExceeded};
use crate::timer::Timer;
use crate::BoxError;

pin_project! {
    /// Response future of [`AttemptTimeout`](super::AttemptTimeout).
    ///
    /// Arms its timer only once the inner future has returned `Pending`: an attempt that
    /// answers at once costs no timer.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Timed {
            #[pin]
            inner: F,
            timing: Timing,
            // Whether the request's deadline is one the caller set.
            from_caller: bool,
            timer: Timer,
        },
        Spent,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, timing: Timing, from_caller: bool) -> Self {
        ResponseFuture {
            kind: Kind::Timed {
                inner,
                timing,
                from_caller,
                timer: Timer::new(),
            },
        }
    }

    pub(super) fn spent() -> Self {
        ResponseFuture { kind: Kind::Spent }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ResponseFuture");
        match &self.kind {
            Kind::Timed { timing, timer, .. } => {
                d.field("timing", timing).field("armed", &timer.is_set())
            }
            Kind::Spent => d.field("spent", &true),
        };
        d.finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Timed {
                inner,
                timing,
                from_caller,
                timer,
            } => {
                if let Poll::Ready(res) = inner.poll(cx) {
                    return Poll::Ready(res.map_err(Into::into));
                }
                let Some((at, by_deadline)) = timing.resolve() else {
                    return Poll::Pending;
                };
                if timer.poll_at(at, cx).is_ready() {
                    return Poll::Ready(Err(if by_deadline {
                        DeadlineExceeded::in_flight()
                            .from_caller(*from_caller)
                            .into()
                    } else {
                        Elapsed::new().into()
                    }));
                }
                // Armed: a deadline above needs no timer of its own.
                cover::answer(at);
                Poll::Pending
            }
            KindProj::Spent => Poll::Ready(Err(DeadlineExceeded::before_start().into())),
        }
    }
}
