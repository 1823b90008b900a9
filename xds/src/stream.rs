//! One discovery stream's delta-xDS state as plain data: per type URL what
//! the sidecar subscribed to, what it holds (name → version, as ACKed), the
//! responses awaiting its ACK, and what it last NACKed. Requests and
//! snapshots go in; responses to send and events to count come out. No I/O
//! here, so the protocol rules are tested without sockets.
//!
//! Flow control: while a response of a type awaits its ACK, nothing more of
//! that type is sent. Snapshots arriving meanwhile are not queued: after the
//! ACK the sidecar gets one response taking it from what it holds to the
//! latest snapshot. A slow sidecar therefore costs at most one outstanding
//! response per type (a few if one had to be split to fit the message
//! limit), never a backlog.
//!
//! Endpoint hold: each replica's registry knows only the sidecars connected
//! to it, so a replica that sidecars fail over to learns their endpoints as
//! they arrive. A reconnecting sidecar that brings ServiceEndpoints versions
//! this replica does not (yet) have gets its first ServiceEndpoints
//! response only once the registry has caught up (the versions match: the
//! response is empty), or at the latest after the hold (the endpoint grace
//! period) with whatever differs then. Meanwhile it keeps the endpoints it
//! has, instead of being sent a half-empty registry and withdrawing them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bulwark_proto::config::type_url;
use bulwark_proto::xds::v1::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};

use crate::snapshot::{Snapshot, TypeResources, type_index};
use crate::status::{NackStatus, TypeState as State, TypeStatus, unix_ms};

/// Most resource names per type in one request, and subscribed per type.
pub(crate) const MAX_NAMES: usize = 65_536;
/// Longest resource name (`namespace/name`: 63 + 1 + 253 in Kubernetes)
/// and version a request may carry: a stream keeps the names it
/// subscribed to, so their length is bounded along with their number.
pub(crate) const MAX_NAME_LEN: usize = 512;
pub(crate) const MAX_VERSION_LEN: usize = 256;
/// Responses are split so that each stays below this many bytes (a
/// resource larger than that goes alone, within the 4 MiB message limit).
/// Small on purpose: gRPC's encoder keeps a buffer as large as the largest
/// message it sent for as long as the stream lives (and the sidecar's
/// decoder likewise), so one full-mesh sync in a single message would cost
/// every stream that much memory for good. 1,000 streams after syncing
/// 1,000 endpoints held 187 kB each with a 3.5 MiB budget, and 120 kB with
/// 16 KiB, of which 35 kB was the encode buffer grown to 32 KiB. Within 3 KiB
/// a response and its envelope fit the codec's 4 KiB buffer
/// (`bulwark_proto::codec::BUFFER_SIZE`), which then never grows.
pub(crate) const RESPONSE_BUDGET: usize = 3 * 1024;
/// Longest NACK message kept for status.
pub(crate) const MAX_NACK_MESSAGE: usize = 2048;

/// A request that breaks the protocol; ends the stream with `InvalidArgument`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unknown type URL {0:?}; this control plane serves {known}", known = type_url::ALL.join(", "))]
    UnknownType(String),
    #[error("request names no type_url (only the first request, carrying the node, may omit it)")]
    MissingType,
    #[error("too many resource names for {0} (at most {MAX_NAMES})")]
    TooManyNames(String),
    #[error(
        "a resource name or version for {0} is too long (names at most {MAX_NAME_LEN} bytes, versions {MAX_VERSION_LEN})"
    )]
    NameTooLong(String),
}

/// Something the server counts or logs, produced by a request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    Ack {
        type_url: &'static str,
        /// From the creation of the snapshot the response was built from.
        latency: Duration,
    },
    Nack(NackStatus),
    /// A nonce that is not (or no longer) outstanding: ignored.
    StaleNonce {
        type_url: &'static str,
        nonce: String,
    },
}

/// Responses to send, in order, and events.
#[derive(Debug, Default)]
pub(crate) struct Output {
    pub responses: Vec<DeltaDiscoveryResponse>,
    pub events: Vec<Event>,
}

/// What one response (or a would-be response) changes in what the sidecar
/// holds. Names and versions are the snapshot's own (shared) strings.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Changes {
    updated: BTreeMap<Arc<str>, Arc<str>>,
    removed: BTreeSet<Arc<str>>,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.updated.is_empty() && self.removed.is_empty()
    }

    fn merge(&mut self, other: Changes) {
        for (n, v) in other.updated {
            self.removed.remove(&n);
            self.updated.insert(n, v);
        }
        for n in other.removed {
            self.updated.remove(&n);
            self.removed.insert(n);
        }
    }
}

/// What a sidecar holds of one type, by name: a version each.
#[derive(Debug)]
enum Held {
    /// Exactly a snapshot's resources of the type: the usual state of a
    /// synced wildcard subscription, kept as a reference to the snapshot's
    /// map rather than a map of its own for every stream.
    Same(Arc<TypeResources>),
    /// Anything else. Names and versions are the snapshot's own strings
    /// where they match it.
    Own(BTreeMap<Arc<str>, Arc<str>>),
}

impl Default for Held {
    fn default() -> Self {
        Held::Own(BTreeMap::new())
    }
}

impl Held {
    fn get(&self, name: &str) -> Option<&Arc<str>> {
        match self {
            Held::Same(m) => m.get(name).map(|r| &r.version),
            Held::Own(m) => m.get(name),
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = (&Arc<str>, &Arc<str>)> + '_> {
        match self {
            Held::Same(m) => Box::new(m.iter().map(|(n, r)| (n, &r.version))),
            Held::Own(m) => Box::new(m.iter()),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        match self {
            Held::Same(m) => m.len(),
            Held::Own(m) => m.len(),
        }
    }

    /// The map to change, made one's own first if it was a snapshot's.
    fn own(&mut self) -> &mut BTreeMap<Arc<str>, Arc<str>> {
        if let Held::Same(m) = self {
            *self = Held::Own(
                m.iter()
                    .map(|(n, r)| (n.clone(), r.version.clone()))
                    .collect(),
            );
        }
        match self {
            Held::Own(m) => m,
            Held::Same(_) => unreachable!("made its own above"),
        }
    }

    /// Becomes a reference to `resources` if it holds exactly those.
    fn settle(&mut self, resources: &Arc<TypeResources>) {
        if let Held::Own(m) = self
            && m.len() == resources.len()
            && m.iter()
                .zip(resources.iter())
                .all(|((n, v), (rn, r))| n == rn && *v == r.version)
        {
            *self = Held::Same(resources.clone());
        }
    }
}

#[derive(Debug)]
struct InFlight {
    nonce: String,
    changes: Changes,
    system_version: String,
    snapshot_created: Instant,
}

#[derive(Debug, Default)]
struct TypeSub {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the sidecar holds: its initial versions, then what it ACKed.
    held: Held,
    in_flight: VecDeque<InFlight>,
    /// The changes the sidecar last refused. Exactly these are not offered
    /// again: the sidecar kept its previous config, and resending the same
    /// versions would only be refused again. Anything else (a later
    /// snapshot that fixes or changes something) is sent.
    nacked: Option<Changes>,
    acked: Option<(String, SystemTime)>,
    /// The first response is held back until then (see the module docs).
    hold_until: Option<Instant>,
}

impl TypeSub {
    fn subscribed(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// What takes the sidecar from what it holds to `resources`. Names in
    /// `withheld` (too large to serve) are never removed: the sidecar keeps
    /// what it has of them.
    fn diff(&self, resources: &TypeResources, withheld: &BTreeSet<Arc<str>>) -> Changes {
        if let Held::Same(m) = &self.held
            && std::ptr::eq(&**m, resources)
        {
            return Changes::default();
        }
        Changes {
            updated: resources
                .iter()
                .filter(|(n, r)| self.subscribed(n) && self.held.get(n) != Some(&r.version))
                .map(|(n, r)| (n.clone(), r.version.clone()))
                .collect(),
            removed: self
                .held
                .iter()
                .map(|(n, _)| n)
                .filter(|n| {
                    self.subscribed(n) && !resources.contains_key(&***n) && !withheld.contains(*n)
                })
                .cloned()
                .collect(),
        }
    }

    /// Records what the sidecar ACKed; `now` is the latest snapshot's
    /// resources of the type, which it may now hold exactly.
    fn apply(&mut self, c: &Changes, now: &Arc<TypeResources>) {
        let held = self.held.own();
        for (n, v) in &c.updated {
            held.insert(n.clone(), v.clone());
        }
        for n in &c.removed {
            held.remove(n);
        }
        if self.wildcard {
            self.held.settle(now);
        }
    }

    fn state(&self, snap: &Snapshot, type_url: &str) -> State {
        if !self.in_flight.is_empty() || self.hold_until.is_some() {
            return State::Pending;
        }
        let resources = snap.resources(type_url).expect("type of ALL");
        let diff = self.diff(resources, snap.withheld(type_url));
        if diff.is_empty() {
            // Including after a NACK, once the config is back to what the
            // sidecar kept.
            State::Applied
        } else if self.nacked.as_ref() == Some(&diff) {
            State::Nacked
        } else {
            State::Pending
        }
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct StreamState {
    /// By index in [`type_url::ALL`], so iteration is in push order.
    types: BTreeMap<usize, TypeSub>,
    nonces: u64,
    last_nack: Option<NackStatus>,
    /// Longest endpoint hold; zero disables it.
    endpoint_hold: Duration,
}

impl StreamState {
    pub fn new(endpoint_hold: Duration) -> Self {
        Self {
            endpoint_hold,
            ..Default::default()
        }
    }

    /// Handles one request: an ACK or NACK of an outstanding response
    /// and/or a subscription change. Responds with whatever the sidecar now
    /// lacks, and always on its first request for a type (possibly empty:
    /// "you are in sync").
    pub fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        snap: &Snapshot,
    ) -> Result<Output, ProtocolError> {
        let mut out = Output::default();
        if req.type_url.is_empty() {
            let empty = req.resource_names_subscribe.is_empty()
                && req.resource_names_unsubscribe.is_empty()
                && req.initial_resource_versions.is_empty()
                && req.response_nonce.is_empty();
            return if empty {
                Ok(out)
            } else {
                Err(ProtocolError::MissingType)
            };
        }
        let idx = type_index(&req.type_url)
            .ok_or_else(|| ProtocolError::UnknownType(req.type_url.clone()))?;
        let type_url = type_url::ALL[idx];
        let too_many = || ProtocolError::TooManyNames(type_url.to_string());
        if req.resource_names_subscribe.len()
            + req.resource_names_unsubscribe.len()
            + req.initial_resource_versions.len()
            > MAX_NAMES
        {
            return Err(too_many());
        }
        let long = |n: &String| n.len() > MAX_NAME_LEN;
        if req.resource_names_subscribe.iter().any(long)
            || req.resource_names_unsubscribe.iter().any(long)
            || req
                .initial_resource_versions
                .iter()
                .any(|(n, v)| long(n) || v.len() > MAX_VERSION_LEN)
        {
            return Err(ProtocolError::NameTooLong(type_url.to_string()));
        }
        let Self {
            types,
            nonces,
            last_nack,
            endpoint_hold,
        } = self;
        let is_new = !types.contains_key(&idx);
        let sub = types.entry(idx).or_default();

        if !req.response_nonce.is_empty() {
            match sub
                .in_flight
                .iter()
                .position(|f| f.nonce == req.response_nonce)
                .and_then(|i| sub.in_flight.remove(i))
            {
                Some(f) => match &req.error_detail {
                    None => {
                        sub.apply(
                            &f.changes,
                            snap.shared_resources(type_url).expect("type of ALL"),
                        );
                        sub.acked = Some((f.system_version, SystemTime::now()));
                        out.events.push(Event::Ack {
                            type_url,
                            latency: f.snapshot_created.elapsed(),
                        });
                    }
                    Some(e) => {
                        sub.nacked.get_or_insert_default().merge(f.changes);
                        let nack = NackStatus {
                            type_url: type_url.to_string(),
                            system_version: f.system_version,
                            message: clean(&e.message),
                            code: e.code,
                            at_unix_ms: unix_ms(SystemTime::now()),
                        };
                        *last_nack = Some(nack.clone());
                        out.events.push(Event::Nack(nack));
                    }
                },
                None => out.events.push(Event::StaleNonce {
                    type_url,
                    nonce: req.response_nonce.clone(),
                }),
            }
            if sub.in_flight.is_empty() {
                // A sync split into many responses grew the queue; it is
                // kept for the stream's life otherwise (about 10 kB a
                // stream after a full sync).
                sub.in_flight = VecDeque::new();
            }
        }

        if is_new {
            // Honoured on the first request of a type only, as in xDS.
            let resources = snap.resources(type_url).expect("type of ALL");
            sub.held = Held::Own(
                req.initial_resource_versions
                    .iter()
                    .map(|(n, v)| match resources.get_key_value(n.as_str()) {
                        Some((name, r)) if *r.version == **v => (name.clone(), r.version.clone()),
                        Some((name, _)) => (name.clone(), v.as_str().into()),
                        None => (n.as_str().into(), v.as_str().into()),
                    })
                    .collect(),
            );
            // xDS's legacy wildcard: a first request naming nothing.
            sub.wildcard = req.resource_names_subscribe.is_empty()
                && req.resource_names_unsubscribe.is_empty();
        }
        for n in &req.resource_names_subscribe {
            if n == "*" {
                sub.wildcard = true;
            } else {
                sub.names.insert(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(n);
            }
        }
        if sub.names.len() > MAX_NAMES {
            return Err(too_many());
        }
        if !req.resource_names_unsubscribe.is_empty() {
            // The sidecar drops what it unsubscribed from.
            let (wildcard, names) = (sub.wildcard, &sub.names);
            sub.held
                .own()
                .retain(|n, _| wildcard || names.contains(&**n));
        }

        if sub.in_flight.is_empty() && sub.hold_until.is_none() {
            let resources = snap.resources(type_url).expect("type of ALL");
            let changes = sub.diff(resources, snap.withheld(type_url));
            let hold = is_new
                && type_url == type_url::SERVICE_ENDPOINTS
                && !req.initial_resource_versions.is_empty()
                && !changes.is_empty()
                && !endpoint_hold.is_zero();
            if hold {
                sub.hold_until = Some(Instant::now() + *endpoint_hold);
            } else if is_new || (!changes.is_empty() && sub.nacked.as_ref() != Some(&changes)) {
                out.responses = send(sub, nonces, type_url, changes, snap);
            }
        }
        Ok(out)
    }

    /// Pushes a new snapshot (or, at a hold's deadline, the current one):
    /// for each subscribed type, in [`type_url::ALL`] order, what changed
    /// relative to what the sidecar holds, unless a response of that type is
    /// still awaiting its ACK.
    pub fn on_snapshot(&mut self, snap: &Snapshot, now: Instant) -> Vec<DeltaDiscoveryResponse> {
        let mut responses = Vec::new();
        for (&idx, sub) in self.types.iter_mut() {
            if !sub.in_flight.is_empty() {
                continue;
            }
            let type_url = type_url::ALL[idx];
            let changes = sub.diff(
                snap.resources(type_url).expect("type of ALL"),
                snap.withheld(type_url),
            );
            if let Some(until) = sub.hold_until {
                // The held first response goes out once there is nothing
                // left to change, or at the deadline with what differs.
                if changes.is_empty() || now >= until {
                    sub.hold_until = None;
                    responses.extend(send(sub, &mut self.nonces, type_url, changes, snap));
                }
                continue;
            }
            if changes.is_empty() {
                sub.nacked = None;
                if sub.wildcard {
                    let now = snap.shared_resources(type_url).expect("type of ALL");
                    if snap.withheld(type_url).is_empty() {
                        // Holds exactly this snapshot's resources: refer to
                        // them, and let the older snapshot's go.
                        sub.held = Held::Same(now.clone());
                    } else {
                        // It may also hold a withheld resource the snapshot
                        // lacks: that must not be forgotten, or its removal
                        // would never be sent.
                        sub.held.own();
                        sub.held.settle(now);
                    }
                }
                continue;
            }
            if sub.nacked.as_ref() == Some(&changes) {
                continue;
            }
            responses.extend(send(sub, &mut self.nonces, type_url, changes, snap));
        }
        responses
    }

    /// When the earliest endpoint hold ends, if one is on.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.types.values().filter_map(|s| s.hold_until).min()
    }

    /// Whether the sidecar holds exactly what `snap` has for every type it
    /// subscribed to (and subscribed to at least one).
    pub fn in_sync(&self, snap: &Snapshot) -> bool {
        !self.types.is_empty()
            && self
                .types
                .iter()
                .all(|(&idx, sub)| sub.state(snap, type_url::ALL[idx]) == State::Applied)
    }

    /// Per subscribed type, for status.
    pub fn type_statuses(&self, snap: &Snapshot) -> Vec<TypeStatus> {
        self.types
            .iter()
            .map(|(&idx, sub)| {
                let type_url = type_url::ALL[idx];
                let mut subscribed: Vec<String> = sub.names.iter().cloned().collect();
                if sub.wildcard {
                    subscribed.insert(0, "*".into());
                }
                TypeStatus {
                    type_url: type_url.to_string(),
                    state: sub.state(snap, type_url),
                    subscribed,
                    acked_system_version: sub.acked.as_ref().map(|(v, _)| v.clone()),
                    acked_at_unix_ms: sub.acked.as_ref().map(|(_, t)| unix_ms(*t)),
                    resources: sub
                        .held
                        .iter()
                        .map(|(n, v)| (n.to_string(), v.to_string()))
                        .collect(),
                }
            })
            .collect()
    }

    pub fn last_nack(&self) -> Option<&NackStatus> {
        self.last_nack.as_ref()
    }
}

/// Builds the response(s) carrying `changes` and records them as in flight.
/// One response unless the changes exceed [`RESPONSE_BUDGET`]; an empty one
/// when there are no changes (the first response of a type).
fn send(
    sub: &mut TypeSub,
    nonces: &mut u64,
    type_url: &'static str,
    changes: Changes,
    snap: &Snapshot,
) -> Vec<DeltaDiscoveryResponse> {
    let resources = snap.resources(type_url).expect("type of ALL");
    // Sending something other than what was refused: the refusal no longer
    // describes the sidecar's situation.
    sub.nacked = None;
    // Resources, removed names, and the changes they make.
    type Chunk = (Vec<Resource>, Vec<String>, Changes);
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut current: Chunk = Default::default();
    let mut size = 0usize;
    let mut room = |size: &mut usize, extra: usize, current: &mut Chunk| {
        if !current.2.is_empty() && *size + extra > RESPONSE_BUDGET {
            chunks.push(std::mem::take(current));
            *size = 0;
        }
        *size += extra;
    };
    for n in changes.removed {
        room(&mut size, n.len() + 8, &mut current);
        current.1.push(n.to_string());
        current.2.removed.insert(n);
    }
    for (n, v) in changes.updated {
        let r = &resources[&n];
        room(
            &mut size,
            r.encoded.len() + n.len() + v.len() + 16,
            &mut current,
        );
        current.0.push(Resource {
            name: n.to_string(),
            version: v.to_string(),
            resource: r.encoded.clone(),
        });
        current.2.updated.insert(n, v);
    }
    chunks.push(current);
    chunks
        .into_iter()
        .map(|(resources, removed, changes)| {
            *nonces += 1;
            let nonce = nonces.to_string();
            sub.in_flight.push_back(InFlight {
                nonce: nonce.clone(),
                changes,
                system_version: snap.system_version().to_string(),
                snapshot_created: snap.created(),
            });
            DeltaDiscoveryResponse {
                system_version_info: snap.system_version().to_string(),
                type_url: type_url.to_string(),
                resources,
                removed_resources: removed,
                nonce,
            }
        })
        .collect()
}

/// A sidecar's NACK message, bounded and without control characters (it
/// ends up in logs and on operators' terminals).
fn clean(message: &str) -> String {
    let mut s: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_NACK_MESSAGE)
        .collect();
    if message.chars().count() > MAX_NACK_MESSAGE {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bulwark_proto::config::Resources;
    use bulwark_proto::config::v1 as pb;
    use bulwark_proto::xds::v1::ErrorDetail;

    use super::*;
    use crate::snapshot::RegistryEndpoints;

    fn service(name: &str, port: u32) -> pb::Service {
        pb::Service {
            name: name.into(),
            namespace: "shop".into(),
            ports: vec![pb::ServicePort {
                port,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn snap(services: &[(&str, u32)]) -> Snapshot {
        let config = Resources {
            services: services.iter().map(|(n, p)| service(n, *p)).collect(),
            ..Default::default()
        };
        Snapshot::build(&config, &RegistryEndpoints::new(), &[])
    }

    fn subscribe(t: &str, initial: &[(&str, &str)]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: t.into(),
            resource_names_subscribe: vec!["*".into()],
            initial_resource_versions: initial
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
            ..Default::default()
        }
    }

    fn ack(r: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        }
    }

    fn nack(r: &DeltaDiscoveryResponse, message: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            error_detail: Some(ErrorDetail {
                code: 3,
                message: message.into(),
            }),
            ..ack(r)
        }
    }

    fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
        r.resources.iter().map(|r| r.name.as_str()).collect()
    }

    fn version(s: &Snapshot, name: &str) -> String {
        s.resources(type_url::SERVICE).unwrap()[name]
            .version
            .to_string()
    }

    #[test]
    fn first_subscribe_sends_everything_then_only_changes() {
        let s1 = snap(&[("a", 1), ("b", 2)]);
        let mut st = StreamState::default();
        let out = st
            .on_request(&subscribe(type_url::SERVICE, &[]), &s1)
            .unwrap();
        assert_eq!(out.responses.len(), 1);
        assert_eq!(names(&out.responses[0]), ["shop/a", "shop/b"]);
        assert_eq!(out.responses[0].system_version_info, s1.system_version());
        st.on_request(&ack(&out.responses[0]), &s1).unwrap();
        assert!(st.in_sync(&s1));

        let s2 = snap(&[("a", 1), ("c", 3)]);
        let pushed = st.on_snapshot(&s2, Instant::now());
        assert_eq!(pushed.len(), 1);
        assert_eq!(names(&pushed[0]), ["shop/c"]);
        assert_eq!(pushed[0].removed_resources, ["shop/b"]);
        assert!(!st.in_sync(&s2));
        st.on_request(&ack(&pushed[0]), &s2).unwrap();
        assert!(st.in_sync(&s2));
    }

    #[test]
    fn first_subscribe_with_current_versions_gets_an_empty_response() {
        let s = snap(&[("a", 1)]);
        let mut st = StreamState::default();
        let v = version(&s, "shop/a");
        let out = st
            .on_request(&subscribe(type_url::SERVICE, &[("shop/a", &v)]), &s)
            .unwrap();
        assert_eq!(out.responses.len(), 1);
        assert!(out.responses[0].resources.is_empty());
        assert!(out.responses[0].removed_resources.is_empty());
    }

    #[test]
    fn initial_versions_of_deleted_resources_are_removed() {
        let s = snap(&[("a", 1)]);
        let mut st = StreamState::default();
        let out = st
            .on_request(&subscribe(type_url::SERVICE, &[("shop/gone", "0123")]), &s)
            .unwrap();
        assert_eq!(out.responses[0].removed_resources, ["shop/gone"]);
        assert_eq!(names(&out.responses[0]), ["shop/a"]);
    }

    #[test]
    fn nothing_more_is_sent_for_a_type_until_its_response_is_acked() {
        let mut st = StreamState::default();
        let s1 = snap(&[("a", 1)]);
        let first = st
            .on_request(&subscribe(type_url::SERVICE, &[]), &s1)
            .unwrap();
        let s2 = snap(&[("a", 2)]);
        let s3 = snap(&[("a", 3)]);
        assert!(st.on_snapshot(&s2, Instant::now()).is_empty());
        assert!(st.on_snapshot(&s3, Instant::now()).is_empty());
        // The ACK brings the sidecar straight to the latest snapshot.
        let out = st.on_request(&ack(&first.responses[0]), &s3).unwrap();
        assert_eq!(out.responses.len(), 1);
        assert_eq!(
            out.responses[0].resources[0].version,
            version(&s3, "shop/a")
        );
        assert!(matches!(out.events[0], Event::Ack { .. }));
    }

    #[test]
    fn nacked_versions_are_not_resent_but_a_later_fix_is() {
        let mut st = StreamState::default();
        let s1 = snap(&[("a", 1)]);
        let first = st
            .on_request(&subscribe(type_url::SERVICE, &[]), &s1)
            .unwrap();
        st.on_request(&ack(&first.responses[0]), &s1).unwrap();
        let bad = snap(&[("a", 1), ("b", 99)]);
        let pushed = st.on_snapshot(&bad, Instant::now());
        let out = st
            .on_request(&nack(&pushed[0], "port 99\x1b[31m"), &bad)
            .unwrap();
        assert!(out.responses.is_empty());
        let Event::Nack(n) = &out.events[0] else {
            panic!("{:?}", out.events)
        };
        assert_eq!(
            (n.type_url.as_str(), n.message.as_str()),
            (type_url::SERVICE, "port 99 [31m")
        );
        assert_eq!(n.system_version, bad.system_version());
        // The same versions again (e.g. a registry change elsewhere): nothing.
        assert!(st.on_snapshot(&bad, Instant::now()).is_empty());
        assert!(!st.in_sync(&bad));
        assert_eq!(st.type_statuses(&bad)[0].state, State::Nacked);
        // The sidecar still holds only a: the fix is sent from there.
        let fixed = snap(&[("a", 1), ("b", 2)]);
        let pushed = st.on_snapshot(&fixed, Instant::now());
        assert_eq!(names(&pushed[0]), ["shop/b"]);
        st.on_request(&ack(&pushed[0]), &fixed).unwrap();
        assert!(st.in_sync(&fixed));
        assert!(st.last_nack().is_some());
    }

    #[test]
    fn stale_nonces_are_ignored() {
        let mut st = StreamState::default();
        let s = snap(&[("a", 1)]);
        let first = st
            .on_request(&subscribe(type_url::SERVICE, &[]), &s)
            .unwrap();
        st.on_request(&ack(&first.responses[0]), &s).unwrap();
        let again = st.on_request(&ack(&first.responses[0]), &s).unwrap();
        assert!(matches!(again.events[0], Event::StaleNonce { .. }));
        assert!(again.responses.is_empty());
    }

    #[test]
    fn named_subscriptions_get_only_their_names_and_unsubscribe_drops_them() {
        let mut st = StreamState::default();
        let s = snap(&[("a", 1), ("b", 2)]);
        let req = DeltaDiscoveryRequest {
            type_url: type_url::SERVICE.into(),
            resource_names_subscribe: vec!["shop/b".into()],
            ..Default::default()
        };
        let out = st.on_request(&req, &s).unwrap();
        assert_eq!(names(&out.responses[0]), ["shop/b"]);
        st.on_request(&ack(&out.responses[0]), &s).unwrap();
        // A change to a is none of this sidecar's business.
        assert!(
            st.on_snapshot(&snap(&[("a", 5), ("b", 2)]), Instant::now())
                .is_empty()
        );
        let unsub = DeltaDiscoveryRequest {
            type_url: type_url::SERVICE.into(),
            resource_names_unsubscribe: vec!["shop/b".into()],
            ..Default::default()
        };
        assert!(st.on_request(&unsub, &s).unwrap().responses.is_empty());
        assert!(st.type_statuses(&s)[0].resources.is_empty());
    }

    #[test]
    fn unknown_types_and_untyped_requests_are_protocol_errors() {
        let mut st = StreamState::default();
        let s = snap(&[]);
        let err = st.on_request(&subscribe("type.googleapis.com/x.Y", &[]), &s);
        assert!(matches!(err, Err(ProtocolError::UnknownType(_))));
        let node_only = DeltaDiscoveryRequest::default();
        assert!(st.on_request(&node_only, &s).unwrap().responses.is_empty());
        let untyped = subscribe("", &[]);
        assert_eq!(
            st.on_request(&untyped, &s).unwrap_err(),
            ProtocolError::MissingType
        );
    }

    #[test]
    fn overlong_names_and_versions_are_protocol_errors() {
        let s = snap(&[]);
        let long = "a/".to_string() + &"x".repeat(MAX_NAME_LEN);
        let longest = "a/".to_string() + &"x".repeat(MAX_NAME_LEN - 2);
        let on = |req: DeltaDiscoveryRequest| StreamState::default().on_request(&req, &s);
        let names = |sub: &str, unsub: &str| DeltaDiscoveryRequest {
            type_url: type_url::SERVICE.into(),
            resource_names_subscribe: vec![sub.to_string()],
            resource_names_unsubscribe: vec![unsub.to_string()],
            ..Default::default()
        };
        assert!(on(names(&longest, "b/c")).is_ok());
        for req in [
            names(&long, "b/c"),
            names("b/c", &long),
            subscribe(type_url::SERVICE, &[(&long, "v")]),
            subscribe(
                type_url::SERVICE,
                &[("a/b", &"v".repeat(MAX_VERSION_LEN + 1))],
            ),
        ] {
            assert!(matches!(on(req), Err(ProtocolError::NameTooLong(_))));
        }
    }

    #[test]
    fn pushes_follow_the_type_order() {
        let mut st = StreamState::default();
        let s1 = snap(&[("a", 1)]);
        for t in [
            type_url::ROUTE,
            type_url::SERVICE_ENDPOINTS,
            type_url::SERVICE,
        ] {
            let out = st.on_request(&subscribe(t, &[]), &s1).unwrap();
            st.on_request(&ack(&out.responses[0]), &s1).unwrap();
        }
        // A new service: a Service and its (empty) ServiceEndpoints.
        let pushed = st.on_snapshot(&snap(&[("a", 1), ("b", 2)]), Instant::now());
        let types: Vec<&str> = pushed.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(types, [type_url::SERVICE, type_url::SERVICE_ENDPOINTS]);
    }

    #[test]
    fn config_back_to_what_the_sidecar_kept_after_a_nack_counts_as_applied() {
        let mut st = StreamState::default();
        let good = snap(&[("a", 1)]);
        let first = st
            .on_request(&subscribe(type_url::SERVICE, &[]), &good)
            .unwrap();
        st.on_request(&ack(&first.responses[0]), &good).unwrap();
        let bad = snap(&[("a", 99)]);
        let pushed = st.on_snapshot(&bad, Instant::now());
        st.on_request(&nack(&pushed[0], "no"), &bad).unwrap();
        assert_eq!(st.type_statuses(&bad)[0].state, State::Nacked);

        // Back to the same content, built anew as the control plane would:
        // compared by content, not by the snapshot it came from.
        let good_again = snap(&[("a", 1)]);
        assert!(st.on_snapshot(&good_again, Instant::now()).is_empty());
        let sub = &st.types[&type_index(type_url::SERVICE).unwrap()];
        assert!(sub.nacked.is_none());
        let shared = good_again.shared_resources(type_url::SERVICE).unwrap();
        assert!(matches!(&sub.held, Held::Same(m) if Arc::ptr_eq(m, shared)));
        assert!(st.in_sync(&good_again));
        assert_eq!(st.type_statuses(&good_again)[0].state, State::Applied);
    }

    fn endpoints_snap(addresses: &[&str]) -> Snapshot {
        let config = Resources {
            services: vec![service("api", 8080)],
            ..Default::default()
        };
        let eps = addresses
            .iter()
            .map(|a| pb::Endpoint {
                address: a.to_string(),
                ..Default::default()
            })
            .collect();
        Snapshot::build(
            &config,
            &RegistryEndpoints::from([("shop/api".to_string(), eps)]),
            &[],
        )
    }

    fn endpoint_versions(s: &Snapshot) -> Vec<(String, String)> {
        s.versions()[type_url::SERVICE_ENDPOINTS]
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    }

    #[test]
    fn reconnect_holding_endpoints_this_replica_lacks_waits_for_the_registry() {
        let full = endpoints_snap(&["10.0.0.1"]);
        let held = endpoint_versions(&full);
        let held: Vec<(&str, &str)> = held.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let mut st = StreamState::new(Duration::from_secs(10));
        // This replica has not seen the endpoint's sidecar yet.
        let cold = endpoints_snap(&[]);
        let out = st
            .on_request(&subscribe(type_url::SERVICE_ENDPOINTS, &held), &cold)
            .unwrap();
        assert!(out.responses.is_empty());
        assert!(st.next_deadline().is_some());
        assert!(st.on_snapshot(&cold, Instant::now()).is_empty());
        // The sidecar registers here too: the held response goes out, empty.
        let pushed = st.on_snapshot(&full, Instant::now());
        assert_eq!(pushed.len(), 1);
        assert!(pushed[0].resources.is_empty() && pushed[0].removed_resources.is_empty());
        assert_eq!(pushed[0].system_version_info, full.system_version());
        assert!(st.next_deadline().is_none());
    }

    #[test]
    fn a_resource_too_large_to_serve_is_never_removed_from_a_sidecar() {
        let full = endpoints_snap(&["10.0.0.1"]);
        let held = endpoint_versions(&full);
        let held: Vec<(&str, &str)> = held.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        // A control plane that never served the endpoints (just started)
        // and finds them over the size limit.
        let config = Resources {
            services: vec![service("api", 8080)],
            ..Default::default()
        };
        let big: Vec<pb::Endpoint> = (0..14_000)
            .map(|i| pb::Endpoint {
                address: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                labels: [("pad".to_string(), "x".repeat(250))].into(),
                ..Default::default()
            })
            .collect();
        let over = Snapshot::build(
            &config,
            &RegistryEndpoints::from([("shop/api".into(), big)]),
            &[],
        );
        assert_eq!(over.oversized(type_url::SERVICE_ENDPOINTS), 1);
        let mut st = StreamState::new(Duration::ZERO);
        let out = st
            .on_request(&subscribe(type_url::SERVICE_ENDPOINTS, &held), &over)
            .unwrap();
        assert!(
            out.responses.iter().all(|r| r.removed_resources.is_empty()),
            "the sidecar was told to drop the endpoints it has"
        );
        // ACKed, then the same snapshot again: the stream still knows the
        // sidecar holds the endpoints, so deleting the service removes them.
        st.on_request(&ack(&out.responses[0]), &over).unwrap();
        assert!(st.on_snapshot(&over, Instant::now()).is_empty());
        let deleted = Snapshot::build(&Resources::default(), &RegistryEndpoints::new(), &[]);
        let pushed = st.on_snapshot(&deleted, Instant::now());
        assert_eq!(pushed.len(), 1);
        assert_eq!(pushed[0].removed_resources, ["shop/api"]);
    }

    #[test]
    fn held_endpoints_are_sent_at_the_deadline_if_they_still_differ() {
        let full = endpoints_snap(&["10.0.0.1"]);
        let held = endpoint_versions(&full);
        let held: Vec<(&str, &str)> = held.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let mut st = StreamState::new(Duration::from_secs(10));
        let gone = endpoints_snap(&[]);
        st.on_request(&subscribe(type_url::SERVICE_ENDPOINTS, &held), &gone)
            .unwrap();
        let deadline = st.next_deadline().unwrap();
        let pushed = st.on_snapshot(&gone, deadline);
        assert_eq!(names(&pushed[0]), ["shop/api"]);
    }

    #[test]
    fn a_new_sidecar_gets_endpoints_without_waiting() {
        let mut st = StreamState::new(Duration::from_secs(10));
        let s = endpoints_snap(&[]);
        let out = st
            .on_request(&subscribe(type_url::SERVICE_ENDPOINTS, &[]), &s)
            .unwrap();
        assert_eq!(names(&out.responses[0]), ["shop/api"]);
    }

    #[test]
    fn a_large_sync_is_split_into_responses_within_the_budget_that_together_carry_everything() {
        use prost::Message;
        let wanted: Vec<String> = (0..400)
            .map(|i| format!("service-with-a-long-name-{i:04}"))
            .collect();
        let services: Vec<(&str, u32)> = wanted.iter().map(|n| (n.as_str(), 8080)).collect();
        let s = snap(&services);
        let mut st = StreamState::default();
        let out = st
            .on_request(&subscribe(type_url::SERVICE, &[]), &s)
            .unwrap();
        assert!(
            out.responses.len() > 1,
            "one response of {} bytes",
            out.responses[0].encoded_len()
        );
        let largest_resource = out
            .responses
            .iter()
            .flat_map(|r| &r.resources)
            .map(|r| r.encoded_len())
            .max()
            .unwrap();
        let mut got: Vec<&str> = Vec::new();
        for r in &out.responses {
            assert!(
                r.encoded_len() <= RESPONSE_BUDGET + largest_resource + 64,
                "{} bytes",
                r.encoded_len()
            );
            got.extend(names(r));
        }
        got.sort();
        assert_eq!(got.len(), 400);
        assert!(!st.in_sync(&s));
        for r in &out.responses {
            st.on_request(&ack(r), &s).unwrap();
        }
        assert!(st.in_sync(&s), "in sync once every part is ACKed");

        // What a synced stream keeps: no queue of the split sync, and a
        // reference to the snapshot's resources rather than a map of its own.
        let idx = type_index(type_url::SERVICE).unwrap();
        let sub = &st.types[&idx];
        assert_eq!(sub.in_flight.capacity(), 0);
        assert_eq!(sub.held.len(), 400);
        let shared = s.shared_resources(type_url::SERVICE).unwrap();
        assert!(matches!(&sub.held, Held::Same(m) if Arc::ptr_eq(m, shared)));

        // A snapshot that changes nothing of the type: the stream refers to
        // the new one's resources, so the old snapshot's can be freed.
        let same = snap(&services);
        assert!(st.on_snapshot(&same, Instant::now()).is_empty());
        let shared = same.shared_resources(type_url::SERVICE).unwrap();
        assert!(matches!(&st.types[&idx].held, Held::Same(m) if Arc::ptr_eq(m, shared)));

        // A change: until its ACK the stream holds what it held, then the
        // new snapshot's resources.
        let mut more = services.clone();
        more.push(("one-more", 8080));
        let s2 = snap(&more);
        let pushed = st.on_snapshot(&s2, Instant::now());
        assert_eq!(pushed.len(), 1);
        assert_eq!(names(&pushed[0]), ["shop/one-more"]);
        assert!(matches!(&st.types[&idx].held, Held::Same(m) if Arc::ptr_eq(m, shared)));
        assert!(!st.in_sync(&s2));
        st.on_request(&ack(&pushed[0]), &s2).unwrap();
        assert!(st.in_sync(&s2));
        let sub = &st.types[&idx];
        let shared = s2.shared_resources(type_url::SERVICE).unwrap();
        assert!(matches!(&sub.held, Held::Same(m) if Arc::ptr_eq(m, shared)));
        assert_eq!(sub.held.len(), 401);
    }

    #[test]
    fn leaving_the_wildcard_for_names_keeps_only_those() {
        let s = snap(&[("a", 1), ("b", 2)]);
        let mut st = StreamState::default();
        let out = st
            .on_request(&subscribe(type_url::SERVICE, &[]), &s)
            .unwrap();
        st.on_request(&ack(&out.responses[0]), &s).unwrap();
        let idx = type_index(type_url::SERVICE).unwrap();
        assert!(matches!(&st.types[&idx].held, Held::Same(_)));
        let narrow = DeltaDiscoveryRequest {
            type_url: type_url::SERVICE.into(),
            resource_names_subscribe: vec!["shop/a".into()],
            resource_names_unsubscribe: vec!["*".into()],
            ..Default::default()
        };
        let out = st.on_request(&narrow, &s).unwrap();
        assert!(out.responses.is_empty(), "it holds shop/a already");
        let Held::Own(held) = &st.types[&idx].held else {
            panic!("a named subscription keeps its own map");
        };
        assert_eq!(held.keys().map(|k| &**k).collect::<Vec<_>>(), ["shop/a"]);
        assert!(st.in_sync(&s));
        // Changes to what it no longer subscribes to are not sent.
        let s2 = snap(&[("a", 1), ("b", 3)]);
        assert!(st.on_snapshot(&s2, Instant::now()).is_empty());
        assert!(st.in_sync(&s2));
        assert!(
            matches!(&st.types[&idx].held, Held::Own(_)),
            "only a wildcard refers to the snapshot"
        );
    }

    #[test]
    fn initial_versions_that_match_the_snapshot_share_its_strings() {
        let s = snap(&[("a", 1), ("b", 2)]);
        let v = version(&s, "shop/a");
        let mut st = StreamState::default();
        let req = subscribe(
            type_url::SERVICE,
            &[("shop/a", &v), ("shop/b", "stale"), ("shop/gone", "x")],
        );
        st.on_request(&req, &s).unwrap();
        let sub = &st.types[&type_index(type_url::SERVICE).unwrap()];
        let Held::Own(held) = &sub.held else {
            panic!("initial versions that differ are the stream's own");
        };
        let resources = s.resources(type_url::SERVICE).unwrap();
        let (a, ra) = resources.get_key_value("shop/a").unwrap();
        let (held_a, held_va) = held.get_key_value("shop/a").unwrap();
        assert!(Arc::ptr_eq(held_a, a) && Arc::ptr_eq(held_va, &ra.version));
        let (b, _) = resources.get_key_value("shop/b").unwrap();
        let (held_b, held_vb) = held.get_key_value("shop/b").unwrap();
        assert!(Arc::ptr_eq(held_b, b));
        assert_eq!(&**held_vb, "stale");
        assert_eq!(&*held["shop/gone"], "x");
    }
}
