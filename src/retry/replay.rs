//! Request bodies that can be sent more than once, without `Clone`.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::BoxError;

pin_project! {
    /// The request body the inner service of a [`Retry`](super::Retry) sees.
    ///
    /// One type for every attempt: the caller's body passed through untouched (requests that
    /// cannot be retried), nothing (requests whose body was empty), or a *replay*: the first
    /// attempt streams the caller's body and records its frames (`Bytes`, zero-copy when the
    /// body's data is `Bytes`) and trailers up to a limit; a later attempt replays what was
    /// recorded, then carries on with the rest of the caller's body if the first attempt did
    /// not send it all.
    pub struct ReplayBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Passthrough { #[pin] body: B },
        Empty,
        Replay { replay: Replay<B> },
    }
}

struct Replay<B> {
    shared: Arc<Mutex<State<B>>>,
    /// Index of the next recorded frame this attempt sends.
    pos: usize,
    /// Bytes this attempt has sent (for `size_hint`).
    sent: u64,
    /// The caller's body, while this attempt is the one streaming it.
    live: Option<Pin<Box<B>>>,
}

enum Recorded {
    Data(Bytes),
    Trailers(HeaderMap),
}

pub(crate) struct State<B> {
    recorded: Vec<Recorded>,
    bytes: usize,
    limit: usize,
    /// The caller's body, when no attempt is streaming it.
    rest: Option<Pin<Box<B>>>,
    /// The caller's body reached its end; everything is recorded.
    end: bool,
    /// Recording stopped (over the limit, or the body failed): no replay possible.
    spoiled: bool,
    hint: SizeHint,
}

impl<B> ReplayBody<B> {
    pub(crate) fn passthrough(body: B) -> Self {
        ReplayBody {
            kind: Kind::Passthrough { body },
        }
    }

    pub(crate) fn empty() -> Self {
        ReplayBody { kind: Kind::Empty }
    }

    pub(crate) fn replay(shared: &Arc<Mutex<State<B>>>) -> Self {
        ReplayBody {
            kind: Kind::Replay {
                replay: Replay {
                    shared: shared.clone(),
                    pos: 0,
                    sent: 0,
                    live: None,
                },
            },
        }
    }
}

impl<B: Body> State<B> {
    pub(crate) fn new(body: B, limit: usize) -> Arc<Mutex<Self>> {
        let hint = body.size_hint();
        Arc::new(Mutex::new(State {
            recorded: Vec::new(),
            bytes: 0,
            limit,
            rest: Some(Box::pin(body)),
            end: false,
            spoiled: false,
            hint,
        }))
    }
}

impl<B> State<B> {
    /// Whether another attempt can send the whole body again: nothing was lost, and either
    /// all of it was recorded, or the rest is back (`after_response`: the rest must be
    /// recorded, a response that came before the body was sent ends the request).
    pub(crate) fn can_replay(&self, after_response: bool) -> bool {
        !self.spoiled && (self.end || (!after_response && self.rest.is_some()))
    }
}

pub(crate) fn lock<B>(shared: &Mutex<State<B>>) -> MutexGuard<'_, State<B>> {
    // A panic while holding this lock leaves consistent data; keep going.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl<B> Body for ReplayBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Passthrough { body } => {
                let frame = ready!(body.poll_frame(cx));
                Poll::Ready(frame.map(|r| {
                    r.map(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining())))
                        .map_err(Into::into)
                }))
            }
            KindProj::Empty => Poll::Ready(None),
            KindProj::Replay { replay } => replay.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { body } => body.is_end_stream(),
            Kind::Empty => true,
            Kind::Replay { replay } => {
                let state = lock(&replay.shared);
                state.end && replay.pos >= state.recorded.len()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { body } => body.size_hint(),
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Replay { replay } => {
                let hint = lock(&replay.shared).hint;
                let mut out = SizeHint::new();
                out.set_lower(hint.lower().saturating_sub(replay.sent));
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper.saturating_sub(replay.sent).max(out.lower()));
                }
                out
            }
        }
    }
}

impl<B> Replay<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.live.is_none() {
            let mut state = lock(&self.shared);
            if let Some(rec) = state.recorded.get(self.pos) {
                self.pos += 1;
                return Poll::Ready(Some(Ok(match rec {
                    Recorded::Data(d) => {
                        self.sent += d.len() as u64;
                        Frame::data(d.clone())
                    }
                    Recorded::Trailers(t) => Frame::trailers(t.clone()),
                })));
            }
            if state.end {
                return Poll::Ready(None);
            }
            if state.spoiled || self.pos != state.recorded.len() {
                return Poll::Ready(Some(Err("request body cannot be replayed".into())));
            }
            match state.rest.take() {
                Some(body) => self.live = Some(body),
                None => {
                    return Poll::Ready(Some(Err(
                        "request body is still held by an earlier attempt".into(),
                    )))
                }
            }
        }
        let live = self.live.as_mut().expect("live body set above");
        let frame = ready!(live.as_mut().poll_frame(cx));
        let mut state = lock(&self.shared);
        match frame {
            None => {
                state.end = true;
                self.live = None;
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                state.spoiled = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Some(Ok(frame)) => {
                let frame = frame.map_data(|mut d| d.copy_to_bytes(d.remaining()));
                if !state.spoiled {
                    if let Some(d) = frame.data_ref() {
                        if state.bytes.saturating_add(d.len()) > state.limit {
                            state.spoiled = true;
                            state.recorded = Vec::new();
                        } else if !d.is_empty() {
                            // An empty frame carries nothing to replay, and the limit
                            // counts bytes: recording it would grow without bound.
                            state.bytes += d.len();
                            state.recorded.push(Recorded::Data(d.clone()));
                        }
                    } else if let Some(t) = frame.trailers_ref() {
                        state.recorded.push(Recorded::Trailers(t.clone()));
                    }
                    self.pos = state.recorded.len();
                }
                if let Some(d) = frame.data_ref() {
                    self.sent += d.len() as u64;
                }
                // A sender that trusts `is_end_stream` (hyper does, after each frame) never
                // polls for the end; without this, a body such as `Full` would look unfinished
                // and its request could not be retried after a response. Trailers are the
                // last frame: hyper stops polling (and drops the body) once it sent them.
                if frame.is_trailers() || live.is_end_stream() {
                    state.end = true;
                    self.live = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }
}

impl<B> Drop for Replay<B> {
    fn drop(&mut self) {
        // Hand the rest of the caller's body back, so the next attempt can carry on.
        if let Some(body) = self.live.take() {
            let mut state = lock(&self.shared);
            if !state.end {
                state.rest = Some(body);
            }
        }
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::Empty => "empty",
            Kind::Replay { .. } => "replay",
        };
        f.debug_struct("ReplayBody").field("kind", &kind).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(n: usize, size: usize) -> Vec<Result<Frame<Bytes>, std::io::Error>> {
        (0..n)
            .map(|i| Ok(Frame::data(Bytes::from(vec![i as u8; size]))))
            .collect()
    }

    #[tokio::test]
    async fn records_and_replays() {
        let mut frames = chunks(3, 10);
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "30".parse().unwrap());
        frames.push(Ok(Frame::trailers(trailers.clone())));
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let shared = State::new(body, 1024);
        let first = ReplayBody::replay(&shared).collect().await.unwrap();
        assert!(lock(&shared).can_replay(true));
        let second = ReplayBody::replay(&shared).collect().await.unwrap();
        assert_eq!(second.trailers(), Some(&trailers));
        assert_eq!(first.to_bytes(), second.to_bytes());
    }

    #[tokio::test]
    async fn a_body_that_says_it_ended_is_recorded_whole_without_a_last_poll() {
        // hyper stops polling once `is_end_stream` says so; `Full` says so after its frame.
        let shared = State::new(http_body_util::Full::new(Bytes::from_static(b"abc")), 1024);
        let mut first = ReplayBody::replay(&shared);
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "abc");
        assert!(first.is_end_stream());
        assert!(lock(&shared).can_replay(true));
        drop(first);
        let again = ReplayBody::replay(&shared).collect().await.unwrap();
        assert_eq!(again.to_bytes(), "abc");
    }

    #[tokio::test]
    async fn a_body_sent_up_to_its_trailers_is_recorded_whole() {
        // hyper stops polling, and drops the body, once it has sent the trailers: they are
        // the last frame, whatever `is_end_stream` says (`StreamBody` always says `false`).
        let mut frames = chunks(2, 10);
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "20".parse().unwrap());
        frames.push(Ok(Frame::trailers(trailers.clone())));
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let shared = State::new(body, 1024);
        let mut first = ReplayBody::replay(&shared);
        for _ in 0..2 {
            assert!(first.frame().await.unwrap().unwrap().is_data());
        }
        let t = first.frame().await.unwrap().unwrap();
        assert_eq!(t.into_trailers().unwrap(), trailers);
        drop(first);
        assert!(lock(&shared).can_replay(true));
        let again = ReplayBody::replay(&shared).collect().await.unwrap();
        assert_eq!(again.trailers(), Some(&trailers));
        assert_eq!(again.to_bytes().len(), 20);
    }

    #[tokio::test]
    async fn continues_after_a_partial_attempt() {
        let body = StreamBody::new(futures_util::stream::iter(chunks(4, 10)));
        let shared = State::new(body, 1024);
        let mut first = ReplayBody::replay(&shared);
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap().len(), 10);
        assert!(!lock(&shared).can_replay(false)); // still held by the first attempt
        drop(first);
        assert!(lock(&shared).can_replay(false));
        assert!(!lock(&shared).can_replay(true));
        let all = ReplayBody::replay(&shared)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(all.len(), 40);
        assert_eq!(&all[..10], &[0u8; 10]);
        assert_eq!(&all[30..], &[3u8; 10]);
    }

    #[tokio::test]
    async fn empty_frames_take_no_room_in_the_recording() {
        // The limit counts bytes: frames without any must not grow the recording unbounded.
        let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..100_000)
            .map(|_| Ok(Frame::data(Bytes::new())))
            .collect();
        frames.extend(chunks(1, 10));
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let shared = State::new(body, 1024);
        let first = ReplayBody::replay(&shared).collect().await.unwrap();
        assert_eq!(first.to_bytes().len(), 10);
        assert!(lock(&shared).can_replay(true));
        assert!(lock(&shared).recorded.len() <= 1);
        let again = ReplayBody::replay(&shared).collect().await.unwrap();
        assert_eq!(again.to_bytes(), vec![0u8; 10]);
    }

    #[tokio::test]
    async fn over_the_limit_is_not_replayable() {
        let body = StreamBody::new(futures_util::stream::iter(chunks(4, 10)));
        let shared = State::new(body, 25);
        let all = ReplayBody::replay(&shared)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(all.len(), 40); // the first attempt still sends it all
        assert!(!lock(&shared).can_replay(false));
        assert!(lock(&shared).recorded.is_empty());
    }
}
