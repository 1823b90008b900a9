//! The traffic `up` drives: steady load from inside the `web` pod (to
//! web's own app, which calls api, which queries db), and the `outsider`
//! knocking on an api pod directly in plaintext once a second.
//!
//! Each generator is a thread that has entered its pod's namespace, so its
//! sockets are that pod's sockets. The waits between requests set the
//! rate; they are not synchronization, and a stop request cuts them short.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::net;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Load generator threads; each sends its share of the rate, so one slow
/// request does not stall the whole load.
const LOAD_THREADS: u32 = 2;

/// What the web pod's load generator saw, end to end.
#[derive(Default)]
pub struct LoadStats {
    pub sent: AtomicU64,
    /// Answered 200.
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// 200s whose body says which api version served them.
    pub via_v1: AtomicU64,
    pub via_v2: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// What the outsider's plaintext attempts got.
#[derive(Default)]
pub struct OutsiderStats {
    pub attempts: AtomicU64,
    /// Reset, closed without an answer, or refused: what STRICT mTLS does.
    pub refused: AtomicU64,
    /// An HTTP answer came back: plaintext got through.
    pub answered: AtomicU64,
    /// Neither within the timeout.
    pub timeouts: AtomicU64,
}

/// Wakes sleeping generators when they should stop.
#[derive(Default)]
struct StopFlag {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl StopFlag {
    /// Waits until `until` unless stopped first; true if stopped.
    fn wait_until(&self, until: Instant) -> bool {
        let mut stopped = self.stopped.lock().expect("stop lock");
        loop {
            if *stopped {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            stopped = self
                .cv
                .wait_timeout(stopped, until - now)
                .expect("stop lock")
                .0;
        }
    }

    fn stop(&self) {
        *self.stopped.lock().expect("stop lock") = true;
        self.cv.notify_all();
    }
}

pub struct Traffic {
    stop: Arc<StopFlag>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub load: Arc<LoadStats>,
    pub outsider: Arc<OutsiderStats>,
    pub rps: u32,
    /// What the outsider dials.
    pub outsider_targets: Vec<SocketAddr>,
}

impl Traffic {
    /// Starts `rps` requests/s to `web_app` from namespace `web_ns`, and one
    /// plaintext attempt per second from `outsider_ns`, rotating over
    /// `outsider_targets`. Returns once every thread is in its namespace.
    pub fn start(
        web_ns: &str,
        web_app: SocketAddr,
        rps: u32,
        outsider_ns: &str,
        outsider_targets: Vec<SocketAddr>,
    ) -> anyhow::Result<Traffic> {
        let mut t = Traffic {
            stop: Arc::default(),
            threads: Vec::new(),
            load: Arc::default(),
            outsider: Arc::default(),
            rps,
            outsider_targets: outsider_targets.clone(),
        };
        let per_thread = Duration::from_secs_f64(f64::from(LOAD_THREADS) / f64::from(rps.max(1)));
        for i in 0..LOAD_THREADS {
            let (stop, stats) = (t.stop.clone(), t.load.clone());
            // Offset the threads so requests are evenly spaced.
            let offset = per_thread.mul_f64(f64::from(i) / f64::from(LOAD_THREADS));
            t.spawn(web_ns, &format!("load-{i}"), move || {
                load_loop(web_app, per_thread, offset, &stop, &stats)
            })?;
        }
        let (stop, stats) = (t.stop.clone(), t.outsider.clone());
        t.spawn(outsider_ns, "outsider", move || {
            outsider_loop(&outsider_targets, &stop, &stats)
        })?;
        Ok(t)
    }

    fn spawn(
        &mut self,
        ns: &str,
        name: &str,
        work: impl FnOnce() + Send + 'static,
    ) -> anyhow::Result<()> {
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let ns_owned = ns.to_string();
        let h = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let entered = net::enter(&ns_owned);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    work();
                }
            })?;
        self.threads.push(h);
        ready
            .recv()
            .context("traffic thread died")?
            .with_context(|| format!("cannot enter namespace {ns}"))
    }

    /// Stops every generator and waits for its request in flight.
    pub fn stop(&mut self) {
        self.stop.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop();
    }
}

fn load_loop(
    target: SocketAddr,
    every: Duration,
    offset: Duration,
    stop: &StopFlag,
    stats: &LoadStats,
) {
    let mut next = Instant::now() + offset;
    loop {
        if stop.wait_until(next) {
            return;
        }
        stats.sent.fetch_add(1, Ordering::Relaxed);
        match get(target, super::plan::LOAD_PATH) {
            Ok((200, body)) => {
                stats.ok.fetch_add(1, Ordering::Relaxed);
                if body.contains("api-v2 ") {
                    stats.via_v2.fetch_add(1, Ordering::Relaxed);
                } else if body.contains("api-v1 ") {
                    stats.via_v1.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok((code, body)) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                let why = body
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                *stats.last_error.lock().expect("stats lock") =
                    Some(format!("HTTP {code}: {}", why.trim()));
            }
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                *stats.last_error.lock().expect("stats lock") = Some(e);
            }
        }
        next += every;
        // Fallen far behind (a stall): resume the pace rather than burst.
        let now = Instant::now();
        if now > next + Duration::from_secs(1) {
            next = now;
        }
    }
}

/// One GET over a fresh connection: (status, body).
pub fn get(target: SocketAddr, path: &str) -> Result<(u16, String), String> {
    get_with(target, path, &[])
}

/// [`get`] with extra request headers.
pub fn get_with(
    target: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
        .map_err(|e| format!("connect {target}: {e}"))?;
    s.set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n{extra}\r\n"
    )
    .map_err(|e| format!("send to {target}: {e}"))?;
    let mut out = Vec::new();
    s.take(1 << 20)
        .read_to_end(&mut out)
        .map_err(|e| format!("read from {target}: {e}"))?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP answer from {target}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((code, body))
}

fn outsider_loop(targets: &[SocketAddr], stop: &StopFlag, stats: &OutsiderStats) {
    let mut next = Instant::now();
    for target in targets.iter().cycle() {
        if stop.wait_until(next) {
            return;
        }
        stats.attempts.fetch_add(1, Ordering::Relaxed);
        let counter = match knock(*target) {
            Knock::Refused => &stats.refused,
            Knock::Answered => &stats.answered,
            Knock::Timeout => &stats.timeouts,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        next += Duration::from_secs(1);
    }
}

enum Knock {
    Refused,
    Answered,
    Timeout,
}

/// A plaintext HTTP request straight to a meshed pod.
fn knock(target: SocketAddr) -> Knock {
    let mut s = match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::TimedOut => return Knock::Timeout,
        Err(_) => return Knock::Refused,
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(
        s,
        "GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return Knock::Refused;
    }
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => Knock::Refused,
        Ok(_) => Knock::Answered,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Knock::Timeout,
        Err(_) => Knock::Refused,
    }
}
