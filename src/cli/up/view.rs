//! The live view: one frame per second, redrawn in place with plain ANSI
//! escapes (home, clear to end of line / of screen), so it needs no
//! terminal library and degrades to a plain log when stdout is not a
//! terminal.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::net;
use super::plan::Plan;
use super::probe::Scrape;
use super::stats::{self, Window, human_secs, ms, short_id};
use super::traffic::Traffic;

pub struct Frame<'a> {
    pub plan: &'a Plan,
    pub config_dir: &'a Path,
    pub uptime: Duration,
    /// The last few seconds, for rates and latencies.
    pub recent: Window<'a>,
    /// Since the mesh was up, for totals.
    pub run: Window<'a>,
    pub traffic: &'a Traffic,
    pub config_v2_share: Option<f64>,
    /// Ends the run (`--duration`), if any.
    pub remaining: Option<Duration>,
}

pub fn render(f: &Frame) -> String {
    let mut o = String::new();
    let secs = f.recent.secs().max(0.001);
    let cur: &Scrape = f.recent.cur;
    let up = f.uptime.as_secs();
    let _ = writeln!(
        o,
        "bulwark up — local mesh   uptime {:02}:{:02}   config {}   {}",
        up / 60,
        up % 60,
        f.config_dir.display(),
        match f.remaining {
            Some(r) => format!("{}s left", r.as_secs()),
            None => "Ctrl-C tears it down".to_string(),
        }
    );
    let _ = writeln!(o, "{}", control_line(cur));
    o.push('\n');

    // End to end, as the load generator in the web pod sees it.
    let l = &f.traffic.load;
    let (sent, ok) = (l.sent.load(Ordering::Relaxed), l.ok.load(Ordering::Relaxed));
    let _ = writeln!(
        o,
        "load  web pod -> web app :{} ({} req/s target)   sent {sent}   ok {ok}   success {}{}",
        f.plan.web_port,
        f.traffic.rps,
        pct(ok as f64, sent as f64),
        match &*l.last_error.lock().expect("stats lock") {
            Some(e) if sent > ok => format!("   last error: {}", truncate(e, 60)),
            _ => String::new(),
        }
    );
    o.push('\n');

    let _ = writeln!(
        o,
        "{:<34} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "ROUTE (sidecar: service/route)", "req/s", "success", "p50", "p99", "total"
    );
    let totals = f.run.routes();
    for r in f.recent.routes() {
        let total = totals
            .iter()
            .find(|t| (&t.pod, &t.service, &t.route) == (&r.pod, &r.service, &r.route))
            .map_or(0.0, |t| t.requests);
        let _ = writeln!(
            o,
            "{:<34} {:>8.1} {:>9} {:>9} {:>9} {:>9.0}",
            truncate(&format!("{}: {}/{}", r.pod, r.service, r.route), 34),
            r.requests / secs,
            pct(r.ok, r.requests),
            ms(r.p50),
            ms(r.p99),
            total
        );
    }
    o.push('\n');

    let _ = writeln!(
        o,
        "{:<24} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "IDENTITY (src -> dst)", "req/s", "success", "p50", "p99", "conns/s"
    );
    for p in f.recent.pairs() {
        let _ = writeln!(
            o,
            "{:<24} {:>8.1} {:>9} {:>9} {:>9} {:>9.1}",
            format!("{} -> {}", short_id(&p.src), short_id(&p.dst)),
            p.requests / secs,
            if p.requests > 0.0 {
                pct(p.ok, p.requests)
            } else {
                "-".to_string()
            },
            ms(p.p50),
            ms(p.p99),
            p.connections / secs
        );
    }
    o.push('\n');

    let web = f.plan.identity("web");
    let served = f.run.canary(f.plan, &web);
    let total: f64 = served.iter().map(|(_, _, n)| n).sum();
    let mut canary = String::from("canary  api pods' requests from web:");
    for (pod, version, n) in &served {
        let _ = write!(canary, "  {pod} ({version}) {} {n:.0}", pct(*n, total));
    }
    let _ = write!(
        canary,
        "   config: v2 {}",
        f.config_v2_share
            .map_or("no split".to_string(), |s| format!("{:.0}%", s * 100.0))
    );
    let _ = writeln!(o, "{canary}");

    let mut res = String::from("resilience");
    let rejections = f.run.bulkhead_rejections();
    let breakers = stats::breakers(cur);
    if breakers.is_empty() && rejections.is_empty() {
        res.push_str("  (no breaker or bulkhead has been exercised yet)");
    }
    for (pod, service, state) in &breakers {
        let _ = write!(
            res,
            "  {pod}→{service}: breaker {}",
            stats::breaker_name(*state)
        );
    }
    // `+ 0.0`: an empty float sum is -0.0, which prints as "-0".
    let rejected: f64 = rejections.iter().map(|(_, _, n)| n).sum::<f64>() + 0.0;
    let _ = write!(res, "   bulkhead rejections {rejected:.0}");
    let _ = writeln!(o, "{res}");

    let mut certs = String::from("certs   SVID expires in:");
    for (pod, ttl) in stats::cert_ttls(cur) {
        let _ = write!(certs, "  {pod} {}", human_secs(ttl));
    }
    let issued: f64 = cur
        .ca
        .iter()
        .filter(|s| s.name == "bulwark_ca_certificates_issued_total")
        .map(|s| s.value)
        .sum();
    let _ = write!(certs, "   (CA issued {issued:.0})");
    let _ = writeln!(o, "{certs}");

    let out = &f.traffic.outsider;
    let _ = writeln!(
        o,
        "outsider  plaintext to {} every 1s: attempts {}  refused {}  ANSWERED {}  timeouts {}   (api sidecars reset {:.0} plaintext conns)",
        f.traffic
            .outsider_targets
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(","),
        out.attempts.load(Ordering::Relaxed),
        out.refused.load(Ordering::Relaxed),
        out.answered.load(Ordering::Relaxed),
        out.timeouts.load(Ordering::Relaxed),
        f.run.plaintext_refused()
    );
    let missing: Vec<&str> = f
        .plan
        .meshed()
        .map(|(p, _)| p.name)
        .filter(|p| !cur.pods.contains_key(*p))
        .collect();
    if !missing.is_empty() {
        let _ = writeln!(o, "NOT ANSWERING /metrics: {}", missing.join(", "));
    }
    o.push('\n');
    let _ = writeln!(
        o,
        "try  ip netns exec {} curl -s http://127.0.0.1:{}/     (edit {} and watch the mesh follow)",
        net::ns_name("web"),
        f.plan.web_port,
        f.config_dir.join("api-traffic.yaml").display()
    );
    o
}

fn control_line(s: &Scrape) -> String {
    match &s.control {
        Ok(r) => {
            let mut line = format!(
                "control plane {}:15010   {}   sidecars connected {}",
                net::GATEWAY,
                r.convergence_line(),
                r.sidecars_total
            );
            if let Some(rej) = &r.config_rejected {
                let _ = write!(
                    line,
                    "   CONFIG REJECTED ({} errors; serving the last good config): {}",
                    rej.errors.len(),
                    rej.errors.first().map_or("", |e| e.as_str())
                );
            }
            line
        }
        Err(e) => format!("control plane {}:15011 unreachable: {e}", net::GATEWAY),
    }
}

fn pct(part: f64, whole: f64) -> String {
    if whole <= 0.0 {
        "-".to_string()
    } else {
        format!("{:.1}%", 100.0 * part / whole)
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Draws `frame` over the previous one on a terminal; on anything else
/// just prints it.
pub fn draw(frame: &str, terminal: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if terminal {
        // Home, each line cleared to its end, then the rest of the screen.
        let _ = write!(out, "\x1b[H");
        for line in frame.lines() {
            let _ = writeln!(out, "{line}\x1b[K");
        }
        let _ = write!(out, "\x1b[J");
    } else {
        let _ = writeln!(out, "{frame}");
    }
    let _ = out.flush();
}
