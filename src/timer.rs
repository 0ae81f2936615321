//! The requests' timers: one tokio `Sleep` per thread's shard, for every request in flight
//! on it.
//!
//! A tokio `Sleep` per request costs, on a multi-threaded runtime, more than its
//! instructions: making one clones the runtime's handle twice (a count that every core
//! writes), and registering it and dropping it each take the lock of the runtime's one timer
//! wheel, which every core takes. In a gateway nearly every request is answered long before
//! its timeout, so all of that is paid for a timer that never fires.
//!
//! Here a request's timer is a slot in its thread's shard: its deadline and its task's
//! waker, under the shard's lock, which other threads take only when a timer fires or a
//! request ends on another thread than it started on. The shard keeps one `Sleep`, armed
//! for its earliest deadline; when it fires, the requests whose deadline has come are woken
//! and it is armed again for the next.
//!
//! A runtime shutting down fires every timer, and polling a `Sleep` then panics: the
//! `Sleep` is armed again from its firing only while the shard's *watch* lives, a task on
//! the runtime that does nothing but be dropped when the runtime shuts down (tokio drops
//! the tasks before it shuts the timers down).
//!
//! The shard's `Sleep` belongs to the runtime that made it and keeps its clock, paused or
//! not: `tokio::time::pause` drives these timers as it drives any. A shard serves one
//! runtime at a time, taken over by another once it has no timer set; a request on another
//! runtime than its thread's shard's gets a `Sleep` of its own. Runtimes are told apart by
//! their `Id`, which tokio takes from a 64-bit counter.
//!
//! A timer is ready when its slot was fired *and* the clock has come to its deadline: a
//! `Sleep` fired by a runtime shutting down times nothing out early.

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

/// Above this many slots, a shard with no timer set gives its slots' memory back.
const KEEP_SLOTS: usize = 1024;

/// One shard per stripe.
static SHARDS: [Shard; STRIPES] = [const { Shard::new() }; STRIPES];

thread_local! {
    /// The shard whose `Sleep` this thread is arming, while it does (the lock held).
    static ARMING: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// A request's timer. Made idle; [`poll_at`](Timer::poll_at) sets it.
pub(crate) struct Timer {
    state: TimerState,
}

enum TimerState {
    Idle,
    /// A slot in shard `shard`.
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

    /// Whether the timer is set (it was polled, and has not fired since).
    pub(crate) fn is_set(&self) -> bool {
        !matches!(self.state, TimerState::Idle)
    }

    /// Ready once `at` has come (by the clock of the runtime the timer was set on); until
    /// then, `cx`'s task is woken when it comes. A timer set for another instant before is
    /// moved to `at`.
    pub(crate) fn poll_at(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut self.state {
                TimerState::Idle => return self.set(at, cx),
                TimerState::Shared {
                    shard,
                    key,
                    gen,
                    at: set,
                } if *set == at => {
                    return match SHARDS[*shard].poll(*key, *gen, at, cx) {
                        Slot::Waiting => Poll::Pending,
                        Slot::Done => {
                            // `poll` freed the slot.
                            self.state = TimerState::Idle;
                            Poll::Ready(())
                        }
                        Slot::Orphaned => {
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
    fn set(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        // Outside a runtime, `sleep_until` panics as tokio's timers do.
        let Ok(handle) = Handle::try_current() else {
            self.state = TimerState::Own(Box::pin(sleep_until(at)));
            return self.poll_at(at, cx);
        };
        let index = stripe_index() % STRIPES;
        let shard = &SHARDS[index];
        let mut state = shard.lock();
        let mut served = None;
        if !state.serves(handle.id()) {
            if state.live != 0 {
                shard.unlock(state);
                self.state = TimerState::Own(Box::pin(sleep_until(at)));
                return self.poll_at(at, cx);
            }
            served = Some(state.serve(handle.id(), index));
        }
        if state.sleep.is_none() {
            // Before a slot is taken: without a timer driver, this panics (as tokio's
            // timers do) with nothing to undo.
            state.sleep = Some(Box::pin(sleep_until(at)));
        }
        let (key, gen) = state.insert(at, cx.waker().clone());
        if state.armed.is_none_or(|armed| at < armed) {
            shard.arm(&mut state, at, index);
        }
        let done = state.slots[key as usize].fired;
        let waker = done.then(|| state.remove(key, gen));
        shard.unlock(state);
        drop(waker);
        if let Some((watch, former)) = served {
            // With the lock released: both may drop a task, or a runtime's last handle.
            drop(former);
            drop(handle.spawn(watch));
        }
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
    pub(crate) fn cancel(&mut self) {
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
    /// Fired, and the deadline has come; the slot is freed.
    Done,
    /// The shard's runtime is gone, and the request lives on in another; the slot is
    /// freed.
    Orphaned,
}

#[repr(align(128))]
struct Shard {
    /// Set when the `Sleep` fired while this thread held the lock to arm it.
    fired: AtomicBool,
    state: Mutex<State>,
}

/// A shard's timers.
struct State {
    /// The runtime whose clock and timer wheel the shard uses.
    runtime: Option<Id>,
    /// Counts the runtimes served: the watch of an earlier one stops.
    serving: u64,
    /// The watch's waker, once it has run.
    watch: Option<Waker>,
    /// Whether the watch lives: the runtime is not shutting down.
    alive: bool,
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
        SHARDS[self.0].fired(self.0);
    }
}

/// The task that tells a shard its runtime is shutting down, by being dropped. It stops
/// when the shard serves another runtime.
struct Watch {
    index: usize,
    serving: u64,
}

impl Future for Watch {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let shard = &SHARDS[self.index];
        let mut state = shard.lock();
        if state.serving != self.serving {
            shard.unlock(state);
            return Poll::Ready(());
        }
        let stale = match &state.watch {
            Some(waker) if waker.will_wake(cx.waker()) => None,
            _ => state.watch.replace(cx.waker().clone()),
        };
        shard.unlock(state);
        drop(stale);
        Poll::Pending
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let shard = &SHARDS[self.index];
        let mut state = shard.lock();
        let mut stale = None;
        if state.serving == self.serving {
            state.alive = false;
            stale = state.watch.take();
            // The timers still set are no longer armed again: their requests, if they live
            // on (polled on another runtime), go to a `Sleep` of their own when polled.
            let State { slots, wake, .. } = &mut *state;
            wake.extend(
                slots
                    .iter()
                    .filter(|entry| entry.used)
                    .filter_map(|entry| entry.waker.clone()),
            );
        }
        shard.unlock(state);
        drop(stale);
    }
}

impl Shard {
    const fn new() -> Shard {
        Shard {
            fired: AtomicBool::new(false),
            state: Mutex::new(State {
                runtime: None,
                serving: 0,
                watch: None,
                alive: false,
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
        // Nothing under the lock panics but a tokio `Sleep` polled while its runtime shuts
        // down (tokio's own timers panic then too); the state is consistent between
        // statements.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Releases the lock, then wakes the tasks left to wake.
    #[inline]
    fn unlock(&self, mut state: MutexGuard<'_, State>) {
        if state.wake.is_empty() {
            return;
        }
        let wake = std::mem::take(&mut state.wake);
        drop(state);
        wake.into_iter().for_each(Waker::wake);
    }

    /// Handles a firing of the `Sleep` seen while this thread armed it.
    fn settle(&self, state: &mut State, index: usize) {
        if self.fired.swap(false, Ordering::Relaxed) {
            self.expire(state, index);
        }
    }

    /// Arms the `Sleep` for `at` (made if need be), and handles its firing at once.
    fn arm(&self, state: &mut State, at: Instant, index: usize) {
        self.set_sleep(state, at, index);
        self.settle(state, index);
    }

    /// Moves the `Sleep` to `at` and polls it with the shard's waker; a firing at once sets
    /// the flag.
    fn set_sleep(&self, state: &mut State, at: Instant, index: usize) {
        let State { sleep, waker, .. } = state;
        let waker = waker.get_or_insert_with(|| Waker::from(Arc::new(ShardWake(index))));
        let sleep = sleep.get_or_insert_with(|| Box::pin(sleep_until(at)));
        // Moving the `Sleep` to a time that has come, or polling it, may wake it at once.
        ARMING.with(|arming| arming.set(index));
        sleep.as_mut().reset(at);
        // Elapsed as soon as moved: `at` has come, or the runtime is shutting down, when
        // polling it would panic.
        let fired = sleep.is_elapsed() || {
            // Unconstrained: out of the task's budget, tokio's `Sleep` would wake the
            // waker at once and stay unregistered.
            let mut cx = Context::from_waker(waker);
            let mut fut = unconstrained(poll_fn(|cx| sleep.as_mut().poll(cx)));
            Pin::new(&mut fut).poll(&mut cx).is_ready()
        };
        ARMING.with(|arming| arming.set(usize::MAX));
        state.armed = Some(at);
        if fired {
            self.fired.store(true, Ordering::Relaxed);
        }
    }

    /// After the `Sleep` fired: fires the slots whose deadline it was armed for (or an
    /// earlier one), to be woken, and arms it for the next, unless the runtime is shutting
    /// down.
    fn expire(&self, state: &mut State, index: usize) {
        while state.expire() && state.alive {
            let Some(first) = state.first() else {
                return;
            };
            self.set_sleep(state, first, index);
            if !self.fired.swap(false, Ordering::Relaxed) {
                return;
            }
        }
    }

    /// The `Sleep` fired (or its runtime is shutting down).
    fn fired(&self, index: usize) {
        if ARMING.try_with(Cell::get) == Ok(index) {
            // This thread holds the lock, arming: it looks at the flag before it lets go.
            self.fired.store(true, Ordering::Relaxed);
            return;
        }
        let mut state = self.lock();
        self.expire(&mut state, index);
        self.unlock(state);
    }

    /// Polls slot `key` (handed out as `gen`) for deadline `at`.
    fn poll(&self, key: u32, gen: u32, at: Instant, cx: &mut Context<'_>) -> Slot {
        let mut state = self.lock();
        let alive = state.alive;
        let entry = &mut state.slots[key as usize];
        debug_assert!(entry.used && entry.gen == gen);
        let slot = if entry.fired {
            if Instant::now() >= at {
                Slot::Done
            } else {
                // Fired by a runtime shutting down, polled on another (whose clock this is).
                Slot::Orphaned
            }
        } else if !alive {
            Slot::Orphaned
        } else {
            let stale = match &entry.waker {
                Some(waker) if waker.will_wake(cx.waker()) => None,
                _ => entry.waker.replace(cx.waker().clone()),
            };
            self.unlock(state);
            drop(stale);
            return Slot::Waiting;
        };
        let waker = state.remove(key, gen);
        self.unlock(state);
        drop(waker);
        slot
    }

    /// Frees slot `key`.
    fn cancel(&self, key: u32, gen: u32) {
        let mut state = self.lock();
        let waker = state.remove(key, gen);
        self.unlock(state);
        drop(waker);
    }
}

impl State {
    /// Whether the shard serves runtime `id`, which is not shutting down.
    fn serves(&self, id: Id) -> bool {
        self.runtime == Some(id) && self.alive
    }

    /// Starts serving runtime `id` (the shard has no timer set). Returns the watch to spawn
    /// on it and the former runtime's `Sleep`, both for after the lock is released.
    fn serve(&mut self, id: Id, index: usize) -> (Watch, Option<Pin<Box<Sleep>>>) {
        self.runtime = Some(id);
        self.serving += 1;
        // The former watch, if alive, stops when it runs.
        self.wake.extend(self.watch.take());
        self.armed = None;
        self.heap.clear();
        self.alive = true;
        let watch = Watch {
            index,
            serving: self.serving,
        };
        (watch, self.sleep.take())
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

    /// Frees slot `key` if it is still the one handed out as `gen`. Returns its waker, to
    /// be dropped once the lock is released (a waker's drop is the executor's code, which
    /// may drop a task holding a timer).
    #[must_use]
    fn remove(&mut self, key: u32, gen: u32) -> Option<Waker> {
        let entry = self.slots.get_mut(key as usize)?;
        if !entry.used || entry.gen != gen {
            return None;
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
        waker
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

    /// After the `Sleep` fired: fires the slots whose deadline it was armed for (or an
    /// earlier one), to be woken. Whether it had fired.
    fn expire(&mut self) -> bool {
        let Some(armed) = self.armed else {
            return false;
        };
        if !self.sleep.as_ref().is_some_and(|sleep| sleep.is_elapsed()) {
            return false;
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
                self.wake.extend(entry.waker.clone());
            }
        }
        true
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

    /// A current-thread runtime with its clock paused.
    fn paused() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    }

    /// A timer set on `rt` for `after` from its clock's now, polled once (pending).
    fn pending_on(
        rt: &tokio::runtime::Runtime,
        after: Duration,
    ) -> task::Spawn<impl std::future::Future<Output = ()>> {
        let _in = rt.enter();
        let mut t = task::spawn(wait(Instant::now() + after));
        assert_pending!(t.poll());
        t
    }

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
        let (a, b) = (paused(), paused());
        let mut on_a = pending_on(&a, 100 * MS);
        let mut on_b = pending_on(&b, 100 * MS);
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
        for _ in 0..3 {
            let rt = paused();
            // One timer still set when the runtime goes, one in a task it drops.
            let left = pending_on(&rt, 10 * MS);
            let _in = rt.enter();
            rt.spawn(wait(Instant::now() + 20 * MS));
            drop(_in);
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
        let rt = paused();
        let mut moved = pending_on(&rt, 10 * MS);
        drop(rt);
        let rt = paused();
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
        paused().block_on(async {
            let start = Instant::now();
            wait(start + 7 * MS).await;
            assert_eq!(start.elapsed(), 7 * MS);
        });
    }

    #[test]
    fn a_multi_threaded_runtime_shut_down_with_timers_set_does_not_panic() {
        for _ in 0..3 {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_time()
                .build()
                .unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            for i in 0..200u64 {
                let tx = tx.clone();
                rt.spawn(async move {
                    let at = Instant::now() + Duration::from_secs(3600 + i);
                    let mut timer = Timer::new();
                    poll_fn(|cx| {
                        let poll = timer.poll_at(at, cx);
                        let _ = tx.send(());
                        poll
                    })
                    .await;
                    unreachable!("an hour has not passed");
                });
            }
            for _ in 0..200 {
                rx.recv().unwrap();
            }
            // Tasks dropped first, then the timers fired by the shutdown.
            drop(rt);
        }
    }

    #[test]
    fn the_watch_of_a_runtime_no_longer_served_stops() {
        let long_lived = paused();
        for _ in 0..5 {
            long_lived.block_on(wait(Instant::now() + MS));
            let other = paused();
            other.block_on(wait(Instant::now() + MS));
        }
        // Each time the thread's shard came back to it, a watch was spawned on it; those
        // of the turns it lost have stopped (they run when the runtime next does). At most
        // one may live on: the shard may not have gone to `other`, if a test running at the
        // same time on another thread with the same shard had a timer set.
        long_lived.block_on(tokio::task::yield_now());
        assert!(long_lived.metrics().num_alive_tasks() <= 1);
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
