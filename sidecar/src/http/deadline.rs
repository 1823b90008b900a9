//! A deadline on a connection's first bytes. hyper's automatic protocol
//! detection reads them before any of its own timeouts apply, and an
//! HTTP/2 server waits for the client preface without one: a client that
//! connects and sends nothing would hold its connection slot forever.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Wraps `inner` so that reads fail with `TimedOut` if fewer than
/// `min_bytes` have arrived by `within` after creation; past them, the
/// deadline is gone and reads pass straight through.
pub struct FirstBytes<T> {
    inner: T,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    left: usize,
    min: usize,
}

/// The HTTP/2 client preface is 24 bytes; an HTTP/1.1 request line is
/// longer than that too. Past them, the protocol's own timeouts apply.
pub const PREFACE_BYTES: usize = 24;

impl<T> FirstBytes<T> {
    pub fn new(inner: T, min_bytes: usize, within: Duration) -> Self {
        Self {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
            left: min_bytes,
            min: min_bytes,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstBytes<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let Some(deadline) = self.deadline.as_mut() else {
            return r;
        };
        match r {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                // Only the HTTP/2 preface (`PRI * ...`) needs all its bytes
                // before anything has a timeout; HTTP/1.1's header timeout
                // takes over from its first byte, and a request shorter
                // than the preface (`OPTIONS / HTTP/1.0`, 22 bytes) must
                // not stay under this deadline while it is answered.
                let http1 = self.left == self.min && got.first().is_some_and(|&b| b != b'P');
                self.left = self.left.saturating_sub(got.len());
                if self.left == 0 || got.is_empty() || http1 {
                    self.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the deadline",
                ))),
                Poll::Pending => Poll::Pending,
            },
            err => err,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstBytes<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_times_out() {
        let (_client, server) = tokio::io::duplex(64);
        let mut s = FirstBytes::new(server, PREFACE_BYTES, Duration::from_secs(30));
        let mut buf = [0u8; 8];
        let e = s.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_http1_request_is_not_held_to_the_deadline() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut s = FirstBytes::new(server, PREFACE_BYTES, Duration::from_secs(30));
        client
            .write_all(b"OPTIONS / HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).await.unwrap(), 22);
        // Answering takes long; the connection is read for its end meanwhile.
        let read = tokio::spawn(async move { s.read(&mut buf).await.map(|_| ()) });
        tokio::time::advance(Duration::from_secs(60)).await;
        drop(client);
        read.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_short_of_the_preface_times_out_too() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut s = FirstBytes::new(server, PREFACE_BYTES, Duration::from_secs(30));
        client.write_all(b"PRI * HTTP/2.0").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).await.unwrap(), 14);
        let e = s.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_first_bytes_a_connection_may_idle() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut s = FirstBytes::new(server, 4, Duration::from_secs(30));
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).await.unwrap(), 16);
        tokio::time::advance(Duration::from_secs(3600)).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap(), 1);
    }
}
