//! Test helpers for the breaker tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use tower::{BoxError, Service, ServiceExt};
use tower_upstream::breaker::{State, Transition};

/// What the fake upstream does with a request, read from the `x-do` header:
/// a status code (`503`), `refused`, `overloaded`.
pub fn upstream(
    hits: Arc<AtomicUsize>,
) -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Response<()>, BoxError>> + Send + 'static,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |req: Request<()>| {
        hits.fetch_add(1, Ordering::SeqCst);
        let what = req
            .headers()
            .get("x-do")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_else(|| "200".into());
        let retry_after = req.headers().get("x-retry-after").cloned();
        let grpc = req.headers().get("x-grpc").cloned();
        async move {
            match what.as_str() {
                "refused" => Err(Box::new(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                )) as BoxError),
                "overloaded" => {
                    Err(Box::new(tower::load_shed::error::Overloaded::new()) as BoxError)
                }
                code => {
                    let mut b = Response::builder().status(code.parse::<u16>().unwrap());
                    if let Some(ra) = retry_after {
                        b = b.header("retry-after", ra);
                    }
                    if let Some(g) = grpc {
                        b = b
                            .header("content-type", "application/grpc")
                            .header("grpc-status", g);
                    }
                    Ok(b.body(()).unwrap())
                }
            }
        }
    })
}

pub fn req(authority: &str, what: &str) -> Request<()> {
    Request::get(format!("http://{authority}/"))
        .header("x-do", what)
        .body(())
        .unwrap()
}

pub async fn send<S>(svc: &mut S, r: Request<()>) -> Result<Response<()>, BoxError>
where
    S: Service<Request<()>, Response = Response<()>, Error = BoxError>,
{
    svc.ready().await?.call(r).await
}

/// Records every transition the listener sees.
#[derive(Clone, Default)]
pub struct Recorder(pub Arc<Mutex<Vec<(String, State, State)>>>);

impl Recorder {
    pub fn listener(&self) -> impl Fn(&Transition<'_>) + Send + Sync + 'static {
        let log = self.0.clone();
        move |t| {
            log.lock()
                .unwrap()
                .push((t.key().to_owned(), t.from(), t.to()))
        }
    }

    pub fn states(&self) -> Vec<(State, State)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, f, t)| (*f, *t))
            .collect()
    }
}
