//! The [`AttemptTimeout`](super::AttemptTimeout) response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{sleep_until, Instant, Sleep};

use super::error::Elapsed;
use crate::deadline::{cover, saturating_add, DeadlineExceeded};
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
            // `Err(timeout)` until the clock is read: the attempt has a deadline of its own
            // only, which starts when it first has to wait.
            at: Result<Instant, Duration>,
            by_deadline: bool,
            #[pin]
            sleep: Option<Sleep>,
        },
        Untimed {
            #[pin]
            inner: F,
        },
        Spent,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, at: Instant, by_deadline: bool) -> Self {
        ResponseFuture {
            kind: Kind::Timed {
                inner,
                at: Ok(at),
                by_deadline,
                sleep: None,
            },
        }
    }

    pub(super) fn lazy(inner: F, timeout: Duration) -> Self {
        ResponseFuture {
            kind: Kind::Timed {
                inner,
                at: Err(timeout),
                by_deadline: false,
                sleep: None,
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
            Kind::Timed {
                at,
                by_deadline,
                sleep,
                ..
            } => d
                .field("until", at)
                .field("by_deadline", by_deadline)
                .field("armed", &sleep.is_some()),
            Kind::Untimed { .. } => d.field("until", &None::<Instant>),
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
                at,
                by_deadline,
                mut sleep,
            } => {
                if let Poll::Ready(res) = inner.poll(cx) {
                    return Poll::Ready(res.map_err(Into::into));
                }
                let at = match *at {
                    Ok(at) => at,
                    Err(timeout) => {
                        let start = Instant::now();
                        *at = Ok(saturating_add(start, timeout));
                        saturating_add(start, timeout)
                    }
                };
                if sleep.is_none() {
                    sleep.set(Some(sleep_until(at)));
                }
                if let Some(sleep) = sleep.as_pin_mut() {
                    if sleep.poll(cx).is_ready() {
                        return Poll::Ready(Err(if *by_deadline {
                            DeadlineExceeded::in_flight().into()
                        } else {
                            Elapsed::new().into()
                        }));
                    }
                }
                // Armed: a deadline above needs no timer of its own.
                cover::answer(at);
                Poll::Pending
            }
            KindProj::Untimed { inner } => inner.poll(cx).map_err(Into::into),
            KindProj::Spent => Poll::Ready(Err(DeadlineExceeded::before_start().into())),
        }
    }
}
