//! HTTP/1.1 connections to the local app (the pod address and port a peer
//! dialled, from `APP_SOURCE`), kept open and reused. HTTP/1.1 carries one
//! exchange at a time, so a connection goes back to its address's idle
//! stack when its response has been read to the end, and the most recently
//! used one is taken first: a steady load keeps reusing a few warm
//! connections. The app is always in the pod,
//! so none of a general-purpose client pool's work (DNS, TLS, proxies,
//! racing connects, per-request pool futures) is needed on this path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use super::{Body, BoxError};

/// An idle connection is closed after this long unused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per app address; a burst wider than this opens
/// connections that close when their exchange ends.
pub const MAX_IDLE_PER_PORT: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The app refused or did not take the connection (not listening).
    #[error("connect to the app on {0}: {1}")]
    Connect(SocketAddr, BoxError),
    /// The exchange failed once connected (reset, malformed answer).
    #[error("exchange with the app on {0}: {1}")]
    Exchange(SocketAddr, BoxError),
}

impl AppError {
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(..))
    }

    /// The connect failed because the address is not this pod's: from the
    /// loopback hand-off source the kernel refuses any other destination
    /// (`EINVAL`). The peer dialled an address routed to this pod that the
    /// pod does not own; the sidecar is not a router, so it goes no further.
    pub fn is_not_local(&self) -> bool {
        let Self::Connect(_, e) = self else {
            return false;
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                return io.kind() == std::io::ErrorKind::InvalidInput;
            }
            cause = c.source();
        }
        false
    }
}

struct Idle {
    tx: SendRequest<Body>,
    since: Instant,
}

#[derive(Default)]
struct Stacks {
    by_addr: HashMap<SocketAddr, Vec<Idle>>,
    sweeper: bool,
}

/// The pool of app connections, per app address.
#[derive(Default)]
pub struct AppPool {
    stacks: Mutex<Stacks>,
}

impl AppPool {
    /// Sends `req` (origin-form URI, `Host` set) to the app at `app` over
    /// an idle connection, or a new one. A request that an idle connection
    /// could not take (the app had just closed it) is sent again on another.
    pub async fn send(
        self: &Arc<Self>,
        app: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, AppError> {
        loop {
            let (mut tx, reused) = match self.checkout(app) {
                Some(tx) => (tx, true),
                None => (connect(app).await?, false),
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let body = CheckIn {
                        body,
                        home: Some((Arc::downgrade(self), app, tx)),
                    };
                    return Ok(Response::from_parts(parts, Body::new(body)));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: a reused connection the app closed
                    // while idle. A fresh one failing this way is final.
                    Some(r) if reused => req = r,
                    _ => return Err(AppError::Exchange(app, e.into_error().into())),
                },
            }
        }
    }

    /// The most recently used idle connection to `app` that is still open
    /// and ready for a request.
    fn checkout(&self, app: SocketAddr) -> Option<SendRequest<Body>> {
        loop {
            let idle = {
                let mut s = self.stacks.lock().unwrap_or_else(|p| p.into_inner());
                s.by_addr.get_mut(&app)?.pop()?
            };
            // Only ready connections are stacked; one that is not ready any
            // more has been closed.
            if idle.tx.is_ready() && !idle.tx.is_closed() {
                return Some(idle.tx);
            }
        }
    }

    /// Stacks `tx` once it can take the next request. Usually it can when
    /// its response ends; not when the app answered before the request's
    /// body was all sent (an early 401 or 413 to an upload), which then
    /// still goes on: waited for off the request path, so that no request
    /// ever queues behind another's upload.
    fn check_in(self: Arc<Self>, app: SocketAddr, mut tx: SendRequest<Body>) {
        if tx.is_closed() {
            return;
        }
        if !tx.is_ready() {
            let pool = Arc::downgrade(&self);
            tokio::spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(IDLE_TIMEOUT, tx.ready()).await
                    && let Some(pool) = pool.upgrade()
                {
                    pool.stack(app, tx);
                }
            });
            return;
        }
        self.stack(app, tx);
    }

    fn stack(self: Arc<Self>, app: SocketAddr, tx: SendRequest<Body>) {
        let start_sweeper = {
            let mut s = self.stacks.lock().unwrap_or_else(|p| p.into_inner());
            let stack = s.by_addr.entry(app).or_default();
            if stack.len() >= MAX_IDLE_PER_PORT {
                return;
            }
            stack.push(Idle {
                tx,
                since: Instant::now(),
            });
            !std::mem::replace(&mut s.sweeper, true)
        };
        if start_sweeper {
            tokio::spawn(sweep(Arc::downgrade(&self)));
        }
    }

    /// Closes the connections idle for longer than `max_idle`.
    fn close_idle(&self, max_idle: Duration) {
        let now = Instant::now();
        let mut s = self.stacks.lock().unwrap_or_else(|p| p.into_inner());
        for stack in s.by_addr.values_mut() {
            // Oldest first: the stack is in check-in order.
            let stale = stack
                .iter()
                .take_while(|i| now.duration_since(i.since) > max_idle)
                .count();
            stack.drain(..stale);
        }
        s.by_addr.retain(|_, stack| !stack.is_empty());
    }

    /// Idle connections to `app` (for tests and metrics).
    pub fn idle(&self, app: SocketAddr) -> usize {
        let s = self.stacks.lock().unwrap_or_else(|p| p.into_inner());
        s.by_addr.get(&app).map_or(0, Vec::len)
    }
}

/// Closes stale idle connections until the pool is gone.
async fn sweep(pool: Weak<AppPool>) {
    let mut tick = tokio::time::interval(IDLE_TIMEOUT / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.close_idle(IDLE_TIMEOUT);
    }
}

async fn connect(app: SocketAddr) -> Result<SendRequest<Body>, AppError> {
    // With TCP_NODELAY: small exchanges go out at once, not after delayed ACKs.
    let tcp = crate::intercept::connect_app(app)
        .await
        .map_err(|e| AppError::Connect(app, e.into()))?;
    let (tx, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| AppError::Exchange(app, e.into()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%app, error = %e, "app connection closed");
        }
    });
    Ok(tx)
}

/// Dials the app for the HTTP/2 client as every other hand-off to the app
/// is dialled ([`crate::intercept::connect_app`]): from `APP_SOURCE`, with
/// the source port chosen at `connect`. The request URI's authority is the
/// app's address.
#[derive(Clone, Copy, Debug, Default)]
pub struct AppConnector;

impl tower::Service<http::Uri> for AppConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let app = uri
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        Box::pin(async move {
            let app = app.ok_or_else(|| {
                std::io::Error::other(format!("app URI {uri} has no socket address"))
            })?;
            crate::intercept::connect_app(app).await.map(TokioIo::new)
        })
    }
}

/// A response body that gives its connection back to the pool once it has
/// been read to the end. Dropped before that, the connection is dropped
/// too: what is left of the response would be in the way of the next one.
struct CheckIn {
    body: Incoming,
    home: Option<(Weak<AppPool>, SocketAddr, SendRequest<Body>)>,
}

impl CheckIn {
    fn done(&mut self) {
        if let Some((pool, app, tx)) = self.home.take()
            && let Some(pool) = pool.upgrade()
        {
            pool.check_in(app, tx);
        }
    }
}

impl hyper::body::Body for CheckIn {
    type Data = hyper::body::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.body).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.done(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.done(),
            Poll::Ready(Some(Err(_))) => this.home = None,
            _ => {}
        }
        r.map_err(|e| -> BoxError { Box::new(e) })
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for CheckIn {
    fn drop(&mut self) {
        // A body without content (204, HEAD, `content-length: 0`) is never
        // polled: it is complete already.
        if self.body.is_end_stream() {
            self.done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn get(path: &str) -> Request<Body> {
        Request::get(path)
            .header("host", "app")
            .body(super::super::full(""))
            .unwrap()
    }

    /// An app answering `n` keep-alive requests per connection, then
    /// closing; counts the connections it accepted.
    async fn app(per_conn: usize) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..per_conn {
                        loop {
                            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                buf.drain(..end + 4);
                                break;
                            }
                            let mut chunk = [0u8; 1024];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn body_of(r: Response<Body>) -> String {
        let b = r.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_is_read() {
        let (addr, accepted) = app(100).await;
        let pool = Arc::new(AppPool::default());
        for _ in 0..5 {
            let r = pool.send(addr, get("/")).await.unwrap();
            assert_eq!(body_of(r).await, "ok");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(pool.idle(addr), 1);
    }

    #[tokio::test]
    async fn a_response_dropped_unread_does_not_return_its_connection() {
        let (addr, accepted) = app(100).await;
        let pool = Arc::new(AppPool::default());
        let held = pool.send(addr, get("/")).await.unwrap();
        // The first response is still unread: a second request needs a
        // second connection.
        let r = pool.send(addr, get("/")).await.unwrap();
        assert_eq!(body_of(r).await, "ok");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        drop(held);
        assert_eq!(pool.idle(addr), 1);
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_while_idle_is_replaced_without_an_error() {
        // One request per connection, then the app closes it.
        let (addr, accepted) = app(1).await;
        let pool = Arc::new(AppPool::default());
        for _ in 0..4 {
            let r = pool.send(addr, get("/")).await.unwrap();
            assert_eq!(body_of(r).await, "ok");
            // Until the close has reached the idle connection.
            let closed = || {
                let s = pool.stacks.lock().unwrap();
                s.by_addr
                    .get(&addr)
                    .is_none_or(|st| st.iter().all(|i| i.tx.is_closed()))
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            while !closed() {
                assert!(Instant::now() < deadline, "the app's close was never seen");
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    /// An app that answers 413 as soon as it has a request's headers,
    /// without reading its body.
    async fn early_answering_app() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    // Keep the connection (and the unread upload) open.
                    let mut sink = [0u8; 1024];
                    while s.read(&mut sink).await.unwrap_or(0) > 0 {}
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_request_never_waits_behind_another_s_unfinished_upload() {
        use tokio_stream::StreamExt;
        let addr = early_answering_app().await;
        let pool = Arc::new(AppPool::default());
        // An upload that never ends, answered early.
        let endless = tokio_stream::iter([Ok::<_, BoxError>(Frame::data(
            hyper::body::Bytes::from_static(b"x"),
        ))])
        .chain(tokio_stream::pending());
        let upload = Request::post("/upload")
            .header("host", "app")
            .body(Body::new(http_body_util::StreamBody::new(endless)))
            .unwrap();
        let r = pool.send(addr, upload).await.unwrap();
        assert_eq!(r.status(), 413);
        body_of(r).await;
        let next = tokio::time::timeout(Duration::from_secs(5), pool.send(addr, get("/")));
        let r = next
            .await
            .expect("the next request waited on the upload's connection");
        assert_eq!(r.unwrap().status(), 413);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let pool = Arc::new(AppPool::default());
        let e = pool.send(addr, get("/")).await.unwrap_err();
        assert!(e.is_connect(), "{e}");
    }

    #[tokio::test]
    async fn idle_connections_past_the_timeout_are_closed() {
        let (addr, _) = app(100).await;
        let pool = Arc::new(AppPool::default());
        let r = pool.send(addr, get("/")).await.unwrap();
        body_of(r).await;
        assert_eq!(pool.idle(addr), 1);
        pool.close_idle(Duration::from_secs(3600));
        assert_eq!(pool.idle(addr), 1);
        pool.close_idle(Duration::ZERO);
        assert_eq!(pool.idle(addr), 0);
    }
}
