//! A mesh on top of [`Net`]: the CA in the switch namespace, pods with
//! `bulwark init`, a demo app and a sidecar, config in a local file.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{Net, Pod};
use crate::common::{BIN, run_ok, wait_for};

pub const TD: &str = "cluster.local";

pub fn spiffe(sa: &str) -> String {
    format!("spiffe://{TD}/ns/default/sa/{sa}")
}

pub struct MeshPod {
    pub pod: Pod,
    /// Extra `demo-app` arguments (latency, error rate).
    pub app_args: Vec<String>,
    /// A command the sidecar runs under (e.g. `faketime -f -2m`).
    pub sidecar_wrapper: Vec<String>,
    pub identity: String,
    pub sidecar: Option<usize>,
    pub app: Option<usize>,
}

pub struct Mesh {
    pub net: Net,
    pub ca_dir: PathBuf,
    pub ca_addr: SocketAddr,
    pub ca_proc: usize,
    pub config: PathBuf,
    pub pods: HashMap<String, MeshPod>,
}

impl Mesh {
    /// A network with a running CA (`ca init` with `ca_init_args`).
    pub fn start(ca_init_args: &[&str]) -> Option<Mesh> {
        let mut net = Net::new()?;
        let ca_dir = net.dir.join("ca");
        let mut args = vec!["ca", "init", "--dir", ca_dir.to_str().unwrap()];
        args.extend_from_slice(ca_init_args);
        run_ok(&args);
        let ca_addr: SocketAddr = "198.18.0.1:15012".parse().unwrap();
        let sw = net.switch.clone();
        let ca_proc = net.spawn_bulwark(
            &sw,
            "ca",
            &[
                "ca",
                "serve",
                "--dir",
                ca_dir.to_str().unwrap(),
                "--listen",
                "198.18.0.1:15012",
                "--metrics-listen",
                "198.18.0.1:15014",
            ],
        );
        let config = net.dir.join("mesh.yaml");
        let mesh = Mesh {
            net,
            ca_dir,
            ca_addr,
            ca_proc,
            config,
            pods: HashMap::new(),
        };
        mesh.wait_ca();
        Some(mesh)
    }

    pub fn wait_ca(&self) {
        let addr = self.ca_addr;
        let sw = self.net.switch.clone();
        wait_for("the CA to listen", Duration::from_secs(20), || {
            self.net
                .in_ns(&sw, move || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                })
                .then_some(())
        });
    }

    pub fn write_config(&self, yaml: &str) {
        // Write-then-rename so a watcher never reads half a file.
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    pub fn token(&self, identity: &str) -> PathBuf {
        let t = run_ok(&[
            "ca",
            "token",
            "--dir",
            self.ca_dir.to_str().unwrap(),
            "--identity",
            identity,
            "--ttl",
            "2h",
        ]);
        let f = self
            .net
            .dir
            .join(format!("{}.token", identity.rsplit('/').next().unwrap()));
        std::fs::write(&f, t.trim()).unwrap();
        f
    }

    /// A pod with no sidecar and no interception (yet).
    pub fn add_pod(&mut self, name: &str) -> Pod {
        let pod = self.net.add_pod(name);
        self.pods.insert(
            name.to_string(),
            MeshPod {
                pod: pod.clone(),
                app_args: Vec::new(),
                sidecar_wrapper: Vec::new(),
                identity: String::new(),
                sidecar: None,
                app: None,
            },
        );
        pod
    }

    /// Makes pod `name` a meshed pod: interception rules, a demo app on
    /// :8080 and a sidecar with identity `sa` (call [`Mesh::wait_ready`]).
    /// The config file must exist.
    pub fn start_sidecar(&mut self, name: &str, sa: &str, sidecar_args: &[&str]) {
        self.start_sidecar_with(name, sa, &[], sidecar_args)
    }

    /// [`Mesh::start_sidecar`] with extra `bulwark init` arguments.
    pub fn start_sidecar_with(
        &mut self,
        name: &str,
        sa: &str,
        init_args: &[&str],
        sidecar_args: &[&str],
    ) {
        self.start_sidecar_inner(name, sa, init_args, sidecar_args, true)
    }

    fn start_sidecar_inner(
        &mut self,
        name: &str,
        sa: &str,
        init_args: &[&str],
        sidecar_args: &[&str],
        local_config: bool,
    ) {
        let pod = self.pods[name].pod.clone();
        let mut init = vec![BIN, "init"];
        init.extend_from_slice(init_args);
        self.net.exec_ok(&pod.ns, &init);
        let mut app_argv = vec!["demo-app", "--listen", "0.0.0.0:8080", "--name", name];
        let extra = self.pods[name].app_args.clone();
        app_argv.extend(extra.iter().map(String::as_str));
        let app = self
            .net
            .spawn_bulwark(&pod.ns, &format!("{name}-app"), &app_argv);
        let identity = spiffe(sa);
        let token = self.token(&identity);
        let bundle = self.ca_dir.join("bundle.pem");
        let ca = self.ca_addr.to_string();
        let mut args = vec![
            "sidecar",
            "--identity",
            &identity,
            "--ca",
            &ca,
            "--ca-cert",
            bundle.to_str().unwrap(),
            "--token-file",
            token.to_str().unwrap(),
        ];
        if local_config {
            args.extend_from_slice(&["--config", self.config.to_str().unwrap()]);
        }
        std::fs::write(
            self.net.dir.join(format!("{name}-sidecar.base")),
            args.join("\n"),
        )
        .unwrap();
        args.extend_from_slice(sidecar_args);
        std::fs::write(
            self.net.dir.join(format!("{name}-sidecar.args")),
            args.join("\n"),
        )
        .unwrap();
        let wrapper = self.pods[name].sidecar_wrapper.clone();
        let sidecar = if wrapper.is_empty() {
            self.net
                .spawn_bulwark(&pod.ns, &format!("{name}-sidecar"), &args)
        } else {
            let mut argv: Vec<&str> = wrapper[1..].iter().map(String::as_str).collect();
            argv.push(BIN);
            argv.extend_from_slice(&args);
            self.net
                .spawn(&pod.ns, &format!("{name}-sidecar"), &wrapper[0], &argv)
        };
        let p = self.pods.get_mut(name).unwrap();
        p.identity = identity;
        p.sidecar = Some(sidecar);
        p.app = Some(app);
    }

    /// Starts a control-plane replica in the switch namespace on
    /// 198.18.0.1:`port` (admin on `port + 1`), serving `self.config_dir()`.
    pub fn start_control_plane(&mut self, name: &str, port: u16) -> usize {
        let dir = self.config_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let sw = self.net.switch.clone();
        let listen = format!("198.18.0.1:{port}");
        let admin = format!("198.18.0.1:{}", port + 1);
        let i = self.net.spawn_bulwark(
            &sw,
            name,
            &[
                "xds",
                "serve",
                "--config",
                dir.to_str().unwrap(),
                "--ca-dir",
                self.ca_dir.to_str().unwrap(),
                "--listen",
                &listen,
                "--admin-listen",
                &admin,
                "--endpoint-grace",
                "10s",
            ],
        );
        let addr: SocketAddr = listen.parse().unwrap();
        let net = &mut self.net;
        wait_for(
            &format!("control plane {name} to listen"),
            Duration::from_secs(20),
            || {
                if let Ok(Some(st)) = net.proc_mut(i).child.try_wait() {
                    panic!("{name} exited ({st}): {}", net.log_of(i));
                }
                net.in_ns(&sw, move || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                })
                .then_some(())
            },
        );
        i
    }

    /// The directory the control plane watches.
    pub fn config_dir(&self) -> PathBuf {
        self.net.dir.join("config")
    }

    /// Writes one file of the control plane's config directory atomically.
    pub fn write_cp_file(&self, name: &str, yaml: &str) {
        let dir = self.config_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }

    /// A meshed pod whose sidecar takes its config from control planes at
    /// `xds` (comma-separated host:port).
    pub fn start_sidecar_xds(
        &mut self,
        name: &str,
        sa: &str,
        xds: &str,
        labels: &str,
        extra: &[&str],
    ) {
        let mut args = vec!["--xds", xds, "--ports", "8080"];
        if !labels.is_empty() {
            args.extend_from_slice(&["--labels", labels]);
        }
        args.extend_from_slice(extra);
        self.start_sidecar_inner(name, sa, &[], &args, false);
    }

    /// [`Mesh::start_sidecar_xds`] with extra `bulwark init` arguments.
    pub fn start_sidecar_xds_with(
        &mut self,
        name: &str,
        sa: &str,
        xds: &str,
        init_args: &[&str],
        extra: &[&str],
    ) {
        let mut args = vec!["--xds", xds, "--ports", "8080"];
        args.extend_from_slice(extra);
        self.start_sidecar_inner(name, sa, init_args, &args, false);
    }

    /// `bulwark xds status` against the replica whose admin port is `admin`.
    pub fn xds_status(&self, admin: &str) -> String {
        let o = self
            .net
            .exec(&self.net.switch, &[BIN, "xds", "status", "--xds", admin]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// Runs pod `name`'s sidecar under `wrapper` (before it starts).
    pub fn set_sidecar_wrapper(&mut self, name: &str, wrapper: &[&str]) {
        self.pods.get_mut(name).unwrap().sidecar_wrapper =
            wrapper.iter().map(|s| s.to_string()).collect();
    }

    /// Sets extra `demo-app` arguments for pod `name` (before its sidecar starts).
    pub fn set_app_args(&mut self, name: &str, args: &[&str]) {
        self.pods.get_mut(name).unwrap().app_args = args.iter().map(|s| s.to_string()).collect();
    }

    pub fn pod(&self, name: &str) -> &MeshPod {
        &self.pods[name]
    }

    pub fn wait_ready(&mut self, name: &str) {
        let p = self.pods[name].pod.clone();
        let i = self.pods[name].sidecar.unwrap();
        let addr: SocketAddr = format!("{}:15020", p.ip).parse().unwrap();
        let net = &mut self.net;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut last = None;
        loop {
            if let Ok(Some(st)) = net.proc_mut(i).child.try_wait() {
                panic!("{name}'s sidecar exited ({st}): {}", net.log_of(i));
            }
            last = net.http_get(&p.ns, addr, "/healthz/ready").or(last);
            if last.as_deref().is_some_and(|r| r.contains(" 200 ")) {
                return;
            }
            if std::time::Instant::now() > deadline {
                let others: String = std::fs::read_dir(&net.dir)
                    .map(|d| {
                        d.flatten()
                            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                            .map(|e| {
                                let t = std::fs::read_to_string(e.path()).unwrap_or_default();
                                let ip = p.ip.to_string();
                                let tail: Vec<&str> = t
                                    .lines()
                                    .rev()
                                    .filter(|l| {
                                        l.contains(&ip)
                                            || l.contains("WARN")
                                            || l.contains("ERROR")
                                            || l.contains("handshake")
                                    })
                                    .take(15)
                                    .collect();
                                format!(
                                    "---- {}\n{}\n",
                                    e.path().display(),
                                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                panic!(
                    "timed out after 30s waiting for {name}'s sidecar to be ready; last answer: {last:?}\nlog:\n{}\n{others}",
                    net.log_of(i)
                );
            }
            std::thread::sleep(Duration::from_millis(25)); // polling interval
        }
    }

    /// The sidecar's /metrics text.
    pub fn metrics(&self, name: &str) -> String {
        let p = &self.pods[name].pod;
        let addr: SocketAddr = format!("{}:15020", p.ip).parse().unwrap();
        self.net
            .http_get(&p.ns, addr, "/metrics")
            .unwrap_or_default()
    }

    /// `curl` run inside pod `from` (an unmodified client).
    pub fn curl(&self, from: &str, url: &str) -> std::process::Output {
        let ns = &self.pods[from].pod.ns;
        self.net.exec(ns, &["curl", "-sS", "--max-time", "10", url])
    }

    pub fn sidecar_log(&self, name: &str) -> String {
        self.net.log_of(self.pods[name].sidecar.unwrap())
    }

    /// The config version a sidecar has applied (from its metrics).
    pub fn applied_version(&self, name: &str) -> Option<String> {
        let m = self.metrics(name);
        let line = m
            .lines()
            .find(|l| l.starts_with("bulwark_config_applied_version{"))?;
        Some(
            line.split("version=\"")
                .nth(1)?
                .split('"')
                .next()?
                .to_string(),
        )
    }

    /// The sidecar's /config_dump (asked from inside its pod: admin is loopback-only).
    pub fn config_dump(&self, name: &str) -> serde_json::Value {
        let ns = &self.pods[name].pod.ns;
        let out = self
            .net
            .exec_ok(ns, &["curl", "-s", "http://127.0.0.1:15000/config_dump"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("config_dump of {name}: {e}: {out}"))
    }

    /// Restarts pod `name`'s sidecar with the same arguments.
    pub fn restart_sidecar(&mut self, name: &str) {
        let args = self.sidecar_args_file(name, "args");
        self.respawn_sidecar(name, args);
    }

    /// Restarts pod `name`'s sidecar with `sidecar_args` in place of the
    /// extra arguments it was started with (call [`Mesh::wait_ready`]).
    pub fn restart_sidecar_with(&mut self, name: &str, sidecar_args: &[&str]) {
        let mut args = self.sidecar_args_file(name, "base");
        args.extend(sidecar_args.iter().map(|a| a.to_string()));
        std::fs::write(
            self.net.dir.join(format!("{name}-sidecar.args")),
            args.join("\n"),
        )
        .unwrap();
        self.respawn_sidecar(name, args);
    }

    fn sidecar_args_file(&self, name: &str, kind: &str) -> Vec<String> {
        std::fs::read_to_string(self.net.dir.join(format!("{name}-sidecar.{kind}")))
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn respawn_sidecar(&mut self, name: &str, args: Vec<String>) {
        let i = self.pods[name].sidecar.unwrap();
        self.net.proc_mut(i).terminate(Duration::from_secs(10));
        let ns = self.pods[name].pod.ns.clone();
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let n = self.net.procs_named(&format!("{name}-sidecar"));
        let j = self
            .net
            .spawn_bulwark(&ns, &format!("{name}-sidecar-{}", n + 1), &argv);
        self.pods.get_mut(name).unwrap().sidecar = Some(j);
    }
}

/// Sum of the values of metric samples whose line starts with `prefix`
/// and contains every one of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The mesh config used by most tests: STRICT, REGISTRY_ONLY, `api`
/// served by identity `api` at the given pods, reachable by `web`.
pub fn basic_config(endpoints: &[(&Pod, &str)], allow_to_api: &[&str]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|(p, sa)| format!("    - address: {}\n      identity: {}\n", p.ip, spiffe(sa)))
        .collect();
    let allow: Vec<String> = allow_to_api
        .iter()
        .map(|sa| format!("        - {}\n", spiffe(sa)))
        .collect();
    format!(
        r#"apiVersion: bulwark.dev/v1
kind: MeshConfig
metadata:
  name: mesh
spec:
  trustDomain: {TD}
  mtls:
    mode: STRICT
  outboundPolicy: REGISTRY_ONLY
---
apiVersion: bulwark.dev/v1
kind: Service
metadata:
  name: api
  namespace: default
spec:
  ports:
    - port: 8080
      protocol: tcp
  identities:
    - {api}
{entry}---
apiVersion: bulwark.dev/v1
kind: AuthorizationPolicy
metadata:
  name: api-callers
  namespace: default
spec:
  service: api
  rules:
    - from:
{allow}"#,
        api = spiffe("api"),
        entry = if eps.is_empty() {
            String::new()
        } else {
            format!(
                "---\napiVersion: bulwark.dev/v1\nkind: ServiceEntry\nmetadata:\n  name: mesh-pods\n  namespace: default\nspec:\n  location: MESH_INTERNAL\n  ports:\n    - port: 8080\n      protocol: tcp\n  endpoints:\n{}",
                eps.concat()
            )
        },
        allow = allow.concat(),
    )
}

/// VIP of the `api` service built by [`http_api_config`].
pub const API_VIP: &str = "198.18.100.1";

/// STRICT, REGISTRY_ONLY; `api` (HTTP on :8080, VIP [`API_VIP`]) served by
/// identity `api` at pod `api`; `extra` documents appended.
pub fn http_api_config(api: &Pod, extra: &str) -> String {
    format!(
        "apiVersion: bulwark.dev/v1\nkind: MeshConfig\nmetadata:\n  name: mesh\nspec:\n  trustDomain: {TD}\n  mtls:\n    mode: STRICT\n  outboundPolicy: REGISTRY_ONLY\n---\napiVersion: bulwark.dev/v1\nkind: Service\nmetadata:\n  name: api\n  namespace: default\nspec:\n  ports:\n    - port: 8080\n      protocol: http\n  identities:\n    - {id}\n  addresses:\n    - {API_VIP}\n---\napiVersion: bulwark.dev/v1\nkind: ServiceEntry\nmetadata:\n  name: api\n  namespace: default\nspec:\n  location: MESH_INTERNAL\n  ports:\n    - port: 8080\n      protocol: http\n  endpoints:\n    - address: {ip}\n      identity: {id}\n{extra}",
        id = spiffe("api"),
        ip = api.ip
    )
}
