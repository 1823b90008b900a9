//! Watching the config directory: poll a stamp of its files, let a burst of
//! writes settle, recompile, and install the result as the new base config
//! only if it is valid. An invalid edit is logged (every `file:line` error)
//! and counted, and the last good config keeps being served.
//!
//! Polling, rather than inotify, because it behaves the same on every
//! filesystem the directory may live on (ConfigMap mounts, NFS, overlay) and
//! a stamp comparison every 200 ms costs a few `stat`s. Nothing is ever
//! written to the directory: several replicas may watch the same one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bulwark_proto::config::Resources;
use bulwark_proto::config::v1::Source;
use tokio::sync::watch;

use crate::load::ConfigErrors;
use crate::metrics::XdsMetrics;
use crate::status::{ConfigRejection, unix_ms};

/// How often the directory is checked.
pub const DEFAULT_POLL: Duration = Duration::from_millis(200);
/// How long the stamp must stay unchanged before a change is applied.
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(100);
/// A directory that keeps changing is loaded anyway after this long, so a
/// writer in a loop cannot hold config back forever.
pub const MAX_SETTLE: Duration = Duration::from_secs(2);

/// What identifies the content of the config files without reading them:
/// name, modification time, size and inode of each (following symlinks, so
/// a ConfigMap's atomic `..data` swap shows), in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirStamp(Vec<(String, Option<SystemTime>, u64, u64)>);

impl DirStamp {
    /// Stamps `path`: a directory's `*.yaml`/`*.yml` files (hidden ones
    /// skipped, as the loader does), or the one file `path` names. An
    /// unreadable path gives an empty stamp.
    pub fn read(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        let entry = |name: String, p: &Path| {
            std::fs::metadata(p)
                .ok()
                .filter(|m| m.is_file())
                .map(|m| (name, m.modified().ok(), m.len(), m.ino()))
        };
        let mut files = Vec::new();
        match std::fs::read_dir(path) {
            Ok(dir) => {
                for e in dir.flatten() {
                    let Ok(name) = e.file_name().into_string() else {
                        continue;
                    };
                    if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml"))
                    {
                        continue;
                    }
                    files.extend(entry(name, &e.path()));
                }
            }
            Err(_) => files.extend(entry(String::new(), path)),
        }
        files.sort();
        Self(files)
    }
}

/// Owns the base config: the last valid compilation of the directory.
pub struct ConfigWatcher {
    path: PathBuf,
    current: ArcSwap<Resources>,
    rejection: Mutex<Option<ConfigRejection>>,
    generation: watch::Sender<u64>,
    metrics: Arc<XdsMetrics>,
    loaded_stamp: Mutex<DirStamp>,
}

impl std::fmt::Debug for ConfigWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigWatcher")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ConfigWatcher {
    /// Loads `path` for the first time. There is no last good config to fall
    /// back on yet, so errors are returned.
    pub fn load(path: &Path, metrics: Arc<XdsMetrics>) -> Result<Self, ConfigErrors> {
        let stamp = DirStamp::read(path);
        let resources = compile(path)?;
        tracing::info!(path = %path.display(), documents = documents(&resources), "config loaded");
        Ok(Self {
            path: path.to_path_buf(),
            current: ArcSwap::from_pointee(resources),
            rejection: Mutex::new(None),
            generation: watch::Sender::new(0),
            metrics,
            loaded_stamp: Mutex::new(stamp),
        })
    }

    /// The base config now being served.
    pub fn current(&self) -> Arc<Resources> {
        self.current.load_full()
    }

    /// Why the directory's current content is not being served, if it is not.
    pub fn rejection(&self) -> Option<ConfigRejection> {
        lock(&self.rejection).clone()
    }

    /// Changes whenever a new base config is installed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Polls the directory forever (until the task is dropped).
    pub async fn run(self: Arc<Self>, poll: Duration, settle: Duration) {
        let mut seen = lock(&self.loaded_stamp).clone();
        loop {
            tokio::time::sleep(poll).await;
            let mut stamp = self.stamp().await;
            if stamp == seen {
                continue;
            }
            // Editors and `kubectl apply` write in bursts: wait until the
            // files have stopped changing, so a half-written set is not
            // compiled (and rejected) on the way.
            let started = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(settle).await;
                let again = self.stamp().await;
                if again == stamp || started.elapsed() >= MAX_SETTLE {
                    break;
                }
                stamp = again;
            }
            seen = stamp.clone();
            *lock(&self.loaded_stamp) = stamp;
            self.reload().await;
        }
    }

    async fn stamp(&self) -> DirStamp {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || DirStamp::read(&path))
            .await
            .unwrap_or_default()
    }

    /// Recompiles the directory; installs the result if it is valid.
    pub async fn reload(&self) {
        let path = self.path.clone();
        let result = match tokio::task::spawn_blocking(move || compile(&path)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "config reload task failed");
                return;
            }
        };
        match result {
            Ok(resources) => {
                *lock(&self.rejection) = None;
                if *self.current.load_full() == resources {
                    tracing::debug!("config directory touched but unchanged");
                    return;
                }
                let n = documents(&resources);
                self.current.store(Arc::new(resources));
                self.generation.send_modify(|g| *g += 1);
                tracing::info!(path = %self.path.display(), documents = n, "config reloaded");
            }
            Err(errors) => {
                // Status first: whoever sees the counter move must find the
                // rejection it counts.
                *lock(&self.rejection) = Some(ConfigRejection {
                    at_unix_ms: unix_ms(SystemTime::now()),
                    errors: errors.iter().map(|e| e.to_string()).collect(),
                });
                self.metrics.config_rejections.inc();
                for e in &errors {
                    tracing::warn!(path = %self.path.display(), "config error: {e}");
                }
                tracing::warn!(
                    path = %self.path.display(),
                    errors = errors.len(),
                    "config rejected; still serving the last good config"
                );
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data is replaced whole under the lock, so it is consistent even
    // if a holder panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn documents(r: &Resources) -> usize {
    crate::document_counts(r).iter().map(|(_, n)| n).sum()
}

/// Compiles `path`, with every source file named relative to it.
fn compile(path: &Path) -> Result<Resources, ConfigErrors> {
    let mut resources = crate::load_and_compile(path)?;
    relativize_sources(&mut resources, path);
    Ok(resources)
}

/// Names source files relative to the config directory (or by file name,
/// for a single file). Sources are part of each resource's encoding, hence
/// of its version: this way replicas that mount the same config at
/// different paths still serve identical versions.
pub fn relativize_sources(resources: &mut Resources, base: &Path) {
    let base = if base.is_dir() {
        base
    } else {
        base.parent().unwrap_or(base)
    };
    let fix = |s: &mut Option<Source>| {
        if let Some(s) = s
            && let Ok(rel) = Path::new(&s.file).strip_prefix(base)
        {
            s.file = rel.display().to_string();
        }
    };
    if let Some(m) = resources.mesh.as_mut() {
        fix(&mut m.source);
    }
    resources
        .services
        .iter_mut()
        .for_each(|r| fix(&mut r.source));
    resources
        .endpoints
        .iter_mut()
        .for_each(|r| fix(&mut r.source));
    resources
        .service_entries
        .iter_mut()
        .for_each(|r| fix(&mut r.source));
    resources.routes.iter_mut().for_each(|r| fix(&mut r.source));
    resources
        .traffic_policies
        .iter_mut()
        .for_each(|r| fix(&mut r.source));
    resources
        .authorization_policies
        .iter_mut()
        .for_each(|r| fix(&mut r.source));
    resources
        .gateways
        .iter_mut()
        .for_each(|r| fix(&mut r.source));
    resources
        .request_authentications
        .iter_mut()
        .for_each(|r| fix(&mut r.source));
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "apiVersion: bulwark.dev/v1\nkind: Service\nmetadata: {name: api}\nspec:\n  ports: [{port: 8080}]\n";

    #[test]
    fn stamp_changes_when_a_file_is_replaced_and_ignores_hidden_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), SERVICE).unwrap();
        let before = DirStamp::read(dir.path());
        std::fs::write(dir.path().join(".a.yaml.swp"), "x").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        assert_eq!(DirStamp::read(dir.path()), before);
        // Same size, replaced by rename: the inode differs.
        std::fs::write(dir.path().join("b.tmp"), SERVICE).unwrap();
        std::fs::rename(dir.path().join("b.tmp"), dir.path().join("a.yaml")).unwrap();
        assert_ne!(DirStamp::read(dir.path()), before);
    }

    #[test]
    fn sources_are_relative_to_the_config_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), SERVICE).unwrap();
        let r = compile(dir.path()).unwrap();
        assert_eq!(r.services[0].source.as_ref().unwrap().file, "a.yaml");
        let single = compile(&dir.path().join("a.yaml")).unwrap();
        assert_eq!(single.services[0].source.as_ref().unwrap().file, "a.yaml");
    }

    #[tokio::test]
    async fn invalid_reload_keeps_the_last_good_config_and_records_the_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), SERVICE).unwrap();
        let metrics = Arc::new(XdsMetrics::default());
        let w = ConfigWatcher::load(dir.path(), metrics.clone()).unwrap();
        let before = w.current();
        let mut changes = w.subscribe();
        std::fs::write(dir.path().join("a.yaml"), "kind: [\n").unwrap();
        w.reload().await;
        assert!(Arc::ptr_eq(&before, &w.current()));
        assert!(!changes.has_changed().unwrap());
        assert_eq!(metrics.config_rejections.get(), 1);
        let rejection = w.rejection().unwrap();
        assert!(
            rejection.errors.iter().all(|e| e.contains("a.yaml:")),
            "{rejection:?}"
        );
        std::fs::write(dir.path().join("a.yaml"), SERVICE.replace("8080", "9090")).unwrap();
        w.reload().await;
        assert!(w.rejection().is_none());
        assert!(changes.has_changed().unwrap());
        assert_eq!(w.current().services[0].ports[0].port, 9090);
        changes.mark_unchanged();
    }
}
