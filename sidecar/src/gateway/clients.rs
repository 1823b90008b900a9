//! What the gateway knows of a client before it authenticates: its address.
//! Connections are budgeted per client ([`ClientSlots`]) so that one client
//! cannot hold every slot of `--max-connections` (open connections cost
//! nothing to keep, and the TLS handshake and the request's token come
//! later), and a connection with nothing in flight is closed after an idle
//! timeout ([`Activity`]), which keep-alive pings would otherwise extend
//! forever; one whose client stalls (stops sending a request body it
//! started, or stops reading its response) is dropped after the same time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

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

/// What one connection is doing, for its timeouts: requests in flight (the
/// idle timeout counts only without any), and what it waits on from its
/// client (a stall: the next bytes of a request body the upstream is
/// reading, or room for the response's next bytes).
#[derive(Debug)]
pub struct Activity {
    in_flight: watch::Sender<usize>,
    epoch: Instant,
    waits: Mutex<Vec<Weak<Wait>>>,
}

/// One request in flight, until its response has been sent whole (or
/// dropped): see [`Answering`].
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

/// Since when a body has waited on the client, in milliseconds from its
/// connection's epoch ([`NOT_WAITING`]: it does not).
#[derive(Debug)]
pub struct Wait {
    epoch: Instant,
    since: AtomicU64,
}

const NOT_WAITING: u64 = u64::MAX;

impl Wait {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Waiting from now, unless already waiting.
    fn start(&self) {
        if self.since.load(Ordering::Relaxed) == NOT_WAITING {
            self.since.store(self.now(), Ordering::Relaxed);
        }
    }

    /// Waiting, counted from now.
    fn restart(&self) {
        self.since.store(self.now(), Ordering::Relaxed);
    }

    fn stop(&self) {
        self.since.store(NOT_WAITING, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted in flight until it ends,
/// so that a long download is never taken for an idle connection. Between
/// handing a frame on and being asked for the next one, it waits on the
/// client: a client that stops reading leaves it there (a stall). hyper
/// serves it as it is: boxing it again would cost an allocation a response.
pub struct Answering {
    body: crate::http::Body,
    busy: Option<Busy>,
    wait: Option<Arc<Wait>>,
}

impl Answering {
    pub fn new(body: crate::http::Body, busy: Busy) -> Self {
        let wait = busy.0.wait();
        Self {
            body,
            busy: Some(busy),
            wait: Some(wait),
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
        // Asked again: the client took what came before (or room for it).
        if let Some(w) = &self.wait {
            w.stop();
        }
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(_))) => {
                if let Some(w) = &self.wait {
                    w.restart();
                }
            }
            std::task::Poll::Ready(None | Some(Err(_))) => {
                self.busy = None;
                self.wait = None;
            }
            // Waiting on the upstream, not on the client.
            std::task::Poll::Pending => {}
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

/// A request body streamed to the upstream: while the upstream asks for
/// bytes the client has not sent, it waits on the client (a stall, when
/// that lasts). Only a body of announced length: one of unknown length
/// (gRPC, a chunked stream) may be quiet for good reasons, and the
/// upstream's HTTP/2 client asks for its next bytes whether or not it
/// needs them to answer.
pub struct Uploading<B> {
    body: B,
    wait: Option<Arc<Wait>>,
}

impl<B: hyper::body::Body + Unpin> Uploading<B> {
    pub fn new(body: B, activity: &Arc<Activity>) -> Self {
        let announced = body.size_hint().exact().is_some_and(|n| n > 0);
        let wait = (announced && !body.is_end_stream()).then(|| activity.wait());
        Self { body, wait }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Uploading<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Pending => {
                if let Some(w) = &self.wait {
                    w.start();
                }
            }
            std::task::Poll::Ready(Some(Ok(_))) => {
                if let Some(w) = &self.wait {
                    w.stop();
                }
            }
            std::task::Poll::Ready(None | Some(Err(_))) => self.wait = None,
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
            epoch: Instant::now(),
            waits: Mutex::new(Vec::new()),
        })
    }

    pub fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.send_modify(|n| *n += 1);
        Busy(self.clone())
    }

    fn wait(&self) -> Arc<Wait> {
        let w = Arc::new(Wait {
            epoch: self.epoch,
            since: AtomicU64::new(NOT_WAITING),
        });
        let mut waits = self.waits.lock().unwrap_or_else(|p| p.into_inner());
        waits.retain(|w| w.strong_count() > 0);
        waits.push(Arc::downgrade(&w));
        w
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

    /// Resolves once a body has waited on the client for `timeout` (checked
    /// every quarter of it, so within 1.25 × `timeout`); never, for zero.
    pub async fn stalled_for(&self, timeout: Duration) {
        if timeout.is_zero() {
            return std::future::pending().await;
        }
        let limit = timeout.as_millis() as u64;
        let mut tick = tokio::time::interval((timeout / 4).max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = self.epoch.elapsed().as_millis() as u64;
            let waits = self.waits.lock().unwrap_or_else(|p| p.into_inner());
            let stalled = waits.iter().filter_map(Weak::upgrade).any(|w| {
                let since = w.since.load(Ordering::Relaxed);
                since != NOT_WAITING && now.saturating_sub(since) >= limit
            });
            if stalled {
                return;
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

    /// Resolves when `activity` has been idle for `secs`.
    fn idle_after(activity: &Arc<Activity>, secs: u64) -> tokio::task::JoinHandle<()> {
        let activity = activity.clone();
        tokio::spawn(async move { activity.idle_for(Duration::from_secs(secs)).await })
    }

    /// Resolves when something on `activity` has waited on the client for `secs`.
    fn stall_after(activity: &Arc<Activity>, secs: u64) -> tokio::task::JoinHandle<()> {
        let activity = activity.clone();
        tokio::spawn(async move { activity.stalled_for(Duration::from_secs(secs)).await })
    }

    /// That `from` was between `at_least` and `below` ago.
    fn assert_took(from: Instant, at_least: Duration, below: Duration) {
        let took = from.elapsed();
        assert!(took >= at_least && took < below, "{took:?}");
    }

    /// Timers tick in whole milliseconds: `secs`, give or take that.
    fn assert_took_secs(from: Instant, secs: u64) {
        assert_took(
            from,
            Duration::from_secs(secs),
            Duration::from_millis(secs * 1000 + 10),
        );
    }

    /// That `stall` (10 s) fires, between 10 s after `from` and a check
    /// later (every quarter of the timeout).
    async fn assert_stalls_10s_after(stall: tokio::task::JoinHandle<()>, from: Instant) {
        let stalled = tokio::time::timeout(Duration::from_secs(60), stall).await;
        stalled.expect("a stall within a minute").unwrap();
        assert_took(from, Duration::from_secs(10), Duration::from_millis(12_510));
    }

    /// A body whose frames arrive when a test sends them, announcing its
    /// length (like a Content-Length) or not.
    struct Sent(tokio::sync::mpsc::Receiver<&'static str>, Option<u64>);

    impl hyper::body::Body for Sent {
        type Data = hyper::body::Bytes;
        type Error = crate::http::BoxError;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|f| f.map(|s| Ok(hyper::body::Frame::data(s.into()))))
        }

        fn size_hint(&self) -> hyper::body::SizeHint {
            self.1
                .map(hyper::body::SizeHint::with_exact)
                .unwrap_or_default()
        }
    }

    /// A body of `announced` bytes (`None`: unknown) and its sender.
    fn sent(announced: Option<u64>) -> (tokio::sync::mpsc::Sender<&'static str>, Sent) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        (tx, Sent(rx, announced))
    }

    async fn next_data<B>(body: &mut B) -> String
    where
        B: hyper::body::Body<Data = hyper::body::Bytes> + Unpin,
        B::Error: std::fmt::Debug,
    {
        use http_body_util::BodyExt;
        let frame = body.frame().await.expect("a frame").expect("data");
        String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
    }

    /// `body` is asked for its next frame; "part" is sent `secs` later and
    /// must be what the asker gets.
    async fn part_asked_for<B>(
        mut body: B,
        tx: &tokio::sync::mpsc::Sender<&'static str>,
        secs: u64,
    ) -> B
    where
        B: hyper::body::Body<Data = hyper::body::Bytes> + Unpin + Send + 'static,
        B::Error: std::fmt::Debug,
    {
        let next = tokio::spawn(async move {
            let got = next_data(&mut body).await;
            (body, got)
        });
        tokio::time::sleep(Duration::from_secs(secs)).await;
        tx.send("part").await.unwrap();
        let (body, got) = next.await.unwrap();
        assert_eq!(got, "part");
        body
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_answer_and_not_while_a_request_is_in_flight() {
        let activity = Activity::new();
        let start = Instant::now();
        let busy = activity.begin();
        let idle = idle_after(&activity, 10);
        // A request in flight for 30 s: not idle meanwhile.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!idle.is_finished());
        drop(busy);
        idle.await.unwrap();
        assert_took_secs(start, 40);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_is_in_flight_until_its_response_body_ends() {
        use http_body_util::BodyExt;
        let activity = Activity::new();
        let body = Answering::new(crate::http::full("answer"), activity.begin());
        let idle = idle_after(&activity, 10);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!idle.is_finished(), "idle while the response was unsent");
        let sent = Instant::now();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "answer");
        idle.await.unwrap();
        assert_took_secs(sent, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_idle_timeout_never_fires() {
        let activity = Activity::new();
        let idle =
            tokio::time::timeout(Duration::from_secs(3600), activity.idle_for(Duration::ZERO));
        assert!(idle.await.is_err());
        let stall = tokio::time::timeout(
            Duration::from_secs(3600),
            activity.stalled_for(Duration::ZERO),
        );
        assert!(stall.await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_request_restarts_the_idle_timer() {
        let activity = Activity::new();
        let start = Instant::now();
        let idle = idle_after(&activity, 10);
        tokio::time::sleep(Duration::from_secs(6)).await;
        drop(activity.begin());
        idle.await.unwrap();
        assert_took_secs(start, 16);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_body_the_client_stops_sending_is_a_stall() {
        let activity = Activity::new();
        let (tx, body) = sent(Some(100));
        let mut body = Uploading::new(body, &activity);
        let stall = stall_after(&activity, 10);
        // The upstream waits for each part; the client sends one every 8 s.
        for _ in 0..5 {
            body = part_asked_for(body, &tx, 8).await;
        }
        assert!(!stall.is_finished(), "a steady client stalled");
        // Then the upstream asks for more and none comes.
        let asked = Instant::now();
        let _waiting = tokio::spawn(async move { next_data(&mut body).await });
        assert_stalls_10s_after(stall, asked).await;
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_that_reads_slowly_or_a_finished_body_is_no_stall() {
        let activity = Activity::new();
        let (tx, body) = sent(Some(100));
        let mut body = Uploading::new(body, &activity);
        let stall = stall_after(&activity, 10);
        // The client has sent; the upstream takes a minute to read it.
        tx.send("part").await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(next_data(&mut body).await, "part");
        drop(tx);
        use http_body_util::BodyExt;
        assert!(body.frame().await.is_none());
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!stall.is_finished());
        // A request without a body waits on nothing.
        let _empty = Uploading::new(crate::http::full(""), &activity);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!stall.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_stream_of_unknown_length_is_no_stall() {
        // A gRPC stream whose client sends one message, then listens.
        let activity = Activity::new();
        let (tx, body) = sent(None);
        let mut body = Uploading::new(body, &activity);
        let stall = stall_after(&activity, 10);
        tx.send("hello").await.unwrap();
        assert_eq!(next_data(&mut body).await, "hello");
        let _waiting = tokio::spawn(async move { next_data(&mut body).await });
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!stall.is_finished());
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_the_client_does_not_take_is_a_stall_but_a_slow_upstream_is_not() {
        use http_body_util::BodyExt;
        let activity = Activity::new();
        let (tx, body) = sent(None);
        let mut body = Answering::new(body.boxed(), activity.begin());
        let stall = stall_after(&activity, 10);
        // The upstream answers a part a minute: hyper waits on it, not on
        // the client.
        for _ in 0..3 {
            body = part_asked_for(body, &tx, 60).await;
            assert!(!stall.is_finished(), "a slow upstream taken for a stall");
        }
        // Then hyper never comes back for more: the client is not reading.
        let handed = Instant::now();
        assert_stalls_10s_after(stall, handed).await;
        drop(body);
    }
}
