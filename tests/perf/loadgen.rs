//! `loadgen`: a fixed-rate (open-loop) HTTP/1.1 load generator whose
//! latencies are safe from coordinated omission.
//!
//! Request `i` is *scheduled* at `start + i / rate`, whatever happened to the
//! requests before it. A pacer thread (precise `nanosleep`, 1 µs timer
//! slack) releases each scheduled time into a queue; the first idle one of
//! `--connections` keep-alive connections takes it and sends the request.
//! A request's latency is measured from its scheduled time, not from when
//! it was actually sent: when the server (or a proxy) stalls, the requests
//! that queued behind the stall are charged the time they waited, as a real
//! open-loop client population would see it.
//!
//! Prints one JSON object: the achieved rate, counts and the latency
//! percentiles (µs) of the measured window (after `--warmup`), plus
//! `completed_total` over the whole run (for CPU-per-request figures).
//!
//! ```sh
//! cargo build --release --example loadgen
//! target/release/examples/loadgen --url http://198.18.0.3:9090/ --rate 1000 --duration 8s
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use tokio::sync::{Mutex, mpsc};

#[derive(Parser)]
#[command(about = "Fixed-rate HTTP/1.1 keep-alive load with scheduled-time latency")]
struct Args {
    /// http://host:port/path (host must be an IP address).
    #[arg(long)]
    url: hyper::Uri,
    /// Requests per second, spread evenly.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Keep-alive connections (each carries one request at a time).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Measured time, after the warm-up.
    #[arg(long, default_value = "8s", value_parser = parse_secs)]
    duration: Duration,
    /// Load sent but not measured first (connections, caches, pools).
    #[arg(long, default_value = "2s", value_parser = parse_secs)]
    warmup: Duration,
    /// Expected response body size; other sizes count as errors.
    #[arg(long)]
    expect_bytes: Option<usize>,
    /// How long to wait for outstanding requests after the last one was scheduled.
    #[arg(long, default_value = "5s", value_parser = parse_secs)]
    drain: Duration,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let (n, unit) = match s.strip_suffix("ms") {
        Some(n) => (n, 1e-3),
        None => (s.strip_suffix('s').unwrap_or(s), 1.0),
    };
    n.parse::<f64>()
        .ok()
        .filter(|v| *v >= 0.0)
        .map(|v| Duration::from_secs_f64(v * unit))
        .ok_or_else(|| format!("{s:?} is not a duration like 8s or 500ms"))
}

/// What every connection task shares.
struct Shared {
    queue: Mutex<mpsc::UnboundedReceiver<Instant>>,
    /// Scheduled times at or after this are measured.
    measure_from: Instant,
    host: String,
    path: String,
    expect: Option<usize>,
    completed: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

/// One connection's results: latencies (ns) of measured requests. Shared
/// with the reporter so a connection that hangs still reports what it did.
type TallyRef = Arc<std::sync::Mutex<Tally>>;

#[derive(Default)]
struct Tally {
    lat_ns: Vec<u64>,
    measured_errors: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.rate <= 0.0 || a.connections == 0 {
        anyhow::bail!("--rate and --connections must be positive");
    }
    let addr: SocketAddr = match (a.url.host(), a.url.port_u16()) {
        (Some(h), Some(p)) => format!("{}:{p}", h.trim_matches(['[', ']']))
            .parse()
            .map_err(|_| anyhow::anyhow!("--url host must be an IP address"))?,
        (Some(h), None) => format!("{h}:80")
            .parse()
            .map_err(|_| anyhow::anyhow!("--url host must be an IP address"))?,
        _ => anyhow::bail!("--url must be http://ip:port/path"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(a, addr))
}

async fn run(a: Args, addr: SocketAddr) -> anyhow::Result<()> {
    // Connect everything before the clock starts.
    let mut senders = Vec::with_capacity(a.connections);
    for _ in 0..a.connections {
        senders.push(connect(addr).await?);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let interval = Duration::from_secs_f64(1.0 / a.rate);
    let total = ((a.warmup + a.duration).as_secs_f64() * a.rate).round() as u64;
    let start = Instant::now() + Duration::from_millis(20);
    let shared = Arc::new(Shared {
        queue: Mutex::new(rx),
        measure_from: start + a.warmup,
        host: a.url.authority().map(|x| x.to_string()).unwrap_or_default(),
        path: a
            .url
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "/".into()),
        expect: a.expect_bytes,
        completed: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let mut tasks = Vec::new();
    let mut tallies = Vec::new();
    for s in senders {
        let t = TallyRef::default();
        tallies.push(t.clone());
        tasks.push(tokio::spawn(worker(shared.clone(), addr, s, t)));
    }
    let measure_from = shared.measure_from;
    let pacer = std::thread::spawn(move || pace(tx, start, interval, total, measure_from));
    let scheduled_last = start + interval.mul_f64(total as f64);
    // Wait for the pacer, then give outstanding requests `drain` to finish.
    let sent_measured = tokio::task::spawn_blocking(move || pacer.join())
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or(0);
    let deadline = tokio::time::Instant::from_std(scheduled_last.max(Instant::now()) + a.drain);
    for t in tasks {
        if tokio::time::timeout_at(deadline, t).await.is_err() {
            shared.stop.store(true, Ordering::Relaxed);
        }
    }
    let mut lat = Vec::new();
    let mut measured_errors = 0;
    for t in tallies {
        let t = t.lock().expect("tally lock");
        lat.extend_from_slice(&t.lat_ns);
        measured_errors += t.measured_errors;
    }
    let tally = Tally {
        lat_ns: Vec::new(),
        measured_errors,
    };
    lat.sort_unstable();
    let missing = sent_measured.saturating_sub(lat.len() as u64 + tally.measured_errors);
    let pct = |q: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((q * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1000.0
    };
    let mean = if lat.is_empty() {
        f64::NAN
    } else {
        lat.iter().map(|v| *v as f64).sum::<f64>() / lat.len() as f64 / 1000.0
    };
    let out = serde_json::json!({
        "url": a.url.to_string(),
        "rate": a.rate,
        "connections": a.connections,
        "duration_s": a.duration.as_secs_f64(),
        "scheduled": sent_measured,
        "ok": lat.len(),
        "errors": tally.measured_errors + missing,
        "achieved_rps": lat.len() as f64 / a.duration.as_secs_f64(),
        "completed_total": shared.completed.load(Ordering::Relaxed),
        "errors_total": shared.errors.load(Ordering::Relaxed),
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
        "max_us": lat.last().map(|v| *v as f64 / 1000.0).unwrap_or(f64::NAN),
        "mean_us": mean,
    });
    println!("{out}");
    Ok(())
}

/// Releases scheduled times into the queue at their time (precise sleeps
/// on a thread of its own, so the async runtime's 1 ms timer never delays
/// or bunches sends).
/// Returns how many of the released times fall in the measured window.
fn pace(
    tx: mpsc::UnboundedSender<Instant>,
    start: Instant,
    interval: Duration,
    total: u64,
    measure_from: Instant,
) -> u64 {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000u64, 0, 0, 0);
    }
    let mut measured = 0;
    for i in 0..total {
        let at = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        if tx.send(at).is_err() {
            break;
        }
        if at >= measure_from {
            measured += 1;
        }
    }
    measured
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| anyhow::anyhow!("connect {addr}: {e}"))?;
    s.set_nodelay(true)?;
    let (send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn worker(shared: Arc<Shared>, addr: SocketAddr, mut send: Sender, tally: TallyRef) {
    loop {
        let next = { shared.queue.lock().await.recv().await };
        let Some(scheduled) = next else {
            return;
        };
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let measured = scheduled >= shared.measure_from;
        let ok = request(&shared, &mut send).await;
        let done = Instant::now();
        if ok {
            shared.completed.fetch_add(1, Ordering::Relaxed);
            if measured {
                tally
                    .lock()
                    .expect("tally lock")
                    .lat_ns
                    .push(done.saturating_duration_since(scheduled).as_nanos() as u64);
            }
        } else {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            if measured {
                tally.lock().expect("tally lock").measured_errors += 1;
            }
            // A failed connection is replaced (the time it takes is charged
            // to the requests waiting meanwhile).
            if send.is_closed() || !send.is_ready() {
                match connect(addr).await {
                    Ok(s) => send = s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
    }
}

/// One GET; true when it answered 200 with the expected body size.
async fn request(shared: &Shared, send: &mut Sender) -> bool {
    if send.ready().await.is_err() {
        return false;
    }
    let req = hyper::Request::get(shared.path.as_str())
        .header(hyper::header::HOST, shared.host.as_str())
        .body(Empty::new())
        .expect("valid request");
    let Ok(resp) = send.send_request(req).await else {
        return false;
    };
    let status = resp.status();
    let Ok(body) = resp.into_body().collect().await else {
        return false;
    };
    let len = body.to_bytes().len();
    status == 200 && shared.expect.is_none_or(|n| n == len)
}
