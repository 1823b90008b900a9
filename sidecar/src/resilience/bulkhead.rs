//! Bulkhead: at most `max_active` requests to a service at once and at most
//! `max_pending` waiting; beyond that, reject at once (never queue without
//! bound, never let one slow service take every connection).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Longest a request waits in a bulkhead queue unless configured.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Bulkhead {
    active: Arc<Semaphore>,
    pending: AtomicUsize,
    max_pending: usize,
    queue_timeout: Duration,
}

/// Why a request was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

impl Bulkhead {
    /// `max_active == 0` means unlimited; queued requests wait at most
    /// `queue_timeout`.
    pub fn new(max_active: usize, max_pending: usize, queue_timeout: Duration) -> Self {
        let n = if max_active == 0 {
            Semaphore::MAX_PERMITS
        } else {
            max_active
        };
        Self {
            active: Arc::new(Semaphore::new(n)),
            pending: AtomicUsize::new(0),
            max_pending,
            queue_timeout,
        }
    }

    /// A slot, waiting only if fewer than `max_pending` already wait.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, Full> {
        if let Ok(p) = self.active.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Full);
        }
        // Bounded wait too: a queued request that cannot start soon is
        // better answered now than after its caller gave up.
        let r = match tokio::time::timeout(self.queue_timeout, self.active.clone().acquire_owned())
            .await
        {
            Ok(Ok(p)) => Ok(p),
            _ => Err(Full),
        };
        self.pending.fetch_sub(1, Ordering::AcqRel);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rejects_beyond_active_plus_pending() {
        let b = Arc::new(Bulkhead::new(1, 1, QUEUE_TIMEOUT));
        let first = b.acquire().await.unwrap();
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.acquire().await.map(|_| ()) });
        // The waiter is queued (pending = 1); wait until it is.
        while b.pending.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(b.acquire().await.err(), Some(Full), "queue is full");
        drop(first);
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_request_gives_up_after_the_queue_timeout() {
        let b = Bulkhead::new(1, 1, Duration::from_millis(250));
        let _held = b.acquire().await.unwrap();
        let t = tokio::time::Instant::now();
        assert_eq!(b.acquire().await.err(), Some(Full));
        assert_eq!(t.elapsed(), Duration::from_millis(250));
        assert_eq!(
            b.pending.load(Ordering::Acquire),
            0,
            "the queue place is given back"
        );
    }
}
