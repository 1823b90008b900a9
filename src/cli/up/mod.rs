//! `bulwark up`: a real local mesh in one command.
//!
//! Pods are network namespaces on a bridge (see [`net`]); every component
//! is this binary: the CA and the control plane in the switch namespace,
//! and in each meshed pod `bulwark init` (interception rules), a `bulwark
//! demo-app` and a `bulwark sidecar` that takes its config from the
//! control plane and its identity from the CA. The `outsider` pod has
//! neither. `up` drives load from inside the `web` pod, has the outsider
//! knock on api in plaintext, and shows what the sidecars report.
//!
//! The run, top to bottom: check the machine ([`host::preflight`]), take
//! the one-mesh lock, remove what a previous run left, install the stop
//! events (signals, panics), bring the mesh up ([`mesh::Mesh::start`]),
//! measure (live view, or `--duration` then the [`summary`]), tear down
//! (or, with `--keep`, leave it running and say how to reach it).

mod events;
mod host;
mod mesh;
mod metrics;
mod net;
mod plan;
mod probe;
mod procs;
mod stats;
mod summary;
mod traffic;
mod view;

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use events::Stop;
use mesh::{Mesh, say};
use plan::Plan;
use probe::Scrape;
use stats::Window;

#[derive(Args)]
pub struct UpArgs {
    /// Mesh config directory the control plane serves. It is watched:
    /// editing a file changes the running mesh (e.g. the canary weights).
    #[arg(long, default_value = "deploy/examples")]
    config: PathBuf,
    /// Run non-interactively for this long once the mesh is up (e.g. 20,
    /// 90s, 5m), print the summary, tear down. Exits non-zero if the
    /// summary's checks failed.
    #[arg(long, value_parser = super::parse_duration)]
    duration: Option<Duration>,
    /// Leave the mesh running when `up` ends (after --duration, or on
    /// Ctrl-C) and print how to reach it; `bulwark up --down` removes it.
    #[arg(long)]
    keep: bool,
    /// Where the CA, tokens and logs live while the mesh runs.
    #[arg(long, default_value = "/run/bulwark-up")]
    state_dir: PathBuf,
    /// Tear down a mesh left by `--keep` or by a killed `up` (asking a
    /// running `up` to end first), then exit.
    #[arg(long, conflicts_with_all = ["duration", "keep"])]
    down: bool,
    /// Requests per second the load generator sends from the web pod.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=2000))]
    rps: u32,
    /// Lifetime of the certificates the CA issues; sidecars renew at
    /// about half of it (e.g. 1m for a rotation every ~30 s in a soak).
    #[arg(long, default_value = "1h", value_parser = super::parse_duration)]
    svid_ttl: Duration,
}

pub fn run(a: UpArgs) -> anyhow::Result<()> {
    host::preflight()?;
    let state_dir = std::path::absolute(&a.state_dir)
        .with_context(|| format!("--state-dir {}", a.state_dir.display()))?;
    if a.down {
        return down(&state_dir);
    }
    let config_dir = a.config.canonicalize().with_context(|| {
        format!(
            "config dir {} not found; pass --config DIR (e.g. deploy/examples of the source tree)",
            a.config.display()
        )
    })?;
    let plan = Plan::from_config(&config_dir)?;
    let canary = summary::Expected::new(plan::canary_share(&plan::load(&config_dir)?));

    let lock = host::Lock::acquire(&state_dir)?;
    remove_leftovers(lock.previous_state_dir.as_deref(), &state_dir)?;
    let stop = events::install()?;
    let opts = mesh::Options {
        exe: std::env::current_exe().context("cannot find this program's path")?,
        config_dir: config_dir.clone(),
        state_dir: state_dir.clone(),
        tether: if a.keep {
            procs::Tether::Detached
        } else {
            procs::Tether::DieWithUp
        },
        svid_ttl: a.svid_ttl,
    };
    let mut mesh = Mesh::start(&plan, &opts, &stop)?;
    let outcome = measure(&mut mesh, &plan, &a, &config_dir, canary, &stop);
    if a.keep && outcome.is_ok() {
        print_access(&plan, &config_dir, &state_dir);
        mesh.leave_running();
    } else {
        mesh.teardown();
    }
    drop(lock);
    match outcome? {
        Outcome::Finished { ok: true } => Ok(()),
        Outcome::Finished { ok: false } => {
            bail!("the mesh did not behave as configured: see `summary: result=fail` above")
        }
        Outcome::Stopped(why) if a.duration.is_none() && why.starts_with("interrupted") => Ok(()),
        Outcome::Stopped(why) => bail!("stopped early: {why}"),
    }
}

enum Outcome {
    /// `--duration` elapsed; whether the summary's checks passed.
    Finished { ok: bool },
    /// A signal or a panic ended the run.
    Stopped(String),
}

/// The measured run: traffic on, a scrape per second (drawn, or a
/// progress line every 5 s with `--duration`), then the summary.
fn measure(
    mesh: &mut Mesh,
    plan: &Plan,
    a: &UpArgs,
    config_dir: &Path,
    mut canary: summary::Expected,
    stop: &Receiver<Stop>,
) -> anyhow::Result<Outcome> {
    let baseline = mesh.scrape();
    mesh.start_traffic(plan, a.rps)?;
    let started = Instant::now();
    let end = a.duration.map(|d| started + d);
    let interactive = a.duration.is_none();
    let terminal = std::io::stdout().is_terminal();
    if interactive && terminal {
        // A clean screen for the redraws.
        print!("\x1b[2J");
    }
    // The last ~10 s of scrapes: the view's rates and latencies.
    let mut recent: VecDeque<Scrape> = VecDeque::new();
    let mut next_tick = started;
    let mut next_progress = started + Duration::from_secs(5);
    let stopped = loop {
        // One frame a second; after a slow scrape, resume the beat rather
        // than scrape back to back to catch up.
        next_tick = (next_tick + Duration::from_secs(1)).max(Instant::now());
        let wake = end.map_or(next_tick, |e| e.min(next_tick));
        match stop.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(Stop(why)) => break Some(why),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        }
        mesh.check_alive()?;
        if end.is_some_and(|e| Instant::now() >= e) {
            break None;
        }
        let scrape = mesh.scrape();
        // The requests since the last scrape were routed by the config
        // known until now; then follow any edit (an invalid one keeps the
        // last good config, as the control plane does).
        canary.served(api_requests(
            plan,
            recent.back().unwrap_or(&baseline),
            &scrape,
        ));
        if let Ok(r) = plan::load(config_dir) {
            canary.set(plan::canary_share(&r));
        }
        recent.push_back(scrape);
        while recent.len() > 11 {
            recent.pop_front();
        }
        let cur = recent.back().expect("just pushed");
        let traffic = mesh.traffic.as_ref().expect("traffic started");
        if interactive {
            let frame = view::render(&view::Frame {
                plan,
                config_dir,
                uptime: started.elapsed(),
                recent: Window {
                    // Until a second scrape exists, the baseline.
                    prev: recent.front().filter(|f| f.at < cur.at).or(Some(&baseline)),
                    cur,
                },
                run: Window {
                    prev: Some(&baseline),
                    cur,
                },
                traffic,
                config_v2_share: canary.current,
                remaining: end.map(|e| e.saturating_duration_since(Instant::now())),
            });
            view::draw(&frame, terminal);
        } else if Instant::now() >= next_progress {
            next_progress += Duration::from_secs(5);
            println!("{}", progress_line(plan, &baseline, cur, traffic, started));
        }
    };
    mesh.stop_traffic();
    let last = mesh.scrape();
    canary.served(api_requests(
        plan,
        recent.back().unwrap_or(&baseline),
        &last,
    ));
    let traffic = mesh.traffic.as_ref().expect("traffic started");
    let summary = summary::Summary::compute(plan, &baseline, &last, traffic, &canary);
    if let Some(why) = &stopped {
        say(&format!("{why}; summary of the run so far:"));
    }
    for line in summary.lines() {
        println!("{line}");
    }
    Ok(match stopped {
        Some(why) => Outcome::Stopped(why),
        None => Outcome::Finished { ok: summary.ok() },
    })
}

/// Requests from web the api pods served between two scrapes.
fn api_requests(plan: &Plan, prev: &Scrape, cur: &Scrape) -> f64 {
    Window {
        prev: Some(prev),
        cur,
    }
    .canary(plan, &plan.identity("web"))
    .iter()
    .map(|(_, _, n)| n)
    .sum()
}

/// `progress: t=5s requests=200 ok=200 v2_share=0.095 outsider_refused=5`
fn progress_line(
    plan: &Plan,
    baseline: &Scrape,
    cur: &Scrape,
    traffic: &traffic::Traffic,
    started: Instant,
) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let run = Window {
        prev: Some(baseline),
        cur,
    };
    let served = run.canary(plan, &plan.identity("web"));
    let total: f64 = served.iter().map(|(_, _, n)| n).sum();
    let v2: f64 = served
        .iter()
        .filter(|(_, v, _)| *v == "v2")
        .map(|(_, _, n)| n)
        .sum();
    format!(
        "progress: t={}s requests={} ok={} v2_share={} outsider_attempts={} outsider_refused={}",
        started.elapsed().as_secs(),
        traffic.load.sent.load(Relaxed),
        traffic.load.ok.load(Relaxed),
        if total > 0.0 {
            format!("{:.3}", v2 / total)
        } else {
            "-".to_string()
        },
        traffic.outsider.attempts.load(Relaxed),
        traffic.outsider.refused.load(Relaxed),
    )
}

/// Removes what an earlier run left: namespaces and their processes,
/// stray host links, processes still naming a state dir, the state dirs
/// (the one recorded in the lock and this run's).
fn remove_leftovers(previous: Option<&Path>, state_dir: &Path) -> anyhow::Result<()> {
    let removed = net::remove_stale()?;
    let mut killed = removed.processes;
    let mut dirs = Vec::new();
    for dir in [previous, Some(state_dir)].into_iter().flatten() {
        if dirs.iter().any(|d: &PathBuf| d == dir) {
            continue;
        }
        for pid in host::procs_mentioning(dir) {
            // SAFETY: plain syscall; the pid runs `bulwark` with our state dir.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            killed += 1;
        }
        let removed_dir = if dir == state_dir {
            host::remove_state_dir(dir)?
        } else {
            // Someone else's business now if it is no longer ours.
            host::remove_state_dir(dir).unwrap_or(false)
        };
        if removed_dir {
            dirs.push(dir.to_path_buf());
        }
    }
    if !removed.namespaces.is_empty() || !removed.links.is_empty() || killed > 0 || !dirs.is_empty()
    {
        say(&format!(
            "removed leftovers of a previous run: {} namespaces, {} host links, {killed} processes, state dirs [{}]",
            removed.namespaces.len(),
            removed.links.len(),
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(())
}

/// `--down`: end a running `up` (it tears down itself), then remove
/// whatever is left.
fn down(state_dir: &Path) -> anyhow::Result<()> {
    let mut lock = host::Lock::acquire_stopping_holder(Duration::from_secs(30))?;
    remove_leftovers(lock.previous_state_dir.as_deref(), state_dir)?;
    lock.record(Path::new(""))?;
    say("down: no namespace, process or state dir of `bulwark up` remains");
    Ok(())
}

/// How to reach a mesh left running (`--keep`).
fn print_access(plan: &Plan, config_dir: &Path, state_dir: &Path) {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "bulwark".to_string());
    let ns = net::ns_name;
    let web = ns("web");
    println!();
    println!(
        "The mesh keeps running (state and logs in {}).",
        state_dir.display()
    );
    println!("Pods (each a network namespace; run commands in one with `ip netns exec <ns> ...`):");
    for p in &plan.pods {
        let what = match &p.mesh {
            Some(m) => format!("identity {}", plan.identity(m.sa)),
            None => "no sidecar, no interception".to_string(),
        };
        println!("  {:<9} {:<15} ns {:<14} {what}", p.name, p.ip, ns(p.name));
    }
    // (command, what it shows), printed as aligned columns.
    let sw = net::SWITCH;
    let rows = [
        ("Try:".to_string(), None),
        (
            format!(
                "ip netns exec {web} curl -s http://127.0.0.1:{}/",
                plan.web_port
            ),
            Some("web -> api -> db, each hop's answer nested"),
        ),
        (
            format!("ip netns exec {web} curl -s http://{}/", plan.api_vip),
            Some("api's VIP via web's sidecar: the canary applies"),
        ),
        (
            format!(
                "ip netns exec {web} curl -s -H 'x-canary: always' http://{}/",
                plan.api_vip
            ),
            Some("always v2 (the Route's header override)"),
        ),
        (
            format!(
                "ip netns exec {} curl -sv http://{}:{}/",
                ns("outsider"),
                plan.pod("api-v1").ip,
                plan.api_port
            ),
            Some("reset: STRICT mTLS refuses plaintext"),
        ),
        ("Metrics and admin:".to_string(), None),
        (
            format!(
                "ip netns exec {sw} curl -s http://<pod-ip>:{}/metrics",
                mesh::SIDECAR_METRICS_PORT
            ),
            Some("any sidecar (also /healthz/ready)"),
        ),
        (
            format!("ip netns exec {web} curl -s http://127.0.0.1:15000/config_dump"),
            Some("a sidecar's admin, pod loopback only (also /certs)"),
        ),
        (
            format!(
                "ip netns exec {sw} {exe} xds status --xds {}",
                mesh::gateway(mesh::XDS_ADMIN_PORT)
            ),
            Some("control plane (its admin also serves /status, /metrics)"),
        ),
        (
            format!(
                "ip netns exec {sw} curl -s http://{}/metrics",
                mesh::gateway(mesh::CA_METRICS_PORT)
            ),
            Some("CA"),
        ),
    ];
    let width = rows.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
    for (cmd, what) in &rows {
        match what {
            Some(w) => println!("  {cmd:<width$}  # {w}"),
            None => println!("{cmd}"),
        }
    }
    println!(
        "Config: edit {} and the running mesh follows.",
        config_dir.display()
    );
    let state_arg = if state_dir == Path::new("/run/bulwark-up") {
        String::new()
    } else {
        format!(" --state-dir {}", state_dir.display())
    };
    println!("Tear down: {exe} up --down{state_arg}   (or run `bulwark up` again)");
}
