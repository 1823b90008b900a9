//! A request body cut off at a byte limit, for `maxRequestBodyBytes`.
//!
//! The frame that would cross the limit is never passed on: the body ends
//! with [`BodyTooLarge`] instead, so the app receives at most `limit` bytes
//! and the request to it fails (the handler then answers 413).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame, SizeHint};

use super::BoxError;

/// The body went past its limit.
#[derive(Debug, thiserror::Error)]
#[error("request body is larger than the {0}-byte limit")]
pub struct BodyTooLarge(pub u64);

/// Whether a declared `content-length` is over `limit`.
pub fn declared_over(headers: &http::HeaderMap, limit: u64) -> bool {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > limit)
}

/// `inner`, ending with [`BodyTooLarge`] once more than `limit` bytes of
/// data would have passed. `exceeded` is set when that happens, so the
/// caller can tell this failure from others.
pub struct Capped<B> {
    inner: B,
    limit: u64,
    left: u64,
    exceeded: Arc<AtomicBool>,
}

impl<B> Capped<B> {
    pub fn new(inner: B, limit: u64) -> (Self, Arc<AtomicBool>) {
        let exceeded = Arc::new(AtomicBool::new(false));
        let body = Self {
            inner,
            limit,
            left: limit,
            exceeded: exceeded.clone(),
        };
        (body, exceeded)
    }
}

impl<B> Body for Capped<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.exceeded.load(Ordering::Relaxed) {
            return Poll::Ready(Some(Err(Box::new(BodyTooLarge(this.limit)))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.left {
                        this.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge(this.limit)))));
                    }
                    this.left -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
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
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(sizes: &[usize]) -> impl Body<Data = Bytes, Error = BoxError> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = sizes
            .iter()
            .map(|&n| Ok(Frame::data(Bytes::from(vec![b'x'; n]))))
            .collect();
        StreamBody::new(tokio_stream::iter(frames))
    }

    #[tokio::test]
    async fn body_at_the_limit_passes_whole() {
        let (b, exceeded) = Capped::new(chunks(&[4, 4, 2]), 10);
        let got = b.collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), 10);
        assert!(!exceeded.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn body_over_the_limit_stops_before_the_crossing_frame() {
        let (mut b, exceeded) = Capped::new(chunks(&[4, 4, 4, 4]), 10);
        let mut passed = 0;
        let err = loop {
            match b.frame().await {
                Some(Ok(f)) => passed += f.into_data().unwrap().len(),
                Some(Err(e)) => break e,
                None => panic!("ended without an error"),
            }
        };
        assert_eq!(passed, 8);
        assert!(err.is::<BodyTooLarge>(), "{err}");
        assert!(exceeded.load(Ordering::Relaxed));
    }

    #[test]
    fn declared_length_is_compared_with_the_limit() {
        let mut h = http::HeaderMap::new();
        assert!(!declared_over(&h, 10));
        h.insert(http::header::CONTENT_LENGTH, "10".parse().unwrap());
        assert!(!declared_over(&h, 10));
        h.insert(http::header::CONTENT_LENGTH, "11".parse().unwrap());
        assert!(declared_over(&h, 10));
    }
}
