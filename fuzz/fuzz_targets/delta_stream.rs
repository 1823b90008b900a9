//! The control plane's delta-stream state machine, driven by a hostile
//! sidecar: any sequence of requests (ACKs, NACKs, stale or made-up nonces,
//! subscribe/unsubscribe, initial versions, unknown types) and snapshots.
//! Checked: no panic; every response carries the current snapshot's
//! versions and a fresh nonce; and afterwards a well-behaved sidecar that
//! ACKs everything gets the stream settled (every type applied, or held
//! at a NACK) in a bounded number of rounds.
#![no_main]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bulwark_proto::config::Resources;
use bulwark_proto::config::type_url;
use bulwark_proto::config::v1 as pb;
use bulwark_proto::xds::v1::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, ErrorDetail};
use bulwark_xds::fuzzing::Stream;
use bulwark_xds::snapshot::{RegistryEndpoints, Snapshot};
use bulwark_xds::status::TypeState;
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

#[derive(Arbitrary, Debug)]
enum Op {
    Request(Req),
    /// A new snapshot: per service name, absent or present on a port
    /// (with endpoints, so ServiceEndpoints changes too).
    Snapshot([Option<u8>; 4]),
    /// Time passes by this many ms, then the snapshot is pushed again.
    Tick(u16),
}

#[derive(Arbitrary, Debug)]
enum TypeSel {
    Known(u8),
    Empty,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8),
    Wildcard,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Nonce {
    None,
    /// One of the responses sent so far, counting back from the latest.
    Sent(u8),
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct Req {
    type_url: TypeSel,
    subscribe: Vec<Name>,
    unsubscribe: Vec<Name>,
    /// Names with the current version (true) or a made-up one.
    initial: Vec<(Name, bool)>,
    nonce: Nonce,
    nack: Option<String>,
}

fn name(n: &Name) -> String {
    match n {
        Name::Known(i) => format!("shop/{}", NAMES[*i as usize % NAMES.len()]),
        Name::Wildcard => "*".into(),
        Name::Other(s) => s.clone(),
    }
}

fn snapshot(ports: &[Option<u8>; 4]) -> Snapshot {
    let mut config = Resources::default();
    let mut endpoints = RegistryEndpoints::new();
    for (n, p) in NAMES.iter().zip(ports) {
        let Some(p) = p else { continue };
        config.services.push(pb::Service {
            name: n.to_string(),
            namespace: "shop".into(),
            ports: vec![pb::ServicePort {
                port: u32::from(*p) + 1,
                ..Default::default()
            }],
            ..Default::default()
        });
        endpoints.insert(
            format!("shop/{n}"),
            vec![pb::Endpoint {
                address: format!("10.0.0.{p}"),
                ..Default::default()
            }],
        );
    }
    Snapshot::build(&config, &endpoints, &["ROOT".into()])
}

fn version_of(snap: &Snapshot, type_url: &str, name: &str) -> Option<String> {
    snap.resources(type_url)?
        .get(name)
        .map(|r| r.version.to_string())
}

struct Checker {
    last_nonce: u64,
}

impl Checker {
    fn check(&mut self, snap: &Snapshot, responses: &[DeltaDiscoveryResponse]) {
        for r in responses {
            assert!(
                type_url::ALL.contains(&r.type_url.as_str()),
                "{}",
                r.type_url
            );
            let nonce: u64 = r.nonce.parse().expect("numeric nonce");
            assert!(nonce > self.last_nonce, "nonce reused");
            self.last_nonce = nonce;
            assert_eq!(r.system_version_info, snap.system_version());
            for res in &r.resources {
                assert_eq!(
                    version_of(snap, &r.type_url, &res.name).as_deref(),
                    Some(res.version.as_str()),
                    "a response carries the snapshot's version"
                );
            }
            for gone in &r.removed_resources {
                assert!(
                    !r.resources.iter().any(|res| &res.name == gone),
                    "{gone} both updated and removed"
                );
            }
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut snap = snapshot(&[Some(1), Some(2), None, None]);
    let mut stream = Stream::new(Duration::from_millis(500));
    let mut checker = Checker { last_nonce: 0 };
    let mut sent: Vec<DeltaDiscoveryResponse> = Vec::new();
    let start = Instant::now();
    let mut now = start;
    for op in ops.iter().take(64) {
        let responses = match op {
            Op::Request(r) => {
                let type_url = match &r.type_url {
                    TypeSel::Known(i) => type_url::ALL[*i as usize % type_url::ALL.len()].into(),
                    TypeSel::Empty => String::new(),
                    TypeSel::Other(s) => s.clone(),
                };
                let req = DeltaDiscoveryRequest {
                    initial_resource_versions: r
                        .initial
                        .iter()
                        .map(|(n, current)| {
                            let n = name(n);
                            let v = match version_of(&snap, &type_url, &n) {
                                Some(v) if *current => v,
                                _ => "made-up".into(),
                            };
                            (n, v)
                        })
                        .collect::<HashMap<_, _>>(),
                    resource_names_subscribe: r.subscribe.iter().map(name).collect(),
                    resource_names_unsubscribe: r.unsubscribe.iter().map(name).collect(),
                    response_nonce: match &r.nonce {
                        Nonce::None => String::new(),
                        Nonce::Sent(i) => sent
                            .iter()
                            .rev()
                            .nth(*i as usize)
                            .map(|s| s.nonce.clone())
                            .unwrap_or_default(),
                        Nonce::Other(s) => s.clone(),
                    },
                    error_detail: r.nack.as_ref().map(|m| ErrorDetail {
                        code: 3,
                        message: m.clone(),
                    }),
                    type_url,
                    ..Default::default()
                };
                match stream.on_request(&req, &snap) {
                    Ok(responses) => responses,
                    // The server ends the stream here.
                    Err(_) => return,
                }
            }
            Op::Snapshot(ports) => {
                snap = snapshot(ports);
                stream.on_snapshot(&snap, now)
            }
            Op::Tick(ms) => {
                now += Duration::from_millis(u64::from(*ms));
                stream.on_snapshot(&snap, now)
            }
        };
        checker.check(&snap, &responses);
        sent.extend(responses);
        let _ = stream.in_sync(&snap);
        let _ = stream.type_statuses(&snap);
    }

    // A well-behaved sidecar from here on: ACK everything, let holds expire.
    let later = now + Duration::from_secs(3600);
    let mut unacked = sent;
    for _ in 0..32 {
        let mut responses = Vec::new();
        for r in &unacked {
            let ack = DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            };
            responses.extend(stream.on_request(&ack, &snap).expect("an ACK is valid"));
        }
        responses.extend(stream.on_snapshot(&snap, later));
        checker.check(&snap, &responses);
        if responses.is_empty() {
            let states: BTreeMap<String, TypeState> = stream
                .type_statuses(&snap)
                .into_iter()
                .map(|t| (t.type_url, t.state))
                .collect();
            for (t, s) in &states {
                assert!(
                    matches!(s, TypeState::Applied | TypeState::Nacked),
                    "{t} still {s:?} with nothing left to send"
                );
            }
            return;
        }
        unacked = responses;
    }
    panic!("the stream kept pushing to a sidecar that ACKs everything");
});
