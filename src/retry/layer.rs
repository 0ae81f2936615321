//! [`RetryLayer`] and its builder.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::{Backoff, Config, DefaultPolicy, Policy, Retry, RetryBudget, Shared};
use crate::error::ConfigError;
use crate::fault::Classifier;

/// Applies [`Retry`] to a service. Every service it makes shares one [`RetryBudget`], made
/// when the layer was built.
///
/// Each service it makes (each `layer` call) gets a little state of its own, allocated
/// once: a reference per core to the layer's configuration and a copy of the wrapped
/// service for later attempts. Wrap a service once and clone it, rather than calling
/// `layer` per request.
pub struct RetryLayer<P = DefaultPolicy> {
    shared: Arc<Shared<P>>,
}

impl RetryLayer {
    /// A layer with every default: [`DefaultPolicy`], 3 attempts in total, full-jitter
    /// backoff (25 ms base, 250 ms cap), the default [`RetryBudget`] (20 %, 10/s, 10 s),
    /// `Retry-After` honoured up to 3 s, request bodies recorded up to 64 KiB.
    pub fn new() -> Self {
        RetryLayerBuilder::new()
            .build()
            .expect("default retry configuration is valid")
    }

    /// A builder, starting from the defaults of [`RetryLayer::new`].
    pub fn builder() -> RetryLayerBuilder {
        RetryLayerBuilder::new()
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        RetryLayer::new()
    }
}

impl<P> RetryLayer<P> {
    /// The state shared by every service this layer makes.
    pub(crate) fn shared(&self) -> &Arc<Shared<P>> {
        &self.shared
    }

    /// The budget shared by every service this layer makes.
    pub fn budget(&self) -> &RetryBudget {
        &self.shared.get().budget
    }
}

impl<P> Clone for RetryLayer<P> {
    fn clone(&self) -> Self {
        RetryLayer {
            shared: self.shared.clone(),
        }
    }
}

impl<P: fmt::Debug> fmt::Debug for RetryLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("config", self.shared.get())
            .finish()
    }
}

impl<S: Clone, P> Layer<S> for RetryLayer<P> {
    type Service = Retry<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::from_shared(inner, &self.shared)
    }
}

/// Builds a [`RetryLayer`]; see [`RetryLayer::builder`].
pub struct RetryLayerBuilder<P = DefaultPolicy> {
    policy: P,
    max_attempts: u32,
    backoff: Backoff,
    budget: Option<RetryBudget>,
    pushback_cap: Duration,
    body_limit: usize,
    classifier: Classifier,
}

impl RetryLayerBuilder {
    fn new() -> Self {
        RetryLayerBuilder {
            policy: DefaultPolicy::new(),
            max_attempts: 3,
            backoff: Backoff::default(),
            budget: None,
            pushback_cap: Duration::from_secs(3),
            body_limit: 64 * 1024,
            classifier: Classifier::new(),
        }
    }
}

impl<P> RetryLayerBuilder<P> {
    /// Replaces the policy that decides which outcomes are retried.
    pub fn policy<P2: Policy>(self, policy: P2) -> RetryLayerBuilder<P2> {
        RetryLayerBuilder {
            policy,
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            budget: self.budget,
            pushback_cap: self.pushback_cap,
            body_limit: self.body_limit,
            classifier: self.classifier,
        }
    }

    /// Attempts in total, the first included, from 1 (never retry) to 10. Default 3.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// The wait between attempts. Default: full jitter, 25 ms base, 250 ms cap.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The retry budget. Default: a new [`RetryBudget::default()`] made by `build()`; pass
    /// a clone of one budget to several layers to make them share it.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The longest `Retry-After` / `grpc-retry-pushback-ms` honoured; an upstream asking
    /// for longer gets its answer returned as is. Default 3 s.
    pub fn pushback_cap(mut self, cap: Duration) -> Self {
        self.pushback_cap = cap;
        self
    }

    /// How many bytes of a request body are recorded for replay; a longer body is sent
    /// once and not retried. Default 64 KiB.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The classifier that names errors (the crate's built-in rules by default).
    pub fn classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = classifier;
        self
    }

    /// Checks the configuration and makes the layer (and its budget, once).
    pub fn build(self) -> Result<RetryLayer<P>, ConfigError> {
        if !(1..=10).contains(&self.max_attempts) {
            return Err(ConfigError::new(
                "retry.max_attempts",
                format!("must be from 1 to 10 (got {})", self.max_attempts),
            ));
        }
        if self.backoff.base() > self.backoff.cap() {
            return Err(ConfigError::new(
                "retry.backoff",
                format!(
                    "base must not exceed cap (got base {:?}, cap {:?})",
                    self.backoff.base(),
                    self.backoff.cap()
                ),
            ));
        }
        let budget = match self.budget {
            Some(b) => b,
            None => RetryBudget::builder().build()?,
        };
        Ok(RetryLayer {
            shared: Arc::new(Shared::new(Config {
                policy: self.policy,
                max_attempts: self.max_attempts,
                backoff: self.backoff,
                budget,
                pushback_cap: self.pushback_cap,
                body_limit: self.body_limit,
                classifier: self.classifier,
            })),
        })
    }
}

impl<P: fmt::Debug> fmt::Debug for RetryLayerBuilder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayerBuilder")
            .field("policy", &self.policy)
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("budget", &self.budget)
            .field("pushback_cap", &self.pushback_cap)
            .field("body_limit", &self.body_limit)
            .finish_non_exhaustive()
    }
}
