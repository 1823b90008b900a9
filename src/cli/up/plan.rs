//! The demo shop `up` builds, and what it takes from the config dir.
//!
//! Pods are fixed: `web` calls `api` over HTTP, `api` (two versions, the
//! Route's canary subsets) calls `db` over opaque TCP, and `outsider` has
//! no sidecar. What may change with the config is read from it: the trust
//! domain, each service's VIP and port (apps dial the VIP, so routing
//! applies), and the canary weights the split is checked against. The
//! config must therefore define Services `web`, `api` (HTTP) and `db`
//! (TCP), `api` and `db` with a VIP in `addresses`, selecting workloads
//! by `app: <service>` (the labels `up` gives the pods) or by identity.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::{Context, bail};
use bulwark_proto::config::Resources;
use bulwark_proto::config::v1 as pb;

/// Label the Route's canary subsets select on, and its values.
pub const VERSION_LABEL: &str = "version";
/// Path the load generator requests (and web passes on to api).
pub const LOAD_PATH: &str = "/";

pub struct Plan {
    pub trust_domain: String,
    pub pods: Vec<PodPlan>,
    /// Where `web`'s app listens (the load generator calls it on loopback).
    pub web_port: u16,
    /// `api`'s VIP and port, as apps dial it.
    pub api_vip: SocketAddr,
    /// Port `api`'s workloads listen on (what the outsider dials directly).
    pub api_port: u16,
    pub db_vip: SocketAddr,
}

pub struct PodPlan {
    pub name: &'static str,
    pub ip: Ipv4Addr,
    /// None for the outsider: no interception, no sidecar, no app.
    pub mesh: Option<Meshed>,
}

pub struct Meshed {
    /// Service account: the identity is `spiffe://<td>/ns/default/sa/<sa>`.
    pub sa: &'static str,
    pub labels: Vec<(&'static str, &'static str)>,
    /// The port its app listens on (announced to the control plane).
    pub port: u16,
    /// `bulwark demo-app` arguments.
    pub app: Vec<String>,
}

/// A caller → callee hop that must ride mTLS.
pub struct Pair {
    pub from_sa: &'static str,
    pub to_sa: &'static str,
    pub protocol: &'static str,
}

impl Pair {
    pub fn label(&self) -> String {
        format!("{}->{}", self.from_sa, self.to_sa)
    }
}

/// Every meshed hop the demo's traffic takes.
pub const PAIRS: [Pair; 2] = [
    Pair {
        from_sa: "web",
        to_sa: "api",
        protocol: "http",
    },
    Pair {
        from_sa: "api",
        to_sa: "db",
        protocol: "tcp",
    },
];

impl Plan {
    /// Reads (and validates, with the control plane's own checks) the config.
    pub fn from_config(dir: &Path) -> anyhow::Result<Plan> {
        let resources = load(dir)?;
        let trust_domain = resources
            .mesh
            .as_ref()
            .map(|m| m.trust_domain.clone())
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "cluster.local".to_string());
        let web = service(&resources, dir, "web")?;
        let api = service(&resources, dir, "api")?;
        let db = service(&resources, dir, "db")?;
        let (web_port, _) = port_of(web, dir)?;
        let (api_port, api_svc_port) = port_of(api, dir)?;
        let (db_port, db_svc_port) = port_of(db, dir)?;
        let api_vip = SocketAddr::new(vip_of(api, dir)?.into(), api_svc_port);
        let db_vip = SocketAddr::new(vip_of(db, dir)?.into(), db_svc_port);
        let pod = |name, host, mesh| PodPlan {
            name,
            ip: Ipv4Addr::new(198, 18, 0, host),
            mesh,
        };
        let app = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let api_app = |name: &str| {
            app(&[
                "demo-app",
                "--listen",
                &format!("0.0.0.0:{api_port}"),
                "--name",
                name,
                "--tcp-upstream",
                &db_vip.to_string(),
            ])
        };
        let pods = vec![
            pod(
                "web",
                2,
                Some(Meshed {
                    sa: "web",
                    labels: vec![("app", "web"), (VERSION_LABEL, "v1")],
                    port: web_port,
                    app: app(&[
                        "demo-app",
                        "--listen",
                        &format!("0.0.0.0:{web_port}"),
                        "--name",
                        "web",
                        "--upstream",
                        &format!("http://{api_vip}{LOAD_PATH}"),
                    ]),
                }),
            ),
            pod(
                "api-v1",
                3,
                Some(Meshed {
                    sa: "api",
                    labels: vec![("app", "api"), (VERSION_LABEL, "v1")],
                    port: api_port,
                    app: api_app("api-v1"),
                }),
            ),
            pod(
                "api-v2",
                4,
                Some(Meshed {
                    sa: "api",
                    labels: vec![("app", "api"), (VERSION_LABEL, "v2")],
                    port: api_port,
                    app: api_app("api-v2"),
                }),
            ),
            pod(
                "db",
                5,
                Some(Meshed {
                    sa: "db",
                    labels: vec![("app", "db"), (VERSION_LABEL, "v1")],
                    port: db_port,
                    app: app(&[
                        "demo-app",
                        "--listen",
                        &format!("0.0.0.0:{db_port}"),
                        "--name",
                        "db",
                        "--tcp-echo",
                    ]),
                }),
            ),
            pod("outsider", 6, None),
        ];
        Ok(Plan {
            trust_domain,
            pods,
            web_port,
            api_vip,
            api_port,
            db_vip,
        })
    }

    pub fn identity(&self, sa: &str) -> String {
        format!("spiffe://{}/ns/default/sa/{sa}", self.trust_domain)
    }

    pub fn pod(&self, name: &str) -> &PodPlan {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .expect("a pod of the plan")
    }

    pub fn meshed(&self) -> impl Iterator<Item = (&PodPlan, &Meshed)> {
        self.pods
            .iter()
            .filter_map(|p| p.mesh.as_ref().map(|m| (p, m)))
    }

    /// The pods serving `api`, with their version label.
    pub fn api_versions(&self) -> Vec<(&'static str, &'static str)> {
        self.meshed()
            .filter(|(_, m)| m.sa == "api")
            .map(|(p, m)| {
                let v = m
                    .labels
                    .iter()
                    .find(|(k, _)| *k == VERSION_LABEL)
                    .map_or("?", |(_, v)| v);
                (p.name, v)
            })
            .collect()
    }
}

pub fn load(dir: &Path) -> anyhow::Result<Resources> {
    bulwark_xds::load_and_compile(dir).map_err(|errors| {
        anyhow::anyhow!(
            "invalid config in {}:\n{}",
            dir.display(),
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

fn service<'a>(r: &'a Resources, dir: &Path, name: &str) -> anyhow::Result<&'a pb::Service> {
    r.services
        .iter()
        .find(|s| s.name == name)
        .with_context(|| {
            format!(
                "{} defines no Service `{name}`; `bulwark up` runs the web → api → db demo (see deploy/examples)",
                dir.display()
            )
        })
}

/// (port the workloads listen on, port clients dial).
fn port_of(s: &pb::Service, dir: &Path) -> anyhow::Result<(u16, u16)> {
    let p = s
        .ports
        .first()
        .with_context(|| format!("Service `{}` in {} has no ports", s.name, dir.display()))?;
    let target = if p.target_port != 0 {
        p.target_port
    } else {
        p.port
    };
    Ok((u16::try_from(target)?, u16::try_from(p.port)?))
}

fn vip_of(s: &pb::Service, dir: &Path) -> anyhow::Result<Ipv4Addr> {
    let Some(first) = s.addresses.first() else {
        bail!(
            "Service `{}` in {} has no VIP: add `addresses: [198.18.100.x]` (apps in `bulwark up` dial services by VIP)",
            s.name,
            dir.display()
        );
    };
    first.parse().with_context(|| {
        format!(
            "Service `{}`: `bulwark up` needs an IPv4 VIP, got {first}",
            s.name
        )
    })
}

/// The share of `api` requests for [`LOAD_PATH`] the config sends to
/// version v2: the weights of the first Route rule for `api` that matches
/// a plain GET of that path. None when no such rule splits by version.
pub fn canary_share(r: &Resources) -> Option<f64> {
    let route = r
        .routes
        .iter()
        .find(|rt| rt.service == "api" || rt.service.ends_with("/api"))?;
    let rule = route.rules.iter().find(|rule| matches_plain_get(rule))?;
    let version = |b: &pb::WeightedBackend| b.subset.get(VERSION_LABEL).cloned();
    let total: u32 = rule.backends.iter().map(|b| b.weight).sum();
    if total == 0 || rule.backends.iter().all(|b| version(b).is_none()) {
        return None;
    }
    let v2: u32 = rule
        .backends
        .iter()
        .filter(|b| version(b).as_deref() == Some("v2"))
        .map(|b| b.weight)
        .sum();
    Some(f64::from(v2) / f64::from(total))
}

fn matches_plain_get(rule: &pb::HttpRoute) -> bool {
    use pb::string_match::Kind;
    if rule.matches.is_empty() {
        return true;
    }
    rule.matches.iter().any(|m| {
        let path_ok = match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
            None => true,
            Some(Kind::Prefix(p)) => LOAD_PATH.starts_with(p.as_str()),
            Some(Kind::Exact(p)) => p == LOAD_PATH,
            // Not evaluated here: such a rule is not taken for the canary.
            Some(Kind::Regex(_)) => false,
        };
        let method_ok = m.methods.is_empty() || m.methods.iter().any(|x| x == "GET");
        path_ok && method_ok && m.headers.iter().all(|h| h.absent)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_examples_define_the_shop_with_vips_and_a_ten_percent_canary() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
        let plan = Plan::from_config(&dir).unwrap();
        assert_eq!(plan.api_vip.port(), 8080);
        assert_eq!(plan.db_vip.port(), 5432);
        assert_eq!(
            plan.api_versions(),
            vec![("api-v1", "v1"), ("api-v2", "v2")]
        );
        let share = canary_share(&load(&dir).unwrap()).unwrap();
        assert!((share - 0.10).abs() < 1e-9, "{share}");
    }
}
