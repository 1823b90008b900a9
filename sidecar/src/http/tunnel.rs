//! The bytes of an upgraded connection (WebSocket and the like), relayed
//! both ways until either side closes, or, where the connection came from
//! the public side, until neither has sent anything for its idle timeout:
//! a tunnel has no requests to tell a quiet client from a vanished one.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How long an upgraded connection may carry nothing before it is closed:
/// set in a request's extensions by a listener that wants it bounded.
#[derive(Debug, Clone, Copy)]
pub struct TunnelIdle(pub Duration);

/// Relays `a` and `b` until either closes, or nothing has moved either way
/// for `idle` (`None` or zero: no limit). Returns whether it was idle.
pub async fn relay<A, B>(a: &mut A, b: &mut B, idle: Option<Duration>) -> bool
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let Some(idle) = idle.filter(|d| !d.is_zero()) else {
        let _ = tokio::io::copy_bidirectional(a, b).await;
        return false;
    };
    let moved = Arc::new(Moved {
        epoch: Instant::now(),
        last: AtomicU64::new(0),
    });
    let mut a = Ticking {
        io: a,
        moved: moved.clone(),
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut a, b) => false,
        () = moved.quiet_for(idle) => true,
    }
}

/// When bytes last moved, in milliseconds from `epoch`.
struct Moved {
    epoch: Instant,
    last: AtomicU64,
}

impl Moved {
    fn tick(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    async fn quiet_for(&self, idle: Duration) {
        let limit = idle.as_millis() as u64;
        loop {
            let last = self.last.load(Ordering::Relaxed);
            let now = self.epoch.elapsed().as_millis() as u64;
            if now.saturating_sub(last) >= limit {
                return;
            }
            // Sleep until the earliest moment it could be quiet for long enough.
            tokio::time::sleep_until(self.epoch + Duration::from_millis(last + limit)).await;
        }
    }
}

/// One side of the tunnel: every read or write that moves a byte ticks.
/// (Every byte the relay moves is read from one side and written to the
/// other, so watching one side sees both directions.)
struct Ticking<'a, T: ?Sized> {
    io: &'a mut T,
    moved: Arc<Moved>,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Ticking<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved.tick();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Ticking<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut *self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved.tick();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_is_closed_after_its_idle_time_and_traffic_either_way_restarts_it() {
        let (mut client, mut a) = duplex(1024);
        let (mut b, mut server) = duplex(1024);
        let start = Instant::now();
        let relay =
            tokio::spawn(async move { relay(&mut a, &mut b, Some(Duration::from_secs(10))).await });
        // One way at 6 s, the other at 12 s: each restarts the count.
        tokio::time::sleep(Duration::from_secs(6)).await;
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        let ended = tokio::time::timeout(Duration::from_secs(60), relay).await;
        assert!(
            ended.expect("closed within a minute").unwrap(),
            "closed for being idle"
        );
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(22) && took < Duration::from_millis(22_010),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_idle_time_a_tunnel_lasts_until_a_side_closes() {
        let (client, mut a) = duplex(1024);
        let (mut b, server) = duplex(1024);
        let relay = tokio::spawn(async move { relay(&mut a, &mut b, None).await });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!relay.is_finished());
        // Both ways closed: the relay is done, and not for being idle.
        drop((client, server));
        let ended = tokio::time::timeout(Duration::from_secs(60), relay).await;
        assert!(!ended.expect("ended once both sides closed").unwrap());
    }
}
