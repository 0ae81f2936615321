//! One value shared by every core, referenced per request through the calling thread's
//! stripe.
//!
//! A request's future that holds the value until it completes needs a reference count. One
//! shared `Arc` would make every request, on every core, write its count: the cache line
//! would bounce between cores. A request takes its thread's stripe's reference instead (the
//! stripe of [`stripe_index`](crate::retry::stripe_index)), whose count only that stripe's
//! threads write.

use std::ops::Deref;
use std::sync::Arc;

use crate::retry::STRIPES;

/// A value and one reference to it per stripe.
pub(crate) struct Striped<T> {
    value: Arc<T>,
    stripes: Box<[Arc<Stripe<T>>]>,
}

impl<T> Striped<T> {
    pub(crate) fn new(value: T) -> Self {
        let value = Arc::new(value);
        let stripes = (0..STRIPES)
            .map(|_| {
                Arc::new(Stripe {
                    value: value.clone(),
                })
            })
            .collect();
        Striped { value, stripes }
    }

    /// The value, borrowed (no reference count touched).
    #[inline]
    pub(crate) fn get(&self) -> &T {
        &self.value
    }

    /// A reference to the value through stripe `index` (below `STRIPES`).
    #[inline]
    pub(crate) fn stripe(&self, index: usize) -> Arc<Stripe<T>> {
        self.stripes[index % STRIPES].clone()
    }
}

/// One stripe's reference to the value, alone on its cache line(s).
#[repr(align(128))]
pub(crate) struct Stripe<T> {
    value: Arc<T>,
}

impl<T> Deref for Stripe<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.value
    }
}
