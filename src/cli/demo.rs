//! `bulwark demo-app`: a small server for demos and tests, with
//! configurable latency and error rate.
//!
//! Three shapes, so `bulwark up` can build a small shop from one program:
//! - an HTTP server (default) that answers with its name and its caller's
//!   verified identity;
//! - the same, calling an HTTP `--upstream` and/or a line-protocol
//!   `--tcp-upstream` on every request it serves, and nesting their answers
//!   in its own (so one `curl` shows the whole chain: web → api → db);
//! - a line-protocol server (`--tcp-echo`): every line gets one line back,
//!   the way a database answers queries on a long-lived connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one upstream call (HTTP or TCP) may take before it counts as failed.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest line the line protocol accepts (both directions).
const MAX_LINE: usize = 4096;
/// Largest upstream HTTP body nested into a response.
const MAX_UPSTREAM_BODY: usize = 64 * 1024;
/// Largest `--body-bytes` (the body is held in memory once).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Idle `--tcp-upstream` connections kept for reuse.
const TCP_POOL_IDLE: usize = 16;
/// Queries one `--tcp-upstream` connection serves before it is closed, the
/// way database pools retire connections. It also keeps proxies'
/// per-connection metrics (counted as connections open and end) moving.
const QUERIES_PER_CONN: u32 = 10;
/// Request headers passed on to the upstream (so `curl -H 'x-canary:
/// always'` at the front end steers the canary behind it).
const PROPAGATED: &[&str] = &["x-canary", "x-request-id"];

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Name in every response (e.g. api-v2).
    #[arg(long, default_value = "demo")]
    name: String,
    /// Added latency per request.
    #[arg(long, default_value = "0s", value_parser = super::parse_duration_ms)]
    latency: Duration,
    /// Serve at most this many requests at once (the rest wait their
    /// turn), so latency grows with load the way a saturated server's does.
    #[arg(long)]
    capacity: Option<usize>,
    /// Fraction of requests answered 503 (0.0-1.0).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Call this URL (http://host:port/path) on every request served; its
    /// answer is nested in ours, and its failure makes ours a 502.
    #[arg(long, conflicts_with = "tcp_echo")]
    upstream: Option<hyper::Uri>,
    /// Send one line-protocol query to this address (host:port) on every
    /// request served, over pooled connections; failure makes ours a 502.
    #[arg(long, conflicts_with = "tcp_echo")]
    tcp_upstream: Option<String>,
    /// Serve a line protocol instead of HTTP: each line gets `<name> <line>` back.
    #[arg(long)]
    tcp_echo: bool,
    /// With `--tcp-echo`: greet every connection with this line before the
    /// client says anything, the way SMTP or MySQL servers speak first.
    #[arg(long, requires = "tcp_echo")]
    banner: Option<String>,
    /// Answer every HTTP request with exactly this many bytes of body (a
    /// fixed filler, built once) instead of the short text; for benchmarks.
    #[arg(long, conflicts_with_all = ["tcp_echo", "upstream", "tcp_upstream"])]
    body_bytes: Option<usize>,
    /// Echo this request header in the answer, as a `name=value` line
    /// (repeatable), to show what reached the app.
    #[arg(long)]
    echo_header: Vec<String>,
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&a.error_rate) {
        anyhow::bail!("--error-rate must be between 0 and 1");
    }
    if a.body_bytes.is_some_and(|n| n > MAX_BODY_BYTES) {
        anyhow::bail!("--body-bytes must be at most {MAX_BODY_BYTES}");
    }
    if let Some(u) = &a.upstream
        && (u.scheme_str() != Some("http") || u.authority().is_none())
    {
        anyhow::bail!("--upstream must be an http://host:port/path URL, got {u}");
    }
    super::runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen).await?;
        tracing::info!(addr = %a.listen, name = %a.name, tcp_echo = a.tcp_echo, "demo app listening");
        if a.tcp_echo {
            serve_lines(listener, a.name.into(), a.latency, a.banner).await
        } else {
            serve_http(listener, a).await
        }
    })
}

/// What every HTTP connection handler shares.
struct App {
    name: String,
    latency: Duration,
    /// `--capacity`: places for requests being served.
    capacity: Option<tokio::sync::Semaphore>,
    /// Answer every n-th request 503 (0: never).
    every: u64,
    counter: AtomicU64,
    upstream: Option<(hyper::Uri, HttpClient)>,
    tcp_upstream: Option<TcpPool>,
    /// `--body-bytes`: the body of every answer.
    fixed_body: Option<Bytes>,
    echo_headers: Vec<String>,
}

/// `n` bytes of printable filler ending in a newline (when `n > 0`).
fn filler(n: usize) -> Bytes {
    let mut b: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
    if let Some(last) = b.last_mut() {
        *last = b'\n';
    }
    Bytes::from(b)
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

async fn serve_http(listener: tokio::net::TcpListener, a: DemoArgs) -> anyhow::Result<()> {
    let upstream = a.upstream.map(|u| {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build_http();
        (u, client)
    });
    let app = Arc::new(App {
        name: a.name,
        latency: a.latency,
        capacity: a.capacity.map(|n| tokio::sync::Semaphore::new(n.max(1))),
        every: if a.error_rate > 0.0 {
            (1.0 / a.error_rate).round() as u64
        } else {
            0
        },
        counter: AtomicU64::new(0),
        upstream,
        tcp_upstream: a.tcp_upstream.map(TcpPool::new),
        fixed_body: a.body_bytes.map(filler),
        echo_headers: a.echo_header.clone(),
    });
    loop {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.handle(req, peer).await) }
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
        });
    }
}

impl App {
    async fn handle(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        if let Some(proto) = req.headers().get(hyper::header::UPGRADE).cloned() {
            // Echo every byte back once upgraded (WebSocket-style tunnels).
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let (mut r, mut w) = tokio::io::split(hyper_util::rt::TokioIo::new(up));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            return Response::builder()
                .status(101)
                .header(hyper::header::CONNECTION, "upgrade")
                .header(hyper::header::UPGRADE, proto)
                .body(Full::new(Bytes::new()))
                .expect("valid response");
        }
        // The request body is read (and dropped) before answering, so tests
        // can see how much of it got through: `x-request-body-bytes`.
        let body_bytes = match count_body(req.body_mut()).await {
            Ok(n) => n,
            Err((n, e)) => {
                tracing::warn!(bytes = n, error = %e, "request body ended early");
                return Response::builder()
                    .status(400)
                    .header("x-request-body-bytes", n)
                    .body(Full::new(Bytes::new()))
                    .expect("valid response");
            }
        };
        // Held until the answer is ready: the wait for a place is the queueing.
        let _place = match &self.capacity {
            Some(c) => c.acquire().await.ok(),
            None => None,
        };
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        let mut status = if self.every > 0 && n.is_multiple_of(self.every) {
            503
        } else {
            200
        };
        if let Some(body) = &self.fixed_body {
            return Response::builder()
                .status(status)
                .header("x-served-by", self.name.as_str())
                .header("x-request-body-bytes", body_bytes)
                .body(Full::new(body.clone()))
                .expect("valid response");
        }
        let caller = req
            .headers()
            .get("x-bulwark-peer-identity")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let mut body = format!(
            "{} {} {} from {peer} caller={caller}\n",
            self.name,
            req.method(),
            req.uri().path()
        );
        for h in &self.echo_headers {
            let v = req.headers().get(h.as_str()).and_then(|v| v.to_str().ok());
            body.push_str(&format!("{h}={}\n", v.unwrap_or("-")));
        }
        // The upstream calls: each nests its answer (indented) or says why
        // it failed; any failure turns ours into a 502 so the caller's
        // success rate shows the whole chain's health.
        if let Some((uri, client)) = &self.upstream {
            match call_http(client, uri, req.headers()).await {
                Ok((code, text)) => {
                    nest(&mut body, &text);
                    if !(200..300).contains(&code) && status == 200 {
                        status = 502;
                    }
                }
                Err(e) => {
                    body.push_str(&format!("  upstream {uri} failed: {e}\n"));
                    status = 502;
                }
            }
        }
        if let Some(pool) = &self.tcp_upstream {
            match pool.query(&format!("QUERY {} {n}", self.name)).await {
                Ok(line) => body.push_str(&format!("  {line}\n")),
                Err(e) => {
                    body.push_str(&format!("  tcp upstream {} failed: {e}\n", pool.addr));
                    status = 502;
                }
            }
        }
        Response::builder()
            .status(status)
            .header("x-served-by", self.name.as_str())
            .header("x-request-body-bytes", body_bytes)
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    }
}

/// Reads a request body to its end, keeping only its length; on an error,
/// the bytes read until then.
async fn count_body(body: &mut Incoming) -> Result<u64, (u64, hyper::Error)> {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(e) => return Err((n, e)),
        }
    }
    Ok(n)
}

fn nest(body: &mut String, text: &str) {
    for line in text.lines() {
        body.push_str("  ");
        body.push_str(line);
        body.push('\n');
    }
}

/// GET `uri`, passing on the [`PROPAGATED`] headers; (status, body text).
async fn call_http(
    client: &HttpClient,
    uri: &hyper::Uri,
    incoming: &hyper::HeaderMap,
) -> Result<(u16, String), String> {
    let mut req = Request::get(uri.clone());
    for h in PROPAGATED {
        if let Some(v) = incoming.get(*h) {
            req = req.header(*h, v);
        }
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let work = async {
        let resp = client.request(req).await.map_err(|e| format!("{e:#}"))?;
        let code = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_UPSTREAM_BODY)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, work)
        .await
        .map_err(|_| format!("no answer within {UPSTREAM_TIMEOUT:?}"))?
}

/// Connections to a line-protocol upstream, reused like a database pool:
/// one query at a time per connection.
struct TcpPool {
    addr: String,
    idle: Mutex<Vec<LineConn>>,
}

struct LineConn {
    stream: TcpStream,
    /// Queries answered so far.
    served: u32,
    /// Bytes read past the last answered line.
    buf: Vec<u8>,
}

impl TcpPool {
    fn new(addr: String) -> Self {
        TcpPool {
            addr,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends `query` and returns the one-line answer. A pooled connection
    /// may have been closed by the other side meanwhile: then the query is
    /// tried once more on a fresh connection.
    async fn query(&self, query: &str) -> Result<String, String> {
        let pooled = self.idle.lock().expect("pool lock").pop();
        let fresh = pooled.is_none();
        let mut conn = match pooled {
            Some(c) => c,
            None => self.connect().await?,
        };
        let answer = match conn.round_trip(query).await {
            Err(_) if !fresh => {
                conn = self.connect().await?;
                conn.round_trip(query).await
            }
            r => r,
        }?;
        conn.served += 1;
        if conn.served < QUERIES_PER_CONN {
            let mut idle = self.idle.lock().expect("pool lock");
            if idle.len() < TCP_POOL_IDLE {
                idle.push(conn);
            }
        }
        Ok(answer)
    }

    async fn connect(&self) -> Result<LineConn, String> {
        let stream = tokio::time::timeout(UPSTREAM_TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(LineConn {
            stream,
            served: 0,
            buf: Vec::new(),
        })
    }
}

impl LineConn {
    async fn round_trip(&mut self, query: &str) -> Result<String, String> {
        let work = async {
            self.stream
                .write_all(format!("{query}\n").as_bytes())
                .await
                .map_err(|e| format!("send: {e}"))?;
            match read_line(&mut self.stream, &mut self.buf).await {
                Ok(Some(line)) => Ok(line),
                Ok(None) => Err("connection closed".to_string()),
                Err(e) => Err(format!("receive: {e}")),
            }
        };
        tokio::time::timeout(UPSTREAM_TIMEOUT, work)
            .await
            .map_err(|_| format!("no answer within {UPSTREAM_TIMEOUT:?}"))?
    }
}

/// The next `\n`-terminated line (without it) from `stream`, keeping what
/// follows in `buf`; `None` at a clean end of stream. Lines longer than
/// [`MAX_LINE`] are an error, so a peer cannot make us buffer without bound.
async fn read_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<String>> {
    loop {
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..i]);
            return Ok(Some(text.trim_end_matches('\r').to_string()));
        }
        if buf.len() > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line longer than {MAX_LINE} bytes"),
            ));
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `--tcp-echo`: answers every line with `<name> <line>` on the same
/// connection, until the client closes it.
async fn serve_lines(
    listener: tokio::net::TcpListener,
    name: Arc<str>,
    latency: Duration,
    banner: Option<String>,
) -> anyhow::Result<()> {
    let banner: Option<Arc<str>> = banner.map(|b| format!("{b}\n").into());
    loop {
        let (mut stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let name = name.clone();
        let banner = banner.clone();
        tokio::spawn(async move {
            if let Some(b) = banner
                && stream.write_all(b.as_bytes()).await.is_err()
            {
                return;
            }
            let mut buf = Vec::new();
            while let Ok(Some(line)) = read_line(&mut stream, &mut buf).await {
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                let answer = format!("{name} {line}\n");
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}
