#![allow(unsafe_code)] // a counting global allocator needs it
//! The happy paths of `MapFaults` and of the whole default stack allocate nothing per request.

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{Request, Response};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_upstream::map_faults::MapFaultsLayer;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Only allocations of the threads that count are counted (not the test harness's).
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.try_with(|c| c.get()).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counter is global: tests that count take turns, and count on their own thread
/// (the current-thread runtime runs everything there).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn count_here() {
    COUNTING.with(|c| c.set(true));
}

async fn allocations_for_100_requests<S>(mut svc: S) -> usize
where
    S: Service<Request<()>, Response = Response<tower_upstream::map_faults::FaultBody<()>>>,
    S::Error: std::fmt::Debug,
{
    // Warm up (first-use allocations of the runtime and tracing are not per request).
    for _ in 0..10 {
        let _ = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..100 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        std::hint::black_box(res);
    }
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

#[test]
fn happy_path_does_not_allocate() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    count_here();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let inner =
        service_fn(|_req: Request<()>| std::future::ready(Ok::<_, Infallible>(Response::new(()))));
    let n = rt.block_on(allocations_for_100_requests(
        MapFaultsLayer::new().layer(inner),
    ));
    assert_eq!(n, 0, "allocations on the happy path");

    let named = MapFaultsLayer::builder()
        .gateway_name(String::from("edge gateway"))
        .build()
        .unwrap();
    let n = rt.block_on(allocations_for_100_requests(named.layer(inner)));
    assert_eq!(n, 0, "allocations on the happy path with a configured name");
}

/// The whole default stack (`Upstream::builder().build()`: fault answers, deadline, retry
/// with its budget, breaker, attempt timeout) allocates nothing per request either, once
/// warm, when the first attempt answers: the deadline travels without an extension, the
/// head copied for retries has no extensions, and no timer is made for an attempt that
/// does not wait.
#[test]
fn the_default_stack_does_not_allocate_on_the_happy_path() {
    use bytes::Bytes;
    use http_body_util::Empty;
    use tower_upstream::retry::ReplayBody;
    use tower_upstream::Upstream;

    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    count_here();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let inner = service_fn(|_req: Request<ReplayBody<Empty<Bytes>>>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(())))
    });
    let layer = Upstream::builder().build().unwrap();
    let mut svc = layer.layer(inner);
    let n = rt.block_on(async move {
        let mut before = 0;
        for i in 0..110 {
            if i == 10 {
                // Warm: first-use allocations (thread-locals, the breaker's map) are behind.
                before = ALLOCATIONS.load(Ordering::Relaxed);
            }
            let res = svc
                .ready()
                .await
                .unwrap()
                .call(Request::new(Empty::new()))
                .await
                .unwrap();
            assert_eq!(res.status(), http::StatusCode::OK);
            std::hint::black_box(res);
        }
        ALLOCATIONS.load(Ordering::Relaxed) - before
    });
    assert_eq!(n, 0, "allocations on the default stack's happy path");
}
