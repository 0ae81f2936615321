//! A service wrapper that counts its clones, for the tests of when the stack clones the
//! service it wraps.
#![allow(dead_code, unreachable_pub)]

use tower::Service;

/// A service that counts its clones (in `clones`), and is `inner` otherwise.
pub struct Counted<S> {
    clones: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    inner: S,
}

impl<S> Counted<S> {
    pub fn new(clones: &std::sync::Arc<std::sync::atomic::AtomicUsize>, inner: S) -> Self {
        Counted {
            clones: clones.clone(),
            inner,
        }
    }
}

impl<S: Clone> Clone for Counted<S> {
    fn clone(&self) -> Self {
        self.clones
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Counted {
            clones: self.clones.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<S: Service<R>, R> Service<R> for Counted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> S::Future {
        self.inner.call(req)
    }
}
