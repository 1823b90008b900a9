//! Deterministic protobuf encoding of config resources.
//!
//! The generated types hold `map<string, string>` fields in a `HashMap`, and
//! prost encodes a map in the map's iteration order, which is randomly
//! seeded per map: the same resource can encode to different bytes in two
//! replicas, or twice in one process. Resource versions are hashes of the
//! encoding and must be identical everywhere (a sidecar moving between
//! replicas must not be sent anything), so resources are re-encoded here
//! with every map's entries sorted by key.
//!
//! Sorting by key is the order prost uses for `BTreeMap` maps, so should the
//! generated code switch to `BTreeMap` (`btree_map(["."])` in the proto
//! build), this becomes a no-op and no version changes.

/// How to canonicalize one field of a message: the fields not listed in a
/// [`Schema`] hold no map at any depth and are copied as they are.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Field {
    /// A `map<string, string>` field: its entries are sorted by key.
    Map,
    /// A (repeated or singular) message field containing a map somewhere.
    Message(Schema),
}

/// The fields of a message that contain maps, by field number.
pub(crate) type Schema = &'static [(u32, Field)];

// Mirrors `config.proto`. A map field added there must be added here too,
// or the type's versions stop being deterministic; the unit tests below
// check every map known today.
const ENDPOINT: Schema = &[(3, Field::Map)];
const WEIGHTED_BACKEND: Schema = &[(2, Field::Map)];
const HEADER_OVERRIDE: Schema = &[(2, Field::Message(WEIGHTED_BACKEND))];
const HTTP_ROUTE: Schema = &[
    (3, Field::Message(WEIGHTED_BACKEND)),
    (6, Field::Message(HEADER_OVERRIDE)),
];
pub(crate) const SERVICE: Schema = &[(5, Field::Map)];
pub(crate) const SERVICE_ENDPOINTS: Schema = &[(2, Field::Message(ENDPOINT))];
pub(crate) const SERVICE_ENTRY: Schema = &[(7, Field::Message(ENDPOINT))];
pub(crate) const ROUTE: Schema = &[(4, Field::Message(HTTP_ROUTE))];
const GATEWAY_ROUTE: Schema = &[(1, Field::Message(HTTP_ROUTE))];
pub(crate) const GATEWAY: Schema = &[(4, Field::Message(GATEWAY_ROUTE))];
const JWT_PROVIDER: Schema = &[(9, Field::Map)];
pub(crate) const REQUEST_AUTHENTICATION: Schema = &[(4, Field::Message(JWT_PROVIDER))];
/// Messages without maps (MeshConfig, TrafficPolicy, AuthorizationPolicy,
/// TrustBundle): prost's encoding is already deterministic.
pub(crate) const NO_MAPS: Schema = &[];

/// Encodes `msg` with every map sorted by key.
pub(crate) fn encode<M: prost::Message>(msg: &M, schema: Schema) -> Vec<u8> {
    let raw = msg.encode_to_vec();
    if schema.is_empty() {
        return raw;
    }
    let mut out = Vec::with_capacity(raw.len());
    match canonicalize(&raw, schema, &mut out) {
        Some(()) => out,
        // prost's own output always parses; keep it rather than panic.
        None => raw,
    }
}

/// One field as it appears on the wire.
struct RawField<'a> {
    number: u32,
    /// The whole field: key, length (if any) and payload.
    whole: &'a [u8],
    /// The payload of a length-delimited field.
    payload: Option<&'a [u8]>,
}

fn canonicalize(buf: &[u8], schema: Schema, out: &mut Vec<u8>) -> Option<()> {
    let fields = split(buf)?;
    let mut maps_done: Vec<u32> = Vec::new();
    for (i, f) in fields.iter().enumerate() {
        match schema.iter().find(|(n, _)| *n == f.number).map(|(_, k)| *k) {
            None => out.extend_from_slice(f.whole),
            Some(Field::Message(sub)) => {
                let payload = f.payload?;
                let mut inner = Vec::with_capacity(payload.len());
                canonicalize(payload, sub, &mut inner)?;
                put_varint(out, (u64::from(f.number) << 3) | 2);
                put_varint(out, inner.len() as u64);
                out.extend_from_slice(&inner);
            }
            Some(Field::Map) => {
                // All entries of the map go out together, where its first
                // entry was, sorted by key.
                if maps_done.contains(&f.number) {
                    continue;
                }
                maps_done.push(f.number);
                let mut entries: Vec<(&[u8], &[u8])> = Vec::new();
                for e in fields[i..].iter().filter(|e| e.number == f.number) {
                    entries.push((entry_key(e.payload?)?, e.whole));
                }
                entries.sort_by(|a, b| a.0.cmp(b.0));
                for (_, whole) in entries {
                    out.extend_from_slice(whole);
                }
            }
        }
    }
    Some(())
}

/// The key (field 1) of a map entry; absent means the empty string.
fn entry_key(entry: &[u8]) -> Option<&[u8]> {
    Some(
        split(entry)?
            .into_iter()
            .find(|f| f.number == 1)
            .and_then(|f| f.payload)
            .unwrap_or(&[]),
    )
}

fn split(mut buf: &[u8]) -> Option<Vec<RawField<'_>>> {
    let mut fields = Vec::new();
    while !buf.is_empty() {
        let start = buf;
        let key = get_varint(&mut buf)?;
        let number = u32::try_from(key >> 3).ok()?;
        let payload = match key & 7 {
            0 => {
                get_varint(&mut buf)?;
                None
            }
            1 => {
                buf = buf.get(8..)?;
                None
            }
            2 => {
                let len = usize::try_from(get_varint(&mut buf)?).ok()?;
                let p = buf.get(..len)?;
                buf = &buf[len..];
                Some(p)
            }
            5 => {
                buf = buf.get(4..)?;
                None
            }
            // Groups (3, 4) are not used by proto3.
            _ => return None,
        };
        let whole = &start[..start.len() - buf.len()];
        fields.push(RawField {
            number,
            whole,
            payload,
        });
    }
    Some(fields)
}

fn get_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some(value);
        }
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bulwark_proto::config::v1 as pb;
    use prost::Message;

    use super::*;

    fn labels(n: usize) -> HashMap<String, String> {
        // A fresh HashMap each call: a fresh random iteration order.
        (0..n).map(|i| (format!("k{i}"), format!("v{i}"))).collect()
    }

    fn route() -> pb::Route {
        let backend = || pb::WeightedBackend {
            service: "shop/api".into(),
            subset: labels(12),
            weight: 50,
            port: 0,
        };
        pb::Route {
            name: "api".into(),
            namespace: "shop".into(),
            service: "shop/api".into(),
            rules: vec![pb::HttpRoute {
                name: "r".into(),
                backends: vec![backend(), backend()],
                overrides: vec![pb::HeaderOverride {
                    header: Some(pb::HeaderMatch {
                        name: "x-canary".into(),
                        value: None,
                        absent: false,
                    }),
                    backend: Some(backend()),
                }],
                ..Default::default()
            }],
            source: None,
        }
    }

    fn endpoint() -> pb::Endpoint {
        pb::Endpoint {
            address: "10.0.0.1".into(),
            identity: "spiffe://cluster.local/ns/shop/sa/api".into(),
            labels: labels(12),
            ports: vec![8080],
            weight: 1,
        }
    }

    /// Encodes 20 equal messages (each with freshly seeded maps) and checks
    /// they all give the same bytes, which decode back to the message.
    fn assert_deterministic<M: Message + Default + PartialEq + std::fmt::Debug>(
        make: impl Fn() -> M,
        schema: Schema,
    ) {
        let first = encode(&make(), schema);
        for _ in 0..20 {
            let msg = make();
            let bytes = encode(&msg, schema);
            assert_eq!(bytes, first);
            assert_eq!(M::decode(bytes.as_slice()).unwrap(), msg);
        }
    }

    #[test]
    fn service_selector_encodes_deterministically() {
        assert_deterministic(
            || pb::Service {
                name: "api".into(),
                selector: labels(12),
                identities: vec!["a".into()],
                ..Default::default()
            },
            SERVICE,
        );
    }

    #[test]
    fn endpoint_labels_encode_deterministically() {
        assert_deterministic(
            || pb::ServiceEndpoints {
                service: "shop/api".into(),
                endpoints: vec![endpoint(), endpoint()],
                source: None,
            },
            SERVICE_ENDPOINTS,
        );
        assert_deterministic(
            || pb::ServiceEntry {
                name: "ext".into(),
                endpoints: vec![endpoint()],
                ..Default::default()
            },
            SERVICE_ENTRY,
        );
    }

    #[test]
    fn route_subsets_encode_deterministically() {
        assert_deterministic(route, ROUTE);
    }

    #[test]
    fn map_entries_are_in_btree_order() {
        let mut selector = HashMap::new();
        selector.insert("b".to_string(), "1".to_string());
        selector.insert("aa".to_string(), String::new());
        let bytes = encode(
            &pb::Service {
                selector,
                ..Default::default()
            },
            SERVICE,
        );
        let aa = bytes.windows(2).position(|w| w == b"aa").unwrap();
        let b = bytes.iter().rposition(|&c| c == b'b').unwrap();
        assert!(aa < b, "entries not sorted by key: {bytes:?}");
    }
}
