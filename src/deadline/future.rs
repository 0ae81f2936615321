//! The [`Deadline`](super::Deadline) response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::cover;
use super::error::DeadlineExceeded;
use crate::BoxError;

pin_project! {
    /// Response future of [`Deadline`](super::Deadline).
    ///
    /// Arms no timer until the inner future has returned `Pending`, and none at all while a
    /// timer below (an [`AttemptTimeout`](crate::timeout::AttemptTimeout)) will wake the
    /// request by its deadline. Its own timer, when it needs one, is boxed: that keeps the
    /// future small in the common stack (deadline over attempt timeout), where it is never
    /// needed, at the cost of one allocation per request for a deadline used without an
    /// attempt timeout below it.
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
            timer: Timer,
        },
        Untimed {
            #[pin]
            inner: F,
        },
        Spent,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn timed(inner: F, at: Instant, from_caller: bool) -> Self {
        ResponseFuture {
            kind: Kind::Timed {
                inner,
                timer: Timer::new(at, from_caller),
            },
        }
    }

    pub(super) fn untimed(inner: F) -> Self {
        ResponseFuture {
            kind: Kind::Untimed { inner },
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
            Kind::Timed { timer, .. } => d
                .field("deadline", &timer.at)
                .field("own_timer", &timer.timer.is_set()),
            Kind::Untimed { .. } => d.field("deadline", &None::<Instant>),
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
            KindProj::Timed { inner, timer } => timer.poll(inner, cx),
            KindProj::Untimed { inner } => inner.poll(cx).map_err(Into::into),
            KindProj::Spent => Poll::Ready(Err(DeadlineExceeded::before_start().into())),
        }
    }
}

/// A deadline's timer: fails the inner future with [`DeadlineExceeded`] once `at` has
/// passed. Its own timer is set only once the inner future has returned `Pending` without
/// a timer below covering `at` (see [`cover`]): in the common stack (deadline over attempt
/// timeout) it is never needed.
pub(crate) struct Timer {
    at: Instant,
    /// Whether the caller set the deadline (see [`DeadlineExceeded::from_caller`]).
    from_caller: bool,
    timer: crate::timer::Timer,
}

impl Timer {
    pub(crate) fn new(at: Instant, from_caller: bool) -> Self {
        Timer {
            at,
            from_caller,
            timer: crate::timer::Timer::new(),
        }
    }

    /// Polls `inner` under the deadline.
    #[inline]
    pub(crate) fn poll<F, T, E>(
        &mut self,
        inner: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<T, BoxError>>
    where
        F: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        let at = self.at;
        let ask = cover::Ask::start(at);
        let res = inner.poll(cx);
        let covered = ask.finish();
        if let Poll::Ready(res) = res {
            return Poll::Ready(res.map_err(Into::into));
        }
        if (!covered || self.timer.is_set()) && self.timer.poll_at(at, cx).is_ready() {
            let exceeded = DeadlineExceeded::in_flight().from_caller(self.from_caller);
            return Poll::Ready(Err(exceeded.into()));
        }
        // This task will be woken by `at`: tell a deadline above, if one asks.
        cover::answer(at);
        Poll::Pending
    }
}
