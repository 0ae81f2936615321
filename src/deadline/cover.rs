//! How a deadline learns that a timer below it will wake the task in time.
//!
//! A [`Deadline`](super::Deadline) needs *something* to wake its task when the deadline
//! passes. An [`AttemptTimeout`](crate::timeout::AttemptTimeout) below it already arms a
//! timer at `min(per-attempt, remaining)`, which is never later than the deadline; a second
//! timer would only add cost. So, for the duration of one `poll` of its inner future, the
//! deadline *asks* (a thread-local slot holds the instant it must be woken by), and any timer
//! polled below it, on this thread, in this poll, that is armed no later than that instant
//! *answers*. If nothing answered, the deadline arms its own timer (lazily, once).
//!
//! The answer is given again on every poll, so it is never stale: while a retry sleeps
//! between attempts (no attempt timeout is polled), the deadline arms its own timer.
//!
//! The same thread-local trick saves a clock read: while a `Deadline` calls its inner
//! service, it [shares](Shared) the instant it read, and layers called synchronously below
//! it (a `Retry`'s budget, an `AttemptTimeout`, a nested `Deadline`) use that instead of
//! reading the clock again. An attempt started later (a retry's, from a poll) reads the clock
//! itself.
//!
//! Inside [`Upstream`](crate::Upstream), where every layer between the deadline and the
//! attempt is the crate's own and calls the next synchronously, the deadline itself travels
//! the same way instead of as a [`RequestDeadline`](super::RequestDeadline) extension (whose
//! insertion and copy by the retry cost four allocations per request): the `Deadline` shares
//! it for the duration of its `call`, the `Retry` keeps it and shares it again around each
//! later attempt's `call`, and the `AttemptTimeout` reads it. So does whether the request is
//! gRPC, which `Upstream` reads once for its fault answers, its deadline and the first
//! attempt's timeout (a later attempt's timeout reads it again).

use std::cell::Cell;

use tokio::time::Instant;

use super::Due;

#[derive(Clone, Copy)]
enum Slot {
    /// Nobody is asking.
    Idle,
    /// A deadline must be woken by this instant.
    Wanted(Instant),
    /// A timer armed no later than the wanted instant was polled.
    Covered,
}

/// What a layer above shares with the layers it calls synchronously.
#[derive(Clone, Copy)]
struct Call {
    /// A clock reading taken by the caller just before.
    now: Option<Instant>,
    /// The request's deadline, when it travels without an extension (maybe not yet worked
    /// out: see [`Due::After`]).
    deadline: Due,
    /// Whether the request is gRPC ([`grpc::is_grpc`](crate::grpc::is_grpc)), when the
    /// caller knows that no layer in between changes its `content-type` (inside
    /// `Upstream`). Read once, by [`take_grpc`].
    grpc: Option<bool>,
}

thread_local! {
    static SLOT: Cell<Slot> = const { Cell::new(Slot::Idle) };
    static CALL: Cell<Call> = const {
        Cell::new(Call {
            now: None,
            deadline: Due::Never,
            grpc: None,
        })
    };
}

/// Shares a clock reading (and maybe the request's deadline) with the layers called below,
/// for the duration of one `call`; restores what was shared before when dropped.
pub(crate) struct Shared {
    prev: Call,
}

impl Shared {
    /// Shares `now` and `deadline` until dropped.
    #[cfg(test)]
    pub(crate) fn share(now: Option<Instant>, deadline: Option<Instant>) -> Shared {
        Shared::share_grpc(now, deadline, None)
    }

    /// Shares `now`, `deadline` and whether the request is gRPC until dropped. Only a caller
    /// whose every layer down to the attempt is the crate's own may share `grpc`.
    #[inline]
    pub(crate) fn share_grpc(
        now: Option<Instant>,
        deadline: Option<Instant>,
        grpc: Option<bool>,
    ) -> Shared {
        Shared::share_due(now, Due::from(deadline), grpc)
    }

    /// [`share_grpc`](Self::share_grpc) with a deadline maybe not yet worked out: a layer
    /// below that asks for it works it out from the shared `now` or the clock.
    #[inline]
    pub(crate) fn share_due(now: Option<Instant>, deadline: Due, grpc: Option<bool>) -> Shared {
        Shared {
            prev: CALL.with(|c| {
                c.replace(Call {
                    now,
                    deadline,
                    grpc,
                })
            }),
        }
    }
}

impl Drop for Shared {
    #[inline]
    fn drop(&mut self) {
        CALL.with(|c| c.set(self.prev));
    }
}

/// The current instant: the one a layer above shared, if it is calling us right now, or a
/// fresh clock reading.
#[inline]
pub(crate) fn now() -> Instant {
    CALL.with(Cell::get).now.unwrap_or_else(Instant::now)
}

/// [`deadline`], not worked out yet if it was not (no clock read).
#[inline]
pub(crate) fn due() -> Due {
    CALL.with(Cell::get).deadline
}

/// The deadline a layer above shared without an extension, if it is calling us right now.
#[inline]
pub(crate) fn deadline() -> Option<Instant> {
    let mut call = CALL.with(Cell::get);
    call.deadline
        .resolve(|| call.now.unwrap_or_else(Instant::now))
}

/// Whether the request being called is gRPC, if a layer above shared it; taken, so that a
/// service below calling another stack synchronously (another request) does not read it.
#[inline]
pub(crate) fn take_grpc() -> Option<bool> {
    CALL.with(|c| {
        let mut call = c.get();
        let grpc = call.grpc.take();
        if grpc.is_some() {
            c.set(call);
        }
        grpc
    })
}

/// One question, asked for the duration of one poll. Restores the previous slot when done
/// (or dropped by a panic), so nested deadlines each get their own answer.
pub(crate) struct Ask {
    prev: Option<Slot>,
}

impl Ask {
    /// Starts asking for a wake-up no later than `at`.
    pub(crate) fn start(at: Instant) -> Ask {
        let prev = SLOT.with(|s| s.replace(Slot::Wanted(at)));
        Ask { prev: Some(prev) }
    }

    /// Stops asking; whether a timer below answered.
    pub(crate) fn finish(mut self) -> bool {
        let prev = self.prev.take().unwrap_or(Slot::Idle);
        matches!(SLOT.with(|s| s.replace(prev)), Slot::Covered)
    }
}

impl Drop for Ask {
    fn drop(&mut self) {
        if let Some(prev) = self.prev.take() {
            SLOT.with(|s| s.set(prev));
        }
    }
}

/// Tells a deadline above (if one is asking) that this task will be woken by `at`: call it
/// only after polling a timer armed at `at` that returned `Pending`.
pub(crate) fn answer(at: Instant) {
    SLOT.with(|s| {
        if let Slot::Wanted(wanted) = s.get() {
            if at <= wanted {
                s.set(Slot::Covered);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn shared_now_is_scoped() {
        let t = Instant::now() - Duration::from_secs(10);
        {
            let _outer = Shared::share(Some(t), Some(t + Duration::from_secs(3)));
            assert_eq!(now(), t);
            assert_eq!(deadline(), Some(t + Duration::from_secs(3)));
            {
                let _inner = Shared::share(Some(t + Duration::from_secs(1)), None);
                assert_eq!(now(), t + Duration::from_secs(1));
                assert_eq!(deadline(), None);
            }
            assert_eq!(now(), t);
            assert_eq!(deadline(), Some(t + Duration::from_secs(3)));
        }
        assert!(now() > t + Duration::from_secs(5));
        assert_eq!(deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_not_yet_worked_out_is_worked_out_when_asked() {
        let t = Instant::now();
        let _shared = Shared::share_due(None, Due::After(Duration::from_secs(3)), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(deadline(), Some(t + Duration::from_secs(4)));
        let _shared = Shared::share_due(Some(t), Due::After(Duration::from_secs(3)), None);
        assert_eq!(
            deadline(),
            Some(t + Duration::from_secs(3)),
            "from the shared now"
        );
    }

    #[test]
    fn grpc_is_taken_once_and_scoped() {
        assert_eq!(take_grpc(), None);
        {
            let _outer = Shared::share_grpc(None, None, Some(true));
            {
                let _inner = Shared::share(None, None);
                assert_eq!(take_grpc(), None);
            }
            assert_eq!(take_grpc(), Some(true));
            // Taken: a second reader (a request made below) computes its own.
            assert_eq!(take_grpc(), None);
        }
        {
            let _outer = Shared::share_grpc(None, None, Some(false));
            assert_eq!(take_grpc(), Some(false));
        }
        assert_eq!(take_grpc(), None);
    }

    #[test]
    fn answers_only_when_in_time_and_asked() {
        let now = Instant::now();
        let at = now + Duration::from_secs(1);
        answer(now); // nobody asks: no effect
        let ask = Ask::start(at);
        answer(at + Duration::from_nanos(1)); // too late
        assert!(!ask.finish());
        let ask = Ask::start(at);
        answer(at);
        assert!(ask.finish());

        // Nested: the inner question is answered by a timer in time for it, which in turn
        // answers the outer one.
        let outer = Ask::start(at);
        let inner = Ask::start(now + Duration::from_millis(10));
        answer(now + Duration::from_millis(5));
        assert!(inner.finish());
        assert!(!outer.finish());
    }
}
