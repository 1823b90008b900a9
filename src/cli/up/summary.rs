//! The end-of-run summary, made for scripts as much as for people.
//!
//! Every line is `summary: ` followed by space-separated `key=value`
//! fields; values never contain spaces, lists are comma-separated, and
//! numbers are plain decimals. The lines, in this order (values here are
//! examples):
//!
//! ```text
//! summary: window_s=20.0 requests=800 ok=800 failed=0 success_rate=1.0000 rps=40.0 last_error=-
//! summary: route=web:default/api:canary requests=800 success_rate=1.0000 p50_ms=3.1 p99_ms=9.8
//! summary: pair=web->api protocol=http src=spiffe://cluster.local/ns/default/sa/web dst=spiffe://cluster.local/ns/default/sa/api requests=800 connections=0 identity_seen=yes handshakes_ok_total=2 mtls=yes
//! summary: pair=api->db protocol=tcp src=spiffe://cluster.local/ns/default/sa/api dst=spiffe://cluster.local/ns/default/sa/db requests=0 connections=80 identity_seen=yes handshakes_ok_total=84 mtls=yes
//! summary: mtls_pairs=web->api,api->db expected_pairs=web->api,api->db
//! summary: canary_v1=722 canary_v2=78 canary_v2_share=0.098 config_v2_share=0.100 config_changes=0 deviation_points=0.2 within_5_points=yes
//! summary: outsider_attempts=20 outsider_refused=20 outsider_answered=0 outsider_timeouts=0 sidecar_plaintext_resets=20
//! summary: breakers_open=0 bulkhead_rejections=0
//! summary: cert_ttl_s=web:3541,api-v1:3541,api-v2:3542,db:3542
//! summary: control_plane_converged=yes version=<v> sidecars=4 on_version=4
//! summary: result=ok
//! ```
//!
//! - The window is the measured run: from the moment the mesh was up (the
//!   readiness probes are not counted) to the end of `--duration`.
//! - `requests`/`ok`/`failed` are the load generator's own end-to-end
//!   view (a request is ok when web answered 200, which it does only when
//!   api answered, which it does only when db answered).
//! - `route=` lines: one per (sidecar pod, service, route) of outbound
//!   HTTP, from the sidecars' `bulwark_requests_total` and
//!   `bulwark_request_duration_seconds` (success = not 5xx).
//! - `pair=` lines: one per meshed hop. `requests`/`connections` count the
//!   window's inbound requests (`bulwark_requests_total`) and connections
//!   (`bulwark_tcp_connections_total`) at the callee's sidecars labelled
//!   with the caller's SPIFFE ID as `src_identity`, which a sidecar only
//!   learns from a verified client certificate; `identity_seen` says such a
//!   sample exists at all, `handshakes_ok_total` counts the callee pods'
//!   `bulwark_tls_handshakes_total{direction="inbound",result="ok"}` since
//!   start. `mtls=yes` needs all three: traffic in the window, the
//!   identity, and handshakes.
//! - `canary_*`: requests the api pods served for web in the window, by
//!   the pods' `version` label. `config_v2_share` is the v2 weight of the
//!   config, averaged over the run weighted by requests (the config may be
//!   edited while `up` runs: each second's requests count against the
//!   weights in force then); `config_changes` counts edits that changed
//!   it; `none` if the config has no version split, and then
//!   `within_5_points=n/a`. `deviation_points` = |share - config| x 100.
//! - `outsider_*`: the outsider pod's plaintext attempts straight at the
//!   api pods (refused = reset, closed or refused connection; answered =
//!   any HTTP answer, i.e. STRICT mTLS failed); `sidecar_plaintext_resets`
//!   is the api sidecars' `bulwark_tcp_refused_total{reason="plaintext"}`.
//! - `result=ok` when: success_rate >= 0.99, every expected pair has
//!   `mtls=yes`, the canary share is within 5 points of the config, and
//!   the outsider tried, was refused and never answered. Otherwise
//!   `result=fail reasons=<comma-separated>`.

use std::sync::atomic::Ordering;

use super::plan::{PAIRS, Plan};
use super::probe::Scrape;
use super::stats::{self, Window};
use super::traffic::Traffic;

/// Lowest end-to-end success rate of a good run.
pub const MIN_SUCCESS: f64 = 0.99;
/// Largest distance of the canary share from the config, in share (0.05 = 5 points).
pub const CANARY_TOLERANCE: f64 = 0.05;

/// What the canary share should be over a run whose config may change:
/// each second's configured v2 share, weighted by the api requests served
/// in that second.
pub struct Expected {
    weighted: f64,
    requests: f64,
    /// The configured v2 share now.
    pub current: Option<f64>,
    pub changes: u32,
}

impl Expected {
    pub fn new(current: Option<f64>) -> Self {
        Expected {
            weighted: 0.0,
            requests: 0.0,
            current,
            changes: 0,
        }
    }

    /// The config now says `share`.
    pub fn set(&mut self, share: Option<f64>) {
        if share != self.current {
            self.changes += 1;
            self.current = share;
        }
    }

    /// `requests` were served under the current config.
    pub fn served(&mut self, requests: f64) {
        if let Some(c) = self.current {
            self.weighted += c * requests;
            self.requests += requests;
        }
    }

    pub fn share(&self) -> Option<f64> {
        if self.requests > 0.0 {
            Some(self.weighted / self.requests)
        } else {
            self.current
        }
    }
}

pub struct Summary {
    lines: Vec<String>,
    failures: Vec<String>,
}

impl Summary {
    pub fn compute(
        plan: &Plan,
        baseline: &Scrape,
        last: &Scrape,
        traffic: &Traffic,
        canary: &Expected,
    ) -> Summary {
        let run = Window {
            prev: Some(baseline),
            cur: last,
        };
        let ever = Window {
            prev: None,
            cur: last,
        };
        let mut lines = Vec::new();
        let mut failures = Vec::new();

        let l = &traffic.load;
        let sent = l.sent.load(Ordering::Relaxed);
        let ok = l.ok.load(Ordering::Relaxed);
        let failed = l.failed.load(Ordering::Relaxed);
        let rate = if sent > 0 {
            ok as f64 / sent as f64
        } else {
            0.0
        };
        let secs = run.secs();
        let last_error = l
            .last_error
            .lock()
            .expect("stats lock")
            .clone()
            .map_or("-".to_string(), |e| e.replace(char::is_whitespace, "_"));
        lines.push(format!(
            "window_s={secs:.1} requests={sent} ok={ok} failed={failed} success_rate={rate:.4} rps={:.1} last_error={last_error}",
            if secs > 0.0 { sent as f64 / secs } else { 0.0 }
        ));
        if sent == 0 {
            failures.push("no_requests".to_string());
        } else if rate < MIN_SUCCESS {
            failures.push(format!("success_rate_{rate:.3}"));
        }

        for r in run.routes() {
            lines.push(format!(
                "route={}:{}:{} requests={:.0} success_rate={:.4} p50_ms={} p99_ms={}",
                r.pod,
                r.service,
                r.route,
                r.requests,
                if r.requests > 0.0 {
                    r.ok / r.requests
                } else {
                    0.0
                },
                ms_value(r.p50),
                ms_value(r.p99),
            ));
        }

        let window_pairs = run.pairs();
        let ever_pairs = ever.pairs();
        let mut good_pairs = Vec::new();
        for p in &PAIRS {
            let (src, dst) = (plan.identity(p.from_sa), plan.identity(p.to_sa));
            let find = |rows: &[stats::PairRow]| {
                rows.iter()
                    .find(|r| r.src == src && r.dst == dst)
                    .map_or((0.0, 0.0), |r| (r.requests, r.connections))
            };
            let (requests, connections) = find(&window_pairs);
            let (ever_req, ever_conn) = find(&ever_pairs);
            let dst_pods: Vec<&str> = plan
                .meshed()
                .filter(|(_, m)| m.sa == p.to_sa)
                .map(|(pod, _)| pod.name)
                .collect();
            let handshakes = ever.handshakes_ok(&dst_pods);
            let seen = ever_req + ever_conn > 0.0;
            let mtls = requests + connections > 0.0 && seen && handshakes > 0.0;
            if mtls {
                good_pairs.push(p.label());
            } else {
                failures.push(format!("no_mtls_{}", p.label()));
            }
            lines.push(format!(
                "pair={} protocol={} src={src} dst={dst} requests={requests:.0} connections={connections:.0} identity_seen={} handshakes_ok_total={handshakes:.0} mtls={}",
                p.label(),
                p.protocol,
                yes(seen),
                yes(mtls),
            ));
        }
        lines.push(format!(
            "mtls_pairs={} expected_pairs={}",
            if good_pairs.is_empty() {
                "-".to_string()
            } else {
                good_pairs.join(",")
            },
            PAIRS
                .iter()
                .map(|p| p.label())
                .collect::<Vec<_>>()
                .join(",")
        ));

        let served = run.canary(plan, &plan.identity("web"));
        let count = |v: &str| -> f64 {
            served
                .iter()
                .filter(|(_, version, _)| *version == v)
                .map(|(_, _, n)| n)
                .sum()
        };
        let (v1, v2) = (count("v1"), count("v2"));
        let share = if v1 + v2 > 0.0 {
            Some(v2 / (v1 + v2))
        } else {
            None
        };
        let (cfg, deviation, within) = match (canary.share(), share) {
            (Some(c), Some(s)) => {
                let d = (s - c).abs();
                let within = d <= CANARY_TOLERANCE + 1e-9;
                if !within {
                    failures.push(format!("canary_off_by_{:.1}_points", d * 100.0));
                }
                (format!("{c:.3}"), format!("{:.1}", d * 100.0), yes(within))
            }
            (Some(c), None) => {
                failures.push("canary_no_traffic".to_string());
                (format!("{c:.3}"), "-".to_string(), "no")
            }
            (None, _) => ("none".to_string(), "-".to_string(), "n/a"),
        };
        lines.push(format!(
            "canary_v1={v1:.0} canary_v2={v2:.0} canary_v2_share={} config_v2_share={cfg} config_changes={} deviation_points={deviation} within_5_points={within}",
            share.map_or("-".to_string(), |s| format!("{s:.3}")),
            canary.changes,
        ));

        let o = &traffic.outsider;
        let attempts = o.attempts.load(Ordering::Relaxed);
        let refused = o.refused.load(Ordering::Relaxed);
        let answered = o.answered.load(Ordering::Relaxed);
        let timeouts = o.timeouts.load(Ordering::Relaxed);
        lines.push(format!(
            "outsider_attempts={attempts} outsider_refused={refused} outsider_answered={answered} outsider_timeouts={timeouts} sidecar_plaintext_resets={:.0}",
            run.plaintext_refused()
        ));
        if attempts == 0 {
            failures.push("outsider_never_tried".to_string());
        } else if answered > 0 {
            failures.push("outsider_answered".to_string());
        } else if refused == 0 {
            failures.push("outsider_not_refused".to_string());
        }

        let open = stats::breakers(last)
            .iter()
            .filter(|(_, _, s)| *s == 1.0)
            .count();
        // `+ 0.0`: an empty float sum is -0.0, which prints as "-0".
        let rejected: f64 = run
            .bulkhead_rejections()
            .iter()
            .map(|(_, _, n)| n)
            .sum::<f64>()
            + 0.0;
        lines.push(format!(
            "breakers_open={open} bulkhead_rejections={rejected:.0}"
        ));

        let certs = stats::cert_ttls(last);
        lines.push(format!(
            "cert_ttl_s={}",
            if certs.is_empty() {
                "-".to_string()
            } else {
                certs
                    .iter()
                    .map(|(pod, ttl)| format!("{pod}:{ttl}"))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        ));

        lines.push(match &last.control {
            Ok(s) => format!(
                "control_plane_converged={} version={} sidecars={} on_version={}",
                yes(s.converged),
                s.system_version.replace(char::is_whitespace, "_"),
                s.sidecars_total,
                s.sidecars_on_version
            ),
            Err(_) => {
                "control_plane_converged=unknown version=- sidecars=0 on_version=0".to_string()
            }
        });

        lines.push(if failures.is_empty() {
            "result=ok".to_string()
        } else {
            format!("result=fail reasons={}", failures.join(","))
        });
        Summary { lines, failures }
    }

    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn lines(&self) -> impl Iterator<Item = String> + '_ {
        self.lines.iter().map(|l| format!("summary: {l}"))
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn ms_value(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |s| format!("{:.1}", s * 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_canary_share_weights_each_config_by_the_requests_it_routed() {
        let mut e = Expected::new(Some(0.1));
        e.served(300.0);
        e.set(Some(0.5));
        e.served(100.0);
        assert_eq!(e.changes, 1);
        let share = e.share().unwrap();
        assert!((share - 0.2).abs() < 1e-9, "{share}");
        assert_eq!(Expected::new(None).share(), None);
    }
}
