//! What `up` needs from the machine, and the one-mesh-at-a-time lock.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Namespace names are fixed, so two `up`s must never run at once: this
/// lock (held by the running `up`, released by the kernel however it
/// ends) says whether one does. It also records the running (or last)
/// mesh's state dir, so `--down` and the next `up` can remove it.
pub const LOCK_PATH: &str = "/run/bulwark-up.lock";

/// Root, Linux, `ip` and `iptables`: checked before anything is touched,
/// each failure one line saying what is missing and how to get it.
pub fn preflight() -> anyhow::Result<()> {
    if !cfg!(target_os = "linux") {
        bail!("`bulwark up` needs Linux (network namespaces and iptables)");
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "`bulwark up` needs root (it creates network namespaces, veth pairs and iptables rules): run it with sudo"
        );
    }
    let missing: Vec<&str> = [("ip", "-V"), ("iptables", "--version")]
        .into_iter()
        .filter(|(tool, arg)| {
            !Command::new(tool)
                .arg(arg)
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(tool, _)| tool)
        .collect();
    if !missing.is_empty() {
        bail!(
            "`bulwark up` needs {} on PATH: apt-get install iptables iproute2",
            missing
                .iter()
                .map(|t| format!("`{t}`"))
                .collect::<Vec<_>>()
                .join(" and ")
        );
    }
    Ok(())
}

pub struct Lock {
    file: File,
    /// The state dir the previous holder recorded (if any).
    pub previous_state_dir: Option<PathBuf>,
}

/// Who holds the lock now.
pub struct Holder {
    pub pid: i32,
}

impl Lock {
    /// Takes the lock for a mesh kept in `state_dir`, or says who has it.
    pub fn acquire(state_dir: &Path) -> anyhow::Result<Lock> {
        match Self::try_acquire()? {
            Ok(mut lock) => {
                lock.record(state_dir)?;
                Ok(lock)
            }
            Err(h) => bail!(
                "another `bulwark up` (pid {}) is running; end it with Ctrl-C, or run `bulwark up --down`",
                h.pid
            ),
        }
    }

    /// Takes the lock; if a running `up` holds it, asks it to tear down
    /// (SIGTERM) and waits up to `patience` for it to let go.
    pub fn acquire_stopping_holder(patience: Duration) -> anyhow::Result<Lock> {
        let deadline = Instant::now() + patience;
        let mut signalled = None;
        loop {
            match Self::try_acquire()? {
                Ok(lock) => return Ok(lock),
                Err(h) => {
                    if signalled != Some(h.pid) && h.pid > 0 {
                        println!(
                            "asking the running `bulwark up` (pid {}) to tear down",
                            h.pid
                        );
                        // SAFETY: plain syscall.
                        unsafe {
                            libc::kill(h.pid, libc::SIGTERM);
                        }
                        signalled = Some(h.pid);
                    }
                    if Instant::now() >= deadline {
                        bail!(
                            "`bulwark up` (pid {}) did not end within {patience:?}; kill it and retry",
                            h.pid
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn try_acquire() -> anyhow::Result<Result<Lock, Holder>> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(LOCK_PATH)
            .with_context(|| format!("cannot open {LOCK_PATH}"))?;
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let mut lines = text.lines();
        let pid = lines
            .next()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        let state_dir = lines.next().filter(|d| !d.is_empty()).map(PathBuf::from);
        // SAFETY: flock on an fd we own; released when the file closes,
        // including when the process dies.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Ok(Err(Holder { pid }));
        }
        Ok(Ok(Lock {
            file,
            previous_state_dir: state_dir,
        }))
    }

    /// Records this process and its state dir for the next one.
    pub fn record(&mut self, state_dir: &Path) -> anyhow::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        writeln!(self.file, "{}\n{}", std::process::id(), state_dir.display())?;
        self.file.flush()?;
        Ok(())
    }
}

/// Marks a state dir as ours: only a directory holding it is ever
/// removed, so a mistyped `--state-dir /` cannot delete anything else.
pub const STATE_MARKER: &str = ".bulwark-up";

/// Removes `dir` if it is a state dir of ours (or absent). Refuses a
/// non-empty directory without our marker.
pub fn remove_state_dir(dir: &Path) -> anyhow::Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    if !dir.join(STATE_MARKER).exists() {
        let empty = std::fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            bail!(
                "{} exists and is not a `bulwark up` state dir (no {STATE_MARKER}); choose another --state-dir",
                dir.display()
            );
        }
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(true)
}

/// Processes of ours (`bulwark …`) whose command line names `dir`: what
/// is left of a mesh whose namespaces are already gone.
pub fn procs_mentioning(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let ours = args
                .first()
                .and_then(|a0| Path::new(a0).file_name())
                .is_some_and(|n| n.to_string_lossy().starts_with("bulwark"));
            ours && args.iter().any(|a| a.contains(&needle))
        })
        .collect()
}
