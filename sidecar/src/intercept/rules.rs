//! The iptables (nat table) rules that send a pod's TCP traffic through the
//! sidecar: outbound to the outbound listener, inbound to the inbound one.
//!
//! The proxy's own sockets are excluded by socket mark (`SO_MARK`, set on
//! every upstream socket the sidecar opens) and, when `proxy_uid` is given,
//! by owner uid as well. The mark works whatever user the proxy runs as
//! (our network-namespace pods run it as root); the uid match is what a
//! Kubernetes sidecar running unprivileged relies on, since setting SO_MARK
//! needs CAP_NET_ADMIN.

//!
//! IPv6 is not redirected (the listeners are IPv4): its TCP is refused in
//! both directions instead (`ip6tables`, filter table), so that in a
//! dual-stack pod it cannot go around the sidecar.

use std::process::Command;

/// Chains we own. Everything we add hangs off these, so removal is exact.
pub const OUTPUT_CHAIN: &str = "BULWARK_OUTPUT";
pub const INBOUND_CHAIN: &str = "BULWARK_INBOUND";
pub const V6_OUTPUT_CHAIN: &str = "BULWARK_V6_OUTPUT";
pub const V6_INPUT_CHAIN: &str = "BULWARK_V6_INPUT";

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
            // None: the proxy's own connections (to the CA and control
            // plane among them) pass by mark or uid. A port let through
            // here would let the app reach any host on it around the mesh.
            exclude_outbound_ports: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{0} not found: install it (Debian/Ubuntu: apt-get install iptables){hint}", hint = missing_hint(.0))]
    Missing(&'static str),
    #[error("not permitted to change iptables rules: run as root or with CAP_NET_ADMIN ({0})")]
    Permission(String),
    #[error("`{tool} {args}` failed: {stderr}")]
    Failed {
        tool: &'static str,
        args: String,
        stderr: String,
    },
}

fn missing_hint(tool: &str) -> &'static str {
    if tool.starts_with("ip6tables") {
        "; without it, IPv6 traffic would go around the sidecar"
    } else {
        ""
    }
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
    // The proxy's sockets: by mark, and by uid for a proxy that cannot set
    // marks (an unprivileged Kubernetes sidecar).
    let uid = o.proxy_uid.map(|u| u.to_string());
    let mut proxy_owned: Vec<[&str; 4]> = vec![["-m", "mark", "--mark", &mark]];
    if let Some(uid) = &uid {
        proxy_owned.push(["-m", "owner", "--uid-owner", uid]);
    }
    // Both rules below are for the proxy's own dials over loopback.
    let lo_out = ["-t", "nat", "-A", out, "-o", "lo"];
    // The inbound sidecar handing a connection to its app, at the pod
    // address the peer dialled, from APP_SOURCE: first, so the self-call
    // rule below does not take it.
    let app_source = format!("{}/32", super::APP_SOURCE);
    rules.push(r(&[
        &lo_out[..],
        &["-s", &app_source, "-p", "tcp", "-j", "RETURN"][..],
    ]
    .concat()));
    // The proxy dialling its own pod (a Service whose chosen endpoint is
    // this pod): the connection never leaves loopback, so PREROUTING never
    // sees it and the mTLS bytes would reach the app's port. It goes to the
    // inbound listener, as it would from any other pod. Not 127/8: the
    // proxy's own loopback calls (the app's health probes).
    for m in &proxy_owned {
        let head = [&lo_out[..], &["!", "-d", "127.0.0.0/8", "-p", "tcp"][..]].concat();
        rules.push(r(&[
            &head[..],
            &m[..],
            &["-j", "REDIRECT", "--to-ports", &ip][..],
        ]
        .concat()));
    }
    for m in &proxy_owned {
        rules.push(r(&[
            &["-t", "nat", "-A", out][..],
            &m[..],
            &["-j", "RETURN"][..],
        ]
        .concat()));
    }
    // Loopback: the app talking to itself.
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

/// The IPv6 rules: loopback, the proxy's own sockets and the excluded
/// inbound ports (health, metrics) pass; other TCP is reset.
pub fn v6_chain_rules(o: &RuleOptions) -> Vec<Rule> {
    let (out, inb) = (V6_OUTPUT_CHAIN, V6_INPUT_CHAIN);
    let mark = format!("0x{:x}", o.proxy_mark);
    // New connections only (`--syn`): replies to the proxy's own and to
    // the excluded ports' connections pass, and nothing else gets that far.
    let reset = [
        "-p",
        "tcp",
        "--syn",
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ];
    let mut rules = vec![
        r(&["-t", "filter", "-A", out, "-o", "lo", "-j", "RETURN"]),
        r(&[
            "-t", "filter", "-A", out, "-m", "mark", "--mark", &mark, "-j", "RETURN",
        ]),
    ];
    if let Some(uid) = o.proxy_uid {
        let uid = uid.to_string();
        rules.push(r(&[
            "-t",
            "filter",
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
    rules.push(r(&[&["-t", "filter", "-A", out][..], &reset[..]].concat()));
    rules.push(r(&["-t", "filter", "-A", inb, "-i", "lo", "-j", "RETURN"]));
    for p in &o.exclude_inbound_ports {
        let p = p.to_string();
        rules.push(r(&[
            "-t", "filter", "-A", inb, "-p", "tcp", "--dport", &p, "-j", "RETURN",
        ]));
    }
    rules.push(r(&[&["-t", "filter", "-A", inb][..], &reset[..]].concat()));
    rules
}

fn v6_jumps() -> Vec<Rule> {
    vec![
        r(&["-t", "filter", "OUTPUT", "-p", "tcp", "-j", V6_OUTPUT_CHAIN]),
        r(&["-t", "filter", "INPUT", "-p", "tcp", "-j", V6_INPUT_CHAIN]),
    ]
}

/// One tool's share of the rules: its table, chains, rules and jumps.
struct RuleSet {
    tool: &'static str,
    table: &'static str,
    chains: [&'static str; 2],
    rules: Vec<Rule>,
    jumps: Vec<Rule>,
}

fn rule_sets(o: &RuleOptions) -> [RuleSet; 2] {
    [
        RuleSet {
            tool: "iptables",
            table: "nat",
            chains: [OUTPUT_CHAIN, INBOUND_CHAIN],
            rules: chain_rules(o),
            jumps: jumps(),
        },
        RuleSet {
            tool: "ip6tables",
            table: "filter",
            chains: [V6_OUTPUT_CHAIN, V6_INPUT_CHAIN],
            rules: v6_chain_rules(o),
            jumps: v6_jumps(),
        },
    ]
}

/// Everything `init` would run, for `--dry-run`: per tool, the input it
/// feeds `<tool>-restore --noflush` (`init` skips the IPv6 part where the
/// kernel has no IPv6, and adds a jump only where it is not there yet).
pub fn plan(o: &RuleOptions) -> Vec<String> {
    let mut out = Vec::new();
    for set in rule_sets(o) {
        out.push(format!("# {}-restore --noflush", set.tool));
        out.extend(restore_input(&set, &set.jumps).lines().map(str::to_string));
    }
    out
}

/// The `iptables-restore` input that replaces our chains' content and adds
/// `jumps`, as one transaction. With `--noflush`, declaring a chain that
/// exists flushes it: the kernel swaps the old rules for the new ones at
/// once, so a connection opened meanwhile meets one set or the other,
/// never an empty or half-built chain.
fn restore_input(set: &RuleSet, jumps: &[Rule]) -> String {
    let mut t = format!("*{}\n", set.table);
    for c in set.chains {
        t.push_str(&format!(":{c} - [0:0]\n"));
    }
    // Rules are `-t <table> -A <chain> ...`; jumps `-t <table> <chain> ...`.
    for rule in &set.rules {
        t.push_str(&rule[2..].join(" "));
        t.push('\n');
    }
    for j in jumps {
        t.push_str(&format!("-A {}\n", j[2..].join(" ")));
    }
    t.push_str("COMMIT\n");
    t
}

/// Whether this network namespace has IPv6 (its interfaces' addresses are
/// listed only when the kernel has it enabled).
fn ipv6_enabled() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Waits up to this long for the xtables lock (iptables-legacy) rather
/// than fail at once when another program holds it; a no-op with nft.
const WAIT: [&str; 2] = ["-w", "5"];

fn run(tool: &'static str, args: &[String]) -> Result<std::process::Output, RulesError> {
    Command::new(tool)
        .args(WAIT)
        .args(args)
        .output()
        .map_err(|e| spawn_error(tool, args, e))
}

fn spawn_error(tool: &'static str, args: &[String], e: std::io::Error) -> RulesError {
    match e.kind() {
        std::io::ErrorKind::NotFound => RulesError::Missing(tool),
        _ => RulesError::Failed {
            tool,
            args: args.join(" "),
            stderr: e.to_string(),
        },
    }
}

fn must(tool: &'static str, args: &[String]) -> Result<(), RulesError> {
    let out = run(tool, args)?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(failure(tool, args, stderr))
}

fn failure(tool: &'static str, args: &[String], stderr: String) -> RulesError {
    if stderr.contains("Permission denied") || stderr.contains("Operation not permitted") {
        return RulesError::Permission(stderr);
    }
    RulesError::Failed {
        tool,
        args: args.join(" "),
        stderr,
    }
}

/// Whether a check (`-C`, `-S <chain>`) holds. Exit status 1 is "no such
/// rule or chain"; any other failure (a held lock, a bad argument) is an
/// error, not a "no" that would make `install` add a second jump.
fn succeeds(tool: &'static str, args: &[String]) -> Result<bool, RulesError> {
    let out = run(tool, args)?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            Err(failure(tool, args, format!("{} ({})", stderr, out.status)))
        }
    }
}

fn s(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

/// Whether `jump` is in its built-in chain. Its target chain is looked up
/// first: `-C` on a jump to a chain that does not exist is an error (exit
/// status 2), not a "no".
fn jump_present(tool: &'static str, table: &str, jump: &Rule) -> Result<bool, RulesError> {
    let target = jump.last().expect("a jump names its chain");
    Ok(succeeds(tool, &s(&["-t", table, "-S", target]))? && succeeds(tool, &jump_op(jump, "-C"))?)
}

/// `jump` with `op` (`-C`, `-A`, `-D`) after its table.
fn jump_op(jump: &Rule, op: &str) -> Vec<String> {
    let (table, rest) = jump.split_at(2);
    table
        .iter()
        .cloned()
        .chain([op.to_string()])
        .chain(rest.iter().cloned())
        .collect()
}

/// Installs the rules. Idempotent: running it twice leaves one set. Each
/// tool's rules change in one transaction, so re-running it in a live pod
/// opens no window in which traffic skips the sidecar.
pub fn install(o: &RuleOptions) -> Result<(), RulesError> {
    for set in rule_sets(o) {
        if set.tool != "ip6tables" {
            install_set(&set)?;
            continue;
        }
        if !ipv6_enabled() {
            continue;
        }
        match install_set(&set) {
            // Without a global IPv6 address there is no IPv6 path around
            // the sidecar to close: a node whose ip6tables does not work
            // need not keep the pod from starting.
            Err(e) if !has_global_ipv6() => {
                tracing::warn!(error = %e, "IPv6 rules not installed; the pod has no global IPv6 address");
            }
            r => r?,
        }
    }
    Ok(())
}

fn install_set(set: &RuleSet) -> Result<(), RulesError> {
    let (tool, table) = (set.tool, set.table);
    // Probe first so a missing binary or privilege gives one clear error.
    must(tool, &s(&["-t", table, "-S", "OUTPUT"]))?;
    let mut missing = Vec::new();
    for j in &set.jumps {
        if !jump_present(tool, table, j)? {
            missing.push(j.clone());
        }
    }
    restore(tool, &restore_input(set, &missing))
}

/// Feeds `input` to `<tool>-restore --noflush`, which commits it whole or
/// not at all.
fn restore(tool: &'static str, input: &str) -> Result<(), RulesError> {
    use std::io::Write;
    let restore: &'static str = match tool {
        "ip6tables" => "ip6tables-restore",
        _ => "iptables-restore",
    };
    let args = ["--noflush".to_string()];
    let spawned = Command::new(restore)
        .args(WAIT)
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = spawned.map_err(|e| spawn_error(restore, &args, e))?;
    // The input is a few kB: it fits the pipe, so writing before reading
    // the output cannot deadlock.
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes());
    let out = child
        .wait_with_output()
        .map_err(|e| spawn_error(restore, &args, e))?;
    if out.status.success() {
        return written.map_err(|e| spawn_error(restore, &args, e));
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(failure(
        restore,
        &args,
        format!("{} ({})", stderr, out.status),
    ))
}

/// Whether an interface of this namespace has a global-scope IPv6 address
/// (`/proc/net/if_inet6`: address, index, prefix, scope, flags, name).
fn has_global_ipv6() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6")
        .map(|t| global_ipv6_in(&t))
        .unwrap_or(false)
}

fn global_ipv6_in(if_inet6: &str) -> bool {
    if_inet6
        .lines()
        .any(|l| l.split_whitespace().nth(3) == Some("00"))
}

/// Removes exactly what `install` added. Safe to run when nothing is installed.
pub fn remove() -> Result<(), RulesError> {
    for set in rule_sets(&RuleOptions::default()) {
        let (tool, table) = (set.tool, set.table);
        if tool == "ip6tables" && !ipv6_enabled() {
            continue;
        }
        match must(tool, &s(&["-t", table, "-S", "OUTPUT"])) {
            // Nothing of ours can be there without the tool.
            Err(RulesError::Missing(_)) if tool == "ip6tables" => continue,
            r => r?,
        }
        for j in &set.jumps {
            while jump_present(tool, table, j)? {
                must(tool, &jump_op(j, "-D"))?;
            }
        }
        for c in set.chains {
            if succeeds(tool, &s(&["-t", table, "-S", c]))? {
                must(tool, &s(&["-t", table, "-F", c]))?;
                must(tool, &s(&["-t", table, "-X", c]))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan for a proxy excluded by mark and by uid 1337, one line per rule.
    fn plan_with_proxy_uid() -> String {
        let o = RuleOptions {
            proxy_uid: Some(1337),
            ..Default::default()
        };
        plan(&o).join("\n")
    }

    /// Where `needle` is in `plan`; a missing rule fails the test.
    fn position(plan: &str, needle: &str) -> usize {
        plan.find(needle)
            .unwrap_or_else(|| panic!("{needle} missing in\n{plan}"))
    }

    #[test]
    fn by_default_no_outbound_port_goes_around_the_proxy() {
        let p = plan_with_proxy_uid();
        assert!(
            !p.lines()
                .any(|l| l.contains("BULWARK_OUTPUT") && l.contains("--dport")),
            "{p}"
        );
    }

    #[test]
    fn plan_excludes_proxy_loopback_and_chosen_ports_before_redirecting() {
        let p = plan(&RuleOptions {
            proxy_uid: Some(1337),
            exclude_outbound_ports: vec![5432],
            ..Default::default()
        })
        .join("\n");
        let idx = |needle: &str| position(&p, needle);
        let redirect = idx("-j REDIRECT --to-ports 15001");
        for must_precede in [
            "--mark 0x539 -j RETURN",
            "--uid-owner 1337",
            "-o lo -j RETURN",
            "BULWARK_OUTPUT -p tcp --dport 5432 -j RETURN",
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
        // ahead of the rules that let the proxy's traffic through, whether
        // they are told apart by mark or (unprivileged proxy) by uid.
        for owner in ["-m mark --mark 0x539", "-m owner --uid-owner 1337"] {
            assert!(
                idx(&format!(
                    "BULWARK_OUTPUT -o lo ! -d 127.0.0.0/8 -p tcp {owner} -j REDIRECT --to-ports 15006"
                )) < idx(&format!("BULWARK_OUTPUT {owner} -j RETURN")),
                "{owner}"
            );
            // ... but not the inbound sidecar's hand-off to its app.
            assert!(
                idx("BULWARK_OUTPUT -o lo -s 127.0.0.6/32 -p tcp -j RETURN")
                    < idx(&format!(
                        "BULWARK_OUTPUT -o lo ! -d 127.0.0.0/8 -p tcp {owner} -j REDIRECT"
                    )),
                "{owner}"
            );
        }
        assert!(p.contains("-A OUTPUT -p tcp -j BULWARK_OUTPUT"));
        assert!(p.contains("-A PREROUTING -p tcp -j BULWARK_INBOUND"));
    }

    #[test]
    fn ipv6_tcp_is_reset_both_ways_but_loopback_the_proxy_and_health_ports() {
        let p = plan_with_proxy_uid();
        let idx = |needle: &str| position(&p, needle);
        let out_reset = idx("-A BULWARK_V6_OUTPUT -p tcp --syn -j REJECT --reject-with tcp-reset");
        for pass in [
            "BULWARK_V6_OUTPUT -o lo -j RETURN",
            "BULWARK_V6_OUTPUT -m mark --mark 0x539 -j RETURN",
            "BULWARK_V6_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        ] {
            assert!(idx(pass) < out_reset, "{pass}");
        }
        let in_reset = idx("BULWARK_V6_INPUT -p tcp --syn -j REJECT --reject-with tcp-reset");
        for pass in [
            "BULWARK_V6_INPUT -i lo -j RETURN",
            "BULWARK_V6_INPUT -p tcp --dport 15020 -j RETURN",
        ] {
            assert!(idx(pass) < in_reset, "{pass}");
        }
        let v6 = &p[idx("# ip6tables-restore --noflush")..];
        assert!(
            v6.starts_with("# ip6tables-restore --noflush\n*filter\n:BULWARK_V6_OUTPUT - [0:0]\n")
        );
        assert!(v6.contains("\n-A OUTPUT -p tcp -j BULWARK_V6_OUTPUT\n"));
        assert!(v6.contains("\n-A INPUT -p tcp -j BULWARK_V6_INPUT\nCOMMIT"));
    }

    #[test]
    fn only_a_global_scope_address_counts_as_an_ipv6_path() {
        let lo = "00000000000000000000000000000001 01 80 10 80       lo\n";
        let link = "fe80000000000000b0a1c2fffed3e4f5 02 40 20 80     eth0\n";
        let global = "fd00000b000000000000000000000003 02 40 00 80     eth0\n";
        assert!(!global_ipv6_in(&format!("{lo}{link}")));
        assert!(global_ipv6_in(&format!("{lo}{link}{global}")));
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
