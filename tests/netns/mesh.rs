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
        let pod = self.pods[name].pod.clone();
        let mut init = vec![BIN, "init"];
        init.extend_from_slice(init_args);
        self.net.exec_ok(&pod.ns, &init);
        let app = self.net.spawn_bulwark(
            &pod.ns,
            &format!("{name}-app"),
            &["demo-app", "--listen", "0.0.0.0:8080", "--name", name],
        );
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
            "--config",
            self.config.to_str().unwrap(),
        ];
        args.extend_from_slice(sidecar_args);
        let sidecar = self
            .net
            .spawn_bulwark(&pod.ns, &format!("{name}-sidecar"), &args);
        let p = self.pods.get_mut(name).unwrap();
        p.identity = identity;
        p.sidecar = Some(sidecar);
        p.app = Some(app);
    }

    pub fn pod(&self, name: &str) -> &MeshPod {
        &self.pods[name]
    }

    pub fn wait_ready(&mut self, name: &str) {
        let p = self.pods[name].pod.clone();
        let i = self.pods[name].sidecar.unwrap();
        let addr: SocketAddr = format!("{}:15020", p.ip).parse().unwrap();
        let net = &mut self.net;
        wait_for(
            &format!("{name}'s sidecar to be ready"),
            Duration::from_secs(30),
            || {
                if let Ok(Some(st)) = net.proc_mut(i).child.try_wait() {
                    panic!("{name}'s sidecar exited ({st}): {}", net.log_of(i));
                }
                net.http_get(&p.ns, addr, "/healthz/ready")
                    .filter(|r| r.contains(" 200 "))
                    .map(|_| ())
            },
        );
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
