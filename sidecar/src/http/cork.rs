//! One write per turn of a multiplexed connection's task.
//!
//! h2 flushes its socket after every DATA frame of 256 bytes or more (it
//! chains the payload rather than copying it into its buffer, and cannot
//! queue another frame behind a chained one). On a pooled sidecar-to-sidecar
//! connection that made every response its own TLS record and its own
//! write(2), however many streams were ready together. [`Corked`] holds the
//! connection's writes instead: a flush wakes the task again and returns,
//! and what is held goes to the socket at the task's next read, which h2
//! makes at the start of every poll of the connection. Meanwhile the other
//! tasks that were ready have run and queued their frames too: every stream
//! made ready in one turn of the event loop shares one record and one
//! system call (TCP_CORK, per turn of the scheduler).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes held beyond this go to the socket at once (bulk transfers).
const MAX_HELD: usize = 64 * 1024;
/// A drained buffer larger than this is freed: a burst must not leave every
/// idle peer connection holding 64 KiB.
const KEEP_HELD: usize = 16 * 1024;

pub struct Corked<T> {
    io: T,
    held: BytesMut,
    /// A flush was answered with the bytes still held: the next read (or
    /// shutdown) writes them out first.
    deferred: bool,
}

impl<T> Corked<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            held: BytesMut::new(),
            deferred: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Corked<T> {
    /// Writes out everything held, then flushes.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.advance(n);
        }
        if self.held.capacity() > KEEP_HELD {
            self.held = BytesMut::new();
        }
        self.deferred = false;
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Corked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // A new turn of the connection's task: what the last one flushed
        // goes out now. A socket that is full leaves it held, the task
        // waiting on the socket's write readiness as well.
        if self.deferred
            && let Poll::Ready(Err(e)) = self.poll_drain(cx)
        {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Corked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.held.len() >= MAX_HELD {
            ready!(self.poll_drain(cx))?;
        }
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(MAX_HELD - self.held.len());
            self.held.extend_from_slice(&b[..take]);
            n += take;
            if take < b.len() {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.held.is_empty() {
            return Pin::new(&mut self.io).poll_flush(cx);
        }
        if !self.deferred {
            self.deferred = true;
            // Polled again after the tasks already queued: its read then
            // writes out this and whatever they added.
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Bytes;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes that reach it.
    struct Counting<T> {
        inner: T,
        writes: Arc<AtomicUsize>,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for Counting<T> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.inner).poll_write(cx, buf);
            if r.is_ready() {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    fn body(i: usize, len: usize) -> Bytes {
        (0..len).map(|j| (i * 31 + j) as u8).collect()
    }

    /// An h2 server answers `n` requests, all ready at once, with `len`
    /// bytes each, over a pipe of `pipe` bytes; the client checks every
    /// body. Returns the writes the server's responses took.
    async fn answer_together(corked: bool, n: usize, len: usize, pipe: usize) -> usize {
        let (a, b) = tokio::io::duplex(pipe);
        let writes = Arc::new(AtomicUsize::new(0));
        let io = Counting {
            inner: a,
            writes: writes.clone(),
        };
        let counted = writes.clone();
        let server = tokio::spawn(async move {
            async fn serve<T: AsyncRead + AsyncWrite + Unpin>(
                io: T,
                n: usize,
                len: usize,
                counted: Arc<AtomicUsize>,
            ) -> usize {
                let mut conn = h2::server::Builder::new()
                    .initial_connection_window_size(1 << 20)
                    .handshake(io)
                    .await
                    .unwrap();
                let mut waiting = Vec::new();
                while waiting.len() < n {
                    let (_req, respond) = conn.accept().await.unwrap().unwrap();
                    waiting.push(respond);
                }
                let before = counted.load(Ordering::Relaxed);
                for (i, mut respond) in waiting.into_iter().enumerate() {
                    let resp = http::Response::new(());
                    let mut send = respond.send_response(resp, false).unwrap();
                    send.send_data(body(i, len), true).unwrap();
                }
                // Drives the connection until the client has read it all.
                let _ = std::future::poll_fn(|cx| conn.poll_closed(cx)).await;
                counted.load(Ordering::Relaxed) - before
            }
            if corked {
                serve(Corked::new(io), n, len, counted).await
            } else {
                serve(io, n, len, counted).await
            }
        });
        // Under h2's default stream limit (100), a window that holds all.
        assert!(n < 100 && n * len < 1 << 20);
        let (client, conn) = h2::client::Builder::new()
            .initial_connection_window_size(1 << 20)
            .handshake::<_, Bytes>(b)
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let mut responses = Vec::new();
        for _ in 0..n {
            let req = http::Request::get("http://peer/").body(()).unwrap();
            let (resp, _) = client.send_request(req, true).unwrap();
            responses.push(resp);
            client = client.ready().await.unwrap();
        }
        for (i, resp) in responses.into_iter().enumerate() {
            let mut recv = resp.await.unwrap().into_body();
            let mut got = Vec::new();
            while let Some(d) = recv.data().await {
                let d = d.unwrap();
                let _ = recv.flow_control().release_capacity(d.len());
                got.extend_from_slice(&d);
            }
            assert_eq!(got, body(i, len), "response {i}");
        }
        drop(client);
        let _ = conn.await;
        server.await.unwrap()
    }

    #[tokio::test]
    async fn responses_ready_together_share_one_write() {
        let n = 32;
        // The premise: h2 alone writes each 1 KiB response out by itself.
        let plain = answer_together(false, n, 1024, 1 << 20).await;
        assert!(plain >= n, "{plain} writes for {n} responses");
        let corked = answer_together(true, n, 1024, 1 << 20).await;
        assert!(corked <= 3, "{corked} writes for {n} responses");
    }

    #[tokio::test]
    async fn a_pipe_that_fills_gets_every_byte_in_order() {
        // 90 responses of 1 and 3 KB through an 8 KiB pipe: the held bytes
        // (up to the 64 KiB bound) go out over many turns, each response
        // intact. (A pipe much smaller than the client's own writes would
        // stall both sides, corked or not: h2 reads only once its writes
        // are done.)
        for len in [1000, 3000] {
            answer_together(true, 90, len, 8 << 10).await;
        }
    }

    #[tokio::test]
    async fn a_burst_leaves_no_large_buffer_behind() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut io = Corked::new(a);
        io.write_all(&[7u8; 40_000]).await.unwrap();
        io.flush().await.unwrap();
        assert!(io.held.capacity() >= 40_000);
        // The next turn's read (polled once: nothing is there to read)
        // writes it out and frees the buffer.
        let mut buf = [0u8; 8];
        std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf);
            assert!(Pin::new(&mut io).poll_read(cx, &mut rb).is_pending());
            Poll::Ready(())
        })
        .await;
        assert_eq!(io.held.capacity(), 0);
        let mut got = vec![0u8; 40_000];
        b.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|&x| x == 7));
    }

    #[tokio::test]
    async fn shutdown_writes_out_what_is_held() {
        let (a, mut b) = tokio::io::duplex(1 << 10);
        let mut io = Corked::new(a);
        io.write_all(b"held").await.unwrap();
        io.flush().await.unwrap();
        io.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"held");
    }

    #[tokio::test]
    async fn a_peer_gone_is_reported_by_the_next_read() {
        let (a, b) = tokio::io::duplex(1 << 10);
        let mut io = Corked::new(a);
        drop(b);
        io.write_all(b"to nobody").await.unwrap();
        io.flush().await.unwrap();
        let mut buf = [0u8; 8];
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
