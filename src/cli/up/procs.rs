//! The mesh's processes: every component is this same binary, started in
//! a pod's namespace with its output in a log file of the state dir.
//!
//! A child joins its namespace with `setns` between fork and exec (no `ip
//! netns exec` wrapper, so the pid we hold is the component's own). Unless
//! the mesh is to outlive `up` (`--keep`), each child also asks the kernel
//! for SIGKILL when `up` dies (`PR_SET_PDEATHSIG`), so even a SIGKILLed
//! `up` leaves no process behind. That signal fires when the *thread* that
//! forked the child exits, so children are only ever started from the main
//! thread, which lives as long as `up`.
//!
//! Children get their own process group, so the terminal's Ctrl-C reaches
//! only `up`, which then tears down in order (with `--keep`, their own
//! session, so closing the terminal does not end them either).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::net;

/// How children relate to `up`'s own life.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tether {
    /// Killed by the kernel when `up` dies.
    DieWithUp,
    /// Outlive `up` (`--keep`): their own session, no death signal.
    Detached,
}

pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub struct Procs {
    exe: PathBuf,
    logs: PathBuf,
    tether: Tether,
    list: Vec<Proc>,
}

impl Procs {
    pub fn new(exe: PathBuf, logs: PathBuf, tether: Tether) -> Self {
        Procs {
            exe,
            logs,
            tether,
            list: Vec::new(),
        }
    }

    /// Starts `bulwark ARGS` in namespace `ns` as component `name` (its
    /// log: `<logs>/<name>.log`). Call from the main thread only (see the
    /// module doc).
    pub fn spawn(&mut self, ns: &str, name: &str, args: &[String]) -> anyhow::Result<&Proc> {
        let log = self.logs.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let nsfile = File::open(net::ns_path(ns)).with_context(|| format!("namespace {ns}"))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        in_namespace(&mut cmd, &nsfile, self.tether);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} in {ns}"))?;
        // The child has its own copy of the namespace fd by now.
        drop(nsfile);
        self.list.push(Proc {
            name: name.to_string(),
            log,
            child,
        });
        Ok(self.list.last().expect("just pushed"))
    }

    pub fn all(&self) -> &[Proc] {
        &self.list
    }

    /// An error naming the first component that has exited, with its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.list {
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!(
                    "{} exited ({status}); last lines of {}:\n{}",
                    p.name,
                    p.log.display(),
                    tail(&p.log, 15)
                );
            }
        }
        Ok(())
    }

    /// SIGTERM to every component (their process groups), up to `grace`
    /// for them to exit (sidecars drain), then SIGKILL. Reaps them all.
    pub fn terminate_all(&mut self, grace: Duration) {
        for p in &self.list {
            signal_group(p.pid(), libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        loop {
            let mut running = 0;
            for p in &mut self.list {
                if matches!(p.child.try_wait(), Ok(None)) {
                    running += 1;
                }
            }
            if running == 0 || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in &mut self.list {
            if matches!(p.child.try_wait(), Ok(None)) {
                signal_group(p.pid(), libc::SIGKILL);
            }
            let _ = p.child.wait();
        }
        self.list.clear();
    }

    /// Forgets the children without stopping them (`--keep`).
    pub fn release(&mut self) {
        self.list.clear();
    }
}

fn signal_group(pid: i32, sig: i32) {
    // SAFETY: plain syscalls. The child leads its own group (see
    // `in_namespace`); the group also holds anything it started.
    unsafe {
        if libc::kill(-pid, sig) != 0 {
            libc::kill(pid, sig);
        }
    }
}

/// Arranges for `cmd` to run in the namespace open as `nsfile`, tethered
/// to `up` as `tether` says.
fn in_namespace(cmd: &mut Command, nsfile: &File, tether: Tether) {
    let fd = nsfile.as_raw_fd();
    // SAFETY: getpid is always safe; read before fork so the child can
    // tell whether `up` died before the death signal was armed.
    let parent = unsafe { libc::getpid() };
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            match tether {
                Tether::Detached => {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Tether::DieWithUp => {
                    if libc::setpgid(0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::getppid() != parent {
                        // `up` is already gone: do not outlive it.
                        libc::_exit(1);
                    }
                }
            }
            Ok(())
        });
    }
}

/// Runs `bulwark ARGS` in namespace `ns` to completion (e.g. `init`).
pub fn run_in(exe: &Path, ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let nsfile = File::open(net::ns_path(ns)).with_context(|| format!("namespace {ns}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(args);
    in_namespace(&mut cmd, &nsfile, Tether::DieWithUp);
    finish(
        cmd.output(),
        &format!("bulwark {} (in {ns})", args.join(" ")),
    )
}

/// Runs `bulwark ARGS` here (the host namespace) to completion.
pub fn run_here(exe: &Path, args: &[&str]) -> anyhow::Result<String> {
    finish(
        Command::new(exe).args(args).output(),
        &format!("bulwark {}", args.join(" ")),
    )
}

fn finish(out: std::io::Result<Output>, what: &str) -> anyhow::Result<String> {
    let out = out.with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
