//! The response future of [`Upstream`](super::Upstream): the whole stack as one state
//! machine.
//!
//! Nesting one future per layer (deadline over retry over breaker over attempt timeout)
//! costs a copy of every future below each time a level is built, and a timer per timed
//! level. Here the retry, the breaker and the attempt timeout keep their state side by
//! side, around the inner service's own future, and share one timer: the attempt's end
//! (its timeout, or the deadline when that comes first), the backoff, or the deadline while
//! the next attempt waits for the service to be ready. Each part's logic is the standalone
//! layer's own ([`Tries`], [`Permit`], [`Timing`]).

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::BoxError;
use tower_service::Service;

use super::{limit, Parts, Stack};
use crate::breaker::Permit;
use crate::deadline::{cover, saturating_add, DeadlineExceeded, Due, RequestDeadline};
use crate::fault::Fault;
use crate::head::HeadCopy;
use crate::map_faults::{self, FaultBody};
use crate::retry::{mark, Attempts, Policy, ReplayBody, Tries};
use crate::stripe::{Handle, Stripe};
use crate::timeout::error::Elapsed;
use crate::timeout::Timing;
use crate::timer::Timer;

pin_project! {
    /// Response future of [`Upstream`](super::Upstream): never fails.
    pub struct ResponseFuture<S, P, B, ResB>
    where
        S: Service<Request<ReplayBody<B>>, Response = Response<ResB>>,
    {
        #[pin]
        phase: Phase<S::Future>,
        // The one timer, set when first needed and moved for each later need.
        timer: Timer,
        run: Run<S, P, B>,
        // Boxed, and only when DEBUG is on: the future stays small to move.
        span: Option<Box<tracing::Span>>,
    }
}

pin_project! {
    #[project = PhaseProj]
    enum Phase<F> {
        // An attempt in flight.
        Attempt { #[pin] fut: F },
        // An attempt that failed before the service was called (circuit open, no time left).
        Failed { error: Option<BoxError> },
        // Waiting out a backoff.
        Backoff { until: Instant },
        // Waiting for the service's clone to be ready for the next attempt.
        Ready,
        // Answered without an attempt: a `poll_ready` error, a spent deadline, shed.
        Answer { error: Option<BoxError> },
    }
}

/// The request's state besides the phase.
struct Run<S, P, B> {
    /// The fault answers' settings, with the request's gRPC flag folded in.
    map_faults: map_faults::Config,
    /// Worked out when it first matters (the attempt waits, a retry is weighed), when the
    /// stack's own deadline need not be read from the clock at the start.
    deadline: Due,
    /// When the attempt in flight must end.
    timing: Timing,
    /// The breaker's hold on the attempt in flight.
    permit: Option<Permit>,
    /// This thread's stripe's reference to the service's stack (the layer's parts and the
    /// copy of the service), kept when the request holds a place under the limit or may be
    /// retried (one reference for both).
    stack: Option<Arc<Stripe<Stack<S, P>>>>,
    /// Whether the request holds a place under the limit (given back with the answer).
    limited: bool,
    /// Whether the deadline is the caller's (a header of the request made it earlier than
    /// the stack's own): an attempt it cuts short is not counted by the breaker, so that
    /// callers with short deadlines cannot open the circuit of a healthy upstream.
    caller_deadline: bool,
    /// What later attempts need (with `stack`); `None` for a request sent once.
    later: Option<Later<S, B>>,
}

impl<S, P, B> Run<S, P, B> {
    /// Gives back the place under the limit, if the request holds one.
    #[inline]
    fn release_limit(&mut self) {
        if std::mem::take(&mut self.limited) {
            if let Some(stack) = &self.stack {
                limit::release(stack);
            }
        }
    }
}

impl<S, P, B> Drop for Run<S, P, B> {
    fn drop(&mut self) {
        self.release_limit();
    }
}

/// What a request that may be retried keeps for its later attempts.
struct Later<S, B> {
    /// A clone of the service, polled ready before each later attempt: made from the
    /// stack's when the second attempt comes (see [`Prototype`](crate::retry::Prototype)).
    service: Option<S>,
    tries: Tries<B>,
}

impl<S, P, B, ResB> ResponseFuture<S, P, B, ResB>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>>,
{
    /// A future answering `error` without any attempt.
    pub(super) fn answer(
        error: BoxError,
        map_faults: map_faults::Config,
        span: Option<Box<tracing::Span>>,
    ) -> Self {
        ResponseFuture {
            phase: Phase::Answer { error: Some(error) },
            timer: Timer::new(),
            span,
            run: Run {
                map_faults,
                deadline: Due::Never,
                timing: Timing::Untimed,
                permit: None,
                stack: None,
                limited: false,
                caller_deadline: false,
                later: None,
            },
        }
    }

    /// Starts a request that the parts above the retry let through: records it for later
    /// attempts when the retry may need it, then makes the first attempt. `now` is the
    /// deadline's clock reading, if it read one; a deadline not yet worked out
    /// ([`Due::After`]) is only for a request that is not gRPC.
    #[inline]
    pub(super) fn start(
        service: &mut S,
        stack: &Handle<Stack<S, P>>,
        req: Request<B>,
        (now, deadline, caller_deadline): (Option<Instant>, Due, bool),
        limit: Option<limit::Permit<S, P>>,
        map_faults: map_faults::Config,
        span: Option<Box<tracing::Span>>,
    ) -> Self
    where
        P: Policy,
        B: Body,
    {
        let parts = stack.get();
        let cfg = parts.retry.get();
        let grpc = map_faults.is_grpc();
        let limited = limit.is_some();
        // The permit is turned into the future's reference only once the first attempt is
        // made: if the service's `call` panics, dropping it gives the place back.
        // Built straight into the future, without intermediate tuples: the head's copy is
        // the largest thing a request carries, and every move of it is a memcpy. (So each
        // branch builds the future itself; one build after an `if` returning the parts as a
        // tuple measured 65 instructions more per request.)
        if !Tries::may_retry(cfg, &req) {
            let req = req.map(ReplayBody::passthrough);
            let (mut permit, mut timing) = (None, Timing::Untimed);
            let phase = attempt(
                service,
                req,
                parts,
                grpc,
                deadline,
                now,
                &mut permit,
                &mut timing,
            );
            return ResponseFuture {
                phase,
                timer: Timer::new(),
                span,
                run: Run {
                    map_faults,
                    deadline,
                    timing,
                    permit,
                    stack: limit.and_then(limit::Permit::into_stack),
                    limited,
                    caller_deadline,
                    later: None,
                },
            };
        }
        let stripe = Tries::<B>::deposit(cfg, || now.unwrap_or_else(Instant::now));
        let (head, body) = req.into_parts();
        let (first, replay) = Tries::record(cfg, body);
        let copy = HeadCopy::of(&head);
        let req = Request::from_parts(head, first);
        let (mut permit, mut timing) = (None, Timing::Untimed);
        let phase = attempt(
            service,
            req,
            parts,
            grpc,
            deadline,
            now,
            &mut permit,
            &mut timing,
        );
        ResponseFuture {
            phase,
            timer: Timer::new(),
            span,
            run: Run {
                map_faults,
                deadline,
                timing,
                permit,
                stack: Some(
                    limit
                        .and_then(limit::Permit::into_stack)
                        .unwrap_or_else(|| stack.stripe(stripe)),
                ),
                limited,
                caller_deadline,
                later: Some(Later {
                    service: None,
                    tries: Tries::new(copy, replay),
                }),
            },
        }
    }
}

/// Starts one attempt on `service`, which was polled ready: the breaker admits it, the
/// attempt timeout times it (and tells a gRPC upstream), the service is called. Returns the
/// phase; the breaker's permit and when the attempt must end go to `permit` and `timing`
/// (written in place rather than returned with the phase: a move less of each).
#[inline]
#[allow(clippy::too_many_arguments)]
fn attempt<S, P, B>(
    service: &mut S,
    mut req: Request<ReplayBody<B>>,
    stack: &Parts<P>,
    grpc: bool,
    deadline: Due,
    now: Option<Instant>,
    permit: &mut Option<Permit>,
    timing: &mut Timing,
) -> Phase<S::Future>
where
    S: Service<Request<ReplayBody<B>>>,
{
    *permit = match &stack.breaker {
        None => None,
        Some(breaker) => match breaker.admit(&req) {
            Ok(permit) => permit,
            Err(open) => {
                *timing = Timing::Untimed;
                let error = Some(open.into());
                return Phase::Failed { error };
            }
        },
    };
    // A deadline not yet worked out is not one yet for the timing: the future folds it in
    // when the attempt first waits (`Timing::fold_deadline`). Only a request that is not gRPC
    // has one, and nothing is propagated for it.
    debug_assert!(!(grpc && matches!(deadline, Due::After(_))));
    let known = deadline.known();
    *timing = match &stack.attempt {
        Some(config) => {
            let ext = RequestDeadline::of(&req);
            config.start(&mut req, Some(grpc), (ext, known), || {
                now.unwrap_or_else(Instant::now)
            })
        }
        None => known.map_or(Timing::Untimed, |at| Timing::At {
            at,
            by_deadline: true,
        }),
    };
    if let Timing::Spent = timing {
        // Nothing is sent: the breaker leaves `before_start` out (a probe slot is given back).
        *timing = Timing::Untimed;
        let error = Some(DeadlineExceeded::before_start().into());
        return Phase::Failed { error };
    }
    let fut = {
        // A layer of the crate's inside the service reads the clock reading and the private
        // deadline while called, as it would below a `Deadline`.
        let _shared = (!deadline.is_never()).then(|| cover::Shared::share_due(now, deadline, None));
        service.call(req)
    };
    Phase::Attempt { fut }
}

/// Polls the one timer, set to fire at `at` (moved there if it was set for another time).
/// While it is pending, tells a deadline above that the task will be woken by `at`.
fn poll_timer(timer: &mut Timer, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
    let poll = timer.poll_at(at, cx);
    if poll.is_pending() {
        cover::answer(at);
    }
    poll
}

impl<S, P, B> Run<S, P, B> {
    /// After an attempt: the breaker counts it, the retry decides. `Break` with the final
    /// result, or `Continue` with the phase that leads to the next attempt.
    #[inline(always)]
    fn attempted<ResB, F>(
        &mut self,
        mut res: Result<Response<ResB>, BoxError>,
    ) -> ControlFlow<Result<Response<ResB>, BoxError>, Phase<F>>
    where
        P: Policy,
    {
        if let Some(permit) = self.permit.take() {
            permit.complete_with(&res, self.map_faults.is_grpc());
        }
        let (Some(later), Some(stack)) = (&mut self.later, &self.stack) else {
            return ControlFlow::Break(res);
        };
        let Some(delay) = later
            .tries
            .decide(stack.retry.get(), &res, &mut self.deadline)
        else {
            mark(&mut res, later.tries.attempts());
            return ControlFlow::Break(res);
        };
        drop(res);
        ControlFlow::Continue(if delay.is_zero() {
            Phase::Ready
        } else {
            Phase::Backoff {
                until: saturating_add(Instant::now(), delay),
            }
        })
    }
}

impl<S, P, B, ResB> Future for ResponseFuture<S, P, B, ResB>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    P: Policy,
{
    type Output = Result<Response<FaultBody<ResB>>, Infallible>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let run = this.run;
        let span = this.span.as_deref();
        let _entered = span.map(tracing::Span::enter);
        let result = loop {
            let next = match this.phase.as_mut().project() {
                PhaseProj::Attempt { fut } => {
                    let res = match fut.poll(cx) {
                        Poll::Ready(res) => res.map_err(Into::into),
                        Poll::Pending => {
                            if let Due::After(_) = run.deadline {
                                // The first wait: the deadline starts to matter.
                                let now = Instant::now();
                                if let Some(at) = run.deadline.resolve(|| now) {
                                    run.timing.fold_deadline(now, at);
                                }
                            }
                            let Some((at, by_deadline)) = run.timing.resolve() else {
                                return Poll::Pending;
                            };
                            if poll_timer(this.timer, at, cx).is_pending() {
                                return Poll::Pending;
                            }
                            // The breaker does not count a deadline the caller set: it says
                            // nothing about the upstream.
                            Err(if by_deadline {
                                DeadlineExceeded::in_flight()
                                    .from_caller(run.caller_deadline)
                                    .into()
                            } else {
                                Elapsed::new().into()
                            })
                        }
                    };
                    run.attempted(res)
                }
                PhaseProj::Failed { error } => {
                    let error = error
                        .take()
                        .expect("ResponseFuture polled after completion");
                    run.attempted(Err(error))
                }
                PhaseProj::Backoff { until } => {
                    let until = *until;
                    if poll_timer(this.timer, until, cx).is_pending() {
                        return Poll::Pending;
                    }
                    ControlFlow::Continue(Phase::Ready)
                }
                PhaseProj::Ready => {
                    let (Some(later), Some(stack)) = (&mut run.later, &run.stack) else {
                        unreachable!("only a request that may be retried waits for readiness")
                    };
                    let service = later.service.get_or_insert_with(|| stack.service.get());
                    match service.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {
                            let req = later
                                .tries
                                .next_request(run.deadline.known(), stack.deadline_header.as_ref());
                            let grpc = run.map_faults.is_grpc();
                            ControlFlow::Continue(attempt(
                                service,
                                req,
                                stack,
                                grpc,
                                run.deadline,
                                None,
                                &mut run.permit,
                                &mut run.timing,
                            ))
                        }
                        Poll::Ready(Err(e)) => ControlFlow::Break(Err(e.into())),
                        Poll::Pending => {
                            let Some(at) = run.deadline.get() else {
                                return Poll::Pending;
                            };
                            if poll_timer(this.timer, at, cx).is_pending() {
                                return Poll::Pending;
                            }
                            let exceeded =
                                DeadlineExceeded::in_flight().from_caller(run.caller_deadline);
                            ControlFlow::Break(Err(exceeded.into()))
                        }
                    }
                }
                PhaseProj::Answer { error } => ControlFlow::Break(Err(error
                    .take()
                    .expect("ResponseFuture polled after completion"))),
            };
            match next {
                ControlFlow::Break(result) => break result,
                ControlFlow::Continue(phase) => this.phase.set(phase),
            }
        };
        run.release_limit();
        let res = map_faults::answer(&run.map_faults, result);
        if let Some(span) = span {
            record(span, &res);
        }
        Poll::Ready(Ok(res))
    }
}

/// Records the answer on the request's span: the status, and the fault the stack answered
/// for or, when the upstream answered, the attempts it took (a fault answer does not carry
/// the count).
fn record<B>(span: &tracing::Span, res: &Response<B>) {
    span.record("status", res.status().as_u16());
    // The stack's own answer carries its `Fault`; an upstream's answer may carry a
    // `Proxy-Status` of its own (an upstream that is itself a proxy), which is not ours.
    match res.extensions().get::<Fault>() {
        Some(fault) => {
            span.record("fault", fault.name());
        }
        None => {
            span.record("attempts", Attempts::of(res));
        }
    }
}

impl<S, P, B, ResB> fmt::Debug for ResponseFuture<S, P, B, ResB>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phase = match &self.phase {
            Phase::Attempt { .. } => "attempt",
            Phase::Failed { .. } => "failed",
            Phase::Backoff { .. } => "backoff",
            Phase::Ready => "ready",
            Phase::Answer { .. } => "answer",
        };
        let attempts = self.run.later.as_ref().map_or(1, |l| l.tries.attempts());
        f.debug_struct("ResponseFuture")
            .field("phase", &phase)
            .field("attempts", &attempts)
            .field("deadline", &self.run.deadline)
            .finish_non_exhaustive()
    }
}
