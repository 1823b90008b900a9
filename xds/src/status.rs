//! What operators see: each connected sidecar, what it holds of each type,
//! its last NACK, and whether the mesh has converged on the current
//! snapshot. Served as JSON at `GET /status` on the admin port (see
//! [`crate::admin`]) and read back by `bulwark xds status` with [`fetch`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

use crate::registry::Workload;
use crate::snapshot::{Snapshot, kind_of};
use crate::stream::StreamState;

/// How long [`fetch`] waits for the admin endpoint.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest admin response [`fetch`] reads.
pub const MAX_FETCH_BYTES: usize = 64 * 1024 * 1024;

/// The whole status document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The current snapshot's system version.
    pub system_version: String,
    pub snapshot_created_unix_ms: u64,
    /// Every connected sidecar holds the current snapshot (true with none).
    pub converged: bool,
    pub sidecars_total: usize,
    pub sidecars_on_version: usize,
    /// Set while the config directory's content is rejected (the last good
    /// config is being served).
    pub config_rejected: Option<ConfigRejection>,
    pub sidecars: Vec<SidecarStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SidecarStatus {
    pub node_id: String,
    pub identity: String,
    pub address: String,
    pub namespace: String,
    pub connected_since_unix_ms: u64,
    /// Holds the current snapshot of every type it subscribed to.
    pub on_version: bool,
    pub types: Vec<TypeStatus>,
    pub last_nack: Option<NackStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeStatus {
    pub type_url: String,
    pub state: TypeState,
    /// Subscribed names; `*` for every resource.
    pub subscribed: Vec<String>,
    /// System version of the last response the sidecar ACKed for this type.
    pub acked_system_version: Option<String>,
    pub acked_at_unix_ms: Option<u64>,
    /// What the sidecar holds: name → version.
    pub resources: BTreeMap<String, String>,
}

/// Where one type stands on one sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TypeState {
    /// Holds exactly the current snapshot's resources.
    Applied,
    /// A response is on its way or about to be.
    Pending,
    /// Refused the last response; running its previous config.
    Nacked,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NackStatus {
    pub type_url: String,
    /// System version of the refused response.
    pub system_version: String,
    pub message: String,
    /// gRPC code the sidecar gave.
    pub code: i32,
    pub at_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigRejection {
    pub at_unix_ms: u64,
    /// `file:line: message`, one per problem.
    pub errors: Vec<String>,
}

impl StatusReport {
    /// `converged: yes (version V)` or `converged: no (N of M sidecars on version V)`.
    pub fn convergence_line(&self) -> String {
        if self.converged {
            format!("converged: yes (version {})", self.system_version)
        } else {
            format!(
                "converged: no ({} of {} sidecars on version {})",
                self.sidecars_on_version, self.sidecars_total, self.system_version
            )
        }
    }
}

impl SidecarStatus {
    /// `8/8 applied`, or e.g. `6/8 applied, NACKed: Route, pending: Service`.
    pub fn types_summary(&self) -> String {
        let of = |s: TypeState| -> Vec<&str> {
            self.types
                .iter()
                .filter(|t| t.state == s)
                .map(|t| kind_of(&t.type_url))
                .collect()
        };
        let mut out = format!(
            "{}/{} applied",
            of(TypeState::Applied).len(),
            self.types.len()
        );
        for (label, kinds) in [
            ("NACKed", of(TypeState::Nacked)),
            ("pending", of(TypeState::Pending)),
        ] {
            if !kinds.is_empty() {
                out.push_str(&format!(", {label}: {}", kinds.join(" ")));
            }
        }
        out
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One open stream, as the status board sees it. The stream's task owns the
/// protocol state; the board only reads it, when status is asked for.
#[derive(Debug)]
pub(crate) struct Connected {
    pub workload: Workload,
    pub since: SystemTime,
    pub state: Mutex<StreamState>,
}

/// Every open stream.
#[derive(Debug, Default)]
pub(crate) struct Board {
    next_id: AtomicU64,
    streams: Mutex<BTreeMap<u64, Arc<Connected>>>,
}

/// Keeps a stream on the board; dropping it takes the stream off.
pub(crate) struct BoardSlot {
    board: Weak<Board>,
    id: u64,
}

impl Drop for BoardSlot {
    fn drop(&mut self) {
        if let Some(b) = self.board.upgrade() {
            lock(&b.streams).remove(&self.id);
        }
    }
}

impl Board {
    /// Puts a stream that passed the node check on the board; its endpoint
    /// hold is at most `endpoint_hold` (see [`crate::stream`]).
    pub fn add(
        self: &Arc<Self>,
        workload: Workload,
        endpoint_hold: Duration,
    ) -> (Arc<Connected>, BoardSlot) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let c = Arc::new(Connected {
            workload,
            since: SystemTime::now(),
            state: Mutex::new(StreamState::new(endpoint_hold)),
        });
        lock(&self.streams).insert(id, c.clone());
        (
            c,
            BoardSlot {
                board: Arc::downgrade(self),
                id,
            },
        )
    }

    pub fn report(
        &self,
        snap: &Snapshot,
        config_rejected: Option<ConfigRejection>,
    ) -> StatusReport {
        let streams: Vec<Arc<Connected>> = lock(&self.streams).values().cloned().collect();
        let mut sidecars: Vec<SidecarStatus> = streams
            .iter()
            .map(|c| {
                let state = lock(&c.state);
                SidecarStatus {
                    node_id: c.workload.node_id.clone(),
                    identity: c.workload.identity.to_string(),
                    address: c.workload.address.to_string(),
                    namespace: c.workload.namespace.clone(),
                    connected_since_unix_ms: unix_ms(c.since),
                    on_version: state.in_sync(snap),
                    types: state.type_statuses(snap),
                    last_nack: state.last_nack().cloned(),
                }
            })
            .collect();
        sidecars.sort_by(|a, b| (&a.identity, &a.node_id).cmp(&(&b.identity, &b.node_id)));
        let on_version = sidecars.iter().filter(|s| s.on_version).count();
        StatusReport {
            system_version: snap.system_version().to_string(),
            snapshot_created_unix_ms: unix_ms(snap.created_at()),
            converged: on_version == sidecars.len(),
            sidecars_total: sidecars.len(),
            sidecars_on_version: on_version,
            config_rejected,
            sidecars,
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why the admin endpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect to the control plane admin endpoint at {addr}: {error}")]
    Connect { addr: String, error: std::io::Error },
    #[error("the control plane admin endpoint at {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("HTTP error talking to {addr}: {message}")]
    Http { addr: String, message: String },
    #[error("{addr} answered {status} for {path}")]
    Status {
        addr: String,
        path: String,
        status: u16,
    },
    #[error("{addr} sent a status document this client cannot read: {error}")]
    Decode {
        addr: String,
        error: serde_json::Error,
    },
}

/// Reads the status document from a control plane's admin endpoint
/// (`host:port`).
pub async fn fetch(addr: &str) -> Result<StatusReport, FetchError> {
    let body = get(addr, "/status").await?;
    serde_json::from_slice(&body).map_err(|error| FetchError::Decode {
        addr: addr.to_string(),
        error,
    })
}

/// Reads the Prometheus metrics from a control plane's admin endpoint.
pub async fn fetch_metrics(addr: &str) -> Result<String, FetchError> {
    let body = get(addr, "/metrics").await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

async fn get(addr: &str, path: &str) -> Result<Vec<u8>, FetchError> {
    let http = |e: &dyn std::fmt::Display| FetchError::Http {
        addr: addr.to_string(),
        message: e.to_string(),
    };
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|error| FetchError::Connect {
                addr: addr.to_string(),
                error,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| http(&e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::builder()
            .uri(path)
            .header(http::header::HOST, addr)
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .map_err(|e| http(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_FETCH_BYTES)
            .collect()
            .await
            .map_err(|e| http(&*e))?
            .to_bytes();
        if !status.is_success() {
            return Err(FetchError::Status {
                addr: addr.to_string(),
                path: path.to_string(),
                status: status.as_u16(),
            });
        }
        Ok(body.to_vec())
    };
    tokio::time::timeout(FETCH_TIMEOUT, work)
        .await
        .map_err(|_| FetchError::Timeout {
            addr: addr.to_string(),
            timeout: FETCH_TIMEOUT,
        })?
}
