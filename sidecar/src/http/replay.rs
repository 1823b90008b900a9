//! Request bodies kept for a retry, within a bound, without stalling
//! streams.
//!
//! A body whose length is declared and small is read whole before the first
//! attempt (the client is sending all of it anyway). A body of unknown
//! length (gRPC, chunked uploads) is never waited for: it streams to the
//! first attempt at once, and a copy of what passes is kept up to the bound.
//! If the body ended within the bound by the time the attempt failed, the
//! copy replays it; otherwise there is no retry. Holding data back instead
//! would stall a bidirectional stream whose client sends one message and
//! waits for the answer, and would race a unary call's end-of-stream, which
//! often arrives in a frame of its own just after the message.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http_body_util::BodyExt;
use hyper::body::{Body as _, Bytes, Frame, SizeHint};

use super::{Body, BoxError};

/// A request body after [`read`].
pub enum Buffered {
    /// The whole body: can be sent any number of times.
    Whole {
        data: Bytes,
        trailers: Option<http::HeaderMap>,
    },
    /// Streamed to the first attempt (`body` is `None` once taken), with a
    /// copy of what passed (`None`: no copy is kept).
    Stream {
        body: Option<Body>,
        tape: Option<Arc<Mutex<Tape>>>,
    },
}

/// What a streamed body carried, up to the bound.
#[derive(Debug, Default)]
pub struct Tape {
    frames: Vec<Bytes>,
    len: usize,
    limit: usize,
    trailers: Option<http::HeaderMap>,
    ended: bool,
    overflowed: bool,
}

impl Tape {
    fn whole(&self) -> Option<(Bytes, Option<http::HeaderMap>)> {
        if !self.ended || self.overflowed {
            return None;
        }
        Some((self.frames.concat().into(), self.trailers.clone()))
    }
}

/// Why a body could not be read for replay.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Longer than its `content-length` said and than the bound.
    #[error("request body is longer than its content-length and the {0}-byte replay bound")]
    TooLarge(usize),
    #[error("reading the request body failed: {0}")]
    Body(BoxError),
}

impl Buffered {
    /// The body to send on one attempt; `None` when it cannot be sent again
    /// (see [`Buffered::replayable`]).
    pub fn take(&mut self) -> Option<Body> {
        if let Buffered::Stream {
            body: None,
            tape: Some(tape),
        } = self
        {
            let (data, trailers) = tape.lock().unwrap_or_else(|p| p.into_inner()).whole()?;
            *self = Buffered::Whole { data, trailers };
        }
        match self {
            Buffered::Whole { data, trailers } => {
                let body = super::full(data.clone());
                Some(match trailers.clone() {
                    None => body,
                    Some(t) => body.with_trailers(async move { Some(Ok(t)) }).boxed(),
                })
            }
            Buffered::Stream { body, tape } => {
                let body = body.take()?;
                Some(match tape {
                    Some(tape) => Recorded {
                        inner: body,
                        tape: tape.clone(),
                    }
                    .boxed(),
                    None => body,
                })
            }
        }
    }

    /// Whether [`Buffered::take`] has a body to send: the body was read
    /// whole, or has not been sent yet, or ended within the bound while it
    /// was sent.
    pub fn replayable(&self) -> bool {
        match self {
            Buffered::Whole { .. } | Buffered::Stream { body: Some(_), .. } => true,
            Buffered::Stream { body: None, tape } => tape.as_ref().is_some_and(|t| {
                let t = t.lock().unwrap_or_else(|p| p.into_inner());
                t.ended && !t.overflowed
            }),
        }
    }
}

/// Prepares `body` for possible retries, keeping at most `limit` bytes.
pub async fn read(
    mut body: Body,
    headers: &http::HeaderMap,
    limit: usize,
) -> Result<Buffered, ReadError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => Ok(Buffered::Stream {
            body: Some(body),
            tape: None,
        }),
        Some(_) => {
            let mut data = Vec::new();
            let mut trailers = None;
            while let Some(frame) = body.frame().await {
                match frame.map_err(ReadError::Body)?.into_data() {
                    Ok(d) if data.len() + d.len() > limit => {
                        return Err(ReadError::TooLarge(limit));
                    }
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => trailers = f.into_trailers().ok(),
                }
            }
            Ok(Buffered::Whole {
                data: data.into(),
                trailers,
            })
        }
        None if body.is_end_stream() => Ok(Buffered::Whole {
            data: Bytes::new(),
            trailers: None,
        }),
        None => Ok(Buffered::Stream {
            body: Some(body),
            tape: Some(Arc::new(Mutex::new(Tape {
                limit,
                ..Tape::default()
            }))),
        }),
    }
}

/// `inner`, passed through as it comes, copied onto `tape`.
struct Recorded {
    inner: Body,
    tape: Arc<Mutex<Tape>>,
}

impl hyper::body::Body for Recorded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let mut t = this.tape.lock().unwrap_or_else(|p| p.into_inner());
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref()
                    && !t.overflowed
                {
                    if t.len + d.len() > t.limit {
                        // Too long to replay: let the copy go.
                        t.overflowed = true;
                        t.frames = Vec::new();
                    } else {
                        t.len += d.len();
                        t.frames.push(d.clone());
                    }
                }
                if let Some(h) = frame.trailers_ref() {
                    t.trailers = Some(h.clone());
                }
                // HTTP/2 senders stop polling once the body says it has ended.
                t.ended |= this.inner.is_end_stream();
            }
            Poll::Ready(None) => t.ended = true,
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;

    /// A body fed frame by frame, like one arriving from the network.
    struct Feed(mpsc::Receiver<Frame<Bytes>>);

    impl hyper::body::Body for Feed {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx).map(|f| f.map(Ok))
        }
    }

    fn chan() -> (mpsc::Sender<Frame<Bytes>>, Body) {
        let (tx, rx) = mpsc::channel(16);
        (tx, Feed(rx).boxed())
    }

    async fn data(tx: &mpsc::Sender<Frame<Bytes>>, d: impl Into<Bytes>) {
        tx.send(Frame::data(d.into())).await.unwrap();
    }

    fn length(n: usize) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::CONTENT_LENGTH, n.into());
        h
    }

    async fn all(mut b: Body) -> (Vec<u8>, Option<http::HeaderMap>) {
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(f) = b.frame().await {
            match f.unwrap().into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        (data, trailers)
    }

    #[tokio::test]
    async fn a_stream_that_ended_within_the_bound_replays_with_its_trailers() {
        let (tx, body) = chan();
        data(&tx, "hello ").await;
        data(&tx, "world").await;
        let mut t = http::HeaderMap::new();
        t.insert("x-checksum", "1".parse().unwrap());
        tx.send(Frame::trailers(t)).await.unwrap();
        drop(tx);
        let mut b = read(body, &http::HeaderMap::new(), 64).await.unwrap();
        for attempt in 0..3 {
            assert!(b.replayable(), "attempt {attempt}");
            let (data, trailers) = all(b.take().unwrap()).await;
            assert_eq!(data, b"hello world");
            assert_eq!(trailers.unwrap()["x-checksum"], "1");
        }
    }

    #[tokio::test]
    async fn an_open_stream_passes_at_once_and_is_not_replayed_half_sent() {
        // A bidirectional call: one message, then the client waits. Nothing
        // may hold "ping" back (the test would hang: the timeout fails it).
        let (tx, body) = chan();
        data(&tx, "ping").await;
        let wait = std::time::Duration::from_secs(5);
        let mut b = tokio::time::timeout(wait, read(body, &http::HeaderMap::new(), 64))
            .await
            .unwrap()
            .unwrap();
        let mut sent = b.take().unwrap();
        let first = tokio::time::timeout(wait, sent.frame()).await.unwrap();
        assert_eq!(first.unwrap().unwrap().into_data().unwrap(), "ping");
        assert!(
            !b.replayable(),
            "the body has not ended: a retry would lose the rest"
        );
        assert!(b.take().is_none());
        data(&tx, "pong").await;
        drop(tx);
        assert_eq!(all(sent).await.0, b"pong");
        assert!(b.replayable(), "it did end, within the bound");
        assert_eq!(all(b.take().unwrap()).await.0, b"pingpong");
    }

    #[tokio::test]
    async fn a_stream_past_the_bound_passes_whole_and_is_not_replayable() {
        let (tx, body) = chan();
        for _ in 0..4 {
            data(&tx, vec![7u8; 10]).await;
        }
        drop(tx);
        let mut b = read(body, &http::HeaderMap::new(), 25).await.unwrap();
        assert_eq!(all(b.take().unwrap()).await.0, vec![7u8; 40]);
        assert!(!b.replayable());
        assert!(b.take().is_none());
    }

    #[tokio::test]
    async fn a_body_not_sent_yet_can_still_be_sent() {
        // A connect failure takes nothing: the next attempt sends the body.
        let (tx, body) = chan();
        let mut b = read(body, &http::HeaderMap::new(), 64).await.unwrap();
        assert!(b.replayable());
        data(&tx, "later").await;
        drop(tx);
        assert_eq!(all(b.take().unwrap()).await.0, b"later");
    }

    #[tokio::test]
    async fn declared_lengths_decide_without_guessing() {
        let mut small = read(super::super::full("abc"), &length(3), 8)
            .await
            .unwrap();
        assert_eq!(all(small.take().unwrap()).await.0, b"abc");
        assert!(small.replayable());
        assert_eq!(all(small.take().unwrap()).await.0, b"abc");
        let mut big = read(super::super::full(vec![1u8; 100]), &length(100), 8)
            .await
            .unwrap();
        assert_eq!(all(big.take().unwrap()).await.0.len(), 100);
        assert!(!big.replayable(), "past the bound: no copy is kept");
        let lying = read(super::super::full(vec![0u8; 20]), &length(3), 8).await;
        assert!(matches!(lying, Err(ReadError::TooLarge(8))));
    }
}
