//! Progressive delivery by editing Route weights in the config directory
//! (`bulwark rollout`): a canary moves traffic to a new version in steps, a
//! blue/green switch is a canary with one step of 100, and a rollback is one
//! command (`abort`) and one commit.
//!
//! A rollout works on one rule of one Route (`--rule NAME`, default the
//! first rule with backends) holding a *stable* backend and, once started, a
//! *canary* backend: the same service with the subset label (`version` by
//! default) set to the target. Its state lives in the Route itself, in the
//! annotation `bulwark.dev/rollout`, so `step`, `promote` and `abort` need
//! nothing but the route's name, and whoever reads the repository sees it.
//!
//! - `start --to v2 [--step 10]`: canary at `step`%, stable at the rest;
//! - `step`: canary weight + step (at most 100);
//! - `promote`: the canary becomes the only backend, weight 100;
//! - `abort`: the canary backend is removed, stable back to 100.
//!
//! Every edit is validated with [`crate::load_and_compile`] on the whole
//! directory as it would be after the write, and written atomically
//! (temporary file + rename). Only the edited Route document is rewritten:
//! other documents keep their text byte for byte, and the comment lines
//! before the Route keep their place; comments inside it are lost.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The annotation holding a rollout's state.
pub const ROLLOUT_ANNOTATION: &str = "bulwark.dev/rollout";

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Start { to: String, step: u32 },
    Step,
    Promote,
    Abort,
}

#[derive(Debug, Clone)]
pub struct Request {
    /// The config directory (or file).
    pub config: PathBuf,
    pub route: String,
    pub namespace: String,
    pub rule: Option<String>,
    /// The subset label naming versions.
    pub label: String,
    pub action: Action,
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    State(String),
    #[error("the edit would make the config invalid; nothing written:\n{0}")]
    Invalid(String),
}

/// What was done.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    pub file: PathBuf,
    /// `(version, weight)` of every backend of the rule after the edit.
    pub weights: Vec<(String, u32)>,
    /// The rollout is still in progress (not promoted nor aborted).
    pub in_progress: bool,
}

impl std::fmt::Display for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w: Vec<String> = self
            .weights
            .iter()
            .map(|(v, w)| format!("{v} {w}%"))
            .collect();
        write!(f, "{} ({})", w.join(", "), self.file.display())
    }
}

fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, RolloutError> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let rd = std::fs::read_dir(path)
        .map_err(|e| RolloutError::Io(format!("cannot read {}: {e}", path.display())))?;
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn find_route(req: &Request) -> Result<(PathBuf, String, usize, Value), RolloutError> {
    for file in yaml_files(&req.config)? {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| RolloutError::Io(format!("cannot read {}: {e}", file.display())))?;
        for (i, (_, doc)) in crate::inject::split_stream(&text).into_iter().enumerate() {
            let Ok(v) = serde_saphyr::from_str::<Value>(doc) else {
                continue;
            };
            let ns = v
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default");
            if v.get("kind").and_then(Value::as_str) == Some("Route")
                && v.pointer("/metadata/name").and_then(Value::as_str) == Some(&req.route)
                && ns == req.namespace
            {
                return Ok((file, text, i, v));
            }
        }
    }
    Err(RolloutError::NotFound(format!(
        "no Route {}/{} in {}",
        req.namespace,
        req.route,
        req.config.display()
    )))
}

fn version_of(b: &Value, label: &str) -> String {
    b.pointer(&format!(
        "/subset/{}",
        label.replace('~', "~0").replace('/', "~1")
    ))
    .and_then(Value::as_str)
    .unwrap_or("(no subset)")
    .to_string()
}

fn weight(b: &Value, n: usize) -> u32 {
    b.get("weight")
        .and_then(Value::as_u64)
        .map(|w| w as u32)
        .unwrap_or(if n == 1 { 100 } else { 0 })
}

/// Applies `action` to the rule's backends and the route's annotation.
fn edit(route: &mut Value, req: &Request) -> Result<(Vec<(String, u32)>, bool), RolloutError> {
    let state: Option<Value> = route
        .pointer(&format!(
            "/metadata/annotations/{}",
            ROLLOUT_ANNOTATION.replace('/', "~1")
        ))
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str(s).ok());
    let rules = route
        .pointer_mut("/spec/rules")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| RolloutError::State("the route has no rules".into()))?;
    let index = match &req.rule {
        Some(name) => rules
            .iter()
            .position(|r| r.get("name").and_then(Value::as_str) == Some(name.as_str()))
            .ok_or_else(|| RolloutError::NotFound(format!("the route has no rule {name:?}")))?,
        None => rules
            .iter()
            .position(|r| {
                r.get("backends")
                    .and_then(Value::as_array)
                    .is_some_and(|b| !b.is_empty())
            })
            .ok_or_else(|| {
                RolloutError::State(
                    "no rule of the route has backends; add one (service and subset) to roll out"
                        .into(),
                )
            })?,
    };
    let backends = rules[index]
        .get_mut("backends")
        .and_then(Value::as_array_mut)
        .filter(|b| !b.is_empty())
        .ok_or_else(|| RolloutError::State("the rule has no backends".into()))?;
    let label = req.label.as_str();
    let n = backends.len();
    let mut new_state = None::<Value>;
    match &req.action {
        Action::Start { to, step } => {
            if state.is_some() {
                return Err(RolloutError::State(
                    "a rollout is already in progress; use step, promote or abort".into(),
                ));
            }
            if !(1..=100).contains(step) {
                return Err(RolloutError::State("--step must be 1..=100".into()));
            }
            let others: Vec<usize> = (0..n)
                .filter(|i| version_of(&backends[*i], label) != *to)
                .collect();
            let [stable] = others.as_slice() else {
                return Err(RolloutError::State(format!(
                    "the rule needs exactly one backend besides {to} (it has {}); a rollout moves traffic from one version to another",
                    others.len()
                )));
            };
            let stable = *stable;
            let from = version_of(&backends[stable], label);
            if let Some(c) = (0..n).find(|i| *i != stable) {
                backends[c]["weight"] = json!(step);
            } else {
                let mut canary = backends[stable].clone();
                let subset = canary
                    .as_object_mut()
                    .map(|o| o.entry("subset").or_insert_with(|| json!({})))
                    .ok_or_else(|| RolloutError::State("a backend is not a mapping".into()))?;
                subset[label] = json!(to);
                canary["weight"] = json!(step);
                backends.push(canary);
            }
            backends[stable]["weight"] = json!(100 - step);
            new_state = Some(json!({"from": from, "to": to, "step": step}));
        }
        Action::Step | Action::Promote | Action::Abort => {
            let Some(st) = state else {
                return Err(RolloutError::State(
                    "no rollout in progress on this route (start one with `rollout start`)".into(),
                ));
            };
            let to = st["to"].as_str().unwrap_or_default().to_string();
            let from = st["from"].as_str().unwrap_or_default().to_string();
            let step = st["step"].as_u64().unwrap_or(10) as u32;
            let canary = (0..n).find(|i| version_of(&backends[*i], label) == to);
            let stable = (0..n).find(|i| version_of(&backends[*i], label) == from);
            let (Some(c), Some(s)) = (canary, stable) else {
                return Err(RolloutError::State(format!(
                    "the rule no longer has both {from} and {to} backends; edit it by hand"
                )));
            };
            match req.action {
                Action::Step => {
                    let w = (weight(&backends[c], n) + step).min(100);
                    backends[c]["weight"] = json!(w);
                    backends[s]["weight"] = json!(100 - w);
                    new_state = Some(st);
                }
                Action::Promote => {
                    backends[c]["weight"] = json!(100);
                    backends.remove(s);
                }
                _ => {
                    backends[s]["weight"] = json!(100);
                    backends.remove(c);
                }
            }
        }
    }
    let weights = backends
        .iter()
        .map(|b| (version_of(b, label), weight(b, backends.len())))
        .collect();
    let meta = route
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| RolloutError::State("the route has no metadata".into()))?;
    let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
    let in_progress = new_state.is_some();
    if let Some(a) = annotations.as_object_mut() {
        match new_state {
            Some(s) => {
                a.insert(ROLLOUT_ANNOTATION.into(), s.to_string().into());
            }
            None => {
                a.remove(ROLLOUT_ANNOTATION);
            }
        }
        if a.is_empty() {
            meta.remove("annotations");
        }
    }
    Ok((weights, in_progress))
}

/// The comment (and blank) lines a document starts with, and its `---`.
fn leading_comments(doc: &str) -> String {
    doc.split_inclusive('\n')
        .take_while(|l| {
            let t = l.trim();
            t.is_empty() || t.starts_with('#') || t.starts_with("---")
        })
        .collect()
}

/// Runs one rollout action; see the module docs.
pub fn run(req: &Request) -> Result<Done, RolloutError> {
    let (file, text, index, mut route) = find_route(req)?;
    let (weights, in_progress) = edit(&mut route, req)?;
    let yaml = serde_saphyr::to_string(&route)
        .map_err(|e| RolloutError::Io(format!("cannot write YAML: {e}")))?;
    let mut new_text = String::with_capacity(text.len() + 256);
    for (i, (_, doc)) in crate::inject::split_stream(&text).into_iter().enumerate() {
        if i == index {
            new_text.push_str(&leading_comments(doc));
            new_text.push_str(&yaml);
            if !yaml.ends_with('\n') {
                new_text.push('\n');
            }
        } else {
            new_text.push_str(doc);
        }
    }
    validate_with(&req.config, &file, &new_text)?;
    write_atomically(&file, &new_text)?;
    Ok(Done {
        file,
        weights,
        in_progress,
    })
}

/// Validates the config as it would be with `file` holding `text`.
fn validate_with(config: &Path, file: &Path, text: &str) -> Result<(), RolloutError> {
    let io = |e: std::io::Error| RolloutError::Io(format!("cannot stage the edit: {e}"));
    let stage = tempfile_dir().map_err(io)?;
    let result = (|| {
        for f in yaml_files(config)? {
            let name = f.file_name().unwrap_or_default();
            let body = if f == file {
                text.to_string()
            } else {
                std::fs::read_to_string(&f).map_err(|e| RolloutError::Io(e.to_string()))?
            };
            std::fs::write(stage.join(name), body).map_err(io)?;
        }
        crate::load_and_compile(&stage)
            .map(|_| ())
            .map_err(|errors| {
                // Point the errors at the real files.
                let msg = errors.to_string();
                let staged = format!("{}/", stage.display());
                let real = match config.is_dir() {
                    true => format!("{}/", config.display()),
                    false => format!("{}/", config.parent().unwrap_or(Path::new(".")).display()),
                };
                RolloutError::Invalid(msg.replace(&staged, &real))
            })
    })();
    let _ = std::fs::remove_dir_all(&stage);
    result
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let suffix: [u8; 8] = bulwark_ca::random_bytes();
    let hex: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let dir = std::env::temp_dir().join(format!("bulwark-rollout-{hex}"));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

/// Writes `text` to a temporary file beside `file`, syncs it, and renames
/// it over `file` (keeping its permissions).
fn write_atomically(file: &Path, text: &str) -> Result<(), RolloutError> {
    use std::io::Write;
    let err = |e: std::io::Error| RolloutError::Io(format!("cannot write {}: {e}", file.display()));
    let dir = file.parent().unwrap_or(Path::new("."));
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("config");
    let tmp = dir.join(format!(".{name}.rollout-tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    let write = (|| {
        f.write_all(text.as_bytes())?;
        if let Ok(m) = std::fs::metadata(file) {
            f.set_permissions(m.permissions())?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, file)
    })();
    if let Err(e) = write {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
