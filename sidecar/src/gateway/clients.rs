//! What the gateway knows of a client before it authenticates: its address.
//! Connections are budgeted per client ([`ClientSlots`]) so that one client
//! cannot hold every slot of `--max-connections` (open connections cost
//! nothing to keep, and the TLS handshake and the request's token come
//! later), and a connection with nothing in flight is closed after an idle
//! timeout ([`Activity`]), which keep-alive pings would otherwise extend
//! forever.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// The address a client is counted by: IPv4 as is, IPv6 by its /64 (one
/// host usually holds a whole /64, and would otherwise get a budget per
/// address it cares to use). An IPv4-mapped address counts as IPv4.
pub fn client_block(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

/// Open connections per client, capped.
#[derive(Debug)]
pub struct ClientSlots {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in its client's budget, given back on drop.
#[derive(Debug)]
pub struct ClientSlot {
    slots: Arc<ClientSlots>,
    client: IpAddr,
}

impl ClientSlots {
    /// At most `max` connections per client; 0 means no per-client cap.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            held: Mutex::default(),
        })
    }

    /// A slot for a connection from `ip`, or `None` when its client already
    /// holds `max`.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let client = client_block(ip);
        let mut held = self.lock();
        let n = held.entry(client).or_default();
        if self.max > 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            slots: self.clone(),
            client,
        })
    }

    /// Connections `ip`'s client holds.
    pub fn held(&self, ip: IpAddr) -> usize {
        self.lock().get(&client_block(ip)).copied().unwrap_or(0)
    }

    /// Clients holding at least one connection.
    pub fn clients(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Counts are changed in place under the lock and stay consistent
        // even if a holder panicked.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut held = self.slots.lock();
        if let Some(n) = held.get_mut(&self.client) {
            *n -= 1;
            // Only clients with open connections take memory.
            if *n == 0 {
                held.remove(&self.client);
            }
        }
    }
}

/// Requests in flight on one connection, for its idle timeout.
#[derive(Debug)]
pub struct Activity {
    in_flight: watch::Sender<usize>,
}

/// One request in flight, until its response has been sent whole (or
/// dropped): see [`Answering`].
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

/// A response body that keeps its request counted in flight until it ends,
/// so that a long download is never taken for an idle connection.
pub struct Answering {
    body: crate::http::Body,
    busy: Option<Busy>,
}

impl Answering {
    pub fn new(body: crate::http::Body, busy: Busy) -> Self {
        Self {
            body,
            busy: Some(busy),
        }
    }
}

impl hyper::body::Body for Answering {
    type Data = hyper::body::Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.busy = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: watch::Sender::new(0),
        })
    }

    pub fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.send_modify(|n| *n += 1);
        Busy(self.clone())
    }

    /// Resolves once the connection has had nothing in flight for
    /// `timeout`; never, for a zero `timeout` (no idle timeout).
    pub async fn idle_for(&self, timeout: Duration) {
        if timeout.is_zero() {
            return std::future::pending().await;
        }
        let mut rx = self.in_flight.subscribe();
        loop {
            // The sender lives in `self`: these cannot fail.
            let _ = rx.wait_for(|n| *n == 0).await;
            match tokio::time::timeout(timeout, rx.changed()).await {
                Err(_) => return,
                Ok(_) => continue,
            }
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|n| *n -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_max_slots_and_each_one_comes_back() {
        let slots = ClientSlots::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = slots.try_acquire(a).unwrap();
        let _second = slots.try_acquire(a).unwrap();
        assert!(
            slots.try_acquire(a).is_none(),
            "a third from the same client"
        );
        let _other = slots
            .try_acquire(b)
            .expect("another client has its own budget");
        drop(first);
        assert_eq!(slots.held(a), 1);
        let _again = slots
            .try_acquire(a)
            .expect("a slot given back is free again");
        assert!(slots.try_acquire(a).is_none());
    }

    #[test]
    fn a_client_that_leaves_takes_no_memory() {
        let slots = ClientSlots::new(4);
        let held: Vec<_> = (1..=3)
            .map(|i| slots.try_acquire(IpAddr::from([192, 0, 2, i])).unwrap())
            .collect();
        assert_eq!(slots.clients(), 3);
        drop(held);
        assert_eq!(slots.clients(), 0);
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64_and_a_mapped_ipv4_as_ipv4() {
        let slots = ClientSlots::new(1);
        let _a = slots
            .try_acquire("2001:db8:1:2::1".parse().unwrap())
            .unwrap();
        assert!(
            slots
                .try_acquire("2001:db8:1:2:ffff::9".parse().unwrap())
                .is_none(),
            "another address of the same /64"
        );
        assert!(
            slots
                .try_acquire("2001:db8:1:3::1".parse().unwrap())
                .is_some()
        );
        let _v4 = slots.try_acquire("192.0.2.7".parse().unwrap()).unwrap();
        assert!(
            slots
                .try_acquire("::ffff:192.0.2.7".parse().unwrap())
                .is_none()
        );
    }

    #[test]
    fn zero_means_no_per_client_cap() {
        let slots = ClientSlots::new(0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let held: Vec<_> = (0..1000).map(|_| slots.try_acquire(ip).unwrap()).collect();
        assert_eq!(slots.held(ip), held.len());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_answer_and_not_while_a_request_is_in_flight() {
        let activity = Activity::new();
        let start = tokio::time::Instant::now();
        let busy = activity.begin();
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(Duration::from_secs(10)).await }
        });
        // A request in flight for 30 s: not idle meanwhile.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!idle.is_finished());
        drop(busy);
        idle.await.unwrap();
        // Timers tick in whole milliseconds.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(40) && took < Duration::from_millis(40_010),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_is_in_flight_until_its_response_body_ends() {
        use http_body_util::BodyExt;
        let activity = Activity::new();
        let body = Answering::new(crate::http::full("answer"), activity.begin());
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!idle.is_finished(), "idle while the response was unsent");
        let sent = tokio::time::Instant::now();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "answer");
        idle.await.unwrap();
        let took = sent.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took < Duration::from_millis(10_010),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_idle_timeout_never_fires() {
        let activity = Activity::new();
        let idle =
            tokio::time::timeout(Duration::from_secs(3600), activity.idle_for(Duration::ZERO));
        assert!(idle.await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_request_restarts_the_idle_timer() {
        let activity = Activity::new();
        let start = tokio::time::Instant::now();
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_secs(6)).await;
        drop(activity.begin());
        idle.await.unwrap();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(16) && took < Duration::from_millis(16_010),
            "{took:?}"
        );
    }
}
