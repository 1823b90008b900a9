//! Pooled, multiplexed HTTP/2 connections to peer sidecars over mTLS: one
//! connection per (endpoint, identity), shared by every request, so a new
//! app connection costs no new TLS handshake.

use std::collections::HashMap;
use std::net::SocketAddr;

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
}

type Key = (SocketAddr, SpiffeId);

#[derive(Default)]
pub struct MeshPool {
    conns: Mutex<HashMap<Key, SendRequest<Body>>>,
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
        // Held across the connect: concurrent first requests to one endpoint
        // share one connection instead of racing to open several.
        let mut conns = self.conns.lock().await;
        if let Some(s) = conns.get(&key)
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        // Boxed: the handshake's state is large and rare, and inline it
        // would be part of every request's future (copied per request).
        let sender = Box::pin(connect(proxy, addr, identity)).await?;
        conns.insert(key, sender.clone());
        Ok(sender)
    }

    /// Drops a connection that failed so the next request reconnects.
    pub async fn evict(&self, addr: SocketAddr, identity: &SpiffeId) {
        self.conns.lock().await.remove(&(addr, identity.clone()));
    }
}

async fn connect(
    proxy: &Proxy,
    addr: SocketAddr,
    identity: &SpiffeId,
) -> Result<SendRequest<Body>, PoolError> {
    let tls = crate::dial::dial_peer(proxy, addr, identity, crate::tls::ALPN_MESH_H2).await?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(std::time::Duration::from_secs(20))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .max_header_list_size(64 * 1024)
        .handshake(TokioIo::new(super::cork::Corked::new(tls)))
        .await
        .map_err(|e| PoolError::H2(addr, e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = ?e, "pooled HTTP/2 connection closed");
        }
    });
    tracing::debug!(%addr, peer = %identity, "pooled HTTP/2 connection opened");
    Ok(sender)
}
