//! One breaker per upstream key, in a bounded, read-mostly map.
//!
//! Every thread is given a stripe (round robin, once). Each stripe has its own copy of the
//! key → breaker map behind its own `RwLock`, and its own reference-counted [`Pin`] per
//! breaker. A request takes its stripe's read lock and clones its stripe's `Pin`: both touch
//! cache lines that only this stripe's threads use, so the lookup does not bounce a shared
//! line between cores and does not allocate. Adding or evicting a key (rare) takes the writer
//! mutex and updates every stripe's copy.
//!
//! In front of that, each thread remembers the last breaker it used (registry id, eviction
//! epoch, breaker): a repeated key, the common case of a service calling one upstream, costs
//! a thread-local read and a byte comparison, no lock at all. The remembered breaker is
//! released on the thread's next miss or exit.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{
    AtomicU64, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex, RwLock};

use super::state::{Config, Core};

/// The key of the breaker shared by requests that have no key (no authority in the URI, or
/// the key function returned `None`).
pub const NO_KEY: &str = "";

/// The key of the shared breaker used once the map holds `max_keys` keys and none has been
/// idle long enough to be evicted.
pub const OVERFLOW_KEY: &str = "(overflow)";

pub use crate::head::RequestHead;

pub(crate) type KeyFn = Arc<dyn for<'a> Fn(&RequestHead<'a>) -> Option<Cow<'a, str>> + Send + Sync>;

#[derive(Clone)]
pub(crate) enum KeyBy {
    Authority,
    Fn(KeyFn),
    Single,
}

impl fmt::Debug for KeyBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyBy::Authority => "Authority",
            KeyBy::Fn(_) => "Fn(..)",
            KeyBy::Single => "Single",
        })
    }
}

/// A stripe's reference to a breaker. Cloned per call instead of the breaker itself, so the
/// reference count that every call bumps lives on a cache line of this stripe only.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct Pin {
    pub(crate) core: Arc<Core>,
    pub(crate) stripe: usize,
}

#[derive(Debug)]
struct Entry {
    core: Arc<Core>,
    pins: Box<[Arc<Pin>]>,
}

impl Entry {
    fn new(key: &str, config: &Arc<Config>) -> Entry {
        let core = Arc::new(Core::new(key.into(), config.clone()));
        let pins = (0..config.stripes)
            .map(|stripe| {
                Arc::new(Pin {
                    core: core.clone(),
                    stripe,
                })
            })
            .collect();
        Entry { core, pins }
    }
}

/// Up to this many keys a stripe's copy is a list compared byte by byte (no hashing).
const SMALL: usize = 8;

#[derive(Debug, Default)]
struct Replica {
    small: Vec<(Box<str>, Arc<Pin>)>,
    large: HashMap<Box<str>, Arc<Pin>>,
}

impl Replica {
    #[inline]
    fn get(&self, key: &str) -> Option<&Arc<Pin>> {
        if self.large.is_empty() {
            self.small
                .iter()
                .find(|(k, _)| k.as_bytes() == key.as_bytes())
                .map(|(_, p)| p)
        } else {
            self.large.get(key)
        }
    }

    fn insert(&mut self, key: &str, pin: Arc<Pin>) {
        if self.large.is_empty() && self.small.len() < SMALL {
            self.small.push((key.into(), pin));
        } else {
            self.large.extend(self.small.drain(..));
            self.large.insert(key.into(), pin);
        }
    }

    fn remove(&mut self, key: &str) {
        self.small.retain(|(k, _)| &**k != key);
        self.large.remove(key);
    }
}

#[repr(align(128))]
#[derive(Debug, Default)]
struct Stripe {
    map: RwLock<Replica>,
}

/// All the breakers of one `CircuitBreakerLayer`.
#[derive(Debug)]
pub(crate) struct Registry {
    /// Unique for the process's lifetime (never an address, which could be reused).
    id: u64,
    /// Bumped on every eviction, so that no thread keeps using an evicted breaker.
    epoch: AtomicU64,
    pub(crate) config: Arc<Config>,
    key_by: KeyBy,
    stripes: Box<[Stripe]>,
    master: Mutex<HashMap<Box<str>, Entry>>,
    none: Entry,
    overflow: Entry,
    /// Until this time (ms on `none`'s clock) the map is known full: new keys go to the
    /// overflow breaker without taking the writer lock.
    full_until: AtomicU64,
}

impl Registry {
    pub(crate) fn new(config: Arc<Config>, key_by: KeyBy) -> Registry {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Registry {
            id: NEXT_ID.fetch_add(1, Relaxed),
            epoch: AtomicU64::new(0),
            key_by,
            stripes: (0..config.stripes).map(|_| Stripe::default()).collect(),
            master: Mutex::new(HashMap::new()),
            none: Entry::new(NO_KEY, &config),
            overflow: Entry::new(OVERFLOW_KEY, &config),
            full_until: AtomicU64::new(0),
            config,
        }
    }

    /// The breaker for this request, as this thread's stripe's reference.
    #[inline]
    pub(crate) fn pin<B>(&self, req: &http::Request<B>) -> Arc<Pin> {
        let stripe = stripe_index() & (self.stripes.len() - 1);
        match self.key_of(req) {
            Some(key) => self.keyed(&key, stripe),
            None => self.none.pins[stripe].clone(),
        }
    }

    /// The key of the breaker [`pin`](Self::pin) would give this request, without making
    /// or touching that breaker.
    pub(crate) fn key<'a, B>(&self, req: &'a http::Request<B>) -> Cow<'a, str> {
        self.key_of(req).unwrap_or(Cow::Borrowed(NO_KEY))
    }

    /// The request's key by the configured `key_by`; `None` for the keyless breaker.
    #[inline]
    fn key_of<'a, B>(&self, req: &'a http::Request<B>) -> Option<Cow<'a, str>> {
        match &self.key_by {
            KeyBy::Single => None,
            KeyBy::Authority => req.uri().authority().map(|a| Cow::Borrowed(a.as_str())),
            KeyBy::Fn(f) => f(&RequestHead::of(req)),
        }
    }

    #[inline]
    fn keyed(&self, key: &str, stripe: usize) -> Arc<Pin> {
        let epoch = self.epoch.load(Acquire);
        let hit = HOT.try_with(|hot| match &*hot.borrow() {
            Some(h)
                if h.registry == self.id
                    && h.epoch == epoch
                    && h.pin.core.key.as_bytes() == key.as_bytes() =>
            {
                Some(h.pin.clone())
            }
            _ => None,
        });
        if let Ok(Some(pin)) = hit {
            return pin;
        }
        let pin = self.keyed_locked(key, stripe);
        let _ = HOT.try_with(|hot| {
            *hot.borrow_mut() = Some(Hot {
                registry: self.id,
                epoch,
                pin: pin.clone(),
            })
        });
        pin
    }

    fn keyed_locked(&self, key: &str, stripe: usize) -> Arc<Pin> {
        {
            let map = self.stripes[stripe]
                .map
                .read()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(p) = map.get(key) {
                return p.clone();
            }
        }
        self.insert(key, stripe)
    }

    #[cold]
    fn insert(&self, key: &str, stripe: usize) -> Arc<Pin> {
        let now = self.none.core.now_ms();
        if now < self.full_until.load(Relaxed) {
            return self.overflow.pins[stripe].clone();
        }
        let mut master = self.master.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = master.get(key) {
            return e.pins[stripe].clone();
        }
        if master.len() >= self.config.max_keys && !self.evict_one(&mut master) {
            self.full_until.store(now + 1000, Relaxed);
            tracing::debug!(
                target: "tower_upstream::breaker",
                max_keys = self.config.max_keys,
                "breaker map full; new keys share the overflow breaker"
            );
            return self.overflow.pins[stripe].clone();
        }
        let entry = Entry::new(key, &self.config);
        entry.core.touch(entry.core.now_ms());
        let pin = entry.pins[stripe].clone();
        for (s, st) in self.stripes.iter().enumerate() {
            st.map
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, entry.pins[s].clone());
        }
        master.insert(key.into(), entry);
        pin
    }

    /// Evicts the key idle the longest, if it has been idle for at least `idle_timeout`. A
    /// circuit still open is kept, idle or not: evicted, its key would get a closed breaker
    /// and send traffic the upstream asked (`Retry-After`) or was judged unable to take.
    fn evict_one(&self, master: &mut HashMap<Box<str>, Entry>) -> bool {
        let victim = master
            .iter()
            .filter(|(_, e)| {
                let now = e.core.now_ms();
                e.core.until_probe(now).is_none_or(|left| left.is_zero())
            })
            .map(|(k, e)| (e.core.idle_for(e.core.now_ms()), k))
            .filter(|(idle, _)| *idle >= self.config.idle_timeout)
            .max_by_key(|(idle, _)| *idle)
            .map(|(_, k)| k.clone());
        let Some(key) = victim else { return false };
        for st in self.stripes.iter() {
            st.map
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        }
        master.remove(&key);
        self.epoch.fetch_add(1, Release);
        tracing::debug!(target: "tower_upstream::breaker", key = &*key, "idle breaker evicted");
        true
    }

    /// Every breaker: the keyed ones, then the no-key and overflow ones.
    pub(crate) fn cores(&self) -> Vec<Arc<Core>> {
        let master = self.master.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = master.values().map(|e| e.core.clone()).collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v.push(self.none.core.clone());
        v.push(self.overflow.core.clone());
        v
    }

    pub(crate) fn core(&self, key: &str) -> Option<Arc<Core>> {
        match key {
            NO_KEY => Some(self.none.core.clone()),
            OVERFLOW_KEY => Some(self.overflow.core.clone()),
            _ => self
                .master
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(key)
                .map(|e| e.core.clone()),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.master.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The breaker this thread used last.
struct Hot {
    registry: u64,
    epoch: u64,
    pin: Arc<Pin>,
}

thread_local! {
    static HOT: RefCell<Option<Hot>> = const { RefCell::new(None) };
}

/// The calling thread's stripe number (not yet reduced to a table size).
#[inline]
pub(crate) fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        let v = s.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT.fetch_add(1, Relaxed);
        s.set(v);
        v
    })
}

/// Stripes per breaker: twice the cores, a power of two, between 2 and 64.
pub(crate) fn default_stripes() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores * 2).next_power_of_two().clamp(2, 64)
}
