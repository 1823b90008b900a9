//! Pooled, multiplexed HTTP/2 connections to peer sidecars over mTLS: one
//! connection per (endpoint, identity), shared by every request, so a new
//! app connection costs no new TLS handshake.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bulwark_ca::SpiffeId;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Mutex;

use super::Body;
use crate::Proxy;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Dial(#[from] crate::dial::DialError),
    #[error("HTTP/2 handshake with {0} failed: {1}")]
    H2(SocketAddr, String),
    #[error("connecting to {0} failed while this request waited for it: {1}")]
    Failed(SocketAddr, String),
    #[error("the certificate {0} presented has no readable expiry")]
    NoExpiry(SocketAddr),
}

type Key = (SocketAddr, SpiffeId);
/// One endpoint's connection, or nothing yet. Its own lock is held across
/// a connect, so that concurrent first requests to the endpoint share one
/// connection, while requests to other endpoints go on: one endpoint that
/// drops SYNs or stalls its handshake must not hold up every service.
type Slot = Arc<Mutex<SlotState>>;

/// A pooled connection. It takes new requests until `fresh_until` (see
/// [`crate::tls::REUSE_MARGIN`]), and while this sidecar's SVID is the one
/// it was made with (`generation`): once renewed, new requests go on a new
/// connection with the new certificate, and in-flight ones finish here.
struct Pooled {
    sender: SendRequest<Body>,
    fresh_until: tokio::time::Instant,
    generation: u64,
}

#[derive(Default)]
struct SlotState {
    conn: Option<Pooled>,
    /// The last connect's failure: the requests that queued behind it
    /// share it instead of each waiting out a connect of their own.
    failed: Option<(Instant, String)>,
}

#[derive(Default)]
pub struct MeshPool {
    conns: std::sync::Mutex<HashMap<Key, Slot>>,
}

impl MeshPool {
    /// A ready sender to `addr`, verified to be `identity`; connects if needed.
    pub async fn get(
        &self,
        proxy: &Proxy,
        addr: SocketAddr,
        identity: &SpiffeId,
    ) -> Result<SendRequest<Body>, PoolError> {
        let key = (addr, identity.clone());
        let slot = self.slot(&key);
        let asked = Instant::now();
        let mut state = slot.lock().await;
        if let Some(p) = state.conn.as_ref()
            && !p.sender.is_closed()
            && p.generation == proxy.identity.generation()
            && tokio::time::Instant::now() < p.fresh_until
        {
            return Ok(p.sender.clone());
        }
        if let Some((at, why)) = &state.failed
            && *at >= asked
        {
            return Err(PoolError::Failed(addr, why.clone()));
        }
        // Boxed: the handshake's state is large and rare, and inline it
        // would be part of every request's future (copied per request).
        match Box::pin(connect(proxy, addr, identity)).await {
            Ok(pooled) => {
                let sender = pooled.sender.clone();
                state.conn = Some(pooled);
                state.failed = None;
                Ok(sender)
            }
            Err(e) => {
                state.failed = Some((Instant::now(), e.to_string()));
                let idle = state.conn.is_none();
                drop(state);
                // No slot kept for an endpoint that never answered, once
                // no request waits on it.
                if idle && Arc::strong_count(&slot) == 2 {
                    self.remove_if(&key, &slot);
                }
                Err(e)
            }
        }
    }

    /// Drops a connection that failed so the next request reconnects.
    pub async fn evict(&self, addr: SocketAddr, identity: &SpiffeId) {
        self.lock().remove(&(addr, identity.clone()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, key: &Key) -> Slot {
        let mut conns = self.lock();
        if let Some(s) = conns.get(key) {
            return s.clone();
        }
        conns.entry(key.clone()).or_default().clone()
    }

    fn remove_if(&self, key: &Key, slot: &Slot) {
        let mut conns = self.lock();
        if conns.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            conns.remove(key);
        }
    }
}

/// A new connection, taking new requests until shortly before the first
/// expiry of the certificates of its handshake (the peer's, and the one
/// this sidecar presented), and closed at it.
async fn connect(
    proxy: &Proxy,
    addr: SocketAddr,
    identity: &SpiffeId,
) -> Result<Pooled, PoolError> {
    // Read before the handshake: a renewal during it retires this
    // connection, and the certificate it presented expires no later.
    let generation = proxy.identity.generation();
    let own_expiry = proxy.identity.svid().map(|own| own.not_after);
    let tls = crate::dial::dial_peer(proxy, addr, identity, crate::tls::ALPN_MESH_H2).await?;
    let peer_expiry = crate::tls::peer_expiry(tls.get_ref().1).ok_or(PoolError::NoExpiry(addr))?;
    let expires = match own_expiry {
        Some(own) => peer_expiry.min(crate::tls::deadline_at(own)),
        None => peer_expiry,
    };
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(std::time::Duration::from_secs(20))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .max_header_list_size(64 * 1024)
        .handshake(TokioIo::new(super::cork::Corked::new(tls)))
        .await
        .map_err(|e| PoolError::H2(addr, e.to_string()))?;
    tokio::spawn(async move {
        match tokio::time::timeout_at(expires, conn).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(%addr, error = ?e, "pooled HTTP/2 connection closed"),
            Err(_) => {
                tracing::debug!(%addr, "pooled HTTP/2 connection closed: a certificate of its handshake expired")
            }
        }
    });
    tracing::debug!(%addr, peer = %identity, "pooled HTTP/2 connection opened");
    // A peer whose certificate is about to expire (its renewal failing)
    // still gets a second's reuse: not a handshake per request.
    let now = tokio::time::Instant::now();
    let fresh_until = crate::tls::before(expires, crate::tls::REUSE_MARGIN)
        .max((now + std::time::Duration::from_secs(1)).min(expires));
    Ok(Pooled {
        sender,
        fresh_until,
        generation,
    })
}
