//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, off in
//! every build of the product). The delta-stream state machine is private
//! to the server; this exposes it as-is, so the fuzzer drives exactly the
//! code the server runs.

use std::time::{Duration, Instant};

use bulwark_proto::xds::v1::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

use crate::snapshot::Snapshot;
use crate::status::TypeStatus;
use crate::stream::{ProtocolError, StreamState};

/// One discovery stream's state, as the server holds it.
#[derive(Debug)]
pub struct Stream(StreamState);

impl Stream {
    pub fn new(endpoint_hold: Duration) -> Self {
        Self(StreamState::new(endpoint_hold))
    }

    /// A request from the sidecar; the responses to send.
    pub fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        snap: &Snapshot,
    ) -> Result<Vec<DeltaDiscoveryResponse>, ProtocolError> {
        self.0.on_request(req, snap).map(|out| out.responses)
    }

    /// A new snapshot (or a hold's deadline); the responses to send.
    pub fn on_snapshot(&mut self, snap: &Snapshot, now: Instant) -> Vec<DeltaDiscoveryResponse> {
        self.0.on_snapshot(snap, now)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.0.next_deadline()
    }

    pub fn in_sync(&self, snap: &Snapshot) -> bool {
        self.0.in_sync(snap)
    }

    pub fn type_statuses(&self, snap: &Snapshot) -> Vec<TypeStatus> {
        self.0.type_statuses(snap)
    }
}
