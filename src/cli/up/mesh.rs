//! The running mesh as one value: bring-up in dependency order, and a
//! guard whose `Drop` tears down everything created so far, so an error
//! half-way through setup, a panic on the main thread, or the end of the
//! run all leave the machine as it was.

use std::net::{SocketAddr, SocketAddrV4};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::events::Stop;
use super::host;
use super::net::{self, GATEWAY, Net, NsThread, SWITCH};
use super::plan::Plan;
use super::probe::{self, Scrape, Targets};
use super::procs::{self, Procs, Tether};
use super::traffic::{self, Traffic};

pub const CA_PORT: u16 = 15012;
pub const CA_METRICS_PORT: u16 = 15014;
pub const XDS_PORT: u16 = 15010;
pub const XDS_ADMIN_PORT: u16 = 15011;
pub const SIDECAR_METRICS_PORT: u16 = 15020;
/// Bootstrap token lifetime: a token is used once, at a sidecar's start.
const TOKEN_TTL: &str = "1h";
/// How long to wait for each stage of bring-up (a debug build on two busy
/// cores is slow to start five sidecars).
const STAGE_TIMEOUT: Duration = Duration::from_secs(60);

pub fn gateway(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(GATEWAY, port))
}

pub struct Options {
    pub exe: PathBuf,
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub tether: Tether,
    /// Leaf certificate lifetime the CA issues.
    pub svid_ttl: Duration,
}

pub struct Mesh {
    net: Net,
    procs: Procs,
    /// Where probes and scrapes run.
    switch: Option<NsThread>,
    pub traffic: Option<Traffic>,
    state_dir: PathBuf,
    targets: Targets,
    /// Tear down on drop (cleared once torn down, or to leave it running).
    armed: bool,
}

impl Mesh {
    /// Builds the whole mesh and returns once traffic flows end to end
    /// through every api version. `stop` cuts any wait short.
    pub fn start(plan: &Plan, o: &Options, stop: &Receiver<Stop>) -> anyhow::Result<Mesh> {
        let targets = Targets {
            sidecars: plan
                .meshed()
                .map(|(p, _)| {
                    (
                        p.name.to_string(),
                        SocketAddr::new(p.ip.into(), SIDECAR_METRICS_PORT),
                    )
                })
                .collect(),
            control_admin: gateway(XDS_ADMIN_PORT),
            ca_metrics: gateway(CA_METRICS_PORT),
        };
        let logs = o.state_dir.join("logs");
        // The guard exists before anything is created.
        let mut m = Mesh {
            net: Net::default(),
            procs: Procs::new(o.exe.clone(), logs.clone(), o.tether),
            switch: None,
            traffic: None,
            state_dir: o.state_dir.clone(),
            targets,
            armed: true,
        };
        make_state_dir(&o.state_dir)?;

        m.net.create_switch()?;
        m.switch = Some(NsThread::spawn(SWITCH)?);
        for p in &plan.pods {
            m.net.add_pod(p.name, p.ip)?;
        }
        say(&format!(
            "network: {SWITCH} (bridge {GATEWAY}/24) and pods {}",
            plan.pods
                .iter()
                .map(|p| format!("{}={}", p.name, p.ip))
                .collect::<Vec<_>>()
                .join(" ")
        ));

        let ca_dir = o.state_dir.join("ca");
        let ca = ca_dir.to_str().context("state dir is not UTF-8")?;
        let config = o.config_dir.to_str().context("config dir is not UTF-8")?;
        procs::run_here(
            &o.exe,
            &[
                "ca",
                "init",
                "--dir",
                ca,
                "--trust-domain",
                &plan.trust_domain,
                "--default-ttl",
                &format!("{}s", o.svid_ttl.as_secs()),
            ],
        )?;
        m.procs.spawn(
            SWITCH,
            "ca",
            &args(&[
                "ca",
                "serve",
                "--dir",
                ca,
                "--listen",
                &gateway(CA_PORT).to_string(),
                "--metrics-listen",
                &gateway(CA_METRICS_PORT).to_string(),
            ]),
        )?;
        m.procs.spawn(
            SWITCH,
            "control-plane",
            &args(&[
                "xds",
                "serve",
                "--config",
                config,
                "--ca-dir",
                ca,
                "--listen",
                &gateway(XDS_PORT).to_string(),
                "--admin-listen",
                &gateway(XDS_ADMIN_PORT).to_string(),
                // A pod that is gone leaves the load balancers quickly.
                "--endpoint-grace",
                "3s",
            ]),
        )?;
        for port in [CA_PORT, XDS_PORT, XDS_ADMIN_PORT] {
            let addr = gateway(port);
            m.wait(&format!("{addr} to listen"), stop, |m| {
                if m.in_switch(move || probe::listening(addr)) {
                    Ok(())
                } else {
                    Err("nothing listening".to_string())
                }
            })?;
        }
        say(&format!(
            "CA on {}, control plane on {} serving {}",
            gateway(CA_PORT),
            gateway(XDS_PORT),
            o.config_dir.display()
        ));

        let bundle = ca_dir.join("bundle.pem");
        let bundle = bundle.to_str().context("state dir is not UTF-8")?;
        for (pod, meshed) in plan.meshed() {
            let ns = net::ns_name(pod.name);
            let identity = plan.identity(meshed.sa);
            let token = procs::run_here(
                &o.exe,
                &[
                    "ca",
                    "token",
                    "--dir",
                    ca,
                    "--identity",
                    &identity,
                    "--ttl",
                    TOKEN_TTL,
                ],
            )?;
            let token_file = write_secret(
                &o.state_dir.join("tokens"),
                &format!("{}.token", pod.name),
                token.trim(),
            )?;
            // The interception rules, as an init container would install them.
            procs::run_in(&o.exe, &ns, &["init"])?;
            m.procs
                .spawn(&ns, &format!("{}-app", pod.name), &meshed.app)?;
            let labels = meshed
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            m.procs.spawn(
                &ns,
                &format!("{}-sidecar", pod.name),
                &args(&[
                    "sidecar",
                    "--xds",
                    &gateway(XDS_PORT).to_string(),
                    "--labels",
                    &labels,
                    "--ports",
                    &meshed.port.to_string(),
                    "--identity",
                    &identity,
                    "--ca",
                    &gateway(CA_PORT).to_string(),
                    "--ca-cert",
                    bundle,
                    "--token-file",
                    token_file.to_str().context("state dir is not UTF-8")?,
                    // Teardown should not wait long for idle pooled connections.
                    "--drain-grace",
                    "2s",
                ]),
            )?;
        }
        for (pod, _) in plan.meshed() {
            let addr = SocketAddr::new(pod.ip.into(), SIDECAR_METRICS_PORT);
            m.wait(
                &format!("{}'s sidecar to be ready", pod.name),
                stop,
                |m| match m.in_switch(move || probe::http_get(addr, "/healthz/ready")) {
                    Ok((200, _)) => Ok(()),
                    Ok((code, body)) => Err(format!("/healthz/ready: {code} {}", body.trim())),
                    Err(e) => Err(e.to_string()),
                },
            )?;
        }
        say(&format!(
            "sidecars ready (SVID + first config): {}",
            plan.meshed()
                .map(|(p, _)| p.name)
                .collect::<Vec<_>>()
                .join(" ")
        ));

        let want = plan.meshed().count();
        let admin = gateway(XDS_ADMIN_PORT);
        let status = m.wait("the control plane to converge", stop, |m| {
            match m.in_switch(move || probe::control_status(admin)) {
                Ok(s) if s.converged && s.sidecars_total >= want => Ok(s),
                Ok(s) => Err(format!(
                    "{} ({} sidecars connected)",
                    s.convergence_line(),
                    s.sidecars_total
                )),
                Err(e) => Err(e),
            }
        })?;
        say(&format!(
            "control plane: {} with {} sidecars",
            status.convergence_line(),
            status.sidecars_total
        ));

        // Traffic flows end to end through every api version: a request
        // steered to v2 by the Route's header override, and one to v1 by
        // weight, each web → api (VIP) → db (VIP) answered.
        let web = NsThread::spawn(&net::ns_name("web"))?;
        let web_app = SocketAddr::from(([127, 0, 0, 1], plan.web_port));
        for (pod, version) in plan.api_versions() {
            let headers: &'static [(&'static str, &'static str)] = if version == "v2" {
                &[("x-canary", "always")]
            } else {
                &[]
            };
            let want = format!("{pod} ");
            m.wait(
                &format!("web → api ({pod}) → db to answer end to end"),
                stop,
                |_| {
                    let want = want.clone();
                    web.run(move || {
                        match traffic::get_with(web_app, super::plan::LOAD_PATH, headers) {
                            Ok((200, body)) if body.contains(&want) => Ok(()),
                            Ok((code, body)) => Err(format!("HTTP {code}: {}", body.trim())),
                            Err(e) => Err(e),
                        }
                    })
                },
            )?;
        }
        say(&format!(
            "mesh is up: web -> api (VIP {}) -> db (VIP {}) answered end to end over mTLS",
            plan.api_vip, plan.db_vip
        ));
        Ok(m)
    }

    /// Polls `cond` until it is Ok, a component exits, a stop arrives or
    /// [`STAGE_TIMEOUT`] passes (then the error quotes the last Err).
    fn wait<T>(
        &mut self,
        what: &str,
        stop: &Receiver<Stop>,
        mut cond: impl FnMut(&Self) -> Result<T, String>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + STAGE_TIMEOUT;
        loop {
            if let Ok(Stop(why)) = stop.try_recv() {
                bail!("{why} while waiting for {what}");
            }
            self.procs
                .check_alive()
                .with_context(|| format!("while waiting for {what}"))?;
            let last = match cond(self) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {STAGE_TIMEOUT:?} waiting for {what}; last: {last} (logs in {})",
                    self.state_dir.join("logs").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn in_switch<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.switch
            .as_ref()
            .expect("switch thread runs while the mesh is up")
            .run(f)
    }

    /// One look at every sidecar, the control plane and the CA.
    pub fn scrape(&self) -> Scrape {
        let t = self.targets.clone();
        self.in_switch(move || probe::scrape(&t))
    }

    /// Errors if a component has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.procs.check_alive()
    }

    pub fn start_traffic(&mut self, plan: &Plan, rps: u32) -> anyhow::Result<()> {
        let outsider_targets = plan
            .api_versions()
            .iter()
            .map(|(pod, _)| SocketAddr::new(plan.pod(pod).ip.into(), plan.api_port))
            .collect();
        self.traffic = Some(Traffic::start(
            &net::ns_name("web"),
            SocketAddr::from(([127, 0, 0, 1], plan.web_port)),
            rps,
            &net::ns_name("outsider"),
            outsider_targets,
        )?);
        Ok(())
    }

    pub fn stop_traffic(&mut self) {
        if let Some(t) = &mut self.traffic {
            t.stop();
        }
    }

    /// Stops traffic and every component, deletes the namespaces (and with
    /// them the veths and the pods' iptables rules) and the state dir.
    pub fn teardown(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        if let Some(mut t) = self.traffic.take() {
            t.stop();
        }
        self.switch.take();
        let procs = self.procs.all().len();
        self.procs.terminate_all(Duration::from_secs(5));
        let namespaces = self.net.namespaces().len();
        self.net.remove();
        let state = match host::remove_state_dir(&self.state_dir) {
            Ok(_) => "state dir removed".to_string(),
            Err(e) => format!("state dir left: {e:#}"),
        };
        say(&format!(
            "torn down: {procs} processes, {namespaces} namespaces (with their veths and iptables rules), {state}"
        ));
    }

    /// Leaves everything running (`--keep`): stops only `up`'s own traffic
    /// threads and forgets the processes.
    pub fn leave_running(mut self) {
        self.armed = false;
        self.stop_traffic();
        self.switch.take();
        self.procs.release();
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Progress lines while `up` works (stdout, so a log shows the sequence).
pub fn say(msg: &str) {
    println!("bulwark up: {msg}");
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// A fresh state dir, marked as ours; private (it holds bootstrap tokens).
fn make_state_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create state dir {}", dir.display()))?;
    std::fs::write(
        dir.join(host::STATE_MARKER),
        "created by `bulwark up`; removed by its teardown\n",
    )?;
    for sub in ["logs", "tokens"] {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir.join(sub))?;
    }
    Ok(())
}

/// Writes a file only its owner can read.
fn write_secret(dir: &Path, name: &str, content: &str) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(content.as_bytes())?;
    Ok(path)
}
