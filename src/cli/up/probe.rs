//! Looking at the mesh from the switch namespace, where every pod's
//! `:15020` and the control plane's admin port are one hop away: readiness
//! checks and the per-second scrape the view and summary are built from.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bulwark_xds::StatusReport;

use super::metrics::{self, Sample};

const TIMEOUT: Duration = Duration::from_secs(2);

/// Everything one look at the mesh found.
pub struct Scrape {
    pub at: Instant,
    /// Each meshed pod's sidecar metrics (absent: it did not answer).
    pub pods: BTreeMap<String, Vec<Sample>>,
    /// The control plane's `/status`, or why it could not be read.
    pub control: Result<StatusReport, String>,
    /// The CA's metrics (empty if it did not answer).
    pub ca: Vec<Sample>,
}

/// Where to look.
#[derive(Clone)]
pub struct Targets {
    /// (pod, its sidecar's metrics address).
    pub sidecars: Vec<(String, SocketAddr)>,
    pub control_admin: SocketAddr,
    pub ca_metrics: SocketAddr,
}

/// Runs in the switch namespace.
pub fn scrape(t: &Targets) -> Scrape {
    let pods = t
        .sidecars
        .iter()
        .filter_map(|(pod, addr)| {
            let (code, body) = http_get(*addr, "/metrics").ok()?;
            (code == 200).then(|| (pod.clone(), metrics::parse(&body)))
        })
        .collect();
    let ca = http_get(t.ca_metrics, "/metrics")
        .ok()
        .filter(|(code, _)| *code == 200)
        .map(|(_, body)| metrics::parse(&body))
        .unwrap_or_default();
    Scrape {
        at: Instant::now(),
        pods,
        control: control_status(t.control_admin),
        ca,
    }
}

/// The control plane's `/status` (what `bulwark xds status` shows).
pub fn control_status(admin: SocketAddr) -> Result<StatusReport, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(bulwark_xds::fetch_status(&admin.to_string()))
        .map_err(|e| e.to_string())
}

/// Whether something accepts TCP connections at `addr`.
pub fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// A plain HTTP/1.0 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = Vec::new();
    // Bounded: a metrics page of a few sidecars' series is far smaller.
    Read::by_ref(&mut s).take(16 << 20).read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out);
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((code, body))
}
