//! The iptables (nat table) rules that send a pod's TCP traffic through the
//! sidecar: outbound to the outbound listener, inbound to the inbound one.
//!
//! The proxy's own sockets are excluded by socket mark (`SO_MARK`, set on
//! every upstream socket the sidecar opens) and, when `proxy_uid` is given,
//! by owner uid as well. The mark works whatever user the proxy runs as
//! (our network-namespace pods run it as root); the uid match is what a
//! Kubernetes sidecar running unprivileged relies on, since setting SO_MARK
//! needs CAP_NET_ADMIN.

use std::process::Command;

/// Chains we own. Everything we add hangs off these, so removal is exact.
pub const OUTPUT_CHAIN: &str = "BULWARK_OUTPUT";
pub const INBOUND_CHAIN: &str = "BULWARK_INBOUND";

#[derive(Debug, Clone)]
pub struct RuleOptions {
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub proxy_mark: u32,
    pub proxy_uid: Option<u32>,
    /// Inbound ports to capture; empty means all but the excluded ones.
    pub inbound_ports: Vec<u16>,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
}

impl Default for RuleOptions {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_port: 15006,
            proxy_mark: crate::DEFAULT_PROXY_MARK,
            proxy_uid: None,
            inbound_ports: Vec::new(),
            // Health, metrics and admin stay reachable without mTLS.
            exclude_inbound_ports: vec![15000, 15020, 15021],
            // The CA and control plane are reached directly by the proxy.
            exclude_outbound_ports: vec![15010, 15012],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("iptables not found: install it (Debian/Ubuntu: apt-get install iptables)")]
    Missing,
    #[error("not permitted to change iptables rules: run as root or with CAP_NET_ADMIN ({0})")]
    Permission(String),
    #[error("`iptables {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
}

/// One iptables invocation (arguments after `iptables`).
pub type Rule = Vec<String>;

fn r(parts: &[&str]) -> Rule {
    parts.iter().map(|s| s.to_string()).collect()
}

/// The rules `init` installs, in order, after creating (or flushing) our chains.
pub fn chain_rules(o: &RuleOptions) -> Vec<Rule> {
    let mut rules = Vec::new();
    let out = OUTPUT_CHAIN;
    let mark = format!("0x{:x}", o.proxy_mark);
    let ip = o.inbound_port.to_string();
    // The proxy dialling its own pod (a Service whose chosen endpoint is
    // this pod): the connection never leaves loopback, so PREROUTING never
    // sees it and the mTLS bytes would reach the app's port. It goes to the
    // inbound listener, as it would from any other pod. Not 127/8: that is
    // the inbound listener's own hand-off to the app.
    rules.push(r(&[
        "-t",
        "nat",
        "-A",
        out,
        "-o",
        "lo",
        "!",
        "-d",
        "127.0.0.0/8",
        "-p",
        "tcp",
        "-m",
        "mark",
        "--mark",
        &mark,
        "-j",
        "REDIRECT",
        "--to-ports",
        &ip,
    ]));
    rules.push(r(&[
        "-t", "nat", "-A", out, "-m", "mark", "--mark", &mark, "-j", "RETURN",
    ]));
    if let Some(uid) = o.proxy_uid {
        let uid = uid.to_string();
        rules.push(r(&[
            "-t",
            "nat",
            "-A",
            out,
            "-m",
            "owner",
            "--uid-owner",
            &uid,
            "-j",
            "RETURN",
        ]));
    }
    // Loopback: the app talking to itself, and the inbound sidecar handing
    // connections to the app.
    rules.push(r(&["-t", "nat", "-A", out, "-o", "lo", "-j", "RETURN"]));
    rules.push(r(&[
        "-t",
        "nat",
        "-A",
        out,
        "-d",
        "127.0.0.0/8",
        "-j",
        "RETURN",
    ]));
    for p in &o.exclude_outbound_ports {
        let p = p.to_string();
        rules.push(r(&[
            "-t", "nat", "-A", out, "-p", "tcp", "--dport", &p, "-j", "RETURN",
        ]));
    }
    let op = o.outbound_port.to_string();
    rules.push(r(&[
        "-t",
        "nat",
        "-A",
        out,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &op,
    ]));

    let inb = INBOUND_CHAIN;
    for p in &o.exclude_inbound_ports {
        let p = p.to_string();
        rules.push(r(&[
            "-t", "nat", "-A", inb, "-p", "tcp", "--dport", &p, "-j", "RETURN",
        ]));
    }
    if o.inbound_ports.is_empty() {
        rules.push(r(&[
            "-t",
            "nat",
            "-A",
            inb,
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &ip,
        ]));
    } else {
        for p in &o.inbound_ports {
            let p = p.to_string();
            rules.push(r(&[
                "-t",
                "nat",
                "-A",
                inb,
                "-p",
                "tcp",
                "--dport",
                &p,
                "-j",
                "REDIRECT",
                "--to-ports",
                &ip,
            ]));
        }
    }
    rules
}

/// Jumps from the built-in chains into ours.
fn jumps() -> Vec<Rule> {
    vec![
        r(&["-t", "nat", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]),
        r(&["-t", "nat", "PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN]),
    ]
}

/// Everything `init` would run, for `--dry-run`.
pub fn plan(o: &RuleOptions) -> Vec<String> {
    let mut out = Vec::new();
    for c in [OUTPUT_CHAIN, INBOUND_CHAIN] {
        out.push(format!("iptables -t nat -N {c}"));
    }
    for rule in chain_rules(o) {
        out.push(format!("iptables {}", rule.join(" ")));
    }
    for j in jumps() {
        let (table, rest) = j.split_at(2);
        out.push(format!(
            "iptables {} -A {}",
            table.join(" "),
            rest.join(" ")
        ));
    }
    out
}

fn iptables(args: &[String]) -> Result<std::process::Output, RulesError> {
    Command::new("iptables")
        .args(args)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => RulesError::Missing,
            _ => RulesError::Failed {
                args: args.join(" "),
                stderr: e.to_string(),
            },
        })
}

fn must(args: &[String]) -> Result<(), RulesError> {
    let out = iptables(args)?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.contains("Permission denied") || stderr.contains("Operation not permitted") {
        return Err(RulesError::Permission(stderr));
    }
    Err(RulesError::Failed {
        args: args.join(" "),
        stderr,
    })
}

fn succeeds(args: &[String]) -> Result<bool, RulesError> {
    Ok(iptables(args)?.status.success())
}

fn s(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

/// Installs the rules. Idempotent: running it twice leaves one set.
pub fn install(o: &RuleOptions) -> Result<(), RulesError> {
    // Probe first so a missing binary or privilege gives one clear error.
    must(&s(&["-t", "nat", "-S", "OUTPUT"]))?;
    for c in [OUTPUT_CHAIN, INBOUND_CHAIN] {
        if succeeds(&s(&["-t", "nat", "-S", c]))? {
            must(&s(&["-t", "nat", "-F", c]))?;
        } else {
            must(&s(&["-t", "nat", "-N", c]))?;
        }
    }
    for rule in chain_rules(o) {
        must(&rule)?;
    }
    for j in jumps() {
        let (table, rest) = j.split_at(2);
        let check: Vec<String> = table
            .iter()
            .cloned()
            .chain(["-C".to_string()])
            .chain(rest.iter().cloned())
            .collect();
        if !succeeds(&check)? {
            let add: Vec<String> = table
                .iter()
                .cloned()
                .chain(["-A".to_string()])
                .chain(rest.iter().cloned())
                .collect();
            must(&add)?;
        }
    }
    Ok(())
}

/// Removes exactly what `install` added. Safe to run when nothing is installed.
pub fn remove() -> Result<(), RulesError> {
    must(&s(&["-t", "nat", "-S", "OUTPUT"]))?;
    for j in jumps() {
        let (table, rest) = j.split_at(2);
        let check: Vec<String> = table
            .iter()
            .cloned()
            .chain(["-C".to_string()])
            .chain(rest.iter().cloned())
            .collect();
        let del: Vec<String> = table
            .iter()
            .cloned()
            .chain(["-D".to_string()])
            .chain(rest.iter().cloned())
            .collect();
        while succeeds(&check)? {
            must(&del)?;
        }
    }
    for c in [OUTPUT_CHAIN, INBOUND_CHAIN] {
        if succeeds(&s(&["-t", "nat", "-S", c]))? {
            must(&s(&["-t", "nat", "-F", c]))?;
            must(&s(&["-t", "nat", "-X", c]))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_excludes_proxy_loopback_and_control_ports_before_redirecting() {
        let o = RuleOptions {
            proxy_uid: Some(1337),
            ..Default::default()
        };
        let p = plan(&o).join("\n");
        let idx = |needle: &str| {
            p.find(needle)
                .unwrap_or_else(|| panic!("{needle} missing in\n{p}"))
        };
        let redirect = idx("-j REDIRECT --to-ports 15001");
        for must_precede in [
            "--mark 0x539 -j RETURN",
            "--uid-owner 1337",
            "-o lo -j RETURN",
            "--dport 15012 -j RETURN",
            "--dport 15010 -j RETURN",
        ] {
            assert!(
                idx(must_precede) < redirect,
                "{must_precede} must come before the redirect"
            );
        }
        assert!(
            idx("BULWARK_INBOUND -p tcp --dport 15020 -j RETURN")
                < idx("BULWARK_INBOUND -p tcp -j REDIRECT --to-ports 15006")
        );
        // The proxy's own connections to its pod's address go inbound,
        // ahead of the rule that lets the proxy's traffic through.
        assert!(
            idx(
                "BULWARK_OUTPUT -o lo ! -d 127.0.0.0/8 -p tcp -m mark --mark 0x539 -j REDIRECT --to-ports 15006"
            ) < idx("--mark 0x539 -j RETURN")
        );
        assert!(p.contains("-A OUTPUT -p tcp -j BULWARK_OUTPUT"));
        assert!(p.contains("-A PREROUTING -p tcp -j BULWARK_INBOUND"));
    }

    #[test]
    fn explicit_inbound_ports_redirect_only_those() {
        let o = RuleOptions {
            inbound_ports: vec![8080, 9090],
            ..Default::default()
        };
        let p = plan(&o).join("\n");
        assert!(p.contains("--dport 8080 -j REDIRECT --to-ports 15006"));
        assert!(p.contains("--dport 9090 -j REDIRECT --to-ports 15006"));
        assert!(!p.contains("BULWARK_INBOUND -p tcp -j REDIRECT"));
    }
}
