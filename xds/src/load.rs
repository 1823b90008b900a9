//! Reading config files: one file or a directory of `*.yaml`/`*.yml`, split
//! into documents, each parsed into the [`model`](crate::model) types.
//!
//! Input is untrusted (anyone who can write to the config directory), so it
//! is bounded: file size, file count, nesting depth, and the parser's own
//! budget (nodes, aliases) are all capped, and every failure is a
//! [`ConfigError`] naming the file and line, never a panic.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_saphyr::budget::BudgetBreach;

use crate::model::{self, Document, Envelope, Kind, Located, Spec};

/// Largest config file accepted.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Most files read from one directory.
pub const MAX_FILES: usize = 1024;
/// Deepest nesting of mappings and sequences in a document. The deepest
/// legitimate document is about 8 levels (spec → rules → overrides →
/// backend → subset); the limit keeps hostile input from exhausting the
/// stack or CPU.
pub const MAX_DEPTH: usize = 32;

/// One problem in the config, at `file:line`. `line` is 1-based; 0 means the
/// problem is with the path itself (unreadable, missing) and has no line.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: u32,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: impl Into<PathBuf>, line: u32, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
        }
    }
}

/// Every problem found, sorted by file and line. Displays one per line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    /// Sorted by file then line; errors on the same line keep their order.
    pub(crate) fn sorted(mut errors: Vec<ConfigError>) -> Self {
        errors.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        Self(errors)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// The documents of a config path, in file order then document order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Loaded {
    pub documents: Vec<Document>,
}

/// A document whose kind and name were read but whose body did not parse.
/// Validation still counts it as existing, so that a typo in a Service does
/// not also produce "unknown service" errors in every Route that names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Unparsed {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

/// Everything the loader found, good and bad.
#[derive(Debug, Default)]
pub(crate) struct Loading {
    pub documents: Vec<Document>,
    pub unparsed: Vec<Unparsed>,
    pub errors: Vec<ConfigError>,
}

/// Reads `path` (a file, or every `*.yaml`/`*.yml` file directly in a
/// directory, in name order, hidden files ignored) and parses every document
/// in it. Returns every parse error at once, as `file:line: message`.
pub fn load_path(path: &Path) -> Result<Loaded, ConfigErrors> {
    let loading = load_lenient(path);
    if loading.errors.is_empty() {
        Ok(Loaded {
            documents: loading.documents,
        })
    } else {
        Err(ConfigErrors::sorted(loading.errors))
    }
}

/// Parses YAML text as if read from `file`; for tests and for callers that
/// already hold the text.
pub fn load_str(file: &Path, text: &str) -> Result<Loaded, ConfigErrors> {
    let mut loading = Loading::default();
    parse_file(file, text, &mut loading);
    if loading.errors.is_empty() {
        Ok(Loaded {
            documents: loading.documents,
        })
    } else {
        Err(ConfigErrors::sorted(loading.errors))
    }
}

pub(crate) fn load_lenient(path: &Path) -> Loading {
    let mut loading = Loading::default();
    let files = match config_files(path) {
        Ok(files) => files,
        Err(e) => {
            loading.errors.push(e);
            return loading;
        }
    };
    for file in files {
        match read_bounded(&file) {
            Ok(text) => parse_file(&file, &text, &mut loading),
            Err(e) => loading.errors.push(e),
        }
    }
    loading
}

pub(crate) fn load_str_lenient(file: &Path, text: &str) -> Loading {
    let mut loading = Loading::default();
    parse_file(file, text, &mut loading);
    loading
}

/// The files to read for `path`.
fn config_files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|e| ConfigError::new(path, 0, io_message(&e)))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|e| ConfigError::new(path, 0, io_message(&e)))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ConfigError::new(path, 0, io_message(&e)))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // Hidden entries are skipped: editors' swap files, and the `..data`
        // symlinks and `..<timestamp>` directories Kubernetes uses to update
        // a mounted ConfigMap atomically (their files would be read twice).
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let file = entry.path();
        // Follow symlinks (ConfigMap mounts are symlinks); skip directories.
        if std::fs::metadata(&file)
            .map(|m| m.is_file())
            .unwrap_or(true)
        {
            files.push(file);
        }
        if files.len() > MAX_FILES {
            return Err(ConfigError::new(
                path,
                0,
                format!("more than {MAX_FILES} config files in the directory"),
            ));
        }
    }
    files.sort();
    Ok(files)
}

/// Reads at most [`MAX_FILE_BYTES`], so a huge (or endless, e.g. a FIFO)
/// file is refused without being read into memory.
fn read_bounded(file: &Path) -> Result<String, ConfigError> {
    let f = std::fs::File::open(file).map_err(|e| ConfigError::new(file, 0, io_message(&e)))?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ConfigError::new(file, 0, io_message(&e)))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ConfigError::new(
            file,
            1,
            format!(
                "file is larger than the {} KiB limit",
                MAX_FILE_BYTES / 1024
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
        ConfigError::new(
            file,
            u32::try_from(line).unwrap_or(u32::MAX),
            "file is not valid UTF-8",
        )
    })
}

fn io_message(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => format!("cannot read: {e}"),
    }
}

/// One document's text and where it starts in the file.
#[derive(Debug, PartialEq)]
struct Chunk<'a> {
    text: &'a str,
    /// Lines of the file before `text`.
    offset: u32,
    /// Line of the first line that is not blank, a comment, a directive or
    /// a `---` marker: where errors without a better line point.
    first_content_line: u32,
}

/// Splits a YAML stream into documents by its `---` markers. YAML forbids
/// `---` followed by a space or line end at the start of a line anywhere but
/// as a document marker (even inside block scalars), so a line scan finds
/// exactly the parser's boundaries. Directives (`%YAML`) stay with the
/// document that follows them, and `...` ends a document.
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start = 0usize; // byte offset of the current chunk
    let mut start_line = 0u32; // lines before it
    let mut has_content = false; // the chunk has a line beyond directives/comments
    let mut has_marker = false; // the chunk has its `---`
    let mut pos = 0usize;
    let mut line_no = 0u32;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_start = is_marker(bare, "---");
        let is_end = is_marker(bare, "...");
        let is_directive = bare.starts_with('%');
        let opens_new = (is_start || is_directive) && (has_content || has_marker);
        if opens_new && pos > start {
            chunks.push(chunk(text, start, pos, start_line));
            start = pos;
            start_line = line_no;
            has_content = false;
            has_marker = false;
        }
        if is_start {
            has_marker = true;
        }
        let blank = bare.trim().is_empty() || bare.trim_start().starts_with('#');
        if !blank && !is_start && !is_directive {
            has_content = true;
        }
        pos += line.len();
        line_no = line_no.saturating_add(1);
        if is_end {
            chunks.push(chunk(text, start, pos, start_line));
            start = pos;
            start_line = line_no;
            has_content = false;
            has_marker = false;
        }
    }
    if pos > start {
        chunks.push(chunk(text, start, pos, start_line));
    }
    chunks
        .into_iter()
        .filter(|c| c.first_content_line != 0)
        .collect()
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

/// A chunk, with `first_content_line == 0` when it holds no content (only
/// comments, directives, or an empty `---` document): such chunks are
/// dropped, as YAML treats them as empty documents.
fn chunk(text: &str, start: usize, end: usize, offset: u32) -> Chunk<'_> {
    let body = &text[start..end];
    let mut first = 0;
    for (i, line) in body.lines().enumerate() {
        let t = line.trim();
        let t = if is_marker(line, "---") {
            line[3..].trim()
        } else {
            t
        };
        if t.is_empty() || t.starts_with('#') || line.starts_with('%') || is_marker(line, "...") {
            continue;
        }
        // `--- value` puts content on the marker line itself.
        first = offset.saturating_add(u32::try_from(i).unwrap_or(u32::MAX)) + 1;
        break;
    }
    Chunk {
        text: body,
        offset,
        first_content_line: first,
    }
}

fn parse_file(file: &Path, text: &str, loading: &mut Loading) {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for chunk in split_documents(text) {
        parse_document(file, &chunk, loading);
    }
}

const EXPECTED_MAPPING: &str = "expected a mapping (key: value lines or {...})";

/// What is read first from every document, leniently, to learn its kind.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    #[serde(default)]
    kind: Option<Located<String>>,
    #[serde(default)]
    metadata: Option<HeaderMetadata>,
}

#[derive(Deserialize)]
struct HeaderMetadata {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

fn parse_document(file: &Path, chunk: &Chunk<'_>, loading: &mut Loading) {
    let err = |line: u32, message: String| ConfigError::new(file, line, message);
    let header: Header = match parse_yaml(chunk) {
        Ok(h) => h,
        Err((line, message))
            if message == EXPECTED_MAPPING
                && line.is_none_or(|l| l <= chunk.first_content_line) =>
        {
            // The document itself is not a mapping (a stray scalar or list).
            loading.errors.push(err(
                chunk.first_content_line,
                "a document must be a mapping with apiVersion, kind, metadata and spec".to_string(),
            ));
            return;
        }
        Err((line, message)) => {
            loading
                .errors
                .push(err(line.unwrap_or(chunk.first_content_line), message));
            return;
        }
    };
    let Some(kind_field) = header.kind else {
        loading.errors.push(err(
            chunk.first_content_line,
            "missing field `kind`".to_string(),
        ));
        return;
    };
    let Some(kind) = Kind::parse(&kind_field) else {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        loading.errors.push(err(
            line_or(kind_field.line, chunk.first_content_line),
            format!(
                "unknown kind `{}`, expected one of {}",
                kind_field.value,
                known.join(", ")
            ),
        ));
        return;
    };
    let parsed = match kind {
        Kind::MeshConfig => typed(chunk, Spec::MeshConfig),
        Kind::Service => typed(chunk, Spec::Service),
        Kind::ServiceEntry => typed(chunk, Spec::ServiceEntry),
        Kind::Route => typed(chunk, Spec::Route),
        Kind::TrafficPolicy => typed(chunk, |s| Spec::TrafficPolicy(Box::new(s))),
        Kind::AuthorizationPolicy => typed(chunk, Spec::AuthorizationPolicy),
        Kind::Gateway => typed(chunk, Spec::Gateway),
        Kind::RequestAuthentication => typed(chunk, Spec::RequestAuthentication),
    };
    match parsed {
        Ok((api_version, metadata, spec)) => loading.documents.push(Document {
            file: file.to_path_buf(),
            line: chunk.first_content_line,
            api_version,
            metadata,
            spec,
        }),
        Err((line, message)) => {
            loading
                .errors
                .push(err(line.unwrap_or(chunk.first_content_line), message));
            if let Some(name) = header.metadata.as_ref().and_then(|m| m.name.clone()) {
                let namespace = header
                    .metadata
                    .and_then(|m| m.namespace)
                    .unwrap_or_else(|| "default".to_string());
                loading.unparsed.push(Unparsed {
                    kind,
                    namespace,
                    name,
                });
            }
        }
    }
}

type Parsed = (Located<String>, model::Metadata, Spec);

fn typed<S: DeserializeOwned>(
    chunk: &Chunk<'_>,
    wrap: impl FnOnce(S) -> Spec,
) -> Result<Parsed, (Option<u32>, String)> {
    let env: Envelope<S> = parse_yaml(chunk)?;
    Ok((env.api_version, env.metadata, wrap(env.spec)))
}

fn line_or(line: u32, fallback: u32) -> u32 {
    if line == 0 { fallback } else { line }
}

/// Parses one document; on error, the file line (if the parser knows it)
/// and a message without location.
fn parse_yaml<T: DeserializeOwned>(chunk: &Chunk<'_>) -> Result<T, (Option<u32>, String)> {
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            flow_nesting_limit: MAX_DEPTH,
            max_documents: 1,
            max_nodes: 100_000,
            max_aliases: 1_000,
            max_anchors: 1_000,
        },
        with_snippet: false,
    };
    model::with_line_offset(chunk.offset, || {
        serde_saphyr::from_str_with_options::<T>(chunk.text, options)
    })
    .map_err(|e| {
        let line = e.location().map(|l| l.line()).filter(|&l| l > 0).map(|l| {
            chunk
                .offset
                .saturating_add(u32::try_from(l).unwrap_or(u32::MAX))
        });
        (line, error_message(&e))
    })
}

/// The parser's message for `e`, without its "at line X, column Y" suffix
/// (we print `file:line:` in front instead), and in our words for limits.
fn error_message(e: &serde_saphyr::Error) -> String {
    if let serde_saphyr::Error::Budget { breach, .. } = e.without_snippet() {
        return match breach {
            BudgetBreach::Depth { .. } => {
                format!("document is nested deeper than {MAX_DEPTH} levels")
            }
            other => format!("document is too large or complex ({other:?})"),
        };
    }
    if let serde_saphyr::Error::Unexpected { expected, .. } = e.without_snippet() {
        // The parser names YAML events; name what the user writes.
        return match *expected {
            "mapping start" => EXPECTED_MAPPING.to_string(),
            "sequence start" => "expected a list (- item lines or [...])".to_string(),
            "string scalar" => "expected a string".to_string(),
            other => format!("expected {other}"),
        };
    }
    if let serde_saphyr::Error::InvalidScalar { ty, .. } = e.without_snippet() {
        // The parser says "invalid u32"; say it in YAML terms.
        return match *ty {
            "u32" => "expected a whole number from 0 to 4294967295".to_string(),
            "f64" | "f32" => "expected a number".to_string(),
            "bool" => "expected true or false".to_string(),
            other => format!("expected a value of type {other}"),
        };
    }
    let formatter = serde_saphyr::UserMessageFormatter.with_localizer(&NoLocation);
    let options = serde_saphyr::render_options! {
        formatter: &formatter,
        snippets: serde_saphyr::SnippetMode::Off,
    };
    let message = e.render_with_options(options);
    if message.contains("nesting limit") || message.contains("recursion limit") {
        return format!("document is nested deeper than {MAX_DEPTH} levels");
    }
    message
}

/// A localizer that leaves locations out of messages.
struct NoLocation;

impl serde_saphyr::Localizer for NoLocation {
    fn attach_location<'a>(
        &self,
        base: std::borrow::Cow<'a, str>,
        _loc: serde_saphyr::Location,
    ) -> std::borrow::Cow<'a, str> {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(chunks: &[Chunk<'_>]) -> Vec<(u32, u32)> {
        chunks
            .iter()
            .map(|c| (c.offset, c.first_content_line))
            .collect()
    }

    #[test]
    fn documents_are_split_on_markers_with_their_file_lines() {
        let text = "a: 1\n---\n# comment\nb: 2\n--- \nc: 3\n";
        let chunks = split_documents(text);
        assert_eq!(lines(&chunks), vec![(0, 1), (1, 4), (4, 6)]);
        assert_eq!(chunks[1].text, "---\n# comment\nb: 2\n");
    }

    #[test]
    fn empty_documents_and_comment_only_chunks_are_dropped() {
        let text = "# header\n---\n---\na: 1\n---\n# trailing\n";
        let chunks = split_documents(text);
        assert_eq!(lines(&chunks), vec![(2, 4)]);
    }

    #[test]
    fn directives_stay_with_the_following_document() {
        let text = "a: 1\n%YAML 1.2\n---\nb: 2\n";
        let chunks = split_documents(text);
        assert_eq!(lines(&chunks), vec![(0, 1), (1, 4)]);
        assert_eq!(chunks[1].text, "%YAML 1.2\n---\nb: 2\n");
    }

    #[test]
    fn document_end_marker_closes_a_document() {
        let text = "a: 1\n...\nb: 2\n";
        let chunks = split_documents(text);
        assert_eq!(lines(&chunks), vec![(0, 1), (2, 3)]);
    }

    #[test]
    fn dashes_inside_a_value_do_not_split() {
        let text = "a: |\n  ---x\n  --- \nb: ----\n";
        let chunks = split_documents(text);
        assert_eq!(chunks.len(), 1);
    }

    #[test]
    fn error_display_is_file_colon_line_colon_message() {
        let e = ConfigError::new("cfg/a.yaml", 7, "bad thing");
        assert_eq!(e.to_string(), "cfg/a.yaml:7: bad thing");
        let e = ConfigError::new("cfg", 0, "no such file or directory");
        assert_eq!(e.to_string(), "cfg: no such file or directory");
    }
}
