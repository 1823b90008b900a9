//! Load balancing: power of two choices over least outstanding requests
//! (default) or round robin, among healthy, non-ejected endpoints. Endpoint
//! state (in-flight count, ejection, health) outlives config snapshots.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Live state of one upstream endpoint.
#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    outstanding: AtomicUsize,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `epoch` until which the endpoint is ejected.
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    /// Taken out of rotation by the owner (kept for callers that need it).
    unhealthy: AtomicBool,
    epoch: Instant,
}

impl EndpointState {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            outstanding: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            unhealthy: AtomicBool::new(false),
            epoch: Instant::now(),
        }
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub fn available(&self, now: Instant) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        // Never ejected (the usual case): no clock arithmetic on every pick.
        !self.unhealthy.load(Ordering::Relaxed)
            && (until == 0 || (now.duration_since(self.epoch).as_millis() as u64) >= until)
    }

    pub fn set_unhealthy(&self, unhealthy: bool) {
        self.unhealthy.store(unhealthy, Ordering::Relaxed);
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Records an outcome for outlier detection: `consecutive` failures
    /// eject for `base * ejections`, capped at 10x base.
    pub fn record(&self, success: bool, consecutive: u32, base: Duration, now: Instant) -> bool {
        if success {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            return false;
        }
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if consecutive == 0 || n < consecutive {
            return false;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let k = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let d = base * k.min(10);
        let until = now.duration_since(self.epoch) + d;
        self.ejected_until_ms
            .store(until.as_millis() as u64, Ordering::Relaxed);
        true
    }
}

pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Endpoint states by address, shared across config snapshots.
#[derive(Debug, Default)]
pub struct Endpoints {
    states: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
}

impl Endpoints {
    pub fn get(&self, addr: SocketAddr) -> Arc<EndpointState> {
        let mut m = self.states.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(addr)
            .or_insert_with(|| Arc::new(EndpointState::new(addr)))
            .clone()
    }
}

/// Picks an endpoint: two random candidates among the available ones, the
/// one with fewer requests in flight wins. If every endpoint is ejected,
/// fall back to all of them (panic threshold): better a likely failure than
/// a certain one.
pub fn p2c(
    eps: &[Arc<EndpointState>],
    now: Instant,
    rand: impl Fn(usize) -> usize,
) -> Option<&Arc<EndpointState>> {
    let pool = Pool::new(eps, now);
    match pool.len {
        0 => None,
        1 => Some(pool.nth(0)),
        n => {
            let a = rand(n);
            let mut b = rand(n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (pool.nth(a), pool.nth(b));
            Some(if a.outstanding() <= b.outstanding() {
                a
            } else {
                b
            })
        }
    }
}

/// The endpoints a pick chooses among, without collecting them: a pick is
/// on every request, and when every endpoint is available (the usual case)
/// the n-th one is found by index.
struct Pool<'a> {
    eps: &'a [Arc<EndpointState>],
    now: Instant,
    len: usize,
    /// Only some endpoints are available: skip the others.
    filtered: bool,
}

impl<'a> Pool<'a> {
    fn new(eps: &'a [Arc<EndpointState>], now: Instant) -> Self {
        let avail = eps.iter().filter(|e| e.available(now)).count();
        // None available: all of them (the panic threshold above).
        let filtered = avail != 0 && avail != eps.len();
        Self {
            eps,
            now,
            len: if avail == 0 { eps.len() } else { avail },
            filtered,
        }
    }

    fn nth(&self, i: usize) -> &'a Arc<EndpointState> {
        if self.filtered {
            self.eps
                .iter()
                .filter(|e| e.available(self.now))
                .nth(i)
                .expect("i < number available")
        } else {
            &self.eps[i]
        }
    }
}

/// Round robin among the available endpoints (all of them if none is).
pub fn round_robin<'a>(
    eps: &'a [Arc<EndpointState>],
    now: Instant,
    next: &AtomicUsize,
) -> Option<&'a Arc<EndpointState>> {
    let pool = Pool::new(eps, now);
    if pool.len == 0 {
        return None;
    }
    Some(pool.nth(next.fetch_add(1, Ordering::Relaxed) % pool.len))
}

/// A uniform random index below `n`, from a cheap thread-local generator
/// (load balancing needs spread, not secrecy).
pub fn rand_below(n: usize) -> usize {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let b: [u8; 8] = bulwark_ca::random_bytes();
            u64::from_le_bytes(b) | 1
        });
    }
    STATE.with(|s| {
        // xorshift64*
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        ((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize) % n.max(1)
    })
}

/// Uniform in [0, 1).
pub fn rand_unit() -> f64 {
    rand_below(1 << 24) as f64 / f64::from(1u32 << 24)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<Arc<EndpointState>> {
        (0..n)
            .map(|i| {
                Arc::new(EndpointState::new(
                    format!("10.0.0.{}:80", i + 1).parse().unwrap(),
                ))
            })
            .collect()
    }

    #[test]
    fn p2c_prefers_the_less_loaded_endpoint() {
        let e = eps(2);
        let _busy = (e[0].start(), e[0].start());
        let now = Instant::now();
        for _ in 0..20 {
            assert_eq!(p2c(&e, now, rand_below).unwrap().addr, e[1].addr);
        }
    }

    #[test]
    fn ejected_endpoints_are_skipped_until_their_time_is_up() {
        let e = eps(3);
        let now = Instant::now();
        assert!(!e[0].record(false, 2, Duration::from_secs(30), now));
        assert!(e[0].record(false, 2, Duration::from_secs(30), now));
        for _ in 0..50 {
            assert_ne!(p2c(&e, now, rand_below).unwrap().addr, e[0].addr);
        }
        assert!(e[0].available(now + Duration::from_secs(31)));
    }

    #[test]
    fn all_ejected_falls_back_to_all() {
        let e = eps(1);
        let now = Instant::now();
        e[0].record(false, 1, Duration::from_secs(30), now);
        assert!(p2c(&e, now, rand_below).is_some());
    }

    #[test]
    fn round_robin_cycles_over_available_endpoints() {
        let e = eps(3);
        let now = Instant::now();
        e[1].record(false, 1, Duration::from_secs(30), now);
        let next = AtomicUsize::new(0);
        let picks: Vec<SocketAddr> = (0..4)
            .map(|_| round_robin(&e, now, &next).unwrap().addr)
            .collect();
        assert_eq!(picks, vec![e[0].addr, e[2].addr, e[0].addr, e[2].addr]);
    }

    #[test]
    fn random_indices_are_spread() {
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[rand_below(4)] += 1;
        }
        assert!(counts.iter().all(|c| *c > 800), "{counts:?}");
    }
}
