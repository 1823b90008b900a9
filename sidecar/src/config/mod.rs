//! The live configuration: an immutable snapshot built from
//! `bulwark.config.v1` resources, swapped whole with `arc-swap`.

mod snapshot;
pub mod xds_client;

pub use snapshot::{
    ConfigError, Decision, IdentityPattern, Proto, Snapshot, Target, Upstream, service_key,
    target_port,
};

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use bulwark_ca::SpiffeId;
use bulwark_proto::config::Resources;

/// Holds the applied snapshot. Readers `load()` it once per connection or
/// request; writers replace it whole.
#[derive(Default)]
pub struct LiveConfig {
    current: ArcSwapOption<Snapshot>,
    /// Bumped on every applied snapshot, for tasks that react to changes.
    applied: tokio::sync::watch::Sender<u64>,
}

impl LiveConfig {
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// Validates and applies `resources` as version `version`. On error the
    /// previous snapshot stays in place.
    pub fn apply(
        &self,
        me: &SpiffeId,
        version: &str,
        resources: Resources,
        stale: bool,
    ) -> Result<Arc<Snapshot>, ConfigError> {
        let mut snap = Snapshot::build(me, version, resources)?;
        snap.stale = stale;
        let snap = Arc::new(snap);
        self.current.store(Some(snap.clone()));
        self.applied.send_modify(|n| *n += 1);
        tracing::info!(version, stale, "config applied");
        Ok(snap)
    }

    /// Changes whenever a snapshot is applied.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Validates `resources` without applying them.
    pub fn check(&self, me: &SpiffeId, resources: &Resources) -> Result<(), ConfigError> {
        Snapshot::build(me, "check", resources.clone()).map(|_| ())
    }
}
