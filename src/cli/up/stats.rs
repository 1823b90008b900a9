//! Figures over a window between two scrapes: counters become deltas,
//! histograms become quantiles of the observations in the window. The
//! live view uses the last few seconds; the summary the whole run.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use super::metrics::{Sample, quantile};
use super::plan::Plan;
use super::probe::Scrape;

pub struct Window<'a> {
    /// None: from the beginning (counters as they stand).
    pub prev: Option<&'a Scrape>,
    pub cur: &'a Scrape,
}

/// Requests one sidecar sent on one route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteRow {
    pub pod: String,
    pub service: String,
    pub route: String,
    pub requests: f64,
    /// Answered without a 5xx (a 4xx is the caller's problem, not the mesh's).
    pub ok: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// Traffic one identity sent another, as the receiving sidecars saw it
/// (possible only over verified mTLS: the source is the client
/// certificate's SPIFFE ID).
#[derive(Debug, Clone, PartialEq)]
pub struct PairRow {
    pub src: String,
    pub dst: String,
    pub requests: f64,
    pub ok: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// Inbound connections (TCP, or HTTP/2 connections carrying requests).
    pub connections: f64,
}

type Key = (String, Vec<(String, String)>);

impl Window<'_> {
    pub fn secs(&self) -> f64 {
        self.prev
            .map_or(0.0, |p| self.cur.at.duration_since(p.at).as_secs_f64())
    }

    /// Every sample called `name` in the current scrape with its increase
    /// over the window, per pod. A series that went down (its sidecar
    /// restarted) counts from zero.
    fn deltas(&self, name: &str) -> Vec<(&str, &Sample, f64)> {
        let before: HashMap<Key, f64> = self
            .prev
            .map(|p| {
                p.pods
                    .iter()
                    .flat_map(|(pod, samples)| {
                        samples
                            .iter()
                            .filter(|s| s.name == name)
                            .map(move |s| ((pod.clone(), s.labels.clone()), s.value))
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.cur
            .pods
            .iter()
            .flat_map(|(pod, samples)| {
                samples
                    .iter()
                    .filter(|s| s.name == name)
                    .map(|s| (pod.as_str(), s))
            })
            .map(|(pod, s)| {
                let was = before
                    .get(&(pod.to_string(), s.labels.clone()))
                    .copied()
                    .unwrap_or(0.0);
                let d = if s.value >= was {
                    s.value - was
                } else {
                    s.value
                };
                (pod, s, d)
            })
            .collect()
    }

    /// Sum of increases of `name` over samples `keep` accepts.
    pub fn increase(&self, name: &str, keep: impl Fn(&str, &Sample) -> bool) -> f64 {
        self.deltas(name)
            .into_iter()
            .filter(|(pod, s, _)| keep(pod, s))
            .map(|(_, _, d)| d)
            .sum()
    }

    /// p50 and p99 of the request-duration observations `keep` accepts.
    fn latency(&self, keep: impl Fn(&str, &Sample) -> bool) -> (Option<f64>, Option<f64>) {
        let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for (pod, s, d) in self.deltas("bulwark_request_duration_seconds_bucket") {
            if !keep(pod, s) {
                continue;
            }
            let le = match s.label("le") {
                Some("+Inf") => f64::INFINITY,
                Some(v) => match v.parse::<f64>() {
                    Ok(v) => v,
                    Err(_) => continue,
                },
                None => continue,
            };
            buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += d;
        }
        let b: Vec<(f64, f64)> = buckets.into_values().collect();
        (quantile(&b, 0.5), quantile(&b, 0.99))
    }

    /// Outbound HTTP requests per (pod, service, route).
    pub fn routes(&self) -> Vec<RouteRow> {
        let mut rows: BTreeMap<(String, String, String), RouteRow> = BTreeMap::new();
        for (pod, s, d) in self.deltas("bulwark_requests_total") {
            if s.label("direction") != Some("outbound") {
                continue;
            }
            let service = s.label("service").unwrap_or("?").to_string();
            let route = s.label("route").unwrap_or("?").to_string();
            let row = rows
                .entry((pod.to_string(), service.clone(), route.clone()))
                .or_insert_with(|| RouteRow {
                    pod: pod.to_string(),
                    service,
                    route,
                    requests: 0.0,
                    ok: 0.0,
                    p50: None,
                    p99: None,
                });
            row.requests += d;
            if success(s) {
                row.ok += d;
            }
        }
        for row in rows.values_mut() {
            (row.p50, row.p99) = self.latency(|pod, s| {
                pod == row.pod
                    && s.label("direction") == Some("outbound")
                    && s.label("service") == Some(&row.service)
                    && s.label("route") == Some(&row.route)
            });
        }
        rows.into_values().collect()
    }

    /// Inbound traffic per (source identity, destination identity).
    pub fn pairs(&self) -> Vec<PairRow> {
        let mut rows: BTreeMap<(String, String), PairRow> = BTreeMap::new();
        for (metric, is_request) in [
            ("bulwark_requests_total", true),
            ("bulwark_tcp_connections_total", false),
        ] {
            for (_, s, d) in self.deltas(metric) {
                if s.label("direction") != Some("inbound") {
                    continue;
                }
                let src = s.label("src_identity").unwrap_or("").to_string();
                let dst = s.label("dst_identity").unwrap_or("").to_string();
                let r = rows
                    .entry((src.clone(), dst.clone()))
                    .or_insert_with(|| PairRow {
                        src,
                        dst,
                        requests: 0.0,
                        ok: 0.0,
                        p50: None,
                        p99: None,
                        connections: 0.0,
                    });
                if is_request {
                    r.requests += d;
                    if success(s) {
                        r.ok += d;
                    }
                } else {
                    r.connections += d;
                }
            }
        }
        for r in rows.values_mut() {
            (r.p50, r.p99) = self.latency(|_, s| {
                s.label("direction") == Some("inbound")
                    && s.label("src_identity") == Some(&r.src)
                    && s.label("dst_identity") == Some(&r.dst)
            });
        }
        rows.into_values().collect()
    }

    /// Requests from `src` served by each api pod: (pod, version, count).
    pub fn canary(&self, plan: &Plan, src: &str) -> Vec<(&'static str, &'static str, f64)> {
        plan.api_versions()
            .into_iter()
            .map(|(pod, version)| {
                let n = self.increase("bulwark_requests_total", |p, s| {
                    p == pod
                        && s.label("direction") == Some("inbound")
                        && s.label("src_identity") == Some(src)
                });
                (pod, version, n)
            })
            .collect()
    }

    /// Successful inbound mTLS handshakes at the pods in `pods`.
    pub fn handshakes_ok(&self, pods: &[&str]) -> f64 {
        self.increase("bulwark_tls_handshakes_total", |p, s| {
            pods.contains(&p) && s.has(&[("direction", "inbound"), ("result", "ok")])
        })
    }

    /// Plaintext connections the sidecars reset (STRICT mTLS).
    pub fn plaintext_refused(&self) -> f64 {
        self.increase("bulwark_tcp_refused_total", |_, s| {
            s.label("reason") == Some("plaintext")
        })
    }

    /// Bulkhead rejections per (pod, service).
    pub fn bulkhead_rejections(&self) -> Vec<(String, String, f64)> {
        self.deltas("bulwark_bulkhead_rejections_total")
            .into_iter()
            .map(|(pod, s, d)| {
                (
                    pod.to_string(),
                    s.label("service").unwrap_or("?").to_string(),
                    d,
                )
            })
            .collect()
    }
}

fn success(s: &Sample) -> bool {
    s.label("code")
        .and_then(|c| c.parse::<u16>().ok())
        .is_some_and(|c| (1..500).contains(&c))
}

/// Breaker state per (pod, service): 0 closed, 1 open, 2 half-open.
pub fn breakers(s: &Scrape) -> Vec<(String, String, f64)> {
    s.pods
        .iter()
        .flat_map(|(pod, samples)| {
            samples
                .iter()
                .filter(|x| x.name == "bulwark_breaker_state")
                .map(move |x| {
                    (
                        pod.clone(),
                        x.label("service").unwrap_or("?").to_string(),
                        x.value,
                    )
                })
        })
        .collect()
}

pub fn breaker_name(state: f64) -> &'static str {
    match state as i64 {
        0 => "closed",
        1 => "OPEN",
        2 => "half-open",
        _ => "?",
    }
}

/// Seconds until each pod's SVID expires.
pub fn cert_ttls(s: &Scrape) -> Vec<(String, i64)> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    s.pods
        .iter()
        .filter_map(|(pod, samples)| {
            let exp = samples
                .iter()
                .find(|x| x.name == "bulwark_cert_expiry_timestamp_seconds")?;
            Some((pod.clone(), exp.value as i64 - now))
        })
        .collect()
}

/// Short form of a SPIFFE ID for the view: `sa/web`.
pub fn short_id(id: &str) -> String {
    match id.rsplit_once("/sa/") {
        Some((_, sa)) => format!("sa/{sa}"),
        None if id.is_empty() => "-".to_string(),
        None => id.to_string(),
    }
}

/// `1h02m`, `59m10s`, `42s`.
pub fn human_secs(s: i64) -> String {
    if s < 0 {
        return "EXPIRED".to_string();
    }
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn ms(v: Option<f64>) -> String {
    match v {
        Some(s) if s * 1000.0 >= 100.0 => format!("{:.0}ms", s * 1000.0),
        Some(s) => format!("{:.1}ms", s * 1000.0),
        None => "-".to_string(),
    }
}
