//! `bulwark up` end to end: the real command builds a mesh of
//! network-namespace pods on this machine, measures it and tears it down;
//! the assertions read its machine-checkable summary (format documented
//! in `src/cli/up/summary.rs`) and then look at the machine for leftovers.

mod common;
mod netns;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{BIN, wait_for};

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/examples");
/// The v2 weight of the canary in deploy/examples/api-traffic.yaml.
const CONFIG_V2_SHARE: f64 = 0.10;
/// Bring-up of five pods from a debug build on a busy two-core machine.
const UP_TIMEOUT: Duration = Duration::from_secs(120);

/// `up` uses fixed namespace names: two runs must never overlap.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running `bulwark up`, its stdout collected line by line.
struct Up {
    child: Child,
    out: Arc<Mutex<Vec<String>>>,
    /// Set when `up`'s stdout has closed (every line is in `out`).
    eof: Arc<std::sync::atomic::AtomicBool>,
    mesh_up: Receiver<()>,
    stderr: PathBuf,
}

impl Up {
    fn start(state_dir: &Path, extra: &[&str]) -> Up {
        let stderr = state_dir.with_extension("stderr.log");
        let mut child = Command::new(BIN)
            .args(["up", "--config", CONFIG, "--state-dir"])
            .arg(state_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let (tx, mesh_up) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let lines = out.clone();
        let eof = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closed = eof.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("mesh is up") {
                    let _ = tx.send(());
                }
                lines.lock().unwrap().push(line);
            }
            closed.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        Up {
            child,
            out,
            eof,
            mesh_up,
            stderr,
        }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.out.lock().unwrap().join("\n"),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Waits for "mesh is up"; returns the pids of `up`'s children then.
    fn wait_mesh_up(&mut self) -> Vec<i32> {
        let deadline = Instant::now() + UP_TIMEOUT;
        loop {
            if self
                .mesh_up
                .recv_timeout(Duration::from_millis(100))
                .is_ok()
            {
                return children_of(self.child.id() as i32);
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "`up` exited ({st}) before the mesh was up\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the mesh was not up within {UP_TIMEOUT:?}\n{}",
                self.output()
            );
        }
    }

    /// Waits for `up` to exit; asserts it succeeded.
    fn wait_success(&mut self, timeout: Duration) {
        let st = wait_for("`up` to finish", timeout, || self.child.try_wait().unwrap());
        // The reader thread may still hold the last lines.
        wait_for("`up`'s stdout to close", Duration::from_secs(10), || {
            self.eof
                .load(std::sync::atomic::Ordering::SeqCst)
                .then_some(())
        });
        assert!(st.success(), "`up` failed ({st})\n{}", self.output());
    }

    fn summary(&self) -> Summary {
        Summary::parse(&self.out.lock().unwrap())
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // A failed assertion must not leave `up` running: SIGTERM makes it
        // tear down, SIGKILL after a while.
        if let Ok(None) = self.child.try_wait() {
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `summary:` lines as key → value, plus each `pair=` line on its own.
struct Summary {
    fields: HashMap<String, String>,
    pairs: HashMap<String, HashMap<String, String>>,
    text: String,
}

impl Summary {
    fn parse(lines: &[String]) -> Summary {
        let mut s = Summary {
            fields: HashMap::new(),
            pairs: HashMap::new(),
            text: String::new(),
        };
        for line in lines {
            let Some(rest) = line.strip_prefix("summary: ") else {
                continue;
            };
            s.text.push_str(line);
            s.text.push('\n');
            let kv: HashMap<String, String> = rest
                .split_whitespace()
                .filter_map(|f| f.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            if let Some(pair) = kv.get("pair") {
                s.pairs.insert(pair.clone(), kv);
            } else if !kv.contains_key("route") {
                s.fields.extend(kv);
            }
        }
        assert!(!s.text.is_empty(), "no summary in:\n{}", lines.join("\n"));
        s
    }

    fn get(&self, key: &str) -> &str {
        self.fields
            .get(key)
            .unwrap_or_else(|| panic!("summary has no {key}:\n{}", self.text))
    }

    fn num(&self, key: &str) -> f64 {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("{key} is not a number:\n{}", self.text))
    }

    /// Everything a good run shows: traffic flowed and succeeded, every
    /// meshed hop rode mTLS (the callee saw the caller's SPIFFE ID), the
    /// canary followed the config, the outsider was refused.
    fn assert_good(&self, min_requests: f64) {
        let t = &self.text;
        assert_eq!(self.get("result"), "ok", "{t}");
        assert!(self.num("requests") >= min_requests, "{t}");
        assert!(self.num("success_rate") >= 0.99, "{t}");
        let pairs: Vec<&str> = self.get("mtls_pairs").split(',').collect();
        for (pair, src, dst, traffic) in [
            ("web->api", "web", "api", "requests"),
            ("api->db", "api", "db", "connections"),
        ] {
            assert!(pairs.contains(&pair), "{pair} not over mTLS:\n{t}");
            let p = &self.pairs[pair];
            assert_eq!(p["mtls"], "yes", "{t}");
            assert_eq!(p["src"], netns::mesh::spiffe(src), "{t}");
            assert_eq!(p["dst"], netns::mesh::spiffe(dst), "{t}");
            assert!(p[traffic].parse::<f64>().unwrap() > 0.0, "{pair}: {t}");
            assert!(
                p["handshakes_ok_total"].parse::<f64>().unwrap() > 0.0,
                "{pair}: {t}"
            );
        }
        let share = self.num("canary_v2_share");
        assert!(
            (self.num("config_v2_share") - CONFIG_V2_SHARE).abs() < 1e-9,
            "{t}"
        );
        assert!(
            (share - CONFIG_V2_SHARE).abs() <= 0.05,
            "canary v2 share {share} is more than 5 points from {CONFIG_V2_SHARE}:\n{t}"
        );
        assert_eq!(self.get("outsider_answered"), "0", "{t}");
        assert!(self.num("outsider_refused") >= 1.0, "{t}");
        assert!(self.num("sidecar_plaintext_resets") >= 1.0, "{t}");
    }
}

/// Pids of `pid`'s children (every thread's).
fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    out
}

/// Exists and is not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

fn sh(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd).args(args).output().unwrap()
}

fn our_namespaces() -> Vec<String> {
    String::from_utf8_lossy(&sh("ip", &["netns", "list"]).stdout)
        .lines()
        .filter(|l| l.starts_with("bwup-"))
        .map(String::from)
        .collect()
}

/// Nothing of a mesh remains: namespaces, host links, processes, state.
fn assert_nothing_left(state_dir: &Path, pids: &[i32]) {
    assert_eq!(our_namespaces(), Vec::<String>::new(), "namespaces left");
    let links = String::from_utf8_lossy(&sh("ip", &["-o", "link", "show"]).stdout).into_owned();
    let ours: Vec<&str> = links
        .lines()
        .filter(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|n| n.trim().starts_with("bwup"))
        })
        .collect();
    assert!(ours.is_empty(), "host links left: {ours:?}");
    let pgrep = sh("pgrep", &["-af", state_dir.to_str().unwrap()]);
    assert!(
        !pgrep.status.success(),
        "processes naming the state dir left:\n{}",
        String::from_utf8_lossy(&pgrep.stdout)
    );
    let alive: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    assert!(
        alive.is_empty(),
        "children of `up` still running: {alive:?}"
    );
    assert!(
        !state_dir.exists(),
        "state dir {} left",
        state_dir.display()
    );
}

#[test]
fn up_runs_the_shop_over_mtls_follows_the_canary_refuses_the_outsider_and_leaves_nothing() {
    let _serial = serial();
    if !netns::available() {
        return;
    }
    let work = common::tempdir();
    let state = work.path().join("state");
    let t0 = Instant::now();
    let mut up = Up::start(&state, &["--duration", "20"]);
    let pids = up.wait_mesh_up();
    let ready = t0.elapsed();
    assert!(
        pids.len() >= 10,
        "CA, control plane, 4 apps, 4 sidecars: {pids:?}"
    );
    up.wait_success(Duration::from_secs(90));
    let total = t0.elapsed();
    let s = up.summary();
    println!("{}", s.text);
    println!(
        "mesh up in {} ms; whole run {} ms",
        ready.as_millis(),
        total.as_millis()
    );
    // 20 s at 40 req/s; leave room for a slow machine.
    s.assert_good(300.0);
    assert!(s.num("window_s") >= 19.0, "{}", s.text);
    assert!(s.num("outsider_attempts") >= 15.0, "{}", s.text);
    assert_nothing_left(&state, &pids);
}

#[test]
fn up_after_a_sigkill_starts_cleanly_and_finishes_with_a_good_summary() {
    let _serial = serial();
    if !netns::available() {
        return;
    }
    let work = common::tempdir();
    let state = work.path().join("state");
    let mut first = Up::start(&state, &["--duration", "120"]);
    let pids = first.wait_mesh_up();
    unsafe {
        libc::kill(first.child.id() as i32, libc::SIGKILL);
    }
    first.child.wait().unwrap();
    // The kernel kills the children with `up` (PR_SET_PDEATHSIG) ...
    wait_for(
        "the children of the killed `up` to die with it",
        Duration::from_secs(10),
        || pids.iter().all(|p| !alive(*p)).then_some(()),
    );
    // ... but its namespaces and state dir are left for the next run.
    assert!(!our_namespaces().is_empty());
    assert!(state.exists());

    let t0 = Instant::now();
    let mut second = Up::start(&state, &["--duration", "10"]);
    let pids = second.wait_mesh_up();
    second.wait_success(Duration::from_secs(90));
    println!("second run: {} ms", t0.elapsed().as_millis());
    let out = second.output();
    assert!(
        out.contains("removed leftovers of a previous run: 6 namespaces"),
        "{out}"
    );
    let s = second.summary();
    println!("{}", s.text);
    // 10 s at 40 req/s.
    s.assert_good(150.0);
    assert_nothing_left(&state, &pids);
}

#[test]
fn ctrl_c_ends_the_live_view_with_a_summary_and_tears_everything_down() {
    let _serial = serial();
    if !netns::available() {
        return;
    }
    let work = common::tempdir();
    let state = work.path().join("state");
    let mut up = Up::start(&state, &[]);
    let pids = up.wait_mesh_up();
    // A few frames of the live view.
    wait_for("three frames", Duration::from_secs(30), || {
        (up.out
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("canary "))
            .count()
            >= 3)
            .then_some(())
    });
    unsafe {
        libc::kill(up.child.id() as i32, libc::SIGINT);
    }
    up.wait_success(Duration::from_secs(30));
    let out = up.output();
    assert!(out.contains("interrupted (SIGINT)"), "{out}");
    assert!(out.contains("ROUTE"), "{out}");
    assert!(out.contains("sa/web -> sa/api"), "{out}");
    assert!(out.contains("summary: result="), "{out}");
    assert_nothing_left(&state, &pids);
}

#[test]
fn up_without_its_tools_says_what_is_missing_in_one_line_and_touches_nothing() {
    let empty = common::tempdir();
    let out = Command::new(BIN)
        .args(["up", "--config", CONFIG])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("apt-get install iptables iproute2") || err.contains("needs root"),
        "{err}"
    );
}
