//! Request body validation at the edge: a route's JSON Schema, compiled
//! once per config change and checked against each JSON request body.
//!
//! Compilation never touches the network or the file system: a `$ref` to
//! anything outside the schema itself is a compile error, so a config push
//! cannot make the gateway fetch URLs (or hang on them).

/// Longest `Invalid::reason` returned to a client. Messages can quote the
/// offending value, which may be as large as the body itself.
const MAX_REASON_CHARS: usize = 200;

/// Why a schema does not compile.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("JSON Schema is not valid JSON: {0}")]
    NotJson(String),
    #[error("invalid JSON Schema: {0}")]
    Invalid(String),
}

/// Why a body was refused: a short, machine-readable reason for the 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Invalid {
    /// `<instance path>: <message>`, e.g.
    /// `/quantity: -1 is less than the minimum of 1`; `/` is the whole body.
    pub reason: String,
}

/// A compiled JSON Schema. Cheap to share (`Arc`) across requests.
pub struct BodySchema {
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for BodySchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BodySchema")
    }
}

impl BodySchema {
    /// Compiles a schema (draft 2020-12 unless its `$schema` says
    /// otherwise). `format` keywords are asserted, not just annotations:
    /// at the edge, `"format": "email"` is meant as a check.
    pub fn compile(json_schema_text: &str) -> Result<Self, SchemaError> {
        let schema: serde_json::Value = serde_json::from_str(json_schema_text)
            .map_err(|e| SchemaError::NotJson(e.to_string()))?;
        let validator = jsonschema::options()
            .offline()
            .should_validate_formats(true)
            .build(&schema)
            .map_err(|e| SchemaError::Invalid(e.to_string()))?;
        Ok(Self { validator })
    }

    /// Checks a request body; reports the first violation.
    pub fn validate(&self, body: &[u8]) -> Result<(), Invalid> {
        let instance: serde_json::Value = serde_json::from_slice(body).map_err(|_| Invalid {
            reason: "body is not valid JSON".into(),
        })?;
        match self.validator.validate(&instance) {
            Ok(()) => Ok(()),
            Err(e) => {
                let path = e.instance_path().as_str();
                let path = if path.is_empty() { "/" } else { path };
                Err(Invalid {
                    reason: truncate(format!("{path}: {e}")),
                })
            }
        }
    }
}

fn truncate(mut s: String) -> String {
    if let Some((cut, _)) = s.char_indices().nth(MAX_REASON_CHARS) {
        s.truncate(cut);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: &str = r#"{
        "type": "object",
        "required": ["item", "quantity"],
        "properties": {
            "item": {"type": "string", "minLength": 1},
            "quantity": {"type": "integer", "minimum": 1},
            "email": {"type": "string", "format": "email"}
        },
        "additionalProperties": false
    }"#;

    #[test]
    fn valid_body_passes() {
        let s = BodySchema::compile(ORDER).unwrap();
        assert_eq!(s.validate(br#"{"item":"book","quantity":2}"#), Ok(()));
    }

    #[test]
    fn invalid_body_names_the_path_and_the_rule() {
        let s = BodySchema::compile(ORDER).unwrap();
        let e = s.validate(br#"{"item":"book","quantity":-1}"#).unwrap_err();
        assert_eq!(e.reason, "/quantity: -1 is less than the minimum of 1");
    }

    #[test]
    fn missing_property_is_reported_at_the_root() {
        let s = BodySchema::compile(ORDER).unwrap();
        let e = s.validate(br#"{"item":"book"}"#).unwrap_err();
        assert!(e.reason.starts_with("/: "), "{}", e.reason);
        assert!(e.reason.contains("quantity"), "{}", e.reason);
    }

    #[test]
    fn formats_are_checked() {
        let s = BodySchema::compile(ORDER).unwrap();
        let e = s
            .validate(br#"{"item":"b","quantity":1,"email":"not an address"}"#)
            .unwrap_err();
        assert!(e.reason.starts_with("/email: "), "{}", e.reason);
    }

    #[test]
    fn non_json_body_is_invalid() {
        let s = BodySchema::compile(ORDER).unwrap();
        let e = s.validate(b"item=book&quantity=2").unwrap_err();
        assert_eq!(e.reason, "body is not valid JSON");
    }

    #[test]
    fn long_reasons_are_cut() {
        let s = BodySchema::compile(r#"{"type":"array"}"#).unwrap();
        let big = format!(r#"{{"k":"{}"}}"#, "x".repeat(10_000));
        let e = s.validate(big.as_bytes()).unwrap_err();
        assert!(e.reason.chars().count() <= MAX_REASON_CHARS + 1);
    }

    #[test]
    fn remote_ref_does_not_compile() {
        let err = BodySchema::compile(
            r#"{"properties":{"a":{"$ref":"https://schemas.example.com/a.json"}}}"#,
        )
        .unwrap_err();
        assert!(matches!(err, SchemaError::Invalid(_)), "{err}");
    }

    #[test]
    fn file_ref_does_not_compile() {
        let err = BodySchema::compile(r#"{"$ref":"file:///etc/passwd"}"#).unwrap_err();
        assert!(matches!(err, SchemaError::Invalid(_)), "{err}");
    }

    #[test]
    fn local_refs_work() {
        let s = BodySchema::compile(
            r##"{"$defs":{"n":{"type":"integer"}},"properties":{"a":{"$ref":"#/$defs/n"}}}"##,
        )
        .unwrap();
        assert!(s.validate(br#"{"a":1}"#).is_ok());
        assert!(s.validate(br#"{"a":"x"}"#).is_err());
    }

    #[test]
    fn bad_schemas_are_refused() {
        assert!(matches!(
            BodySchema::compile("{not json"),
            Err(SchemaError::NotJson(_))
        ));
        assert!(matches!(
            BodySchema::compile(r#"{"type": 12}"#),
            Err(SchemaError::Invalid(_))
        ));
    }
}
