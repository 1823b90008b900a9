//! Pods as network namespaces, the way `tests/netns` builds them: a
//! "switch" namespace holds a bridge `br0` (198.18.0.1/24, also the address
//! of the CA and control plane); each pod is a namespace whose `eth0` is one
//! end of a veth pair, the other end a port of the bridge.
//!
//! Every name starts with [`PREFIX`], which is how a later run finds the
//! leftovers of one that was killed. The veth pairs are created directly
//! inside the switch namespace (`ip -n`), so nothing ever appears in the
//! host's own namespace; deleting a namespace deletes its veth end, and
//! with it the pair.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Prefix of every namespace (and any stray host link) `up` creates.
/// Distinct from the test harness' `bwt-`.
pub const PREFIX: &str = "bwup-";
/// The switch namespace: bridge, CA, control plane.
pub const SWITCH: &str = "bwup-switch";
/// The bridge's address: where pods reach the CA and control plane.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

pub fn ns_name(pod: &str) -> String {
    format!("{PREFIX}{pod}")
}

pub fn ns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

/// Runs `ip ARGS`; its stdout, or an error quoting its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip`")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The namespaces this run created, removed by [`Net::remove`].
#[derive(Default)]
pub struct Net {
    namespaces: Vec<String>,
}

impl Net {
    /// The switch namespace with its bridge.
    pub fn create_switch(&mut self) -> anyhow::Result<()> {
        self.add_ns(SWITCH)?;
        let gw = format!("{GATEWAY}/24");
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "add", "br0", "type", "bridge"],
            // A fixed MAC: a bridge otherwise takes the lowest MAC of its
            // ports, so a pod joining later could change the gateway's MAC
            // under pods that already resolved it.
            &["link", "set", "br0", "address", "02:42:c6:12:00:01"],
            &["addr", "add", &gw, "dev", "br0"],
            &["link", "set", "br0", "up"],
        ] {
            in_ns(SWITCH, args)?;
        }
        Ok(())
    }

    /// A pod namespace with `eth0` = `ip`/24 on the bridge and a default
    /// route through the switch (so service VIPs, which only the sidecar
    /// resolves, are routable up to its interception rules).
    pub fn add_pod(&mut self, pod: &str, addr: Ipv4Addr) -> anyhow::Result<String> {
        let ns = ns_name(pod);
        self.add_ns(&ns)?;
        // At most 15 bytes (IFNAMSIZ - 1); lives in the switch namespace.
        let port: String = format!("v-{pod}").chars().take(15).collect();
        in_ns(
            SWITCH,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        in_ns(SWITCH, &["link", "set", &port, "master", "br0"])?;
        in_ns(SWITCH, &["link", "set", &port, "up"])?;
        let cidr = format!("{addr}/24");
        let gw = GATEWAY.to_string();
        for args in [
            &["addr", "add", &cidr, "dev", "eth0"][..],
            &["link", "set", "eth0", "up"],
            &["link", "set", "lo", "up"],
            &["route", "add", "default", "via", &gw],
        ] {
            in_ns(&ns, args)?;
        }
        Ok(ns)
    }

    fn add_ns(&mut self, ns: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        Ok(())
    }

    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// Kills whatever still runs in our namespaces and deletes them, pods
    /// first. Best effort: teardown must get as far as it can.
    pub fn remove(&mut self) {
        for ns in self.namespaces.drain(..).rev() {
            kill_ns_procs(&ns);
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("warning: {e}");
            }
        }
    }
}

fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    ip(&full)
}

/// SIGKILLs every process in namespace `ns` and waits (bounded) until they
/// are gone, so the namespace's sockets and ports are released.
pub fn kill_ns_procs(ns: &str) -> usize {
    let pids: Vec<i32> = ip(&["netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| *p as u32 != std::process::id())
        .collect();
    for p in &pids {
        // SAFETY: plain syscall on a pid we just listed.
        unsafe {
            libc::kill(*p, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && pids.iter().any(|p| alive(*p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    pids.len()
}

/// Running (not a zombie waiting to be reaped).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// What [`remove_stale`] removed.
#[derive(Default, Debug)]
pub struct Removed {
    pub namespaces: Vec<String>,
    pub links: Vec<String>,
    pub processes: usize,
}

/// Removes what a previous `up` left behind: its namespaces (and the
/// processes in them), any host link with our prefix (a run killed
/// between creating a veth and moving it would leave one).
pub fn remove_stale() -> anyhow::Result<Removed> {
    let mut removed = Removed::default();
    let list = ip(&["netns", "list"])?;
    let mut stale: Vec<String> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(String::from)
        .collect();
    // Pods before the switch, as a clean teardown would.
    stale.sort_by_key(|n| n == SWITCH);
    for ns in stale {
        removed.processes += kill_ns_procs(&ns);
        ip(&["netns", "del", &ns])?;
        removed.namespaces.push(ns);
    }
    let links = ip(&["-o", "link", "show"])?;
    for line in links.lines() {
        // `7: name@peer: <...>`
        let Some(name) = line.split(':').nth(1).map(|n| n.trim()) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if name.starts_with(PREFIX) || name.starts_with("bwup") {
            ip(&["link", "del", name])?;
            removed.links.push(name.to_string());
        }
    }
    Ok(removed)
}

/// Moves the calling thread into network namespace `ns`: sockets it opens
/// from then on live there, subject to that pod's interception rules.
pub fn enter(ns: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(ns_path(ns))?;
    // SAFETY: setns on an fd we own; affects only this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread living in one namespace that runs closures there: how `up`,
/// itself in the host namespace, probes ports and scrapes metrics on
/// addresses only reachable inside the mesh.
pub struct NsThread {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsThread {
    pub fn spawn(ns: &str) -> anyhow::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel();
        let name = ns.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("ns-{ns}"))
            .spawn(move || {
                let entered = enter(&name);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    for job in rx {
                        job();
                    }
                }
            })?;
        ready
            .recv()
            .context("namespace thread died")?
            .with_context(|| format!("cannot enter namespace {ns}"))?;
        Ok(NsThread {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Runs `f` in the namespace and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .as_ref()
            .expect("namespace thread running")
            .send(job)
            .expect("namespace thread running");
        rx.recv().expect("namespace job panicked")
    }
}

impl Drop for NsThread {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
