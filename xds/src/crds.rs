//! CustomResourceDefinitions for the config kinds, generated from the
//! model types ([`crate::model`], `schemars::JsonSchema` derived next to the
//! serde attributes): one source of truth for what a document may hold.
//! `bulwark xds crds` prints them; `deploy/kubernetes/crds.yaml` is that
//! output, and a test fails when the two differ.
//!
//! The JSON Schemas are turned into Kubernetes *structural* schemas: no
//! `$ref` (subschemas inlined), no `additionalProperties: false` (the API
//! server prunes unknown fields instead), no `const`/`oneOf` enums (made
//! plain `enum`s), only the `format`s Kubernetes knows, no defaults (the
//! control plane applies them, so both paths agree).

use std::borrow::Cow;

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Map, Value, json};

use crate::model::{self, Kind, Located};

/// The API group of the config kinds.
pub const GROUP: &str = "bulwark.dev";
pub const VERSION: &str = "v1";

impl<T: JsonSchema> JsonSchema for Located<T> {
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
    fn inline_schema() -> bool {
        T::inline_schema()
    }
}

/// `(plural, short name)` of a kind's CRD.
pub fn names(kind: Kind) -> (&'static str, &'static str) {
    match kind {
        Kind::MeshConfig => ("meshconfigs", "bmesh"),
        Kind::Service => ("services", "bsvc"),
        Kind::ServiceEntry => ("serviceentries", "bse"),
        Kind::Route => ("routes", "brt"),
        Kind::TrafficPolicy => ("trafficpolicies", "btp"),
        Kind::AuthorizationPolicy => ("authorizationpolicies", "bap"),
        Kind::Gateway => ("gateways", "bgw"),
        Kind::RequestAuthentication => ("requestauthentications", "bra"),
    }
}

fn generator() -> SchemaGenerator {
    SchemaSettings::draft07()
        .with(|s| {
            s.inline_subschemas = true;
        })
        .into_generator()
}

/// The structural OpenAPI v3 schema of a kind's `spec`.
pub fn spec_schema(kind: Kind) -> Value {
    let mut g = generator();
    let schema = match kind {
        Kind::MeshConfig => g.root_schema_for::<model::MeshConfigSpec>(),
        Kind::Service => g.root_schema_for::<model::ServiceSpec>(),
        Kind::ServiceEntry => g.root_schema_for::<model::ServiceEntrySpec>(),
        Kind::Route => g.root_schema_for::<model::RouteSpec>(),
        Kind::TrafficPolicy => g.root_schema_for::<model::TrafficPolicySpec>(),
        Kind::AuthorizationPolicy => g.root_schema_for::<model::AuthorizationPolicySpec>(),
        Kind::Gateway => g.root_schema_for::<model::GatewaySpec>(),
        Kind::RequestAuthentication => g.root_schema_for::<model::RequestAuthenticationSpec>(),
    };
    let mut v = schema.to_value();
    structural(&mut v);
    v
}

/// Formats the Kubernetes OpenAPI validator understands.
const KNOWN_FORMATS: [&str; 6] = ["int32", "int64", "float", "double", "byte", "date-time"];

/// Rewrites a JSON Schema (draft 7, inlined) into a structural schema.
fn structural(v: &mut Value) {
    let Value::Object(m) = v else { return };
    for k in [
        "$schema",
        "title",
        "default",
        "$defs",
        "definitions",
        "examples",
    ] {
        m.remove(k);
    }
    if m.get("additionalProperties") == Some(&Value::Bool(false)) {
        m.remove("additionalProperties");
    }
    if let Some(f) = m.get("format").and_then(Value::as_str)
        && !KNOWN_FORMATS.contains(&f)
    {
        m.remove("format");
    }
    if let Some(c) = m.remove("const") {
        m.insert("enum".into(), json!([c]));
    }
    // `Option<T>` comes out as `anyOf: [T, {type: null}]`: T it is.
    for key in ["oneOf", "anyOf"] {
        let single = m.get(key).and_then(Value::as_array).and_then(|branches| {
            let rest: Vec<&Value> = branches
                .iter()
                .filter(|b| b.get("type") != Some(&Value::from("null")))
                .collect();
            (rest.len() == 1 && branches.len() == 2).then(|| rest[0].clone())
        });
        if let Some(Value::Object(inner)) = single {
            m.remove(key);
            for (k, v) in inner {
                m.entry(k).or_insert(v);
            }
        }
    }
    // Documented unit enums come out as `oneOf` of constants.
    for key in ["oneOf", "anyOf"] {
        let consts = m.get(key).and_then(Value::as_array).and_then(|branches| {
            let mut values = Vec::new();
            for b in branches {
                match (b.get("const"), b.get("enum").and_then(Value::as_array)) {
                    (Some(c), _) if c.is_string() => values.push(c.clone()),
                    (None, Some(e)) if e.iter().all(Value::is_string) => {
                        values.extend(e.iter().cloned())
                    }
                    _ => return None,
                }
            }
            Some(values)
        });
        if let Some(values) = consts {
            m.remove(key);
            m.insert("type".into(), "string".into());
            m.insert("enum".into(), Value::Array(values));
        }
    }
    // A remaining `type: [T, "null"]`.
    if let Some(Value::Array(types)) = m.get("type").cloned() {
        let non_null: Vec<&Value> = types.iter().filter(|t| *t != "null").collect();
        if let [t] = non_null.as_slice() {
            m.insert("type".into(), (*t).clone());
        }
    }
    for (k, child) in m.iter_mut() {
        match k.as_str() {
            "properties" => {
                if let Value::Object(props) = child {
                    for p in props.values_mut() {
                        structural(p);
                    }
                }
            }
            "items" | "additionalProperties" | "not" => structural(child),
            "allOf" | "anyOf" | "oneOf" => {
                if let Value::Array(a) = child {
                    for b in a {
                        structural(b);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The CustomResourceDefinition of one kind.
pub fn crd(kind: Kind) -> Value {
    let (plural, short) = names(kind);
    let mut props = Map::new();
    props.insert("apiVersion".into(), json!({"type": "string"}));
    props.insert("kind".into(), json!({"type": "string"}));
    props.insert("metadata".into(), json!({"type": "object"}));
    props.insert("spec".into(), spec_schema(kind));
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{plural}.{GROUP}"),
            "labels": {"app.kubernetes.io/part-of": "bulwark"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.as_str(),
                "listKind": format!("{}List", kind.as_str()),
                "plural": plural,
                "singular": kind.as_str().to_ascii_lowercase(),
                "shortNames": [short],
                "categories": ["bulwark"],
            },
            "versions": [{
                "name": VERSION,
                "served": true,
                "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": format!("Bulwark {} (generated from the Rust model by `bulwark xds crds`).", kind.as_str()),
                    "required": ["spec"],
                    "properties": props,
                }},
            }],
        },
    })
}

/// Every CRD as one multi-document YAML stream: what `bulwark xds crds`
/// prints and `deploy/kubernetes/crds.yaml` holds.
pub fn crds_yaml() -> String {
    let mut out =
        String::from("# Generated by `bulwark xds crds` from xds/src/model.rs; do not edit.\n");
    for kind in Kind::ALL {
        out.push_str("---\n");
        let yaml = serde_saphyr::to_string(&crd(kind)).expect("CRDs serialize");
        out.push_str(&yaml);
        if !yaml.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(v: &Value, f: &mut impl FnMut(&Map<String, Value>)) {
        match v {
            Value::Object(m) => {
                f(m);
                m.values().for_each(|c| walk(c, f));
            }
            Value::Array(a) => a.iter().for_each(|c| walk(c, f)),
            _ => {}
        }
    }

    #[test]
    fn schemas_are_structural() {
        for kind in Kind::ALL {
            let s = spec_schema(kind);
            walk(&s, &mut |m| {
                for k in ["$ref", "const", "oneOf", "anyOf", "$schema", "default"] {
                    assert!(!m.contains_key(k), "{kind}: {k} in {m:?}");
                }
                assert!(!m.get("type").is_some_and(Value::is_array), "{kind}: {m:?}");
                assert_ne!(m.get("additionalProperties"), Some(&Value::Bool(false)));
            });
            assert_eq!(s["type"], "object", "{kind}");
        }
    }

    #[test]
    fn enums_are_plain() {
        let s = spec_schema(Kind::MeshConfig);
        assert_eq!(
            s["properties"]["mtls"]["properties"]["mode"]["enum"],
            json!(["STRICT", "PERMISSIVE"])
        );
        let s = spec_schema(Kind::Service);
        assert_eq!(
            s["properties"]["ports"]["items"]["properties"]["protocol"]["enum"],
            json!(["http", "http2", "grpc", "tcp", "auto"])
        );
    }
}
