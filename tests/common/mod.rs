//! Shared helpers for end-to-end tests: start the real `bulwark` binary,
//! wait on conditions with deadlines, clean up on drop.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_bulwark");

/// A child process killed (and reaped) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// Sends SIGTERM and waits up to `grace` for exit.
    pub fn terminate(&mut self, grace: Duration) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `bulwark ARGS`, stdout+stderr to `dir/<name>.log`.
pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(BIN)
        .args(args)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
    Proc {
        child,
        name: name.to_string(),
        log,
    }
}

/// Runs `bulwark ARGS` to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// Runs `bulwark ARGS`, panicking with its output if it fails; returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "bulwark {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_listening(addr: SocketAddr, proc: &mut Proc) {
    wait_for(
        &format!("{} to listen on {addr}", proc.name),
        Duration::from_secs(20),
        || {
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("{} exited early ({status}): {}", proc.name, proc.log_text());
            }
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        },
    );
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("bulwark-test-")
        .tempdir()
        .unwrap()
}

/// A running CA on loopback.
pub struct Ca {
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub proc: Proc,
}

impl Ca {
    /// `ca init` with `init_args`, then `ca serve` with `serve_args`.
    pub fn start(work: &Path, init_args: &[&str], serve_args: &[&str]) -> Ca {
        let dir = work.join("ca");
        let d = dir.to_str().unwrap();
        let mut args = vec!["ca", "init", "--dir", d];
        args.extend_from_slice(init_args);
        run_ok(&args);
        Self::serve(work, &dir, serve_args)
    }

    pub fn serve(work: &Path, dir: &Path, serve_args: &[&str]) -> Ca {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let (a, m) = (addr.to_string(), metrics.to_string());
        let mut args = vec![
            "ca",
            "serve",
            "--dir",
            dir.to_str().unwrap(),
            "--listen",
            &a,
            "--metrics-listen",
            &m,
        ];
        args.extend_from_slice(serve_args);
        let mut proc = spawn(work, "ca", &args);
        wait_listening(addr, &mut proc);
        Ca {
            dir: dir.to_path_buf(),
            addr,
            metrics,
            proc,
        }
    }

    pub fn token(&self, identity: &str) -> String {
        run_ok(&[
            "ca",
            "token",
            "--dir",
            self.dir.to_str().unwrap(),
            "--identity",
            identity,
        ])
        .trim()
        .to_string()
    }

    pub fn bundle_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("bundle.pem")).unwrap()
    }

    /// The issuance record, parsed.
    pub fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("issued.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics")
    }
}

/// A minimal HTTP/1.0 GET, for metrics endpoints.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// CPU time process `pid` has used so far (user + system, all threads), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Resident memory of process `pid`, in kB (0 if it is gone).
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Reads one HTTP/1.1 response with a `content-length` body off a
/// keep-alive connection: (status line, body).
#[allow(dead_code)]
pub fn read_response(r: &mut impl std::io::BufRead) -> (String, Vec<u8>) {
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    (status, body)
}

/// An SVID for `id`, signed directly by the CA directory's intermediate
/// (no CA server involved).
pub fn local_svid(ca_dir: &Path, id: &bulwark_ca::SpiffeId) -> bulwark_ca::client::Svid {
    local_svid_expiring(ca_dir, id, None)
}

/// [`local_svid`], expiring `left` from now if given (from a 60-second
/// certificate signed as if earlier), else at the CA's default lifetime.
pub fn local_svid_expiring(
    ca_dir: &Path,
    id: &bulwark_ca::SpiffeId,
    left: Option<Duration>,
) -> bulwark_ca::client::Svid {
    use bulwark_ca::{authority, store};
    let auth = authority::Authority::from_material(store::load(ca_dir).unwrap()).unwrap();
    let bundle_pem = std::fs::read_to_string(ca_dir.join("bundle.pem")).unwrap();
    let (key, csr) = bulwark_ca::client::new_csr(id).unwrap();
    let minute = Duration::from_secs(60);
    let (ttl, at) = match left {
        Some(left) => (
            Some(minute),
            time::OffsetDateTime::now_utc() - (minute - left),
        ),
        None => (None, time::OffsetDateTime::now_utc()),
    };
    let issued = auth
        .sign(authority::check_csr(&csr).unwrap(), id, ttl, at)
        .unwrap();
    bulwark_ca::client::Svid::from_pem_parts(&key.serialize_pem(), &issued.chain_pem, &bundle_pem)
        .unwrap()
}

/// A client TLS config presenting `svid`, trusting `bundle`, that accepts
/// only a server with the identity `server`, offering `alpn`.
pub fn mesh_client_config(
    svid: &bulwark_ca::client::Svid,
    bundle: bulwark_ca::tls::TrustBundle,
    server: bulwark_ca::SpiffeId,
    alpn: &[u8],
) -> std::sync::Arc<rustls::ClientConfig> {
    use std::sync::Arc;
    let ck = svid.certified_key().unwrap();
    let verifier = bulwark_ca::tls::SpiffeServerVerifier::new(
        Arc::new(arc_swap::ArcSwap::from_pointee(bundle)),
        bulwark_ca::tls::ExpectedServer::AnyOf(vec![server]),
    );
    let mut cfg = rustls::ClientConfig::builder_with_provider(bulwark_ca::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(bulwark_ca::tls::CurrentCert::new(ck)));
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(cfg)
}

/// mTLS to `addr` with `cfg` (the server name is not what is verified).
pub async fn mesh_connect(
    addr: SocketAddr,
    cfg: std::sync::Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
}

/// A discovery client to the control plane at `addr`, over mTLS as `svid`,
/// trusting `bundle` and only the control plane's identity.
pub async fn xds_client(
    addr: SocketAddr,
    svid: &bulwark_ca::client::Svid,
    bundle: bulwark_ca::tls::TrustBundle,
) -> bulwark_proto::xds::v1::discovery_service_client::DiscoveryServiceClient<
    tonic::transport::Channel,
> {
    let server = bulwark_ca::SpiffeId::control_plane(svid.identity.trust_domain()).unwrap();
    let cfg = mesh_client_config(svid, bundle, server, b"h2");
    let connector = tower::service_fn(move |_u: http::Uri| {
        let cfg = cfg.clone();
        async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(mesh_connect(addr, cfg).await?))
        }
    });
    let ch = tonic::transport::Endpoint::from_static("http://xds")
        .connect_with_connector(connector)
        .await
        .unwrap();
    bulwark_proto::xds::v1::discovery_service_client::DiscoveryServiceClient::new(ch)
        .max_decoding_message_size(4 << 20)
}
