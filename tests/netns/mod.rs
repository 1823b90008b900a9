//! Pods as network namespaces: each pod has its own namespace with `eth0`
//! joined by a veth pair to a bridge that lives in a per-test "switch"
//! namespace (which also hosts the CA). Nothing touches the host's own
//! network namespace except transient veth creation. Everything is removed
//! on drop, including when a test panics; leftovers of killed runs are
//! removed by the next run.
#![allow(dead_code)]

pub mod mesh;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::common::{BIN, Proc};

static NEXT: AtomicU32 = AtomicU32::new(0);
const PREFIX: &str = "bwt";

/// Whether the network-namespace tests can run here. Without root they
/// fail with a clear message, unless BULWARK_SKIP_NETNS=1 says to skip.
pub fn available() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let tools = [("ip", "-V"), ("iptables", "--version")]
        .iter()
        .all(|(t, v)| {
            Command::new(t)
                .arg(v)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        });
    if root && tools {
        return true;
    }
    let why = if !root {
        "network-namespace tests need root (they create namespaces, veths and iptables rules)"
    } else {
        "network-namespace tests need `ip` (iproute2) and `iptables`: apt-get install iproute2 iptables"
    };
    if std::env::var("BULWARK_SKIP_NETNS").as_deref() == Ok("1") {
        eprintln!("skipped: {why} (BULWARK_SKIP_NETNS=1)");
        return false;
    }
    panic!(
        "{why}; run as root (e.g. `sudo -E cargo test`) or set BULWARK_SKIP_NETNS=1 to skip them"
    );
}

fn sh(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

fn must(cmd: &str, args: &[&str]) {
    let o = sh(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Removes namespaces left by test processes that no longer exist.
fn remove_stale() {
    let o = sh("ip", &["netns", "list"]);
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
            continue;
        };
        let pid: u32 = rest
            .split('-')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if pid != 0 && !Path::new(&format!("/proc/{pid}")).exists() {
            kill_ns_procs(name);
            let _ = sh("ip", &["netns", "del", name]);
        }
    }
}

fn kill_ns_procs(ns: &str) {
    let o = sh("ip", &["netns", "pids", ns]);
    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
        if let Ok(p) = pid.parse::<i32>() {
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// One test's network: a switch namespace with a bridge, and pods.
pub struct Net {
    pub id: String,
    pub switch: String,
    pub gateway: Ipv4Addr,
    pub dir: PathBuf,
    pods: Vec<Pod>,
    procs: Vec<Proc>,
    next_host: u8,
    _work: tempfile::TempDir,
}

impl Net {
    /// None when the tests must be skipped (see [`available`]).
    pub fn new() -> Option<Net> {
        if !available() {
            return None;
        }
        remove_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{PREFIX}-{}-{n}", std::process::id());
        let switch = format!("{id}-sw");
        must("ip", &["netns", "add", &switch]);
        let work = crate::common::tempdir();
        let net = Net {
            gateway: Ipv4Addr::new(198, 18, 0, 1),
            dir: work.path().to_path_buf(),
            id,
            switch,
            pods: Vec::new(),
            procs: Vec::new(),
            next_host: 2,
            _work: work,
        };
        net.exec_ok(&net.switch, &["ip", "link", "set", "lo", "up"]);
        net.exec_ok(&net.switch, &["ip", "link", "add", "br0", "type", "bridge"]);
        // A fixed MAC: otherwise the bridge takes the lowest MAC of its
        // ports, and each pod joining later may change it under the feet of
        // pods that already resolved the gateway (their packets to it are then
        // dropped until their ARP entries expire).
        net.exec_ok(
            &net.switch,
            &["ip", "link", "set", "br0", "address", "02:42:c6:12:00:01"],
        );
        net.exec_ok(
            &net.switch,
            &["ip", "addr", "add", "198.18.0.1/24", "dev", "br0"],
        );
        net.exec_ok(&net.switch, &["ip", "link", "set", "br0", "up"]);
        Some(net)
    }

    /// Adds a pod namespace with eth0 on the bridge and a default route.
    pub fn add_pod(&mut self, name: &str) -> Pod {
        let ns = format!("{}-{name}", self.id);
        must("ip", &["netns", "add", &ns]);
        let host = self.next_host;
        self.next_host += 1;
        let ip = Ipv4Addr::new(198, 18, 0, host);
        // Short, unique, transient names in the host namespace.
        let tag = format!(
            "{:x}{:x}",
            std::process::id() % 0xfffff,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let (a, b) = (format!("va{tag}"), format!("vb{tag}"));
        must(
            "ip",
            &["link", "add", &a, "type", "veth", "peer", "name", &b],
        );
        must("ip", &["link", "set", &a, "netns", &ns]);
        must("ip", &["link", "set", &b, "netns", &self.switch]);
        self.exec_ok(&ns, &["ip", "link", "set", &a, "name", "eth0"]);
        self.exec_ok(
            &ns,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        );
        self.exec_ok(&ns, &["ip", "link", "set", "eth0", "up"]);
        self.exec_ok(&ns, &["ip", "link", "set", "lo", "up"]);
        self.exec_ok(&ns, &["ip", "route", "add", "default", "via", "198.18.0.1"]);
        self.exec_ok(&self.switch, &["ip", "link", "set", &b, "master", "br0"]);
        self.exec_ok(&self.switch, &["ip", "link", "set", &b, "up"]);
        let pod = Pod {
            name: name.to_string(),
            ns,
            ip,
        };
        self.pods.push(pod.clone());
        pod
    }

    /// Runs a command in namespace `ns` to completion.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", ns];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    pub fn exec_ok(&self, ns: &str, args: &[&str]) -> String {
        let o = self.exec(ns, args);
        assert!(
            o.status.success(),
            "in {ns}: {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Starts a long-running program in `ns`; killed when the Net drops.
    /// Returns its index for [`Net::proc_mut`].
    pub fn spawn(&mut self, ns: &str, name: &str, program: &str, args: &[&str]) -> usize {
        let log = self.dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f);
        let child = cmd.spawn().unwrap();
        self.procs.push(Proc {
            child,
            name: name.to_string(),
            log,
        });
        self.procs.len() - 1
    }

    /// Starts `bulwark ARGS` in `ns`.
    pub fn spawn_bulwark(&mut self, ns: &str, name: &str, args: &[&str]) -> usize {
        self.spawn(ns, name, BIN, args)
    }

    pub fn proc_mut(&mut self, i: usize) -> &mut Proc {
        &mut self.procs[i]
    }

    /// Index of the most recent process started as `name`.
    pub fn proc_index(&self, name: &str) -> Option<usize> {
        self.procs.iter().rposition(|p| p.name == name)
    }

    /// How many processes were started with a name beginning `prefix`.
    pub fn procs_named(&self, prefix: &str) -> usize {
        self.procs
            .iter()
            .filter(|p| p.name.starts_with(prefix))
            .count()
    }

    pub fn log_of(&self, i: usize) -> String {
        self.procs[i].log_text()
    }

    /// Runs `f` on a thread inside namespace `ns`: sockets it opens live
    /// there (and are subject to that pod's interception rules).
    pub fn in_ns<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    }

    /// GET over HTTP/1.0 from inside `ns` (None if the connection fails).
    pub fn http_get(&self, ns: &str, addr: SocketAddr, path: &str) -> Option<String> {
        let path = path.to_string();
        self.in_ns(ns, move || http_get(addr, &path))
    }

    /// Polls `addr/path` in `ns` until it answers 200, or panics.
    pub fn wait_http_ok(&self, ns: &str, addr: SocketAddr, path: &str, timeout: Duration) {
        crate::common::wait_for(
            &format!("{addr}{path} in {ns} to answer 200"),
            timeout,
            || {
                self.http_get(ns, addr, path)
                    .filter(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
                    .map(|_| ())
            },
        );
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &str) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    use std::os::fd::AsRawFd;
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// A plain HTTP/1.0 GET with a short timeout; the whole response as text.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    (!out.is_empty()).then(|| String::from_utf8_lossy(&out).into_owned())
}

impl Drop for Net {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.kill();
        }
        for pod in &self.pods {
            kill_ns_procs(&pod.ns);
            let _ = sh("ip", &["netns", "del", &pod.ns]);
        }
        kill_ns_procs(&self.switch);
        let _ = sh("ip", &["netns", "del", &self.switch]);
    }
}
