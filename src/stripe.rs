//! One value shared by every core, referenced per request and per clone through the calling
//! thread's stripe.
//!
//! A request's future that holds the value until it completes needs a reference count, and
//! so does every clone of a service that holds it. One shared `Arc` would make every
//! request, on every core, write its count: the cache line would bounce between cores (a
//! server that clones its service for every request, as hyper's and axum's do, would not
//! go faster on a second core). References are taken through the calling thread's stripe
//! instead (the stripe of [`stripe_index`]), whose count only that stripe's threads write.
//!
//! [`Striped`] owns the value and keeps every stripe alive; the layers hold it. A service
//! holds a [`Handle`]: its clone takes the cloning thread's stripe without writing any other
//! count.

use std::ops::Deref;
use std::sync::{Arc, OnceLock, Weak};

use crate::retry::{stripe_index, STRIPES};

/// A value and one reference to it per stripe; keeps every stripe alive.
pub(crate) struct Striped<T> {
    /// The value, reached without going through a stripe.
    inner: Arc<Inner<T>>,
    stripes: Box<[Arc<Stripe<T>>]>,
}

/// The value, and the way from any stripe to the others.
struct Inner<T> {
    value: T,
    /// Every stripe, weakly: a stripe holds the value, so a strong reference here would
    /// make a cycle. [`Striped`] (the layer) keeps them alive.
    stripes: OnceLock<Box<[Weak<Stripe<T>>]>>,
}

impl<T> Striped<T> {
    pub(crate) fn new(value: T) -> Self {
        let inner = Arc::new(Inner {
            value,
            stripes: OnceLock::new(),
        });
        let stripes: Box<[Arc<Stripe<T>>]> = (0..STRIPES)
            .map(|index| {
                Arc::new(Stripe {
                    inner: inner.clone(),
                    index,
                })
            })
            .collect();
        // Set once, here, before anybody else can see `inner`.
        let _ = inner
            .stripes
            .set(stripes.iter().map(Arc::downgrade).collect());
        Striped { inner, stripes }
    }

    /// The value, borrowed (no reference count touched).
    #[inline]
    pub(crate) fn get(&self) -> &T {
        &self.inner.value
    }

    /// A reference to the value through stripe `index`.
    #[inline]
    pub(crate) fn stripe(&self, index: usize) -> Arc<Stripe<T>> {
        self.stripes[index % STRIPES].clone()
    }

    /// A handle for a service made by a layer: the calling thread's stripe, and the whole
    /// `Striped` kept alive while the service lives (so that its clones find their stripes).
    pub(crate) fn handle(self: &Arc<Self>) -> Handle<T> {
        Handle {
            stripe: self.stripe(stripe_index()),
            _keep: Some(self.clone()),
        }
    }
}

/// One stripe's reference to the value, alone on its cache line(s).
#[repr(align(128))]
pub(crate) struct Stripe<T> {
    inner: Arc<Inner<T>>,
    index: usize,
}

impl<T> Stripe<T> {
    /// A reference through stripe `index`: this one's, or another's found through the
    /// value (this one's again if that stripe is gone, every [`Striped`] being dropped).
    #[inline]
    pub(crate) fn sibling(self: &Arc<Self>, index: usize) -> Arc<Stripe<T>> {
        let index = index % STRIPES;
        if index == self.index {
            return self.clone();
        }
        self.other(index)
    }

    /// [`sibling`](Self::sibling) of another stripe: found through the value.
    #[cold]
    #[inline(never)]
    fn other(self: &Arc<Self>, index: usize) -> Arc<Stripe<T>> {
        self.inner
            .stripes
            .get()
            .and_then(|stripes| stripes[index].upgrade())
            .unwrap_or_else(|| self.clone())
    }
}

impl<T> Deref for Stripe<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.inner.value
    }
}

/// A service's hold on a [`Striped`] value: a stripe's reference, and (for the service a
/// layer made) the whole `Striped`. A clone takes the cloning thread's stripe and writes only
/// that stripe's count.
pub(crate) struct Handle<T> {
    stripe: Arc<Stripe<T>>,
    /// Set in the service a layer made, whose clones (a server's per request) need every
    /// stripe alive; `None` in clones, so that cloning writes no shared count.
    _keep: Option<Arc<Striped<T>>>,
}

impl<T> Handle<T> {
    /// The value, borrowed (no reference count touched).
    #[inline]
    pub(crate) fn get(&self) -> &T {
        &self.stripe
    }

    /// A reference to the value through stripe `index` (see [`Stripe::sibling`]).
    #[inline]
    pub(crate) fn stripe(&self, index: usize) -> Arc<Stripe<T>> {
        self.stripe.sibling(index)
    }
}

impl<T> Clone for Handle<T> {
    #[inline]
    fn clone(&self) -> Self {
        Handle {
            stripe: self.stripe(stripe_index()),
            _keep: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_takes_its_threads_stripe_and_writes_no_other_count() {
        let striped = Arc::new(Striped::new(7u32));
        let handle = striped.handle();
        let here = stripe_index() % STRIPES;
        let counts = |s: &Striped<u32>| s.stripes.iter().map(Arc::strong_count).collect::<Vec<_>>();
        let before = counts(&striped);
        let shared_before = Arc::strong_count(&striped);

        let clone = handle.clone();
        assert_eq!(*clone.get(), 7);
        let after = counts(&striped);
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            assert_eq!(*a, b + usize::from(i == here), "stripe {i}");
        }
        assert_eq!(
            Arc::strong_count(&striped),
            shared_before,
            "no shared count"
        );

        // From another thread: that thread's stripe (when it has another one).
        let there = std::thread::spawn(move || {
            let c = clone.clone();
            (c.stripe.index, stripe_index() % STRIPES)
        })
        .join()
        .unwrap();
        assert_eq!(there.0, there.1);
    }

    #[test]
    fn without_the_striped_a_clone_falls_back_to_its_own_stripe() {
        let striped = Arc::new(Striped::new(String::from("v")));
        let handle = striped.handle();
        let clone = handle.clone();
        drop(handle);
        drop(striped);
        // Every other stripe is gone: any index gives the clone's own.
        let own = clone.stripe.index;
        for i in 0..STRIPES {
            assert_eq!(clone.stripe(i).index, own);
        }
        assert_eq!(clone.clone().get(), "v");
    }
}
