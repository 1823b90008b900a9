//! Request routing: match rules (path, method, headers) compiled from a
//! `Route`, then pick a backend by weight or header override.

use bulwark_proto::config::v1;
use regex::Regex;

/// Largest compiled regex accepted from config.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Whether `path` is the one way of writing itself that path rules and
/// upstreams agree on: it starts with `/`, has no `.` or `..` segment and
/// no empty one but the last, no backslash, and percent-encodes nothing that needs no
/// encoding (`%2F` and `%5C` included, which some servers decode into
/// separators). Anything else could match one rule here and mean another
/// path to the upstream. `*` (`OPTIONS *`) is canonical.
pub fn canonical_path(path: &str) -> Result<(), &'static str> {
    if path == "*" {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err("path does not start with /");
    };
    if path.contains('\\') {
        return Err("backslash in path");
    }
    // A trailing `/` (an empty last segment) is a path of its own, not a
    // second spelling of another.
    let mut segs = rest.split('/').peekable();
    while let Some(seg) = segs.next() {
        match seg {
            "" if segs.peek().is_some() => return Err("empty path segment"),
            "." | ".." => return Err("dot segment in path"),
            _ => {}
        }
    }
    let b = path.as_bytes();
    let mut i = 0;
    while let Some(off) = b[i..].iter().position(|&c| c == b'%') {
        let at = i + off;
        let hex = |c: u8| (c as char).to_digit(16);
        let (Some(hi), Some(lo)) = (
            b.get(at + 1).copied().and_then(hex),
            b.get(at + 2).copied().and_then(hex),
        ) else {
            return Err("malformed percent-encoding in path");
        };
        let c = (hi * 16 + lo) as u8;
        if c.is_ascii_alphanumeric() || b"-._~/\\".contains(&c) {
            return Err("needlessly percent-encoded character in path");
        }
        i = at + 3;
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl StrMatch {
    pub fn compile(m: &v1::StringMatch) -> Result<Option<Self>, String> {
        use v1::string_match::Kind;
        Ok(match &m.kind {
            Some(Kind::Exact(s)) => Some(StrMatch::Exact(s.clone())),
            Some(Kind::Prefix(s)) => Some(StrMatch::Prefix(s.clone())),
            Some(Kind::Regex(r)) => Some(StrMatch::Regex(
                regex::RegexBuilder::new(&format!("^(?:{r})$"))
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| format!("regex {r:?}: {e}"))?,
            )),
            None => None,
        })
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(s) => v == s,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug, Clone)]
pub struct HeaderRule {
    pub name: http::HeaderName,
    pub value: Option<StrMatch>,
    pub absent: bool,
}

impl HeaderRule {
    fn compile(h: &v1::HeaderMatch) -> Result<Self, String> {
        let name = http::HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("header name {:?}", h.name))?;
        let value = match &h.value {
            Some(v) => StrMatch::compile(v)?,
            None => None,
        };
        Ok(Self {
            name,
            value,
            absent: h.absent,
        })
    }

    pub fn matches(&self, headers: &http::HeaderMap) -> bool {
        let v = headers.get(&self.name).and_then(|v| v.to_str().ok());
        match (self.absent, v, &self.value) {
            (true, v, _) => v.is_none(),
            (false, None, _) => false,
            (false, Some(_), None) => true,
            (false, Some(v), Some(m)) => m.matches(v),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Match {
    pub path: Option<StrMatch>,
    pub methods: Vec<http::Method>,
    pub headers: Vec<HeaderRule>,
}

impl Match {
    fn compile(m: &v1::RouteMatch) -> Result<Self, String> {
        Ok(Self {
            path: match &m.path {
                Some(p) => StrMatch::compile(p)?,
                None => None,
            },
            methods: m
                .methods
                .iter()
                .map(|s| {
                    http::Method::from_bytes(s.as_bytes()).map_err(|_| format!("method {s:?}"))
                })
                .collect::<Result<_, _>>()?,
            headers: m
                .headers
                .iter()
                .map(HeaderRule::compile)
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn matches(&self, method: &http::Method, path: &str, headers: &http::HeaderMap) -> bool {
        self.path.as_ref().is_none_or(|p| p.matches(path))
            && (self.methods.is_empty() || self.methods.contains(method))
            && self.headers.iter().all(|h| h.matches(headers))
    }
}

/// Where a request goes: a service (`namespace/name`) and an optional subset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub service: String,
    pub subset: Vec<(String, String)>,
    pub weight: u32,
    /// 0 = the request's port.
    pub port: u16,
}

impl Backend {
    fn from_proto(b: &v1::WeightedBackend, namespace: &str) -> Self {
        let service = if b.service.contains('/') {
            b.service.clone()
        } else {
            format!("{namespace}/{}", b.service)
        };
        let mut subset: Vec<(String, String)> = b
            .subset
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        subset.sort();
        Self {
            service,
            subset,
            weight: b.weight,
            port: u16::try_from(b.port).unwrap_or(0),
        }
    }

    /// Label for metrics and logs: `service` or `service[k=v,...]`.
    pub fn label(&self) -> String {
        if self.subset.is_empty() {
            self.service.clone()
        } else {
            let s: Vec<String> = self
                .subset
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("{}[{}]", self.service, s.join(","))
        }
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub matches: Vec<Match>,
    pub backends: Vec<Backend>,
    pub overrides: Vec<(HeaderRule, Backend)>,
    pub timeout: Option<std::time::Duration>,
    pub retry: Option<v1::RetryPolicy>,
    /// Enforced by the inbound sidecars of the table's service.
    pub rate_limit: Option<v1::RateLimit>,
}

/// The compiled routing table of one service.
#[derive(Debug, Clone)]
pub struct RouteTable {
    pub service: String,
    pub rules: Vec<Rule>,
}

impl RouteTable {
    pub fn compile(r: &v1::Route) -> Result<Self, String> {
        let ns = if r.namespace.is_empty() {
            "default"
        } else {
            &r.namespace
        };
        let service = if r.service.contains('/') {
            r.service.clone()
        } else {
            format!("{ns}/{}", r.service)
        };
        let mut rules = Vec::new();
        for (i, rule) in r.rules.iter().enumerate() {
            let mut backends: Vec<Backend> = rule
                .backends
                .iter()
                .map(|b| Backend::from_proto(b, ns))
                .collect();
            if backends.is_empty() {
                backends.push(Backend {
                    service: service.clone(),
                    subset: Vec::new(),
                    weight: 100,
                    port: 0,
                });
            }
            if backends.iter().map(|b| b.weight).sum::<u32>() == 0 {
                return Err(format!("rule {i}: backend weights sum to 0"));
            }
            let overrides = rule
                .overrides
                .iter()
                .map(|o| {
                    let h = o
                        .header
                        .as_ref()
                        .ok_or_else(|| format!("rule {i}: override without header"))?;
                    let b = o
                        .backend
                        .as_ref()
                        .ok_or_else(|| format!("rule {i}: override without backend"))?;
                    Ok((HeaderRule::compile(h)?, Backend::from_proto(b, ns)))
                })
                .collect::<Result<_, String>>()?;
            rules.push(Rule {
                name: if rule.name.is_empty() {
                    format!("rule-{i}")
                } else {
                    rule.name.clone()
                },
                matches: rule
                    .matches
                    .iter()
                    .map(Match::compile)
                    .collect::<Result<_, _>>()?,
                backends,
                overrides,
                timeout: (rule.timeout_ms > 0)
                    .then(|| std::time::Duration::from_millis(rule.timeout_ms)),
                retry: rule.retry.clone(),
                rate_limit: rule.rate_limit.filter(|r| r.requests_per_second > 0),
            });
        }
        Ok(Self { service, rules })
    }

    /// The first rule whose matches (any of them; none = all) accept the request.
    pub fn find(
        &self,
        method: &http::Method,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Option<&Rule> {
        self.rules.iter().find(|r| {
            r.matches.is_empty() || r.matches.iter().any(|m| m.matches(method, path, headers))
        })
    }
}

impl Rule {
    /// Picks the backend: a matching header override wins; otherwise by
    /// weight, with `roll` uniform in `[0, 1)`.
    pub fn pick(&self, headers: &http::HeaderMap, roll: f64) -> &Backend {
        if let Some((_, b)) = self.overrides.iter().find(|(h, _)| h.matches(headers)) {
            return b;
        }
        let total: u32 = self.backends.iter().map(|b| b.weight).sum();
        let mut x = (roll * f64::from(total)) as u32;
        for b in &self.backends {
            if x < b.weight {
                return b;
            }
            x -= b.weight;
        }
        self.backends.last().expect("at least one backend")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths_pass_and_every_other_spelling_is_refused() {
        for ok in [
            "/",
            "*",
            "/orders",
            "/orders/",
            "/a/b.c/d..e/.well-known",
            "/q%20x",
            "/a%3Fb",
            "/%C3%A9",
        ] {
            assert_eq!(canonical_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "orders",
            "//orders",
            "/a//b",
            "/./orders",
            "/x/../orders",
            "/x/..",
            "/x/.",
            "/%6Frders",
            "/%6frders",
            "/a%2Fb",
            "/a%2fb",
            "/a%5Cb",
            "/a%2E%2E/b",
            "/a\\b",
            "/a%",
            "/a%4",
            "/a%zz",
        ] {
            assert!(canonical_path(bad).is_err(), "{bad} accepted");
        }
    }
    use v1::string_match::Kind;

    fn canary() -> v1::Route {
        v1::Route {
            name: "api".into(),
            namespace: "default".into(),
            service: "default/api".into(),
            rules: vec![
                v1::HttpRoute {
                    name: "admin".into(),
                    matches: vec![v1::RouteMatch {
                        path: Some(v1::StringMatch {
                            kind: Some(Kind::Regex("/admin/[0-9]+".into())),
                        }),
                        methods: vec!["POST".into()],
                        ..Default::default()
                    }],
                    backends: vec![v1::WeightedBackend {
                        service: "admin".into(),
                        weight: 100,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                v1::HttpRoute {
                    name: "canary".into(),
                    matches: vec![v1::RouteMatch {
                        path: Some(v1::StringMatch {
                            kind: Some(Kind::Prefix("/".into())),
                        }),
                        ..Default::default()
                    }],
                    backends: vec![
                        v1::WeightedBackend {
                            service: "api".into(),
                            subset: [("version".into(), "v1".into())].into(),
                            weight: 90,
                            port: 0,
                        },
                        v1::WeightedBackend {
                            service: "api".into(),
                            subset: [("version".into(), "v2".into())].into(),
                            weight: 10,
                            port: 0,
                        },
                    ],
                    overrides: vec![v1::HeaderOverride {
                        header: Some(v1::HeaderMatch {
                            name: "x-canary".into(),
                            value: Some(v1::StringMatch {
                                kind: Some(Kind::Exact("always".into())),
                            }),
                            absent: false,
                        }),
                        backend: Some(v1::WeightedBackend {
                            service: "api".into(),
                            subset: [("version".into(), "v2".into())].into(),
                            weight: 0,
                            port: 0,
                        }),
                    }],
                    timeout_ms: 2000,
                    ..Default::default()
                },
            ],
            source: None,
        }
    }

    #[test]
    fn rules_match_by_path_regex_and_method_in_order() {
        let t = RouteTable::compile(&canary()).unwrap();
        let h = http::HeaderMap::new();
        assert_eq!(
            t.find(&http::Method::POST, "/admin/12", &h).unwrap().name,
            "admin"
        );
        assert_eq!(
            t.find(&http::Method::GET, "/admin/12", &h).unwrap().name,
            "canary"
        );
        assert_eq!(
            t.find(&http::Method::POST, "/admin/12x", &h).unwrap().name,
            "canary",
            "regex is anchored"
        );
    }

    #[test]
    fn weights_split_and_header_override_wins() {
        let t = RouteTable::compile(&canary()).unwrap();
        let rule = &t.rules[1];
        let h = http::HeaderMap::new();
        let v2 = (0..1000)
            .filter(|i| rule.pick(&h, f64::from(*i) / 1000.0).subset[0].1 == "v2")
            .count();
        assert_eq!(v2, 100);
        let mut h = http::HeaderMap::new();
        h.insert("x-canary", "always".parse().unwrap());
        assert_eq!(rule.pick(&h, 0.0).label(), "default/api[version=v2]");
        assert_eq!(rule.timeout, Some(std::time::Duration::from_secs(2)));
    }

    #[test]
    fn bad_regex_is_an_error() {
        let mut r = canary();
        r.rules[0].matches[0].path = Some(v1::StringMatch {
            kind: Some(Kind::Regex("(".into())),
        });
        assert!(RouteTable::compile(&r).is_err());
    }
}
