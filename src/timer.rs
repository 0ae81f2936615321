//! The requests' timers: one tokio `Sleep` per thread's shard, for every request in flight
//! on it.
//!
//! A tokio `Sleep` per request costs, on a multi-threaded runtime, more than its
//! instructions: making one clones the runtime's handle twice (a count every core writes),
//! and registering it and dropping it each lock the runtime's one timer wheel, which every
//! core takes. In a gateway nearly every request is answered long before its timeout, so
//! all of that is paid for a timer that never fires.
//!
//! Here a request's timer is a slot in its thread's shard: its deadline and its task's
//! waker, under the shard's lock, which only that thread takes but for the rare firing.
//! The shard keeps one `Sleep`, armed for its earliest deadline. When the `Sleep` fires,
//! the requests whose deadline has come are woken; the earliest request still waiting is
//! woken as well, to arm the `Sleep` again from its own task (see [`State::expire`]).
//!
//! The shard's `Sleep` belongs to the runtime that made it, and runs on its clock (paused
//! or not: `tokio::time::pause` drives these timers as it drives any). A shard serves one
//! runtime at a time: it is taken over by another once it has no request in flight; a
//! request whose runtime is not its thread's shard's gets a `Sleep` of its own, as before.
//! (Runtimes are told apart by their `Id`, which tokio takes from a 64-bit counter.)
//!
//! A request is ready when its slot was fired and the runtime's clock has reached its
//! deadline: a `Sleep` that fires because its runtime shuts down does not time a request
//! out early.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use tokio::runtime::{Handle, Id};
use tokio::task::coop::unconstrained;
use tokio::time::{sleep_until, Instant, Sleep};

use crate::retry::{stripe_index, STRIPES};

/// Above this many slots, a shard with no request in flight gives its slots' memory back.
const KEEP_SLOTS: usize = 1024;

/// One shard per stripe, alone on its cache line(s).
static SHARDS: [Shard; STRIPES] = [const { Shard::new() }; STRIPES];

thread_local! {
    /// The shard whose `Sleep` this thread is arming, while it does (its lock held).
    static ARMING: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// A request's timer. Made idle; [`poll_at`](Timer::poll_at) registers it.
pub(crate) struct Timer {
    state: TimerState,
}

enum TimerState {
    Idle,
    /// A slot in a shard.
    Shared {
        shard: usize,
        key: u32,
        gen: u32,
        at: Instant,
    },
    /// A `Sleep` of its own: the thread's shard serves another runtime.
    Own(Pin<Box<Sleep>>),
}

impl Timer {
    /// An idle timer.
    pub(crate) const fn new() -> Timer {
        Timer {
            state: TimerState::Idle,
        }
    }

    /// Ready once `at` has come (by the clock of the runtime the timer was set on); until
    /// then, `cx`'s task is woken when it comes. A timer set for another instant before is
    /// moved to `at`.
    pub(crate) fn poll_at(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut self.state {
                TimerState::Idle => return self.register(at, cx),
                TimerState::Shared {
                    shard,
                    key,
                    gen,
                    at: set,
                } if *set == at => {
                    return match SHARDS[*shard].poll(*shard, *key, *gen, at, cx) {
                        Slot::Waiting => Poll::Pending,
                        Slot::Done => {
                            // `poll` freed the slot.
                            self.state = TimerState::Idle;
                            Poll::Ready(())
                        }
                        Slot::Moved => {
                            self.state = TimerState::Own(Box::pin(sleep_until(at)));
                            continue;
                        }
                    };
                }
                TimerState::Shared { .. } => self.cancel(),
                TimerState::Own(sleep) => {
                    if sleep.deadline() != at {
                        sleep.as_mut().reset(at);
                    }
                    return sleep.as_mut().poll(cx);
                }
            }
        }
    }

    /// Sets an idle timer for `at`.
    fn register(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        // Outside a runtime this panics as tokio's own timers do.
        let Ok(runtime) = Handle::try_current().map(|handle| handle.id()) else {
            self.state = TimerState::Own(Box::pin(sleep_until(at)));
            return self.poll_at(at, cx);
        };
        let index = stripe_index() % STRIPES;
        let shard = &SHARDS[index];
        let mut state = shard.lock();
        if state.runtime != Some(runtime) {
            if state.live != 0 {
                drop(state);
                self.state = TimerState::Own(Box::pin(sleep_until(at)));
                return self.poll_at(at, cx);
            }
            state.serve(runtime);
        }
        let (key, gen) = state.insert(at, cx.waker().clone());
        if state.armed.is_none_or(|armed| at < armed) {
            shard.arm(&mut state, at, index);
        }
        let done = state.slots[key as usize].fired;
        if done {
            state.remove(key, gen);
        }
        shard.unlock(state);
        if done {
            return Poll::Ready(());
        }
        self.state = TimerState::Shared {
            shard: index,
            key,
            gen,
            at,
        };
        Poll::Pending
    }

    /// Back to idle: the slot, if any, is freed.
    fn cancel(&mut self) {
        if let TimerState::Shared {
            shard, key, gen, ..
        } = std::mem::replace(&mut self.state, TimerState::Idle)
        {
            SHARDS[shard].cancel(key, gen);
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl fmt::Debug for Timer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            TimerState::Idle => "idle",
            TimerState::Shared { .. } => "shared",
            TimerState::Own(_) => "own",
        };
        f.debug_struct("Timer").field("state", &state).finish()
    }
}

/// What [`Shard::poll`] found of a slot.
enum Slot {
    Waiting,
    /// Fired, the deadline has come; the slot is freed.
    Done,
    /// The shard cannot be armed from this runtime; the slot is freed.
    Moved,
}

#[repr(align(128))]
struct Shard {
    /// Set when the `Sleep` may have fired while this thread held the lock to arm it.
    fired: AtomicBool,
    state: Mutex<State>,
}

/// A shard's timers.
struct State {
    /// The runtime whose clock and timer wheel the shard uses.
    runtime: Option<Id>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The deadline the `Sleep` is armed for, until it fires.
    armed: Option<Instant>,
    /// What the `Sleep` wakes: this shard.
    waker: Option<Waker>,
    slots: Vec<Entry>,
    /// Free slots.
    free: Vec<u32>,
    /// The slots' deadlines, earliest first; a freed slot's stays until it comes to the
    /// top, or until the heap is rebuilt (when it holds more than twice the live slots).
    heap: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    /// Slots in use.
    live: usize,
    /// Tasks to wake once the lock is released.
    wake: Vec<Waker>,
}

struct Entry {
    /// Bumped when the slot is freed: a stale heap item no longer matches.
    gen: u32,
    used: bool,
    /// The `Sleep` fired for this slot's deadline.
    fired: bool,
    waker: Option<Waker>,
}

/// What a shard's `Sleep` wakes.
struct ShardWake(usize);

impl Wake for ShardWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        SHARDS[self.0].on_fire(self.0);
    }
}

impl Shard {
    const fn new() -> Shard {
        Shard {
            fired: AtomicBool::new(false),
            state: Mutex::new(State {
                runtime: None,
                sleep: None,
                armed: None,
                waker: None,
                slots: Vec::new(),
                free: Vec::new(),
                heap: BinaryHeap::new(),
                live: 0,
                wake: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while the lock is held but allocation failure; the state stays
        // consistent between the statements that change it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Releases the lock, and then wakes the tasks that the `Sleep`'s firing, or a freed
    /// slot, left to wake.
    fn unlock(&self, mut state: MutexGuard<'_, State>) {
        self.settle(&mut state);
        let wake = std::mem::take(&mut state.wake);
        drop(state);
        wake.into_iter().for_each(Waker::wake);
    }

    /// Handles a firing of the `Sleep` seen while the lock was held.
    fn settle(&self, state: &mut State) {
        if self.fired.swap(false, Ordering::Relaxed) {
            state.expire();
        }
    }

    /// Arms the `Sleep` for `at` (made if need be), from the task of a request of the
    /// shard's runtime.
    fn arm(&self, state: &mut State, at: Instant, index: usize) {
        let State { sleep, waker, .. } = state;
        let waker = waker.get_or_insert_with(|| Waker::from(Arc::new(ShardWake(index))));
        // Moving the `Sleep` to a time that has come, or polling it, may wake it at once.
        ARMING.with(|arming| arming.set(index));
        let sleep = match sleep {
            Some(sleep) => {
                sleep.as_mut().reset(at);
                sleep
            }
            None => sleep.insert(Box::pin(sleep_until(at))),
        };
        // Unconstrained: out of budget, tokio's `Sleep` would wake the waker at once and
        // leave itself unregistered.
        let poll = {
            let mut cx = Context::from_waker(waker);
            let mut fut = unconstrained(poll_fn(|cx| sleep.as_mut().poll(cx)));
            Pin::new(&mut fut).poll(&mut cx)
        };
        ARMING.with(|arming| arming.set(usize::MAX));
        state.armed = Some(at);
        if poll.is_ready() {
            self.fired.store(true, Ordering::Relaxed);
        }
        self.settle(state);
    }

    /// The `Sleep` woke the shard.
    fn on_fire(&self, index: usize) {
        if ARMING.try_with(Cell::get) == Ok(index) {
            // This thread holds the lock, arming: it looks at the flag before releasing it.
            self.fired.store(true, Ordering::Relaxed);
            return;
        }
        let state = self.lock();
        self.fired.store(true, Ordering::Relaxed);
        self.unlock(state);
    }

    /// Polls slot `key` (handed out as `gen`) for deadline `at`.
    fn poll(&self, index: usize, key: u32, gen: u32, at: Instant, cx: &mut Context<'_>) -> Slot {
        let mut state = self.lock();
        let entry = &mut state.slots[key as usize];
        debug_assert!(entry.used && entry.gen == gen);
        if entry.fired {
            if Instant::now() >= at {
                state.remove(key, gen);
                self.unlock(state);
                return Slot::Done;
            }
            // Fired early: its runtime shut down, and the request lives on in another.
            entry.fired = false;
        }
        match &entry.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => entry.waker = Some(cx.waker().clone()),
        }
        let first = state.first().unwrap_or(at);
        if state.armed.is_none_or(|armed| first < armed) {
            let serves = Handle::try_current().is_ok_and(|h| Some(h.id()) == state.runtime);
            if !serves {
                state.remove(key, gen);
                self.unlock(state);
                return Slot::Moved;
            }
            self.arm(&mut state, first, index);
        }
        let done = state.slots[key as usize].fired;
        if done {
            state.remove(key, gen);
        }
        self.unlock(state);
        if done {
            Slot::Done
        } else {
            Slot::Waiting
        }
    }

    /// Frees slot `key`.
    fn cancel(&self, key: u32, gen: u32) {
        let mut state = self.lock();
        state.remove(key, gen);
        self.unlock(state);
    }
}

impl State {
    /// Starts serving `runtime` (the shard has no request in flight).
    fn serve(&mut self, runtime: Id) {
        self.runtime = Some(runtime);
        self.sleep = None;
        self.armed = None;
        self.heap.clear();
    }

    /// Takes a slot for `at`, woken through `waker`.
    fn insert(&mut self, at: Instant, waker: Waker) -> (u32, u32) {
        let key = match self.free.pop() {
            Some(key) => key,
            None => {
                self.slots.push(Entry {
                    gen: 0,
                    used: false,
                    fired: false,
                    waker: None,
                });
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 timers per shard")
            }
        };
        let entry = &mut self.slots[key as usize];
        entry.used = true;
        entry.fired = false;
        entry.waker = Some(waker);
        let gen = entry.gen;
        self.heap.push(Reverse((at, key, gen)));
        self.live += 1;
        (key, gen)
    }

    /// Frees slot `key` if it is still the one handed out as `gen`.
    fn remove(&mut self, key: u32, gen: u32) {
        let Some(entry) = self.slots.get_mut(key as usize) else {
            return;
        };
        if !entry.used || entry.gen != gen {
            return;
        }
        entry.used = false;
        entry.gen = entry.gen.wrapping_add(1);
        let waker = entry.waker.take();
        self.free.push(key);
        self.live -= 1;
        if self.live == 0 {
            self.heap.clear();
            if self.slots.len() > KEEP_SLOTS {
                self.slots = Vec::new();
                self.free = Vec::new();
            }
        } else if self.heap.len() > 2 * self.live + 64 {
            let slots = &self.slots;
            self.heap
                .retain(|Reverse((_, key, gen))| is_live(slots, *key, *gen));
        }
        if self.armed.is_none() && self.live != 0 {
            // The `Sleep` waits for a task to arm it; this may have been that task: pass it
            // on to the earliest request still waiting.
            if let Some(first) = self.first_waker() {
                self.wake.push(first);
            }
        }
        drop(waker);
    }

    /// The earliest deadline of a live slot, dropping the stale items above it.
    fn first(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, key, gen))) = self.heap.peek().copied() {
            if is_live(&self.slots, key, gen) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    /// The waker of the earliest live slot.
    fn first_waker(&mut self) -> Option<Waker> {
        self.first()?;
        let Reverse((_, key, _)) = *self.heap.peek()?;
        self.slots[key as usize].waker.clone()
    }

    /// After the `Sleep` fired: fires the slots whose deadline it was armed for (or an
    /// earlier one), to be woken, and the earliest one left, to arm the `Sleep` again from
    /// its task. (The `Sleep` is not armed from here: this runs on whatever thread wakes
    /// it, which may be its runtime's, shutting down.)
    fn expire(&mut self) {
        let Some(armed) = self.armed else {
            return;
        };
        if !self.sleep.as_ref().is_some_and(|sleep| sleep.is_elapsed()) {
            return;
        }
        self.armed = None;
        while let Some(Reverse((at, key, gen))) = self.heap.peek().copied() {
            if at > armed {
                break;
            }
            self.heap.pop();
            if is_live(&self.slots, key, gen) {
                let entry = &mut self.slots[key as usize];
                entry.fired = true;
                if let Some(waker) = entry.waker.clone() {
                    self.wake.push(waker);
                }
            }
        }
        if let Some(first) = self.first_waker() {
            self.wake.push(first);
        }
    }
}

fn is_live(slots: &[Entry], key: u32, gen: u32) -> bool {
    slots
        .get(key as usize)
        .is_some_and(|entry| entry.used && entry.gen == gen)
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures_util::stream::{FuturesUnordered, StreamExt};
    use tokio::time::{advance, Instant};
    use tokio_test::{assert_pending, assert_ready, task};

    use super::Timer;

    /// A future ready when a fresh timer for `at` is.
    async fn wait(at: Instant) {
        let mut timer = Timer::new();
        poll_fn(|cx| timer.poll_at(at, cx)).await;
    }

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn fires_at_its_deadline_and_not_before() {
        let at = Instant::now() + 100 * MS;
        let mut t = task::spawn(wait(at));
        assert_pending!(t.poll());
        advance(99 * MS).await;
        assert!(!t.is_woken());
        assert_pending!(t.poll());
        advance(MS).await;
        assert!(t.is_woken());
        assert_ready!(t.poll());
    }

    #[tokio::test(start_paused = true)]
    async fn each_of_many_fires_at_its_own_deadline() {
        let start = Instant::now();
        // Deadlines out of order, some equal, some within one millisecond of another.
        let delays: Vec<Duration> = (0..60u64)
            .map(|i| Duration::from_micros((i * 7919) % 400_000 + 1000))
            .collect();
        // In spawned tasks, and all in one task (each polled with its own waker).
        let fired = Arc::new(Mutex::new(Vec::new()));
        let handles: Vec<_> = delays
            .iter()
            .map(|&d| {
                let fired = fired.clone();
                tokio::spawn(async move {
                    wait(start + d).await;
                    fired.lock().unwrap().push((d, start.elapsed()));
                })
            })
            .collect();
        let mut together: FuturesUnordered<_> = delays
            .iter()
            .map(|&d| async move {
                wait(start + d).await;
                (d, start.elapsed())
            })
            .collect();
        let mut seen = Vec::new();
        while let Some(pair) = together.next().await {
            seen.push(pair);
        }
        for handle in handles {
            handle.await.unwrap();
        }
        seen.extend(fired.lock().unwrap().iter().copied());
        assert_eq!(seen.len(), 2 * delays.len());
        for (delay, elapsed) in seen {
            assert!(elapsed >= delay, "woken at {elapsed:?}, before {delay:?}");
            assert!(
                elapsed < delay + 2 * MS,
                "woken at {elapsed:?}, set for {delay:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_timer_does_not_hold_back_the_others() {
        let start = Instant::now();
        let mut first = task::spawn(wait(start + 10 * MS));
        let mut second = task::spawn(wait(start + 20 * MS));
        let mut third = task::spawn(wait(start + 30 * MS));
        assert_pending!(first.poll());
        assert_pending!(second.poll());
        assert_pending!(third.poll());
        // The earliest goes before its deadline, the second right when it fires.
        drop(first);
        advance(20 * MS).await;
        assert!(second.is_woken());
        drop(second);
        advance(9 * MS).await;
        assert_pending!(third.poll());
        advance(MS).await;
        assert!(third.is_woken());
        assert_ready!(third.poll());
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_moves_to_an_earlier_or_a_later_deadline() {
        let start = Instant::now();
        let mut timer = Timer::new();
        let at = Arc::new(Mutex::new(start + 100 * MS));
        let target = at.clone();
        let mut t = task::spawn(poll_fn(move |cx| {
            let at = *target.lock().unwrap();
            timer.poll_at(at, cx)
        }));
        assert_pending!(t.poll());
        *at.lock().unwrap() = start + 50 * MS;
        assert_pending!(t.poll());
        advance(50 * MS).await;
        assert!(t.is_woken());
        *at.lock().unwrap() = start + 70 * MS;
        assert_pending!(t.poll());
        advance(20 * MS).await;
        assert!(t.is_woken());
        assert_ready!(t.poll());
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_already_come_is_ready_at_once() {
        let now = Instant::now();
        // With no timer armed, and with one armed for later (the shard's `Sleep` is then
        // moved back to a time that has come).
        assert_ready!(task::spawn(wait(now)).poll());
        let mut later = task::spawn(wait(now + 10 * MS));
        assert_pending!(later.poll());
        assert_ready!(task::spawn(wait(now)).poll());
        advance(MS).await;
        assert_ready!(task::spawn(wait(now)).poll());
        assert_pending!(later.poll());
        advance(9 * MS).await;
        assert_ready!(later.poll());
    }

    #[test]
    fn two_runtimes_on_one_thread_keep_their_own_clocks() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
        };
        let (a, b) = (runtime(), runtime());
        let mut on_a = {
            let _in = a.enter();
            let mut t = task::spawn(wait(Instant::now() + 100 * MS));
            assert_pending!(t.poll());
            t
        };
        let mut on_b = {
            let _in = b.enter();
            let mut t = task::spawn(wait(Instant::now() + 100 * MS));
            assert_pending!(t.poll());
            t
        };
        b.block_on(advance(100 * MS));
        assert!(on_b.is_woken());
        assert!(!on_a.is_woken());
        {
            let _in = b.enter();
            assert_ready!(on_b.poll());
        }
        a.block_on(advance(100 * MS));
        assert!(on_a.is_woken());
        let _in = a.enter();
        assert_ready!(on_a.poll());
    }

    #[test]
    fn a_runtime_that_ends_with_timers_set_leaves_the_thread_usable() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
        };
        for _ in 0..3 {
            let rt = runtime();
            // One timer still set when the runtime goes, one in a task it drops.
            let left = {
                let _in = rt.enter();
                let mut t = task::spawn(wait(Instant::now() + 10 * MS));
                assert_pending!(t.poll());
                t
            };
            rt.spawn(wait(Instant::now() + 20 * MS));
            rt.block_on(async {
                let start = Instant::now();
                wait(start + 5 * MS).await;
                assert_eq!(start.elapsed(), 5 * MS);
            });
            drop(rt);
            // Dropped after its runtime.
            drop(left);
        }
        // A timer set on a runtime that has ended, polled on another: it waits on the
        // clock of the runtime it is polled on.
        let rt = runtime();
        let mut moved = {
            let _in = rt.enter();
            let mut t = task::spawn(wait(Instant::now() + 10 * MS));
            assert_pending!(t.poll());
            t
        };
        drop(rt);
        let rt = runtime();
        {
            let _in = rt.enter();
            assert_pending!(moved.poll());
        }
        rt.block_on(advance(10 * MS));
        assert!(moved.is_woken());
        {
            let _in = rt.enter();
            assert_ready!(moved.poll());
        }
        // The thread's shard serves the next runtime.
        runtime().block_on(async {
            let start = Instant::now();
            wait(start + 7 * MS).await;
            assert_eq!(start.elapsed(), 7 * MS);
        });
    }

    #[test]
    fn timers_on_a_multi_threaded_runtime_fire_on_time_in_real_time() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let handles: Vec<_> = (0..2000u64)
                .map(|i| {
                    tokio::spawn(async move {
                        let start = Instant::now();
                        let at = start + Duration::from_micros((i * 7919) % 30_000 + 6_000);
                        if i % 3 == 0 {
                            // Cancelled before its deadline (tokio's `Sleep` may be late by
                            // its millisecond), often on another thread than the one it
                            // was set on.
                            let cut = at - Duration::from_millis(5);
                            tokio::select! {
                                () = wait(at) => assert!(Instant::now() >= at, "fired early"),
                                () = tokio::time::sleep_until(cut) => {}
                            }
                            return;
                        }
                        tokio::task::yield_now().await;
                        wait(at).await;
                        let now = Instant::now();
                        assert!(now >= at, "woken {:?} early", at - now);
                        // Generous: a busy 2-core machine may be late.
                        assert!(
                            now - at < Duration::from_secs(2),
                            "woken {:?} late",
                            now - at
                        );
                    })
                })
                .collect();
            for handle in handles {
                handle.await.unwrap();
            }
        });
    }
}
