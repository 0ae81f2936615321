//! [`ResponseFuture`] for [`Retry`](super::Retry).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::BoxError;
use tower_service::Service;

use super::backoff::{pushback, Pushback};
use super::budget::stripe_index;
use super::policy::{Outcome, RequestHead};
use super::replay::{lock, ReplayBody, State};
use super::{Attempts, Config, Policy, Share};
use crate::deadline::{
    cover, lower_propagated, Due, Propagated, PropagatedHeader, RequestDeadline,
};
use crate::fault::Fault;
use crate::grpc;
use crate::head::HeadCopy;
use crate::stripe::Stripe;

pin_project! {
    /// The response future of [`Retry`](super::Retry).
    ///
    /// Requests that cannot be retried poll the inner future directly; the others go
    /// through a small state machine (attempt, backoff sleep, readiness, next attempt), with
    /// no allocation besides the recorded body.
    pub struct ResponseFuture<S, P, B>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        #[pin]
        kind: Kind<S::Future, S, P, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, S, P, B> {
        Once { #[pin] fut: F },
        Retrying {
            #[pin]
            stage: Stage<F>,
            ctx: Ctx<S, P, B>,
        },
    }
}

pin_project! {
    #[project = StageProj]
    enum Stage<F> {
        Calling { #[pin] fut: F },
        // Boxed: only retries that wait pay for it, and the future stays small to move.
        Sleeping { sleep: Pin<Box<Sleep>> },
        Ready,
    }
}

pub(crate) struct Ctx<S, P, B> {
    /// This thread's stripe's reference to the layer's configuration and service.
    pub(crate) config: Arc<Stripe<Share<S, P>>>,
    /// The clone later attempts go to, made for the second attempt.
    pub(crate) service: Option<S>,
    pub(crate) tries: Tries<B>,
    /// The deadline a `Deadline` above shared without an extension (inside `Upstream`); one
    /// in the head's extensions travels with the head.
    pub(crate) deadline: Due,
}

/// A request body's recording, shared by the attempts that replay it.
pub(crate) type Recording<B> = Arc<Mutex<State<B>>>;

/// A request that may be retried: the budget stripe it deposited in, and what later
/// attempts need.
pub(crate) type Begun<B> = (usize, Tries<B>);

/// What a retry keeps of a request to send it again, and how the attempts went so far.
/// Shared by [`Retry`](super::Retry) and [`Upstream`](crate::Upstream), which each keep the
/// service to call and the configuration themselves.
pub(crate) struct Tries<B> {
    head: HeadCopy,
    /// The recorded body; `None` when the body was empty.
    replay: Option<Recording<B>>,
    attempts: u32,
    /// The previous backoff, in nanoseconds (for decorrelated jitter).
    prev_delay_ns: u64,
}

impl<S, P, B> ResponseFuture<S, P, B>
where
    S: Service<Request<ReplayBody<B>>>,
{
    #[inline]
    pub(crate) fn once(fut: S::Future) -> Self {
        ResponseFuture {
            kind: Kind::Once { fut },
        }
    }

    #[inline]
    pub(crate) fn retrying(fut: S::Future, ctx: Ctx<S, P, B>) -> Self {
        ResponseFuture {
            kind: Kind::Retrying {
                stage: Stage::Calling { fut },
                ctx,
            },
        }
    }
}

impl<S, P, B, ResB> Future for ResponseFuture<S, P, B>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    P: Policy,
{
    type Output = Result<Response<ResB>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Once { fut } => Poll::Ready(ready!(fut.poll(cx)).map_err(Into::into)),
            KindProj::Retrying { mut stage, ctx } => loop {
                match stage.as_mut().project() {
                    StageProj::Calling { fut } => {
                        let res = ready!(fut.poll(cx)).map_err(Into::into);
                        match ctx.tries.decide(&ctx.config, &res, &mut ctx.deadline) {
                            None => return Poll::Ready(finish(res, ctx.tries.attempts)),
                            Some(delay) => {
                                drop(res);
                                if delay.is_zero() {
                                    stage.set(Stage::Ready);
                                } else {
                                    stage.set(Stage::Sleeping {
                                        sleep: Box::pin(tokio::time::sleep(delay)),
                                    });
                                }
                            }
                        }
                    }
                    StageProj::Sleeping { sleep } => {
                        ready!(sleep.as_mut().poll(cx));
                        stage.set(Stage::Ready);
                    }
                    StageProj::Ready => {
                        let config = &ctx.config;
                        let service = ctx.service.get_or_insert_with(|| config.service.get());
                        if let Err(e) = ready!(service.poll_ready(cx)) {
                            return Poll::Ready(Err(e.into()));
                        }
                        let req = ctx.tries.next_request(ctx.deadline.known(), None);
                        let fut = {
                            // The layers below read the private deadline while called.
                            let _shared = (!ctx.deadline.is_never())
                                .then(|| cover::Shared::share_due(None, ctx.deadline, None));
                            service.call(req)
                        };
                        stage.set(Stage::Calling { fut });
                    }
                }
            },
        }
    }
}

/// Marks a response that took more than one attempt (inserting an extension allocates, so
/// the first-attempt happy path does not).
#[inline]
pub(crate) fn finish<ResB>(
    mut res: Result<Response<ResB>, BoxError>,
    attempts: u32,
) -> Result<Response<ResB>, BoxError> {
    mark(&mut res, attempts);
    res
}

/// [`finish`] in place: the response is not moved.
#[inline]
pub(crate) fn mark<ResB>(res: &mut Result<Response<ResB>, BoxError>, attempts: u32) {
    if attempts > 1 {
        if let Ok(r) = res {
            r.extensions_mut().insert(Attempts(attempts));
        }
    }
}

impl<B> Tries<B> {
    /// Starts a request: when `cfg` may retry it, deposits in the budget (`now` gives the
    /// time when the budget needs it) and keeps a copy of its head and, unless it is empty,
    /// a recording of its body. Returns the request to send first and, when it may be
    /// retried, the stripe it deposited in and what later attempts need.
    #[inline]
    pub(crate) fn begin<P: Policy>(
        cfg: &Config<P>,
        req: Request<B>,
        now: impl FnOnce() -> Instant,
    ) -> (Request<ReplayBody<B>>, Option<Begun<B>>)
    where
        B: Body,
    {
        if !Self::may_retry(cfg, &req) {
            return (req.map(ReplayBody::passthrough), None);
        }
        let stripe = Self::deposit(cfg, now);
        let (parts, body) = req.into_parts();
        let (first, replay) = Self::record(cfg, body);
        let tries = Tries::new(HeadCopy::of(&parts), replay);
        (Request::from_parts(parts, first), Some((stripe, tries)))
    }

    /// Whether `cfg` may retry `req` at all (then [`begin`](Self::begin) keeps a copy).
    #[inline]
    pub(crate) fn may_retry<P: Policy>(cfg: &Config<P>, req: &Request<B>) -> bool {
        cfg.max_attempts > 1 && cfg.policy.may_retry(RequestHead::of(req))
    }

    /// Deposits a request that may be retried in this thread's budget stripe, which it
    /// returns.
    #[inline]
    pub(crate) fn deposit<P>(cfg: &Config<P>, now: impl FnOnce() -> Instant) -> usize {
        let stripe = stripe_index();
        cfg.budget.deposit_in(stripe, now);
        stripe
    }

    /// The first attempt's body and, unless `body` is empty, the recording later attempts
    /// replay.
    #[inline]
    pub(crate) fn record<P>(cfg: &Config<P>, body: B) -> (ReplayBody<B>, Option<Recording<B>>)
    where
        B: Body,
    {
        if body.is_end_stream() {
            (ReplayBody::passthrough(body), None)
        } else {
            let shared = State::new(body, cfg.body_limit);
            (ReplayBody::replay(&shared), Some(shared))
        }
    }

    /// What later attempts of a request need: a copy of its `head`, the body's recording.
    #[inline]
    pub(crate) fn new(head: HeadCopy, replay: Option<Recording<B>>) -> Self {
        Tries {
            head,
            replay,
            attempts: 1,
            prev_delay_ns: 0,
        }
    }

    /// Attempts made so far.
    #[inline]
    pub(crate) fn attempts(&self) -> u32 {
        self.attempts
    }

    /// After an attempt: `Some(delay)` to retry after `delay`, `None` to return the outcome.
    /// The happy path: a response the policy does not retry costs one policy call.
    /// `deadline` is the one shared without an extension (worked out here if a retry is
    /// weighed against it); one in the head's extensions travels with the head.
    #[inline]
    pub(crate) fn decide<P: Policy, ResB>(
        &mut self,
        cfg: &Config<P>,
        res: &Result<Response<ResB>, BoxError>,
        deadline: &mut Due,
    ) -> Option<Duration> {
        if self.attempts >= cfg.max_attempts {
            return None;
        }
        if let Ok(rsp) = res {
            let outcome = Outcome::Response {
                status: rsp.status(),
                headers: rsp.headers(),
            };
            if !cfg
                .policy
                .should_retry(RequestHead::of_copy(&self.head), &outcome)
            {
                return None;
            }
            return self.decide_slow(cfg, res, true, deadline);
        }
        self.decide_slow(cfg, res, false, deadline)
    }

    #[inline(never)]
    fn decide_slow<P: Policy, ResB>(
        &mut self,
        cfg: &Config<P>,
        res: &Result<Response<ResB>, BoxError>,
        policy_said_yes: bool,
        deadline: &mut Due,
    ) -> Option<Duration> {
        let head = RequestHead::of_copy(&self.head);
        let classification;
        let (outcome, what) = match res {
            Ok(rsp) => (
                Outcome::Response {
                    status: rsp.status(),
                    headers: rsp.headers(),
                },
                What::Status(rsp.status()),
            ),
            Err(e) => {
                classification = cfg.classifier.classify(&**e);
                // The gateway's own refusals (circuit open, shed) say nothing about the
                // upstream, and a retry would meet the same refusal.
                if classification.fault().is_local_rejection() {
                    return None;
                }
                let what = What::Fault(classification.fault());
                (
                    Outcome::Error {
                        classification: &classification,
                        error: &**e,
                    },
                    what,
                )
            }
        };
        if !policy_said_yes && !cfg.policy.should_retry(head, &outcome) {
            return None;
        }
        let (asked, after_response) = match outcome {
            Outcome::Response { headers, .. } => (pushback(headers), true),
            Outcome::Error { classification, .. } => (
                classification
                    .retry_after()
                    .map_or(Pushback::None, Pushback::After),
                false,
            ),
        };
        if let Some(shared) = &self.replay {
            if !lock(shared).can_replay(after_response) {
                tracing::debug!(attempt = self.attempts, outcome = %what, "request body cannot be replayed; not retrying");
                return None;
            }
        }
        let delay = match asked {
            Pushback::Never => return None,
            Pushback::After(d) if d > cfg.pushback_cap => {
                tracing::debug!(attempt = self.attempts, outcome = %what, retry_after_ms = d.as_millis() as u64, "upstream pushback exceeds the cap; not retrying");
                return None;
            }
            Pushback::After(d) => d,
            Pushback::None => cfg
                .backoff
                .delay(self.attempts, Duration::from_nanos(self.prev_delay_ns)),
        };
        // Read here, not kept in the future: only a retry decision needs it.
        let deadline = self.deadline(deadline.get());
        if let Some(deadline) = deadline {
            if deadline.saturating_duration_since(Instant::now()) <= delay {
                tracing::debug!(attempt = self.attempts, outcome = %what, "deadline leaves no time for another attempt");
                return None;
            }
        }
        if !self.head.is_whole() {
            tracing::debug!(attempt = self.attempts, outcome = %what, "request head cannot be copied whole; not retrying");
            return None;
        }
        if !cfg.budget.withdraw() {
            tracing::debug!(attempt = self.attempts, outcome = %what, "retry budget exhausted");
            return None;
        }
        self.prev_delay_ns = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        tracing::debug!(
            attempt = self.attempts + 1,
            outcome = %what,
            delay_ms = delay.as_millis() as u64,
            "retrying upstream request"
        );
        Some(delay)
    }

    /// The request's deadline: the earlier of the `private` one (the stack's, if any) and
    /// the one in its extensions. Read when a retry is weighed or made, not kept.
    fn deadline(&self, private: Option<Instant>) -> Option<Instant> {
        let ext = self
            .head
            .extensions()
            .get::<RequestDeadline>()
            .map(|d| d.instant());
        match (ext, private) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next attempt's request (counted as made). `deadline`: the stack's private one, if
    /// any (already worked out by the retry decision); `header`: the deadline header the
    /// stack propagates, if any (else the one a `Deadline` above noted on the request).
    pub(crate) fn next_request(
        &mut self,
        deadline: Option<Instant>,
        header: Option<&Propagated>,
    ) -> Request<ReplayBody<B>> {
        let noted;
        let header = match header {
            Some(header) => Some(header),
            None => {
                noted = self.head.extensions().get::<PropagatedHeader>().cloned();
                noted.as_ref().map(|n| &n.0)
            }
        };
        let mut parts = self.head.to_parts();
        let grpc = grpc::is_grpc(&parts.headers);
        if grpc {
            parts.headers.insert(
                "grpc-previous-rpc-attempts",
                HeaderValue::from(self.attempts),
            );
        }
        // The copied head carries the time the request had at the start, in `grpc-timeout`
        // and the deadline's header: the upstream is told only what the deadline leaves (an
        // attempt timeout below may lower it further; nothing is added where none was).
        if grpc || header.is_some() {
            if let Some(at) = self.deadline(deadline) {
                let left = at.saturating_duration_since(Instant::now());
                if grpc && grpc::timeout_of(&parts.headers).is_some_and(|t| t > left) {
                    parts
                        .headers
                        .insert(grpc::GRPC_TIMEOUT, grpc::encode_timeout(left));
                }
                if let Some(header) = header {
                    lower_propagated(&mut parts.headers, header, left);
                }
            }
        }
        let body = match &self.replay {
            Some(shared) => ReplayBody::replay(shared),
            None => ReplayBody::empty(),
        };
        self.attempts += 1;
        Request::from_parts(parts, body)
    }
}

/// What an attempt ended with, for tracing (no allocation).
#[derive(Clone, Copy)]
enum What {
    Status(http::StatusCode),
    Fault(Fault),
}

impl fmt::Display for What {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            What::Status(s) => write!(f, "status {}", s.as_u16()),
            What::Fault(fault) => f.write_str(fault.name()),
        }
    }
}

impl<S, P, B> fmt::Debug for ResponseFuture<S, P, B>
where
    S: Service<Request<ReplayBody<B>>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, attempts) = match &self.kind {
            Kind::Once { .. } => ("once", 1),
            Kind::Retrying { ctx, .. } => ("retrying", ctx.tries.attempts),
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .field("attempts", &attempts)
            .finish()
    }
}
