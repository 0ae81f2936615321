//! The concurrency limit with load shedding: a counter of requests in flight.
//!
//! As tower's `ConcurrencyLimit` under `LoadShed`, but a request over the limit is never
//! queued, so no waiter list is needed: one atomic counter, incremented when a permit is
//! taken and decremented when it is given back. (tokio's `Semaphore`, which
//! `ConcurrencyLimit` uses, locks its waiter list on every release.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::Stack;
use crate::stripe::Stripe;

/// The largest limit: leaves room above it for the attempts that fail and give back.
pub(crate) const MAX: usize = usize::MAX >> 3;

/// How many requests may be in flight, and how many are.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct Limit {
    max: usize,
    in_flight: AtomicUsize,
}

impl Limit {
    /// A limit of `max` (between 1 and [`MAX`]) requests in flight.
    pub(crate) fn new(max: usize) -> Limit {
        Limit {
            max,
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Takes a place if one is free.
    #[inline]
    fn try_acquire(&self) -> bool {
        // Never admits more than `max`: a taker that finds none free gives its increment
        // back at once (another taker may briefly see the counter above `max` and fail).
        if self.in_flight.fetch_add(1, Ordering::Acquire) < self.max {
            return true;
        }
        self.release();
        false
    }

    #[inline]
    fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    /// Requests in flight now.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed).min(self.max)
    }
}

/// A place under the limit, given back when dropped. Holds the layer's parts through the
/// thread's stripe (no shared reference count written).
pub(crate) struct Permit<P> {
    /// `None` once handed over by [`into_stack`](Self::into_stack).
    stack: Option<Arc<Stripe<Stack<P>>>>,
}

impl<P> Permit<P> {
    /// Takes a place under `stack`'s limit, if it has one and a place is free; `None` when
    /// none is free. Call only when `stack` has a limit.
    #[inline]
    pub(crate) fn try_acquire(stack: Arc<Stripe<Stack<P>>>) -> Option<Permit<P>> {
        let limit = stack.limit.as_ref()?;
        // Made only on success: a `Permit` dropped gives a place back.
        limit.try_acquire().then(|| Permit { stack: Some(stack) })
    }

    /// The place, as its reference to the layer's parts: whoever takes it gives the place
    /// back with [`release`].
    #[inline]
    pub(crate) fn into_stack(mut self) -> Option<Arc<Stripe<Stack<P>>>> {
        self.stack.take()
    }
}

/// Gives back a place taken under `stack`'s limit.
#[inline]
pub(crate) fn release<P>(stack: &Stack<P>) {
    if let Some(limit) = &stack.limit {
        limit.release();
    }
}

impl<P> Drop for Permit<P> {
    fn drop(&mut self) {
        if let Some(stack) = &self.stack {
            release(stack);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_max_and_frees_on_release() {
        let limit = Limit::new(2);
        assert!(limit.try_acquire());
        assert!(limit.try_acquire());
        assert!(!limit.try_acquire());
        assert_eq!(limit.in_flight(), 2);
        limit.release();
        assert!(limit.try_acquire());
        assert!(!limit.try_acquire());
        limit.release();
        limit.release();
        assert_eq!(limit.in_flight(), 0);
    }

    #[test]
    fn concurrent_takers_never_exceed_max() {
        let limit = Arc::new(Limit::new(3));
        // Requests admitted and not yet given back, counted apart from the limit's counter.
        let holders = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (limit, holders, peak) = (limit.clone(), holders.clone(), peak.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if limit.try_acquire() {
                            let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            holders.fetch_sub(1, Ordering::SeqCst);
                            limit.release();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(limit.in_flight(), 0);
        assert!(peak.load(Ordering::SeqCst) <= 3);
    }
}
